"""Data side of train_gpt.py: the shard reader, shard discovery, packed cu_seqlens, the
document-packing loader (same pieces for any world size, wrapping across shards) and the
challenge's byte accounting (SentencePiece LUTs + stream_target_bytes) and load_val_set on the
LUT path (the CaseOps sidecar path is in test_train_caseops.py)."""
import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from helpers_train import SP8192, encode_docs, english_docs, tiny_tokenizer, write_shard

CPU = torch.device("cpu")

# Byte tables of a toy 5-token vocab: ids 0 and 1 are boundaries (pad, BOS) with 0 bytes; 2 is a
# 3-byte piece with a leading space marker, 3 a 2-byte piece, 4 a 1-byte piece with a space marker.
TOY_LUTS = (np.array([0, 0, 3, 2, 1], dtype=np.int64), np.array([False, False, True, False, True]),
            np.array([True, True, False, False, False]))


# ---------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------


def test_shard_round_trip(tmp_path):
    tokens = np.array([1, 0, 65535, 7, 1, 300], dtype=np.uint16)
    path = write_shard(tmp_path / "fineweb_train_000000.bin", tokens)
    out = tg.load_data_shard(path)
    assert out.dtype == np.uint16 and out.tolist() == tokens.tolist()
    assert tg.load_data_shard(write_shard(tmp_path / "empty.bin", [])).tolist() == []


@pytest.mark.parametrize("kind, message", [
    ("magic", r"bad shard header \(magic 20240521, version 1; expected 20240520, 1\)"),
    ("version", r"bad shard header \(magic 20240520, version 2; expected 20240520, 1\)"),
    ("truncated", r"header says 10 tokens \(1044 bytes\) but the file has 1042 bytes"),
    ("trailing", r"header says 10 tokens \(1044 bytes\) but the file has 1046 bytes"),
    ("count", r"header says 12 tokens \(1048 bytes\) but the file has 1044 bytes"),
    ("short", r"1000 bytes is shorter than the 1024-byte shard header"),
])
def test_bad_shards_are_rejected_naming_the_file(tmp_path, kind, message):
    path = tmp_path / f"fineweb_train_{kind}.bin"
    tokens = np.arange(10)
    if kind == "magic":
        write_shard(path, tokens, magic=tg.SHARD_MAGIC + 1)
    elif kind == "version":
        write_shard(path, tokens, version=2)
    elif kind == "truncated":
        path.write_bytes(write_shard(path, tokens).read_bytes()[:-2])
    elif kind == "trailing":
        write_shard(path, tokens, extra=b"\x00\x00")
    elif kind == "count":
        write_shard(path, tokens, n=12)
    else:
        path.write_bytes(b"\x00" * 1000)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + message):
        tg.load_data_shard(path)


def test_shard_files_sorted_without_byte_sidecars(tmp_path):
    for name in ("fineweb_train_000002.bin", "fineweb_train_000000.bin", "fineweb_train_000001.bin",
                 "fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin", "other_train_000003.bin"):
        write_shard(tmp_path / name, [1, 2])
    assert [Path(f).name for f in tg.shard_files(str(tmp_path), "train")] == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert [Path(f).name for f in tg.shard_files(str(tmp_path), "val")] == ["fineweb_val_000000.bin"]
    val = tg.load_val_set(tg.Hyperparameters(data_path=str(tmp_path), vocab_size=3, caseops_enabled=True), TOY_LUTS)
    assert val.tokens.tolist() == [1, 2]  # the sidecar is not read as val tokens
    (tmp_path / "fineweb_val_bytes_000000.bin").unlink()
    val = tg.load_val_set(tg.Hyperparameters(data_path=str(tmp_path), vocab_size=3), TOY_LUTS)
    assert val.tokens.tolist() == [1, 2]
    assert val.target_bytes.tolist() == [0, 3]  # LUT accounting: BOS -> token 2 is base 3, no space byte


def test_load_val_set_concatenates_val_shards_in_order_with_lut_bytes(tmp_path):
    """LUT path: the val stream is all val shards in name order, and the bytes are
    stream_target_bytes of the whole stream (a shard's first token is a target of the previous
    shard's last token)."""
    write_shard(tmp_path / "fineweb_val_000001.bin", [4, 3, 1, 2])
    write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2, 3])
    write_shard(tmp_path / "fineweb_train_000000.bin", [1, 9, 9, 9])  # never part of val
    val = tg.load_val_set(tg.Hyperparameters(data_path=str(tmp_path), vocab_size=5), TOY_LUTS)
    assert val.tokens.dtype == np.uint16 and val.tokens.tolist() == [1, 2, 3, 4, 3, 1, 2]
    assert val.target_bytes.dtype == np.int64
    # targets: 2 after BOS (3, no space), 3 after 2 (2), 4 after 3 (1 + space 1), 3 after 4 (2),
    # BOS after 3 (0), 2 after BOS (3)
    assert val.target_bytes.tolist() == [0, 3, 2, 2, 2, 0, 3]
    assert val.target_bytes.tolist() == tg.stream_target_bytes(val.tokens, TOY_LUTS).tolist()


def test_load_val_set_rejects_token_ids_outside_the_vocab(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2, 3])
    write_shard(tmp_path / "fineweb_val_000001.bin", [1, 4, 2])
    assert tg.load_val_set(tg.Hyperparameters(data_path=str(tmp_path), vocab_size=5), TOY_LUTS).tokens.max() == 4
    with pytest.raises(tg.ConfigError, match=r"^VOCAB_SIZE=4: val shards hold token id 4$"):
        tg.load_val_set(tg.Hyperparameters(data_path=str(tmp_path), vocab_size=4), TOY_LUTS)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "none" / "fineweb_val_*.bin"))):
        tg.load_val_set(tg.Hyperparameters(data_path=str(tmp_path / "none"), vocab_size=5), TOY_LUTS)


def test_shard_files_missing_names_the_pattern(tmp_path):
    write_shard(tmp_path / "fineweb_val_bytes_000000.bin", [1])  # a sidecar is not a val shard
    pattern = str(tmp_path / "fineweb_val_*.bin")
    with pytest.raises(FileNotFoundError, match=re.escape(pattern)):
        tg.shard_files(str(tmp_path), "val")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope" / "fineweb_train_*.bin"))):
        tg.shard_files(str(tmp_path / "nope"), "train")


# ---------------------------------------------------------------------------------------
# Packing: cu_seqlens and the loader
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens, seq_len, expected", [
    # leading fragment of 5 (cut at 4), doc of 3, doc of 10 (cuts at +4, +8), doc of exactly 4
    ([9, 9, 9, 9, 9, 1, 2, 3, 1, 4, 4, 4, 4, 4, 4, 4, 4, 4, 1, 5, 5, 5], 4, [0, 4, 5, 8, 12, 16, 18, 22]),
    ([7] * 10, 4, [0, 4, 8, 10]),                       # no BOS at all
    ([1, 3, 3], 4, [0, 3]),                             # BOS at 0 is not a second start
    ([1, 1, 1, 5], 2, [0, 1, 2, 4]),                    # consecutive BOS: 1-token documents
    ([5, 1], 8, [0, 1, 2]),                             # BOS as the last token
    ([1, 2, 3, 4, 5, 6, 7, 8, 9], 3, [0, 3, 6, 9]),     # a cut landing exactly at the end adds nothing
])
def test_packed_cu_seqlens_exact(tokens, seq_len, expected):
    cu = tg.packed_cu_seqlens(np.array(tokens, dtype=np.uint16), seq_len)
    assert cu.dtype == np.int32
    assert cu.tolist() == expected


def test_packed_cu_seqlens_invariants_on_random_rows():
    rng = np.random.default_rng(0)
    for _ in range(50):
        row = rng.integers(0, 6, rng.integers(1, 300)).astype(np.uint16)
        seq_len = int(rng.integers(1, 40))
        cu = tg.packed_cu_seqlens(row, seq_len)
        starts = set(cu[:-1].tolist())
        assert cu[0] == 0 and cu[-1] == len(row) and (np.diff(cu) > 0).all()
        assert (np.diff(cu) <= seq_len).all()
        assert set(np.flatnonzero(row == tg.BOS_ID).tolist()) <= starts
        for s, e in zip(cu[:-1], cu[1:]):  # a non-BOS start is exactly seq_len after the previous start
            assert not (row[s + 1:e] == tg.BOS_ID).any()
            if s > 0 and row[s] != tg.BOS_ID:
                prev = cu[np.searchsorted(cu, s) - 1]
                assert s - prev == seq_len


def stream_shards(tmp_path, sizes):
    """Shards whose token ids are their stream positions (mod 65536), with BOS every 13 tokens."""
    stream = np.arange(sum(sizes)) % 60000 + 2
    stream[::13] = tg.BOS_ID
    files, pos = [], 0
    for i, n in enumerate(sizes):
        files.append(str(write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", stream[pos:pos + n])))
        pos += n
    return files, stream


def test_loader_batches_are_shifted_stream_pieces(tmp_path):
    files, stream = stream_shards(tmp_path, [100])
    loader = tg.DocumentPackingLoader(files, 31, 8, 0, 1, CPU)
    for call in range(3):
        x, y, cu, max_len = loader.next_batch()
        piece = stream[call * 32:(call + 1) * 32]
        assert x.shape == y.shape == (1, 31) and x.dtype == y.dtype == torch.int64
        assert x[0].tolist() == piece[:-1].tolist() and y[0].tolist() == piece[1:].tolist()
        assert cu.dtype == torch.int32 and cu.tolist() == tg.packed_cu_seqlens(piece[:-1], 8).tolist()
        assert max_len == int(np.diff(cu.numpy()).max()) <= 8


def test_loader_same_pieces_for_any_world_size_and_wraps_across_shards(tmp_path):
    """world=2: rank r's call c reads piece 2c+r; world=1 reads the pieces in order. The stream
    runs across shards (of uneven sizes) and wraps around at the end."""
    files, stream = stream_shards(tmp_path, [37, 50, 23])
    local, seq = 7, 4
    total = len(stream)
    one = tg.DocumentPackingLoader(files, local, seq, 0, 1, CPU)
    two = [tg.DocumentPackingLoader(files, local, seq, r, 2, CPU) for r in range(2)]
    seen = []
    for call in range(20):  # 40 pieces of 8 tokens = 320 tokens: the stream wraps twice
        for r in range(2):
            x1, y1, cu1, m1 = one.next_batch()
            x2, y2, cu2, m2 = two[r].next_batch()
            piece = np.take(stream, np.arange((2 * call + r) * 8, (2 * call + r + 1) * 8), mode="wrap")
            assert x1[0].tolist() == x2[0].tolist() == piece[:-1].tolist()
            assert y1[0].tolist() == y2[0].tolist() == piece[1:].tolist()
            assert cu1.tolist() == cu2.tolist() and m1 == m2
            seen.append(piece)
    assert np.concatenate(seen).tolist() == np.take(stream, np.arange(320), mode="wrap").tolist()
    assert 320 > 2 * total


# ---------------------------------------------------------------------------------------
# Byte accounting
# ---------------------------------------------------------------------------------------

TEXT = """The café on Rue de l'Église — naïve as it sounds — served 1,234 croissants in 2023.
Prices rose 12.5% (from €3.20 to €3.60); "Ouch!" said Zoë, who'd paid £4.10 twice.

A second paragraph, with tabs\tand  double spaces, a URL like https://example.com/a?b=c&d=1,
Greek (αβγ), Cyrillic (Привет), CJK (東京タワー) and an emoji 🙂. Numbers: 3.14159, -42, 10^6."""
NORMALISED = ("ﬁnal ½ price… ＡＢＣ１２３ ①", "final 1⁄2 price... ABC123 1")  # NFKC at work


def sp_model(path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path))


def stream_bytes(ids, luts):
    """Bytes credited to the targets of [BOS] + ids, as eval accounts them."""
    b = tg.stream_target_bytes(np.array([tg.BOS_ID] + list(ids), dtype=np.uint16), luts)
    assert b.dtype == np.int64 and len(b) == len(ids) + 1 and b[0] == 0
    return int(b.sum())


def check_luts(luts, n):
    base, space, boundary = luts
    assert all(isinstance(a, np.ndarray) for a in luts)
    assert (base.dtype, space.dtype, boundary.dtype) == (np.int64, np.bool_, np.bool_)
    assert base.shape == space.shape == boundary.shape == (n,)


@pytest.fixture(scope="module")
def sp8192():
    if not SP8192.is_file():
        pytest.fail(f"{SP8192} is missing")
    sp = sp_model(SP8192)
    return sp, tg.build_sentencepiece_luts(sp, 8192)


def test_sp8192_bytes_of_a_real_text_equal_its_normalised_utf8_length(sp8192):
    sp, luts = sp8192
    ids = sp.encode(TEXT)
    assert any(sp.is_byte(i) for i in ids)  # byte fallback is exercised (emoji, CJK)
    decoded = sp.decode(ids)
    assert stream_bytes(ids, luts) == len(decoded.encode("utf-8"))
    # The accounting counts the text as the tokenizer normalised it (nmt_nfkc): NFKC, runs of
    # whitespace (newlines, tabs) folded to one space, no leading/trailing space. For TEXT the
    # blank line ("\n\n") and the double space each lose one byte (the tab and single newlines
    # become spaces): 2 bytes fewer than the raw UTF-8.
    assert decoded == " ".join(unicodedata.normalize("NFKC", TEXT).split())
    assert len(TEXT.encode("utf-8")) - len(decoded.encode("utf-8")) == 2
    raw, norm = NORMALISED
    ids = sp.encode(raw)
    assert sp.decode(ids) == norm and stream_bytes(ids, luts) == len(norm.encode("utf-8")) != len(raw.encode())


def test_sp8192_stream_of_documents_counts_each_document_once(sp8192):
    """A val-like stream [BOS] doc [BOS] doc ...: the BOS targets count 0 bytes and the first
    token after a BOS gets no leading-space byte, so the total is the sum of the documents."""
    sp, luts = sp8192
    docs = [p for p in TEXT.split("\n") if p.strip()] + ["x", " leading space", "🙂🙂", "1 2 3"]
    stream = encode_docs(SP8192, docs)
    b = tg.stream_target_bytes(stream, luts)
    assert b.dtype == np.int64 and b.shape == stream.shape and b[0] == 0
    assert (b[stream == tg.BOS_ID] == 0).all()
    assert int(b.sum()) == sum(len(sp.decode(sp.encode(d)).encode("utf-8")) for d in docs)
    # document by document: the bytes of the targets up to the next BOS are that document's
    starts = np.append(np.flatnonzero(stream == tg.BOS_ID), len(stream))
    for d, s, e in zip(docs, starts[:-1], starts[1:]):
        assert int(b[s + 1:e].sum()) == len(sp.decode(sp.encode(d)).encode("utf-8")), d


def test_sp8192_luts_piece_by_piece(sp8192):
    sp, (base, space, boundary) = sp8192
    check_luts((base, space, boundary), 8192)
    for t in (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()):
        assert boundary[t] and base[t] == 0 and not space[t]
    the = sp.piece_to_id("\u2581the")
    assert (base[the], space[the], boundary[the]) == (3, True, False)
    byte = sp.piece_to_id("<0xC3>")
    assert sp.is_byte(byte) and (base[byte], space[byte], boundary[byte]) == (1, False, False)
    n_byte = sum(sp.is_byte(i) for i in range(8192))
    assert n_byte == 256 and int(base[[i for i in range(8192) if sp.is_byte(i)]].sum()) == 256
    for t in range(8192):
        if not (sp.is_control(t) or sp.is_unknown(t) or sp.is_unused(t) or sp.is_byte(t)):
            piece = sp.id_to_piece(t)
            assert int(base[t]) + int(space[t]) == len(piece.replace("\u2581", " ").encode("utf-8")), piece


def test_stream_target_bytes_semantics():
    base, space, boundary = TOY_LUTS
    # the (prev, target) pairs (1,1) (1,2) (2,2) (2,0) (0,4) (4,3) (3,4): a space byte only when
    # the previous token is not a boundary (BOS/pad/...); entry 0 is never a target
    for dtype in (np.uint16, np.int64):
        stream = np.array([1, 1, 2, 2, 0, 4, 3, 4], dtype=dtype)
        b = tg.stream_target_bytes(stream, TOY_LUTS)
        assert b.dtype == np.int64 and b.tolist() == [0, 0, 3, 4, 0, 1, 2, 2]
        assert b[1:].tolist() == [int(base[y]) + int(space[y] and not boundary[x]) for x, y in zip(stream[:-1], stream[1:])]
    # each pair on its own: [prev, target] -> [0, bytes]
    for (x, y), want in zip([(1, 2), (2, 2), (3, 4), (0, 4), (4, 3), (1, 1)], [3, 4, 2, 1, 2, 0]):
        assert tg.stream_target_bytes(np.array([x, y], dtype=np.uint16), TOY_LUTS).tolist() == [0, want]
    assert tg.stream_target_bytes(np.array([2], dtype=np.uint16), TOY_LUTS).tolist() == [0]
    assert tg.stream_target_bytes(np.array([], dtype=np.uint16), TOY_LUTS).tolist() == []


def test_tiny_tokenizer_bytes_and_load_tokenizer(tmp_path_factory):
    path = tiny_tokenizer(tmp_path_factory.mktemp("sp"))
    sp = sp_model(path)
    vocab = sp.vocab_size()
    h = tg.Hyperparameters(tokenizer_path=str(path), vocab_size=vocab)
    luts = tg.build_sentencepiece_luts(tg.load_tokenizer(h), vocab)
    check_luts(luts, vocab)
    for a, b in zip(luts, tg.build_sentencepiece_luts(sp, vocab)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    # a VOCAB_SIZE above the tokenizer's (padded embedding) gets boundary entries with 0 bytes
    padded = tg.build_sentencepiece_luts(sp, vocab + 8)
    check_luts(padded, vocab + 8)
    for a, b in zip(padded, luts):
        assert np.array_equal(a[:vocab], b)
    assert (padded[0][vocab:] == 0).all() and not padded[1][vocab:].any() and padded[2][vocab:].all()
    for text in english_docs(5, seed=9) + [TEXT]:
        ids = sp.encode(text)
        assert stream_bytes(ids, luts) == len(sp.decode(ids).encode("utf-8"))
    with pytest.raises(tg.ConfigError, match=rf"^VOCAB_SIZE={vocab + 1}: tokenizer .* has {vocab} pieces"):
        tg.load_tokenizer(tg.Hyperparameters(tokenizer_path=str(path), vocab_size=vocab + 1))
    with pytest.raises(FileNotFoundError, match="TOKENIZER_PATH"):
        tg.load_tokenizer(tg.Hyperparameters(tokenizer_path=str(tmp_path_factory.mktemp("x") / "no.model")))


def test_loader_reads_each_next_shard_in_a_thread_half_way_through_this_one(tmp_path, monkeypatch):
    """Only the first shard (and a seek's) is read in the caller's thread. Every later one is read by
    the loader's thread, started once half of the shard before it is consumed (not before: GPTQ's
    calibration batches read no second shard), so crossing a boundary does not wait for a read."""
    import threading

    files, stream = stream_shards(tmp_path, [37, 50, 23])
    reads, load = [], tg.DocumentPackingLoader._load

    def traced(self, i):
        reads.append((i, threading.current_thread() is threading.main_thread()))
        return load(self, i)

    monkeypatch.setattr(tg.DocumentPackingLoader, "_load", traced)
    loader = tg.DocumentPackingLoader(files, 7, 4, 0, 1, CPU)
    batches = [loader.next_batch()[0][0].tolist() for _ in range(3)]  # 24 of shard 0's 37 tokens
    assert reads == [(0, True)] and loader.next is None
    batches.append(loader.next_batch()[0][0].tolist())  # taken past half way: shard 1 is being read
    loader.next[1].result()
    assert reads == [(0, True), (1, False)] and loader.idx == 0
    batches += [loader.next_batch()[0][0].tolist() for _ in range(26)]  # 240 tokens: wraps twice
    assert batches == [np.take(stream, np.arange(8 * c, 8 * c + 7), mode="wrap").tolist() for c in range(30)]
    if loader.next:
        loader.next[1].result()
    done = list(reads)
    assert [i for i, _ in done] == [k % 3 for k in range(len(done))] and len(done) >= 7
    assert [main for _, main in done[1:]] == [False] * (len(done) - 1)


@pytest.mark.parametrize("world", [1, 2])
def test_loader_seek_continues_the_stream_from_any_position(tmp_path, world):
    """A resume's seek(t) then reads exactly what the stream holds after its first t tokens: at
    shard boundaries, inside shards shorter than a batch, past an empty shard, beyond a whole pass."""
    files, stream = stream_shards(tmp_path, [13, 0, 5, 21, 3])
    local, total = 6, len(stream)
    for taken in range(0, 2 * total + 3):
        loader = tg.DocumentPackingLoader(files, local, 4, world - 1, world, CPU)
        loader.seek(taken)
        for call in range(3):
            start = taken + (call * world + world - 1) * (local + 1)
            piece = np.take(stream, np.arange(start, start + local + 1), mode="wrap")
            assert loader.next_batch()[0][0].tolist() == piece[:-1].tolist(), (taken, call)
        assert loader.taken == taken + 3 * world * (local + 1)


def test_loader_rejects_a_train_token_outside_the_vocabulary(tmp_path):
    """A bad id in a later train shard is a ConfigError naming it when the loader reaches it."""
    write_shard(tmp_path / "fineweb_train_000000.bin", [1, 2, 3, 4] * 8)
    write_shard(tmp_path / "fineweb_train_000001.bin", [1, 2, 9, 4] * 8)
    files = tg.shard_files(str(tmp_path), "train")
    loader = tg.DocumentPackingLoader(files, 15, 8, 0, 1, CPU, vocab_size=9)
    loader.next_batch()
    with pytest.raises(tg.ConfigError, match="^VOCAB_SIZE=9: .*fineweb_train_000001.bin holds token id 9$"):
        for _ in range(4):
            loader.next_batch()
