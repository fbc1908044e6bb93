//! Power of two choices (P2C) over peak-EWMA latency times load, as linkerd2-proxy's
//! balancer does; the pair comparison is shared with least-request.

use super::{Pick, Select};
use crate::registry::EndpointState;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

/// Peak-EWMA costs closer than this ratio count as equal (see [`p2c()`]).
pub(crate) const EWMA_TOLERANCE: f64 = 1.5;

/// What P2C compares: a per-request price (latency estimate, or 1, divided by the
/// slow-start weight) and the number of requests it would have to share with.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cost {
    pub(crate) speed: f64,
    pub(crate) load: u64,
    /// Priced as a probe: the estimate is missing or stale.
    pub(crate) probe: bool,
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
pub(super) fn p2c<'a>(
    candidates: &[&'a Arc<EndpointState>],
    n: usize,
    tolerance: f64,
    rng: &mut fastrand::Rng,
    cost: impl Fn(&EndpointState) -> Cost,
) -> (&'a Arc<EndpointState>, Cost) {
    let a = rng.usize(..n);
    let mut b = rng.usize(..n - 1);
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

/// P2C over the peak-EWMA cost (latency estimate x (pending + 1) / slow-start weight),
/// with probes for endpoints whose estimate is missing or stale.
#[derive(Debug, Default)]
pub struct PeakEwmaP2c;

impl Select for PeakEwmaP2c {
    fn select<'a>(
        &self,
        candidates: &[&'a Arc<EndpointState>],
        pick: &mut Pick,
    ) -> &'a Arc<EndpointState> {
        let n = candidates.len();
        let (now, warmup, picks) = (pick.now, pick.warmup, pick.picks);
        let (chosen, cost) = p2c(candidates, n, EWMA_TOLERANCE, &mut pick.rng, |e| {
            e.ewma_cost(now, warmup, picks, n)
        });
        chosen.picked(cost);
        chosen
    }
}
