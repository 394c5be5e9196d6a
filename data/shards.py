"""The challenge shard format: a 1024-byte header of 256 little-endian int32
(magic, version, n_tokens, zeros) followed by n_tokens little-endian uint16.

Token shards (fineweb_{train,val}_NNNNNN.bin) and the CaseOps byte sidecars
(fineweb_val_bytes_NNNNNN.bin) share this layout.
"""
import os
from pathlib import Path

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_BYTES = 256 * 4
BOS_ID = 1
MAX_TOKEN_ID = np.iinfo(np.uint16).max


class DataError(Exception):
    """Bad input or output data; the message names the offending file."""


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}_{index:06d}.bin"


def encode_shard(values: np.ndarray) -> bytes:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (MAGIC, VERSION, len(values))
    return header.tobytes() + np.asarray(values, dtype="<u2").tobytes()


def write_shard(path: Path, values: np.ndarray) -> None:
    # Write-then-rename so that an interrupted build never leaves a short shard behind.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(encode_shard(values))
    os.replace(tmp, path)


def header_token_count(header: bytes, path: Path) -> int:
    """n_tokens from a shard header, after checking magic and version."""
    if len(header) < HEADER_BYTES:
        raise DataError(f"{path}: truncated header ({len(header)} of {HEADER_BYTES} bytes)")
    magic, version, n_tokens = np.frombuffer(header[:12], dtype="<i4")
    if magic != MAGIC:
        raise DataError(f"{path}: bad magic {magic} (expected {MAGIC}); not a shard")
    if version != VERSION:
        raise DataError(f"{path}: unsupported shard version {version} (expected {VERSION})")
    return int(n_tokens)


def verify_shard(path: Path) -> int:
    """Token count of a shard whose size matches its header; DataError otherwise."""
    path = Path(path)
    with path.open("rb") as f:
        n_tokens = header_token_count(f.read(HEADER_BYTES), path)
    expected, actual = HEADER_BYTES + 2 * n_tokens, path.stat().st_size
    if actual != expected:
        raise DataError(
            f"{path}: header says {n_tokens} tokens ({expected} bytes) but the file has {actual} bytes"
            + (" (truncated)" if actual < expected else "")
        )
    return n_tokens


def read_shard(path: Path) -> np.ndarray:
    n_tokens = verify_shard(path)
    return np.fromfile(path, dtype="<u2", count=n_tokens, offset=HEADER_BYTES)


def verify_sidecar(shard_path: Path, sidecar_path: Path) -> None:
    """A byte sidecar must hold exactly one count per token of its shard."""
    n_tokens, n_counts = verify_shard(shard_path), verify_shard(sidecar_path)
    if n_tokens != n_counts:
        raise DataError(f"{sidecar_path}: {n_counts} byte counts but {shard_path.name} has {n_tokens} tokens")


def split_documents(tokens: np.ndarray) -> list[np.ndarray]:
    """Split a token stream at BOS; each piece starts with BOS (the stream's head may not)."""
    starts = np.flatnonzero(tokens == BOS_ID)
    return [d for d in np.split(tokens, starts) if len(d)]


class ShardWriter:
    """Streams uint16 values into consecutive shards of shard_tokens values each."""

    def __init__(self, out_dir: Path, prefix: str, shard_tokens: int):
        self.out_dir, self.prefix = Path(out_dir), prefix
        self.buffer = np.empty(shard_tokens, dtype=np.uint16)
        self.filled = 0
        self.paths: list[Path] = []
        self.total = 0

    def add(self, values: np.ndarray) -> None:
        while len(values):
            take = min(len(values), len(self.buffer) - self.filled)
            self.buffer[self.filled:self.filled + take] = values[:take]
            self.filled += take
            values = values[take:]
            if self.filled == len(self.buffer):
                self._flush()

    def close(self) -> list[Path]:
        if self.filled:
            self._flush()
        return self.paths

    def _flush(self) -> None:
        path = self.out_dir / shard_name(self.prefix, len(self.paths))
        write_shard(path, self.buffer[:self.filled])
        self.paths.append(path)
        self.total += self.filled
        self.filled = 0
