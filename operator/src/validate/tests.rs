use super::*;
use crate::fixtures::balanced_service;
use ballast_api::spec::MAX_PORTS;

fn errors(bs: &BalancedService) -> Vec<String> {
    match validate(bs, None, &Limits::default()) {
        Ok(_) => Vec::new(),
        Err(InvalidSpec(errors)) => errors.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn the_fixture_is_valid() {
    assert_eq!(errors(&balanced_service()), Vec::<String>::new());
}

#[test]
fn a_probe_port_no_container_exposes() {
    let mut bs = balanced_service();
    bs.spec.probes.port = Some(IntOrString::String("health".into()));
    assert_eq!(
        errors(&bs),
        vec![
            "spec.probes.port: no container declares a port named \"health\" (declared: [\"http\"])"
        ]
    );
}

#[test]
fn a_target_port_name_no_container_exposes() {
    let mut bs = balanced_service();
    bs.spec.ports[0].target_port = Some(IntOrString::String("web".into()));
    assert!(
        errors(&bs)[0]
            .starts_with("spec.ports[0].targetPort: no container declares a port named \"web\"")
    );
}

#[test]
fn every_port_gets_a_listener_up_to_the_limit() {
    let mut bs = balanced_service();
    let mut second = bs.spec.ports[0].clone();
    second.name = "grpc".into();
    second.port = 9090;
    bs.spec.ports.push(second);
    let v = validate(&bs, None, &Limits::default()).expect("two ports are valid");
    assert_eq!(
        v.ports
            .iter()
            .map(|p| (p.port.name.as_str(), p.proxy_port))
            .collect::<Vec<_>>(),
        [("http", 8080), ("grpc", 8081)]
    );

    for i in 2..=MAX_PORTS {
        let mut more = bs.spec.ports[0].clone();
        more.name = format!("extra-{i}");
        more.port = 10_000 + i32::try_from(i).unwrap();
        bs.spec.ports.push(more);
    }
    assert_eq!(bs.spec.ports.len(), MAX_PORTS + 1);
    assert_eq!(
        errors(&bs),
        [
            "spec.ports: 9 ports given; a BalancedService proxies at most 8: give further ports their own BalancedService"
        ]
    );
}

#[test]
fn port_names_must_name_the_proxys_container_ports() {
    let mut bs = balanced_service();
    let mut second = bs.spec.ports[0].clone();
    second.name = "admin".into();
    second.port = 81;
    bs.spec.ports.push(second.clone());
    second.name = "8080".into();
    second.port = 82;
    bs.spec.ports.push(second);
    let e = errors(&bs);
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(
        e[0].starts_with("spec.ports[1].name: \"admin\" cannot name"),
        "{e:?}"
    );
    assert!(
        e[1].starts_with("spec.ports[2].name: \"8080\" cannot name"),
        "{e:?}"
    );
}

#[test]
fn the_admin_port_may_not_be_a_client_port() {
    let mut bs = balanced_service();
    let mut second = bs.spec.ports[0].clone();
    second.name = "grpc".into();
    second.port = 9090;
    bs.spec.ports.push(second);
    bs.spec.proxy.admin_port = 8081;
    assert_eq!(
        errors(&bs),
        [
            "spec.proxy.adminPort: 8081 is one of the proxy's client ports (8080-8081, one per spec port); choose another"
        ]
    );
    bs.spec.proxy.admin_port = 8082;
    assert_eq!(errors(&bs), Vec::<String>::new());
}

#[test]
fn replicas_beyond_the_cap() {
    let mut bs = balanced_service();
    bs.spec.replicas = 5000;
    assert_eq!(
        errors(&bs),
        vec!["spec.replicas: 5000 is above this operator's limit of 1000"]
    );
}

#[test]
fn bare_number_strings_are_not_percentages() {
    let mut bs = balanced_service();
    bs.spec.rollout.max_surge = IntOrString::String("50".into());
    bs.spec.disruption.min_available = Some(IntOrString::String("5o%".into()));
    let e = errors(&bs);
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(e[0].starts_with("spec.rollout.maxSurge"));
    assert!(e[1].starts_with("spec.disruption.minAvailable"));
}

#[test]
fn names_too_long_for_the_admin_service_and_reserved_labels() {
    let mut bs = balanced_service();
    bs.metadata.name = Some("x".repeat(MAX_NAME_LEN + 1));
    bs.spec
        .template
        .as_mut()
        .unwrap()
        .metadata
        .get_or_insert_default()
        .labels
        .get_or_insert_default()
        .insert("ballast.dev/role".into(), "x".into());
    bs.spec.proxy.admin_port = i32::from(PROXY_PORT);
    let e = errors(&bs);
    assert_eq!(e.len(), 3, "{e:?}");
    assert!(e[0].starts_with("metadata.name: at most 51 characters"));
    assert!(
        e.iter()
            .any(|m| m.starts_with("spec.template.metadata.labels"))
    );
    assert!(e.iter().any(|m| m.starts_with("spec.proxy.adminPort")));
}

#[test]
fn a_pre_stop_that_cannot_run_after_the_drain() {
    use k8s_openapi::api::core::v1::{HTTPGetAction, Lifecycle, LifecycleHandler};
    let mut bs = balanced_service();
    let http = LifecycleHandler {
        http_get: Some(HTTPGetAction::default()),
        ..LifecycleHandler::default()
    };
    bs.spec
        .template
        .as_mut()
        .unwrap()
        .spec
        .as_mut()
        .unwrap()
        .containers[1]
        .lifecycle = Some(Lifecycle {
        pre_stop: Some(http),
        ..Lifecycle::default()
    });
    assert!(
        errors(&bs)[0]
            .starts_with("spec.template.spec.containers[1].lifecycle.preStop: only exec and sleep")
    );
}

#[test]
fn names_that_cannot_name_a_service_are_refused_before_any_call() {
    for bad in ["api.v2", "1web", "Web", "web-", "we_b"] {
        let mut bs = balanced_service();
        bs.metadata.name = Some(bad.into());
        let e = errors(&bs);
        assert!(
            e.iter()
                .any(|m| m.starts_with("metadata.name:") && m.contains("cannot name a Service")),
            "{bad}: {e:?}"
        );
    }
    for good in ["web", "w", "api-v2", "a1"] {
        let mut bs = balanced_service();
        bs.metadata.name = Some(good.into());
        assert_eq!(errors(&bs), Vec::<String>::new(), "{good}");
    }
}

#[test]
fn a_template_the_embedded_schema_lets_through() {
    let mut bs = balanced_service();
    let pod = bs.spec.template.as_mut().unwrap().spec.as_mut().unwrap();
    pod.containers[0].image = None;
    pod.containers[1].name = "App_1".into();
    let labels = bs
        .spec
        .template
        .as_mut()
        .unwrap()
        .metadata
        .get_or_insert_default()
        .labels
        .get_or_insert_default();
    labels.insert("bad key!".into(), "x".into());
    labels.insert("tier".into(), "-front".into());
    labels.insert("example.com/team".into(), "payments.eu_1".into());
    let e = errors(&bs);
    assert_eq!(e.len(), 4, "{e:?}");
    assert!(
        e.iter()
            .any(|m| m == "spec.template.spec.containers[0].image: an image is required")
    );
    assert!(
        e.iter()
            .any(|m| m.starts_with("spec.template.spec.containers[1].name: \"App_1\""))
    );
    assert!(
        e.iter()
            .any(|m| m.contains("\"bad key!\" is not a valid label key"))
    );
    assert!(
        e.iter()
            .any(|m| m.contains("the value \"-front\" of \"tier\""))
    );
}

#[test]
fn no_container() {
    let mut bs = balanced_service();
    bs.spec
        .template
        .as_mut()
        .unwrap()
        .spec
        .as_mut()
        .unwrap()
        .containers
        .clear();
    assert!(
        errors(&bs)
            .iter()
            .any(|e| e.starts_with("spec.template.spec.containers"))
    );
}

/// `demo` adopting Deployment `web` (selected by `app: web`).
fn adopting() -> (BalancedService, Deployment) {
    let mut bs = balanced_service();
    bs.spec.template = None;
    bs.spec.workload_ref = Some(
        serde_json::from_value(
            serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"}),
        )
        .unwrap(),
    );
    let deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "web:1",
                         "ports": [{"name": "http", "containerPort": 8080}]}]},
            },
        },
    }))
    .unwrap();
    (bs, deployment)
}

fn adopt_errors(bs: &BalancedService, deployment: &Deployment) -> Vec<String> {
    match validate(bs, Some(deployment), &Limits::default()) {
        Ok(_) => Vec::new(),
        Err(InvalidSpec(errors)) => errors.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn an_adopted_deployment_is_valid() {
    let (bs, deployment) = adopting();
    assert_eq!(adopt_errors(&bs, &deployment), Vec::<String>::new());
}

#[test]
fn rollback_is_refused_with_a_workload_ref() {
    let (mut bs, deployment) = adopting();
    bs.spec.rollout.pause_when.rollback = true;
    let e = adopt_errors(&bs, &deployment);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("spec.rollout.pauseWhen.rollback: rollback needs spec.template"),
        "{e:?}"
    );
}

#[test]
fn a_deployment_selector_with_expressions_is_refused() {
    let (bs, mut deployment) = adopting();
    deployment.spec.as_mut().unwrap().selector.match_expressions = Some(vec![
        serde_json::from_value(
            serde_json::json!({"key": "tier", "operator": "In", "values": ["web"]}),
        )
        .unwrap(),
    ]);
    let e = adopt_errors(&bs, &deployment);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("spec.workloadRef: the Deployment's selector must be matchLabels only"),
        "{e:?}"
    );
}

#[test]
fn a_front_service_name_colliding_with_ballasts_own_is_refused() {
    for taken in ["demo-backends", "demo-proxy-admin", "demo-proxy"] {
        let (mut bs, deployment) = adopting();
        bs.spec.service.name = Some(taken.to_owned());
        let e = adopt_errors(&bs, &deployment);
        assert_eq!(
            e,
            vec![format!(
                "spec.service.name: {taken:?} is the name of a Service or Deployment ballast creates; choose another"
            )]
        );
    }
}

#[test]
fn a_workload_ref_without_its_deployment_is_refused() {
    let (bs, _) = adopting();
    assert_eq!(
        errors(&bs),
        vec!["spec.workloadRef: Deployment \"web\" was not given"]
    );
}

#[test]
fn a_neg_on_the_front_service_needs_the_load_balancer_settings() {
    let mut bs = balanced_service();
    bs.spec.service.annotations.insert(
        "cloud.google.com/neg".to_owned(),
        r#"{"ingress": true}"#.to_owned(),
    );
    let found = errors(&bs);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with("spec.service.annotations[cloud.google.com/neg]: a Google load balancer sending to the proxies needs spec.proxy.loadBalancer"),
        "{found:?}"
    );
    bs.spec.proxy.load_balancer = Some(ballast_api::spec::LoadBalancerSpec {
        type_: ballast_api::spec::LoadBalancerType::Ingress,
        connection_draining_seconds: 30,
        health_check: ballast_api::spec::LoadBalancerHealthCheck::default(),
    });
    assert!(
        errors(&bs)[0].ends_with(
            "ballast sets it from spec.proxy.loadBalancer; remove it from spec.service.annotations"
        ),
        "set twice"
    );
    bs.spec.service.annotations.clear();
    assert_eq!(errors(&bs), Vec::<String>::new());
    if let Some(lb) = bs.spec.proxy.load_balancer.as_mut() {
        lb.health_check.timeout_seconds = lb.health_check.check_interval_seconds + 1;
    }
    assert!(errors(&bs)[0].starts_with("spec.proxy.loadBalancer.healthCheck.timeoutSeconds"));
}
