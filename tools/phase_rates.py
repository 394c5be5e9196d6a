"""Tokens/s before and after looping, ours against the leader's, from two wallclock-capped training logs
(issue 10's side by side; one GPU each, or one after the other in one lease).

Neither script times its two phases apart, so each phase's seconds come from the `layer_loop:enabled`
line: looping starts when the training fraction reaches ENABLE_LOOPING_AT, and the line prints that
fraction (3 decimals: about 0.15 s of a 300 s budget) at the first looped step. Times the run's training
budget: ours logs it (`training budget S`: the cap less its measured GPTQ reserve); the leader's is
--seconds less its GPTQ_RESERVE_SECONDS (--leader-reserve). The end is each log's `stopping_early` line.
A second looped span, from --check-step (a step both logs print) to the end, checks the looped rate.
MFU: FLOPs per token (ours from its log; the leader's given, as records/speed/2026-12-01b_leader_flops.md
counts them) against --peak.
    python3 tools/phase_rates.py OURS_LOG LEADER_LOG [--tokens 262144] [--seconds 300]
        [--leader-reserve 0.5] [--leader-flops 2.597e8,3.876e8] [--check-step 500] [--peak 790e12]"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_log import parse_train_log_file  # noqa: E402


def spans(run, budget_s, tokens, check_step):
    """{span: (steps, seconds)} of one parsed log; raises ValueError naming what the log lacks."""
    for key in ("layer_loop_step", "layer_loop_frac", "stop_train_ms", "stop_step"):
        if run.get(key) is None:
            raise ValueError(f"no {key} (a wallclock-capped run that looped and stopped early)")
    first_looped, total_s, steps = run["layer_loop_step"], run["stop_train_ms"] / 1000, run["stop_step"]
    flat_s = run["layer_loop_frac"] * budget_s
    out = {"no loop": (first_looped - 1, flat_s), "looped": (steps - first_looped + 1, total_s - flat_s)}
    point = run["train_points"].get(check_step, {})
    if check_step > first_looped and ("step_avg_ms" in point or "tok_s" in point):
        # ours logs the cumulative step_avg; the leader only the cumulative tok/s
        at_s = (check_step * point["step_avg_ms"] / 1000 if "step_avg_ms" in point
                else check_step * tokens / point["tok_s"])
        out[f"looped, step {check_step} to the end"] = (steps - check_step, total_s - at_s)
    out["whole run"] = (steps, total_s)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ours")
    ap.add_argument("leader")
    ap.add_argument("--tokens", type=int, default=262144, help="tokens per step (both runs)")
    ap.add_argument("--seconds", type=float, default=300.0, help="the leader's MAX_WALLCLOCK_SECONDS")
    ap.add_argument("--leader-reserve", type=float, default=0.5, help="the leader's GPTQ_RESERVE_SECONDS")
    ap.add_argument("--leader-flops", default="2.597e8,3.876e8", help="the leader's FLOPs/token, no loop,looped")
    ap.add_argument("--check-step", type=int, default=500)
    ap.add_argument("--peak", type=float, default=790e12, help="FLOP/s of one GPU (bf16 matmul, H200)")
    args = ap.parse_args(argv)
    try:
        leader_flops = tuple(float(x) for x in args.leader_flops.split(","))
        assert len(leader_flops) == 2
    except (ValueError, AssertionError):
        ap.error(f"--leader-flops {args.leader_flops!r}: expected two numbers, no loop,looped")
    ours, leader = parse_train_log_file(args.ours), parse_train_log_file(args.leader)
    budgets = {"ours": ours["train_budget_s"] or args.seconds, "leader": args.seconds - args.leader_reserve}
    flops = {"ours": ours["flops_per_token"], "leader": leader_flops}
    runs = {}
    for who, run in (("ours", ours), ("leader", leader)):
        try:
            runs[who] = spans(run, budgets[who], args.tokens, args.check_step)
        except ValueError as e:
            ap.error(f"{who} ({getattr(args, who)}): {e}")
    print(f"budgets: ours {budgets['ours']:.3f} s, leader {budgets['leader']:.3f} s; {args.tokens} tokens a step")
    print(f"{'span':30} {'who':7} {'steps':>6} {'seconds':>8} {'ms/step':>8} {'tok/s':>9} {'MFU':>6}")
    for span in runs["ours"]:
        if span not in runs["leader"]:
            continue
        rate = {}
        for who in runs:
            steps, secs = runs[who][span]
            rate[who] = steps * args.tokens / secs
            f = flops[who] and flops[who][span != "no loop"] if span != "whole run" else None
            mfu = f"{100 * rate[who] * f / args.peak:5.1f}%" if f else "     -"
            print(f"{span:30} {who:7} {steps:6d} {secs:8.2f} {1000 * secs / steps:8.2f} {rate[who]:9.0f} {mfu}")
        print(f"{'':30} ours / leader tok/s: {rate['ours'] / rate['leader']:.4f}")


if __name__ == "__main__":
    main()
