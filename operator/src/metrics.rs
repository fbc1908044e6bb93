//! Operator metrics (Prometheus text on the admin port).

use ballast_api::BalancedService;
use kube::runtime::reflector::Store;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

pub use services::{ExportedServices, GAUGES, Sample, samples};

mod services;

/// Reconcile counts, errors and durations.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    failures: Family<[(&'static str, &'static str); 1], Counter>,
    duration: Histogram,
    services: Gauge,
    objects: Gauge,
    api_requests: Family<[(&'static str, &'static str); 2], Counter>,
    /// The controller's cache of BalancedServices while this replica leads.
    watched: services::Watched,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ballast_operator");
        let reconciles = Counter::default();
        let failures = Family::default();
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by the step that failed",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile took",
            duration.clone(),
        );
        let services = Gauge::default();
        let objects = Gauge::default();
        registry.register(
            "balanced_services",
            "BalancedServices watched",
            services.clone(),
        );
        registry.register(
            "managed_objects",
            "Objects owned for them (Deployments, Services, PDBs, RBAC)",
            objects.clone(),
        );
        let api_requests = Family::default();
        registry.register(
            "api_requests",
            "Requests sent to the Kubernetes API server, by verb and resource",
            api_requests.clone(),
        );
        let watched = Arc::new(Mutex::new(None));
        registry.register_collector(Box::new(services::ServiceCollector(watched.clone())));
        Self {
            registry,
            watched,
            api_requests,
            reconciles,
            failures,
            duration,
            services,
            objects,
        }
    }
}

impl Metrics {
    /// Records one reconcile; `error` is the failing step's fixed label.
    pub fn observe_reconcile(&self, took: Duration, error: Option<&'static str>) {
        self.reconciles.inc();
        self.duration.observe(took.as_secs_f64());
        if let Some(step) = error {
            self.failures.get_or_create(&[("step", step)]).inc();
        }
    }

    /// Records how many BalancedServices are watched, each owning `per_service` objects.
    pub fn set_managed(&self, services: usize, per_service: usize) {
        self.services
            .set(i64::try_from(services).unwrap_or(i64::MAX));
        self.objects
            .set(i64::try_from(services * per_service).unwrap_or(i64::MAX));
    }

    /// Counts one request sent to the API server.
    pub fn observe_api_request(&self, request: crate::api_requests::ApiRequest) {
        self.api_requests
            .get_or_create(&[("verb", request.verb), ("resource", request.resource)])
            .inc();
    }

    /// Exports the per-BalancedService gauges ([`GAUGES`]) from `store`, the
    /// controller's cache, until the returned guard is dropped.
    pub fn export_services(&self, store: Store<BalancedService>) -> ExportedServices {
        *self.watched.lock().unwrap_or_else(PoisonError::into_inner) = Some(store);
        ExportedServices {
            watched: self.watched.clone(),
            services: self.services.clone(),
            objects: self.objects.clone(),
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests;
