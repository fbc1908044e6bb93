//! `BalancedService` spec: what a user asks for.
//!
//! Every field carries a doc comment: they become the CRD's descriptions and so the
//! `kubectl explain balancedservice.spec...` text. Defaults live in `#[serde(default)]`
//! functions so the API server (through the generated schema) and the operator (through
//! serde) agree on them.

use k8s_openapi::api::core::v1::{PodTemplateSpec, ResourceRequirements, TopologySpreadConstraint};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

mod balancing;
mod network;

pub use crate::settings::{Algorithm, SameSite};
use crate::status::BalancedServiceStatus;
pub use balancing::{
    AffinityCookie, AffinitySpec, AffinityType, BalancingSpec, OutlierDetectionSpec, RetrySpec,
    TimeoutSpec, ZoneRouting,
};
pub use network::{
    AppIngress, LoadBalancerHealthCheck, LoadBalancerSpec, LoadBalancerType, NetworkPolicySpec,
};

// The int-or-string fields are checked with OpenAPI value validations, not CEL: for CEL
// cost the API server sizes an int-or-string value at the largest request (3 MiB), so
// every string function on one is estimated at millions, times the enclosing lists'
// `maxItems`. `pattern`/`maxLength` apply to string values only and `minimum`/`maximum`
// to integer values only, and none of them counts against the CEL budgets.

/// A container port name as Kubernetes requires it of `containers[].ports[].name`
/// (IANA_SVC_NAME, with `maxLength` 15): lowercase alphanumerics, single '-' between
/// them, at least one letter. A string that is not one can never name a container port.
const CONTAINER_PORT_NAME: &str = "^([0-9]+-)*[0-9]*[a-z][a-z0-9]*(-[a-z0-9]+)*$";

/// Most `spec.ports` of one BalancedService. Each port is a listener of every proxy
/// replica, with its own endpoint table and per-pod metric series, and takes a proxy
/// container port from 8080 up (below the default admin port 9901); 8 covers the
/// services seen (HTTP, gRPC, metrics, a WebSocket port...) with room to spare while
/// keeping the proxy's state and the CEL rules' cost over the list small.
pub const MAX_PORTS: usize = 8;

/// A count or a percentage as a string ("2", "25%"); integers are bounded by `minimum`.
const COUNT_OR_PERCENT: &str = "^[0-9]+%?$";

/// A Service whose rollouts lose no request and whose load is balanced per request.
///
/// The operator turns it into the app Deployment (with drain-gated termination), a
/// headless backends Service, the bundled endpoint-aware proxy, the front Service that
/// clients use, and PodDisruptionBudgets.
// Each printcolumn(...) repeats the same keys, which clippy mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "ballast.dev",
    version = "v1alpha1",
    kind = "BalancedService",
    plural = "balancedservices",
    namespaced,
    shortname = "bsvc",
    category = "ballast",
    status = "BalancedServiceStatus",
    derive = "PartialEq",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.ready",
        description = "Available app pods / desired"
    ),
    printcolumn(
        name = "Up-To-Date",
        type_ = "integer",
        json_path = ".status.updatedReplicas",
        description = "App pods running the newest revision"
    ),
    printcolumn(
        name = "Revision",
        type_ = "string",
        json_path = ".status.updateRevision",
        description = "Revision being rolled out (equal to the current one when settled)"
    ),
    printcolumn(
        name = "Balance",
        type_ = "string",
        json_path = ".status.balance.maxOverMean",
        description = "Busiest pod's request rate over the mean (1.00 is perfect)"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Summary of the Available/Progressing/Degraded conditions"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.template) != has(self.workloadRef)",
        "message": "set exactly one of template (ballast creates the Deployment) and workloadRef (ballast adopts an existing one)",
    },
    {
        "rule": "!has(self.workloadRef) || self.replicas == oldSelf.replicas",
        "message": "replicas belongs to the adopted Deployment: scale the Deployment (kubectl scale deployment/<name>) or its HorizontalPodAutoscaler, not the BalancedService",
    },
]))]
pub struct BalancedServiceSpec {
    /// Desired number of app pods. Also the target of `kubectl scale` and of a
    /// HorizontalPodAutoscaler (scale subresource). Not used with `workloadRef`: the
    /// Deployment's own `replicas` (or its autoscaler) decides, and changing this field
    /// is refused.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 10000))]
    pub replicas: i32,

    /// The app's pod template: your containers, volumes and pod settings, as in a
    /// Deployment. ballast adds probes (when a container has none), the drain gate
    /// (preStop hook), a readiness gate and labels; everything else is kept as written.
    /// Set this or `workloadRef`, not both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": "has(self.spec) && size(self.spec.containers) > 0",
            "message": "template.spec.containers must list at least one container",
        },
    ]))]
    pub template: Option<PodTemplateSpec>,

    /// An existing Deployment to manage in place instead of `template`. ballast applies
    /// only what its rollouts need (drain gate, readiness gate, generated probes where a
    /// container has none, rolling-update strategy, grace period, labels) under its own
    /// field manager and leaves everything else, `replicas` included, to the
    /// Deployment's owner (a person, Helm, Argo CD, a HorizontalPodAutoscaler).
    /// Deleting the BalancedService gives the Deployment and the front Service back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_ref: Option<WorkloadRef>,

    /// Ports the app serves. Each becomes a port of the front Service `<name>` (served by
    /// the proxies) and of the headless backends Service `<name>-backends`.
    #[schemars(length(min = 1, max = MAX_PORTS))]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": "self.all(p, self.filter(q, q.name == p.name).size() == 1)",
            "message": "port names must be unique",
        },
        {
            "rule": "self.all(p, self.filter(q, q.port == p.port).size() == 1)",
            "message": "port numbers must be unique",
        },
    ]))]
    pub ports: Vec<BalancedPort>,

    /// How to probe the app when a container declares no probes of its own: ballast then
    /// generates a fast readiness probe and a startup probe covering slow starts.
    #[serde(default)]
    pub probes: ProbeSpec,

    /// How a new revision replaces the old one.
    #[serde(default)]
    pub rollout: RolloutSpec,

    /// Voluntary-disruption budget for the app pods (node drains, cluster upgrades).
    #[serde(default)]
    pub disruption: DisruptionSpec,

    /// How the proxies spread requests over the app pods.
    #[serde(default)]
    pub balancing: BalancingSpec,

    /// The bundled proxy that clients reach through the front Service.
    #[serde(default)]
    pub proxy: ProxySpec,

    /// The front Service: the name clients and gateways use, served by the proxies.
    #[serde(default)]
    pub service: FrontServiceSpec,

    /// NetworkPolicies admitting ballast's own traffic (on by default).
    #[serde(default)]
    pub network_policy: NetworkPolicySpec,
}

/// The Deployment a BalancedService adopts.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRef {
    /// `apps/v1`.
    pub api_version: WorkloadApiVersion,
    /// `Deployment`.
    pub kind: WorkloadKind,
    /// Name of the Deployment, in the BalancedService's namespace.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
}

/// API version of an adoptable workload.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WorkloadApiVersion {
    /// `apps/v1`.
    #[default]
    #[serde(rename = "apps/v1")]
    AppsV1,
}

/// Kind of an adoptable workload.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WorkloadKind {
    /// A Deployment.
    #[default]
    Deployment,
}

/// One port the app serves.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BalancedPort {
    /// Port name (an IANA service name: lowercase letters, digits and '-', at most 15
    /// characters). The proxies pick the backend port by this name.
    #[schemars(
        length(min = 1, max = 15),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,

    /// Port number clients use on the front Service.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// Container port (number or container port name) the app listens on.
    /// Defaults to `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend(
        "minimum" = 1,
        "maximum" = 65535,
        "maxLength" = 15,
        "pattern" = CONTAINER_PORT_NAME
    ))]
    pub target_port: Option<IntOrString>,

    /// Protocol spoken on this port: `http` (HTTP/1.1, upgraded to WebSocket when asked),
    /// `h2c` (HTTP/2 without TLS) or `grpc`. The proxies talk to the pods in this protocol.
    #[serde(default)]
    pub app_protocol: AppProtocol,
}

/// Application protocol of a port.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// HTTP/1.1 (and upgrades such as WebSocket).
    #[default]
    Http,
    /// HTTP/2 over cleartext with prior knowledge.
    H2c,
    /// gRPC (HTTP/2 with trailers).
    Grpc,
}

/// Probe settings used to generate probes for containers that declare none.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ProbeSpec {
    /// HTTP path answered with a 2xx/3xx status when the app can serve traffic.
    /// Ignored for gRPC ports, which use the standard gRPC health-checking protocol.
    #[schemars(length(min = 1, max = 1024), regex(pattern = r"^/"))]
    pub path: String,

    /// Container port (number or name) to probe. Defaults to the first entry of `ports`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend(
        "minimum" = 1,
        "maximum" = 65535,
        "maxLength" = 15,
        "pattern" = CONTAINER_PORT_NAME
    ))]
    pub port: Option<IntOrString>,

    /// `HTTP` or `HTTPS`.
    pub scheme: ProbeScheme,

    /// Seconds between readiness probes. Short, so a pod is routable soon after it is
    /// ready and rollouts move quickly.
    #[schemars(range(min = 1, max = 60))]
    pub period_seconds: i32,

    /// Seconds after which a probe counts as failed.
    #[schemars(range(min = 1, max = 60))]
    pub timeout_seconds: i32,

    /// Consecutive failed readiness probes before the pod is marked unready.
    #[schemars(range(min = 1, max = 30))]
    pub failure_threshold: i32,

    /// Longest time, in seconds, the app may take to start. Covered by a startup probe so
    /// the readiness probe can stay fast without killing slow starters.
    #[schemars(range(min = 1, max = 3600))]
    pub startup_budget_seconds: i32,
}

/// Scheme of an HTTP probe.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum ProbeScheme {
    /// Plain HTTP.
    #[default]
    Http,
    /// HTTPS, certificate not verified (as kubelet does).
    Https,
}

/// How a new revision replaces the old one.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!((self.maxSurge == 0 || self.maxSurge in ['0', '0%']) && (self.maxUnavailable == 0 || self.maxUnavailable in ['0', '0%']))",
        "message": "maxSurge and maxUnavailable cannot both be zero: the rollout could never make progress",
    },
    {
        "rule": "self.progressDeadlineSeconds > self.minReadySeconds && self.progressDeadlineSeconds > self.warmupSeconds",
        "message": "progressDeadlineSeconds must be greater than minReadySeconds and warmupSeconds (a new pod counts as available once its warmup is over)",
    },
]))]
pub struct RolloutSpec {
    /// Pods created above `replicas` during a rollout: a number or a percentage ("25%").
    #[schemars(extend("minimum" = 0, "pattern" = COUNT_OR_PERCENT))]
    pub max_surge: IntOrString,

    /// Pods that may be unavailable during a rollout: a number or a percentage. The default
    /// 0 keeps full capacity: an old pod goes only once its replacement is routable.
    #[schemars(extend("minimum" = 0, "pattern" = COUNT_OR_PERCENT))]
    pub max_unavailable: IntOrString,

    /// Seconds a new pod must be ready before it counts as available. The Deployment
    /// gets the larger of this and `warmupSeconds`.
    #[schemars(range(min = 0, max = 3600))]
    pub min_ready_seconds: i32,

    /// Seconds a rollout may go without progress before it is reported as failed
    /// (`Degraded`, reason `ProgressDeadlineExceeded`).
    #[schemars(range(min = 1, max = 86400))]
    pub progress_deadline_seconds: i32,

    /// Longest time, in seconds, a terminating pod waits for the proxies to report no
    /// request or connection in flight to it. Open streams still there are then closed
    /// and counted as forced terminations.
    #[schemars(range(min = 1, max = 3600))]
    pub drain_timeout_seconds: i32,

    /// Seconds the app gets after SIGTERM to exit once drained. The pod's
    /// `terminationGracePeriodSeconds` is `drainTimeoutSeconds + shutdownGraceSeconds`.
    #[schemars(range(min = 0, max = 3600))]
    pub shutdown_grace_seconds: i32,

    /// Seconds over which a new pod's share of requests ramps from 10% to 100% (slow
    /// start, for caches and JITs). 0 disables the ramp.
    #[schemars(range(min = 0, max = 3600))]
    pub warmup_seconds: i32,

    /// When to pause a rollout that is going badly. Unset thresholds never pause.
    pub pause_when: PauseThresholds,
}

/// Thresholds that pause a bad rollout (`Progressing=False`, reason `RolloutPaused`).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct PauseThresholds {
    /// Pause once this many pods of the rollout had to be stopped with requests or
    /// connections still open (drain timeout reached).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub forced_drains: Option<i32>,

    /// Pause once the share of the new revision's requests that failed (5xx or connection
    /// failure, as the proxies saw them) exceeds this ratio, e.g. 0.05 for 5%.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub error_ratio: Option<f64>,

    /// Requests the new revision must have served before `errorRatio` is judged.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub min_requests: Option<i32>,

    /// Roll back to the previous pod template when a rollout is paused.
    pub rollback: bool,
}

/// Voluntary-disruption budget for the app pods. Set at most one of the two fields;
/// with neither, `maxUnavailable: 1` applies.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", default)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!(has(self.minAvailable) && has(self.maxUnavailable))",
        "message": "set either minAvailable or maxUnavailable, not both",
    },
]))]
pub struct DisruptionSpec {
    /// Pods that must stay available during voluntary disruptions (number or percentage).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("minimum" = 0, "pattern" = COUNT_OR_PERCENT))]
    pub min_available: Option<IntOrString>,

    /// Pods that may be unavailable during voluntary disruptions (number or percentage).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("minimum" = 0, "pattern" = COUNT_OR_PERCENT))]
    pub max_unavailable: Option<IntOrString>,
}

/// The bundled proxy.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ProxySpec {
    /// Proxy pods. Two or more keep the front Service up while a proxy restarts.
    #[schemars(range(min = 1, max = 1000))]
    pub replicas: i32,

    /// CPU and memory for each proxy container.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Port of the proxies' admin listener (`/ready`, `/metrics`, `/endpoints`, `/drain`).
    /// Never exposed on the front Service.
    #[schemars(range(min = 1, max = 65535))]
    pub admin_port: i32,

    /// Requests and streams in flight through each proxy at once; more are refused
    /// with 503 (gRPC: RESOURCE_EXHAUSTED) so an overload cannot pile up on the pods.
    /// 0 sets no limit.
    #[schemars(range(min = 0, max = 1000000))]
    pub max_in_flight: i32,

    /// A Google Cloud load balancer sending straight to the proxy pods (GKE Ingress or
    /// Gateway with network endpoint groups). Unset: clients reach the proxies through
    /// the front Service only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSpec>,

    /// How the proxy pods spread over the cluster. Unset: as evenly as possible over
    /// zones, then nodes, never leaving a replica unscheduled for it. A constraint
    /// without `labelSelector` selects this service's proxy pods.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8))]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,
}

/// The front Service.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct FrontServiceSpec {
    /// Name of the front Service. Defaults to the BalancedService's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: Option<String>,

    /// Take over a Service of that name that already exists and is not ballast's: once
    /// the proxies are ready and list every ready pod, its selector and target ports are
    /// switched to the proxies (its name, ports, type and cluster IP stay, so clients
    /// and gateways notice nothing), and deleting the BalancedService switches it back.
    /// Without it, an existing Service stops the reconcile with `Degraded/Conflict`.
    pub adopt: bool,

    /// `ClusterIP`, `NodePort` or `LoadBalancer` (of a Service ballast creates; an
    /// adopted Service keeps its own).
    #[serde(rename = "type")]
    pub type_: ServiceType,

    /// Annotations for the front Service (cloud load-balancer settings, ...). With
    /// `proxy.loadBalancer`, ballast sets the NEG and BackendConfig annotations itself.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,

    /// The front Service's `trafficDistribution`: `PreferClose` or `PreferSameZone`
    /// (same meaning; the latter needs Kubernetes 1.34) keep a client's connection to
    /// the proxies in its zone, `PreferSameNode` (1.34) on its node. With
    /// `balancing.zoneRouting: FromService` the proxies then prefer app pods in their
    /// own zone as well.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traffic_distribution: Option<TrafficDistribution>,
}

/// A Service's `trafficDistribution`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrafficDistribution {
    /// Endpoints in the client's zone first.
    PreferClose,
    /// Endpoints in the client's zone first (the newer name of `PreferClose`).
    PreferSameZone,
    /// Endpoints on the client's node first, then its zone.
    PreferSameNode,
}

impl TrafficDistribution {
    /// The Service field's value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::PreferClose => "PreferClose",
            Self::PreferSameZone => "PreferSameZone",
            Self::PreferSameNode => "PreferSameNode",
        }
    }
}

/// Type of the front Service.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServiceType {
    /// Reachable inside the cluster only.
    #[default]
    ClusterIP,
    /// Also on a port of every node.
    NodePort,
    /// Through the cloud provider's load balancer.
    LoadBalancer,
}

fn default_replicas() -> i32 {
    2
}

impl Default for ProbeSpec {
    fn default() -> Self {
        Self {
            path: "/".to_owned(),
            port: None,
            scheme: ProbeScheme::Http,
            period_seconds: 2,
            timeout_seconds: 1,
            failure_threshold: 2,
            startup_budget_seconds: 300,
        }
    }
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            max_surge: IntOrString::String("25%".to_owned()),
            max_unavailable: IntOrString::Int(0),
            min_ready_seconds: 0,
            progress_deadline_seconds: 600,
            drain_timeout_seconds: 30,
            shutdown_grace_seconds: 15,
            warmup_seconds: 10,
            pause_when: PauseThresholds::default(),
        }
    }
}

impl Default for ProxySpec {
    fn default() -> Self {
        Self {
            replicas: 2,
            resources: None,
            admin_port: 9901,
            max_in_flight: 0,
            load_balancer: None,
            topology_spread_constraints: None,
        }
    }
}
