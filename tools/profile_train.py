"""Profile compiled training steps on the GPU: wall time per step vs summed kernel time, and
the top kernels. Uses the same environment variables as train_gpt.py.
    python3 tools/profile_train.py [steps]"""
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile


def main():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    import train_gpt as tg  # here: tools/profile_leader.py imports print_kernels into the leader's process

    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    h = tg.Hyperparameters.from_env()
    rt = tg.Runtime(h)
    model = rt.place(tg.GPT(h))
    trainer = tg.Trainer(model, h, rt)
    loader = tg.DocumentPackingLoader(tg.shard_files(h.data_path, "train"), h.micro_tokens, h.train_seq_len,
                                      rt.rank, rt.world_size, rt.device)
    for looping in (False, True):
        for i in range(3):
            trainer.step(loader, i, 0.0, looping)
        rt.sync()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            for i in range(steps):
                trainer.step(loader, i, 0.0, looping)
            rt.sync()
        wall = (time.perf_counter() - t0) / steps
        graphs = trainer.graphs.summary() if trainer.graphs else "plain micro-steps"  # TRAIN_CUDA_GRAPH
        print_kernels(prof, steps, wall, h.train_batch_tokens,
                      f"looping={looping} micro_tokens={h.micro_tokens} accum={h.grad_accum_steps} {graphs}")
        print_launchers(prof, steps)


KERNEL_KINDS = (  # (kind, substrings of a kernel's name), first match wins; anything else is "elementwise/other"
    ("attention", ("flash", "fmha", "attn_fwd", "attn_bwd")),
    ("gemm", ("nvjet", "gemm", "cutlass", "cublas", "splitkreduce", "linear_")),
    ("cross-entropy", ("softcap", "cross_entropy")),
    ("aten add (gradient sums)", ("cudafunctor_add<float>", "cudafunctor_add<c10::bfloat16>")),
    ("reduce (aten)", ("reduce_kernel",)),
    ("memcpy/memset", ("memcpy", "memset")),
)


def kernel_kind(name):
    low = name.lower()
    if low.startswith("triton_"):  # torch.compile's fused kernels (norms, rope, gates, residuals), "flash" or not
        return "inductor"
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "elementwise/other")


def print_kernels(prof, steps, wall, batch_tokens, label):
    """Wall vs summed kernel time per step, the kernel time by kind (KERNEL_KINDS) and the top
    PROFILE_ROWS (40) kernels of a profile (also tools/profile_leader.py's). User ranges on the GPU
    (Optimizer.step#Muon.step) span kernels counted already: listed apart, never summed."""
    events = prof.key_averages()
    on_gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total]
    ranges = [e for e in on_gpu if getattr(e, "is_user_annotation", False) or e.key.startswith("Optimizer.")]
    kernels = sorted((e for e in on_gpu if e not in ranges), key=lambda e: -e.self_device_time_total)
    kernel_us = sum(e.self_device_time_total for e in kernels)
    print(f"\n== {label}: wall {1000 * wall:.1f} ms/step, kernels {kernel_us / 1000 / steps:.1f} ms/step, "
          f"{batch_tokens / wall:.0f} tok/s")
    kinds = {}
    for e in kernels:
        kind = kernel_kind(e.key)
        kinds[kind] = kinds.get(kind, 0.0) + e.self_device_time_total / 1000 / steps
    print("by kind (ms/step): " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
    if ranges:
        named = {}  # inductor's per-graph ranges (one per compiled graph, named by hash) summed into one
        for e in ranges:
            key = "compiled graph calls" if e.key.startswith("## Call CompiledFxGraph") else e.key
            named[key] = named.get(key, 0.0) + e.self_device_time_total / 1000 / steps
        ordered = sorted(named.items(), key=lambda kv: -kv[1])
        print("ranges (ms/step): " + ", ".join(f"{k} {v:.2f}" for k, v in ordered))
    print(f"{'ms/step':>8} {'calls/step':>10} {'us/call':>8}  kernel")
    for e in kernels[:int(os.environ.get("PROFILE_ROWS", "40"))]:
        print(f"{e.self_device_time_total / 1000 / steps:8.2f} {e.count / steps:10.0f} "
              f"{e.self_device_time_total / max(e.count, 1):8.1f}  {e.key[:110]}", flush=True)


def print_launchers(prof, steps, rows=25):
    """GPU time by the host op that launched it and its input shapes: the eager ops between and inside
    the compiled graphs (gradient sums, the embedding, custom ops' internals) named, where the kernel
    table gives only a kernel's name. Rows differing only in 1-D inputs (cu_seqlens, whose length
    changes with every batch's packing) are one row. A compiled graph's own kernels sit under its region."""
    merged = {}
    for e in prof.key_averages(group_by_input_shape=True):
        if e.device_type != torch.autograd.DeviceType.CPU or e.self_device_time_total <= 0:
            continue
        shapes = str([list(s) for s in (getattr(e, "input_shapes", None) or []) if len(s) > 1])
        row = merged.setdefault((e.key, shapes), [0.0, 0])
        row[0] += e.self_device_time_total
        row[1] += e.count
    print(f"launched by (ms/step of kernels, calls/step, op, its inputs of 2+ dims; top {rows}):")
    for (key, shapes), (us, count) in sorted(merged.items(), key=lambda kv: -kv[1][0])[:rows]:
        print(f"{us / 1000 / steps:8.2f} {count / steps:10.1f}  {key[:60]} {shapes[:80]}", flush=True)


if __name__ == "__main__":
    main()
