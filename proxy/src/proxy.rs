//! The client-facing service: one request in, one endpoint chosen per request, safe
//! retries, precise errors.

use crate::access_log::{AccessLog, AccessRecord};
use crate::grpc;
use crate::load::RetryBudget;
use crate::metrics::Metrics;
use crate::pool::{self, BoxError, ConnectConfig, Sender, UpstreamBody};
use crate::registry::{EndpointState, Registry};
use crate::replay::{Replay, ReplayBody};
use bytes::Bytes;
use futures::future::BoxFuture;
use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::Full;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;

/// Body of a response to a client.
pub type ResponseBody = ProxyBody;

/// A body the proxy sends, either way: bytes it holds, a backend's response, or a
/// stream. An enum rather than a boxed trait object: most requests carry none or a
/// buffered one, and most responses are a backend's, so none of them costs an
/// allocation.
// `Tracked` is the large variant and the common one: boxing it would cost every
// response an allocation, which is what the enum is here to avoid.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum ProxyBody {
    /// Bytes held in full (a buffered request body, a response the proxy makes).
    Full(Full<Bytes>),
    /// A backend's response on its way to the client.
    Tracked(TrackedBody),
    /// A client's request body on its way to a backend, as it arrives.
    Replay(ReplayBody<Incoming>),
    /// Anything else, as it arrives.
    Stream(UnsyncBoxBody<Bytes, BoxError>),
}

impl ProxyBody {
    /// A body of these bytes.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        Self::Full(Full::new(bytes.into()))
    }

    /// No body.
    pub fn empty() -> Self {
        Self::full(Bytes::new())
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Full(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|frame| frame.map(|r| r.map_err(|never| match never {}))),
            Self::Tracked(body) => Pin::new(body).poll_frame(cx),
            Self::Replay(body) => Pin::new(body).poll_frame(cx),
            Self::Stream(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(body) => body.is_end_stream(),
            Self::Tracked(body) => body.is_end_stream(),
            Self::Replay(body) => body.is_end_stream(),
            Self::Stream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(body) => body.size_hint(),
            Self::Tracked(body) => body.size_hint(),
            Self::Replay(body) => body.size_hint(),
            Self::Stream(body) => body.size_hint(),
        }
    }
}

/// Bytes of a request body kept, while it streams, so the request can be sent again to
/// another endpoint.
pub const DEFAULT_RETRY_BODY_LIMIT: usize = 64 * 1024;

/// Per-request behaviour.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// How to reach backends.
    pub connect: ConnectConfig,
    /// Limit for a response head, counted from the end of the request body; `None`
    /// waits forever.
    pub response_timeout: Option<Duration>,
    /// Limit on a stream with no frame in either direction; `None` waits forever.
    pub stream_idle_timeout: Option<Duration>,
    /// Bytes of a request body kept for a retry.
    pub retry_body_limit: usize,
    /// Requests and streams in flight through this proxy at once; more are refused.
    pub max_in_flight: Option<usize>,
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// Session affinity, when configured.
    pub affinity: Option<crate::affinity::AffinityConfig>,
}

/// The proxy, shared by all client connections.
#[derive(Clone, Debug)]
pub struct Proxy {
    registry: Arc<Registry>,
    access_log: Option<AccessLog>,
    /// Set when the proxy itself shuts down: HTTP/1.1 responses then carry
    /// `Connection: close` so clients move to another replica between requests.
    closing: Arc<std::sync::atomic::AtomicBool>,
    /// Open upgraded tunnels (WebSocket), and the signal that cuts them at the end of
    /// the proxy's own drain.
    tunnels: Arc<Tunnels>,
    metrics: Arc<Metrics>,
    config: Arc<ProxyConfig>,
    budget: Arc<RetryBudget>,
    /// Requests and streams in flight, counted only with `max_in_flight` set.
    admitted: Arc<std::sync::atomic::AtomicUsize>,
}

/// A request counted against `--max-in-flight` until its response ends.
#[derive(Debug)]
struct Admission(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// The proxy bound to one client connection (its address feeds X-Forwarded-For).
#[derive(Clone, Debug)]
pub struct ProxyService {
    proxy: Proxy,
    client: SocketAddr,
    /// The client's IP as X-Forwarded-For wants it, made once per connection.
    client_ip: HeaderValue,
}

/// A request's body, for every attempt that sends it.
enum RequestBody {
    /// None at all: any attempt can send it.
    Empty,
    /// Streamed as it arrives, with a copy for retries while it fits.
    Streaming(Arc<Replay<Incoming>>),
}

impl RequestBody {
    /// Whether another attempt could send the whole body again.
    fn can_replay(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::Streaming(replay) => replay.can_replay(),
        }
    }
}

/// The time limits of one request.
#[derive(Clone, Copy, Debug)]
struct Limits {
    /// From the end of the request body to the response head.
    response_head: Option<Duration>,
    /// No frame either way for this long.
    idle: Option<Duration>,
    /// The gRPC client's deadline.
    deadline: Option<Instant>,
    /// The request is a gRPC call: errors are answered the gRPC way.
    grpc: bool,
}

/// Which limit cut a request or a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
enum Timeout {
    #[error("no response head within {0:?} of the end of the request")]
    ResponseHead(Duration),
    #[error("no frame in either direction for {0:?}")]
    Idle(Duration),
    #[error("the call's grpc-timeout passed")]
    Deadline,
}

impl Timeout {
    /// The `kind` label of `ballast_stream_timeouts_total`.
    fn kind(self) -> &'static str {
        match self {
            Self::ResponseHead(_) => "response-head",
            Self::Idle(_) => "idle",
            Self::Deadline => "deadline",
        }
    }
}

/// The next limit due: the earliest of the deadline, the response-head limit once the
/// request has ended, and the idle limit after the last frame.
fn next_limit(
    limits: &Limits,
    request_ended: Option<Instant>,
    last_frame: Instant,
) -> Option<(Instant, Timeout)> {
    let mut next: Option<(Instant, Timeout)> = None;
    let mut consider = |at: Instant, timeout: Timeout| {
        if next.is_none_or(|(earliest, _)| at < earliest) {
            next = Some((at, timeout));
        }
    };
    if let Some(at) = limits.deadline {
        consider(at, Timeout::Deadline);
    }
    if let (Some(limit), Some(ended)) = (limits.response_head, request_ended) {
        consider(ended + limit, Timeout::ResponseHead(limit));
    }
    if let Some(limit) = limits.idle {
        consider(last_frame + limit, Timeout::Idle(limit));
    }
    next
}

/// Waits for a response head within the request's limits. The response-head limit
/// starts when the request body has ended (a client-streaming call or a slow upload
/// is not the pod's delay); while it streams, only the deadline and the idle limit
/// apply. Returns the head and when the pod's turn began: the end of the request body,
/// or `sent` when the head came first.
///
/// Written with `poll_fn` and one timer rather than `select!` over helper futures: this
/// future is part of every request's, and its size is copied as the request moves.
async fn wait_for_head<F: std::future::Future>(
    mut head: Pin<&mut F>,
    limits: &Limits,
    replay: Option<&Replay<Incoming>>,
    sent: Instant,
) -> Result<(F::Output, Instant), Timeout> {
    let mut request_ended = match replay {
        Some(replay) if !replay.ended() => None,
        _ => Some(sent),
    };
    let first = next_limit(limits, request_ended, sent);
    let mut timer = std::pin::pin!(tokio::time::sleep_until(
        first.map_or(sent + Duration::from_secs(86_400), |(at, _)| at)
    ));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(output) = head.as_mut().poll(cx) {
            return Poll::Ready(Ok((output, request_ended.unwrap_or(sent))));
        }
        if request_ended.is_none()
            && let Some(replay) = replay
            && replay.poll_ended(cx).is_ready()
        {
            request_ended = Some(Instant::now());
        }
        loop {
            let last_frame = replay.map_or(sent, |r| r.last_frame().max(sent));
            let Some((at, timeout)) = next_limit(limits, request_ended, last_frame) else {
                return Poll::Pending;
            };
            if at <= Instant::now() {
                return Poll::Ready(Err(timeout));
            }
            // The due time moves later with frames and earlier only when the request
            // ends (the response-head limit starts).
            if timer.deadline() != at && (timer.is_elapsed() || at < timer.deadline()) {
                timer.as_mut().reset(at);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    })
    .await
}

/// Why the proxy answers a request itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Malformed request head (framing).
    BadRequest,
    /// The request body could not be read.
    BadBody,
    /// No endpoint to send to.
    NoEndpoint,
    /// No connection could be made.
    ConnectFailed,
    /// The pod failed the request.
    UpstreamFailed,
    /// A time limit passed.
    UpstreamTimeout,
    /// The proxy has `--max-in-flight` requests in flight already.
    Overloaded,
}

impl ErrorKind {
    /// Every kind, for the access log's fixed strings.
    const ALL: [Self; 7] = [
        Self::BadRequest,
        Self::BadBody,
        Self::NoEndpoint,
        Self::ConnectFailed,
        Self::UpstreamFailed,
        Self::UpstreamTimeout,
        Self::Overloaded,
    ];

    /// The `x-ballast-error` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad-request",
            Self::BadBody => "bad-body",
            Self::NoEndpoint => "no-endpoint",
            Self::ConnectFailed => "connect-failed",
            Self::UpstreamFailed => "upstream-failed",
            Self::UpstreamTimeout => "upstream-timeout",
            Self::Overloaded => "overloaded",
        }
    }

    /// The HTTP status answered to a plain HTTP client.
    pub fn status(self) -> StatusCode {
        match self {
            Self::BadRequest | Self::BadBody => StatusCode::BAD_REQUEST,
            Self::NoEndpoint | Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Self::ConnectFailed | Self::UpstreamFailed => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The `grpc-status` answered to a gRPC client.
    pub fn grpc_code(self) -> grpc::Code {
        match self {
            Self::BadRequest | Self::BadBody => grpc::Code::Internal,
            Self::NoEndpoint | Self::ConnectFailed | Self::UpstreamFailed => {
                grpc::Code::Unavailable
            }
            Self::UpstreamTimeout => grpc::Code::DeadlineExceeded,
            Self::Overloaded => grpc::Code::ResourceExhausted,
        }
    }
}

/// How one attempt failed.
struct AttemptFailure {
    kind: ErrorKind,
    cause: String,
    /// Safe to try again on another endpoint.
    retryable: bool,
}

impl Proxy {
    /// A proxy over `registry`.
    pub fn new(
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        config: ProxyConfig,
        budget: RetryBudget,
    ) -> Self {
        Self {
            registry,
            access_log: None,
            closing: Arc::default(),
            tunnels: Arc::default(),
            metrics,
            config: Arc::new(config),
            budget: Arc::new(budget),
            admitted: Arc::default(),
        }
    }

    /// Counts a request against `--max-in-flight`: `Err` when the proxy is full, `None`
    /// when there is no limit (and nothing to count).
    fn admit(&self) -> Result<Option<Admission>, ()> {
        let Some(max) = self.config.max_in_flight else {
            return Ok(None);
        };
        if self.admitted.fetch_add(1, Relaxed) >= max {
            self.admitted.fetch_sub(1, Relaxed);
            return Err(());
        }
        Ok(Some(Admission(self.admitted.clone())))
    }

    /// Logs every request through `log`.
    pub fn with_access_log(mut self, log: AccessLog) -> Self {
        self.access_log = Some(log);
        self
    }

    /// Waits until every tunnel has closed or `deadline` passes, then cuts the rest.
    /// Returns how many had to be cut.
    pub async fn close_tunnels(&self, deadline: Instant) -> usize {
        while self.tunnels.open.load(Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let forced = self.tunnels.open.load(Relaxed);
        self.tunnels.cut.send_replace(true);
        forced
    }

    /// From now on, ask HTTP/1.1 clients to reconnect (elsewhere) after each response.
    pub fn start_closing(&self) {
        self.closing.store(true, Relaxed);
    }

    /// The service for one client connection.
    pub fn for_client(&self, client: SocketAddr) -> ProxyService {
        let client_ip = HeaderValue::from_str(&client.ip().to_canonical().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        ProxyService {
            proxy: self.clone(),
            client,
            client_ip,
        }
    }
}

impl hyper::service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let http1 = request.version() < Version::HTTP_2;
            let mut response = this.handle(request).await;
            if http1
                && this.proxy.closing.load(Relaxed)
                && response.status() != StatusCode::SWITCHING_PROTOCOLS
            {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(response)
        })
    }
}

impl ProxyService {
    async fn handle(&self, request: Request<Incoming>) -> Response<ResponseBody> {
        let started = Instant::now();
        let Some(log) = self.proxy.access_log.clone() else {
            return self.forward(request, started, None).await;
        };
        let record = AccessRecord {
            time: std::time::SystemTime::now(),
            client: self.client,
            method: request.method().to_string(),
            path: if log.with_query {
                request
                    .uri()
                    .path_and_query()
                    .map_or("/", |pq| pq.as_str())
                    .to_owned()
            } else {
                request.uri().path().to_owned()
            },
            status: 0,
            bytes_in: request.body().size_hint().exact().unwrap_or(0),
            bytes_out: 0,
            duration_ms: 0.0,
            upstream: None,
            pod: None,
            attempts: 0,
            reused: false,
            request_id: String::new(),
            upgraded: false,
            error: None,
        };
        let mut pending = Pending {
            log,
            record,
            started,
        };
        let mut response = self.forward(request, started, Some(&mut pending)).await;
        pending.record.status = response.status().as_u16();
        pending.record.error = response
            .headers()
            .get(&X_BALLAST_ERROR)
            .and_then(|v| ErrorKind::ALL.iter().map(|k| k.as_str()).find(|k| v == *k));
        match response.extensions_mut().remove::<UpstreamLog>() {
            // Logged when the response body ends (see `TrackedBody::finish`).
            Some(UpstreamLog(slot)) => {
                if let Ok(mut slot) = slot.lock() {
                    *slot = Some(pending);
                }
            }
            None => pending.finish(0),
        }
        response
    }

    async fn forward(
        &self,
        mut request: Request<Incoming>,
        started: Instant,
        mut log: Option<&mut Pending>,
    ) -> Response<ResponseBody> {
        // gRPC runs over HTTP/2 only: HTTP/1.1 requests skip the header lookup.
        let grpc = request.version() == Version::HTTP_2 && grpc::is_grpc(request.headers());
        if let Err(reason) = check_framing(request.headers()) {
            self.proxy
                .metrics
                .rejected
                .get_or_create(&[("reason", reason)])
                .inc();
            tracing::warn!(client = %self.client, reason, "malformed request refused");
            return local_response(ErrorKind::BadRequest, reason, grpc);
        }
        let Ok(admission) = self.proxy.admit() else {
            self.proxy
                .metrics
                .rejected
                .get_or_create(&[("reason", "overloaded")])
                .inc();
            return local_response(
                ErrorKind::Overloaded,
                "too many requests in flight through this proxy",
                grpc,
            );
        };
        let request_id = ensure_request_id(request.headers_mut());
        let request_id = request_id.to_str().unwrap_or("-");
        if let Some(log) = log.as_deref_mut() {
            request_id.clone_into(&mut log.record.request_id);
        }
        let upgrade = is_upgrade(&request);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
        let (mut parts, body) = request.into_parts();
        prepare_upstream_headers(&mut parts.headers, &parts.uri, &self.client_ip, upgrade);

        let proxy = &self.proxy;
        // The body streams to the pod as it arrives; a bounded copy is kept on the way
        // so the request can be sent again if the pod fails before answering.
        let body = if body.is_end_stream() {
            RequestBody::Empty
        } else {
            RequestBody::Streaming(Arc::new(Replay::new(
                body,
                proxy.config.retry_body_limit,
                proxy.metrics.retry_body_overflow.clone(),
                started,
            )))
        };
        let limits = Limits {
            response_head: proxy.config.response_timeout,
            idle: proxy.config.stream_idle_timeout,
            deadline: grpc
                .then(|| grpc::timeout(&parts.headers))
                .flatten()
                .map(|timeout| started + timeout),
            grpc,
        };

        proxy.budget.record_request(started);
        // Endpoints tried so far; inline up to the default of 2 attempts.
        let mut tried: smallvec::SmallVec<[SocketAddr; 2]> = smallvec::SmallVec::new();
        let mut last: Option<AttemptFailure> = None;
        let affinity = proxy
            .config
            .affinity
            .as_ref()
            .and_then(|a| Some((a.key(&parts.headers, self.client)?, a.load_factor)));
        loop {
            let now = Instant::now();
            let selected = match &affinity {
                Some((key, load_factor)) => proxy
                    .registry
                    .select_affine(now, &tried, key.hash, *load_factor)
                    .map(|(endpoint, moved)| {
                        if moved {
                            proxy.metrics.affinity_moved.inc();
                        }
                        endpoint
                    }),
                None => proxy.registry.select(now, &tried),
            };
            let Some(endpoint) = selected else {
                if let Some(failure) = last {
                    return failure_response(&failure, request_id, grpc);
                }
                proxy.metrics.no_endpoint.inc();
                tracing::warn!(request_id, path = %parts.uri.path(), "no endpoint available");
                return local_response(
                    ErrorKind::NoEndpoint,
                    "no endpoint available for this service",
                    grpc,
                );
            };
            tried.push(endpoint.address);
            match self
                .attempt(&endpoint, &parts, &body, started, &limits)
                .await
            {
                Ok(mut response) => {
                    if let Some(log) = log.as_deref_mut() {
                        let record = &mut log.record;
                        record.attempts = tried.len() as u32;
                        record.upstream = Some(endpoint.address);
                        record.pod = endpoint.pod();
                        record.reused = response.body().reused;
                        record.upgraded = client_upgrade.is_some();
                        let slot: LogSlot = Arc::new(std::sync::Mutex::new(None));
                        response.body_mut().log = Some(slot.clone());
                        response.extensions_mut().insert(UpstreamLog(slot));
                    }
                    response.body_mut().admission = admission;
                    if let Some(cookie) =
                        affinity.as_ref().and_then(|(k, _)| k.set_cookie.as_deref())
                        && let Ok(value) = HeaderValue::from_str(cookie)
                    {
                        response.headers_mut().append(header::SET_COOKIE, value);
                    }
                    if let Some(client_upgrade) = client_upgrade {
                        return self.finish_upgrade(response, client_upgrade, endpoint);
                    }
                    return response.map(ProxyBody::Tracked);
                }
                Err(failure) => {
                    tracing::warn!(
                        request_id,
                        endpoint = %endpoint.address,
                        pod = ?endpoint.pod(),
                        attempt = tried.len(),
                        cause = %failure.cause,
                        "attempt failed"
                    );
                    if !failure.retryable {
                        return failure_response(&failure, request_id, grpc);
                    }
                    let skipped = if !body.can_replay() {
                        Some("body-over-limit")
                    } else if tried.len() as u32 >= proxy.config.max_attempts {
                        Some("attempts")
                    } else if !proxy.budget.try_retry(Instant::now()) {
                        Some("budget")
                    } else {
                        None
                    };
                    if let Some(reason) = skipped {
                        proxy
                            .metrics
                            .retries_skipped
                            .get_or_create(&[("reason", reason)])
                            .inc();
                        return failure_response(&failure, request_id, grpc);
                    }
                    proxy.metrics.retries.inc();
                    last = Some(failure);
                }
            }
        }
    }

    /// One try on one endpoint. The body is taken only once a connection is had, so a
    /// failed connect leaves even a streamed body available for the next endpoint.
    async fn attempt(
        &self,
        endpoint: &Arc<EndpointState>,
        parts: &http::request::Parts,
        body: &RequestBody,
        started: Instant,
        limits: &Limits,
    ) -> Result<Response<TrackedBody>, AttemptFailure> {
        let proxy = &self.proxy;
        let (sender, reused) = match pool::checkout(endpoint, proxy.config.connect).await {
            Ok(checkout) => checkout,
            Err(e) => {
                endpoint.failures.fetch_add(1, Relaxed);
                proxy.registry.record_failure(endpoint, Instant::now());
                // Nothing was sent: always safe to try elsewhere.
                return Err(AttemptFailure {
                    kind: ErrorKind::ConnectFailed,
                    cause: error_chain(&e),
                    retryable: true,
                });
            }
        };
        let (upstream_body, replay) = match body {
            RequestBody::Empty => (ProxyBody::empty(), None),
            RequestBody::Streaming(replay) => match replay.next_attempt() {
                Some(attempt) => (ProxyBody::Replay(attempt), Some(replay.clone())),
                None => {
                    return Err(AttemptFailure {
                        kind: ErrorKind::UpstreamFailed,
                        cause: "the request body outgrew the retry copy".into(),
                        retryable: false,
                    });
                }
            },
        };
        let mut request = Request::from_parts(parts.clone(), upstream_body);
        let exchange = Exchange::begin(endpoint.clone());
        let sent = Instant::now();
        // The request goes into hyper at once; what is awaited is only its small
        // response future (the request itself is not held across the wait).
        let (head, sender) = match sender {
            Sender::Http1(mut sender) => {
                *request.version_mut() = Version::HTTP_11;
                // Backends get origin-form ("/path?query"), which is what HTTP/1.1
                // clients send anyway; absolute-form and HTTP/2 URIs are cut down.
                if request.uri().scheme().is_some() || request.uri().authority().is_some() {
                    let origin = request.uri().path_and_query().cloned();
                    let mut uri = http::uri::Parts::default();
                    uri.path_and_query =
                        Some(origin.unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")));
                    *request.uri_mut() =
                        Uri::from_parts(uri).unwrap_or_else(|_| Uri::from_static("/"));
                }
                (
                    futures::future::Either::Left(sender.send_request(request)),
                    Some(sender),
                )
            }
            Sender::Http2(mut sender) => {
                *request.version_mut() = Version::HTTP_2;
                let authority = request
                    .headers_mut()
                    .remove(header::HOST)
                    .and_then(|h| h.to_str().ok().map(str::to_owned))
                    .or_else(|| request.uri().authority().map(|a| a.to_string()))
                    .unwrap_or_else(|| endpoint.address.to_string());
                let pq = request
                    .uri()
                    .path_and_query()
                    .map_or("/", |pq| pq.as_str())
                    .to_owned();
                if let Ok(uri) = Uri::builder()
                    .scheme("http")
                    .authority(authority)
                    .path_and_query(pq)
                    .build()
                {
                    *request.uri_mut() = uri;
                }
                (
                    futures::future::Either::Right(sender.send_request(request)),
                    None,
                )
            }
        };
        let head = std::pin::pin!(head);
        let response = wait_for_head(head, limits, replay.as_deref(), sent).await;
        endpoint.pending.fetch_sub(1, Relaxed);
        let now = Instant::now();
        match response {
            Ok((Ok(mut response), pods_turn)) => {
                // The pod's latency counts from when it had the whole request: a long
                // upload or client stream says nothing about how fast the pod is.
                endpoint.observe_rtt(now.saturating_duration_since(pods_turn), now);
                proxy
                    .metrics
                    .response_seconds
                    .observe(now.saturating_duration_since(started).as_secs_f64());
                let status = response.status();
                let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
                endpoint.responses[class].fetch_add(1, Relaxed);
                if status.is_server_error() {
                    proxy.registry.record_failure(endpoint, now);
                } else {
                    proxy.registry.record_success(endpoint);
                }
                let upgrade = (status == StatusCode::SWITCHING_PROTOCOLS)
                    .then(|| hyper::upgrade::on(&mut response));
                let (mut head, incoming) = response.into_parts();
                if status != StatusCode::SWITCHING_PROTOCOLS {
                    strip_hop_by_hop(&mut head.headers);
                }
                let keep_alive = sender.is_some() && status != StatusCode::SWITCHING_PROTOCOLS;
                let exchange = exchange.with_sender(if keep_alive { sender } else { None });
                let mut body = TrackedBody::new(incoming, exchange, replay);
                body.upgrade = upgrade;
                body.reused = reused;
                body.watch(limits, proxy.metrics.clone(), now);
                Ok(Response::from_parts(head, body))
            }
            Ok((Err(e), _)) => {
                drop(exchange);
                if replay.as_ref().is_some_and(|r| r.client_failed()) {
                    // The client's body broke (bad chunking, a reset): the pod saw a
                    // request cut short, never a malformed one; the client gets a 400.
                    proxy
                        .metrics
                        .rejected
                        .get_or_create(&[("reason", "malformed body")])
                        .inc();
                    return Err(AttemptFailure {
                        kind: ErrorKind::BadBody,
                        cause: error_chain(&e),
                        retryable: false,
                    });
                }
                endpoint.failures.fetch_add(1, Relaxed);
                proxy.registry.record_failure(endpoint, now);
                Err(AttemptFailure {
                    kind: ErrorKind::UpstreamFailed,
                    cause: error_chain(&e),
                    retryable: failed_before_response(&e),
                })
            }
            Err(timeout) => {
                drop(exchange);
                endpoint.failures.fetch_add(1, Relaxed);
                proxy.registry.record_failure(endpoint, now);
                proxy
                    .metrics
                    .stream_timeouts
                    .get_or_create(&[("kind", timeout.kind())])
                    .inc();
                Err(AttemptFailure {
                    kind: ErrorKind::UpstreamTimeout,
                    cause: timeout.to_string(),
                    retryable: false,
                })
            }
        }
    }

    /// Completes a WebSocket-style upgrade: on 101 both sides are joined and the tunnel
    /// counts as a request and a connection on its endpoint until it closes.
    fn finish_upgrade(
        &self,
        response: Response<TrackedBody>,
        client_upgrade: hyper::upgrade::OnUpgrade,
        endpoint: Arc<EndpointState>,
    ) -> Response<ResponseBody> {
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return response.map(ProxyBody::Tracked);
        }
        let (head, mut body) = response.into_parts();
        let upstream_upgrade = body.take_upgrade();
        let metrics = self.proxy.metrics.clone();
        endpoint.connections.fetch_add(1, Relaxed);
        endpoint.in_flight.fetch_add(1, Relaxed);
        metrics.upgrades.inc();
        let tunnels = self.proxy.tunnels.clone();
        tunnels.open.fetch_add(1, Relaxed);
        let mut cut = tunnels.cut.subscribe();
        tokio::spawn(async move {
            let joined = async {
                let upstream = upstream_upgrade.ok_or("upstream did not upgrade")?.await?;
                let client = client_upgrade.await?;
                let mut upstream = TokioIo::new(upstream);
                let mut client = TokioIo::new(client);
                tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
                Ok::<_, BoxError>(())
            };
            tokio::select! {
                result = joined => {
                    if let Err(e) = result {
                        tracing::debug!(endpoint = %endpoint.address, error = %e, "upgraded connection ended with an error");
                    }
                }
                _ = cut.wait_for(|cut| *cut) => {
                    tracing::warn!(endpoint = %endpoint.address, "upgraded connection closed: the proxy is stopping");
                }
            }
            tunnels.open.fetch_sub(1, Relaxed);
            endpoint.in_flight.fetch_sub(1, Relaxed);
            endpoint.connections.fetch_sub(1, Relaxed);
            drop(body);
        });
        Response::from_parts(head, ProxyBody::empty())
    }
}

/// One request on one endpoint, from send to the end of the response body: keeps the
/// endpoint's in-flight count and returns the connection to the pool afterwards.
#[derive(Debug)]
struct Exchange {
    endpoint: Arc<EndpointState>,
    sender: Option<http1::SendRequest<UpstreamBody>>,
    /// The worker the request, and so its upstream connection, runs on.
    home: Option<usize>,
    completed: bool,
}

impl Exchange {
    fn begin(endpoint: Arc<EndpointState>) -> Self {
        endpoint.in_flight.fetch_add(1, Relaxed);
        endpoint.pending.fetch_add(1, Relaxed);
        endpoint.requests.fetch_add(1, Relaxed);
        Self {
            endpoint,
            sender: None,
            home: crate::workers::current(),
            completed: false,
        }
    }

    fn with_sender(mut self, sender: Option<http1::SendRequest<UpstreamBody>>) -> Self {
        self.sender = sender;
        self
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Relaxed);
        if let Some(sender) = self.sender.take() {
            // A draining endpoint's connection closes as soon as its request is done.
            if self.completed && !self.endpoint.is_draining() {
                self.endpoint.pool.put(sender, self.home, Instant::now());
            }
        }
    }
}

/// A response body from a backend that ends its [`Exchange`] when it completes or is
/// dropped, and cuts the stream when one of the request's time limits passes.
#[derive(Debug)]
pub struct TrackedBody {
    /// The backend's body; `None` once cut.
    inner: Option<Incoming>,
    exchange: Option<Exchange>,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// The upstream connection came from the pool.
    reused: bool,
    /// Where the access-log record waits for the end of the body.
    log: Option<LogSlot>,
    bytes_out: u64,
    /// The request body, while it may still be streaming.
    replay: Option<Arc<Replay<Incoming>>>,
    /// Time limits, when the request has any after its head.
    watch: Option<Watch>,
    /// Held until the response ends (or its tunnel closes).
    admission: Option<Admission>,
}

/// The limits a response body keeps: the idle limit (no frame either way) and the gRPC
/// deadline. Cheap while frames flow: no clock read per frame (the silence starts at the
/// first `Pending` after a frame) and no timer until the body first waits.
#[derive(Debug)]
struct Watch {
    limits: Limits,
    /// When the body last went quiet (or the head arrived).
    last_frame: Instant,
    /// A frame passed since `last_frame` was read.
    fresh: bool,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    metrics: Arc<Metrics>,
}

impl Watch {
    /// Polls the timer; `Ready` with the limit that passed. The request body's frames
    /// count as activity too.
    fn poll_expired(
        &mut self,
        replay: Option<&Replay<Incoming>>,
        cx: &mut Context<'_>,
    ) -> Poll<Timeout> {
        if self.fresh {
            self.fresh = false;
            self.last_frame = Instant::now();
        }
        loop {
            let last_frame =
                replay.map_or(self.last_frame, |r| r.last_frame().max(self.last_frame));
            let limits = Limits {
                response_head: None,
                ..self.limits
            };
            let Some((at, timeout)) = next_limit(&limits, None, last_frame) else {
                return Poll::Pending;
            };
            if at <= Instant::now() {
                return Poll::Ready(timeout);
            }
            // Armed once; the due time only moves later (a frame pushes the idle limit
            // on), so a timer that fires early is re-armed then, not at every frame.
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            if timer.is_elapsed() {
                timer.as_mut().reset(at);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

impl TrackedBody {
    fn new(inner: Incoming, exchange: Exchange, replay: Option<Arc<Replay<Incoming>>>) -> Self {
        let mut body = Self {
            inner: Some(inner),
            exchange: Some(exchange),
            upgrade: None,
            reused: false,
            log: None,
            bytes_out: 0,
            replay,
            watch: None,
            admission: None,
        };
        if body.is_end_stream() {
            body.finish(true);
        }
        body
    }

    /// Keeps the request's idle limit and deadline on this body while it streams; the
    /// request body's frames count as activity.
    fn watch(&mut self, limits: &Limits, metrics: Arc<Metrics>, now: Instant) {
        if self.exchange.is_none() || (limits.idle.is_none() && limits.deadline.is_none()) {
            return;
        }
        self.watch = Some(Watch {
            limits: *limits,
            last_frame: now,
            fresh: false,
            timer: None,
            metrics,
        });
    }

    fn finish(&mut self, completed: bool) {
        self.admission = None;
        if let Some(mut exchange) = self.exchange.take() {
            // An HTTP/1.1 connection goes back to the pool only once the request body
            // has been sent in full too (a pod may answer before reading it all).
            let request_sent = self.replay.as_ref().is_none_or(|r| r.ended());
            exchange.completed = completed && request_sent;
        }
        if let Some(slot) = self.log.take()
            && let Some(mut pending) = slot.lock().ok().and_then(|mut p| p.take())
        {
            if let Some(replay) = &self.replay {
                pending.record.bytes_in = replay.received();
            }
            pending.finish(self.bytes_out);
        }
    }

    /// Ends the stream because `timeout` passed: the backend's stream is dropped (reset),
    /// and a gRPC call gets `DEADLINE_EXCEEDED` trailers, anything else an error that
    /// aborts the response.
    fn cut(&mut self, timeout: Timeout) -> Result<Frame<Bytes>, BoxError> {
        self.inner = None;
        self.finish(false);
        let Some(watch) = self.watch.as_ref() else {
            return Err(timeout.into());
        };
        watch
            .metrics
            .stream_timeouts
            .get_or_create(&[("kind", timeout.kind())])
            .inc();
        tracing::warn!(error = %timeout, "stream cut");
        if watch.limits.grpc {
            Ok(Frame::trailers(grpc::status(
                grpc::Code::DeadlineExceeded,
                &timeout.to_string(),
            )))
        } else {
            Err(timeout.into())
        }
    }

    fn take_upgrade(&mut self) -> Option<hyper::upgrade::OnUpgrade> {
        self.upgrade.take()
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(&mut *inner).poll_frame(cx);
        let end = inner.is_end_stream();
        match &polled {
            Poll::Pending => {
                if let Some(watch) = this.watch.as_mut()
                    && let Poll::Ready(timeout) = watch.poll_expired(this.replay.as_deref(), cx)
                {
                    return Poll::Ready(Some(this.cut(timeout)));
                }
                return Poll::Pending;
            }
            Poll::Ready(None) => this.finish(true),
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes_out += data.len() as u64;
                }
                if end {
                    this.finish(true);
                } else if let Some(watch) = this.watch.as_mut() {
                    watch.fresh = true;
                }
            }
        }
        polled.map(|frame| frame.map(|r| r.map_err(BoxError::from)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// Refuses request-smuggling shapes that must never reach a backend. One pass over the
/// headers (most requests carry neither framing header, and a pass over a dozen names is
/// cheaper than three lookups).
fn check_framing(headers: &HeaderMap) -> Result<(), &'static str> {
    let mut length: Option<&HeaderValue> = None;
    let mut conflicting_lengths = false;
    let mut transfer_encoding = false;
    let mut bad_transfer_encoding = None;
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH {
            conflicting_lengths |= length.is_some_and(|first| first != value);
            length.get_or_insert(value);
        } else if name == header::TRANSFER_ENCODING {
            transfer_encoding = true;
            let problem = match value.to_str() {
                Err(_) => Some("invalid Transfer-Encoding"),
                Ok(text) => {
                    let last = text.rsplit(',').next().unwrap_or("").trim();
                    (!last.eq_ignore_ascii_case("chunked"))
                        .then_some("Transfer-Encoding must end with chunked")
                }
            };
            bad_transfer_encoding = bad_transfer_encoding.or(problem);
        }
    }
    if transfer_encoding && length.is_some() {
        return Err("both Content-Length and Transfer-Encoding");
    }
    if conflicting_lengths {
        return Err("conflicting Content-Length headers");
    }
    bad_transfer_encoding.map_or(Ok(()), Err)
}

fn is_upgrade<B>(request: &Request<B>) -> bool {
    request.version() == Version::HTTP_11
        && request.headers().contains_key(header::UPGRADE)
        && connection_tokens(request.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

// Header names made once: a `const` HeaderName is built, and dropped, at every use.
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_BALLAST_ERROR: HeaderName = HeaderName::from_static("x-ballast-error");

static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including those named by `Connection`. `TE: trailers`
/// is end-to-end in practice (gRPC needs it) and is kept.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them: one pass over the names present instead of a
    // lookup per hop-by-hop name.
    if !headers
        .keys()
        .any(|name| name == header::TE || HOP_BY_HOP.contains(name))
    {
        return;
    }
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    let te_trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !te_trailers {
        headers.remove(header::TE);
    }
}

fn prepare_upstream_headers(
    headers: &mut HeaderMap,
    uri: &Uri,
    client_ip: &HeaderValue,
    upgrade: bool,
) {
    let upgrade_to = upgrade
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten();
    strip_hop_by_hop(headers);
    if let Some(protocol) = upgrade_to {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
    // HTTP/2 clients send the authority in the URI, HTTP/1.1 backends need Host.
    let host = match headers.entry(header::HOST) {
        Entry::Occupied(host) => Some(host.get().clone()),
        Entry::Vacant(slot) => uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .map(|authority| slot.insert(authority).clone()),
    };
    match headers.entry(&X_FORWARDED_FOR) {
        // Every earlier hop in order (all of the header's lines), then this client.
        Entry::Occupied(mut previous) => {
            let mut joined = Vec::with_capacity(64);
            for hop in previous.iter() {
                joined.extend_from_slice(hop.as_bytes());
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(client_ip.as_bytes());
            if let Ok(value) = HeaderValue::from_bytes(&joined) {
                previous.insert(value);
            }
        }
        Entry::Vacant(slot) => {
            slot.insert(client_ip.clone());
        }
    }
    headers
        .entry(&X_FORWARDED_PROTO)
        .or_insert(HeaderValue::from_static("http"));
    if let (Entry::Vacant(slot), Some(host)) = (headers.entry(&X_FORWARDED_HOST), host) {
        slot.insert(host);
    }
}

/// Keeps the client's `x-request-id` or sets a new one (32 random hex digits); returns
/// it.
fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
    let slot = match headers.entry(&X_REQUEST_ID) {
        Entry::Occupied(id) if id.get().to_str().is_ok() => return id.get().clone(),
        slot => slot,
    };
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut random = fastrand::u128(..);
    let mut digits = [0u8; 32];
    for digit in digits.iter_mut().rev() {
        *digit = HEX[(random & 0xf) as usize];
        random >>= 4;
    }
    let value = HeaderValue::from_bytes(&digits).unwrap_or_else(|_| HeaderValue::from_static("-"));
    match slot {
        Entry::Occupied(mut id) => {
            id.insert(value.clone());
        }
        Entry::Vacant(id) => {
            id.insert(value.clone());
        }
    }
    value
}

/// Whether a request failed before any byte of a response arrived, so that sending it
/// again cannot repeat a response the client half-saw. This is the keep-alive race: the
/// backend closed (FIN) or dropped (RST) an idle connection just as it was reused, and
/// the request met a closed connection or a reset while waiting for the head; or an
/// HTTP/2 pod refused the stream (REFUSED_STREAM, as a server shutting down does for
/// streams past its GOAWAY), which HTTP/2 defines as never processed. A response head
/// that arrived malformed is not in this set.
fn failed_before_response(error: &hyper::Error) -> bool {
    if error.is_canceled() || error.is_incomplete_message() {
        return true;
    }
    if error.is_parse() || error.is_parse_status() || error.is_timeout() || error.is_user() {
        return false;
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>()
            && h2.reason() == Some(h2::Reason::REFUSED_STREAM)
        {
            return true;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            );
        }
        source = cause.source();
    }
    false
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn failure_response(
    failure: &AttemptFailure,
    request_id: &str,
    grpc: bool,
) -> Response<ResponseBody> {
    tracing::warn!(request_id, kind = failure.kind.as_str(), cause = %failure.cause, "request failed");
    let message = match failure.kind {
        ErrorKind::UpstreamTimeout => "upstream did not answer in time",
        ErrorKind::BadBody => "request body could not be read",
        _ => "upstream request failed",
    };
    local_response(failure.kind, message, grpc)
}

/// A response the proxy makes itself; the kind goes into `x-ballast-error`. A gRPC
/// call gets a trailers-only answer (HTTP 200, `grpc-status`, `grpc-message`) that its
/// client library reports with the right code; anything else a plain-text HTTP error.
pub fn local_response(kind: ErrorKind, message: &str, grpc: bool) -> Response<ResponseBody> {
    let mut response = if grpc {
        let mut response = Response::new(ProxyBody::empty());
        *response.headers_mut() = grpc::trailers_only(kind.grpc_code(), message);
        response
    } else {
        let mut response = Response::new(ProxyBody::full(format!("{message}\n")));
        *response.status_mut() = kind.status();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    };
    response
        .headers_mut()
        .insert(&X_BALLAST_ERROR, HeaderValue::from_static(kind.as_str()));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smuggling_shapes_are_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        assert!(check_framing(&h).is_err());

        let mut h = HeaderMap::new();
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("6"));
        assert!(check_framing(&h).is_err());

        let mut h = HeaderMap::new();
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked, gzip"),
        );
        assert!(check_framing(&h).is_err());

        let mut h = HeaderMap::new();
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("gzip, chunked"),
        );
        assert!(check_framing(&h).is_ok());
    }

    #[test]
    fn hop_by_hop_headers_go_and_forwarded_headers_are_set() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::HOST, HeaderValue::from_static("shop.example"));
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        let client_ip = HeaderValue::from_static("10.1.2.3");
        prepare_upstream_headers(&mut h, &Uri::from_static("/"), &client_ip, false);
        assert!(!h.contains_key(header::CONNECTION));
        assert!(!h.contains_key("x-secret"));
        assert!(!h.contains_key("keep-alive"));
        assert_eq!(h[header::TE], "trailers");
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "shop.example");
    }

    #[test]
    fn every_earlier_forwarded_for_line_is_kept_in_order() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        h.append(
            "x-forwarded-for",
            HeaderValue::from_static("198.51.100.2, 10.0.0.7"),
        );
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        let client_ip = HeaderValue::from_static("10.1.2.3");
        let uri = Uri::from_static("http://api.example/v1");
        prepare_upstream_headers(&mut h, &uri, &client_ip, false);
        let forwarded: Vec<_> = h.get_all("x-forwarded-for").iter().collect();
        assert_eq!(
            forwarded,
            ["203.0.113.9, 198.51.100.2, 10.0.0.7, 10.1.2.3"],
            "one line, earlier hops first"
        );
        assert_eq!(h["x-forwarded-proto"], "https", "an earlier hop's is kept");
        // An HTTP/2 request has no Host: the URI's authority becomes it.
        assert_eq!(h[header::HOST], "api.example");
        assert_eq!(h["x-forwarded-host"], "api.example");
    }

    #[test]
    fn framing_refusals_name_the_first_rule_broken() {
        let mut h = HeaderMap::new();
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("6"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("gzip"));
        assert_eq!(
            check_framing(&h),
            Err("both Content-Length and Transfer-Encoding")
        );
        h.remove(header::TRANSFER_ENCODING);
        assert_eq!(check_framing(&h), Err("conflicting Content-Length headers"));
        let mut h = HeaderMap::new();
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        assert_eq!(
            check_framing(&h),
            Ok(()),
            "repeated equal lengths are one length"
        );
        let mut h = HeaderMap::new();
        h.append(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.append(header::TRANSFER_ENCODING, HeaderValue::from_static("gzip"));
        assert_eq!(
            check_framing(&h),
            Err("Transfer-Encoding must end with chunked")
        );
        assert_eq!(check_framing(&HeaderMap::new()), Ok(()));
    }

    #[test]
    fn request_id_is_kept_or_generated() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        assert_eq!(ensure_request_id(&mut h), "abc");
        let mut h = HeaderMap::new();
        let id = ensure_request_id(&mut h);
        assert_eq!(id.len(), 32);
        assert!(id.as_bytes().iter().all(u8::is_ascii_hexdigit), "{id:?}");
        assert_eq!(h["x-request-id"], id);
        assert_ne!(ensure_request_id(&mut HeaderMap::new()), id);
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        // Dropped at or before the end (an empty body is never polled; a client may
        // leave mid-body): the record is written now.
        let completed = self.is_end_stream();
        self.finish(completed);
    }
}

/// An access-log record waiting for the response to end.
#[derive(Debug)]
struct Pending {
    log: AccessLog,
    record: AccessRecord,
    started: Instant,
}

type LogSlot = Arc<std::sync::Mutex<Option<Pending>>>;

/// Response extension: the slot the record goes into once the handler knows the status.
#[derive(Clone, Debug)]
struct UpstreamLog(LogSlot);

impl Pending {
    fn finish(mut self, bytes_out: u64) {
        self.record.bytes_out = bytes_out;
        self.record.duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        self.log.record(self.record);
    }
}

/// Upgraded tunnels of this proxy.
#[derive(Debug)]
struct Tunnels {
    open: std::sync::atomic::AtomicUsize,
    cut: tokio::sync::watch::Sender<bool>,
}

impl Default for Tunnels {
    fn default() -> Self {
        Self {
            open: std::sync::atomic::AtomicUsize::new(0),
            cut: tokio::sync::watch::Sender::new(false),
        }
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    fn limits(deadline: Option<Instant>) -> Limits {
        Limits {
            response_head: Some(Duration::from_secs(60)),
            idle: Some(Duration::from_secs(300)),
            deadline,
            grpc: false,
        }
    }

    #[test]
    fn the_response_head_limit_starts_only_when_the_request_has_ended() {
        let t0 = Instant::now();
        let streaming = next_limit(&limits(None), None, t0);
        assert_eq!(
            streaming,
            Some((
                t0 + Duration::from_secs(300),
                Timeout::Idle(Duration::from_secs(300))
            )),
            "while the body streams only the idle limit runs"
        );
        let ended = t0 + Duration::from_secs(10);
        assert_eq!(
            next_limit(&limits(None), Some(ended), t0),
            Some((
                ended + Duration::from_secs(60),
                Timeout::ResponseHead(Duration::from_secs(60))
            ))
        );
    }

    #[test]
    fn the_earliest_limit_wins_and_a_frame_moves_the_idle_one() {
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_millis(250);
        assert_eq!(
            next_limit(&limits(Some(deadline)), Some(t0), t0),
            Some((deadline, Timeout::Deadline))
        );
        let quiet = Limits {
            response_head: None,
            idle: Some(Duration::from_secs(1)),
            deadline: None,
            grpc: true,
        };
        let later = t0 + Duration::from_secs(5);
        assert_eq!(
            next_limit(&quiet, None, later),
            Some((
                later + Duration::from_secs(1),
                Timeout::Idle(Duration::from_secs(1))
            ))
        );
        let none = Limits {
            response_head: None,
            idle: None,
            deadline: None,
            grpc: false,
        };
        assert_eq!(next_limit(&none, Some(t0), t0), None);
    }

    #[test]
    fn error_kinds_map_to_http_and_grpc_answers() {
        for (kind, status, code) in [
            (ErrorKind::NoEndpoint, 503, grpc::Code::Unavailable),
            (ErrorKind::ConnectFailed, 502, grpc::Code::Unavailable),
            (ErrorKind::UpstreamFailed, 502, grpc::Code::Unavailable),
            (
                ErrorKind::UpstreamTimeout,
                504,
                grpc::Code::DeadlineExceeded,
            ),
            (ErrorKind::BadRequest, 400, grpc::Code::Internal),
            (ErrorKind::BadBody, 400, grpc::Code::Internal),
            (ErrorKind::Overloaded, 503, grpc::Code::ResourceExhausted),
        ] {
            assert_eq!(kind.status().as_u16(), status, "{kind:?}");
            assert_eq!(kind.grpc_code(), code, "{kind:?}");
            let plain = local_response(kind, "x", false);
            assert_eq!(plain.status().as_u16(), status);
            assert_eq!(plain.headers()["x-ballast-error"], kind.as_str());
            let grpc = local_response(kind, "x", true);
            assert_eq!(grpc.status(), StatusCode::OK);
            assert_eq!(grpc.headers()["content-type"], "application/grpc");
            assert_eq!(
                grpc.headers()["grpc-status"],
                (code as u16).to_string().as_str()
            );
            assert!(grpc.body().is_end_stream(), "trailers-only: no body");
        }
    }
}
