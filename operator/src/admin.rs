//! Admin listener: `/healthz`, `/readyz`, `/metrics`.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// Serves the admin endpoints until the process ends. `ready` turns true once the
/// operator is connected to the API server (leader or standby).
///
/// # Errors
/// When the listener cannot bind.
pub async fn serve(
    address: SocketAddr,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
) -> std::io::Result<()> {
    let listener = match TcpListener::bind(address).await {
        // `[::]` serves IPv4 too; a node with IPv6 turned off gets `0.0.0.0`.
        Err(e) if address.ip() == std::net::Ipv6Addr::UNSPECIFIED => {
            tracing::warn!(%address, error = %e, "IPv6 unavailable; listening on IPv4 only");
            TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], address.port()))).await?
        }
        other => other?,
    };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (metrics, ready) = (metrics.clone(), ready.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let response = route(req.uri().path(), &metrics, ready.load(Relaxed));
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route(path: &str, metrics: &Metrics, ready: bool) -> Response<Full<Bytes>> {
    let (status, body) = match path {
        "/healthz" => (StatusCode::OK, "ok\n".to_owned()),
        "/readyz" if ready => (StatusCode::OK, "ready\n".to_owned()),
        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_owned()),
        "/metrics" => (StatusCode::OK, metrics.render()),
        _ => (
            StatusCode::NOT_FOUND,
            "not found: /healthz, /readyz, /metrics\n".to_owned(),
        ),
    };
    let content_type = if path == "/metrics" {
        // prometheus-client renders OpenMetrics text (it ends in `# EOF`); a scraper
        // told text/plain would parse it as the older format.
        OPENMETRICS
    } else {
        "text/plain; charset=utf-8"
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

/// Content type of `/metrics`.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_served_as_openmetrics_text() {
        let response = route("/metrics", &Metrics::default(), true);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[http::header::CONTENT_TYPE],
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        let response = route("/readyz", &Metrics::default(), false);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            response.headers()[http::header::CONTENT_TYPE],
            "text/plain; charset=utf-8"
        );
    }
}
