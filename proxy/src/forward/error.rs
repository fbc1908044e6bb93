//! What the proxy answers when it answers a request itself: the error kinds, their HTTP
//! status and gRPC code, and which upstream failures are safe to retry.

use super::ResponseBody;
use super::body::ProxyBody;
use crate::grpc;
use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};

static X_BALLAST_ERROR: HeaderName = HeaderName::from_static("x-ballast-error");

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
pub(super) struct AttemptFailure {
    pub(super) kind: ErrorKind,
    pub(super) error: String,
    /// Safe to try again on another endpoint.
    pub(super) retryable: bool,
}

/// Whether a request failed before any byte of a response arrived, so that sending it
/// again cannot repeat a response the client half-saw. This is the keep-alive race: the
/// backend closed (FIN) or dropped (RST) an idle connection just as it was reused, and
/// the request met a closed connection or a reset while waiting for the head; or an
/// HTTP/2 pod refused the stream (REFUSED_STREAM, as a server shutting down does for
/// streams past its GOAWAY), which HTTP/2 defines as never processed. A response head
/// that arrived malformed is not in this set.
pub(super) fn failed_before_response(error: &hyper::Error) -> bool {
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

/// The answer to a request that failed for good; the caller has logged why.
pub(super) fn failure_response(failure: &AttemptFailure, grpc: bool) -> Response<ResponseBody> {
    let message = match failure.kind {
        ErrorKind::UpstreamTimeout => "upstream did not answer in time",
        ErrorKind::BadBody => "request body could not be read",
        _ => "upstream request failed",
    };
    local_response(failure.kind, message, grpc)
}

/// A response the proxy makes itself; the kind goes into `x-ballast-error` and into a
/// response extension (read by the access log). A gRPC
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
    // For the access log, which reads the kind from here rather than back from the header.
    response.extensions_mut().insert(kind);
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::body::Body;

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
