//! Selection: which of a service's eligible endpoints gets a request. One file per
//! algorithm behind one trait, [`Select`], as pingora-load-balancing puts each
//! algorithm behind `BackendSelection`; the registry filters the candidates (ready, not
//! draining, not ejected, not tried) and the algorithm only chooses among them.
//! Session affinity's consistent hash with bounded loads,
//! [`affinity::BoundedLoadHash`], is one more [`Select`]: it walks the ring over the same
//! candidates and hands over to the configured algorithm when no endpoint on it is
//! under its bound. Zone-aware routing ([`zone`]) decides the zone before the
//! algorithm chooses within it.

pub mod affinity;
mod least_request;
mod p2c;
mod round_robin;
pub mod zone;

pub(crate) use p2c::Cost;

use crate::registry::{Algorithm, EndpointState};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// What one selection knows besides its candidates.
#[derive(Debug)]
pub struct Pick {
    /// The caller's clock reading.
    pub now: Instant,
    /// The slow-start ramp.
    pub warmup: Duration,
    /// Sequence number of this selection (P2C's probe turns and tie-breaks).
    pub picks: u64,
    /// Randomness for this selection, drawn from the registry's seeded stream.
    pub rng: fastrand::Rng,
}

/// A selection algorithm.
pub trait Select {
    /// Picks one of `candidates`, of which there are at least two.
    fn select<'a>(
        &self,
        candidates: &[&'a Arc<EndpointState>],
        pick: &mut Pick,
    ) -> &'a Arc<EndpointState>;
}

/// The configured algorithm.
#[derive(Debug)]
pub enum Balancer {
    /// See [`Algorithm::P2cEwma`].
    P2cEwma(p2c::PeakEwmaP2c),
    /// See [`Algorithm::LeastRequest`].
    LeastRequest(least_request::LeastRequest),
    /// See [`Algorithm::RoundRobin`].
    RoundRobin(round_robin::RoundRobin),
}

impl Balancer {
    /// The balancer for `algorithm`.
    pub fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::P2cEwma => Self::P2cEwma(p2c::PeakEwmaP2c),
            Algorithm::LeastRequest => Self::LeastRequest(least_request::LeastRequest),
            Algorithm::RoundRobin => Self::RoundRobin(round_robin::RoundRobin::default()),
        }
    }

    /// Whether its cost has a latency term (peak-EWMA): zone routing then weighs an
    /// endpoint's capacity by its latency too, not only by its slow-start weight.
    pub fn prices_latency(&self) -> bool {
        matches!(self, Self::P2cEwma(_))
    }
}

impl Select for Balancer {
    fn select<'a>(
        &self,
        candidates: &[&'a Arc<EndpointState>],
        pick: &mut Pick,
    ) -> &'a Arc<EndpointState> {
        match self {
            Self::P2cEwma(b) => b.select(candidates, pick),
            Self::LeastRequest(b) => b.select(candidates, pick),
            Self::RoundRobin(b) => b.select(candidates, pick),
        }
    }
}
