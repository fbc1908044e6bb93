//! The proxy's admin API: its paths and the JSON of its answers.
//!
//! The proxy serialises these types and the operator and the pod's drain helper
//! (`ballast-drain`) read them, so a field renamed here is renamed on both sides at once.
//! Serde only: the proxy carries no Kubernetes types for it.
//!
//! A reader may be newer than the proxy it reads (the operator is upgraded before the
//! proxies roll): every field a proxy of an earlier release may lack has a default.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// `GET`: `200 ready` once discovery delivered its first set, 503 before and while
/// shutting down.
pub const READY: &str = "/ready";
/// `GET`: `200 live` while the process serves.
pub const LIVE: &str = "/live";
/// `GET`: OpenMetrics text.
pub const METRICS: &str = "/metrics";
/// `GET`: a JSON array of [`EndpointReport`], one per endpoint the proxy knows.
pub const ENDPOINTS: &str = "/endpoints";
/// `POST`: drain the caller (the endpoint whose IP is the caller's source IP);
/// `GET`: how far that drain is. Both answer a [`DrainReport`], or 403 with a
/// [`Refusal`] when the caller is no endpoint (`POST` only; `GET` answers
/// `known: false`).
pub const DRAIN: &str = "/drain";
/// `POST`: the caller's drain helper gave up waiting; answers a [`DrainReport`] of what
/// was still open, or 403 with a [`Refusal`].
pub const DRAIN_TIMEOUT: &str = "/drain/timeout";
/// `GET`: a JSON array of [`DrainRecord`], the most recent finished drains, oldest
/// first.
pub const DRAINS: &str = "/drains";
/// Every path above, for answering 405 to the wrong method and listing them on a 404.
pub const PATHS: [&str; 7] = [
    READY,
    LIVE,
    METRICS,
    ENDPOINTS,
    DRAIN,
    DRAIN_TIMEOUT,
    DRAINS,
];

/// What an endpoint is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndpointStatus {
    /// Takes new requests.
    Active,
    /// Takes no new requests; in-flight ones finish.
    Draining,
    /// Failing; skipped until the ejection ends.
    Ejected,
    /// Not ready according to discovery.
    NotReady,
}

/// Why an endpoint is draining.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DrainReason {
    /// Its pod asked through `POST /drain` (expires unless discovery confirms).
    Requested,
    /// Discovery reports it terminating.
    Terminating,
    /// Discovery no longer lists it.
    Removed,
}

/// Requests and connections still open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenCounts {
    /// Requests in flight.
    pub in_flight: u64,
    /// Open connections (tunnels included).
    pub connections: u64,
}

/// One row of `GET /endpoints`: one pod on one backend port (a pod serving two ports
/// has two rows).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndpointReport {
    /// Pod IP and port.
    pub address: SocketAddr,
    /// The backend port's name (the proxy listener's `--port` name); `None` from a
    /// proxy with one unnamed listener, or one older than multi-port listeners.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    /// Pod name, from the EndpointSlice.
    #[serde(default)]
    pub pod: Option<String>,
    /// Zone, from the EndpointSlice.
    #[serde(default)]
    pub zone: Option<String>,
    /// What it is doing.
    pub state: EndpointStatus,
    /// Still listed by discovery.
    #[serde(default)]
    pub listed: bool,
    /// Discovery's `ready` condition.
    #[serde(default)]
    pub ready: bool,
    /// Discovery's `serving` condition.
    #[serde(default)]
    pub serving: bool,
    /// Discovery's `terminating` condition.
    #[serde(default)]
    pub terminating: bool,
    /// Why it drains, when it does.
    #[serde(default)]
    pub drain_reason: Option<DrainReason>,
    /// Requests in flight.
    #[serde(default)]
    pub in_flight: u64,
    /// Open connections.
    #[serde(default)]
    pub connections: u64,
    /// Connections ever opened.
    #[serde(default)]
    pub connections_opened: u64,
    /// Requests sent, in all.
    #[serde(default)]
    pub requests: u64,
    /// Requests per connection opened (keep-alive reuse).
    #[serde(default)]
    pub requests_per_connection: f64,
    /// 5xx answers plus failures without an answer, in all.
    #[serde(default)]
    pub errors: u64,
    /// Peak-EWMA latency estimate in milliseconds.
    #[serde(default)]
    pub ewma_ms: f64,
    /// Slow-start weight, 0.1 to 1.
    #[serde(default)]
    pub weight: f64,
    /// Seconds since the Unix epoch when draining began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draining_since: Option<f64>,
    /// Milliseconds from the start of the drain until nothing was open, once that
    /// happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drained_after_ms: Option<u64>,
    /// What was open when the pod's drain helper gave up, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forced: Option<OpenCounts>,
}

impl EndpointReport {
    /// A row with nothing counted yet: for tests and fixtures.
    pub fn new(address: SocketAddr, state: EndpointStatus) -> Self {
        Self {
            address,
            port: None,
            pod: None,
            zone: None,
            state,
            listed: true,
            ready: state != EndpointStatus::NotReady,
            serving: true,
            terminating: false,
            drain_reason: None,
            in_flight: 0,
            connections: 0,
            connections_opened: 0,
            requests: 0,
            requests_per_connection: 0.0,
            errors: 0,
            ewma_ms: 0.0,
            weight: 1.0,
            draining_since: None,
            drained_after_ms: None,
            forced: None,
        }
    }
}

/// A finished drain: an endpoint that was draining and is now forgotten (no longer
/// listed, nothing open). One entry of `GET /drains`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DrainRecord {
    /// Pod IP and port.
    pub address: SocketAddr,
    /// The backend port's name, as in [`EndpointReport::port`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    /// Pod name.
    #[serde(default)]
    pub pod: Option<String>,
    /// Why it drained.
    pub reason: DrainReason,
    /// Seconds since the Unix epoch when draining began.
    pub since: f64,
    /// Milliseconds from the start of the drain until nothing was in flight or open.
    pub drained_after_ms: u64,
    /// Set when the pod's drain helper reached its timeout with requests or connections
    /// still open: what was open then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forced: Option<OpenCounts>,
    /// Requests this proxy sent to the endpoint, in all.
    #[serde(default)]
    pub requests: u64,
    /// Its 5xx answers and failures without an answer, in all.
    #[serde(default)]
    pub errors: u64,
}

/// The answer to `POST /drain`, `GET /drain` and `POST /drain/timeout`: the counts the
/// drain gate reads for the caller's pod, summed over its endpoints (one per port).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DrainReport {
    /// Whether this proxy knows an endpoint with that IP.
    pub known: bool,
    /// Its state, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<EndpointStatus>,
    /// Requests in flight to it.
    pub in_flight: u64,
    /// Connections open to it.
    pub connections: u64,
    /// Seconds since the Unix epoch when draining began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draining_since: Option<f64>,
}

impl DrainReport {
    /// Nothing is left in flight or open.
    pub fn is_drained(&self) -> bool {
        self.in_flight == 0 && self.connections == 0
    }
}

/// The 403 answer to a drain call from an address that is no endpoint of the proxy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// Why, for a person.
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;
    use serde_json::json;

    /// Serialising and reading back gives the same value, and the JSON is the one
    /// written here: a renamed field shows up as a failing test, not as a reader that
    /// silently gets defaults.
    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
        value: &T,
        wire: serde_json::Value,
    ) {
        assert_eq!(serde_json::to_value(value).expect("serialises"), wire);
        let back: T = serde_json::from_value(wire).expect("deserialises");
        assert_eq!(&back, value);
    }

    #[test]
    fn endpoint_reports_round_trip() {
        let mut report = EndpointReport::new(
            "10.0.0.7:8080".parse().expect("address"),
            EndpointStatus::Draining,
        );
        report.pod = Some("web-1".to_owned());
        report.port = Some("grpc".to_owned());
        report.drain_reason = Some(DrainReason::Terminating);
        report.in_flight = 2;
        report.draining_since = Some(1_700_000_000.5);
        report.forced = Some(OpenCounts {
            in_flight: 1,
            connections: 3,
        });
        round_trip(
            &report,
            json!({
                "address": "10.0.0.7:8080", "port": "grpc", "pod": "web-1", "zone": null,
                "state": "draining",
                "listed": true, "ready": true, "serving": true, "terminating": false,
                "drain_reason": "terminating", "in_flight": 2, "connections": 0,
                "connections_opened": 0, "requests": 0, "requests_per_connection": 0.0,
                "errors": 0, "ewma_ms": 0.0, "weight": 1.0,
                "draining_since": 1_700_000_000.5,
                "forced": {"in_flight": 1, "connections": 3},
            }),
        );
        round_trip(
            &EndpointReport::new(
                "[::1]:80".parse().expect("address"),
                EndpointStatus::NotReady,
            ),
            json!({
                "address": "[::1]:80", "pod": null, "zone": null, "state": "not-ready",
                "listed": true, "ready": false, "serving": true, "terminating": false,
                "drain_reason": null, "in_flight": 0, "connections": 0,
                "connections_opened": 0, "requests": 0, "requests_per_connection": 0.0,
                "errors": 0, "ewma_ms": 0.0, "weight": 1.0,
            }),
        );
    }

    #[test]
    fn drain_answers_round_trip() {
        round_trip(
            &DrainRecord {
                address: "10.0.0.7:8080".parse().expect("address"),
                port: Some("http".to_owned()),
                pod: Some("web-1".to_owned()),
                reason: DrainReason::Requested,
                since: 12.25,
                drained_after_ms: 840,
                forced: None,
                requests: 10,
                errors: 1,
            },
            json!({
                "address": "10.0.0.7:8080", "port": "http", "pod": "web-1", "reason": "requested",
                "since": 12.25, "drained_after_ms": 840, "requests": 10, "errors": 1,
            }),
        );
        round_trip(
            &DrainReport {
                known: true,
                state: Some(EndpointStatus::Active),
                in_flight: 4,
                connections: 2,
                draining_since: None,
            },
            json!({"known": true, "state": "active", "in_flight": 4, "connections": 2}),
        );
        round_trip(
            &Refusal {
                error: "no".to_owned(),
            },
            json!({"error": "no"}),
        );
    }

    #[test]
    fn an_older_proxys_answer_still_reads() {
        // Only the fields every release has sent.
        let report: EndpointReport =
            serde_json::from_value(json!({"address": "10.0.0.7:8080", "state": "active"}))
                .expect("deserialises");
        assert_eq!(report.in_flight, 0);
        assert_eq!(report.forced, None);
        assert_eq!(report.port, None, "a proxy before multi-port listeners");
        let drain: DrainRecord = serde_json::from_value(json!({
            "address": "10.0.0.7:8080", "reason": "removed", "since": 1.0, "drained_after_ms": 5,
        }))
        .expect("deserialises");
        assert_eq!(drain.requests, 0);
        assert_eq!(drain.port, None);
    }
}
