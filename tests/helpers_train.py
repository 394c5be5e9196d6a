"""Shared helpers for the CPU tests of train_gpt.py (tests/test_train_*.py): tiny configs, a
deterministic English-like corpus, a tiny challenge-settings SentencePiece model, challenge-format
shards, and a runner for train_gpt.py as a script."""
import io
import os
import random
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

import train_gpt as tg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from train_log import parse_train_log  # noqa: E402  (the one log parser, issue 12)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_gpt.py"
SP8192 = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizers" / "fineweb_8192_bpe.model"  # ../shared

# A tiny model exercising every path: local (early/late windows) and global layers, a loop segment,
# U-Net skips, parallel two-lane blocks, XSA on every layer, gates, smear gate and Parcae.
TINY = dict(
    vocab_size=128, num_layers=6, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2,
    global_rope_dims=8, global_attn_layers=(2, 5), local_window_size_early=8, local_window_size_late=16,
    local_window_split=3, xsa_last_n=6, parallel_start_layer=4, num_loops=2, loop_start=1, loop_end=2,
    gate_width=8, train_seq_len=64, train_batch_tokens=256, micro_batches=2, eval_seq_len=64,
    val_batch_tokens=128, compile=False, attn_backend="sdpa", fused_mlp="0",  # the eval's MLP; scripts: auto
)


def tiny_h(**overrides) -> tg.Hyperparameters:
    h = tg.Hyperparameters(**{**TINY, **overrides})
    h.validate()
    return h


def make_model(h, seed=0, noise=0.05):
    """GPT(h) in fp32 with every parameter perturbed, so zero-initialised projections, gates, the
    smear gate, skips, lanes and the Parcae injection all contribute to the output."""
    torch.manual_seed(seed)
    model = tg.GPT(h)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g))
        if h.smear_gate:
            model.smear_lambda.fill_(0.7)
    return model.eval()


def single_doc_cu(T):
    return torch.tensor([0, T], dtype=torch.int32)


def write_shard(path, tokens, magic=tg.SHARD_MAGIC, version=tg.SHARD_VERSION, n=None, extra=b""):
    tokens = np.asarray(tokens, dtype="<u2")
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(tokens) if n is None else n
    Path(path).write_bytes(header.tobytes() + tokens.tobytes() + extra)
    return Path(path)


# ---------------------------------------------------------------------------------------
# A deterministic English-like corpus and a tiny SentencePiece model trained on it
# ---------------------------------------------------------------------------------------

_ADJ = ("small quiet old bright green heavy cold early open careful silver narrow gentle rapid "
        "wooden distant simple strange warm red").split()
_NOUN = ("river city garden teacher window market engine village letter forest farmer bridge "
         "station student mountain library kitchen ocean doctor morning").split()
_VERB = ("finds carries watches builds follows opens crosses paints reads remembers visits "
         "repairs describes leaves").split()
_PREP = "near behind under across beside after before inside".split()
_NAMES = "Anna Peter Maria John Lucas Emma Noah Sofia".split()


def _sentence(r: random.Random) -> str:
    kind = r.randrange(5)
    if kind == 0:
        s = f"the {r.choice(_ADJ)} {r.choice(_NOUN)} {r.choice(_VERB)} the {r.choice(_NOUN)} {r.choice(_PREP)} the {r.choice(_NOUN)}"
    elif kind == 1:
        s = f"{r.choice(_NAMES)} {r.choice(_VERB)} {r.randint(2, 99)} {r.choice(_NOUN)}s in {r.randint(1900, 2024)}"
    elif kind == 2:
        s = f"when the {r.choice(_NOUN)} was {r.choice(_ADJ)}, {r.choice(_NAMES)} {r.choice(_VERB)} a {r.choice(_ADJ)} {r.choice(_NOUN)}"
    elif kind == 3:
        s = f"a {r.choice(_NOUN)} {r.choice(_PREP)} the {r.choice(_NOUN)} is {r.choice(_ADJ)} and {r.choice(_ADJ)}"
    else:
        s = f"{r.choice(_NAMES)} said: \"the {r.choice(_NOUN)} costs {r.randint(1, 500)}.{r.randint(0, 99):02d} euros\""
    s = s[0].upper() + s[1:]
    return s + r.choice([".", ".", ".", "!", "?"])


def english_docs(n: int, seed: int) -> list[str]:
    r = random.Random(seed)
    docs = []
    for _ in range(n):
        text = " ".join(_sentence(r) for _ in range(r.randint(2, 7)))
        if r.random() < 0.1:
            text += " Café au lait, naïve façade."
        docs.append(text)
    return docs


_SP_SETTINGS = dict(model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc",
                    add_dummy_prefix=False, character_coverage=0.999, hard_vocab_limit=False,
                    pad_id=0, bos_id=1, eos_id=2, unk_id=3)
_CACHE = {}


def tiny_tokenizer(root: Path, vocab_size: int = 384) -> Path:
    """Challenge-settings BPE (byte_fallback, pad 0 / bos 1 / eos 2 / unk 3), trained once per session."""
    if "sp" not in _CACHE:
        import sentencepiece as spm

        model = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(english_docs(3000, seed=123)), model_writer=model,
                                       vocab_size=vocab_size, minloglevel=2, num_threads=1, **_SP_SETTINGS)
        path = Path(root) / "tiny_bpe.model"
        path.write_bytes(model.getvalue())
        _CACHE["sp"] = path
    return _CACHE["sp"]


def sp_vocab(path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path)).vocab_size()


def encode_docs(sp_path, docs) -> np.ndarray:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    return np.concatenate([np.array([tg.BOS_ID] + ids, dtype=np.uint16) for ids in sp.encode(docs)])


def tiny_dataset(root: Path) -> tuple[Path, Path, int]:
    """(data_path, tokenizer_path, vocab_size): 3 train shards and 1 val shard, built once per session."""
    if "data" not in _CACHE:
        sp_path = tiny_tokenizer(root)
        data = Path(root) / "sp_tiny"
        data.mkdir(parents=True, exist_ok=True)
        train = encode_docs(sp_path, english_docs(1500, seed=1))
        for i, part in enumerate(np.array_split(train, 3)):
            write_shard(data / f"fineweb_train_{i:06d}.bin", part)
        write_shard(data / "fineweb_val_000000.bin", encode_docs(sp_path, english_docs(40, seed=2)))
        _CACHE["data"] = (data, sp_path, sp_vocab(sp_path))
    return _CACHE["data"]


# ---------------------------------------------------------------------------------------
# Running train_gpt.py as a script
# ---------------------------------------------------------------------------------------

def env_of(cfg) -> dict[str, str]:
    """Hyperparameters as environment variables, in from_env's syntax (bools 0/1, lists comma-separated)."""
    def text(v):
        return str(int(v)) if isinstance(v, bool) else ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
    return {k.upper(): text(v) for k, v in cfg.items()}


# The tiny model for script runs: TINY (the vocabulary comes with the data) on the tiny corpus's
# longer documents: 128-token sequences, windows 16/32, the auto attention backend.
SCRIPT_ENV = env_of({
    **{k: v for k, v in TINY.items() if k not in ("vocab_size", "fused_mlp")}, "local_window_size_early": 16,
    "local_window_size_late": 32, "train_seq_len": 128, "train_batch_tokens": 1024, "eval_seq_len": 128,
    "val_batch_tokens": 512, "attn_backend": "auto", "max_wallclock_seconds": 0, "train_log_every": 1, "seed": 7,
    # quantization and evaluation sections further down (ignored by from_env if absent): keep them cheap
    "gptq_calibration_tokens": 1024, "gptq_reserve_seconds": 0, "allow_over_cap": True,
    "sliding_eval": False, "ttt_enabled": False,
})


def script_env(tmp_path, data_path=None, tokenizer_path=None, vocab_size=None, **overrides):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
           and k.upper() not in {f.name.upper() for f in fields(tg.Hyperparameters)}}
    # PYTHONFAULTHANDLER: Python stacks if a run aborts (a rare SIGABRT of a 2-rank gloo run at exit, seen in CI)
    env.update(SCRIPT_ENV, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1", LOG_DIR=str(Path(tmp_path) / "logs"),
               RUN_ID="test", ARTIFACT_PATH=str(Path(tmp_path) / "final_model.pgq"))
    if data_path is not None:
        env.update(DATA_PATH=str(data_path), TOKENIZER_PATH=str(tokenizer_path), VOCAB_SIZE=str(vocab_size))
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def run_script(env, cwd, nproc=1, timeout=240):
    if nproc == 1:
        cmd = [sys.executable, str(SCRIPT)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(SCRIPT)]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def train_losses(text) -> dict[int, float]:
    return parse_train_log(text)["train_losses"]


def final_val(text) -> tuple[float, float]:
    """(val_loss, val_bpb) of the pre-quantization post-EMA eval."""
    run = parse_train_log(text)
    assert run["prequant_loss"] is not None, \
        "no 'diagnostic pre-quantization post-ema val_loss:... val_bpb:...' line in:\n" + text[-3000:]
    return run["prequant_loss"], run["prequant_bpb"]
