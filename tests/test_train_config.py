"""Configuration of train_gpt.py: Hyperparameters.from_env parsing and validation (ConfigError
messages start with the variable's name), and the script's exit codes for bad configs and
missing inputs."""
import re

import numpy as np
import pytest

import train_gpt as tg
from helpers_train import run_script, script_env, tiny_dataset, write_shard


def test_defaults_are_valid_and_match_the_record_shape():
    h = tg.Hyperparameters()
    h.validate()
    assert (h.num_layers, h.model_dim, h.vocab_size, h.grad_accum_steps, h.micro_tokens) == (11, 512, 8192, 8, 98304)


def test_from_env_parses_every_kind_of_field():
    env = {
        "NUM_LAYERS": "7", "MATRIX_LR": "1e-3", "COMPILE": "0", "PARCAE": "1", "GLOBAL_ATTN_LAYERS": "1, 3,6",
        "QK_GAIN_INIT": "2.5", "ATTN_GATE": "sparse", "RUN_ID": "abc", "WORLD_SIZE": "2", "RANK": "1",
        "LOCAL_RANK": "1", "num_layers": "3", "PATH": "/usr/bin", "SEED": "-4", "MAX_WALLCLOCK_SECONDS": "0",
    }
    h = tg.Hyperparameters.from_env(env)
    assert h.num_layers == 7 and isinstance(h.num_layers, int)
    assert h.matrix_lr == 1e-3 and isinstance(h.matrix_lr, float)
    assert h.compile is False and h.parcae is True
    assert h.global_attn_layers == (1, 3, 6) and h.qk_gain_init == (2.5,)
    assert (h.attn_gate, h.run_id, h.seed, h.max_wallclock_seconds) == ("sparse", "abc", -4, 0.0)
    assert (h.world_size, h.rank, h.local_rank, h.grad_accum_steps) == (2, 1, 1, 4)
    assert h.model_dim == 512  # untouched fields keep their defaults


def test_from_env_generates_a_run_id():
    h = tg.Hyperparameters.from_env({})
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", h.run_id)
    assert tg.Hyperparameters.from_env({}).run_id[-6:] != h.run_id[-6:]  # uuid part: 1 in 16.7M collision


BAD = [
    ({"ATTN_GATE": "gated"}, "ATTN_GATE"),
    ({"MLP_ACT": "gelu"}, "MLP_ACT"),
    ({"ATTN_BACKEND": "flash"}, "ATTN_BACKEND"),
    ({"TRAIN_CUDA_GRAPH": "true"}, "TRAIN_CUDA_GRAPH"),
    ({"FUSED_MLP": "true"}, "FUSED_MLP"),
    ({"FUSED_MLP": "1", "XIELU_LEARNABLE": "1"}, "FUSED_MLP"),  # the fused backward gives the coefficients none
    ({"SLIDING_MODE": "swa"}, "SLIDING_MODE"),
    ({"SLIDING_MODE": "attention", "VAL_BATCH_TOKENS": "4096", "EVAL_SEQ_LEN": "4096"}, "VAL_BATCH_TOKENS"),
    ({"TTT_LORA_TARGETS": "q,x"}, "TTT_LORA_TARGETS"),
    ({"TTT_LONG_CHUNK_SIZE": "-1"}, "TTT_LONG_CHUNK_SIZE"),
    ({"TTT_LONG_CHUNK_SIZE": "4096"}, "TTT_LONG_CHUNK_SIZE"),  # over TTT_EVAL_SEQ_LEN=2048
    ({"TTT_TAIL_CHUNK_SIZE": "-1"}, "TTT_TAIL_CHUNK_SIZE"),
    ({"TTT_TAIL_CHUNK_SIZE": "4096"}, "TTT_TAIL_CHUNK_SIZE"),  # over TTT_EVAL_SEQ_LEN=2048
    ({"TTT_LORA_TARGETS": ""}, "TTT_LORA_TARGETS"),
    ({"TTT_LORA_TARGETS": "k,k"}, "TTT_LORA_TARGETS"),
    ({"TTT_LORA_TARGETS": "k, o"}, "TTT_LORA_TARGETS"),
    ({"TRAIN_BATCH_TOKENS": "1000", "MICRO_BATCHES": "8", "TRAIN_SEQ_LEN": "64"}, "TRAIN_BATCH_TOKENS"),  # 125/micro
    ({"TRAIN_BATCH_TOKENS": "1001"}, "TRAIN_BATCH_TOKENS"),  # not divisible by MICRO_BATCHES
    ({"TRAIN_BATCH_TOKENS": "3072", "MICRO_BATCHES": "3", "TRAIN_SEQ_LEN": "1024", "WORLD_SIZE": "2"}, "MICRO_BATCHES"),
    ({"NUM_LAYERS": "six"}, "NUM_LAYERS"),
    ({"NUM_LAYERS": "4.0"}, "NUM_LAYERS"),
    ({"MATRIX_LR": "fast"}, "MATRIX_LR"),
    ({"COMPILE": "true"}, "COMPILE"),
    ({"SMEAR_GATE": "2"}, "SMEAR_GATE"),
    ({"GLOBAL_ATTN_LAYERS": "4,x"}, "GLOBAL_ATTN_LAYERS"),
    ({"GLOBAL_ATTN_LAYERS": "4,11"}, "GLOBAL_ATTN_LAYERS"),
    ({"LOOP_END": "8"}, "LOOP_END"),                    # loop reaches PARALLEL_START_LAYER=8
    ({"PARALLEL_START_LAYER": "5"}, "LOOP_END"),        # loop 3..5 above the parallel start
    ({"LOOP_START": "6"}, "LOOP_START"),
    ({"LOOP_END": "11", "PARALLEL_START_LAYER": "11"}, "LOOP_START"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK"),
    ({"MODEL_DIM": "500"}, "MODEL_DIM"),
    ({"NUM_KV_HEADS": "3"}, "NUM_HEADS"),
    ({"GLOBAL_ROPE_DIMS": "7"}, "GLOBAL_ROPE_DIMS"),
    ({"GLOBAL_ROPE_DIMS": "128"}, "GLOBAL_ROPE_DIMS"),
    ({"GATE_WIDTH": "513"}, "GATE_WIDTH"),
    ({"QK_GAIN_INIT": "1,2"}, "QK_GAIN_INIT"),
    ({"VAL_BATCH_TOKENS": "1000"}, "VAL_BATCH_TOKENS"),
    ({"WARMDOWN_FRAC": "1.5"}, "WARMDOWN_FRAC"),
    ({"EMA_DECAY": "1"}, "EMA_DECAY"),
    ({"ITERATIONS": "0"}, "ITERATIONS"),
]


@pytest.mark.parametrize("env, var", BAD, ids=[f"{v}:{'-'.join(e.values())}" for e, v in BAD])
def test_bad_values_raise_config_error_naming_the_variable(env, var):
    with pytest.raises(tg.ConfigError) as info:
        tg.Hyperparameters.from_env(env)
    assert str(info.value).startswith(var + "="), str(info.value)


def test_loop_range_is_only_checked_when_looping():
    h = tg.Hyperparameters.from_env({"NUM_LOOPS": "0", "LOOP_END": "10", "PARALLEL_START_LAYER": "5"})
    assert h.num_loops == 0


def test_capped_attention_rows_are_only_checked_when_sliding_windows_run():
    rows = {"VAL_BATCH_TOKENS": "4096", "EVAL_SEQ_LEN": "4096"}
    assert tg.Hyperparameters.from_env({**rows, "SLIDING_EVAL": "0", "TTT_ENABLED": "0"}).sliding_mode == "attention"
    for on in ({"SLIDING_EVAL": "0"}, {"TTT_ENABLED": "0"}):  # TTT's leftovers, or the sliding eval
        with pytest.raises(tg.ConfigError, match="EVAL_SEQ_LEN=4096"):
            tg.Hyperparameters.from_env({**rows, **on})


# Each of these once crashed validate() (ZeroDivisionError) or passed it and failed later: an empty
# eval row, a division by TRAIN_LOG_EVERY, or a negative window that SDPA reads as "mask every
# key" while FA3/varlen read it as "no window".
GAPS = [
    ({"MICRO_BATCHES": "0"}, "MICRO_BATCHES"),
    ({"NUM_HEADS": "0"}, "NUM_HEADS"),
    ({"NUM_KV_HEADS": "0"}, "NUM_KV_HEADS"),
    ({"EVAL_SEQ_LEN": "0"}, "EVAL_SEQ_LEN"),
    ({"VAL_BATCH_TOKENS": "0"}, "VAL_BATCH_TOKENS"),
    ({"TRAIN_LOG_EVERY": "0"}, "TRAIN_LOG_EVERY"),
    ({"LOCAL_WINDOW_SIZE_EARLY": "-1"}, "LOCAL_WINDOW_SIZE_EARLY"),
    # -5 read as "no cap" (only 0 should), -3 died in a torch traceback, the others were accepted
    ({"MAX_WALLCLOCK_SECONDS": "-5"}, "MAX_WALLCLOCK_SECONDS"),
    ({"GATE_WIDTH": "-3"}, "GATE_WIDTH"),
    ({"XSA_LAST_N": "-4"}, "XSA_LAST_N"),
    ({"LQER_RANK": "0"}, "LQER_RANK"),
    ({"MUON_BACKEND_STEPS": "0"}, "MUON_BACKEND_STEPS"),
    ({"MATRIX_LR": "nan"}, "MATRIX_LR"),
    ({"GRAD_CLIP_NORM": "-1"}, "GRAD_CLIP_NORM"),
    ({"BETA2": "1"}, "BETA2"),
    ({"MUON_MOMENTUM": "-0.1"}, "MUON_MOMENTUM"),
    ({"MIN_LR": "2"}, "MIN_LR"),
    ({"EVAL_BUDGET_SECONDS": "0"}, "EVAL_BUDGET_SECONDS"),
    ({"GLOBAL_TTT_GRAD_CLIP": "0"}, "GLOBAL_TTT_GRAD_CLIP"),
    ({"GLOBAL_TTT_DOC_TOKENS": "-1"}, "GLOBAL_TTT_DOC_TOKENS"),
    ({"VOCAB_SIZE": "0"}, "VOCAB_SIZE"),
]


def test_every_numeric_variable_has_a_range():
    """Each int/float field fails validation at some value (a range is checked), except the seed and
    the GPTQ reserve (any value: negative means measure it)."""
    unchecked = []
    for f in tg.fields(tg.Hyperparameters):
        if f.type not in ("int", "float") or f.name in ("seed", "gptq_reserve_seconds", "rank", "local_rank"):
            continue
        try:
            extra = {"NUM_LOOPS": "0"} if f.name == "parallel_start_layer" else {}  # else the loop check names LOOP_END
            tg.Hyperparameters.from_env({f.name.upper(): "-1000000", **extra})
            unchecked.append(f.name)
        except tg.ConfigError as e:
            assert "-1000000" in str(e), (f.name, str(e))  # about this value, not another variable's
    assert unchecked == []


@pytest.mark.parametrize("env, var", [pytest.param(env, var, id=var) for env, var in GAPS])
def test_validation_gaps(env, var):
    """Values that must raise ConfigError naming the variable, not crash or pass."""
    with pytest.raises(tg.ConfigError) as info:
        tg.Hyperparameters.from_env(env)
    assert str(info.value).startswith(var + "=")


# ---------------------------------------------------------------------------------------
# The script: exit codes and messages
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("env, prefix", [
    ({"ATTN_GATE": "bogus"}, "config error: ATTN_GATE='bogus': expected out, sparse or none"),
    ({"NUM_LAYERS": "x"}, "config error: NUM_LAYERS='x': invalid literal for int()"),
    ({"MICRO_BATCHES": "3", "WORLD_SIZE": "2", "RANK": "0"}, "config error: MICRO_BATCHES=3"),
])
def test_script_exits_2_on_config_error(tmp_path, env, prefix):
    r = run_script(script_env(tmp_path, **env), tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(prefix), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("data"))


def assert_error(r, tmp_path, code, line):
    """A bad input ends with exit `code` and exactly one line on stderr, also in the run's log."""
    assert r.returncode == code, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stderr == line + "\n", r.stderr[-3000:]
    assert line in (tmp_path / "logs" / "test.txt").read_text().splitlines()


def test_script_vocab_mismatch_exits_2(tmp_path, data):
    data_path, sp_path, vocab = data
    r = run_script(script_env(tmp_path, data_path, sp_path, vocab + 16), tmp_path, timeout=120)
    assert r.returncode == 2
    assert re.search(rf"^config error: VOCAB_SIZE={vocab + 16}: tokenizer {re.escape(str(sp_path))} has {vocab} pieces$",
                     r.stderr, re.M), r.stdout[-2000:] + r.stderr[-2000:]


def test_script_val_token_above_vocab_exits_2(tmp_path, data):
    _, sp_path, vocab = data
    bad = tmp_path / "bad"
    bad.mkdir()
    write_shard(bad / "fineweb_train_000000.bin", np.r_[1, np.arange(4, 300)])
    write_shard(bad / "fineweb_val_000000.bin", [1, 5, vocab + 3, 7])
    r = run_script(script_env(tmp_path, bad, sp_path, vocab), tmp_path, timeout=120)
    assert r.returncode == 2
    assert f"config error: VOCAB_SIZE={vocab}: val shards hold token id {vocab + 3}" in r.stderr


def test_script_missing_shards_fails_naming_the_pattern(tmp_path, data):
    _, sp_path, vocab = data
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_script(script_env(tmp_path, empty, sp_path, vocab), tmp_path, timeout=120)
    assert_error(r, tmp_path, 1, f"error: no train shards match {empty / 'fineweb_train_*.bin'} (set DATA_PATH)")


def test_script_missing_tokenizer_fails_clearly(tmp_path, data):
    data_path, _, vocab = data
    r = run_script(script_env(tmp_path, data_path, tmp_path / "none.model", vocab), tmp_path, timeout=120)
    assert_error(r, tmp_path, 1, f"error: tokenizer {tmp_path / 'none.model'} not found (set TOKENIZER_PATH)")


def test_script_unavailable_attention_backend_exits_2(tmp_path, data):
    data_path, sp_path, vocab = data
    r = run_script(script_env(tmp_path, data_path, sp_path, vocab, ATTN_BACKEND="fa3"), tmp_path, timeout=120)
    assert r.returncode == 2
    assert_error(r, tmp_path, 2, "config error: ATTN_BACKEND='fa3': not available here (available: sdpa)")


def test_script_gptq_reserve_larger_than_the_cap_exits_2(tmp_path, data):
    """A reserve >= the cap would leave a training budget of 0, which reads as "no cap"."""
    data_path, sp_path, vocab = data
    r = run_script(script_env(tmp_path, data_path, sp_path, vocab, MAX_WALLCLOCK_SECONDS=2, GPTQ_RESERVE_SECONDS=5,
                              WARMUP_STEPS=0), tmp_path, timeout=120)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert re.search(r"^config error: MAX_WALLCLOCK_SECONDS=2.0: nothing left after the 5.0s GPTQ reserve$",
                     r.stderr, re.M), r.stdout[-2000:]
