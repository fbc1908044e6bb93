//! Load for rollout scenarios, shaped like a gateway's: a few keep-alive connections
//! carrying a fixed total rate of short GETs, a few connections carrying long requests,
//! and WebSocket sessions. Like a gateway, a client opens a new connection when the
//! server closes one (`Connection: close`, or an idle close it notices before sending)
//! and never retries a request. Every loop stops at [`Load::stop`] or at its deadline.

use crate::lock;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;

/// Limit of one request (long ones included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What to send.
#[derive(Clone, Debug)]
pub struct LoadPlan {
    /// Where the clients connect (the front Service).
    pub target: SocketAddr,
    /// Short GETs per second, in all.
    pub rate: u32,
    /// Keep-alive connections sharing `rate`.
    pub clients: u32,
    /// Connections sending long requests back to back.
    pub long_clients: u32,
    /// Duration of a long request, in milliseconds.
    pub long_ms: RangeInclusive<u64>,
    /// Pause of a long-request client between two long requests (they are sent only
    /// while [`Load::set_long_requests`] says so).
    pub long_pause: Duration,
    /// Connections running WebSocket sessions back to back.
    pub ws_clients: u32,
    /// Length of one WebSocket session.
    pub ws_session: Duration,
    /// The first WebSocket client's first session lasts until it is closed by the
    /// other side (or the load stops): the session longer than any drain timeout.
    pub long_ws: bool,
    /// Seed of the long requests' durations.
    pub seed: u64,
    /// Hard end, whatever happens.
    pub deadline: Duration,
}

impl LoadPlan {
    /// `clients` keep-alive connections sharing `rate` short GETs per second to
    /// `target`, nothing else, for at most `deadline`.
    pub fn short(
        target: SocketAddr,
        rate: u32,
        clients: u32,
        seed: u64,
        deadline: Duration,
    ) -> Self {
        Self {
            target,
            rate,
            clients,
            long_clients: 0,
            long_ms: 0..=0,
            long_pause: Duration::ZERO,
            ws_clients: 0,
            ws_session: Duration::ZERO,
            long_ws: false,
            seed,
            deadline,
        }
    }
}

/// What the clients saw.
#[derive(Clone, Debug, Default)]
pub struct LoadStats {
    /// Requests sent (short and long).
    pub sent: u64,
    /// Answered below 500.
    pub ok: u64,
    /// 5xx, no answer, broken connection or timeout.
    pub failed: u64,
    /// Failures by kind.
    pub failures: BTreeMap<&'static str, u64>,
    /// Answered requests by `x-served-by`.
    pub served_by: BTreeMap<String, u64>,
    /// Long requests answered.
    pub long_ok: u64,
    /// Long requests in flight now.
    pub long_in_flight: u64,
    /// Connections opened by the HTTP clients.
    pub connections: u64,
    /// WebSocket sessions that ran their full length and closed cleanly.
    pub ws_completed: u64,
    /// WebSocket sessions broken before their end (failures).
    pub ws_broken: u64,
    /// Times the long WebSocket session was closed by the other side (expected once:
    /// the forced end of a drain).
    pub ws_long_closed: u64,
    /// [`Load::mark`] calls so far.
    pub marks: u64,
    /// Requests that failed on a connection opened before the last mark.
    pub failed_before_mark: u64,
}

impl LoadStats {
    /// Failed requests plus broken (short) WebSocket sessions.
    /// Requests that failed on a connection opened before the last [`Load::mark`]
    /// (included in `failed`).
    pub fn failed_on_earlier_connections(&self) -> u64 {
        self.failed_before_mark
    }

    pub fn failures_total(&self) -> u64 {
        self.failed + self.ws_broken
    }
}

/// Load that is running.
#[derive(Debug)]
pub struct Load {
    stats: Arc<Mutex<LoadStats>>,
    stop: watch::Sender<bool>,
    long_requests: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts every client.
    pub fn start(plan: &LoadPlan) -> Self {
        let stats = Arc::new(Mutex::new(LoadStats::default()));
        let (stop, stopped) = watch::channel(false);
        let (long_requests, long_on) = watch::channel(false);
        let end = Instant::now() + plan.deadline;
        let mut tasks = Vec::new();
        let interval =
            Duration::from_secs_f64(f64::from(plan.clients) / f64::from(plan.rate.max(1)));
        for i in 0..plan.clients {
            tasks.push(tokio::spawn(http_client(
                plan.target,
                Shape::Short { interval },
                Context::new(&stats, &stopped, end, plan.seed + u64::from(i)),
            )));
        }
        for i in 0..plan.long_clients {
            tasks.push(tokio::spawn(http_client(
                plan.target,
                Shape::Long {
                    ms: plan.long_ms.clone(),
                    pause: plan.long_pause,
                    on: long_on.clone(),
                },
                Context::new(&stats, &stopped, end, plan.seed + 1000 + u64::from(i)),
            )));
        }
        for i in 0..plan.ws_clients {
            tasks.push(tokio::spawn(ws_client(
                plan.target,
                plan.ws_session,
                plan.long_ws && i == 0,
                Context::new(&stats, &stopped, end, 0),
            )));
        }
        Self {
            stats,
            stop,
            long_requests,
            tasks,
        }
    }

    /// Marks the connections open now: failures on them are counted apart from then
    /// on ([`LoadStats::failed_on_earlier_connections`]), e.g. connections a Service
    /// sent to a pod before it was switched to the proxies.
    pub fn mark(&self) {
        lock(&self.stats).marks += 1;
    }

    /// Turns the long requests on or off (off at the start): they belong where drains
    /// happen, and a long request in flight makes a latency-aware balancer avoid its pod,
    /// which a request-count balance figure would count as imbalance.
    pub fn set_long_requests(&self, on: bool) {
        self.long_requests.send_replace(on);
    }

    /// Waits (up to one request timeout) until no long request is in flight.
    pub async fn wait_long_requests_done(&self) {
        let end = Instant::now() + REQUEST_TIMEOUT;
        while lock(&self.stats).long_in_flight > 0 && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What the clients saw so far.
    pub fn stats(&self) -> LoadStats {
        lock(&self.stats).clone()
    }

    /// Stops the clients (requests in flight finish) and returns the totals.
    pub async fn stop(self) -> LoadStats {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, task).await;
        }
        lock(&self.stats).clone()
    }
}

enum Shape {
    Short {
        interval: Duration,
    },
    Long {
        ms: RangeInclusive<u64>,
        pause: Duration,
        on: watch::Receiver<bool>,
    },
}

struct Context {
    stats: Arc<Mutex<LoadStats>>,
    stop: watch::Receiver<bool>,
    end: Instant,
    rng: fastrand::Rng,
}

impl Context {
    fn new(
        stats: &Arc<Mutex<LoadStats>>,
        stop: &watch::Receiver<bool>,
        end: Instant,
        seed: u64,
    ) -> Self {
        Self {
            stats: Arc::clone(stats),
            stop: stop.clone(),
            end,
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    fn done(&self) -> bool {
        *self.stop.borrow() || Instant::now() >= self.end
    }

    fn fail(&self, kind: &'static str) {
        let mut s = lock(&self.stats);
        s.sent += 1;
        s.failed += 1;
        *s.failures.entry(kind).or_default() += 1;
    }

    /// [`Context::fail`] on a connection opened at mark `born`.
    fn fail_on(&self, kind: &'static str, born: u64) {
        self.fail(kind);
        let mut s = lock(&self.stats);
        s.failed_before_mark += u64::from(born < s.marks);
    }

    /// Waits `d`, or less when the load stops.
    async fn pause(&mut self, d: Duration) {
        let until = (Instant::now() + d).min(self.end);
        tokio::select! {
            () = tokio::time::sleep_until(until) => {}
            () = stopped(&mut self.stop) => {}
        }
    }
}

/// Resolves once the load is stopped (at once if it already is).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        // The sender is gone: nothing will stop us but the deadline.
        std::future::pending::<()>().await;
    }
}

/// One answered request.
struct Answer {
    status: u16,
    pod: Option<String>,
    close: bool,
}

async fn http_client(target: SocketAddr, shape: Shape, mut cx: Context) {
    let mut tick = match &shape {
        Shape::Short { interval } => {
            // Spread the clients' phases so the rate is even.
            let offset = Duration::from_micros(cx.rng.u64(0..=interval.as_micros() as u64));
            let mut t = tokio::time::interval_at(Instant::now() + offset, *interval);
            t.set_missed_tick_behavior(MissedTickBehavior::Delay);
            Some(t)
        }
        Shape::Long { .. } => None,
    };
    'connection: while !cx.done() {
        let stream =
            match tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(target)).await {
                Ok(Ok(stream)) => stream,
                _ => {
                    cx.fail("connect failed");
                    cx.pause(Duration::from_millis(100)).await;
                    continue;
                }
            };
        let _ = stream.set_nodelay(true);
        let Ok((mut sender, connection)) = http1::handshake(TokioIo::new(stream)).await else {
            cx.fail("connect failed");
            continue;
        };
        tokio::spawn(connection);
        let born = {
            let mut s = lock(&cx.stats);
            s.connections += 1;
            s.marks
        };
        loop {
            match &mut tick {
                Some(t) => {
                    tokio::select! {
                        _ = t.tick() => {}
                        () = stopped(&mut cx.stop) => {}
                    }
                }
                None => {
                    if let Shape::Long { pause, on, .. } = &shape {
                        cx.pause(*pause).await;
                        let mut on = on.clone();
                        tokio::select! {
                            _ = on.wait_for(|on| *on) => {}
                            () = stopped(&mut cx.stop) => {}
                        }
                    }
                }
            }
            if cx.done() {
                return;
            }
            // A connection the server closed while idle is noticed here: reconnect,
            // as a gateway's pool does, without losing the request.
            if sender.ready().await.is_err() {
                continue 'connection;
            }
            let (path, long) = match &shape {
                Shape::Short { .. } => ("/".to_owned(), false),
                Shape::Long { ms, .. } => (format!("/?delay_ms={}", cx.rng.u64(ms.clone())), true),
            };
            let Ok(request) = hyper::Request::get(path)
                .header(hyper::header::HOST, target.to_string())
                .body(Empty::<Bytes>::new())
            else {
                return;
            };
            lock(&cx.stats).long_in_flight += u64::from(long);
            let outcome = tokio::time::timeout(REQUEST_TIMEOUT, async {
                let response = sender.send_request(request).await?;
                let status = response.status().as_u16();
                let pod = response
                    .headers()
                    .get("x-served-by")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let close = response
                    .headers()
                    .get(hyper::header::CONNECTION)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
                response.into_body().collect().await?;
                Ok::<_, hyper::Error>(Answer { status, pod, close })
            })
            .await;
            lock(&cx.stats).long_in_flight -= u64::from(long);
            match outcome {
                Ok(Ok(answer)) => {
                    let mut s = lock(&cx.stats);
                    s.sent += 1;
                    if answer.status >= 500 {
                        s.failed += 1;
                        s.failed_before_mark += u64::from(born < s.marks);
                        *s.failures.entry(status_kind(answer.status)).or_default() += 1;
                    } else {
                        s.ok += 1;
                        s.long_ok += u64::from(long);
                        if let Some(pod) = answer.pod {
                            *s.served_by.entry(pod).or_default() += 1;
                        }
                    }
                    drop(s);
                    if answer.close {
                        continue 'connection;
                    }
                }
                Ok(Err(_)) => {
                    cx.fail_on("connection broken", born);
                    continue 'connection;
                }
                Err(_) => {
                    cx.fail_on("timed out", born);
                    continue 'connection;
                }
            }
        }
    }
}

fn status_kind(status: u16) -> &'static str {
    match status {
        502 => "502",
        503 => "503",
        504 => "504",
        _ => "other 5xx",
    }
}

/// How a WebSocket session ended.
enum Session {
    Completed,
    Broken,
    Stopped,
}

async fn ws_client(target: SocketAddr, length: Duration, mut long: bool, mut cx: Context) {
    while !cx.done() {
        let outcome = ws_session(target, if long { None } else { Some(length) }, &mut cx).await;
        {
            let mut s = lock(&cx.stats);
            match outcome {
                Session::Completed => s.ws_completed += 1,
                Session::Broken if long => s.ws_long_closed += 1,
                Session::Broken => s.ws_broken += 1,
                Session::Stopped => return,
            }
        }
        // The long session happens once; after it, the client runs short sessions.
        long = false;
        cx.pause(Duration::from_millis(100)).await;
    }
}

async fn ws_session(target: SocketAddr, length: Option<Duration>, cx: &mut Context) -> Session {
    let Ok(Ok(stream)) =
        tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(target)).await
    else {
        return Session::Broken;
    };
    let url = format!("ws://{target}/ws");
    let Ok(Ok((mut ws, _))) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::client_async(url, stream),
    )
    .await
    else {
        return Session::Broken;
    };
    let start = Instant::now();
    let mut n = 0u64;
    loop {
        if length.is_some_and(|l| start.elapsed() >= l) {
            return match ws.close(None).await {
                Ok(()) => Session::Completed,
                Err(_) => Session::Broken,
            };
        }
        if cx.done() {
            let _ = ws.close(None).await;
            return Session::Stopped;
        }
        n += 1;
        let text = format!("message {n}");
        if ws.send(Message::text(text.clone())).await.is_err() {
            return Session::Broken;
        }
        match tokio::time::timeout(Duration::from_secs(2), ws.next()).await {
            Ok(Some(Ok(Message::Text(echo)))) if echo.as_str() == text => {}
            _ => return Session::Broken,
        }
        cx.pause(Duration::from_millis(100)).await;
    }
}
