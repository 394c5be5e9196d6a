"""Each rank's TTT seconds in the 8-GPU eval (FineWeb val's 50,000 documents at the workload's length
quantiles, tools/eval_workload.py target_lengths), under ttt_plan's dealing: batches of the documents sorted
longest first, batch b to rank b % 8 (round-robin, before 2026-12-01d) or to the least loaded rank so far
(ttt_batch_ranks, after). Seconds as fitted to fw64n on one H200 (long_docs_model.py: 1.922 us per
row token, 3.82 ms per chunk step), global SGD excluded. The one-GPU FineWeb-shaped workload gives one rank
1/8 of each length; this asks what the real dealing gives the slowest rank. An analysis, not a measurement:
python3 rank_balance_model.py (from anywhere; CPU)."""
import os
import sys

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
import eval_workload as ew  # noqa: E402
import train_gpt as tg  # noqa: E402

A, B, RANKS = 1.922e-6, 3.82e-3, 8
full = np.asarray(ew.target_lengths(50000))
SPANS = [(i, int(n)) for i, n in enumerate(full)]
one_rank = [(i, int(n)) for i, n in enumerate(ew.target_lengths(6250))]


def seconds(batches, h):
    return sum(A * tg.ttt_batch_work(b, *h.ttt_chunking) + B * max(tg.ttt_n_chunks(n, *h.ttt_chunking) for _, n in b)
               for b in batches)


for kw in ({}, dict(ttt_tail_chunk_size=256), dict(ttt_max_doc_tokens=10 ** 6)):
    h = tg.Hyperparameters(**kw)
    h.validate()
    plans = [tg.ttt_plan(SPANS, h, r, RANKS) for r in range(RANKS)]
    batches = plans[0].batches
    single = seconds(tg.ttt_plan(one_rank, h, 0, 1).batches, h)
    print(f"{kw or 'default'}: one-GPU workload {single:.1f} s; leftover documents per rank "
          f"{[len(p.leftover) for p in plans]}")
    for name, mine in (("round-robin", [[bi % RANKS == r for bi in range(len(batches))] for r in range(RANKS)]),
                       ("by work", [p.mine for p in plans])):
        t = [seconds([b for b, m in zip(batches, mr) if m], h) for mr in mine]
        print(f"  8 ranks, {name}: slowest {max(t):.1f} s (rank {int(np.argmax(t))}), fastest {min(t):.1f} s, "
              f"mean {np.mean(t):.1f} s")
