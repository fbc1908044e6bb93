//! gRPC through the proxy: the four call kinds, messages flowing both ways while a call is
//! open, errors the proxy makes itself answered the gRPC way, and the drain gate holding
//! for an open stream, and the stream limits (idle, `grpc-timeout`). Pods are in-process
//! gRPC servers on 127.0.0.x; the client is tonic's `Channel`, or tonic over a bare
//! HTTP/2 connection where `Channel` would enforce the deadline itself.

#![allow(clippy::unwrap_used)]

mod support;

use bytes::Bytes;
use http::{Method, StatusCode};
use std::net::SocketAddr;
use std::time::Duration;
use support::grpc::{
    GrpcBackend, GrpcBehaviour, MESSAGE_LIMIT, RawCodec, SERVER_STREAM, STALL, TICK, UNARY, WINDOW,
    bare_client, client, client_message, client_messages_joined, grpc_proxy, open_bidi,
    open_server_stream, path, pod_behind_proxy, raw_unary, round_trip, server_message,
    spawn_client_stream, unary_echo, within,
};
use support::{drain, eventually, in_flight, proxy, stream_timeouts};
use tonic::Code;

const LIMIT: Duration = Duration::from_secs(60);
const MESSAGES: u64 = 1000;

/// The trailers of a call that ended well carry `grpc-status: 0`.
fn assert_ok_trailers(trailers: Option<tonic::metadata::MetadataMap>, what: &str) {
    let trailers = trailers.unwrap_or_else(|| panic!("{what}: the response had no trailers"));
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.to_str().unwrap()),
        Some("0"),
        "{what}: {trailers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_unary_calls_arrive_in_order_balanced_per_call() {
    let pods = [
        GrpcBackend::start(2, GrpcBehaviour::default()).await,
        GrpcBackend::start(3, GrpcBehaviour::default()).await,
    ];
    let running = grpc_proxy(
        &[pods[0].addr, pods[1].addr],
        &["--algorithm", "round-robin"],
    )
    .await;
    let mut grpc = client(running.listen).await;
    within(LIMIT, "1000 unary calls", async {
        for i in 0..MESSAGES {
            let reply = unary_echo(&mut grpc, client_message(i))
                .await
                .unwrap_or_else(|status| panic!("call {i}: {status:?}"));
            assert_eq!(reply.into_inner(), client_message(i), "call {i}");
        }
    })
    .await;
    // One client connection, one HTTP/2 connection per pod: every call is balanced on
    // its own, not the connection as a whole.
    assert_eq!(
        (pods[0].calls(), pods[1].calls()),
        (MESSAGES / 2, MESSAGES / 2)
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_stream_of_a_thousand_replies_arrives_in_order_as_it_is_sent() {
    let (pod, running) = pod_behind_proxy(GrpcBehaviour::default(), &[]).await;
    let mut grpc = client(running.listen).await;
    within(LIMIT, "server stream", async {
        let request = tonic::Request::new(Bytes::from(MESSAGES.to_string()));
        let mut inbound = open_server_stream(&mut grpc, SERVER_STREAM, request).await;
        // The pod sends reply i only once the client holds reply i - WINDOW: the replies
        // must cross the proxy while the call runs.
        for i in 0..MESSAGES {
            let reply = within(MESSAGE_LIMIT, &format!("reply {i}"), inbound.message())
                .await
                .unwrap_or_else(|status| panic!("reply {i}: {status:?}"));
            assert_eq!(reply, Some(server_message(i)), "reply {i}");
            pod.client_saw(i + 1);
        }
        assert_eq!(inbound.message().await.unwrap(), None, "exactly {MESSAGES}");
        assert_ok_trailers(inbound.trailers().await.unwrap(), "server stream");
    })
    .await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stream_of_a_thousand_messages_reaches_the_pod_as_it_is_sent() {
    let (pod, running) = pod_behind_proxy(GrpcBehaviour::default(), &[]).await;
    let (tx, call) = spawn_client_stream(client(running.listen).await);
    within(LIMIT, "client stream", async {
        for i in 0..MESSAGES {
            // At most WINDOW messages ahead of what the pod has read: a proxy that
            // buffers the request body never lets the pod see the first ones.
            if i >= WINDOW {
                pod.wait_received(i - WINDOW + 1, &format!("before message {i}"))
                    .await;
            }
            tx.send(client_message(i)).await.unwrap();
        }
        drop(tx);
        let reply = call
            .await
            .unwrap()
            .unwrap_or_else(|status| panic!("{status:?}"));
        assert_eq!(
            reply.into_inner(),
            client_messages_joined(MESSAGES),
            "every message, in order"
        );
    })
    .await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bidi_stream_of_a_thousand_messages_flows_both_ways_interleaved() {
    let (pod, running) = pod_behind_proxy(GrpcBehaviour::default(), &[]).await;
    let mut grpc = client(running.listen).await;
    within(LIMIT, "bidi stream", async {
        let (tx, mut inbound) = open_bidi(&mut grpc).await;
        let (mut sent, mut received) = (0, 0);
        while received < MESSAGES {
            // Never more than WINDOW messages without their echo.
            while sent < MESSAGES && sent - received < WINDOW {
                tx.send(client_message(sent)).await.unwrap();
                sent += 1;
            }
            let what = format!("echo of message {received} ({sent} sent)");
            let echo = within(MESSAGE_LIMIT, &what, inbound.message())
                .await
                .unwrap_or_else(|status| panic!("{what}: {status:?}"));
            assert_eq!(echo, Some(client_message(received)), "{what}");
            received += 1;
        }
        drop(tx);
        let end = within(MESSAGE_LIMIT, "end of stream", inbound.message()).await;
        assert_eq!(end.unwrap(), None);
        assert_ok_trailers(inbound.trailers().await.unwrap(), "bidi");
    })
    .await;
    assert_eq!(pod.received(), MESSAGES);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bidi_ping_pong_gets_each_answer_before_the_next_question() {
    let (_pod, running) = pod_behind_proxy(GrpcBehaviour::default(), &[]).await;
    let mut grpc = client(running.listen).await;
    within(LIMIT, "ping-pong", async {
        let (tx, mut inbound) = open_bidi(&mut grpc).await;
        for round in 0..200 {
            let what = format!("round {round}: the answer");
            round_trip(&tx, &mut inbound, round, &what).await;
        }
        drop(tx);
        assert_eq!(inbound.message().await.unwrap(), None);
        assert_ok_trailers(inbound.trailers().await.unwrap(), "ping-pong");
    })
    .await;
    running.shutdown().await;
}

/// A proxy with no endpoint at all.
async fn proxy_without_endpoints() -> (ballast_proxy::server::Running, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("ballast-grpc-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("endpoints.json");
    std::fs::write(&file, "[]").unwrap();
    let running = proxy(&[
        "--endpoints-file",
        file.to_str().unwrap(),
        "--backend-protocol",
        "h2c",
    ])
    .await;
    (running, dir)
}

/// A local error answered the gRPC way: HTTP 200, trailers-only, the status in the
/// headers, and tonic sees that code.
async fn assert_local_grpc_error(listen: SocketAddr, code: Code, grpc_status: &str, kind: &str) {
    let mut grpc = client(listen).await;
    let call = unary_echo(&mut grpc, Bytes::from_static(b"hello"));
    let status = within(LIMIT, "tonic call", call)
        .await
        .expect_err("no pod can answer");
    assert_eq!(status.code(), code, "{status:?}");

    let raw = raw_unary(listen, UNARY, b"hello", &[]).await;
    assert_eq!(raw.status, StatusCode::OK, "{raw:?}");
    assert_eq!(raw.headers["content-type"], "application/grpc", "{raw:?}");
    assert_eq!(raw.headers["grpc-status"], grpc_status, "{raw:?}");
    assert!(
        raw.headers
            .get("grpc-message")
            .is_some_and(|m| !m.is_empty()),
        "a grpc-message says why: {raw:?}"
    );
    assert_eq!(raw.headers["x-ballast-error"], kind, "{raw:?}");
    assert!(raw.body.is_empty(), "trailers-only: {raw:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_endpoint_is_unavailable_the_grpc_way() {
    let (running, dir) = proxy_without_endpoints().await;
    assert_local_grpc_error(running.listen, Code::Unavailable, "14", "no-endpoint").await;
    running.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_failure_is_unavailable_the_grpc_way() {
    // A port that was just free: nothing listens there.
    let gone = std::net::TcpListener::bind("127.0.0.2:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let running = grpc_proxy(&[gone], &[]).await;
    assert_local_grpc_error(running.listen, Code::Unavailable, "14", "connect-failed").await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_at_its_in_flight_limit_answers_resource_exhausted_until_a_stream_ends() {
    let (_pod, running) =
        pod_behind_proxy(GrpcBehaviour::default(), &["--max-in-flight", "1"]).await;
    let mut grpc = client(running.listen).await;
    let (tx, mut inbound) = open_bidi(&mut grpc).await;
    round_trip(&tx, &mut inbound, 0, "first echo").await;
    // The open stream holds the only place.
    assert_local_grpc_error(running.listen, Code::ResourceExhausted, "8", "overloaded").await;
    drop(tx);
    assert_eq!(inbound.message().await.unwrap(), None);
    drop(inbound);
    // Its place is free again once it ended.
    let call = unary_echo(&mut grpc, Bytes::from_static(b"again"));
    let reply = within(LIMIT, "a call after the stream ended", call)
        .await
        .expect("admitted again");
    assert_eq!(reply.into_inner(), Bytes::from_static(b"again"));
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_timeout_shorter_than_the_pod_is_deadline_exceeded() {
    let (_pod, running) =
        pod_behind_proxy(GrpcBehaviour::answering_after(Duration::from_secs(3)), &[]).await;
    // tonic's `Channel` would itself give up waiting for the head at the deadline (as
    // `Cancelled`); this client leaves the deadline to the proxy. The pod ignores it.
    let mut grpc = bare_client(running.listen).await;
    let mut request = tonic::Request::new(Bytes::from_static(b"slow"));
    // Sent as `grpc-timeout: 300000u`.
    request.set_timeout(Duration::from_millis(300));
    let outcome = within(LIMIT, "call", grpc.unary(request, path(UNARY), RawCodec)).await;
    let status = outcome.expect_err("the proxy ends the call at its deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");

    let raw = raw_unary(running.listen, UNARY, b"slow", &[("grpc-timeout", "300m")]).await;
    assert_eq!(
        (raw.status, raw.headers.get("grpc-status")),
        (StatusCode::OK, Some(&"4".parse().unwrap())),
        "{raw:?}"
    );
    assert_eq!(
        raw.headers["x-ballast-error"], "upstream-timeout",
        "{raw:?}"
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_timeout_during_the_response_ends_it_with_deadline_exceeded() {
    let (_pod, running) =
        pod_behind_proxy(GrpcBehaviour::stalling_for(Duration::from_secs(3)), &[]).await;
    // `Channel` bounds only the wait for the head; the rest is the proxy's to end.
    let mut grpc = client(running.listen).await;
    let mut request = tonic::Request::new(Bytes::new());
    request.set_timeout(Duration::from_millis(500));
    within(LIMIT, "stalled stream", async {
        let mut inbound = open_server_stream(&mut grpc, STALL, request).await;
        assert_eq!(
            inbound.message().await.unwrap(),
            Some(Bytes::from_static(b"first"))
        );
        let status = inbound
            .message()
            .await
            .expect_err("the proxy ends the stream at the deadline, before the pod's reply");
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    })
    .await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_waits_for_an_open_bidi_stream_which_keeps_working() {
    let (pod, running) = pod_behind_proxy(GrpcBehaviour::default(), &[]).await;
    let admin = running.admin;
    let mut grpc = client(running.listen).await;
    within(LIMIT, "drain with an open stream", async {
        let (tx, mut inbound) = open_bidi(&mut grpc).await;
        for round in 0..3 {
            round_trip(&tx, &mut inbound, round, &format!("round {round}")).await;
        }
        assert_eq!(in_flight(admin, pod.addr).await, 1, "the open stream");

        let (status, report) = drain(admin, pod.addr.ip(), Method::POST).await;
        assert_eq!(status, StatusCode::OK, "{report}");
        assert_eq!(report["state"], "draining", "{report}");
        assert_eq!(report["in_flight"], 1, "{report}");
        for round in 3..23 {
            round_trip(&tx, &mut inbound, round, &format!("round {round}")).await;
        }
        let (_, report) = drain(admin, pod.addr.ip(), Method::GET).await;
        assert_eq!(report["in_flight"], 1, "still open: {report}");

        drop(tx);
        assert_eq!(inbound.message().await.unwrap(), None);
        assert_ok_trailers(inbound.trailers().await.unwrap(), "drained stream");
        let ip = pod.addr.ip();
        eventually("the ended stream to stop counting", || async move {
            drain(admin, ip, Method::GET).await.1["in_flight"] == 0
        })
        .await;
    })
    .await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_shutdown_lets_an_open_bidi_stream_finish_then_cuts_what_outlives_it() {
    let pod = GrpcBackend::start(2, GrpcBehaviour::default()).await;
    // First: the stream ends on its own during the proxy's drain and completes.
    let running = grpc_proxy(&[pod.addr], &["--drain-timeout", "10s"]).await;
    let mut grpc = client(running.listen).await;
    let trigger = running.shutdown_trigger();
    within(LIMIT, "a stream through the proxy's shutdown", async {
        let (tx, mut inbound) = open_bidi(&mut grpc).await;
        for round in 0..30 {
            if round == 3 {
                trigger.notify_one();
            }
            round_trip(&tx, &mut inbound, round, &format!("round {round}")).await;
        }
        drop(tx);
        assert_eq!(inbound.message().await.unwrap(), None);
        assert_ok_trailers(
            inbound.trailers().await.unwrap(),
            "stream ended in the drain",
        );
    })
    .await;
    within(
        LIMIT,
        "the proxy stops once the stream ended",
        running.stopped(),
    )
    .await;

    // Then: a stream still open at the drain timeout is cut, and the proxy stops.
    let running = grpc_proxy(&[pod.addr], &["--drain-timeout", "500ms"]).await;
    let mut grpc = client(running.listen).await;
    let trigger = running.shutdown_trigger();
    let (tx, mut inbound) = open_bidi(&mut grpc).await;
    round_trip(&tx, &mut inbound, 0, "first echo").await;
    trigger.notify_one();
    within(
        LIMIT,
        "the proxy stops at its drain timeout",
        running.stopped(),
    )
    .await;
    let after = within(LIMIT, "the cut stream ends", inbound.message()).await;
    assert!(
        after.is_err(),
        "a stream cut at the drain timeout must end with an error, not look complete: {after:?}"
    );
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stream_longer_than_the_idle_and_head_limits_lives_while_it_sends() {
    let limits = ["--stream-idle-timeout", "1s", "--response-timeout", "1s"];
    let (_pod, running) = pod_behind_proxy(GrpcBehaviour::default(), &limits).await;
    let (tx, call) = spawn_client_stream(client(running.listen).await);
    // Only the client speaks, for 3 s; the pod answers (head included) at the end. The
    // response-head limit runs from the end of the request, the idle one from the last
    // frame either way: neither is due.
    within(LIMIT, "slow client stream", async {
        for i in 0..10 {
            tx.send(client_message(i)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        drop(tx);
        let reply = call
            .await
            .unwrap()
            .unwrap_or_else(|status| panic!("{status:?}"));
        assert_eq!(reply.into_inner(), client_messages_joined(10));
    })
    .await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_stream_longer_than_the_idle_limit_lives_while_the_pod_sends() {
    let (_pod, running) =
        pod_behind_proxy(GrpcBehaviour::default(), &["--stream-idle-timeout", "1s"]).await;
    let mut grpc = client(running.listen).await;
    within(LIMIT, "slow server stream", async {
        let request = tonic::Request::new(Bytes::from_static(b"10,300"));
        let mut inbound = open_server_stream(&mut grpc, TICK, request).await;
        for i in 0..10 {
            let tick = inbound
                .message()
                .await
                .unwrap_or_else(|status| panic!("tick {i}: {status:?}"));
            assert_eq!(tick, Some(Bytes::from(format!("t{i}"))));
        }
        assert_eq!(inbound.message().await.unwrap(), None);
        assert_ok_trailers(inbound.trailers().await.unwrap(), "ticks");
    })
    .await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_stream_is_cut_at_the_idle_limit_with_deadline_exceeded() {
    let (pod, running) =
        pod_behind_proxy(GrpcBehaviour::default(), &["--stream-idle-timeout", "1s"]).await;
    let mut grpc = client(running.listen).await;
    within(LIMIT, "silent stream", async {
        let (tx, mut inbound) = open_bidi(&mut grpc).await;
        for round in 0..2 {
            round_trip(&tx, &mut inbound, round, &format!("round {round}")).await;
        }
        // Neither side speaks now; the client keeps its half open.
        let status = within(MESSAGE_LIMIT, "the idle cut", inbound.message())
            .await
            .expect_err("the proxy ends a stream silent for longer than the idle limit");
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        drop(tx);
    })
    .await;
    assert_eq!(stream_timeouts(running.admin, "idle").await, 1.0);
    let (admin, addr) = (running.admin, pod.addr);
    eventually(
        "the cut stream to stop counting as in flight",
        || async move { in_flight(admin, addr).await == 0 },
    )
    .await;
    running.shutdown().await;
}
