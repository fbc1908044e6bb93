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
mod tests {
    use super::*;
    use crate::rollout::time;

    fn summary(previous: Option<&str>, forced: i32) -> RolloutSummary {
        RolloutSummary {
            revision: "new".into(),
            previous_revision: previous.map(str::to_owned),
            started_at: time(1_800_000_000.0),
            finished_at: None,
            duration_seconds: 0,
            pods_drained: 0,
            longest_drain_millis: 0,
            forced_terminations: forced,
            requests: Default::default(),
            failed_requests: Default::default(),
            paused: None,
        }
    }

    fn tracked(summary: RolloutSummary) -> Tracked {
        Tracked {
            last_rollout: Some(summary),
            ..Tracked::default()
        }
    }

    fn policy(thresholds: &PauseThresholds, generation: i64, annotated: bool) -> Policy<'_> {
        Policy {
            thresholds,
            generation,
            resume_requested: annotated,
            now: 1_800_000_100.0,
        }
    }

    fn reasons(tracked: &Tracked) -> Vec<&str> {
        tracked.events.iter().map(|e| e.reason).collect()
    }

    const TWO_FORCED: PauseThresholds = PauseThresholds {
        forced_drains: Some(2),
        error_ratio: None,
        min_requests: None,
        rollback: false,
    };

    #[test]
    fn no_rollout_and_a_rollout_under_its_thresholds_proceed() {
        let mut none = Tracked::default();
        assert_eq!(
            decide(&mut none, &policy(&TWO_FORCED, 1, false)),
            RolloutAction::Proceed
        );
        let mut under = tracked(summary(Some("old"), 1));
        assert_eq!(
            decide(&mut under, &policy(&TWO_FORCED, 1, false)),
            RolloutAction::Proceed
        );
        assert!(under.events.is_empty());
    }

    #[test]
    fn crossing_a_threshold_pauses_once_with_a_warning() {
        let mut t = tracked(summary(Some("old"), 2));
        assert_eq!(
            decide(&mut t, &policy(&TWO_FORCED, 4, false)),
            RolloutAction::Pause
        );
        assert_eq!(reasons(&t), ["RolloutPaused"]);
        let pause = t.last_rollout.as_ref().unwrap().paused.clone().unwrap();
        assert_eq!(
            (pause.generation, pause.rolled_back, pause.resumed),
            (4, false, false)
        );
        // The next reconcile keeps it paused without a second Event.
        t.events.clear();
        assert_eq!(
            decide(&mut t, &policy(&TWO_FORCED, 4, false)),
            RolloutAction::Pause
        );
        assert!(t.events.is_empty());
    }

    #[test]
    fn with_rollback_the_previous_revision_is_restored() {
        let thresholds = PauseThresholds {
            rollback: true,
            ..TWO_FORCED
        };
        let mut t = tracked(summary(Some("old"), 3));
        assert_eq!(
            decide(&mut t, &policy(&thresholds, 4, false)),
            RolloutAction::RollBack {
                revision: "old".into()
            }
        );
        assert_eq!(reasons(&t), ["RolledBack"]);
        assert!(
            t.events[0]
                .message
                .starts_with("rolling back to revision old: ")
        );
        // Nothing to go back to: paused instead.
        let mut first = tracked(summary(None, 3));
        assert_eq!(
            decide(&mut first, &policy(&thresholds, 4, false)),
            RolloutAction::Pause
        );
        assert_eq!(reasons(&first), ["RolloutPaused"]);
    }

    #[test]
    fn a_spec_change_or_the_annotation_resumes_for_good() {
        for (generation, annotated) in [(5, false), (4, true)] {
            let mut t = tracked(summary(Some("old"), 2));
            decide(&mut t, &policy(&TWO_FORCED, 4, false));
            t.events.clear();
            assert_eq!(
                decide(&mut t, &policy(&TWO_FORCED, generation, annotated)),
                RolloutAction::Proceed
            );
            assert_eq!(reasons(&t), ["RolloutResumed"]);
            t.events.clear();
            assert_eq!(
                decide(&mut t, &policy(&TWO_FORCED, 9, true)),
                RolloutAction::Proceed
            );
            assert!(t.events.is_empty(), "resumed once");
        }
    }

    #[test]
    fn a_finished_rollout_is_left_alone() {
        let mut done = summary(Some("old"), 5);
        done.finished_at = Some(time(1_800_000_050.0));
        let mut t = tracked(done);
        assert_eq!(
            decide(&mut t, &policy(&TWO_FORCED, 4, false)),
            RolloutAction::Proceed
        );
        assert!(t.events.is_empty());
    }

    #[test]
    fn requeue_follows_what_is_awaited() {
        let w = Waiting::default();
        let secs = |w: Waiting| requeue_after(w).as_secs();
        assert_eq!(secs(w), 30);
        assert_eq!(secs(Waiting { rolling: true, ..w }), 5);
        assert_eq!(secs(Waiting { gate: true, ..w }), 5);
        assert_eq!(
            secs(Waiting {
                draining: true,
                rolling: true,
                ..w
            }),
            2
        );
        let readable_gate = Waiting {
            gate: true,
            proxies_readable: true,
            draining: true,
            ..w
        };
        assert_eq!(secs(readable_gate), 1);
        assert_eq!(
            secs(Waiting {
                proxies_watched: true,
                ..readable_gate
            }),
            60
        );
    }
}
