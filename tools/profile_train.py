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
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(steps):
                trainer.step(loader, i, 0.0, looping)
            rt.sync()
        wall = (time.perf_counter() - t0) / steps
        print_kernels(prof, steps, wall, h.train_batch_tokens,
                      f"looping={looping} micro_tokens={h.micro_tokens} accum={h.grad_accum_steps}")


def print_kernels(prof, steps, wall, batch_tokens, label):
    """Wall vs summed kernel time per step and the top PROFILE_ROWS (40) kernels of a profile (also
    tools/profile_leader.py's)."""
    events = prof.key_averages()
    kernels = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total),
                     key=lambda e: -e.self_device_time_total)
    kernel_us = sum(e.self_device_time_total for e in kernels)
    print(f"\n== {label}: wall {1000 * wall:.1f} ms/step, kernels {kernel_us / 1000 / steps:.1f} ms/step, "
          f"{batch_tokens / wall:.0f} tok/s")
    print(f"{'ms/step':>8} {'calls/step':>10} {'us/call':>8}  kernel")
    for e in kernels[:int(os.environ.get("PROFILE_ROWS", "40"))]:
        print(f"{e.self_device_time_total / 1000 / steps:8.2f} {e.count / steps:10.0f} "
              f"{e.self_device_time_total / max(e.count, 1):8.1f}  {e.key[:110]}", flush=True)


if __name__ == "__main__":
    main()
