//! Opening a model from a path: a GGUF file, or a Hugging Face folder with `config.json`,
//! safetensors weights and `tokenizer.json`; and finding that path from what a user names, a path
//! or a repo in the local Hugging Face cache ([`locate`]).

use std::io::ErrorKind as IoKind;
use std::path::{Path, PathBuf};

use crate::text::tokenizer::Tokenizer;
use crate::weights::config::WeightSource;
use crate::weights::gguf::GgufFile;
use crate::weights::gguf_weights::GgufModel;
use crate::weights::hub::{self, HubCache, HubPick};
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

/// Where [`locate`] found a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelPath {
    /// The file or folder at the path given.
    Local(PathBuf),
    /// A snapshot's folder or GGUF file in the Hugging Face cache.
    Hub(PathBuf),
}

impl ModelPath {
    /// The file or folder to [`open`].
    pub fn path(&self) -> &Path {
        match self {
            ModelPath::Local(path) | ModelPath::Hub(path) => path,
        }
    }
}

/// Finds the model `spec` names: the file or folder at that path when there is one, else the repo
/// `spec` (`org/name` or `name`) in `cache` at the revision and with the GGUF file `pick` asks
/// for (see [`HubCache::find`]). Nothing is downloaded.
///
/// A model found nowhere is an [`ErrorKind::Io`] error that names the path and the cache folders
/// looked at; `pick` with a path is [`ErrorKind::InvalidInput`], since it picks within a repo.
pub fn locate(spec: &str, pick: &HubPick<'_>, cache: Option<&HubCache>) -> Result<ModelPath> {
    let path = Path::new(spec);
    let missing = match std::fs::metadata(path) {
        Ok(_) if pick.revision.is_some() || pick.gguf_file.is_some() => {
            return Err(Error::invalid(format!(
                "{spec} is a path: a revision or GGUF file name picks a model in the Hugging Face cache (give \
                 the path of the file to load instead)"
            )));
        }
        Ok(_) => return Ok(ModelPath::Local(path.to_path_buf())),
        // Only a path that is not there is looked up as a repo; any other failure is about it.
        Err(e) if matches!(e.kind(), IoKind::NotFound | IoKind::NotADirectory) => e,
        Err(e) => return Err(Error::io(path, e)),
    };
    let hint = default_model_hint(path);
    if !hub::is_repo_id(spec) {
        return Err(Error::new(
            ErrorKind::Io,
            format!("cannot open {spec}: {missing} (and it is no Hugging Face repo id, org/name){hint}"),
        ));
    }
    let Some(cache) = cache else {
        return Err(Error::new(
            ErrorKind::Io,
            format!(
                "there is no file or folder at {spec}, and no Hugging Face cache to look it up in (set \
                 HF_HUB_CACHE, HF_HOME or HOME){hint}"
            ),
        ));
    };
    cache.find(spec, pick).map(ModelPath::Hub).map_err(|e| match e.kind() {
        ErrorKind::Io => {
            Error::new(ErrorKind::Io, format!("there is no file or folder at {spec}, and {}{hint}", e.message()))
        }
        _ => e,
    })
}

/// What to do when `path` is the default model and missing, for messages.
fn default_model_hint(path: &Path) -> &'static str {
    if path.ends_with(DEFAULT_MODEL) || path == Path::new(DEFAULT_MODEL) {
        " (the default model: run scripts/fetch-model.sh to fetch it)"
    } else {
        ""
    }
}

/// Opens the GGUF file or Hugging Face folder at `path`.
///
/// Anything else is refused before a file is opened, with an [`ErrorKind::Io`] error that says
/// what it is: a FIFO (whose opening would block until a writer comes), a device or socket, a
/// folder without `config.json`, or a folder whose model files are not regular files.
pub fn open(path: &Path) -> Result<LoadedModel> {
    let meta = std::fs::metadata(path).map_err(|e| {
        Error::new(ErrorKind::Io, format!("cannot open {}: {e}{}", path.display(), default_model_hint(path)))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::hub::tests::Scratch;

    const HASH: &str = "0123456789abcdef0123456789abcdef01234567";

    fn located(spec: &str, pick: HubPick<'_>, cache: Option<&HubCache>) -> Result<ModelPath> {
        locate(spec, &pick, cache)
    }

    #[test]
    fn a_path_first_then_the_cache() {
        let s = Scratch::new("locate");
        s.write("cache/models--org--tiny/refs/main", HASH);
        s.write(&format!("cache/models--org--tiny/snapshots/{HASH}/config.json"), "{}");
        s.write("local.gguf", "");
        let cache = HubCache::at(s.0.join("cache"));
        let local = s.0.join("local.gguf");
        let local = local.to_str().expect("UTF-8");
        assert_eq!(located(local, HubPick::default(), Some(&cache)).expect("a path"), ModelPath::Local(local.into()));
        let snapshot = s.0.join(format!("cache/models--org--tiny/snapshots/{HASH}"));
        let found = located("org/tiny", HubPick::default(), Some(&cache)).expect("in the cache");
        assert_eq!((found.path(), &found), (snapshot.as_path(), &ModelPath::Hub(snapshot.clone())));

        // A revision or file picks within a repo, not a path.
        let pick = HubPick { revision: Some("main"), gguf_file: None };
        assert_eq!(located(local, pick, Some(&cache)).expect_err("a path").kind(), ErrorKind::InvalidInput);
    }

    #[test]
    fn a_model_found_nowhere_names_where_it_was_looked_for() {
        let s = Scratch::new("locate-missing");
        let cache = HubCache::at(&s.0);
        let e = located("org/none", HubPick::default(), Some(&cache)).expect_err("nowhere");
        assert_eq!(e.kind(), ErrorKind::Io);
        let root = s.0.display().to_string();
        for part in ["no file or folder at org/none", &root, "has no models--org--none"] {
            assert!(e.message().contains(part), "{part}: {e}");
        }
        let e = located("org/none", HubPick::default(), None).expect_err("no cache");
        assert!(e.message().contains("no Hugging Face cache to look it up in"), "{e}");
        let e = located("./none.gguf", HubPick::default(), Some(&cache)).expect_err("not a repo id");
        assert!(
            e.message().contains("cannot open ./none.gguf") && e.message().contains("no Hugging Face repo id"),
            "{e}"
        );
        // Tests run in the crate's folder, where the default model's relative path is not.
        let e = located(DEFAULT_MODEL, HubPick::default(), Some(&cache)).expect_err("not fetched here");
        assert!(e.message().contains("scripts/fetch-model.sh"), "{e}");
        // Ambiguity is not absence: it is reported as it is.
        s.write("models--org--two/refs/main", HASH);
        s.write(&format!("models--org--two/snapshots/{HASH}/a.gguf"), "");
        s.write(&format!("models--org--two/snapshots/{HASH}/b.gguf"), "");
        let e = located("org/two", HubPick::default(), Some(&cache)).expect_err("two files");
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(!e.message().contains("no file or folder"), "{e}");
    }
}
