//! A proxy rollout behind a Google load balancer (container-native, NEG) loses no
//! request: the proxies run with the flags the operator derives from
//! `spec.proxy.loadBalancer`, discovering the app pod through `--kube-service` against
//! the API stand-in, and a stand-in for the load balancer health-checks each proxy's
//! `/ready` as the BackendConfig tells Google's to, sending requests only to the proxies
//! it believes healthy. One proxy is told to stop mid-load.
//!
//! The same load balancer in front of proxies rendered without `loadBalancer` (the 5 s
//! shutdown delay that is enough behind kube-proxy) loses requests: the load balancer
//! takes longer than that to notice, and keeps sending to a proxy that no longer
//! accepts. That control is what shows the derivation matters, and that this test can
//! fail.
//!
//! The stand-in is conservative against the real one: it stops sending to a proxy the
//! moment it marks it unhealthy, as GKE does once the terminating pod is detached from
//! the NEG; connection draining only lets requests already sent finish, which the
//! proxy's own drain covers.

#![allow(clippy::unwrap_used)]

use ballast_api::BalancedService;
use ballast_integration::apiserver::ApiServer;
use ballast_integration::{Process, free_port, workspace_bin};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NS: &str = "shop";
const LIMIT: Duration = Duration::from_secs(20);

/// The load balancer's health check, as `spec.proxy.loadBalancer.healthCheck` sets it:
/// a stopping proxy is noticed 6 to 8 s after `/ready` starts failing, longer than the
/// 5 s a proxy waits without a load balancer in front.
const CHECK_INTERVAL: Duration = Duration::from_secs(2);
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);
const UNHEALTHY_THRESHOLD: u32 = 4;

/// The BalancedService `shop`, with or without the load balancer in its spec.
fn balanced_service(load_balancer: bool) -> BalancedService {
    let mut value = json!({
        "apiVersion": "ballast.dev/v1alpha1",
        "kind": "BalancedService",
        "metadata": {"name": "shop", "namespace": NS},
        "spec": {
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
            "template": {"spec": {"containers": [{"name": "app", "image": "app:1",
                "ports": [{"name": "http", "containerPort": 8080}]}]}},
        },
    });
    if load_balancer {
        value["spec"]["proxy"] = json!({"loadBalancer": {
            "type": "Ingress",
            "connectionDrainingSeconds": 0,
            "healthCheck": {
                "checkIntervalSeconds": CHECK_INTERVAL.as_secs(),
                "timeoutSeconds": CHECK_TIMEOUT.as_secs(),
                "healthyThreshold": 1,
                "unhealthyThreshold": UNHEALTHY_THRESHOLD,
            },
        }});
    }
    serde_json::from_value(value).unwrap()
}

/// `ballast-proxy` with the arguments the operator renders for `bs`, listening on
/// `ip` (its pod IP).
fn proxy(bs: &BalancedService, ip: [u8; 4], kubeconfig: &str) -> (Process, SocketAddr, SocketAddr) {
    let valid = ballast_operator::validate::validate(bs, None, &Default::default()).unwrap();
    let mut settings = ballast_operator::build::proxy_settings(&valid);
    let listen = SocketAddr::from((ip, free_port(ip)));
    let admin = SocketAddr::from((ip, free_port(ip)));
    settings.listeners[0].listen = listen;
    settings.admin_listen = admin;
    let args = settings.to_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let path = workspace_bin("ballast-proxy");
    assert!(
        std::path::Path::new(&path).exists(),
        "build it first: cargo build -p ballast-proxy ({path})"
    );
    let process = Process::spawn_with_env(
        &path,
        &args,
        &[("KUBECONFIG", kubeconfig), ("BALLAST_NAMESPACE", NS)],
    );
    (process, listen, admin)
}

/// One `GET path` on a fresh connection: the status, or `None` when the connection or
/// the answer failed.
async fn get(addr: SocketAddr, path: &str, limit: Duration) -> Option<u16> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await.ok()?;
        std::str::from_utf8(out.get(9..12)?).ok()?.parse().ok()
    };
    tokio::time::timeout(limit, exchange).await.ok().flatten()
}

/// What the load balancer stand-in knows of one proxy.
struct Backend {
    listen: SocketAddr,
    admin: SocketAddr,
    healthy: AtomicBool,
    served: AtomicU64,
}

/// Health-checks `backend` every [`CHECK_INTERVAL`] until `stop`: healthy after one
/// passing check, unhealthy after [`UNHEALTHY_THRESHOLD`] failing ones in a row.
async fn health_check(backend: Arc<Backend>, stop: Arc<AtomicBool>) {
    let mut failures = 0;
    while !stop.load(Relaxed) {
        if get(backend.admin, "/ready", CHECK_TIMEOUT).await == Some(200) {
            failures = 0;
            backend.healthy.store(true, Relaxed);
        } else {
            failures += 1;
            if failures >= UNHEALTHY_THRESHOLD {
                backend.healthy.store(false, Relaxed);
            }
        }
        tokio::time::sleep(CHECK_INTERVAL).await;
    }
}

/// Counts of one run.
#[derive(Debug, Default)]
struct Outcome {
    sent: u64,
    failed: u64,
    /// Requests the stopping proxy answered after it was told to stop.
    served_after_stop: u64,
}

/// Two proxies rendered for `bs` behind the load balancer stand-in; the first is
/// stopped after 2 s of load, which then runs 11 s more (past the slowest detection).
async fn proxy_rollout(bs: &BalancedService, net: u8) -> Outcome {
    let server = ApiServer::start([127, 0, 0, 1].into()).await.unwrap();
    server.serve::<EndpointSlice>();
    let app = Process::spawn(
        env!("CARGO_BIN_EXE_ballast-sample-app"),
        &["--listen", &format!("127.{net}.0.2:0"), "--pod", "shop-1"],
    );
    let app_addr: SocketAddr = app.wait_for("listening on ", LIMIT).parse().unwrap();
    server
        .apply_value(json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": "shop-backends-a", "namespace": NS,
                         "labels": {"kubernetes.io/service-name": "shop-backends"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": app_addr.port(), "protocol": "TCP"}],
            "endpoints": [{"addresses": [app_addr.ip().to_string()],
                           "conditions": {"ready": true, "serving": true, "terminating": false},
                           "targetRef": {"kind": "Pod", "namespace": NS, "name": "shop-1"}}],
        }))
        .unwrap();
    let dir = std::env::temp_dir().join(format!("ballast-lb-{}-{net}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig, NS).unwrap();
    let kubeconfig = kubeconfig.to_str().unwrap().to_owned();

    let (mut stopping, listen_a, admin_a) = proxy(bs, [127, net, 0, 3], &kubeconfig);
    let (staying, listen_b, admin_b) = proxy(bs, [127, net, 0, 4], &kubeconfig);
    let backends: Vec<Arc<Backend>> = [(listen_a, admin_a), (listen_b, admin_b)]
        .into_iter()
        .map(|(listen, admin)| {
            Arc::new(Backend {
                listen,
                admin,
                healthy: AtomicBool::new(false),
                served: AtomicU64::new(0),
            })
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let checkers: Vec<_> = backends
        .iter()
        .map(|b| tokio::spawn(health_check(b.clone(), stop.clone())))
        .collect();
    let started = Instant::now();
    while !backends.iter().all(|b| b.healthy.load(Relaxed)) {
        assert!(
            started.elapsed() < LIMIT,
            "the proxies never passed the health check"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Four clients of the load balancer, each request to the next healthy proxy.
    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let load_stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|client| {
            let (backends, sent, failed, load_stop) = (
                backends.clone(),
                sent.clone(),
                failed.clone(),
                load_stop.clone(),
            );
            tokio::spawn(async move {
                let mut turn = client;
                // Bounded by count as well as by the flag.
                for _ in 0..5_000 {
                    if load_stop.load(Relaxed) {
                        break;
                    }
                    turn += 1;
                    let healthy: Vec<&Arc<Backend>> = backends
                        .iter()
                        .filter(|b| b.healthy.load(Relaxed))
                        .collect();
                    let Some(backend) = healthy.get(turn % healthy.len().max(1)) else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    sent.fetch_add(1, Relaxed);
                    if get(backend.listen, "/hello", Duration::from_secs(5)).await == Some(200) {
                        backend.served.fetch_add(1, Relaxed);
                    } else {
                        failed.fetch_add(1, Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_stop = backends[0].served.load(Relaxed);
    stopping.sigterm();
    tokio::time::sleep(Duration::from_secs(11)).await;
    load_stop.store(true, Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    stop.store(true, Relaxed);
    for checker in checkers {
        checker.abort();
    }
    // The stopped proxy exits within its grace period once drained.
    let valid = ballast_operator::validate::validate(bs, None, &Default::default()).unwrap();
    let grace = ballast_operator::build::proxy_grace_seconds(&valid);
    assert!(
        stopping
            .wait_exit(Duration::from_secs(u64::try_from(grace).unwrap()))
            .is_some(),
        "the stopped proxy outlived its {grace} s grace period"
    );
    drop(staying);
    drop(app);
    let _ = std::fs::remove_dir_all(&dir);
    Outcome {
        sent: sent.load(Relaxed),
        failed: failed.load(Relaxed),
        served_after_stop: backends[0].served.load(Relaxed) - before_stop,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_rollout_behind_a_google_load_balancer_loses_no_request() {
    let (with, without) = (balanced_service(true), balanced_service(false));
    let (derived, control) = tokio::join!(proxy_rollout(&with, 31), proxy_rollout(&without, 32));
    eprintln!("with spec.proxy.loadBalancer: {derived:?}; without: {control:?}");
    assert!(
        derived.sent > 500 && control.sent > 500,
        "load ran: {derived:?} {control:?}"
    );
    assert!(
        derived.served_after_stop > 0,
        "the load balancer kept sending to the stopping proxy until it noticed: {derived:?}"
    );
    assert_eq!(derived.failed, 0, "{derived:?}");
    assert!(
        control.failed > 0,
        "without the load balancer's timing a stopping proxy stops accepting before the load balancer notices: {control:?}"
    );
}
