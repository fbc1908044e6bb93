//! The objects and settings for GKE: a Google load balancer in front of the proxies,
//! zone-aware routing, NetworkPolicies, Autopilot's resource rules.

use super::*;
use crate::fixtures::balanced_service;
use k8s_openapi::api::core::v1::{Container, PodSpec, ResourceRequirements};
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::json;
use std::time::Duration;

fn ctx() -> BuildContext {
    BuildContext {
        proxy_image: "ghcr.io/ballast-dev/ballast:test".to_owned(),
        operator_namespace: "ballast-system".to_owned(),
    }
}

/// The fixture with `patch` merged into its spec.
fn with_spec(patch: serde_json::Value) -> BalancedService {
    let mut value = serde_json::to_value(balanced_service()).unwrap();
    merge(&mut value["spec"], patch);
    serde_json::from_value(value).unwrap()
}

fn merge(into: &mut serde_json::Value, patch: serde_json::Value) {
    match (into, patch) {
        (serde_json::Value::Object(into), serde_json::Value::Object(patch)) => {
            for (key, value) in patch {
                merge(into.entry(key).or_insert(serde_json::Value::Null), value);
            }
        }
        (into, patch) => *into = patch,
    }
}

fn objects(bs: &BalancedService) -> OwnedObjects {
    build(
        &crate::validate::validate(bs, None, &Default::default()).unwrap(),
        &ctx(),
    )
}

fn proxy_pod(objects: &OwnedObjects) -> PodSpec {
    objects
        .proxy_deployment
        .spec
        .clone()
        .unwrap()
        .template
        .spec
        .unwrap()
}

fn proxy_pod_labels(objects: &OwnedObjects) -> BTreeMap<String, String> {
    let template = objects.proxy_deployment.spec.clone().unwrap().template;
    template.metadata.unwrap().labels.unwrap()
}

fn app_pod_labels(objects: &OwnedObjects) -> BTreeMap<String, String> {
    let template = objects.app_deployment.spec.clone().unwrap().template;
    template.metadata.unwrap().labels.unwrap()
}

fn arg<'a>(container: &'a Container, flag: &str) -> Option<&'a str> {
    container
        .args
        .iter()
        .flatten()
        .find_map(|a| a.strip_prefix(&format!("--{flag}=")))
}

const INGRESS: fn() -> serde_json::Value = || {
    json!({"proxy": {"loadBalancer": {"type": "Ingress", "connectionDrainingSeconds": 30,
        "healthCheck": {"checkIntervalSeconds": 5, "timeoutSeconds": 5, "healthyThreshold": 1, "unhealthyThreshold": 2}}}})
};

#[test]
fn behind_a_google_load_balancer_a_stopping_proxy_outlasts_its_draining() {
    let plain = objects(&balanced_service());
    let pod = proxy_pod(&plain);
    assert_eq!(arg(&pod.containers[0], "shutdown-delay"), Some("5s"));
    assert_eq!(pod.termination_grace_period_seconds, Some(40));
    assert!(pod.readiness_gates.is_none());
    assert!(plain.front_service.metadata.annotations.is_none());
    assert!(plain.load_balancer.backend_config.is_none());

    let behind = objects(&with_spec(INGRESS()));
    let pod = proxy_pod(&behind);
    // 2 failed checks 5 s apart, the last one's 5 s timeout, then 30 s of draining.
    assert_eq!(arg(&pod.containers[0], "shutdown-delay"), Some("45s"));
    // ... then the proxy's own 30 s drain and 5 s to exit.
    assert_eq!(pod.termination_grace_period_seconds, Some(80));
    assert!(
        pod.termination_grace_period_seconds.unwrap() > 30,
        "longer than the draining"
    );
    assert_eq!(
        pod.readiness_gates.unwrap()[0].condition_type,
        "cloud.google.com/load-balancer-neg-ready"
    );
    let annotations = behind.front_service.metadata.annotations.clone().unwrap();
    assert_eq!(annotations[NEG_ANNOTATION], r#"{"ingress":true}"#);
    assert_eq!(
        annotations[BACKEND_CONFIG_ANNOTATION],
        r#"{"default":"demo-proxy"}"#
    );
    let config =
        serde_json::to_value(behind.load_balancer.backend_config.as_ref().unwrap()).unwrap();
    assert_eq!(config["metadata"]["name"], "demo-proxy");
    assert_eq!(
        config["spec"]["connectionDraining"],
        json!({"drainingTimeoutSec": 30})
    );
    assert_eq!(
        config["spec"]["healthCheck"],
        json!({"checkIntervalSec": 5, "timeoutSec": 5, "healthyThreshold": 1,
               "unhealthyThreshold": 2, "type": "HTTP", "requestPath": "/ready", "port": 9901})
    );
    // The health check is the proxy's readiness endpoint on a port the pod declares.
    let container = &pod.containers[0];
    assert_eq!(
        container
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/ready")
    );
    assert!(
        container
            .ports
            .iter()
            .flatten()
            .any(|p| p.container_port == 9901)
    );
    assert!(behind.load_balancer.backend_policy.is_none());
    let kinds: Vec<String> = behind
        .to_documents()
        .unwrap()
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["apiVersion"].as_str().unwrap(),
                d["kind"].as_str().unwrap()
            )
        })
        .collect();
    assert!(
        kinds.contains(&"cloud.google.com/v1/BackendConfig".to_owned()),
        "{kinds:?}"
    );
}

#[test]
fn behind_a_gke_gateway_the_policies_attach_to_the_front_service() {
    let behind = objects(&with_spec(json!({
        "proxy": {"loadBalancer": {"type": "Gateway", "connectionDrainingSeconds": 60}}
    })));
    assert!(behind.load_balancer.backend_config.is_none());
    assert!(
        behind.front_service.metadata.annotations.is_none(),
        "the Gateway controller makes its NEGs without an annotation"
    );
    let policy =
        serde_json::to_value(behind.load_balancer.backend_policy.as_ref().unwrap()).unwrap();
    assert_eq!(policy["apiVersion"], "networking.gke.io/v1");
    assert_eq!(policy["kind"], "GCPBackendPolicy");
    assert_eq!(
        policy["spec"],
        json!({"default": {"connectionDraining": {"drainingTimeoutSec": 60}},
               "targetRef": {"group": "", "kind": "Service", "name": "demo"}})
    );
    let check =
        serde_json::to_value(behind.load_balancer.health_check_policy.as_ref().unwrap()).unwrap();
    assert_eq!(check["spec"]["targetRef"]["name"], "demo");
    assert_eq!(
        check["spec"]["default"]["config"],
        json!({"type": "HTTP", "httpHealthCheck": {"portSpecification": "USE_FIXED_PORT",
               "port": 9901, "requestPath": "/ready"}})
    );
    // Default health check: 2 x 5 s + 5 s, then 60 s of draining.
    let pod = proxy_pod(&behind);
    assert_eq!(arg(&pod.containers[0], "shutdown-delay"), Some("75s"));
    assert_eq!(pod.termination_grace_period_seconds, Some(110));
    assert!(
        pod.readiness_gates.is_none(),
        "no gate GKE would not set for a Gateway's standalone NEGs"
    );
}

#[test]
fn zone_routing_is_off_unless_asked_or_the_service_prefers_close() {
    let zones = |bs: &BalancedService| {
        let pod = proxy_pod(&objects(bs));
        let c = &pod.containers[0];
        (
            arg(c, "zone-routing").map(str::to_owned),
            arg(c, "proxy-service").map(str::to_owned),
        )
    };
    assert_eq!(zones(&balanced_service()), (None, None));
    let on = (
        Some("prefer-same-zone".to_owned()),
        Some("demo-proxy-admin".to_owned()),
    );
    assert_eq!(
        zones(&with_spec(
            json!({"balancing": {"zoneRouting": "PreferSameZone"}})
        )),
        on
    );
    let close = with_spec(json!({"service": {"trafficDistribution": "PreferClose"}}));
    assert_eq!(zones(&close), on, "FromService follows trafficDistribution");
    assert_eq!(
        objects(&close)
            .front_service
            .spec
            .unwrap()
            .traffic_distribution
            .as_deref(),
        Some("PreferClose")
    );
    assert_eq!(
        zones(&with_spec(json!({"balancing": {"zoneRouting": "Off"},
                                "service": {"trafficDistribution": "PreferClose"}}))),
        (None, None)
    );
    // The proxy finds itself in its admin Service's slices by its pod name.
    let pod = proxy_pod(&objects(&close));
    let env = pod.containers[0].env.clone().unwrap();
    let name = env.iter().find(|e| e.name == "BALLAST_POD_NAME").unwrap();
    assert_eq!(
        name.value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "metadata.name"
    );
}

#[test]
fn the_proxies_spread_as_the_user_says_or_over_zones_then_nodes() {
    let default = proxy_pod(&objects(&balanced_service()))
        .topology_spread_constraints
        .unwrap();
    let keys: Vec<&str> = default.iter().map(|c| c.topology_key.as_str()).collect();
    assert_eq!(
        keys,
        ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
    );
    let own = proxy_pod(&objects(&with_spec(json!({"proxy": {"topologySpreadConstraints": [
        {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule"}
    ]}}))))
    .topology_spread_constraints
    .unwrap();
    assert_eq!(own.len(), 1);
    assert_eq!(own[0].when_unsatisfiable, "DoNotSchedule");
    assert_eq!(
        own[0]
            .label_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()[ROLE_LABEL],
        "proxy",
        "a constraint without a selector selects this service's proxies"
    );
}

/// True when `labels` carries every label `selector` asks for (matchLabels only,
/// which is all ballast writes).
fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    assert!(selector.match_expressions.is_none());
    selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v))
}

fn peer_pods(peers: &[NetworkPolicyPeer]) -> Vec<&LabelSelector> {
    peers
        .iter()
        .filter_map(|p| p.pod_selector.as_ref())
        .collect()
}

#[test]
fn the_proxies_policy_admits_clients_the_drain_helper_and_the_operator_only() {
    let objects = objects(&balanced_service());
    assert!(
        objects.app_network_policy.is_none(),
        "the app pods are left alone by default"
    );
    let policy = objects.proxy_network_policy.clone().unwrap().spec.unwrap();
    let (proxies, app) = (proxy_pod_labels(&objects), app_pod_labels(&objects));
    let selector = policy.pod_selector.clone().unwrap();
    assert!(selects(&selector, &proxies) && !selects(&selector, &app));
    assert_eq!(
        policy.policy_types.as_deref(),
        Some(&["Ingress".to_owned()][..])
    );
    assert!(policy.egress.is_none());
    let ingress = policy.ingress.unwrap();
    // Clients: the listener's container port, from anywhere.
    assert!(ingress[0].from.is_none());
    let listener_ports: Vec<i32> = proxy_pod(&objects).containers[0]
        .ports
        .iter()
        .flatten()
        .filter(|p| p.name.as_deref() != Some("admin"))
        .map(|p| p.container_port)
        .collect();
    let client_ports: Vec<i32> = ingress[0]
        .ports
        .iter()
        .flatten()
        .map(|p| match p.port.clone().unwrap() {
            IntOrString::Int(port) => port,
            IntOrString::String(name) => panic!("by number, not {name}"),
        })
        .collect();
    assert_eq!(client_ports, listener_ports);
    // Admin: the app pods (their drain helper) and the operator's namespace.
    let admin = &ingress[1];
    assert_eq!(
        admin.ports.as_ref().unwrap()[0].port,
        Some(IntOrString::Int(9901))
    );
    let from = admin.from.clone().unwrap();
    let pods = peer_pods(&from);
    assert_eq!(pods.len(), 1);
    assert!(selects(pods[0], &app) && !selects(pods[0], &proxies));
    assert_eq!(
        from[1]
            .namespace_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()["kubernetes.io/metadata.name"],
        "ballast-system"
    );
    assert_eq!(from.len(), 2, "nobody else: {from:?}");
}

#[test]
fn asked_for_the_app_pods_admit_only_the_proxies_and_egress_is_allowed_where_denied() {
    let objects = objects(&with_spec(json!({
        "networkPolicy": {"appIngress": "Proxies", "egress": true,
                          "metricsFrom": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                          "adminFrom": [{"ipBlock": {"cidr": "172.16.0.0/28"}}]},
        "proxy": {"loadBalancer": {"type": "Ingress"}}
    })));
    let (proxies, app) = (proxy_pod_labels(&objects), app_pod_labels(&objects));
    let policy = objects.app_network_policy.clone().unwrap().spec.unwrap();
    assert!(selects(policy.pod_selector.as_ref().unwrap(), &app));
    assert_eq!(
        policy.policy_types.as_deref(),
        Some(&["Ingress".to_owned(), "Egress".to_owned()][..])
    );
    let ingress = policy.ingress.unwrap();
    let from = ingress[0].from.clone().unwrap();
    assert_eq!(from.len(), 1);
    assert!(selects(peer_pods(&from)[0], &proxies) && !selects(peer_pods(&from)[0], &app));
    assert_eq!(
        ingress[0].ports.as_ref().unwrap()[0].port,
        Some(IntOrString::Int(8080)),
        "the app's target port"
    );
    // The drain helper reaches the proxies' admin port, and DNS to find them.
    let egress = policy.egress.unwrap();
    assert!(selects(
        peer_pods(egress[0].to.as_ref().unwrap())[0],
        &proxies
    ));
    assert_eq!(
        egress[0].ports.as_ref().unwrap()[0].port,
        Some(IntOrString::Int(9901))
    );
    assert_eq!(
        egress[1].ports.as_ref().unwrap()[0].port,
        Some(IntOrString::Int(53))
    );

    let proxy = objects.proxy_network_policy.clone().unwrap().spec.unwrap();
    let admin_from = proxy.ingress.unwrap()[1].from.clone().unwrap();
    let cidrs: Vec<&str> = admin_from
        .iter()
        .filter_map(|p| p.ip_block.as_ref().map(|b| b.cidr.as_str()))
        .collect();
    assert_eq!(
        cidrs[..2],
        GOOGLE_HEALTH_CHECK_RANGES,
        "the load balancer's health checkers"
    );
    assert_eq!(cidrs[2], "172.16.0.0/28", "adminFrom: the control plane");
    assert_eq!(
        admin_from[admin_from.len() - 2]
            .namespace_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()["kubernetes.io/metadata.name"],
        "monitoring"
    );
    let proxy_egress = proxy.egress.unwrap();
    assert!(selects(
        peer_pods(proxy_egress[0].to.as_ref().unwrap())[0],
        &app
    ));

    let off = with_spec(json!({"networkPolicy": {"enabled": false}}));
    let none = super::build(
        &crate::validate::validate(&off, None, &Default::default()).unwrap(),
        &ctx(),
    );
    assert!(none.proxy_network_policy.is_none() && none.app_network_policy.is_none());
}

/// GKE Autopilot's rules for a container's requests, as it would apply them: at least
/// 50m CPU and 52 MiB of memory, and between 1 and 6.5 GiB of memory per CPU;
/// otherwise it changes them. A memory limit below the request is refused anywhere.
fn autopilot_takes(resources: &ResourceRequirements) -> Result<(), String> {
    let requests = resources.requests.clone().unwrap_or_default();
    let millicores = |q: &str| -> f64 {
        q.strip_suffix('m').map_or_else(
            || q.parse::<f64>().unwrap() * 1000.0,
            |m| m.parse().unwrap(),
        )
    };
    let mebibytes = |q: &str| -> f64 {
        q.strip_suffix("Mi").map_or_else(
            || q.strip_suffix("Gi").unwrap().parse::<f64>().unwrap() * 1024.0,
            |m| m.parse().unwrap(),
        )
    };
    let cpu = millicores(&requests.get("cpu").ok_or("no CPU request")?.0);
    let memory = mebibytes(&requests.get("memory").ok_or("no memory request")?.0);
    let ratio = (memory / 1024.0) / (cpu / 1000.0);
    if cpu < 50.0 || memory < 52.0 || !(1.0..=6.5).contains(&ratio) {
        return Err(format!("{cpu}m CPU, {memory} MiB: {ratio:.2} GiB per CPU"));
    }
    if let Some(limit) = resources.limits.as_ref().and_then(|l| l.get("memory"))
        && mebibytes(&limit.0) < memory
    {
        return Err("memory limit below the request".to_owned());
    }
    Ok(())
}

#[test]
fn every_container_ballast_adds_runs_on_autopilot_as_it_is() {
    let objects = objects(&balanced_service());
    let proxy = proxy_pod(&objects).containers[0].clone();
    let app = objects
        .app_deployment
        .spec
        .clone()
        .unwrap()
        .template
        .spec
        .unwrap();
    let helper = app.init_containers.unwrap()[0].clone();
    for container in [&proxy, &helper] {
        autopilot_takes(container.resources.as_ref().unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", container.name));
        let security = container.security_context.clone().unwrap();
        assert_eq!(security.run_as_non_root, Some(true), "{}", container.name);
        assert_eq!(security.allow_privilege_escalation, Some(false));
        let capabilities = security.capabilities.unwrap();
        assert!(
            capabilities.add.is_none(),
            "{}: no capability added",
            container.name
        );
        assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    }
    // The rules themselves catch what Autopilot would change.
    let too_little_memory = ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity("100m".to_owned())),
            ("memory".to_owned(), Quantity("64Mi".to_owned())),
        ])),
        ..ResourceRequirements::default()
    };
    assert!(
        autopilot_takes(&too_little_memory).is_err(),
        "0.6 GiB per CPU"
    );
}

#[test]
fn the_proxy_accepts_the_zone_routing_the_operator_renders_with_its_pod_name() {
    use clap::Parser;
    let bs = with_spec(json!({"balancing": {"zoneRouting": "PreferSameZone"},
                              "proxy": {"loadBalancer": {"type": "Ingress"}}}));
    let pod = proxy_pod(&objects(&bs));
    let container = &pod.containers[0];
    let args = container.args.clone().unwrap();
    let env: Vec<&str> = container
        .env
        .iter()
        .flatten()
        .map(|e| e.name.as_str())
        .collect();
    assert!(env.contains(&"BALLAST_POD_NAME"), "{env:?}");
    // What the downward API hands the proxy in BALLAST_POD_NAME, as its flag.
    let given = std::iter::once("ballast-proxy".to_owned())
        .chain(args.iter().cloned())
        .chain(["--pod-name=demo-proxy-7d4b9-x2x9q".to_owned()]);
    let config = ballast_proxy::config::Settings::try_parse_from(given)
        .unwrap_or_else(|e| panic!("the proxy refuses {args:?}: {e}"))
        .resolve()
        .unwrap_or_else(|e| panic!("the proxy refuses {args:?}: {e}"));
    assert_eq!(config.shutdown_delay, Duration::from_secs(45));
    // Without the pod name it could never learn its zone, and says so at startup.
    let without = std::iter::once("ballast-proxy".to_owned()).chain(args.iter().cloned());
    if std::env::var_os("BALLAST_POD_NAME").is_none() {
        assert!(
            ballast_proxy::config::Settings::try_parse_from(without)
                .unwrap()
                .resolve()
                .is_err()
        );
    }
}
