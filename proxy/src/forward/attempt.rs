//! One try of a request on one endpoint: connect, send, wait for the head within the
//! request's limits, and record what the endpoint did.

use super::body::{Exchange, ProxyBody, TrackedBody};
use super::error::{AttemptFailure, ErrorKind, failed_before_response};
use super::headers::strip_hop_by_hop;
use super::limits::{Limits, wait_for_head};
use super::{ProxyService, RequestBody};
use crate::pool::{self, Sender};
use crate::registry::EndpointState;
use ballast_process::error_chain;
use http::header;
use http::{Request, Response, StatusCode, Uri, Version};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use tokio::time::Instant;

impl ProxyService {
    /// One try on one endpoint. The body is taken only once a connection is had, so a
    /// failed connect leaves even a streamed body available for the next endpoint.
    pub(super) async fn attempt(
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
                    error: error_chain(&e),
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
                        error: "the request body outgrew the retry copy".into(),
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
                        error: error_chain(&e),
                        retryable: false,
                    });
                }
                endpoint.failures.fetch_add(1, Relaxed);
                proxy.registry.record_failure(endpoint, now);
                Err(AttemptFailure {
                    kind: ErrorKind::UpstreamFailed,
                    error: error_chain(&e),
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
                    error: timeout.to_string(),
                    retryable: false,
                })
            }
        }
    }
}
