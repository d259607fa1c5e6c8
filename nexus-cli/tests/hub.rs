//! `--model org/name` from the local Hugging Face cache on the CPU backend: a fake cache laid out
//! as the hub lays it out (`models--{org}--{name}/refs/main` holding a commit hash,
//! `snapshots/{hash}/` of relative links into `blobs/`) holds the tiny-llama fixture as a Hugging
//! Face folder and the default model as a GGUF file. `generate`, `bench`, `serve` and `profile`
//! find them through `$HF_HUB_CACHE` or `$HF_HOME`, at `main`, a tag or a commit; several GGUF
//! files need `--gguf-file`; a model found nowhere fails with every place looked at; nothing is
//! downloaded (the cache is all there is).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};

mod common;
use common::Server;

const MAIN: &str = "0123456789abcdef0123456789abcdef01234567";
const TAGGED: &str = "fedcba9876543210fedcba9876543210fedcba98";

/// A scratch folder under the target directory, removed when dropped, holding a fake Hugging Face
/// cache in `hub/`.
struct FakeCache(PathBuf);

impl Drop for FakeCache {
    fn drop(&mut self) {
        // Best effort: a leftover folder under the target directory is harmless.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl FakeCache {
    /// A cache with `test-org/tiny-llama` (the fixture with a tokenizer, at `main`) and
    /// `test-org/smol-gguf` (the default model's GGUF at `main`; two names for it at the tag
    /// `two`).
    fn new() -> FakeCache {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("hub-cli-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cache = FakeCache(dir);
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama");
        let tiny = cache.0.join("hub/models--test-org--tiny-llama");
        write(&tiny.join("blobs/b1"), &std::fs::read(fixture.join("config.json")).expect("config"));
        write(&tiny.join("blobs/b2"), &std::fs::read(fixture.join("model.safetensors")).expect("weights"));
        write(&tiny.join("blobs/b3"), tokenizer_json().to_string().as_bytes());
        write(&tiny.join("blobs/b4"), json!({"eos_token": "</s>"}).to_string().as_bytes());
        let files = [("config.json", "b1"), ("model.safetensors", "b2"), ("tokenizer.json", "b3")];
        snapshot(&tiny, MAIN, &[&files[..], &[("tokenizer_config.json", "b4")]].concat());
        write(&tiny.join("refs/main"), MAIN.as_bytes());

        let smol = cache.0.join("hub/models--test-org--smol-gguf");
        // The blob links to the fetched model rather than copying its 98 MB.
        std::fs::create_dir_all(smol.join("blobs")).expect("blobs");
        std::os::unix::fs::symlink(model(), smol.join("blobs/b1")).expect("blob link");
        snapshot(&smol, MAIN, &[("SmolLM2-135M-Instruct.Q4_1.gguf", "b1")]);
        snapshot(&smol, TAGGED, &[("a.Q4_1.gguf", "b1"), ("b.Q4_1.gguf", "b1"), ("README.md", "b1")]);
        write(&smol.join("refs/main"), MAIN.as_bytes());
        write(&smol.join("refs/two"), TAGGED.as_bytes());
        cache
    }

    /// `nexus args` with `$HF_HUB_CACHE` at this cache (and no other variable that names one).
    fn nexus(&self, args: &[&str]) -> Output {
        self.command(args).env("HF_HUB_CACHE", self.0.join("hub")).output().expect("run nexus")
    }

    /// `nexus args` with no variable naming a Hugging Face cache but `$HOME`, at this folder.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_nexus"));
        command.args(args).env("HOME", self.0.join("home")).env("NEXUS_CACHE_DIR", self.0.join("nexus"));
        for var in ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"] {
            command.env_remove(var);
        }
        command.env("RUST_BACKTRACE", "0");
        command
    }
}

fn model() -> PathBuf {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.is_file(), "{} is missing: run scripts/fetch-model.sh first", model.display());
    model
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().expect("a parent")).expect("folders");
    std::fs::write(path, bytes).expect("write");
}

/// `snapshots/{commit}/` of `repo`, each file a relative link to its blob, as the hub makes them.
fn snapshot(repo: &Path, commit: &str, files: &[(&str, &str)]) {
    let dir = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&dir).expect("snapshot");
    for (name, blob) in files {
        std::os::unix::fs::symlink(Path::new("../../blobs").join(blob), dir.join(name)).expect("link");
    }
}

/// A byte-level BPE tokenizer.json of the fixture's 32 tokens: `<s>`, `</s>`, `Ġ` (a space),
/// `a` to `z`, `.`, `,` and `!`, so that every id the model may sample decodes.
fn tokenizer_json() -> Value {
    let mut vocab = serde_json::Map::new();
    let pieces = ["<s>", "</s>", "\u{120}"].into_iter().map(String::from);
    let pieces = pieces.chain(('a'..='z').map(String::from)).chain([".", ",", "!"].map(String::from));
    for (id, piece) in pieces.enumerate() {
        vocab.insert(piece, json!(id));
    }
    assert_eq!(vocab.len(), 32, "the fixture's vocabulary");
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<s>"), special(1, "</s>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    })
}

#[track_caller]
fn succeeded(out: &Output) -> (String, String) {
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    (stdout.into_owned(), stderr.into_owned())
}

#[track_caller]
fn failed(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr.into_owned()
}

#[test]
fn a_hf_folder_from_the_cache_generates_and_benches() {
    let cache = FakeCache::new();
    let generate = ["generate", "--device", "cpu", "--model", "test-org/tiny-llama", "--prompt", "hi"];
    let short = ["--max-tokens", "4", "--ignore-eos"];
    let (stdout, stderr) = succeeded(&cache.nexus(&[&generate[..], &short].concat()));
    assert!(stdout.starts_with("hi"), "{stdout}");
    let snapshot = cache.0.join(format!("hub/models--test-org--tiny-llama/snapshots/{MAIN}"));
    assert!(stderr.contains(&format!("test-org/tiny-llama: {} in the Hugging Face cache", snapshot.display())));
    assert!(stderr.contains("loaded test-org/tiny-llama"), "{stderr}");

    // Through $HF_HOME/hub instead, at the commit itself: the same greedy output.
    let at_commit =
        cache.command(&[&generate[..], &short, &["--revision", MAIN]].concat()).env("HF_HOME", &cache.0).output();
    assert_eq!(succeeded(&at_commit.expect("run nexus")).0, stdout);

    let json = cache.0.join("bench.json");
    let bench = [
        &["bench", "--device", "cpu", "--model", "test-org/tiny-llama", "--workload", "random", "--rate", "inf"][..],
        &["--random-input-len", "8", "--random-output-len", "4", "--num-requests", "4", "--token-id-range", "2..32"],
        &["--json", json.to_str().expect("UTF-8")],
    ]
    .concat();
    succeeded(&cache.nexus(&bench));
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("parse");
    assert_eq!(doc["runs"][0]["completed"], 4, "{doc}");
}

#[test]
fn a_gguf_file_from_the_cache_is_the_file_itself() {
    let cache = FakeCache::new();
    let generate = ["generate", "--device", "cpu", "--prompt", "The capital of France is", "--max-tokens", "3"];
    let from_path = cache.nexus(&[&generate[..], &["--model", model().to_str().expect("UTF-8")]].concat());
    let from_cache = cache.nexus(&[&generate[..], &["--model", "test-org/smol-gguf"]].concat());
    assert_eq!(succeeded(&from_cache).0, succeeded(&from_path).0);

    // Several GGUF files at a tag: refused, listing them, until one is picked.
    let two = [&generate[..], &["--model", "test-org/smol-gguf", "--revision", "two"]].concat();
    let stderr = failed(&cache.nexus(&two));
    assert!(stderr.contains("2 GGUF files") && stderr.contains("a.Q4_1.gguf, b.Q4_1.gguf"), "{stderr}");
    assert!(stderr.contains("--gguf-file"), "{stderr}");
    let picked = cache.nexus(&[&two[..], &["--gguf-file", "b.Q4_1.gguf"]].concat());
    assert_eq!(succeeded(&picked).0, succeeded(&from_path).0);
    let stderr = failed(&cache.nexus(&[&two[..], &["--gguf-file", "c.gguf"]].concat()));
    assert!(stderr.contains("no c.gguf") && stderr.contains("a.Q4_1.gguf, b.Q4_1.gguf"), "{stderr}");

    // A revision or file name picks within a repo, not a path.
    let model = model();
    let stderr = failed(
        &cache.nexus(&[&generate[..], &["--model", model.to_str().expect("UTF-8"), "--gguf-file", "x"]].concat()),
    );
    assert!(stderr.contains("is a path"), "{stderr}");
}

#[test]
fn a_model_found_nowhere_names_every_place_looked_at() {
    let cache = FakeCache::new();
    let generate = ["generate", "--device", "cpu", "--prompt", "hi", "--model"];
    let stderr = failed(&cache.nexus(&[&generate[..], &["test-org/missing"]].concat()));
    let hub = cache.0.join("hub");
    for part in ["no file or folder at test-org/missing", &hub.display().to_string(), "(from $HF_HUB_CACHE)"] {
        assert!(stderr.contains(part), "{part}: {stderr}");
    }
    assert!(stderr.contains("has no models--test-org--missing"), "{stderr}");

    // Without a variable naming the cache, it is under $HOME, which has none.
    let out = cache.command(&[&generate[..], &["test-org/tiny-llama"]].concat()).output().expect("run nexus");
    let stderr = failed(&out);
    let home = cache.0.join("home/.cache/huggingface/hub");
    assert!(
        stderr.contains(&format!("{} (from ~/.cache/huggingface/hub): it does not exist", home.display())),
        "{stderr}"
    );

    let stderr = failed(&cache.nexus(&[&generate[..], &["test-org/tiny-llama", "--revision", "v9"]].concat()));
    assert!(stderr.contains("refs/v9") && stderr.contains("snapshots/v9") && stderr.contains("refs: main"), "{stderr}");

    // Not a repo id either: the path is all there was to look at.
    let stderr = failed(&cache.nexus(&[&generate[..], &["./none.gguf"]].concat()));
    assert!(stderr.contains("cannot open ./none.gguf") && stderr.contains("no Hugging Face repo id"), "{stderr}");

    // Random weights have no revision.
    let stderr = failed(&cache.nexus(&["profile", "--device", "cpu", "--model", "synthetic:tiny", "--revision", "v1"]));
    assert!(stderr.contains("not synthetic:tiny"), "{stderr}");

    // With --url the server has its model: the cache flags are refused.
    let out = cache.nexus(&["bench", "--url", "http://127.0.0.1:9", "--revision", "main"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn serve_names_a_model_from_the_cache_by_its_repo_id() {
    let cache = FakeCache::new();
    let mut serve = cache.command(&[
        "serve",
        "--device",
        "cpu",
        "--port",
        "0",
        "--cpu-kv-blocks",
        "64",
        "--model",
        "test-org/tiny-llama",
    ]);
    serve.env("HF_HUB_CACHE", cache.0.join("hub")).stderr(Stdio::inherit());
    let server = Server::spawn(serve);
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut response = agent.get(&format!("{}/v1/models", server.base)).call().expect("GET /v1/models");
    let models = response.body_mut().read_json::<Value>().expect("JSON");
    assert_eq!(models["data"][0]["id"], "test-org/tiny-llama");
}

#[test]
fn a_profile_of_a_model_from_the_cache_is_found_by_its_revision() {
    let cache = FakeCache::new();
    let model = ["--model", "test-org/tiny-llama", "--revision", "main"];
    let profile = [&["profile", "--device", "cpu", "--quick", "--grid", "32"][..], &model].concat();
    let (stdout, _) = succeeded(&cache.nexus(&profile));
    let saved = stdout.lines().find_map(|l| l.strip_prefix("saved ")).expect("the path it saved to");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(saved).expect("profile")).expect("JSON");
    assert_eq!(doc["model"], "test-org/tiny-llama@main");

    let bench = ["bench", "--device", "cpu", "--schedule", "nexus", "--workload", "random", "--rate", "inf"];
    let small =
        ["--random-input-len", "8", "--random-output-len", "4", "--num-requests", "4", "--token-id-range", "2..32"];
    succeeded(&cache.nexus(&[&bench[..], &small, &model].concat()));
    // Another revision has no profile, and the command that makes one names it.
    let stderr = failed(&cache.nexus(&[&bench[..], &small, &["--model", "test-org/tiny-llama"]].concat()));
    assert!(stderr.contains("nexus profile --model test-org/tiny-llama`"), "{stderr}");
}
