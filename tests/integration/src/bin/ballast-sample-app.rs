//! `ballast-sample-app`: the backend that stands in for a user's app pod in
//! integration tests and demos.
//!
//! It serves HTTP/1.1 (keep-alive) and HTTP/2 prior knowledge (h2c) on one
//! port, stamps every response with `x-served-by: <pod>`, echoes
//! `x-request-id`, answers a small JSON document on every path (counting a
//! request body as it streams in, without keeping it), streams N bytes on
//! `GET /download?bytes=N`, echoes WebSocket messages on `GET /ws`, answers
//! gRPC calls over h2c on the same port (the standard health service and a
//! demo echo service: see `grpc.rs`), and shuts down either naively (exit on
//! SIGTERM, dropping connections) or gracefully (fail `/healthz` and the gRPC
//! health check, stop accepting, finish in-flight requests).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use ballast_api::settings::LogFormat;
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tracing::{debug, info, warn};

// Next to this file rather than in `src/bin/`, where cargo would take it for a
// binary of its own.
#[path = "ballast-sample-app/grpc.rs"]
mod grpc;

const SERVED_BY: &str = "x-served-by";
const REQUEST_ID: &str = "x-request-id";
/// Size of the chunks `/download` sends.
const DOWNLOAD_CHUNK: usize = 64 * 1024;

/// What the app does on SIGTERM (or SIGINT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ShutdownMode {
    /// Exit at once with status 0, dropping every open connection.
    Naive,
    /// Fail `/healthz`, stop accepting, finish in-flight requests, exit 0.
    Graceful,
}

#[derive(Debug, Parser)]
#[command(
    name = "ballast-sample-app",
    about = "Sample backend pod for ballast tests and demos"
)]
struct Args {
    /// Address to listen on; port 0 picks a free port. The bound address is printed on
    /// stdout (`listening on ADDR`), or with `--log-format json` only in the `listening`
    /// log line (`addr`), so that everything the app writes is JSON.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Pod name reported in `x-served-by` and the JSON body (default: the bound address).
    #[arg(long, env = "POD_NAME")]
    pod: Option<String>,
    /// Latency added to every non-health request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Answer this share of catch-all requests (percent) with 500, as a broken release
    /// would, spread evenly (50: every other request) rather than in bursts.
    #[arg(long, env = "FAIL_PERCENT", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    fail_percent: u8,
    /// Behaviour on SIGTERM.
    #[arg(long, value_enum, default_value_t = ShutdownMode::Naive)]
    shutdown: ShutdownMode,
    /// File created (containing the bound address) once listening, removed on shutdown.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Log format on stderr: text (coloured only on a terminal) or json (one object per
    /// line, for a cluster's log pipeline).
    #[arg(long, env = "BALLAST_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
}

#[derive(Debug)]
struct State {
    pod: String,
    served_by: HeaderValue,
    latency: Duration,
    fail_percent: u8,
    requests: AtomicU64,
    shutting_down: AtomicBool,
}

type Body = Full<Bytes>;
/// An HTTP route's body: a whole one, or `/download`'s stream.
type HttpBody = Either<Body, Download>;
/// What a connection answers with: an HTTP route's body or a gRPC call's.
type AnyBody = Either<HttpBody, grpc::GrpcBody>;

/// `/download`'s body: `remaining` bytes, sent as slices of one shared chunk.
#[derive(Debug)]
struct Download {
    remaining: u64,
    chunk: Bytes,
}

impl hyper::body::Body for Download {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let len =
            usize::try_from(self.remaining).map_or(self.chunk.len(), |r| r.min(self.chunk.len()));
        self.remaining -= len as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..len)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args = Args::parse();
    ballast_process::init_logging(args.log_format);
    let listener = TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    let pod = args.pod.clone().unwrap_or_else(|| addr.to_string());
    let state = Arc::new(State {
        served_by: HeaderValue::from_str(&pod)?,
        pod,
        latency: Duration::from_millis(args.latency_ms),
        fail_percent: args.fail_percent,
        requests: AtomicU64::new(0),
        shutting_down: AtomicBool::new(false),
    });

    if let Some(path) = &args.ready_file {
        std::fs::write(path, format!("{addr}\n"))?;
    }
    if args.log_format == LogFormat::Text {
        println!("listening on {addr}");
    }
    info!(%addr, pod = %state.pod, mode = ?args.shutdown, "listening");

    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let shutdown = ballast_process::shutdown_signal();
    tokio::pin!(shutdown);

    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        debug!(%peer, "accepted");
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        let service = hyper::service::service_fn(move |req| handle(Arc::clone(&state), req));
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                debug!(%peer, error = %err, "connection ended with error");
            }
        });
    }

    if let Some(path) = &args.ready_file {
        let _ = std::fs::remove_file(path);
    }
    match args.shutdown {
        ShutdownMode::Naive => {
            info!("SIGTERM: exiting immediately (naive shutdown)");
            std::process::exit(0);
        }
        ShutdownMode::Graceful => {
            info!("SIGTERM: failing /healthz, draining in-flight requests");
            state.shutting_down.store(true, Ordering::SeqCst);
            drop(listener);
            graceful.shutdown().await;
            info!("drained, exiting");
        }
    }
    Ok(())
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<AnyBody>, Infallible> {
    let request_id = req.headers().get(REQUEST_ID).cloned();
    let mut resp = if grpc::is_grpc(&req) {
        grpc::serve(Arc::clone(&state), req)
            .await
            .map(Either::Right)
    } else {
        route(&state, req).await.map(Either::Left)
    };
    let headers = resp.headers_mut();
    headers.insert(SERVED_BY, state.served_by.clone());
    if let Some(id) = request_id {
        headers.insert(REQUEST_ID, id);
    }
    Ok(resp)
}

async fn route(state: &State, req: Request<Incoming>) -> Response<HttpBody> {
    if req.uri().path() == "/healthz" && req.method() == Method::GET {
        return if state.shutting_down.load(Ordering::SeqCst) {
            text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
        } else {
            text(StatusCode::OK, "ok")
        }
        .map(Either::Left);
    }
    if req.uri().path() == "/ws" && req.method() == Method::GET && is_websocket_upgrade(&req) {
        return websocket(req).map(Either::Left);
    }
    if req.uri().path() == "/download" && req.method() == Method::GET {
        return download(state, &req);
    }
    app(state, req).await.map(Either::Left)
}

/// `GET /download?bytes=N`: N bytes (default 1 MiB) streamed in 64 KiB chunks, with
/// a `content-length`; a source for download benchmarks.
fn download(state: &State, req: &Request<Incoming>) -> Response<HttpBody> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let mut bytes = 1024 * 1024;
    for (key, value) in req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
    {
        if key == "bytes" {
            match value.parse::<u64>() {
                Ok(n) => bytes = n,
                Err(_) => {
                    return text(StatusCode::BAD_REQUEST, "bytes must be an integer\n")
                        .map(Either::Left);
                }
            }
        }
    }
    let mut resp = Response::new(Either::Right(Download {
        remaining: bytes,
        chunk: Bytes::from(vec![b'x'; DOWNLOAD_CHUNK]),
    }));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    resp
}

/// The catch-all route: optional delay, optional status, JSON description.
async fn app(state: &State, req: Request<Incoming>) -> Response<Body> {
    let count = state.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let method = req.method().clone();
    let path = req.uri().path().to_owned();

    let mut delay = state.latency;
    let fail = u64::from(state.fail_percent);
    let mut status = if (count * fail) % 100 < fail {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    for (key, value) in req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
    {
        match key {
            "delay_ms" => match value.parse::<u64>() {
                Ok(ms) => delay = Duration::from_millis(ms),
                Err(_) => return text(StatusCode::BAD_REQUEST, "delay_ms must be an integer\n"),
            },
            "status" => match value
                .parse::<u16>()
                .ok()
                .and_then(|s| StatusCode::from_u16(s).ok())
            {
                Some(s) => status = s,
                None => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        "status must be a valid status code\n",
                    );
                }
            },
            _ => {}
        }
    }

    // Read the body fully whatever the method, so the connection stays usable; count
    // it frame by frame without keeping it (an upload sink for benchmarks, too).
    let mut body = req.into_body();
    let mut body_bytes = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => body_bytes += frame.data_ref().map_or(0, |data| data.len() as u64),
            Err(err) => {
                debug!(error = %err, "reading request body failed");
                return text(StatusCode::BAD_REQUEST, "could not read body\n");
            }
        }
    }

    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }

    let mut doc = serde_json::json!({
        "pod": state.pod,
        "path": path,
        "method": method.as_str(),
        "requests": count,
    });
    if method == Method::POST || method == Method::PUT {
        doc["body_bytes"] = serde_json::json!(body_bytes);
    }
    let mut body = doc.to_string();
    body.push('\n');
    debug!(%method, %path, %status, "served");
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

fn header_has_token(req: &Request<Incoming>, name: header::HeaderName, token: &str) -> bool {
    req.headers().get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

fn is_websocket_upgrade(req: &Request<Incoming>) -> bool {
    header_has_token(req, header::CONNECTION, "upgrade")
        && header_has_token(req, header::UPGRADE, "websocket")
        && req.headers().contains_key(header::SEC_WEBSOCKET_KEY)
}

/// Answers the upgrade with 101 and echoes messages on the upgraded stream.
fn websocket(mut req: Request<Incoming>) -> Response<Body> {
    if req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        let mut resp = text(
            StatusCode::UPGRADE_REQUIRED,
            "websocket version 13 required\n",
        );
        resp.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return resp;
    }
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
        return text(StatusCode::BAD_REQUEST, "missing sec-websocket-key\n");
    };
    let accept = derive_accept_key(key.as_bytes());
    let Ok(accept) = HeaderValue::from_str(&accept) else {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "bad accept key\n");
    };

    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(err) => {
                warn!(error = %err, "websocket upgrade failed");
                return;
            }
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        debug!("websocket open");
        while let Some(msg) = ws.next().await {
            let msg = match msg {
                Ok(msg) => msg,
                Err(err) => {
                    debug!(error = %err, "websocket read failed");
                    return;
                }
            };
            match msg {
                Message::Text(_) | Message::Binary(_) => {
                    if let Err(err) = ws.send(msg).await {
                        debug!(error = %err, "websocket write failed");
                        return;
                    }
                }
                // Pings are answered and closes acknowledged by tungstenite itself.
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
        // Flush the close acknowledgement, if any.
        let _ = ws.close(None).await;
        debug!("websocket closed");
    });

    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = resp.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    resp
}
