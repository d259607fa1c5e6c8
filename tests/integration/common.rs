//! Helpers shared by the integration tests.

use std::path::PathBuf;

/// The default model, which `scripts/fetch-model.sh` puts under `models/` (CI runs it first).
/// Panics with what to do when it is missing: the tests that use it must not pass without it.
pub fn default_model_path() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(nexus::runtime::weights::loader::DEFAULT_MODEL);
    assert!(path.is_file(), "{} is missing: run scripts/fetch-model.sh first", path.display());
    path
}
