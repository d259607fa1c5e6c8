//! `nexus profile` and the controller of the `nexus` schedule on the CPU backend (whose budgets
//! are nominal: the plumbing is what is checked here, the GPU machine runs the real profile): a
//! profile of a tiny synthetic model is measured, saved and read back; `nexus bench --schedule
//! nexus` splits the SMs with it, on the controller's grid; without a usable profile (none, or one
//! made for another model) `--schedule nexus` is refused with the command that makes one.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn nexus(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nexus"))
        .args(args)
        .env("NEXUS_CACHE_DIR", cache)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run nexus")
}

#[test]
fn a_profile_drives_the_controller_and_nexus_needs_one() {
    let dir = std::env::temp_dir().join(format!("nexus-profile-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let bench =
        ["bench", "--device", "cpu", "--model", "synthetic:tiny", "--schedule", "nexus", "--workload", "random"];
    let small = ["--random-input-len", "48", "--random-output-len", "6", "--num-requests", "10", "--rate", "inf"];
    let ids = ["--token-id-range", "1..500"];

    // No profile yet: refused before anything loads, saying how to make one.
    let missing = nexus(&[&bench[..], &small, &ids].concat(), &dir);
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(missing.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("nexus profile --model synthetic:tiny"), "{stderr}");

    // Profiled into the cache folder, where bench finds it.
    let samples = dir.join("measurements.json");
    let samples = samples.to_str().expect("path");
    let profile_args = ["profile", "--device", "cpu", "--model", "synthetic:tiny", "--quick", "--grid", "32"];
    let made = nexus(&[&profile_args[..], &["--samples", samples]].concat(), &dir);
    let stdout = String::from_utf8_lossy(&made.stdout);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    assert!(stdout.contains("prediction error on held-out whole steps"), "{stdout}");
    let saved = stdout.lines().find_map(|l| l.strip_prefix("saved ")).expect("the path it saved to");
    let read =
        |path: &str| -> Value { serde_json::from_str(&std::fs::read_to_string(path).expect("file")).expect("JSON") };
    let profile = read(saved);
    assert_eq!((profile["device"].as_str(), profile["model"].as_str()), (Some("CPU"), Some("synthetic:tiny")));
    assert!(profile["cost_model"]["gemm"]["flops_per_sm"].as_f64().is_some_and(|f| f > 0.0), "{profile}");
    // The measurements fit again, without a device, to the same model, for the device and model
    // they were made on; measurements of another model are refused.
    let again = dir.join("again.json");
    let again = again.to_str().expect("path");
    let refit = nexus(&["profile", "--refit", samples, "--out", again], &dir);
    assert!(refit.status.success(), "{}", String::from_utf8_lossy(&refit.stderr));
    assert_eq!(read(again), profile);
    let other = nexus(&["profile", "--refit", samples, "--model", "synthetic:qwen2.5-3b"], &dir);
    assert!(String::from_utf8_lossy(&other.stderr).contains("measurements of synthetic:tiny"), "{other:?}");

    let json = dir.join("bench.json");
    let run = nexus(&[&bench[..], &small, &ids, &["--json", json.to_str().expect("path")]].concat(), &dir);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("parse");
    let run = &doc["runs"][0];
    assert_eq!((run["schedule"].as_str(), run["completed"].as_u64()), (Some("nexus controlled"), Some(10)));
    for it in run["timeline"].as_array().expect("timeline") {
        let budget = it["budget"].as_u64().expect("budget");
        // Decode on the grid of 32 SMs, prefill the rest, or either alone on all 132.
        let on_grid = match it["lane"].as_str() {
            Some("decode") => budget % 32 == 0,
            _ => (132 - budget) % 32 == 0,
        };
        assert!(budget == 132 || on_grid, "{it}");
        // The controller predicted every iteration's time.
        assert!(it["predicted_s"].as_f64().is_some_and(|p| p > 0.0), "{it}");
    }
    for lane in run["timeline_summary"]["lanes"].as_array().expect("lanes") {
        assert!(lane["prediction_error"]["p90"].as_f64().is_some_and(|e| e >= 0.0), "{lane}");
    }
    // The controller with decode targets instead of the prefill slack serves the same trace, one
    // run for each target, and `none` for the prefill slack beside them.
    let target = nexus(&[&bench[..], &small, &ids, &["--decode-target-ms", "none,5,50"]].concat(), &dir);
    assert!(target.status.success(), "{}", String::from_utf8_lossy(&target.stderr));
    let stdout = String::from_utf8_lossy(&target.stdout);
    for arm in [
        "| nexus controlled | inf |",
        "| nexus controlled, 5 ms target | inf |",
        "| nexus controlled, 50 ms target | inf |",
    ] {
        assert!(stdout.contains(arm), "{arm} in {target:?}");
    }

    // A profile of another model is refused, naming what it was made for.
    let other = ["bench", "--device", "cpu", "--model", "models/none.gguf", "--schedule", "nexus", "--profile", saved];
    let refused = nexus(&other, &dir);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("made for model synthetic:tiny"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}
