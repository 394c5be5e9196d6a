"""run.sh, the main job, on a machine without FineWeb: it builds the embedded corpus and runs the
whole pipeline (train, GPTQ, artifact, quantized / TTT eval; the sliding diagnostic is skipped by
the eval budget). Shortened through its environment overrides, which must win over run.sh's own
defaults."""
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_sh_without_fineweb_runs_the_embedded_pipeline(tmp_path):
    env = {**os.environ, "DATA_PATH": str(tmp_path / "no_fineweb"), "EMBEDDED_DIR": str(tmp_path / "embedded"),
           "LOG_DIR": str(tmp_path / "logs"), "RUN_ID": "runsh", "ARTIFACT_PATH": str(tmp_path / "model.pgq"),
           "ITERATIONS": "2", "MAX_WALLCLOCK_SECONDS": "0", "GPTQ_RESERVE_SECONDS": "0",
           "EVAL_STRIDE": "512", "EVAL_BUDGET_SECONDS": "1", "PHASED_TTT_NUM_PHASES": "1"}
    out = subprocess.run(["bash", str(ROOT / "run.sh")], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout
    assert "building the embedded corpus" in log
    assert re.search(r"^2/2 train_loss: \d", log, re.M)  # ITERATIONS=2 overrode run.sh's 200
    size = int(re.search(r"^Serialized model quantized\+brotli: (\d+) bytes", log, re.M)[1])
    assert size == os.path.getsize(tmp_path / "model.pgq")
    assert re.search(r"^Total submission size quantized\+brotli: \d+ bytes", log, re.M)
    n_targets = int(re.search(r"val_tokens: (\d+)", log)[1]) - 1
    for label in ("diagnostic quantized", "quantized_ttt_phased"):
        m = re.search(rf"^{label} val_loss:([\d.]+) val_bpb:([\d.]+) eval_time:\d+ms scored_targets:(\d+)", log, re.M)
        assert m and float(m[2]) > 0 and int(m[3]) == n_targets, label
    # a 1 s budget: TTT falls back to sliding windows for every document at once, and the
    # sliding-window diagnostic after it cannot fit
    assert re.search(r"^ttt_leftover: \d+ documents scored by sliding windows .*deadline: yes\)$", log, re.M)
    assert re.search(r"^diagnostic quantized_sliding_window skipped: predicted \d+s would end past "
                     r"EVAL_BUDGET_SECONDS=1$", log, re.M)
    assert re.search(r"^total_eval_time:[\d.]+s", log, re.M)
    assert (tmp_path / "logs" / "runsh.txt").is_file()
