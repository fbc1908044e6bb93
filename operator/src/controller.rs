//! The reconcile loop: validate -> build -> apply -> status. Only `apply` and the status
//! and Event writes talk to the API server.

use ballast_api::BalancedService;
use ballast_api::status::BalancedServiceStatus;
use futures::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::build::{BuildContext, MANAGER, OwnedObjects, build, selector_labels, slow_probes};
use crate::metrics::Metrics;
use crate::status::{Observed, compute, transitions};
use crate::validate::{Limits, validate};

/// What a reconcile failed to do.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// Server-side apply of an owned object failed.
    #[error("applying {kind} {name} failed")]
    ApplyObject {
        /// Kind of the object.
        kind: &'static str,
        /// Its name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Listing the app's ReplicaSets failed.
    #[error("listing ReplicaSets failed")]
    ListReplicaSets(#[source] kube::Error),
    /// Writing the status failed.
    #[error("writing status failed")]
    PatchStatus(#[source] kube::Error),
    /// The object came without a namespace (it is namespaced: a bug elsewhere).
    #[error("BalancedService without namespace")]
    MissingNamespace,
}

impl ReconcileError {
    /// Fixed metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::ApplyObject { .. } => "apply_object",
            Self::ListReplicaSets(_) => "list_replicasets",
            Self::PatchStatus(_) => "patch_status",
            Self::MissingNamespace => "missing_namespace",
        }
    }
}

/// Shared by every reconcile.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Builder settings.
    pub build: BuildContext,
    /// Validation limits.
    pub limits: Limits,
    /// Event recorder.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    failures: Mutex<HashMap<ObjectRef<BalancedService>, u32>>,
    /// The controller's cache of BalancedServices, for the managed-objects gauges.
    watched: std::sync::OnceLock<kube::runtime::reflector::Store<BalancedService>>,
}

impl Context {
    /// A context reporting Events as `instance` (the pod name).
    pub fn new(
        client: Client,
        build: BuildContext,
        limits: Limits,
        metrics: Arc<Metrics>,
        instance: String,
    ) -> Self {
        let reporter = Reporter {
            controller: MANAGER.to_owned(),
            instance: Some(instance),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            build,
            limits,
            metrics,
            failures: Mutex::new(HashMap::new()),
            watched: std::sync::OnceLock::new(),
        }
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("build", &self.build)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// The status subresource body for server-side apply: only `status` is sent, so the
/// operator never takes ownership of spec fields.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusApply<'a> {
    api_version: String,
    kind: String,
    status: &'a BalancedServiceStatus,
}

/// One reconcile of one BalancedService.
///
/// # Errors
/// When an API call fails; the controller retries with backoff.
pub async fn reconcile(
    bs: Arc<BalancedService>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let started = Instant::now();
    let result = reconcile_inner(&bs, &ctx).await;
    if let Some(store) = ctx.watched.get() {
        ctx.metrics
            .set_managed(store.state().len(), OwnedObjects::COUNT);
    }
    ctx.metrics.observe_reconcile(
        started.elapsed(),
        result.as_ref().err().map(ReconcileError::label),
    );
    if result.is_ok() {
        ctx.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&ObjectRef::from(bs.as_ref()));
    }
    result
}

async fn reconcile_inner(bs: &BalancedService, ctx: &Context) -> Result<Action, ReconcileError> {
    let namespace = bs.namespace().ok_or(ReconcileError::MissingNamespace)?;
    let (observed, invalid) = match validate(bs, &ctx.limits) {
        Err(invalid) => {
            tracing::warn!(name = %bs.name_any(), %namespace, error = %invalid, "invalid spec: nothing applied");
            (Observed::default(), Some(invalid))
        }
        Ok(()) => {
            let objects = build(bs, &ctx.build);
            let mut observed = apply(&ctx.client, &namespace, &objects).await?;
            observed.slow_probes = slow_probes(bs);
            let selector = selector_labels(bs, "app")
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            observed.replica_sets = Api::<ReplicaSet>::namespaced(ctx.client.clone(), &namespace)
                .list(&ListParams::default().labels(&selector))
                .await
                .map_err(ReconcileError::ListReplicaSets)?
                .items;
            (observed, None)
        }
    };
    let before = bs.status.clone().unwrap_or_default();
    let status = compute(
        bs,
        &observed,
        invalid.as_ref(),
        Time(k8s_openapi::jiff::Timestamp::now()),
    );
    if status != before {
        let body = StatusApply {
            api_version: BalancedService::api_version(&()).into_owned(),
            kind: BalancedService::kind(&()).into_owned(),
            status: &status,
        };
        Api::<BalancedService>::namespaced(ctx.client.clone(), &namespace)
            .patch_status(
                &bs.name_any(),
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
            .map_err(ReconcileError::PatchStatus)?;
    }
    for transition in transitions(&before, &status) {
        let event = Event {
            type_: if transition.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: transition.reason.to_owned(),
            note: Some(transition.message),
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        // An Event is best effort: a failure is logged, never fails the reconcile.
        if let Err(e) = ctx.recorder.publish(&event, &bs.object_ref(&())).await {
            tracing::warn!(name = %bs.name_any(), error = %e, reason = transition.reason, "publishing Event failed");
        }
    }
    let rolling = status
        .conditions
        .iter()
        .any(|c| c.type_ == "Progressing" && c.status == "True");
    // Owned objects wake the controller on change; the requeue is a safety net, short
    // while a rollout moves.
    Ok(Action::requeue(if rolling {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(300)
    }))
}

/// Applies every owned object in order: the proxies' identity and permissions first
/// (they are needed when the proxy starts), the backends Service before the proxies
/// (its EndpointSlices are what they watch), the proxies before the front Service and
/// the app (so traffic and new pods always find a proxy), budgets last.
async fn apply(
    client: &Client,
    namespace: &str,
    objects: &OwnedObjects,
) -> Result<Observed, ReconcileError> {
    apply_one(client, namespace, &objects.proxy_service_account).await?;
    apply_one(client, namespace, &objects.proxy_role).await?;
    apply_one(client, namespace, &objects.proxy_role_binding).await?;
    apply_one(client, namespace, &objects.backends_service).await?;
    apply_one(client, namespace, &objects.proxy_admin_service).await?;
    let proxy = apply_one(client, namespace, &objects.proxy_deployment).await?;
    apply_one(client, namespace, &objects.front_service).await?;
    let app = apply_one(client, namespace, &objects.app_deployment).await?;
    apply_one(client, namespace, &objects.app_pdb).await?;
    apply_one(client, namespace, &objects.proxy_pdb).await?;
    Ok(Observed {
        app: Some(app),
        proxy: Some(proxy),
        ..Observed::default()
    })
}

async fn apply_one<K>(client: &Client, namespace: &str, object: &K) -> Result<K, ReconcileError>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Serialize
        + DeserializeOwned
        + Clone
        + std::fmt::Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    Api::<K>::namespaced(client.clone(), namespace)
        .patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(object),
        )
        .await
        .map_err(|source| ReconcileError::ApplyObject {
            kind: kind_name::<K>(),
            name,
            source,
        })
}

fn kind_name<K: Resource<DynamicType = ()>>() -> &'static str {
    match K::kind(&()).as_ref() {
        "Deployment" => "Deployment",
        "Service" => "Service",
        "ServiceAccount" => "ServiceAccount",
        "Role" => "Role",
        "RoleBinding" => "RoleBinding",
        "PodDisruptionBudget" => "PodDisruptionBudget",
        _ => "object",
    }
}

/// Requeue after a failure with exponential backoff per object: 1 s, 2 s, 4 s ... 5 min.
pub fn error_policy(bs: Arc<BalancedService>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    let mut failures = ctx.failures.lock().unwrap_or_else(PoisonError::into_inner);
    let count = failures.entry(ObjectRef::from(bs.as_ref())).or_insert(0);
    *count = count.saturating_add(1);
    let delay = backoff(*count);
    tracing::warn!(name = %bs.name_any(), error = %crate::error_chain(error), retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Delay before the `failures`-th retry.
pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(9)).min(Duration::from_secs(300))
}

/// Runs the controller until the stream ends (or the future is dropped: leadership
/// lost). `namespace` limits it to one namespace.
pub async fn run(ctx: Arc<Context>, namespace: Option<&str>) {
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
    let controller = Controller::new(api::<BalancedService>(&client, namespace), config);
    let _ = ctx.watched.set(controller.store());
    controller
        .owns(api::<Deployment>(&client, namespace), owned.clone())
        .owns(api::<Service>(&client, namespace), owned.clone())
        .owns(
            api::<PodDisruptionBudget>(&client, namespace),
            owned.clone(),
        )
        .owns(api::<ServiceAccount>(&client, namespace), owned.clone())
        .owns(api::<Role>(&client, namespace), owned.clone())
        .owns(api::<RoleBinding>(&client, namespace), owned)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(name = %object.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "controller event"),
            }
        })
        .await;
}

#[cfg(test)]
mod tests;
