//! A device that computes nothing: each step takes the time a cost model predicts for it, so that
//! the engine and its schedulers can run a whole serving trace on a model and GPU they do not
//! have (a profile made on that GPU by `nexus profile`).
//!
//! Only shapes flow through the operators; a step's logits are zeros (or token 0 for a greedy
//! readback). Steps take time as processor sharing does: a step launched in a phase has a fraction
//! of its work left, which falls at the rate its cost model gives beside whatever the other phase
//! runs at that moment, and the rates change whenever a step starts or ends. So a decode step
//! that starts alone and is joined by a prefill halfway finishes later than alone and sooner than
//! beside it throughout. Time is the host's clock by default: a simulated run takes as long as the
//! run it stands for, with the engine's own host time in it, and the host time of launching a step
//! on the GPU taken from the engine thread after each step starts, as a real launch takes it while
//! the first kernels already run ([`Simulation`]). Or the device keeps a virtual clock
//! ([`SimulatedTime::Virtual`]): it moves only by the launches' host time and the steps' own, so a
//! run takes a fraction of the time it stands for and comes out the same every time, without the
//! engine's planning time (microseconds a step) in it. A step beside the other lane's may also be
//! made slower than the cost model says, by a factor per kind: what a profile misses in a run
//! (the controller then has something to learn, as on the GPU). And the device may let a step in
//! flight take a new budget at once ([`Backend::resize_in_flight`]), as one whose kernels read
//! their budget when they start would from its next kernel: what such kernels would be worth
//! to the schedulers, before they exist.
//!
//! ```
//! use nexus_runtime::engine::cost_model::IterationWork;
//! use nexus_runtime::engine::profile::SavedProfile;
//! use nexus_runtime::model::backend::{Backend, StepKind};
//! use nexus_runtime::model::simulated::{SimulatedBackend, Simulation};
//!
//! # fn main() -> nexus_runtime::Result<()> {
//! # let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
//! let profile = SavedProfile::read(&root.join("bench-results/nexus-vs-chunked-h200/llama-3.1-8b-r11-profile.json"))?;
//! let device = SimulatedBackend::new(profile.cost_model.clone(), &profile.device, Simulation::default())?;
//! assert_eq!(device.sm_count(), 132);
//! // A decode step of 64 sequences over 2048 cached tokens each takes what the profile predicts.
//! let step = IterationWork::of(StepKind::Decode, (0..64).map(|_| (1, 2048)));
//! assert!(device.step_seconds(&step, 132, None) > 0.005);
//! # Ok(())
//! # }
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nexus_kernels::{PagedKvLayout, QkvLayout, RopeConfig};

use crate::engine::cost_model::{CostModel, IterationWork};
use crate::model::backend::{Backend, HostLogits, LogitsReadback, OpTime, StepInput, StepKind, check_budget};
use crate::weights::gguf::HostTensor;
use crate::{Error, Result};

/// The shape of a weight or an activation: all the simulated device keeps of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape(pub Vec<usize>);

impl Shape {
    fn matrix(rows: usize, cols: usize) -> Self {
        Shape(vec![rows, cols])
    }

    fn rows(&self) -> usize {
        self.0.first().copied().unwrap_or(0)
    }

    fn cols(&self) -> usize {
        self.0.get(1).copied().unwrap_or(0)
    }
}

/// A phase of the simulated device: its budget, and the work of the step it prepared last (the
/// one its next logits readback launches).
#[derive(Debug)]
pub struct SimulatedPhase {
    id: usize,
    budget: u32,
    prepared: Mutex<Option<IterationWork>>,
}

/// A step of the simulated device: its work, as the cost model prices it, and its logit rows.
#[derive(Clone, Copy, Debug)]
pub struct SimulatedStep {
    work: IterationWork,
    logit_rows: usize,
}

/// A launched step's logits: which step, and what to hand back once it is done.
#[derive(Debug)]
pub struct SimulatedPending {
    id: u64,
    rows: usize,
    vocab: usize,
    how: LogitsReadback,
}

/// A step in flight on the simulated device.
#[derive(Clone, Copy, Debug)]
struct Running {
    id: u64,
    phase: usize,
    work: IterationWork,
    budget: u32,
    /// The fraction of the step's work left at `since`.
    left: f64,
    since: Instant,
    /// Seconds the whole step takes beside what runs now.
    seconds: f64,
}

impl Running {
    fn finish(&self) -> Instant {
        self.since + Duration::from_secs_f64(self.left * self.seconds)
    }
}

/// The steps in flight, and the time when the device keeps its own.
#[derive(Debug, Default)]
struct Clock {
    next_id: u64,
    running: Vec<Running>,
    /// Now on the virtual clock ([`SimulatedTime::Virtual`]); `None` on the host's.
    virtual_now: Option<Instant>,
}

impl Clock {
    /// Now: on the virtual clock, or the host's.
    fn time(&self) -> Instant {
        self.virtual_now.unwrap_or_else(Instant::now)
    }

    /// Moves the virtual clock on to `instant` (not back); the host's clock moves by itself.
    fn move_to(&mut self, instant: Instant) {
        if let Some(now) = &mut self.virtual_now {
            *now = (*now).max(instant);
        }
    }

    /// Moves every step in flight to `now`: those whose work runs out by then are done, each at
    /// its own time, and the rest take the rates of what is left beside them. Returns the steps
    /// done, in the order they ended.
    fn advance(&mut self, now: Instant, cost: &Priced) -> Vec<u64> {
        let mut done = Vec::new();
        loop {
            let Some(first) = self.running.iter().min_by_key(|r| r.finish()).copied() else { return done };
            let until = first.finish().min(now);
            for r in &mut self.running {
                let elapsed = until.saturating_duration_since(r.since).as_secs_f64();
                r.left = (r.left - elapsed / r.seconds).max(0.0);
                r.since = until;
            }
            if first.finish() > now {
                return done;
            }
            self.running.retain(|r| r.id != first.id);
            done.push(first.id);
            self.reprice(cost);
        }
    }

    /// Launches `work` in `phase` on `budget` SMs at `now` (the clock already moved to it).
    fn launch(&mut self, phase: usize, work: IterationWork, budget: u32, now: Instant, cost: &Priced) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.running.push(Running { id, phase, work, budget, left: 1.0, since: now, seconds: 0.0 });
        self.reprice(cost);
        id
    }

    /// Gives `phase`'s step in flight, if any, `budget` SMs from `now` on (the clock already
    /// moved to it).
    fn resize(&mut self, phase: usize, budget: u32, cost: &Priced) {
        if let Some(step) = self.running.iter_mut().find(|r| r.phase == phase) {
            step.budget = budget;
            self.reprice(cost);
        }
    }

    /// Prices every step in flight beside the others' (at most one other: one step per phase,
    /// two phases at once).
    fn reprice(&mut self, cost: &Priced) {
        let snapshot = self.running.clone();
        for r in &mut self.running {
            let other = snapshot.iter().find(|o| o.phase != r.phase).map(|o| (&o.work, o.budget));
            // A step the model prices at nothing still ends after a nanosecond, in order.
            r.seconds = cost.seconds(&r.work, r.budget, other).max(1e-9);
        }
    }
}

/// How the simulated device departs from its cost model, by step kind.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Simulation {
    /// Host time the engine thread spends launching a step on the GPU: what the CUDA backend's
    /// launches (one kernel at a time for a prefill step, a graph replay for a decode step) and
    /// its logits readback cost the thread that also plans and launches the other lane.
    pub prefill_launch: Duration,
    pub decode_launch: Duration,
    /// Factors (at least 1) on a step's time while the other lane's runs beside it.
    pub prefill_beside: f64,
    pub decode_beside: f64,
    /// Whether a step in flight may take a new budget ([`Backend::resize_in_flight`]).
    pub resize_in_flight: bool,
    /// The clock the device keeps.
    pub time: SimulatedTime,
}

/// The clock of a simulated device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SimulatedTime {
    /// The host's: a run takes as long as the run it stands for, the engine's host time included.
    #[default]
    Host,
    /// The device's own, which moves only by the steps and their launches' host time: the device
    /// waits by moving it on ([`Backend::sleep_until`], [`Backend::idle`]). For a replay of a
    /// trace in the engine's own thread (`nexus bench`), not for a server answering clients.
    Virtual,
}

impl Default for Simulation {
    /// The cost model exactly, and free launches.
    fn default() -> Self {
        Simulation {
            prefill_launch: Duration::ZERO,
            decode_launch: Duration::ZERO,
            prefill_beside: 1.0,
            decode_beside: 1.0,
            resize_in_flight: false,
            time: SimulatedTime::Host,
        }
    }
}

/// The cost model and the factors beside the other lane: what a step takes on the device.
#[derive(Debug)]
struct Priced {
    cost: CostModel,
    simulation: Simulation,
}

impl Priced {
    fn seconds(&self, work: &IterationWork, sms: u32, other: Option<(&IterationWork, u32)>) -> f64 {
        let beside = match (other, work.kind) {
            (None, _) => 1.0,
            (Some(_), StepKind::Prefill) => self.simulation.prefill_beside,
            (Some(_), StepKind::Decode) => self.simulation.decode_beside,
        };
        beside * self.cost.seconds_beside(work, sms, other)
    }
}

/// The simulated device (see the module documentation).
#[derive(Debug)]
pub struct SimulatedBackend {
    priced: Priced,
    device: String,
    clock: Mutex<Clock>,
    phases: AtomicUsize,
}

impl SimulatedBackend {
    /// A device whose steps take what `cost` predicts, departing from it as `simulation` says,
    /// reporting itself as `device` (the GPU the cost model was made on), with the cost model's
    /// SM count. Fails on a factor below 1 or not a number.
    pub fn new(cost: CostModel, device: &str, simulation: Simulation) -> Result<Self> {
        if !(simulation.prefill_beside >= 1.0 && simulation.decode_beside >= 1.0) {
            return Err(Error::invalid(
                "a simulated step is at least as slow beside the other lane as its cost model says",
            ));
        }
        let virtual_now = (simulation.time == SimulatedTime::Virtual).then(Instant::now);
        Ok(SimulatedBackend {
            priced: Priced { cost, simulation },
            device: device.to_owned(),
            clock: Mutex::new(Clock { virtual_now, ..Clock::default() }),
            phases: AtomicUsize::new(0),
        })
    }

    /// The seconds a step doing `work` on `sms` SMs takes, beside the other phase's step doing
    /// `other`'s work on its SMs throughout (`None`: alone).
    pub fn step_seconds(&self, work: &IterationWork, sms: u32, other: Option<(&IterationWork, u32)>) -> f64 {
        self.priced.seconds(work, sms, other)
    }

    fn clock(&self) -> MutexGuard<'_, Clock> {
        self.clock.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The steps in flight moved to now.
    fn advanced(&self) -> MutexGuard<'_, Clock> {
        let mut clock = self.clock();
        let now = clock.time();
        clock.advance(now, &self.priced);
        clock
    }

    /// Waits until the steps in flight that `which` picks are done (at once if none is).
    fn wait_for(&self, which: impl Fn(&Running) -> bool) {
        loop {
            let finish = self.advanced().running.iter().filter(|r| which(r)).map(Running::finish).max();
            let Some(finish) = finish else { return };
            self.sleep_until(finish);
        }
    }
}

impl Backend for SimulatedBackend {
    type Weight = Shape;
    type Activation = Shape;
    type KvPool = PagedKvLayout;
    type Step = SimulatedStep;
    type Phase = SimulatedPhase;
    type Pending = SimulatedPending;

    fn sm_count(&self) -> u32 {
        self.priced.cost.sm_count
    }

    fn device_name(&self) -> String {
        self.device.clone()
    }

    fn new_phase(&self) -> Result<SimulatedPhase> {
        let id = self.phases.fetch_add(1, Ordering::Relaxed);
        Ok(SimulatedPhase { id, budget: self.priced.cost.sm_count, prepared: Mutex::new(None) })
    }

    fn set_budget(&self, phase: &mut SimulatedPhase, sms: u32) -> Result<()> {
        check_budget(sms, self.priced.cost.sm_count)?;
        phase.budget = sms;
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        self.wait_for(|_| true);
        Ok(())
    }

    fn resizes_in_flight(&self) -> bool {
        self.priced.simulation.resize_in_flight
    }

    fn resize_in_flight(&self, phase: &SimulatedPhase, sms: u32) -> Result<()> {
        if !self.resizes_in_flight() {
            return Err(Error::invalid("this simulated device keeps a step's budget until it ends"));
        }
        check_budget(sms, self.priced.cost.sm_count)?;
        // A step may have ended on the device before the engine has seen it end: as on a GPU,
        // there is then nothing left to resize.
        self.advanced().resize(phase.id, sms, &self.priced);
        Ok(())
    }

    fn upload(&self, tensor: HostTensor) -> Result<Shape> {
        Ok(Shape(tensor.shape))
    }

    fn random_weight(&self, shape: Vec<usize>, _seed: u64, _mean: f32, _spread: f32) -> Result<Shape> {
        Ok(Shape(shape))
    }

    fn alloc_kv_pool(&self, layout: PagedKvLayout) -> Result<PagedKvLayout> {
        Ok(layout)
    }

    fn prepare(&self, phase: &SimulatedPhase, step: &StepInput) -> Result<SimulatedStep> {
        step.validate()?;
        let chunks = step.q_indptr.windows(2).zip(&step.kv_lens).map(|(q, &kv)| {
            let new = (q[1] - q[0]) as usize;
            (new, (kv as usize).saturating_sub(new))
        });
        let work = IterationWork::of(step.kind, chunks);
        *phase.prepared.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(work);
        Ok(SimulatedStep { work, logit_rows: step.logit_rows.len() })
    }

    fn embedding(&self, _phase: &SimulatedPhase, table: &Shape, step: &SimulatedStep) -> Result<Shape> {
        Ok(Shape::matrix(step.work.tokens, table.cols()))
    }

    fn rms_norm(&self, _phase: &SimulatedPhase, x: &Shape, _weight: &Shape, _eps: f32) -> Result<Shape> {
        Ok(x.clone())
    }

    fn fused_add_rms_norm(
        &self,
        _phase: &SimulatedPhase,
        x: &Shape,
        _residual: &mut Shape,
        _weight: &Shape,
        _eps: f32,
    ) -> Result<Shape> {
        Ok(x.clone())
    }

    fn linear(
        &self,
        _phase: &SimulatedPhase,
        _step: &SimulatedStep,
        x: &Shape,
        weight: &Shape,
        _bias: Option<&Shape>,
    ) -> Result<Shape> {
        Ok(Shape::matrix(x.rows(), weight.rows()))
    }

    fn rope_and_write_kv(
        &self,
        _phase: &SimulatedPhase,
        _qkv: &mut Shape,
        _layout: QkvLayout,
        _rope: RopeConfig,
        _pool: &mut PagedKvLayout,
        _step: &SimulatedStep,
    ) -> Result<()> {
        Ok(())
    }

    fn attention(
        &self,
        _phase: &SimulatedPhase,
        qkv: &Shape,
        layout: QkvLayout,
        _pool: &PagedKvLayout,
        _step: &SimulatedStep,
        _scale: f32,
    ) -> Result<Shape> {
        Ok(Shape::matrix(qkv.rows(), layout.num_heads * layout.head_dim))
    }

    fn linear_silu_and_mul(
        &self,
        _phase: &SimulatedPhase,
        _step: &SimulatedStep,
        x: &Shape,
        gate_up: &Shape,
    ) -> Result<Shape> {
        Ok(Shape::matrix(x.rows(), gate_up.rows() / 2))
    }

    fn gather_logit_rows(&self, _phase: &SimulatedPhase, x: &Shape, step: &SimulatedStep) -> Result<Shape> {
        Ok(Shape::matrix(step.logit_rows, x.cols()))
    }

    fn read_logits(&self, phase: &SimulatedPhase, logits: Shape, how: LogitsReadback) -> Result<SimulatedPending> {
        let work = phase.prepared.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        let work = work.ok_or_else(|| Error::invalid("logits read back in a phase that prepared no step"))?;
        let mut clock = self.clock();
        let now = clock.time();
        clock.advance(now, &self.priced);
        if clock.running.iter().any(|r| r.phase == phase.id) {
            return Err(Error::invalid("a phase launched a step while its last one is in flight"));
        }
        let id = clock.launch(phase.id, work, phase.budget, now, &self.priced);
        drop(clock);
        let simulation = &self.priced.simulation;
        let launch = match work.kind {
            StepKind::Prefill => simulation.prefill_launch,
            StepKind::Decode => simulation.decode_launch,
        };
        self.sleep_until(now + launch);
        Ok(SimulatedPending { id, rows: logits.rows(), vocab: logits.cols(), how })
    }

    fn is_ready(&self, pending: &SimulatedPending) -> Result<bool> {
        Ok(!self.advanced().running.iter().any(|r| r.id == pending.id))
    }

    fn now(&self) -> Instant {
        self.clock().time()
    }

    fn sleep_until(&self, instant: Instant) {
        let mut clock = self.clock();
        if clock.virtual_now.is_some() {
            clock.move_to(instant);
        } else {
            drop(clock);
            std::thread::sleep(instant.saturating_duration_since(Instant::now()));
        }
    }

    fn idle(&self) {
        let mut clock = self.clock();
        let Some(now) = clock.virtual_now else {
            // The host's clock moves by itself; the next poll advances the steps.
            drop(clock);
            std::thread::yield_now();
            return;
        };
        clock.advance(now, &self.priced);
        if let Some(first) = clock.running.iter().map(Running::finish).min() {
            clock.move_to(first);
        }
    }

    fn take_logits(&self, _phase: &SimulatedPhase, pending: SimulatedPending) -> Result<HostLogits> {
        self.wait_for(|r| r.id == pending.id);
        Ok(match pending.how {
            LogitsReadback::Argmax => HostLogits::Argmax(vec![0; pending.rows]),
            LogitsReadback::Full => HostLogits::Full(HostTensor {
                shape: vec![pending.rows, pending.vocab],
                data: vec![0.0; pending.rows * pending.vocab],
            }),
        })
    }

    fn time_ops(&self, _phase: &SimulatedPhase, _on: bool) -> Result<()> {
        Err(Error::invalid("the simulated device times no operators: profile a model on its GPU"))
    }

    fn take_op_times(&self, _phase: &SimulatedPhase) -> Result<Vec<OpTime>> {
        Err(Error::invalid("the simulated device times no operators: profile a model on its GPU"))
    }

    fn bandwidth_curve(&self) -> Vec<(u32, f64)> {
        self.priced.cost.bandwidth.clone()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::engine::cost_model::tests::llama8b_h200;

    fn priced(prefill_beside: f64, decode_beside: f64) -> Priced {
        Priced {
            cost: llama8b_h200(),
            simulation: Simulation { prefill_beside, decode_beside, ..Simulation::default() },
        }
    }

    fn close(a: Instant, b: Instant) -> bool {
        let (early, late) = if a < b { (a, b) } else { (b, a) };
        late.duration_since(early) < Duration::from_nanos(10)
    }

    #[test]
    fn a_step_joined_halfway_pays_the_company_for_the_half_it_keeps() {
        let cost = priced(1.1, 1.3);
        let decode = IterationWork::of(StepKind::Decode, (0..64).map(|_| (1, 2048)));
        let prefill = IterationWork::of(StepKind::Prefill, [(8192, 0)]);
        let alone = cost.seconds(&decode, 40, None);
        let beside = cost.seconds(&decode, 40, Some((&prefill, 92)));
        let prefill_beside = cost.seconds(&prefill, 92, Some((&decode, 40)));
        let prefill_alone = cost.seconds(&prefill, 92, None);
        let model = |work, sms, other| cost.cost.seconds_beside(work, sms, other);
        assert_eq!(alone, model(&decode, 40, None));
        assert!((beside / model(&decode, 40, Some((&prefill, 92))) - 1.3).abs() < 1e-12);
        assert!((prefill_beside / model(&prefill, 92, Some((&decode, 40))) - 1.1).abs() < 1e-12);
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        let mut clock = Clock::default();
        let d = clock.launch(1, decode, 40, t0, &cost);
        assert!(clock.advance(at(alone / 2.0), &cost).is_empty());
        let p = clock.launch(2, prefill, 92, at(alone / 2.0), &cost);
        // Half the decode alone, half beside the prefill.
        let decode_end = at(alone / 2.0 + beside / 2.0);
        let running = |clock: &Clock, id| clock.running.iter().find(|r| r.id == id).copied().unwrap();
        assert!(close(running(&clock, d).finish(), decode_end));
        assert_eq!(clock.advance(decode_end + Duration::from_nanos(100), &cost), vec![d]);
        // The prefill did beside the decode what that time allows, and the rest alone.
        let prefill_left = 1.0 - (beside / 2.0) / prefill_beside;
        assert!(close(running(&clock, p).finish(), decode_end + Duration::from_secs_f64(prefill_left * prefill_alone)));
        assert_eq!(clock.advance(at(10.0), &cost), vec![p]);
        assert!(clock.running.is_empty());
    }

    #[test]
    fn a_step_resized_halfway_runs_its_second_half_at_the_new_budget() {
        let cost = priced(1.0, 1.0);
        let prefill = IterationWork::of(StepKind::Prefill, [(8192, 0)]);
        let (small, large) = (cost.seconds(&prefill, 64, None), cost.seconds(&prefill, 128, None));
        assert!(large < small);
        let t0 = Instant::now();
        let mut clock = Clock::default();
        let id = clock.launch(1, prefill, 64, t0, &cost);
        let half = t0 + Duration::from_secs_f64(small / 2.0);
        assert!(clock.advance(half, &cost).is_empty());
        clock.resize(1, 128, &cost);
        assert!(close(clock.running[0].finish(), half + Duration::from_secs_f64(large / 2.0)));
        // Another phase, with nothing in flight: nothing changes.
        clock.resize(2, 8, &cost);
        assert!(close(clock.running[0].finish(), half + Duration::from_secs_f64(large / 2.0)));
        assert_eq!(clock.advance(half + Duration::from_secs_f64(large), &cost), vec![id]);
    }

    #[test]
    fn steps_that_end_before_now_end_in_their_order() {
        let cost = priced(1.0, 1.0);
        let short = IterationWork::of(StepKind::Decode, [(1, 128)]);
        let long = IterationWork::of(StepKind::Prefill, [(4096, 0)]);
        let t0 = Instant::now();
        let mut clock = Clock::default();
        let l = clock.launch(1, long, 66, t0, &cost);
        let s = clock.launch(2, short, 66, t0, &cost);
        assert_eq!(clock.advance(t0 + Duration::from_secs(10), &cost), vec![s, l]);
    }

    /// A decode step of two sequences, over 100 and 7 cached tokens.
    fn decode_input() -> StepInput {
        StepInput {
            kind: StepKind::Decode,
            tokens: vec![5, 6],
            positions: vec![100, 7],
            slots: vec![100, 7],
            q_indptr: vec![0, 1, 2],
            kv_lens: vec![101, 8],
            block_tables: vec![0, 1],
            max_blocks_per_seq: 1,
            logit_rows: vec![0, 1],
        }
    }

    #[test]
    fn a_virtual_clock_moves_by_the_launches_and_the_steps_alone() {
        let launch = Duration::from_millis(2);
        let simulation = Simulation { decode_launch: launch, time: SimulatedTime::Virtual, ..Simulation::default() };
        let backend = SimulatedBackend::new(llama8b_h200(), "NVIDIA H200", simulation).unwrap();
        let mut phase = backend.new_phase().unwrap();
        backend.set_budget(&mut phase, 64).unwrap();
        let step = backend.prepare(&phase, &decode_input()).unwrap();
        let predicted = Duration::from_secs_f64(backend.step_seconds(&step.work, 64, None));
        assert!(predicted > launch, "{predicted:?}");
        let (t0, host) = (backend.now(), Instant::now());
        let pending = backend.read_logits(&phase, Shape::matrix(2, 10), LogitsReadback::Argmax).unwrap();
        assert!(close(backend.now(), t0 + launch), "the launch moves the clock by its host time");
        assert!(!backend.is_ready(&pending).unwrap());
        // One step a phase: a second launch while the first is in flight is refused (checked on
        // this clock, which no busy host moves past the step's end meanwhile).
        let second = backend.prepare(&phase, &decode_input()).unwrap();
        assert_eq!(second.logit_rows, 2);
        let again = backend.read_logits(&phase, Shape::matrix(2, 10), LogitsReadback::Argmax);
        assert!(again.is_err() && close(backend.now(), t0 + launch), "one step a phase");
        // Waiting for a step moves the clock to its end, not past it.
        backend.idle();
        assert!(close(backend.now(), t0 + predicted) && backend.is_ready(&pending).unwrap());
        backend.idle();
        assert!(close(backend.now(), t0 + predicted), "nothing in flight: the clock stays");
        backend.sleep_until(t0 + Duration::from_secs(600));
        backend.sleep_until(t0);
        assert!(close(backend.now(), t0 + Duration::from_secs(600)), "it moves on, never back");
        assert!(host.elapsed() < Duration::from_secs(60), "ten minutes of the device's time took {:?}", host.elapsed());
        assert_eq!(backend.take_logits(&phase, pending).unwrap(), HostLogits::Argmax(vec![0, 0]));
    }

    #[test]
    fn the_backend_runs_a_step_for_its_predicted_time_and_refuses_misuse() {
        let simulation = Simulation { decode_launch: Duration::from_millis(2), ..Simulation::default() };
        assert!(
            SimulatedBackend::new(llama8b_h200(), "H200", Simulation { decode_beside: 0.9, ..simulation }).is_err()
        );
        let backend = SimulatedBackend::new(llama8b_h200(), "NVIDIA H200", simulation).unwrap();
        let mut phase = backend.new_phase().unwrap();
        assert!(backend.set_budget(&mut phase, 133).is_err() && backend.set_budget(&mut phase, 0).is_err());
        backend.set_budget(&mut phase, 64).unwrap();
        assert!(backend.read_logits(&phase, Shape::matrix(1, 10), LogitsReadback::Argmax).is_err());
        let input = decode_input();
        let step = backend.prepare(&phase, &input).unwrap();
        assert_eq!(step.work, IterationWork::of(StepKind::Decode, [(1, 100), (1, 7)]));
        let start = Instant::now();
        let pending = backend.read_logits(&phase, Shape::matrix(2, 10), LogitsReadback::Full).unwrap();
        assert!(start.elapsed() >= simulation.decode_launch, "the launch takes the host's time");
        let logits = backend.take_logits(&phase, pending).unwrap();
        let predicted = Duration::from_secs_f64(backend.step_seconds(&step.work, 64, None));
        assert!(start.elapsed() >= predicted, "{:?} < {predicted:?}", start.elapsed());
        assert_eq!(logits, HostLogits::Full(HostTensor { shape: vec![2, 10], data: vec![0.0; 20] }));
        assert!(backend.time_ops(&phase, true).is_err());
        // This device keeps budgets. One that resizes takes a budget in range, also for a phase
        // whose step has ended (before the engine saw it end), where it changes nothing.
        assert!(!backend.resizes_in_flight() && backend.resize_in_flight(&phase, 32).is_err());
        let resizing = Simulation { resize_in_flight: true, ..Simulation::default() };
        let backend = SimulatedBackend::new(llama8b_h200(), "NVIDIA H200", resizing).unwrap();
        let phase = backend.new_phase().unwrap();
        assert!(backend.resizes_in_flight());
        backend.prepare(&phase, &input).unwrap();
        let pending = backend.read_logits(&phase, Shape::matrix(2, 10), LogitsReadback::Argmax).unwrap();
        assert!(backend.resize_in_flight(&phase, 133).is_err());
        backend.resize_in_flight(&phase, 32).unwrap();
        assert_eq!(backend.take_logits(&phase, pending).unwrap(), HostLogits::Argmax(vec![0, 0]));
        backend.resize_in_flight(&phase, 16).unwrap();
    }
}
