//! Pure builders: a valid BalancedService in, the objects the operator owns out. No
//! client, no I/O: `render` prints them, the controller applies them.

use ballast_api::BalancedService;
use ballast_api::spec::{AppProtocol, ProbeScheme};
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, ExecAction,
    GRPCAction, HTTPGetAction, LifecycleHandler, ObjectFieldSelector, PodReadinessGate,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceFieldSelector,
    ResourceRequirements, SeccompProfile, SecurityContext, Service, ServiceAccount, ServicePort,
    ServiceSpec, SleepAction, TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use serde::Serialize;
use std::collections::BTreeMap;

use crate::validate::{PROXY_PORT, ValidatedSpec};

/// Field manager of every write (server-side apply).
pub const MANAGER: &str = "ballast-operator";
/// Label naming the BalancedService an object belongs to.
pub const SERVICE_LABEL: &str = "ballast.dev/service";
/// Label telling app pods from proxy pods.
pub const ROLE_LABEL: &str = "ballast.dev/role";
/// Label carrying the app pod template's revision (a hash of the template).
pub const REVISION_LABEL: &str = "ballast.dev/revision";

/// Operator-level settings the builders need.
#[derive(Clone, Debug)]
pub struct BuildContext {
    /// Image with `ballast-proxy` and `ballast-drain`.
    pub proxy_image: String,
}

/// Everything the operator owns for one BalancedService, in apply order.
#[derive(Clone, Debug)]
pub struct OwnedObjects {
    /// The proxies' identity.
    pub proxy_service_account: ServiceAccount,
    /// Read-only EndpointSlices in the namespace.
    pub proxy_role: Role,
    /// Grants `proxy_role` to `proxy_service_account`.
    pub proxy_role_binding: RoleBinding,
    /// Headless Service over the app pods: Kubernetes keeps its EndpointSlices.
    pub backends_service: Service,
    /// Headless Service over every proxy replica, ready or not, for the drain helper.
    pub proxy_admin_service: Service,
    /// The proxies.
    pub proxy_deployment: Deployment,
    /// What clients use: selects the proxies.
    pub front_service: Service,
    /// The user's app.
    pub app_deployment: Deployment,
    /// Disruption budget of the app pods.
    pub app_pdb: PodDisruptionBudget,
    /// Disruption budget of the proxy pods.
    pub proxy_pdb: PodDisruptionBudget,
}

impl OwnedObjects {
    /// How many objects one BalancedService owns.
    pub const COUNT: usize = 10;

    /// The objects in apply order, as JSON documents (for `render` and tests).
    ///
    /// # Errors
    /// Only if serialization fails.
    pub fn to_documents(&self) -> Result<Vec<serde_json::Value>, serde_json::Error> {
        fn doc<K: Resource<DynamicType = ()> + Serialize>(
            k: &K,
        ) -> Result<serde_json::Value, serde_json::Error> {
            let mut value = serde_json::to_value(k)?;
            value["apiVersion"] = K::api_version(&()).into();
            value["kind"] = K::kind(&()).into();
            Ok(value)
        }
        Ok(vec![
            doc(&self.proxy_service_account)?,
            doc(&self.proxy_role)?,
            doc(&self.proxy_role_binding)?,
            doc(&self.backends_service)?,
            doc(&self.proxy_admin_service)?,
            doc(&self.proxy_deployment)?,
            doc(&self.front_service)?,
            doc(&self.app_deployment)?,
            doc(&self.app_pdb)?,
            doc(&self.proxy_pdb)?,
        ])
    }
}

/// Builds every owned object from a spec that passed [`crate::validate::validate`].
pub fn build(v: &ValidatedSpec<'_>, ctx: &BuildContext) -> OwnedObjects {
    OwnedObjects {
        proxy_service_account: proxy_service_account(v),
        proxy_role: proxy_role(v),
        proxy_role_binding: proxy_role_binding(v),
        backends_service: backends_service(v),
        proxy_admin_service: proxy_admin_service(v),
        proxy_deployment: proxy_deployment(v, ctx),
        front_service: front_service(v),
        app_deployment: app_deployment(v, ctx),
        app_pdb: app_pdb(v),
        proxy_pdb: proxy_pdb(v),
    }
}

fn name_of(bs: &BalancedService) -> &str {
    bs.metadata.name.as_deref().unwrap_or_default()
}

/// Labels selecting the app pods or the proxy pods.
pub fn selector_labels(bs: &BalancedService, role: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (SERVICE_LABEL.to_owned(), name_of(bs).to_owned()),
        (ROLE_LABEL.to_owned(), role.to_owned()),
    ])
}

fn common_labels(v: &ValidatedSpec<'_>) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/managed-by".to_owned(),
            MANAGER.to_owned(),
        ),
        ("app.kubernetes.io/part-of".to_owned(), "ballast".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), v.name.to_owned()),
        (SERVICE_LABEL.to_owned(), v.name.to_owned()),
    ])
}

/// Metadata of an owned object: name, namespace, labels and (when the owner has a uid,
/// i.e. it came from the API server) the controller ownerReference.
fn meta(v: &ValidatedSpec<'_>, object_name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(object_name),
        namespace: v.bs.metadata.namespace.clone(),
        labels: Some(common_labels(v)),
        owner_references: v.bs.controller_owner_ref(&()).map(|r| vec![r]),
        ..ObjectMeta::default()
    }
}

fn proxy_name(v: &ValidatedSpec<'_>) -> String {
    format!("{}-proxy", v.name)
}

/// Name of the headless Service the drain helper resolves to reach every proxy.
pub fn proxy_admin_name(v: &ValidatedSpec<'_>) -> String {
    format!("{}-proxy-admin", v.name)
}

fn backends_name(v: &ValidatedSpec<'_>) -> String {
    format!("{}-backends", v.name)
}

/// Revision of the app pod template: the same template always gives the same value.
pub fn template_revision(template: &PodTemplateSpec) -> String {
    let text = serde_json::to_string(template).unwrap_or_default();
    // FNV-1a: stable across releases and platforms, unlike std's SipHash seeds.
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{:010x}", hash & 0xff_ffff_ffff)
}

fn proxy_service_account(v: &ValidatedSpec<'_>) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(v, proxy_name(v)),
        automount_service_account_token: Some(true),
        ..ServiceAccount::default()
    }
}

fn proxy_role(v: &ValidatedSpec<'_>) -> Role {
    Role {
        metadata: meta(v, proxy_name(v)),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["discovery.k8s.io".to_owned()]),
            resources: Some(vec!["endpointslices".to_owned()]),
            verbs: ["get", "list", "watch"].map(str::to_owned).to_vec(),
            ..PolicyRule::default()
        }]),
    }
}

fn proxy_role_binding(v: &ValidatedSpec<'_>) -> RoleBinding {
    RoleBinding {
        metadata: meta(v, proxy_name(v)),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "Role".to_owned(),
            name: proxy_name(v),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_owned(),
            name: proxy_name(v),
            namespace: v.bs.metadata.namespace.clone(),
            ..Subject::default()
        }]),
    }
}

fn app_protocol(protocol: AppProtocol) -> &'static str {
    match protocol {
        AppProtocol::Http => "http",
        AppProtocol::H2c => "kubernetes.io/h2c",
        AppProtocol::Grpc => "grpc",
    }
}

fn backends_service(v: &ValidatedSpec<'_>) -> Service {
    let port = v.port;
    Service {
        metadata: meta(v, backends_name(v)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            selector: Some(selector_labels(v.bs, "app")),
            ports: Some(vec![ServicePort {
                name: Some(port.name.clone()),
                port: port.port,
                target_port: Some(v.target_port.clone()),
                app_protocol: Some(app_protocol(port.app_protocol).to_owned()),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn proxy_admin_service(v: &ValidatedSpec<'_>) -> Service {
    Service {
        metadata: meta(v, proxy_admin_name(v)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            // Not-ready proxies still hold connections to draining pods: the drain
            // helper must see them too.
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(v.bs, "proxy")),
            ports: Some(vec![ServicePort {
                name: Some("admin".to_owned()),
                port: v.bs.spec.proxy.admin_port,
                target_port: Some(IntOrString::String("admin".to_owned())),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn front_service(v: &ValidatedSpec<'_>) -> Service {
    let port = v.port;
    let service = &v.bs.spec.proxy.service;
    let mut metadata = meta(v, v.name.to_owned());
    if !service.annotations.is_empty() {
        metadata.annotations = Some(service.annotations.clone());
    }
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(format!("{:?}", service.type_)),
            selector: Some(selector_labels(v.bs, "proxy")),
            ports: Some(vec![ServicePort {
                name: Some(port.name.clone()),
                port: port.port,
                target_port: Some(IntOrString::String("proxy".to_owned())),
                app_protocol: Some(app_protocol(port.app_protocol).to_owned()),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn restricted_container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            ..Capabilities::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            ..SeccompProfile::default()
        }),
        ..SecurityContext::default()
    }
}

fn spread(v: &ValidatedSpec<'_>, role: &str) -> Vec<TopologySpreadConstraint> {
    ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
        .map(|key| TopologySpreadConstraint {
            max_skew: 1,
            topology_key: key.to_owned(),
            // Prefer spreading; never leave a replica unscheduled for it.
            when_unsatisfiable: "ScheduleAnyway".to_owned(),
            label_selector: Some(LabelSelector {
                match_labels: Some(selector_labels(v.bs, role)),
                ..LabelSelector::default()
            }),
            match_label_keys: Some(vec!["pod-template-hash".to_owned()]),
            ..TopologySpreadConstraint::default()
        })
        .to_vec()
}

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

fn proxy_deployment(v: &ValidatedSpec<'_>, ctx: &BuildContext) -> Deployment {
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

/// The container that serves the proxied port: the one declaring the target port, or
/// the first.
fn serving_container(pod: &PodSpec, target: &IntOrString) -> usize {
    pod.containers
        .iter()
        .position(|c| {
            c.ports.iter().flatten().any(|p| match target {
                IntOrString::Int(n) => p.container_port == *n,
                IntOrString::String(name) => p.name.as_deref() == Some(name),
            })
        })
        .unwrap_or(0)
}

/// Readiness and startup probes from `spec.probes`, for a container that has neither.
fn generated_probes(v: &ValidatedSpec<'_>) -> (Probe, Probe) {
    let probes = &v.bs.spec.probes;
    let port = v.probe_port.clone();
    let base = match v.port.app_protocol {
        AppProtocol::Grpc => Probe {
            grpc: Some(GRPCAction {
                // A gRPC probe takes a number only; a name means the container's port.
                port: v.probe_port_number,
                ..GRPCAction::default()
            }),
            ..Probe::default()
        },
        _ => Probe {
            http_get: Some(HTTPGetAction {
                path: Some(probes.path.clone()),
                port,
                scheme: Some(match probes.scheme {
                    ProbeScheme::Http => "HTTP".to_owned(),
                    ProbeScheme::Https => "HTTPS".to_owned(),
                }),
                ..HTTPGetAction::default()
            }),
            ..Probe::default()
        },
    };
    let readiness = Probe {
        period_seconds: Some(probes.period_seconds),
        timeout_seconds: Some(probes.timeout_seconds),
        failure_threshold: Some(probes.failure_threshold),
        success_threshold: Some(1),
        ..base.clone()
    };
    // The startup probe covers slow starts, so readiness can stay fast.
    let startup = Probe {
        period_seconds: Some(probes.period_seconds),
        timeout_seconds: Some(probes.timeout_seconds),
        failure_threshold: Some(
            (probes.startup_budget_seconds + probes.period_seconds - 1) / probes.period_seconds,
        ),
        success_threshold: Some(1),
        ..base
    };
    (readiness, startup)
}

/// Readiness probe periods longer than this slow every rollout down.
pub const SLOW_PROBE_PERIOD_SECONDS: i32 = 10;

/// Containers whose own readiness probe is so slow it delays rollouts.
pub fn slow_probes(v: &ValidatedSpec<'_>) -> Vec<String> {
    let containers =
        v.bs.spec
            .template
            .spec
            .as_ref()
            .map(|s| s.containers.as_slice())
            .unwrap_or_default();
    containers
        .iter()
        .filter(|c| {
            c.readiness_probe
                .as_ref()
                .and_then(|p| p.period_seconds)
                .unwrap_or(10)
                > SLOW_PROBE_PERIOD_SECONDS
        })
        .map(|c| c.name.clone())
        .collect()
}

/// Where the init container puts `ballast-drain` in every app pod.
pub const DRAIN_BIN_DIR: &str = "/ballast/bin";
const DRAIN_VOLUME: &str = "ballast-bin";

/// The drain gate in front of the app's termination: an init container copies the
/// static `ballast-drain` from the ballast image into an emptyDir (so it runs in any
/// image, distroless included), and the serving container's preStop hook runs it. The
/// app gets SIGTERM only once every proxy reports nothing in flight to the pod.
///
/// An init container rather than a native sidecar: the helper must exist only while
/// the hook runs, it needs no lifecycle of its own, and init containers work on every
/// supported Kubernetes version. A user's own preStop runs after the drain: an exec
/// command is chained after `--`, a sleep becomes `--then-sleep`.
fn apply_drain_gate(v: &ValidatedSpec<'_>, ctx: &BuildContext, pod: &mut PodSpec, serving: usize) {
    let proxies = format!(
        "{}.{}.svc:{}",
        proxy_admin_name(v),
        v.namespace,
        v.bs.spec.proxy.admin_port
    );
    pod.volumes.get_or_insert_default().push(Volume {
        name: DRAIN_VOLUME.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(Quantity("32Mi".to_owned())),
            ..EmptyDirVolumeSource::default()
        }),
        ..Volume::default()
    });
    pod.init_containers.get_or_insert_default().push(Container {
        name: "ballast-drain-install".to_owned(),
        image: Some(ctx.proxy_image.clone()),
        command: Some(vec![
            "/usr/local/bin/ballast-drain".to_owned(),
            "install".to_owned(),
            DRAIN_BIN_DIR.to_owned(),
        ]),
        volume_mounts: Some(vec![VolumeMount {
            name: DRAIN_VOLUME.to_owned(),
            mount_path: DRAIN_BIN_DIR.to_owned(),
            ..VolumeMount::default()
        }]),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity("10m".to_owned())),
                ("memory".to_owned(), Quantity("16Mi".to_owned())),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_owned(),
                Quantity("32Mi".to_owned()),
            )])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(65532),
            ..restricted_container_security()
        }),
        ..Container::default()
    });
    let Some(container) = pod.containers.get_mut(serving) else {
        return;
    };
    container
        .volume_mounts
        .get_or_insert_default()
        .push(VolumeMount {
            name: DRAIN_VOLUME.to_owned(),
            mount_path: DRAIN_BIN_DIR.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    let mut command = vec![
        format!("{DRAIN_BIN_DIR}/ballast-drain"),
        format!("--proxies={proxies}"),
        format!("--timeout={}s", v.bs.spec.rollout.drain_timeout_seconds),
    ];
    let lifecycle = container.lifecycle.get_or_insert_default();
    match lifecycle.pre_stop.take() {
        Some(LifecycleHandler {
            exec: Some(ExecAction {
                command: Some(user),
            }),
            ..
        }) => {
            command.push("--".to_owned());
            command.extend(user);
        }
        Some(LifecycleHandler {
            sleep: Some(SleepAction { seconds }),
            ..
        }) => command.push(format!("--then-sleep={seconds}s")),
        // Other handler kinds are refused by validation.
        _ => {}
    }
    lifecycle.pre_stop = Some(LifecycleHandler {
        exec: Some(ExecAction {
            command: Some(command),
        }),
        ..LifecycleHandler::default()
    });
}

fn app_deployment(v: &ValidatedSpec<'_>, ctx: &BuildContext) -> Deployment {
    let spec = &v.bs.spec;
    let mut template = spec.template.clone();
    let revision = template_revision(&spec.template);
    let metadata = template.metadata.get_or_insert_default();
    let labels = metadata.labels.get_or_insert_default();
    labels.extend(selector_labels(v.bs, "app"));
    labels.insert(REVISION_LABEL.to_owned(), revision);
    let pod = template.spec.get_or_insert_default();
    let serving = serving_container(pod, &v.target_port);
    if let Some(container) = pod.containers.get_mut(serving)
        && container.readiness_probe.is_none()
        && container.startup_probe.is_none()
    {
        let (readiness, startup) = generated_probes(v);
        container.readiness_probe = Some(readiness);
        container.startup_probe = Some(startup);
    }
    pod.termination_grace_period_seconds = Some(
        i64::from(spec.rollout.drain_timeout_seconds)
            + i64::from(spec.rollout.shutdown_grace_seconds),
    );
    apply_drain_gate(v, ctx, pod, serving);
    // Ready only once every proxy lists the pod (see `gate`): with maxUnavailable 0 no
    // old pod goes before the proxies can route to its replacement.
    let gates = pod.readiness_gates.get_or_insert_default();
    if !gates
        .iter()
        .any(|g| g.condition_type == crate::observe::ROUTABLE_CONDITION)
    {
        gates.push(PodReadinessGate {
            condition_type: crate::observe::ROUTABLE_CONDITION.to_owned(),
        });
    }

    let selector = selector_labels(v.bs, "app");
    Deployment {
        metadata: meta(v, v.name.to_owned()),
        spec: Some(DeploymentSpec {
            replicas: Some(spec.replicas),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..LabelSelector::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(spec.rollout.max_surge.clone()),
                    max_unavailable: Some(spec.rollout.max_unavailable.clone()),
                }),
            }),
            // A new pod counts as available once its slow-start ramp is over, so the
            // old pod it replaces leaves only when the new one takes its full share.
            min_ready_seconds: Some(
                spec.rollout
                    .min_ready_seconds
                    .max(spec.rollout.warmup_seconds),
            ),
            progress_deadline_seconds: Some(spec.rollout.progress_deadline_seconds),
            revision_history_limit: Some(10),
            template,
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

fn pdb(
    v: &ValidatedSpec<'_>,
    object_name: String,
    role: &str,
    min: Option<IntOrString>,
    max: Option<IntOrString>,
) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(v, object_name),
        spec: Some(PodDisruptionBudgetSpec {
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(v.bs, role)),
                ..LabelSelector::default()
            }),
            min_available: min,
            max_unavailable: max,
            // A crash-looping pod must not block node drains.
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".to_owned()),
        }),
        ..PodDisruptionBudget::default()
    }
}

fn app_pdb(v: &ValidatedSpec<'_>) -> PodDisruptionBudget {
    let d = &v.bs.spec.disruption;
    let (min, max) = match (&d.min_available, &d.max_unavailable) {
        (None, None) => (None, Some(IntOrString::Int(1))),
        (min, max) => (min.clone(), max.clone()),
    };
    pdb(v, v.name.to_owned(), "app", min, max)
}

fn proxy_pdb(v: &ValidatedSpec<'_>) -> PodDisruptionBudget {
    pdb(v, proxy_name(v), "proxy", None, Some(IntOrString::Int(1)))
}

#[cfg(test)]
mod tests;
