"""How much order-0 entropy per-column or per-row frequency tables would save on an artifact's GPTQ codes: each
2-D code array (>= RANS_MIN_VALUES values) split into 8 classes of columns (or rows) by the spread of their codes,
one table per class; table and class-id costs not counted. python3 code_entropy.py ARTIFACT (CPU)."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import train_gpt as tg  # noqa: E402


def entropy_bytes(counts):
    c = counts[counts > 0]
    return -(c * np.log2(c / c.sum())).sum() / 8


def class_entropy(x, axis, k=8):
    spread = x.std(axis=axis)
    cls = np.digitize(spread, np.quantile(spread, np.linspace(0, 1, k + 1)[1:-1]))
    return sum(entropy_bytes(np.bincount((x[:, cls == c] if axis == 0 else x[cls == c]).ravel() + 128, minlength=256))
               for c in range(k))


with open(sys.argv[1], "rb") as f:
    q = tg.unpack_artifact(f.read())
total = np.zeros(3)
for name, e in q.items():
    if e.kind == "fp16" or e.data.numel() < tg.RANS_MIN_VALUES or e.data.dim() != 2:
        continue
    x = e.data.numpy().astype(np.int64)
    h = np.array([entropy_bytes(np.bincount(x.ravel() + 128, minlength=256)), class_entropy(x, 0), class_entropy(x, 1)])
    total += h
    print(f"{name:32s} {e.kind}{e.bits} {tuple(x.shape)} order-0 {h[0]:.0f} bytes, column classes {h[1] / h[0] - 1:+.4f}, "
          f"row classes {h[2] / h[0] - 1:+.4f}")
print(f"all: order-0 {total[0]:.0f} bytes, column classes {total[1]:.0f} ({total[1] / total[0] - 1:+.4f}), "
      f"row classes {total[2]:.0f} ({total[2] / total[0] - 1:+.4f})")
