//! Least request: P2C over in-flight requests divided by the slow-start weight.

use super::p2c::p2c;
use super::{Pick, Select};
use crate::registry::EndpointState;
use std::sync::Arc;

/// P2C over in-flight requests; equal loads take turns.
#[derive(Debug, Default)]
pub struct LeastRequest;

impl Select for LeastRequest {
    fn select<'a>(
        &self,
        candidates: &[&'a Arc<EndpointState>],
        pick: &mut Pick,
    ) -> &'a Arc<EndpointState> {
        let (now, warmup) = (pick.now, pick.warmup);
        p2c(candidates, candidates.len(), 1.0, &mut pick.rng, |e| {
            e.request_cost(now, warmup)
        })
        .0
    }
}
