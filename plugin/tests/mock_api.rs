//! The commands through kube's real client against a stand-in API server that speaks
//! the wire format: paths, label and field selectors, merge patches, `Status` errors,
//! and the pod proxy subresource (answering as the API server does when it cannot
//! dial a pod). Where a test needs the operator to answer a request, the stand-in
//! runs the operator's own rollout decision (`ballast_operator::rollout::decide`) and
//! revision hash on the object, then writes what the operator would: the status, the
//! annotation removed, the Event.
#![allow(clippy::unwrap_used)]

mod common;

use ballast_api::BalancedService;
use ballast_api::meta::{RESTARTED_AT, RolloutRequest};
use ballast_operator::rollout::{Policy, Tracked, decide};
use bytes::Bytes;
use common::{Moment, NEW, OLD};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use kube::Client;
use kubectl_ballast::cli::{GetArgs, SteerArgs};
use kubectl_ballast::commands::{self, CommandError, Screen};
use kubectl_ballast::steer::Operation;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request the stand-in received.
#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    path: String,
    query: BTreeMap<String, String>,
    content_type: Option<String>,
    body: Value,
}

/// What the stand-in holds, and what it does when.
#[derive(Default)]
struct Cluster {
    services: Vec<Value>,
    replica_sets: Vec<Value>,
    pods: Vec<Value>,
    events: Vec<Value>,
    deployments: Vec<Value>,
    /// Each proxy pod's `/endpoints` answer, or the API server's error text and code.
    admin: BTreeMap<String, Result<Value, (u16, String)>>,
    seen: Vec<Seen>,
    /// The operator answers a write on the second read of the BalancedService after it
    /// (so the command waits at least once).
    operator: bool,
    reads_since_write: Option<u32>,
    /// Called on every read of the BalancedService with the count of reads so far.
    on_read: Option<ReadHook>,
    reads: u32,
}

type Shared = Arc<Mutex<Cluster>>;

/// A change to the cluster on the n-th read of the BalancedService.
type ReadHook = Box<dyn FnMut(&mut Cluster, u32) + Send>;

fn cluster(moment: Moment) -> Cluster {
    let admin = ["x1", "x2"]
        .map(|p| {
            let rows = serde_json::to_value(common::endpoints(moment, p, 1)).unwrap();
            (format!("demo-proxy-{p}"), Ok(rows))
        })
        .into();
    Cluster {
        services: vec![common::service_json(moment)],
        replica_sets: vec![
            common::replica_set_json(NEW, 4),
            common::replica_set_json(OLD, 2),
        ],
        pods: common::app_pods_json(moment)
            .into_iter()
            .chain([
                common::proxy_pod_json("demo-proxy-x1", "10.0.1.2"),
                common::proxy_pod_json("demo-proxy-x2", "10.0.1.3"),
            ])
            .collect(),
        events: common::events_json(moment),
        admin,
        ..Cluster::default()
    }
}

fn client(shared: &Shared) -> Client {
    let shared = shared.clone();
    let service = tower::service_fn(move |req: Request<kube::client::Body>| {
        let shared = shared.clone();
        async move {
            let (parts, body) = req.into_parts();
            let bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let seen = Seen {
                method: parts.method.clone(),
                path: parts.uri.path().to_owned(),
                query: parse_query(parts.uri.query().unwrap_or_default()),
                content_type: parts
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .map(|v| v.to_str().unwrap().to_owned()),
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            };
            let (code, body, json) = answer(&mut shared.lock().unwrap(), seen);
            let mut response = Response::builder().status(code);
            if json {
                response = response.header(http::header::CONTENT_TYPE, "application/json");
            }
            Ok::<_, Infallible>(response.body(Full::new(Bytes::from(body))).unwrap())
        }
    });
    Client::new(service, "shop")
}

fn parse_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_owned(), decode(v)))
        .collect()
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() + 1 {
            out.push(u8::from_str_radix(&text[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// `k=v,k=v` matched against `object`'s labels (the API server's label selector).
fn labelled(object: &Value, selector: Option<&String>) -> bool {
    selector.is_none_or(|s| {
        s.split(',').all(|term| {
            let (k, v) = term.split_once('=').unwrap();
            object["metadata"]["labels"][k] == v
        })
    })
}

/// `involvedObject.kind=..,involvedObject.name=..[,involvedObject.uid=..]`.
fn about(event: &Value, selector: Option<&String>) -> bool {
    selector.is_none_or(|s| {
        s.split(',').all(|term| {
            let (k, v) = term.split_once('=').unwrap();
            let field = k.strip_prefix("involvedObject.").unwrap();
            event["involvedObject"][field] == v
        })
    })
}

/// The objects `keep` accepts (a selector's answer).
fn pick(items: &[Value], keep: impl Fn(&Value) -> bool) -> Vec<Value> {
    items.iter().filter(|o| keep(o)).cloned().collect()
}

fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": format!("{kind}List"), "metadata": {"resourceVersion": "7"}, "items": items})
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "message": message, "reason": reason, "code": code})
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

const BSVC: &str = "/apis/ballast.dev/v1alpha1";

fn answer(cluster: &mut Cluster, seen: Seen) -> (u16, String, bool) {
    cluster.seen.push(seen.clone());
    let segments: Vec<&str> = seen.path.trim_start_matches('/').split('/').collect();
    let ok = |v: Value| (200, v.to_string(), true);
    match (&seen.method, segments.as_slice()) {
        (&Method::GET, ["apis", "ballast.dev", "v1alpha1", "balancedservices"]) => {
            ok(list("BalancedService", cluster.services.clone()))
        }
        (
            &Method::GET,
            [
                "apis",
                "ballast.dev",
                "v1alpha1",
                "namespaces",
                ns,
                "balancedservices",
            ],
        ) => {
            let items = cluster
                .services
                .iter()
                .filter(|s| s["metadata"]["namespace"] == *ns)
                .cloned()
                .collect();
            ok(list("BalancedService", items))
        }
        (
            method,
            [
                "apis",
                "ballast.dev",
                "v1alpha1",
                "namespaces",
                ns,
                "balancedservices",
                name,
            ],
        ) => {
            let Some(index) = cluster
                .services
                .iter()
                .position(|s| s["metadata"]["name"] == *name && s["metadata"]["namespace"] == *ns)
            else {
                let message = format!("balancedservices.ballast.dev \"{name}\" not found");
                return (404, status(404, "NotFound", &message).to_string(), true);
            };
            if method == Method::PATCH {
                assert_eq!(
                    seen.content_type.as_deref(),
                    Some("application/merge-patch+json")
                );
                assert_eq!(
                    seen.query.get("fieldManager").map(String::as_str),
                    Some("kubectl-ballast")
                );
                merge(&mut cluster.services[index], &seen.body);
                cluster.reads_since_write = Some(0);
                return ok(cluster.services[index].clone());
            }
            cluster.reads += 1;
            if let Some(mut hook) = cluster.on_read.take() {
                let reads = cluster.reads;
                hook(cluster, reads);
                cluster.on_read = Some(hook);
            }
            if let Some(n) = cluster.reads_since_write.as_mut() {
                *n += 1;
                if *n == 2 && cluster.operator {
                    operator_answers(cluster, index);
                    cluster.reads_since_write = None;
                }
            }
            ok(cluster.services[index].clone())
        }
        (&Method::PATCH, ["apis", "apps", "v1", "namespaces", _, "deployments", name]) => {
            let Some(deployment) = cluster
                .deployments
                .iter_mut()
                .find(|d| d["metadata"]["name"] == *name)
            else {
                return (
                    404,
                    status(404, "NotFound", "deployment not found").to_string(),
                    true,
                );
            };
            merge(deployment, &seen.body);
            let deployment = deployment.clone();
            cluster.reads_since_write = Some(0);
            ok(deployment)
        }
        (&Method::GET, ["apis", "apps", "v1", "namespaces", _, "replicasets"]) => {
            let selector = seen.query.get("labelSelector");
            ok(list(
                "ReplicaSet",
                pick(&cluster.replica_sets, |o| labelled(o, selector)),
            ))
        }
        (&Method::GET, ["api", "v1", "namespaces", _, "pods"]) => {
            let selector = seen.query.get("labelSelector");
            ok(list("Pod", pick(&cluster.pods, |o| labelled(o, selector))))
        }
        (&Method::GET, ["api", "v1", "namespaces", _, "events"]) => {
            let selector = seen.query.get("fieldSelector");
            ok(list("Event", pick(&cluster.events, |e| about(e, selector))))
        }
        (
            &Method::GET,
            [
                "api",
                "v1",
                "namespaces",
                _,
                "pods",
                pod_port,
                "proxy",
                "endpoints",
            ],
        ) => {
            let (pod, port) = pod_port.split_once(':').unwrap();
            assert_eq!(port, "9901", "the admin port named in the proxy pod's spec");
            match cluster.admin.get(pod) {
                Some(Ok(rows)) => ok(rows.clone()),
                // The API server's own answer when it cannot dial the pod: plain text.
                Some(Err((code, text))) => (*code, text.clone(), false),
                None => (
                    404,
                    status(404, "NotFound", "pods not found").to_string(),
                    true,
                ),
            }
        }
        _ => (
            404,
            status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            )
            .to_string(),
            true,
        ),
    }
}

/// What the operator does with the BalancedService once it reconciles: its rollout
/// decision on the request annotations, and the revision of a restarted template.
fn operator_answers(cluster: &mut Cluster, index: usize) {
    let bs: BalancedService = serde_json::from_value(cluster.services[index].clone()).unwrap();
    let request =
        RolloutRequest::strongest(bs.metadata.annotations.as_ref().unwrap_or(&BTreeMap::new()));
    let mut status = bs.status.clone().unwrap_or_default();
    let mut tracked = Tracked {
        last_rollout: status.last_rollout.clone(),
        ..Tracked::default()
    };
    let now = common::now().as_second() as f64 + 60.0;
    decide(
        &mut tracked,
        &Policy {
            thresholds: &bs.spec.rollout.pause_when,
            generation: bs.metadata.generation.unwrap_or_default(),
            request,
            now,
        },
    );
    status.last_rollout = tracked.last_rollout;
    if let Some(template) = &bs.spec.template {
        status.update_revision = Some(ballast_operator::build::template_revision(template));
    }
    if let Some(deployment) = cluster.deployments.first() {
        // An adopted Deployment's revision: its template's, changed by the restart.
        let stamp = &deployment["spec"]["template"]["metadata"]["annotations"][RESTARTED_AT];
        if stamp.is_string() {
            status.update_revision = Some(format!("adopted-{}", stamp.as_str().unwrap().len()));
        }
    }
    let object = &mut cluster.services[index];
    object["status"] = serde_json::to_value(&status).unwrap();
    for request in RolloutRequest::ALL {
        if let Some(a) = object["metadata"]["annotations"].as_object_mut() {
            a.remove(request.annotation());
        }
    }
    for event in &tracked.events {
        let mut e = common::event_json(
            &format!("demo.answer{}", cluster.events.len()),
            if event.warning { "Warning" } else { "Normal" },
            event.reason,
            &event.message,
            0,
        );
        e["eventTime"] = json!(common::at(60));
        cluster.events.push(e);
    }
}

/// The BalancedService adopts Deployment `shop-web` (spec.workloadRef), which exists.
fn adopt(cluster: &mut Cluster) {
    cluster.services[0]["spec"]["workloadRef"] =
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "name": "shop-web"});
    cluster.deployments = vec![json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "shop-web", "namespace": "shop"},
        "spec": {"template": {"metadata": {}}},
    })];
}

/// The cluster at `moment`, with the operator answering the plugin's writes.
fn answered_by_the_operator(moment: Moment) -> Shared {
    let mut state = cluster(moment);
    state.operator = true;
    Arc::new(Mutex::new(state))
}

fn get_args(watch: bool, count: Option<u64>) -> GetArgs {
    GetArgs {
        name: "demo".to_owned(),
        watch,
        interval: Duration::from_millis(if watch { 20 } else { 0 }),
        count,
    }
}

fn steer_args(timeout: Duration) -> SteerArgs {
    SteerArgs {
        name: "demo".to_owned(),
        timeout,
        no_wait: false,
    }
}

async fn steer(
    shared: &Shared,
    operation: Operation,
    timeout: Duration,
) -> Result<String, CommandError> {
    let mut out = Vec::new();
    commands::steer(
        &client(shared),
        "shop",
        operation,
        &steer_args(timeout),
        &mut out,
    )
    .await?;
    Ok(String::from_utf8(out).unwrap())
}

fn patches(shared: &Shared) -> Vec<Seen> {
    shared
        .lock()
        .unwrap()
        .seen
        .iter()
        .filter(|s| s.method == Method::PATCH)
        .cloned()
        .collect()
}

#[tokio::test]
async fn get_reads_everything_through_the_api_server_and_renders_the_tree() {
    let mut state = cluster(Moment::InProgress);
    state.admin.insert(
        "demo-proxy-x2".to_owned(),
        Err((
            503,
            "error trying to reach service: dial tcp 10.0.1.3:9901: i/o timeout".to_owned(),
        )),
    );
    let shared = Arc::new(Mutex::new(state));
    let mut out = Vec::new();
    commands::get(
        &client(&shared),
        "shop",
        &get_args(false, None),
        Screen::Plain,
        &mut out,
    )
    .await
    .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.starts_with("BalancedService shop/demo   Progressing   revision 5d8f9c7b → 7b2a41c9"),
        "{text}"
    );
    // The draining pod's counts come from the proxy that could be read (x1: 2 and 1).
    assert!(text.contains("draining"), "{text}");
    assert!(text.contains("2 in flight, 1 connection"), "{text}");
    assert!(
        text.contains("demo-proxy-x2  ready  admin not read: the API server could not reach its admin port (503 error trying to reach service: dial tcp 10.0.1.3:9901: i/o timeout)"),
        "{text}"
    );
    // x2 could not be read, so only x1 says whether the gated pod is listed: it is.
    assert!(
        text.contains("waiting for the operator to open the gate"),
        "{text}"
    );

    let seen = shared.lock().unwrap().seen.clone();
    let query = |path: &str, key: &str| -> Vec<String> {
        seen.iter()
            .filter(|s| s.path == path)
            .filter_map(|s| s.query.get(key).cloned())
            .collect()
    };
    let mut selectors = query("/api/v1/namespaces/shop/pods", "labelSelector");
    selectors.sort();
    assert_eq!(
        selectors,
        [
            "ballast.dev/service=demo,ballast.dev/role=app",
            "ballast.dev/service=demo,ballast.dev/role=proxy"
        ]
    );
    assert_eq!(
        query("/apis/apps/v1/namespaces/shop/replicasets", "labelSelector"),
        ["ballast.dev/service=demo,ballast.dev/role=app"]
    );
    assert_eq!(
        query("/api/v1/namespaces/shop/events", "fieldSelector"),
        [
            "involvedObject.kind=BalancedService,involvedObject.name=demo,involvedObject.uid=uid-demo"
        ]
    );
    let mut proxied: Vec<&str> = seen
        .iter()
        .map(|s| s.path.as_str())
        .filter(|p| p.ends_with("/proxy/endpoints"))
        .collect();
    proxied.sort();
    assert_eq!(
        proxied,
        [
            "/api/v1/namespaces/shop/pods/demo-proxy-x1:9901/proxy/endpoints",
            "/api/v1/namespaces/shop/pods/demo-proxy-x2:9901/proxy/endpoints"
        ]
    );
    assert!(
        seen.iter().all(|s| s.method == Method::GET),
        "get writes nothing"
    );
}

#[tokio::test]
async fn get_measures_shares_between_two_reads() {
    let mut state = cluster(Moment::Paused);
    // The second read sees more requests: 60, 50, 55, 45 more per proxy.
    state.on_read = Some(Box::new(|cluster: &mut Cluster, reads: u32| {
        let tick = u64::from(reads > 1);
        for p in ["x1", "x2"] {
            let rows = serde_json::to_value(common::endpoints(Moment::Paused, p, tick)).unwrap();
            cluster.admin.insert(format!("demo-proxy-{p}"), Ok(rows));
        }
    }));
    let shared = Arc::new(Mutex::new(state));
    let mut args = get_args(false, None);
    args.interval = Duration::from_millis(10);
    let mut out = Vec::new();
    commands::get(&client(&shared), "shop", &args, Screen::Plain, &mut out)
        .await
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    // 120 of 420 requests went to demo-7b2a41c9-aaaaa.
    assert!(
        text.contains("demo-7b2a41c9-aaaaa  10.0.0.5   29%"),
        "{text}"
    );
}

#[tokio::test]
async fn get_watch_prints_a_snapshot_only_when_the_state_changes() {
    let mut state = cluster(Moment::Paused);
    state.on_read = Some(Box::new(|cluster: &mut Cluster, reads: u32| {
        if reads == 3 {
            // The rollout resumed: the Progressing condition changed.
            cluster.services[0]["status"]["phase"] = json!("Progressing");
        }
    }));
    let shared = Arc::new(Mutex::new(state));
    let mut out = Vec::new();
    commands::get(
        &client(&shared),
        "shop",
        &get_args(true, Some(4)),
        Screen::Plain,
        &mut out,
    )
    .await
    .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.matches("--- ").count(), 2, "{text}");
    assert_eq!(
        text.matches("BalancedService shop/demo   Paused").count(),
        1,
        "{text}"
    );
    assert_eq!(
        text.matches("BalancedService shop/demo   Progressing")
            .count(),
        1,
        "{text}"
    );
    assert_eq!(shared.lock().unwrap().reads, 4);

    // On a terminal every look redraws in place.
    let shared = Arc::new(Mutex::new(cluster(Moment::Paused)));
    let mut out = Vec::new();
    commands::get(
        &client(&shared),
        "shop",
        &get_args(true, Some(2)),
        Screen::Terminal(100),
        &mut out,
    )
    .await
    .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.matches("\x1b[H\x1b[2J").count(), 2, "{text}");
    assert!(text.lines().all(|l| l.chars().count() <= 100 + 7), "{text}");
}

#[tokio::test]
async fn get_of_a_missing_service_says_so() {
    let shared = Arc::new(Mutex::new(cluster(Moment::InProgress)));
    let mut args = get_args(false, None);
    args.name = "nope".to_owned();
    let error = commands::get(
        &client(&shared),
        "shop",
        &args,
        Screen::Plain,
        &mut Vec::new(),
    )
    .await
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "BalancedService nope not found in namespace shop"
    );
    assert_eq!(error.exit_code(), 1);
}

#[tokio::test]
async fn pause_asks_the_operator_waits_and_says_what_it_did() {
    let shared = answered_by_the_operator(Moment::InProgress);
    let out = steer(&shared, Operation::Pause, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        out,
        "demo: rollout of revision 7b2a41c9 paused: paused on request (ballast.dev/pause); \
         the app Deployment is held where it is: `kubectl ballast resume demo` continues, \
         `kubectl ballast abort demo` rolls back\n"
    );
    let patches = patches(&shared);
    assert_eq!(patches.len(), 1);
    assert_eq!(
        patches[0].path,
        format!("{BSVC}/namespaces/shop/balancedservices/demo")
    );
    let stamp = &patches[0].body["metadata"]["annotations"]["ballast.dev/pause"];
    assert!(
        stamp
            .as_str()
            .is_some_and(|s| s.parse::<k8s_openapi::jiff::Timestamp>().is_ok()),
        "{stamp}"
    );

    // Paused now: pausing again writes nothing and says so.
    let out = steer(&shared, Operation::Pause, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        out.starts_with("demo: the rollout of revision 7b2a41c9 is already paused"),
        "{out}"
    );
    assert_eq!(self::patches(&shared).len(), 1);

    // Resume continues it.
    let out = steer(&shared, Operation::Resume, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(out, "demo: rollout of revision 7b2a41c9 resumed\n");
}

#[tokio::test]
async fn abort_rolls_back_to_the_previous_revision() {
    let shared = answered_by_the_operator(Moment::Paused);
    let out = steer(&shared, Operation::Abort, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        out,
        "demo: rolling back to revision 5d8f9c7b: aborted on request (ballast.dev/abort); \
         the pods go back to revision 5d8f9c7b: `kubectl ballast resume demo` tries 7b2a41c9 again\n"
    );
    let out = steer(&shared, Operation::Abort, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        out.starts_with(
            "demo: the rollout of revision 7b2a41c9 is already rolled back to 5d8f9c7b"
        ),
        "{out}"
    );
}

#[tokio::test]
async fn a_request_that_does_not_apply_is_refused_without_a_write() {
    let shared = Arc::new(Mutex::new(cluster(Moment::InProgress)));
    let error = steer(&shared, Operation::Resume, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "the rollout of revision 7b2a41c9 is not paused: nothing to resume"
    );
    assert_eq!(error.exit_code(), 1);

    let finished = {
        let mut state = cluster(Moment::InProgress);
        state.services[0]["status"]["lastRollout"]["finishedAt"] = json!(common::at(-30));
        Arc::new(Mutex::new(state))
    };
    let error = steer(&finished, Operation::Abort, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(
        error.to_string().starts_with(
            "demo has no rollout in progress (the rollout of revision 7b2a41c9 finished"
        ),
        "{error}"
    );
    assert!(patches(&shared).is_empty() && patches(&finished).is_empty());
}

#[tokio::test]
async fn a_request_the_operator_does_not_act_on_ends_with_exit_code_2() {
    let shared = Arc::new(Mutex::new(cluster(Moment::InProgress)));
    let error = steer(&shared, Operation::Pause, Duration::from_millis(1200))
        .await
        .unwrap_err();
    assert_eq!(error.exit_code(), 2);
    assert!(
        error.to_string().starts_with(
            "the request is recorded (annotation ballast.dev/pause) but the operator has not acted on it within 1s"
        ),
        "{error}"
    );
    // The request stands: the operator acts on it when it reconciles.
    let services = shared.lock().unwrap().services.clone();
    assert!(services[0]["metadata"]["annotations"]["ballast.dev/pause"].is_string());
}

#[tokio::test]
async fn restart_rolls_out_the_same_template_again() {
    let shared = answered_by_the_operator(Moment::InProgress);
    let out = steer(&shared, Operation::Restart, Duration::from_secs(10))
        .await
        .unwrap();
    let patch = &patches(&shared)[0];
    assert_eq!(
        patch.path,
        format!("{BSVC}/namespaces/shop/balancedservices/demo")
    );
    let stamp = &patch.body["spec"]["template"]["metadata"]["annotations"][RESTARTED_AT];
    assert!(stamp.is_string(), "{}", patch.body);
    let revision = shared.lock().unwrap().services[0]["status"]["updateRevision"].clone();
    assert_ne!(revision, json!(NEW));
    assert_eq!(
        out,
        format!(
            "demo: rollout of revision {} started (from {OLD}); watch it with `kubectl ballast get demo --watch`\n",
            revision.as_str().unwrap()
        )
    );

    // An adopted Deployment keeps its own template: the restart goes there.
    let mut state = cluster(Moment::InProgress);
    state.operator = true;
    state.services[0]["spec"]
        .as_object_mut()
        .unwrap()
        .remove("template");
    adopt(&mut state);
    let shared = Arc::new(Mutex::new(state));
    steer(&shared, Operation::Restart, Duration::from_secs(10))
        .await
        .unwrap();
    let patch = &patches(&shared)[0];
    assert_eq!(
        patch.path,
        "/apis/apps/v1/namespaces/shop/deployments/shop-web"
    );
    assert!(patch.body["spec"]["template"]["metadata"]["annotations"][RESTARTED_AT].is_string());
}

#[tokio::test]
async fn list_shows_every_namespace_with_draining_counts() {
    let mut state = cluster(Moment::InProgress);
    let mut other = common::service_json(Moment::Paused);
    other["metadata"]["namespace"] = json!("billing");
    other["metadata"]["name"] = json!("api");
    state.services.push(other);
    let shared = Arc::new(Mutex::new(state));
    let mut out = Vec::new();
    commands::list(&client(&shared), None, &mut out)
        .await
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("NAMESPACE  NAME  PHASE"), "{text}");
    assert!(lines[1].starts_with("billing    api   Paused"), "{text}");
    assert!(
        lines[2].starts_with("shop       demo  Progressing"),
        "{text}"
    );
    assert!(lines[2].contains("1 (3 in flight)"), "{text}");
    assert!(lines[2].contains("2/2"), "{text}");
    let seen = shared.lock().unwrap().seen.clone();
    assert_eq!(seen[0].path, format!("{BSVC}/balancedservices"));

    let mut out = Vec::new();
    commands::list(&client(&shared), Some("billing"), &mut out)
        .await
        .unwrap();
    assert_eq!(String::from_utf8(out).unwrap().lines().count(), 2);
    let mut out = Vec::new();
    commands::list(&client(&shared), Some("empty"), &mut out)
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "No BalancedServices in namespace empty.\n"
    );
}

#[test]
fn the_stand_in_decodes_selectors_like_the_api_server() {
    assert_eq!(decode("a%3Db%2Cc%3Dd"), "a=b,c=d");
    let pod = json!({"metadata": {"labels": {"a": "b", "c": "d"}}});
    assert!(labelled(&pod, Some(&"a=b,c=d".to_owned())));
    assert!(!labelled(&pod, Some(&"a=b,c=x".to_owned())));
    let mut target = json!({"a": {"b": 1, "c": 2}});
    merge(&mut target, &json!({"a": {"b": null, "d": 3}}));
    assert_eq!(target, json!({"a": {"c": 2, "d": 3}}));
    let _ = StatusCode::OK;
}

/// The (verb, apiGroup, resource) an API request needs, as the API server's authorizer
/// derives it from the path.
fn needs(seen: &Seen) -> (String, String, String) {
    let segments: Vec<&str> = seen.path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => (String::new(), rest),
        ["apis", group, _version, rest @ ..] => ((*group).to_owned(), rest),
        _ => panic!("{}", seen.path),
    };
    let rest = match rest {
        ["namespaces", _, rest @ ..] => rest,
        rest => rest,
    };
    let (resource, named) = match rest {
        [resource] => ((*resource).to_owned(), false),
        [resource, _name] => ((*resource).to_owned(), true),
        [resource, _name, sub, ..] => (format!("{resource}/{sub}"), true),
        _ => panic!("{}", seen.path),
    };
    let verb = match (&seen.method, named) {
        (&Method::GET, true) => "get",
        (&Method::GET, false) => "list",
        (&Method::PATCH, _) => "patch",
        (m, _) => panic!("{m}"),
    };
    (verb.to_owned(), group, resource)
}

#[tokio::test]
async fn plugin_rbac_the_shipped_cluster_role_covers_every_request() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/rbac/kubectl_plugin_role.yaml"
    );
    let role: k8s_openapi::api::rbac::v1::ClusterRole =
        serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let rules = role.rules.unwrap();
    let allows = |(verb, group, resource): &(String, String, String)| {
        rules.iter().any(|r| {
            r.verbs.contains(verb)
                && r.api_groups.as_ref().is_some_and(|g| g.contains(group))
                && r.resources.as_ref().is_some_and(|g| g.contains(resource))
        })
    };

    // Every command, including restart of an adopted Deployment.
    let shared = answered_by_the_operator(Moment::InProgress);
    let c = client(&shared);
    commands::get(
        &c,
        "shop",
        &get_args(false, None),
        Screen::Plain,
        &mut Vec::new(),
    )
    .await
    .unwrap();
    commands::list(&c, None, &mut Vec::new()).await.unwrap();
    commands::list(&c, Some("shop"), &mut Vec::new())
        .await
        .unwrap();
    steer(&shared, Operation::Pause, Duration::from_secs(10))
        .await
        .unwrap();
    steer(&shared, Operation::Restart, Duration::from_secs(10))
        .await
        .unwrap();
    adopt(&mut shared.lock().unwrap());
    steer(&shared, Operation::Restart, Duration::from_secs(10))
        .await
        .unwrap();

    let mut needed: Vec<(String, String, String)> =
        shared.lock().unwrap().seen.iter().map(needs).collect();
    needed.sort();
    needed.dedup();
    let missing: Vec<_> = needed.iter().filter(|n| !allows(n)).collect();
    assert!(missing.is_empty(), "not granted by {path}: {missing:?}");
    // The check can fail: a request the role does not grant is reported.
    assert!(!allows(&(
        "delete".to_owned(),
        String::new(),
        "pods".to_owned()
    )));
    assert!(
        needed.contains(&("get".to_owned(), String::new(), "pods/proxy".to_owned())),
        "{needed:?}"
    );
    assert!(
        needed.contains(&(
            "patch".to_owned(),
            "apps".to_owned(),
            "deployments".to_owned()
        )),
        "{needed:?}"
    );
}
