"""Artifact container size on a synthetic model-shaped qstate (the config's tensors, GPTQ codes drawn
i.i.d. from a clipped Student-t at the configured clip, seeded) or on an artifact's own codes: the rANS
container of train_gpt.py against the previous container (brotli-11 per code array), and the codes'
entropy. Both of these leave out LQER's factors (an artifact's are in its rANS container).
    python3 tools/bench_pack.py [seed] [NAME=VALUE ...]   (NAME=VALUE: train_gpt.py settings, e.g. MODEL_DIM=256)
    python3 tools/bench_pack.py ARTIFACT                   (an artifact file's codes instead)
This isolates the entropy coder."""
import json
import os
import sys
import time

import brotli
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import train_gpt as tg  # noqa: E402


def synthetic_qstate(h, rng):
    q = {}
    model = tg.GPT(h)
    plans = tg.quant_plans(model, h)
    for name, t in model.state_dict().items():
        plan = plans[name]
        if plan[0] == "gptq":
            top = 2 ** (plan[1] - 1) - 1
            w = rng.standard_t(5, t.shape) / np.sqrt(5 / 3)  # unit std, heavier tails than a Gaussian
            codes = np.clip(np.round(w * top / plan[2]), -top, top).astype(np.int8)
            q[name] = tg.QuantEntry("gptq", torch.from_numpy(codes),
                                    torch.from_numpy(rng.uniform(1e-3, 2e-3, t.shape[0])).half(), plan[1])
        elif plan[0] == "int8row":
            q[name] = tg.QuantEntry("int8row", torch.from_numpy(rng.integers(-127, 128, t.shape, dtype=np.int8)),
                                    torch.from_numpy(rng.uniform(1e-3, 2e-3, t.shape[0])).half())
        else:
            q[name] = tg.QuantEntry("fp16", t.half())
    return q


def brotli_container_bytes(q):
    """The previous format: manifest, one byte-shuffled fp16 stream, one brotli stream per code array."""
    comp = lambda b: len(brotli.compress(b, quality=11, lgwin=24))  # noqa: E731
    halves = b"".join((e.data if e.kind == "fp16" else e.scale).numpy().view(np.int16).tobytes() for e in q.values())
    manifest = json.dumps([[n, e.kind] for n, e in q.items()]).encode()
    codes = [e.data.numpy().tobytes() for e in q.values() if e.kind != "fp16"]
    return 8 + 4 * (2 + len(codes)) + comp(manifest) + comp(tg._shuffle_bytes(halves, 2)) + sum(map(comp, codes))


def main():
    args = sys.argv[1:]
    if args and os.path.isfile(args[0]):
        with open(args[0], "rb") as f:
            packed = f.read()
        q = tg.unpack_artifact(packed)
        print(f"{args[0]}: {len(packed)} bytes")
    else:
        seed = int(args.pop(0)) if args and "=" not in args[0] else 0
        q = synthetic_qstate(tg.Hyperparameters.from_env(dict(a.split("=", 1) for a in args)), np.random.default_rng(seed))
    entropy = 0.0
    for e in q.values():
        if e.kind != "fp16" and e.data.numel() >= tg.RANS_MIN_VALUES:
            c = np.bincount(e.data.numpy().ravel().astype(np.int64) + 128, minlength=256)
            p = c[c > 0] / c.sum()
            entropy += -(p * np.log2(p)).sum() * c.sum() / 8
    t0 = time.perf_counter()
    blob = tg.pack_artifact(q)
    t1 = time.perf_counter()
    tg.unpack_artifact(blob)
    t2 = time.perf_counter()
    old = brotli_container_bytes(q)
    print(f"code values: {sum(e.data.numel() for e in q.values() if e.kind != 'fp16')}; "
          f"entropy of the rANS-coded arrays: {entropy:.0f} bytes")
    print(f"brotli-per-array container: {old} bytes")
    print(f"rANS container: {len(blob)} bytes (pack {t1 - t0:.1f}s, unpack {t2 - t1:.1f}s); {old - len(blob)} bytes less")


if __name__ == "__main__":
    main()
