//! What the planners know of one GPU: its PTX build, its SM count and the read bandwidth each CTA
//! budget reaches, measured on the device by [`Gpu::new`] with the streaming-read kernel.

use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;

use super::{CtaBudget, Gpu, PhaseContext, PtxTarget};
use crate::error::ensure_shape;
use crate::stream_read::{ReadDepth, stream_read};
use crate::{Result, reference};

/// Read bandwidth (bytes/s) against the number of CTAs streaming, one per SM: measured points,
/// joined by straight lines from the origin (no CTA reads nothing), flat past the last point.
#[derive(Clone, Debug, PartialEq)]
pub struct BandwidthCurve {
    /// `(CTAs, bytes/s)`, the first at 1 CTA, CTAs strictly increasing.
    points: Vec<(u32, f64)>,
}

impl BandwidthCurve {
    /// A curve through `points` of `(CTAs, bytes/s)`: the first at 1 CTA (the per-SM rate), CTAs
    /// strictly increasing, rates finite and positive. For tests and for loading a saved profile;
    /// [`Gpu::model`] holds the one measured on the device.
    pub fn from_points(points: &[(u32, f64)]) -> Result<Self> {
        ensure_shape!(points.first().is_some_and(|p| p.0 == 1), "bandwidth curve: the first point must be at 1 CTA");
        ensure_shape!(
            points.windows(2).all(|w| w[0].0 < w[1].0),
            "bandwidth curve: CTA counts must increase strictly: {points:?}"
        );
        ensure_shape!(
            points.iter().all(|p| p.1.is_finite() && p.1 > 0.0),
            "bandwidth curve: rates must be finite and positive: {points:?}"
        );
        Ok(BandwidthCurve { points: points.to_vec() })
    }

    /// The points, `(CTAs, bytes/s)`, fewest CTAs first.
    pub fn points(&self) -> &[(u32, f64)] {
        &self.points
    }

    /// Bytes/s read with `ctas` CTAs streaming, interpolated linearly between the points (and from
    /// 0 at 0 CTAs); past the last point, its rate.
    pub fn at(&self, ctas: u32) -> f64 {
        let mut prev = (0u32, 0.0);
        for &(c, rate) in &self.points {
            if ctas == c {
                return rate;
            }
            if ctas < c {
                let t = f64::from(ctas - prev.0) / f64::from(c - prev.0);
                return prev.1 + (rate - prev.1) * t;
            }
            prev = (c, rate);
        }
        prev.1
    }

    /// Bytes/s one CTA (one SM) reads: the rate at 1 CTA.
    pub fn per_sm(&self) -> f64 {
        self.points[0].1
    }
}

/// What the planners need to know of one GPU (see [`Gpu::model`]).
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceModel {
    target: PtxTarget,
    sm_count: u32,
    bandwidth: BandwidthCurve,
}

impl DeviceModel {
    /// A device running `target`'s PTX with `sm_count` SMs and read bandwidth `bandwidth`.
    pub fn new(target: PtxTarget, sm_count: u32, bandwidth: BandwidthCurve) -> Self {
        DeviceModel { target, sm_count, bandwidth }
    }

    /// The PTX build the device runs, which decides the kernels a plan may pick.
    pub fn target(&self) -> PtxTarget {
        self.target
    }

    /// The number of SMs: the largest CTA budget.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// Read bandwidth against CTAs.
    pub fn bandwidth(&self) -> &BandwidthCurve {
        &self.bandwidth
    }
}

/// Bytes each measuring launch reads: well above the L2 (50 MB on an H100, 60 MB on an H200), so
/// that no launch finds its data there.
const MEASURE_BYTES: usize = 256 << 20;
/// Words of random data uploaded once and copied over the buffer: the caches care only about
/// addresses, but all-zero data can read faster than real data.
const TILE_WORDS: usize = 1 << 20;
const _: () = assert!((MEASURE_BYTES / 4).is_multiple_of(TILE_WORDS));
/// Timed launches per budget, after one warm-up; their median counts.
const MEASURE_RUNS: usize = 5;
/// Budgets above 1 are measured on this grid, the one the runtime's budgets and graphs use, and at
/// all SMs.
const MEASURE_STEP: u32 = 8;
/// Measured rates keep this many significant digits, so that plans do not change with the noise
/// between two measurements.
const SIGNIFICANT_DIGITS: i32 = 3;

/// The budgets measured on a GPU of `sm_count` SMs: 1, then multiples of [`MEASURE_STEP`] below
/// `sm_count`, then `sm_count`.
fn measured_budgets(sm_count: u32) -> Vec<u32> {
    let mut budgets = vec![1];
    budgets.extend((MEASURE_STEP..sm_count).step_by(MEASURE_STEP as usize));
    if sm_count > 1 {
        budgets.push(sm_count);
    }
    budgets
}

/// `x` rounded to [`SIGNIFICANT_DIGITS`] significant digits.
fn round_significant(x: f64) -> f64 {
    let exponent = x.abs().log10().floor() as i32 + 1 - SIGNIFICANT_DIGITS;
    // Divide and multiply by a power of ten that is exact in f64 (10^k for 0 <= k <= 22), so that
    // the result is the nearest f64 of the rounded decimal.
    if exponent >= 0 {
        let p = 10f64.powi(exponent);
        (x / p).round() * p
    } else {
        let p = 10f64.powi(-exponent);
        (x * p).round() / p
    }
}

/// Measures `gpu`'s read bandwidth with [`stream_read`] at [`ReadDepth::Kernel`] (what our kernels
/// reach, not what the SMs can read at all) over [`MEASURE_BYTES`] of random data at
/// each of [`measured_budgets`]: one warm-up launch, then the median of [`MEASURE_RUNS`] launches,
/// each timed by a pair of CUDA events. Every launch is enqueued before the one wait at the end.
/// About 25 ms on an H100 or H200, 60% of it at 1 CTA.
pub(super) fn measure_bandwidth(gpu: &Arc<Gpu>) -> Result<BandwidthCurve> {
    let stream = gpu.new_stream()?;
    let mut tile = vec![0.0f32; TILE_WORDS];
    reference::fill_uniform(&mut tile, 0x5eed, 0.0, 1.0);
    let tile = stream.clone_htod(&tile.iter().map(|v| v.to_bits()).collect::<Vec<u32>>())?;
    let mut data = stream.alloc_zeros::<u32>(MEASURE_BYTES / 4)?;
    for at in (0..data.len()).step_by(TILE_WORDS) {
        stream.memcpy_dtod(&tile, &mut data.slice_mut(at..at + TILE_WORDS))?;
    }
    let mut checksums = stream.alloc_zeros::<u32>(gpu.sm_count() as usize)?;
    let event = || gpu.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT));

    let mut marks = Vec::new();
    for ctas in measured_budgets(gpu.sm_count()) {
        let ctx = PhaseContext::new(gpu.clone(), stream.clone(), CtaBudget::new(ctas, gpu)?);
        let mut out = checksums.slice_mut(..ctas as usize);
        stream_read(&ctx, &data.as_view(), &mut out, ReadDepth::Kernel)?;
        // Run i lies between events i and i + 1.
        let mut events = vec![event()?];
        events[0].record(&stream)?;
        for _ in 0..MEASURE_RUNS {
            stream_read(&ctx, &data.as_view(), &mut out, ReadDepth::Kernel)?;
            let end = event()?;
            end.record(&stream)?;
            events.push(end);
        }
        marks.push((ctas, events));
    }
    stream.synchronize()?;

    let mut points = Vec::with_capacity(marks.len());
    for (ctas, events) in marks {
        let mut ms = events.windows(2).map(|w| w[0].elapsed_ms(&w[1])).collect::<Result<Vec<f32>, _>>()?;
        ms.sort_by(f32::total_cmp);
        let seconds = f64::from(ms[ms.len() / 2]) / 1e3;
        points.push((ctas, round_significant(MEASURE_BYTES as f64 / seconds)));
    }
    BandwidthCurve::from_points(&points)
}

/// Device models of the two GPUs the figures of KERNEL-NOTES.md were measured on, for the tests
/// of the planners.
#[cfg(test)]
pub(crate) mod measured {
    use super::*;

    /// H100 SXM (132 SMs, sm_90a), 2026-11-26: one SM reads 125 GB/s, all 3.12 TB/s.
    pub(crate) fn h100() -> DeviceModel {
        let points =
            [(1, 0.125e12), (8, 1.0e12), (16, 1.9e12), (32, 2.68e12), (48, 2.95e12), (64, 3.06e12), (132, 3.12e12)];
        DeviceModel::new(PtxTarget::Sm90a, 132, BandwidthCurve::from_points(&points).unwrap())
    }

    /// H200 (132 SMs, sm_90a), 2026-12-01: one SM reads 110 GB/s, all 4.53 TB/s, saturating near
    /// 64-80 SMs.
    pub(crate) fn h200() -> DeviceModel {
        let points = [
            (1, 0.11e12),
            (8, 0.88e12),
            (16, 1.73e12),
            (24, 2.39e12),
            (32, 2.96e12),
            (40, 3.47e12),
            (48, 3.81e12),
            (64, 4.24e12),
            (80, 4.40e12),
            (96, 4.45e12),
            (112, 4.52e12),
            (132, 4.53e12),
        ];
        DeviceModel::new(PtxTarget::Sm90a, 132, BandwidthCurve::from_points(&points).unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::measured::h200;
    use super::*;

    #[test]
    fn curve_interpolates_between_points_and_is_flat_past_the_last() {
        let curve = h200().bandwidth().clone();
        assert_eq!(curve.per_sm(), 0.11e12);
        for &(ctas, rate) in curve.points() {
            assert_eq!(curve.at(ctas), rate);
        }
        assert_eq!(curve.at(0), 0.0);
        assert!((curve.at(56) - (3.81e12 + 4.24e12) / 2.0).abs() < 1.0);
        assert!((curve.at(4) - (0.11e12 + (0.88e12 - 0.11e12) * 3.0 / 7.0)).abs() < 1.0);
        assert_eq!(curve.at(500), 4.53e12);
        let one = BandwidthCurve::from_points(&[(1, 5e10)]).unwrap();
        assert_eq!((one.at(1), one.at(132), one.per_sm()), (5e10, 5e10, 5e10));
    }

    #[test]
    fn curve_rejects_bad_points() {
        for points in [
            &[][..],
            &[(2, 1e11), (8, 1e12)],
            &[(1, 1e11), (8, 1e12), (8, 1.1e12)],
            &[(1, 1e11), (16, 1e12), (8, 1.1e12)],
            &[(1, 0.0)],
            &[(1, f64::NAN)],
            &[(1, 1e11), (8, f64::INFINITY)],
        ] {
            assert!(BandwidthCurve::from_points(points).is_err(), "{points:?}");
        }
    }

    #[test]
    fn budgets_are_one_then_the_grid_of_eight_then_all() {
        let mut want = vec![1];
        want.extend((8..=128).step_by(8));
        want.push(132);
        assert_eq!(measured_budgets(132), want);
        assert_eq!(measured_budgets(8), [1, 8]);
        assert_eq!(measured_budgets(10), [1, 8, 10]);
        assert_eq!(measured_budgets(1), [1]);
    }

    #[test]
    fn rounding_keeps_three_significant_digits() {
        assert_eq!(round_significant(4.5312e12), 4.53e12);
        assert_eq!(round_significant(1.1049e11), 1.10e11);
        assert_eq!(round_significant(8.8e11), 8.8e11);
        assert_eq!(round_significant(9.996e11), 1.0e12);
        assert_eq!(round_significant(123.456), 123.0);
        assert_eq!(round_significant(0.012345), 0.0123);
    }
}
