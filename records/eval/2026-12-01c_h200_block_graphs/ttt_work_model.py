"""TTT seconds on the FineWeb-shaped rank as a*row_tokens + b*chunk_steps (+ global SGD), fitted per run
to the `ttp:` lines of fwA3 (sixth session), fw64 and fwg (this session), over ttt_plan's batches of the
workload's document lengths (tools/eval_workload.py target_lengths), then used to predict other knobs.
An analysis of logged times, not a measurement: python3 ttt_work_model.py (from anywhere; CPU)."""
import sys, numpy as np
import os
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
sys.path.insert(0, ROOT); sys.path.insert(0, os.path.join(ROOT, "tools"))
import train_gpt as tg, eval_workload as ew
L = np.asarray(ew.target_lengths(6250))
spans = [(0, int(n)) for n in L]  # (start, n): n tokens incl BOS -> targets n-1? use n as document_spans n
# The seventh session's defaults: chunk 48 past the window too (TTT_LONG_CHUNK_SIZE=64 became the default after)
H0 = dict(ttt_long_chunk_size=0)
h = tg.Hyperparameters(**H0); h.validate()
print("defaults: chunk", h.ttt_chunk_size, "W", h.ttt_eval_seq_len, "long", h.ttt_long_chunk, "maxdoc", h.ttt_max_doc_tokens,
      "batch", h.ttt_batch_size, "grow", h.ttt_batch_grow)
def plan(h):
    p = tg.ttt_plan(spans, h, 0, 1)
    C, W, C2 = h.ttt_chunk_size, h.ttt_eval_seq_len, h.ttt_long_chunk
    work = [tg.ttt_batch_work(b, C, W, C2) for b in p.batches]
    steps = [max(tg.ttt_n_chunks(n, C, W, C2) for _, n in b) for b in p.batches]
    return p, np.array(work), np.array(steps)
p, work, steps = plan(h)
print("batches", len(p.batches), "leftover docs", len(p.leftover), "leftover tokens", sum(n for _, n in p.leftover))
# fwg cumulative times at batch ends (TTT time incl. global SGD phases at batches ~1..5)
obs = {1: 51.9, 11: 179.2, 21: 215.3, 31: 233.8, 41: 246.2, 51: 253.5, 61: 257.7, 71: 260.5, 81: 262.2, 91: 263.4, 98: 264.1}
sgd = 27.0
cw, cs = np.cumsum(work), np.cumsum(steps)
# fit t = a*work + b*steps (+ sgd for batches >= 3 phases done by b5)
A, y = [], []
for b, t in obs.items():
    A.append([cw[b-1], cs[b-1]]); y.append(t - (sgd if b >= 5 else 0))
a, bcoef = np.linalg.lstsq(np.array(A), np.array(y), rcond=None)[0]
print(f"fit: {a*1e6:.3f} us per row token, {bcoef*1e3:.2f} ms per chunk step")
for b, t in obs.items():
    print(b, t, round(a*cw[b-1] + bcoef*cs[b-1] + (sgd if b >= 5 else 0), 1))
def predict(**kw):
    hh = tg.Hyperparameters(**{**H0, **kw}); hh.validate()
    p2, w2, s2 = plan(hh)
    left = sum(n for _, n in p2.leftover)
    return a*w2.sum() + bcoef*s2.sum() + sgd, len(p2.leftover), left
base = predict()
print("default predicted TTT", round(base[0], 1))
for kw in [dict(ttt_long_chunk_size=64), dict(ttt_max_doc_tokens=12288), dict(ttt_max_doc_tokens=8192),
           dict(ttt_max_doc_tokens=12288, ttt_long_chunk_size=64)]:
    t, nl, lt = predict(**kw)
    print(kw, "TTT", round(t, 1), "delta", round(t - base[0], 1), "leftover docs", nl, "tokens", lt)

def fit(obs, sgd, **kw):
    hh = tg.Hyperparameters(**{**H0, **kw}); hh.validate()
    p2, w2, s2 = plan(hh)
    cw, cs = np.cumsum(w2), np.cumsum(s2)
    A = [[cw[b-1], cs[b-1]] for b in obs]; y = [t - (sgd if b >= 5 else 0) for b, t in obs.items()]
    co, res = np.linalg.lstsq(np.array(A), np.array(y), rcond=None)[:2]
    return co
fw64 = {1: 40.1, 11: 154.2, 21: 189.9, 31: 208.4, 41: 220.6, 51: 228.1, 61: 232.2, 71: 234.9, 81: 236.6, 91: 237.7, 98: 238.3}
fwA3 = {1: 47.9, 11: 169.0, 21: 202.4, 31: 219.1, 41: 230.2, 51: 236.7, 61: 240.7, 71: 243.3, 81: 245.0, 91: 246.1, 98: 246.6}
for name, obs, sg, kw in (("fwA3 (48)", fwA3, 26.8, {}), ("fw64 (64)", fw64, 27.2, dict(ttt_long_chunk_size=64)), ("fwg (48)", obs, 27.0, {})):
    co = fit(obs, sg, **kw)
    for k2 in ({}, dict(ttt_long_chunk_size=64)):
        hh = tg.Hyperparameters(**{**H0, **k2}); hh.validate(); p2, w2, s2 = plan(hh)
        print(name, f"{co[0]*1e6:.3f} us/row token {co[1]*1e3:.2f} ms/step", "predicts", k2 or "chunk 48", round(co[0]*w2.sum() + co[1]*s2.sum() + sg, 1))
