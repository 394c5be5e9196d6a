"""The downloader against a local directory laid out like the Hugging Face repo."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[1] / "data"
sys.path.insert(0, str(DATA))
import cached_challenge_fineweb as ccf  # noqa: E402
from shards import encode_shard  # noqa: E402

SP1024 = "datasets/datasets/fineweb10B_sp1024"
CASEOPS = "datasets/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"


def shard(n: int, seed: int) -> bytes:
    return encode_shard(np.random.default_rng(seed).integers(0, 1024, n, dtype=np.uint16))


@pytest.fixture
def hub(tmp_path) -> Path:
    root = tmp_path / "hub"
    files = {
        "datasets/manifest.json": json.dumps({"datasets": [{"name": "fineweb10B_sp1024"}]}).encode(),
        "datasets/tokenizers/fineweb_1024_bpe.model": b"model bytes",
        "datasets/tokenizers/fineweb_1024_bpe.vocab": b"vocab bytes",
        f"{SP1024}/fineweb_val_000000.bin": shard(5000, 0),
        f"{SP1024}/fineweb_val_000001.bin": shard(700, 1),
        **{f"{SP1024}/fineweb_train_{i:06d}.bin": shard(20000, 10 + i) for i in range(3)},
        "datasets/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model": b"caseops model",
        f"{CASEOPS}/fineweb_val_000000.bin": shard(300, 20),
        f"{CASEOPS}/fineweb_val_bytes_000000.bin": shard(300, 21),
        f"{CASEOPS}/fineweb_train_000000.bin": shard(900, 22),
    }
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return root


def download(hub: Path, out: Path, *args: str) -> None:
    ccf.main(["--mirror", str(hub), "--data-dir", str(out), *args])


def test_fetches_val_first_train_shards_and_tokenizer(hub, tmp_path, capsys):
    out = tmp_path / "data"
    download(hub, out, "--variant", "sp1024", "--train-shards", "2")
    local = out / "datasets" / "fineweb10B_sp1024"
    assert sorted(p.name for p in local.iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin", "fineweb_val_000001.bin"]
    for p in local.iterdir():
        assert p.read_bytes() == (hub / SP1024 / p.name).read_bytes()
    assert (out / "tokenizers" / "fineweb_1024_bpe.model").read_bytes() == b"model bytes"
    assert (out / "tokenizers" / "fineweb_1024_bpe.vocab").exists() and (out / "manifest.json").exists()
    assert capsys.readouterr().out.count(": downloaded") == 7

    download(hub, out, "--variant", "sp1024", "--train-shards", "2")  # a second run finds everything in place
    assert capsys.readouterr().out.count(": complete") == 7


def test_resumes_partial_and_redoes_wrong_files(hub, tmp_path, capsys):
    out = tmp_path / "data"
    local = out / "datasets" / "fineweb10B_sp1024"
    local.mkdir(parents=True)
    source = (hub / SP1024 / "fineweb_train_000001.bin").read_bytes()
    # An interrupted download, its payload bytes marked so that a resumed copy can be told from a fresh one.
    partial = source[:1024] + bytes(12345 - 1024)
    (local / "fineweb_train_000001.bin.part").write_bytes(partial)
    cut_short = (hub / SP1024 / "fineweb_train_000000.bin").read_bytes()[:3000]
    (local / "fineweb_train_000000.bin").write_bytes(cut_short)
    download(hub, out, "--variant", "sp1024", "--train-shards", "2")
    printed = capsys.readouterr().out
    assert "fineweb_train_000001.bin: resumed after 12,345 bytes" in printed
    assert "fineweb_train_000000.bin: downloaded" in printed
    assert (local / "fineweb_train_000001.bin").read_bytes() == partial + source[12345:]
    assert (local / "fineweb_train_000000.bin").read_bytes() == (hub / SP1024 / "fineweb_train_000000.bin").read_bytes()
    assert not list(local.glob("*.part"))


def test_corrupt_shard_in_the_repo_is_detected(hub, tmp_path):
    bad = hub / SP1024 / "fineweb_train_000001.bin"
    bad.write_bytes(bad.read_bytes()[:-100])  # the listed size is the file's own: only the header tells
    out = tmp_path / "data"
    result = subprocess.run(
        [sys.executable, str(DATA / "cached_challenge_fineweb.py"), "--mirror", str(hub), "--data-dir", str(out),
         "--variant", "sp1024", "--train-shards", "2"],
        capture_output=True, text=True,
    )
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert "fineweb_train_000001.bin" in line and "header says 20000 tokens" in line
    local = out / "datasets" / "fineweb10B_sp1024"
    assert not (local / "fineweb_train_000001.bin").exists() and not list(local.glob("*.part"))


def test_caseops_variant_fetches_and_checks_sidecars(hub, tmp_path):
    out = tmp_path / "data"
    download(hub, out, "--variant", "sp8192_caseops", "--train-shards", "1")
    local = out / "datasets" / "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
    assert (local / "fineweb_val_bytes_000000.bin").exists()
    assert (out / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model").exists()

    (hub / CASEOPS / "fineweb_val_bytes_000000.bin").write_bytes(shard(299, 21))
    message = r"fineweb_val_bytes_000000\.bin: 299 byte counts but fineweb_val_000000\.bin has 300"
    with pytest.raises(SystemExit, match=message):
        download(hub, tmp_path / "again", "--variant", "sp8192_caseops", "--train-shards", "1")


def test_too_many_train_shards(hub, tmp_path):
    with pytest.raises(SystemExit, match="has 3 train shards, 4 requested"):
        download(hub, tmp_path / "data", "--variant", "sp1024", "--train-shards", "4")


def test_hub_is_the_default_source(hub, tmp_path, monkeypatch):
    used = []

    class FakeHub(ccf.MirrorSource):
        def __init__(self, repo_id, staging_dir):
            used.append(repo_id)
            super().__init__(hub)

    monkeypatch.setattr(ccf, "HubSource", FakeHub)
    monkeypatch.delenv("MATCHED_FINEWEB_MIRROR", raising=False)
    ccf.main(["--variant", "sp1024", "--train-shards", "0", "--data-dir", str(tmp_path / "a")])
    assert used == ["willdepueoai/parameter-golf"]
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "someone/else")
    ccf.main(["--variant", "sp1024", "--train-shards", "0", "--data-dir", str(tmp_path / "b")])
    assert used[-1] == "someone/else"
