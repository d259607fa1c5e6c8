//! Replaying a serving trace through the engine in-process, and the latency metrics of the paper:
//! TTFT (sending to the first token), TBT (gap between consecutive tokens of a request, vLLM's
//! ITL), normalized latency (end-to-end latency / output tokens), and request and token
//! throughput; and those of vLLM's `bench serve` ([`metrics`]): TPOT, E2EL, percentiles of
//! choice, request goodput, input and total token throughput.
//!
//! Outputs are forced to the trace's lengths (end-of-sequence ignored), so that runs of different
//! schedulers compare. [`ReplayReport::new`] turns the outcomes of a run's requests into its
//! report, the same way whether the requests ran in-process ([`replay_requests`]) or against a
//! server over HTTP (`nexus bench --url`): failed requests are counted and listed, and the
//! latencies summarize the requests that completed. A request's times count from when it was
//! sent: its arrival, or, when a cap on the requests in flight held it back (vLLM's
//! `--max-concurrency`), when a slot freed.
//!
//! An in-process replay also keeps the engine's timeline: every iteration of every lane, with
//! its budget, its tokens and the engine's CPU time on it, in seconds from the run's first
//! arrival ([`TimelineIteration`]), so that a report shows when the prefill and decode lanes ran
//! at once, on how many SMs, and what the host cost ([`TimelineSummary`]).

pub mod metrics;
pub mod workload;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::bench::metrics::{Goodput, Metric};
use crate::bench::workload::{BenchRequest, Request, Summary, synthetic_requests};
use crate::engine::cost_model::relative_errors;
use crate::engine::scheduler::Lane;
use crate::engine::{Engine, EngineEvent, Iteration, RequestOptions};
use crate::model::backend::{Backend, StepKind};
use crate::text::tokenizer::Tokenizer;
use crate::{Error, Result};

/// The measured times of one completed request: when it was sent, then, in seconds from sending,
/// its tokens and its end.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestTimes {
    /// When it was sent, in seconds from the run's first arrival.
    pub sent_s: f64,
    /// When each output token was produced (over HTTP: when the chunk carrying it arrived).
    pub tokens: Vec<f64>,
    /// When the response ended.
    pub end_s: f64,
    /// Output tokens as the engine or server counted them (`usage.completion_tokens` over HTTP).
    pub output_tokens: usize,
    /// Prompt tokens as the engine or server counted them (`usage.prompt_tokens` over HTTP; `None`
    /// when the server does not say).
    pub prompt_tokens: Option<usize>,
}

impl RequestTimes {
    /// vLLM's TPOT: `(end − first token) / (output tokens − 1)`; `None` for fewer than two output
    /// tokens.
    pub fn tpot(&self) -> Option<f64> {
        let ttft = self.tokens.first().filter(|_| self.output_tokens > 1)?;
        Some((self.end_s - ttft) / (self.output_tokens - 1) as f64)
    }

    /// Every gap between consecutive tokens (vLLM's ITL, our TBT).
    pub fn itls(&self) -> impl Iterator<Item = f64> + '_ {
        self.tokens.windows(2).map(|w| w[1] - w[0])
    }
}

/// What became of one request of a replay.
pub type RequestOutcome = std::result::Result<RequestTimes, String>;

/// One request of a replay: what it asked for and what became of it.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestResult {
    /// The prompt's tokens as the client knows them: every prompt in-process, token-id prompts
    /// over HTTP.
    pub prompt_len: Option<usize>,
    /// The output length it asked for.
    pub requested_len: usize,
    pub outcome: RequestOutcome,
}

impl RequestResult {
    /// Its times, when it completed: a response that carried a token.
    pub fn completed(&self) -> Option<&RequestTimes> {
        self.outcome.as_ref().ok().filter(|t| !t.tokens.is_empty() && t.output_tokens > 0)
    }

    /// Its prompt tokens: as the client knows them, else as the server counted them.
    pub fn input_len(&self) -> Option<usize> {
        self.prompt_len.or_else(|| self.completed()?.prompt_tokens)
    }

    /// Its output tokens: as counted when it completed, else 0 (vLLM's `output_lens`).
    pub fn output_len(&self) -> usize {
        self.completed().map_or(0, |t| t.output_tokens)
    }

    /// Why it did not complete; `None` when it did.
    pub fn error(&self) -> Option<&str> {
        match &self.outcome {
            Err(message) => Some(message),
            Ok(_) if self.completed().is_none() => Some("the response carried no token"),
            Ok(_) => None,
        }
    }
}

/// A request that failed, by its index in the trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestFailure {
    /// Index in the trace.
    pub request: usize,
    /// Why it failed.
    pub message: String,
}

/// A completed request whose output length differs from the one it asked for (a server that
/// ignores `ignore_eos` or `min_tokens`, say): its latencies still count, flagged by this.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LengthMismatch {
    /// Index in the trace.
    pub request: usize,
    /// The forced output length.
    pub requested: usize,
    /// The output tokens the response reported.
    pub got: usize,
}

/// The metrics of one replay. Latencies summarize the completed requests only; when none
/// completed (or none has two tokens, for TBT) their summary has count 0 and NaN figures.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplayReport {
    pub ttft: Summary,
    pub tbt: Summary,
    pub normalized_latency: Summary,
    /// Completed requests per second of the whole run.
    pub request_throughput: f64,
    /// Output tokens of completed requests per second of the whole run.
    pub token_throughput: f64,
    /// First arrival to the end of the last response.
    pub duration_s: f64,
    /// Sequences preempted during the run (known in-process only).
    pub preemptions: Option<u64>,
    /// Requests that completed.
    pub completed: usize,
    /// Requests that failed, in trace order.
    pub failures: Vec<RequestFailure>,
    /// Completed requests whose output length was not the requested one, in trace order.
    pub length_mismatches: Vec<LengthMismatch>,
    /// The engine's iterations during the run, in the order they completed (known in-process
    /// only).
    pub timeline: Option<Vec<TimelineIteration>>,
    /// Every request, in trace order.
    pub requests: Vec<RequestResult>,
}

/// One iteration of one lane during a replay, its times in seconds from the run's first arrival.
#[derive(Clone, Debug, PartialEq)]
pub struct TimelineIteration {
    pub lane: Lane,
    pub kind: StepKind,
    /// Its CTA budget, in SMs.
    pub budget: u32,
    /// Sequences it advanced, and their new tokens.
    pub seqs: usize,
    pub tokens: usize,
    /// When the engine launched it, and when the engine saw it done.
    pub start_s: f64,
    pub end_s: f64,
    /// CPU time the engine thread spent on it (planning, building, launching, reading back,
    /// sampling).
    pub host_s: f64,
    /// The scheduler's cost model's prediction of its duration, if it had one.
    pub predicted_s: Option<f64>,
}

impl TimelineIteration {
    /// `iteration`, whose times count from the engine's epoch, with times counted from
    /// `origin_s` seconds after that epoch.
    fn new(iteration: &Iteration, origin_s: f64) -> Self {
        TimelineIteration {
            lane: iteration.lane,
            kind: iteration.kind,
            budget: iteration.budget,
            seqs: iteration.seqs,
            tokens: iteration.tokens,
            start_s: iteration.start.as_secs_f64() - origin_s,
            end_s: iteration.end.as_secs_f64() - origin_s,
            host_s: iteration.host.as_secs_f64(),
            predicted_s: iteration.predicted.map(|p| p.as_secs_f64()),
        }
    }

    /// Launch to seen done, in seconds.
    pub fn duration_s(&self) -> f64 {
        self.end_s - self.start_s
    }
}

/// One lane's iterations during a run.
#[derive(Clone, Debug, PartialEq)]
pub struct LaneSummary {
    pub lane: Lane,
    pub iterations: usize,
    /// Iteration times (launch to seen done), in seconds.
    pub time: Summary,
    /// Mean CPU time of the engine thread per iteration, in seconds.
    pub host_mean_s: f64,
    /// The lane's CPU time over its iteration time, both summed over its iterations.
    pub host_fraction: f64,
    /// Mean budget of its iterations, in SMs.
    pub mean_budget: f64,
    /// Median and 90th percentile of the relative error of the predicted durations, over the
    /// iterations that had one (`None` if none had).
    pub prediction_error: Option<(f64, f64)>,
}

/// What a run's timeline says: per lane, and how long the lanes ran at once.
#[derive(Clone, Debug, PartialEq)]
pub struct TimelineSummary {
    /// The lanes that ran, in [`Lane`] order.
    pub lanes: Vec<LaneSummary>,
    /// Seconds during which at least one lane had an iteration in flight.
    pub busy_s: f64,
    /// Seconds during which two lanes had iterations in flight at once.
    pub overlap_s: f64,
}

impl TimelineSummary {
    /// Summarizes `timeline` (in any order); fails when a time is not finite.
    pub fn of(timeline: &[TimelineIteration]) -> Result<TimelineSummary> {
        let mut lane_ids: Vec<Lane> = timeline.iter().map(|it| it.lane).collect();
        lane_ids.sort();
        lane_ids.dedup();
        let mut lanes = Vec::with_capacity(lane_ids.len());
        for &lane in &lane_ids {
            let its: Vec<&TimelineIteration> = timeline.iter().filter(|it| it.lane == lane).collect();
            let n = its.len() as f64;
            let times: Vec<f64> = its.iter().map(|it| it.duration_s()).collect();
            let host: f64 = its.iter().map(|it| it.host_s).sum();
            lanes.push(LaneSummary {
                lane,
                iterations: its.len(),
                time: Summary::of(&times)?,
                host_mean_s: host / n,
                host_fraction: host / times.iter().sum::<f64>(),
                mean_budget: its.iter().map(|it| f64::from(it.budget)).sum::<f64>() / n,
                prediction_error: relative_errors(its.iter().filter_map(|it| Some((it.predicted_s?, it.duration_s())))),
            });
        }
        // A sweep over the launches and completions, completions first at equal times, counting
        // the lanes with an iteration in flight.
        let mut events: Vec<(f64, bool, usize)> = Vec::with_capacity(2 * timeline.len());
        for it in timeline {
            let lane = lane_ids.iter().position(|&l| l == it.lane).unwrap_or_default();
            events.push((it.start_s, true, lane));
            events.push((it.end_s, false, lane));
        }
        events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut in_flight = vec![0usize; lane_ids.len()];
        let (mut busy_s, mut overlap_s, mut last) = (0.0, 0.0, f64::NAN);
        for (t, starts, lane) in events {
            let active = in_flight.iter().filter(|&&n| n > 0).count();
            if active >= 1 {
                busy_s += t - last;
            }
            if active >= 2 {
                overlap_s += t - last;
            }
            if starts {
                in_flight[lane] += 1;
            } else {
                in_flight[lane] = in_flight[lane].saturating_sub(1);
            }
            last = t;
        }
        Ok(TimelineSummary { lanes, busy_s, overlap_s })
    }

    /// The share of the busy time during which two lanes ran at once (0 with one lane; NaN for
    /// an empty timeline).
    pub fn overlap_fraction(&self) -> f64 {
        self.overlap_s / self.busy_s
    }
}

/// A summary of `values`; count 0 and NaN figures when there are none.
fn summary_or_empty(values: &[f64]) -> Result<Summary> {
    if values.is_empty() {
        Ok(Summary { count: 0, mean: f64::NAN, p50: f64::NAN, p95: f64::NAN, p99: f64::NAN })
    } else {
        Summary::of(values)
    }
}

impl ReplayReport {
    /// The report of a run of `requests` (in trace order) over `duration_s` seconds. Fails when a
    /// time is not finite.
    pub fn new(requests: Vec<RequestResult>, duration_s: f64, preemptions: Option<u64>) -> Result<ReplayReport> {
        let mut failures = Vec::new();
        let mut length_mismatches = Vec::new();
        let (mut ttft, mut tbt, mut normalized) = (Vec::new(), Vec::new(), Vec::new());
        let mut output_tokens = 0;
        for (request, r) in requests.iter().enumerate() {
            let Some(times) = r.completed() else {
                let message = r.error().unwrap_or_default().to_owned();
                failures.push(RequestFailure { request, message });
                continue;
            };
            if times.output_tokens != r.requested_len {
                length_mismatches.push(LengthMismatch {
                    request,
                    requested: r.requested_len,
                    got: times.output_tokens,
                });
            }
            ttft.push(times.tokens[0]);
            tbt.extend(times.itls());
            normalized.push(times.end_s / times.output_tokens as f64);
            output_tokens += times.output_tokens;
        }
        let completed = ttft.len();
        Ok(ReplayReport {
            ttft: summary_or_empty(&ttft)?,
            tbt: summary_or_empty(&tbt)?,
            normalized_latency: summary_or_empty(&normalized)?,
            request_throughput: completed as f64 / duration_s,
            token_throughput: output_tokens as f64 / duration_s,
            duration_s,
            preemptions,
            completed,
            failures,
            length_mismatches,
            timeline: None,
            requests,
        })
    }

    /// The times of the completed requests, in trace order.
    pub fn completed_times(&self) -> impl Iterator<Item = &RequestTimes> {
        self.requests.iter().filter_map(RequestResult::completed)
    }

    /// Every value of `metric` over the completed requests, in trace order.
    pub fn samples(&self, metric: Metric) -> Vec<f64> {
        self.completed_times().flat_map(|t| metric.values(t)).collect()
    }

    /// The prompt tokens of the completed requests (those whose count is known).
    pub fn total_input_tokens(&self) -> usize {
        self.requests.iter().filter(|r| r.completed().is_some()).filter_map(RequestResult::input_len).sum()
    }

    /// The TTFT of the completed requests whose prompt has at most `max_prompt` tokens, and of
    /// those with a longer one (requests of unknown prompt length are left out): with a workload
    /// mixing short and long prompts (`mixed`), the mean TTFT is mostly the long prompts' service
    /// time, the median the short prompts' wait. Fails when a time is not finite.
    pub fn ttft_by_prompt(&self, max_prompt: usize) -> Result<(Summary, Summary)> {
        let (mut short, mut long) = (Vec::new(), Vec::new());
        for r in &self.requests {
            let (Some(times), Some(prompt)) = (r.completed(), r.input_len()) else { continue };
            let ttft = times.tokens[0];
            if prompt <= max_prompt { short.push(ttft) } else { long.push(ttft) }
        }
        Ok((summary_or_empty(&short)?, summary_or_empty(&long)?))
    }

    /// The output tokens of the completed requests.
    pub fn total_output_tokens(&self) -> usize {
        self.requests.iter().map(RequestResult::output_len).sum()
    }

    /// Prompt tokens of completed requests per second of the run.
    pub fn input_throughput(&self) -> f64 {
        self.total_input_tokens() as f64 / self.duration_s
    }

    /// Prompt and output tokens of completed requests per second of the run (vLLM's
    /// `total_token_throughput`).
    pub fn total_token_throughput(&self) -> f64 {
        (self.total_input_tokens() + self.total_output_tokens()) as f64 / self.duration_s
    }

    /// vLLM's request goodput: the completed requests that met every objective of `goodput`, per
    /// second of the run.
    pub fn request_goodput(&self, goodput: &Goodput) -> f64 {
        self.completed_times().filter(|t| goodput.met_by(t)).count() as f64 / self.duration_s
    }

    /// The most completed requests in flight at once, from sending to the end of the response, at
    /// microsecond resolution: a request sent the microsecond another ended does not overlap it
    /// (a request held back by a cap is sent the instant a slot frees, and the sum of the times
    /// that place them may round either way of that instant).
    pub fn peak_concurrency(&self) -> usize {
        let micros = |s: f64| (s * 1e6).round() as i64;
        let mut events: Vec<(i64, i32)> =
            self.completed_times().flat_map(|t| [(micros(t.sent_s), 1), (micros(t.sent_s + t.end_s), -1)]).collect();
        events.sort();
        let mut in_flight = 0i32;
        events
            .iter()
            .map(|&(_, step)| {
                in_flight += step;
                in_flight
            })
            .max()
            .map_or(0, |peak| peak as usize)
    }

    /// The mean TTFT of the last quarter of the completed requests (in trace order) over that of
    /// the first quarter. Above the rate the engine sustains every request waits longer than the
    /// one before, which percentiles over a trace that ends before the queue is long do not show
    /// (a short trace at such a rate is a burst, served at the engine's pace whatever the offered
    /// rate). It also follows the prompts' lengths, so it tells a queue apart only against a run
    /// of the same trace at a lower rate (a seed gives the same lengths at every rate). `None`
    /// with fewer than 8 completed requests.
    pub fn ttft_growth(&self) -> Option<f64> {
        let ttft = self.samples(Metric::Ttft);
        let quarter = ttft.len() / 4;
        if quarter < 2 {
            return None;
        }
        let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
        let first = mean(&ttft[..quarter]);
        (first > 0.0).then(|| mean(&ttft[ttft.len() - quarter..]) / first)
    }
}

/// Replays `trace` with prompts of random token ids over the whole vocabulary (drawn under
/// `seed`); see [`replay_requests`].
pub fn replay<B: Backend>(
    engine: &mut Engine<B>,
    trace: &[Request],
    seed: u64,
) -> Result<(Vec<RequestTimes>, ReplayReport)> {
    let vocab = engine.model().config().vocab_size as u32;
    let requests = synthetic_requests(trace, 0..vocab, seed)?;
    replay_requests(engine, &requests, None, None, || {})
}

/// Replays `requests` through `engine` in real time: each request is sent (added to the engine)
/// once the device's clock ([`Backend::now`]: the wall clock, or a simulated device's virtual
/// one) passes its arrival and, with `max_concurrency`, fewer than that many
/// requests are in flight (the others wait in arrival order, as behind vLLM's semaphore); the
/// engine steps whenever it has work. `on_finished` is called as each request finishes (for a
/// progress bar). Text prompts are tokenized by `tokenizer` before the clock starts. Returns
/// every request's times (in trace order; a failed request's hold what it produced) and the
/// report, with the engine's timeline of the run (kept from the start, then turned off again).
/// Fails when the engine does, when a prompt cannot be tokenized, when a request is refused
/// (e.g. longer than the cache, or a token outside the vocabulary), or for a `max_concurrency`
/// of 0.
pub fn replay_requests<B: Backend>(
    engine: &mut Engine<B>,
    requests: &[BenchRequest],
    tokenizer: Option<&Tokenizer>,
    max_concurrency: Option<usize>,
    mut on_finished: impl FnMut(),
) -> Result<(Vec<RequestTimes>, ReplayReport)> {
    if requests.is_empty() {
        return Err(Error::invalid("the trace is empty"));
    }
    if max_concurrency == Some(0) {
        return Err(Error::invalid("a cap on the requests in flight must be at least 1"));
    }
    let mut prompts = Vec::with_capacity(requests.len());
    for (i, r) in requests.iter().enumerate() {
        let ids = r.prompt.token_ids(tokenizer).map_err(|e| Error::invalid(format!("request {i}: {e}")))?;
        prompts.push(ids);
    }
    let prompt_lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let preemptions_before = engine.preemptions();
    let mut tokens: Vec<Vec<f64>> = vec![Vec::new(); requests.len()];
    let mut failed: Vec<Option<String>> = vec![None; requests.len()];
    engine.keep_timeline(true);
    // The device's clock: the host's, or a simulated device's own (virtual time).
    let now = |engine: &Engine<B>| engine.backend().now();
    let start = now(engine);
    let arrival = |i: usize| start + Duration::from_secs_f64(requests[i].arrival_s);
    let mut sent = vec![start; requests.len()];
    // Under a cap, the free slots, each with the instant it freed, oldest first: a request takes
    // the oldest, and is sent at its arrival when that slot was free by then, else when the slot
    // freed (it waited for it).
    let mut free_slots: Option<VecDeque<Instant>> = max_concurrency.map(|n| std::iter::repeat_n(start, n).collect());
    let mut next = 0;
    let mut finished = 0;
    while finished < requests.len() {
        let at = now(engine);
        while next < requests.len() && arrival(next) <= at {
            sent[next] = match &mut free_slots {
                None => arrival(next),
                Some(slots) => match slots.pop_front() {
                    Some(freed) => arrival(next).max(freed),
                    None => break,
                },
            };
            let r = &requests[next];
            let options = RequestOptions { max_tokens: r.output_len, ignore_eos: true, ..RequestOptions::default() };
            engine
                .add_request(next as u64, std::mem::take(&mut prompts[next]), options)
                .map_err(|e| Error::invalid(format!("request {next} was refused: {e}")))?;
            next += 1;
        }
        if !engine.has_unfinished() {
            // Idle until the next arrival (nothing in flight, so a cap holds nothing back).
            if next < requests.len() {
                engine.backend().sleep_until(arrival(next));
            }
            continue;
        }
        let events = engine.step()?;
        let at = now(engine);
        for event in events {
            match event {
                EngineEvent::Token { id, .. } => {
                    let i = id as usize;
                    tokens[i].push(at.duration_since(sent[i]).as_secs_f64());
                    continue;
                }
                EngineEvent::Finished { .. } => {}
                EngineEvent::Failed { id, message } => failed[id as usize] = Some(message),
            }
            finished += 1;
            if let Some(slots) = &mut free_slots {
                slots.push_back(at);
            }
            on_finished();
        }
    }
    let duration_s = now(engine).duration_since(start).as_secs_f64() - requests[0].arrival_s;
    // The engine's times count from its epoch; the run's from its first arrival.
    let first_arrival = arrival(0);
    let origin_s = first_arrival.duration_since(engine.epoch()).as_secs_f64();
    let timeline = engine.take_timeline().iter().map(|it| TimelineIteration::new(it, origin_s)).collect();
    engine.keep_timeline(false);
    let times: Vec<RequestTimes> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, tokens)| RequestTimes {
            sent_s: sent[i].saturating_duration_since(first_arrival).as_secs_f64(),
            end_s: tokens.last().copied().unwrap_or(0.0),
            output_tokens: tokens.len(),
            tokens,
            prompt_tokens: Some(prompt_lens[i]),
        })
        .collect();
    let results = times
        .iter()
        .zip(failed)
        .enumerate()
        .map(|(i, (t, failure))| RequestResult {
            prompt_len: Some(prompt_lens[i]),
            requested_len: requests[i].output_len,
            outcome: failure.map_or_else(|| Ok(t.clone()), Err),
        })
        .collect();
    let preemptions = engine.preemptions() - preemptions_before;
    let mut report = ReplayReport::new(results, duration_s, Some(preemptions))?;
    report.timeline = Some(timeline);
    Ok((times, report))
}

/// A latency objective: the p95 TTFT and p95 TBT a run must stay within.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Slo {
    /// Seconds.
    pub ttft_p95: f64,
    /// Seconds.
    pub tbt_p95: f64,
}

impl Slo {
    /// Whether `run` met the objective: every request completed and both p95 latencies stay
    /// within it (a run with no TBT sample, single-token outputs only, is judged on TTFT).
    pub fn met_by(&self, run: &ReplayReport) -> bool {
        let within = |s: &Summary, limit: f64| s.count == 0 || s.p95 <= limit;
        run.failures.is_empty()
            && run.ttft.count > 0
            && within(&run.ttft, self.ttft_p95)
            && within(&run.tbt, self.tbt_p95)
    }

    /// The paper's throughput of a sweep: the highest arrival rate up to which every run met the
    /// objective (runs in any order; a rate that met it above one that did not does not count, as
    /// such a result is noise). `None` when the lowest rate already missed it.
    pub fn throughput(&self, runs: &[(f64, ReplayReport)]) -> Option<f64> {
        let mut sorted: Vec<&(f64, ReplayReport)> = runs.iter().collect();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        sorted.iter().take_while(|(_, run)| self.met_by(run)).last().map(|(rate, _)| *rate)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::bench::metrics::MetricStats;

    fn run(ttft_p95: f64, tbt_p95: f64, failed: usize) -> ReplayReport {
        let summary = |p95: f64| Summary { count: 10, mean: p95 / 2.0, p50: p95 / 2.0, p95, p99: p95 };
        ReplayReport {
            ttft: summary(ttft_p95),
            tbt: summary(tbt_p95),
            normalized_latency: summary(tbt_p95),
            request_throughput: 1.0,
            token_throughput: 100.0,
            duration_s: 10.0,
            preemptions: None,
            completed: 10 - failed,
            failures: (0..failed).map(|request| RequestFailure { request, message: "timeout".into() }).collect(),
            length_mismatches: Vec::new(),
            timeline: None,
            requests: Vec::new(),
        }
    }

    #[test]
    fn slo_throughput_is_the_highest_rate_below_the_first_miss() {
        let slo = Slo { ttft_p95: 0.5, tbt_p95: 0.05 };
        let runs = vec![
            (4.0, run(0.45, 0.049, 0)),
            (1.0, run(0.1, 0.01, 0)),
            (2.0, run(0.2, 0.02, 0)),
            (8.0, run(0.6, 0.04, 0)),  // TTFT misses
            (16.0, run(0.3, 0.03, 0)), // meets again: noise, not counted
        ];
        assert_eq!(slo.throughput(&runs), Some(4.0));
        // TBT, failures and a first miss at the lowest rate.
        assert!(!slo.met_by(&run(0.1, 0.06, 0)));
        assert!(!slo.met_by(&run(0.1, 0.01, 1)));
        assert_eq!(slo.throughput(&[(1.0, run(0.9, 0.01, 0)), (2.0, run(0.1, 0.01, 0))]), None);
        assert_eq!(slo.throughput(&[]), None);
    }

    /// A completed request sent at `sent_s` with its `tokens`, ending at `end_s`.
    fn done(sent_s: f64, tokens: &[f64], end_s: f64, prompt_tokens: Option<usize>) -> RequestOutcome {
        Ok(RequestTimes { sent_s, tokens: tokens.to_vec(), end_s, output_tokens: tokens.len(), prompt_tokens })
    }

    #[test]
    fn ttft_growth_compares_the_last_quarter_of_the_trace_with_the_first() {
        let report = |ttfts: &[f64]| {
            let requests = ttfts
                .iter()
                .enumerate()
                .map(|(i, &t)| RequestResult {
                    prompt_len: Some(8),
                    requested_len: 1,
                    outcome: done(i as f64 * 0.1, &[t], t, None),
                })
                .collect();
            ReplayReport::new(requests, 10.0, None).unwrap()
        };
        // A steady queue: TTFTs that vary without a trend.
        let steady = report(&[0.2, 0.3, 0.1, 0.2, 0.3, 0.2, 0.1, 0.2, 0.3, 0.3, 0.2, 0.1]);
        assert!((steady.ttft_growth().unwrap() - 1.0).abs() < 1e-9);
        // A growing one: each request waits 0.1 s longer than the one before; the first three
        // waited 0.15 s on average, the last three 1.05 s.
        let ttfts: Vec<f64> = (0..12).map(|i| 0.05 + 0.1 * i as f64).collect();
        assert!((report(&ttfts).ttft_growth().unwrap() - 7.0).abs() < 1e-9);
        // Too few requests to tell.
        assert_eq!(report(&[0.1; 7]).ttft_growth(), None);
    }

    #[test]
    fn vllms_metrics_of_a_hand_made_trace() {
        let result = |prompt_len, requested_len, outcome| RequestResult { prompt_len, requested_len, outcome };
        let report = ReplayReport::new(
            vec![
                // TTFT 0.1, ITLs 0.2 and 0.3, TPOT (0.7 - 0.1) / 2 = 0.3, E2EL 0.7.
                result(Some(10), 3, done(0.0, &[0.1, 0.3, 0.6], 0.7, Some(10))),
                // One token: no ITL, no TPOT; a text prompt whose length the server reported.
                result(None, 1, done(0.5, &[0.2], 0.25, Some(7))),
                result(Some(5), 2, Err("HTTP 500".into())),
                // TTFT 0.4, ITLs 0.1 three times, TPOT (0.8 - 0.4) / 3, E2EL 0.8; one token short.
                result(Some(20), 5, done(0.6, &[0.4, 0.5, 0.6, 0.7], 0.8, None)),
                // A response without a token is a failure.
                result(Some(3), 2, done(1.0, &[], 0.1, None)),
            ],
            2.0,
            None,
        )
        .unwrap();
        assert_eq!(report.completed, 3);
        assert_eq!(
            report.failures.iter().map(|f| (f.request, f.message.as_str())).collect::<Vec<_>>(),
            [(2, "HTTP 500"), (4, "the response carried no token")]
        );
        assert_eq!(report.length_mismatches, [LengthMismatch { request: 3, requested: 5, got: 4 }]);
        let close = |a: &[f64], b: &[f64]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12);
        assert!(close(&report.samples(Metric::Ttft), &[0.1, 0.2, 0.4]));
        assert!(close(&report.samples(Metric::Tpot), &[0.3, 0.4 / 3.0]));
        assert!(close(&report.samples(Metric::Itl), &[0.2, 0.3, 0.1, 0.1, 0.1]));
        assert!(close(&report.samples(Metric::E2el), &[0.7, 0.25, 0.8]));
        // Our TBT is the same sample as ITL.
        assert_eq!(report.tbt.count, 5);
        assert!((report.tbt.mean - 0.16).abs() < 1e-12 && (report.tbt.p50 - 0.1).abs() < 1e-12);
        // Percentiles interpolate: the p99 TTFT of [0.1, 0.2, 0.4] is at rank 1.98.
        let ttft = MetricStats::of(&report.samples(Metric::Ttft), &[50.0, 99.0]);
        assert!((ttft.percentiles[1].1 - 0.396).abs() < 1e-12 && (ttft.median - 0.2).abs() < 1e-12);
        // Tokens: prompts of the completed requests 10 + 7 + 20, outputs 3 + 1 + 4, over 2 s.
        assert_eq!((report.total_input_tokens(), report.total_output_tokens()), (37, 8));
        assert_eq!((report.request_throughput, report.token_throughput), (1.5, 4.0));
        assert_eq!((report.input_throughput(), report.total_token_throughput()), (18.5, 22.5));
        assert_eq!(
            report.requests.iter().map(RequestResult::input_len).collect::<Vec<_>>(),
            [Some(10), Some(7), Some(5), Some(20), Some(3)]
        );
        assert_eq!(report.requests.iter().map(RequestResult::output_len).collect::<Vec<_>>(), [3, 1, 0, 4, 0]);
        // Goodput: TTFT <= 0.3 s holds for the first two; adding TPOT <= 0.2 s drops the first
        // (0.3) but keeps the single token (TPOT 0); E2EL <= 0.75 s alone drops the last.
        let goodput = |objectives: &[(Metric, f64)]| {
            let mut g = Goodput::default();
            for &(m, v) in objectives {
                g.set(m, v).unwrap();
            }
            report.request_goodput(&g)
        };
        assert_eq!(goodput(&[(Metric::Ttft, 0.3)]), 1.0);
        assert_eq!(goodput(&[(Metric::Ttft, 0.3), (Metric::Tpot, 0.2)]), 0.5);
        assert_eq!(goodput(&[(Metric::E2el, 0.75)]), 1.0);
        assert_eq!(goodput(&[]), 1.5);
        // In flight: 0..0.7, 0.5..0.75 and 0.6..1.4 overlap at 0.6.
        assert_eq!(report.peak_concurrency(), 3);
        // TTFT by prompt length: prompts of 10 and 7 tokens (TTFT 0.1, 0.2), then 20 (0.4); the
        // failed ones are left out.
        let (short, long) = report.ttft_by_prompt(10).unwrap();
        assert_eq!((short.count, long.count), (2, 1));
        assert!((short.mean - 0.15).abs() < 1e-12 && (long.mean - 0.4).abs() < 1e-12);
        let (short, long) = report.ttft_by_prompt(100).unwrap();
        assert_eq!((short.count, long.count), (3, 0));
        assert!(long.mean.is_nan());
    }

    #[test]
    fn requests_sent_as_others_end_do_not_overlap() {
        let result = |outcome| RequestResult { prompt_len: Some(1), requested_len: 1, outcome };
        let report = ReplayReport::new(
            vec![result(done(0.0, &[0.5], 1.0, None)), result(done(1.0, &[0.5], 1.0, None))],
            2.0,
            None,
        )
        .unwrap();
        assert_eq!(report.peak_concurrency(), 1);
        assert_eq!(ReplayReport::new(Vec::new(), 1.0, None).unwrap().peak_concurrency(), 0);
    }

    fn it(lane: Lane, budget: u32, start_s: f64, end_s: f64, host_s: f64) -> TimelineIteration {
        let kind = if lane == Lane::Decode { StepKind::Decode } else { StepKind::Prefill };
        TimelineIteration { lane, kind, budget, seqs: 1, tokens: 1, start_s, end_s, host_s, predicted_s: None }
    }

    #[test]
    fn a_timeline_summarizes_each_lane_and_their_overlap() {
        // Decode runs 0..1 and 1..3 alone then beside prefill (2..4), then idles until 5..6.
        let timeline = [
            it(Lane::Decode, 132, 0.0, 1.0, 0.1),
            it(Lane::Decode, 68, 1.0, 3.0, 0.1),
            it(Lane::Prefill, 64, 2.0, 4.0, 0.5),
            it(Lane::Decode, 132, 5.0, 6.0, 0.1),
        ];
        let s = TimelineSummary::of(&timeline).unwrap();
        assert_eq!(
            s.lanes.iter().map(|l| (l.lane, l.iterations)).collect::<Vec<_>>(),
            [(Lane::Prefill, 1), (Lane::Decode, 3)]
        );
        let decode = &s.lanes[1];
        assert_eq!((decode.time.count, decode.time.p50, decode.time.mean), (3, 1.0, 4.0 / 3.0));
        assert!((decode.host_mean_s - 0.1).abs() < 1e-12 && (decode.host_fraction - 0.3 / 4.0).abs() < 1e-12);
        assert!((decode.mean_budget - 332.0 / 3.0).abs() < 1e-12);
        assert_eq!((s.busy_s, s.overlap_s), (5.0, 1.0));
        assert!((s.overlap_fraction() - 0.2).abs() < 1e-12);
        // One lane never overlaps; nothing at all is an empty summary.
        let one = TimelineSummary::of(&timeline[..2]).unwrap();
        assert_eq!((one.busy_s, one.overlap_s, one.overlap_fraction()), (3.0, 0.0, 0.0));
        let none = TimelineSummary::of(&[]).unwrap();
        assert!(none.lanes.is_empty() && none.overlap_fraction().is_nan());
    }
}
