//! The admin listener: health, metrics, endpoint table and the drain API. It is never
//! exposed on the client-facing Service.
//!
//! `POST /drain` drains *the endpoints whose IP is the caller's source IP*, on every
//! listener's port: a pod can drain only itself, with no token to leak. `GET /drain`
//! reports that pod's in-flight requests and open connections, summed over its ports.

use crate::forward::ResponseBody;
use crate::metrics::Metrics;
use crate::registry::Ports;
use ballast_api::admin::{self as paths, Refusal};
use futures::future::BoxFuture;
use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use tokio::time::Instant;

/// Shared state of the admin endpoints.
#[derive(Clone, Debug)]
pub struct Admin {
    /// The endpoints, per listener.
    pub ports: Ports,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// True once every listener is bound and discovery delivered its first set to each,
    /// until shutdown begins.
    pub ready: Arc<AtomicBool>,
}

/// The admin service bound to one caller.
#[derive(Clone, Debug)]
pub struct AdminService {
    admin: Admin,
    peer: SocketAddr,
}

impl Admin {
    /// The service for a connection from `peer`.
    pub fn for_peer(&self, peer: SocketAddr) -> AdminService {
        AdminService {
            admin: self.clone(),
            peer,
        }
    }
}

impl hyper::service::Service<Request<Incoming>> for AdminService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let response = self.route(request.method(), request.uri().path());
        Box::pin(async move { Ok(response) })
    }
}

impl AdminService {
    fn route(&self, method: &Method, path: &str) -> Response<ResponseBody> {
        let admin = &self.admin;
        let now = Instant::now();
        let caller = self.peer.ip().to_canonical();
        match (method, path) {
            (&Method::GET, paths::LIVE) => text(StatusCode::OK, "live"),
            (&Method::GET, paths::READY) if admin.ready.load(Relaxed) => {
                text(StatusCode::OK, "ready")
            }
            (&Method::GET, paths::READY) => text(StatusCode::SERVICE_UNAVAILABLE, "not ready"),
            (&Method::GET, paths::METRICS) => openmetrics(admin.metrics.render()),
            (&Method::GET, paths::ENDPOINTS) => json(StatusCode::OK, &admin.ports.reports(now)),
            (&Method::POST, paths::DRAIN) => match admin.ports.request_drain(caller, now) {
                Some(report) => {
                    admin.metrics.drain_requests.inc();
                    json(StatusCode::OK, &report)
                }
                None => not_an_endpoint(caller),
            },
            (&Method::POST, paths::DRAIN_TIMEOUT) => {
                match admin.ports.drain_timed_out(caller, now) {
                    Some(report) => json(StatusCode::OK, &report),
                    None => not_an_endpoint(caller),
                }
            }
            (&Method::GET, paths::DRAINS) => json(StatusCode::OK, &admin.ports.drains()),
            (&Method::GET, paths::DRAIN) => {
                json(StatusCode::OK, &admin.ports.drain_report(caller, now))
            }
            (_, path) if paths::PATHS.contains(&path) => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
            }
            _ => text(
                StatusCode::NOT_FOUND,
                &format!("not found: try {}", paths::PATHS.join(", ")),
            ),
        }
    }
}

fn not_an_endpoint(caller: std::net::IpAddr) -> Response<ResponseBody> {
    tracing::warn!(%caller, "drain refused: the caller is not an endpoint");
    json(
        StatusCode::FORBIDDEN,
        &Refusal {
            error: format!(
                "{caller} is not an endpoint of this proxy; a pod can drain only itself"
            ),
        },
    )
}

/// The exposition as rendered: OpenMetrics ends at `# EOF\n`, and a scraper refuses
/// anything after it ("unexpected data after # EOF"), even a blank line.
fn openmetrics(exposition: String) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(exposition));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    response
}

fn text(status: StatusCode, body: &str) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(format!("{body}\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<ResponseBody> {
    match serde_json::to_vec_pretty(value) {
        Ok(mut bytes) => {
            bytes.push(b'\n');
            let mut response = Response::new(ResponseBody::full(bytes));
            *response.status_mut() = status;
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("encoding failed: {e}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn metrics_end_at_the_openmetrics_eof() {
        let metrics = Metrics::new(Ports::new(Vec::new()), None);
        let response = openmetrics(metrics.render());
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8(body.to_vec()).unwrap();
        assert!(body.ends_with("\n# EOF\n"), "{body:?}");
    }
}
