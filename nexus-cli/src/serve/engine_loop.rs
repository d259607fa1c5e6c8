//! The engine thread: it owns the [`Engine`], takes in requests, steps the engine while there is
//! work and sends each request's tokens, its end or its failure to the request's own channel.
//!
//! A request whose receiver is gone (its client disconnected, or a stop string ended its output)
//! is aborted at the next turn of the loop, whatever its phase: waiting, prefilling in chunks or
//! decoding. A request the engine fails gets [`Update::Failed`] and the others go on; a step that
//! fails as a whole (`Err`: the engine itself is wrong) fails every request. When the server
//! shuts down, the thread takes no more requests, gives those in flight until a deadline, ends
//! the rest with [`Update::ShutDown`] and returns.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::Context;
use nexus_runtime::engine::sampling::TokenLogprobs;
use nexus_runtime::engine::{Engine, EngineEvent, FinishReason, RequestId, RequestOptions};
use nexus_runtime::model::backend::Backend;
use tokio::sync::{mpsc as tokio_mpsc, oneshot};

use crate::serve::metrics::Metrics;

/// What the HTTP side asks of the engine thread.
pub enum Command {
    Add {
        id: RequestId,
        prompt: Vec<u32>,
        options: RequestOptions,
        updates: tokio_mpsc::UnboundedSender<Update>,
        accepted: oneshot::Sender<Result<(), Refusal>>,
    },
    /// Take no more requests; end those still running at `deadline`; return when none is left.
    Drain { deadline: Instant },
}

/// Why a request was not taken.
pub enum Refusal {
    /// The engine refused it (a prompt too long for the cache, ...): the message says why.
    Invalid(String),
    /// The server is shutting down.
    ShuttingDown,
}

/// What happened to a request, in order: tokens, then one of the others, which ends it.
pub enum Update {
    Token {
        token: u32,
        logprobs: Option<Box<TokenLogprobs>>,
    },
    Finished(FinishReason),
    /// The engine failed the request, for the reason given.
    Failed(String),
    /// The server shut down before the request finished.
    ShutDown,
}

/// Starts the engine thread; it ends when the server drains it or when every sender of commands
/// is gone.
pub fn spawn<B: Backend + 'static>(
    engine: Engine<B>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(mpsc::Sender<Command>, JoinHandle<()>)>
where
    Engine<B>: Send,
{
    let (commands, received) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("nexus-engine".into())
        .spawn(move || {
            // Marks the engine down when the thread ends, by a panic too, so that `/health` says so.
            let _down = EngineDown(&metrics);
            EngineLoop { engine, metrics: &metrics, requests: HashMap::new(), deadline: None }.run(&received);
        })
        .context("starting the engine thread")?;
    Ok((commands, thread))
}

struct EngineDown<'a>(&'a Metrics);

impl Drop for EngineDown<'_> {
    fn drop(&mut self) {
        self.0.engine_down();
    }
}

struct EngineLoop<'a, B: Backend> {
    engine: Engine<B>,
    metrics: &'a Metrics,
    /// The channel of each request in the engine.
    requests: HashMap<RequestId, tokio_mpsc::UnboundedSender<Update>>,
    /// Set once draining: when the requests still running are ended.
    deadline: Option<Instant>,
}

impl<B: Backend> EngineLoop<'_, B> {
    fn run(&mut self, commands: &mpsc::Receiver<Command>) {
        self.engine.keep_timeline(true);
        loop {
            if !self.engine.has_unfinished() {
                if self.deadline.is_some() {
                    return;
                }
                match commands.recv() {
                    Ok(command) => self.handle(command),
                    Err(_) => return,
                }
            }
            while let Ok(command) = commands.try_recv() {
                self.handle(command);
            }
            // Clients that went away, in whatever phase their request is: stop it and free its
            // blocks now rather than when it would next produce a token.
            let engine = &mut self.engine;
            self.requests.retain(|&id, updates| {
                let gone = updates.is_closed();
                if gone {
                    engine.abort(id);
                }
                !gone
            });
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                for (id, updates) in self.requests.drain() {
                    self.engine.abort(id);
                    let _ = updates.send(Update::ShutDown);
                }
            }
            self.metrics.publish(&mut self.engine);
            // The engine's counts are published again once the iterations are planned (their
            // requests then run and hold blocks), before they run.
            let metrics = &self.metrics;
            let launched = self.engine.launch_idle(|engine| metrics.publish_counts(engine));
            match launched.map(|mut events| {
                events.extend(self.engine.finish_one());
                events
            }) {
                Ok(events) => self.deliver(events),
                Err(e) => {
                    // Not a failure of some requests but of the engine's own bookkeeping: which
                    // requests it left in what state is unknown, so all of them end.
                    let message = format!("the engine step failed: {e}");
                    for (id, updates) in self.requests.drain() {
                        self.engine.abort(id);
                        self.metrics.record_failure(&message);
                        let _ = updates.send(Update::Failed(message.clone()));
                    }
                }
            }
            self.metrics.publish(&mut self.engine);
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Add { accepted, .. } if self.deadline.is_some() => {
                let _ = accepted.send(Err(Refusal::ShuttingDown));
            }
            Command::Add { id, prompt, options, updates, accepted } => {
                let added = self.engine.add_request(id, prompt, options).map_err(|e| e.message().to_owned());
                let ok = added.is_ok();
                if accepted.send(added.map_err(Refusal::Invalid)).is_ok() && ok {
                    self.requests.insert(id, updates);
                } else if ok {
                    // The client left while it waited for the engine thread.
                    self.engine.abort(id);
                }
            }
            Command::Drain { deadline } => {
                self.deadline = Some(self.deadline.map_or(deadline, |d| d.min(deadline)));
            }
        }
    }

    /// Sends each event to its request's channel; a request that ended, or whose client left,
    /// is forgotten (and aborted, if it had not ended).
    fn deliver(&mut self, events: Vec<EngineEvent>) {
        for event in events {
            let (id, update) = match event {
                EngineEvent::Token { id, token, logprobs } => (id, Update::Token { token, logprobs }),
                EngineEvent::Finished { id, reason } => (id, Update::Finished(reason)),
                EngineEvent::Failed { id, message } => {
                    self.metrics.record_failure(&message);
                    (id, Update::Failed(message))
                }
            };
            let ended = !matches!(update, Update::Token { .. });
            let delivered = self.requests.get(&id).is_some_and(|s| s.send(update).is_ok());
            if ended || !delivered {
                self.requests.remove(&id);
            }
            if !delivered && !ended {
                self.engine.abort(id);
            }
        }
    }
}
