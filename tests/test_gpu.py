"""GPU-only checks (skipped without CUDA): the fused softcapped cross-entropy and the attention
backends against float64 / SDPA references, compiled training, Muon and TTT without graph breaks or recompiles.
Run on the device: python3 -m pytest -q tests/test_gpu.py"""
import pytest
import torch

import train_gpt as tg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def perturbed_gpt(h, eval_model=False):
    """GPT(h) on the CPU (seed 1) with its matrices moved off the zero init, so every block contributes;
    eval_model: its MLPs unfused, as the artifact's model (load_artifact_model) that the eval runs."""
    torch.manual_seed(1)
    model = tg.GPT(h).unfuse_mlp() if eval_model else tg.GPT(h)
    with torch.no_grad():
        for p in model.parameters():
            if p.role == "matrix":
                p.add_(torch.randn_like(p) * 0.02)
    return model


def random_packed(n_seq, max_len, heads=8, kv_heads=4, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len, (n_seq,), generator=g)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).int().cuda()
    n = int(lengths.sum())
    q, k, v = (torch.randn(n, h, d, generator=g).cuda().bfloat16().requires_grad_() for h in (heads, kv_heads, kv_heads))
    return q, k, v, cu, int(lengths.max())


def packed_batch():
    """2048 tokens with a BOS every 300, packed into documents of at most 256 tokens."""
    torch.manual_seed(0)
    ids = torch.randint(2, 512, (1, 2048), device="cuda")
    ids[0, ::300] = tg.BOS_ID
    return ids, torch.from_numpy(tg.packed_cu_seqlens(ids[0].cpu().numpy(), 256)).cuda()


def loss_and_grads(model, ids, cu):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, torch.roll(ids, -1, 1), cu, 256)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def assert_same_loss_and_grads(results):
    (l0, g0), (l1, g1) = results
    assert abs(l0.item() - l1.item()) < 1e-2 * abs(l0.item())
    assert len(g0) == len(g1)
    assert rel_err(torch.cat([g.flatten() for g in g1]), torch.cat([g.flatten() for g in g0])) < 5e-2


@pytest.mark.parametrize("fused_mlp", ["0", "1"], ids=["unfused_mlp", "fused_mlp"])
def test_compiled_model_matches_eager(fused_mlp):
    """Regional compilation must not change the function: compare loss and grads (either MLP path)."""
    h = tg.Hyperparameters(vocab_size=512, train_seq_len=256, fused_mlp=fused_mlp)
    tg.use_attention_backend("auto", torch.device("cuda"))
    ids, cu = packed_batch()
    results = []
    for compiled in (False, True):
        model = perturbed_gpt(h).cuda()  # off the zero init, so every block contributes
        if compiled:
            model.compile_regions()
        results.append(loss_and_grads(model, ids, cu))
    assert_same_loss_and_grads(results)


def test_kv_repeat_matches_grouped_attention_compiled():
    """KV_REPEAT under varlen: the compiled model with K and V repeated to the query heads (the repeat's
    backward summing each group's dK and dV in the graph) against FA2's grouped call, in loss and grads."""
    tg.use_attention_backend("varlen", torch.device("cuda"))
    assert tg.kv_repeat_on("auto")  # the default repeats here
    ids, cu = packed_batch()
    results = []
    for setting in ("0", "1"):  # the loss alone would hardly see a wrong head order: the gradients do
        model = perturbed_gpt(tg.Hyperparameters(vocab_size=512, train_seq_len=256, kv_repeat=setting)).cuda()
        model.compile_regions()
        results.append(loss_and_grads(model, ids, cu))
    assert_same_loss_and_grads(results)


@pytest.mark.parametrize("n, vocab, cap", [(4096, 8192, 30.0), (1000, 8192, 15.0), (777, 5000, 30.0)])
def test_fused_softcap_ce_matches_reference(n, vocab, cap):
    """Triton forward and backward against float64 softcapped CE, with ignored (-1) targets."""
    torch.manual_seed(n)
    logits = (torch.randn(n, vocab, device="cuda") * 8).bfloat16().requires_grad_()
    targets = torch.randint(0, vocab, (n,), device="cuda")
    targets[::7] = -1
    loss = tg.softcap_ce(logits, targets, cap)[0]
    g = torch.rand_like(loss)
    (grad,) = torch.autograd.grad(loss, logits, g)
    ref_logits = logits.detach().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(tg.softcap_logits(ref_logits, cap), targets, ignore_index=-1,
                                            reduction="none")
    (grad_ref,) = torch.autograd.grad(ref, ref_logits, g.double())
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (loss[::7] == 0).all() and (grad[::7] == 0).all()
    assert rel_err(loss, ref) < 1e-4
    assert rel_err(grad, grad_ref) < 1e-2
    # the mean loss of the model's loss function takes the same path
    h = torch.randn(n, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(vocab, 64, device="cuda") * 0.1
    fused = tg.softcap_cross_entropy(h, w, targets, cap)
    plain = tg.softcap_cross_entropy(h.float(), w, targets, cap)
    assert abs(fused.item() - plain.item()) < 1e-2 * plain.item()


@pytest.mark.parametrize("coeffs", [tg.PARC_XIELU[0], tg.LEAKY_RELU2])
@pytest.mark.parametrize("m", [32768, 1000, 64])
def test_fused_xielu_mlp_matches_float64(m, coeffs):
    """FUSED_MLP's Triton GEMMs (xIELU in the up-projection's epilogue, its derivative in the
    backward's) against float64: output and every gradient as close as cuBLAS + the activation's.
    m = 1000 and 64 leave partial tiles (128 x 256)."""
    torch.manual_seed(m)
    c = torch.tensor(coeffs, device="cuda")
    x = torch.randn(m, 512, device="cuda").bfloat16().requires_grad_()
    w_fc = (torch.randn(2048, 512, device="cuda") / 512 ** 0.5).bfloat16().requires_grad_()
    w_proj = (torch.randn(512, 2048, device="cuda") / 2048 ** 0.5).bfloat16().requires_grad_()
    g = torch.randn(m, 512, device="cuda").bfloat16()
    leaves = (x, w_fc, w_proj)

    def run(f, dtype):
        ins = [t.detach().to(dtype).requires_grad_() for t in leaves]
        out = f(*ins)
        return [out, *torch.autograd.grad(out, ins, g.to(dtype))]

    fused = run(lambda a, b, d: tg.xielu_mlp(a, b, d, c)[0], torch.bfloat16)
    plain = run(lambda a, b, d: tg.xielu(a @ b.t(), c.bfloat16()) @ d.t(), torch.bfloat16)
    ref = run(lambda a, b, d: tg.xielu(a @ b.t(), c.bfloat16().double()) @ d.t(), torch.float64)
    for name, f, p, r in zip(("out", "dx", "dw_fc", "dw_proj"), fused, plain, ref):
        assert torch.isfinite(f).all(), name
        assert rel_err(f, r) < max(1.5 * rel_err(p, r), 1e-3), (name, rel_err(f, r), rel_err(p, r))


@pytest.mark.parametrize("backend", ["varlen", "fa3"])
@pytest.mark.parametrize("heads, kv_heads", [(8, 4), (8, 8), (8, 1)])
@pytest.mark.parametrize("window", [None, 3, 511])  # 0 would make the q/k grads exactly 0
def test_attention_backend_matches_sdpa_without_graph_break(backend, heads, kv_heads, window):
    """Each backend under torch.compile(fullgraph=True) (a graph break would raise) matches SDPA on
    long and short packed sequences, forward and backward."""
    try:
        tg.use_attention_backend(backend, torch.device("cuda"))
    except tg.ConfigError:
        pytest.skip(f"{backend} not available")
    q, k, v, cu, max_len = random_packed(13, 1500, heads, kv_heads, seed=heads + kv_heads)
    fn = torch.compile(lambda q, k, v, cu, m, w: tg.attention(q, k, v, cu, m, w, 4096), fullgraph=True)
    out = fn(q, k, v, cu, torch.tensor([max_len], dtype=torch.int32), tg.window_arg(window))
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = tg._attention_sdpa(qr, kr, vr, cu, window)
    grads_ref = torch.autograd.grad(ref, (qr, kr, vr), g.float())
    tg.use_attention_backend("sdpa", torch.device("cuda"))
    assert rel_err(out, ref) < 1e-2
    for a, b in zip(grads, grads_ref):
        assert rel_err(a, b) < 2e-2


def test_capped_attention_scores_like_stride_one_windows_on_the_gpu(tmp_path, monkeypatch):
    """SLIDING_MODE=attention through the GPU backend's windowed kernel (varlen or FA3, rows longer
    than any compiled bound): one global layer, so every target's score must equal stride-1
    windows' (bf16 noise); the 2,500-token document comes in three overlapping pieces."""
    import dataclasses

    import numpy as np

    h = tg.Hyperparameters(vocab_size=512, num_layers=1, global_attn_layers=(0,), num_loops=0, parallel_start_layer=1,
                           xsa_last_n=1, smear_gate=False, eval_seq_len=128, eval_stride=1, val_batch_tokens=1024,
                           log_dir=str(tmp_path), run_id="cap")
    tg.use_attention_backend("auto", torch.device("cuda"))
    rng = np.random.default_rng(0)
    tokens = np.concatenate([np.r_[tg.BOS_ID, rng.integers(2, 512, n - 1)] for n in (90, 700, 2500, 40)]).astype(np.uint16)
    val = tg.ValSet(tokens, np.ones(len(tokens), dtype=np.int64))
    rt = tg.Runtime(h)
    rt.compile = False  # the windows' side eager too: one kernel path against the other
    model = rt.place(perturbed_gpt(h, eval_model=True))
    build_row, token_losses = tg.build_row, model.token_losses
    rows, scores = [], {}

    def recorded_losses(ids, targets, cu, max_seqlen):
        out = token_losses(ids, targets, cu, max_seqlen)
        pos, where, target = 0, [], []
        for ws, n, first in rows.pop():
            where += range(pos + first, pos + n)
            target += range(ws + first + 1, ws + n + 1)
            pos += n
        scores[mode].update(zip(target, out.view(-1)[where].tolist()))
        return out
    monkeypatch.setattr(tg, "build_row", lambda val_, row, n: rows.append(row) or build_row(val_, row, n))
    monkeypatch.setattr(model, "token_losses", recorded_losses)
    for mode in ("windows", "attention"):
        scores[mode] = {}
        tg.eval_val(model, dataclasses.replace(h, sliding_mode=mode), rt, val, sliding=True)
    tg.use_attention_backend("sdpa", torch.device("cuda"))
    assert set(scores["windows"]) == set(scores["attention"]) == set(range(1, len(tokens)))
    diff = max(abs(scores["windows"][j] - scores["attention"][j]) for j in scores["windows"])
    assert diff < 3e-2, f"capped attention differs from stride-1 windows by up to {diff:.4f}"


@pytest.mark.parametrize("fused_mlp", ["0", "1"], ids=["unfused_mlp", "fused_mlp"])
def test_compiled_step_has_no_graph_break_or_recompile(fused_mlp):
    """A compiled training step (either MLP path): no graph break anywhere, and a new packing (other
    document count and longest document) recompiles nothing."""
    import torch._dynamo.utils as dyn

    torch._dynamo.reset()  # earlier tests' graphs are not this one's
    h = tg.Hyperparameters(vocab_size=512, train_seq_len=256, fused_mlp=fused_mlp)
    tg.use_attention_backend("varlen", torch.device("cuda"))
    torch.manual_seed(0)
    model = tg.GPT(h).cuda()
    model.compile_regions()

    def step(period, looping):
        ids = torch.randint(2, 512, (1, 2048), device="cuda")
        ids[0, ::period] = tg.BOS_ID
        cu = tg.packed_cu_seqlens(ids[0].cpu().numpy(), 256)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, torch.roll(ids, -1, 1), torch.from_numpy(cu).cuda(), int((cu[1:] - cu[:-1]).max()),
                         looping)
        loss.backward()
        torch.cuda.synchronize()

    dyn.counters.clear()
    for looping in (False, True):
        step(300, looping)
    graphs = dyn.counters["stats"]["unique_graphs"]
    for period, looping in ((97, False), (1000, True), (41, True)):
        step(period, looping)
    tg.use_attention_backend("sdpa", torch.device("cuda"))
    assert not dyn.counters["graph_break"], dict(dyn.counters["graph_break"])
    assert dyn.counters["stats"]["unique_graphs"] == graphs


def polar_express_fp64(g, steps):
    """The Polar Express iteration of tg.newton_schulz in float64: the reference both forms approach."""
    x = g.double()
    tall = x.size(-2) > x.size(-1)
    x = x.mT if tall else x
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b, c in tg.POLAR_EXPRESS[:steps]:
        m = x @ x.mT
        x = a * x + (b * m + c * (m @ m)) @ x
    return x.mT if tall else x


SHAPES = [(512, 512), (256, 512), (2048, 512), (512, 2048)]  # q/o, k/v, MLP up and down


@pytest.mark.parametrize("shape", SHAPES)
def test_compiled_orthogonalisations_are_as_close_to_fp64_as_eager(shape):
    """MUON_COMPILE=1's compiled newton_schulz (bf16) and gram_newton_schulz (fp32): no further from
    the float64 iteration than the eager functions (fused, the bf16 form rounds less often: on the CPU
    its error was 0.026-0.039 against eager's 0.036-0.052)."""
    g = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0)).cuda()
    ref = polar_express_fp64(g, 5)
    for f in (tg.newton_schulz, tg.gram_newton_schulz):
        eager = rel_err(f(g, 5), ref)
        compiled = rel_err(torch.compile(f, dynamic=False, fullgraph=True)(g, 5), ref)
        assert compiled <= 1.1 * eager + 1e-3, (f.__name__, compiled, eager)


def test_compiled_muon_compiles_once_and_updates_as_eager():
    """Muon with compiled orthogonalisations compiles its graphs in the first step and nothing
    after it, with a new momentum and lr every step (which stay outside the graphs), nor in a
    second optimizer (training's, after the compile warm-up's); its updates stay within 10% of the
    eager Muon's (both forms' rounding apart)."""
    import torch._dynamo.utils as dyn

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(*s, generator=g) * 0.02 for s in SHAPES for _ in range(3)]
    grads = [[torch.randn(*w.shape, generator=g).cuda() for w in start] for _ in range(4)]
    results = []
    for compiled in (False, True):
        params = [torch.nn.Parameter(w.clone().cuda()) for w in start]
        muon = tg.Muon(params, 0.02, 0.9, 0.1, 5, 3.0, compile_ortho=compiled)
        dyn.counters.clear()
        for i, step_grads in enumerate(grads):
            for p, gr in zip(params, step_grads):
                p.grad = gr.clone()
            muon.param_groups[0].update(lr=0.02 * (1 - 0.1 * i), momentum=0.9 + 0.01 * i)
            muon.step()
            if i == 0:
                graphs = dyn.counters["stats"]["unique_graphs"]
        assert dyn.counters["stats"]["unique_graphs"] == graphs and (graphs > 0) == compiled
        results.append([p.detach().clone() for p in params])
        if compiled:  # a second optimizer (training's, after the compile warm-up's) reuses the graphs
            again = tg.Muon(params, 0.02, 0.9, 0.1, 5, 3.0, compile_ortho=True)
            for p, gr in zip(params, grads[0]):
                p.grad = gr.clone()
            again.step()
            assert dyn.counters["stats"]["unique_graphs"] == graphs
    for eager, comp, w0 in zip(*results, start):
        assert rel_err(comp - w0.cuda(), eager - w0.cuda()) < 0.1  # the updates, not the weights, compared


@pytest.mark.parametrize("muon_compile", [False, True])
def test_muon_compile_setting_reaches_the_optimizer(muon_compile):
    h = tg.Hyperparameters(vocab_size=512, muon_compile=muon_compile)
    muon = tg.build_optimizers(tg.GPT(h).cuda(), h, 0, 1)[0]
    assert (muon.ortho == [tg.newton_schulz, tg.gram_newton_schulz]) != muon_compile


def test_compiled_ttt_recompiles_nothing_after_the_warmup(tmp_path, monkeypatch):
    """Phased TTT on the compiled model in the eval's order (diagnostic, warm-up on random tokens,
    TTT) at the record's TTT settings, under fail_on_recompile: chunks of 1 to 64 documents in
    windows of 64 to 2048 tokens, the tail chunks of the documents over 4,000 tokens and global SGD
    compile nothing after the warm-up and break no graph, and the score matches eager TTT's; so does
    it with CUDA graphs (TTT_CUDA_GRAPH=1: padded chunk steps captured and replayed; global SGD eager and replayed),
    which capture some graphs, and with TTT_COMPILE=0 on the compiled model (eager steps replayed,
    nothing compiled). Prints the times (-s)."""
    import dataclasses
    import math
    import time

    import numpy as np
    import torch._dynamo.utils as dyn

    h0 = tg.Hyperparameters(vocab_size=512, log_dir=str(tmp_path), run_id="ttt", ttt_max_doc_tokens=4000,
                            phased_ttt_prefix_docs=96)
    tg.use_attention_backend("auto", torch.device("cuda"))
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(6.2, 1.0, 200), 20, 6000).astype(int)  # FineWeb-like: median ~500
    tokens = np.concatenate([np.r_[tg.BOS_ID, rng.integers(2, 512, n - 1)] for n in lengths]).astype(np.uint16)
    val = tg.ValSet(tokens, np.ones(len(tokens), dtype=np.int64))
    step_graphs, real_step_graphs = [], tg.StepGraphs
    monkeypatch.setattr(tg, "StepGraphs", lambda capture: step_graphs.append(real_step_graphs(capture)) or step_graphs[-1])
    torch._dynamo.reset()
    dyn.counters.clear()
    scores, seconds, recompiled = {}, {}, {}
    plain = dict(ttt_cuda_graph=False, global_ttt_cuda_graph=False, global_ttt_compile=True)
    graphed = dict(ttt_cuda_graph=True, global_ttt_cuda_graph=True, global_ttt_compile=False)  # the defaults
    # TTT_COMPILE=0 on the compiled model: TTT's steps eager (no TTT compile, ~80 s cold on a FineWeb
    # rank) and replayed, the leftovers' windows through the eval graphs
    modes = (("eager", False, plain), ("compiled", True, plain), ("graphs", True, graphed),
             ("TTT_COMPILE=0", True, dict(graphed, ttt_compile=False)))
    for mode, compiled, kw in modes:
        h = dataclasses.replace(h0, **kw)
        model = perturbed_gpt(h, eval_model=True)
        rt = tg.Runtime(h)
        rt.compile = compiled
        model = rt.place(model)
        tg.eval_val(model, h, rt, val)  # evaluate_artifact's diagnostic: the eval graphs
        with tg.ttt_compile_mode(h, rt):
            t0 = time.perf_counter()
            if compiled and h.ttt_compile:
                tg.ttt_warmup(model, h, rt)
            graphs = dyn.counters["stats"]["unique_graphs"]
            t1 = time.perf_counter()
            torch.manual_seed(1234)
            # not around TTT_COMPILE=0's force_eager, which it would override: its count below must not change
            with torch.compiler.set_stance("fail_on_recompile" if compiled and h.ttt_compile else "default"):
                scores[mode] = tg.phased_ttt(model, h, rt, val, math.inf)
            torch.cuda.synchronize()
            seconds[mode] = (t1 - t0, time.perf_counter() - t1)
            recompiled[mode] = dyn.counters["stats"]["unique_graphs"] - graphs
    tg.use_attention_backend("sdpa", torch.device("cuda"))
    print(f"phased TTT on {len(lengths)} documents: " + ", ".join(
        f"{m} {seconds[m][1]:.1f}s after a {seconds[m][0]:.1f}s warm-up, val_loss {scores[m][0]:.5f}" for m in scores) +
        f"; CUDA graphs captured: {sum(len(g.graphs) for g in step_graphs)}")
    assert sum(len(g.graphs) for g in step_graphs) > 0
    assert not dyn.counters["graph_break"], dict(dyn.counters["graph_break"])
    assert recompiled["compiled"] == recompiled["graphs"] == recompiled["TTT_COMPILE=0"] == 0
    for mode in ("compiled", "graphs", "TTT_COMPILE=0"):
        assert scores[mode][2] == scores["eager"][2] == len(tokens) - 1
        assert abs(scores[mode][0] - scores["eager"][0]) < 1e-2 * scores["eager"][0], mode


def test_global_sgd_cuda_graphs_match_the_plain_steps(tmp_path):
    """GLOBAL_TTT_CUDA_GRAPH=1 replays global SGD's forward + backward, compiled or eager
    (GLOBAL_TTT_COMPILE=0): the weight updates of a few 4,096-token steps (packings in two
    cu_seqlens buckets, switching back and forth) equal the plain compiled steps' within bf16
    noise, as do the plain eager steps', and the model's parameters are the ones the optimizer moved."""
    import time

    import numpy as np

    h = tg.Hyperparameters(vocab_size=512, log_dir=str(tmp_path), run_id="sgd", global_ttt_chunk_tokens=4096,
                           global_ttt_lr=0.01)
    tg.use_attention_backend("auto", torch.device("cuda"))
    rng = np.random.default_rng(0)
    # steps of < 64 sequences, then of > 64 (a second bucket), then < 64 again; the last step has lr 0
    lengths = np.r_[rng.integers(20, 400, 30), rng.integers(2, 30, 300), rng.integers(20, 400, 60)]
    tokens = np.concatenate([np.r_[tg.BOS_ID, rng.integers(2, 512, n - 1)] for n in lengths]).astype(np.uint16)
    deltas = {}
    for graphed, compiled in ((False, True), (True, True), (True, False), (False, False)):
        model = perturbed_gpt(h, eval_model=True)
        rt = tg.Runtime(h)
        model = rt.place(model)
        before = torch.cat([p.detach().float().flatten() for p in model.parameters()])
        h.global_ttt_cuda_graph, h.global_ttt_compile = graphed, compiled
        with tg.ttt_compile_mode(h, rt):
            t0 = time.perf_counter()
            tg.global_sgd(model, tokens, h, rt)
            torch.cuda.synchronize()
        print(f"global SGD graphed={graphed} compiled={compiled}: {time.perf_counter() - t0:.2f}s")
        deltas[graphed, compiled] = torch.cat([p.detach().float().flatten() for p in model.parameters()]) - before
    tg.use_attention_backend("sdpa", torch.device("cuda"))
    ref = deltas.pop((False, True))
    assert ref.abs().max() > 0
    for key, d in deltas.items():
        assert rel_err(d, ref) < 5e-2, key


def test_ttt_step_graphs_replay_the_plain_steps(tmp_path):
    """StepGraphs' captured and replayed TTT chunk steps equal the same padded steps run plain
    (capture=False): the scores after each of three batches on one bank (graphs captured in one
    batch replay the next one's data) and the adapters at the end, with chunks of two widths
    (TTT_LONG_CHUNK_SIZE). The documents repeat a pattern, so adaptation moves the scores (checked
    against a run with no learning). Not yet run on a GPU."""
    import dataclasses

    import numpy as np

    # chunks of 48 while inside the 128-token window, of 96 past it: two chunk widths on one row shape
    h = tg.Hyperparameters(vocab_size=512, log_dir=str(tmp_path), run_id="graphs", ttt_batch_size=8,
                           ttt_lora_lr=0.003, ttt_eval_seq_len=128, ttt_long_chunk_size=96,
                           ttt_tail_chunk_size=0)
    tg.use_attention_backend("auto", torch.device("cuda"))
    rng = np.random.default_rng(0)
    docs = [np.r_[tg.BOS_ID, np.resize(rng.integers(2, 512, 40), int(rng.integers(250, 330)))] for _ in range(24)]
    tokens = np.concatenate(docs + [[tg.BOS_ID]]).astype(np.uint16)
    val = tg.ValSet(tokens, np.ones(len(tokens), dtype=np.int64))
    spans = tg.document_spans(val.tokens)
    rt = tg.Runtime(h)
    rt.compile = False  # eager blocks: captured the same way, no compile time
    model = rt.place(perturbed_gpt(h, eval_model=True)).requires_grad_(False)
    n_slots = len(sum(model.layer_plan(True), []))
    results = {}
    for arm, capture, lr in (("plain", False, h.ttt_lora_lr), ("graphs", True, h.ttt_lora_lr), ("frozen", False, 0.0)):
        torch.manual_seed(0)
        bank = tg.LoRABank(8, n_slots, h, rt.device)
        opt = tg.ttt_optimizer(bank, dataclasses.replace(h, ttt_lora_lr=lr), rt)
        graphs = tg.StepGraphs(capture)
        sums = torch.zeros(3, dtype=torch.float64, device=rt.device)
        after = []
        for k in range(3):
            if k:
                tg.ttt_reset(bank, opt, warm_a=True)
            tg.ttt_batch(model, sorted(spans[8 * k:8 * k + 8], key=lambda sp: -sp[1]), val, bank, opt, h, sums, graphs)
            after.append(sums.clone())
        results[arm] = torch.stack(after).cpu(), [p.detach().clone() for p in bank.parameters()], len(graphs.graphs)
    tg.use_attention_backend("sdpa", torch.device("cuda"))
    (plain, p_plain, _), (graphed, p_graphed, n_graphs), (frozen, _, _) = (results[a] for a in ("plain", "graphs", "frozen"))
    print(f"{n_graphs} graphs; loss sums plain {plain[:, 0].tolist()} graphs {graphed[:, 0].tolist()} "
          f"frozen {frozen[:, 0].tolist()}")
    assert n_graphs > 0
    assert torch.equal(plain[:, 1:], graphed[:, 1:]) and plain[-1, 1] == sum(n for _, n in spans[:24])
    assert frozen[-1, 0] > 1.01 * plain[-1, 0]  # adaptation matters here
    assert ((graphed[:, 0] - plain[:, 0]).abs() <= 1e-3 * plain[:, 0]).all()
    assert rel_err(torch.cat([p.flatten() for p in p_graphed]), torch.cat([p.flatten() for p in p_plain])) < 1e-2


def test_train_cuda_graphs_replay_the_compiled_steps(tmp_path, monkeypatch):
    """TRAIN_CUDA_GRAPH=1: training micro-batches replayed as CUDA graphs give the plain compiled steps'
    losses and summed gradients within bf16 noise, step by step at the same weights (the graphed model
    takes the plain one's weights after each step: weights compared after several Muon/Adam steps differ
    by more than the gradients' noise, 0.13 relative after 6 steps on 2026-12-02). Each step's 4
    micro-batches are rows of long, medium, short (over 64 sequences), long documents: three shapes a
    loop phase, two of them first met in the middle of a step (a capture while the buffers hold part of
    the step's sums), all in one pool."""
    import numpy as np

    from helpers_train import write_shard

    rng = np.random.default_rng(0)

    def row(lo, hi):  # one micro-batch's 2,049 tokens (the loader takes 2,048 + 1) of documents lo..hi long
        docs = [np.r_[tg.BOS_ID, rng.integers(2, 512, n - 1)] for n in rng.integers(lo, hi, 2049 // lo + 1)]
        return np.concatenate(docs)[:2049]

    kinds = {"long": (300, 700), "medium": (150, 250), "short": (10, 20)}  # longest 512 / 256 / 32 after rounding
    tokens = np.concatenate([row(*kinds[k]) for k in ["long", "medium", "short", "long"] * 6])
    files = [str(write_shard(tmp_path / "fineweb_train_000000.bin", tokens))]
    summed = {}  # id(params) -> per step, each parameter's gradient as the optimizers get it (None: no gradient)
    real_optimizer_step = tg.optimizer_step

    def recording_optimizer_step(optimizers, params, rt, clip_norm):
        summed.setdefault(id(params), []).append(
            [None if p.grad is None else p.grad.detach().float().clone() for p in params])
        real_optimizer_step(optimizers, params, rt, clip_norm)

    monkeypatch.setattr(tg, "optimizer_step", recording_optimizer_step)
    arms = []
    for graphed in (False, True):
        h = tg.Hyperparameters(vocab_size=512, train_seq_len=512, train_batch_tokens=8192, micro_batches=4,
                               log_dir=str(tmp_path), run_id=f"g{int(graphed)}", train_cuda_graph=str(int(graphed)),
                               attn_backend="varlen")
        rt = tg.Runtime(h)
        model = rt.place(perturbed_gpt(h))  # compiled: COMPILE=1
        arms.append((model, tg.Trainer(model, h, rt), tg.new_train_loader(h, rt, files)))
    (plain, plain_trainer, plain_loader), (model, trainer, loader) = arms
    assert plain_trainer.graphs is None and trainer.graphs.capture
    names = [n for n, p in model.named_parameters()]  # Trainer.params' order
    for i in range(6):
        ref = float(plain_trainer.step(plain_loader, i, 0.0, i >= 3))
        loss = float(trainer.step(loader, i, 0.0, i >= 3))
        ref_grads, grads = summed[id(plain_trainer.params)][-1], summed[id(trainer.params)][-1]
        assert [g is None for g in grads] == [g is None for g in ref_grads], i  # loop parameters: only when looped
        err = rel_err(torch.cat([g.flatten() for g in grads if g is not None]),
                      torch.cat([g.flatten() for g in ref_grads if g is not None]))
        worst = max((rel_err(g, r), n) for n, g, r in zip(names, grads, ref_grads) if g is not None and r.norm() > 0)
        print(f"step {i} looping={i >= 3}: loss plain {ref:.6f} graphed {loss:.6f}, gradients' relative error {err:.2e}"
              f" (worst tensor {worst[1]} {worst[0]:.2e}: data for a per-tensor bound)")
        assert abs(loss - ref) < 0.01 and err < 1e-2, (i, loss, ref, err)  # 5.4e-4 to 2.8e-3 on 2026-12-02
        with torch.no_grad():  # same weights for the next step (in place: the graphs hold their addresses)
            for p, q in zip(model.parameters(), plain.parameters()):
                p.copy_(q)
    tg.use_attention_backend("sdpa", torch.device("cuda"))
    graphs = model.step_graphs.graphs
    assert sorted((k[0], k[2], k[3]) for k in graphs) == sorted(
        (looping, n_cu, m) for looping in (False, True) for n_cu, m in ((64, 512), (64, 256), (256, 32))), list(graphs)
    assert all(g is not None for g, _, _ in graphs.values())
