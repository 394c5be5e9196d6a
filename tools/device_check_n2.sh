#!/usr/bin/env bash
# Issue 2's distributed check, for ONE device call on nvidia-h200-x2 (carry .bench), from the repo root:
#   bash tools/device_check_n2.sh
# Proxy data, same seed: N=1 then N=2 ranks (torchrun, NCCL), ITERATIONS (80, about a minute) steps
# each on the step-based schedule (a wallclock schedule would give the two speeds different
# learning rates at the same step), quick eval only; compares train_loss step by step; then the
# GPU tests.
# Logs go to $OUT (or ./device_out); the exit status is 1 if a run, the comparison or a test failed.
set -uo pipefail
out=${OUT:-./device_out}
mkdir -p "$out"
source .bench/device_prep.sh
export ITERATIONS=${ITERATIONS:-80} MAX_WALLCLOCK_SECONDS=0 TTT_ENABLED=0 SLIDING_EVAL=0 ALLOW_OVER_CAP=1 \
  TRAIN_LOG_EVERY=1 PYTHONUNBUFFERED=1
failed=0
for n in 1 2; do
  RUN_ID=n$n ARTIFACT_PATH=/tmp/n$n.pgq torchrun --standalone --nproc_per_node=$n train_gpt.py > "$out/n$n.log" 2>&1
  rc=$?; echo "N=$n exit $rc"; [ $rc -eq 0 ] || failed=1
done
python3 tools/compare_runs.py --steps 20 "$out/n1.log" "$out/n2.log" | tee "$out/compare.txt" || failed=1
python3 -m pytest -q tests/test_gpu.py 2>&1 | tee "$out/test_gpu.log" || failed=1
exit $failed
