"""Compare the per-step train_loss of two train_gpt.py logs (e.g. N=1 vs N=2 GPUs, same seed):
prints every common step with both losses and their difference, and exits 1 if any of the first
`--steps` common steps differs by more than `--tol` (or there are none).
    python3 tools/compare_runs.py n1.log n2.log [--steps 10] [--tol 0.02]"""
import argparse
import re
import sys

TRAIN_LINE = re.compile(r"^(\d+)/\d+ train_loss: (\S+) ", re.M)


def train_losses(text):
    return {int(m[1]): float(m[2]) for m in TRAIN_LINE.finditer(text)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference")
    ap.add_argument("other")
    ap.add_argument("--steps", type=int, default=10, help="leading common steps held to --tol")
    ap.add_argument("--tol", type=float, default=0.02, help="largest allowed |loss difference|")
    args = ap.parse_args(argv)
    a, b = (train_losses(open(p, encoding="utf-8").read()) for p in (args.reference, args.other))
    common = sorted(set(a) & set(b))
    if not common:
        print("no common train_loss steps")
        return 1
    print(f"{'step':>6} {'reference':>10} {'other':>10} {'diff':>9}")
    for s in common:
        print(f"{s:>6} {a[s]:>10.4f} {b[s]:>10.4f} {b[s] - a[s]:>+9.4f}")
    worst = max(abs(b[s] - a[s]) for s in common[:args.steps])
    ok = worst <= args.tol
    print(f"first {min(args.steps, len(common))} common steps: max |diff| {worst:.4f} "
          f"({'within' if ok else 'OVER'} tol {args.tol}); {len(common)} common steps in all")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
