//! Load generator for `bench/proxy.sh` section 6 (streaming): large HTTP/1.1 uploads
//! and downloads, and bidirectional gRPC streams, each bounded by a message/byte
//! count and by time, reporting one machine-readable line on stdout:
//!
//! ```text
//! result mode=upload clients=8 requests=41 bytes=1375731712 secs=3.012 mb_per_s=456.7 errors=0 stalled=0
//! result mode=grpc streams=32 calls=120 messages=120000 secs=3.004 msgs_per_s=39946 errors=0 stalled=0
//! ```
//!
//! * `upload`: every client keeps one HTTP/1.1 connection and POSTs bodies of
//!   `--body-bytes` (`content-length`, sent in 64 KiB chunks as the connection takes
//!   them) until `--duration` has passed; a request counts once the server answers 200
//!   with `"body_bytes":N` equal to what was sent (`ballast-sample-app` does, on any path).
//! * `download`: every client GETs the URL (e.g. the sample app's
//!   `/download?bytes=N`) and reads the body to its end, counting bytes.
//! * `grpc`: `--streams` concurrent calls of `ballast.demo.v1.Echo/Stream` (tonic over
//!   h2c, raw-bytes codec, `--connections` HTTP/2 connections), each sending up to
//!   `--messages` small messages with at most `--window` awaiting their echo, reading
//!   the echoes as they come; a finished call is followed by a new one until
//!   `--duration` has passed.
//!
//! No echo (or response) for `--stall-timeout` ends that client or stream as
//! `stalled` instead of waiting on: a proxy that holds a streaming request back until
//! its body ends never answers a ping-pong. The whole run stops at `--duration` plus
//! twice the stall timeout plus 5 s whatever happens, so the bench never hangs.
//!
//! ```text
//! cargo build --release -p ballast-proxy --example stream_load
//! target/release/examples/stream_load upload --url http://127.0.0.1:18080/upload
//! target/release/examples/stream_load grpc --url http://127.0.0.1:18080 --streams 32
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use http::uri::PathAndQuery;
use http::{Request, StatusCode, Uri, header};
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::task::JoinSet;
use tonic::client::Grpc;
use tonic::transport::{Channel, Endpoint};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Size of the chunks an upload body is sent in.
const CHUNK: usize = 64 * 1024;
const ECHO_STREAM: &str = "/ballast.demo.v1.Echo/Stream";

#[derive(Debug, Parser)]
#[command(about = "Streaming load for bench/proxy.sh section 6")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// POST large bodies over HTTP/1.1 keep-alive connections.
    Upload(Http),
    /// GET large bodies over HTTP/1.1 keep-alive connections.
    Download(Http),
    /// Bidirectional gRPC streams (Echo/Stream) over h2c.
    Grpc(GrpcArgs),
}

#[derive(Debug, Args)]
struct Common {
    /// How long to keep starting requests / sending messages (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// No progress for this long ends a client or stream as stalled.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    stall_timeout: Duration,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

#[derive(Debug, Args)]
struct Http {
    /// URL to POST to or GET (http only).
    #[arg(long)]
    url: Uri,
    /// Concurrent clients, one connection each.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Upload: bytes per request body. Download: the body length expected (0: any).
    #[arg(long, default_value_t = 32 << 20)]
    body_bytes: u64,
    /// Stop starting requests after this many, over all clients.
    #[arg(long, default_value_t = 100_000)]
    max_requests: u64,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Args)]
struct GrpcArgs {
    /// Base URL (http only: h2c with prior knowledge).
    #[arg(long)]
    url: String,
    /// HTTP/2 connections the streams are spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Concurrent streams (calls).
    #[arg(long, default_value_t = 32)]
    streams: usize,
    /// Messages sent per call, at most.
    #[arg(long, default_value_t = 1000)]
    messages: u64,
    /// Messages sent and not yet echoed, per stream, at most (1: ping-pong).
    #[arg(long, default_value_t = 4)]
    window: usize,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 64)]
    message_bytes: usize,
    /// Stop starting calls after this many, over all streams.
    #[arg(long, default_value_t = 1_000_000)]
    max_calls: u64,
    #[command(flatten)]
    common: Common,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let value: f64 = number.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s, m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

/// Totals shared by the clients or streams of one run.
#[derive(Debug, Default)]
struct Counters {
    /// Requests (calls) started, for the count limit.
    started: AtomicU64,
    /// Requests (calls) completed.
    requests: AtomicU64,
    bytes: AtomicU64,
    messages: AtomicU64,
    errors: AtomicU64,
    stalled: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// When to stop starting work, and when to give up on everything.
#[derive(Debug, Clone, Copy)]
struct Limits {
    deadline: Instant,
    hard_stop: Instant,
    stall: Duration,
}

impl Limits {
    fn new(common: &Common, start: Instant) -> Self {
        let deadline = start + common.duration;
        Self {
            deadline,
            hard_stop: deadline + 2 * common.stall_timeout + Duration::from_secs(5),
            stall: common.stall_timeout,
        }
    }
}

fn main() -> Result<(), BoxError> {
    let cli = Cli::parse();
    let threads = match &cli.mode {
        Mode::Upload(a) | Mode::Download(a) => a.common.threads,
        Mode::Grpc(a) => a.common.threads,
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?
        .block_on(run(cli.mode))
}

async fn run(mode: Mode) -> Result<(), BoxError> {
    let counters = Arc::new(Counters::default());
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    let (name, limits, width) = match mode {
        Mode::Upload(args) | Mode::Download(args) if args.clients == 0 => {
            return Err("--clients must be at least 1".into());
        }
        Mode::Upload(args) => {
            let limits = Limits::new(&args.common, start);
            let args = Arc::new(args);
            for _ in 0..args.clients {
                let (args, counters) = (Arc::clone(&args), Arc::clone(&counters));
                tasks.spawn(async move { http_client(true, &args, limits, &counters).await });
            }
            ("upload", limits, args.clients)
        }
        Mode::Download(args) => {
            let limits = Limits::new(&args.common, start);
            let args = Arc::new(args);
            for _ in 0..args.clients {
                let (args, counters) = (Arc::clone(&args), Arc::clone(&counters));
                tasks.spawn(async move { http_client(false, &args, limits, &counters).await });
            }
            ("download", limits, args.clients)
        }
        Mode::Grpc(args) => {
            if args.streams == 0 || args.connections == 0 || args.window == 0 {
                return Err("--streams, --connections and --window must be at least 1".into());
            }
            let limits = Limits::new(&args.common, start);
            let endpoint = Endpoint::from_shared(args.url.clone())?
                .tcp_nodelay(true)
                .connect_timeout(limits.stall);
            let mut channels = Vec::with_capacity(args.connections);
            for _ in 0..args.connections {
                match tokio::time::timeout(limits.stall, endpoint.connect()).await {
                    Ok(Ok(channel)) => channels.push(channel),
                    Ok(Err(err)) => return Err(format!("connecting to {}: {err}", args.url).into()),
                    Err(_) => return Err(format!("connecting to {} timed out", args.url).into()),
                }
            }
            let args = Arc::new(args);
            for i in 0..args.streams {
                let channel = channels[i % channels.len()].clone();
                let (args, counters) = (Arc::clone(&args), Arc::clone(&counters));
                tasks.spawn(async move { grpc_worker(channel, &args, limits, &counters).await });
            }
            ("grpc", limits, args.streams)
        }
    };

    // Every task ends by itself well before the hard stop; this is the backstop.
    let mut cut = 0;
    loop {
        match tokio::time::timeout_at(limits.hard_stop.into(), tasks.join_next()).await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                cut = tasks.len();
                tasks.abort_all();
                break;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let c = &counters;
    let stalled = Counters::get(&c.stalled) + cut as u64;
    let errors = Counters::get(&c.errors);
    if name == "grpc" {
        let messages = Counters::get(&c.messages);
        println!(
            "result mode=grpc streams={width} calls={} messages={messages} secs={secs:.3} \
             msgs_per_s={:.0} errors={errors} stalled={stalled}",
            Counters::get(&c.requests),
            messages as f64 / secs,
        );
    } else {
        let bytes = Counters::get(&c.bytes);
        println!(
            "result mode={name} clients={width} requests={} bytes={bytes} secs={secs:.3} \
             mb_per_s={:.1} errors={errors} stalled={stalled}",
            Counters::get(&c.requests),
            bytes as f64 / 1e6 / secs,
        );
    }
    Ok(())
}

// ------------------------------------------------------------------ HTTP/1.1 --

/// An upload body: `remaining` bytes as slices of one shared chunk.
#[derive(Debug)]
struct Upload {
    remaining: u64,
    chunk: Bytes,
}

impl hyper::body::Body for Upload {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.remaining == 0 {
            return std::task::Poll::Ready(None);
        }
        let len = usize::try_from(self.remaining).map_or(CHUNK, |r| r.min(CHUNK));
        self.remaining -= len as u64;
        std::task::Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..len)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// How one request ended.
enum Outcome {
    /// Counted: bytes moved.
    Done(u64),
    Failed(String),
    Stalled,
}

/// One client: a keep-alive connection (made again after a failure), requests one
/// after another until the deadline or the request limit.
async fn http_client(upload: bool, args: &Http, limits: Limits, counters: &Counters) {
    let chunk = Bytes::from(vec![b'u'; CHUNK]);
    let mut sender: Option<http1::SendRequest<Upload>> = None;
    let mut failures_in_a_row = 0u32;
    while Instant::now() < limits.deadline
        && counters.started.fetch_add(1, Ordering::Relaxed) < args.max_requests
    {
        let ready = match sender.as_mut() {
            Some(s) => s.ready().await.is_ok(),
            None => false,
        };
        if !ready {
            sender = match connect(&args.url, limits.stall).await {
                Ok(s) => Some(s),
                Err(err) => {
                    eprintln!("connect {}: {err}", args.url);
                    Counters::add(&counters.errors, 1);
                    failures_in_a_row += 1;
                    if failures_in_a_row >= 5 {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
        }
        let Some(s) = sender.as_mut() else { continue };
        let outcome = one_request(s, upload, args, &chunk, limits.stall).await;
        match outcome {
            Outcome::Done(bytes) => {
                failures_in_a_row = 0;
                Counters::add(&counters.requests, 1);
                Counters::add(&counters.bytes, bytes);
            }
            Outcome::Failed(why) => {
                eprintln!("request to {} failed: {why}", args.url);
                Counters::add(&counters.errors, 1);
                sender = None;
                failures_in_a_row += 1;
                if failures_in_a_row >= 5 {
                    return;
                }
            }
            Outcome::Stalled => {
                eprintln!(
                    "request to {} stalled (no progress for {:?})",
                    args.url, limits.stall
                );
                Counters::add(&counters.stalled, 1);
                return;
            }
        }
    }
}

async fn connect(url: &Uri, timeout: Duration) -> Result<http1::SendRequest<Upload>, BoxError> {
    let authority = url.authority().ok_or("the URL has no host")?.as_str();
    let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(authority))
        .await
        .map_err(|_| "connect timed out")??;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Sends one request and reads its response, giving up after `stall` without
/// progress: before the response head, or between two body frames.
async fn one_request(
    sender: &mut http1::SendRequest<Upload>,
    upload: bool,
    args: &Http,
    chunk: &Bytes,
    stall: Duration,
) -> Outcome {
    let path = args.url.path_and_query().map_or("/", PathAndQuery::as_str);
    let authority = args.url.authority().map_or("", |a| a.as_str());
    let sent = if upload { args.body_bytes } else { 0 };
    let request = Request::builder()
        .method(if upload { "POST" } else { "GET" })
        .uri(path)
        .header(header::HOST, authority)
        .header(header::CONTENT_TYPE, "application/octet-stream");
    let request = if upload {
        request.header(header::CONTENT_LENGTH, sent)
    } else {
        request
    };
    let request = match request.body(Upload {
        remaining: sent,
        chunk: chunk.clone(),
    }) {
        Ok(r) => r,
        Err(err) => return Outcome::Failed(err.to_string()),
    };
    // An upload's response comes once the whole body went through: allow for the
    // body at a crawl (1 MB/s) on top of the stall timeout.
    let head_timeout = stall + Duration::from_secs(sent / 1_000_000);
    let response = match tokio::time::timeout(head_timeout, sender.send_request(request)).await {
        Err(_) => return Outcome::Stalled,
        Ok(Err(err)) => return Outcome::Failed(err.to_string()),
        Ok(Ok(response)) => response,
    };
    let status = response.status();
    let mut body = response.into_body();
    let mut received = 0u64;
    let mut kept = Vec::new();
    loop {
        match tokio::time::timeout(stall, body.frame()).await {
            Err(_) => return Outcome::Stalled,
            Ok(None) => break,
            Ok(Some(Err(err))) => return Outcome::Failed(err.to_string()),
            Ok(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    received += data.len() as u64;
                    if upload && kept.len() < 4096 {
                        kept.extend_from_slice(data);
                    }
                }
            }
        }
    }
    if status != StatusCode::OK {
        return Outcome::Failed(format!("status {status}"));
    }
    if upload {
        let answer = String::from_utf8_lossy(&kept);
        let counted = answer.split_once("\"body_bytes\":").and_then(|(_, rest)| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        });
        match counted {
            Some(n) if n == sent => Outcome::Done(sent),
            other => Outcome::Failed(format!("sent {sent} bytes, server counted {other:?}")),
        }
    } else if args.body_bytes != 0 && received != args.body_bytes {
        Outcome::Failed(format!(
            "expected {} bytes, received {received}",
            args.body_bytes
        ))
    } else {
        Outcome::Done(received)
    }
}

// ---------------------------------------------------------------------- gRPC --

#[path = "../tests/support/raw_codec.rs"]
mod raw_codec;
use raw_codec::RawCodec;

/// `EchoRequest { string message = 1; }` with `len` bytes of text.
fn echo_request(len: usize) -> Bytes {
    let mut out = Vec::with_capacity(len + 12);
    out.push(0x0a);
    let mut n = len as u64;
    while n >= 0x80 {
        out.push((n & 0x7f) as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
    out.resize(out.len() + len, b'm');
    Bytes::from(out)
}

/// One stream slot: calls one after another until the deadline or the call limit;
/// a stalled call ends the slot.
async fn grpc_worker(channel: Channel, args: &GrpcArgs, limits: Limits, counters: &Counters) {
    let message = echo_request(args.message_bytes);
    let mut grpc = Grpc::new(channel);
    let mut failures_in_a_row = 0u32;
    while Instant::now() < limits.deadline
        && counters.started.fetch_add(1, Ordering::Relaxed) < args.max_calls
    {
        match echo_call(&mut grpc, args, &message, limits, counters).await {
            Outcome::Done(_) => {
                failures_in_a_row = 0;
                Counters::add(&counters.requests, 1);
            }
            Outcome::Failed(why) => {
                eprintln!("grpc call failed: {why}");
                Counters::add(&counters.errors, 1);
                failures_in_a_row += 1;
                if failures_in_a_row >= 5 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Outcome::Stalled => {
                eprintln!("grpc call stalled (no echo for {:?})", limits.stall);
                Counters::add(&counters.stalled, 1);
                return;
            }
        }
    }
}

/// One `Echo/Stream` call: keeps up to `window` messages awaiting their echo, sends
/// the next one as each echo arrives, stops sending at `messages` or the deadline, then
/// half-closes and reads the remaining echoes and the status.
async fn echo_call(
    grpc: &mut Grpc<Channel>,
    args: &GrpcArgs,
    message: &Bytes,
    limits: Limits,
    counters: &Counters,
) -> Outcome {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(args.window);
    let requests =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut sent = 0u64;
    let mut tx = Some(tx);
    // The first window goes out with the request, before its response head: a proxy
    // may wait for body bytes before it forwards anything.
    while sent < args.messages && (sent as usize) < args.window {
        if let Some(t) = &tx
            && t.try_send(message.clone()).is_ok()
        {
            sent += 1;
        } else {
            break;
        }
    }
    if sent >= args.messages {
        tx = None;
    }
    match tokio::time::timeout(limits.stall, grpc.ready()).await {
        Err(_) => return Outcome::Stalled,
        Ok(Err(err)) => return Outcome::Failed(format!("channel not ready: {err}")),
        Ok(Ok(())) => {}
    }
    let path = PathAndQuery::from_static(ECHO_STREAM);
    let call = grpc.streaming(tonic::Request::new(requests), path, RawCodec);
    let mut replies = match tokio::time::timeout(limits.stall, call).await {
        Err(_) => return Outcome::Stalled,
        Ok(Err(status)) => return Outcome::Failed(format!("{status}")),
        Ok(Ok(response)) => response.into_inner(),
    };
    let mut received = 0u64;
    loop {
        match tokio::time::timeout(limits.stall, replies.message()).await {
            Err(_) => return Outcome::Stalled,
            Ok(Err(status)) => return Outcome::Failed(format!("{status}")),
            Ok(Ok(None)) => break,
            Ok(Ok(Some(_))) => {
                received += 1;
                Counters::add(&counters.messages, 1);
                if let Some(t) = &tx {
                    if sent < args.messages && Instant::now() < limits.deadline {
                        if t.send(message.clone()).await.is_err() {
                            return Outcome::Failed("the request stream closed".into());
                        }
                        sent += 1;
                    }
                    if sent >= args.messages || Instant::now() >= limits.deadline {
                        tx = None;
                    }
                }
            }
        }
    }
    if received != sent {
        return Outcome::Failed(format!("sent {sent} messages, {received} echoed"));
    }
    Outcome::Done(received)
}
