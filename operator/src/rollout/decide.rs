//! What a reconcile does about the rollout it tracked (pause it, roll it back, resume
//! it, or let it run) and how soon it looks again. Pure functions of what tracking
//! found and the spec, so the operator and the local cluster stand-in decide alike.

use ballast_api::meta::RolloutRequest;
use ballast_api::spec::PauseThresholds;
use ballast_api::status::RolloutSummary;
use std::time::Duration;

use super::{Tracked, pause, pause_reason, resumes};
use crate::status::Transition;

/// What the spec and the object's metadata say about pausing.
#[derive(Clone, Debug)]
pub struct Policy<'a> {
    /// `spec.rollout.pauseWhen`.
    pub thresholds: &'a PauseThresholds,
    /// `metadata.generation`: a change since the pause resumes the rollout.
    pub generation: i64,
    /// The request the BalancedService's annotations make (the strongest, when several).
    pub request: Option<RolloutRequest>,
    /// Now, Unix seconds.
    pub now: f64,
}

/// What to do with the app Deployment this reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RolloutAction {
    /// Apply it as built: no rollout runs, or it runs on.
    Proceed,
    /// Apply it paused (`spec.paused`): the rollout stays where it stopped.
    Pause,
    /// Apply the pod template of the ReplicaSet running `revision` instead; pause
    /// when that ReplicaSet is gone.
    RollBack {
        /// The revision to restore.
        revision: String,
    },
}

/// What the reconcile waits on, which sets how soon it looks again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Waiting {
    /// The proxy watch runs: a change wakes the reconcile.
    pub proxies_watched: bool,
    /// Pods wait for the proxies to list them.
    pub gate: bool,
    /// At least one proxy was read, and none failed.
    pub proxies_readable: bool,
    /// Pods drain.
    pub draining: bool,
    /// A rollout is in progress (`Progressing=True`).
    pub rolling: bool,
}

/// Records on `tracked` a pause (a threshold crossed, rolling back when the spec asks
/// and a previous revision exists; or the user's pause or abort request) or a resume
/// (spec changed since the pause, or the resume request), each with its Event; returns
/// what to do with the app Deployment. Thresholds pause a rollout at most once; a
/// user's request is acted on whenever a rollout runs, and answered with an Event
/// saying why not otherwise.
pub fn decide(tracked: &mut Tracked, policy: &Policy<'_>) -> RolloutAction {
    let Some(summary) = tracked.last_rollout.as_mut() else {
        if let Some(request) = policy.request {
            tracked.events.push(ignored(request, None));
        }
        return RolloutAction::Proceed;
    };
    match policy.request {
        Some(request) if summary.finished_at.is_some() => {
            tracked.events.push(ignored(request, Some(summary)));
            on_thresholds(summary, policy, None, &mut tracked.events);
        }
        Some(request @ (RolloutRequest::Pause | RolloutRequest::Abort)) => {
            requested(request, summary, policy, &mut tracked.events);
        }
        request => on_thresholds(summary, policy, request, &mut tracked.events),
    }
    action(summary)
}

/// A pause the thresholds ask for, or a resume the spec or the resume request asks for.
fn on_thresholds(
    summary: &mut RolloutSummary,
    policy: &Policy<'_>,
    request: Option<RolloutRequest>,
    events: &mut Vec<Transition>,
) {
    let resume_requested = request == Some(RolloutRequest::Resume);
    match summary.paused.as_mut() {
        Some(pause) if resumes(pause, policy.generation, resume_requested) => {
            pause.resumed = true;
            events.push(Transition {
                reason: "RolloutResumed",
                message: format!("rollout of revision {} resumed", summary.revision),
                warning: false,
            });
        }
        _ if resume_requested => events.push(Transition {
            reason: "RequestIgnored",
            message: format!(
                "{}: the rollout of revision {} is not paused",
                RolloutRequest::Resume.annotation(),
                summary.revision
            ),
            warning: true,
        }),
        Some(_) => {}
        None => {
            if let Some(reason) = pause_reason(policy.thresholds, summary) {
                let rollback = policy.thresholds.rollback;
                record(summary, reason, rollback, true, policy, events);
            }
        }
    }
}

/// The user's pause or abort of the running rollout. Pausing a paused rollout and
/// aborting a rolled-back one change nothing; aborting a paused one rolls it back.
fn requested(
    request: RolloutRequest,
    summary: &mut RolloutSummary,
    policy: &Policy<'_>,
    events: &mut Vec<Transition>,
) {
    let holding = summary.paused.as_ref().filter(|p| !p.resumed);
    let rollback = request == RolloutRequest::Abort;
    match holding {
        Some(p) if p.rolled_back || !rollback => events.push(Transition {
            reason: "RequestIgnored",
            message: format!(
                "{}: the rollout of revision {} is already {}",
                request.annotation(),
                summary.revision,
                if p.rolled_back {
                    "rolled back"
                } else {
                    "paused"
                }
            ),
            warning: false,
        }),
        _ => {
            let verb = if rollback { "aborted" } else { "paused" };
            let reason = format!("{verb} on request ({})", request.annotation());
            record(summary, reason, rollback, false, policy, events);
        }
    }
}

/// Records a pause of the running rollout (a rollback when `rollback` and a previous
/// revision exists) with its Event, a Warning when ballast decided it.
fn record(
    summary: &mut RolloutSummary,
    reason: String,
    rollback: bool,
    warning: bool,
    policy: &Policy<'_>,
    events: &mut Vec<Transition>,
) {
    let rollback_to = summary.previous_revision.as_deref().filter(|_| rollback);
    events.push(match rollback_to {
        Some(previous) => Transition {
            reason: "RolledBack",
            message: format!("rolling back to revision {previous}: {reason}"),
            warning,
        },
        None => Transition {
            reason: "RolloutPaused",
            message: format!("rollout of revision {} paused: {reason}", summary.revision),
            warning,
        },
    });
    let rolled_back = rollback_to.is_some();
    summary.paused = Some(pause(reason, policy.now, policy.generation, rolled_back));
}

/// The Event answering a request made while no rollout runs.
fn ignored(request: RolloutRequest, last: Option<&RolloutSummary>) -> Transition {
    let last = match last {
        Some(s) => format!("the rollout of revision {} has finished", s.revision),
        None => "no rollout has run yet".to_owned(),
    };
    Transition {
        reason: "RequestIgnored",
        message: format!("{}: no rollout in progress ({last})", request.annotation()),
        warning: true,
    }
}

/// The action a rollout's recorded pause asks for: only while it holds and the rollout
/// has not finished.
fn action(summary: &RolloutSummary) -> RolloutAction {
    match (&summary.paused, &summary.previous_revision) {
        (Some(p), _) if p.resumed || summary.finished_at.is_some() => RolloutAction::Proceed,
        (Some(p), Some(revision)) if p.rolled_back => RolloutAction::RollBack {
            revision: revision.clone(),
        },
        (Some(_), _) => RolloutAction::Pause,
        (None, _) => RolloutAction::Proceed,
    }
}

/// How soon to reconcile again when nothing wakes it. With the proxy watch running a
/// change wakes it, so this is only the safety net (60 s). Without it (tests drive
/// reconcile alone) the proxies are polled: every second while a pod waits for proxies
/// that are read fine (their watches are about to catch up), every 2 s while pods
/// drain, every 5 s during a rollout (or while no proxy can be read), every 30 s for
/// the balance otherwise.
pub fn requeue_after(waiting: Waiting) -> Duration {
    let seconds = match waiting {
        Waiting {
            proxies_watched: true,
            ..
        } => 60,
        Waiting {
            gate: true,
            proxies_readable: true,
            ..
        } => 1,
        Waiting { draining: true, .. } => 2,
        Waiting { rolling: true, .. } | Waiting { gate: true, .. } => 5,
        Waiting { .. } => 30,
    };
    Duration::from_secs(seconds)
}

#[cfg(test)]
mod tests;
