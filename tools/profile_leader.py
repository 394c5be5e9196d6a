"""Profile the leader's training step (PR #1855, ../shared/bench/anchor/leader_train_gpt.py, run
unchanged) the way tools/profile_train.py profiles ours: wall vs summed kernel time per step and the
top kernels, looping off and on, so the two steps can be compared kernel by kernel (issue 10).

The script runs as __main__ under runpy, with its own environment variables. A global optimizer
step hook counts its Muon steps, one per training step. WARMUP steps come before its timed loop
(WARMUP_STEPS twice: without and with the loop). The hook profiles STEPS steps from main-loop step
AT_NO_LOOP and again from AT_LOOP, prints both tables, then ends the process (no GPTQ, no eval).
Set ITERATIONS and ENABLE_LOOPING_AT so that looping starts between the two, with
MAX_WALLCLOCK_SECONDS=0 (a step schedule), as tools/device_eval.sh's lprof jobs do.
    python3 tools/profile_leader.py LEADER_SCRIPT [--steps 3] [--at 10,40] [--warmup N]"""
import argparse
import os
import runpy
import sys
import time

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_train import print_kernels  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepProfiler:
    """The optimizer hook: counts training steps by the optimizer named `muon_name` and profiles
    the windows; `on_done` runs after the last one (the CLI ends the process there)."""

    def __init__(self, windows, steps, warmup, batch_tokens, on_done, muon_name="Muon"):
        self.windows, self.steps, self.warmup, self.batch_tokens = list(windows), steps, warmup, batch_tokens
        self.on_done, self.muon_name = on_done, muon_name
        self.count, self.prof, self.t0 = 0, None, 0.0

    def __call__(self, optimizer, args, kwargs):
        if type(optimizer).__name__ != self.muon_name:
            return
        self.count += 1
        step = self.count - self.warmup  # main-loop steps done
        if self.prof is not None and step == self.windows[0] + self.steps:  # first: a window may start here
            sync()
            wall = (time.perf_counter() - self.t0) / self.steps
            self.prof.__exit__(None, None, None)
            print_kernels(self.prof, self.steps, wall, self.batch_tokens,
                          f"leader steps {self.windows[0] + 1}-{step} (main loop)")
            self.prof = None
            self.windows.pop(0)
            if not self.windows:
                self.on_done()
        if self.prof is None and self.windows and step == self.windows[0]:
            sync()
            # CPU and CUDA, as tools/profile_train.py: the same profiler overhead on both scripts' wall times
            self.prof = profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * torch.cuda.is_available())
            self.prof.__enter__()
            self.t0 = time.perf_counter()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("script")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--at", default="10,40", help="main-loop steps where the two windows start")
    ap.add_argument("--warmup", type=int, help="Muon steps before the main loop (default: the leader's WARMUP_STEPS, 20, "
                    "twice when NUM_LOOPS, 2, is > 0)")
    a = ap.parse_args()
    if a.warmup is None:
        a.warmup = int(os.environ.get("WARMUP_STEPS", 20)) * (2 if int(os.environ.get("NUM_LOOPS", 2)) > 0 else 1)
    windows = sorted(int(x) for x in a.at.split(","))
    if any(w2 < w1 + a.steps for w1, w2 in zip(windows, windows[1:])):
        ap.error(f"--at {a.at}: windows of {a.steps} steps overlap")
    batch_tokens = int(os.environ.get("TRAIN_BATCH_TOKENS", 786432))  # the leader's default

    def done():
        sys.stdout.flush()
        os._exit(0)  # past the windows: skip the rest of training, GPTQ and eval

    register_optimizer_step_post_hook(StepProfiler(windows, a.steps, a.warmup, batch_tokens, done))
    sys.argv = [a.script]
    runpy.run_path(a.script, run_name="__main__")
    sys.exit(f"profile_leader: {a.script} ended before the windows {windows} were profiled (check ITERATIONS, --warmup)")


if __name__ == "__main__":
    main()
