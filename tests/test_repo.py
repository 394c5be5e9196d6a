"""The documents stay true to the code: README's variable table, the CI command, and the
figures in submission.json against the record log they come from."""
import json
import re
import sys
from dataclasses import fields
from pathlib import Path

import pytest

import train_gpt as tg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from train_log import parse_train_log_file  # noqa: E402  (the one log parser, issue 12)

README = (ROOT / "README.md").read_text()
ENV_NAMES = {"rank": "RANK", "world_size": "WORLD_SIZE", "local_rank": "LOCAL_RANK"}


def readme_table():
    rows = {}
    for line in README.splitlines():
        m = re.match(r"\| ([A-Z0-9_, ]+) \| ([^|]+) \| [^|]+ \|$", line)
        if m:
            for name, default in zip(m[1].split(", "), m[2].split(", ")):
                rows[name] = default.strip()
    return rows


def documented(value):
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


@pytest.mark.parametrize("f", fields(tg.Hyperparameters), ids=lambda f: f.name)
def test_every_variable_is_documented_with_its_default(f):
    rows = readme_table()
    name = ENV_NAMES.get(f.name, f.name.upper())
    assert name in rows, f"{name} missing from README's variable table"
    default, doc = getattr(tg.Hyperparameters(), f.name), rows[name]
    if f.name in ("run_id", "qk_gain_init", "artifact_path"):  # generated / the per-layer table / from the run
        return
    if isinstance(default, float) and not isinstance(default, bool):
        assert float(doc) == default, (name, doc, default)
    else:
        assert doc == documented(default), (name, doc, default)


def test_ci_runs_the_readme_test_command():
    setup = README.split("## Setup", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    test_cmd = [c for c in (ln.split("#")[0].strip() for ln in setup.splitlines()) if c.startswith("bash run.sh test")][0]
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert ci[-1] == test_cmd


def test_submission_is_what_the_records_tool_wrote_and_matches_its_logs():
    """The top-level submission.json is a records folder's own (tools/records.py --top-level), and its
    per-seed figures are those of the seed logs copied into that folder."""
    top = json.loads((ROOT / "submission.json").read_text())
    folders = [p.parent for p in (ROOT / "records").glob("*/*/submission.json") if json.loads(p.read_text()) == top]
    assert len(folders) == 1, "submission.json must equal exactly one records folder's submission.json"
    for seed in top["seeds"]:
        run = parse_train_log_file(folders[0] / f"train_seed{seed['seed']}.log")
        assert run["hyperparameters"]["seed"] == str(seed["seed"])
        assert (seed["val_bpb"], seed["val_loss"]) == (run["final_bpb"], run["final_loss"])
        assert (seed["artifact_bytes"], seed["code_bytes"], seed["total_bytes"]) == (
            run["artifact_bytes"], run["code_bytes"], run["total_bytes"])
        assert (seed["steps"], seed["step_avg_ms"]) == (run["steps"], run["step_avg_ms"])
