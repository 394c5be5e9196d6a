"""The one parser of train_gpt.py logs (issue 12): every tool and test reads runs through it.

    from train_log import parse_train_log, parse_train_log_file
    run = parse_train_log(text)      # a dict; a key is None when its line is absent

A log is what train_gpt.py's Runtime.log writes (logs/RUN_ID.txt), or its stdout (which lacks
the embedded source). Layout, from main():
    hyperparameters:
      name: value                    (one line per Hyperparameters field)
    <the whole train_gpt.py source>  (rt.log(src.read()): the source, then print's newline)
    device: ... world_size: N ...    (the first line after the source)
    ... training, GPTQ, artifact and eval lines ...
If a file holds several runs (RUN_ID reused: Runtime.log appends), the last one is parsed and
`runs_in_log` counts them. The parser is tolerant: a crashed run or one with TTT or the sliding
eval off just leaves keys None; regexes do not anchor line ends, so fields appended to a line
(e.g. `mfu: 41.2%  eta: 123s` on train lines) are ignored, or read where named below.

Keys (None when absent unless said otherwise):
  hyperparameters   {name: raw string} from the hyperparameters block ({} if none)
  code_sha256, code   sha256 hex and text of the embedded source; code_bytes_raw its UTF-8 size
  runs_in_log       number of "hyperparameters:" blocks in the text (0 for a stdout capture)
  device, world_size, grad_accum_steps, attention_backend, train_shards, val_tokens, val_bytes,
  model_params      from the lines right after the source
  runtime           {"torch", "cuda", "gpu", "gpus", "line"} from `runtime: torch X cuda Y gpu NAME x N`
  train_losses      {step: loss}; train_points {step: {train_time_ms, step_avg_ms, tok_s, ...extra}}
  val_points        {step: val_bpb}; val_losses {step: val_loss}
  iterations        the N of "step/N" lines
  compile_s, compile_warmup_steps, gptq_measured_s, gptq_reserve_s, train_budget_s
  steps, train_s, step_avg_ms, tok_s   from `training: S steps in Xs, step_avg: Yms, tok/s: Z`
  stopped_early     bool (False when the run trained to the end or the line is missing)
  stop_train_ms, stop_step   from `stopping_early: wallclock_cap train_time: Nms step: S/...`
  layer_loop_step, layer_loop_frac   from `layer_loop:enabled step:N frac:F`, printed before step N+1
                    runs: N steps ran without the loop, F the training fraction after them
  flops_per_token   (no loop, looped) from the `flops_per_token:` line (looped None if not printed)
  gptq_hessians, gptq_s (Hessians + quantization), train_plus_gptq_s, train_cap_s
  stages            {stage: {loss, bpb, eval_s, scored_targets}} for the timed evals, stage one of
                    prequant ("diagnostic pre-quantization post-ema"), quantized ("diagnostic
                    quantized"), sliding ("diagnostic quantized_sliding_window"), ttt
                    ("quantized_ttt_phased"); flat copies {stage}_loss, {stage}_bpb, {stage}_eval_s
  scored_targets    {stage: n} (the same numbers, in one dict)
  sliding_skipped   bool: the sliding diagnostic was skipped for the eval budget
  final_stage, final_bpb, final_loss   the score: ttt if present, else sliding, else quantized
  artifact_bytes, code_bytes (the counted, compressed code), code_bytes_uncompressed, total_bytes
  over_cap          bool: the "!!! OVER THE CAP" line was logged
  total_eval_s, peak_mem_mib (whole run, else training), train_peak_mem_mib
  eval_stages       {name: value} from `eval_stages: load:0.9s quantized:2.6s ... total:339.1s ttt_docs:N
                    fallback_docs:M`: seconds (float) per evaluation stage, document counts (int)
  ttt               {total_docs, ttt_docs, long_docs_sliding, prefix_docs, num_phases, boundaries,
                     batches, batches_logged, phases_done, phases_skipped, leftover_docs,
                     leftover_past_deadline, phases: [{phase, scored_docs (pd), sgd_docs (gd)}]}
                    or None when TTT did not run
  gptq_calibration  the raw `gptq:calibration ...` line, if the run logs one
  bench             list of the raw `bench:` lines ([] if none)
  errors            list of error lines: `error:`, `ERROR:`, `config error:`, and for a Python
                    traceback its `Traceback ...` line and its final exception line ([] if none)
"""
import hashlib
import re

STAGES = {
    "diagnostic pre-quantization post-ema": "prequant",
    "diagnostic quantized": "quantized",
    "diagnostic quantized_sliding_window": "sliding",
    "quantized_ttt_phased": "ttt",
}
FINAL_ORDER = ("ttt", "sliding", "quantized")

NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)"
HYPER_HEADER = re.compile(r"^hyperparameters:[ \t]*$", re.M)
HYPER_LINE = re.compile(r"^  (\w+): ?(.*)$")
# The first line logged after the source; the match begins at print()'s newline that ends it.
SOURCE_END = re.compile(r"\n(?=device: \S+ world_size: \d|runtime: )")
SOURCE_TAIL = re.compile(r'\nif __name__ == "__main__":\n    main\(\)\n')

TRAIN_LINE = re.compile(r"^(\d+)/(\d+) train_loss: " + NUM + r"(.*)$", re.M)
VAL_LINE = re.compile(r"^(\d+)/(\d+) val_loss: " + NUM + r" val_bpb: " + NUM, re.M)
EXTRA_FIELD = re.compile(r"([\w/]+): ?(\S+)")
STAGE_LINE = re.compile(r"^(" + "|".join(re.escape(k) for k in sorted(STAGES, key=len, reverse=True)) +
                        r") val_loss: ?" + NUM + r" val_bpb: ?" + NUM + r"(?: eval_time: ?" + NUM + r"ms)?"
                        r"(?: scored_targets: ?(\d+))?", re.M)
DEVICE_LINE = re.compile(r"^device: (\S+) world_size: (\d+)(?: grad_accum_steps: (\d+))?"
                         r"(?: attention_backend: (\S+))?", re.M)
RUNTIME_LINE = re.compile(r"^runtime: (.*)$", re.M)
SHARDS_LINE = re.compile(r"^train_shards: (\d+) val_tokens: (\d+)(?: val_bytes: (\d+))?", re.M)
PARAMS_LINE = re.compile(r"^model_params: ?(\d+)", re.M)
COMPILE_LINE = re.compile(r"^compile_warmup: (\d+) steps .*? in " + NUM + "s", re.M)
GPTQ_CALIBRATION = re.compile(r"^gptq:calibration.*$", re.M)
GPTQ_MEASURED = re.compile(r"^gptq:measured " + NUM + "s", re.M)
GPTQ_RESERVE = re.compile(r"^gptq:reserving " + NUM + r"s, training budget " + NUM + "s", re.M)
TRAINING_LINE = re.compile(r"^training: (\d+) steps in " + NUM + r"s, step_avg: " + NUM + r"ms"
                           r"(?:, tok/s: " + NUM + ")?", re.M)
STOP_LINE = re.compile(r"^stopping_early: (?:\S+ train_time: (\d+)ms step: (\d+))?", re.M)
LOOP_LINE = re.compile(r"^layer_loop:enabled step:(\d+)(?: frac:" + NUM + ")?", re.M)
FLOPS_LINE = re.compile(r"^flops_per_token: " + NUM + r"(?: \(" + NUM + r" looping\))?", re.M)
GPTQ_LINE = re.compile(r"^GPTQ:collected (\d+) Hessians.*?training \+ GPTQ = " + NUM + r"s"
                       r"(?: \(cap " + NUM + r"s\))?", re.M)
GPTQ_TIMES = re.compile(r"^GPTQ:collected \d+ Hessians(?: and quantized)? in " + NUM + r"s(?:, quantized in "
                        + NUM + "s)?", re.M)
ARTIFACT_LINE = re.compile(r"^Serialized model \S+: (\d+) bytes", re.M)
CODE_RAW_LINE = re.compile(r"^Code size \(uncompressed\): (\d+) bytes", re.M)
CODE_LINE = re.compile(r"^Code size \(compressed\): (\d+) bytes", re.M)
TOTAL_LINE = re.compile(r"^Total submission size \S+: (\d+) bytes", re.M)
OVER_CAP_LINE = re.compile(r"^!!! OVER THE CAP", re.M)
EVAL_STAGES_LINE = re.compile(r"^eval_stages: (.*)$", re.M)
EVAL_TOTAL_LINE = re.compile(r"^total_eval_time: ?" + NUM + "s", re.M)
PEAK_RUN_LINE = re.compile(r"^peak memory allocated \(whole run\): (\d+) MiB", re.M)
PEAK_TRAIN_LINE = re.compile(r"^peak memory allocated: (\d+) MiB", re.M)
SLIDING_SKIP_LINE = re.compile(r"^diagnostic quantized_sliding_window skipped", re.M)
TTT_LINE = re.compile(r"^ttt_phased: total_docs:(\d+) ttt_docs:(\d+) long_docs_sliding:(\d+) prefix_docs:(\d+) "
                      r"num_phases:(\d+) boundaries:\[([\d, ]*)\]", re.M)
TTP_LINE = re.compile(r"^ttp: b(\d+)/(\d+) ", re.M)
TTPP_LINE = re.compile(r"^ttpp: phase:(\d+)/(\d+) (?:(skipped)|pd:(\d+) gd:(\d+))?", re.M)
LEFTOVER_LINE = re.compile(r"^ttt_leftover: (\d+) documents .*?deadline: (yes|no)", re.M)
BENCH_LINE = re.compile(r"^bench:.*$", re.M)
ERROR_LINE = re.compile(r"^(?:error:|ERROR:|config error:).*$", re.M)
TRACEBACK = re.compile(r"^Traceback \(most recent call last\):.*$", re.M)


def _num(s):
    return None if s is None else float(s)


def _int(s):
    return None if s is None else int(s)


def _last(pattern, text):
    m = None
    for m in pattern.finditer(text):
        pass
    return m


def _split_header(text):
    """(hyperparameters, source or None, body after the source, runs_in_log)."""
    headers = list(HYPER_HEADER.finditer(text))
    if not headers:
        return {}, None, text, 0
    rest = text[headers[-1].end() + 1:]
    hyper, pos = {}, 0
    for line in rest.split("\n"):
        m = HYPER_LINE.match(line)
        if not m:
            break
        hyper[m[1]] = m[2]
        pos += len(line) + 1
    after = rest[pos:]
    if re.match(r"(?:device|runtime): ", after):  # a stdout capture: the source is logged to the file only
        return hyper, None, after, len(headers)
    raw = _last(CODE_RAW_LINE, after)  # the source's exact size, when the run got that far
    if raw:
        data, n = after.encode("utf-8"), int(raw[1])
        if SOURCE_END.match(data[n:n + 20].decode("utf-8", "replace")):
            return hyper, data[:n].decode("utf-8"), data[n + 1:].decode("utf-8"), len(headers)
    end = SOURCE_END.search(after)
    if end:
        return hyper, after[:end.start()], after[end.start() + 1:], len(headers)
    tail = SOURCE_TAIL.search(after)
    if tail:  # crashed before the device line: the source ends with main()'s call
        return hyper, after[:tail.end()], after[tail.end():], len(headers)
    return hyper, None, after, len(headers)


def _stage_dict(body):
    stages = {}
    for m in STAGE_LINE.finditer(body):
        eval_ms = _num(m[4])
        stages[STAGES[m[1]]] = dict(loss=float(m[2]), bpb=float(m[3]),
                                    eval_s=None if eval_ms is None else eval_ms / 1000.0,
                                    scored_targets=_int(m[5]))
    return stages


def _ttt(body):
    m = _last(TTT_LINE, body)
    if not m:
        return None
    ttp = list(TTP_LINE.finditer(body))
    ttpp = list(TTPP_LINE.finditer(body))
    left = _last(LEFTOVER_LINE, body)
    return dict(total_docs=int(m[1]), ttt_docs=int(m[2]), long_docs_sliding=int(m[3]), prefix_docs=int(m[4]),
                num_phases=int(m[5]), boundaries=[int(b) for b in m[6].replace(" ", "").split(",") if b],
                batches=int(ttp[-1][2]) if ttp else None, batches_logged=len(ttp),
                phases_done=sum(1 for p in ttpp if not p[3]), phases_skipped=sum(1 for p in ttpp if p[3]),
                phases=[dict(phase=int(p[1]), scored_docs=_int(p[4]), sgd_docs=_int(p[5])) for p in ttpp if not p[3]],
                leftover_docs=_int(left[1]) if left else None,
                leftover_past_deadline=(left[2] == "yes") if left else None)


def _errors(body):
    found = [(m.start(), m[0].rstrip()) for m in ERROR_LINE.finditer(body)]
    for m in TRACEBACK.finditer(body):
        found.append((m.start(), m[0].rstrip()))
        for line in body[m.end() + 1:].split("\n"):  # the exception line: the first unindented one
            if line.strip() and not line.startswith((" ", "\t")):
                found.append((m.start() + 1, line.rstrip()))
                break
    return [line for _, line in sorted(found)]


def _runtime(body):
    m = _last(RUNTIME_LINE, body)
    if not m:
        return None
    line = m[1].strip()
    out = dict(line=line, torch=None, cuda=None, gpu=None, gpus=None)
    t = re.search(r"torch (\S+)", line)
    c = re.search(r"cuda (\S+)", line)
    g = re.search(r"gpu (.+?) x (\d+)", line) or re.search(r"gpu (.+)$", line)
    out.update(torch=t and t[1], cuda=c and c[1], gpu=g and g[1].strip())
    if g and g.lastindex == 2:
        out["gpus"] = int(g[2])
    return out


def parse_train_log(text: str) -> dict:
    """Everything a records tool or a test reads from one train_gpt.py log (see the module doc)."""
    text = text.replace("\r\n", "\n")
    hyper, code, body, runs = _split_header(text)
    r = dict(hyperparameters=hyper, runs_in_log=runs, code=code,
             code_sha256=hashlib.sha256(code.encode("utf-8")).hexdigest() if code is not None else None,
             code_bytes_raw=len(code.encode("utf-8")) if code is not None else None)

    m = _last(DEVICE_LINE, body)
    r.update(device=m and m[1], world_size=_int(m and m[2]), grad_accum_steps=_int(m and m[3]),
             attention_backend=m and m[4])
    r["runtime"] = _runtime(body)
    m = _last(SHARDS_LINE, body)
    r.update(train_shards=_int(m and m[1]), val_tokens=_int(m and m[2]), val_bytes=_int(m and m[3]))
    m = _last(PARAMS_LINE, body)
    r["model_params"] = _int(m and m[1])

    train_points, train_losses, iterations = {}, {}, None
    for m in TRAIN_LINE.finditer(body):
        step = int(m[1])
        iterations = int(m[2])
        train_losses[step] = float(m[3])
        fields = {}
        for f in EXTRA_FIELD.finditer(m[4]):
            key, val = f[1].replace("/", "_"), f[2].rstrip("%,")
            val = re.sub(r"(ms|s|m)$", "", val) if re.fullmatch(r"[-+.\deE]+(ms|s|m)", val) else val
            try:
                fields[key] = float(val)
            except ValueError:
                fields[key] = f[2]
        if "train_time" in fields and isinstance(fields["train_time"], float):
            fields["train_time_ms"] = fields.pop("train_time") * 60000.0  # logged in minutes
        if "step_avg" in fields:
            fields["step_avg_ms"] = fields.pop("step_avg")
        train_points[step] = fields
    val_points, val_losses = {}, {}
    for m in VAL_LINE.finditer(body):
        val_losses[int(m[1])], val_points[int(m[1])] = float(m[3]), float(m[4])
        iterations = iterations or int(m[2])
    r.update(train_losses=train_losses, train_points=train_points, val_points=val_points, val_losses=val_losses,
             iterations=iterations)

    m = _last(COMPILE_LINE, body)
    r.update(compile_warmup_steps=_int(m and m[1]), compile_s=_num(m and m[2]))
    m = _last(GPTQ_CALIBRATION, body)
    r["gptq_calibration"] = m and m[0].rstrip()
    m = _last(GPTQ_MEASURED, body)
    r["gptq_measured_s"] = _num(m and m[1])
    m = _last(GPTQ_RESERVE, body)
    r.update(gptq_reserve_s=_num(m and m[1]), train_budget_s=_num(m and m[2]))
    m = _last(TRAINING_LINE, body)
    r.update(steps=_int(m and m[1]), train_s=_num(m and m[2]), step_avg_ms=_num(m and m[3]), tok_s=_num(m and m[4]))
    m = _last(STOP_LINE, body)
    r.update(stopped_early=bool(m), stop_train_ms=_num(m and m[1]), stop_step=_int(m and m[2]))
    m = _last(LOOP_LINE, body)
    r.update(layer_loop_step=_int(m and m[1]), layer_loop_frac=_num(m and m[2]))
    m = _last(FLOPS_LINE, body)
    r["flops_per_token"] = m and (float(m[1]), float(m[2]) if m[2] else None)
    m = _last(GPTQ_LINE, body)
    r.update(gptq_hessians=_int(m and m[1]), train_plus_gptq_s=_num(m and m[2]), train_cap_s=_num(m and m[3]))
    m = _last(GPTQ_TIMES, body)
    r["gptq_s"] = (float(m[1]) + (float(m[2]) if m[2] else 0.0)) if m else None

    stages = _stage_dict(body)
    r["stages"] = stages
    for name in STAGES.values():
        s = stages.get(name, {})
        r[f"{name}_loss"], r[f"{name}_bpb"], r[f"{name}_eval_s"] = s.get("loss"), s.get("bpb"), s.get("eval_s")
    r["scored_targets"] = {k: v["scored_targets"] for k, v in stages.items()}
    r["sliding_skipped"] = bool(SLIDING_SKIP_LINE.search(body))
    final = next((s for s in FINAL_ORDER if s in stages), None)
    r.update(final_stage=final, final_bpb=stages[final]["bpb"] if final else None,
             final_loss=stages[final]["loss"] if final else None)

    for key, pattern in (("artifact_bytes", ARTIFACT_LINE), ("code_bytes", CODE_LINE),
                         ("code_bytes_uncompressed", CODE_RAW_LINE), ("total_bytes", TOTAL_LINE)):
        m = _last(pattern, body)
        r[key] = _int(m and m[1])
    r["over_cap"] = bool(OVER_CAP_LINE.search(body))
    m = _last(EVAL_TOTAL_LINE, body)
    r["total_eval_s"] = _num(m and m[1])
    m = _last(EVAL_STAGES_LINE, body)
    r["eval_stages"] = m and {k: float(v[:-1]) if v.endswith("s") else int(v)
                              for k, v in (f.split(":", 1) for f in m[1].split())}
    m_run, m_train = _last(PEAK_RUN_LINE, body), _last(PEAK_TRAIN_LINE, body)
    r["train_peak_mem_mib"] = _int(m_train and m_train[1])
    r["peak_mem_mib"] = _int(m_run[1]) if m_run else r["train_peak_mem_mib"]
    r["ttt"] = _ttt(body)
    r["bench"] = [m[0] for m in BENCH_LINE.finditer(body)]
    r["errors"] = _errors(body)
    return r


def parse_train_log_file(path) -> dict:
    with open(path, encoding="utf-8", errors="replace") as f:
        return parse_train_log(f.read())


if __name__ == "__main__":  # python3 tools/train_log.py LOG: the parsed keys, without the source
    import json
    import sys

    run = parse_train_log_file(sys.argv[1])
    run.pop("code")
    print(json.dumps(run, indent=1, default=str))
