//! The watches feeding the controller: one per kind for all BalancedServices, their
//! caches shared with the reconciles, and the triggers that wake a reconcile.

use ballast_api::BalancedService;
use futures::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Pod, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::runtime::controller::Controller;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use std::sync::Arc;
use std::time::Duration;

use super::{CacheWriters, Context, error_policy, reconcile};
use crate::build::MANAGER;
use crate::cache::{ROUTE_KINDS, reflected, route_resource};
use crate::proxy_watch;
use crate::triggers::{PodChanges, coalesce, receiver_stream};
use kube::core::DynamicObject;

/// Runs the controller until the stream ends (or the future is dropped: leadership
/// lost). `namespace` limits it to one namespace. `writers` fill `ctx`'s caches.
pub async fn run(ctx: Arc<Context>, writers: CacheWriters, namespace: Option<&str>) {
    let client = ctx.client.clone();
    fn api<K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>>(
        client: &Client,
        namespace: Option<&str>,
    ) -> Api<K> {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let config = watcher::Config::default();
    let owned =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGER}"));
    let labelled = watcher::Config::default().labels(crate::build::SERVICE_LABEL);
    // An adopted Deployment carries ballast's service label only (its app.kubernetes.io
    // labels are its owner's); it is watched for the apply cache, never owned.
    let deployments = labelled.clone();
    // One watch per kind for all BalancedServices; reconciles read the caches they fill.
    let mut changes = PodChanges::default();
    let pods = watcher(api::<Pod>(&client, namespace), labelled.clone())
        .default_backoff()
        .reflect(writers.pods)
        .filter_map(|event| futures::future::ready(watch_event(event, "pods")))
        .flat_map(move |event| futures::stream::iter(changes.triggers(&event)));
    let replica_sets = watcher(api::<ReplicaSet>(&client, namespace), labelled)
        .default_backoff()
        .reflect(writers.replica_sets)
        .touched_objects()
        .filter_map(|rs| futures::future::ready(rs.ok().and_then(|rs| labelled_owner(&rs))));
    // Pod events come in bursts during a rollout: one reconcile per burst is enough, but
    // a burst that never ends must not hold it back (kube-runtime's debounce would wait
    // for a quiet gap), so the wait is bounded instead.
    let (changed, proxy_changes) = tokio::sync::mpsc::unbounded_channel();
    let proxy_changes = receiver_stream(proxy_changes);
    let triggers = coalesce(
        futures::stream::select(futures::stream::select(pods, replica_sets), proxy_changes),
        Duration::from_millis(500),
    );
    let controller = Controller::new(api::<BalancedService>(&client, namespace), config.clone());
    let services = controller.store();
    let _ = ctx.watched.set(services.clone());
    // Until this future is dropped (leadership lost, shutdown): no stale series after.
    let _exported = ctx.metrics.export_services(services.clone());
    let watch_ctx = ctx.clone();
    let proxies = async move {
        watch_ctx
            .watching_proxies
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let namespace_of = |bs: &BalancedService| bs.namespace().unwrap_or_default();
        proxy_watch::run(
            services,
            |bs| watch_ctx.caches.proxy_pods(bs, &namespace_of(bs)),
            watch_ctx.proxies.clone(),
            &watch_ctx.readings,
            changed,
        )
        .await;
    };
    let controller = controller
        .owns_stream(reflected(
            api::<Deployment>(&client, namespace),
            &deployments,
            writers.deployments,
        ))
        // Every Service, not only ballast's: one selecting the app pods with a NEG
        // goes around the proxies (see `bypass`).
        .owns_stream(reflected(
            api::<Service>(&client, namespace),
            &config,
            writers.services,
        ))
        .owns_stream(reflected(
            api::<PodDisruptionBudget>(&client, namespace),
            &owned,
            writers.budgets,
        ))
        .owns_stream(reflected(
            api::<ServiceAccount>(&client, namespace),
            &owned,
            writers.service_accounts,
        ))
        .owns_stream(reflected(
            api::<Role>(&client, namespace),
            &owned,
            writers.roles,
        ))
        .owns_stream(reflected(
            api::<RoleBinding>(&client, namespace),
            &owned,
            writers.role_bindings,
        ))
        .owns_stream(reflected(
            api::<NetworkPolicy>(&client, namespace),
            &owned,
            writers.network_policies,
        ))
        .reconcile_on(triggers)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(name = %object.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "controller event"),
            }
        });
    let routes = futures::future::join_all(writers.routes.into_iter().zip(ROUTE_KINDS).map(
        |(writer, (kind, plural))| {
            let resource = route_resource(kind, plural);
            let api: Api<DynamicObject> = match namespace {
                Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
                None => Api::all_with(client.clone(), &resource),
            };
            watcher(api, watcher::Config::default())
                .default_backoff()
                .reflect(writer)
                .for_each(move |event| async move {
                    if let Err(e) = event {
                        // Where the Gateway API is not installed the list is refused
                        // with 404, again after each backoff: not worth a warning.
                        tracing::debug!(kind, error = %e, "route watch failed; retrying");
                    }
                })
        },
    ));
    tokio::select! {
        () = controller => {}
        () = proxies => tracing::warn!("proxy watch stopped"),
        _ = routes => tracing::warn!("route watch stopped"),
    }
}

/// The event, or `None` after logging a watch error (the watcher retries on its own).
fn watch_event<K>(
    event: Result<watcher::Event<K>, watcher::Error>,
    kind: &'static str,
) -> Option<watcher::Event<K>> {
    event
        .inspect_err(|e| tracing::warn!(kind, error = %e, "watch failed; retrying"))
        .ok()
}

/// The BalancedService an object's `ballast.dev/service` label names.
fn labelled_owner<K: Resource>(object: &K) -> Option<ObjectRef<BalancedService>> {
    let name = object.labels().get(crate::build::SERVICE_LABEL)?;
    Some(ObjectRef::new(name).within(&object.namespace()?))
}
