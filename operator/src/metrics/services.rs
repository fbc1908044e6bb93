//! Per-BalancedService gauges, read at scrape time from the controller's cache of
//! BalancedServices, i.e. from the status the reconciles wrote. A deleted
//! BalancedService leaves the cache and so leaves no series; only a leader has a
//! controller filling a cache, so a standby (or a replica that lost the lease) exports
//! none.

use ballast_api::BalancedService;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use std::sync::{Arc, Mutex, PoisonError};

use crate::rollout::DEFAULT_MIN_REQUESTS;

/// Name (after `ballast_operator_`) and help of each gauge, in exposition order. Every
/// series carries `namespace` and `name` (the BalancedService's); the label in the help's
/// parentheses comes on top where there is one.
pub const GAUGES: [(&str, &str); 11] = [
    (
        "condition",
        "BalancedService status conditions by condition (Available, Progressing, Degraded, Adopted): 1 when True, 0 otherwise",
    ),
    (
        "proxy_replicas",
        "Proxy pods desired (status.proxy.replicas)",
    ),
    (
        "proxy_ready_replicas",
        "Proxy pods ready (status.proxy.readyReplicas)",
    ),
    (
        "balance_max_over_mean",
        "Busiest app pod's request rate over the mean, steady pods only (status.balance.maxOverMean; 1 is perfect)",
    ),
    (
        "draining_pods",
        "App pods being drained now (status.draining)",
    ),
    (
        "oldest_drain_seconds",
        "Age of the oldest drain in progress (0 when none)",
    ),
    (
        "rollout_in_progress",
        "1 while the last rollout has not finished (a paused one included), 0 once it has",
    ),
    (
        "rollout_requests",
        "Requests the proxies sent during the last rollout, by revision (old, new)",
    ),
    (
        "rollout_failed_requests",
        "Requests that failed (5xx or connection failure) during the last rollout, by revision (old, new)",
    ),
    (
        "rollout_forced_drains",
        "Drains of the last rollout that reached drainTimeoutSeconds with requests or connections open",
    ),
    (
        "rollout_pause_threshold",
        "spec.rollout.pauseWhen thresholds that are set, by threshold (error_ratio, min_requests: the requests judged before it, forced_drains)",
    ),
];

/// One gauge sample of one BalancedService.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// One of [`GAUGES`]' names.
    pub metric: &'static str,
    /// The label on top of `namespace` and `name`, if the gauge has one.
    pub label: Option<(&'static str, String)>,
    /// The value.
    pub value: f64,
}

/// Keeps the per-BalancedService gauges exported until dropped, when they go (and the
/// watched-services gauges fall to 0): dropped with the controller at the end of a term
/// as leader.
#[must_use = "the gauges are exported only while this lives"]
#[derive(Debug)]
pub struct ExportedServices {
    pub(super) watched: Watched,
    pub(super) services: Gauge,
    pub(super) objects: Gauge,
}

/// The cache being exported, shared by the collector and [`ExportedServices`].
pub(super) type Watched = Arc<Mutex<Option<Store<BalancedService>>>>;

/// Encodes [`GAUGES`] from the watched cache.
pub(super) struct ServiceCollector(pub(super) Watched);

/// What `bs`'s spec and status say, as gauge samples, at `now`.
pub fn samples(bs: &BalancedService, now: Timestamp) -> Vec<Sample> {
    let mut out = Vec::new();
    let mut push = |metric, label: Option<(&'static str, &str)>, value| {
        out.push(Sample {
            metric,
            label: label.map(|(k, v)| (k, v.to_owned())),
            value,
        });
    };
    let threshold = |which| Some(("threshold", which));
    let pause_when = &bs.spec.rollout.pause_when;
    if let Some(ratio) = pause_when.error_ratio {
        push("rollout_pause_threshold", threshold("error_ratio"), ratio);
        let min = pause_when
            .min_requests
            .map_or(DEFAULT_MIN_REQUESTS as f64, f64::from);
        push("rollout_pause_threshold", threshold("min_requests"), min);
    }
    if let Some(forced) = pause_when.forced_drains {
        let value = f64::from(forced);
        push("rollout_pause_threshold", threshold("forced_drains"), value);
    }
    let Some(status) = &bs.status else {
        return out;
    };
    for c in &status.conditions {
        let value = if c.status == "True" { 1.0 } else { 0.0 };
        push("condition", Some(("condition", &c.type_)), value);
    }
    if let Some(proxy) = &status.proxy {
        push("proxy_replicas", None, f64::from(proxy.replicas));
        push(
            "proxy_ready_replicas",
            None,
            f64::from(proxy.ready_replicas),
        );
    }
    if let Some(ratio) = status
        .balance
        .as_ref()
        .and_then(|b| b.max_over_mean.parse::<f64>().ok())
    {
        push("balance_max_over_mean", None, ratio);
    }
    push("draining_pods", None, status.draining.len() as f64);
    let oldest = status
        .draining
        .iter()
        .map(|d| (now.as_millisecond() - d.since.0.as_millisecond()) as f64 / 1000.0)
        .fold(0.0, f64::max);
    push("oldest_drain_seconds", None, oldest);
    if let Some(rollout) = &status.last_rollout {
        let running = if rollout.finished_at.is_none() {
            1.0
        } else {
            0.0
        };
        push("rollout_in_progress", None, running);
        let (sent, failed) = (&rollout.requests, &rollout.failed_requests);
        for (revision, sent, failed) in [
            ("old", sent.old_revision, failed.old_revision),
            ("new", sent.new_revision, failed.new_revision),
        ] {
            let label = Some(("revision", revision));
            push("rollout_requests", label, sent as f64);
            push("rollout_failed_requests", label, failed as f64);
        }
        let forced = f64::from(rollout.forced_terminations);
        push("rollout_forced_drains", None, forced);
    }
    out
}

impl Drop for ExportedServices {
    fn drop(&mut self) {
        *self.watched.lock().unwrap_or_else(PoisonError::into_inner) = None;
        self.services.set(0);
        self.objects.set(0);
    }
}

impl std::fmt::Debug for ServiceCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the cache: its Debug would print every BalancedService.
        f.debug_struct("ServiceCollector").finish_non_exhaustive()
    }
}

impl Collector for ServiceCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let services = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(Store::state)
            .unwrap_or_default();
        let now = Timestamp::now();
        let all: Vec<(String, String, Vec<Sample>)> = services
            .iter()
            .map(|bs| {
                (
                    bs.namespace().unwrap_or_default(),
                    bs.name_any(),
                    samples(bs, now),
                )
            })
            .collect();
        // Descriptors even with no series (a standby): the names are always known.
        for (metric, help) in GAUGES {
            let mut family = encoder.encode_descriptor(metric, help, None, MetricType::Gauge)?;
            for (namespace, name, samples) in &all {
                for sample in samples.iter().filter(|s| s.metric == metric) {
                    let mut labels = vec![("namespace", namespace.clone()), ("name", name.clone())];
                    labels.extend(sample.label.clone());
                    ConstGauge::new(sample.value).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}
