"""Phased TTT's seconds on the FineWeb-shaped rank as a*row_tokens + b*chunk_steps (+ global SGD at a fitted
rate per stream token), fitted to the eleventh session's fw run (`../2026-12-01g_h200_lora_lr/fw.log`: long chunk 64,
GLOBAL_TTT_DOC_TOKENS=8192), then evaluated on other settings' plans. An analysis of logged times, not a
measurement: python3 ttt_time_model.py (from anywhere; CPU). The settings that moved after this fit are pinned
here (FITTED); the others (chunk 48, TTT_MAX_DOC_TOKENS 16384, tail 256, batch 64, window 2048) are read from
the defaults of 2026-12-01h."""
import os
import sys

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
import eval_workload as ew  # noqa: E402
import train_gpt as tg  # noqa: E402

SPANS = [(0, int(n)) for n in ew.target_lengths(6250)]
FITTED = dict(ttt_long_chunk_size=64, global_ttt_doc_tokens=8192, phased_ttt_prefix_docs=312)
# fw: batch -> cumulative TTT seconds; global SGD phases ran after batches 2, 4 and 5 (6.7 + 9.0 + 11.2 s)
OBS = {1: 60.8, 11: 181.8, 21: 216.9, 31: 234.9, 41: 245.9, 51: 253.0, 61: 257.2, 71: 259.9, 81: 261.6, 91: 262.8,
       98: 263.5}
SGD = 6.7 + 9.0 + 11.2


def plan(**kw):
    h = tg.Hyperparameters(**{**FITTED, **kw})
    h.validate()
    p = tg.ttt_plan(SPANS, h, 0, 1)
    work = np.array([tg.ttt_batch_work(b, *h.ttt_chunking) for b in p.batches])
    steps = np.array([max(tg.ttt_n_chunks(n, *h.ttt_chunking) for _, n in b) for b in p.batches])
    cut = h.global_ttt_doc_tokens
    sgd_tokens = sum(min(n, cut or n) for bound in p.boundaries for _, n in p.docs[:bound])
    return work, steps, sgd_tokens


work, steps, sgd_tokens = plan()
cw, cs = np.cumsum(work), np.cumsum(steps)
A = np.array([[cw[k - 1], cs[k - 1]] for k in OBS])
y = np.array([t - (SGD if k >= 5 else 0) for k, t in OBS.items()])
a, b = np.linalg.lstsq(A, y, rcond=None)[0]
sgd_s = SGD / sgd_tokens
print(f"fit to fw: {a * 1e6:.3f} us per row token, {b * 1e3:.2f} ms per chunk step, global SGD {sgd_s * 1e6:.3f} us "
      f"per stream token ({sgd_tokens:,} tokens in three phases)")
for k, t in OBS.items():
    print(f"  batch {k}: logged {t} s, fitted {a * cw[k - 1] + b * cs[k - 1] + (SGD if k >= 5 else 0):.1f} s")
base = a * work.sum() + b * steps.sum()
print(f"fitted settings: TTT batches {base:.1f} s + global SGD {SGD:.1f} s")
for kw in (dict(ttt_long_chunk_size=80), dict(ttt_long_chunk_size=96), dict(ttt_chunk_size=64),
           dict(ttt_tail_chunk_size=512), dict(ttt_max_doc_tokens=8192), dict(ttt_batch_size=96),
           dict(global_ttt_doc_tokens=4096), dict(ttt_long_chunk_size=80, global_ttt_doc_tokens=4096)):
    w2, s2, g2 = plan(**kw)
    t, g = a * w2.sum() + b * s2.sum(), sgd_s * g2
    print(f"{kw}: TTT batches {t:.1f} s ({t - base:+.1f}), global SGD {g:.1f} s ({g - SGD:+.1f}), "
          f"TTT in all {t + g:.1f} s ({t + g - base - SGD:+.1f})")
