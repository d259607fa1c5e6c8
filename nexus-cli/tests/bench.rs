//! `nexus bench` end to end on the CPU backend: a two-rate sweep writes its table, JSON and plot.

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
        .args(["bench", "--device", "cpu", "--workload", "sharegpt", "--rate", "20,40", "--num-requests", "3"])
        .args(["--seed", "3", "--cpu-kv-blocks", "512", "--model"])
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
