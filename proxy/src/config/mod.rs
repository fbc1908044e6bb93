//! Configuration: flags, the same names as `BALLAST_*` environment variables, and an
//! optional YAML/JSON file with the flags' long names as keys. Flags and environment
//! win over the file; the file wins over defaults. Every problem is reported, one line
//! each, before the proxy starts.

mod resolve;
#[cfg(test)]
mod tests;

pub use resolve::{default_workers, parse_duration};

use crate::discovery::Source;
use crate::pool::{BackendProtocol, ConnectConfig};
use crate::registry::{Algorithm, BalancerConfig};
use ballast_api::settings::{LogFormat, SameSite, ZoneRouting};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Raw settings as given; every field optional so the layers can be merged.
#[derive(Clone, Debug, Default, clap::Parser, Serialize, Deserialize)]
#[command(
    name = "ballast-proxy",
    version,
    about = "Per-request load balancer with drain accounting"
)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Settings {
    /// A client listener for one backend port: `NAME=IP:PORT[,protocol=http1|h2c]`
    /// (e.g. `grpc=[::]:8081,protocol=h2c`; protocol http1 unless given). Repeat it, one
    /// per port: each listener balances over the EndpointSlice port named NAME (more
    /// than one needs --kube-service; BALLAST_PORTS takes them space-separated).
    /// Replaces --listen, --port-name and --backend-protocol, which describe the one
    /// listener of a local run [default: that one listener].
    #[arg(long = "port", env = "BALLAST_PORTS", value_delimiter = ' ')]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port: Vec<String>,
    /// The one client listener without --port [default: [::]:8080, IPv6 and IPv4].
    #[arg(long, env = "BALLAST_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Admin listener: /ready, /live, /metrics, /endpoints, /drain [default: [::]:9901].
    #[arg(long, env = "BALLAST_ADMIN_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<String>,
    /// Endpoints from a JSON/YAML file, re-read on change.
    #[arg(long, env = "BALLAST_ENDPOINTS_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoints_file: Option<PathBuf>,
    /// Endpoints as a fixed comma-separated list of IP:port.
    #[arg(long, env = "BALLAST_ENDPOINTS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<String>,
    /// Endpoints from the EndpointSlices of this Kubernetes Service.
    #[arg(long, env = "BALLAST_KUBE_SERVICE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kube_service: Option<String>,
    /// Namespace of --kube-service [default: the pod's namespace].
    #[arg(long, env = "BALLAST_NAMESPACE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// EndpointSlice port name of the one listener without --port [default: the first
    /// port].
    #[arg(long, env = "BALLAST_PORT_NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_name: Option<String>,
    /// p2c-ewma, least-request or round-robin [default: p2c-ewma].
    #[arg(long, env = "BALLAST_ALGORITHM")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<Algorithm>,
    /// Zone-aware routing: off, or prefer-same-zone (the endpoints in this proxy's zone
    /// while they can carry its share of the traffic, the rest spilled to the zones with
    /// spare capacity, so no zone's pods sit idle; needs --zone or --proxy-service)
    /// [default: off].
    #[arg(long, env = "BALLAST_ZONE_ROUTING")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone_routing: Option<ZoneRouting>,
    /// This proxy's topology zone, overriding what --proxy-service says. Alone, the
    /// proxies are assumed spread evenly over the zones that have endpoints.
    #[arg(long, env = "BALLAST_ZONE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// The Service over every proxy replica (the admin Service, publishNotReadyAddresses)
    /// in --namespace: its EndpointSlices give this proxy's zone (the endpoint of pod
    /// --pod-name) and how many proxies run in each zone. Needs --kube-service.
    #[arg(long, env = "BALLAST_PROXY_SERVICE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_service: Option<String>,
    /// This proxy's own pod name, to find its endpoint in --proxy-service (the
    /// operator sets it from the downward API).
    #[arg(long, env = "BALLAST_POD_NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// Protocol to the backends of the one listener without --port: http1 or h2c (also
    /// for gRPC) [default: http1].
    #[arg(long, env = "BALLAST_BACKEND_PROTOCOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_protocol: Option<BackendProtocol>,
    /// TCP connect timeout to a backend [default: 1s].
    #[arg(long, env = "BALLAST_CONNECT_TIMEOUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
    /// Time a pod may take to start its response once the whole request is sent, 0 for
    /// none; answered 504 [default: 60s].
    #[arg(long, env = "BALLAST_RESPONSE_TIMEOUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_timeout: Option<String>,
    /// A request/response stream with no frame in either direction for this long is
    /// cut; 0 for none [default: 5m].
    #[arg(long, env = "BALLAST_STREAM_IDLE_TIMEOUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_idle_timeout: Option<String>,
    /// Bytes of a request body kept while it streams so the request can be retried on
    /// another pod; a longer body is not retried [default: 65536].
    #[arg(long, env = "BALLAST_RETRY_BODY_LIMIT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_body_limit: Option<usize>,
    /// Requests and streams in flight through this proxy at once; more are refused with
    /// 503 (gRPC: RESOURCE_EXHAUSTED); 0 for no limit [default: 0].
    #[arg(long, env = "BALLAST_MAX_IN_FLIGHT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<usize>,
    /// Idle pooled connections older than this are closed [default: 30s].
    #[arg(long, env = "BALLAST_IDLE_TIMEOUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    /// Attempts per request, the first included [default: 2].
    #[arg(long, env = "BALLAST_RETRY_ATTEMPTS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_attempts: Option<u32>,
    /// Retries as a percentage of recent requests [default: 20].
    #[arg(long, env = "BALLAST_RETRY_BUDGET_PERCENT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_budget_percent: Option<u32>,
    /// Retries per second always allowed [default: 10].
    #[arg(long, env = "BALLAST_RETRY_MIN_PER_SECOND")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_min_per_second: Option<u32>,
    /// Consecutive failures that eject an endpoint, 0 disables [default: 5].
    #[arg(long, env = "BALLAST_OUTLIER_CONSECUTIVE_FAILURES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outlier_consecutive_failures: Option<u32>,
    /// First ejection's length, multiplied by the ejection count [default: 30s].
    #[arg(long, env = "BALLAST_OUTLIER_BASE_EJECTION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outlier_base_ejection: Option<String>,
    /// Longest ejection [default: 300s].
    #[arg(long, env = "BALLAST_OUTLIER_MAX_EJECTION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outlier_max_ejection: Option<String>,
    /// Most endpoints ejected at once, percent, at most 50 [default: 50].
    #[arg(long, env = "BALLAST_OUTLIER_MAX_EJECTED_PERCENT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outlier_max_ejected_percent: Option<u32>,
    /// Slow start: a new endpoint's weight ramps from 10% to 100% over this [default: 10s].
    #[arg(long, env = "BALLAST_WARMUP")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup: Option<String>,
    /// Peak-EWMA decay time [default: 10s].
    #[arg(long, env = "BALLAST_EWMA_DECAY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ewma_decay: Option<String>,
    /// Latency assumed for an endpoint before its first response [default: 30ms].
    #[arg(long, env = "BALLAST_INITIAL_RTT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initial_rtt: Option<String>,
    /// Drain mark lifetime without discovery confirming termination [default: 2 x drain-timeout].
    #[arg(long, env = "BALLAST_DRAIN_TTL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_ttl: Option<String>,
    /// On SIGTERM, keep serving this long with /ready failing [default: 5s].
    #[arg(long, env = "BALLAST_SHUTDOWN_DELAY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_delay: Option<String>,
    /// On SIGTERM, after the delay, wait this long for in-flight requests [default: 30s].
    #[arg(long, env = "BALLAST_DRAIN_TIMEOUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_timeout: Option<String>,
    /// A client must send its request head within this (slowloris guard) [default: 10s].
    #[arg(long, env = "BALLAST_HEADER_READ_TIMEOUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_read_timeout: Option<String>,
    /// Largest request head accepted; larger ones get 431 [default: 65536].
    #[arg(long, env = "BALLAST_MAX_HEADER_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_header_bytes: Option<usize>,
    /// Threads serving client connections, each with its own single-threaded runtime
    /// [default: the CPU request rounded up (--cpu-request-millis), else the CPUs this
    /// process may use, at most 4].
    #[arg(long, env = "BALLAST_WORKERS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// The container's CPU request in millicores, which sizes --workers when that is
    /// unset (the operator passes it through the downward API; 0 means none).
    #[arg(long, env = "BALLAST_CPU_REQUEST_MILLIS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_request_millis: Option<u64>,
    /// Session affinity key: `header:NAME`, `cookie:NAME` or `client-ip` [default: off].
    #[arg(long, env = "BALLAST_AFFINITY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity: Option<String>,
    /// With affinity, an endpoint takes at most this times the mean in-flight load [default: 1.25].
    #[arg(long, env = "BALLAST_AFFINITY_LOAD_FACTOR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity_load_factor: Option<f64>,
    /// Lifetime of the affinity cookie the proxy sets [default: 1h].
    #[arg(long, env = "BALLAST_AFFINITY_COOKIE_TTL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity_cookie_ttl: Option<String>,
    /// Mark the affinity cookie Secure [default: false].
    #[arg(long, env = "BALLAST_AFFINITY_COOKIE_SECURE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity_cookie_secure: Option<bool>,
    /// SameSite attribute of the affinity cookie: Lax, Strict or None [default: Lax].
    #[arg(long, env = "BALLAST_AFFINITY_COOKIE_SAME_SITE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity_cookie_same_site: Option<SameSite>,
    /// With `client-ip` affinity, use the first X-Forwarded-For hop [default: false].
    #[arg(long, env = "BALLAST_AFFINITY_TRUST_FORWARDED_FOR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity_trust_forwarded_for: Option<bool>,
    /// Access log: one JSON line per request to `stdout` or a file path [default: off].
    #[arg(long, env = "BALLAST_ACCESS_LOG")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_log: Option<String>,
    /// Keep query strings in the access log's `path` [default: false].
    #[arg(long, env = "BALLAST_ACCESS_LOG_QUERY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_log_query: Option<bool>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "BALLAST_LOG_FORMAT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    /// YAML or JSON file with any of these settings (keys are the long flag names).
    #[arg(long, env = "BALLAST_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
}

/// One client listener and the backend port it balances over.
#[derive(Clone, Debug, PartialEq)]
pub struct Listener {
    /// The EndpointSlice port it sends to; `None`: the first port (or, with a static
    /// list or file, the port listed there).
    pub port_name: Option<String>,
    /// Where it accepts clients.
    pub listen: SocketAddr,
    /// How it reaches the pods on that port.
    pub connect: ConnectConfig,
}

/// Zone-aware routing as configured.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ZoneConfig {
    /// On or off.
    pub routing: ZoneRouting,
    /// This proxy's zone, when given.
    pub zone: Option<String>,
    /// The proxies' Service, whose EndpointSlices give the zones of every proxy.
    pub proxy_service: Option<String>,
    /// This proxy's pod name.
    pub pod_name: Option<String>,
}

/// Validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Client listeners, at least one; each has its own endpoints and balancer state.
    pub listeners: Vec<Listener>,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// Where endpoints come from.
    pub source: Source,
    /// Balancer.
    pub balancer: BalancerConfig,
    /// Response head limit, from the end of the request body.
    pub response_timeout: Option<Duration>,
    /// Idle limit of a request/response stream.
    pub stream_idle_timeout: Option<Duration>,
    /// Bytes of a request body kept for a retry.
    pub retry_body_limit: usize,
    /// In-flight limit of the proxy, if any.
    pub max_in_flight: Option<usize>,
    /// Attempts per request.
    pub retry_attempts: u32,
    /// Retry budget ratio (0.2 = 20%).
    pub retry_budget_ratio: f64,
    /// Retry floor.
    pub retry_min_per_second: u32,
    /// Own shutdown: serve this long after SIGTERM with /ready failing.
    pub shutdown_delay: Duration,
    /// Own shutdown: then wait this long for in-flight requests.
    pub drain_timeout: Duration,
    /// Slowloris guard.
    pub header_read_timeout: Duration,
    /// Largest request head.
    pub max_header_bytes: usize,
    /// Serving threads.
    pub workers: usize,
    /// Log format.
    pub log_format: LogFormat,
    /// Session affinity.
    pub affinity: Option<crate::balance::affinity::AffinityConfig>,
    /// Where the access log goes, if anywhere.
    pub access_log: Option<crate::access_log::Destination>,
    /// Keep query strings in the access log.
    pub access_log_query: bool,
    /// Zone-aware routing.
    pub zones: ZoneConfig,
}

/// A configuration that cannot be used; `Display` prints one line per problem.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct InvalidConfig(pub Vec<String>);

impl Settings {
    /// Fills what flags and environment left unset from the `--config` file, if any.
    ///
    /// # Errors
    /// When the file cannot be read or holds unknown keys or wrong types.
    pub fn with_file(self) -> Result<Self, InvalidConfig> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| InvalidConfig(vec![format!("config file {}: {e}", path.display())]))?;
        let from_file: Settings = serde_norway::from_str(&text)
            .map_err(|e| InvalidConfig(vec![format!("config file {}: {e}", path.display())]))?;
        let mut merged =
            serde_json::to_value(&from_file).map_err(|e| InvalidConfig(vec![e.to_string()]))?;
        let given = serde_json::to_value(&self).map_err(|e| InvalidConfig(vec![e.to_string()]))?;
        if let (Some(merged), Some(given)) = (merged.as_object_mut(), given.as_object()) {
            merged.extend(given.clone());
        }
        let mut out: Settings =
            serde_json::from_value(merged).map_err(|e| InvalidConfig(vec![e.to_string()]))?;
        out.config = self.config;
        Ok(out)
    }
}
