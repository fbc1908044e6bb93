//! What a reconcile does about the rollout it tracked (pause it, roll it back, resume
//! it, or let it run) and how soon it looks again. Pure functions of what tracking
//! found and the spec, so the operator and the local cluster stand-in decide alike.

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
    /// The resume annotation is set.
    pub resume_requested: bool,
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
/// and a previous revision exists) or a resume (spec changed since the pause, or the
/// resume annotation), each with its Event; returns what to do with the app
/// Deployment. A rollout is paused at most once.
pub fn decide(tracked: &mut Tracked, policy: &Policy<'_>) -> RolloutAction {
    let Some(summary) = tracked.last_rollout.as_mut() else {
        return RolloutAction::Proceed;
    };
    match summary.paused.as_mut() {
        Some(pause) if resumes(pause, policy.generation, policy.resume_requested) => {
            pause.resumed = true;
            tracked.events.push(Transition {
                reason: "RolloutResumed",
                message: format!("rollout of revision {} resumed", summary.revision),
                warning: false,
            });
        }
        Some(_) => {}
        None => {
            if let Some(reason) = pause_reason(policy.thresholds, summary) {
                let rollback_to = summary
                    .previous_revision
                    .as_deref()
                    .filter(|_| policy.thresholds.rollback);
                tracked.events.push(match rollback_to {
                    Some(previous) => Transition {
                        reason: "RolledBack",
                        message: format!("rolling back to revision {previous}: {reason}"),
                        warning: true,
                    },
                    None => Transition {
                        reason: "RolloutPaused",
                        message: format!(
                            "rollout of revision {} paused: {reason}",
                            summary.revision
                        ),
                        warning: true,
                    },
                });
                let rollback = rollback_to.is_some();
                summary.paused = Some(pause(reason, policy.now, policy.generation, rollback));
            }
        }
    }
    action(summary)
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
