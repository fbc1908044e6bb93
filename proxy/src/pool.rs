//! Per-endpoint connection pools.
//!
//! HTTP/1.1 connections are kept idle in a LIFO list (the most recently used one is the
//! least likely to have been closed by the backend) and expire after the idle timeout,
//! which should be shorter than the backends' keep-alive. An idle connection is reused
//! only by the worker thread it lives on (see [`crate::workers`]), so a request and its
//! upstream connection never wake each other across threads. HTTP/2 endpoints get one
//! multiplexed connection per worker thread, for the same reason (as Envoy's per-worker
//! pools do): every frame of a stream would otherwise cross threads twice. Every
//! connection is counted on its endpoint while open: the drain gate reads that count.

use crate::registry::EndpointState;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Errors a body sent upstream may carry.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A request body on its way to a backend.
pub type UpstreamBody = crate::forward::ProxyBody;

pub use ballast_api::settings::BackendProtocol;

/// A connection ready to carry one request.
#[derive(Debug)]
pub enum Sender {
    /// An HTTP/1.1 connection, exclusively ours until returned.
    Http1(http1::SendRequest<UpstreamBody>),
    /// A handle on the shared HTTP/2 connection.
    Http2(http2::SendRequest<UpstreamBody>),
}

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP connect failed.
    #[error("connect to {address} failed")]
    Connect {
        /// Endpoint.
        address: std::net::SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// TCP connect did not finish in time.
    #[error("connect to {address} timed out after {timeout:?}")]
    Timeout {
        /// Endpoint.
        address: std::net::SocketAddr,
        /// The limit.
        timeout: Duration,
    },
    /// The HTTP handshake failed.
    #[error("HTTP handshake with {address} failed")]
    Handshake {
        /// Endpoint.
        address: std::net::SocketAddr,
        /// Cause.
        #[source]
        source: hyper::Error,
    },
}

/// Idle connections of one endpoint.
#[derive(Debug, Default)]
pub struct Pool {
    idle: Mutex<Vec<Idle>>,
    /// The HTTP/2 connection of each worker thread (`None`: outside the workers).
    h2: Mutex<Vec<(Option<usize>, http2::SendRequest<UpstreamBody>)>>,
    /// Held while an HTTP/2 connection is being established, so concurrent first
    /// requests share one connection instead of racing to open several.
    h2_connecting: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
struct Idle {
    sender: http1::SendRequest<UpstreamBody>,
    since: Instant,
    /// The worker whose runtime drives the connection.
    home: Option<usize>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Pool {
    /// Takes the most recently used live idle connection that lives on worker `home`;
    /// drops expired ones.
    fn take_idle(
        &self,
        now: Instant,
        idle_timeout: Duration,
        home: Option<usize>,
    ) -> Option<http1::SendRequest<UpstreamBody>> {
        let mut idle = lock(&self.idle);
        // Newest first; dead or expired ones met on the way go (the rest wait for
        // `expire`, so a checkout does not scan the whole list).
        while let Some(newest) = idle.iter().rposition(|c| c.home == home) {
            let candidate = idle.remove(newest);
            if !candidate.sender.is_closed()
                && now.saturating_duration_since(candidate.since) < idle_timeout
            {
                return Some(candidate.sender);
            }
        }
        None
    }

    /// Returns a connection that lives on worker `home` after a complete exchange.
    pub fn put(&self, sender: http1::SendRequest<UpstreamBody>, home: Option<usize>, now: Instant) {
        if !sender.is_closed() {
            lock(&self.idle).push(Idle {
                sender,
                since: now,
                home,
            });
        }
    }

    /// Closes every idle connection (dropping the handle ends the connection task).
    pub fn close_idle(&self) {
        let idle = std::mem::take(&mut *lock(&self.idle));
        drop(idle);
        lock(&self.h2).clear();
    }

    /// Worker `home`'s HTTP/2 connection, while it is open and can take a stream.
    fn shared_h2(&self, home: Option<usize>) -> Option<http2::SendRequest<UpstreamBody>> {
        lock(&self.h2)
            .iter()
            .find(|(h, s)| *h == home && !s.is_closed() && s.is_ready())
            .map(|(_, s)| s.clone())
    }

    /// Drops idle connections older than `idle_timeout`.
    pub fn expire(&self, now: Instant, idle_timeout: Duration) {
        lock(&self.idle).retain(|c| {
            !c.sender.is_closed() && now.saturating_duration_since(c.since) < idle_timeout
        });
    }
}

/// Connection settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectConfig {
    /// Protocol to the backends.
    pub protocol: BackendProtocol,
    /// TCP connect limit.
    pub connect_timeout: Duration,
    /// Idle connections older than this are not reused.
    pub idle_timeout: Duration,
}

/// A connection to `endpoint`, reused when one is idle. Returns whether it was reused.
///
/// # Errors
/// When a new connection cannot be established.
pub async fn checkout(
    endpoint: &Arc<EndpointState>,
    config: ConnectConfig,
) -> Result<(Sender, bool), ConnectError> {
    match config.protocol {
        BackendProtocol::Http1 => {
            // Connections are spawned on, and so live on, the worker that opened them.
            let home = crate::workers::current();
            let now = Instant::now();
            while let Some(mut sender) = endpoint.pool.take_idle(now, config.idle_timeout, home) {
                // A pooled connection whose backend closed it is discovered here (or,
                // in a race, when the request fails: see the proxy's retry rule).
                if sender.ready().await.is_ok() {
                    return Ok((Sender::Http1(sender), true));
                }
            }
        }
        BackendProtocol::H2c => {
            if let Some(sender) = endpoint.pool.shared_h2(crate::workers::current()) {
                return Ok((Sender::Http2(sender), true));
            }
        }
    }
    // The cold path, boxed: a connect's state machine (TCP connect, timeout, handshake)
    // would otherwise make every request's future kilobytes larger, and each request
    // moves its future around several times.
    Box::pin(open(endpoint, config)).await
}

/// Opens a new connection to `endpoint` (for HTTP/2: unless another request just did).
async fn open(
    endpoint: &Arc<EndpointState>,
    config: ConnectConfig,
) -> Result<(Sender, bool), ConnectError> {
    match config.protocol {
        BackendProtocol::Http1 => {
            let io = connect(endpoint, config).await?;
            let (sender, conn) = http1::Builder::new()
                .handshake(io)
                .await
                .map_err(|source| ConnectError::Handshake {
                    address: endpoint.address,
                    source,
                })?;
            track(endpoint, conn.with_upgrades());
            Ok((Sender::Http1(sender), false))
        }
        BackendProtocol::H2c => {
            let home = crate::workers::current();
            let _connecting = endpoint.pool.h2_connecting.lock().await;
            if let Some(sender) = endpoint.pool.shared_h2(home) {
                return Ok((Sender::Http2(sender), true));
            }
            let io = connect(endpoint, config).await?;
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .handshake(io)
                .await
                .map_err(|source| ConnectError::Handshake {
                    address: endpoint.address,
                    source,
                })?;
            track(endpoint, conn);
            if !endpoint.is_draining() {
                let mut shared = lock(&endpoint.pool.h2);
                shared.retain(|(h, s)| *h != home && !s.is_closed());
                shared.push((home, sender.clone()));
            }
            Ok((Sender::Http2(sender), false))
        }
    }
}

async fn connect(
    endpoint: &EndpointState,
    config: ConnectConfig,
) -> Result<TokioIo<TcpStream>, ConnectError> {
    let address = endpoint.address;
    let stream = tokio::time::timeout(config.connect_timeout, TcpStream::connect(address))
        .await
        .map_err(|_| ConnectError::Timeout {
            address,
            timeout: config.connect_timeout,
        })?
        .map_err(|source| ConnectError::Connect { address, source })?;
    // Small requests and responses must not wait for Nagle's algorithm.
    let _ = stream.set_nodelay(true);
    Ok(TokioIo::new(stream))
}

/// Drives a connection and keeps the endpoint's open-connection count while it lives.
fn track<F>(endpoint: &Arc<EndpointState>, conn: F)
where
    F: std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    endpoint.connections.fetch_add(1, Relaxed);
    endpoint.connections_opened.fetch_add(1, Relaxed);
    let endpoint = endpoint.clone();
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(endpoint = %endpoint.address, error = %e, "upstream connection ended with an error");
        }
        endpoint.connections.fetch_sub(1, Relaxed);
    });
}
