//! Discovery turns a source of backends into a stream of whole [`EndpointSet`]s on a
//! `watch` channel. Nothing downstream knows which source produced them.

mod file;
mod kubernetes;

use crate::endpoint::{Endpoint, EndpointSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::watch;

pub use file::parse_endpoints;
pub use kubernetes::watch_endpoint_slices;

/// Where backends come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A fixed list, all ready.
    Static(Vec<SocketAddr>),
    /// A JSON or YAML file, re-read when it changes.
    File(PathBuf),
    /// The EndpointSlices of a Kubernetes Service.
    Kubernetes {
        /// Service whose EndpointSlices to watch (`kubernetes.io/service-name`).
        service: String,
        /// Its namespace; the pod's own namespace when unset.
        namespace: Option<String>,
    },
}

/// Where one listener's endpoint sets go: the endpoints on one backend port.
#[derive(Debug)]
pub struct PortFeed {
    /// The EndpointSlice port name; the first port of each slice when `None`.
    pub port_name: Option<String>,
    /// The listener's registry is fed from the other end.
    pub tx: watch::Sender<EndpointSet>,
}

/// Why discovery stopped.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The Kubernetes client could not be configured.
    #[error("cannot configure the Kubernetes client")]
    KubeClient(#[source] kube::Error),
}

/// Publishes the endpoints of the proxies' own Service (`--proxy-service`: every proxy
/// pod, with its name and zone, on the Service's first port) into `tx` until its
/// receiver is gone, with the same watch as [`run`]'s Kubernetes source. Zone-aware
/// routing reads this proxy's zone and the proxies' spread from it.
///
/// # Errors
/// Only when the Kubernetes client cannot be configured.
pub async fn run_proxies(
    service: &str,
    namespace: Option<&str>,
    tx: watch::Sender<EndpointSet>,
) -> Result<(), DiscoveryError> {
    let client = kube::Client::try_default()
        .await
        .map_err(DiscoveryError::KubeClient)?;
    let feed = PortFeed {
        port_name: None,
        tx,
    };
    watch_endpoint_slices(client, service, namespace, vec![feed]).await;
    Ok(())
}

/// Publishes endpoint sets from `source` into every port's feed until the receivers
/// are gone. A source that fails transiently keeps the last good set and retries.
///
/// Kubernetes feeds every port from one watch, each its own port's endpoints. A static
/// list or a file names one port per address, so it feeds the first port only (the
/// configuration refuses more than one with them).
///
/// # Errors
/// Only when the source cannot start at all.
pub async fn run(source: Source, ports: Vec<PortFeed>) -> Result<(), DiscoveryError> {
    match source {
        Source::Static(addresses) => {
            let Some(port) = ports.into_iter().next() else {
                return Ok(());
            };
            port.tx.send_replace(EndpointSet::new(
                addresses.into_iter().map(Endpoint::ready).collect(),
            ));
            port.tx.closed().await;
            Ok(())
        }
        Source::File(path) => {
            if let Some(port) = ports.into_iter().next() {
                file::watch(&path, Duration::from_millis(200), port.tx).await;
            }
            Ok(())
        }
        Source::Kubernetes { service, namespace } => {
            // KUBECONFIG when set (local runs, the test stand-in), in-cluster otherwise.
            let client = kube::Client::try_default()
                .await
                .map_err(DiscoveryError::KubeClient)?;
            watch_endpoint_slices(client, &service, namespace.as_deref(), ports).await;
            Ok(())
        }
    }
}
