use super::*;
use crate::observe::ProxyReport;
use ballast_api::admin::{EndpointReport, EndpointStatus};
use std::net::{IpAddr, SocketAddr};

fn pod(ip: Option<&str>, routable: Option<bool>) -> AppPod {
    AppPod {
        name: "web-1".to_owned(),
        ip: ip.map(|ip| ip.parse().unwrap()),
        revision: Some("r1".to_owned()),
        deleting: false,
        routable,
        routable_message: None,
        ..AppPod::default()
    }
}

fn listing(proxy: &str, addresses: &[&str]) -> ProxyObservation {
    ProxyObservation {
        proxy: proxy.to_owned(),
        report: Ok(ProxyReport {
            endpoints: addresses
                .iter()
                .map(|a| EndpointReport::new(a.parse().unwrap(), EndpointStatus::NotReady))
                .collect(),
            drains: Vec::new(),
        }),
    }
}

fn unreadable(proxy: &str) -> ProxyObservation {
    ProxyObservation {
        proxy: proxy.to_owned(),
        report: Err("connection refused".to_owned()),
    }
}

#[test]
fn routable_once_every_proxy_lists_the_pod_even_unready() {
    let p = pod(Some("10.0.0.5"), None);
    let a = listing("proxy-a", &["10.0.0.4:8080", "10.0.0.5:8080"]);
    let b = listing("proxy-b", &["10.0.0.4:8080"]);
    assert_eq!(
        decide(&p, &[a.clone(), b]),
        Verdict::NotRoutable("10.0.0.5 not yet in the endpoints of proxy proxy-b".to_owned())
    );
    let b = listing("proxy-b", &["10.0.0.5:8080"]);
    assert_eq!(decide(&p, &[a, b]), Verdict::Routable);
}

#[test]
fn an_endpoint_the_proxy_only_remembers_does_not_count() {
    let p = pod(Some("10.0.0.5"), Some(true));
    let mut a = listing("proxy-a", &["10.0.0.5:8080"]);
    if let Ok(report) = &mut a.report {
        report.endpoints[0].listed = false;
    }
    assert!(
        matches!(decide(&p, &[a]), Verdict::NotRoutable(_)),
        "lost by the proxy: False again"
    );
}

#[test]
fn nothing_known_keeps_a_routable_pod_and_holds_a_new_one() {
    let serving = pod(Some("10.0.0.5"), Some(true));
    let new = pod(Some("10.0.0.6"), None);
    let ok = listing("proxy-a", &["10.0.0.5:8080", "10.0.0.6:8080"]);
    for proxies in [vec![], vec![ok.clone(), unreadable("proxy-b")]] {
        assert!(matches!(decide(&serving, &proxies), Verdict::Keep(_)));
        assert!(matches!(decide(&new, &proxies), Verdict::NotRoutable(_)));
    }
    assert_eq!(
        decide(&new, &[]),
        Verdict::NotRoutable("no proxy replica is ready".to_owned())
    );
}

#[test]
fn terminating_and_ip_less_pods() {
    let mut leaving = pod(Some("10.0.0.5"), Some(true));
    leaving.deleting = true;
    assert!(matches!(
        decide(&leaving, &[listing("a", &[])]),
        Verdict::Keep(_)
    ));
    assert_eq!(
        decide(&pod(None, None), &[listing("a", &[])]),
        Verdict::NotRoutable("the pod has no IP yet".to_owned())
    );
}

#[test]
fn writes_only_changes() {
    let mut p = pod(Some("10.0.0.5"), Some(true));
    assert_eq!(change(&p, &Verdict::Routable), None);
    assert_eq!(change(&p, &Verdict::Keep("x".to_owned())), None);
    let why = Verdict::NotRoutable("waiting".to_owned());
    assert_eq!(change(&p, &why), Some((false, "waiting".to_owned())));
    p.routable = Some(false);
    p.routable_message = Some("waiting".to_owned());
    assert_eq!(change(&p, &why), None, "same message: no write");
    assert_eq!(
        change(&p, &Verdict::NotRoutable("other".to_owned())),
        Some((false, "other".to_owned()))
    );
    assert!(change(&p, &Verdict::Routable).is_some_and(|(v, _)| v));
}

/// Random proxy views: the gate opens exactly when every proxy was read and lists the
/// pod, and a failure to read never closes an open gate.
#[test]
fn property_routable_iff_every_proxy_read_and_listing() {
    let mut rng = fastrand::Rng::with_seed(5);
    for _ in 0..5000 {
        let ip: IpAddr = format!("10.0.0.{}", rng.u8(1..6)).parse().unwrap();
        let p = AppPod {
            name: "p".to_owned(),
            ip: rng.bool().then_some(ip),
            revision: None,
            deleting: rng.u8(..10) == 0,
            routable: [None, Some(true), Some(false)][rng.usize(..3)],
            routable_message: None,
            ..AppPod::default()
        };
        let proxies: Vec<ProxyObservation> = (0..rng.usize(..4))
            .map(|i| {
                if rng.u8(..5) == 0 {
                    return unreadable(&format!("p{i}"));
                }
                let mut o = listing(&format!("p{i}"), &[]);
                if let Ok(r) = &mut o.report {
                    for _ in 0..rng.usize(..4) {
                        let address: SocketAddr =
                            format!("10.0.0.{}:8080", rng.u8(1..6)).parse().unwrap();
                        r.endpoints.push(EndpointReport {
                            listed: rng.u8(..4) != 0,
                            ..EndpointReport::new(address, EndpointStatus::Active)
                        });
                    }
                }
                o
            })
            .collect();
        let all_list = !proxies.is_empty()
            && proxies.iter().all(|o| {
                o.report.as_ref().is_ok_and(|r| {
                    r.endpoints
                        .iter()
                        .any(|e| e.listed && p.ip.is_some_and(|ip| e.address.ip() == ip))
                })
            });
        let verdict = decide(&p, &proxies);
        if p.deleting {
            assert!(matches!(verdict, Verdict::Keep(_)));
            continue;
        }
        assert_eq!(verdict == Verdict::Routable, all_list, "{p:?} {proxies:?}");
        let unknown =
            proxies.is_empty() || proxies.iter().any(|o| o.report.is_err()) || p.ip.is_none();
        if unknown && p.routable == Some(true) {
            assert!(matches!(verdict, Verdict::Keep(_)), "{p:?} {proxies:?}");
        }
    }
}
