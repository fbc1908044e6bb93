//! Bodies the proxy sends either way, and the exchange a backend's response body keeps
//! open on its endpoint until it ends.

use super::limits::{Limits, Timeout, next_limit};
use super::{Admission, LogSlot};
use crate::grpc;
use crate::metrics::Metrics;
use crate::pool::{BoxError, UpstreamBody};
use crate::registry::EndpointState;
use crate::replay::{Replay, ReplayBody};
use bytes::Bytes;
use http_body_util::Full;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use tokio::time::Instant;

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

/// One request on one endpoint, from send to the end of the response body: keeps the
/// endpoint's in-flight count and returns the connection to the pool afterwards.
#[derive(Debug)]
pub(super) struct Exchange {
    endpoint: Arc<EndpointState>,
    sender: Option<http1::SendRequest<UpstreamBody>>,
    /// The worker the request, and so its upstream connection, runs on.
    home: Option<usize>,
    completed: bool,
}

impl Exchange {
    pub(super) fn begin(endpoint: Arc<EndpointState>) -> Self {
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

    pub(super) fn with_sender(mut self, sender: Option<http1::SendRequest<UpstreamBody>>) -> Self {
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
    pub(super) upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// The upstream connection came from the pool.
    pub(super) reused: bool,
    /// Where the access-log record waits for the end of the body.
    pub(super) log: Option<LogSlot>,
    bytes_out: u64,
    /// The request body, while it may still be streaming.
    replay: Option<Arc<Replay<Incoming>>>,
    /// Time limits, when the request has any after its head.
    watch: Option<Watch>,
    /// Held until the response ends (or its tunnel closes).
    pub(super) admission: Option<Admission>,
}

/// The limits a response body keeps: the idle limit (no frame either way) and the gRPC
/// deadline. Cheap while frames flow: no clock read per frame (the silence starts at the
/// first `Pending` after a frame) and no timer until the body first waits.
#[derive(Debug)]
pub(super) struct Watch {
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
    pub(super) fn new(
        inner: Incoming,
        exchange: Exchange,
        replay: Option<Arc<Replay<Incoming>>>,
    ) -> Self {
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
    pub(super) fn watch(&mut self, limits: &Limits, metrics: Arc<Metrics>, now: Instant) {
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

    pub(super) fn take_upgrade(&mut self) -> Option<hyper::upgrade::OnUpgrade> {
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

impl Drop for TrackedBody {
    fn drop(&mut self) {
        // Dropped at or before the end (an empty body is never polled; a client may
        // leave mid-body): the record is written now.
        let completed = self.is_end_stream();
        self.finish(completed);
    }
}
