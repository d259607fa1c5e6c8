//! `nexus bench` end to end on the CPU backend: a two-rate sweep writes its table, JSON and plot,
//! and judges the rates against an objective; a JSONL workload of text and token-id prompts runs
//! in-process; `chunked` and a `nexus` split run the same trace in one invocation, each with its
//! timeline in the JSON and the plot; bad workloads and flags fail with a message.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn model() -> PathBuf {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.is_file(), "{} is missing: run scripts/fetch-model.sh first", model.display());
    model
}

#[test]
fn a_small_sweep_reports_every_rate() {
    let model = model();
    let dir = std::env::temp_dir().join(format!("nexus-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (json, plot) = (dir.join("bench.json"), dir.join("bench.svg"));
    let out = Command::new(env!("CARGO_BIN_EXE_nexus"))
        .args(["bench", "--device", "cpu", "--workload", "sharegpt", "--sweep", "20,40", "--num-requests", "3"])
        .args(["--seed", "3", "--cpu-kv-blocks", "512", "--slo-ttft-ms", "1e9", "--slo-tbt-ms", "1e9", "--model"])
        .arg(&model)
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(&plot)
        .output()
        .expect("run nexus bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "nexus bench failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("| 20 |") && stdout.contains("| 40 |"), "table:\n{stdout}");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("parse");
    let runs = doc["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2);
    for run in runs {
        assert_eq!(run["ttft_s"]["count"], 3);
        assert!(run["ttft_s"]["p50"].as_f64().expect("p50") > 0.0);
    }
    // An objective nothing misses: every rate meets it, and the throughput is the highest.
    assert!(stdout.contains("met at 20, 40 req/s"), "table:\n{stdout}");
    assert_eq!(doc["slo"]["schedules"][0]["schedule"], "chunked");
    assert_eq!(doc["slo"]["schedules"][0]["throughput"], 40.0);
    assert_eq!(doc["slo"]["schedules"][0]["rates_met"], serde_json::json!([20.0, 40.0]));
    let svg = std::fs::read_to_string(&plot).expect("svg");
    assert!(svg.starts_with("<svg") && svg.matches("<polyline").count() == 2);
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
    let out = Command::new(env!("CARGO_BIN_EXE_nexus"))
        .args(["bench", "--device", "cpu", "--rate", "100", "--num-requests", "3", "--model"])
        .arg(&model)
        .arg(format!("--workload=jsonl:{}", good.display()))
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run nexus bench");
    assert!(out.status.success(), "nexus bench failed: {}", String::from_utf8_lossy(&out.stderr));
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("parse");
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
    // Four requests of 6 to 15 prompt tokens and 4 output tokens, arriving at once.
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| (0..6 + 3 * i).map(|j| 1000 + 17 * (8 * i + j)).collect()).collect();
    let lines: Vec<String> =
        prompts.iter().map(|p| serde_json::json!({ "prompt_token_ids": p, "output_len": 4 }).to_string()).collect();
    let workload = dir.join("requests.jsonl");
    std::fs::write(&workload, lines.join("\n")).expect("write");
    let (json, plot) = (dir.join("bench.json"), dir.join("bench.svg"));
    let out = Command::new(env!("CARGO_BIN_EXE_nexus"))
        .args(["bench", "--device", "cpu", "--rate", "1000", "--schedule", "chunked,nexus", "--prefill-sms", "64"])
        .arg(format!("--workload=jsonl:{}", workload.display()))
        .arg("--model")
        .arg(model())
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(&plot)
        .output()
        .expect("run nexus bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "nexus bench failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("| chunked | 1000 |") && stdout.contains("| nexus 64/68 | 1000 |"), "{stdout}");
    // The lanes under the table.
    for lane in ["| chunked | 1000 | mixed |", "| nexus 64/68 | 1000 | prefill |", "| nexus 64/68 | 1000 | decode |"] {
        assert!(stdout.contains(lane), "no row {lane} in\n{stdout}");
    }

    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("parse");
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
        assert_eq!((run["completed"].as_u64(), run["failed"].as_u64()), (Some(4), Some(0)), "{schedule}");
        assert_eq!(run["preemptions"], 0);
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

    // Latency lines for both schedules, and a timeline panel for each.
    let svg = std::fs::read_to_string(&plot).expect("svg");
    assert_eq!(svg.matches("<polyline").count(), 2 * 2, "p95 TTFT and p95 TBT, a line per schedule");
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
        (&["--rate", "1,2", "--plot", "x.svg", "--plot-timeline-rate", "3"][..], "--plot-timeline-rate 3"),
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
