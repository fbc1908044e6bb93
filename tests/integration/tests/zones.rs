//! Zone-aware routing as it runs in a cluster: the `ballast-proxy` binary with
//! `--kube-service` (the app pods' EndpointSlices, each endpoint with its `zone`) and
//! `--proxy-service` (the proxies' admin Service, whose EndpointSlices give every proxy
//! pod's zone, this one's found by `BALLAST_POD_NAME`), both read through kube's real
//! watcher from the list/watch stand-in. Pods are `ballast-sample-app` processes on
//! their own loopback addresses (127.29.<case>.x); the proxy pods of the admin Service
//! are only listed. Shares are read twice: from the pods that answered
//! (`x-served-by`) and from `ballast_zone_requests_total`.

#![allow(clippy::unwrap_used)]

use ballast_integration::apiserver::ApiServer;
use ballast_integration::{Process, free_port, slices, workspace_bin};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NS: &str = "shop";
const LIMIT: Duration = Duration::from_secs(30);
/// Requests before the measured ones, so every latency estimate has samples.
const WARMUP: usize = 200;
/// Measured requests per case.
const REQUESTS: usize = 2000;
/// Keep-alive client connections sending them.
const CLIENTS: usize = 4;
/// The loopback network of these tests: 127.29.<case>.0/24.
const NET: u8 = 29;

/// One app pod: a sample app on its own loopback address.
struct Pod {
    name: String,
    zone: &'static str,
    address: SocketAddr,
    _process: Process,
}

impl Pod {
    fn start(name: &str, zone: &'static str, ip: Ipv4Addr, latency_ms: u64) -> Self {
        let process = Process::spawn(
            env!("CARGO_BIN_EXE_ballast-sample-app"),
            &[
                "--listen",
                &format!("{ip}:0"),
                "--pod",
                name,
                "--latency-ms",
                &latency_ms.to_string(),
            ],
        );
        let address = process.wait_for("listening on ", LIMIT).parse().unwrap();
        Self {
            name: name.to_owned(),
            zone,
            address,
            _process: process,
        }
    }

    /// Its EndpointSlice (one per pod: each listens on its own port), with its zone.
    fn slice(&self) -> Value {
        let name = format!("web-backends-{}", self.name);
        let pod = slices::endpoint(self.address.ip(), NS, &self.name, self.zone);
        let port = ("http", self.address.port());
        slices::slice(NS, "web-backends", &name, port, vec![pod])
    }
}

/// A proxy in zone-a in front of `pods`, with the API stand-in it discovers them from.
struct Zoned {
    pods: Vec<Pod>,
    listen: SocketAddr,
    admin: SocketAddr,
    dir: std::path::PathBuf,
    _proxy: Process,
    _server: ApiServer,
}

impl Drop for Zoned {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Zoned {
    /// `pods` as (name, zone, added latency in ms), on 127.29.`case`.2 and up.
    async fn start(case: u8, pods: &[(&str, &'static str, u64)]) -> Self {
        let ip = |last: u8| Ipv4Addr::new(127, NET, case, last);
        let server = ApiServer::start(ip(1).into()).await.unwrap();
        server.serve::<EndpointSlice>();
        let pods: Vec<Pod> = pods
            .iter()
            .zip(2..)
            .map(|(&(name, zone, latency), last)| Pod::start(name, zone, ip(last), latency))
            .collect();
        for pod in &pods {
            server.apply_value(pod.slice()).unwrap();
        }
        server
            .apply_value(slices::two_zone_proxies(NS, NET, case))
            .unwrap();
        let dir = std::env::temp_dir().join(format!("ballast-zones-{}-{case}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kubeconfig = dir.join("kubeconfig");
        server.write_kubeconfig(&kubeconfig, NS).unwrap();

        let listen = SocketAddr::from((ip(1), free_port(ip(1).octets())));
        let admin = SocketAddr::from((ip(1), free_port(ip(1).octets())));
        let proxy_path = workspace_bin("ballast-proxy");
        assert!(
            std::path::Path::new(&proxy_path).exists(),
            "build it first: cargo build -p ballast-proxy ({proxy_path})"
        );
        // The zone flags as the operator renders them; the pod name from the downward API.
        let proxy = Process::spawn_with_env(
            &proxy_path,
            &[
                &format!("--listen={listen}"),
                &format!("--admin-listen={admin}"),
                "--kube-service=web-backends",
                "--zone-routing=prefer-same-zone",
                "--proxy-service=web-proxy-admin",
                "--warmup=0s",
            ],
            &[
                ("KUBECONFIG", kubeconfig.to_str().unwrap()),
                ("BALLAST_POD_NAME", "web-proxy-a"),
            ],
        );
        let zoned = Self {
            pods,
            listen,
            admin,
            dir,
            _proxy: proxy,
            _server: server,
        };
        let deadline = Instant::now() + LIMIT;
        loop {
            let ready = matches!(http_get(admin, "/ready").await, Some((200, _)));
            let known = http_get(admin, "/metrics")
                .await
                .is_some_and(|(_, text)| text.contains("ballast_zone_info{zone=\"zone-a\"} 1"));
            if ready && known {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the proxy was not ready in zone-a within {LIMIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        zoned
    }

    /// Sends `n` GETs over [`CLIENTS`] keep-alive connections: requests per pod.
    async fn load(&self, n: usize) -> BTreeMap<String, usize> {
        let mut clients = Vec::new();
        for client in 0..CLIENTS {
            let listen = self.listen;
            let count = n / CLIENTS + usize::from(client < n % CLIENTS);
            clients.push(tokio::spawn(async move {
                let stream = tokio::net::TcpStream::connect(listen).await.unwrap();
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .unwrap();
                tokio::spawn(conn);
                let mut hits = BTreeMap::<String, usize>::new();
                for _ in 0..count {
                    let request = hyper::Request::get(format!("http://{listen}/"))
                        .body(Empty::<Bytes>::new())
                        .unwrap();
                    let response = tokio::time::timeout(LIMIT, sender.send_request(request))
                        .await
                        .expect("a response within the limit")
                        .unwrap();
                    assert_eq!(response.status(), 200);
                    let pod = response.headers()["x-served-by"]
                        .to_str()
                        .unwrap()
                        .to_owned();
                    response.into_body().collect().await.unwrap();
                    *hits.entry(pod).or_default() += 1;
                }
                hits
            }));
        }
        let mut hits = BTreeMap::new();
        for client in clients {
            for (pod, n) in client.await.unwrap() {
                *hits.entry(pod).or_default() += n;
            }
        }
        hits
    }

    /// `ballast_zone_requests_total` by (locality, zone).
    async fn zone_requests(&self) -> BTreeMap<(String, String), u64> {
        let (_, text) = http_get(self.admin, "/metrics").await.unwrap();
        text.lines()
            .filter_map(|line| line.strip_prefix("ballast_zone_requests_total{"))
            .map(|line| {
                let (labels, value) = line.split_once("} ").unwrap();
                let label = |name: &str| {
                    labels
                        .split(',')
                        .find_map(|l| l.strip_prefix(&format!("{name}=\"")))
                        .map(|v| v.trim_end_matches('"').to_owned())
                        .unwrap()
                };
                (
                    (label("locality"), label("zone")),
                    value.trim().parse().unwrap(),
                )
            })
            .collect()
    }

    /// Warms up, then measures [`REQUESTS`] requests.
    async fn measure(&self) -> Measured {
        self.load(WARMUP).await;
        let before = self.zone_requests().await;
        let hits = self.load(REQUESTS).await;
        let after = self.zone_requests().await;
        let delta = |locality: &str| -> u64 {
            after
                .iter()
                .filter(|((l, _), _)| l == locality)
                .map(|(key, n)| n - before.get(key).copied().unwrap_or(0))
                .sum()
        };
        let zone_of = |pod: &str| {
            self.pods
                .iter()
                .find(|p| p.name == pod)
                .map(|p| p.zone)
                .unwrap()
        };
        let local_hits: usize = hits
            .iter()
            .filter(|(pod, _)| zone_of(pod) == "zone-a")
            .map(|(_, n)| n)
            .sum();
        let measured = Measured {
            same_by_pods: local_hits as f64 / REQUESTS as f64,
            same_by_metric: delta("same"),
            cross_by_metric: delta("cross"),
            hits,
        };
        println!(
            "same-zone share: {:.3} by the pods, {:.3} by ballast_zone_requests_total; per pod {:?}",
            measured.same_by_pods,
            measured.metric_share(),
            measured.hits
        );
        measured
    }
}

struct Measured {
    same_by_pods: f64,
    same_by_metric: u64,
    cross_by_metric: u64,
    hits: BTreeMap<String, usize>,
}

impl Measured {
    fn metric_share(&self) -> f64 {
        self.same_by_metric as f64 / (self.same_by_metric + self.cross_by_metric) as f64
    }

    fn of(&self, pod: &str) -> usize {
        self.hits.get(pod).copied().unwrap_or(0)
    }

    /// The metric counted every measured request (each selection; no retry expected
    /// on loopback) and agrees with the pods on where they went.
    fn check_metric(&self) {
        let counted = self.same_by_metric + self.cross_by_metric;
        assert!(
            counted >= REQUESTS as u64 && counted <= REQUESTS as u64 + 20,
            "ballast_zone_requests_total counted {counted} of {REQUESTS} requests"
        );
        assert!(
            (self.metric_share() - self.same_by_pods).abs() < 0.01,
            "the metric ({:.3}) and the pods ({:.3}) disagree",
            self.metric_share(),
            self.same_by_pods
        );
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

/// Two equal pods per zone, one proxy per zone: the proxy in zone-a keeps its requests
/// in zone-a, spread over both of its pods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balanced_zones_keep_requests_in_the_proxys_zone() {
    let zoned = Zoned::start(
        1,
        &[
            ("web-a1", "zone-a", 0),
            ("web-a2", "zone-a", 0),
            ("web-b1", "zone-b", 0),
            ("web-b2", "zone-b", 0),
        ],
    )
    .await;
    let measured = zoned.measure().await;
    measured.check_metric();
    assert!(measured.same_by_pods >= 0.95, "{:?}", measured.hits);
    assert!(measured.metric_share() >= 0.95);
    for pod in ["web-a1", "web-a2"] {
        assert!(
            measured.of(pod) >= REQUESTS * 3 / 10,
            "both local pods share the load: {:?}",
            measured.hits
        );
    }
}

/// zone-a has one pod of four and half the proxies: its proxy keeps about half of its
/// requests there and spills the rest over zone-b's pods, so no pod sits idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_with_too_few_pods_spills_and_no_pod_sits_idle() {
    let zoned = Zoned::start(
        2,
        &[
            ("web-a1", "zone-a", 0),
            ("web-b1", "zone-b", 0),
            ("web-b2", "zone-b", 0),
            ("web-b3", "zone-b", 0),
        ],
    )
    .await;
    let measured = zoned.measure().await;
    measured.check_metric();
    assert!(
        (0.3..=0.7).contains(&measured.same_by_pods),
        "about half stays local: {:?}",
        measured.hits
    );
    for pod in ["web-a1", "web-b1", "web-b2", "web-b3"] {
        assert!(
            measured.of(pod) >= REQUESTS / 20,
            "{pod} sat idle: {:?}",
            measured.hits
        );
    }
}

/// One of zone-a's two pods answers 20 ms late: it carries less, so zone-a's capacity
/// no longer covers its proxy's share and requests spill to zone-b, while the slow pod
/// gets fewer than its fast neighbour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_local_pod_sends_requests_across_zones() {
    let zoned = Zoned::start(
        3,
        &[
            ("web-a1", "zone-a", 20),
            ("web-a2", "zone-a", 0),
            ("web-b1", "zone-b", 0),
            ("web-b2", "zone-b", 0),
        ],
    )
    .await;
    let measured = zoned.measure().await;
    measured.check_metric();
    let cross = 1.0 - measured.same_by_pods;
    assert!(
        cross >= 0.15,
        "cross-zone share {cross:.3} (balanced zones stay under 0.05): {:?}",
        measured.hits
    );
    assert!(
        measured.of("web-a1") * 2 < measured.of("web-a2"),
        "the slow pod gets less: {:?}",
        measured.hits
    );
}
