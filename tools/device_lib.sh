# Shell functions the device scripts share (source it; W = the folder for logs, pids and status).
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_at() {  # pattern name pid: while pid runs, poll $W/NAME.log; at a line matching pattern, stop the process
  # whose PID $W/NAME.pid holds
  while kill -0 $3 2>/dev/null; do
    grep -qs "$1" $W/$2.log && { sleep 1; kill "$(cat $W/$2.pid)"; break; }
    sleep 2
  done
}
train_only() {  # name dir env...: train in dir, then stop the process once training has ended (no GPTQ/eval)
  train_until "^training:" "$@"
}
train_until() {  # pattern name dir env...: train in dir, stop the process once its log has a line matching pattern
  local pattern=$1 name=$2 dir=$3; shift 3
  (cd "$dir" && exec env RUN_ID=$name "$@" python3 train_gpt.py > $W/$name.log 2>&1) &
  echo $! > $W/$name.pid
  stop_at "$pattern" $name $!
  echo "$name done" >> $W/status
  grep -qs "$pattern" $W/$name.log  # the status: the line came (the process is stopped after it)
}
train_steps() {  # name dir steps env...: a same-seed A/B's run: steps logged one by one, looping from the middle
  local name=$1 dir=$2 steps=$3; shift 3
  train_only "$name" "$dir" ITERATIONS=$steps ENABLE_LOOPING_AT=0.5 TRAIN_LOG_EVERY=1 MAX_WALLCLOCK_SECONDS=0 \
    GPTQ_RESERVE_SECONDS=0 "$@"
}
leader_in() {  # name env... cmd...: in $W/lead_NAME, the leader (.bench/anchor) with its record's settings,
  # as side_by_side.sh runs it (the same data, the LUT byte sidecar, the varlen stand-in for FA3)
  local name=$1 A=$PWD/.bench/anchor d=$W/lead_$1; shift
  rm -f $W/$name.pid
  mkdir -p $d/data && ln -sf $DATA_PATH/fineweb_train_*.bin $DATA_PATH/fineweb_val_000000.bin $d/data/
  python3 $A/make_sidecar.py $DATA_PATH/fineweb_val_000000.bin "$TOKENIZER_PATH" $d/data/fineweb_val_bytes_000000.bin \
    || return 1
  cp $A/leader_train_gpt.py $d/train_gpt.py
  # the PID file names the leader's python (exec), for leader_train_only's stop
  (cd $d && echo $BASHPID > $W/$name.pid && exec env PYTHONPATH="$A:${PYTHONPATH:-}" DATA_PATH=$d/data \
    CASEOPS_ENABLED=1 COMPRESSOR=brotli MLP_CLIP_SIGMAS=11.5 EMBED_CLIP_SIGMAS=14 WARMDOWN_FRAC=0.85 BETA2=0.99 \
    TTT_BETA2=0.99 TTT_WEIGHT_DECAY=0.5 TTT_LORA_RANK=80 SPARSE_ATTN_GATE_SCALE=0.5 PHASED_TTT_PREFIX_DOCS=130 \
    PHASED_TTT_NUM_PHASES=3 EMBED_BITS=7 MIN_LR=0.1 GPTQ_RESERVE_SECONDS=0.5 SMEAR_GATE_ENABLED=1 \
    SPARSE_ATTN_GATE_ENABLED=1 GATED_ATTN_QUANT_GATE=1 \
    LQER_ENABLED=1 VAL_LOSS_EVERY=0 TTT_ENABLED=0 RUN_ID=$name "$@")
}
leader_profile() {  # name env...: the leader's step profiled at main-loop steps 10 and 40 (looping from step 30
  # of 60) by tools/profile_leader.py
  local name=$1 root=$PWD; shift
  leader_in $name ITERATIONS=60 ENABLE_LOOPING_AT=0.5 MAX_WALLCLOCK_SECONDS=0 "$@" \
    python3 $root/tools/profile_leader.py train_gpt.py --steps 3 --at 10,40
}
leader_train() {  # name env...: the leader's full proxy run (MAX_WALLCLOCK_SECONDS of training, GPTQ, its evals)
  local name=$1; shift
  leader_in $name "$@" python3 train_gpt.py
}
leader_train_only() {  # name env...: the leader's training, its process stopped once its training has ended
  local name=$1; shift
  rm -f $W/$name.log  # a name reused in a lease: not the last run's line
  leader_train $name "$@" > $W/$name.log 2>&1 &
  local setup=$!  # the PID file appears only after the setup (sidecar), so its process is the one watched
  stop_at "^peak memory allocated" $name $setup
  wait $setup
  grep -qs "^stopping_early" $W/$name.log  # the status: it trained to its wallclock cap
}
