//! What a drain costs the cluster DNS and the proxies (lookups, connections), and what
//! it does when the proxies' name does not resolve. The lookups are counted by a
//! resolver stand-in, the connections by a relay in front of each real proxy.

#![allow(clippy::unwrap_used)]

mod relay;
mod support;

use ballast_proxy::drain::{DrainConfig, ResolveError, drain};
use relay::{Relay, Source};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};
use support::{Backend, Behaviour, Client, get_json, proxy};

const ADMIN_NAME: &str = "web-proxy-admin.default.svc.cluster.local.:9901";

/// As `ballast-drain` runs: 100 ms rounds, a lookup a second.
fn config(timeout: Duration) -> DrainConfig {
    DrainConfig {
        timeout,
        poll_interval: Duration::from_millis(100),
        resolve_interval: Duration::from_secs(1),
        source: None,
        call_timeout: Duration::from_secs(1),
    }
}

fn not_found() -> ResolveError {
    ResolveError::NameNotFound {
        target: ADMIN_NAME.to_owned(),
        source: std::io::Error::other(
            "failed to lookup address information: Name does not resolve",
        ),
    }
}

fn lookup_failed() -> ResolveError {
    ResolveError::Lookup {
        target: ADMIN_NAME.to_owned(),
        source: std::io::Error::other(
            "failed to lookup address information: Temporary failure in name resolution",
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_looks_up_about_once_a_second_and_keeps_one_connection_per_replica() {
    let pod = Backend::start(2, Behaviour::default()).await;
    let a = proxy(&["--endpoints", &pod.addr.to_string()]).await;
    let b = proxy(&["--endpoints", &pod.addr.to_string()]).await;
    // A 3 s request through A holds the drain for about 30 rounds.
    let (listen, admin_a) = (a.listen, a.admin);
    let request = tokio::spawn(async move {
        let mut c = Client::connect(listen).await.unwrap();
        c.get("/delay/3000").await.unwrap().status
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while get_json(admin_a, "/endpoints").await[0]["in_flight"] != 1 {
        assert!(Instant::now() < deadline, "request never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let relay_a = Relay::start("127.0.0.41".parse().unwrap(), a.admin, Source::Caller).await;
    let relay_b = Relay::start("127.0.0.42".parse().unwrap(), b.admin, Source::Caller).await;
    let replicas: Vec<SocketAddr> = vec![relay_a.addr, relay_b.addr];
    let lookups = AtomicUsize::new(0);
    let config = DrainConfig {
        source: Some(pod.addr.ip()),
        // Generous: a call that times out on a loaded machine drops its connection,
        // and this test counts connections.
        call_timeout: Duration::from_secs(5),
        ..config(Duration::from_secs(30))
    };
    let started = Instant::now();
    let outcome = drain(
        &config,
        || {
            lookups.fetch_add(1, Relaxed);
            let replicas = replicas.clone();
            async move { Ok(replicas) }
        },
        |_| {},
    )
    .await;
    let took = started.elapsed();
    let lookups = lookups.load(Relaxed);
    println!(
        "drain of {took:.2?}: {lookups} lookups, connections per replica {} and {}",
        relay_a.accepted(),
        relay_b.accepted()
    );
    assert!(outcome.drained, "{outcome}");
    assert!(
        took >= Duration::from_secs(2),
        "waited for the request: {took:?}"
    );
    // One lookup at the start, then at most one per second however slow the machine
    // (it was one per 100 ms round: 30 for this drain).
    let bound = usize::try_from(took.as_secs()).unwrap() + 1;
    assert!(lookups <= bound, "{lookups} lookups in {took:?}");
    assert_eq!(
        (relay_a.accepted(), relay_b.accepted()),
        (1, 1),
        "one connection per replica, kept for every round"
    );
    request.await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_that_closes_is_replaced() {
    let pod = Backend::start(2, Behaviour::default()).await;
    let a = proxy(&["--endpoints", &pod.addr.to_string()]).await;
    let (listen, admin) = (a.listen, a.admin);
    let request = tokio::spawn(async move {
        let mut c = Client::connect(listen).await.unwrap();
        c.get("/delay/1500").await.unwrap().status
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while get_json(admin, "/endpoints").await[0]["in_flight"] != 1 {
        assert!(Instant::now() < deadline, "request never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let relay = Relay::start("127.0.0.43".parse().unwrap(), admin, Source::Caller).await;
    let via = relay.addr;
    let config = DrainConfig {
        source: Some(pod.addr.ip()),
        call_timeout: Duration::from_secs(5),
        ..config(Duration::from_secs(30))
    };
    let mut notes = Vec::new();
    let cut_once = async {
        // Cut under the helper once it has kept its connection for a second call (the
        // POST, then a GET on the same connection), so the cut hits a kept connection.
        let relay = &relay;
        support::eventually(
            "a second call on the helper's first connection",
            || async move { relay.requests() >= 2 },
        )
        .await;
        assert_eq!(relay.accepted(), 1, "the helper keeps its connection");
        relay.cut();
    };
    let (outcome, ()) = tokio::join!(
        drain(
            &config,
            || async move { Ok(vec![via]) },
            |line| notes.push(line.to_owned())
        ),
        cut_once
    );
    assert!(outcome.drained, "{outcome}");
    assert!(notes.is_empty(), "{notes:?}");
    assert_eq!(relay.accepted(), 2, "one new connection after the cut");
    request.await.unwrap();
    a.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_name_that_does_not_exist_or_has_no_address_means_nothing_to_drain() {
    // The name does not exist; it exists with no address.
    for absent in [true, false] {
        let lookups = AtomicUsize::new(0);
        let mut notes = Vec::new();
        let outcome = drain(
            &config(Duration::from_secs(30)),
            || {
                lookups.fetch_add(1, Relaxed);
                async move {
                    if absent {
                        Err(not_found())
                    } else {
                        Ok(Vec::new())
                    }
                }
            },
            |line| notes.push(line.to_owned()),
        )
        .await;
        assert!(outcome.drained, "{outcome}");
        assert!(outcome.replicas.is_empty());
        assert_eq!(
            lookups.load(Relaxed),
            2,
            "trusted on the second answer, a second after the first"
        );
        assert!(
            outcome.elapsed <= Duration::from_millis(1100),
            "one interval, not the 30 s timeout: {:?}",
            outcome.elapsed
        );
        let line = outcome.to_string();
        assert!(
            line.starts_with("nothing to drain after") && line.contains("no proxies"),
            "{line}"
        );
        assert!(notes.is_empty(), "the outcome line says it: {notes:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_lookup_that_fails_otherwise_keeps_the_pod_waiting() {
    let mut notes = Vec::new();
    let outcome = drain(
        &config(Duration::from_secs(10)),
        || async { Err(lookup_failed()) },
        |line| notes.push(line.to_owned()),
    )
    .await;
    assert!(!outcome.drained, "{outcome}");
    assert_eq!(
        outcome.elapsed,
        Duration::from_secs(10),
        "until the timeout"
    );
    let line = outcome.to_string();
    assert!(
        line.starts_with("timed out after") && line.contains("Temporary failure"),
        "{line}"
    );
    assert_eq!(notes.len(), 1, "said once: {notes:?}");
    assert!(notes[0].contains("retrying"), "{notes:?}");
}

#[tokio::test(start_paused = true)]
async fn one_negative_answer_alone_is_not_trusted() {
    let lookups = AtomicUsize::new(0);
    let outcome = drain(
        &config(Duration::from_secs(10)),
        || {
            let n = lookups.fetch_add(1, Relaxed);
            async move {
                if n.is_multiple_of(2) {
                    Err(not_found())
                } else {
                    Err(lookup_failed())
                }
            }
        },
        |_| {},
    )
    .await;
    assert!(!outcome.drained, "{outcome}");
    assert_eq!(outcome.elapsed, Duration::from_secs(10));
}
