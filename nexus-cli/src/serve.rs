//! `nexus serve`: an OpenAI-compatible HTTP API over the engine.
//!
//! One thread owns the [`Engine`] and steps it while there is work; HTTP handlers (axum on tokio)
//! tokenize, submit requests to it over a channel and get each request's tokens back on a channel
//! of their own, which they detokenize (with stop strings) into JSON or server-sent events. A
//! client that goes away drops its receiver; the engine thread notices on the next token and
//! aborts the request, which frees its KV blocks at once.
//!
//! Beyond OpenAI's fields, requests take vLLM's `ignore_eos`, `min_tokens` (end-of-sequence and
//! stop strings cannot end the output before that many tokens) and `return_token_ids` (each
//! choice, and each streamed chunk's choice, carries the `token_ids` it generated, and the
//! response the `prompt_token_ids`). A `/v1/completions` prompt is a string or an array of token
//! ids; batches (arrays of strings or of arrays) are refused.
//!
//! A model without a tokenizer (`synthetic:<name>`) takes token ids in and gives token ids out:
//! its prompts must be token-id arrays, its `text` is always "" and its token ids are always
//! returned; text prompts, stop strings and `/v1/chat/completions` get a 400.
//!
//! `/metrics` also shows the engine's lanes (one, `mixed`, for the chunked schedule; `prefill`
//! and `decode` for nexus): each lane's current budget in SMs, and histograms of its iterations'
//! latency and of the engine thread's CPU time on each, from the engine's timeline, which the
//! engine thread drains after every step.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use nexus_runtime::engine::FinishReason;
use nexus_runtime::engine::sampling::{Penalties, SamplingParams, TokenLogprobs};
use nexus_runtime::engine::scheduler::Lane;
use nexus_runtime::engine::{Engine, EngineEvent, MAX_LOGPROBS, RequestId, RequestOptions};
use nexus_runtime::model::backend::Backend;
use nexus_runtime::text::chat_template::ChatMessage;
use nexus_runtime::text::stop::StopMatcher;
use nexus_runtime::text::tokenizer::Tokenizer;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc as tokio_mpsc, oneshot};

/// What the HTTP side asks of the engine thread.
enum Command {
    Add {
        id: RequestId,
        prompt: Vec<u32>,
        options: RequestOptions,
        events: tokio_mpsc::UnboundedSender<EngineEvent>,
        accepted: oneshot::Sender<Result<(), String>>,
    },
    Abort(RequestId),
}

/// Latency histograms and engine gauges for `/metrics`.
struct Metrics {
    ttft: Histogram,
    tbt: Histogram,
    e2e: Histogram,
    /// One per lane of the engine, in its order.
    lanes: Vec<LaneMetrics>,
    running: AtomicU64,
    waiting: AtomicU64,
    /// KV usage in millionths.
    kv_usage: AtomicU64,
    requests: AtomicU64,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    preemptions: AtomicU64,
}

/// What `/metrics` shows of one lane of the engine.
struct LaneMetrics {
    lane: Lane,
    /// The budget of its iteration in flight, or of its latest one, in SMs.
    budget: AtomicU64,
    /// Launch to seen done, per iteration.
    iteration: Histogram,
    /// The engine thread's CPU time per iteration.
    host: Histogram,
}

impl Metrics {
    /// Metrics of an engine with `lanes`, each with its initial budget.
    fn new(lanes: &[(Lane, u32)]) -> Self {
        let lanes = lanes
            .iter()
            .map(|&(lane, budget)| LaneMetrics {
                lane,
                budget: AtomicU64::new(budget.into()),
                iteration: Histogram::new(&ITERATION_BUCKETS),
                host: Histogram::new(&ITERATION_BUCKETS),
            })
            .collect();
        Metrics {
            ttft: Histogram::new(&LATENCY_BUCKETS),
            tbt: Histogram::new(&LATENCY_BUCKETS),
            e2e: Histogram::new(&LATENCY_BUCKETS),
            lanes,
            running: AtomicU64::default(),
            waiting: AtomicU64::default(),
            kv_usage: AtomicU64::default(),
            requests: AtomicU64::default(),
            prompt_tokens: AtomicU64::default(),
            generation_tokens: AtomicU64::default(),
            preemptions: AtomicU64::default(),
        }
    }
}

/// A Prometheus histogram in seconds.
struct Histogram {
    buckets: &'static [f64],
    counts: Mutex<(Vec<u64>, u64, f64)>,
}

/// Request latencies, from a millisecond to half a minute.
const LATENCY_BUCKETS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Iteration and host times: finer, as a decode iteration takes milliseconds on a GPU and the
/// host's share of it a fraction of one.
const ITERATION_BUCKETS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0];

impl Histogram {
    fn new(buckets: &'static [f64]) -> Self {
        Histogram { buckets, counts: Mutex::new((vec![0; buckets.len()], 0, 0.0)) }
    }

    fn observe(&self, seconds: f64) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        for (bucket, &le) in c.0.iter_mut().zip(self.buckets) {
            if seconds <= le {
                *bucket += 1;
            }
        }
        c.1 += 1;
        c.2 += seconds;
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        render_family(name, help, "histogram", out);
        self.render_series(name, None, out);
    }

    /// The histogram's lines, labelled with `lane` when given.
    fn render_series(&self, name: &str, lane: Option<Lane>, out: &mut String) {
        let c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let (bucket_labels, labels) = match lane {
            Some(lane) => (format!("lane=\"{}\",", lane.name()), format!("{{lane=\"{}\"}}", lane.name())),
            None => (String::new(), String::new()),
        };
        for (count, le) in c.0.iter().zip(self.buckets) {
            let _ = writeln!(out, "{name}_bucket{{{bucket_labels}le=\"{le}\"}} {count}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{bucket_labels}le=\"+Inf\"}} {}\n{name}_sum{labels} {}\n{name}_count{labels} {}",
            c.1, c.2, c.1
        );
    }
}

/// One histogram family with a series per lane, `histogram` picking each lane's.
fn render_lane_histograms(
    out: &mut String,
    name: &str,
    help: &str,
    lanes: &[LaneMetrics],
    histogram: impl Fn(&LaneMetrics) -> &Histogram,
) {
    render_family(name, help, "histogram", out);
    for l in lanes {
        histogram(l).render_series(name, Some(l.lane), out);
    }
}

/// The `# HELP` and `# TYPE` lines of a metric family.
fn render_family(name: &str, help: &str, kind: &str, out: &mut String) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Settings of the server.
pub struct ServerConfig {
    pub model_name: String,
    pub api_key: Option<String>,
    pub max_context: usize,
    /// Token ids of prompts must be below this.
    pub vocab_size: usize,
}

struct AppState {
    commands: Mutex<mpsc::Sender<Command>>,
    /// `None` for a tokenizer-free model: token ids in, token ids out.
    tokenizer: Option<Tokenizer>,
    config: ServerConfig,
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
}

/// Serves `engine` on `listener` until the process ends. Prints the address it listens on.
pub async fn serve<B: Backend + 'static>(
    engine: Engine<B>,
    tokenizer: Option<Tokenizer>,
    config: ServerConfig,
    listener: tokio::net::TcpListener,
) -> anyhow::Result<()>
where
    Engine<B>: Send,
{
    let metrics = Arc::new(Metrics::new(&engine.lane_budgets()));
    let (tx, rx) = mpsc::channel();
    let engine_metrics = metrics.clone();
    std::thread::Builder::new()
        .name("nexus-engine".into())
        .spawn(move || engine_loop(engine, rx, &engine_metrics))
        .context("starting the engine thread")?;
    let state = Arc::new(AppState { commands: Mutex::new(tx), tokenizer, config, next_id: AtomicU64::new(1), metrics });
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics_text))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .with_state(state);
    let addr = listener.local_addr()?;
    println!("nexus serve: listening on http://{addr}");
    axum::serve(listener, app).await.context("HTTP server")
}

type Senders = HashMap<RequestId, tokio_mpsc::UnboundedSender<EngineEvent>>;

fn handle<B: Backend>(engine: &mut Engine<B>, command: Command, senders: &mut Senders) {
    match command {
        Command::Add { id, prompt, options, events, accepted } => match engine.add_request(id, prompt, options) {
            Ok(()) => {
                senders.insert(id, events);
                let _ = accepted.send(Ok(()));
            }
            Err(e) => {
                let _ = accepted.send(Err(e.message().to_owned()));
            }
        },
        Command::Abort(id) => {
            engine.abort(id);
            senders.remove(&id);
        }
    }
}

fn engine_loop<B: Backend>(mut engine: Engine<B>, commands: mpsc::Receiver<Command>, metrics: &Metrics) {
    let mut senders = Senders::new();
    engine.keep_timeline(true);
    loop {
        if !engine.has_unfinished() {
            match commands.recv() {
                Ok(command) => handle(&mut engine, command, &mut senders),
                Err(_) => return,
            }
        }
        while let Ok(command) = commands.try_recv() {
            handle(&mut engine, command, &mut senders);
        }
        match engine.step() {
            Ok(events) => {
                for event in events {
                    let (id, finished) = match event {
                        EngineEvent::Token { id, .. } => (id, false),
                        EngineEvent::Finished { id, .. } => (id, true),
                    };
                    let delivered = senders.get(&id).is_some_and(|s| s.send(event).is_ok());
                    if finished || !delivered {
                        senders.remove(&id);
                    }
                    if !delivered && !finished {
                        // The client went away: stop and free its blocks now.
                        engine.abort(id);
                    }
                }
            }
            Err(e) => {
                // A failed step leaves the batch's requests in an unknown state: end them all.
                eprintln!("nexus serve: engine step failed: {e}");
                for (id, _) in senders.drain() {
                    engine.abort(id);
                }
            }
        }
        metrics.running.store(engine.num_running() as u64, Ordering::Relaxed);
        metrics.preemptions.store(engine.preemptions(), Ordering::Relaxed);
        metrics.waiting.store(engine.num_waiting() as u64, Ordering::Relaxed);
        metrics.kv_usage.store((engine.kv_usage() * 1e6) as u64, Ordering::Relaxed);
        for iteration in engine.take_timeline() {
            if let Some(lane) = metrics.lanes.iter().find(|l| l.lane == iteration.lane) {
                lane.iteration.observe((iteration.end - iteration.start).as_secs_f64());
                lane.host.observe(iteration.host.as_secs_f64());
            }
        }
        for (lane, budget) in engine.lane_budgets() {
            if let Some(l) = metrics.lanes.iter().find(|l| l.lane == lane) {
                l.budget.store(budget.into(), Ordering::Relaxed);
            }
        }
    }
}

/// An error answered with an OpenAI-style body.
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "message": self.message, "type": self.kind, "param": null, "code": null } });
        (self.status, axum::Json(body)).into_response()
    }
}

fn error(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
    ApiError { status, kind, message: message.into() }
}

fn bad_request(message: impl Into<String>) -> ApiError {
    error(StatusCode::BAD_REQUEST, "invalid_request_error", message)
}

fn check_api_key(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.config.api_key else { return Ok(()) };
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key.as_str()) {
        Ok(())
    } else {
        Err(error(StatusCode::UNAUTHORIZED, "authentication_error", "missing or wrong API key"))
    }
}

async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = check_api_key(&state, &headers) {
        return e.into_response();
    }
    // `max_model_len` as vLLM gives it: the most tokens (prompt and output) of one request.
    let data = json!([{
        "id": state.config.model_name,
        "object": "model",
        "created": 0,
        "owned_by": "nexus",
        "max_model_len": state.config.max_context
    }]);
    axum::Json(json!({ "object": "list", "data": data })).into_response()
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    let m = &state.metrics;
    let mut out = String::new();
    m.ttft.render("nexus_time_to_first_token_seconds", "Arrival to first token.", &mut out);
    m.tbt.render("nexus_time_between_tokens_seconds", "Gap between consecutive tokens of a request.", &mut out);
    m.e2e.render("nexus_e2e_request_latency_seconds", "Arrival to the end of a request's output.", &mut out);
    let gauges = [
        ("nexus_requests_running", "Requests holding KV blocks.", m.running.load(Ordering::Relaxed) as f64),
        ("nexus_requests_waiting", "Requests waiting for admission.", m.waiting.load(Ordering::Relaxed) as f64),
        ("nexus_kv_cache_usage", "Fraction of KV blocks in use.", m.kv_usage.load(Ordering::Relaxed) as f64 / 1e6),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
    }
    let budget = "nexus_lane_budget_sms";
    render_family(budget, "SMs of each lane's iteration in flight, or of its latest one.", "gauge", &mut out);
    for l in &m.lanes {
        let _ = writeln!(out, "{budget}{{lane=\"{}\"}} {}", l.lane.name(), l.budget.load(Ordering::Relaxed));
    }
    render_lane_histograms(
        &mut out,
        "nexus_iteration_seconds",
        "Each lane's iterations, from launch to seen done.",
        &m.lanes,
        |l| &l.iteration,
    );
    render_lane_histograms(
        &mut out,
        "nexus_iteration_host_seconds",
        "CPU time of the engine thread per iteration of each lane (planning, building, launching, reading back, \
         sampling).",
        &m.lanes,
        |l| &l.host,
    );
    let counters = [
        ("nexus_requests_total", "Requests accepted.", &m.requests),
        ("nexus_prompt_tokens_total", "Prompt tokens of the requests accepted.", &m.prompt_tokens),
        ("nexus_generation_tokens_total", "Tokens generated.", &m.generation_tokens),
        ("nexus_preemptions_total", "Sequences preempted (recomputed later) for lack of KV blocks.", &m.preemptions),
    ];
    for (name, help, value) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", value.load(Ordering::Relaxed));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// Fields shared by both endpoints; others that OpenAI clients send (`user`, ...) are ignored,
/// and the ones asking for what this server does not do (`echo`, `best_of`) are refused when they
/// ask for it.
#[derive(Deserialize)]
struct CommonFields {
    model: String,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    top_k: Option<i64>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    presence_penalty: Option<f64>,
    #[serde(default)]
    frequency_penalty: Option<f64>,
    /// vLLM's: divides the positive logits (multiplies the negative ones) of tokens seen.
    #[serde(default)]
    repetition_penalty: Option<f64>,
    #[serde(default)]
    n: Option<u64>,
    #[serde(default)]
    stop: Option<Value>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    ignore_eos: bool,
    /// vLLM's: the least output tokens before end-of-sequence or a stop string may end it.
    #[serde(default)]
    min_tokens: Option<i64>,
    /// vLLM's: also return the prompt's and the output's token ids.
    #[serde(default)]
    return_token_ids: bool,
    /// vLLM's: more token ids that end the output (the token is part of it).
    #[serde(default)]
    stop_token_ids: Option<Vec<u32>>,
    /// Completions: an integer (`null` for none); chat: `true`/`false`, with `top_logprobs`.
    #[serde(default)]
    logprobs: Option<Value>,
    #[serde(default)]
    top_logprobs: Option<u64>,
    #[serde(default)]
    echo: Option<bool>,
    #[serde(default)]
    best_of: Option<u64>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: Value,
    #[serde(flatten)]
    common: CommonFields,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessageIn>,
    #[serde(flatten)]
    common: CommonFields,
}

#[derive(Deserialize)]
struct ChatMessageIn {
    role: String,
    content: String,
}

/// A validated request, ready for the engine.
struct Prepared {
    prompt: Vec<u32>,
    options: RequestOptions,
    stops: Vec<String>,
    stream: bool,
    include_usage: bool,
    /// Return token ids (asked for, or the model has no tokenizer).
    token_ids: bool,
}

fn prepare(state: &AppState, common: &CommonFields, prompt: Vec<u32>) -> Result<Prepared, ApiError> {
    if common.model != state.config.model_name {
        return Err(error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("the model `{}` does not exist; this server has `{}`", common.model, state.config.model_name),
        ));
    }
    if common.n.is_some_and(|n| n != 1) {
        return Err(bad_request("only n = 1 is supported"));
    }
    if common.best_of.is_some_and(|n| n != 1) {
        return Err(bad_request("only best_of = 1 is supported"));
    }
    // Completions ask with `logprobs: N`, chat with `logprobs: true` and `top_logprobs: N`.
    let logprobs = match (&common.logprobs, common.top_logprobs) {
        (None | Some(Value::Null) | Some(Value::Bool(false)), None) => None,
        (None | Some(Value::Null) | Some(Value::Bool(false)), Some(_)) => {
            return Err(bad_request("top_logprobs needs logprobs: true"));
        }
        (Some(Value::Bool(true)), n) => Some(n.unwrap_or(0)),
        (Some(Value::Number(n)), None) if n.as_u64().is_some() => n.as_u64(),
        _ => return Err(bad_request("logprobs must be true (with top_logprobs: N) or an integer N >= 0")),
    };
    if let Some(n) = logprobs.filter(|&n| n > MAX_LOGPROBS as u64) {
        return Err(bad_request(format!("logprobs: {n} alternatives asked, at most {MAX_LOGPROBS}")));
    }
    let logprobs = logprobs.map(|n| n as usize);
    if common.echo == Some(true) {
        return Err(bad_request("echo is not supported by this server"));
    }
    let vocab = state.config.vocab_size;
    let stop_token_ids = common.stop_token_ids.clone().unwrap_or_default();
    if let Some(&bad) = stop_token_ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(bad_request(format!("stop_token_ids: {bad} is outside the vocabulary (0..{vocab})")));
    }
    let temperature = common.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad_request(format!("temperature {temperature} is not in [0, 2]")));
    }
    let top_p = common.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad_request(format!("top_p {top_p} is not in (0, 1]")));
    }
    let top_k = match common.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => return Err(bad_request(format!("top_k {k} must be positive (or -1 for all)"))),
    };
    let stops = match &common.stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.len() <= 4 => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| bad_request("stop must be a string or strings")))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad_request("stop must be a string or up to 4 strings")),
    };
    if state.tokenizer.is_none() && stops.iter().any(|s| !s.is_empty()) {
        return Err(no_tokenizer(state, "stop strings need a tokenizer"));
    }
    if prompt.is_empty() {
        return Err(bad_request("the prompt is empty"));
    }
    let room = state.config.max_context.saturating_sub(prompt.len());
    if room == 0 {
        return Err(bad_request(format!(
            "the prompt has {} tokens; the context holds {}",
            prompt.len(),
            state.config.max_context
        )));
    }
    let max_tokens = match common.max_completion_tokens.or(common.max_tokens) {
        None => room.min(1024),
        Some(0) => return Err(bad_request("max_tokens must be at least 1")),
        Some(m) if m as usize > room => {
            return Err(bad_request(format!(
                "the prompt has {} tokens and asks for {m} more; the context holds {}",
                prompt.len(),
                state.config.max_context
            )));
        }
        Some(m) => m as usize,
    };
    let min_tokens = match common.min_tokens {
        None => 0,
        Some(m) if m >= 0 && m as u64 <= max_tokens as u64 => m as usize,
        Some(m) => return Err(bad_request(format!("min_tokens {m} must be in [0, max_tokens = {max_tokens}]"))),
    };
    let penalties = Penalties {
        presence: common.presence_penalty.unwrap_or(0.0) as f32,
        frequency: common.frequency_penalty.unwrap_or(0.0) as f32,
        repetition: common.repetition_penalty.unwrap_or(1.0) as f32,
    };
    penalties.validate().map_err(|e| bad_request(e.message().to_owned()))?;
    let sampling =
        SamplingParams { temperature: temperature as f32, top_k, top_p: top_p as f32, seed: common.seed, penalties };
    let options =
        RequestOptions { max_tokens, sampling, ignore_eos: common.ignore_eos, min_tokens, stop_token_ids, logprobs };
    let include_usage = common.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let token_ids = common.return_token_ids || state.tokenizer.is_none();
    Ok(Prepared { prompt, options, stops, stream: common.stream, include_usage, token_ids })
}

/// Renders tokens' log-probabilities the way the endpoint's clients expect: `tokens`,
/// `token_logprobs`, `top_logprobs` and `text_offset` for completions, `content` entries with
/// `bytes` and `top_logprobs` for chat. A model without a tokenizer names tokens `token_id:<id>`
/// (as vLLM's `return_tokens_as_token_ids`).
struct LogprobsJson {
    state: Arc<AppState>,
    kind: Kind,
    /// Completions: where the next token starts in the output text.
    offset: usize,
}

impl LogprobsJson {
    fn token(&self, id: u32) -> String {
        match &self.state.tokenizer {
            Some(t) => t.decode(&[id], false).unwrap_or_default(),
            None => format!("token_id:{id}"),
        }
    }

    fn render(&mut self, entries: &[(u32, Box<TokenLogprobs>)]) -> Value {
        match self.kind {
            Kind::Completion => {
                let (mut tokens, mut logprobs, mut top, mut offsets) = (vec![], vec![], vec![], vec![]);
                for (id, lp) in entries {
                    let token = self.token(*id);
                    offsets.push(self.offset);
                    self.offset += token.chars().count();
                    tokens.push(token);
                    logprobs.push(lp.logprob);
                    let alternatives: serde_json::Map<String, Value> =
                        lp.top.iter().map(|&(t, l)| (self.token(t), json!(l))).collect();
                    top.push(alternatives);
                }
                json!({ "tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets })
            }
            Kind::Chat => {
                let entry = |token: String, logprob: f32| {
                    let bytes = token.as_bytes().to_vec();
                    json!({ "token": token, "logprob": logprob, "bytes": bytes })
                };
                let content: Vec<Value> = entries
                    .iter()
                    .map(|(id, lp)| {
                        let mut e = entry(self.token(*id), lp.logprob);
                        e["top_logprobs"] = lp.top.iter().map(|&(t, l)| entry(self.token(t), l)).collect();
                        e
                    })
                    .collect();
                json!({ "content": content })
            }
        }
    }
}

/// The 400 for what a tokenizer-free model cannot do.
fn no_tokenizer(state: &AppState, what: &str) -> ApiError {
    bad_request(format!(
        "the model `{}` has no tokenizer (token ids in, token ids out): {what}",
        state.config.model_name
    ))
}

/// The token ids of a `/v1/completions` prompt: a string, tokenized, or an array of token ids.
fn completion_prompt(state: &AppState, prompt: &Value) -> Result<Vec<u32>, ApiError> {
    let vocab = state.config.vocab_size;
    match prompt {
        Value::String(text) => {
            let Some(tokenizer) = &state.tokenizer else {
                return Err(no_tokenizer(state, "send the prompt as an array of token ids"));
            };
            tokenizer.encode(text, true).map_err(|e| bad_request(e.message().to_owned()))
        }
        Value::Array(items) if items.iter().all(Value::is_number) => items
            .iter()
            .map(|v| match v.as_u64() {
                Some(id) if id < vocab as u64 => Ok(id as u32),
                _ => Err(bad_request(format!("prompt token id {v} is outside the vocabulary (0..{vocab})"))),
            })
            .collect(),
        Value::Array(_) => Err(bad_request(
            "batched prompts (arrays of strings or of token-id arrays) are not supported: send one prompt per \
             request, a string or an array of token ids",
        )),
        _ => Err(bad_request("prompt must be a string or an array of token ids")),
    }
}

fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| bad_request(format!("malformed request body: {e}")))
}

async fn completions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(e) = check_api_key(&state, &headers) {
        return e.into_response();
    }
    let request: CompletionRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let prompt = match completion_prompt(&state, &request.prompt) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    match prepare(&state, &request.common, prompt) {
        Ok(prepared) => run(state, prepared, Kind::Completion).await,
        Err(e) => e.into_response(),
    }
}

async fn chat_completions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(e) = check_api_key(&state, &headers) {
        return e.into_response();
    }
    let request: ChatRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if request.messages.is_empty() {
        return bad_request("messages must not be empty").into_response();
    }
    if let Some(m) = request.messages.iter().find(|m| !matches!(m.role.as_str(), "system" | "user" | "assistant")) {
        return bad_request(format!("unknown message role `{}`", m.role)).into_response();
    }
    let Some(tokenizer) = &state.tokenizer else {
        return no_tokenizer(&state, "use /v1/completions with a prompt of token ids").into_response();
    };
    let Some(template) = tokenizer.chat_template() else {
        return bad_request("this model has no chat template; use /v1/completions").into_response();
    };
    let messages: Vec<ChatMessage> = request.messages.iter().map(|m| ChatMessage::new(&m.role, &m.content)).collect();
    let prompt = match template.render(&messages, true).and_then(|text| tokenizer.encode(&text, false)) {
        Ok(p) => p,
        Err(e) => return bad_request(e.message().to_owned()).into_response(),
    };
    match prepare(&state, &request.common, prompt) {
        Ok(prepared) => run(state, prepared, Kind::Chat).await,
        Err(e) => e.into_response(),
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Completion,
    Chat,
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Stop => "stop",
    }
}

fn unix_time() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// One piece of a response: text with the ids of the tokens it came from, or the end with its
/// reason and token counts.
enum Piece {
    /// Text ready to show and the tokens since the last chunk, with their log-probabilities when
    /// the request asked for them.
    Chunk {
        text: String,
        token_ids: Vec<u32>,
        logprobs: Vec<(u32, Box<TokenLogprobs>)>,
    },
    End {
        reason: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
}

/// Submits `prepared` and turns its tokens into pieces on a channel. The returned receiver ends
/// after `Piece::End`; dropping it aborts the request. A chunk goes out whenever text is ready to
/// show, and for every token when token ids are returned (so that clients time each token).
async fn submit(
    state: &Arc<AppState>,
    prepared: Prepared,
) -> Result<(RequestId, tokio_mpsc::Receiver<Piece>), ApiError> {
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let (events_tx, mut events) = tokio_mpsc::unbounded_channel();
    let (accepted_tx, accepted) = oneshot::channel();
    let prompt_tokens = prepared.prompt.len();
    let min_tokens = prepared.options.min_tokens;
    let command = Command::Add {
        id,
        prompt: prepared.prompt,
        options: prepared.options,
        events: events_tx,
        accepted: accepted_tx,
    };
    let sent = state.commands.lock().unwrap_or_else(|p| p.into_inner()).send(command);
    if sent.is_err() {
        return Err(error(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the engine has stopped"));
    }
    match accepted.await {
        Ok(Ok(())) => {}
        Ok(Err(message)) => return Err(bad_request(message)),
        Err(_) => return Err(error(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the engine has stopped")),
    }
    state.metrics.requests.fetch_add(1, Ordering::Relaxed);
    state.metrics.prompt_tokens.fetch_add(prompt_tokens as u64, Ordering::Relaxed);
    let (tx, rx) = tokio_mpsc::channel(64);
    let state = state.clone();
    let (stops, every_token) = (prepared.stops, prepared.token_ids);
    tokio::spawn(async move {
        let arrival = Instant::now();
        let mut last: Option<Instant> = None;
        let mut decoder = state.tokenizer.as_ref().map(|t| t.stream_decoder(true));
        let mut matcher = StopMatcher::new(&stops);
        let mut completion_tokens = 0;
        let mut token_ids = Vec::new();
        let mut logprobs = Vec::new();
        let mut reason = "length";
        while let Some(event) = events.recv().await {
            match event {
                EngineEvent::Token { token, logprobs: token_logprobs, .. } => {
                    let now = Instant::now();
                    match last {
                        None => state.metrics.ttft.observe((now - arrival).as_secs_f64()),
                        Some(t) => state.metrics.tbt.observe((now - t).as_secs_f64()),
                    }
                    state.metrics.generation_tokens.fetch_add(1, Ordering::Relaxed);
                    last = Some(now);
                    completion_tokens += 1;
                    token_ids.push(token);
                    logprobs.extend(token_logprobs.map(|l| (token, l)));
                    let text = decoder.as_mut().and_then(|d| d.push(token).ok().flatten()).unwrap_or_default();
                    // Before min_tokens, stop strings cannot end the output: the text bypasses the
                    // matcher, which so far has seen nothing.
                    let (ready, stopped) = if completion_tokens >= min_tokens {
                        let (ready, stopped) = matcher.push(&text);
                        (ready.to_owned(), stopped)
                    } else {
                        (text, false)
                    };
                    if !ready.is_empty() || every_token {
                        let chunk = Piece::Chunk {
                            text: ready,
                            token_ids: std::mem::take(&mut token_ids),
                            logprobs: std::mem::take(&mut logprobs),
                        };
                        if tx.send(chunk).await.is_err() {
                            break;
                        }
                    }
                    if stopped {
                        reason = "stop";
                        break;
                    }
                }
                EngineEvent::Finished { reason: r, .. } => {
                    reason = finish_reason(r);
                    let rest = decoder.take().and_then(|d| d.finish().ok().flatten()).unwrap_or_default();
                    let (ready, stopped) = matcher.push(&rest);
                    let mut text = ready.to_owned();
                    if stopped {
                        reason = "stop";
                    } else {
                        text.push_str(matcher.flush());
                    }
                    if !text.is_empty() || !token_ids.is_empty() {
                        let token_ids = std::mem::take(&mut token_ids);
                        let logprobs = std::mem::take(&mut logprobs);
                        let _ = tx.send(Piece::Chunk { text, token_ids, logprobs }).await;
                    }
                    break;
                }
            }
        }
        // Ended early (a stop string, or the client went away): free the request's blocks now.
        if !events.is_closed() {
            let _ = state.commands.lock().unwrap_or_else(|p| p.into_inner()).send(Command::Abort(id));
        }
        state.metrics.e2e.observe(arrival.elapsed().as_secs_f64());
        let _ = tx.send(Piece::End { reason, prompt_tokens, completion_tokens }).await;
    });
    Ok((id, rx))
}

async fn run(state: Arc<AppState>, prepared: Prepared, kind: Kind) -> Response {
    let (stream, include_usage, with_ids) = (prepared.stream, prepared.include_usage, prepared.token_ids);
    let prompt_ids = with_ids.then(|| prepared.prompt.clone());
    let mut logprobs_json = prepared.options.logprobs.map(|_| LogprobsJson { state: state.clone(), kind, offset: 0 });
    let (request, mut pieces) = match submit(&state, prepared).await {
        Ok(submitted) => submitted,
        Err(e) => return e.into_response(),
    };
    let id = format!("{}-{request}", if matches!(kind, Kind::Chat) { "chatcmpl" } else { "cmpl" });
    let created = unix_time();
    let model = state.config.model_name.clone();
    let usage = |p: usize, c: usize| json!({ "prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c });
    // A choice of `text` and `token_ids`, with the token ids and log-probabilities only when asked
    // for.
    let choice =
        move |text: &str, token_ids: &[u32], logprobs: Option<Value>, finish_reason: Option<&str>, streamed| {
            let mut choice = match (kind, streamed) {
                (Kind::Completion, _) => {
                    json!({ "index": 0, "text": text, "logprobs": logprobs.clone(), "finish_reason": finish_reason })
                }
                (Kind::Chat, false) => json!({
                    "index": 0,
                    "message": { "role": "assistant", "content": text },
                    "finish_reason": finish_reason
                }),
                (Kind::Chat, true) if text.is_empty() && finish_reason.is_some() => {
                    json!({ "index": 0, "delta": {}, "finish_reason": finish_reason })
                }
                (Kind::Chat, true) => {
                    json!({ "index": 0, "delta": { "content": text }, "finish_reason": finish_reason })
                }
            };
            if with_ids {
                choice["token_ids"] = json!(token_ids);
            }
            if let (Kind::Chat, Some(logprobs)) = (kind, logprobs) {
                choice["logprobs"] = logprobs;
            }
            choice
        };
    if !stream {
        let (mut text, mut token_ids, mut all_logprobs) = (String::new(), Vec::new(), Vec::new());
        while let Some(piece) = pieces.recv().await {
            match piece {
                Piece::Chunk { text: t, token_ids: ids, logprobs } => {
                    text.push_str(&t);
                    token_ids.extend(ids);
                    all_logprobs.extend(logprobs);
                }
                Piece::End { reason, prompt_tokens, completion_tokens } => {
                    let object = if matches!(kind, Kind::Chat) { "chat.completion" } else { "text_completion" };
                    let mut body = json!({
                        "id": id, "object": object, "created": created, "model": model,
                        "choices": [choice(
                            &text,
                            &token_ids,
                            logprobs_json.as_mut().map(|l| l.render(&all_logprobs)),
                            Some(reason),
                            false
                        )],
                        "usage": usage(prompt_tokens, completion_tokens)
                    });
                    if let Some(ids) = prompt_ids {
                        body["prompt_token_ids"] = json!(ids);
                    }
                    return axum::Json(body).into_response();
                }
            }
        }
        return error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "the request ended without a result")
            .into_response();
    }
    let object = if matches!(kind, Kind::Chat) { "chat.completion.chunk" } else { "text_completion" };
    // The first chunk carries the prompt's token ids, as vLLM's do.
    let mut prompt_ids = prompt_ids;
    let mut chunk = move |choice: Value, usage: Option<Value>| {
        let mut v = json!({ "id": id, "object": object, "created": created, "model": model, "choices": [choice] });
        if let Some(ids) = prompt_ids.take() {
            v["prompt_token_ids"] = json!(ids);
        }
        if let Some(u) = usage {
            v["usage"] = u;
        }
        Event::default().data(v.to_string())
    };
    let (tx, rx) = tokio_mpsc::channel::<Result<Event, std::convert::Infallible>>(64);
    tokio::spawn(async move {
        if matches!(kind, Kind::Chat) {
            let mut first =
                json!({ "index": 0, "delta": { "role": "assistant", "content": "" }, "finish_reason": null });
            if with_ids {
                first["token_ids"] = json!([]);
            }
            if tx.send(Ok(chunk(first, None))).await.is_err() {
                return;
            }
        }
        while let Some(piece) = pieces.recv().await {
            let event = match piece {
                Piece::Chunk { text, token_ids, logprobs } => {
                    let logprobs = logprobs_json.as_mut().map(|l| l.render(&logprobs));
                    choice(&text, &token_ids, logprobs, None, true)
                }
                Piece::End { reason, prompt_tokens, completion_tokens } => {
                    let usage = include_usage.then(|| usage(prompt_tokens, completion_tokens));
                    let _ = tx.send(Ok(chunk(choice("", &[], None, Some(reason), true), usage))).await;
                    let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
                    return;
                }
            };
            // A closed channel means the client went away; dropping `pieces` aborts the request.
            if tx.send(Ok(chunk(event, None))).await.is_err() {
                return;
            }
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx)).into_response()
}
