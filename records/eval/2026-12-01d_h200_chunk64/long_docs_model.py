"""What TTT on every document (TTT_MAX_DOC_TOKENS past the longest, 97,114, or TTT_TAIL_CHUNK_SIZE) would cost
on the FineWeb-shaped rank: TTT seconds as a*row_tokens + b*chunk_steps (+ global SGD), fitted to fw64n's `ttp:` lines (this
lease's host, chunk 64), then evaluated on the plan with no length limit. An analysis of logged times, not
a measurement: python3 long_docs_model.py (from anywhere; CPU)."""
import os
import sys

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
import eval_workload as ew  # noqa: E402
import train_gpt as tg  # noqa: E402

L = np.asarray(ew.target_lengths(6250))
SPANS = [(0, int(n)) for n in L]
# fw64n: batch -> cumulative TTT seconds (global SGD phases ran after batches 2, 4 and 5: 6.8 + 9.0 + 11.0 s)
OBS = {1: 39.0, 11: 152.1, 21: 186.4, 31: 203.5, 41: 214.4, 51: 221.4, 61: 225.5, 71: 228.2, 81: 229.9, 91: 231.0,
       98: 231.7}
SGD = 6.8 + 9.0 + 11.0


def plan(**kw):
    h = tg.Hyperparameters(ttt_long_chunk_size=64, **kw)
    h.validate()
    p = tg.ttt_plan(SPANS, h, 0, 1)
    work = np.array([tg.ttt_batch_work(b, *h.ttt_chunking) for b in p.batches])
    steps = np.array([max(tg.ttt_n_chunks(n, *h.ttt_chunking) for _, n in b) for b in p.batches])
    return p, work, steps


p, work, steps = plan()
cw, cs = np.cumsum(work), np.cumsum(steps)
A = np.array([[cw[b - 1], cs[b - 1]] for b in OBS])
y = np.array([t - (SGD if b >= 5 else 0) for b, t in OBS.items()])
a, b = np.linalg.lstsq(A, y, rcond=None)[0]
print(f"fit to fw64n: {a * 1e6:.3f} us per row token, {b * 1e3:.2f} ms per chunk step")
for k, t in OBS.items():
    print(f"  batch {k}: logged {t} s, fitted {a * cw[k - 1] + b * cs[k - 1] + (SGD if k >= 5 else 0):.1f} s")
base = a * work.sum() + b * steps.sum()
print(f"default (max doc 16384): {len(p.leftover)} documents, {sum(n for _, n in p.leftover):,} tokens left to windows; "
      f"TTT without global SGD {base:.1f} s")
for kw in (dict(ttt_max_doc_tokens=32768), dict(ttt_max_doc_tokens=10 ** 6), dict(ttt_tail_chunk_size=128),
           dict(ttt_tail_chunk_size=256), dict(ttt_tail_chunk_size=512)):
    p2, w2, s2 = plan(**kw)
    t = a * w2.sum() + b * s2.sum()
    prefix = [n for _, n in p2.docs[:312]]
    old_prefix = [n for _, n in p.docs[:312]]
    print(f"{kw}: {len(p2.leftover)} documents left to windows; TTT without global SGD {t:.1f} s "
          f"({t - base:+.1f} s); first batch {s2[0]} chunk steps (was {steps[0]}); the 312-document SGD prefix "
          f"{sum(prefix):,} tokens (was {sum(old_prefix):,})")
