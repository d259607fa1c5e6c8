//! Sampling: reproducible under a seed, and the filters' properties on random distributions.

use nexus::runtime::engine::sampling::{Sampler, SamplingParams, apply_top_k, apply_top_p, argmax, draw};
use proptest::prelude::*;

fn logits(n: usize, salt: u32) -> Vec<f32> {
    (0..n as u32).map(|i| ((i.wrapping_mul(2654435761) ^ salt) % 1000) as f32 / 100.0).collect()
}

#[test]
fn same_seed_same_tokens_other_seed_other_tokens() {
    let params =
        |seed| SamplingParams { temperature: 1.0, top_k: 50, top_p: 0.95, seed: Some(seed), ..Default::default() };
    let run = |seed| {
        let mut s = Sampler::new(params(seed), &[]).unwrap();
        (0..200).map(|i| s.sample(&logits(1000, i)).unwrap()).collect::<Vec<u32>>()
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));
}

#[test]
fn top_k_one_and_zero_temperature_are_greedy() {
    let l = logits(500, 7);
    let best = argmax(&l).unwrap();
    for params in [
        SamplingParams { temperature: 0.0, seed: Some(1), ..Default::default() },
        SamplingParams { temperature: 1.5, top_k: 1, seed: Some(1), ..Default::default() },
    ] {
        let mut s = Sampler::new(params, &[]).unwrap();
        assert!((0..20).all(|_| s.sample(&l).unwrap() == best));
    }
}

fn distribution() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(0.0f32..1.0, 1..64).prop_map(|v| {
        let sum: f32 = v.iter().sum::<f32>() + 1e-6;
        v.iter().map(|x| (x + 1e-6) / sum).collect()
    })
}

proptest! {
    #[test]
    fn top_k_keeps_the_k_largest(probs in distribution(), k in 0usize..70) {
        let mut kept = probs.clone();
        apply_top_k(&mut kept, k);
        let survivors = kept.iter().filter(|&&p| p > 0.0).count();
        prop_assert_eq!(survivors, if k == 0 { probs.len() } else { k.min(probs.len()) });
        let min_kept = probs.iter().zip(&kept).filter(|(_, k)| **k > 0.0).map(|(p, _)| *p).fold(f32::INFINITY, f32::min);
        let max_dropped = probs.iter().zip(&kept).filter(|(_, k)| **k == 0.0).map(|(p, _)| *p).fold(0.0, f32::max);
        prop_assert!(min_kept >= max_dropped);
        for (p, k) in probs.iter().zip(&kept) {
            prop_assert!(*k == 0.0 || k == p);
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_sufficient_prefix(probs in distribution(), p in 0.01f32..1.0) {
        let mut kept = probs.clone();
        apply_top_p(&mut kept, p);
        let total: f32 = probs.iter().sum();
        let mass: f32 = kept.iter().sum();
        prop_assert!(mass >= p * total * (1.0 - 1e-5));
        // Minimal: without its smallest member the kept set would fall short.
        let smallest = kept.iter().copied().filter(|&x| x > 0.0).fold(f32::INFINITY, f32::min);
        prop_assert!(mass - smallest < p * total * (1.0 + 1e-5));
        let min_kept = probs.iter().zip(&kept).filter(|(_, k)| **k > 0.0).map(|(p, _)| *p).fold(f32::INFINITY, f32::min);
        let max_dropped = probs.iter().zip(&kept).filter(|(_, k)| **k == 0.0).map(|(p, _)| *p).fold(0.0, f32::max);
        prop_assert!(min_kept >= max_dropped);
    }

    #[test]
    fn draw_picks_only_candidates(probs in distribution(), k in 1usize..8, u in 0.0f32..1.0) {
        let mut kept = probs.clone();
        apply_top_k(&mut kept, k);
        let i = draw(&kept, u) as usize;
        prop_assert!(kept[i] > 0.0);
    }

    #[test]
    fn sampled_tokens_are_within_top_k(seed in any::<u64>(), k in 1usize..10) {
        let l = logits(300, seed as u32);
        let mut order: Vec<usize> = (0..l.len()).collect();
        order.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
        let threshold = l[order[k - 1]];
        let mut s = Sampler::new(SamplingParams { temperature: 2.0, top_k: k, top_p: 1.0, seed: Some(seed), ..Default::default() }, &[])
            .unwrap();
        for _ in 0..20 {
            prop_assert!(l[s.sample(&l).unwrap() as usize] >= threshold);
        }
    }
}
