//! Runtime state of every known endpoint, and per-request selection.
//!
//! Discovery updates arrive through [`Registry::apply`], which rebuilds an immutable
//! [`Snapshot`] and swaps it in; [`Registry::select`] reads the snapshot without a
//! global lock. Counters that the drain gate reads (in-flight requests and open
//! connections) live in atomics on each [`EndpointState`].

use crate::endpoint::{Endpoint, EndpointSet};
use crate::load::{EjectionPolicy, Health, PeakEwma, may_eject, probe_due, warmup_weight};
use crate::pool::Pool;
use arc_swap::ArcSwap;
use serde::Serialize;
use smallvec::SmallVec;
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// Load-balancing algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// Power of two choices over peak-EWMA latency x (pending + 1).
    P2cEwma,
    /// Power of two choices over in-flight requests.
    LeastRequest,
    /// Each endpoint in turn.
    RoundRobin,
}

/// Balancer settings.
#[derive(Clone, Debug)]
pub struct BalancerConfig {
    /// Selection algorithm.
    pub algorithm: Algorithm,
    /// Latency assumed for an endpoint before its first response.
    pub initial_rtt: Duration,
    /// Peak-EWMA decay time.
    pub ewma_decay: Duration,
    /// Slow-start ramp for endpoints added after the first discovery update.
    pub warmup: Duration,
    /// Outlier ejection.
    pub ejection: EjectionPolicy,
    /// A drain mark that discovery never confirms expires after this.
    pub drain_ttl: Duration,
}

/// Why an endpoint is draining.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DrainReason {
    /// Its pod asked through `POST /drain` (expires unless discovery confirms).
    Requested,
    /// Discovery reports it terminating.
    Terminating,
    /// Discovery no longer lists it.
    Removed,
}

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
struct DrainProgress {
    /// When nothing was left in flight or open for the first time while draining.
    drained_at: Option<SystemTime>,
    /// What was still open when the pod's drain helper gave up (`POST /drain/timeout`).
    forced: Option<OpenCounts>,
}

/// Requests and connections still open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OpenCounts {
    /// Requests in flight.
    pub in_flight: u64,
    /// Open connections (tunnels included).
    pub connections: u64,
}

/// A finished drain: an endpoint that was draining and is now forgotten (no longer
/// listed, nothing open). `GET /drains` lists the most recent ones.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DrainRecord {
    /// Pod IP and port.
    pub address: SocketAddr,
    /// Pod name.
    pub pod: Option<String>,
    /// Why it drained.
    pub reason: DrainReason,
    /// Seconds since the Unix epoch when draining began.
    pub since: f64,
    /// Milliseconds from the start of the drain until nothing was in flight or open.
    pub drained_after_ms: u64,
    /// Set when the pod's drain helper reached its timeout with requests or connections
    /// still open: what was open then.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forced: Option<OpenCounts>,
    /// Requests this proxy sent to the endpoint, in all.
    pub requests: u64,
    /// Its 5xx answers and failures without an answer, in all.
    pub errors: u64,
}

/// Finished drains kept for `GET /drains`: enough for a rollout of hundreds of pods
/// between two polls of the operator.
const DRAIN_HISTORY: usize = 1024;

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// What an endpoint is doing, as reported on `/endpoints` and `/drain`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndpointStatus {
    /// Takes new requests.
    Active,
    /// Takes no new requests; in-flight ones finish.
    Draining,
    /// Failing; skipped until the ejection ends.
    Ejected,
    /// Not ready according to discovery.
    NotReady,
}

/// Live state of one endpoint.
#[derive(Debug)]
pub struct EndpointState {
    /// Pod IP and port.
    pub address: SocketAddr,
    discovered: Mutex<Endpoint>,
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
    ewma: Mutex<PeakEwma>,
    health: Mutex<Health>,
    ejected_until: Mutex<Option<Instant>>,
    /// Mirrors of `discovered.ready` and `ejected_until.is_some()` so selection reads
    /// atomics, not locks, for every candidate.
    ready: AtomicBool,
    ejected: AtomicBool,
    drain: Mutex<Option<DrainMark>>,
    draining: AtomicBool,
    progress: Mutex<DrainProgress>,
    /// Sequence number of the last selection of this endpoint (P2C tie-break, and how
    /// many selections it has sat out).
    last_picked: AtomicU64,
    /// Probes in a row that did not win it a selection on its own (see
    /// [`probe_due`]).
    probe_streak: AtomicU32,
    /// A probe request is on its way: its latency sample replaces the estimate.
    probing: AtomicBool,
    added: Instant,
    /// Nanoseconds after `added` when discovery first reported it ready: the slow-start
    /// ramp starts there, not when the endpoint was first listed (a pod is listed
    /// unready for as long as its probes and readiness gate take). `u64::MAX`: not yet.
    ready_after: AtomicU64,
    ramp: bool,
    pub(crate) pool: Pool,
}

/// The endpoints discovery currently lists, as selection sees them.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Sorted by address.
    pub endpoints: Vec<Arc<EndpointState>>,
    /// Consistent-hash ring over `endpoints` (session affinity).
    pub ring: crate::affinity::Ring,
}

impl Snapshot {
    /// True when discovery lists `address` (binary search: endpoints are sorted).
    pub fn lists(&self, address: SocketAddr) -> bool {
        self.endpoints
            .binary_search_by_key(&address, |e| e.address)
            .is_ok()
    }
}

/// All endpoints, current and leaving.
#[derive(Debug)]
pub struct Registry {
    config: BalancerConfig,
    snapshot: ArcSwap<Snapshot>,
    /// Listed ones plus removed ones that still have requests or connections.
    all: Mutex<HashMap<SocketAddr, Arc<EndpointState>>>,
    updates: AtomicU64,
    next: AtomicUsize,
    picks: AtomicU64,
    /// Finished drains, newest last.
    history: Mutex<VecDeque<DrainRecord>>,
}

/// Peak-EWMA costs closer than this ratio count as equal (see [`p2c`]).
const EWMA_TOLERANCE: f64 = 1.5;

/// The counts the drain gate reads for one pod.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DrainReport {
    /// Whether this proxy knows an endpoint with that IP.
    pub known: bool,
    /// Its state, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<EndpointStatus>,
    /// Requests in flight to it.
    pub in_flight: u64,
    /// Connections open to it.
    pub connections: u64,
    /// Seconds since the Unix epoch when draining began.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub draining_since: Option<f64>,
}

/// One row of `/endpoints`.
#[derive(Clone, Debug, Serialize)]
pub struct EndpointReport {
    /// Pod IP and port.
    pub address: SocketAddr,
    /// Pod name.
    pub pod: Option<String>,
    /// Zone.
    pub zone: Option<String>,
    /// State.
    pub state: EndpointStatus,
    /// Still listed by discovery.
    pub listed: bool,
    /// Discovery's conditions.
    pub ready: bool,
    /// Discovery's conditions.
    pub serving: bool,
    /// Discovery's conditions.
    pub terminating: bool,
    /// Why it drains, when it does.
    pub drain_reason: Option<DrainReason>,
    /// Requests in flight.
    pub in_flight: u64,
    /// Open connections.
    pub connections: u64,
    /// Connections ever opened.
    pub connections_opened: u64,
    /// Requests sent.
    pub requests: u64,
    /// Requests per connection opened (keep-alive reuse).
    pub requests_per_connection: f64,
    /// 5xx answers plus failures without an answer.
    pub errors: u64,
    /// Peak-EWMA latency estimate in milliseconds.
    pub ewma_ms: f64,
    /// Slow-start weight, 0.1 to 1.
    pub weight: f64,
    /// Seconds since the Unix epoch when draining began.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub draining_since: Option<f64>,
    /// Milliseconds from the start of the drain until nothing was open, once that
    /// happened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drained_after_ms: Option<u64>,
    /// What was open when the pod's drain helper gave up, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forced: Option<OpenCounts>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl EndpointState {
    fn new(endpoint: Endpoint, config: &BalancerConfig, ramp: bool, now: Instant) -> Self {
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

    fn set_drain(&self, mark: Option<DrainMark>) {
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

    fn is_ejected(&self, now: Instant) -> bool {
        self.ejected.load(Relaxed) && lock(&self.ejected_until).is_some_and(|until| now < until)
    }

    fn weight(&self, now: Instant, warmup: Duration) -> f64 {
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

    fn status(&self, now: Instant) -> EndpointStatus {
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
    fn ewma_cost(&self, now: Instant, warmup: Duration, picks: u64, candidates: usize) -> Cost {
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

    /// Bookkeeping after this endpoint won a selection at `cost`.
    fn picked(&self, cost: Cost) {
        if cost.probe {
            self.probe_streak.fetch_add(1, Relaxed);
            self.probing.store(true, Relaxed);
        } else {
            self.probe_streak.store(0, Relaxed);
        }
    }

    fn request_cost(&self, now: Instant, warmup: Duration) -> Cost {
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

    fn report(&self, now: Instant, warmup: Duration, listed: bool) -> EndpointReport {
        self.note_progress();
        let mark = self.drain_mark();
        let progress = *lock(&self.progress);
        let discovered = lock(&self.discovered).clone();
        let opened = self.connections_opened.load(Relaxed);
        let requests = self.requests.load(Relaxed);
        EndpointReport {
            address: self.address,
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
                at.duration_since(m.since_wall)
                    .unwrap_or_default()
                    .as_millis()
                    .try_into()
                    .unwrap_or(u64::MAX)
            }),
            forced: progress.forced,
        }
    }

    fn is_idle(&self) -> bool {
        self.in_flight.load(Relaxed) == 0 && self.connections.load(Relaxed) == 0
    }

    /// Notes the moment a draining endpoint first has nothing open. Called whenever
    /// its counts are read (the drain helper polls every 100 ms) and by the tick.
    fn note_progress(&self) {
        if self.is_draining() && self.is_idle() {
            let mut progress = lock(&self.progress);
            if progress.drained_at.is_none() {
                progress.drained_at = Some(SystemTime::now());
            }
        }
    }

    fn open_counts(&self) -> OpenCounts {
        OpenCounts {
            in_flight: self.in_flight.load(Relaxed),
            connections: self.connections.load(Relaxed),
        }
    }

    /// The record of a finished drain, when it drained.
    fn drain_record(&self) -> Option<DrainRecord> {
        let mark = self.drain_mark()?;
        self.note_progress();
        let progress = *lock(&self.progress);
        let drained_at = progress.drained_at.unwrap_or_else(SystemTime::now);
        Some(DrainRecord {
            address: self.address,
            pod: self.pod(),
            reason: mark.reason,
            since: unix_seconds(mark.since_wall),
            drained_after_ms: drained_at
                .duration_since(mark.since_wall)
                .unwrap_or_default()
                .as_millis()
                .try_into()
                .unwrap_or(u64::MAX),
            forced: progress.forced,
            requests: self.requests.load(Relaxed),
            errors: self.responses[4].load(Relaxed) + self.failures.load(Relaxed),
        })
    }
}

impl Registry {
    /// An empty registry.
    pub fn new(config: BalancerConfig) -> Self {
        Self {
            config,
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            all: Mutex::new(HashMap::new()),
            updates: AtomicU64::new(0),
            next: AtomicUsize::new(0),
            picks: AtomicU64::new(0),
            history: Mutex::new(VecDeque::new()),
        }
    }

    /// Balancer settings.
    pub fn config(&self) -> &BalancerConfig {
        &self.config
    }

    /// The endpoints currently listed.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Applies a discovery update: new endpoints appear (ramping up when they are not
    /// part of the first update), terminating ones drain, vanished ones drain and are
    /// forgotten once they have no request or connection left.
    pub fn apply(&self, set: &EndpointSet, now: Instant) {
        let ramp = self.updates.fetch_add(1, Relaxed) > 0;
        let mut all = lock(&self.all);
        let mut listed = Vec::with_capacity(set.len());
        for endpoint in set.iter() {
            let state = all
                .entry(endpoint.address)
                .or_insert_with(|| {
                    Arc::new(EndpointState::new(
                        endpoint.clone(),
                        &self.config,
                        ramp,
                        now,
                    ))
                })
                .clone();
            *lock(&state.discovered) = endpoint.clone();
            state.ready.store(endpoint.ready, Relaxed);
            if endpoint.ready && state.ready_after.load(Relaxed) == u64::MAX {
                let after = now.saturating_duration_since(state.added).as_nanos();
                state
                    .ready_after
                    .store(after.try_into().unwrap_or(u64::MAX - 1), Relaxed);
            }
            let mark = state.drain_mark();
            if endpoint.terminating {
                if mark.is_none_or(|m| m.reason != DrainReason::Terminating) {
                    state.set_drain(Some(DrainMark {
                        reason: DrainReason::Terminating,
                        since: mark.map_or(now, |m| m.since),
                        since_wall: mark.map_or_else(SystemTime::now, |m| m.since_wall),
                    }));
                }
            } else if mark.is_some_and(|m| m.reason == DrainReason::Removed) {
                // Listed again (e.g. a flapping slice): routable again.
                state.set_drain(None);
            }
            listed.push(state);
        }
        for (address, state) in all.iter() {
            if set.contains(*address) {
                continue;
            }
            if state
                .drain_mark()
                .is_none_or(|m| m.reason == DrainReason::Requested)
            {
                let mark = state.drain_mark();
                state.set_drain(Some(DrainMark {
                    reason: DrainReason::Removed,
                    since: mark.map_or(now, |m| m.since),
                    since_wall: mark.map_or_else(SystemTime::now, |m| m.since_wall),
                }));
            }
        }
        self.forget_idle(&mut all, |address| set.contains(address));
        self.snapshot.store(Arc::new(Snapshot {
            ring: crate::affinity::Ring::new(&listed.iter().map(|e| e.address).collect::<Vec<_>>()),
            endpoints: listed,
        }));
    }

    /// Housekeeping, run about once a second: expires unconfirmed drain marks, ends
    /// ejections and forgets vanished endpoints that have gone idle.
    pub fn tick(&self, now: Instant) {
        let mut all = lock(&self.all);
        for state in all.values() {
            state.note_progress();
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
        self.forget_idle(&mut all, |address| listed.lists(address));
    }

    /// Forgets endpoints that are no longer listed and have nothing open, recording
    /// how their drain went.
    fn forget_idle(
        &self,
        all: &mut HashMap<SocketAddr, Arc<EndpointState>>,
        listed: impl Fn(SocketAddr) -> bool,
    ) {
        let mut history = lock(&self.history);
        all.retain(|address, state| {
            let keep = listed(*address) || !state.is_idle();
            if !keep && let Some(record) = state.drain_record() {
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

    /// Picks the endpoint for one request, skipping `tried`. Eligible: ready, not
    /// draining, not ejected. With none eligible, falls back to endpoints that are
    /// still serving while terminating (as kube-proxy does).
    pub fn select(&self, now: Instant, tried: &[SocketAddr]) -> Option<Arc<EndpointState>> {
        let snapshot = self.snapshot.load();
        let untried = |e: &&Arc<EndpointState>| !tried.contains(&e.address);
        // On the stack up to 32 endpoints: no allocation per request for most services.
        let mut candidates: SmallVec<[&Arc<EndpointState>; 32]> = snapshot
            .endpoints
            .iter()
            .filter(untried)
            .filter(|e| !e.is_draining() && e.ready.load(Relaxed) && !e.is_ejected(now))
            .collect();
        if candidates.is_empty() {
            candidates = snapshot
                .endpoints
                .iter()
                .filter(untried)
                .filter(|e| {
                    let d = lock(&e.discovered);
                    d.serving && (d.terminating || e.is_draining())
                })
                .collect();
        }
        let warmup = self.config.warmup;
        let picks = self.picks.fetch_add(1, Relaxed) + 1;
        let chosen = match (candidates.len(), self.config.algorithm) {
            (0, _) => return None,
            (1, _) => candidates[0],
            (n, Algorithm::RoundRobin) => candidates[self.next.fetch_add(1, Relaxed) % n],
            (n, Algorithm::P2cEwma) => {
                let (chosen, cost) = p2c(&candidates, n, EWMA_TOLERANCE, |e| {
                    e.ewma_cost(now, warmup, picks, n)
                });
                chosen.picked(cost);
                chosen
            }
            (n, Algorithm::LeastRequest) => {
                p2c(&candidates, n, 1.0, |e| e.request_cost(now, warmup)).0
            }
        };
        chosen.last_picked.store(picks, Relaxed);
        Some(chosen.clone())
    }

    /// Picks the endpoint for a request with affinity key `key`: the first one
    /// clockwise on the ring that is eligible and under its bounded load (see
    /// [`crate::affinity`]). Returns it and whether the key's own endpoint was skipped
    /// because it is draining, ejected or not ready (the key "moved").
    pub fn select_affine(
        &self,
        now: Instant,
        tried: &[SocketAddr],
        key: u64,
        load_factor: f64,
    ) -> Option<(Arc<EndpointState>, bool)> {
        let snapshot = self.snapshot.load();
        let eligible =
            |e: &EndpointState| !e.is_draining() && e.ready.load(Relaxed) && !e.is_ejected(now);
        let (count, total) = snapshot
            .endpoints
            .iter()
            .filter(|e| eligible(e))
            .fold((0, 0), |(n, t), e| (n + 1, t + e.in_flight.load(Relaxed)));
        let mut moved = false;
        for index in snapshot.ring.walk(key) {
            let Some(endpoint) = snapshot.endpoints.get(index) else {
                continue;
            };
            if tried.contains(&endpoint.address) {
                continue;
            }
            if !eligible(endpoint) {
                moved = true;
                continue;
            }
            let limit = crate::affinity::bound(
                total,
                count,
                load_factor,
                endpoint.weight(now, self.config.warmup),
            );
            if endpoint.in_flight.load(Relaxed) + 1 > limit {
                continue;
            }
            endpoint
                .last_picked
                .store(self.picks.fetch_add(1, Relaxed) + 1, Relaxed);
            return Some((endpoint.clone(), moved));
        }
        // Nothing eligible under its bound: balance as without affinity.
        self.select(now, tried).map(|e| (e, true))
    }

    /// Counts a failure (connect error, reset, timeout or 5xx) against `endpoint`, and
    /// ejects it after too many in a row.
    pub fn record_failure(&self, endpoint: &EndpointState, now: Instant) {
        let policy = &self.config.ejection;
        let snapshot = self.snapshot.load();
        let ejected = snapshot
            .endpoints
            .iter()
            .filter(|e| e.is_ejected(now))
            .count();
        let allowed = may_eject(ejected, snapshot.endpoints.len(), policy);
        if let Some(length) = lock(&endpoint.health).record_failure(policy, allowed) {
            *lock(&endpoint.ejected_until) = Some(now + length);
            endpoint.ejected.store(true, Relaxed);
            endpoint.ejections.fetch_add(1, Relaxed);
            tracing::warn!(endpoint = %endpoint.address, seconds = length.as_secs(), "endpoint ejected after consecutive failures");
        }
    }

    /// Counts a success for `endpoint`.
    pub fn record_success(&self, endpoint: &EndpointState) {
        lock(&endpoint.health).record_success();
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
                    since_wall: SystemTime::now(),
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
            state.note_progress();
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

    /// Every endpoint, listed or leaving, for `/endpoints` and `/metrics`.
    pub fn reports(&self, now: Instant) -> Vec<EndpointReport> {
        let listed = self.snapshot.load();
        let all = lock(&self.all);
        let mut reports: Vec<_> = all
            .values()
            .map(|s| {
                let is_listed = listed.lists(s.address);
                s.report(now, self.config.warmup, is_listed)
            })
            .collect();
        reports.sort_by_key(|r| r.address);
        reports
    }

    /// Looks up an endpoint's state (listed or leaving).
    pub fn get(&self, address: SocketAddr) -> Option<Arc<EndpointState>> {
        lock(&self.all).get(&address).cloned()
    }
}

/// What P2C compares: a per-request price (latency estimate, or 1, divided by the
/// slow-start weight) and the number of requests it would have to share with.
#[derive(Clone, Copy, Debug)]
struct Cost {
    speed: f64,
    load: u64,
    /// Priced as a probe: the estimate is missing or stale.
    probe: bool,
}

impl Cost {
    fn total(self) -> f64 {
        self.speed * self.load as f64
    }

    /// Equal load and prices within `tolerance`: neither is really cheaper.
    fn ties(self, other: Cost, tolerance: f64) -> bool {
        self.load == other.load
            && self.speed.max(other.speed) <= self.speed.min(other.speed) * tolerance
    }
}

/// Power of two choices: two distinct random candidates, the cheaper one wins. When
/// neither is really cheaper (same load, latency estimates within `tolerance`) the one
/// picked less recently wins: latency samples carry scheduling noise, and taking turns
/// between near-equal pods keeps identical pods evenly loaded, while a pod that is
/// really slower or busier still loses.
fn p2c<'a>(
    candidates: &[&'a Arc<EndpointState>],
    n: usize,
    tolerance: f64,
    cost: impl Fn(&EndpointState) -> Cost,
) -> (&'a Arc<EndpointState>, Cost) {
    let a = fastrand::usize(..n);
    let mut b = fastrand::usize(..n - 1);
    if b >= a {
        b += 1;
    }
    let (a, b) = (candidates[a], candidates[b]);
    let (cost_a, cost_b) = (cost(a), cost(b));
    let b_wins = if cost_a.ties(cost_b, tolerance) {
        b.last_picked.load(Relaxed) < a.last_picked.load(Relaxed)
    } else {
        cost_b.total() < cost_a.total()
    };
    if b_wins { (b, cost_b) } else { (a, cost_a) }
}

#[cfg(test)]
mod tests;
