//! Steering around a slow pod. In a test binary of its own: it measures latency, and
//! sharing two cores with a dozen other tests would measure the sharing.

mod support;

use http::StatusCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{Backend, Behaviour, Client, backends, endpoints_arg, proxy, refs};

const LIMIT: Duration = Duration::from_secs(60);
/// The fast pods' latency; the slow one takes ten times as long. Well above the
/// scheduling noise of a loaded two-core machine (a few ms), which a 2 ms pod drowns in:
/// latency samples would then measure the machine, not the pods.
const FAST_MS: u64 = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_times_slower_pod_gets_far_fewer_requests() {
    let mut pods = backends(
        2..6,
        Behaviour {
            delay: Duration::from_millis(FAST_MS),
            ..Default::default()
        },
    )
    .await;
    pods.push(
        Backend::start(
            6,
            Behaviour {
                delay: Duration::from_millis(10 * FAST_MS),
                ..Default::default()
            },
        )
        .await,
    );
    let running = proxy(&["--endpoints", &endpoints_arg(&refs(&pods))]).await;
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (addr, latencies) = (running.listen, latencies.clone());
        clients.push(tokio::spawn(async move {
            let mut client = Client::connect(addr).await.unwrap();
            for _ in 0..300 {
                let started = Instant::now();
                assert_eq!(client.get("/").await.unwrap().status, StatusCode::OK);
                latencies.lock().unwrap().push(started.elapsed());
            }
        }));
    }
    tokio::time::timeout(LIMIT, futures::future::try_join_all(clients))
        .await
        .unwrap()
        .unwrap();
    let slow = pods[4].hits();
    let fast_mean = pods[..4].iter().map(Backend::hits).sum::<u64>() as f64 / 4.0;
    assert!(
        (slow as f64) < fast_mean / 4.0,
        "slow pod got {slow}, fast pods {fast_mean} on average"
    );
    let mut l = latencies.lock().unwrap().clone();
    l.sort();
    let p99 = l[l.len() * 99 / 100];
    eprintln!(
        "slow pod {slow} requests, fast pods {fast_mean} on average, p50 {:?} p90 {:?} p99 {p99:?}",
        l[l.len() / 2],
        l[l.len() * 9 / 10]
    );
    // Latency is printed, not asserted: a timed assertion measures the shared machine
    // (this one failed at p99 51.7 ms with p50 8.4 ms against 5 ms pods on a loaded CI
    // run). The p99 with a slow pod is measured by `bench/proxy.sh --sections 3`.
    running.shutdown().await;
}
