//! Tests for the `ballast-sample-app` binary: the backend every other
//! integration test puts behind the proxy.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
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

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed: {status}");
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
        tokio::time::sleep(Duration::from_millis(300)).await;
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
        tokio::time::sleep(Duration::from_millis(200)).await;
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
