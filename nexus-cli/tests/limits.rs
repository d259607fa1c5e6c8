//! Sizes and paths a user gives `nexus`, refused at once with a message that says what to change,
//! never an overflow, a hang or an abort: `generate --max-tokens` beyond the model's context
//! (u64::MAX used to wrap), a FIFO as `--model` (which used to block forever), and a
//! `--cpu-kv-blocks` the machine cannot hold (which used to abort allocating it). On the CPU
//! backend with SmolLM2.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn model_path() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.is_file(), "{} is missing: run scripts/fetch-model.sh first", path.display());
    path
}

/// Runs `nexus` with `args` and returns its output, failing the test (and killing it) if it does
/// not exit within 60 s.
fn run(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nexus"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nexus");
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let output = child.wait_with_output().expect("output");
            panic!("nexus {args:?} still running after 60 s; stderr: {}", String::from_utf8_lossy(&output.stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

/// Asserts that `output` is a clean failure (exit status 1, not a signal) whose stderr has
/// every one of `needles`.
#[track_caller]
fn assert_refused(output: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{}; stderr: {stderr}", output.status);
    for needle in needles {
        assert!(stderr.contains(needle), "stderr should mention `{needle}`: {stderr}");
    }
}

fn generate(extra: &[&str]) -> Output {
    let model = model_path();
    let mut args = vec!["generate", "--device", "cpu", "--model", model.to_str().expect("UTF-8"), "--prompt", "Hi"];
    args.extend(extra);
    run(&args)
}

#[test]
fn generate_refuses_max_tokens_beyond_the_context() {
    // "Hi" is one token (SmolLM2 adds no BOS), so 8191 more fill the context of 8192 exactly.
    for max_tokens in [u64::MAX.to_string(), "8192".to_owned()] {
        let output = generate(&["--max-tokens", &max_tokens]);
        assert_refused(
            &output,
            &[&format!("--max-tokens asks for {max_tokens} more"), "context is 8192", "give --max-tokens 8191 or less"],
        );
    }
    let output = generate(&["--max-tokens", "0"]);
    assert_refused(&output, &["--max-tokens must be at least 1"]);
    // Within the context it generates, and says how many tokens.
    let output = generate(&["--max-tokens", "3", "--ignore-eos"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("generated 3 tokens"), "{stderr}");
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("Hi"));
}

#[test]
fn a_fifo_as_model_is_refused_without_blocking() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("limits-fifo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create folder");
    let fifo = dir.join("model.gguf");
    let _ = std::fs::remove_file(&fifo);
    assert!(Command::new("mkfifo").arg(&fifo).status().expect("run mkfifo").success());
    let output = run(&["generate", "--device", "cpu", "--prompt", "Hi", "--model", fifo.to_str().expect("UTF-8")]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_refused(&output, &["model.gguf is a FIFO, socket or device, not a regular file"]);
}

#[test]
fn serve_refuses_a_kv_cache_the_machine_cannot_hold() {
    let model = model_path();
    let serve = |blocks: &str| {
        run(&[
            "serve",
            "--device",
            "cpu",
            "--port",
            "0",
            "--model",
            model.to_str().expect("UTF-8"),
            "--cpu-kv-blocks",
            blocks,
        ])
    };
    // 10^9 blocks of SmolLM2 (2.8 MiB each) are 2.6 PiB.
    let output = serve("1000000000");
    assert_refused(
        &output,
        &["the KV cache does not fit: give fewer --cpu-kv-blocks", "1000000000 blocks of 64 tokens", "available"],
    );
    let output = serve(&u64::MAX.to_string());
    assert_refused(&output, &["give fewer --cpu-kv-blocks", "block ids are 32-bit"]);
}
