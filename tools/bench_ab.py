"""In-process A/B of the training step's speed: one model, compiled for both settings, then
timed in alternating rounds (A B, B A, A B, ...), each phase (looping off, then on) apart, so
drift of the GPU's clocks or of a shared host cannot decide the comparison. Two BENCH_STEPS
runs of the same code on one GPU in one lease differed by up to 11% without the loop and 24%
with it (records/speed/2026-12-02_profile_pair_bf16_stream); the changes measured here are smaller.

A is train_gpt.py's environment (the proxy's on the device), B the same plus NAME=VALUE settings.
Only settings read at every step can be switched in one process (RUNTIME_SETTINGS); any other
one fixes the model's shape or its graphs: compare those in two runs (tools/device_ab.sh).
    python3 tools/bench_ab.py NAME=VALUE [NAME=VALUE ...] [--rounds 4] [--steps 10]"""
import argparse
import os
import statistics
import sys
import time

RUNTIME_SETTINGS = {"RESIDUAL_BF16"}  # read by GPT.hidden at every forward


def parse_settings(items, ap):
    settings = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not name:
            ap.error(f"{item!r}: expected NAME=VALUE")
        if name not in RUNTIME_SETTINGS:
            ap.error(f"{name} cannot be switched in one process (switchable: {', '.join(sorted(RUNTIME_SETTINGS))}); "
                     "compare it in two runs (tools/device_ab.sh)")
        settings[name] = value
    return settings


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("settings", nargs="+", help="B's NAME=VALUE settings")
    ap.add_argument("--rounds", type=int, default=4, help="timed rounds per setting and phase")
    ap.add_argument("--steps", type=int, default=10, help="steps per round")
    args = ap.parse_args(argv)
    if args.rounds < 2 or args.steps < 1:
        ap.error("--rounds must be at least 2 (each setting goes first once) and --steps at least 1")
    settings = parse_settings(args.settings, ap)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import train_gpt as tg

    try:
        h = tg.Hyperparameters.from_env()
        b = tg.Hyperparameters.from_env({**os.environ, **settings})  # B's values parsed and checked as the script would
    except tg.ConfigError as e:
        ap.error(str(e))
    fields = [name.lower() for name in settings]
    setting = {"A": {f: getattr(h, f) for f in fields}, "B": {f: getattr(b, f) for f in fields}}
    if setting["A"] == setting["B"]:
        ap.error(f"B's settings equal A's ({setting['A']}): nothing to compare")
    rt = tg.Runtime(h)
    model = rt.place(tg.GPT(h))
    trainer = tg.Trainer(model, h, rt)
    loader = tg.new_train_loader(h, rt, tg.shard_files(h.data_path, "train"))
    phases = [False, True] if h.num_loops > 0 else [False]

    def use(name):  # model.h is h: the switch takes effect at the next forward
        for f, v in setting[name].items():
            setattr(h, f, v)

    def run(name, looping, steps):
        use(name)
        rt.sync()
        t0 = time.perf_counter()
        for i in range(steps):
            trainer.step(loader, i, 0.0, looping)
        rt.sync()
        return 1000 * (time.perf_counter() - t0) / steps

    t0 = time.perf_counter()
    for looping in phases:
        for name in "AB":
            run(name, looping, 3)  # compiles each setting's graphs
    print(f"bench_ab: A {setting['A']} B {setting['B']}; compile + warm-up {time.perf_counter() - t0:.1f}s; "
          f"{args.rounds} rounds of {args.steps} steps; attention {rt.attn_backend}, world size {rt.world_size}",
          flush=True)
    for looping in phases:
        ms = {"A": [], "B": []}
        for r in range(args.rounds):
            order = "AB" if r % 2 == 0 else "BA"
            for name in order:
                ms[name].append(run(name, looping, args.steps))
            print(f"bench_ab: looping:{int(looping)} round {r + 1} ({order[0]} first): A {ms['A'][-1]:.2f} "
                  f"B {ms['B'][-1]:.2f} ms/step", flush=True)
        ratios = [mb / ma for ma, mb in zip(ms["A"], ms["B"])]
        med_a, med_b = statistics.median(ms["A"]), statistics.median(ms["B"])
        print(f"bench_ab: looping:{int(looping)} median ms/step A {med_a:.2f} B {med_b:.2f}; B/A per round "
              f"{' '.join(f'{x:.4f}' for x in ratios)} (median {statistics.median(ratios):.4f}); tok/s A "
              f"{h.train_batch_tokens / med_a * 1000:.0f} B {h.train_batch_tokens / med_b * 1000:.0f}", flush=True)
    rt.close(ok=True)


if __name__ == "__main__":
    main()
