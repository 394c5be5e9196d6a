"""Compare the per-step train_loss of two train_gpt.py logs (e.g. N=1 vs N=2 GPUs, same seed):
prints every common step with both losses and their difference, and exits 1 if the two logs do
not hold the same steps (a run that stopped early), if there are fewer than `--steps`, or if any
of the first `--steps` differs by more than `--tol`. --phases A-B,C-D also prints each run's ms per
step over those steps (from the logs' cumulative step_avg), and the other's change, e.g. 6-25,29-50
for a same-seed A/B looping from step 26.
    python3 tools/compare_runs.py n1.log n2.log [--steps 10] [--tol 0.02] [--phases 6-25,29-50]"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_log import parse_train_log_file  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference")
    ap.add_argument("other")
    ap.add_argument("--steps", type=int, default=10, help="leading common steps held to --tol")
    ap.add_argument("--tol", type=float, default=0.02, help="largest allowed |loss difference|")
    ap.add_argument("--phases", default="", help="step ranges A-B,C-D: ms/step of each run over them")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    try:
        phases = [tuple(int(x) for x in r.split("-")) for r in args.phases.split(",")] if args.phases else []
        assert all(len(r) == 2 and 1 <= r[0] <= r[1] for r in phases)
    except (ValueError, AssertionError):
        ap.error(f"--phases {args.phases!r}: expected step ranges like 6-25,29-50")
    logs = [parse_train_log_file(p) for p in (args.reference, args.other)]
    a, b = (log["train_losses"] for log in logs)
    common = sorted(set(a) & set(b))
    if set(a) != set(b) or len(common) < args.steps:
        print(f"the logs differ in steps: {len(a)} and {len(b)} train_loss lines, {len(common)} in common "
              f"(need the same steps, at least {args.steps}): did a run stop early?")
        return 1
    print(f"{'step':>6} {'reference':>10} {'other':>10} {'diff':>9}")
    for s in common:
        print(f"{s:>6} {a[s]:>10.4f} {b[s]:>10.4f} {b[s] - a[s]:>+9.4f}")
    worst = max(abs(b[s] - a[s]) for s in common[:args.steps])
    ok = worst <= args.tol
    print(f"first {args.steps} steps: max |diff| {worst:.4f} "
          f"({'within' if ok else 'OVER'} tol {args.tol}); {len(common)} steps in all")
    for first, last in phases:
        ms = [phase_ms(log["train_points"], first, last) for log in logs]
        if None in ms:
            print(f"steps {first}-{last}: the logs lack step_avg at step {first - 1} or {last}")
            return 1
        print(f"steps {first}-{last}: ms/step {ms[0]:.1f} vs {ms[1]:.1f} ({100 * (ms[1] / ms[0] - 1):+.1f}%)")
    return 0 if ok else 1


def phase_ms(points, first, last):
    """Mean ms of steps first..last from the cumulative step_avg at first-1 (0 before step 1) and last."""
    avg = {s: p.get("step_avg_ms") for s, p in points.items()}
    before = 0.0 if first == 1 else avg.get(first - 1)
    if before is None or avg.get(last) is None:
        return None
    return (last * avg[last] - (first - 1) * before) / (last - first + 1)


if __name__ == "__main__":
    sys.exit(main())
