import random
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
import caseops  # noqa: E402
from caseops import ALLCAPS, CAPNEXT, ESC, TITLE  # noqa: E402
from shards import DataError  # noqa: E402
from tokenizer import train_tokenizer  # noqa: E402

HOSTILE = [
    "",
    "plain lowercase words",
    "The NASA Launch",
    "McDonald's iPhone eBay ABc aBC XMLHttpRequest",
    "I A a Z zZ Zz ZZ",
    "NASAs USA-2024 COVID19 x86_64 A1B2C3",
    "Ünïcödé Straße ÀBC café ΣΊΣΥΦΟΣ 日本語 🙂 ﬁ ½ Ａ",
    "".join(caseops.OPERATORS),
    f"{ESC}{ESC}{TITLE}Ab{ALLCAPS}{CAPNEXT}",
    f"lit{TITLE}eral {ESC}x {CAPNEXT}A",
    "  leading, trailing  \n\n tabs\tand\r\nnewlines  ",
    "\u2581 the sentencepiece space marker",
    "digits 1234567890 3.14159",
    "\ue000\ue005 neighbours of the operators",
]


def test_spec_example_and_rules():
    assert caseops.transform("The NASA Launch") == f"{TITLE}the {ALLCAPS}nasa {TITLE}launch"
    assert caseops.transform("McDonald") == f"{TITLE}mc{CAPNEXT}donald"
    assert caseops.transform("iPhone") == f"i{CAPNEXT}phone"
    assert caseops.transform("I a") == f"{TITLE}i a"
    assert caseops.transform("ÀBC") == f"À{ALLCAPS}bc"  # runs are ASCII letters only
    assert caseops.transform(TITLE) == ESC + TITLE


@pytest.mark.parametrize("text", HOSTILE)
def test_inverse_undoes_transform(text):
    encoded = caseops.transform(text)
    assert caseops.inverse(encoded) == text
    assert not any("A" <= c <= "Z" for c in encoded)


def test_inverse_undoes_transform_on_random_strings():
    alphabet = "aAbBzZ  \n1é日" + "".join(caseops.OPERATORS)
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert caseops.inverse(caseops.transform(text)) == text, repr(text)


@pytest.fixture(scope="module")
def caseops_sp(tmp_path_factory):
    rng = random.Random(1)
    words = "The quick Brown fox JUMPS over McDonald's lazy dog in NASA iPhone café 2024".split()
    docs = [" ".join(rng.choice(words) for _ in range(30)) for _ in range(300)]
    path = caseops.train_tokenizer(docs, 400, tmp_path_factory.mktemp("tok") / "caseops.model")
    return spm.SentencePieceProcessor(model_file=str(path)), path


def test_operators_are_user_defined_symbols_at_ids_4_to_7(caseops_sp):
    sp, path = caseops_sp
    assert [sp.id_to_piece(i) for i in range(4, 8)] == list(caseops.OPERATORS)
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    caseops.check_tokenizer(sp, path)
    assert sp.encode(caseops.transform("The"))[0] == 4  # TITLE stays one token


def test_plain_tokenizer_is_not_a_caseops_tokenizer(tmp_path):
    path = train_tokenizer(["some plain text here"] * 50, 300, tmp_path / "plain.model")
    with pytest.raises(DataError, match="plain.model: not a CaseOps tokenizer"):
        caseops.check_tokenizer(spm.SentencePieceProcessor(model_file=str(path)), path)


@pytest.mark.parametrize("text", [t for t in HOSTILE if t.strip()])
def test_byte_counts_sum_to_raw_utf8_length(caseops_sp, text):
    sp, _ = caseops_sp
    ids, counts = caseops.encode_with_byte_counts(sp, text)
    assert len(ids) == len(counts) and counts.dtype == np.uint16
    assert int(counts.sum()) == len(text.encode("utf-8"))


def test_operators_count_zero_and_letters_one(caseops_sp):
    sp, _ = caseops_sp
    ids, counts = caseops.encode_with_byte_counts(sp, "The NASA")
    per_piece = {sp.id_to_piece(i): int(c) for i, c in zip(ids, counts, strict=True)}
    assert per_piece[TITLE] == 0 and per_piece[ALLCAPS] == 0
    escaped_ids, escaped_counts = caseops.encode_with_byte_counts(sp, TITLE)
    assert [sp.id_to_piece(i) for i in escaped_ids] == [ESC, TITLE]
    assert escaped_counts.tolist() == [0, 3]  # the literal U+E001 keeps its 3 bytes


@pytest.mark.parametrize(
    "text", ["The NASA Launch", "McDonald's iPhone, 2024!", f"{ESC}{ESC}{TITLE}Ab", "Straße 日本 🙂"],
    ids=["words", "mixed", "escapes", "byte-fallback"],
)
def test_sidecar_from_ids_matches_exact_counts(caseops_sp, text):
    sp, _ = caseops_sp
    ids, counts = caseops.encode_with_byte_counts(sp, text)
    sidecar = caseops.byte_counts_for_ids([1, *ids], sp)
    assert sidecar.tolist() == [0, *counts.tolist()]  # BOS counts 0
    assert int(sidecar.sum()) == len(text.encode("utf-8"))
    assert caseops.inverse(sp.decode(ids)) == text
