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
