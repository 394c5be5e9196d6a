"""Hyperparameter sweeps of train_gpt.py over its environment variables, one run per GPU.

A grid, one override at a time (--each) or a greedy forward selection (--greedy); resumable; a
results table (CSV, Markdown) sorted by the metric and a plot of the metric per swept variable.

    python3 tools/sweep.py MATRIX_LR=0.02,0.026,0.03 WARMDOWN_FRAC=0.75,0.85          # 3x2 grid
    python3 tools/sweep.py --quick --set SEED=42 MATRIX_LR=0.02,0.03                  # quick mode (120 s)
    python3 tools/sweep.py --each MATRIX_LR=0.03 MUON_WD=0.08 EMA_DECAY=0.997         # base + each alone
    python3 tools/sweep.py --greedy --threshold 0.001 --confirm-seeds 1 \\
        MATRIX_LR=0.02,0.03 WARMDOWN_FRAC=0.75 MUON_WD=0.08                             # forward selection
    bash run.sh sweep ARGS...                                                           # the same

Overrides are `NAME=v1,v2,...` (for tuple variables such as GLOBAL_ATTN_LAYERS the values are
separated by `|`, the commas belong to the value: `GLOBAL_ATTN_LAYERS=4,9,10|3,9,10`). Names are
checked against train_gpt.py's Hyperparameters (read with ast, no torch import) and values against
their types before anything runs; an unknown name is refused with the closest match.

- Base environment: the caller's environment (e.g. the proxy's DATA_PATH, SEED, ...), then
  `--set NAME=value` (every point), then `--quick`, then the point's overrides.
- Quick mode (`--quick`, `--quick-seconds S`, default 120): MAX_WALLCLOCK_SECONDS=S, TTT_ENABLED=0 and
  SLIDING_EVAL=0, so the run ends after the quantized (disjoint-window) eval and the final
  metric is the quantized val_bpb; the table says so.
- Each point gets RUN_ID `sw-<hash of its hyperparameter environment>`, LOG_DIR `<out>/logs`,
  ARTIFACT_PATH `<out>/artifacts/<RUN_ID>.pgq`, its stdout+stderr in `<out>/out/<RUN_ID>.txt`, and
  (with GPUs) its own CUDA_VISIBLE_DEVICES: GPUs from `--gpus`, else CUDA_VISIBLE_DEVICES, else
  `nvidia-smi -L`; `--gpus-per-point K` gives each point K GPUs (torchrun --nproc_per_node=K).
  Without GPUs points run one after another (`--parallel N` runs N at once).
- The train command is `torchrun --standalone --nproc_per_node=K train_gpt.py` with GPUs, else
  `python3 train_gpt.py`; `--cmd "..."` replaces it. `--timeout S` kills a point after S seconds.
- `<out>/state.jsonl` gets one JSON line per finished point (exit status, why it failed, the
  parsed log: tools/train_log.py). Rerunning the same command resumes: a point with a recorded
  exit status is not run again (`--retry-failed` reruns failed ones); a crash or Ctrl-C of the
  sweep itself records nothing for the points it interrupted, so they run again.
- Results, sorted by the metric (`--metric`, default final_bpb = TTT, else sliding, else
  quantized val_bpb; lower is better): `<out>/results.csv`, `<out>/results.md` and
  `<out>/results.png` (the metric against each swept variable; needs matplotlib).
- Greedy (`--greedy`): each round tries every candidate `NAME=value` on top of the current best
  configuration, keeps the best if it beats the current metric by more than `--threshold`; with
  `--confirm-seeds N` the winner and the current best are also run with N other SEEDs and the
  winner is kept only if its mean still beats the current mean by the threshold (else the next
  candidate is considered). Stops when no candidate helps; the path is in `<out>/greedy.md`.
- Progress: one line per finished point with the running best and an ETA.
The default folder is `sweeps/<mode>_<names>`; `--out DIR` picks another.
"""
import argparse
import ast
import csv
import difflib
import hashlib
import itertools
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_log import parse_train_log  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_gpt.py"
SET_BY_SWEEP = ("RUN_ID", "LOG_DIR", "ARTIFACT_PATH")
SET_BY_TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
QUICK_FIXED = {"TTT_ENABLED": "0", "SLIDING_EVAL": "0"}
METRICS = ("final_bpb", "quantized_bpb", "prequant_bpb", "sliding_bpb", "ttt_bpb")
BULKY = ("hyperparameters", "code", "train_points", "train_losses", "val_points", "val_losses")  # not kept in state
COLUMNS = ("prequant_bpb", "quantized_bpb", "final_bpb", "artifact_bytes", "total_bytes", "steps", "step_avg_ms",
           "compile_s", "total_eval_s")


class SweepError(Exception):
    pass


# ---------------------------------------------------------------------------------------
# Hyperparameter names and values, from train_gpt.py's source
# ---------------------------------------------------------------------------------------

def hyperparameter_fields(script=SCRIPT) -> dict:
    """NAME -> (annotation, default) of every field of train_gpt.py's Hyperparameters, read with ast
    (importing the script would import torch)."""
    tree = ast.parse(Path(script).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Hyperparameters":
            return {s.target.id.upper(): (ast.unparse(s.annotation), ast.literal_eval(s.value) if s.value else None)
                    for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    raise SweepError(f"{script}: no Hyperparameters class")


def value_error(kind, value):
    """Why `value` cannot be read as train_gpt.py reads a field of this annotation, or None."""
    try:
        if kind == "bool":
            return None if value in ("0", "1") else "expected 0 or 1"
        if kind in ("int", "float"):
            {"int": int, "float": float}[kind](value)
        elif kind == "tuple":
            [float(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        return f"expected {'a comma-separated list of numbers' if kind == 'tuple' else kind}"
    return None


def check_name(name, fields):
    if name in SET_BY_SWEEP + SET_BY_TORCHRUN:
        raise SweepError(f"{name} is set by the {'sweep' if name in SET_BY_SWEEP else 'launcher'} for each point")
    if name not in fields:
        close = difflib.get_close_matches(name, [n for n in fields if n not in SET_BY_SWEEP + SET_BY_TORCHRUN], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise SweepError(f"{name} is not a train_gpt.py hyperparameter{hint}")


def parse_overrides(specs, fields, single=False):
    """['NAME=v1,v2', ...] -> [(NAME, [v1, v2]), ...], every name and value checked. Values of a
    tuple variable are separated by '|'; `single` keeps each spec's value whole (--set)."""
    out = []
    for spec in specs:
        name, sep, raw = spec.partition("=")
        name = name.strip()
        if not sep or not name:
            raise SweepError(f"{spec!r}: expected NAME=value")
        check_name(name, fields)
        kind = fields[name][0]
        values = [raw] if single else [v.strip() for v in raw.split("|" if kind == "tuple" else ",")]
        if not values or any(v == "" for v in values) and kind != "str":
            raise SweepError(f"{spec!r}: empty value")
        for v in values:
            if err := value_error(kind, v):
                raise SweepError(f"{name}={v!r}: {err}")
        if name in dict(out):
            raise SweepError(f"{name} given twice")
        out.append((name, values))
    return out


def grid_points(overrides):
    names = [n for n, _ in overrides]
    return [dict(zip(names, combo)) for combo in itertools.product(*[vs for _, vs in overrides])]


def each_points(overrides):
    """The base, then each NAME=value alone on it."""
    return [{}] + [{n: v} for n, vs in overrides for v in vs]


def point_id(hyper_env) -> str:
    return "sw-" + hashlib.sha1(json.dumps(sorted(hyper_env.items())).encode()).hexdigest()[:10]


def describe(overrides) -> str:
    return " ".join(f"{k}={v}" for k, v in overrides.items()) or "(base)"


# ---------------------------------------------------------------------------------------
# Greedy forward selection (pure: any evaluate callback)
# ---------------------------------------------------------------------------------------

def greedy_select(candidates, evaluate=None, threshold=0.0, confirm_seeds=(), evaluate_many=None, log=print):
    """Forward selection over `candidates` [(NAME, value), ...], lower metric is better.

    Round: every remaining candidate is applied on top of the current configuration (a candidate
    for a NAME already set replaces its value); the lowest metric is accepted if it beats the
    current one by more than `threshold`. With `confirm_seeds`, the winner and the current
    configuration are also evaluated with SEED=s for each s, and the winner is accepted only if
    its mean beats the current mean by more than `threshold`; otherwise it is dropped and the next
    best is considered. The accepted candidate leaves the pool; stops when a round accepts nothing.
    `evaluate(config) -> metric or None (failed)`; `evaluate_many(configs) -> metrics` evaluates
    a round at once (in parallel); each distinct configuration is evaluated once.
    Returns {"config", "metric", "path"}: path holds one entry per round."""
    cache = {}

    def many(configs):
        todo = [c for c in dict.fromkeys(tuple(sorted(c.items())) for c in configs) if c not in cache]
        results = evaluate_many([dict(c) for c in todo]) if evaluate_many else [evaluate(dict(c)) for c in todo]
        for c, m in zip(todo, results):
            cache[c] = m if m is not None and math.isfinite(m) else None
        return [cache[tuple(sorted(c.items()))] for c in configs]

    def seeded_mean(config, metric):
        runs = many([{**config, "SEED": str(s)} for s in confirm_seeds])
        return None if None in runs else (metric + sum(runs)) / (1 + len(runs))

    current = {}
    best = many([current])[0]
    if best is None:
        raise SweepError("the base configuration failed: nothing to select from")
    log(f"greedy: base {best:.6f}")
    path, pool = [], list(dict.fromkeys(candidates))
    while pool:
        tried = [(n, v) for n, v in pool if current.get(n) != v]
        metrics = many([{**current, n: v} for n, v in tried])
        entry = {"round": len(path) + 1, "base": dict(current), "base_metric": best,
                 "tried": [{"name": n, "value": v, "metric": m} for (n, v), m in zip(tried, metrics)],
                 "confirm": [], "accepted": None}
        path.append(entry)
        for m, (n, v) in sorted((m, c) for m, c in zip(metrics, tried) if m is not None):
            if best - m <= threshold:
                break
            if confirm_seeds:
                new_mean, old_mean = seeded_mean({**current, n: v}, m), seeded_mean(current, best)
                ok = new_mean is not None and old_mean is not None and old_mean - new_mean > threshold
                entry["confirm"].append({"name": n, "value": v, "mean": new_mean, "base_mean": old_mean, "accepted": ok})
                log(f"greedy: confirm {n}={v}: mean {new_mean} vs {old_mean} over {1 + len(confirm_seeds)} seeds: "
                    f"{'accepted' if ok else 'rejected'}")
                if not ok:
                    pool.remove((n, v))
                    continue
            entry["accepted"] = {"name": n, "value": v, "metric": m}
            current, best = {**current, n: v}, m
            pool.remove((n, v))
            break
        log(f"greedy: round {entry['round']}: " + (f"keep {n}={v} -> {best:.6f} ({describe(current)})"
                                                   if entry["accepted"] else f"nothing beats {best:.6f} by > {threshold}"))
        if not entry["accepted"]:
            break
    return {"config": current, "metric": best, "path": path}


# ---------------------------------------------------------------------------------------
# Running points
# ---------------------------------------------------------------------------------------

def detect_gpus(arg):
    if arg is not None:
        return [g.strip() for g in arg.split(",") if g.strip()]
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [g.strip() for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(l for l in out.splitlines() if l.startswith("GPU "))]


def fmt_s(s):
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Runner:
    """Runs points (override dicts) over slots (a CUDA_VISIBLE_DEVICES value each, or None), records
    each finished point in state.jsonl and skips points already recorded there."""

    def __init__(self, out, cmd, slots, base_env, hyper_base, metric, timeout=None, retry_failed=False):
        self.out, self.cmd, self.slots, self.base_env = Path(out), cmd, slots, base_env
        self.hyper_base, self.metric, self.timeout, self.retry_failed = hyper_base, metric, timeout, retry_failed
        for sub in ("logs", "artifacts", "out"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        self.state_path = self.out / "state.jsonl"
        self.state = {}
        if self.state_path.exists():
            for line in self.state_path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    rec = json.loads(line)
                    self.state[rec["run_id"]] = rec
        self.lock = threading.Lock()
        self.procs = {}
        self.stopping = False
        self.seen = {}  # run_id -> record of every point of this sweep, for the running best
        self.ran = set()  # run_ids run by this invocation (--retry-failed retries each once)
        self.durations = []

    def hyper_env(self, overrides):
        return {**self.hyper_base, **overrides}

    def finished(self, rid):
        rec = self.state.get(rid)
        return rec is not None and (rec["status"] == "ok" or not self.retry_failed or rid in self.ran)

    def run(self, points, label=""):
        """Records of `points`, in order, running those not finished yet."""
        ids = [point_id(self.hyper_env(p)) for p in points]
        todo = list({rid: p for rid, p in zip(ids, points) if not self.finished(rid)}.items())
        for rid in ids:
            if self.finished(rid):
                self.seen[rid] = self.state[rid]
        skipped = len(set(ids)) - len(todo)
        if skipped:
            print(f"sweep{label}: {skipped} point(s) already finished in {self.state_path}, {len(todo)} to run",
                  flush=True)
        self.total, self.done, self.t0 = len(todo), 0, time.time()
        queue = list(todo)
        threads = [threading.Thread(target=self._worker, args=(queue, slot, label), daemon=True)
                   for slot in self.slots[:max(1, len(todo))]]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        except KeyboardInterrupt:
            self.stopping = True
            with self.lock:
                for p in self.procs.values():
                    _kill(p)
            raise
        return [self.state[rid] for rid in ids]

    def _worker(self, queue, slot, label):
        while not self.stopping:
            with self.lock:
                if not queue:
                    return
                rid, overrides = queue.pop(0)
            try:
                rec = self._run_point(rid, overrides, slot)
            except Exception as e:  # a bug here must not lose the point, nor stop the other slots
                rec = {"run_id": rid, "overrides": overrides, "env": self.hyper_env(overrides), "status": "failed",
                       "rc": None, "reason": f"sweep error: {type(e).__name__}: {e}", "wall_s": 0.0, "slot": slot,
                       "metrics": {}}
            if rec is None:  # interrupted: not finished
                return
            with self.lock:
                self.ran.add(rid)
                self.state[rid] = self.seen[rid] = rec
                with open(self.state_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
                self.done += 1
                self.durations.append(rec["wall_s"])
                self._progress(rec, label)

    def _run_point(self, rid, overrides, slot):
        hyper = self.hyper_env(overrides)
        out_file = self.out / "out" / f"{rid}.txt"
        env = {k: v for k, v in self.base_env.items() if k not in SET_BY_TORCHRUN}
        env.update(hyper, RUN_ID=rid, LOG_DIR=str(self.out / "logs"),
                   ARTIFACT_PATH=str(self.out / "artifacts" / f"{rid}.pgq"), PYTHONUNBUFFERED="1")
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot
        t0 = time.time()
        rc, reason = None, ""
        with open(out_file, "w", encoding="utf-8") as f:
            f.write(f"# sweep point {rid}: {describe(overrides)}; slot {slot}; cmd {shlex.join(self.cmd)}\n")
            f.flush()
            try:
                p = subprocess.Popen(self.cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as e:
                rc, reason = 127, f"could not start {self.cmd[0]}: {e}"
            else:
                with self.lock:
                    self.procs[rid] = p
                try:
                    rc = p.wait(timeout=self.timeout)
                except subprocess.TimeoutExpired:
                    _kill(p)
                    rc, reason = p.wait(), f"timeout after {self.timeout:g}s"
                with self.lock:
                    self.procs.pop(rid, None)
        if self.stopping:
            return None
        text = out_file.read_text(encoding="utf-8", errors="replace")
        parsed = parse_train_log(text)
        status = "timeout" if reason.startswith("timeout") else "ok" if rc == 0 else "failed"
        if status == "failed" and not reason:
            reason = f"exit {rc}: {_last_error(text, parsed)}"
        if status == "ok" and parsed.get(self.metric) is None:
            status, reason = "failed", f"exit 0 but no {self.metric} in the log"
        return {"run_id": rid, "overrides": overrides, "env": hyper, "status": status, "rc": rc, "reason": reason,
                "wall_s": round(time.time() - t0, 1), "slot": slot, "out": str(out_file),
                "log": str(self.out / "logs" / f"{rid}.txt"), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                "metrics": {k: v for k, v in parsed.items() if k not in BULKY}}

    def _progress(self, rec, label):
        value = rec["metrics"].get(self.metric)
        ok = [r for r in self.seen.values() if r["status"] == "ok" and r["metrics"].get(self.metric) is not None]
        best = min(ok, key=lambda r: r["metrics"][self.metric]) if ok else None
        left = self.total - self.done
        eta = sum(self.durations) / len(self.durations) * math.ceil(left / len(self.slots))
        what = f"{self.metric} {value:.6f}" if rec["status"] == "ok" else f"{rec['status'].upper()} ({rec['reason']})"
        bests = f"best {best['metrics'][self.metric]:.6f} ({describe(best['overrides'])})" if best else "no best yet"
        print(f"[{self.done}/{self.total}{label}] {describe(rec['overrides'])}: {what} in {fmt_s(rec['wall_s'])} | "
              f"{bests} | ETA {fmt_s(eta)}", flush=True)


def _kill(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)  # the point's own session: torchrun and its workers
    except (ProcessLookupError, PermissionError):
        pass


def _last_error(text, parsed):
    if parsed.get("errors"):
        return str(parsed["errors"][-1])[:300]
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.startswith("# sweep point")]
    return lines[-1][:300] if lines else "no output"


# ---------------------------------------------------------------------------------------
# Results: table and plot
# ---------------------------------------------------------------------------------------

def sorted_records(records, metric):
    def key(r):
        v = r["metrics"].get(metric) if r["status"] == "ok" else None
        return (v is None, v if v is not None else 0.0)
    return sorted({r["run_id"]: r for r in records}.values(), key=key)


def table_rows(records, names, metric):
    rows = []
    for i, r in enumerate(sorted_records(records, metric), 1):
        m = r["metrics"]
        row = {"rank": i, "run_id": r["run_id"], **{n: r["overrides"].get(n, "") for n in names}}
        if metric not in COLUMNS:
            row[metric] = m.get(metric)
        row.update({c: m.get(c) for c in COLUMNS})
        row.update(status=r["status"], rc=r["rc"], wall_s=r["wall_s"], reason=r["reason"])
        rows.append(row)
    return rows


def _cell(v, col="", md=False):
    """CSV: the value as parsed; Markdown: val_bpb to 6 decimals, seconds and ms to 1."""
    if v is None or v == "":
        return "–" if md else ""
    if md and isinstance(v, float):
        return f"{v:.6f}" if col.endswith("_bpb") else f"{v:.1f}"
    return str(v).replace("|", "\\|") if md else str(v)


def write_results(records, names, metric, mode, out, title=""):
    rows = table_rows(records, names, metric)
    cols = list(rows[0]) if rows else ["rank", "run_id", *names, *COLUMNS, "status", "rc", "wall_s", "reason"]
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols + ["mode"])
        for row in rows:
            w.writerow([_cell(row[c], c) for c in cols] + [mode])
    lines = [f"# Sweep results{': ' + title if title else ''}", "",
             f"- mode: {mode}", f"- sorted by {metric} (lower is better); failed points last",
             f"- {sum(r['status'] == 'ok' for r in rows)} ok, {sum(r['status'] != 'ok' for r in rows)} failed", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(row[c], c, md=True) for c in cols) + " |" for row in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return rows


def write_plot(records, names, metric, path, mode="", defaults=None):
    """One panel per swept variable: the metric of every successful point against its value (the
    value it ran with: `defaults` where a point did not override the variable)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("sweep: matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    ok = [r for r in records if r["status"] == "ok" and r["metrics"].get(metric) is not None]
    if not ok or not names:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        pts = [(r["env"].get(name, (defaults or {}).get(name, "default")), r["metrics"][metric]) for r in ok]
        try:
            xs = [float(x) for x, _ in pts]
            labels = None
        except ValueError:
            labels = sorted({x for x, _ in pts})
            xs = [labels.index(x) for x, _ in pts]
        ax.scatter(xs, [y for _, y in pts], color="tab:blue")
        best = {}
        for x, (_, y) in zip(xs, pts):
            best[x] = min(best.get(x, math.inf), y)
        ax.plot(sorted(best), [best[x] for x in sorted(best)], color="tab:orange", label="best at value")
        if labels is not None:
            ax.set_xticks(range(len(labels)), labels, rotation=30)
        ax.set_xlabel(name)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{metric} vs swept variables ({mode})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_greedy(result, out, metric, settings):
    (out / "greedy.json").write_text(json.dumps({**result, "settings": settings}, indent=1) + "\n", encoding="utf-8")
    lines = ["# Greedy forward selection", "", f"- {settings}",
             f"- final: {describe(result['config'])} -> {metric} {result['metric']:.6f}", ""]
    for e in result["path"]:
        lines.append(f"## Round {e['round']}: on {describe(e['base'])} ({e['base_metric']:.6f})")
        for t in sorted(e["tried"], key=lambda t: (t["metric"] is None, t["metric"] or 0)):
            m = "failed" if t["metric"] is None else f"{t['metric']:.6f} ({t['metric'] - e['base_metric']:+.6f})"
            lines.append(f"- {t['name']}={t['value']}: {m}")
        for c in e["confirm"]:
            lines.append(f"- confirm {c['name']}={c['value']}: mean {c['mean']} vs {c['base_mean']}: "
                         f"{'accepted' if c['accepted'] else 'rejected'}")
        acc = e["accepted"]
        lines += [f"- **kept {acc['name']}={acc['value']}**" if acc else "- nothing kept: stop", ""]
    (out / "greedy.md").write_text("\n".join(lines), encoding="utf-8")


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(prog="tools/sweep.py", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("overrides", nargs="+", help="NAME=v1,v2,... (grid), or candidates with --greedy")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--each", action="store_true", help="the base, then each NAME=value alone on it")
    mode.add_argument("--greedy", action="store_true", help="greedy forward selection over NAME=value candidates")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="base override for every point")
    ap.add_argument("--quick", action="store_true",
                    help="MAX_WALLCLOCK_SECONDS=--quick-seconds, TTT_ENABLED=0, SLIDING_EVAL=0: metric = quantized")
    ap.add_argument("--quick-seconds", type=float, default=120.0, metavar="S", help="the quick mode's budget (120)")
    ap.add_argument("--metric", choices=METRICS, default="final_bpb")
    ap.add_argument("--threshold", type=float, default=0.0, help="greedy: needed improvement of the metric")
    ap.add_argument("--confirm-seeds", type=int, default=0, metavar="N", help="greedy: rerun the winner with N seeds")
    ap.add_argument("--out", help="sweep folder (default sweeps/<mode>_<names>)")
    ap.add_argument("--gpus", help="GPU ids, e.g. 0,1 (default: CUDA_VISIBLE_DEVICES, else nvidia-smi -L)")
    ap.add_argument("--gpus-per-point", type=int, default=1)
    ap.add_argument("--parallel", type=int, default=1, help="points at once without GPUs")
    ap.add_argument("--cmd", help="train command (default torchrun ... train_gpt.py with GPUs, else python3)")
    ap.add_argument("--timeout", type=float, help="seconds before a point is killed")
    ap.add_argument("--retry-failed", action="store_true", help="rerun points recorded as failed")
    ap.add_argument("--dry-run", action="store_true", help="print the points and exit")
    args = ap.parse_args(argv)
    try:
        return run_sweep(args)
    except SweepError as e:
        print(f"sweep: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sweep: interrupted; the running points were stopped and not recorded: rerun the same command "
              "to resume", file=sys.stderr)
        return 130


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_sweep(args):
    fields = hyperparameter_fields()
    overrides = parse_overrides(args.overrides, fields)
    base_set = {n: vs[0] for n, vs in parse_overrides(args.set, fields, single=True)}
    if args.gpus_per_point < 1 or args.parallel < 1 or args.confirm_seeds < 0:
        raise SweepError("--gpus-per-point, --parallel must be >= 1 and --confirm-seeds >= 0")
    names = [n for n, _ in overrides]
    quick = {}
    if args.quick:
        if args.quick_seconds <= 0:
            raise SweepError("--quick-seconds must be positive")
        quick = {"MAX_WALLCLOCK_SECONDS": f"{args.quick_seconds:g}", **QUICK_FIXED}
    # The hyperparameter environment of the base: the caller's, then --set, then --quick.
    hyper_base = {k: v for k, v in os.environ.items() if k in fields and k not in SET_BY_SWEEP + SET_BY_TORCHRUN}
    hyper_base.update(base_set)
    hyper_base.update(quick)
    budget = hyper_base.get("MAX_WALLCLOCK_SECONDS", f"{fields['MAX_WALLCLOCK_SECONDS'][1]:g}")
    metric_note = ("the final metric is the quantized val_bpb" if quick and args.metric == "final_bpb"
                   else f"metric {args.metric}")
    mode = (f"quick: MAX_WALLCLOCK_SECONDS={quick['MAX_WALLCLOCK_SECONDS']}, TTT_ENABLED=0, SLIDING_EVAL=0 ({metric_note})"
            if quick else f"full pipeline: MAX_WALLCLOCK_SECONDS={budget} ({metric_note})")
    if base_set:
        mode += f"; base {describe(base_set)}"
    kind = "greedy" if args.greedy else "each" if args.each else "grid"
    title = ("greedy " if args.greedy else "each " if args.each else "") + " ".join(args.overrides)
    out = Path(args.out or Path("sweeps") / f"{kind}_{'_'.join(names).lower()[:80]}{'_quick' if quick else ''}")

    gpus = detect_gpus(args.gpus)
    if gpus:
        k = args.gpus_per_point
        if len(gpus) < k:
            raise SweepError(f"--gpus-per-point {k} but only {len(gpus)} GPU(s): {','.join(gpus)}")
        slots = [",".join(gpus[i:i + k]) for i in range(0, len(gpus) - k + 1, k)]
    else:
        slots = [None] * args.parallel
    if args.cmd:
        cmd = shlex.split(args.cmd)
    elif gpus:
        launcher = [shutil.which("torchrun")] if shutil.which("torchrun") else [sys.executable, "-m", "torch.distributed.run"]
        cmd = launcher + ["--standalone", f"--nproc_per_node={args.gpus_per_point}", str(SCRIPT)]
    else:
        cmd = [sys.executable, str(SCRIPT)]

    if kind == "greedy":
        candidates = [(n, v) for n, vs in overrides for v in vs]
        points = [{}] + [{n: v} for n, v in candidates]  # the first round
    else:
        points = each_points(overrides) if kind == "each" else grid_points(overrides)
    print(f"sweep: {kind}, {len(points)} point(s){' in round 1' if kind == 'greedy' else ''}; {mode}")
    print(f"sweep: folder {out}; slots {[s or 'cpu' for s in slots]}; cmd {shlex.join(cmd)}", flush=True)
    if args.dry_run:
        for p in points:
            print(f"  {point_id({**hyper_base, **p})} {describe(p)}")
        return 0

    # The points run in their own sessions (so a timeout kills torchrun and its workers): a SIGTERM
    # of the sweep must stop them too, as Ctrl-C does.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    runner = Runner(out, cmd, slots, dict(os.environ), hyper_base, args.metric, args.timeout, args.retry_failed)
    if kind == "greedy":
        seeds = [int(hyper_base.get("SEED", fields["SEED"][1])) + 1 + i for i in range(args.confirm_seeds)]
        batches = []

        def evaluate_many(configs):
            batches.append(len(configs))
            recs = runner.run(configs, label=f" batch {len(batches)}")
            return [r["metrics"].get(args.metric) if r["status"] == "ok" else None for r in recs]

        try:
            result = greedy_select(candidates, evaluate_many=evaluate_many, threshold=args.threshold,
                                   confirm_seeds=seeds)
        finally:  # the table of what ran, even when the base failed
            records = list(runner.seen.values())
            names = list(dict.fromkeys(n for r in records for n in r["overrides"]))
            write_results(records, names, args.metric, mode, out, title)
        write_greedy(result, out, args.metric, f"threshold {args.threshold:g}, confirm seeds {seeds or 'none'}; "
                                               f"mode: {mode}")
        print(f"sweep: greedy path in {out / 'greedy.md'}: {describe(result['config'])} -> {result['metric']:.6f}")
    else:
        records = runner.run(points)
    rows = write_results(records, names, args.metric, mode, out, title)
    defaults = {n: ",".join(map(str, d)) if isinstance(d, tuple) else str(int(d) if isinstance(d, bool) else d)
                for n, (_, d) in fields.items()}
    plot = write_plot(records, names, args.metric, out / "results.png", mode, defaults)
    print(f"sweep: {len(rows)} point(s), {sum(r['status'] == 'ok' for r in rows)} ok: {out / 'results.md'}, "
          f"{out / 'results.csv'}" + (f", {plot}" if plot else ""))
    best = sorted_records(records, args.metric)[0] if records else None
    if best and best["status"] == "ok":
        print(f"sweep: best {best['metrics'][args.metric]:.6f}: {describe(best['overrides'])}")
    return 0 if any(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
