//! Test fixtures: a valid BalancedService as the API server would return it, and a mock
//! API server to reconcile it against ([`api_server`]).

use ballast_api::BalancedService;

pub mod api_server;
pub mod real_proxy;

/// The HTTP sample, with the metadata the API server adds.
pub fn balanced_service() -> BalancedService {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "ballast.dev/v1alpha1",
        "kind": "BalancedService",
        "metadata": {"name": "demo", "namespace": "shop", "uid": "7f0c2f9e-0000-4000-8000-000000000001", "generation": 3},
        "spec": {
            "replicas": 4,
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
            "probes": {"path": "/healthz"},
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "demo"}},
                "spec": {"containers": [
                    {"name": "sidecar", "image": "log-shipper:1"},
                    {"name": "app", "image": "demo:1", "ports": [{"name": "http", "containerPort": 8080}]}
                ]}
            }
        }
    }))
    .expect("fixture is a valid BalancedService")
}
