"""Phased TTT's pieces (train_gpt.py): ttt_plan (the schedule), ttt_chunk (a chunk's host arrays),
LoRABank's adapters by name, and TTT through the compiled block graphs on the CPU: after the
warm-up (random tokens) no chunk shape compiles anything, and the scores are the eager ones.
The legality of the whole (every target once, score before update) is tests/test_eval_legality.py."""
import contextlib
import functools
import math
from collections import Counter

import numpy as np
import pytest
import torch

import train_gpt as tg
from test_eval_legality import V, make_h, make_model, make_val


@pytest.fixture(autouse=True)
def _cpu_env():
    tg.use_attention_backend("sdpa", torch.device("cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_spans(rng, n_docs, longest):
    lengths = rng.integers(1, longest, n_docs)
    starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
    return [(int(s), int(n)) for s, n in zip(starts, lengths)]


# ---------------------------------------------------------------------------------------
# ttt_plan
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("trial", range(6))
def test_ttt_plan_partitions_the_documents(tmp_path, world_size, trial):
    """TTT documents longest first in full batches (the last may be short) of TTT_BATCH_SIZE, or k <=
    TTT_BATCH_GROW times that where k rows of the batch's longest fit in one TTT_EVAL_SEQ_LEN,
    dealt to ranks by predicted work (each to the least loaded so far: no rank ends more than one
    batch's work over another); the long ones split over ranks; phase boundaries distinct, positive
    and within the prefix."""
    rng = np.random.default_rng(trial)
    spans = random_spans(rng, int(rng.integers(0, 120)), 300)
    W = int(rng.choice([16, 128, 256, 512]))
    h = make_h(tmp_path, ttt_batch_size=int(rng.integers(1, 9)), ttt_max_doc_tokens=int(rng.integers(1, 300)),
               phased_ttt_prefix_docs=int(rng.integers(0, 70)), phased_ttt_num_phases=int(rng.integers(0, 6)),
               ttt_eval_seq_len=W, ttt_batch_grow=int(rng.integers(1, 5)))
    plans = [tg.ttt_plan(spans, h, r, world_size) for r in range(world_size)]
    p = plans[0]
    short = [sp for sp in spans if sp[1] <= h.ttt_max_doc_tokens]
    assert p.docs == sorted(short, key=lambda sp: (-sp[1], sp[0]))
    assert sum(p.batches, []) == p.docs and all(p.batches)
    for i, b in enumerate(p.batches):
        row = -(-min(b[0][1], W) // 64) * 64
        k = max(1, min(h.ttt_batch_grow, W // row))
        assert len(b) == k * h.ttt_batch_size or i == len(p.batches) - 1 and len(b) <= k * h.ttt_batch_size
        assert k == 1 or len(b) * row <= h.ttt_batch_size * W  # the longest rows' memory bound
    for q in plans:  # the same schedule on every rank
        assert (q.docs, q.batches, q.boundaries) == (p.docs, p.batches, p.boundaries)
    runs = Counter(bi for q in plans for bi, m in enumerate(q.mine) if m)
    assert runs == Counter(range(len(p.batches))), "every batch runs on exactly one rank"
    cost = [tg.ttt_batch_work(b, *h.ttt_chunking) + W * max(tg.ttt_n_chunks(n, *h.ttt_chunking) for _, n in b)
            for b in p.batches]
    loads = [sum(c for c, m in zip(cost, q.mine) if m) for q in plans]
    assert max(loads) - min(loads) <= max(cost, default=0), "balanced to within one batch"
    for bi in range(len(p.batches)):  # each batch to the least loaded rank so far (the lowest on a tie)
        before = [sum(c for c, m in zip(cost[:bi], q.mine) if m) for q in plans]
        assert plans[before.index(min(before))].mine[bi]
    left = [sp for q in plans for sp in q.leftover]
    assert sorted(left) == sorted(sp for sp in spans if sp[1] > h.ttt_max_doc_tokens), "long documents once each"
    prefix = min(h.phased_ttt_prefix_docs, len(p.docs))
    b = p.boundaries
    assert b == sorted(set(b)) and all(0 < x <= prefix for x in b) and len(b) <= h.phased_ttt_num_phases
    assert (b[-1] == prefix) if prefix and h.phased_ttt_num_phases else not b


def test_ttt_plan_of_the_legality_stream(tmp_path):
    val = make_val()
    plan = tg.ttt_plan(tg.document_spans(val.tokens), make_h(tmp_path), 1, 2)
    assert [[n for _, n in b] for b in plan.batches] == [[40, 37, 33], [30, 25, 20], [16, 12, 9], [5, 3, 1]]  # the last document has one target less
    # row tokens + W per step: 1,856 + 16 x 10, 1,344 + 16 x 8, 704 + 16 x 4, 320 + 16 x 2: batch 2 joins
    # rank 1 (1,472 < 2,016), batch 3 rank 0 (2,016 < 2,240)
    assert plan.mine == [False, True, True, False] and plan.boundaries == [2, 4]
    assert [n for _, n in plan.leftover] == [70]  # 45 is rank 0's


@pytest.mark.parametrize("trial", range(8))
def test_ttt_batch_work_counts_the_chunks_row_tokens(trial):
    """ttt_batch_work (phased_ttt's cost ratio between batches) is the sum of ttt_chunk's row
    shapes over the batch's chunks."""
    rng = np.random.default_rng(trial)
    C, W = int(rng.choice([4, 32, 48])), int(rng.choice([64, 128, 2048]))
    C2 = int(rng.choice([C, 2 * C, 3]))  # TTT_LONG_CHUNK_SIZE
    tail = (int(rng.integers(0, 3 * W)), int(rng.choice([0, 5, C2 + 1, W])))  # TTT_MAX_DOC_TOKENS, TTT_TAIL_CHUNK_SIZE
    lengths = sorted(rng.integers(1, 3 * W, int(rng.integers(1, 9))).tolist(), reverse=True)
    tokens = rng.integers(4, V, sum(lengths) + len(lengths) + 1)
    val = tg.ValSet(tokens, np.zeros(len(tokens), dtype=np.int64))
    starts = np.cumsum([0] + [n + 1 for n in lengths[:-1]])
    batch = [(int(s), n) for s, n in zip(starts, lengths)]
    n_chunks = tg.ttt_n_chunks(lengths[0], C, W, C2, tail)
    rows = sum(tg.ttt_chunk(val, batch, ci, C, W, C2, tail).x.size for ci in range(n_chunks))
    assert tg.ttt_batch_work(batch, C, W, C2, tail) == rows
    last = tg.ttt_chunk_span(n_chunks - 1, C, W, C2, tail)
    assert last[0] < lengths[0] <= last[1]


# ---------------------------------------------------------------------------------------
# ttt_chunk
# ---------------------------------------------------------------------------------------


def chunk_spans(n, C, W, C2, tail=(0, 0)):
    """The spec of ttt_chunk_span, walked: a chunk that starts inside the first window holds C
    targets, one that starts past it C2, or with a tail (T0, C3 > 0) C3 once it starts at or past T0."""
    spans, start = [], 0
    while start < n:
        size = C if start < W else tail[1] if tail[1] and start >= tail[0] else C2
        spans.append((start, start + size))
        start += size
    return spans


@pytest.mark.parametrize("C, W, C2, tail", [(4, 16, 4, (0, 0)), (5, 12, 5, (0, 0)), (48, 130, 48, (0, 0)),
                                            (7, 7, 7, (0, 0)), (4, 16, 9, (0, 0)), (5, 12, 2, (0, 0)),
                                            (48, 130, 96, (0, 0)), (4, 16, 9, (40, 13)), (5, 12, 2, (20, 7)),
                                            (48, 130, 96, (200, 130)), (4, 16, 4, (0, 6)), (5, 12, 3, (13, 1))])
def test_ttt_chunk_rows_windows_and_weights(C, W, C2, tail):
    """Each document's chunk ci: its targets (C of them while the chunk starts inside the first
    window, C2 = TTT_LONG_CHUNK_SIZE after, C3 = TTT_TAIL_CHUNK_SIZE from TTT_MAX_DOC_TOKENS on), their inputs at `pos` in a row that holds the
    document's last <= W tokens up to the chunk's end (nothing later, nothing of another
    document); every target valid once over the chunks; training weights the chunk's mean for a
    document with a later chunk; a lone document gets an unscored copy of its row."""
    val = make_val((12, 45, 30, 3, 1, 40, 20, 70, 9, 25, 16, 37, 33, 6, 300))
    spans = tg.document_spans(val.tokens)
    batch = [spans[i] for i in (14, 1, 3, 7, 4, 11)]  # not sorted: ttt_chunk must not rely on it
    longest = max(n for _, n in batch)
    assert [tg.ttt_chunk_span(ci, C, W, C2, tail) for ci in range(tg.ttt_n_chunks(longest, C, W, C2, tail))] == \
        chunk_spans(longest, C, W, C2, tail)
    assert all(tg.ttt_n_chunks(n, C, W, C2, tail) == len(chunk_spans(n, C, W, C2, tail)) for n in range(1, 320))
    scored = Counter()
    for ci, (c0, c1) in enumerate(chunk_spans(longest, C, W, C2, tail)):
        ch = tg.ttt_chunk(val, batch, ci, C, W, C2, tail)
        active = [b for b, (_, n) in enumerate(batch) if c0 < n]
        assert list(ch.rows) == (active * 2 if len(active) == 1 else active)
        R, T = ch.x.shape
        assert T % 64 == 0 and ch.pos.shape == ch.targets.shape == ch.valid.shape == ch.weight.shape == (R, c1 - c0)
        for r, b in enumerate(ch.rows):
            s, n = batch[b]
            e = min(c1, n)
            w0, k = max(0, e - W), e - c0
            assert np.array_equal(ch.x[r, :e - w0], val.tokens[s + w0:s + e]) and not ch.x[r, e - w0:].any()
            assert tg.BOS_ID not in ch.x[r, 1:e - w0]
            # the input at pos of target j is token j-1, and the row ends at the chunk's last input
            assert np.array_equal(ch.x[r, ch.pos[r, :k]], val.tokens[s + c0:s + e])
            if r >= len(active):  # the lone document's copy
                assert not (ch.valid[r].any() or ch.weight[r].any() or ch.nbytes[r].any())
                continue
            assert np.array_equal(ch.targets[r, :k], val.tokens[s + c0 + 1:s + e + 1])
            assert np.array_equal(ch.valid[r], np.arange(c1 - c0) < k)
            assert np.array_equal(ch.nbytes[r, :k], val.target_bytes[s + c0 + 1:s + e + 1])
            assert not ch.nbytes[r, k:].any()
            assert ch.weight[r].sum() == pytest.approx(1.0 if e < n else 0.0)
            assert np.all(ch.weight[r][k:] == 0)
            scored.update(range(s + c0 + 1, s + e + 1))
    assert scored == Counter(j for s, n in batch for j in range(s + 1, s + n + 1)), "every target once"


def test_ttt_row_bucket_few_lengths_within_1_5x():
    """TTT_CUDA_GRAPH's row lengths: whole 64-token tiles, at least the row, at most 1.5x it (2x
    up to 256), at most the window: 10 lengths for every row up to 2,048."""
    for W in (2048, 2000, 130, 64):
        top = -(-W // 64) * 64
        buckets = {tg.ttt_row_bucket(T, W) for T in range(64, top + 1, 64)}
        for T in range(64, top + 1, 64):
            b = tg.ttt_row_bucket(T, W)
            assert b % 64 == 0 and T <= b <= top and (b <= 1.5 * T or b <= 2 * T <= 512)
        assert max(buckets) == top
    assert sorted({tg.ttt_row_bucket(T, 2048) for T in range(64, 2049, 64)}) == \
        [64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]


def test_pad_chunk_adds_only_unscored_untrained_tokens():
    val = make_val((12, 45, 30, 3, 1, 40, 20, 70, 9, 25, 16, 37, 33, 6, 300))
    spans = tg.document_spans(val.tokens)
    batch = [spans[i] for i in (14, 1, 7)]
    ch = tg.ttt_chunk(val, batch, 9, 5, 130, 5)  # documents 0 and 1 have a chunk 9
    p = tg.pad_chunk(ch, 4, 192)
    R, T = ch.x.shape
    assert p.x.shape == (4, 192) and all(a.shape == (4, 5) for a in p[2:])
    assert list(p.rows) == list(ch.rows) + [ch.rows[0]] * (4 - R)
    assert np.array_equal(p.x[:R, :T], ch.x) and not p.x[:, T:].any() and not p.x[R:].any()
    for a, b in zip(p[2:], ch[2:]):
        assert np.array_equal(a[:R], b) and not a[R:].any()


def test_padded_ttt_steps_score_and_adapt_as_the_plain_ones(tmp_path, monkeypatch):
    """TTT_CUDA_GRAPH=1's StepGraphs without capture (the CPU: the padded shapes its graphs use, run plain):
    rows padded to the batch's bank size or a power of two and to ttt_row_bucket lengths, over
    batches, phases, a grown batch and a lone document; the scores are the unpadded run's."""
    h = make_h(tmp_path, ttt_batch_size=6, ttt_eval_seq_len=400, ttt_max_doc_tokens=400, ttt_chunk_size=16,
               ttt_batch_grow=2, phased_ttt_prefix_docs=8, phased_ttt_num_phases=2)
    val = make_val((330, 260, 200, 150, 140, 90, 70, 45, 40, 37, 33, 30, 25, 20, 16, 12, 9, 5, 3, 1))
    shapes, plain_shapes = Counter(), Counter()
    step = tg.ttt_step

    def spy(model, bank, opt, inputs, view, train, sums):
        (shapes if h.ttt_cuda_graph else plain_shapes)[inputs[1].shape, bank.n_docs] += 1
        return step(model, bank, opt, inputs, view, train, sums)
    monkeypatch.setattr(tg, "ttt_step", spy)
    assert tg.ttt_step_graphs(h, tg.Runtime(h)) is None  # no capture on the CPU: plain steps, no padding
    monkeypatch.setattr(tg, "ttt_step_graphs", lambda h_, rt: tg.StepGraphs(capture=False) if h_.ttt_cuda_graph else None)
    out = {}
    for graphed in (False, True):
        h.ttt_cuda_graph = graphed
        model = make_model(h)
        torch.manual_seed(1234)
        out[graphed] = tg.phased_ttt(model, h, tg.Runtime(h), val, math.inf)
    assert sum(shapes.values()) == sum(plain_shapes.values())
    assert {s[0][1] for s in shapes} == {64, 128, 192, 256, 384} and 320 in {s[0][1] for s in plain_shapes}
    assert any(s[0][0] > r[0][0] for s in shapes for r in plain_shapes), "no row was padded"
    assert out[True][2] == out[False][2] == len(val.tokens) - 1
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-6)
    assert out[True][1] == pytest.approx(out[False][1], rel=1e-6)


def test_step_graphs_capture_only_host_bound_steps(monkeypatch):
    """StepGraphs with capture (CUDA faked): a shape is captured the second time it comes and
    replayed after; the first capturable step warms the side stream; a step over max_tokens row
    tokens (GPU-bound; its graph's memory overflowed an H100) always runs plain."""
    events = []

    class FakeGraph:
        def capture_begin(self, pool=None):
            events.append("begin")

        def capture_end(self):
            events.append("end")

        def replay(self):
            events.append("replay")
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    graphs = tg.StepGraphs(capture=True)
    monkeypatch.setattr(graphs, "on_side", lambda fn: events.append("side") or fn())

    def run(rows, T):
        chunk = tg.TTTChunk(np.zeros(rows, dtype=np.int64), np.zeros((rows, T), dtype=np.int64),
                            *(np.zeros((rows, 4), dtype=np.int64) for _ in range(5)))
        events.clear()
        graphs.run((rows, T), chunk, lambda inputs: events.append("step"), torch.device("cpu"))
        return list(events)
    big = graphs.max_tokens // 64 + 64
    assert [run(64, big) for _ in range(3)] == [["step"]] * 3  # never captured, not even on the side stream
    assert run(64, 512) == ["side", "step"]  # 32,768 row tokens: capturable; the first warms the side stream
    assert run(64, 512) == ["side", "begin", "step", "end", "replay"]
    assert run(64, 512) == ["replay"]
    assert run(64, 64) == ["step"]  # a new shape: plain the first time (the side stream is warm)
    assert run(64, 64) == ["side", "begin", "step", "end", "replay"]
    assert run(64, big) == ["step"]


@pytest.mark.parametrize("warm_a", [True, False])
def test_ttt_reset_is_a_fresh_bank_and_optimizer_on_the_same_tensors(tmp_path, warm_a):
    """phased_ttt keeps one bank and optimizer while the batch size holds (StepGraphs replays on
    their addresses): after ttt_reset B is zero, A is kept (warm) or drawn as a new bank draws it,
    and the next batch adapts exactly as with a fresh optimizer."""
    h = make_h(tmp_path, ttt_batch_size=2)
    val = make_val()
    spans = tg.document_spans(val.tokens)
    model = make_model(h).requires_grad_(False)
    rt = tg.Runtime(h)
    n_slots = len(sum(model.layer_plan(True), []))
    torch.manual_seed(0)
    bank = tg.LoRABank(2, n_slots, h)
    opt = tg.ttt_optimizer(bank, h, rt)
    sums = torch.zeros(3, dtype=torch.float64)
    tg.ttt_batch(model, [spans[5], spans[2]], val, bank, opt, h, sums)
    trained_a = [a.detach().clone() for a in bank.a.values()]
    ptrs = [p.data_ptr() for p in bank.parameters()] + [t.data_ptr() for st in opt.state.values() for t in st.values()]
    rng = torch.get_rng_state()
    tg.ttt_reset(bank, opt, warm_a=warm_a)
    assert ptrs == [p.data_ptr() for p in bank.parameters()] + \
        [t.data_ptr() for st in opt.state.values() for t in st.values()]
    assert all(not b.any() for b in bank.b.values())
    torch.set_rng_state(rng)
    drawn = tg.LoRABank(2, n_slots, h)  # what a new bank would draw here
    for a, t, d in zip(bank.a.values(), trained_a, drawn.a.values()):
        assert torch.equal(a, t if warm_a else d)
    fresh = tg.LoRABank(2, n_slots, h)
    fresh.load_state_dict({**{f"a.{k}": a for k, a in zip(bank.a.keys(), trained_a if warm_a else drawn.a.values())},
                           **{f"b.{k}": torch.zeros_like(b) for k, b in bank.b.items()}})
    for b in (bank, fresh):
        tg.ttt_batch(model, [spans[11], spans[12]], val, b, opt if b is bank else tg.ttt_optimizer(fresh, h, rt), h, sums)
    for p, q in zip(bank.parameters(), fresh.parameters()):
        assert torch.equal(p, q)


def test_first_batch_after_a_global_sgd_phase_draws_new_adapters(tmp_path, monkeypatch):
    """With warm-started A (the default), every batch on a kept bank keeps A except the first one
    after a global SGD phase: fresh adapters on the adapted base, as a new bank would have."""
    h = make_h(tmp_path, ttt_warm_start_a=True, phased_ttt_prefix_docs=9, phased_ttt_num_phases=2)
    calls, reset = [], tg.LoRABank.reset
    monkeypatch.setattr(tg.LoRABank, "reset", lambda self, warm_a: calls.append(("reset", warm_a)) or reset(self, warm_a))
    sgd = tg.global_sgd
    monkeypatch.setattr(tg, "global_sgd", lambda *a: calls.append(("sgd",)) or sgd(*a))
    torch.manual_seed(1234)
    tg.phased_ttt(make_model(h), h, tg.Runtime(h), make_val(), math.inf)
    # batches [40 37 33] [30 25 20] [16 12 9] [5 3 1] on one bank; phases over 4 and 9 documents run
    # once those are scored: after the second and the third batch
    assert calls == [("reset", False), ("reset", True), ("sgd",), ("reset", False), ("sgd",), ("reset", False)]


# ---------------------------------------------------------------------------------------
# LoRABank: adapters by name
# ---------------------------------------------------------------------------------------


def test_lora_bank_selects_adapters_by_name(tmp_path):
    h = make_h(tmp_path)
    model = make_model(h)
    n_slots = len(sum(model.layer_plan(True), []))
    bank = tg.LoRABank(3, n_slots, h)
    with torch.no_grad():
        for b in bank.b.values():
            b.normal_()
    idx = torch.tensor([2, 0])
    slots, head = bank.select(idx)
    d, r, kv = h.model_dim, h.ttt_lora_rank, h.num_kv_heads * h.model_dim // h.num_heads
    outs = dict(q=d, k=kv, v=kv, o=d, mlp=d)
    assert len(slots) == n_slots
    for s, ad in enumerate(slots):
        assert isinstance(ad, tg.Adapters) and ad.attn == (ad.q, ad.k, ad.v, ad.o)
        for name in tg.Adapters._fields:
            a, b = getattr(ad, name)
            assert a.shape == (2, r, d) and b.shape == (2, outs[name], r)
            assert torch.equal(a, bank.a[f"{s}_{name}"][idx])
            assert torch.equal(b, bank.b[f"{s}_{name}"][idx] * h.ttt_lora_alpha / r)
    assert head[1].shape == (2, V, r) and torch.equal(head[0], bank.a["head"][idx])
    # every named adapter is wired into the forward: its B alone moves the hidden states
    ids = torch.randint(4, V, (2, 24), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, 24, 48], dtype=torch.int32)
    with torch.no_grad():
        base = model.hidden(ids, cu, 24)
        for name in tg.Adapters._fields:
            bank.reset(warm_a=True)
            bank.b[f"0_{name}"].normal_()
            assert not torch.equal(model.hidden(ids, cu, 24, bank.select(idx)[0]), base), name


def test_lora_bank_holds_only_the_ttt_lora_targets(tmp_path):
    """TTT_LORA_TARGETS=k,o,mlp,head (PR #1953's no_qv): the bank holds those adapters only and
    hands None (no update) for q and v."""
    h = make_h(tmp_path, ttt_lora_targets="k,o,mlp,head")
    bank = tg.LoRABank(3, 2, h)
    assert sorted(bank.a.keys()) == sorted(f"{s}_{n}" for s in range(2) for n in ("k", "o", "mlp")) + ["head"]
    slots, head = bank.select(torch.tensor([2, 0]))
    assert all(a.q is None and a.v is None and a.k[0].shape == (2, h.ttt_lora_rank, h.model_dim) for a in slots)
    assert head is not None and tg.LoRABank(3, 2, make_h(tmp_path, ttt_lora_targets="q")).select(None)[1] is None


@pytest.mark.parametrize("targets, through_blocks", [("head", False), ("mlp,head", True), ("q", True)])
def test_ttt_backward_reaches_the_blocks_only_with_their_adapters(tmp_path, targets, through_blocks):
    """On the frozen model, TTT's hidden states need a graph only where a block has an adapter:
    with the head's alone the backward stops at the head."""
    h = make_h(tmp_path, ttt_lora_targets=targets)
    model = make_model(h).requires_grad_(False)
    bank = tg.LoRABank(2, len(sum(model.layer_plan(True), [])), h)
    ids = torch.randint(4, V, (2, 24))
    hid = model.hidden(ids, torch.tensor([0, 24, 48], dtype=torch.int32), 24, bank.select(None)[0])
    assert hid.requires_grad == through_blocks


def test_lora_bank_all_documents_are_views_equal_to_the_gather(tmp_path):
    """select(None) (every document of the batch in the chunk, in order) gives the adapters of
    select(arange): the same forward and the same gradients in the bank, without gathers."""
    h = make_h(tmp_path)
    model = make_model(h)
    bank = tg.LoRABank(2, len(sum(model.layer_plan(True), [])), h)
    with torch.no_grad():
        for b in bank.b.values():
            b.normal_()
    ids = torch.randint(4, V, (2, 24), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, 24, 48], dtype=torch.int32)
    out = []
    for idx in (None, torch.arange(2)):
        slots, head = bank.select(idx)
        assert all(t.grad_fn is not None and not isinstance(t, torch.nn.Parameter) for ad in slots for t in ad.q)
        model.head_logits(model.hidden(ids, cu, 24, slots), head).square().mean().backward()
        out.append([p.grad.clone() for p in bank.parameters()])
        bank.zero_grad()
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(*out))


def test_ttt_forward_gives_the_first_block_a_grad_tracking_input(tmp_path):
    """Under TTT (frozen model, adapters) every block's input tracks grad, the first one's too:
    compiled graphs are specialized on requires_grad, so one without would compile its own graph."""
    h = make_h(tmp_path)
    model = make_model(h).requires_grad_(False)
    bank = tg.LoRABank(2, len(sum(model.layer_plan(True), [])), h)
    seen = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda m, args: seen.append(args[0][0].requires_grad if m.parallel
                                                                    else args[0].requires_grad))
    ids = torch.randint(4, V, (2, 24), generator=torch.Generator().manual_seed(0))
    model.hidden(ids, torch.tensor([0, 24, 48], dtype=torch.int32), 24, bank.select(None)[0])
    assert seen and all(seen), seen


# ---------------------------------------------------------------------------------------
# Compiled TTT: one graph per block for every chunk shape
# ---------------------------------------------------------------------------------------


def dense_attention(q, k, v, cu_seqlens, max_len, window, bound):
    """SDPA with one mask over the row built from cu_seqlens on the device: the reference SDPA
    path reads cu_seqlens on the host (a graph break per block, and shapes the compiled code would
    specialize on); this one traces like the GPU's attention ops."""
    pos = torch.arange(q.size(0), device=q.device)
    seq = torch.searchsorted(cu_seqlens[1:].long(), pos, right=True)
    delta = pos[:, None] - pos[None, :]
    mask = (seq[:, None] == seq[None, :]) & (delta >= 0)
    mask &= (delta <= window.to(delta.device)) | (window.to(delta.device) < 0)  # window_arg: a host tensor, -1 for none
    groups = q.size(1) // k.size(1)
    q, k, v = (t.transpose(0, 1) for t in (q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(0, 1)


# Chunks of 32 in windows of up to 192: rows of 64, 128 and 192 tokens, 1 to 3 documents (a lone
# one padded to 2), and long documents (> 260 targets) left to the windows. CPU inductor guards
# the row length at 256 (its C++ reductions), so windows stay below that here.
COMPILED = dict(ttt_chunk_size=32, ttt_eval_seq_len=192, ttt_max_doc_tokens=260, eval_seq_len=64,
                val_batch_tokens=128, global_ttt_chunk_tokens=128, global_ttt_seq_len=64, phased_ttt_prefix_docs=4)
COMPILED_LENGTHS = (200, 37, 150, 300, 95, 12, 64, 130, 5, 40)


def test_layers_share_one_compiled_graph_per_block_kind(tmp_path, monkeypatch):
    """Windows and RoPE tables are inputs of the block graphs (window_arg, rope_tables), not
    constants: a training step of the tiny model (early, late and global windows in sequential and
    parallel blocks) and TTT's warm-up compile one graph per block kind, not one per window."""
    import torch._dynamo.utils as dyn

    h = make_h(tmp_path, **COMPILED)
    monkeypatch.setattr(tg, "attention", dense_attention)
    code = []

    def backend(gm, example_inputs):
        code.append(gm)
        return gm

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    torch._dynamo.reset()
    dyn.counters.clear()
    try:
        model = make_model(h).train()
        rt = tg.Runtime(h)
        rt.compile = True
        model.compile_regions()
        assert {b.attn.window for b in model.blocks} == {8, 16, None}
        kinds = {type(b) for b in model.blocks}
        ids = torch.randint(4, h.vocab_size, (1, 64))
        model(ids, ids, torch.tensor([0, 30, 64], dtype=torch.int32), 34).backward()
        training = dyn.counters["stats"]["unique_graphs"]
        model.eval()
        with tg.ttt_compile_mode(h, rt):
            tg.ttt_warmup(model, h, rt)
    finally:
        torch._dynamo.reset()
    assert not dyn.counters["graph_break"], dict(dyn.counters["graph_break"])
    blocks = [gm for gm in code if sum(n.op == "placeholder" for n in gm.graph.nodes) > 10]  # the small ones: merge_skip...
    assert training == len(kinds) + 3  # + merge_skip, parcae_inject and the loss
    assert len(blocks) == 2 * len(kinds)  # training's, then TTT's (dynamic shapes, adapters)


# TAIL: the 300-token document adapted too, its last chunk (targets 257..300) 96 long (TTT_TAIL_CHUNK_SIZE)
TAIL = dict(ttt_max_doc_tokens=200, ttt_tail_chunk_size=96)


@pytest.mark.parametrize("backend, tail", [("aot_eager", {}), ("inductor", {}), ("aot_eager", TAIL)])
def test_compiled_ttt_recompiles_nothing_after_the_warmup(tmp_path, monkeypatch, backend, tail):
    """The evaluation's order on a compiled model: the quantized diagnostic, the TTT warm-up on
    random tokens, then phased TTT (chunks of every shape, global SGD, the leftovers' windows)
    under fail_on_recompile: nothing compiles after the warm-up, no graph breaks, and the score
    equals the eager model's."""
    import torch._dynamo.utils as dyn

    h = make_h(tmp_path, **dict(COMPILED, **tail))
    val = make_val(COMPILED_LENGTHS)
    monkeypatch.setattr(tg, "attention", dense_attention)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    torch._dynamo.reset()
    dyn.counters.clear()
    scores = {}
    try:
        for compiled in (False, True):
            model = make_model(h)
            rt = tg.Runtime(h)
            rt.compile = compiled
            if compiled:
                model.compile_regions()
            tg.eval_val(model, h, rt, val)  # evaluate_artifact's diagnostic: the eval graphs
            with tg.ttt_compile_mode(h, rt):
                if compiled:
                    tg.ttt_warmup(model, h, rt)
                    graphs = dyn.counters["stats"]["unique_graphs"]
                torch.manual_seed(1234)
                with torch.compiler.set_stance("fail_on_recompile" if compiled else "default"):
                    scores[compiled] = tg.phased_ttt(model, h, rt, val, math.inf)
    finally:
        torch._dynamo.reset()
    assert not dyn.counters["graph_break"], dict(dyn.counters["graph_break"])
    assert dyn.counters["stats"]["unique_graphs"] == graphs
    assert scores[True][2] == scores[False][2] == len(val.tokens) - 1
    assert scores[True][0] == pytest.approx(scores[False][0], rel=1e-4)


def test_ttt_compile_mode(tmp_path):
    """TTT_COMPILE=1: the dynamic sources while TTT runs (and only then), pointwise autotuning as
    TTT_AUTOTUNE says; 0: eager; no compiled model: nothing changes."""
    import torch._dynamo.eval_frame as ef
    import torch._inductor.config as ic

    rt = tg.Runtime(make_h(tmp_path))
    before = torch.compiler.config.dynamic_sources, "default", ic.triton.autotune_pointwise
    assert before[2]
    for compiled, ttt_compile, autotune, inside in ((True, True, True, (tg.TTT_DYNAMIC_SOURCES, "default", True)),
                                                    (True, True, False, (tg.TTT_DYNAMIC_SOURCES, "default", False)),
                                                    (True, False, False, (before[0], "force_eager", True)),
                                                    (False, True, False, before)):
        rt.compile = compiled
        with tg.ttt_compile_mode(make_h(tmp_path, ttt_compile=ttt_compile, ttt_autotune=autotune), rt):
            assert (torch.compiler.config.dynamic_sources, ef._stance.stance, ic.triton.autotune_pointwise) == inside
        assert (torch.compiler.config.dynamic_sources, ef._stance.stance, ic.triton.autotune_pointwise) == before


@pytest.mark.parametrize("mode", ["windows", "attention"])
@pytest.mark.parametrize("ttt_compile", [False, True])
def test_leftover_windows_run_compiled_under_ttt_compile_0(tmp_path, monkeypatch, ttt_compile, mode):
    """TTT_COMPILE=0 makes TTT's steps eager (force_eager), not the leftovers' sliding windows:
    those run the eval graphs the diagnostic compiled. Any other stance around TTT (the tests'
    fail_on_recompile) still holds for them. SLIDING_MODE=attention runs them eager either way."""
    import torch._dynamo.eval_frame as ef

    h = make_h(tmp_path, ttt_compile=ttt_compile, sliding_mode=mode)
    rt = tg.Runtime(h)
    rt.compile = True
    stances, real = [], tg.eval_windows
    monkeypatch.setattr(tg, "eval_windows", lambda *a, **k: stances.append(ef._stance.stance) or real(*a, **k))
    outer = torch.compiler.set_stance("eager_on_recompile") if ttt_compile else contextlib.nullcontext()
    with tg.ttt_compile_mode(h, rt), outer:
        tg.phased_ttt(make_model(h), h, rt, make_val(), math.inf)
    assert stances == ["force_eager" if mode == "attention" else "default" if not ttt_compile else "eager_on_recompile"]


@pytest.mark.parametrize("sgd_compile", [True, False])
def test_global_sgd_runs_eager_with_global_ttt_compile_0(tmp_path, monkeypatch, sgd_compile):
    """GLOBAL_TTT_COMPILE=0: global SGD's forward runs under the force_eager stance (none of its
    graphs compiles), then the stance is back; 1: the stance it was called in. The steps are the
    same either way."""
    import torch._dynamo.eval_frame as ef

    h = make_h(tmp_path, global_ttt_compile=sgd_compile, global_ttt_chunk_tokens=64)
    rt = tg.Runtime(h)
    model, stances = make_model(h), []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: stances.append(ef._stance.stance) or forward(*a, **k))
    before = [p.detach().clone() for p in model.parameters()]
    tg.global_sgd(model, make_val().tokens[:257], h, rt)
    assert stances == ["default" if sgd_compile else "force_eager"] * 4
    assert ef._stance.stance == "default"
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


# ---------------------------------------------------------------------------------------
# evaluate_artifact: the warm-up inside the timer, one line of stage times
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ttt_compile", [True, False])
def test_evaluate_artifact_warms_up_before_ttt_and_logs_each_stage(tmp_path, monkeypatch, ttt_compile):
    """On a compiled run: load, quantized diagnostic, TTT warm-up (TTT_COMPILE=1) and phased TTT
    under ttt_compile_mode, then the sliding diagnostic on a reload; `eval_stages:` gives each
    stage's seconds and the documents scored by TTT and by windows."""
    import torch._dynamo.eval_frame as ef

    from helpers_train import parse_train_log

    h = make_h(tmp_path, ttt_compile=ttt_compile)
    val = make_val()
    rt = tg.Runtime(h)
    rt.compile = True  # the model is not compiled: only the modes around TTT are checked
    calls = []

    def spy(name, fn):
        def call(*args, **kwargs):
            calls.append((name, torch.compiler.config.dynamic_sources, ef._stance.stance))
            return fn(*args, **kwargs)
        monkeypatch.setattr(tg, name, call)

    monkeypatch.setattr(tg, "load_artifact_model", lambda h_, rt_: calls.append(("load", "", "")) or make_model(h_))
    for name in ("eval_val", "ttt_warmup", "phased_ttt"):
        spy(name, getattr(tg, name))
    tg.evaluate_artifact(h, rt, val)
    mode = (tg.TTT_DYNAMIC_SOURCES, "default") if ttt_compile else ("", "force_eager")
    expect = [("load", "", ""), ("eval_val", "", "default")] + [("ttt_warmup", *mode)] * ttt_compile + \
        [("phased_ttt", *mode), ("load", "", ""), ("eval_val", "", "default")]
    assert calls == expect
    r = parse_train_log((tmp_path / "logs" / "legality.txt").read_text())
    stages = r["eval_stages"]
    assert list(stages) == ["load", "quantized"] + ["ttt_warmup"] * ttt_compile + \
        ["ttt", "leftover", "sliding", "total", "ttt_docs", "fallback_docs"]
    assert stages["ttt_docs"] + stages["fallback_docs"] == r["ttt"]["total_docs"] == len(tg.document_spans(val.tokens))
    assert stages["fallback_docs"] == r["ttt"]["leftover_docs"] == r["ttt"]["long_docs_sliding"] == 2
    seconds = [v for k, v in stages.items() if k not in ("total", "ttt_docs", "fallback_docs")]
    assert min(seconds) >= 0 and sum(seconds) <= stages["total"] + 0.5 and stages["total"] == r["total_eval_s"]
