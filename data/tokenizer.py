"""SentencePiece tokenizers with the challenge's settings, and the checks a tokenizer
must pass before its ids can go into uint16 shards."""
import io
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from shards import BOS_ID, MAX_TOKEN_ID, DataError

# The settings of the challenge's fineweb_*_bpe.model files (SPEC 1.1). The trainer's
# thread count is left at its default because it is recorded in the model file:
# tying it to the machine would make the same corpus give different bytes.
CHALLENGE_SETTINGS = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    character_coverage=0.999,
    hard_vocab_limit=False,
    pad_id=0,
    bos_id=1,
    eos_id=2,
    unk_id=3,
)
# SentencePiece skips longer training sentences; documents are fed line by line.
MAX_SENTENCE_BYTES = 16384


def training_sentences(documents: Iterable[str]) -> Iterable[str]:
    for doc in documents:
        for line in doc.splitlines():
            if line.strip():
                yield line


def train_tokenizer(
    documents: Iterable[str], vocab_size: int, model_path: Path, user_defined_symbols: tuple[str, ...] = ()
) -> Path:
    """Train a BPE model on the documents and write it to model_path."""
    if not 0 < vocab_size <= MAX_TOKEN_ID + 1:
        raise DataError(f"{model_path}: vocab size {vocab_size} does not fit uint16 ids (1..{MAX_TOKEN_ID + 1})")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(training_sentences(documents)),
            model_writer=model,
            vocab_size=vocab_size,
            user_defined_symbols=list(user_defined_symbols),
            max_sentence_length=MAX_SENTENCE_BYTES,
            minloglevel=2,
            **CHALLENGE_SETTINGS,
        )
    except RuntimeError as e:
        raise DataError(f"{model_path}: tokenizer training failed ({e})") from None
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model_path.write_bytes(model.getvalue())
    return model_path


def load_tokenizer(model_path: Path) -> spm.SentencePieceProcessor:
    """Load a model whose ids fit the shard format: BOS at id 1, every id <= 65535."""
    try:
        sp = spm.SentencePieceProcessor(model_file=str(model_path))
    except (OSError, RuntimeError) as e:
        raise DataError(f"{model_path}: cannot load SentencePiece model ({e})") from None
    if sp.bos_id() < 0:
        raise DataError(f"{model_path}: tokenizer has no BOS piece; shards need BOS={BOS_ID} before every document")
    if sp.bos_id() != BOS_ID:
        raise DataError(f"{model_path}: BOS is id {sp.bos_id()}; shards need BOS={BOS_ID}")
    if sp.get_piece_size() > MAX_TOKEN_ID + 1:
        raise DataError(
            f"{model_path}: vocab of {sp.get_piece_size():,} pieces has ids above {MAX_TOKEN_ID:,}; "
            "shards hold uint16 ids"
        )
    return sp
