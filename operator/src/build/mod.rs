//! Pure builders: a validated BalancedService in, the objects the operator owns out. No
//! client, no I/O: `render` prints them, the controller applies them. One file per
//! owned object; a new object is one builder there and one line in [`build`].

use ballast_api::BalancedService;
use ballast_api::meta::labels;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{
    Capabilities, PodTemplateSpec, SeccompProfile, SecurityContext, Service, ServiceAccount,
    TopologySpreadConstraint,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::Resource;
use serde::Serialize;
use std::collections::BTreeMap;

use crate::validate::ValidatedSpec;
use app::app_deployment;
use gke::load_balancer_objects;
use network_policy::network_policies;
use pdb::{app_pdb, proxy_pdb};
use proxy::proxy_deployment;
use rbac::{proxy_role, proxy_role_binding, proxy_service_account};
pub use services::{backends_selector, deployment_match_labels};
use services::{backends_service, front_service, proxy_admin_service};

pub use app::{BACKEND_SERVING, SLOW_PROBE_PERIOD_SECONDS, slow_probes};
pub use drain_gate::DRAIN_BIN_DIR;
pub use gke::{
    BACKEND_CONFIG_ANNOTATION, BackendConfig, GCPBackendPolicy, HealthCheckPolicy,
    LoadBalancerObjects, NEG_ANNOTATION, NEG_READINESS_GATE, load_balancer_annotations,
    shutdown_delay,
};
pub use network_policy::GOOGLE_HEALTH_CHECK_RANGES;
pub use proxy::{proxy_grace_seconds, proxy_settings};

mod app;
mod drain_gate;
mod gke;
mod network_policy;
mod pdb;
mod proxy;
mod rbac;
mod services;

/// Field manager of every write (server-side apply).
pub const MANAGER: &str = "ballast-operator";
/// Label naming the BalancedService an object belongs to.
pub const SERVICE_LABEL: &str = labels::SERVICE;
/// Label telling app pods from proxy pods.
pub const ROLE_LABEL: &str = labels::ROLE;
/// Label of an adopted Deployment's pods that the backends Service selects (`true`);
/// a pod the operator takes out of the proxies' rotation before the Deployment
/// controller deletes it carries another value (see `adopt`).
pub const BACKEND_LABEL: &str = labels::BACKEND;
/// Label carrying the app pod template's revision (a hash of the template).
pub const REVISION_LABEL: &str = labels::REVISION;

/// Operator-level settings the builders need.
#[derive(Clone, Debug)]
pub struct BuildContext {
    /// Image with `ballast-proxy` and `ballast-drain`.
    pub proxy_image: String,
    /// The operator's own namespace: its NetworkPolicy peer for the proxies' admin port.
    pub operator_namespace: String,
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
    /// Disruption budget of the app pods; none for an adopted Deployment (its owner
    /// may have one, and the eviction API refuses a pod covered by two).
    pub app_pdb: Option<PodDisruptionBudget>,
    /// Disruption budget of the proxy pods.
    pub proxy_pdb: PodDisruptionBudget,
    /// What admits the proxies' traffic (none with `networkPolicy.enabled: false`).
    pub proxy_network_policy: Option<NetworkPolicy>,
    /// What admits the app pods' traffic, when `networkPolicy` asks for it.
    pub app_network_policy: Option<NetworkPolicy>,
    /// GKE's load-balancer objects, with `spec.proxy.loadBalancer`.
    pub load_balancer: LoadBalancerObjects,
}

impl OwnedObjects {
    /// How many objects one BalancedService owns at most (the gauge of managed
    /// objects counts each BalancedService at this).
    pub const COUNT: usize = 13;

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
        [
            doc(&self.proxy_service_account),
            doc(&self.proxy_role),
            doc(&self.proxy_role_binding),
            doc(&self.backends_service),
            doc(&self.proxy_admin_service),
            doc(&self.proxy_deployment),
            doc(&self.front_service),
            doc(&self.app_deployment),
        ]
        .into_iter()
        .chain(self.app_pdb.as_ref().map(doc))
        .chain([doc(&self.proxy_pdb)])
        .chain(self.proxy_network_policy.as_ref().map(doc))
        .chain(self.app_network_policy.as_ref().map(doc))
        .chain(self.load_balancer.backend_config.as_ref().map(doc))
        .chain(self.load_balancer.backend_policy.as_ref().map(doc))
        .chain(self.load_balancer.health_check_policy.as_ref().map(doc))
        .collect()
    }
}

/// Builds every owned object from a spec that passed [`crate::validate::validate`].
pub fn build(v: &ValidatedSpec<'_>, ctx: &BuildContext) -> OwnedObjects {
    let (proxy_network_policy, app_network_policy) = network_policies(v, ctx);
    OwnedObjects {
        proxy_service_account: proxy_service_account(v),
        proxy_role: proxy_role(v),
        proxy_role_binding: proxy_role_binding(v),
        backends_service: backends_service(v),
        proxy_admin_service: proxy_admin_service(v),
        proxy_deployment: proxy_deployment(v, ctx),
        front_service: front_service(v),
        app_deployment: app_deployment(v, ctx),
        app_pdb: v.adopted.is_none().then(|| app_pdb(v)),
        proxy_pdb: proxy_pdb(v),
        proxy_network_policy,
        app_network_policy,
        load_balancer: load_balancer_objects(v),
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

pub(crate) fn common_labels(v: &ValidatedSpec<'_>) -> BTreeMap<String, String> {
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

/// Name of the headless Service over the app pods that the proxies discover them by.
pub fn backends_name(v: &ValidatedSpec<'_>) -> String {
    format!("{}-backends", v.name)
}

/// The revision an app pod or ReplicaSet runs: ballast's label, or, on an adopted
/// Deployment's (whose template ballast does not label with a revision, so that an owner's
/// change starts one rollout, not two), the Deployment controller's `pod-template-hash`.
pub fn revision_of(meta: &ObjectMeta) -> Option<&String> {
    let labels = meta.labels.as_ref()?;
    labels
        .get(REVISION_LABEL)
        .or_else(|| labels.get(POD_TEMPLATE_HASH))
}

/// The Deployment controller's label on each ReplicaSet and pod.
pub const POD_TEMPLATE_HASH: &str = labels::POD_TEMPLATE_HASH;

/// The revision being rolled out: of `spec.template`, or of an adopted Deployment's
/// newest ReplicaSet (its `deployment.kubernetes.io/revision` is the highest).
pub fn update_revision(bs: &BalancedService, replica_sets: &[ReplicaSet]) -> String {
    if let Some(template) = &bs.spec.template {
        return template_revision(template);
    }
    let number = |rs: &&ReplicaSet| {
        rs.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("deployment.kubernetes.io/revision"))
            .and_then(|r| r.parse::<i64>().ok())
            .unwrap_or(0)
    };
    replica_sets
        .iter()
        .max_by_key(number)
        .and_then(|rs| revision_of(&rs.metadata))
        .cloned()
        .unwrap_or_default()
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
    if role == "proxy"
        && let Some(own) = &v.bs.spec.proxy.topology_spread_constraints
    {
        return own
            .iter()
            .cloned()
            .map(|mut constraint| {
                constraint
                    .label_selector
                    .get_or_insert_with(|| LabelSelector {
                        match_labels: Some(selector_labels(v.bs, role)),
                        ..LabelSelector::default()
                    });
                constraint
            })
            .collect();
    }
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

#[cfg(test)]
mod gke_tests;
#[cfg(test)]
mod tests;
