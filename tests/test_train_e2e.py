"""train_gpt.py end to end on the CPU: a tiny config learns, 2 ranks (torchrun, gloo) compute
the same steps as 1 process and evaluate like it (quantized, TTT, sliding), a non-finite loss
stops the run, eval_val scores every target once independently of how windows are packed, and
the sliding diagnostic after TTT scores the unadapted model."""
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from helpers_train import final_val, parse_train_log, make_model, run_script, script_env, tiny_dataset, tiny_h, train_losses


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("data"))


def run(tmp_path_factory, data, name, nproc=1, **env):
    work = tmp_path_factory.mktemp(name)
    r = run_script(script_env(work, *data, **env), work, nproc=nproc)
    out = r.stdout + r.stderr
    return r.returncode, out, work


@pytest.fixture(scope="module")
def long_run(tmp_path_factory, data):
    return run(tmp_path_factory, data, "long", ITERATIONS=30, WARMUP_STEPS=2, EMA_DECAY=0.9)


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory, data):
    env = dict(ITERATIONS=3, WARMUP_STEPS=0, ENABLE_LOOPING_AT=0.3, VAL_BATCH_TOKENS=128, EVAL_SEQ_LEN=128, SLIDING_MODE="windows")
    return {n: run(tmp_path_factory, data, f"n{n}", nproc=n, **env) for n in (1, 2)}


def test_tiny_config_learns(long_run, data):
    rc, out, work = long_run
    assert rc == 0, out[-4000:]
    vocab = data[2]
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, 31)), out[-3000:]
    assert abs(losses[1] - math.log(vocab)) < 0.1  # zero-init projections: uniform-ish start
    last = np.mean([losses[s] for s in range(26, 31)])
    assert last < losses[1] - 2.0, losses
    val_loss, val_bpb = final_val(out)
    assert math.isfinite(val_loss) and val_loss < losses[1] - 1.5
    # bpb = loss / ln 2 * tokens / bytes of the val stream, with the tokenizer's byte accounting
    import sentencepiece as spm

    val = np.concatenate([tg.load_data_shard(f) for f in tg.shard_files(str(data[0]), "val")])
    luts = tg.build_sentencepiece_luts(spm.SentencePieceProcessor(model_file=str(data[1])), vocab)
    n_bytes = int(tg.stream_target_bytes(val, luts).sum())
    assert val_bpb == pytest.approx(val_loss / math.log(2) * (len(val) - 1) / n_bytes, rel=1e-6)
    assert re.search(rf"^train_shards: 3 val_tokens: {len(val)} val_bytes: {n_bytes} \(LUT accounting\)$", out, re.M)
    assert re.search(r"^layer_loop:enabled step:11 ", out, re.M)  # ENABLE_LOOPING_AT=0.35 of 30 steps
    assert "fused_mlp: auto (on)" in out  # trained through the fused MLP's reference (the eval's is unfused)
    log = (work / "logs" / "test.txt").read_text()
    assert "diagnostic pre-quantization post-ema val_loss:" in log and "class Hyperparameters" in log
    assert train_losses(log) == losses


def test_compile_warmup_restores_the_initial_state(long_run, short_runs):
    """The first step's loss is computed before any update: equal with 2 warmup steps (which
    train, then restore the weights and restart the loader) and with none."""
    rc1, out1, _ = long_run
    rc2, out2, _ = short_runs[1]
    assert rc1 == 0 and rc2 == 0
    assert train_losses(out1)[1] == train_losses(out2)[1]


def test_two_ranks_compute_the_same_steps_as_one_process(short_runs):
    (rc1, out1, _), (rc2, out2, _) = short_runs[1], short_runs[2]
    assert rc1 == 0, out1[-4000:]
    assert rc2 == 0, "torchrun --nproc_per_node=2 (gloo) failed:\n" + out2[-6000:]
    assert "world_size: 1 grad_accum_steps: 2" in out1 and "world_size: 2 grad_accum_steps: 1" in out2
    l1, l2 = train_losses(out1), train_losses(out2)
    assert sorted(l1) == sorted(l2) == [1, 2, 3]
    assert "layer_loop:enabled step:1 " in out1 and "layer_loop:enabled step:1 " in out2
    for step in l1:  # losses are logged with 4 decimals
        assert abs(l1[step] - l2[step]) <= 1e-4 * abs(l1[step]) + 1e-4, (step, l1, l2)
    assert l1[3] < l1[1]  # the steps did change the weights
    v1, v2 = final_val(out1), final_val(out2)
    assert v1 == pytest.approx(v2, rel=1e-4)


def test_non_finite_loss_stops_the_run(tmp_path_factory, data):
    rc, out, _ = run(tmp_path_factory, data, "nan", ITERATIONS=20, WARMUP_STEPS=0,
                     MATRIX_LR=1e30, SCALAR_LR=1e30, TIED_EMBED_LR=1e30)
    assert rc != 0
    m = re.search(r"FloatingPointError: non-finite train loss (nan|inf|-inf) at step (\d+); stopping", out)
    assert m, out[-3000:]
    assert int(m.group(2)) < 20
    assert "diagnostic pre-quantization" not in out


# ---------------------------------------------------------------------------------------
# eval_val in process
# ---------------------------------------------------------------------------------------


def val_stream(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([np.r_[tg.BOS_ID, rng.integers(4, vocab, n - 1)] for n in lengths]).astype(np.uint16)


def reference_bytes(prev, tgt, luts):
    """The challenge's formula, target by target: base_bytes[y] + (has_space[y] and not is_boundary[x])."""
    base, space, boundary = luts
    return sum(int(base[y]) + int(bool(space[y]) and not bool(boundary[x])) for x, y in zip(prev.tolist(), tgt.tolist()))


def reference_eval(model, tokens, luts):
    """Documents shorter than EVAL_SEQ_LEN: each document's targets (including the next BOS)
    scored with the document alone as context, looping on (the default)."""
    starts = list(np.flatnonzero(tokens == tg.BOS_ID)) + [len(tokens) - 1]
    loss, n_bytes = 0.0, 0
    t = torch.from_numpy(tokens.astype(np.int64))
    for s, e in zip(starts[:-1], starts[1:]):
        x, y = t[s:e].view(1, -1), t[s + 1:e + 1].view(1, -1)
        with torch.no_grad():
            loss += float(model.token_losses(x, y, torch.tensor([0, e - s], dtype=torch.int32), e - s).double().sum())
        n_bytes += reference_bytes(x[0], y[0], luts)
    return loss / (len(tokens) - 1), loss / (math.log(2) * n_bytes)


def test_eval_val_scores_every_target_once_for_any_packing(tmp_path):
    tg.use_attention_backend("sdpa", torch.device("cpu"))
    h = tiny_h(eval_seq_len=64, val_batch_tokens=128, log_dir=str(tmp_path), run_id="ev")  # disjoint: any row length
    rt = tg.Runtime(h)
    model = make_model(h, seed=3)
    tokens = val_stream(h.vocab_size, [30, 5, 64, 12, 1, 40, 22, 9])
    rng = np.random.default_rng(0)
    luts = (rng.integers(0, 4, h.vocab_size).astype(np.int64), rng.random(h.vocab_size) < 0.5,
            np.zeros(h.vocab_size, dtype=bool))
    luts[2][:4] = True
    ref_loss, ref_bpb = reference_eval(model, tokens, luts)
    val = tg.ValSet(tokens, tg.stream_target_bytes(tokens, luts))
    for vbt in (64, 128, 512):
        h.val_batch_tokens = vbt
        out = tg.eval_val(model, h, rt, val)
        assert out[0] == pytest.approx(ref_loss, rel=1e-5) and out[1] == pytest.approx(ref_bpb, rel=1e-5), vbt
        assert len(out) == 3 and out[2] == len(tokens) - 1


EVAL_ENV = dict(ITERATIONS=3, WARMUP_STEPS=0, SLIDING_EVAL=1, EVAL_STRIDE=64, EVAL_BUDGET_SECONDS=100000,
                TTT_BATCH_SIZE=8, TTT_CHUNK_SIZE=64, TTT_EVAL_SEQ_LEN=128, TTT_TAIL_CHUNK_SIZE=0, TTT_LORA_RANK=4,
                PHASED_TTT_PREFIX_DOCS=16, PHASED_TTT_NUM_PHASES=1, GLOBAL_TTT_CHUNK_TOKENS=1024,
                GLOBAL_TTT_SEQ_LEN=128, GLOBAL_TTT_LR=0.05)


EVAL_WORK = {}  # eval_runs' work folders (logs, artifact)


@pytest.fixture(scope="module")
def eval_runs(tmp_path_factory, data):
    """The whole evaluation with TTT on 1 and 2 ranks (gloo), and without TTT on 1 rank."""
    runs = {name: run(tmp_path_factory, data, name, nproc=n, TTT_ENABLED=t, **EVAL_ENV)
            for name, n, t in (("ttt1", 1, 1), ("ttt2", 2, 1), ("plain", 1, 0))}
    for name, (rc, out, work) in runs.items():
        assert rc == 0, name + "\n" + out[-4000:]
        EVAL_WORK[name] = work
    return {name: out for name, (_, out, _) in runs.items()}


def eval_score(text, label):
    """(position in the log, val_loss, val_bpb, scored targets) of one eval line."""
    m = re.search(rf"^{label} val_loss:(\S+) val_bpb:(\S+) eval_time:\d+ms scored_targets:(\d+)$", text, re.M)
    assert m, label + "\n" + text[-3000:]
    return m.start(), float(m[1]), float(m[2]), int(m[3])


def test_sliding_diagnostic_runs_after_ttt_on_the_unadapted_model(eval_runs):
    """With TTT on, the order is quantized -> TTT (the score) -> sliding, and the sliding eval
    reloads the artifact: it equals the sliding score of the same run without TTT, although TTT's
    global SGD phase changed the base weights."""
    with_ttt, without = eval_runs["ttt1"], eval_runs["plain"]
    q, ttt, sliding = (eval_score(with_ttt, lb) for lb in ("diagnostic quantized", "quantized_ttt_phased",
                                                          "diagnostic quantized_sliding_window"))
    assert q[0] < ttt[0] < sliding[0]
    assert re.search(r"^ttpp: phase:1/1 pd:\d+ gd:16 sgd:", with_ttt, re.M)  # the base weights did move
    assert sliding[2] == eval_score(without, "diagnostic quantized_sliding_window")[2]
    assert ttt[2] != sliding[2]
    assert "quantized_ttt_phased" not in without


def test_two_ranks_evaluate_like_one(eval_runs):
    """2 ranks split the windows and the TTT batches: every target is still scored once, the
    quantized and sliding scores equal one rank's (up to summation order), and phased TTT (whose
    adapters depend on which rank took which batch) lands close to it."""
    one, two = eval_runs["ttt1"], eval_runs["ttt2"]
    assert "world_size: 2" in two
    for label in ("diagnostic quantized", "diagnostic quantized_sliding_window", "quantized_ttt_phased"):
        a, b = eval_score(one, label), eval_score(two, label)
        assert a[3] == b[3], label  # scored targets
        tol = 5e-4 if label == "quantized_ttt_phased" else 1e-6  # TTT gains 0.014 bpb here
        assert b[1] == pytest.approx(a[1], abs=tol) and b[2] == pytest.approx(a[2], abs=tol), (label, a, b)


def test_eval_stages_line_on_one_and_two_ranks(eval_runs):
    """`eval_stages:` names each stage that ran (no TTT warm-up: nothing is compiled on the CPU) with
    its seconds, and the documents TTT and the windows scored, over all ranks."""
    for name, out in eval_runs.items():
        r = parse_train_log(out)
        stages, ttt = r["eval_stages"], r["ttt"]
        ran = ["ttt", "leftover", "sliding", "total", "ttt_docs", "fallback_docs"] if ttt else ["sliding", "total"]
        assert list(stages) == ["load", "quantized", *ran], (name, stages)
        assert stages["total"] == r["total_eval_s"]
        if ttt:
            assert (stages["ttt_docs"], stages["fallback_docs"]) == (ttt["ttt_docs"], ttt["long_docs_sliding"]), name


def test_bench_mode_times_both_loop_phases_and_skips_gptq_and_eval(tmp_path_factory, data):
    rc, out, work = run(tmp_path_factory, data, "bench", BENCH_STEPS=2, WARMUP_STEPS=2)
    assert rc == 0, out[-3000:]
    lines = re.findall(r"^bench: looping:(\d) steps:2 ms/step:(\S+) tok/s:(\d+) .* mfu:(\S+)%$", out, re.M)
    assert [ln[0] for ln in lines] == ["0", "1"]
    assert all(float(ms) > 0 and int(tok) > 0 for _, ms, tok, _ in lines)
    assert re.search(r"^bench: compile_warmup_s:\S+ peak_mem_mib:\d+ reserved_mib:\d+ ", out, re.M)
    assert "gptq:" not in out and "val_bpb" not in out and not (work / "final_model.pgq").exists()


def test_attention_pairs_counts_every_scored_query_key_pair():
    cu = np.array([0, 5, 6, 17, 40])
    for window in (None, 0, 3, 100):
        brute = sum(min(i, window if window is not None else i) + 1
                    for s, e in zip(cu[:-1], cu[1:]) for i in range(e - s))
        assert tg.attention_pairs(cu, window) == brute


def test_flops_per_token_counts_matmuls_of_every_pass_and_the_head(tmp_path):
    h = tiny_h(num_loops=1, loop_start=1, loop_end=1, global_attn_layers=())
    h.local_window_size_early = h.local_window_size_late = 8
    model = tg.GPT(h)
    tokens = np.arange(h.micro_tokens * 8, dtype=np.uint16) % 7 + 2  # no BOS: one sequence per cut
    path = tmp_path / "fineweb_train_000000.bin"
    header = np.zeros(256, dtype="<i4")
    header[:3] = tg.SHARD_MAGIC, tg.SHARD_VERSION, len(tokens)
    path.write_bytes(header.tobytes() + tokens.astype("<u2").tobytes())
    flops = tg.flops_per_token(model, h, [str(path)])
    per_layer = sum(p.numel() for p in model.blocks[0].parameters() if p.role == "matrix")
    pairs = tg.attention_pairs(tg.packed_cu_seqlens(tokens[:h.micro_tokens], h.train_seq_len),
                               model.blocks[0].attn.window) / h.micro_tokens
    d, windows = h.model_dim, {b.attn.window for b in model.blocks}
    assert len(windows) == 1  # one window for every layer in this config: the formula below holds
    for looping, passes in ((False, h.num_layers), (True, h.num_layers + 1)):
        expected = 3 * (2 * (passes * per_layer + h.vocab_size * d) + 4 * d * passes * pairs)
        assert flops[looping] == pytest.approx(expected)


def run_eval_artifact(work, data, *flags, **env):
    import subprocess
    import sys

    cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "tools" / "eval_artifact.py"), *flags]
    return subprocess.run(cmd, env=script_env(work, *data, **env), cwd=work, capture_output=True, text=True, timeout=240)


def test_eval_artifact_scores_a_runs_artifact_like_the_run(eval_runs, data):
    """tools/eval_artifact.py on the artifact of the TTT run: the same evaluation stages, the same
    quantized score (TTT's adapters start from other random draws: close, not equal), and the
    seconds of the first TTT batch and global SGD call."""
    work = EVAL_WORK["ttt1"]
    r = run_eval_artifact(work, data, "--precompile", "--compile-times", TTT_ENABLED=1, RUN_ID="alone", **EVAL_ENV)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    run_log = eval_runs["ttt1"]
    assert eval_score(out, "diagnostic quantized")[1:] == eval_score(run_log, "diagnostic quantized")[1:]
    alone, in_run = eval_score(out, "quantized_ttt_phased"), eval_score(run_log, "quantized_ttt_phased")
    assert alone[3] == in_run[3] and alone[2] == pytest.approx(in_run[2], abs=2e-3)
    assert list(parse_train_log(out)["eval_stages"]) == list(parse_train_log(run_log)["eval_stages"])
    assert re.search(r"^eval_artifact: first calls: ttt_batch:\S+s global_sgd:\S+s$", out, re.M)
    settings = re.search(r"^eval_artifact: \d+ settings differ from the defaults: (.*)$", out, re.M)[1].split()
    assert {"ttt_batch_size=8", "ttt_chunk_size=64", "ttt_tail_chunk_size=0"} <= set(settings) and not any(
        s.startswith(("run_id=", "ttt_lora_alpha=")) for s in settings), settings  # ttt_lora_alpha: the default


def test_eval_artifact_makes_a_timing_artifact_and_counts_train_gpt_code(tmp_path, data):
    """--make-artifact writes ARTIFACT_PATH from the untrained model and evaluates it; the code bytes
    it reports are train_gpt.py's, not the tool's."""
    r = run_eval_artifact(tmp_path, data, "--make-artifact", RUN_ID="made", TTT_ENABLED=0)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert (tmp_path / "final_model.pgq").is_file()
    raw = len(Path(tg.__file__).read_bytes())
    assert re.search(rf"^Code size \(uncompressed\): {raw} bytes$", out, re.M)
    assert re.search(r"^diagnostic quantized val_loss:", out, re.M) and "quantized_ttt_phased" not in out
