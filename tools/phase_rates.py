"""Tokens/s before and after looping, ours against the leader's, from two wallclock-capped training logs
(issue 10: the two scripts on one GPU each, or one after the other in one lease).

Neither script times its two phases apart, so each phase's seconds come from the `layer_loop:enabled
step:N frac:F` line. Both scripts print it before their step N+1 runs: N steps ran without the loop, and
F (3 decimals: about 0.15 s of a 300 s budget) is the training fraction after them. F times the run's
training budget, as each logs it, gives the no-loop seconds: ours `gptq:reserving ..., training budget S`
(the cap less its measured GPTQ reserve); the leader's `gptq:reserving ..., effective=Mms`. The end is
each log's `stopping_early` line. A second looped span, from --check-step (a step both logs print) to
the end, checks the looped rate. The leader reads its clock at the loop line and at its step lines
without a GPU sync (ours syncs every step), so its spans may hold the CPU's lead over the GPU.
MFU: FLOPs per token (ours from its log; the leader's given, as records/speed/2026-12-01b_leader_flops.md
counts them) against --peak. --tokens is checked against each log's train_batch_tokens (ours lists it only
when it differs from train_gpt.py's default, which then applies).
    python3 tools/phase_rates.py OURS_LOG LEADER_LOG [--tokens 262144] [--leader-flops 2.597e8,3.876e8]
        [--check-step 500] [--peak 790e12]"""
import argparse
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_log import parse_train_log  # noqa: E402

LEADER_BUDGET = re.compile(r"^gptq:reserving \S+, effective=(\d+)ms", re.M)
BATCH_TOKENS = re.compile(r"train_batch_tokens(?:=|: )(\d+)")  # our non-default settings line; the leader's listing
OUR_DEFAULT = re.compile(r"^    train_batch_tokens: int = (\d+)", re.M)  # in train_gpt.py's Hyperparameters


def spans(run, budget_s, tokens, check_step):
    """{span: (steps, seconds)} of one parsed log, and a note when the check span is left out; raises
    ValueError naming what the log lacks."""
    for key in ("layer_loop_step", "layer_loop_frac", "stop_train_ms", "stop_step"):
        if run.get(key) is None:
            raise ValueError(f"no {key} (a wallclock-capped run that looped and stopped early)")
    unlooped, total_s, steps = run["layer_loop_step"], run["stop_train_ms"] / 1000, run["stop_step"]
    flat_s = run["layer_loop_frac"] * budget_s
    out = {"no loop": (unlooped, flat_s), "looped": (steps - unlooped, total_s - flat_s)}
    point, note = run["train_points"].get(check_step, {}), None
    if check_step >= unlooped and ("step_avg_ms" in point or "tok_s" in point):
        # ours logs the cumulative step_avg; the leader only the cumulative tok/s
        at_s = (check_step * point["step_avg_ms"] / 1000 if "step_avg_ms" in point
                else check_step * tokens / point["tok_s"])
        out[f"looped, step {check_step} to the end"] = (steps - check_step, total_s - at_s)
    else:
        note = f"no looped check span: step {check_step} is not logged at or after the loop's start"
    out["whole run"] = (steps, total_s)
    return out, note


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ours")
    ap.add_argument("leader")
    ap.add_argument("--tokens", type=int, default=262144, help="tokens per step (both runs; checked where a log says)")
    ap.add_argument("--leader-flops", default="2.597e8,3.876e8", help="the leader's FLOPs/token, no loop,looped")
    ap.add_argument("--check-step", type=int, default=500)
    ap.add_argument("--peak", type=float, default=790e12, help="FLOP/s of one GPU (bf16 matmul, H200)")
    args = ap.parse_args(argv)
    try:
        leader_flops = tuple(float(x) for x in args.leader_flops.split(","))
        assert len(leader_flops) == 2
    except (ValueError, AssertionError):
        ap.error(f"--leader-flops {args.leader_flops!r}: expected two numbers, no loop,looped")
    texts = {who: Path(getattr(args, who)).read_text() for who in ("ours", "leader")}
    ours, leader = parse_train_log(texts["ours"]), parse_train_log(texts["leader"])
    budget = LEADER_BUDGET.search(texts["leader"])
    budgets = {"ours": ours["train_budget_s"], "leader": budget and int(budget[1]) / 1000}
    flops = {"ours": ours["flops_per_token"], "leader": leader_flops}
    runs = {}
    for who, run in (("ours", ours), ("leader", leader)):
        if budgets[who] is None:
            ap.error(f"{who} ({getattr(args, who)}): no training budget line (gptq:reserving)")
        stated = BATCH_TOKENS.search(texts[who])
        if stated is None and who == "ours":  # our settings line lists only what differs from the defaults
            stated = OUR_DEFAULT.search((Path(__file__).resolve().parents[1] / "train_gpt.py").read_text())
        if stated is None:
            print(f"note: {who}'s log does not state train_batch_tokens; --tokens {args.tokens} taken as given")
        elif int(stated[1]) != args.tokens:
            ap.error(f"{who} ({getattr(args, who)}): train_batch_tokens {stated[1]}, not --tokens {args.tokens}")
        try:
            runs[who], note = spans(run, budgets[who], args.tokens, args.check_step)
        except ValueError as e:
            ap.error(f"{who} ({getattr(args, who)}): {e}")
        if note:
            print(f"note: {who}: {note}")
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
