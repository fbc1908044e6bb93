//! A BalancedService with two ports, as the proxy serves it: one `ballast-proxy`
//! process with two `--port` listeners (HTTP and gRPC), discovering both through one
//! `--kube-service` watch of the API stand-in, where each pod's EndpointSlice names
//! both ports. Every pod is two `ballast-sample-app` processes on the pod's loopback
//! address, one per port, each naming itself `<pod>-<port>` so a reply shows which
//! port of which pod answered. Then the pod drains: counts summed over both ports,
//! no new request to it on either listener.

#![allow(clippy::unwrap_used)]

use ballast_integration::apiserver::ApiServer;
use ballast_integration::{Process, free_port, workspace_bin};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const NS: &str = "shop";
const LIMIT: Duration = Duration::from_secs(20);
const ECHO_UNARY: &str = "/ballast.demo.v1.Echo/Unary";

/// Polls `condition` every 25 ms until it holds; fails naming `what` after [`LIMIT`].
async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + LIMIT;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// One app pod: an HTTP process and a gRPC process on the pod's IP.
struct Pod {
    name: &'static str,
    ip: IpAddr,
    http: SocketAddr,
    grpc: SocketAddr,
    _processes: [Process; 2],
}

impl Pod {
    fn start(name: &'static str, ip: [u8; 4]) -> Self {
        let ip = IpAddr::from(ip);
        let serve = |port: &str| {
            let process = Process::spawn(
                env!("CARGO_BIN_EXE_ballast-sample-app"),
                &[
                    "--listen",
                    &format!("{ip}:0"),
                    "--pod",
                    &format!("{name}-{port}"),
                ],
            );
            let address: SocketAddr = process.wait_for("listening on ", LIMIT).parse().unwrap();
            (process, address)
        };
        let (http_app, http) = serve("http");
        let (grpc_app, grpc) = serve("grpc");
        Self {
            name,
            ip,
            http,
            grpc,
            _processes: [http_app, grpc_app],
        }
    }

    /// Its EndpointSlice, as the controller writes it for a pod whose ports differ
    /// from the other pods' (one slice per distinct set of ports).
    fn slice(&self) -> Value {
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("web-backends-{}", self.name),
                "namespace": NS,
                "labels": {
                    "kubernetes.io/service-name": "web-backends",
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                },
            },
            "addressType": "IPv4",
            "ports": [
                {"name": "http", "port": self.http.port(), "protocol": "TCP", "appProtocol": "http"},
                {"name": "grpc", "port": self.grpc.port(), "protocol": "TCP", "appProtocol": "grpc"},
            ],
            "endpoints": [{
                "addresses": [self.ip.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "targetRef": {"kind": "Pod", "namespace": NS, "name": self.name},
            }],
        })
    }
}

/// One admin call on its own connection from `source` (the drain API identifies the
/// pod by it): the status and the JSON answer.
async fn admin(admin: SocketAddr, method: &str, path: &str, source: IpAddr) -> (u16, Value) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let mut stream = socket.connect(admin).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// The `/endpoints` rows of `ip`, as `port -> (in_flight, connections, state)`.
async fn rows_of(
    address: SocketAddr,
    ip: IpAddr,
) -> std::collections::BTreeMap<String, (u64, u64, String)> {
    let (_, rows) = admin(address, "GET", "/endpoints", [127, 0, 0, 1].into()).await;
    rows.as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            r["address"]
                .as_str()
                .unwrap()
                .parse::<SocketAddr>()
                .unwrap()
                .ip()
                == ip
        })
        .map(|r| {
            (
                r["port"].as_str().unwrap().to_owned(),
                (
                    r["in_flight"].as_u64().unwrap(),
                    r["connections"].as_u64().unwrap(),
                    r["state"].as_str().unwrap().to_owned(),
                ),
            )
        })
        .collect()
}

/// A request body that stays open until its sender is dropped: a request in flight.
type OpenBody = StreamBody<futures::stream::BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;

fn open_body() -> (mpsc::Sender<Bytes>, OpenBody) {
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    let frames = futures::stream::unfold(rx, |mut rx| async move {
        let data = rx.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(data)), rx))
    });
    (tx, StreamBody::new(Box::pin(frames)))
}

/// HTTP/1.1 `GET /` through `listener`: who answered (`x-served-by`).
async fn http_served_by(listener: SocketAddr) -> String {
    let stream = tokio::net::TcpStream::connect(listener).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = hyper::Request::get(format!("http://{listener}/"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    response.headers()["x-served-by"]
        .to_str()
        .unwrap()
        .to_owned()
}

type Grpc<B> = hyper::client::conn::http2::SendRequest<B>;

async fn grpc_channel<B>(listener: SocketAddr) -> Grpc<B>
where
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(listener).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

fn grpc_request<B>(listener: SocketAddr, body: B) -> hyper::Request<B> {
    hyper::Request::post(format!("http://{listener}{ECHO_UNARY}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap()
}

/// `Echo/Unary` through `listener` on `channel`: the `pod` of the reply
/// (`EchoReply{message = 1, pod = 2}`, encoded by hand as the sample app does).
async fn grpc_served_by(channel: &mut Grpc<Full<Bytes>>, listener: SocketAddr) -> String {
    let message = [0x0a, 2, b'h', b'i'];
    let mut framed = vec![0, 0, 0, 0, message.len() as u8];
    framed.extend_from_slice(&message);
    let response = channel
        .send_request(grpc_request(listener, Full::new(Bytes::from(framed))))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let collected = response.into_body().collect().await.unwrap();
    let status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .cloned();
    assert_eq!(status.as_ref().map(|s| s.to_str().unwrap()), Some("0"));
    let reply = collected.to_bytes();
    // Frame header (5), field 1 "hi" (4), then field 2: tag, length, the pod name.
    let pod = &reply[5 + 4..];
    assert_eq!(pod[0], (2 << 3) | 2, "{reply:?}");
    String::from_utf8(pod[2..2 + usize::from(pod[1])].to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ports_are_balanced_apart_and_a_pod_drains_on_both() {
    let server = ApiServer::start([127, 0, 0, 1].into()).await.unwrap();
    server.serve::<EndpointSlice>();
    let pods = [
        Pod::start("web-1", [127, 0, 0, 2]),
        Pod::start("web-2", [127, 0, 0, 3]),
    ];
    for pod in &pods {
        server.apply_value(pod.slice()).unwrap();
    }
    let dir = std::env::temp_dir().join(format!("ballast-multiport-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig, NS).unwrap();

    let loopback = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let http = loopback(free_port([127, 0, 0, 1]));
    let grpc = loopback(free_port([127, 0, 0, 1]));
    let admin_address = loopback(free_port([127, 0, 0, 1]));
    let proxy_path = workspace_bin("ballast-proxy");
    assert!(
        std::path::Path::new(&proxy_path).exists(),
        "build it first: cargo build -p ballast-proxy ({proxy_path})"
    );
    // The listeners as the operator renders them (ProxySettings::to_args), on loopback.
    let _proxy = Process::spawn_with_env(
        &proxy_path,
        &[
            &format!("--port=http={http},protocol=http1"),
            &format!("--port=grpc={grpc},protocol=h2c"),
            &format!("--admin-listen={admin_address}"),
            "--kube-service=web-backends",
            "--algorithm=least-request",
            "--warmup=0s",
        ],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    let local = IpAddr::from([127, 0, 0, 1]);
    eventually(
        "/ready once both listeners have their endpoints",
        || async {
            let Ok(socket) = tokio::net::TcpStream::connect(admin_address).await else {
                return false;
            };
            drop(socket);
            admin(admin_address, "GET", "/ready", local).await.0 == 200
        },
    )
    .await;

    // Each listener reaches its own port of both pods.
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        seen.insert(http_served_by(http).await);
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(
        seen,
        BTreeSet::from(["web-1-http".to_owned(), "web-2-http".to_owned()])
    );
    let mut channel = grpc_channel(grpc).await;
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        seen.insert(grpc_served_by(&mut channel, grpc).await);
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(
        seen,
        BTreeSet::from(["web-1-grpc".to_owned(), "web-2-grpc".to_owned()])
    );

    // Requests held open on both ports of web-1 (least-request spreads them).
    let (web1, web2) = (&pods[0], &pods[1]);
    let mut held = Vec::new();
    let mut grpc_holder = grpc_channel::<OpenBody>(grpc).await;
    for _ in 0..8 {
        let rows = rows_of(admin_address, web1.ip).await;
        if rows
            .values()
            .filter(|(in_flight, ..)| *in_flight > 0)
            .count()
            == 2
        {
            break;
        }
        let (tx, body) = open_body();
        let response = grpc_holder.send_request(grpc_request(grpc, body));
        held.push((tx, tokio::spawn(async move { response.await.map(|_| ()) })));
        let stream = tokio::net::TcpStream::connect(http).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let (tx, body) = open_body();
        let upload = hyper::Request::post(format!("http://{http}/upload"))
            .body(body)
            .unwrap();
        held.push((
            tx,
            tokio::spawn(async move { sender.send_request(upload).await.map(|_| ()) }),
        ));
        // Both reach their pods before the next pair is placed.
        let expected = held.len() as u64;
        eventually("the held requests are in flight", || async {
            let mut total = 0;
            for pod in &pods {
                total += rows_of(admin_address, pod.ip)
                    .await
                    .values()
                    .map(|(in_flight, ..)| in_flight)
                    .sum::<u64>();
            }
            total == expected
        })
        .await;
    }
    let before = rows_of(admin_address, web1.ip).await;
    assert_eq!(before.keys().collect::<Vec<_>>(), ["grpc", "http"]);
    assert!(
        before
            .values()
            .all(|(in_flight, connections, _)| *in_flight > 0 && *connections > 0),
        "{before:?}"
    );
    let sum = |rows: &std::collections::BTreeMap<String, (u64, u64, String)>| {
        rows.values()
            .fold((0, 0), |(i, c), (in_flight, connections, _)| {
                (i + in_flight, c + connections)
            })
    };

    // The drain gate's view of the pod: both ports, summed.
    let (_, report) = admin(admin_address, "GET", "/drain", web1.ip).await;
    let counts = |report: &Value| {
        (
            report["in_flight"].as_u64().unwrap(),
            report["connections"].as_u64().unwrap(),
        )
    };
    assert_eq!(
        counts(&report),
        sum(&before),
        "in flight and connections summed over http and grpc: {before:?}"
    );

    // The pod drains itself, on both ports. Its idle pooled connections close (an
    // HTTP/2 one whose stream is still open may leave the count early, so only a
    // range is certain); the held requests stay in flight.
    let (status, report) = admin(admin_address, "POST", "/drain", web1.ip).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["state"], "draining");
    let (in_flight, connections) = counts(&report);
    assert_eq!(in_flight, sum(&before).0, "{report}");
    assert!((1..=sum(&before).1).contains(&connections), "{report}");
    let rows = rows_of(admin_address, web1.ip).await;
    assert!(
        rows.values().all(|(.., state)| state == "draining"),
        "{rows:?}"
    );

    // Nothing new goes to it, on either listener.
    for _ in 0..10 {
        assert_eq!(http_served_by(http).await, "web-2-http");
        assert_eq!(grpc_served_by(&mut channel, grpc).await, "web-2-grpc");
    }

    // Its held requests end; the drain gate sees nothing open on any port.
    for (tx, response) in held {
        drop(tx);
        let _ = response.await;
    }
    eventually("web-1 drained on both ports", || async {
        let (_, report) = admin(admin_address, "GET", "/drain", web1.ip).await;
        report["in_flight"] == 0 && report["connections"] == 0
    })
    .await;
    let (_, other) = admin(admin_address, "GET", "/drain", web2.ip).await;
    assert_eq!(
        other["state"], "active",
        "the other pod is untouched: {other}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
