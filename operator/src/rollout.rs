//! Rollout tracking from what the proxies report: pods draining now, the summary of the
//! last rollout (drains, forced terminations, requests and failures by revision), the
//! decision to pause a bad rollout ([`decide`]), and the balance of requests over pods.
//!
//! All of it is a deterministic function of the previous status, the app pods, the
//! proxies' reports and a small [`Memory`] of counters kept between reconciles. The
//! memory lives in the operator process only: a new leader starts it afresh, so counts
//! already on status are kept and only what happened between the last status write and
//! the failover can be missed (never counted twice: see [`Memory::adopt`]).

use ballast_api::admin::{EndpointStatus, OpenCounts};
use ballast_api::spec::PauseThresholds;
use ballast_api::status::{
    BalanceSummary, DrainingPod, RevisionCounts, RolloutPause, RolloutSummary,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;

use crate::observe::{AppPod, ProxyObservation, drained_pod, endpoint_pod};
use crate::status::Transition;

pub use decide::{Policy, RolloutAction, Waiting, decide, requeue_after};

mod decide;

/// Seconds of traffic one balance figure covers.
pub const BALANCE_WINDOW_SECONDS: f64 = 30.0;
/// Fewer requests than this in a window say nothing about balance.
pub const BALANCE_MIN_REQUESTS: u64 = 100;
/// `pauseWhen.minRequests` when unset.
pub const DEFAULT_MIN_REQUESTS: i64 = 100;
/// Most pods listed in `status.draining`.
const MAX_DRAINING: usize = 1000;

/// Counters remembered between two reconciles of one BalancedService.
#[derive(Clone, Debug, Default)]
pub struct Memory {
    /// Last (requests, errors) per proxy pod and endpoint.
    counters: HashMap<(String, SocketAddr), (u64, u64)>,
    /// Proxy pods read at least once (their first read is only a baseline).
    proxies: HashSet<String>,
    /// Revision of every pod seen, so a deleted pod's last requests count right.
    revisions: HashMap<String, String>,
    /// The rollout the two sets below belong to.
    rollout: Option<(String, i64)>,
    drains_counted: HashSet<String>,
    forced_counted: HashSet<String>,
    /// Balance window: when it started (Unix seconds), requests per pod since then,
    /// and the pods active at its start.
    window_start: Option<f64>,
    window: HashMap<String, u64>,
    window_pods: HashSet<String>,
}

/// What the reconcile knows besides the memory.
#[derive(Clone, Debug)]
pub struct Inputs<'a> {
    /// Now, Unix seconds.
    pub now: f64,
    /// Revision of the pod template being rolled out.
    pub update_revision: &'a str,
    /// The app pods.
    pub pods: &'a [AppPod],
    /// Every ready proxy replica's report.
    pub proxies: &'a [ProxyObservation],
    /// The last rollout on status.
    pub previous: Option<&'a RolloutSummary>,
}

/// What tracking found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tracked {
    /// Pods still draining, with the counts summed over proxies.
    pub draining: Vec<DrainingPod>,
    /// The rollout summary (None until the first rollout after creation).
    pub last_rollout: Option<RolloutSummary>,
    /// A new balance figure, when a window completed.
    pub balance: Option<BalanceSummary>,
    /// True while pods of another revision than `update_revision` exist.
    pub rolling: bool,
    /// At least one proxy was read, and none failed.
    pub proxies_readable: bool,
    /// Events worth emitting (forced drains).
    pub events: Vec<Transition>,
}

impl Memory {
    /// Entries held, over all maps and sets: bounded by the pods and proxies that
    /// exist now, whatever happened before.
    pub fn len(&self) -> usize {
        self.counters.len()
            + self.proxies.len()
            + self.revisions.len()
            + self.drains_counted.len()
            + self.forced_counted.len()
            + self.window.len()
            + self.window_pods.len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// After a failover (the memory has not seen this rollout), treats every drain the
    /// proxies still remember as already counted: status has them, or they predate the
    /// rollout.
    fn adopt(&mut self, key: (String, i64), proxies: &[ProxyObservation], pods: &[AppPod]) {
        self.rollout = Some(key);
        self.drains_counted.clear();
        self.forced_counted.clear();
        for report in proxies.iter().filter_map(|o| o.report.as_ref().ok()) {
            for drain in &report.drains {
                if let Some(pod) = drained_pod(drain, pods) {
                    self.drains_counted.insert(pod.clone());
                    if drain.forced.is_some() {
                        self.forced_counted.insert(pod);
                    }
                }
            }
            for endpoint in &report.endpoints {
                if let (Some(pod), Some(_)) = (endpoint_pod(endpoint, pods), endpoint.forced) {
                    self.forced_counted.insert(pod);
                }
            }
        }
    }
}

fn time(unix: f64) -> Time {
    // Whole seconds, what a metav1.Time keeps through the API server: a finer value would
    // never compare equal to the status read back, and every reconcile would rewrite it.
    // A timestamp out of range (not from a real clock) becomes the epoch.
    Time(Timestamp::from_second(unix.floor() as i64).unwrap_or(Timestamp::UNIX_EPOCH))
}

fn unix(t: &Time) -> f64 {
    t.0.as_millisecond() as f64 / 1000.0
}

/// One reconcile's worth of tracking.
pub fn track(memory: &mut Memory, inputs: &Inputs<'_>) -> Tracked {
    let Inputs {
        now,
        update_revision,
        pods,
        proxies,
        previous,
    } = *inputs;
    for pod in pods {
        if let Some(revision) = &pod.revision {
            memory.revisions.insert(pod.name.clone(), revision.clone());
        }
    }
    let old_pods: Vec<&AppPod> = pods
        .iter()
        .filter(|p| p.revision.as_deref() != Some(update_revision))
        .collect();
    let rolling = !old_pods.is_empty();

    // The rollout: a new one starts when the template changed while old pods exist.
    let mut summary = previous.cloned();
    let starts = rolling
        && summary
            .as_ref()
            .is_none_or(|s| s.revision != update_revision);
    if starts {
        let previous_revision = most_common(old_pods.iter().filter_map(|p| p.revision.clone()));
        summary = Some(RolloutSummary {
            revision: update_revision.to_owned(),
            previous_revision,
            started_at: time(now),
            finished_at: None,
            duration_seconds: 0,
            pods_drained: 0,
            longest_drain_millis: 0,
            forced_terminations: 0,
            requests: RevisionCounts::default(),
            failed_requests: RevisionCounts::default(),
            paused: None,
        });
        memory.rollout = Some((update_revision.to_owned(), time(now).0.as_millisecond()));
        memory.drains_counted.clear();
        memory.forced_counted.clear();
    }
    let running = summary.as_ref().is_some_and(|s| s.finished_at.is_none());
    if let Some(s) = summary.as_ref().filter(|_| running) {
        let key = (s.revision.clone(), s.started_at.0.as_millisecond());
        if memory.rollout.as_ref() != Some(&key) {
            memory.adopt(key, proxies, pods);
        }
    }

    let mut events = Vec::new();
    let mut tally = Tally::default();
    let started = summary
        .as_ref()
        .map_or(f64::INFINITY, |s| unix(&s.started_at));
    for observation in proxies {
        let proxy = observation.proxy.as_str();
        let Ok(report) = &observation.report else {
            // Unreadable now: keep its counters for the next read.
            let kept = memory.counters.keys().filter(|(p, _)| p == proxy).cloned();
            tally.seen.extend(kept.collect::<Vec<_>>());
            continue;
        };
        let baseline_only = memory.proxies.insert(proxy.to_owned());
        for endpoint in &report.endpoints {
            let counts = (endpoint.requests, endpoint.errors);
            let pod = endpoint_pod(endpoint, pods);
            tally.count(
                memory,
                update_revision,
                (proxy, endpoint.address),
                pod,
                counts,
                baseline_only,
            );
        }
        for drain in &report.drains {
            let address = drain.address;
            let key = (proxy.to_owned(), address);
            // An endpoint tracked until now and gone: its last requests, then forget it.
            if memory.counters.contains_key(&key) && !tally.seen.contains(&key) {
                let counts = (drain.requests, drain.errors);
                let pod = drained_pod(drain, pods);
                tally.count(
                    memory,
                    update_revision,
                    (proxy, address),
                    pod,
                    counts,
                    false,
                );
                tally.seen.remove(&key);
            }
        }
    }
    let Tally {
        requests,
        failed,
        served,
        seen,
    } = tally;
    memory.counters.retain(|key, _| seen.contains(key));
    // Revisions only of pods that still exist or that a proxy still reports: every
    // other one can never be counted again, and a long-lived operator must not keep
    // the name of every pod it ever saw.
    let reported: HashSet<&str> = proxies
        .iter()
        .filter_map(|o| o.report.as_ref().ok())
        .flat_map(|r| {
            r.endpoints
                .iter()
                .filter_map(|e| e.pod.as_deref())
                .chain(r.drains.iter().filter_map(|d| d.pod.as_deref()))
        })
        .collect();
    memory
        .revisions
        .retain(|pod, _| reported.contains(pod.as_str()) || pods.iter().any(|p| &p.name == pod));
    let readable: HashSet<&str> = proxies.iter().map(|o| o.proxy.as_str()).collect();
    memory.proxies.retain(|p| readable.contains(p.as_str()));

    // Drains: finished ones from `/drains`, forced ones as soon as a proxy says so.
    if let Some(s) = summary.as_mut().filter(|_| running) {
        for report in proxies.iter().filter_map(|o| o.report.as_ref().ok()) {
            for drain in report.drains.iter().filter(|d| d.since >= started - 1.0) {
                let Some(pod) = drained_pod(drain, pods) else {
                    continue;
                };
                if memory.drains_counted.insert(pod.clone()) {
                    s.pods_drained = s.pods_drained.saturating_add(1);
                }
                s.longest_drain_millis = s
                    .longest_drain_millis
                    .max(i64::try_from(drain.drained_after_ms).unwrap_or(i64::MAX));
                if let Some(open) = drain.forced {
                    forced(memory, s, &pod, open, &mut events);
                }
            }
            for endpoint in &report.endpoints {
                let Some(pod) = endpoint_pod(endpoint, pods) else {
                    continue;
                };
                // A drain that finished while the endpoint is still listed counts now:
                // the proxy files it under `/drains` only once discovery drops the
                // endpoint, after the pod is gone, and by then the rollout of the last
                // pods may have finished.
                if let Some(after) = endpoint
                    .drained_after_ms
                    .filter(|_| endpoint.draining_since.is_some_and(|t| t >= started - 1.0))
                {
                    if memory.drains_counted.insert(pod.clone()) {
                        s.pods_drained = s.pods_drained.saturating_add(1);
                    }
                    s.longest_drain_millis = s
                        .longest_drain_millis
                        .max(i64::try_from(after).unwrap_or(i64::MAX));
                }
                if let Some(open) = endpoint.forced {
                    forced(memory, s, &pod, open, &mut events);
                }
            }
        }
        let add = |a: &mut RevisionCounts, b: &RevisionCounts| {
            a.old_revision = a.old_revision.saturating_add(b.old_revision);
            a.new_revision = a.new_revision.saturating_add(b.new_revision);
        };
        add(&mut s.requests, &requests);
        add(&mut s.failed_requests, &failed);
        // The duration is written once, when the rollout ends: a value growing at every
        // reconcile would make every reconcile a status write (and another reconcile).
        if !rolling {
            s.finished_at = Some(time(now));
            s.duration_seconds = (now - unix(&s.started_at)).max(0.0) as i64;
        }
    }

    Tracked {
        draining: draining(proxies, pods),
        last_rollout: summary,
        balance: balance(memory, now, served, proxies, pods),
        rolling,
        proxies_readable: !proxies.is_empty() && proxies.iter().all(|o| o.report.is_ok()),
        events,
    }
}

/// Request and failure counts since the last reconcile.
#[derive(Default)]
struct Tally {
    requests: RevisionCounts,
    failed: RevisionCounts,
    served: HashMap<String, u64>,
    /// Counter keys still current.
    seen: HashSet<(String, SocketAddr)>,
}

impl Tally {
    fn count(
        &mut self,
        memory: &mut Memory,
        update_revision: &str,
        (proxy, address): (&str, SocketAddr),
        pod: Option<String>,
        counts: (u64, u64),
        baseline_only: bool,
    ) {
        let key = (proxy.to_owned(), address);
        let before = memory.counters.insert(key.clone(), counts);
        self.seen.insert(key);
        if baseline_only {
            return;
        }
        // A counter that went down belongs to a new endpoint state: count from zero.
        let (r0, e0) = before
            .filter(|b| b.0 <= counts.0 && b.1 <= counts.1)
            .unwrap_or((0, 0));
        let (requests, errors) = (counts.0 - r0, counts.1 - e0);
        let new = pod
            .as_ref()
            .and_then(|p| memory.revisions.get(p))
            .is_some_and(|r| r == update_revision);
        let add = |c: &mut RevisionCounts, n: u64| {
            let n = i64::try_from(n).unwrap_or(i64::MAX);
            let slot = if new {
                &mut c.new_revision
            } else {
                &mut c.old_revision
            };
            *slot = slot.saturating_add(n);
        };
        add(&mut self.requests, requests);
        add(&mut self.failed, errors);
        if let Some(pod) = pod {
            *self.served.entry(pod).or_default() += requests;
        }
    }
}

fn forced(
    memory: &mut Memory,
    summary: &mut RolloutSummary,
    pod: &str,
    open: OpenCounts,
    events: &mut Vec<Transition>,
) {
    if memory.forced_counted.insert(pod.to_owned()) {
        summary.forced_terminations = summary.forced_terminations.saturating_add(1);
        events.push(Transition {
            reason: "ForcedDrain",
            message: format!(
                "pod {pod} stopped at the drain timeout with {} requests in flight and {} connections open",
                open.in_flight, open.connections
            ),
            warning: true,
        });
    }
}

fn most_common(revisions: impl Iterator<Item = String>) -> Option<String> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for r in revisions {
        *counts.entry(r).or_default() += 1;
    }
    counts.into_iter().max_by_key(|(_, n)| *n).map(|(r, _)| r)
}

/// Pods with a drain under way (something still open), summed over proxies.
fn draining(proxies: &[ProxyObservation], pods: &[AppPod]) -> Vec<DrainingPod> {
    let mut by_pod: BTreeMap<String, DrainingPod> = BTreeMap::new();
    for report in proxies.iter().filter_map(|o| o.report.as_ref().ok()) {
        for endpoint in &report.endpoints {
            let (Some(since), None) = (endpoint.draining_since, endpoint.drained_after_ms) else {
                continue;
            };
            let Some(pod) = endpoint_pod(endpoint, pods) else {
                continue;
            };
            let entry = by_pod.entry(pod.clone()).or_insert_with(|| DrainingPod {
                pod,
                since: time(since),
                in_flight: 0,
                connections: 0,
            });
            if since < unix(&entry.since) {
                entry.since = time(since);
            }
            let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            entry.in_flight = entry.in_flight.saturating_add(n(endpoint.in_flight));
            entry.connections = entry.connections.saturating_add(n(endpoint.connections));
        }
    }
    by_pod.into_values().take(MAX_DRAINING).collect()
}

/// Adds this reconcile's requests to the window; when the window is complete, the
/// busiest pod's requests over the mean, over the pods active for the whole window.
fn balance(
    memory: &mut Memory,
    now: f64,
    served: HashMap<String, u64>,
    proxies: &[ProxyObservation],
    pods: &[AppPod],
) -> Option<BalanceSummary> {
    let active: HashSet<String> = proxies
        .iter()
        .filter_map(|o| o.report.as_ref().ok())
        .flat_map(|r| &r.endpoints)
        .filter(|e| e.state == EndpointStatus::Active)
        .filter_map(|e| endpoint_pod(e, pods))
        .collect();
    let Some(start) = memory.window_start else {
        memory.window_start = Some(now);
        memory.window_pods = active;
        memory.window.clear();
        return None;
    };
    for (pod, n) in served {
        *memory.window.entry(pod).or_default() += n;
    }
    if now - start < BALANCE_WINDOW_SECONDS {
        return None;
    }
    let steady: Vec<u64> = memory
        .window_pods
        .intersection(&active)
        .map(|pod| memory.window.get(pod).copied().unwrap_or(0))
        .collect();
    let result = max_over_mean(&steady).map(|ratio| BalanceSummary {
        max_over_mean: format!("{ratio:.2}"),
        window_seconds: (now - start).round() as i32,
        pods: i32::try_from(steady.len()).unwrap_or(i32::MAX),
    });
    memory.window_start = Some(now);
    memory.window_pods = active;
    memory.window.clear();
    result
}

/// Max over mean of per-pod request counts; `None` with too little traffic to say.
pub fn max_over_mean(counts: &[u64]) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if counts.is_empty() || total < BALANCE_MIN_REQUESTS {
        return None;
    }
    let mean = total as f64 / counts.len() as f64;
    counts.iter().max().map(|&max| max as f64 / mean)
}

/// Why the rollout should pause now, or `None`. A rollout is paused at most once: after
/// a resume it is left to finish.
pub fn pause_reason(thresholds: &PauseThresholds, summary: &RolloutSummary) -> Option<String> {
    if summary.finished_at.is_some() || summary.paused.is_some() {
        return None;
    }
    if let Some(limit) = thresholds.forced_drains
        && summary.forced_terminations >= limit
    {
        return Some(format!(
            "{} drains reached the timeout with requests or connections open (pauseWhen.forcedDrains: {limit})",
            summary.forced_terminations
        ));
    }
    if let Some(limit) = thresholds.error_ratio {
        let min = thresholds
            .min_requests
            .map_or(DEFAULT_MIN_REQUESTS, i64::from);
        let (failed, sent) = (
            summary.failed_requests.new_revision,
            summary.requests.new_revision,
        );
        if sent >= min && sent > 0 && failed as f64 / sent as f64 > limit {
            return Some(format!(
                "{failed} of {sent} requests to revision {} failed ({:.1}%; pauseWhen.errorRatio: {limit})",
                summary.revision,
                failed as f64 * 100.0 / sent as f64
            ));
        }
    }
    None
}

/// The pause record for `reason`, taken at `now` for `generation`.
pub fn pause(reason: String, now: f64, generation: i64, rollback: bool) -> RolloutPause {
    RolloutPause {
        at: time(now),
        reason,
        generation,
        resumed: false,
        rolled_back: rollback,
    }
}

/// True when a paused rollout should resume: the spec changed since the pause, or the
/// user set the resume annotation.
pub fn resumes(pause: &RolloutPause, generation: i64, annotated: bool) -> bool {
    !pause.resumed && (generation != pause.generation || annotated)
}

#[cfg(test)]
mod tests;
