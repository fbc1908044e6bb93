//! The pod side of the drain protocol, run by `ballast-drain` in a preStop hook.
//!
//! Each round: `POST /drain` once to every replica not told yet, `GET /drain` from the
//! others, until every replica reports zero requests in flight and zero connections for
//! this pod, or does not know it. Unreachable replicas, and replicas that refuse the
//! caller (403), are retried, never assumed drained. At the timeout the pod must still
//! stop: the outcome says what was left open, per replica.
//!
//! A rollout drains many pods at once and each polls every replica ten times a second,
//! so the proxies' name is resolved again about once a second (new replicas are found
//! that late at most), not every round, and each replica keeps one HTTP/1.1 connection
//! across rounds. A name that DNS says does not exist, or has no address, on two lookups
//! in a row means there are no proxies and so nothing to drain; a lookup that fails
//! otherwise is retried.

mod resolve;
#[cfg(test)]
mod tests;

pub use resolve::{ResolveError, cluster_domain, qualify, resolve};

use ballast_api::admin::{self, DrainReport, Refusal};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use resolve::Lookup;
use std::collections::{BTreeMap, BTreeSet, HashMap};
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
    /// Pause between two lookups of the proxies' name: a replica that appears is
    /// found this late at most.
    pub resolve_interval: Duration,
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
    /// Answered 403: it does not see this pod's IP as the caller, typically because a
    /// sidecar redirects the traffic to the proxy, which then sees a local address.
    /// Never counted as drained; the text is the proxy's own explanation.
    Refused(String),
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
    /// True when every replica drained (or did not know the pod) before the timeout,
    /// or when there are no proxies at all (see `no_proxies`).
    pub drained: bool,
    /// The last state of every replica seen.
    pub replicas: BTreeMap<SocketAddr, ReplicaState>,
    /// Set when DNS said, on two lookups in a row, that the proxies' name does not
    /// exist or has no address: why. Nothing routes through proxies that do not exist.
    pub no_proxies: Option<String>,
    /// The last lookup's failure, when the last lookup failed.
    pub resolve_error: Option<String>,
    /// How long it took.
    pub elapsed: Duration,
}

type Sender = SendRequest<Empty<Bytes>>;

impl ReplicaState {
    fn is_done(&self) -> bool {
        matches!(self, Self::Drained | Self::Unknown)
    }

    /// What an answer to `POST /drain` or `GET /drain` says about the replica.
    fn from_answer(answer: Result<(StatusCode, Bytes), String>) -> Self {
        match answer {
            Ok((StatusCode::OK, body)) => match serde_json::from_slice::<DrainReport>(&body) {
                Ok(r) if !r.known => Self::Unknown,
                Ok(r) if r.is_drained() => Self::Drained,
                Ok(r) => Self::Pending {
                    in_flight: r.in_flight,
                    connections: r.connections,
                },
                Err(e) => Self::Unreachable(format!("unreadable answer: {e}")),
            },
            // The proxy has no endpoint with the caller's IP. That is never "nothing to
            // wait for": behind a redirecting sidecar the caller it sees is not this pod,
            // and the pod it routes to would be killed undrained.
            Ok((StatusCode::FORBIDDEN, body)) => {
                Self::Refused(serde_json::from_slice::<Refusal>(&body).map_or_else(
                    |_| String::from_utf8_lossy(&body).trim().to_owned(),
                    |r| r.error,
                ))
            }
            Ok((status, _)) => Self::Unreachable(format!("answered {status}")),
            Err(e) => Self::Unreachable(e),
        }
    }
}

impl fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreachable(why) => write!(f, "unreachable ({why})"),
            Self::Refused(why) => write!(
                f,
                "answered 403: it does not see this pod's IP as the caller ({why})"
            ),
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
        if let Some(why) = &self.no_proxies {
            write!(
                f,
                "nothing to drain after {:.2?}: no proxies ({why})",
                self.elapsed
            )
        } else if self.drained {
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
            )?;
            match &self.resolve_error {
                Some(e) => write!(f, " ({e})"),
                None => Ok(()),
            }
        } else {
            write!(f, "timed out after {:.2?}, stopping anyway:", self.elapsed)?;
            for (address, state) in self.replicas.iter().filter(|(_, s)| !s.is_done()) {
                write!(f, " {address}: {state};")?;
            }
            Ok(())
        }
    }
}

/// Drains this pod from every replica `resolve` returns. `resolve` is called at the
/// start and then every `resolve_interval`; between lookups the last set is used. An
/// empty set or [`ResolveError::NameNotFound`] on two lookups in a row (one interval
/// apart) ends the drain at once as drained, with `no_proxies` set; any other lookup
/// failure keeps the last set and waits. `notify` receives a line for a person, once
/// per cause: a replica refusing the caller, a failing lookup.
pub async fn drain<R, F, N>(config: &DrainConfig, mut resolve: R, mut notify: N) -> Outcome
where
    R: FnMut() -> F,
    F: Future<Output = Result<Vec<SocketAddr>, ResolveError>>,
    N: FnMut(&str),
{
    let started = Instant::now();
    let deadline = started + config.timeout;
    let mut told: BTreeSet<SocketAddr> = BTreeSet::new();
    let mut replicas: BTreeMap<SocketAddr, ReplicaState> = BTreeMap::new();
    let mut connections: HashMap<SocketAddr, Sender> = HashMap::new();
    let mut addresses: Vec<SocketAddr> = Vec::new();
    let mut next_lookup = started;
    let mut absent_in_a_row = 0_u32;
    let mut resolve_error: Option<String> = None;
    let mut refusals_said: BTreeSet<SocketAddr> = BTreeSet::new();
    let mut lookup_failure_said = false;
    loop {
        if Instant::now() >= next_lookup {
            next_lookup = Instant::now() + config.resolve_interval;
            match Lookup::from(resolve().await) {
                Lookup::Found(found) => {
                    absent_in_a_row = 0;
                    resolve_error = None;
                    // A replica that left the set took its connections with it.
                    replicas.retain(|a, _| found.contains(a));
                    connections.retain(|a, _| found.contains(a));
                    addresses = found;
                }
                Lookup::Absent(why) => {
                    absent_in_a_row += 1;
                    // One negative answer is not trusted alone (a negative cache entry
                    // from before the Service existed, a DNS server answering before it
                    // has synced, a libc text misread): skipping a drain kills requests,
                    // a second look costs one interval.
                    if absent_in_a_row >= 2 {
                        return Outcome {
                            drained: true,
                            replicas: BTreeMap::new(),
                            no_proxies: Some(why),
                            resolve_error: None,
                            elapsed: Instant::now() - started,
                        };
                    }
                    resolve_error = Some(why);
                }
                Lookup::Failed(why) => {
                    absent_in_a_row = 0;
                    if !lookup_failure_said {
                        lookup_failure_said = true;
                        notify(&format!(
                            "{why}; retrying every {:.1?} with the last set ({} proxies)",
                            config.resolve_interval,
                            addresses.len()
                        ));
                    }
                    resolve_error = Some(why);
                }
            }
        }
        let calls = addresses.iter().map(|&address| {
            let method = if told.contains(&address) {
                Method::GET
            } else {
                Method::POST
            };
            let kept = connections.remove(&address);
            async move {
                let (answer, kept) =
                    call(kept, address, method.clone(), admin::DRAIN, config).await;
                (address, method, answer, kept)
            }
        });
        for (address, method, answer, kept) in futures::future::join_all(calls).await {
            if let Some(sender) = kept {
                connections.insert(address, sender);
            }
            if method == Method::POST && matches!(answer, Ok((StatusCode::OK, _))) {
                told.insert(address);
            }
            let state = ReplicaState::from_answer(answer);
            if let ReplicaState::Refused(why) = &state
                && refusals_said.insert(address)
            {
                notify(&format!(
                    "proxy {address} answered 403: it does not see this pod's IP as the caller ({why}); is a sidecar redirecting traffic to the proxy? waiting"
                ));
            }
            replicas.insert(address, state);
        }
        let drained = !replicas.is_empty() && replicas.values().all(ReplicaState::is_done);
        let now = Instant::now();
        if drained || now >= deadline {
            if !drained {
                report_timeout(&replicas, &mut connections, config).await;
            }
            return Outcome {
                drained,
                replicas,
                no_proxies: None,
                resolve_error,
                elapsed: now - started,
            };
        }
        tokio::time::sleep(config.poll_interval.min(deadline - now)).await;
    }
}

/// Tells every replica that still had something open that this pod stops anyway, so
/// the forced termination is counted (best effort: one call each).
async fn report_timeout(
    replicas: &BTreeMap<SocketAddr, ReplicaState>,
    connections: &mut HashMap<SocketAddr, Sender>,
    config: &DrainConfig,
) {
    let calls = replicas
        .iter()
        .filter(|(_, state)| matches!(state, ReplicaState::Pending { .. }))
        .map(|(&address, _)| {
            let kept = connections.remove(&address);
            async move {
                let (answer, _) =
                    call(kept, address, Method::POST, admin::DRAIN_TIMEOUT, config).await;
                if let Err(e) = answer {
                    tracing::warn!(%address, error = %e, "reporting the drain timeout failed");
                }
            }
        });
    futures::future::join_all(calls).await;
}

/// One call to one replica, on `kept` (its connection from an earlier round) while that
/// works, else on a new connection. Returns the answer and the connection to keep.
async fn call(
    kept: Option<Sender>,
    address: SocketAddr,
    method: Method,
    path: &str,
    config: &DrainConfig,
) -> (Result<(StatusCode, Bytes), String>, Option<Sender>) {
    let exchange = async {
        if let Some(mut sender) = kept {
            // A kept connection the proxy closed while idle shows only when used. The
            // drain calls are idempotent, so one that failed there goes again on a new
            // connection.
            if let Ok(answer) = send(&mut sender, &method, path, address).await {
                return (Ok(answer), Some(sender));
            }
        }
        let mut sender = match connect(address, config).await {
            Ok(sender) => sender,
            Err(e) => return (Err(e), None),
        };
        match send(&mut sender, &method, path, address).await {
            Ok(answer) => (Ok(answer), Some(sender)),
            Err(e) => (Err(e), None),
        }
    };
    tokio::time::timeout(config.call_timeout, exchange)
        .await
        .unwrap_or_else(|_| (Err("no answer in time".to_owned()), None))
}

async fn connect(address: SocketAddr, config: &DrainConfig) -> Result<Sender, String> {
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
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    // Ends when the sender is dropped: at the end of the drain, or when the replica
    // leaves the set.
    tokio::spawn(conn);
    Ok(sender)
}

async fn send(
    sender: &mut Sender,
    method: &Method,
    path: &str,
    address: SocketAddr,
) -> Result<(StatusCode, Bytes), String> {
    sender.ready().await.map_err(|e| e.to_string())?;
    let request = Request::builder()
        .method(method.clone())
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
    Ok((status, body))
}
