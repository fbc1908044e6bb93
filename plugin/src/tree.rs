//! The live tree of one BalancedService: a pure function of one [`Snapshot`] (and the
//! one before it, for the share of recent requests). Rendering is in [`crate::render`].

use ballast_api::admin::{EndpointReport, EndpointStatus, OpenCounts};
use ballast_api::meta::{ROUTABLE_CONDITION, labels};
use ballast_api::status::{BalancedServiceStatus, RolloutSummary};
use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::snapshot::{ProxyReading, Snapshot};

/// Events shown under the tree.
pub const EVENTS_SHOWN: usize = 6;

/// The whole view.
#[derive(Clone, Debug, PartialEq)]
pub struct Tree {
    /// When the snapshot was read.
    pub at: Timestamp,
    /// `namespace/name`.
    pub name: String,
    /// The status phase (`Pending` before the operator wrote one).
    pub phase: String,
    /// The operator has not yet acted on the latest spec.
    pub stale: bool,
    /// The conditions, in the status's order.
    pub conditions: Vec<ConditionLine>,
    /// Revision most pods run.
    pub current_revision: Option<String>,
    /// Revision being rolled out.
    pub update_revision: Option<String>,
    /// `maxOverMean` with its window, when measured.
    pub balance: Option<String>,
    /// Each revision with its pods, the one rolled out first.
    pub revisions: Vec<RevisionNode>,
    /// The proxy pods.
    pub proxies: Vec<ProxyNode>,
    /// The last rollout.
    pub rollout: Option<RolloutSummary>,
    /// The most recent Events, newest last.
    pub events: Vec<EventLine>,
}

/// One status condition.
#[derive(Clone, Debug, PartialEq)]
pub struct ConditionLine {
    /// `Available`, `Progressing`, `Degraded`.
    pub type_: String,
    /// `True`, `False`, `Unknown`.
    pub status: String,
    /// Its reason.
    pub reason: String,
    /// Its message.
    pub message: String,
}

/// What a revision is to the rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RevisionRole {
    /// Being rolled out (`updateRevision`).
    New,
    /// What most pods run while the new one rolls out (`currentRevision`).
    Stable,
    /// Any other.
    Old,
}

/// A revision and its pods.
#[derive(Clone, Debug, PartialEq)]
pub struct RevisionNode {
    /// The revision (ballast's label, or the pod-template hash of an adopted Deployment).
    pub revision: String,
    /// Its role.
    pub role: RevisionRole,
    /// Its ReplicaSet, when one is around.
    pub replica_set: Option<String>,
    /// Pods its ReplicaSet wants.
    pub desired: i32,
    /// Its pods, by name.
    pub pods: Vec<PodNode>,
}

/// An app pod.
#[derive(Clone, Debug, PartialEq)]
pub struct PodNode {
    /// Pod name.
    pub name: String,
    /// Pod IP, once it has one.
    pub ip: Option<IpAddr>,
    /// What it is doing.
    pub state: PodState,
    /// Its share of the requests the proxies sent since the previous snapshot, when there
    /// is one and requests were sent.
    pub share: Option<f64>,
    /// When it was created.
    pub created: Option<Timestamp>,
    /// Container restarts.
    pub restarts: i32,
}

/// What an app pod is doing, as the drain gate sees it.
#[derive(Clone, Debug, PartialEq)]
pub enum PodState {
    /// Scheduled or starting: no IP, or its containers are not ready yet.
    Starting,
    /// Its containers are ready; the readiness gate waits for these proxies to list it
    /// (empty: waiting for the operator to open the gate).
    WaitingForGate {
        /// Ready proxies that do not list it yet.
        proxies: Vec<String>,
        /// The gate's own message, when the proxies could not be read.
        message: Option<String>,
    },
    /// Ready and routable.
    Ready,
    /// Was ready; its readiness fails now.
    NotReady,
    /// Being deleted, with requests or connections open on the proxies.
    Draining {
        /// Requests in flight, summed over the proxies.
        in_flight: u64,
        /// Connections open, summed over the proxies.
        connections: u64,
        /// When the first proxy marked it draining.
        since: Option<Timestamp>,
        /// Its drain helper gave up at the timeout with this still open.
        forced: Option<OpenCounts>,
    },
    /// Being deleted with nothing open: waiting for its containers to exit.
    Drained {
        /// Milliseconds the drain took, as the proxies measured it.
        after_ms: Option<u64>,
        /// Its drain helper gave up at the timeout with this still open.
        forced: Option<OpenCounts>,
    },
    /// Its containers have exited (`Succeeded` or `Failed`).
    Stopped {
        /// The pod phase.
        phase: String,
    },
}

/// A proxy pod.
#[derive(Clone, Debug, PartialEq)]
pub struct ProxyNode {
    /// Pod name.
    pub name: String,
    /// Its `Ready` condition.
    pub ready: bool,
    /// Being deleted.
    pub terminating: bool,
    /// Endpoints it lists and how many drain, or why its admin port could not be read.
    pub report: Result<ProxyCounts, String>,
}

/// What one proxy reports, counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyCounts {
    /// Endpoints discovery lists.
    pub listed: usize,
    /// Endpoints draining.
    pub draining: usize,
    /// Requests in flight over all endpoints.
    pub in_flight: u64,
}

/// One Event.
#[derive(Clone, Debug, PartialEq)]
pub struct EventLine {
    /// When it last happened.
    pub at: Option<Timestamp>,
    /// `Normal` or `Warning`.
    pub type_: String,
    /// Its reason.
    pub reason: String,
    /// Its message.
    pub message: String,
    /// How many times it happened.
    pub count: i32,
}

impl Tree {
    /// The tree of `now`; `before` is the previous snapshot of the same BalancedService,
    /// for the share of requests between the two.
    pub fn build(now: &Snapshot, before: Option<&Snapshot>) -> Self {
        let status = now.service.status.clone().unwrap_or_default();
        let meta = &now.service.metadata;
        let share = before.map(|b| shares(&now.proxies, &b.proxies));
        let pods: Vec<PodNode> = now
            .pods
            .iter()
            .map(|pod| pod_node(pod, &now.proxies, &status, share.as_ref()))
            .collect();
        Self {
            at: now.at,
            name: format!(
                "{}/{}",
                meta.namespace.as_deref().unwrap_or_default(),
                meta.name.as_deref().unwrap_or_default()
            ),
            phase: status.phase.clone().unwrap_or_else(|| "Pending".to_owned()),
            stale: status.observed_generation < meta.generation,
            conditions: status
                .conditions
                .iter()
                .map(|c| ConditionLine {
                    type_: c.type_.clone(),
                    status: c.status.clone(),
                    reason: c.reason.clone(),
                    message: c.message.clone(),
                })
                .collect(),
            current_revision: status.current_revision.clone(),
            update_revision: status.update_revision.clone(),
            balance: status.balance.as_ref().map(|b| {
                format!(
                    "{} over {}s ({} pods)",
                    b.max_over_mean, b.window_seconds, b.pods
                )
            }),
            revisions: revisions(now, &status, pods),
            proxies: now.proxies.iter().map(proxy_node).collect(),
            rollout: status.last_rollout.clone(),
            events: events(&now.events),
        }
    }

    /// Pods in any revision.
    pub fn pods(&self) -> impl Iterator<Item = &PodNode> {
        self.revisions.iter().flat_map(|r| &r.pods)
    }

    /// The tree without what changes with the clock alone (the read time, request
    /// shares): two trees with the same key show the same state.
    pub fn state_key(&self) -> Self {
        let mut key = self.clone();
        key.at = Timestamp::UNIX_EPOCH;
        for pod in key.revisions.iter_mut().flat_map(|r| &mut r.pods) {
            pod.share = None;
        }
        key
    }
}

/// The revision of a pod or ReplicaSet.
pub fn revision_of(meta: &ObjectMeta) -> Option<&String> {
    let labels = meta.labels.as_ref()?;
    labels
        .get(labels::REVISION)
        .or_else(|| labels.get(labels::POD_TEMPLATE_HASH))
}

fn revisions(
    now: &Snapshot,
    status: &BalancedServiceStatus,
    pods: Vec<PodNode>,
) -> Vec<RevisionNode> {
    let role = |revision: &str| {
        if status.update_revision.as_deref() == Some(revision) {
            RevisionRole::New
        } else if status.current_revision.as_deref() == Some(revision) {
            RevisionRole::Stable
        } else {
            RevisionRole::Old
        }
    };
    let mut nodes: BTreeMap<String, RevisionNode> = BTreeMap::new();
    fn node<'a>(
        nodes: &'a mut BTreeMap<String, RevisionNode>,
        revision: &str,
        role: RevisionRole,
    ) -> &'a mut RevisionNode {
        nodes
            .entry(revision.to_owned())
            .or_insert_with(|| RevisionNode {
                revision: revision.to_owned(),
                role,
                replica_set: None,
                desired: 0,
                pods: Vec::new(),
            })
    }
    for (pod, raw) in pods.into_iter().zip(&now.pods) {
        let revision = revision_of(&raw.metadata).map_or("unknown", String::as_str);
        node(&mut nodes, revision, role(revision)).pods.push(pod);
    }
    for rs in &now.replica_sets {
        let Some(revision) = revision_of(&rs.metadata) else {
            continue;
        };
        let desired = rs
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or_default();
        // An old ReplicaSet scaled to 0 without pods is history, not part of the view.
        let has_pods = now
            .pods
            .iter()
            .any(|p| revision_of(&p.metadata) == Some(revision));
        if desired == 0 && !has_pods && role(revision) == RevisionRole::Old {
            continue;
        }
        let n = node(&mut nodes, revision, role(revision));
        n.replica_set = rs.metadata.name.clone();
        n.desired = desired;
    }
    let mut list: Vec<RevisionNode> = nodes.into_values().collect();
    for n in &mut list {
        n.pods.sort_by(|a, b| a.name.cmp(&b.name));
    }
    list.sort_by(|a, b| {
        a.role
            .cmp(&b.role)
            .then_with(|| a.revision.cmp(&b.revision))
    });
    list
}

fn pod_node(
    pod: &Pod,
    proxies: &[ProxyReading],
    status: &BalancedServiceStatus,
    shares: Option<&BTreeMap<IpAddr, f64>>,
) -> PodNode {
    let ip: Option<IpAddr> = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse().ok());
    let restarts = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map_or(0, |c| c.iter().map(|c| c.restart_count).sum());
    PodNode {
        name: pod.metadata.name.clone().unwrap_or_default(),
        ip,
        state: pod_state(pod, ip, proxies, status),
        share: ip.and_then(|ip| shares.map(|s| s.get(&ip).copied().unwrap_or(0.0))),
        created: pod.metadata.creation_timestamp.as_ref().map(|t| t.0),
        restarts,
    }
}

fn condition<'a>(pod: &'a Pod, type_: &str) -> Option<&'a str> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.as_str())
}

/// The rows every proxy reports for `ip` (one per port), from the proxies that could be
/// read.
fn rows(proxies: &[ProxyReading], ip: IpAddr) -> Vec<&EndpointReport> {
    proxies
        .iter()
        .filter_map(|p| p.endpoints.as_ref().ok())
        .flatten()
        .filter(|e| e.address.ip() == ip)
        .collect()
}

fn pod_state(
    pod: &Pod,
    ip: Option<IpAddr>,
    proxies: &[ProxyReading],
    status: &BalancedServiceStatus,
) -> PodState {
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default();
    if phase == "Succeeded" || phase == "Failed" {
        return PodState::Stopped { phase };
    }
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    if pod.metadata.deletion_timestamp.is_some() {
        return draining_state(name, ip, proxies, status);
    }
    let Some(ip) = ip else {
        return PodState::Starting;
    };
    if condition(pod, "Ready") == Some("True") {
        return PodState::Ready;
    }
    if condition(pod, "ContainersReady") != Some("True") {
        let was_routable = condition(pod, ROUTABLE_CONDITION) == Some("True");
        return if was_routable {
            PodState::NotReady
        } else {
            PodState::Starting
        };
    }
    // Containers ready, pod not Ready: the readiness gate holds it.
    let readable: Vec<(&ProxyReading, &Vec<EndpointReport>)> = proxies
        .iter()
        .filter(|p| condition(&p.pod, "Ready") == Some("True"))
        .filter_map(|p| p.endpoints.as_ref().ok().map(|e| (p, e)))
        .collect();
    let message = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == ROUTABLE_CONDITION))
        .and_then(|c| c.message.clone());
    if readable.is_empty() {
        return PodState::WaitingForGate {
            proxies: Vec::new(),
            message,
        };
    }
    let missing = readable
        .iter()
        .filter(|(_, endpoints)| !endpoints.iter().any(|e| e.listed && e.address.ip() == ip))
        .map(|(p, _)| p.pod.metadata.name.clone().unwrap_or_default())
        .collect();
    PodState::WaitingForGate {
        proxies: missing,
        message: None,
    }
}

/// A pod being deleted: what the proxies report for it, summed; else what the operator
/// last wrote in `status.draining`.
fn draining_state(
    name: &str,
    ip: Option<IpAddr>,
    proxies: &[ProxyReading],
    status: &BalancedServiceStatus,
) -> PodState {
    let rows = ip.map(|ip| rows(proxies, ip)).unwrap_or_default();
    let forced = rows
        .iter()
        .filter_map(|r| r.forced)
        .reduce(|a, b| OpenCounts {
            in_flight: a.in_flight + b.in_flight,
            connections: a.connections + b.connections,
        });
    if !rows.is_empty() {
        let in_flight = rows.iter().map(|r| r.in_flight).sum();
        let connections = rows.iter().map(|r| r.connections).sum();
        if in_flight == 0 && connections == 0 {
            return PodState::Drained {
                after_ms: rows.iter().filter_map(|r| r.drained_after_ms).max(),
                forced,
            };
        }
        let since = rows
            .iter()
            .filter(|r| r.state == EndpointStatus::Draining)
            .filter_map(|r| r.draining_since)
            .reduce(f64::min)
            .and_then(|s| Timestamp::from_millisecond((s * 1000.0) as i64).ok());
        return PodState::Draining {
            in_flight,
            connections,
            since,
            forced,
        };
    }
    match status.draining.iter().find(|d| d.pod == name) {
        Some(d) => PodState::Draining {
            in_flight: u64::try_from(d.in_flight).unwrap_or_default(),
            connections: u64::try_from(d.connections).unwrap_or_default(),
            since: Some(d.since.0),
            forced: None,
        },
        // No proxy lists it any more and the operator saw nothing open.
        None => PodState::Drained {
            after_ms: None,
            forced: None,
        },
    }
}

/// Each pod IP's share of the requests the proxies sent between two readings, summed
/// over ports and proxies. A proxy read only once (new, or unreadable) counts for
/// nothing; a counter that went down (the proxy restarted) counts from zero.
fn shares(now: &[ProxyReading], before: &[ProxyReading]) -> BTreeMap<IpAddr, f64> {
    let mut sent: BTreeMap<IpAddr, u64> = BTreeMap::new();
    for proxy in now {
        let Ok(rows) = &proxy.endpoints else { continue };
        let Some(Ok(earlier)) = before
            .iter()
            .find(|b| b.pod.metadata.uid == proxy.pod.metadata.uid)
            .map(|b| &b.endpoints)
        else {
            continue;
        };
        for row in rows {
            let then = earlier
                .iter()
                .find(|e| e.address == row.address)
                .map_or(0, |e| e.requests);
            let delta = if row.requests >= then {
                row.requests - then
            } else {
                row.requests
            };
            *sent.entry(row.address.ip()).or_default() += delta;
        }
    }
    let total: u64 = sent.values().sum();
    if total == 0 {
        return BTreeMap::new();
    }
    sent.into_iter()
        .map(|(ip, n)| (ip, n as f64 / total as f64))
        .collect()
}

fn proxy_node(reading: &ProxyReading) -> ProxyNode {
    ProxyNode {
        name: reading.pod.metadata.name.clone().unwrap_or_default(),
        ready: condition(&reading.pod, "Ready") == Some("True"),
        terminating: reading.pod.metadata.deletion_timestamp.is_some(),
        report: reading
            .endpoints
            .as_ref()
            .map_err(Clone::clone)
            .map(|rows| ProxyCounts {
                listed: rows.iter().filter(|r| r.listed).count(),
                draining: rows
                    .iter()
                    .filter(|r| r.state == EndpointStatus::Draining)
                    .count(),
                in_flight: rows.iter().map(|r| r.in_flight).sum(),
            }),
    }
}

/// When an Event last happened: the series' last observation, else the last
/// timestamp or the event time (core and events.k8s.io writers set one of them), else
/// the first timestamp or its creation.
pub fn event_time(event: &Event) -> Option<Timestamp> {
    event
        .series
        .as_ref()
        .and_then(|s| s.last_observed_time.as_ref())
        .map(|t| t.0)
        .or_else(|| event.last_timestamp.as_ref().map(|t| t.0))
        .or_else(|| event.event_time.as_ref().map(|t| t.0))
        .or_else(|| event.first_timestamp.as_ref().map(|t| t.0))
        .or_else(|| event.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

/// How many times an Event happened (a series' count, else the core count).
pub fn event_count(event: &Event) -> i32 {
    event
        .series
        .as_ref()
        .and_then(|s| s.count)
        .or(event.count)
        .unwrap_or(1)
        .max(1)
}

fn events(events: &[Event]) -> Vec<EventLine> {
    let mut lines: Vec<EventLine> = events
        .iter()
        .map(|e| EventLine {
            at: event_time(e),
            type_: e.type_.clone().unwrap_or_else(|| "Normal".to_owned()),
            reason: e.reason.clone().unwrap_or_default(),
            message: e.message.clone().unwrap_or_default(),
            count: event_count(e),
        })
        .collect();
    lines.sort_by_key(|l| l.at);
    let skip = lines.len().saturating_sub(EVENTS_SHOWN);
    lines.split_off(skip)
}
