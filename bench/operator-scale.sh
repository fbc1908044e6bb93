#!/usr/bin/env bash
# Scale check of the operator's pure pipeline: validate + build (+ serialize) + status
# for N BalancedServices, without a cluster. Prints a table; not a test.
#   bash bench/operator-scale.sh [N ...]     (default: 100 1000 5000)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release -p ballast-operator --example scale
counts=("$@")
[[ ${#counts[@]} -gt 0 ]] || counts=(100 1000 5000)
echo "| BalancedServices | objects built | total ms | us per BalancedService | MiB of JSON | peak RSS MiB |"
echo "| --- | --- | --- | --- | --- | --- |"
for n in "${counts[@]}"; do
  target/release/examples/scale "$n"
done
