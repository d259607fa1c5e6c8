//! The kernels' one error type.

/// An error from a launcher or a reference operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A shape, stride, length or layout argument is inconsistent.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// An argument is outside what the kernel supports (head dim, block size, budget).
    #[error("unsupported argument: {0}")]
    Unsupported(String),
}

/// The kernels' result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Returns a [`Error::Shape`] built from a format string unless `cond` holds.
macro_rules! ensure_shape {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::Error::Shape(format!($($fmt)+)));
        }
    };
}
pub(crate) use ensure_shape;
