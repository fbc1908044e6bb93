//! One endpoint's live state: the counters the drain gate reads, its health and
//! latency estimate, and its row of `/endpoints`.

use super::drain::{DrainMark, DrainProgress, unix_seconds};
use super::{BalancerConfig, lock};
use crate::balance::Cost;
use crate::endpoint::Endpoint;
use crate::load::{Health, PeakEwma, probe_due, warmup_weight};
use crate::pool::Pool;
use ballast_api::admin::{DrainRecord, EndpointReport, EndpointStatus, OpenCounts};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tokio::time::Instant;

/// Live state of one endpoint.
#[derive(Debug)]
pub struct EndpointState {
    /// Pod IP and port.
    pub address: SocketAddr,
    pub(super) discovered: Mutex<Endpoint>,
    /// Requests sent to it whose response has not completed.
    pub in_flight: AtomicU64,
    /// Requests waiting for their response head (the EWMA's load term).
    pub pending: AtomicU64,
    /// Open connections to it, upgraded tunnels included.
    pub connections: AtomicU64,
    /// Connections ever opened to it.
    pub connections_opened: AtomicU64,
    /// Requests sent to it.
    pub requests: AtomicU64,
    /// Responses by status class: 1xx .. 5xx.
    pub responses: [AtomicU64; 5],
    /// Requests that failed without a response (connect, reset, timeout).
    pub failures: AtomicU64,
    /// Times it was ejected.
    pub ejections: AtomicU64,
    pub(super) ewma: Mutex<PeakEwma>,
    pub(super) health: Mutex<Health>,
    pub(super) ejected_until: Mutex<Option<Instant>>,
    /// Mirrors of `discovered.ready` and `ejected_until.is_some()` so selection reads
    /// atomics, not locks, for every candidate.
    pub(super) ready: AtomicBool,
    pub(super) ejected: AtomicBool,
    pub(super) drain: Mutex<Option<DrainMark>>,
    pub(super) draining: AtomicBool,
    pub(super) progress: Mutex<DrainProgress>,
    /// Sequence number of the last selection of this endpoint (P2C tie-break, and how
    /// many selections it has sat out).
    pub(crate) last_picked: AtomicU64,
    /// Probes in a row that did not win it a selection on its own (see
    /// [`probe_due`]).
    pub(super) probe_streak: AtomicU32,
    /// A probe request is on its way: its latency sample replaces the estimate.
    pub(super) probing: AtomicBool,
    pub(super) added: Instant,
    /// Nanoseconds after `added` when discovery first reported it ready: the slow-start
    /// ramp starts there, not when the endpoint was first listed (a pod is listed
    /// unready for as long as its probes and readiness gate take). `u64::MAX`: not yet.
    pub(super) ready_after: AtomicU64,
    pub(super) ramp: bool,
    pub(crate) pool: Pool,
}

impl EndpointState {
    pub(super) fn new(
        endpoint: Endpoint,
        config: &BalancerConfig,
        ramp: bool,
        now: Instant,
    ) -> Self {
        let ready = endpoint.ready;
        Self {
            address: endpoint.address,
            discovered: Mutex::new(endpoint),
            in_flight: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            connections_opened: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            responses: Default::default(),
            failures: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            ewma: Mutex::new(PeakEwma::new(config.initial_rtt, config.ewma_decay, now)),
            health: Mutex::new(Health::default()),
            ejected_until: Mutex::new(None),
            ready: AtomicBool::new(ready),
            ejected: AtomicBool::new(false),
            drain: Mutex::new(None),
            draining: AtomicBool::new(false),
            progress: Mutex::new(DrainProgress::default()),
            last_picked: AtomicU64::new(0),
            probe_streak: AtomicU32::new(0),
            probing: AtomicBool::new(false),
            added: now,
            ready_after: AtomicU64::new(if ready { 0 } else { u64::MAX }),
            ramp,
            pool: Pool::default(),
        }
    }

    /// The pod name discovery reported.
    pub fn pod(&self) -> Option<String> {
        lock(&self.discovered).name.clone()
    }

    /// True while no new request may be sent to it.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    /// Its drain mark, if any.
    pub fn drain_mark(&self) -> Option<DrainMark> {
        *lock(&self.drain)
    }

    pub(super) fn set_drain(&self, mark: Option<DrainMark>) {
        let mut drain = lock(&self.drain);
        let was = drain.is_some();
        *drain = mark;
        self.draining.store(mark.is_some(), Relaxed);
        drop(drain);
        if mark.is_none() {
            *lock(&self.progress) = DrainProgress::default();
        }
        if mark.is_some() && !was {
            // No new request will use them; close now rather than at the idle timeout.
            self.pool.close_idle();
        }
    }

    pub(crate) fn is_ejected(&self, now: Instant) -> bool {
        self.ejected.load(Relaxed) && lock(&self.ejected_until).is_some_and(|until| now < until)
    }

    pub(crate) fn weight(&self, now: Instant, warmup: Duration) -> f64 {
        if self.ramp {
            let ready_after = self.ready_after.load(Relaxed);
            let ready_for = if ready_after == u64::MAX {
                Duration::ZERO
            } else {
                now.saturating_duration_since(self.added + Duration::from_nanos(ready_after))
            };
            warmup_weight(ready_for, warmup)
        } else {
            1.0
        }
    }

    pub(super) fn status(&self, now: Instant) -> EndpointStatus {
        let discovered = lock(&self.discovered);
        if self.is_draining() {
            EndpointStatus::Draining
        } else if !discovered.ready {
            EndpointStatus::NotReady
        } else if self.is_ejected(now) {
            EndpointStatus::Ejected
        } else {
            EndpointStatus::Active
        }
    }

    /// Latency plus load: the peak-EWMA estimate times (pending + 1), divided by the
    /// slow-start weight. `picks` is the registry's selection count so far and
    /// `candidates` how many endpoints this selection is among.
    pub(crate) fn ewma_cost(
        &self,
        now: Instant,
        warmup: Duration,
        picks: u64,
        candidates: usize,
    ) -> Cost {
        let ewma = *lock(&self.ewma);
        let pending = self.pending.load(Relaxed);
        // An endpoint nobody has measured yet, or not for a while, gets one request to
        // measure it. Otherwise an initial guess (30 ms) or a one-off stall loses to every
        // warm endpoint answering in 1 ms, and the endpoint would starve until the
        // estimate decays (tens of seconds). "A while" is a number of missed selections
        // (see `load::probe_due`), and at most `load::STALE_AFTER`.
        let missed = picks.saturating_sub(self.last_picked.load(Relaxed));
        let probe = pending == 0
            && (!ewma.is_sampled()
                || ewma.is_stale(now)
                || probe_due(missed, candidates, self.probe_streak.load(Relaxed)));
        let speed = if probe {
            0.0
        } else {
            ewma.estimate(now) / self.weight(now, warmup)
        };
        Cost {
            speed,
            load: pending + 1,
            probe,
        }
    }

    /// What zone routing weighs this endpoint by (see
    /// [`crate::balance::zone::capacity`]): with `latency`, its peak-EWMA estimate in
    /// nanoseconds when one is fresh (sampled within `load::STALE_AFTER`); and its
    /// slow-start weight. The per-request price without the load term: the requests
    /// pending on it are this proxy's own placement, not what the endpoint can carry
    /// (counting them would push traffic away from wherever this proxy sends it).
    pub(crate) fn zone_inputs(
        &self,
        now: Instant,
        warmup: Duration,
        latency: bool,
    ) -> (Option<f64>, f64) {
        let weight = self.weight(now, warmup);
        if !latency {
            return (None, weight);
        }
        let ewma = *lock(&self.ewma);
        let fresh = ewma.is_sampled() && !ewma.is_stale(now);
        (fresh.then(|| ewma.estimate(now)), weight)
    }

    /// Bookkeeping after this endpoint won a selection at `cost`.
    pub(crate) fn picked(&self, cost: Cost) {
        if cost.probe {
            self.probe_streak.fetch_add(1, Relaxed);
            self.probing.store(true, Relaxed);
        } else {
            self.probe_streak.store(0, Relaxed);
        }
    }

    pub(crate) fn request_cost(&self, now: Instant, warmup: Duration) -> Cost {
        Cost {
            speed: 1.0 / self.weight(now, warmup),
            load: self.in_flight.load(Relaxed) + 1,
            probe: false,
        }
    }

    /// Records a response head after `rtt`.
    pub fn observe_rtt(&self, rtt: Duration, now: Instant) {
        let probe = self.probing.swap(false, Relaxed);
        let mut ewma = lock(&self.ewma);
        if probe {
            ewma.reset_to(rtt, now);
        } else {
            ewma.observe(rtt, now);
        }
    }

    pub(super) fn report(&self, now: Instant, warmup: Duration, listed: bool) -> EndpointReport {
        self.note_progress(now);
        let mark = self.drain_mark();
        let progress = *lock(&self.progress);
        let discovered = lock(&self.discovered).clone();
        let opened = self.connections_opened.load(Relaxed);
        let requests = self.requests.load(Relaxed);
        EndpointReport {
            address: self.address,
            // A registry serves one port; `Ports` names it.
            port: None,
            pod: discovered.name,
            zone: discovered.zone,
            state: self.status(now),
            listed,
            ready: discovered.ready,
            serving: discovered.serving,
            terminating: discovered.terminating,
            drain_reason: self.drain_mark().map(|m| m.reason),
            in_flight: self.in_flight.load(Relaxed),
            connections: self.connections.load(Relaxed),
            connections_opened: opened,
            requests,
            requests_per_connection: if opened == 0 {
                0.0
            } else {
                requests as f64 / opened as f64
            },
            errors: self.responses[4].load(Relaxed) + self.failures.load(Relaxed),
            ewma_ms: lock(&self.ewma).estimate(now) / 1e6,
            weight: self.weight(now, warmup),
            draining_since: mark.map(|m| unix_seconds(m.since_wall)),
            drained_after_ms: mark.zip(progress.drained_at).map(|(m, at)| {
                at.saturating_duration_since(m.since)
                    .as_millis()
                    .try_into()
                    .unwrap_or(u64::MAX)
            }),
            forced: progress.forced,
        }
    }

    pub(super) fn is_idle(&self) -> bool {
        self.in_flight.load(Relaxed) == 0 && self.connections.load(Relaxed) == 0
    }

    /// Notes the moment a draining endpoint first has nothing open. Called whenever
    /// its counts are read (the drain helper polls every 100 ms) and by the tick.
    pub(super) fn note_progress(&self, now: Instant) {
        if self.is_draining() && self.is_idle() {
            let mut progress = lock(&self.progress);
            if progress.drained_at.is_none() {
                progress.drained_at = Some(now);
            }
        }
    }

    pub(super) fn open_counts(&self) -> OpenCounts {
        OpenCounts {
            in_flight: self.in_flight.load(Relaxed),
            connections: self.connections.load(Relaxed),
        }
    }

    /// The record of a finished drain, when it drained.
    pub(super) fn drain_record(&self, now: Instant) -> Option<DrainRecord> {
        let mark = self.drain_mark()?;
        self.note_progress(now);
        let progress = *lock(&self.progress);
        let drained_at = progress.drained_at.unwrap_or(now);
        Some(DrainRecord {
            address: self.address,
            port: None,
            pod: self.pod(),
            reason: mark.reason,
            since: unix_seconds(mark.since_wall),
            drained_after_ms: drained_at
                .saturating_duration_since(mark.since)
                .as_millis()
                .try_into()
                .unwrap_or(u64::MAX),
            forced: progress.forced,
            requests: self.requests.load(Relaxed),
            errors: self.responses[4].load(Relaxed) + self.failures.load(Relaxed),
        })
    }
}
