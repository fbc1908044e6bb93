//! gRPC over loopback with no code generation: messages are raw bytes (a pass-through
//! codec), the "pod" is tonic's server-side call handling served by hyper's HTTP/2
//! server, and the client is tonic's `Channel`.
//!
//! The backend can pace itself on its peer: a client-streaming or bidi call records how
//! many messages it has received (`received`), and a server-streaming call sends a reply
//! only once the client has reported (`client_saw`) that it holds all but the last
//! [`WINDOW`] of the earlier ones. A proxy that holds messages back then fails the test
//! with a message instead of merely making it slower.

use ballast_proxy::server::Running;
use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use http::uri::PathAndQuery;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::{Status, Streaming};

/// Echoes its request message.
pub const UNARY: &str = "/ballast.test.Echo/Unary";
/// The request is a count `n` in ASCII; replies `s0`..`s{n-1}`, paced on `client_saw`.
pub const SERVER_STREAM: &str = "/ballast.test.Echo/ServerStream";
/// Replies once, with every message received joined by `\n`.
pub const CLIENT_STREAM: &str = "/ballast.test.Echo/ClientStream";
/// Echoes every message as it arrives.
pub const BIDI: &str = "/ballast.test.Echo/Bidi";
/// Sends one reply at once, the second after [`GrpcBehaviour::stall`], then ends OK.
pub const STALL: &str = "/ballast.test.Echo/Stall";

/// The request is `count,interval_ms`; replies `t0`..`t{count-1}`, one per interval.
pub const TICK: &str = "/ballast.test.Echo/Tick";

/// How many messages a peer may be ahead of the other.
pub const WINDOW: u64 = 16;
/// How long one message may take through the proxy before a test calls it held back.
pub const MESSAGE_LIMIT: Duration = Duration::from_secs(5);

pub use super::raw_codec::RawCodec;

/// How a gRPC backend answers.
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcBehaviour {
    /// Before a unary reply (so before the response head).
    pub delay: Duration,
    /// Between the two replies of [`STALL`].
    pub stall: Duration,
}

impl GrpcBehaviour {
    /// Answers unary calls only after `delay` (a slow pod).
    pub fn answering_after(delay: Duration) -> Self {
        Self {
            delay,
            ..Self::default()
        }
    }

    /// Stays silent for `stall` between the two replies of [`STALL`].
    pub fn stalling_for(stall: Duration) -> Self {
        Self {
            stall,
            ..Self::default()
        }
    }
}

/// The proxy in front of the gRPC `pods` (h2c to them), with `extra` flags.
pub async fn grpc_proxy(pods: &[SocketAddr], extra: &[&str]) -> Running {
    let mut args = vec!["--backend-protocol", "h2c"];
    args.extend_from_slice(extra);
    super::proxy_to(pods, &args).await
}

/// One gRPC pod on 127.0.0.2 behaving as `behaviour`, and the proxy in front of it with
/// `extra` flags: `(pod, proxy)`.
pub async fn pod_behind_proxy(behaviour: GrpcBehaviour, extra: &[&str]) -> (GrpcBackend, Running) {
    let pod = GrpcBackend::start(2, behaviour).await;
    let running = grpc_proxy(&[pod.addr], extra).await;
    (pod, running)
}

/// An in-process gRPC server (h2c) standing in for a pod.
#[derive(Debug)]
pub struct GrpcBackend {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    behaviour: GrpcBehaviour,
    /// Calls started.
    calls: AtomicU64,
    /// Messages received on client-streaming and bidi calls.
    received: watch::Sender<u64>,
    /// Replies of server-streaming calls the client says it has.
    client_saw: watch::Sender<u64>,
}

impl GrpcBackend {
    pub async fn start(last_octet: u8, behaviour: GrpcBehaviour) -> Self {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, last_octet], 0)))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            behaviour,
            calls: AtomicU64::new(0),
            received: watch::Sender::new(0),
            client_saw: watch::Sender::new(0),
        });
        let state = shared.clone();
        let server = tokio::spawn(async move {
            // Aborting the server aborts every connection with it.
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = state.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| route(req, state.clone()));
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            shared,
            server,
        }
    }

    /// Calls started on this backend.
    pub fn calls(&self) -> u64 {
        self.shared.calls.load(Relaxed)
    }

    /// Messages received on client-streaming and bidi calls so far.
    pub fn received(&self) -> u64 {
        *self.shared.received.borrow()
    }

    /// Waits until at least `n` messages were received; panics after [`MESSAGE_LIMIT`].
    pub async fn wait_received(&self, n: u64, what: &str) {
        let mut seen = self.shared.received.subscribe();
        let waited = tokio::time::timeout(MESSAGE_LIMIT, seen.wait_for(|r| *r >= n)).await;
        assert!(
            waited.is_ok(),
            "{what}: the pod had received {} of {n} messages after {MESSAGE_LIMIT:?}: \
             the proxy holds request messages back",
            self.received()
        );
    }

    /// The client reports how many server-streaming replies it holds.
    pub fn client_saw(&self, n: u64) {
        self.shared.client_saw.send_replace(n);
    }
}

impl Drop for GrpcBackend {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn route(
    req: http::Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<http::Response<tonic::body::Body>, Infallible> {
    shared.calls.fetch_add(1, Relaxed);
    let mut grpc = tonic::server::Grpc::new(RawCodec);
    let path = req.uri().path().to_owned();
    Ok(match path.as_str() {
        UNARY => grpc.unary(Unary(shared), req).await,
        SERVER_STREAM => grpc.server_streaming(ServerStream(shared), req).await,
        CLIENT_STREAM => grpc.client_streaming(ClientStream(shared), req).await,
        BIDI => grpc.streaming(Bidi(shared), req).await,
        STALL => grpc.server_streaming(Stall(shared), req).await,
        TICK => grpc.server_streaming(Tick, req).await,
        _ => Status::unimplemented(format!("no method {path}")).into_http(),
    })
}

type Reply = Result<tonic::Response<Bytes>, Status>;
type Replies = BoxStream<'static, Result<Bytes, Status>>;

struct Unary(Arc<Shared>);

impl tonic::server::UnaryService<Bytes> for Unary {
    type Response = Bytes;
    type Future = BoxFuture<'static, Reply>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let delay = self.0.behaviour.delay;
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            Ok(tonic::Response::new(request.into_inner()))
        })
    }
}

struct ServerStream(Arc<Shared>);

impl tonic::server::ServerStreamingService<Bytes> for ServerStream {
    type Response = Bytes;
    type ResponseStream = Replies;
    type Future = BoxFuture<'static, Result<tonic::Response<Replies>, Status>>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let shared = self.0.clone();
        Box::pin(async move {
            let count: u64 = std::str::from_utf8(request.get_ref())
                .ok()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| Status::invalid_argument("the request is a count"))?;
            let replies = futures::stream::unfold(0, move |i| {
                let shared = shared.clone();
                async move {
                    if i >= count {
                        return None;
                    }
                    if i >= WINDOW {
                        let mut saw = shared.client_saw.subscribe();
                        let need = i - WINDOW + 1;
                        if tokio::time::timeout(MESSAGE_LIMIT, saw.wait_for(|s| *s >= need))
                            .await
                            .is_err()
                        {
                            let held = *saw.borrow();
                            // Ends the stream: a status after the messages.
                            return Some((
                                Err(Status::aborted(format!(
                                    "the client had {held} of the first {need} replies after \
                                     {MESSAGE_LIMIT:?}: the proxy holds replies back"
                                ))),
                                count,
                            ));
                        }
                    }
                    Some((Ok(server_message(i)), i + 1))
                }
            });
            Ok(tonic::Response::new(replies.boxed()))
        })
    }
}

struct ClientStream(Arc<Shared>);

impl tonic::server::ClientStreamingService<Bytes> for ClientStream {
    type Response = Bytes;
    type Future = BoxFuture<'static, Reply>;

    fn call(&mut self, request: tonic::Request<Streaming<Bytes>>) -> Self::Future {
        let shared = self.0.clone();
        Box::pin(async move {
            let mut inbound = request.into_inner();
            let mut all = Vec::new();
            while let Some(message) = inbound.message().await? {
                shared.received.send_modify(|r| *r += 1);
                all.push(message);
            }
            Ok(tonic::Response::new(Bytes::from(all.join(&b'\n'))))
        })
    }
}

struct Bidi(Arc<Shared>);

impl tonic::server::StreamingService<Bytes> for Bidi {
    type Response = Bytes;
    type ResponseStream = Replies;
    type Future = BoxFuture<'static, Result<tonic::Response<Replies>, Status>>;

    fn call(&mut self, request: tonic::Request<Streaming<Bytes>>) -> Self::Future {
        let shared = self.0.clone();
        Box::pin(async move {
            let replies = request.into_inner().map(move |message| {
                shared.received.send_modify(|r| *r += 1);
                message
            });
            Ok(tonic::Response::new(replies.boxed()))
        })
    }
}

struct Stall(Arc<Shared>);

impl tonic::server::ServerStreamingService<Bytes> for Stall {
    type Response = Bytes;
    type ResponseStream = Replies;
    type Future = BoxFuture<'static, Result<tonic::Response<Replies>, Status>>;

    fn call(&mut self, _request: tonic::Request<Bytes>) -> Self::Future {
        let stall = self.0.behaviour.stall;
        Box::pin(async move {
            let first = futures::stream::once(async { Ok(Bytes::from_static(b"first")) });
            let second = futures::stream::once(async move {
                tokio::time::sleep(stall).await;
                Ok(Bytes::from_static(b"second"))
            });
            Ok(tonic::Response::new(first.chain(second).boxed()))
        })
    }
}

struct Tick;

impl tonic::server::ServerStreamingService<Bytes> for Tick {
    type Response = Bytes;
    type ResponseStream = Replies;
    type Future = BoxFuture<'static, Result<tonic::Response<Replies>, Status>>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        Box::pin(async move {
            let text = String::from_utf8_lossy(request.get_ref()).into_owned();
            let (count, interval) = text
                .split_once(',')
                .and_then(|(c, i)| Some((c.parse::<u64>().ok()?, i.parse().ok()?)))
                .ok_or_else(|| Status::invalid_argument("the request is count,interval_ms"))?;
            let interval = Duration::from_millis(interval);
            let ticks = futures::stream::iter(0..count).then(move |i| async move {
                if i > 0 {
                    tokio::time::sleep(interval).await;
                }
                Ok(Bytes::from(format!("t{i}")))
            });
            Ok(tonic::Response::new(ticks.boxed()))
        })
    }
}

/// The `i`th message a client sends in these tests.
pub fn client_message(i: u64) -> Bytes {
    Bytes::from(format!("c{i:05}"))
}

/// The reply of [`CLIENT_STREAM`] to client messages `0..n`: all of them, in order.
pub fn client_messages_joined(n: u64) -> Bytes {
    let messages: Vec<Bytes> = (0..n).map(client_message).collect();
    Bytes::from(messages.join(&b'\n'))
}

/// The `i`th reply of [`SERVER_STREAM`].
pub fn server_message(i: u64) -> Bytes {
    Bytes::from(format!("s{i}"))
}

pub fn path(path: &'static str) -> PathAndQuery {
    PathAndQuery::from_static(path)
}

/// A gRPC client connected to `addr` (the proxy) over h2c.
pub async fn client(addr: SocketAddr) -> tonic::client::Grpc<tonic::transport::Channel> {
    let endpoint = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5));
    let channel = within(
        Duration::from_secs(10),
        "connecting to the proxy",
        endpoint.connect(),
    )
    .await
    .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    within(Duration::from_secs(10), "channel ready", grpc.ready())
        .await
        .unwrap();
    grpc
}

/// A tonic client over a bare hyper HTTP/2 connection. Unlike `Channel`, it does not
/// enforce `grpc-timeout` on the response head itself, so a deadline the test sees is
/// the one the proxy kept.
#[derive(Clone, Debug)]
pub struct BareH2(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl tonic::client::GrpcService<tonic::body::Body> for BareH2 {
    type ResponseBody = Incoming;
    type Error = hyper::Error;
    type Future = BoxFuture<'static, Result<http::Response<Incoming>, hyper::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(request))
    }
}

/// A gRPC client on one fresh h2c connection to `addr`, with no deadline of its own.
pub async fn bare_client(addr: SocketAddr) -> tonic::client::Grpc<BareH2> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let origin = format!("http://{addr}").parse().unwrap();
    tonic::client::Grpc::with_origin(BareH2(sender), origin)
}

/// `future`'s output, or a panic naming `what` after `limit`.
pub async fn within<F: Future>(limit: Duration, what: &str, future: F) -> F::Output {
    match tokio::time::timeout(limit, future).await {
        Ok(output) => output,
        Err(_) => panic!("{what}: nothing after {limit:?}"),
    }
}

/// A request stream the test feeds by hand: `(sender, stream)`.
pub fn outbound() -> (
    tokio::sync::mpsc::Sender<Bytes>,
    impl futures::Stream<Item = Bytes> + Send + 'static,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(WINDOW as usize * 2);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|message| (message, rx))
    });
    (tx, stream)
}

/// A gRPC response seen as plain HTTP/2.
#[derive(Debug)]
pub struct RawGrpcReply {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub trailers: Option<http::HeaderMap>,
}

/// One unary gRPC call made by hand over a fresh h2c connection, so the test sees the
/// HTTP status and where `grpc-status` comes (headers or trailers).
pub async fn raw_unary(
    addr: SocketAddr,
    path: &str,
    message: &[u8],
    headers: &[(&str, &str)],
) -> RawGrpcReply {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0);
    framed.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(message);
    let mut request = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::from(framed))).unwrap();
    let exchange = async {
        let response = sender.send_request(request).await.unwrap();
        let (head, body) = response.into_parts();
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        RawGrpcReply {
            status: head.status,
            headers: head.headers,
            body: collected.to_bytes(),
            trailers,
        }
    };
    within(Duration::from_secs(20), "raw gRPC call", exchange).await
}

/// Opens a bidi `Echo` stream: the sender for the client's messages and the replies, once
/// the response head has arrived (within [`MESSAGE_LIMIT`]).
pub async fn open_bidi(
    grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
) -> (
    tokio::sync::mpsc::Sender<Bytes>,
    tonic::codec::Streaming<Bytes>,
) {
    let (tx, stream) = outbound();
    let call = grpc.streaming(tonic::Request::new(stream), path(BIDI), RawCodec);
    let inbound = within(MESSAGE_LIMIT, "response head", call)
        .await
        .unwrap()
        .into_inner();
    (tx, inbound)
}

/// Sends client message `i` on an open bidi stream and asserts that its echo is the next
/// reply, within [`MESSAGE_LIMIT`]; `what` names the step in a failure.
pub async fn round_trip(
    tx: &tokio::sync::mpsc::Sender<Bytes>,
    inbound: &mut tonic::codec::Streaming<Bytes>,
    i: u64,
    what: &str,
) {
    tx.send(client_message(i)).await.unwrap();
    let answer = within(MESSAGE_LIMIT, what, inbound.message()).await;
    assert_eq!(
        answer.unwrap_or_else(|status| panic!("{what}: {status:?}")),
        Some(client_message(i)),
        "{what}"
    );
}

/// One [`UNARY`] call carrying `message`, the client ready first.
pub async fn unary_echo(
    grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
    message: Bytes,
) -> Result<tonic::Response<Bytes>, Status> {
    grpc.ready().await.unwrap();
    grpc.unary(tonic::Request::new(message), path(UNARY), RawCodec)
        .await
}

/// Starts a server-streaming call of `method`: its replies, once the response head has
/// arrived (within [`MESSAGE_LIMIT`]).
pub async fn open_server_stream(
    grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
    method: &'static str,
    request: tonic::Request<Bytes>,
) -> tonic::codec::Streaming<Bytes> {
    let call = grpc.server_streaming(request, path(method), RawCodec);
    within(MESSAGE_LIMIT, "response head", call)
        .await
        .unwrap()
        .into_inner()
}

/// Starts a [`CLIENT_STREAM`] call on its own task: the sender for the client's messages
/// (dropping it ends the request) and the call's outcome.
pub fn spawn_client_stream(
    mut grpc: tonic::client::Grpc<tonic::transport::Channel>,
) -> (
    tokio::sync::mpsc::Sender<Bytes>,
    tokio::task::JoinHandle<Result<tonic::Response<Bytes>, Status>>,
) {
    let (tx, stream) = outbound();
    let call = tokio::spawn(async move {
        grpc.client_streaming(tonic::Request::new(stream), path(CLIENT_STREAM), RawCodec)
            .await
    });
    (tx, call)
}
