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
    /// No usable GPU: no driver, no device, or a device older than sm_80.
    #[error("no usable GPU: {0}")]
    NoGpu(String),
    /// The CUDA driver reported an error.
    #[error("CUDA driver: {0}")]
    Cuda(#[from] cudarc::driver::DriverError),
}

/// The kinds of [`Error`], for callers that branch on what went wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    Shape,
    Unsupported,
    NoGpu,
    Cuda,
}

impl Error {
    /// What went wrong, in broad strokes.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Shape(_) => ErrorKind::Shape,
            Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::NoGpu(_) => ErrorKind::NoGpu,
            Error::Cuda(_) => ErrorKind::Cuda,
        }
    }
}

/// The kernels' result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Returns a [`Error::Shape`] built from a format string unless `cond` holds.
macro_rules! ensure_shape {
    ($cond:expr, $($fmt:tt)+) => {
        // Bound first: `!(a > b)` on floats reads as a trap (and is one for NaN, which this
        // rejects, as it should).
        let holds: bool = $cond;
        if !holds {
            return Err($crate::Error::Shape(format!($($fmt)+)));
        }
    };
}
pub(crate) use ensure_shape;
