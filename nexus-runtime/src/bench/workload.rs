//! Request workloads for serving benchmarks (`nexus bench`), and the statistics to report them.
//!
//! The paper's four workloads (DESIGN.md, "Workloads and metrics") are given only by the mean,
//! p50, p95 and p99 of their input and output lengths in tokens. [`LengthDistribution`] turns such
//! a row into a distribution that reproduces all four figures:
//!
//! * Its CDF is piecewise linear (a piecewise-uniform density) through knots at the cumulative
//!   probabilities 0, 0.25, 0.5, 0.75, 0.95, 0.99 and 1. The knots at 0.5, 0.95 and 0.99 are the
//!   table's p50, p95 and p99, so those quantiles are exact.
//! * The ends (0 and 1) are [`LengthProfile::min`] and [`LengthProfile::max`], chosen by us since
//!   the table says nothing about the extremes (see their docs).
//! * The knots at 0.25 and 0.75 are solved for so that the mean equals the table's mean: both
//!   start at the midpoint of their neighbours (plain linear interpolation) and move by the same
//!   fraction of their room (toward p50 and p95 to raise the mean, toward min and p50 to lower it).
//!   The mean of a piecewise-linear CDF is linear in the knots, so this is one division.
//!
//! A drawn length is the continuous value rounded to the nearest integer, at least 1 token. Input
//! and output lengths are drawn independently of each other (the table gives no correlation).
//! [`Workload::Mixed`] picks, per request, ShareGPT with probability 0.6 and long-data with 0.4,
//! then draws both lengths from the picked workload.
//!
//! [`trace`] adds arrivals ([`Arrivals`]): gaps of mean `1 / rate` drawn from a gamma distribution
//! of shape `burstiness`, as vLLM's `bench serve` draws them (1: exponential gaps, a Poisson
//! process; below 1 burstier, above 1 steadier, the coefficient of variation being
//! `1 / sqrt(burstiness)`), the first request arriving one gap after 0; an infinite rate sends
//! every request at 0. Everything is reproducible under a seed, and every request's gap spends one
//! uniform draw of the trace's stream whatever the rate and burstiness, so that a seed gives the
//! same lengths and prompts at every rate and burstiness; a Poisson gap is computed from that draw
//! itself, so that the seeds of published results still give their traces.
//!
//! [`random_trace`] is vLLM's `random` dataset: input and output lengths drawn uniformly from
//! `[len · (1 − r), len · (1 + r)]` ([`RandomLengths`]).
//!
//! A benchmark sends [`BenchRequest`]s: [`synthetic_requests`] gives a trace's requests prompts
//! of random token ids (drawn under the seed from a range that every model's vocabulary holds),
//! and [`dataset_requests`] replays the prompts of a JSONL file ([`parse_jsonl`]) with the same
//! arrivals, cycling through the file when it has fewer requests than asked for and taking its
//! first ones when it has more.
//!
//! [`percentile`] and [`Summary`] report such samples (lengths here, TTFT and TBT later) with
//! linear interpolation between order statistics.

use std::fmt;
use std::ops::{Range, RangeInclusive};
use std::str::FromStr;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;

use crate::{Error, Result};

/// The length statistics of one side (input or output) of a workload, in tokens.
///
/// `mean`, `p50`, `p95` and `p99` are the paper's; `min` and `max` are the support we chose for
/// the sampler, which the table does not give.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LengthProfile {
    /// Mean length.
    pub mean: f64,
    /// Median length.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Smallest length drawn: p50 / 8 for the long-document workloads (long-data, arxiv), whose
    /// prompts and summaries are never tiny; 1 for ShareGPT, whose chats have one-word turns.
    pub min: f64,
    /// Largest length drawn: p99 + (p99 − p95), so the density past p99 is a quarter of the
    /// density between p95 and p99: a thinning tail rather than a wall at p99, yet dense enough
    /// that the sample p99 of 20000 draws stays within about 2% (one standard error) of p99.
    pub max: f64,
}

impl LengthProfile {
    const fn new(mean: f64, p50: f64, p95: f64, p99: f64, min: f64) -> Self {
        LengthProfile { mean, p50, p95, p99, min, max: p99 + (p99 - p95) }
    }
}

/// Long Data Collections, input (prompt) lengths.
pub const LONG_DATA_INPUT: LengthProfile = LengthProfile::new(5905.0, 5461.0, 9292.0, 9817.0, 5461.0 / 8.0);
/// Long Data Collections, output lengths.
pub const LONG_DATA_OUTPUT: LengthProfile = LengthProfile::new(180.0, 159.0, 339.0, 454.0, 159.0 / 8.0);
/// ArXiv Summarization, input (prompt) lengths.
pub const ARXIV_INPUT: LengthProfile = LengthProfile::new(3832.0, 3575.0, 6460.0, 6894.0, 3575.0 / 8.0);
/// ArXiv Summarization, output lengths.
pub const ARXIV_OUTPUT: LengthProfile = LengthProfile::new(200.0, 181.0, 357.0, 443.0, 181.0 / 8.0);
/// ShareGPT, input (prompt) lengths.
pub const SHAREGPT_INPUT: LengthProfile = LengthProfile::new(496.0, 432.0, 970.0, 1367.0, 1.0);
/// ShareGPT, output lengths.
pub const SHAREGPT_OUTPUT: LengthProfile = LengthProfile::new(97.0, 37.0, 383.0, 474.0, 1.0);

/// The share of ShareGPT requests in [`Workload::Mixed`]; the rest are long-data.
pub const MIXED_SHAREGPT_FRACTION: f64 = 0.6;

/// A benchmark workload of the paper.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Workload {
    /// Long Data Collections: long prompts, short outputs.
    LongData,
    /// ArXiv Summarization: long prompts, short outputs.
    Arxiv,
    /// ShareGPT conversations: short prompts, outputs of very varied length.
    ShareGpt,
    /// Per request, ShareGPT with probability 0.6, else long-data.
    Mixed,
}

impl Workload {
    /// Every workload, in the table's order.
    pub const ALL: [Workload; 4] = [Workload::LongData, Workload::Arxiv, Workload::ShareGpt, Workload::Mixed];

    /// The name on the command line: "long-data", "arxiv", "sharegpt" or "mixed".
    pub fn name(self) -> &'static str {
        match self {
            Workload::LongData => "long-data",
            Workload::Arxiv => "arxiv",
            Workload::ShareGpt => "sharegpt",
            Workload::Mixed => "mixed",
        }
    }

    /// The (input, output) length profiles; `None` for [`Workload::Mixed`], a mixture of two.
    pub fn profiles(self) -> Option<(LengthProfile, LengthProfile)> {
        match self {
            Workload::LongData => Some((LONG_DATA_INPUT, LONG_DATA_OUTPUT)),
            Workload::Arxiv => Some((ARXIV_INPUT, ARXIV_OUTPUT)),
            Workload::ShareGpt => Some((SHAREGPT_INPUT, SHAREGPT_OUTPUT)),
            Workload::Mixed => None,
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Workload {
    type Err = Error;

    /// Parses a [`Workload::name`] (case-insensitive).
    fn from_str(s: &str) -> Result<Self> {
        Workload::ALL.into_iter().find(|w| w.name().eq_ignore_ascii_case(s)).ok_or_else(|| {
            let names: Vec<&str> = Workload::ALL.iter().map(|w| w.name()).collect();
            Error::invalid(format!("unknown workload {s:?}; expected one of {}", names.join(", ")))
        })
    }
}

/// Cumulative probabilities of the knots of [`LengthDistribution`].
const KNOT_PROBS: [f64; 7] = [0.0, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0];

/// A length distribution with a piecewise-linear CDF that has a [`LengthProfile`]'s p50, p95,
/// p99 and mean exactly (see the module doc for the construction).
#[derive(Clone, Debug, PartialEq)]
pub struct LengthDistribution {
    /// Lengths at the cumulative probabilities [`KNOT_PROBS`], non-decreasing.
    knots: [f64; 7],
}

impl LengthDistribution {
    /// Fits the distribution to `profile`; fails when the figures are not finite or not ordered
    /// (min <= p50 <= p95 <= p99 <= max, min >= 0), or when the mean cannot be reached by moving
    /// the p25 and p75 knots within [min, p50] and [p50, p95].
    pub fn new(profile: &LengthProfile) -> Result<Self> {
        let LengthProfile { mean, p50, p95, p99, min, max } = *profile;
        let ordered = [min, p50, p95, p99, max].windows(2).all(|w| w[0] <= w[1]);
        if ![mean, p50, p95, p99, min, max].iter().all(|v| v.is_finite()) || !ordered || min < 0.0 {
            return Err(Error::invalid(format!("length profile {profile:?} is not finite and ordered")));
        }
        let mut knots = [min, (min + p50) / 2.0, p50, (p50 + p95) / 2.0, p95, p99, max];
        let deficit = mean - mean_of(&knots);
        // Room of the p25 and p75 knots in the direction that reduces the deficit.
        let (room25, room75) =
            if deficit >= 0.0 { (p50 - knots[1], p95 - knots[3]) } else { (min - knots[1], p50 - knots[3]) };
        // d mean / d knot = (q[i+1] - q[i-1]) / 2: 0.25 for p25, 0.225 for p75.
        let slope = 0.5 * (KNOT_PROBS[2] - KNOT_PROBS[0]) * room25 + 0.5 * (KNOT_PROBS[4] - KNOT_PROBS[2]) * room75;
        let fraction = if deficit == 0.0 { 0.0 } else { deficit / slope };
        if !(0.0..=1.0).contains(&fraction) {
            return Err(Error::invalid(format!(
                "length profile {profile:?}: the mean is out of reach of a piecewise-linear CDF through its quantiles"
            )));
        }
        knots[1] += fraction * room25;
        knots[3] += fraction * room75;
        Ok(LengthDistribution { knots })
    }

    /// The continuous quantile at cumulative probability `q` (clamped to [0, 1]).
    pub fn quantile(&self, q: f64) -> f64 {
        let q = q.clamp(0.0, 1.0);
        let i = KNOT_PROBS[1..].iter().position(|&k| q < k).unwrap_or(KNOT_PROBS.len() - 2);
        let (q0, q1) = (KNOT_PROBS[i], KNOT_PROBS[i + 1]);
        let (x0, x1) = (self.knots[i], self.knots[i + 1]);
        x0 + (q - q0) / (q1 - q0) * (x1 - x0)
    }

    /// The mean of the continuous distribution (before rounding to tokens).
    pub fn mean(&self) -> f64 {
        mean_of(&self.knots)
    }

    /// The knots: lengths at cumulative probabilities 0, 0.25, 0.5, 0.75, 0.95, 0.99 and 1.
    pub fn knots(&self) -> [f64; 7] {
        self.knots
    }

    /// Draws a length in tokens: the quantile of a uniform draw, rounded, at least 1.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> usize {
        (self.quantile(rng.random::<f64>()).round() as usize).max(1)
    }
}

/// The mean of the piecewise-linear CDF through (`KNOT_PROBS[i]`, `knots[i]`).
fn mean_of(knots: &[f64; 7]) -> f64 {
    (0..6).map(|i| (KNOT_PROBS[i + 1] - KNOT_PROBS[i]) * (knots[i] + knots[i + 1]) / 2.0).sum()
}

/// Input and output length distributions of one (non-mixed) workload.
#[derive(Clone, Debug)]
struct Pair {
    workload: Workload,
    input: LengthDistribution,
    output: LengthDistribution,
}

impl Pair {
    fn new(workload: Workload) -> Result<Self> {
        let (input, output) =
            workload.profiles().ok_or_else(|| Error::invalid(format!("{workload} has no single profile")))?;
        Ok(Pair { workload, input: LengthDistribution::new(&input)?, output: LengthDistribution::new(&output)? })
    }
}

/// One drawn request shape, with the workload it came from (differs from the sampler's for
/// [`Workload::Mixed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LengthSample {
    /// The workload the lengths were drawn from: never [`Workload::Mixed`].
    pub source: Workload,
    /// Prompt length in tokens, >= 1.
    pub input_len: usize,
    /// Output length in tokens, >= 1.
    pub output_len: usize,
}

/// Draws (input, output) lengths of a workload; input and output independently.
#[derive(Clone, Debug)]
pub struct WorkloadSampler {
    workload: Workload,
    /// One pair for a plain workload; ShareGPT then long-data for the mixture.
    pairs: Vec<Pair>,
}

impl WorkloadSampler {
    /// The sampler of `workload`.
    pub fn new(workload: Workload) -> Result<Self> {
        let pairs = match workload {
            Workload::Mixed => vec![Pair::new(Workload::ShareGpt)?, Pair::new(Workload::LongData)?],
            w => vec![Pair::new(w)?],
        };
        Ok(WorkloadSampler { workload, pairs })
    }

    /// The workload this samples.
    pub fn workload(&self) -> Workload {
        self.workload
    }

    /// Draws one request's lengths. The mixture spends one uniform draw on the choice.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> LengthSample {
        let pair = match self.workload {
            Workload::Mixed if rng.random::<f64>() >= MIXED_SHAREGPT_FRACTION => &self.pairs[1],
            _ => &self.pairs[0],
        };
        LengthSample { source: pair.workload, input_len: pair.input.sample(rng), output_len: pair.output.sample(rng) }
    }
}

/// One request of a benchmark trace.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Request {
    /// Arrival time in seconds since the start of the trace.
    pub arrival_s: f64,
    /// Prompt length in tokens, >= 1.
    pub input_len: usize,
    /// Output length in tokens, >= 1.
    pub output_len: usize,
}

/// How the requests of a trace arrive: `rate_per_s` requests per second on average, with gaps
/// drawn from a gamma distribution of shape `burstiness` and mean `1 / rate_per_s` (vLLM's
/// `--request-rate` and `--burstiness`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Arrivals {
    /// Requests per second, > 0; infinite sends every request at 0.
    pub rate_per_s: f64,
    /// The gamma shape, > 0: 1 is a Poisson process, lower is burstier, higher steadier (the gaps'
    /// coefficient of variation is `1 / sqrt(burstiness)`); infinite gives gaps of exactly
    /// `1 / rate_per_s`.
    pub burstiness: f64,
}

impl Arrivals {
    /// A Poisson process of `rate_per_s` requests per second.
    pub const fn poisson(rate_per_s: f64) -> Arrivals {
        Arrivals { rate_per_s, burstiness: 1.0 }
    }

    /// Fails unless the rate and the burstiness are numbers > 0 (infinity allowed).
    pub fn check(&self) -> Result<()> {
        if self.rate_per_s.is_nan() || self.rate_per_s <= 0.0 {
            return Err(Error::invalid(format!("arrival rate {} must be a number > 0 (or inf)", self.rate_per_s)));
        }
        if self.burstiness.is_nan() || self.burstiness <= 0.0 {
            return Err(Error::invalid(format!("burstiness {} must be a number > 0 (or inf)", self.burstiness)));
        }
        Ok(())
    }
}

/// Draws the gaps of [`Arrivals`], one request at a time.
struct Gaps {
    arrivals: Arrivals,
    /// Gamma draws take a varying number of uniforms (rejection sampling), so they come from a
    /// stream of their own, leaving the trace's stream one uniform per request.
    gamma_rng: StdRng,
}

impl Gaps {
    /// The gaps of `arrivals` for a trace of `num_requests` under `seed`; fails on bad arrivals or
    /// no request.
    fn new(arrivals: Arrivals, num_requests: usize, seed: u64) -> Result<Gaps> {
        arrivals.check()?;
        if num_requests == 0 {
            return Err(Error::invalid("a trace needs at least one request"));
        }
        Ok(Gaps { arrivals, gamma_rng: StdRng::seed_from_u64(seed ^ GAMMA_STREAM) })
    }

    /// The next gap in seconds, spending one uniform of `rng` whatever the arrivals.
    fn next(&mut self, rng: &mut StdRng) -> f64 {
        let u = rng.random::<f64>();
        let Arrivals { rate_per_s: rate, burstiness } = self.arrivals;
        if rate.is_infinite() {
            0.0
        } else if burstiness == 1.0 {
            // The exponential by inversion; 1 - u is in (0, 1], so the logarithm is finite.
            -(1.0 - u).ln() / rate
        } else if burstiness.is_infinite() {
            1.0 / rate
        } else {
            // Shape b and scale 1 / (b · rate): mean 1 / rate.
            standard_gamma(&mut self.gamma_rng, burstiness) / (burstiness * rate)
        }
    }
}

/// Mixed into the seed for the stream of gamma gaps.
const GAMMA_STREAM: u64 = 0x9e37_79b9_7f4a_7c15;

/// A draw of the gamma distribution of `shape` > 0 and scale 1, by Marsaglia and Tsang's method
/// ("A simple method for generating gamma variables", ACM TOMS 26(3), 2000); a shape below 1 is
/// boosted, as they show: Gamma(a) = Gamma(a + 1) · U^(1/a).
fn standard_gamma<R: Rng + ?Sized>(rng: &mut R, shape: f64) -> f64 {
    if shape < 1.0 {
        let u = 1.0 - rng.random::<f64>();
        return standard_gamma(rng, shape + 1.0) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = standard_normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        // The squeeze accepts most draws without a logarithm.
        let u = rng.random::<f64>();
        if u < 1.0 - 0.0331 * x.powi(4) || u.ln() < 0.5 * x * x + d * (1.0 - v + v.ln()) {
            return d * v;
        }
    }
}

/// A draw of the standard normal distribution (Box–Muller; the second draw of the pair is
/// dropped, as gaps need few).
fn standard_normal<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// `num_requests` requests of `workload` at `arrivals`, in arrival order. The same seed gives the
/// same trace, and the same lengths whatever the arrivals.
///
/// Fails on bad arrivals ([`Arrivals::check`]) or when `num_requests` is 0.
pub fn trace(workload: Workload, arrivals: Arrivals, num_requests: usize, seed: u64) -> Result<Vec<Request>> {
    let sampler = WorkloadSampler::new(workload)?;
    trace_with(arrivals, num_requests, seed, |rng| {
        let s = sampler.sample(rng);
        (s.input_len, s.output_len)
    })
}

/// vLLM's `random` dataset: each request's input and output lengths drawn independently and
/// uniformly from `[floor(len · (1 − r)), ceil(len · (1 + r))]`, with `r` the range ratio, and at
/// least 1 token (vLLM's bounds; it also subtracts the special tokens its tokenizer adds from the
/// input length, where the prompts here are token ids sent as they are).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RandomLengths {
    input_len: usize,
    output_len: usize,
    range_ratio: f64,
}

impl RandomLengths {
    /// Fails when a length is 0 or the range ratio is not in [0, 1).
    pub fn new(input_len: usize, output_len: usize, range_ratio: f64) -> Result<RandomLengths> {
        if input_len == 0 || output_len == 0 {
            return Err(Error::invalid(format!(
                "random lengths must be at least 1 token (input {input_len}, output {output_len})"
            )));
        }
        if !(0.0..1.0).contains(&range_ratio) {
            return Err(Error::invalid(format!("the range ratio {range_ratio} must be in [0, 1)")));
        }
        Ok(RandomLengths { input_len, output_len, range_ratio })
    }

    /// The input lengths drawn, inclusive.
    pub fn input_range(&self) -> RangeInclusive<usize> {
        self.range(self.input_len)
    }

    /// The output lengths drawn, inclusive.
    pub fn output_range(&self) -> RangeInclusive<usize> {
        self.range(self.output_len)
    }

    /// The mean input length, output length and range ratio asked for.
    pub fn parameters(&self) -> (usize, usize, f64) {
        (self.input_len, self.output_len, self.range_ratio)
    }

    fn range(&self, len: usize) -> RangeInclusive<usize> {
        let len = len as f64;
        let low = ((len * (1.0 - self.range_ratio)).floor() as usize).max(1);
        let high = ((len * (1.0 + self.range_ratio)).ceil() as usize).max(low);
        low..=high
    }
}

/// `num_requests` requests of vLLM's `random` dataset ([`RandomLengths`]) at `arrivals`, in
/// arrival order; reproducible as [`trace`] is.
pub fn random_trace(
    lengths: RandomLengths,
    arrivals: Arrivals,
    num_requests: usize,
    seed: u64,
) -> Result<Vec<Request>> {
    let (input, output) = (lengths.input_range(), lengths.output_range());
    trace_with(arrivals, num_requests, seed, |rng| (rng.random_range(input.clone()), rng.random_range(output.clone())))
}

/// The trace of `arrivals` whose lengths `draw` gives, request after request from the seed's
/// stream: its gap, then its lengths.
fn trace_with(
    arrivals: Arrivals,
    num_requests: usize,
    seed: u64,
    mut draw: impl FnMut(&mut StdRng) -> (usize, usize),
) -> Result<Vec<Request>> {
    let mut gaps = Gaps::new(arrivals, num_requests, seed)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut now = 0.0;
    Ok((0..num_requests)
        .map(|_| {
            now += gaps.next(&mut rng);
            let (input_len, output_len) = draw(&mut rng);
            Request { arrival_s: now, input_len, output_len }
        })
        .collect())
}

/// The prompt of a benchmark request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prompt {
    /// Text: tokenized by the model's tokenizer in-process, sent as is to a server.
    Text(String),
    /// Token ids, sent as they are.
    TokenIds(Vec<u32>),
}

impl Prompt {
    /// The prompt's token ids: `TokenIds` as they are, `Text` encoded by `tokenizer` (with the
    /// special tokens a completion prompt gets). Fails for text without a tokenizer.
    pub fn token_ids(&self, tokenizer: Option<&crate::text::tokenizer::Tokenizer>) -> Result<Vec<u32>> {
        match (self, tokenizer) {
            (Prompt::TokenIds(ids), _) => Ok(ids.clone()),
            (Prompt::Text(text), Some(tokenizer)) => tokenizer.encode(text, true),
            (Prompt::Text(_), None) => Err(Error::invalid(
                "a text prompt needs the model's tokenizer; this model has none (use prompt_token_ids)",
            )),
        }
    }

    /// The prompt's length in tokens when it is token ids; text has none before it is tokenized.
    pub fn token_count(&self) -> Option<usize> {
        match self {
            Prompt::TokenIds(ids) => Some(ids.len()),
            Prompt::Text(_) => None,
        }
    }
}

/// One request of a benchmark run: when it arrives, what it asks and how many tokens it must
/// generate (the output is forced to that length).
#[derive(Clone, Debug, PartialEq)]
pub struct BenchRequest {
    /// Arrival time in seconds since the start of the run.
    pub arrival_s: f64,
    /// The prompt.
    pub prompt: Prompt,
    /// Output length in tokens, >= 1.
    pub output_len: usize,
}

/// The requests of `trace` with prompts of random token ids of their input lengths, drawn
/// uniformly from `token_ids` under `seed`. Fails on an empty range.
pub fn synthetic_requests(trace: &[Request], token_ids: Range<u32>, seed: u64) -> Result<Vec<BenchRequest>> {
    if token_ids.is_empty() {
        return Err(Error::invalid(format!("the token-id range {token_ids:?} is empty")));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    Ok(trace
        .iter()
        .map(|r| BenchRequest {
            arrival_s: r.arrival_s,
            prompt: Prompt::TokenIds((0..r.input_len).map(|_| rng.random_range(token_ids.clone())).collect()),
            output_len: r.output_len,
        })
        .collect())
}

/// One request of a JSONL dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatasetEntry {
    /// The prompt.
    pub prompt: Prompt,
    /// The output length to force, >= 1.
    pub output_len: usize,
}

/// A line of a JSONL dataset as written: exactly one of the two prompt fields.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DatasetLine {
    prompt: Option<String>,
    prompt_token_ids: Option<Vec<u32>>,
    output_len: usize,
}

/// Parses a JSONL dataset: one JSON object per line, `{"prompt": "text", "output_len": N}` or
/// `{"prompt_token_ids": [ids], "output_len": N}`, with N >= 1 and a non-empty prompt. Blank lines
/// are skipped. Fails on the first malformed line, naming its number (from 1), or when the file
/// holds no request.
pub fn parse_jsonl(text: &str) -> Result<Vec<DatasetEntry>> {
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| Error::invalid(format!("line {}: {message}", i + 1));
        let parsed: DatasetLine = serde_json::from_str(line).map_err(|e| {
            bad(format!(
                "{e} (expected {{\"prompt\": \"text\", \"output_len\": N}} or {{\"prompt_token_ids\": [ids], \"output_len\": N}})"
            ))
        })?;
        let prompt = match (parsed.prompt, parsed.prompt_token_ids) {
            (Some(text), None) if !text.is_empty() => Prompt::Text(text),
            (None, Some(ids)) if !ids.is_empty() => Prompt::TokenIds(ids),
            (Some(_), Some(_)) => return Err(bad("give either prompt or prompt_token_ids, not both".into())),
            (None, None) => return Err(bad("missing prompt or prompt_token_ids".into())),
            _ => return Err(bad("the prompt is empty".into())),
        };
        if parsed.output_len == 0 {
            return Err(bad("output_len must be at least 1".into()));
        }
        entries.push(DatasetEntry { prompt, output_len: parsed.output_len });
    }
    if entries.is_empty() {
        return Err(Error::invalid("the dataset holds no request"));
    }
    Ok(entries)
}

/// `num_requests` requests of `entries`, in file order (cycling through the file when it is
/// shorter, its first `num_requests` when it is longer), at `arrivals` under `seed` (as in
/// [`trace`]).
///
/// Fails on an empty dataset, on bad arrivals ([`Arrivals::check`]) or when `num_requests` is 0.
pub fn dataset_requests(
    entries: &[DatasetEntry],
    arrivals: Arrivals,
    num_requests: usize,
    seed: u64,
) -> Result<Vec<BenchRequest>> {
    let mut gaps = Gaps::new(arrivals, num_requests, seed)?;
    if entries.is_empty() {
        return Err(Error::invalid("the dataset holds no request"));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut now = 0.0;
    Ok(entries
        .iter()
        .cycle()
        .take(num_requests)
        .map(|e| {
            now += gaps.next(&mut rng);
            BenchRequest { arrival_s: now, prompt: e.prompt.clone(), output_len: e.output_len }
        })
        .collect())
}

/// The `p`-th percentile (`p` in percent, clamped to [0, 100]) of ascending `sorted` values, by
/// linear interpolation between the closest ranks: rank `p / 100 · (n − 1)` counted from 0 (the
/// "linear" method of numpy's `percentile`). So p = 0 is the minimum, p = 100 the maximum and p = 50
/// of an even count the mean of the two middle values. NaN for an empty slice or a NaN `p`.
///
/// The order is not checked in release builds; an unsorted slice gives a meaningless value.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    debug_assert!(sorted.is_sorted_by(|a, b| a <= b), "percentile needs ascending values");
    if sorted.is_empty() || p.is_nan() {
        return f64::NAN;
    }
    let rank = p.clamp(0.0, 100.0) / 100.0 * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    let frac = rank - lo as f64;
    if frac == 0.0 { sorted[lo] } else { sorted[lo] + frac * (sorted[hi] - sorted[lo]) }
}

/// Mean and percentiles of a sample (token lengths, TTFT, TBT, ...), percentiles by [`percentile`]
/// (linear interpolation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    /// Number of values.
    pub count: usize,
    /// Arithmetic mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
}

impl Summary {
    /// Summarizes `values` in any order; fails when there are none or one is not finite.
    pub fn of(values: &[f64]) -> Result<Summary> {
        if values.is_empty() {
            return Err(Error::invalid("cannot summarize an empty sample"));
        }
        if let Some(v) = values.iter().find(|v| !v.is_finite()) {
            return Err(Error::invalid(format!("cannot summarize a sample holding {v}")));
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Ok(Summary {
            count: sorted.len(),
            mean: sorted.iter().sum::<f64>() / sorted.len() as f64,
            p50: percentile(&sorted, 50.0),
            p95: percentile(&sorted, 95.0),
            p99: percentile(&sorted, 99.0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_edges() {
        assert!(percentile(&[], 50.0).is_nan());
        assert!(percentile(&[1.0, 2.0], f64::NAN).is_nan());
        assert_eq!(percentile(&[7.0], 0.0), 7.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 100.0), 4.0);
        assert_eq!(percentile(&v, -5.0), 1.0);
        assert_eq!(percentile(&v, 250.0), 4.0);
        // Rank 0.5 · 3 = 1.5: halfway between 2 and 3.
        assert_eq!(percentile(&v, 50.0), 2.5);
        // Rank 0.95 · 3 = 2.85.
        assert!((percentile(&v, 95.0) - 3.85).abs() < 1e-12);
        // Exact ranks give the order statistic: 0..=100, p-th percentile is p.
        let hundred: Vec<f64> = (0..=100).map(f64::from).collect();
        for p in [0.0, 1.0, 50.0, 95.0, 99.0, 100.0] {
            assert_eq!(percentile(&hundred, p), p);
        }
        // Ties stay put.
        assert_eq!(percentile(&[3.0, 3.0, 3.0], 37.0), 3.0);
    }

    #[test]
    fn summary_edges() {
        assert!(Summary::of(&[]).is_err());
        assert!(Summary::of(&[1.0, f64::NAN]).is_err());
        assert!(Summary::of(&[1.0, f64::INFINITY]).is_err());
        let one = Summary::of(&[4.5]).unwrap();
        assert_eq!(one, Summary { count: 1, mean: 4.5, p50: 4.5, p95: 4.5, p99: 4.5 });
        // Order of the input does not matter; percentiles interpolate.
        let s = Summary::of(&[10.0, 0.0, 30.0, 20.0]).unwrap();
        assert_eq!((s.count, s.mean, s.p50), (4, 15.0, 15.0));
        assert!((s.p95 - 28.5).abs() < 1e-12);
        assert!((s.p99 - 29.7).abs() < 1e-12);
        // A skewed sample: mean above median.
        let s = Summary::of(&[1.0, 1.0, 1.0, 1.0, 96.0]).unwrap();
        assert_eq!((s.mean, s.p50), (20.0, 1.0));
    }

    #[test]
    fn workload_names_round_trip() {
        for w in Workload::ALL {
            assert_eq!(w.name().parse::<Workload>().unwrap(), w);
            assert_eq!(w.to_string(), w.name());
        }
        assert_eq!("ShareGPT".parse::<Workload>().unwrap(), Workload::ShareGpt);
        assert!("share-gpt".parse::<Workload>().is_err());
        assert!("".parse::<Workload>().is_err());
    }

    #[test]
    fn distributions_hit_the_table_exactly() {
        for w in [Workload::LongData, Workload::Arxiv, Workload::ShareGpt] {
            let (input, output) = w.profiles().unwrap();
            for p in [input, output] {
                let d = LengthDistribution::new(&p).unwrap();
                assert!((d.mean() - p.mean).abs() < 1e-9 * p.mean, "{w} {p:?} {d:?}");
                assert_eq!((d.quantile(0.5), d.quantile(0.95), d.quantile(0.99)), (p.p50, p.p95, p.p99));
                assert_eq!((d.quantile(0.0), d.quantile(1.0)), (p.min, p.max));
                assert!(d.knots().windows(2).all(|k| k[0] <= k[1]), "{w} {d:?}");
            }
        }
        assert!(Workload::Mixed.profiles().is_none());
    }

    #[test]
    fn unreachable_or_disordered_profiles_fail() {
        let base = SHAREGPT_OUTPUT;
        // Mean below what any knot placement allows (everything below p50 at min, the body at p50).
        assert!(LengthDistribution::new(&LengthProfile { mean: 30.0, ..base }).is_err());
        // Mean above the top of the range.
        assert!(LengthDistribution::new(&LengthProfile { mean: 400.0, ..base }).is_err());
        assert!(LengthDistribution::new(&LengthProfile { p95: 20.0, ..base }).is_err());
        assert!(LengthDistribution::new(&LengthProfile { max: f64::INFINITY, ..base }).is_err());
        // The mean of the plain interpolation needs no move of the knots.
        let plain = LengthProfile { mean: 0.0, p50: 10.0, p95: 20.0, p99: 30.0, min: 0.0, max: 40.0 };
        let plain = LengthProfile { mean: mean_of(&[0.0, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0]), ..plain };
        let d = LengthDistribution::new(&plain).unwrap();
        assert_eq!(d.knots(), [0.0, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0]);
    }

    #[test]
    fn random_lengths_take_vllms_bounds() {
        let r = RandomLengths::new(1024, 128, 0.0).unwrap();
        assert_eq!((r.input_range(), r.output_range()), (1024..=1024, 128..=128));
        // Floor below, ceiling above: 128 · 0.9 = 115.2 and 128 · 1.1 = 140.8.
        let r = RandomLengths::new(10, 128, 0.1).unwrap();
        assert_eq!((r.input_range(), r.output_range()), (9..=11, 115..=141));
        // Never below one token.
        let r = RandomLengths::new(1, 3, 0.9).unwrap();
        assert_eq!((r.input_range(), r.output_range()), (1..=2, 1..=6));
        assert_eq!(r.parameters(), (1, 3, 0.9));
        for (input, output, ratio) in [(0, 1, 0.0), (1, 0, 0.0), (8, 8, 1.0), (8, 8, -0.1), (8, 8, f64::NAN)] {
            assert!(RandomLengths::new(input, output, ratio).is_err(), "{input} {output} {ratio}");
        }
    }

    #[test]
    fn infinite_rates_send_at_once_and_infinite_burstiness_evenly() {
        let lengths = RandomLengths::new(4, 4, 0.5).unwrap();
        let at_once = random_trace(lengths, Arrivals { rate_per_s: f64::INFINITY, burstiness: 0.5 }, 5, 1).unwrap();
        assert!(at_once.iter().all(|r| r.arrival_s == 0.0));
        let even = random_trace(lengths, Arrivals { rate_per_s: 4.0, burstiness: f64::INFINITY }, 5, 1).unwrap();
        let times: Vec<f64> = even.iter().map(|r| r.arrival_s).collect();
        assert_eq!(times, [0.25, 0.5, 0.75, 1.0, 1.25]);
        // The lengths do not depend on the arrivals.
        let lengths_of = |t: &[Request]| t.iter().map(|r| (r.input_len, r.output_len)).collect::<Vec<_>>();
        assert_eq!(lengths_of(&at_once), lengths_of(&even));
        for bad in [Arrivals::poisson(0.0), Arrivals::poisson(f64::NAN), Arrivals { rate_per_s: 1.0, burstiness: 0.0 }]
        {
            assert!(random_trace(lengths, bad, 5, 1).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn samples_are_at_least_one_token() {
        let p = LengthProfile { mean: 1.0, p50: 0.8, p95: 2.0, p99: 2.5, min: 0.0, max: 3.0 };
        let d = LengthDistribution::new(&p).unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        assert!((0..1000).all(|_| d.sample(&mut rng) >= 1));
    }
}
