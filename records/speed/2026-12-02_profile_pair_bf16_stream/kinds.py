"""Kernel time by kind (tools/profile_train.kernel_kind) over the listed rows of the two profiles
(the top PROFILE_ROWS=70 kernels of each: the rest is the line's 'unlisted'); GPU ranges
(Optimizer.step#...) left out of the kernel totals, as print_kernels now does.
    python3 records/speed/2026-12-02_profile_pair_bf16_stream/kinds.py > .../kinds.txt"""
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "tools"))
from profile_train import kernel_kind  # noqa: E402

ROW = re.compile(r"^\s*([\d.]+)\s+(\d+)\s+([\d.]+)\s+(.*)$")
for name in ("tprof_ours.log", "lprof_lead.log"):
    for block in open(os.path.join(HERE, name)).read().split("\n== ")[1:]:
        head = block.split("\n")[0]
        total = float(re.search(r"kernels ([\d.]+) ms/step", head).group(1))
        kinds, ranges = {}, 0.0
        for line in block.split("\n")[2:]:
            m = ROW.match(line)
            if not m:
                break
            ms, key = float(m.group(1)), m.group(4)
            if key.startswith("Optimizer."):
                ranges += ms
                continue
            kinds[kernel_kind(key)] = kinds.get(kernel_kind(key), 0.0) + ms
        listed = sum(kinds.values())
        print(f"{name}: {head.split(':')[0]}")
        print(f"  kernels without the ranges: {total - ranges:.1f} ms/step (printed {total:.1f}, ranges {ranges:.2f});"
              f" listed {listed:.1f}, unlisted {total - ranges - listed:.1f}")
        print("  " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
