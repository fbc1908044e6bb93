use super::*;

const MS: f64 = 1e6;

/// Share of `n` seeded draws of `route` that land in each of `zones` zones.
fn shares(route: &Route, local: usize, zones: usize, n: usize) -> Vec<f64> {
    let mut rng = fastrand::Rng::with_seed(7);
    let mut hits = vec![0usize; zones];
    for _ in 0..n {
        hits[route.choose(local, &mut rng)] += 1;
    }
    hits.iter().map(|&h| h as f64 / n as f64).collect()
}

/// Every zone with proxies routes by `route`; each proxy takes an equal part of the
/// clients. The traffic each zone's endpoints receive, as shares of the whole.
fn received(capacity: &[f64], proxies: &[f64]) -> Vec<f64> {
    let total: f64 = proxies.iter().sum();
    let mut traffic = vec![0.0; capacity.len()];
    for (origin, &n) in proxies.iter().enumerate() {
        if n == 0.0 {
            continue;
        }
        let weight = n / total;
        match route(capacity, proxies, origin) {
            Route::Local => traffic[origin] += weight,
            Route::Spill { local, surplus } => {
                traffic[origin] += weight * local;
                let sum: f64 = surplus.iter().sum();
                for (zone, s) in surplus.iter().enumerate() {
                    traffic[zone] += weight * (1.0 - local) * s / sum;
                }
            }
        }
    }
    traffic
}

fn close(a: f64, b: f64, tolerance: f64) -> bool {
    (a - b).abs() <= tolerance
}

#[test]
fn balanced_zones_stay_local() {
    // 2 + 2 equal endpoints, one proxy per zone.
    assert_eq!(route(&[2.0, 2.0], &[1.0, 1.0], 0), Route::Local);
    assert_eq!(route(&[2.0, 2.0], &[1.0, 1.0], 1), Route::Local);
    // More local capacity than local traffic: local too.
    assert_eq!(route(&[3.0, 1.0], &[1.0, 1.0], 0), Route::Local);
    // A little less, within the tolerance: still local (no 2% spill for noise).
    assert_eq!(route(&[1.93, 2.0], &[1.0, 1.0], 0), Route::Local);
}

#[test]
fn one_local_endpoint_of_four_keeps_half_and_spills_the_rest() {
    // zone-a has 1 endpoint, zone-b 3; one proxy each: a's proxy keeps half its requests.
    let r = route(&[1.0, 3.0], &[1.0, 1.0], 0);
    let Route::Spill { local, surplus } = &r else {
        panic!("expected a spill, got {r:?}");
    };
    assert!(close(*local, 0.5, 1e-12), "{local}");
    assert_eq!(surplus.as_slice(), &[0.0, 0.25]);
    let got = shares(&r, 0, 2, 20_000);
    assert!(close(got[0], 0.5, 0.02), "{got:?}");
    // Over both proxies every endpoint gets a quarter: zone-b's proxy stays local.
    assert_eq!(route(&[1.0, 3.0], &[1.0, 1.0], 1), Route::Local);
    let traffic = received(&[1.0, 3.0], &[1.0, 1.0]);
    assert!(
        close(traffic[0], 0.25, 1e-12) && close(traffic[1], 0.75, 1e-12),
        "{traffic:?}"
    );
}

#[test]
fn a_slow_local_endpoint_carries_less_and_the_zone_spills() {
    // zone-a: one endpoint at 20 ms, one at 1 ms; zone-b: two at 1 ms.
    let fastest = MS;
    let a = capacity(Some(20.0 * MS), 1.0, fastest) + capacity(Some(MS), 1.0, fastest);
    let b = 2.0 * capacity(Some(1.1 * MS), 1.0, fastest);
    assert!(close(a, 1.075, 1e-9), "{a}");
    assert!(
        close(b, 2.0, 1e-9),
        "within the tie band: full capacity: {b}"
    );
    let r = route(&[a, b], &[1.0, 1.0], 0);
    assert!(
        close(r.local_share(), a / (a + b) / 0.5, 1e-9),
        "local share {}",
        r.local_share()
    );
    assert!(r.local_share() < 0.75, "{r:?}");
    // Noise within the tie band changes nothing.
    let noisy = capacity(Some(1.4 * MS), 1.0, fastest) + capacity(Some(MS), 1.0, fastest);
    assert_eq!(route(&[noisy, b], &[1.0, 1.0], 0), Route::Local);
}

#[test]
fn capacity_is_the_slow_start_weight_without_a_fresh_estimate() {
    assert_eq!(capacity(None, 1.0, MS), 1.0);
    assert_eq!(capacity(None, 0.4, MS), 0.4);
    assert_eq!(capacity(Some(MS), 0.5, MS), 0.5);
    assert!(close(capacity(Some(3.0 * MS), 1.0, MS), 0.5, 1e-12));
    // Nothing measured at all: weight only.
    assert_eq!(capacity(Some(MS), 1.0, 0.0), 1.0);
}

#[test]
fn a_zone_with_endpoints_but_no_proxies_gets_its_share() {
    // zone-c has endpoints and no proxy: both other zones spill into it, and only it.
    let (capacity, proxies) = ([1.0, 1.0, 1.0], [1.0, 1.0, 0.0]);
    let r = route(&capacity, &proxies, 0);
    let Route::Spill { local, surplus } = &r else {
        panic!("expected a spill, got {r:?}");
    };
    assert!(close(*local, 2.0 / 3.0, 1e-12), "{local}");
    assert_eq!(surplus[1], 0.0, "zone-b has no spare capacity");
    assert!(surplus[2] > 0.0);
    let got = shares(&r, 0, 3, 30_000);
    assert!(close(got[2], 1.0 / 3.0, 0.02) && got[1] == 0.0, "{got:?}");
}

#[test]
fn summed_over_the_proxies_every_zone_receives_its_capacity_share() {
    // Starvation freedom: whatever the spread, each zone's endpoints get the traffic
    // their capacity share says, so no zone's pods sit idle.
    let cases: [(&[f64], &[f64]); 6] = [
        (&[1.0, 1.0, 1.0], &[1.0, 1.0, 0.0]),
        (&[10.0, 1.0, 1.0], &[1.0, 1.0, 0.0]),
        (&[2.0, 2.0, 1.0], &[3.0, 1.0, 0.0]),
        (&[1.0, 5.0], &[4.0, 1.0]),
        (&[0.0, 2.0, 2.0], &[1.0, 1.0, 1.0]),
        (&[1.0, 2.0, 3.0, 0.5], &[2.0, 1.0, 1.0, 0.0]),
    ];
    for (capacity, proxies) in cases {
        let total: f64 = capacity.iter().sum();
        let traffic = received(capacity, proxies);
        for (zone, (&got, &c)) in traffic.iter().zip(capacity).enumerate() {
            assert!(
                close(got, c / total, 1e-9),
                "zone {zone} of {capacity:?} / {proxies:?}: {traffic:?}"
            );
        }
    }
}

#[test]
fn an_unknown_spread_is_assumed_even_over_the_zones_with_endpoints() {
    // zone-a (local) 2, zone-b 1, unzoned 1, zone-d none: one proxy each in a and b.
    let capacity = [2.0, 1.0, 1.0, 0.0];
    let proxies = even_spread(&capacity, 0, Some(2));
    assert_eq!(proxies.as_slice(), &[1.0, 1.0, 0.0, 0.0]);
    // Local 2 of 4 against 1 of 2 proxies: local.
    assert_eq!(route(&capacity, &proxies, 0), Route::Local);
    // From zone-b (1 of 4 against 1 of 2): half local, the rest to the surplus of a
    // (0.5 - 0.5 = 0) and of the unzoned endpoints (0.25).
    let r = route(&capacity, &proxies, 1);
    let Route::Spill { local, surplus } = &r else {
        panic!("expected a spill, got {r:?}");
    };
    assert!(close(*local, 0.5, 1e-12), "{local}");
    assert_eq!(surplus.as_slice(), &[0.0, 0.0, 0.25, 0.0]);
    // The local zone counts its own proxy even without endpoints: everything leaves.
    let capacity = [0.0, 3.0];
    let proxies = even_spread(&capacity, 0, None);
    assert_eq!(proxies.as_slice(), &[1.0, 1.0]);
    let r = route(&capacity, &proxies, 0);
    assert_eq!(r.local_share(), 0.0);
    assert_eq!(shares(&r, 0, 2, 1000), [0.0, 1.0]);
}

#[test]
fn nothing_to_compare_stays_local() {
    assert_eq!(route(&[0.0, 0.0], &[1.0, 1.0], 0), Route::Local);
    assert_eq!(route(&[1.0, 1.0], &[0.0, 0.0], 0), Route::Local);
    assert_eq!(route(&[], &[], 0), Route::Local);
}

fn peer<'a>(pod: &'a str, zone: &'a str) -> Peer<'a> {
    Peer {
        pod: Some(pod),
        zone: Some(zone),
    }
}

#[test]
fn the_own_zone_and_the_spread_come_from_the_peers() {
    let peers = [
        peer("web-proxy-1", "zone-a"),
        peer("web-proxy-2", "zone-b"),
        peer("web-proxy-3", "zone-b"),
        Peer {
            pod: Some("web-proxy-4"),
            zone: None,
        },
    ];
    let locality = Locality::from_peers(peers, Some("web-proxy-2"), None).unwrap();
    assert_eq!(&*locality.zone, "zone-b");
    assert_eq!(
        locality.proxies,
        Some(vec![("zone-a".into(), 1), ("zone-b".into(), 2)])
    );
    assert_eq!(locality.proxies_in("zone-b"), Some(2));
    assert_eq!(locality.proxies_in("zone-c"), Some(0));

    // Not listed yet: the zone is unknown.
    assert_eq!(Locality::from_peers(peers, Some("web-proxy-9"), None), None);
    assert_eq!(Locality::from_peers(peers, None, None), None);
    // Listed without a zone: unknown too.
    assert_eq!(Locality::from_peers(peers, Some("web-proxy-4"), None), None);

    // --zone wins, and this proxy counts there; when it is not listed it still counts.
    let locality = Locality::from_peers(peers, Some("web-proxy-2"), Some("zone-c")).unwrap();
    assert_eq!(&*locality.zone, "zone-c");
    assert_eq!(
        locality.proxies,
        Some(vec![
            ("zone-a".into(), 1),
            ("zone-b".into(), 1),
            ("zone-c".into(), 1)
        ])
    );
    let locality = Locality::from_peers(peers, Some("web-proxy-9"), Some("zone-a")).unwrap();
    assert_eq!(
        locality.proxies_in("zone-a"),
        Some(2),
        "the others and itself"
    );
}
