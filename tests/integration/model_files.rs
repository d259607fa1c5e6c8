//! What a model path may name. Anything but a GGUF file or a Hugging Face folder of regular files
//! is refused before it is opened, with an I/O error saying what it is: a FIFO (whose opening
//! blocks until a writer comes, so `--model` on one used to hang forever), a device, a folder
//! without `config.json`, a folder with a FIFO in it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use nexus::runtime::weights::gguf::GgufFile;
use nexus::runtime::weights::loader;
use nexus::runtime::weights::safetensors::HfCheckpoint;
use nexus::runtime::{Error, ErrorKind};

/// A scratch folder under the target directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("model-files-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create scratch folder");
        Scratch(dir)
    }

    /// A scratch copy of a folder of tests/fixtures.
    fn copy_of(fixture: &str) -> Scratch {
        let s = Scratch::new();
        let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(fixture);
        for entry in std::fs::read_dir(from).expect("fixture folder") {
            let path = entry.expect("entry").path();
            std::fs::copy(&path, s.path(path.file_name().expect("file name").to_str().expect("UTF-8"))).expect("copy");
        }
        s
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Replaces `name` (if it is there) with a FIFO.
    fn fifo(&self, name: &str) -> PathBuf {
        let path = self.path(name);
        let _ = std::fs::remove_file(&path);
        let status = Command::new("mkfifo").arg(&path).status().expect("run mkfifo");
        assert!(status.success(), "mkfifo {}", path.display());
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Best effort: a leftover folder under the target directory is harmless.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `open` on another thread and returns its error, failing the test if it does not return
/// within 10 s: opening a FIFO blocks until a writer comes (the blocked thread is left behind).
#[track_caller]
fn refused_in_time<T>(open: impl FnOnce() -> Result<T, Error> + Send + 'static) -> Error {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(open().err());
    });
    let result = rx.recv_timeout(Duration::from_secs(10)).expect("opening blocked (a FIFO opened for reading?)");
    result.expect("the path should be refused")
}

#[track_caller]
fn assert_refused(err: &Error, needles: &[&str]) {
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    for needle in needles {
        assert!(err.to_string().contains(needle), "`{err}` should mention `{needle}`");
    }
}

#[test]
fn a_fifo_is_refused_without_blocking() {
    let s = Scratch::new();
    let fifo = s.fifo("model.gguf");
    let path = fifo.display().to_string();
    let err = refused_in_time({
        let fifo = fifo.clone();
        move || loader::open(&fifo)
    });
    assert_refused(&err, &[&path, "is a FIFO, socket or device, not a regular file"]);
    let err = refused_in_time(move || GgufFile::open(&fifo));
    assert_refused(&err, &[&path, "not a regular file"]);
}

#[test]
fn a_device_is_refused() {
    let err = refused_in_time(|| loader::open(Path::new("/dev/null")));
    assert_refused(&err, &["/dev/null is a FIFO, socket or device"]);
}

#[test]
fn a_folder_that_is_not_a_model_folder_is_refused() {
    let s = Scratch::new();
    std::fs::write(s.path("notes.txt"), "not a model").expect("write");
    let dir = s.0.clone();
    let err = refused_in_time(move || loader::open(&dir));
    assert_refused(&err, &["is a folder without config.json"]);
}

#[test]
fn fifos_in_a_hugging_face_folder_are_refused_without_blocking() {
    // Each file the checkpoint or its tokenizer reads, in turn.
    let cases = [
        ("tiny-llama", "config.json"),
        ("tiny-llama", "model.safetensors"),
        ("tiny-qwen2", "model.safetensors.index.json"),
        ("tiny-qwen2", "model-00002-of-00002.safetensors"),
        ("tiny-llama", "tokenizer.json"),
        ("tiny-llama", "tokenizer_config.json"),
        ("tiny-llama", "chat_template.jinja"),
    ];
    for (fixture, name) in cases {
        let s = Scratch::copy_of(fixture);
        // The fixtures have no tokenizer; the checks come before it is parsed.
        std::fs::write(s.path("tokenizer.json"), "{}").expect("write");
        s.fifo(name);
        let dir = s.0.clone();
        let err = refused_in_time(move || loader::open(&dir));
        assert_refused(&err, &[name, "is a FIFO, socket or device, not a regular file"]);
        if !name.contains("tokenizer") && !name.contains("template") {
            let dir = s.0.clone();
            let err = refused_in_time(move || HfCheckpoint::open(&dir));
            assert_refused(&err, &[name, "not a regular file"]);
        }
    }
}
