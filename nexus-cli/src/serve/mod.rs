//! `nexus serve`: an OpenAI-compatible HTTP API over the engine.
//!
//! One thread owns the [`Engine`] and steps it while there is work ([`engine_loop`]). HTTP
//! handlers ([`router`], axum on tokio, over connections with read timeouts and a limit:
//! [`connections`]) check requests and tokenize them ([`openai`]), submit them to the engine
//! thread over a channel and get each request's tokens back on a channel of their own, which
//! [`stream`] turns into text (through the runtime's detokenizer, the same path as
//! `nexus generate`) and [`response`] into JSON or server-sent events. [`metrics`] backs
//! `/metrics` and `/health`.
//!
//! A request the engine fails (a device error, logits that are not numbers) gets a 500 with an
//! OpenAI-style error body, or, streamed, an error event then `[DONE]`; the others go on,
//! `/health` says `degraded` with the latest error and `nexus_request_failures_total` counts it.
//! A client that goes away is aborted at the engine's next step, whatever its request's phase,
//! which frees its KV blocks at once. On SIGINT or SIGTERM the server stops accepting
//! connections, gives the requests in flight the shutdown grace period to finish, ends the rest
//! (503, or an error event then `[DONE]`), and returns.
//!
//! A model without a tokenizer (`synthetic:<name>`) takes token ids in and gives token ids out:
//! its prompts must be token-id arrays, its `text` is always "" and its token ids are always
//! returned; text prompts, stop strings and `/v1/chat/completions` get a 400.
//!
//! `/metrics` also shows the engine's lanes (one, `mixed`, for the chunked schedule; `prefill`
//! and `decode` for nexus): each lane's current budget in SMs, and histograms of its iterations'
//! latency and of the engine thread's CPU time on each, from the engine's timeline, which the
//! engine thread drains after every step.

mod connections;
mod engine_loop;
mod metrics;
mod openai;
mod response;
mod router;
mod stream;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use anyhow::Context;
use nexus_runtime::engine::Engine;
use nexus_runtime::model::backend::Backend;
use nexus_runtime::text::tokenizer::Tokenizer;

pub use crate::serve::connections::HttpLimits;
use crate::serve::engine_loop::Command;
use crate::serve::metrics::Metrics;

/// Settings of the server.
pub struct ServerConfig {
    pub model_name: String,
    pub api_key: Option<String>,
    pub max_context: usize,
    /// Token ids of prompts must be below this.
    pub vocab_size: usize,
    pub limits: HttpLimits,
    /// How long the requests in flight at SIGINT or SIGTERM may take to finish.
    pub shutdown_grace: Duration,
}

/// What the handlers share.
struct AppState {
    engine: mpsc::Sender<Command>,
    /// `None` for a tokenizer-free model: token ids in, token ids out.
    tokenizer: Option<Tokenizer>,
    config: ServerConfig,
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
}

/// How long connections may take to close once the engine is done: responses already made need
/// only be written, and a client that reads nothing does not hold the exit longer.
const CLOSE_LIMIT: Duration = Duration::from_secs(5);

/// Serves `engine` on `listener` until SIGINT or SIGTERM, then shuts down gracefully (see the
/// module documentation). Prints the address it listens on.
pub async fn serve<B: Backend + 'static>(
    engine: Engine<B>,
    tokenizer: Option<Tokenizer>,
    config: ServerConfig,
    listener: tokio::net::TcpListener,
) -> anyhow::Result<()>
where
    Engine<B>: Send,
{
    // Listening for the signals before saying where the server listens: from then on, a signal
    // is a graceful shutdown rather than the default, an abrupt exit.
    let mut signals = ShutdownSignals::new().context("listening for SIGINT and SIGTERM")?;
    let metrics = Arc::new(Metrics::new(&engine.lane_budgets()));
    let (commands, engine_thread) = engine_loop::spawn(engine, metrics.clone())?;
    let limits = config.limits;
    let grace = config.shutdown_grace;
    let state = Arc::new(AppState { engine: commands.clone(), tokenizer, config, next_id: AtomicU64::new(1), metrics });
    let addr = listener.local_addr()?;
    println!("nexus serve: listening on http://{addr}");
    let connections = connections::accept_until(listener, router::router(state), limits, signals.recv()).await;

    eprintln!("nexus serve: shutting down; requests in flight have {} s to finish", grace.as_secs_f64());
    let _ = commands.send(Command::Drain { deadline: Instant::now() + grace });
    connections.close();
    // A second signal cuts the grace period short.
    let hurry = commands.clone();
    tokio::spawn(async move {
        signals.recv().await;
        eprintln!("nexus serve: second signal; ending the requests in flight now");
        let _ = hurry.send(Command::Drain { deadline: Instant::now() });
    });
    let ended = tokio::task::spawn_blocking(move || engine_thread.join()).await;
    let open = connections.wait(CLOSE_LIMIT).await;
    if open > 0 {
        eprintln!("nexus serve: {open} connections still open after their responses; closing them");
    }
    match ended {
        Ok(Ok(())) => Ok(()),
        _ => anyhow::bail!("the engine thread panicked"),
    }
}

/// SIGINT and SIGTERM (Ctrl-C elsewhere than on Unix).
struct ShutdownSignals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    #[cfg(unix)]
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(ShutdownSignals { interrupt: signal(SignalKind::interrupt())?, terminate: signal(SignalKind::terminate())? })
    }

    #[cfg(not(unix))]
    fn new() -> std::io::Result<Self> {
        Ok(ShutdownSignals {})
    }

    /// Waits for the next signal.
    async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}
