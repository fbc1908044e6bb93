//! What the operator knows of the cluster from its watches, shared by every reconcile:
//! the app and proxy pods, the app ReplicaSets and the objects it owns. Reading them
//! costs no API request.

use ballast_api::BalancedService;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Pod, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
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
    /// Gateway API routes (`HTTPRoute`, `GRPCRoute`), to find one that goes around
    /// the proxies; empty where the Gateway API is not installed.
    pub(crate) routes: [(&'static str, Store<DynamicObject>); 2],
}

/// The Gateway API route kinds watched, with their plural.
pub const ROUTE_KINDS: [(&str, &str); 2] =
    [("HTTPRoute", "httproutes"), ("GRPCRoute", "grpcroutes")];

/// The `gateway.networking.k8s.io/v1` resource of a route kind.
pub fn route_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", kind),
        plural,
    )
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
    pub(crate) network_policies: Store<NetworkPolicy>,
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
    /// Every Service (the owned ones are applied, the others checked for a NEG on the
    /// app pods).
    pub services: Writer<Service>,
    /// Owned PodDisruptionBudgets.
    pub budgets: Writer<PodDisruptionBudget>,
    /// Owned ServiceAccounts.
    pub service_accounts: Writer<ServiceAccount>,
    /// Owned Roles.
    pub roles: Writer<Role>,
    /// Owned RoleBindings.
    pub role_bindings: Writer<RoleBinding>,
    /// Owned NetworkPolicies.
    pub network_policies: Writer<NetworkPolicy>,
    /// HTTPRoutes and GRPCRoutes.
    pub routes: [Writer<DynamicObject>; 2],
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
        let (network_policies, np_writer) = reflector::store();
        let route_writers =
            ROUTE_KINDS.map(|(kind, plural)| Writer::new(route_resource(kind, plural)));
        let routes = [0, 1].map(|i| (ROUTE_KINDS[i].0, route_writers[i].as_reader()));
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
                    network_policies,
                },
                routes,
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
                network_policies: np_writer,
                routes: route_writers,
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

    /// Every Service in `namespace`.
    pub(crate) fn services_in(&self, namespace: &str) -> Vec<Arc<Service>> {
        self.owned
            .services
            .state_filter(|s| s.metadata.namespace.as_deref() == Some(namespace))
    }

    /// The routes of each kind in `namespace`.
    pub(crate) fn routes_in(
        &self,
        namespace: &str,
    ) -> Vec<(&'static str, Vec<Arc<DynamicObject>>)> {
        self.routes
            .iter()
            .map(|(kind, store)| {
                let routes =
                    store.state_filter(|r| r.metadata.namespace.as_deref() == Some(namespace));
                (*kind, routes)
            })
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
