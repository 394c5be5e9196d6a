"""run.sh. The main job on a machine without FineWeb: it builds the embedded corpus and runs the
whole pipeline (train, GPTQ, artifact, quantized / TTT eval; the sliding diagnostic is skipped by
the eval budget), shortened through its environment overrides, which must win over run.sh's own
defaults; it stops at a failed corpus build. Then every subcommand's dispatch, with stand-ins for
python and nvidia-smi."""
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_run_sh_without_fineweb_runs_the_embedded_pipeline(tmp_path):
    env = {**os.environ, "DATA_PATH": str(tmp_path / "no_fineweb"), "EMBEDDED_DIR": str(tmp_path / "embedded"),
           "LOG_DIR": str(tmp_path / "logs"), "RUN_ID": "runsh", "ARTIFACT_PATH": str(tmp_path / "model.pgq"),
           "ITERATIONS": "2", "MAX_WALLCLOCK_SECONDS": "0", "GPTQ_RESERVE_SECONDS": "0",
           "EVAL_BUDGET_SECONDS": "1", "PHASED_TTT_NUM_PHASES": "1",
           # narrower than run.sh's CPU config, shorter eval windows: run.sh's path is under test, not
           # the model (88 s -> 38 s on 2 cores)
           "MODEL_DIM": "64", "EVAL_SEQ_LEN": "128", "EVAL_STRIDE": "128"}
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
    # a 1 s budget: TTT falls back to windows (disjoint when sliding ones would not fit) for every
    # document at once, and the sliding-window diagnostic after it cannot fit
    assert re.search(r"^ttt_leftover: \d+ documents scored by (sliding|disjoint) windows .*deadline: yes\)$", log, re.M)
    assert re.search(r"^diagnostic quantized_sliding_window skipped: predicted \d+s would end past "
                     r"EVAL_BUDGET_SECONDS=1$", log, re.M)
    assert re.search(r"^total_eval_time:[\d.]+s", log, re.M)
    assert (tmp_path / "logs" / "runsh.txt").is_file()


# ----- run.sh's subcommands, with a stand-in python (env checks pass; what it is asked to run is
# logged) and a stand-in nvidia-smi, in a copy of run.sh: fast, and the same with or without GPUs -----

FAKE_PYTHON = r"""#!/usr/bin/env bash
case "$1" in
  -c) exit "${FAKE_TOO_OLD:-0}" ;;
  -V) echo "Python 3.8.10" ;;
  tools/env_setup.py)
    [ -z "${FAKE_SETUP_EXIT:-}" ] || { echo "env_setup: no network" >&2; exit "$FAKE_SETUP_EXIT"; }
    echo "$0" ;;
  train_gpt.py)
    echo "start $SEED gpu=${CUDA_VISIBLE_DEVICES-none} $RUN_ID $ARTIFACT_PATH" >>"$FAKE_LOG"; sleep 1
    echo "end $SEED" >>"$FAKE_LOG"; exit $((SEED % 2 ? 3 : 0)) ;;
  *) echo "DATA_PATH=$DATA_PATH SEED=${SEED:-} | $*" >>"$FAKE_LOG" ;;
esac
"""


def fake_run(tmp_path, *args, gpus=0, shards=True, **env):
    """bash run.sh ARGS in a copy of the repo's run.sh; returns (process, lines the stand-ins logged)."""
    repo, bin_ = tmp_path / "repo", tmp_path / "bin"
    for d in (repo, bin_, tmp_path / "shards"):
        d.mkdir(exist_ok=True)
    (repo / "run.sh").write_text((ROOT / "run.sh").read_text())
    (bin_ / "python3").write_text(FAKE_PYTHON)
    (bin_ / "nvidia-smi").write_text("#!/bin/sh\n" + "".join(f"echo 'GPU {i}: NVIDIA H100 (UUID: GPU-{i})'\n"
                                                              for i in range(gpus)) + ("" if gpus else "exit 9\n"))
    for f in bin_.iterdir():
        f.chmod(0o755)
    if shards:
        (tmp_path / "shards" / "fineweb_train_000000.bin").write_bytes(b"")
    log = tmp_path / "fake.log"
    log.write_text("")
    base = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "PYTHON", "SEED", "NPROC")}
    env = {**base, "PATH": f"{bin_}:{os.environ['PATH']}", "DATA_PATH": str(tmp_path / "shards"),
           "FAKE_LOG": str(log), "LOG_DIR": str(tmp_path / "logs"), **env}
    out = subprocess.run(["bash", str(repo / "run.sh"), *args], env=env, capture_output=True, text=True, timeout=60)
    return out, log.read_text().splitlines()


def test_unknown_subcommand_is_a_usage_error(tmp_path):
    out, ran = fake_run(tmp_path, "tset")
    assert out.returncode == 2 and "unknown subcommand 'tset'" in out.stderr and "bash run.sh test" in out.stderr
    assert ran == []


@pytest.mark.parametrize("args,gpus,expected", [
    ((), 2, "| -m torch.distributed.run --standalone --nproc_per_node=2 train_gpt.py"),
    ((), 0, "| -m torch.distributed.run --standalone --nproc_per_node=1 train_gpt.py"),
    (("test",), 0, "| -m pytest -q -n 2 --dist loadfile"),
    (("test", "-x", "tests/test_repo.py"), 0, "| -m pytest -x tests/test_repo.py"),
    (("sweep", "--grid", "a b"), 0, "| tools/sweep.py --grid a b"),
    (("records", "check"), 0, "| tools/records.py check"),
])
def test_subcommands_run_in_the_chosen_python(tmp_path, args, gpus, expected):
    out, ran = fake_run(tmp_path, *args, gpus=gpus)
    assert out.returncode == 0, out.stderr
    assert [line.split(" | ", 1)[1] for line in ran] == [expected.removeprefix("| ")]


def test_proxy_sources_the_staged_bench_environment(tmp_path):
    (tmp_path / "repo" / ".bench").mkdir(parents=True)
    (tmp_path / "repo" / ".bench" / "device_prep.sh").write_text("export DATA_PATH=/tmp/proxy SEED=42\n")
    out, ran = fake_run(tmp_path, "proxy", gpus=1)
    assert out.returncode == 0, out.stderr
    assert ran == ["DATA_PATH=/tmp/proxy SEED=42 | -m torch.distributed.run --standalone --nproc_per_node=1 train_gpt.py"]


@pytest.mark.parametrize("env,code,words", [
    ({"FAKE_SETUP_EXIT": "11"}, 11, "no network"),  # env_setup's code and message come through
    ({"FAKE_TOO_OLD": "1"}, 10, "Python 3.8.10 is too old"),
    ({"PYTHON": "/nonexistent/python3"}, 10, "/nonexistent/python3 not found"),
])
def test_environment_failures_stop_with_their_exit_code(tmp_path, env, code, words):
    out, ran = fake_run(tmp_path, "test", **env)
    assert out.returncode == code and words in out.stderr and ran == []


def test_seeds_run_in_parallel_one_gpu_each_and_queue_beyond_the_gpu_count(tmp_path):
    out, ran = fake_run(tmp_path, "seeds", "1", "2", "3", gpus=2)
    assert out.returncode == 1, out.stderr  # seeds 1 and 3 fail (the stand-in exits 3 on odd seeds)
    starts = {line.split()[1]: line for line in ran if line.startswith("start")}
    assert starts["1"] == "start 1 gpu=0 seed1 final_model_seed1.pgq"
    assert starts["2"] == "start 2 gpu=1 seed2 final_model_seed2.pgq"
    assert starts["3"] == "start 3 gpu=0 seed3 final_model_seed3.pgq"
    order = [" ".join(line.split()[:2]) for line in ran]
    assert order.index("start 2") < order.index("end 1")  # 1 and 2 at once, on GPUs 0 and 1
    assert order.index("end 1") < order.index("start 3")  # 3 waits for GPU 0
    for seed, rc in (("1", 3), ("2", 0), ("3", 3)):
        assert f"  seed {seed}: exit {rc} (log {tmp_path}/logs/seed{seed}.txt)" in out.stdout
        assert (tmp_path / "logs" / f"seed{seed}.out").is_file()


def test_seeds_use_the_gpus_cuda_visible_devices_allows(tmp_path):
    out, ran = fake_run(tmp_path, "seeds", "2", "4", gpus=4, CUDA_VISIBLE_DEVICES="5,7")
    assert out.returncode == 0, out.stderr
    assert sorted(line.split()[2] for line in ran if line.startswith("start")) == ["gpu=5", "gpu=7"]


def test_seeds_without_gpus_run_one_after_another_on_cpu(tmp_path):
    out, ran = fake_run(tmp_path, "seeds", "2", "4", gpus=0)
    assert out.returncode == 0, out.stderr
    assert [" ".join(line.split()[:3]) for line in ran] == ["start 2 gpu=none", "end 2", "start 4 gpu=none", "end 4"]


@pytest.mark.parametrize("args", [(), ("x",), ("1", "1")])
def test_seeds_need_distinct_integer_seeds(tmp_path, args):
    out, ran = fake_run(tmp_path, "seeds", *args)
    assert out.returncode == 2 and ran == []


def test_a_failed_corpus_build_stops_run_sh_at_its_error(tmp_path):
    """Issue 13: run.sh went on after the embedded corpus build failed and then reported 'no shards'."""
    (tmp_path / "file").write_text("")
    env = {**os.environ, "DATA_PATH": str(tmp_path / "no_fineweb"), "EMBEDDED_DIR": str(tmp_path / "file" / "sub")}
    out = subprocess.run(["bash", str(ROOT / "run.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert "Not a directory" in out.stderr and "building the embedded corpus failed (exit 1)" in out.stderr
    assert "shards" not in out.stderr  # train_gpt.py never started
