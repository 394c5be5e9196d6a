"""From the logs of finished train_gpt.py runs (one per seed) to a complete, self-checked records
folder (issue 14): submission.json, README.md, the counted code wrapper (train_gpt.py), the readable
source, requirements.txt, loss_curves.png and the seed logs copied unchanged.

    python3 tools/records.py OUT_DIR LOG [LOG...] --name NAME [--sota-loss a,b,c | --sota-mean M
        --sota-std S --sota-n N] [--data-path SHARDS_DIR] [--non-record] [--track 10min_16mb|proxy]

Every compliance item is checked with its evidence line from the logs (see check_runs). A folder
that fails any item, or that could not be checked (no --data-path), is refused (exit 1, nothing
written) unless --non-record, which writes it labelled as a non-record submission.
Significance: a one-sided Welch t-test of our per-seed val_loss (nats) against the SOTA's, both
for the README's rule (improvement >= 0.005 nats at p < 0.01) and the maintainers' chronological
practice (any improvement at p < 0.25, openai/parameter-golf#1902)."""
import argparse
import ast
import datetime
import json
import math
import os
import re
import shutil
import statistics
import string
import subprocess
import sys
import tempfile

import numpy as np

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
sys.path.insert(0, TOOLS)
sys.path.insert(0, REPO)
from train_log import parse_train_log_file  # noqa: E402

CAP_BYTES = 16_000_000
TRAIN_CAP_S = 600.0
EVAL_CAP_S = 600.0
README_MARGIN_NATS, README_ALPHA = 0.005, 0.01
MAINTAINERS_ALPHA = 0.25
TEMPLATE = os.path.join(TOOLS, "records_README.template.md")


# ---------------------------------------------------------------------------------------
# Statistics: one-sided Welch t-test without scipy
# ---------------------------------------------------------------------------------------


def _betacf(a, b, x):
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a, b, x):
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def student_t_sf(t, df):
    """P(T > t) for Student's t with df degrees of freedom (df may be fractional)."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t > 0 else 1.0 - tail


def welch_one_sided(ours, sota_mean, sota_std, sota_n, margin=0.0):
    """p-value of H0: sota_mean - mean(ours) <= margin (lower loss is better), Welch's t and dof."""
    n, mean = len(ours), statistics.fmean(ours)
    var = statistics.variance(ours) if n > 1 else 0.0
    se2 = var / n + sota_std ** 2 / sota_n
    diff = sota_mean - mean - margin
    if se2 == 0.0:
        return (0.0 if diff > 0 else 1.0), math.copysign(math.inf, diff) if diff else 0.0, math.nan
    parts = [(var / n) ** 2 / (n - 1) if n > 1 else 0.0, (sota_std ** 2 / sota_n) ** 2 / (sota_n - 1) if sota_n > 1 else 0.0]
    dof = se2 ** 2 / sum(parts) if sum(parts) > 0 else math.inf
    t = diff / math.sqrt(se2)
    p = student_t_sf(t, dof) if math.isfinite(dof) else 0.5 * math.erfc(t / math.sqrt(2.0))
    return p, t, dof


def significance(losses, sota):
    """Both acceptance rules for our per-seed val_loss against sota = (mean, std, n) or None."""
    if sota is None:
        return None
    mean, std, n = sota
    improvement = mean - statistics.fmean(losses)
    p_readme, t_readme, dof = welch_one_sided(losses, mean, std, n, README_MARGIN_NATS)
    p_any, t_any, _ = welch_one_sided(losses, mean, std, n, 0.0)
    return dict(
        sota_mean_loss=mean, sota_std_loss=std, sota_n=n, improvement_nats=improvement, welch_dof=dof,
        readme_rule=dict(margin_nats=README_MARGIN_NATS, alpha=README_ALPHA, t=t_readme, p_value=p_readme,
                         passed=bool(improvement >= README_MARGIN_NATS and p_readme < README_ALPHA)),
        maintainers_rule=dict(margin_nats=0.0, alpha=MAINTAINERS_ALPHA, t=t_any, p_value=p_any,
                              passed=bool(improvement > 0 and p_any < MAINTAINERS_ALPHA), source="openai/parameter-golf#1902"))


# ---------------------------------------------------------------------------------------
# Train/val disjointness: hash every document (split at BOS) of both splits
# ---------------------------------------------------------------------------------------

SHARD_HEADER_WORDS, SHARD_MAGIC, SHARD_VERSION, BOS_ID = 256, 20240520, 1, 1
_M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9)


def read_shard(path):
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_WORDS)
    if len(header) < 3 or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: not a challenge shard (magic/version)")
    n = int(header[2])
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=4 * SHARD_HEADER_WORDS, shape=(n,))
    return tokens


def doc_hashes(tokens, chunk=1 << 24):
    """(64-bit hash, start, length) of every document of a token stream (a document runs from a
    BOS to the next; tokens before the first BOS form one too). Vectorized: each token is mixed
    with its position in its document (splitmix64) and the mixes are summed per document;
    candidate matches are confirmed on the tokens themselves."""
    n = len(tokens)
    starts = np.flatnonzero(np.asarray(tokens) == BOS_ID)
    if n and (len(starts) == 0 or starts[0] != 0):
        starts = np.concatenate([[0], starts])
    out_h, out_s, out_l = [], [], []
    i = 0
    while i < len(starts):  # documents in groups of about `chunk` tokens
        j = int(np.searchsorted(starts, starts[i] + chunk, side="right"))
        j = max(j, i + 1)
        s = starts[i:j]
        end = starts[j] if j < len(starts) else n
        lengths = np.diff(np.append(s, end))
        seg = np.asarray(tokens[s[0]:end], dtype=np.uint64)
        pos = np.arange(len(seg), dtype=np.uint64) - np.repeat((s - s[0]).astype(np.uint64), lengths)
        with np.errstate(over="ignore"):
            x = seg * _M1 + pos * _M2 + np.uint64(0x94D049BB133111EB)
            x ^= x >> np.uint64(30)
            x *= _M2
            x ^= x >> np.uint64(27)
            x *= _M1
            x ^= x >> np.uint64(31)
            h = np.add.reduceat(x, (s - s[0]).astype(np.int64)) + lengths.astype(np.uint64) * _M1
        out_h.append(h)
        out_s.append(s)
        out_l.append(lengths)
        i = j
    if not out_h:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_h), np.concatenate(out_s), np.concatenate(out_l)


def shard_paths(data_path, split):
    names = sorted(f for f in os.listdir(data_path) if f.startswith(f"fineweb_{split}_") and f.endswith(".bin")
                   and "_bytes_" not in f)
    return [os.path.join(data_path, f) for f in names]


def shared_documents(data_path, max_examples=5):
    """Documents of the val shards that also occur in a train shard: (n_val_docs, n_train_docs,
    shared count, examples [(val shard, train shard, doc tokens)])."""
    val_files, train_files = shard_paths(data_path, "val"), shard_paths(data_path, "train")
    if not val_files or not train_files:
        raise FileNotFoundError(f"{data_path}: needs fineweb_val_*.bin and fineweb_train_*.bin shards")
    val_docs = {}  # hash -> (file, start, length)
    for f in val_files:
        tokens = read_shard(f)
        for h, s, n in zip(*doc_hashes(tokens)):
            val_docs.setdefault(int(h), (f, int(s), int(n)))
    keys = np.fromiter(val_docs, dtype=np.uint64, count=len(val_docs))
    shared, examples, n_train = set(), [], 0
    for f in train_files:
        tokens = read_shard(f)
        h, s, n = doc_hashes(tokens)
        n_train += len(h)
        for k in np.flatnonzero(np.isin(h, keys)):
            vf, vs, vn = val_docs[int(h[k])]
            a = np.asarray(read_shard(vf)[vs:vs + vn])
            b = np.asarray(tokens[s[k]:s[k] + n[k]])
            if np.array_equal(a, b):  # not a hash collision
                shared.add(int(h[k]))
                if len(examples) < max_examples:
                    examples.append((os.path.basename(vf), os.path.basename(f), int(vn)))
    return len(val_docs), n_train, len(shared), examples


# ---------------------------------------------------------------------------------------
# The code wrapper (the counted code) and the checks of a run's own source
# ---------------------------------------------------------------------------------------


def code_wrapper(source: str) -> bytes:
    import train_gpt

    return train_gpt.build_code_wrapper(source.encode("utf-8"))


def wrapper_output(wrapper: bytes) -> bytes:
    """Run the wrapper's stub in a fresh interpreter, with runpy.run_path replaced by a print of
    the file it would run: the bytes that the wrapper would execute."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "train_gpt.py")
        with open(path, "wb") as f:
            f.write(wrapper)
        probe = ("import runpy,sys\n"
                 "runpy.run_path=lambda p,run_name=None:sys.stdout.buffer.write(open(p,'rb').read())\n"
                 f"exec(compile(open({path!r},'rb').read(),{path!r},'exec'))\n")
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"the code wrapper failed to run: {r.stderr.decode(errors='replace')[-500:]}")
        return r.stdout


def _functions(tree):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _lines_with(node, source_lines, pattern):
    """(line number, code) of the lines of a function, its def line and comments left out, that match."""
    out = []
    for i in range(node.body[0].lineno, node.end_lineno + 1):
        code = source_lines[i - 1].split("#", 1)[0]
        if re.search(pattern, code):
            out.append((i, code.strip()))
    return out


SMEAR_APPLY, SMEAR_MASK = r"smear_lambda\s*\*", r"cu_seqlens|BOS_ID|\bbos"


def source_smear_bos(source):
    """(ok, evidence): every function applying the SmearGate (`smear_lambda *`) masks it at
    sequence starts: its code (not comments, not its def line) reads cu_seqlens or a BOS id."""
    tree, lines = ast.parse(source), source.splitlines()
    users = [f for f in _functions(tree) if _lines_with(f, lines, SMEAR_APPLY)]
    if not users:
        return False, "the source applies no SmearGate (no `smear_lambda *` line)"
    evidence = []
    for f in users:
        apply = _lines_with(f, lines, SMEAR_APPLY)[0]
        mask = [m for m in _lines_with(f, lines, SMEAR_MASK) if not re.search(SMEAR_APPLY, m[1])]
        if not mask:
            return False, f"source line {apply[0]} applies the SmearGate in {f.name}() with no BOS/sequence-start mask"
        evidence.append(f"{f.name}(): line {mask[-1][0]} `{mask[-1][1][:80]}` masks line {apply[0]} `{apply[1][:80]}`")
    return True, "source " + "; ".join(evidence)


def source_gptq_calibration(source):
    """(ok, evidence): every Hessian collection call is fed the train shards, none the val set."""
    tree, lines = ast.parse(source), source.splitlines()
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and n.func.id == "collect_hessians"]
    if not calls:
        return False, "no collect_hessians(...) call in the source"
    for c in calls:
        args = " ".join(ast.unparse(a) for a in c.args + [k.value for k in c.keywords])
        if "train" not in args or re.search(r"\bval", args):
            return False, f"source line {c.lineno}: `{lines[c.lineno - 1].strip()}` (not the train shards)"
    c = calls[0]
    return True, f"source line {c.lineno}: `{lines[c.lineno - 1].strip()}`"


def source_ttt_score_first(source):
    """(ok, evidence): in every function that both scores (`sums +=`) and updates (`.backward(`),
    the scoring comes first."""
    tree, lines = ast.parse(source), source.splitlines()
    found = []
    for f in _functions(tree):
        score, update = _lines_with(f, lines, r"\bsums\s*\+="), _lines_with(f, lines, r"\.backward\(")
        if score and update:
            if update[0][0] < score[0][0]:
                return False, f"source {f.name}(): backward at line {update[0][0]} before scoring at line {score[0][0]}"
            found.append(f"{f.name}(): scored at line {score[0][0]}, backward at line {update[0][0]}")
    if not found:
        return False, "no TTT function that scores (`sums +=`) and updates (`.backward(`) in the source"
    return True, "source " + "; ".join(found)


# ---------------------------------------------------------------------------------------
# Compliance
# ---------------------------------------------------------------------------------------

PASS, FAIL, NOT_CHECKED, NA = "pass", "FAIL", "not checked", "n/a"


def items_failed(items):
    return [i for i in items if i["status"] in (FAIL, NOT_CHECKED)]


def _item(name, status, evidence):
    return dict(item=name, status=status, evidence=evidence)


def _truthy(v):
    return str(v).strip().lower() in ("true", "1", "yes", "on")


def check_runs(runs, wrapper, data_path=None):
    """Compliance items, each {item, status, evidence}. runs: [(log name, parsed log)]."""
    items = []
    first = runs[0][1]

    bad = [(n, r["errors"] or ["no final score line"]) for n, r in runs if r["errors"] or r["final_loss"] is None]
    items.append(_item("every run finished without errors", FAIL if bad else PASS,
                       "; ".join(f"{n}: {e[0]}" for n, e in bad) if bad else
                       "; ".join(f"{n}: {r['final_stage']} val_loss:{r['final_loss']}" for n, r in runs)))

    seeds = [r["hyperparameters"].get("seed") for _, r in runs]
    items.append(_item("one run per distinct seed", FAIL if len(set(seeds)) != len(seeds) or None in seeds else PASS,
                       "seeds " + ", ".join(str(s) for s in seeds)))

    shas = {n: r["code_sha256"] for n, r in runs}
    same = None not in shas.values() and len(set(shas.values())) == 1
    items.append(_item("same code in every seed log", PASS if same else FAIL,
                       f"embedded source sha256 {first['code_sha256']}" if same else
                       "; ".join(f"{n}: {s or 'no embedded source (a stdout capture?)'}" for n, s in shas.items())))

    if wrapper is None:
        items.append(_item("code wrapper runs and reproduces the source", NOT_CHECKED, "no embedded source"))
    else:
        ok = wrapper_output(wrapper) == first["code"].encode("utf-8")
        items.append(_item("code wrapper runs and reproduces the source", PASS if ok else FAIL,
                           f"train_gpt.py wrapper: {len(wrapper)} bytes, unpacks to the {first['code_bytes_raw']}-byte source"
                           if ok else "the wrapper's output differs from the embedded source"))

    ev, status = [], PASS
    for n, r in runs:
        logged = (r["artifact_bytes"], r["code_bytes"], r["total_bytes"])
        if None in logged:
            status = FAIL
            ev.append(f"{n}: missing `Serialized model`/`Code size (compressed)`/`Total submission size` line")
            continue
        problems = []
        if r["artifact_bytes"] + r["code_bytes"] != r["total_bytes"]:
            problems.append(f"logged total {r['total_bytes']} != {r['artifact_bytes']} + {r['code_bytes']}")
        if wrapper is not None and r["code_bytes"] != len(wrapper):
            problems.append(f"logged code {r['code_bytes']} bytes != the wrapper's {len(wrapper)}")
        if r["code_bytes_uncompressed"] is not None and r["code_bytes_raw"] is not None \
                and r["code_bytes_uncompressed"] != r["code_bytes_raw"]:
            problems.append(f"logged source size {r['code_bytes_uncompressed']} != embedded {r['code_bytes_raw']}")
        status = FAIL if problems else status
        ev.append(f"{n}: " + ("; ".join(problems) if problems else f"`Total submission size ...: {r['total_bytes']} bytes`"
                              f" = {r['artifact_bytes']} + {r['code_bytes']}"))
    items.append(_item("logged byte counts agree with each other and the wrapper", status, "; ".join(ev)))

    ev, status = [], PASS
    for n, r in runs:
        if r["artifact_bytes"] is None:
            status = FAIL
            ev.append(f"{n}: no `Serialized model` line")
            continue
        code = len(wrapper) if wrapper is not None else r["code_bytes"]
        total = r["artifact_bytes"] + (code or 0)
        if code is None or total > CAP_BYTES or r["over_cap"]:
            status = FAIL
        ev.append(f"{n}: {r['artifact_bytes']} + {code} = {total} bytes" + (" OVER" if total > CAP_BYTES else ""))
    items.append(_item(f"artifact <= {CAP_BYTES:,} bytes (code counted as the wrapper)", status, "; ".join(ev)))

    for label, key, cap, line in (("training + GPTQ", "train_plus_gptq_s", TRAIN_CAP_S,
                                   lambda r, t: f"training + GPTQ = {t}s (cap {r['train_cap_s']}s)"),
                                  ("eval", "total_eval_s", EVAL_CAP_S, lambda r, t: f"total_eval_time:{t}s")):
        over = [r[key] is None or r[key] > cap for _, r in runs]
        ev = [f"{n}: `{line(r, r[key])}`" + (" OVER" if r[key] and r[key] > cap else "") for n, r in runs]
        items.append(_item(f"{label} <= {cap:.0f} s", FAIL if any(over) else PASS, "; ".join(ev)))

    # GPTQ calibration: an explicit log line if the run has one, else the run's own source.
    explicit = [r["gptq_calibration"] for _, r in runs if r["gptq_calibration"]]
    if len(explicit) == len(runs):
        ok = all("train" in e and not re.search(r"\bval", e) for e in explicit)
        items.append(_item("GPTQ calibration from train data only", PASS if ok else FAIL, f"`{explicit[0]}`"))
    elif first["code"] is None:
        items.append(_item("GPTQ calibration from train data only", NOT_CHECKED, "no embedded source, no gptq:calibration line"))
    else:
        ok, why = source_gptq_calibration(first["code"])
        items.append(_item("GPTQ calibration from train data only", PASS if ok else FAIL,
                           f"{why}; data_path: {first['hyperparameters'].get('data_path')}; "
                           f"gptq_calibration_tokens: {first['hyperparameters'].get('gptq_calibration_tokens')}"))

    hp = first["hyperparameters"]
    off = {k: v for k, v in hp.items() if "bos" in k.lower() and not _truthy(v)}
    if not _truthy(hp.get("smear_gate", "False")):
        items.append(_item("SmearGate BOS masking on", NA, f"smear_gate: {hp.get('smear_gate')} (no SmearGate)"))
    elif off:
        items.append(_item("SmearGate BOS masking on", FAIL, "; ".join(f"{k}: {v}" for k, v in off.items())))
    elif first["code"] is None:
        items.append(_item("SmearGate BOS masking on", NOT_CHECKED, "smear_gate: True, no embedded source"))
    else:
        ok, why = source_smear_bos(first["code"])
        items.append(_item("SmearGate BOS masking on", PASS if ok else FAIL, f"smear_gate: True; {why}"))

    ttt_runs = [(n, r) for n, r in runs if r["ttt"] is not None or r["ttt_loss"] is not None]
    if not ttt_runs:
        items.append(_item("TTT: score before update, every target once", NA, "no TTT stage in the logs"))
    else:
        ev, status = [], PASS
        for n, r in ttt_runs:
            t, targets = r["ttt"], r["scored_targets"]
            expected = r["val_tokens"] - 1 if r["val_tokens"] else targets.get("quantized")
            problems = []
            if t is None:
                problems.append("no ttt_phased counters line")
            else:
                if t["ttt_docs"] + t["long_docs_sliding"] != t["total_docs"]:
                    problems.append(f"ttt_docs {t['ttt_docs']} + long_docs_sliding {t['long_docs_sliding']} != "
                                    f"total_docs {t['total_docs']}")
                early = [p for p in t["phases"] if p["sgd_docs"] > p["scored_docs"]]
                if early:
                    problems.append(f"phase {early[0]['phase']}: global SGD on {early[0]['sgd_docs']} docs with only "
                                    f"{early[0]['scored_docs']} scored")
            if targets.get("ttt") is None or targets.get("ttt") != expected:
                problems.append(f"TTT scored_targets {targets.get('ttt')} != {expected} val targets")
            status = FAIL if problems else status
            ev.append(f"{n}: " + ("; ".join(problems) if problems else
                                  f"scored_targets:{targets['ttt']} = val targets; phases (scored docs >= SGD docs): "
                                  + ", ".join(f"{p['scored_docs']}>={p['sgd_docs']}" for p in t["phases"])))
        if first["code"] is not None:
            ok, why = source_ttt_score_first(first["code"])
            status = status if ok else FAIL
            ev.append(why)
        else:
            status = FAIL if status == FAIL else NOT_CHECKED
        items.append(_item("TTT: score before update, every target once", status, "; ".join(ev)))

    if data_path is None:
        items.append(_item("train and val shards disjoint (document hashes)", NOT_CHECKED,
                           "no --data-path given: the shards were not hashed"))
    else:
        logged = hp.get("data_path", "")
        n_val, n_train, n_shared, examples = shared_documents(data_path)
        same_set = os.path.basename(os.path.normpath(logged)) == os.path.basename(os.path.normpath(data_path))
        ev = (f"{data_path} (the runs' data_path: {logged}): {n_val} val documents, {n_train} train documents, "
              f"{n_shared} shared")
        if examples:
            ev += "; e.g. " + ", ".join(f"a {k}-token document in {v} and {t}" for v, t, k in examples)
        if not same_set:
            ev += "; the folder name differs from the runs' data_path"
        items.append(_item("train and val shards disjoint (document hashes)", PASS if n_shared == 0 and same_set else FAIL, ev))
    return items


# ---------------------------------------------------------------------------------------
# Techniques, from the run's hyperparameters
# ---------------------------------------------------------------------------------------


def techniques(hp):
    g = hp.get
    on = lambda k: _truthy(g(k, "False"))  # noqa: E731
    out = []
    if g("num_layers") and g("model_dim"):
        out.append(f"{g('num_layers')} layers x {g('model_dim')} dim, {g('num_heads', '?')} heads "
                   f"({g('num_kv_heads', '?')} KV), MLP {g('mlp_mult', '?')}x ({g('mlp_act', 'relu^2')}), "
                   f"vocab {g('vocab_size', '?')}")
    if g("num_loops") not in (None, "0"):
        out.append(f"layers {g('loop_start')}-{g('loop_end')} looped {int(g('num_loops')) + 1}x from "
                   f"{float(g('enable_looping_at', 0)):.0%} of training" + (", Parcae constrained injection" if on("parcae") else ""))
    if g("global_attn_layers"):
        out.append(f"global attention on layers {g('global_attn_layers')}, local windows "
                   f"{g('local_window_size_early')}/{g('local_window_size_late')} (split at layer {g('local_window_split')})")
    if g("xsa_last_n") not in (None, "0"):
        out.append(f"XSA on the last {g('xsa_last_n')} layers")
    if g("parallel_start_layer") is not None and g("parallel_start_layer") != g("num_layers"):
        out.append(f"two-lane parallel residuals from layer {g('parallel_start_layer')}")
    if on("smear_gate"):
        out.append("SmearGate, masked at every sequence start (BOS fix)")
    if g("attn_gate") not in (None, "none", "off", "False", ""):
        out.append(f"attention gate: {g('attn_gate')}")
    if on("caseops_enabled"):
        out.append("CaseOps tokenization (byte sidecar accounting)")
    if g("matrix_lr"):
        out.append(f"Muon (lr {g('matrix_lr')}, wd {g('muon_wd')}), EMA {g('ema_decay')}, warmdown {g('warmdown_frac')}")
    if g("matrix_bits"):
        q = f"GPTQ int{g('matrix_bits')} matrices, int{g('embed_bits')} embeddings, brotli"
        if on("lqer_enabled"):
            q += f"; LQER rank {g('lqer_rank')} on the top {g('lqer_top_k')} tensors"
        out.append(q)
    if on("sliding_eval"):
        out.append(f"sliding-window eval, stride {g('eval_stride')}")
    if on("ttt_enabled"):
        out.append(f"phased LoRA TTT (rank {g('ttt_lora_rank')}, {g('phased_ttt_num_phases')} phases over "
                   f"{g('phased_ttt_prefix_docs')} documents)")
    return out


# ---------------------------------------------------------------------------------------
# The loss-curve plot
# ---------------------------------------------------------------------------------------

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def plot_series(runs):
    """{panel: {label: [(step, value)]}}: train loss and val_bpb (in-training points, then the
    eval stages at the last step), one series per seed in each panel."""
    panels = {"train_loss": {}, "val_bpb": {}}
    for _, r in runs:
        label = f"seed {r['hyperparameters'].get('seed')}"
        panels["train_loss"][label] = sorted(r["train_losses"].items())
        val = sorted(r["val_points"].items())
        last = r["steps"] or (val[-1][0] if val else 0)
        val += [(last, r["stages"][s]["bpb"]) for s in ("prequant", "quantized", "sliding", "ttt") if s in r["stages"]]
        panels["val_bpb"][label] = val
    return panels


def _png(pixels):
    import struct
    import zlib

    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _raster_plot(panels, path):
    """Without matplotlib: the same panels as polylines on a plain canvas (no text)."""
    w, h = 900, 360
    img = np.full((h, w, 3), 255, np.uint8)
    for pi, series in enumerate(panels.values()):
        x0, x1, y0, y1 = 20 + pi * w // 2, (pi + 1) * w // 2 - 20, 20, h - 20
        img[y1, x0:x1] = img[y0:y1, x0] = 0
        pts = [p for s in series.values() for p in s if math.isfinite(p[1])]
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        sx, sy = max(max(xs) - min(xs), 1), max(max(ys) - min(ys), 1e-9)
        for si, s in enumerate(series.values()):
            c = COLORS[si % len(COLORS)]
            q = [(x0 + (x - min(xs)) / sx * (x1 - x0 - 1), y1 - (y - min(ys)) / sy * (y1 - y0 - 1)) for x, y in s]
            for (ax, ay), (bx, by) in zip(q, q[1:] or q):
                for t in np.linspace(0, 1, int(max(abs(bx - ax), abs(by - ay))) + 2):
                    img[int(round(ay + t * (by - ay))), int(round(ax + t * (bx - ax)))] = c
    with open(path, "wb") as f:
        f.write(_png(img))


def write_plot(runs, path, title=""):
    """loss_curves.png; returns the plotted series ({panel: {label: points}})."""
    panels = plot_series(runs)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _raster_plot(panels, path)
        return panels
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (name, series) in zip(axes, panels.items()):
        for label, pts in series.items():
            if pts:
                style = dict(marker="o", linestyle="none") if name == "val_bpb" else {}  # stages share a step
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[1].set_title("val_bpb (points at the last step: pre-quant, quantized, sliding, TTT)", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return panels


# ---------------------------------------------------------------------------------------
# The folder
# ---------------------------------------------------------------------------------------


def _std(values):
    return statistics.stdev(values) if len(values) > 1 else 0.0


def hardware(runs):
    rts = [r["runtime"] for _, r in runs]
    if any(rt is None for rt in rts):
        devices = {f"{r['device']} x {r['world_size']}" for _, r in runs if r["device"]}
        return dict(torch="unknown", cuda="unknown", gpu="unknown", gpus=runs[0][1]["world_size"],
                    runtime_line=None, device=", ".join(sorted(devices)) or "unknown")
    rt = rts[0]
    return dict(torch=rt["torch"] or "unknown", cuda=rt["cuda"] or "unknown", gpu=rt["gpu"] or "unknown",
                gpus=rt["gpus"], runtime_line=rt["line"], device=None)


def per_seed(r, wrapper_bytes):
    return dict(seed=_intish(r["hyperparameters"].get("seed")), val_loss=r["final_loss"], val_bpb=r["final_bpb"],
                final_stage=r["final_stage"], prequant_val_bpb=r["prequant_bpb"], quantized_val_bpb=r["quantized_bpb"],
                sliding_val_bpb=r["sliding_bpb"], ttt_val_bpb=r["ttt_bpb"], artifact_bytes=r["artifact_bytes"],
                code_bytes=wrapper_bytes, total_bytes=(r["artifact_bytes"] or 0) + wrapper_bytes,
                steps=r["steps"], step_avg_ms=r["step_avg_ms"], train_seconds=r["train_s"],
                gptq_seconds=r["gptq_s"], train_plus_gptq_seconds=r["train_plus_gptq_s"],
                eval_seconds=r["total_eval_s"], stopped_early=r["stopped_early"], peak_mem_mib=r["peak_mem_mib"])


def _intish(v):
    try:
        return int(v)
    except (TypeError, ValueError):
        return v


def build_submission(args, runs, wrapper, items, sig, record):
    seeds = [per_seed(r, len(wrapper)) for _, r in runs]
    losses, bpbs = [s["val_loss"] for s in seeds], [s["val_bpb"] for s in seeds]
    first = runs[0][1]
    if args.track == "proxy":
        label = "proxy benchmark (proxy corpus, not FineWeb; not a leaderboard submission), " + (
            "every compliance item passes" if not items_failed(items) else "non-record")
    else:
        label = "record: every compliance item passes" if record else "non-record"
    cap = first["train_cap_s"]
    note = args.note or ""
    if cap is not None and cap < TRAIN_CAP_S:
        note = (note + " " if note else "") + f"Shorter training budget: {cap:.0f} s of training + GPTQ (cap {TRAIN_CAP_S:.0f} s)."
    return dict(
        track=args.track, name=args.name, label=label, record=record, blurb=args.blurb or "; ".join(techniques(first["hyperparameters"])),
        author=args.author, github_id=args.github_id, date=args.date,
        val_loss=statistics.fmean(losses), val_loss_std=_std(losses), val_bpb=statistics.fmean(bpbs), val_bpb_std=_std(bpbs),
        bytes_total=max(s["total_bytes"] for s in seeds), bytes_code=len(wrapper), n_seeds=len(seeds),
        seeds=seeds, means=dict((k, statistics.fmean([s[k] for s in seeds if s[k] is not None]))
                                for k in ("steps", "step_avg_ms", "train_seconds", "train_plus_gptq_seconds", "eval_seconds")
                                if all(s[k] is not None for s in seeds)),
        hardware=hardware(runs), code_sha256=first["code_sha256"], significance=sig,
        compliance=items, failed=[i["item"] for i in items_failed(items)],
        techniques=techniques(first["hyperparameters"]), note=note or None,
        generated_by="tools/records.py")


def render_readme(sub, files, command):
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)
    rows = "\n".join(
        f"| {s['seed']} | {fmt(s['val_loss'], '.8f')} | {fmt(s['val_bpb'], '.8f')} | {fmt(s['steps'], 'd')} | "
        f"{fmt(s['step_avg_ms'], '.2f')} | {fmt(s['train_plus_gptq_seconds'], '.1f')} | {fmt(s['eval_seconds'], '.1f')} | "
        f"{fmt(s['artifact_bytes'], ',')} | {s['code_bytes']:,} | {s['total_bytes']:,} |" for s in sub["seeds"])
    sig = sub["significance"]
    if sig is None:
        sig_text = "No SOTA given: no significance test."
    else:
        r, m = sig["readme_rule"], sig["maintainers_rule"]
        sig_text = (f"Against the SOTA's val_loss {sig['sota_mean_loss']:.8f} ± {sig['sota_std_loss']:.8f} "
                    f"(n={sig['sota_n']}): improvement {sig['improvement_nats']:+.5f} nats, one-sided Welch t-test "
                    f"(dof {sig['welch_dof']:.2f}):\n\n"
                    f"- README rule (>= {r['margin_nats']} nats at p < {r['alpha']}): p = {r['p_value']:.4g}, "
                    f"{'passed' if r['passed'] else 'not passed'}\n"
                    f"- maintainers' chronological practice (any improvement at p < {m['alpha']}, {m['source']}): "
                    f"p = {m['p_value']:.4g}, {'passed' if m['passed'] else 'not passed'}")
    hw = sub["hardware"]
    hw_text = (f"{hw['gpu']} x {hw['gpus']}, torch {hw['torch']}, CUDA {hw['cuda']}" if hw["runtime_line"]
               else f"unknown (no `runtime:` line in the logs; device {hw['device']})")
    label = f"**{sub['label']}**"
    if sub["failed"]:
        label += ": failed or unchecked items: " + "; ".join(sub["failed"])
    if sub["note"]:
        label += f"\n\n{sub['note']}"
    with open(TEMPLATE, encoding="utf-8") as f:
        template = string.Template(f.read())
    return template.substitute(
        title=f"{sub['name']} ({sub['date']})", label=label, mean_bpb=f"{sub['val_bpb']:.8f}",
        std_bpb=f"{sub['val_bpb_std']:.8f}", mean_loss=f"{sub['val_loss']:.8f}", std_loss=f"{sub['val_loss_std']:.8f}",
        n_seeds=sub["n_seeds"], final_stage=sub["seeds"][0]["final_stage"], results_rows=rows, significance=sig_text,
        techniques="\n".join(f"- {t}" for t in sub["techniques"]),
        compliance_rows="\n".join(f"| {i['item']} | {i['status']} | {i['evidence'].replace('|', '/')} |"
                                  for i in sub["compliance"]),
        hardware=hw_text, code_bytes=f"{sub['bytes_code']:,}", code_sha=sub["code_sha256"], command=command,
        files=", ".join(f"`{f}`" for f in files))


def sota_from_args(args, ap):
    if args.sota_loss:
        values = [float(v) for v in args.sota_loss.split(",") if v.strip()]
        if len(values) < 2:
            ap.error("--sota-loss needs at least 2 per-seed values (or use --sota-mean/--sota-std/--sota-n)")
        return statistics.fmean(values), statistics.stdev(values), len(values)
    if args.sota_mean is not None:
        if args.sota_std is None or args.sota_n is None:
            ap.error("--sota-mean needs --sota-std and --sota-n")
        return args.sota_mean, args.sota_std, args.sota_n
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("logs", nargs="+", help="one train_gpt.py log file (logs/RUN_ID.txt) per seed")
    ap.add_argument("--name", required=True)
    ap.add_argument("--track", default="10min_16mb", choices=["10min_16mb", "proxy"])
    ap.add_argument("--sota-loss", help="the SOTA's per-seed val_loss values (nats), comma-separated")
    ap.add_argument("--sota-mean", type=float)
    ap.add_argument("--sota-std", type=float)
    ap.add_argument("--sota-n", type=int)
    ap.add_argument("--data-path", help="the shards directory, to hash train and val documents")
    ap.add_argument("--non-record", action="store_true", help="write the folder even if items fail, labelled non-record")
    ap.add_argument("--author")
    ap.add_argument("--github-id")
    ap.add_argument("--blurb")
    ap.add_argument("--note")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--requirements", default=os.path.join(REPO, "requirements.txt"))
    ap.add_argument("--top-level", help="also write submission.json here (e.g. the repo's submission.json)")
    ap.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    args = ap.parse_args(argv)
    sota = sota_from_args(args, ap)

    runs = [(os.path.basename(p), parse_train_log_file(p)) for p in args.logs]
    first = runs[0][1]
    if first["code"] is None:
        print(f"error: {args.logs[0]} embeds no source: give the log file (logs/RUN_ID.txt), not the console output")
        return 1
    wrapper = code_wrapper(first["code"])
    items = check_runs(runs, wrapper, args.data_path)
    failed = items_failed(items)
    for i in items:
        print(f"[{i['status']:>11}] {i['item']}: {i['evidence']}")
    if failed and not args.non_record:
        print(f"\nrefused: {len(failed)} item(s) failed or not checked: " + "; ".join(i["item"] for i in failed)
              + ".\nFix them, or pass --non-record to write a folder labelled non-record.")
        return 1
    if any(r["final_loss"] is None for _, r in runs):
        print("error: a run has no final score; nothing to write")
        return 1
    record = not failed and not args.non_record and args.track == "10min_16mb"
    sig = significance([r["final_loss"] for _, r in runs], sota)
    sub = build_submission(args, runs, wrapper, items, sig, record)

    if os.path.exists(args.out_dir) and os.listdir(args.out_dir):
        if not args.force:
            print(f"error: {args.out_dir} exists and is not empty (--force replaces it)")
            return 1
        shutil.rmtree(args.out_dir)
    os.makedirs(args.out_dir, exist_ok=True)
    files = ["README.md", "submission.json", "train_gpt.py", "train_gpt_source.py", "requirements.txt", "loss_curves.png"]
    with open(os.path.join(args.out_dir, "train_gpt.py"), "wb") as f:
        f.write(wrapper)
    with open(os.path.join(args.out_dir, "train_gpt_source.py"), "w", encoding="utf-8") as f:
        f.write(first["code"])
    shutil.copyfile(args.requirements, os.path.join(args.out_dir, "requirements.txt"))
    for path, (_, r) in zip(args.logs, runs):
        name = f"train_seed{r['hyperparameters'].get('seed')}.log"
        shutil.copyfile(path, os.path.join(args.out_dir, name))
        files.append(name)
    write_plot(runs, os.path.join(args.out_dir, "loss_curves.png"), title=args.name)
    nproc = first["world_size"] or 1
    hp = first["hyperparameters"]
    command = (f"# every seed: SEED=<seed> in {', '.join(str(s['seed']) for s in sub['seeds'])}; "
               f"all other settings are the logged hyperparameters\n"
               f"DATA_PATH={hp.get('data_path')} MAX_WALLCLOCK_SECONDS={hp.get('max_wallclock_seconds')} "
               f"SEED=<seed> torchrun --standalone --nproc_per_node={nproc} train_gpt.py")
    with open(os.path.join(args.out_dir, "submission.json"), "w", encoding="utf-8") as f:
        json.dump(sub, f, indent=2)
        f.write("\n")
    with open(os.path.join(args.out_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(render_readme(sub, files, command))
    if args.top_level:
        shutil.copyfile(os.path.join(args.out_dir, "submission.json"), args.top_level)
    print(f"\nwrote {args.out_dir} ({sub['label']}): val_bpb {sub['val_bpb']:.8f} ± {sub['val_bpb_std']:.8f} "
          f"over {sub['n_seeds']} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
