//! Ways around the proxies: whatever sends to the app pods directly skips the
//! per-request balancing and, worse, the drain accounting, so a rollout loses that
//! traffic's requests again. Two are common on GKE and found here, pure: a Service
//! that selects the app pods and carries a NEG annotation (a Google load balancer then
//! sends to the pods' IPs, including to a pod whose drain gate has not opened and to
//! one the proxies are draining), and a Gateway API route whose backend is the
//! `<name>-backends` Service.

use k8s_openapi::api::core::v1::Service;
use kube::core::DynamicObject;
use std::collections::BTreeMap;

use crate::build::NEG_ANNOTATION;

/// One way around the proxies.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Bypass {
    /// A Service selecting the app pods has a NEG.
    NegOnAppService(String),
    /// A route (`HTTPRoute/name`, `GRPCRoute/name`) sends to the backends Service.
    RouteToBackends(String),
}

impl Bypass {
    /// For the status message.
    pub fn describe(&self) -> String {
        match self {
            Self::NegOnAppService(name) => format!(
                "Service {name} selects the app pods and has a {NEG_ANNOTATION} annotation: a Google load balancer would send to the pods directly, before their drain gate opens and while they drain; expose the front Service instead (spec.proxy.loadBalancer) and remove the annotation"
            ),
            Self::RouteToBackends(route) => format!(
                "{route} sends to the backends Service, around the proxies: use the front Service as its backendRef"
            ),
        }
    }
}

/// True when a NEG annotation asks for NEGs (`{"ingress": true}` or `exposed_ports`),
/// not when it turns them off.
fn asks_for_neg(value: &str) -> bool {
    let Ok(parsed) = serde_json::from_str::<serde_json::Value>(value) else {
        return false;
    };
    parsed.get("ingress").and_then(serde_json::Value::as_bool) == Some(true)
        || parsed
            .get("exposed_ports")
            .and_then(serde_json::Value::as_object)
            .is_some_and(|ports| !ports.is_empty())
}

/// The Services (other than the front Service, which selects the proxies) that have
/// a NEG and select any of the app pods, whose labels are `app_pods`.
pub fn neg_services<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    front: &str,
    app_pods: &[BTreeMap<String, String>],
) -> Vec<Bypass> {
    services
        .into_iter()
        .filter(|s| s.metadata.name.as_deref() != Some(front))
        .filter(|s| {
            s.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(NEG_ANNOTATION))
                .is_some_and(|v| asks_for_neg(v))
        })
        .filter(|s| {
            let selector = s.spec.as_ref().and_then(|spec| spec.selector.as_ref());
            selector.is_some_and(|selector| {
                !selector.is_empty()
                    && app_pods
                        .iter()
                        .any(|labels| selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
            })
        })
        .filter_map(|s| s.metadata.name.clone())
        .map(Bypass::NegOnAppService)
        .collect()
}

/// The routes of `kind` (in `namespace`) with a backendRef to the Service `backends`.
pub fn routes_to<'a>(
    routes: impl IntoIterator<Item = &'a DynamicObject>,
    kind: &str,
    namespace: &str,
    backends: &str,
) -> Vec<Bypass> {
    routes
        .into_iter()
        .filter(|route| {
            let route_namespace = route.metadata.namespace.as_deref().unwrap_or(namespace);
            let rules = route.data["spec"]["rules"].as_array();
            rules.into_iter().flatten().any(|rule| {
                rule["backendRefs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|r| {
                        let group = r["group"].as_str().unwrap_or("");
                        let ref_kind = r["kind"].as_str().unwrap_or("Service");
                        let ref_namespace = r["namespace"].as_str().unwrap_or(route_namespace);
                        group.is_empty()
                            && ref_kind == "Service"
                            && ref_namespace == namespace
                            && r["name"].as_str() == Some(backends)
                    })
            })
        })
        .map(|route| {
            Bypass::RouteToBackends(format!(
                "{kind} {}/{}",
                route.metadata.namespace.as_deref().unwrap_or(namespace),
                route.metadata.name.as_deref().unwrap_or_default()
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(name: &str, neg: Option<&str>, selector: serde_json::Value) -> Service {
        let mut value = json!({
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"selector": selector},
        });
        if let Some(neg) = neg {
            value["metadata"]["annotations"] = json!({NEG_ANNOTATION: neg});
        }
        serde_json::from_value(value).expect("a Service")
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_neg_on_a_service_of_the_app_pods_is_found_and_nothing_else() {
        let pods = [labels(&[("app", "web"), ("ballast.dev/role", "app")])];
        let services = [
            service(
                "web-direct",
                Some(r#"{"ingress": true}"#),
                json!({"app": "web"}),
            ),
            service(
                "web-standalone",
                Some(r#"{"exposed_ports": {"80": {}}}"#),
                json!({"app": "web"}),
            ),
            // The front Service: selects the proxies, its NEG is the point.
            service("web", Some(r#"{"ingress": true}"#), json!({"app": "web"})),
            // NEGs turned off, another app, no selector, no annotation.
            service(
                "web-off",
                Some(r#"{"ingress": false}"#),
                json!({"app": "web"}),
            ),
            service(
                "other",
                Some(r#"{"ingress": true}"#),
                json!({"app": "other"}),
            ),
            service("manual", Some(r#"{"ingress": true}"#), json!({})),
            service("plain", None, json!({"app": "web"})),
        ];
        assert_eq!(
            neg_services(&services, "web", &pods),
            [
                Bypass::NegOnAppService("web-direct".to_owned()),
                Bypass::NegOnAppService("web-standalone".to_owned())
            ]
        );
        assert!(
            neg_services(&services, "web", &[]).is_empty(),
            "no pods, nothing selected"
        );
    }

    fn route(name: &str, namespace: &str, refs: serde_json::Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"rules": [{"backendRefs": refs}]},
        }))
        .expect("a route")
    }

    #[test]
    fn a_route_to_the_backends_service_is_found_and_one_to_the_front_is_not() {
        let routes = [
            route(
                "direct",
                "shop",
                json!([{"name": "web-backends", "port": 80}]),
            ),
            route("front", "shop", json!([{"name": "web", "port": 80}])),
            route(
                "elsewhere",
                "edge",
                json!([{"name": "web-backends", "namespace": "shop", "port": 80}]),
            ),
            route(
                "their-own",
                "edge",
                json!([{"name": "web-backends", "port": 80}]),
            ),
            route(
                "not-a-service",
                "shop",
                json!([{"group": "example.com", "kind": "Bucket", "name": "web-backends"}]),
            ),
        ];
        assert_eq!(
            routes_to(&routes, "HTTPRoute", "shop", "web-backends"),
            [
                Bypass::RouteToBackends("HTTPRoute shop/direct".to_owned()),
                Bypass::RouteToBackends("HTTPRoute edge/elsewhere".to_owned())
            ]
        );
    }
}
