//! Balance under load. In a test binary of its own: these tests measure how requests
//! spread, and sharing two cores with a dozen other tests would measure the sharing.

mod support;

use http::StatusCode;
use std::time::Duration;
use support::{Backend, Behaviour, Client, backends, endpoints_arg, proxy, refs};

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_keepalive_clients_spread_evenly_over_eight_pods() {
    let pods = backends(
        2..10,
        Behaviour {
            delay: Duration::from_micros(200),
            ..Default::default()
        },
    )
    .await;
    let running = proxy(&["--endpoints", &endpoints_arg(&refs(&pods))]).await;
    let per_client = 2500;
    let mut clients = Vec::new();
    for _ in 0..4 {
        let addr = running.listen;
        clients.push(tokio::spawn(async move {
            let mut client = Client::connect(addr).await.unwrap();
            for _ in 0..per_client {
                assert_eq!(client.get("/").await.unwrap().status, StatusCode::OK);
            }
        }));
    }
    tokio::time::timeout(LIMIT, futures::future::try_join_all(clients))
        .await
        .unwrap()
        .unwrap();
    let hits: Vec<u64> = pods.iter().map(Backend::hits).collect();
    let total: u64 = hits.iter().sum();
    assert_eq!(total, 4 * per_client);
    let mean = total as f64 / hits.len() as f64;
    let max = *hits.iter().max().unwrap() as f64;
    eprintln!("max/mean {:.3} over {hits:?}", max / mean);
    assert!(
        max / mean <= 1.1,
        "max/mean {:.3} over {hits:?}",
        max / mean
    );
    running.shutdown().await;
}
