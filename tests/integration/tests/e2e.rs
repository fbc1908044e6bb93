//! The rollout under load on a real cluster (kind, GKE, any), driven with `kubectl`.
//!
//! Needs a cluster, so it is `#[ignore]`d: `cargo test` lists it as ignored with the
//! reason. Run it with `BALLAST_E2E_KUBECONFIG` naming the cluster's kubeconfig:
//! `cargo build --workspace && cargo test -p ballast-integration --test e2e -- --ignored
//! --nocapture` (it fails at once if the variable is unset; it runs the workspace's
//! `kubectl-ballast` too). Images (built from the repo's Dockerfile with
//! `--provenance=false`, then pushed or `kind load`ed; README "Real-cluster e2e"):
//!
//! * `BALLAST_E2E_IMAGE`: the ballast image (default `ghcr.io/ballast-dev/ballast:latest`)
//! * `BALLAST_E2E_APP_IMAGE`: the demo app image, `--target demo-app`
//!   (default `ghcr.io/ballast-dev/demo-app:latest`)
//!
//! It installs the CRD and operator (`config/default`), applies a BalancedService of 4
//! naive pods (they exit at once on SIGTERM: only the drain gate saves their requests),
//! waits for `Available`, starts `ballast-load` in a pod, rolls the app to a new
//! revision, and asserts: no failed request, the rollout complete on status with every
//! old pod drained and no forced termination; and that `kubectl ballast` shows the tree
//! mid-rollout, lists the service and refuses to pause a finished rollout.
//!
//! Each run works in a namespace of its own (`ballast-e2e-<time>-<random>`), so a run
//! started while the last one's namespace is still terminating does not apply into it.
//! The namespace is deleted after a passing run and kept after a failing one (its name
//! is printed) so it can be inspected; `BALLAST_E2E_KEEP=1` keeps it in any case.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

const KUBECONFIG_VAR: &str = "BALLAST_E2E_KUBECONFIG";

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

/// This run's namespace; deleted on drop after a passing run unless `BALLAST_E2E_KEEP`
/// is set, kept (and named) after a failing one.
struct Namespace<'k> {
    name: String,
    kubectl: &'k Kubectl,
}

impl Drop for Namespace<'_> {
    fn drop(&mut self) {
        let keep = std::env::var_os("BALLAST_E2E_KEEP").is_some();
        if keep || std::thread::panicking() {
            println!(
                "kept namespace {0}; delete it with: kubectl delete namespace {0}",
                self.name
            );
            return;
        }
        // No need to wait: the next run uses another namespace.
        let _ = self
            .kubectl
            .run(&["delete", "namespace", &self.name, "--wait=false"], None);
    }
}

/// A namespace name no earlier run used: seconds since the epoch (sorts by age in
/// `kubectl get ns`) and a random suffix for runs started in the same second.
fn fresh_namespace_name() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    format!("ballast-e2e-{secs}-{:04x}", fastrand::u16(..))
}

fn image(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_owned())
}

fn balanced_service(namespace: &str, app_image: &str, revision: &str) -> String {
    format!(
        r#"apiVersion: ballast.dev/v1alpha1
kind: BalancedService
metadata:
  name: demo
  namespace: {namespace}
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
#[ignore = "needs a cluster: set BALLAST_E2E_KUBECONFIG and run with -- --ignored (README: Real-cluster e2e)"]
fn rollout_under_load_on_a_real_cluster() {
    let kubeconfig = std::env::var(KUBECONFIG_VAR).unwrap_or_else(|_| {
        panic!(
            "{KUBECONFIG_VAR} is not set: point it at a cluster's kubeconfig (kind or GKE) \
             to run the real-cluster e2e; see README \"Real-cluster e2e\""
        )
    });
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

    let namespace = Namespace {
        name: fresh_namespace_name(),
        kubectl: &kubectl,
    };
    let ns = namespace.name.as_str();
    println!("namespace {ns}");
    kubectl.ok(&["create", "namespace", ns], None);
    kubectl.ok(
        &["apply", "--server-side", "-f", "-"],
        Some(&balanced_service(ns, &app_image, "1")),
    );
    kubectl.ok(
        &[
            "-n",
            ns,
            "wait",
            "--for=condition=Available",
            "balancedservice/demo",
            "--timeout=300s",
        ],
        None,
    );

    // Load from inside the cluster, through the front Service (the proxies).
    kubectl.ok(
        &[
            "-n",
            ns,
            "run",
            "load",
            "--restart=Never",
            &format!("--image={app_image}"),
            "--command",
            "--",
            "/usr/local/bin/ballast-load",
            &format!("--target=http://demo.{ns}.svc/"),
            "--rate=100",
            "--clients=8",
            "--duration-secs=120",
            "--long-every=50",
            "--long-ms=3000",
        ],
        None,
    );
    wait_until(Duration::from_secs(120), "the load pod to run", || {
        kubectl.json(&["-n", ns, "get", "pod", "load"])["status"]["phase"] == "Running"
    });
    std::thread::sleep(Duration::from_secs(10));

    // The rollout: a template change, a new revision.
    kubectl.ok(
        &["apply", "--server-side", "-f", "-"],
        Some(&balanced_service(ns, &app_image, "2")),
    );
    let started = Instant::now();
    // The kubectl plugin's view mid-rollout, through the API server alone.
    let tree = plugin(&kubectl, &["get", "demo", "-n", ns, "--interval", "1s"]);
    println!(
        "kubectl ballast get demo:\n{}",
        String::from_utf8_lossy(&tree.stdout)
    );
    assert!(
        tree.status.success(),
        "{}",
        String::from_utf8_lossy(&tree.stderr)
    );
    let text = String::from_utf8_lossy(&tree.stdout);
    assert!(
        text.starts_with(&format!("BalancedService {ns}/demo")),
        "{text}"
    );
    assert!(text.contains("└─ proxies   "), "{text}");
    let mut status = serde_json::Value::Null;
    wait_until(Duration::from_secs(300), "the rollout to complete", || {
        status = kubectl.json(&["-n", ns, "get", "balancedservice", "demo"])["status"].clone();
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
        kubectl.json(&["-n", ns, "get", "pod", "load"])["status"]["phase"] == "Succeeded"
    });
    let logs = kubectl.ok(&["-n", ns, "logs", "load"], None);
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

    // The plugin lists it, and refuses to pause a finished rollout (exit 1, no write).
    let list = plugin(&kubectl, &["list", "-n", ns]);
    assert!(
        String::from_utf8_lossy(&list.stdout).contains("demo"),
        "{list:?}"
    );
    let pause = plugin(&kubectl, &["pause", "demo", "-n", ns]);
    assert_eq!(pause.status.code(), Some(1), "{pause:?}");
    assert!(
        String::from_utf8_lossy(&pause.stderr).contains("no rollout in progress"),
        "{pause:?}"
    );
}

/// Runs the workspace's `kubectl-ballast` (built next to this test by
/// `cargo build --workspace`) with the test's kubeconfig.
fn plugin(kubectl: &Kubectl, args: &[&str]) -> Output {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("kubectl-ballast");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace` first",
        bin.display()
    );
    Command::new(bin)
        .env("KUBECONFIG", &kubectl.kubeconfig)
        .args(args)
        .output()
        .unwrap()
}

/// The part of the run that needs no cluster: every run's namespace name is one the API
/// server accepts (a DNS-1123 label).
#[test]
fn namespace_names_are_dns_labels() {
    for _ in 0..100 {
        let name = fresh_namespace_name();
        assert!(name.len() <= 63, "{name}");
        assert!(name.starts_with("ballast-e2e-1"), "{name}: seconds missing");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "{name}"
        );
        assert!(!name.ends_with('-'), "{name}");
    }
}
