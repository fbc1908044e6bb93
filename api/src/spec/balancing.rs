//! How the proxies spread requests: the algorithm, session affinity, retries,
//! timeouts and outlier detection (`spec.balancing`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Algorithm, SameSite};

/// How the proxies spread requests over the app pods.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct BalancingSpec {
    /// `p2c-ewma` (power of two choices over peak-EWMA latency x in-flight requests: the
    /// default, steers around slow pods), `least-request`, or `round-robin`.
    pub algorithm: Algorithm,

    /// When and how often a failed request is tried again on another pod.
    pub retries: RetrySpec,

    /// Connection and response timeouts towards the pods.
    pub timeouts: TimeoutSpec,

    /// Temporarily stop sending to a pod that keeps failing.
    pub outlier_detection: OutlierDetectionSpec,

    /// Session affinity for stateful apps (local caches, sessions, reconnecting
    /// WebSockets). Off unless set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity: Option<AffinitySpec>,

    /// Zone-aware routing: `PreferSameZone` (each proxy sends to the app pods in its
    /// own zone while they can carry its share of the traffic, and spills over to the
    /// other zones when they are too few, slow, ejected or draining: no zone's pods sit
    /// idle), `Off`, or `FromService` (the default: on when `service.trafficDistribution`
    /// prefers the same zone or node).
    pub zone_routing: ZoneRouting,
}

/// Whether the proxies prefer app pods in their own zone.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ZoneRouting {
    /// On when the front Service's `trafficDistribution` is set.
    #[default]
    FromService,
    /// Every pod alike, whatever its zone.
    Off,
    /// Pods in the proxy's own zone first, spilling over when they cannot keep up.
    PreferSameZone,
}

/// Session affinity: consistent hashing with bounded loads. A key always goes to the
/// same pod while the set of pods is stable; adding or removing one pod moves about 1/N
/// of the keys; no pod takes more than `loadFactorPercent` of the mean in-flight load,
/// so one hot key spills over instead of melting one pod. Draining pods are skipped.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.type != 'Header' || has(self.header)",
        "message": "type Header needs header",
    },
    {
        "rule": "self.cookie.sameSite != 'None' || self.cookie.secure",
        "message": "cookie.sameSite None needs cookie.secure (browsers drop it otherwise)",
    },
]))]
pub struct AffinitySpec {
    /// Where the key comes from: `Header`, `Cookie` or `ClientIP`.
    #[serde(rename = "type")]
    pub type_: AffinityType,

    /// Header carrying the key (type `Header`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 256),
        regex(pattern = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
    )]
    pub header: Option<String>,

    /// The cookie (type `Cookie`); the proxy sets it on the first response.
    #[serde(default)]
    pub cookie: AffinityCookie,

    /// With `ClientIP`, take the address from the first X-Forwarded-For hop (only when
    /// a trusted gateway sets it).
    #[serde(default)]
    pub trust_forwarded_for: bool,

    /// Most in-flight load one pod takes, as a percentage of the mean (101 to 1000).
    #[serde(default = "default_load_factor_percent")]
    #[schemars(range(min = 101, max = 1000))]
    pub load_factor_percent: i32,
}

/// Affinity key source.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AffinityType {
    /// A request header.
    Header,
    /// A cookie set by the proxy.
    Cookie,
    /// The client's IP address.
    #[serde(rename = "ClientIP")]
    ClientIp,
}

/// The affinity cookie.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct AffinityCookie {
    /// Cookie name.
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9_.-]+$"))]
    pub name: String,
    /// Lifetime in seconds.
    #[schemars(range(min = 1, max = 31536000))]
    pub ttl_seconds: i32,
    /// Mark it `Secure` (sent over HTTPS only).
    pub secure: bool,
    /// Its `SameSite` attribute.
    pub same_site: SameSite,
}

impl Default for AffinityCookie {
    fn default() -> Self {
        Self {
            name: "ballast-session".to_owned(),
            ttl_seconds: 3600,
            secure: false,
            same_site: SameSite::Lax,
        }
    }
}

fn default_load_factor_percent() -> i32 {
    125
}

/// Retries. Only requests that are safe to replay are retried: the connection failed or
/// closed before any response byte, and the request has no body or a small buffered one.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct RetrySpec {
    /// Total attempts per request, the first included (1 disables retries).
    #[schemars(range(min = 1, max = 5))]
    pub attempts: i32,

    /// Retries allowed as a percentage of recent requests, so retries cannot multiply
    /// load during an outage.
    #[schemars(range(min = 0, max = 100))]
    pub budget_percent: i32,

    /// Retries per second always allowed, whatever the budget.
    #[schemars(range(min = 0, max = 10000))]
    pub min_per_second: i32,

    /// Bytes of a request body the proxy keeps while streaming it to a pod, so that the
    /// request can be sent again to another pod if the first failed before answering.
    /// A longer body still streams, but is not retried. 0 retries only bodiless
    /// requests.
    #[schemars(range(min = 0, max = 16777216))]
    pub body_limit_bytes: i32,
}

/// Timeouts towards the pods.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct TimeoutSpec {
    /// Milliseconds to establish a connection to a pod before trying another.
    #[schemars(range(min = 10, max = 60000))]
    pub connect_millis: i32,

    /// Seconds a pod may take to start its response once the whole request has been
    /// sent (a slow upload or a client-streaming call does not count). 0 waits forever.
    /// Answered with 504, or DEADLINE_EXCEEDED to a gRPC call.
    #[schemars(range(min = 0, max = 86400))]
    pub response_seconds: i32,

    /// Seconds a request/response stream may go without a frame in either direction
    /// before it is cut (a gRPC call then ends with DEADLINE_EXCEEDED). Long-lived streams
    /// are not cut while messages flow. 0 never cuts.
    #[schemars(range(min = 0, max = 86400))]
    pub stream_idle_seconds: i32,

    /// Seconds an unused pooled connection is kept. Keep it below the app's own
    /// keep-alive timeout so the app never closes a connection the proxy is about to use.
    #[schemars(range(min = 1, max = 3600))]
    pub idle_seconds: i32,
}

/// Outlier detection: eject a pod after consecutive failures, for a growing time.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct OutlierDetectionSpec {
    /// Consecutive connect failures or 5xx answers that eject a pod. 0 disables ejection.
    #[schemars(range(min = 0, max = 1000))]
    pub consecutive_failures: i32,

    /// Seconds of the first ejection; each further ejection of the same pod lasts this
    /// times the number of ejections so far.
    #[schemars(range(min = 1, max = 3600))]
    pub base_ejection_seconds: i32,

    /// Longest ejection in seconds.
    #[schemars(range(min = 1, max = 86400))]
    pub max_ejection_seconds: i32,

    /// Most pods ejected at once, as a percentage of all pods.
    #[schemars(range(min = 0, max = 50))]
    pub max_ejected_percent: i32,
}

impl Default for RetrySpec {
    fn default() -> Self {
        Self {
            attempts: 2,
            budget_percent: 20,
            min_per_second: 10,
            body_limit_bytes: 65536,
        }
    }
}

impl Default for TimeoutSpec {
    fn default() -> Self {
        Self {
            connect_millis: 1000,
            response_seconds: 60,
            stream_idle_seconds: 300,
            idle_seconds: 30,
        }
    }
}

impl Default for OutlierDetectionSpec {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection_seconds: 30,
            max_ejection_seconds: 300,
            max_ejected_percent: 50,
        }
    }
}
