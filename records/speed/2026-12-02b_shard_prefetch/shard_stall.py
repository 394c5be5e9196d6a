"""The training loader's stall at a shard boundary (CPU only, no GPU): two 100M-token shards
(FineWeb's size) of random ids; the loader of one rank of an 8-GPU run (98,304 tokens a
micro-batch; 786,440 consumed per call), called with a 20 ms pause standing in for the GPU's step.
Prints the slowest call, call 128 (the one that crosses into shard 2) and the median.
    python3 records/speed/2026-12-02b_shard_prefetch/shard_stall.py DIR   (DIR holds the train_gpt.py to time)
Before the change: DIR with `git show d3db6fa:train_gpt.py`; after: the repo root."""
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.abspath(sys.argv[1]))
import train_gpt as tg  # noqa: E402

DATA, N, PAUSE = "/tmp/shard_stall", 100_000_000, 0.02
os.makedirs(DATA, exist_ok=True)
rng = np.random.default_rng(0)
for i in range(2):
    path = f"{DATA}/fineweb_train_{i:06d}.bin"
    if not os.path.exists(path):
        tokens = rng.integers(0, 8192, N, dtype=np.uint16)
        tokens[::500] = tg.BOS_ID
        header = np.zeros(256, dtype="<i4")
        header[:3] = tg.SHARD_MAGIC, tg.SHARD_VERSION, N
        with open(path, "wb") as f:
            f.write(header.tobytes() + tokens.astype("<u2").tobytes())
loader = tg.DocumentPackingLoader(tg.shard_files(DATA, "train"), 98304, 2048, 0, 8, torch.device("cpu"), 8192)
ms = []
for _ in range(140):
    time.sleep(PAUSE)
    t0 = time.perf_counter()
    loader.next_batch()
    ms.append(1000 * (time.perf_counter() - t0))
slow = int(np.argmax(ms))
print(f"{sys.argv[1]}: slowest call {slow + 1} of 140, {ms[slow]:.1f} ms; call 128 {ms[127]:.1f} ms; "
      f"median {np.median(ms):.2f} ms")
