//! What the operator knows of the cluster from its watches, shared by every reconcile:
//! the app and proxy pods, the app ReplicaSets and the objects it owns. Reading them
//! costs no API request.

use ballast_api::BalancedService;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Pod, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use std::sync::Arc;

use crate::build::selector_labels;
use crate::controller::ReconcileError;
use crate::observe::ProxyPod;

/// The app and proxy pods and the app ReplicaSets of every BalancedService, as the
/// operator's watches see them, shared by all reconciles: reading them costs no API
/// request (a LIST per kind per reconcile before).
#[derive(Clone, Debug)]
pub struct Caches {
    pub(crate) pods: Store<Pod>,
    pub(crate) replica_sets: Store<ReplicaSet>,
    pub(crate) owned: OwnedStores,
}

/// The objects the operator owns, as its `owns` watches see them: an apply whose body
/// and target did not change since the last one is skipped.
#[derive(Clone, Debug)]
pub(crate) struct OwnedStores {
    pub(crate) deployments: Store<Deployment>,
    pub(crate) services: Store<Service>,
    pub(crate) budgets: Store<PodDisruptionBudget>,
    pub(crate) service_accounts: Store<ServiceAccount>,
    pub(crate) roles: Store<Role>,
    pub(crate) role_bindings: Store<RoleBinding>,
}

/// What fills [`Caches`]: the watches in [`crate::controller::run`], or a test.
#[derive(Debug)]
pub struct CacheWriters {
    /// Pods carrying the `ballast.dev/service` label.
    pub pods: Writer<Pod>,
    /// ReplicaSets carrying it.
    pub replica_sets: Writer<ReplicaSet>,
    /// Owned Deployments.
    pub deployments: Writer<Deployment>,
    /// Owned Services.
    pub services: Writer<Service>,
    /// Owned PodDisruptionBudgets.
    pub budgets: Writer<PodDisruptionBudget>,
    /// Owned ServiceAccounts.
    pub service_accounts: Writer<ServiceAccount>,
    /// Owned Roles.
    pub roles: Writer<Role>,
    /// Owned RoleBindings.
    pub role_bindings: Writer<RoleBinding>,
}

impl Caches {
    /// Empty caches, ready once their writers have seen a first full list.
    pub fn new() -> (Self, CacheWriters) {
        let (pods, pod_writer) = reflector::store();
        let (replica_sets, rs_writer) = reflector::store();
        let (deployments, deployment_writer) = reflector::store();
        let (services, service_writer) = reflector::store();
        let (budgets, budget_writer) = reflector::store();
        let (service_accounts, sa_writer) = reflector::store();
        let (roles, role_writer) = reflector::store();
        let (role_bindings, rb_writer) = reflector::store();
        (
            Self {
                pods,
                replica_sets,
                owned: OwnedStores {
                    deployments,
                    services,
                    budgets,
                    service_accounts,
                    roles,
                    role_bindings,
                },
            },
            CacheWriters {
                pods: pod_writer,
                replica_sets: rs_writer,
                deployments: deployment_writer,
                services: service_writer,
                budgets: budget_writer,
                service_accounts: sa_writer,
                roles: role_writer,
                role_bindings: rb_writer,
            },
        )
    }

    /// Waits for the first full list of both kinds: before it, a missing pod would look
    /// like a finished rollout.
    pub(crate) async fn ready(&self) -> Result<(), ReconcileError> {
        self.pods
            .wait_until_ready()
            .await
            .map_err(|_| ReconcileError::CacheClosed)?;
        self.replica_sets
            .wait_until_ready()
            .await
            .map_err(|_| ReconcileError::CacheClosed)
    }

    /// The pods of `bs` with `role` (`app` or `proxy`).
    pub(crate) fn pods_of(
        &self,
        bs: &BalancedService,
        namespace: &str,
        role: &str,
    ) -> Vec<Arc<Pod>> {
        let selector = selector_labels(bs, role);
        self.pods
            .state_filter(|p| selected(&p.metadata, namespace, &selector))
    }

    /// The ready proxy pods of `bs`.
    pub(crate) fn proxy_pods(&self, bs: &BalancedService, namespace: &str) -> Vec<ProxyPod> {
        self.pods_of(bs, namespace, "proxy")
            .iter()
            .filter_map(|p| ProxyPod::from_pod(p, bs.spec.proxy.admin_port))
            .collect()
    }

    /// The app's ReplicaSets, by name.
    pub(crate) fn replica_sets_of(&self, bs: &BalancedService, namespace: &str) -> Vec<ReplicaSet> {
        let selector = selector_labels(bs, "app");
        let mut found: Vec<ReplicaSet> = self
            .replica_sets
            .state_filter(|rs| selected(&rs.metadata, namespace, &selector))
            .iter()
            .map(|rs| ReplicaSet::clone(rs))
            .collect();
        found.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        found
    }
}

/// True when `object` is in `namespace` and carries every label of `selector`.
fn selected(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    namespace: &str,
    selector: &std::collections::BTreeMap<String, String>,
) -> bool {
    meta.namespace.as_deref() == Some(namespace)
        && selector.iter().all(|(k, v)| {
            meta.labels
                .as_ref()
                .and_then(|l| l.get(k))
                .is_some_and(|value| value == v)
        })
}

/// A watch of `api` that fills `writer`'s store and yields every object it touches.
pub(crate) fn reflected<K>(
    api: Api<K>,
    config: &watcher::Config,
    writer: Writer<K>,
) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    watcher(api, config.clone())
        .default_backoff()
        .reflect(writer)
        .touched_objects()
}
