#!/usr/bin/env python3
"""Reads the CTA records of a step timeline (what `bench-model_step` writes with NEXUS_TIMELINE=<file>
when built by scripts/timeline-build.sh) and prints, per step, where its time goes.

    python3 scripts/timeline.py steps.csv [--layers 32] [--launches 20]

Each record is one CTA: its kernel's module, "wait" (thread 0 before and after waiting for the
previous kernel) or "exit" (its end; GEMM and attention kernels only), the grid, block and SM, and
two `%globaltimer` times in ns. A module's records come in the order of an atomic count, and the
CTAs of a kernel wait for the end of the kernel before, so a module's "wait" records are its
launches one after the other, `grid` records each (likewise its "exit" records).

Per launch: start (its first CTA reached the wait), release (its first CTA passed it), its last
exit, and its span (release to the next launch's release; the spans add up to the step). With
--layers, the launches between the first and last few repeat once per layer: the table gives, for
each position in a layer, the mean span, the release-to-last-exit time, and the gap from the
previous launch's last exit to this release (how long a kernel boundary takes), and (the median over
the layers) how long before that last exit the median CTA had started (reached its wait: a GEMM's CTA has then requested its first
ring of weights, so a long gap after a long lead is HBM streaming those, not idle).
"""
import argparse
import collections
import statistics


def read(path):
    steps = collections.OrderedDict()
    with open(path) as f:
        for line in f:
            step, module, kind, grid, block, sm, t0, t1 = line.rstrip("\n").rsplit(",", 7)
            steps.setdefault(step, []).append((module, kind, int(grid), int(block), int(t0), int(t1)))
    return steps


def groups(records):
    """A module's records of one kind, cut into launches of `grid` CTAs each."""
    out, i = [], 0
    while i < len(records):
        grid = records[i][2]
        launch = records[i:i + grid]
        if len(launch) < grid or any(r[2] != grid for r in launch) or sorted(r[3] for r in launch) != list(range(grid)):
            raise ValueError(f"records {i}..{i + grid} of {records[i][0]} are not one launch of {grid} CTAs")
        out.append(launch)
        i += grid
    return out


def launches(records):
    by_module = collections.defaultdict(lambda: {"wait": [], "exit": []})
    for r in records:
        by_module[r[0]][r[1]].append(r)
    out = []
    for module, kinds in by_module.items():
        waits, exits = groups(kinds["wait"]), groups(kinds["exit"])
        if exits and len(exits) != len(waits):
            raise ValueError(f"{module}: {len(waits)} launches waited, {len(exits)} recorded their ends")
        for j, w in enumerate(waits):
            out.append({
                "module": module,
                "grid": w[0][2],
                "start": min(r[4] for r in w),
                "median_start": statistics.median(r[4] for r in w),
                "release": min(r[5] for r in w),
                "exit": max(r[5] for r in exits[j]) if exits else None,
            })
    out.sort(key=lambda launch: launch["release"])
    for a, b in zip(out, out[1:]):
        a["span"] = b["release"] - a["release"]
        b["gap"] = b["release"] - a["exit"] if a["exit"] is not None else None
        b["lead"] = a["exit"] - b["median_start"] if a["exit"] is not None else None
    out[-1]["span"] = 0
    out[0]["gap"] = out[0]["lead"] = None
    return out


def layer_period(seq, layers):
    """(first, period): the launches [first, first + layers * period) repeat with `period`."""
    for period in range(1, len(seq) // max(layers, 1) + 1):
        for first in range(0, len(seq) - layers * period + 1):
            body = seq[first:first + layers * period]
            if all(body[k] == body[k + period] for k in range(len(body) - period)):
                return first, period
    return None


def us(ns):
    return f"{ns / 1e3:.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv")
    parser.add_argument("--layers", type=int, help="the model's layer count: print the per-layer breakdown")
    parser.add_argument("--launches", type=int, default=0, help="print the first N launches of each step")
    args = parser.parse_args()
    for step, records in read(args.csv).items():
        ls = launches(records)
        t0 = ls[0]["release"]
        print(f"\n## {step}: {len(ls)} launches, {us(ls[-1]['release'] - t0)} us from the first release to the last\n")
        if args.launches:
            print("| launch | module | grid | start | release | last exit | span |")
            print("| --- | --- | --- | --- | --- | --- | --- |")
            for i, l in enumerate(ls[:args.launches]):
                end = us(l["exit"] - t0) if l["exit"] is not None else "-"
                print(f"| {i} | {l['module']} | {l['grid']} | {us(l['start'] - t0)} | {us(l['release'] - t0)} | {end} | {us(l['span'])} |")
            print()
        if not args.layers:
            continue
        found = layer_period([(l["module"], l["grid"]) for l in ls], args.layers)
        if found is None:
            print(f"(no period repeats {args.layers} times)")
            continue
        first, period = found
        print("| position in the layer | module | grid | span (us) | release to last exit (us) | previous last exit to release (us) "
              "| median CTA start before the previous last exit (us) |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        total = 0.0
        for j in range(period):
            at = ls[first + j:first + args.layers * period:period]
            span = statistics.mean(l["span"] for l in at)
            total += span
            work = [l["exit"] - l["release"] for l in at if l["exit"] is not None]
            gaps = [l["gap"] for l in at if l["gap"] is not None]
            leads = [l["lead"] for l in at if l["lead"] is not None]
            print(f"| {j} | {at[0]['module']} | {at[0]['grid']} | {us(span)} | {us(statistics.mean(work)) if work else '-'} | "
                  f"{us(statistics.mean(gaps)) if gaps else '-'} | {us(statistics.median(leads)) if leads else '-'} |")
        rest = sum(l["span"] for l in ls[:first]) + sum(l["span"] for l in ls[first + args.layers * period:])
        print(f"| all {args.layers} layers | | | {total * args.layers / 1e6:.3f} ms | | | |")
        print(f"| before and after them ({len(ls) - args.layers * period} launches) | | | {rest / 1e6:.3f} ms | | | |")


if __name__ == "__main__":
    main()
