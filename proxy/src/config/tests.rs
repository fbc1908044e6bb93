use super::*;
use crate::balance::affinity::KeySource;
use ballast_api::settings::{
    AffinitySettings, ListenerSettings, LogFormat, OutlierSettings, ProxySettings, RetrySettings,
    SameSite, ZoneRouting, ZoneSettings,
};
use clap::Parser;
use std::time::Duration;

#[test]
fn durations() {
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
    assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
    assert!(parse_duration("5").is_err());
    assert!(parse_duration("-1s").is_err());
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
        "1 parsec",
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

/// Everything the operator can set, each to a value that is not the proxy's default.
fn operator_settings() -> ProxySettings {
    ProxySettings {
        listeners: vec![
            ListenerSettings {
                name: "grpc".to_owned(),
                listen: "[::]:8081".parse().expect("address"),
                protocol: BackendProtocol::H2c,
            },
            ListenerSettings {
                name: "web".to_owned(),
                listen: "[::]:8082".parse().expect("address"),
                protocol: BackendProtocol::Http1,
            },
        ],
        admin_listen: "[::]:9902".parse().expect("address"),
        kube_service: "web-backends".to_owned(),
        algorithm: Algorithm::LeastRequest,
        connect_timeout: Duration::from_millis(250),
        response_timeout: None,
        stream_idle_timeout: Some(Duration::from_secs(120)),
        idle_timeout: Duration::from_secs(45),
        retries: RetrySettings {
            attempts: 3,
            budget_percent: 30,
            min_per_second: 7,
            body_limit: 4096,
        },
        max_in_flight: Some(500),
        outlier: OutlierSettings {
            consecutive_failures: 4,
            base_ejection: Duration::from_secs(15),
            max_ejection: Duration::from_secs(90),
            max_ejected_percent: 40,
        },
        warmup: Duration::from_millis(1500),
        drain_ttl: Duration::from_secs(70),
        shutdown_delay: Duration::from_secs(6),
        drain_timeout: Duration::from_secs(31),
        log_format: LogFormat::Json,
        affinity: Some(AffinitySettings {
            key: "cookie:session".to_owned(),
            load_factor: 1.5,
            cookie_ttl: Duration::from_secs(600),
            cookie_secure: true,
            cookie_same_site: SameSite::Strict,
            trust_forwarded_for: true,
        }),
        zones: ZoneSettings {
            routing: ZoneRouting::PreferSameZone,
            zone: Some("zone-a".to_owned()),
            proxy_service: Some("web-proxy-admin".to_owned()),
        },
    }
}

/// The settings a resolved configuration carries out, the inverse of `to_args` and
/// `resolve` together.
fn settings_of(config: &Config) -> ProxySettings {
    let Source::Kubernetes { service, .. } = &config.source else {
        panic!("the operator's proxies discover through Kubernetes: {config:?}");
    };
    let percent = |ratio: f64| (ratio * 100.0).round() as u32;
    let first = &config.listeners[0];
    for other in &config.listeners {
        assert_eq!(
            (other.connect.connect_timeout, other.connect.idle_timeout),
            (first.connect.connect_timeout, first.connect.idle_timeout),
            "every listener connects alike"
        );
    }
    ProxySettings {
        listeners: config
            .listeners
            .iter()
            .map(|l| ListenerSettings {
                name: l.port_name.clone().unwrap_or_default(),
                listen: l.listen,
                protocol: l.connect.protocol,
            })
            .collect(),
        admin_listen: config.admin_listen,
        kube_service: service.clone(),
        algorithm: config.balancer.algorithm,
        connect_timeout: first.connect.connect_timeout,
        response_timeout: config.response_timeout,
        stream_idle_timeout: config.stream_idle_timeout,
        idle_timeout: first.connect.idle_timeout,
        retries: RetrySettings {
            attempts: config.retry_attempts,
            budget_percent: percent(config.retry_budget_ratio),
            min_per_second: config.retry_min_per_second,
            body_limit: config.retry_body_limit as u64,
        },
        max_in_flight: config.max_in_flight.map(|m| m as u64),
        outlier: OutlierSettings {
            consecutive_failures: config.balancer.ejection.consecutive_failures,
            base_ejection: config.balancer.ejection.base,
            max_ejection: config.balancer.ejection.max,
            max_ejected_percent: percent(config.balancer.ejection.max_ejected_ratio),
        },
        warmup: config.balancer.warmup,
        drain_ttl: config.balancer.drain_ttl,
        shutdown_delay: config.shutdown_delay,
        drain_timeout: config.drain_timeout,
        log_format: config.log_format,
        affinity: config.affinity.as_ref().map(|a| AffinitySettings {
            key: match &a.source {
                KeySource::Header(name) => format!("header:{name}"),
                KeySource::Cookie(name) => format!("cookie:{name}"),
                KeySource::ClientIp => "client-ip".to_owned(),
            },
            load_factor: a.load_factor,
            cookie_ttl: a.cookie_ttl,
            cookie_secure: a.cookie_secure,
            cookie_same_site: a.cookie_same_site,
            trust_forwarded_for: a.trust_forwarded_for,
        }),
        zones: ZoneSettings {
            routing: config.zones.routing,
            zone: config.zones.zone.clone(),
            proxy_service: config.zones.proxy_service.clone(),
        },
    }
}

fn parse_and_resolve(args: &[String]) -> Config {
    let settings = Settings::try_parse_from(
        std::iter::once("ballast-proxy".to_owned()).chain(args.iter().cloned()),
    )
    .unwrap_or_else(|e| panic!("the proxy refuses {args:?}: {e}"));
    settings
        .resolve()
        .unwrap_or_else(|e| panic!("the proxy refuses {args:?}: {e}"))
}

#[test]
fn the_proxy_parses_every_setting_the_operator_renders_to_the_same_value() {
    let settings = operator_settings();
    let config = parse_and_resolve(&settings.to_args());
    assert_eq!(settings_of(&config), settings);

    assert_eq!(config.listeners.len(), 2, "one listener per --port");

    let plain = ProxySettings {
        listeners: settings.listeners[..1].to_vec(),
        affinity: None,
        response_timeout: Some(Duration::from_secs(60)),
        stream_idle_timeout: None,
        max_in_flight: None,
        zones: ZoneSettings::default(),
        ..operator_settings()
    };
    assert_eq!(settings_of(&parse_and_resolve(&plain.to_args())), plain);
    assert!(
        !plain.to_args().iter().any(|a| a.contains("zone")),
        "zone routing off renders no zone flag: {:?}",
        plain.to_args()
    );

    // What the operator runs: the proxies' Service and the pod name from the downward
    // API (BALLAST_POD_NAME, the same setting as --pod-name), no --zone.
    let learned = ProxySettings {
        zones: ZoneSettings {
            zone: None,
            ..operator_settings().zones
        },
        ..operator_settings()
    };
    let mut args = learned.to_args();
    args.push("--pod-name=web-proxy-7d9f-x2v4q".to_owned());
    let config = parse_and_resolve(&args);
    assert_eq!(settings_of(&config), learned);
    assert_eq!(
        config.zones.pod_name.as_deref(),
        Some("web-proxy-7d9f-x2v4q")
    );
}

#[test]
fn zone_routing_refuses_what_could_never_learn_the_zone() {
    let refused = |args: &[&str]| {
        Settings::parse_from(std::iter::once("ballast-proxy").chain(args.iter().copied()))
            .resolve()
            .unwrap_err()
            .to_string()
    };
    let text = refused(&[
        "--kube-service=web-backends",
        "--zone-routing=prefer-same-zone",
    ]);
    assert!(
        text.contains("--zone-routing=prefer-same-zone needs --zone or --proxy-service"),
        "{text}"
    );
    let text = refused(&[
        "--kube-service=web-backends",
        "--zone-routing=prefer-same-zone",
        "--proxy-service=web-proxy-admin",
    ]);
    assert!(text.contains("set BALLAST_POD_NAME (--pod-name)"), "{text}");
    let text = refused(&[
        "--endpoints=127.0.0.2:80",
        "--zone-routing=prefer-same-zone",
        "--proxy-service=web-proxy-admin",
        "--pod-name=web-proxy-1",
    ]);
    assert!(
        text.contains("--proxy-service needs Kubernetes discovery (--kube-service)"),
        "{text}"
    );
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        Settings::try_parse_from(["ballast-proxy", "--zone-routing=nearest"]).is_err(),
        "an unknown mode is refused by the parser"
    );

    // --zone alone is enough (the spread is then assumed even), with any source.
    let config = parse_and_resolve(&[
        "--endpoints=127.0.0.2:80".to_owned(),
        "--zone-routing=prefer-same-zone".to_owned(),
        "--zone=zone-b".to_owned(),
    ]);
    assert_eq!(config.zones.routing, ZoneRouting::PreferSameZone);
    assert_eq!(config.zones.zone.as_deref(), Some("zone-b"));
    // Off by default.
    let config = parse_and_resolve(&["--endpoints=127.0.0.2:80".to_owned()]);
    assert_eq!(config.zones, ZoneConfig::default());

    // The file takes the flags' long names as keys, as for every setting.
    let dir = std::env::temp_dir().join(format!("ballast-zone-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("proxy.yaml");
    std::fs::write(
        &file,
        "kube-service: web-backends\nzone-routing: prefer-same-zone\nproxy-service: web-proxy-admin\npod-name: web-proxy-1\n",
    )
    .unwrap();
    let config = Settings::parse_from(["ballast-proxy", "--config", file.to_str().unwrap()])
        .with_file()
        .unwrap()
        .resolve()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        config.zones,
        ZoneConfig {
            routing: ZoneRouting::PreferSameZone,
            zone: None,
            proxy_service: Some("web-proxy-admin".to_owned()),
            pod_name: Some("web-proxy-1".to_owned()),
        }
    );
}

#[test]
fn one_listener_from_the_local_flags_or_one_per_port() {
    let config = parse_and_resolve(&[
        "--listen=127.0.0.1:8080".to_owned(),
        "--endpoints=127.0.0.2:80".to_owned(),
        "--backend-protocol=h2c".to_owned(),
    ]);
    assert_eq!(
        config.listeners,
        [Listener {
            port_name: None,
            listen: "127.0.0.1:8080".parse().unwrap(),
            connect: ConnectConfig {
                protocol: BackendProtocol::H2c,
                connect_timeout: Duration::from_secs(1),
                idle_timeout: Duration::from_secs(30),
            },
        }]
    );

    let refused = |args: &[&str]| {
        Settings::parse_from(std::iter::once("ballast-proxy").chain(args.iter().copied()))
            .resolve()
            .unwrap_err()
            .to_string()
    };
    let text = refused(&[
        "--kube-service=web",
        "--port=http=127.0.0.1:8080",
        "--port=http=127.0.0.1:8081",
        "--port=grpc=127.0.0.1:8080,protocol=h2c",
        "--port=admin=127.0.0.1:9901",
        "--admin-listen=127.0.0.1:9901",
        "--listen=127.0.0.1:7000",
    ]);
    assert!(text.contains("the port \"http\" is given twice"), "{text}");
    assert!(
        text.contains("127.0.0.1:8080 is listened on twice"),
        "{text}"
    );
    assert!(text.contains("--admin-listen must differ"), "{text}");
    assert!(
        text.contains("--listen describes the one listener"),
        "{text}"
    );
    assert_eq!(text.lines().count(), 4, "{text}");

    let text = refused(&[
        "--endpoints=127.0.0.2:80",
        "--port=http=127.0.0.1:8080",
        "--port=grpc=127.0.0.1:8081,protocol=h2c",
    ]);
    assert!(
        text.contains("several --port listeners need --kube-service"),
        "{text}"
    );
}
