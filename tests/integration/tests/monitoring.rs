//! The monitoring component (`config/monitoring`) against what ballast exports.
//!
//! * Every `ballast_*` metric name the Grafana dashboard and the PrometheusRule use is
//!   one that the proxy or the operator exports: the `ballast-proxy` binary is scraped
//!   on loopback after traffic, a drain and failed requests (so every family has
//!   series), the operator's admin endpoint after its BalancedService cache was filled
//!   through kube's watcher from the list/watch stand-in.
//! * The rules pass `promtool check rules`, and `promtool test rules`
//!   (`config/monitoring/tests/rules_test.yaml`) shows each alert firing on bad series
//!   and silent on healthy ones.
//! * A real `prometheus` on loopback scrapes the proxy under load and the operator
//!   every second, with the PodMonitor's and ServiceMonitor's target labels, evaluates
//!   the rules and answers every dashboard query with data.
//!
//! promtool and prometheus come from Debian's `prometheus` package (scripts/test.sh
//! installs it). Without them the tests that need them say so and pass, unless
//! `BALLAST_REQUIRE_PROMETHEUS` is set (CI sets it), when they fail.

#![allow(clippy::unwrap_used)]

use ballast_api::BalancedService;
use ballast_integration::apiserver::ApiServer;
use ballast_integration::monitoring::{
    dashboard_queries, exported_names, metric_names, rule_queries, unexported,
};
use ballast_integration::{Process, free_port, slices, workspace_bin};
use ballast_operator::api_requests::CountRequests;
use ballast_operator::metrics::{ExportedServices, Metrics};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NS: &str = "shop";
const SERVICE: &str = "web";
const LIMIT: Duration = Duration::from_secs(30);
/// The loopback network of these tests: 127.31.<case>.0/24.
const NET: u8 = 31;

#[test]
fn the_checked_in_dashboard_and_rules_are_what_the_checks_read() {
    let dashboard = dashboard_queries(&dashboard());
    let rules = rule_queries(&prometheus_rule());
    assert!(
        dashboard.len() >= 40,
        "{} dashboard queries",
        dashboard.len()
    );
    assert_eq!(rules.len(), 7, "{rules:?}");
    for (place, expr) in &rules {
        assert!(
            !metric_names(expr).is_empty(),
            "{place} uses no ballast metric: {expr}"
        );
    }
    // The component renders the dashboard into the ConfigMap the Grafana sidecar reads.
    let kustomization =
        std::fs::read_to_string(repo("config/monitoring/kustomization.yaml")).unwrap();
    assert!(kustomization.contains("kind: Component"));
    assert!(kustomization.contains("ballast.json=dashboard.json"));
    assert!(kustomization.contains("grafana_dashboard: \"1\""));
}

// ---------------------------------------------------------------------------------------
// The files under test.

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

fn dashboard() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(repo("config/monitoring/dashboard.json")).unwrap(),
    )
    .unwrap()
}

fn prometheus_rule() -> Value {
    serde_norway::from_str(
        &std::fs::read_to_string(repo("config/monitoring/prometheus_rule.yaml")).unwrap(),
    )
    .unwrap()
}

/// The PrometheusRule's `spec` (its `groups`) as a plain Prometheus rule file, without
/// the `description` annotations when `descriptions` is false.
fn rule_file(descriptions: bool) -> String {
    let mut spec = prometheus_rule()["spec"].clone();
    if !descriptions {
        for group in spec["groups"].as_array_mut().unwrap() {
            for rule in group["rules"].as_array_mut().unwrap() {
                if let Some(annotations) = rule["annotations"].as_object_mut() {
                    annotations.remove("description");
                }
            }
        }
    }
    serde_norway::to_string(&spec).unwrap()
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("ballast-monitoring-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The path of a Prometheus tool, or `None` after saying why the test is skipped
/// (a failure instead when `BALLAST_REQUIRE_PROMETHEUS` is set).
fn prometheus_tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|path| path.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("BALLAST_REQUIRE_PROMETHEUS").is_none(),
            "{name} is not installed and BALLAST_REQUIRE_PROMETHEUS is set (apt-get install prometheus)"
        );
        println!(
            "SKIPPED: {name} is not installed (Debian package prometheus; scripts/test.sh installs it)"
        );
    }
    found
}

fn run(program: &Path, args: &[&str], dir: &Path) -> (bool, String) {
    let output = std::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn promtool_checks_the_rules_and_their_unit_tests_pass() {
    let Some(promtool) = prometheus_tool("promtool") else {
        return;
    };
    let scratch = Scratch::new("promtool");
    std::fs::write(scratch.0.join("full_rules.yaml"), rule_file(true)).unwrap();
    let (ok, out) = run(
        &promtool,
        &["check", "rules", "full_rules.yaml"],
        &scratch.0,
    );
    assert!(
        ok && out.contains("SUCCESS: 7 rules found"),
        "promtool check rules:\n{out}"
    );

    std::fs::write(scratch.0.join("ballast_rules.yaml"), rule_file(false)).unwrap();
    std::fs::copy(
        repo("config/monitoring/tests/rules_test.yaml"),
        scratch.0.join("rules_test.yaml"),
    )
    .unwrap();
    let (ok, out) = run(&promtool, &["test", "rules", "rules_test.yaml"], &scratch.0);
    assert!(ok, "promtool test rules:\n{out}");

    // The unit tests can fail: with the imbalance threshold at 2 the alert stays silent.
    let loosened = rule_file(false).replace(
        "ballast_operator_balance_max_over_mean) > 1.5",
        "ballast_operator_balance_max_over_mean) > 2",
    );
    assert_ne!(
        loosened,
        rule_file(false),
        "the threshold is where the test expects it"
    );
    std::fs::write(scratch.0.join("ballast_rules.yaml"), loosened).unwrap();
    let (ok, out) = run(&promtool, &["test", "rules", "rules_test.yaml"], &scratch.0);
    assert!(!ok && out.contains("BallastLoadImbalanced"), "{out}");
}

// ---------------------------------------------------------------------------------------
// A proxy and an operator to scrape.

/// One app pod: a sample app on its own loopback address, or only an address (a pod
/// whose process is gone: connections are refused).
struct Pod {
    name: &'static str,
    zone: &'static str,
    address: SocketAddr,
    _process: Option<Process>,
}

impl Pod {
    fn start(name: &'static str, zone: &'static str, ip: Ipv4Addr, fail_percent: u8) -> Self {
        let process = Process::spawn(
            env!("CARGO_BIN_EXE_ballast-sample-app"),
            &[
                "--listen",
                &format!("{ip}:0"),
                "--pod",
                name,
                "--fail-percent",
                &fail_percent.to_string(),
            ],
        );
        let address = process.wait_for("listening on ", LIMIT).parse().unwrap();
        Self {
            name,
            zone,
            address,
            _process: Some(process),
        }
    }

    fn gone(name: &'static str, zone: &'static str, ip: Ipv4Addr) -> Self {
        Self {
            name,
            zone,
            address: SocketAddr::from((ip, free_port(ip.octets()))),
            _process: None,
        }
    }

    fn slice(&self) -> Value {
        let name = format!("web-backends-{}", self.name);
        let pod = slices::endpoint(self.address.ip(), NS, self.name, self.zone);
        let port = ("http", self.address.port());
        slices::slice(NS, "web-backends", &name, port, vec![pod])
    }
}

/// The BalancedService `shop/web` in the middle of a bad rollout, as the operator's
/// status says it: one forced drain, 40 of 200 requests to the new revision failed
/// (pauseWhen.errorRatio 0.05), one of two proxies ready, not Available, unbalanced.
fn balanced_service() -> Value {
    json!({
        "apiVersion": "ballast.dev/v1alpha1",
        "kind": "BalancedService",
        "metadata": {"name": SERVICE, "namespace": NS, "uid": "5e1c0000-0000-4000-8000-000000000031", "generation": 2},
        "spec": {
            "replicas": 3,
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
            "template": {"spec": {"containers": [{"name": "app", "image": "web:2"}]}},
            "rollout": {"pauseWhen": {"errorRatio": 0.05, "forcedDrains": 3}},
        },
        "status": {
            "conditions": [
                {"type": "Available", "status": "False", "reason": "ProxiesUnavailable", "message": "",
                 "lastTransitionTime": "2025-01-01T00:00:00Z"},
                {"type": "Progressing", "status": "True", "reason": "RolloutInProgress", "message": "",
                 "lastTransitionTime": "2025-01-01T00:00:00Z"},
                {"type": "Degraded", "status": "False", "reason": "AsExpected", "message": "",
                 "lastTransitionTime": "2025-01-01T00:00:00Z"},
            ],
            "replicas": 3, "readyReplicas": 3, "updatedReplicas": 1, "availableReplicas": 3,
            "proxy": {"replicas": 2, "readyReplicas": 1},
            "balance": {"maxOverMean": "1.62", "windowSeconds": 30, "pods": 3},
            "draining": [{"pod": "web-5d8f7c9b4-aaaaa", "since": "2025-01-01T00:00:00Z",
                          "inFlight": 0, "connections": 1}],
            "lastRollout": {
                "revision": "7f6d5c4b3", "startedAt": "2025-01-01T00:00:00Z", "durationSeconds": 0,
                "podsDrained": 1, "longestDrainMillis": 900, "forcedTerminations": 1,
                "requests": {"oldRevision": 1000, "newRevision": 200},
                "failedRequests": {"oldRevision": 0, "newRevision": 40},
            },
        },
    })
}

/// The scene: app pods of two revisions (`web-5d8f7c9b4-*`, `web-7f6d5c4b3-*`, one
/// failing 20% of its requests, one gone), the `ballast-proxy` binary in zone-a in
/// front of them (discovery through the stand-in), and the operator's admin endpoint
/// with its BalancedService cache filled by kube's watcher from the stand-in.
struct Scene {
    pods: Vec<Pod>,
    listen: SocketAddr,
    admin: SocketAddr,
    operator_admin: SocketAddr,
    metrics: Arc<Metrics>,
    _exported: ExportedServices,
    _tasks: Vec<tokio::task::AbortHandle>,
    _proxy: Process,
    _server: ApiServer,
    _scratch: Scratch,
}

impl Scene {
    async fn start(case: u8) -> Self {
        let ip = |last: u8| Ipv4Addr::new(127, NET, case, last);
        let server = ApiServer::start(ip(1).into()).await.unwrap();
        server.serve::<EndpointSlice>();
        server.serve::<BalancedService>();
        let pods = vec![
            Pod::start("web-5d8f7c9b4-aaaaa", "zone-a", ip(2), 0),
            Pod::start("web-5d8f7c9b4-bbbbb", "zone-b", ip(3), 0),
            Pod::start("web-7f6d5c4b3-ccccc", "zone-a", ip(4), 20),
            Pod::gone("web-7f6d5c4b3-ddddd", "zone-a", ip(5)),
        ];
        for pod in &pods {
            server.apply_value(pod.slice()).unwrap();
        }
        server
            .apply_value(slices::two_zone_proxies(NS, NET, case))
            .unwrap();
        server.apply_value(balanced_service()).unwrap();
        let scratch = Scratch::new(&format!("scene-{case}"));
        let kubeconfig = scratch.0.join("kubeconfig");
        server.write_kubeconfig(&kubeconfig, NS).unwrap();

        let listen = SocketAddr::from((ip(1), free_port(ip(1).octets())));
        let admin = SocketAddr::from((ip(1), free_port(ip(1).octets())));
        let proxy_path = workspace_bin("ballast-proxy");
        assert!(
            Path::new(&proxy_path).exists(),
            "build it first: cargo build -p ballast-proxy ({proxy_path})"
        );
        // One attempt per request: a request to the gone pod fails and is counted as a
        // retry not sent (reason attempts); five in a row eject it. Two requests in
        // flight at most and 1 s for a response head: see `past_the_limits`.
        let proxy = Process::spawn_with_env(
            &proxy_path,
            &[
                &format!("--listen={listen}"),
                &format!("--admin-listen={admin}"),
                "--kube-service=web-backends",
                "--zone-routing=prefer-same-zone",
                "--proxy-service=web-proxy-admin",
                "--warmup=0s",
                "--retry-attempts=1",
                "--max-in-flight=2",
                "--response-timeout=1s",
            ],
            &[
                ("KUBECONFIG", kubeconfig.to_str().unwrap()),
                ("BALLAST_POD_NAME", "web-proxy-a"),
            ],
        );

        // The operator's side: its metrics, served by its admin listener, counting the
        // requests of a kube client that fills the BalancedService cache.
        let metrics = Arc::new(Metrics::default());
        let operator_admin = SocketAddr::from((ip(1), free_port(ip(1).octets())));
        let serve = tokio::spawn(ballast_operator::admin::serve(
            operator_admin,
            metrics.clone(),
            Arc::new(AtomicBool::new(true)),
        ));
        let client = kube::client::ClientBuilder::try_from(server.kube_config(NS).unwrap())
            .unwrap()
            .with_layer(&CountRequests(metrics.clone()))
            .build();
        let (store, writer) = reflector::store::<BalancedService>();
        let watch = tokio::spawn(
            watcher(
                kube::Api::<BalancedService>::all(client),
                watcher::Config::default(),
            )
            .default_backoff()
            .reflect(writer)
            .for_each(|_| futures::future::ready(())),
        );
        tokio::time::timeout(LIMIT, store.wait_until_ready())
            .await
            .unwrap()
            .unwrap();
        let exported = metrics.export_services(store);
        metrics.set_managed(1, 11);

        let scene = Self {
            pods,
            listen,
            admin,
            operator_admin,
            metrics,
            _exported: exported,
            _tasks: vec![serve.abort_handle(), watch.abort_handle()],
            _proxy: proxy,
            _server: server,
            _scratch: scratch,
        };
        let deadline = Instant::now() + LIMIT;
        loop {
            let ready = matches!(http_get(admin, "/ready").await, Some((200, _)));
            let endpoints = http_get(admin, "/endpoints")
                .await
                .is_some_and(|(_, text)| scene.pods.iter().all(|p| text.contains(p.name)));
            let zoned = http_get(admin, "/metrics")
                .await
                .is_some_and(|(_, text)| text.contains("ballast_zone_info{zone=\"zone-a\"} 1"));
            if ready && endpoints && zoned {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the proxy was not ready within {LIMIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        scene
    }

    /// Sends up to `max` GETs over two keep-alive connections for at most `span`,
    /// counting answers by status (a connection the proxy closes is opened again);
    /// meanwhile reconciles are recorded as the operator would, every tenth failing.
    async fn load(&self, max: usize, span: Duration) -> BTreeMap<u16, usize> {
        let end = Instant::now() + span;
        let mut clients = Vec::new();
        for _ in 0..2 {
            let listen = self.listen;
            clients.push(tokio::spawn(async move {
                let mut statuses = BTreeMap::<u16, usize>::new();
                let mut sender = None;
                for _ in 0..max / 2 {
                    if Instant::now() >= end {
                        break;
                    }
                    if sender.is_none() {
                        let stream = tokio::net::TcpStream::connect(listen).await.unwrap();
                        let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                            .await
                            .unwrap();
                        tokio::spawn(conn);
                        sender = Some(s);
                    }
                    let Some(s) = sender.as_mut() else { continue };
                    let request = hyper::Request::get(format!("http://{listen}/"))
                        .body(Empty::<Bytes>::new())
                        .unwrap();
                    let answer = tokio::time::timeout(LIMIT, s.send_request(request))
                        .await
                        .expect("an answer within the limit");
                    let mut pause = Duration::from_millis(5);
                    match answer {
                        Ok(response) => {
                            let status = response.status().as_u16();
                            let _ = response.into_body().collect().await;
                            *statuses.entry(status).or_default() += 1;
                            // Refused: the proxy is full (see `past_the_limits`).
                            if status == 503 {
                                pause = Duration::from_millis(50);
                            }
                        }
                        Err(_) => sender = None,
                    }
                    // Spread over the span, so that every scrape sees the rates move.
                    tokio::time::sleep(pause).await;
                }
                statuses
            }));
        }
        let mut reconciles = 0u32;
        while Instant::now() < end && clients.iter().any(|c| !c.is_finished()) {
            reconciles += 1;
            let failed = reconciles.is_multiple_of(10).then_some("apply_failed");
            self.metrics
                .observe_reconcile(Duration::from_millis(8), failed);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut statuses = BTreeMap::<u16, usize>::new();
        for client in clients {
            for (status, n) in client.await.unwrap() {
                *statuses.entry(status).or_default() += n;
            }
        }
        statuses
    }

    /// Past the proxy's limits: a request the pod answers after 1.5 s (answered 504,
    /// its response head too late) and, beside it, three that take 300 ms (the proxy
    /// admits two requests at once: the others are refused as overloaded). Tried
    /// again, at most 20 times, while a request lands on the gone pod or on one the
    /// failing pod answers at once.
    async fn past_the_limits(&self) {
        let get = |path: &'static str| {
            let listen = self.listen;
            tokio::spawn(async move {
                let stream = tokio::net::TcpStream::connect(listen).await.unwrap();
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .unwrap();
                tokio::spawn(conn);
                let request = hyper::Request::get(format!("http://{listen}{path}"))
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                tokio::time::timeout(LIMIT, sender.send_request(request))
                    .await
                    .expect("an answer within the limit")
                    .unwrap()
                    .status()
            })
        };
        for _ in 0..20 {
            let slow = get("/?delay_ms=1500");
            tokio::time::sleep(Duration::from_millis(50)).await;
            let beside: Vec<_> = (0..3).map(|_| get("/?delay_ms=300")).collect();
            let mut refused = false;
            for request in beside {
                refused |= request.await.unwrap() == 503;
            }
            if slow.await.unwrap() == 504 && refused {
                return;
            }
        }
        panic!("no request timed out, or none was refused, in 20 tries");
    }

    /// `POST /drain` from the pod's own address, as its preStop hook does.
    async fn drain(&self, pod: usize) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::new(self.pods[pod].address.ip(), 0))
            .unwrap();
        let mut stream = socket.connect(self.admin).await.unwrap();
        stream
            .write_all(b"POST /drain HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 2"), "drain refused: {out}");
    }

    async fn scrape(&self) -> (String, String) {
        let (status, proxy) = http_get(self.admin, "/metrics").await.unwrap();
        assert_eq!(status, 200);
        let (status, operator) = http_get(self.operator_admin, "/metrics").await.unwrap();
        assert_eq!(status, 200);
        (proxy, operator)
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        for task in &self._tasks {
            task.abort();
        }
    }
}

async fn http_get(address: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut out = String::new();
    stream.read_to_string(&mut out).await.ok()?;
    let status = out.get(9..12)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    Some((status, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_the_alerts_use_is_exported() {
    let scene = Scene::start(1).await;
    let (statuses, ()) = tokio::join!(
        scene.load(400, Duration::from_secs(10)),
        scene.past_the_limits()
    );
    println!("answers by status: {statuses:?}");
    assert!(
        statuses.get(&200).copied().unwrap_or(0) >= 100,
        "{statuses:?}"
    );
    scene.drain(0).await;
    let (proxy, operator) = scene.scrape().await;
    // The scene has what the panels show: a drain, a failing pod, a gone pod.
    for series in [
        "ballast_endpoint_draining{endpoint=",
        "ballast_retries_skipped_total{reason=\"attempts\"}",
        "ballast_zone_requests_total{",
        "class=\"5xx\"",
        "ballast_stream_timeouts_total{kind=\"response-head\"}",
        "ballast_rejected_requests_total{reason=\"overloaded\"}",
    ] {
        assert!(
            proxy.contains(series),
            "no {series} in the proxy's metrics:\n{proxy}"
        );
    }
    for series in [
        "ballast_operator_rollout_forced_drains{namespace=\"shop\",name=\"web\"} 1",
        "ballast_operator_api_requests_total{verb=\"watch\",resource=\"balancedservices\"}",
        "ballast_operator_reconcile_errors_total{step=\"apply_failed\"}",
    ] {
        assert!(
            operator.contains(series),
            "no {series} in the operator's metrics:\n{operator}"
        );
    }

    let mut exported = exported_names(&proxy);
    exported.extend(exported_names(&operator));
    let mut queries = dashboard_queries(&dashboard());
    queries.extend(rule_queries(&prometheus_rule()));
    let missing = unexported(&queries, &exported);
    assert!(
        missing.is_empty(),
        "used by config/monitoring, exported by neither the proxy nor the operator:\n  {}",
        missing.join("\n  ")
    );
    let used: BTreeSet<String> = queries.iter().flat_map(|(_, e)| metric_names(e)).collect();
    println!("{} metric names used, all exported", used.len());
}

// ---------------------------------------------------------------------------------------
// A real Prometheus.

/// `s` percent-encoded for a form body.
fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A request to Prometheus' HTTP API; the JSON answer.
async fn prometheus_api(address: SocketAddr, method: &str, path: &str, form: &str) -> Value {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: prometheus\r\nConnection: close\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
        form.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    // Small answers come whole; a chunked one is unwrapped.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut whole = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let size = usize::from_str_radix(size.trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            whole.push_str(&after[..size]);
            rest = &after[size + 2..];
        }
        whole
    } else {
        body.to_owned()
    };
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {head}\n{body}"))
}

/// The result of an instant query, or the error Prometheus gave.
async fn instant_query(address: SocketAddr, query: &str) -> Result<Vec<Value>, String> {
    let answer = prometheus_api(
        address,
        "POST",
        "/api/v1/query",
        &format!("query={}", form_encode(query)),
    )
    .await;
    if answer["status"] != "success" {
        return Err(format!("{}: {}", answer["errorType"], answer["error"]));
    }
    Ok(answer["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// A dashboard query as Grafana sends it, with this scene's variables; Grafana's
/// `label_values(selector, label)` as the PromQL that lists them.
fn as_grafana_sends_it(query: &str) -> String {
    let query = query
        .replace("$namespace", NS)
        .replace("$service", SERVICE)
        .replace("$__rate_interval", "30s");
    match query
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
        .and_then(|q| q.rsplit_once(','))
    {
        Some((selector, label)) => format!("group by ({}) ({selector})", label.trim()),
        None => query,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_answers_the_dashboard_and_evaluates_the_alerts() {
    let Some(prometheus) = prometheus_tool("prometheus") else {
        return;
    };
    let scene = Scene::start(2).await;
    let scratch = Scratch::new("prometheus");
    std::fs::write(scratch.0.join("ballast_rules.yaml"), rule_file(true)).unwrap();
    // The target labels config/monitoring's PodMonitor and ServiceMonitor give.
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
         rule_files: [ballast_rules.yaml]\n\
         scrape_configs:\n\
         - job_name: ballast-proxies\n  static_configs:\n  - targets: ['{}']\n    \
         labels: {{namespace: {NS}, service: {SERVICE}, proxy_pod: web-proxy-a, container: proxy}}\n\
         - job_name: ballast-operator\n  honor_labels: true\n  static_configs:\n  - targets: ['{}']\n    \
         labels: {{namespace: ballast-system, service: ballast-operator-metrics, pod: ballast-operator-0, endpoint: admin}}\n",
        scene.admin, scene.operator_admin
    );
    std::fs::write(scratch.0.join("prometheus.yml"), config).unwrap();
    let ip = Ipv4Addr::new(127, NET, 2, 1);
    let web = SocketAddr::from((ip, free_port(ip.octets())));
    let _prometheus = Process::spawn(
        prometheus.to_str().unwrap(),
        &[
            &format!(
                "--config.file={}",
                scratch.0.join("prometheus.yml").display()
            ),
            &format!("--storage.tsdb.path={}", scratch.0.join("data").display()),
            &format!("--web.listen-address={web}"),
            "--log.level=error",
        ],
    );
    let deadline = Instant::now() + LIMIT;
    while !matches!(http_get(web, "/-/ready").await, Some((200, _))) {
        assert!(
            Instant::now() < deadline,
            "prometheus was not ready within {LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A drain in progress; once both targets were scraped (Prometheus hands new
    // targets to its scrapers every 5 s), traffic for a few scrapes and rule
    // evaluations.
    scene.drain(0).await;
    let deadline = Instant::now() + LIMIT;
    loop {
        let targets = prometheus_api(web, "GET", "/api/v1/targets", "").await;
        let health: Vec<String> = targets["data"]["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| format!("{} {}", t["health"], t["lastError"]))
            .collect();
        if health.len() == 2 && health.iter().all(|h| h.starts_with("\"up\"")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "targets not scraped within {LIMIT:?}: {health:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (statuses, ()) = tokio::join!(
        scene.load(2000, Duration::from_secs(6)),
        scene.past_the_limits()
    );
    println!("answers by status: {statuses:?}");
    assert!(
        statuses.get(&200).copied().unwrap_or(0) >= 100,
        "{statuses:?}"
    );

    // Every dashboard query is valid PromQL, and every panel shows data.
    let mut problems = Vec::new();
    let mut by_place = BTreeMap::<String, Vec<String>>::new();
    for (place, query) in dashboard_queries(&dashboard()) {
        by_place.entry(place).or_default().push(query);
    }
    for (place, queries) in &by_place {
        let mut with_data = 0;
        for query in queries {
            match instant_query(web, &as_grafana_sends_it(query)).await {
                Ok(result) if !result.is_empty() => with_data += 1,
                Ok(_) => {}
                Err(e) => problems.push(format!("{place}: {e}: {query}")),
            }
        }
        if with_data == 0 {
            problems.push(format!("{place}: no data from {queries:?}"));
        }
    }
    // The variables list this scene's namespace and service.
    for (variable, value) in [("namespace", NS), ("service", SERVICE)] {
        let query = &by_place[&format!("variable ${variable}")][0];
        let result = instant_query(web, &as_grafana_sends_it(query))
            .await
            .unwrap();
        if !result.iter().any(|r| r["metric"][variable] == value) {
            problems.push(format!(
                "variable ${variable} does not list {value}: {result:?}"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "dashboard:\n  {}",
        problems.join("\n  ")
    );

    // Every rule evaluates without error; the bad rollout of the scene's status is
    // alerted on: the forced drain at once, the rest pending their `for`.
    let rules = prometheus_api(web, "GET", "/api/v1/rules", "").await;
    let mut states = BTreeMap::new();
    for group in rules["data"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let name = rule["name"].as_str().unwrap().to_owned();
            assert_eq!(rule["health"], "ok", "{name}: {}", rule["lastError"]);
            states.insert(name, rule["state"].as_str().unwrap_or("?").to_owned());
        }
    }
    let expected: BTreeMap<String, String> = [
        ("BallastForcedDrainsDuringRollout", "firing"),
        ("BallastNewRevisionErrorRatioHigh", "pending"),
        ("BallastServiceNotAvailable", "pending"),
        ("BallastProxiesNotReady", "pending"),
        ("BallastNoProxyReady", "inactive"),
        ("BallastLoadImbalanced", "pending"),
        ("BallastOperatorReconcileErrors", "pending"),
    ]
    .into_iter()
    .map(|(a, s)| (a.to_owned(), s.to_owned()))
    .collect();
    assert_eq!(states, expected);
    let alerts = prometheus_api(web, "GET", "/api/v1/alerts", "").await;
    let forced = alerts["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["labels"]["alertname"] == "BallastForcedDrainsDuringRollout")
        .unwrap();
    assert_eq!(
        forced["annotations"]["summary"],
        "shop/web: 1 pod(s) stopped with requests still open during the rollout"
    );
    println!(
        "prometheus: {} dashboard queries answered, {} rules evaluated",
        by_place.values().map(Vec::len).sum::<usize>(),
        states.len()
    );
}
