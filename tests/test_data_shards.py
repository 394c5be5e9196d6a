import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from shards import (  # noqa: E402
    HEADER_BYTES,
    DataError,
    ShardWriter,
    encode_shard,
    read_shard,
    split_documents,
    verify_shard,
    verify_sidecar,
    write_shard,
)


def test_header_layout_and_round_trip(tmp_path):
    tokens = np.array([1, 5, 65535, 0, 1, 7], dtype=np.uint16)
    path = tmp_path / "fineweb_val_000000.bin"
    write_shard(path, tokens)
    raw = path.read_bytes()
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert header[:3].tolist() == [20240520, 1, 6] and not header[3:].any()
    assert len(raw) == 1024 + 2 * 6
    assert np.frombuffer(raw[HEADER_BYTES:], dtype="<u2").tolist() == tokens.tolist()
    assert read_shard(path).tolist() == tokens.tolist()


def test_writer_splits_stream_into_fixed_size_shards(tmp_path):
    stream = np.arange(25, dtype=np.uint16)
    writer = ShardWriter(tmp_path, "fineweb_train", 10)
    for part in np.split(stream, [3, 4, 17]):
        writer.add(part)
    paths = writer.close()
    assert [p.name for p in paths] == [f"fineweb_train_00000{i}.bin" for i in range(3)]
    assert [verify_shard(p) for p in paths] == [10, 10, 5]
    assert np.concatenate([read_shard(p) for p in paths]).tolist() == stream.tolist()


def test_split_documents_at_bos():
    docs = split_documents(np.array([1, 9, 9, 1, 8, 1, 7, 7, 7], dtype=np.uint16))
    assert [d.tolist() for d in docs] == [[1, 9, 9], [1, 8], [1, 7, 7, 7]]


def test_truncated_shard_is_rejected_with_its_name(tmp_path):
    path = tmp_path / "fineweb_train_000003.bin"
    path.write_bytes(encode_shard(np.ones(100, dtype=np.uint16))[:-10])
    with pytest.raises(DataError, match=r"fineweb_train_000003\.bin: header says 100 tokens .*truncated"):
        read_shard(path)


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"\x00" * 100, "truncated header"),
        (b"\x00" * 1024, "bad magic"),
        (encode_shard(np.ones(4, dtype=np.uint16)) + b"\x00\x00", r"4 tokens \(1032 bytes\) but the file has 1034"),
    ],
)
def test_malformed_shards(tmp_path, raw, message):
    path = tmp_path / "bad.bin"
    path.write_bytes(raw)
    with pytest.raises(DataError, match=message):
        verify_shard(path)


def test_sidecar_must_match_its_shard(tmp_path):
    shard, sidecar = tmp_path / "fineweb_val_000000.bin", tmp_path / "fineweb_val_bytes_000000.bin"
    write_shard(shard, np.ones(10, dtype=np.uint16))
    write_shard(sidecar, np.ones(10, dtype=np.uint16))
    verify_sidecar(shard, sidecar)
    write_shard(sidecar, np.ones(9, dtype=np.uint16))
    message = r"fineweb_val_bytes_000000\.bin: 9 byte counts but fineweb_val_000000\.bin has 10"
    with pytest.raises(DataError, match=message):
        verify_sidecar(shard, sidecar)
