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

/// The files of a Hugging Face folder that [`Tokenizer::from_hf_dir`] reads besides
/// `tokenizer.json` when they are there.
const OPTIONAL_TOKENIZER_FILES: [&str; 4] =
    ["tokenizer_config.json", "generation_config.json", "chat_template.jinja", "chat_template.json"];

/// Opens the GGUF file or Hugging Face folder at `path`.
///
/// Anything else is refused before a file is opened, with an [`ErrorKind::Io`] error that says
/// what it is: a FIFO (whose opening would block until a writer comes), a device or socket, a
/// folder without `config.json`, or a folder whose model files are not regular files.
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
        if !path.join("config.json").exists() {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "{} is a folder without config.json: give a GGUF file or a Hugging Face model folder",
                    path.display()
                ),
            ));
        }
        // The checkpoint checks its own files.
        let weights = HfCheckpoint::open(path)?;
        check_regular_file(&path.join("tokenizer.json"))?;
        for name in OPTIONAL_TOKENIZER_FILES {
            let file = path.join(name);
            if file.exists() {
                check_regular_file(&file)?;
            }
        }
        let tokenizer = Tokenizer::from_hf_dir(path)?;
        return Ok(LoadedModel { weights: Box::new(weights), tokenizer });
    }
    let gguf = GgufFile::open(path)?;
    let tokenizer = Tokenizer::from_gguf(&gguf)?;
    let weights = GgufModel::new(gguf)?;
    Ok(LoadedModel { weights: Box::new(weights), tokenizer })
}

/// Refuses anything at `path` but a regular file (or a link to one) before it is opened: opening
/// a FIFO blocks until a writer comes, and a device, socket or folder is no model file.
pub(crate) fn check_regular_file(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_file() {
        return Ok(());
    }
    let what = if meta.is_dir() { "a folder" } else { "a FIFO, socket or device" };
    Err(Error::new(ErrorKind::Io, format!("{} is {what}, not a regular file", path.display())))
}
