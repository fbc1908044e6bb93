//! What GKE's load-balancer controllers read when a Google Cloud load balancer sends
//! straight to the proxy pods (`spec.proxy.loadBalancer`): the front Service's NEG
//! annotations, a `BackendConfig` (GKE Ingress) or a `GCPBackendPolicy` and a
//! `HealthCheckPolicy` (GKE Gateway), with connection draining and the health check on
//! the proxies' `/ready`, and the proxy's shutdown timing that follows from them.
//!
//! The kinds are GKE's CRDs, not Kubernetes': only the fields ballast sets are typed
//! here (client side only; `kube`'s derive, no schema).

use ballast_api::BalancedService;
use ballast_api::spec::{LoadBalancerSpec, LoadBalancerType};
use kube::CustomResource;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

use super::{meta, proxy_name};
use crate::validate::ValidatedSpec;

/// The annotation that makes GKE create network endpoint groups for a Service.
pub const NEG_ANNOTATION: &str = "cloud.google.com/neg";
/// The annotation naming a Service's `BackendConfig`.
pub const BACKEND_CONFIG_ANNOTATION: &str = "cloud.google.com/backend-config";
/// The readiness gate GKE's NEG controller sets once the load balancer's health check
/// passes for a pod in a NEG.
pub const NEG_READINESS_GATE: &str = "cloud.google.com/load-balancer-neg-ready";

/// The proxy keeps serving this long after SIGTERM, `/ready` failing, without a load
/// balancer in front: kube-proxy and the clients' own discovery stop sending first.
const PLAIN_SHUTDOWN_DELAY: Duration = Duration::from_secs(5);

/// `cloud.google.com/v1` `BackendConfig`: the backend service of a GKE Ingress.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "cloud.google.com",
    version = "v1",
    kind = "BackendConfig",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct BackendConfigSpec {
    /// How long a removed backend's requests may finish.
    pub connection_draining: ConnectionDraining,
    /// The load balancer's health check.
    pub health_check: BackendConfigHealthCheck,
}

/// `connectionDraining` of a BackendConfig or GCPBackendPolicy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionDraining {
    /// Seconds.
    pub draining_timeout_sec: i32,
}

/// `healthCheck` of a BackendConfig.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BackendConfigHealthCheck {
    /// Seconds between checks.
    pub check_interval_sec: i32,
    /// Seconds one check may take.
    pub timeout_sec: i32,
    /// Successes before healthy.
    pub healthy_threshold: i32,
    /// Failures before unhealthy.
    pub unhealthy_threshold: i32,
    /// `HTTP`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Path checked.
    pub request_path: String,
    /// Port checked (a container port of the serving pods).
    pub port: i32,
}

/// `networking.gke.io/v1` `GCPBackendPolicy`: the backend service of a GKE Gateway.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "networking.gke.io",
    version = "v1",
    kind = "GCPBackendPolicy",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct GCPBackendPolicySpec {
    /// Settings for every port of the target.
    pub default: BackendPolicyDefault,
    /// The Service it applies to.
    pub target_ref: TargetRef,
}

/// `default` of a GCPBackendPolicy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BackendPolicyDefault {
    /// How long a removed backend's requests may finish.
    pub connection_draining: ConnectionDraining,
}

/// A policy's `targetRef`: a core Service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// `""` (core).
    pub group: String,
    /// `Service`.
    pub kind: String,
    /// The Service's name.
    pub name: String,
}

/// `networking.gke.io/v1` `HealthCheckPolicy`: a GKE Gateway's health check.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "networking.gke.io",
    version = "v1",
    kind = "HealthCheckPolicy",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheckPolicySpec {
    /// The health check for every port of the target.
    pub default: HealthCheckDefault,
    /// The Service it applies to.
    pub target_ref: TargetRef,
}

/// `default` of a HealthCheckPolicy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheckDefault {
    /// Seconds between checks.
    pub check_interval_sec: i32,
    /// Seconds one check may take.
    pub timeout_sec: i32,
    /// Successes before healthy.
    pub healthy_threshold: i32,
    /// Failures before unhealthy.
    pub unhealthy_threshold: i32,
    /// What is checked.
    pub config: HealthCheckConfig,
}

/// `config` of a HealthCheckPolicy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheckConfig {
    /// `HTTP`.
    #[serde(rename = "type")]
    pub type_: String,
    /// The HTTP check.
    pub http_health_check: HttpHealthCheck,
}

/// `httpHealthCheck` of a HealthCheckPolicy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HttpHealthCheck {
    /// `USE_FIXED_PORT`: `port`, not the serving port.
    pub port_specification: String,
    /// Port checked.
    pub port: i32,
    /// Path checked.
    pub request_path: String,
}

/// How long a stopping proxy keeps serving with `/ready` failing. Without a load
/// balancer in front, 5 s. With one, until the load balancer has both seen `/ready`
/// fail (`unhealthyThreshold` checks, `checkIntervalSeconds` apart, the last one
/// allowed its timeout) and let the requests it already sent finish (connection
/// draining, which starts when GKE takes the terminating pod out of the NEG): a proxy
/// that exits sooner is what turns a rollout into 502s.
pub fn shutdown_delay(load_balancer: Option<&LoadBalancerSpec>) -> Duration {
    let Some(lb) = load_balancer else {
        return PLAIN_SHUTDOWN_DELAY;
    };
    let check = &lb.health_check;
    let seconds = |s: i32| u64::try_from(s).unwrap_or(0);
    let detection = seconds(check.check_interval_seconds) * seconds(check.unhealthy_threshold)
        + seconds(check.timeout_seconds);
    Duration::from_secs(detection + seconds(lb.connection_draining_seconds))
        .max(PLAIN_SHUTDOWN_DELAY)
}

/// The front Service's annotations: the user's, plus [`load_balancer_annotations`].
pub(super) fn front_annotations(v: &ValidatedSpec<'_>) -> BTreeMap<String, String> {
    let mut annotations = v.bs.spec.service.annotations.clone();
    annotations.extend(load_balancer_annotations(v.bs));
    annotations
}

/// What GKE Ingress reads on the front Service (its own or an adopted one): the NEG
/// and BackendConfig annotations. None for a GKE Gateway, whose controller makes its
/// NEGs without an annotation, nor without a load balancer.
pub fn load_balancer_annotations(bs: &BalancedService) -> BTreeMap<String, String> {
    let Some(lb) = &bs.spec.proxy.load_balancer else {
        return BTreeMap::new();
    };
    if lb.type_ != LoadBalancerType::Ingress {
        return BTreeMap::new();
    }
    let name = bs.metadata.name.as_deref().unwrap_or_default();
    BTreeMap::from([
        (NEG_ANNOTATION.to_owned(), r#"{"ingress":true}"#.to_owned()),
        (
            BACKEND_CONFIG_ANNOTATION.to_owned(),
            format!(r#"{{"default":"{name}-proxy"}}"#),
        ),
    ])
}

/// The GKE objects for `spec.proxy.loadBalancer`.
#[derive(Clone, Debug, Default)]
pub struct LoadBalancerObjects {
    /// GKE Ingress.
    pub backend_config: Option<BackendConfig>,
    /// GKE Gateway.
    pub backend_policy: Option<GCPBackendPolicy>,
    /// GKE Gateway.
    pub health_check_policy: Option<HealthCheckPolicy>,
}

pub(super) fn load_balancer_objects(v: &ValidatedSpec<'_>) -> LoadBalancerObjects {
    let Some(lb) = &v.bs.spec.proxy.load_balancer else {
        return LoadBalancerObjects::default();
    };
    let check = &lb.health_check;
    let draining = ConnectionDraining {
        draining_timeout_sec: lb.connection_draining_seconds,
    };
    let admin_port = v.bs.spec.proxy.admin_port;
    let target = || TargetRef {
        group: String::new(),
        kind: "Service".to_owned(),
        name: v.front_name.to_owned(),
    };
    match lb.type_ {
        LoadBalancerType::Ingress => {
            let mut backend_config = BackendConfig::new(
                &proxy_name(v),
                BackendConfigSpec {
                    connection_draining: draining,
                    health_check: BackendConfigHealthCheck {
                        check_interval_sec: check.check_interval_seconds,
                        timeout_sec: check.timeout_seconds,
                        healthy_threshold: check.healthy_threshold,
                        unhealthy_threshold: check.unhealthy_threshold,
                        type_: "HTTP".to_owned(),
                        request_path: "/ready".to_owned(),
                        port: admin_port,
                    },
                },
            );
            backend_config.metadata = meta(v, proxy_name(v));
            LoadBalancerObjects {
                backend_config: Some(backend_config),
                ..LoadBalancerObjects::default()
            }
        }
        LoadBalancerType::Gateway => {
            let mut backend_policy = GCPBackendPolicy::new(
                &proxy_name(v),
                GCPBackendPolicySpec {
                    default: BackendPolicyDefault {
                        connection_draining: draining,
                    },
                    target_ref: target(),
                },
            );
            backend_policy.metadata = meta(v, proxy_name(v));
            let mut health_check_policy = HealthCheckPolicy::new(
                &proxy_name(v),
                HealthCheckPolicySpec {
                    default: HealthCheckDefault {
                        check_interval_sec: check.check_interval_seconds,
                        timeout_sec: check.timeout_seconds,
                        healthy_threshold: check.healthy_threshold,
                        unhealthy_threshold: check.unhealthy_threshold,
                        config: HealthCheckConfig {
                            type_: "HTTP".to_owned(),
                            http_health_check: HttpHealthCheck {
                                port_specification: "USE_FIXED_PORT".to_owned(),
                                port: admin_port,
                                request_path: "/ready".to_owned(),
                            },
                        },
                    },
                    target_ref: target(),
                },
            );
            health_check_policy.metadata = meta(v, proxy_name(v));
            LoadBalancerObjects {
                backend_policy: Some(backend_policy),
                health_check_policy: Some(health_check_policy),
                ..LoadBalancerObjects::default()
            }
        }
    }
}
