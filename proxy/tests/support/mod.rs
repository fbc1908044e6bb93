//! Real sockets on loopback: in-process backends on distinct 127.0.0.x addresses (the
//! "pods"), the real proxy, and keep-alive clients.
#![allow(dead_code, clippy::unwrap_used)]

pub mod grpc;
pub mod raw_codec;

use ballast_proxy::config::Settings;
use ballast_proxy::server::{self, Running};
use bytes::Bytes;
use clap::Parser;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinSet;

/// How a backend answers.
#[derive(Clone, Copy, Debug, Default)]
pub struct Behaviour {
    /// Added to every request.
    pub delay: Duration,
    /// Close the connection without answering, after reading the body.
    pub reset: bool,
}

impl Behaviour {
    /// Reads each request, then drops the connection without an answer (a crashing pod).
    pub fn resetting() -> Self {
        Self {
            reset: true,
            ..Self::default()
        }
    }

    /// Answers every request only after `delay` (a slow pod).
    pub fn answering_after(delay: Duration) -> Self {
        Self {
            delay,
            ..Self::default()
        }
    }
}

/// An in-process HTTP backend (HTTP/1.1 and h2c) standing in for a pod.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    server: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn start(last_octet: u8, behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, last_octet], 0)))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let counter = hits.clone();
        let server = tokio::spawn(async move {
            // Connections live in the JoinSet: aborting the server aborts them all, which
            // is a hard kill (sockets closed mid-request).
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let counter = counter.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        counter.fetch_add(1, Relaxed);
                        handle(req, addr, behaviour)
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, hits, server }
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Relaxed)
    }

    /// Kills it hard: listener and every connection closed at once.
    pub fn kill(&self) {
        self.server.abort();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.server.abort();
    }
}

type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

async fn handle(
    mut req: Request<Incoming>,
    addr: SocketAddr,
    behaviour: Behaviour,
) -> Result<Response<BoxBody>, std::io::Error> {
    let path = req.uri().path().to_owned();
    let upgrade = hyper::upgrade::on(&mut req);
    let headers = req.headers().clone();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if behaviour.reset {
        return Err(std::io::Error::other("reset by test backend"));
    }
    let delay = path
        .strip_prefix("/delay/")
        .and_then(|ms| ms.parse().ok())
        .map(Duration::from_millis);
    tokio::time::sleep(delay.unwrap_or(behaviour.delay)).await;
    let mut response = match path.as_str() {
        "/upgrade" => {
            // A raw echo protocol after 101: the same mechanics as WebSocket.
            tokio::spawn(async move {
                if let Ok(upgraded) = upgrade.await {
                    let mut io = TokioIo::new(upgraded);
                    let (mut r, mut w) = tokio::io::split(&mut io);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
            let mut r = Response::new(Full::new(Bytes::new()).boxed_unsync());
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut().insert("upgrade", "echo".parse().unwrap());
            r.headers_mut()
                .insert("connection", "upgrade".parse().unwrap());
            r
        }
        "/stream" => {
            // Several data frames, then trailers: the shape of a gRPC server stream.
            let frames = (0..3)
                .map(|i| Ok::<_, Infallible>(Frame::data(Bytes::from(format!("msg{i};")))))
                .chain(std::iter::once(Ok(Frame::trailers({
                    let mut t = http::HeaderMap::new();
                    t.insert("grpc-status", "0".parse().unwrap());
                    t
                }))));
            Response::new(StreamBody::new(futures::stream::iter(frames)).boxed_unsync())
        }
        "/headers" => {
            let mut text = String::new();
            for (name, value) in &headers {
                text.push_str(&format!("{name}: {}\n", value.to_str().unwrap_or("?")));
            }
            Response::new(Full::new(Bytes::from(text)).boxed_unsync())
        }
        "/echo" => Response::new(Full::new(body).boxed_unsync()),
        _ => {
            let status = path
                .strip_prefix("/status/")
                .and_then(|s| s.parse().ok())
                .and_then(|s| StatusCode::from_u16(s).ok())
                .unwrap_or(StatusCode::OK);
            let mut r =
                Response::new(Full::new(Bytes::from(format!("ok from {addr}"))).boxed_unsync());
            *r.status_mut() = status;
            r
        }
    };
    response
        .headers_mut()
        .insert("x-served-by", addr.to_string().parse().unwrap());
    Ok(response)
}

type ScriptedBody =
    StreamBody<futures::stream::BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;

/// A pod that answers every request with a head and then the frames `script` produces
/// (for that request), on HTTP/1.1 or h2c; a gRPC request gets a gRPC content type.
pub async fn scripted_pod<F, Fut>(last_octet: u8, script: F) -> SocketAddr
where
    F: Fn(Request<Incoming>, tokio::sync::mpsc::Sender<Frame<Bytes>>) -> Fut
        + Clone
        + Send
        + Sync
        + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, last_octet], 0)))
        .await
        .expect("bind a loopback address");
    let addr = listener.local_addr().expect("a bound address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let script = script.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let script = script.clone();
                    async move {
                        let grpc = request
                            .headers()
                            .get("content-type")
                            .is_some_and(|v| v == "application/grpc");
                        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
                        tokio::spawn(script(request, tx));
                        let frames = futures::stream::poll_fn(move |cx| {
                            rx.poll_recv(cx).map(|f| f.map(Ok::<_, Infallible>))
                        });
                        let body: ScriptedBody = StreamBody::new(Box::pin(frames));
                        let mut response = Response::new(body);
                        if grpc {
                            response
                                .headers_mut()
                                .insert("content-type", "application/grpc".parse().unwrap());
                        }
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A [`scripted_pod`] that answers every request with the one frame `first` and then
/// stays silent for a minute, its body never ending (longer than any test waits).
pub async fn silent_pod(last_octet: u8, first: &'static [u8]) -> SocketAddr {
    scripted_pod(last_octet, move |_request, tx| async move {
        let _ = tx.send(Frame::data(Bytes::from_static(first))).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(tx);
    })
    .await
}

/// Starts one backend per last octet in `octets`, all behaving alike.
pub async fn backends(octets: std::ops::Range<u8>, behaviour: Behaviour) -> Vec<Backend> {
    let mut out = Vec::new();
    for i in octets {
        out.push(Backend::start(i, behaviour).await);
    }
    out
}

/// A pod on 127.0.0.2 that resets every request and a healthy one on 127.0.0.3:
/// `(broken, healthy)`.
pub async fn broken_and_healthy() -> (Backend, Backend) {
    (
        Backend::start(2, Behaviour::resetting()).await,
        Backend::start(3, Behaviour::default()).await,
    )
}

/// Checks a reply to a body too large to retry, sent through the proxy to a
/// [`broken_and_healthy`] pair whose hits were `before`: either the proxy's 502 for a
/// request that went to `broken` exactly once and was not retried, or the healthy pod's
/// echo of all `len` bytes. True for the 502.
pub fn assert_echoed_or_failed_once(
    reply: &Reply,
    (broken, healthy): (&Backend, &Backend),
    before: (u64, u64),
    len: usize,
    what: &str,
) -> bool {
    if reply.status == StatusCode::BAD_GATEWAY {
        assert_eq!(
            reply.headers["x-ballast-error"], "upstream-failed",
            "{what}"
        );
        assert_eq!(
            (broken.hits(), healthy.hits()),
            (before.0 + 1, before.1),
            "{what}: sent exactly once, not retried"
        );
        true
    } else {
        assert_eq!(reply.status, StatusCode::OK, "{what}: {}", reply.text());
        assert_eq!(reply.body.len(), len, "{what}");
        false
    }
}

/// Borrows every backend (for [`endpoints_arg`]).
pub fn refs(backends: &[Backend]) -> Vec<&Backend> {
    backends.iter().collect()
}

/// Starts the real proxy on 127.0.0.1 with `args` added to test defaults. A flag the
/// proxy does not take fails the calling test, not the whole test binary.
pub async fn proxy(args: &[&str]) -> Running {
    let defaults = [
        ("--listen", "127.0.0.1:0"),
        ("--admin-listen", "127.0.0.1:0"),
        ("--warmup", "0s"),
        ("--shutdown-delay", "0s"),
        ("--drain-timeout", "5s"),
    ];
    let mut all = vec!["ballast-proxy"];
    for (flag, value) in defaults {
        if !args.contains(&flag) {
            all.extend([flag, value]);
        }
    }
    all.extend_from_slice(args);
    let config = Settings::try_parse_from(all)
        .unwrap_or_else(|e| panic!("the proxy does not take these flags: {e}"))
        .resolve()
        .expect("valid test config");
    let running = server::start(config).await.expect("proxy starts");
    wait_ready(running.admin).await;
    running
}

/// Starts the real proxy with `pods` as its `--endpoints` and `extra` flags.
pub async fn proxy_to(pods: &[SocketAddr], extra: &[&str]) -> Running {
    let endpoints = pods
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut args = vec!["--endpoints", endpoints.as_str()];
    args.extend_from_slice(extra);
    proxy(&args).await
}

pub fn endpoints_arg(backends: &[&Backend]) -> String {
    backends
        .iter()
        .map(|b| b.addr.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

pub async fn wait_ready(admin: SocketAddr) {
    for _ in 0..200 {
        if let Ok(mut c) = Client::connect(admin).await
            && let Ok(r) = c.get("/ready").await
            && r.status == StatusCode::OK
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("proxy never became ready");
}

/// Polls `condition` every 20 ms until it holds, instead of sleeping for a guessed
/// while; panics naming `what` after 10 s.
pub async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One keep-alive HTTP/1.1 connection, used sequentially.
pub struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

/// A response, fully read.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn served_by(&self) -> Option<SocketAddr> {
        self.headers.get("x-served-by")?.to_str().ok()?.parse().ok()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Self> {
        Self::handshake(TcpStream::connect(addr).await?).await
    }

    /// Connects from a given source IP (acting as that pod).
    pub async fn connect_from(source: IpAddr, addr: SocketAddr) -> std::io::Result<Self> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        Self::handshake(socket.connect(addr).await?).await
    }

    async fn handshake(stream: TcpStream) -> std::io::Result<Self> {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(Self { sender })
    }

    pub async fn get(&mut self, path: &str) -> Result<Reply, hyper::Error> {
        self.send(
            Request::get(path)
                .header("host", "test.local")
                .body(Full::default())
                .unwrap(),
        )
        .await
    }

    /// `POST path` with `body` (Host `t`, as the echo tests send it).
    pub async fn post(
        &mut self,
        path: &str,
        body: impl Into<Bytes>,
    ) -> Result<Reply, hyper::Error> {
        self.send(
            Request::post(path)
                .header("host", "t")
                .body(Full::new(body.into()))
                .unwrap(),
        )
        .await
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Reply, hyper::Error> {
        self.sender.ready().await?;
        let response = self.sender.send_request(req).await?;
        let (head, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply {
            status: head.status,
            headers: head.headers,
            body,
        })
    }

    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

/// Writes raw bytes to `addr` and reads until the peer closes or `limit` passes.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8], limit: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

pub async fn get_json(admin: SocketAddr, path: &str) -> serde_json::Value {
    let mut c = Client::connect(admin).await.unwrap();
    serde_json::from_slice(&c.get(path).await.unwrap().body).unwrap()
}

/// The proxy's whole `/metrics` page.
pub async fn metrics_text(admin: SocketAddr) -> String {
    let mut c = Client::connect(admin).await.unwrap();
    c.get("/metrics").await.unwrap().text()
}

/// Metric `name` (with its labels, as printed) from `/metrics`, or 0 when absent.
pub async fn metric(admin: SocketAddr, name: &str) -> f64 {
    metrics_text(admin)
        .await
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// How many streams the proxy has cut at its `kind` limit (`idle`, `response-head`).
pub async fn stream_timeouts(admin: SocketAddr, kind: &str) -> f64 {
    metric(
        admin,
        &format!("ballast_stream_timeouts_total{{kind=\"{kind}\"}}"),
    )
    .await
}

/// The `in_flight` count `/endpoints` reports for `pod`; panics if it is not listed.
pub async fn in_flight(admin: SocketAddr, pod: SocketAddr) -> u64 {
    let report = get_json(admin, "/endpoints").await;
    report
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == pod.to_string())
        .unwrap_or_else(|| panic!("{pod} not in {report}"))["in_flight"]
        .as_u64()
        .unwrap()
}

/// Sends `POST` or `GET /drain` from `pod_ip`.
pub async fn drain(
    admin: SocketAddr,
    pod_ip: IpAddr,
    method: http::Method,
) -> (StatusCode, serde_json::Value) {
    let mut c = Client::connect_from(pod_ip, admin).await.unwrap();
    let reply = c
        .send(
            Request::builder()
                .method(method)
                .uri("/drain")
                .header("host", "admin")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    (
        reply.status,
        serde_json::from_slice(&reply.body).unwrap_or_default(),
    )
}
