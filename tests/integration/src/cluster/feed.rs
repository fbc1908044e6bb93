//! The EndpointSlice controller stand-in: what it would publish for a Service's pods,
//! delivered after a propagation delay as `discovery.k8s.io/v1` EndpointSlices in the
//! API stand-in (where the proxies list and watch them, as in a cluster) and/or to an
//! in-process watcher (the kube-proxy stand-in).

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::apiserver::ApiServer;

/// One endpoint, with the conditions the EndpointSlice controller sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedEntry {
    /// Pod IP and port.
    pub address: SocketAddr,
    /// Pod name.
    pub name: String,
    /// Ready and not terminating.
    pub ready: bool,
    /// Ready, terminating or not.
    pub serving: bool,
    /// Being deleted.
    pub terminating: bool,
}

/// Where the controller writes a Service's EndpointSlices: the API stand-in, and what
/// it takes from the Service (name, namespace, port name and appProtocol).
#[derive(Clone, Debug)]
pub struct SliceWriter {
    api: Arc<ApiServer>,
    service: String,
    namespace: String,
    port_name: Option<String>,
    app_protocol: Option<String>,
}

impl SliceWriter {
    /// Writes the slices of `service` (as the operator builds it) into `api`.
    ///
    /// # Errors
    /// When the Service has no name or no port.
    pub fn new(api: Arc<ApiServer>, service: &Service) -> Result<Self, String> {
        let port = service
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .and_then(|p| p.first())
            .ok_or("the Service has no port")?;
        api.serve::<EndpointSlice>();
        Ok(Self {
            api,
            service: service
                .metadata
                .name
                .clone()
                .ok_or("the Service has no name")?,
            namespace: service
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".to_owned()),
            port_name: port.name.clone(),
            app_protocol: port.app_protocol.clone(),
        })
    }

    /// Makes the Service's slices say `entries`: one slice per target port (pods of
    /// two revisions may listen on different ones), each replaced as a whole, as the
    /// controller's updates are. A Service without endpoints keeps one empty slice.
    fn write(&self, entries: &[FeedEntry], written: &mut Vec<String>) {
        let mut by_port: BTreeMap<u16, Vec<&FeedEntry>> = BTreeMap::new();
        for entry in entries {
            by_port.entry(entry.address.port()).or_default().push(entry);
        }
        let mut names = Vec::new();
        if by_port.is_empty() {
            names.push(self.apply(&format!("{}-empty", self.service), None, &[]));
        }
        for (port, entries) in by_port {
            let name = format!("{}-{port}", self.service);
            names.push(self.apply(&name, Some(port), &entries));
        }
        // Slices of ports no pod uses any more go, after the new ones are in place.
        for gone in written.iter().filter(|n| !names.contains(n)) {
            self.api.delete::<EndpointSlice>(&self.namespace, gone);
        }
        *written = names;
    }

    fn apply(&self, name: &str, port: Option<u16>, entries: &[&FeedEntry]) -> String {
        let endpoints: Vec<Value> = entries
            .iter()
            .map(|e| {
                json!({
                    "addresses": [e.address.ip().to_string()],
                    "conditions": {
                        "ready": e.ready,
                        "serving": e.serving,
                        "terminating": e.terminating,
                    },
                    "targetRef": {"kind": "Pod", "namespace": self.namespace, "name": e.name},
                })
            })
            .collect();
        let ports: Vec<Value> = port
            .map(|port| {
                let mut p = json!({"port": port, "protocol": "TCP"});
                if let Some(name) = &self.port_name {
                    p["name"] = json!(name);
                }
                if let Some(protocol) = &self.app_protocol {
                    p["appProtocol"] = json!(protocol);
                }
                p
            })
            .into_iter()
            .collect();
        let slice = json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": {
                    "kubernetes.io/service-name": self.service,
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                },
            },
            "addressType": "IPv4",
            "ports": ports,
            "endpoints": endpoints,
        });
        if let Err(e) = self.api.apply_value(slice) {
            tracing::error!(slice = name, error = %e, "the API stand-in refused an EndpointSlice");
        }
        name.to_owned()
    }
}

/// Publishes endpoint sets, each after the propagation delay, in order.
#[derive(Clone, Debug)]
pub struct EndpointFeed {
    tx: mpsc::UnboundedSender<(Instant, Vec<FeedEntry>)>,
    last: watch::Receiver<Vec<FeedEntry>>,
}

impl EndpointFeed {
    /// Starts the feed: sets go to the Service's EndpointSlices through `slices` (an
    /// empty slice at once, as for a new Service) and to the watcher returned by
    /// [`EndpointFeed::subscribe`], `delay` after they are published.
    pub fn start(delay: Duration, slices: Option<SliceWriter>) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<FeedEntry>)>();
        let (out, last) = watch::channel(Vec::new());
        let mut written = Vec::new();
        if let Some(slices) = &slices {
            slices.write(&[], &mut written);
        }
        tokio::spawn(async move {
            while let Some((at, entries)) = rx.recv().await {
                tokio::time::sleep_until(at + delay).await;
                if let Some(slices) = &slices {
                    slices.write(&entries, &mut written);
                }
                out.send_replace(entries);
            }
        });
        Self { tx, last }
    }

    /// Queues `entries` for delivery after the delay.
    pub fn publish(&self, entries: Vec<FeedEntry>) {
        let _ = self.tx.send((Instant::now(), entries));
    }

    /// The delivered sets (what a watcher has seen).
    pub fn subscribe(&self) -> watch::Receiver<Vec<FeedEntry>> {
        self.last.clone()
    }
}
