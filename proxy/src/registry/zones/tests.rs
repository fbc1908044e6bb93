use super::*;
use crate::endpoint::{Endpoint, EndpointSet};
use crate::load::EjectionPolicy;
use crate::registry::{Algorithm, BalancerConfig, Registry};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::Instant;

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

/// 127.0.0.2-3 in zone-a, 127.0.0.4-5 in zone-b.
fn two_zones() -> EndpointSet {
    EndpointSet::new(
        (2..6)
            .map(|i| Endpoint {
                zone: Some(if i < 4 { "zone-a" } else { "zone-b" }.to_owned()),
                ..Endpoint::ready(addr(i))
            })
            .collect(),
    )
}

fn zoned(algorithm: Algorithm) -> (Registry, Arc<ZoneState>) {
    let state = Arc::new(ZoneState::default());
    let registry = Registry::with_seed(config(algorithm), 11)
        .with_zone_routing(ZoneRouting::new(state.clone(), None));
    registry.apply(&two_zones(), Instant::now());
    (registry, state)
}

fn in_zone_a(state: &ZoneState) {
    state.locality.store(Some(Arc::new(Locality {
        zone: "zone-a".into(),
        proxies: Some(vec![("zone-a".into(), 1), ("zone-b".into(), 1)]),
    })));
}

fn picks(registry: &Registry, n: usize) -> HashMap<SocketAddr, usize> {
    let mut out = HashMap::new();
    for _ in 0..n {
        let chosen = registry.select(Instant::now(), &[]).expect("an endpoint");
        *out.entry(chosen.address).or_default() += 1;
    }
    out
}

fn zone_a_share(counts: &HashMap<SocketAddr, usize>) -> f64 {
    let local = counts.get(&addr(2)).unwrap_or(&0) + counts.get(&addr(3)).unwrap_or(&0);
    local as f64 / counts.values().sum::<usize>() as f64
}

fn counted(state: &ZoneState, locality: &str, zone: &str) -> u64 {
    state
        .requests
        .get_or_create(&vec![
            ("locality", locality.to_owned()),
            ("zone", zone.to_owned()),
        ])
        .get()
}

#[tokio::test(start_paused = true)]
async fn until_the_zone_is_known_selection_is_as_if_off() {
    let (registry, state) = zoned(Algorithm::RoundRobin);
    let counts = picks(&registry, 400);
    assert_eq!(counts.len(), 4, "every zone: {counts:?}");
    assert_eq!(
        counted(&state, "same", "zone-a") + counted(&state, "cross", "zone-b"),
        0
    );
}

#[tokio::test(start_paused = true)]
async fn requests_stay_in_the_zone_and_spill_once_it_cannot_carry_its_share() {
    let (registry, state) = zoned(Algorithm::RoundRobin);
    in_zone_a(&state);
    let counts = picks(&registry, 400);
    assert_eq!(zone_a_share(&counts), 1.0, "{counts:?}");
    assert_eq!(
        counts.get(&addr(2)),
        Some(&200),
        "round-robin within the zone"
    );
    assert_eq!(counted(&state, "same", "zone-a"), 400);
    assert_eq!(counted(&state, "cross", "zone-b"), 0);

    // One of zone-a's two endpoints drains: zone-a holds 1 of 3, against half of
    // the proxies, so it keeps 2/3 of the requests and zone-b takes the rest.
    registry.request_drain(addr(3).ip(), Instant::now());
    let counts = picks(&registry, 3000);
    assert_eq!(counts.get(&addr(3)), None, "draining gets nothing");
    let share = zone_a_share(&counts);
    assert!((share - 2.0 / 3.0).abs() < 0.04, "{share} {counts:?}");
    assert_eq!(
        counted(&state, "cross", "zone-b") as usize,
        counts.get(&addr(4)).unwrap_or(&0) + counts.get(&addr(5)).unwrap_or(&0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_slow_local_endpoint_carries_less_with_p2c() {
    let (registry, state) = zoned(Algorithm::P2cEwma);
    in_zone_a(&state);
    let now = Instant::now();
    for i in 2..6 {
        let rtt = if i == 2 { 20 } else { 1 };
        registry
            .get(addr(i))
            .unwrap()
            .observe_rtt(Duration::from_millis(rtt), now);
    }
    // zone-a: 1.5/20 + 1 of 3.075: about 0.35 of the capacity against 0.5 of the
    // proxies, so about 0.7 of the requests stay.
    let counts = picks(&registry, 3000);
    let share = zone_a_share(&counts);
    assert!((0.62..0.78).contains(&share), "{share} {counts:?}");
}

#[tokio::test(start_paused = true)]
async fn an_affinity_key_keeps_its_home_in_another_zone() {
    let (zoned, state) = zoned(Algorithm::RoundRobin);
    in_zone_a(&state);
    let plain = Registry::with_seed(config(Algorithm::RoundRobin), 11);
    plain.apply(&two_zones(), Instant::now());
    let mut homes_in_b = 0;
    for key in 0..64u64 {
        let key = key.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let (home, _) = plain.select_affine(Instant::now(), &[], key, 1.25).unwrap();
        let (got, moved) = zoned.select_affine(Instant::now(), &[], key, 1.25).unwrap();
        assert_eq!(got.address, home.address, "key {key}");
        assert!(!moved);
        homes_in_b += usize::from(home.address.ip() >= addr(4).ip());
    }
    assert!(homes_in_b > 0, "some keys live in zone-b");
}
