//! The engine on a simulated H200 ([`SimulatedBackend`] with the Llama-3.1-8B profile of the
//! controller experiment's eleventh round, committed in `bench-results/`): a burst of prompts
//! under chunked prefill and under the controlled Nexus schedule, with budgets fixed at launch and
//! with budgets that move in flight, on the host's clock and on the device's virtual one. Every
//! request gets its tokens; the Nexus lanes run at the same time, their budgets never adding up
//! to more than the SMs; a simulated run takes as long as the profile says the GPU takes; and in
//! virtual time, the same run twice gives the same timeline.

use std::path::Path;
use std::time::Duration;

use nexus::runtime::engine::cost_model::IterationWork;
use nexus::runtime::engine::profile::SavedProfile;
use nexus::runtime::engine::scheduler::controller::ControllerConfig;
use nexus::runtime::engine::scheduler::{Lane, NexusConfig, PrefillPacking, PrefillTokens, SchedulerConfig};
use nexus::runtime::engine::{Engine, EngineConfig, EngineEvent, FinishReason, NexusControl, RequestOptions, Schedule};
use nexus::runtime::model::LlamaModel;
use nexus::runtime::model::backend::{Backend, StepKind};
use nexus::runtime::model::simulated::{SimulatedBackend, SimulatedTime, Simulation};
use nexus::runtime::weights::synthetic;

fn profile() -> SavedProfile {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("bench-results/nexus-vs-chunked-h200/llama-3.1-8b-r11-profile.json");
    SavedProfile::read(&path).expect("the committed profile")
}

#[test]
fn a_simulated_h200_serves_a_burst_under_both_schedules() {
    let profile = profile();
    let config = synthetic::config("llama-3.1-8b").expect("a published config");
    let control = NexusControl {
        cost: profile.cost_model.clone(),
        controller: ControllerConfig { decode_target_s: Some(0.012), ..ControllerConfig::default() },
        prefill_aging: NexusConfig::DEFAULT_PREFILL_AGING,
        prefill_tokens: Some(PrefillTokens { tokens: 2048, backlog: Some(8192) }),
        prefill_packing: PrefillPacking::WholeFirst,
    };
    // Eight prompts of 700..4200 tokens at once, 12 tokens each.
    let prompts: Vec<usize> = (0..8).map(|i| 700 + 500 * i).collect();
    let output = 12;
    let controlled = Schedule::NexusControlled(Box::new(control));
    // Without and with budgets that change in flight (the engine checks every resize and launch
    // against the SM count; the timeline keeps each iteration's last budget), on either clock.
    let runs = [(Schedule::Chunked, false), (controlled.clone(), false), (controlled, true)];
    let mut virtual_timelines = Vec::new();
    for ((schedule, resize_in_flight), time) in runs.iter().cloned().flat_map(|run| {
        [SimulatedTime::Host, SimulatedTime::Virtual, SimulatedTime::Virtual].map(|time| (run.clone(), time))
    }) {
        let simulation = Simulation {
            prefill_launch: Duration::from_micros(2500),
            decode_launch: Duration::from_micros(500),
            prefill_beside: 1.1,
            decode_beside: 1.1,
            resize_in_flight,
            time,
        };
        let backend = SimulatedBackend::new(profile.cost_model.clone(), &profile.device, simulation).expect("device");
        let sms = backend.sm_count();
        let model = LlamaModel::random(&backend, &config, 1).expect("shapes only");
        let engine_config = EngineConfig {
            num_blocks: 2048,
            block_size: 64,
            scheduler: SchedulerConfig::default(),
            max_model_len: Some(8192),
            schedule: schedule.clone(),
        };
        let mut engine = Engine::new(backend, model, vec![], engine_config).expect("engine");
        engine.keep_timeline(true);
        let options = RequestOptions { max_tokens: output, ..RequestOptions::default() };
        for (id, &len) in prompts.iter().enumerate() {
            engine.add_request(id as u64, vec![1000; len], options.clone()).expect("a request that fits");
        }
        let mut tokens = vec![0; prompts.len()];
        let mut finished = vec![false; prompts.len()];
        while engine.has_unfinished() {
            for event in engine.step().expect("a step") {
                match event {
                    EngineEvent::Token { id, .. } => tokens[id as usize] += 1,
                    EngineEvent::Finished { id, reason } => {
                        assert_eq!(reason, FinishReason::Length);
                        finished[id as usize] = true;
                    }
                    EngineEvent::Failed { id, message } => panic!("request {id} failed: {message}"),
                }
            }
        }
        assert_eq!(tokens, vec![output; prompts.len()], "{schedule:?}");
        assert!(finished.iter().all(|&f| f));
        let timeline = engine.take_timeline();
        for a in timeline.iter().filter(|_| !resize_in_flight) {
            let in_flight: u32 =
                timeline.iter().filter(|b| b.start <= a.start && a.start < b.end).map(|b| b.budget).sum();
            assert!(in_flight <= sms, "{in_flight} SMs in flight when this started: {a:?}");
        }
        let prompt_tokens: usize = timeline.iter().filter(|i| i.kind == StepKind::Prefill).map(|i| i.tokens).sum();
        let decode_tokens = timeline.iter().filter(|i| i.kind == StepKind::Decode).map(|i| i.tokens).sum::<usize>();
        // Each prompt's last chunk samples its first token; decode steps sample the rest (in
        // chunked mixed batches, decode rows are in prefill-kind steps).
        let prompt_total: usize = prompts.iter().sum();
        match schedule {
            Schedule::Chunked => {
                assert!(timeline.iter().all(|i| i.lane == Lane::Mixed && i.budget == sms));
                assert_eq!(prompt_tokens + decode_tokens, prompt_total + prompts.len() * (output - 1));
            }
            _ => {
                assert_eq!(prompt_tokens, prompt_total);
                assert_eq!(decode_tokens, prompts.len() * (output - 1));
                let lanes = |lane| timeline.iter().filter(move |i| i.lane == lane);
                let overlapping = lanes(Lane::Decode)
                    .any(|d| lanes(Lane::Prefill).any(|p| p.start < d.end && d.start < p.end && d.budget < sms));
                assert!(overlapping, "the decode lane ran beside the prefill lane on a share of the SMs");
            }
        }
        // The whole run took at least what the profile gives for prefilling every prompt on all
        // SMs at once, and at most a few times that plus the decodes alone (the host's own time
        // comes on top).
        let prefill_all = IterationWork::of(StepKind::Prefill, prompts.iter().map(|&p| (p, 0)));
        let floor = profile.cost_model.seconds(&prefill_all, sms, None);
        let span = timeline.iter().map(|i| i.end).max().expect("iterations") - timeline[0].start;
        assert!(span.as_secs_f64() >= 0.95 * floor, "{schedule:?}: {span:?} for a floor of {floor} s");
        let decodes = IterationWork::of(StepKind::Decode, prompts.iter().map(|&p| (1, p)));
        let ceiling = 3.0 * floor + (output as f64) * profile.cost_model.seconds(&decodes, sms, None) + 1.0;
        assert!(span.as_secs_f64() <= ceiling, "{schedule:?}: {span:?} past {ceiling} s");
        if time == SimulatedTime::Virtual {
            virtual_timelines.push(timeline);
        }
    }
    // Each run in virtual time twice: the same iterations at the same times.
    for pair in virtual_timelines.chunks(2) {
        assert_eq!(pair[0], pair[1]);
    }
}
