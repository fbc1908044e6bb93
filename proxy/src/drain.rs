//! The pod side of the drain protocol, run by `ballast-drain` in a preStop hook.
//!
//! Each round: resolve the proxies (new replicas are included), `POST /drain` once to
//! every replica not told yet, `GET /drain` from the others, until every replica reports
//! zero requests in flight and zero connections for this pod, or does not know it.
//! Unreachable replicas are retried, never assumed drained. At the timeout the pod must
//! still stop: the outcome says what was left open, per replica.

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::net::TcpSocket;
use tokio::time::Instant;

/// How to drain.
#[derive(Clone, Debug)]
pub struct DrainConfig {
    /// Give up (and let the pod stop) after this long.
    pub timeout: Duration,
    /// Pause between rounds.
    pub poll_interval: Duration,
    /// Source address of the calls: the pod's IP (tests use loopback addresses).
    pub source: Option<IpAddr>,
    /// Limit for one HTTP call to one replica.
    pub call_timeout: Duration,
}

/// What one proxy replica last said about this pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicaState {
    /// Not reachable (yet); the text says why.
    Unreachable(String),
    /// Still has requests or connections to this pod.
    Pending {
        /// Requests in flight.
        in_flight: u64,
        /// Open connections.
        connections: u64,
    },
    /// Nothing left in flight or open.
    Drained,
    /// The replica does not route to this pod at all.
    Unknown,
}

/// Result of a drain.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// True when every replica drained (or did not know the pod) before the timeout.
    pub drained: bool,
    /// The last state of every replica seen.
    pub replicas: BTreeMap<SocketAddr, ReplicaState>,
    /// How long it took.
    pub elapsed: Duration,
}

#[derive(Deserialize)]
struct Report {
    known: bool,
    in_flight: u64,
    connections: u64,
}

impl ReplicaState {
    fn is_done(&self) -> bool {
        matches!(self, Self::Drained | Self::Unknown)
    }
}

impl fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreachable(why) => write!(f, "unreachable ({why})"),
            Self::Pending {
                in_flight,
                connections,
            } => {
                write!(
                    f,
                    "{in_flight} requests in flight, {connections} connections open"
                )
            }
            Self::Drained => f.write_str("drained"),
            Self::Unknown => f.write_str("does not route to this pod"),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.drained {
            write!(
                f,
                "drained in {:.2?} ({} proxies)",
                self.elapsed,
                self.replicas.len()
            )
        } else if self.replicas.is_empty() {
            write!(
                f,
                "timed out after {:.2?}: no proxy replica could be resolved",
                self.elapsed
            )
        } else {
            write!(f, "timed out after {:.2?}, stopping anyway:", self.elapsed)?;
            for (address, state) in self.replicas.iter().filter(|(_, s)| !s.is_done()) {
                write!(f, " {address}: {state};")?;
            }
            Ok(())
        }
    }
}

/// Drains this pod from every replica `resolve` returns (called once per round).
pub async fn drain<R, F>(config: &DrainConfig, mut resolve: R) -> Outcome
where
    R: FnMut() -> F,
    F: Future<Output = Result<Vec<SocketAddr>, String>>,
{
    let started = Instant::now();
    let deadline = started + config.timeout;
    let mut told: BTreeSet<SocketAddr> = BTreeSet::new();
    let mut replicas: BTreeMap<SocketAddr, ReplicaState> = BTreeMap::new();
    loop {
        let addresses: Vec<SocketAddr> = match resolve().await {
            Ok(addresses) => {
                // A replica that left the set took its connections with it.
                replicas.retain(|a, _| addresses.contains(a));
                addresses
            }
            Err(e) => {
                tracing::warn!(error = %e, "resolving the proxies failed; using the last set");
                replicas.keys().copied().collect()
            }
        };
        let calls = addresses.iter().map(|&address| {
            let method = if told.contains(&address) {
                Method::GET
            } else {
                Method::POST
            };
            async move {
                let result = call(address, method.clone(), "/drain", config).await;
                (address, method, result)
            }
        });
        for (address, method, result) in futures::future::join_all(calls).await {
            let state = match result {
                Ok((StatusCode::OK, report)) => {
                    if method == Method::POST {
                        told.insert(address);
                    }
                    match serde_json::from_slice::<Report>(&report) {
                        Ok(r) if !r.known => ReplicaState::Unknown,
                        Ok(r) if r.in_flight == 0 && r.connections == 0 => ReplicaState::Drained,
                        Ok(r) => ReplicaState::Pending {
                            in_flight: r.in_flight,
                            connections: r.connections,
                        },
                        Err(e) => ReplicaState::Unreachable(format!("unreadable answer: {e}")),
                    }
                }
                // 403: this replica has no endpoint with our IP, so nothing to wait for.
                Ok((StatusCode::FORBIDDEN, _)) => {
                    told.insert(address);
                    ReplicaState::Unknown
                }
                Ok((status, _)) => ReplicaState::Unreachable(format!("answered {status}")),
                Err(e) => ReplicaState::Unreachable(e),
            };
            replicas.insert(address, state);
        }
        let drained = !replicas.is_empty() && replicas.values().all(ReplicaState::is_done);
        let now = Instant::now();
        if drained || now >= deadline {
            if !drained {
                report_timeout(&replicas, config).await;
            }
            return Outcome {
                drained,
                replicas,
                elapsed: now - started,
            };
        }
        tokio::time::sleep(config.poll_interval.min(deadline - now)).await;
    }
}

/// Resolves `host:port` (a DNS name or an IP) to every address, as the headless proxy
/// admin Service publishes one A record per replica. `target` may list several
/// `host:port`s separated by commas; the result is their union. A name that does not
/// resolve fails the round (it is retried), so no replica is silently left out.
///
/// # Errors
/// The resolver's message.
pub async fn resolve(target: &str) -> Result<Vec<SocketAddr>, String> {
    let mut addresses = Vec::new();
    for one in target.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        addresses.extend(
            tokio::net::lookup_host(one)
                .await
                .map_err(|e| format!("{one}: {e}"))?,
        );
    }
    if addresses.is_empty() {
        return Err(format!("{target:?}: no address"));
    }
    addresses.sort();
    addresses.dedup();
    Ok(addresses)
}

/// Tells every replica that still had something open that this pod stops anyway, so
/// the forced termination is counted (best effort: one call each).
async fn report_timeout(replicas: &BTreeMap<SocketAddr, ReplicaState>, config: &DrainConfig) {
    let calls = replicas
        .iter()
        .filter(|(_, state)| matches!(state, ReplicaState::Pending { .. }))
        .map(|(&address, _)| async move {
            if let Err(e) = call(address, Method::POST, "/drain/timeout", config).await {
                tracing::warn!(%address, error = %e, "reporting the drain timeout failed");
            }
        });
    futures::future::join_all(calls).await;
}

async fn call(
    address: SocketAddr,
    method: Method,
    path: &str,
    config: &DrainConfig,
) -> Result<(StatusCode, Bytes), String> {
    let exchange = async {
        let socket = if address.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| e.to_string())?;
        if let Some(source) = config.source {
            socket
                .bind(SocketAddr::new(source, 0))
                .map_err(|e| format!("bind {source}: {e}"))?;
        }
        let stream = socket.connect(address).await.map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, address.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>((status, body))
    };
    tokio::time::timeout(config.call_timeout, exchange)
        .await
        .map_err(|_| "no answer in time".to_owned())?
}

#[cfg(test)]
mod tests {
    use super::resolve;

    #[tokio::test]
    async fn resolves_a_comma_separated_list_to_the_union() {
        let got = resolve("127.0.0.3:9901, 127.0.0.2:9901,127.0.0.3:9901")
            .await
            .unwrap();
        let want: Vec<std::net::SocketAddr> = vec![
            "127.0.0.2:9901".parse().unwrap(),
            "127.0.0.3:9901".parse().unwrap(),
        ];
        assert_eq!(got, want);
        assert!(resolve(" , ").await.is_err());
        assert!(resolve("127.0.0.2").await.is_err(), "a port is required");
    }
}
