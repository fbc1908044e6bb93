//! Reading a [`Snapshot`] from the API server: the only I/O of `get` and `list`. The
//! proxies' admin endpoints are reached through the API server's pod proxy
//! (`pods/<name>:<port>/proxy/endpoints`), so nothing needs a port-forward.

use ballast_api::BalancedService;
use ballast_api::admin::{self, EndpointReport};
use ballast_api::meta::labels;
use futures::future::join_all;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use std::time::Duration;

use crate::snapshot::{ProxyReading, Snapshot};

/// Longest wait for one proxy's admin answer through the API server.
pub const PROXY_READ_TIMEOUT: Duration = Duration::from_secs(3);

/// What reading failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The BalancedService does not exist.
    #[error("BalancedService {name} not found in namespace {namespace}")]
    NotFound {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// A read the view needs failed (the kind and what was asked say which).
    #[error("reading {what} failed")]
    Read {
        /// What was read.
        what: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
}

/// Reads everything the tree of BalancedService `name` shows.
pub async fn snapshot(client: &Client, namespace: &str, name: &str) -> Result<Snapshot, ReadError> {
    let services: Api<BalancedService> = Api::namespaced(client.clone(), namespace);
    let service = services
        .get_opt(name)
        .await
        .map_err(|source| ReadError::Read {
            what: format!("BalancedService {namespace}/{name}"),
            source,
        })?
        .ok_or_else(|| ReadError::NotFound {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })?;
    let app = ListParams::default().labels(&selector(name, labels::ROLE_APP));
    let proxy = ListParams::default().labels(&selector(name, labels::ROLE_PROXY));
    let events = ListParams::default().fields(&event_fields(name, service.uid().as_deref()));
    let replica_sets: Api<ReplicaSet> = Api::namespaced(client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let event_api: Api<Event> = Api::namespaced(client.clone(), namespace);
    let (replica_sets, app_pods, proxy_pods, events) = futures::join!(
        replica_sets.list(&app),
        pods.list(&app),
        pods.list(&proxy),
        event_api.list(&events),
    );
    let read = |what: &str| {
        let what = what.to_owned();
        move |source| ReadError::Read { what, source }
    };
    let replica_sets = replica_sets.map_err(read("ReplicaSets"))?.items;
    let app_pods = app_pods.map_err(read("app pods"))?.items;
    let proxy_pods = proxy_pods.map_err(read("proxy pods"))?.items;
    let events = events.map_err(read("Events"))?.items;
    let default_port = service.spec.proxy.admin_port;
    let proxies = join_all(
        proxy_pods
            .into_iter()
            .map(|pod| read_proxy(client, namespace, pod, default_port)),
    )
    .await;
    Ok(Snapshot {
        at: Timestamp::now(),
        service,
        replica_sets,
        pods: app_pods,
        proxies,
        events,
    })
}

/// The field selector of the Events about BalancedService `name` (of this `uid`, when
/// known: not of an earlier object of the same name), as `kubectl describe` reads them.
pub fn event_fields(name: &str, uid: Option<&str>) -> String {
    let mut fields = format!("involvedObject.kind=BalancedService,involvedObject.name={name}");
    if let Some(uid) = uid {
        fields.push_str(",involvedObject.uid=");
        fields.push_str(uid);
    }
    fields
}

/// The label selector of `name`'s pods in `role`.
pub fn selector(name: &str, role: &str) -> String {
    format!("{}={name},{}={role}", labels::SERVICE, labels::ROLE)
}

/// The API server path of a pod's admin `path` through the pod proxy.
pub fn pod_proxy_path(namespace: &str, pod: &str, port: i32, path: &str) -> String {
    format!("/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy{path}")
}

/// One proxy's `/endpoints`, when it is ready (an unready proxy's answer would only
/// say it has not synced yet).
async fn read_proxy(client: &Client, namespace: &str, pod: Pod, default_port: i32) -> ProxyReading {
    let endpoints = match admin_port(&pod, default_port) {
        Err(why) => Err(why),
        Ok(port) => {
            let path = pod_proxy_path(namespace, &pod.name_any(), port, admin::ENDPOINTS);
            read_endpoints(client, &path).await
        }
    };
    ProxyReading { pod, endpoints }
}

/// The admin port of a running proxy pod: its container port named `admin`, else
/// `default_port`.
fn admin_port(pod: &Pod, default_port: i32) -> Result<i32, String> {
    if pod.metadata.deletion_timestamp.is_some() {
        return Err("terminating".to_owned());
    }
    let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    if !running
        || pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_ref())
            .is_none()
    {
        return Err("not running".to_owned());
    }
    Ok(pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some("admin"))
        .map_or(default_port, |p| p.container_port))
}

async fn read_endpoints(client: &Client, path: &str) -> Result<Vec<EndpointReport>, String> {
    let request = http::Request::get(path)
        .body(Vec::new())
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(
        PROXY_READ_TIMEOUT,
        client.request::<Vec<EndpointReport>>(request),
    )
    .await
    {
        Err(_) => Err(format!(
            "no answer through the API server within {}s",
            PROXY_READ_TIMEOUT.as_secs()
        )),
        Ok(Err(kube::Error::Api(status))) if status.code == 403 => Err(format!(
            "forbidden ({}): `get pods/proxy` is needed (see config/rbac/kubectl_plugin_role.yaml)",
            status.message
        )),
        Ok(Err(kube::Error::Api(status))) if (502..=504).contains(&status.code) => Err(format!(
            "the API server could not reach its admin port ({} {}); where NetworkPolicy is \
             enforced, admit the control plane with spec.networkPolicy.adminFrom",
            status.code, status.message
        )),
        Ok(Err(kube::Error::Api(status))) => Err(format!(
            "the API server answered {} {}",
            status.code, status.message
        )),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(rows)) => Ok(rows),
    }
}
