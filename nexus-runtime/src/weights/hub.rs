//! Models in the local Hugging Face cache, found where `huggingface_hub` keeps them and never
//! downloaded.
//!
//! The cache holds a folder per repo, `models--{org}--{name}`; its `refs/{revision}` files hold
//! commit hashes, and `snapshots/{hash}/` the repo's files at that commit (links into `blobs/`,
//! where the downloads are). A snapshot with a `config.json` is a Hugging Face model folder;
//! otherwise the model is its GGUF file, or the one named among several.
//!
//! [`HubCache::from_env`] finds the cache as `huggingface_hub` does; [`HubCache::find`] looks a repo
//! up in a given cache without reading the environment, so that any folder can stand in for it.

use std::ffi::OsString;
use std::fmt;
use std::io::ErrorKind as IoKind;
use std::path::{Component, Path, PathBuf};

use crate::{Error, ErrorKind, Result};

/// The revision looked up when none is asked for, as in `huggingface_hub`.
pub const DEFAULT_REVISION: &str = "main";

/// Where the cache may be, in `huggingface_hub`'s order: the first variable set (and not empty)
/// wins, with the path under it, and how messages name it.
const CACHE_LOOKUPS: [(&str, &str, &str); 5] = [
    ("HF_HUB_CACHE", "", "$HF_HUB_CACHE"),
    ("HUGGINGFACE_HUB_CACHE", "", "$HUGGINGFACE_HUB_CACHE"),
    ("HF_HOME", "hub", "$HF_HOME/hub"),
    ("XDG_CACHE_HOME", "huggingface/hub", "$XDG_CACHE_HOME/huggingface/hub"),
    ("HOME", ".cache/huggingface/hub", "~/.cache/huggingface/hub"),
];

/// Which snapshot of a repo, and which file of it, to load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HubPick<'a> {
    /// A ref name (a branch or tag, as under `refs/`) or a commit hash (a folder under
    /// `snapshots/`); [`DEFAULT_REVISION`] when `None`.
    pub revision: Option<&'a str>,
    /// The GGUF file to load, by its path in the snapshot: needed when the snapshot holds
    /// several, and preferred to a `config.json` beside it.
    pub gguf_file: Option<&'a str>,
}

/// A Hugging Face hub cache folder (the one that holds the `models--*` folders), and where its
/// path came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubCache {
    root: PathBuf,
    origin: Option<&'static str>,
}

impl fmt::Display for HubCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.origin {
            Some(origin) => write!(f, "the Hugging Face cache {} (from {origin})", self.root.display()),
            None => write!(f, "the Hugging Face cache {}", self.root.display()),
        }
    }
}

impl HubCache {
    /// The cache at `root`.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        HubCache { root: root.into(), origin: None }
    }

    /// The cache `huggingface_hub` uses: `$HF_HUB_CACHE`, else `$HUGGINGFACE_HUB_CACHE`, else
    /// `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`;
    /// `None` without even `$HOME`.
    pub fn from_env() -> Option<Self> {
        Self::from_vars(|name| std::env::var_os(name))
    }

    /// [`HubCache::from_env`] over the variables `var` gives. A variable set to the empty string
    /// counts as unset, and a leading `~` is the home folder, as `huggingface_hub` expands it.
    pub fn from_vars(var: impl Fn(&str) -> Option<OsString>) -> Option<Self> {
        let set = |name: &str| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        CACHE_LOOKUPS.iter().find_map(|&(name, under, origin)| {
            let dir = set(name)?;
            let dir = match (dir.strip_prefix("~"), set("HOME")) {
                (Ok(rest), Some(home)) => home.join(rest),
                _ => dir,
            };
            Some(HubCache { root: if under.is_empty() { dir } else { dir.join(under) }, origin: Some(origin) })
        })
    }

    /// The cache folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The model of `repo` (`org/name`, or `name`) in this cache, as `pick` asks: the snapshot's
    /// folder when it has a `config.json` (and no GGUF file is asked for), else its GGUF file.
    ///
    /// Nothing is downloaded. A repo, revision or file that is not here is an [`ErrorKind::Io`]
    /// error naming every place looked at; a malformed repo id, revision or file name, or a
    /// snapshot with several GGUF files and none picked, is [`ErrorKind::InvalidInput`].
    pub fn find(&self, repo: &str, pick: &HubPick<'_>) -> Result<PathBuf> {
        let folder = repo_folder(repo)?;
        let repo_dir = self.root.join(&folder);
        if !repo_dir.is_dir() {
            let what = if self.root.is_dir() { format!("has no {folder}") } else { "does not exist".into() };
            return Err(Error::new(ErrorKind::Io, format!("{repo} is not in {self}: it {what}")));
        }
        let snapshot = snapshot(repo, &repo_dir, pick.revision.unwrap_or(DEFAULT_REVISION))?;
        model_in(repo, &snapshot, pick.gguf_file)
    }
}

/// Whether `repo` is a valid Hugging Face repo id, `org/name` or `name`: each part of ASCII
/// letters, digits, `-`, `_` and `.`, at most 96 of them, neither starting nor ending with `-`
/// or `.`, without `--` or `..` (which would make cache folder names ambiguous).
pub fn is_repo_id(repo: &str) -> bool {
    let part = |p: &str| {
        (1..=96).contains(&p.len())
            && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
            && !p.contains("--")
            && !p.contains("..")
    };
    match repo.split_once('/') {
        Some((org, name)) => part(org) && part(name),
        None => part(repo),
    }
}

/// The cache folder of `repo`: `models--{org}--{name}`.
fn repo_folder(repo: &str) -> Result<String> {
    if !is_repo_id(repo) {
        return Err(Error::invalid(format!("{repo:?} is not a Hugging Face repo id (org/name)")));
    }
    Ok(format!("models--{}", repo.replace('/', "--")))
}

/// Whether `path` is relative and stays below the folder it is joined to (no `..`, no root).
fn stays_below(path: &str) -> bool {
    !path.is_empty() && Path::new(path).components().all(|c| matches!(c, Component::Normal(_)))
}

/// The snapshot folder of `revision` in `repo_dir`: the commit `refs/{revision}` names, else the
/// commit `revision` is.
fn snapshot(repo: &str, repo_dir: &Path, revision: &str) -> Result<PathBuf> {
    if !stays_below(revision) {
        return Err(Error::invalid(format!("revision {revision:?} is not a ref name or commit hash")));
    }
    let ref_file = repo_dir.join("refs").join(revision);
    let snapshots = repo_dir.join("snapshots");
    match std::fs::read_to_string(&ref_file) {
        Ok(text) => {
            let commit = text.trim();
            if !stays_below(commit) || Path::new(commit).components().count() != 1 {
                return Err(Error::format(format!("{} holds {commit:?}, not a commit hash", ref_file.display())));
            }
            let dir = snapshots.join(commit);
            if dir.is_dir() {
                return Ok(dir);
            }
            Err(Error::new(
                ErrorKind::Io,
                format!("{} names commit {commit}, but there is no {}", ref_file.display(), dir.display()),
            ))
        }
        // A ref that is not there may be a commit hash; anything else stops here.
        Err(e) if matches!(e.kind(), IoKind::NotFound | IoKind::NotADirectory) => {
            let dir = snapshots.join(revision);
            if dir.is_dir() {
                return Ok(dir);
            }
            Err(Error::new(
                ErrorKind::Io,
                format!(
                    "{repo} has no revision {revision} in the cache: there is neither {} nor {} (refs: {}; \
                     snapshots: {})",
                    ref_file.display(),
                    dir.display(),
                    listing(&names(&repo_dir.join("refs"), |_| true)),
                    listing(&names(&snapshots, |_| true)),
                ),
            ))
        }
        Err(e) => Err(Error::io(&ref_file, e)),
    }
}

/// The model in `snapshot`: the GGUF file `gguf_file` names, else the folder itself when it has
/// a `config.json`, else its one GGUF file.
fn model_in(repo: &str, snapshot: &Path, gguf_file: Option<&str>) -> Result<PathBuf> {
    let ggufs = || names(snapshot, |name| name.to_ascii_lowercase().ends_with(".gguf"));
    if let Some(name) = gguf_file {
        if !stays_below(name) {
            return Err(Error::invalid(format!("GGUF file {name:?} is not a file name in the snapshot")));
        }
        let path = snapshot.join(name);
        // A link to a missing blob is found here and refused by the loader, which names it.
        if std::fs::symlink_metadata(&path).is_ok() {
            return Ok(path);
        }
        return Err(Error::new(
            ErrorKind::Io,
            format!("{repo} has no {name} in {}: its GGUF files are {}", snapshot.display(), listing(&ggufs())),
        ));
    }
    if std::fs::symlink_metadata(snapshot.join("config.json")).is_ok() {
        return Ok(snapshot.to_path_buf());
    }
    match ggufs().as_slice() {
        [one] => Ok(snapshot.join(one)),
        [] => Err(Error::new(
            ErrorKind::Io,
            format!(
                "{repo} has neither config.json nor a GGUF file in {} (it holds {})",
                snapshot.display(),
                listing(&names(snapshot, |_| true))
            ),
        )),
        several => Err(Error::invalid(format!(
            "{repo} has {} GGUF files in {}: {}; pick one with --gguf-file NAME",
            several.len(),
            snapshot.display(),
            several.join(", ")
        ))),
    }
}

/// The sorted names of the entries of `dir` that `keep` keeps; none when it cannot be read,
/// since the names only explain an error already found.
fn names(dir: &Path, keep: impl Fn(&str) -> bool) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut names: Vec<String> =
        entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| keep(n)).collect();
    names.sort();
    names
}

/// `names` for a message: comma-separated, or "none".
fn listing(names: &[String]) -> String {
    if names.is_empty() { "none".into() } else { names.join(", ") }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A folder under the system's temp folder, removed when dropped.
    pub(crate) struct Scratch(pub(crate) PathBuf);

    impl Scratch {
        pub(crate) fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("nexus-hub-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("temp dir");
            Scratch(dir)
        }

        pub(crate) fn write(&self, path: &str, text: &str) {
            let path = self.0.join(path);
            std::fs::create_dir_all(path.parent().expect("a parent")).expect("folders");
            std::fs::write(path, text).expect("write");
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            // Best effort: a leftover folder in the temp folder is harmless.
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const HASH: &str = "0123456789abcdef0123456789abcdef01234567";
    const OLD: &str = "fedcba9876543210fedcba9876543210fedcba98";

    fn err(cache: &HubCache, repo: &str, pick: HubPick<'_>) -> Error {
        cache.find(repo, &pick).expect_err("not found")
    }

    #[test]
    fn the_cache_comes_from_the_variables_huggingface_hub_reads() {
        let vars = |set: &'static [(&'static str, &'static str)]| {
            move |name: &str| set.iter().find(|(n, _)| *n == name).map(|(_, v)| OsString::from(v))
        };
        let cache = |set| HubCache::from_vars(vars(set)).map(|c| (c.root, c.origin.expect("an origin")));
        let all = &[("HF_HUB_CACHE", "/a"), ("HF_HOME", "/b"), ("XDG_CACHE_HOME", "/c"), ("HOME", "/d")];
        assert_eq!(cache(all), Some(("/a".into(), "$HF_HUB_CACHE")));
        assert_eq!(cache(&all[1..]), Some(("/b/hub".into(), "$HF_HOME/hub")));
        assert_eq!(cache(&all[2..]), Some(("/c/huggingface/hub".into(), "$XDG_CACHE_HOME/huggingface/hub")));
        assert_eq!(cache(&all[3..]), Some(("/d/.cache/huggingface/hub".into(), "~/.cache/huggingface/hub")));
        assert_eq!(
            cache(&[("HUGGINGFACE_HUB_CACHE", "/e"), ("HF_HOME", "/b")]),
            Some(("/e".into(), "$HUGGINGFACE_HUB_CACHE"))
        );
        // Empty is unset, and `~` is the home folder.
        assert_eq!(
            cache(&[("HF_HUB_CACHE", ""), ("HF_HOME", "~/hf"), ("HOME", "/d")]),
            Some(("/d/hf/hub".into(), "$HF_HOME/hub"))
        );
        assert_eq!(cache(&[]), None);
    }

    #[test]
    fn repo_ids() {
        for good in ["gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "org/name.v1_2", "models/x.gguf"] {
            assert!(is_repo_id(good), "{good}");
        }
        for bad in [
            "",
            "/",
            "a/b/c",
            "./x.gguf",
            "../x",
            "/abs/path",
            "org/",
            "-x/y",
            "x./y",
            "a--b/c",
            "a/b..c",
            "synthetic:tiny",
            "a b",
        ] {
            assert!(!is_repo_id(bad), "{bad}");
        }
        assert_eq!(repo_folder("org/name").expect("valid"), "models--org--name");
        assert_eq!(repo_folder("gpt2").expect("valid"), "models--gpt2");
        assert_eq!(repo_folder("a/b/c").expect_err("invalid").kind(), ErrorKind::InvalidInput);
    }

    #[test]
    fn a_hf_folder_at_main_a_tag_or_a_commit() {
        let s = Scratch::new("folder");
        let cache = HubCache::at(&s.0);
        // The hub writes the hash without a newline; one is tolerated.
        s.write("models--org--tiny/refs/main", HASH);
        s.write("models--org--tiny/refs/v1", &format!("{OLD}\n"));
        s.write(&format!("models--org--tiny/snapshots/{HASH}/config.json"), "{}");
        s.write(&format!("models--org--tiny/snapshots/{OLD}/config.json"), "{}");
        let snapshots = s.0.join("models--org--tiny/snapshots");
        assert_eq!(cache.find("org/tiny", &HubPick::default()).expect("main"), snapshots.join(HASH));
        let at = |revision| cache.find("org/tiny", &HubPick { revision: Some(revision), gguf_file: None });
        assert_eq!(at("v1").expect("a tag"), snapshots.join(OLD));
        assert_eq!(at(OLD).expect("a commit"), snapshots.join(OLD));

        let e = at("v2").expect_err("no such revision");
        assert_eq!(e.kind(), ErrorKind::Io);
        for part in ["refs/v2", "snapshots/v2", "refs: main, v1", &format!("snapshots: {HASH}, {OLD}")] {
            assert!(e.message().contains(part), "{part}: {e}");
        }
        assert_eq!(at("../../x").expect_err("outside").kind(), ErrorKind::InvalidInput);

        // A ref to a commit whose snapshot is gone.
        s.write("models--org--tiny/refs/v3", "0000");
        let e = at("v3").expect_err("no snapshot");
        assert!(e.message().contains("names commit 0000") && e.message().contains("snapshots/0000"), "{e}");
        s.write("models--org--tiny/refs/v4", "../..");
        assert_eq!(at("v4").expect_err("not a hash").kind(), ErrorKind::Format);
    }

    #[test]
    fn gguf_files_in_a_snapshot() {
        let s = Scratch::new("gguf");
        let cache = HubCache::at(&s.0);
        let snapshot = s.0.join(format!("models--org--q/snapshots/{HASH}"));
        s.write("models--org--q/refs/main", HASH);
        s.write(&format!("models--org--q/snapshots/{HASH}/README.md"), "");
        let e = err(&cache, "org/q", HubPick::default());
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(
            e.message().contains("neither config.json nor a GGUF file") && e.message().contains("README.md"),
            "{e}"
        );

        s.write(&format!("models--org--q/snapshots/{HASH}/q4.gguf"), "");
        assert_eq!(cache.find("org/q", &HubPick::default()).expect("the one"), snapshot.join("q4.gguf"));

        s.write(&format!("models--org--q/snapshots/{HASH}/Q8.GGUF"), "");
        let e = err(&cache, "org/q", HubPick::default());
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.message().contains("2 GGUF files") && e.message().contains("Q8.GGUF, q4.gguf"), "{e}");
        assert!(e.message().contains("--gguf-file"), "{e}");

        let pick = |name| HubPick { revision: None, gguf_file: Some(name) };
        assert_eq!(cache.find("org/q", &pick("Q8.GGUF")).expect("picked"), snapshot.join("Q8.GGUF"));
        let e = err(&cache, "org/q", pick("q2.gguf"));
        assert!(e.message().contains("no q2.gguf") && e.message().contains("Q8.GGUF, q4.gguf"), "{e}");
        assert_eq!(err(&cache, "org/q", pick("../x.gguf")).kind(), ErrorKind::InvalidInput);

        // A GGUF file asked for wins over a config.json beside it.
        s.write(&format!("models--org--q/snapshots/{HASH}/config.json"), "{}");
        assert_eq!(cache.find("org/q", &HubPick::default()).expect("the folder"), snapshot);
        assert_eq!(cache.find("org/q", &pick("q4.gguf")).expect("picked"), snapshot.join("q4.gguf"));
    }

    #[test]
    fn what_is_missing_is_named() {
        let s = Scratch::new("missing");
        let e = err(&HubCache::at(s.0.join("nowhere")), "org/x", HubPick::default());
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(e.message().contains("nowhere") && e.message().contains("does not exist"), "{e}");

        let cache = HubCache::from_vars(|name| (name == "HF_HUB_CACHE").then(|| s.0.clone().into_os_string()))
            .expect("a cache");
        let e = err(&cache, "org/x", HubPick::default());
        assert!(e.message().contains("has no models--org--x") && e.message().contains("(from $HF_HUB_CACHE)"), "{e}");

        s.write("models--org--x/snapshots/.keep", "");
        let e = err(&cache, "org/x", HubPick::default());
        assert!(e.message().contains("refs/main") && e.message().contains("refs: none"), "{e}");
        assert_eq!(err(&cache, "a/b/c", HubPick::default()).kind(), ErrorKind::InvalidInput);
    }
}
