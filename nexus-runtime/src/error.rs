//! The runtime's one error type.

use std::fmt;
use std::path::{Path, PathBuf};

/// What went wrong, in broad strokes; see [`Error::kind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A file could not be opened or read.
    Io,
    /// A model file (GGUF, safetensors, config.json) is malformed or truncated.
    Format,
    /// A well-formed input asks for something this build does not support.
    Unsupported,
    /// The tokenizer could not be built or failed to encode or decode.
    Tokenizer,
    /// A chat template failed to parse or render.
    Template,
    /// An argument or request is invalid (bad shape, bad sampling parameter, unknown token).
    InvalidInput,
    /// The KV cache has no free block left.
    KvCacheFull,
    /// A kernel launch or reference operation failed.
    Kernel,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            ErrorKind::Io => "I/O error",
            ErrorKind::Format => "malformed model file",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Tokenizer => "tokenizer error",
            ErrorKind::Template => "chat template error",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::KvCacheFull => "KV cache full",
            ErrorKind::Kernel => "kernel error",
        };
        f.write_str(name)
    }
}

/// An error of the runtime: a [`ErrorKind`], a message naming the problem, and maybe its cause.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// The runtime's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` with a message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into(), source: None }
    }

    /// An error of `kind` with a message and the error that caused it.
    pub fn with_source(
        kind: ErrorKind,
        message: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Error { kind, message: message.into(), source: Some(source.into()) }
    }

    /// A malformed-file error.
    pub fn format(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Format, message)
    }

    /// An invalid-input error.
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidInput, message)
    }

    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        // The OS error is part of the message: "file: No such file or directory" is the whole story.
        Error::new(ErrorKind::Io, format!("{}: {source}", PathBuf::from(path).display()))
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without the kind.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The cause is not repeated here: it is `source()`, which error reporters print after.
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<nexus_kernels::Error> for Error {
    fn from(e: nexus_kernels::Error) -> Self {
        let message = e.to_string();
        Error::with_source(ErrorKind::Kernel, message, e)
    }
}
