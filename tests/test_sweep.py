"""tools/sweep.py: grids of runs with a results table, failures recorded without stopping the sweep,
resume, one run per GPU slot, quick mode, name checks before any run, and greedy forward selection
(the pure selection on a synthetic objective, and through the command line). Most runs use a fake
train script that prints train_gpt.py's log lines; one sweep point runs the real script on tiny data."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
import sweep  # noqa: E402

# Prints train_gpt.py's line formats; val_bpb is a known function of MATRIX_LR, WARMDOWN_FRAC,
# MUON_WD and SEED. MATRIX_LR=0.05 crashes with a traceback, WARMDOWN_FRAC=0.99 hangs.
FAKE = r'''
import os, sys, time
from pathlib import Path
env = os.environ
with open(env["FAKE_CALLS"], "a") as f:
    f.write(env["RUN_ID"] + "\n")
lr, wd = float(env.get("MATRIX_LR", "0.026")), float(env.get("WARMDOWN_FRAC", "0.85"))
muon_wd, seed = float(env.get("MUON_WD", "0.095")), int(env.get("SEED", "1337"))
print("hyperparameters:")
print(f"  run_id: {env['RUN_ID']}")
print(f"fake: pid={os.getpid()} cvd={env.get('CUDA_VISIBLE_DEVICES', '-')} wallclock={env.get('MAX_WALLCLOCK_SECONDS', '-')} "
      f"ttt={env.get('TTT_ENABLED', '-')} sliding={env.get('SLIDING_EVAL', '-')}")
print("compile_warmup: 20 steps (2 loop phases) in 58.0s, last loss 6.0000", flush=True)
if env.get("WARMDOWN_FRAC") == "0.99":
    time.sleep(60)
for step in (1, 2):
    print(f"{step}/100 train_loss: {9 - step:.4f} train_time: 0.0m step_avg: 450.00ms tok/s: 580000")
if lr == 0.05:
    raise RuntimeError("non-finite train_loss at step 3")
steps = int(1000 * lr / 0.026)
print(f"training: {steps} steps in 291.7s, step_avg: {291700 / steps:.2f}ms, tok/s: 414321")
bpb = 1.3 + 100 * (lr - 0.026) ** 2 + (wd - 0.8) ** 2 + 0.01 * (muon_wd == 0.08) + 0.0001 * (seed % 7)
print(f"diagnostic pre-quantization post-ema val_loss:3.3 val_bpb:{bpb - 0.005:.8f} eval_time:15349ms scored_targets:9")
Path(env["ARTIFACT_PATH"]).write_bytes(b"x" * 1000)
Path(env["LOG_DIR"], env["RUN_ID"] + ".txt").write_text("log\n")
print(f"Serialized model quantized+brotli: 15832826 bytes ({env['ARTIFACT_PATH']}, compressed in 6.1s)")
print("Code size (uncompressed): 90959 bytes")
print("Code size (compressed): 32993 bytes")
print("Total submission size quantized+brotli: 15865819 bytes")
print(f"artifact:loaded {env['ARTIFACT_PATH']} into a fresh model in 0.7s")
print(f"diagnostic quantized val_loss:3.36 val_bpb:{bpb:.8f} eval_time:2627ms scored_targets:9")
if env.get("SLIDING_EVAL", "1") == "1":
    print(f"diagnostic quantized_sliding_window val_loss:3.34 val_bpb:{bpb - 0.006:.8f} eval_time:46896ms scored_targets:9")
if env.get("TTT_ENABLED", "1") == "1":
    print(f"quantized_ttt_phased val_loss:3.33 val_bpb:{bpb - 0.01:.8f} eval_time:296852ms scored_targets:9")
print("total_eval_time:347.0s")
'''


def objective(lr, wd):
    return 1.3 + 100 * (lr - 0.026) ** 2 + (wd - 0.8) ** 2


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE)
    return script


def run_sweep(tmp_path, fake, *args, timeout=120, **env):
    import os

    full_env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "SEED", "MATRIX_LR")}
    full_env.update(FAKE_CALLS=str(tmp_path / "calls.txt"), **env)
    cmd = [sys.executable, str(TOOLS / "sweep.py"), "--out", str(tmp_path / "sw"), "--cmd",
           f"{sys.executable} {fake}", "--gpus", "", *args]
    return subprocess.run(cmd, env=full_env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


def calls(tmp_path):
    p = tmp_path / "calls.txt"
    return p.read_text().split() if p.exists() else []


def read_csv(tmp_path):
    with open(tmp_path / "sw" / "results.csv") as f:
        return list(csv.DictReader(f))


def test_grid_of_two_variables_writes_the_sorted_table_and_plot(tmp_path, fake):
    r = run_sweep(tmp_path, fake, "--parallel", "2", "MATRIX_LR=0.02,0.026,0.03", "WARMDOWN_FRAC=0.75,0.9")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = read_csv(tmp_path)
    assert len(rows) == 6 and len(set(calls(tmp_path))) == 6
    got = [(float(x["MATRIX_LR"]), float(x["WARMDOWN_FRAC"]), float(x["final_bpb"])) for x in rows]
    want = sorted(((lr, wd, objective(lr, wd) - 0.01) for lr in (0.02, 0.026, 0.03) for wd in (0.75, 0.9)),
                  key=lambda t: t[2])
    assert [g[:2] for g in got] == [w[:2] for w in want]
    assert all(abs(g[2] - w[2]) < 1e-7 for g, w in zip(got, want))
    top = rows[0]
    assert float(top["quantized_bpb"]) == pytest.approx(float(top["final_bpb"]) + 0.01)
    assert float(top["prequant_bpb"]) == pytest.approx(float(top["quantized_bpb"]) - 0.005)
    assert (top["artifact_bytes"], top["total_bytes"], top["steps"], top["status"], top["rc"]) == (
        "15832826", "15865819", "1000", "ok", "0")
    assert float(top["compile_s"]) == 58.0 and float(top["total_eval_s"]) == 347.0
    assert float(top["step_avg_ms"]) == pytest.approx(291.7)
    assert top["mode"].startswith("full pipeline: MAX_WALLCLOCK_SECONDS=600")
    # each point: its own RUN_ID, log, artifact and captured output
    sw = tmp_path / "sw"
    for row in rows:
        assert (sw / "logs" / f"{row['run_id']}.txt").exists() and (sw / "artifacts" / f"{row['run_id']}.pgq").exists()
        assert "train_loss" in (sw / "out" / f"{row['run_id']}.txt").read_text()
    md = (sw / "results.md").read_text()
    assert "| rank | run_id | MATRIX_LR | WARMDOWN_FRAC | prequant_bpb | quantized_bpb | final_bpb |" in md
    assert md.index("| 1 | " + top["run_id"]) < md.index("| 2 | ")
    assert (sw / "results.png").stat().st_size > 1000
    progress = [line for line in r.stdout.splitlines() if line.startswith("[")]
    assert len(progress) == 6 and progress[-1].startswith("[6/6] ") and "ETA 0m00s" in progress[-1]
    assert all("| best " in line and "| ETA " in line for line in progress)
    assert "best 1.292500 (MATRIX_LR=0.026 WARMDOWN_FRAC=0.75)" in progress[-1]


def test_failing_points_are_recorded_and_the_sweep_goes_on(tmp_path, fake):
    r = run_sweep(tmp_path, fake, "--timeout", "3", "--parallel", "2", "MATRIX_LR=0.05,0.02", "WARMDOWN_FRAC=0.99,0.8")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {(x["MATRIX_LR"], x["WARMDOWN_FRAC"]): x for x in read_csv(tmp_path)}
    assert len(rows) == 4 and rows[("0.02", "0.8")]["status"] == "ok"
    assert list(rows)[0] == ("0.02", "0.8")  # the one success first, failures after
    crash = rows[("0.05", "0.8")]
    assert crash["status"] == "failed" and crash["rc"] == "1" and crash["final_bpb"] == ""
    assert "RuntimeError: non-finite train_loss at step 3" in crash["reason"]
    for key in (("0.05", "0.99"), ("0.02", "0.99")):
        assert rows[key]["status"] == "timeout" and rows[key]["reason"] == "timeout after 3s"
    assert "FAILED (exit 1: RuntimeError: non-finite train_loss at step 3)" in r.stdout
    md = (tmp_path / "sw" / "results.md").read_text()
    assert "- 1 ok, 3 failed" in md
    # every point failing: exit status 1
    r = run_sweep(tmp_path, fake, "--out", str(tmp_path / "sw2"), "MATRIX_LR=0.05")
    assert r.returncode == 1 and "0 ok" in r.stdout


def test_resume_runs_only_unfinished_points(tmp_path, fake):
    args = ("--parallel", "2", "MATRIX_LR=0.02,0.03", "WARMDOWN_FRAC=0.7,0.8")
    assert run_sweep(tmp_path, fake, *args).returncode == 0
    first = calls(tmp_path)
    assert len(first) == 4
    r = run_sweep(tmp_path, fake, *args)  # the same command: nothing left to run
    assert r.returncode == 0 and calls(tmp_path) == first
    assert "4 point(s) already finished" in r.stdout and len(read_csv(tmp_path)) == 4
    # a sweep killed during a point leaves no record for it: that point (only) runs again
    state = tmp_path / "sw" / "state.jsonl"
    lines = state.read_text().splitlines()
    state.write_text("\n".join(lines[:-1]) + "\n")
    lost = json.loads(lines[-1])["run_id"]
    # and a grown grid runs its new points only
    r = run_sweep(tmp_path, fake, "--parallel", "2", "MATRIX_LR=0.02,0.03,0.026", "WARMDOWN_FRAC=0.7,0.8")
    assert r.returncode == 0, r.stdout + r.stderr
    new = calls(tmp_path)[len(first):]
    assert len(new) == 3 and lost in new and len(set(calls(tmp_path))) == 6
    assert len(read_csv(tmp_path)) == 6
    # a failed point is finished too, unless --retry-failed
    run_sweep(tmp_path, fake, "MATRIX_LR=0.05")
    n = len(calls(tmp_path))
    run_sweep(tmp_path, fake, "MATRIX_LR=0.05")
    assert len(calls(tmp_path)) == n
    run_sweep(tmp_path, fake, "--retry-failed", "MATRIX_LR=0.05")
    assert len(calls(tmp_path)) == n + 1


def test_a_stopped_sweep_kills_its_running_points_and_records_nothing_for_them(tmp_path, fake):
    """SIGTERM (or Ctrl-C) of the sweep: the hanging point's process is killed, nothing is recorded
    for it, and the same command runs it again."""
    import os
    import re
    import signal
    import time

    env = {**os.environ, "FAKE_CALLS": str(tmp_path / "calls.txt")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, str(TOOLS / "sweep.py"), "--out", str(tmp_path / "sw"), "--cmd", f"{sys.executable} {fake}",
           "--gpus", "", "WARMDOWN_FRAC=0.99"]
    p = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_dir, deadline = tmp_path / "sw" / "out", time.time() + 60
    while time.time() < deadline and not (out_dir.exists() and any("compile_warmup" in f.read_text()
                                                                   for f in out_dir.iterdir())):
        time.sleep(0.1)
    (out_file,) = out_dir.iterdir()
    pid = int(re.search(r"fake: pid=(\d+)", out_file.read_text())[1])
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130 and "rerun the same command to resume" in err
    time.sleep(0.2)
    status = Path(f"/proc/{pid}/status")
    assert not status.exists() or "\nState:\tZ" in status.read_text()  # gone (or a zombie awaiting its reaper)
    assert not (tmp_path / "sw" / "state.jsonl").exists() or (tmp_path / "sw" / "state.jsonl").read_text() == ""
    r = run_sweep(tmp_path, fake, "--timeout", "1", "WARMDOWN_FRAC=0.99")
    assert len(calls(tmp_path)) == 2 and read_csv(tmp_path)[0]["status"] == "timeout", r.stdout + r.stderr


def test_each_mode_runs_the_base_then_each_override_alone(tmp_path, fake):
    r = run_sweep(tmp_path, fake, "--each", "MATRIX_LR=0.02,0.03", "WARMDOWN_FRAC=0.8", "--set", "MUON_WD=0.08")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = read_csv(tmp_path)
    assert sorted((x["MATRIX_LR"], x["WARMDOWN_FRAC"]) for x in rows) == [
        ("", ""), ("", "0.8"), ("0.02", ""), ("0.03", "")]
    assert rows[0]["WARMDOWN_FRAC"] == "0.8"  # the one that helps
    assert all(float(x["final_bpb"]) > 1.3 - 0.01 + 0.0099 for x in rows)  # MUON_WD=0.08 on every point
    assert "; base MUON_WD=0.08" in rows[0]["mode"]


def test_points_get_one_gpu_each_and_quick_mode_is_stated(tmp_path, fake):
    r = run_sweep(tmp_path, fake, "--gpus", "3,5", "--quick", "--quick-seconds", "90", "MATRIX_LR=0.02,0.03,0.026")
    assert r.returncode == 0, r.stdout + r.stderr
    outs = [p.read_text() for p in (tmp_path / "sw" / "out").iterdir()]
    assert len(outs) == 3 and all("wallclock=90 ttt=0 sliding=0" in o for o in outs)
    assert {o.split("cvd=")[1].split()[0] for o in outs} <= {"3", "5"}
    assert "slots ['3', '5']" in r.stdout
    rows = read_csv(tmp_path)
    assert all(x["final_bpb"] == x["quantized_bpb"] for x in rows)  # no sliding, no TTT: quantized is final
    assert rows[0]["mode"] == ("quick: MAX_WALLCLOCK_SECONDS=90, TTT_ENABLED=0, SLIDING_EVAL=0 "
                               "(the final metric is the quantized val_bpb)")
    assert "- mode: quick: MAX_WALLCLOCK_SECONDS=90" in (tmp_path / "sw" / "results.md").read_text()


def test_bad_names_and_values_are_refused_before_any_run(tmp_path, fake):
    r = run_sweep(tmp_path, fake, "MATRIX_LR=0.02", "WARMDOWN_FRACTION=0.7")
    assert r.returncode == 2 and "WARMDOWN_FRACTION is not a train_gpt.py hyperparameter (did you mean WARMDOWN_FRAC?)" in r.stderr
    for bad, msg in (("NUM_LAYERS=11,x", "NUM_LAYERS='x': expected int"), ("TTT_ENABLED=true", "expected 0 or 1"),
                     ("ARTIFACT_PATH=a.pgq", "ARTIFACT_PATH is set by the sweep"), ("MATRIX_LR", "expected NAME=value")):
        r = run_sweep(tmp_path, fake, bad)
        assert r.returncode == 2 and msg in r.stderr, (bad, r.stderr)
    r = run_sweep(tmp_path, fake, "--set", "SEEED=1", "MATRIX_LR=0.02")
    assert r.returncode == 2 and "did you mean SEED?" in r.stderr
    assert calls(tmp_path) == [] and not (tmp_path / "sw").exists()
    fields = sweep.hyperparameter_fields()
    assert fields["MATRIX_LR"] == ("float", 0.026) and fields["TTT_ENABLED"][0] == "bool"
    # tuple variables take '|' between values, commas inside a value
    assert sweep.parse_overrides(["GLOBAL_ATTN_LAYERS=4,9,10|3,9", "MUON_WD=0.08,0.1"], fields) == [
        ("GLOBAL_ATTN_LAYERS", ["4,9,10", "3,9"]), ("MUON_WD", ["0.08", "0.1"])]


# ---------------------------------------------------------------------------------------
# Greedy forward selection
# ---------------------------------------------------------------------------------------

GAINS = {("A", "1"): 0.10, ("A", "2"): 0.08, ("B", "1"): 0.05, ("C", "1"): -0.2, ("D", "1"): 0.004}


def synthetic(config):
    """1.0 minus the gains of the set overrides; A=1 and B=1 together interact a little, E=1
    crashes, F=1 wins on the default seed and loses on the others (noise)."""
    if config.get("E") == "1":
        return None
    m = 1.0 - sum(GAINS.get(kv, 0.0) for kv in config.items() if kv[0] != "SEED")
    if config.get("A") == "1" and config.get("B") == "1":
        m += 0.01
    if config.get("F") == "1":
        m += 0.1 if "SEED" in config else -0.15
    return m


def test_greedy_finds_the_best_overrides_on_a_synthetic_objective_and_stops():
    seen = []

    def evaluate(config):
        seen.append(dict(config))
        return synthetic(config)

    cands = [("A", "1"), ("A", "2"), ("B", "1"), ("C", "1"), ("D", "1"), ("E", "1")]
    res = sweep.greedy_select(cands, evaluate, threshold=0.005, log=lambda *_: None)
    assert res["config"] == {"A": "1", "B": "1"} and res["metric"] == pytest.approx(0.86)
    assert [e["accepted"] and (e["accepted"]["name"], e["accepted"]["value"]) for e in res["path"]] == [
        ("A", "1"), ("B", "1"), None]  # D=1 gains 0.004 < threshold: stop
    assert len(res["path"][0]["tried"]) == 6 and res["path"][0]["tried"][-1]["metric"] is None
    assert len(seen) == len({json.dumps(c, sort_keys=True) for c in seen})  # each config evaluated once
    # without a threshold D=1 is kept too; then nothing is left that helps
    res = sweep.greedy_select(cands, evaluate, threshold=0.0, log=lambda *_: None)
    assert res["config"] == {"A": "1", "B": "1", "D": "1"}
    with pytest.raises(sweep.SweepError, match="the base configuration failed"):
        sweep.greedy_select(cands, lambda c: None, log=lambda *_: None)


def test_greedy_confirms_a_winner_with_other_seeds_before_keeping_it():
    cands = [("A", "1"), ("F", "1"), ("B", "1")]
    lucky = sweep.greedy_select(cands, synthetic, threshold=0.005, log=lambda *_: None)
    assert lucky["config"]["F"] == "1"  # one seed: the noise wins
    res = sweep.greedy_select(cands, synthetic, threshold=0.005, confirm_seeds=[1, 2], log=lambda *_: None)
    assert res["config"] == {"A": "1", "B": "1"}
    first = res["path"][0]
    assert first["confirm"][0]["name"] == "F" and not first["confirm"][0]["accepted"]
    assert first["confirm"][1]["name"] == "A" and first["confirm"][1]["accepted"]
    assert first["accepted"]["name"] == "A"


def test_greedy_command_line_keeps_the_helpful_overrides_and_resumes(tmp_path, fake):
    args = ("--greedy", "--threshold", "0.001", "--parallel", "2",
            "MATRIX_LR=0.02,0.026", "WARMDOWN_FRAC=0.8,0.75", "MUON_WD=0.08")
    base = {"MATRIX_LR": "0.03"}  # the caller's environment is the base
    r = run_sweep(tmp_path, fake, *args, **base)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "sw" / "greedy.json").read_text())
    assert res["config"] == {"MATRIX_LR": "0.026", "WARMDOWN_FRAC": "0.8"}
    assert res["metric"] == pytest.approx(1.3 - 0.01)
    assert [e["accepted"]["name"] if e["accepted"] else None for e in res["path"]] == [
        "WARMDOWN_FRAC", "MATRIX_LR", None]  # round 1: WARMDOWN_FRAC=0.8 gains 0.0025, MATRIX_LR=0.026 0.0016
    md = (tmp_path / "sw" / "greedy.md").read_text()
    assert "**kept WARMDOWN_FRAC=0.8**" in md and "nothing kept: stop" in md
    assert "greedy: round 3: nothing beats" in r.stdout
    n = len(calls(tmp_path))
    # base, round 1, round 2 (WARMDOWN_FRAC=0.75 replacing 0.8 ran in round 1), round 3 (likewise)
    assert n == len(set(calls(tmp_path))) == 1 + 5 + 3 + 2
    assert len(read_csv(tmp_path)) == n
    r = run_sweep(tmp_path, fake, *args, **base)
    assert r.returncode == 0 and len(calls(tmp_path)) == n  # resumed: nothing runs again


# ---------------------------------------------------------------------------------------
# One real point: train_gpt.py on tiny data
# ---------------------------------------------------------------------------------------

def test_a_real_tiny_run_fills_the_table_from_its_log(tmp_path):
    import os

    from helpers_train import script_env, tiny_dataset

    (tmp_path / "data").mkdir()
    env = script_env(tmp_path, *tiny_dataset(tmp_path / "data"), ITERATIONS=2, WARMUP_STEPS=0)
    for k in ("RUN_ID", "LOG_DIR", "ARTIFACT_PATH"):
        env.pop(k)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    out = tmp_path / "sw"
    cmd = [sys.executable, str(TOOLS / "sweep.py"), "--out", str(out), "--gpus", "", "--quick", "--quick-seconds",
           "600", "MATRIX_LR=0.03", "WARMDOWN_FRAC=0.5"]
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (row,) = read_csv(tmp_path)
    log = (out / "logs" / f"{row['run_id']}.txt").read_text()  # the run's log: hyperparameters first
    assert "matrix_lr: 0.03" in log and "warmdown_frac: 0.5" in log and f"run_id: {row['run_id']}" in log
    assert row["status"] == "ok" and row["steps"] == "2" and row["final_bpb"] == row["quantized_bpb"] != ""
    assert "diagnostic quantized val_loss:" in log and f"val_bpb:{row['quantized_bpb']}" in log
    assert int(row["total_bytes"]) > int(row["artifact_bytes"]) == os.path.getsize(out / "artifacts" / f"{row['run_id']}.pgq")
