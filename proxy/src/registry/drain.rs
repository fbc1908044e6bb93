//! The drain state machine: why an endpoint drains, how its drain went, and the
//! registry's answers to the pod's drain helper and to `GET /drains`.

use super::{EndpointState, Registry, lock};
use ballast_api::admin::{DrainReason, DrainRecord, DrainReport, EndpointStatus, OpenCounts};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::SystemTime;
use tokio::time::Instant;

/// Drain mark of an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainMark {
    /// Why.
    pub reason: DrainReason,
    /// When it was marked (monotonic).
    pub since: Instant,
    /// When it was marked (wall clock, for reports).
    pub since_wall: SystemTime,
}

/// How a drain went, so far: what the rollout gate reports on status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct DrainProgress {
    /// When nothing was left in flight or open for the first time while draining.
    pub(super) drained_at: Option<Instant>,
    /// What was still open when the pod's drain helper gave up (`POST /drain/timeout`).
    pub(super) forced: Option<OpenCounts>,
}

/// Finished drains kept for `GET /drains`: enough for a rollout of hundreds of pods
/// between two polls of the operator.
pub(super) const DRAIN_HISTORY: usize = 1024;

pub(super) fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

impl Registry {
    /// Housekeeping, run about once a second: expires unconfirmed drain marks, ends
    /// ejections and forgets vanished endpoints that have gone idle.
    pub fn tick(&self, now: Instant) {
        let mut all = lock(&self.all);
        for state in all.values() {
            state.note_progress(now);
            if let Some(mark) = state.drain_mark() {
                let discovered_terminating = lock(&state.discovered).terminating;
                if mark.reason == DrainReason::Requested
                    && !discovered_terminating
                    && now.saturating_duration_since(mark.since) >= self.config.drain_ttl
                {
                    tracing::warn!(endpoint = %state.address, "drain mark expired without discovery confirming termination; routing to it again");
                    state.set_drain(None);
                }
            }
            let mut until = lock(&state.ejected_until);
            if until.is_some_and(|u| now >= u) {
                *until = None;
                state.ejected.store(false, Relaxed);
                tracing::info!(endpoint = %state.address, "ejection ended");
            }
        }
        let listed = self.snapshot.load();
        self.forget_idle(&mut all, now, |address| listed.lists(address));
    }

    /// Forgets endpoints that are no longer listed and have nothing open, recording
    /// how their drain went.
    pub(super) fn forget_idle(
        &self,
        all: &mut HashMap<SocketAddr, Arc<EndpointState>>,
        now: Instant,
        listed: impl Fn(SocketAddr) -> bool,
    ) {
        let mut history = lock(&self.history);
        all.retain(|address, state| {
            let keep = listed(*address) || !state.is_idle();
            if !keep && let Some(record) = state.drain_record(now) {
                if history.len() == DRAIN_HISTORY {
                    history.pop_front();
                }
                history.push_back(record);
            }
            keep
        });
    }

    /// The most recent finished drains, oldest first.
    pub fn drains(&self) -> Vec<DrainRecord> {
        lock(&self.history).iter().cloned().collect()
    }

    /// The pod with IP `ip` reports that its drain helper gave up waiting: records what
    /// was still open, so the rollout counts it as a forced termination. `None` when no
    /// endpoint has that IP.
    pub fn drain_timed_out(&self, ip: IpAddr, now: Instant) -> Option<DrainReport> {
        let all = lock(&self.all);
        let mut found = false;
        for state in all.values().filter(|s| s.address.ip() == ip) {
            found = true;
            let open = state.open_counts();
            if state.is_draining() && open != OpenCounts::default() {
                tracing::warn!(endpoint = %state.address, pod = ?state.pod(), in_flight = open.in_flight, connections = open.connections, "drain timed out: the pod stops with requests or connections open");
                lock(&state.progress).forced.get_or_insert(open);
            }
        }
        drop(all);
        found.then(|| self.drain_report(ip, now))
    }

    /// Marks every endpoint with IP `ip` as draining at its pod's request. Returns
    /// `None` when no endpoint has that IP.
    pub fn request_drain(&self, ip: IpAddr, now: Instant) -> Option<DrainReport> {
        let all = lock(&self.all);
        let mut found = false;
        for state in all.values().filter(|s| s.address.ip() == ip) {
            found = true;
            if state.drain_mark().is_none() {
                tracing::info!(endpoint = %state.address, pod = ?state.pod(), "drain requested by the pod");
                state.set_drain(Some(DrainMark {
                    reason: DrainReason::Requested,
                    since: now,
                    since_wall: self.wall(now),
                }));
            }
        }
        drop(all);
        found.then(|| self.drain_report(ip, now))
    }

    /// In-flight requests and open connections of the endpoints with IP `ip`, summed.
    pub fn drain_report(&self, ip: IpAddr, now: Instant) -> DrainReport {
        let all = lock(&self.all);
        let mut report = DrainReport::default();
        for state in all.values().filter(|s| s.address.ip() == ip) {
            state.note_progress(now);
            report.known = true;
            report.in_flight += state.in_flight.load(Relaxed);
            report.connections += state.connections.load(Relaxed);
            let status = state.status(now);
            report.state = Some(match report.state {
                Some(EndpointStatus::Draining) => EndpointStatus::Draining,
                _ => status,
            });
            if let Some(mark) = state.drain_mark() {
                let since = mark
                    .since_wall
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default();
                report.draining_since = Some(since.as_secs_f64());
            }
        }
        report
    }
}
