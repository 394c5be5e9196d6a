# Shell functions the device scripts share (source it; W = the folder for logs, pids and status).
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
train_only() {  # name dir env...: train in dir, then stop the process once training has ended (no GPTQ/eval)
  train_until "^training:" "$@"
}
train_until() {  # pattern name dir env...: train in dir, stop the process once its log has a line matching pattern
  local pattern=$1 name=$2 dir=$3; shift 3
  (cd "$dir" && exec env RUN_ID=$name "$@" python3 train_gpt.py > $W/$name.log 2>&1) &
  echo $! > $W/$name.pid
  while alive $W/$name.pid; do
    grep -qs "$pattern" $W/$name.log && { sleep 1; kill "$(cat $W/$name.pid)"; break; }
    sleep 2
  done
  echo "$name done" >> $W/status
  grep -qs "$pattern" $W/$name.log  # the status: the line came (the process is stopped after it)
}
train_steps() {  # name dir steps env...: a same-seed A/B's run: steps logged one by one, looping from the middle
  local name=$1 dir=$2 steps=$3; shift 3
  train_only "$name" "$dir" ITERATIONS=$steps ENABLE_LOOPING_AT=0.5 TRAIN_LOG_EVERY=1 MAX_WALLCLOCK_SECONDS=0 \
    GPTQ_RESERVE_SECONDS=0 "$@"
}
