//! The kube-proxy stand-in: a TCP balancer that picks one backend at random per
//! *connection* (as kube-proxy's iptables/IPVS rules do) from the ready endpoints its
//! feed delivered, falling back to serving-but-terminating ones when none is ready.
//! Every request on a keep-alive connection then goes to the same pod.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::cluster::feed::FeedEntry;

/// A running connection-level balancer.
#[derive(Debug)]
pub struct L4Balancer {
    /// Where clients connect.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for L4Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl L4Balancer {
    /// Listens on `listen` and forwards each connection to a random endpoint of
    /// `backends` (seeded, so a run can be repeated).
    ///
    /// # Errors
    /// When `listen` cannot be bound.
    pub async fn start(
        listen: SocketAddr,
        backends: watch::Receiver<Vec<FeedEntry>>,
        seed: u64,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(seed)));
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let target = {
                    let set = backends.borrow();
                    let ready: Vec<SocketAddr> =
                        set.iter().filter(|e| e.ready).map(|e| e.address).collect();
                    let pool = if ready.is_empty() {
                        set.iter()
                            .filter(|e| e.serving && e.terminating)
                            .map(|e| e.address)
                            .collect()
                    } else {
                        ready
                    };
                    let mut rng = rng.lock().unwrap_or_else(PoisonError::into_inner);
                    (!pool.is_empty()).then(|| pool[rng.usize(..pool.len())])
                };
                tokio::spawn(forward(client, target));
            }
        });
        Ok(Self { addr, task })
    }
}

async fn forward(mut client: TcpStream, target: Option<SocketAddr>) {
    let _ = client.set_nodelay(true);
    let Some(target) = target else {
        // No endpoint: kube-proxy rejects the connection.
        reset(client);
        return;
    };
    let backend = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(target)).await;
    let mut backend = match backend {
        Ok(Ok(stream)) => stream,
        // A pod that is gone refuses: the client sees the connection reset.
        _ => {
            reset(client);
            return;
        }
    };
    let _ = backend.set_nodelay(true);
    if tokio::io::copy_bidirectional(&mut client, &mut backend)
        .await
        .is_err()
    {
        // One side broke (a pod killed mid-response): the other sees a reset too.
        reset(client);
    }
}

fn reset(stream: TcpStream) {
    // SO_LINGER 0 turns the close into a RST, as a refused or broken connection looks.
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
    drop(stream);
}
