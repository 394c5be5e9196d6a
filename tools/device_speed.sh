#!/usr/bin/env bash
# Issue 10's speed measurements in ONE nvidia-h200-x2 lease (carry .bench; .bench/old_train_gpt.py = the
# code before the speed work, e.g. `git show 500df04:train_gpt.py > .bench/old_train_gpt.py`), repo root:
#   bash tools/device_speed.sh start      returns at once: the leader on GPU 1 (side_by_side.sh, SECS
#                                         seconds of training), and on GPU 0 in turn: BENCH_STEPS=30 from a
#                                         cold compile, tests/test_gpu.py, old vs new on the same 50 steps
#                                         (same math and per-step speed), a bench at the 8-GPU per-GPU load
#                                         (786,432 tokens/step on one GPU) and one with MLP_ACT=leaky_relu2
#   bash tools/device_speed.sh wait [S]   polls up to S s (default 540); logs to $OUT; says when all is done
set -u
W=/tmp/speed
root=$(pwd)
source "$(dirname "$0")/device_lib.sh"
gpu0_chain() {
  while alive /tmp/sbs/ours.pid; do sleep 3; done
  cp /tmp/sbs/ours.log $W/bench_proxy.log; echo "bench_proxy done" >> $W/status
  CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q tests/test_gpu.py > $W/test_gpu.log 2>&1
  echo "test_gpu exit $?" >> $W/status
  same=(ITERATIONS=50 ENABLE_LOOPING_AT=0.5 TRAIN_LOG_EVERY=1 MAX_WALLCLOCK_SECONDS=0 GPTQ_RESERVE_SECONDS=0)
  mkdir -p $W/old && cp .bench/old_train_gpt.py $W/old/train_gpt.py
  train_only math_old $W/old CUDA_VISIBLE_DEVICES=0 "${same[@]}"
  train_only math_new "$root" CUDA_VISIBLE_DEVICES=0 "${same[@]}"
  env CUDA_VISIBLE_DEVICES=0 RUN_ID=bench_786k TRAIN_BATCH_TOKENS=786432 BENCH_STEPS=10 python3 train_gpt.py \
    > $W/bench_786k.log 2>&1; echo "bench_786k exit $?" >> $W/status
  env CUDA_VISIBLE_DEVICES=0 RUN_ID=bench_leaky MLP_ACT=leaky_relu2 BENCH_STEPS=30 python3 train_gpt.py \
    > $W/bench_leaky.log 2>&1; echo "bench_leaky exit $?" >> $W/status
  echo "gpu0 chain finished" >> $W/status
}
case "${1:-}" in
start)
  rm -rf $W; mkdir -p $W
  OURS_ENV="BENCH_STEPS=30 ${OURS_ENV:-}" SECS=${SECS:-150} LEADER_ENV="TRAIN_LOG_EVERY=10 ${LEADER_ENV:-}" \
    bash .bench/anchor/side_by_side.sh start
  source .bench/device_prep.sh
  export -f gpu0_chain train_only train_until stop_at alive; export W root
  setsid bash -c gpu0_chain > $W/chain.out 2>&1 < /dev/null &
  echo "chain started"
  ;;
wait)
  end=$((SECONDS + ${2:-540}))
  while [ $SECONDS -lt $end ] && ! grep -q "gpu0 chain finished" $W/status 2>/dev/null; do sleep 10; done
  # the leader: stop it once it has trained (its GPTQ and eval are not measured here)

  cat $W/status 2>/dev/null
  grep -h "^bench:" $W/*.log 2>/dev/null
  grep -E "passed|failed" $W/test_gpu.log 2>/dev/null | tail -2
  tail -3 /tmp/sbs/leader.log 2>/dev/null
  mkdir -p "${OUT:-/tmp/out}"
  tar czf "${OUT:-/tmp/out}/speed_logs.tgz" -C /tmp speed sbs/leader.log sbs/ours.log 2>/dev/null
  if grep -q "gpu0 chain finished" $W/status 2>/dev/null && grep -q "stopping_early" /tmp/sbs/leader.log 2>/dev/null; then
    echo "all finished"; else echo "still running: call wait again within 30 s"; fi
  ;;
*) echo "usage: device_speed.sh start|wait [seconds]"; exit 2 ;;
esac
