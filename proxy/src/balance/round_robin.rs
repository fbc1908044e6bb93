//! Round robin: each candidate in turn.

use super::{Pick, Select};
use crate::registry::EndpointState;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Each candidate in turn (over whichever candidates each selection has).
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Select for RoundRobin {
    fn select<'a>(
        &self,
        candidates: &[&'a Arc<EndpointState>],
        _pick: &mut Pick,
    ) -> &'a Arc<EndpointState> {
        candidates[self.next.fetch_add(1, Relaxed) % candidates.len()]
    }
}
