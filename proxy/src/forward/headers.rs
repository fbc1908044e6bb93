//! Request and response heads on their way through: framing checks against request
//! smuggling, hop-by-hop headers, the forwarded headers and the request id.

use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Uri, Version};

/// Refuses request-smuggling shapes that must never reach a backend. One pass over the
/// headers (most requests carry neither framing header, and a pass over a dozen names is
/// cheaper than three lookups).
pub(super) fn check_framing(headers: &HeaderMap) -> Result<(), &'static str> {
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

pub(super) fn is_upgrade<B>(request: &Request<B>) -> bool {
    request.version() == Version::HTTP_11
        && request.headers().contains_key(header::UPGRADE)
        && connection_tokens(request.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

pub(super) fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
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
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
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

pub(super) fn prepare_upstream_headers(
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
pub(super) fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
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
