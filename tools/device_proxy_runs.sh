#!/usr/bin/env bash
# One nvidia-h200-x2 call (carry .bench), from the repo root: two proxy seeds side by side (a seed per
# GPU, SECS of training, TTT and sliding off) for tools/records.py, then a quick sweep (tools/sweep.py,
# a point per GPU) over SWEEP; everything lands in $OUT/proxy_runs.tgz.
set -u
source .bench/device_prep.sh
out=${OUT:-./device_out}; mkdir -p "$out" /tmp/pr
secs=${SECS:-60}
i=0
for seed in ${SEEDS:-42 1337}; do
  env CUDA_VISIBLE_DEVICES=$i SEED=$seed RUN_ID=proxy_seed$seed ARTIFACT_PATH=/tmp/pr/seed$seed.pgq \
    MAX_WALLCLOCK_SECONDS=$secs TTT_ENABLED=0 SLIDING_EVAL=0 python3 train_gpt.py > /tmp/pr/seed$seed.out 2>&1 &
  i=$((i + 1))
done
wait
grep -h "val_bpb\|^training:\|Total submission" logs/proxy_seed*.txt
python3 tools/sweep.py --quick --quick-seconds ${SWEEP_SECS:-45} --gpus 0,1 --out /tmp/pr/sweep ${SWEEP:-MATRIX_LR=0.022,0.03}
cat /tmp/pr/sweep/results.md
tar czf "$out/proxy_runs.tgz" logs /tmp/pr
