//! Prometheus metrics. Per-endpoint numbers are read from the registry's atomics at
//! scrape time (no label lookups on the request path); the rest are plain counters.

use crate::registry::{Ports, ZoneState};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

/// Proxy-wide metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: prometheus_client::registry::Registry,
    /// Time from receiving a request to its response head, all endpoints.
    pub response_seconds: Histogram,
    /// Retries sent.
    pub retries: Counter,
    /// Failed attempts that qualified for a retry but were not retried, by reason.
    pub retries_skipped: Family<[(&'static str, &'static str); 1], Counter>,
    /// Requests whose body outgrew the copy kept for retries.
    pub retry_body_overflow: Counter,
    /// Streams cut by a time limit, by limit.
    pub stream_timeouts: Family<[(&'static str, &'static str); 1], Counter>,
    /// Requests answered 503 because no endpoint was available.
    pub no_endpoint: Counter,
    /// Requests refused before forwarding, by reason.
    pub rejected: Family<[(&'static str, &'static str); 1], Counter>,
    /// `POST /drain` calls accepted.
    pub drain_requests: Counter,
    /// Upgraded connections (WebSocket) tunnelled.
    pub upgrades: Counter,
    /// Access-log records dropped because the writer fell behind.
    pub access_log_dropped: Counter,
    /// Affinity keys sent away from their own endpoint because it was draining,
    /// ejected or not ready.
    pub affinity_moved: Counter,
}

#[derive(Debug)]
struct EndpointCollector(Ports);

/// This proxy's zone and the proxies' spread, read at scrape time.
#[derive(Debug)]
struct ZoneCollector(Arc<ZoneState>);

/// A per-endpoint metric: name, help, and how to read it.
type Reading = (
    &'static str,
    &'static str,
    fn(&crate::registry::EndpointState) -> u64,
);

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl Metrics {
    /// Metrics with the per-endpoint collector reading every port's endpoints, and
    /// with zone routing's when `zones` is given.
    pub fn new(endpoints: Ports, zones: Option<Arc<ZoneState>>) -> Self {
        let mut registry = prometheus_client::registry::Registry::with_prefix("ballast");
        let response_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let retries = Counter::default();
        let no_endpoint = Counter::default();
        let rejected = Family::default();
        let drain_requests = Counter::default();
        let upgrades = Counter::default();
        registry.register(
            "response_head_seconds",
            "Time from request to response head",
            response_seconds.clone(),
        );
        registry.register(
            "retries",
            "Requests sent again to another endpoint",
            retries.clone(),
        );
        registry.register(
            "no_endpoint",
            "Requests answered 503 because no endpoint was available",
            no_endpoint.clone(),
        );
        registry.register(
            "rejected_requests",
            "Malformed requests answered 4xx and never forwarded",
            rejected.clone(),
        );
        registry.register(
            "drain_requests",
            "POST /drain calls from pods",
            drain_requests.clone(),
        );
        registry.register(
            "upgrades",
            "Upgraded connections (WebSocket) tunnelled",
            upgrades.clone(),
        );
        let retries_skipped = Family::default();
        registry.register(
            "retries_skipped",
            "Failed attempts safe to retry that were not retried: body-over-limit, attempts or budget",
            retries_skipped.clone(),
        );
        let retry_body_overflow = Counter::default();
        registry.register(
            "retry_body_overflow",
            "Requests whose body outgrew the copy kept for retries (no retry possible after that)",
            retry_body_overflow.clone(),
        );
        let stream_timeouts = Family::default();
        registry.register(
            "stream_timeouts",
            "Requests and streams cut by a time limit: response-head, idle or deadline (grpc-timeout)",
            stream_timeouts.clone(),
        );
        let access_log_dropped = Counter::default();
        registry.register(
            "access_log_dropped",
            "Access-log records dropped because the writer fell behind",
            access_log_dropped.clone(),
        );
        let affinity_moved = Counter::default();
        registry.register(
            "affinity_moved",
            "Affinity keys sent away from their endpoint because it was draining, ejected or not ready",
            affinity_moved.clone(),
        );
        registry.register_collector(Box::new(EndpointCollector(endpoints)));
        if let Some(zones) = zones {
            registry.register(
                "zone_requests",
                "Requests routed with zone routing on, by locality (same or cross zone) and the endpoint's zone",
                zones.requests.clone(),
            );
            registry.register_collector(Box::new(ZoneCollector(zones)));
        }
        Self {
            registry,
            response_seconds,
            retries,
            retries_skipped,
            retry_body_overflow,
            stream_timeouts,
            no_endpoint,
            rejected,
            drain_requests,
            upgrades,
            access_log_dropped,
            affinity_moved,
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        out
    }
}

impl Collector for EndpointCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let now = tokio::time::Instant::now();
        // Read at scrape time, so the `port` label costs the request path nothing.
        let mut states = Vec::new();
        for port in self.0.iter() {
            let name = port.name.as_deref();
            states.extend(
                port.registry
                    .reports(now)
                    .iter()
                    .filter_map(|r| port.registry.get(r.address))
                    .map(|state| (name, state)),
            );
        }
        // A listener without a port name (a local run) keeps the series unlabelled.
        let labels = |(port, s): &(Option<&str>, Arc<crate::registry::EndpointState>)| {
            let mut labels = vec![
                ("endpoint", s.address.to_string()),
                ("pod", s.pod().unwrap_or_default()),
            ];
            if let Some(port) = port {
                labels.push(("port", (*port).to_owned()));
            }
            labels
        };
        {
            let mut family = encoder.encode_descriptor(
                "endpoint_responses",
                "Responses from each endpoint by status class",
                None,
                MetricType::Counter,
            )?;
            for s in &states {
                for (i, class) in CLASSES.iter().enumerate() {
                    let mut l = labels(s);
                    l.push(("class", (*class).to_owned()));
                    ConstCounter::new(s.1.responses[i].load(Relaxed))
                        .encode(family.encode_family(&l)?)?;
                }
            }
        }
        let counters: [Reading; 4] = [
            (
                "endpoint_failures",
                "Requests to the endpoint that got no response (connect error, reset, timeout)",
                |s| s.failures.load(Relaxed),
            ),
            (
                "endpoint_connections_opened",
                "Connections opened to the endpoint",
                |s| s.connections_opened.load(Relaxed),
            ),
            ("endpoint_requests", "Requests sent to the endpoint", |s| {
                s.requests.load(Relaxed)
            }),
            (
                "endpoint_ejections",
                "Times the endpoint was ejected as an outlier",
                |s| s.ejections.load(Relaxed),
            ),
        ];
        for (name, help, read) in counters {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for s in &states {
                ConstCounter::new(read(&s.1)).encode(family.encode_family(&labels(s))?)?;
            }
        }
        let gauges: [Reading; 3] = [
            (
                "endpoint_in_flight",
                "Requests in flight to the endpoint",
                |s| s.in_flight.load(Relaxed),
            ),
            (
                "endpoint_connections",
                "Connections open to the endpoint",
                |s| s.connections.load(Relaxed),
            ),
            ("endpoint_draining", "1 while the endpoint drains", |s| {
                u64::from(s.is_draining())
            }),
        ];
        for (name, help, read) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for s in &states {
                let value = i64::try_from(read(&s.1)).unwrap_or(i64::MAX);
                ConstGauge::new(value).encode(family.encode_family(&labels(s))?)?;
            }
        }
        Ok(())
    }
}

impl Collector for ZoneCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let locality = self.0.locality.load_full();
        {
            let mut family = encoder.encode_descriptor(
                "zone_info",
                "1 for this proxy's zone once known (zone routing routes as if off until then)",
                None,
                MetricType::Gauge,
            )?;
            if let Some(locality) = &locality {
                ConstGauge::new(1).encode(family.encode_family(&[("zone", &*locality.zone)])?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "zone_proxies",
            "Proxy pods per zone, from the proxies' Service (absent when unknown)",
            None,
            MetricType::Gauge,
        )?;
        for (zone, n) in locality.iter().flat_map(|l| l.proxies.iter().flatten()) {
            ConstGauge::new(i64::from(*n)).encode(family.encode_family(&[("zone", &**zone)])?)?;
        }
        Ok(())
    }
}
