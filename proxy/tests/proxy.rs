//! The proxy end to end: real sockets on loopback, backends on 127.0.0.x.

mod support;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use support::{
    Backend, Behaviour, Client, assert_echoed_or_failed_once, backends, broken_and_healthy, drain,
    endpoints_arg, get_json, in_flight, metrics_text, proxy, proxy_to, raw_exchange, refs,
};

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_and_terminating_pods_under_load_fails_no_request() {
    let pods = backends(2..6, Behaviour::answering_after(Duration::from_millis(5))).await;
    let dir = std::env::temp_dir().join(format!("ballast-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("endpoints.yaml");
    let write = |entries: &[(SocketAddr, bool)]| {
        let yaml: String = entries
            .iter()
            .map(|(a, terminating)| {
                format!(
                    "- {{address: \"{a}\", ready: {}, terminating: {terminating}}}\n",
                    !terminating
                )
            })
            .collect();
        std::fs::write(&file, yaml).unwrap();
    };
    write(&pods.iter().map(|p| (p.addr, false)).collect::<Vec<_>>());
    let running = proxy(&["--endpoints-file", file.to_str().unwrap()]).await;
    let failures = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (addr, failures, stop) = (running.listen, failures.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut client = Client::connect(addr).await.unwrap();
            let mut sent = 0;
            while !stop.load(Relaxed) && sent < 5000 {
                sent += 1;
                if !client
                    .get("/")
                    .await
                    .is_ok_and(|r| r.status == StatusCode::OK)
                {
                    failures.fetch_add(1, Relaxed);
                }
            }
        }));
    }
    // The load reaches every pod, the two about to leave included.
    {
        let pods = &pods;
        support::eventually("every pod serving the load", || async move {
            pods.iter().all(|p| p.hits() >= 10)
        })
        .await;
    }
    // Pod 2 becomes terminating (rollout), pod 3 vanishes from discovery.
    write(&[
        (pods[0].addr, true),
        (pods[2].addr, false),
        (pods[3].addr, false),
    ]);
    // Wait for the file poll to take the update, and for the requests the leaving pods
    // had then to finish: from here on they get none.
    let admin = running.admin;
    let (terminating, removed) = (pods[0].addr.to_string(), pods[1].addr.to_string());
    support::eventually("the leaving pods to drain", || {
        let (terminating, removed) = (terminating.clone(), removed.clone());
        async move {
            let endpoints = get_json(admin, "/endpoints").await;
            let rows = endpoints.as_array().cloned().unwrap_or_default();
            let row = |address: &str| rows.iter().find(|r| r["address"] == address).cloned();
            let idle =
                |row: &Option<serde_json::Value>| row.as_ref().is_none_or(|r| r["in_flight"] == 0);
            let draining = row(&terminating).is_some_and(|r| r["state"] == "draining");
            let gone = row(&removed).is_none_or(|r| r["listed"] == false);
            draining && gone && idle(&row(&terminating)) && idle(&row(&removed))
        }
    })
    .await;
    let served_by_leaving = (pods[0].hits(), pods[1].hits());
    // The load goes on: a hundred more requests, all on the pods that stay.
    {
        let staying = || pods[2].hits() + pods[3].hits();
        let target = staying() + 100;
        support::eventually(
            "100 more requests served after the pods left",
            || async move { staying() >= target },
        )
        .await;
    }
    stop.store(true, Relaxed);
    tokio::time::timeout(LIMIT, futures::future::try_join_all(clients))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(failures.load(Relaxed), 0);
    assert_eq!(
        (pods[0].hits(), pods[1].hits()),
        served_by_leaving,
        "no request after they left"
    );
    running.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_stops_new_requests_waits_for_the_long_one_and_closes_connections() {
    let pods = backends(2..4, Behaviour::default()).await;
    let (leaving, staying) = (&pods[0], &pods[1]);
    let running = proxy(&[
        "--endpoints",
        &endpoints_arg(&refs(&pods)),
        "--algorithm",
        "round-robin",
    ])
    .await;
    let admin = running.admin;

    // Warm a pooled connection to the leaving pod, then start a long request on it.
    let mut client = Client::connect(running.listen).await.unwrap();
    for _ in 0..4 {
        client.get("/").await.unwrap();
    }
    // Round-robin alternates pods; the second of two fresh-connection requests in a
    // row may land on either, so retry until the long one runs on the leaving pod.
    let long = {
        let addr = running.listen;
        let target = leaving.addr;
        tokio::spawn(async move {
            let mut c = Client::connect(addr).await.unwrap();
            for _ in 0..10 {
                let r = c.get("/delay/1500").await.unwrap();
                if r.served_by() == Some(target) {
                    return Some(r.status);
                }
            }
            None
        })
    };
    // Wait until the long request is in flight on the leaving pod.
    let leaving_addr = leaving.addr;
    support::eventually(
        "the long request to start on the leaving pod",
        || async move { in_flight(admin, leaving_addr).await == 1 },
    )
    .await;

    let (status, report) = drain(admin, leaving.addr.ip(), Method::POST).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(report["state"], "draining");
    assert_eq!(report["in_flight"], 1, "{report}");

    // No new request reaches it.
    let before = leaving.hits();
    for _ in 0..20 {
        let r = client.get("/").await.unwrap();
        assert_eq!(r.served_by(), Some(staying.addr));
    }
    assert_eq!(leaving.hits(), before);

    // The long request holds the drain, then completes successfully.
    let (_, report) = drain(admin, leaving.addr.ip(), Method::GET).await;
    assert_eq!(report["in_flight"], 1);
    assert_eq!(
        tokio::time::timeout(LIMIT, long).await.unwrap().unwrap(),
        Some(StatusCode::OK)
    );

    // Counts reach zero: the finished connection was closed, not pooled.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, report) = drain(admin, leaving.addr.ip(), Method::GET).await;
        if report["in_flight"] == 0 && report["connections"] == 0 {
            assert_eq!(report["known"], true);
            break;
        }
        assert!(Instant::now() < deadline, "drain never completed: {report}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_pod_can_drain_itself() {
    let pods = backends(2..3, Behaviour::default()).await;
    let running = proxy(&["--endpoints", &endpoints_arg(&refs(&pods))]).await;
    let stranger = "127.0.0.77".parse().unwrap();
    let (status, body) = drain(running.admin, stranger, Method::POST).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("can drain only itself")
    );
    let (status, body) = drain(running.admin, stranger, Method::GET).await;
    assert_eq!(
        (status, body["known"].clone()),
        (StatusCode::OK, serde_json::json!(false))
    );
    let mut c = Client::connect(running.listen).await.unwrap();
    assert_eq!(
        c.get("/").await.unwrap().status,
        StatusCode::OK,
        "the pod still serves"
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfirmed_drain_expires_and_routing_resumes() {
    let pods = backends(2..4, Behaviour::default()).await;
    let running = proxy(&[
        "--endpoints",
        &endpoints_arg(&refs(&pods)),
        "--algorithm",
        "round-robin",
        "--drain-ttl",
        "700ms",
    ])
    .await;
    drain(running.admin, pods[0].addr.ip(), Method::POST).await;
    let mut c = Client::connect(running.listen).await.unwrap();
    let before = pods[0].hits();
    for _ in 0..10 {
        c.get("/").await.unwrap();
    }
    assert_eq!(pods[0].hits(), before);
    // The mark expires at the first registry tick after the 700 ms TTL.
    let ip = pods[0].addr.ip();
    support::eventually("the drain mark to expire", || async move {
        drain(running.admin, ip, Method::GET).await.1["state"] == "active"
    })
    .await;
    for _ in 0..10 {
        c.get("/").await.unwrap();
    }
    assert!(
        pods[0].hits() >= before + 4,
        "routing resumed after the TTL"
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_killed_pod_costs_no_replayable_request() {
    let pods = backends(2..4, Behaviour::default()).await;
    let running = proxy(&[
        "--endpoints",
        &endpoints_arg(&refs(&pods)),
        "--algorithm",
        "round-robin",
    ])
    .await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut c = Client::connect(running.listen).await.unwrap();
        for _ in 0..4 {
            assert_eq!(c.get("/").await.unwrap().status, StatusCode::OK);
        }
        clients.push(c);
    }
    // Pooled keep-alive connections to pod 2 now die mid-life.
    pods[0].kill();
    for c in &mut clients {
        for _ in 0..10 {
            let r = c.get("/").await.unwrap();
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
            assert_eq!(r.served_by(), Some(pods[1].addr));
        }
        let post = Request::post("/echo")
            .header("host", "t")
            .body(Full::new(Bytes::from_static(b"small")))
            .unwrap();
        assert_eq!(
            c.send(post).await.unwrap().text(),
            "small",
            "a small body is replayed"
        );
    }
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_cannot_be_replayed_fails_once_with_502() {
    let (broken, healthy) = broken_and_healthy().await;
    let running = proxy_to(
        &[broken.addr, healthy.addr],
        &["--algorithm", "round-robin"],
    )
    .await;
    let mut c = Client::connect(running.listen).await.unwrap();
    let big = Bytes::from(vec![b'x'; 200 * 1024]);
    let mut saw_502 = 0;
    for _ in 0..4 {
        let before = (broken.hits(), healthy.hits());
        let r = c.post("/echo", big.clone()).await;
        let r = match r {
            Ok(r) => r,
            Err(_) => {
                c = Client::connect(running.listen).await.unwrap();
                continue;
            }
        };
        if assert_echoed_or_failed_once(&r, (&broken, &healthy), before, big.len(), "large body") {
            saw_502 += 1;
        }
    }
    assert!(
        saw_502 >= 1,
        "round-robin must have sent one to the broken pod"
    );
    // A small (buffered) body is retried on the healthy pod instead.
    for _ in 0..4 {
        let r = c.post("/echo", Bytes::from_static(b"hi")).await.unwrap();
        assert_eq!((r.status, r.text()), (StatusCode::OK, "hi".to_owned()));
    }
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_endpoint_is_a_clear_503() {
    let dir = std::env::temp_dir().join(format!("ballast-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("endpoints.json");
    std::fs::write(&file, "[]").unwrap();
    let running = proxy(&["--endpoints-file", file.to_str().unwrap()]).await;
    let mut c = Client::connect(running.listen).await.unwrap();
    let r = c.get("/").await.unwrap();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers["x-ballast-error"], "no-endpoint");
    assert!(r.text().contains("no endpoint available"));
    let metrics = metrics_text(running.admin).await;
    assert!(metrics.contains("ballast_no_endpoint_total 1"), "{metrics}");
    running.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_never_reach_a_pod() {
    let pod = Backend::start(2, Behaviour::default()).await;
    let running = proxy(&[
        "--endpoints",
        &pod.addr.to_string(),
        "--header-read-timeout",
        "500ms",
        "--max-header-bytes",
        "8192",
    ])
    .await;
    let limit = Duration::from_secs(3);
    let cases: [(&str, &[u8], &str); 3] = [
        ("duplicate differing CL", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", "400"),
        ("bad chunk size", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", "400"),
        ("TE not ending in chunked", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", "400"),
    ];
    for (name, bytes, want) in cases {
        let answer = raw_exchange(running.listen, bytes, limit).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {want}")),
            "{name}: got {answer:?}"
        );
    }
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let answer = raw_exchange(running.listen, huge.as_bytes(), limit).await;
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "oversized head: {answer:?}"
    );
    let started = Instant::now();
    let answer = raw_exchange(running.listen, b"GET / HTTP/1.1\r\nHost: t\r\n", limit).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "slow header closed after the read timeout ({answer:?})"
    );
    assert_eq!(pod.hits(), 0, "the pod never saw any of them");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_cannot_smuggle_a_request() {
    // The classic CL.TE smuggle: by Content-Length the body is "0\r\n\r\nG", by
    // chunked framing it ends at "0\r\n\r\n" and "G" starts a second request. hyper
    // follows RFC 9112 section 6.3: Transfer-Encoding wins and Content-Length is removed,
    // so proxy and pod agree on where the request ends and nothing rides along hidden.
    let pod = Backend::start(2, Behaviour::default()).await;
    let running = proxy(&["--endpoints", &pod.addr.to_string()]).await;
    let smuggle = b"POST /headers HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGPOST /smuggled HTTP/1.1\r\nHost: t\r\n\r\n";
    let answer = raw_exchange(running.listen, smuggle, Duration::from_secs(3)).await;
    assert_eq!(
        pod.hits(),
        1,
        "exactly one request reached the pod: {answer}"
    );
    assert!(
        !answer.to_lowercase().contains("content-length: 6"),
        "{answer}"
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_and_request_id() {
    let pod = Backend::start(2, Behaviour::default()).await;
    let running = proxy(&["--endpoints", &pod.addr.to_string()]).await;
    let mut c = Client::connect(running.listen).await.unwrap();
    let req = Request::get("/headers")
        .header("host", "shop.example")
        .header("connection", "x-private")
        .header("x-private", "secret")
        .body(Full::default())
        .unwrap();
    let seen = c.send(req).await.unwrap().text();
    assert!(seen.contains("x-forwarded-for: 127.0.0.1\n"), "{seen}");
    assert!(seen.contains("x-forwarded-host: shop.example\n"), "{seen}");
    assert!(seen.contains("x-forwarded-proto: http\n"), "{seen}");
    assert!(seen.contains("x-request-id: "), "{seen}");
    assert!(
        !seen.contains("x-private"),
        "headers named by Connection are hop-by-hop: {seen}"
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgraded_connections_tunnel_both_ways_and_hold_the_drain() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pod = Backend::start(2, Behaviour::default()).await;
    let running = proxy(&["--endpoints", &pod.addr.to_string()]).await;
    let mut stream = tokio::net::TcpStream::connect(running.listen)
        .await
        .unwrap();
    stream
        .write_all(
            b"GET /upgrade HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = vec![0u8; 1024];
    let n = stream.read(&mut head).await.unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    stream.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping");
    let (_, report) = drain(running.admin, pod.addr.ip(), Method::POST).await;
    assert_eq!(
        (report["in_flight"].as_u64(), report["connections"].as_u64()),
        (Some(1), Some(1)),
        "{report}"
    );
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, report) = drain(running.admin, pod.addr.ip(), Method::GET).await;
        if report["in_flight"] == 0 && report["connections"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "tunnel never released: {report}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_clients_and_backends_with_streaming_and_trailers() {
    let pod = Backend::start(2, Behaviour::default()).await;
    let running = proxy(&[
        "--endpoints",
        &pod.addr.to_string(),
        "--backend-protocol",
        "h2c",
    ])
    .await;
    let stream = tokio::net::TcpStream::connect(running.listen)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    // Unary-like: several requests multiplexed on one client connection.
    let mut calls = Vec::new();
    for _ in 0..8 {
        let req = Request::post("http://svc.local/echo")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(b"hello")))
            .unwrap();
        calls.push(sender.send_request(req));
    }
    for call in futures::future::join_all(calls).await {
        let body = call
            .unwrap()
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(&body[..], b"hello");
    }
    // Server streaming with trailers, as a gRPC stream ends.
    let req = Request::get("http://svc.local/stream")
        .header("te", "trailers")
        .body(Full::default())
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers arrive");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(&collected.to_bytes()[..], b"msg0;msg1;msg2;");
    let endpoints = get_json(running.admin, "/endpoints").await;
    assert_eq!(
        endpoints[0]["connections_opened"], 1,
        "one multiplexed upstream connection: {endpoints}"
    );
    running.shutdown().await;
}

/// An HTTP/2 pod that refuses every stream (REFUSED_STREAM, as a server past its GOAWAY
/// does) and counts them.
async fn refusing_h2_pod(last_octet: u8) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, last_octet], 0)))
        .await
        .expect("bind a loopback address");
    let addr = listener.local_addr().expect("a bound address");
    let refused = Arc::new(AtomicU64::new(0));
    let count = refused.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(stream).await else {
                    return;
                };
                while let Some(Ok((_request, mut respond))) = conn.accept().await {
                    count.fetch_add(1, Relaxed);
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                }
            });
        }
    });
    (addr, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_an_h2_pod_refused_is_retried_on_another_pod() {
    let (refusing, refused) = refusing_h2_pod(2).await;
    let healthy = Backend::start(3, Behaviour::default()).await;
    let running = proxy(&[
        "--endpoints",
        &format!("{refusing},{}", healthy.addr),
        "--backend-protocol",
        "h2c",
        "--algorithm",
        "round-robin",
        "--retry-budget-percent",
        "100",
    ])
    .await;
    let mut client = Client::connect(running.listen).await.unwrap();
    for i in 0..6 {
        let body = format!("call {i}");
        let r = client
            .post("/echo", Bytes::from(body.clone()))
            .await
            .unwrap();
        assert_eq!((r.status, r.text()), (StatusCode::OK, body), "call {i}");
    }
    assert!(
        refused.load(Relaxed) >= 1,
        "round-robin must have offered calls to the refusing pod"
    );
    assert_eq!(healthy.hits(), 6, "every call answered by the healthy pod");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_shutdown_under_load_fails_no_request_for_clients_that_reconnect() {
    let pods = backends(2..4, Behaviour::answering_after(Duration::from_millis(2))).await;
    let list = endpoints_arg(&refs(&pods));
    let first = proxy(&["--endpoints", &list, "--shutdown-delay", "300ms"]).await;
    let second = proxy(&["--endpoints", &list]).await;
    let addrs = [first.listen, second.listen];
    let failures = Arc::new(AtomicU64::new(0));
    let served = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (failures, served) = (failures.clone(), served.clone());
        clients.push(tokio::spawn(async move {
            // Like a gateway: on `Connection: close` (or a closed pooled connection),
            // open a new connection, to the next proxy replica.
            let mut target = 0;
            let mut client = Client::connect(addrs[target]).await.unwrap();
            for _ in 0..400 {
                if client.is_closed() {
                    target = (target + 1) % 2;
                    client = Client::connect(addrs[target]).await.unwrap();
                }
                match client.get("/").await {
                    Ok(r) if r.status == StatusCode::OK => {
                        served.fetch_add(1, Relaxed);
                        if r.headers.get("connection").is_some_and(|v| v == "close") {
                            target = (target + 1) % 2;
                            client = Client::connect(addrs[target]).await.unwrap();
                        }
                    }
                    _ => {
                        failures.fetch_add(1, Relaxed);
                    }
                }
            }
        }));
    }
    // The first proxy stops with the load well under way on it (every client starts
    // there): 200 of the 1600 requests answered.
    {
        let served = &served;
        support::eventually("the load running on the first proxy", || async move {
            served.load(Relaxed) >= 200
        })
        .await;
    }
    let stopping = tokio::spawn(first.shutdown());
    tokio::time::timeout(LIMIT, futures::future::try_join_all(clients))
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(LIMIT, stopping)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(failures.load(Relaxed), 0);
    assert_eq!(served.load(Relaxed), 1600);
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_and_metrics_report_per_pod_numbers() {
    let pods = backends(2..4, Behaviour::default()).await;
    let running = proxy(&[
        "--endpoints",
        &endpoints_arg(&refs(&pods)),
        "--algorithm",
        "round-robin",
    ])
    .await;
    let mut c = Client::connect(running.listen).await.unwrap();
    for _ in 0..10 {
        c.get("/").await.unwrap();
    }
    c.get("/status/503").await.unwrap();
    let endpoints = get_json(running.admin, "/endpoints").await;
    let requests: HashMap<String, u64> = endpoints
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["address"].as_str().unwrap().to_owned(),
                e["requests"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(requests.values().sum::<u64>(), 11);
    assert!(endpoints[0]["connections_opened"].as_u64().unwrap() >= 1);
    assert!(
        endpoints
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["errors"] == 1)
    );
    let metrics = metrics_text(running.admin).await;
    assert!(
        metrics.contains(&format!(
            "ballast_endpoint_responses_total{{endpoint=\"{}\",pod=\"\",class=\"2xx\"}}",
            pods[0].addr
        )),
        "{metrics}"
    );
    assert!(metrics.contains("class=\"5xx\"} 1"), "{metrics}");
    assert!(
        metrics.contains("ballast_endpoint_connections{"),
        "{metrics}"
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_records_successes_retries_local_answers_and_upgrades() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = std::env::temp_dir().join(format!("ballast-access-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("access.log");
    let pods = backends(2..4, Behaviour::default()).await;
    let running = proxy(&[
        "--endpoints",
        &endpoints_arg(&refs(&pods)),
        "--algorithm",
        "round-robin",
        "--access-log",
        log.to_str().unwrap(),
    ])
    .await;
    let mut c = Client::connect(running.listen).await.unwrap();
    for _ in 0..2 {
        let req = http::Request::get("/hello?secret=1")
            .header("host", "t")
            .header("x-request-id", "req-1")
            .body(Full::default())
            .unwrap();
        assert_eq!(c.send(req).await.unwrap().status, StatusCode::OK);
    }
    c.get("/warm").await.unwrap();
    c.get("/warm").await.unwrap();
    pods[1].kill();
    for _ in 0..2 {
        assert_eq!(c.get("/after-kill").await.unwrap().status, StatusCode::OK);
    }
    let mut stream = tokio::net::TcpStream::connect(running.listen)
        .await
        .unwrap();
    stream
        .write_all(
            b"GET /upgrade HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = [0u8; 256];
    let _ = stream.read(&mut head).await.unwrap();
    drop(stream);
    let empty = dir.join("empty.json");
    std::fs::write(&empty, "[]").unwrap();
    let nobody = proxy(&[
        "--endpoints-file",
        empty.to_str().unwrap(),
        "--access-log",
        log.to_str().unwrap(),
    ])
    .await;
    assert_eq!(
        Client::connect(nobody.listen)
            .await
            .unwrap()
            .get("/lonely")
            .await
            .unwrap()
            .status,
        StatusCode::SERVICE_UNAVAILABLE
    );

    // A stopping proxy writes out its last records before it returns: every line is
    // in the file after that, with no guess at how long the writer takes.
    running.shutdown().await;
    nobody.shutdown().await;
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let find = |path: &str| {
        lines
            .iter()
            .filter(|l| l["path"] == path)
            .cloned()
            .collect::<Vec<_>>()
    };
    let hello = find("/hello");
    assert_eq!(hello.len(), 2, "query stripped by default: {lines:?}");
    assert_eq!(
        (hello[0]["method"].as_str(), hello[0]["status"].as_u64()),
        (Some("GET"), Some(200))
    );
    assert_eq!(hello[0]["request_id"], "req-1");
    assert_eq!(hello[0]["attempts"], 1);
    assert!(
        hello[0]["upstream"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.")
    );
    assert!(hello[0]["bytes_out"].as_u64().unwrap() > 0);
    assert!(hello[0]["duration_ms"].as_f64().unwrap() > 0.0);
    assert!(hello[0]["time"].as_str().unwrap().ends_with('Z'));
    let after = find("/after-kill");
    assert!(
        after
            .iter()
            .any(|l| l["attempts"] == 2 && l["status"] == 200),
        "one request was retried: {after:?}"
    );
    assert!(
        after
            .iter()
            .all(|l| l["upstream"] == pods[0].addr.to_string())
    );
    assert!(
        find("/warm").iter().any(|l| l["reused"] == true),
        "pooled connections are reported"
    );
    let upgrade = find("/upgrade");
    assert_eq!(
        (
            upgrade[0]["status"].as_u64(),
            upgrade[0]["upgraded"].as_bool()
        ),
        (Some(101), Some(true))
    );
    let lonely = find("/lonely");
    assert_eq!(
        (lonely[0]["status"].as_u64(), lonely[0]["error"].as_str()),
        (Some(503), Some("no-endpoint"))
    );
    assert!(lonely[0]["upstream"].is_null());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_and_cookie_affinity_keep_a_session_on_one_pod() {
    let pods = backends(2..6, Behaviour::default()).await;
    let running = proxy(&[
        "--endpoints",
        &endpoints_arg(&refs(&pods)),
        "--affinity",
        "header:x-user",
    ])
    .await;
    let mut c = Client::connect(running.listen).await.unwrap();
    let mut owners = std::collections::HashSet::new();
    for user in 0..20 {
        let mut served = std::collections::HashSet::new();
        for _ in 0..5 {
            let req = http::Request::get("/")
                .header("host", "t")
                .header("x-user", format!("user-{user}"))
                .body(Full::default())
                .unwrap();
            served.insert(c.send(req).await.unwrap().served_by().unwrap());
        }
        assert_eq!(served.len(), 1, "user-{user} stayed on one pod");
        owners.extend(served);
    }
    assert!(owners.len() >= 3, "users spread over the pods: {owners:?}");
    running.shutdown().await;

    let running = proxy(&[
        "--endpoints",
        &endpoints_arg(&refs(&pods)),
        "--affinity",
        "cookie:sticky",
    ])
    .await;
    let mut c = Client::connect(running.listen).await.unwrap();
    let first = c.get("/").await.unwrap();
    let cookie = first.headers["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.starts_with("sticky=") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_owned();
    for _ in 0..10 {
        let req = http::Request::get("/")
            .header("host", "t")
            .header("cookie", pair.as_str())
            .body(Full::default())
            .unwrap();
        let r = c.send(req).await.unwrap();
        assert_eq!(
            r.served_by(),
            first.served_by(),
            "the cookie pins the session"
        );
        assert!(r.headers.get("set-cookie").is_none(), "set only once");
    }
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_tunnel_holds_the_proxy_shutdown_until_the_drain_timeout_then_is_cut() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pod = Backend::start(2, Behaviour::default()).await;
    let running = proxy(&[
        "--endpoints",
        &pod.addr.to_string(),
        "--drain-timeout",
        "700ms",
    ])
    .await;
    let mut stream = tokio::net::TcpStream::connect(running.listen)
        .await
        .unwrap();
    stream
        .write_all(
            b"GET /upgrade HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = [0u8; 256];
    let n = stream.read(&mut head).await.unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 101"));
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), running.shutdown())
        .await
        .expect("shutdown ends");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(600),
        "the open tunnel was given the drain time: {took:?}"
    );
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the tunnel was closed at the timeout");
}
