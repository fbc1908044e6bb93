use super::*;
use crate::fixtures::balanced_service;
use crate::rollout::DEFAULT_MIN_REQUESTS;
use ballast_api::status::BalancedServiceStatus;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::watcher;

/// The fixture in the middle of a rollout: one pod draining for 12 s, 40 of 200
/// requests to the new revision failed, one forced drain, with pause thresholds set.
fn rolling() -> BalancedService {
    let mut bs = balanced_service();
    bs.spec.rollout.pause_when.error_ratio = Some(0.05);
    bs.spec.rollout.pause_when.forced_drains = Some(2);
    bs.status = Some(
        serde_json::from_value::<BalancedServiceStatus>(serde_json::json!({
            "conditions": [
                {"type": "Available", "status": "False", "reason": "PodsUnavailable", "message": "",
                 "lastTransitionTime": "2025-01-01T00:00:00Z"},
                {"type": "Progressing", "status": "True", "reason": "RolloutInProgress", "message": "",
                 "lastTransitionTime": "2025-01-01T00:00:00Z"},
            ],
            "replicas": 4, "readyReplicas": 3, "updatedReplicas": 2, "availableReplicas": 3,
            "proxy": {"replicas": 2, "readyReplicas": 1},
            "balance": {"maxOverMean": "1.62", "windowSeconds": 30, "pods": 3},
            "draining": [{"pod": "demo-old-1", "since": "2025-01-01T00:00:48Z",
                          "inFlight": 2, "connections": 1}],
            "lastRollout": {
                "revision": "new", "startedAt": "2025-01-01T00:00:00Z", "durationSeconds": 0,
                "podsDrained": 1, "longestDrainMillis": 900, "forcedTerminations": 1,
                "requests": {"oldRevision": 1000, "newRevision": 200},
                "failedRequests": {"oldRevision": 0, "newRevision": 40},
            },
        }))
        .unwrap(),
    );
    bs
}

fn value(samples: &[Sample], metric: &str, label: Option<(&str, &str)>) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.metric == metric && s.label.as_ref().map(|(k, v)| (*k, v.as_str())) == label)
        .map(|s| s.value)
}

#[test]
fn the_gauges_say_what_the_status_and_the_thresholds_say() {
    let now: Timestamp = "2025-01-01T00:01:00Z".parse().unwrap();
    let samples = samples(&rolling(), now);
    let v = |metric, label| value(&samples, metric, label);
    assert_eq!(v("condition", Some(("condition", "Available"))), Some(0.0));
    assert_eq!(
        v("condition", Some(("condition", "Progressing"))),
        Some(1.0)
    );
    assert_eq!(v("proxy_replicas", None), Some(2.0));
    assert_eq!(v("proxy_ready_replicas", None), Some(1.0));
    assert_eq!(v("balance_max_over_mean", None), Some(1.62));
    assert_eq!(v("draining_pods", None), Some(1.0));
    assert_eq!(v("oldest_drain_seconds", None), Some(12.0));
    assert_eq!(v("rollout_in_progress", None), Some(1.0));
    assert_eq!(
        v("rollout_requests", Some(("revision", "new"))),
        Some(200.0)
    );
    assert_eq!(
        v("rollout_requests", Some(("revision", "old"))),
        Some(1000.0)
    );
    assert_eq!(
        v("rollout_failed_requests", Some(("revision", "new"))),
        Some(40.0)
    );
    assert_eq!(v("rollout_forced_drains", None), Some(1.0));
    let threshold = |which| v("rollout_pause_threshold", Some(("threshold", which)));
    assert_eq!(threshold("error_ratio"), Some(0.05));
    assert_eq!(threshold("min_requests"), Some(DEFAULT_MIN_REQUESTS as f64));
    assert_eq!(threshold("forced_drains"), Some(2.0));
    assert!(
        samples
            .iter()
            .all(|s| GAUGES.iter().any(|(name, _)| *name == s.metric)),
        "every sample is of a declared gauge"
    );

    // No status yet, no thresholds: nothing to say.
    assert_eq!(super::samples(&balanced_service(), now), Vec::new());
}

#[test]
fn series_exist_only_while_the_service_lives_and_this_replica_leads() {
    let metrics = Metrics::default();
    let has_series = |text: &str| text.contains("ballast_operator_rollout_forced_drains{");
    let descriptor = "# TYPE ballast_operator_rollout_forced_drains gauge";
    // A standby: the names, no series.
    assert!(metrics.render().contains(descriptor));
    assert!(!has_series(&metrics.render()));

    let (store, mut writer) = kube::runtime::reflector::store::<BalancedService>();
    let bs = rolling();
    writer.apply_watcher_event(&watcher::Event::Apply(bs.clone()));
    let exported = metrics.export_services(store.clone());
    metrics.set_managed(1, 11);
    let text = metrics.render();
    assert!(
        text.contains(
            "ballast_operator_rollout_forced_drains{namespace=\"shop\",name=\"demo\"} 1.0"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "ballast_operator_condition{namespace=\"shop\",name=\"demo\",condition=\"Available\"} 0.0"
        ),
        "{text}"
    );

    // Deleted: its series go with it.
    writer.apply_watcher_event(&watcher::Event::Delete(bs.clone()));
    assert!(!has_series(&metrics.render()));

    // The term as leader ends: nothing stays, not even what the cache still holds.
    writer.apply_watcher_event(&watcher::Event::Apply(bs));
    assert!(has_series(&metrics.render()));
    drop(exported);
    let text = metrics.render();
    assert!(!has_series(&text), "{text}");
    assert!(text.contains(descriptor));
    assert!(
        text.contains("ballast_operator_balanced_services 0"),
        "{text}"
    );
}
