"""Time phased TTT's chunk steps on the GPU (issue 11): ms per step for TTT batches of documents of
a few lengths (random tokens, untrained model, compiled and replayed as in the eval; TTT_CUDA_GRAPH=0:
not replayed), wall vs summed kernel time of the steps of one batch under the profiler, and the top
kernels; then global SGD's ms/step at SGD_TOKENS (default 4096: a rank's share of
GLOBAL_TTT_CHUNK_TOKENS on 8 GPUs) per step, compiled or eager and replayed or not as
GLOBAL_TTT_COMPILE and GLOBAL_TTT_CUDA_GRAPH say. Same environment variables as train_gpt.py
(PHASED_TTT_PREFIX_DOCS=0 skips global SGD in the warm-up; device_eval.sh's prof jobs set it).
    python3 tools/profile_ttt.py [LENGTH...]     (default 96 480 2096)"""
import dataclasses
import os
import sys
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train_gpt as tg  # noqa: E402


def main():
    lengths = [int(a) for a in sys.argv[1:]] or [96, 480, 2096]
    h = tg.Hyperparameters.from_env()
    rt = tg.Runtime(h)
    model = rt.place(tg.GPT(h).unfuse_mlp())  # TTT runs the artifact's model, unfused (load_artifact_model)
    n, C = h.ttt_batch_size, h.ttt_chunk_size
    chunks = lambda length: tg.ttt_n_chunks(length, *h.ttt_chunking)  # noqa: E731
    n_slots = len(sum(model.layer_plan(True), []))
    tokens = np.random.default_rng(1).integers(0, h.vocab_size, n * (max(lengths) + 1) + 1)
    noise = tg.ValSet(tokens, np.zeros(len(tokens), dtype=np.int64))
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)

    bank = tg.LoRABank(n, n_slots, h, rt.device)
    opt = tg.ttt_optimizer(bank, h, rt)
    graphs = tg.ttt_step_graphs(h, rt)  # TTT_CUDA_GRAPH=1 (default): replayed steps

    def run(length):  # as phased_ttt: one bank and optimizer, reset per batch
        tg.ttt_reset(bank, opt, h.ttt_warm_start_a)
        tg.ttt_batch(model, [(i * (length + 1), length) for i in range(n)], noise, bank, opt, h, sums, graphs)
        rt.sync()

    with tg.ttt_compile_mode(h, rt):
        t0 = time.perf_counter()
        tg.ttt_warmup(model, h, rt)
        print(f"warm-up {time.perf_counter() - t0:.1f}s", flush=True)
        for length in lengths:
            for _ in range(2 if graphs else 1):
                run(length)  # a chunk shape's first run may still autotune; with graphs the second captures
            t0 = time.perf_counter()
            run(length)
            steps = chunks(length)
            print(f"length {length}: {steps} steps, {1000 * (time.perf_counter() - t0) / steps:.1f} ms/step "
                  f"({n} documents)", flush=True)
        length = lengths[len(lengths) // 2]
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run(length)
        wall = time.perf_counter() - t0
    steps = chunks(length)
    events = prof.key_averages()
    cuda = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total]
    kernel_ms = sum(e.self_device_time_total for e in cuda) / 1000
    print(f"\n== profiled length {length}: wall {1000 * wall / steps:.1f} ms/step (profiler on), kernels "
          f"{kernel_ms / steps:.1f} ms/step, {sum(e.count for e in cuda) / steps:.0f} kernels/step")
    print(f"{'ms/step':>8} {'calls/step':>10} {'us/call':>8}  kernel")
    for e in sorted(cuda, key=lambda e: -e.self_device_time_total)[:int(os.environ.get("PROFILE_ROWS", "25"))]:
        print(f"{e.self_device_time_total / 1000 / steps:8.2f} {e.count / steps:10.0f} "
              f"{e.self_device_time_total / max(e.count, 1):8.1f}  {e.key[:100]}")
    cpu = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CPU), key=lambda e: -e.self_cpu_time_total)
    sgd_h = dataclasses.replace(h, global_ttt_chunk_tokens=int(os.environ.get("SGD_TOKENS", "4096")))
    for sgd_steps in (2, 20):
        t0 = time.perf_counter()
        tg.global_sgd(model, tokens[:sgd_steps * sgd_h.global_ttt_chunk_tokens + 1], sgd_h, rt)
        rt.sync()
    print(f"global SGD {'compiled' if h.global_ttt_compile else 'eager'}{' replayed' * h.global_ttt_cuda_graph}: "
          f"{1000 * (time.perf_counter() - t0) / sgd_steps:.1f} ms/step at {sgd_h.global_ttt_chunk_tokens} tokens/step "
          "(graphs captured again per call)")
    print(f"\n{'cpu ms/step':>11} {'calls/step':>10}  op (self CPU time)")
    for e in cpu[:15]:
        print(f"{e.self_cpu_time_total / 1000 / steps:11.2f} {e.count / steps:10.0f}  {e.key[:100]}")


if __name__ == "__main__":
    main()
