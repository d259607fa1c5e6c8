//! Opening a model from a path: a GGUF file, or a Hugging Face folder with `config.json`,
//! safetensors weights and `tokenizer.json`.

use std::path::Path;

use crate::text::tokenizer::Tokenizer;
use crate::weights::config::WeightSource;
use crate::weights::gguf::GgufFile;
use crate::weights::gguf_weights::GgufModel;
use crate::weights::safetensors::HfCheckpoint;
use crate::{Error, ErrorKind, Result};

/// The default model, relative to the repository root: SmolLM2-135M-Instruct as a Q4_1 GGUF,
/// fetched by `scripts/fetch-model.sh`.
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// A model's weights and tokenizer, ready to load into a backend.
pub struct LoadedModel {
    /// Where the weights come from.
    pub weights: Box<dyn WeightSource + Send + Sync>,
    /// The model's tokenizer, with its chat template when it has one.
    pub tokenizer: Tokenizer,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel").field("config", self.weights.config()).finish_non_exhaustive()
    }
}

/// Opens the GGUF file or Hugging Face folder at `path`.
pub fn open(path: &Path) -> Result<LoadedModel> {
    let meta = std::fs::metadata(path).map_err(|e| {
        let hint = if path.ends_with(DEFAULT_MODEL) || path == Path::new(DEFAULT_MODEL) {
            " (the default model: run scripts/fetch-model.sh to fetch it)"
        } else {
            ""
        };
        Error::new(ErrorKind::Io, format!("cannot open {}: {e}{hint}", path.display()))
    })?;
    if meta.is_dir() {
        let weights = HfCheckpoint::open(path)?;
        let tokenizer = Tokenizer::from_hf_dir(path)?;
        return Ok(LoadedModel { weights: Box::new(weights), tokenizer });
    }
    let gguf = GgufFile::open(path)?;
    let tokenizer = Tokenizer::from_gguf(&gguf)?;
    let weights = GgufModel::new(gguf)?;
    Ok(LoadedModel { weights: Box::new(weights), tokenizer })
}
