//! The rollout under load on a real cluster (kind, GKE, any), driven with `kubectl`.
//!
//! Runs only when `BALLAST_E2E_KUBECONFIG` names a kubeconfig; otherwise it prints why it
//! was skipped and passes. Images (built from the repo's Dockerfile and pushed or
//! `kind load`ed):
//!
//! * `BALLAST_E2E_IMAGE`: the ballast image (default `ghcr.io/ballast-dev/ballast:latest`)
//! * `BALLAST_E2E_APP_IMAGE`: the demo app image, `--target demo-app`
//!   (default `ghcr.io/ballast-dev/demo-app:latest`)
//!
//! It installs the CRD and operator (`config/default`), applies a BalancedService of 4
//! naive pods (they exit at once on SIGTERM: only the drain gate saves their requests),
//! waits for `Available`, starts `ballast-load` in a pod, rolls the app to a new
//! revision, and asserts: no failed request, the rollout complete on status with every
//! old pod drained and no forced termination. `BALLAST_E2E_KEEP=1` keeps the namespace.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const NAMESPACE: &str = "ballast-e2e";

struct Kubectl {
    kubeconfig: String,
}

impl Kubectl {
    fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut command = Command::new("kubectl");
        command
            .env("KUBECONFIG", &self.kubeconfig)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if stdin.is_some() {
            command.stdin(Stdio::piped());
        }
        let mut child = command.spawn().expect("kubectl on PATH");
        if let Some(text) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
        }
        child.wait_with_output().unwrap()
    }

    /// Runs and fails the test on a non-zero exit; returns stdout.
    fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let output = self.run(args, stdin);
        assert!(
            output.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&all, None)).unwrap()
    }
}

fn image(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_owned())
}

fn balanced_service(app_image: &str, revision: &str) -> String {
    format!(
        r#"apiVersion: ballast.dev/v1alpha1
kind: BalancedService
metadata:
  name: demo
  namespace: {NAMESPACE}
spec:
  replicas: 4
  ports:
    - name: http
      port: 80
      targetPort: 8080
  probes:
    path: /healthz
  rollout:
    drainTimeoutSeconds: 20
    shutdownGraceSeconds: 5
    warmupSeconds: 5
  template:
    metadata:
      labels:
        app.kubernetes.io/name: demo
      annotations:
        e2e.ballast.dev/revision: "{revision}"
    spec:
      containers:
        - name: app
          image: {app_image}
          args: ["--listen", "0.0.0.0:8080", "--shutdown", "naive"]
          env:
            - name: POD_NAME
              valueFrom:
                fieldRef:
                  fieldPath: metadata.name
          ports:
            - name: http
              containerPort: 8080
"#
    )
}

fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_secs(2));
    }
}

#[test]
fn rollout_under_load_on_a_real_cluster() {
    let Ok(kubeconfig) = std::env::var("BALLAST_E2E_KUBECONFIG") else {
        println!(
            "skipped: set BALLAST_E2E_KUBECONFIG to a cluster's kubeconfig (kind or GKE) to run \
             the real-cluster e2e; see README \"Running on a real cluster\""
        );
        return;
    };
    let kubectl = Kubectl { kubeconfig };
    let ballast = image("BALLAST_E2E_IMAGE", "ghcr.io/ballast-dev/ballast:latest");
    let app_image = image(
        "BALLAST_E2E_APP_IMAGE",
        "ghcr.io/ballast-dev/demo-app:latest",
    );
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

    // CRD and operator, with the image under test.
    let manifests = kubectl
        .ok(&["kustomize", &format!("{root}/config/default")], None)
        .replace("ghcr.io/ballast-dev/ballast:latest", &ballast);
    kubectl.ok(&["apply", "--server-side", "-f", "-"], Some(&manifests));
    kubectl.ok(
        &[
            "wait",
            "--for=condition=Established",
            "crd/balancedservices.ballast.dev",
            "--timeout=60s",
        ],
        None,
    );
    kubectl.ok(
        &[
            "-n",
            "ballast-system",
            "rollout",
            "status",
            "deployment/ballast-operator",
            "--timeout=180s",
        ],
        None,
    );

    let _ = kubectl.run(&["create", "namespace", NAMESPACE], None);
    kubectl.ok(
        &["apply", "--server-side", "-f", "-"],
        Some(&balanced_service(&app_image, "1")),
    );
    kubectl.ok(
        &[
            "-n",
            NAMESPACE,
            "wait",
            "--for=condition=Available",
            "balancedservice/demo",
            "--timeout=300s",
        ],
        None,
    );

    // Load from inside the cluster, through the front Service (the proxies).
    let _ = kubectl.run(&["-n", NAMESPACE, "delete", "pod", "load", "--now"], None);
    kubectl.ok(
        &[
            "-n",
            NAMESPACE,
            "run",
            "load",
            "--restart=Never",
            &format!("--image={app_image}"),
            "--command",
            "--",
            "/usr/local/bin/ballast-load",
            &format!("--target=http://demo.{NAMESPACE}.svc/"),
            "--rate=100",
            "--clients=8",
            "--duration-secs=120",
            "--long-every=50",
            "--long-ms=3000",
        ],
        None,
    );
    wait_until(Duration::from_secs(120), "the load pod to run", || {
        kubectl.json(&["-n", NAMESPACE, "get", "pod", "load"])["status"]["phase"] == "Running"
    });
    std::thread::sleep(Duration::from_secs(10));

    // The rollout: a template change, a new revision.
    kubectl.ok(
        &["apply", "--server-side", "-f", "-"],
        Some(&balanced_service(&app_image, "2")),
    );
    let started = Instant::now();
    let mut status = serde_json::Value::Null;
    wait_until(Duration::from_secs(300), "the rollout to complete", || {
        status =
            kubectl.json(&["-n", NAMESPACE, "get", "balancedservice", "demo"])["status"].clone();
        let rollout = &status["lastRollout"];
        rollout["revision"] == status["updateRevision"]
            && !rollout["finishedAt"].is_null()
            && status["updatedReplicas"] == 4
            && status["replicas"] == 4
    });
    println!(
        "rollout took {:?}: {}",
        started.elapsed(),
        status["lastRollout"]
    );

    wait_until(Duration::from_secs(200), "the load pod to finish", || {
        kubectl.json(&["-n", NAMESPACE, "get", "pod", "load"])["status"]["phase"] == "Succeeded"
    });
    let logs = kubectl.ok(&["-n", NAMESPACE, "logs", "load"], None);
    let summary: serde_json::Value =
        serde_json::from_str(logs.lines().last().unwrap_or("{}")).unwrap();
    println!("load: {summary}");

    let rollout = &status["lastRollout"];
    let condition = |t: &str| {
        status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == t)
            .map(|c| c["status"].clone())
    };
    assert_eq!(condition("Available"), Some("True".into()), "{status}");
    assert_eq!(condition("Degraded"), Some("False".into()), "{status}");
    assert!(
        rollout["podsDrained"].as_i64().unwrap_or(0) >= 4,
        "{rollout}"
    );
    assert_eq!(rollout["forcedTerminations"], 0, "{rollout}");
    assert_eq!(
        rollout["failedRequests"],
        serde_json::json!({"oldRevision": 0, "newRevision": 0}),
        "{rollout}"
    );
    assert!(summary["sent"].as_u64().unwrap_or(0) > 5000, "{summary}");
    assert_eq!(
        summary["failed"], 0,
        "no request failed during the rollout: {summary}"
    );

    if std::env::var("BALLAST_E2E_KEEP").is_err() {
        let _ = kubectl.run(&["delete", "namespace", NAMESPACE, "--wait=false"], None);
    }
}
