//! Bodies stream through the proxy: a request reaches the pod before its body has all
//! arrived, large transfers do not grow the proxy's memory, small bodies are still
//! retried after a reset, trailers cross in both directions and `Expect: 100-continue`
//! works. Pods are in-process servers on 127.0.0.x that report what they see as they
//! see it, so the tests assert ordering rather than timing.

#![allow(clippy::unwrap_used)]

mod support;

use bytes::Bytes;
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use support::grpc::within;
use support::{
    Backend, Behaviour, Client, assert_echoed_or_failed_once, broken_and_healthy, metric, proxy_to,
    stream_timeouts, wait_ready,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc::UnboundedReceiver, mpsc::UnboundedSender};
use tokio::task::JoinSet;

const LIMIT: Duration = Duration::from_secs(60);
/// How long one step may take before a test calls the data held back.
const STEP: Duration = Duration::from_secs(5);
const CHUNK: usize = 64 * 1024;

/// What an observing pod has seen of a request, in order.
#[derive(Debug, PartialEq)]
enum Seen {
    Head(String),
    Data(Bytes),
    Trailers(HeaderMap),
    End,
}

/// A pod (HTTP/1.1 and h2c) that reports what it receives as it arrives.
///
/// * `/observe`: reports the head, every data frame, trailers and the end; answers
///   with the body it got.
/// * `/trailers`: answers `got N bytes` with response trailers `x-body-length: N`, and
///   names the request trailers it got in `x-request-trailers`.
/// * `/drip`: answers `first`, then `last` once the test calls `release`.
/// * `/hold`: answers `first`, then nothing for a minute.
/// * `/upload`: counts the body and answers the count; `/download/N`: N bytes in 64 KiB
///   chunks, made as they are sent.
#[derive(Debug)]
struct Pod {
    addr: SocketAddr,
    release: Arc<Notify>,
    server: tokio::task::JoinHandle<()>,
}

impl Pod {
    async fn start(last_octet: u8) -> (Self, UnboundedReceiver<Seen>) {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, last_octet], 0)))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let release = Arc::new(Notify::new());
        let notify = release.clone();
        let server = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (tx, notify) = (tx.clone(), notify.clone());
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        pod_route(req, tx.clone(), notify.clone())
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (
            Self {
                addr,
                release,
                server,
            },
            rx,
        )
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.server.abort();
    }
}

type PodBody = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

async fn pod_route(
    req: Request<Incoming>,
    seen: UnboundedSender<Seen>,
    release: Arc<Notify>,
) -> Result<Response<PodBody>, hyper::Error> {
    let path = req.uri().path().to_owned();
    let full = |bytes: Bytes| Full::new(bytes).map_err(|never| match never {});
    if let Some(size) = path.strip_prefix("/download/") {
        let mut left: usize = size.parse().unwrap();
        let chunk = Bytes::from(vec![b'd'; CHUNK]);
        let chunks = futures::stream::poll_fn(move |_| {
            let n = left.min(CHUNK);
            left -= n;
            std::task::Poll::Ready((n > 0).then(|| Ok(Frame::data(chunk.slice(..n)))))
        });
        return Ok(Response::new(StreamBody::new(chunks).boxed_unsync()));
    }
    if path == "/hold" {
        // `first`, then nothing for a minute: longer than any test waits.
        let frames = futures::stream::once(async { Ok(Frame::data(Bytes::from("first"))) }).chain(
            futures::stream::once(async move {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(Frame::data(Bytes::from("late")))
            }),
        );
        return Ok(Response::new(StreamBody::new(frames).boxed_unsync()));
    }
    if path == "/drip" {
        let frames = futures::stream::once(async { Ok(Frame::data(Bytes::from("first"))) }).chain(
            futures::stream::once(async move {
                match tokio::time::timeout(STEP, release.notified()).await {
                    Ok(()) => Ok(Frame::data(Bytes::from("last"))),
                    Err(_) => Err(std::io::Error::other("never released")),
                }
            }),
        );
        return Ok(Response::new(StreamBody::new(frames).boxed_unsync()));
    }
    let observe = path == "/observe";
    if observe {
        let _ = seen.send(Seen::Head(path.clone()));
    }
    let mut body = req.into_body();
    let (mut received, mut length, mut trailers) = (Vec::new(), 0usize, None);
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        match frame.into_data() {
            Ok(data) => {
                length += data.len();
                if path != "/upload" {
                    received.extend_from_slice(&data);
                }
                if observe {
                    let _ = seen.send(Seen::Data(data));
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    if observe {
                        let _ = seen.send(Seen::Trailers(t.clone()));
                    }
                    trailers = Some(t);
                }
            }
        }
    }
    if observe {
        let _ = seen.send(Seen::End);
    }
    Ok(match path.as_str() {
        "/upload" => Response::new(full(Bytes::from(length.to_string())).boxed_unsync()),
        "/trailers" => {
            let names = trailers
                .iter()
                .flat_map(|t| t.iter())
                .map(|(k, v)| format!("{k}={}", v.to_str().unwrap_or("?")))
                .collect::<Vec<_>>()
                .join(";");
            let mut end = HeaderMap::new();
            end.insert("x-body-length", length.into());
            let frames = [
                Ok(Frame::data(Bytes::from(format!("got {length} bytes")))),
                Ok(Frame::trailers(end)),
            ];
            let mut r =
                Response::new(StreamBody::new(futures::stream::iter(frames)).boxed_unsync());
            r.headers_mut()
                .insert("x-request-trailers", names.parse().unwrap());
            r
        }
        _ => Response::new(full(Bytes::from(received)).boxed_unsync()),
    })
}

/// The next thing the pod saw, or a panic saying what was awaited.
async fn next_seen(seen: &mut UnboundedReceiver<Seen>, what: &str) -> Seen {
    match tokio::time::timeout(STEP, seen.recv()).await {
        Ok(Some(event)) => event,
        Ok(None) => panic!("{what}: the pod stopped"),
        Err(_) => panic!("{what}: the pod saw nothing within {STEP:?}: the proxy holds it back"),
    }
}

type Frames = mpsc::Receiver<Result<Frame<Bytes>, Infallible>>;

#[derive(Clone, Copy, Debug)]
enum Protocol {
    Http1,
    H2,
}

/// Sends `request` on a new connection to `addr`; its body is fed through the returned
/// sender. The response comes from the returned task.
async fn start_request(
    protocol: Protocol,
    addr: SocketAddr,
    request: http::request::Builder,
) -> (
    mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
    tokio::task::JoinHandle<Result<Response<Incoming>, hyper::Error>>,
) {
    let (tx, rx): (_, Frames) = mpsc::channel(4);
    let request = request.body(StreamBody::new(rx)).unwrap();
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let response = match protocol {
        Protocol::Http1 => {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            tokio::spawn(async move { sender.send_request(request).await })
        }
        Protocol::H2 => {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(conn);
            tokio::spawn(async move { sender.send_request(request).await })
        }
    };
    (tx, response)
}

/// `GET path` on a fresh HTTP/1.1 connection to `addr`, once the response head has come
/// (within [`STEP`]); unlike `Client::get`, the body is left to read as it arrives.
async fn get_head(addr: SocketAddr, path: &str) -> Response<Incoming> {
    let request = Request::get(path).header("host", "t");
    let (body, response) = start_request(Protocol::Http1, addr, request).await;
    drop(body);
    within(STEP, "response head", response)
        .await
        .unwrap()
        .unwrap()
}

/// The next frame of `body`, which must be data.
async fn next_data(body: &mut Incoming) -> Bytes {
    body.frame().await.unwrap().unwrap().into_data().unwrap()
}

/// The head and first chunk reach the pod while the client still holds the last chunk.
async fn request_streams_to_the_pod(protocol: Protocol, backend_protocol: &str) {
    let (pod, mut seen) = Pod::start(2).await;
    let running = proxy_to(&[pod.addr], &["--backend-protocol", backend_protocol]).await;
    within(LIMIT, "streamed upload", async {
        let uri = format!("http://{}/observe", running.listen);
        let (mut body, response) = start_request(
            protocol,
            running.listen,
            Request::post(uri).header("host", "t"),
        )
        .await;
        let (first, last) = (Bytes::from(vec![b'a'; 1000]), Bytes::from("the end"));
        body.send(Ok(Frame::data(first.clone()))).await.unwrap();
        assert_eq!(
            next_seen(&mut seen, "the request head, before the last chunk is sent").await,
            Seen::Head("/observe".into())
        );
        let mut got = Vec::new();
        while got.len() < first.len() {
            match next_seen(&mut seen, "the first chunk, before the last is sent").await {
                Seen::Data(data) => got.extend_from_slice(&data),
                other => panic!("expected the first chunk, the pod saw {other:?}"),
            }
        }
        assert_eq!(got, first);
        body.send(Ok(Frame::data(last.clone()))).await.unwrap();
        drop(body);
        let response = within(STEP, "response", response).await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let echoed = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(echoed, [first, last].concat(), "the whole body, in order");
    })
    .await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_http1_upload_reaches_the_pod_before_its_last_chunk_is_sent() {
    request_streams_to_the_pod(Protocol::Http1, "http1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_upload_reaches_an_h2c_pod_before_its_last_chunk_is_sent() {
    request_streams_to_the_pod(Protocol::H2, "h2c").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_reaches_the_client_as_the_pod_sends_it() {
    let (pod, _seen) = Pod::start(2).await;
    let running = proxy_to(&[pod.addr], &[]).await;
    within(LIMIT, "streamed download", async {
        let mut incoming = get_head(running.listen, "/drip").await.into_body();
        let first = within(
            STEP,
            "the first chunk, before the pod sends the last",
            next_data(&mut incoming),
        )
        .await;
        assert_eq!(first, "first");
        pod.release.notify_one();
        let rest = incoming.collect().await.unwrap().to_bytes();
        assert_eq!(rest, "last");
    })
    .await;
    running.shutdown().await;
}

/// The peak resident memory of process `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in {status}"))
}

/// The proxy binary in a process of its own, killed (by PID) when dropped.
#[derive(Debug)]
struct ChildProxy {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl ChildProxy {
    /// Starts it and waits for its "listening" line: `(proxy, listen, admin)`.
    async fn start(endpoint: SocketAddr) -> (Self, SocketAddr, SocketAddr) {
        let log = std::env::temp_dir().join(format!("ballast-mem-{}.log", std::process::id()));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_ballast-proxy"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--endpoints",
                &endpoint.to_string(),
                "--warmup",
                "0s",
                "--workers",
                "2",
                "--log-format",
                "json",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut this = Self { child, log };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(&this.log).unwrap_or_default();
            let listening = text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|l| l["fields"]["message"] == "ballast-proxy listening");
            if let Some(line) = listening {
                let address = |field: &str| -> SocketAddr {
                    line["fields"][field].as_str().unwrap().parse().unwrap()
                };
                let (listen, admin) = (address("listen"), address("admin"));
                wait_ready(admin).await;
                return (this, listen, admin);
            }
            if let Some(status) = this.child.try_wait().unwrap() {
                panic!("the proxy exited ({status}): {text}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the proxy never said where it listens: {text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ChildProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Uploads `size` bytes (Content-Length, sent in 64 KiB chunks) and checks the pod's
/// count.
async fn upload(
    sender: &mut hyper::client::conn::http1::SendRequest<PodBody>,
    size: usize,
) -> Duration {
    let started = std::time::Instant::now();
    let chunk = Bytes::from(vec![b'u'; CHUNK]);
    let mut left = size;
    let chunks = futures::stream::poll_fn(move |_| {
        let n = left.min(CHUNK);
        left -= n;
        std::task::Poll::Ready((n > 0).then(|| Ok(Frame::data(chunk.slice(..n)))))
    });
    let request = Request::post("/upload")
        .header("host", "t")
        .header("content-length", size)
        .body(StreamBody::new(chunks).boxed_unsync())
        .unwrap();
    sender.ready().await.unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let count = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(count, size.to_string(), "bytes the pod received");
    started.elapsed()
}

/// Downloads `size` bytes, counting them as they come.
async fn download(
    sender: &mut hyper::client::conn::http1::SendRequest<PodBody>,
    size: usize,
) -> Duration {
    let started = std::time::Instant::now();
    let request = Request::get(format!("/download/{size}"))
        .header("host", "t")
        .body(
            Full::new(Bytes::new())
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .unwrap();
    sender.ready().await.unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut count = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            count += data.len();
        }
    }
    assert_eq!(count, size, "bytes the client received");
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_uploads_and_downloads_keep_the_proxy_memory_flat() {
    const LARGE: usize = 256 * 1024 * 1024;
    const ALLOWED_GROWTH_KIB: u64 = 32 * 1024;
    let (pod, _seen) = Pod::start(2).await;
    let (proxy, listen, _admin) = ChildProxy::start(pod.addr).await;
    within(Duration::from_secs(300), "large transfers", async {
        let io = TokioIo::new(TcpStream::connect(listen).await.unwrap());
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        upload(&mut sender, 1024 * 1024).await;
        download(&mut sender, 1024 * 1024).await;
        let warm = peak_rss_kib(proxy.pid());
        let up = upload(&mut sender, LARGE).await;
        let after_upload = peak_rss_kib(proxy.pid());
        let down = download(&mut sender, LARGE).await;
        let after_download = peak_rss_kib(proxy.pid());
        eprintln!(
            "proxy peak RSS (VmHWM): {warm} KiB after 1 MiB each way, {after_upload} KiB after \
             a 256 MiB upload ({up:.1?}), {after_download} KiB after a 256 MiB download \
             ({down:.1?}); growth {} KiB",
            after_download - warm
        );
        assert!(
            after_download - warm < ALLOWED_GROWTH_KIB,
            "the proxy's peak memory grew by {} KiB moving 2 x 256 MiB: it holds bodies \
             instead of streaming them",
            after_download - warm
        );
    })
    .await;
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_body_is_retried_whole_after_a_reset_before_the_response() {
    let (broken, healthy) = broken_and_healthy().await;
    let running = proxy_to(
        &[broken.addr, healthy.addr],
        &["--algorithm", "round-robin"],
    )
    .await;
    within(LIMIT, "retries", async {
        let body = Bytes::from((0..1024).map(|i| (i % 251) as u8).collect::<Vec<_>>());
        let mut client = Client::connect(running.listen).await.unwrap();
        for i in 0..4 {
            let reply = client.post("/echo", body.clone()).await.unwrap();
            assert_eq!(
                reply.status,
                StatusCode::OK,
                "request {i}: {}",
                reply.text()
            );
            assert_eq!(reply.served_by(), Some(healthy.addr), "request {i}");
            assert_eq!(reply.body, body, "request {i}: the healthy pod got it all");
        }
        // The same with the body still arriving when the first pod is chosen: the head
        // goes out at once, and the retry replays what was kept and then the rest.
        for i in 0..4 {
            let (mut tx, response) = start_request(
                Protocol::Http1,
                running.listen,
                Request::post("/echo").header("host", "t"),
            )
            .await;
            let heads = broken.hits() + healthy.hits();
            tx.send(Ok(Frame::data(body.slice(..512)))).await.unwrap();
            // The rest is held back until the head has reached a pod.
            let (broken, healthy) = (&broken, &healthy);
            support::eventually("the head sent before the body ended", || async move {
                broken.hits() + healthy.hits() > heads
            })
            .await;
            tx.send(Ok(Frame::data(body.slice(512..)))).await.unwrap();
            drop(tx);
            let response = within(STEP, "response", response).await.unwrap().unwrap();
            assert_eq!(response.status(), StatusCode::OK, "streamed request {i}");
            let echoed = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(
                echoed, body,
                "streamed request {i}: the healthy pod got it all"
            );
        }
    })
    .await;
    assert!(
        broken.hits() >= 2,
        "round-robin sent some to the resetting pod: {}",
        broken.hits()
    );
    assert!(metric(running.admin, "ballast_retries_total").await >= broken.hits() as f64);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_retry_limit_is_not_retried_and_is_counted() {
    let (broken, healthy) = broken_and_healthy().await;
    let running = proxy_to(
        &[broken.addr, healthy.addr],
        &["--algorithm", "round-robin", "--retry-body-limit", "4096"],
    )
    .await;
    let big = Bytes::from(vec![b'x'; 64 * 1024]);
    let (mut sent, mut refused) = (0, 0);
    within(LIMIT, "large bodies", async {
        let mut client = Client::connect(running.listen).await.unwrap();
        for i in 0..4 {
            let before = (broken.hits(), healthy.hits());
            sent += 1;
            let reply = client
                .post("/echo", big.clone())
                .await
                .unwrap_or_else(|e| panic!("request {i}: the proxy cut the connection: {e}"));
            let pods = (&broken, &healthy);
            if assert_echoed_or_failed_once(
                &reply,
                pods,
                before,
                big.len(),
                &format!("request {i}"),
            ) {
                refused += 1;
            }
        }
    })
    .await;
    assert!(refused >= 1, "round-robin sent one to the resetting pod");
    let admin = running.admin;
    assert_eq!(
        metric(
            admin,
            "ballast_retries_skipped_total{reason=\"body-over-limit\"}"
        )
        .await,
        f64::from(refused)
    );
    assert_eq!(
        metric(admin, "ballast_retry_body_overflow_total").await,
        f64::from(sent),
        "every body outgrew the 4 KiB copy"
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_trailers_cross_http2_both_hops() {
    let (pod, _seen) = Pod::start(2).await;
    let running = proxy_to(&[pod.addr], &["--backend-protocol", "h2c"]).await;
    within(LIMIT, "response trailers", async {
        let uri = format!("http://{}/trailers", running.listen);
        let (body, response) = start_request(
            Protocol::H2,
            running.listen,
            Request::get(uri).header("te", "trailers"),
        )
        .await;
        drop(body);
        let response = within(STEP, "response", response).await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let collected = response.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        assert_eq!(collected.to_bytes(), "got 0 bytes");
        assert_eq!(
            trailers.as_ref().and_then(|t| t.get("x-body-length")),
            Some(&"0".parse().unwrap()),
            "{trailers:?}"
        );
    })
    .await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_trailers_reach_an_h2c_pod() {
    let (pod, mut seen) = Pod::start(2).await;
    let running = proxy_to(&[pod.addr], &["--backend-protocol", "h2c"]).await;
    within(LIMIT, "request trailers", async {
        let uri = format!("http://{}/observe", running.listen);
        let (mut body, response) = start_request(
            Protocol::H2,
            running.listen,
            Request::post(uri).header("te", "trailers"),
        )
        .await;
        body.send(Ok(Frame::data(Bytes::from("payload"))))
            .await
            .unwrap();
        let mut end = HeaderMap::new();
        end.insert("x-checksum", "c0ffee".parse().unwrap());
        body.send(Ok(Frame::trailers(end.clone()))).await.unwrap();
        drop(body);
        let response = within(STEP, "response", response).await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.into_body().collect().await.unwrap().to_bytes(),
            "payload"
        );
        let mut events = Vec::new();
        loop {
            let event = next_seen(&mut seen, "the rest of the request").await;
            let done = event == Seen::End;
            events.push(event);
            if done {
                break;
            }
        }
        assert!(
            events.contains(&Seen::Trailers(end)),
            "the pod got the trailers: {events:?}"
        );
    })
    .await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_gets_its_interim_answer_before_the_body_is_sent() {
    let pod = Backend::start(2, Behaviour::default()).await;
    let running = proxy_to(&[pod.addr], &[]).await;
    let body = vec![b'e'; 100 * 1024];
    within(LIMIT, "expect 100-continue", async {
        let mut stream = TcpStream::connect(running.listen).await.unwrap();
        let head = format!(
            "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\
             Expect: 100-continue\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut interim = Vec::new();
        within(STEP, "100 Continue, before any body byte is sent", async {
            let mut byte = [0u8; 1];
            while !interim.ends_with(b"\r\n\r\n") {
                assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "closed early");
                interim.push(byte[0]);
            }
        })
        .await;
        let interim = String::from_utf8_lossy(&interim);
        assert!(
            interim.starts_with("HTTP/1.1 100 Continue\r\n"),
            "{interim}"
        );
        stream.write_all(&body).await.unwrap();
        let mut answer = Vec::new();
        within(STEP, "the answer", stream.read_to_end(&mut answer))
            .await
            .unwrap();
        let split = answer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a response head");
        let head = String::from_utf8_lossy(&answer[..split]);
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        assert_eq!(&answer[split + 4..], body, "the echoed body");
    })
    .await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_retry_limit_still_moves_on_after_a_connect_failure() {
    // Nothing of the body was sent to a pod that could not be reached.
    let gone = std::net::TcpListener::bind("127.0.0.2:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let healthy = Backend::start(3, Behaviour::default()).await;
    let running = proxy_to(
        &[gone, healthy.addr],
        &["--algorithm", "round-robin", "--retry-body-limit", "4096"],
    )
    .await;
    let big = Bytes::from(vec![b'x'; 64 * 1024]);
    within(LIMIT, "large bodies", async {
        let mut client = Client::connect(running.listen).await.unwrap();
        for i in 0..4 {
            let reply = client.post("/echo", big.clone()).await.unwrap();
            assert_eq!(
                reply.status,
                StatusCode::OK,
                "request {i}: {}",
                reply.text()
            );
            assert_eq!(reply.body, big, "request {i}");
        }
    })
    .await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_exchange_silent_past_the_idle_limit_is_cut() {
    let (pod, _seen) = Pod::start(2).await;
    let delayed = Backend::start(3, Behaviour::default()).await;
    let running = proxy_to(&[pod.addr], &["--stream-idle-timeout", "1s"]).await;
    within(LIMIT, "idle HTTP exchange", async {
        // After the head: the response is aborted, not left hanging for the pod's minute.
        let response = get_head(running.listen, "/hold").await;
        assert_eq!(response.status(), StatusCode::OK);
        let mut incoming = response.into_body();
        assert_eq!(next_data(&mut incoming).await, "first");
        let rest = within(STEP, "the idle cut", incoming.collect()).await;
        assert!(rest.is_err(), "the response is aborted: {rest:?}");
    })
    .await;
    running.shutdown().await;

    // Before the head: 504.
    let running = proxy_to(&[delayed.addr], &["--stream-idle-timeout", "1s"]).await;
    let mut client = Client::connect(running.listen).await.unwrap();
    let reply = within(STEP, "the idle cut", client.get("/delay/30000"))
        .await
        .unwrap();
    assert_eq!(
        reply.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        reply.text()
    );
    assert_eq!(reply.headers["x-ballast-error"], "upstream-timeout");
    assert_eq!(stream_timeouts(running.admin, "idle").await, 1.0);
    running.shutdown().await;
}
