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
