#!/usr/bin/env bash
# Issue 2's distributed check, for ONE device call on nvidia-h200-x2 (carry .bench), from the repo root:
#   bash tools/device_check_n2.sh
# Proxy data, same seed: N=1 then N=2 ranks (torchrun, NCCL), ITERATIONS (80, about a minute) steps
# each on the step-based schedule (a wallclock schedule would give the two speeds different
# learning rates at the same step), quick eval only; compares train_loss step by step; then the
# GPU tests (-s: they print their TTT timings; GPU_TESTS=0 skips them). TRAIN_CUDA_GRAPH's default
# (auto) replays the proxy's steps as CUDA graphs at N=1 only: for a speed ratio give both runs the same
# setting, e.g. TRAIN_CUDA_GRAPH=1 bash tools/device_check_n2.sh (the graphs under NCCL, not yet run).
# FINEWEB_EVAL=1 (issue 11): meanwhile, on GPU 1 beside N=1, a FineWeb-shaped rank's eval
#   (tools/eval_workload.py: 6,250 documents, ~6.5M tokens) of a model trained TRAIN_STEPS (10) steps,
#   phased TTT on, sliding off, EVAL_BUDGET_SECONDS=EVAL_S (150): its stages' seconds (bpb means nothing).
# Logs are written to $OUT (or ./device_out) as they run, so a call cut short still returns them; the
# exit status is 1 if a run, the comparison or a test failed.
set -uo pipefail
W=${OUT:-./device_out}
mkdir -p "$W"
source .bench/device_prep.sh
export ITERATIONS=${ITERATIONS:-80} MAX_WALLCLOCK_SECONDS=0 TTT_ENABLED=0 SLIDING_EVAL=0 ALLOW_OVER_CAP=1 \
  TRAIN_LOG_EVERY=1 PYTHONUNBUFFERED=1 GPTQ_RESERVE_SECONDS=0
failed=0
if [ "${FINEWEB_EVAL:-0}" = 1 ]; then
  python3 tools/eval_workload.py "$DATA_PATH" /tmp/fwval --link-train > "$W/workload.txt" 2>&1 || failed=1
  (env CUDA_VISIBLE_DEVICES=1 DATA_PATH=/tmp/fwval RUN_ID=ttt_fineweb ITERATIONS=${TRAIN_STEPS:-10} TTT_ENABLED=1 \
     TRAIN_LOG_EVERY=500 GPTQ_CALIBRATION_TOKENS=262144 EVAL_BUDGET_SECONDS=${EVAL_S:-150} python3 train_gpt.py \
     > "$W/ttt_fineweb.log" 2>&1; echo "ttt_fineweb exit $?" >> "$W/status") &
fi
for n in 1 2; do
  [ $n = 2 ] && wait  # the FineWeb eval holds GPU 1 until then
  gpus=(); [ $n = 1 ] && gpus=(CUDA_VISIBLE_DEVICES=0)
  env "${gpus[@]}" RUN_ID=n$n ARTIFACT_PATH=/tmp/n$n.pgq torchrun --standalone --nproc_per_node=$n train_gpt.py > "$W/n$n.log" 2>&1
  rc=$?; echo "N=$n exit $rc" | tee -a "$W/status"; [ $rc -eq 0 ] || failed=1
done
python3 tools/compare_runs.py --steps 20 "$W/n1.log" "$W/n2.log" | tee "$W/compare.txt" || failed=1
if [ "${GPU_TESTS:-1}" = 1 ]; then
  python3 -m pytest -q -s tests/test_gpu.py > "$W/test_gpu.log" 2>&1 || failed=1
  grep -hE "passed|failed|phased TTT on" "$W/test_gpu.log" | tail -4
fi
grep -hE "^compile_warmup|^training:|eval_stages|total_eval_time|Error" "$W"/n1.log "$W"/n2.log "$W"/ttt_fineweb.log 2>/dev/null
exit $failed
