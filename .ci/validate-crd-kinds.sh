#!/usr/bin/env bash
# Validates the GKE, Gateway API and Prometheus Operator objects in the given files
# (the render output of the GKE samples, the samples' own routes, the monitoring
# component's PodMonitor, ServiceMonitor and PrometheusRule) against the schemas
# generated from the published CRDs (npm @kubernetes-models/gke, /gateway-api and
# /prometheus-operator, pinned), which kubernetes-validate does not have. See
# validate-crd-kinds.mjs.
#
#   .ci/validate-crd-kinds.sh FILE...
#
# Environment: BALLAST_NPM_PREFIX  where the packages are installed
#              (default ~/.cache/ballast/npm)
set -euo pipefail

readonly PACKAGES=(@kubernetes-models/gke@4.6.2 @kubernetes-models/gateway-api@2.0.0 @kubernetes-models/prometheus-operator@6.0.0 yaml@2.9.1)
prefix=${BALLAST_NPM_PREFIX:-$HOME/.cache/ballast/npm}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq nodejs npm
fi
stamp="$prefix/.installed"
if [[ ! -f $stamp ]] || [[ $(cat "$stamp") != "${PACKAGES[*]}" ]]; then
  echo "validate-crd-kinds: installing ${PACKAGES[*]} into $prefix"
  mkdir -p "$prefix"
  npm install --prefix "$prefix" --no-audit --no-fund --silent "${PACKAGES[@]}"
  echo "${PACKAGES[*]}" >"$stamp"
fi
exec node "$here/validate-crd-kinds.mjs" "$prefix/node_modules" "$@"
