//! Upgraded connections (WebSocket): joining both sides after a 101 and cutting the
//! tunnels still open at the end of the proxy's own drain.

use super::body::{ProxyBody, TrackedBody};
use super::{Proxy, ProxyService, ResponseBody};
use crate::pool::BoxError;
use crate::registry::EndpointState;
use http::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::time::Instant;

/// Upgraded tunnels of this proxy.
#[derive(Debug)]
pub(super) struct Tunnels {
    open: std::sync::atomic::AtomicUsize,
    cut: tokio::sync::watch::Sender<bool>,
}

impl Default for Tunnels {
    fn default() -> Self {
        Self {
            open: std::sync::atomic::AtomicUsize::new(0),
            cut: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl Proxy {
    /// Waits until every tunnel has closed or `deadline` passes, then cuts the rest.
    /// Returns how many had to be cut.
    pub async fn close_tunnels(&self, deadline: Instant) -> usize {
        while self.tunnels.open.load(Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let forced = self.tunnels.open.load(Relaxed);
        self.tunnels.cut.send_replace(true);
        forced
    }
}

impl ProxyService {
    /// Completes a WebSocket-style upgrade: on 101 both sides are joined and the tunnel
    /// counts as a request and a connection on its endpoint until it closes.
    pub(super) fn finish_upgrade(
        &self,
        response: Response<TrackedBody>,
        client_upgrade: hyper::upgrade::OnUpgrade,
        endpoint: Arc<EndpointState>,
    ) -> Response<ResponseBody> {
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return response.map(ProxyBody::Tracked);
        }
        let (head, mut body) = response.into_parts();
        let upstream_upgrade = body.take_upgrade();
        let metrics = self.proxy.metrics.clone();
        endpoint.connections.fetch_add(1, Relaxed);
        endpoint.in_flight.fetch_add(1, Relaxed);
        metrics.upgrades.inc();
        let tunnels = self.proxy.tunnels.clone();
        tunnels.open.fetch_add(1, Relaxed);
        let mut cut = tunnels.cut.subscribe();
        tokio::spawn(async move {
            let joined = async {
                let upstream = upstream_upgrade.ok_or("upstream did not upgrade")?.await?;
                let client = client_upgrade.await?;
                let mut upstream = TokioIo::new(upstream);
                let mut client = TokioIo::new(client);
                tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
                Ok::<_, BoxError>(())
            };
            tokio::select! {
                result = joined => {
                    if let Err(e) = result {
                        tracing::debug!(endpoint = %endpoint.address, error = %e, "upgraded connection ended with an error");
                    }
                }
                _ = cut.wait_for(|cut| *cut) => {
                    tracing::warn!(endpoint = %endpoint.address, "upgraded connection closed: the proxy is stopping");
                }
            }
            tunnels.open.fetch_sub(1, Relaxed);
            endpoint.in_flight.fetch_sub(1, Relaxed);
            endpoint.connections.fetch_sub(1, Relaxed);
            drop(body);
        });
        Response::from_parts(head, ProxyBody::empty())
    }
}
