"""Check that the build path reproduces a published shard: decode every document of
the proxy val shard, re-encode the texts with build_shards, compare the bytes.

    python3 data/verify_proxy_roundtrip.py [--shard PATH.bin[.xz]] [--tokenizer PATH.model]

Exits 1 if the rebuilt shard differs, after listing the documents that differ.
"""
import argparse
import lzma
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from build_shards import build_shards
from shards import BOS_ID, DataError, read_shard, split_documents
from tokenizer import load_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shard", type=Path, default=SHARED / "proxy_sp8192" / "fineweb_val_000000.bin.xz")
    parser.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizers" / "fineweb_8192_bpe.model")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        original_path = Path(tmp) / "original.bin"
        opener = lzma.open if args.shard.suffix == ".xz" else open
        try:
            with opener(args.shard, "rb") as f:
                original_path.write_bytes(f.read())
            tokens = read_shard(original_path)
            if len(tokens) == 0 or tokens[0] != BOS_ID:
                raise DataError(f"{args.shard}: does not start with BOS={BOS_ID}")
            sp = load_tokenizer(args.tokenizer)
            docs = split_documents(tokens)
            texts = [sp.decode(d[1:].tolist()) for d in docs]
            rebuilt = build_shards(
                texts, args.tokenizer, Path(tmp) / "rebuilt", val_docs=len(texts),
                shard_tokens=len(tokens), workers=os.cpu_count(),
            )
        except (DataError, OSError) as e:
            sys.exit(f"error: {e}")
        identical = rebuilt.val_paths[0].read_bytes() == original_path.read_bytes()
        print(f"{args.shard.name}: {len(docs):,} documents, {len(tokens):,} tokens, "
              f"{sum(len(t.encode()) for t in texts):,} bytes of decoded text")
        print(f"rebuilt shard byte-identical: {'yes' if identical else 'NO'}")
        if identical:
            return
        rebuilt_docs = split_documents(read_shard(rebuilt.val_paths[0]))
        for i, (old, new) in enumerate(zip(docs, rebuilt_docs, strict=False)):
            if not np.array_equal(old, new):
                at = next((k for k in range(min(len(old), len(new))) if old[k] != new[k]), min(len(old), len(new)))
                print(f"  doc {i}: {len(old)} -> {len(new)} tokens, first difference at token {at}: "
                      f"{sp.decode(old[max(at - 3, 1):at + 3].tolist())!r}")
        sys.exit(1)


if __name__ == "__main__":
    main()
