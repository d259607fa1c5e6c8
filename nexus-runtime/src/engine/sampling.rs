//! Token sampling: logit bias, repetition, frequency and presence penalties, greedy, temperature,
//! min-p, top-k, top-p, with a seed for reproducibility.
//!
//! The filters are pure functions over a probability vector so that they can be tested on their
//! own; [`Sampler`] chains them in vLLM's order: logit bias → penalties → logits / temperature →
//! softmax → min-p → top-k → top-p → draw.

use std::collections::{HashMap, HashSet};

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
    /// Penalties on tokens already seen; none by default.
    pub penalties: Penalties,
    /// Added to the logits of these tokens before anything else (OpenAI's `logit_bias`), each in
    /// [-100, 100]; ids beyond the logits are ignored (callers check them against the vocabulary).
    pub logit_bias: Vec<(u32, f32)>,
    /// Drop the tokens less likely than `min_p` times the most likely one (after temperature),
    /// in [0, 1]; 0 keeps all.
    pub min_p: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
            penalties: Penalties::default(),
            logit_bias: Vec::new(),
            min_p: 0.0,
        }
    }
}

/// The largest bias `logit_bias` may add or take away, as OpenAI allows.
pub const MAX_LOGIT_BIAS: f32 = 100.0;

/// Penalties on the logits of tokens already seen, as OpenAI and vLLM define them: for a token
/// that appeared `c` times in the output so far, `logit -= frequency · c + presence · [c > 0]`;
/// for a token of the prompt or the output, a positive logit is divided by `repetition`, a
/// negative one multiplied by it (applied first).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Penalties {
    /// In [-2, 2]; 0 is off.
    pub presence: f32,
    /// In [-2, 2]; 0 is off.
    pub frequency: f32,
    /// In (0, 2]; 1 is off, above 1 discourages repeats.
    pub repetition: f32,
}

impl Default for Penalties {
    fn default() -> Self {
        Penalties { presence: 0.0, frequency: 0.0, repetition: 1.0 }
    }
}

impl Penalties {
    /// Whether any penalty changes the logits.
    pub fn is_active(&self) -> bool {
        self.presence != 0.0 || self.frequency != 0.0 || self.repetition != 1.0
    }

    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [("presence_penalty", self.presence), ("frequency_penalty", self.frequency)] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(Error::invalid(format!("{name} {v} must be in [-2, 2]")));
            }
        }
        if !(self.repetition > 0.0 && self.repetition <= 2.0) {
            return Err(Error::invalid(format!("repetition_penalty {} must be in (0, 2]", self.repetition)));
        }
        Ok(())
    }
}

/// Applies `penalties` to `logits` given the prompt's tokens and the output's token counts.
pub fn apply_penalties(
    logits: &mut [f32],
    penalties: &Penalties,
    prompt: &HashSet<u32>,
    output_counts: &HashMap<u32, u32>,
) {
    if penalties.repetition != 1.0 {
        // Every token seen, once: the prompt's, then the output's that the prompt lacks.
        let seen = prompt.iter().chain(output_counts.keys().filter(|t| !prompt.contains(t)));
        for &t in seen {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l > 0.0 { *l / penalties.repetition } else { *l * penalties.repetition };
            }
        }
    }
    for (&t, &count) in output_counts {
        if let Some(l) = logits.get_mut(t as usize) {
            *l -= penalties.frequency * count as f32 + if count > 0 { penalties.presence } else { 0.0 };
        }
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

    /// Checks the ranges: temperature finite and >= 0, top_p in (0, 1], min_p in [0, 1], each
    /// logit bias in [-100, 100].
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::invalid(format!("temperature {} must be a finite number >= 0", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid(format!("top_p {} must be in (0, 1]", self.top_p)));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(Error::invalid(format!("min_p {} must be in [0, 1]", self.min_p)));
        }
        if let Some(&(token, bias)) =
            self.logit_bias.iter().find(|(_, b)| !(-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(b))
        {
            return Err(Error::invalid(format!("logit_bias {bias} of token {token} must be in [-100, 100]")));
        }
        self.penalties.validate()
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

/// Adds each `(token, bias)` of `biases` to the token's logit; tokens beyond `logits` are skipped.
pub fn apply_logit_bias(logits: &mut [f32], biases: &[(u32, f32)]) {
    for &(token, bias) in biases {
        if let Some(l) = logits.get_mut(token as usize) {
            *l += bias;
        }
    }
}

/// Zeroes the tokens less likely than `min_p` times the most likely one; `min_p = 0` keeps all.
/// The most likely token always survives.
pub fn apply_min_p(probs: &mut [f32], min_p: f32) {
    if min_p <= 0.0 {
        return;
    }
    let threshold = min_p * probs.iter().copied().fold(0.0, f32::max);
    for p in probs.iter_mut().filter(|p| **p < threshold) {
        *p = 0.0;
    }
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

/// A token's log-probability and the most likely alternatives at its position.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    /// The natural log of the chosen token's probability.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first (ties by id).
    pub top: Vec<(u32, f32)>,
}

/// The log-softmax of `logits` at `token`, and its `top` most likely entries.
pub fn token_logprobs(logits: &[f32], token: u32, top: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let log_z = max as f64 + sum.ln();
    let logprob = |t: usize| (logits[t] as f64 - log_z) as f32;
    let mut order: Vec<usize> = (0..logits.len()).collect();
    let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    let top = top.min(logits.len());
    if top > 0 && top < order.len() {
        order.select_nth_unstable_by(top - 1, by_logit);
    }
    order.truncate(top);
    order.sort_by(by_logit);
    TokenLogprobs {
        logprob: logits.get(token as usize).map_or(f32::NEG_INFINITY, |_| logprob(token as usize)),
        top: order.into_iter().map(|t| (t as u32, logprob(t))).collect(),
    }
}

/// Picks tokens for one sequence according to [`SamplingParams`], with its own random stream and,
/// for the penalties, what the sequence has seen.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// The prompt's tokens (kept only under a repetition penalty).
    prompt: HashSet<u32>,
    /// How often each token was sampled so far (kept only under a penalty).
    output_counts: HashMap<u32, u32>,
}

impl Sampler {
    /// A sampler for a sequence that starts with `prompt`; fails on out-of-range parameters.
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Result<Self> {
        params.validate()?;
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        let prompt = if params.penalties.repetition != 1.0 { prompt.iter().copied().collect() } else { HashSet::new() };
        Ok(Sampler { params, rng, prompt, output_counts: HashMap::new() })
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether picking needs the logits themselves, not only their argmax (which a device can
    /// compute without copying them out): when drawing, under a penalty or a logit bias.
    pub fn needs_logits(&self) -> bool {
        !self.params.is_greedy() || self.params.penalties.is_active() || !self.params.logit_bias.is_empty()
    }

    /// Picks the next token from one row of logits and remembers it for the penalties.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::invalid("cannot sample from empty logits"));
        }
        let adjusted;
        let logits = if self.params.penalties.is_active() || !self.params.logit_bias.is_empty() {
            let mut l = logits.to_vec();
            apply_logit_bias(&mut l, &self.params.logit_bias);
            apply_penalties(&mut l, &self.params.penalties, &self.prompt, &self.output_counts);
            adjusted = l;
            &adjusted[..]
        } else {
            logits
        };
        let token = self.pick(logits)?;
        if self.params.penalties.is_active() {
            *self.output_counts.entry(token).or_insert(0) += 1;
        }
        Ok(token)
    }

    fn pick(&mut self, logits: &[f32]) -> Result<u32> {
        if self.params.is_greedy() {
            return argmax(logits).ok_or_else(|| Error::invalid("no logits"));
        }
        let mut probs = softmax_with_temperature(logits, self.params.temperature);
        if probs.iter().any(|p| !p.is_finite()) {
            return Err(Error::invalid("logits contain NaN or infinity"));
        }
        apply_min_p(&mut probs, self.params.min_p);
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
        let mut s = Sampler::new(SamplingParams::greedy(), &[]).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]).unwrap(), 1);
    }

    #[test]
    fn logprobs_are_the_log_softmax_with_the_top_alternatives() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let lp = token_logprobs(&logits, 2, 3);
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        let want = |t: usize| ((logits[t] as f64).exp() / z).ln() as f32;
        assert!((lp.logprob - want(2)).abs() < 1e-6);
        // Most likely first, ties by id.
        let ids: Vec<u32> = lp.top.iter().map(|&(t, _)| t).collect();
        assert_eq!(ids, vec![1, 3, 2]);
        assert!(lp.top.iter().all(|&(t, l)| (l - want(t as usize)).abs() < 1e-6));
        assert!(token_logprobs(&logits, 0, 0).top.is_empty());
        assert_eq!(token_logprobs(&logits, 0, 10).top.len(), 4);
    }

    #[test]
    fn penalties_follow_the_openai_and_vllm_formulas() {
        let prompt: HashSet<u32> = [0, 3].into();
        let counts: HashMap<u32, u32> = [(1, 3), (3, 1)].into();
        let mut logits = vec![2.0, 2.0, 2.0, -2.0, 2.0];
        let p = Penalties { presence: 0.5, frequency: 0.25, repetition: 2.0 };
        apply_penalties(&mut logits, &p, &prompt, &counts);
        // 0: prompt only, repetition: 2 / 2. 1: output x3: 2 / 2 - 0.25 * 3 - 0.5. 2: unseen.
        // 3: prompt and output x1, repetition once (negative: x2), then -0.25 - 0.5. 4: unseen.
        assert_eq!(logits, vec![1.0, 1.0 - 0.75 - 0.5, 2.0, -4.0 - 0.25 - 0.5, 2.0]);
    }

    #[test]
    fn a_frequency_penalty_moves_greedy_off_a_repeated_token() {
        let params = SamplingParams {
            penalties: Penalties { frequency: 1.0, ..Penalties::default() },
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(params, &[7]).unwrap();
        assert!(s.needs_logits());
        let logits = [0.0, 2.5, 2.0];
        // 1 leads by 0.5 until it has been picked once (2.5 - 1 < 2), then 2 until it has too.
        let picks: Vec<u32> = (0..4).map(|_| s.sample(&logits).unwrap()).collect();
        assert_eq!(picks, vec![1, 2, 1, 2]);
        // Without penalties greedy needs only the argmax.
        assert!(!Sampler::new(SamplingParams::greedy(), &[]).unwrap().needs_logits());
    }

    #[test]
    fn bad_parameters_are_rejected() {
        for params in [
            SamplingParams { temperature: -1.0, ..Default::default() },
            SamplingParams { temperature: f32::NAN, ..Default::default() },
            SamplingParams { top_p: 0.0, ..Default::default() },
            SamplingParams { top_p: 1.5, ..Default::default() },
            SamplingParams { penalties: Penalties { presence: 2.5, ..Default::default() }, ..Default::default() },
            SamplingParams { penalties: Penalties { frequency: -3.0, ..Default::default() }, ..Default::default() },
            SamplingParams { penalties: Penalties { repetition: 0.0, ..Default::default() }, ..Default::default() },
            SamplingParams {
                penalties: Penalties { repetition: f32::NAN, ..Default::default() },
                ..Default::default()
            },
            SamplingParams { min_p: -0.1, ..Default::default() },
            SamplingParams { min_p: 1.5, ..Default::default() },
            SamplingParams { min_p: f32::NAN, ..Default::default() },
            SamplingParams { logit_bias: vec![(3, 100.5)], ..Default::default() },
            SamplingParams { logit_bias: vec![(3, f32::NAN)], ..Default::default() },
        ] {
            assert!(Sampler::new(params, &[]).is_err());
        }
    }

    #[test]
    fn a_logit_bias_moves_greedy_and_needs_the_logits() {
        let params = SamplingParams { logit_bias: vec![(2, 1.0), (0, -5.0), (99, 100.0)], ..SamplingParams::greedy() };
        let mut s = Sampler::new(params, &[]).unwrap();
        assert!(s.needs_logits());
        // 2 overtakes 1 by 0.5; the bias of a token beyond the logits is ignored.
        assert_eq!(s.sample(&[3.0, 2.5, 2.0]).unwrap(), 2);
        let mut logits = vec![3.0, 2.5, 2.0];
        apply_logit_bias(&mut logits, &[(2, 1.0), (0, -5.0), (99, 1.0)]);
        assert_eq!(logits, vec![-2.0, 2.5, 3.0]);
    }

    #[test]
    fn min_p_keeps_the_tokens_near_the_most_likely_one() {
        let mut p = vec![0.1, 0.5, 0.3, 0.1];
        apply_min_p(&mut p, 0.5);
        assert_eq!(p, vec![0.0, 0.5, 0.3, 0.0]);
        let mut p = vec![0.1, 0.5, 0.3, 0.1];
        apply_min_p(&mut p, 0.0);
        assert_eq!(p, vec![0.1, 0.5, 0.3, 0.1]);
        // min_p = 1 keeps only the most likely token: drawing is greedy, whatever the seed.
        for seed in 0..20 {
            let params = SamplingParams { temperature: 1.0, min_p: 1.0, seed: Some(seed), ..Default::default() };
            assert_eq!(Sampler::new(params, &[]).unwrap().sample(&[1.0, 1.5, 1.4, 0.0]).unwrap(), 1);
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_sufficient_set() {
        let mut p = vec![0.1, 0.5, 0.3, 0.1];
        apply_top_p(&mut p, 0.75);
        assert_eq!(p, vec![0.0, 0.5, 0.3, 0.0]);
    }
}
