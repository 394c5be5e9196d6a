"""Tokens/s before and after looping, ours and the leader's, from their proxy logs (one lease, one GPU).

Neither log times the two phases apart, so each phase's seconds come from the `layer_loop:enabled` line:
looping starts when the training fraction reaches ENABLE_LOOPING_AT, and the line prints that fraction
(3 decimals) of the run's training budget. Budgets: ours prints `training budget S` (300 s less its
measured GPTQ reserve); the leader's is 300 s less its GPTQ_RESERVE_SECONDS (0.5, side_by_side.sh's).
The step-500 line of each log (cumulative step_avg / tok/s) checks the looped rate on a second span.
    python3 phases.py [ours.log] [lead.log]"""
import re
import sys

TOKENS = 262144  # the proxy's tokens per step
LEADER_BUDGET_S = 300.0 - 0.5
FLOPS = {"ours": (2.566e8, 3.821e8),  # ours: its log's flops_per_token line
         "leader": (2.597e8, 3.876e8)}  # the leader's at 32K micro-batches: records/speed/2026-12-01b_leader_flops.md
PEAK = 790e12  # the bf16 matmul rate measured on an H200


def find(pattern, text):
    m = re.search(pattern, text, re.M)
    if m is None:
        raise SystemExit(f"no line matches {pattern!r}")
    return m


def phases(name, text):
    loop = find(r"^layer_loop:enabled step:(\d+) frac:([\d.]+)", text)
    first_looped, frac = int(loop[1]), float(loop[2])
    end = find(r"^stopping_early: wallclock_cap train_time: (\d+)ms step: (\d+)", text)
    total_s, steps = int(end[1]) / 1000, int(end[2])
    if name == "ours":
        budget = float(find(r"training budget ([\d.]+)s", text)[1])
        s500 = 500 * float(find(r"^500/\d+ train_loss: \S+ train_time: \S+ step_avg: ([\d.]+)ms", text)[1]) / 1000
    else:
        budget = LEADER_BUDGET_S
        s500 = 500 * TOKENS / float(find(r"^500/\d+ train_loss: \S+ train_time: \S+ tok/s: (\d+)", text)[1])
    flat_s = frac * budget
    spans = {"no loop": (first_looped - 1, flat_s), "looped": (steps - first_looped + 1, total_s - flat_s),
             "looped, step 500 to the end": (steps - 500, total_s - s500), "whole run": (steps, total_s)}
    return spans


def main():
    ours_path, lead_path = (sys.argv[1:] + ["ours.log", "lead.log"][len(sys.argv) - 1:])[:2]
    runs = {"ours": phases("ours", open(ours_path).read()), "leader": phases("leader", open(lead_path).read())}
    print(f"{'span':30} {'who':7} {'steps':>6} {'seconds':>8} {'ms/step':>8} {'tok/s':>9} {'MFU':>6}")
    for span in runs["ours"]:
        rate = {}
        for who, spans in runs.items():
            steps, secs = spans[span]
            rate[who] = steps * TOKENS / secs
            flops = FLOPS[who][span != "no loop"] if span != "whole run" else None
            mfu = f"{100 * rate[who] * flops / PEAK:5.1f}%" if flops else "     -"
            print(f"{span:30} {who:7} {steps:6d} {secs:8.2f} {1000 * secs / steps:8.2f} {rate[who]:9.0f} {mfu}")
        print(f"{'':30} ours / leader tok/s: {rate['ours'] / rate['leader']:.4f}")


if __name__ == "__main__":
    main()
