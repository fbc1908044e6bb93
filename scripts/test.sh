#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this script).
# Installs what it needs (idempotent), then: format, lints, every cargo test, and
# the rendered manifests validated against the upstream Kubernetes schemas.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "toolchain"
for component in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
    rustup component add "$component"
  fi
done
if ! command -v kubectl >/dev/null 2>&1; then
  # kubectl renders the kustomize tree; Debian calls its client package kubectl.
  apt-get update -qq && apt-get install -y -qq kubectl
fi
# promtool and prometheus for the monitoring tests (tests/integration/tests/
# monitoring.rs), from Debian's prometheus package: unpacked into a cache rather than
# installed, so no Prometheus service starts on the machine (the tests start their own,
# on loopback). Only libc is needed.
prometheus_dir="${XDG_CACHE_HOME:-$HOME/.cache}/ballast/prometheus"
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  if [ ! -x "$prometheus_dir/usr/bin/prometheus" ]; then
    download=$(mktemp -d)
    apt-get update -qq
    (cd "$download" && apt-get download -qq -o APT::Sandbox::User=root prometheus)
    mkdir -p "$prometheus_dir"
    dpkg -x "$download"/prometheus_*.deb "$prometheus_dir"
    rm -rf "$download"
  fi
  export PATH="$prometheus_dir/usr/bin:$PATH"
fi
# The monitoring tests fail instead of skipping when promtool or prometheus is missing.
export BALLAST_REQUIRE_PROMETHEUS=1
cargo --version
kubectl version --client 2>/dev/null | sed -n 1p
promtool --version 2>/dev/null | sed -n 1p

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test"
cargo test --workspace --locked

step "manifests (kustomize, operator render of the samples, kubernetes-validate --strict against the oldest supported and the newest Kubernetes)"
rendered=$(mktemp -d)
trap 'rm -rf "$rendered"' EXIT
# The binary `cargo test` just built (its render test ran it); `cargo run` would
# resolve features differently and rebuild the operator's dependencies.
operator_bin="${CARGO_TARGET_DIR:-target}/debug/ballast-operator"
samples=(config/samples/demo-http.yaml config/samples/demo-grpc.yaml config/samples/demo-multiport.yaml config/samples/adopt-deployment.yaml config/samples/demo-gke.yaml config/samples/demo-gke-gateway.yaml)
for sample in "${samples[@]}"; do
  "$operator_bin" render -f "$sample" >"$rendered/$(basename "$sample")"
done
# The adopt sample's rendered Deployment is ballast's part only (no replicas, no
# image): server-side apply merges it into the owner's. It is validated as rendered
# (strict: no unknown field) and, merged into the sample's own Deployment, as the
# object the API server will hold.
bash .ci/merge-adopted.sh config/samples/adopt-deployment.yaml \
  "$rendered/adopt-deployment.yaml" >"$rendered/adopt-deployment-merged.yaml"
# config/default with the monitoring component (its dashboard ConfigMap is validated
# here; its PodMonitor, ServiceMonitor and PrometheusRule by validate-crd-kinds), and
# the kubectl plugin's optional ClusterRole.
kubectl kustomize config/with-monitoring >"$rendered/with-monitoring.yaml"
bash .ci/validate-manifests.sh "${samples[@]}" config/rbac/kubectl_plugin_role.yaml "$rendered"/*.yaml

step "GKE, Gateway API and Prometheus Operator objects (rendered and sampled) against their published CRD schemas"
bash .ci/validate-crd-kinds.sh "${samples[@]}" "$rendered"/*.yaml
# The check must be able to fail: known-bad objects are refused.
if bash .ci/validate-crd-kinds.sh .ci/fixtures/invalid-gke-kinds.yaml >/dev/null; then
  echo "validate-crd-kinds accepted .ci/fixtures/invalid-gke-kinds.yaml" >&2
  exit 1
fi
refused=$(bash .ci/validate-crd-kinds.sh .ci/fixtures/invalid-monitoring-kinds.yaml | grep -c '^ERROR' || true)
if ((refused != 2)); then
  echo "validate-crd-kinds refused $refused of the 2 objects in .ci/fixtures/invalid-monitoring-kinds.yaml" >&2
  exit 1
fi

step "the one image setting reaches the proxies (config/default)"
bash .ci/check-image-setting.sh
