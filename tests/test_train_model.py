"""Model core of train_gpt.py on the CPU (SDPA backend, fp32): causality, sliding windows,
document isolation in packed rows (SmearGate BOS mask), layer plan / loop execution, the
small math pieces, and parameter roles."""
import inspect
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train_gpt as tg
from helpers_train import make_model, single_doc_cu, tiny_h


@pytest.fixture(autouse=True)
def _sdpa_backend():
    tg.use_attention_backend("sdpa", torch.device("cpu"))


def logits(model, ids, cu=None, looping=True):
    cu = single_doc_cu(ids.size(1)) if cu is None else cu
    with torch.no_grad():
        return model.head_logits(model.hidden(ids, cu, int(cu.diff().max()), looping=looping))


def changed_positions(a, b):
    """Positions (of a [1, T, V] pair) whose logits differ at all."""
    return set(torch.nonzero((a != b).any(-1)[0]).flatten().tolist())


# ---------------------------------------------------------------------------------------
# Causality
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("looping", [False, True])
@pytest.mark.parametrize("attn_gate", ["out", "sparse", "none"])
@pytest.mark.parametrize("mlp_act", ["xielu", "leaky_relu2"])
def test_future_tokens_never_change_past_logits(looping, attn_gate, mlp_act):
    # TINY: smear gate, local windows 8/16 + global layers, XSA, parallel lanes (layers 4, 5),
    # skips and a Parcae loop over layers 1..2; T=48 exceeds both windows.
    h = tiny_h(attn_gate=attn_gate, mlp_act=mlp_act)
    model = make_model(h, seed=3)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(4, h.vocab_size, (1, 48), generator=g)
    base = logits(model, ids, looping=looping)
    for t in (0, 17, 30, 46):
        other = ids.clone()
        other[0, t + 1:] = torch.randint(4, h.vocab_size, (47 - t,), generator=g)
        other[0, t + 1] = (ids[0, t + 1] + 1 - 4) % (h.vocab_size - 4) + 4  # surely different
        out = logits(model, other, looping=looping)
        assert torch.equal(out[0, :t + 1], base[0, :t + 1]), f"logits at positions <= {t} saw the future"
        assert not torch.equal(out[0, t + 1], base[0, t + 1])  # the change does reach the model


def test_loss_and_token_losses_match_logits():
    h = tiny_h()
    model = make_model(h, seed=4)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(4, h.vocab_size, (1, 40), generator=g)
    tgt = torch.randint(4, h.vocab_size, (1, 40), generator=g)
    tgt[0, 7] = -1  # ignored (padding)
    cu = torch.tensor([0, 13, 40], dtype=torch.int32)
    z = logits(model, ids, cu)
    assert z.shape == (1, 40, h.vocab_size) and z.dtype == torch.float32
    assert z.abs().max() < h.logit_softcap
    ref = F.cross_entropy(z[0], tgt[0], ignore_index=-1, reduction="none")
    with torch.no_grad():
        per_token = model.token_losses(ids, tgt, cu, 27)
        mean = model(ids, tgt, cu, 27)
    assert per_token.shape == (1, 40) and per_token[0, 7] == 0
    torch.testing.assert_close(per_token[0], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean, ref.sum() / 39, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Attention masks and sliding windows
# ---------------------------------------------------------------------------------------


def naive_attention(q, k, v, cu, window):
    """float64 loop reference: query i of a sequence attends keys j of the same sequence with
    i - window <= j <= i (no lower bound if window is None); head h uses kv head h // groups."""
    n, H, D = q.shape
    groups = H // k.size(1)
    out = torch.zeros(n, H, D, dtype=torch.float64)
    starts = cu.tolist()
    for s, e in zip(starts[:-1], starts[1:]):
        for i in range(s, e):
            lo = s if window is None else max(s, i - window)
            for hh in range(H):
                kk, vv = k[lo:i + 1, hh // groups].double(), v[lo:i + 1, hh // groups].double()
                w = torch.softmax(kk @ q[i, hh].double() / math.sqrt(D), 0)
                out[i, hh] = w @ vv
    return out


@pytest.mark.parametrize("bounds", [(0, 5, 6, 17, 23), (0, 5, 600, 1000)])  # the latter: windowed in query blocks
@pytest.mark.parametrize("window", [None, 0, 3, 100, 300])
def test_sdpa_attention_matches_naive_reference(window, bounds):
    g = torch.Generator().manual_seed(1)
    n, H, Hkv, D = bounds[-1], 4, 2, 8
    q, k, v = (torch.randn(n, h, D, generator=g) for h in (H, Hkv, Hkv))
    cu = torch.tensor(bounds, dtype=torch.int32)
    ref = naive_attention(q, k, v, cu, window)
    out = tg._attention_sdpa(q, k, v, cu, window)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(tg.attention(q, k, v, cu, torch.tensor([11]), tg.window_arg(window), 64), out)  # the CPU dispatch


def test_window_arg_is_a_plain_host_tensor_whatever_the_first_call_context():
    """window_arg's cached tensors serve every later call: one first made under inference_mode
    would make every training forward through pgolf::flash_attn fail (it is saved for backward)."""
    tg.host_int.cache_clear()
    with torch.inference_mode():
        w = tg.window_arg(123)
    assert not w.is_inference() and w.device.type == "cpu" and w.tolist() == [123] and w.dtype == torch.int32
    assert tg.window_arg(123) is w and tg.window_arg(None).tolist() == [-1]


def receptive_sets(model, T, vocab, sources):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(4, vocab, (1, T), generator=g)
    base = logits(model, ids)
    out = {}
    for s in sources:
        other = ids.clone()
        other[0, s] = (ids[0, s] + 1 - 4) % (vocab - 4) + 4
        out[s] = changed_positions(base, logits(model, other))
    return out


def test_one_local_layer_sees_exactly_window_previous_tokens():
    # One local layer, no smear gate: the MLP and head are per-position, so token s can only
    # reach the queries t with t - W <= s <= t.
    W, T = 5, 32
    h = tiny_h(num_layers=1, global_attn_layers=(), num_loops=0, parallel_start_layer=1, smear_gate=False,
               local_window_size_early=W, local_window_size_late=W, xsa_last_n=1)
    model = make_model(h, seed=6)
    for s, changed in receptive_sets(model, T, h.vocab_size, [0, 9, 20, 29]).items():
        assert changed == set(range(s, min(s + W + 1, T))), s


def test_two_local_layers_and_smear_gate_receptive_field():
    # Smear gate adds one position, each local layer W: token s reaches s .. s + 2W + 1.
    W, T = 4, 40
    h = tiny_h(num_layers=2, global_attn_layers=(), num_loops=0, parallel_start_layer=2,
               local_window_size_early=W, local_window_size_late=W, local_window_split=1)
    model = make_model(h, seed=7)
    for s, changed in receptive_sets(model, T, h.vocab_size, [0, 13, 30]).items():
        assert changed == set(range(s, min(s + 2 * W + 2, T))), s


def test_global_layer_sees_whole_prefix_and_early_late_windows_apply():
    h = tiny_h(num_layers=2, global_attn_layers=(1,), num_loops=0, parallel_start_layer=2, smear_gate=False)
    model = make_model(h, seed=8)
    T = 40
    for s, changed in receptive_sets(model, T, h.vocab_size, [0, 21]).items():
        assert changed == set(range(s, T))
    assert [tiny_h().layer_window(i) for i in range(6)] == [8, 8, None, 16, 16, None]
    assert [b.attn.window for b in make_model(tiny_h()).blocks] == [8, 8, None, 16, 16, None]


def test_global_layers_rotate_global_rope_dims_and_local_layers_every_dim():
    """GPT.rope gives (local, global) tables over the whole head (global ones the identity past
    GLOBAL_ROPE_DIMS), and hidden() gives every layer its kind's tables and its own window, as
    graph inputs (window_arg), in every pass."""
    h = tiny_h()
    model = make_model(h, seed=8)
    T, D = 12, h.model_dim // h.num_heads
    tables = model.rope(T, torch.device("cpu"))
    (cl, sl, pl), (cg, sg, pg) = tables
    assert [t.shape for t in (cl, sl, cg, sg)] == [(T, D)] * 4 and pl.shape == pg.shape == (D,)
    assert torch.equal(pl, torch.arange(D).roll(D // 2))  # rotate-half over the whole head
    G = h.global_rope_dims
    assert torch.equal(pg[G:], torch.arange(G, D)) and torch.equal(pg[:G], torch.arange(G).roll(G // 2))
    assert (cg[:, G:] == 1).all() and (sg[:, G:] == 0).all() and not (sg[1:, :G] == 0).any()
    seen = []
    hooks = [b.attn.register_forward_pre_hook(lambda m, a: seen.append((m, a[4], a[5]))) for b in model.blocks]
    calls = []
    real_rope = model.rope
    model.rope = lambda *a: calls.append(real_rope(*a)) or calls[-1]
    ids = torch.randint(4, h.vocab_size, (1, T))
    with torch.no_grad():
        model.hidden(ids, single_doc_cu(T), T)
    for hk in hooks:
        hk.remove()
    assert len(seen) == len(sum(h.layer_plan(True), [])) and len(calls) == 1
    for attn, rope, window in seen:
        assert rope is calls[0][attn.is_global]
        assert int(window) == (-1 if attn.window is None else attn.window)


# ---------------------------------------------------------------------------------------
# Document isolation in packed rows
# ---------------------------------------------------------------------------------------

DOC_LENGTHS = (9, 14, 1, 11, 13)  # includes a BOS-only document


def packed_row(vocab, seed=0):
    g = np.random.default_rng(seed)
    row = np.concatenate([np.concatenate([[tg.BOS_ID], g.integers(4, vocab, n - 1)]) for n in DOC_LENGTHS])
    starts = np.cumsum((0,) + DOC_LENGTHS)
    return row, starts


def doc_leaks(model, row, starts, k, cu, seed=0, looping=True):
    """Positions outside document k whose logits change when k's non-BOS tokens change."""
    ids = torch.from_numpy(row).view(1, -1)
    other = ids.clone()
    s, e = starts[k], starts[k + 1]
    g = torch.Generator().manual_seed(seed)
    other[0, s + 1:e] = (ids[0, s + 1:e] + torch.randint(1, model.h.vocab_size - 4, (e - s - 1,), generator=g) - 4) \
        % (model.h.vocab_size - 4) + 4
    a, b = logits(model, ids, cu, looping), logits(model, other, cu, looping)
    changed = changed_positions(a, b)
    inside = set(range(s, e))
    if e - s > 1:
        assert changed & inside, "the edit of document k must change its own logits"
    return changed - inside


@pytest.mark.parametrize("looping", [False, True])
def test_documents_in_a_packed_row_are_isolated(looping):
    h = tiny_h()
    model = make_model(h, seed=9)
    row, starts = packed_row(h.vocab_size)
    cu = torch.from_numpy(tg.packed_cu_seqlens(row, h.train_seq_len))
    assert cu.tolist() == starts.tolist()
    for k in range(len(DOC_LENGTHS)):
        if DOC_LENGTHS[k] > 1:
            assert doc_leaks(model, row, starts, k, cu, seed=k, looping=looping) == set(), f"document {k} leaked"


@pytest.mark.parametrize("looping", [False, True])
def test_empty_padding_sequences_change_nothing(looping):
    """Global SGD's CUDA graphs pad cu_seqlens with empty sequences at the row's end (fixed
    addresses): the loss and every gradient equal the unpadded row's, SmearGate included."""
    h = tiny_h()
    row, _ = packed_row(h.vocab_size)
    x, y = torch.from_numpy(row[:-1]).view(1, -1), torch.from_numpy(row[1:]).view(1, -1)
    cu = torch.from_numpy(tg.packed_cu_seqlens(row[:-1], h.train_seq_len))
    padded = torch.nn.functional.pad(cu, (0, 64 - cu.numel()), value=x.numel())
    out = []
    for c in (cu, padded):
        model = make_model(h, seed=4)
        loss = model(x, y, c, h.train_seq_len, looping)
        loss.backward()
        out.append((loss.detach(), [p.grad for p in model.parameters() if p.grad is not None]))
    (l0, g0), (l1, g1) = out
    assert torch.equal(l0, l1) and len(g0) == len(g1) and all(torch.equal(a, b) for a, b in zip(g0, g1))


def disable_smear_mask(monkeypatch):
    """Turn the SmearGate's document mask off while attention keeps the real cu_seqlens: embed
    sees a single sequence spanning the row (or, for a BOS-id based mask, BOS moved to an id
    that never occurs)."""
    orig = tg.GPT.embed
    if "cu_seqlens" in inspect.signature(orig).parameters:
        def embed(self, ids, cu_seqlens, *args, **kwargs):
            whole = torch.tensor([0, ids.numel()], dtype=torch.int32, device=ids.device)
            return orig(self, ids, whole, *args, **kwargs)

        monkeypatch.setattr(tg.GPT, "embed", embed)
    else:
        monkeypatch.setattr(tg, "BOS_ID", 10**6)


def test_smear_gate_mask_is_what_stops_the_leak_into_the_next_bos(monkeypatch):
    """The isolation check above can fail: with the SmearGate's BOS/sequence-start mask off, the
    previous document leaks into the next document's BOS position, and from there through
    attention into that whole document (and no further: the smear reads raw embeddings)."""
    h = tiny_h()
    model = make_model(h, seed=9)
    row, starts = packed_row(h.vocab_size)
    cu = torch.from_numpy(tg.packed_cu_seqlens(row, h.train_seq_len))
    disable_smear_mask(monkeypatch)
    leaks = doc_leaks(model, row, starts, 0, cu)
    assert starts[1] in leaks
    assert leaks == set(range(starts[1], starts[2]))
    assert doc_leaks(model, row, starts, 3, cu) == set(range(starts[4], starts[5]))


def test_smear_gate_is_off_exactly_at_sequence_starts():
    """e_t = E[t] + lambda*sigmoid(w.E[t][:gate_width])*E[t-1], except at every BOS (and, in the
    cu_seqlens form, every cut of a long document), where e_t = E[t]."""
    h = tiny_h(train_seq_len=8)
    model = make_model(h, seed=1)
    row = np.array([5, 6, 1, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 1, 17, 18])
    cu = tg.packed_cu_seqlens(row, h.train_seq_len)
    assert cu.tolist() == [0, 2, 10, 13, 16]
    ids = torch.from_numpy(row).view(1, -1)
    sig = inspect.signature(model.embed).parameters
    with torch.no_grad():
        e = model.embed(ids, torch.from_numpy(cu)) if "cu_seqlens" in sig else model.embed(ids)
        raw = model.tok_emb(ids)
        gate = torch.sigmoid(raw[..., :h.gate_width] @ model.smear_w.t())
        smeared = raw + model.smear_lambda * gate * F.pad(raw[:, :-1], (0, 0, 1, 0))
    for t in range(len(row)):
        off = t in (0, 2, 13) or (t == 10 and "cu_seqlens" in sig)
        torch.testing.assert_close(e[0, t], raw[0, t] if off else smeared[0, t], rtol=1e-6, atol=1e-7)
        if t > 0:
            assert not torch.allclose(raw[0, t], smeared[0, t])  # the smear is not negligible here


def test_attention_mask_is_what_stops_cross_document_attention():
    """With one sequence spanning the row (no cu_seqlens cuts) the edit does reach later documents."""
    h = tiny_h()
    model = make_model(h, seed=9)
    row, starts = packed_row(h.vocab_size)
    whole = torch.tensor([0, len(row)], dtype=torch.int32)
    leaks = doc_leaks(model, row, starts, 1, whole)
    assert leaks and min(leaks) == starts[2] and max(leaks) == len(row) - 1


def test_document_logits_do_not_depend_on_its_offset_in_the_row():
    """RoPE uses row positions, which is harmless only because attention is relative: a document
    scores the same at the start of a row and after other documents (up to rounding)."""
    h = tiny_h()
    model = make_model(h, seed=12)
    row, starts = packed_row(h.vocab_size, seed=3)
    doc = row[starts[3]:starts[4]]
    alone = logits(model, torch.from_numpy(doc).view(1, -1))
    cu = torch.from_numpy(tg.packed_cu_seqlens(row, h.train_seq_len))
    packed = logits(model, torch.from_numpy(row).view(1, -1), cu)[:, starts[3]:starts[4]]
    torch.testing.assert_close(packed, alone, rtol=0, atol=2e-4)


# ---------------------------------------------------------------------------------------
# Layer plan, loop execution, skips
# ---------------------------------------------------------------------------------------


def test_layer_plan_default_config():
    model = SimpleNamespace(h=tg.Hyperparameters())  # layer_plan only reads h; the full model is slow to build
    assert tg.GPT.layer_plan(model, False) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])
    assert tg.GPT.layer_plan(model, True) == ([0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10])
    model.h.num_loops = 1
    assert tg.GPT.layer_plan(model, True) == ([0, 1, 2, 3, 4, 5, 3], [4, 5, 6, 7, 8, 9, 10])


@pytest.mark.parametrize("looping", [False, True])
def test_forward_runs_blocks_in_layer_plan_order(looping):
    h = tiny_h()
    model = make_model(h)
    calls = []
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
    logits(model, torch.randint(4, h.vocab_size, (1, 20)), looping=looping)
    enc, dec = model.layer_plan(looping)
    assert calls == enc + dec
    assert (enc + dec) == ([0, 1, 2, 1, 2, 1, 2, 3, 4, 5] if looping else [0, 1, 2, 3, 4, 5])
    assert model.skip_weights.shape[0] == 5  # max over both plans of min(len(enc), len(dec))


def test_looping_changes_output_and_every_parameter_gets_a_gradient():
    h = tiny_h(xielu_learnable=True)
    model = make_model(h, seed=2)
    ids = torch.randint(4, h.vocab_size, (1, 40))
    cu = torch.tensor([0, 25, 40], dtype=torch.int32)
    model(ids, ids, cu, 25, looping=False).backward()
    loop_params = {"loop_log_a", "loop_delta", "loop_b"}
    for name, p in model.named_parameters():
        if name in loop_params:
            assert p.grad is None, name  # all_reduce_grads relies on this before looping is on
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    model.zero_grad(set_to_none=True)
    model(ids, ids, cu, 25).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert not torch.allclose(logits(model, ids, cu, looping=False), logits(model, ids, cu))


@pytest.mark.parametrize("residual_bf16", [False, True])
def test_residual_stream_dtype_under_autocast(residual_bf16):
    # RESIDUAL_BF16=1: under autocast every block (and the Parcae injection and skip merges, whose
    # fp32 control vectors would otherwise promote it) carries the stream in bf16; without it, fp32.
    # Either way the loss stays close to the fp32 model's and every parameter gets a gradient.
    h = tiny_h(residual_bf16=residual_bf16)
    model = make_model(h, seed=4)
    ids = torch.randint(4, h.vocab_size, (1, 40), generator=torch.Generator().manual_seed(5))
    cu = torch.tensor([0, 25, 40], dtype=torch.int32)
    stream = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, a, out: stream.extend(out if isinstance(out, tuple) else [out]))
        block.attn.register_forward_pre_hook(lambda m, a: stream.append(a[1]))  # x_in, the mixed attention input
    with torch.no_grad():
        ref = model(ids, ids, cu, 25)
    assert {t.dtype for t in stream} == {torch.float32}  # no autocast: fp32 whatever the flag
    stream.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, ids, cu, 25)
    expected = torch.bfloat16 if residual_bf16 else torch.float32
    assert len(stream) == sum(2 + model.blocks[i].parallel for i in sum(model.layer_plan(True), []))  # lanes: two
    assert {t.dtype for t in stream} == {expected}
    assert abs(loss.item() - ref.item()) < 0.05
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.dtype == torch.float32, name


def test_parcae_merge_skip_softcap_formulas():
    g = torch.Generator().manual_seed(0)
    x, x0, skip = (torch.randn(2, 3, 8, generator=g) for _ in range(3))
    log_a, delta, b, w, gate = (torch.randn(8, generator=g) for _ in range(5))
    dt = torch.log1p(torch.exp(delta))
    a = torch.exp(-dt * torch.exp(log_a))
    assert ((a > 0) & (a < 1)).all()
    torch.testing.assert_close(tg.parcae_inject(x, x0, log_a, delta, b), a * x + dt * b * x0, rtol=1e-6, atol=1e-6)
    s = torch.sigmoid(gate)
    torch.testing.assert_close(tg.merge_skip(x, skip, w, gate), s * x + (1 - s) * w * skip, rtol=1e-6, atol=1e-6)
    z = 100 * torch.randn(50, generator=g)
    capped = tg.softcap_logits(z, 30.0)
    torch.testing.assert_close(capped, 30 * torch.tanh(z / 30), rtol=1e-6, atol=1e-6)
    assert capped.abs().max() <= 30.0


def test_xielu_forms():
    h = torch.linspace(-3, 3, 101)
    torch.testing.assert_close(tg.xielu(h, torch.tensor(tg.LEAKY_RELU2)), F.leaky_relu(h, 0.5) ** 2,
                               rtol=1e-6, atol=1e-6)
    ap, an, bp, bn = tg.PARC_XIELU[3]
    ref = torch.where(h > 0, ap * h * h + bp * h, an * h * h + bn * h)
    torch.testing.assert_close(tg.xielu(h, torch.tensor(tg.PARC_XIELU[3])), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("setting, learnable, gpu, on", [
    ("auto", False, None, True), ("auto", True, None, False), ("auto", False, (9, 0), True),
    ("auto", False, (8, 0), False), ("1", False, (8, 0), True), ("0", False, None, False), ("0", True, None, False)])
def test_fused_mlp_auto_is_on_unless_the_coefficients_learn_or_the_gpu_lacks_tma(monkeypatch, setting, learnable,
                                                                                   gpu, on):
    if gpu is not None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: gpu)
    h = tiny_h(fused_mlp=setting, xielu_learnable=learnable)
    assert tg.fused_mlp_on(h) == on
    assert all(block.mlp.fused == on for block in make_model(h).blocks)


@pytest.mark.parametrize("mlp_act", ["xielu", "leaky_relu2"])
def test_fused_mlp_matches_the_module_path_in_loss_and_every_gradient(mlp_act):
    """FUSED_MLP=1 on the CPU runs xielu_mlp's torch reference through its own autograd (the
    backward formulas the Triton path shares): the same loss and gradients as the modules'."""
    ids = torch.randint(4, 128, (1, 40))
    cu = torch.tensor([0, 25, 40], dtype=torch.int32)
    results = []
    for fused in (False, True):
        model = make_model(tiny_h(mlp_act=mlp_act, fused_mlp="1" if fused else "0"), seed=2)
        with torch.no_grad():  # the zero-init down-projection would hide the up-projection's gradient
            for block in model.blocks:
                block.mlp.proj.weight.normal_(0, 0.05)
        loss = model(ids, ids, cu, 25)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    assert g0.keys() == g1.keys() and any(".mlp.fc." in n for n in g0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend, setting, on", [("varlen", "auto", True), ("fa3", "auto", False),
                                                   ("sdpa", "auto", False), ("fa3", "1", True), ("varlen", "0", False)])
def test_kv_repeat_auto_is_on_only_under_varlen(monkeypatch, backend, setting, on):
    """FA2 (varlen) sums grouped heads' dK/dV outside the graph; FA3 takes them natively."""
    monkeypatch.setattr(tg, "ATTENTION_BACKEND", backend)
    assert tg.kv_repeat_on(tiny_h(kv_repeat=setting).kv_repeat) == on


def test_kv_repeat_matches_grouped_attention_in_loss_and_every_gradient(monkeypatch):
    """KV_REPEAT=1 hands attention K and V repeated to the query heads (query head j reads K/V head
    j // group, FA2's and FA3's grouping): the same loss and gradients as the grouped call, the
    repeat's backward summing each group's dK and dV."""
    ids = torch.randint(4, 128, (1, 40))
    cu = torch.tensor([0, 25, 40], dtype=torch.int32)
    seen, attention = [], tg.attention
    monkeypatch.setattr(tg, "attention", lambda q, k, *a: seen.append(k.size(1)) or attention(q, k, *a))
    results = []
    for setting in ("0", "1"):
        model = make_model(tiny_h(kv_repeat=setting), seed=3)
        loss = model(ids, ids, cu, 25)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert set(seen[:len(seen) // 2]) == {2} and set(seen[len(seen) // 2:]) == {4}  # grouped, then repeated
    seen.clear()
    with torch.no_grad():  # no backward, no sum to fuse: a forward alone keeps the grouped heads
        model(ids, ids, cu, 25)
    assert seen and set(seen) == {2}
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    assert g0.keys() == g1.keys() and any(".attn.c_k." in n for n in g0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)


def test_per_layer_tables_stretch_with_depth():
    h11 = tg.Hyperparameters()
    assert [h11.layer_qk_gain(i) for i in range(11)] == list(tg.PARC_QK_GAINS)
    assert [h11.layer_xielu(i) for i in range(11)] == list(tg.PARC_XIELU)
    h6 = tiny_h()
    assert [h6.layer_qk_gain(i) for i in range(6)] == [tg.PARC_QK_GAINS[j] for j in (0, 2, 4, 6, 8, 10)]
    assert tiny_h(qk_gain_init=(1.5,)).layer_qk_gain(4) == 1.5
    assert tiny_h(qk_gain_init=(1, 2, 3, 4, 5, 6)).layer_qk_gain(4) == 5
    assert tiny_h(mlp_act="leaky_relu2").layer_xielu(3) == tg.LEAKY_RELU2
    model = tg.GPT(tiny_h())
    assert model.blocks[2].attn.q_gain.tolist() == [pytest.approx(tg.PARC_QK_GAINS[4])] * 4


def test_rotary_is_relative_and_norm_preserving():
    g = torch.Generator().manual_seed(0)
    T, D = 40, 16
    q, k = torch.randn(1, T, 2, D, generator=g), torch.randn(1, T, 2, D, generator=g)
    # the same vector at every position: scores may depend only on the offset
    q, k = q[:, :1].expand(1, T, 2, D), k[:, :1].expand(1, T, 2, D)
    for dims in (8, 16):
        tables = tg.rope_tables(T, D, dims, 10000.0, q.device)
        rq, rk = tg.apply_rotary(q, *tables), tg.apply_rotary(k, *tables)
        torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1), rtol=1e-5, atol=1e-5)
        assert torch.equal(rq[..., dims:], q[..., dims:])
        s = torch.einsum("bihd,bjhd->hij", rq, rk)
        for off in (0, 3, 17):
            diag = torch.diagonal(s, offset=-off, dim1=1, dim2=2)  # score(i + off, i)
            torch.testing.assert_close(diag, diag[:, :1].expand_as(diag), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(s[:, 5, 5], s[:, 5, 0])
    torch.testing.assert_close(tg.apply_rotary(q, *tg.rope_tables(T, D, 8, 10000.0, q.device))[:, 0], q[:, 0])  # position 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_equals_rotate_half_of_the_rotated_width_bit_for_bit(dtype):
    """x*cos + x[pair]*sin is the rotate-half formula (a*cos + b*sin, b*cos - a*sin, the rest
    unchanged) to the last bit, eager, forward and backward: the same math as before."""
    g = torch.Generator().manual_seed(3)
    T, D = 33, 16
    for dims in (4, 8, 16):
        x = torch.randn(2, T, 3, D, generator=g).to(dtype).requires_grad_()
        half = dims // 2
        pos = torch.arange(T, dtype=torch.float32)
        angles = torch.outer(pos, 10000.0 ** (-torch.arange(0, dims, 2, dtype=torch.float32) / dims))
        cos, sin = angles.cos()[None, :, None, :].to(dtype), angles.sin()[None, :, None, :].to(dtype)
        a, b, rest = x[..., :half], x[..., half:dims], x[..., dims:]
        ref = torch.cat([a * cos + b * sin, b * cos - a * sin, rest], dim=-1)
        out = tg.apply_rotary(x, *tg.rope_tables(T, D, dims, 10000.0, x.device))
        assert torch.equal(out, ref)
        grad = torch.randn(out.shape, generator=g).to(dtype)
        assert torch.equal(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(ref, x, grad)[0])


def test_parallel_layers_in_the_encoder_are_rejected():
    """A ParallelBlock in the encoder would be called with one tensor instead of its two lanes."""
    with pytest.raises(tg.ConfigError) as info:
        tiny_h(num_loops=0, parallel_start_layer=1)  # encoder is layers [0, 1, 2]
    assert str(info.value).startswith("PARALLEL_START_LAYER=")


# ---------------------------------------------------------------------------------------
# Parameter roles
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, dict(xielu_learnable=True, attn_gate="none", smear_gate=False, parcae=False)])
def test_every_parameter_has_an_optimizer_role(overrides):
    h = tiny_h(**overrides)
    model = tg.GPT(h)
    matrices = {id(m.weight) for m in model.modules() if isinstance(m, tg.CastedLinear)}
    assert len(matrices) == 6 * h.num_layers
    names = dict(model.named_parameters())
    for name, p in names.items():
        assert p.role in tg.OPTIMIZER_ROLES, name
        expected = "matrix" if id(p) in matrices else "token" if name == "tok_emb.weight" else "scalar"
        assert p.role == expected, name
        if p.role == "matrix":
            assert p.ndim == 2
    assert ("blocks.0.mlp.act_coeffs" in names) == h.xielu_learnable
    assert ("loop_b" in names) == h.parcae
    assert ("smear_w" in names) == h.smear_gate


def test_build_optimizers_assigns_each_parameter_once():
    h = tiny_h()
    model = tg.GPT(h)
    muon, adamw = tg.build_optimizers(model, h, 0, 1)
    assert isinstance(muon, tg.Muon) and isinstance(adamw, torch.optim.AdamW)
    muon_ids = [id(p) for p in muon.param_groups[0]["params"]]
    assert set(muon_ids) == {id(p) for p in model.parameters() if p.role == "matrix"}
    assert muon.param_groups[0]["lr"] == muon.param_groups[0]["base_lr"] == h.matrix_lr
    assert muon.param_groups[0]["weight_decay"] == h.muon_wd
    groups = {tuple(sorted({p.role for p in g["params"]})): g for g in adamw.param_groups}
    assert set(groups) == {("token",), ("scalar",)}
    assert [p is model.tok_emb.weight for p in groups[("token",)]["params"]] == [True]
    assert (groups[("token",)]["lr"], groups[("token",)]["weight_decay"]) == (h.tied_embed_lr, h.embed_wd)
    assert (groups[("scalar",)]["lr"], groups[("scalar",)]["weight_decay"]) == (h.scalar_lr, h.adam_wd)
    assert all(g["base_lr"] == g["lr"] for g in adamw.param_groups)
    every = muon_ids + [id(p) for g in adamw.param_groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in model.parameters())
    # Muon buckets stack same-shape matrices
    assert sum(len(v) for v in muon.buckets.values()) == len(muon_ids)
    assert all(p.shape == shape for shape, ps in muon.buckets.items() for p in ps)


@pytest.mark.parametrize("muon_compile", [False, True])
def test_muon_orthogonalises_eagerly_without_cuda(muon_compile):
    # MUON_COMPILE takes effect only with COMPILE=1 on CUDA (tests/test_gpu.py checks the compiled
    # path); on the CPU Muon calls the eager functions themselves.
    h = tiny_h(muon_compile=muon_compile, compile=True)
    muon = tg.build_optimizers(make_model(h), h, 0, 1)[0]
    assert muon.ortho == [tg.newton_schulz, tg.gram_newton_schulz]


def test_parameter_without_role_is_refused():
    h = tiny_h()
    model = tg.GPT(h)
    model.stray = nn.Parameter(torch.zeros(3))
    with pytest.raises(RuntimeError, match="stray"):
        tg.build_optimizers(model, h, 0, 1)


# ---------------------------------------------------------------------------------------
# Wiring of the U-Net skips, the Parcae loop, XSA and the gates
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("looping", [False, True])
def test_unet_skips_pair_last_encoder_output_with_first_decoder_slot(looping):
    h = tiny_h()
    model = make_model(h, seed=13)
    enc, dec = model.layer_plan(looping)
    outputs, merged = [], []
    for block in model.blocks:
        block.register_forward_hook(lambda m, a, out: outputs.append(out))
    orig = model.merge_skip
    model.merge_skip = lambda x, skip, w, g: merged.append(skip) or orig(x, skip, w, g)
    logits(model, torch.randint(4, h.vocab_size, (1, 24)), looping=looping)
    enc_out = outputs[:len(enc)]
    n = min(len(enc), len(dec), model.skip_weights.size(0))
    assert len(merged) == n
    for k, skip in enumerate(merged):
        assert skip is enc_out[len(enc) - 1 - k], k  # U-Net: last encoder output feeds the first decoder slot


def test_parcae_injection_runs_once_per_extra_loop_pass_and_truncates_backward():
    h = tiny_h(num_loops=2)
    model = make_model(h, seed=14)
    calls = []
    orig = model.parcae_inject
    model.parcae_inject = lambda *a: calls.append(1) or orig(*a)
    ids = torch.randint(4, h.vocab_size, (1, 24))
    logits(model, ids, looping=False)
    assert calls == []  # looping off
    base = logits(model, ids)
    assert len(calls) == h.num_loops  # passes 2 .. num_loops+1
    # LOOP_TRUNC_BWD only cuts the backward: same forward, different gradients
    grads = {}
    for trunc in (0, 1):
        model.h.loop_trunc_bwd = trunc
        model.zero_grad(set_to_none=True)
        model(ids, ids, single_doc_cu(24), 24).backward()
        grads[trunc] = model.blocks[0].attn.c_q.weight.grad.clone()
        assert torch.equal(logits(model, ids), base)
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 4), (4, 1)])
def test_xsa_removes_the_component_along_the_own_value_vector(heads, kv_heads):
    h = tiny_h(num_heads=heads, num_kv_heads=kv_heads, attn_gate="none")
    attn = make_model(h, seed=15).blocks[0].attn
    d, D, G = h.model_dim, h.model_dim // heads, heads // kv_heads
    with torch.no_grad():
        attn.proj.weight.copy_(torch.eye(d))
    T = 20
    u = torch.randn(1, T, d, generator=torch.Generator().manual_seed(0))
    pack = single_doc_cu(T), torch.tensor([T]), make_model(h, seed=15).rope(T, u.device)[0], tg.window_arg(attn.window)
    with torch.no_grad():
        attn.xsa = False
        plain = attn(u, u, *pack).view(1, T, heads, D)
        attn.xsa = True
        xsa = attn(u, u, *pack).view(1, T, heads, D)
        v = F.normalize(attn.c_v(u).view(1, T, kv_heads, D), dim=-1)
    vh = v.repeat_interleave(G, dim=2)  # head j reads kv head j // G
    expected = plain - (plain * vh).sum(-1, keepdim=True) * vh
    torch.testing.assert_close(xsa, expected, rtol=1e-5, atol=1e-6)
    assert (xsa * vh).sum(-1).abs().max() < 1e-5
    assert (plain * vh).sum(-1).abs().max() > 1e-2
    assert [b.attn.xsa for b in tg.GPT(tiny_h(xsa_last_n=2)).blocks] == [False] * 4 + [True] * 2


def test_attention_gates_at_initialisation():
    """gate_w starts at 0: the out gate is then the identity (2*sigmoid(0)), the sparse gate halves
    the attention output."""
    for gate in ("out", "sparse"):
        assert all(not b.attn.gate_w.any() for b in tg.GPT(tiny_h(attn_gate=gate)).blocks)
    u = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(1))
    pack = single_doc_cu(16), torch.tensor([16])
    attn = make_model(tiny_h(attn_gate="out"), seed=16).blocks[1].attn
    outs = {}
    with torch.no_grad():
        attn.gate_w.zero_()
        for gate in ("none", "out", "sparse"):
            attn.gate = gate
            outs[gate] = attn(u, u, *pack, tg.rope_tables(16, 16, 16, 10000.0, u.device), tg.window_arg(attn.window))
    assert outs["none"].abs().max() > 1e-3
    assert torch.equal(outs["out"], outs["none"])
    torch.testing.assert_close(outs["sparse"], 0.5 * outs["none"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_softcap_cross_entropy_reference_path_values_and_gradients(reduction):
    """The CPU path of the tied-head loss: CE of cap*tanh(z/cap) against a float64 formula, padding
    (-1) targets contribute nothing, and the mean is over the scored targets only."""
    g = torch.Generator().manual_seed(3)
    n, d, vocab, cap = 37, 16, 50, 5.0
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(vocab, d, generator=g, requires_grad=True)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[::4] = -1
    out = tg.softcap_cross_entropy(h, w, targets, cap, reduction)
    z = cap * torch.tanh((h.double() @ w.double().t()) / cap)
    keep = targets >= 0
    ref_rows = torch.zeros(n, dtype=torch.float64)
    ref_rows[keep] = torch.logsumexp(z[keep], -1) - z[keep, targets[keep]]
    ref = ref_rows.sum() / keep.sum() if reduction == "mean" else ref_rows
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    weights = torch.rand(out.shape, generator=g, dtype=torch.float64) if reduction == "none" else torch.ones(())
    grads = torch.autograd.grad((out.double() * weights).sum(), (h, w))
    hr, wr = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    zr = cap * torch.tanh((hr @ wr.t()) / cap)
    rows = torch.zeros(n, dtype=torch.float64)
    rows[keep] = torch.logsumexp(zr[keep], -1) - zr[keep, targets[keep]]
    loss_ref = (rows.sum() / keep.sum()) if reduction == "mean" else (rows * weights).sum()
    for a, b in zip(grads, torch.autograd.grad(loss_ref, (hr, wr))):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


def test_build_row_cuts_the_padding_tail_like_its_longest_window():
    """No packed sequence of an eval row is longer than its longest window (FA3 gets a fixed bound
    on the sequence length), and the padding scores nothing."""
    tokens = np.arange(1, 200, dtype=np.uint16)
    val = tg.ValSet(tokens, np.ones(len(tokens), dtype=np.int64))
    x, y, b, cu = tg.build_row(val, [(0, 30, 0), (50, 17, 5)], 256)
    assert cu[0] == 0 and cu[-1] == 256 and (np.diff(cu) > 0).all() and np.diff(cu).max() <= 30
    assert list(cu[:3]) == [0, 30, 47] and (y[47:] == -1).all() and b[47:].sum() == 0
