//! How the proxies are reached from outside the namespace: a Google Cloud load
//! balancer sending straight to the proxy pods (`spec.proxy.loadBalancer`), and the
//! NetworkPolicies that admit exactly ballast's own traffic (`spec.networkPolicy`).

use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A Google Cloud load balancer in front of the proxies, sending to the proxy pods'
/// IPs through a network endpoint group (container-native load balancing). A proxy
/// pod that is told to stop then keeps serving through the load balancer's connection
/// draining and health-check detection before it drains its own requests, and its
/// grace period covers all of it; the load balancer health-checks the proxy's `/ready`,
/// which fails from the moment the proxy is told to stop.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.healthCheck.timeoutSeconds <= self.healthCheck.checkIntervalSeconds",
        "message": "healthCheck.timeoutSeconds cannot exceed healthCheck.checkIntervalSeconds (Google Cloud refuses such a health check)",
    },
]))]
pub struct LoadBalancerSpec {
    /// `Ingress`: a GKE Ingress (the front Service gets the `cloud.google.com/neg`
    /// and `cloud.google.com/backend-config` annotations and ballast creates the
    /// `BackendConfig`); `Gateway`: the GKE Gateway controller (ballast creates the
    /// `GCPBackendPolicy` and `HealthCheckPolicy` attached to the front Service; the
    /// Gateway controller makes the NEGs itself).
    #[serde(rename = "type")]
    pub type_: LoadBalancerType,

    /// Seconds the load balancer lets requests on a proxy it has removed finish
    /// (backend service connection draining, 0 to 3600). The proxy keeps serving at
    /// least this long after it is told to stop.
    #[serde(default = "default_connection_draining_seconds")]
    #[schemars(range(min = 0, max = 3600))]
    pub connection_draining_seconds: i32,

    /// The load balancer's health check of each proxy pod (its `/ready` on the admin
    /// port).
    #[serde(default)]
    pub health_check: LoadBalancerHealthCheck,
}

/// Which GKE controller programs the load balancer.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadBalancerType {
    /// GKE Ingress (`ingress-gce`).
    Ingress,
    /// GKE Gateway (`gateway.networking.k8s.io` with a `gke-l7-*` GatewayClass).
    Gateway,
}

/// The load balancer's health check of the proxy pods.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct LoadBalancerHealthCheck {
    /// Seconds between checks of one proxy (1 to 300).
    #[schemars(range(min = 1, max = 300))]
    pub check_interval_seconds: i32,
    /// Seconds a check may take (1 to 300, at most `checkIntervalSeconds`).
    #[schemars(range(min = 1, max = 300))]
    pub timeout_seconds: i32,
    /// Consecutive successes before a proxy receives traffic (1 to 10).
    #[schemars(range(min = 1, max = 10))]
    pub healthy_threshold: i32,
    /// Consecutive failures before the load balancer stops sending to a proxy (1 to
    /// 10). With `checkIntervalSeconds` it sets how long a stopping proxy keeps
    /// receiving new requests.
    #[schemars(range(min = 1, max = 10))]
    pub unhealthy_threshold: i32,
}

impl Default for LoadBalancerHealthCheck {
    fn default() -> Self {
        Self {
            check_interval_seconds: 5,
            timeout_seconds: 5,
            healthy_threshold: 1,
            unhealthy_threshold: 2,
        }
    }
}

fn default_connection_draining_seconds() -> i32 {
    30
}

/// NetworkPolicies for clusters that enforce them (GKE Dataplane V2, Calico, Cilium).
/// The proxies' policy admits their client ports from anywhere and their admin port
/// only from this service's app pods (the drain helper), the operator's namespace,
/// the Google load balancer's health checkers (with `proxy.loadBalancer`),
/// `metricsFrom` and `adminFrom`. Every rule is an allowance: they keep ballast working in a namespace
/// whose own policies deny by default.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct NetworkPolicySpec {
    /// Create the NetworkPolicies.
    pub enabled: bool,

    /// Who may reach the app pods on `spec.ports`: `Any` (no policy on the app pods)
    /// or `Proxies` (only the proxies, so nothing bypasses the balancing and the drain
    /// accounting; the app pods' other ports are then closed unless a policy of yours
    /// opens them).
    pub app_ingress: AppIngress,

    /// Also allow ballast's egress (proxies to the app pods, DNS and the API server;
    /// the drain helper to the proxies), for namespaces that deny egress by default.
    /// Leave it off otherwise: a policy with egress rules closes every other egress of
    /// the pods it selects.
    pub egress: bool,

    /// Namespaces (a label selector) whose pods may read the proxies' admin port:
    /// Prometheus, for `/metrics`. Unset: none besides the operator's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_from: Option<LabelSelector>,

    /// More peers that may read the proxies' admin port, as NetworkPolicy peers: the
    /// control plane, so that `kubectl ballast get` reads the proxies through the API
    /// server's pod proxy (an `ipBlock` with the control plane's range, or the
    /// `kube-system` namespace where the API server reaches pods through Konnectivity
    /// agents), or a scraper outside the cluster.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub admin_from: Vec<NetworkPolicyPeer>,
}

/// Who may reach the app pods.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AppIngress {
    /// No policy on the app pods.
    #[default]
    Any,
    /// Only the proxies.
    Proxies,
}

impl Default for NetworkPolicySpec {
    fn default() -> Self {
        Self {
            enabled: true,
            app_ingress: AppIngress::Any,
            egress: false,
            metrics_from: None,
            admin_from: Vec::new(),
        }
    }
}
