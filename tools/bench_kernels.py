"""Micro-benchmarks of the training step's pieces on the model's shapes (issue 10): what a change could
buy, measured before it is built. Each row is the median of --iters timed calls (CUDA events on the GPU,
wall clock elsewhere), forward alone and forward + backward (grads of input and weight):
  - the whole MLP: cuBLAS + the compiled activation against FUSED_MLP's persistent TMA GEMMs with
    the activation in their epilogues (4 tiles measured: records/speed/2026-12-02e_fused_mlp/kb.log),
    xIELU and LeakyReLU(0.5)^2. An earlier fused up-projection alone (no TMA, backward unfused) lost
    at both loads and was removed (records/eval/2026-12-01f_h200_sgd_doc_cut/kb.log);
  - each projection's GEMM in bf16 and in FP8 (e4m3 forward, e5m2 gradients, per-tensor scales from
    each tensor's amax, the casts included: what an FP8 CastedLinear would cost), with FP8's error;
  - the RMS norm of the residual stream in fp32 (today's stream) and in bf16.
    python3 tools/bench_kernels.py [--tokens 32768,98304] [--iters 30] [--no-compile]
Tokens: 32,768 is the proxy's micro-batch, 98,304 an 8-GPU run's per-GPU micro-batch. FP8 needs
torch._scaled_mm on a GPU (Hopper/Ada; the CPU's is a slow reference, checked by the tests only)."""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train_gpt as tg  # noqa: E402

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def to_fp8(t, dtype):
    """t scaled so its amax fills dtype's range, in dtype, and the scale that undoes it (fp32 scalar)."""
    amax = t.detach().abs().amax().float().clamp_min(1e-12)
    scale = torch.finfo(dtype).max / amax
    return (t.float() * scale).to(dtype), scale.reciprocal()


class FP8Linear(torch.autograd.Function):
    """y = x w^T with x, w in e4m3 and the output gradient in e5m2 (modded-nanogpt's FP8 head, with
    per-tensor scales from amax instead of fixed ones). _scaled_mm takes its second operand column-major."""

    @staticmethod
    def forward(ctx, x, w):
        x8, sx = to_fp8(x, E4M3)
        w8, sw = to_fp8(w, E4M3)
        ctx.save_for_backward(x8, sx, w8, sw)
        return torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16)

    @staticmethod
    def backward(ctx, grad):
        x8, sx, w8, sw = ctx.saved_tensors
        g8, sg = to_fp8(grad, E5M2)
        grad_x = torch._scaled_mm(g8, w8.t().contiguous().t(), scale_a=sg, scale_b=sw, out_dtype=torch.bfloat16)
        grad_w = torch._scaled_mm(g8.t().contiguous(), x8.t().contiguous().t(), scale_a=sg, scale_b=sx,
                                  out_dtype=torch.float32)
        return grad_x, grad_w


def fp8_linear(x, w):
    return FP8Linear.apply(x, w)


def bf16_linear(x, w):
    return F.linear(x, w)


def timed(fn, iters, device):
    """Median seconds of fn() over iters calls, after 3 untimed ones (compiles, autotuning)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fwd_bwd(f, *inputs):
    """fn timing f's forward and backward (into fresh grads) on inputs, with a random output gradient."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    grad = torch.randn_like(f(*leaves))

    def run():
        for t in leaves:
            t.grad = None
        f(*leaves).backward(grad)
    return run


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def mlp_rows(M, h, device, compile_fn, iters, rows):
    """The whole MLP (up, activation, down): cuBLAS + the compiled activation (what FUSED_MLP=0 runs)
    against FUSED_MLP's op (Triton GEMMs with the activation in their epilogues), for xIELU and
    LeakyReLU(0.5)^2, with the fused output's error against the unfused one."""
    d, hidden = h.model_dim, h.mlp_mult * h.model_dim
    x = torch.randn(M, d, device=device, dtype=torch.bfloat16)
    w = torch.randn(hidden, d, device=device, dtype=torch.bfloat16) / d ** 0.5
    w2 = torch.randn(d, hidden, device=device, dtype=torch.bfloat16) / hidden ** 0.5
    for name, coeffs in (("xIELU", h.layer_xielu(0)), ("LeakyReLU(0.5)^2", tg.LEAKY_RELU2)):
        c = torch.tensor(coeffs, device=device, dtype=torch.float32)
        g = compile_fn(lambda a, b, e, c=c: F.linear(tg.xielu(F.linear(a, b), c), e))
        rows.append((f"mlp {d}->{hidden}->{d} + {name}, cuBLAS + separate activation",
                     timed(lambda: g(x, w, w2), iters, device), timed(fwd_bwd(g, x, w, w2), iters, device), ""))
        if device.type != "cuda" or tg.triton is None:
            rows.append((f"mlp + {name}, fused", None, None, "skipped: Triton on the GPU only"))
            continue
        f = lambda a, b, e, c=c: tg.xielu_mlp(a, b, e, c)[0]  # noqa: E731
        err = rel_err(f(x, w, w2), g(x, w, w2))
        rows.append((f"mlp + {name}, fused (FUSED_MLP's op)", timed(lambda: f(x, w, w2), iters, device),
                     timed(fwd_bwd(f, x, w, w2), iters, device), f"rel. error vs unfused {err:.4f}"))


def gemm_rows(M, h, device, compile_fn, iters, rows):
    """Each projection's GEMM in bf16 and in FP8 (casts included)."""
    d, kv = h.model_dim, h.num_kv_heads * (h.model_dim // h.num_heads)
    shapes = [("q", d, d), ("k+v", d, 2 * kv), ("attn out", d, d), ("mlp up", d, h.mlp_mult * d),
              ("mlp down", h.mlp_mult * d, d), ("head", d, h.vocab_size)]
    bf16, fp8 = compile_fn(bf16_linear), compile_fn(fp8_linear)
    for name, k, n in shapes:
        x = torch.randn(M, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) / k ** 0.5
        rows.append((f"gemm {name} {k}->{n}, bf16", timed(lambda: bf16(x, w), iters, device),
                     timed(fwd_bwd(bf16, x, w), iters, device), ""))
        if device.type != "cuda":  # the CPU's _scaled_mm is a reference: 24 s for 256 x 512 x 2048
            rows.append((f"gemm {name} {k}->{n}, fp8 + casts", None, None, "skipped: timed on the GPU only"))
            continue
        try:
            err = rel_err(fp8(x, w), bf16(x, w))
            rows.append((f"gemm {name} {k}->{n}, fp8 + casts", timed(lambda: fp8(x, w), iters, device),
                         timed(fwd_bwd(fp8, x, w), iters, device), f"rel. error vs bf16 {err:.4f}"))
        except (RuntimeError, NotImplementedError) as e:  # no FP8 GEMM on this device
            rows.append((f"gemm {name} {k}->{n}, fp8 + casts", None, None, f"skipped: {str(e).splitlines()[0][:60]}"))


def norm_rows(M, h, device, compile_fn, iters, rows):
    """The residual stream's RMS norm in fp32 (today) and bf16: what a bf16 stream would save per norm."""
    norm = compile_fn(tg.rms_norm)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(M, h.model_dim, device=device, dtype=dtype)
        rows.append((f"rms_norm [{M}, {h.model_dim}] {str(dtype).split('.')[-1]}", timed(lambda: norm(x), iters, device),
                     timed(fwd_bwd(norm, x), iters, device), ""))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="32768,98304", help="micro-batch sizes (tokens), comma-separated")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--no-compile", action="store_true", help="eager (the CPU test; compiled is what training runs)")
    ap.add_argument("--only", choices=["mlp", "gemm", "norm"], help="one section")
    args = ap.parse_args(argv)
    h = tg.Hyperparameters.from_env()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compile_fn = (lambda f: f) if args.no_compile else torch.compile
    print(f"bench_kernels: device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch "
          f"{torch.__version__}, {'eager' if args.no_compile else 'compiled'}, median of {args.iters}")
    for M in (int(t) for t in args.tokens.split(",")):
        rows = []
        for section in (mlp_rows, gemm_rows, norm_rows):
            if args.only and section.__name__ != f"{args.only}_rows":
                continue
            section(M, h, device, compile_fn, args.iters, rows)
        print(f"\n== {M} tokens\n{'':62} {'fwd ms':>9} {'fwd+bwd ms':>11}")
        for name, fwd, both, note in rows:
            cells = f"{fwd * 1e3:9.3f} {both * 1e3:11.3f}" if fwd is not None else f"{'-':>9} {'-':>11}"
            print(f"{name:62} {cells}  {note}".rstrip())


if __name__ == "__main__":
    main()
