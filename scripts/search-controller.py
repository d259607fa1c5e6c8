#!/usr/bin/env python3
"""Searches the controller's settings in simulation (no GPU): every combination of decode target,
prefill iteration limit, aging and largest decode share below, on a profile of the GPU, at the
rate `chunked` sustains (LOW) and at 1.5x it (HIGH), each run in the simulated device's virtual
time (`nexus bench --simulate PROFILE --simulated-virtual-time`: a tenth of a second a run).

    scripts/search-controller.py WORKLOAD PROFILE [--nexus target/release/nexus] [--beside 1.1,1.05]
                                 [--tbt-limit-ms MS] [--rates LOW,HIGH] [--objective TTFT,TBT]
                                 [--memory-gib GIB]

WORKLOAD is one of the experiment's (its objective and rates are the H200 rounds', unless --rates
and --objective give others, as for an H100 profile with --memory-gib 79.6):
qwen2.5-14b-mixed, llama-3.1-8b-mixed, qwen2.5-3b-arxiv, qwen2.5-3b-long-data. Each decode target
T..B is tried with each backlog threshold (--backlog-tokens) of the list below: T while fewer
prompt tokens wait, B from there. Prints the
settings that meet the objective at both rates with p95 TBT at LOW no worse than `chunked`'s at
LOW (in the same simulation, or --tbt-limit-ms: the simulation has `chunked`'s p95 TBT lower than
the GPU did, 21.2 against 33.2 ms on Qwen2.5-14B), lowest mean TTFT at LOW first, then the best few
that do not. These
are simulations: check the chosen setting on the GPU (bench-results/nexus-vs-chunked-h200.md,
fifteenth round, says how close they came).
"""
import argparse
import itertools
import json
import subprocess
import tempfile

# (model, workload, rates LOW and HIGH, objective p95 TTFT and TBT in ms, backlog thresholds in
# tokens, decode targets). The targets reach up to near the TBT objective: in the twenty-fourth
# session's simulations of the H100 profiles, targets near it sustained 1.2-2x the rate of the
# rounds' tighter ones (bench-results/simulated-controller.md).
WORKLOADS = {
    "qwen2.5-14b-mixed": ("qwen2.5-14b", "mixed", 4, 6, 2742, 54.6, [8192, 16384],
                          ["20..45", "25..45", "30..45", "30..50", "35..50", "40..50"]),
    "llama-3.1-8b-mixed": ("llama-3.1-8b", "mixed", 7.5, 11.25, 1910, 34.1, [8192, 16384],
                           ["10..28", "14..28", "16..28", "16..32", "20..30", "24..32", "28..32"]),
    "qwen2.5-3b-arxiv": ("qwen2.5-3b", "arxiv", 6, 9, 450, 18.4, [8192, 16384],
                         ["4..10", "5..10", "5..14", "6..14", "6..17", "8..17", "12..17"]),
    "qwen2.5-3b-long-data": ("qwen2.5-3b", "long-data", 5, 7.5, 846, 17.8, [8192, 24576],
                             ["4..14", "5..14", "6..14", "6..16", "8..16", "12..16"]),
}
PREFILL_TOKENS = ["1024..8192", "2048..8192", "4096..8192", "8192"]
AGING = [15, 60]
DECODE_SHARE = [0.5, 0.7]


def run(args, model, workload, rate, schedule_flags):
    """TTFT and TBT (mean, p50, p95, p99 in ms) of one simulated run, from its `--json` report."""
    with tempfile.NamedTemporaryFile(suffix=".json") as report:
        cmd = [args.nexus, "bench", "--model", f"synthetic:{model}", "--workload", workload, "--rate", str(rate),
               "--num-requests", "150", "--seed", "0", "--simulate", args.profile, "--simulated-virtual-time",
               "--simulated-beside", args.beside, "--json", report.name] + schedule_flags
        if args.memory_gib is not None:
            cmd += ["--simulated-memory-gib", str(args.memory_gib)]
        subprocess.run(cmd, capture_output=True, text=True, check=True)
        (result,) = json.load(open(report.name))["runs"]
    ms = lambda stats: [stats[k] * 1e3 for k in ("mean", "p50", "p95", "p99")]
    return ms(result["ttft_s"]), ms(result["tbt_s"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("profile")
    parser.add_argument("--nexus", default="target/release/nexus")
    parser.add_argument("--beside", default="1.1,1.05", help="--simulated-beside PREFILL,DECODE")
    parser.add_argument("--tbt-limit-ms", type=float, help="p95 TBT at LOW to stay under (default: chunked's)")
    parser.add_argument("--rates", help="LOW,HIGH instead of the workload's")
    parser.add_argument("--objective", help="p95 TTFT,TBT in ms instead of the workload's")
    parser.add_argument("--memory-gib", type=float, help="--simulated-memory-gib (79.6 for an H100)")
    args = parser.parse_args()
    model, workload, low, high, slo_ttft, slo_tbt, backlogs, targets = WORKLOADS[args.workload]
    if args.rates:
        low, high = (float(r) for r in args.rates.split(","))
    if args.objective:
        slo_ttft, slo_tbt = (float(v) for v in args.objective.split(","))
    _, chunked_tbt = run(args, model, workload, low, ["--schedule", "chunked"])
    tbt_limit = args.tbt_limit_ms if args.tbt_limit_ms is not None else chunked_tbt[2]
    meets = lambda ttft, tbt: ttft[2] <= slo_ttft and tbt[2] <= slo_tbt
    rows = []
    for target, backlog, tokens, aging, share in itertools.product(targets, backlogs, PREFILL_TOKENS, AGING,
                                                                   DECODE_SHARE):
        flags = ["--schedule", "nexus", "--decode-target-ms", target, "--backlog-tokens", str(backlog),
                 "--prefill-tokens", tokens, "--prefill-aging", str(aging), "--max-decode-share", str(share)]
        (ttft_low, tbt_low), (ttft_high, tbt_high) = (run(args, model, workload, r, flags) for r in (low, high))
        ok = meets(ttft_low, tbt_low) and meets(ttft_high, tbt_high) and tbt_low[2] <= tbt_limit
        cells = (f"{ttft_low[0]:.1f}", f"{tbt_low[2]:.1f}", f"{tbt_low[3]:.1f}", f"{ttft_high[2]:.1f}")
        rows.append((ok, ttft_low[0], cells, target, backlog, tokens, aging, share))
    rows.sort(key=lambda r: (not r[0], r[1]))
    print(f"{args.workload}: chunked's p95 TBT at {low} req/s {chunked_tbt[2]:.1f} ms (simulated), limit {tbt_limit:.1f} "
          f"ms; objective p95 TTFT <= {slo_ttft} ms, p95 TBT <= {slo_tbt} ms at {low} and {high} req/s\n")
    print(f"| meets all | mean TTFT at {low} | p95 TBT at {low} | p99 TBT at {low} | p95 TTFT at {high} "
          "| decode target (ms) | backlog tokens | prefill tokens | aging | largest decode share |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    shown = [r for r in rows if r[0]][:10] + [r for r in rows if not r[0]][:5]
    for ok, _, cells, *setting in shown:
        print("| " + " | ".join(("yes" if ok else "no",) + cells + tuple(str(x) for x in setting)) + " |")


if __name__ == "__main__":
    main()
