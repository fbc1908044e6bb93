//! A BalancedService `shop/demo` in three moments of a rollout from revision
//! `5d8f9c7b` to `7b2a41c9`, as the API server would return its objects: a rollout in
//! progress, the same rollout paused, and an old pod whose drain timed out.
#![allow(dead_code, clippy::unwrap_used)]

use ballast_api::BalancedService;
use ballast_api::admin::{EndpointReport, EndpointStatus, OpenCounts};
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::jiff::Timestamp;
use kubectl_ballast::snapshot::{ProxyReading, Snapshot};
use serde_json::{Value, json};

pub const NEW: &str = "7b2a41c9";
pub const OLD: &str = "5d8f9c7b";
/// The moment every fixture is read: ages count from it.
pub const NOW: &str = "2026-12-04T12:00:00Z";

/// `NOW` moved by `offset_seconds`, as the API server writes times.
pub fn at(offset_seconds: i64) -> String {
    (now() + k8s_openapi::jiff::SignedDuration::from_secs(offset_seconds)).to_string()
}

pub fn now() -> Timestamp {
    NOW.parse().unwrap()
}

fn from<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).unwrap()
}

/// The moment of the rollout a fixture shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Moment {
    InProgress,
    Paused,
    DrainTimedOut,
}

pub fn condition(type_: &str, status: &str, reason: &str, message: &str) -> Value {
    json!({"type": type_, "status": status, "reason": reason, "message": message,
           "lastTransitionTime": at(-300), "observedGeneration": 3})
}

pub fn service_json(moment: Moment) -> Value {
    let progressing = match moment {
        Moment::Paused => condition(
            "Progressing",
            "False",
            "RolloutPaused",
            "rollout of revision 7b2a41c9 paused: 2 drains reached the timeout with requests or connections open (pauseWhen.forcedDrains: 2); to resume change the spec or run `kubectl ballast resume demo` (sets the ballast.dev/resume annotation)",
        ),
        _ => condition(
            "Progressing",
            "True",
            "RollingOut",
            "2/4 pods updated, 6 pods in all",
        ),
    };
    let mut rollout = json!({
        "revision": NEW, "previousRevision": OLD, "startedAt": at(-95),
        "durationSeconds": 0, "podsDrained": 1, "longestDrainMillis": 1240,
        "forcedTerminations": 0,
        "requests": {"oldRevision": 18_230, "newRevision": 9_112},
        "failedRequests": {"oldRevision": 0, "newRevision": 3},
    });
    match moment {
        Moment::Paused => {
            rollout["forcedTerminations"] = json!(2);
            rollout["paused"] = json!({"at": at(-20), "reason": "2 drains reached the timeout with requests or connections open (pauseWhen.forcedDrains: 2)", "generation": 3});
        }
        Moment::DrainTimedOut => rollout["forcedTerminations"] = json!(1),
        Moment::InProgress => {}
    }
    let draining = match moment {
        Moment::Paused => json!([]),
        _ => {
            json!([{"pod": format!("demo-{OLD}-bbbbb"), "since": at(-12), "inFlight": 3, "connections": 2}])
        }
    };
    json!({
        "apiVersion": "ballast.dev/v1alpha1", "kind": "BalancedService",
        "metadata": {"name": "demo", "namespace": "shop", "uid": "uid-demo", "generation": 3,
                     "creationTimestamp": at(-86_400 * 3), "resourceVersion": "100"},
        "spec": {"replicas": 4, "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
                 "template": {"spec": {"containers": [{"name": "app", "image": "example/app:2"}]}}},
        "status": {
            "observedGeneration": 3,
            "phase": if moment == Moment::Paused { "Paused" } else { "Progressing" },
            "conditions": [
                condition("Available", "True", "AllAvailable", "4/4 app pods available, 2/2 proxies ready"),
                progressing,
                condition("Degraded", "False", "AsExpected", "no problem found"),
            ],
            "replicas": 6, "readyReplicas": 4, "updatedReplicas": 2, "availableReplicas": 4,
            "ready": "4/4", "currentRevision": OLD, "updateRevision": NEW,
            "draining": draining,
            "lastRollout": rollout,
            "balance": {"maxOverMean": "1.08", "windowSeconds": 30, "pods": 4},
            "proxy": {"replicas": 2, "readyReplicas": 2},
        }
    })
}

pub fn replica_set_json(revision: &str, replicas: i32) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": format!("demo-{revision}"), "namespace": "shop",
                     "labels": {"ballast.dev/service": "demo", "ballast.dev/role": "app",
                                "ballast.dev/revision": revision}},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"ballast.dev/revision": revision}}},
    })
}

/// How an app pod looks to the API server.
#[derive(Clone, Copy, Debug)]
pub enum Look {
    Pending,
    /// Containers ready, the gate not yet open.
    Gated,
    Ready,
    Deleting,
}

pub fn app_pod_json(revision: &str, suffix: &str, ip: Option<&str>, look: Look, age: i64) -> Value {
    let truth = |b: bool| if b { "True" } else { "False" };
    let (containers, ready, routable) = match look {
        Look::Pending => (false, false, None),
        Look::Gated => (true, false, Some(false)),
        Look::Ready | Look::Deleting => (true, true, Some(true)),
    };
    let mut conditions = vec![
        json!({"type": "ContainersReady", "status": truth(containers)}),
        json!({"type": "Ready", "status": truth(ready)}),
    ];
    if let Some(r) = routable {
        conditions.push(json!({"type": "ballast.dev/routable", "status": truth(r),
            "message": if r { "listed by every proxy" } else { "10.0.0.7 not yet in the endpoints of proxy demo-proxy-x2" }}));
    }
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("demo-{revision}-{suffix}"), "namespace": "shop",
                     "uid": format!("uid-{revision}-{suffix}"),
                     "creationTimestamp": at(-age),
                     "labels": {"ballast.dev/service": "demo", "ballast.dev/role": "app",
                                "ballast.dev/revision": revision}},
        "spec": {"containers": [{"name": "app", "image": "example/app"}]},
        "status": {"phase": if ip.is_some() { "Running" } else { "Pending" }, "conditions": conditions,
                   "containerStatuses": [{"name": "app", "image": "example/app", "imageID": "",
                       "ready": containers, "restartCount": 0}]},
    });
    if let Some(ip) = ip {
        pod["status"]["podIP"] = json!(ip);
    }
    if matches!(look, Look::Deleting) {
        pod["metadata"]["deletionTimestamp"] = json!(at(-12));
    }
    pod
}

pub fn proxy_pod_json(name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                     "creationTimestamp": at(-86_400),
                     "labels": {"ballast.dev/service": "demo", "ballast.dev/role": "proxy"}},
        "spec": {"containers": [{"name": "proxy", "image": "ballast/proxy",
                                 "ports": [{"name": "admin", "containerPort": 9901}]}]},
        "status": {"phase": "Running", "podIP": ip,
                   "conditions": [{"type": "Ready", "status": "True"}]},
    })
}

pub fn event_json(name: &str, type_: &str, reason: &str, message: &str, ago: i64) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": name, "namespace": "shop"},
        "involvedObject": {"kind": "BalancedService", "name": "demo", "namespace": "shop", "uid": "uid-demo"},
        "type": type_, "reason": reason, "message": message,
        "eventTime": at(-ago),
        "reportingComponent": "ballast-operator", "reportingInstance": "ballast-operator-0",
    })
}

pub fn app_pods_json(moment: Moment) -> Vec<Value> {
    let mut pods = vec![
        app_pod_json(NEW, "aaaaa", Some("10.0.0.5"), Look::Ready, 80),
        app_pod_json(NEW, "bbbbb", Some("10.0.0.6"), Look::Ready, 45),
        app_pod_json(OLD, "aaaaa", Some("10.0.0.2"), Look::Ready, 86_400),
    ];
    match moment {
        Moment::InProgress => {
            pods.push(app_pod_json(NEW, "ccccc", Some("10.0.0.7"), Look::Gated, 9));
            pods.push(app_pod_json(NEW, "ddddd", None, Look::Pending, 2));
            pods.push(app_pod_json(
                OLD,
                "bbbbb",
                Some("10.0.0.3"),
                Look::Deleting,
                86_400,
            ));
        }
        Moment::Paused => pods.push(app_pod_json(
            OLD,
            "bbbbb",
            Some("10.0.0.3"),
            Look::Ready,
            86_400,
        )),
        Moment::DrainTimedOut => {
            pods.push(app_pod_json(
                OLD,
                "bbbbb",
                Some("10.0.0.3"),
                Look::Deleting,
                86_400,
            ));
        }
    }
    pods
}

pub fn events_json(moment: Moment) -> Vec<Value> {
    let mut events = vec![
        event_json(
            "demo.1",
            "Normal",
            "RolloutStarted",
            "rollout of revision 7b2a41c9 started (from 5d8f9c7b)",
            95,
        ),
        event_json(
            "demo.2",
            "Normal",
            "PodDrained",
            "demo-5d8f9c7b-ccccc drained in 1.2s",
            50,
        ),
    ];
    match moment {
        Moment::Paused => {
            events.push(event_json(
                "demo.3",
                "Warning",
                "ForcedDrain",
                "demo-5d8f9c7b-bbbbb: drain timed out with 1 in flight, 1 connections",
                25,
            ));
            events.push(event_json("demo.4", "Warning", "RolloutPaused", "rollout of revision 7b2a41c9 paused: 2 drains reached the timeout with requests or connections open (pauseWhen.forcedDrains: 2)", 20));
        }
        Moment::DrainTimedOut => events.push(event_json(
            "demo.3",
            "Warning",
            "ForcedDrain",
            "demo-5d8f9c7b-bbbbb: drain timed out with 1 in flight, 1 connections",
            2,
        )),
        Moment::InProgress => {}
    }
    events
}

fn row(ip: &str, state: EndpointStatus, requests: u64) -> EndpointReport {
    let mut row = EndpointReport::new(format!("{ip}:8080").parse().unwrap(), state);
    row.port = Some("http".to_owned());
    row.requests = requests;
    row
}

/// What proxy `x1` or `x2` reports; `tick` 0 is the earlier read, 1 the later (every
/// pod served more requests in between).
pub fn endpoints(moment: Moment, proxy: &str, tick: u64) -> Vec<EndpointReport> {
    let base = if proxy == "x1" { 1000 } else { 900 };
    let mut rows = vec![
        row("10.0.0.5", EndpointStatus::Active, base + tick * 60),
        row("10.0.0.6", EndpointStatus::Active, base + tick * 50),
        row("10.0.0.2", EndpointStatus::Active, base + tick * 55),
    ];
    match moment {
        Moment::InProgress => {
            if proxy == "x1" {
                let mut gated = row("10.0.0.7", EndpointStatus::NotReady, 0);
                gated.ready = false;
                rows.push(gated);
            }
            let mut old = row("10.0.0.3", EndpointStatus::Draining, base * 3 + tick * 2);
            old.terminating = true;
            old.in_flight = if proxy == "x1" { 2 } else { 1 };
            old.connections = 1;
            old.draining_since = Some(now().as_second() as f64 - 12.0);
            rows.push(old);
        }
        Moment::Paused => rows.push(row("10.0.0.3", EndpointStatus::Active, base + tick * 45)),
        Moment::DrainTimedOut => {
            let mut old = row("10.0.0.3", EndpointStatus::Draining, base * 3);
            old.terminating = true;
            old.in_flight = u64::from(proxy == "x1");
            old.connections = 1;
            old.draining_since = Some(now().as_second() as f64 - 31.0);
            old.forced = Some(OpenCounts {
                in_flight: old.in_flight,
                connections: 1,
            });
            rows.push(old);
        }
    }
    rows
}

/// The snapshot the API server would give at `tick` (0 earlier, 1 later by `NOW`).
pub fn snapshot(moment: Moment, tick: u64) -> Snapshot {
    let proxies = [("x1", "10.0.1.2"), ("x2", "10.0.1.3")]
        .map(|(p, ip)| ProxyReading {
            pod: from::<Pod>(proxy_pod_json(&format!("demo-proxy-{p}"), ip)),
            endpoints: Ok(endpoints(moment, p, tick)),
        })
        .to_vec();
    Snapshot {
        at: now(),
        service: from::<BalancedService>(service_json(moment)),
        replica_sets: [
            replica_set_json(NEW, 4),
            replica_set_json(OLD, 2),
            replica_set_json("1a2b3c4d", 0),
        ]
        .map(from::<ReplicaSet>)
        .to_vec(),
        pods: app_pods_json(moment).into_iter().map(from::<Pod>).collect(),
        proxies,
        events: events_json(moment).into_iter().map(from::<Event>).collect(),
    }
}
