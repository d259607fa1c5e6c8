//! Nexus kernels.

mod error;

pub mod reference;

pub use error::{Error, Result};
