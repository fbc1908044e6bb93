//! The reconcile loop: validate -> build -> apply -> status. Only `apply` and the status
//! and Event writes talk to the API server.

use ballast_api::BalancedService;
use ballast_api::status::BalancedServiceStatus;
use futures::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Pod, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::build::{BuildContext, MANAGER, OwnedObjects, build, slow_probes, template_revision};
use crate::cache::reflected;
pub use crate::cache::{CacheWriters, Caches};
use crate::gate::{self, Verdict};
use crate::metrics::Metrics;
use crate::observe::{AppPod, ProxyObservation, ProxyReader, ROUTABLE_CONDITION};
use crate::proxy_watch::{self, ProxyReadings};
use crate::rollout::{self, Inputs, Memory, Tracked};
use crate::status::{Blocked, Observed, compute, transitions};
use crate::triggers::{PodChanges, coalesce, receiver_stream};
use crate::validate::{Limits, ValidatedSpec, validate};

/// Set this annotation (any value) on a BalancedService to resume a rollout ballast
/// paused; the operator removes it once acted on.
pub const RESUME_ANNOTATION: &str = "ballast.dev/resume";

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
    /// Removing the resume annotation failed.
    #[error("removing the {RESUME_ANNOTATION} annotation failed")]
    ClearResume(#[source] kube::Error),
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
            Self::ClearResume(_) => "clear_resume",
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
    let result = reconcile_inner(&bs, &ctx).await;
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
    let (observed, blocked) = match validate(bs, &ctx.limits) {
        Err(invalid) => {
            tracing::warn!(name = %bs.name_any(), %namespace, error = %invalid, "invalid spec: nothing applied");
            (Observed::default(), Some(Blocked::InvalidSpec(invalid)))
        }
        Ok(valid) => converge(ctx, &valid, &namespace, now).await?,
    };
    let before = bs.status.clone().unwrap_or_default();
    let status = compute(bs, &observed, blocked.as_ref(), Time(now));
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
    let resumed_by_annotation = bs.annotations().contains_key(RESUME_ANNOTATION);
    if resumed_by_annotation && blocked.is_none() {
        // Acted on (or nothing to resume): remove it so it does not resume the next pause.
        let patch = serde_json::json!({"metadata": {"annotations": {RESUME_ANNOTATION: null}}});
        Api::<BalancedService>::namespaced(ctx.client.clone(), &namespace)
            .patch(
                &bs.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(ReconcileError::ClearResume)?;
    }
    let mut events = transitions(&before, &status);
    if let Some(tracked) = &observed.tracked {
        events.extend(tracked.events.iter().cloned());
    }
    for transition in events {
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
        // An Event is best effort: a failure is logged, never fails the reconcile.
        if let Err(e) = ctx.recorder.publish(&event, &bs.object_ref(&())).await {
            tracing::warn!(name = %bs.name_any(), error = %e, reason = transition.reason, "publishing Event failed");
        }
    }
    // Status and Events say why; the retry backs off like any failure.
    match blocked {
        Some(Blocked::ApplyFailed { kind, name, .. }) => {
            return Err(ReconcileError::ApplyFailed { kind, name });
        }
        Some(Blocked::Conflict { kind, name, .. }) => {
            return Err(ReconcileError::Conflict { kind, name });
        }
        Some(Blocked::InvalidSpec(_)) | None => {}
    }
    if ctx
        .watching_proxies
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        // Pods, owned objects and the proxies' reports wake the controller on change;
        // this is only the safety net.
        return Ok(Action::requeue(Duration::from_secs(60)));
    }
    // Without the proxy watch (tests drive reconcile alone) the proxies are polled:
    // every second while a pod waits for proxies that are read fine (their watches are
    // about to catch up), every 2 s while pods drain, every 5 s during a rollout (or
    // while no proxy can be read), every 30 s for the balance otherwise.
    let rolling = status
        .conditions
        .iter()
        .any(|c| c.type_ == "Progressing" && c.status == "True");
    let proxies_readable = observed
        .tracked
        .as_ref()
        .is_some_and(|t| t.proxies_readable);
    Ok(Action::requeue(
        if !observed.gate_waiting.is_empty() && proxies_readable {
            Duration::from_secs(1)
        } else if !status.draining.is_empty() {
            Duration::from_secs(2)
        } else if rolling || !observed.gate_waiting.is_empty() {
            Duration::from_secs(5)
        } else {
            Duration::from_secs(30)
        },
    ))
}

/// Reads what runs, builds what should, checks that every object is ballast's to
/// write, and applies. A conflict or a refused apply is returned as [`Blocked`] (for
/// status), not as an error, so that it reaches the user before the retry.
async fn converge(
    ctx: &Context,
    valid: &ValidatedSpec<'_>,
    namespace: &str,
    now: k8s_openapi::jiff::Timestamp,
) -> Result<(Observed, Option<Blocked>), ReconcileError> {
    let bs = valid.bs;
    let (pods, proxies) = observe(ctx, bs, namespace).await?;
    let tracked = track(ctx, bs, &pods, &proxies, now);
    let mut objects = build(valid, &ctx.build);
    let rollout = tracked.last_rollout.as_ref();
    let replica_sets = ctx.caches.replica_sets_of(bs, namespace);
    let rollback = rollout
        .filter(|r| {
            r.paused
                .as_ref()
                .is_some_and(|p| p.rolled_back && !p.resumed)
        })
        .and_then(|r| previous_template(&replica_sets, r.previous_revision.as_deref()));
    match (rollout.and_then(|r| r.paused.as_ref()), rollback) {
        (Some(p), Some(template)) if !p.resumed && running(rollout) => {
            objects.app_deployment.spec.get_or_insert_default().template = template;
        }
        (Some(p), _) if !p.resumed && running(rollout) => {
            objects.app_deployment.spec.get_or_insert_default().paused = Some(true);
        }
        _ => {}
    }
    if let Some(conflict) = check_ownership(ctx, bs, namespace, &objects).await? {
        tracing::warn!(name = %bs.name_any(), %namespace, conflict = %conflict.message(), "not applying: an object is not ballast's");
        return Ok((Observed::default(), Some(conflict)));
    }
    let mut observed = match apply(ctx, bs, namespace, &objects).await {
        Ok(observed) => observed,
        Err(refused) => return Ok((Observed::default(), Some(refused))),
    };
    observed.slow_probes = slow_probes(valid);
    observed.replica_sets = replica_sets;
    observed.gate_waiting = set_gates(ctx, namespace, &pods, &proxies).await?;
    observed.tracked = Some(tracked);
    Ok((observed, None))
}

/// `at` without its fraction: what a `metav1.Time` keeps through the API server, so a
/// status computed now compares equal to the same status read back.
fn whole_seconds(at: k8s_openapi::jiff::Timestamp) -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::from_second(at.as_second()).unwrap_or(at)
}

/// True while the rollout on status has not finished.
fn running(rollout: Option<&ballast_api::status::RolloutSummary>) -> bool {
    rollout.is_some_and(|r| r.finished_at.is_none())
}

/// The app pods, and the ready proxy pods (how many, and what each reports).
async fn observe(
    ctx: &Context,
    bs: &BalancedService,
    namespace: &str,
) -> Result<(Vec<AppPod>, Vec<ProxyObservation>), ReconcileError> {
    ctx.caches.ready().await?;
    let app: Vec<AppPod> = ctx
        .caches
        .pods_of(bs, namespace, "app")
        .iter()
        .map(|p| AppPod::from_pod(p))
        .collect();
    let proxies = ctx.caches.proxy_pods(bs, namespace);
    let key = ObjectRef::from(bs);
    // With the proxy watch running its reading is at most a period old, and a change
    // since has already woken this reconcile; without it, read now.
    let watched = ctx
        .watching_proxies
        .load(std::sync::atomic::Ordering::Relaxed)
        .then(|| ctx.readings.fresh(&key, &proxies))
        .flatten();
    let observations = match watched {
        Some(observations) => observations,
        None => {
            let observations = ctx.proxies.observe(&proxies).await;
            ctx.readings.record(key, &proxies, observations.clone());
            observations
        }
    };
    for o in &observations {
        if let Err(e) = &o.report {
            tracing::warn!(name = %bs.name_any(), proxy = %o.proxy, error = %e, "reading a proxy failed");
        }
    }
    Ok((app, observations))
}

/// Rollout tracking with this BalancedService's memory, and the pause decision.
fn track(
    ctx: &Context,
    bs: &BalancedService,
    pods: &[AppPod],
    proxies: &[ProxyObservation],
    now: k8s_openapi::jiff::Timestamp,
) -> Tracked {
    let now_unix = now.as_millisecond() as f64 / 1000.0;
    let update_revision = template_revision(&bs.spec.template);
    let previous = bs.status.as_ref().and_then(|s| s.last_rollout.as_ref());
    let mut memory = ctx.memory.lock().unwrap_or_else(PoisonError::into_inner);
    let memory = memory.entry(ObjectRef::from(bs)).or_default();
    let mut tracked = rollout::track(
        memory,
        &Inputs {
            now: now_unix,
            update_revision: &update_revision,
            pods,
            proxies,
            previous,
        },
    );
    let generation = bs.metadata.generation.unwrap_or_default();
    let annotated = bs.annotations().contains_key(RESUME_ANNOTATION);
    if let Some(summary) = tracked.last_rollout.as_mut() {
        match summary.paused.as_mut() {
            Some(pause) if rollout::resumes(pause, generation, annotated) => {
                pause.resumed = true;
                tracked.events.push(crate::status::Transition {
                    reason: "RolloutResumed",
                    message: format!("rollout of revision {} resumed", summary.revision),
                    warning: false,
                });
            }
            Some(_) => {}
            None => {
                let thresholds = &bs.spec.rollout.pause_when;
                if let Some(reason) = rollout::pause_reason(thresholds, summary) {
                    let rollback = thresholds.rollback && summary.previous_revision.is_some();
                    tracked.events.push(crate::status::Transition {
                        reason: if rollback {
                            "RolledBack"
                        } else {
                            "RolloutPaused"
                        },
                        message: if rollback {
                            format!(
                                "rolling back to revision {}: {reason}",
                                summary.previous_revision.clone().unwrap_or_default()
                            )
                        } else {
                            format!("rollout of revision {} paused: {reason}", summary.revision)
                        },
                        warning: true,
                    });
                    summary.paused = Some(rollout::pause(reason, now_unix, generation, rollback));
                }
            }
        }
    }
    tracked
}

/// The pod template of the ReplicaSet running `revision`, to roll back to.
fn previous_template(
    replica_sets: &[ReplicaSet],
    revision: Option<&str>,
) -> Option<k8s_openapi::api::core::v1::PodTemplateSpec> {
    let revision = revision?;
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

/// Writes the `ballast.dev/routable` condition of every pod whose verdict changed.
/// Returns the pods waiting for the proxies, with why.
async fn set_gates(
    ctx: &Context,
    namespace: &str,
    pods: &[AppPod],
    proxies: &[ProxyObservation],
) -> Result<Vec<(String, String)>, ReconcileError> {
    let api = Api::<Pod>::namespaced(ctx.client.clone(), namespace);
    let mut waiting = Vec::new();
    for pod in pods {
        let verdict = gate::decide(pod, proxies);
        if let Verdict::NotRoutable(why) = &verdict {
            waiting.push((pod.name.clone(), why.clone()));
        }
        let Some((value, message)) = gate::change(pod, &verdict) else {
            continue;
        };
        // Strategic merge: conditions merge by type, so kubelet's own stay untouched
        // on every Kubernetes version.
        let patch = serde_json::json!({"status": {"conditions": [{
            "type": ROUTABLE_CONDITION,
            "status": if value { "True" } else { "False" },
            "reason": if value { gate::REASON_LISTED } else { gate::REASON_WAITING },
            "message": message,
            "lastTransitionTime": Time(k8s_openapi::jiff::Timestamp::now()),
        }]}});
        match api
            .patch_status(
                &pod.name,
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            )
            .await
        {
            Ok(_) => {
                tracing::info!(pod = %pod.name, routable = value, %message, "readiness gate set")
            }
            // Deleted meanwhile: nothing to gate.
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(source) => {
                return Err(ReconcileError::PatchPodStatus {
                    pod: pod.name.clone(),
                    source,
                });
            }
        }
    }
    Ok(waiting)
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

/// The first owned object that exists without this BalancedService's ownerReference,
/// as a [`Blocked::Conflict`]. Objects confirmed before are not read again, so a
/// steady reconcile costs no reads.
async fn check_ownership(
    ctx: &Context,
    bs: &BalancedService,
    namespace: &str,
    objects: &OwnedObjects,
) -> Result<Option<Blocked>, ReconcileError> {
    let uid = bs.metadata.uid.clone().unwrap_or_default();
    let known = ctx
        .confirmed
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&uid)
        .cloned()
        .unwrap_or_default();
    let mut confirmed = known.clone();
    macro_rules! check {
        ($object:expr) => {
            if let Some(conflict) = check_one(
                &ctx.client,
                namespace,
                &uid,
                &known,
                &mut confirmed,
                $object,
            )
            .await?
            {
                return Ok(Some(conflict));
            }
        };
    }
    check!(&objects.proxy_service_account);
    check!(&objects.proxy_role);
    check!(&objects.proxy_role_binding);
    check!(&objects.backends_service);
    check!(&objects.proxy_admin_service);
    check!(&objects.proxy_deployment);
    check!(&objects.front_service);
    check!(&objects.app_deployment);
    check!(&objects.app_pdb);
    check!(&objects.proxy_pdb);
    if confirmed.len() != known.len() {
        ctx.confirmed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(uid, confirmed);
    }
    Ok(None)
}

async fn check_one<K>(
    client: &Client,
    namespace: &str,
    uid: &str,
    known: &BTreeSet<(&'static str, String)>,
    confirmed: &mut BTreeSet<(&'static str, String)>,
    object: &K,
) -> Result<Option<Blocked>, ReconcileError>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + DeserializeOwned
        + Clone
        + std::fmt::Debug,
{
    let kind = kind_name::<K>();
    let name = object.meta().name.clone().unwrap_or_default();
    let key = (kind, name.clone());
    if known.contains(&key) {
        return Ok(None);
    }
    let existing = Api::<K>::namespaced(client.clone(), namespace)
        .get_opt(&name)
        .await
        .map_err(|source| ReconcileError::ReadObject {
            kind,
            name: name.clone(),
            source,
        })?;
    match existing.as_ref().map(|o| owner_of(o.meta(), uid)) {
        None | Some(Ownership::Ours) => {
            confirmed.insert(key);
            Ok(None)
        }
        Some(Ownership::Other(owner)) => Ok(Some(Blocked::Conflict { kind, name, owner })),
    }
}

/// Whose an existing object is.
#[derive(Debug, PartialEq, Eq)]
enum Ownership {
    /// It carries the BalancedService's ownerReference.
    Ours,
    /// Somebody else's, described for the status message.
    Other(String),
}

fn owner_of(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    uid: &str,
) -> Ownership {
    let owners = meta.owner_references.as_deref().unwrap_or_default();
    if owners.iter().any(|o| o.uid == uid) {
        return Ownership::Ours;
    }
    if let Some(controller) = owners.iter().find(|o| o.controller == Some(true)) {
        return Ownership::Other(format!(
            "controlled by {} {}",
            controller.kind, controller.name
        ));
    }
    let managers: BTreeSet<&str> = meta
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|f| f.manager.as_deref())
        .collect();
    Ownership::Other(if managers.is_empty() {
        "no owner".to_owned()
    } else {
        format!(
            "written by {}",
            managers.into_iter().collect::<Vec<_>>().join(", ")
        )
    })
}

/// Applies every owned object in order: the proxies' identity and permissions first
/// (they are needed when the proxy starts), the backends Service before the proxies
/// (its EndpointSlices are what they watch), the proxies before the front Service and
/// the app (so traffic and new pods always find a proxy), budgets last. The first
/// refusal stops it, as [`Blocked::ApplyFailed`] with the API server's message.
async fn apply(
    ctx: &Context,
    bs: &BalancedService,
    namespace: &str,
    objects: &OwnedObjects,
) -> Result<Observed, Blocked> {
    let owned = &ctx.caches.owned;
    let target = Target {
        ctx,
        owner: ObjectRef::from(bs),
        namespace,
    };
    target
        .apply(&owned.service_accounts, &objects.proxy_service_account)
        .await?;
    target.apply(&owned.roles, &objects.proxy_role).await?;
    target
        .apply(&owned.role_bindings, &objects.proxy_role_binding)
        .await?;
    target
        .apply(&owned.services, &objects.backends_service)
        .await?;
    target
        .apply(&owned.services, &objects.proxy_admin_service)
        .await?;
    let proxy = target
        .apply(&owned.deployments, &objects.proxy_deployment)
        .await?;
    target
        .apply(&owned.services, &objects.front_service)
        .await?;
    let app = target
        .apply(&owned.deployments, &objects.app_deployment)
        .await?;
    target.apply(&owned.budgets, &objects.app_pdb).await?;
    target.apply(&owned.budgets, &objects.proxy_pdb).await?;
    Ok(Observed {
        app: Some(app),
        proxy: Some(proxy),
        ..Observed::default()
    })
}

/// Where owned objects are applied: one BalancedService's namespace.
struct Target<'a> {
    ctx: &'a Context,
    owner: ObjectRef<BalancedService>,
    namespace: &'a str,
}

impl Target<'_> {
    /// Server-side applies `object`, unless the same body was applied before and the
    /// object, as the watch shows it, is still what the API server answered then
    /// (same generation or version, labels, annotations, owners): a steady reconcile
    /// then writes nothing. Returns the object as the API server has it.
    async fn apply<K>(&self, live: &Store<K>, object: &K) -> Result<K, Blocked>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Serialize
            + DeserializeOwned
            + Clone
            + std::fmt::Debug,
    {
        let kind = kind_name::<K>();
        let name = object.meta().name.clone().unwrap_or_default();
        let desired = body_hash(object);
        let key = (kind, name.clone());
        let current = live.get(&ObjectRef::new(&name).within(self.namespace));
        let last = self
            .ctx
            .applied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&self.owner)
            .and_then(|m| m.get(&key).copied());
        if let (Some(current), Some(last)) = (&current, last)
            && last == (desired, fingerprint(current.meta()))
        {
            return Ok(K::clone(current));
        }
        let applied = Api::<K>::namespaced(self.ctx.client.clone(), self.namespace)
            .patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(object),
            )
            .await
            .map_err(|source| {
                let message = match &source {
                    kube::Error::Api(status) => status.message.clone(),
                    other => crate::error_chain(other),
                };
                tracing::warn!(namespace = self.namespace, object = %name, kind, %message, "apply refused");
                Blocked::ApplyFailed {
                    kind,
                    name,
                    message,
                }
            })?;
        self.ctx
            .applied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(self.owner.clone())
            .or_default()
            .insert(key, (desired, fingerprint(applied.meta())));
        Ok(applied)
    }
}

/// A hash of what an apply would send.
fn body_hash<K: Serialize>(object: &K) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_vec(object)
        .unwrap_or_default()
        .hash(&mut hasher);
    hasher.finish()
}

/// What of an object's metadata changes when anybody changes what ballast applied: the
/// generation (its spec) where the kind has one, else the resourceVersion, and the
/// labels, annotations and ownerReferences. A status update (a Deployment rolling, a
/// budget counting healthy pods) leaves it alone.
fn fingerprint(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    match meta.generation {
        Some(generation) => generation.hash(&mut hasher),
        None => meta.resource_version.hash(&mut hasher),
    }
    meta.labels.hash(&mut hasher);
    meta.annotations.hash(&mut hasher);
    serde_json::to_vec(&meta.owner_references)
        .unwrap_or_default()
        .hash(&mut hasher);
    hasher.finish()
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
    let controller = Controller::new(api::<BalancedService>(&client, namespace), config);
    let services = controller.store();
    let _ = ctx.watched.set(services.clone());
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
            &owned,
            writers.deployments,
        ))
        .owns_stream(reflected(
            api::<Service>(&client, namespace),
            &owned,
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
        .reconcile_on(triggers)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(name = %object.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "controller event"),
            }
        });
    tokio::select! {
        () = controller => {}
        () = proxies => tracing::warn!("proxy watch stopped"),
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

#[cfg(test)]
mod tests;
