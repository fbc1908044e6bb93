//! Zone-aware routing at selection time: the registry's candidates narrowed to the zone
//! [`crate::balance::zone`] decides, and the count of where requests went. Nothing here
//! runs unless the listener's registry was given a [`ZoneRouting`].

use super::EndpointState;
use crate::balance::zone::{self, Locality};
use arc_swap::ArcSwapOption;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use smallvec::SmallVec;
use std::sync::Arc;

/// Labels of `ballast_zone_requests_total`: `locality`, `zone` and, on a named
/// listener, `port`.
pub type ZoneLabels = Vec<(&'static str, String)>;

/// The `zone` label of endpoints without a zone.
const NO_ZONE: &str = "unknown";

/// What every listener's zone routing shares.
#[derive(Debug, Default)]
pub struct ZoneState {
    /// This proxy's zone and the proxies' spread; `None` until known, and routing is
    /// then as if it were off.
    pub locality: ArcSwapOption<Locality>,
    /// `ballast_zone_requests_total`: requests by locality (`same`, `cross`) and the
    /// endpoint's zone.
    pub requests: Family<ZoneLabels, Counter>,
}

/// One listener's zone routing.
#[derive(Clone, Debug)]
pub struct ZoneRouting {
    shared: Arc<ZoneState>,
    port: Option<String>,
}

/// The zones of a snapshot's endpoints, built with it, so selection reads indices.
#[derive(Debug, Default)]
pub struct ZoneTable {
    /// Each zone's name; `None` for endpoints without a zone.
    names: Vec<Option<Arc<str>>>,
    /// The zone of each listed endpoint, in the snapshot's order.
    of: Vec<usize>,
    /// Per zone, the counters of requests sent there: same zone, cross zone.
    counters: Vec<[Counter; 2]>,
}

/// What to count once the endpoint is chosen.
#[derive(Debug)]
pub(super) struct Counted<'a> {
    table: &'a ZoneTable,
    local: usize,
}

/// The registry's candidates for one selection.
pub(super) type Candidates<'a> = SmallVec<[&'a Arc<EndpointState>; 32]>;

impl ZoneRouting {
    /// Zone routing of the listener with EndpointSlice port `port`, over `shared`.
    pub fn new(shared: Arc<ZoneState>, port: Option<String>) -> Self {
        Self { shared, port }
    }

    /// The zone table of `endpoints` (sorted by address, as the snapshot holds them),
    /// with their zones as discovery reported them.
    pub(super) fn table<'a>(&self, zones: impl Iterator<Item = Option<&'a str>>) -> ZoneTable {
        let mut table = ZoneTable::default();
        for zone in zones {
            let index = match table.names.iter().position(|n| n.as_deref() == zone) {
                Some(index) => index,
                None => {
                    let counter = |locality: &'static str| {
                        let mut labels = vec![
                            ("locality", locality.to_owned()),
                            ("zone", zone.unwrap_or(NO_ZONE).to_owned()),
                        ];
                        if let Some(port) = &self.port {
                            labels.push(("port", port.clone()));
                        }
                        self.shared.requests.get_or_create(&labels).clone()
                    };
                    table.names.push(zone.map(Arc::from));
                    table.counters.push([counter("same"), counter("cross")]);
                    table.names.len() - 1
                }
            };
            table.of.push(index);
        }
        table
    }

    /// Narrows `candidates` (at least one) to the zone this request goes to, or leaves
    /// them all when that zone has none. `measure` gives a candidate's fresh latency
    /// estimate, if any, and its slow-start weight. `None`, with nothing narrowed, while
    /// this proxy's zone is unknown.
    pub(super) fn narrow<'t>(
        &self,
        table: &'t ZoneTable,
        endpoints: &[Arc<EndpointState>],
        candidates: &mut Candidates<'_>,
        measure: impl Fn(&EndpointState) -> (Option<f64>, f64),
        rng: &mut fastrand::Rng,
    ) -> Option<Counted<'t>> {
        let locality = self.shared.locality.load();
        let locality = locality.as_deref()?;
        let named = table.names.len();
        // Two more slots: the local zone when no endpoint is listed in it, and the
        // proxies in zones without endpoints (their traffic is spread like anyone's).
        let local = table
            .names
            .iter()
            .position(|n| n.as_deref() == Some(&*locality.zone))
            .unwrap_or(named);
        let elsewhere = named + 1;
        let measured: SmallVec<[(usize, Option<f64>, f64); 32]> = candidates
            .iter()
            .map(|c| {
                let (latency, weight) = measure(c);
                (
                    table.zone_of(endpoints, c).unwrap_or(local),
                    latency,
                    weight,
                )
            })
            .collect();
        let fastest = measured
            .iter()
            .filter_map(|&(_, latency, _)| latency)
            .fold(f64::INFINITY, f64::min);
        let fastest = if fastest.is_finite() { fastest } else { 0.0 };
        let mut capacity: SmallVec<[f64; 8]> = SmallVec::from_elem(0.0, named + 2);
        for (zone, latency, weight) in &measured {
            capacity[*zone] += zone::capacity(*latency, *weight, fastest);
        }
        let proxies = match &locality.proxies {
            Some(spread) => {
                let mut proxies: SmallVec<[f64; 8]> = SmallVec::from_elem(0.0, named + 2);
                let mut assigned = 0;
                for (index, name) in table.names.iter().enumerate() {
                    let n = name.as_deref().map_or(0, |z| proxies_in(spread, z));
                    proxies[index] = f64::from(n);
                    assigned += n;
                }
                if local == named {
                    let n = proxies_in(spread, &locality.zone);
                    proxies[named] = f64::from(n);
                    assigned += n;
                }
                let total: u32 = spread.iter().map(|(_, n)| n).sum();
                proxies[elsewhere] = f64::from(total.saturating_sub(assigned));
                proxies
            }
            None => {
                let unzoned = table.names.iter().position(Option::is_none);
                zone::even_spread(&capacity, local, unzoned)
            }
        };
        let route = zone::route(&capacity, &proxies, local);
        let chosen = route.choose(local, rng);
        if measured.iter().any(|&(zone, ..)| zone == chosen)
            && measured.iter().any(|&(zone, ..)| zone != chosen)
        {
            let mut zones = measured.iter().map(|&(zone, ..)| zone);
            candidates.retain(|_| zones.next() == Some(chosen));
        }
        Some(Counted { table, local })
    }
}

fn proxies_in(spread: &[(Arc<str>, u32)], zone: &str) -> u32 {
    spread
        .iter()
        .find(|(z, _)| &**z == zone)
        .map_or(0, |(_, n)| *n)
}

impl ZoneTable {
    /// The zone index of `endpoint`, one of `endpoints` (the snapshot's, sorted by
    /// address).
    fn zone_of(&self, endpoints: &[Arc<EndpointState>], endpoint: &EndpointState) -> Option<usize> {
        let position = endpoints
            .binary_search_by_key(&endpoint.address, |e| e.address)
            .ok()?;
        self.of.get(position).copied()
    }
}

impl Counted<'_> {
    /// Counts a request sent to `endpoint`.
    pub(super) fn count(&self, endpoints: &[Arc<EndpointState>], endpoint: &EndpointState) {
        if let Some(zone) = self.table.zone_of(endpoints, endpoint) {
            let locality = usize::from(zone != self.local);
            self.table.counters[zone][locality].inc();
        }
    }
}

#[cfg(test)]
mod tests;
