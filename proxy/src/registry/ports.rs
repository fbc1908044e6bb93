//! Every listener's registry together: what the admin API and the metrics read. A pod
//! serving several ports is one endpoint per port, each in its listener's registry; the
//! drain gate asks about the pod, so a drain marks it on every port and its counts are
//! summed over them.

use super::Registry;
use ballast_api::admin::{DrainRecord, DrainReport, EndpointReport, EndpointStatus};
use std::net::IpAddr;
use std::sync::Arc;
use tokio::time::Instant;

/// One listener's backend port and the registry of its endpoints.
#[derive(Clone, Debug)]
pub struct Port {
    /// The EndpointSlice port name, when the listener names one.
    pub name: Option<String>,
    /// Its endpoints.
    pub registry: Arc<Registry>,
}

/// The registries of every listener, in the listeners' order.
#[derive(Clone, Debug)]
pub struct Ports(Arc<[Port]>);

impl Ports {
    /// The ports of the listeners, in their order.
    pub fn new(ports: Vec<Port>) -> Self {
        Self(ports.into())
    }

    /// Each port.
    pub fn iter(&self) -> impl Iterator<Item = &Port> {
        self.0.iter()
    }

    /// Every endpoint on every port, for `/endpoints`: by port, then by address.
    pub fn reports(&self, now: Instant) -> Vec<EndpointReport> {
        let mut reports = Vec::new();
        for port in self.iter() {
            reports.extend(port.registry.reports(now).into_iter().map(|mut r| {
                r.port.clone_from(&port.name);
                r
            }));
        }
        reports
    }

    /// The finished drains of every port, oldest first.
    pub fn drains(&self) -> Vec<DrainRecord> {
        let mut drains = Vec::new();
        for port in self.iter() {
            drains.extend(port.registry.drains().into_iter().map(|mut d| {
                d.port.clone_from(&port.name);
                d
            }));
        }
        drains.sort_by(|a, b| a.since.total_cmp(&b.since));
        drains
    }

    /// Marks the pod with IP `ip` draining on every port; `None` when no port knows it.
    pub fn request_drain(&self, ip: IpAddr, now: Instant) -> Option<DrainReport> {
        let mut known = false;
        for port in self.iter() {
            known |= port.registry.request_drain(ip, now).is_some();
        }
        known.then(|| self.drain_report(ip, now))
    }

    /// Records that the pod's drain helper gave up, on every port; `None` when no port
    /// knows the pod.
    pub fn drain_timed_out(&self, ip: IpAddr, now: Instant) -> Option<DrainReport> {
        let mut known = false;
        for port in self.iter() {
            known |= port.registry.drain_timed_out(ip, now).is_some();
        }
        known.then(|| self.drain_report(ip, now))
    }

    /// In-flight requests and open connections of the pod with IP `ip`, summed over
    /// every port: it is drained when nothing is open on any of them.
    pub fn drain_report(&self, ip: IpAddr, now: Instant) -> DrainReport {
        let mut total = DrainReport::default();
        for port in self.iter() {
            let report = port.registry.drain_report(ip, now);
            if !report.known {
                continue;
            }
            total.known = true;
            total.in_flight += report.in_flight;
            total.connections += report.connections;
            total.state = match (total.state, report.state) {
                (Some(EndpointStatus::Draining), _) => Some(EndpointStatus::Draining),
                (None, state) | (_, state @ Some(EndpointStatus::Draining)) => state,
                (state, _) => state,
            };
            total.draining_since = match (total.draining_since, report.draining_since) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        total
    }

    /// Requests in flight on every port, summed.
    pub fn in_flight(&self, now: Instant) -> u64 {
        self.reports(now).iter().map(|r| r.in_flight).sum()
    }
}
