//! Endpoints from the EndpointSlices of one Service, via kube-runtime's watcher.
//!
//! The watcher's own events drive a [`SliceCache`]: a re-list (`Init`, `InitApply`...,
//! `InitDone`) is buffered and replaces the whole set at its end, so a slice deleted
//! while the watch was broken disappears, and nothing partial is ever published;
//! `Apply` and `Delete` change one slice and publish at once.

use super::PortFeed;
use crate::endpoint::{Endpoint, EndpointSet};
use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::Event;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

/// Label the EndpointSlice controller puts on every slice of a Service.
const SERVICE_LABEL: &str = "kubernetes.io/service-name";

/// Publishes the endpoints of `service`'s EndpointSlices into every port's feed until
/// every receiver is gone, reading the API through `client`. One watch serves every
/// port: each feed gets the endpoints on its port, and only when they changed.
///
/// The first set is published when the initial list is complete (an empty Service
/// publishes an empty set, so the proxy can report ready with nothing to route to);
/// after that, every change that alters the endpoints is published as a whole set.
/// Errors never end it: they are logged, the watcher retries with kube's default
/// backoff, and the last published set stays in force meanwhile.
///
/// `namespace` defaults to the client's (the pod's own namespace in a cluster, the
/// kubeconfig context's namespace outside); a feed's `port_name` picks the slice port
/// by name, the first port when unset.
pub async fn watch_endpoint_slices(
    client: Client,
    service: &str,
    namespace: Option<&str>,
    ports: Vec<PortFeed>,
) {
    let api: Api<EndpointSlice> = match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::default_namespaced(client),
    };
    let config = watcher::Config::default().labels(&format!("{SERVICE_LABEL}={service}"));
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut cache = SliceCache::default();
    let mut published = false;
    let all_closed = futures::future::join_all(ports.iter().map(|p| p.tx.closed()));
    tokio::pin!(all_closed);
    loop {
        let next = tokio::select! {
            next = events.next() => next,
            _ = &mut all_closed => return,
        };
        let event = match next {
            // The watcher restarts itself; an end only comes with the runtime's.
            None => return,
            Some(Err(e)) => {
                tracing::warn!(service, error = %e, "EndpointSlice watch failed; keeping the last endpoints and retrying");
                continue;
            }
            Some(Ok(event)) => event,
        };
        if matches!(event, Event::InitDone) {
            tracing::info!(service, slices = cache.pending(), "EndpointSlices listed");
        }
        if !cache.apply(event) {
            continue;
        }
        // The first set is sent even when empty: receivers treat it as "discovery works".
        let first = !published;
        published = true;
        for port in &ports {
            let set = cache.endpoints(port.port_name.as_deref());
            port.tx.send_if_modified(|current| {
                let changed = first || *current != set;
                *current = set;
                changed
            });
        }
    }
}

/// The slices of one Service as the watcher's events describe them, keyed by name.
#[derive(Debug, Default)]
struct SliceCache {
    /// What the last complete list plus the events since then say.
    slices: BTreeMap<String, EndpointSlice>,
    /// A list in progress (between `Init` and `InitDone`).
    relist: Option<BTreeMap<String, EndpointSlice>>,
    /// A list has completed at least once.
    listed: bool,
}

impl SliceCache {
    /// Applies one watcher event; true when the set to publish may have changed (never
    /// in the middle of a list, never before the first list is complete).
    fn apply(&mut self, event: Event<EndpointSlice>) -> bool {
        match event {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(slice) => {
                // Without a preceding Init (not something the watcher does) the list
                // still must not leak out half done.
                self.relist
                    .get_or_insert_with(BTreeMap::new)
                    .insert(slice.name_any(), slice);
                false
            }
            Event::InitDone => {
                self.slices = self.relist.take().unwrap_or_default();
                self.listed = true;
                true
            }
            Event::Apply(slice) => {
                self.slices.insert(slice.name_any(), slice);
                self.listed && self.relist.is_none()
            }
            Event::Delete(slice) => {
                let removed = self.slices.remove(&slice.name_any()).is_some();
                removed && self.listed && self.relist.is_none()
            }
        }
    }

    /// Slices buffered by the list in progress.
    fn pending(&self) -> usize {
        self.relist.as_ref().map_or(0, BTreeMap::len)
    }

    /// The endpoints of every slice, merged.
    fn endpoints(&self, port_name: Option<&str>) -> EndpointSet {
        endpoints_from_slices(self.slices.values(), port_name)
    }
}

/// Merges several slices into one set. Conditions follow the EndpointSlice API: an unset
/// `ready` means ready, an unset `serving` means the value of `ready`. An address in
/// two slices (a pod moving between them) appears once: the slice later by name wins.
pub(crate) fn endpoints_from_slices<'a>(
    slices: impl Iterator<Item = &'a EndpointSlice>,
    port_name: Option<&str>,
) -> EndpointSet {
    let mut out = Vec::new();
    for slice in slices {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        let port = slice.ports.iter().flatten().find(|p| match port_name {
            Some(name) => p.name.as_deref() == Some(name),
            None => true,
        });
        let Some(port) = port
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for endpoint in slice.endpoints.items() {
            let Some(ip) = endpoint
                .addresses
                .first()
                .and_then(|a| a.parse::<IpAddr>().ok())
            else {
                continue;
            };
            let conditions = endpoint.conditions.as_ref();
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let name = endpoint
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.clone());
            out.push(Endpoint {
                address: SocketAddr::new(ip, port),
                name,
                ready,
                serving: conditions.and_then(|c| c.serving).unwrap_or(ready),
                terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
                zone: endpoint.zone.clone(),
            });
        }
    }
    EndpointSet::new(out)
}

/// `EndpointSlice.endpoints` is required in the 1.33-1.35 API and optional from 1.36;
/// the workspace picks the API version, so read it either way.
trait Items<T> {
    fn items(&self) -> &[T];
}

impl<T> Items<T> for Vec<T> {
    fn items(&self) -> &[T] {
        self
    }
}

impl<T> Items<T> for Option<Vec<T>> {
    fn items(&self) -> &[T] {
        self.as_deref().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests;
