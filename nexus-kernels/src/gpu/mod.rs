//! The CUDA side: the device and its loaded PTX ([`Gpu`]), what the planners know of it
//! ([`DeviceModel`]: PTX build, SM count, and the read bandwidth of each budget as a
//! [`BandwidthCurve`] measured when the device is opened), CTA budgets ([`CtaBudget`]) and the
//! phase context every launch runs in ([`PhaseContext`]), with how it launches kernels
//! ([`LaunchOptions`]: programmatic dependent launch on Hopper), and what a captured graph holds
//! ([`GraphCensus`]).
//!
//! Nothing here needs the CUDA toolkit: the PTX in `ptx/` is embedded in the crate and loaded
//! through the driver (found at run time by cudarc's dynamic loading), which JIT-compiles it for
//! the device. Hopper (sm_90) gets the `compute_90a` build; other GPUs from Ampere on get the
//! portable `compute_80` one.

mod budget;
mod copy;
mod device;
mod graph;
mod launch;
mod model;
mod ptx;

pub use budget::{CtaBudget, PhaseContext};
pub use copy::{copy_rows_htod, copy_to_pinned};
pub use device::{Gpu, PtxTarget, TimelineRecord};
pub use graph::GraphCensus;
pub(crate) use launch::Launch;
pub use launch::LaunchOptions;
#[cfg(test)]
pub(crate) use model::measured;
pub use model::{BandwidthCurve, DeviceModel};

/// The planners' revision, bumped by every change that moves what a plan launches for some shape
/// and budget without changing a kernel (1: the GEMM model's unhidden overlap refit to 0.2,
/// 2026-12-07). A profile measured the plans of its revision, so it belongs in the fingerprint.
const PLANNERS_REVISION: u32 = 1;

/// A fingerprint of what a saved measurement of the kernels (a cost-model profile) was made
/// with: every embedded kernel (the PTX of both builds) and the planners' revision.
pub fn kernels_fingerprint() -> u64 {
    ptx::fingerprint(&PLANNERS_REVISION.to_le_bytes())
}
