import io
import json
import random
import struct
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

DATA = Path(__file__).resolve().parents[1] / "data"
sys.path.insert(0, str(DATA))
import build_shards  # noqa: E402
import caseops  # noqa: E402
from shards import DataError, read_shard, split_documents, verify_sidecar  # noqa: E402
from tokenizer import load_tokenizer, train_tokenizer  # noqa: E402

WORDS = (
    "the of and a to in is was he for it with as his on be at by I had this not are but from or have an they "
    "which one you were her all she there would their we him been has when who will more no if out so said what "
    "NASA McDonald's iPhone café naïve Straße 2024 3.14 日本 The It"
).split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Documents that SentencePiece's normaliser leaves unchanged (single spaces, NFKC-stable)."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 80))) + "." for _ in range(n)]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def read_split(out_dir: Path, prefix: str) -> np.ndarray:
    paths = sorted(out_dir.glob(f"{prefix}_[0-9]*.bin"))
    return np.concatenate([read_shard(p) for p in paths]) if paths else np.zeros(0, np.uint16)


def decode_split(out_dir: Path, prefix: str, sp: spm.SentencePieceProcessor) -> list[str]:
    docs = split_documents(read_split(out_dir, prefix))
    assert all(d[0] == 1 for d in docs)
    return [sp.decode(d[1:].tolist()) for d in docs]


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory) -> Path:
    return train_tokenizer(make_docs(400, seed=99), 400, tmp_path_factory.mktemp("tok") / "sp400.model")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(DATA / "build_shards.py"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True)


def test_round_trip_through_the_cli(tmp_path):
    docs = make_docs(300)
    out, model = tmp_path / "out", tmp_path / "sp.model"
    corpus = write_jsonl(tmp_path / "docs.jsonl", docs)
    build_shards.main([str(corpus), "--out-dir", str(out), "--tokenizer", str(model), "--train-tokenizer",
                       "--vocab-size", "400", "--val-docs", "40", "--shard-tokens", "500", "--workers", "2"])
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert decode_split(out, "fineweb_val", sp) == docs[:40]
    assert decode_split(out, "fineweb_train", sp) == docs[40:]
    train_shards = [read_shard(p) for p in sorted(out.glob("fineweb_train_*.bin"))]
    assert len(train_shards) > 3 and all(len(s) == 500 for s in train_shards[:-1])
    assert any(s[0] != 1 for s in train_shards)  # documents run across shard boundaries


def test_txt_and_parquet_inputs(tmp_path, sp_path):
    docs = make_docs(12, seed=5)
    txt = []
    for i, d in enumerate(docs[:4]):
        txt.append(tmp_path / f"doc{i}.txt")
        txt[-1].write_text(d, encoding="utf-8")
    pq.write_table(pa.table({"id": range(8), "body": docs[4:]}), tmp_path / "rest.parquet", row_group_size=3)
    documents = build_shards.iter_documents([*txt, tmp_path / "rest.parquet"], text_field="body")
    build_shards.build_shards(documents, sp_path, tmp_path / "out", val_docs=5, shard_tokens=10**6)
    sp = load_tokenizer(sp_path)
    out = tmp_path / "out"
    assert decode_split(out, "fineweb_val", sp) + decode_split(out, "fineweb_train", sp) == docs


@pytest.mark.parametrize("extra", [[], ["--caseops"]], ids=["plain", "caseops"])
def test_build_is_deterministic_and_independent_of_workers(tmp_path, extra):
    corpus = write_jsonl(tmp_path / "docs.jsonl", make_docs(600, seed=3))

    def build(name: str, workers: int) -> dict[str, bytes]:
        out = tmp_path / name
        build_shards.main([str(corpus), "--out-dir", str(out / "shards"), "--tokenizer", str(out / "sp.model"),
                           "--train-tokenizer", "--vocab-size", "400", "--val-docs", "100", "--shard-tokens", "3000",
                           "--workers", str(workers), *extra])
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    first = build("a", workers=2)
    assert len(first) > 4
    assert build("b", workers=2) == first
    assert build("c", workers=1) == first


def test_caseops_build_writes_exact_val_sidecars(tmp_path):
    # Newlines, doubled spaces and NFKC-changed characters: the tokenizer folds them,
    # but each sidecar document still sums to the raw UTF-8 length.
    docs = [d.replace(" the ", "  The\n") + " ﬁn ½ \ue001 LOUD" for d in make_docs(200, seed=8)]
    out, model = tmp_path / "out", tmp_path / "caseops.model"
    caseops.train_tokenizer(docs, 400, model)
    build_shards.build_shards(docs, model, out, val_docs=50, shard_tokens=2000, workers=2, use_caseops=True)
    val_paths = sorted(out.glob("fineweb_val_[0-9]*.bin"))
    sidecar_paths = sorted(out.glob("fineweb_val_bytes_*.bin"))
    assert len(val_paths) == len(sidecar_paths) > 1
    for shard, sidecar in zip(val_paths, sidecar_paths, strict=True):
        verify_sidecar(shard, sidecar)
    tokens, counts = read_split(out, "fineweb_val"), read_split(out, "fineweb_val_bytes")
    starts = np.flatnonzero(tokens == 1)
    assert len(starts) == 50 and starts[0] == 0 and not counts[starts].any()
    sums = [int(c.sum()) for c in np.split(counts, starts[1:])]
    assert sums == [len(d.encode("utf-8")) for d in docs[:50]]
    sp = load_tokenizer(model)
    decoded = [caseops.inverse(t) for t in decode_split(out, "fineweb_val", sp)]
    # The original up to the tokenizer's normalisation: NFKC and whitespace folding.
    assert decoded == [unicodedata.normalize("NFKC", " ".join(d.split())) for d in docs[:50]]
    assert not list(out.glob("fineweb_train_bytes_*"))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("docs.jsonl", b'{"text": "fine"}\n{"text": "ok"}\n{"text": ""}\n', r"docs\.jsonl: line 3: empty document"),
        ("docs.jsonl", b'{"text": "fine"}\n{"text": " \\n\\t "}\n', r"docs\.jsonl: line 2: empty document"),
        ("docs.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n', r"docs\.jsonl: line 2: not valid UTF-8"),
        ("docs.jsonl", b'{"text": "lone \\ud800 surrogate"}\n', r"docs\.jsonl: line 1: not valid UTF-8"),
        ("docs.jsonl", b'{"body": "wrong key"}\n', r"docs\.jsonl: line 1: no 'text' field"),
        ("doc.txt", b"Latin-1 caf\xe9", r"doc\.txt: not valid UTF-8 \(byte 11\)"),
        ("doc.txt", b"", r"doc\.txt: empty document"),
        ("docs.csv", b"text\nhello\n", r"docs\.csv: unsupported input type"),
    ],
)
def test_bad_documents_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        list(build_shards.iter_documents([path]))


def test_null_parquet_row_is_an_empty_document(tmp_path):
    pq.write_table(pa.table({"text": ["one", None]}), tmp_path / "docs.parquet")
    with pytest.raises(DataError, match=r"docs\.parquet: row 2: empty document"):
        list(build_shards.iter_documents([tmp_path / "docs.parquet"]))


def test_cli_reports_bad_input_in_one_line(tmp_path, sp_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_bytes(b'{"text": "fine"}\n{"text": ""}\n')
    result = run_cli(corpus, "--out-dir", tmp_path / "out", "--tokenizer", sp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: {corpus}: line 2: empty document"]


def test_tokenizer_without_bos_is_rejected(tmp_path):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(make_docs(100)), model_writer=model, vocab_size=100,
                                   bos_id=-1, minloglevel=2)
    path = tmp_path / "nobos.model"
    path.write_bytes(model.getvalue())
    with pytest.raises(DataError, match=r"nobos\.model: tokenizer has no BOS piece"):
        build_shards.build_shards(make_docs(3), path, tmp_path / "out")
    corpus = write_jsonl(tmp_path / "d.jsonl", make_docs(3))
    result = run_cli(corpus, "--out-dir", tmp_path / "out", "--tokenizer", path)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1 and "nobos.model" in result.stderr


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def test_vocab_over_uint16_is_rejected(tmp_path, sp_path):
    # Append pieces to the serialized ModelProto (field 1: piece string, field 2: float score).
    extra = bytearray()
    for i in range(65537 - 400):
        name = b"extra%d" % i
        piece = b"\x0a" + _varint(len(name)) + name + b"\x15" + struct.pack("<f", -1e4)
        extra += b"\x0a" + _varint(len(piece)) + piece
    path = tmp_path / "huge.model"
    path.write_bytes(sp_path.read_bytes() + bytes(extra))
    assert spm.SentencePieceProcessor(model_file=str(path)).get_piece_size() == 65537
    with pytest.raises(DataError, match=r"huge\.model: vocab of 65,537 pieces has ids above 65,535"):
        load_tokenizer(path)
    with pytest.raises(DataError, match="does not fit uint16"):
        train_tokenizer(make_docs(3), 70000, tmp_path / "big.model")


def test_existing_shards_are_not_silently_mixed(tmp_path, sp_path):
    build_shards.build_shards(make_docs(5), sp_path, tmp_path / "out", val_docs=2)
    with pytest.raises(DataError, match="already holds 2 shard files"):
        build_shards.build_shards(make_docs(5, seed=1), sp_path, tmp_path / "out", val_docs=2)
    build_shards.build_shards(make_docs(5, seed=1), sp_path, tmp_path / "out", val_docs=5, overwrite=True)
    assert [p.name for p in sorted((tmp_path / "out").iterdir())] == ["fineweb_val_000000.bin"]
