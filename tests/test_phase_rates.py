"""tools/phase_rates.py and the log keys it reads (tools/train_log.py): each phase's tokens/s of ours and
the leader's from the eighteenth session's two proxy logs, one lease, one GPU."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import phase_rates  # noqa: E402
from train_log import parse_train_log, parse_train_log_file  # noqa: E402

RUNS = Path(__file__).resolve().parents[1] / "records" / "speed" / "2026-12-02f_leader_same_lease"


def test_log_keys_of_ours_and_the_leaders_logs():
    ours, leader = parse_train_log_file(RUNS / "ours.log"), parse_train_log_file(RUNS / "lead.log")
    assert (ours["layer_loop_step"], ours["layer_loop_frac"], ours["stop_train_ms"], ours["stop_step"]) == \
        (347, 0.35, 290304, 779)
    assert ours["flops_per_token"] == (2.566e8, 3.821e8) and ours["train_budget_s"] == 290.567
    assert (leader["layer_loop_step"], leader["layer_loop_frac"], leader["stop_train_ms"], leader["stop_step"]) == \
        (347, 0.351, 299974, 785)
    assert leader["flops_per_token"] is None and leader["train_points"][500]["tok_s"] == 750772
    old = parse_train_log("flops_per_token: 1.5e+08\nstopping_early: wallclock_cap\nlayer_loop:enabled step:9\n")
    assert old["flops_per_token"] == (1.5e8, None) and old["stopped_early"] is True and old["stop_step"] is None
    assert old["layer_loop_step"] == 9 and old["layer_loop_frac"] is None


def test_spans_from_the_loop_fraction_and_the_stop():
    # step:100 is printed before step 101 runs: 100 steps without the loop, then 200 looped
    run = dict(layer_loop_step=100, layer_loop_frac=0.25, stop_train_ms=200_000, stop_step=300,
               train_points={250: {"step_avg_ms": 600.0}})
    s, note = phase_rates.spans(run, budget_s=200.0, tokens=1000, check_step=250)
    assert note is None
    assert s == {"no loop": (100, 50.0), "looped": (200, 150.0), "looped, step 250 to the end": (50, 50.0),
                 "whole run": (300, 200.0)}
    run["train_points"] = {250: {"tok_s": 1000 * 250 / 160.0}}  # the leader logs only the cumulative tok/s
    assert phase_rates.spans(run, 200.0, 1000, 250)[0]["looped, step 250 to the end"] == (50, pytest.approx(40.0))
    run["train_points"] = {99: {"step_avg_ms": 500.0}, 100: {"step_avg_ms": 500.0}}
    assert phase_rates.spans(run, 200.0, 1000, 100)[0]["looped, step 100 to the end"] == (200, 150.0)
    s, note = phase_rates.spans(run, 200.0, 1000, 99)  # a span holding an unlooped step: said, not skipped silently
    assert "looped, step 99 to the end" not in s and "step 99 is not logged at or after the loop's start" in note
    with pytest.raises(ValueError, match="layer_loop_frac"):
        phase_rates.spans(dict(run, layer_loop_frac=None), 200.0, 1000, 250)


def test_the_recorded_ratios(capsys):
    phase_rates.main([str(RUNS / "ours.log"), str(RUNS / "lead.log")])
    out = capsys.readouterr().out
    assert out == (RUNS / "phases.txt").read_text()
    ratios = [line.split()[-1] for line in out.splitlines() if "ours / leader" in line]
    assert ratios == ["1.0337", "1.0190", "1.0094", "1.0254"]
    assert "budgets: ours 290.567 s, leader 299.500 s" in out  # from each log's own budget line
    assert "no loop                        ours       347" in out


def test_bad_input_is_refused(tmp_path, capsys):
    short = tmp_path / "short.log"
    short.write_text("gptq:reserving 0s, effective=299500ms\n1/20000 train_loss: 9.0 train_time: 0.0m tok/s: 800000\n")
    with pytest.raises(SystemExit):
        phase_rates.main([str(RUNS / "ours.log"), str(short)])
    assert f"leader ({short}): no layer_loop_step" in capsys.readouterr().err
    no_budget = tmp_path / "no_budget.log"
    no_budget.write_text((RUNS / "lead.log").read_text().replace("effective=", "effective "))
    with pytest.raises(SystemExit):
        phase_rates.main([str(RUNS / "ours.log"), str(no_budget)])
    assert "no training budget line" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # both logs say 262144
        phase_rates.main([str(RUNS / "ours.log"), str(RUNS / "lead.log"), "--tokens", "786432"])
    assert "train_batch_tokens 262144, not --tokens 786432" in capsys.readouterr().err
    ours_default = tmp_path / "ours_default.log"  # a run at our default batch: the settings line leaves it out
    ours_default.write_text((RUNS / "ours.log").read_text().replace(" train_batch_tokens=262144", ""))
    with pytest.raises(SystemExit):  # the leader's log alone disagrees
        phase_rates.main([str(ours_default), str(RUNS / "lead.log"), "--tokens", "786432"])
    assert f"leader ({RUNS / 'lead.log'}): train_batch_tokens 262144, not --tokens 786432" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # ours' default (train_gpt.py's) is not 262144
        phase_rates.main([str(ours_default), str(RUNS / "lead.log")])
    assert "ours (" in capsys.readouterr().err
    ours_no_budget = tmp_path / "ours_no_budget.log"
    ours_no_budget.write_text((RUNS / "ours.log").read_text().replace("training budget", "budget"))
    with pytest.raises(SystemExit):
        phase_rates.main([str(ours_no_budget), str(RUNS / "lead.log")])
    assert f"ours ({ours_no_budget}): no training budget line" in capsys.readouterr().err


def test_notes_are_printed_not_skipped(tmp_path, capsys):
    lead = tmp_path / "lead.log"  # a leader's log without its hyperparameter listing
    lead.write_text((RUNS / "lead.log").read_text().replace("train_batch_tokens: 262144", ""))
    phase_rates.main([str(RUNS / "ours.log"), str(lead), "--check-step", "300"])
    out = capsys.readouterr().out
    assert "note: leader's log does not state train_batch_tokens; --tokens 262144 taken as given" in out
    assert "note: ours: no looped check span: step 300 is not logged at or after the loop's start" in out
    assert "looped, step 300" not in out and "whole run" in out
