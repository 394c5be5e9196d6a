"""CaseOps (SPEC 6, PR #1729 "lossless_caps_caseops_v1"): a lossless case transform.

Capitals are moved out of the letters into four private-use operator characters, so
the tokenizer sees "the", "The" and "THE" as one lowercase word plus an operator:
  lowercase run        -> unchanged
  Titlecase run ("A")  -> TITLE + lowercased run
  ALL-CAPS run (>= 2)  -> ALLCAPS + lowercased run
  mixed case run       -> TITLE if the first letter is upper, then CAPNEXT before each
                          later capital ("McDonald" -> TITLE mc CAPNEXT donald)
  a literal operator   -> ESC + the character
Runs are maximal runs of ASCII letters; everything else passes through unchanged.

Bytes: scoring must stay in bytes of the original text, so each val token carries the
number of original UTF-8 bytes it stands for (the fineweb_val_bytes_* sidecar).
Operators and ESC count 0, an escaped character its own bytes, anything else the
UTF-8 length it had before the transform (letters keep theirs: 1 byte).
"""
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import sentencepiece as spm

import tokenizer
from shards import MAX_TOKEN_ID, DataError

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
FIRST_OPERATOR_ID = 4  # right after pad, bos, eos, unk
OPERATOR_BYTES = 3  # UTF-8 length of U+E001..U+E004

# Runs holding a capital, anchored at the run start so lowercase words cost one failed probe.
_CASED_RUN_OR_OPERATOR = re.compile("(?<![A-Za-z])[a-z]*[A-Z][A-Za-z]*|[\ue001-\ue004]")
_ENCODED_UNIT = re.compile("\ue004[\\s\\S]|\ue001[a-z]|\ue003[a-z]|\ue002[a-z]+")
_OPERATOR_UTF8 = re.compile(b"\xee\x80[\x81-\x84]")  # U+E001..U+E004 in UTF-8
_ESC_UTF8 = ESC.encode("utf-8")


def _encode_unit(match: re.Match) -> str:
    word = match.group()
    if word in OPERATORS:
        return ESC + word
    if len(word) >= 2 and word.isupper():
        return ALLCAPS + word.lower()
    head = TITLE + word[0].lower() if word[0].isupper() else word[0]
    return head + "".join(CAPNEXT + c.lower() if c.isupper() else c for c in word[1:])


def _decode_unit(match: re.Match) -> str:
    unit = match.group()
    return unit[1] if unit[0] == ESC else unit[1:].upper()


def transform(text: str) -> str:
    return _CASED_RUN_OR_OPERATOR.sub(_encode_unit, text)


def inverse(text: str) -> str:
    """Exact inverse of transform: inverse(transform(s)) == s for every string s."""
    return _ENCODED_UNIT.sub(_decode_unit, text)


def train_tokenizer(documents: Iterable[str], vocab_size: int, model_path: Path) -> Path:
    """Challenge-settings BPE trained on transformed text; the operators get ids 4..7."""
    return tokenizer.train_tokenizer(map(transform, documents), vocab_size, model_path, OPERATORS)


def check_tokenizer(sp: spm.SentencePieceProcessor, model_path: Path) -> None:
    pieces = tuple(sp.id_to_piece(FIRST_OPERATOR_ID + i) for i in range(len(OPERATORS)))
    if pieces != OPERATORS:
        raise DataError(f"{model_path}: not a CaseOps tokenizer (ids 4..7 must be the operators U+E001..U+E004)")


def _original_byte_counts(raw: bytes, ends: np.ndarray) -> np.ndarray:
    """Per-token original bytes, token k spanning raw[ends[k-1]:ends[k]] of transformed text.

    Each token starts with its span's UTF-8 length; every operator then gives its 3
    bytes back, except a character escaped by ESC, which is literal text. The escape
    state runs across tokens since ESC and the escaped character can be separate tokens."""
    counts = np.diff(ends, prepend=0)
    operators, escaped = [], False
    for match in _OPERATOR_UTF8.finditer(raw):  # only operator characters are ever escaped
        if escaped:
            escaped = False
        else:
            operators.append(match.start())
            escaped = match.group() == _ESC_UTF8
    np.subtract.at(counts, np.searchsorted(ends, operators, side="right"), OPERATOR_BYTES)
    if len(counts) and counts.max() > MAX_TOKEN_ID:  # e.g. one token for a huge run of folded whitespace
        raise DataError(f"a token stands for {counts.max():,} bytes; the uint16 sidecar holds at most {MAX_TOKEN_ID:,}")
    return counts.astype(np.uint16)


def byte_counts_for_ids(ids: Iterable[int], sp: spm.SentencePieceProcessor) -> np.ndarray:
    """Sidecar values for token ids (BOS and other control ids count 0).

    Works from the pieces alone, so it counts the text as the tokenizer normalised it:
    it matches the raw byte count when NFKC and whitespace folding left the text
    unchanged. encode_with_byte_counts is exact for any document."""

    def piece_bytes(i: int) -> bytes:
        if sp.is_control(i) or sp.is_unknown(i):
            return b""
        if sp.is_byte(i):  # "<0xAB>"
            return bytes([int(sp.id_to_piece(i)[3:5], 16)])
        return sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8")

    surfaces = [piece_bytes(int(i)) for i in ids]
    raw = b"".join(surfaces)
    ends = np.cumsum([len(s) for s in surfaces], dtype=np.int64)
    # A character split into byte-fallback pieces is credited to its last piece, as
    # SentencePiece's alignment (and so encode_with_byte_counts) does: move any token
    # end that falls inside a UTF-8 sequence back to the sequence's first byte.
    utf8 = np.frombuffer(raw + b"\x00", dtype=np.uint8)
    for _ in range(3):  # at most 3 continuation bytes per character
        ends -= (utf8[ends] & 0xC0) == 0x80
    return _original_byte_counts(raw, ends)


def encode_with_byte_counts(sp: spm.SentencePieceProcessor, text: str) -> tuple[list[int], np.ndarray]:
    """Token ids of transform(text) and the original bytes behind each token.

    Each token is credited the input span from the previous token's end to its own
    end (the last one to the end of the text), so whitespace the normaliser folded
    or stripped is still counted and the counts sum to len(text.encode())."""
    transformed = transform(text)
    pieces = sp.encode(transformed, out_type="proto").pieces  # needs the protobuf package
    if not pieces:
        return [], np.zeros(0, dtype=np.uint16)
    raw = transformed.encode("utf-8")
    ends = np.fromiter((p.end for p in pieces), dtype=np.int64, count=len(pieces))
    ends[-1] = len(raw)
    return [p.id for p in pieces], _original_byte_counts(raw, ends)
