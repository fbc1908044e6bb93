//! Optional access log: one JSON line per request, written off the request path.
//!
//! Requests hand a record to a bounded channel; one task drains it every 20 ms,
//! serializes the records and writes them through a buffer, flushing after each drain.
//! When the writer cannot keep up, records are dropped and counted
//! (`ballast_access_log_dropped_total`) rather than slowing requests down.

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// Where the log goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// Standard output.
    Stdout,
    /// A file, appended to.
    File(PathBuf),
}

/// One request, as logged.
#[derive(Clone, Debug, Serialize)]
pub struct AccessRecord {
    /// When the request arrived (RFC 3339, UTC; formatted by the writer task).
    #[serde(serialize_with = "rfc3339")]
    pub time: std::time::SystemTime,
    /// Client address.
    pub client: SocketAddr,
    /// Method.
    pub method: String,
    /// Path, without the query unless configured.
    pub path: String,
    /// Status sent to the client.
    pub status: u16,
    /// Request body bytes received.
    pub bytes_in: u64,
    /// Response body bytes sent.
    pub bytes_out: u64,
    /// From request to the end of the response, in milliseconds.
    pub duration_ms: f64,
    /// Endpoint that answered, if any.
    pub upstream: Option<SocketAddr>,
    /// Its pod name, when known.
    pub pod: Option<String>,
    /// Endpoints tried.
    pub attempts: u32,
    /// Whether the upstream connection was reused from the pool.
    pub reused: bool,
    /// The request id (kept or generated).
    pub request_id: String,
    /// True for an upgraded connection (WebSocket); duration covers the whole tunnel.
    pub upgraded: bool,
    /// Why the proxy answered itself (`no-endpoint`, `upstream-failed`, ...), if it did.
    pub error: Option<&'static str>,
}

fn rfc3339<S: serde::Serializer>(
    time: &std::time::SystemTime,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match k8s_openapi::jiff::Timestamp::try_from(*time) {
        Ok(timestamp) => serializer.collect_str(&timestamp),
        Err(_) => serializer.serialize_none(),
    }
}

/// Handle that request tasks log through.
#[derive(Clone, Debug)]
pub struct AccessLog {
    tx: mpsc::Sender<AccessRecord>,
    dropped: Counter,
    /// Keep the query string in `path`.
    pub with_query: bool,
}

/// Records buffered between requests and the writer.
const CAPACITY: usize = 16 * 1024;

impl AccessLog {
    /// Starts the writer task. It ends, after a last flush, once every handle is
    /// dropped; await the returned task to be sure the log is complete.
    ///
    /// # Errors
    /// When the file cannot be opened.
    pub async fn start(
        destination: Destination,
        with_query: bool,
        dropped: Counter,
    ) -> std::io::Result<(Self, tokio::task::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel(CAPACITY);
        let writer = match destination {
            Destination::Stdout => tokio::spawn(write(rx, tokio::io::stdout())),
            Destination::File(path) => {
                let file = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .await?;
                tokio::spawn(write(rx, file))
            }
        };
        Ok((
            Self {
                tx,
                dropped,
                with_query,
            },
            writer,
        ))
    }

    /// Queues a record; never waits.
    pub fn record(&self, record: AccessRecord) {
        if self.tx.try_send(record).is_err() {
            self.dropped.inc();
        }
    }
}

/// How often the writer drains the queue (and flushes what it wrote): the most a line
/// waits before it is written.
const DRAIN_EVERY: std::time::Duration = std::time::Duration::from_millis(20);

async fn write<W: tokio::io::AsyncWrite + Unpin>(mut rx: mpsc::Receiver<AccessRecord>, out: W) {
    let mut out = tokio::io::BufWriter::with_capacity(64 * 1024, out);
    let mut line = Vec::with_capacity(512);
    // The queue is drained on a timer, never awaited record by record: a writer parked
    // in `recv()` makes every request's send wake it on another thread, an eventfd
    // write and an epoll wake-up per request. 16k records of room cover 20 ms at
    // 800k req/s.
    let mut drain = tokio::time::interval(DRAIN_EVERY);
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        drain.tick().await;
        let mut wrote = false;
        let closed = loop {
            match rx.try_recv() {
                Ok(record) => {
                    line.clear();
                    if serde_json::to_writer(&mut line, &record).is_ok() {
                        line.push(b'\n');
                        if let Err(e) = out.write_all(&line).await {
                            tracing::warn!(error = %e, "access log write failed");
                        }
                        wrote = true;
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => break false,
                // Every handle is gone and the queue is empty.
                Err(mpsc::error::TryRecvError::Disconnected) => break true,
            }
        };
        if (wrote || closed)
            && let Err(e) = out.flush().await
        {
            tracing::warn!(error = %e, "access log flush failed");
        }
        if closed {
            return;
        }
    }
}
