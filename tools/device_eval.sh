#!/usr/bin/env bash
# Eval timing and TTT variants on the device (issue 11), one chain of jobs per GPU, detached, so a
# lease's calls can poll them (carry .bench, plus the folder of any artifact named; repo root):
#   bash tools/device_eval.sh start GPU JOB...   returns at once; runs the JOBs in turn on GPU
#   bash tools/device_eval.sh wait [S]           polls up to S s (default 540) until every chain has
#        finished, prints each job's eval lines, copies logs (one tgz) and trained artifacts to $OUT
# JOB is KIND:NAME[=ENV,ENV...] (NAMEs unique within a lease: each is a log and a RUN_ID; a value may
# hold commas: ENVs split where a NAME= follows one). Several chains may share a GPU (SHARE=1 start),
# memory permitting: two TTT evals, or one beside gputest, do not fit in an H200's 139 GiB (CUDA-graph pools, reserved memory):
#   train   train_gpt.py's full pipeline (proxy config: train, GPTQ, eval), artifact in $W/NAME.pgq
#   eval    tools/eval_artifact.py --precompile --compile-times on the proxy val
#   fweval  the same on a FineWeb-shaped rank's val (tools/eval_workload.py, 6,250 documents), with a
#           timing stand-in artifact made from the untrained model (--make-artifact; scores mean nothing)
#   gputest tests/test_gpu.py (-s: its printed timings; ARGS=... adds pytest arguments split at spaces, e.g. "gputest:g=ARGS=-k train_cuda": a -k of one word)
#   steps   STEPS=... (in ENV; 50) training steps logged one by one (looping from the middle), stopped before
#           GPTQ, for a same-seed A/B
#   prequant STEPS=... (in ENV; 50) training steps logged one by one (looping from ENABLE_LOOPING_AT, 0.35),
#           stopped after the pre-quantization val_bpb (GPTQ, which runs before it, included): a fixed-step
#           quality A/B; SLIDING_EVAL=0,TTT_ENABLED=0 in ENV skip those evals' compiles
#   prof    tools/profile_ttt.py (TTT ms/step by document length, a profiled batch, global SGD)
#   tprof   tools/profile_train.py 3 (our training step: kernels per step, looping off and on)
#   abench  tools/bench_ab.py: ARGS=... its arguments, e.g. "abench:ab=ARGS=TRAIN_CUDA_GRAPH=0 --rounds 6" (quoted: an
#           in-process speed A/B of two models in alternating rounds)
#   kbench  tools/bench_kernels.py (ARGS=... its arguments, e.g. ARGS=--only mlp): the step's pieces on
#           the model's shapes (the MLP fused or not, bf16 vs FP8 GEMMs, fp32 vs bf16 norms), forward and
#           forward + backward
#   lprof   the leader's step the same way (tools/profile_leader.py; its ~7 min compile first), e.g.
#           lprof:l786=TRAIN_BATCH_TOKENS=786432 for the 8-GPU run's per-GPU load
#   leader  the leader's full proxy run with side_by_side.sh's settings (training, GPTQ, its evals; TTT off).
#           Without x2, "leader:lead train:ours" runs the two one after the other on one GPU, in one lease
#           (not side_by_side.sh: not at the same time); tools/phase_rates.py compares their logs
#   lonly   the leader's training only (stopped after it: no GPTQ, no eval); tonly: ours the same. A pair at the
#           8-GPU run's per-GPU load (tools/phase_rates.py --tokens 786432 --leader-flops 2.683e8,4.009e8):
#           lonly:l786=TRAIN_BATCH_TOKENS=786432,MAX_WALLCLOCK_SECONDS=150
#           tonly:o786=TRAIN_BATCH_TOKENS=786432,MAX_WALLCLOCK_SECONDS=150
# DIR=... in a train, steps, prequant, abench, eval or fweval job's ENV: the folder whose train_gpt.py runs (default: the repo's), for
# an A/B of two versions in one lease; copied out first, with tools/ (each call's carry replaces a carried
# folder: a job running in it lost its cwd).
# BENCH_STEPS=... in a train job's ENV times steps with looping off and on after the compile, then ends it.
# eval jobs read ARTIFACT_PATH from their ENV, e.g. ARTIFACT_PATH=/tmp/evaldev/base.pgq (a train job's);
# ARGS=... in ENV adds flags to eval/fweval's tools/eval_artifact.py (abench: bench_ab.py's arguments; gputest: pytest's), e.g. ARGS=--memory-gib 79 (an H100's memory).
# Example: bash tools/device_eval.sh start 0 fweval:fw=EVAL_BUDGET_SECONDS=1200
#          bash tools/device_eval.sh start 1 train:base
set -u
W=/tmp/evaldev
source "$(dirname "$0")/device_lib.sh"
job() {  # KIND:NAME[=ENV,...]
  local kind=${1%%:*} rest=${1#*:}
  local name=${rest%%=*} envs=""
  [ "$rest" != "$name" ] && envs=${rest#*=}
  # A cache of the job's own: every compile is cold, as in the competition's run, where TTT's graphs
  # are compiled once inside the eval timer (a job after another that compiled the same graphs took
  # 28-38 s of TTT warm-up instead of 78-81 s). A job may share one: TORCHINDUCTOR_CACHE_DIR=... and
  # TRITON_CACHE_DIR=... (our own Triton kernels) in ENV.
  local cold=(TORCHINDUCTOR_CACHE_DIR=$W/cache/$name TRITON_CACHE_DIR=$W/cache/$name/triton)
  # split at the commas that start a NAME=, so values may hold commas (TTT_LORA_TARGETS=k,o,mlp,head)
  local extra=(); [ -n "$envs" ] && mapfile -t extra < <(sed -E 's/,([A-Z][A-Z0-9_]*=)/\n\1/g' <<< "$envs")
  # ARGS=... (eval/fweval's extra flags), DIR=... and STEPS=... (steps): not environment variables
  local args=() rest=() e dir=. steps=50
  for e in "${extra[@]}"; do
    case $e in ARGS=*) read -r -a args <<< "${e#ARGS=}" ;; DIR=*) dir=${e#DIR=} ;; STEPS=*) steps=${e#STEPS=} ;;
    *) rest+=("$e") ;; esac
  done
  extra=("${rest[@]}")
  if [ "$dir" != . ]; then
    mkdir -p $W/code/$name && cp -r tools "$dir/train_gpt.py" $W/code/$name/ && dir=$W/code/$name || return 1
  fi
  case $kind in
  train) env "${cold[@]}" RUN_ID=$name ARTIFACT_PATH=$W/$name.pgq "${extra[@]}" python3 $dir/train_gpt.py > $W/$name.log 2>&1 ;;
  eval) env "${cold[@]}" RUN_ID=$name "${extra[@]}" python3 $dir/tools/eval_artifact.py --precompile --compile-times \
          "${args[@]}" > $W/$name.log 2>&1 ;;
  fweval) env "${cold[@]}" RUN_ID=$name DATA_PATH=/tmp/fwval ARTIFACT_PATH=$W/$name.timing GPTQ_CALIBRATION_TOKENS=262144 \
            "${extra[@]}" python3 $dir/tools/eval_artifact.py --make-artifact --precompile --compile-times "${args[@]}" \
            > $W/$name.log 2>&1 ;;
  steps) train_steps "$name" "$dir" "$steps" "${cold[@]}" "${extra[@]}" ;;
  prequant) train_until "pre-quantization post-ema val_loss" "$name" "$dir" ITERATIONS=$steps TRAIN_LOG_EVERY=1 \
              MAX_WALLCLOCK_SECONDS=0 GPTQ_RESERVE_SECONDS=0 "${cold[@]}" "${extra[@]}" ;;
  gputest) env "${cold[@]}" "${extra[@]}" python3 -m pytest -q -s tests/test_gpu.py "${args[@]}" > $W/$name.log 2>&1 ;;
  prof) env "${cold[@]}" PHASED_TTT_PREFIX_DOCS=0 "${extra[@]}" python3 tools/profile_ttt.py > $W/$name.log 2>&1 ;;
  tprof) env "${cold[@]}" "${extra[@]}" python3 tools/profile_train.py 3 > $W/$name.log 2>&1 ;;
  abench) env "${cold[@]}" "${extra[@]}" python3 $dir/tools/bench_ab.py "${args[@]}" > $W/$name.log 2>&1 ;;
  kbench) env "${cold[@]}" "${extra[@]}" python3 tools/bench_kernels.py "${args[@]}" > $W/$name.log 2>&1 ;;
  lprof) leader_profile "$name" "${cold[@]}" "${extra[@]}" > $W/$name.log 2>&1 ;;
  leader) leader_train "$name" "${cold[@]}" "${extra[@]}" > $W/$name.log 2>&1 ;;
  lonly) leader_train_only "$name" "${cold[@]}" "${extra[@]}" ;;
  tonly) train_only "$name" "$dir" "${cold[@]}" "${extra[@]}" ;;
  *) echo "unknown job kind $kind" > $W/$name.log; false ;;
  esac
  echo "$name exit $?" >> $W/status
}
chain() {
  for j in "$@"; do job "$j"; done
  echo "chain $CUDA_VISIBLE_DEVICES finished" >> $W/status
}
case "${1:-}" in
start)
  shift; gpu=$1; shift
  mkdir -p $W
  # A second chain on a busy GPU only with SHARE=1: a TTT eval beside the GPU tests ran out of memory
  # (2026-12-01g: 68.5 + 71.3 GiB of 139.8), and two chains' seconds do not hold.
  busy=$(( $(cat $W/chains 2>/dev/null | grep -cx "chain $gpu") - $(cat $W/status 2>/dev/null | grep -cx "chain $gpu finished") ))
  if [ "$busy" -gt 0 ] && [ "${SHARE:-0}" != 1 ]; then
    echo "GPU $gpu still runs a chain: SHARE=1 to start another beside it (memory permitting)"; exit 2
  fi
  source .bench/device_prep.sh
  if [[ "$*" == *fweval:* ]] && [ ! -f /tmp/fwval/fineweb_val_000000.bin ]; then
    python3 tools/eval_workload.py "$DATA_PATH" /tmp/fwval --link-train > $W/workload.txt 2>&1
  fi
  export -f chain job leader_in leader_profile leader_train leader_train_only train_steps train_only train_until stop_at alive
  export W CUDA_VISIBLE_DEVICES=$gpu
  echo "chain $gpu" >> $W/chains
  setsid bash -c 'chain "$@"' chain "$@" >> $W/chain$gpu.out 2>&1 < /dev/null &
  echo "chain started on GPU $gpu: $*"
  ;;
wait)
  [ -f $W/chains ] || { echo "no chain started (device_eval.sh start GPU JOB...)"; exit 2; }
  end=$((SECONDS + ${2:-540}))
  done_all() { [ "$(cat $W/status 2>/dev/null | grep -c finished)" -ge "$(wc -l < $W/chains)" ]; }
  while [ $SECONDS -lt $end ] && ! done_all; do sleep 5; done
  cat $W/status 2>/dev/null
  for f in $W/*.log; do
    echo "== $(basename $f .log)"
    grep -hE "^compile_warmup|^training:|^bench:|^bench_ab|val_bpb|^peak memory|^eval_stages|^ttt_leftover|^eval_artifact|^ttpp|^length|^warm-up|^global SGD|^stopping_early|^layer_loop|^== |^phased TTT on|passed|failed|Error|error" $f | tail -14
  done
  mkdir -p "${OUT:-/tmp/out}"
  tar czf "${OUT:-/tmp/out}/eval_logs.tgz" --exclude=cache --exclude=data --exclude=code --exclude='*.pgq' --exclude='*.timing' --exclude='*.pt' --exclude='*.ptz' --exclude='*.bin' -C /tmp evaldev 2>/dev/null
  cp $W/*.pgq "${OUT:-/tmp/out}/" 2>/dev/null
  if done_all; then echo "all finished"; else echo "still running: call wait again"; fi
  ;;
*) echo "usage: device_eval.sh start GPU KIND:NAME[=ENV,...]... | wait [seconds]"; exit 2 ;;
esac
