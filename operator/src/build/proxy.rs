//! The proxy Deployment and the command line of `ballast-proxy`.

use ballast_api::settings::{
    AffinitySettings, BackendProtocol, ListenerSettings, LogFormat, OutlierSettings, ProxySettings,
    RetrySettings, ZoneRouting, ZoneSettings,
};
use ballast_api::spec::{AppProtocol, LoadBalancerType, ZoneRouting as ZoneRoutingSpec};
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector,
    PodReadinessGate, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceFieldSelector,
    ResourceRequirements, SeccompProfile,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;
use std::net::{Ipv6Addr, SocketAddr};
use std::time::Duration;

use super::gke::{NEG_READINESS_GATE, shutdown_delay};
use super::{
    BuildContext, backends_name, common_labels, meta, proxy_admin_name, proxy_name,
    restricted_container_security, selector_labels, spread,
};
use crate::validate::ValidatedSpec;

/// How long the proxy waits for in-flight requests once it stopped taking new ones.
const PROXY_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// What the proxy needs to exit after its drain.
const PROXY_EXIT: Duration = Duration::from_secs(5);

/// The proxy's default CPU and memory requests and memory limit. Autopilot takes them
/// as they are: at least 50m CPU and 52 MiB per pod, and 1 to 6.5 GiB of memory per
/// CPU (128 MiB for 0.1 CPU is 1.25); where limits must equal requests it lowers the
/// memory limit to 128 MiB, which a proxy stays well under.
pub const PROXY_REQUESTS: (&str, &str) = ("100m", "128Mi");
/// The default memory limit of a proxy.
pub const PROXY_MEMORY_LIMIT: &str = "256Mi";

/// The settings of `ballast-proxy`, from `spec.balancing`, `spec.rollout` and
/// `spec.proxy`.
pub fn proxy_settings(v: &ValidatedSpec<'_>) -> ProxySettings {
    let spec = &v.bs.spec;
    let balancing = &spec.balancing;
    let timeouts = &balancing.timeouts;
    let od = &balancing.outlier_detection;
    let seconds = |s: i32| Duration::from_secs(u64::try_from(s).unwrap_or(0));
    let limit = |s: i32| (s > 0).then(|| seconds(s));
    let base_ejection = seconds(od.base_ejection_seconds);
    ProxySettings {
        listeners: v
            .ports
            .iter()
            .map(|served| ListenerSettings {
                name: served.port.name.clone(),
                listen: SocketAddr::from((Ipv6Addr::UNSPECIFIED, served.proxy_port)),
                protocol: match served.port.app_protocol {
                    AppProtocol::Http => BackendProtocol::Http1,
                    AppProtocol::H2c | AppProtocol::Grpc => BackendProtocol::H2c,
                },
            })
            .collect(),
        admin_listen: SocketAddr::from((Ipv6Addr::UNSPECIFIED, v.admin_port)),
        kube_service: backends_name(v),
        algorithm: balancing.algorithm,
        connect_timeout: Duration::from_millis(u64::try_from(timeouts.connect_millis).unwrap_or(0)),
        response_timeout: limit(timeouts.response_seconds),
        stream_idle_timeout: limit(timeouts.stream_idle_seconds),
        idle_timeout: seconds(timeouts.idle_seconds),
        retries: RetrySettings {
            attempts: u32::try_from(balancing.retries.attempts).unwrap_or(1),
            budget_percent: u32::try_from(balancing.retries.budget_percent).unwrap_or(0),
            min_per_second: u32::try_from(balancing.retries.min_per_second).unwrap_or(0),
            body_limit: u64::try_from(balancing.retries.body_limit_bytes).unwrap_or(0),
        },
        max_in_flight: u64::try_from(spec.proxy.max_in_flight)
            .ok()
            .filter(|&m| m > 0),
        outlier: OutlierSettings {
            consecutive_failures: u32::try_from(od.consecutive_failures).unwrap_or(0),
            base_ejection,
            max_ejection: seconds(od.max_ejection_seconds).max(base_ejection),
            max_ejected_percent: u32::try_from(od.max_ejected_percent).unwrap_or(0),
        },
        warmup: seconds(spec.rollout.warmup_seconds),
        drain_ttl: 2 * seconds(spec.rollout.drain_timeout_seconds),
        shutdown_delay: shutdown_delay(spec.proxy.load_balancer.as_ref()),
        drain_timeout: PROXY_DRAIN_TIMEOUT,
        log_format: LogFormat::Json,
        affinity: affinity_settings(v),
        zones: zone_settings(v),
    }
}

/// Zone-aware routing: as asked, or (`FromService`) on when the front Service keeps
/// clients' connections in their zone or node, so the whole path stays there.
fn zone_settings(v: &ValidatedSpec<'_>) -> ZoneSettings {
    let spec = &v.bs.spec;
    let on = match spec.balancing.zone_routing {
        ZoneRoutingSpec::Off => false,
        ZoneRoutingSpec::PreferSameZone => true,
        ZoneRoutingSpec::FromService => spec.service.traffic_distribution.is_some(),
    };
    if !on {
        return ZoneSettings::default();
    }
    ZoneSettings {
        routing: ZoneRouting::PreferSameZone,
        zone: None,
        // Its EndpointSlices carry every proxy pod's zone: the proxy's own, and how
        // the proxies spread.
        proxy_service: Some(proxy_admin_name(v)),
    }
}

/// The proxy's grace period: its shutdown delay (longer behind a Google load
/// balancer, see [`shutdown_delay`]), its drain, and time to exit.
pub fn proxy_grace_seconds(v: &ValidatedSpec<'_>) -> i64 {
    let shutdown =
        shutdown_delay(v.bs.spec.proxy.load_balancer.as_ref()) + PROXY_DRAIN_TIMEOUT + PROXY_EXIT;
    i64::try_from(shutdown.as_secs()).unwrap_or(i64::MAX)
}

fn affinity_settings(v: &ValidatedSpec<'_>) -> Option<AffinitySettings> {
    let (Some(affinity), Some(key)) = (&v.bs.spec.balancing.affinity, &v.affinity_key) else {
        return None;
    };
    Some(AffinitySettings {
        key: key.clone(),
        load_factor: f64::from(affinity.load_factor_percent) / 100.0,
        cookie_ttl: Duration::from_secs(u64::try_from(affinity.cookie.ttl_seconds).unwrap_or(0)),
        cookie_secure: affinity.cookie.secure,
        cookie_same_site: affinity.cookie.same_site,
        trust_forwarded_for: affinity.trust_forwarded_for,
    })
}

/// The proxies: `spec.proxy.replicas` of `ballast-proxy`, one at a time on update.
pub(super) fn proxy_deployment(v: &ValidatedSpec<'_>, ctx: &BuildContext) -> Deployment {
    let admin = IntOrString::String("admin".to_owned());
    let http = |path: &str| HTTPGetAction {
        path: Some(path.to_owned()),
        port: admin.clone(),
        ..HTTPGetAction::default()
    };
    let resources =
        v.bs.spec
            .proxy
            .resources
            .clone()
            .unwrap_or_else(|| ResourceRequirements {
                requests: Some(BTreeMap::from([
                    ("cpu".to_owned(), Quantity(PROXY_REQUESTS.0.to_owned())),
                    ("memory".to_owned(), Quantity(PROXY_REQUESTS.1.to_owned())),
                ])),
                limits: Some(BTreeMap::from([(
                    "memory".to_owned(),
                    Quantity(PROXY_MEMORY_LIMIT.to_owned()),
                )])),
                ..ResourceRequirements::default()
            });
    let container = Container {
        name: "proxy".to_owned(),
        image: Some(ctx.proxy_image.clone()),
        command: Some(vec!["/usr/local/bin/ballast-proxy".to_owned()]),
        args: Some(proxy_settings(v).to_args()),
        env: Some(vec![
            field_env("BALLAST_NAMESPACE", "metadata.namespace"),
            // The proxy finds itself, hence its zone, in its admin Service's slices.
            field_env("BALLAST_POD_NAME", "metadata.name"),
            // Sizes the proxy's worker threads: the CPU it asked for, not the node's
            // core count (a proxy without a CPU limit on a 64-core node).
            EnvVar {
                name: "BALLAST_CPU_REQUEST_MILLIS".to_owned(),
                value_from: Some(EnvVarSource {
                    resource_field_ref: Some(ResourceFieldSelector {
                        container_name: Some("proxy".to_owned()),
                        resource: "requests.cpu".to_owned(),
                        divisor: Some(Quantity("1m".to_owned())),
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            },
        ]),
        // One per listener, named after the spec port (the front Service targets
        // it by that name), then the admin port.
        ports: Some(
            v.ports
                .iter()
                .map(|served| ContainerPort {
                    name: Some(served.port.name.clone()),
                    container_port: i32::from(served.proxy_port),
                    ..ContainerPort::default()
                })
                .chain([ContainerPort {
                    name: Some("admin".to_owned()),
                    container_port: v.bs.spec.proxy.admin_port,
                    ..ContainerPort::default()
                }])
                .collect(),
        ),
        readiness_probe: Some(Probe {
            http_get: Some(http("/ready")),
            period_seconds: Some(2),
            failure_threshold: Some(1),
            ..Probe::default()
        }),
        liveness_probe: Some(Probe {
            http_get: Some(http("/live")),
            period_seconds: Some(10),
            failure_threshold: Some(3),
            ..Probe::default()
        }),
        resources: Some(resources),
        security_context: Some(restricted_container_security()),
        ..Container::default()
    };
    let labels = selector_labels(v.bs, "proxy");
    let mut pod_labels = common_labels(v);
    pod_labels.extend(labels.clone());
    // Istio reads the label (newer releases) or the annotation.
    pod_labels.insert("sidecar.istio.io/inject".to_owned(), "false".to_owned());
    Deployment {
        metadata: meta(v, proxy_name(v)),
        spec: Some(DeploymentSpec {
            replicas: Some(v.bs.spec.proxy.replicas),
            selector: LabelSelector {
                match_labels: Some(labels),
                ..LabelSelector::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(no_mesh_sidecar()),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(proxy_name(v)),
                    containers: vec![container],
                    termination_grace_period_seconds: Some(proxy_grace_seconds(v)),
                    // GKE's NEG controller sets it once the load balancer's health
                    // check passes: a new proxy counts as ready (for the rollout of the
                    // proxies and for the operator) only when the load balancer sends
                    // to it. GKE injects it into the pods of an Ingress's NEG; declaring
                    // it keeps it on every proxy pod. Not for a Gateway: its NEGs are
                    // standalone ones, whose readiness GKE does not report this way,
                    // and a gate nobody sets would keep the proxies unready.
                    readiness_gates: v
                        .bs
                        .spec
                        .proxy
                        .load_balancer
                        .as_ref()
                        .filter(|lb| lb.type_ == LoadBalancerType::Ingress)
                        .map(|_| {
                            vec![PodReadinessGate {
                                condition_type: NEG_READINESS_GATE.to_owned(),
                            }]
                        }),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        run_as_group: Some(65532),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".to_owned(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    topology_spread_constraints: Some(spread(v, "proxy")),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// An environment variable from the pod's own metadata (downward API).
fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.to_owned(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// Opt-outs of the usual mesh sidecar injectors for the proxy pods. A sidecar that
/// redirects inbound traffic hides the caller's address from the proxy, and the drain
/// protocol identifies a pod by exactly that: `POST /drain` would come from a local
/// address and be refused, so no pod could be drained.
fn no_mesh_sidecar() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("sidecar.istio.io/inject".to_owned(), "false".to_owned()),
        ("linkerd.io/inject".to_owned(), "disabled".to_owned()),
        (
            "kuma.io/sidecar-injection".to_owned(),
            "disabled".to_owned(),
        ),
    ])
}
