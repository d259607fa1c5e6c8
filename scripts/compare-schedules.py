#!/usr/bin/env python3
"""Judges the schedules of `nexus bench --json` runs against the first one (chunked), as the
Nexus issue states its bar: throughput at the objective (--slo-ttft-ms/--slo-tbt-ms or
--slo-scale), and at the highest rate the first schedule sustains, mean TTFT, p95 TBT and p99 TBT.

    scripts/compare-schedules.py bench.json [more.json ...]

Prints markdown: a row per schedule with each figure and its ratio to the first schedule's.
With --strip OUT, also writes each JSON without its per-iteration timelines (the summaries stay).
"""
import json
import sys


def main(paths, strip_to=None):
    for path in paths:
        doc = json.load(open(path))
        slo = doc.get("slo")
        runs = doc["runs"]
        schedules = doc["schedules"]
        by = {s: sorted((r for r in runs if r["schedule"] == s), key=lambda r: r["rate"]) for s in schedules}
        base = schedules[0]
        print(f"\n{doc['workload']} on {doc['target']} ({path})")
        if slo is None:
            print("no objective in this run")
            continue
        print(f"objective: p95 TTFT <= {slo['ttft_p95_s'] * 1e3:.0f} ms, p95 TBT <= {slo['tbt_p95_s'] * 1e3:.1f} ms")
        throughput = {s["schedule"]: s["throughput"] for s in slo["schedules"]}
        highest = max(r["rate"] for r in runs)
        sustained = throughput[base]
        at = lambda s: next((r for r in by[s] if r["rate"] == sustained), None)
        print(f"\nat {sustained} req/s, the highest rate {base} sustains:\n")
        # The TTFT split by prompt length, where the runs have it (nexus bench since 2026-12-02).
        split = at(base) is not None and "ttft_by_prompt" in at(base)
        extra = " mean TTFT, short / long prompts (ms) |" if split else ""
        print("| schedule | throughput at the objective (req/s) | mean TTFT (ms) | p95 TBT (ms) | p99 TBT (ms) |" + extra)
        print("| --- | --- | --- | --- | --- |" + (" --- |" if split else ""))
        b = at(base)
        for s in schedules:
            r = at(s)
            t = throughput[s]
            def ratio(mine, theirs):
                return f" ({theirs / mine:.2f}x lower)" if mine <= theirs else f" ({mine / theirs:.2f}x higher)"
            if r is None or b is None or t is None:
                print(f"| {s} | {t} | - | - | - |" + (" - |" if split else ""))
                continue
            cells = [
                # Met at every rate: the sweep stopped short of the limit.
                ("≥ " if t == highest else "") + f"{t}"
                + ("" if s == base or not sustained else f" ({t / sustained:.2f}x)"),
                f"{r['ttft_s']['mean'] * 1e3:.0f}" + ("" if s == base else ratio(r['ttft_s']['mean'], b['ttft_s']['mean'])),
                f"{r['tbt_s']['p95'] * 1e3:.1f}" + ("" if s == base else ratio(r['tbt_s']['p95'], b['tbt_s']['p95'])),
                f"{r['tbt_s']['p99'] * 1e3:.1f}" + ("" if s == base else ratio(r['tbt_s']['p99'], b['tbt_s']['p99'])),
            ]
            if split:
                short, long = (r["ttft_by_prompt"][k]["mean"] for k in ("short_s", "long_s"))
                cells.append(" / ".join("-" if v is None else f"{v * 1e3:.0f}" for v in (short, long)))
            print(f"| {s} | " + " | ".join(cells) + " |")
        if strip_to:
            for r in doc["runs"]:
                r.pop("timeline", None)
            name = path.rsplit("/", 1)[-1]
            json.dump(doc, open(f"{strip_to}/{name}", "w"), indent=1)


if __name__ == "__main__":
    args = sys.argv[1:]
    strip = None
    if len(args) >= 2 and args[0] == "--strip":
        strip, args = args[1], args[2:]
    if not args:
        sys.exit(__doc__)
    main(args, strip)
