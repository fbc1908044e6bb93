use super::*;
use crate::fixtures::balanced_service;
use crate::validate::FieldError;
use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentStatus};
use k8s_openapi::jiff::Timestamp;

fn at(seconds: i64) -> Time {
    Time(Timestamp::from_second(1_800_000_000 + seconds).unwrap())
}

fn deployment(replicas: i32, updated: i32, available: i32) -> Deployment {
    let mut d = Deployment::default();
    d.metadata.generation = Some(1);
    d.status = Some(DeploymentStatus {
        observed_generation: Some(1),
        replicas: Some(replicas),
        updated_replicas: Some(updated),
        ready_replicas: Some(available),
        available_replicas: Some(available),
        ..DeploymentStatus::default()
    });
    d
}

fn proxies(ready: i32) -> Deployment {
    let mut d = deployment(2, 2, ready);
    d.status.as_mut().unwrap().ready_replicas = Some(ready);
    d
}

fn cond<'a>(s: &'a BalancedServiceStatus, t: &str) -> &'a Condition {
    s.conditions.iter().find(|c| c.type_ == t).unwrap()
}

fn observed(app: Deployment, proxy: Deployment) -> Observed {
    Observed {
        app: Some(app),
        proxy: Some(proxy),
        ..Observed::default()
    }
}

#[test]
fn settled_service_is_available_and_not_progressing() {
    let bs = balanced_service();
    let s = compute(&bs, &observed(deployment(4, 4, 4), proxies(2)), None, at(0));
    assert_eq!(
        (
            cond(&s, "Available").status.as_str(),
            cond(&s, "Progressing").reason.as_str()
        ),
        ("True", "RolloutComplete")
    );
    assert_eq!(cond(&s, "Degraded").status, "False");
    assert_eq!(s.phase.as_deref(), Some("Available"));
    assert_eq!(s.ready.as_deref(), Some("4/4"));
    assert_eq!(s.observed_generation, Some(3));
    assert_eq!(
        s.selector.as_deref(),
        Some("ballast.dev/service=demo,ballast.dev/role=app")
    );
    assert_eq!(
        s.proxy,
        Some(ProxyStatus {
            replicas: 2,
            ready_replicas: 2
        })
    );
}

#[test]
fn a_rollout_progresses_then_completes_with_events_on_each_transition() {
    let mut bs = balanced_service();
    let settled = compute(&bs, &observed(deployment(4, 4, 4), proxies(2)), None, at(0));
    bs.status = Some(settled.clone());
    let rolling = compute(
        &bs,
        &observed(deployment(5, 1, 4), proxies(2)),
        None,
        at(10),
    );
    let p = cond(&rolling, "Progressing");
    assert_eq!(
        (p.status.as_str(), p.reason.as_str()),
        ("True", "RolloutInProgress")
    );
    assert_eq!(p.message, "1/4 pods updated, 5 pods in all");
    assert_eq!(p.last_transition_time, at(10));
    assert_eq!(rolling.phase.as_deref(), Some("Progressing"));
    let events = transitions(&settled, &rolling);
    assert_eq!(
        events.iter().map(|e| e.reason).collect::<Vec<_>>(),
        ["RolloutStarted"]
    );

    bs.status = Some(rolling.clone());
    let still = compute(
        &bs,
        &observed(deployment(5, 3, 4), proxies(2)),
        None,
        at(20),
    );
    assert_eq!(
        cond(&still, "Progressing").last_transition_time,
        at(10),
        "kept while the status stays True"
    );
    assert!(
        transitions(&rolling, &still).is_empty(),
        "no event on every reconcile"
    );

    bs.status = Some(still.clone());
    let done = compute(
        &bs,
        &observed(deployment(4, 4, 4), proxies(2)),
        None,
        at(30),
    );
    assert_eq!(
        transitions(&still, &done)
            .iter()
            .map(|e| e.reason)
            .collect::<Vec<_>>(),
        ["RolloutComplete"]
    );
    assert_eq!(
        cond(&done, "Available").last_transition_time,
        at(0),
        "Available never changed"
    );
}

#[test]
fn invalid_spec_degrades_without_touching_the_rest_and_fixing_it_recovers() {
    let mut bs = balanced_service();
    let settled = compute(&bs, &observed(deployment(4, 4, 4), proxies(2)), None, at(0));
    bs.status = Some(settled.clone());
    let invalid = InvalidSpec(vec![FieldError {
        field: "spec.probes.port".into(),
        message: "no container declares a port named \"x\"".into(),
    }]);
    let bad = compute(
        &bs,
        &Observed::default(),
        Some(&Blocked::InvalidSpec(invalid)),
        at(5),
    );
    let d = cond(&bad, "Degraded");
    assert_eq!(
        (d.status.as_str(), d.reason.as_str()),
        ("True", "InvalidSpec")
    );
    assert!(d.message.contains("spec.probes.port"), "{}", d.message);
    assert_eq!(
        cond(&bad, "Available"),
        cond(&settled, "Available"),
        "the running app is untouched"
    );
    assert_eq!(bad.ready_replicas, 4);
    assert_eq!(bad.phase.as_deref(), Some("Degraded"));
    let events = transitions(&settled, &bad);
    assert_eq!((events[0].reason, events[0].warning), ("InvalidSpec", true));

    bs.status = Some(bad.clone());
    let fixed = compute(&bs, &observed(deployment(4, 4, 4), proxies(2)), None, at(9));
    assert_eq!(cond(&fixed, "Degraded").status, "False");
    assert_eq!(
        transitions(&bad, &fixed)
            .iter()
            .map(|e| e.reason)
            .collect::<Vec<_>>(),
        ["Recovered"]
    );
}

#[test]
fn progress_deadline_and_missing_proxies_degrade() {
    let bs = balanced_service();
    let mut stuck = deployment(5, 1, 4);
    stuck.status.as_mut().unwrap().conditions = Some(vec![DeploymentCondition {
        type_: "Progressing".into(),
        status: "False".into(),
        reason: Some("ProgressDeadlineExceeded".into()),
        ..DeploymentCondition::default()
    }]);
    let s = compute(&bs, &observed(stuck, proxies(2)), None, at(0));
    assert_eq!(cond(&s, "Degraded").reason, "ProgressDeadlineExceeded");
    assert_eq!(cond(&s, "Progressing").status, "False");

    let s = compute(&bs, &observed(deployment(4, 4, 4), proxies(0)), None, at(0));
    assert_eq!(cond(&s, "Degraded").reason, "ProxyUnavailable");
    assert_eq!(cond(&s, "Available").reason, "ProxiesUnavailable");
}

#[test]
fn slow_user_probes_are_a_warning_not_a_degradation() {
    let bs = balanced_service();
    let mut o = observed(deployment(4, 4, 4), proxies(2));
    o.slow_probes = vec!["app".into()];
    let s = compute(&bs, &o, None, at(0));
    let d = cond(&s, "Degraded");
    assert_eq!(
        (d.status.as_str(), d.reason.as_str()),
        ("False", "SlowProbes")
    );
    let events = transitions(&BalancedServiceStatus::default(), &s);
    assert!(events.iter().any(|e| e.reason == "SlowProbes" && e.warning));
}

#[test]
fn an_adopted_deployment_is_counted_against_its_own_replicas() {
    // spec.replicas keeps its default (2); the adopted Deployment wants 3.
    let mut bs = balanced_service();
    bs.spec.template = None;
    bs.spec.workload_ref = Some(
        serde_json::from_value(
            serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"}),
        )
        .unwrap(),
    );
    bs.spec.replicas = 2;
    let mut app = deployment(3, 3, 2);
    app.spec.get_or_insert_default().replicas = Some(3);
    let s = compute(&bs, &observed(app, proxies(2)), None, at(0));
    assert_eq!(s.ready.as_deref(), Some("2/3"));
    assert_eq!(cond(&s, "Available").status, "False");
    assert_eq!(cond(&s, "Available").reason, "PodsUnavailable");
}
