//! Runtime state of every known endpoint, and per-request selection.
//!
//! Discovery updates arrive through [`Registry::apply`], which rebuilds an immutable
//! [`Snapshot`] and swaps it in; [`Registry::select`] reads the snapshot without a
//! global lock. Counters that the drain gate reads (in-flight requests and open
//! connections) live in atomics on each [`EndpointState`] (`endpoint.rs`); the drain
//! state machine is `drain.rs`; the choice among eligible endpoints is
//! [`crate::balance`].

mod drain;
mod endpoint;
mod ports;
mod zones;

pub use ballast_api::admin::{
    DrainReason, DrainRecord, DrainReport, EndpointReport, EndpointStatus, OpenCounts,
};
pub use ballast_api::settings::Algorithm;
pub use drain::DrainMark;
pub use endpoint::EndpointState;
pub use ports::{Port, Ports};
pub use zones::{ZoneLabels, ZoneRouting, ZoneState};

use crate::balance::affinity::BoundedLoadHash;
use crate::balance::{Balancer, Pick, Select};
use crate::endpoint::EndpointSet;
use crate::load::{EjectionPolicy, may_eject};
use arc_swap::ArcSwap;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

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

/// The endpoints discovery currently lists, as selection sees them.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Sorted by address.
    pub endpoints: Vec<Arc<EndpointState>>,
    /// Consistent-hash ring over `endpoints` (session affinity).
    pub ring: crate::balance::affinity::Ring,
    /// The zones of `endpoints` (empty without zone routing).
    pub zones: zones::ZoneTable,
}

impl Snapshot {
    /// True when discovery lists `address` (binary search: endpoints are sorted).
    pub fn lists(&self, address: SocketAddr) -> bool {
        self.endpoints
            .binary_search_by_key(&address, |e| e.address)
            .is_ok()
    }
}

/// Step of the selection seed stream (the golden ratio, as splitmix64 uses).
const SEED_STEP: u64 = 0x9e37_79b9_7f4a_7c15;

/// All endpoints, current and leaving.
#[derive(Debug)]
pub struct Registry {
    config: BalancerConfig,
    snapshot: ArcSwap<Snapshot>,
    /// Listed ones plus removed ones that still have requests or connections.
    all: Mutex<HashMap<SocketAddr, Arc<EndpointState>>>,
    updates: AtomicU64,
    balancer: Balancer,
    picks: AtomicU64,
    /// The selection randomness: each selection seeds its own `fastrand::Rng` from the
    /// next value of this stream (lock-free; deterministic with [`Registry::with_seed`]).
    seed: AtomicU64,
    /// A moment on both clocks, so wall-clock report times follow the (tokio) clock
    /// the caller passes in.
    anchor: (Instant, SystemTime),
    /// Finished drains, newest last.
    history: Mutex<VecDeque<DrainRecord>>,
    /// Zone-aware routing, when on.
    zones: Option<ZoneRouting>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Registry {
    /// An empty registry, its selection randomness seeded from entropy.
    pub fn new(config: BalancerConfig) -> Self {
        Self::with_seed(config, fastrand::u64(..))
    }

    /// An empty registry whose random choices follow from `seed` (for tests).
    pub fn with_seed(config: BalancerConfig, seed: u64) -> Self {
        Self {
            seed: AtomicU64::new(seed),
            anchor: (Instant::now(), SystemTime::now()),
            balancer: Balancer::new(config.algorithm),
            config,
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            all: Mutex::new(HashMap::new()),
            updates: AtomicU64::new(0),
            picks: AtomicU64::new(0),
            history: Mutex::new(VecDeque::new()),
            zones: None,
        }
    }

    /// This registry with zone-aware routing: each selection first decides the zone
    /// (see [`crate::balance::zone`]), once this proxy's zone is known.
    pub fn with_zone_routing(mut self, zones: ZoneRouting) -> Self {
        self.zones = Some(zones);
        self
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
                        since_wall: mark.map_or_else(|| self.wall(now), |m| m.since_wall),
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
                    since_wall: mark.map_or_else(|| self.wall(now), |m| m.since_wall),
                }));
            }
        }
        self.forget_idle(&mut all, now, |address| set.contains(address));
        let zones = self.zones.as_ref().map_or_else(Default::default, |z| {
            z.table(set.iter().map(|e| e.zone.as_deref()))
        });
        self.snapshot.store(Arc::new(Snapshot {
            ring: crate::balance::affinity::Ring::new(
                &listed.iter().map(|e| e.address).collect::<Vec<_>>(),
            ),
            endpoints: listed,
            zones,
        }));
    }

    /// Picks the endpoint for one request, skipping `tried`. Eligible: ready, not
    /// draining, not ejected. With none eligible, falls back to endpoints that are
    /// still serving while terminating (as kube-proxy does).
    pub fn select(&self, now: Instant, tried: &[SocketAddr]) -> Option<Arc<EndpointState>> {
        self.pick(now, tried, None).map(|(endpoint, _)| endpoint)
    }

    /// Picks the endpoint for a request with affinity key `key` (see
    /// [`crate::balance::affinity`]). Returns it and whether the key's own endpoint was
    /// passed over because it is draining, ejected or not ready (the key "moved").
    pub fn select_affine(
        &self,
        now: Instant,
        tried: &[SocketAddr],
        key: u64,
        load_factor: f64,
    ) -> Option<(Arc<EndpointState>, bool)> {
        self.pick(now, tried, Some((key, load_factor)))
    }

    /// The one selection path: the registry filters the candidates, zone routing (when
    /// on) narrows them to one zone, and the algorithm (or the consistent hash in front
    /// of it) chooses among them.
    fn pick(
        &self,
        now: Instant,
        tried: &[SocketAddr],
        affinity: Option<(u64, f64)>,
    ) -> Option<(Arc<EndpointState>, bool)> {
        let snapshot = self.snapshot.load();
        let untried = |e: &&Arc<EndpointState>| !tried.contains(&e.address);
        let eligible =
            |e: &EndpointState| !e.is_draining() && e.ready.load(Relaxed) && !e.is_ejected(now);
        // On the stack up to 32 endpoints: no allocation per request for most services.
        let mut candidates: zones::Candidates<'_> = snapshot
            .endpoints
            .iter()
            .filter(untried)
            .filter(|e| eligible(e))
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
        let draw = || fastrand::Rng::with_seed(self.seed.fetch_add(SEED_STEP, Relaxed));
        // Zone routing narrows the candidates to one zone first. Not for an affinity
        // key: its home endpoint is the same from every proxy in every zone.
        let mut rng = None;
        let mut counted = None;
        if let Some(zones) = &self.zones
            && affinity.is_none()
            && !candidates.is_empty()
        {
            let (warmup, latency) = (self.config.warmup, self.balancer.prices_latency());
            counted = zones.narrow(
                &snapshot.zones,
                &snapshot.endpoints,
                &mut candidates,
                |e| e.zone_inputs(now, warmup, latency),
                rng.insert(draw()),
            );
        }
        let picks = self.picks.fetch_add(1, Relaxed) + 1;
        let chosen = match candidates.len() {
            0 => return None,
            1 => candidates[0],
            _ => {
                let mut pick = Pick {
                    now,
                    warmup: self.config.warmup,
                    picks,
                    rng: rng.unwrap_or_else(draw),
                };
                match affinity {
                    Some((key, load_factor)) => BoundedLoadHash {
                        ring: &snapshot.ring,
                        listed: &snapshot.endpoints,
                        key,
                        load_factor,
                        otherwise: &self.balancer,
                    }
                    .select(&candidates, &mut pick),
                    None => self.balancer.select(&candidates, &mut pick),
                }
            }
        };
        if let Some(counted) = counted {
            counted.count(&snapshot.endpoints, chosen);
        }
        chosen.last_picked.store(picks, Relaxed);
        let moved = affinity.is_some_and(|(key, _)| {
            snapshot
                .ring
                .walk(key)
                .filter_map(|index| snapshot.endpoints.get(index))
                .find(|e| !tried.contains(&e.address))
                .is_some_and(|home| !eligible(home))
        });
        Some((chosen.clone(), moved))
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

    /// The wall-clock time of `now`, for reports.
    fn wall(&self, now: Instant) -> SystemTime {
        let (instant, wall) = self.anchor;
        wall + now.saturating_duration_since(instant)
    }

    /// Looks up an endpoint's state (listed or leaving).
    pub fn get(&self, address: SocketAddr) -> Option<Arc<EndpointState>> {
        lock(&self.all).get(&address).cloned()
    }
}

#[cfg(test)]
mod tests;
