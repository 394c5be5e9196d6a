"""The tools: compare_runs.py (the N=1 vs N=2 train_loss comparison of issue 2's device check, and
an A/B's ms/step per phase), bench_pack.py, quant_sweep.py, profile_leader.py and profile_train's
kernel summary, bench_ab.py, eval_artifact.py's GPU-only flag, the device scripts' syntax and
device_lib.sh's train_until."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "compare_runs.py"


def write_log(path, losses, total=100):
    lines = ["hyperparameters:", "  seed: 42"]
    lines += [f"{s}/{total} train_loss: {v:.4f} train_time: 0.0m tok/s: 1" for s, v in losses.items()]
    lines.append("diagnostic pre-quantization post-ema val_loss:3.0 val_bpb:1.5 eval_time:1ms scored_targets:9")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def compare(*args):
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True)


def test_compare_runs_passes_within_tolerance_and_fails_beyond(tmp_path):
    ref = write_log(tmp_path / "n1.log", {1: 9.0, 2: 8.5, 3: 8.0, 4: 7.0, 5: 6.0})
    close = write_log(tmp_path / "n2.log", {1: 9.001, 2: 8.49, 3: 8.01, 4: 7.5, 5: 6.0})
    r = compare("--steps", "3", "--tol", "0.02", ref, close)
    assert r.returncode == 0, r.stdout
    assert "first 3 steps: max |diff| 0.0100 (within tol 0.02); 5 steps in all" in r.stdout
    assert "     4     7.0000     7.5000   +0.5000" in r.stdout  # printed, but beyond --steps
    r = compare("--steps", "4", "--tol", "0.02", ref, close)
    assert r.returncode == 1 and "max |diff| 0.5000 (OVER tol 0.02)" in r.stdout


def test_compare_runs_fails_when_a_run_stopped_early(tmp_path):
    """A run that died after 3 steps matches on those steps, and must still fail the check."""
    ref = write_log(tmp_path / "n1.log", {s: 9.0 - 0.1 * s for s in range(1, 81)})
    short = write_log(tmp_path / "n2.log", {s: 9.0 - 0.1 * s for s in range(1, 4)})
    r = compare("--steps", "3", ref, short)
    assert r.returncode == 1 and "did a run stop early?" in r.stdout
    assert compare(ref, write_log(tmp_path / "none.log", {})).returncode == 1
    assert compare("--steps", "0", ref, ref).returncode == 2  # argparse error
    assert compare("--steps", "20", ref, ref).returncode == 0


def test_compare_runs_prints_each_runs_ms_per_step_over_the_phases(tmp_path):
    """Steps 1-2 at 100 ms, 3-4 at 200 (reference) or 150 (other): the cumulative step_avg gives
    each phase's own mean; a log without step_avg fails; malformed ranges are refused."""
    def log(path, ms, avg=True):
        total, lines = 0.0, []
        for s, m in enumerate(ms, 1):
            total += m
            extra = f" step_avg: {total / s:.2f}ms" if avg else ""
            lines.append(f"{s}/4 train_loss: 5.0000 train_time: 0.0m{extra} tok/s: 1")
        path.write_text("\n".join(lines) + "\n")
        return str(path)
    ref, other = log(tmp_path / "a.log", [100, 100, 200, 200]), log(tmp_path / "b.log", [100, 100, 150, 150])
    r = compare("--steps", "4", "--phases", "1-2,3-4", ref, other)
    assert r.returncode == 0, r.stdout
    assert "steps 1-2: ms/step 100.0 vs 100.0 (+0.0%)" in r.stdout
    assert "steps 3-4: ms/step 200.0 vs 150.0 (-25.0%)" in r.stdout
    assert compare("--steps", "4", "--phases", "3-4", ref, log(tmp_path / "c.log", [1] * 4, avg=False)).returncode == 1
    for bad in ("3", "4-3", "0-2", "a-b"):
        assert compare("--phases", bad, ref, other).returncode == 2


def test_bench_pack_reports_the_rans_container_smaller_than_brotli():
    import re

    # half the model width: 28% of the default's code values (26 s against 85 s on 2 cores)
    out = subprocess.run([sys.executable, str(TOOL.parent / "bench_pack.py"), "0", "MODEL_DIM=256"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    entropy = int(re.search(r"entropy of the rANS-coded arrays: (\d+) bytes", out.stdout)[1])
    old = int(re.search(r"brotli-per-array container: (\d+) bytes", out.stdout)[1])
    new = int(re.search(r"rANS container: (\d+) bytes", out.stdout)[1])
    assert entropy < new and old - new > 0.005 * entropy, out.stdout  # measured: 0.79% of the entropy (0.92% at 512)


def test_bench_pack_reads_an_artifact_and_repacks_it_to_the_same_size(tmp_path):
    """ARTIFACT (any file name): the codes are the artifact's (unpacked), and pack_artifact is
    deterministic, so the rANS container it reports is the artifact's own size."""
    import re

    import numpy as np

    sys.path.insert(0, str(TOOL.parent))
    import bench_pack
    import train_gpt as tg

    h = tg.Hyperparameters.from_env({"MODEL_DIM": "128", "VOCAB_SIZE": "1024"})
    blob = tg.pack_artifact(bench_pack.synthetic_qstate(h, np.random.default_rng(3)))
    path = tmp_path / "a.timing"
    path.write_bytes(blob)
    out = subprocess.run([sys.executable, str(TOOL.parent / "bench_pack.py"), str(path)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"{path}: {len(blob)} bytes" in out.stdout
    assert int(re.search(r"rANS container: (\d+) bytes", out.stdout)[1]) == len(blob), out.stdout
    codes = sum(e.data.numel() for e in tg.unpack_artifact(blob).values() if e.kind != "fp16")
    assert f"code values: {codes};" in out.stdout


def test_quant_sweep_prices_variants_of_one_trained_model(tmp_path):
    """One training run, three quantizations: a wider MLP clip costs fewer bytes, and every row
    reports exact artifact bytes and a finite val_bpb; a calibration variable cannot vary."""
    import re

    from helpers_train import script_env, tiny_dataset

    (tmp_path / "data").mkdir()
    env = script_env(tmp_path, *tiny_dataset(tmp_path / "data"), ITERATIONS=3, WARMUP_STEPS=0, LQER_TOP_K=2)
    cmd = [sys.executable, str(TOOL.parent / "quant_sweep.py"), "base", "MLP_CLIP_SIGMAS=4",
           "MLP_CLIP_SIGMAS=30,LQER_ENABLED=0"]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = {m[1]: (int(m[2]), int(m[3]), float(m[4])) for m in re.finditer(
        r"^(\S+) +(\d+) +(\d+) +(\d+\.\d+) +[+-]\d+\.\d+ +\d+\.\d+$", out.stdout, re.M)}
    assert set(rows) == {"base", "MLP_CLIP_SIGMAS=4", "MLP_CLIP_SIGMAS=30,LQER_ENABLED=0"}, out.stdout
    assert rows["MLP_CLIP_SIGMAS=30,LQER_ENABLED=0"][0] < rows["base"][0] < rows["MLP_CLIP_SIGMAS=4"][0]
    assert all(total > size > 0 and 0 < bpb < 20 for size, total, bpb in rows.values())
    bad = subprocess.run(cmd[:2] + ["GPTQ_CALIBRATION_TOKENS=64"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode != 0 and "cannot vary" in bad.stdout + bad.stderr


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "tools").glob("*.sh")) + ["../run.sh"])
def test_shell_scripts_parse(script):
    """The device scripts only run on a GPU machine: at least their syntax is checked here."""
    r = subprocess.run(["bash", "-n", str(ROOT / "tools" / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


FAKE_TRAIN = """
import sys, time
print("1/9 train_loss: 5.0", flush=True)
print("diagnostic pre-quantization post-ema val_loss:3.0 val_bpb:1.5", flush=True)
time.sleep(60)  # GPTQ and eval: what a prequant job does not wait for
print("never", flush=True)
"""


@pytest.mark.parametrize("pattern, ok", [("pre-quantization post-ema val_loss", True), ("^no such line", False)])
def test_train_until_stops_the_run_at_its_line(tmp_path, pattern, ok):
    """device_lib.sh's train_until (prequant and steps jobs): the run is stopped once its log has the
    line, and the status says whether the line came."""
    (tmp_path / "train_gpt.py").write_text(FAKE_TRAIN if ok else FAKE_TRAIN.replace("time.sleep(60)", "pass"))
    script = f'W={tmp_path}; source {ROOT}/tools/device_lib.sh; train_until "{pattern}" run {tmp_path} SEED=1'
    t0 = time.time()
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=50)
    assert (r.returncode == 0) == ok, r.stderr
    assert time.time() - t0 < 30  # stopped, not waited out
    log = (tmp_path / "run.log").read_text()
    assert "val_bpb:1.5" in log and ("never" in log) != ok
    assert (tmp_path / "status").read_text() == "run done\n"


FAKE_LEADER = '''
import torch

class Muon(torch.optim.SGD):  # the leader's optimizers, by class name
    pass

w = torch.nn.Parameter(torch.ones(4))
opts = [Muon([w], lr=0.1), torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])]
for step in range({n}):
    (w * w).sum().backward()
    for o in opts:
        o.step()
        o.zero_grad()
    print(f"step {{step + 1}}", flush=True)
print("training ended", flush=True)
'''


@pytest.mark.parametrize("n, ok", [(30, True), (8, False)])
def test_profile_leader_profiles_its_windows_then_stops(tmp_path, n, ok):
    """tools/profile_leader.py runs a script unchanged, counts its Muon steps (not the other
    optimizers'), profiles --steps steps from each --at main-loop step after --warmup, then ends the
    process; a script that ends first is an error."""
    script = tmp_path / "leader.py"
    script.write_text(FAKE_LEADER.format(n=n))
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "profile_leader.py"), str(script),
                        "--steps", "2", "--at", "3,7", "--warmup", "4"], capture_output=True, text=True)
    if not ok:
        assert r.returncode != 0 and "ended before the windows [3, 7]" in r.stderr
        return
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "== leader steps 4-5 (main loop)" in out and "== leader steps 8-9 (main loop)" in out
    # the hook runs in Muon's step, before the script prints that step: window 1 ends in Muon step 9
    # (main-loop step 5), window 2 in step 13, which the process does not outlive
    assert out.index("step 8\n") < out.index("leader steps 4-5") < out.index("step 9\n")
    assert out.index("step 12\n") < out.index("leader steps 8-9")
    assert "step 13\n" not in out and "training ended" not in out


def test_profile_leader_windows_back_to_back_and_the_warmup_from_the_env(tmp_path):
    """A window may start on the step the previous one ends; --warmup defaults to the leader's
    WARMUP_STEPS, twice when NUM_LOOPS > 0 (its loop warm-up)."""
    script = tmp_path / "leader.py"
    script.write_text(FAKE_LEADER.format(n=30))
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "profile_leader.py"), str(script), "--steps", "2",
                        "--at", "3,5"], capture_output=True, text=True, env={**os.environ, "WARMUP_STEPS": "2"})
    assert r.returncode == 0, r.stderr
    assert "== leader steps 4-5 (main loop)" in r.stdout and "== leader steps 6-7 (main loop)" in r.stdout
    assert r.stdout.index("step 10\n") < r.stdout.index("leader steps 6-7")  # 2 x 2 warm-up steps, then 7 main steps
    assert "step 11\n" not in r.stdout


def test_print_kernels_sums_kernels_by_kind_and_never_counts_a_gpu_range(capsys):
    """profile_train.print_kernels (both scripts' profiles): the per-step kernel total and each kind's
    share leave out GPU user ranges (Optimizer.step#Muon.step spans kernels already counted), and an
    inductor kernel named after the flash backward it follows is not attention."""
    from types import SimpleNamespace

    import torch

    sys.path.insert(0, str(ROOT / "tools"))
    from profile_train import print_kernels

    def ev(key, us, count=2, annotation=False):
        return SimpleNamespace(key=key, self_device_time_total=us, count=count, is_user_annotation=annotation,
                               device_type=torch.autograd.DeviceType.CUDA)

    events = [ev("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...>", 6000),
              ev("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", 4000),
              ev("triton_per_fused__to_copy_add_expand_flash_attn_backward_mul_neg_sigmoid", 2000),
              ev("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, ...>", 1000),
              ev("Optimizer.step#Muon.step", 5000, count=1, annotation=True),
              ev("## Call CompiledFxGraph fugn2suz ##", 6000, annotation=True),
              ev("## Call CompiledFxGraph fdeflswy ##", 2000, annotation=True),
              SimpleNamespace(key="aten::mm", self_device_time_total=0, count=9, is_user_annotation=False,
                              device_type=torch.autograd.DeviceType.CPU)]
    print_kernels(SimpleNamespace(key_averages=lambda: events), 2, 0.01, 1000, "test")
    out = capsys.readouterr().out
    assert "== test: wall 10.0 ms/step, kernels 6.5 ms/step, 100000 tok/s" in out
    assert "by kind (ms/step): attention 3.0, gemm 2.0, inductor 1.0, aten add (gradient sums) 0.5" in out
    assert "ranges (ms/step): compiled graph calls 4.00, Optimizer.step#Muon.step 2.50\n" in out  # summed, sorted
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 4 and "Optimizer" not in "".join(rows)


def test_print_launchers_ranks_host_ops_by_the_gpu_time_they_launched(capsys):
    """profile_train.print_launchers: host ops by the kernel time they launched, per step, with their inputs
    of 2+ dims; rows differing only in 1-D inputs (each batch's cu_seqlens) merged; GPU events and ops that
    launched nothing left out."""
    from types import SimpleNamespace

    import torch

    sys.path.insert(0, str(ROOT / "tools"))
    from profile_train import print_launchers

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def ev(key, us, count, shapes, device=cpu):
        return SimpleNamespace(key=key, self_device_time_total=us, count=count, device_type=device, input_shapes=shapes)

    events = [ev("aten::add_", 3000, 40, [[98304, 512], [98304, 512], []]),
              ev("aten::_flash_attention_backward", 5000, 3, [[98304, 8, 64], [25]]),
              ev("aten::_flash_attention_backward", 4000, 3, [[98304, 8, 64], [136]]),
              ev("aten::_flash_attention_backward", 2000, 2, [[98304, 4, 64], [136]]),
              ev("aten::view", 0, 99, []),
              ev("reduce_kernel", 9000, 8, [], cuda)]
    prof = SimpleNamespace(key_averages=lambda group_by_input_shape=False: events if group_by_input_shape else [])
    print_launchers(prof, 2)
    rows = [line.split(None, 3) for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows == [["4.50", "3.0", "aten::_flash_attention_backward", "[[98304, 8, 64]]"],
                    ["1.50", "20.0", "aten::add_", "[[98304, 512], [98304, 512]]"],
                    ["1.00", "1.0", "aten::_flash_attention_backward", "[[98304, 4, 64]]"]]


def test_bench_ab_alternates_two_models_in_one_process(tmp_path):
    """tools/bench_ab.py: B is built and trained with its own settings (a narrower MLP, larger
    batches), both loop phases are timed, every round times A and B with the first one alternating,
    the summaries are those rounds' figures, and each model took its own batches to its own loss; unknown
    settings, ones made once per process, malformed ones and ones equal to A's are refused before a
    model is built."""
    import re

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers_train import script_env, tiny_dataset

    data, tok, vocab = tiny_dataset(tmp_path)
    env = script_env(tmp_path, data, tok, vocab)
    tool = [sys.executable, str(ROOT / "tools" / "bench_ab.py")]
    r = subprocess.run(tool + ["MLP_MULT=1", "RESIDUAL_BF16=0", "TRAIN_BATCH_TOKENS=2048", "TRAIN_CUDA_GRAPH=1", "--rounds",
                               "3", "--steps", "1"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert ("B differs in mlp_mult 2 -> 1, residual_bf16 True -> False, train_batch_tokens 1024 -> 2048, "
            "train_cuda_graph 'auto' -> '1';") in out and "training CUDA graphs A off, B on; fused MLP A on, B on" in out
    # B's micro-steps on padded shapes (no CUDA here), met in its warm-up: A has none
    assert re.search(r"bench_ab: B after the warm-up: TRAIN_CUDA_GRAPH micro-step shapes padded: [1-9]\d* unlooped, "
                     r"[1-9]\d* looped", out) and "bench_ab: A after" not in out, out
    params = {m[1]: int(m[2]) for m in re.finditer(r"bench_ab: ([AB]) (\d+) parameters", out)}
    assert params["A"] - params["B"] == 6 * 2 * 64 * 64, params  # 6 layers' up and down: 64 -> 128 -> 64 vs 64 -> 64
    for looping in (0, 1):
        rounds = re.findall(rf"looping:{looping} round \d \(([AB]) first\): A (\d+\.\d+) B (\d+\.\d+) ms/step", out)
        assert [first for first, _, _ in rounds] == ["A", "B", "A"], out
        a_ms, b_ms = ([float(x[i]) for x in rounds] for i in (1, 2))
        m = re.search(rf"looping:{looping} median ms/step A ([\d.]+) B ([\d.]+); B/A per round ([\d. ]+) "
                      r"\(median ([\d.]+)\); tok/s A (\d+) B (\d+) \(B/A ([\d.]+)\)", out)
        assert m, out
        assert float(m[1]) == pytest.approx(sorted(a_ms)[1], abs=0.006)
        assert float(m[2]) == pytest.approx(sorted(b_ms)[1], abs=0.006)
        for ratio, a, b in zip(map(float, m[3].split()), a_ms, b_ms):
            assert ratio == pytest.approx(b / a, rel=2e-3)
        assert int(m[5]) == pytest.approx(1024 * 1000 / float(m[1]), rel=1e-3)
        assert int(m[6]) == pytest.approx(2048 * 1000 / float(m[2]), rel=1e-3)
        assert float(m[7]) == pytest.approx(int(m[6]) / int(m[5]), rel=1e-3)
    took = {m[1]: (int(m[2]), float(m[3])) for m in re.finditer(r"bench_ab: ([AB]) took (\d+) tokens, last loss ([\d.]+)", out)}
    steps = 2 * (3 + 3)  # phases x (warm-up + rounds), each of 2 micro-batches
    assert (took["A"][0], took["B"][0]) == (steps * 2 * (512 + 1), steps * 2 * (1024 + 1))
    assert took["A"][1] != took["B"][1]
    for bad, msg in ((["ATTN_BACKEND=sdpa"], "ATTN_BACKEND is one per process"),
                     (["MATRX_LR=0.1"], "MATRX_LR is not a setting of train_gpt.py"),
                     (["RESIDUAL_BF16"], "expected NAME=VALUE"),
                     (["RESIDUAL_BF16=1"], "B's settings equal A's"),
                     (["TRAIN_CUDA_GRAPH=0"], "B's TRAIN_CUDA_GRAPH=0 means off here, as A's auto"),  # the CPU
                     (["FUSED_MLP=1"], "B's FUSED_MLP=1 means on here, as A's auto"),
                     (["RESIDUAL_BF16=2"], "RESIDUAL_BF16='2': expected 0 or 1"),
                     (["RESIDUAL_BF16=0", "--rounds", "1"], "--rounds must be at least 2")):
        r = subprocess.run(tool + bad, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and msg in r.stderr, (bad, r.stderr)


def test_eval_artifact_refuses_a_memory_cap_without_a_gpu(tmp_path):
    """--memory-gib (an H100's 80 GB on an H200) caps the CUDA allocator: on the CPU it is refused
    before anything is read or evaluated."""
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "eval_artifact.py"), "--memory-gib", "79"],
                       capture_output=True, text=True, env={**os.environ, "ARTIFACT_PATH": str(tmp_path / "none.pgq")})
    assert r.returncode == 2 and "--memory-gib needs a CUDA device" in r.stderr


def test_bench_kernels_fp8_linear_is_the_product_and_its_gradients_within_fp8_error():
    """FP8Linear (the FP8 GEMM bench_kernels times): output and both gradients equal x w^T's within
    e4m3/e5m2 rounding, and differ from it (the operands really are 8-bit)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import torch

    import bench_kernels as bk
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(48, 32, generator=gen) * 0.05).bfloat16().requires_grad_()
    grad = torch.randn(64, 48, generator=gen).bfloat16()
    y = bk.fp8_linear(x, w)
    y.backward(grad)
    xf, wf, gf = x.detach().float(), w.detach().float(), grad.float()
    for got, want, tol in ((y, xf @ wf.t(), 0.08), (x.grad, gf @ wf, 0.15), (w.grad, gf.t() @ xf, 0.15)):
        err = bk.rel_err(got, want)
        assert 1e-4 < err < tol, err


def test_bench_kernels_runs_on_the_cpu_and_says_what_it_skipped():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_kernels.py"), "--tokens", "64", "--iters", "1",
                          "--no-compile"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "== 64 tokens" in lines
    for name in ("xIELU", "LeakyReLU(0.5)^2"):
        assert any(f"+ {name}, cuBLAS + separate activation" in ln and "skipped" not in ln for ln in lines)
        assert any(f"+ {name}, fused" in ln and "skipped: Triton on the GPU only" in ln for ln in lines)
    assert sum("bf16" in ln and ln.startswith("gemm ") and "skipped" not in ln for ln in lines) == 6
    assert sum("fp8 + casts" in ln and "skipped: timed on the GPU only" in ln for ln in lines) == 6
    assert any(ln.startswith("rms_norm [64, 512] bfloat16") for ln in lines)
