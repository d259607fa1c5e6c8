//! Shared by the CLI's integration tests: a `nexus serve` child process and the address it
//! listens on.
#![allow(dead_code)] // Each test crate uses its own subset.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A `nexus serve` process, killed when dropped.
pub struct Server {
    pub child: Child,
    /// `http://host:port`, from the line the server prints once it listens.
    pub base: String,
}

impl Server {
    /// Spawns `serve` (a `nexus serve` command line; its stdout is taken here, its stderr left
    /// as set) and waits for the line that says where it listens. Stdout is drained from then
    /// on, so that the server never blocks on it.
    pub fn spawn(mut serve: Command) -> Server {
        let mut child = serve.stdout(Stdio::piped()).spawn().expect("start nexus serve");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let line = lines.next().expect("a line").expect("read");
        let Some(base) = line.strip_prefix("nexus serve: listening on ").map(str::to_owned) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("expected the address line, got {line:?}");
        };
        std::thread::spawn(move || lines.for_each(drop));
        Server { child, base }
    }

    /// Sends the server `signal` (`TERM`, `INT`).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").arg(format!("-{signal}")).arg(self.child.id().to_string()).status();
        assert!(status.expect("run kill").success(), "kill -{signal}");
    }

    /// Waits for the server to exit, at most `limit`.
    pub fn exit_status(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "the server did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The `host:port` it listens on.
    pub fn addr(&self) -> &str {
        self.base.strip_prefix("http://").expect("an http URL")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
