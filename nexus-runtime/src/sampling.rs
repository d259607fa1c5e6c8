//! Token sampling: greedy, temperature, top-k, top-p, with a seed for reproducibility.
//!
//! The filters are pure functions over a probability vector so that they can be tested on their
//! own; [`Sampler`] chains them: logits / temperature → softmax → top-k → top-p → draw.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{Error, Result};

/// How to pick the next token.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy); larger values flatten the distribution.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1 keeps all.
    pub top_p: f32,
    /// Seed of the random draws; `None` seeds from the operating system.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: None }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        SamplingParams::default()
    }

    /// Whether this picks the most likely token without drawing.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    /// Checks the ranges: temperature finite and >= 0, top_p in (0, 1].
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::invalid(format!("temperature {} must be a finite number >= 0", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid(format!("top_p {} must be in (0, 1]", self.top_p)));
        }
        Ok(())
    }
}

/// The index of the largest value (the first on ties); `None` for an empty slice.
pub fn argmax(values: &[f32]) -> Option<u32> {
    let mut best: Option<usize> = None;
    for (i, &v) in values.iter().enumerate() {
        if best.is_none_or(|b| v > values[b]) {
            best = Some(i);
        }
    }
    best.map(|b| b as u32)
}

/// `softmax(logits / temperature)`, computed stably.
pub fn softmax_with_temperature(logits: &[f32], temperature: f32) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<f32> = logits.iter().map(|&l| ((l - max) / temperature).exp()).collect();
    let sum: f32 = probs.iter().sum();
    for p in &mut probs {
        *p /= sum;
    }
    probs
}

/// Token indices sorted by decreasing probability (stable, so ties keep index order).
fn by_probability(probs: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    order
}

/// Zeroes all but the `k` most likely tokens (ties broken by lower index); `k = 0` keeps all.
pub fn apply_top_k(probs: &mut [f32], k: usize) {
    if k == 0 || k >= probs.len() {
        return;
    }
    for &i in &by_probability(probs)[k..] {
        probs[i] = 0.0;
    }
}

/// Zeroes all but the smallest set of most likely tokens whose total reaches `p` of the
/// remaining mass. The most likely token always survives.
pub fn apply_top_p(probs: &mut [f32], p: f32) {
    if p >= 1.0 {
        return;
    }
    let total: f32 = probs.iter().sum();
    let order = by_probability(probs);
    let mut cumulative = 0.0;
    let mut keep = order.len();
    for (rank, &i) in order.iter().enumerate() {
        cumulative += probs[i];
        if cumulative >= p * total {
            keep = rank + 1;
            break;
        }
    }
    for &i in &order[keep..] {
        probs[i] = 0.0;
    }
}

/// Draws an index with probability proportional to `weights[i]` from a uniform `u` in [0, 1).
pub fn draw(weights: &[f32], u: f32) -> u32 {
    let total: f32 = weights.iter().sum();
    let target = u * total;
    let mut cumulative = 0.0;
    let mut last_nonzero = 0;
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            cumulative += w;
            last_nonzero = i;
            if target < cumulative {
                return i as u32;
            }
        }
    }
    // Rounding can leave `target` just above the sum: the last candidate takes it.
    last_nonzero as u32
}

/// Picks tokens from logits according to [`SamplingParams`], with its own random stream.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler; fails on out-of-range parameters.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Ok(Sampler { params, rng })
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::invalid("cannot sample from empty logits"));
        }
        if self.params.is_greedy() {
            return argmax(logits).ok_or_else(|| Error::invalid("no logits"));
        }
        let mut probs = softmax_with_temperature(logits, self.params.temperature);
        if probs.iter().any(|p| !p.is_finite()) {
            return Err(Error::invalid("logits contain NaN or infinity"));
        }
        apply_top_k(&mut probs, self.params.top_k);
        apply_top_p(&mut probs, self.params.top_p);
        Ok(draw(&probs, self.rng.random::<f32>()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]).unwrap(), 1);
    }

    #[test]
    fn bad_parameters_are_rejected() {
        for params in [
            SamplingParams { temperature: -1.0, ..Default::default() },
            SamplingParams { temperature: f32::NAN, ..Default::default() },
            SamplingParams { top_p: 0.0, ..Default::default() },
            SamplingParams { top_p: 1.5, ..Default::default() },
        ] {
            assert!(Sampler::new(params).is_err());
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_sufficient_set() {
        let mut p = vec![0.1, 0.5, 0.3, 0.1];
        apply_top_p(&mut p, 0.75);
        assert_eq!(p, vec![0.0, 0.5, 0.3, 0.0]);
    }
}
