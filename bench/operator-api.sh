#!/usr/bin/env bash
# The load the operator puts on the API server: requests per BalancedService per
# minute, once everything settled and during a rollout of every BalancedService (one
# pod replaced per step), counted by the list/watch/write API stand-in the operator
# binary runs against (tests/integration/src/bin/ballast-api-bench.rs). With
# --baseline REF the operator of that git revision runs the same scenario in the same
# run, and the table shows ratios. Prints a table; not a test.
#
#   bash bench/operator-api.sh [--baseline REF] [--services N] [--steady-secs S] [--step-secs S]
#
# The baseline is built in a git worktree under bench/out/ with its own target dir (a
# first build takes several minutes).
set -euo pipefail
cd "$(dirname "$0")/.."

baseline=""
services=10
steady=120
step=5
while [[ $# -gt 0 ]]; do
  case "$1" in
    --baseline) baseline=$2; shift 2 ;;
    --services) services=$2; shift 2 ;;
    --steady-secs) steady=$2; shift 2 ;;
    --step-secs) step=$2; shift 2 ;;
    *) echo "usage: $0 [--baseline REF] [--services N] [--steady-secs S] [--step-secs S]" >&2; exit 2 ;;
  esac
done

cargo build -q -p ballast-operator -p ballast-integration --bin ballast-operator --bin ballast-api-bench
target_dir=${CARGO_TARGET_DIR:-target}
bench_bin="$target_dir/debug/ballast-api-bench"
out=bench/out
mkdir -p "$out"

run() { # label operator-binary
  "$bench_bin" --operator "$2" --label "$1" --services "$services" \
    --steady-secs "$steady" --step-secs "$step" | tee -a "$out/operator-api.jsonl"
}

results=()
if [[ -n $baseline ]]; then
  rev=$(git rev-parse --short "$baseline")
  tree="$out/baseline-$rev"
  if [[ ! -d $tree ]]; then
    git worktree add -q --detach "$tree" "$rev"
  fi
  (cd "$tree" && CARGO_TARGET_DIR="$PWD/../baseline-target" cargo build -q -p ballast-operator)
  results+=("$(run "baseline $rev" "$out/baseline-target/debug/ballast-operator")")
fi
results+=("$(run "ballast $(git rev-parse --short HEAD)" "$target_dir/debug/ballast-operator")")

python3 - "$services" "$steady" "${results[@]}" <<'PY'
import json, sys
services, steady = sys.argv[1], sys.argv[2]
rows = [json.loads(r) for r in sys.argv[3:]]
base = rows[0] if len(rows) > 1 else None
def detail(d):
    return ", ".join(f"{k} {v:g}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]) if k != "total") or "-"
print(f"\n{services} BalancedServices of 4 pods; steady over {steady} s; rollout: every one at once, one pod replaced per step\n")
print("| operator | steady req/min per BalancedService | rollout req/min per BalancedService | rollout s | vs baseline (steady / rollout) | rollout requests by kind (per min) |")
print("| --- | --- | --- | --- | --- | --- |")
for r in rows:
    s, o = r["steady"]["total"], r["rollout"]["total"]
    ratio = "-"
    if base is not None and r is not base:
        f = lambda a, b: f"{a / b:.2f}x" if b else ("0" if a == 0 else "inf")
        ratio = f"{f(s, base['steady']['total'])} / {f(o, base['rollout']['total'])}"
    print(f"| {r['label']} | {s:g} | {o:g} | {r['rollout_seconds']} | {ratio} | {detail(r['rollout'])} |")
PY
