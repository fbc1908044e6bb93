use super::*;
use crate::endpoint::Endpoint;
use crate::load::EjectionPolicy;

fn config(algorithm: Algorithm) -> BalancerConfig {
    BalancerConfig {
        algorithm,
        initial_rtt: Duration::from_millis(30),
        ewma_decay: Duration::from_secs(10),
        warmup: Duration::from_secs(10),
        ejection: EjectionPolicy {
            consecutive_failures: 2,
            base: Duration::from_secs(30),
            max: Duration::from_secs(300),
            max_ejected_ratio: 0.5,
        },
        drain_ttl: Duration::from_secs(60),
    }
}

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, i], 8080))
}

fn set(endpoints: &[Endpoint]) -> EndpointSet {
    EndpointSet::new(endpoints.to_vec())
}

fn picks(registry: &Registry, n: usize) -> HashMap<SocketAddr, usize> {
    let mut out = HashMap::new();
    for _ in 0..n {
        let chosen = registry.select(Instant::now(), &[]).expect("an endpoint");
        *out.entry(chosen.address).or_default() += 1;
    }
    out
}

#[tokio::test(start_paused = true)]
async fn round_robin_visits_everyone_equally() {
    let registry = Registry::new(config(Algorithm::RoundRobin));
    registry.apply(
        &set(&[
            Endpoint::ready(addr(2)),
            Endpoint::ready(addr(3)),
            Endpoint::ready(addr(4)),
        ]),
        Instant::now(),
    );
    let counts = picks(&registry, 300);
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        vec![100, 100, 100]
    );
}

#[tokio::test(start_paused = true)]
async fn p2c_avoids_the_endpoint_with_pending_requests() {
    let registry = Registry::new(config(Algorithm::P2cEwma));
    registry.apply(
        &set(&[Endpoint::ready(addr(2)), Endpoint::ready(addr(3))]),
        Instant::now(),
    );
    let busy = registry.get(addr(2)).unwrap();
    busy.pending.store(5, Relaxed);
    let counts = picks(&registry, 100);
    assert_eq!(
        counts.get(&addr(3)),
        Some(&100),
        "with two candidates P2C always compares both"
    );
}

#[tokio::test(start_paused = true)]
async fn p2c_prefers_the_faster_endpoint() {
    let registry = Registry::new(config(Algorithm::P2cEwma));
    let endpoints: Vec<_> = (2..6).map(|i| Endpoint::ready(addr(i))).collect();
    registry.apply(&set(&endpoints), Instant::now());
    registry
        .get(addr(2))
        .unwrap()
        .observe_rtt(Duration::from_millis(300), Instant::now());
    for i in 3..6 {
        registry
            .get(addr(i))
            .unwrap()
            .observe_rtt(Duration::from_millis(3), Instant::now());
    }
    let counts = picks(&registry, 4000);
    // The slow one wins no comparison; it only gets probes, after 32 missed selections,
    // then 64, 128, ...: at most 7 in 4000 (32 + 64 + ... + 2048 = 4064).
    let slow = counts.get(&addr(2)).copied().unwrap_or(0);
    assert!((1..=7).contains(&slow), "{counts:?}");
}

#[tokio::test(start_paused = true)]
async fn a_probe_sample_replaces_a_noisy_estimate() {
    let registry = Registry::new(config(Algorithm::P2cEwma));
    let endpoints: Vec<_> = (2..6).map(|i| Endpoint::ready(addr(i))).collect();
    registry.apply(&set(&endpoints), Instant::now());
    for i in 2..6 {
        let e = registry.get(addr(i)).unwrap();
        e.observe_rtt(Duration::from_micros(300), Instant::now());
    }
    // One hiccup: 10 ms against 0.3 ms. The pod loses every comparison now...
    let noisy = registry.get(addr(2)).unwrap();
    noisy.observe_rtt(Duration::from_millis(10), Instant::now());
    let mut waited = 0;
    while registry.select(Instant::now(), &[]).unwrap().address != addr(2) {
        waited += 1;
        assert!(waited < 200, "no probe after {waited} selections");
    }
    // ...until it is probed (after 32 missed selections, no clock time needed), and the
    // probe's fast sample puts it straight back in rotation.
    assert!(waited >= 32, "probed after only {waited}");
    noisy.observe_rtt(Duration::from_micros(300), Instant::now());
    let counts = picks(&registry, 400);
    let share = counts.get(&addr(2)).copied().unwrap_or(0);
    assert!(share >= 80, "back in rotation: {counts:?}");
}

#[tokio::test(start_paused = true)]
async fn slow_start_ramps_new_endpoints_but_not_the_first_set() {
    let registry = Registry::new(config(Algorithm::LeastRequest));
    registry.apply(&set(&[Endpoint::ready(addr(2))]), Instant::now());
    registry.apply(
        &set(&[Endpoint::ready(addr(2)), Endpoint::ready(addr(3))]),
        Instant::now(),
    );
    let reports = registry.reports(Instant::now());
    assert_eq!(
        reports[0].weight, 1.0,
        "endpoints of the first update start at full weight"
    );
    assert!(
        (reports[1].weight - 0.1).abs() < 1e-9,
        "a new endpoint starts at 10%"
    );
    // Equal load: the new endpoint costs 10x more, so P2C sends everything to the old.
    let counts = picks(&registry, 200);
    assert_eq!(counts.get(&addr(3)), None);
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(registry.reports(Instant::now())[1].weight, 1.0);
}

#[tokio::test(start_paused = true)]
async fn slow_start_begins_when_the_endpoint_becomes_ready() {
    let registry = Registry::new(config(Algorithm::LeastRequest));
    registry.apply(&set(&[Endpoint::ready(addr(2))]), Instant::now());
    let mut starting = Endpoint::ready(addr(3));
    starting.ready = false;
    let both = |new: &Endpoint| set(&[Endpoint::ready(addr(2)), new.clone()]);
    registry.apply(&both(&starting), Instant::now());
    // Listed but unready for longer than the warmup (probes, readiness gate).
    tokio::time::advance(Duration::from_secs(30)).await;
    assert!((registry.reports(Instant::now())[1].weight - 0.1).abs() < 1e-9);
    starting.ready = true;
    registry.apply(&both(&starting), Instant::now());
    tokio::time::advance(Duration::from_secs(5)).await;
    let weight = registry.reports(Instant::now())[1].weight;
    assert!(
        (0.5..0.6).contains(&weight),
        "half way up the ramp: {weight}"
    );
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(registry.reports(Instant::now())[1].weight, 1.0);
}

#[tokio::test(start_paused = true)]
async fn a_finished_drain_is_recorded_with_its_duration_and_what_was_forced() {
    let registry = Registry::new(config(Algorithm::RoundRobin));
    registry.apply(
        &set(&[Endpoint::ready(addr(2)), Endpoint::ready(addr(3))]),
        Instant::now(),
    );
    let slow = registry.get(addr(3)).unwrap();
    slow.in_flight.store(1, Relaxed);
    slow.connections.store(1, Relaxed);
    let ip = addr(3).ip();
    assert!(registry.request_drain(ip, Instant::now()).is_some());
    assert!(
        registry
            .drain_timed_out(addr(9).ip(), Instant::now())
            .is_none()
    );
    registry.drain_timed_out(ip, Instant::now());
    let report = &registry.reports(Instant::now())[1];
    assert!(report.draining_since.is_some());
    assert_eq!(report.drained_after_ms, None, "still open");
    assert_eq!(
        report.forced,
        Some(OpenCounts {
            in_flight: 1,
            connections: 1
        })
    );
    // Discovery drops it while a request is still open: not forgotten yet.
    registry.apply(&set(&[Endpoint::ready(addr(2))]), Instant::now());
    assert!(registry.drains().is_empty());
    slow.in_flight.store(0, Relaxed);
    slow.connections.store(0, Relaxed);
    registry.tick(Instant::now());
    let drains = registry.drains();
    assert_eq!(drains.len(), 1, "{drains:?}");
    assert_eq!(drains[0].address, addr(3));
    // Requested by the pod, then confirmed by discovery removing it.
    assert_eq!(drains[0].reason, DrainReason::Removed);
    assert!(drains[0].forced.is_some());
    // An endpoint removed without ever draining through a pod request is recorded too.
    registry.apply(&set(&[]), Instant::now());
    registry.tick(Instant::now());
    let drains = registry.drains();
    assert_eq!(drains.len(), 2);
    assert_eq!(drains[1].reason, DrainReason::Removed);
    assert_eq!(drains[1].forced, None);
}

#[tokio::test(start_paused = true)]
async fn terminating_endpoints_drain_and_serve_only_as_a_fallback() {
    let registry = Registry::new(config(Algorithm::RoundRobin));
    let mut leaving = Endpoint::ready(addr(2));
    leaving.ready = false;
    leaving.terminating = true;
    registry.apply(
        &set(&[leaving.clone(), Endpoint::ready(addr(3))]),
        Instant::now(),
    );
    assert!(registry.get(addr(2)).unwrap().is_draining());
    assert_eq!(picks(&registry, 10).get(&addr(3)), Some(&10));
    // Only the terminating one is left: it still serves (as kube-proxy falls back).
    registry.apply(&set(&[leaving.clone()]), Instant::now());
    assert_eq!(
        registry.select(Instant::now(), &[]).unwrap().address,
        addr(2)
    );
    leaving.serving = false;
    registry.apply(&set(&[leaving]), Instant::now());
    assert!(
        registry.select(Instant::now(), &[]).is_none(),
        "not serving: no endpoint at all"
    );
}

#[tokio::test(start_paused = true)]
async fn requested_drain_stops_routing_and_expires_after_the_ttl() {
    let registry = Registry::new(config(Algorithm::RoundRobin));
    registry.apply(
        &set(&[Endpoint::ready(addr(2)), Endpoint::ready(addr(3))]),
        Instant::now(),
    );
    let report = registry
        .request_drain(addr(2).ip(), Instant::now())
        .expect("known pod");
    assert_eq!(report.state, Some(EndpointStatus::Draining));
    assert!(report.draining_since.is_some());
    assert_eq!(picks(&registry, 20).get(&addr(3)), Some(&20));

    tokio::time::advance(Duration::from_secs(59)).await;
    registry.tick(Instant::now());
    assert!(
        registry.get(addr(2)).unwrap().is_draining(),
        "still within the TTL"
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    registry.tick(Instant::now());
    assert!(
        !registry.get(addr(2)).unwrap().is_draining(),
        "expired: discovery never confirmed"
    );
    assert_eq!(picks(&registry, 20).get(&addr(2)), Some(&10));
}

#[tokio::test(start_paused = true)]
async fn a_confirmed_drain_does_not_expire() {
    let registry = Registry::new(config(Algorithm::RoundRobin));
    registry.apply(
        &set(&[Endpoint::ready(addr(2)), Endpoint::ready(addr(3))]),
        Instant::now(),
    );
    registry.request_drain(addr(2).ip(), Instant::now());
    let mut terminating = Endpoint::ready(addr(2));
    terminating.terminating = true;
    terminating.ready = false;
    registry.apply(
        &set(&[terminating, Endpoint::ready(addr(3))]),
        Instant::now(),
    );
    tokio::time::advance(Duration::from_secs(600)).await;
    registry.tick(Instant::now());
    assert!(registry.get(addr(2)).unwrap().is_draining());
}

#[tokio::test(start_paused = true)]
async fn drain_from_an_unknown_ip_is_refused() {
    let registry = Registry::new(config(Algorithm::RoundRobin));
    registry.apply(&set(&[Endpoint::ready(addr(2))]), Instant::now());
    assert!(
        registry
            .request_drain(addr(9).ip(), Instant::now())
            .is_none()
    );
    assert!(!registry.drain_report(addr(9).ip(), Instant::now()).known);
}

#[tokio::test(start_paused = true)]
async fn removed_endpoints_are_reported_until_idle() {
    let registry = Registry::new(config(Algorithm::RoundRobin));
    registry.apply(
        &set(&[Endpoint::ready(addr(2)), Endpoint::ready(addr(3))]),
        Instant::now(),
    );
    let leaving = registry.get(addr(2)).unwrap();
    leaving.in_flight.store(1, Relaxed);
    registry.apply(&set(&[Endpoint::ready(addr(3))]), Instant::now());
    let report = registry.drain_report(addr(2).ip(), Instant::now());
    assert!(report.known && report.in_flight == 1, "{report:?}");
    assert_eq!(
        registry.select(Instant::now(), &[]).unwrap().address,
        addr(3)
    );
    leaving.in_flight.store(0, Relaxed);
    registry.tick(Instant::now());
    assert!(
        !registry.drain_report(addr(2).ip(), Instant::now()).known,
        "forgotten once idle"
    );
}

#[tokio::test(start_paused = true)]
async fn consecutive_failures_eject_for_a_while_but_never_more_than_half() {
    let registry = Registry::new(config(Algorithm::RoundRobin));
    let endpoints: Vec<_> = (2..6).map(|i| Endpoint::ready(addr(i))).collect();
    registry.apply(&set(&endpoints), Instant::now());
    for i in 2..5 {
        let e = registry.get(addr(i)).unwrap();
        registry.record_failure(&e, Instant::now());
        registry.record_failure(&e, Instant::now());
    }
    let statuses: Vec<_> = registry
        .reports(Instant::now())
        .iter()
        .map(|r| r.state)
        .collect();
    assert_eq!(
        statuses,
        vec![
            EndpointStatus::Ejected,
            EndpointStatus::Ejected,
            EndpointStatus::Active,
            EndpointStatus::Active
        ],
        "the third is spared: at most half may be ejected"
    );
    tokio::time::advance(Duration::from_secs(30)).await;
    registry.tick(Instant::now());
    assert!(
        registry
            .reports(Instant::now())
            .iter()
            .all(|r| r.state == EndpointStatus::Active)
    );
}

#[tokio::test(start_paused = true)]
async fn an_unmeasured_endpoint_gets_a_first_request_among_fast_warm_ones() {
    let registry = Registry::new(config(Algorithm::P2cEwma));
    let endpoints: Vec<_> = (2..10).map(|i| Endpoint::ready(addr(i))).collect();
    registry.apply(&set(&endpoints), Instant::now());
    for i in 2..10 {
        registry
            .get(addr(i))
            .unwrap()
            .observe_rtt(Duration::from_millis(1), Instant::now());
    }
    let mut grown = endpoints.clone();
    grown.push(Endpoint::ready(addr(10)));
    registry.apply(&set(&grown), Instant::now());
    tokio::time::advance(Duration::from_secs(10)).await; // past slow start
    let counts = picks(&registry, 50);
    assert!(
        counts.get(&addr(10)).is_some_and(|n| *n >= 1),
        "never picked: {counts:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn one_hot_key_never_pushes_an_endpoint_past_the_bounded_load() {
    let registry = Registry::new(config(Algorithm::P2cEwma));
    let endpoints: Vec<_> = (2..6).map(|i| Endpoint::ready(addr(i))).collect();
    registry.apply(&set(&endpoints), Instant::now());
    let hot = crate::balance::affinity::hash(b"celebrity");
    let mut outstanding = Vec::new();
    for _ in 0..40 {
        let (endpoint, _) = registry
            .select_affine(Instant::now(), &[], hot, 1.25)
            .unwrap();
        endpoint.in_flight.fetch_add(1, Relaxed);
        outstanding.push(endpoint);
    }
    let loads: Vec<u64> = (2..6)
        .map(|i| registry.get(addr(i)).unwrap().in_flight.load(Relaxed))
        .collect();
    let mean = 40.0 / 4.0;
    assert!(
        loads.iter().all(|l| (*l as f64) <= 1.25 * mean + 1.0),
        "{loads:?}"
    );
    assert!(
        loads.iter().filter(|l| **l > 0).count() >= 3,
        "the hot key spilled over: {loads:?}"
    );
    // With nothing in flight the key goes back to its own endpoint every time.
    for e in &outstanding {
        e.in_flight.store(0, Relaxed);
    }
    let first = registry
        .select_affine(Instant::now(), &[], hot, 1.25)
        .unwrap()
        .0
        .address;
    for _ in 0..10 {
        assert_eq!(
            registry
                .select_affine(Instant::now(), &[], hot, 1.25)
                .unwrap()
                .0
                .address,
            first
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_draining_endpoints_keys_move_and_come_back() {
    let registry = Registry::new(config(Algorithm::P2cEwma));
    let endpoints: Vec<_> = (2..6).map(|i| Endpoint::ready(addr(i))).collect();
    registry.apply(&set(&endpoints), Instant::now());
    let key = crate::balance::affinity::hash(b"session-7");
    let (owner, moved) = registry
        .select_affine(Instant::now(), &[], key, 1.25)
        .unwrap();
    assert!(!moved);
    registry.request_drain(owner.address.ip(), Instant::now());
    let (elsewhere, moved) = registry
        .select_affine(Instant::now(), &[], key, 1.25)
        .unwrap();
    assert!(moved && elsewhere.address != owner.address);
    tokio::time::advance(Duration::from_secs(60)).await;
    registry.tick(Instant::now());
    assert_eq!(
        registry
            .select_affine(Instant::now(), &[], key, 1.25)
            .unwrap()
            .0
            .address,
        owner.address,
        "back after the mark expired"
    );
}

#[tokio::test(start_paused = true)]
async fn a_seeded_registry_selects_the_same_sequence() {
    // Unequal loads, so which pair P2C draws decides the winner: the sequence follows
    // the seed alone.
    let sequence = |seed: u64| {
        let registry = Registry::with_seed(config(Algorithm::LeastRequest), seed);
        let endpoints: Vec<_> = (1..=8).map(|i| Endpoint::ready(addr(i))).collect();
        registry.apply(&set(&endpoints), Instant::now());
        for (i, endpoint) in registry.snapshot().endpoints.iter().enumerate() {
            endpoint.in_flight.store(i as u64 * 3, Relaxed);
        }
        (0..64)
            .map(|_| {
                registry
                    .select(Instant::now(), &[])
                    .expect("an endpoint")
                    .address
            })
            .collect::<Vec<_>>()
    };
    let first = sequence(7);
    assert_eq!(first, sequence(7), "the same seed, the same choices");
    assert_ne!(first, sequence(8), "another seed, other choices");
    assert!(
        first.iter().any(|a| *a != first[0]),
        "the choice depends on the draw: {first:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_pod_drains_on_every_port_and_reports_their_sum() {
    let port = |name: &str, number: u16| {
        let registry = Arc::new(Registry::new(config(Algorithm::RoundRobin)));
        registry.apply(
            &set(&[
                Endpoint::ready(SocketAddr::from(([127, 0, 0, 2], number))),
                Endpoint::ready(SocketAddr::from(([127, 0, 0, 3], number))),
            ]),
            Instant::now(),
        );
        Port {
            name: Some(name.to_owned()),
            registry,
        }
    };
    let ports = Ports::new(vec![port("http", 8080), port("grpc", 9090)]);
    let pod = addr(2).ip();
    for (i, p) in ports.iter().enumerate() {
        let endpoint = p.registry.snapshot().endpoints[0].clone();
        endpoint.in_flight.fetch_add(i as u64 + 1, Relaxed);
        endpoint.connections.fetch_add(1, Relaxed);
    }

    let report = ports
        .request_drain(pod, Instant::now())
        .expect("a known pod");
    assert_eq!(
        (report.in_flight, report.connections, report.state),
        (3, 2, Some(EndpointStatus::Draining)),
        "summed over both ports"
    );
    for p in ports.iter() {
        let chosen = p
            .registry
            .select(Instant::now(), &[])
            .expect("the other pod");
        assert_eq!(
            chosen.address.ip(),
            addr(3).ip(),
            "{:?} still routes to it",
            p.name
        );
    }
    let rows = ports.reports(Instant::now());
    assert_eq!(rows.len(), 4, "one row per pod and port");
    assert_eq!(
        rows.iter()
            .filter(|r| r.address.ip() == pod)
            .map(|r| (r.port.as_deref(), r.state))
            .collect::<Vec<_>>(),
        [
            (Some("http"), EndpointStatus::Draining),
            (Some("grpc"), EndpointStatus::Draining)
        ]
    );
    assert!(ports.request_drain(addr(9).ip(), Instant::now()).is_none());
    assert!(!ports.drain_report(addr(9).ip(), Instant::now()).known);
}
