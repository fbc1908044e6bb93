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
