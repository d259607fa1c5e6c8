//! The streaming read against its reference, and the bandwidth curve `Gpu::new` measures with it.

use std::time::Instant;

use nexus::kernels::stream_read::ReadDepth;
use nexus::kernels::{ErrorKind, Gpu, reference, stream_read};
use rand::Rng;

use crate::common::*;

/// What the checksums hold before a launch: a CTA that does not write its checksum leaves this,
/// which a random buffer's XOR matches only by a 1-in-2^32 chance (and an idle CTA's 0 never).
const POISON: u32 = 0xA5A5_A5A5;

#[test]
#[ignore = "needs a CUDA GPU"]
fn stream_read_checksums_match_reference() {
    let mut rng = rng("stream_read");
    // One 16-byte vector; less than one 4096-word chunk; three chunks and a partial one; two groups
    // of the deep read's 12 chunks and a partial one; 64 MiB (4096 chunks, dealt unevenly over 7
    // CTAs and over most SM counts).
    for words in [4, 4092, 3 * 4096 + 4, 25 * 4096 + 4, 16 << 20] {
        let data: Vec<u32> = (0..words).map(|_| rng.random()).collect();
        for budget in [Some(1), Some(7), None] {
            let ctx = phase(budget);
            let ctas = ctx.budget().get() as usize;
            let device = ctx.stream().clone_htod(&data).unwrap();
            let mut want = vec![0; ctas];
            reference::stream_read(&data, &mut want).unwrap();
            for depth in [ReadDepth::Kernel, ReadDepth::Limit] {
                let mut checksums = ctx.stream().clone_htod(&vec![POISON; ctas]).unwrap();
                stream_read::stream_read(&ctx, &device.as_view(), &mut checksums.as_view_mut(), depth).unwrap();
                let got = ctx.stream().clone_dtoh(&checksums).unwrap();
                assert_eq!(got, want, "{words} words on {ctas} CTAs, {depth:?}");
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn stream_read_rejects_bad_arguments() {
    let ctx = phase(Some(4));
    let data = ctx.stream().alloc_zeros::<u32>(4096).unwrap();
    let mut checksums = ctx.stream().alloc_zeros::<u32>(5).unwrap();
    let mut run = |words: std::ops::Range<usize>, ctas: usize| {
        stream_read::stream_read(&ctx, &data.slice(words), &mut checksums.slice_mut(..ctas), ReadDepth::Limit)
            .map_err(|e| e.kind())
    };
    assert_eq!(run(0..4096, 4), Ok(()));
    // Not whole 16-byte vectors.
    assert_eq!(run(0..4095, 4), Err(ErrorKind::Shape));
    // Not on a 16-byte boundary.
    assert_eq!(run(1..4093, 4), Err(ErrorKind::Shape));
    // One checksum per CTA of the budget: no fewer, no more.
    assert_eq!(run(0..4096, 3), Err(ErrorKind::Shape));
    assert_eq!(run(0..4096, 5), Err(ErrorKind::Shape));
    ctx.stream().synchronize().unwrap();
}

/// Prints the curve the device was opened with and checks that it is one: measured at 1 CTA, on
/// the grid of 8 and at all SMs, rising (a point may fall 5% below the best before it: noise), and
/// within a factor of 2 of what HBM GPUs read (1 to 10 TB/s) with every SM.
#[test]
#[ignore = "needs a CUDA GPU"]
fn measured_bandwidth_curve_is_sane() {
    let gpu = gpu();
    let (model, sms) = (gpu.model(), gpu.sm_count());
    let curve = model.bandwidth();
    eprintln!("{:?}: read bandwidth against CTAs (one per SM)", gpu);
    for &(ctas, rate) in curve.points() {
        eprintln!("{ctas:5} CTAs: {:5.2} TB/s, {:4.0} GB/s per CTA", rate / 1e12, rate / f64::from(ctas) / 1e9);
    }
    assert_eq!((model.target(), model.sm_count()), (gpu.target(), sms));

    let mut want: Vec<u32> = vec![1];
    want.extend((8..sms).step_by(8));
    if sms > 1 {
        want.push(sms);
    }
    assert_eq!(curve.points().iter().map(|p| p.0).collect::<Vec<_>>(), want);

    let all = curve.at(sms);
    assert!((0.5e12..=20e12).contains(&all), "{:.2} TB/s with all {sms} SMs", all / 1e12);
    assert!(curve.per_sm() > 0.0 && curve.per_sm() <= all, "{:.0} GB/s per SM", curve.per_sm() / 1e9);
    let mut best = 0.0f64;
    for &(ctas, rate) in curve.points() {
        assert!(rate >= 0.95 * best, "{ctas} CTAs read {rate:.3e} B/s, fewer read {best:.3e}");
        best = best.max(rate);
    }

    // How long opening the device takes, the measurement included (the PTX is JIT-compiled
    // already: the driver caches it).
    let start = Instant::now();
    let again = Gpu::new(0).unwrap();
    eprintln!(
        "Gpu::new again: {:.0} ms; all SMs {:.2} TB/s",
        start.elapsed().as_secs_f64() * 1e3,
        again.model().bandwidth().at(sms) / 1e12
    );
}
