//! A TCP relay on loopback in front of a proxy's admin port: it counts the connections
//! the drain helper opens, and it can stand in for a mesh sidecar that redirects inbound
//! traffic (the proxy then sees every call come from the sidecar's address).
#![allow(dead_code, clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::broadcast;
use tokio::task::JoinSet;

/// Which source address the relay's upstream connection uses.
#[derive(Clone, Copy, Debug)]
pub enum Source {
    /// The caller's own IP: the proxy sees the same caller as without the relay.
    Caller,
    /// A fixed IP, as a redirecting sidecar does (Istio's inbound passthrough uses
    /// 127.0.0.6).
    Fixed(IpAddr),
}

/// A running relay; it stops (with every connection it holds) when dropped.
pub struct Relay {
    /// Where callers connect.
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    cut: broadcast::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Listens on `listen_ip` (any port) and forwards every connection to `upstream`.
    pub async fn start(listen_ip: IpAddr, upstream: SocketAddr, source: Source) -> Self {
        let listener = TcpListener::bind(SocketAddr::new(listen_ip, 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let requests = Arc::new(AtomicUsize::new(0));
        let sent = requests.clone();
        let (cut, _) = broadcast::channel(1);
        let cuts = cut.clone();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((mut inbound, peer)) = listener.accept().await {
                counter.fetch_add(1, Relaxed);
                let from = match source {
                    Source::Caller => peer.ip(),
                    Source::Fixed(ip) => ip,
                };
                let mut cut = cuts.subscribe();
                let sent = sent.clone();
                connections.spawn(async move {
                    let socket = TcpSocket::new_v4().unwrap();
                    socket.bind(SocketAddr::new(from, 0)).unwrap();
                    if let Ok(mut outbound) = socket.connect(upstream).await {
                        tokio::select! {
                            () = relay(&mut inbound, &mut outbound, &sent) => {}
                            _ = cut.recv() => {}
                        }
                    }
                });
            }
        });
        Self {
            addr,
            accepted,
            requests,
            cut,
            task,
        }
    }

    /// Closes every connection open now (as a proxy closing idle keep-alive
    /// connections does); the relay keeps accepting new ones.
    pub fn cut(&self) {
        let _ = self.cut.send(());
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Relaxed)
    }

    /// Reads passed on from callers, over every connection: one per request for a
    /// caller that sends small requests and waits for each answer (the drain helper).
    pub fn requests(&self) -> usize {
        self.requests.load(Relaxed)
    }
}

/// Copies both ways until both sides have closed (as `copy_bidirectional`), counting
/// the reads from the caller in `sent`.
async fn relay(inbound: &mut TcpStream, outbound: &mut TcpStream, sent: &AtomicUsize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut from_caller, mut to_caller) = inbound.split();
    let (mut from_upstream, mut to_upstream) = outbound.split();
    let up = async {
        let mut buf = vec![0; 16 * 1024];
        while let Ok(n @ 1..) = from_caller.read(&mut buf).await {
            sent.fetch_add(1, Relaxed);
            if to_upstream.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = to_upstream.shutdown().await;
    };
    let down = async {
        let _ = tokio::io::copy(&mut from_upstream, &mut to_caller).await;
        let _ = to_caller.shutdown().await;
    };
    tokio::join!(up, down);
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
