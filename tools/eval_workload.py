"""One rank's share of the 8-GPU evaluation as a val shard, to time it on one GPU (issue 11).

    python3 tools/eval_workload.py SRC_DIR OUT_DIR [--docs 6250] [--seed 0] [--link-train]
    DATA_PATH=OUT_DIR python3 train_gpt.py        # CASEOPS_ENABLED=0: the shard has no byte sidecar

A TIMING workload: its val_bpb means nothing. On 8 GPUs each rank scores 1/8 of FineWeb's
validation set, 6,250 of its 50,000 documents (47.85M tokens in the CaseOps shards, so ~5.98M a
rank; ~40.5M plain). The time of sliding windows and phased TTT depends on how those tokens are
split into documents (TTT batches documents of similar length, one LoRA per document; the longest
ones set the chunk count of their batch), so this shard reproduces the length distribution, not
the text: its documents are cut from SRC_DIR/fineweb_train_*.bin.

Document lengths are in tokens with the BOS included: BOS to the next BOS, which is the n of
train_gpt.document_spans, the number TTT logs (`ttp: ... dl:`) and what the quantiles below were
read from (the shard's last document has one target fewer, as in the real shard). They follow:
- p1..p95 from the leader's TTT logs (issue 11), linear between them, p0 = 50;
- above p95 a Pareto tail (log length linear in log(1 - q)) from p95 = 2,700 to 30,339 at
  q = 1 - 64/50,000, the shortest of the set's 64 longest documents. This puts p99 at ~7,800.
  A linear tail through p99 = 12,000 gives 7.71M tokens for 6,250 documents (1.29x a rank's
  5.98M); the Pareto tail gives 6.48M (1.08x), and FineWeb document lengths are heavy-tailed;
- the set's 64 longest documents (30,339..97,114) scaled to the requested count: round(64 *
  docs / 50,000) of them (8 for 6,250: a rank's share), at ranks spread evenly over 1..64 of a
  power law through both ends (length = 97,114 * rank^-0.28), so they span 30,339..97,114 like
  the set's; with one, it is the longest (the slowest rank). Only the two ends were logged.
Lengths are stratified quantiles (not random draws), so the quantiles hold at any seed; the seed
shuffles the document order, hence which source text each length gets.

Text: each document is [BOS] + a body cut from the source in order: the start of the next
source document, continued into the following documents' bodies (skipping their BOS) when it is
longer than one; the rest of a source document after a cut is skipped, so the source must hold
about 2x the workload (2.1x measured on lognormal documents of median 560, 2.8x on longer ones;
one 100M-token FineWeb train shard is plenty); a source too small is refused. Cut bodies still
pass train_gpt.py's tokenizer check (half of the first 64 documents must decode and re-encode to
their ids): 97% did with a 1,024-piece BPE. Use SRC_DIR's tokenizer (TOKENIZER_PATH); CaseOps
sources too run with CASEOPS_ENABLED=0, the byte counts then come from the LUTs.
Writes OUT_DIR/fineweb_val_000000.bin and nothing else; with --link-train also symlinks SRC_DIR's
train shards into OUT_DIR, since train_gpt.py reads train and val shards from one DATA_PATH.
"""
import argparse
import glob
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train_gpt as tg  # noqa: E402

SET_DOCS = 50_000  # FineWeb's validation set
SET_TOKENS = 47_850_000  # in the CaseOps shards (~40.5M plain): the reference for the total
LOGGED_QUANTILES = ((0.01, 105), (0.05, 137), (0.10, 183), (0.25, 287), (0.50, 560),
                    (0.75, 1_083), (0.90, 1_880), (0.95, 2_700))  # the leader's TTT logs
P0 = 50
LONGEST_DOCS, LONGEST_MIN, LONGEST_MAX = 64, 30_339, 97_114
VAL_NAME = "fineweb_val_000000.bin"
REPORT_LEVELS = (0.01, 0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95, 0.99)


def quantile_length(q):
    """Document length at quantile q in [0, 1 - 64/50,000]: linear through p0 and the logged
    quantiles, Pareto above p95 up to the shortest of the 64 longest documents."""
    q = np.asarray(q, dtype=np.float64)
    levels, lengths = zip((0.0, P0), *LOGGED_QUANTILES)
    out = np.interp(q, levels, lengths)
    q95, l95 = LOGGED_QUANTILES[-1]
    slope = np.log(LONGEST_MIN / l95) / np.log((1 - q95) / (LONGEST_DOCS / SET_DOCS))
    tail = q > q95
    out[tail] = l95 * ((1 - q95) / (1 - q[tail])) ** slope
    return out


def longest_lengths(k):
    """k of the set's 64 longest documents, at ranks spread evenly over 1..64 of the power law
    through (1, 97,114) and (64, 30,339); one: the longest."""
    exponent = np.log(LONGEST_MAX / LONGEST_MIN) / np.log(LONGEST_DOCS)
    ranks = np.linspace(1, LONGEST_DOCS, k) if k > 1 else np.ones(k)
    return LONGEST_MAX * ranks ** -exponent


def target_lengths(n_docs):
    """n_docs lengths (BOS included), ascending: round(64 n / 50,000) from the longest documents,
    the rest at the midpoints of n equal slices of [0, 1 - 64/50,000] of the quantile function."""
    k = min(round(LONGEST_DOCS * n_docs / SET_DOCS), n_docs)
    q = (1 - LONGEST_DOCS / SET_DOCS) * (np.arange(n_docs - k) + 0.5) / max(n_docs - k, 1)
    return np.sort(np.round(np.concatenate([quantile_length(q), longest_lengths(k)]))).astype(np.int64)


def source_bodies(files):
    """Document bodies (no BOS) of the train shards in order, as views; a shard's tokens before
    its first BOS (the end of a document begun in the previous shard) count as one body."""
    for f in files:
        tokens = tg.load_data_shard(f, mmap=True)
        bos = np.flatnonzero(tokens == tg.BOS_ID)
        for s, e in zip(np.concatenate([[-1], bos]) + 1, np.append(bos, len(tokens))):
            if e > s:
                yield tokens[s:e]


def build_workload(files, lengths):
    """The val token stream: per length n, BOS + n-1 body tokens taken from the source in order.
    Returns (tokens, source tokens read including what was skipped, source documents used)."""
    out = np.empty(int(lengths.sum()), dtype=np.uint16)
    bodies, pos, read, used = source_bodies(files), 0, 0, 0
    for i, n in enumerate(lengths):
        out[pos] = tg.BOS_ID
        pos, need = pos + 1, int(n) - 1
        while need:
            body = next(bodies, None)
            if body is None:
                raise ValueError(f"the source ran out after {i} of {len(lengths)} documents ({pos:,} of "
                                 f"{len(out):,} tokens; {read:,} source tokens read, the rest of each cut "
                                 f"source document is skipped): give SRC_DIR more train shards")
            take = min(need, len(body))
            out[pos:pos + take] = body[:take]
            pos, need, read, used = pos + take, need - take, read + len(body) + 1, used + 1
    return out, read, used


def write_shard(path, tokens):
    header = np.zeros(tg.SHARD_HEADER_BYTES // 4, dtype="<i4")
    header[:3] = tg.SHARD_MAGIC, tg.SHARD_VERSION, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())


def check_out_dir(out_dir, src_dir):
    """Refuse a folder whose val set would not be the workload alone, or that holds real data."""
    if os.path.realpath(out_dir) == os.path.realpath(src_dir):
        raise ValueError(f"OUT_DIR {out_dir} is SRC_DIR: the workload would replace its val shard")
    others = [f for f in glob.glob(os.path.join(out_dir, "fineweb_val_*")) if os.path.basename(f) != VAL_NAME]
    if others:  # train_gpt.py would score them too (or want CaseOps byte sidecars to match)
        raise ValueError(f"OUT_DIR {out_dir} holds other val files ({os.path.basename(sorted(others)[0])}, ...): "
                         f"use an empty folder")
    real = [f for f in glob.glob(os.path.join(out_dir, "fineweb_train_*.bin")) if not os.path.islink(f)]
    if real:
        raise ValueError(f"OUT_DIR {out_dir} holds train shards ({os.path.basename(sorted(real)[0])}, ...): "
                         f"a data folder, whose val shard would be overwritten; use an empty folder")


def link_train(files, out_dir):
    for f in files:
        link = os.path.join(out_dir, os.path.basename(f))
        if os.path.islink(link):
            os.remove(link)
        os.symlink(os.path.abspath(f), link)


def summary(lengths, stream, read, used, n_files, path):
    """Lines: totals, target vs achieved quantiles of the documents as TTT sees them, source use."""
    seen = np.array([n for _, n in tg.document_spans(stream)])
    seen[-1] += 1  # the last document's length, BOS to the end (it has one target fewer)
    k = min(round(LONGEST_DOCS * len(lengths) / SET_DOCS), len(lengths))
    targets, expected = dict(LOGGED_QUANTILES), SET_TOKENS * len(seen) / SET_DOCS
    lines = [f"eval_workload: {len(seen):,} documents, {len(stream):,} tokens (BOS included; "
             f"{len(stream) / len(seen):,.1f} a document) -> {path}",
             f"  {len(stream) / expected:.2f}x the {expected / 1e6:.2f}M tokens of {len(seen):,} FineWeb val "
             f"documents (47.85M CaseOps tokens per 50,000)",
             "  quantile  target  achieved"]
    for q in REPORT_LEVELS:
        target = f"{targets[q]:,}" if q in targets else f"~{quantile_length([q])[0]:,.0f}"
        lines.append(f"  p{round(q * 100):<7} {target:>7}  {np.quantile(seen, q):>8,.0f}")
    top = np.sort(seen)[len(seen) - k:]
    lines += [f"  min {seen.min():,}, max {seen.max():,}; longest {k}: "
              + (f"{top[0]:,}..{top[-1]:,}" if k else "none")
              + f" (the set's 64 longest, 30,339..97,114, scaled to {len(seen):,} documents)",
              f"  source: {read:,} tokens read ({used:,} documents) from {n_files} train shard(s)"]
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(prog="tools/eval_workload.py", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("src_dir", help="folder with fineweb_train_*.bin shards (the text source)")
    ap.add_argument("out_dir", help="folder for fineweb_val_000000.bin (created if missing)")
    ap.add_argument("--docs", type=int, default=SET_DOCS // 8, help="documents (default 6250: one of 8 ranks)")
    ap.add_argument("--seed", type=int, default=0, help="document order, hence which text each length gets")
    ap.add_argument("--link-train", action="store_true", help="symlink SRC_DIR's train shards into OUT_DIR")
    a = ap.parse_args(argv)
    try:
        if a.docs < 1:
            raise ValueError(f"--docs {a.docs}: need at least 1")
        files = sorted(glob.glob(os.path.join(a.src_dir, "fineweb_train_*.bin")))
        if not files:
            raise ValueError(f"no train shards match {os.path.join(a.src_dir, 'fineweb_train_*.bin')}")
        lengths = target_lengths(a.docs)
        have = sum(len(tg.load_data_shard(f, mmap=True)) for f in files)
        if have < lengths.sum():
            raise ValueError(f"{a.src_dir}: {have:,} tokens in {len(files)} train shard(s), fewer than the "
                             f"{lengths.sum():,} of {a.docs:,} documents (and cuts skip the rest of each "
                             f"source document: about 2x that is needed)")
        os.makedirs(a.out_dir, exist_ok=True)
        check_out_dir(a.out_dir, a.src_dir)
        order = np.random.default_rng(a.seed).permutation(lengths)
        stream, read, used = build_workload(files, order)
    except (ValueError, tg.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    path = os.path.join(a.out_dir, VAL_NAME)
    write_shard(path, stream)
    if a.link_train:
        link_train(files, a.out_dir)
    print("\n".join(summary(lengths, stream, read, used, len(files), path)))
    if a.link_train:
        print(f"  linked {len(files)} train shard(s) into {a.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
