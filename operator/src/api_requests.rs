//! Counts every request the operator sends to the API server, by verb and resource:
//! the load one BalancedService puts on the control plane, measured where it is made.

use http::{Method, Request};
use std::sync::Arc;

use crate::metrics::Metrics;

/// What an API request does, as fixed metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiRequest {
    /// `get`, `list`, `watch`, `create`, `patch`, `update`, `delete` or `other`.
    pub verb: &'static str,
    /// The resource (with subresource), e.g. `pods/status`; `other` when not one ballast
    /// uses.
    pub resource: &'static str,
}

/// Resources ballast reads or writes; anything else is counted as `other`.
const RESOURCES: [&str; 22] = [
    "balancedservices",
    "balancedservices/status",
    "deployments",
    "replicasets",
    "pods",
    "pods/status",
    "services",
    "serviceaccounts",
    "roles",
    "rolebindings",
    "poddisruptionbudgets",
    "networkpolicies",
    "backendconfigs",
    "gcpbackendpolicies",
    "healthcheckpolicies",
    "httproutes",
    "grpcroutes",
    "events",
    "leases",
    "endpointslices",
    "customresourcedefinitions",
    "selfsubjectaccessreviews",
];

impl ApiRequest {
    /// Classifies a request by its method and path
    /// (`/api/v1/namespaces/ns/pods/name/status`, `/apis/group/version/...`).
    pub fn of(method: &Method, path: &str, query: Option<&str>) -> Self {
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        // Skip the group/version prefix, then `namespaces/<ns>` when present.
        let rest = match segments.first() {
            Some(&"api") => segments.get(2..),
            Some(&"apis") => segments.get(3..),
            _ => None,
        }
        .unwrap_or_default();
        let rest = match rest {
            ["namespaces", _, tail @ ..] if !tail.is_empty() => tail,
            other => other,
        };
        let (resource, named, sub) = match rest {
            [resource] => (*resource, false, None),
            [resource, _name] => (*resource, true, None),
            [resource, _name, sub, ..] => (*resource, true, Some(*sub)),
            [] => ("", false, None),
        };
        let full = match sub {
            Some(sub) => format!("{resource}/{sub}"),
            None => resource.to_owned(),
        };
        let resource = RESOURCES
            .iter()
            .find(|r| **r == full)
            .copied()
            .unwrap_or("other");
        let watch = query.is_some_and(|q| q.split('&').any(|p| p == "watch=true"));
        let verb = match *method {
            Method::GET if watch => "watch",
            Method::GET if named => "get",
            Method::GET => "list",
            Method::POST => "create",
            Method::PATCH => "patch",
            Method::PUT => "update",
            Method::DELETE => "delete",
            _ => "other",
        };
        Self { verb, resource }
    }
}

/// A tower layer for kube's client that counts each request in `metrics`.
#[derive(Clone, Debug)]
pub struct CountRequests(pub Arc<Metrics>);

impl<S> tower::Layer<S> for CountRequests {
    type Service = tower::util::MapRequest<
        S,
        Box<dyn Fn(Request<kube::client::Body>) -> Request<kube::client::Body> + Send + Sync>,
    >;

    fn layer(&self, inner: S) -> Self::Service {
        let metrics = self.0.clone();
        tower::util::MapRequest::new(
            inner,
            Box::new(move |request: Request<kube::client::Body>| {
                let uri = request.uri();
                metrics.observe_api_request(ApiRequest::of(
                    request.method(),
                    uri.path(),
                    uri.query(),
                ));
                request
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_named_by_verb_and_resource() {
        let of = |m: Method, path: &str, q: Option<&str>| {
            let r = ApiRequest::of(&m, path, q);
            (r.verb, r.resource)
        };
        assert_eq!(
            of(
                Method::GET,
                "/api/v1/namespaces/shop/pods",
                Some("labelSelector=x")
            ),
            ("list", "pods")
        );
        assert_eq!(
            of(
                Method::GET,
                "/api/v1/pods",
                Some("watch=true&resourceVersion=5")
            ),
            ("watch", "pods")
        );
        assert_eq!(
            of(
                Method::PATCH,
                "/api/v1/namespaces/shop/pods/demo-1/status",
                None
            ),
            ("patch", "pods/status")
        );
        assert_eq!(
            of(
                Method::PATCH,
                "/apis/ballast.dev/v1alpha1/namespaces/shop/balancedservices/demo/status",
                Some("fieldManager=ballast-operator&force=true")
            ),
            ("patch", "balancedservices/status")
        );
        assert_eq!(
            of(
                Method::GET,
                "/apis/apps/v1/namespaces/shop/deployments/demo",
                None
            ),
            ("get", "deployments")
        );
        assert_eq!(
            of(
                Method::POST,
                "/apis/events.k8s.io/v1/namespaces/shop/events",
                None
            ),
            ("create", "events")
        );
        assert_eq!(
            of(Method::GET, "/apis/example.com/v1/widgets", None),
            ("list", "other")
        );
        assert_eq!(of(Method::GET, "/version", None), ("list", "other"));
    }
}
