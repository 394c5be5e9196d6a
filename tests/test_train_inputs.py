"""Bad inputs fail fast and clearly (train_gpt.py): every train shard is checked before compile,
a tokenizer that did not make the shards is refused, an unwritable ARTIFACT_PATH stops the run
before training (and a write that still fails later saves the model elsewhere), a reused RUN_ID
is refused, look-alike environment variables are warned about, and stdout gets a one-line
summary instead of the hyperparameter dump."""
import io
import os
import re
import sys

import numpy as np
import pytest

import train_gpt as tg
from helpers_train import _SP_SETTINGS, english_docs, run_script, script_env, tiny_dataset, write_shard


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("data"))


def copy_data(data, dst):
    """A private copy of the tiny dataset's shards, to be damaged."""
    dst.mkdir()
    for name in os.listdir(data[0]):
        (dst / name).write_bytes((data[0] / name).read_bytes())
    return dst


def assert_fails_before_training(r, tmp_path, code, line):
    assert r.returncode == code, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stderr == line + "\n", r.stderr[-3000:]
    assert line in (tmp_path / "logs" / "test.txt").read_text().splitlines()
    assert "compile_warmup" not in r.stdout and "train_loss" not in r.stdout


# ---------------------------------------------------------------------------------------
# Every train shard, up front
# ---------------------------------------------------------------------------------------


def test_check_shards_finds_any_bad_shard(tmp_path):
    good = [write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", [1, 5, 6, 7]) for i in range(2)]
    tg.check_shards(good, vocab_size=8)
    with pytest.raises(tg.ConfigError, match=rf"^VOCAB_SIZE=7: {good[0]} holds token id 7$"):
        tg.check_shards(good, vocab_size=7)
    cases = [(dict(magic=123), "bad shard header"), (dict(n=9), "header says 9 tokens"),
             (dict(extra=b"\0"), "header says 4 tokens")]
    for kw, msg in cases:
        bad = write_shard(tmp_path / "fineweb_train_000002.bin", [1, 5, 6, 7], **kw)
        with pytest.raises(tg.DataError, match=msg):
            tg.check_shards(good + [bad], vocab_size=8)
    empty = write_shard(tmp_path / "fineweb_train_000003.bin", [])
    tg.check_shards(good + [empty], vocab_size=8)


@pytest.mark.parametrize("damage", ["truncated", "out_of_vocab"])
def test_script_refuses_a_bad_last_train_shard_before_compile(tmp_path, data, damage):
    """The loader reaches the last of the 3 shards only after many steps: the run must stop first."""
    d = copy_data(data, tmp_path / "d")
    last = d / "fineweb_train_000002.bin"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[:-7])
        line = f"error: {last}: header says "
    else:
        tokens = tg.load_data_shard(last).copy()
        tokens[-3] = data[2] + 5
        write_shard(last, tokens)
        line = f"config error: VOCAB_SIZE={data[2]}: {last} holds token id {data[2] + 5}"
    r = run_script(script_env(tmp_path, d, data[1], data[2]), tmp_path, timeout=120)
    code = 1 if damage == "truncated" else 2
    assert r.returncode == code and r.stderr.startswith(line), r.stdout[-2000:] + r.stderr[-2000:]
    assert_fails_before_training(r, tmp_path, code, r.stderr.rstrip("\n"))


@pytest.mark.parametrize("damage", ["bad_magic", "no_val"])
def test_script_data_errors_are_one_line_on_stderr_and_in_the_log(tmp_path, data, damage):
    d = copy_data(data, tmp_path / "d")
    val = d / "fineweb_val_000000.bin"
    if damage == "bad_magic":
        write_shard(val, tg.load_data_shard(val), magic=7)
        line = f"error: {val}: bad shard header (magic 7, version 1; expected {tg.SHARD_MAGIC}, 1)"
    else:
        val.unlink()
        line = f"error: no val shards match {d / 'fineweb_val_*.bin'} (set DATA_PATH)"
    r = run_script(script_env(tmp_path, d, data[1], data[2]), tmp_path, timeout=120)
    assert "Traceback" not in r.stderr
    assert_fails_before_training(r, tmp_path, 1, line)


# ---------------------------------------------------------------------------------------
# The tokenizer must be the one that made the shards
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    """Same settings and vocabulary size as the tiny tokenizer, other pieces (trained on reversed text)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([d[::-1] for d in english_docs(3000, seed=5)]),
                                   model_writer=model, vocab_size=384, minloglevel=2, num_threads=1, **_SP_SETTINGS)
    path = tmp_path_factory.mktemp("other") / "other.model"
    path.write_bytes(model.getvalue())
    return path


def test_check_tokenizer_matches(data, other_tokenizer):
    import sentencepiece as spm

    data_path, sp_path, vocab = data
    tokens = tg.load_data_shard(data_path / "fineweb_val_000000.bin")
    h = tg.Hyperparameters(tokenizer_path=str(other_tokenizer), data_path=str(data_path), vocab_size=vocab)
    tg.check_tokenizer_matches(spm.SentencePieceProcessor(model_file=str(sp_path)), tokens, h)
    other = spm.SentencePieceProcessor(model_file=str(other_tokenizer))
    assert other.vocab_size() == vocab
    with pytest.raises(tg.ConfigError, match=rf"^TOKENIZER_PATH={other_tokenizer}: only \d+ of 39 val documents"):
        tg.check_tokenizer_matches(other, tokens, h)


def test_script_refuses_a_tokenizer_that_did_not_make_the_shards(tmp_path, data, other_tokenizer):
    r = run_script(script_env(tmp_path, data[0], other_tokenizer, data[2]), tmp_path, timeout=120)
    assert r.stderr.startswith(f"config error: TOKENIZER_PATH={other_tokenizer}: only "), r.stderr[-2000:]
    assert_fails_before_training(r, tmp_path, 2, r.stderr.rstrip("\n"))


# ---------------------------------------------------------------------------------------
# ARTIFACT_PATH and RUN_ID
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["missing_dir", "a_directory"])
def test_script_refuses_an_unwritable_artifact_path_before_training(tmp_path, data, where):
    path = tmp_path / "nope" / "m.pgq" if where == "missing_dir" else tmp_path
    r = run_script(script_env(tmp_path, *data, ARTIFACT_PATH=path), tmp_path, timeout=120)
    reason = "No such file or directory" if where == "missing_dir" else "Is a directory"
    assert_fails_before_training(r, tmp_path, 2, f"config error: ARTIFACT_PATH={str(path)!r}: cannot be written ({reason})")


def test_check_writable_leaves_no_file(tmp_path):
    tg.check_writable(str(tmp_path / "m.pgq"))
    assert not (tmp_path / "m.pgq").exists()
    (tmp_path / "old.pgq").write_bytes(b"keep")
    tg.check_writable(str(tmp_path / "old.pgq"))
    assert (tmp_path / "old.pgq").read_bytes() == b"keep"


def test_write_artifact_saves_the_model_beside_the_log_if_artifact_path_fails(tmp_path, monkeypatch):
    """The directory vanished during training: the artifact lands in LOG_DIR and the log says so."""
    monkeypatch.setattr(tg, "pack_artifact", lambda q: b"model bytes")
    monkeypatch.setattr(tg, "counted_code_bytes", lambda path: (10, 10))
    h = tg.Hyperparameters(log_dir=str(tmp_path / "logs"), run_id="r", artifact_path=str(tmp_path / "gone" / "m.pgq"))
    rt = tg.Runtime(h)
    tg.write_artifact({}, h, rt)
    saved = tmp_path / "logs" / "r.pgq"
    assert saved.read_bytes() == b"model bytes" and h.artifact_path == str(saved)
    log = (tmp_path / "logs" / "r.txt").read_text()
    assert f"artifact: saved to {saved} instead of ARTIFACT_PATH={tmp_path / 'gone' / 'm.pgq'}" in log
    assert f"Serialized model quantized+brotli: 11 bytes ({saved}, " in log


def test_default_artifact_lies_beside_the_log_of_its_run():
    h = tg.Hyperparameters.from_env({"LOG_DIR": "some/logs", "RUN_ID": "r7"})
    assert h.artifact_path == os.path.join("some/logs", "r7.pgq")
    assert tg.Hyperparameters.from_env({"ARTIFACT_PATH": "x.pgq"}).artifact_path == "x.pgq"
    a, b = tg.Hyperparameters.from_env({}), tg.Hyperparameters.from_env({})
    assert a.artifact_path != b.artifact_path  # one file per run, never overwritten by the next


def test_script_refuses_a_reused_run_id(tmp_path, data):
    log = tmp_path / "logs" / "test.txt"
    log.parent.mkdir()
    log.write_text("the first run\n")
    r = run_script(script_env(tmp_path, *data), tmp_path, timeout=120)
    assert r.returncode == 2
    assert r.stderr == f"config error: RUN_ID='test': {log} exists; pick a new RUN_ID (unset: a fresh one)\n"
    assert log.read_text() == "the first run\n" and r.stdout == ""


# ---------------------------------------------------------------------------------------
# Environment variables that look like ours, and the console summary
# ---------------------------------------------------------------------------------------


def test_lookalike_env_vars_are_warned_about(capsys):
    env = {"MATRX_LR": "0.1", "matrix_lr": "0.1", "MAX_WALLCLOCK_SECOND": "5", "PATH": "/bin", "HOME": "/root",
           "OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_PORT": "1", "TORCHELASTIC_RUN_ID": "x",
           "NPROC": "2", "EMBEDDED_DIR": "d", "SEED": "3", "GROUP_RANK": "0", "ROLE_WORLD_SIZE": "1"}
    h = tg.Hyperparameters.from_env(env)
    assert h.matrix_lr == tg.Hyperparameters.matrix_lr and h.seed == 3
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "warning: MATRX_LR is not a variable of train_gpt.py and is ignored; did you mean MATRIX_LR?",
        "warning: matrix_lr is not a variable of train_gpt.py and is ignored; did you mean MATRIX_LR?",
        "warning: MAX_WALLCLOCK_SECOND is not a variable of train_gpt.py and is ignored; "
        "did you mean MAX_WALLCLOCK_SECONDS?",
    ]
    tg.Hyperparameters.from_env({"MATRX_LR": "0.1", "RANK": "1", "WORLD_SIZE": "2"})
    assert capsys.readouterr().err == ""  # rank 0 speaks for all


def test_stdout_gets_a_summary_and_the_log_the_hyperparameters(tmp_path, data):
    r = run_script(script_env(tmp_path, *data, ITERATIONS=1, WARMUP_STEPS=0, MATRX_LR="1"), tmp_path, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "did you mean MATRIX_LR?" in r.stderr
    first = r.stdout.splitlines()[0]
    log_path = tmp_path / "logs" / "test.txt"
    assert first.startswith(f"run_id: test log: {log_path} artifact: {tmp_path / 'final_model.pgq'}; ")
    assert " iterations=1 " in first and " warmup_steps=0 " in first and " matrix_lr" not in first
    assert "hyperparameters:" not in r.stdout and "  matrix_lr: " not in r.stdout
    log = log_path.read_text().splitlines()
    assert log[0] == "hyperparameters:" and "  matrix_lr: 0.026" in log and "  iterations: 1" in log
    assert first not in log
    # the silent phases announce themselves
    assert re.search(r"^gptq:calibration 1024 tokens from \d+ train shards \(.*\), then quantizing$", r.stdout, re.M)
    assert "eval: diagnostic quantized running" in r.stdout
