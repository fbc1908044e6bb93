#!/usr/bin/env bash
# ballast's main job, locally, no cluster: a rollout of 8 pods under keep-alive load,
# three ways at once (ballast, Kubernetes defaults, preStop sleep 30) on the local
# cluster stand-in, with a live view and a side-by-side table at the end.
#
#   bash scripts/demo.sh [--pods 8] [--rate 300] [--duration 10] [--seed 1] [--plain] ...
#
# Builds every binary the README's way (`cargo build --locked --workspace --bins`, the
# dev profile), so after that build, or a second run, nothing is compiled again.
# Every process it starts (pods, proxies) is a child of ballast-demo, stopped by PID
# when it ends. All traffic stays on 127.0.0.0/8. `--help` lists every flag.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --locked --workspace --bins
exec "${CARGO_TARGET_DIR:-target}/debug/ballast-demo" "$@"
