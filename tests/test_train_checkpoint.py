"""CHECKPOINT_EVERY / RESUME, running train_gpt.py as a script on tiny data: a run that crashes
after its step-4 checkpoint and is resumed computes the uninterrupted run's steps exactly (every
tensor of the final checkpoint equal), on 1 or 2 ranks; a truncated or corrupt checkpoint is
refused before anything is loaded."""
import os
import subprocess
import sys

import pytest
import torch

import train_gpt as tg
from helpers_train import REPO, final_val, run_script, script_env, tiny_dataset, train_losses

ENV = dict(ITERATIONS=8, WARMUP_STEPS=0, CHECKPOINT_EVERY=4)  # looping from step 3 (0.35 of 8)
CRASH = """import sys, train_gpt as tg
real, calls = tg.Trainer.step, []
def step(self, *args):  # the 5th step dies: the last checkpoint is step 4's
    calls.append(1)
    if len(calls) == 5:
        raise KeyboardInterrupt("simulated crash in step 5")
    return real(self, *args)
tg.Trainer.step = step
tg.main()
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    work = tmp_path_factory.mktemp("ckpt")
    out = {}
    r = run_script(script_env(work, *data, RUN_ID="ref", **ENV), work)
    out["ref"] = r.returncode, r.stdout + r.stderr
    env = script_env(work, *data, RUN_ID="crash", **ENV)
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run([sys.executable, "-c", CRASH], env=env, cwd=work, capture_output=True, text=True, timeout=240)
    out["crash"] = r.returncode, r.stdout + r.stderr
    for name, src, nproc in (("resumed", "crash", 1), ("resumed2", "crash", 2), ("finished", "ref", 1)):
        r = run_script(script_env(work, *data, RUN_ID=name, RESUME=work / "logs" / f"{src}.ckpt", **ENV), work, nproc)
        out[name] = r.returncode, r.stdout + r.stderr
    return work, out


def assert_same(a, b, where="checkpoint"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def test_a_resumed_run_computes_the_uninterrupted_steps_exactly(runs):
    work, out = runs
    (rc_ref, ref), (rc_crash, crash), (rc_res, res) = out["ref"], out["crash"], out["resumed"]
    assert rc_ref == 0, ref[-4000:]
    assert rc_crash != 0 and "simulated crash in step 5" in crash, crash[-3000:]
    assert rc_res == 0, res[-4000:]
    assert sorted(train_losses(crash)) == [1, 2, 3, 4] and "checkpoint: step 4 " in crash
    assert f"resume: {work / 'logs' / 'crash.ckpt'} (run crash) at step 4," in res
    assert "layer_loop:enabled" not in res  # the looping flag came back with the checkpoint
    losses, ref_losses = train_losses(res), train_losses(ref)
    assert sorted(losses) == [5, 6, 7, 8] and all(losses[s] == ref_losses[s] for s in losses), (losses, ref_losses)
    assert final_val(res) == final_val(ref)  # 8 decimals: the EMA weights
    # every state of step 8 (weights, Muon momentum, AdamW moments, EMA, stream position, RNG) is bit-equal
    a, b = (tg.load_checkpoint(work / "logs" / f"{n}.ckpt") for n in ("ref", "resumed"))
    assert a["step"] == b["step"] == 8
    ha, hb = a.pop("hparams"), b.pop("hparams")
    assert {k for k in ha if ha[k] != hb[k]} == {"run_id", "resume"}
    a.pop("train_ms"), b.pop("train_ms")
    assert_same(a, b)


def test_two_ranks_resume_a_one_process_checkpoint(runs):
    """Both ranks read the file and derive their loader position from the shared stream position:
    the steps equal the one-process run's (up to the 2-rank summation order)."""
    _, out = runs
    rc, res2 = out["resumed2"]
    assert rc == 0, res2[-4000:]
    assert "world_size: 2" in res2
    l2, ref = train_losses(res2), train_losses(out["ref"][1])
    assert sorted(l2) == [5, 6, 7, 8]
    for s in l2:
        assert abs(l2[s] - ref[s]) <= 1e-4 * abs(ref[s]) + 1e-4, (s, l2, ref)


def test_the_checkpoint_at_the_end_of_training_resumes_into_gptq(runs):
    """Training writes a last checkpoint when it ends: a crash in GPTQ or the evaluation loses no
    training, the resumed run goes straight to GPTQ with the same weights."""
    _, out = runs
    rc, fin = out["finished"]
    assert rc == 0, fin[-4000:]
    assert "at step 8," in fin and not train_losses(fin) and "training: 8 steps" in fin
    assert final_val(fin) == final_val(out["ref"][1])


def test_a_truncated_checkpoint_is_refused_before_anything_is_loaded(runs, data, tmp_path):
    work, _ = runs
    blob = (work / "logs" / "crash.ckpt").read_bytes()
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(blob[:len(blob) // 2])
    r = run_script(script_env(tmp_path, *data, RESUME=bad, **ENV), tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"error: RESUME={bad}: truncated or corrupt checkpoint" in r.stderr
    assert "Traceback" not in r.stderr and "train_loss" not in r.stdout and "compile_warmup" not in r.stdout
    flipped = bytearray(blob)
    flipped[len(blob) // 3] ^= 1  # one bit inside the payload
    for content in (bytes(flipped), blob[:-1], b""):
        bad.write_bytes(content)
        with pytest.raises(tg.DataError, match="truncated or corrupt checkpoint"):
            tg.load_checkpoint(bad)


def test_checkpoint_every_takes_steps_or_seconds():
    h = tg.Hyperparameters.from_env({"CHECKPOINT_EVERY": "600s", "RUN_ID": "x"})
    assert not tg.checkpoint_due(h, 10, 599_999.0, 0.0) and tg.checkpoint_due(h, 11, 600_000.0, 0.0)
    h = tg.Hyperparameters.from_env({"CHECKPOINT_EVERY": "1000", "RUN_ID": "x"})
    assert tg.checkpoint_due(h, 2000, 5.0, 0.0) and not tg.checkpoint_due(h, 2001, 1e9, 0.0)
    assert not tg.checkpoint_due(tg.Hyperparameters(), 1000, 1e9, 0.0)  # "" = off
    for bad in ("10m", "s", "0", "-5", "1.5s", "600 s"):
        with pytest.raises(tg.ConfigError, match="CHECKPOINT_EVERY"):
            tg.Hyperparameters.from_env({"CHECKPOINT_EVERY": bad, "RUN_ID": "x"})
