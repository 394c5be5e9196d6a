"""CaseOps byte accounting in train_gpt.py: with CASEOPS_ENABLED=1 the val bytes come from the
fineweb_val_bytes_NNNNNN.bin sidecar of each val shard (one uint16 per token: the original UTF-8
bytes that token stands for, BOS 0) instead of the SentencePiece LUT formula, which would count
the transformed text (3 bytes per case operator). A missing or misaligned sidecar is an error
naming the file. The last part builds real CaseOps shards with data/build_shards.py."""
import io
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt as tg
from helpers_train import REPO, english_docs, make_model, run_script, script_env, tiny_h, write_shard

sys.path.insert(0, str(REPO / "data"))
import build_shards  # noqa: E402
import caseops  # noqa: E402

LN2 = math.log(2)


# The byte accounting does not depend on the model: a 2-layer one without loops keeps the evals cheap.
SMALL = dict(num_layers=2, num_loops=0, global_attn_layers=(1,), parallel_start_layer=2, xsa_last_n=2,
             local_window_split=1)


def caseops_h(path, enabled=True, **overrides):
    return tiny_h(data_path=str(path), caseops_enabled=enabled, **{**SMALL, **overrides})


def write_val(path: Path, parts, sidecars):
    """Val shards fineweb_val_00000i.bin and, where given (not None), their byte sidecars."""
    path.mkdir(parents=True, exist_ok=True)
    shards, sides = [], []
    for i, (tokens, counts) in enumerate(zip(parts, sidecars)):
        shards.append(write_shard(path / f"fineweb_val_{i:06d}.bin", tokens))
        side = path / f"fineweb_val_bytes_{i:06d}.bin"
        if counts is not None:
            write_shard(side, counts)
        sides.append(side)
    return shards, sides


def val_stream(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([np.r_[tg.BOS_ID, rng.integers(4, vocab, n - 1)] for n in lengths]).astype(np.uint16)


def random_luts(vocab, seed=0):
    rng = np.random.default_rng(seed)
    luts = (rng.integers(0, 4, vocab).astype(np.int64), rng.random(vocab) < 0.5, np.zeros(vocab, dtype=bool))
    luts[2][:4] = True
    return luts


# ---------------------------------------------------------------------------------------
# The flag and load_val_set
# ---------------------------------------------------------------------------------------


def test_caseops_enabled_is_read_from_the_environment():
    assert tg.Hyperparameters().caseops_enabled is False
    assert tg.Hyperparameters.from_env({"CASEOPS_ENABLED": "1"}).caseops_enabled is True
    assert tg.Hyperparameters.from_env({"CASEOPS_ENABLED": "0"}).caseops_enabled is False
    with pytest.raises(tg.ConfigError, match=r"^CASEOPS_ENABLED='true': expected 0 or 1$"):
        tg.Hyperparameters.from_env({"CASEOPS_ENABLED": "true"})


def test_sidecars_replace_the_lut_bytes_exactly(tmp_path):
    """Two val shards (a document runs across the boundary): target_bytes is the concatenation
    of the sidecars, as int64 (65535 survives), position by position; the tokens are unchanged."""
    parts = [np.array([1, 5, 6, 7, 1, 8], np.uint16), np.array([9, 10, 1, 11], np.uint16)]
    sidecars = [np.array([0, 4, 65535, 2, 0, 7], np.uint16), np.array([3, 1, 0, 5], np.uint16)]
    write_val(tmp_path, parts, sidecars)
    luts = random_luts(128)
    side = tg.load_val_set(caseops_h(tmp_path), luts)
    lut = tg.ValSet(side.tokens, tg.stream_target_bytes(side.tokens, luts))  # what LUT accounting would give
    assert side.tokens.dtype == np.uint16 and side.tokens.tolist() == lut.tokens.tolist() == np.concatenate(parts).tolist()
    assert side.target_bytes.dtype == np.int64
    assert side.target_bytes.tolist() == [0, 4, 65535, 2, 0, 7, 3, 1, 0, 5]
    assert lut.target_bytes.tolist() != side.target_bytes.tolist()
    # the vocab check still applies with CaseOps
    with pytest.raises(tg.ConfigError, match=r"^VOCAB_SIZE=11: val shards hold token id 11$"):
        tg.load_val_set(caseops_h(tmp_path, vocab_size=11), luts)


def test_missing_sidecar_is_an_error_naming_it(tmp_path):
    parts = [np.array([1, 5, 6], np.uint16), np.array([7, 1, 8], np.uint16)]
    shards, sides = write_val(tmp_path, parts, [np.array([0, 1, 1], np.uint16), None])
    luts = random_luts(128)
    with pytest.raises(FileNotFoundError, match="^" + re.escape(
            f"CASEOPS_ENABLED=1 but the byte sidecar {sides[1]} of {shards[1]} is missing") + "$"):
        tg.load_val_set(caseops_h(tmp_path), luts)
    # with CaseOps off, sidecars present mean CaseOps data: refused rather than miscounted
    with pytest.raises(tg.ConfigError, match="^CASEOPS_ENABLED=0: "):
        tg.load_val_set(caseops_h(tmp_path, enabled=False), luts)


@pytest.mark.parametrize("n_counts", [2, 4, 0])
def test_misaligned_sidecar_is_an_error_naming_it(tmp_path, n_counts):
    parts = [np.array([1, 5, 6, 9], np.uint16), np.array([7, 1, 8], np.uint16)]
    shards, sides = write_val(tmp_path, parts, [np.array([0, 1, 1, 1], np.uint16), np.ones(n_counts, np.uint16)])
    with pytest.raises(ValueError, match="^" + re.escape(f"{sides[1]}: {n_counts} byte counts for 3 tokens in {shards[1]}") + "$"):
        tg.load_val_set(caseops_h(tmp_path), random_luts(128))


def test_corrupt_sidecar_is_an_error_naming_it(tmp_path):
    _, sides = write_val(tmp_path, [np.array([1, 5, 6], np.uint16)], [np.array([0, 1, 1], np.uint16)])
    sides[0].write_bytes(sides[0].read_bytes()[:-2])
    with pytest.raises(ValueError, match="^" + re.escape(f"{sides[0]}: header says 3 tokens")):
        tg.load_val_set(caseops_h(tmp_path), random_luts(128))


def test_sidecar_found_in_a_directory_whose_name_contains_fineweb_val(tmp_path):
    """The sidecar name is derived from the file name only (a folder fineweb_val_* once got renamed too)."""
    data = tmp_path / "fineweb_val_shards"
    write_val(data, [np.array([1, 5, 6], np.uint16)], [np.array([0, 2, 3], np.uint16)])
    assert tg.load_val_set(caseops_h(data), random_luts(128)).target_bytes.tolist() == [0, 2, 3]


# ---------------------------------------------------------------------------------------
# Scoring: bytes are taken at exactly the scored target positions
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len, stride, row_tokens", [(64, 64, 64), (64, 64, 256), (64, 16, 128), (32, 5, 96)])
def test_build_row_bytes_are_those_of_the_scored_targets(seq_len, stride, row_tokens):
    """With target_bytes[j] = j, every scored row position carries the stream index of its own
    target; unscored positions (context, padding) carry 0, and every target 1..N-1 appears once."""
    tokens = val_stream(128, [30, 150, 5, 64, 1, 40, 97, 2], seed=1)
    val = tg.ValSet(tokens, np.arange(len(tokens), dtype=np.int64))
    windows = tg.scoring_windows(tg.document_spans(tokens), seq_len, stride)
    seen = []
    for row in tg.pack_rows(windows, row_tokens):
        x, y, b, cu = tg.build_row(val, row, row_tokens)
        scored = y >= 0
        assert (b[~scored] == 0).all()
        assert (tokens[b[scored]] == y[scored]).all() and (tokens[b[scored] - 1] == x[scored]).all()
        seen += b[scored].tolist()
    assert sorted(seen) == list(range(1, len(tokens)))


@pytest.fixture(scope="module")
def hand_made(tmp_path_factory):
    """A tiny val set in two shards (cut inside a document) with a hand-made sidecar unrelated to
    the LUT bytes; position 0 holds 999, which is never a target."""
    path = tmp_path_factory.mktemp("hand_made")
    tokens = val_stream(128, [30, 150, 5, 64, 1, 40, 9], seed=2)
    sidecar = np.random.default_rng(3).integers(0, 40, len(tokens)).astype(np.uint16)
    sidecar[0] = 999
    cut = 100
    write_val(path, [tokens[:cut], tokens[cut:]], [sidecar[:cut], sidecar[cut:]])
    return path, tokens, sidecar


def test_eval_val_bpb_uses_the_sidecar_bytes(hand_made, tmp_path):
    """Same model and windows: identical loss and target count; bpb = loss_sum / (ln2 *
    sum(sidecar[1:])), i.e. the LUT run's bpb scaled by lut_bytes / sidecar_bytes; for disjoint
    and sliding windows and any packing."""
    tg.use_attention_backend("sdpa", torch.device("cpu"))
    path, tokens, sidecar = hand_made
    luts = random_luts(128, seed=4)
    h_lut = caseops_h(path, enabled=False, eval_seq_len=64, val_batch_tokens=128, log_dir=str(tmp_path), run_id="co")
    h_side = caseops_h(path, eval_seq_len=64, val_batch_tokens=128)
    rt = tg.Runtime(h_lut)
    model = make_model(h_lut, seed=5)
    val_side = tg.load_val_set(h_side, luts)
    val_lut = tg.ValSet(val_side.tokens, tg.stream_target_bytes(val_side.tokens, luts))
    side_bytes = int(sidecar[1:].astype(np.int64).sum())
    lut_bytes = int(tg.stream_target_bytes(tokens, luts)[1:].sum())
    assert side_bytes != lut_bytes
    for stride, vbt in ((None, 128), (16, 128), (None, 512), ("attention", 128)):
        h_lut.val_batch_tokens = h_side.val_batch_tokens = vbt
        h_lut.sliding_mode = h_side.sliding_mode = "attention" if stride == "attention" else "windows"
        h_lut.eval_stride = h_side.eval_stride = stride if isinstance(stride, int) else 64
        loss_l, bpb_l, n_l = tg.eval_val(model, h_lut, rt, val_lut, sliding=stride is not None)
        loss_s, bpb_s, n_s = tg.eval_val(model, h_side, rt, val_side, sliding=stride is not None)
        assert n_s == n_l == len(tokens) - 1
        assert loss_s == loss_l
        assert bpb_l == pytest.approx(loss_l * n_l / (LN2 * lut_bytes), rel=1e-12)
        assert bpb_s == pytest.approx(loss_s * n_s / (LN2 * side_bytes), rel=1e-12)
        assert bpb_s == pytest.approx(bpb_l * lut_bytes / side_bytes, rel=1e-12)


def test_phased_ttt_bytes_are_the_sidecar_bytes(hand_made, tmp_path):
    """TTT scores per-document chunks (and the long document by sliding windows): its byte total
    is still sum(sidecar[1:]) and every target is scored once."""
    tg.use_attention_backend("sdpa", torch.device("cpu"))
    path, tokens, sidecar = hand_made
    h = caseops_h(path, eval_seq_len=64, val_batch_tokens=128, eval_stride=16, log_dir=str(tmp_path), run_id="ttt",
                  ttt_chunk_size=16, ttt_eval_seq_len=32, ttt_long_chunk_size=0, ttt_tail_chunk_size=0, ttt_max_doc_tokens=100, ttt_lora_rank=4, ttt_batch_size=2,
                  phased_ttt_prefix_docs=2, phased_ttt_num_phases=1, global_ttt_chunk_tokens=32, global_ttt_seq_len=32)
    rt = tg.Runtime(h)
    model = make_model(h, seed=6)
    loss, bpb, n = tg.phased_ttt(model, h, rt, tg.load_val_set(h, random_luts(128)), deadline=math.inf)
    assert n == len(tokens) - 1 and math.isfinite(loss)
    assert loss * n / (LN2 * bpb) == pytest.approx(int(sidecar[1:].astype(np.int64).sum()), rel=1e-12)


# ---------------------------------------------------------------------------------------
# Real CaseOps shards from data/build_shards.py
# ---------------------------------------------------------------------------------------

HOSTILE_DOCS = [
    "The NASA Launch: McDonald's iPhone, XMLHttpRequest and eBay.",
    "  Leading  spaces,\n\nblank lines\tand TABS; ﬁ ½ ＡＢＣ — Café CAFÉ naïve 🙂 日本語 trailing  ",
    "Literal operators \ue001\ue002\ue003\ue004 and ESC \ue004\ue004 Ab",
    "I A a Z zZ Zz ZZ x86_64 COVID19 A1B2C3",
]


@pytest.fixture(scope="module")
def caseops_data(tmp_path_factory):
    """A CaseOps tokenizer (384 pieces) and shards built by build_shards --caseops: 4 hostile and
    20 English-like val documents in several val shards (documents run across them)."""
    root = tmp_path_factory.mktemp("caseops")
    train_docs = english_docs(400, seed=11)
    model = caseops.train_tokenizer(train_docs, 384, root / "caseops_384.model")
    val_docs = HOSTILE_DOCS + english_docs(20, seed=12)
    result = build_shards.build_shards(val_docs + train_docs[:60], model, root / "data", val_docs=len(val_docs),
                                       shard_tokens=400, use_caseops=True, log=io.StringIO())
    assert len(result.val_paths) == len(result.sidecar_paths) >= 3
    return root / "data", model, val_docs


def test_real_sidecar_sums_to_the_original_utf8_bytes_of_each_document(caseops_data):
    data, model, val_docs = caseops_data
    sp = spm.SentencePieceProcessor(model_file=str(model))
    h = tiny_h(data_path=str(data), vocab_size=sp.vocab_size(), caseops_enabled=True)
    luts = tg.build_sentencepiece_luts(sp, sp.vocab_size())
    val = tg.load_val_set(h, luts)
    lut_bytes = tg.stream_target_bytes(val.tokens, luts)
    starts = np.flatnonzero(val.tokens == tg.BOS_ID)
    assert starts[0] == 0 and len(starts) == len(val_docs)
    assert (val.target_bytes[starts] == 0).all()  # BOS counts 0
    assert any(len(tg.load_data_shard(f)) and tg.load_data_shard(f)[0] != tg.BOS_ID
               for f in tg.shard_files(str(data), "val"))  # a document runs across a shard boundary
    ops = 0
    for doc, s, e in zip(val_docs, starts, np.append(starts[1:], len(val.tokens))):
        assert int(val.target_bytes[s:e].sum()) == len(doc.encode("utf-8")), doc
        # the LUT formula counts the transformed, normalised text, operators included
        decoded = sp.decode(val.tokens[s + 1:e].tolist())
        assert int(lut_bytes[s + 1:e].sum()) == len(decoded.encode("utf-8")), doc
        ops += sum(decoded.count(op) for op in caseops.OPERATORS)
    assert ops > 100
    assert int(val.target_bytes.sum()) == sum(len(d.encode("utf-8")) for d in val_docs) != int(lut_bytes.sum())


def test_eval_val_on_real_caseops_shards_counts_the_original_bytes(caseops_data, tmp_path):
    tg.use_attention_backend("sdpa", torch.device("cpu"))
    data, model, val_docs = caseops_data
    vocab = spm.SentencePieceProcessor(model_file=str(model)).vocab_size()
    h = caseops_h(data, tokenizer_path=str(model), vocab_size=vocab, eval_seq_len=64, val_batch_tokens=512,
                  log_dir=str(tmp_path), run_id="real")
    val = tg.load_val_set(h, tg.build_sentencepiece_luts(tg.load_tokenizer(h), h.vocab_size))
    loss, bpb, n = tg.eval_val(make_model(h, seed=7), h, tg.Runtime(h), val)
    assert n == len(val.tokens) - 1
    total = sum(len(d.encode("utf-8")) for d in val_docs)
    assert bpb == pytest.approx(loss * n / (LN2 * total), rel=1e-12)


def test_script_with_caseops_and_a_missing_sidecar_fails_naming_it(caseops_data, tmp_path):
    data, model, _ = caseops_data
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    shard, side = broken / "fineweb_val_000001.bin", broken / "fineweb_val_bytes_000001.bin"
    side.unlink()
    vocab = spm.SentencePieceProcessor(model_file=str(model)).vocab_size()
    r = run_script(script_env(tmp_path, broken, model, vocab, CASEOPS_ENABLED=1), tmp_path, timeout=120)
    assert r.returncode == 1, r.stdout[-2000:]
    assert r.stderr == f"error: CASEOPS_ENABLED=1 but the byte sidecar {side} of {shard} is missing\n", r.stderr[-3000:]
    assert "val_bytes:" not in r.stdout


def test_sidecars_with_caseops_disabled_is_an_error(tmp_path):
    """LUT bytes on CaseOps text count the case operators: the run must not silently use them."""
    write_val(tmp_path, [np.array([1, 5, 6], np.uint16)], [np.array([0, 2, 3], np.uint16)])
    h = caseops_h(tmp_path)
    h.caseops_enabled = False
    with pytest.raises(tg.ConfigError, match="^CASEOPS_ENABLED=0: .*fineweb_val_bytes_"):
        tg.load_val_set(h, random_luts(128))


def test_tokenizer_check_accepts_real_caseops_shards(caseops_data):
    """The decode/re-encode check (the shards were made by this tokenizer) holds for CaseOps
    shards too, hostile documents included."""
    data, model, _ = caseops_data
    sp = spm.SentencePieceProcessor(model_file=str(model))
    h = tiny_h(data_path=str(data), vocab_size=sp.vocab_size(), caseops_enabled=True, tokenizer_path=str(model))
    val = tg.load_val_set(h, tg.build_sentencepiece_luts(sp, sp.vocab_size()))
    tg.check_tokenizer_matches(sp, val.tokens, h)
