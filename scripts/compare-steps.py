#!/usr/bin/env python3
"""Puts builds of `cargo bench --bench model_step` side by side, from one file holding several runs,
each after a line `== MODEL BUILD` (what a GPU script writes when it alternates builds in one call):
per model, every step's time in each build (runs in order), and the eager kernel-by-kernel table's
lines (first run of each build; `--kernels` names the kernels to show, all by default).

    python3 scripts/compare-steps.py model_step.txt [--kernels "GEMM QKV,attention"]"""
import re
import sys
from collections import defaultdict

path = sys.argv[1]
wanted = None
if "--kernels" in sys.argv:
    wanted = set(sys.argv[sys.argv.index("--kernels") + 1].split(","))
steps = defaultdict(lambda: defaultdict(list))  # model -> step -> [(build, ms)]
kernels = defaultdict(dict)  # (model, build) -> {(step, kernel): ms}
model = build = None
for line in open(path):
    m = re.match(r"== (\S+) (\S+)", line)
    if m:
        model, build = m.groups()
        continue
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) >= 8 and (cells[0].startswith("decode,") or cells[0].startswith("prefill 8k")):
        steps[model][cells[0]].append((build, float(cells[2])))
    elif len(cells) == 10 and cells[1].isdigit() and (wanted is None or cells[2] in wanted):
        kernels[(model, build)].setdefault((cells[0], cells[2]), float(cells[5]))
for mdl, by_step in steps.items():
    builds = []
    for runs in by_step.values():
        for b, _ in runs:
            if b not in builds:
                builds.append(b)
    print(f"\n### {mdl}: ms per step, runs in order\n")
    print("| step | " + " | ".join(builds) + " |")
    print("| --- |" + " --- |" * len(builds))
    for step, runs in by_step.items():
        cells = [" / ".join(f"{ms:.2f}" for b2, ms in runs if b2 == b) for b in builds]
        print(f"| {step} | " + " | ".join(cells) + " |")
    keys = list(dict.fromkeys(k for b in builds for k in kernels.get((mdl, b), {})))
    if not keys:
        continue
    print(f"\n### {mdl}: kernels of the eager table, ms per step (first run of each build)\n")
    print("| step | kernel | " + " | ".join(builds) + " |")
    print("| --- | --- |" + " --- |" * len(builds))
    for k in keys:
        cells = [f"{kernels[(mdl, b)][k]:.3f}" if k in kernels[(mdl, b)] else "-" for b in builds]
        print(f"| {k[0]} | {k[1]} | " + " | ".join(cells) + " |")
