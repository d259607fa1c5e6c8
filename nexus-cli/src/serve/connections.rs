//! HTTP/1 connections over TCP, with what keeps slow or idle clients from holding the server:
//! a limit on open connections (beyond it, new ones wait in the listen backlog rather than take a
//! file descriptor each), a timeout on reading each request's head (hyper's: it also closes
//! keep-alive connections idle that long), and the body timeout of the router. On shutdown, the
//! listener closes and each connection closes once its response in progress is written.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

/// Limits on clients' connections and reads.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// The most time a client may take to send a request's head (and a connection may stay idle
    /// between requests).
    pub header_timeout: Duration,
    /// The most time a client may take to send a request's body.
    pub body_timeout: Duration,
    /// The most connections open at once.
    pub max_connections: usize,
}

/// The connections still open after the listener closed.
pub struct Connections {
    tasks: JoinSet<()>,
    closing: watch::Sender<bool>,
}

/// Serves `app` on the connections `listener` accepts, within `limits`, until `stop` completes;
/// then closes the listener and returns the connections still open.
pub async fn accept_until(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    stop: impl Future<Output = ()>,
) -> Connections {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let (closing, _) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    tokio::pin!(stop);
    loop {
        // Finished connections leave the set as they go, so that it holds only open ones.
        while tasks.try_join_next().is_some() {}
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut stop => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, most likely: wait for some to close rather than spin.
                    eprintln!("nexus serve: cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        // Streamed tokens go out as small writes, which Nagle's algorithm would hold back until
        // the previous ones are acknowledged.
        let _ = stream.set_nodelay(true);
        let connection = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let mut closing = closing.subscribe();
        tasks.spawn(async move {
            let _permit = permit;
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => return,
                _ = closing.wait_for(|&closing| closing) => {}
            }
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        });
    }
    Connections { tasks, closing }
}

impl Connections {
    /// Tells every connection to close once the response it is writing is done (an idle one at
    /// once).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Waits until every connection has closed, or `limit` has passed; returns how many were
    /// still open then (they are dropped).
    pub async fn wait(mut self, limit: Duration) -> usize {
        let all = async { while self.tasks.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(limit, all).await;
        self.tasks.len()
    }
}
