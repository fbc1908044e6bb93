//! Adopting a running Deployment and Service under load, on the local cluster stand-in
//! (processes as pods, EndpointSlices served over list/watch to proxies started with
//! `--kube-service`; not Kubernetes): the Service switches to the proxies and the first
//! rollout replaces every pod that has no drain gate: no request through the proxies
//! fails or is sent twice. Beside it, the same adoption with the drain gate alone shows
//! what the retire-and-drain order removes: the old pods exit on SIGTERM with requests
//! in flight, which the proxies send again to another pod (the old pod may have acted
//! on them). The residue ballast cannot remove is printed: requests in flight on
//! connections a client opened straight to an old pod before the Service switched.
//!
//! They run at once, on separate loopback ranges (127.26/27/28.*).

#![allow(clippy::unwrap_used)]

use ballast_integration::adoption::{self, AdoptVariant};
use ballast_integration::scenario::{self, ScenarioConfig, bin_dir_of_current_exe, scratch_dir};

fn config(net: u8, tag: &str) -> ScenarioConfig {
    ScenarioConfig {
        pods: 4,
        rate: 200,
        clients: 4,
        proxy_rollout: false,
        ..ScenarioConfig::new(bin_dir_of_current_exe(), scratch_dir(tag), net)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopting_a_deployment_and_its_service_loses_no_request() {
    let (guarded_cfg, unguarded_cfg, graceful_cfg) = (
        config(26, "adopt"),
        config(27, "adopt-unguarded"),
        config(28, "adopt-graceful"),
    );
    let (guarded, unguarded, graceful) = tokio::join!(
        adoption::run(&guarded_cfg, AdoptVariant::Guarded),
        adoption::run(&unguarded_cfg, AdoptVariant::Unguarded),
        adoption::run(&graceful_cfg, AdoptVariant::GuardedGracefulApp),
    );
    let guarded =
        guarded.unwrap_or_else(|e| panic!("adopt: {e} (logs in {:?})", guarded_cfg.work_dir));
    let unguarded = unguarded
        .unwrap_or_else(|e| panic!("unguarded: {e} (logs in {:?})", unguarded_cfg.work_dir));
    let graceful =
        graceful.unwrap_or_else(|e| panic!("graceful: {e} (logs in {:?})", graceful_cfg.work_dir));
    println!("{}", adoption::table(&[&guarded, &unguarded, &graceful]));
    println!("guarded: {guarded:#?}\nunguarded: {unguarded:#?}\ngraceful: {graceful:#?}");

    assert!(guarded.load.ok > 500, "the load ran: {:?}", guarded.load);
    assert!(
        guarded.long.long_ok > 4,
        "long requests ran: {:?}",
        guarded.long
    );
    // Every request through the proxies succeeded; what failed (if anything) was in
    // flight on a connection a client had opened straight to an old pod before the
    // switch, which no proxy sees, when that naive pod exited.
    assert_eq!(
        guarded.long.failures_total(),
        0,
        "no long request failed: {:?}",
        guarded.long.failures
    );
    assert_eq!(
        guarded.load.failures_total(),
        guarded.load.failed_on_earlier_connections(),
        "no request through the proxies failed: {:?}",
        guarded.load
    );
    // No old pod exited with a request on it: nothing had to be sent again.
    assert_eq!(guarded.retries, 0, "{guarded:?}");
    assert_eq!(guarded.old_pods, 4);
    assert_eq!(
        guarded.retired, 4,
        "every old pod was retired before its deletion"
    );
    assert_eq!(unguarded.retired, 0);
    // An app that finishes its requests on SIGTERM: the same, through the proxies.
    assert_eq!(graceful.retries, 0, "{graceful:?}");
    assert_eq!(
        graceful.load.failures_total() + graceful.long.failures_total(),
        graceful.load.failed_on_earlier_connections(),
        "{graceful:?}"
    );
    for cfg in [&guarded_cfg, &unguarded_cfg, &graceful_cfg] {
        scenario::remove_dir(&cfg.work_dir);
    }
}
