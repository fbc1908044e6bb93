//! What the proxy needs to know about gRPC: which requests are gRPC calls, the
//! `grpc-timeout` a client sets, and how to answer a call the proxy cannot forward so
//! that a gRPC client library understands (a trailers-only response with
//! `grpc-status`), instead of an HTTP error it would report as UNKNOWN or INTERNAL.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use std::time::Duration;

/// The client's deadline for the call.
pub static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// The gRPC status codes the proxy answers with (a subset of gRPC's `Code`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// The call took longer than its deadline or the proxy's timeouts.
    DeadlineExceeded = 4,
    /// The proxy refused the call to protect itself or the pods.
    ResourceExhausted = 8,
    /// The request was malformed.
    Internal = 13,
    /// No pod could take the call; a client may retry.
    Unavailable = 14,
}

impl Code {
    fn header(self) -> HeaderValue {
        HeaderValue::from(self as u16)
    }
}

/// Whether the request is a gRPC call (`content-type: application/grpc` or
/// `application/grpc+proto` and the like).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| is_grpc_content_type(v.as_bytes()))
}

fn is_grpc_content_type(value: &[u8]) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    value.len() >= GRPC.len()
        && value[..GRPC.len()].eq_ignore_ascii_case(GRPC)
        && matches!(value.get(GRPC.len()), None | Some(b'+' | b';'))
}

/// The call's deadline from its `grpc-timeout` header: at most 8 digits and a unit
/// (`H`, `M`, `S`, `m`, `u`, `n`), as the gRPC HTTP/2 protocol defines it. A malformed
/// value is ignored, as gRPC servers do.
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(&GRPC_TIMEOUT)?.as_bytes();
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(amount * 3600),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// `grpc-status` and `grpc-message` for `code`, to end a call: as the headers of a
/// trailers-only answer, or as the trailers of a response already under way.
pub fn status(code: Code, message: &str) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(2);
    headers.insert(&GRPC_STATUS, code.header());
    if let Ok(message) = HeaderValue::from_str(&percent_encode(message)) {
        headers.insert(&GRPC_MESSAGE, message);
    }
    headers
}

/// The headers of a trailers-only answer: HTTP 200, `content-type: application/grpc`
/// and the status.
pub fn trailers_only(code: Code, message: &str) -> HeaderMap {
    let mut headers = status(code, message);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers
}

/// `grpc-message` is percent-encoded: every byte outside printable ASCII, and `%`.
fn percent_encode(message: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(message.len());
    for &byte in message.as_bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(name: &'static str, value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(name, HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn grpc_content_types() {
        assert!(is_grpc(&with("content-type", "application/grpc")));
        assert!(is_grpc(&with("content-type", "application/grpc+proto")));
        assert!(is_grpc(&with(
            "content-type",
            "Application/GRPC; charset=utf-8"
        )));
        assert!(!is_grpc(&with("content-type", "application/grpc-web")));
        assert!(!is_grpc(&with("content-type", "application/json")));
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn timeouts_in_every_unit_and_malformed_ones_ignored() {
        let t = |v| timeout(&with("grpc-timeout", v));
        assert_eq!(t("250m"), Some(Duration::from_millis(250)));
        assert_eq!(t("5S"), Some(Duration::from_secs(5)));
        assert_eq!(t("2M"), Some(Duration::from_secs(120)));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("100u"), Some(Duration::from_micros(100)));
        assert_eq!(t("99999999n"), Some(Duration::from_nanos(99_999_999)));
        assert_eq!(t("123456789m"), None, "more than 8 digits");
        assert_eq!(t("m"), None);
        assert_eq!(t("10x"), None);
        assert_eq!(t("-1S"), None);
        assert_eq!(timeout(&HeaderMap::new()), None);
    }

    #[test]
    fn trailers_only_answers_carry_status_and_an_encoded_message() {
        let headers = trailers_only(Code::Unavailable, "no endpoint: 100% busy\n");
        assert_eq!(headers["grpc-status"], "14");
        assert_eq!(headers["grpc-message"], "no endpoint: 100%25 busy%0A");
        assert_eq!(headers["content-type"], "application/grpc");
        assert_eq!(status(Code::DeadlineExceeded, "late")["grpc-status"], "4");
        assert_eq!(status(Code::ResourceExhausted, "full")["grpc-status"], "8");
        assert_eq!(status(Code::Internal, "bad")["grpc-status"], "13");
    }
}
