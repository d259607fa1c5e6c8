//! `nexus serve` on the CPU backend with SmolLM2, on a loopback port, driven by a real HTTP
//! client: chat (streaming and not), completions, token-id prompts with `return_token_ids` and
//! `min_tokens`, logit bias, min-p, stop strings kept, chat content parts and tool messages,
//! every bad request (each a JSON error, 404, 405 and 413 included), a client that disconnects
//! mid-stream or before its first token (its blocks are freed at the next step), 32 concurrent
//! clients on the chunked and on the nexus schedule (the same greedy tokens; each lane's budget
//! and iterations in `/metrics`), requests the engine fails (a model whose activations overflow
//! into NaN on one token), graceful shutdown on SIGTERM and SIGINT, read timeouts and the
//! connection limit, latency clocks from HTTP arrival, bad schedules, the API key, `nexus
//! bench --url` replaying a JSONL workload against the server, and a simulated H200
//! (`--simulate`) serving synthetic Llama-3.1-8B with the controller.
//!
//! The same tests run on the GPU machine against the CUDA backend with
//! `NEXUS_TEST_DEVICE=cuda`; there `NEXUS_BIN` names the staged `nexus` binary and
//! `NEXUS_MODEL` the model file (the paths this test was built with do not exist there; the
//! failing model, built from a fixture compiled into this test, runs on the CPU everywhere).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
use common::Server;

const MODEL_NAME: &str = "smollm2";

fn model_path() -> PathBuf {
    let path = std::env::var_os("NEXUS_MODEL").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        PathBuf::from,
    );
    assert!(path.is_file(), "{} is missing: run scripts/fetch-model.sh first", path.display());
    path
}

/// The `nexus` binary: `$NEXUS_BIN`, else the one cargo built with this test.
fn nexus() -> Command {
    Command::new(std::env::var_os("NEXUS_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_nexus").into()))
}

/// The backend the server runs on: `$NEXUS_TEST_DEVICE`, else the CPU.
fn device() -> String {
    std::env::var("NEXUS_TEST_DEVICE").unwrap_or_else(|_| "cpu".into())
}

fn start(extra: &[&str]) -> Server {
    start_model(&model_path(), &device(), extra)
}

/// Starts `nexus serve` on `model` and `device`, with `extra` flags.
fn start_model(model: &Path, device: &str, extra: &[&str]) -> Server {
    let mut serve = nexus();
    serve
        .args(["serve", "--device", device, "--port", "0", "--served-model-name", MODEL_NAME, "--model"])
        .arg(model)
        .args(extra)
        .stderr(Stdio::inherit());
    Server::spawn(serve)
}

/// Runs `nexus serve` with `flags`, which it must refuse within a minute; returns its stderr.
fn refused_at_startup(flags: &[&str]) -> String {
    let mut child = nexus()
        .args(["serve", "--device", "cpu", "--port", "0", "--model"])
        .arg(model_path())
        .args(flags)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nexus serve");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("nexus serve {flags:?} started instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("its output");
    assert!(!out.status.success(), "{flags:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

fn post(server: &Server, path: &str, body: &str) -> (u16, Value) {
    let mut response = agent()
        .post(&format!("{}{path}", server.base))
        .header("Content-Type", "application/json")
        .send(body)
        .expect("POST");
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn get(server: &Server, path: &str) -> (u16, Value) {
    let mut response = agent().get(&format!("{}{path}", server.base)).call().expect("GET");
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn chat(content: &str, extra: Value) -> String {
    let mut body = json!({
        "model": MODEL_NAME,
        "messages": [{ "role": "user", "content": content }],
        "max_tokens": 24,
        "temperature": 0
    });
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    body.to_string()
}

/// The `data:` payloads of a server-sent-event stream, up to `[DONE]`.
fn sse_events(reader: impl Read) -> Vec<Value> {
    let mut events = Vec::new();
    for line in BufReader::new(reader).lines() {
        let line = line.expect("read the stream");
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            return events;
        }
        events.push(serde_json::from_str(data).expect("a JSON event"));
    }
    panic!("the stream ended without [DONE]");
}

fn metric(server: &Server, name: &str) -> f64 {
    let text = agent()
        .get(&format!("{}/metrics", server.base))
        .call()
        .expect("metrics")
        .body_mut()
        .read_to_string()
        .expect("body");
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
}

#[test]
fn chat_completions_models_and_health() {
    let server = start(&[]);
    let (status, health) = get(&server, "/health");
    assert_eq!((status, &health["status"]), (200, &json!("ok")), "{health}");
    let mut models = agent().get(&format!("{}/v1/models", server.base)).call().expect("models");
    let models: Value = serde_json::from_str(&models.body_mut().read_to_string().expect("body")).expect("json");
    assert_eq!(models["data"][0]["id"], MODEL_NAME);
    assert!(models["data"][0]["max_model_len"].as_u64().expect("max_model_len") >= 2048);

    // Non-streaming chat: the greedy answer of the oracle fixtures.
    let (status, body) = post(&server, "/v1/chat/completions", &chat("What is the capital of France?", json!({})));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["content"], "The capital of France is Paris.");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let usage = &body["usage"];
    assert_eq!(
        usage["total_tokens"],
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );

    // Streaming chat gives the same text, piece by piece, then a finish reason and usage.
    let response = agent()
        .post(&format!("{}/v1/chat/completions", server.base))
        .send(chat(
            "What is the capital of France?",
            json!({ "stream": true, "stream_options": { "include_usage": true } }),
        ))
        .expect("POST");
    assert_eq!(response.status().as_u16(), 200);
    let events = sse_events(response.into_body().into_reader());
    let text: String = events.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, "The capital of France is Paris.");
    let last = events.last().expect("events");
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["usage"]["completion_tokens"], body["usage"]["completion_tokens"]);

    // Completions with a stop string and max_tokens.
    let body = json!({ "model": MODEL_NAME, "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0, "stop": ["."] });
    let (status, body) = post(&server, "/v1/completions", &body.to_string());
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["text"], " Paris");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let body = json!({ "model": MODEL_NAME, "prompt": "1, 2, 3,", "max_tokens": 3, "temperature": 0 });
    let (_, body) = post(&server, "/v1/completions", &body.to_string());
    assert_eq!(
        (body["choices"][0]["finish_reason"].as_str(), body["usage"]["completion_tokens"].as_u64()),
        (Some("length"), Some(3))
    );
    // A seed makes sampling reproducible.
    let sampled = json!({ "model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 16, "temperature": 1.0, "top_p": 0.9, "seed": 5 });
    let (_, a) = post(&server, "/v1/completions", &sampled.to_string());
    let (_, b) = post(&server, "/v1/completions", &sampled.to_string());
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    // Penalties change the greedy output: counting on, it repeats its most frequent token less.
    let counting = |extra: Value| {
        let mut body = json!({ "model": MODEL_NAME, "prompt": "1, 2, 3,", "max_tokens": 16, "temperature": 0, "return_token_ids": true });
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        let (status, body) = post(&server, "/v1/completions", &body.to_string());
        assert_eq!(status, 200, "{body}");
        ids(&body["choices"][0]["token_ids"])
    };
    let most_repeated = |ids: &[u64]| ids.iter().map(|t| ids.iter().filter(|u| *u == t).count()).max().unwrap_or(0);
    let plain = counting(json!({}));
    let penalized = counting(json!({ "frequency_penalty": 2.0, "presence_penalty": 1.0, "repetition_penalty": 1.5 }));
    assert!(
        most_repeated(&penalized) < most_repeated(&plain),
        "penalized {penalized:?} repeats as much as plain {plain:?}"
    );
    // Log-probabilities: completions' format, greedy picks the most likely token, the token
    // strings spell the text.
    let body = json!({ "model": MODEL_NAME, "prompt": "1, 2, 3,", "max_tokens": 6, "temperature": 0, "logprobs": 3 });
    let (status, with_lp) = post(&server, "/v1/completions", &body.to_string());
    assert_eq!(status, 200, "{with_lp}");
    let lp = &with_lp["choices"][0]["logprobs"];
    let tokens: Vec<&str> =
        lp["tokens"].as_array().expect("tokens").iter().map(|t| t.as_str().expect("a string")).collect();
    assert_eq!(tokens.len(), 6);
    assert_eq!(tokens.concat(), with_lp["choices"][0]["text"].as_str().expect("text"));
    let offsets: Vec<u64> =
        lp["text_offset"].as_array().expect("offsets").iter().map(|o| o.as_u64().expect("int")).collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
    for (i, top) in lp["top_logprobs"].as_array().expect("top").iter().enumerate() {
        let chosen = lp["token_logprobs"][i].as_f64().expect("logprob");
        let best =
            top.as_object().expect("a map").values().map(|v| v.as_f64().expect("logprob")).fold(f64::MIN, f64::max);
        assert!(chosen <= 0.0 && (chosen - best).abs() < 1e-5, "token {i}: {chosen} vs the best {best}");
        assert!((1..=3).contains(&top.as_object().expect("a map").len()));
    }
    // Chat's format, streamed: one entry per token over the chunks, each with its alternatives.
    let response = agent()
        .post(&format!("{}/v1/chat/completions", server.base))
        .send(chat("Say hello.", json!({ "max_tokens": 5, "logprobs": true, "top_logprobs": 2, "stream": true, "stream_options": { "include_usage": true } })))
        .expect("POST");
    let events = sse_events(response.into_body().into_reader());
    let entries: Vec<&Value> =
        events.iter().filter_map(|e| e["choices"][0]["logprobs"]["content"].as_array()).flatten().collect();
    let generated = events.last().expect("a usage chunk")["usage"]["completion_tokens"].as_u64().expect("usage");
    assert_eq!(entries.len() as u64, generated);
    for e in &entries {
        assert_eq!(e["top_logprobs"].as_array().expect("top").len(), 2);
        let bytes: Vec<u8> =
            e["bytes"].as_array().expect("bytes").iter().map(|b| b.as_u64().expect("a byte") as u8).collect();
        assert_eq!(bytes, e["token"].as_str().expect("token").as_bytes());
    }
    // A stop token id ends the output with that token (as vLLM's stop_token_ids).
    let body = json!({ "model": MODEL_NAME, "prompt": "1, 2, 3,", "max_tokens": 16, "temperature": 0,
        "return_token_ids": true, "stop_token_ids": [plain[2]] });
    let (_, stopped) = post(&server, "/v1/completions", &body.to_string());
    let first = plain.iter().position(|&t| t == plain[2]).expect("in the output");
    assert_eq!(ids(&stopped["choices"][0]["token_ids"]), plain[..=first].to_vec());
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
}

#[test]
fn bad_requests_get_an_openai_style_4xx() {
    let server = start(&[]);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("/v1/chat/completions", "{not json".into(), 400, "malformed"),
        ("/v1/chat/completions", json!({ "model": MODEL_NAME }).to_string(), 400, "messages"),
        ("/v1/chat/completions", chat("hi", json!({ "model": "gpt-4" })), 404, "does not exist"),
        ("/v1/chat/completions", chat("hi", json!({ "n": 2 })), 400, "n = 1"),
        ("/v1/chat/completions", chat("hi", json!({ "temperature": -1 })), 400, "temperature"),
        ("/v1/chat/completions", chat("hi", json!({ "top_p": 0 })), 400, "top_p"),
        ("/v1/chat/completions", chat("hi", json!({ "presence_penalty": 3 })), 400, "presence_penalty"),
        ("/v1/chat/completions", chat("hi", json!({ "frequency_penalty": -2.5 })), 400, "frequency_penalty"),
        ("/v1/chat/completions", chat("hi", json!({ "repetition_penalty": 0 })), 400, "repetition_penalty"),
        ("/v1/chat/completions", chat("hi", json!({ "top_logprobs": 3 })), 400, "top_logprobs needs logprobs"),
        ("/v1/chat/completions", chat("hi", json!({ "logprobs": true, "top_logprobs": 21 })), 400, "at most 20"),
        ("/v1/chat/completions", chat("hi", json!({ "logprobs": "yes" })), 400, "logprobs must be"),
        ("/v1/chat/completions", chat("hi", json!({ "stop_token_ids": [1_000_000] })), 400, "stop_token_ids"),
        ("/v1/chat/completions", chat("hi", json!({ "max_tokens": 0 })), 400, "max_tokens"),
        ("/v1/chat/completions", chat("hi", json!({ "max_tokens": 1_000_000 })), 400, "context"),
        ("/v1/chat/completions", chat("hi", json!({ "stop": 3 })), 400, "stop"),
        ("/v1/chat/completions", json!({ "model": MODEL_NAME, "messages": [] }).to_string(), 400, "empty"),
        (
            "/v1/chat/completions",
            json!({ "model": MODEL_NAME, "messages": [{ "role": "wizard", "content": "hi" }] }).to_string(),
            400,
            "role",
        ),
        ("/v1/completions", json!({ "model": MODEL_NAME, "prompt": ["a", "b"] }).to_string(), 400, "string"),
        ("/v1/completions", json!({ "model": MODEL_NAME, "prompt": [[1, 2], [3]] }).to_string(), 400, "batched"),
        ("/v1/completions", json!({ "model": MODEL_NAME, "prompt": [1, 49_152] }).to_string(), 400, "vocabulary"),
        ("/v1/completions", json!({ "model": MODEL_NAME, "prompt": [1, -2] }).to_string(), 400, "vocabulary"),
        ("/v1/completions", json!({ "model": MODEL_NAME, "prompt": [1.5] }).to_string(), 400, "vocabulary"),
        ("/v1/completions", json!({ "model": MODEL_NAME, "prompt": 7 }).to_string(), 400, "token ids"),
        ("/v1/completions", json!({ "model": MODEL_NAME, "prompt": [] }).to_string(), 400, "empty"),
        ("/v1/chat/completions", chat("hi", json!({ "max_tokens": 4, "min_tokens": 5 })), 400, "min_tokens"),
        ("/v1/chat/completions", chat("hi", json!({ "min_tokens": -1 })), 400, "min_tokens"),
        ("/v1/completions", json!({ "model": MODEL_NAME, "prompt": "word ".repeat(9000) }).to_string(), 400, "context"),
        ("/v1/chat/completions", chat("hi", json!({ "min_p": 1.5 })), 400, "min_p"),
        ("/v1/chat/completions", chat("hi", json!({ "logit_bias": { "x": 1 } })), 400, "logit_bias"),
        ("/v1/chat/completions", chat("hi", json!({ "logit_bias": { "49152": 1 } })), 400, "logit_bias"),
        ("/v1/chat/completions", chat("hi", json!({ "logit_bias": { "5": 101 } })), 400, "logit_bias"),
        (
            "/v1/chat/completions",
            chat("hi", json!({ "response_format": { "type": "json_object" } })),
            400,
            "response_format `json_object` is not supported",
        ),
        (
            "/v1/chat/completions",
            chat("hi", json!({ "tools": [{ "type": "function", "function": { "name": "f" } }] })),
            400,
            "tools (function calling) are not supported",
        ),
        ("/v1/chat/completions", chat("hi", json!({ "tool_choice": "auto" })), 400, "tool_choice is not supported"),
        (
            "/v1/chat/completions",
            json!({ "model": MODEL_NAME, "messages": [{ "role": "user", "content": [
                { "type": "image_url", "image_url": { "url": "http://x" } }
            ] }] })
            .to_string(),
            400,
            "`image_url` are not supported",
        ),
    ];
    for (path, body, want_status, want_message) in cases {
        let (status, response) = post(&server, path, &body);
        assert_eq!(status, want_status, "{path} {body:.80}: {response}");
        let message = response["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(want_message), "{path} {body:.80}: message {message:?}");
        assert_eq!(response["error"]["type"], "invalid_request_error");
    }
    // The server is still serving.
    let (status, _) = post(&server, "/v1/chat/completions", &chat("hi", json!({ "max_tokens": 2 })));
    assert_eq!(status, 200);
}

#[test]
fn a_client_that_disconnects_mid_stream_frees_its_blocks() {
    let server = start(&[]);
    let body = json!({ "model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": true, "stream": true });
    let response = agent().post(&format!("{}/v1/completions", server.base)).send(body.to_string()).expect("POST");
    let mut lines = BufReader::new(response.into_body().into_reader()).lines();
    let mut seen = 0;
    while seen < 3 {
        if lines.next().expect("a line").expect("read").starts_with("data: ") {
            seen += 1;
        }
    }
    assert!(metric(&server, "nexus_kv_cache_usage") > 0.0);
    drop(lines);
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&server, "nexus_requests_running") > 0.0 || metric(&server, "nexus_kv_cache_usage") > 0.0 {
        assert!(Instant::now() < deadline, "the request was not aborted");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends 32 concurrent greedy completions of 8 forced tokens to `server`; checks that each got
/// all of them and returns their token ids, by client.
fn thirty_two_clients(server: &Server) -> Vec<Vec<u64>> {
    let clients: Vec<_> = (0..32)
        .map(|i| {
            let base = server.base.clone();
            std::thread::spawn(move || {
                let body = json!({
                    "model": MODEL_NAME, "prompt": format!("Count to {i}:"), "max_tokens": 8, "ignore_eos": true,
                    "temperature": 0, "return_token_ids": true
                });
                let mut response =
                    agent().post(&format!("{base}/v1/completions")).send(body.to_string()).expect("POST");
                let status = response.status().as_u16();
                let body: Value =
                    serde_json::from_str(&response.body_mut().read_to_string().expect("body")).expect("json");
                (status, body)
            })
        })
        .collect();
    let mut outputs = Vec::new();
    for (i, client) in clients.into_iter().enumerate() {
        let (status, body) = client.join().expect("client thread");
        assert_eq!(status, 200, "client {i}: {body}");
        assert_eq!(body["usage"]["completion_tokens"], 8, "client {i}");
        outputs.push(ids(&body["choices"][0]["token_ids"]));
    }
    assert_eq!(metric(server, "nexus_requests_total"), 32.0);
    assert_eq!(metric(server, "nexus_generation_tokens_total"), 32.0 * 8.0);
    assert_eq!(metric(server, "nexus_e2e_request_latency_seconds_count"), 32.0);
    assert!(metric(server, "nexus_prompt_tokens_total") >= 32.0 * 4.0);
    assert_eq!(metric(server, "nexus_preemptions_total"), 0.0);
    outputs
}

#[test]
fn thirty_two_concurrent_clients_get_the_same_tokens_from_chunked_and_nexus() {
    // Greedy tokens depend on the batch on the GPU unless it is batch-invariant.
    let exact: &[&str] = if device() == "cpu" { &[] } else { &["--batch-invariant"] };
    let limits = ["--max-num-seqs", "16", "--max-num-batched-tokens", "256"];
    let chunked = start(&[&limits[..], exact].concat());
    let want = thirty_two_clients(&chunked);
    // The chunked schedule's one lane runs on every SM.
    let sms = metric(&chunked, "nexus_lane_budget_sms{lane=\"mixed\"}");
    assert!(metric(&chunked, "nexus_iteration_seconds_count{lane=\"mixed\"}") > 0.0);
    drop(chunked);

    let nexus = start(&[&limits[..], exact, &["--schedule", "nexus", "--prefill-sms", "64"]].concat());
    let got = thirty_two_clients(&nexus);
    for (i, (got, want)) in got.iter().zip(&want).enumerate() {
        assert_eq!(got, want, "client {i}: nexus and chunked differ");
    }
    // Each lane has its share of the SMs (or all of them, when the other had no work) and ran.
    let prefill = metric(&nexus, "nexus_lane_budget_sms{lane=\"prefill\"}");
    let decode = metric(&nexus, "nexus_lane_budget_sms{lane=\"decode\"}");
    assert!([64.0, sms].contains(&prefill) && [sms - 64.0, sms].contains(&decode), "{prefill} + {decode} of {sms}");
    for lane in ["prefill", "decode"] {
        for histogram in ["nexus_iteration_seconds", "nexus_iteration_host_seconds"] {
            let count = metric(&nexus, &format!("{histogram}_count{{lane=\"{lane}\"}}"));
            let sum = metric(&nexus, &format!("{histogram}_sum{{lane=\"{lane}\"}}"));
            assert!(count > 0.0 && sum > 0.0, "{histogram} of {lane}: {count} iterations, {sum} s");
        }
    }
}

#[test]
fn bad_schedules_and_limits_are_refused_at_startup() {
    for (flags, want) in [
        (&["--schedule", "nexus", "--prefill-sms", "0"][..], "--prefill-sms 0"),
        (&["--schedule", "nexus", "--prefill-sms", "132"][..], "--prefill-sms 132"),
        (&["--schedule", "nexus", "--prefill-sms", "32,64"][..], "give one --schedule"),
        (&["--schedule", "chunked,nexus", "--prefill-sms", "64"][..], "give one --schedule"),
        (&["--schedule", "nexus", "--prefill-sms", "64", "--prefill-tokens", "512,1024"][..], "give one --schedule"),
        // The controller splits from a profile of the model on this device, and there is none.
        (&["--schedule", "nexus", "--profile", "/nonexistent/profile.json"][..], "nexus profile --model"),
        (&["--shutdown-grace-s=-1"][..], "--shutdown-grace-s -1"),
        (&["--header-timeout-s", "0"][..], "--header-timeout-s 0"),
        (&["--body-timeout-s", "NaN"][..], "--body-timeout-s NaN"),
        (&["--max-connections", "0"][..], "--max-connections"),
        // A server answers its clients in real time: no simulated clock of the device's own.
        (&["--simulate", "/nonexistent/profile.json", "--simulated-virtual-time"][..], "is for `nexus bench`"),
    ] {
        let stderr = refused_at_startup(flags);
        assert!(stderr.contains(want), "{flags:?}: {stderr}");
    }
}

#[test]
fn the_api_key_is_required_when_set() {
    let server = start(&["--api-key", "sesame"]);
    let (status, body) = post(&server, "/v1/chat/completions", &chat("hi", json!({ "max_tokens": 2 })));
    assert_eq!(status, 401, "{body}");
    let mut response = agent()
        .post(&format!("{}/v1/chat/completions", server.base))
        .header("Authorization", "Bearer sesame")
        .send(chat("hi", json!({ "max_tokens": 2 })))
        .expect("POST");
    assert_eq!(response.status().as_u16(), 200, "{}", response.body_mut().read_to_string().unwrap_or_default());
    // An empty key would refuse every request: it is refused itself, before the model loads.
    let stderr = refused_at_startup(&["--api-key", ""]);
    assert!(stderr.contains("--api-key is empty"), "{stderr}");
}

#[test]
fn max_model_len_caps_requests() {
    let server = start(&["--max-model-len", "64"]);
    let mut models = agent().get(&format!("{}/v1/models", server.base)).call().expect("models");
    let models: Value = serde_json::from_str(&models.body_mut().read_to_string().expect("body")).expect("json");
    assert_eq!(models["data"][0]["max_model_len"], 64);
    let prompt: Vec<u32> = (1000..1060).collect();
    let fits = json!({ "model": MODEL_NAME, "prompt": prompt, "max_tokens": 4, "temperature": 0 });
    assert_eq!(completion(&server, fits)["usage"]["completion_tokens"], 4);
    let over = json!({ "model": MODEL_NAME, "prompt": prompt, "max_tokens": 5, "temperature": 0 });
    let (status, body) = post(&server, "/v1/completions", &over.to_string());
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"].as_str().expect("message").contains("context holds 64"), "{body}");
    // Beyond the model's own context it is a startup error, not a server (the first server goes
    // first: on a GPU it holds most of the memory).
    drop(server);
    let out = nexus()
        .args(["serve", "--device", &device(), "--port", "0", "--max-model-len", "100000", "--model"])
        .arg(model_path())
        .output()
        .expect("run nexus serve");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_model_len"), "{}", String::from_utf8_lossy(&out.stderr));
}

fn completion(server: &Server, body: Value) -> Value {
    let (status, response) = post(server, "/v1/completions", &body.to_string());
    assert_eq!(status, 200, "{body}: {response}");
    response
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|t| t.as_u64().expect("a token id"))
        .collect()
}

#[test]
fn token_id_prompts_return_token_ids_and_min_tokens() {
    let server = start(&[]);
    // A text prompt, with its token ids and the output's.
    let text = completion(
        &server,
        json!({ "model": MODEL_NAME, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "return_token_ids": true }),
    );
    let prompt_ids = ids(&text["prompt_token_ids"]);
    let output_ids = ids(&text["choices"][0]["token_ids"]);
    assert_eq!(prompt_ids.len() as u64, text["usage"]["prompt_tokens"].as_u64().expect("usage"));
    assert_eq!(output_ids.len() as u64, text["usage"]["completion_tokens"].as_u64().expect("usage"));
    // The same ids as a prompt: the same greedy completion.
    let by_ids =
        completion(&server, json!({ "model": MODEL_NAME, "prompt": prompt_ids, "max_tokens": 8, "temperature": 0 }));
    assert_eq!(by_ids["choices"][0]["text"], text["choices"][0]["text"]);
    assert!(by_ids.get("prompt_token_ids").is_none() && by_ids["choices"][0].get("token_ids").is_none());

    // Streamed: one chunk per token, each with its id; the first carries the prompt's ids.
    let body = json!({
        "model": MODEL_NAME, "prompt": prompt_ids, "max_tokens": 8, "temperature": 0, "return_token_ids": true,
        "stream": true, "stream_options": { "include_usage": true }
    });
    let response = agent().post(&format!("{}/v1/completions", server.base)).send(body.to_string()).expect("POST");
    let events = sse_events(response.into_body().into_reader());
    assert_eq!(ids(&events[0]["prompt_token_ids"]), prompt_ids);
    assert!(events[1..].iter().all(|e| e.get("prompt_token_ids").is_none()));
    let streamed: Vec<u64> = events.iter().flat_map(|e| ids(&e["choices"][0]["token_ids"])).collect();
    assert_eq!(streamed, output_ids);
    let with_tokens = events.iter().filter(|e| !ids(&e["choices"][0]["token_ids"]).is_empty()).count();
    assert_eq!(with_tokens, output_ids.len());
    let streamed_text: String = events.iter().filter_map(|e| e["choices"][0]["text"].as_str()).collect();
    assert_eq!(streamed_text, text["choices"][0]["text"].as_str().expect("text"));

    // This chat answer ends with end-of-sequence after n tokens; min_tokens carries it past that.
    let (_, short) = post(&server, "/v1/chat/completions", &chat("What is the capital of France?", json!({})));
    assert_eq!(short["choices"][0]["finish_reason"], "stop");
    let n = short["usage"]["completion_tokens"].as_u64().expect("usage");
    let forced = chat("What is the capital of France?", json!({ "max_tokens": n + 3, "min_tokens": n + 3 }));
    let (status, long) = post(&server, "/v1/chat/completions", &forced);
    assert_eq!(status, 200, "{long}");
    assert_eq!(long["choices"][0]["finish_reason"], "length");
    assert_eq!(long["usage"]["completion_tokens"], n + 3);
}

/// Writes `lines` to a fresh file in the temp directory.
fn write_temp(name: &str, lines: &[Value]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("nexus-{}-{name}", std::process::id()));
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, text).expect("write a temp file");
    path
}

/// Runs `nexus bench --url` against `server` on the JSONL `lines`; returns its JSON report.
fn bench_url(server: &Server, name: &str, lines: &[Value]) -> Value {
    let jsonl = write_temp(&format!("{name}.jsonl"), lines);
    let report = std::env::temp_dir().join(format!("nexus-{}-{name}.json", std::process::id()));
    let out = nexus()
        .args(["bench", "--url", &server.base, "--rate", "50", "--request-timeout", "60"])
        .arg(format!("--workload=jsonl:{}", jsonl.display()))
        .arg("--json")
        .arg(&report)
        .output()
        .expect("run nexus bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "nexus bench failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("{MODEL_NAME} at {}", server.base)) && stdout.contains("| 50 |"), "{stdout}");
    let doc = serde_json::from_str(&std::fs::read_to_string(&report).expect("the report")).expect("JSON");
    std::fs::remove_file(jsonl).ok();
    std::fs::remove_file(report).ok();
    doc
}

#[test]
fn bench_url_replays_a_workload_against_the_server() {
    let server = start(&[]);
    // Six requests of 16 to 64 prompt tokens and 8 output tokens each.
    let lines: Vec<Value> = (0..6)
        .map(|i| {
            let ids: Vec<u32> = (0..16 + 48 * i / 5).map(|j| 1000 + 37 * (i * 64 + j) as u32).collect();
            json!({ "prompt_token_ids": ids, "output_len": 8 })
        })
        .collect();
    let doc = bench_url(&server, "good", &lines);
    let run = &doc["runs"][0];
    assert_eq!((run["completed"].as_u64(), run["failed"].as_u64()), (Some(6), Some(0)), "{run}");
    assert_eq!(run["length_mismatches"], json!([]), "{run}");
    assert_eq!(run["ttft_s"]["count"], 6);
    // Every request timed all 8 of its tokens.
    assert_eq!(run["tbt_s"]["count"], 6 * 7);
    for metric in ["ttft_s", "tbt_s", "normalized_latency_s"] {
        for stat in ["mean", "p50", "p95", "p99"] {
            let v = run[metric][stat].as_f64().unwrap_or(f64::NAN);
            assert!(v.is_finite() && v >= 0.0, "{metric} {stat}: {v}");
        }
    }
    assert!(run["token_throughput"].as_f64().expect("throughput") > 0.0);
    assert_eq!(run["preemptions"], Value::Null);

    // A request the server refuses is counted as failed, with its error; the others still report.
    let bad = [
        json!({ "prompt": "Once upon a time", "output_len": 4 }),
        json!({ "prompt_token_ids": [1, 49_152], "output_len": 4 }),
    ];
    let run = &bench_url(&server, "bad", &bad)["runs"][0];
    assert_eq!((run["completed"].as_u64(), run["failed"].as_u64()), (Some(1), Some(1)), "{run}");
    assert_eq!(run["failures"][0]["request"], 1);
    assert!(run["failures"][0]["error"].as_str().expect("error").contains("HTTP 400"), "{run}");

    // A server that is not there is an error, not a panic.
    drop(server);
    let out = nexus()
        .args(["bench", "--url", "http://127.0.0.1:9", "--num-requests", "1"])
        .output()
        .expect("run nexus bench");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A raw connection to `server`, for what an HTTP client library does not do: send a request in
/// pieces, hold a connection idle, or go away without reading the answer.
fn connect(server: &Server) -> TcpStream {
    let stream = TcpStream::connect(server.addr()).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(60))).expect("a read timeout");
    stream
}

/// The head of a request with a JSON body of `len` bytes, after which the server closes the
/// connection.
fn head(method: &str, path: &str, len: usize) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: nexus\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\
         Connection: close\r\n\r\n"
    )
}

/// Reads a response up to the end of the connection: its status and its body, as JSON when it
/// is JSON.
/// A reset after the response counts as its end: a server that closes with part of a request
/// unread resets the connection.
fn read_response(stream: &mut TcpStream) -> (u16, Value) {
    let mut bytes = Vec::new();
    let mut buf = [0; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !bytes.is_empty() => break,
            Err(e) => panic!("read the response: {e}"),
        }
    }
    let text = String::from_utf8_lossy(&bytes);
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status: {text}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    (status, serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_owned())))
}

/// Whether the server closed `stream`, waiting for that at most `limit`.
fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    stream.set_read_timeout(Some(limit)).expect("a read timeout");
    let mut buf = [0; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// A copy of the tiny Llama of tests/fixtures, with a word-level tokenizer of its 32 tokens, whose
/// activations overflow into NaN at token [`POISON`] and at no other: an engine failure on
/// demand. Weights that hold NaN are refused when they load; finite ones that overflow are not.
///
/// Column 0 of the embeddings is 0 but for `POISON` (1), and nothing of layer 0's attention
/// writes to it, so that it reaches the MLP as 0 for every other token; there the gate and up
/// projections read it with weights of 3e38, whose product is infinite for `POISON` alone, and
/// infinity becomes NaN in what follows. Every later position of a request with `POISON` sees
/// NaN through attention; other requests never do.
fn overflowing_tiny_llama() -> TempDir {
    const CONFIG: &[u8] = include_bytes!("../../tests/fixtures/tiny-llama/config.json");
    const WEIGHTS: &[u8] = include_bytes!("../../tests/fixtures/tiny-llama/model.safetensors");
    let dir = std::env::temp_dir().join(format!("nexus-serve-{}-overflowing-tiny-llama", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp folder");
    let mut weights = WEIGHTS.to_vec();
    let header_len = u64::from_le_bytes(weights[..8].try_into().expect("8 bytes")) as usize;
    let header: Value = serde_json::from_slice(&weights[8..8 + header_len]).expect("the header");
    // Sets element `index` of tensor `name` (F32 or BF16) to `value`.
    let mut set = |name: &str, index: usize, value: f32| {
        let tensor = &header[name];
        let start = 8 + header_len + tensor["data_offsets"][0].as_u64().expect("an offset") as usize;
        match tensor["dtype"].as_str() {
            Some("F32") => weights[start + 4 * index..][..4].copy_from_slice(&value.to_le_bytes()),
            Some("BF16") => weights[start + 2 * index..][..2].copy_from_slice(&value.to_le_bytes()[2..]),
            other => panic!("{name}: dtype {other:?}"),
        }
    };
    let (hidden, vocab, intermediate, heads_dim) = (16, 32, 24, 32);
    for token in 0..vocab {
        set("model.embed_tokens.weight", token * hidden, if token == POISON as usize { 1.0 } else { 0.0 });
    }
    for i in 0..heads_dim {
        set("model.layers.0.self_attn.o_proj.weight", i, 0.0);
    }
    set("model.layers.0.post_attention_layernorm.weight", 0, 1.0);
    for row in 0..intermediate {
        set("model.layers.0.mlp.gate_proj.weight", row * hidden, 3e38);
        set("model.layers.0.mlp.up_proj.weight", row * hidden, 3e38);
    }
    std::fs::write(dir.join("model.safetensors"), weights).expect("write the weights");
    std::fs::write(dir.join("config.json"), CONFIG).expect("write the config");
    let vocab: serde_json::Map<String, Value> = (0..vocab).map(|i| (format!("t{i}"), json!(i))).collect();
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": { "type": "Whitespace" }, "post_processor": null, "decoder": null,
        "model": { "type": "WordLevel", "vocab": vocab, "unk_token": "t0" }
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).expect("write the tokenizer");
    TempDir(dir)
}

/// A folder removed when dropped, whether the test passes or not.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The token whose activations overflow in [`overflowing_tiny_llama`].
const POISON: u32 = 7;

#[test]
fn a_request_the_engine_fails_gets_an_error_and_the_others_go_on() {
    let model = overflowing_tiny_llama();
    let server = start_model(&model.0, "cpu", &[]);
    let base = server.base.clone();
    let request = move |prompt: Vec<u32>, temperature: f64, stream: bool| {
        let base = base.clone();
        std::thread::spawn(move || {
            // The fine requests must not draw the poisoned token themselves.
            let body = json!({ "model": MODEL_NAME, "prompt": prompt, "max_tokens": 12, "temperature": temperature,
                "seed": 1, "stream": stream, "logit_bias": { POISON.to_string(): -100 } });
            let response = agent().post(&format!("{base}/v1/completions")).send(body.to_string()).expect("POST");
            let status = response.status().as_u16();
            let mut text = String::new();
            response.into_body().into_reader().read_to_string(&mut text).expect("body");
            (status, text)
        })
    };
    // At once, so that the failing requests share steps with the others: greedy (the argmax on
    // the backend), sampled (logits on the host), streamed.
    let failing = [
        request(vec![1, 2, POISON], 0.0, false),
        request(vec![POISON, 3, 4, 5], 1.0, false),
        request(vec![3, POISON], 0.0, true),
    ];
    let fine = [request(vec![1, 2, 3], 0.0, false), request(vec![4, 5, 6, 8], 1.0, false)];
    for (i, client) in failing.into_iter().enumerate() {
        let (status, text) = client.join().expect("client");
        let error = if i < 2 {
            assert_eq!(status, 500, "{text}");
            serde_json::from_str::<Value>(&text).expect("a JSON body")
        } else {
            // Streamed: the status went out with the headers; the error is an event, then [DONE].
            assert_eq!(status, 200, "{text}");
            let events = sse_events(text.as_bytes());
            events.last().expect("an error event").clone()
        };
        assert_eq!(error["error"]["type"], "server_error", "{error}");
        assert!(error["error"]["message"].as_str().expect("a message").contains("logits"), "{error}");
    }
    for client in fine {
        let (status, text) = client.join().expect("client");
        let body: Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!((status, &body["usage"]["completion_tokens"]), (200, &json!(12)), "{body}");
    }
    let (status, health) = get(&server, "/health");
    assert_eq!((status, &health["status"], &health["failed_requests"]), (200, &json!("degraded"), &json!(3)));
    assert!(health["last_error"]["message"].as_str().expect("the last error").contains("logits"), "{health}");
    assert_eq!(metric(&server, "nexus_request_failures_total"), 3.0);
    // The gauges follow within a step of the last response.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&server, "nexus_kv_cache_usage") > 0.0 {
        assert!(Instant::now() < deadline, "blocks still in use");
        std::thread::sleep(Duration::from_millis(20));
    }
    // And the server goes on.
    let body = json!({ "model": MODEL_NAME, "prompt": [9, 10], "max_tokens": 4, "temperature": 0,
        "logit_bias": { POISON.to_string(): -100 } });
    assert_eq!(completion(&server, body)["usage"]["completion_tokens"], 4);
}

#[test]
fn sigterm_lets_requests_in_flight_finish_then_the_server_exits_zero() {
    let mut server = start(&[]);
    let body = json!({ "model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 64, "ignore_eos": true,
        "temperature": 0, "stream": true });
    let response = agent().post(&format!("{}/v1/completions", server.base)).send(body.to_string()).expect("POST");
    let mut reader = BufReader::new(response.into_body().into_reader());
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        reader.read_line(&mut line).expect("the first event");
    }
    server.signal("TERM");
    // No new connection is taken...
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(server.addr()).is_ok() {
        assert!(Instant::now() < deadline, "still accepting connections");
        std::thread::sleep(Duration::from_millis(20));
    }
    // ...but the stream goes on to its end, within the grace period, and the server exits.
    let events = sse_events(reader);
    let last = events.last().expect("events");
    assert_eq!(last["choices"][0]["finish_reason"], "length", "{last}");
    assert_eq!(server.exit_status(Duration::from_secs(60)).code(), Some(0));
}

#[test]
fn requests_past_the_shutdown_grace_end_with_an_error() {
    let mut server = start(&["--shutdown-grace-s", "1"]);
    let long = json!({ "model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": true,
        "temperature": 0 });
    let mut streamed = long.clone();
    streamed["stream"] = json!(true);
    let response = agent().post(&format!("{}/v1/completions", server.base)).send(streamed.to_string()).expect("POST");
    let base = server.base.clone();
    let whole = std::thread::spawn(move || {
        let mut response = agent().post(&format!("{base}/v1/completions")).send(long.to_string()).expect("POST");
        let status = response.status().as_u16();
        (status, serde_json::from_str::<Value>(&response.body_mut().read_to_string().expect("body")).expect("JSON"))
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&server, "nexus_requests_running") < 2.0 {
        assert!(Instant::now() < deadline, "the requests did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    server.signal("INT");
    let events = sse_events(response.into_body().into_reader());
    let error = &events.last().expect("events")["error"];
    assert!(error["message"].as_str().expect("an error event").contains("shutting down"), "{error}");
    let (status, body) = whole.join().expect("client");
    assert_eq!(status, 503, "{body}");
    assert!(body["error"]["message"].as_str().expect("a message").contains("shutting down"), "{body}");
    assert_eq!(server.exit_status(Duration::from_secs(30)).code(), Some(0));
}

#[test]
fn abandoned_requests_are_aborted_whatever_their_phase() {
    // Small chunks, two running at most: of four long prompts, two are prefilling, two waiting.
    let server = start(&["--max-num-seqs", "2", "--max-num-batched-tokens", "64"]);
    let prompt: Vec<u32> = (0..3000).map(|j| 1000 + (j * 37) % 40_000).collect();
    let body = json!({ "model": MODEL_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0 }).to_string();
    let clients: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut stream = connect(&server);
            stream
                .write_all(format!("{}{body}", head("POST", "/v1/completions", body.len())).as_bytes())
                .expect("send");
            stream
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&server, "nexus_requests_running") + metric(&server, "nexus_requests_waiting") < 4.0 {
        assert!(Instant::now() < deadline, "the requests did not arrive");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Their clients go away long before the prompts could be prefilled: the engine drops them
    // at its next step, and frees their blocks.
    drop(clients);
    let gone = Instant::now();
    while metric(&server, "nexus_kv_cache_usage") > 0.0
        || metric(&server, "nexus_requests_running") > 0.0
        || metric(&server, "nexus_requests_waiting") > 0.0
    {
        assert!(gone.elapsed() < Duration::from_secs(8), "the abandoned requests were not aborted");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A small request is served at once.
    let small = json!({ "model": MODEL_NAME, "prompt": "1, 2, 3,", "max_tokens": 4, "temperature": 0 });
    assert_eq!(completion(&server, small)["usage"]["completion_tokens"], 4);
    assert!(gone.elapsed() < Duration::from_secs(30), "the small request waited {:?}", gone.elapsed());
}

#[test]
fn metrics_count_a_request_from_its_admission() {
    let server = start(&[]);
    // One step prefills the whole prompt and gives the only token: the request is in the engine
    // during that step only, which must take long enough to be seen (a GPU's is much faster).
    let len = if device() == "cpu" { 400 } else { 6000 };
    let prompt: Vec<u32> = (0..len).map(|j| 1000 + (j * 37) % 40_000).collect();
    let body = json!({ "model": MODEL_NAME, "prompt": prompt, "max_tokens": 1, "temperature": 0 });
    let base = server.base.clone();
    let client = std::thread::spawn(move || {
        agent().post(&format!("{base}/v1/completions")).send(body.to_string()).expect("POST").status().as_u16()
    });
    let (mut seen, mut running_with_blocks) = (0.0f64, false);
    while !client.is_finished() {
        let running = metric(&server, "nexus_requests_running");
        seen = seen.max(running + metric(&server, "nexus_requests_waiting"));
        // Once its step is launched it runs and holds its blocks, while the step still runs.
        running_with_blocks |= running == 1.0 && metric(&server, "nexus_kv_cache_usage") > 0.0;
    }
    assert_eq!(client.join().expect("client"), 200);
    assert_eq!(seen, 1.0, "/metrics never showed the request while its step ran");
    assert!(running_with_blocks, "/metrics never showed the request running with its blocks");
}

#[test]
fn slow_and_idle_connections_are_timed_out_and_limited() {
    let server = start(&["--header-timeout-s", "1", "--body-timeout-s", "1", "--max-connections", "3"]);
    let opened = Instant::now();
    // Three connections take every slot: one idle, one with half a head, one with half a body.
    let mut idle = connect(&server);
    let mut half_head = connect(&server);
    half_head.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: nexus\r\n").expect("send");
    let mut half_body = connect(&server);
    half_body.write_all(format!("{}{{\"model\":", head("POST", "/v1/completions", 100)).as_bytes()).expect("send");
    // A fourth waits for a slot, which the timeouts free after about a second.
    let mut health = connect(&server);
    health.write_all(head("GET", "/health", 0).as_bytes()).expect("send");
    let (status, _) = read_response(&mut health);
    assert_eq!(status, 200);
    assert!(opened.elapsed() >= Duration::from_millis(800), "answered before a slot was free: {:?}", opened.elapsed());
    assert!(closed_within(&mut idle, Duration::from_secs(10)), "the idle connection is still open");
    assert!(closed_within(&mut half_head, Duration::from_secs(10)), "the half-sent head is still open");
    let (status, body) = read_response(&mut half_body);
    assert_eq!(status, 408, "{body}");
    assert!(body["error"]["message"].as_str().expect("a JSON error").contains("did not arrive"), "{body}");
    assert!(opened.elapsed() < Duration::from_secs(10));
}

#[test]
fn every_error_is_an_openai_style_json_body() {
    let server = start(&[]);
    let url = |path: &str| format!("{}{path}", server.base);
    let responses = [
        (404, agent().get(&url("/nope")).call()),
        (404, agent().get(&url("/v1/models/gpt-4")).call()),
        (405, agent().get(&url("/v1/completions")).call()),
        (405, agent().post(&url("/health")).send("")),
        (405, agent().delete(&url("/v1/models")).call()),
    ];
    for (want, response) in responses {
        let mut response = response.expect("a response");
        let status = response.status().as_u16();
        let json = response.headers().get("content-type").is_some_and(|t| t == "application/json");
        let body: Value = serde_json::from_str(&response.body_mut().read_to_string().expect("body")).expect("JSON");
        assert!(status == want && json, "{status} {body}");
        assert!(!body["error"]["message"].as_str().expect("a message").is_empty(), "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    }
    // A body declared over the limit is refused from its head alone: sending it would race the
    // server's close (the client's write fails with a broken pipe once the 413 is out).
    let mut too_big = connect(&server);
    too_big.write_all(head("POST", "/v1/completions", 9 << 20).as_bytes()).expect("send");
    let (status, body) = read_response(&mut too_big);
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    assert!(body["error"]["message"].as_str().expect("a message").contains("over"), "{body}");
    // A chunked body declares no length: it is refused once what arrived passes the limit.
    let mut chunked = connect(&server);
    let mut writer = chunked.try_clone().expect("a second handle");
    let sender = std::thread::spawn(move || {
        let head = "POST /v1/completions HTTP/1.1\r\nHost: nexus\r\nContent-Type: application/json\r\n\
                    Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
        let chunk = format!("{:x}\r\n{}\r\n", 1 << 20, "a".repeat(1 << 20));
        // The server stops reading at the limit, so the writes past it may fail.
        let _ = writer.write_all(head.as_bytes());
        for _ in 0..9 {
            if writer.write_all(chunk.as_bytes()).is_err() {
                return;
            }
        }
        let _ = writer.write_all(b"0\r\n\r\n");
    });
    let (status, body) = read_response(&mut chunked);
    sender.join().expect("the sender");
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");

    let (status, model) = get(&server, &format!("/v1/models/{MODEL_NAME}"));
    assert_eq!((status, &model["id"], &model["object"]), (200, &json!(MODEL_NAME), &json!("model")));
}

#[test]
fn logit_bias_min_p_kept_stop_strings_content_parts_and_tool_messages() {
    let server = start(&[]);
    let counting = |extra: Value| {
        let mut body = json!({ "model": MODEL_NAME, "prompt": "1, 2, 3,", "max_tokens": 6, "temperature": 0,
            "return_token_ids": true });
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        ids(&completion(&server, body)["choices"][0]["token_ids"])
    };
    let plain = counting(json!({}));
    // A bias of 100 makes greedy pick that token every time; -100 keeps it from the plain one.
    assert_eq!(counting(json!({ "logit_bias": { "1000": 100 } })), vec![1000; 6]);
    let banned = counting(json!({ "logit_bias": { plain[0].to_string(): -100 } }));
    assert!(!banned.contains(&plain[0]), "{banned:?} has {}", plain[0]);
    // min_p = 1 keeps only the most likely token: drawing gives the greedy tokens.
    assert_eq!(counting(json!({ "temperature": 1.0, "min_p": 1.0, "seed": 3 })), plain);

    // The stop string ends the text, and is part of it when asked.
    let capital = json!({ "model": MODEL_NAME, "prompt": "The capital of France is", "max_tokens": 12,
        "temperature": 0, "stop": ["."], "include_stop_str_in_output": true });
    let kept = completion(&server, capital.clone());
    assert_eq!(
        (&kept["choices"][0]["text"], &kept["choices"][0]["finish_reason"]),
        (&json!(" Paris."), &json!("stop"))
    );
    let mut streamed = capital;
    streamed["stream"] = json!(true);
    let response = agent().post(&format!("{}/v1/completions", server.base)).send(streamed.to_string()).expect("POST");
    let events = sse_events(response.into_body().into_reader());
    let text: String = events.iter().filter_map(|e| e["choices"][0]["text"].as_str()).collect();
    assert_eq!(text, " Paris.");

    // Content as text parts is the same message as a string.
    let parts = json!({ "model": MODEL_NAME, "max_tokens": 24, "temperature": 0, "messages": [{ "role": "user",
        "content": [{ "type": "text", "text": "What is the capital of France?" }] }] });
    let (status, body) = post(&server, "/v1/chat/completions", &parts.to_string());
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "The capital of France is Paris.");
    // A tool's answer goes to the chat template, which takes it.
    let tool = json!({ "model": MODEL_NAME, "max_tokens": 8, "temperature": 0, "messages": [
        { "role": "user", "content": "What is the weather in Paris?" },
        { "role": "assistant", "content": null },
        { "role": "tool", "content": "Sunny, 21 C" }
    ] });
    let (status, body) = post(&server, "/v1/chat/completions", &tool.to_string());
    assert_eq!(status, 200, "{body}");
}

#[test]
fn latency_clocks_start_when_the_request_arrives() {
    let server = start(&[]);
    // The head arrives, then the body a second later: the request's latencies include that
    // second, as its client's do.
    let body = json!({ "model": MODEL_NAME, "prompt": "1, 2, 3,", "max_tokens": 1, "temperature": 0 }).to_string();
    let mut stream = connect(&server);
    stream.write_all(head("POST", "/v1/completions", body.len()).as_bytes()).expect("send the head");
    std::thread::sleep(Duration::from_secs(1));
    stream.write_all(body.as_bytes()).expect("send the body");
    let (status, response) = read_response(&mut stream);
    assert_eq!(status, 200, "{response}");
    for histogram in ["nexus_time_to_first_token_seconds", "nexus_e2e_request_latency_seconds"] {
        let sum = metric(&server, &format!("{histogram}_sum"));
        assert!(sum >= 1.0, "{histogram}: {sum} s");
    }
}

/// The `nexus` schedule split by its controller, from a profile of the model made here (shapes
/// shrunk to 48 tokens so that it takes seconds), serves what the server serves: chat, streamed
/// or not, with the greedy answer of the oracle fixtures; stop strings; log-probabilities;
/// penalties; a client that leaves mid-stream is aborted and its blocks freed; each lane's budget
/// in `/metrics` is on the controller's grid of 64 SMs (or all of them).
#[test]
fn the_controlled_nexus_schedule_serves_every_feature() {
    let dir = std::env::temp_dir().join(format!("nexus-serve-profile-{}", std::process::id()));
    let profile = dir.join("profile.json");
    let made = nexus()
        .args(["profile", "--device", &device(), "--quick", "--grid", "64", "--max-shape-tokens", "48", "--model"])
        .arg(model_path())
        .arg("--out")
        .arg(&profile)
        .output()
        .expect("run nexus profile");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let flags = ["--schedule", "nexus", "--split-grid", "64", "--profile", profile.to_str().expect("path")];
    let server = start(&flags);

    let (status, body) = post(&server, "/v1/chat/completions", &chat("What is the capital of France?", json!({})));
    assert_eq!((status, &body["choices"][0]["message"]["content"]), (200, &json!("The capital of France is Paris.")));
    let streamed = agent()
        .post(&format!("{}/v1/chat/completions", server.base))
        .send(chat("What is the capital of France?", json!({ "stream": true })))
        .expect("POST");
    let events = sse_events(streamed.into_body().into_reader());
    let text: String = events.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, "The capital of France is Paris.");

    let stop = json!({ "model": MODEL_NAME, "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0, "stop": ["."] });
    assert_eq!(completion(&server, stop)["choices"][0]["text"], " Paris");
    let with_logprobs = json!({ "model": MODEL_NAME, "prompt": "1, 2, 3,", "max_tokens": 3, "logprobs": 2 });
    let logprobs = &completion(&server, with_logprobs)["choices"][0]["logprobs"];
    assert_eq!(logprobs["top_logprobs"].as_array().map(Vec::len), Some(3), "{logprobs}");
    let penalized = json!({ "model": MODEL_NAME, "prompt": "1, 1, 1,", "max_tokens": 4, "ignore_eos": true,
        "presence_penalty": 1.5, "frequency_penalty": 0.5, "repetition_penalty": 1.3 });
    assert_eq!(completion(&server, penalized)["usage"]["completion_tokens"], 4);

    // A client that leaves mid-stream is aborted, its blocks freed.
    let long = json!({ "model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": true, "stream": true });
    let response = agent().post(&format!("{}/v1/completions", server.base)).send(long.to_string()).expect("POST");
    let mut lines = BufReader::new(response.into_body().into_reader()).lines();
    let mut seen = 0;
    while seen < 3 {
        seen += usize::from(lines.next().expect("a line").expect("read").starts_with("data: "));
    }
    drop(lines);
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&server, "nexus_requests_running") > 0.0 || metric(&server, "nexus_kv_cache_usage") > 0.0 {
        assert!(Instant::now() < deadline, "the request was not aborted");
        std::thread::sleep(Duration::from_millis(50));
    }
    // 132 SMs: the CPU backend's nominal count, and the H100's and H200's.
    let decode = metric(&server, "nexus_lane_budget_sms{lane=\"decode\"}");
    let prefill = metric(&server, "nexus_lane_budget_sms{lane=\"prefill\"}");
    assert!(decode % 64.0 == 0.0 || decode == 132.0, "decode budget {decode}");
    assert!(prefill > 0.0 && prefill <= 132.0, "prefill budget {prefill}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_simulated_h200_serves_over_http_with_the_controller() {
    // Where this test was built, else from the repo's root (on the GPU machine).
    let committed = "bench-results/nexus-vs-chunked-h200/llama-3.1-8b-r11-profile.json";
    let profile = [PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(committed), PathBuf::from(committed)]
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{committed} is missing"));
    let mut serve = nexus();
    serve
        .args(["serve", "--model", "synthetic:llama-3.1-8b", "--port", "0", "--schedule", "nexus"])
        .args(["--decode-target-ms", "10..14", "--simulated-resize", "--simulate"])
        .arg(&profile)
        .stderr(Stdio::inherit());
    let server = Server::spawn(serve);
    // Four requests at once, greedy: each gets its tokens (token 0: the simulated logits are
    // zeros), streamed or not.
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let base = server.base.clone();
            std::thread::spawn(move || {
                let prompt: Vec<u32> = (0..300 * (i + 1)).map(|t| 1000 + t).collect();
                let body = json!({ "model": "synthetic:llama-3.1-8b", "prompt": prompt, "max_tokens": 6,
                    "temperature": 0, "stream": i % 2 == 1, "return_token_ids": true });
                let mut response = agent()
                    .post(&format!("{base}/v1/completions"))
                    .header("Content-Type", "application/json")
                    .send(body.to_string())
                    .expect("POST");
                (response.status().as_u16(), response.body_mut().read_to_string().expect("body"))
            })
        })
        .collect();
    for (i, thread) in threads.into_iter().enumerate() {
        let (status, text) = thread.join().expect("client");
        assert_eq!(status, 200, "{text}");
        if i % 2 == 1 {
            assert!(text.contains("data: [DONE]"), "{text}");
        } else {
            let value: Value = serde_json::from_str(&text).expect("json");
            assert_eq!(value["choices"][0]["token_ids"], json!([0, 0, 0, 0, 0, 0]), "{value}");
            assert_eq!(value["choices"][0]["finish_reason"], "length");
        }
    }
    let (status, metrics) = get(&server, "/metrics");
    assert_eq!(status, 200);
    let text = metrics.as_str().expect("Prometheus text");
    assert!(text.contains("nexus_generation_tokens_total 24"), "{text}");
    assert!(text.contains("nexus_lane_budget_sms"), "{text}");
}
