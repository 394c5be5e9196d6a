"""tools/records.py: synthetic seed logs to a records folder; every refusal; the Welch p-value
against scipy; the loss-curve PNG."""
import json
import math
import statistics
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import records  # noqa: E402
from helpers_logs import SOURCE, make_log  # noqa: E402
from train_log import parse_train_log_file  # noqa: E402

import train_gpt as tg  # noqa: E402

WRAPPER_BYTES = len(tg.build_code_wrapper(SOURCE.encode()))
SEEDS = {42: (2.8010, 1.0850), 0: (2.8030, 1.0858), 1234: (2.8020, 1.0854)}


def write_shard(path, tokens):
    header = np.zeros(256, dtype="<i4")
    header[:3] = 20240520, 1, len(tokens)
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


def docs_stream(docs):
    return np.concatenate([np.array([1] + list(d), dtype=np.uint16) for d in docs])


def make_data(tmp_path, overlap=False):
    data = tmp_path / "fineweb10B_sp8192"  # the runs' data_path names this folder
    data.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    train = [rng.integers(2, 8192, rng.integers(5, 300)) for _ in range(400)]
    val = [rng.integers(2, 8192, rng.integers(5, 300)) for _ in range(50)]
    if overlap:
        val[17] = train[123]  # issue #2127: a val document also in train
    write_shard(data / "fineweb_train_000000.bin", docs_stream(train[:200]))
    write_shard(data / "fineweb_train_000001.bin", docs_stream(train[200:]))
    write_shard(data / "fineweb_val_000000.bin", docs_stream(val))
    return data


def write_logs(tmp_path, **overrides_by_seed):
    paths = []
    for seed, (loss, bpb) in SEEDS.items():
        kw = dict(seed=seed, final_loss=loss, final_bpb=bpb, code_bytes=WRAPPER_BYTES)
        kw.update(overrides_by_seed.get(f"s{seed}", {}))
        if "source" in kw and "code_bytes" not in overrides_by_seed.get(f"s{seed}", {}):
            kw["code_bytes"] = len(tg.build_code_wrapper(kw["source"].encode()))
        p = tmp_path / f"run_s{seed}.txt"
        p.write_text(make_log(**kw))
        paths.append(str(p))
    return paths


def run_tool(tmp_path, logs, *extra, data=True, out="out"):
    args = [str(tmp_path / out), *logs, "--name", "Synthetic", "--date", "2026-12-01",
            "--sota-loss", "2.8150,2.8170,2.8140"]
    if data:
        args += ["--data-path", str(data if data is not True else make_data(tmp_path))]
    return records.main(args + list(extra))


def test_synthetic_runs_write_the_expected_folder(tmp_path, capsys):
    logs = write_logs(tmp_path)
    assert run_tool(tmp_path, logs) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "README.md", "submission.json", "train_gpt.py", "train_gpt_source.py", "requirements.txt", "loss_curves.png",
        "train_seed42.log", "train_seed0.log", "train_seed1234.log"])
    sub = json.loads((out / "submission.json").read_text())
    losses = [v[0] for v in SEEDS.values()]
    assert sub["record"] is True and sub["label"] == "record: every compliance item passes" and sub["failed"] == []
    assert sub["track"] == "10min_16mb" and sub["name"] == "Synthetic" and sub["date"] == "2026-12-01"
    assert sub["val_loss"] == pytest.approx(statistics.fmean(losses), abs=1e-12)
    assert sub["val_loss_std"] == pytest.approx(statistics.stdev(losses), abs=1e-12)
    assert sub["val_bpb"] == pytest.approx(1.0854, abs=1e-12)
    assert sub["bytes_code"] == WRAPPER_BYTES and sub["bytes_total"] == 15_900_000 + WRAPPER_BYTES
    assert [s["seed"] for s in sub["seeds"]] == [42, 0, 1234]
    s42 = sub["seeds"][0]
    assert s42 == dict(seed=42, val_loss=2.801, val_bpb=1.085, final_stage="ttt", prequant_val_bpb=1.097,
                       quantized_val_bpb=1.105, sliding_val_bpb=None, ttt_val_bpb=1.085, artifact_bytes=15_900_000,
                       code_bytes=WRAPPER_BYTES, total_bytes=15_900_000 + WRAPPER_BYTES, steps=4500, step_avg_ms=130.67,
                       train_seconds=588.0, gptq_seconds=8.4, train_plus_gptq_seconds=596.4, eval_seconds=480.0,
                       stopped_early=True, peak_mem_mib=66657)
    assert sub["hardware"] == dict(torch="2.9.1+cu128", cuda="12.8", gpu="NVIDIA H100 80GB HBM3", gpus=8,
                                   runtime_line="torch 2.9.1+cu128 cuda 12.8 gpu NVIDIA H100 80GB HBM3 x 8", device=None)
    sig = sub["significance"]
    assert sig["improvement_nats"] == pytest.approx(2.8153333333 - 2.802, abs=1e-9)
    assert sig["readme_rule"]["passed"] is True and sig["maintainers_rule"]["passed"] is True
    assert all(i["status"] in ("pass", "n/a") for i in sub["compliance"]) and len(sub["compliance"]) == 12
    assert "SmearGate, masked at every sequence start (BOS fix)" in sub["techniques"]
    # The seed logs unchanged; the wrapper is the counted code and unpacks to the logged source.
    for p in logs:
        seed = parse_train_log_file(p)["hyperparameters"]["seed"]
        assert (out / f"train_seed{seed}.log").read_bytes() == Path(p).read_bytes()
    assert records.wrapper_output((out / "train_gpt.py").read_bytes()) == SOURCE.encode()
    assert (out / "train_gpt_source.py").read_text() == SOURCE
    readme = (out / "README.md").read_text()
    assert "**record: every compliance item passes**" in readme
    assert (f"| 42 | 2.80100000 | 1.08500000 | 4500 | 130.67 | 596.4 | 480.0 | 15,900,000 | {WRAPPER_BYTES:,} | "
            f"{15_900_000 + WRAPPER_BYTES:,} |") in readme
    assert "**val_bpb 1.08540000 ± 0.00040000**" in readme
    assert "README rule (>= 0.005 nats at p < 0.01): p = " in readme and "passed" in readme
    assert "NVIDIA H100 80GB HBM3 x 8, torch 2.9.1+cu128, CUDA 12.8" in readme
    assert "| train and val shards disjoint (document hashes) | pass |" in readme
    assert "$" not in readme.replace("$ ", "")  # every template field filled


def refused(tmp_path, capsys, logs, item, **kw):
    assert run_tool(tmp_path, logs, **kw) == 1
    text = capsys.readouterr().out
    assert "refused:" in text and item in text.split("refused:")[1], text
    assert not (tmp_path / "out").exists()
    return text


def test_over_cap_artifact_is_refused(tmp_path, capsys):
    logs = write_logs(tmp_path, s0=dict(artifact_bytes=16_000_000 - WRAPPER_BYTES + 1))
    text = refused(tmp_path, capsys, logs, "artifact <= 16,000,000 bytes")
    assert "OVER" in text


def test_over_time_runs_are_refused(tmp_path, capsys):
    refused(tmp_path, capsys, write_logs(tmp_path, s1234=dict(train_s=591.7)), "training + GPTQ <= 600 s")
    refused(tmp_path, capsys, write_logs(tmp_path, s42=dict(total_eval_s=600.4)), "eval <= 600 s")


def test_mismatches_are_refused(tmp_path, capsys):
    other = SOURCE.replace("A stand-in", "Another stand-in")
    refused(tmp_path, capsys, write_logs(tmp_path, s0=dict(source=other)), "same code in every seed log")
    # code bytes counted raw (#1835): the logged code size is not the wrapper's
    refused(tmp_path, capsys, write_logs(tmp_path, s0=dict(code_bytes=len(SOURCE))),
            "logged byte counts agree with each other and the wrapper")
    log = make_log(seed=42, code_bytes=WRAPPER_BYTES).replace(
        f"Total submission size quantized+brotli: {15_900_000 + WRAPPER_BYTES} bytes",
        f"Total submission size quantized+brotli: {15_800_000 + WRAPPER_BYTES} bytes")
    (tmp_path / "bad.txt").write_text(log)
    refused(tmp_path, capsys, [str(tmp_path / "bad.txt")], "logged byte counts agree")
    refused(tmp_path, capsys, write_logs(tmp_path, s0=dict(seed=42)), "one run per distinct seed")
    refused(tmp_path, capsys, write_logs(tmp_path, s42=dict(crash=True)), "every run finished without errors")


def test_val_train_overlap_is_refused(tmp_path, capsys):
    text = refused(tmp_path, capsys, write_logs(tmp_path), "train and val shards disjoint",
                   data=make_data(tmp_path, overlap=True))
    assert "50 val documents, 400 train documents, 1 shared" in text


def test_missing_bos_mask_is_refused(tmp_path, capsys):
    unmasked = SOURCE.replace("        keep = self.keep_mask(cu_seqlens)  # SmearGate off at every sequence start (BOS fix)\n",
                              "        keep = 1.0  # the BOS fix claimed in a comment only\n").replace("* keep", "")
    assert unmasked != SOURCE
    text = refused(tmp_path, capsys, write_logs(tmp_path, **{f"s{s}": dict(source=unmasked) for s in SEEDS}),
                   "SmearGate BOS masking on")
    assert "with no BOS/sequence-start mask" in text
    off = {f"s{s}": dict(hyper_overrides=dict(smear_bos_mask=False)) for s in SEEDS}  # a switch turned off (#2135)
    refused(tmp_path, capsys, write_logs(tmp_path, **off), "SmearGate BOS masking on")


def test_ttt_counters_and_gptq_source_are_checked(tmp_path, capsys):
    refused(tmp_path, capsys, write_logs(tmp_path, s0=dict(ttt_scored=40_540_000)), "TTT: score before update")
    late = SOURCE.replace("    sums += ce.sum()\n    ce.mean().backward()\n", "    ce.mean().backward()\n    sums += ce.sum()\n")
    assert late != SOURCE
    refused(tmp_path, capsys, write_logs(tmp_path, **{f"s{s}": dict(source=late) for s in SEEDS}), "TTT: score before")
    on_val = SOURCE.replace("collect_hessians(model, h, rt, train_files)", "collect_hessians(model, h, rt, val_files)")
    refused(tmp_path, capsys, write_logs(tmp_path, **{f"s{s}": dict(source=on_val) for s in SEEDS}),
            "GPTQ calibration from train data only")


def test_non_record_folder_is_labelled(tmp_path, capsys):
    logs = write_logs(tmp_path, s0=dict(artifact_bytes=16_100_000))
    assert run_tool(tmp_path, logs, "--non-record", "--track", "proxy", data=False) == 0
    sub = json.loads((tmp_path / "out" / "submission.json").read_text())
    assert sub["record"] is False and sub["label"].endswith("non-record") and sub["label"].startswith("proxy benchmark")
    assert sub["failed"] == ["artifact <= 16,000,000 bytes (code counted as the wrapper)",
                             "train and val shards disjoint (document hashes)"]
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "non-record**: failed or unchecked items: artifact <= 16,000,000 bytes" in readme


def test_no_data_path_cannot_be_a_record(tmp_path, capsys):
    text = refused(tmp_path, capsys, write_logs(tmp_path), "train and val shards disjoint", data=False)
    assert "[not checked] train and val shards disjoint" in text


def test_betainc_and_student_t_match_scipy():
    special, stats = pytest.importorskip("scipy.special"), pytest.importorskip("scipy.stats")
    for a, b, x in [(0.5, 0.5, 0.3), (2.0, 3.0, 0.9), (1.7, 0.5, 0.01), (40.0, 0.5, 0.95), (3.3, 7.1, 0.5)]:
        assert records.betainc(a, b, x) == pytest.approx(special.betainc(a, b, x), rel=1e-10, abs=1e-14)
    for t in (-5.0, -1.2, 0.0, 0.3, 1.96, 4.0, 12.0):
        for df in (1.0, 2.5, 3.7, 30.0, 250.0):
            assert records.student_t_sf(t, df) == pytest.approx(stats.t.sf(t, df), rel=1e-9, abs=1e-15)


def test_welch_p_value_matches_scipy_on_known_numbers():
    stats = pytest.importorskip("scipy.stats")
    ours = [2.8010, 2.8030, 2.8020]
    sota = [2.8100, 2.8120, 2.8090]
    for margin in (0.0, 0.005):
        p, t, dof = records.welch_one_sided(ours, statistics.fmean(sota), statistics.stdev(sota), 3, margin)
        ref = stats.ttest_ind([s - margin for s in sota], ours, equal_var=False, alternative="greater")
        assert p == pytest.approx(ref.pvalue, rel=1e-9) and t == pytest.approx(ref.statistic, rel=1e-12)
    # Known numbers with unequal variances and sizes, and from summary statistics.
    ours, sota = [1.0712, 1.0741, 1.0698, 1.0725], [1.0788, 1.0760, 1.0801]
    p, t, dof = records.welch_one_sided(ours, statistics.fmean(sota), statistics.stdev(sota), 3, 0.0)
    ref = stats.ttest_ind_from_stats(statistics.fmean(sota), statistics.stdev(sota), 3, statistics.fmean(ours),
                                     statistics.stdev(ours), 4, equal_var=False, alternative="greater")
    assert p == pytest.approx(ref.pvalue, rel=1e-9)
    sig = records.significance(ours, (statistics.fmean(sota), statistics.stdev(sota), 3))
    assert sig["maintainers_rule"]["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert sig["maintainers_rule"]["passed"] is True and sig["readme_rule"]["passed"] is False  # < 0.005 nats
    assert math.isfinite(sig["welch_dof"])


def _png_size(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    assert data.rstrip(b"\x00").endswith(b"IEND\xaeB`\x82")
    return w, h


def test_plot_is_a_png_with_one_series_per_seed(tmp_path, monkeypatch):
    paths = write_logs(tmp_path)
    runs = [(Path(p).name, parse_train_log_file(p)) for p in paths]
    series = records.write_plot(runs, tmp_path / "curves.png", "t")
    for panel in ("train_loss", "val_bpb"):
        assert sorted(series[panel]) == ["seed 0", "seed 1234", "seed 42"]
    assert series["val_bpb"]["seed 42"] == [(2000, 1.165), (4500, 1.097), (4500, 1.105), (4500, 1.085)]
    w, h = _png_size((tmp_path / "curves.png").read_bytes())
    assert w > 400 and h > 200
    pytest.importorskip("matplotlib")
    from matplotlib import image
    img = image.imread(tmp_path / "curves.png")
    pixels = img[..., :3].reshape(-1, 3)
    for c in records.COLORS[:3]:  # matplotlib's first three cycle colours: one line per seed
        assert (np.abs(pixels - np.array(c) / 255).max(1) < 0.01).sum() > 50
    # Without matplotlib: the raster fallback, one colour per seed.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    records.write_plot(runs, tmp_path / "raster.png")
    raw = (tmp_path / "raster.png").read_bytes()
    w, h = _png_size(raw)
    idat = raw[raw.index(b"IDAT") + 4:raw.index(b"IEND") - 8]
    pixels = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 3 * w)[:, 1:].reshape(h, w, 3)
    present = {tuple(p) for p in pixels.reshape(-1, 3)}
    assert all(c in present for c in records.COLORS[:3]) and records.COLORS[3] not in present


def test_doc_hashes_find_equal_documents_anywhere():
    a = docs_stream([[5, 6, 7], [8, 9], [5, 6, 7, 8]])
    b = np.concatenate([[3, 3], docs_stream([[8, 9], [9, 8], [5, 6, 7]])])  # a stream that starts mid-document
    ha, sa, la = records.doc_hashes(a)
    hb, sb, lb = records.doc_hashes(b, chunk=3)
    assert list(la) == [4, 3, 5] and list(lb) == [2, 3, 3, 4] and list(sb) == [0, 2, 5, 8]
    assert set(ha.tolist()) & set(hb.tolist()) == {int(ha[0]), int(ha[1])}
