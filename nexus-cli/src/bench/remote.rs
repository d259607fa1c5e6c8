//! `nexus bench --url`: replays requests against an OpenAI-compatible server (ours, vLLM,
//! SGLang) over HTTP.
//!
//! Each request is a streamed `POST /v1/completions` sent on its own thread at its arrival time
//! (with `--max-concurrency N`, once fewer than N requests are in flight: the others wait in
//! arrival order, as behind vLLM's semaphore), its output forced to the drawn length (`max_tokens`
//! = `min_tokens` = the length, `ignore_eos`, greedy). Times count from sending: TTFT is the first
//! chunk that carries a token, TBT (vLLM's ITL) the gaps between token-carrying chunks, end-to-end
//! the end of the stream. The request asks for vLLM's
//! `return_token_ids`, so that a chunk tells how many tokens it carries; a chunk of k > 1 tokens
//! spreads them evenly over the gap since the previous token (the first chunk's tokens all count
//! at its arrival), and a server that gives no ids counts one token per chunk with text. The
//! output length is `usage.completion_tokens` (asked for with `stream_options.include_usage`), and
//! `usage.prompt_tokens` counts a text prompt's tokens.
//! An HTTP error, a broken or unfinished stream, an error event or the `--request-timeout` fail
//! the request; failures are counted in the report, never dropped.

use std::io::{BufRead, BufReader};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use nexus_runtime::bench::workload::{BenchRequest, Prompt};
use nexus_runtime::bench::{ReplayReport, RequestOutcome, RequestResult, RequestTimes};
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

    /// Sends `requests` at their arrival times (seconds from now), each on its own thread, with at
    /// most `max_concurrency` in flight, and reports them; `on_finished` is called as each request
    /// ends, successful or not.
    pub fn replay(
        &self,
        requests: &[BenchRequest],
        max_concurrency: Option<usize>,
        mut on_finished: impl FnMut(),
    ) -> anyhow::Result<ReplayReport> {
        ensure!(!requests.is_empty(), "the trace is empty");
        ensure!(max_concurrency != Some(0), "a cap on the requests in flight must be at least 1");
        let start = Instant::now();
        let first_arrival = start + Duration::from_secs_f64(requests[0].arrival_s);
        let mut outcomes: Vec<Option<RequestOutcome>> = vec![None; requests.len()];
        let mut last_end = start;
        let (tx, rx) = mpsc::channel::<(usize, RequestOutcome, Instant)>();
        // A cap is a semaphore of that many permits: the dispatcher takes one before sending a
        // request, and the request gives it back once its response ended.
        let permits = max_concurrency.map(|n| {
            let (give, take) = mpsc::sync_channel::<()>(n);
            (0..n).for_each(|_| {
                let _ = give.send(());
            });
            (give, take)
        });
        std::thread::scope(|scope| {
            // The dispatcher sleeps until each arrival (and waits for a permit), so that this
            // thread can count the finished requests meanwhile.
            scope.spawn(move || {
                for (i, request) in requests.iter().enumerate() {
                    std::thread::sleep(
                        (start + Duration::from_secs_f64(request.arrival_s)).saturating_duration_since(Instant::now()),
                    );
                    // Never fails: this closure holds a sender of the permits.
                    if let Some((_, take)) = &permits {
                        let _ = take.recv();
                    }
                    let permit = permits.as_ref().map(|(give, _)| give.clone());
                    let done = tx.clone();
                    let spawned =
                        std::thread::Builder::new().name(format!("bench-request-{i}")).spawn_scoped(scope, move || {
                            let outcome = self.send(request, first_arrival);
                            if let Some(give) = permit {
                                let _ = give.send(());
                            }
                            let _ = done.send((i, outcome, Instant::now()));
                        });
                    if let Err(e) = spawned {
                        if let Some((give, _)) = &permits {
                            let _ = give.send(());
                        }
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
        let results = requests
            .iter()
            .zip(outcomes)
            .map(|(request, outcome)| RequestResult {
                prompt_len: request.prompt.token_count(),
                requested_len: request.output_len,
                outcome: outcome.unwrap_or_else(|| Err("the request was lost".into())),
            })
            .collect();
        let duration_s = last_end.duration_since(start).as_secs_f64() - requests[0].arrival_s;
        Ok(ReplayReport::new(results, duration_s, None)?)
    }

    /// Sends one request and times its stream; `first_arrival` is when the run's first request
    /// arrived.
    fn send(&self, request: &BenchRequest, first_arrival: Instant) -> RequestOutcome {
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
        let sent_s = sent.saturating_duration_since(first_arrival).as_secs_f64();
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
                return Ok(stream.finish(sent_s, at));
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
    /// `usage.prompt_tokens`, once a chunk carried it.
    prompt_tokens: Option<usize>,
}

impl StreamTimes {
    /// Counts the tokens of `chunk`, which arrived `at`: its choice's `token_ids`, or one token if
    /// it has text and no ids.
    fn push(&mut self, at: f64, chunk: &Value) {
        if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
            self.usage = Some(n as usize);
        }
        if let Some(n) = chunk["usage"]["prompt_tokens"].as_u64() {
            self.prompt_tokens = Some(n as usize);
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

    /// The times of a stream sent `sent_s` after the run's first arrival that ended `at`.
    fn finish(self, sent_s: f64, at: f64) -> RequestTimes {
        RequestTimes {
            sent_s,
            output_tokens: self.usage.unwrap_or(self.tokens.len()),
            tokens: self.tokens,
            end_s: at,
            prompt_tokens: self.prompt_tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn chunks_of_several_tokens_spread_over_the_gap() {
        let mut s = StreamTimes::default();
        s.push(0.1, &json!({ "choices": [{ "text": "", "token_ids": [1, 2] }] }));
        s.push(0.4, &json!({ "choices": [{ "text": "abc", "token_ids": [3, 4, 5] }] }));
        // Chunks without tokens (the final one, usage) count nothing; text without ids counts one.
        s.push(0.5, &json!({ "choices": [{ "text": "", "finish_reason": "length" }] }));
        s.push(0.6, &json!({ "choices": [{ "text": "d" }] }));
        s.push(0.7, &json!({ "choices": [], "usage": { "prompt_tokens": 9, "completion_tokens": 6 } }));
        let t = s.finish(1.5, 0.8);
        let want = [0.1, 0.1, 0.2, 0.3, 0.4, 0.6];
        assert_eq!(t.tokens.len(), want.len());
        assert!(t.tokens.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12), "{:?}", t.tokens);
        assert_eq!((t.sent_s, t.output_tokens, t.end_s, t.prompt_tokens), (1.5, 6, 0.8, Some(9)));
    }

    /// A fake OpenAI-compatible server on a loopback port: it lists one model, streams every
    /// completion as `tokens` chunks of one token `gap` apart, and records the most completions it
    /// had in flight at once.
    struct FakeServer {
        base: String,
        peak: Arc<AtomicUsize>,
    }

    impl FakeServer {
        fn start(tokens: usize, gap: Duration) -> FakeServer {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            let (in_flight, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
            let counters = (in_flight, Arc::clone(&peak));
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    let (in_flight, peak) = (Arc::clone(&counters.0), Arc::clone(&counters.1));
                    std::thread::spawn(move || FakeServer::answer(stream, tokens, gap, &in_flight, &peak));
                }
            });
            FakeServer { base, peak }
        }

        fn answer(mut stream: TcpStream, tokens: usize, gap: Duration, in_flight: &AtomicUsize, peak: &AtomicUsize) {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let mut length = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line.trim().is_empty() {
                    break;
                }
                if let Some((name, value)) = line.split_once(':')
                    && name.eq_ignore_ascii_case("content-length")
                {
                    length = value.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            if request_line.starts_with("GET /v1/models") {
                let models = r#"{"data": [{"id": "fake"}]}"#;
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", models.len());
                stream.write_all(format!("{head}{models}").as_bytes()).unwrap();
                return;
            }
            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            let mut out =
                String::from("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n");
            stream.write_all(out.as_bytes()).unwrap();
            for i in 0..tokens {
                std::thread::sleep(gap);
                out = format!("data: {}\n\n", json!({ "choices": [{ "text": "x", "token_ids": [i] }] }));
                stream.write_all(out.as_bytes()).unwrap();
            }
            let usage = json!({ "choices": [], "usage": { "prompt_tokens": 5, "completion_tokens": tokens } });
            stream.write_all(format!("data: {usage}\n\n").as_bytes()).unwrap();
            // Out of flight before the client can see the end, which lets it send the next request.
            in_flight.fetch_sub(1, Ordering::SeqCst);
            stream.write_all(b"data: [DONE]\n\n").unwrap();
        }
    }

    #[test]
    fn a_cap_on_requests_in_flight_holds_the_others_back() {
        let server = FakeServer::start(3, Duration::from_millis(30));
        let config = RemoteConfig {
            url: &server.base,
            served_model_name: None,
            api_key: None,
            request_timeout: Duration::from_secs(30),
        };
        let remote = Remote::connect(&config).unwrap();
        assert_eq!(remote.model(), "fake");
        // Eight requests at once, the first a text prompt whose length the server reports.
        let requests: Vec<BenchRequest> = (0..8)
            .map(|i| BenchRequest {
                arrival_s: 0.0,
                prompt: if i == 0 { Prompt::Text("Hello".into()) } else { Prompt::TokenIds(vec![1; i]) },
                output_len: 3,
            })
            .collect();
        let report = remote.replay(&requests, Some(3), || {}).unwrap();
        assert_eq!((report.completed, server.peak.load(Ordering::SeqCst)), (8, 3));
        assert_eq!(report.peak_concurrency(), 3);
        let input_lens: Vec<Option<usize>> = report.requests.iter().map(RequestResult::input_len).collect();
        assert_eq!(input_lens, [Some(5), Some(1), Some(2), Some(3), Some(4), Some(5), Some(6), Some(7)]);
        // Times count from sending: no request's first token waited behind the others (each
        // stream's first token comes one 30 ms gap after it is sent).
        assert!(report.ttft.p99 < 0.5, "{:?}", report.ttft);
        assert!(report.completed_times().skip(3).all(|t| t.sent_s > 0.0));
        // Without a cap, all of them at once.
        let server = FakeServer::start(3, Duration::from_millis(100));
        let remote = Remote::connect(&RemoteConfig { url: &server.base, ..config }).unwrap();
        let report = remote.replay(&requests, None, || {}).unwrap();
        assert_eq!((report.completed, server.peak.load(Ordering::SeqCst)), (8, 8));
        assert!(remote.replay(&requests, Some(0), || {}).is_err());
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
