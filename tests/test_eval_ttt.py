"""Phased TTT's pieces (train_gpt.py): ttt_plan (the schedule), ttt_chunk (a chunk's host arrays)
and LoRABank's adapters by name. The legality of the whole (every target once, score before
update) is tests/test_eval_legality.py."""
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
    """TTT documents longest first in full batches (the last may be short), dealt round-robin;
    the long ones split over ranks; phase boundaries distinct, positive and within the prefix."""
    rng = np.random.default_rng(trial)
    spans = random_spans(rng, int(rng.integers(0, 60)), 90)
    h = make_h(tmp_path, ttt_batch_size=int(rng.integers(1, 9)), ttt_max_doc_tokens=int(rng.integers(1, 100)),
               phased_ttt_prefix_docs=int(rng.integers(0, 70)), phased_ttt_num_phases=int(rng.integers(0, 6)))
    plans = [tg.ttt_plan(spans, h, r, world_size) for r in range(world_size)]
    p = plans[0]
    short = [sp for sp in spans if sp[1] <= h.ttt_max_doc_tokens]
    assert p.docs == sorted(short, key=lambda sp: (-sp[1], sp[0]))
    assert sum(p.batches, []) == p.docs
    assert all(len(b) == h.ttt_batch_size for b in p.batches[:-1]) and all(p.batches)
    for q in plans:  # the same schedule on every rank
        assert (q.docs, q.batches, q.boundaries) == (p.docs, p.batches, p.boundaries)
    runs = Counter(bi for q in plans for bi, m in enumerate(q.mine) if m)
    assert runs == Counter(range(len(p.batches))), "every batch runs on exactly one rank"
    assert all(q.mine[bi] == (bi % world_size == r) for r, q in enumerate(plans) for bi in range(len(q.batches)))
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
    assert plan.mine == [False, True, False, True] and plan.boundaries == [2, 4]
    assert [n for _, n in plan.leftover] == [70]  # 45 is rank 0's


# ---------------------------------------------------------------------------------------
# ttt_chunk
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("C, W", [(4, 16), (5, 12), (48, 130), (7, 7)])
def test_ttt_chunk_rows_windows_and_weights(C, W):
    """Each document's chunk ci: targets ci*C+1.., their inputs at `pos` in a row that holds the
    document's last <= W tokens up to the chunk's end (nothing later, nothing of another
    document); every target valid once over the chunks; training weights the chunk's mean for a
    document with a later chunk; a lone document gets an unscored copy of its row."""
    val = make_val((12, 45, 30, 3, 1, 40, 20, 70, 9, 25, 16, 37, 33, 6, 300))
    spans = tg.document_spans(val.tokens)
    batch = [spans[i] for i in (14, 1, 3, 7, 4, 11)]  # not sorted: ttt_chunk must not rely on it
    scored = Counter()
    for ci in range(max(-(-n // C) for _, n in batch)):
        ch = tg.ttt_chunk(val, batch, ci, C, W)
        active = [b for b, (_, n) in enumerate(batch) if ci * C < n]
        assert list(ch.rows) == (active * 2 if len(active) == 1 else active)
        R, T = ch.x.shape
        assert T % 64 == 0 and ch.pos.shape == ch.targets.shape == ch.valid.shape == ch.weight.shape == (R, C)
        for r, b in enumerate(ch.rows):
            s, n = batch[b]
            e = min((ci + 1) * C, n)
            w0, k = max(0, e - W), e - ci * C
            assert np.array_equal(ch.x[r, :e - w0], val.tokens[s + w0:s + e]) and not ch.x[r, e - w0:].any()
            assert tg.BOS_ID not in ch.x[r, 1:e - w0]
            # the input at pos of target j is token j-1, and the row ends at the chunk's last input
            assert np.array_equal(ch.x[r, ch.pos[r, :k]], val.tokens[s + ci * C:s + e])
            if r >= len(active):  # the lone document's copy
                assert not (ch.valid[r].any() or ch.weight[r].any() or ch.nbytes[r].any())
                continue
            assert np.array_equal(ch.targets[r, :k], val.tokens[s + ci * C + 1:s + e + 1])
            assert np.array_equal(ch.valid[r], np.arange(C) < k)
            assert np.array_equal(ch.nbytes[r, :k], val.target_bytes[s + ci * C + 1:s + e + 1])
            assert not ch.nbytes[r, k:].any()
            assert ch.weight[r].sum() == pytest.approx(1.0 if e < n else 0.0)
            assert np.all(ch.weight[r][k:] == 0)
            scored.update(range(s + ci * C + 1, s + e + 1))
    assert scored == Counter(j for s, n in batch for j in range(s + 1, s + n + 1)), "every target once"


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

