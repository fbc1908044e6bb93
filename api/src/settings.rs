//! What the operator tells the binaries it runs: `ballast-proxy`'s settings and the
//! preStop command of `ballast-drain`, each one typed value rendered into the flags the
//! binary parses.
//!
//! The flag names and value formats live here and nowhere else on the operator's side;
//! the proxy's tests parse what [`ProxySettings::to_args`] renders and compare the
//! result field by field, so a flag renamed or a unit changed on one side fails a test.
//! Serde only: the proxy carries no Kubernetes types for it.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

/// The names a string-valued enum is written as, in flags and in JSON alike.
macro_rules! named_enum {
    ($name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The name in flags and JSON.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = String;

            fn from_str(text: &str) -> Result<Self, String> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == text)
                    .ok_or_else(|| {
                        let names: Vec<&str> = Self::ALL.iter().map(|v| v.as_str()).collect();
                        format!("{text:?} is not one of {}", names.join(", "))
                    })
            }
        }
    };
}

/// Load-balancing algorithm.
#[cfg_attr(feature = "resource", derive(schemars::JsonSchema))]
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// Power of two choices, cost = peak-EWMA latency x (in-flight + 1).
    #[default]
    P2cEwma,
    /// Power of two choices, cost = in-flight requests.
    LeastRequest,
    /// Each pod in turn.
    RoundRobin,
}
named_enum!(Algorithm { P2cEwma => "p2c-ewma", LeastRequest => "least-request", RoundRobin => "round-robin" });

/// `SameSite` attribute of the affinity cookie.
#[cfg_attr(feature = "resource", derive(schemars::JsonSchema))]
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SameSite {
    /// Sent on top-level navigations from other sites.
    #[default]
    Lax,
    /// Never sent from other sites.
    Strict,
    /// Always sent; requires `secure`.
    None,
}
named_enum!(SameSite { Lax => "Lax", Strict => "Strict", None => "None" });

/// Protocol the proxy speaks to the pods.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum BackendProtocol {
    /// HTTP/1.1 with keep-alive.
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (h2c, gRPC).
    H2c,
}
named_enum!(BackendProtocol { Http1 => "http1", H2c => "h2c" });

/// How the binaries write their logs.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for a cluster's log pipeline.
    Json,
}
named_enum!(LogFormat { Text => "text", Json => "json" });

/// Whether a proxy prefers the endpoints in its own topology zone.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ZoneRouting {
    /// Every eligible endpoint, whatever its zone.
    #[default]
    Off,
    /// Endpoints in the proxy's zone while they can carry its share of the traffic,
    /// spilling to the other zones when they cannot (too few, overloaded, ejected or
    /// draining), so no zone's pods sit idle.
    PreferSameZone,
}
named_enum!(ZoneRouting { Off => "off", PreferSameZone => "prefer-same-zone" });

/// Zone-aware routing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ZoneSettings {
    /// On or off.
    pub routing: ZoneRouting,
    /// The proxy's own zone, overriding what `proxy_service` says.
    pub zone: Option<String>,
    /// The Service over every proxy replica (the admin Service): its EndpointSlices
    /// give each proxy pod's zone, hence this proxy's own (found by its pod name,
    /// `BALLAST_POD_NAME`) and how the proxies spread over the zones.
    pub proxy_service: Option<String>,
}

/// Retries of requests the pod cannot have processed.
#[derive(Clone, Debug, PartialEq)]
pub struct RetrySettings {
    /// Attempts per request, the first included.
    pub attempts: u32,
    /// Retries as a percentage of recent requests.
    pub budget_percent: u32,
    /// Retries per second always allowed.
    pub min_per_second: u32,
    /// Bytes of a request body kept for a retry.
    pub body_limit: u64,
}

/// Outlier ejection.
#[derive(Clone, Debug, PartialEq)]
pub struct OutlierSettings {
    /// Consecutive failures that eject an endpoint; 0 disables ejection.
    pub consecutive_failures: u32,
    /// First ejection's length, multiplied by the ejection count.
    pub base_ejection: Duration,
    /// Longest ejection.
    pub max_ejection: Duration,
    /// Most endpoints ejected at once, percent.
    pub max_ejected_percent: u32,
}

/// Session affinity.
#[derive(Clone, Debug, PartialEq)]
pub struct AffinitySettings {
    /// `header:NAME`, `cookie:NAME` or `client-ip`.
    pub key: String,
    /// An endpoint takes at most this times the mean in-flight load.
    pub load_factor: f64,
    /// Lifetime of the cookie the proxy sets.
    pub cookie_ttl: Duration,
    /// Mark the cookie `Secure`.
    pub cookie_secure: bool,
    /// The cookie's `SameSite`.
    pub cookie_same_site: SameSite,
    /// With `client-ip`, use the first `X-Forwarded-For` hop.
    pub trust_forwarded_for: bool,
}

/// One client listener of `ballast-proxy`: what it accepts on, which port of the pods
/// it balances over, and how it talks to them. Rendered as
/// `--port=NAME=LISTEN[,protocol=PROTOCOL]`, the form [`ListenerSettings::from_str`]
/// parses back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerSettings {
    /// The EndpointSlice port name (the backend port) this listener sends to.
    pub name: String,
    /// Where it accepts clients.
    pub listen: SocketAddr,
    /// Protocol to the pods on that port.
    pub protocol: BackendProtocol,
}

impl fmt::Display for ListenerSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}={},protocol={}",
            self.name, self.listen, self.protocol
        )
    }
}

impl FromStr for ListenerSettings {
    type Err = String;

    /// `NAME=LISTEN[,protocol=PROTOCOL]`, e.g. `grpc=[::]:8081,protocol=h2c`; the
    /// protocol defaults to `http1`.
    fn from_str(text: &str) -> Result<Self, String> {
        let form = "expected NAME=IP:PORT[,protocol=http1|h2c]";
        let (name, rest) = text
            .split_once('=')
            .ok_or_else(|| format!("{text:?}: {form}"))?;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(format!(
                "{text:?}: the port name {name:?} is not lowercase letters, digits and '-'"
            ));
        }
        let mut parts = rest.split(',');
        let address = parts.next().unwrap_or_default();
        let listen = address
            .parse()
            .map_err(|_| format!("{text:?}: {address:?} is not an IP:port address"))?;
        let mut protocol = BackendProtocol::default();
        for option in parts {
            match option.split_once('=') {
                Some(("protocol", value)) => {
                    protocol = value.parse().map_err(|e| format!("{text:?}: {e}"))?;
                }
                _ => return Err(format!("{text:?}: unknown option {option:?}; {form}")),
            }
        }
        Ok(Self {
            name: name.to_owned(),
            listen,
            protocol,
        })
    }
}

/// Everything the operator sets on `ballast-proxy`. What it leaves out keeps the
/// proxy's own default (see `ballast-proxy --help`).
#[derive(Clone, Debug, PartialEq)]
pub struct ProxySettings {
    /// Client listeners, one per backend port, in the spec's order.
    pub listeners: Vec<ListenerSettings>,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// The Service whose EndpointSlices list the pods.
    pub kube_service: String,
    /// Selection algorithm.
    pub algorithm: Algorithm,
    /// TCP connect limit.
    pub connect_timeout: Duration,
    /// Time a pod may take to start its response; `None`: no limit.
    pub response_timeout: Option<Duration>,
    /// A stream with no frame either way for this long is cut; `None`: never.
    pub stream_idle_timeout: Option<Duration>,
    /// Idle pooled connections older than this are closed.
    pub idle_timeout: Duration,
    /// Retries.
    pub retries: RetrySettings,
    /// Requests in flight through one proxy at once; `None`: no limit.
    pub max_in_flight: Option<u64>,
    /// Outlier ejection.
    pub outlier: OutlierSettings,
    /// Slow start of a new endpoint.
    pub warmup: Duration,
    /// A drain the pod asked for and discovery never confirms expires after this.
    pub drain_ttl: Duration,
    /// On SIGTERM, keep serving this long with `/ready` failing.
    pub shutdown_delay: Duration,
    /// Then wait this long for requests in flight.
    pub drain_timeout: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// Session affinity, when on.
    pub affinity: Option<AffinitySettings>,
    /// Zone-aware routing.
    pub zones: ZoneSettings,
}

impl ProxySettings {
    /// The command-line arguments, one `--flag=value` each; one `--port` per listener.
    pub fn to_args(&self) -> Vec<String> {
        let mut args: Vec<String> = self
            .listeners
            .iter()
            .map(|listener| arg("port", listener))
            .collect();
        args.extend([
            arg("admin-listen", self.admin_listen),
            arg("kube-service", &self.kube_service),
            arg("algorithm", self.algorithm),
            arg("connect-timeout", duration(self.connect_timeout)),
            arg("response-timeout", optional(self.response_timeout)),
            arg("stream-idle-timeout", optional(self.stream_idle_timeout)),
            arg("idle-timeout", duration(self.idle_timeout)),
            arg("retry-attempts", self.retries.attempts),
            arg("retry-budget-percent", self.retries.budget_percent),
            arg("retry-min-per-second", self.retries.min_per_second),
            arg("retry-body-limit", self.retries.body_limit),
            arg("max-in-flight", self.max_in_flight.unwrap_or(0)),
            arg(
                "outlier-consecutive-failures",
                self.outlier.consecutive_failures,
            ),
            arg(
                "outlier-base-ejection",
                duration(self.outlier.base_ejection),
            ),
            arg("outlier-max-ejection", duration(self.outlier.max_ejection)),
            arg(
                "outlier-max-ejected-percent",
                self.outlier.max_ejected_percent,
            ),
            arg("warmup", duration(self.warmup)),
            arg("drain-ttl", duration(self.drain_ttl)),
            arg("shutdown-delay", duration(self.shutdown_delay)),
            arg("drain-timeout", duration(self.drain_timeout)),
            arg("log-format", self.log_format),
        ]);
        if self.zones.routing != ZoneRouting::Off {
            args.push(arg("zone-routing", self.zones.routing));
        }
        if let Some(zone) = &self.zones.zone {
            args.push(arg("zone", zone));
        }
        if let Some(service) = &self.zones.proxy_service {
            args.push(arg("proxy-service", service));
        }
        if let Some(affinity) = &self.affinity {
            args.extend([
                arg("affinity", &affinity.key),
                arg("affinity-load-factor", affinity.load_factor),
                arg("affinity-cookie-ttl", duration(affinity.cookie_ttl)),
                arg("affinity-cookie-secure", affinity.cookie_secure),
                arg("affinity-cookie-same-site", affinity.cookie_same_site),
                arg("affinity-trust-forwarded-for", affinity.trust_forwarded_for),
            ]);
        }
        args
    }
}

/// What `ballast-drain` does after the drain: the user's own preStop hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AfterDrain {
    /// Nothing.
    Nothing,
    /// Sleep (a `preStop: sleep` hook).
    Sleep(Duration),
    /// Run this command (a `preStop: exec` hook).
    Exec(Vec<String>),
}

/// The preStop command of an app pod: drain it from every proxy, then run the user's
/// own hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrainSettings {
    /// The proxies' admin Service, `host:port`.
    pub proxies: String,
    /// Stop waiting after this long.
    pub timeout: Duration,
    /// The user's own hook.
    pub then: AfterDrain,
}

impl DrainSettings {
    /// The command line, `binary` first.
    pub fn to_command(&self, binary: &str) -> Vec<String> {
        let mut command = vec![
            binary.to_owned(),
            arg("proxies", &self.proxies),
            arg("timeout", duration(self.timeout)),
        ];
        match &self.then {
            AfterDrain::Nothing => {}
            AfterDrain::Sleep(pause) => command.push(arg("then-sleep", duration(*pause))),
            AfterDrain::Exec(user) => {
                command.push("--".to_owned());
                command.extend(user.iter().cloned());
            }
        }
        command
    }
}

impl AfterDrain {
    /// The user's own hook inside a preStop `command` that [`DrainSettings::to_command`]
    /// rendered with `binary`; `None` when `command` is not such a command (it is the
    /// user's own hook). How an adopted Deployment's live preStop, which ballast wrote,
    /// is told from the user's.
    pub fn chained_in(command: &[String], binary: &str) -> Option<Self> {
        let (first, rest) = command.split_first()?;
        if first != binary {
            return None;
        }
        if let Some(at) = rest.iter().position(|a| a == "--") {
            return Some(Self::Exec(rest[at + 1..].to_vec()));
        }
        let sleep = rest
            .iter()
            .find_map(|a| a.strip_prefix("--then-sleep="))
            .and_then(parse_duration);
        Some(sleep.map_or(Self::Nothing, Self::Sleep))
    }
}

/// The inverse of [`duration`].
fn parse_duration(text: &str) -> Option<Duration> {
    if text == "0" {
        return Some(Duration::ZERO);
    }
    if let Some(ms) = text.strip_suffix("ms") {
        return ms.parse().ok().map(Duration::from_millis);
    }
    text.strip_suffix('s')?
        .parse()
        .ok()
        .map(Duration::from_secs)
}

fn arg(flag: &str, value: impl fmt::Display) -> String {
    format!("--{flag}={value}")
}

/// `0`, whole seconds as `30s`, anything else in milliseconds (`250ms`): the forms
/// `ballast-proxy` and `ballast-drain` parse. Below a millisecond is dropped.
pub fn duration(d: Duration) -> String {
    if d.is_zero() {
        "0".to_owned()
    } else if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

fn optional(d: Option<Duration>) -> String {
    d.map_or_else(|| "0".to_owned(), duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hook_chained_after_the_drain_is_read_back() {
        for then in [
            AfterDrain::Nothing,
            AfterDrain::Sleep(Duration::from_secs(5)),
            AfterDrain::Sleep(Duration::from_millis(1500)),
            AfterDrain::Exec(vec!["/bin/sh".into(), "-c".into(), "flush --now".into()]),
        ] {
            let drain = DrainSettings {
                proxies: "demo-proxy-admin.shop.svc:9901".into(),
                timeout: Duration::from_secs(30),
                then: then.clone(),
            };
            let command = drain.to_command("/ballast/bin/ballast-drain");
            assert_eq!(
                AfterDrain::chained_in(&command, "/ballast/bin/ballast-drain"),
                Some(then)
            );
        }
        let own = vec!["/bin/sh".to_owned(), "-c".to_owned(), "sleep 5".to_owned()];
        assert_eq!(
            AfterDrain::chained_in(&own, "/ballast/bin/ballast-drain"),
            None
        );
    }

    #[test]
    fn names_parse_back_and_match_the_json() {
        for a in Algorithm::ALL {
            assert_eq!(a.as_str().parse::<Algorithm>(), Ok(*a));
            assert_eq!(
                serde_json::to_value(a).expect("serialises"),
                serde_json::Value::from(a.as_str())
            );
        }
        for s in SameSite::ALL {
            assert_eq!(
                serde_json::to_value(s).expect("serialises"),
                serde_json::Value::from(s.as_str())
            );
        }
        for p in BackendProtocol::ALL {
            assert_eq!(
                serde_json::to_value(p).expect("serialises"),
                serde_json::Value::from(p.as_str())
            );
        }
        assert_eq!(
            "fastest".parse::<Algorithm>(),
            Err("\"fastest\" is not one of p2c-ewma, least-request, round-robin".to_owned())
        );
    }

    #[test]
    fn listeners_render_and_parse_back() {
        let grpc = ListenerSettings {
            name: "grpc".to_owned(),
            listen: "[::]:8081".parse().expect("address"),
            protocol: BackendProtocol::H2c,
        };
        assert_eq!(grpc.to_string(), "grpc=[::]:8081,protocol=h2c");
        assert_eq!(grpc.to_string().parse(), Ok(grpc));
        assert_eq!(
            "web=127.0.0.1:80"
                .parse::<ListenerSettings>()
                .map(|l| l.protocol),
            Ok(BackendProtocol::Http1),
            "http1 unless told"
        );
        for bad in [
            "127.0.0.1:80",
            "Web=127.0.0.1:80",
            "web=nowhere",
            "web=127.0.0.1:80,protocol=h3",
            "web=127.0.0.1:80,tls=on",
        ] {
            assert!(bad.parse::<ListenerSettings>().is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_render_in_the_units_the_binaries_parse() {
        assert_eq!(duration(Duration::ZERO), "0");
        assert_eq!(duration(Duration::from_secs(30)), "30s");
        assert_eq!(duration(Duration::from_millis(250)), "250ms");
        assert_eq!(duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(optional(None), "0");
    }

    #[test]
    fn the_drain_command_chains_the_users_hook() {
        let settings = DrainSettings {
            proxies: "web-proxy-admin.shop.svc:9901".to_owned(),
            timeout: Duration::from_secs(45),
            then: AfterDrain::Exec(vec!["/bin/flush".to_owned(), "--all".to_owned()]),
        };
        assert_eq!(
            settings.to_command("/ballast/bin/ballast-drain"),
            [
                "/ballast/bin/ballast-drain",
                "--proxies=web-proxy-admin.shop.svc:9901",
                "--timeout=45s",
                "--",
                "/bin/flush",
                "--all"
            ]
        );
        let sleep = DrainSettings {
            then: AfterDrain::Sleep(Duration::from_secs(5)),
            ..settings
        };
        assert_eq!(sleep.to_command("d")[3], "--then-sleep=5s");
    }
}
