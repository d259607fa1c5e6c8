//! `nexus bench` end to end on the CPU backend: a two-rate sweep writes its table, JSON and plot,
//! and judges the rates against an objective; a JSONL workload of text and token-id prompts runs
//! in-process; `chunked` and a `nexus` split run the same trace in one invocation, each with its
//! timeline in the JSON and the plot; chunked at a smaller iteration budget is named by it; vLLM's
//! load shapes (`--request-rate inf`, `--max-concurrency`, `--burstiness`, the random dataset),
//! metrics (`--percentile-metrics`, `--metric-percentiles`, `--goodput`) and `--save-result`
//! against `nexus serve` over HTTP and in-process; bad workloads and flags fail with a message.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

mod common;
use common::Server;

fn model() -> PathBuf {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.is_file(), "{} is missing: run scripts/fetch-model.sh first", model.display());
    model
}

/// Chunked with another iteration budget than the default is named by it, so that its results can
/// be told from the default's once put side by side (`scripts/compare-schedules.py --join`).
#[test]
fn chunked_with_a_smaller_budget_is_named_by_it() {
    let dir = std::env::temp_dir().join(format!("nexus-bench-budget-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let json = dir.join("bench.json");
    let (stdout, doc) = bench_json(
        Command::new(env!("CARGO_BIN_EXE_nexus"))
            .args(["bench", "--device", "cpu", "--workload", "sharegpt", "--rate", "50", "--num-requests", "2"])
            .args(["--seed", "3", "--cpu-kv-blocks", "64", "--max-num-batched-tokens", "64", "--model"])
            .arg(model()),
        &json,
    );
    assert!(stdout.contains("| chunked, 64 tokens | 50 |"), "{stdout}");
    assert_eq!(doc["schedules"], serde_json::json!(["chunked, 64 tokens"]));
    assert_eq!(doc["runs"][0]["schedule"], "chunked, 64 tokens");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_small_sweep_reports_every_rate() {
    let model = model();
    let dir = std::env::temp_dir().join(format!("nexus-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (json, plot) = (dir.join("bench.json"), dir.join("bench.svg"));
    let (stdout, doc) = bench_json(
        Command::new(env!("CARGO_BIN_EXE_nexus"))
            .args(["bench", "--device", "cpu", "--workload", "sharegpt", "--sweep", "20,40", "--num-requests", "3"])
            .args(["--seed", "3", "--cpu-kv-blocks", "128", "--slo-ttft-ms", "1e9", "--slo-tbt-ms", "1e9", "--model"])
            .arg(&model)
            .arg("--plot")
            .arg(&plot),
        &json,
    );
    assert!(stdout.contains("| 20 |") && stdout.contains("| 40 |"), "table:\n{stdout}");
    let runs = doc["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2);
    for run in runs {
        assert_eq!(run["ttft_s"]["count"], 3);
        assert!(run["ttft_s"]["p50"].as_f64().expect("p50") > 0.0);
        // ShareGPT prompts are all short: the split by prompt length has them on one side, and
        // no table of it is printed.
        assert_eq!(run["ttft_by_prompt"]["short_s"]["count"], 3);
        assert_eq!(run["ttft_by_prompt"]["long_s"]["count"], 0);
    }
    assert!(!stdout.contains("TTFT by prompt length"), "table:\n{stdout}");
    // An objective nothing misses: every rate meets it, and the throughput is the highest.
    assert!(stdout.contains("met at 20, 40 req/s"), "table:\n{stdout}");
    assert_eq!(doc["slo"]["schedules"][0]["schedule"], "chunked");
    assert_eq!(doc["slo"]["schedules"][0]["throughput"], 40.0);
    assert_eq!(doc["slo"]["schedules"][0]["rates_met"], serde_json::json!([20.0, 40.0]));
    let svg = std::fs::read_to_string(&plot).expect("svg");
    // p95 TTFT and p95 TBT against the rate, then the TTFT and ITL distributions of each rate.
    assert!(svg.starts_with("<svg") && svg.matches("<polyline").count() == 2 + 2 * 2, "{svg}");
    std::fs::remove_dir_all(&dir).ok();

    // A bad rate is refused with a message, not a panic.
    let bad = Command::new(env!("CARGO_BIN_EXE_nexus"))
        .args(["bench", "--rate", "0", "--model"])
        .arg(&model)
        .output()
        .expect("run");
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("--rate"));
}

#[test]
fn a_jsonl_workload_runs_in_process_and_bad_ones_name_their_line() {
    let model = model();
    let dir = std::env::temp_dir().join(format!("nexus-bench-jsonl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let good = dir.join("good.jsonl");
    let lines = [
        "{\"prompt\": \"Once upon a time\", \"output_len\": 4}",
        "{\"prompt_token_ids\": [1, 2, 3], \"output_len\": 3}",
    ];
    std::fs::write(&good, lines.join("\n")).expect("write");
    let json = dir.join("report.json");
    let (_, doc) = bench_json(
        Command::new(env!("CARGO_BIN_EXE_nexus"))
            .args(["bench", "--device", "cpu", "--rate", "100", "--num-requests", "3", "--model"])
            .arg(&model)
            .arg(format!("--workload=jsonl:{}", good.display())),
        &json,
    );
    let run = &doc["runs"][0];
    // Three requests from a two-line file: the file is cycled.
    assert_eq!((run["completed"].as_u64(), run["failed"].as_u64()), (Some(3), Some(0)), "{run}");
    assert_eq!(run["tbt_s"]["count"], 3 + 2 + 3);
    assert_eq!(run["length_mismatches"], serde_json::json!([]));

    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, format!("{}\n{}\n{{\"prompt\": 3, \"output_len\": 1}}\n", lines[0], lines[1])).expect("write");
    let mut failures = vec![(format!("--workload=jsonl:{}", bad.display()), "line 3".to_owned())];
    failures.push(("--workload=jsonl:/nonexistent/x.jsonl".into(), "/nonexistent/x.jsonl".into()));
    failures.push(("--workload=tiny".into(), "jsonl:PATH".into()));
    failures.push(("--token-id-range=9..2".into(), "empty".into()));
    failures.push(("--token-id-range=0..60000".into(), "vocabulary".into()));
    for (flag, want) in failures {
        let out = Command::new(env!("CARGO_BIN_EXE_nexus"))
            .args(["bench", "--device", "cpu", "--num-requests", "1", "--model"])
            .arg(&model)
            .arg(&flag)
            .output()
            .expect("run nexus bench");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(&want), "{flag}: {stderr}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn chunked_and_nexus_run_the_same_trace_with_their_timelines() {
    let dir = std::env::temp_dir().join(format!("nexus-bench-schedules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // Four requests of 6 to 15 prompt tokens and one of 2100 (long, for the TTFT split by prompt
    // length), 4 output tokens each, arriving at once.
    let mut prompts: Vec<Vec<u32>> =
        (0..4).map(|i| (0..6 + 3 * i).map(|j| 1000 + 17 * (8 * i + j)).collect()).collect();
    prompts.push((0..2100).map(|j| 1000 + (7 * j) % 20000).collect());
    let lines: Vec<String> =
        prompts.iter().map(|p| serde_json::json!({ "prompt_token_ids": p, "output_len": 4 }).to_string()).collect();
    let workload = dir.join("requests.jsonl");
    std::fs::write(&workload, lines.join("\n")).expect("write");
    let (json, plot) = (dir.join("bench.json"), dir.join("bench.svg"));
    let (stdout, doc) = bench_json(
        Command::new(env!("CARGO_BIN_EXE_nexus"))
            .args(["bench", "--device", "cpu", "--rate", "1000", "--schedule", "chunked,nexus", "--prefill-sms", "64"])
            .args(["--slo-scale", "5"])
            .arg(format!("--workload=jsonl:{}", workload.display()))
            .arg("--model")
            .arg(model())
            .arg("--plot")
            .arg(&plot),
        &json,
    );
    assert!(stdout.contains("| chunked | 1000 |") && stdout.contains("| nexus 64/68 | 1000 |"), "{stdout}");
    assert!(stdout.contains("TTFT by prompt length"), "{stdout}");
    // The lanes under the table.
    for lane in ["| chunked | 1000 | mixed |", "| nexus 64/68 | 1000 | prefill |", "| nexus 64/68 | 1000 | decode |"] {
        assert!(stdout.contains(lane), "no row {lane} in\n{stdout}");
    }

    assert_eq!(doc["schedules"], serde_json::json!(["chunked", "nexus 64/68"]));
    assert_eq!(doc["sm_count"], 132);
    let runs = doc["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2);
    // Every iteration's tokens add up to the prompts, then one token per output token after the
    // first: each schedule ran the whole trace, nothing twice.
    let tokens = prompts.iter().map(|p| p.len() + 3).sum::<usize>() as u64;
    for (run, schedule, lanes) in [
        (&runs[0], "chunked", &[("mixed", &[132][..])][..]),
        (&runs[1], "nexus 64/68", &[("prefill", &[64, 132][..]), ("decode", &[68, 132][..])][..]),
    ] {
        assert_eq!(run["schedule"], schedule);
        assert_eq!((run["completed"].as_u64(), run["failed"].as_u64()), (Some(5), Some(0)), "{schedule}");
        let split = &run["ttft_by_prompt"];
        assert_eq!((&split["short_s"]["count"], &split["long_s"]["count"]), (&4.into(), &1.into()), "{schedule}");
        assert_eq!(run["preemptions"], 0);
        assert!(run["ttft_growth"].is_null(), "{schedule}: five requests are too few to tell a queue's growth");
        let timeline = run["timeline"].as_array().expect("a timeline");
        assert!(!timeline.is_empty(), "{schedule}");
        let mut seen = BTreeSet::new();
        for it in timeline {
            let lane = it["lane"].as_str().expect("lane");
            let budgets = lanes.iter().find(|l| l.0 == lane).unwrap_or_else(|| panic!("{schedule}: lane {lane}")).1;
            assert!(budgets.contains(&it["budget"].as_u64().expect("budget")), "{schedule}: {it}");
            let (start, end) = (it["start_s"].as_f64().expect("start"), it["end_s"].as_f64().expect("end"));
            assert!(0.0 <= start && start <= end && it["host_s"].as_f64().expect("host") >= 0.0, "{it}");
            assert!(it["seqs"].as_u64().expect("seqs") >= 1 && it["tokens"].as_u64().expect("tokens") >= 1, "{it}");
            seen.insert(lane);
        }
        assert_eq!(seen.len(), lanes.len(), "{schedule}: every lane ran");
        assert_eq!(timeline.iter().map(|it| it["tokens"].as_u64().expect("tokens")).sum::<u64>(), tokens);
        let summary = &run["timeline_summary"];
        let summarized: u64 =
            summary["lanes"].as_array().expect("lanes").iter().map(|l| l["iterations"].as_u64().expect("n")).sum();
        assert_eq!(summarized, timeline.len() as u64, "{schedule}");
        assert!(summary["busy_s"].as_f64().expect("busy") > 0.0, "{summary}");
    }
    assert_eq!(runs[0]["timeline_summary"]["overlap_s"], 0.0, "one lane never overlaps");
    // The objective is five times what chunked, the first schedule, reached at the lowest rate.
    for (slo, measured) in [("ttft_p95_s", "ttft_s"), ("tbt_p95_s", "tbt_s")] {
        let want = 5.0 * runs[0][measured]["p95"].as_f64().expect("p95");
        assert!((doc["slo"][slo].as_f64().expect("objective") - want).abs() <= 1e-9 * want, "{slo}: {}", doc["slo"]);
    }
    assert!(stdout.contains("chunked: met at 1000 req/s"), "{stdout}");

    // Latency lines for both schedules, and a timeline panel for each.
    let svg = std::fs::read_to_string(&plot).expect("svg");
    assert_eq!(svg.matches("<polyline").count(), 2 * 2 + 2 * 2, "p95 TTFT and p95 TBT, CDFs, a line per schedule");
    for title in ["chunked at 1000 req/s", "nexus 64/68 at 1000 req/s", "prefill lane", "decode lane", "mixed lane"] {
        assert!(svg.contains(title), "no {title} in the plot");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_schedules_are_refused_before_the_model_loads() {
    for (flags, want) in [
        (&["--schedule", "nexus", "--prefill-sms", "0"][..], "--prefill-sms 0"),
        (&["--schedule", "nexus", "--prefill-sms", "64,132"][..], "--prefill-sms 132"),
        (&["--prefill-sms", "64"][..], "needs --schedule nexus"),
        (&["--prefill-tokens", "512"][..], "--prefill-tokens needs --schedule nexus"),
        (&["--schedule", "nexus", "--prefill-sms", "64", "--prefill-tokens", "0"][..], "at least one prompt token"),
        (&["--schedule", "nexus", "--prefill-sms", "64", "--prefill-tokens", "512,0"][..], "at least one prompt token"),
        (&["--schedule", "nexus", "--prefill-sms", "64", "--prefill-tokens", "512..256"][..], "must be larger"),
        (&["--schedule", "nexus", "--prefill-sms", "64", "--prefill-tokens", "512..x"][..], "give N or N..M"),
        (&["--rate", "1,2", "--plot", "x.svg", "--plot-timeline-rate", "3"][..], "--plot-timeline-rate 3"),
        (&["--rate", "1,nan"][..], "--rate"),
        (&["--burstiness", "0"][..], "--burstiness"),
        (&["--max-concurrency", "0"][..], "--max-concurrency"),
        (&["--random-input-len", "5"][..], "need --workload random"),
        (&["--workload", "random", "--random-range-ratio", "1"][..], "range ratio 1"),
        (&["--workload", "random", "--random-output-len", "0"][..], "at least 1 token"),
        (&["--percentile-metrics", "ttft,tbt"][..], "unknown metric \"tbt\""),
        (&["--metric-percentiles", "50,101"][..], "in [0, 100]"),
        (&["--goodput", "ttft:500", "itl:5"][..], "per request"),
        (&["--goodput", "ttft"][..], "METRIC:MS"),
        (&["--slo-scale", "0.5"][..], "--slo-scale must be"),
        (&["--schedule", "nexus", "--decode-target-ms", "0"][..], "positive milliseconds"),
        (&["--schedule", "nexus", "--decode-target-ms", "nine"][..], "or none"),
        (&["--schedule", "nexus", "--decode-target-ms", "10..5"][..], "at least the one without"),
        (&["--simulated-beside", "1,1.2"][..], "--simulate"),
        (&["--schedule", "nexus", "--decode-target-ms", "10", "--backlog-tokens", "9000"][..], "T..B"),
        (&["--simulate", "/nonexistent/profile.json"][..], "/nonexistent/profile.json"),
        (&["--slo-scale", "5", "--slo-ttft-ms", "100", "--slo-tbt-ms", "10"][..], "cannot be used with"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_nexus"))
            .args(["bench", "--device", "cpu", "--num-requests", "1", "--model", "/nonexistent/model.gguf"])
            .args(flags)
            .output()
            .expect("run nexus bench");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(want), "{flags:?}: {stderr}");
    }
}

#[test]
fn a_simulated_h200_runs_both_schedules_from_a_committed_profile() {
    let profile = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../bench-results/nexus-vs-chunked-h200/llama-3.1-8b-r11-profile.json");
    let run = |model: &str, flags: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_nexus"))
            .args(["bench", "--model", model, "--workload", "mixed", "--num-requests", "12", "--rate", "20"])
            .arg("--simulate")
            .arg(&profile)
            .args(flags)
            .output()
            .expect("run nexus bench")
    };
    let flags = ["--schedule", "chunked,nexus", "--decode-target-ms", "10..14", "--prefill-tokens", "2048..8192"];
    let out = run("synthetic:llama-3.1-8b", &[&flags[..], &["--simulated-beside", "1.1,1.2"]].concat());
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "nexus bench failed: {stderr}");
    assert!(stderr.contains("simulating NVIDIA H200 (132 SMs)"), "{stderr}");
    let nexus = "nexus controlled, 10 ms target (14 ms with 8192 prompt tokens waiting), prefill 2048 tokens, 8192 \
                 with a backlog";
    for row in
        ["| chunked | 20 | mixed |", &format!("| {nexus} | 20 | prefill |"), &format!("| {nexus} | 20 | decode |")]
    {
        assert!(stdout.contains(row), "no row {row} in\n{stdout}");
    }
    for arm in ["chunked", nexus] {
        assert!(stdout.contains(&format!("| {arm} | 20 | 12 |")), "{arm} completed every request: {stdout}");
    }
    // On the device's virtual clock, the same run twice prints the same report.
    let virtual_time = [&flags[..], &["--simulated-virtual-time"]].concat();
    let (once, twice) = (run("synthetic:llama-3.1-8b", &virtual_time), run("synthetic:llama-3.1-8b", &virtual_time));
    assert!(once.status.success(), "nexus bench failed: {}", String::from_utf8_lossy(&once.stderr));
    assert!(String::from_utf8_lossy(&once.stdout).contains(&format!("| {nexus} | 20 | 12 |")));
    assert_eq!(once.stdout, twice.stdout);
    // The profile is of one model, and the simulated steps at least as slow beside the other lane.
    let other = run("synthetic:qwen2.5-3b", &[]);
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success() && stderr.contains("is a profile of synthetic:llama-3.1-8b"), "{stderr}");
    let faster = run("synthetic:llama-3.1-8b", &["--simulated-beside", "0.5,1"]);
    let stderr = String::from_utf8_lossy(&faster.stderr);
    assert!(!faster.status.success() && stderr.contains("at least as slow beside"), "{stderr}");
}

/// A `nexus serve` on the CPU backend on a free loopback port.
fn start_server() -> Server {
    let mut serve = Command::new(env!("CARGO_BIN_EXE_nexus"));
    serve
        .args(["serve", "--device", "cpu", "--port", "0", "--served-model-name", "smollm2", "--model"])
        .arg(model())
        .stderr(Stdio::inherit());
    Server::spawn(serve)
}

/// Runs `nexus bench` with `args`, asserts it succeeded, and returns its stdout and the runs of
/// its `--save-result` file, one JSON object per line.
fn bench_saving(args: &[&str], result: &Path) -> (String, Vec<Value>) {
    let out = Command::new(env!("CARGO_BIN_EXE_nexus"))
        .arg("bench")
        .args(args)
        .arg("--save-result")
        .arg(result)
        .output()
        .expect("run nexus bench");
    assert!(out.status.success(), "nexus bench {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(result).expect("the result file");
    let runs = text.lines().map(|l| serde_json::from_str(l).expect("a JSON object per line")).collect();
    (String::from_utf8_lossy(&out.stdout).into_owned(), runs)
}

/// Runs `command` (a `nexus bench` invocation) with `--json json`, asserts it succeeded, and
/// returns its stdout and the JSON report.
fn bench_json(command: &mut Command, json: &Path) -> (String, Value) {
    let out = command.arg("--json").arg(json).output().expect("run nexus bench");
    assert!(out.status.success(), "nexus bench failed: {}", String::from_utf8_lossy(&out.stderr));
    let doc = serde_json::from_str(&std::fs::read_to_string(json).expect("json")).expect("parse");
    (String::from_utf8_lossy(&out.stdout).into_owned(), doc)
}

fn f64_of(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("{v} is not a number"))
}

/// The integers of a JSON array.
fn ints(v: &Value) -> Vec<u64> {
    v.as_array().expect("an array").iter().map(|x| x.as_u64().expect("an integer")).collect()
}

#[test]
fn vllm_load_shapes_metrics_and_results_against_a_server() {
    let server = start_server();
    let dir = std::env::temp_dir().join(format!("nexus-bench-vllm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (result, json, plot) = (dir.join("result.json"), dir.join("bench.json"), dir.join("bench.svg"));
    // Six random requests of 4 to 12 prompt tokens and 2 to 6 output tokens, all at once, at
    // most two in flight.
    let url = server.base.as_str();
    let (stdout, runs) = bench_saving(
        &[
            "--url",
            url,
            "--dataset-name",
            "random",
            "--random-input-len",
            "8",
            "--random-output-len",
            "4",
            "--random-range-ratio",
            "0.5",
            "--num-prompts",
            "6",
            "--request-rate",
            "inf",
            "--max-concurrency",
            "2",
            "--percentile-metrics",
            "ttft,tpot,itl,e2el",
            "--metric-percentiles",
            "50,90,99",
            "--goodput",
            "ttft:600000",
            "tpot:600000",
            "e2el:600000",
            "--seed",
            "1",
            "--json",
            json.to_str().expect("path"),
            "--plot",
            plot.to_str().expect("path"),
        ],
        &result,
    );
    assert!(stdout.contains("| TTFT | TPOT | ITL | E2EL | req/s | goodput (req/s) |"), "{stdout}");
    assert!(stdout.contains("at most 2 in flight") && stdout.contains("| inf |"), "{stdout}");
    assert_eq!(runs.len(), 1);
    let run = &runs[0];
    assert_eq!((run["completed"].as_u64(), run["failed"].as_u64()), (Some(6), Some(0)), "{run}");
    assert_eq!(
        (&run["request_rate"], &run["max_concurrency"], &run["burstiness"]),
        (&"inf".into(), &2.into(), &1.0.into())
    );
    assert_eq!(
        (&run["backend"], &run["model_id"], &run["num_prompts"]),
        (&"openai".into(), &"smollm2".into(), &6.into())
    );
    assert_eq!(run["nexus"]["peak_concurrency"], 2, "never more than two in flight");
    let (input_lens, output_lens) = (ints(&run["input_lens"]), ints(&run["output_lens"]));
    assert!(input_lens.iter().all(|l| (4..=12).contains(l)) && output_lens.iter().all(|l| (2..=6).contains(l)));
    assert_eq!(run["total_input_tokens"], input_lens.iter().sum::<u64>());
    assert_eq!(run["total_output_tokens"], output_lens.iter().sum::<u64>());
    // Per request: a TTFT, one ITL per token after the first, no error.
    let itls = run["itls"].as_array().expect("itls");
    for (i, len) in output_lens.iter().enumerate() {
        assert_eq!(itls[i].as_array().expect("a request's ITLs").len() as u64, len - 1, "request {i}");
        assert!(f64_of(&run["ttfts"][i]) > 0.0 && run["errors"][i] == "", "request {i}");
    }
    for metric in ["ttft", "tpot", "itl", "e2el"] {
        for stat in ["mean", "median", "std", "p50", "p90", "p99"] {
            let v = f64_of(&run[format!("{stat}_{metric}_ms")]);
            assert!(v.is_finite() && v >= 0.0, "{stat}_{metric}_ms {v}");
        }
        assert!(f64_of(&run[format!("p50_{metric}_ms")]) <= f64_of(&run[format!("p99_{metric}_ms")]));
    }
    // E2EL, TTFT and TPOT of each request agree: E2EL = TTFT + TPOT · (tokens - 1) on average.
    assert!(f64_of(&run["mean_e2el_ms"]) > f64_of(&run["mean_ttft_ms"]));
    // Objectives nothing misses: every completed request is good.
    assert_eq!(run["request_goodput"], run["request_throughput"]);
    let total =
        (run["total_input_tokens"].as_u64().expect("in") + run["total_output_tokens"].as_u64().expect("out")) as f64;
    assert!((f64_of(&run["total_token_throughput"]) - total / f64_of(&run["duration"])).abs() < 1e-6, "{run}");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("parse");
    assert_eq!((&doc["max_concurrency"], &doc["runs"][0]["rate"]), (&2.into(), &"inf".into()));
    assert_eq!(doc["goodput"]["ttft_ms"], 600_000.0);
    let svg = std::fs::read_to_string(&plot).expect("svg");
    for title in ["TTFT distribution", "ITL (TBT) distribution", "inf req/s"] {
        assert!(svg.contains(title), "no {title} in the plot");
    }

    // Bursty arrivals at a finite rate, a text prompt (its length as the server counts it), and an
    // objective nothing meets.
    let jsonl = dir.join("requests.jsonl");
    let lines = [
        "{\"prompt\": \"Once upon a time\", \"output_len\": 2}",
        "{\"prompt_token_ids\": [1, 2, 3], \"output_len\": 3}",
    ];
    std::fs::write(&jsonl, lines.join("\n")).expect("write");
    let workload = format!("jsonl:{}", jsonl.display());
    let (_, runs) = bench_saving(
        &["--url", url, "--workload", &workload, "--rate", "20", "--burstiness", "0.5", "--goodput", "ttft:0"],
        &result,
    );
    let run = &runs[0];
    assert_eq!(
        (&run["request_rate"], &run["burstiness"], &run["max_concurrency"]),
        (&20.0.into(), &0.5.into(), &Value::Null)
    );
    assert_eq!((run["completed"].as_u64(), run["request_goodput"].as_f64()), (Some(2), Some(0.0)), "{run}");
    let input_lens = ints(&run["input_lens"]);
    assert!(input_lens[0] >= 4 && input_lens[1] == 3, "{input_lens:?}");
    assert_eq!(ints(&run["output_lens"]), [2, 3]);
    // vLLM's default metrics: TTFT, TPOT and ITL at p99.
    assert!(run.get("p99_itl_ms").is_some() && run.get("mean_e2el_ms").is_none() && run.get("p50_ttft_ms").is_none());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn vllm_load_shapes_run_in_process() {
    let dir = std::env::temp_dir().join(format!("nexus-bench-vllm-in-process-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let result = dir.join("result.json");
    let model = model();
    let (stdout, runs) = bench_saving(
        &[
            "--device",
            "cpu",
            "--model",
            model.to_str().expect("path"),
            "--workload",
            "random",
            "--random-input-len",
            "6",
            "--random-output-len",
            "3",
            "--num-requests",
            "4",
            "--rate",
            "inf,50",
            "--burstiness",
            "4",
            "--max-concurrency",
            "1",
            "--percentile-metrics",
            "e2el",
            "--metric-percentiles",
            "50",
        ],
        &result,
    );
    assert!(stdout.contains("| chunked | inf |") && stdout.contains("| chunked | 50 |"), "{stdout}");
    assert!(stdout.contains("gamma arrivals of burstiness 4, at most 1 in flight"), "{stdout}");
    assert_eq!(runs.len(), 2, "a line per rate");
    for (run, rate) in runs.iter().zip([Value::from("inf"), Value::from(50.0)]) {
        assert_eq!((&run["request_rate"], &run["backend"], &run["label"]), (&rate, &"nexus".into(), &"chunked".into()));
        assert_eq!((run["completed"].as_u64(), run["burstiness"].as_f64()), (Some(4), Some(4.0)));
        assert_eq!(run["nexus"]["peak_concurrency"], 1);
        assert_eq!((ints(&run["input_lens"]), ints(&run["output_lens"])), (vec![6; 4], vec![3; 4]));
        assert!(f64_of(&run["p50_e2el_ms"]) > 0.0 && run.get("mean_ttft_ms").is_none(), "{run}");
        assert_eq!(run["request_goodput"], Value::Null, "no --goodput");
    }
    std::fs::remove_dir_all(&dir).ok();
}
