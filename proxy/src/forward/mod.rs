//! The client-facing service: one request in, one endpoint chosen per request, safe
//! retries, precise errors.
//!
//! One file per job: [`attempt`](self) sends one try to one endpoint, `body` carries the
//! bodies and keeps the endpoint's counts, `limits` holds the time limits, `headers`
//! prepares heads, `tunnel` joins upgraded connections, `error` makes the proxy's own
//! answers. This file admits a request and runs the retry loop.

mod attempt;
mod body;
mod error;
mod headers;
mod limits;
mod tunnel;

pub use body::{ProxyBody, TrackedBody};
pub use error::{ErrorKind, local_response};

use crate::access_log::{AccessLog, AccessRecord};
use crate::grpc;
use crate::load::RetryBudget;
use crate::metrics::Metrics;
use crate::pool::ConnectConfig;
use crate::registry::Registry;
use crate::replay::Replay;
use error::{AttemptFailure, failure_response};
use futures::future::BoxFuture;
use headers::{check_framing, ensure_request_id, is_upgrade, prepare_upstream_headers};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::{Body, Incoming};
use limits::Limits;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::time::Instant;
use tracing::Instrument;
use tunnel::Tunnels;

/// Body of a response to a client.
pub type ResponseBody = ProxyBody;

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
    pub affinity: Option<crate::balance::affinity::AffinityConfig>,
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

    /// This proxy for another listener: its own endpoints, reached with `connect`;
    /// the in-flight limit, retry budget, access log, shutdown and tunnels stay shared.
    pub fn for_port(&self, registry: Arc<Registry>, connect: ConnectConfig) -> Self {
        let mut config = (*self.config).clone();
        config.connect = connect;
        Self {
            registry,
            config: Arc::new(config),
            ..self.clone()
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
        // One span per request at debug: with debug off it is never built and the
        // future is not wrapped.
        let span = tracing::debug_span!(
            "request",
            method = %request.method(),
            path = %request.uri().path(),
            client = %self.client,
            request_id = tracing::field::Empty,
        );
        let response = async move {
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
        };
        // Instrumenting costs an enter and exit per poll even for a disabled span.
        if span.is_disabled() {
            Box::pin(response)
        } else {
            Box::pin(response.instrument(span))
        }
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
            .extensions()
            .get::<ErrorKind>()
            .map(|kind| kind.as_str());
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
        if tracing::level_enabled!(tracing::Level::DEBUG) {
            tracing::Span::current().record("request_id", request_id);
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
                    tracing::warn!(
                        request_id,
                        attempt = tried.len(),
                        kind = failure.kind.as_str(),
                        error = %failure.error,
                        retry = "no other endpoint",
                        "request failed"
                    );
                    return failure_response(&failure, grpc);
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
                    let failed = |retry: &str| {
                        tracing::warn!(
                            request_id,
                            endpoint = %endpoint.address,
                            pod = ?endpoint.pod(),
                            attempt = tried.len(),
                            kind = failure.kind.as_str(),
                            error = %failure.error,
                            retry,
                            "request failed"
                        );
                    };
                    if !failure.retryable {
                        failed("no: the pod may have processed it");
                        return failure_response(&failure, grpc);
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
                        failed(reason);
                        return failure_response(&failure, grpc);
                    }
                    tracing::debug!(
                        request_id,
                        endpoint = %endpoint.address,
                        attempt = tried.len(),
                        error = %failure.error,
                        "attempt failed; retrying on another endpoint"
                    );
                    proxy.metrics.retries.inc();
                    last = Some(failure);
                }
            }
        }
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
