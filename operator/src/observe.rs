//! What the operator reads from the cluster besides its own objects: the app pods and
//! what every ready proxy replica reports on its admin port (`/endpoints`, `/drains`).
//! The types are the subset of the proxy's JSON the operator uses; the decisions over
//! them are pure functions in `gate` and `rollout`.

use ballast_api::admin::{self, DrainRecord, EndpointReport};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Pod;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// The pod condition of the readiness gate.
pub const ROUTABLE_CONDITION: &str = ballast_api::meta::ROUTABLE_CONDITION;

/// An app pod, as the gate and the rollout tracking see it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppPod {
    /// Pod name.
    pub name: String,
    /// Pod IP, once it has one.
    pub ip: Option<IpAddr>,
    /// Its `ballast.dev/revision` label.
    pub revision: Option<String>,
    /// Being deleted (has a deletion timestamp).
    pub deleting: bool,
    /// Current value of the `ballast.dev/routable` condition, if set.
    pub routable: Option<bool>,
    /// Its message.
    pub routable_message: Option<String>,
    /// Its spec has the `ballast.dev/routable` readiness gate (and so the drain gate):
    /// false only for an adopted Deployment's pods started before ballast's first apply.
    pub gated: bool,
    /// Its `Ready` condition is True.
    pub ready: bool,
    /// Taken out of the proxies' rotation by the operator ahead of its deletion, since
    /// this Unix second: its `ballast.dev/backend` label is `retired-<second>` (see
    /// `adopt`).
    pub retired: Option<i64>,
}

impl AppPod {
    /// The fields of `pod` the operator uses.
    pub fn from_pod(pod: &Pod) -> Self {
        let status = pod.status.as_ref();
        let routable = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == ROUTABLE_CONDITION));
        Self {
            name: pod.metadata.name.clone().unwrap_or_default(),
            ip: status
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse().ok()),
            revision: crate::build::revision_of(&pod.metadata).cloned(),
            deleting: pod.metadata.deletion_timestamp.is_some(),
            routable: routable.map(|c| c.status == "True"),
            routable_message: routable.and_then(|c| c.message.clone()),
            gated: pod
                .spec
                .as_ref()
                .and_then(|s| s.readiness_gates.as_ref())
                .is_some_and(|g| g.iter().any(|g| g.condition_type == ROUTABLE_CONDITION)),
            ready: status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
            // Only a value the operator wrote: anything else read as "retired at 0"
            // would count as drained at once (its drain timeout long past), letting a
            // gate open while the pod still serves requests.
            retired: pod
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(crate::build::BACKEND_LABEL))
                .and_then(|v| v.strip_prefix(crate::adopt::RETIRED_PREFIX))
                .and_then(|s| s.parse().ok()),
        }
    }
}

/// A proxy replica that is ready: the ones whose view gates app pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyPod {
    /// Pod name.
    pub name: String,
    /// Its admin listener.
    pub admin: SocketAddr,
}

impl ProxyPod {
    /// `Some` for a ready, running proxy pod with an IP. The admin port is the
    /// container port named `admin`, else `default_port`.
    pub fn from_pod(pod: &Pod, default_port: i32) -> Option<Self> {
        if pod.metadata.deletion_timestamp.is_some() {
            return None;
        }
        let status = pod.status.as_ref()?;
        let ready = status
            .conditions
            .as_ref()?
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        let ip: IpAddr = status.pod_ip.as_deref()?.parse().ok()?;
        let port = pod
            .spec
            .as_ref()
            .into_iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some("admin"))
            .map_or(default_port, |p| p.container_port);
        let port = u16::try_from(port).ok()?;
        ready.then(|| Self {
            name: pod.metadata.name.clone().unwrap_or_default(),
            admin: SocketAddr::new(ip, port),
        })
    }
}

/// The pod of a proxy's endpoint row: the EndpointSlice's name, else the app pod with
/// that IP. A pod serving several ports has one row per port (same IP, another port
/// number, `port` naming it): whatever is per pod (in flight, connections, requests,
/// drains) is summed over the rows this maps to the same pod.
pub fn endpoint_pod(endpoint: &EndpointReport, pods: &[AppPod]) -> Option<String> {
    pod_key(endpoint.pod.as_ref(), endpoint.address, pods)
}

/// The pod of a finished drain: the EndpointSlice's name, else the app pod with that
/// IP.
pub fn drained_pod(drain: &DrainRecord, pods: &[AppPod]) -> Option<String> {
    pod_key(drain.pod.as_ref(), drain.address, pods)
}

fn pod_key(name: Option<&String>, address: SocketAddr, pods: &[AppPod]) -> Option<String> {
    name.cloned().or_else(|| {
        let ip = address.ip();
        pods.iter()
            .find(|p| p.ip == Some(ip))
            .map(|p| p.name.clone())
    })
}

/// What one ready proxy replica reported.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProxyReport {
    /// `/endpoints`.
    pub endpoints: Vec<EndpointReport>,
    /// `/drains`.
    pub drains: Vec<DrainRecord>,
}

/// One ready proxy replica and its report, or why it could not be read.
#[derive(Clone, Debug, PartialEq)]
pub struct ProxyObservation {
    /// Pod name.
    pub proxy: String,
    /// The report, or the error text.
    pub report: Result<ProxyReport, String>,
}

/// Reads the proxies' admin endpoints, over plain HTTP with a short timeout.
#[derive(Clone, Debug)]
pub struct ProxyReader {
    client: Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
}

impl ProxyReader {
    /// A reader giving each call `timeout`.
    pub fn new(timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            timeout,
        }
    }

    /// Reads every proxy concurrently.
    pub async fn observe(&self, proxies: &[ProxyPod]) -> Vec<ProxyObservation> {
        futures::future::join_all(proxies.iter().map(|proxy| async move {
            let report = async {
                Ok(ProxyReport {
                    endpoints: self.get(proxy.admin, admin::ENDPOINTS).await?,
                    drains: self.get(proxy.admin, admin::DRAINS).await?,
                })
            }
            .await;
            ProxyObservation {
                proxy: proxy.name.clone(),
                report,
            }
        }))
        .await
    }

    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        admin: SocketAddr,
        path: &str,
    ) -> Result<T, String> {
        let uri: http::Uri = format!("http://{admin}{path}")
            .parse()
            .map_err(|e| format!("{admin}{path}: {e}"))?;
        let exchange = async {
            let response = self
                .client
                .get(uri)
                .await
                .map_err(|e| format!("GET {admin}{path}: {}", crate::error_chain(&e)))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("GET {admin}{path}: {e}"))?
                .to_bytes();
            if !status.is_success() {
                return Err(format!("GET {admin}{path}: answered {status}"));
            }
            serde_json::from_slice(&body).map_err(|e| format!("GET {admin}{path}: {e}"))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| format!("GET {admin}{path}: no answer within {:?}", self.timeout))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_backend(value: &str) -> AppPod {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-a", "labels": {crate::build::BACKEND_LABEL: value}},
        }))
        .unwrap();
        AppPod::from_pod(&pod)
    }

    #[test]
    fn only_the_operators_retired_label_marks_a_retired_pod() {
        assert_eq!(
            with_backend("retired-1800000000").retired,
            Some(1_800_000_000)
        );
        assert_eq!(with_backend("true").retired, None);
        // Somebody else's value: not retired by the operator, so never "drained" by it.
        assert_eq!(with_backend("false").retired, None);
        assert_eq!(with_backend("retired-soon").retired, None);
    }
}
