#!/usr/bin/env python3
"""Judges the schedules of `nexus bench --json` runs against the first one (chunked), as the
Nexus issue states its bar: throughput at the objective (--slo-ttft-ms/--slo-tbt-ms or
--slo-scale), and at the highest rate the first schedule sustains, mean TTFT, p95 TBT and p99 TBT.

    scripts/compare-schedules.py bench.json [more.json ...]
    scripts/compare-schedules.py --merge r6.json r7.5.json ...   # one rate a file, judged as one run
    scripts/compare-schedules.py --join --base "chunked, 768 tokens" main.json chunked768.json

Prints markdown: a row per schedule with each figure and its ratio to the first schedule's.
With --strip OUT, also writes each JSON without its per-iteration timelines (the summaries stay).
Where the runs still have their timelines, a second table gives per run where the time went: the
prompt tokens per second of the iterations that carried prompt tokens (the prefill lane's, or
chunked's mixed iterations'), the arrival rate that keeps up with (at the trace's mean prompt
length: above it a schedule only queues, however a short trace hides it), the decode iterations
that ran beside a prefill iteration (median and p95 time, median budget), and how much the TTFT
grew over the trace (mean of its last quarter of requests over its first quarter's) against the
same schedule at its lowest rate (same prompts): ~1 at a sustained rate, 1.3x and more at a rate
the schedule only queues at, and the prefill lane's stalls: iterations of 1024 prompt tokens or
more that ran on a quarter of the SMs or fewer (what starting beside a decode iteration that held
the rest did before the prefill lane learned to wait for it, 2026-12-05). A third table splits
the decode iterations beside a prefill by the budget the controller gave them: batch, time and
the cost model's prediction. Every file also gets a table of each run's normalized latency (end to
end over output tokens) and, for a schedule that predicts its iterations (the controller), the cost
model's prediction error during the run per lane, from the summaries (timelines not needed).
--merge joins files of the same schedules, objective and workload (a sweep run one rate a call, so
that a time-out loses a rate, not the sweep) into one, each schedule's throughput found again over
all of their rates. --join puts files of other schedules on the same traces and objective side by
side (a schedule run in a bench of its own, such as chunked at a smaller --max-num-batched-tokens);
a schedule name two files share gets its file's name appended. --base NAME judges against that
schedule instead of the first.
"""
import json
import sys


def main(paths, strip_to=None, base=None):
    for path in paths:
        doc = json.load(open(path))
        if base is not None:
            if base not in doc.get("schedules", [base]):
                sys.exit(f"--base {base!r}: {path} has the schedules {doc['schedules']}")
            doc["schedules"] = [base] + [s for s in doc["schedules"] if s != base]
        if "runs" not in doc:
            # A profile or the like beside the runs (a glob such as *-r7*.json takes both).
            print(f"\n{path}: not a `nexus bench --json` file, skipped")
            continue
        slo = doc.get("slo")
        runs = doc["runs"]
        schedules = doc["schedules"]
        by = {s: sorted((r for r in runs if r["schedule"] == s), key=lambda r: r["rate"]) for s in schedules}
        base = schedules[0]
        print(f"\n{doc['workload']} on {doc['target']} ({path})")
        latency_table(doc)
        if slo is None:
            print("no objective in this run")
            lanes_table(doc)
            write_stripped(doc, path, strip_to)
            continue
        print(f"objective: p95 TTFT <= {slo['ttft_p95_s'] * 1e3:.0f} ms, p95 TBT <= {slo['tbt_p95_s'] * 1e3:.1f} ms")
        throughput = {s["schedule"]: s["throughput"] for s in slo["schedules"]}
        highest = max(r["rate"] for r in runs)
        sustained = throughput[base]
        at = lambda s: next((r for r in by[s] if r["rate"] == sustained), None)
        if sustained is None:
            print(f"\n{base} met the objective at no rate of this run")
            lanes_table(doc)
            write_stripped(doc, path, strip_to)
            continue
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
        lanes_table(doc)
        write_stripped(doc, path, strip_to)


def latency_table(doc):
    """Each run's normalized latency (ms per output token: mean / p50 / p95 / p99) and, where the
    schedule predicted its iterations, the median and p90 of |predicted / measured - 1| per lane."""
    print("\n| schedule | rate | normalized latency (ms per token) | prediction error, prefill lane (p50 / p90) "
          "| prediction error, decode lane (p50 / p90) |")
    print("| --- | --- | --- | --- | --- |")
    for r in in_schedule_order(doc, doc["runs"]):
        n = r.get("normalized_latency_s")
        latency = "-" if not n else " / ".join(f"{n[k] * 1e3:.1f}" for k in ("mean", "p50", "p95", "p99"))
        errors = {}
        for lane in (r.get("timeline_summary") or {}).get("lanes", []):
            e = lane.get("prediction_error")
            if e:
                errors[lane["lane"]] = f"{e['p50'] * 100:.1f}% / {e['p90'] * 100:.1f}%"
        print(f"| {r['schedule']} | {r['rate']} | {latency} | {errors.get('prefill', '-')} | {errors.get('decode', '-')} |")


def in_schedule_order(doc, runs):
    """`runs` (of `doc`) by schedule, in the order the bench ran them, then by rate."""
    return sorted(runs, key=lambda r: (doc["schedules"].index(r["schedule"]), r["rate"]))


def write_stripped(doc, path, strip_to):
    """Writes `doc` without its per-iteration timelines to the folder `strip_to`, if one is given."""
    if strip_to:
        for r in doc["runs"]:
            r.pop("timeline", None)
        name = path.rsplit("/", 1)[-1]
        json.dump(doc, open(f"{strip_to}/{name}", "w"), indent=1)


def lanes_table(doc):
    runs = [r for r in doc["runs"] if r.get("timeline")]
    if not runs:
        return
    lowest = {s: min((r for r in doc["runs"] if r["schedule"] == s), key=lambda r: r["rate"]) for s in doc["schedules"]}
    print("\n| schedule | rate | prompt tokens/s | requests/s that rate prefills | decode beside prefill: p50 / p95 (ms) "
          "| its median budget (SMs) | TTFT growth against the lowest rate | prefill stalls: iterations (s) "
          "| mean TTFT at that rate with no waiting (ms) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    few = doc["sm_count"] // 4
    runs = in_schedule_order(doc, runs)
    # The decode iterations beside a prefill, once per run: both tables read them.
    besides = [decode_beside_prefill(r["timeline"]) for r in runs]
    for r, beside in zip(runs, besides):
        timeline = r["timeline"]
        # Iterations with more query rows than sequences carry prompt tokens (a decode row is one
        # token of one sequence); their rows over their time is the prompt token rate.
        prompt = [it for it in timeline if it["tokens"] > it["seqs"]]
        seconds = sum(it["end_s"] - it["start_s"] for it in prompt)
        tokens_per_s = sum(it["tokens"] for it in prompt) / seconds if seconds > 0 else None
        rate = "-" if tokens_per_s is None else f"{tokens_per_s / 1e3:.1f}k"
        # The arrival rate whose prompts this lane keeps up with, at this trace's mean prompt: a
        # bound on the rate the schedule can sustain (a short trace above it only queues).
        # And the mean TTFT were every prompt prefilled at that rate as it arrives (the mean prompt
        # over the rate): what no wait and no other work would leave. Chunked's, at its own rate
        # on every SM, bounds how much lower any schedule's mean TTFT can be with these kernels.
        capacity, unqueued = "-", "-"
        if tokens_per_s and r["completed"]:
            capacity = f"{tokens_per_s / (r['total_input_tokens'] / r['completed']):.1f}"
            unqueued = f"{1e3 * r['total_input_tokens'] / r['completed'] / tokens_per_s:.0f}"
        if beside:
            times = sorted(it["end_s"] - it["start_s"] for it in beside)
            decode = f"{median(times) * 1e3:.1f} / {times[min(len(times) - 1, int(0.95 * len(times)))] * 1e3:.1f}"
            budget = str(median([it["budget"] for it in beside]))
        else:
            decode, budget = "-", "-"
        growth, base = r.get("ttft_growth"), lowest[r["schedule"]].get("ttft_growth")
        growth = "-" if growth is None or not base else f"{growth / base:.2f}x"
        stalls = [it for it in timeline if it["lane"] == "prefill" and it["tokens"] >= 1024 and it["budget"] <= few]
        stalled = f"{len(stalls)} ({sum(it['end_s'] - it['start_s'] for it in stalls):.1f})"
        print(
            f"| {r['schedule']} | {r['rate']} | {rate} | {capacity} | {decode} | {budget} | {growth} | {stalled} "
            f"| {unqueued} |"
        )
    budgets_table(runs, besides)


def median(values):
    """The upper median of `values` (not empty)."""
    return sorted(values)[len(values) // 2]


def decode_beside_prefill(timeline):
    """The decode iterations of a two-lane run that overlapped a prefill iteration."""
    prefill = [it for it in timeline if it["lane"] == "prefill"]
    return [it for it in timeline if it["lane"] == "decode"
            and any(p["start_s"] < it["end_s"] and it["start_s"] < p["end_s"] for p in prefill)]


def budgets_table(runs, besides):
    """Decode beside prefill per budget (the budgets of at least 5% of those iterations): what the
    controller gave decode, how large the batch was, how long it took and what the cost model
    predicted, the figures to set against the weights' read time at that budget."""
    rows = []
    for r, beside in zip(runs, besides):
        for budget in sorted({it["budget"] for it in beside}):
            its = [it for it in beside if it["budget"] == budget]
            if len(its) < 0.05 * len(beside):
                continue
            time = median([it["end_s"] - it["start_s"] for it in its]) * 1e3
            predicted = [it["predicted_s"] for it in its if it.get("predicted_s") is not None]
            model = f"{median(predicted) * 1e3:.1f}" if predicted else "-"
            rows.append(f"| {r['schedule']} | {r['rate']} | {budget} | {len(its)} | {median([it['seqs'] for it in its])} "
                        f"| {time:.1f} | {model} |")
    if rows:
        print("\n| schedule | rate | decode budget (SMs) | decode iterations beside prefill | median batch "
              "| median time (ms) | cost model's median (ms) |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        print("\n".join(rows))


def check_alike(paths, docs, keys, what):
    """Exits with a message unless every one of `docs` (read from `paths`) has the first's `keys`
    and objective (none, or the same p95 TTFT and TBT); `what` says what they are not otherwise."""
    objective = lambda d: d.get("slo") and (d["slo"]["ttft_p95_s"], d["slo"]["tbt_p95_s"])
    for p, d in zip(paths, docs):
        for key in keys:
            if d.get(key) != docs[0].get(key):
                sys.exit(f"{p} and {paths[0]} {what}: their {key} differ")
        if objective(d) != objective(docs[0]):
            sys.exit(f"{p}: its objective differs from {paths[0]}'s")


def merged(paths, out):
    """The runs of `paths` as one `nexus bench --json` document, written to `out`: the files must
    have the same schedules, objective and workload; each schedule's throughput is the highest rate
    up to which every one of its runs met the objective, over all of them."""
    docs = [json.load(open(p)) for p in paths]
    check_alike(paths, docs, ("schedules", "workload", "target"), "are not one sweep")
    first = docs[0]
    doc = dict(first)
    doc["runs"] = [r for d in docs for r in d["runs"]]
    if first.get("slo"):
        slo = dict(first["slo"])
        rates = sorted({r["rate"] for r in doc["runs"]})
        schedules = []
        for s in first["schedules"]:
            met = sorted({m for d in docs for x in d["slo"]["schedules"] if x["schedule"] == s for m in x["rates_met"]})
            ran = [rate for rate in rates if any(r["schedule"] == s and r["rate"] == rate for r in doc["runs"])]
            throughput = None
            for rate in ran:
                if rate not in met:
                    break
                throughput = rate
            schedules.append({"schedule": s, "rates_met": met, "throughput": throughput})
        slo["schedules"] = schedules
        doc["slo"] = slo
    json.dump(doc, open(out, "w"))
    return out


def joined(paths, out):
    """The schedules of `paths` (the same workload, model, traces and objective) side by side as
    one `nexus bench --json` document, written to `out`; a schedule name already taken by an
    earlier file gets its file's name appended."""
    docs = [json.load(open(p)) for p in paths]
    check_alike(paths, docs, ("workload", "target", "num_requests"), "did not run the same traces")
    first = docs[0]
    doc = dict(first)
    doc["schedules"], doc["runs"], judged = [], [], []
    for p, d in zip(paths, docs):
        stem = p.rsplit("/", 1)[-1].split(".json")[0]
        names = {s: s if s not in doc["schedules"] else f"{s} ({stem})" for s in d["schedules"]}
        doc["schedules"] += names.values()
        doc["runs"] += [dict(r, schedule=names[r["schedule"]]) for r in d["runs"]]
        if d.get("slo"):
            judged += [dict(x, schedule=names[x["schedule"]]) for x in d["slo"]["schedules"]]
    if first.get("slo"):
        doc["slo"] = dict(first["slo"], schedules=judged)
    json.dump(doc, open(out, "w"))
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    strip, base, how = None, None, None
    while args and args[0] in ("--strip", "--base", "--merge", "--join"):
        flag = args.pop(0)
        if flag in ("--merge", "--join"):
            how = flag
        elif not args:
            sys.exit(__doc__)
        elif flag == "--strip":
            strip = args.pop(0)
        else:
            base = args.pop(0)
    if not args:
        sys.exit(__doc__)
    if how:
        import os
        import tempfile
        done, combine = ("merged", merged) if how == "--merge" else ("joined", joined)
        print(f"{done}: {' '.join(args)}")
        args = [combine(args, os.path.join(tempfile.mkdtemp(), f"{done}.json"))]
    main(args, strip, base)
