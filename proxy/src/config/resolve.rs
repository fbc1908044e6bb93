//! From the settings as given to a checked [`Config`] with defaults applied.

use super::{Config, InvalidConfig, Listener, Settings, ZoneConfig};
use crate::discovery::Source;
use crate::load::EjectionPolicy;
use crate::pool::{BackendProtocol, ConnectConfig};
use crate::registry::{Algorithm, BalancerConfig};
use ballast_api::settings::{ListenerSettings, SameSite, ZoneRouting};
use std::net::SocketAddr;
use std::time::Duration;

impl Settings {
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
        let admin_listen = addr("admin-listen", &self.admin_listen, "[::]:9901");
        let mut listeners = self.listeners(&mut problems);
        let in_use = |a: SocketAddr, b: SocketAddr| a.port() != 0 && a == b;
        if listeners.iter().any(|l| in_use(l.listen, admin_listen)) {
            problems.push("--admin-listen must differ from every client listener".to_owned());
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
        for listener in &mut listeners {
            listener.connect.connect_timeout = connect_timeout;
            listener.connect.idle_timeout = idle_timeout;
        }
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
        let same_site = self.affinity_cookie_same_site.unwrap_or_default();
        if same_site == SameSite::None && self.affinity_cookie_secure != Some(true) {
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
        let zones = self.zones(&mut problems);
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
            1 if listeners.len() > 1 && self.kube_service.is_none() => {
                problems.push(
                    "several --port listeners need --kube-service: --endpoints and --endpoints-file list one port".to_owned(),
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
                listeners,
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
                log_format: self.log_format.unwrap_or_default(),
                affinity,
                access_log: self.access_log.as_deref().map(|d| match d {
                    "stdout" | "-" => crate::access_log::Destination::Stdout,
                    path => crate::access_log::Destination::File(path.into()),
                }),
                access_log_query: self.access_log_query.unwrap_or(false),
                zones,
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
            })
    }

    /// Zone routing: on, it needs a way to learn this proxy's zone.
    fn zones(&self, problems: &mut Vec<String>) -> ZoneConfig {
        let zones = ZoneConfig {
            routing: self.zone_routing.unwrap_or_default(),
            zone: self.zone.clone(),
            proxy_service: self.proxy_service.clone(),
            pod_name: self.pod_name.clone().filter(|p| !p.is_empty()),
        };
        for (flag, value) in [
            ("--zone", &zones.zone),
            ("--proxy-service", &zones.proxy_service),
        ] {
            if value.as_deref() == Some("") {
                problems.push(format!("{flag}: must not be empty"));
            }
        }
        if zones.proxy_service.is_some() && self.kube_service.is_none() {
            problems.push(
                "--proxy-service needs Kubernetes discovery (--kube-service): the proxies' zones come from EndpointSlices".to_owned(),
            );
        }
        if zones.routing == ZoneRouting::PreferSameZone {
            match (&zones.zone, &zones.proxy_service, &zones.pod_name) {
                (None, None, _) => problems.push(
                    "--zone-routing=prefer-same-zone needs --zone or --proxy-service: without either this proxy can never learn its zone".to_owned(),
                ),
                (None, Some(_), None) => problems.push(
                    "--proxy-service finds this proxy's zone by its pod name: set BALLAST_POD_NAME (--pod-name) or --zone".to_owned(),
                ),
                _ => {}
            }
        }
        zones
    }

    /// The client listeners: one per `--port`, else the one `--listen` describes. Their
    /// connect and idle timeouts are filled in by the caller.
    fn listeners(&self, problems: &mut Vec<String>) -> Vec<Listener> {
        let connect = |protocol| ConnectConfig {
            protocol,
            connect_timeout: Duration::ZERO,
            idle_timeout: Duration::ZERO,
        };
        if self.port.is_empty() {
            let text = self.listen.as_deref().unwrap_or("[::]:8080");
            let listen = text.parse().unwrap_or_else(|_| {
                problems.push(format!("--listen: {text:?} is not an IP:port address"));
                SocketAddr::from(([0, 0, 0, 0], 0))
            });
            return vec![Listener {
                port_name: self.port_name.clone(),
                listen,
                connect: connect(self.backend_protocol.unwrap_or(BackendProtocol::Http1)),
            }];
        }
        for (flag, given) in [
            ("--listen", self.listen.is_some()),
            ("--port-name", self.port_name.is_some()),
            ("--backend-protocol", self.backend_protocol.is_some()),
        ] {
            if given {
                problems.push(format!(
                    "{flag} describes the one listener without --port; give it inside --port instead"
                ));
            }
        }
        let mut listeners: Vec<Listener> = Vec::with_capacity(self.port.len());
        for text in &self.port {
            match text.parse::<ListenerSettings>() {
                Err(e) => problems.push(format!("--port: {e}")),
                Ok(l)
                    if listeners
                        .iter()
                        .any(|o| o.port_name.as_ref() == Some(&l.name)) =>
                {
                    problems.push(format!("--port: the port {:?} is given twice", l.name));
                }
                Ok(l) if l.listen.port() != 0 && listeners.iter().any(|o| o.listen == l.listen) => {
                    problems.push(format!("--port: {} is listened on twice", l.listen));
                }
                Ok(l) => listeners.push(Listener {
                    port_name: Some(l.name),
                    listen: l.listen,
                    connect: connect(l.protocol),
                }),
            }
        }
        listeners
    }
}

/// Parses a duration in jiff's friendly format (`250ms`, `1s`, `1.5s`, `2m`, `1h 30m`)
/// or ISO 8601 (`PT1S`), or a bare `0`. Negative durations are refused.
///
/// # Errors
/// A message naming the accepted forms.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let parsed: jiff::SignedDuration = text
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 250ms, 1s, 2m"))?;
    Duration::try_from(parsed).map_err(|_| format!("{text:?} is negative"))
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
