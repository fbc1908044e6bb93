//! The reconcile loop: validate -> build -> apply -> status. Only `apply` and the status
//! and Event writes talk to the API server.

use ballast_api::BalancedService;
use ballast_api::meta::RolloutRequest;
use ballast_api::status::BalancedServiceStatus;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tracing::Instrument;

use crate::build::{BuildContext, MANAGER, OwnedObjects, build, slow_probes};
pub use crate::cache::{CacheWriters, Caches};
use crate::metrics::Metrics;
use crate::observe::{AppPod, ProxyObservation, ProxyReader};
use crate::proxy_watch::ProxyReadings;
use crate::rollout::{self, Inputs, Memory, Policy, RolloutAction, Tracked, Waiting};
use crate::status::{Blocked, Observed, compute, transitions};
use crate::validate::{Limits, ValidatedSpec, validate};

/// Set this annotation (any value) on a BalancedService to resume a paused rollout;
/// the operator removes it once acted on (see [`RolloutRequest`]).
pub const RESUME_ANNOTATION: &str = RolloutRequest::Resume.annotation();

/// Longest wait for one proxy's admin answer.
const PROXY_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// What a reconcile failed to do.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// Reading an object ballast is about to apply (to check who owns it) failed.
    #[error("reading {kind} {name} failed")]
    ReadObject {
        /// Kind of the object.
        kind: &'static str,
        /// Its name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// An object ballast needs exists and belongs to somebody else; nothing was applied.
    #[error("{kind} {name} exists and is not this BalancedService's")]
    Conflict {
        /// Kind of the object.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// The API server refused an apply; status and an Event say why.
    #[error("the API server refused {kind} {name} (see the BalancedService's status)")]
    ApplyFailed {
        /// Kind of the object.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// Writing a pod's `ballast.dev/routable` condition failed.
    #[error("setting the readiness gate of pod {pod} failed")]
    PatchPodStatus {
        /// The pod.
        pod: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Labelling an app pod (adopting it, or retiring it before its deletion) failed.
    #[error("patching pod {pod} failed")]
    PatchPod {
        /// The pod.
        pod: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Switching the front Service to the proxies, or back, failed.
    #[error("patching Service {name} failed")]
    PatchService {
        /// The Service.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Removing ballast's fields from an adopted Deployment failed.
    #[error("releasing Deployment {name} failed")]
    ReleaseDeployment {
        /// The Deployment.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Adding or removing the give-back finalizer failed.
    #[error("updating the finalizers failed")]
    Finalizer(#[source] kube::Error),
    /// Removing the rollout request annotations (resume, pause, abort) failed.
    #[error("removing the rollout request annotations failed")]
    ClearRequests(#[source] kube::Error),
    /// Writing the status failed.
    #[error("writing status failed")]
    PatchStatus(#[source] kube::Error),
    /// The pod/ReplicaSet watches stopped (the controller is shutting down).
    #[error("the pod and ReplicaSet caches stopped")]
    CacheClosed,
    /// The object came without a namespace (it is namespaced: a bug elsewhere).
    #[error("BalancedService without namespace")]
    MissingNamespace,
}

impl ReconcileError {
    /// Fixed metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::ReadObject { .. } => "read_object",
            Self::ApplyFailed { .. } => "apply_failed",
            Self::Conflict { .. } => "conflict",
            Self::PatchPodStatus { .. } => "patch_pod_status",
            Self::PatchPod { .. } => "patch_pod",
            Self::PatchService { .. } => "patch_service",
            Self::ReleaseDeployment { .. } => "release_deployment",
            Self::Finalizer(_) => "finalizer",
            Self::ClearRequests(_) => "clear_requests",
            Self::PatchStatus(_) => "patch_status",
            Self::MissingNamespace => "missing_namespace",
            Self::CacheClosed => "cache_closed",
        }
    }
}

/// Per BalancedService, per owned object (kind, name): (body hash, fingerprint).
type AppliedObjects =
    HashMap<ObjectRef<BalancedService>, HashMap<(&'static str, String), (u64, u64)>>;

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
    /// Reads the proxies' admin endpoints.
    pub proxies: ProxyReader,
    /// Pods and ReplicaSets.
    caches: Caches,
    /// The latest reading of each BalancedService's proxies, from [`proxy_watch`].
    readings: ProxyReadings,
    /// True while [`proxy_watch::run`] reads the proxies: reconciles then need no
    /// short requeue, a change wakes them.
    watching_proxies: std::sync::atomic::AtomicBool,
    /// Rollout counters per BalancedService, between reconciles.
    memory: Mutex<HashMap<ObjectRef<BalancedService>, Memory>>,
    /// Per BalancedService uid, the owned objects (kind, name) seen to carry its
    /// ownerReference or to not exist: those are applied without reading them first.
    confirmed: Mutex<HashMap<String, BTreeSet<(&'static str, String)>>>,
    /// Per BalancedService, per owned object (kind, name): the hash of the body last
    /// applied and the fingerprint of what the API server answered.
    applied: Mutex<AppliedObjects>,
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
        caches: Caches,
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
            proxies: ProxyReader::new(PROXY_READ_TIMEOUT),
            caches,
            readings: ProxyReadings::default(),
            watching_proxies: std::sync::atomic::AtomicBool::new(false),
            memory: Mutex::new(HashMap::new()),
            confirmed: Mutex::new(HashMap::new()),
            applied: Mutex::new(HashMap::new()),
            watched: std::sync::OnceLock::new(),
        }
    }
}

impl Context {
    /// Drops what is remembered for BalancedServices that no longer exist, so the
    /// operator's memory follows the live objects, not every object it ever saw.
    fn forget_gone(&self, live: &[Arc<BalancedService>]) {
        let refs: std::collections::HashSet<ObjectRef<BalancedService>> =
            live.iter().map(|bs| ObjectRef::from(bs.as_ref())).collect();
        let uids: std::collections::HashSet<&str> = live
            .iter()
            .filter_map(|bs| bs.metadata.uid.as_deref())
            .collect();
        self.memory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|key, _| refs.contains(key));
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|key, _| refs.contains(key));
        self.confirmed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|uid, _| uids.contains(uid.as_str()));
        self.applied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|key, _| refs.contains(key));
    }

    /// Entries remembered per BalancedService (rollout memory, backoff, objects known
    /// to be ours), summed: follows the live BalancedServices.
    pub fn remembered(&self) -> usize {
        self.memory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
            + self
                .failures
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len()
            + self
                .confirmed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len()
            + self
                .applied
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len()
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
    let object = ObjectRef::from(bs.as_ref());
    let span = tracing::info_span!(
        "reconcile",
        namespace = object.namespace.as_deref().unwrap_or_default(),
        name = %object.name,
    );
    let result = reconcile_inner(&bs, &ctx).instrument(span).await;
    if let Some(store) = ctx.watched.get() {
        let live = store.state();
        ctx.metrics.set_managed(live.len(), OwnedObjects::COUNT);
        ctx.forget_gone(&live);
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
    let now = whole_seconds(k8s_openapi::jiff::Timestamp::now());
    let adopted = match &bs.spec.workload_ref {
        Some(reference) => adoption::read_deployment(ctx, &namespace, &reference.name).await?,
        None => None,
    };
    if bs.metadata.deletion_timestamp.is_some() {
        // Only an adopting BalancedService has a finalizer: give everything back.
        let Some(step) = adoption::give_back(ctx, bs, &namespace, adopted.as_ref()).await? else {
            return Ok(Action::await_change());
        };
        let observed = Observed {
            adoption: Some(step),
            ..Observed::default()
        };
        let before = bs.status.clone().unwrap_or_default();
        let status = compute(bs, &observed, None, Time(now));
        if status != before {
            write_status(ctx, bs, &namespace, &status).await?;
        }
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    if bs.spec.workload_ref.is_some() {
        adoption::ensure_finalizer(ctx, bs, &namespace).await?;
    }
    let (observed, blocked) = match (&bs.spec.workload_ref, &adopted) {
        (Some(reference), None) => {
            tracing::warn!(deployment = %reference.name, "the Deployment to adopt does not exist");
            (
                Observed {
                    adoption: Some(adoption::Adoption {
                        healthy: false,
                        reason: "WorkloadNotFound",
                        message: format!("Deployment {} does not exist", reference.name),
                    }),
                    ..Observed::default()
                },
                Some(Blocked::WorkloadNotFound(reference.name.clone())),
            )
        }
        _ => match validate(bs, adopted.as_ref(), &ctx.limits) {
            Err(invalid) => {
                tracing::warn!(error = %invalid, "invalid spec: nothing applied");
                // With a workloadRef the problem may be the Deployment's (a selector a
                // Service cannot express): the adoption is not healthy either.
                let adoption = bs.spec.workload_ref.as_ref().map(|r| adoption::Adoption {
                    healthy: false,
                    reason: "InvalidSpec",
                    message: format!(
                        "Deployment {} cannot be adopted as it is: {invalid}",
                        r.name
                    ),
                });
                (
                    Observed {
                        adoption,
                        ..Observed::default()
                    },
                    Some(Blocked::InvalidSpec(invalid)),
                )
            }
            Ok(valid) => converge(ctx, &valid, &namespace, now).await?,
        },
    };
    let before = bs.status.clone().unwrap_or_default();
    let status = compute(bs, &observed, blocked.as_ref(), Time(now));
    if status != before {
        write_status(ctx, bs, &namespace, &status).await?;
    }
    let requests = RolloutRequest::requested(bs.annotations());
    if blocked.is_none() && !requests.is_empty() {
        // Acted on (or answered with an Event): remove them so that a request does not
        // act again on the next rollout.
        clear_requests(ctx, bs, &namespace, &requests).await?;
    }
    let mut events = transitions(&before, &status);
    if let Some(tracked) = &observed.tracked {
        events.extend(tracked.events.iter().cloned());
    }
    publish(ctx, bs, events).await;
    // Status and Events say why; the retry backs off like any failure.
    match blocked {
        Some(Blocked::ApplyFailed { kind, name, .. }) => {
            return Err(ReconcileError::ApplyFailed { kind, name });
        }
        Some(Blocked::Conflict { kind, name, .. }) => {
            return Err(ReconcileError::Conflict { kind, name });
        }
        Some(Blocked::InvalidSpec(_) | Blocked::WorkloadNotFound(_)) | None => {}
    }
    Ok(Action::requeue(rollout::requeue_after(Waiting {
        proxies_watched: ctx
            .watching_proxies
            .load(std::sync::atomic::Ordering::Relaxed),
        gate: !observed.gate_waiting.is_empty(),
        proxies_readable: observed
            .tracked
            .as_ref()
            .is_some_and(|t| t.proxies_readable),
        draining: !status.draining.is_empty(),
        rolling: status
            .conditions
            .iter()
            .any(|c| c.type_ == "Progressing" && c.status == "True"),
    })))
}

/// Server-side applies `status` as the whole status subresource.
async fn write_status(
    ctx: &Context,
    bs: &BalancedService,
    namespace: &str,
    status: &BalancedServiceStatus,
) -> Result<(), ReconcileError> {
    let body = StatusApply {
        api_version: BalancedService::api_version(&()).into_owned(),
        kind: BalancedService::kind(&()).into_owned(),
        status,
    };
    Api::<BalancedService>::namespaced(ctx.client.clone(), namespace)
        .patch_status(
            &bs.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(ReconcileError::PatchStatus)?;
    Ok(())
}

/// Removes the annotations of `requests`.
async fn clear_requests(
    ctx: &Context,
    bs: &BalancedService,
    namespace: &str,
    requests: &[RolloutRequest],
) -> Result<(), ReconcileError> {
    let removed: serde_json::Map<String, serde_json::Value> = requests
        .iter()
        .map(|r| (r.annotation().to_owned(), serde_json::Value::Null))
        .collect();
    let patch = serde_json::json!({"metadata": {"annotations": removed}});
    merge_patch(ctx, bs, namespace, &patch)
        .await
        .map_err(ReconcileError::ClearRequests)
}

/// A JSON merge patch of the BalancedService itself (its metadata).
async fn merge_patch(
    ctx: &Context,
    bs: &BalancedService,
    namespace: &str,
    patch: &serde_json::Value,
) -> Result<(), kube::Error> {
    Api::<BalancedService>::namespaced(ctx.client.clone(), namespace)
        .patch(
            &bs.name_any(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
        .map(drop)
}

/// Publishes one Event per transition. An Event is best effort: a failure is logged,
/// never fails the reconcile.
async fn publish(ctx: &Context, bs: &BalancedService, transitions: Vec<crate::status::Transition>) {
    for transition in transitions {
        let event = Event {
            type_: if transition.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: transition.reason.to_owned(),
            note: Some(event_note(transition.message)),
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &bs.object_ref(&())).await {
            tracing::warn!(error = %e, reason = transition.reason, "publishing Event failed");
        }
    }
}

/// Reads what runs, decides about the rollout, builds what should run, checks that
/// every object is ballast's to write, and applies. A conflict or a refused apply is returned as [`Blocked`] (for
/// status), not as an error, so that it reaches the user before the retry.
async fn converge(
    ctx: &Context,
    valid: &ValidatedSpec<'_>,
    namespace: &str,
    now: k8s_openapi::jiff::Timestamp,
) -> Result<(Observed, Option<Blocked>), ReconcileError> {
    let bs = valid.bs;
    // An adopted Deployment: its front Service may be the user's, switched to the
    // proxies once they route to every ready pod; ballast's fields go onto the
    // Deployment only once the traffic goes through the proxies. A Service that may not
    // be taken over stops the reconcile before anything (a pod's label included) is
    // written.
    let front = match valid.adopted {
        None => adoption::Front::Ours,
        Some(_) => adoption::front_of(
            bs,
            adoption::read_service(ctx, namespace, valid.front_name).await?,
        ),
    };
    if let adoption::Front::Theirs(service) = &front
        && !bs.spec.service.adopt
    {
        let conflict = Blocked::Conflict {
            kind: "Service",
            name: valid.front_name.to_owned(),
            owner: format!(
                "{}; set spec.service.adopt: true to switch it to the proxies",
                apply::owner_of(
                    &service.metadata,
                    bs.metadata.uid.as_deref().unwrap_or_default()
                )
                .describe()
            ),
        };
        return Ok((Observed::default(), Some(conflict)));
    }
    if let Some(deployment) = valid.adopted {
        let cached = ctx.caches.pods_of(bs, namespace, "app").len();
        pods::label_adopted_pods(ctx, bs, namespace, deployment, cached).await?;
    }
    let (pods, proxies) = pods::observe(ctx, bs, namespace).await?;
    let now_unix = now.as_millisecond() as f64 / 1000.0;
    let replica_sets = ctx.caches.replica_sets_of(bs, namespace);
    let mut tracked = track(ctx, bs, &pods, &proxies, &replica_sets, now_unix);
    let action = rollout::decide(
        &mut tracked,
        &Policy {
            thresholds: &bs.spec.rollout.pause_when,
            generation: bs.metadata.generation.unwrap_or_default(),
            request: RolloutRequest::strongest(bs.annotations()),
            now: now_unix,
        },
    );
    let mut objects = build(valid, &ctx.build);
    steer(&mut objects.app_deployment, &action, &replica_sets);

    let plan = apply::ApplyPlan {
        front_service: matches!(front, adoption::Front::Ours),
        app_deployment: !matches!(front, adoption::Front::Theirs(_)),
    };
    if let Some(conflict) = apply::check_ownership(ctx, bs, namespace, &objects, &plan).await? {
        tracing::warn!(error = %conflict.message(), "not applying: an object is not ballast's");
        return Ok((Observed::default(), Some(conflict)));
    }
    let mut observed = match apply::apply(ctx, bs, namespace, &objects, &plan).await {
        Ok(observed) => observed,
        Err(refused) => return Ok((Observed::default(), Some(refused))),
    };
    let mut guard = crate::adopt::Guard::default();
    if let Some(deployment) = valid.adopted {
        let switched = match &front {
            adoption::Front::Ours => Ok(()),
            adoption::Front::Switched(service) | adoption::Front::Theirs(service) => {
                let wanted = bs.spec.proxy.replicas;
                let ready = observed
                    .proxy
                    .as_ref()
                    .and_then(|p| p.status.as_ref())
                    .and_then(|s| s.ready_replicas)
                    .unwrap_or(0);
                let pods_counted = deployment
                    .status
                    .as_ref()
                    .and_then(|s| s.ready_replicas)
                    .unwrap_or(0);
                let switch = match front {
                    adoption::Front::Switched(_) => Ok(()),
                    _ => crate::adopt::ready_to_switch(
                        ready,
                        wanted,
                        &deployment.name_any(),
                        pods_counted,
                        &pods,
                        &proxies,
                    ),
                };
                match switch {
                    Ok(()) => {
                        // Switching again undoes a change of selector by somebody else.
                        let patch = crate::adopt::switch_patch(bs, service, &objects.front_service);
                        let patch = match patch {
                            Ok(patch) => patch,
                            Err(why) => {
                                let invalid = crate::validate::InvalidSpec(vec![
                                    crate::validate::FieldError {
                                        field: "spec.ports".to_owned(),
                                        message: why,
                                    },
                                ]);
                                return Ok((
                                    Observed::default(),
                                    Some(Blocked::InvalidSpec(invalid)),
                                ));
                            }
                        };
                        if !crate::adopt::is_switched(bs, service) {
                            adoption::patch_service(ctx, namespace, valid.front_name, &patch)
                                .await?;
                            tracing::info!(
                                service = valid.front_name,
                                "front Service switched to the proxies"
                            );
                        }
                        if !plan.app_deployment {
                            // Switched just now: ballast's fields go onto the Deployment
                            // in this reconcile, not one requeue later.
                            match apply::apply_app_deployment(ctx, bs, namespace, &objects).await {
                                Ok(app) => observed.app = Some(app),
                                Err(refused) => return Ok((Observed::default(), Some(refused))),
                            }
                        }
                        Ok(())
                    }
                    Err(why) => Err(why),
                }
            }
        };
        let desired = deployment
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(1);
        let max_unavailable =
            crate::adopt::resolve_count(&bs.spec.rollout.max_unavailable, desired);
        guard = crate::adopt::guard(
            desired,
            max_unavailable,
            &pods,
            &proxies,
            now.as_second(),
            i64::from(bs.spec.rollout.drain_timeout_seconds),
        );
        if let Some(pod) = &guard.retire {
            pods::retire(ctx, namespace, pod, now.as_second()).await?;
        }
        let old = pods.iter().filter(|p| !p.gated && !p.deleting).count();
        observed.adoption = Some(adoption::adopted(
            &deployment.name_any(),
            valid.front_name,
            switched,
            &guard,
            old,
        ));
        if observed.app.is_none() {
            observed.app = Some(deployment.clone());
        }
    }
    observed.slow_probes = slow_probes(valid);
    observed.bypassed = bypasses(ctx, valid, namespace);
    observed.replica_sets = replica_sets;
    observed.gate_waiting = pods::set_gates(ctx, namespace, &pods, &proxies, guard.open).await?;
    observed.tracked = Some(tracked);
    Ok((observed, None))
}

/// Whatever sends to the app pods around the proxies, from the watches' caches.
fn bypasses(
    ctx: &Context,
    valid: &ValidatedSpec<'_>,
    namespace: &str,
) -> Vec<crate::bypass::Bypass> {
    let services = ctx.caches.services_in(namespace);
    let app_pods: Vec<_> = ctx
        .caches
        .pods_of(valid.bs, namespace, "app")
        .iter()
        .filter_map(|p| p.metadata.labels.clone())
        .collect();
    let mut found = crate::bypass::neg_services(
        services.iter().map(AsRef::as_ref),
        valid.front_name,
        &app_pods,
    );
    let backends = crate::build::backends_name(valid);
    for (kind, routes) in ctx.caches.routes_in(namespace) {
        found.extend(crate::bypass::routes_to(
            routes.iter().map(AsRef::as_ref),
            kind,
            namespace,
            &backends,
        ));
    }
    found
}

/// `at` without its fraction: what a `metav1.Time` keeps through the API server, so a
/// status computed now compares equal to the same status read back.
fn whole_seconds(at: k8s_openapi::jiff::Timestamp) -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::from_second(at.as_second()).unwrap_or(at)
}

/// Rollout tracking with this BalancedService's memory.
fn track(
    ctx: &Context,
    bs: &BalancedService,
    pods: &[AppPod],
    proxies: &[ProxyObservation],
    replica_sets: &[ReplicaSet],
    now_unix: f64,
) -> Tracked {
    let update_revision = crate::build::update_revision(bs, replica_sets);
    let previous = bs.status.as_ref().and_then(|s| s.last_rollout.as_ref());
    let mut memory = ctx.memory.lock().unwrap_or_else(PoisonError::into_inner);
    let memory = memory.entry(ObjectRef::from(bs)).or_default();
    rollout::track(
        memory,
        &Inputs {
            now: now_unix,
            update_revision: &update_revision,
            pods,
            proxies,
            previous,
        },
    )
}

/// The app Deployment as the rollout decision wants it: as built, paused, or with the
/// previous revision's pod template (paused when its ReplicaSet is gone).
fn steer(app: &mut Deployment, action: &RolloutAction, replica_sets: &[ReplicaSet]) {
    let template = match action {
        RolloutAction::Proceed => return,
        RolloutAction::Pause => None,
        RolloutAction::RollBack { revision } => previous_template(replica_sets, revision),
    };
    let spec = app.spec.get_or_insert_default();
    match template {
        Some(template) => spec.template = template,
        None => spec.paused = Some(true),
    }
}

/// The pod template of the ReplicaSet running `revision`, to roll back to.
fn previous_template(
    replica_sets: &[ReplicaSet],
    revision: &str,
) -> Option<k8s_openapi::api::core::v1::PodTemplateSpec> {
    let rs = replica_sets.iter().find(|rs| {
        rs.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(crate::build::REVISION_LABEL))
            .is_some_and(|r| r == revision)
    })?;
    let mut template = rs.spec.as_ref()?.template.clone()?;
    // The Deployment controller adds this label to each ReplicaSet's copy.
    if let Some(labels) = template.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        labels.remove("pod-template-hash");
    }
    Some(template)
}

/// Longest Event note the API server accepts (events.k8s.io/v1 `note`: 1 KiB).
const EVENT_NOTE_MAX_BYTES: usize = 1024;

/// `note` cut to what an Event accepts, at a character boundary, marked when cut.
fn event_note(mut note: String) -> String {
    if note.len() > EVENT_NOTE_MAX_BYTES {
        let mut end = EVENT_NOTE_MAX_BYTES - "...".len();
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push_str("...");
    }
    note
}

/// Requeue after a failure with exponential backoff per object: 1 s, 2 s, 4 s ... 5 min.
pub fn error_policy(bs: Arc<BalancedService>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    let mut failures = ctx.failures.lock().unwrap_or_else(PoisonError::into_inner);
    let count = failures.entry(ObjectRef::from(bs.as_ref())).or_insert(0);
    *count = count.saturating_add(1);
    let delay = backoff(*count);
    tracing::warn!(namespace = bs.namespace().unwrap_or_default(), name = %bs.name_any(), error = %crate::error_chain(error), retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Delay before the `failures`-th retry.
pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(9)).min(Duration::from_secs(300))
}

mod adoption;
mod apply;
mod pods;
mod watches;

pub use crate::adopt::{ADOPTED_BY, ORIGINAL};
pub use adoption::{Adoption, FINALIZER};
pub use watches::run;
#[cfg(test)]
mod adopt_tests;
#[cfg(test)]
mod tests;
