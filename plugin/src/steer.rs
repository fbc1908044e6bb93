//! `pause`, `resume`, `abort` and `restart`: what each would do to a BalancedService as
//! it is now (a pure [`plan`]), the write that asks for it, and the answer once the
//! operator acted (a pure [`outcome`]).
//!
//! Pause, resume and abort set the operator's request annotations
//! ([`RolloutRequest`]); the operator acts on them, removes them and records what it
//! did in `status.lastRollout.paused` and an Event. Restart changes the pod template's
//! `kubectl.kubernetes.io/restartedAt` annotation, as `kubectl rollout restart` does:
//! a new revision of the same template, rolled out like any other.

use ballast_api::BalancedService;
use ballast_api::meta::{RESTARTED_AT, RolloutRequest};
use ballast_api::status::RolloutSummary;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use std::time::Duration;

use crate::render::ago;
use crate::tree::{event_count, event_time};

/// The field manager of the plugin's writes.
pub const MANAGER: &str = "kubectl-ballast";

/// What the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Stop the rollout where it is.
    Pause,
    /// Continue a paused or rolled-back rollout.
    Resume,
    /// Roll back to the previous revision.
    Abort,
    /// Roll out the same template again.
    Restart,
}

/// The write an operation makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Set the request annotation on the BalancedService.
    Request(RolloutRequest),
    /// Change `restartedAt` in the BalancedService's pod template.
    RestartTemplate,
    /// Change `restartedAt` in the adopted Deployment's pod template.
    RestartDeployment(String),
    /// Nothing to write: the state already is what was asked (exit 0).
    AlreadyDone(String),
}

/// An operation that does not apply to the BalancedService as it is (exit 1).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

/// What the operation will do to `bs` as it is now, or why it does not apply.
pub fn plan(operation: Operation, bs: &BalancedService, now: Timestamp) -> Result<Plan, Refusal> {
    let name = bs.name_any();
    let request = match operation {
        Operation::Pause => RolloutRequest::Pause,
        Operation::Resume => RolloutRequest::Resume,
        Operation::Abort => RolloutRequest::Abort,
        Operation::Restart => {
            return Ok(match &bs.spec.workload_ref {
                Some(workload) => Plan::RestartDeployment(workload.name.clone()),
                None => Plan::RestartTemplate,
            });
        }
    };
    let last = bs.status.as_ref().and_then(|s| s.last_rollout.as_ref());
    let Some(rollout) = last.filter(|r| r.finished_at.is_none()) else {
        let why = match last.and_then(|r| r.finished_at.as_ref().map(|at| (r, at))) {
            Some((r, at)) => format!(
                "the rollout of revision {} finished {} ago",
                r.revision,
                ago(at.0, now)
            ),
            None => "no rollout has run yet".to_owned(),
        };
        let hint = match operation {
            Operation::Abort => format!(
                "; to go back to an earlier template, apply it (or `kubectl ballast restart {name}` to roll the same one again)"
            ),
            _ => String::new(),
        };
        return Err(Refusal(format!(
            "{name} has no rollout in progress ({why}): nothing to {}{hint}",
            verb(operation)
        )));
    };
    let holding = rollout.paused.as_ref().filter(|p| !p.resumed);
    match (request, holding) {
        (RolloutRequest::Pause, Some(p)) => Ok(Plan::AlreadyDone(format!(
            "the rollout of revision {} is already {} ({} ago: {})",
            rollout.revision,
            if p.rolled_back {
                "rolled back"
            } else {
                "paused"
            },
            ago(p.at.0, now),
            p.reason
        ))),
        (RolloutRequest::Abort, Some(p)) if p.rolled_back => Ok(Plan::AlreadyDone(format!(
            "the rollout of revision {} is already rolled back to {} ({} ago: {})",
            rollout.revision,
            rollout.previous_revision.as_deref().unwrap_or("-"),
            ago(p.at.0, now),
            p.reason
        ))),
        (RolloutRequest::Resume, None) => Err(Refusal(format!(
            "the rollout of revision {} is not paused: nothing to resume",
            rollout.revision
        ))),
        (request, _) => Ok(Plan::Request(request)),
    }
}

fn verb(operation: Operation) -> &'static str {
    match operation {
        Operation::Pause => "pause",
        Operation::Resume => "resume",
        Operation::Abort => "abort",
        Operation::Restart => "restart",
    }
}

/// Whether the operator has acted on the write `plan` made: the request annotation is
/// gone, or (restart) the revision being rolled out changed.
pub fn acted(plan: &Plan, before: &BalancedService, now: &BalancedService) -> bool {
    match plan {
        Plan::Request(request) => !now.annotations().contains_key(request.annotation()),
        Plan::RestartTemplate | Plan::RestartDeployment(_) => {
            let revision =
                |bs: &BalancedService| bs.status.as_ref().and_then(|s| s.update_revision.clone());
            revision(now).is_some() && revision(now) != revision(before)
        }
        Plan::AlreadyDone(_) => true,
    }
}

/// What happened, for a person, from the BalancedService after the operator acted and
/// the Events it sent since the request (see [`fresh`]).
pub fn outcome(plan: &Plan, bs: &BalancedService, events: &[Event]) -> String {
    let name = bs.name_any();
    let status = bs.status.clone().unwrap_or_default();
    let rollout: Option<&RolloutSummary> = status.last_rollout.as_ref();
    match plan {
        Plan::AlreadyDone(what) => what.clone(),
        Plan::RestartTemplate | Plan::RestartDeployment(_) => format!(
            "rollout of revision {} started (from {}); watch it with `kubectl ballast get {name} --watch`",
            status.update_revision.as_deref().unwrap_or("-"),
            status.current_revision.as_deref().unwrap_or("-"),
        ),
        Plan::Request(request) => {
            let answer = events
                .iter()
                .filter(|e| {
                    matches!(
                        e.reason.as_deref(),
                        Some("RolloutPaused" | "RolledBack" | "RolloutResumed" | "RequestIgnored")
                    )
                })
                .max_by_key(|e| event_time(e))
                .and_then(|e| e.message.clone());
            let pause = rollout.and_then(|r| r.paused.as_ref().map(|p| (r, p)));
            let next = match (request, pause) {
                (RolloutRequest::Pause, Some((_, p))) if !p.resumed => {
                    format!(
                        "; the app Deployment is held where it is: `kubectl ballast resume {name}` continues, `kubectl ballast abort {name}` rolls back"
                    )
                }
                (RolloutRequest::Abort, Some((r, p))) if !p.resumed && p.rolled_back => format!(
                    "; the pods go back to revision {}: `kubectl ballast resume {name}` tries {} again",
                    r.previous_revision.as_deref().unwrap_or("-"),
                    r.revision
                ),
                (RolloutRequest::Abort, Some((_, p))) if !p.resumed => format!(
                    "; there is no previous revision to go back to, so the rollout is paused: `kubectl ballast resume {name}` continues"
                ),
                (RolloutRequest::Resume, Some((_, p))) if p.resumed => String::new(),
                _ => format!("; see `kubectl describe balancedservice {name}`"),
            };
            match answer {
                Some(message) => format!("{message}{next}"),
                None => format!(
                    "the operator removed the {} annotation without an Event{next}",
                    request.annotation()
                ),
            }
        }
    }
}

/// What writing or waiting failed.
#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    /// The write was refused.
    #[error("writing {what} failed")]
    Write {
        /// What was written.
        what: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// Reading the BalancedService or its Events back failed.
    #[error("reading {what} failed")]
    Read {
        /// What was read.
        what: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// The operator did not act within the wait.
    #[error(
        "the request is recorded ({what}) but the operator has not acted on it within {}s: \
         is it running? (kubectl -n ballast-system get pods). It acts on the request when it next reconciles.",
        waited.as_secs()
    )]
    NotActed {
        /// What was written.
        what: String,
        /// How long it waited.
        waited: Duration,
    },
}

/// Makes the write of `plan` on `bs` at `now`.
pub async fn write(
    client: &Client,
    bs: &BalancedService,
    plan: &Plan,
    now: Timestamp,
) -> Result<(), SteerError> {
    let namespace = bs.namespace().unwrap_or_default();
    let params = PatchParams {
        field_manager: Some(MANAGER.to_owned()),
        ..PatchParams::default()
    };
    let stamp = now.to_string();
    match plan {
        Plan::AlreadyDone(_) => Ok(()),
        Plan::Request(request) => {
            let patch =
                serde_json::json!({"metadata": {"annotations": {request.annotation(): stamp}}});
            Api::<BalancedService>::namespaced(client.clone(), &namespace)
                .patch(&bs.name_any(), &params, &Patch::Merge(&patch))
                .await
                .map(drop)
                .map_err(|source| SteerError::Write {
                    what: format!("the {} annotation", request.annotation()),
                    source,
                })
        }
        Plan::RestartTemplate => {
            let patch = restart_patch(&stamp);
            Api::<BalancedService>::namespaced(client.clone(), &namespace)
                .patch(&bs.name_any(), &params, &Patch::Merge(&patch))
                .await
                .map(drop)
                .map_err(|source| SteerError::Write {
                    what: format!("spec.template's {RESTARTED_AT}"),
                    source,
                })
        }
        Plan::RestartDeployment(deployment) => {
            let patch = restart_patch(&stamp);
            Api::<Deployment>::namespaced(client.clone(), &namespace)
                .patch(deployment, &params, &Patch::Merge(&patch))
                .await
                .map(drop)
                .map_err(|source| SteerError::Write {
                    what: format!("Deployment {deployment}'s {RESTARTED_AT}"),
                    source,
                })
        }
    }
}

/// The merge patch of a pod template's `restartedAt` annotation (BalancedService and
/// Deployment alike: both keep it at `spec.template`).
fn restart_patch(stamp: &str) -> serde_json::Value {
    serde_json::json!({"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: stamp}}}}})
}

/// Reads `bs` back every `poll` until the operator acted on `plan` or `wait` passed.
pub async fn wait_for_operator(
    client: &Client,
    bs: &BalancedService,
    plan: &Plan,
    wait: Duration,
    poll: Duration,
) -> Result<BalancedService, SteerError> {
    let namespace = bs.namespace().unwrap_or_default();
    let name = bs.name_any();
    let api = Api::<BalancedService>::namespaced(client.clone(), &namespace);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let now = api.get(&name).await.map_err(|source| SteerError::Read {
            what: format!("BalancedService {namespace}/{name}"),
            source,
        })?;
        if acted(plan, bs, &now) {
            return Ok(now);
        }
        if tokio::time::Instant::now() + poll > deadline {
            return Err(SteerError::NotActed {
                what: written(plan),
                waited: wait,
            });
        }
        tokio::time::sleep(poll).await;
    }
}

/// What the write of `plan` changes, for a person.
pub fn written(plan: &Plan) -> String {
    match plan {
        Plan::Request(r) => format!("annotation {}", r.annotation()),
        Plan::RestartTemplate => format!("spec.template annotation {RESTARTED_AT}"),
        Plan::RestartDeployment(d) => {
            format!("Deployment {d}'s pod template annotation {RESTARTED_AT}")
        }
        Plan::AlreadyDone(_) => "nothing".to_owned(),
    }
}

/// The Events of `later` that `earlier` did not have, or that happened again since
/// (a higher count).
pub fn fresh(earlier: &[Event], later: &[Event]) -> Vec<Event> {
    later
        .iter()
        .filter(|e| {
            !earlier
                .iter()
                .any(|b| b.metadata.name == e.metadata.name && event_count(b) >= event_count(e))
        })
        .cloned()
        .collect()
}
