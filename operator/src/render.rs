//! `ballast-operator render`: what the operator would create, without a cluster.

use ballast_api::BalancedService;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use std::fmt::Write as _;

use crate::build::{BuildContext, build};
use crate::validate::{Limits, validate};

/// Why rendering failed.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The input is not YAML of BalancedServices.
    #[error("{0}")]
    ParseInput(String),
    /// A BalancedService is invalid (the message status would carry).
    #[error("{name}: {message}")]
    InvalidSpec {
        /// `namespace/name`.
        name: String,
        /// The validation message.
        message: String,
    },
    /// Serialization failed.
    #[error("cannot serialize: {0}")]
    Serialize(String),
}

/// Renders every BalancedService in `yaml` (multi-document) into the owned objects, as
/// multi-document YAML. Other kinds in the input are skipped.
///
/// # Errors
/// On unreadable input or the first invalid BalancedService.
pub fn render(yaml: &str, ctx: &BuildContext, limits: &Limits) -> Result<String, RenderError> {
    let mut out = String::new();
    let mut count = 0;
    let mut documents = Vec::new();
    for document in serde_norway::Deserializer::from_str(yaml) {
        let value: serde_json::Value = serde::Deserialize::deserialize(document)
            .map_err(|e| RenderError::ParseInput(e.to_string()))?;
        documents.push(value);
    }
    // A workloadRef names a Deployment: render it from the same input.
    let deployments: Vec<Deployment> = documents
        .iter()
        .filter(|v| v["kind"] == "Deployment" && v["apiVersion"] == "apps/v1")
        .map(|v| serde_json::from_value(v.clone()))
        .collect::<Result<_, _>>()
        .map_err(|e| RenderError::ParseInput(e.to_string()))?;
    let services: Vec<Service> = documents
        .iter()
        .filter(|v| v["kind"] == "Service" && v["apiVersion"] == "v1")
        .map(|v| serde_json::from_value(v.clone()))
        .collect::<Result<_, _>>()
        .map_err(|e| RenderError::ParseInput(e.to_string()))?;
    for value in documents {
        if value.is_null() || value["kind"] != "BalancedService" {
            continue;
        }
        let mut bs: BalancedService =
            serde_json::from_value(value).map_err(|e| RenderError::ParseInput(e.to_string()))?;
        bs.metadata
            .namespace
            .get_or_insert_with(|| "default".to_owned());
        let name = format!(
            "{}/{}",
            bs.metadata.namespace.as_deref().unwrap_or_default(),
            bs.metadata.name.as_deref().unwrap_or_default()
        );
        let adopted = match &bs.spec.workload_ref {
            None => None,
            Some(reference) => Some(
                deployments
                    .iter()
                    .find(|d| d.metadata.name.as_deref() == Some(reference.name.as_str()))
                    .ok_or_else(|| RenderError::InvalidSpec {
                        name: name.clone(),
                        message: format!(
                            "spec.workloadRef: Deployment {:?} is not in the input; give it in the same file",
                            reference.name
                        ),
                    })?,
            ),
        };
        let valid = validate(&bs, adopted, limits).map_err(|e| RenderError::InvalidSpec {
            name: name.clone(),
            message: e.to_string(),
        })?;
        let objects = build(&valid, ctx);
        let mut documents = objects
            .to_documents()
            .map_err(|e| RenderError::Serialize(e.to_string()))?;
        // An adopted Service of the input is not replaced by ballast's own: the operator
        // switches it in place (a merge patch), shown here as it will then read.
        let theirs = services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(valid.front_name))
            .filter(|_| bs.spec.workload_ref.is_some() && bs.spec.service.adopt);
        if let Some(service) = theirs {
            let patch = crate::adopt::switch_patch(&bs, service, &objects.front_service).map_err(
                |message| RenderError::InvalidSpec {
                    name: name.clone(),
                    message,
                },
            )?;
            let mut switched =
                serde_json::to_value(service).map_err(|e| RenderError::Serialize(e.to_string()))?;
            merge_patch(&mut switched, &patch);
            switched["apiVersion"] = "v1".into();
            switched["kind"] = "Service".into();
            let front = documents
                .iter_mut()
                .find(|d| d["kind"] == "Service" && d["metadata"]["name"] == valid.front_name);
            if let Some(front) = front {
                *front = switched;
            }
        }
        for document in documents {
            let text = serde_norway::to_string(&document)
                .map_err(|e| RenderError::Serialize(e.to_string()))?;
            let _ = write!(out, "---\n# owned by BalancedService {name}\n{text}");
        }
        count += 1;
    }
    if count == 0 {
        return Err(RenderError::ParseInput(
            "no BalancedService found in the input".to_owned(),
        ));
    }
    Ok(out)
}

/// RFC 7386 JSON merge patch: what the API server does with a merge patch.
fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    match (target, patch) {
        (serde_json::Value::Object(target), serde_json::Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(key);
                } else {
                    merge_patch(
                        target.entry(key.clone()).or_insert(serde_json::Value::Null),
                        value,
                    );
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> BuildContext {
        BuildContext {
            proxy_image: "img".to_owned(),
            operator_namespace: "ballast-system".to_owned(),
        }
    }

    #[test]
    fn renders_the_samples() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/samples/");
        for sample in ["demo-http.yaml", "demo-grpc.yaml", "demo-multiport.yaml"] {
            let yaml = std::fs::read_to_string(format!("{root}{sample}")).unwrap();
            let out = render(&yaml, &ctx(), &Limits::default()).unwrap();
            assert_eq!(
                out.matches("\n---\n").count() + 1,
                11,
                "{sample}: eleven objects"
            );
            assert!(out.contains("kind: PodDisruptionBudget"));
            assert!(out.contains("kind: NetworkPolicy"));
        }
    }

    /// The rendered objects of a sample, as JSON.
    fn rendered(sample: &str) -> Vec<serde_json::Value> {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/samples/");
        let yaml = std::fs::read_to_string(format!("{root}{sample}")).unwrap();
        let out = render(&yaml, &ctx(), &Limits::default()).unwrap();
        serde_norway::Deserializer::from_str(&out)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect()
    }

    fn find<'a>(docs: &'a [serde_json::Value], kind: &str, name: &str) -> &'a serde_json::Value {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    }

    #[test]
    fn the_gke_ingress_sample_renders_the_neg_the_backend_config_and_a_long_enough_grace() {
        let docs = rendered("demo-gke.yaml");
        let front = find(&docs, "Service", "shop");
        assert_eq!(
            front["metadata"]["annotations"]["cloud.google.com/neg"],
            r#"{"ingress":true}"#
        );
        assert_eq!(
            front["metadata"]["annotations"]["cloud.google.com/backend-config"],
            r#"{"default":"shop-proxy"}"#
        );
        let config = find(&docs, "BackendConfig", "shop-proxy");
        let draining = config["spec"]["connectionDraining"]["drainingTimeoutSec"]
            .as_i64()
            .unwrap();
        assert_eq!(draining, 30);
        assert_eq!(config["spec"]["healthCheck"]["requestPath"], "/ready");
        assert_eq!(config["spec"]["healthCheck"]["port"], 9901);
        let proxy = &find(&docs, "Deployment", "shop-proxy")["spec"]["template"]["spec"];
        let grace = proxy["terminationGracePeriodSeconds"].as_i64().unwrap();
        assert!(
            grace > draining,
            "grace {grace}s must outlast {draining}s of draining"
        );
        assert_eq!(
            proxy["readinessGates"][0]["conditionType"],
            "cloud.google.com/load-balancer-neg-ready"
        );
        // The backends Service never gets a NEG.
        assert!(find(&docs, "Service", "shop-backends")["metadata"]["annotations"].is_null());
    }

    #[test]
    fn the_gke_gateway_sample_renders_both_policies_and_closes_the_app_pods() {
        let docs = rendered("demo-gke-gateway.yaml");
        let policy = find(&docs, "GCPBackendPolicy", "api-proxy");
        assert_eq!(
            policy["spec"]["default"]["connectionDraining"]["drainingTimeoutSec"],
            60
        );
        assert_eq!(policy["spec"]["targetRef"]["name"], "api");
        let check = find(&docs, "HealthCheckPolicy", "api-proxy");
        assert_eq!(
            check["spec"]["default"]["config"]["httpHealthCheck"]["requestPath"],
            "/ready"
        );
        let app = find(&docs, "NetworkPolicy", "api-app");
        assert_eq!(app["spec"]["policyTypes"], serde_json::json!(["Ingress"]));
        let proxy = &find(&docs, "Deployment", "api-proxy")["spec"]["template"]["spec"];
        assert!(proxy["terminationGracePeriodSeconds"].as_i64().unwrap() > 60);
    }

    #[test]
    fn invalid_specs_fail_with_the_status_message() {
        let yaml = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/samples/demo-http.yaml"
        ))
        .unwrap();
        let yaml = yaml.replace("path: /healthz", "path: /healthz\n    port: nonexistent");
        let err = render(&yaml, &ctx(), &Limits::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "default/demo: spec.probes.port: no container declares a port named \"nonexistent\""
            ),
            "{err}"
        );
    }
}
