"""Legality of train_gpt.py's evaluation on the CPU (SDPA, fp32): sliding-window eval (eval_val,
eval_windows, scoring_windows, build_row) and phased TTT (phased_ttt, ttt_batch, global_sgd,
LoRABank).

1. causality: a target's score depends only on its own prefix (and, under TTT, on documents
   scored before it), never on later tokens;
2. score before update: TTT scores chunk k of a document before any adapter step sees it;
3. single pass: every val target is scored exactly once (positions recorded, not only counted);
4. normalisation: the score is -log of a distribution over the full vocabulary.

Per-target scores are recorded by instrumentation (Recorder): build_row + model.token_losses
for the window paths, F.cross_entropy inside ttt_batch for TTT (target positions from the chunk
arithmetic, checked against the targets the code used and against its (loss, count, bytes)
sums). Every legality test also runs on a deliberately broken variant and must fail there."""
import contextlib
import dataclasses
import inspect
import math
import sys
import time
from collections import Counter, defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from helpers_train import make_model, tiny_h

# The real functions, captured before any test patches them.
REAL = SimpleNamespace(ttt_batch=tg.ttt_batch, build_row=tg.build_row, eval_windows=tg.eval_windows,
                       scoring_windows=tg.scoring_windows, document_spans=tg.document_spans,
                       global_sgd=tg.global_sgd, attention=tg._attention_sdpa, embed=tg.GPT.embed,
                       cross_entropy=F.cross_entropy)

V = 64
# The tests' tiny model (helpers_train.TINY) cut to 4 layers: local windows 8 (layers 0, 1) and 16
# (layer 3), a global layer 2, XSA everywhere, a Parcae loop over layers 1..2 (6 virtual slots),
# layer 3 parallel (decoder half), skips, gates.
CFG = dict(
    vocab_size=V, num_layers=4, model_dim=48, global_attn_layers=(2,), local_window_split=2, xsa_last_n=4,
    parallel_start_layer=3, num_loops=1, lqer_group=16, run_id="legality",
    eval_seq_len=32, eval_stride=8, val_batch_tokens=128,
    ttt_batch_size=3, ttt_chunk_size=4, ttt_eval_seq_len=16, ttt_lora_rank=2, ttt_max_doc_tokens=40,
    ttt_long_chunk_size=0,  # TTT_CHUNK_SIZE past the window too (the default, 64, exceeds this window)
    ttt_tail_chunk_size=0,  # longer documents to the windows (the default, 256, exceeds this window)
    phased_ttt_prefix_docs=4, phased_ttt_num_phases=2, global_ttt_chunk_tokens=32, global_ttt_seq_len=16,
    # Global SGD chunks of 32 tokens: the cosine LR is exactly 0 on a phase's last chunk, and with
    # 64 the documents a broken phase appends (sgd_on_next_batch) all fell into it, unseen.
    # large enough that every TTT effect is far above float noise
    ttt_lora_lr=0.01, global_ttt_lr=0.05,
)
# Document lengths in stream order (tokens incl. BOS = targets, incl. the next BOS; the last
# document has one target less). Over EVAL_SEQ_LEN=32: 45, 70, 33; over TTT_MAX_DOC_TOKENS=40
# (sliding windows in phased TTT): 45, 70; over TTT_EVAL_SEQ_LEN=16: 30, 40, 20, 25, 37, 33.
LENGTHS = (12, 45, 30, 3, 1, 40, 20, 70, 9, 25, 16, 37, 33, 6)
# SLIDING_MODE=attention's tests: pieces of 2 x 16 tokens (run_eval), so the 45- and 70-token documents
# come in several, each after EVAL_SEQ_LEN of context
ATTENTION_CFG = dict(eval_seq_len=16)
TOL = 1e-6  # "unchanged" (the runs are deterministic; broken variants move scores by >> 1e-3)


@pytest.fixture(autouse=True)
def _cpu_env():
    tg.use_attention_backend("sdpa", torch.device("cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic, and much faster for these tiny shapes
    yield
    torch.set_num_threads(threads)


def make_h(tmp_path, **overrides):
    return tiny_h(**{**CFG, "log_dir": str(tmp_path / "logs"), **overrides})


def luts(seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(1, 5, V).astype(np.int64)
    base[:4] = 0
    is_boundary = np.zeros(V, dtype=bool)
    is_boundary[:4] = True
    return base, rng.random(V) < 0.5, is_boundary


def make_val(lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    tokens = np.concatenate([np.r_[tg.BOS_ID, rng.integers(4, V, n - 1)] for n in lengths]).astype(np.uint16)
    return tg.ValSet(tokens, tg.stream_target_bytes(tokens, luts()))


def valset(tokens):
    return tg.ValSet(tokens, tg.stream_target_bytes(tokens, luts()))


def perturbed(val, positions):
    tokens = val.tokens.copy()
    for u in positions:
        assert tokens[u] != tg.BOS_ID
        tokens[u] = (int(tokens[u]) - 4 + 17) % (V - 4) + 4  # another non-special token
    return valset(tokens)


def doc_start(val, length):
    """Stream start of the (unique) document with `length` tokens."""
    spans = REAL.document_spans(val.tokens)
    (s,) = [s for s, n in spans if n == length or (s + n == len(val.tokens) - 1 and n == length - 1)]
    return s


def doc_index(val):
    """Target position j -> (start, n_targets) of its document."""
    return {j: (s, n) for s, n in REAL.document_spans(val.tokens) for j in range(s + 1, s + n + 1)}


# ---------------------------------------------------------------------------------------
# Instrumentation
# ---------------------------------------------------------------------------------------


def chunk_spans(h, n):
    """TTT's chunks of a document of n targets, as (c0, c1]: TTT_CHUNK_SIZE targets while a chunk
    starts inside the first TTT_EVAL_SEQ_LEN, TTT_LONG_CHUNK_SIZE (0: the same) after, and
    TTT_TAIL_CHUNK_SIZE (0: none) once one starts at or past TTT_MAX_DOC_TOKENS."""
    spans, start = [], 0
    while start < n:
        size = h.ttt_chunk_size if start < h.ttt_eval_seq_len else h.ttt_long_chunk_size or h.ttt_chunk_size
        if start >= h.ttt_eval_seq_len and h.ttt_tail_chunk_size and start >= h.ttt_max_doc_tokens:
            size = h.ttt_tail_chunk_size
        spans.append((start, start + size))
        start += size
    return spans


class Recorder:
    """Records every scored target (stream position j: the prediction of tokens[j]) with its
    loss and path ('eval' window rows or 'ttt' chunks). ttt_variant(inner) -> ttt_batch wraps the
    recorded ttt_batch (broken variants); build_row replaces the real row builder (recorded)."""

    def __init__(self, monkeypatch, model, val, h, ttt_variant=None, build_row=None, ce_variant=None):
        self.val, self.h = val, h
        self.log = []  # (j, loss, source)
        self.logits = {}  # j -> the logits row its score was computed from
        self.ttt_batches, self.eval_rows, self.ttt_rows = [], [], []
        self._pending, self._ttt, self._eval = [], None, None
        base_row = build_row or REAL.build_row
        base_losses, base_hidden = type(model).token_losses.__get__(model), type(model).hidden.__get__(model)
        ce = ce_variant or REAL.cross_entropy

        def rec_build_row(val_, row, row_tokens):
            out = base_row(val_, row, row_tokens)
            self._pending.append((list(row), out))
            return out

        def rec_token_losses(ids, targets, cu, max_seqlen):
            self._eval = {}
            try:
                out = base_losses(ids, targets, cu, max_seqlen)
            finally:
                ctx, self._eval = self._eval, None
            row, (x, y, b, cu_np) = self._pending.pop()
            assert not self._pending and np.array_equal(targets.view(-1).numpy(), y)
            assert ctx["logits"].shape == (len(y), h.vocab_size), "eval CE is not over the full vocabulary"
            self.eval_rows.append((list(row), x.copy(), cu_np.copy()))
            self._record_row(row, y, out.detach().view(-1), ctx["logits"])
            return out

        def rec_hidden(ids, cu, max_seqlen, lora=None, looping=True):
            if self._ttt is not None:
                self.ttt_rows.append((ids.detach().clone(), cu.clone()))
            return base_hidden(ids, cu, max_seqlen, lora, looping)

        def rec_eval_windows(model_, h_, rt, val_, windows, split_ranks=True):
            n0 = len(self.log)
            sums = REAL.eval_windows(model_, h_, rt, val_, windows, split_ranks)
            self._check_sums(n0, sums, "eval_windows")
            return sums

        def rec_ttt(model_, batch, val_, bank, opt, h_, sums, graphs=None):
            n0 = len(self.log)
            self._ttt = {"batch": list(batch), "ci": 0}
            local = torch.zeros_like(sums)
            try:
                REAL.ttt_batch(model_, batch, val_, bank, opt, h_, local, graphs)
            finally:
                ctx, self._ttt = self._ttt, None
            assert ctx["ci"] == len(chunk_spans(h_, max(n for _, n in batch))), "one scoring CE per chunk expected"
            self._check_sums(n0, local, "ttt_batch")
            self.ttt_batches.append(list(batch))
            sums += local

        def rec_ce(input, target, *args, **kwargs):
            if self._ttt is not None:
                out = ce(input, target, *args, **kwargs)
                self._record_chunk(input.detach(), target, out.detach())
                return out
            if self._eval is not None:
                assert "logits" not in self._eval, "one CE per eval row expected"
                self._eval["logits"] = input.detach()
            return REAL.cross_entropy(input, target, *args, **kwargs)

        monkeypatch.setattr(tg, "build_row", rec_build_row)
        monkeypatch.setattr(tg, "eval_windows", rec_eval_windows)
        monkeypatch.setattr(tg, "ttt_batch", rec_ttt if ttt_variant is None else ttt_variant(rec_ttt))
        monkeypatch.setattr(model, "token_losses", rec_token_losses)
        monkeypatch.setattr(model, "hidden", rec_hidden)
        monkeypatch.setattr(F, "cross_entropy", rec_ce)

    def _add(self, j, loss, source, logits):
        self.log.append((j, float(loss), source))
        self.logits[j] = logits

    def _record_row(self, row, y, losses, logits):
        """Window (ws, n, first) at row offset pos scores targets ws+first+1 .. ws+n at offsets
        pos+first .. pos+n-1; nothing else in the row may be scored."""
        expect, pos = np.zeros(len(y), dtype=bool), 0
        for ws, n, first in row:
            for i in range(first, n):
                assert y[pos + i] == self.val.tokens[ws + i + 1], "row target is not the window's target"
                expect[pos + i] = True
                self._add(ws + i + 1, losses[pos + i], "eval", logits[pos + i])
            pos += n
        assert np.array_equal(y >= 0, expect), "build_row scores positions outside its windows' scored part"

    def _record_chunk(self, logits, target, ce):
        """Chunk ci = (c0, c1] (chunk_spans) of document (s, n) scores targets s+c0+1 .. s+min(c1, n).
        Rows are the documents that have a chunk ci, in batch order; a lone one is followed by an
        unscored copy (ttt_chunk), which _check_sums keeps out of the counts."""
        ctx = self._ttt
        ci = ctx["ci"]
        ctx["ci"] += 1
        c0, c1 = chunk_spans(self.h, max(n for _, n in ctx["batch"]))[ci]
        C = c1 - c0
        active = [(s, n) for s, n in ctx["batch"] if c0 < n]
        ce, target, logits = ce.view(-1, C), target.view(-1, C), logits.view(-1, C, logits.size(-1))
        assert len(ce) == max(len(active), 2), "one row per document with a chunk ci (two for a lone one)"
        for r, (s, n) in enumerate(active):
            for i in range(c0, min(c1, n)):
                k, j = i - c0, s + i + 1
                assert target[r, k] == self.val.tokens[j], "TTT chunk target is not the chunk's target"
                self._add(j, ce[r, k], "ttt", logits[r, k])

    def _check_sums(self, n0, sums, where):
        """The code's own (loss, count, bytes) sums are exactly those of the recorded targets."""
        new = self.log[n0:]
        loss, count, nbytes = sums.tolist()
        assert count == len(new), f"{where} counted {count} targets, {len(new)} recorded"
        assert loss == pytest.approx(sum(l for _, l, _ in new), rel=1e-9, abs=1e-9), where
        assert nbytes == sum(int(self.val.target_bytes[j]) for j, _, _ in new), where

    # views
    def counts(self):
        return Counter(j for j, _, _ in self.log)

    def scores(self):
        """{j: loss}; every target must have been scored exactly once."""
        out = {}
        for j, loss, _ in self.log:
            assert j not in out, f"target {j} scored twice"
            out[j] = loss
        return out

    def dists(self):
        """{j: log-probabilities over the vocabulary of the prediction of tokens[j]}."""
        return {j: torch.log_softmax(z.double(), -1) for j, z in self.logits.items()}

    def sources(self):
        src = defaultdict(set)
        for j, _, s in self.log:
            src[s].add(j)
        return src


def run_phased(monkeypatch, h, val, deadline=math.inf, **rec_kwargs):
    model = make_model(h)
    rec = Recorder(monkeypatch, model, val, h, **rec_kwargs)
    torch.manual_seed(1234)  # LoRA A draws
    out = tg.phased_ttt(model, h, tg.Runtime(h), val, deadline)
    return rec, out


def run_eval(monkeypatch, h, val, stride=None, model=None, **rec_kwargs):
    """eval_val: disjoint windows (stride None), sliding ones of that stride, or stride
    "attention" (SLIDING_MODE=attention in rows of 2 x EVAL_SEQ_LEN: with EVAL_SEQ_LEN=16 the
    70-token document's pieces end at 32, 48, 64 and 70, each after EVAL_SEQ_LEN of context)."""
    if stride == "attention":
        h = dataclasses.replace(h, sliding_mode="attention", val_batch_tokens=2 * h.eval_seq_len)
    elif stride is not None:
        h = dataclasses.replace(h, eval_stride=stride, sliding_mode="windows")
    model = make_model(h) if model is None else model
    rec = Recorder(monkeypatch, model, val, h, **rec_kwargs)
    out = tg.eval_val(model, h, tg.Runtime(h), val, sliding=stride is not None)
    return rec, out


def assert_single_pass(rec, out, val):
    """Every target 1..N-1 scored exactly once; loss, count and bpb are those of the records."""
    n = len(val.tokens)
    counts = rec.counts()
    twice = sorted(j for j, c in counts.items() if c > 1)
    missing = sorted(set(range(1, n)) - set(counts))
    alien = sorted(set(counts) - set(range(1, n)))
    assert not (twice or missing or alien), \
        f"single pass violated: scored twice {twice[:12]}, never {missing[:12]}, not a target {alien[:12]}"
    loss, bpb, scored = out
    total = sum(rec.scores().values())
    assert scored == n - 1
    assert loss == pytest.approx(total / (n - 1), rel=1e-9)
    assert bpb == pytest.approx(total / (math.log(2) * int(val.target_bytes[1:].sum())), rel=1e-9)


# ---------------------------------------------------------------------------------------
# Broken variants (each must make the matching legality test fail)
# ---------------------------------------------------------------------------------------


def leaky_build_row(val, row, row_tokens):
    """Inputs shifted by one: each position's input is its own target."""
    x, y, b, cu = REAL.build_row(val, row, row_tokens)
    pos = 0
    for ws, n, _ in row:
        x[pos:pos + n] = val.tokens[ws + 1:ws + n + 1]
        pos += n
    return x, y, b, cu


def peeking_attention(q, k, v, cu_seqlens, window):
    """Off-by-one keys/values: a query at t reads the key and value of token t+1."""
    return REAL.attention(q, k.roll(-1, 0), v.roll(-1, 0), cu_seqlens, window)


def unmasked_embed(self, ids, cu_seqlens):
    """SmearGate without the sequence-start mask (only the row's first token is masked)."""
    return REAL.embed(self, ids, torch.tensor([0, ids.numel()], dtype=torch.int32))


def two_pass_ttt(inner):
    """Adapts the LoRA on the whole document first (unscored), then scores it: update before score."""
    def ttt(model, batch, val, bank, opt, h, sums, graphs=None):
        REAL.ttt_batch(model, batch, val, bank, opt, h, torch.zeros_like(sums), graphs)
        inner(model, batch, val, bank, opt, h, sums, graphs)
    return ttt


def double_scoring_ttt(inner):
    def ttt(model, batch, val, bank, opt, h, sums, graphs=None):
        inner(model, batch, val, bank, opt, h, sums, graphs)
        inner(model, batch, val, bank, opt, h, sums, graphs)
    return ttt


def window_truncated_ttt(inner):
    """Forgets the targets of a document beyond the TTT window."""
    def ttt(model, batch, val, bank, opt, h, sums, graphs=None):
        inner(model, [(s, min(n, h.ttt_eval_seq_len)) for s, n in batch], val, bank, opt, h, sums, graphs)
    return ttt


def overlapping_windows(spans, seq_len, stride):
    """Sliding windows that also re-score the previous window's last target."""
    return [(ws, n, max(first - 1, 0)) for ws, n, first in REAL.scoring_windows(spans, seq_len, stride)]


def gapped_windows(spans, seq_len, stride):
    """Sliding windows that skip the first target they should score."""
    return [(ws, n, first + 1 if first else 0) for ws, n, first in REAL.scoring_windows(spans, seq_len, stride)]


def sgd_on_whole_val(val):
    """Global SGD phases on the whole val stream, i.e. also on documents not yet scored."""
    return lambda model, stream, h, rt: REAL.global_sgd(model, val.tokens, h, rt)


def sgd_on_next_batch(val, h):
    """Global SGD phases on the scored prefix plus the next, not yet scored, batch of documents."""
    docs = sorted((sp for sp in REAL.document_spans(val.tokens) if sp[1] <= h.ttt_max_doc_tokens),
                  key=lambda sp: (-sp[1], sp[0]))  # phased_ttt's TTT documents in its order
    lengths = np.cumsum([n for _, n in docs])

    def sgd(model, stream, h_, rt):
        k = int(np.searchsorted(lengths, len(stream))) + 1  # the prefix docs[:k]
        done = -(-k // h.ttt_batch_size) * h.ttt_batch_size  # scored when the phase runs (one rank)
        extra = [val.tokens[s:s + n] for s, n in docs[done:done + h.ttt_batch_size]]
        return REAL.global_sgd(model, np.concatenate([stream, *extra]), h_, rt)
    return sgd


def subset_softmax_ce(input, target, *args, ce=None, **kwargs):
    """CE renormalised over a target-dependent subset of the vocabulary (the first half plus the
    target): each score is a probability, but they no longer sum to 1 over the vocabulary."""
    keep = torch.zeros_like(input, dtype=torch.bool)
    keep[..., :V // 2] = True
    keep.scatter_(-1, target.clamp(min=0).view(*target.shape, 1), True)
    return (ce or REAL.cross_entropy)(input.masked_fill(~keep, -1e9), target, *args, **kwargs)


def subset_loss_fn(hid, weight, targets, cap, reduction="mean"):
    z = tg.softcap_logits(F.linear(hid, weight.to(hid.dtype)).float(), cap)
    return subset_softmax_ce(z.view(-1, z.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=reduction,
                             ce=F.cross_entropy)


def check(variant, fn, match):
    """The legality check fn passes for the real code and fails (AssertionError) for a broken one."""
    if variant == "correct":
        fn()
    else:
        with pytest.raises(AssertionError, match=match) as caught:
            fn()
        print(f"{variant}: {str(caught.value).splitlines()[0]}")  # shown with -s / -rP


# ---------------------------------------------------------------------------------------
# 1. Causality
# ---------------------------------------------------------------------------------------


def assert_causal(run, val, positions, allowed, what):
    """Changing token u (one at a time) may change only the predictions (distributions over the
    vocabulary) of targets in allowed(rec, u); the prediction of tokens[u] itself must not move."""
    rec0 = run(val)
    base, dist0 = rec0.scores(), rec0.dists()
    deltas = {}
    for u in positions:
        rec = run(perturbed(val, [u]))
        new, dist = rec.scores(), rec.dists()
        assert set(new) == set(base)
        ok = allowed(rec0, u)
        assert u not in ok
        delta = {j: float((dist[j] - dist0[j]).abs().max()) for j in base}
        moved = sorted(j for j in base if j not in ok and delta[j] > TOL)
        assert not moved, (f"{what} saw the future: changing token {u} changed the predictions of targets "
                           f"{moved[:12]} (max change {max(delta[j] for j in moved):.3g})")
        assert all(abs(new[j] - base[j]) <= TOL for j in base if j not in ok and j != u)
        # not vacuous: the change does reach the later targets of its own document
        assert any(delta[j] > 1e-4 for j in ok), f"changing token {u} changed nothing"
        deltas[u] = delta
    return rec0, deltas


def eval_allowed(val):
    docs = doc_index(val)

    def allowed(rec, u):
        s, n = docs[u]  # u is never a BOS: its own document's target and an input of it
        return set(range(u + 1, s + n + 1))
    return allowed


@pytest.mark.parametrize("stride", [None, 8, 3, "attention"])
@pytest.mark.parametrize("variant", ["correct", "leaky_build_row", "peeking_attention"])
def test_eval_val_is_causal(tmp_path, monkeypatch, variant, stride):
    h = make_h(tmp_path, **ATTENTION_CFG if stride == "attention" else {})
    val = make_val()
    model = make_model(h)
    if variant == "peeking_attention":
        monkeypatch.setattr(tg, "_attention_sdpa", peeking_attention)
    row = leaky_build_row if variant == "leaky_build_row" else None
    run = lambda v: run_eval(monkeypatch, h, v, stride=stride, model=model, build_row=row)[0]
    # deep in the sliding part of the 70-token document, at a window edge, right after a BOS,
    # the last input of a document, and inside a short document
    s70, s45, s12, s33 = (doc_start(val, n) for n in (70, 45, 12, 33))
    positions = [s70 + 50, s70 + 32, s45 + 1, s12 + 11, s33 + 32, doc_start(val, 9) + 4]
    check(variant, lambda: assert_causal(run, val, positions, eval_allowed(val), "eval_val"), "saw the future")


def ttt_allowed(val):
    """A target may depend on its own prefix and on documents whose scoring finished before its
    document's began: TTT batches in processing order, then the sliding-window leftovers."""
    docs = doc_index(val)

    def allowed(rec, u):
        order = {doc: k for k, batch in enumerate(rec.ttt_batches) for doc in batch}
        late = len(rec.ttt_batches)  # leftovers: scored together after every TTT batch
        s, n = docs[u]
        mine = order.get((s, n), late)
        later = {j for j, d in docs.items() if order.get(d, late) > mine}
        return later | set(range(u + 1, s + n + 1))
    return allowed


@pytest.mark.parametrize("variant", ["correct", "two_pass_ttt", "sgd_on_unscored_docs", "sgd_on_next_batch",
                                     "peeking_attention"])
def test_phased_ttt_is_causal(tmp_path, monkeypatch, variant):
    h = make_h(tmp_path)
    val = make_val()
    kwargs = {}
    if variant == "two_pass_ttt":
        kwargs["ttt_variant"] = two_pass_ttt
    if variant == "peeking_attention":
        monkeypatch.setattr(tg, "_attention_sdpa", peeking_attention)
    if variant == "sgd_on_unscored_docs":
        # trains on the (perturbed) val stream it is evaluating, including unscored documents
        def run(v):
            monkeypatch.setattr(tg, "global_sgd", sgd_on_whole_val(v))
            return run_phased(monkeypatch, h, v)[0]
    elif variant == "sgd_on_next_batch":
        def run(v):
            monkeypatch.setattr(tg, "global_sgd", sgd_on_next_batch(v, h))
            return run_phased(monkeypatch, h, v)[0]
    else:
        run = lambda v: run_phased(monkeypatch, h, v, **kwargs)[0]
    # Processing order: batches [40 37 33] [30 25 20] [16 12 9] [5 3 1], global SGD on the first
    # 2 documents after batch 0 and on the first 4 after batch 1; 45 and 70 by sliding windows.
    u0 = doc_start(val, 40) + 13
    positions = [u0, doc_start(val, 30) + 4, doc_start(val, 16) + 9, doc_start(val, 70) + 40]
    causal = lambda: assert_causal(run, val, positions, ttt_allowed(val), "phased_ttt")
    if variant != "correct":
        check(variant, causal, "saw the future")
        return
    rec0, deltas = causal()
    assert [[n for _, n in b] for b in rec0.ttt_batches] == [[40, 37, 33], [30, 25, 20], [16, 12, 9], [5, 3, 1]]
    # The rule is not vacuous: global SGD (and warm-started A) carry a scored document forward
    # into the documents scored after it.
    docs = doc_index(val)
    assert any(d > 1e-4 for j, d in deltas[u0].items() if docs[j][1] in (30, 70)), \
        "a document in the global-SGD prefix does not influence documents scored after the phase"


@pytest.mark.parametrize("variant", ["correct", "two_pass_ttt"])
def test_grown_ttt_batches_are_causal_and_single_pass(tmp_path, monkeypatch, variant):
    """TTT_BATCH_GROW: short documents in batches of up to k x TTT_BATCH_SIZE (here 2x: rows of 64
    in windows of 128). Every target is still scored once and only from its past, and a broken
    ttt_batch is still caught."""
    h = make_h(tmp_path, ttt_batch_grow=3, ttt_eval_seq_len=128)
    val = make_val()
    run = lambda v: run_phased(monkeypatch, h, v, ttt_variant=two_pass_ttt if variant == "two_pass_ttt" else None)
    rec, out = run(val)
    assert [[n for _, n in b] for b in rec.ttt_batches] == [[40, 37, 33, 30, 25, 20], [16, 12, 9, 5, 3, 1]]
    positions = [doc_start(val, 40) + 13, doc_start(val, 30) + 4, doc_start(val, 16) + 9, doc_start(val, 70) + 40]
    causal = lambda: assert_causal(lambda v: run(v)[0], val, positions, ttt_allowed(val), "phased_ttt")
    check(variant, causal, "saw the future")
    if variant == "correct":
        assert_single_pass(rec, out, val)


# ---------------------------------------------------------------------------------------
# 2. Score before update (TTT per-document LoRA)
# ---------------------------------------------------------------------------------------


def ttt_direct(monkeypatch, h, val, batch, variant=None, seed=7, lr=None, ce_variant=None, same_init=False):
    """ttt_batch on one batch with a seeded fresh bank and phased_ttt's optimizer."""
    model = make_model(h)
    for p in model.parameters():
        p.requires_grad_(False)
    rec = Recorder(monkeypatch, model, val, h, ttt_variant=variant, ce_variant=ce_variant)
    torch.manual_seed(seed)
    bank = tg.LoRABank(len(batch), len(sum(model.layer_plan(True), [])), h)
    if same_init:  # every document starts from the adapters of the first
        with torch.no_grad():
            for a in bank.a.values():
                a.copy_(a[:1].expand_as(a))
    opt = torch.optim.AdamW(bank.parameters(), lr=h.ttt_lora_lr if lr is None else lr, betas=(0.0, h.ttt_beta2),
                            eps=1e-10, weight_decay=h.ttt_weight_decay)
    tg.ttt_batch(model, batch, val, bank, opt, h, torch.zeros(3, dtype=torch.float64))
    return rec, bank


def assert_score_before_update(monkeypatch, h, val, variant):
    C = h.ttt_chunk_size
    batch = [(doc_start(val, n), n) for n in (33, 25, 20)]
    base = ttt_direct(monkeypatch, h, val, batch, variant)[0].scores()
    s, n = batch[0]
    for k in (0, 4):
        cut = (k + 1) * C  # targets of chunks 0..k: s+1 .. s+cut
        keep = set(range(s + 1, s + cut + 1))
        others = {j for j in base if not s < j <= s + n}
        gone = ttt_direct(monkeypatch, h, val, [(s, cut)] + batch[1:], variant)[0].scores()
        tail = list(range(s + cut + 1, s + n))  # every later token of the document (not its last target, a BOS)
        altered = ttt_direct(monkeypatch, h, perturbed(val, tail), batch, variant)[0].scores()
        for label, run in (("removed", gone), ("altered", altered)):
            moved = sorted(j for j in keep | others if abs(run[j] - base[j]) > TOL)
            assert not moved, f"score after update: chunks > {k} {label} changed the scores of targets {moved[:12]}"


@pytest.mark.parametrize("variant", ["correct", "two_pass_ttt"])
def test_ttt_scores_each_chunk_before_adapting_on_it(tmp_path, monkeypatch, variant):
    """The scores of chunks 0..k of a document are the same whether its chunks > k are removed,
    altered or present (and the other documents of the batch never move)."""
    h = make_h(tmp_path)
    val = make_val()
    ttt_variant = two_pass_ttt if variant == "two_pass_ttt" else None
    check(variant, lambda: assert_score_before_update(monkeypatch, h, val, ttt_variant), "score after update")


def test_ttt_adapters_do_learn_between_chunks(tmp_path, monkeypatch):
    """Not vacuous: chunk 0 is scored with B=0 (the base model), later chunks with trained adapters."""
    h = make_h(tmp_path)
    val = make_val()
    batch = [(doc_start(val, n), n) for n in (33, 25, 20)]
    trained = ttt_direct(monkeypatch, h, val, batch)[0].scores()
    frozen = ttt_direct(monkeypatch, h, val, batch, lr=0.0)[0].scores()
    for s, n in batch:
        first = range(s + 1, s + h.ttt_chunk_size + 1)
        assert all(trained[j] == pytest.approx(frozen[j], abs=TOL) for j in first)
        assert max(abs(trained[j] - frozen[j]) for j in range(s + h.ttt_chunk_size + 1, s + n + 1)) > 1e-3


# ---------------------------------------------------------------------------------------
# 3. Single pass: every target scored exactly once
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("stride", [None, 8, 5, 1, "attention"])
@pytest.mark.parametrize("variant", ["correct", "overlapping_windows", "gapped_windows"])
def test_eval_val_scores_every_target_exactly_once(tmp_path, monkeypatch, variant, stride):
    h = make_h(tmp_path, **ATTENTION_CFG if stride == "attention" else {})
    val = make_val()
    if variant != "correct":
        monkeypatch.setattr(tg, "scoring_windows", {"overlapping_windows": overlapping_windows,
                                                    "gapped_windows": gapped_windows}[variant])
    rec, out = run_eval(monkeypatch, h, val, stride=stride)
    check(variant, lambda: assert_single_pass(rec, out, val), "single pass violated")


class FakeClock:
    """tg.time for phased_ttt: perf_counter advances one unit per TTT batch."""

    def __init__(self):
        self.now = 0.0

    def __getattr__(self, name):
        return getattr(time, name)

    def perf_counter(self):
        return self.now

    def ticking(self, inner):
        def ttt(*args):
            inner(*args)
            self.now += 1.0
        return ttt


# TTT chunk schedules: (config, the reference config whose score must differ, (document length, target)
# pairs probed for causality)
SCHEDULES = {
    "long_chunks": (dict(ttt_long_chunk_size=6), {}, ((40, 13), (40, 25), (30, 20), (16, 9))),
    "tail": (dict(ttt_long_chunk_size=6, ttt_tail_chunk_size=10), dict(ttt_long_chunk_size=6),
             ((70, 45), (70, 63), (45, 42), (40, 25))),
}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("variant", ["correct", "two_pass_ttt"])
def test_phased_ttt_chunk_schedules_are_causal_and_single_pass(tmp_path, monkeypatch, variant, schedule):
    """long_chunks: TTT_LONG_CHUNK_SIZE=6 past the 16-token window (chunks of 4 inside it). tail: also
    TTT_TAIL_CHUNK_SIZE=10, so the 45- and 70-token documents (over TTT_MAX_DOC_TOKENS=40) are adapted
    too, in chunks of 10 from target 40 on, and none is left to the windows. Every target once, only
    from its past, a broken ttt_batch still caught; the schedule changes the score."""
    cfg, reference, probes = SCHEDULES[schedule]
    h = make_h(tmp_path, **cfg)
    val = make_val()
    run = lambda v: run_phased(monkeypatch, h, v, ttt_variant=two_pass_ttt if variant == "two_pass_ttt" else None)
    rec, out = run(val)
    positions = [doc_start(val, n) + i for n, i in probes]
    causal = lambda: assert_causal(lambda v: run(v)[0], val, positions, ttt_allowed(val), "phased_ttt")
    check(variant, causal, "saw the future")
    if variant == "correct":
        assert_single_pass(rec, out, val)
        if schedule == "tail":
            assert {d for b in rec.ttt_batches for d in b} == set(REAL.document_spans(val.tokens))
            assert not rec.sources()["eval"]
        assert abs(out[0] - run_phased(monkeypatch, make_h(tmp_path, **reference), val)[1][0]) > 1e-4


@pytest.mark.parametrize("targets", ["k,o,mlp,head", "q"])
def test_phased_ttt_with_fewer_lora_targets_scores_every_target_once_and_adapts(tmp_path, monkeypatch, targets):
    """TTT_LORA_TARGETS (PR #1953's no_qv, or one projection): still every target exactly once and
    only from its past; the adapters still move the score, and differently from all six targets."""
    h = make_h(tmp_path, ttt_lora_targets=targets)
    val = make_val()
    rec, out = run_phased(monkeypatch, h, val)
    assert_single_pass(rec, out, val)
    positions = [doc_start(val, 40) + 13, doc_start(val, 30) + 4]
    assert_causal(lambda v: run_phased(monkeypatch, h, v)[0], val, positions, ttt_allowed(val), "phased_ttt")
    frozen = run_phased(monkeypatch, make_h(tmp_path, ttt_lora_targets=targets, ttt_lora_lr=0.0), val)[1]
    full = run_phased(monkeypatch, make_h(tmp_path), val)[1]
    assert abs(out[0] - frozen[0]) > 1e-4 and abs(out[0] - full[0]) > 1e-4


@pytest.mark.parametrize("mode", ["windows", "attention"])
@pytest.mark.parametrize("deadline", ["never", "passed", "mid"])
@pytest.mark.parametrize("variant", ["correct", "double_scoring_ttt", "window_truncated_ttt", "overlapping_windows"])
def test_phased_ttt_scores_every_target_exactly_once(tmp_path, monkeypatch, variant, deadline, mode):
    # attention: rows of 32 tokens, so the long documents' pieces overlap by EVAL_SEQ_LEN=16
    h = make_h(tmp_path, sliding_mode=mode, **dict(ATTENTION_CFG, val_batch_tokens=32) if mode == "attention" else {})
    val = make_val()
    spans = REAL.document_spans(val.tokens)
    ttt_variant = {"double_scoring_ttt": double_scoring_ttt, "window_truncated_ttt": window_truncated_ttt}.get(variant)
    if variant == "overlapping_windows":
        monkeypatch.setattr(tg, "scoring_windows", overlapping_windows)
    clock = FakeClock()
    monkeypatch.setattr(tg, "time", clock)
    wrap = (lambda inner: clock.ticking(ttt_variant(inner) if ttt_variant else inner))
    # "mid": batches 0 and 1 run (and both phases), then batch 2, predicted to take as long as
    # batch 1, would end past the deadline: batches 2 and 3 go to the windows with the long documents
    limit = {"never": math.inf, "passed": -1.0, "mid": 2.5}[deadline]
    rec, out = run_phased(monkeypatch, h, val, deadline=limit, ttt_variant=wrap)

    def legal():
        assert_single_pass(rec, out, val)
        ttt_docs = {d for b in rec.ttt_batches for d in b}
        expect = {"never": {d for d in spans if d[1] <= h.ttt_max_doc_tokens}, "passed": set(),
                  "mid": {d for d in spans if 20 <= d[1] <= h.ttt_max_doc_tokens}}[deadline]
        assert ttt_docs == expect
        src = rec.sources()
        assert src["ttt"] == {j for s, n in ttt_docs for j in range(s + 1, s + n + 1)}
        assert src["eval"] == set(range(1, len(val.tokens))) - src["ttt"]
        assert_windows_within_documents(rec, val)  # eval rows and TTT rows

    # past the deadline no TTT batch runs, so a broken ttt_batch cannot show
    check("correct" if deadline == "passed" and ttt_variant else variant, legal, "single pass violated")


def test_phased_ttt_past_deadline_is_the_disjoint_eval(tmp_path, monkeypatch):
    """Past the deadline nothing adapts and every document gets the cheapest legal scoring,
    disjoint windows (sliding ones cost up to EVAL_SEQ_LEN/EVAL_STRIDE times more)."""
    h = make_h(tmp_path)
    val = make_val()
    rec, out = run_phased(monkeypatch, h, val, deadline=0.0)
    assert not rec.ttt_batches
    assert out == run_eval(monkeypatch, h, val)[1]


@pytest.mark.parametrize("deadline", [0.3, 0.8, 1.2, 1.6, 2.5, 5.0])
def test_phased_ttt_bounded_by_predicted_cost_stays_legal(tmp_path, monkeypatch, deadline):
    """With costs predicted (token_s > 0, a frozen clock) batches stop where their cost and the
    windows' for the rest would pass the deadline: every target is still scored once, and a
    global SGD phase only ever trains on documents TTT has already scored, also when it would
    fit where the batch before it did not."""
    h = make_h(tmp_path)
    val = make_val()
    monkeypatch.setattr(tg, "time", FakeClock())
    scored, calls = [], []

    def track(inner):
        def ttt(model_, batch, *args):
            inner(model_, batch, *args)
            scored.extend(batch)
        return ttt

    def sgd(model_, stream, h_, rt):
        calls.append((len(stream), set(scored)))
        REAL.global_sgd(model_, stream, h_, rt)

    monkeypatch.setattr(tg, "global_sgd", sgd)
    model = make_model(h)
    rec = Recorder(monkeypatch, model, val, h, ttt_variant=track)
    torch.manual_seed(1234)
    out = tg.phased_ttt(model, h, tg.Runtime(h), val, deadline, token_s=1e-3)
    assert_single_pass(rec, out, val)
    docs = sorted((d for d in REAL.document_spans(val.tokens) if d[1] <= h.ttt_max_doc_tokens), key=lambda d: -d[1])
    for n, seen in calls:
        prefix = next(docs[:k] for k in range(len(docs) + 1) if sum(m for _, m in docs[:k]) == n)
        assert set(prefix) <= seen, "global SGD on documents not yet scored"
    if deadline == 5.0:
        assert len(rec.ttt_batches) == 4 and len(calls) == 2
    if deadline == 0.3:
        assert not rec.ttt_batches and not calls


@pytest.mark.parametrize("C2", [0, 8])
def test_the_first_batch_is_predicted_with_its_chunk_schedule(tmp_path, monkeypatch, C2):
    """Before any batch was measured, the first one's cost counts a window per TTT_LONG_CHUNK_SIZE
    targets past the first window: batch [40 37 33] (window tokens 320 with chunks of 4, 192 with 8
    past the 16-token window) plus disjoint windows over the rest (236 targets), at 1e-3 s per
    window token and 3 per TTT row token, fits a 1 s deadline with chunks of 8 there only."""
    h = make_h(tmp_path, ttt_long_chunk_size=C2)
    val = make_val()
    monkeypatch.setattr(tg, "time", FakeClock())
    model = make_model(h)
    rec = Recorder(monkeypatch, model, val, h)
    torch.manual_seed(1234)
    out = tg.phased_ttt(model, h, tg.Runtime(h), val, 1.0, token_s=1e-3)
    assert_single_pass(rec, out, val)
    assert ([[n for _, n in b] for b in rec.ttt_batches][:1] == [[40, 37, 33]]) == (C2 == 8)


def test_a_grown_batch_is_predicted_by_its_row_tokens(tmp_path, monkeypatch):
    """TTT_BATCH_GROW: after 2 documents of 66-70 tokens (rows of 128) come 4 of 61-64 (rows of 64):
    about twice the work of the batch before, which the deadline check must not take for an upper
    bound. With each batch taking time in proportion to its row tokens, no batch ends past the
    deadline that the windows' estimate leaves room for."""
    h = make_h(tmp_path, ttt_batch_size=2, ttt_batch_grow=2, ttt_eval_seq_len=128, ttt_max_doc_tokens=100,
               phased_ttt_num_phases=0)
    val = make_val((70, 66, 64, 63, 62, 61, 30, 20))
    clock, ends, rate = FakeClock(), [], 1e-4
    monkeypatch.setattr(tg, "time", clock)

    def timed(inner):
        def ttt(model_, batch, *args):
            inner(model_, batch, *args)
            clock.now += rate * tg.ttt_batch_work(batch, *h.ttt_chunking)
            ends.append(clock.now)
        return ttt

    model = make_model(h)
    rec = Recorder(monkeypatch, model, val, h, ttt_variant=timed)
    work = [tg.ttt_batch_work(b, *h.ttt_chunking) for b in tg.ttt_plan(
        tg.document_spans(val.tokens), h, 0, 1).batches[:2]]
    assert work[1] > 1.5 * work[0]
    # token_s: the first batch predicted exactly (3 x token_s per window token of its documents)
    first = sum(tg.window_tokens(n, h.ttt_eval_seq_len, h.ttt_chunk_size) for n in (70, 66))
    deadline = rate * (work[0] + 1.5 * work[0])
    out = tg.phased_ttt(model, h, tg.Runtime(h), val, deadline, token_s=rate * work[0] / (3 * first))
    assert_single_pass(rec, out, val)
    assert ends and max(ends) <= deadline, (ends, deadline)
    assert [[n for _, n in b] for b in rec.ttt_batches] == [[70, 66]]


@pytest.mark.parametrize("deadline", [1.1, 2.1])
def test_phased_ttt_rescales_its_own_rate_by_the_first_batch(tmp_path, monkeypatch, deadline):
    """The disjoint eval's rate (1e-4 s per window token) underestimates TTT: the first batch's
    measured time (1 per batch here) over its prediction (3 x 1e-4 x 320 window tokens) rescales
    it for TTT's own predictions, not for the windows that may follow (the eval's graphs, its
    rate). At 1.1, phase 1's global SGD (77 tokens: 0.24 rescaled, 0.02 at the eval's rate) does
    not start after batch 0; at 2.1 batch 1 does: it and the windows for the 161 targets left end
    at 2.02 (2.17 with the windows at the rescaled rate)."""
    h = make_h(tmp_path)
    val = make_val()
    clock, calls = FakeClock(), []
    monkeypatch.setattr(tg, "time", clock)
    monkeypatch.setattr(tg, "global_sgd", lambda *a: calls.append(len(a[1])) or REAL.global_sgd(*a))
    model = make_model(h)
    rec = Recorder(monkeypatch, model, val, h, ttt_variant=clock.ticking)
    out = tg.phased_ttt(model, h, tg.Runtime(h), val, deadline, token_s=1e-4)
    assert_single_pass(rec, out, val)
    batches = [[n for _, n in b] for b in rec.ttt_batches]
    if deadline == 1.1:
        assert batches == [[40, 37, 33]] and not calls
    else:
        assert batches[:2] == [[40, 37, 33], [30, 25, 20]] and calls[:1] == [77]


# ---------------------------------------------------------------------------------------
# 4. Normalisation
# ---------------------------------------------------------------------------------------


def test_head_logits_are_a_full_vocabulary_distribution(tmp_path):
    h = make_h(tmp_path)
    model = make_model(h)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, V, (2, 24), generator=g)
    ids[:, 0] = tg.BOS_ID
    cu = torch.tensor([0, 24, 48], dtype=torch.int32)
    bank = tg.LoRABank(2, len(sum(model.layer_plan(True), [])), h)
    with torch.no_grad():
        for b in bank.b.values():
            b.normal_(generator=g)
        _, head = bank.select(torch.tensor([1, 0]))
        hid = model.hidden(ids, cu, 24)
        for adapter in (None, head):
            z = model.head_logits(hid, adapter)
            assert z.shape == (2, 24, V) and z.dtype == torch.float32 and torch.isfinite(z).all()
            assert z.abs().max() <= h.logit_softcap
            torch.testing.assert_close(torch.softmax(z.double(), -1).sum(-1), torch.ones(2, 24, dtype=torch.float64))
        assert not torch.equal(model.head_logits(hid, head), model.head_logits(hid))


def copies_per_value(prefix):
    """A stream of V documents, each `prefix` (from a BOS) followed by one value v = 0..V-1;
    returns (val, starts)."""
    assert prefix[0] == tg.BOS_ID
    tokens = np.concatenate([np.r_[prefix, v] for v in range(V)]).astype(np.uint16)
    return valset(tokens), [v * (len(prefix) + 1) for v in range(V)]


def prob_sum(rec, targets):
    scores = rec.scores()
    assert set(scores) == set(targets)
    return sum(math.exp(-scores[j]) for j in targets)


@pytest.mark.parametrize("variant", ["correct", "subset_softmax"])
def test_eval_scores_sum_to_one_over_the_vocabulary(tmp_path, monkeypatch, variant):
    """sum over v of exp(-score) of a target whose value is v, in otherwise identical windows."""
    h = make_h(tmp_path)
    val = make_val()
    model = make_model(h)
    if variant == "subset_softmax":
        monkeypatch.setattr(model, "loss_fn", subset_loss_fn)
    s70, s12 = doc_start(val, 70), doc_start(val, 12)
    # a sliding window inside a long document; a whole document (whose target is normally the next BOS)
    cases = [(val.tokens[s70:s70 + 52], 20, 32), (val.tokens[s12:s12 + 12], 0, 12)]

    def normalised():
        for prefix, off, n in cases:
            copies, starts = copies_per_value(prefix)
            rec = Recorder(monkeypatch, model, copies, h)
            tg.eval_windows(model, h, tg.Runtime(h), copies, [(s + off, n, n - 1) for s in starts])
            total = prob_sum(rec, [s + len(prefix) for s in starts])
            assert total == pytest.approx(1.0, abs=1e-5), f"not normalised: probabilities sum to {total}"
    check(variant, normalised, "not normalised")


@pytest.mark.parametrize("variant", ["correct", "subset_softmax"])
def test_ttt_scores_sum_to_one_over_the_vocabulary(tmp_path, monkeypatch, variant):
    """Chunk 1 of a document, scored with adapters (the head adapter included) trained on chunk
    0: V identical documents, each with its own adapters from the same init, and last target v."""
    h = make_h(tmp_path)
    val = make_val()
    C = h.ttt_chunk_size
    s = doc_start(val, 12)
    copies, starts = copies_per_value(val.tokens[s:s + C + 1])
    ce = subset_softmax_ce if variant == "subset_softmax" else None

    def normalised():
        total = 0.0
        for group in range(0, V, 8):
            batch = [(t, C + 1) for t in starts[group:group + 8]]  # chunk 1 scores only the value v
            rec, bank = ttt_direct(monkeypatch, h, copies, batch, ce_variant=ce, same_init=True)
            assert bank.b["head"].abs().max() > 0  # the head adapter was trained before chunk 1
            scores = rec.scores()
            assert len({scores[t + 1] for t, _ in batch}) == 1  # the copies are identical up to v
            total += sum(math.exp(-scores[t + C + 1]) for t, _ in batch)
        assert total == pytest.approx(1.0, abs=1e-5), f"not normalised: probabilities sum to {total}"
    check(variant, normalised, "not normalised")


def test_scored_losses_are_log_softmax_of_the_full_vocabulary(tmp_path, monkeypatch):
    h = make_h(tmp_path)
    val = make_val()
    # TTT: each score is -log softmax of the logits row it came from, over all V entries
    rec, _ = run_phased(monkeypatch, h, val)
    assert rec.sources()["ttt"] and rec.sources()["eval"]
    for j, loss, src in rec.log:
        z = rec.logits[j]
        assert z.shape == (V,) and z.dtype == torch.float32 and z.abs().max() <= h.logit_softcap
        assert loss == pytest.approx(-torch.log_softmax(z.double(), -1)[int(val.tokens[j])].item(), abs=1e-5)
    # sliding windows: each score equals the model on the window alone (single sequence)
    model = make_model(h)
    rec, _ = run_eval(monkeypatch, h, val, stride=h.eval_stride, model=model)
    got = rec.scores()
    windows = [w for row, _, _ in rec.eval_rows for w in row]
    for ws, n, first in windows:
        x = torch.from_numpy(val.tokens[ws:ws + n].astype(np.int64)).view(1, -1)
        with torch.no_grad():
            logp = torch.log_softmax(model.head_logits(model.hidden(x, torch.tensor([0, n], dtype=torch.int32), n))[0].double(), -1)
        for i in range(first, n):
            assert got[ws + i + 1] == pytest.approx(-logp[i, int(val.tokens[ws + i + 1])].item(), abs=1e-5)


# ---------------------------------------------------------------------------------------
# Zero adapters, document boundaries, and TTT that cannot change anything
# ---------------------------------------------------------------------------------------


def reset_keeping_b(self, warm_a):
    """A reset that forgets to zero B: the next batch starts from the previous batch's adapters."""
    with torch.no_grad():
        for a in self.a.values():
            if not warm_a:
                a.uniform_(-a.size(-1) ** -0.5, a.size(-1) ** -0.5)


@pytest.mark.parametrize("variant", ["correct", "reset_keeping_b"])
def test_fresh_or_reset_lora_bank_is_the_eval_forward(tmp_path, monkeypatch, variant):
    """model.hidden / head_logits with the adapters of a fresh or reset bank (B = 0) are exactly
    the eval forward, and a TTT row is the eval forward of that sequence packed in a row."""
    h = make_h(tmp_path)
    model = make_model(h)
    n_slots = len(sum(model.layer_plan(True), []))
    g = torch.Generator().manual_seed(4)
    T = 64
    ids = torch.randint(4, V, (3, T), generator=g)
    ids[:, 0] = tg.BOS_ID
    cu = torch.arange(4, dtype=torch.int32) * T
    if variant == "reset_keeping_b":
        monkeypatch.setattr(tg.LoRABank, "reset", reset_keeping_b)
    bank = tg.LoRABank(3, n_slots, h)

    def same():
        with torch.no_grad():
            for idx in ([0, 1, 2], [2, 0, 1]):
                lora, head = bank.select(torch.tensor(idx))
                hid = model.hidden(ids, cu, T, lora)
                ref = model.hidden(ids, cu, T)
                assert torch.equal(hid, ref), "zero adapters changed the forward"
                assert torch.equal(model.head_logits(hid, head), model.head_logits(ref)), \
                    "zero adapters changed the forward"
            packed = model.hidden(ids.view(1, -1), cu, T).view(3, T, -1)
            torch.testing.assert_close(ref, packed, rtol=1e-5, atol=1e-5)

    same()  # fresh: B is created zero
    with torch.no_grad():  # as after TTT steps on a batch
        for a, b in zip(bank.a.values(), bank.b.values()):
            a.normal_(generator=g)
            b.normal_(generator=g)
    for warm_a in (True, False):
        bank.reset(warm_a)
        check(variant, same, "zero adapters changed the forward")


def assert_windows_within_documents(rec, val):
    """Every input sequence of every scored row holds at most one BOS, at its start."""
    for row, x, cu in rec.eval_rows:
        for a, b in zip(cu[:-1], cu[1:]):
            bos = np.flatnonzero(x[a:b] == tg.BOS_ID)
            assert set(bos) <= {0}, f"a window crosses a BOS: row sequence [{a}, {b}) has BOS at {bos}"
    for x, cu in rec.ttt_rows:
        for row in x:
            bos = np.flatnonzero(row.numpy() == tg.BOS_ID)
            assert set(bos) <= {0}, f"a window crosses a BOS: TTT row has BOS at {bos}"


def assert_isolated(run, val, docs):
    """Changing every token of one document leaves the scores of all other targets unchanged."""
    base_rec = run(val)
    assert_windows_within_documents(base_rec, val)
    base = base_rec.scores()
    for length in docs:
        s = doc_start(val, length)
        n = length - 1 if s + length > len(val.tokens) - 1 else length
        rec = run(perturbed(val, range(s + 1, s + n)))
        new = rec.scores()
        moved = sorted(j for j in base if not s < j <= s + n and abs(new[j] - base[j]) > TOL)
        assert not moved, f"a window crosses a BOS: changing document {s} moved the scores of targets {moved[:12]}"


@pytest.mark.parametrize("mode", ["windows", "attention"])
@pytest.mark.parametrize("variant", ["correct", "unmasked_smear", "spans_ignore_bos"])
def test_eval_windows_never_cross_a_bos(tmp_path, monkeypatch, variant, mode):
    h = make_h(tmp_path, **ATTENTION_CFG if mode == "attention" else {})
    val = make_val()
    model = make_model(h)
    if variant == "unmasked_smear":
        monkeypatch.setattr(tg.GPT, "embed", unmasked_embed)
    if variant == "spans_ignore_bos":
        monkeypatch.setattr(tg, "document_spans", lambda tokens: [(0, len(tokens) - 1)])
    stride = h.eval_stride if mode == "windows" else "attention"
    run = lambda v: run_eval(monkeypatch, h, v, stride=stride, model=model)[0]
    check(variant, lambda: assert_isolated(run, val, (12, 30, 3, 9, 37, 6)), "crosses a BOS")


def test_scoring_windows_stay_inside_their_document():
    rng = np.random.default_rng(5)
    for trial in range(40):
        lengths = rng.integers(1, 90, rng.integers(1, 8))
        tokens = np.concatenate([np.r_[tg.BOS_ID, rng.integers(4, V, n - 1)] for n in lengths])
        if trial % 3 == 0:
            tokens = tokens[rng.integers(1, 5):]  # a stream that starts mid-document
        if len(tokens) < 2:
            continue
        spans = REAL.document_spans(tokens)
        seq_len = int(rng.integers(1, 40))
        stride = int(rng.integers(1, seq_len + 1))
        scored = Counter()
        for ws, n, first in REAL.scoring_windows(spans, seq_len, stride):
            assert 1 <= n <= seq_len and 0 <= first < n
            assert tg.BOS_ID not in tokens[ws + 1:ws + n], "window crosses a BOS"
            (s, m), = [(s, m) for s, m in spans if s <= ws < s + m]
            assert ws + n <= s + m  # inputs inside the document, targets up to its last (the next BOS)
            scored.update(range(ws + first + 1, ws + n + 1))
        assert scored == Counter(range(1, len(tokens))), (lengths, seq_len, stride)


def one_global_layer_h(tmp_path, **overrides):
    """One full-causal layer, no loop, no SmearGate: a target's prediction depends only on the
    tokens its one attention reads, so capped attention and stride-1 windows must agree."""
    return make_h(tmp_path, num_layers=1, global_attn_layers=(0,), num_loops=0, parallel_start_layer=1, xsa_last_n=1,
                  smear_gate=False, **overrides)


@pytest.mark.parametrize("variant", ["correct", "uncapped"])
def test_capped_attention_scores_like_stride_one_windows(tmp_path, monkeypatch, variant):
    """SLIDING_MODE=attention scores each target with EVAL_SEQ_LEN-1 earlier tokens, as sliding
    windows of stride 1 do, in one forward per document (two pieces for the 70-token one)."""
    h = one_global_layer_h(tmp_path, **ATTENTION_CFG)
    val = make_val()
    model = make_model(h)
    windows = run_eval(monkeypatch, h, val, stride=1, model=model)[0].scores()
    if variant == "uncapped":  # documents whole, the global layer's attention left uncapped
        real = tg.capped_attention
        monkeypatch.setattr(tg, "capped_attention", lambda m, h_: real(m, dataclasses.replace(h_, eval_seq_len=10 ** 6)))
    rec = run_eval(monkeypatch, h, val, stride="attention", model=model)[0]
    assert [len(r[0]) for r in rec.eval_rows if any(n > h.eval_seq_len for _, n, _ in r[0])]  # long documents whole

    def same():
        attention = rec.scores()
        assert set(attention) == set(windows)
        moved = sorted(j for j in windows if abs(attention[j] - windows[j]) > 1e-5)
        assert not moved, f"capped attention differs from stride-1 windows at targets {moved[:12]}"
    check(variant, same, "differs from stride-1 windows")
    assert all(a.window is None for a in (b.attn for b in model.blocks))  # restored


def test_capped_attention_restores_the_windows_and_runs_eager(tmp_path, monkeypatch):
    h = make_h(tmp_path, sliding_mode="attention", val_batch_tokens=64)
    model = make_model(h)
    before = [(b.attn.window, b.attn.fa3_max_seqlen) for b in model.blocks]
    stances = []
    real = tg.eval_windows
    monkeypatch.setattr(tg, "eval_windows", lambda *a, **k: stances.append(
        ([b.attn.window for b in model.blocks], torch._dynamo.eval_frame._stance.stance)) or real(*a, **k))
    tg.eval_val(model, h, tg.Runtime(h), make_val(), sliding=True)
    (windows, stance), = stances
    assert windows == [8, 8, 31, 16] and stance == "force_eager"
    assert [(b.attn.window, b.attn.fa3_max_seqlen) for b in model.blocks] == before


def test_fa3_is_given_each_rows_longest_sequence_under_capped_attention(tmp_path, monkeypatch):
    """FA3's max_seqlen (a stand-in module with its signature, over SDPA): the static bound in the
    windows' path, each row's longest sequence under capped attention (a VAL_BATCH_TOKENS bound
    would launch its tiles for every short document); scores the same as SDPA's."""
    seen = []

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal, window_size):
        assert causal and cu_q is cu_k and max_q == max_k and window_size[1] == 0
        seen.append((max_q, int(np.diff(cu_q.numpy()).max())))
        return REAL.attention(q, k, v, cu_q, None if window_size[0] < 0 else window_size[0])
    h = make_h(tmp_path)
    model, val = make_model(h), make_val()
    ref = {mode: run_eval(monkeypatch, h, val, stride=mode, model=model)[1] for mode in (8, "attention")}
    monkeypatch.setitem(sys.modules, "flash_attn_interface", SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func))
    monkeypatch.setattr(tg, "ATTENTION_BACKEND", "fa3")
    monkeypatch.setattr(tg, "use_attention_backend", lambda requested, device: "fa3")  # what Runtime picks
    bound = model.blocks[0].attn.fa3_max_seqlen
    for mode in (8, "attention"):
        seen.clear()
        assert run_eval(monkeypatch, h, val, stride=mode, model=model)[1] == pytest.approx(ref[mode], rel=1e-6)
        assert seen, "FA3 was not called"
        if mode == "attention":
            assert all(m == longest for m, longest in seen) and max(m for m, _ in seen) > h.eval_seq_len
        else:
            assert all(m == bound >= longest for m, longest in seen)
    assert all(b.attn.fa3_max_seqlen == bound for b in model.blocks)


def test_sliding_work_counts_the_windows_tokens_and_capped_attentions_eager_forward(tmp_path):
    """The deadline's prediction of a sliding eval: window tokens of EVAL_SEQ_LEN=32 windows 8 apart
    (100 targets: 32 + 9 x 32), or of 64-token pieces 32 apart (64 + 2 x 64) counted 3x (eager)."""
    spans = [(0, 100), (200, 20)]
    assert tg.sliding_work(spans, make_h(tmp_path, sliding_mode="windows")) == 32 + 9 * 32 + 20
    assert tg.sliding_work(spans, make_h(tmp_path, val_batch_tokens=64)) == 3 * (64 + 2 * 64 + 20)


def test_phased_ttt_leftovers_with_capped_attention(tmp_path, monkeypatch):
    """SLIDING_MODE=attention in phased TTT: the documents over TTT_MAX_DOC_TOKENS (45, 70) are
    scored once, with the scores the sliding eval gives them (lr 0: TTT changes nothing)."""
    h = make_h(tmp_path, sliding_mode="attention", val_batch_tokens=32, ttt_lora_lr=0.0, global_ttt_lr=0.0, **ATTENTION_CFG)
    val = make_val()
    rec, out = run_phased(monkeypatch, h, val)
    assert_single_pass(rec, out, val)
    long_docs = {j for s, n in REAL.document_spans(val.tokens) if n > h.ttt_max_doc_tokens for j in range(s + 1, s + n + 1)}
    assert rec.sources()["eval"] == long_docs
    ref = run_eval(monkeypatch, h, val, stride="attention")[0].scores()
    got = rec.scores()
    assert max(abs(got[j] - ref[j]) for j in long_docs) < 1e-5


@pytest.mark.parametrize("aligned", [False, True])
def test_phased_ttt_equals_eval_val_when_ttt_cannot_change_anything(tmp_path, monkeypatch, aligned):
    """lr 0 for the LoRA and global SGD (both still run). Short documents only (<= TTT_EVAL_SEQ_LEN,
    whole-prefix context in both), or all documents with TTT windows aligned to the sliding
    windows (TTT_EVAL_SEQ_LEN = EVAL_SEQ_LEN, TTT_CHUNK_SIZE = EVAL_STRIDE)."""
    if aligned:
        h = make_h(tmp_path, ttt_eval_seq_len=32, ttt_chunk_size=8, ttt_lora_lr=0.0, global_ttt_lr=0.0, sliding_mode="windows")
        val, stride = make_val(), h.eval_stride
    else:
        h = make_h(tmp_path, ttt_lora_lr=0.0, global_ttt_lr=0.0, phased_ttt_prefix_docs=6, global_ttt_chunk_tokens=32)
        val, stride = make_val((12, 16, 3, 1, 9, 14, 5, 16, 7, 11, 2, 13, 10, 4, 15)), None
    calls = []
    monkeypatch.setattr(tg, "global_sgd", lambda *a: calls.append(1) or REAL.global_sgd(*a))
    ttt = run_phased(monkeypatch, h, val)[1]
    assert len(calls) == 2  # both phases ran
    ref = run_eval(monkeypatch, h, val, stride=stride)[1]
    assert ttt[2] == ref[2] == len(val.tokens) - 1
    assert ttt[0] == pytest.approx(ref[0], rel=1e-6) and ttt[1] == pytest.approx(ref[1], rel=1e-6)
    # and TTT with learning rates does change the result (the comparison is sensitive)
    h.ttt_lora_lr, h.global_ttt_lr = CFG["ttt_lora_lr"], CFG["global_ttt_lr"]
    adapted = run_phased(monkeypatch, h, val)[1]
    assert abs(adapted[0] - ref[0]) > 1e-4


# ---------------------------------------------------------------------------------------
# Fewer TTT documents than phases
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("lengths,phases", [((45, 20, 70), 2), ((45, 20, 12, 70), 3)])
def test_phased_ttt_with_fewer_ttt_documents_than_phases(tmp_path, monkeypatch, lengths, phases):
    """A phase boundary of 0 once asked global SGD for no documents (np.concatenate([]) raised)."""
    h = make_h(tmp_path, phased_ttt_num_phases=phases)
    val = make_val(lengths)
    rec, out = run_phased(monkeypatch, h, val)
    assert_single_pass(rec, out, val)


@pytest.mark.parametrize("cut", [0, 8, 39])
def test_global_sgd_trains_on_the_scored_prefix_cut_per_document(tmp_path, monkeypatch, cut):
    """GLOBAL_TTT_DOC_TOKENS: each phase's stream is the scored prefix's documents in TTT order,
    each cut to its first `cut` tokens (0: whole), so still only scored tokens. Batches [40 37 33]
    [30 25 20]: the phases train on the first 2 and 4 documents, all longer than 8, one than 39."""
    h = make_h(tmp_path, global_ttt_doc_tokens=cut)
    val = make_val()
    streams = []

    def sgd(model_, stream, h_, rt):
        streams.append(stream.copy())
        REAL.global_sgd(model_, stream, h_, rt)

    monkeypatch.setattr(tg, "global_sgd", sgd)
    rec, out = run_phased(monkeypatch, h, val)
    assert_single_pass(rec, out, val)
    docs = [d for batch in rec.ttt_batches for d in batch]
    expected = [np.concatenate([val.tokens[s:s + (min(n, cut) if cut else n)] for s, n in docs[:k]]) for k in (2, 4)]
    assert [len(x) for x in streams] == [len(x) for x in expected]
    assert all(np.array_equal(a, b) for a, b in zip(streams, expected))
    assert len(streams[1]) == {0: 40 + 37 + 33 + 30, 8: 4 * 8, 39: 39 + 37 + 33 + 30}[cut]


# ---------------------------------------------------------------------------------------
# 5. The TTT warm-up (compiles TTT's graphs inside the eval timer): no val data, nothing kept
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sgd_compile", [True, False])
def test_ttt_warmup_reads_no_val_data_and_leaves_the_model_bit_identical(tmp_path, monkeypatch, sgd_compile):
    """It is given no val set (only its own random tokens), runs a TTT step and (GLOBAL_TTT_COMPILE=1:
    something to compile) a global SGD step that does move the base weights, and leaves every
    weight, buffer and the RNG as they were."""
    assert list(inspect.signature(tg.ttt_warmup).parameters) == ["model", "h", "rt"]
    h = make_h(tmp_path, global_ttt_compile=sgd_compile)
    val = make_val()
    model = make_model(h)
    rt = tg.Runtime(h)  # seeds the RNG
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    seen, moved, stepped = [], [], []

    def ttt(model_, batch, val_, bank, opt, h_, sums, graphs=None):
        seen.append(val_.tokens)
        REAL.ttt_batch(model_, batch, val_, bank, opt, h_, sums, graphs)
        stepped.append(bool(opt.state))

    def sgd(model_, stream, h_, rt_):
        seen.append(stream)
        REAL.global_sgd(model_, stream, h_, rt_)
        moved.append(any(not torch.equal(v, before[k]) for k, v in model_.state_dict().items()))

    monkeypatch.setattr(tg, "ttt_batch", ttt)
    monkeypatch.setattr(tg, "global_sgd", sgd)
    tg.ttt_warmup(model, h, rt)
    assert stepped == [True] and moved == [True] * sgd_compile  # not vacuous
    assert not any(np.shares_memory(t, val.tokens) for t in seen)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "the warm-up changed the model"
    assert torch.equal(torch.get_rng_state(), rng), "the warm-up changed the RNG"


def rng_not_restored(**kwargs):
    """A warm-up whose LoRA draws use up the RNG that phased TTT's adapters draw from next."""
    return contextlib.nullcontext()


@pytest.mark.parametrize("variant", ["correct", "rng_not_restored"])
def test_phased_ttt_after_the_warmup_is_phased_ttt_without_it(tmp_path, monkeypatch, variant):
    """The warm-up carries nothing into the score: phased TTT after it scores every target
    exactly as phased TTT alone (weights, adapter draws, optimizer states)."""
    h = make_h(tmp_path)
    val = make_val()
    if variant == "rng_not_restored":
        monkeypatch.setattr(torch.random, "fork_rng", rng_not_restored)

    def run(warm):
        model = make_model(h)
        rt = tg.Runtime(h)
        torch.manual_seed(1234)
        if warm:
            tg.ttt_warmup(model, h, rt)
        rec = Recorder(monkeypatch, model, val, h)
        out = tg.phased_ttt(model, h, rt, val, math.inf)
        assert_single_pass(rec, out, val)
        return rec.scores(), out

    def same():
        (warm, out_warm), (cold, out_cold) = run(True), run(False)  # the warm-up before any Recorder
        moved = sorted(j for j in cold if warm[j] != cold[j])
        assert not moved and out_warm == out_cold, f"the warm-up changed the scores of targets {moved[:12]}"
    check(variant, same, "the warm-up changed")
