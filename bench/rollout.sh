#!/usr/bin/env bash
# The rollout table, 3 repetitions, medians: ballast vs Kubernetes defaults vs
# preStop sleep 30, on the local cluster stand-in (see scripts/demo.sh).
#
#   bash bench/rollout.sh [--runs 3] [--no-build] [-- extra ballast-demo flags]
#
# Each run uses another seed. Raw output goes to bench/out/rollout-<timestamp>/.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNS=3
BUILD=1
EXTRA=()
while (($#)); do
    case $1 in
        --runs) RUNS=${2:?--runs needs a value}; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
cd "$ROOT"
if ((BUILD)); then
    cargo build --locked --workspace --bins
fi
OUT=$ROOT/bench/out/rollout-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
for run in $(seq 1 "$RUNS"); do
    echo "run $run/$RUNS ..." >&2
    "${CARGO_TARGET_DIR:-target}/debug/ballast-demo" --plain --seed "$run" \
        --json "$OUT/run-$run.json" "${EXTRA[@]}" >"$OUT/run-$run.txt" 2>&1 \
        || { echo "run $run failed, see $OUT/run-$run.txt" >&2; exit 1; }
done
python3 - "$OUT" "$RUNS" <<'PY'
import json, statistics, sys, pathlib
out, runs = pathlib.Path(sys.argv[1]), int(sys.argv[2])
rows = {}
for run in range(1, runs + 1):
    for line in (out / f"run-{run}.json").read_text().splitlines():
        r = json.loads(line)
        rows.setdefault(r["variant"], []).append(r)
def med(rs, key):
    vals = [r[key] for r in rs if r.get(key) is not None]
    return statistics.median(vals) if vals else None
def fmt(x, f="{:.2f}"):
    return "-" if x is None else f.format(x)
base = med(rows.get("ballast", []), "rollout_seconds")
print(f"Rollout under load, medians of {runs} runs (local cluster stand-in, 8 pods)\n")
# The demo's column names (see its legend); "vs ballast" is the rollout's ratio.
print("| variant | req/s | failed | ws broken | balance | rollout | vs ballast | proxies |")
print("|---|---|---|---|---|---|---|---|")
for name, rs in rows.items():
    rollout = med(rs, "rollout_seconds")
    ratio = rollout / base if base and rollout is not None else None
    print(f"| {name} | {fmt(med(rs, 'requests_per_second'), '{:.1f}')} "
          f"| {fmt(med(rs, 'failed'), '{:.0f}')} | {fmt(med(rs, 'ws_broken'), '{:.0f}')} "
          f"| {fmt(med(rs, 'balance_before'))}/{fmt(med(rs, 'balance_after'))} "
          f"| {fmt(rollout, '{:.1f}s')} | {fmt(ratio, '{:.2f}x')} "
          f"| {fmt(med(rs, 'proxy_rollout_seconds'), '{:.1f}s')} |")
print(f"\nper run: {', '.join(str(out / f'run-{i}.txt') for i in range(1, runs + 1))}")
PY
