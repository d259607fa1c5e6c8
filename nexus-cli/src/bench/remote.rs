//! `nexus bench --url`: replays requests against an OpenAI-compatible server (ours, vLLM,
//! SGLang) over HTTP.
//!
//! Each request is a streamed `POST /v1/completions` sent on its own thread at its arrival time,
//! its output forced to the drawn length (`max_tokens` = `min_tokens` = the length, `ignore_eos`,
//! greedy). Times count from sending: TTFT is the first chunk that carries a token, TBT the gaps
//! between token-carrying chunks, end-to-end the end of the stream. The request asks for vLLM's
//! `return_token_ids`, so that a chunk tells how many tokens it carries; a chunk of k > 1 tokens
//! spreads them evenly over the gap since the previous token (the first chunk's tokens all count
//! at its arrival), and a server that gives no ids counts one token per chunk with text. The
//! output length is `usage.completion_tokens` (asked for with `stream_options.include_usage`).
//! An HTTP error, a broken or unfinished stream, an error event or the `--request-timeout` fail
//! the request; failures are counted in the report, never dropped.

use std::io::{BufRead, BufReader};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use nexus_runtime::bench::workload::{BenchRequest, Prompt};
use nexus_runtime::bench::{ReplayReport, RequestOutcome, RequestTimes};
use serde_json::{Value, json};

/// Where and how to reach the server.
#[derive(Debug)]
pub struct RemoteConfig<'a> {
    /// The server's base URL, `http://HOST:PORT` (a trailing `/v1` is dropped).
    pub url: &'a str,
    /// The model to ask for; the first one the server lists when `None`.
    pub served_model_name: Option<&'a str>,
    /// Sent as `Authorization: Bearer <key>`.
    pub api_key: Option<&'a str>,
    /// The longest a request may take, from sending to the end of its stream.
    pub request_timeout: Duration,
}

/// A connection to an OpenAI-compatible server.
#[derive(Debug)]
pub struct Remote {
    agent: ureq::Agent,
    completions_url: String,
    model: String,
    authorization: Option<String>,
    request_timeout: Duration,
}

/// The base URL of `url`, checked: plain HTTP (this build has no TLS), without a trailing `/` or
/// `/v1`.
fn base_url(url: &str) -> anyhow::Result<&str> {
    let base = url.trim_end_matches('/');
    let base = base.strip_suffix("/v1").unwrap_or(base);
    if base.starts_with("https://") {
        bail!("--url {url}: https is not supported (nexus is built without TLS); use an http:// URL");
    }
    match base.strip_prefix("http://") {
        Some(host) if !host.is_empty() && !host.contains(char::is_whitespace) => Ok(base),
        _ => bail!("--url {url:?} is not an http:// URL like http://127.0.0.1:8000"),
    }
}

impl Remote {
    /// Checks the URL, asks the server for its models (`GET /v1/models`) and picks the one to
    /// use. Fails when the server cannot be reached, answers with an error, or lists no model and
    /// none was named.
    pub fn connect(config: &RemoteConfig<'_>) -> anyhow::Result<Remote> {
        let base = base_url(config.url)?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(config.request_timeout))
            .build()
            .into();
        let authorization = config.api_key.map(|key| format!("Bearer {key}"));
        let models_url = format!("{base}/v1/models");
        let mut call = agent.get(&models_url);
        if let Some(value) = &authorization {
            call = call.header("Authorization", value);
        }
        let mut response = call.call().with_context(|| format!("cannot reach {models_url}"))?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().with_context(|| format!("reading {models_url}"))?;
        ensure!(response.status().is_success(), "GET {models_url} answered HTTP {status}: {text:.300}");
        let listed: Vec<String> = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| {
                v["data"].as_array().map(|d| d.iter().filter_map(|m| m["id"].as_str()).map(str::to_owned).collect())
            })
            .unwrap_or_default();
        let model = match config.served_model_name {
            Some(name) => {
                if !listed.iter().any(|m| m == name) {
                    eprintln!("warning: {models_url} does not list --served-model-name {name} (it lists {listed:?})");
                }
                name.to_owned()
            }
            None => listed
                .first()
                .cloned()
                .with_context(|| format!("GET {models_url} lists no model; name one with --served-model-name"))?,
        };
        Ok(Remote {
            agent,
            completions_url: format!("{base}/v1/completions"),
            model,
            authorization,
            request_timeout: config.request_timeout,
        })
    }

    /// The model the requests ask for.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Sends `requests` at their arrival times (seconds from now), each on its own thread, and
    /// reports them; `on_finished` is called as each request ends, successful or not.
    pub fn replay(&self, requests: &[BenchRequest], mut on_finished: impl FnMut()) -> anyhow::Result<ReplayReport> {
        ensure!(!requests.is_empty(), "the trace is empty");
        let start = Instant::now();
        let mut outcomes: Vec<Option<RequestOutcome>> = vec![None; requests.len()];
        let mut last_end = start;
        let (tx, rx) = mpsc::channel::<(usize, RequestOutcome, Instant)>();
        std::thread::scope(|scope| {
            // The dispatcher sleeps until each arrival, so that this thread can count the
            // finished requests meanwhile.
            scope.spawn(move || {
                for (i, request) in requests.iter().enumerate() {
                    std::thread::sleep(
                        (start + Duration::from_secs_f64(request.arrival_s)).saturating_duration_since(Instant::now()),
                    );
                    let done = tx.clone();
                    let spawned =
                        std::thread::Builder::new().name(format!("bench-request-{i}")).spawn_scoped(scope, move || {
                            let outcome = self.send(request);
                            let _ = done.send((i, outcome, Instant::now()));
                        });
                    if let Err(e) = spawned {
                        let _ = tx.send((i, Err(format!("cannot start a client thread: {e}")), Instant::now()));
                    }
                }
            });
            for (i, outcome, end) in rx {
                outcomes[i] = Some(outcome);
                last_end = last_end.max(end);
                on_finished();
            }
        });
        let outcomes: Vec<RequestOutcome> =
            outcomes.into_iter().map(|o| o.unwrap_or_else(|| Err("the request was lost".into()))).collect();
        let requested: Vec<usize> = requests.iter().map(|r| r.output_len).collect();
        let duration_s = last_end.duration_since(start).as_secs_f64() - requests[0].arrival_s;
        Ok(ReplayReport::new(&requested, &outcomes, duration_s, None)?)
    }

    /// Sends one request and times its stream.
    fn send(&self, request: &BenchRequest) -> RequestOutcome {
        let prompt = match &request.prompt {
            Prompt::Text(text) => json!(text),
            Prompt::TokenIds(ids) => json!(ids),
        };
        let body = json!({
            "model": self.model,
            "prompt": prompt,
            "max_tokens": request.output_len,
            "min_tokens": request.output_len,
            "ignore_eos": true,
            "temperature": 0,
            "stream": true,
            "stream_options": { "include_usage": true },
            "return_token_ids": true,
        });
        let mut call = self.agent.post(&self.completions_url).header("Content-Type", "application/json");
        if let Some(value) = &self.authorization {
            call = call.header("Authorization", value);
        }
        let sent = Instant::now();
        let mut response = call.send(body.to_string()).map_err(|e| self.describe(&e))?;
        if !response.status().is_success() {
            let status = response.status().as_u16();
            let text = response.body_mut().read_to_string().unwrap_or_default();
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                .unwrap_or(text);
            return Err(format!("HTTP {status}: {message:.300}"));
        }
        let mut stream = StreamTimes::default();
        for line in BufReader::new(response.into_body().into_reader()).lines() {
            let line = line.map_err(|e| match e.get_ref().and_then(|inner| inner.downcast_ref::<ureq::Error>()) {
                Some(inner) => self.describe(inner),
                None => format!("the stream broke after {} tokens: {e}", stream.tokens.len()),
            })?;
            let at = sent.elapsed().as_secs_f64();
            let Some(data) = line.strip_prefix("data:").map(str::trim) else { continue };
            if data == "[DONE]" {
                return Ok(stream.finish(at));
            }
            let chunk: Value =
                serde_json::from_str(data).map_err(|e| format!("a stream event is not JSON ({e}): {data:.200}"))?;
            if let Some(error) = chunk.get("error") {
                return Err(format!("the server reported an error mid-stream: {error:.300}"));
            }
            stream.push(at, &chunk);
        }
        Err(format!("the stream ended without [DONE] after {} tokens", stream.tokens.len()))
    }

    fn describe(&self, e: &ureq::Error) -> String {
        match e {
            ureq::Error::Timeout(_) => {
                format!("no complete response within --request-timeout {} s", self.request_timeout.as_secs_f64())
            }
            e => e.to_string(),
        }
    }
}

/// The token times of one streamed response, in seconds from sending.
#[derive(Debug, Default)]
struct StreamTimes {
    tokens: Vec<f64>,
    /// `usage.completion_tokens`, once a chunk carried it.
    usage: Option<usize>,
}

impl StreamTimes {
    /// Counts the tokens of `chunk`, which arrived `at`: its choice's `token_ids`, or one token if
    /// it has text and no ids.
    fn push(&mut self, at: f64, chunk: &Value) {
        if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
            self.usage = Some(n as usize);
        }
        let choice = &chunk["choices"][0];
        let k = match choice["token_ids"].as_array() {
            Some(ids) => ids.len(),
            None => usize::from(choice["text"].as_str().is_some_and(|t| !t.is_empty())),
        };
        let previous = self.tokens.last().copied();
        for j in 1..=k {
            self.tokens.push(match previous {
                Some(p) => p + (at - p) * j as f64 / k as f64,
                None => at,
            });
        }
    }

    /// The times of a stream that ended `at`.
    fn finish(self, at: f64) -> RequestTimes {
        RequestTimes { output_tokens: self.usage.unwrap_or(self.tokens.len()), tokens: self.tokens, end_s: at }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_of_several_tokens_spread_over_the_gap() {
        let mut s = StreamTimes::default();
        s.push(0.1, &json!({ "choices": [{ "text": "", "token_ids": [1, 2] }] }));
        s.push(0.4, &json!({ "choices": [{ "text": "abc", "token_ids": [3, 4, 5] }] }));
        // Chunks without tokens (the final one, usage) count nothing; text without ids counts one.
        s.push(0.5, &json!({ "choices": [{ "text": "", "finish_reason": "length" }] }));
        s.push(0.6, &json!({ "choices": [{ "text": "d" }] }));
        s.push(0.7, &json!({ "choices": [], "usage": { "completion_tokens": 6 } }));
        let t = s.finish(0.8);
        let want = [0.1, 0.1, 0.2, 0.3, 0.4, 0.6];
        assert_eq!(t.tokens.len(), want.len());
        assert!(t.tokens.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12), "{:?}", t.tokens);
        assert_eq!((t.output_tokens, t.end_s), (6, 0.8));
    }

    #[test]
    fn urls_are_checked() {
        assert_eq!(base_url("http://127.0.0.1:8000/").unwrap(), "http://127.0.0.1:8000");
        assert_eq!(base_url("http://localhost:8000/v1").unwrap(), "http://localhost:8000");
        for bad in ["127.0.0.1:8000", "https://example.com", "http://", "ftp://x", "http://a b"] {
            assert!(base_url(bad).is_err(), "{bad} accepted");
        }
    }
}
