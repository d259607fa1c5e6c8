//! `/metrics` in Prometheus' text format, and the engine's health that `/health` reports.
//!
//! The engine thread stores the gauges (running and waiting requests, KV usage, each lane's
//! budget) after every step and after taking in new requests and aborting abandoned ones, so that
//! they are current while a long step runs; the HTTP side times each request's tokens from its
//! arrival.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nexus_runtime::engine::Engine;
use nexus_runtime::engine::scheduler::Lane;
use nexus_runtime::model::backend::Backend;

/// Latency histograms, engine gauges, counters, and the engine's health.
pub struct Metrics {
    pub ttft: Histogram,
    pub tbt: Histogram,
    pub e2e: Histogram,
    /// One per lane of the engine, in its order.
    lanes: Vec<LaneMetrics>,
    running: AtomicU64,
    waiting: AtomicU64,
    /// KV usage in millionths.
    kv_usage: AtomicU64,
    pub requests: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    preemptions: AtomicU64,
    /// Requests that failed on the server's side (the engine failed them, or their output could
    /// not be made into text).
    failures: AtomicU64,
    /// The latest of those failures: when, and why.
    last_failure: Mutex<Option<(Instant, String)>>,
    /// Whether the engine thread is up; it goes down when the thread ends, by a panic included.
    engine_up: AtomicBool,
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

/// What `/health` says.
pub enum Health {
    /// The engine thread is up and no request failed lately.
    Ok { failures: u64 },
    /// The engine thread is up, but a request failed within [`DEGRADED_FOR`].
    Degraded { failures: u64, last_error: String, ago: Duration },
    /// The engine thread has ended: no request can be served.
    Down,
}

/// How long a failed request keeps `/health` degraded.
pub const DEGRADED_FOR: Duration = Duration::from_secs(300);

impl Metrics {
    /// Metrics of an engine with `lanes`, each with its initial budget.
    pub fn new(lanes: &[(Lane, u32)]) -> Self {
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
            failures: AtomicU64::default(),
            last_failure: Mutex::new(None),
            engine_up: AtomicBool::new(true),
        }
    }

    /// Stores `engine`'s gauges: running and waiting requests, KV usage, preemptions, each lane's
    /// budget, and the iterations of its timeline since the last call.
    pub fn publish<B: Backend>(&self, engine: &mut Engine<B>) {
        self.publish_counts(engine);
        for iteration in engine.take_timeline() {
            if let Some(lane) = self.lanes.iter().find(|l| l.lane == iteration.lane) {
                lane.iteration.observe((iteration.end - iteration.start).as_secs_f64());
                lane.host.observe(iteration.host.as_secs_f64());
            }
        }
    }

    /// Stores `engine`'s counts: running and waiting requests, KV usage, preemptions, each lane's
    /// budget.
    pub fn publish_counts<B: Backend>(&self, engine: &Engine<B>) {
        self.running.store(engine.num_running() as u64, Ordering::Relaxed);
        self.waiting.store(engine.num_waiting() as u64, Ordering::Relaxed);
        self.kv_usage.store((engine.kv_usage() * 1e6) as u64, Ordering::Relaxed);
        self.preemptions.store(engine.preemptions(), Ordering::Relaxed);
        for (lane, budget) in engine.lane_budgets() {
            if let Some(l) = self.lanes.iter().find(|l| l.lane == lane) {
                l.budget.store(budget.into(), Ordering::Relaxed);
            }
        }
    }

    /// Counts a request that failed on the server's side, and says why on stderr (the client
    /// gets the same message).
    pub fn record_failure(&self, message: &str) {
        eprintln!("nexus serve: a request failed: {message}");
        self.failures.fetch_add(1, Ordering::Relaxed);
        *self.last_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), message.to_owned()));
    }

    /// Marks the engine thread as ended.
    pub fn engine_down(&self) {
        self.engine_up.store(false, Ordering::Relaxed);
    }

    /// What `/health` says now.
    pub fn health(&self) -> Health {
        if !self.engine_up.load(Ordering::Relaxed) {
            return Health::Down;
        }
        let failures = self.failures.load(Ordering::Relaxed);
        match &*self.last_failure.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((when, message)) if when.elapsed() < DEGRADED_FOR => {
                Health::Degraded { failures, last_error: message.clone(), ago: when.elapsed() }
            }
            _ => Health::Ok { failures },
        }
    }

    /// Everything, in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.ttft.render("nexus_time_to_first_token_seconds", "HTTP arrival to first token.", &mut out);
        self.tbt.render("nexus_time_between_tokens_seconds", "Gap between consecutive tokens of a request.", &mut out);
        self.e2e.render(
            "nexus_e2e_request_latency_seconds",
            "HTTP arrival to the end of a request's output.",
            &mut out,
        );
        let gauges = [
            ("nexus_requests_running", "Requests holding KV blocks.", self.running.load(Ordering::Relaxed) as f64),
            ("nexus_requests_waiting", "Requests waiting for admission.", self.waiting.load(Ordering::Relaxed) as f64),
            (
                "nexus_kv_cache_usage",
                "Fraction of KV blocks in use.",
                self.kv_usage.load(Ordering::Relaxed) as f64 / 1e6,
            ),
        ];
        for (name, help, value) in gauges {
            render_family(name, help, "gauge", &mut out);
            let _ = writeln!(out, "{name} {value}");
        }
        let budget = "nexus_lane_budget_sms";
        render_family(budget, "SMs of each lane's iteration in flight, or of its latest one.", "gauge", &mut out);
        for l in &self.lanes {
            let _ = writeln!(out, "{budget}{{lane=\"{}\"}} {}", l.lane.name(), l.budget.load(Ordering::Relaxed));
        }
        render_lane_histograms(
            &mut out,
            "nexus_iteration_seconds",
            "Each lane's iterations, from launch to seen done.",
            &self.lanes,
            |l| &l.iteration,
        );
        render_lane_histograms(
            &mut out,
            "nexus_iteration_host_seconds",
            "CPU time of the engine thread per iteration of each lane (planning, building, launching, reading \
             back, sampling).",
            &self.lanes,
            |l| &l.host,
        );
        let counters = [
            ("nexus_requests_total", "Requests accepted.", &self.requests),
            ("nexus_prompt_tokens_total", "Prompt tokens of the requests accepted.", &self.prompt_tokens),
            ("nexus_generation_tokens_total", "Tokens generated.", &self.generation_tokens),
            (
                "nexus_preemptions_total",
                "Sequences preempted (recomputed later) for lack of KV blocks.",
                &self.preemptions,
            ),
            (
                "nexus_request_failures_total",
                "Requests that failed on the server's side (answered with a 500 or an error event).",
                &self.failures,
            ),
        ];
        for (name, help, value) in counters {
            render_family(name, help, "counter", &mut out);
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
        out
    }
}

/// A Prometheus histogram in seconds.
pub struct Histogram {
    buckets: &'static [f64],
    /// Per-bucket counts, the number of observations and their sum.
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

    pub fn observe(&self, seconds: f64) {
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
