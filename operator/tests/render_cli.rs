//! `ballast-operator render` as a user runs it.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_ballast-operator");

fn sample(name: &str) -> String {
    format!("{}/../config/samples/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn renders_every_owned_object_of_a_sample() {
    let out = Command::new(BIN)
        .args(["render", "-f", &sample("demo-http.yaml")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).unwrap();
    for kind in [
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
    ] {
        assert!(yaml.contains(&format!("kind: {kind}\n")), "{kind} missing");
    }
    assert!(yaml.contains("name: demo-proxy-admin"));
}

#[test]
fn an_invalid_spec_prints_the_status_message_and_exits_non_zero() {
    let dir = std::env::temp_dir().join(format!("ballast-render-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.yaml");
    let text = std::fs::read_to_string(sample("demo-http.yaml"))
        .unwrap()
        .replace("targetPort: 8080", "targetPort: web");
    std::fs::write(&file, text).unwrap();
    let out = Command::new(BIN)
        .args(["render", "-f", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "nothing rendered");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "default/demo: spec.ports[0].targetPort: no container declares a port named \"web\""
        ),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs `render -f file`; (exit code, stdout, stderr).
fn render(file: &str) -> (Option<i32>, String, String) {
    let out = Command::new(BIN)
        .args(["render", "-f", file])
        .output()
        .expect("the operator binary runs");
    (
        out.status.code(),
        String::from_utf8(out.stdout).expect("YAML is UTF-8"),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn an_adopted_deployment_renders_as_ballasts_fields_only() {
    let (code, yaml, stderr) = render(&sample("adopt-deployment.yaml"));
    assert_eq!(code, Some(0), "{stderr}");
    let documents: Vec<serde_json::Value> = serde_norway::Deserializer::from_str(&yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let kinds: Vec<String> = documents
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap(),
                d["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    // The proxies' budget only: the owner may have one for its pods, and the eviction
    // API refuses a pod covered by two.
    assert_eq!(
        kinds,
        [
            "ServiceAccount/web-proxy",
            "Role/web-proxy",
            "RoleBinding/web-proxy",
            "Service/web-backends",
            "Service/web-proxy-admin",
            "Deployment/web-proxy",
            "Service/web",
            "Deployment/web",
            "PodDisruptionBudget/web-proxy",
            "NetworkPolicy/web-proxy",
        ]
    );
    // The user's Service is shown as the operator leaves it after the switch: its own
    // name and port, the proxies' selector and container port, what it was before kept.
    let service = &documents[6];
    assert_eq!(
        service["spec"]["selector"],
        serde_json::json!({"ballast.dev/service": "web", "ballast.dev/role": "proxy"})
    );
    assert_eq!(service["spec"]["ports"][0]["port"], 80);
    assert_eq!(service["spec"]["ports"][0]["targetPort"], 8080);
    assert!(service["metadata"].get("ownerReferences").is_none());
    assert_eq!(
        service["metadata"]["annotations"]["ballast.dev/adopted-by"],
        "web"
    );
    let deployment = &documents[7];
    let spec = &deployment["spec"];
    assert!(
        spec.get("replicas").is_none(),
        "replicas are the owner's: {spec}"
    );
    assert!(deployment["metadata"].get("ownerReferences").is_none());
    assert_eq!(
        spec["selector"]["matchLabels"],
        serde_json::json!({"app": "web"})
    );
    let containers = spec["template"]["spec"]["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let container = containers[0].as_object().unwrap();
    // Only ballast's fields of the owner's container, merged into it by name.
    let mut fields: Vec<&str> = container.keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "lifecycle",
            "name",
            "readinessProbe",
            "startupProbe",
            "volumeMounts"
        ]
    );
    assert_eq!(container["name"], "web");
    assert_eq!(
        spec["template"]["spec"]["initContainers"][0]["name"],
        "ballast-drain-install"
    );
}

#[test]
fn a_workload_ref_without_its_deployment_in_the_input_is_an_error() {
    let dir = std::env::temp_dir().join(format!("ballast-render-adopt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("no-deployment.yaml");
    let text = std::fs::read_to_string(sample("adopt-deployment.yaml")).unwrap();
    // Only the BalancedService, the last document.
    let only = text.rsplit("\n---\n").next().unwrap();
    assert!(only.contains("kind: BalancedService"), "{only}");
    std::fs::write(&file, only).unwrap();
    let (code, yaml, stderr) = render(file.to_str().unwrap());
    assert_eq!(code, Some(1));
    assert!(yaml.is_empty(), "nothing rendered: {yaml}");
    assert!(
        stderr.contains(
            "default/web: spec.workloadRef: Deployment \"web\" is not in the input; give it in the same file"
        ),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
