//! The per-request metrics of vLLM's `bench serve`, computed the way it computes them, so that a
//! Nexus result reads like a vLLM or SGLang one:
//!
//! * TTFT: sending to the first token;
//! * TPOT: per request, `(E2EL − TTFT) / (output tokens − 1)`, for requests of more than one
//!   output token;
//! * ITL: every gap between consecutive tokens of every request (our TBT);
//! * E2EL: sending to the end of the response.
//!
//! [`MetricStats`] gives a sample's mean, median, standard deviation and chosen percentiles as
//! vLLM does (numpy's `mean`, `median`, `std` and linear `percentile`), and [`Goodput`] judges a
//! request against per-request objectives: vLLM's request goodput, the DistServe definition, is
//! the completed requests that met every objective given, per second.

use std::fmt;
use std::str::FromStr;

use crate::bench::RequestTimes;
use crate::bench::workload::percentile;
use crate::{Error, Result};

/// A latency metric of vLLM's `bench serve` (`--percentile-metrics`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Metric {
    /// Time to first token.
    Ttft,
    /// Time per output token after the first, per request.
    Tpot,
    /// Inter-token latency: every gap between tokens (our TBT).
    Itl,
    /// End-to-end latency.
    E2el,
}

impl Metric {
    /// Every metric, in vLLM's order.
    pub const ALL: [Metric; 4] = [Metric::Ttft, Metric::Tpot, Metric::Itl, Metric::E2el];

    /// vLLM's name: "ttft", "tpot", "itl" or "e2el" (as in `mean_ttft_ms`).
    pub fn name(self) -> &'static str {
        match self {
            Metric::Ttft => "ttft",
            Metric::Tpot => "tpot",
            Metric::Itl => "itl",
            Metric::E2el => "e2el",
        }
    }

    /// The metric of one completed request: one value, none (TPOT of a single-token output), or
    /// one per gap (ITL).
    pub fn values(self, times: &RequestTimes) -> Vec<f64> {
        match self {
            Metric::Ttft => times.tokens.first().copied().into_iter().collect(),
            Metric::Tpot => times.tpot().into_iter().collect(),
            Metric::Itl => times.itls().collect(),
            Metric::E2el => vec![times.end_s],
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Metric {
    type Err = Error;

    /// Parses a [`Metric::name`] (case-insensitive).
    fn from_str(s: &str) -> Result<Metric> {
        Metric::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| Error::invalid(format!("unknown metric {s:?}; expected ttft, tpot, itl or e2el")))
    }
}

/// A sample's figures as vLLM reports them; NaN figures for an empty sample.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricStats {
    /// Number of values.
    pub count: usize,
    pub mean: f64,
    /// The 50th percentile.
    pub median: f64,
    /// The population standard deviation (numpy's `std`, whose `ddof` is 0).
    pub std: f64,
    /// (p, the p-th percentile by [`percentile`]) for each p asked for, in the order asked.
    pub percentiles: Vec<(f64, f64)>,
}

impl MetricStats {
    /// The figures of `values` (any order) with the `percentiles` (in percent) asked for.
    pub fn of(values: &[f64], percentiles: &[f64]) -> MetricStats {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len() as f64;
        let mean = if sorted.is_empty() { f64::NAN } else { sorted.iter().sum::<f64>() / n };
        let variance = sorted.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        MetricStats {
            count: sorted.len(),
            mean,
            median: percentile(&sorted, 50.0),
            std: variance.sqrt(),
            percentiles: percentiles.iter().map(|&p| (p, percentile(&sorted, p))).collect(),
        }
    }
}

/// vLLM's `--goodput` objectives, in seconds: a completed request is good when it meets every
/// objective given (a request of one output token has a TPOT of 0 here, as in vLLM).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Goodput {
    pub ttft: Option<f64>,
    pub tpot: Option<f64>,
    pub e2el: Option<f64>,
}

impl Goodput {
    /// Sets the objective of `metric` to `seconds`; fails for ITL, which is no per-request figure,
    /// and for a negative or NaN objective.
    pub fn set(&mut self, metric: Metric, seconds: f64) -> Result<()> {
        if seconds.is_nan() || seconds < 0.0 {
            return Err(Error::invalid(format!("the {metric} objective {seconds} must be a number >= 0")));
        }
        let slot = match metric {
            Metric::Ttft => &mut self.ttft,
            Metric::Tpot => &mut self.tpot,
            Metric::E2el => &mut self.e2el,
            Metric::Itl => {
                return Err(Error::invalid("goodput objectives are per request: ttft, tpot or e2el, not itl"));
            }
        };
        *slot = Some(seconds);
        Ok(())
    }

    /// Whether no objective is given.
    pub fn is_empty(&self) -> bool {
        *self == Goodput::default()
    }

    /// Whether the completed request of `times` meets every objective.
    pub fn met_by(&self, times: &RequestTimes) -> bool {
        let within = |objective: Option<f64>, value: f64| objective.is_none_or(|limit| value <= limit);
        within(self.ttft, times.tokens.first().copied().unwrap_or(f64::NAN))
            && within(self.tpot, times.tpot().unwrap_or(0.0))
            && within(self.e2el, times.end_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_round_trip() {
        for m in Metric::ALL {
            assert_eq!(m.name().parse::<Metric>().unwrap(), m);
        }
        assert_eq!(" TTFT".parse::<Metric>().unwrap(), Metric::Ttft);
        assert!("tbt".parse::<Metric>().is_err());
    }

    #[test]
    fn stats_are_numpys() {
        // numpy: mean 2.5, median 2.5, std 1.118..., percentile 90 = 3.7, 99 = 3.97.
        let s = MetricStats::of(&[4.0, 1.0, 3.0, 2.0], &[90.0, 99.0]);
        assert_eq!((s.count, s.mean, s.median), (4, 2.5, 2.5));
        assert!((s.std - 1.25f64.sqrt()).abs() < 1e-12);
        assert!((s.percentiles[0].1 - 3.7).abs() < 1e-12 && (s.percentiles[1].1 - 3.97).abs() < 1e-12);
        assert_eq!((s.percentiles[0].0, s.percentiles[1].0), (90.0, 99.0));
        let empty = MetricStats::of(&[], &[50.0]);
        assert!(empty.count == 0 && empty.mean.is_nan() && empty.std.is_nan() && empty.percentiles[0].1.is_nan());
    }

    #[test]
    fn goodput_objectives() {
        let mut g = Goodput::default();
        assert!(g.is_empty());
        assert!(g.set(Metric::Itl, 1.0).is_err() && g.set(Metric::Ttft, -1.0).is_err());
        assert!(g.set(Metric::Ttft, f64::NAN).is_err());
        g.set(Metric::Ttft, 0.5).unwrap();
        g.set(Metric::Tpot, 0.1).unwrap();
        let times = |tokens: Vec<f64>, end_s: f64| RequestTimes {
            sent_s: 0.0,
            output_tokens: tokens.len(),
            tokens,
            end_s,
            prompt_tokens: None,
        };
        // TTFT 0.5 (the objective itself counts as met), TPOT (0.7 - 0.5) / 2 = 0.1.
        assert!(g.met_by(&times(vec![0.5, 0.6, 0.7], 0.7)));
        assert!(!g.met_by(&times(vec![0.5, 0.6, 0.8], 0.8)), "TPOT 0.15");
        assert!(!g.met_by(&times(vec![0.6, 0.6], 0.6)), "TTFT 0.6");
        // One token: TPOT counts as 0, whatever the end.
        assert!(g.met_by(&times(vec![0.1], 9.0)));
        g.set(Metric::E2el, 1.0).unwrap();
        assert!(!g.met_by(&times(vec![0.1], 9.0)));
    }
}
