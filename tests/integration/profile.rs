//! `nexus profile`'s measurement and fit, on the CPU backend (whose budgets are nominal: only the
//! plumbing is checked here; the GPU machine runs the real one): every operator class is timed at
//! every budget, the fitted model reads back from its JSON, and its errors are finite.

use nexus::runtime::engine::cost_model::{CostModel, DecodeBeside, Op, Sample};
use nexus::runtime::engine::profile::{
    BesideSample, KernelsCheck, ProfileConfig, SavedMeasurements, SavedProfile, fit, profile,
};
use nexus::runtime::model::LlamaModel;
use nexus::runtime::model::backend::StepKind;
use nexus::runtime::model::cpu::CpuBackend;

use crate::chaos::tiny_config;

#[test]
fn a_profile_times_every_operator_and_fits_a_model() {
    let model = LlamaModel::random(&CpuBackend, &tiny_config(), 5).expect("model");
    let config = ProfileConfig {
        budgets: vec![8, 64, 132],
        prefill: vec![(16, 0), (12, 20)],
        decode: vec![(4, 24)],
        splits: vec![64],
        repeats: 2,
        block_size: 4,
    };
    let mut calls = Vec::new();
    let (measured, profile) =
        profile(&CpuBackend, &model, &config, |done, total| calls.push((done, total))).expect("profile");
    // 3 shapes at 3 budgets, then 2 prefill shapes next to 1 decode shape at 1 split.
    assert_eq!(calls.last(), Some(&(11, 11)));
    for op in [Op::Gemm, Op::PrefillAttention, Op::DecodeAttention, Op::Rest] {
        let timed: Vec<u32> = measured.ops.iter().filter(|s| s.op == op).map(|s| s.sms).collect();
        for budget in &config.budgets {
            assert!(timed.contains(budget), "{op:?} at {budget} SMs");
        }
    }
    assert!(measured.ops.iter().all(|s| s.seconds > 0.0 && s.bytes > 0.0));
    // Whole steps alone, each shape and budget fitted and held out; both lanes, the one
    // combination fitted and the other held out.
    let alone = measured.steps.iter().filter(|s| s.other.is_none());
    assert_eq!(alone.clone().filter(|s| s.held_out).count(), 9);
    assert_eq!(alone.filter(|s| !s.held_out).count(), 9);
    let both: Vec<_> = measured.steps.iter().filter(|s| s.other.is_some()).collect();
    assert_eq!(both.len(), 2 * 2 * config.repeats);
    assert_eq!(both.iter().filter(|s| s.held_out).count(), 2 * config.repeats);
    let (median, p90) = profile.alone_error;
    assert!(median.is_finite() && p90 >= median, "{:?}", profile.alone_error);
    assert!(profile.both_error.0.is_finite());
    // The decode steps beside a prefill, against alone at the split's decode budget (on the CPU,
    // whose budgets are nominal, a ratio near 1 but not a fixed one).
    assert_eq!(profile.decode_slowdown.iter().map(|s| s.0).collect::<Vec<_>>(), config.splits);
    assert!(profile.decode_slowdown.iter().all(|s| s.1.is_finite() && s.1 > 0.0), "{:?}", profile.decode_slowdown);
    assert_eq!(CostModel::from_json(&profile.cost.to_json()).expect("reads back"), profile.cost);
    // The CPU runs a step before its launch returns: no decode operator ran beside a prefill, so
    // none is kept, and decode launches are priced by the decode contention beside one.
    assert!(measured.beside_ops.is_empty());
    assert_eq!(profile.cost.decode_beside, DecodeBeside::default());
    assert!(profile.attention_bandwidth_beside.is_empty() && profile.attention_beside_error.0.is_nan());
    // Decode attention launches of 0.1 ms alone on 64 SMs, and 0.125 ms beside a prefill: they
    // keep 80% of their bandwidth, and get a factor on 64 SMs (against the fitted curve's time).
    let mut with_beside = measured.clone();
    let prefill = measured.steps.iter().find(|s| s.work.kind == StepKind::Prefill).expect("a prefill step");
    let attention_on_64 = |s: &Sample| s.op == Op::DecodeAttention && s.sms == 64;
    with_beside.ops.iter_mut().filter(|s| attention_on_64(s)).for_each(|s| s.seconds = 1e-4);
    for (i, alone) in with_beside.ops.clone().iter().filter(|s| attention_on_64(s)).enumerate() {
        let sample = Sample { seconds: 1.25e-4, ..*alone };
        with_beside.beside_ops.push(BesideSample { sample, other: (prefill.work, 68), held_out: i % 2 == 1 });
    }
    let beside = fit(&with_beside).expect("fit with launches beside");
    let factors = &beside.cost.decode_beside;
    assert!(factors.gemm.is_empty() && factors.attention.iter().map(|f| f.0).eq([64]), "{factors:?}");
    assert_eq!(beside.attention_bandwidth_beside.len(), 1);
    assert!((beside.attention_bandwidth_beside[0].1 - 0.8).abs() < 1e-9, "{:?}", beside.attention_bandwidth_beside);
    assert!(beside.attention_beside_error.0.is_finite());
    // Saved and loaded for the device and model it was made for; refused for others.
    let dir = std::env::temp_dir().join(format!("nexus-profile-test-{}", std::process::id()));
    let path = dir.join("p.json");
    let measured = SavedMeasurements::new(measured, "CPU", "tiny");
    let saved = SavedProfile::new(&profile, &measured);
    saved.save(&path).expect("save");
    // Measurements read back fit the same model again.
    measured.save(&dir.join("m.json")).expect("save measurements");
    let again = SavedMeasurements::load(&dir.join("m.json")).expect("load measurements");
    assert_eq!(again, measured);
    assert_eq!(fit(&again.measurements).expect("refit").cost, profile.cost);
    assert_eq!(SavedProfile::load(&path, "CPU", "tiny", KernelsCheck::This).expect("load"), saved);
    let other_device =
        SavedProfile::load(&path, "NVIDIA H200", "tiny", KernelsCheck::This).expect_err("another device");
    assert!(other_device.to_string().contains("made for device CPU"), "{other_device}");
    assert!(SavedProfile::load(&path, "CPU", "other", KernelsCheck::This).is_err());
    assert!(SavedProfile::load(&dir.join("missing.json"), "CPU", "tiny", KernelsCheck::This).is_err());
    // Another build's kernels: refused, unless any will do (a simulated device's profile).
    let old = SavedProfile { kernels: "0123456789abcdef".into(), ..saved.clone() };
    old.save(&path).expect("save");
    let other_kernels = SavedProfile::load(&path, "CPU", "tiny", KernelsCheck::This).expect_err("other kernels");
    assert!(other_kernels.to_string().contains("kernels 0123456789abcdef"), "{other_kernels}");
    assert_eq!(SavedProfile::load(&path, "CPU", "tiny", KernelsCheck::Any).expect("any kernels"), old);
    assert!(SavedProfile::load(&path, "CPU", "other", KernelsCheck::Any).is_err());
    let name = SavedProfile::default_path("NVIDIA H200", "synthetic:llama-3.1-8b").expect("a cache folder");
    assert!(name.to_string_lossy().contains("profiles/NVIDIA_H200--synthetic_llama-3.1-8b--"), "{}", name.display());
    std::fs::remove_dir_all(&dir).expect("clean up");
    // Shapes that do not fit the model, and budgets the device has not, are refused.
    let bad = ProfileConfig { budgets: vec![200], ..config.clone() };
    assert!(profile_of(&model, &bad).is_err());
    let bad = ProfileConfig { prefill: vec![(600, 0)], ..config };
    assert!(profile_of(&model, &bad).is_err());
}

fn profile_of(model: &LlamaModel<CpuBackend>, config: &ProfileConfig) -> nexus::runtime::Result<()> {
    profile(&CpuBackend, model, config, |_, _| {}).map(|_| ())
}
