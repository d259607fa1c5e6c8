//! Nexus: serving LLMs with prefill and decode on disjoint SMs of one GPU.
//!
//! This package re-exports the workspace's crates and owns its integration tests and benchmarks.

pub use nexus_kernels as kernels;
pub use nexus_runtime as runtime;
