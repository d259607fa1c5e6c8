//! `nexus bench` end to end on the CPU backend: a two-rate sweep writes its table, JSON and plot,
//! and judges the rates against an objective;
//! a JSONL workload of text and token-id prompts runs in-process; bad workloads and flags fail
//! with a message.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn a_small_sweep_reports_every_rate() {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.is_file(), "{} is missing: run scripts/fetch-model.sh first", model.display());
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
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("parse");
    let runs = doc["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2);
    for run in runs {
        assert_eq!(run["ttft_s"]["count"], 3);
        assert!(run["ttft_s"]["p50"].as_f64().expect("p50") > 0.0);
    }
    // An objective nothing misses: every rate meets it, and the throughput is the highest.
    assert!(stdout.contains("met at 20, 40 req/s"), "table:\n{stdout}");
    assert_eq!(doc["slo"]["throughput"], 40.0);
    assert_eq!(doc["slo"]["rates_met"], serde_json::json!([20.0, 40.0]));
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
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
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
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("parse");
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
