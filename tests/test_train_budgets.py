"""The time budgets of train_gpt.py, run as a script on tiny data: the measured GPTQ reserve is
taken out of MAX_WALLCLOCK_SECONDS (and not measured when GPTQ_RESERVE_SECONDS is set)."""
import pytest

from helpers_train import parse_train_log, run_script, script_env, tiny_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("data"))


def run(tmp_path_factory, data, name, **env):
    work = tmp_path_factory.mktemp(name)
    r = run_script(script_env(work, *data, **env), work)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    return parse_train_log(out), out


@pytest.mark.parametrize("reserve", [-1, 7.5])
def test_gptq_reserve_is_measured_and_taken_from_the_training_budget(tmp_path_factory, data, reserve):
    run_log, out = run(tmp_path_factory, data, "reserve", ITERATIONS=2, WARMUP_STEPS=0, MAX_WALLCLOCK_SECONDS=60,
                       GPTQ_RESERVE_SECONDS=reserve)
    x, y = run_log["gptq_reserve_s"], run_log["train_budget_s"]
    assert x is not None and y is not None, out[-3000:]
    assert x + y == pytest.approx(60, abs=2e-3)  # both logged to the millisecond
    if reserve < 0:
        assert x > 0 and run_log["gptq_measured_s"] == x  # one Hessian + GPTQ pass was timed
    else:
        assert x == reserve and run_log["gptq_measured_s"] is None  # set: nothing measured


# Phased TTT on every document takes ~13 s here (longest batches first: the first takes ~2 s),
# its sliding diagnostic ~2 s: neither fits a 4 s budget (unbounded, the leftovers made it 6.4-6.8 s).
TTT_ENV = dict(ITERATIONS=3, WARMUP_STEPS=0, SLIDING_EVAL=1, EVAL_STRIDE=16, TTT_ENABLED=1, TTT_BATCH_SIZE=4,
               TTT_CHUNK_SIZE=16, TTT_EVAL_SEQ_LEN=128, TTT_TAIL_CHUNK_SIZE=0, TTT_LORA_RANK=4, PHASED_TTT_PREFIX_DOCS=16,
               PHASED_TTT_NUM_PHASES=2, GLOBAL_TTT_CHUNK_TOKENS=1024, GLOBAL_TTT_SEQ_LEN=128, GLOBAL_TTT_LR=0.05)
SLACK_S = 1.0  # timing noise of a shared CPU: the predictions use one measured disjoint eval


def test_eval_stays_inside_its_budget_and_scores_every_target_once(tmp_path_factory, data):
    budget = 4.0
    run_log, out = run(tmp_path_factory, data, "budget", EVAL_BUDGET_SECONDS=budget, **TTT_ENV)
    assert run_log["total_eval_s"] <= budget + SLACK_S, out[-3000:]
    scored = run_log["scored_targets"]
    assert scored["ttt"] == scored["quantized"] == run_log["val_tokens"] - 1  # every target once
    ttt = run_log["ttt"]
    assert ttt["leftover_past_deadline"] and ttt["leftover_docs"] > 0  # the budget did bind


def test_long_eval_stages_print_progress_with_an_eta(tmp_path, monkeypatch, capsys):
    """Every PROGRESS_EVERY_S (0 here: every row / batch) the eval windows and phased TTT print
    `progress: <stage> done/total (p%) elapsed:Xs eta:Ys` on the console and in the log; the lines
    the log parser reads keep their format."""
    import re

    import numpy as np

    import train_gpt as tg
    from helpers_train import make_model, tiny_h

    tg.use_attention_backend("sdpa", tg.torch.device("cpu"))
    monkeypatch.setattr(tg, "PROGRESS_EVERY_S", 0.0)
    h = tiny_h(eval_seq_len=64, val_batch_tokens=64, sliding_mode="windows", log_dir=str(tmp_path), run_id="progress", ttt_batch_size=2,
               ttt_chunk_size=16, ttt_eval_seq_len=32, ttt_long_chunk_size=0, ttt_tail_chunk_size=0, ttt_lora_rank=2, phased_ttt_prefix_docs=2,
               phased_ttt_num_phases=1, global_ttt_chunk_tokens=64, global_ttt_seq_len=32)
    rt = tg.Runtime(h)
    rng = np.random.default_rng(0)
    tokens = np.concatenate([np.r_[tg.BOS_ID, rng.integers(4, h.vocab_size, n - 1)] for n in (40, 30, 20, 50, 10, 25)])
    val = tg.ValSet(tokens.astype(np.uint16), np.ones(len(tokens), dtype=np.int64))
    model = make_model(h)
    tg.eval_val(model, h, rt, val)
    tg.phased_ttt(model, h, rt, val, deadline=float("inf"))
    log = (tmp_path / "progress.txt").read_text()
    assert capsys.readouterr().out == log
    for stage, total in (("eval rows", 4), ("ttt batches", 3)):  # 6 documents: 4 rows of 64, 3 batches of 2
        lines = re.findall(rf"^progress: {stage} (\d+)/(\d+) \((\d+)%\) elapsed:\d+s eta:\d+s$", log, re.M)
        assert [(int(d), int(t), int(p)) for d, t, p in lines] == [(d, total, round(100 * d / total))
                                                                   for d in range(1, total)], (stage, log)
    run = parse_train_log(log)
    assert run["ttt"]["batches"] == 3 and run["ttt"]["leftover_docs"] == 0
