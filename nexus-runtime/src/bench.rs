//! Replaying a serving trace through the engine in-process, and the latency metrics of the paper:
//! TTFT (arrival to first token), TBT (gap between consecutive tokens of a request), normalized
//! latency (end-to-end latency / output tokens), and request and token throughput.
//!
//! Prompts are random token ids of the trace's lengths and outputs are forced to the trace's
//! lengths (end-of-sequence ignored), so that runs of different schedulers compare.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::backend::Backend;
use crate::engine::{Engine, EngineEvent, RequestOptions};
use crate::workload::{Request, Summary};
use crate::{Error, Result};

/// The measured times of one request, in seconds from its arrival.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestTimes {
    /// When each output token was produced.
    pub tokens: Vec<f64>,
}

/// The metrics of one replay.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplayReport {
    pub ttft: Summary,
    pub tbt: Summary,
    pub normalized_latency: Summary,
    /// Completed requests per second of the whole run.
    pub request_throughput: f64,
    /// Output tokens per second of the whole run.
    pub token_throughput: f64,
    /// First arrival to last token.
    pub duration_s: f64,
    /// Sequences preempted during the run.
    pub preemptions: u64,
}

/// Replays `trace` through `engine` in real time: each request is added once the wall clock
/// passes its arrival, and the engine steps whenever it has work. Returns every request's token
/// times (in trace order) and the summary. Fails when the engine does, or when a request is
/// refused (e.g. longer than the cache).
pub fn replay<B: Backend>(
    engine: &mut Engine<B>,
    trace: &[Request],
    seed: u64,
) -> Result<(Vec<RequestTimes>, ReplayReport)> {
    if trace.is_empty() {
        return Err(Error::invalid("the trace is empty"));
    }
    let vocab = engine.model().config().vocab_size as u32;
    let mut rng = StdRng::seed_from_u64(seed);
    let preemptions_before = engine.preemptions();
    let mut times: Vec<RequestTimes> = trace.iter().map(|_| RequestTimes { tokens: Vec::new() }).collect();
    let start = Instant::now();
    let arrival = |i: usize| start + Duration::from_secs_f64(trace[i].arrival_s);
    let mut next = 0;
    let mut finished = 0;
    while finished < trace.len() {
        let now = Instant::now();
        while next < trace.len() && arrival(next) <= now {
            let r = &trace[next];
            let prompt: Vec<u32> = (0..r.input_len).map(|_| rng.random_range(0..vocab)).collect();
            let options = RequestOptions { max_tokens: r.output_len, ignore_eos: true, ..RequestOptions::default() };
            engine.add_request(next as u64, prompt, options)?;
            next += 1;
        }
        if !engine.has_unfinished() {
            // Idle until the next arrival.
            if next < trace.len() {
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
                    times[i].tokens.push(now.duration_since(arrival(i)).as_secs_f64());
                }
                EngineEvent::Finished { .. } => finished += 1,
            }
        }
    }
    let duration_s = start.elapsed().as_secs_f64() - trace[0].arrival_s;
    let ttft: Vec<f64> = times.iter().filter_map(|t| t.tokens.first().copied()).collect();
    let tbt: Vec<f64> = times.iter().flat_map(|t| t.tokens.windows(2).map(|w| w[1] - w[0])).collect();
    let normalized: Vec<f64> =
        times.iter().filter_map(|t| t.tokens.last().map(|&end| end / t.tokens.len() as f64)).collect();
    let output_tokens: usize = times.iter().map(|t| t.tokens.len()).sum();
    // A trace of one-token outputs has no gaps: report zeros rather than fail.
    let tbt = if tbt.is_empty() { Summary::of(&[0.0])? } else { Summary::of(&tbt)? };
    let report = ReplayReport {
        ttft: Summary::of(&ttft)?,
        tbt,
        normalized_latency: Summary::of(&normalized)?,
        request_throughput: trace.len() as f64 / duration_s,
        token_throughput: output_tokens as f64 / duration_s,
        duration_s,
        preemptions: engine.preemptions() - preemptions_before,
    };
    Ok((times, report))
}
