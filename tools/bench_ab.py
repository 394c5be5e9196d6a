"""In-process A/B of the training step's speed: two models in one process, each compiled, timed
in alternating rounds (A B, B A, A B, ...), each phase (looping off, then on) apart, so drift of
the GPU's clocks or of a shared host cannot decide the comparison. Two BENCH_STEPS runs of the
same code on one GPU in one lease differed by up to 11% without the loop and 24% with it
(records/speed/2026-12-02_profile_pair_bf16_stream); the changes measured here are smaller.

A is train_gpt.py's environment (the proxy's on the device), B the same plus NAME=VALUE settings,
each model built from the same seed and fed the same batches. Settings the process makes once for
both (PROCESS_SETTINGS) cannot differ: compare those in two runs (tools/device_ab.sh). Both
models' memory is held at once (the proxy's peak is ~15 GiB a model, 786K tokens a step ~47).
Warm-up seconds are each model's first steps of each phase; B's may reuse graphs A compiled.
    python3 tools/bench_ab.py NAME=VALUE [NAME=VALUE ...] [--rounds 4] [--steps 10]"""
import argparse
import os
import statistics
import sys
import time
from dataclasses import fields

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train_gpt as tg  # noqa: E402

# one per process: the Runtime (device, attention, compile, ranks), the data, the run's files
PROCESS_SETTINGS = {"ATTN_BACKEND", "COMPILE", "DATA_PATH", "BENCH_STEPS", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                    "RUN_ID", "LOG_DIR"}
# settings whose auto resolves per load and device: B differs from A only if they resolve apart
RESOLVED = {"train_cuda_graph": tg.train_cuda_graph_on, "fused_mlp": lambda h, rt: tg.fused_mlp_on(h),
            "kv_repeat": lambda h, rt: tg.kv_repeat_on(h.kv_repeat)}


def parse_settings(items, ap):
    known = {f.name.upper() for f in fields(tg.Hyperparameters)}
    settings = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not name:
            ap.error(f"{item!r}: expected NAME=VALUE")
        if name not in known:
            ap.error(f"{name} is not a setting of train_gpt.py")
        if name in PROCESS_SETTINGS:
            ap.error(f"{name} is one per process: compare it in two runs (tools/device_ab.sh)")
        settings[name] = value
    return settings


def shapes(runs):
    """Each model's TRAIN_CUDA_GRAPH micro-step shapes (MicroStepGraphs.summary), if it has them."""
    return {name: r["trainer"].graphs.summary() for name, r in runs.items() if r["trainer"].graphs}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("settings", nargs="+", help="B's NAME=VALUE settings")
    ap.add_argument("--rounds", type=int, default=4, help="timed rounds per model and phase")
    ap.add_argument("--steps", type=int, default=10, help="steps per round")
    args = ap.parse_args(argv)
    if args.rounds < 2 or args.steps < 1:
        ap.error("--rounds must be at least 2 (each model goes first once) and --steps at least 1")
    settings = parse_settings(args.settings, ap)
    try:
        hp = {"A": tg.Hyperparameters.from_env()}
        hp["B"] = tg.Hyperparameters.from_env({**os.environ, **settings})  # parsed and checked as the script would
    except tg.ConfigError as e:
        ap.error(str(e))
    differ = {f: (getattr(hp["A"], f), getattr(hp["B"], f)) for f in (name.lower() for name in settings)}
    differ = {f: v for f, v in differ.items() if v[0] != v[1]}
    if not differ:
        ap.error(f"B's settings equal A's ({', '.join(args.settings)}): nothing to compare")
    rt = tg.Runtime(hp["A"])
    state = {f: {name: "on" if on(h, rt) else "off" for name, h in hp.items()} for f, on in RESOLVED.items()}
    same = [f for f in differ if f in RESOLVED and state[f]["A"] == state[f]["B"]]
    if same and len(same) == len(differ):
        ap.error("; ".join(f"B's {f.upper()}={getattr(hp['B'], f)} means {state[f]['A']} here, as A's "
                           f"{getattr(hp['A'], f)}" for f in same) + ": nothing to compare")
    graphs = state["train_cuda_graph"]
    files = tg.shard_files(hp["A"].data_path, "train")
    runs = {}
    for name, h in hp.items():
        torch.manual_seed(h.seed)  # the same initial weights where the shapes agree
        model = rt.place(tg.GPT(h))
        runs[name] = dict(h=h, trainer=tg.Trainer(model, h, rt), loader=tg.new_train_loader(h, rt, files), loss=None)
        print(f"bench_ab: {name} {sum(p.numel() for p in model.parameters())} parameters", flush=True)
    print(f"bench_ab: B differs in {', '.join(f'{f} {a!r} -> {b!r}' for f, (a, b) in differ.items())}; "
          f"{args.rounds} rounds of {args.steps} steps; attention {rt.attn_backend}, compile {rt.compile}, "
          f"world size {rt.world_size}; training CUDA graphs A {graphs['A']}, B {graphs['B']}; fused MLP "
          f"A {state['fused_mlp']['A']}, B {state['fused_mlp']['B']}; K/V repeat A {state['kv_repeat']['A']}, "
          f"B {state['kv_repeat']['B']}", flush=True)
    phases = [False, True] if hp["A"].num_loops > 0 or hp["B"].num_loops > 0 else [False]

    def run(name, looping, steps):
        r = runs[name]
        rt.sync()
        t0 = time.perf_counter()
        for i in range(steps):
            r["loss"] = r["trainer"].step(r["loader"], i, 0.0, looping)
        rt.sync()
        return 1000 * (time.perf_counter() - t0) / steps

    for looping in phases:
        warm = {name: run(name, looping, 3) * 3 / 1000 for name in "AB"}  # compiles each model's graphs
        print(f"bench_ab: looping:{int(looping)} warm-up (3 steps) A {warm['A']:.1f}s B {warm['B']:.1f}s", flush=True)
    graphs_seen = shapes(runs)
    for name, summary in graphs_seen.items():
        print(f"bench_ab: {name} after the warm-up: TRAIN_CUDA_GRAPH {summary}", flush=True)
    for looping in phases:
        ms = {"A": [], "B": []}
        for r in range(args.rounds):
            order = "AB" if r % 2 == 0 else "BA"
            for name in order:
                ms[name].append(run(name, looping, args.steps))
            print(f"bench_ab: looping:{int(looping)} round {r + 1} ({order[0]} first): A {ms['A'][-1]:.2f} "
                  f"B {ms['B'][-1]:.2f} ms/step", flush=True)
        ratios = [mb / ma for ma, mb in zip(ms["A"], ms["B"])]
        med = {name: statistics.median(v) for name, v in ms.items()}
        tok_s = {name: runs[name]["h"].train_batch_tokens / med[name] * 1000 for name in med}
        print(f"bench_ab: looping:{int(looping)} median ms/step A {med['A']:.2f} B {med['B']:.2f}; B/A per round "
              f"{' '.join(f'{x:.4f}' for x in ratios)} (median {statistics.median(ratios):.4f}); tok/s A "
              f"{tok_s['A']:.0f} B {tok_s['B']:.0f} (B/A {tok_s['B'] / tok_s['A']:.4f})", flush=True)
    for name, r in runs.items():  # what each model did: the same batches, its own loss
        print(f"bench_ab: {name} took {r['loader'].taken} tokens, last loss {float(r['loss']):.4f}", flush=True)
    graphs_now = shapes(runs)
    if graphs_now != graphs_seen:  # a shape first met in a round: its plain step and capture were timed
        print(f"bench_ab: new TRAIN_CUDA_GRAPH shapes in the timed rounds (each a plain step and a capture): "
              f"{graphs_now}", flush=True)
    if rt.device.type == "cuda":
        print(f"bench_ab: peak memory of both models: {torch.cuda.max_memory_allocated() // 2**20} MiB allocated, "
              f"{torch.cuda.max_memory_reserved() // 2**20} MiB reserved", flush=True)
    rt.close(ok=True)


if __name__ == "__main__":
    main()
