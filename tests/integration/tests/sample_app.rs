//! Tests for the `ballast-sample-app` binary: the backend every other
//! integration test puts behind the proxy.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use std::convert::Infallible;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Body as _, Frame};
use hyper::header::HeaderMap;
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;

const TEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A running sample app; killed (SIGKILL by PID) and reaped on drop.
#[derive(Debug)]
struct App {
    child: Child,
    addr: SocketAddr,
}

impl App {
    /// Starts the app on 127.0.0.2 with a free port and waits for `listening on`.
    async fn start(args: &[&str], envs: &[(&str, &str)]) -> App {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ballast-sample-app"));
        cmd.args(["--listen", "127.0.0.2:0"])
            .args(args)
            .env_remove("POD_NAME")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn ballast-sample-app");
        let stdout = child.stdout.take().expect("piped stdout");
        // Build the guard before waiting so the process is killed even if we panic.
        let mut app = App {
            child,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(stdout).lines();
            let first = lines.next().and_then(Result::ok);
            let _ = tx.send(first);
            // Keep draining so the app never blocks on a full pipe.
            for _ in lines {}
        });
        let line = timeout(Duration::from_secs(10), rx)
            .await
            .expect("app did not print `listening on` within 10s")
            .expect("stdout reader thread died")
            .expect("app exited before printing `listening on`");
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"));
        app.addr = addr.parse().expect("listening address");
        assert_eq!(app.addr.ip().to_string(), "127.0.0.2");
        assert_ne!(app.addr.port(), 0);
        app
    }

    fn sigterm(&self) {
        let pid = self.child.id();
        if let Err(e) = ballast_integration::sigterm(pid) {
            panic!("SIGTERM to {pid}: {e}");
        }
    }

    /// Waits until the app has taken `n` requests besides the polls themselves (the
    /// `requests` count its catch-all route reports): a request is in its handler once
    /// counted. Panics after `within`.
    async fn wait_requests(&self, n: u64, within: Duration) {
        let deadline = Instant::now() + within;
        let mut polls = 0;
        loop {
            let (_, body) = get(self.addr, "/").await;
            polls += 1;
            let doc: serde_json::Value = serde_json::from_slice(&body).expect("JSON body");
            let count = doc["requests"].as_u64().expect("requests count");
            if count >= n + polls {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} requests reached the app within {within:?}",
                count - polls
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Polls until the process exits or `within` elapses.
    async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        // Child::kill sends SIGKILL to this child's PID only.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Sender1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;
type Sender2 = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

async fn connect_h1(addr: SocketAddr) -> Sender1 {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http1 handshake");
    tokio::spawn(conn);
    sender
}

async fn connect_h2(addr: SocketAddr) -> Sender2 {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("http2 handshake");
    tokio::spawn(conn);
    sender
}

fn request(addr: SocketAddr, method: Method, path: &str, body: Bytes) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Full::new(body))
        .expect("request")
}

async fn body_of(resp: Response<hyper::body::Incoming>) -> (Response<()>, Bytes) {
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.expect("read body").to_bytes();
    (Response::from_parts(parts, ()), bytes)
}

async fn get(addr: SocketAddr, path: &str) -> (Response<()>, Bytes) {
    let mut sender = connect_h1(addr).await;
    let resp = sender
        .send_request(request(addr, Method::GET, path, Bytes::new()))
        .await
        .expect("send request");
    body_of(resp).await
}

fn header<'a>(resp: &'a Response<()>, name: &str) -> &'a str {
    resp.headers()
        .get(name)
        .unwrap_or_else(|| panic!("missing header {name}"))
        .to_str()
        .expect("ascii header")
}

fn json(body: &Bytes) -> serde_json::Value {
    serde_json::from_slice(body).expect("json body")
}

// gRPC, written out by hand from the gRPC over HTTP/2 spec and the protobuf
// encoding rather than shared with the app, so a mistake on one side is not
// mirrored on the other.

const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
const ECHO_UNARY: &str = "/ballast.demo.v1.Echo/Unary";
const ECHO_STREAM: &str = "/ballast.demo.v1.Echo/Stream";

/// A length-prefixed gRPC message: uncompressed flag, 4-byte big-endian length.
fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let len = u32::try_from(message.len()).expect("small message");
    let mut framed = vec![0];
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    framed
}

/// Protobuf string field `field` (wire type 2), for values under 128 bytes.
fn proto_string(field: u8, value: &str) -> Vec<u8> {
    let len = u8::try_from(value.len()).expect("short value");
    assert!(len < 0x80, "one-byte length only");
    let mut out = vec![(field << 3) | 2, len];
    out.extend_from_slice(value.as_bytes());
    out
}

/// A gRPC call as grpc-go and the kubelet send it.
fn grpc_request<B>(addr: SocketAddr, path: &str, body: B) -> Request<B> {
    Request::builder()
        .method(Method::POST)
        .uri(format!("http://{addr}{path}"))
        .header(hyper::header::CONTENT_TYPE, "application/grpc")
        .header(hyper::header::TE, "trailers")
        .body(body)
        .expect("grpc request")
}

/// A finished unary call: response head, the DATA bytes, the trailers.
struct GrpcReply {
    head: Response<()>,
    /// The stream ended with the response HEADERS frame (gRPC's Trailers-Only).
    ended_with_headers: bool,
    data: Bytes,
    trailers: Option<HeaderMap>,
}

impl GrpcReply {
    /// `grpc-status`: from the trailers, or from the headers of a
    /// Trailers-Only answer (then there must be no trailers and no data).
    fn status(&self) -> &str {
        match &self.trailers {
            Some(trailers) => trailers.get("grpc-status"),
            None => {
                // grpc-go reads the status from the headers only when they end
                // the stream; otherwise the call fails for lack of trailers.
                assert!(
                    self.ended_with_headers,
                    "stream ended without trailers after HEADERS"
                );
                assert!(self.data.is_empty(), "data without trailers");
                self.head.headers().get("grpc-status")
            }
        }
        .expect("grpc-status sent")
        .to_str()
        .expect("ascii grpc-status")
    }
}

async fn grpc_unary(
    sender: &mut Sender2,
    addr: SocketAddr,
    path: &str,
    message: &[u8],
) -> GrpcReply {
    let req = grpc_request(addr, path, Full::new(Bytes::from(grpc_frame(message))));
    let resp = sender.send_request(req).await.expect("grpc call");
    let (parts, body) = resp.into_parts();
    let ended_with_headers = body.is_end_stream();
    let collected = body.collect().await.expect("read grpc body");
    let trailers = collected.trailers().cloned();
    GrpcReply {
        head: Response::from_parts(parts, ()),
        ended_with_headers,
        data: collected.to_bytes(),
        trailers,
    }
}

#[tokio::test]
async fn healthz_served_by_and_request_id() {
    timeout(TEST_TIMEOUT, async {
        let app = App::start(&[], &[]).await;
        let addr = app.addr;

        let (resp, body) = get(addr, "/healthz").await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(&body[..], b"ok");
        // The pod name defaults to the bound address.
        assert_eq!(header(&resp, "x-served-by"), addr.to_string());

        // Two requests on one keep-alive connection; the counter goes up and
        // x-request-id is echoed.
        let mut sender = connect_h1(addr).await;
        for n in 1..=2u64 {
            let mut req = request(addr, Method::GET, "/some/path?x=1", Bytes::new());
            req.headers_mut()
                .insert("x-request-id", format!("req-{n}").parse().expect("value"));
            let resp = sender.send_request(req).await.expect("send request");
            let (resp, body) = body_of(resp).await;
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(header(&resp, "x-request-id"), format!("req-{n}"));
            assert_eq!(header(&resp, "x-served-by"), addr.to_string());
            let doc = json(&body);
            assert_eq!(doc["pod"], addr.to_string());
            assert_eq!(doc["path"], "/some/path");
            assert_eq!(doc["method"], "GET");
            assert_eq!(doc["requests"], n);
            assert!(doc.get("body_bytes").is_none());
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn pod_name_from_env() {
    timeout(TEST_TIMEOUT, async {
        let app = App::start(&[], &[("POD_NAME", "web-7f9c-abcde")]).await;
        let (resp, body) = get(app.addr, "/").await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp, "x-served-by"), "web-7f9c-abcde");
        assert_eq!(json(&body)["pod"], "web-7f9c-abcde");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn status_override() {
    timeout(TEST_TIMEOUT, async {
        let app = App::start(&["--pod", "p1"], &[]).await;
        let (resp, body) = get(app.addr, "/fail?status=503").await;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(header(&resp, "x-served-by"), "p1");
        assert_eq!(json(&body)["path"], "/fail");

        let (resp, _) = get(app.addr, "/?status=abc").await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(header(&resp, "x-served-by"), "p1");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn delay_and_latency() {
    timeout(TEST_TIMEOUT, async {
        let app = App::start(&["--latency-ms", "150"], &[]).await;

        let start = Instant::now();
        let (resp, _) = get(app.addr, "/?delay_ms=200").await;
        let took = start.elapsed();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(took >= Duration::from_millis(200), "took {took:?}");

        let start = Instant::now();
        let (resp, _) = get(app.addr, "/").await;
        let took = start.elapsed();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(took >= Duration::from_millis(150), "took {took:?}");

        // Health checks are never delayed.
        let start = Instant::now();
        let (resp, _) = get(app.addr, "/healthz").await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(start.elapsed() < Duration::from_millis(150));
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn post_body_bytes() {
    timeout(TEST_TIMEOUT, async {
        let app = App::start(&[], &[]).await;
        let mut sender = connect_h1(app.addr).await;
        for method in [Method::POST, Method::PUT] {
            let req = request(
                app.addr,
                method.clone(),
                "/upload",
                Bytes::from(vec![7u8; 12345]),
            );
            let resp = sender.send_request(req).await.expect("send request");
            let (resp, body) = body_of(resp).await;
            assert_eq!(resp.status(), StatusCode::OK);
            let doc = json(&body);
            assert_eq!(doc["method"], method.as_str());
            assert_eq!(doc["body_bytes"], 12345);
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn h2c_prior_knowledge() {
    timeout(TEST_TIMEOUT, async {
        let app = App::start(&["--pod", "h2pod"], &[]).await;
        let mut sender = connect_h2(app.addr).await;
        let uri = format!("http://{}/h2?status=202", app.addr);
        // Several concurrent streams on one connection.
        let mut pending = Vec::new();
        for _ in 0..3 {
            let req = Request::builder()
                .uri(uri.as_str())
                .body(Full::new(Bytes::new()))
                .expect("request");
            pending.push(sender.send_request(req));
        }
        for fut in pending {
            let (resp, body) = body_of(fut.await.expect("h2 request")).await;
            assert_eq!(resp.version(), Version::HTTP_2);
            assert_eq!(resp.status(), StatusCode::ACCEPTED);
            assert_eq!(header(&resp, "x-served-by"), "h2pod");
            assert_eq!(json(&body)["path"], "/h2");
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn grpc_health_check_over_h2c() {
    timeout(TEST_TIMEOUT, async {
        let app = App::start(&["--pod", "grpcpod"], &[]).await;
        let mut sender = connect_h2(app.addr).await;

        // What the kubelet's `grpc` probe sends: HealthCheckRequest{service: ""},
        // which protobuf encodes as an empty message.
        let reply = grpc_unary(&mut sender, app.addr, HEALTH_CHECK, b"").await;
        assert_eq!(reply.head.status(), StatusCode::OK);
        assert_eq!(reply.head.version(), Version::HTTP_2);
        assert_eq!(header(&reply.head, "content-type"), "application/grpc");
        assert_eq!(header(&reply.head, "x-served-by"), "grpcpod");
        // HealthCheckResponse{status: SERVING (1)}: field 1, varint.
        assert_eq!(reply.data, grpc_frame(&[0x08, 0x01]));
        assert_eq!(reply.status(), "0");

        // The demo service by name is serving too.
        let named = proto_string(1, "ballast.demo.v1.Echo");
        let reply = grpc_unary(&mut sender, app.addr, HEALTH_CHECK, &named).await;
        assert_eq!(reply.data, grpc_frame(&[0x08, 0x01]));
        assert_eq!(reply.status(), "0");

        // An unknown service is NOT_FOUND (5), an unknown method UNIMPLEMENTED
        // (12): both Trailers-Only, still HTTP 200.
        let unknown = proto_string(1, "no.such.Service");
        let reply = grpc_unary(&mut sender, app.addr, HEALTH_CHECK, &unknown).await;
        assert_eq!(reply.head.status(), StatusCode::OK);
        assert_eq!(reply.status(), "5");
        let reply = grpc_unary(&mut sender, app.addr, "/grpc.health.v1.Health/Watch", b"").await;
        assert_eq!(reply.status(), "12");

        // Not protobuf: INTERNAL (13), as gRPC servers answer an unparsable message.
        let reply = grpc_unary(&mut sender, app.addr, HEALTH_CHECK, &[0x0a, 9]).await;
        assert_eq!(reply.status(), "13");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn grpc_unary_echo_names_the_pod() {
    timeout(TEST_TIMEOUT, async {
        let app = App::start(&["--pod", "grpcpod"], &[]).await;
        let mut sender = connect_h2(app.addr).await;
        let request = proto_string(1, "hello");
        let reply = grpc_unary(&mut sender, app.addr, ECHO_UNARY, &request).await;
        assert_eq!(reply.status(), "0");
        // EchoReply{message: "hello", pod: "grpcpod"}.
        let expected = [proto_string(1, "hello"), proto_string(2, "grpcpod")].concat();
        assert_eq!(reply.data, grpc_frame(&expected));

        // Plain HTTP on the same connection still reaches the JSON route.
        let req = Request::builder()
            .uri(format!("http://{}/after-grpc", app.addr))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let (resp, body) = body_of(sender.send_request(req).await.expect("h2 request")).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(json(&body)["path"], "/after-grpc");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn grpc_stream_echo_replies_while_the_client_sends() {
    timeout(TEST_TIMEOUT, async {
        let app = App::start(&["--pod", "grpcpod"], &[]).await;
        let stream = TcpStream::connect(app.addr).await.expect("connect");
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("http2 handshake");
        tokio::spawn(conn);

        // The request body stays open while replies are read: each reply must
        // arrive before the next request message is sent.
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        let frames = futures::stream::unfold(rx, |mut rx| async move {
            let data = rx.recv().await?;
            Some((Ok::<_, Infallible>(Frame::data(data)), rx))
        });
        let req = grpc_request(app.addr, ECHO_STREAM, StreamBody::new(Box::pin(frames)));
        let resp = sender.send_request(req).await.expect("grpc stream");
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();

        for message in ["one", "two", "three"] {
            tx.send(Bytes::from(grpc_frame(&proto_string(1, message))))
                .await
                .expect("send request message");
            let expected =
                grpc_frame(&[proto_string(1, message), proto_string(2, "grpcpod")].concat());
            let mut received = Vec::new();
            while received.len() < expected.len() {
                let frame = body
                    .frame()
                    .await
                    .expect("reply before the stream ends")
                    .expect("read reply");
                match frame.into_data() {
                    Ok(data) => received.extend_from_slice(&data),
                    Err(frame) => panic!("trailers before the reply: {:?}", frame.trailers_ref()),
                }
            }
            assert_eq!(received, expected, "reply to {message:?}");
        }

        // Half-close: the server ends with grpc-status 0 in the trailers.
        drop(tx);
        let frame = body
            .frame()
            .await
            .expect("trailers")
            .expect("read trailers");
        let trailers = frame.into_trailers().expect("trailers, not more data");
        assert_eq!(
            trailers.get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"0"[..])
        );
        assert!(body.frame().await.is_none(), "nothing after the trailers");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn websocket_echo() {
    timeout(TEST_TIMEOUT, async {
        let app = App::start(&["--pod", "wspod"], &[]).await;
        let stream = TcpStream::connect(app.addr).await.expect("connect");
        let (mut ws, resp) =
            tokio_tungstenite::client_async(format!("ws://{}/ws", app.addr), stream)
                .await
                .expect("websocket handshake");
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(
            resp.headers()
                .get("x-served-by")
                .and_then(|v| v.to_str().ok()),
            Some("wspod")
        );

        for i in 0..3 {
            let text = format!("hello {i}");
            ws.send(Message::text(text.clone()))
                .await
                .expect("send text");
            let echoed = ws.next().await.expect("stream open").expect("read");
            assert_eq!(echoed, Message::text(text));
        }
        let payload = Bytes::from_static(&[0, 1, 2, 255]);
        ws.send(Message::binary(payload.clone()))
            .await
            .expect("send binary");
        let echoed = ws.next().await.expect("stream open").expect("read");
        assert_eq!(echoed, Message::binary(payload));

        ws.close(None).await.expect("close");
        // The server acknowledges the close and ends the stream.
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Close(_)) => {}
                Ok(other) => panic!("unexpected message after close: {other:?}"),
                Err(_) => break,
            }
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn naive_sigterm_drops_in_flight_request() {
    timeout(TEST_TIMEOUT, async {
        let mut app = App::start(&["--shutdown", "naive"], &[]).await;
        let mut sender = connect_h1(app.addr).await;
        let slow = tokio::spawn(sender.send_request(request(
            app.addr,
            Method::GET,
            "/?delay_ms=10000",
            Bytes::new(),
        )));
        app.wait_requests(1, Duration::from_secs(5)).await;
        app.sigterm();

        let result = timeout(Duration::from_secs(5), slow)
            .await
            .expect("in-flight request should fail promptly")
            .expect("join");
        assert!(
            result.is_err(),
            "request unexpectedly succeeded: {result:?}"
        );

        let status = app
            .wait_exit(Duration::from_secs(5))
            .await
            .expect("app exited");
        assert!(status.success(), "exit status {status}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn graceful_sigterm_finishes_in_flight_request() {
    timeout(TEST_TIMEOUT, async {
        let ready: PathBuf = std::env::temp_dir().join(format!(
            "ballast-sample-app-ready-{}-{}",
            std::process::id(),
            line!()
        ));
        let ready_arg = ready.to_str().expect("utf-8 temp path").to_owned();
        let mut app =
            App::start(&["--shutdown", "graceful", "--ready-file", &ready_arg], &[]).await;
        let contents = std::fs::read_to_string(&ready).expect("ready file written");
        assert_eq!(contents.trim(), app.addr.to_string());

        let mut sender = connect_h1(app.addr).await;
        let slow = tokio::spawn(sender.send_request(request(
            app.addr,
            Method::GET,
            "/?delay_ms=800",
            Bytes::new(),
        )));
        app.wait_requests(1, Duration::from_secs(5)).await;
        app.sigterm();

        let resp = timeout(Duration::from_secs(5), slow)
            .await
            .expect("in-flight request should finish")
            .expect("join")
            .expect("in-flight request completes during graceful shutdown");
        let (resp, _) = body_of(resp).await;
        assert_eq!(resp.status(), StatusCode::OK);

        let status = app
            .wait_exit(Duration::from_secs(5))
            .await
            .expect("app exited");
        assert!(status.success(), "exit status {status}");
        assert!(!ready.exists(), "ready file removed on shutdown");
        assert!(
            TcpStream::connect(app.addr).await.is_err(),
            "no longer accepting"
        );
    })
    .await
    .expect("test timed out");
}
