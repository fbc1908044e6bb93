//! The proxy Deployment and the command line of `ballast-proxy`.

use ballast_api::spec::AppProtocol;
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceFieldSelector,
    ResourceRequirements, SeccompProfile,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;

use super::{
    BuildContext, backends_name, common_labels, meta, proxy_name, restricted_container_security,
    selector_labels, spread,
};
use crate::validate::{PROXY_PORT, ValidatedSpec};

/// How long the proxy keeps serving after SIGTERM with /ready failing.
const PROXY_SHUTDOWN_DELAY_SECONDS: i64 = 5;
/// How long the proxy then waits for in-flight requests.
const PROXY_DRAIN_SECONDS: i64 = 30;

fn affinity_args(v: &ValidatedSpec<'_>) -> Vec<(&'static str, String)> {
    let (Some(affinity), Some(key)) = (&v.bs.spec.balancing.affinity, &v.affinity_key) else {
        return Vec::new();
    };
    vec![
        ("--affinity", key.clone()),
        (
            "--affinity-load-factor",
            format!("{:.2}", f64::from(affinity.load_factor_percent) / 100.0),
        ),
        (
            "--affinity-cookie-ttl",
            format!("{}s", affinity.cookie.ttl_seconds),
        ),
        (
            "--affinity-cookie-secure",
            affinity.cookie.secure.to_string(),
        ),
        (
            "--affinity-cookie-same-site",
            format!("{:?}", affinity.cookie.same_site),
        ),
        (
            "--affinity-trust-forwarded-for",
            affinity.trust_forwarded_for.to_string(),
        ),
    ]
}

/// Command-line arguments of `ballast-proxy` from `spec.balancing` and `spec.rollout`.
pub fn proxy_args(v: &ValidatedSpec<'_>) -> Vec<String> {
    let spec = &v.bs.spec;
    let balancing = &spec.balancing;
    let port = v.port;
    let protocol = match port.app_protocol {
        AppProtocol::Http => "http1",
        AppProtocol::H2c | AppProtocol::Grpc => "h2c",
    };
    let algorithm = match balancing.algorithm {
        ballast_api::spec::Algorithm::P2cEwma => "p2c-ewma",
        ballast_api::spec::Algorithm::LeastRequest => "least-request",
        ballast_api::spec::Algorithm::RoundRobin => "round-robin",
    };
    let od = &balancing.outlier_detection;
    [
        ("--listen", format!("[::]:{PROXY_PORT}")),
        ("--admin-listen", format!("[::]:{}", spec.proxy.admin_port)),
        ("--kube-service", backends_name(v)),
        ("--port-name", port.name.clone()),
        ("--backend-protocol", protocol.to_owned()),
        ("--algorithm", algorithm.to_owned()),
        (
            "--connect-timeout",
            format!("{}ms", balancing.timeouts.connect_millis),
        ),
        (
            "--response-timeout",
            format!("{}s", balancing.timeouts.response_seconds),
        ),
        (
            "--stream-idle-timeout",
            format!("{}s", balancing.timeouts.stream_idle_seconds),
        ),
        (
            "--idle-timeout",
            format!("{}s", balancing.timeouts.idle_seconds),
        ),
        ("--retry-attempts", balancing.retries.attempts.to_string()),
        (
            "--retry-budget-percent",
            balancing.retries.budget_percent.to_string(),
        ),
        (
            "--retry-min-per-second",
            balancing.retries.min_per_second.to_string(),
        ),
        (
            "--retry-body-limit",
            balancing.retries.body_limit_bytes.to_string(),
        ),
        ("--max-in-flight", spec.proxy.max_in_flight.to_string()),
        (
            "--outlier-consecutive-failures",
            od.consecutive_failures.to_string(),
        ),
        (
            "--outlier-base-ejection",
            format!("{}s", od.base_ejection_seconds),
        ),
        (
            "--outlier-max-ejection",
            format!("{}s", od.max_ejection_seconds.max(od.base_ejection_seconds)),
        ),
        (
            "--outlier-max-ejected-percent",
            od.max_ejected_percent.to_string(),
        ),
        ("--warmup", format!("{}s", spec.rollout.warmup_seconds)),
        (
            "--drain-ttl",
            format!("{}s", 2 * spec.rollout.drain_timeout_seconds),
        ),
        (
            "--shutdown-delay",
            format!("{PROXY_SHUTDOWN_DELAY_SECONDS}s"),
        ),
        ("--drain-timeout", format!("{PROXY_DRAIN_SECONDS}s")),
        ("--log-format", "json".to_owned()),
    ]
    .into_iter()
    .chain(affinity_args(v))
    .map(|(flag, value)| format!("{flag}={value}"))
    .collect()
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
                    ("cpu".to_owned(), Quantity("100m".to_owned())),
                    ("memory".to_owned(), Quantity("64Mi".to_owned())),
                ])),
                limits: Some(BTreeMap::from([(
                    "memory".to_owned(),
                    Quantity("256Mi".to_owned()),
                )])),
                ..ResourceRequirements::default()
            });
    let container = Container {
        name: "proxy".to_owned(),
        image: Some(ctx.proxy_image.clone()),
        command: Some(vec!["/usr/local/bin/ballast-proxy".to_owned()]),
        args: Some(proxy_args(v)),
        env: Some(vec![
            EnvVar {
                name: "BALLAST_NAMESPACE".to_owned(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: "metadata.namespace".to_owned(),
                        ..ObjectFieldSelector::default()
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            },
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
        ports: Some(vec![
            ContainerPort {
                name: Some("proxy".to_owned()),
                container_port: PROXY_PORT,
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("admin".to_owned()),
                container_port: v.bs.spec.proxy.admin_port,
                ..ContainerPort::default()
            },
        ]),
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
                    termination_grace_period_seconds: Some(
                        PROXY_SHUTDOWN_DELAY_SECONDS + PROXY_DRAIN_SECONDS + 5,
                    ),
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
