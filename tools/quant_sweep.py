"""Quantization variants on ONE trained model: trains as train_gpt.py does (same environment),
collects the GPTQ Hessians once, then for each variant quantizes the EMA weights, packs the
artifact (exact bytes) and scores the dequantized model on val (disjoint windows). Answers
"what does MLP_CLIP_SIGMAS=12 cost in bytes and gain in bpb" from one training run.
    python3 tools/quant_sweep.py base MLP_CLIP_SIGMAS=12 LQER_ENABLED=0 MLP_CLIP_SIGMAS=12,LQER_RANK=8
A variant is 'base' (the environment as is) or comma-separated NAME=VALUE overrides of
quantization variables (Hessians are shared, so calibration variables cannot change)."""
import os
import sys
import time


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import train_gpt as tg  # noqa: E402

SHARED = {"GPTQ_CALIBRATION_TOKENS"}  # fixed by the one Hessian collection


def variant_h(h, spec):
    if spec == "base":
        return h
    overrides = dict(kv.split("=", 1) for kv in spec.split(","))
    if SHARED & set(overrides):
        raise SystemExit(f"{spec}: {', '.join(sorted(SHARED & set(overrides)))} cannot vary (Hessians are shared)")
    return tg.Hyperparameters.from_env({**os.environ, **overrides})


def main(argv):
    specs = argv or ["base"]
    h = tg.Hyperparameters.from_env()
    rt = tg.Runtime(h)
    variants = [(spec, variant_h(h, spec)) for spec in specs]  # bad names/values fail before training
    train_files = tg.shard_files(h.data_path, "train")
    val = tg.load_val_set(h, tg.build_sentencepiece_luts(tg.load_tokenizer(h), h.vocab_size))
    model = rt.place(tg.GPT(h))  # seeded, TF32 and compiled by Runtime, as in train_gpt.py
    tg.compile_warmup(model, h, rt, train_files)
    tg.train_model(model, h, rt, train_files, val, tg.training_budget(model, h, rt, train_files))
    model.unfuse_mlp()  # the eval's MLP, as train_gpt.py's after training
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with tg.exact_fp32():  # as tg.run_gptq; the evals below run in TF32 like train_gpt.py's
        hessians = tg.collect_hessians(model, h, rt, train_files)
    _, pre_bpb, _ = tg.eval_val(model, h, rt, val)
    code = tg.counted_code_bytes(tg.__file__)[1]
    rt.log(f"quant_sweep: pre-quant val_bpb {pre_bpb:.8f}; code {code} bytes")
    rt.log(f"{'variant':<40} {'model bytes':>12} {'total bytes':>12} {'val_bpb':>11} {'gap':>9} {'quant s':>8}")
    for spec, hv in variants:
        t0 = time.perf_counter()
        with tg.exact_fp32():
            qstate = tg.quantize_state(trained, tg.quant_plans(model, hv), hessians, hv, rt.log)
        t_quant = time.perf_counter() - t0
        size = len(tg.pack_artifact(qstate)) if rt.master else 0
        model.load_state_dict(tg.dequantize_state(qstate, trained, hv.lqer_group))
        _, bpb, _ = tg.eval_val(model, hv, rt, val)
        rt.log(f"{spec:<40} {size:>12} {size + code:>12} {bpb:>11.8f} {bpb - pre_bpb:>+9.5f} {t_quant:>8.1f}")
    rt.close()


if __name__ == "__main__":
    main(sys.argv[1:])
