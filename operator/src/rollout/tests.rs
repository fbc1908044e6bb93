use super::*;
use crate::observe::ProxyReport;
use ballast_api::admin::{DrainReason, DrainRecord, EndpointReport, EndpointStatus, OpenCounts};

fn pod(name: &str, revision: &str, n: u8) -> AppPod {
    AppPod {
        name: name.to_owned(),
        ip: Some(format!("10.0.0.{n}").parse().unwrap()),
        revision: Some(revision.to_owned()),
        deleting: false,
        routable: Some(true),
        routable_message: None,
        ..AppPod::default()
    }
}

fn endpoint(pod: &str, n: u8, requests: u64, errors: u64) -> EndpointReport {
    EndpointReport {
        pod: Some(pod.to_owned()),
        requests,
        errors,
        ..EndpointReport::new(
            format!("10.0.0.{n}:8080").parse().unwrap(),
            EndpointStatus::Active,
        )
    }
}

fn proxy(name: &str, endpoints: Vec<EndpointReport>, drains: Vec<DrainRecord>) -> ProxyObservation {
    ProxyObservation {
        proxy: name.to_owned(),
        report: Ok(ProxyReport { endpoints, drains }),
    }
}

fn run(
    memory: &mut Memory,
    now: f64,
    pods: &[AppPod],
    proxies: &[ProxyObservation],
    previous: Option<&RolloutSummary>,
) -> Tracked {
    track(
        memory,
        &Inputs {
            now,
            update_revision: "new",
            pods,
            proxies,
            previous,
        },
    )
}

#[test]
fn a_rollout_starts_with_old_pods_and_finishes_when_they_are_gone() {
    let mut memory = Memory::default();
    let t0 = 1_800_000_000.0;
    let steady = [pod("a", "new", 1)];
    assert_eq!(
        run(&mut memory, t0, &steady, &[], None).last_rollout,
        None,
        "creation is no rollout"
    );

    let mixed = [pod("a", "old", 1), pod("b", "old", 2), pod("c", "new", 3)];
    let tracked = run(&mut memory, t0, &mixed, &[], None);
    assert!(tracked.rolling);
    let summary = tracked.last_rollout.unwrap();
    assert_eq!(summary.revision, "new");
    assert_eq!(summary.previous_revision.as_deref(), Some("old"));
    assert_eq!(summary.finished_at, None);

    let tracked = run(&mut memory, t0 + 42.4, &mixed[2..], &[], Some(&summary));
    assert!(!tracked.rolling);
    let done = tracked.last_rollout.unwrap();
    assert_eq!(done.duration_seconds, 42);
    assert!(done.finished_at.is_some());
    // A finished rollout stays as it is.
    let later = run(&mut memory, t0 + 100.0, &mixed[2..], &[], Some(&done));
    assert_eq!(later.last_rollout.as_ref(), Some(&done));
}

#[test]
fn requests_and_failures_are_counted_by_revision_from_deltas() {
    let mut memory = Memory::default();
    let t = 1_800_000_000.0;
    let pods = [pod("old-1", "old", 1), pod("new-1", "new", 2)];
    let read = |old: (u64, u64), new: (u64, u64)| {
        [proxy(
            "p1",
            vec![
                endpoint("old-1", 1, old.0, old.1),
                endpoint("new-1", 2, new.0, new.1),
            ],
            vec![],
        )]
    };
    // The first read of a proxy is only a baseline.
    let s = run(&mut memory, t, &pods, &read((1000, 5), (10, 0)), None)
        .last_rollout
        .unwrap();
    assert_eq!(s.requests, RevisionCounts::default());
    let s = run(
        &mut memory,
        t + 1.0,
        &pods,
        &read((1100, 7), (60, 3)),
        Some(&s),
    )
    .last_rollout
    .unwrap();
    assert_eq!(
        (s.requests.old_revision, s.requests.new_revision),
        (100, 50)
    );
    assert_eq!(
        (
            s.failed_requests.old_revision,
            s.failed_requests.new_revision
        ),
        (2, 3)
    );
    // The old pod leaves: its last requests come from the drain record, once.
    let drain = DrainRecord {
        address: "10.0.0.1:8080".parse().unwrap(),
        port: None,
        reason: DrainReason::Terminating,
        pod: Some("old-1".to_owned()),
        since: t + 1.5,
        drained_after_ms: 800,
        forced: None,
        requests: 1120,
        errors: 8,
    };
    let gone = [proxy(
        "p1",
        vec![endpoint("new-1", 2, 60, 3)],
        vec![drain.clone()],
    )];
    let s = run(&mut memory, t + 2.0, &pods[1..], &gone, Some(&s))
        .last_rollout
        .unwrap();
    assert_eq!(s.requests.old_revision, 120);
    assert_eq!(s.failed_requests.old_revision, 3);
    assert_eq!(s.pods_drained, 1);
    assert_eq!(s.longest_drain_millis, 800);
    assert!(s.finished_at.is_some());
    let again = run(&mut memory, t + 3.0, &pods[1..], &gone, Some(&s))
        .last_rollout
        .unwrap();
    assert_eq!(again, s, "nothing counted twice");
}

#[test]
fn a_pod_drained_on_two_proxies_counts_once_and_a_forced_drain_raises_one_event() {
    let mut memory = Memory::default();
    let t = 1_800_000_000.0;
    let pods = [
        pod("old-1", "old", 1),
        pod("old-2", "old", 2),
        pod("new-1", "new", 3),
    ];
    let s = run(&mut memory, t, &pods, &[], None).last_rollout.unwrap();
    let record = |ms, forced| DrainRecord {
        address: "10.0.0.1:8080".parse().unwrap(),
        port: None,
        reason: DrainReason::Terminating,
        pod: Some("old-1".to_owned()),
        since: t + 1.0,
        drained_after_ms: ms,
        forced,
        requests: 0,
        errors: 0,
    };
    let mut holding = endpoint("old-2", 2, 0, 0);
    holding.state = EndpointStatus::Draining;
    holding.draining_since = Some(t + 2.0);
    holding.in_flight = 1;
    holding.connections = 1;
    holding.forced = Some(OpenCounts {
        in_flight: 1,
        connections: 1,
    });
    let open = Some(OpenCounts {
        in_flight: 0,
        connections: 1,
    });
    let proxies = [
        proxy("p1", vec![holding.clone()], vec![record(900, None)]),
        proxy("p2", vec![holding], vec![record(30_000, open)]),
    ];
    let tracked = run(&mut memory, t + 31.0, &pods[1..], &proxies, Some(&s));
    let s = tracked.last_rollout.unwrap();
    assert_eq!(s.pods_drained, 1);
    assert_eq!(s.longest_drain_millis, 30_000);
    assert_eq!(
        s.forced_terminations, 2,
        "old-1 (from history) and old-2 (live)"
    );
    assert_eq!(tracked.events.len(), 2);
    assert!(
        tracked
            .events
            .iter()
            .all(|e| e.reason == "ForcedDrain" && e.warning)
    );
    assert_eq!(tracked.draining.len(), 1);
    assert_eq!(tracked.draining[0].pod, "old-2");
    assert_eq!(tracked.draining[0].in_flight, 2, "summed over proxies");
    let again = run(&mut memory, t + 32.0, &pods[1..], &proxies, Some(&s));
    assert!(again.events.is_empty());
    assert_eq!(again.last_rollout.unwrap().forced_terminations, 2);
}

#[test]
fn a_new_leader_does_not_count_drains_already_on_status() {
    let t = 1_800_000_000.0;
    let pods = [pod("old-2", "old", 2), pod("new-1", "new", 3)];
    let mut summary = run(&mut Memory::default(), t, &pods, &[], None)
        .last_rollout
        .unwrap();
    summary.pods_drained = 1;
    let drained = DrainRecord {
        address: "10.0.0.1:8080".parse().unwrap(),
        port: None,
        reason: DrainReason::Terminating,
        pod: Some("old-1".to_owned()),
        since: t + 1.0,
        drained_after_ms: 500,
        forced: None,
        requests: 0,
        errors: 0,
    };
    let proxies = [proxy("p1", vec![], vec![drained])];
    let mut fresh = Memory::default();
    let s = run(&mut fresh, t + 5.0, &pods, &proxies, Some(&summary))
        .last_rollout
        .unwrap();
    assert_eq!(s.pods_drained, 1);
}

#[test]
fn balance_is_max_over_mean_of_a_full_window_over_steady_pods() {
    let mut memory = Memory::default();
    let t = 1_800_000_000.0;
    let pods = [pod("a", "new", 1), pod("b", "new", 2)];
    let read = |a, b| {
        [proxy(
            "p1",
            vec![endpoint("a", 1, a, 0), endpoint("b", 2, b, 0)],
            vec![],
        )]
    };
    assert_eq!(run(&mut memory, t, &pods, &read(0, 0), None).balance, None);
    assert_eq!(
        run(&mut memory, t + 10.0, &pods, &read(100, 50), None).balance,
        None,
        "window not full"
    );
    let b = run(&mut memory, t + 30.0, &pods, &read(300, 100), None)
        .balance
        .unwrap();
    assert_eq!(b.max_over_mean, "1.50");
    assert_eq!(b.window_seconds, 30);
    assert_eq!(b.pods, 2);
    // Too little traffic says nothing.
    assert_eq!(
        run(&mut memory, t + 61.0, &pods, &read(310, 110), None).balance,
        None
    );
    assert_eq!(max_over_mean(&[]), None);
    assert_eq!(max_over_mean(&[50, 50, 50]), Some(1.0));
}

fn summary_with(forced: i32, sent: i64, failed: i64) -> RolloutSummary {
    let mut s = run(
        &mut Memory::default(),
        1.0e9,
        &[pod("a", "old", 1)],
        &[],
        None,
    )
    .last_rollout
    .unwrap();
    s.forced_terminations = forced;
    s.requests.new_revision = sent;
    s.failed_requests.new_revision = failed;
    s
}

#[test]
fn pause_when_thresholds_are_crossed_once_per_rollout() {
    let thresholds = PauseThresholds {
        forced_drains: Some(2),
        error_ratio: Some(0.05),
        min_requests: Some(200),
        rollback: false,
    };
    assert_eq!(pause_reason(&thresholds, &summary_with(1, 1000, 50)), None);
    let forced = pause_reason(&thresholds, &summary_with(2, 0, 0)).unwrap();
    assert!(
        forced.starts_with("2 drains reached the timeout"),
        "{forced}"
    );
    assert_eq!(
        pause_reason(&thresholds, &summary_with(0, 199, 100)),
        None,
        "too few requests"
    );
    let errors = pause_reason(&thresholds, &summary_with(0, 1000, 51)).unwrap();
    assert_eq!(
        errors,
        "51 of 1000 requests to revision new failed (5.1%; pauseWhen.errorRatio: 0.05)"
    );
    assert_eq!(
        pause_reason(&PauseThresholds::default(), &summary_with(99, 1000, 1000)),
        None
    );
    let mut paused = summary_with(2, 0, 0);
    paused.paused = Some(pause("x".to_owned(), 1.0e9, 3, false));
    assert_eq!(pause_reason(&thresholds, &paused), None);
    let record = paused.paused.unwrap();
    assert!(!resumes(&record, 3, false));
    assert!(resumes(&record, 4, false), "a spec change resumes");
    assert!(resumes(&record, 3, true), "the annotation resumes");
}

/// Random counter growth with reads that fail now and then: the rollout counts exactly
/// the growth between the first read (a baseline) and the last successful one.
#[test]
fn property_requests_are_conserved() {
    let mut rng = fastrand::Rng::with_seed(11);
    for _ in 0..300 {
        let mut memory = Memory::default();
        let t = 1_800_000_000.0;
        let pods = [pod("old-1", "old", 1), pod("new-1", "new", 2)];
        let mut counts = [0u64; 2];
        let (mut baseline, mut last_read) = (None, 0u64);
        let mut summary = run(&mut memory, t, &pods, &[], None).last_rollout.unwrap();
        let mut first = true;
        for step in 0..20 {
            let grow = [rng.u64(..50), rng.u64(..50)];
            counts[0] += grow[0];
            counts[1] += grow[1];
            let unreadable = !first && rng.u8(..6) == 0;
            let observation = if unreadable {
                ProxyObservation {
                    proxy: "p1".to_owned(),
                    report: Err("timeout".to_owned()),
                }
            } else {
                proxy(
                    "p1",
                    vec![
                        endpoint("old-1", 1, counts[0], 0),
                        endpoint("new-1", 2, counts[1], 0),
                    ],
                    vec![],
                )
            };
            if !unreadable {
                first = false;
                baseline.get_or_insert(counts[0] + counts[1]);
                last_read = counts[0] + counts[1];
            }
            let tracked = run(
                &mut memory,
                t + f64::from(step),
                &pods,
                &[observation],
                Some(&summary),
            );
            summary = tracked.last_rollout.unwrap();
        }
        // Growth up to the last successful read, after the baseline read.
        let truth = last_read - baseline.unwrap();
        let counted = summary.requests.old_revision + summary.requests.new_revision;
        assert_eq!(counted, i64::try_from(truth).unwrap());
    }
}

#[test]
fn the_last_drain_counts_before_the_proxies_file_it() {
    // The last old pod drained (the proxies list it as draining, nothing open) and is
    // gone from the API before any proxy moved it to `/drains`.
    let mut memory = Memory::default();
    let t0 = 1_800_000_000.0;
    let mixed = [pod("a", "old", 1), pod("c", "new", 3)];
    let listed = [proxy(
        "p",
        vec![endpoint("a", 1, 10, 0), endpoint("c", 3, 10, 0)],
        vec![],
    )];
    let summary = run(&mut memory, t0, &mixed, &listed, None).last_rollout;
    let mut draining = endpoint("a", 1, 12, 0);
    draining.state = EndpointStatus::Draining;
    draining.draining_since = Some(t0 + 1.0);
    draining.drained_after_ms = Some(640);
    let drained = [proxy("p", vec![draining, endpoint("c", 3, 20, 0)], vec![])];
    let done = run(
        &mut memory,
        t0 + 3.0,
        &mixed[1..],
        &drained,
        summary.as_ref(),
    )
    .last_rollout
    .unwrap();
    assert!(done.finished_at.is_some());
    assert_eq!(done.pods_drained, 1);
    assert_eq!(done.longest_drain_millis, 640);
    // When `/drains` has it later, it is not counted twice (the rollout is over anyway).
    let filed = DrainRecord {
        address: "10.0.0.1:8080".parse().unwrap(),
        port: None,
        reason: DrainReason::Terminating,
        pod: Some("a".to_owned()),
        since: t0 + 1.0,
        drained_after_ms: 640,
        forced: None,
        requests: 0,
        errors: 0,
    };
    let later = [proxy("p", vec![endpoint("c", 3, 30, 0)], vec![filed])];
    let after = run(&mut memory, t0 + 5.0, &mixed[1..], &later, Some(&done));
    assert_eq!(after.last_rollout.unwrap().pods_drained, 1);
}

#[test]
fn a_running_rollout_reads_back_equal_when_nothing_happened() {
    // Status goes through the API server between reconciles: whatever tracking writes
    // must come back equal, or every reconcile writes status and triggers the next.
    let round_trip = |s: &RolloutSummary| -> RolloutSummary {
        serde_json::from_value(serde_json::to_value(s).unwrap()).unwrap()
    };
    let mut memory = Memory::default();
    let t0 = 1_800_000_000.0;
    let mixed = [pod("a", "old", 1), pod("c", "new", 3)];
    let proxies = [proxy("p", vec![endpoint("a", 1, 5, 0)], vec![])];
    let first = run(&mut memory, t0 + 0.7, &mixed, &proxies, None)
        .last_rollout
        .unwrap();
    let stored = round_trip(&first);
    assert_eq!(
        stored, first,
        "sub-second times do not survive the API server"
    );
    let second = run(&mut memory, t0 + 3.9, &mixed, &proxies, Some(&stored))
        .last_rollout
        .unwrap();
    assert_eq!(second, stored, "a growing duration rewrites status");
}

#[test]
fn memory_stays_flat_over_many_rollouts() {
    let mut memory = Memory::default();
    let mut previous: Option<RolloutSummary> = None;
    let t0 = 1_800_000_000.0;
    let mut most = 0;
    for i in 0..300u32 {
        let (old, new) = (format!("r{i}"), format!("r{}", i + 1));
        let now = t0 + f64::from(i) * 10.0;
        let n = |k: u32| u8::try_from(1 + (i * 3 + k) % 250).unwrap();
        let names: Vec<String> = (0..3).map(|k| format!("pod-{i}-{k}")).collect();
        let next: Vec<String> = (0..3).map(|k| format!("pod-{}-{k}", i + 1)).collect();
        let mut pods: Vec<AppPod> = (0..3).map(|k| pod(&names[k], &old, n(k as u32))).collect();
        pods.extend((0..3).map(|k| pod(&next[k], &new, n(3 + k as u32))));
        let endpoints = pods
            .iter()
            .enumerate()
            .map(|(k, p)| endpoint(&p.name, n(k as u32), u64::from(i) * 10, 0))
            .collect();
        let proxies = [proxy("p", endpoints, vec![])];
        for step in [&pods[..], &pods[3..]] {
            let tracked = track(
                &mut memory,
                &Inputs {
                    now,
                    update_revision: &new,
                    pods: step,
                    proxies: &proxies,
                    previous: previous.as_ref(),
                },
            );
            previous = tracked.last_rollout;
            most = most.max(memory.len());
        }
    }
    // Six pods and one proxy at a time: a few dozen entries, never one per pod ever seen
    // (1,800 pod names went by).
    assert!(most <= 40, "memory grew to {most} entries");
}

#[test]
fn a_pod_serving_two_ports_is_one_pod_with_its_ports_summed() {
    let mut memory = Memory::default();
    let t = 1_800_000_000.0;
    let pods = [pod("old-1", "old", 1), pod("new-1", "new", 2)];
    let s = run(&mut memory, t, &pods, &[], None).last_rollout.unwrap();
    // One proxy, one row per port of old-1 (different addresses, same IP and pod).
    let on_port = |port: &str, number: u16, in_flight: u64, connections: u64| {
        let mut row = endpoint("old-1", 1, 10, 1);
        row.address = format!("10.0.0.1:{number}").parse().unwrap();
        row.port = Some(port.to_owned());
        row.state = EndpointStatus::Draining;
        row.draining_since = Some(t + 1.0);
        row.in_flight = in_flight;
        row.connections = connections;
        row
    };
    let proxies = [proxy(
        "p",
        vec![on_port("http", 8080, 2, 1), on_port("grpc", 9090, 3, 2)],
        vec![],
    )];
    let tracked = run(&mut memory, t + 2.0, &pods, &proxies, Some(&s));
    assert_eq!(tracked.draining.len(), 1, "one pod, not one per port");
    let draining = &tracked.draining[0];
    assert_eq!(
        (
            draining.pod.as_str(),
            draining.in_flight,
            draining.connections
        ),
        ("old-1", 5, 3),
        "in flight and connections summed over the ports"
    );

    // Both ports finish; the pod counts as drained once.
    let done = |port, number| {
        let mut row = on_port(port, number, 0, 0);
        row.drained_after_ms = Some(700);
        row
    };
    let proxies = [proxy(
        "p",
        vec![done("http", 8080), done("grpc", 9090)],
        vec![],
    )];
    let tracked = run(&mut memory, t + 3.0, &pods, &proxies, Some(&s));
    assert_eq!(tracked.last_rollout.unwrap().pods_drained, 1);
    assert!(tracked.draining.is_empty());
}
