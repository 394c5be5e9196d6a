#!/usr/bin/env bash
# One nvidia-h200-x2 lease for issues 10 and 11 (carry .bench; repo root on the device):
#   bash tools/device_eval_n2.sh
# GPU 1: a FineWeb-shaped rank's eval (tools/eval_workload.py: 6,250 documents, ~6.5M tokens) of a
#   model trained TRAIN_STEPS (10) steps, phased TTT on, sliding off, EVAL_BUDGET_SECONDS=EVAL_S (150):
#   how far TTT gets in that time, its compile and every stage's seconds (a timing run; bpb means nothing).
# GPU 0, meanwhile: tests/test_gpu.py, then N=1 for N_STEPS (20) steps on the proxy (TTT and sliding off, train_loss every step);
#   then, once GPU 1 is free, N=2 (torchrun, NCCL) with the same seed; train_loss compared step by step.
# Every run calibrates GPTQ on 262,144 tokens (a timing and equivalence check, not a score).
# Logs and a summary in $OUT; exit status 1 if a run or the comparison failed.
set -u
W=${OUT:-./device_out}  # logs are written there as they run: a call cut short still returns them
mkdir -p $W
source .bench/device_prep.sh
python3 tools/eval_workload.py "$DATA_PATH" /tmp/fwval --link-train > $W/workload.txt 2>&1 || echo "workload failed" >> $W/status
(env CUDA_VISIBLE_DEVICES=1 DATA_PATH=/tmp/fwval RUN_ID=ttt_fineweb ITERATIONS=${TRAIN_STEPS:-10} MAX_WALLCLOCK_SECONDS=0 \
   GPTQ_RESERVE_SECONDS=0 GPTQ_CALIBRATION_TOKENS=262144 EVAL_BUDGET_SECONDS=${EVAL_S:-150} SLIDING_EVAL=0 ALLOW_OVER_CAP=1 python3 train_gpt.py \
   > $W/ttt_fineweb.log 2>&1; echo "ttt_fineweb exit $?" >> $W/status) &
ttt=$!
n2env=(ITERATIONS=${N_STEPS:-20} MAX_WALLCLOCK_SECONDS=0 GPTQ_RESERVE_SECONDS=0 TTT_ENABLED=0 SLIDING_EVAL=0 ALLOW_OVER_CAP=1
       TRAIN_LOG_EVERY=1 GPTQ_CALIBRATION_TOKENS=262144)
CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -s tests/test_gpu.py > $W/test_gpu.log 2>&1; echo "test_gpu exit $?" >> $W/status
env CUDA_VISIBLE_DEVICES=0 RUN_ID=n1 ARTIFACT_PATH=/tmp/n1.pgq "${n2env[@]}" torchrun --standalone --nproc_per_node=1 \
  train_gpt.py > $W/n1.log 2>&1; echo "n1 exit $?" >> $W/status
wait $ttt
env RUN_ID=n2 ARTIFACT_PATH=/tmp/n2.pgq "${n2env[@]}" torchrun --standalone --nproc_per_node=2 train_gpt.py \
  > $W/n2.log 2>&1; echo "n2 exit $?" >> $W/status
{
  cat $W/status
  grep -hE "passed|failed|Error|phased TTT on" $W/test_gpu.log | tail -8
  tail -3 $W/workload.txt
  grep -hE "^training:|^compile_warmup|quantized val_bpb|diagnostic quantized val" $W/n1.log $W/n2.log
  python3 tools/compare_runs.py --steps ${N_STEPS:-20} $W/n1.log $W/n2.log | tail -3
  grep -hE "^compile_warmup|^ttt|^ttp: b1/|^ttpp|^progress|eval_stages|total_eval_time|val_bpb|Error|error" $W/ttt_fineweb.log | tail -30
} 2>&1 | tee $W/summary.txt
grep -q "n2 exit 0" $W/status && grep -q "n1 exit 0" $W/status
