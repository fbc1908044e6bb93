//! `reconcile` of a BalancedService adopting a Deployment (`spec.workloadRef`) and its
//! Service, against the mock API server of [`crate::fixtures::api_server`]: the first
//! reconciles, the switch of the user's Service, the first-rollout guard and the
//! give-back on deletion, each request checked in order.

use super::*;
use crate::fixtures::api_server::*;
use crate::fixtures::real_proxy::RealProxy;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use std::collections::BTreeMap;

const DEPLOYMENT_PATH: &str = "/apis/apps/v1/namespaces/shop/deployments/web";
const SERVICE_PATH: &str = "/api/v1/namespaces/shop/services/web";
const BACKENDS_PATH: &str = "/api/v1/namespaces/shop/services/demo-backends";
const BS_PATH: &str = "/apis/ballast.dev/v1alpha1/namespaces/shop/balancedservices/demo";
const SLICES_PATH: &str = "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices";

/// The owned objects of an adopting BalancedService, in apply order: no front Service
/// (the user's is switched, not applied), no app PodDisruptionBudget, and the adopted
/// Deployment is not read for ownership (it is the user's).
const OWNED: [usize; 8] = [0, 1, 2, 3, 4, 5, 9, 10];

/// BalancedService `demo` adopting Deployment `web`, its front Service the user's `web`.
fn adopting(adopt: bool) -> BalancedService {
    serde_json::from_value(json!({
        "apiVersion": "ballast.dev/v1alpha1",
        "kind": "BalancedService",
        "metadata": {"name": "demo", "namespace": "shop", "uid": UID, "generation": 3,
                     "resourceVersion": "41"},
        "spec": {
            "workloadRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
            "service": {"name": "web", "adopt": adopt},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
            "probes": {"path": "/healthz"},
        }
    }))
    .unwrap()
}

fn with_finalizer(mut bs: BalancedService) -> BalancedService {
    bs.metadata.finalizers = Some(vec![FINALIZER.to_owned()]);
    bs
}

/// The user's Deployment `web`: 2 replicas, selected by `app: web`, a container without
/// probes or preStop. `managed_by_ballast`: its managedFields name ballast's apply.
fn deployment(managed_by_ballast: bool) -> Value {
    let mut managers = vec![json!({"manager": "kubectl-client-side-apply", "operation": "Update"})];
    if managed_by_ballast {
        managers.push(json!({"manager": MANAGER_NAME, "operation": "Apply"}));
    }
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "shop", "uid": "web-uid", "generation": 1,
                     "resourceVersion": "100", "managedFields": managers},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "web:1",
                         "ports": [{"name": "http", "containerPort": 8080}]}]},
            },
        },
        "status": {"replicas": 2, "readyReplicas": 2, "availableReplicas": 2,
                   "updatedReplicas": 2},
    })
}

const MANAGER_NAME: &str = crate::build::MANAGER;

fn original_ports() -> Value {
    json!([{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}])
}

/// The user's Service `web`: `app: web`, port 80 to 8080.
fn user_service() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop", "uid": "web-svc",
                     "resourceVersion": "200",
                     "managedFields": [{"manager": "kubectl-client-side-apply",
                                        "operation": "Update"}]},
        "spec": {"selector": {"app": "web"}, "ports": original_ports(),
                 "clusterIP": "10.96.0.10", "type": "ClusterIP"},
    })
}

/// The user's Service as ballast switched it to the proxies.
fn switched_service() -> Value {
    let mut service = user_service();
    service["metadata"]["annotations"] = json!({
        ADOPTED_BY: "demo",
        ORIGINAL: json!({"selector": {"app": "web"}, "ports": original_ports()}).to_string(),
    });
    service["spec"]["selector"] =
        json!({"ballast.dev/service": "demo", "ballast.dev/role": "proxy"});
    service["spec"]["ports"][0]["targetPort"] = "proxy".into();
    service
}

/// A pod of the Deployment `web`. `gated`: started from ballast's template (readiness
/// gate, drain gate); otherwise one that predates the adoption. `backend`: its
/// `ballast.dev/backend` label, once the operator labelled it.
fn web_pod(name: &str, ip: &str, gated: bool, backend: Option<&str>, ready: bool) -> Value {
    let mut labels = json!({"app": "web", "pod-template-hash": if gated { "new" } else { "old" }});
    if let Some(backend) = backend {
        labels["ballast.dev/service"] = "demo".into();
        labels["ballast.dev/role"] = "app".into();
        labels["ballast.dev/backend"] = backend.into();
    }
    let mut spec = json!({"containers": [{"name": "web", "image": "web:1"}]});
    if gated {
        spec["readinessGates"] = json!([{"conditionType": crate::observe::ROUTABLE_CONDITION}]);
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": labels},
        "spec": spec,
        "status": {"podIP": ip, "conditions": [
            {"type": "Ready", "status": if ready { "True" } else { "False" }}]},
    })
}

/// Serves the reads (first time only) and the applies of the adopting BalancedService's
/// owned objects; `app`, when the adopted Deployment is applied among them (its front
/// Service already switched), is what the API server answers for it. Returns the bodies
/// applied, by name.
async fn serve_owned(
    api: &mut ApiServer,
    proxies_ready: i32,
    app: Option<&Value>,
) -> BTreeMap<String, Value> {
    if !api.checked {
        for i in OWNED {
            api.expect(Method::GET, APPLIES[i].0)
                .await
                .fail(StatusCode::NOT_FOUND, "NotFound");
        }
        api.checked = true;
    }
    let mut bodies = BTreeMap::new();
    for i in OWNED {
        if i == 9
            && let Some(app) = app
        {
            bodies.insert("web".to_owned(), serve_app_apply(api, app).await);
        }
        let (path, api_version, kind, name) = APPLIES[i];
        let req = api.expect(Method::PATCH, path).await;
        req.assert_apply();
        let body = req.body().clone();
        assert_eq!(body["apiVersion"], api_version, "{path}");
        assert_eq!(body["kind"], kind, "{path}");
        assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], UID, "{path}");
        let mut reply = body.clone();
        if name == "demo-proxy" && kind == "Deployment" {
            reply["metadata"]["generation"] = 1.into();
            reply["status"] = json!({"observedGeneration": 1, "replicas": 2,
                                     "readyReplicas": proxies_ready});
        }
        req.reply(&reply);
        bodies.insert(format!("{kind}/{name}"), body);
    }
    bodies
}

/// Expects the server-side apply of ballast's fields to Deployment `web`; answers
/// `merged`. Returns the body.
async fn serve_app_apply(api: &mut ApiServer, merged: &Value) -> Value {
    let req = api.expect(Method::PATCH, DEPLOYMENT_PATH).await;
    req.assert_apply();
    let body = req.body().clone();
    req.reply(merged);
    body
}

/// Answers what is left (the status write, Events); returns the status written, if
/// any, and fails on any other write.
async fn serve_status_and_events(api: &mut ApiServer) -> Option<Value> {
    let mut status = None;
    for (method, path, body) in serve_rest(api).await {
        match (method, path.as_str()) {
            (Method::PATCH, STATUS_PATH) => status = Some(body["status"].clone()),
            // An Event, or a repeat of one (its series counted up).
            (Method::POST | Method::PATCH, path) if path.starts_with(EVENTS_PATH) => {}
            (method, path) => panic!("unexpected {method} {path}: {body}"),
        }
    }
    status
}

fn adopted_message(status: &Value) -> String {
    condition(status, "Adopted")["message"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_and_its_service_are_adopted_once_the_proxies_route_to_every_pod() {
    let (ctx, mut api) = context();
    let bs = adopting(true);

    // First reconcile: nothing of the pods in the caches yet, the proxies not ready.
    let run = start(&bs, &ctx);
    api.expect(Method::GET, DEPLOYMENT_PATH)
        .await
        .reply(&deployment(false));
    let req = api.expect(Method::PATCH, BS_PATH).await;
    assert_eq!(
        req.seen.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert_eq!(
        req.body(),
        &json!({"metadata": {"finalizers": [FINALIZER], "resourceVersion": "41"}}),
        "the finalizer is added with a compare-and-swap"
    );
    req.reply(&serde_json::to_value(with_finalizer(bs.clone())).unwrap());
    api.expect(Method::GET, SERVICE_PATH)
        .await
        .reply(&user_service());
    // The pods that predate the adoption, listed by the Deployment's own selector.
    let req = api.expect(Method::GET, PODS_PATH).await;
    assert_eq!(req.param("labelSelector"), Some("app=web"));
    req.reply(&json!({
        "apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "300"},
        "items": [web_pod("web-a", "127.0.0.5", false, None, true),
                  web_pod("web-b", "127.0.0.6", false, None, true)],
    }));
    for pod in ["web-a", "web-b"] {
        let req = api
            .expect(Method::PATCH, &format!("{PODS_PATH}/{pod}"))
            .await;
        assert_eq!(
            req.body(),
            &json!({"metadata": {"labels": {"ballast.dev/service": "demo",
                "ballast.dev/role": "app", "ballast.dev/backend": "true"}}})
        );
        req.reply(&web_pod(pod, "127.0.0.5", false, Some("true"), true));
    }
    let applied = serve_owned(&mut api, 0, None).await;
    assert_eq!(
        applied["Service/demo-backends"]["spec"]["selector"],
        json!({"app": "web", "ballast.dev/backend": "true"}),
        "the proxies balance over the Deployment's labelled pods"
    );
    let status = serve_status(&mut api).await;
    assert_condition(&status, "Adopted", "False", "WaitingForProxies");
    assert_eq!(
        adopted_message(&status),
        "Deployment web adopted; Service web switches to the proxies once 0/2 ready pods of Deployment web are labelled and seen"
    );
    // Neither the Service nor the Deployment is written while the proxies are not ready.
    assert_eq!(serve_status_and_events(&mut api).await, None);
    finish(run).await.unwrap();
    api.assert_idle().await;

    // The proxies are ready and list the pod the caches hold; the other one's label
    // is not seen yet, so nobody checked the proxies route to it: no switch.
    let proxy = RealProxy::start("adopt", &[]).await;
    proxy.list_ready(&["127.0.0.5:8080"]).await;
    let proxies = json!([proxy.pod("demo-proxy-a"), proxy.pod("demo-proxy-b")]);
    api.seed(
        json!([web_pod("web-a", "127.0.0.5", false, Some("true"), true)]),
        proxies.clone(),
        json!([]),
    );
    let mut bs = with_finalizer(bs);
    bs.status = Some(serde_json::from_value(status).unwrap());
    let run = start(&bs, &ctx);
    api.expect(Method::GET, DEPLOYMENT_PATH)
        .await
        .reply(&deployment(false));
    api.expect(Method::GET, SERVICE_PATH)
        .await
        .reply(&user_service());
    // Listed again (fewer cached than the Deployment has); both are labelled already.
    api.expect(Method::GET, PODS_PATH).await.reply(&json!({
        "apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "301"},
        "items": [web_pod("web-a", "127.0.0.5", false, Some("true"), true),
                  web_pod("web-b", "127.0.0.6", false, Some("true"), true)],
    }));
    serve_owned(&mut api, 2, None).await;
    let status = serve_status_and_events(&mut api)
        .await
        .expect("status written");
    assert_condition(&status, "Adopted", "False", "WaitingForProxies");
    assert_eq!(
        adopted_message(&status),
        "Deployment web adopted; Service web switches to the proxies once 1/2 ready pods of Deployment web are labelled and seen"
    );
    finish(run).await.unwrap();
    api.assert_idle().await;

    // Both pods seen, both listed ready by every proxy: the switch.
    proxy
        .list_ready(&["127.0.0.5:8080", "127.0.0.6:8080"])
        .await;
    api.seed(
        json!([
            web_pod("web-a", "127.0.0.5", false, Some("true"), true),
            web_pod("web-b", "127.0.0.6", false, Some("true"), true),
        ]),
        proxies,
        json!([]),
    );
    bs.status = Some(serde_json::from_value(status).unwrap());
    let run = start(&bs, &ctx);
    api.expect(Method::GET, DEPLOYMENT_PATH)
        .await
        .reply(&deployment(false));
    api.expect(Method::GET, SERVICE_PATH)
        .await
        .reply(&user_service());
    serve_owned(&mut api, 2, None).await;

    // The Service is switched: the proxies' selector (the old key nulled), the proxy
    // port, and what it was before, to switch it back.
    let req = api.expect(Method::PATCH, SERVICE_PATH).await;
    assert_eq!(
        req.seen.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert_eq!(req.param("fieldManager"), Some(MANAGER_NAME));
    let patch = req.body().clone();
    assert_eq!(
        patch["spec"]["selector"],
        json!({"app": null, "ballast.dev/service": "demo", "ballast.dev/role": "proxy"})
    );
    let ports = patch["spec"]["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0]["port"], 80);
    assert_eq!(ports[0]["name"], "http");
    // The proxy container's client port, by number.
    assert_eq!(ports[0]["targetPort"], 8080);
    let annotations = &patch["metadata"]["annotations"];
    assert_eq!(annotations[ADOPTED_BY], "demo");
    let original: Value = serde_json::from_str(annotations[ORIGINAL].as_str().unwrap()).unwrap();
    assert_eq!(
        original,
        json!({"selector": {"app": "web"}, "ports": original_ports()})
    );
    req.reply(&switched_service());

    // Then ballast's fields go onto the Deployment, and only those.
    let mut merged = deployment(true);
    merged["metadata"]["generation"] = 2.into();
    let body = serve_app_apply(&mut api, &merged).await;
    let spec = &body["spec"];
    assert!(
        spec.get("replicas").is_none(),
        "replicas are the owner's: {spec}"
    );
    assert!(
        body["metadata"].get("ownerReferences").is_none(),
        "deleting the BalancedService must not delete the Deployment"
    );
    assert_eq!(
        body["metadata"]["labels"],
        json!({"ballast.dev/service": "demo"}),
        "the app.kubernetes.io labels stay the owner's"
    );
    assert_eq!(spec["selector"], json!({"matchLabels": {"app": "web"}}));
    let pod = &spec["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["name"], "web");
    assert!(container.get("image").is_none(), "the image is the owner's");
    let pre_stop = container["lifecycle"]["preStop"]["exec"]["command"].to_string();
    assert!(pre_stop.contains("ballast-drain"), "{pre_stop}");
    assert!(
        container.get("readinessProbe").is_some(),
        "generated probes"
    );
    assert_eq!(pod["initContainers"][0]["name"], "ballast-drain-install");
    assert_eq!(
        pod["readinessGates"],
        json!([{"conditionType": crate::observe::ROUTABLE_CONDITION}])
    );
    assert_eq!(
        spec["template"]["metadata"]["labels"],
        json!({"ballast.dev/service": "demo", "ballast.dev/role": "app",
               "ballast.dev/backend": "true"})
    );

    // No gate on the old pods (they have none), no retirement without a new pod.
    let status = serve_status_and_events(&mut api)
        .await
        .expect("status written");
    assert_condition(&status, "Adopted", "True", "FirstRollout");
    assert!(
        adopted_message(&status).starts_with(
            "Deployment web and Service web adopted; 2 pods started before the adoption are replaced one by one"
        ),
        "{status}"
    );
    finish(run).await.unwrap();
    api.assert_idle().await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_existing_service_without_adopt_is_a_conflict_and_nothing_is_written() {
    let (ctx, mut api) = context();
    let bs = with_finalizer(adopting(false));
    let run = start(&bs, &ctx);
    api.expect(Method::GET, DEPLOYMENT_PATH)
        .await
        .reply(&deployment(false));
    api.expect(Method::GET, SERVICE_PATH)
        .await
        .reply(&user_service());
    // No pod labelled, nothing applied, the Service untouched: status and an Event.
    let status = serve_status(&mut api).await;
    assert_condition(&status, "Degraded", "True", "Conflict");
    let message = condition(&status, "Degraded")["message"].as_str().unwrap();
    assert!(
        message.starts_with("Service web already exists and is not managed by this BalancedService (written by kubectl-client-side-apply; set spec.service.adopt: true to switch it to the proxies); nothing was changed."),
        "{message}"
    );
    let event = serve_event(&mut api, "Conflict", "Warning").await;
    assert_eq!(event["note"], message);
    let error = finish(run).await.unwrap_err();
    api.assert_idle().await;
    assert!(
        matches!(&error, ReconcileError::Conflict { kind: "Service", name } if name == "web"),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_missing_deployment_is_reported_and_nothing_is_applied() {
    let (ctx, mut api) = context();
    let bs = with_finalizer(adopting(true));
    let run = start(&bs, &ctx);
    api.expect(Method::GET, DEPLOYMENT_PATH)
        .await
        .fail(StatusCode::NOT_FOUND, "NotFound");
    let status = serve_status(&mut api).await;
    assert_condition(&status, "Adopted", "False", "WorkloadNotFound");
    assert_eq!(adopted_message(&status), "Deployment web does not exist");
    assert_condition(&status, "Degraded", "True", "WorkloadNotFound");
    assert_eq!(
        condition(&status, "Degraded")["message"],
        "the Deployment web named by spec.workloadRef does not exist; nothing was changed"
    );
    assert_eq!(serve_status_and_events(&mut api).await, None);
    finish(run).await.unwrap();
    api.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_rollout_retires_and_drains_an_old_pod_before_a_new_pod_opens() {
    let (ctx, mut api) = context();
    let bs = with_finalizer(adopting(true));
    let proxy = RealProxy::start(
        "adopt-guard",
        &["127.0.0.5:8080", "127.0.0.6:8080", "127.0.0.7:8080"],
    )
    .await;
    let proxies = json!([proxy.pod("demo-proxy-a")]);
    let mut rolling = deployment(true);
    rolling["status"]["replicas"] = 3.into();
    let new_pod = web_pod("web-new", "127.0.0.7", true, Some("true"), false);
    let old_a = web_pod("web-a", "127.0.0.5", false, Some("true"), true);
    let old_b = web_pod("web-b", "127.0.0.6", false, Some("true"), true);

    // Two old pods serve, a new one waits for its gate. With maxUnavailable 0 opening it
    // lets the Deployment controller delete an old pod at once: one is retired first.
    api.seed(
        json!([old_a, old_b, new_pod.clone()]),
        proxies.clone(),
        json!([]),
    );
    let before = k8s_openapi::jiff::Timestamp::now().as_second();
    let run = start(&bs, &ctx);
    api.expect(Method::GET, DEPLOYMENT_PATH)
        .await
        .reply(&rolling);
    api.expect(Method::GET, SERVICE_PATH)
        .await
        .reply(&switched_service());
    serve_owned(&mut api, 1, Some(&rolling)).await;
    let req = api
        .expect(Method::PATCH, &format!("{PODS_PATH}/web-a"))
        .await;
    assert_eq!(
        req.seen.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    let label = req.body()["metadata"]["labels"]["ballast.dev/backend"]
        .as_str()
        .unwrap()
        .to_owned();
    let retired_at: i64 = label.strip_prefix("retired-").unwrap().parse().unwrap();
    assert!(retired_at >= before, "{label}");
    assert_eq!(
        req.body()["metadata"]["annotations"],
        json!({"controller.kubernetes.io/pod-deletion-cost": "-2147483648"})
    );
    req.reply(&web_pod("web-a", "127.0.0.5", false, Some(&label), true));
    // Every proxy lists the new pod, yet its gate stays closed.
    let gate = serve_gate(&mut api, "web-new").await;
    assert_eq!(gate["status"], "False");
    assert_eq!(gate["message"], crate::gate::HELD_FOR_RETIREMENT);
    let status = serve_status_and_events(&mut api).await.unwrap();
    assert_condition(&status, "Adopted", "True", "FirstRollout");
    finish(run).await.unwrap();
    api.assert_idle().await;

    // The retired pod still has a request in flight: nothing opens, nothing else retires.
    let old_a = web_pod("web-a", "127.0.0.5", false, Some(&label), true);
    let mut waiting = new_pod.clone();
    waiting["status"]["conditions"]
        .as_array_mut()
        .unwrap()
        .push(
            json!({"type": crate::observe::ROUTABLE_CONDITION, "status": "False",
                     "message": "an old pod without the drain gate is taken out of the proxies and drained first"}),
        );
    let registry = &proxy.running.registry;
    let retired: std::net::SocketAddr = "127.0.0.5:8080".parse().unwrap();
    let endpoint = registry.get(retired).unwrap();
    endpoint
        .in_flight
        .store(1, std::sync::atomic::Ordering::Relaxed);
    api.seed(json!([old_a, old_b, waiting]), proxies.clone(), json!([]));
    let run = start(&bs, &ctx);
    api.expect(Method::GET, DEPLOYMENT_PATH)
        .await
        .reply(&rolling);
    api.expect(Method::GET, SERVICE_PATH)
        .await
        .reply(&switched_service());
    serve_owned(&mut api, 1, Some(&rolling)).await;
    let status = serve_status_and_events(&mut api).await.unwrap();
    assert!(
        adopted_message(&status)
            .ends_with("(draining web-a: proxy demo-proxy-a: 1 in flight, 0 connections)"),
        "{status}"
    );
    finish(run).await.unwrap();
    api.assert_idle().await;

    // Drained: the new pod's gate opens.
    endpoint
        .in_flight
        .store(0, std::sync::atomic::Ordering::Relaxed);
    api.seed(json!([old_a, old_b, waiting]), proxies.clone(), json!([]));
    let run = start(&bs, &ctx);
    api.expect(Method::GET, DEPLOYMENT_PATH)
        .await
        .reply(&rolling);
    api.expect(Method::GET, SERVICE_PATH)
        .await
        .reply(&switched_service());
    serve_owned(&mut api, 1, Some(&rolling)).await;
    let gate = serve_gate(&mut api, "web-new").await;
    assert_eq!(gate["status"], "True");
    serve_status_and_events(&mut api).await;
    finish(run).await.unwrap();
    api.assert_idle().await;
    proxy.shutdown().await;
}

/// One give-back reconcile up to its status write: reads the Deployment (`deployment`)
/// and the front Service (`service`).
async fn give_back_reads(api: &mut ApiServer, deployment: &Value, service: &Value) {
    api.expect(Method::GET, DEPLOYMENT_PATH)
        .await
        .reply(deployment);
    api.expect(Method::GET, SERVICE_PATH).await.reply(service);
}

/// Expects the status write of a give-back step; returns the `Adopted` message.
async fn serve_giving_back(api: &mut ApiServer) -> String {
    let status = serve_status(api).await;
    assert_condition(&status, "Adopted", "False", "GivingBack");
    adopted_message(&status)
}

fn slices(targets: &[&str]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
        "metadata": {"resourceVersion": "500"},
        "items": [{
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-x1", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": targets.iter().map(|name| json!({
                "addresses": ["10.0.0.1"],
                "targetRef": {"kind": "Pod", "name": name, "namespace": "shop"},
            })).collect::<Vec<_>>(),
        }],
    })
}

#[tokio::test]
async fn deleting_an_adopting_balanced_service_gives_everything_back_step_by_step() {
    let (ctx, mut api) = context();
    let mut bs = with_finalizer(adopting(true));
    bs.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    let proxy_pod = json!({
        "metadata": {"name": "demo-proxy-a", "namespace": "shop",
                     "labels": {"ballast.dev/service": "demo", "ballast.dev/role": "proxy"}},
    });
    let gated = web_pod("web-n1", "127.0.0.7", true, Some("true"), true);
    api.seed(json!([gated]), json!([proxy_pod]), json!([]));

    // 1: the backends Service selects every pod of the Deployment, and ballast's fields
    // leave the Deployment (an apply of nothing under ballast's manager).
    let run = start(&bs, &ctx);
    give_back_reads(&mut api, &deployment(true), &switched_service()).await;
    let req = api.expect(Method::PATCH, BACKENDS_PATH).await;
    assert_eq!(
        req.seen.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert_eq!(
        req.body(),
        &json!({"spec": {"selector": {"app": "web", "ballast.dev/backend": null}}})
    );
    req.reply(&json!({"apiVersion": "v1", "kind": "Service",
                      "metadata": {"name": "demo-backends", "namespace": "shop"}}));
    let req = api.expect(Method::PATCH, DEPLOYMENT_PATH).await;
    req.assert_apply();
    assert_eq!(
        req.body(),
        &json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}})
    );
    req.reply(&deployment(false));
    assert_eq!(
        serve_giving_back(&mut api).await,
        "step 1/4: removing ballast's fields from the Deployment"
    );
    assert_eq!(
        finish(run).await.unwrap(),
        Action::requeue(Duration::from_secs(2))
    );
    api.assert_idle().await;

    // 2: a pod with the drain gate is left: wait, writing nothing but status.
    let run = start(&bs, &ctx);
    give_back_reads(&mut api, &deployment(false), &switched_service()).await;
    assert_eq!(
        serve_giving_back(&mut api).await,
        "step 2/4: the Deployment rolls back to its own template behind the proxies (1 pods with the drain gate left)"
    );
    finish(run).await.unwrap();
    api.assert_idle().await;

    // 3: rolled back: the Service goes back to its own selector and ports.
    api.seed(json!([]), json!([proxy_pod]), json!([]));
    let run = start(&bs, &ctx);
    give_back_reads(&mut api, &deployment(false), &switched_service()).await;
    let req = api.expect(Method::PATCH, SERVICE_PATH).await;
    assert_eq!(
        req.seen.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert_eq!(
        req.body(),
        &json!({
            "metadata": {"annotations": {ADOPTED_BY: null, ORIGINAL: null}},
            "spec": {"selector": {"app": "web", "ballast.dev/service": null,
                                  "ballast.dev/role": null},
                     "ports": original_ports()},
        })
    );
    req.reply(&user_service());
    assert_eq!(
        serve_giving_back(&mut api).await,
        "step 3/4: pointing the front Service back at the pods"
    );
    finish(run).await.unwrap();
    api.assert_idle().await;

    // 4: its EndpointSlices still list a proxy: wait.
    let run = start(&bs, &ctx);
    give_back_reads(&mut api, &deployment(false), &user_service()).await;
    let req = api.expect(Method::GET, SLICES_PATH).await;
    assert_eq!(
        req.param("labelSelector"),
        Some("kubernetes.io/service-name=web")
    );
    req.reply(&slices(&["web-a", "demo-proxy-a"]));
    assert_eq!(
        serve_giving_back(&mut api).await,
        "step 4/4: waiting for the front Service to reach the pods"
    );
    finish(run).await.unwrap();
    api.assert_idle().await;

    // 5: app pods only: the finalizer goes (compare-and-swap), nothing else is written.
    let run = start(&bs, &ctx);
    give_back_reads(&mut api, &deployment(false), &user_service()).await;
    api.expect(Method::GET, SLICES_PATH)
        .await
        .reply(&slices(&["web-a", "web-b"]));
    let req = api.expect(Method::PATCH, BS_PATH).await;
    assert_eq!(
        req.body(),
        &json!({"metadata": {"finalizers": [], "resourceVersion": "41"}})
    );
    let mut gone = serde_json::to_value(&bs).unwrap();
    gone["metadata"]["finalizers"] = json!([]);
    req.reply(&gone);
    assert_eq!(finish(run).await.unwrap(), Action::await_change());
    api.assert_idle().await;
}

#[tokio::test]
async fn deleting_when_the_deployment_and_service_are_gone_removes_the_finalizer_at_once() {
    // Nothing to give back: neither the Deployment nor a Service exists (the front
    // Service would be ballast's own, deleted with the proxies).
    let (ctx, mut api) = context();
    let mut bs = with_finalizer(adopting(true));
    bs.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    let run = start(&bs, &ctx);
    api.expect(Method::GET, DEPLOYMENT_PATH)
        .await
        .fail(StatusCode::NOT_FOUND, "NotFound");
    api.expect(Method::GET, SERVICE_PATH)
        .await
        .fail(StatusCode::NOT_FOUND, "NotFound");
    let req = api.expect(Method::PATCH, BS_PATH).await;
    assert_eq!(
        req.body(),
        &json!({"metadata": {"finalizers": [], "resourceVersion": "41"}})
    );
    req.reply(&serde_json::to_value(&bs).unwrap());
    assert_eq!(finish(run).await.unwrap(), Action::await_change());
    api.assert_idle().await;

    // The user's Service reaching no pod (the Deployment is gone): nothing to wait for.
    let run = start(&bs, &ctx);
    api.expect(Method::GET, DEPLOYMENT_PATH)
        .await
        .fail(StatusCode::NOT_FOUND, "NotFound");
    api.expect(Method::GET, SERVICE_PATH)
        .await
        .reply(&user_service());
    api.expect(Method::GET, SLICES_PATH)
        .await
        .reply(&slices(&[]));
    api.expect(Method::PATCH, BS_PATH)
        .await
        .reply(&serde_json::to_value(&bs).unwrap());
    assert_eq!(finish(run).await.unwrap(), Action::await_change());
    api.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switched_service_someone_reverted_is_switched_again() {
    let (ctx, mut api) = context();
    let bs = with_finalizer(adopting(true));
    let proxy = RealProxy::start("adopt-drift", &["127.0.0.7:8080", "127.0.0.8:8080"]).await;
    // The first rollout is over: every pod runs with the gate, routable.
    let routable = |name: &str, ip: &str| {
        let mut pod = web_pod(name, ip, true, Some("true"), true);
        pod["status"]["conditions"].as_array_mut().unwrap().push(
            json!({"type": crate::observe::ROUTABLE_CONDITION, "status": "True",
                         "message": "every ready proxy replica lists this pod"}),
        );
        pod
    };
    api.seed(
        json!([
            routable("web-n1", "127.0.0.7"),
            routable("web-n2", "127.0.0.8")
        ]),
        json!([proxy.pod("demo-proxy-a")]),
        json!([]),
    );
    // Its owner re-applied the Service: selector and targetPort are back, ballast's
    // annotations stayed (a client-side apply leaves annotations it did not set).
    let mut reverted = switched_service();
    reverted["spec"]["selector"] = json!({"app": "web"});
    reverted["spec"]["ports"] = original_ports();
    let run = start(&bs, &ctx);
    api.expect(Method::GET, DEPLOYMENT_PATH)
        .await
        .reply(&deployment(true));
    api.expect(Method::GET, SERVICE_PATH).await.reply(&reverted);
    serve_owned(&mut api, 1, Some(&deployment(true))).await;
    let req = api.expect(Method::PATCH, SERVICE_PATH).await;
    let patch = req.body().clone();
    assert_eq!(
        patch["spec"]["selector"],
        json!({"app": null, "ballast.dev/service": "demo", "ballast.dev/role": "proxy"})
    );
    assert_eq!(patch["spec"]["ports"][0]["targetPort"], 8080);
    // The record of what it was before is the first one, kept as it was.
    assert_eq!(
        patch["metadata"]["annotations"][ORIGINAL],
        switched_service()["metadata"]["annotations"][ORIGINAL]
    );
    req.reply(&switched_service());
    let status = serve_status_and_events(&mut api).await.unwrap();
    assert_condition(&status, "Adopted", "True", "Adopted");
    assert_eq!(
        adopted_message(&status),
        "Deployment web and Service web adopted; every pod runs with the drain gate"
    );
    finish(run).await.unwrap();
    api.assert_idle().await;
    proxy.shutdown().await;
}
