//! Status as a pure function of what the API server returned.

use ballast_api::BalancedService;
use ballast_api::status::{BalancedServiceStatus, ProxyStatus};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;

use crate::validate::InvalidSpec;

/// What the reconcile saw after applying.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// The app Deployment as returned by the apply.
    pub app: Option<Deployment>,
    /// The proxy Deployment as returned by the apply.
    pub proxy: Option<Deployment>,
    /// ReplicaSets of the app Deployment.
    pub replica_sets: Vec<ReplicaSet>,
    /// Containers whose own readiness probe slows rollouts.
    pub slow_probes: Vec<String>,
    /// App pods whose readiness gate waits for the proxies, with why.
    pub gate_waiting: Vec<(String, String)>,
    /// What the proxies reported, when they were read.
    pub tracked: Option<crate::rollout::Tracked>,
    /// The state of an adopted Deployment (`spec.workloadRef`), for `Adopted`.
    pub adoption: Option<crate::controller::Adoption>,
    /// What sends to the app pods around the proxies.
    pub bypassed: Vec<crate::bypass::Bypass>,
}

/// A status change worth an Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// Event reason.
    pub reason: &'static str,
    /// Event note.
    pub message: String,
    /// Warning (true) or Normal.
    pub warning: bool,
}

/// Why a reconcile did not apply the desired objects. The status keeps what it said
/// before, except `Degraded`, which says this.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blocked {
    /// Validation failed: nothing was applied.
    InvalidSpec(InvalidSpec),
    /// An object of the name ballast needs exists and is not ballast's: nothing was
    /// applied, so that nobody's Service or Deployment is taken over.
    Conflict {
        /// Kind of the object.
        kind: &'static str,
        /// Its name.
        name: String,
        /// Who owns it, as far as its metadata tells.
        owner: String,
    },
    /// The Deployment `spec.workloadRef` names does not exist: nothing was applied.
    WorkloadNotFound(String),
    /// The API server refused an apply (objects before it in apply order may be
    /// applied); retried with backoff.
    ApplyFailed {
        /// Kind of the object.
        kind: &'static str,
        /// Its name.
        name: String,
        /// The API server's message.
        message: String,
    },
}

impl Blocked {
    /// The `Degraded` reason (and Event reason).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidSpec(_) => "InvalidSpec",
            Self::Conflict { .. } => "Conflict",
            Self::WorkloadNotFound(_) => "WorkloadNotFound",
            Self::ApplyFailed { .. } => "ApplyFailed",
        }
    }

    /// The `Degraded` message: what happened and what to do.
    pub fn message(&self) -> String {
        match self {
            Self::InvalidSpec(e) => format!("nothing was changed: {e}"),
            Self::WorkloadNotFound(name) => format!(
                "the Deployment {name} named by spec.workloadRef does not exist; nothing was changed"
            ),
            Self::Conflict { kind, name, owner } => format!(
                "{kind} {name} already exists and is not managed by this BalancedService ({owner}); nothing was changed. Rename the BalancedService, or delete or rename the existing {kind}"
            ),
            Self::ApplyFailed {
                kind,
                name,
                message,
            } => format!("applying {kind} {name} failed, retrying: {message}"),
        }
    }
}

const AVAILABLE: &str = "Available";
const PROGRESSING: &str = "Progressing";
const DEGRADED: &str = "Degraded";
/// With `spec.workloadRef`: what was adopted and whether the adoption is healthy.
const ADOPTED: &str = "Adopted";

/// The new status. `blocked` is set when the desired objects were not (all) applied:
/// then only `Degraded` (and `observedGeneration`) change.
pub fn compute(
    bs: &BalancedService,
    observed: &Observed,
    blocked: Option<&Blocked>,
    now: Time,
) -> BalancedServiceStatus {
    let previous = bs.status.clone().unwrap_or_default();
    let generation = bs.metadata.generation;
    let mut status = if blocked.is_some() {
        previous.clone()
    } else {
        BalancedServiceStatus::default()
    };
    status.observed_generation = generation;
    // With workloadRef the replicas are the adopted Deployment's (its owner's, or its
    // autoscaler's); spec.replicas is not used.
    let desired = match &bs.spec.workload_ref {
        None => bs.spec.replicas,
        Some(_) => observed
            .app
            .as_ref()
            .and_then(|d| d.spec.as_ref())
            .map_or(bs.spec.replicas, |s| s.replicas.unwrap_or(1)),
    };

    if blocked.is_none() {
        if let Some(app) = observed.app.as_ref().and_then(|d| d.status.as_ref()) {
            status.replicas = app.replicas.unwrap_or(0);
            status.ready_replicas = app.ready_replicas.unwrap_or(0);
            status.updated_replicas = app.updated_replicas.unwrap_or(0);
            status.available_replicas = app.available_replicas.unwrap_or(0);
        }
        status.ready = Some(format!("{}/{desired}", status.available_replicas));
        status.selector = Some(format!(
            "{}={},{}=app",
            crate::build::SERVICE_LABEL,
            bs.metadata.name.as_deref().unwrap_or_default(),
            crate::build::ROLE_LABEL
        ));
        let (current, update) = revisions(bs, &observed.replica_sets);
        status.current_revision = current;
        status.update_revision = update;
        status.proxy = observed.proxy.as_ref().map(|p| ProxyStatus {
            replicas: bs.spec.proxy.replicas,
            ready_replicas: p
                .status
                .as_ref()
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0),
        });
        match &observed.tracked {
            Some(tracked) => {
                status.last_rollout = tracked.last_rollout.clone();
                status.balance = tracked.balance.clone().or_else(|| previous.balance.clone());
                status.draining = tracked.draining.clone();
            }
            None => {
                status.last_rollout = previous.last_rollout.clone();
                status.balance = previous.balance.clone();
                status.draining = previous.draining.clone();
            }
        }
    }

    let deadline_exceeded = observed
        .app
        .as_ref()
        .and_then(|d| d.status.as_ref())
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter().any(|c| {
                c.type_ == "Progressing" && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
            })
        });
    let proxy = status.proxy.clone().unwrap_or_default();
    let proxies_ready = proxy.ready_replicas >= bs.spec.proxy.replicas;
    let app_generation_seen = observed.app.as_ref().is_some_and(|d| {
        d.status.as_ref().and_then(|s| s.observed_generation) >= d.metadata.generation
    });
    let rolling = status.updated_replicas < desired
        || status.replicas > status.updated_replicas
        || !app_generation_seen;

    let pause = status
        .last_rollout
        .as_ref()
        .filter(|r| r.finished_at.is_none())
        .and_then(|r| r.paused.as_ref().map(|p| (r, p)))
        .filter(|(_, p)| !p.resumed);
    let mut conditions = Vec::new();
    let (degraded, reason, message) = match (blocked, deadline_exceeded) {
        (Some(b), _) => (true, b.reason(), b.message()),
        (None, _) if pause.is_some_and(|(_, p)| p.rolled_back) => (
            true,
            "RolledBack",
            pause
                .map(|(r, p)| {
                    format!(
                        "revision {} was rolled back to {}: {}; to try again change the spec or run `kubectl ballast resume {}` (sets the {} annotation)",
                        r.revision,
                        r.previous_revision.clone().unwrap_or_default(),
                        p.reason,
                        bs.name_any(),
                        crate::controller::RESUME_ANNOTATION
                    )
                })
                .unwrap_or_default(),
        ),
        (None, true) => (
            true,
            "ProgressDeadlineExceeded",
            format!(
                "no rollout progress within {}s",
                bs.spec.rollout.progress_deadline_seconds
            ),
        ),
        (None, false)
            if observed.proxy.is_some()
                && proxy.ready_replicas == 0
                && status.available_replicas > 0 =>
        {
            (
                true,
                "ProxyUnavailable",
                "no proxy replica is ready: clients cannot reach the app".to_owned(),
            )
        }
        (None, false) if !observed.bypassed.is_empty() => (
            true,
            "ProxyBypassed",
            observed
                .bypassed
                .iter()
                .map(crate::bypass::Bypass::describe)
                .collect::<Vec<_>>()
                .join("; "),
        ),
        (None, false) if !observed.slow_probes.is_empty() => (
            false,
            "SlowProbes",
            format!(
                "readiness probes of {:?} run less often than every {}s, which slows rollouts",
                observed.slow_probes,
                crate::build::SLOW_PROBE_PERIOD_SECONDS
            ),
        ),
        _ => (false, "AsExpected", "no problem found".to_owned()),
    };
    if blocked.is_none() {
        let available = status.available_replicas >= desired && proxies_ready;
        let message = format!(
            "{}/{desired} app pods available, {}/{} proxies ready",
            status.available_replicas, proxy.ready_replicas, bs.spec.proxy.replicas
        );
        let reason = if available {
            "AllAvailable"
        } else if proxies_ready {
            "PodsUnavailable"
        } else {
            "ProxiesUnavailable"
        };
        conditions.push(condition(
            &previous, AVAILABLE, available, reason, message, generation, &now,
        ));
        let (progressing, reason, message) = if let Some((r, p)) = pause {
            let (reason, verb) = if p.rolled_back {
                ("RolledBack", "rolled back")
            } else {
                ("RolloutPaused", "paused")
            };
            (
                false,
                reason,
                format!(
                    "rollout of revision {} {verb}: {}; to resume change the spec or run `kubectl ballast resume {}` (sets the {} annotation)",
                    r.revision,
                    p.reason,
                    bs.name_any(),
                    crate::controller::RESUME_ANNOTATION
                ),
            )
        } else if deadline_exceeded {
            (
                false,
                "ProgressDeadlineExceeded",
                format!(
                    "{}/{desired} pods updated when the deadline passed",
                    status.updated_replicas
                ),
            )
        } else if rolling {
            let mut message = format!(
                "{}/{desired} pods updated, {} pods in all",
                status.updated_replicas, status.replicas
            );
            if let Some((pod, why)) = observed.gate_waiting.first() {
                message.push_str(&format!(
                    "; {} pods wait for the proxies to list them ({pod}: {why})",
                    observed.gate_waiting.len()
                ));
            }
            (true, "RolloutInProgress", message)
        } else {
            (
                false,
                "RolloutComplete",
                format!(
                    "all {desired} pods run revision {}",
                    status.update_revision.clone().unwrap_or_default()
                ),
            )
        };
        conditions.push(condition(
            &previous,
            PROGRESSING,
            progressing,
            reason,
            message,
            generation,
            &now,
        ));
    } else {
        conditions.extend(
            previous
                .conditions
                .iter()
                .filter(|c| c.type_ != DEGRADED)
                .cloned(),
        );
    }
    conditions.push(condition(
        &previous, DEGRADED, degraded, reason, message, generation, &now,
    ));
    if let Some(adoption) = &observed.adoption {
        conditions.retain(|c| c.type_ != ADOPTED);
        conditions.push(condition(
            &previous,
            ADOPTED,
            adoption.healthy,
            adoption.reason,
            adoption.message.clone(),
            generation,
            &now,
        ));
    }
    status.phase = Some(phase(&conditions).to_owned());
    status.conditions = conditions;
    status
}

/// Events for the changes between `before` and `after`.
pub fn transitions(
    before: &BalancedServiceStatus,
    after: &BalancedServiceStatus,
) -> Vec<Transition> {
    let get =
        |s: &BalancedServiceStatus, t: &str| s.conditions.iter().find(|c| c.type_ == t).cloned();
    let mut out = Vec::new();
    let (was, now) = (get(before, PROGRESSING), get(after, PROGRESSING));
    if let Some(now) = &now {
        let was_true = was.as_ref().is_some_and(|c| c.status == "True");
        if now.status == "True" && !was_true {
            out.push(Transition {
                reason: "RolloutStarted",
                message: now.message.clone(),
                warning: false,
            });
        }
        if now.status == "False" && now.reason == "RolloutComplete" && was_true {
            let mut message = now.message.clone();
            if let Some(r) = after
                .last_rollout
                .as_ref()
                .filter(|r| r.finished_at.is_some())
            {
                message.push_str(&format!(
                    " after {}s: {} pods drained (longest {} ms), {} forced, {} failed requests",
                    r.duration_seconds,
                    r.pods_drained,
                    r.longest_drain_millis,
                    r.forced_terminations,
                    r.failed_requests.old_revision + r.failed_requests.new_revision
                ));
            }
            out.push(Transition {
                reason: "RolloutComplete",
                message,
                warning: false,
            });
        }
    }
    let (was, now) = (get(before, DEGRADED), get(after, DEGRADED));
    if let Some(now) = &now {
        let was_true = was.as_ref().is_some_and(|c| c.status == "True");
        let reason_changed = was.as_ref().is_none_or(|c| c.reason != now.reason);
        if now.status == "True" && (!was_true || reason_changed) {
            let reason = match now.reason.as_str() {
                "InvalidSpec" => "InvalidSpec",
                "Conflict" => "Conflict",
                "ApplyFailed" => "ApplyFailed",
                "ProxyBypassed" => "ProxyBypassed",
                _ => "Degraded",
            };
            out.push(Transition {
                reason,
                message: now.message.clone(),
                warning: true,
            });
        }
        if now.status == "False" && was_true {
            let old = was.as_ref().map(|c| c.reason.clone()).unwrap_or_default();
            out.push(Transition {
                reason: "Recovered",
                message: format!("no longer degraded ({old})"),
                warning: false,
            });
        }
        if now.reason == "SlowProbes" && was.as_ref().is_none_or(|c| c.reason != "SlowProbes") {
            out.push(Transition {
                reason: "SlowProbes",
                message: now.message.clone(),
                warning: true,
            });
        }
    }
    out
}

/// `(current, update)`: the revision most available pods run, and the one of the
/// current template.
fn revisions(
    bs: &BalancedService,
    replica_sets: &[ReplicaSet],
) -> (Option<String>, Option<String>) {
    let update = crate::build::update_revision(bs, replica_sets);
    let revision_of = |rs: &ReplicaSet| crate::build::revision_of(&rs.metadata).cloned();
    let current = replica_sets
        .iter()
        .filter(|rs| {
            rs.status
                .as_ref()
                .and_then(|s| s.available_replicas)
                .unwrap_or(0)
                > 0
        })
        .max_by_key(|rs| {
            rs.status
                .as_ref()
                .and_then(|s| s.available_replicas)
                .unwrap_or(0)
        })
        .and_then(revision_of);
    (current.or_else(|| Some(update.clone())), Some(update))
}

fn condition(
    previous: &BalancedServiceStatus,
    type_: &str,
    value: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if value { "True" } else { "False" };
    let last = previous.conditions.iter().find(|c| c.type_ == type_);
    // The transition time moves only when the status does.
    let last_transition_time = match last {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => now.clone(),
    };
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

fn phase(conditions: &[Condition]) -> &'static str {
    let is = |t: &str| {
        conditions
            .iter()
            .any(|c| c.type_ == t && c.status == "True")
    };
    let paused = conditions
        .iter()
        .any(|c| c.type_ == PROGRESSING && c.reason == "RolloutPaused");
    if is(DEGRADED) {
        "Degraded"
    } else if paused {
        "Paused"
    } else if is(PROGRESSING) {
        "Progressing"
    } else if is(AVAILABLE) {
        "Available"
    } else {
        "Pending"
    }
}

#[cfg(test)]
mod tests;
