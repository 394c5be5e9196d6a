"""tools/device_lib.sh's leader runs (issue 10): the leader's settings are side_by_side.sh's, and a
training-only run is stopped after its training, its status saying whether it trained to its cap."""
import re
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SIDE_BY_SIDE = REPO.parent / "shared" / "bench" / "anchor" / "side_by_side.sh"
PER_RUN = {"CUDA_VISIBLE_DEVICES", "DATA_PATH", "MAX_WALLCLOCK_SECONDS", "RUN_ID", "PYTHONPATH"}  # paths, GPU, name


def settings(text):
    return {k: v for k, v in re.findall(r"\b([A-Z][A-Z0-9_]*)=(\S+)", text) if k not in PER_RUN}


@pytest.mark.skipif(not SIDE_BY_SIDE.exists(), reason="../shared/bench/anchor is not beside the checkout")
def test_leader_runs_with_side_by_sides_settings():
    sbs = SIDE_BY_SIDE.read_text()
    start = sbs.index('cp "$A/leader_train_gpt.py"')
    leader_env = sbs[start:sbs.index("setsid", start)]
    lib = (REPO / "tools" / "device_lib.sh").read_text()
    leader_in = lib[lib.index("leader_in() {"):lib.index("\n}\n", lib.index("leader_in() {"))]
    ours = settings(leader_in[leader_in.index("exec env"):])
    assert ours == settings(leader_env) and len(ours) == 21


STUB = """
source tools/device_lib.sh
W={w}
leader_train() {{  # a stand-in for the leader's python, one process: its PID file, its lines, then it would run on
  (echo $BASHPID > $W/$1.pid; exec bash -c '{lines}; exec sleep 30')
}}
leader_train_only run
echo "status $?"
"""


@pytest.mark.parametrize("capped", [True, False])
def test_leader_train_only_stops_the_run_after_training(tmp_path, capped):
    lines = ("echo stopping_early: wallclock_cap; " if capped else "") + "echo peak memory allocated: 1 MiB"
    t0 = time.monotonic()
    out = subprocess.run(["bash", "-c", STUB.format(w=tmp_path, lines=lines)], cwd=REPO, capture_output=True,
                         text=True, timeout=25).stdout
    assert time.monotonic() - t0 < 15  # stopped, not waited for
    assert out.strip().endswith("status 0" if capped else "status 1")
    log = (tmp_path / "run.log").read_text()
    assert "peak memory allocated" in log
    pid = int((tmp_path / "run.pid").read_text())
    assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0  # the process is gone
