"""Evaluate an artifact on its own (issue 11): train_gpt.py's scored evaluation (evaluate_artifact:
load, quantized diagnostic, TTT warm-up, phased TTT, leftover windows), timed from reading the
artifact, with no training. Same environment variables as train_gpt.py: ARTIFACT_PATH names the
artifact, DATA_PATH the val shard (e.g. tools/eval_workload.py's FineWeb-shaped one).

    python3 tools/eval_artifact.py [--make-artifact] [--precompile] [--compile-times]

--make-artifact  first write ARTIFACT_PATH from the untrained model (seeded init, GPTQ on train
               shards in DATA_PATH): a timing stand-in, its scores mean nothing.
--precompile   first compile the eval graphs outside the timer on a throwaway model and two rows
               of val, as the training run's pre-quantization diagnostic does before the eval timer
               starts (without it: a separate eval process, where every compile counts).
--compile-times  after the eval, print Dynamo/Inductor's compile seconds by phase, and the
               seconds of the first TTT batch and global SGD call (the warm-up's; with
               GLOBAL_TTT_COMPILE=0 the warm-up has no global SGD step: the first phase's).
--memory-gib G  let the caching allocator use at most G GiB of the GPU (CUDA-graph pools included),
               e.g. 79 for an H100's 80 GB on a 141 GB H200: does the eval fit the competition's card?
(GLOBAL_TTT_COMPILE=1 is the A/B of compiling global SGD.)
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train_gpt as tg  # noqa: E402


def timed_first_calls(names, seconds):
    """Wrap train_gpt's functions `names` so that each one's first call's seconds land in `seconds`."""
    for name in names:
        fn = getattr(tg, name)

        def wrapper(*args, _fn=fn, _name=name, **kwargs):
            if _name in seconds:
                return _fn(*args, **kwargs)
            t = time.perf_counter()
            out = _fn(*args, **kwargs)
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            seconds[_name] = time.perf_counter() - t
            return out

        setattr(tg, name, wrapper)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make-artifact", action="store_true")
    ap.add_argument("--precompile", action="store_true")
    ap.add_argument("--compile-times", action="store_true")
    ap.add_argument("--memory-gib", type=float)
    args = ap.parse_args(argv)
    if args.memory_gib is not None and not torch.cuda.is_available():
        ap.error("--memory-gib needs a CUDA device")
    h = tg.Hyperparameters.from_env()
    if not args.make_artifact and not os.path.isfile(h.artifact_path):
        sys.exit(f"error: ARTIFACT_PATH={h.artifact_path} is not a file")
    rt = tg.Runtime(h, new_log=True)
    try:
        # so a record's eval logs say which variant each one ran (train_gpt.py's first line does it for a run)
        changed = h.changed
        rt.log(f"eval_artifact: {len(changed)} settings differ from the defaults: {' '.join(changed)}")
        if args.memory_gib is not None:
            total = torch.cuda.get_device_properties(rt.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gib * 2**30 / total), rt.device)
            rt.log(f"eval_artifact: memory capped at {args.memory_gib:g} GiB of {total / 2**30:.1f}")
        if args.make_artifact:
            model = tg.GPT(h).to(rt.device)
            sys.argv[0] = tg.__file__  # the code bytes write_artifact counts: train_gpt.py's
            tg.write_artifact(tg.quantize_model(model, h, rt, tg.shard_files(h.data_path, "train"), 0.0), h, rt)
            del model
        val = tg.load_val_set(h, tg.build_sentencepiece_luts(tg.load_tokenizer(h), h.vocab_size))
        rt.log(f"eval_artifact: {h.artifact_path} val_tokens:{len(val.tokens)} world_size:{rt.world_size} "
               f"attention_backend:{rt.attn_backend} compile:{rt.compile}")
        if args.precompile:
            t0 = time.perf_counter()
            n = 2 * h.val_batch_tokens + 1
            model = rt.place(tg.GPT(h).unfuse_mlp())  # as load_artifact_model's: the graphs the timed eval runs
            tg.eval_val(model, h, rt, tg.ValSet(val.tokens[:n], val.target_bytes[:n]))
            rt.sync()
            rt.log(f"eval_artifact: eval graphs precompiled in {time.perf_counter() - t0:.1f}s (outside the timer)")
        seconds = {}
        if args.compile_times:
            timed_first_calls(("ttt_batch", "global_sgd"), seconds)
        tg.evaluate_artifact(h, rt, val)
        if args.compile_times:
            rt.log("eval_artifact: first calls: " +
                   " ".join(f"{k}:{v:.1f}s" for k, v in seconds.items()))
            rt.log(str(torch._dynamo.utils.compile_times(repr="str", aggregate=True)))
        rt.close(ok=True)
    finally:
        rt.close()


if __name__ == "__main__":
    main()
