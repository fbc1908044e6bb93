#!/usr/bin/env bash
# Prints the Deployment an adopting BalancedService leaves in the cluster: the owner's
# Deployment (from the sample) with ballast's fields (from `ballast-operator render`)
# merged in, as `kubectl patch --local` merges them (containers by name), so that
# validate-manifests can check the whole object and not only ballast's part of it.
#
#   .ci/merge-adopted.sh sample.yaml rendered.yaml
#
# Fails unless the sample holds exactly one Deployment and the rendered output exactly
# one Deployment of that name.
set -euo pipefail
sample=$1 rendered=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$sample" "$rendered" "$work" <<'PY'
import json, os, sys, yaml

sample, rendered, work = sys.argv[1:4]
def deployments(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d and d.get("kind") == "Deployment"]
owners = deployments(sample)
if len(owners) != 1:
    sys.exit(f"merge-adopted: {sample} holds {len(owners)} Deployments, expected 1")
name = owners[0]["metadata"]["name"]
ours = [d for d in deployments(rendered) if d["metadata"]["name"] == name]
if len(ours) != 1:
    sys.exit(f"merge-adopted: {rendered} holds {len(ours)} Deployments {name}, expected 1")
with open(os.path.join(work, "owner.yaml"), "w") as f:
    yaml.safe_dump(owners[0], f)
with open(os.path.join(work, "ballast.json"), "w") as f:
    json.dump(ours[0], f)
PY
echo "merge-adopted: Deployment from $sample with ballast's fields from $rendered" >&2
kubectl patch --local -f "$work/owner.yaml" --type strategic \
  --patch-file "$work/ballast.json" -o yaml
