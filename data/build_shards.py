"""Tokenize documents into challenge shards.

    python3 data/build_shards.py docs.jsonl --tokenizer data/tokenizers/fineweb_8192_bpe.model \\
        --out-dir data/datasets/fineweb10B_sp8192

Inputs: .txt (one document per file), .jsonl (one {"text": ...} object per line) or
.parquet (a text column). Each document becomes [BOS] + sp.encode(text); the first
--val-docs documents go to fineweb_val_*.bin, the rest to fineweb_train_*.bin, and
documents run across shard boundaries. With --caseops the text goes through the
CaseOps transform first and the val split gets fineweb_val_bytes_*.bin sidecars.
Output bytes depend only on the inputs and options, not on --workers.
"""
import argparse
import itertools
import json
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sentencepiece as spm

import caseops
from shards import BOS_ID, DataError, ShardWriter
from tokenizer import load_tokenizer, train_tokenizer

BATCH_DOCS = 256
BATCH_CHARS = 1 << 20  # ~1 MB of text per task: big enough to amortise IPC, small enough to balance
PROGRESS_SECONDS = 2.0


# ---------------------------------------------------------------- reading documents


def _checked(text, where: str) -> str:
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not valid UTF-8 (byte {e.start})") from None
    if not isinstance(text, str):
        raise DataError(f"{where}: expected a string, got {type(text).__name__}")
    if not text.strip():
        raise DataError(f"{where}: empty document")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates from JSON "\ud800" escapes
        raise DataError(f"{where}: not valid UTF-8 (unpaired surrogate at character {e.start})") from None
    return text


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with path.open("rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}: line {line_no}"
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 (byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise DataError(f"{where}: no {text_field!r} field")
            yield _checked(record[text_field], where)


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    if text_field not in table.schema_arrow.names:
        raise DataError(f"{path}: no {text_field!r} column (columns: {', '.join(table.schema_arrow.names)})")
    row = 0
    for batch in table.iter_batches(columns=[text_field], batch_size=4096):
        column = batch.column(0)
        for i in range(len(column)):
            row += 1
            where = f"{path}: row {row}"
            try:
                text = column[i].as_py()
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 (byte {e.start})") from None
            yield _checked("" if text is None else text, where)


def iter_documents(paths: Iterable[Path], text_field: str = "text") -> Iterator[str]:
    """Documents of the input files in order; DataError names the file on bad input."""
    for path in map(Path, paths):
        if path.suffix == ".txt":
            yield _checked(path.read_bytes(), str(path))
        elif path.suffix == ".jsonl":
            yield from _jsonl_documents(path, text_field)
        elif path.suffix == ".parquet":
            yield from _parquet_documents(path, text_field)
        else:
            raise DataError(f"{path}: unsupported input type (expected .txt, .jsonl or .parquet)")


# ---------------------------------------------------------------- encoding (worker processes)

_sp: spm.SentencePieceProcessor | None = None
_use_caseops = False


def _init_worker(model: bytes, use_caseops: bool) -> None:
    global _sp, _use_caseops
    _sp, _use_caseops = spm.SentencePieceProcessor(model_proto=model), use_caseops


def _encode_batch(task: tuple[list[str], bool]) -> tuple[bool, np.ndarray, np.ndarray | None, int, int]:
    """(is_val, [BOS] + ids of each document, their byte sidecar for CaseOps val, docs, text bytes)."""
    texts, is_val = task
    text_bytes = sum(len(t.encode("utf-8")) for t in texts)
    if _use_caseops and is_val:
        tokens, counts = [], []
        for text in texts:
            ids, byte_counts = caseops.encode_with_byte_counts(_sp, text)
            tokens += [BOS_ID, *ids]
            counts += [0, *byte_counts.tolist()]
        return is_val, np.array(tokens, np.uint16), np.array(counts, np.uint16), len(texts), text_bytes
    if _use_caseops:
        texts = [caseops.transform(t) for t in texts]
    tokens = []
    for ids in _sp.encode(texts, num_threads=1):
        tokens.append(BOS_ID)
        tokens += ids
    return is_val, np.array(tokens, np.uint16), None, len(texts), text_bytes


def _tasks(documents: Iterable[str], val_docs: int) -> Iterator[tuple[list[str], bool]]:
    """Batches of documents in input order; a batch never mixes val and train."""
    batch, chars, batch_is_val = [], 0, True
    for i, text in enumerate(documents):
        is_val = i < val_docs
        if batch and (is_val != batch_is_val or len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS):
            yield batch, batch_is_val
            batch, chars = [], 0
        batch.append(text)
        chars += len(text)
        batch_is_val = is_val
    if batch:
        yield batch, batch_is_val


def _encoded(tasks: Iterator, model: bytes, use_caseops: bool, workers: int) -> Iterator:
    """Results in task order. At most 2 tasks per worker are in flight, bounding memory."""
    if workers <= 1:
        _init_worker(model, use_caseops)
        yield from map(_encode_batch, tasks)
        return
    with multiprocessing.Pool(workers, _init_worker, (model, use_caseops)) as pool:
        pending = deque()
        for task in tasks:
            pending.append(pool.apply_async(_encode_batch, (task,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---------------------------------------------------------------- building


@dataclass
class BuildResult:
    val_paths: list[Path] = field(default_factory=list)
    train_paths: list[Path] = field(default_factory=list)
    sidecar_paths: list[Path] = field(default_factory=list)
    val_docs: int = 0
    train_docs: int = 0
    val_tokens: int = 0
    train_tokens: int = 0
    text_bytes: int = 0
    seconds: float = 0.0


def build_shards(
    documents: Iterable[str],
    tokenizer_path: Path,
    out_dir: Path,
    *,
    val_docs: int = 50_000,
    shard_tokens: int = 10**8,
    workers: int = 1,
    use_caseops: bool = False,
    overwrite: bool = False,
    log=sys.stderr,
) -> BuildResult:
    sp = load_tokenizer(tokenizer_path)
    if use_caseops:
        caseops.check_tokenizer(sp, tokenizer_path)
    if shard_tokens <= 0:
        raise DataError(f"{out_dir}: shard size must be positive, got {shard_tokens}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = sorted(out_dir.glob("fineweb_*.bin"))
    if stale and not overwrite:
        raise DataError(f"{out_dir}: already holds {len(stale)} shard files; use an empty directory or --overwrite")
    for path in stale:
        path.unlink()

    val = ShardWriter(out_dir, "fineweb_val", shard_tokens)
    train = ShardWriter(out_dir, "fineweb_train", shard_tokens)
    sidecar = ShardWriter(out_dir, "fineweb_val_bytes", shard_tokens)
    result = BuildResult()
    start = last_report = time.monotonic()
    model = Path(tokenizer_path).read_bytes()
    for is_val, tokens, counts, n_docs, n_bytes in _encoded(_tasks(documents, val_docs), model, use_caseops, workers):
        (val if is_val else train).add(tokens)
        if counts is not None:
            sidecar.add(counts)
        if is_val:
            result.val_docs += n_docs
        else:
            result.train_docs += n_docs
        result.text_bytes += n_bytes
        now = time.monotonic()
        if now - last_report >= PROGRESS_SECONDS:
            last_report = now
            mb = result.text_bytes / 1e6
            print(
                f"  {result.val_docs + result.train_docs:,} docs, {mb:,.1f} MB of text, {mb / (now - start):.1f} MB/s",
                file=log,
                flush=True,
            )
    if result.val_docs + result.train_docs == 0:
        raise DataError(f"{out_dir}: no documents to write")
    result.val_paths, result.train_paths, result.sidecar_paths = val.close(), train.close(), sidecar.close()
    result.val_tokens, result.train_tokens = val.total, train.total
    result.seconds = time.monotonic() - start
    return result


def _first_megabytes(documents: Iterable[str], megabytes: float) -> Iterator[str]:
    budget = megabytes * 1e6
    for doc in documents:
        if budget <= 0:
            return
        budget -= len(doc.encode("utf-8"))
        yield doc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, help=".txt, .jsonl or .parquet files, read in this order")
    parser.add_argument("--out-dir", type=Path, required=True, help="directory for the shards")
    parser.add_argument("--tokenizer", type=Path, required=True, help="SentencePiece model to use (or to write)")
    parser.add_argument("--train-tokenizer", action="store_true", help="train --tokenizer on the train documents first")
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocab size when training (default 8192)")
    parser.add_argument("--tokenizer-train-mb", type=float, default=200,
                        help="MB of train text to train on (default 200)")
    parser.add_argument("--val-docs", type=int, default=50_000, help="leading documents that form val (default 50000)")
    parser.add_argument("--shard-tokens", type=int, default=10**8, help="tokens per shard (default 10^8)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="encoding processes (default: all cores)")
    parser.add_argument("--caseops", action="store_true", help="CaseOps-transform the text; write val byte sidecars")
    parser.add_argument("--text-field", default="text", help="JSONL key / Parquet column holding the text")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in --out-dir")
    args = parser.parse_args(argv)

    def documents() -> Iterator[str]:  # the inputs are read twice when a tokenizer is trained first
        return iter_documents(args.inputs, args.text_field)

    try:
        if args.train_tokenizer:
            print(f"training a {args.vocab_size}-piece tokenizer -> {args.tokenizer}", file=sys.stderr, flush=True)
            corpus = _first_megabytes(itertools.islice(documents(), args.val_docs, None), args.tokenizer_train_mb)
            train = caseops.train_tokenizer if args.caseops else train_tokenizer
            train(corpus, args.vocab_size, args.tokenizer)
        result = build_shards(
            documents(),
            args.tokenizer,
            args.out_dir,
            val_docs=args.val_docs,
            shard_tokens=args.shard_tokens,
            workers=args.workers,
            use_caseops=args.caseops,
            overwrite=args.overwrite,
        )
    except (DataError, OSError) as e:
        sys.exit(f"error: {e}")
    mb = result.text_bytes / 1e6
    print(f"val:   {len(result.val_paths)} shards, {result.val_tokens:,} tokens, {result.val_docs:,} docs")
    print(f"train: {len(result.train_paths)} shards, {result.train_tokens:,} tokens, {result.train_docs:,} docs")
    if result.sidecar_paths:
        print(f"val byte sidecars: {len(result.sidecar_paths)}")
    rate = mb / max(result.seconds, 1e-9)
    print(f"text: {mb:,.1f} MB in {result.seconds:.1f} s ({rate:.1f} MB/s, {args.workers} workers)")
    print(f"out: {args.out_dir}")


if __name__ == "__main__":
    main()
