#!/usr/bin/env bash
# The install's one image setting (config/default `images:`, what `kustomize edit
# set image` writes for a private cluster's Artifact Registry mirror) must reach both
# the operator container and the BALLAST_PROXY_IMAGE it hands to every proxy and
# drain helper. Sets a mirror in a copy of config/ and checks the render.
set -euo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r "$repo_root/config" "$repo_root/crds" "$work/"
mirror=europe-west1-docker.pkg.dev/acme-prod/mirror/ballast
sed -i "s|^    newTag: latest|    newName: $mirror\n    newTag: 9.9.9|" "$work/config/default/kustomization.yaml"
rendered=$(kubectl kustomize "$work/config/default")
operator=$(grep -A0 "image: $mirror:9.9.9" <<<"$rendered" | wc -l)
proxies=$(grep -A1 "name: BALLAST_PROXY_IMAGE" <<<"$rendered" | grep -c "value: $mirror:9.9.9" || true)
if ((operator != 1 || proxies != 1)); then
  echo "check-image-setting: the mirror reached the operator image $operator time(s) and BALLAST_PROXY_IMAGE $proxies time(s); want 1 and 1" >&2
  exit 1
fi
echo "check-image-setting: OK ($mirror:9.9.9 is the operator's image and BALLAST_PROXY_IMAGE)"
