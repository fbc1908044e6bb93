//! What discovery knows about a backend: its address and its conditions.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// One backend (an app pod's address and port) as discovery reports it, with the
/// EndpointSlice conditions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// Pod IP and port.
    pub address: SocketAddr,
    /// Pod name, when known (EndpointSlice `targetRef`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Ready for new requests.
    #[serde(default = "yes")]
    pub ready: bool,
    /// Able to serve, even if terminating.
    #[serde(default = "yes")]
    pub serving: bool,
    /// Being deleted.
    #[serde(default)]
    pub terminating: bool,
    /// Topology zone, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

/// The whole set of backends at one moment, sorted by address, without duplicates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointSet(Vec<Endpoint>);

fn yes() -> bool {
    true
}

impl Endpoint {
    /// A ready, serving endpoint with no name.
    pub fn ready(address: SocketAddr) -> Self {
        Self {
            address,
            name: None,
            ready: true,
            serving: true,
            terminating: false,
            zone: None,
        }
    }
}

impl EndpointSet {
    /// Builds a set; when an address appears twice the later entry wins.
    pub fn new(mut endpoints: Vec<Endpoint>) -> Self {
        endpoints.reverse();
        endpoints.sort_by_key(|e| e.address);
        endpoints.dedup_by_key(|e| e.address);
        Self(endpoints)
    }

    /// The endpoints, sorted by address.
    pub fn iter(&self) -> impl Iterator<Item = &Endpoint> {
        self.0.iter()
    }

    /// True when `address` is in the set (binary search: the set is sorted).
    pub fn contains(&self, address: SocketAddr) -> bool {
        self.0.binary_search_by_key(&address, |e| e.address).is_ok()
    }

    /// Number of endpoints.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there is no endpoint.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_duplicate_wins_and_set_is_sorted() {
        let a: SocketAddr = "127.0.0.3:80".parse().unwrap();
        let b: SocketAddr = "127.0.0.2:80".parse().unwrap();
        let mut stale = Endpoint::ready(a);
        stale.ready = false;
        let set = EndpointSet::new(vec![stale, Endpoint::ready(b), Endpoint::ready(a)]);
        let got: Vec<_> = set.iter().map(|e| (e.address, e.ready)).collect();
        assert_eq!(got, vec![(b, true), (a, true)]);
    }
}
