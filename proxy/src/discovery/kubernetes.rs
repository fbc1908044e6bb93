//! Endpoints from the EndpointSlices of one Service, via kube-runtime's watcher.

use super::DiscoveryError;
use crate::endpoint::{Endpoint, EndpointSet};
use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use std::net::{IpAddr, SocketAddr};
use tokio::sync::watch;

pub(super) async fn watch(
    service: &str,
    namespace: Option<&str>,
    port_name: Option<&str>,
    tx: watch::Sender<EndpointSet>,
) -> Result<(), DiscoveryError> {
    let client = Client::try_default()
        .await
        .map_err(DiscoveryError::KubeClient)?;
    let api: Api<EndpointSlice> = match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::default_namespaced(client),
    };
    let config =
        watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
    let (store, writer) = reflector::store();
    // The watcher retries with backoff on its own; errors are logged, never fatal, and
    // the last published set stays in force meanwhile.
    let mut events = watcher(api, config)
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .boxed();
    let mut ready = false;
    let mut published = false;
    loop {
        let next = tokio::select! {
            next = events.next() => next,
            () = tx.closed() => return Ok(()),
        };
        match next {
            None => return Ok(()),
            Some(Err(e)) => {
                tracing::warn!(error = %e, service, "EndpointSlice watch failed; retrying")
            }
            Some(Ok(_)) => {}
        }
        if !ready {
            // Publish nothing until the first full list, or a partial view would look
            // like endpoints disappearing.
            if store.wait_until_ready().await.is_err() {
                return Ok(());
            }
            ready = true;
        }
        let slices: Vec<_> = store.state();
        let set = endpoints_from_slices(slices.iter().map(|s| s.as_ref()), port_name);
        let first = !published;
        published = true;
        tx.send_if_modified(|current| {
            let changed = first || *current != set;
            *current = set;
            changed
        });
    }
}

/// Merges several slices into one set. Conditions follow the EndpointSlice API: an unset
/// `ready` means ready, an unset `serving` means the value of `ready`.
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
        for endpoint in slice.endpoints.iter().flatten() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(value: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn merges_slices_maps_conditions_and_picks_the_named_port() {
        let a = slice(json!({
            "metadata": {"name": "web-abc"},
            "addressType": "IPv4",
            "ports": [{"name": "metrics", "port": 9090}, {"name": "http", "port": 8080}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true},
                 "targetRef": {"kind": "Pod", "name": "web-1"}, "zone": "europe-west1-b"},
                {"addresses": ["10.0.0.2"],
                 "conditions": {"ready": false, "serving": true, "terminating": true}}
            ]
        }));
        let b = slice(json!({
            "metadata": {"name": "web-def"},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["10.0.0.3"]}]
        }));
        let fqdn = slice(json!({
            "metadata": {"name": "web-fqdn"}, "addressType": "FQDN",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["example.com"]}]
        }));
        let set = endpoints_from_slices([&a, &b, &fqdn].into_iter(), Some("http"));
        let got: Vec<_> = set
            .iter()
            .map(|e| {
                (
                    e.address.to_string(),
                    e.name.clone(),
                    e.ready,
                    e.serving,
                    e.terminating,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "10.0.0.1:8080".into(),
                    Some("web-1".into()),
                    true,
                    true,
                    false
                ),
                ("10.0.0.2:8080".into(), None, false, true, true),
                ("10.0.0.3:8080".into(), None, true, true, false),
            ]
        );
        assert_eq!(
            set.iter().next().unwrap().zone.as_deref(),
            Some("europe-west1-b")
        );
    }
}
