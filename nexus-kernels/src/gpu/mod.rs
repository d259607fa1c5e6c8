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
pub use ptx::fingerprint as kernels_fingerprint;
