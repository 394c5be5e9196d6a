#!/usr/bin/env bash
# A/B speed and same-math check of train_gpt.py variants on ONE GPU, one after another, in one lease
# (carry .bench; run from the repo root on the device):
#   bash tools/device_ab.sh start [gpu] NAME=ENV,ENV... NAME=...   returns at once; in turn on the GPU:
#        tests/test_gpu.py (unless SKIP_TEST_GPU=1), then each variant trained STEPS (default 50) steps
#        logged every step (looping from step STEPS/2), stopped once training ends (no GPTQ, no eval)
#   bash tools/device_ab.sh wait [S]                               polls up to S s (default 540), then
#        (PROFILE=1: then tools/profile_train.py without CUDA graphs) prints each variant's compile seconds, ms/step per phase and loss agreement, tars logs to $OUT
# Example: bash tools/device_ab.sh start 0 xielu=MLP_ACT=xielu leaky=MLP_ACT=leaky_relu2
set -u
W=/tmp/ab
source "$(dirname "$0")/device_lib.sh"
chain() {
  if [ "${SKIP_TEST_GPU:-0}" != 1 ]; then
    python3 -m pytest -q tests/test_gpu.py > $W/test_gpu.log 2>&1; echo "test_gpu exit $?" >> $W/status
  fi
  local steps=${STEPS:-50}
  for spec in "$@"; do
    local name=${spec%%=*} envs=${spec#*=}
    IFS=, read -r -a extra <<< "$envs"
    train_steps "$name" . "$steps" "${extra[@]}"
  done
  if [ "${PROFILE:-0}" = 1 ]; then  # wall vs summed kernel time per step, without CUDA graphs
    env CUDA_GRAPHS=0 python3 tools/profile_train.py 3 > $W/profile.txt 2>&1; echo "profile exit $?" >> $W/status
  fi
  echo "chain finished" >> $W/status
}
case "${1:-}" in
start)
  shift; gpu=$1; shift
  rm -rf $W; mkdir -p $W
  source .bench/device_prep.sh
  export -f chain train_steps train_only train_until stop_at alive; export W CUDA_VISIBLE_DEVICES=$gpu
  setsid bash -c 'chain "$@"' chain "$@" > $W/chain.out 2>&1 < /dev/null &
  echo "chain started: $*"
  ;;
wait)
  end=$((SECONDS + ${2:-540}))
  while [ $SECONDS -lt $end ] && ! grep -q "chain finished" $W/status 2>/dev/null; do sleep 5; done
  cat $W/status 2>/dev/null
  grep -hE "passed|failed|Error" $W/test_gpu.log 2>/dev/null | tail -5
  grep -h "^== looping" $W/profile.txt 2>/dev/null
  for f in $W/*.log; do
    [ "$(basename $f)" = test_gpu.log ] && continue
    echo "== $(basename $f .log)"; grep -hE "^compile_warmup|^training:|^peak|Error|error" $f | head -5
  done
  logs=$(ls -tr $W/*.log 2>/dev/null | grep -v test_gpu)
  python3 - $logs <<'PY'
import re, sys
for path in sys.argv[1:]:  # ms/step per phase from the cumulative train_time of each logged step
    t = {}
    for m in re.finditer(r"^(\d+)/\d+ train_loss: \S+ .*?step_avg: ([\d.]+)ms", open(path).read(), re.M):
        t[int(m[1])] = float(m[2]) * int(m[1])
    n = max(t, default=0)
    if n >= 12:
        h = n // 2
        print(f"{path.split('/')[-1]:24s} no loop ms/step {(t[h] - t[5]) / (h - 5):8.2f}   looped {(t[n] - t[h + 3]) / (n - h - 3):8.2f}")
PY
  set -- $logs
  [ $# -ge 2 ] && python3 tools/compare_runs.py "$1" "$2" --steps 50 --tol 0.02 2>&1 | tail -4
  mkdir -p "${OUT:-/tmp/out}"
  tar czf "${OUT:-/tmp/out}/ab_logs.tgz" -C /tmp ab 2>/dev/null
  if grep -q "chain finished" $W/status 2>/dev/null; then echo "all finished"; else echo "still running: call wait again"; fi
  ;;
*) echo "usage: device_ab.sh start GPU NAME=ENV,... | wait [seconds]"; exit 2 ;;
esac
