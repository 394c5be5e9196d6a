"""Compare the per-step train_loss of two train_gpt.py logs (e.g. N=1 vs N=2 GPUs, same seed):
prints every common step with both losses and their difference, and exits 1 if the two logs do
not hold the same steps (a run that stopped early), if there are fewer than `--steps`, or if any
of the first `--steps` differs by more than `--tol`.
    python3 tools/compare_runs.py n1.log n2.log [--steps 10] [--tol 0.02]"""
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
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    a, b = (parse_train_log_file(p)["train_losses"] for p in (args.reference, args.other))
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
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
