"""tools/compare_runs.py (the N=1 vs N=2 train_loss comparison of issue 2's device check)."""
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "compare_runs.py"


def write_log(path, losses, total=100):
    lines = ["hyperparameters:", "  seed: 42"]
    lines += [f"{s}/{total} train_loss: {v:.4f} train_time: 0.0m tok/s: 1" for s, v in losses.items()]
    lines.append("diagnostic pre-quantization post-ema val_loss:3.0 val_bpb:1.5 eval_time:1ms scored_targets:9")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def compare(*args):
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True)


def test_compare_runs_passes_within_tolerance_and_fails_beyond(tmp_path):
    ref = write_log(tmp_path / "n1.log", {1: 9.0, 2: 8.5, 3: 8.0, 4: 7.0, 5: 6.0})
    close = write_log(tmp_path / "n2.log", {1: 9.001, 2: 8.49, 3: 8.01, 4: 7.5, 5: 6.0})
    r = compare("--steps", "3", "--tol", "0.02", ref, close)
    assert r.returncode == 0, r.stdout
    assert "max |diff| 0.0100 (within tol 0.02); 5 common steps" in r.stdout
    assert "     4     7.0000     7.5000   +0.5000" in r.stdout  # printed, but beyond --steps
    r = compare("--steps", "4", "--tol", "0.02", ref, close)
    assert r.returncode == 1 and "max |diff| 0.5000 (OVER tol 0.02)" in r.stdout


def test_compare_runs_fails_without_common_steps(tmp_path):
    a = write_log(tmp_path / "a.log", {1: 9.0})
    b = write_log(tmp_path / "b.log", {2: 9.0})
    r = compare(a, b)
    assert r.returncode == 1 and "no common train_loss steps" in r.stdout
