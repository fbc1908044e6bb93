//! The client-facing service: one request in, one endpoint chosen per request, safe
//! retries, precise errors.

use crate::access_log::{AccessLog, AccessRecord};
use crate::load::RetryBudget;
use crate::metrics::Metrics;
use crate::pool::{self, BoxError, ConnectConfig, Sender, UpstreamBody};
use crate::registry::{EndpointState, Registry};
use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
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
#[derive(Debug)]
pub enum ProxyBody {
    /// Bytes held in full (a buffered request body, a response the proxy makes).
    Full(Full<Bytes>),
    /// A backend's response on its way to the client.
    Tracked(TrackedBody),
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
            Self::Stream(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(body) => body.is_end_stream(),
            Self::Tracked(body) => body.is_end_stream(),
            Self::Stream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(body) => body.size_hint(),
            Self::Tracked(body) => body.size_hint(),
            Self::Stream(body) => body.size_hint(),
        }
    }
}

/// Request bodies up to this size are buffered so the request can be replayed on
/// another endpoint.
pub const REPLAYABLE_BODY_LIMIT: usize = 64 * 1024;

/// Per-request behaviour.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// How to reach backends.
    pub connect: ConnectConfig,
    /// Limit for a response head; `None` waits forever.
    pub response_timeout: Option<Duration>,
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
}

/// The proxy bound to one client connection (its address feeds X-Forwarded-For).
#[derive(Clone, Debug)]
pub struct ProxyService {
    proxy: Proxy,
    client: SocketAddr,
    /// The client's IP as X-Forwarded-For wants it, made once per connection.
    client_ip: HeaderValue,
}

enum RequestBody {
    /// Buffered: can be sent again.
    Replayable(Bytes),
    /// Streamed (the buffered prefix, then the rest): can be sent once.
    Stream(Option<UpstreamBody>),
}

/// How one attempt failed.
struct AttemptFailure {
    status: StatusCode,
    kind: &'static str,
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
        }
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
            .and_then(|v| ERROR_KINDS.iter().copied().find(|k| v == *k));
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
        if let Err(reason) = check_framing(request.headers()) {
            self.proxy
                .metrics
                .rejected
                .get_or_create(&[("reason", reason)])
                .inc();
            tracing::warn!(client = %self.client, reason, "malformed request refused");
            return local_response(StatusCode::BAD_REQUEST, "bad-request", reason);
        }
        let request_id = ensure_request_id(request.headers_mut());
        let request_id = request_id.to_str().unwrap_or("-");
        if let Some(log) = log.as_deref_mut() {
            request_id.clone_into(&mut log.record.request_id);
        }
        let upgrade = is_upgrade(&request);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
        let (mut parts, body) = request.into_parts();
        prepare_upstream_headers(&mut parts.headers, &parts.uri, &self.client_ip, upgrade);

        // Up to 64 KiB of body is read before any endpoint sees the request: a small
        // body becomes replayable, and a malformed one (bad chunk size) is refused
        // here instead of half-forwarded.
        let mut body = match read_prefix(body, REPLAYABLE_BODY_LIMIT).await {
            Ok(body) => body,
            Err(e) => {
                self.proxy
                    .metrics
                    .rejected
                    .get_or_create(&[("reason", "malformed body")])
                    .inc();
                tracing::warn!(client = %self.client, error = %e, "request body unreadable; refused");
                return local_response(
                    StatusCode::BAD_REQUEST,
                    "bad-body",
                    "request body could not be read",
                );
            }
        };

        let proxy = &self.proxy;
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
                    return failure_response(&failure, request_id);
                }
                proxy.metrics.no_endpoint.inc();
                tracing::warn!(request_id, path = %parts.uri.path(), "no endpoint available");
                return local_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no-endpoint",
                    "no endpoint available for this service",
                );
            };
            tried.push(endpoint.address);
            match self.attempt(&endpoint, &parts, &mut body, started).await {
                Ok(mut response) => {
                    if let Some(log) = log.as_deref_mut() {
                        let record = &mut log.record;
                        record.attempts = tried.len() as u32;
                        record.upstream = Some(endpoint.address);
                        record.pod = endpoint.pod();
                        record.reused = response.body().reused;
                        record.upgraded = client_upgrade.is_some();
                        if let RequestBody::Replayable(bytes) = &body {
                            record.bytes_in = bytes.len() as u64;
                        }
                        let slot: LogSlot = Arc::new(std::sync::Mutex::new(None));
                        response.body_mut().log = Some(slot.clone());
                        response.extensions_mut().insert(UpstreamLog(slot));
                    }
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
                    let body_available = match &body {
                        RequestBody::Replayable(_) => true,
                        RequestBody::Stream(slot) => slot.is_some(),
                    };
                    let retry = failure.retryable
                        && body_available
                        && (tried.len() as u32) < proxy.config.max_attempts
                        && proxy.budget.try_retry(Instant::now());
                    if !retry {
                        return failure_response(&failure, request_id);
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
        body: &mut RequestBody,
        started: Instant,
    ) -> Result<Response<TrackedBody>, AttemptFailure> {
        let proxy = &self.proxy;
        let (sender, reused) = match pool::checkout(endpoint, proxy.config.connect).await {
            Ok(checkout) => checkout,
            Err(e) => {
                endpoint.failures.fetch_add(1, Relaxed);
                proxy.registry.record_failure(endpoint, Instant::now());
                // Nothing was sent: always safe to try elsewhere.
                return Err(AttemptFailure {
                    status: StatusCode::BAD_GATEWAY,
                    kind: "connect-failed",
                    cause: error_chain(&e),
                    retryable: true,
                });
            }
        };
        let body = match body {
            RequestBody::Replayable(bytes) => ProxyBody::full(bytes.clone()),
            RequestBody::Stream(stream) => match stream.take() {
                Some(stream) => stream,
                None => {
                    return Err(AttemptFailure {
                        status: StatusCode::BAD_GATEWAY,
                        kind: "upstream-failed",
                        cause: "the streamed request body was already sent once".into(),
                        retryable: false,
                    });
                }
            },
        };
        let mut request = Request::from_parts(parts.clone(), body);
        let exchange = Exchange::begin(endpoint.clone());
        let sent = Instant::now();
        let response = match sender {
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
                let result =
                    with_timeout(proxy.config.response_timeout, sender.send_request(request)).await;
                result.map(|r| (r, Some(sender)))
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
                let result =
                    with_timeout(proxy.config.response_timeout, sender.send_request(request)).await;
                result.map(|r| (r, None))
            }
        };
        endpoint.pending.fetch_sub(1, Relaxed);
        let now = Instant::now();
        match response {
            Ok((Ok(mut response), sender)) => {
                endpoint.observe_rtt(now.saturating_duration_since(sent), now);
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
                let mut body = TrackedBody::new(incoming, exchange);
                body.upgrade = upgrade;
                body.reused = reused;
                Ok(Response::from_parts(head, body))
            }
            Ok((Err(e), _)) => {
                drop(exchange);
                endpoint.failures.fetch_add(1, Relaxed);
                proxy.registry.record_failure(endpoint, now);
                let before_response = failed_before_response(&e);
                let failure = AttemptFailure {
                    status: StatusCode::BAD_GATEWAY,
                    kind: "upstream-failed",
                    cause: error_chain(&e),
                    retryable: before_response,
                };
                Err(failure)
            }
            Err(elapsed) => {
                drop(exchange);
                endpoint.failures.fetch_add(1, Relaxed);
                proxy.registry.record_failure(endpoint, now);
                let failure = AttemptFailure {
                    status: StatusCode::GATEWAY_TIMEOUT,
                    kind: "upstream-timeout",
                    cause: format!("no response head within {elapsed:?}"),
                    retryable: false,
                };
                Err(failure)
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
/// dropped.
#[derive(Debug)]
pub struct TrackedBody {
    inner: Incoming,
    exchange: Option<Exchange>,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// The upstream connection came from the pool.
    reused: bool,
    /// Where the access-log record waits for the end of the body.
    log: Option<LogSlot>,
    bytes_out: u64,
}

impl TrackedBody {
    fn new(inner: Incoming, exchange: Exchange) -> Self {
        let mut body = Self {
            inner,
            exchange: Some(exchange),
            upgrade: None,
            reused: false,
            log: None,
            bytes_out: 0,
        };
        if body.inner.is_end_stream() {
            body.finish(true);
        }
        body
    }

    fn finish(&mut self, completed: bool) {
        if let Some(mut exchange) = self.exchange.take() {
            exchange.completed = completed;
        }
        if let Some(slot) = self.log.take()
            && let Some(pending) = slot.lock().ok().and_then(|mut p| p.take())
        {
            pending.finish(self.bytes_out);
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
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes_out += data.len() as u64;
        }
        match &polled {
            Poll::Ready(None) => self.finish(true),
            Poll::Ready(Some(Err(_))) => self.finish(false),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.finish(true),
            _ => {}
        }
        polled.map(|frame| frame.map(|r| r.map_err(BoxError::from)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Reads frames until the body ends or more than `limit` bytes arrived. A body that
/// ended is replayable; otherwise the prefix is sent ahead of the rest.
async fn read_prefix(mut body: Incoming, limit: usize) -> Result<RequestBody, hyper::Error> {
    let mut prefix = bytes::BytesMut::new();
    let mut trailers = None;
    while !body.is_end_stream() && prefix.len() <= limit && trailers.is_none() {
        match body.frame().await {
            None => break,
            Some(frame) => match frame?.into_data() {
                Ok(data) => prefix.extend_from_slice(&data),
                Err(frame) => trailers = frame.into_trailers().ok(),
            },
        }
    }
    if body.is_end_stream() && trailers.is_none() {
        return Ok(RequestBody::Replayable(prefix.freeze()));
    }
    // The prefix, then the rest as it arrives, then trailers read early (gRPC clients
    // end with them).
    let head = futures::stream::iter([Ok::<_, BoxError>(Frame::data(prefix.freeze()))]);
    let tail = http_body_util::BodyStream::new(body).map(|frame| frame.map_err(BoxError::from));
    let end = futures::stream::iter(trailers.map(|t| Ok::<_, BoxError>(Frame::trailers(t))));
    let frames = head.chain(tail).chain(end);
    Ok(RequestBody::Stream(Some(ProxyBody::Stream(
        http_body_util::StreamBody::new(frames).boxed_unsync(),
    ))))
}

async fn with_timeout<F: std::future::Future>(
    limit: Option<Duration>,
    future: F,
) -> Result<F::Output, Duration> {
    match limit {
        Some(limit) => tokio::time::timeout(limit, future).await.map_err(|_| limit),
        None => Ok(future.await),
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
/// the request met a closed connection or a reset while waiting for the head. A response
/// head that arrived malformed is not in this set.
fn failed_before_response(error: &hyper::Error) -> bool {
    if error.is_canceled() || error.is_incomplete_message() {
        return true;
    }
    if error.is_parse() || error.is_parse_status() || error.is_timeout() || error.is_user() {
        return false;
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
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

fn failure_response(failure: &AttemptFailure, request_id: &str) -> Response<ResponseBody> {
    tracing::warn!(request_id, status = failure.status.as_u16(), kind = failure.kind, cause = %failure.cause, "request failed");
    let message = match failure.status {
        StatusCode::GATEWAY_TIMEOUT => "upstream did not answer in time",
        _ => "upstream request failed",
    };
    local_response(failure.status, failure.kind, message)
}

/// A response the proxy makes itself; `kind` goes into `x-ballast-error`.
pub fn local_response(
    status: StatusCode,
    kind: &'static str,
    message: &str,
) -> Response<ResponseBody> {
    let mut response = Response::new(ProxyBody::full(format!("{message}\n")));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(&X_BALLAST_ERROR, HeaderValue::from_static(kind));
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
        let completed = self.inner.is_end_stream();
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

/// The `x-ballast-error` kinds, as fixed strings for the log.
const ERROR_KINDS: [&str; 6] = [
    "bad-request",
    "bad-body",
    "no-endpoint",
    "connect-failed",
    "upstream-failed",
    "upstream-timeout",
];

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
