//! Configuration: flags, the same names as `BALLAST_*` environment variables, and an
//! optional YAML/JSON file with the flags' long names as keys. Flags and environment
//! win over the file; the file wins over defaults. Every problem is reported, one line
//! each, before the proxy starts.

use crate::discovery::Source;
use crate::load::EjectionPolicy;
use crate::pool::{BackendProtocol, ConnectConfig};
use crate::registry::{Algorithm, BalancerConfig};
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
    /// Client-facing listener [default: [::]:8080, IPv6 and IPv4].
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
    /// EndpointSlice port name to use [default: the first port].
    #[arg(long, env = "BALLAST_PORT_NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_name: Option<String>,
    /// p2c-ewma, least-request or round-robin [default: p2c-ewma].
    #[arg(long, env = "BALLAST_ALGORITHM", value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<Algorithm>,
    /// Protocol to the backends: http1 or h2c (also for gRPC) [default: http1].
    #[arg(long, env = "BALLAST_BACKEND_PROTOCOL", value_enum)]
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
    pub affinity_cookie_same_site: Option<String>,
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
    pub log_format: Option<String>,
    /// YAML or JSON file with any of these settings (keys are the long flag names).
    #[arg(long, env = "BALLAST_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
}

/// Validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Client-facing listener.
    pub listen: SocketAddr,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// Where endpoints come from.
    pub source: Source,
    /// Balancer.
    pub balancer: BalancerConfig,
    /// Backend connections.
    pub connect: ConnectConfig,
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
    /// JSON logs.
    pub json_logs: bool,
    /// Session affinity.
    pub affinity: Option<crate::balance::affinity::AffinityConfig>,
    /// Where the access log goes, if anywhere.
    pub access_log: Option<crate::access_log::Destination>,
    /// Keep query strings in the access log.
    pub access_log_query: bool,
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

    /// Checks everything and applies defaults.
    ///
    /// # Errors
    /// Every problem found, one line each.
    pub fn resolve(&self) -> Result<Config, InvalidConfig> {
        let mut problems = Vec::new();
        let mut addr = |name: &str, value: &Option<String>, default: &str| -> SocketAddr {
            let text = value.as_deref().unwrap_or(default);
            text.parse().unwrap_or_else(|_| {
                problems.push(format!("--{name}: {text:?} is not an IP:port address"));
                SocketAddr::from(([0, 0, 0, 0], 0))
            })
        };
        let listen = addr("listen", &self.listen, "[::]:8080");
        let admin_listen = addr("admin-listen", &self.admin_listen, "[::]:9901");
        if listen == admin_listen && listen.port() != 0 {
            problems.push("--listen and --admin-listen must differ".to_owned());
        }

        let mut duration = |name: &str, value: &Option<String>, default: Duration| -> Duration {
            match value.as_deref().map(parse_duration) {
                None => default,
                Some(Ok(d)) => d,
                Some(Err(e)) => {
                    problems.push(format!("--{name}: {e}"));
                    default
                }
            }
        };
        let connect_timeout = duration(
            "connect-timeout",
            &self.connect_timeout,
            Duration::from_secs(1),
        );
        let response_timeout = duration(
            "response-timeout",
            &self.response_timeout,
            Duration::from_secs(60),
        );
        let idle_timeout = duration("idle-timeout", &self.idle_timeout, Duration::from_secs(30));
        let stream_idle_timeout = duration(
            "stream-idle-timeout",
            &self.stream_idle_timeout,
            Duration::from_secs(300),
        );
        let base_ejection = duration(
            "outlier-base-ejection",
            &self.outlier_base_ejection,
            Duration::from_secs(30),
        );
        let max_ejection = duration(
            "outlier-max-ejection",
            &self.outlier_max_ejection,
            Duration::from_secs(300),
        );
        let warmup = duration("warmup", &self.warmup, Duration::from_secs(10));
        let ewma_decay = duration("ewma-decay", &self.ewma_decay, Duration::from_secs(10));
        let initial_rtt = duration("initial-rtt", &self.initial_rtt, Duration::from_millis(30));
        let shutdown_delay = duration(
            "shutdown-delay",
            &self.shutdown_delay,
            Duration::from_secs(5),
        );
        let drain_timeout = duration(
            "drain-timeout",
            &self.drain_timeout,
            Duration::from_secs(30),
        );
        let drain_ttl = duration("drain-ttl", &self.drain_ttl, drain_timeout * 2);
        let cookie_ttl = duration(
            "affinity-cookie-ttl",
            &self.affinity_cookie_ttl,
            Duration::from_secs(3600),
        );
        let header_read_timeout = duration(
            "header-read-timeout",
            &self.header_read_timeout,
            Duration::from_secs(10),
        );

        for (name, value) in [
            ("connect-timeout", connect_timeout),
            ("idle-timeout", idle_timeout),
            ("ewma-decay", ewma_decay),
            ("drain-ttl", drain_ttl),
            ("header-read-timeout", header_read_timeout),
            ("outlier-base-ejection", base_ejection),
        ] {
            if value.is_zero() {
                problems.push(format!("--{name}: must be greater than 0"));
            }
        }
        if max_ejection < base_ejection {
            problems.push(
                "--outlier-max-ejection: must not be shorter than --outlier-base-ejection"
                    .to_owned(),
            );
        }
        let retry_attempts = self.retry_attempts.unwrap_or(2);
        if !(1..=5).contains(&retry_attempts) {
            problems.push(format!(
                "--retry-attempts: {retry_attempts} is outside 1..=5"
            ));
        }
        let budget = self.retry_budget_percent.unwrap_or(20);
        if budget > 100 {
            problems.push(format!("--retry-budget-percent: {budget} is above 100"));
        }
        let max_ejected = self.outlier_max_ejected_percent.unwrap_or(50);
        if max_ejected > 50 {
            problems.push(format!(
                "--outlier-max-ejected-percent: {max_ejected} is above 50"
            ));
        }
        let workers = self.workers.unwrap_or_else(|| {
            default_workers(
                self.cpu_request_millis,
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            )
        });
        if !(1..=256).contains(&workers) {
            problems.push(format!("--workers: {workers} is outside 1..=256"));
        }
        let max_header_bytes = self.max_header_bytes.unwrap_or(64 * 1024);
        if !(8192..=1024 * 1024).contains(&max_header_bytes) {
            problems.push(format!(
                "--max-header-bytes: {max_header_bytes} is outside 8192..=1048576"
            ));
        }
        let json_logs = match self.log_format.as_deref() {
            None | Some("text") => false,
            Some("json") => true,
            Some(other) => {
                problems.push(format!("--log-format: {other:?} is neither text nor json"));
                false
            }
        };

        let load_factor = self.affinity_load_factor.unwrap_or(1.25);
        if !(load_factor > 1.0 && load_factor <= 10.0) {
            problems.push(format!(
                "--affinity-load-factor: {load_factor} is outside (1, 10]"
            ));
        }
        let affinity_source = match self.affinity.as_deref() {
            None => None,
            Some("client-ip") => Some(crate::balance::affinity::KeySource::ClientIp),
            Some(other) => match other.split_once(':') {
                Some(("header", name)) => match http::HeaderName::from_bytes(name.as_bytes()) {
                    Ok(name) => Some(crate::balance::affinity::KeySource::Header(name)),
                    Err(_) => {
                        problems.push(format!("--affinity: {name:?} is not a header name"));
                        None
                    }
                },
                Some(("cookie", name))
                    if !name.is_empty()
                        && name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) =>
                {
                    Some(crate::balance::affinity::KeySource::Cookie(name.to_owned()))
                }
                _ => {
                    problems.push(format!(
                        "--affinity: {other:?} is not header:NAME, cookie:NAME or client-ip"
                    ));
                    None
                }
            },
        };
        let same_site = self
            .affinity_cookie_same_site
            .clone()
            .unwrap_or_else(|| "Lax".to_owned());
        if !["Lax", "Strict", "None"].contains(&same_site.as_str()) {
            problems.push(format!(
                "--affinity-cookie-same-site: {same_site:?} is not Lax, Strict or None"
            ));
        }
        if same_site == "None" && self.affinity_cookie_secure != Some(true) {
            problems.push("--affinity-cookie-same-site None needs --affinity-cookie-secure true (browsers drop it otherwise)".to_owned());
        }
        let affinity = affinity_source.map(|source| crate::balance::affinity::AffinityConfig {
            source,
            load_factor,
            cookie_ttl,
            cookie_secure: self.affinity_cookie_secure.unwrap_or(false),
            cookie_same_site: same_site,
            trust_forwarded_for: self.affinity_trust_forwarded_for.unwrap_or(false),
        });
        let sources = [
            self.endpoints_file.is_some(),
            self.endpoints.is_some(),
            self.kube_service.is_some(),
        ];
        let source = match sources.iter().filter(|s| **s).count() {
            0 => {
                problems.push(
                    "one of --endpoints-file, --endpoints or --kube-service is required".to_owned(),
                );
                None
            }
            1 => self.source(&mut problems),
            _ => {
                problems.push(
                    "--endpoints-file, --endpoints and --kube-service are mutually exclusive"
                        .to_owned(),
                );
                None
            }
        };

        match source {
            Some(source) if problems.is_empty() => Ok(Config {
                listen,
                admin_listen,
                source,
                balancer: BalancerConfig {
                    algorithm: self.algorithm.unwrap_or(Algorithm::P2cEwma),
                    initial_rtt,
                    ewma_decay,
                    warmup,
                    ejection: EjectionPolicy {
                        consecutive_failures: self.outlier_consecutive_failures.unwrap_or(5),
                        base: base_ejection,
                        max: max_ejection,
                        max_ejected_ratio: f64::from(max_ejected) / 100.0,
                    },
                    drain_ttl,
                },
                connect: ConnectConfig {
                    protocol: self.backend_protocol.unwrap_or(BackendProtocol::Http1),
                    connect_timeout,
                    idle_timeout,
                },
                response_timeout: (!response_timeout.is_zero()).then_some(response_timeout),
                stream_idle_timeout: (!stream_idle_timeout.is_zero())
                    .then_some(stream_idle_timeout),
                retry_body_limit: self
                    .retry_body_limit
                    .unwrap_or(crate::forward::DEFAULT_RETRY_BODY_LIMIT),
                max_in_flight: self.max_in_flight.filter(|&max| max > 0),
                retry_attempts,
                retry_budget_ratio: f64::from(budget) / 100.0,
                retry_min_per_second: self.retry_min_per_second.unwrap_or(10),
                shutdown_delay,
                drain_timeout,
                header_read_timeout,
                max_header_bytes,
                workers,
                json_logs,
                affinity,
                access_log: self.access_log.as_deref().map(|d| match d {
                    "stdout" | "-" => crate::access_log::Destination::Stdout,
                    path => crate::access_log::Destination::File(path.into()),
                }),
                access_log_query: self.access_log_query.unwrap_or(false),
            }),
            _ => Err(InvalidConfig(problems)),
        }
    }

    fn source(&self, problems: &mut Vec<String>) -> Option<Source> {
        if let Some(path) = &self.endpoints_file {
            return Some(Source::File(path.clone()));
        }
        if let Some(list) = &self.endpoints {
            let mut addresses = Vec::new();
            for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                match item.parse() {
                    Ok(a) => addresses.push(a),
                    Err(_) => {
                        problems.push(format!("--endpoints: {item:?} is not an IP:port address"))
                    }
                }
            }
            if addresses.is_empty() {
                problems.push("--endpoints: no address given".to_owned());
            }
            return Some(Source::Static(addresses));
        }
        self.kube_service
            .as_ref()
            .map(|service| Source::Kubernetes {
                service: service.clone(),
                namespace: self.namespace.clone(),
                port_name: self.port_name.clone(),
            })
    }
}

/// Parses `250ms`, `1s`, `1.5s`, `2m`, `1h`, or a bare `0`.
///
/// # Errors
/// A message naming the accepted forms.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 250ms, 1s, 2m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("{text:?} is not a duration like 250ms, 1s, 2m")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

/// Without a CPU limit a process may use every core of the node, and a thread per core
/// on a 64-core node only adds wake-ups and memory: the CPU the pod asked for is what
/// it will get under contention, so that (rounded up) sizes the workers. Without a
/// request, the CPUs available, but at most 4.
pub fn default_workers(cpu_request_millis: Option<u64>, available: usize) -> usize {
    let cap = available.max(1);
    match cpu_request_millis {
        Some(m) if m > 0 => usize::try_from(m.div_ceil(1000))
            .unwrap_or(cap)
            .clamp(1, cap),
        _ => cap.min(4),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn every_problem_is_reported_on_its_own_line() {
        let settings = Settings::parse_from([
            "ballast-proxy",
            "--listen",
            "nope",
            "--retry-attempts",
            "9",
            "--connect-timeout",
            "1 sec",
            "--endpoints",
            "127.0.0.2:80",
            "--kube-service",
            "web",
            "--workers",
            "0",
        ]);
        let err = settings.resolve().unwrap_err();
        let text = err.to_string();
        assert_eq!(text.lines().count(), 5, "{text}");
        assert!(text.contains("--workers: 0 is outside 1..=256"));
        assert!(text.contains("--listen: \"nope\" is not an IP:port address"));
        assert!(text.contains("--retry-attempts: 9 is outside 1..=5"));
        assert!(text.contains("--connect-timeout"));
        assert!(text.contains("mutually exclusive"));
    }

    #[test]
    fn workers_follow_the_cpu_request_not_the_node() {
        assert_eq!(default_workers(Some(100), 64), 1);
        assert_eq!(default_workers(Some(1000), 64), 1);
        assert_eq!(default_workers(Some(1500), 64), 2);
        assert_eq!(
            default_workers(Some(8000), 2),
            2,
            "never more than the CPUs usable"
        );
        assert_eq!(default_workers(Some(0), 64), 4, "no request: capped");
        assert_eq!(default_workers(None, 2), 2);
        let settings = Settings::parse_from([
            "ballast-proxy",
            "--endpoints",
            "127.0.0.2:80",
            "--cpu-request-millis",
            "250",
        ]);
        assert_eq!(settings.resolve().unwrap().workers, 1);
    }

    #[test]
    fn defaults_and_file_layering() {
        let dir = std::env::temp_dir().join(format!("ballast-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("proxy.yaml");
        std::fs::write(
            &file,
            "algorithm: round-robin\nretry-attempts: 3\nendpoints: 127.0.0.2:80\n",
        )
        .unwrap();
        let settings = Settings::parse_from([
            "ballast-proxy",
            "--config",
            file.to_str().unwrap(),
            "--retry-attempts",
            "1",
        ]);
        let config = settings.with_file().unwrap().resolve().unwrap();
        assert_eq!(
            config.balancer.algorithm,
            Algorithm::RoundRobin,
            "from the file"
        );
        assert_eq!(config.retry_attempts, 1, "the flag wins over the file");
        assert_eq!(config.drain_timeout, Duration::from_secs(30));
        assert_eq!(
            config.balancer.drain_ttl,
            Duration::from_secs(60),
            "2 x drain timeout"
        );
        assert_eq!(
            config.source,
            Source::Static(vec!["127.0.0.2:80".parse().unwrap()])
        );

        std::fs::write(&file, "retry-atempts: 3\n").unwrap();
        let settings = Settings::parse_from(["ballast-proxy", "--config", file.to_str().unwrap()]);
        assert!(
            settings
                .with_file()
                .unwrap_err()
                .to_string()
                .contains("unknown field")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
