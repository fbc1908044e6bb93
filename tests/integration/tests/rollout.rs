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

/// A release whose pods fail half their requests is paused by the operator's stand-in
/// on the proxies' counts, and with `rollback` its previous template comes back: the
/// rollout decisions the operator makes, acted out on the stand-in's Deployment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_release_is_paused_or_rolled_back() {
    use ballast_api::spec::PauseThresholds;
    use ballast_integration::failing_release;
    let small = |net, tag| ScenarioConfig {
        pods: 4,
        rate: 200,
        clients: 4,
        proxy_rollout: false,
        ..config(net, tag)
    };
    let thresholds = |rollback| PauseThresholds {
        error_ratio: Some(0.2),
        min_requests: Some(40),
        rollback,
        ..PauseThresholds::default()
    };
    let (paused_cfg, rolled_cfg) = (small(24, "failing-pause"), small(25, "failing-rollback"));
    let (paused, rolled) = tokio::join!(
        failing_release::run(&paused_cfg, thresholds(false), 50),
        failing_release::run(&rolled_cfg, thresholds(true), 50),
    );
    let paused =
        paused.unwrap_or_else(|e| panic!("pause: {e} (logs in {:?})", paused_cfg.work_dir));
    let rolled =
        rolled.unwrap_or_else(|e| panic!("rollback: {e} (logs in {:?})", rolled_cfg.work_dir));
    println!("pause: {paused:#?}\nrollback: {rolled:#?}");

    for report in [&paused, &rolled] {
        assert!(
            report.load.failed > 0,
            "the release really failed: {:?}",
            report.load
        );
        let pause = report.at_pause.paused.as_ref();
        assert!(
            pause.is_some_and(|p| p.reason.contains("pauseWhen.errorRatio")),
            "paused on the error ratio: {pause:?}"
        );
        assert!(
            report.new_pods_started < 4,
            "the rollout stopped before replacing every pod: {report:?}"
        );
    }
    // Paused: the failing pods stay, the Deployment takes no further step.
    assert!(paused.paused);
    assert_eq!(paused.final_revision, paused.new_revision);
    assert!(paused.new_pods_running >= 1);
    assert!(
        paused.events.iter().any(|e| e.starts_with("RolloutPaused")),
        "{:?}",
        paused.events
    );
    // Rolled back: the old template is in force again and every failing pod is gone.
    assert_eq!(rolled.final_revision, rolled.old_revision);
    assert_eq!(rolled.new_pods_running, 0);
    assert!(
        rolled
            .at_pause
            .paused
            .as_ref()
            .is_some_and(|p| p.rolled_back),
        "{:?}",
        rolled.at_pause
    );
    assert!(
        rolled.events.iter().any(|e| e.starts_with("RolledBack")),
        "{:?}",
        rolled.events
    );
    scenario::remove_dir(&paused_cfg.work_dir);
    scenario::remove_dir(&rolled_cfg.work_dir);
}
