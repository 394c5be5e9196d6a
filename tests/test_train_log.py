"""tools/train_log.py, the one parser of train_gpt.py logs: on our real proxy log and on synthetic logs."""
import hashlib
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from helpers_logs import SOURCE, make_log  # noqa: E402
from train_log import parse_train_log, parse_train_log_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROXY_LOG = REPO / "records" / "proxy" / "2026-11-23_1xH100_seed42" / "train_seed42.log"


def test_real_proxy_log():
    r = parse_train_log_file(PROXY_LOG)
    assert r["hyperparameters"]["seed"] == "42" and r["hyperparameters"]["ttt_enabled"] == "True"
    assert r["hyperparameters"]["local_rank"] == "0" and len(r["hyperparameters"]) > 90
    # The embedded source is train_gpt.py as of commit 7164002, byte for byte.
    src = subprocess.run(["git", "show", "7164002:train_gpt.py"], cwd=REPO, capture_output=True, check=True).stdout
    assert r["code_sha256"] == hashlib.sha256(src).hexdigest() == \
        "b3093cfbd5a22c2c1e54fc79036b39b3c8270171e26340bdffa226617fdf8610"
    assert r["code_bytes_raw"] == r["code_bytes_uncompressed"] == 90959
    assert r["train_losses"] == {1: 9.0071, 2: 12.5474, 3: 11.0552, 4: 10.5171, 5: 9.2736}
    assert r["val_points"] == {} and r["iterations"] == 20000
    assert (r["steps"], r["train_s"], r["step_avg_ms"], r["tok_s"]) == (461, 291.7, 632.71, 414321)
    assert (r["compile_s"], r["gptq_reserve_s"], r["train_plus_gptq_s"], r["train_cap_s"]) == (56.4, 8.8, 300.0, 300.0)
    assert r["gptq_s"] == 8.4 and r["stopped_early"] is True and r["layer_loop_step"] == 210
    assert (r["prequant_loss"], r["prequant_bpb"], r["prequant_eval_s"]) == (3.34822253, 1.33656865, 15.349)
    assert (r["quantized_bpb"], r["sliding_bpb"], r["ttt_bpb"]) == (1.34142947, 1.33536370, 1.33296220)
    assert (r["final_stage"], r["final_loss"], r["final_bpb"]) == ("ttt", 3.33918806, 1.33296220)
    assert r["scored_targets"] == dict(prequant=2245208, quantized=2245208, sliding=2245208, ttt=2245208)
    assert (r["artifact_bytes"], r["code_bytes"], r["total_bytes"]) == (15832826, 32993, 15865819)
    assert r["total_eval_s"] == 347.0 and r["peak_mem_mib"] == 66657 and r["train_peak_mem_mib"] == 15514
    assert r["ttt"] == dict(total_docs=2581, ttt_docs=2564, long_docs_sliding=17, prefix_docs=2500, num_phases=3,
                            boundaries=[833, 1666, 2500], batches=41, batches_logged=5, phases_done=3,
                            phases_skipped=0, leftover_docs=17, leftover_past_deadline=False,
                            phases=[dict(phase=1, scored_docs=896, sgd_docs=833),
                                    dict(phase=2, scored_docs=1728, sgd_docs=1666),
                                    dict(phase=3, scored_docs=2560, sgd_docs=2500)])
    assert (r["world_size"], r["val_tokens"], r["model_params"]) == (1, 2245209, 35947159)
    assert r["runtime"] is None and r["errors"] == [] and r["over_cap"] is False and r["runs_in_log"] == 1


def test_synthetic_full_log_with_extra_fields():
    r = parse_train_log(make_log(seed=7, final_loss=2.81, final_bpb=1.0812))
    assert r["code"] == SOURCE  # docstring lines like "device: ..." do not end the source early
    assert r["hyperparameters"]["seed"] == "7" and r["hyperparameters"]["smear_gate"] == "True"
    assert r["train_points"][5]["mfu"] == 41.2 and r["train_points"][5]["eta"] == 123.0  # appended fields
    assert r["val_points"] == {2000: 1.1612} and r["val_losses"] == {2000: 3.01}
    assert (r["final_stage"], r["final_loss"], r["final_bpb"]) == ("ttt", 2.81, 1.0812)
    assert r["sliding_skipped"] is True and r["sliding_bpb"] is None
    assert r["runtime"] == dict(line="torch 2.9.1+cu128 cuda 12.8 gpu NVIDIA H100 80GB HBM3 x 8", torch="2.9.1+cu128",
                                cuda="12.8", gpu="NVIDIA H100 80GB HBM3", gpus=8)
    assert r["gptq_s"] == 8.4 and r["train_plus_gptq_s"] == 596.4
    assert r["eval_stages"] == dict(load=0.7, quantized=2.6, ttt_warmup=41.3, ttt=340.2, leftover=15.0, total=480.0,
                                    ttt_docs=49990, fallback_docs=10)


def test_final_score_falls_back_to_sliding_then_quantized():
    r = parse_train_log(make_log(ttt=False, final_loss=2.9, final_bpb=1.1))
    assert (r["final_stage"], r["final_loss"], r["ttt"], r["ttt_loss"]) == ("sliding", 2.9, None, None)
    r = parse_train_log(make_log(ttt=False, sliding=False, final_loss=2.9, final_bpb=1.1))
    assert r["final_stage"] == "quantized" and r["final_bpb"] == 1.12 and r["eval_stages"] is None


def test_crashed_run_and_stdout_capture():
    r = parse_train_log(make_log(crash=True))
    assert r["errors"] == ["Traceback (most recent call last):", "torch.OutOfMemoryError: CUDA out of memory"]
    assert r["steps"] == 4500 and r["final_bpb"] is None and r["artifact_bytes"] is None and r["ttt"] is None
    assert r["code"] == SOURCE
    stdout = make_log().replace(SOURCE + "\n", "")  # the source goes to the log file only
    r = parse_train_log(stdout)
    assert r["code"] is None and r["code_sha256"] is None and r["final_bpb"] == 1.08 and r["world_size"] == 8
    assert parse_train_log("config error: VOCAB_SIZE=7 is wrong\n")["errors"] == ["config error: VOCAB_SIZE=7 is wrong"]
    empty = parse_train_log("")
    assert empty["hyperparameters"] == {} and empty["train_losses"] == {} and empty["stopped_early"] is False


def test_last_run_of_an_appended_log_is_parsed():
    r = parse_train_log(make_log(seed=1, final_bpb=1.2) + make_log(seed=2, final_bpb=1.1))
    assert r["runs_in_log"] == 2 and r["hyperparameters"]["seed"] == "2" and r["final_bpb"] == 1.1


def test_over_cap_and_bench_lines():
    r = parse_train_log(make_log(artifact_bytes=16_000_000, extra="bench: step_ms 120.1 tok/s 6.5e6\n"))
    assert r["over_cap"] is True and r["total_bytes"] == 16_033_000
    assert r["bench"] == ["bench: step_ms 120.1 tok/s 6.5e6"]
