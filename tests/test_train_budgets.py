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
               TTT_CHUNK_SIZE=16, TTT_EVAL_SEQ_LEN=128, TTT_LORA_RANK=4, PHASED_TTT_PREFIX_DOCS=16,
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
