"""Optimizer side of train_gpt.py: Polar-Express Newton-Schulz (plain and Gram form), Muon,
the LR schedule, the Trainer step and the EMA."""
import copy
import math

import numpy as np
import pytest
import torch

import train_gpt as tg
from helpers_train import make_model, tiny_h, write_shard


def polar(g):
    u, _, vt = torch.linalg.svd(g.double(), full_matrices=False)
    return u @ vt


# (A random square matrix has a near-zero singular value that 5 steps cannot lift into the band.)
@pytest.mark.parametrize("shape", [(256, 64), (64, 256), (96, 64), (48, 80)])
def test_newton_schulz_forms_are_near_orthogonal_and_agree(shape):
    g = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    ns, gram = tg.newton_schulz(g, 5), tg.gram_newton_schulz(g, 5)
    assert ns.shape == gram.shape == g.shape and ns.dtype == gram.dtype == torch.bfloat16
    for out in (ns, gram):
        for i in range(2):
            s = torch.linalg.svdvals(out[i].double())
            assert 0.5 <= s.min() and s.max() <= 1.5, (s.min(), s.max())  # Polar Express band
            cos = torch.nn.functional.cosine_similarity(out[i].double().flatten(), polar(g[i]).flatten(), dim=0)
            assert cos > 0.99
    assert (ns.double() - gram.double()).norm() / gram.double().norm() < 0.1


def test_newton_schulz_is_scale_invariant_and_batched_independently():
    g = torch.randn(3, 64, 16, generator=torch.Generator().manual_seed(1))
    for f in (tg.newton_schulz, tg.gram_newton_schulz):
        full = f(g, 5)
        for i in range(3):  # each matrix of the stack is orthogonalised on its own
            assert torch.equal(f(g[i:i + 1], 5)[0], full[i])
        scaled = f(1000 * g, 5).double()
        cos = torch.nn.functional.cosine_similarity(scaled.flatten(), full.double().flatten(), dim=0)
        assert cos > 0.99  # the bf16 iteration amplifies input rounding to a few percent
    # the Gram form iterates in fp32: scale invariant up to the final bf16 rounding
    full = tg.gram_newton_schulz(g, 5).double()
    assert (tg.gram_newton_schulz(1000 * g, 5).double() - full).norm() / full.norm() < 1e-3
    s = torch.linalg.svdvals(tg.newton_schulz(g, 1).double())
    assert s.max() > 1.5  # one step (a = 8.16) overshoots: `steps` really limits the iteration


def muon_reference(p, grads, lr, mu, wd, steps=5, ratio=3.0):
    """Muon by its definition, one matrix at a time: Nesterov momentum, row normalisation,
    Polar-Express orthogonalisation, decoupled weight decay, scale sqrt(max(1, rows/cols))."""
    p, buf = p.clone(), torch.zeros_like(p)
    rows, cols = p.shape
    f = tg.gram_newton_schulz if max(rows, cols) >= ratio * min(rows, cols) else tg.newton_schulz
    for g in grads:
        buf = mu * buf + g
        u = g + mu * buf
        u = u / u.norm(dim=-1, keepdim=True)
        o = f(u[None], steps)[0].float()
        p = p * (1 - lr * wd) - lr * math.sqrt(max(1.0, rows / cols)) * o
    return p


def test_muon_matches_its_definition_over_two_steps(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    shapes = [(64, 16), (16, 32), (64, 16), (24, 24)]  # tall (Gram form), wide, same bucket, square
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]
    start = [p.detach().clone() for p in params]
    grads = [[torch.randn(*s, generator=gen) for _ in range(2)] for s in shapes]
    lr, mu, wd = 0.02, 0.9, 0.1
    calls = []
    for name in ("newton_schulz", "gram_newton_schulz"):
        f = getattr(tg, name)
        monkeypatch.setattr(tg, name, lambda g, steps, f=f, name=name: calls.append((name, tuple(g.shape))) or f(g, steps))
    opt = tg.Muon(params, lr=lr, momentum=mu, weight_decay=wd, backend_steps=5, gram_ratio=3.0)
    assert sorted(map(len, opt.buckets.values())) == [1, 1, 2]
    for k in range(2):
        for p, g in zip(params, grads):
            p.grad = g[k].clone()
        opt.step()
    assert sorted(set(calls)) == [("gram_newton_schulz", (2, 64, 16)), ("newton_schulz", (1, 16, 32)),
                                  ("newton_schulz", (1, 24, 24))]
    monkeypatch.undo()
    for p, p0, g in zip(params, start, grads):
        ref = muon_reference(p0, g, lr, mu, wd)
        # bf16 orthogonalisation: one bf16 ulp of a ~1 entry, times lr * scale
        torch.testing.assert_close(p.detach(), ref, rtol=0, atol=lr * 2 * 1e-2)
        assert (p.detach() - p0).norm() > 10 * (p.detach() - ref).norm()


def test_muon_zero_gradient_is_pure_decoupled_weight_decay():
    p = torch.nn.Parameter(torch.randn(32, 8, generator=torch.Generator().manual_seed(3)))
    p0 = p.detach().clone()
    p.grad = torch.zeros_like(p)
    tg.Muon([p], lr=0.1, momentum=0.95, weight_decay=0.5, backend_steps=5, gram_ratio=3.0).step()
    assert torch.equal(p.detach(), p0.mul(1 - 0.1 * 0.5))


def test_muon_update_scale_for_tall_matrices():
    """With wd=0 the update of a 4:1 matrix is lr*2*O (sqrt(rows/cols)), of a wide one lr*O."""
    gen = torch.Generator().manual_seed(4)
    for shape, scale in (((64, 16), 2.0), ((16, 64), 1.0)):
        p = torch.nn.Parameter(torch.zeros(*shape))
        p.grad = torch.randn(*shape, generator=gen)
        tg.Muon([p], lr=0.01, momentum=0.0, weight_decay=0.0, backend_steps=5, gram_ratio=3.0).step()
        s = torch.linalg.svdvals(p.detach().double()) / (0.01 * scale)
        assert 0.5 <= s.min() and s.max() <= 1.5


@pytest.mark.parametrize("frac, expected", [
    (0.0, 1.0), (0.3, 1.0), (0.4999, 1.0), (0.5, 1.0), (0.6, 0.8), (0.75, 0.5), (0.9, 0.2),
    (0.95, 0.1), (0.99, 0.1), (1.0, 0.1), (1.3, 0.1)])
def test_lr_multiplier_constant_then_linear_warmdown_to_min_lr(frac, expected):
    h = tg.Hyperparameters(warmdown_frac=0.5, min_lr=0.1)
    assert tg.lr_multiplier(frac, h) == pytest.approx(expected, abs=1e-12)


def test_lr_multiplier_edge_cases():
    assert tg.lr_multiplier(0.99, tg.Hyperparameters(warmdown_frac=0.0, min_lr=0.1)) == 1.0
    full = tg.Hyperparameters(warmdown_frac=1.0, min_lr=0.0)
    assert [tg.lr_multiplier(f, full) for f in (0.0, 0.25, 1.0)] == pytest.approx([1.0, 0.75, 0.0])
    h = tg.Hyperparameters()  # defaults: 0.85 warmdown, floor 0.1, non-increasing and continuous
    fracs = np.linspace(0, 1, 2001)
    vals = [tg.lr_multiplier(f, h) for f in fracs]
    assert all(a >= b for a, b in zip(vals, vals[1:])) and max(abs(np.diff(vals))) < 1e-3
    assert vals[0] == 1.0 and vals[-1] == h.min_lr


def test_ema_shadow_by_hand():
    h = tiny_h()
    model = make_model(h, seed=5)
    ema = tg.EMA(model, 0.9)
    params = list(model.parameters())
    expected = [p.detach().double().clone() for p in params]
    gen = torch.Generator().manual_seed(6)
    for t in range(3):
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=gen))
        ema.update()
        d = min(0.9, (1 + t) / (10 + t))  # the ramp binds for t < 80 at decay 0.9
        expected = [d * e + (1 - d) * p.detach().double() for e, p in zip(expected, params)]
    last = [p.detach().clone() for p in params]
    for s, e in zip(ema.shadow, expected):
        assert s.dtype == torch.float32
        torch.testing.assert_close(s.double(), e, rtol=1e-6, atol=1e-6)
    ema.apply()
    for p, s, e, q in zip(params, ema.shadow, expected, last):
        assert torch.equal(p.detach(), s)
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-6, atol=1e-6)
        assert not torch.equal(p.detach(), q)
    # the shadow is a copy taken at construction, not an alias of the parameters
    ema2 = tg.EMA(model, 0.5)
    with torch.no_grad():
        params[0].add_(1.0)
    assert not torch.equal(ema2.shadow[0], params[0].detach())


def test_ema_decay_zero_follows_the_parameters():
    model = make_model(tiny_h(), seed=7)
    ema = tg.EMA(model, 0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-2.0)
    ema.update()
    assert all(torch.equal(s, p.detach()) for s, p in zip(ema.shadow, model.parameters()))


def test_trainer_step_schedule_and_returned_loss(tmp_path):
    h = tiny_h(log_dir=str(tmp_path / "logs"), run_id="t", muon_momentum_warmup_steps=10, warmdown_frac=0.5,
               train_batch_tokens=256, micro_batches=2, train_seq_len=64)
    rng = np.random.default_rng(0)
    stream = rng.integers(4, h.vocab_size, 5000)
    stream[::50] = tg.BOS_ID
    files = [str(write_shard(tmp_path / "fineweb_train_000000.bin", stream))]
    rt = tg.Runtime(h)
    model = make_model(h, seed=8)
    model.train()
    before = copy.deepcopy(model)
    ref_loader = tg.DocumentPackingLoader(files, h.micro_tokens, h.train_seq_len, 0, 1, rt.device)
    ref = []
    with torch.no_grad():
        for _ in range(h.grad_accum_steps):
            x, y, cu, m = ref_loader.next_batch()
            ref.append(float(before(x, y, cu, m)))
    trainer = tg.Trainer(model, h, rt)
    loader = tg.DocumentPackingLoader(files, h.micro_tokens, h.train_seq_len, 0, 1, rt.device)
    loss = trainer.step(loader, 5, 0.75, True)
    assert float(loss) == pytest.approx(sum(ref) / len(ref), rel=1e-6)
    muon, adamw = trainer.optimizers
    assert muon.param_groups[0]["momentum"] == pytest.approx(0.5 * h.muon_momentum_warmup_start + 0.5 * h.muon_momentum)
    assert muon.param_groups[0]["lr"] == pytest.approx(0.5 * h.matrix_lr)
    assert sorted(g["lr"] for g in adamw.param_groups) == pytest.approx(sorted([0.5 * h.tied_embed_lr, 0.5 * h.scalar_lr]))
    assert all(p.grad is None for p in model.parameters())
    for (name, p), q in zip(model.named_parameters(), before.parameters()):
        assert not torch.equal(p, q), f"{name} was not updated"
    # the loader consumed exactly grad_accum_steps pieces
    assert torch.equal(loader.next_batch()[0], ref_loader.next_batch()[0])
    # momentum warmup is complete after MUON_MOMENTUM_WARMUP_STEPS
    trainer.step(loader, 20, 0.0, True)
    assert muon.param_groups[0]["momentum"] == h.muon_momentum and muon.param_groups[0]["lr"] == h.matrix_lr


def test_all_reduce_grads_averages_over_ranks_and_skips_missing_grads():
    """Two ranks holding gradients g and 3g must both end with 2g; parameters without a gradient
    (the loop parameters before looping starts) stay without one."""
    from types import SimpleNamespace

    params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(5))]
    grads = [torch.randn(3, 2), None, torch.randn(5)]
    for p, g in zip(params, grads):
        p.grad = g.clone() if g is not None else None
    # the SUM all-reduce over two ranks whose gradients are g and 3g
    rt = SimpleNamespace(distributed=True, world_size=2, all_reduce=lambda t, op="sum": t.mul_(4.0))
    tg.all_reduce_grads(params, rt)
    torch.testing.assert_close(params[0].grad, 2 * grads[0])
    torch.testing.assert_close(params[2].grad, 2 * grads[2])
    assert params[1].grad is None
    single = SimpleNamespace(distributed=False, world_size=1, all_reduce=None)
    tg.all_reduce_grads(params, single)  # no-op on one process
    torch.testing.assert_close(params[0].grad, 2 * grads[0])


def test_training_stops_before_a_step_would_overrun_the_budget(tmp_path, monkeypatch):
    """With a clock that advances 1 s per step and a 5.5 s budget, training must stop at 5 s
    (5 steps): the next step is predicted from the last one. Stopping only once the budget is
    passed ran to 6 s, past the cap by most of a step."""
    h = tiny_h(log_dir=str(tmp_path / "logs"), run_id="t", train_batch_tokens=256, micro_batches=2,
               train_seq_len=64, iterations=100)
    rng = np.random.default_rng(1)
    stream = rng.integers(4, h.vocab_size, 5000)
    stream[::50] = tg.BOS_ID
    files = [str(write_shard(tmp_path / "fineweb_train_000000.bin", stream))]
    rt = tg.Runtime(h)
    clock = iter(range(1000))
    monkeypatch.setattr(tg.time, "perf_counter", lambda: float(next(clock)))
    val = tg.ValSet(stream[:100].astype(np.uint16), np.ones(100, dtype=np.int64))
    steps, train_ms = tg.train_model(make_model(h, seed=2), h, rt, files, val, budget_s=5.5)
    assert (steps, train_ms) == (5, 5000.0)


class FixedLoader:
    """next_batch() always returns the same packed row."""

    def __init__(self, h, seed=0):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(4, h.vocab_size, (1, h.micro_tokens + 1), generator=g)
        self.batch = ids[:, :-1], ids[:, 1:], torch.tensor([0, h.micro_tokens], dtype=torch.int32), h.micro_tokens

    def next_batch(self):
        return self.batch


def test_trainer_clips_the_gradient(tmp_path):
    """GRAD_CLIP_NORM bounds the global gradient norm: at 1e-12 the AdamW updates (scale-aware
    through eps) shrink to almost nothing, while without clipping they are of the size of the LR."""
    tg.use_attention_backend("sdpa", torch.device("cpu"))
    moved = {}
    for clip in (0.0, 1e-12):
        h = tiny_h(grad_clip_norm=clip, embed_wd=0.0, log_dir=str(tmp_path), run_id="clip")
        model = make_model(h, seed=1).train()
        before = model.tok_emb.weight.detach().clone()
        tg.Trainer(model, h, tg.Runtime(h)).step(FixedLoader(h), 0, 0.0, False)
        moved[clip] = (model.tok_emb.weight.detach() - before).abs().max().item()
    assert moved[0.0] > 0.5 * tiny_h().tied_embed_lr
    assert moved[1e-12] < 1e-2 * moved[0.0], moved


def test_train_model_leaves_the_ema_weights_for_quantization(tmp_path, monkeypatch):
    """After train_model the model holds the EMA average (what GPTQ quantizes), not the last raw weights."""
    tg.use_attention_backend("sdpa", torch.device("cpu"))
    seen = {}

    class SpyEMA(tg.EMA):
        def apply(self):
            seen["raw"] = [p.detach().clone() for p in self.params]
            seen["shadow"] = [s.clone() for s in self.shadow]
            super().apply()

    monkeypatch.setattr(tg, "EMA", SpyEMA)
    h = tiny_h(iterations=4, ema_decay=0.5, log_dir=str(tmp_path), run_id="ema")
    files = [write_shard(tmp_path / "fineweb_train_000000.bin",
                         np.random.default_rng(0).integers(4, h.vocab_size, 4000))]
    model = make_model(h, seed=2).train()
    steps, _ = tg.train_model(model, h, tg.Runtime(h), [str(f) for f in files], None, 0.0)
    assert steps == 4 and seen, "train_model never applied the EMA"
    params = [p.detach() for p in model.parameters()]
    assert all(torch.equal(p, s) for p, s in zip(params, seen["shadow"]))
    assert any((p - r).abs().max() > 1e-4 for p, r in zip(params, seen["raw"]))


@pytest.mark.parametrize("setting, capture, world, micro_tokens, on", [
    ("auto", True, 1, 32768, True),  # the one-GPU proxy's 32K micro-batches: graphs paid
    ("auto", True, 1, 32768 + 64, False),  # just past the limit
    ("auto", True, 1, 98304, False),  # an 8-GPU run's: they paid nothing and ran out of 79 GiB
    ("auto", True, 2, 32768, False),  # several ranks: not yet run on NCCL
    ("auto", False, 1, 32768, False),  # CPU or SDPA: nothing to capture
    ("0", True, 1, 32768, False),
    ("1", True, 2, 98304, True),
    ("1", False, 1, 98304, True),  # forced where nothing captures: the padded plain steps
])
def test_train_cuda_graph_auto_turns_graphs_on_where_they_paid(monkeypatch, setting, capture, world, micro_tokens, on):
    monkeypatch.setattr(tg, "can_capture", lambda rt: capture)
    monkeypatch.setattr(tg, "MicroStepGraphs", lambda model, h, capture: type("Graphs", (), {"capture": True})())
    h = tiny_h(train_cuda_graph=setting, train_batch_tokens=8 * micro_tokens, micro_batches=8)
    rt = type("FakeRuntime", (), {"world_size": world})()
    assert tg.train_cuda_graph_on(h, rt) is on
    assert (tg.micro_step_graphs(torch.nn.Linear(2, 2), h, rt) is not None) is on


def test_micro_step_graphs_pad_the_packing_and_train_as_plain_steps(tmp_path):
    """TRAIN_CUDA_GRAPH=1 off the GPU (no capture): every micro-batch runs on its shape's fixed inputs,
    cu_seqlens padded with empty sequences to a power of two (>= 64) and the longest sequence rounded up to
    one, its gradients summed into buffers kept across steps. Losses and weights equal plain steps', the
    loop's parameters stay untouched before the loop is on, and train_model drops the graphs at its end."""
    tg.use_attention_backend("sdpa", torch.device("cpu"))
    base = dict(log_dir=str(tmp_path / "logs"), run_id="g", train_batch_tokens=256, micro_batches=2, train_seq_len=64)
    rng = np.random.default_rng(3)
    stream = rng.integers(4, tiny_h().vocab_size, 6000)
    stream[rng.random(6000) < 1 / 30] = tg.BOS_ID  # rows of differing sequence counts share a padded shape
    files = [str(write_shard(tmp_path / "fineweb_train_000000.bin", stream))]
    runs = {}
    for graphs in (False, True):
        h = tiny_h(train_cuda_graph="1", **base) if graphs else tiny_h(**base)  # auto: off on the CPU
        rt = tg.Runtime(h)
        model = make_model(h, seed=5).train()
        runs[graphs] = (model, tg.Trainer(model, h, rt), tg.new_train_loader(h, rt, files))
    plain, graphed = runs[False][0], runs[True][0]
    loop_params = [n for n, _ in graphed.named_parameters() if n.startswith("loop_")]
    assert loop_params and runs[False][1].graphs is None
    loop_init = {n: p.detach().clone() for n, p in graphed.named_parameters() if n in loop_params}
    for step, looping in enumerate([False, False, True, True]):
        losses = [float(trainer.step(loader, step, 0.0, looping)) for _, trainer, loader in runs.values()]
        assert losses[0] == losses[1], (step, losses)
        for (name, p), q in zip(graphed.named_parameters(), plain.parameters()):
            assert torch.equal(p, q), (step, name)
            assert p.grad is None, name
        if not looping:
            assert all(torch.equal(getattr(graphed, n), loop_init[n]) for n in loop_params)
    assert not all(torch.equal(getattr(graphed, n), loop_init[n]) for n in loop_params)  # trained once looping
    keys = graphed.step_graphs.graphs
    assert {k[0] for k in keys} == {False, True} and len(keys) >= 2
    for (looping, shape, n_cu, m), (graph, (sx, sy, scu, sm), loss) in keys.items():
        assert graph is None and loss is None and sm == m and shape == sx.shape == (1, 128)
        assert n_cu == scu.numel() == 64 and m in (16, 32, 64)
    # the last micro-batch's padded row: its real sequences, then empty ones at the end of the row
    x, y, cu, max_len = tg.DocumentPackingLoader(files, 128, 64, 0, 1, torch.device("cpu")).next_batch()
    graphed.step_graphs.run(x, y, cu, max_len, False, True)
    scu = graphed.step_graphs.graphs[(False, x.shape, 64, 1 << (max_len - 1).bit_length())][1][2]
    assert torch.equal(scu[:cu.numel()], cu) and (scu[cu.numel():] == 128).all() and cu.numel() < 64
    h = tiny_h(train_cuda_graph="1", iterations=2, **base)
    model = make_model(h, seed=5).train()
    assert tg.train_model(model, h, tg.Runtime(h), files, None, 0.0)[0] == 2 and model.step_graphs is None
    assert "train_cuda_graph: no CUDA graphs here" in (tmp_path / "logs" / "g.txt").read_text()
