//! Zone-aware routing's decision: which zone a request goes to, as a pure function of
//! what each zone's eligible endpoints can carry and how the proxies are spread over the
//! zones. Modelled on Envoy's zone-aware routing and Kubernetes'
//! `trafficDistribution: PreferSameZone`, with Envoy's spill-over so that no zone's pods
//! sit idle.
//!
//! Each proxy compares two shares of its own zone: the *upstream* share (its zone's part
//! of the endpoints' capacity) and the *origin* share (its zone's part of the proxies,
//! hence of the traffic, when clients spread evenly over the proxies). When the upstream
//! share is at least the origin share, every request stays in the zone. Otherwise the
//! zone takes `upstream / origin` of the requests, and the rest go to the zones with
//! more capacity than traffic of their own, each in proportion to that surplus. Summed
//! over every proxy, each zone then receives its capacity share of the traffic: a zone
//! without proxies gets exactly its surplus, so it never starves.

use smallvec::SmallVec;
use std::sync::Arc;

/// A local share of at least this fraction of the origin share keeps every request in
/// the zone: latency estimates carry noise, and spilling 1-2% of the requests across
/// zones for it would cost more than the imbalance it corrects.
pub const LOCAL_TOLERANCE: f64 = 0.05;

/// Latency estimates within this ratio of the fastest count as equally fast (the tie
/// band P2C uses, [`super::p2c::EWMA_TOLERANCE`]): only a clearly slower endpoint
/// carries less.
pub const CAPACITY_TOLERANCE: f64 = super::p2c::EWMA_TOLERANCE;

/// Where requests go: their zone, as an index into the caller's zones.
#[derive(Clone, Debug, PartialEq)]
pub enum Route {
    /// Every request stays in the local zone.
    Local,
    /// A request stays local with probability `local`; otherwise it goes to a zone
    /// drawn in proportion to `surplus` (0 for the local zone and for zones without
    /// spare capacity).
    Spill {
        /// Probability of staying in the local zone.
        local: f64,
        /// Weight of each zone for the requests that leave.
        surplus: SmallVec<[f64; 8]>,
    },
}

/// This proxy's zone and the proxies' spread over the zones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Locality {
    /// The zone this proxy runs in.
    pub zone: Arc<str>,
    /// Proxy pods per zone, this one included; `None` when unknown (only `--zone`
    /// given), in which case the proxies are assumed to be spread evenly over the zones
    /// that have endpoints.
    pub proxies: Option<Vec<(Arc<str>, u32)>>,
}

/// One proxy pod of the proxies' Service: its name and zone.
#[derive(Clone, Copy, Debug)]
pub struct Peer<'a> {
    /// The pod name (EndpointSlice `targetRef`).
    pub pod: Option<&'a str>,
    /// Its zone.
    pub zone: Option<&'a str>,
}

impl Locality {
    /// What the proxies' EndpointSlices say: this proxy's zone is `zone` when given,
    /// else the zone of the peer named `pod`; every listed peer with a zone counts in
    /// the spread, and this proxy always counts, listed or not. `None` while this
    /// proxy's zone is unknown (its pod not listed yet, or listed without a zone).
    pub fn from_peers<'a>(
        peers: impl IntoIterator<Item = Peer<'a>>,
        pod: Option<&str>,
        zone: Option<&str>,
    ) -> Option<Self> {
        let mut counts: Vec<(Arc<str>, u32)> = Vec::new();
        let mut own = None;
        for peer in peers {
            let is_self = pod.is_some() && peer.pod == pod;
            if is_self {
                own = Some(peer.zone);
            }
            let Some(peer_zone) = peer.zone else {
                continue;
            };
            // This proxy counts in its own zone, which `--zone` may say differently.
            let counted = if is_self {
                zone.unwrap_or(peer_zone)
            } else {
                peer_zone
            };
            match counts.iter_mut().find(|(z, _)| &**z == counted) {
                Some((_, n)) => *n += 1,
                None => counts.push((counted.into(), 1)),
            }
        }
        let local = zone.or(own.flatten())?;
        if own.flatten().is_none() {
            // Not listed (or listed without a zone): it still takes its share of clients.
            match counts.iter_mut().find(|(z, _)| &**z == local) {
                Some((_, n)) => *n += 1,
                None => counts.push((local.into(), 1)),
            }
        }
        counts.sort();
        Some(Self {
            zone: local.into(),
            proxies: Some(counts),
        })
    }

    /// Proxies in `zone`, when the spread is known.
    pub fn proxies_in(&self, zone: &str) -> Option<u32> {
        let proxies = self.proxies.as_ref()?;
        Some(
            proxies
                .iter()
                .find(|(z, _)| &**z == zone)
                .map_or(0, |(_, n)| *n),
        )
    }
}

/// What one endpoint can carry, relative to its peers: its slow-start weight, scaled
/// down by how much slower its latency estimate is than `fastest` beyond
/// [`CAPACITY_TOLERANCE`]. `latency` is `None` when there is no fresh estimate (never
/// measured, or not for a while: the endpoint gets no traffic from this proxy), which
/// counts as fast: an estimate that ages unsampled would otherwise decay to look faster
/// and faster, or keep a stall forever.
pub fn capacity(latency: Option<f64>, weight: f64, fastest: f64) -> f64 {
    match latency {
        Some(latency) if latency > 0.0 && fastest > 0.0 => {
            weight * (CAPACITY_TOLERANCE * fastest / latency).min(1.0)
        }
        _ => weight,
    }
}

/// The proxies per zone when their spread is unknown: one in each zone whose
/// `capacity` is positive, except `unzoned` (endpoints without a zone have no proxies),
/// and one in the `local` zone, which has this proxy whatever its endpoints.
pub fn even_spread(capacity: &[f64], local: usize, unzoned: Option<usize>) -> SmallVec<[f64; 8]> {
    capacity
        .iter()
        .enumerate()
        .map(|(zone, &c)| {
            if zone == local || (c > 0.0 && Some(zone) != unzoned) {
                1.0
            } else {
                0.0
            }
        })
        .collect()
}

/// The route for requests from the `local` zone, given each zone's endpoint `capacity`
/// and `proxies` (slices of the same length; a zone may have one and not the other).
/// With nothing to compare (no capacity, no proxies) everything stays local and the
/// caller's fallback applies.
pub fn route(capacity: &[f64], proxies: &[f64], local: usize) -> Route {
    let total_capacity: f64 = capacity.iter().sum();
    let total_proxies: f64 = proxies.iter().sum();
    if total_capacity <= 0.0 || total_proxies <= 0.0 {
        return Route::Local;
    }
    let upstream = |zone: usize| capacity.get(zone).copied().unwrap_or(0.0) / total_capacity;
    let origin = |zone: usize| proxies.get(zone).copied().unwrap_or(0.0) / total_proxies;
    let (local_upstream, local_origin) = (upstream(local), origin(local));
    if local_upstream >= local_origin * (1.0 - LOCAL_TOLERANCE) {
        return Route::Local;
    }
    let surplus = (0..capacity.len().max(proxies.len()))
        .map(|zone| {
            if zone == local {
                0.0
            } else {
                (upstream(zone) - origin(zone)).max(0.0)
            }
        })
        .collect();
    Route::Spill {
        // local_origin > local_upstream >= 0 here.
        local: local_upstream / local_origin,
        surplus,
    }
}

impl Route {
    /// The zone of one request.
    pub fn choose(&self, local: usize, rng: &mut fastrand::Rng) -> usize {
        let Self::Spill { local: p, surplus } = self else {
            return local;
        };
        if rng.f64() < *p {
            return local;
        }
        let total: f64 = surplus.iter().sum();
        if total <= 0.0 {
            // Only float rounding gets here (some zone always has the surplus that
            // matches the local deficit).
            return local;
        }
        let mut draw = rng.f64() * total;
        for (zone, &weight) in surplus.iter().enumerate() {
            if weight > 0.0 {
                if draw < weight {
                    return zone;
                }
                draw -= weight;
            }
        }
        // Rounding at the very top: the last zone with a surplus.
        surplus.iter().rposition(|&w| w > 0.0).unwrap_or(local)
    }

    /// Share of the requests that stay local.
    pub fn local_share(&self) -> f64 {
        match self {
            Self::Local => 1.0,
            Self::Spill { local, .. } => *local,
        }
    }
}

#[cfg(test)]
mod tests;
