//! Plain-Rust references.
