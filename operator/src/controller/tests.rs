//! `reconcile` against the mock API server of [`crate::fixtures::api_server`].

use super::*;
use crate::fixtures::api_server::*;
use crate::fixtures::balanced_service;
use crate::fixtures::real_proxy::RealProxy;
use http::{Method, StatusCode};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::runtime::watcher;
use serde_json::{Value, json};

#[tokio::test]
async fn a_settled_service_is_applied_in_order_then_reported_available() {
    let (ctx, mut api) = context();
    let bs = balanced_service();
    let run = start(&bs, &ctx);

    serve_apply_only(&mut api, settled()).await;
    let status = serve_status(&mut api).await;
    assert_condition(&status, "Available", "True", "AllAvailable");
    assert_condition(&status, "Progressing", "False", "RolloutComplete");
    assert_condition(&status, "Degraded", "False", "AsExpected");
    assert_eq!(status["phase"], "Available");
    assert_eq!(status["replicas"], 4);
    assert_eq!(status["availableReplicas"], 4);
    assert_eq!(status["ready"], "4/4");
    assert_eq!(
        status["selector"],
        "ballast.dev/service=demo,ballast.dev/role=app"
    );
    assert_eq!(status["proxy"], json!({"replicas": 2, "readyReplicas": 2}));
    let revision = crate::build::template_revision(bs.spec.template.as_ref().unwrap());
    assert_eq!(status["updateRevision"], revision);
    assert_eq!(status["currentRevision"], revision);

    // First sight of a settled service: no rollout started, nothing degraded, no Event.
    let action = finish(run).await.unwrap();
    api.assert_idle().await;
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    assert!(
        ctx.metrics
            .render()
            .contains("ballast_operator_reconciles_total 1"),
        "{}",
        ctx.metrics.render()
    );
}

#[tokio::test]
async fn an_unchanged_status_is_not_written_again() {
    let (ctx, mut api) = context();
    let mut bs = balanced_service();
    let run = start(&bs, &ctx);
    serve_apply_only(&mut api, settled()).await;
    let status = serve_status(&mut api).await;
    finish(run).await.unwrap();
    api.assert_idle().await;

    // The next reconcile sees the status it wrote: applies again, but writes nothing else.
    bs.status = Some(serde_json::from_value(status).unwrap());
    let run = start(&bs, &ctx);
    serve_apply_only(&mut api, settled()).await;
    let action = finish(run).await.unwrap();
    api.assert_idle().await;
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));

    // What the two reconciles cost the API server: the first reads each owned object
    // once (none is ballast's yet) and writes status; a steady one only applies. Pods
    // and ReplicaSets come from the shared watches, never from a LIST per reconcile.
    let metrics = ctx.metrics.render();
    let count = |verb: &str, resource: &str| -> u64 {
        let series = format!(
            "ballast_operator_api_requests_total{{verb=\"{verb}\",resource=\"{resource}\"}} "
        );
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .map_or(0, |v| v.parse().unwrap())
    };
    assert_eq!(count("get", "services"), 3, "{metrics}");
    assert_eq!(count("patch", "services"), 6, "{metrics}");
    assert_eq!(count("patch", "deployments"), 4, "{metrics}");
    assert_eq!(count("patch", "balancedservices/status"), 1, "{metrics}");
    assert_eq!(count("list", "pods") + count("list", "replicasets"), 0);
    let total: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("ballast_operator_api_requests_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(total, 11 + 11 + 1 + 11, "{metrics}");
}

#[tokio::test]
async fn a_rollout_in_progress_is_reported_with_an_event_and_a_short_requeue() {
    let (ctx, mut api) = context();
    let bs = balanced_service();
    let rolling =
        json!({"replicas": 5, "readyReplicas": 4, "updatedReplicas": 2, "availableReplicas": 4});
    let replica_set = |revision: &str, available: i32| {
        json!({
            "metadata": {"name": format!("demo-{revision}"), "namespace": "shop",
                         "labels": {"ballast.dev/service": "demo", "ballast.dev/role": "app",
                                    "ballast.dev/revision": revision}},
            "status": {"replicas": available, "availableReplicas": available},
        })
    };
    let new_revision = crate::build::template_revision(bs.spec.template.as_ref().unwrap());
    api.seed(
        json!([]),
        json!([]),
        json!([replica_set("old", 3), replica_set(&new_revision, 1)]),
    );
    let run = start(&bs, &ctx);
    serve_apply_only(&mut api, rolling).await;
    let status = serve_status(&mut api).await;
    assert_condition(&status, "Progressing", "True", "RolloutInProgress");
    assert_condition(&status, "Available", "True", "AllAvailable");
    assert_eq!(status["phase"], "Progressing");
    assert_eq!(status["updatedReplicas"], 2);
    assert_eq!(
        status["currentRevision"], "old",
        "most available pods run the old revision"
    );
    assert_eq!(status["updateRevision"], new_revision);

    let event = serve_event(&mut api, "RolloutStarted", "Normal").await;
    assert_eq!(event["note"], "2/4 pods updated, 5 pods in all");
    let action = finish(run).await.unwrap();
    api.assert_idle().await;
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
}

fn invalid_service() -> BalancedService {
    let mut bs = balanced_service();
    bs.spec.probes.port = Some(IntOrString::String("nope".into()));
    bs
}

#[tokio::test]
async fn an_invalid_spec_applies_nothing_and_reports_why() {
    let (ctx, mut api) = context();
    let run = start(&invalid_service(), &ctx);

    // The first and only write is the status.
    let status = serve_status(&mut api).await;
    assert_condition(&status, "Degraded", "True", "InvalidSpec");
    let message = condition(&status, "Degraded")["message"].as_str().unwrap();
    assert!(message.contains("spec.probes.port"), "{message}");
    assert!(message.contains("\"nope\""), "{message}");
    assert_eq!(status["phase"], "Degraded");
    assert_eq!(status["conditions"].as_array().unwrap().len(), 1);

    let event = serve_event(&mut api, "InvalidSpec", "Warning").await;
    assert_eq!(event["note"], condition(&status, "Degraded")["message"]);
    let action = finish(run).await.unwrap();
    api.assert_idle().await;
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
}

#[tokio::test]
async fn a_failed_event_does_not_fail_the_reconcile() {
    let (ctx, mut api) = context();
    let run = start(&invalid_service(), &ctx);
    serve_status(&mut api).await;
    api.expect(Method::POST, EVENTS_PATH)
        .await
        .fail(StatusCode::FORBIDDEN, "Forbidden");
    let action = finish(run).await.unwrap();
    api.assert_idle().await;
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
}

/// Runs a reconcile whose first apply the API server refuses with `code`.
async fn first_apply_fails(
    code: StatusCode,
    reason: &str,
) -> (Arc<Context>, ApiServer, ReconcileError) {
    let (ctx, mut api) = context();
    api.seed(json!([]), json!([]), json!([]));
    let run = start(&balanced_service(), &ctx);
    serve_checks(&mut api).await;
    let (path, ..) = APPLIES[0];
    let req = api.expect(Method::PATCH, path).await;
    req.assert_apply();
    req.fail(code, reason);
    // No further object; the refusal reaches status and an Event before the retry.
    let status = serve_status(&mut api).await;
    assert_condition(&status, "Degraded", "True", "ApplyFailed");
    let message = condition(&status, "Degraded")["message"].as_str().unwrap();
    assert_eq!(
        message,
        format!("applying ServiceAccount demo-proxy failed, retrying: mock: {reason}")
    );
    let event = serve_event(&mut api, "ApplyFailed", "Warning").await;
    assert_eq!(event["note"], message);
    let error = finish(run).await.unwrap_err();
    api.assert_idle().await;
    match &error {
        ReconcileError::ApplyFailed { kind, name } => {
            assert_eq!(*kind, "ServiceAccount");
            assert_eq!(name, "demo-proxy");
        }
        other => panic!("expected ApplyFailed, got {other:?}"),
    }
    let metrics = ctx.metrics.render();
    assert!(
        metrics.contains("ballast_operator_reconcile_errors_total{step=\"apply_failed\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ballast_operator_reconciles_total 1"),
        "{metrics}"
    );
    (ctx, api, error)
}

#[tokio::test]
async fn a_refused_apply_stops_the_reconcile_and_says_why_on_status() {
    first_apply_fails(StatusCode::UNPROCESSABLE_ENTITY, "Invalid").await;
}

#[tokio::test]
async fn a_server_error_stops_the_reconcile_at_the_first_apply() {
    first_apply_fails(StatusCode::INTERNAL_SERVER_ERROR, "InternalError").await;
}

#[tokio::test]
async fn an_existing_service_that_is_not_ballasts_is_never_taken_over() {
    let (ctx, mut api) = context();
    api.seed(json!([]), json!([]), json!([]));
    let run = start(&balanced_service(), &ctx);
    // The user's own front Service `demo`, written by kubectl, with another selector.
    for (path, _, kind, name) in APPLIES {
        let req = api.expect(Method::GET, path).await;
        if (kind, name) == ("Service", "demo") {
            req.reply(&json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "demo", "namespace": "shop", "uid": "user-svc",
                             "managedFields": [{"manager": "kubectl-client-side-apply",
                                                "operation": "Update"}]},
                "spec": {"selector": {"app": "demo"}, "ports": [{"port": 80}]},
            }));
            break;
        }
        req.fail(StatusCode::NOT_FOUND, "NotFound");
    }
    // Not a single apply: the only write is the status, then the Event.
    let status = serve_status(&mut api).await;
    assert_condition(&status, "Degraded", "True", "Conflict");
    let message = condition(&status, "Degraded")["message"].as_str().unwrap();
    assert!(
        message.starts_with("Service demo already exists and is not managed by this BalancedService (written by kubectl-client-side-apply); nothing was changed."),
        "{message}"
    );
    serve_event(&mut api, "Conflict", "Warning").await;
    let error = finish(run).await.unwrap_err();
    api.assert_idle().await;
    assert!(
        matches!(&error, ReconcileError::Conflict { kind: "Service", name } if name == "demo"),
        "{error:?}"
    );

    // Another BalancedService's object is a conflict too, named by its controller.
    let (ctx, mut api) = context();
    api.seed(json!([]), json!([]), json!([]));
    let run = start(&balanced_service(), &ctx);
    let req = api.expect(Method::GET, APPLIES[0].0).await;
    req.reply(&json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "demo-proxy", "namespace": "shop",
                     "ownerReferences": [{"apiVersion": "ballast.dev/v1alpha1",
                         "kind": "BalancedService", "name": "demo-old", "uid": "another",
                         "controller": true}]},
    }));
    let mut object = serde_json::to_value(balanced_service()).unwrap();
    let req = api.expect(Method::PATCH, STATUS_PATH).await;
    let status = req.body()["status"].clone();
    let message = condition(&status, "Degraded")["message"].as_str().unwrap();
    assert!(
        message.contains("ServiceAccount demo-proxy already exists and is not managed by this BalancedService (controlled by BalancedService demo-old)"),
        "{message}"
    );
    object["status"] = status;
    req.reply(&object);
    serve_event(&mut api, "Conflict", "Warning").await;
    assert!(finish(run).await.is_err());
    api.assert_idle().await;
}

#[tokio::test]
async fn objects_already_owned_are_applied_over() {
    let (ctx, mut api) = context();
    let bs = balanced_service();
    api.seed(json!([]), json!([]), json!([]));
    let run = start(&bs, &ctx);
    for (path, api_version, kind, name) in APPLIES {
        api.expect(Method::GET, path).await.reply(&json!({
            "apiVersion": api_version, "kind": kind,
            "metadata": {"name": name, "namespace": "shop",
                         "ownerReferences": [{"apiVersion": "ballast.dev/v1alpha1",
                             "kind": "BalancedService", "name": "demo", "uid": UID,
                             "controller": true}]},
        }));
    }
    api.checked = true;
    serve_apply_only(&mut api, settled()).await;
    serve_status(&mut api).await;
    finish(run).await.unwrap();
    api.assert_idle().await;
}

#[tokio::test]
async fn repeated_failures_back_off_until_a_success_resets_them() {
    let (ctx, mut api, error) =
        first_apply_fails(StatusCode::INTERNAL_SERVER_ERROR, "InternalError").await;
    let bs = Arc::new(balanced_service());
    let delays: Vec<Action> = (0..3)
        .map(|_| error_policy(bs.clone(), &error, ctx.clone()))
        .collect();
    assert_eq!(
        delays,
        [1, 2, 4].map(|s| Action::requeue(Duration::from_secs(s)))
    );

    // Another object's failures are counted apart.
    let mut other = balanced_service();
    other.metadata.name = Some("other".into());
    assert_eq!(
        error_policy(Arc::new(other), &error, ctx.clone()),
        Action::requeue(Duration::from_secs(1))
    );

    let run = start(&bs, &ctx);
    serve_apply_only(&mut api, settled()).await;
    serve_status(&mut api).await;
    finish(run).await.unwrap();
    assert_eq!(
        error_policy(bs, &error, ctx.clone()),
        Action::requeue(Duration::from_secs(1)),
        "a successful reconcile resets the backoff"
    );
}

#[test]
fn backoff_doubles_up_to_five_minutes() {
    let secs = |n| backoff(n).as_secs();
    assert_eq!(secs(1), 1);
    assert_eq!(secs(2), 2);
    assert_eq!(secs(3), 4);
    assert_eq!(secs(9), 256);
    assert_eq!(secs(10), 300);
    assert_eq!(secs(u32::MAX), 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_pod_turns_routable_once_every_ready_proxy_lists_it() {
    let a = RealProxy::start("gate-a", &["127.0.0.5:8080", "127.0.0.6:8080"]).await;
    let b = RealProxy::start("gate-b", &["127.0.0.5:8080"]).await;
    let (ctx, mut api) = context();
    let bs = balanced_service();
    let new_revision = crate::build::template_revision(bs.spec.template.as_ref().unwrap());
    let pods = mid_rollout(&new_revision, None);
    let proxies = json!([a.pod("demo-proxy-a"), b.pod("demo-proxy-b")]);

    api.seed(pods.clone(), proxies.clone(), json!([]));
    let run = start(&bs, &ctx);
    serve_apply_only(&mut api, settled()).await;
    // B does not list the new pod yet: its gate is set False, with why.
    let gate = serve_gate(&mut api, "demo-new").await;
    assert_eq!(gate["status"], "False");
    assert_eq!(gate["reason"], "WaitingForProxies");
    assert_eq!(
        gate["message"],
        "127.0.0.6 not yet in the endpoints of proxy demo-proxy-b"
    );
    let status = serve_status(&mut api).await;
    let rollout = &status["lastRollout"];
    assert_eq!(rollout["revision"], new_revision.as_str());
    assert_eq!(rollout["previousRevision"], "old");
    let action = finish(run).await.unwrap();
    assert_eq!(
        action,
        Action::requeue(Duration::from_secs(1)),
        "a waiting pod is re-checked every second"
    );
    api.assert_idle().await;

    // B's watch catches up: the gate opens. The old pod's True is left alone.
    b.list(&["127.0.0.5:8080", "127.0.0.6:8080"]).await;
    let mut bs = bs;
    bs.status = Some(serde_json::from_value(status).unwrap());
    let pods = mid_rollout(&new_revision, Some("False"));
    api.seed(pods.clone(), proxies.clone(), json!([]));
    let run = start(&bs, &ctx);
    serve_apply_only(&mut api, settled()).await;
    let gate = serve_gate(&mut api, "demo-new").await;
    assert_eq!(gate["status"], "True");
    assert_eq!(gate["reason"], "ListedByAllProxies");
    let rest = serve_rest(&mut api).await;
    assert!(
        rest.iter().all(|(_, path, _)| path == STATUS_PATH),
        "{rest:?}"
    );
    finish(run).await.unwrap();

    // A proxy that cannot be read changes nothing: both pods keep their condition.
    let gone = json!({
        "metadata": {"name": "demo-proxy-c", "namespace": "shop"},
        "spec": {"containers": [{"name": "proxy", "image": "ballast",
                 "ports": [{"name": "admin", "containerPort": 9}]}]},
        "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
    });
    let pods = mid_rollout(&new_revision, Some("True"));
    api.seed(pods, json!([a.pod("demo-proxy-a"), gone]), json!([]));
    let run = start(&bs, &ctx);
    serve_apply_only(&mut api, settled()).await;
    let rest = serve_rest(&mut api).await;
    assert!(
        rest.iter().all(|(_, path, _)| path == STATUS_PATH),
        "no pod condition written: {rest:?}"
    );
    finish(run).await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_drain_over_the_threshold_pauses_the_deployment() {
    let proxy = RealProxy::start("pause", &["127.0.0.5:8080", "127.0.0.6:8080"]).await;
    let (ctx, mut api) = context();
    let mut bs = balanced_service();
    bs.spec.rollout.pause_when.forced_drains = Some(1);
    let new_revision = crate::build::template_revision(bs.spec.template.as_ref().unwrap());
    let pods = mid_rollout(&new_revision, Some("True"));
    let proxies = json!([proxy.pod("demo-proxy-a")]);
    // The old pod drains with a request still open, and its helper gives up.
    let registry = &proxy.running.registry;
    let old: std::net::SocketAddr = "127.0.0.5:8080".parse().unwrap();
    registry
        .get(old)
        .unwrap()
        .in_flight
        .store(1, std::sync::atomic::Ordering::Relaxed);
    let now = tokio::time::Instant::now();
    registry.request_drain(old.ip(), now).unwrap();
    registry.drain_timed_out(old.ip(), now).unwrap();

    api.seed(pods, proxies, json!([]));
    let run = start(&bs, &ctx);
    let app = serve_apply_only(&mut api, settled()).await;
    assert_eq!(app["spec"]["paused"], true, "the app Deployment is paused");
    let status = serve_status(&mut api).await;
    assert_condition(&status, "Progressing", "False", "RolloutPaused");
    assert_eq!(status["phase"], "Paused");
    let rollout = &status["lastRollout"];
    assert_eq!(rollout["forcedTerminations"], 1);
    assert!(
        rollout["paused"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("1 drains reached the timeout"),
        "{rollout}"
    );
    assert_eq!(status["draining"][0]["pod"], "demo-old");
    assert_eq!(status["draining"][0]["inFlight"], 1);
    let mut reasons = Vec::new();
    for _ in 0..2 {
        let req = api.expect(Method::POST, EVENTS_PATH).await;
        reasons.push(req.body()["reason"].as_str().unwrap().to_owned());
        let body = req.body().clone();
        req.respond(StatusCode::CREATED, &body);
    }
    reasons.sort();
    assert_eq!(reasons, ["ForcedDrain", "RolloutPaused"]);
    finish(run).await.unwrap();
    api.assert_idle().await;

    // The resume annotation resumes it (and is removed); the Deployment is unpaused.
    bs.status = Some(serde_json::from_value(status).unwrap());
    bs.metadata.annotations = Some([(RESUME_ANNOTATION.to_owned(), "yes".to_owned())].into());
    let pods = mid_rollout(&new_revision, Some("True"));
    api.seed(pods, json!([proxy.pod("demo-proxy-a")]), json!([]));
    let run = start(&bs, &ctx);
    let app = serve_apply_only(&mut api, settled()).await;
    assert!(app["spec"].get("paused").is_none(), "{}", app["spec"]);
    let status = serve_status(&mut api).await;
    assert_eq!(status["lastRollout"]["paused"]["resumed"], true);
    serve_requests_removed(&mut api, &[RESUME_ANNOTATION]).await;
    let reasons: Vec<String> = serve_rest(&mut api)
        .await
        .into_iter()
        .filter(|(_, path, _)| path == EVENTS_PATH)
        .map(|(_, _, body)| body["reason"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        reasons.contains(&"RolloutResumed".to_owned()),
        "{reasons:?}"
    );
    finish(run).await.unwrap();
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pause_request_pauses_the_running_rollout_and_is_removed() {
    let proxy = RealProxy::start("pause-request", &["127.0.0.5:8080", "127.0.0.6:8080"]).await;
    let (ctx, mut api) = context();
    let mut bs = balanced_service();
    let pause = ballast_api::meta::RolloutRequest::Pause.annotation();
    bs.metadata.annotations = Some([(pause.to_owned(), "2026-12-04T20:00:00Z".to_owned())].into());
    let new_revision = crate::build::template_revision(bs.spec.template.as_ref().unwrap());
    let pods = mid_rollout(&new_revision, Some("True"));
    api.seed(pods, json!([proxy.pod("demo-proxy-a")]), json!([]));
    let run = start(&bs, &ctx);
    let app = serve_apply_only(&mut api, settled()).await;
    assert_eq!(app["spec"]["paused"], true, "the app Deployment is paused");
    let status = serve_status(&mut api).await;
    assert_condition(&status, "Progressing", "False", "RolloutPaused");
    assert_eq!(
        status["lastRollout"]["paused"]["reason"],
        "paused on request (ballast.dev/pause)"
    );
    serve_requests_removed(&mut api, &[pause]).await;
    let events: Vec<Value> = serve_rest(&mut api)
        .await
        .into_iter()
        .filter(|(_, path, _)| path == EVENTS_PATH)
        .map(|(_, _, body)| body)
        .collect();
    let paused = events
        .iter()
        .find(|e| e["reason"] == "RolloutPaused")
        .unwrap_or_else(|| panic!("{events:?}"));
    assert_eq!(paused["type"], "Normal", "the user asked: {paused}");
    finish(run).await.unwrap();
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_rollback_the_previous_template_is_restored_instead() {
    let proxy = RealProxy::start("rollback", &["127.0.0.5:8080", "127.0.0.6:8080"]).await;
    let (ctx, mut api) = context();
    let mut bs = balanced_service();
    bs.spec.rollout.pause_when.forced_drains = Some(1);
    bs.spec.rollout.pause_when.rollback = true;
    let new_revision = crate::build::template_revision(bs.spec.template.as_ref().unwrap());
    let pods = mid_rollout(&new_revision, Some("True"));
    let registry = &proxy.running.registry;
    let old: std::net::SocketAddr = "127.0.0.5:8080".parse().unwrap();
    registry
        .get(old)
        .unwrap()
        .connections
        .store(1, std::sync::atomic::Ordering::Relaxed);
    let now = tokio::time::Instant::now();
    registry.request_drain(old.ip(), now).unwrap();
    registry.drain_timed_out(old.ip(), now).unwrap();
    let old_rs = json!({
        "metadata": {"name": "demo-5d8f", "namespace": "shop",
                     "labels": {"ballast.dev/service": "demo", "ballast.dev/role": "app",
                                "ballast.dev/revision": "old", "pod-template-hash": "5d8f"}},
        "spec": {"selector": {"matchLabels": {"ballast.dev/service": "demo"}},
                 "template": {"metadata": {"labels": {"ballast.dev/revision": "old",
                                                      "pod-template-hash": "5d8f"}},
                              "spec": {"containers": [{"name": "app", "image": "demo:0"}]}}},
        "status": {"replicas": 3, "availableReplicas": 3},
    });

    api.seed(pods, json!([proxy.pod("demo-proxy-a")]), json!([old_rs]));
    let run = start(&bs, &ctx);
    let app = serve_apply_only(&mut api, settled()).await;
    let template = &app["spec"]["template"];
    assert_eq!(template["spec"]["containers"][0]["image"], "demo:0");
    assert_eq!(
        template["metadata"]["labels"],
        json!({"ballast.dev/revision": "old"}),
        "the ReplicaSet's pod-template-hash is not copied"
    );
    assert!(app["spec"].get("paused").is_none());
    let status = serve_status(&mut api).await;
    assert_condition(&status, "Progressing", "False", "RolledBack");
    assert_condition(&status, "Degraded", "True", "RolledBack");
    assert_eq!(status["lastRollout"]["paused"]["rolledBack"], true);
    let reasons: Vec<String> = serve_rest(&mut api)
        .await
        .into_iter()
        .map(|(_, _, body)| body["reason"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(reasons.contains(&"RolledBack".to_owned()), "{reasons:?}");
    finish(run).await.unwrap();
    proxy.shutdown().await;
}

#[tokio::test]
async fn what_is_remembered_follows_the_live_balanced_services() {
    let (ctx, mut api) = context();
    let bs = balanced_service();
    let run = start(&bs, &ctx);
    serve_apply_only(&mut api, settled()).await;
    serve_status(&mut api).await;
    finish(run).await.unwrap();
    assert!(ctx.remembered() > 0);
    ctx.forget_gone(&[Arc::new(bs)]);
    assert!(
        ctx.remembered() > 0,
        "a live BalancedService keeps its memory"
    );
    ctx.forget_gone(&[]);
    assert_eq!(ctx.remembered(), 0, "a deleted one leaves nothing behind");
}

#[tokio::test]
async fn a_steady_reconcile_writes_nothing_once_the_watches_show_what_was_applied() {
    let (ctx, mut api) = context();
    let mut bs = balanced_service();
    let run = start(&bs, &ctx);
    serve_apply_only(&mut api, settled()).await;
    let status = serve_status(&mut api).await;
    finish(run).await.unwrap();
    // The watches deliver what the applies returned.
    api.deliver_applied();
    bs.status = Some(serde_json::from_value(status).unwrap());
    let run = start(&bs, &ctx);
    finish(run).await.unwrap();
    api.assert_idle().await;

    // Somebody edits the app Deployment's labels: that one object is applied again.
    let mut edited = serde_json::to_value(
        ctx.caches
            .owned
            .deployments
            .get(&ObjectRef::new("demo").within("shop"))
            .unwrap()
            .as_ref(),
    )
    .unwrap();
    edited["metadata"]["labels"]["team"] = "other".into();
    api.cluster
        .deployments
        .apply_watcher_event(&watcher::Event::Apply(
            serde_json::from_value(edited).unwrap(),
        ));
    let run = start(&bs, &ctx);
    let req = api
        .expect(
            Method::PATCH,
            "/apis/apps/v1/namespaces/shop/deployments/demo",
        )
        .await;
    req.assert_apply();
    let mut reply = req.body().clone();
    reply["status"] = settled();
    reply["status"]["observedGeneration"] = APP_GENERATION.into();
    reply["metadata"]["generation"] = APP_GENERATION.into();
    req.reply(&reply);
    finish(run).await.unwrap();
    api.assert_idle().await;
}

#[test]
fn event_notes_are_cut_to_what_the_api_accepts() {
    let short = "a message".to_owned();
    assert_eq!(event_note(short.clone()), short);
    // An API server message quoted in full can be long, and multi-byte.
    let long = "é".repeat(800);
    let note = event_note(long);
    assert!(note.len() <= 1024, "{}", note.len());
    assert!(note.ends_with("..."));
    assert!(note.starts_with("éé"));
}

#[tokio::test]
async fn a_neg_on_a_service_of_the_app_pods_and_a_route_to_the_backends_are_reported() {
    let (ctx, mut api) = context();
    let bs = balanced_service();
    let mut pod = app_pod("demo-a", "127.0.0.5", "r1", Some("True"));
    pod["metadata"]["labels"]["app.kubernetes.io/name"] = "demo".into();
    api.seed(json!([pod]), json!([]), json!([]));
    // What the watches of every Service and of the Gateway API routes would hold.
    let direct: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
        "metadata": {"name": "demo-direct", "namespace": "shop",
                     "annotations": {"cloud.google.com/neg": "{\"ingress\": true}"}},
        "spec": {"selector": {"app.kubernetes.io/name": "demo"}, "ports": [{"port": 80}]},
    }))
    .unwrap();
    api.cluster
        .services
        .apply_watcher_event(&kube::runtime::watcher::Event::Apply(direct));
    let route: kube::core::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "shortcut", "namespace": "shop"},
        "spec": {"rules": [{"backendRefs": [{"name": "demo-backends", "port": 80}]}]},
    }))
    .unwrap();
    api.cluster.routes[0].apply_watcher_event(&kube::runtime::watcher::Event::Apply(route));

    let run = start(&bs, &ctx);
    serve_apply_only(&mut api, settled()).await;
    let rest = serve_rest(&mut api).await;
    finish(run).await.unwrap();
    let status = rest
        .iter()
        .find(|(_, path, _)| path == STATUS_PATH)
        .map(|(_, _, body)| body["status"].clone())
        .expect("a status write");
    assert_condition(&status, "Degraded", "True", "ProxyBypassed");
    let degraded = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Degraded")
        .unwrap();
    let message = degraded["message"].as_str().unwrap();
    assert!(
        message.contains("Service demo-direct selects the app pods"),
        "{message}"
    );
    assert!(
        message.contains("HTTPRoute shop/shortcut sends to the backends Service"),
        "{message}"
    );
    let event = rest
        .iter()
        .find(|(_, path, body)| path == EVENTS_PATH && body["reason"] == "ProxyBypassed")
        .map(|(_, _, body)| body.clone())
        .expect("a ProxyBypassed Event");
    assert_eq!(event["type"], "Warning");
}

/// A rollout under way: the old revision's pod (routable) at 127.0.0.5 and a new one at
/// 127.0.0.6 whose gate condition is `routable`.
fn mid_rollout(new_revision: &str, routable: Option<&str>) -> Value {
    json!([
        app_pod("demo-old", "127.0.0.5", "old", Some("True")),
        app_pod("demo-new", "127.0.0.6", new_revision, routable),
    ])
}
