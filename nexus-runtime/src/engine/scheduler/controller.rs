//! The Nexus controller: the split of the SMs between prefill and decode, chosen from the cost
//! model each time a lane starts an iteration while the other has work.
//!
//! As in the paper: one phase is prioritized — prefill while the KV cache is less full than a
//! threshold (70%), so that prompts are admitted, decode above it, so that generations finish
//! and free memory. Starting from the prioritized phase's predicted latency with every SM but a
//! grid step, next to the other phase on that step, SMs are taken from it, a grid step at a time,
//! while its latency next to the other phase (which gets the rest) stays within a slack of that
//! best (1.1 when decode is protected, 1.3 when prefill is). The best is taken next to the other
//! phase because what running beside it costs (shared HBM, power) is paid at every split. A new
//! split is applied only when it moves the decode lane by more than a threshold, so that the
//! split does not flap.
//!
//! Beyond the paper, a decode target can replace the prefill slack: while prefill is protected,
//! decode gets the fewest SMs whose predicted iteration (one token of each sequence: the time
//! between tokens) stays within the target, and prefill the rest, so that prompts get every SM
//! that the objective on the time between tokens leaves them — but never less than half (by
//! default): a target that only most of the GPU meets is missed rather than paid for with a
//! prefill iteration crawling on a few SMs. A second, looser target may hold
//! while prompts back up ([`BacklogTarget`]): the time between tokens stays at the tight one
//! while prefill keeps up, and prefill gets the SMs of the loose one when it does not.
//!
//! The controller also learns from what the lanes measure ([`Controller::observe`]): the cost
//! model is fitted on operators timed one by one and on whole steps at a few shapes, and misses a
//! lane's iterations in the run by 10-35% (more for decode beside prefill on few SMs, where it
//! under-predicts). Each decision scales the model's prediction for each lane by the measured /
//! predicted ratio of that lane's recent iterations beside the other at that budget, so that a
//! decode target holds on the times that decode actually takes.

use std::collections::HashMap;

use crate::engine::cost_model::{CostModel, IterationWork, PricedWork};
use crate::model::backend::StepKind;
use crate::{Error, Result};

/// The controller's parameters (the paper's defaults by [`Default`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ControllerConfig {
    /// Prefill is prioritized while the fraction of KV blocks in use is below this.
    pub kv_threshold: f64,
    /// How much slower than on every SM the prioritized decode may get.
    pub decode_slack: f64,
    /// How much slower than on every SM the prioritized prefill may get.
    pub prefill_slack: f64,
    /// Decode budgets are multiples of this (decode graphs are recorded for each).
    pub grid: u32,
    /// A new split is applied only when it moves the decode budget by more than this.
    pub hysteresis: u32,
    /// Seconds a decode iteration may take while prefill is protected: when set, decode gets the
    /// fewest SMs that meet it instead of what the prefill slack leaves (`None`: the paper's rule).
    pub decode_target_s: Option<f64>,
    /// With a decode target: the looser one that holds instead while prompts back up.
    pub backlog_target: Option<BacklogTarget>,
    /// With a decode target, while prefill is protected: the largest share of the SMs decode may
    /// get to meet it. Prefill keeps the rest even when decode then misses the target (beside a
    /// long prefill, a large decode batch can need nearly every SM for a tight target, which
    /// would leave prefill a few SMs for the seconds its iteration then takes).
    pub max_decode_share: f64,
    /// Scale predictions by what the lanes measured ([`Controller::observe`]); `false`: decide
    /// on the cost model alone, as the paper does.
    pub calibrate: bool,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            kv_threshold: 0.7,
            decode_slack: 1.1,
            prefill_slack: 1.3,
            grid: 8,
            hysteresis: 8,
            decode_target_s: None,
            backlog_target: None,
            max_decode_share: 0.5,
            calibrate: true,
        }
    }
}

impl ControllerConfig {
    /// Checks the parameters against a device of `sm_count` SMs.
    pub fn validate(&self, sm_count: u32) -> Result<()> {
        if !(0.0..=1.0).contains(&self.kv_threshold) {
            return Err(Error::invalid(format!("the KV threshold {} must be in [0, 1]", self.kv_threshold)));
        }
        if !(self.decode_slack >= 1.0 && self.prefill_slack >= 1.0) {
            return Err(Error::invalid("the slacks must be at least 1 (a phase is never faster than on every SM)"));
        }
        if self.decode_target_s.is_some_and(|t| !(t.is_finite() && t > 0.0)) {
            return Err(Error::invalid("the decode target must be a positive number of seconds"));
        }
        if let Some(backlog) = self.backlog_target {
            let Some(target) = self.decode_target_s else {
                return Err(Error::invalid("a decode target for a backlog needs a decode target for without one"));
            };
            if !(backlog.decode_s.is_finite() && backlog.decode_s >= target && backlog.tokens > 0) {
                return Err(Error::invalid(format!(
                    "the decode target with a backlog ({} s) must be at least the one without ({target} s), and the \
                     backlog at least one token",
                    backlog.decode_s
                )));
            }
        }
        if !(self.max_decode_share > 0.0 && self.max_decode_share <= 1.0) {
            return Err(Error::invalid(format!(
                "the largest decode share {} must be in (0, 1]",
                self.max_decode_share
            )));
        }
        if self.grid == 0 || 2 * self.grid > sm_count {
            return Err(Error::invalid(format!(
                "the SM grid {} must leave each phase a step of the device's {sm_count} SMs",
                self.grid
            )));
        }
        Ok(())
    }

    /// Every budget the decode lane may get on a device of `sm_count` SMs: the grid's multiples
    /// that leave prefill an SM, and every SM (when prefill has no work).
    pub fn decode_budgets(&self, sm_count: u32) -> Vec<u32> {
        let mut budgets: Vec<u32> = (1..).map(|k| k * self.grid).take_while(|&d| d < sm_count).collect();
        budgets.push(sm_count);
        budgets
    }
}

/// A looser decode target for while prompts back up: prefill's SMs then drain the queue sooner,
/// and the time between tokens stays at the tight target whenever prefill keeps up.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BacklogTarget {
    /// Prompt tokens waiting (in no iteration in flight; the scheduler counts those of a prefill
    /// iteration it is planning) from which prompts count as backed up.
    pub tokens: usize,
    /// Seconds a decode iteration may take then (at least [`ControllerConfig::decode_target_s`]).
    pub decode_s: f64,
}

/// Which phase the last decision protected, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    Prefill,
    Decode,
}

/// A decision: the decode lane's budget (prefill gets the rest) and the predictions behind it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Split {
    pub decode_sms: u32,
    pub priority: Priority,
    /// Predicted seconds of the prefill and decode iterations at this split, each next to the
    /// other.
    pub prefill_s: f64,
    pub decode_s: f64,
}

/// How far off the cost model is in the run: per kind of iteration, whether the other lane ran
/// beside it, and budget, a moving average of ln(measured / predicted) seconds.
#[derive(Clone, Debug, Default)]
struct Calibration {
    /// By `(kind, beside, budget)`; budget 0 holds the average over every budget, used for a
    /// budget not measured yet.
    log_ratios: HashMap<(StepKind, bool, u32), f64>,
}

impl Calibration {
    /// The weight of a new measurement: the average follows the last ~5 iterations.
    const WEIGHT: f64 = 0.2;
    /// The most a prediction is scaled either way (a stalled host or a first slow launch must
    /// not make the controller give a lane everything).
    const MAX_FACTOR: f64 = 2.0;

    fn observe(&mut self, kind: StepKind, beside: bool, budget: u32, ratio: f64) {
        if !(ratio.is_finite() && ratio > 0.0) {
            return;
        }
        let clamped = ratio.ln().clamp(-Self::MAX_FACTOR.ln(), Self::MAX_FACTOR.ln());
        // A budget measured for the first time starts from what `factor` used for it until now
        // (the average over every budget, or none), and moves by the weight like any other: one
        // slow iteration (a stalled host) must not price a budget out of every later decision,
        // which would leave it never measured again.
        let prior = self.log_ratios.get(&(kind, beside, 0)).copied().unwrap_or(0.0);
        for key in [(kind, beside, budget), (kind, beside, 0)] {
            let average = self.log_ratios.entry(key).or_insert(prior);
            *average += Self::WEIGHT * (clamped - *average);
        }
    }

    /// The factor to scale a prediction of `kind` on `budget` SMs by (1 before any measurement).
    fn factor(&self, kind: StepKind, beside: bool, budget: u32) -> f64 {
        let log_ratio =
            self.log_ratios.get(&(kind, beside, budget)).or_else(|| self.log_ratios.get(&(kind, beside, 0)));
        log_ratio.map_or(1.0, |l| l.exp())
    }
}

/// The controller (see the module documentation).
#[derive(Clone, Debug)]
pub struct Controller {
    cost: CostModel,
    config: ControllerConfig,
    /// The decode budget applied last, for the hysteresis.
    applied: Option<u32>,
    /// The decode budgets beside prefill ([`ControllerConfig::decode_budgets`] but every SM).
    shared: Vec<u32>,
    /// With a decode target: the most SMs decode may get beside prefill (the largest budget of
    /// the grid within the largest share, at least the grid's least step).
    most_decode: u32,
    calibration: Calibration,
}

impl Controller {
    /// A controller deciding with `cost` (whose SM count is the device's).
    pub fn new(cost: CostModel, config: ControllerConfig) -> Result<Self> {
        config.validate(cost.sm_count)?;
        let mut shared = config.decode_budgets(cost.sm_count);
        shared.pop();
        let share_sms = (config.max_decode_share * f64::from(cost.sm_count)) as u32;
        let most_decode = shared.iter().copied().take_while(|&d| d <= share_sms).last().unwrap_or(shared[0]);
        Ok(Controller { cost, config, applied: None, shared, most_decode, calibration: Calibration::default() })
    }

    /// Learns from an iteration of `kind` on `budget` SMs (beside the other lane's or alone) that
    /// the cost model predicted to take `predicted` seconds and took `measured`, from launch to
    /// seen done. Later decisions scale their predictions by it, if the configuration says so.
    pub fn observe(&mut self, kind: StepKind, budget: u32, beside: bool, predicted: f64, measured: f64) {
        self.calibration.observe(kind, beside, budget, measured / predicted);
    }

    /// The cost model.
    pub fn cost(&self) -> &CostModel {
        &self.cost
    }

    /// The parameters.
    pub fn config(&self) -> ControllerConfig {
        self.config
    }

    /// Predicted seconds of `prefill` on `prefill_sms` and `decode` on `decode_sms`, each next to
    /// the bytes the other moves (scaled by the calibration, if on).
    fn predict(&self, prefill: &PricedWork, decode: &PricedWork, decode_sms: u32) -> (f64, f64) {
        let prefill_sms = self.cost.sm_count - decode_sms;
        let mut prefill_s = self.cost.priced_seconds_beside(prefill, prefill_sms, Some((decode, decode_sms)));
        let mut decode_s = self.cost.priced_seconds_beside(decode, decode_sms, Some((prefill, prefill_sms)));
        if self.config.calibrate {
            prefill_s *= self.calibration.factor(StepKind::Prefill, true, prefill_sms);
            decode_s *= self.calibration.factor(StepKind::Decode, true, decode_sms);
        }
        (prefill_s, decode_s)
    }

    /// The split for a prefill iteration doing `prefill` and a decode iteration doing `decode`
    /// with `kv_usage` of the cache's blocks in use and `prompts_waiting` prompt tokens waiting (as
    /// [`BacklogTarget::tokens`] counts them); remembers it for the hysteresis.
    pub fn split(
        &mut self,
        prefill: &IterationWork,
        decode: &IterationWork,
        kv_usage: f64,
        prompts_waiting: usize,
    ) -> Split {
        let shared = &self.shared;
        let priority = if kv_usage < self.config.kv_threshold { Priority::Prefill } else { Priority::Decode };
        // The decode budgets from most to least SMs for the prioritized phase: `ranked(0)` is
        // its best, `ranked(shared.len() - 1)` its worst.
        let ranked = |i: usize| match priority {
            Priority::Decode => shared[shared.len() - 1 - i],
            Priority::Prefill => shared[i],
        };
        let (prefill, decode) = (self.cost.priced(prefill), self.cost.priced(decode));
        let target = match self.config.backlog_target {
            Some(backlog) if prompts_waiting >= backlog.tokens => Some(backlog.decode_s),
            _ => self.config.decode_target_s,
        };
        let target = target.filter(|_| priority == Priority::Prefill);
        let protected =
            |(prefill_s, decode_s): (f64, f64)| if priority == Priority::Decode { decode_s } else { prefill_s };
        let slack = if priority == Priority::Decode { self.config.decode_slack } else { self.config.prefill_slack };
        // The prioritized phase's best next to the other: with every SM but the other's least
        // (running beside the other lane costs it what no split saves).
        let best = protected(self.predict(&prefill, &decode, ranked(0)));
        let most_decode = self.most_decode;
        // Whether a split of `decode_sms` keeps the rule: decode within its share and its target,
        // or the prioritized phase within its slack.
        let meets = |decode_sms: u32| match target {
            Some(target) => decode_sms <= most_decode && self.predict(&prefill, &decode, decode_sms).1 <= target,
            None => protected(self.predict(&prefill, &decode, decode_sms)) <= slack * best,
        };
        let mut chosen = match target {
            // The fewest decode SMs that meet the target; the most it may have if none does.
            Some(_) => shared.iter().copied().find(|&d| meets(d)).unwrap_or(most_decode),
            // The furthest from the prioritized phase's best that stays within its slack.
            None => (1..shared.len()).map(ranked).take_while(|&d| meets(d)).last().unwrap_or(ranked(0)),
        };
        // The split applied last stays while it is near and still keeps the rule: the hysteresis
        // stops flapping, never a move the target, its share or the slack needs (with the default
        // of one grid step, it had kept decode on 16 SMs under a 20 ms target that needed 24).
        if let Some(applied) = self.applied.filter(|&a| a.abs_diff(chosen) <= self.config.hysteresis && meets(a)) {
            chosen = applied;
        }
        self.applied = Some(chosen);
        let (prefill_s, decode_s) = self.predict(&prefill, &decode, chosen);
        Split { decode_sms: chosen, priority, prefill_s, decode_s }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::engine::cost_model::tests::llama8b_h200;
    use crate::model::backend::StepKind;

    #[test]
    fn a_protected_decode_keeps_few_sms_and_a_protected_prefill_most() {
        let mut controller = Controller::new(llama8b_h200(), ControllerConfig::default()).unwrap();
        let prefill = IterationWork::of(StepKind::Prefill, [(8192, 0)]);
        let decode = IterationWork::of(StepKind::Decode, (0..64).map(|_| (1, 2048)));
        // Low KV usage: prefill is protected, within 1.3x of its best beside decode (all SMs but
        // the grid's least for decode): decode gets a small share on the grid.
        let low = controller.split(&prefill, &decode, 0.2, 0);
        assert_eq!(low.priority, Priority::Prefill);
        assert!(low.decode_sms.is_multiple_of(8) && low.decode_sms <= 40, "{low:?}");
        let least = ControllerConfig::default().decode_budgets(132)[0];
        let best = llama8b_h200().seconds_beside(&prefill, 132 - least, Some((&decode, least)));
        assert!(low.prefill_s <= 1.3 * best, "{low:?} {best}");
        // High KV usage: decode is protected (memory-bound: it keeps its speed on a minority of
        // the SMs while prefill computes).
        let mut controller = Controller::new(llama8b_h200(), ControllerConfig::default()).unwrap();
        let high = controller.split(&prefill, &decode, 0.9, 0);
        assert_eq!(high.priority, Priority::Decode);
        assert!(high.decode_sms > low.decode_sms && high.decode_sms < 132, "{high:?}");
        assert!(high.decode_s <= 1.1 * llama8b_h200().seconds(&decode, 132, None), "{high:?}");
    }

    #[test]
    fn measured_iterations_scale_the_predictions_a_decode_target_is_held_to() {
        let prefill = IterationWork::of(StepKind::Prefill, [(2048, 0)]);
        let decode = IterationWork::of(StepKind::Decode, (0..16).map(|_| (1, 2048)));
        let config = ControllerConfig { decode_target_s: Some(0.02), hysteresis: 0, ..ControllerConfig::default() };
        let mut controller = Controller::new(llama8b_h200(), config).unwrap();
        let before = controller.split(&prefill, &decode, 0.2, 0);
        // One slow iteration moves the prediction by the average's weight, not all the way: a
        // budget is not priced out of later decisions by a single stall.
        let mut once = controller.clone();
        once.observe(StepKind::Decode, before.decode_sms, true, 0.010, 0.020);
        let factor = |c: &Controller, sms: u32| c.calibration.factor(StepKind::Decode, true, sms);
        assert!((factor(&once, before.decode_sms) - 2f64.powf(0.2)).abs() < 1e-9);
        // Decode beside prefill took 1.8x what the model said, at the budget it got: the target
        // now needs more SMs, and the predictions the split reports are scaled (at every budget,
        // through the average, until one is measured on its own).
        for _ in 0..50 {
            controller.observe(StepKind::Decode, before.decode_sms, true, 0.010, 0.018);
        }
        let after = controller.split(&prefill, &decode, 0.2, 0);
        assert!(after.decode_sms > before.decode_sms, "{before:?} then {after:?}");
        assert!(after.decode_s <= 0.02, "{after:?}");
        let model = llama8b_h200().seconds_beside(&decode, after.decode_sms, Some((&prefill, 132 - after.decode_sms)));
        assert!((after.decode_s / model - 1.8).abs() < 1e-3, "{} vs {model}", after.decode_s);
        // Iterations alone, of prefill, or absurd ratios do not move the decode beside prefill;
        // a wild one is bounded by a factor of 2.
        let mut other = controller.clone();
        other.observe(StepKind::Decode, 132, false, 0.010, 0.001);
        other.observe(StepKind::Prefill, 124, true, 0.010, 0.001);
        other.observe(StepKind::Decode, after.decode_sms, true, 0.0, 0.01);
        other.observe(StepKind::Decode, after.decode_sms, true, 0.01, f64::NAN);
        assert_eq!(other.split(&prefill, &decode, 0.2, 0).decode_sms, after.decode_sms);
        for _ in 0..50 {
            other.observe(StepKind::Decode, after.decode_sms, true, 0.001, 1.0);
        }
        let bounded = other.split(&prefill, &decode, 0.2, 0);
        let model =
            llama8b_h200().seconds_beside(&decode, bounded.decode_sms, Some((&prefill, 132 - bounded.decode_sms)));
        assert!(bounded.decode_s <= 2.0 * model * (1.0 + 1e-9), "{bounded:?} {model}");
        // With the calibration off, the model alone decides.
        let mut plain = Controller::new(llama8b_h200(), ControllerConfig { calibrate: false, ..config }).unwrap();
        for _ in 0..20 {
            plain.observe(StepKind::Decode, before.decode_sms, true, 0.010, 0.018);
        }
        assert_eq!(plain.split(&prefill, &decode, 0.2, 0), before);
    }

    #[test]
    fn a_decode_target_gives_decode_the_fewest_sms_that_meet_it() {
        let prefill = IterationWork::of(StepKind::Prefill, [(8192, 0)]);
        let decode = IterationWork::of(StepKind::Decode, (0..64).map(|_| (1, 2048)));
        let cost = llama8b_h200();
        let with_target = |target: f64| {
            let config = ControllerConfig { decode_target_s: Some(target), ..ControllerConfig::default() };
            Controller::new(cost.clone(), config).unwrap().split(&prefill, &decode, 0.2, 0)
        };
        let decode_at = |sms: u32| cost.seconds_beside(&decode, sms, Some((&prefill, 132 - sms)));
        for target in [0.012, 0.02, 0.04] {
            let split = with_target(target);
            assert!(split.decode_s <= target && decode_at(split.decode_sms) <= target, "{target}: {split:?}");
            assert!(split.decode_sms == 8 || decode_at(split.decode_sms - 8) > target, "{target}: {split:?}");
        }
        // A looser target leaves prefill more SMs.
        assert!(with_target(0.04).decode_sms < with_target(0.012).decode_sms);
        // A target no split meets gives decode the largest share it may have beside prefill:
        // half the SMs by default, every SM the grid shares with a share of 1.
        assert_eq!(with_target(1e-4).decode_sms, 64);
        let whole =
            ControllerConfig { decode_target_s: Some(1e-4), max_decode_share: 1.0, ..ControllerConfig::default() };
        assert_eq!(Controller::new(cost.clone(), whole).unwrap().split(&prefill, &decode, 0.2, 0).decode_sms, 128);
        // A target met only above half the SMs: decode gets half and misses it, prefill keeps the
        // rest; with a share of 1, decode gets what meets it.
        let target = decode_at(96);
        assert!(decode_at(64) > target, "{} {target}", decode_at(64));
        let half = with_target(target);
        assert!(half.decode_sms == 64 && half.decode_s > target, "{half:?}");
        let whole =
            ControllerConfig { decode_target_s: Some(target), max_decode_share: 1.0, ..ControllerConfig::default() };
        let met = Controller::new(cost.clone(), whole).unwrap().split(&prefill, &decode, 0.2, 0);
        assert!(met.decode_sms > 64 && met.decode_sms <= 96 && met.decode_s <= target, "{met:?}");
        // A share below the grid's least step still leaves decode that step.
        let least =
            ControllerConfig { decode_target_s: Some(1e-4), max_decode_share: 0.01, ..ControllerConfig::default() };
        assert_eq!(Controller::new(cost.clone(), least).unwrap().split(&prefill, &decode, 0.2, 0).decode_sms, 8);
        let bad = ControllerConfig { max_decode_share: 0.0, ..ControllerConfig::default() };
        assert!(Controller::new(cost.clone(), bad).is_err());
        // Above the KV threshold decode is protected by its slack, target or not.
        let config = ControllerConfig { decode_target_s: Some(0.04), ..ControllerConfig::default() };
        let high = Controller::new(cost.clone(), config).unwrap().split(&prefill, &decode, 0.9, 0);
        assert_eq!(
            high,
            Controller::new(cost.clone(), ControllerConfig::default()).unwrap().split(&prefill, &decode, 0.9, 0)
        );
        let bad = ControllerConfig { decode_target_s: Some(-1.0), ..ControllerConfig::default() };
        assert!(Controller::new(cost, bad).is_err());
    }

    #[test]
    fn a_backlog_loosens_the_decode_target_to_its_own() {
        let prefill = IterationWork::of(StepKind::Prefill, [(8192, 0)]);
        let decode = IterationWork::of(StepKind::Decode, (0..64).map(|_| (1, 2048)));
        let target = |decode_target_s: f64| ControllerConfig {
            decode_target_s: Some(decode_target_s),
            hysteresis: 0,
            ..ControllerConfig::default()
        };
        let backlog = BacklogTarget { tokens: 8192, decode_s: 0.04 };
        let config = ControllerConfig { backlog_target: Some(backlog), ..target(0.012) };
        let mut controller = Controller::new(llama8b_h200(), config).unwrap();
        let alone = |config| Controller::new(llama8b_h200(), config).unwrap().split(&prefill, &decode, 0.2, 0);
        // Fewer prompt tokens waiting than the backlog: the tight target; from it on, the loose
        // one (fewer decode SMs); and back.
        let tight = controller.split(&prefill, &decode, 0.2, 8191);
        assert_eq!(tight, alone(target(0.012)));
        let loose = controller.split(&prefill, &decode, 0.2, 8192);
        assert_eq!(loose, alone(target(0.04)));
        assert!(loose.decode_sms < tight.decode_sms, "{tight:?} then {loose:?}");
        assert_eq!(controller.split(&prefill, &decode, 0.2, 100), tight);
        // Decode protected (a full cache): the slack, backlog or not.
        let protected = controller.split(&prefill, &decode, 0.9, 100_000);
        let slack = ControllerConfig { hysteresis: 0, ..ControllerConfig::default() };
        assert_eq!(protected, Controller::new(llama8b_h200(), slack).unwrap().split(&prefill, &decode, 0.9, 0));
        // A backlog target needs a target below it.
        let looser = |decode_s| ControllerConfig {
            backlog_target: Some(BacklogTarget { tokens: 1, decode_s }),
            ..target(0.012)
        };
        assert!(Controller::new(llama8b_h200(), looser(0.01)).is_err());
        assert!(Controller::new(llama8b_h200(), looser(f64::NAN)).is_err());
        let alone_backlog = ControllerConfig { decode_target_s: None, ..looser(0.02) };
        assert!(Controller::new(llama8b_h200(), alone_backlog).is_err());
        let no_tokens =
            ControllerConfig { backlog_target: Some(BacklogTarget { tokens: 0, decode_s: 0.02 }), ..target(0.012) };
        assert!(Controller::new(llama8b_h200(), no_tokens).is_err());
    }

    #[test]
    fn the_split_moves_only_past_the_hysteresis() {
        let config = ControllerConfig { hysteresis: 16, ..ControllerConfig::default() };
        let mut controller = Controller::new(llama8b_h200(), config).unwrap();
        let prefill = IterationWork::of(StepKind::Prefill, [(8192, 0)]);
        let first = controller.split(&prefill, &IterationWork::of(StepKind::Decode, [(1, 512)]), 0.2, 0);
        // A slightly larger decode batch would move the split by a step or two: it stays.
        let small = IterationWork::of(StepKind::Decode, (0..4).map(|_| (1, 512)));
        assert_eq!(controller.split(&prefill, &small, 0.2, 0).decode_sms, first.decode_sms);
        // Past the KV threshold the protected phase changes and the split moves far.
        let big = IterationWork::of(StepKind::Decode, (0..128).map(|_| (1, 4096)));
        assert!(controller.split(&prefill, &big, 0.95, 0).decode_sms > first.decode_sms + 16);
    }

    #[test]
    fn the_hysteresis_never_keeps_a_split_that_misses_the_decode_target() {
        let target = 0.02;
        let config = ControllerConfig { decode_target_s: Some(target), ..ControllerConfig::default() };
        assert_eq!(config.hysteresis, config.grid, "the defaults this guards");
        let prefill = IterationWork::of(StepKind::Prefill, [(2048, 0)]);
        let decode = |batch: usize| IterationWork::of(StepKind::Decode, (0..batch).map(|_| (1, 2048)));
        let mut controller = Controller::new(llama8b_h200(), config).unwrap();
        let first = controller.split(&prefill, &decode(8), 0.2, 0);
        assert!(first.decode_s <= target, "{first:?}");
        // The smallest batch that no longer fits the target on those SMs: the fewest that meet it
        // are one grid step more, inside the hysteresis, and the split still moves there.
        let fresh = |batch: usize| {
            Controller::new(llama8b_h200(), config).unwrap().split(&prefill, &decode(batch), 0.2, 0).decode_sms
        };
        let batch = (9..512).find(|&b| fresh(b) > first.decode_sms).unwrap();
        let needed = fresh(batch);
        assert_eq!(needed, first.decode_sms + config.grid, "batch {batch}");
        let moved = controller.split(&prefill, &decode(batch), 0.2, 0);
        assert_eq!(moved.decode_sms, needed, "{first:?} then {moved:?}");
        assert!(moved.decode_s <= target, "{moved:?}");
        // Back to the small batch: one step fewer would meet the target, and the split stays.
        assert_eq!(controller.split(&prefill, &decode(8), 0.2, 0).decode_sms, needed);
    }

    #[test]
    fn bad_parameters_are_refused_and_budgets_are_on_the_grid() {
        let config = ControllerConfig::default();
        assert_eq!(config.decode_budgets(132), (1..=16).map(|k| 8 * k).chain([132]).collect::<Vec<_>>());
        for bad in [
            ControllerConfig { kv_threshold: 1.5, ..config },
            ControllerConfig { decode_slack: 0.9, ..config },
            ControllerConfig { grid: 0, ..config },
            ControllerConfig { grid: 80, ..config },
        ] {
            assert!(Controller::new(llama8b_h200(), bad).is_err(), "{bad:?}");
        }
    }
}
