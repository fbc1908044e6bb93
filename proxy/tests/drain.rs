//! The drain protocol end to end: the real proxy and the `ballast-drain` logic, with
//! loopback addresses standing in for pod IPs.

#![allow(clippy::unwrap_used)]

mod relay;
mod support;

use ballast_proxy::drain::{DrainConfig, ReplicaState, drain};
use http::StatusCode;
use relay::{Relay, Source};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};
use support::{Backend, Behaviour, Client, get_json, proxy};

fn config(pod: IpAddr, timeout: Duration) -> DrainConfig {
    DrainConfig {
        timeout,
        poll_interval: Duration::from_millis(50),
        // Every round, as these tests are about which replicas gate, not about DNS load
        // (tests/drain_dns.rs).
        resolve_interval: Duration::from_millis(50),
        source: Some(pod),
        call_timeout: Duration::from_secs(1),
    }
}

/// Starts a request of `ms` through `listen` and waits until the proxy counts it.
async fn long_request(
    listen: SocketAddr,
    admin: SocketAddr,
    ms: u64,
) -> tokio::task::JoinHandle<StatusCode> {
    let handle = tokio::spawn(async move {
        let mut c = Client::connect(listen).await.unwrap();
        c.get(&format!("/delay/{ms}")).await.unwrap().status
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let endpoints = get_json(admin, "/endpoints").await;
        if endpoints[0]["in_flight"] == 1 {
            return handle;
        }
        assert!(Instant::now() < deadline, "request never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_ends_as_soon_as_the_last_request_does() {
    let pod = Backend::start(2, Behaviour::default()).await;
    let replica = proxy(&["--endpoints", &pod.addr.to_string()]).await;
    let request = long_request(replica.listen, replica.admin, 800).await;
    let started = Instant::now();
    let admin = replica.admin;
    let outcome = drain(
        &config(pod.addr.ip(), Duration::from_secs(20)),
        || async move { Ok(vec![admin]) },
        |_| {},
    )
    .await;
    let took = started.elapsed();
    assert!(outcome.drained, "{outcome}");
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(3),
        "took {took:?}: it must wait for the request, not for the timeout"
    );
    assert_eq!(
        request.await.unwrap(),
        StatusCode::OK,
        "the in-flight request completed"
    );
    assert_eq!(outcome.replicas[&admin], ReplicaState::Drained);
    replica.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_gates_including_one_that_appears_mid_drain() {
    let pod = Backend::start(2, Behaviour::default()).await;
    let a = proxy(&["--endpoints", &pod.addr.to_string()]).await;
    let b = proxy(&["--endpoints", &pod.addr.to_string()]).await;
    let on_a = long_request(a.listen, a.admin, 500).await;
    let on_b = long_request(b.listen, b.admin, 1500).await;
    let rounds = Arc::new(AtomicUsize::new(0));
    let (admin_a, admin_b) = (a.admin, b.admin);
    let started = Instant::now();
    let outcome = drain(
        &config(pod.addr.ip(), Duration::from_secs(20)),
        || {
            let round = rounds.fetch_add(1, Relaxed);
            // B is "scaled up" only after a few lookups.
            async move {
                Ok(if round < 3 {
                    vec![admin_a]
                } else {
                    vec![admin_a, admin_b]
                })
            }
        },
        |_| {},
    )
    .await;
    assert!(outcome.drained, "{outcome}");
    assert_eq!(outcome.replicas.len(), 2);
    assert!(
        started.elapsed() >= Duration::from_millis(1200),
        "waited for B's request too: {:?}",
        started.elapsed()
    );
    assert_eq!(
        (on_a.await.unwrap(), on_b.await.unwrap()),
        (StatusCode::OK, StatusCode::OK)
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_replica_is_waited_for_then_reported() {
    let pod = Backend::start(2, Behaviour::default()).await;
    let a = proxy(&["--endpoints", &pod.addr.to_string()]).await;
    let gone: SocketAddr = "127.0.0.13:9".parse().unwrap();
    let admin = a.admin;
    let started = Instant::now();
    let outcome = drain(
        &config(pod.addr.ip(), Duration::from_millis(600)),
        || async move { Ok(vec![admin, gone]) },
        |_| {},
    )
    .await;
    assert!(
        !outcome.drained,
        "an unreachable replica is never assumed drained"
    );
    assert!(started.elapsed() >= Duration::from_millis(600));
    assert!(matches!(
        outcome.replicas[&gone],
        ReplicaState::Unreachable(_)
    ));
    assert_eq!(outcome.replicas[&admin], ReplicaState::Drained);
    let message = outcome.to_string();
    assert!(
        message.starts_with("timed out after") && message.contains("127.0.0.13:9: unreachable"),
        "{message}"
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_the_proxy_does_not_know_waits_and_is_never_drained() {
    let pod = Backend::start(2, Behaviour::default()).await;
    let a = proxy(&["--endpoints", &pod.addr.to_string()]).await;
    let admin = a.admin;
    let stranger: IpAddr = "127.0.0.9".parse().unwrap();
    let timeout = Duration::from_millis(800);
    let mut notes = Vec::new();
    let started = Instant::now();
    let outcome = drain(
        &config(stranger, timeout),
        || async move { Ok(vec![admin]) },
        |line| notes.push(line.to_owned()),
    )
    .await;
    assert!(!outcome.drained, "a 403 is not drained: {outcome}");
    assert!(
        started.elapsed() >= timeout,
        "kept trying until the timeout: {:?}",
        started.elapsed()
    );
    assert!(
        matches!(&outcome.replicas[&admin], ReplicaState::Refused(why) if why.contains("127.0.0.9")),
        "{outcome}"
    );
    assert!(outcome.to_string().contains("answered 403"), "{outcome}");
    assert_eq!(notes.len(), 1, "said once, not every round: {notes:?}");
    assert!(
        notes[0].starts_with(&format!("proxy {admin} answered 403"))
            && notes[0].contains("sidecar"),
        "{notes:?}"
    );
    let endpoints = get_json(admin, "/endpoints").await;
    assert_eq!(
        endpoints[0]["state"], "active",
        "the real pod was not drained"
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_redirecting_sidecar_the_pod_is_not_taken_as_drained() {
    let pod = Backend::start(2, Behaviour::default()).await;
    let a = proxy(&["--endpoints", &pod.addr.to_string()]).await;
    let request = long_request(a.listen, a.admin, 2000).await;
    // The sidecar in the proxy's pod: the proxy sees its address, never the pod's.
    let sidecar = Relay::start(
        "127.0.0.41".parse().unwrap(),
        a.admin,
        Source::Fixed("127.0.0.6".parse().unwrap()),
    )
    .await;
    let via = sidecar.addr;
    let outcome = drain(
        &config(pod.addr.ip(), Duration::from_millis(800)),
        || async move { Ok(vec![via]) },
        |_| {},
    )
    .await;
    assert!(
        !outcome.drained,
        "a request is still in flight to the pod: {outcome}"
    );
    assert!(matches!(
        &outcome.replicas[&via],
        ReplicaState::Refused(why) if why.contains("127.0.0.6")
    ));
    assert_eq!(request.await.unwrap(), StatusCode::OK);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ballast_drain_says_once_on_stderr_why_a_403_keeps_it_waiting() {
    let pod = Backend::start(2, Behaviour::default()).await;
    let a = proxy(&["--endpoints", &pod.addr.to_string()]).await;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ballast-drain"))
        .args([
            "--proxies",
            &a.admin.to_string(),
            "--source-address",
            "127.0.0.9",
            "--poll-interval",
            "50ms",
            "--timeout",
            "600ms",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("ballast-drain did not stop at its timeout");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exits 0 so the pod stops: {status}");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        2,
        "one line for the 403, one outcome: {stderr}"
    );
    assert!(
        lines[0].contains("answered 403") && lines[0].contains("waiting"),
        "{stderr}"
    );
    assert!(
        lines[1].starts_with("ballast-drain: timed out after") && lines[1].contains("403"),
        "{stderr}"
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_that_times_out_is_recorded_as_forced() {
    let pod = Backend::start(2, Behaviour::default()).await;
    let dir = std::env::temp_dir().join(format!("ballast-forced-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("endpoints.yaml");
    std::fs::write(
        &file,
        format!("- {{address: \"{}\", ready: true}}\n", pod.addr),
    )
    .unwrap();
    let replica = proxy(&["--endpoints-file", file.to_str().unwrap()]).await;
    let request = long_request(replica.listen, replica.admin, 1500).await;
    let admin = replica.admin;
    let outcome = drain(
        &config(pod.addr.ip(), Duration::from_millis(300)),
        || async move { Ok(vec![admin]) },
        |_| {},
    )
    .await;
    assert!(!outcome.drained, "{outcome}");
    let endpoints = get_json(admin, "/endpoints").await;
    assert_eq!(
        endpoints[0]["forced"],
        serde_json::json!({"in_flight": 1, "connections": 1}),
        "the helper told the proxy what was still open: {endpoints}"
    );
    assert!(endpoints[0]["draining_since"].is_number());
    assert_eq!(request.await.unwrap(), StatusCode::OK);
    // Discovery drops the pod; once nothing is open the drain is history.
    std::fs::write(&file, "[]\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let drains = loop {
        let drains = get_json(admin, "/drains").await;
        if drains.as_array().is_some_and(|d| !d.is_empty()) {
            break drains;
        }
        assert!(Instant::now() < deadline, "never recorded: {drains}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let record = &drains[0];
    assert_eq!(record["address"], pod.addr.to_string());
    assert_eq!(record["forced"]["in_flight"], 1);
    assert_eq!(record["requests"], 1);
    let after = record["drained_after_ms"].as_u64().unwrap();
    assert!(
        (1000..5000).contains(&after),
        "drained when the request ended: {after} ms"
    );
    replica.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}
