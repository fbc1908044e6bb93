#!/usr/bin/env bash
# Validate the deploy manifests against the OpenAPI schemas of the oldest
# Kubernetes release ballast supports and of the newest one bundled with
# kubernetes-validate, in strict mode (unknown fields are errors). A field that
# only the newest release knows would be refused by server-side apply on the
# oldest ("field not declared in schema"), so both ends are checked.
#
#   .ci/validate-manifests.sh [extra.yaml ...]
#
# Always validates `kubectl kustomize config/default`; extra files (e.g. the
# output of `ballast-operator render`) are validated too.
#
# Custom resources (any kind whose group is defined by a CustomResourceDefinition
# in the input, and ballast.dev) have no schema in kubernetes-validate: they are
# listed as skipped. The CustomResourceDefinition objects themselves are built-in
# types and are validated. Any other kind without a schema (a typo in kind or
# apiVersion, a removed API version) is a failure.
#
# Environment:
#   BALLAST_VENV         Python venv to use/create (default ~/.cache/ballast/venv)
#   BALLAST_K8S_VERSIONS Kubernetes versions to validate against, space-separated,
#                        each major.minor or "newest" (default: "$OLDEST_K8S newest",
#                        newest meaning the newest the pinned kubernetes-validate
#                        bundles)
set -euo pipefail

# Pinned; bump deliberately (`pip index versions kubernetes-validate`), and keep
# one that still bundles OLDEST_K8S.
readonly KV_VERSION=1.37.0
# The oldest Kubernetes ballast supports (README, "Running on a real cluster");
# the operator is built against its API (k8s-openapi feature "earliest").
readonly OLDEST_K8S=1.33
# Groups whose kinds are validated by our CRD, not by kubernetes-validate, even
# when the CRD is not part of the input.
readonly CUSTOM_GROUPS=ballast.dev
# Groups of other projects' CRDs, checked by .ci/validate-crd-kinds.sh against
# their published schemas instead.
readonly ELSEWHERE_GROUPS=cloud.google.com,networking.gke.io,gateway.networking.k8s.io,monitoring.coreos.com

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${BALLAST_VENV:-$HOME/.cache/ballast/venv}

for f in "$@"; do
  [[ -r $f ]] || { echo "validate-manifests: cannot read $f" >&2; exit 2; }
done

if [[ ! -x $venv/bin/kubernetes-validate ]] \
  || [[ $("$venv/bin/kubernetes-validate" --version 2>/dev/null) != "$KV_VERSION" ]]; then
  echo "validate-manifests: installing kubernetes-validate $KV_VERSION into $venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$KV_VERSION"
fi

# kubernetes-validate silently falls back to an older bundled release when asked
# for one it lacks, so resolve each requested major.minor to an exact bundled
# release here and fail when there is none.
read -r -a requested <<<"${BALLAST_K8S_VERSIONS:-$OLDEST_K8S newest}"
resolved=$("$venv/bin/python" - "${requested[@]}" <<'PY'
import sys
from kubernetes_validate.utils import all_versions, major_minor

# Each release is bundled twice (plain and strict schemas).
bundled = list(dict.fromkeys(all_versions()))
for wanted in sys.argv[1:]:
    if wanted == "newest":
        print(bundled[-1])
        continue
    exact = [v for v in bundled if major_minor(v) == major_minor(wanted)]
    if not exact:
        sys.exit(f"validate-manifests: kubernetes-validate bundles no Kubernetes {wanted} "
                 f"(it has {', '.join(bundled)})")
    print(exact[-1])
PY
)
[[ -n $resolved ]] || { echo "validate-manifests: no Kubernetes version given" >&2; exit 2; }
mapfile -t k8s_versions <<<"$resolved"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Inputs as "label<TAB>path"; the label is what the report shows.
inputs=()
(cd "$repo_root" && kubectl kustomize config/default) >"$work/config-default.yaml"
inputs+=("config/default (kustomize)"$'\t'"$work/config-default.yaml")
for f in "$@"; do
  inputs+=("$f"$'\t'"$f")
done

# Split out the custom resources and write what kubernetes-validate can check
# into one file per input; each checked file is named after its input.
printf '%s\n' "${inputs[@]}" >"$work/inputs.tsv"
"$venv/bin/python" - "$work" "$CUSTOM_GROUPS" "$ELSEWHERE_GROUPS" <<'PY'
import os, sys, yaml

work, custom = sys.argv[1], set(sys.argv[2].split(","))
elsewhere = set(sys.argv[3].split(","))
inputs = [line.rstrip("\n").split("\t", 1) for line in open(os.path.join(work, "inputs.tsv"))]
docs_by_input = []
for label, path in inputs:
    with open(path) as f:
        docs_by_input.append((label, [d for d in yaml.safe_load_all(f) if d]))

# A CRD anywhere in the input makes its group custom everywhere.
for _, docs in docs_by_input:
    for d in docs:
        if d.get("kind") == "CustomResourceDefinition":
            custom.add(d.get("spec", {}).get("group", ""))

bad = 0
with open(os.path.join(work, "checked.tsv"), "w") as checked:
    for i, (label, docs) in enumerate(docs_by_input):
        keep = []
        for d in docs:
            api_version, kind = d.get("apiVersion"), d.get("kind")
            meta = d.get("metadata") or {}
            name = "/".join(x for x in (meta.get("namespace"), meta.get("name")) if x)
            if not api_version or not kind:
                print(f"ERROR {label}: object {name or '?'} has no apiVersion/kind")
                bad = 1
                continue
            group = api_version.rpartition("/")[0]
            if group in elsewhere:
                print(f"SKIP  {label}: {kind} {name} ({api_version}: checked by "
                      ".ci/validate-crd-kinds.sh against its published schema)")
                continue
            if group in custom:
                print(f"SKIP  {label}: {kind} {name} ({api_version} is a custom resource; "
                      "its schema is the CRD's, not Kubernetes')")
                continue
            keep.append(d)
        out = os.path.join(work, f"{i}.yaml")
        with open(out, "w") as f:
            yaml.safe_dump_all(keep, f, sort_keys=False)
        checked.write(f"{label}\t{out}\t{len(keep)}\n")
sys.exit(bad)
PY

# Validates every checked file against one Kubernetes release; prints the
# validator's findings and returns non-zero on any of them.
validate_against() {
  local k8s_version=$1 failed=0 label path count out rc
  while IFS=$'\t' read -r label path count; do
    ((count > 0)) || continue
    set +e
    out=$("$venv/bin/kubernetes-validate" --strict -k "$k8s_version" "$path" 2>&1)
    rc=$?
    set -e
    # Report against the input's name, not the temporary file.
    out=${out//$path/$label}
    printf '%s\n' "$out"
    # kubernetes-validate only warns (exit 0) when it has no schema for a kind;
    # here every remaining kind is built-in, so a missing schema is an error.
    if ((rc != 0)) || grep -qE '^(WARN|ERROR|FATAL)' <<<"$out"; then
      failed=1
    fi
  done <"$work/checked.tsv"
  return "$failed"
}

objects=$(awk -F'\t' '{n += $3} END {print n + 0}' "$work/checked.tsv")
summary=()
failed=0
for k8s_version in "${k8s_versions[@]}"; do
  echo "validate-manifests: kubernetes-validate $KV_VERSION, Kubernetes $k8s_version, --strict"
  if validate_against "$k8s_version"; then
    summary+=("Kubernetes $k8s_version: OK, $objects objects valid")
  else
    summary+=("Kubernetes $k8s_version: FAILED (see ERROR/WARN lines above)")
    failed=1
  fi
done

printf 'validate-manifests: %s\n' "${summary[@]}"
if ((failed)); then
  echo "validate-manifests: FAILED"
  exit 1
fi
echo "validate-manifests: OK against Kubernetes ${k8s_versions[*]}"
