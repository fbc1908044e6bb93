#!/usr/bin/env bash
# User-space instructions per proxied request: ballast-proxy, the thinnest hyper proxy
# (proxy/examples/hyper_floor.rs), nginx and haproxy, counted by valgrind's callgrind.
#
#   bash bench/instructions.sh [--requests 20000] [--no-build]
#
# Unlike req/s on a shared machine, the count does not drift from run to run (it moves
# by well under 1%), so it shows what a code change costs or saves. It says nothing
# about the kernel's share (for a loopback proxy most of the CPU: see bench/proxy.sh's
# CPU column) or about waiting. Every process this script starts is stopped by PID on
# exit. Traffic stays on 127.0.0.0/8. Callgrind files go to bench/out/<timestamp>-ir/.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=lib.sh
source "$ROOT/bench/lib.sh"
REQUESTS=20000
WARMUP=2000
BUILD=1
usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
while (($#)); do
    case $1 in
        --requests) REQUESTS=${2:?--requests needs a value}; shift 2 ;;
        --requests=*) REQUESTS=${1#*=}; shift ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
[[ $REQUESTS =~ ^[1-9][0-9]*$ ]] || { echo "--requests must be a positive whole number" >&2; exit 2; }

# Where cargo puts the binaries: $CARGO_TARGET_DIR (relative to the repository, as
# cargo reads it) or target/.
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
[[ $TARGET_DIR == /* ]] || TARGET_DIR=$ROOT/$TARGET_DIR
PROXY_BIN=$TARGET_DIR/release/ballast-proxy
APP_BIN=$TARGET_DIR/release/ballast-sample-app
FLOOR_BIN=$TARGET_DIR/release/examples/hyper_floor
LISTEN=127.0.0.1:18080
ADMIN=127.0.0.1:18090
BACKENDS=(127.0.0.2:8080 127.0.0.3:8080 127.0.0.4:8080 127.0.0.5:8080)
OUT=$ROOT/bench/out/$(date +%Y%m%d-%H%M%S)-ir
TMP=$(mktemp -d "${TMPDIR:-/tmp}/ballast-ir.XXXXXX")
mkdir -p "$OUT"

PIDS=()
stop_pid() {
    local pid=$1 i keep=() p
    for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
stop_all() {
    local rc=$? p
    trap - EXIT INT TERM
    for p in "${PIDS[@]}"; do stop_pid "$p"; done
    rm -rf "$TMP"
    exit "$rc"
}
trap stop_all EXIT
trap 'echo "interrupted" >&2; exit 130' INT
trap 'exit 143' TERM
die() { echo "error: $*" >&2; exit 1; }
log() { echo "# $*" >&2; }
listening() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

install_missing valgrind=valgrind h2load=nghttp2-client nginx=nginx haproxy=haproxy curl=curl
export PATH=$PATH:/usr/sbin:/sbin

if ((BUILD)); then
    log "building release binaries"
    (cd "$ROOT" && cargo build --release -q -p ballast-proxy -p ballast-integration &&
        cargo build --release -q -p ballast-proxy --example hyper_floor)
fi
for b in "$PROXY_BIN" "$APP_BIN" "$FLOOR_BIN"; do [[ -x $b ]] || die "missing $b (build it)"; done
for a in "$LISTEN" "$ADMIN" "${BACKENDS[@]}"; do
    ! listening "${a%:*}" "${a##*:}" || die "$a is already in use; stop whatever listens there"
done

for a in "${BACKENDS[@]}"; do
    RUST_LOG=warn "$APP_BIN" --listen "$a" --pod "b${a%%:*}" --latency-ms 0 >"$TMP/backend-$a.log" 2>&1 &
    PIDS+=($!)
done
for a in "${BACKENDS[@]}"; do
    for _ in $(seq 100); do grep -q '^listening on' "$TMP/backend-$a.log" && break; sleep 0.05; done
done

# One worker / thread / process each: callgrind runs one thread at a time anyway.
{
    echo "worker_processes 1; master_process off; daemon off;"
    echo "pid $TMP/nginx.pid; error_log $TMP/nginx-error.log warn;"
    echo "events { worker_connections 1024; }"
    echo "http { access_log off; keepalive_requests 1000000;"
    for t in client_body proxy fastcgi uwsgi scgi; do echo "  ${t}_temp_path $TMP/$t;"; done
    echo "  upstream backends {"
    for a in "${BACKENDS[@]}"; do echo "    server $a;"; done
    echo "    keepalive 64; keepalive_requests 1000000; }"
    echo "  server { listen $LISTEN; location / { proxy_pass http://backends;"
    echo "    proxy_http_version 1.1; proxy_set_header Connection \"\"; } } }"
} >"$TMP/nginx.conf"
{
    echo "global"
    echo "  nbthread 1"
    echo "defaults"
    echo "  mode http"
    echo "  timeout connect 1s"
    echo "  timeout client 60s"
    echo "  timeout server 60s"
    echo "  option http-keep-alive"
    echo "  http-reuse always"
    echo "frontend fe"
    echo "  bind $LISTEN"
    echo "  default_backend be"
    echo "backend be"
    echo "  balance roundrobin"
    i=0
    for a in "${BACKENDS[@]}"; do i=$((i + 1)); echo "  server b$i $a"; done
} >"$TMP/haproxy.cfg"
ENDPOINTS=$(IFS=,; echo "${BACKENDS[*]}")

command_of() { # TARGET -> the command line, one word per line
    case $1 in
        ballast) printf '%s\n' "$PROXY_BIN" --listen "$LISTEN" --admin-listen "$ADMIN" \
            --endpoints "$ENDPOINTS" --algorithm p2c-ewma --warmup 0s --workers 1 \
            --shutdown-delay 0s --drain-timeout 1s ;;
        hyper-floor) printf '%s\n' "$FLOOR_BIN" "$LISTEN" "$ENDPOINTS" 1 ;;
        nginx) printf '%s\n' nginx -p "$TMP" -c "$TMP/nginx.conf" ;;
        haproxy) printf '%s\n' haproxy -db -f "$TMP/haproxy.cfg" ;;
    esac
}

# measure TARGET -> instructions per request
measure() {
    local target=$1 pid dump ir cmd=()
    mapfile -t cmd < <(command_of "$target")
    RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$OUT/$target.%p" "${cmd[@]}" \
        >"$OUT/$target.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    for _ in $(seq 300); do
        curl -sf -o /dev/null --max-time 2 "http://$LISTEN/" && break
        kill -0 "$pid" 2>/dev/null || die "$target exited; see $OUT/$target.log"
        sleep 0.1
    done
    h2load --h1 -n "$WARMUP" -c 8 -t 1 "http://$LISTEN/" >/dev/null
    callgrind_control -z "$pid" >/dev/null
    h2load --h1 -n "$REQUESTS" -c 8 -t 1 "http://$LISTEN/" >"$OUT/$target.h2load"
    callgrind_control -d "$pid" >/dev/null
    grep -q "$REQUESTS succeeded, 0 failed" "$OUT/$target.h2load" ||
        die "$target: not every request succeeded; see $OUT/$target.h2load"
    stop_pid "$pid"
    dump=$(ls "$OUT/$target.$pid".* 2>/dev/null | head -1)
    [[ -n $dump ]] || die "$target: no callgrind dump in $OUT"
    ir=$(awk '$1 == "summary:" || $1 == "totals:" { print $2; exit }' "$dump")
    echo $((ir / REQUESTS))
}

declare -A IR
for target in ballast hyper-floor nginx haproxy; do
    log "counting $target ($REQUESTS requests, h2load --h1 -c 8)"
    IR[$target]=$(measure "$target")
done

ratio() { awk "BEGIN { printf \"%.2f\", $1 / $2 }"; }
{
    echo "## User-space instructions per proxied request ($REQUESTS requests, 4 backends, h2load --h1 -c 8)"
    echo ""
    echo "| target | instructions/request | vs nginx | vs haproxy | vs hyper floor |"
    echo "| --- | --- | --- | --- | --- |"
    for target in ballast hyper-floor nginx haproxy; do
        echo "| $target | ${IR[$target]} | $(ratio "${IR[$target]}" "${IR[nginx]}") | $(ratio "${IR[$target]}" "${IR[haproxy]}") | $(ratio "${IR[$target]}" "${IR[hyper-floor]}") |"
    done
    echo ""
    echo "hyper floor: proxy/examples/hyper_floor.rs, hyper's HTTP/1 server and client with a"
    echo "keep-alive pool and round-robin, nothing else: what the HTTP stack itself costs."
    echo "Callgrind files: $OUT (callgrind_annotate FILE for the functions)."
} | tee "$OUT/summary.md"
