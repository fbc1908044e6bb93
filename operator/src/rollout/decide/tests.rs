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
        request: annotated.then_some(RolloutRequest::Resume),
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
        // Resumed once; a second request is answered, not acted on.
        assert_eq!(reasons(&t), ["RequestIgnored"]);
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

fn requesting(
    thresholds: &PauseThresholds,
    generation: i64,
    request: RolloutRequest,
) -> Policy<'_> {
    Policy {
        request: Some(request),
        ..policy(thresholds, generation, false)
    }
}

#[test]
fn a_pause_request_pauses_the_running_rollout_until_resumed() {
    let mut running = tracked(summary(Some("old"), 0));
    assert_eq!(
        decide(
            &mut running,
            &requesting(&TWO_FORCED, 1, RolloutRequest::Pause)
        ),
        RolloutAction::Pause
    );
    assert_eq!(reasons(&running), ["RolloutPaused"]);
    assert!(!running.events[0].warning, "the user asked: not a warning");
    let pause = running.last_rollout.as_ref().and_then(|s| s.paused.clone());
    let pause = pause.expect("recorded");
    assert_eq!(pause.reason, "paused on request (ballast.dev/pause)");
    assert!(!pause.rolled_back);

    // Holds without the annotation; a second pause changes nothing; resume continues.
    running.events.clear();
    assert_eq!(
        decide(&mut running, &policy(&TWO_FORCED, 1, false)),
        RolloutAction::Pause
    );
    assert_eq!(
        decide(
            &mut running,
            &requesting(&TWO_FORCED, 1, RolloutRequest::Pause)
        ),
        RolloutAction::Pause
    );
    assert_eq!(reasons(&running), ["RequestIgnored"]);
    assert_eq!(
        decide(&mut running, &policy(&TWO_FORCED, 1, true)),
        RolloutAction::Proceed
    );
    assert_eq!(reasons(&running), ["RequestIgnored", "RolloutResumed"]);
}

#[test]
fn an_abort_rolls_back_a_running_or_paused_rollout_and_pauses_a_first_one() {
    let mut running = tracked(summary(Some("old"), 0));
    let abort = requesting(&TWO_FORCED, 1, RolloutRequest::Abort);
    let back = RolloutAction::RollBack {
        revision: "old".into(),
    };
    assert_eq!(decide(&mut running, &abort), back);
    assert_eq!(reasons(&running), ["RolledBack"]);
    assert_eq!(
        running.events[0].message,
        "rolling back to revision old: aborted on request (ballast.dev/abort)"
    );

    // A rollout the thresholds paused is rolled back on abort; aborting again is a no-op.
    let mut paused = tracked(summary(Some("old"), 2));
    assert_eq!(
        decide(&mut paused, &policy(&TWO_FORCED, 1, false)),
        RolloutAction::Pause
    );
    assert_eq!(decide(&mut paused, &abort), back);
    assert_eq!(decide(&mut paused, &abort), back);
    assert_eq!(
        reasons(&paused),
        ["RolloutPaused", "RolledBack", "RequestIgnored"]
    );

    // The first rollout has nothing to go back to: it pauses.
    let mut first = tracked(summary(None, 0));
    assert_eq!(decide(&mut first, &abort), RolloutAction::Pause);
    assert_eq!(reasons(&first), ["RolloutPaused"]);
}

#[test]
fn a_request_without_a_running_rollout_is_answered_and_changes_nothing() {
    let mut none = Tracked::default();
    assert_eq!(
        decide(
            &mut none,
            &requesting(&TWO_FORCED, 1, RolloutRequest::Pause)
        ),
        RolloutAction::Proceed
    );
    assert_eq!(none.events[0].reason, "RequestIgnored");
    assert_eq!(
        none.events[0].message,
        "ballast.dev/pause: no rollout in progress (no rollout has run yet)"
    );

    let mut finished = tracked(RolloutSummary {
        finished_at: Some(time(1_800_000_050.0)),
        ..summary(Some("old"), 0)
    });
    assert_eq!(
        decide(
            &mut finished,
            &requesting(&TWO_FORCED, 1, RolloutRequest::Abort)
        ),
        RolloutAction::Proceed
    );
    assert_eq!(
        finished.events[0].message,
        "ballast.dev/abort: no rollout in progress (the rollout of revision new has finished)"
    );
    assert!(
        finished
            .last_rollout
            .as_ref()
            .is_some_and(|s| s.paused.is_none())
    );

    let mut running = tracked(summary(Some("old"), 0));
    assert_eq!(
        decide(&mut running, &policy(&TWO_FORCED, 1, true)),
        RolloutAction::Proceed
    );
    assert_eq!(reasons(&running), ["RequestIgnored"]);
}
