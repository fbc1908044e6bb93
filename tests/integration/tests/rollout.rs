//! The headline claim, on the local cluster stand-in (processes as pods, EndpointSlices
//! served over list/watch to proxies started with `--kube-service`; not Kubernetes): a
//! rollout of 8 naive pods under keep-alive load loses no request with ballast and keeps
//! the load even, while the same rollout with Kubernetes defaults loses requests and
//! leaves the load uneven. The `preStop: sleep` cure loses nothing either, but its
//! rollout takes longer; the ratio is printed.
//!
//! The three variants run at once, on separate loopback ranges (127.21/22/23.*).

#![allow(clippy::unwrap_used)]

use ballast_integration::scenario::{
    self, Live, ScenarioConfig, ScenarioReport, Variant, bin_dir_of_current_exe, scratch_dir,
};
use std::sync::{Arc, Mutex};

fn config(net: u8, tag: &str) -> ScenarioConfig {
    ScenarioConfig::new(bin_dir_of_current_exe(), scratch_dir(tag), net)
}

async fn run(variant: Variant, cfg: ScenarioConfig) -> ScenarioReport {
    let live = Arc::new(Mutex::new(Live::default()));
    let report = scenario::run(variant, &cfg, live).await;
    match report {
        Ok(report) => {
            scenario::remove_dir(&cfg.work_dir);
            report
        }
        Err(e) => panic!(
            "{}: {e} (pod logs kept in {})",
            variant.label(),
            cfg.work_dir.display()
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_under_load_ballast_vs_kubernetes_defaults_vs_sleep() {
    let (ballast, defaults, sleep) = tokio::join!(
        run(Variant::Ballast, config(21, "rollout-ballast")),
        run(Variant::KubernetesDefaults, config(22, "rollout-defaults")),
        run(Variant::SleepInsteadOfGate(30), config(23, "rollout-sleep")),
    );
    println!("{}", scenario::table(&[&ballast, &defaults, &sleep]));
    println!("API stand-in, ballast variant: {:?}", ballast.api);

    // ballast: nothing lost, every pod replaced and drained, load even.
    let b = &ballast;
    assert_eq!(
        b.load.failed, 0,
        "ballast failed requests: {:?}",
        b.load.failures
    );
    assert_eq!(b.load.ws_broken, 0, "short WebSocket sessions broken");
    assert!(
        b.load.long_ok > 0 && b.load.ws_completed > 0,
        "{:?}",
        b.load
    );
    assert_eq!(b.pods_replaced, 8);
    assert_eq!(b.pods_killed, 0, "no pod needed SIGKILL");
    let status = b.status.as_ref().expect("status.lastRollout");
    assert_eq!(status.pods_drained, 8, "every old pod drained: {status:?}");
    // The one WebSocket session longer than the drain timeout is the forced path:
    // closed at the timeout, counted on status, the client reconnected.
    assert_eq!(status.forced_terminations, 1, "{status:?}");
    assert_eq!(b.load.ws_long_closed, 1);
    assert_eq!(
        status.failed_requests.old_revision + status.failed_requests.new_revision,
        0
    );
    assert!(b.proxy_rollout.is_some());
    // The proxies found the pods as in a cluster: `--kube-service`, kube's watcher, the
    // API stand-in's list/watch (2 replicas, then 2 new ones after the proxy rollout).
    assert!(
        b.api.lists >= 4 && b.api.watches >= 4 && b.api.failed == 0,
        "{:?}",
        b.api
    );
    for balance in [b.balance_before, b.balance_after] {
        let balance = balance.expect("balance measured");
        assert!(balance <= 1.1, "ballast balance max/mean {balance:.2}");
    }

    // Kubernetes defaults: the same load and rollout lose requests and stay uneven.
    let d = &defaults;
    assert!(
        d.load.failures_total() > 0,
        "the baseline must show the failures ballast removes: {:?}",
        d.load
    );
    assert!(
        d.balance_before.is_some_and(|x| x > 1.1),
        "connection-level balancing of 8 keep-alive connections: {:?}",
        d.balance_before
    );

    // preStop sleep: nothing lost either, but the old pods linger.
    let s = &sleep;
    assert_eq!(
        s.load.failed, 0,
        "sleep failed requests: {:?}",
        s.load.failures
    );
    assert!(
        s.rollout > b.rollout,
        "sleep {:?} vs ballast {:?}",
        s.rollout,
        b.rollout
    );
}
