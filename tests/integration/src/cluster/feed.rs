//! The EndpointSlice feed: what the EndpointSlice controller would publish for a
//! Service's pods, delivered after a propagation delay to a proxy's endpoints file
//! and/or to an in-process watcher (the kube-proxy stand-in).

use serde::Serialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// One endpoint, in the proxy's endpoints-file format.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FeedEntry {
    /// Pod IP and port.
    pub address: SocketAddr,
    /// Pod name.
    pub name: String,
    /// Ready and not terminating.
    pub ready: bool,
    /// Ready, terminating or not.
    pub serving: bool,
    /// Being deleted.
    pub terminating: bool,
}

/// Publishes endpoint sets, each after the propagation delay, in order.
#[derive(Clone, Debug)]
pub struct EndpointFeed {
    tx: mpsc::UnboundedSender<(Instant, Vec<FeedEntry>)>,
    last: watch::Receiver<Vec<FeedEntry>>,
}

impl EndpointFeed {
    /// Starts the feed: sets go to `file` (written atomically, as JSON) and to the
    /// watcher returned by [`EndpointFeed::subscribe`], `delay` after they are published.
    pub fn start(delay: Duration, file: Option<PathBuf>) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<FeedEntry>)>();
        let (out, last) = watch::channel(Vec::new());
        if let Some(path) = &file {
            write(path, &[]);
        }
        tokio::spawn(async move {
            while let Some((at, entries)) = rx.recv().await {
                tokio::time::sleep_until(at + delay).await;
                if let Some(path) = &file {
                    write(path, &entries);
                }
                out.send_replace(entries);
            }
        });
        Self { tx, last }
    }

    /// Queues `entries` for delivery after the delay.
    pub fn publish(&self, entries: Vec<FeedEntry>) {
        let _ = self.tx.send((Instant::now(), entries));
    }

    /// The delivered sets (what a watcher has seen).
    pub fn subscribe(&self) -> watch::Receiver<Vec<FeedEntry>> {
        self.last.clone()
    }
}

fn write(path: &std::path::Path, entries: &[FeedEntry]) {
    let Ok(text) = serde_json::to_string_pretty(entries) else {
        return;
    };
    // Write-then-rename: a proxy polling the file never reads half of it.
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}
