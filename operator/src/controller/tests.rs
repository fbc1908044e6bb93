//! `reconcile` against a mock API server: every request the operator makes is popped in
//! order, checked (method, path, query, content type, body) and answered by the test.

use super::*;
use crate::fixtures::balanced_service;
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::client::Body;
use kube::runtime::reflector::store::Writer;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tower_test::mock::{self, Handle, SendResponse};

/// How long the mock waits for the next request before the test fails.
const STEP: Duration = Duration::from_secs(5);
const UID: &str = "7f0c2f9e-0000-4000-8000-000000000001";
const STATUS_PATH: &str = "/apis/ballast.dev/v1alpha1/namespaces/shop/balancedservices/demo/status";
const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/shop/events";
const PODS_PATH: &str = "/api/v1/namespaces/shop/pods";

/// Every owned object in the order it must be applied: path, apiVersion, kind, name.
const APPLIES: [(&str, &str, &str, &str); 10] = [
    (
        "/api/v1/namespaces/shop/serviceaccounts/demo-proxy",
        "v1",
        "ServiceAccount",
        "demo-proxy",
    ),
    (
        "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/roles/demo-proxy",
        "rbac.authorization.k8s.io/v1",
        "Role",
        "demo-proxy",
    ),
    (
        "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/rolebindings/demo-proxy",
        "rbac.authorization.k8s.io/v1",
        "RoleBinding",
        "demo-proxy",
    ),
    (
        "/api/v1/namespaces/shop/services/demo-backends",
        "v1",
        "Service",
        "demo-backends",
    ),
    (
        "/api/v1/namespaces/shop/services/demo-proxy-admin",
        "v1",
        "Service",
        "demo-proxy-admin",
    ),
    (
        "/apis/apps/v1/namespaces/shop/deployments/demo-proxy",
        "apps/v1",
        "Deployment",
        "demo-proxy",
    ),
    (
        "/api/v1/namespaces/shop/services/demo",
        "v1",
        "Service",
        "demo",
    ),
    (
        "/apis/apps/v1/namespaces/shop/deployments/demo",
        "apps/v1",
        "Deployment",
        "demo",
    ),
    (
        "/apis/policy/v1/namespaces/shop/poddisruptionbudgets/demo",
        "policy/v1",
        "PodDisruptionBudget",
        "demo",
    ),
    (
        "/apis/policy/v1/namespaces/shop/poddisruptionbudgets/demo-proxy",
        "policy/v1",
        "PodDisruptionBudget",
        "demo-proxy",
    ),
];

/// The generation the mock gives the app Deployment.
const APP_GENERATION: i64 = 7;

/// One request the operator made, decoded.
#[derive(Debug)]
struct Seen {
    method: Method,
    path: String,
    query: Vec<(String, String)>,
    content_type: Option<String>,
    /// `Null` when the request had no body.
    body: Value,
}

/// A request waiting for its answer.
struct Exchange {
    seen: Seen,
    send: SendResponse<Response<Body>>,
}

impl Exchange {
    fn param(&self, key: &str) -> Option<&str> {
        self.seen
            .query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A forced server-side apply by the operator's field manager.
    fn assert_apply(&self) {
        assert_eq!(self.param("fieldManager"), Some(MANAGER), "{:?}", self.seen);
        assert_eq!(self.param("force"), Some("true"), "{:?}", self.seen);
        assert_eq!(
            self.seen.content_type.as_deref(),
            Some("application/apply-patch+yaml"),
            "{:?}",
            self.seen
        );
    }

    fn body(&self) -> &Value {
        &self.seen.body
    }

    /// Answers 200 with `body`.
    fn reply(self, body: &Value) {
        self.respond(StatusCode::OK, body);
    }

    /// Answers with a `metav1.Status` failure.
    fn fail(self, code: StatusCode, reason: &str) {
        let status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": format!("mock: {reason}"),
            "reason": reason, "code": code.as_u16(),
        });
        self.respond(code, &status);
    }

    fn respond(self, code: StatusCode, body: &Value) {
        let response = Response::builder()
            .status(code)
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap();
        self.send.send_response(response);
    }
}

/// The mock API server's side.
struct ApiServer {
    handle: Handle<Request<Body>, Response<Body>>,
    /// What the operator's pod and ReplicaSet watches would have delivered.
    cluster: CacheWriters,
    /// The operator has read every owned object once (it reads each only until it has
    /// seen it is its own, or absent).
    checked: bool,
    /// What the last applies were answered with, in order.
    replies: Vec<Value>,
}

impl ApiServer {
    /// The next request, which must be `method path` (query aside).
    async fn expect(&mut self, method: Method, path: &str) -> Exchange {
        let Ok(next) = timeout(STEP, self.handle.next_request()).await else {
            panic!("expected {method} {path}, but no request came (did reconcile end early?)");
        };
        let (request, send) = next.expect("client dropped");
        let (parts, body) = request.into_parts();
        let bytes = body.collect_bytes().await.unwrap();
        let seen = Seen {
            method: parts.method,
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().map(parse_query).unwrap_or_default(),
            content_type: parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .map(|v| v.to_str().unwrap().to_owned()),
            body: if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            },
        };
        assert_eq!(
            (&seen.method, seen.path.as_str()),
            (&method, path),
            "request out of order"
        );
        Exchange { seen, send }
    }

    /// Fails if any further request arrives.
    async fn assert_idle(&mut self) {
        if let Ok(Some((request, _))) =
            timeout(Duration::from_millis(200), self.handle.next_request()).await
        {
            panic!("unexpected request {} {}", request.method(), request.uri());
        }
    }
}

fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let mut out = Vec::new();
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex: String = bytes.by_ref().take(2).map(char::from).collect();
                out.push(u8::from_str_radix(&hex, 16).unwrap());
            }
            _ => out.push(b),
        }
    }
    String::from_utf8(out).unwrap()
}

fn context() -> (Arc<Context>, ApiServer) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let metrics = Arc::new(Metrics::default());
    let client = kube::client::ClientBuilder::new(service, "default")
        .with_layer(&crate::api_requests::CountRequests(metrics.clone()))
        .build();
    let build = BuildContext {
        proxy_image: "ghcr.io/ballast-dev/ballast:test".to_owned(),
    };
    let (caches, cluster) = Caches::new();
    let ctx = Context::new(
        client,
        build,
        Limits::default(),
        metrics,
        "test".into(),
        caches,
    );
    let mut api = ApiServer {
        handle,
        cluster,
        checked: false,
        replies: Vec::new(),
    };
    api.seed(json!([]), json!([]), json!([]));
    (Arc::new(ctx), api)
}

fn start(bs: &BalancedService, ctx: &Arc<Context>) -> JoinHandle<Result<Action, ReconcileError>> {
    tokio::spawn(reconcile(Arc::new(bs.clone()), ctx.clone()))
}

async fn finish(run: JoinHandle<Result<Action, ReconcileError>>) -> Result<Action, ReconcileError> {
    timeout(STEP, run)
        .await
        .expect("reconcile did not return")
        .unwrap()
}

/// A settled app Deployment status: all 4 pods updated and available.
fn settled() -> Value {
    json!({"replicas": 4, "readyReplicas": 4, "updatedReplicas": 4, "availableReplicas": 4})
}

impl ApiServer {
    /// Replaces what the pod and ReplicaSet caches hold, as a re-list would: call before
    /// the reconcile starts.
    fn seed(&mut self, app_pods: Value, proxy_pods: Value, replica_sets: Value) {
        fn relist<K>(writer: &mut Writer<K>, items: Vec<Value>)
        where
            K: Resource<DynamicType = ()> + DeserializeOwned + Clone,
        {
            writer.apply_watcher_event(&watcher::Event::Init);
            for item in items {
                let object: K = serde_json::from_value(item).unwrap();
                writer.apply_watcher_event(&watcher::Event::InitApply(object));
            }
            writer.apply_watcher_event(&watcher::Event::InitDone);
        }
        let items = |v: Value| v.as_array().unwrap().clone();
        let mut pods = items(app_pods);
        pods.extend(items(proxy_pods));
        relist::<Pod>(&mut self.cluster.pods, pods);
        relist::<ReplicaSet>(&mut self.cluster.replica_sets, items(replica_sets));
    }

    /// Delivers the objects the last applies returned to the operator's owned-object
    /// watches, as the API server's watch events would.
    fn deliver_applied(&mut self) {
        fn deliver<K>(writer: &mut Writer<K>, item: &Value)
        where
            K: Resource<DynamicType = ()> + DeserializeOwned + Clone,
        {
            let object: K = serde_json::from_value(item.clone()).unwrap();
            writer.apply_watcher_event(&watcher::Event::Apply(object));
        }
        for item in std::mem::take(&mut self.replies) {
            match item["kind"].as_str().unwrap() {
                "Deployment" => deliver::<Deployment>(&mut self.cluster.deployments, &item),
                "Service" => deliver::<Service>(&mut self.cluster.services, &item),
                "PodDisruptionBudget" => {
                    deliver::<PodDisruptionBudget>(&mut self.cluster.budgets, &item)
                }
                "ServiceAccount" => {
                    deliver::<ServiceAccount>(&mut self.cluster.service_accounts, &item)
                }
                "Role" => deliver::<Role>(&mut self.cluster.roles, &item),
                "RoleBinding" => deliver::<RoleBinding>(&mut self.cluster.role_bindings, &item),
                other => panic!("unexpected kind {other}"),
            }
        }
    }
}

/// Answers the reads of the owned objects that come before the first apply: none of
/// them exists yet.
async fn serve_checks(api: &mut ApiServer) {
    if api.checked {
        return;
    }
    for (path, ..) in APPLIES {
        api.expect(Method::GET, path)
            .await
            .fail(StatusCode::NOT_FOUND, "NotFound");
    }
    api.checked = true;
}

/// Answers the ten applies, checking each; returns the app Deployment applied.
async fn serve_apply_only(api: &mut ApiServer, app_status: Value) -> Value {
    serve_checks(api).await;
    let mut app = Value::Null;
    for (path, api_version, kind, name) in APPLIES {
        let req = api.expect(Method::PATCH, path).await;
        req.assert_apply();
        let body = req.body();
        assert_eq!(body["apiVersion"], api_version, "{path}");
        assert_eq!(body["kind"], kind, "{path}");
        assert_eq!(body["metadata"]["name"], name, "{path}");
        assert_eq!(body["metadata"]["namespace"], "shop", "{path}");
        let owners = body["metadata"]["ownerReferences"].as_array().unwrap();
        assert_eq!(owners.len(), 1, "{path}");
        let owner = &owners[0];
        assert_eq!(owner["apiVersion"], "ballast.dev/v1alpha1", "{path}");
        assert_eq!(owner["kind"], "BalancedService", "{path}");
        assert_eq!(owner["name"], "demo", "{path}");
        assert_eq!(owner["uid"], UID, "{path}");
        assert_eq!(owner["controller"], true, "{path}");
        assert!(body.get("status").is_none(), "{path} applies a status");
        let mut reply = body.clone();
        match (kind, name) {
            ("Deployment", "demo") => {
                app = body.clone();
                reply["metadata"]["generation"] = APP_GENERATION.into();
                reply["status"] = app_status.clone();
                reply["status"]["observedGeneration"] = APP_GENERATION.into();
            }
            ("Deployment", "demo-proxy") => {
                reply["metadata"]["generation"] = 1.into();
                reply["status"] =
                    json!({"observedGeneration": 1, "replicas": 2, "readyReplicas": 2});
            }
            _ => {}
        }
        reply["metadata"]["resourceVersion"] = "5".into();
        api.replies.push(reply.clone());
        req.reply(&reply);
    }
    app
}

/// Checks the status write (a forced apply of the status alone) and answers it with the
/// object carrying that status. Returns the status sent.
async fn serve_status(api: &mut ApiServer) -> Value {
    let req = api.expect(Method::PATCH, STATUS_PATH).await;
    req.assert_apply();
    let body = req.body();
    assert_eq!(body["apiVersion"], "ballast.dev/v1alpha1");
    assert_eq!(body["kind"], "BalancedService");
    assert!(
        body.get("spec").is_none(),
        "status apply must not claim spec fields: {body}"
    );
    let status = body["status"].clone();
    assert_eq!(status["observedGeneration"], 3);
    let mut object = serde_json::to_value(balanced_service()).unwrap();
    object["status"] = status.clone();
    req.reply(&object);
    status
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

fn assert_condition(status: &Value, type_: &str, value: &str, reason: &str) {
    let c = condition(status, type_);
    assert_eq!(c["status"], value, "{c}");
    assert_eq!(c["reason"], reason, "{c}");
    assert_eq!(c["observedGeneration"], 3, "{c}");
}

/// Checks an Event about `demo` and answers it (201, echoed). Returns the Event.
async fn serve_event(api: &mut ApiServer, reason: &str, type_: &str) -> Value {
    let req = api.expect(Method::POST, EVENTS_PATH).await;
    let event = req.body().clone();
    assert_eq!(event["apiVersion"], "events.k8s.io/v1");
    assert_eq!(event["reason"], reason, "{event}");
    assert_eq!(event["type"], type_, "{event}");
    assert_eq!(event["action"], "Reconcile");
    assert_eq!(event["reportingController"], MANAGER);
    assert_eq!(event["reportingInstance"], "test");
    let regarding = &event["regarding"];
    assert_eq!(regarding["apiVersion"], "ballast.dev/v1alpha1");
    assert_eq!(regarding["kind"], "BalancedService");
    assert_eq!(regarding["name"], "demo");
    assert_eq!(regarding["namespace"], "shop");
    assert_eq!(regarding["uid"], UID);
    req.respond(StatusCode::CREATED, &event);
    event
}

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
    let revision = crate::build::template_revision(&bs.spec.template);
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
    assert_eq!(total, 10 + 10 + 1 + 10, "{metrics}");
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
    let new_revision = crate::build::template_revision(&bs.spec.template);
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

/// A running `ballast-proxy` (the real one, in process) listing `endpoints` from a file
/// the test rewrites, with its admin API on 127.0.0.1.
struct RealProxy {
    running: ballast_proxy::server::Running,
    file: std::path::PathBuf,
}

impl RealProxy {
    async fn start(tag: &str, endpoints: &[&str]) -> Self {
        use clap::Parser;
        let file = std::env::temp_dir().join(format!(
            "ballast-operator-{tag}-{}.yaml",
            std::process::id()
        ));
        let proxy = Self {
            running: ballast_proxy::server::start(
                ballast_proxy::config::Settings::parse_from([
                    "ballast-proxy",
                    "--listen",
                    "127.0.0.1:0",
                    "--admin-listen",
                    "127.0.0.1:0",
                    "--endpoints-file",
                    file.to_str().unwrap(),
                    "--shutdown-delay",
                    "0s",
                ])
                .resolve()
                .unwrap(),
            )
            .await
            .unwrap(),
            file,
        };
        proxy.list(endpoints).await;
        proxy
    }

    /// Rewrites the endpoints file and waits until the proxy lists exactly these.
    async fn list(&self, endpoints: &[&str]) {
        let yaml: String = endpoints
            .iter()
            .map(|a| format!("- {{address: \"{a}\", ready: false}}\n"))
            .collect();
        std::fs::write(
            &self.file,
            if yaml.is_empty() {
                "[]\n".to_owned()
            } else {
                yaml
            },
        )
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let listed: Vec<String> = self
                .running
                .registry
                .reports(tokio::time::Instant::now())
                .iter()
                .filter(|r| r.listed)
                .map(|r| r.address.to_string())
                .collect();
            if listed == endpoints {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "proxy lists {listed:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The proxy as the pod list shows it: ready, its admin port named `admin`.
    fn pod(&self, name: &str) -> Value {
        json!({
            "metadata": {"name": name, "namespace": "shop",
                         "labels": {"ballast.dev/service": "demo", "ballast.dev/role": "proxy"}},
            "spec": {"containers": [{"name": "proxy", "image": "ballast",
                     "ports": [{"name": "admin", "containerPort": self.running.admin.port()}]}]},
            "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
        })
    }
}

fn app_pod(name: &str, ip: &str, revision: &str, routable: Option<&str>) -> Value {
    let mut conditions = vec![json!({"type": "Ready", "status": "False"})];
    if let Some(value) = routable {
        conditions.push(json!({"type": ROUTABLE_CONDITION, "status": value, "message": "m"}));
    }
    json!({
        "metadata": {"name": name, "namespace": "shop",
                     "labels": {"ballast.dev/service": "demo", "ballast.dev/role": "app",
                                "ballast.dev/revision": revision}},
        "status": {"podIP": ip, "conditions": conditions},
    })
}

/// Expects the strategic-merge patch of one pod's `ballast.dev/routable` condition.
async fn serve_gate(api: &mut ApiServer, pod: &str) -> Value {
    let req = api
        .expect(Method::PATCH, &format!("{PODS_PATH}/{pod}/status"))
        .await;
    assert_eq!(
        req.seen.content_type.as_deref(),
        Some("application/strategic-merge-patch+json")
    );
    let conditions = req.body()["status"]["conditions"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(conditions.len(), 1, "only our condition: {conditions:?}");
    assert_eq!(conditions[0]["type"], ROUTABLE_CONDITION);
    req.reply(&app_pod(pod, "127.0.0.6", "x", None));
    conditions[0].clone()
}

/// Answers whatever else the reconcile sends (a status write when a duration ticked
/// over, Events) until it is quiet; returns `(method, path, body)` of each.
async fn serve_rest(api: &mut ApiServer) -> Vec<(Method, String, Value)> {
    let mut seen = Vec::new();
    while let Ok(Some((request, send))) =
        timeout(Duration::from_millis(300), api.handle.next_request()).await
    {
        let (parts, body) = request.into_parts();
        let body: Value = serde_json::from_slice(&body.collect_bytes().await.unwrap()).unwrap();
        let code = if parts.method == Method::POST {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        let reply = if parts.uri.path() == EVENTS_PATH {
            body.clone()
        } else {
            serde_json::to_value(balanced_service()).unwrap()
        };
        let response = Response::builder()
            .status(code)
            .body(Body::from(serde_json::to_vec(&reply).unwrap()))
            .unwrap();
        send.send_response(response);
        seen.push((parts.method, parts.uri.path().to_owned(), body));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_pod_turns_routable_once_every_ready_proxy_lists_it() {
    let a = RealProxy::start("gate-a", &["127.0.0.5:8080", "127.0.0.6:8080"]).await;
    let b = RealProxy::start("gate-b", &["127.0.0.5:8080"]).await;
    let (ctx, mut api) = context();
    let bs = balanced_service();
    let new_revision = crate::build::template_revision(&bs.spec.template);
    let pods = json!([
        app_pod("demo-old", "127.0.0.5", "old", Some("True")),
        app_pod("demo-new", "127.0.0.6", &new_revision, None),
    ]);
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
    let pods = json!([
        app_pod("demo-old", "127.0.0.5", "old", Some("True")),
        app_pod("demo-new", "127.0.0.6", &new_revision, Some("False")),
    ]);
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
    let pods = json!([
        app_pod("demo-old", "127.0.0.5", "old", Some("True")),
        app_pod("demo-new", "127.0.0.6", &new_revision, Some("True")),
    ]);
    api.seed(pods, json!([a.pod("demo-proxy-a"), gone]), json!([]));
    let run = start(&bs, &ctx);
    serve_apply_only(&mut api, settled()).await;
    let rest = serve_rest(&mut api).await;
    assert!(
        rest.iter().all(|(_, path, _)| path == STATUS_PATH),
        "no pod condition written: {rest:?}"
    );
    finish(run).await.unwrap();
    a.running.shutdown().await;
    b.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_drain_over_the_threshold_pauses_the_deployment() {
    let proxy = RealProxy::start("pause", &["127.0.0.5:8080", "127.0.0.6:8080"]).await;
    let (ctx, mut api) = context();
    let mut bs = balanced_service();
    bs.spec.rollout.pause_when.forced_drains = Some(1);
    let new_revision = crate::build::template_revision(&bs.spec.template);
    let pods = json!([
        app_pod("demo-old", "127.0.0.5", "old", Some("True")),
        app_pod("demo-new", "127.0.0.6", &new_revision, Some("True")),
    ]);
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
    let pods = json!([
        app_pod("demo-old", "127.0.0.5", "old", Some("True")),
        app_pod("demo-new", "127.0.0.6", &new_revision, Some("True")),
    ]);
    api.seed(pods, json!([proxy.pod("demo-proxy-a")]), json!([]));
    let run = start(&bs, &ctx);
    let app = serve_apply_only(&mut api, settled()).await;
    assert!(app["spec"].get("paused").is_none(), "{}", app["spec"]);
    let status = serve_status(&mut api).await;
    assert_eq!(status["lastRollout"]["paused"]["resumed"], true);
    let req = api
        .expect(
            Method::PATCH,
            "/apis/ballast.dev/v1alpha1/namespaces/shop/balancedservices/demo",
        )
        .await;
    assert_eq!(
        req.body(),
        &json!({"metadata": {"annotations": {RESUME_ANNOTATION: null}}})
    );
    let object = serde_json::to_value(balanced_service()).unwrap();
    req.reply(&object);
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
    proxy.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_rollback_the_previous_template_is_restored_instead() {
    let proxy = RealProxy::start("rollback", &["127.0.0.5:8080", "127.0.0.6:8080"]).await;
    let (ctx, mut api) = context();
    let mut bs = balanced_service();
    bs.spec.rollout.pause_when.forced_drains = Some(1);
    bs.spec.rollout.pause_when.rollback = true;
    let new_revision = crate::build::template_revision(&bs.spec.template);
    let pods = json!([
        app_pod("demo-old", "127.0.0.5", "old", Some("True")),
        app_pod("demo-new", "127.0.0.6", &new_revision, Some("True")),
    ]);
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
    proxy.running.shutdown().await;
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
