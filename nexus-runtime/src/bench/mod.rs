//! Replaying a serving trace through the engine in-process, and the latency metrics of the paper:
//! TTFT (arrival to first token), TBT (gap between consecutive tokens of a request), normalized
//! latency (end-to-end latency / output tokens), and request and token throughput.
//!
//! Outputs are forced to the trace's lengths (end-of-sequence ignored), so that runs of different
//! schedulers compare. [`ReplayReport::new`] turns the outcomes of a run's requests into its
//! report, the same way whether the requests ran in-process ([`replay_requests`]) or against a
//! server over HTTP (`nexus bench --url`): failed requests are counted and listed, and the
//! latencies summarize the requests that completed.
//!
//! An in-process replay also keeps the engine's timeline: every iteration of every lane, with
//! its budget, its tokens and the engine's CPU time on it, in seconds from the run's first
//! arrival ([`TimelineIteration`]), so that a report shows when the prefill and decode lanes ran
//! at once, on how many SMs, and what the host cost ([`TimelineSummary`]).

pub mod workload;

use std::time::{Duration, Instant};

use crate::bench::workload::{BenchRequest, Request, Summary, synthetic_requests};
use crate::engine::scheduler::Lane;
use crate::engine::{Engine, EngineEvent, Iteration, RequestOptions};
use crate::model::backend::{Backend, StepKind};
use crate::text::tokenizer::Tokenizer;
use crate::{Error, Result};

/// The measured times of one completed request, in seconds from its arrival (or, over HTTP, from
/// when it was sent).
#[derive(Clone, Debug, PartialEq)]
pub struct RequestTimes {
    /// When each output token was produced (over HTTP: when the chunk carrying it arrived).
    pub tokens: Vec<f64>,
    /// When the response ended.
    pub end_s: f64,
    /// Output tokens as the engine or server counted them (`usage.completion_tokens` over HTTP).
    pub output_tokens: usize,
}

/// What became of one request of a replay.
pub type RequestOutcome = std::result::Result<RequestTimes, String>;

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
    /// The report of a run whose requests asked for `requested` output lengths and ended as
    /// `outcomes` (the same order), over `duration_s` seconds. A completed request without any
    /// token time counts as failed. Fails when the lengths differ or a time is not finite.
    pub fn new(
        requested: &[usize],
        outcomes: &[RequestOutcome],
        duration_s: f64,
        preemptions: Option<u64>,
    ) -> Result<ReplayReport> {
        if requested.len() != outcomes.len() {
            return Err(Error::invalid(format!("{} requests but {} outcomes", requested.len(), outcomes.len())));
        }
        let mut failures = Vec::new();
        let mut length_mismatches = Vec::new();
        let (mut ttft, mut tbt, mut normalized) = (Vec::new(), Vec::new(), Vec::new());
        let mut output_tokens = 0;
        for (request, (outcome, &want)) in outcomes.iter().zip(requested).enumerate() {
            let times = match outcome {
                Ok(t) if !t.tokens.is_empty() && t.output_tokens > 0 => t,
                Ok(_) => {
                    failures.push(RequestFailure { request, message: "the response carried no token".into() });
                    continue;
                }
                Err(message) => {
                    failures.push(RequestFailure { request, message: message.clone() });
                    continue;
                }
            };
            if times.output_tokens != want {
                length_mismatches.push(LengthMismatch { request, requested: want, got: times.output_tokens });
            }
            ttft.push(times.tokens[0]);
            tbt.extend(times.tokens.windows(2).map(|w| w[1] - w[0]));
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
        })
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
    replay_requests(engine, &requests, None, || {})
}

/// Replays `requests` through `engine` in real time: each request is added once the wall clock
/// passes its arrival, and the engine steps whenever it has work; `on_finished` is called as each
/// request finishes (for a progress bar). Text prompts are tokenized by `tokenizer` before the
/// clock starts. Returns every request's token times (in trace order) and the report, with the
/// engine's timeline of the run (kept from the start, then turned off again). Fails when
/// the engine does, when a prompt cannot be tokenized, or when a request is refused (e.g. longer
/// than the cache, or a token outside the vocabulary).
pub fn replay_requests<B: Backend>(
    engine: &mut Engine<B>,
    requests: &[BenchRequest],
    tokenizer: Option<&Tokenizer>,
    mut on_finished: impl FnMut(),
) -> Result<(Vec<RequestTimes>, ReplayReport)> {
    if requests.is_empty() {
        return Err(Error::invalid("the trace is empty"));
    }
    let mut prompts = Vec::with_capacity(requests.len());
    for (i, r) in requests.iter().enumerate() {
        let ids = r.prompt.token_ids(tokenizer).map_err(|e| Error::invalid(format!("request {i}: {e}")))?;
        prompts.push(ids);
    }
    let preemptions_before = engine.preemptions();
    let mut tokens: Vec<Vec<f64>> = vec![Vec::new(); requests.len()];
    let mut failed: Vec<Option<String>> = vec![None; requests.len()];
    engine.keep_timeline(true);
    let start = Instant::now();
    let arrival = |i: usize| start + Duration::from_secs_f64(requests[i].arrival_s);
    let mut next = 0;
    let mut finished = 0;
    while finished < requests.len() {
        let now = Instant::now();
        while next < requests.len() && arrival(next) <= now {
            let r = &requests[next];
            let options = RequestOptions { max_tokens: r.output_len, ignore_eos: true, ..RequestOptions::default() };
            engine
                .add_request(next as u64, std::mem::take(&mut prompts[next]), options)
                .map_err(|e| Error::invalid(format!("request {next} was refused: {e}")))?;
            next += 1;
        }
        if !engine.has_unfinished() {
            // Idle until the next arrival.
            if next < requests.len() {
                std::thread::sleep(arrival(next).saturating_duration_since(Instant::now()));
            }
            continue;
        }
        let events = engine.step()?;
        let now = Instant::now();
        for event in events {
            match event {
                EngineEvent::Token { id, .. } => {
                    let i = id as usize;
                    tokens[i].push(now.duration_since(arrival(i)).as_secs_f64());
                }
                EngineEvent::Finished { .. } => {
                    finished += 1;
                    on_finished();
                }
                EngineEvent::Failed { id, message } => {
                    failed[id as usize] = Some(message);
                    finished += 1;
                    on_finished();
                }
            }
        }
    }
    let duration_s = start.elapsed().as_secs_f64() - requests[0].arrival_s;
    // The engine's times count from its epoch; the run's from its first arrival.
    let origin_s = start.duration_since(engine.epoch()).as_secs_f64() + requests[0].arrival_s;
    let timeline = engine.take_timeline().iter().map(|it| TimelineIteration::new(it, origin_s)).collect();
    engine.keep_timeline(false);
    let times: Vec<RequestTimes> = tokens
        .into_iter()
        .map(|tokens| RequestTimes {
            end_s: tokens.last().copied().unwrap_or(0.0),
            output_tokens: tokens.len(),
            tokens,
        })
        .collect();
    let outcomes: Vec<RequestOutcome> =
        times.iter().zip(failed).map(|(t, failure)| failure.map_or_else(|| Ok(t.clone()), Err)).collect();
    let requested: Vec<usize> = requests.iter().map(|r| r.output_len).collect();
    let preemptions = engine.preemptions() - preemptions_before;
    let mut report = ReplayReport::new(&requested, &outcomes, duration_s, Some(preemptions))?;
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

    fn it(lane: Lane, budget: u32, start_s: f64, end_s: f64, host_s: f64) -> TimelineIteration {
        let kind = if lane == Lane::Decode { StepKind::Decode } else { StepKind::Prefill };
        TimelineIteration { lane, kind, budget, seqs: 1, tokens: 1, start_s, end_s, host_s }
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
