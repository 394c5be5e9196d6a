"""tools/eval_workload.py (issue 11): a FineWeb-shaped val shard cut from train shards, one rank's
eval to time on one GPU. A synthetic source of random documents across two shards."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import eval_workload as ew  # noqa: E402

import train_gpt as tg  # noqa: E402

DOCS = 800  # 1 of the 64 longest (round(64 * 800 / 50,000)): ~0.9M tokens, fast


def write_shard(path, tokens):
    header = np.zeros(256, dtype="<i4")
    header[:3] = tg.SHARD_MAGIC, tg.SHARD_VERSION, len(tokens)
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


def make_source(folder, n_tokens=3_000_000, n_shards=2, seed=0):
    """Documents of lognormal length (median ~560 tokens) with ids 2..65535 (random, so a 4-token
    prefix locates a body), as one stream cut into n_shards: documents run across shards."""
    rng = np.random.default_rng(seed)
    lengths = np.maximum(2, rng.lognormal(np.log(560), 1.1, n_tokens // 300).astype(np.int64))
    lengths = lengths[:np.searchsorted(np.cumsum(lengths), n_tokens)]
    stream = rng.integers(2, 65536, int(lengths.sum()), dtype=np.uint16)
    stream[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = tg.BOS_ID
    folder.mkdir(parents=True, exist_ok=True)
    for i, piece in enumerate(np.array_split(stream, n_shards)):
        write_shard(folder / f"fineweb_train_{i:06d}.bin", piece)
    return stream


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("workload")
    source = make_source(root / "src")
    assert ew.main([str(root / "src"), str(root / "out"), "--docs", str(DOCS), "--seed", "3"]) == 0
    return root, source, tg.load_data_shard(root / "out" / ew.VAL_NAME)


def test_shard_reads_with_requested_docs_and_nothing_else(built):
    root, _, out = built
    assert sorted(p.name for p in (root / "out").iterdir()) == [ew.VAL_NAME]
    assert out[0] == tg.BOS_ID
    spans = tg.document_spans(out)
    assert len(spans) == (out == tg.BOS_ID).sum() == DOCS
    seen = np.array([n for _, n in spans])
    seen[-1] += 1  # the last document runs to the end of the shard
    assert sorted(seen.tolist()) == ew.target_lengths(DOCS).tolist()  # BOS included, as TTT counts them


def test_bodies_are_cut_from_source_documents_in_order(built):
    """Each body is contiguous in the source with its BOS tokens removed and starts at a source
    document (or shard) start, so it stays in one document unless longer than it: no BOS inside."""
    _, source, out = built
    is_bos = source == tg.BOS_ID
    flat = source[~is_bos].astype(np.int64)
    doc_starts = set((np.flatnonzero(is_bos) - np.arange(is_bos.sum())).tolist())
    doc_starts |= {(len(source) + 1) // 2 - int(is_bos[:(len(source) + 1) // 2].sum())}  # shard 2's head
    keys = flat[:-3] << 48 | flat[1:-2] << 32 | flat[2:-1] << 16 | flat[3:]
    order = np.argsort(keys)
    bos = np.flatnonzero(out == tg.BOS_ID)
    for s, e in zip(bos, np.append(bos[1:], len(out))):
        body = out[s + 1:e].astype(np.int64)
        assert len(body) >= 4 and not (body == tg.BOS_ID).any()
        key = body[0] << 48 | body[1] << 32 | body[2] << 16 | body[3]
        pos = order[np.searchsorted(keys, key, sorter=order)]
        assert keys[pos] == key and pos in doc_starts
        assert np.array_equal(flat[pos:pos + len(body)], body)


def test_quantiles_and_longest_documents(built):
    _, _, out = built
    seen = np.array([n for _, n in tg.document_spans(out)][:-1])  # the last is one short
    for q, target in ew.LOGGED_QUANTILES:
        assert abs(np.quantile(seen, q) - target) <= 0.03 * target + 2, q
    assert seen.max() == ew.LONGEST_MAX and seen.min() >= ew.P0


def test_full_rank_lengths():
    """6,250 documents: the logged quantiles, a rank's 8 of the 64 longest spanning
    30,339..97,114, a p99 between p95 and 12,000, ~6.5M tokens (1.08x the 5.98M of a rank)."""
    lengths = ew.target_lengths(6250)
    assert len(lengths) == 6250 and lengths[0] >= ew.P0
    for q, target in ew.LOGGED_QUANTILES:
        assert abs(np.quantile(lengths, q) - target) <= 0.01 * target + 1, q
    assert 2_700 < np.quantile(lengths, 0.99) < 12_000
    assert lengths[-8:].tolist()[::7] == [ew.LONGEST_MIN, ew.LONGEST_MAX] and lengths[-9] < ew.LONGEST_MIN
    assert 6.0e6 < lengths.sum() < 7.0e6


def test_deterministic_for_a_seed(built, tmp_path):
    root, _, out = built
    args = [str(root / "src"), "--docs", str(DOCS)]
    assert ew.main(args[:1] + [str(tmp_path / "same")] + args[1:] + ["--seed", "3"]) == 0
    assert (tmp_path / "same" / ew.VAL_NAME).read_bytes() == (root / "out" / ew.VAL_NAME).read_bytes()
    assert ew.main(args[:1] + [str(tmp_path / "other")] + args[1:] + ["--seed", "4"]) == 0
    other = tg.load_data_shard(tmp_path / "other" / ew.VAL_NAME)
    assert len(other) == len(out) and not np.array_equal(other, out)


def test_link_train(built, tmp_path):
    root, _, _ = built
    assert ew.main([str(root / "src"), str(tmp_path), "--docs", "50", "--link-train"]) == 0
    assert ew.main([str(root / "src"), str(tmp_path), "--docs", "50", "--link-train"]) == 0  # rerun: relinks
    links = sorted(tmp_path.glob("fineweb_train_*.bin"))
    assert [p.name for p in links] == ["fineweb_train_000000.bin", "fineweb_train_000001.bin"]
    assert all(p.is_symlink() and p.resolve() == (root / "src" / p.name).resolve() for p in links)


def test_refusals(tmp_path, capsys):
    make_source(tmp_path / "small", n_tokens=200_000, n_shards=1)
    cases = [
        ([str(tmp_path / "small"), str(tmp_path / "o1"), "--docs", "800"], "fewer than the"),  # headers alone
        ([str(tmp_path / "small"), str(tmp_path / "o2"), "--docs", "150"], "the source ran out after"),
        ([str(tmp_path / "none"), str(tmp_path / "o3")], "no train shards match"),
        ([str(tmp_path / "small"), str(tmp_path / "small"), "--docs", "5"], "is SRC_DIR"),
        ([str(tmp_path / "small"), str(tmp_path / "o4"), "--docs", "0"], "need at least 1"),
    ]
    for argv, message in cases:
        assert ew.main(argv) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o2" / ew.VAL_NAME).exists()
    for name in ("fineweb_val_bytes_000000.bin", "fineweb_train_000000.bin"):  # a data folder
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / name).write_bytes(b"")
        assert ew.main([str(tmp_path / "small"), str(tmp_path / "data"), "--docs", "5"]) == 1
        assert "use an empty folder" in capsys.readouterr().err
        (tmp_path / "data" / name).unlink()
