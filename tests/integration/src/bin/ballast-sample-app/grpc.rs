//! gRPC on the sample app's port: the standard health service
//! (`grpc.health.v1.Health/Check`, what the kubelet's `grpc` readiness probe calls)
//! and a demo echo service whose replies name the pod that answered, so a client
//! on one long-lived channel can see its calls spread over the pods.
//!
//! A request is gRPC when it arrives over HTTP/2 as a POST with content type
//! `application/grpc` (gRPC needs trailers, which HTTP/1.1 clients rarely
//! accept); everything else stays with the HTTP routes. Messages are protobuf,
//! encoded by hand: the handful of fields below is all there is, and a code
//! generator would take longer to build than the whole app.
//!
//! ```proto
//! package grpc.health.v1;  // the standard service; Watch is not implemented
//! service Health { rpc Check(HealthCheckRequest) returns (HealthCheckResponse); }
//! message HealthCheckRequest { string service = 1; }
//! message HealthCheckResponse { ServingStatus status = 1; }  // SERVING = 1, NOT_SERVING = 2
//!
//! package ballast.demo.v1;
//! service Echo {
//!   rpc Unary(EchoRequest) returns (EchoReply);
//!   // One reply per request message, sent as soon as that message arrives.
//!   rpc Stream(stream EchoRequest) returns (stream EchoReply);
//! }
//! message EchoRequest { string message = 1; }
//! message EchoReply { string message = 1; string pod = 2; }
//! ```

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, Version};
use tokio::sync::mpsc;
use tracing::debug;

use crate::State;

const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
const ECHO_UNARY: &str = "/ballast.demo.v1.Echo/Unary";
const ECHO_STREAM: &str = "/ballast.demo.v1.Echo/Stream";
/// The names `Health/Check` answers for; "" is the server as a whole (the
/// kubelet asks for it unless the probe names a service).
const HEALTH_SERVICES: [&str; 2] = ["", "ballast.demo.v1.Echo"];
/// gRPC's default limit on a received message.
const MAX_MESSAGE: usize = 4 * 1024 * 1024;
/// `HealthCheckResponse.ServingStatus` values.
const SERVING: u64 = 1;
const NOT_SERVING: u64 = 2;
/// Replies buffered for a slow `Echo/Stream` reader before the echo waits for it.
const STREAM_BUFFER: usize = 16;

/// A gRPC response body: reply messages, then the trailers with the status;
/// or nothing at all when the status went out with the headers (Trailers-Only).
#[derive(Debug)]
pub(crate) struct GrpcBody {
    frames: Option<mpsc::Receiver<Frame<Bytes>>>,
}

/// The gRPC status codes this server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Code {
    Ok = 0,
    Cancelled = 1,
    NotFound = 5,
    ResourceExhausted = 8,
    Unimplemented = 12,
    Internal = 13,
}

/// How a call ended, as sent in `grpc-status` and `grpc-message`.
#[derive(Debug)]
struct Status {
    code: Code,
    message: String,
}

/// Splits a request body into gRPC messages: 1-byte compressed flag, 4-byte
/// big-endian length, then the message.
#[derive(Debug, Default)]
struct Decoder {
    buf: BytesMut,
}

impl Body for GrpcBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.frames.as_mut() {
            None => Poll::Ready(None),
            Some(frames) => frames.poll_recv(cx).map(|frame| frame.map(Ok)),
        }
    }

    // True for Trailers-Only, so hyper ends the stream on the HEADERS frame:
    // clients read `grpc-status` from the headers only when the stream ends there.
    fn is_end_stream(&self) -> bool {
        self.frames.is_none()
    }
}

impl Status {
    fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    fn ok() -> Self {
        Self::new(Code::Ok, "")
    }

    /// A request message that is not the protobuf it should be. gRPC servers
    /// answer INTERNAL for messages they cannot parse.
    fn malformed(what: &str) -> Self {
        Self::new(
            Code::Internal,
            format!("cannot decode the request message: {what}"),
        )
    }

    fn trailers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-status", HeaderValue::from(self.code as u16));
        if !self.message.is_empty()
            && let Ok(message) = HeaderValue::from_str(&percent_encode(&self.message))
        {
            headers.insert("grpc-message", message);
        }
        headers
    }
}

impl Decoder {
    fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete message, if the buffer holds one.
    fn next_message(&mut self) -> Result<Option<Bytes>, Status> {
        let Some(prefix) = self.buf.get(..5) else {
            return Ok(None);
        };
        match prefix[0] {
            0 => {}
            // No `grpc-encoding` other than identity is accepted, so a
            // compressed message breaks the protocol.
            1 => {
                return Err(Status::new(
                    Code::Unimplemented,
                    "compressed messages are not supported",
                ));
            }
            flag => {
                return Err(Status::new(
                    Code::Internal,
                    format!("invalid compressed flag {flag}"),
                ));
            }
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > MAX_MESSAGE {
            return Err(Status::new(
                Code::ResourceExhausted,
                format!("a message of {len} bytes exceeds the limit of {MAX_MESSAGE}"),
            ));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        self.buf.advance(5);
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// Fails when the request ended in the middle of a message.
    fn finish(&self) -> Result<(), Status> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Status::new(
                Code::Internal,
                "the request ended inside a message",
            ))
        }
    }
}

/// Whether `req` is a gRPC call (HTTP/2, POST, content type `application/grpc`
/// or one of its `+codec` / `;parameter` forms; `application/grpc-web` is
/// another protocol and stays with the HTTP routes).
pub(crate) fn is_grpc<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_2
        && req.method() == Method::POST
        && req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| {
                ct.strip_prefix("application/grpc")
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ';']))
            })
}

/// Answers one gRPC call. A failed call is still HTTP 200: gRPC clients read
/// the outcome from `grpc-status`, never from the HTTP status.
pub(crate) async fn serve(state: Arc<State>, req: Request<Incoming>) -> Response<GrpcBody> {
    if let Some(encoding) = req.headers().get("grpc-encoding")
        && encoding != "identity"
    {
        return trailers_only(Status::new(
            Code::Unimplemented,
            "only the identity grpc-encoding is supported",
        ));
    }
    match req.uri().path() {
        HEALTH_CHECK => match read_unary(req.into_body()).await {
            Ok(request) => respond(health(&state, &request)),
            Err(status) => trailers_only(status),
        },
        ECHO_UNARY => match read_unary(req.into_body()).await {
            Ok(request) => respond(echo(&state, &request).await),
            Err(status) => trailers_only(status),
        },
        ECHO_STREAM => echo_stream(state, req.into_body()),
        other => trailers_only(Status::new(
            Code::Unimplemented,
            format!("unknown method {other}"),
        )),
    }
}

/// `Health/Check`: SERVING until SIGTERM in graceful mode, then NOT_SERVING
/// (the gRPC twin of `/healthz` failing).
fn health(state: &State, request: &[u8]) -> Result<Vec<u8>, Status> {
    let service = string_field(request, 1)?;
    if !HEALTH_SERVICES.contains(&service.as_str()) {
        return Err(Status::new(
            Code::NotFound,
            format!("unknown service {service:?}"),
        ));
    }
    let status = if state.shutting_down.load(Ordering::SeqCst) {
        NOT_SERVING
    } else {
        SERVING
    };
    let mut reply = Vec::new();
    put_varint_field(&mut reply, 1, status);
    Ok(reply)
}

/// `Echo/Unary`, and each message of `Echo/Stream`: the message back, with the
/// pod's name, after the configured latency.
async fn echo(state: &State, request: &[u8]) -> Result<Vec<u8>, Status> {
    let message = string_field(request, 1)?;
    state.requests.fetch_add(1, Ordering::SeqCst);
    if !state.latency.is_zero() {
        tokio::time::sleep(state.latency).await;
    }
    let mut reply = Vec::new();
    put_string_field(&mut reply, 1, &message);
    put_string_field(&mut reply, 2, &state.pod);
    Ok(reply)
}

/// `Echo/Stream`: the response starts at once and each reply follows its
/// request message, so the client sees replies while it is still sending.
fn echo_stream(state: Arc<State>, body: Incoming) -> Response<GrpcBody> {
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        let status = echo_each(&state, body, &tx)
            .await
            .err()
            .unwrap_or_else(Status::ok);
        if status.code != Code::Ok {
            debug!(code = ?status.code, message = %status.message, "grpc stream failed");
        }
        // Fails only when the client is gone, and then there is no one to tell.
        let _ = tx.send(Frame::trailers(status.trailers())).await;
    });
    response(GrpcBody { frames: Some(rx) })
}

async fn echo_each(
    state: &State,
    mut body: Incoming,
    tx: &mpsc::Sender<Frame<Bytes>>,
) -> Result<(), Status> {
    let mut decoder = Decoder::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(read_failed)?;
        // Request trailers carry nothing a server needs.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        decoder.push(&data);
        while let Some(message) = decoder.next_message()? {
            let reply = echo(state, &message).await?;
            if tx.send(Frame::data(frame_message(&reply))).await.is_err() {
                return Err(Status::new(Code::Cancelled, "the client went away"));
            }
        }
    }
    decoder.finish()
}

/// The one message of a unary call.
async fn read_unary(mut body: Incoming) -> Result<Bytes, Status> {
    let mut decoder = Decoder::default();
    let mut message = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(read_failed)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        decoder.push(&data);
        while let Some(next) = decoder.next_message()? {
            if message.replace(next).is_some() {
                return Err(Status::new(
                    Code::Internal,
                    "a unary call carries exactly one request message",
                ));
            }
        }
    }
    decoder.finish()?;
    message.ok_or_else(|| Status::new(Code::Internal, "the request carried no message"))
}

fn read_failed(err: hyper::Error) -> Status {
    Status::new(Code::Internal, format!("reading the request failed: {err}"))
}

/// Headers every gRPC response starts with.
fn response(body: GrpcBody) -> Response<GrpcBody> {
    let mut resp = Response::new(body);
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert("grpc-accept-encoding", HeaderValue::from_static("identity"));
    resp
}

/// A unary reply (one message, then `grpc-status: 0`), or the failure.
fn respond(reply: Result<Vec<u8>, Status>) -> Response<GrpcBody> {
    let reply = match reply {
        Ok(reply) => reply,
        Err(status) => return trailers_only(status),
    };
    let (tx, rx) = mpsc::channel(2);
    // The channel holds both frames, so neither send can fail.
    let _ = tx.try_send(Frame::data(frame_message(&reply)));
    let _ = tx.try_send(Frame::trailers(Status::ok().trailers()));
    response(GrpcBody { frames: Some(rx) })
}

/// A failed call: the status in the headers, no body (gRPC's Trailers-Only).
fn trailers_only(status: Status) -> Response<GrpcBody> {
    debug!(code = ?status.code, message = %status.message, "grpc call failed");
    let mut resp = response(GrpcBody { frames: None });
    resp.headers_mut().extend(status.trailers());
    resp
}

fn frame_message(message: &[u8]) -> Bytes {
    let mut framed = BytesMut::with_capacity(5 + message.len());
    framed.put_u8(0);
    // Replies are bounded by the request limit (4 MiB) plus a pod name.
    framed.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    framed.put_slice(message);
    framed.freeze()
}

/// `grpc-message` is percent-encoded: printable ASCII except `%` stays.
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A varint field (proto3 leaves out a field at its default, 0).
fn put_varint_field(out: &mut Vec<u8>, field: u32, value: u64) {
    if value != 0 {
        put_varint(out, u64::from(field) << 3);
        put_varint(out, value);
    }
}

/// A string field (proto3 leaves out a field at its default, "").
fn put_string_field(out: &mut Vec<u8>, field: u32, value: &str) {
    if !value.is_empty() {
        put_varint(out, (u64::from(field) << 3) | 2);
        put_varint(out, value.len() as u64);
        out.extend_from_slice(value.as_bytes());
    }
}

fn get_varint(input: &mut &[u8]) -> Result<u64, Status> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input
            .split_first()
            .ok_or_else(|| Status::malformed("truncated varint"))?;
        *input = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(Status::malformed("varint longer than 10 bytes"))
}

fn take<'a>(input: &mut &'a [u8], len: u64) -> Result<&'a [u8], Status> {
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if input.len() < len {
        return Err(Status::malformed("truncated field"));
    }
    let (taken, rest) = input.split_at(len);
    *input = rest;
    Ok(taken)
}

/// String field `field` of `message`: "" when absent, the last one when
/// repeated (protobuf's rule); every other field is skipped, as protobuf
/// parsers skip fields they do not know.
fn string_field(mut message: &[u8], field: u32) -> Result<String, Status> {
    let mut value: &[u8] = &[];
    while !message.is_empty() {
        let key = get_varint(&mut message)?;
        let (number, wire_type) = (key >> 3, key & 7);
        if number == 0 {
            return Err(Status::malformed("field number 0"));
        }
        match wire_type {
            0 => {
                get_varint(&mut message)?;
            }
            1 => {
                take(&mut message, 8)?;
            }
            2 => {
                let len = get_varint(&mut message)?;
                let bytes = take(&mut message, len)?;
                if number == u64::from(field) {
                    value = bytes;
                    continue;
                }
            }
            5 => {
                take(&mut message, 4)?;
            }
            _ => return Err(Status::malformed("unsupported wire type")),
        }
        if number == u64::from(field) {
            return Err(Status::malformed(
                "a string field with a non-string wire type",
            ));
        }
    }
    String::from_utf8(value.to_vec()).map_err(|_| Status::malformed("a string that is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(bytes: &[u8]) -> Result<Vec<Bytes>, Status> {
        let mut decoder = Decoder::default();
        let mut out = Vec::new();
        // One byte at a time: messages split across DATA frames anywhere.
        for byte in bytes {
            decoder.push(std::slice::from_ref(byte));
            while let Some(message) = decoder.next_message()? {
                out.push(message);
            }
        }
        decoder.finish()?;
        Ok(out)
    }

    #[test]
    fn string_field_skips_other_fields_and_takes_the_last_value() {
        let mut message = Vec::new();
        put_varint_field(&mut message, 3, 300);
        put_string_field(&mut message, 1, "first");
        message.extend_from_slice(&[0x2d, 1, 2, 3, 4]); // field 5, fixed32
        message.extend_from_slice(&[0x31, 1, 2, 3, 4, 5, 6, 7, 8]); // field 6, fixed64
        put_string_field(&mut message, 2, "other");
        put_string_field(&mut message, 1, "second");
        assert_eq!(string_field(&message, 1).expect("decodes"), "second");
        assert_eq!(string_field(&message, 2).expect("decodes"), "other");
        assert_eq!(string_field(&message, 4).expect("decodes"), "");
        assert_eq!(string_field(&[], 1).expect("decodes"), "");
    }

    #[test]
    fn malformed_messages_are_internal_errors() {
        for bad in [
            &[0x0a, 5, b'a'][..],       // length past the end
            &[0x0a][..],                // key without a value
            &[0x80][..],                // truncated varint
            &[0x0b][..],                // group start: unsupported wire type
            &[0x08, 1][..],             // field 1 as a varint
            &[0x02, 1, b'x'][..],       // field number 0
            &[0x0a, 2, 0xc3, 0x28][..], // invalid UTF-8
            &[
                0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ][..],
        ] {
            let err = string_field(bad, 1).expect_err("malformed");
            assert_eq!(err.code, Code::Internal, "{bad:?}: {}", err.message);
        }
    }

    #[test]
    fn varints_round_trip() {
        for value in [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            let mut input = &out[..];
            assert_eq!(get_varint(&mut input).expect("decodes"), value);
            assert!(input.is_empty());
        }
    }

    #[test]
    fn decoder_splits_messages_across_frames() {
        let mut stream = Vec::new();
        for message in [&b"one"[..], b"", b"three"] {
            stream.extend_from_slice(&frame_message(message));
        }
        let messages = decode_all(&stream).expect("decodes");
        assert_eq!(messages, [&b"one"[..], b"", b"three"]);
    }

    #[test]
    fn decoder_refuses_truncated_compressed_and_oversized_messages() {
        let truncated = &frame_message(b"hello")[..7];
        assert_eq!(
            decode_all(truncated).expect_err("truncated").code,
            Code::Internal
        );
        assert_eq!(
            decode_all(&[1, 0, 0, 0, 1, 0])
                .expect_err("compressed")
                .code,
            Code::Unimplemented
        );
        assert_eq!(
            decode_all(&[2, 0, 0, 0, 0]).expect_err("bad flag").code,
            Code::Internal
        );
        let too_long = u32::try_from(MAX_MESSAGE + 1).expect("fits").to_be_bytes();
        let header = [0, too_long[0], too_long[1], too_long[2], too_long[3]];
        assert_eq!(
            decode_all(&header).expect_err("oversized").code,
            Code::ResourceExhausted
        );
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(
            percent_encode("unknown service \"x\" 100% ✓"),
            "unknown service \"x\" 100%25 %E2%9C%93"
        );
    }

    #[test]
    fn grpc_content_types() {
        let request = |version, method, content_type: &str| {
            Request::builder()
                .version(version)
                .method(method)
                .header(CONTENT_TYPE, content_type)
                .body(())
                .expect("request")
        };
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc;x=1",
        ] {
            assert!(is_grpc(&request(Version::HTTP_2, Method::POST, ct)), "{ct}");
        }
        assert!(!is_grpc(&request(
            Version::HTTP_2,
            Method::POST,
            "application/grpc-web"
        )));
        assert!(!is_grpc(&request(
            Version::HTTP_2,
            Method::POST,
            "application/json"
        )));
        assert!(!is_grpc(&request(
            Version::HTTP_2,
            Method::GET,
            "application/grpc"
        )));
        assert!(!is_grpc(&request(
            Version::HTTP_11,
            Method::POST,
            "application/grpc"
        )));
    }
}
