use super::*;
use crate::observe::ProxyReport;
use ballast_api::admin::{EndpointReport, EndpointStatus};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

fn pod(name: &str, n: u8, gated: bool) -> AppPod {
    AppPod {
        name: name.to_owned(),
        ip: Some(format!("10.0.0.{n}").parse().unwrap()),
        ready: true,
        gated,
        routable: gated.then_some(false),
        ..AppPod::default()
    }
}

/// One proxy reporting `open` (in flight) on each listed pod.
fn proxy(pods: &[(&AppPod, u64)]) -> ProxyObservation {
    ProxyObservation {
        proxy: "proxy-a".to_owned(),
        report: Ok(ProxyReport {
            endpoints: pods
                .iter()
                .map(|(p, open)| EndpointReport {
                    in_flight: *open,
                    listed: true,
                    ready: true,
                    ..EndpointReport::new(
                        std::net::SocketAddr::new(p.ip.unwrap(), 8080),
                        EndpointStatus::Active,
                    )
                })
                .collect(),
            drains: Vec::new(),
        }),
    }
}

#[test]
fn no_old_pod_means_no_limit() {
    let pods = [pod("new-1", 1, true)];
    assert_eq!(guard(1, 0, &pods, &[], 0, 30), Guard::default());
}

#[test]
fn a_waiting_new_pod_first_retires_an_old_one_then_opens_once_it_is_drained() {
    let old = [pod("old-1", 1, false), pod("old-2", 2, false)];
    let new = pod("new-1", 3, true);
    let pods = [old[0].clone(), old[1].clone(), new.clone()];
    let g = guard(
        2,
        0,
        &pods,
        &[proxy(&[(&old[0], 3), (&old[1], 1)])],
        100,
        30,
    );
    assert_eq!(g.open, Some(0));
    assert_eq!(g.retire.as_deref(), Some("old-1"));

    // Retired, still busy on a proxy: nothing opens, nothing more is retired.
    let mut retired = old[0].clone();
    retired.retired = Some(100);
    let pods = [retired.clone(), old[1].clone(), new.clone()];
    let g = guard(
        2,
        0,
        &pods,
        &[proxy(&[(&retired, 2), (&old[1], 1)])],
        105,
        30,
    );
    assert_eq!((g.open, g.retire.as_deref()), (Some(0), None));
    assert_eq!(g.draining[0].0, "old-1");
    assert!(g.draining[0].1.contains("2 in flight"), "{:?}", g.draining);

    // Drained: one gate may open (its availability deletes exactly the retired pod).
    let g = guard(
        2,
        0,
        &pods,
        &[proxy(&[(&retired, 0), (&old[1], 1)])],
        106,
        30,
    );
    assert_eq!((g.open, g.retire), (Some(1), None));

    // Or the drain timeout passed: the drain gate would give up too.
    let g = guard(
        2,
        0,
        &pods,
        &[proxy(&[(&retired, 2), (&old[1], 1)])],
        130,
        30,
    );
    assert_eq!(g.open, Some(1));
}

#[test]
fn an_unreadable_proxy_never_counts_as_drained() {
    let mut retired = pod("old-1", 1, false);
    retired.retired = Some(100);
    let pods = [retired, pod("old-2", 2, false), pod("new-1", 3, true)];
    let unreadable = ProxyObservation {
        proxy: "proxy-b".to_owned(),
        report: Err("connection refused".to_owned()),
    };
    let g = guard(2, 0, &pods, &[unreadable], 101, 30);
    assert_eq!(g.open, Some(0));
    assert!(g.draining[0].1.contains("cannot be read"));
}

/// The first rollout acted out with the Deployment controller's arithmetic (surge,
/// scale-down of the old ReplicaSet as new pods become available, lowest deletion cost
/// first): whatever the replica count and surge, no old pod is ever deleted before it
/// was retired and drained, and the rollout finishes.
#[test]
fn property_no_old_pod_is_deleted_before_it_is_drained() {
    for desired in 1..=6 {
        for surge in 1..=3 {
            let mut rng = fastrand::Rng::with_seed(u64::try_from(desired * 10 + surge).unwrap());
            // (pod, in flight on it, retired at step)
            let mut old: Vec<(AppPod, u64)> = (0..desired)
                .map(|i| (pod(&format!("old-{i}"), i as u8 + 1, false), rng.u64(1..5)))
                .collect();
            let mut new: Vec<AppPod> = Vec::new();
            let mut next = 100u8;
            let mut step = 0i64;
            while !old.is_empty() {
                step += 1;
                assert!(step < 500, "desired {desired} surge {surge}: no progress");
                // Deployment controller: surge new pods, then scale the old set down to
                // desired - available new pods, lowest deletion cost (retired) first.
                while old.len() + new.len() < (desired + surge) as usize
                    && new.len() < desired as usize
                {
                    new.push(pod(&format!("new-{next}"), next, true));
                    next += 1;
                }
                let available = new.iter().filter(|p| p.routable == Some(true)).count();
                let keep = (desired as usize).saturating_sub(available);
                while old.len() > keep {
                    old.sort_by_key(|(p, _)| p.retired.is_none());
                    let (gone, open) = old.remove(0);
                    assert!(
                        gone.retired.is_some() && open == 0,
                        "desired {desired} surge {surge}: {} deleted with {open} in flight",
                        gone.name
                    );
                }
                // Retired pods drain a request per step; the others stay busy.
                for (p, open) in &mut old {
                    if p.retired.is_some() {
                        *open = open.saturating_sub(1);
                    }
                }
                let pods: Vec<AppPod> = old
                    .iter()
                    .map(|(p, _)| p.clone())
                    .chain(new.clone())
                    .collect();
                let listed: Vec<(&AppPod, u64)> = old.iter().map(|(p, o)| (p, *o)).collect();
                let g = guard(desired, 0, &pods, &[proxy(&listed)], step, 1000);
                if let Some(name) = g.retire {
                    let (p, _) = old.iter_mut().find(|(p, _)| p.name == name).unwrap();
                    p.retired = Some(step);
                }
                let mut open = g.open.unwrap_or(usize::MAX);
                for p in new.iter_mut().filter(|p| p.routable != Some(true)) {
                    if open == 0 {
                        break;
                    }
                    p.routable = Some(true);
                    open -= 1;
                }
            }
        }
    }
}

#[test]
fn the_service_switches_once_every_proxy_routes_to_every_ready_pod() {
    let pods = [pod("old-1", 1, false), pod("old-2", 2, false)];
    assert_eq!(
        ready_to_switch(
            1,
            2,
            "web",
            2,
            &pods,
            &[proxy(&[(&pods[0], 0), (&pods[1], 0)])]
        ),
        Err("1/2 proxies ready".to_owned())
    );
    let partial = proxy(&[(&pods[0], 0)]);
    assert!(
        ready_to_switch(1, 1, "web", 2, &pods, &[partial])
            .unwrap_err()
            .contains("old-2")
    );
    assert_eq!(
        ready_to_switch(
            1,
            1,
            "web",
            2,
            &pods,
            &[proxy(&[(&pods[0], 0), (&pods[1], 0)])]
        ),
        Ok(())
    );
    // A ready pod the caller has not seen yet (not labelled): no switch.
    assert!(
        ready_to_switch(
            1,
            1,
            "web",
            3,
            &pods,
            &[proxy(&[(&pods[0], 0), (&pods[1], 0)])]
        )
        .unwrap_err()
        .contains("2/3 ready pods")
    );
    assert_eq!(
        resolve_count(&IntOrString::String("25%".into()), 6),
        1,
        "rounded down, as maxUnavailable"
    );
}

#[test]
fn giving_back_releases_the_deployment_before_the_service_and_the_proxies_go_last() {
    use GiveBack::*;
    assert_eq!(GiveBack::next(false, 4, false, false), ReleaseDeployment);
    assert_eq!(GiveBack::next(true, 2, false, false), AwaitRollout);
    assert_eq!(GiveBack::next(true, 0, false, false), ReturnService);
    assert_eq!(GiveBack::next(true, 0, true, false), AwaitService);
    assert_eq!(GiveBack::next(true, 0, true, true), Done);
}

#[test]
fn behind_gke_ingress_the_adopted_service_gets_ballasts_backend_config_and_gets_its_own_back() {
    use crate::build::{BACKEND_CONFIG_ANNOTATION, NEG_ANNOTATION};
    use k8s_openapi::api::core::v1::Service;
    use serde_json::json;
    let mut bs = crate::fixtures::balanced_service();
    bs.spec.proxy.load_balancer = Some(ballast_api::spec::LoadBalancerSpec {
        type_: ballast_api::spec::LoadBalancerType::Ingress,
        connection_draining_seconds: 30,
        health_check: ballast_api::spec::LoadBalancerHealthCheck::default(),
    });
    // The user's Service, already behind a GKE Ingress with its own NEG.
    let theirs: Service = serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "shop",
                     "annotations": {NEG_ANNOTATION: "{\"ingress\": true}"}},
        "spec": {"selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }))
    .unwrap();
    let built: Service = serde_json::from_value(json!({
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }))
    .unwrap();
    let patch = switch_patch(&bs, &theirs, &built).unwrap();
    let annotations = &patch["metadata"]["annotations"];
    assert_eq!(annotations[NEG_ANNOTATION], r#"{"ingress":true}"#);
    assert_eq!(
        annotations[BACKEND_CONFIG_ANNOTATION],
        r#"{"default":"demo-proxy"}"#
    );
    let original: serde_json::Value =
        serde_json::from_str(annotations[ORIGINAL].as_str().unwrap()).unwrap();
    assert_eq!(
        original["annotations"],
        json!({NEG_ANNOTATION: "{\"ingress\": true}", BACKEND_CONFIG_ANNOTATION: null})
    );
    // Switched: what the merge patch made of it.
    let mut switched = serde_json::to_value(&theirs).unwrap();
    for (key, value) in annotations.as_object().unwrap() {
        switched["metadata"]["annotations"][key] = value.clone();
    }
    switched["spec"]["selector"] = json!(crate::build::selector_labels(&bs, "proxy"));
    let switched: Service = serde_json::from_value(switched).unwrap();
    assert!(is_switched(&bs, &switched));
    let mut plain = bs.clone();
    plain.spec.proxy.load_balancer = None;
    assert!(
        is_switched(&plain, &switched),
        "without a load balancer the annotations are not ours to check"
    );
    // Given back: the user's own NEG annotation as it was, ballast's BackendConfig gone.
    let back = return_patch(&bs, &switched);
    assert_eq!(
        back["metadata"]["annotations"][NEG_ANNOTATION],
        "{\"ingress\": true}"
    );
    assert!(back["metadata"]["annotations"][BACKEND_CONFIG_ANNOTATION].is_null());
    assert!(
        back["metadata"]["annotations"]
            .as_object()
            .unwrap()
            .contains_key(BACKEND_CONFIG_ANNOTATION),
        "a null in the merge patch removes it"
    );
}
