//! `discovery.k8s.io/v1` EndpointSlices as the EndpointSlice controller writes them, for
//! the tests that feed the API stand-in ([`crate::apiserver`]) by hand.

use serde_json::{Value, json};
use std::net::IpAddr;

/// A ready, serving endpoint of pod `pod` in namespace `namespace` and `zone`.
pub fn endpoint(ip: IpAddr, namespace: &str, pod: &str, zone: &str) -> Value {
    json!({
        "addresses": [ip.to_string()],
        "conditions": {"ready": true, "serving": true, "terminating": false},
        "zone": zone,
        "targetRef": {"kind": "Pod", "namespace": namespace, "name": pod},
    })
}

/// Slice `name` of Service `service` with one TCP port and `endpoints`.
pub fn slice(
    namespace: &str,
    service: &str,
    name: &str,
    port: (&str, u16),
    endpoints: Vec<Value>,
) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": port.0, "port": port.1, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

/// The admin Service `web-proxy-admin`'s slice (it publishes not-ready addresses): proxy
/// pods `web-proxy-a` in zone-a at `127.net.case.100` and `web-proxy-b` in zone-b at
/// `.101`.
pub fn two_zone_proxies(namespace: &str, net: u8, case: u8) -> Value {
    let ip = |last: u8| IpAddr::from([127, net, case, last]);
    slice(
        namespace,
        "web-proxy-admin",
        "web-proxy-admin-x1",
        ("admin", 9901),
        vec![
            endpoint(ip(100), namespace, "web-proxy-a", "zone-a"),
            endpoint(ip(101), namespace, "web-proxy-b", "zone-b"),
        ],
    )
}
