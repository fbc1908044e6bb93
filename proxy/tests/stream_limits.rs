//! The time limits of a stream through the proxy: the idle limit cuts a silent stream
//! (an HTTP response is aborted, a gRPC call ends with DEADLINE_EXCEEDED trailers), a
//! stream whose frames keep coming lives on past every limit, and the response-head limit
//! counts from the end of the request body.

#![allow(clippy::unwrap_used)]

mod support;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;
use support::{get_json, in_flight, proxy_to, scripted_pod, silent_pod, stream_timeouts};
use tokio::sync::mpsc;

const LIMIT: Duration = Duration::from_secs(20);

type Frames = StreamBody<futures::stream::BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;

/// A pod that reads the whole request body and only then answers, echoing it.
async fn echo_after_body_pod(last_octet: u8) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, last_octet], 0)))
        .await
        .expect("bind a loopback address");
    let addr = listener.local_addr().expect("a bound address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
                    let body = request.into_body().collect().await?.to_bytes();
                    Ok::<_, hyper::Error>(Response::new(Full::new(body)))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn data(text: &'static str) -> Frame<Bytes> {
    Frame::data(Bytes::from_static(text.as_bytes()))
}

async fn h2_client(proxy: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_http_response_is_aborted_at_the_idle_limit() {
    // One chunk, then silence (the body never ends).
    let pod = silent_pod(2, b"first").await;
    let running = proxy_to(&[pod], &["--stream-idle-timeout", "300ms"]).await;
    let mut client = support::Client::connect(running.listen).await.unwrap();
    let cut = tokio::time::timeout(LIMIT, client.get("/stall")).await;
    let cut = cut.expect("cut at the idle limit, not left hanging");
    assert!(
        cut.is_err(),
        "the client must not take a cut response for complete: {cut:?}"
    );
    assert_eq!(stream_timeouts(running.admin, "idle").await, 1.0);
    assert_eq!(
        in_flight(running.admin, pod).await,
        0,
        "the stream left the pod's count"
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_grpc_call_ends_with_deadline_exceeded_trailers() {
    let pod = silent_pod(2, b"\0\0\0\0\x01x").await;
    let running = proxy_to(
        &[pod],
        &[
            "--backend-protocol",
            "h2c",
            "--stream-idle-timeout",
            "300ms",
        ],
    )
    .await;
    let mut client = h2_client(running.listen).await;
    let request = Request::post("http://svc.local/pkg.Service/Watch")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x01q")))
        .unwrap();
    let response = tokio::time::timeout(LIMIT, client.send_request(request))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let collected = tokio::time::timeout(LIMIT, response.into_body().collect())
        .await
        .expect("ended at the idle limit")
        .expect("ended with trailers, not a reset");
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(trailers["grpc-status"], "4", "{trailers:?}");
    assert!(
        trailers["grpc-message"]
            .to_str()
            .unwrap()
            .contains("no frame"),
        "{trailers:?}"
    );
    assert_eq!(
        &collected.to_bytes()[..],
        b"\0\0\0\0\x01x",
        "the message before the cut"
    );
    assert_eq!(stream_timeouts(running.admin, "idle").await, 1.0);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_frames_keep_coming_outlives_every_limit() {
    // 15 frames 100 ms apart: 1.5 s in all, five times the idle limit and the
    // response-head limit, never 300 ms without a frame.
    let pod = scripted_pod(2, |_request, tx| async move {
        for _ in 0..15 {
            if tx.send(data("tick;")).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let running = proxy_to(
        &[pod],
        &[
            "--stream-idle-timeout",
            "300ms",
            "--response-timeout",
            "300ms",
        ],
    )
    .await;
    let mut client = support::Client::connect(running.listen).await.unwrap();
    let reply = tokio::time::timeout(LIMIT, client.get("/ticks"))
        .await
        .unwrap()
        .expect("the whole stream");
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "tick;".repeat(15));
    assert_eq!(stream_timeouts(running.admin, "idle").await, 0.0);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_response_head_limit_counts_from_the_end_of_the_request_body() {
    // The pod reads the whole body before it answers (its head comes only then). The
    // client takes 1.2 s to send it (4 chunks 300 ms apart, each well within the 1 s idle
    // limit), 4 times the response-head limit.
    let pod = echo_after_body_pod(2).await;
    let running = proxy_to(
        &[pod],
        &[
            "--backend-protocol",
            "h2c",
            "--response-timeout",
            "300ms",
            "--stream-idle-timeout",
            "1s",
        ],
    )
    .await;
    let stream = tokio::net::TcpStream::connect(running.listen)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake::<_, _, Frames>(
        TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let (tx, mut rx) = mpsc::channel::<Frame<Bytes>>(1);
    let frames = futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|f| f.map(Ok)));
    let request = Request::post("http://svc.local/upload")
        .body(StreamBody::new(Box::pin(frames) as _))
        .unwrap();
    let uploading = tokio::spawn(async move {
        for _ in 0..4 {
            tx.send(data("part;")).await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let response = tokio::time::timeout(LIMIT, sender.send_request(request))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "{:?}",
        response.headers()
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], "part;".repeat(4).as_bytes());
    uploading.await.unwrap();
    assert_eq!(stream_timeouts(running.admin, "response-head").await, 0.0);
    // The pod answered as soon as it had the body: its latency sample is that, not the
    // 1.2 s the client took to upload (peak-EWMA would price the pod out for a while).
    let ewma = get_json(running.admin, "/endpoints").await[0]["ewma_ms"]
        .as_f64()
        .unwrap();
    assert!(
        ewma < 500.0,
        "the upload time must not count as the pod's latency: ewma {ewma} ms"
    );
    running.shutdown().await;
}
