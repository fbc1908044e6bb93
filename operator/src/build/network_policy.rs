//! NetworkPolicies admitting ballast's own traffic (`spec.networkPolicy`), for
//! clusters that enforce them (GKE Dataplane V2, Calico, Cilium).
//!
//! A policy that selects a pod isolates it for the directions it lists: everything not
//! allowed by some policy is then dropped. So the proxies' policy lists every way in
//! that ballast needs, the app pods get a policy only when asked for one, and egress
//! rules only come when the namespace is said to deny egress already (a policy with
//! egress rules would otherwise cut the app's own egress).

use ballast_api::spec::AppIngress;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;

use super::{BuildContext, meta, selector_labels};
use crate::build::backends_selector;
use crate::validate::ValidatedSpec;

/// Where Google Cloud's load-balancer health checks (and the proxied traffic of its
/// external Application Load Balancers) come from.
pub const GOOGLE_HEALTH_CHECK_RANGES: [&str; 2] = ["35.191.0.0/16", "130.211.0.0/22"];

/// The proxies' policy, and the app pods' when `appIngress: Proxies` or `egress` asks
/// for one; none when `spec.networkPolicy.enabled` is false.
pub(super) fn network_policies(
    v: &ValidatedSpec<'_>,
    ctx: &BuildContext,
) -> (Option<NetworkPolicy>, Option<NetworkPolicy>) {
    let spec = &v.bs.spec.network_policy;
    if !spec.enabled {
        return (None, None);
    }
    let app_rules = spec.app_ingress == AppIngress::Proxies || spec.egress;
    (Some(proxy_policy(v, ctx)), app_rules.then(|| app_policy(v)))
}

fn tcp(port: IntOrString) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(port),
        protocol: Some("TCP".to_owned()),
        ..NetworkPolicyPort::default()
    }
}

fn pods(labels: BTreeMap<String, String>) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        pod_selector: Some(LabelSelector {
            match_labels: Some(labels),
            ..LabelSelector::default()
        }),
        ..NetworkPolicyPeer::default()
    }
}

fn namespace(name: &str) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                "kubernetes.io/metadata.name".to_owned(),
                name.to_owned(),
            )])),
            ..LabelSelector::default()
        }),
        ..NetworkPolicyPeer::default()
    }
}

fn cidr(block: &str) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        ip_block: Some(IPBlock {
            cidr: block.to_owned(),
            except: None,
        }),
        ..NetworkPolicyPeer::default()
    }
}

/// The app pods' ports, as the proxies reach them.
fn app_ports(v: &ValidatedSpec<'_>) -> Vec<NetworkPolicyPort> {
    v.ports
        .iter()
        .map(|served| tcp(served.target_port.clone()))
        .collect()
}

/// DNS, to any resolver (kube-dns, NodeLocal DNSCache on the node's address).
fn dns() -> NetworkPolicyEgressRule {
    NetworkPolicyEgressRule {
        ports: Some(
            ["UDP", "TCP"]
                .map(|protocol| NetworkPolicyPort {
                    port: Some(IntOrString::Int(53)),
                    protocol: Some(protocol.to_owned()),
                    ..NetworkPolicyPort::default()
                })
                .to_vec(),
        ),
        to: None,
    }
}

/// `<name>-proxy`: the client ports from anywhere (clients, gateways, the Google load
/// balancer); the admin port from this service's app pods (the drain helper's
/// `POST /drain` and reads), the operator's namespace, Google's health checkers when a
/// load balancer sends to the proxies, `metricsFrom` and `adminFrom`. With `egress`: to the app
/// pods, DNS, and the API server (its address is the cluster's, so by port).
fn proxy_policy(v: &ValidatedSpec<'_>, ctx: &BuildContext) -> NetworkPolicy {
    let spec = &v.bs.spec.network_policy;
    let clients = NetworkPolicyIngressRule {
        from: None,
        ports: Some(
            v.ports
                .iter()
                .map(|served| tcp(IntOrString::Int(i32::from(served.proxy_port))))
                .collect(),
        ),
    };
    let mut admin_from = vec![
        pods(backends_selector(v)),
        namespace(&ctx.operator_namespace),
    ];
    if v.bs.spec.proxy.load_balancer.is_some() {
        admin_from.extend(GOOGLE_HEALTH_CHECK_RANGES.map(cidr));
    }
    if let Some(selector) = &spec.metrics_from {
        admin_from.push(NetworkPolicyPeer {
            namespace_selector: Some(selector.clone()),
            ..NetworkPolicyPeer::default()
        });
    }
    admin_from.extend(spec.admin_from.iter().cloned());
    let admin = NetworkPolicyIngressRule {
        from: Some(admin_from),
        ports: Some(vec![tcp(IntOrString::Int(v.bs.spec.proxy.admin_port))]),
    };
    let (policy_types, egress) = if spec.egress {
        (
            vec!["Ingress".to_owned(), "Egress".to_owned()],
            Some(vec![
                NetworkPolicyEgressRule {
                    to: Some(vec![pods(backends_selector(v))]),
                    ports: Some(app_ports(v)),
                },
                dns(),
                NetworkPolicyEgressRule {
                    to: None,
                    ports: Some(vec![
                        tcp(IntOrString::Int(443)),
                        tcp(IntOrString::Int(6443)),
                    ]),
                },
            ]),
        )
    } else {
        (vec!["Ingress".to_owned()], None)
    };
    NetworkPolicy {
        metadata: meta(v, format!("{}-proxy", v.name)),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector_labels(v.bs, "proxy")),
                ..LabelSelector::default()
            }),
            ingress: Some(vec![clients, admin]),
            egress,
            policy_types: Some(policy_types),
        }),
    }
}

/// `<name>-app`: with `appIngress: Proxies`, the app ports only from the proxies; with
/// `egress`, the drain helper's way to the proxies' admin port and DNS.
fn app_policy(v: &ValidatedSpec<'_>) -> NetworkPolicy {
    let spec = &v.bs.spec.network_policy;
    let mut policy_types = Vec::new();
    let ingress = (spec.app_ingress == AppIngress::Proxies).then(|| {
        policy_types.push("Ingress".to_owned());
        vec![NetworkPolicyIngressRule {
            from: Some(vec![pods(selector_labels(v.bs, "proxy"))]),
            ports: Some(app_ports(v)),
        }]
    });
    let egress = spec.egress.then(|| {
        policy_types.push("Egress".to_owned());
        vec![
            NetworkPolicyEgressRule {
                to: Some(vec![pods(selector_labels(v.bs, "proxy"))]),
                ports: Some(vec![tcp(IntOrString::Int(v.bs.spec.proxy.admin_port))]),
            },
            dns(),
        ]
    });
    NetworkPolicy {
        metadata: meta(v, format!("{}-app", v.name)),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(backends_selector(v)),
                ..LabelSelector::default()
            }),
            ingress,
            egress,
            policy_types: Some(policy_types),
        }),
    }
}
