#!/usr/bin/env bash
# Benchmark ballast-proxy against direct access, nginx and haproxy on loopback.
#
#   bash bench/proxy.sh [--duration 10s] [--rounds 3] [--quick] [--sections 1,2,3,4,5,6] [--no-build]
#
# Every process this script starts is a child it stops by PID on exit (also on
# failure or Ctrl-C). All traffic stays on 127.0.0.0/8. Binaries come from
# $CARGO_TARGET_DIR (default target/). Raw output and process logs go to
# bench/out/<timestamp>/; see bench/README.md.
set -euo pipefail

# ---------------------------------------------------------------- settings --
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=lib.sh
source "$ROOT/bench/lib.sh"
DURATION=10s
DURATION_SET=0
QUICK=0
SECTIONS=1,2,3,4,5,6
BUILD=1
ROUNDS=3
ROUNDS_SET=0

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }
while (($#)); do
    case $1 in
        --duration) DURATION=${2:?--duration needs a value}; DURATION_SET=1; shift 2 ;;
        --duration=*) DURATION=${1#*=}; DURATION_SET=1; shift ;;
        --quick) QUICK=1; shift ;;
        --sections) SECTIONS=${2:?--sections needs a value}; shift 2 ;;
        --sections=*) SECTIONS=${1#*=}; shift ;;
        --no-build) BUILD=0; shift ;;
        --rounds) ROUNDS=${2:?--rounds needs a value}; ROUNDS_SET=1; shift 2 ;;
        --rounds=*) ROUNDS=${1#*=}; ROUNDS_SET=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
# --quick: short runs, one round in section 1, and 20 endpoints instead of 100 in section 4.
if ((QUICK)) && ((!DURATION_SET)); then DURATION=3s; fi
if ((QUICK)) && ((!ROUNDS_SET)); then ROUNDS=1; fi
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "--rounds must be a positive whole number" >&2; exit 2; }
if ((QUICK)); then BIG_N=20; else BIG_N=100; fi

# Where cargo puts the binaries: $CARGO_TARGET_DIR (relative to the repository, as
# cargo runs there), else target/.
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
[[ $TARGET_DIR == /* ]] || TARGET_DIR=$ROOT/$TARGET_DIR
PROXY_BIN=$TARGET_DIR/release/ballast-proxy
APP_BIN=$TARGET_DIR/release/ballast-sample-app
FLOOR_BIN=$TARGET_DIR/release/examples/hyper_floor
LOAD_BIN=$TARGET_DIR/release/examples/stream_load
BACKEND_PORT=8080
BALLAST_ADDR=127.0.0.1:18080
BALLAST_ADMIN=127.0.0.1:18090
NGINX_ADDR=127.0.0.1:18081
HAPROXY_ADDR=127.0.0.1:18082
FLOOR_ADDR=127.0.0.1:18083
NPROC=$(nproc)
CLK_TCK=$(getconf CLK_TCK)

OUT=$ROOT/bench/out/$(date +%Y%m%d-%H%M%S)
LOGS=$OUT/logs
TMP=$(mktemp -d "${TMPDIR:-/tmp}/ballast-bench.XXXXXX")
mkdir -p "$LOGS"
SUMMARY=$OUT/summary.md

# ------------------------------------------------------- process tracking --
PIDS=()          # every background process we started and have not stopped
BACKEND_PIDS=()  # the sample apps of the current section
PROXY_PID=       # the proxy under test

track() { PIDS+=("$1"); }
untrack() {
    local keep=() p
    for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}
children_of() { pgrep -P "$1" 2>/dev/null || true; }

# stop_pid PID: SIGTERM, wait up to 3 s, then SIGKILL (children too, e.g. nginx workers).
stop_pid() {
    local pid=$1 kids i
    [[ -n $pid ]] || return 0
    untrack "$pid"
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kids=$(children_of "$pid")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 30; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" $kids 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

stop_all() {
    local rc=$? p
    trap - EXIT INT TERM
    # TERM everything at once, give it a moment, then KILL what is left.
    for p in "${PIDS[@]}"; do
        kill -TERM $(children_of "$p") "$p" 2>/dev/null || true
    done
    if ((${#PIDS[@]})); then
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            local alive=0
            for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
            ((alive)) || break
            sleep 0.2
        done
        for p in "${PIDS[@]}"; do
            kill -KILL $(children_of "$p") "$p" 2>/dev/null || true
            wait "$p" 2>/dev/null || true
        done
    fi
    PIDS=()
    rm -rf "$TMP"
    exit "$rc"
}
trap stop_all EXIT
trap 'echo "interrupted" >&2; exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------ utils --
die() { echo "error: $*" >&2; exit 1; }
log() { echo "# $*" >&2; }
say() { echo "$*" | tee -a "$SUMMARY"; }
calc() { awk "BEGIN { printf \"%.${2:-2}f\", $1 }"; }

dur_seconds() { # 10s, 2m, 30 -> seconds
    case $1 in
        *ms) echo 1 ;;
        *s) echo "${1%s}" ;;
        *m) echo $((${1%m} * 60)) ;;
        *h) echo $((${1%h} * 3600)) ;;
        *) echo "$1" ;;
    esac
}

listening() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
require_free() { # host:port ...
    local a
    for a in "$@"; do
        ! listening "${a%:*}" "${a##*:}" || die "$a is already in use; stop whatever listens there"
    done
}

wait_http() { # url timeout_s [pid [curl option, e.g. --http2-prior-knowledge]]
    local url=$1 deadline=$((SECONDS + $2)) pid=${3:-} opt=${4:-}
    until curl -sf ${opt:+"$opt"} -o /dev/null --max-time 1 "$url"; do
        [[ -z $pid ]] || kill -0 "$pid" 2>/dev/null || return 1
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}

# cpu_ticks PID: utime+stime of PID and its children (nginx workers), in clock ticks.
cpu_ticks() {
    local total=0 p t
    for p in "$1" $(children_of "$1"); do
        t=$(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$p/stat" 2>/dev/null) || continue
        total=$((total + ${t:-0}))
    done
    echo "$total"
}
# proc_kib PID FIELD: VmHWM / VmRSS of PID plus its children, KiB.
proc_kib() {
    local total=0 p v
    for p in "$1" $(children_of "$1"); do
        v=$(awk -v f="$2:" '$1 == f { print $2 }' "/proc/$p/status" 2>/dev/null) || continue
        total=$((total + ${v:-0}))
    done
    echo "$total"
}
mib() { calc "$1 / 1024" 1; }

# --------------------------------------------------------------- install --
install_missing wrk=wrk nginx=nginx haproxy=haproxy curl=curl pgrep=procps
export PATH=$PATH:/usr/sbin:/sbin

if ((BUILD)); then
    log "building release binaries"
    (cd "$ROOT" && cargo build --release -q -p ballast-proxy -p ballast-integration &&
        cargo build --release -q -p ballast-proxy --example hyper_floor --example stream_load)
fi
for bin in "$PROXY_BIN" "$APP_BIN" "$FLOOR_BIN" "$LOAD_BIN"; do
    [[ -x $bin ]] || die "missing $bin (build it, or drop --no-build)"
done
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# -------------------------------------------------------------- backends --
backend_ip() { echo "127.0.0.$(($1 + 1))"; } # backend 1 -> 127.0.0.2
backend_list() { # N [sep] -> 127.0.0.2:8080,127.0.0.3:8080,...
    local i out=()
    for ((i = 1; i <= $1; i++)); do out+=("$(backend_ip "$i"):$BACKEND_PORT"); done
    local IFS=${2:-,}
    echo "${out[*]}"
}

# start_backends N DEFAULT_LATENCY_MS [SLOW_INDEX SLOW_LATENCY_MS]
start_backends() {
    local n=$1 lat=$2 slow=${3:-0} slow_lat=${4:-0} i l pid ip
    BACKEND_PIDS=()
    for ((i = 1; i <= n; i++)); do require_free "$(backend_ip "$i"):$BACKEND_PORT"; done
    for ((i = 1; i <= n; i++)); do
        ip=$(backend_ip "$i")
        l=$lat
        ((i != slow)) || l=$slow_lat
        RUST_LOG=warn "$APP_BIN" --listen "$ip:$BACKEND_PORT" --pod "b$i" --latency-ms "$l" \
            >"$LOGS/backend-$ip.log" 2>&1 &
        pid=$!
        track "$pid"
        BACKEND_PIDS+=("$pid")
    done
    local deadline=$((SECONDS + 30))
    for ((i = 1; i <= n; i++)); do
        ip=$(backend_ip "$i")
        until grep -q '^listening on' "$LOGS/backend-$ip.log" 2>/dev/null; do
            kill -0 "${BACKEND_PIDS[i - 1]}" 2>/dev/null || die "backend $ip exited; see $LOGS/backend-$ip.log"
            ((SECONDS < deadline)) || die "backend $ip not listening after 30 s"
            sleep 0.05
        done
    done
    log "$n backends up (latency ${lat} ms$( ((slow)) && echo ", $(backend_ip "$slow") ${slow_lat} ms"))"
}
stop_backends() {
    local p
    for p in "${BACKEND_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${BACKEND_PIDS[@]}"; do stop_pid "$p"; done
    BACKEND_PIDS=()
}
# backend_counts N -> one count per line (the probe itself is included; see deltas)
backend_counts() {
    local i
    for ((i = 1; i <= $1; i++)); do
        curl -s --max-time 2 "http://$(backend_ip "$i"):$BACKEND_PORT/" |
            sed -n 's/.*"requests":\([0-9]*\).*/\1/p' | grep . || echo 0
    done
}
# count_deltas BEFORE_FILE AFTER_FILE -> requests each backend served in between
count_deltas() { paste "$1" "$2" | awk '{ d = $2 - $1 - 1; print (d < 0 ? 0 : d) }'; }
# share_stats DELTAS_FILE -> "total max/mean min/mean max_share% used"
share_stats() {
    awk '{ v[NR] = $1; t += $1; if (NR == 1 || $1 > mx) mx = $1; if (NR == 1 || $1 < mn) mn = $1; if ($1 > 0) u++ }
         END { m = t / NR; if (m == 0) { print t, "-", "-", "-", u + 0; exit }
               printf "%d %.2f %.2f %.1f %d\n", t, mx / m, mn / m, 100 * mx / t, u }' "$1"
}

# ----------------------------------------------------------------- proxies --
start_ballast() { # ENDPOINTS_CSV [extra ballast-proxy flags]
    local endpoints=$1
    shift
    require_free "$BALLAST_ADDR" "$BALLAST_ADMIN"
    RUST_LOG=warn "$PROXY_BIN" --listen "$BALLAST_ADDR" --admin-listen "$BALLAST_ADMIN" \
        --endpoints "$endpoints" --algorithm p2c-ewma --warmup 0s \
        --shutdown-delay 0s --drain-timeout 1s "$@" >>"$LOGS/ballast.log" 2>&1 &
    PROXY_PID=$!
    track "$PROXY_PID"
    wait_http "http://$BALLAST_ADMIN/ready" 20 "$PROXY_PID" || die "ballast-proxy not ready; see $LOGS/ballast.log"
    wait_http "http://$BALLAST_ADDR/healthz" 10 "$PROXY_PID" || die "ballast-proxy not proxying; see $LOGS/ballast.log"
    TARGET_URL=http://$BALLAST_ADDR/
}

# The thinnest hyper proxy (proxy/examples/hyper_floor.rs): what the HTTP stack costs.
start_floor() { # N backends
    require_free "$FLOOR_ADDR"
    "$FLOOR_BIN" "$FLOOR_ADDR" "$(backend_list "$1")" "$NPROC" >>"$LOGS/hyper-floor.log" 2>&1 &
    PROXY_PID=$!
    track "$PROXY_PID"
    wait_http "http://$FLOOR_ADDR/healthz" 10 "$PROXY_PID" || die "hyper floor not ready; see $LOGS/hyper-floor.log"
    TARGET_URL=http://$FLOOR_ADDR/
}

start_nginx() { # N backends
    require_free "$NGINX_ADDR"
    local d=$TMP/nginx i
    mkdir -p "$d/tmp"
    {
        echo "worker_processes $NPROC;"
        echo "pid $d/nginx.pid;"
        echo "error_log $LOGS/nginx-error.log warn;"
        echo "events { worker_connections 4096; }"
        echo "http {"
        echo "  access_log off;"
        echo "  keepalive_requests 1000000;"
        for i in client_body proxy fastcgi uwsgi scgi; do echo "  ${i}_temp_path $d/tmp/$i;"; done
        echo "  upstream backends {"
        for ((i = 1; i <= $1; i++)); do echo "    server $(backend_ip "$i"):$BACKEND_PORT;"; done
        echo "    keepalive 64;"
        echo "    keepalive_requests 1000000;"
        echo "  }"
        echo "  server {"
        echo "    listen $NGINX_ADDR;"
        echo "    location / {"
        echo "      proxy_pass http://backends;"
        echo "      proxy_http_version 1.1;"
        echo "      proxy_set_header Connection \"\";"
        echo "    }"
        echo "  }"
        echo "}"
    } >"$d/nginx.conf"
    cp "$d/nginx.conf" "$LOGS/nginx.conf"
    nginx -e "$LOGS/nginx-error.log" -p "$d" -c "$d/nginx.conf" -g 'daemon off;' >>"$LOGS/nginx.log" 2>&1 &
    PROXY_PID=$!
    track "$PROXY_PID"
    wait_http "http://$NGINX_ADDR/healthz" 10 "$PROXY_PID" || die "nginx not ready; see $LOGS/nginx-error.log"
    TARGET_URL=http://$NGINX_ADDR/
}

start_haproxy() { # MODE(http|tcp) BALANCE N
    require_free "$HAPROXY_ADDR"
    local mode=$1 balance=$2 n=$3 cfg=$TMP/haproxy-$1-$2.cfg i
    {
        echo "global"
        echo "  nbthread $NPROC"
        echo "  maxconn 2000"
        echo "defaults"
        echo "  mode $mode"
        echo "  timeout connect 1s"
        echo "  timeout client 60s"
        echo "  timeout server 60s"
        if [[ $mode == http ]]; then
            echo "  option http-keep-alive"
            echo "  http-reuse always"
        fi
        echo "frontend fe"
        echo "  bind $HAPROXY_ADDR"
        echo "  default_backend be"
        echo "backend be"
        echo "  balance $balance"
        for ((i = 1; i <= n; i++)); do echo "  server b$i $(backend_ip "$i"):$BACKEND_PORT"; done
    } >"$cfg"
    cp "$cfg" "$LOGS/"
    haproxy -db -f "$cfg" >>"$LOGS/haproxy.log" 2>&1 &
    PROXY_PID=$!
    track "$PROXY_PID"
    wait_http "http://$HAPROXY_ADDR/healthz" 10 "$PROXY_PID" || die "haproxy not ready; see $LOGS/haproxy.log"
    TARGET_URL=http://$HAPROXY_ADDR/
}

stop_proxy() { stop_pid "$PROXY_PID"; PROXY_PID=; }

# -------------------------------------------------------------------- wrk --
# run_wrk NAME URL THREADS CONNS [extra wrk args]
# Sets WRK_RPS WRK_P50 WRK_P99 (ms) WRK_REQS WRK_ERRS; raw output in $OUT/NAME.txt.
run_wrk() {
    local name=$1 url=$2 t=$3 c=$4 raw=$OUT/$1.txt
    shift 4
    log "wrk -t$t -c$c -d$DURATION $* $url  ($name)"
    timeout --signal=INT $(($(dur_seconds "$DURATION") + 30)) \
        wrk -t"$t" -c"$c" -d"$DURATION" --latency "$@" "$url" >"$raw" 2>&1 || true
    read -r WRK_RPS WRK_P50 WRK_P99 WRK_REQS WRK_ERRS < <(awk '
        function ms(v) {
            if (v ~ /us$/) return v / 1000
            if (v ~ /ms$/) return v + 0
            if (v ~ /m$/) return v * 60000
            if (v ~ /s$/) return v * 1000
            return v + 0
        }
        /^ +50% / { p50 = ms($2) }
        /^ +99% / { p99 = ms($2) }
        / requests in / { reqs = $1 }
        /^Requests\/sec:/ { rps = $2 }
        /Non-2xx or 3xx responses:/ { errs = errs "non2xx=" $NF ";" }
        /Socket errors:/ {
            s = $0; sub(/.*Socket errors: /, "", s); n = split(s, parts, /, /)
            for (i = 1; i <= n; i++) { split(parts[i], kv, " "); if (kv[2] > 0) errs = errs kv[1] "=" kv[2] ";" }
        }
        END {
            if (rps == "") { print "0 0 0 0 wrk-failed"; exit }
            sub(/;$/, "", errs)
            printf "%.0f %.3f %.3f %d %s\n", rps, p50, p99, reqs, (errs == "" ? "none" : errs)
        }' "$raw")
    [[ $WRK_ERRS != wrk-failed ]] || log "wrk failed for $name; see $raw"
}

# measure NAME: run wrk against $TARGET_URL, recording proxy CPU seconds and max RSS.
# Sets CPU_S CPU_US_REQ RSS_MIB in addition to the WRK_* values.
measure() { # NAME THREADS CONNS [wrk args]
    local name=$1 t0 t1
    shift
    t0=$(cpu_ticks "$PROXY_PID")
    run_wrk "$name" "$TARGET_URL" "$@"
    t1=$(cpu_ticks "$PROXY_PID")
    CPU_S=$(calc "($t1 - $t0) / $CLK_TCK" 1)
    CPU_US_REQ=-
    ((WRK_REQS > 0)) && CPU_US_REQ=$(calc "($t1 - $t0) * 1000000 / $CLK_TCK / $WRK_REQS" 1)
    RSS_MIB=$(mib "$(proc_kib "$PROXY_PID" VmHWM)")
}

row() { local IFS=$'\t'; echo "$*" >>"$TABLE"; }
# print_table TSV: markdown table with padded columns (mawk-compatible).
print_table() {
    awk -F'\t' '
        { for (i = 1; i <= NF; i++) { c[NR, i] = $i; if (length($i) > w[i]) w[i] = length($i) }
          if (NF > nf) nf = NF; n = NR }
        END {
            for (r = 1; r <= n; r++) {
                line = "|"
                for (i = 1; i <= nf; i++) line = line sprintf(" %-" w[i] "s |", c[r, i])
                print line
                if (r == 1) {
                    line = "|"
                    for (i = 1; i <= nf; i++) { s = ""; for (k = 0; k < w[i]; k++) s = s "-"; line = line " " s " |" }
                    print line
                }
            }
        }' "$1" | tee -a "$SUMMARY"
}
new_table() { TABLE=$TMP/table-$1.tsv; : >"$TABLE"; }
want() { [[ ,$SECTIONS, == *,$1,* ]]; }

# ---------------------------------------------------------------- header --
header() {
    local cpu
    cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
    say "# ballast-proxy benchmark ($(date -u +%Y-%m-%dT%H:%MZ))"
    say ""
    say "- machine: $NPROC cores, ${cpu:-unknown CPU}, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), Linux $(uname -r)"
    say "- ballast: $("$PROXY_BIN" --version 2>/dev/null | head -1), git $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$ROOT" && git diff --quiet HEAD 2>/dev/null || echo ' (dirty)')"
    say "- $(nginx -v 2>&1 | head -1); $(haproxy -v 2>&1 | head -1 | cut -d' ' -f1-3); $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)"
    say "- duration per run: $DURATION; nginx worker_processes $NPROC, haproxy nbthread $NPROC (= nproc, like ballast's tokio runtime)"
    say "- NOTE: one shared $NPROC-core machine: wrk, the proxy and the backends compete for the same cores, and"
    say "  anything else running skews results. Compare ratios within one run, not absolute numbers across runs."
    say "- raw wrk output and logs: ${OUT#"$ROOT"/}"
}

# ------------------------------------------------------------- section 1 --
# median V... -> the median (mean of the middle two for an even count)
median() {
    printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

section_throughput() {
    local n=4 name round i
    local targets=(direct ballast nginx haproxy hyper-floor)
    say ""
    say "## 1. Throughput and latency (4 backends, 0 ms; medians of $ROUNDS rounds)"
    say ""
    say "Saturated: wrk -t2 -c32 keep-alive, as fast as it goes (p50 there is mostly queueing: 32 / req/s)."
    say "Light load: wrk -t1 -c1, one request at a time, so p50 is one request's trip through the proxy."
    say "Each round runs every target once, in a rotated order, so drift on this shared machine hits all alike."
    say ""
    start_backends "$n" 0
    declare -A rps p50 p99 lp50 cpureq rss errs
    for ((round = 1; round <= ROUNDS; round++)); do
        for ((i = 0; i < ${#targets[@]}; i++)); do
            name=${targets[(i + round - 1) % ${#targets[@]}]}
            case $name in
                direct) PROXY_PID=; TARGET_URL=http://$(backend_ip 1):$BACKEND_PORT/ ;;
                ballast) start_ballast "$(backend_list "$n")" ;;
                nginx) start_nginx "$n" ;;
                haproxy) start_haproxy http roundrobin "$n" ;;
                hyper-floor) start_floor "$n" ;;
            esac
            if [[ $name == direct ]]; then
                run_wrk "s1-$name-r$round" "$TARGET_URL" 2 32
                CPU_US_REQ=-; RSS_MIB=-
            else
                measure "s1-$name-r$round" 2 32
            fi
            rps[$name]+=" $WRK_RPS" p50[$name]+=" $WRK_P50" p99[$name]+=" $WRK_P99"
            cpureq[$name]+=" $CPU_US_REQ" rss[$name]=$RSS_MIB
            [[ $WRK_ERRS == none ]] || errs[$name]+="r$round:$WRK_ERRS "
            run_wrk "s1-$name-light-r$round" "$TARGET_URL" 1 1
            lp50[$name]+=" $WRK_P50"
            [[ $WRK_ERRS == none ]] || errs[$name]+="light-r$round:$WRK_ERRS "
            [[ $name == direct ]] || stop_proxy
        done
    done
    stop_backends
    declare -A med_rps med_p50 med_lp50
    for name in "${targets[@]}"; do
        med_rps[$name]=$(median ${rps[$name]})
        med_p50[$name]=$(median ${p50[$name]})
        med_lp50[$name]=$(median ${lp50[$name]})
    done
    new_table 1
    row target "req/s" "req/s per round" "vs haproxy" "vs nginx" "p50 ms" "p99 ms" "p50 added (ms)" \
        "light p50 ms" "light p50 per round (ms)" "light p50 added (ms)" "proxy CPU us/req" "proxy max RSS MiB" "wrk errors"
    for name in "${targets[@]}"; do
        local label=$name added=- ladded=- cpu=-
        [[ $name != direct ]] || label="direct (one backend, $(backend_ip 1))"
        [[ $name != hyper-floor ]] || label="hyper floor (reference, not a product)"
        if [[ $name != direct ]]; then
            added=$(calc "${med_p50[$name]} - ${med_p50[direct]}" 3)
            ladded=$(calc "${med_lp50[$name]} - ${med_lp50[direct]}" 3)
            cpu=$(median ${cpureq[$name]})
        fi
        row "$label" "${med_rps[$name]%.*}" "$(echo ${rps[$name]} | tr ' ' '/')" \
            "$(calc "${med_rps[$name]} / ${med_rps[haproxy]:-1}")" "$(calc "${med_rps[$name]} / ${med_rps[nginx]:-1}")" \
            "$(calc "${med_p50[$name]}" 3)" "$(calc "$(median ${p99[$name]})" 3)" "$added" \
            "$(calc "${med_lp50[$name]}" 3)" "$(for v in ${lp50[$name]}; do calc "$v" 3; echo; done | paste -sd/)" \
            "$ladded" "$cpu" "${rss[$name]}" "${errs[$name]:-none}"
    done
    print_table "$TABLE"
    say ""
    say "CPU and RSS are the proxy's only (nginx: master + workers summed; RSS is VmHWM, the peak, of the last round)."
    say "hyper floor: hyper's HTTP/1 server and client, a keep-alive pool and round-robin, nothing else"
    say "(proxy/examples/hyper_floor.rs): the cost of the HTTP stack ballast is built on, without ballast's work."
    say "Light-load latency depends on how fast an idle thread wakes up; on a shared VM that comes in"
    say "spells (0.1-0.2 ms, then 0.6-0.8 ms for everything that sleeps between requests), so read the rounds."
}

# ------------------------------------------------------------- section 2 --
section_balance() {
    local n=8 name label
    say ""
    say "## 2. Balance across 8 backends from 4 keep-alive connections (wrk -t2 -c4)"
    say ""
    start_backends "$n" 0
    new_table 2
    row balancer requests "max/mean" "min/mean" "busiest backend share %" "backends used" "req/s" "wrk errors"
    for name in ballast haproxy-tcp-random haproxy-http-roundrobin; do
        case $name in
            ballast) start_ballast "$(backend_list "$n")"; label="ballast (p2c-ewma)" ;;
            haproxy-tcp-random) start_haproxy tcp random "$n"; label="haproxy mode tcp, balance random (connection-level, like kube-proxy)" ;;
            haproxy-http-roundrobin) start_haproxy http roundrobin "$n"; label="haproxy mode http, roundrobin (per-request reference)" ;;
        esac
        backend_counts "$n" >"$TMP/before"
        run_wrk "s2-$name" "$TARGET_URL" 2 4
        backend_counts "$n" >"$TMP/after"
        stop_proxy
        count_deltas "$TMP/before" "$TMP/after" >"$OUT/s2-$name.counts"
        local total mx mn share used
        read -r total mx mn share used < <(share_stats "$OUT/s2-$name.counts")
        row "$label" "$total" "$mx" "$mn" "$share" "$used/$n" "$WRK_RPS" "$WRK_ERRS"
    done
    stop_backends
    print_table "$TABLE"
    say ""
    say "Shares come from the backends' own request counters; a perfect split is max/mean = min/mean = 1.00."
}

# ------------------------------------------------------------- section 3 --
section_slow() {
    local n=8 name label
    say ""
    say "## 3. One slow backend (8 backends: $(backend_ip 1) at 20 ms, the rest at 2 ms; wrk -t2 -c16)"
    say ""
    start_backends "$n" 2 1 20
    new_table 3
    row balancer "req/s" "p50 ms" "p99 ms" "slow backend share %" "wrk errors"
    for name in ballast haproxy-http-roundrobin haproxy-tcp-random; do
        case $name in
            ballast) start_ballast "$(backend_list "$n")"; label="ballast (p2c-ewma)" ;;
            haproxy-http-roundrobin) start_haproxy http roundrobin "$n"; label="haproxy http roundrobin" ;;
            haproxy-tcp-random) start_haproxy tcp random "$n"; label="haproxy tcp random" ;;
        esac
        backend_counts "$n" >"$TMP/before"
        run_wrk "s3-$name" "$TARGET_URL" 2 16
        backend_counts "$n" >"$TMP/after"
        stop_proxy
        count_deltas "$TMP/before" "$TMP/after" >"$OUT/s3-$name.counts"
        local slow_share
        slow_share=$(awk '{ t += $1; if (NR == 1) s = $1 } END { printf "%.1f", t ? 100 * s / t : 0 }' "$OUT/s3-$name.counts")
        row "$label" "$WRK_RPS" "$(calc "$WRK_P50" 3)" "$(calc "$WRK_P99" 3)" "$slow_share" "$WRK_ERRS"
    done
    stop_backends
    print_table "$TABLE"
    say ""
    say "An even split gives the slow backend 12.5 %; the less it gets, the better the balancer avoids it."
}

# ------------------------------------------------------------- section 4 --
section_memory() {
    local n=$BIG_N small=4 eps conns=20
    say ""
    say "## 4. ballast RSS with $n endpoints at ~10k req/s ($n sample-app processes; wrk -t2 -c$conns, 1 ms pause per request)"
    say ""
    start_backends "$n" 0
    # wrk has no rate limit; a 1 ms delay() per request over $conns connections caps it near 10k req/s.
    echo 'function delay() return 1 end' >"$TMP/pace.lua"
    new_table 4
    row endpoints "req/s" "p50 ms" "p99 ms" "RSS idle MiB" "max RSS MiB (VmHWM)" "proxy CPU s" "proxy CPU us/req" "max/mean share" "backends used" "wrk errors"
    for eps in "$small" "$n"; do
        start_ballast "$(backend_list "$eps")"
        local idle
        idle=$(mib "$(proc_kib "$PROXY_PID" VmRSS)")
        backend_counts "$eps" >"$TMP/before"
        measure "s4-ballast-$eps" 2 "$conns" -s "$TMP/pace.lua"
        backend_counts "$eps" >"$TMP/after"
        curl -s --max-time 2 "http://$BALLAST_ADMIN/endpoints" >"$OUT/s4-ballast-$eps.endpoints.json" || true
        stop_proxy
        count_deltas "$TMP/before" "$TMP/after" >"$OUT/s4-ballast-$eps.counts"
        local total mx mn share used
        read -r total mx mn share used < <(share_stats "$OUT/s4-ballast-$eps.counts")
        row "$eps" "$WRK_RPS" "$(calc "$WRK_P50" 3)" "$(calc "$WRK_P99" 3)" "$idle" "$RSS_MIB" "$CPU_S" "$CPU_US_REQ" "$mx" "$used/$eps" "$WRK_ERRS"
    done
    stop_backends
    print_table "$TABLE"
    say ""
    say "Both rows use the same backends (the $small-endpoint row uses the first $small), so the RSS difference is the cost of the extra endpoints."
}

# ------------------------------------------------------------- section 5 --
section_access_log() {
    local n=4 name
    say ""
    say "## 5. Access log and affinity vs the plain proxy (4 backends, 0 ms; wrk -t2 -c32 keep-alive)"
    say ""
    start_backends "$n" 0
    declare -A rps p50 p99 cpureq errs
    for name in off on affinity; do
        case $name in
            on) start_ballast "$(backend_list "$n")" --access-log "$TMP/access.log" ;;
            # wrk sends from one IP: one hot key, spread over the pods by the load bound.
            affinity) start_ballast "$(backend_list "$n")" --affinity client-ip ;;
            *) start_ballast "$(backend_list "$n")" ;;
        esac
        measure "s5-log-$name" 2 32
        stop_proxy
        rps[$name]=$WRK_RPS p50[$name]=$WRK_P50 p99[$name]=$WRK_P99 cpureq[$name]=$CPU_US_REQ errs[$name]=$WRK_ERRS
    done
    stop_backends
    local lines
    lines=$(wc -l <"$TMP/access.log" 2>/dev/null || echo 0)
    new_table 5
    row "variant" "req/s" "req/s vs plain" "p50 ms" "p99 ms" "proxy CPU us/req" "log lines written" "wrk errors"
    for name in off on affinity; do
        row "$name" "${rps[$name]}" "$(calc "${rps[$name]} / ${rps[off]}")" "$(calc "${p50[$name]}" 3)" \
            "$(calc "${p99[$name]}" 3)" "${cpureq[$name]}" "$([[ $name == on ]] && echo "$lines" || echo -)" "${errs[$name]}"
    done
    print_table "$TABLE"
}

# ------------------------------------------------------------- section 6 --
# Streaming: large request/response bodies over HTTP/1.1, and bidirectional gRPC streams
# over h2c, with proxies configured to stream (not buffer) both.
S6_CLIENTS=8             # upload/download clients, one keep-alive connection each
S6_BODY=$((32 << 20))    # bytes per upload/download: 8 x 32 MiB = 256 MiB in flight per round of requests
S6_STREAMS=32            # concurrent gRPC calls
S6_CONNS=4               # HTTP/2 connections they share
S6_MESSAGES=1000         # messages per call, at most
S6_WINDOW=4              # messages per stream awaiting their echo
S6_MSG_BYTES=64          # payload per message
S6_STALL=3s              # no progress for this long: stalled, not waited for

# start_nginx_streaming MODE(http|grpc) ADDR: nginx in front of backend 1, streaming.
start_nginx_streaming() {
    local mode=$1 d=$TMP/nginx-s6-$1 i
    require_free "$NGINX_ADDR"
    mkdir -p "$d/tmp"
    {
        echo "worker_processes $NPROC;"
        echo "pid $d/nginx.pid;"
        echo "error_log $LOGS/nginx-s6-error.log warn;"
        echo "events { worker_connections 4096; }"
        echo "http {"
        echo "  access_log off;"
        echo "  keepalive_requests 1000000;"
        echo "  client_max_body_size 0;"
        for i in client_body proxy fastcgi uwsgi scgi; do echo "  ${i}_temp_path $d/tmp/$i;"; done
        echo "  upstream backends {"
        echo "    server $(backend_ip 1):$BACKEND_PORT;"
        echo "    keepalive 64;"
        echo "    keepalive_requests 1000000;"
        echo "  }"
        echo "  server {"
        if [[ $mode == grpc ]]; then
            # nginx 1.22 syntax; from 1.25.1 on it is `http2 on;` (the old form still works, with a warning).
            echo "    listen $NGINX_ADDR http2;"
            echo "    location / { grpc_pass grpc://backends; }"
        else
            echo "    listen $NGINX_ADDR;"
            echo "    location / {"
            echo "      proxy_pass http://backends;"
            echo "      proxy_http_version 1.1;"
            echo "      proxy_set_header Connection \"\";"
            echo "      proxy_request_buffering off;"
            echo "      proxy_buffering off;"
            echo "    }"
        fi
        echo "  }"
        echo "}"
    } >"$d/nginx.conf"
    cp "$d/nginx.conf" "$LOGS/nginx-s6-$mode.conf"
    nginx -e "$LOGS/nginx-s6-error.log" -p "$d" -c "$d/nginx.conf" -g 'daemon off;' >>"$LOGS/nginx.log" 2>&1 &
    PROXY_PID=$!
    track "$PROXY_PID"
    local h2=
    [[ $mode == http ]] || h2=--http2-prior-knowledge
    wait_http "http://$NGINX_ADDR/healthz" 10 "$PROXY_PID" "$h2" || die "nginx not ready; see $LOGS/nginx-s6-error.log"
    TARGET_URL=http://$NGINX_ADDR
}

# start_haproxy_streaming MODE(http|grpc): haproxy mode http in front of backend 1;
# grpc: h2 (prior knowledge) on both sides.
start_haproxy_streaming() {
    local mode=$1 cfg=$TMP/haproxy-s6-$1.cfg h2=
    require_free "$HAPROXY_ADDR"
    [[ $mode == http ]] || h2=" proto h2"
    {
        echo "global"
        echo "  nbthread $NPROC"
        echo "  maxconn 2000"
        echo "defaults"
        echo "  mode http"
        echo "  timeout connect 1s"
        echo "  timeout client 60s"
        echo "  timeout server 60s"
        echo "  option http-keep-alive"
        echo "  http-reuse always"
        echo "frontend fe"
        echo "  bind $HAPROXY_ADDR$h2"
        echo "  default_backend be"
        echo "backend be"
        echo "  server b1 $(backend_ip 1):$BACKEND_PORT$h2"
    } >"$cfg"
    cp "$cfg" "$LOGS/"
    haproxy -db -f "$cfg" >>"$LOGS/haproxy.log" 2>&1 &
    PROXY_PID=$!
    track "$PROXY_PID"
    [[ -z $h2 ]] || h2=--http2-prior-knowledge
    wait_http "http://$HAPROXY_ADDR/healthz" 10 "$PROXY_PID" "$h2" || die "haproxy not ready; see $LOGS/haproxy.log"
    TARGET_URL=http://$HAPROXY_ADDR
}

# start_streaming_target NAME MODE(http|grpc): sets PROXY_PID (empty for direct) and TARGET_URL (no slash).
start_streaming_target() {
    case $1 in
        direct) PROXY_PID=; TARGET_URL=http://$(backend_ip 1):$BACKEND_PORT ;;
        ballast)
            if [[ $2 == grpc ]]; then
                start_ballast "$(backend_list 1)" --backend-protocol h2c
            else
                start_ballast "$(backend_list 1)"
            fi
            TARGET_URL=${TARGET_URL%/}
            ;;
        nginx) start_nginx_streaming "$2" ;;
        haproxy) start_haproxy_streaming "$2" ;;
    esac
}

# run_stream NAME stream_load-ARGS...: runs the load tool against the current proxy.
# Sets S_VALUE (MB/s or messages/s), S_AMOUNT (bytes or messages), S_ERRS, S_STALLED,
# S_CALLS, S_CPU_S (proxy CPU seconds, or -) and S_RSS (proxy VmHWM MiB, or -).
run_stream() {
    local name=$1 raw=$OUT/$1.txt t0=0 t1 line secs
    shift
    secs=$(dur_seconds "$DURATION")
    log "stream_load $*  ($name)"
    [[ -z $PROXY_PID ]] || t0=$(cpu_ticks "$PROXY_PID")
    timeout --signal=INT $((secs + 40)) "$LOAD_BIN" "$@" --duration "${secs}s" \
        --stall-timeout "$S6_STALL" >"$raw" 2>&1 || true
    line=$(grep '^result ' "$raw" | tail -1 || true)
    S_VALUE=$(s6_field "$line" mb_per_s)
    [[ -n $S_VALUE ]] || S_VALUE=$(s6_field "$line" msgs_per_s)
    S_AMOUNT=$(s6_field "$line" bytes)
    [[ -n $S_AMOUNT ]] || S_AMOUNT=$(s6_field "$line" messages)
    S_ERRS=$(s6_field "$line" errors) S_STALLED=$(s6_field "$line" stalled) S_CALLS=$(s6_field "$line" calls)
    S_CPU_S=- S_RSS=-
    if [[ -n $PROXY_PID ]]; then
        t1=$(cpu_ticks "$PROXY_PID")
        S_CPU_S=$(calc "($t1 - $t0) / $CLK_TCK" 2)
        S_RSS=$(mib "$(proc_kib "$PROXY_PID" VmHWM)")
    fi
    if [[ -z $line ]]; then
        log "stream_load failed for $name; see $raw"
        S_VALUE=0 S_AMOUNT=0 S_ERRS=failed S_STALLED=0 S_CALLS=0
    fi
}

# s6_notes "r1: ...; r2: ...; " -> without the last "; ", or "none"
s6_notes() { local v=${1%; }; echo "${v:-none}"; }

# s6_field RESULT_LINE KEY: the value of KEY=value in stream_load's result line.
s6_field() { sed -n "s/.* $2=\([^ ]*\).*/\1/p" <<<"$1"; }

# s6_note ERRS STALLED OF -> "none", "errors=3", "stalled 32/32", ...
s6_note() {
    local out=()
    [[ $1 == 0 ]] || out+=("errors=$1")
    [[ $2 == 0 ]] || out+=("stalled $2/$3")
    ((${#out[@]})) || out=(none)
    echo "${out[*]}"
}

section_streaming() {
    local name round i t
    local targets=(direct ballast haproxy nginx)
    say ""
    say "## 6. Streaming: large bodies and gRPC bidi streams (1 backend; medians of $ROUNDS rounds)"
    say ""
    say "Upload: $S6_CLIENTS clients, one keep-alive HTTP/1.1 connection each, POSTing $((S6_BODY >> 20)) MiB bodies"
    say "(content-length, 64 KiB writes; $((S6_CLIENTS * S6_BODY >> 20)) MiB in flight) for $DURATION; the backend counts"
    say "each body as it streams in without keeping it and answers the count, checked by the client."
    say "Download: the same clients GET \`/download?bytes=$S6_BODY\`, streamed by the backend."
    say "gRPC: $S6_STREAMS concurrent \`Echo/Stream\` calls over $S6_CONNS h2c connections (tonic), each sending up to"
    say "$S6_MESSAGES messages of $S6_MSG_BYTES bytes with at most $S6_WINDOW awaiting their echo, the next one sent as each echo"
    say "arrives, a new call when one ends. No progress for $S6_STALL: that stream or client is *stalled* and stops."
    say ""
    start_backends 1 0
    declare -A up down grpc upcpu downcpu grpccpu uprss downrss grpcrss notes calls upbytes downbytes msgs
    for ((round = 1; round <= ROUNDS; round++)); do
        for ((i = 0; i < ${#targets[@]}; i++)); do
            name=${targets[(i + round - 1) % ${#targets[@]}]}
            for t in upload download; do
                start_streaming_target "$name" http
                if [[ $t == upload ]]; then
                    run_stream "s6-$name-upload-r$round" upload --url "$TARGET_URL/upload" \
                        --clients "$S6_CLIENTS" --body-bytes "$S6_BODY"
                else
                    run_stream "s6-$name-download-r$round" download --url "$TARGET_URL/download?bytes=$S6_BODY" \
                        --clients "$S6_CLIENTS" --body-bytes "$S6_BODY"
                fi
                [[ -z $PROXY_PID ]] || stop_proxy
                if [[ $t == upload ]]; then
                    up[$name]+=" $S_VALUE" upcpu[$name]+=" $S_CPU_S" upbytes[$name]+=" $S_AMOUNT"
                    uprss[$name]=$(max_of "${uprss[$name]:-}" "$S_RSS")
                else
                    down[$name]+=" $S_VALUE" downcpu[$name]+=" $S_CPU_S" downbytes[$name]+=" $S_AMOUNT"
                    downrss[$name]=$(max_of "${downrss[$name]:-}" "$S_RSS")
                fi
                [[ $S_ERRS == 0 && $S_STALLED == 0 ]] ||
                    notes[$name-$t]+="r$round: $(s6_note "$S_ERRS" "$S_STALLED" "$S6_CLIENTS"); "
            done
            start_streaming_target "$name" grpc
            run_stream "s6-$name-grpc-r$round" grpc --url "$TARGET_URL" --streams "$S6_STREAMS" \
                --connections "$S6_CONNS" --messages "$S6_MESSAGES" --window "$S6_WINDOW" \
                --message-bytes "$S6_MSG_BYTES"
            [[ -z $PROXY_PID ]] || stop_proxy
            grpc[$name]+=" $S_VALUE" grpccpu[$name]+=" $S_CPU_S" msgs[$name]+=" $S_AMOUNT"
            calls[$name]=$((${calls[$name]:-0} + ${S_CALLS:-0}))
            grpcrss[$name]=$(max_of "${grpcrss[$name]:-}" "$S_RSS")
            [[ $S_ERRS == 0 && $S_STALLED == 0 ]] ||
                notes[$name-grpc]+="r$round: $(s6_note "$S_ERRS" "$S_STALLED" "$S6_STREAMS"); "
        done
    done
    stop_backends

    declare -A mup mdown mgrpc
    # shellcheck disable=SC2086 # one value per round, split on purpose
    for name in "${targets[@]}"; do
        mup[$name]=$(median ${up[$name]})
        mdown[$name]=$(median ${down[$name]})
        mgrpc[$name]=$(median ${grpc[$name]})
    done
    new_table 6a
    row target "upload MB/s" "per round" "vs haproxy" "vs nginx" "download MB/s" "per round" "vs haproxy" "vs nginx" \
        "proxy CPU s/GB up" "proxy CPU s/GB down" "peak RSS MiB up" "peak RSS MiB down" "errors / stalled"
    for name in "${targets[@]}"; do
        local label="$name (defaults)"
        [[ $name != direct ]] || label="direct ($(backend_ip 1))"
        [[ $name != nginx ]] || label="nginx (request_buffering off, buffering off)"
        [[ $name != haproxy ]] || label="haproxy (mode http)"
        row "$label" "${mup[$name]}" "$(slashed "${up[$name]}")" \
            "$(ratio "${mup[$name]}" "${mup[haproxy]}")" "$(ratio "${mup[$name]}" "${mup[nginx]}")" \
            "${mdown[$name]}" "$(slashed "${down[$name]}")" \
            "$(ratio "${mdown[$name]}" "${mdown[haproxy]}")" "$(ratio "${mdown[$name]}" "${mdown[nginx]}")" \
            "$(per_unit "${upcpu[$name]}" "${upbytes[$name]}" 1e9 2)" \
            "$(per_unit "${downcpu[$name]}" "${downbytes[$name]}" 1e9 2)" \
            "${uprss[$name]}" "${downrss[$name]}" \
            "up: $(s6_notes "${notes[$name-upload]:-}"); down: $(s6_notes "${notes[$name-download]:-}")"
    done
    say "### 6a. Large bodies over HTTP/1.1 (MB = 10^6 bytes)"
    say ""
    print_table "$TABLE"
    say ""
    say "nginx runs with \`proxy_request_buffering off; proxy_buffering off; proxy_http_version 1.1;\` and"
    say "\`client_max_body_size 0\`, so it streams both ways instead of spooling bodies to disk; haproxy \`mode http\`"
    say "streams by default; ballast with its defaults. CPU s/GB: the proxy's CPU time (user + system) over the bytes"
    say "moved, summed over the rounds. Peak RSS: VmHWM (nginx: master + workers), the highest of the rounds, each"
    say "round a fresh process."
    say ""

    new_table 6b
    row target "messages/s" "per round" "vs haproxy" "vs nginx" "proxy CPU us/msg" "peak RSS MiB" "calls completed" "errors / stalled"
    for name in "${targets[@]}"; do
        local label=$name
        [[ $name != direct ]] || label="direct ($(backend_ip 1), h2c)"
        [[ $name != ballast ]] || label="ballast (--backend-protocol h2c)"
        [[ $name != nginx ]] || label="nginx (listen http2, grpc_pass)"
        [[ $name != haproxy ]] || label="haproxy (mode http, proto h2 both sides)"
        row "$label" "${mgrpc[$name]}" "$(slashed "${grpc[$name]}")" \
            "$(ratio "${mgrpc[$name]}" "${mgrpc[haproxy]}")" "$(ratio "${mgrpc[$name]}" "${mgrpc[nginx]}")" \
            "$(per_unit "${grpccpu[$name]}" "${msgs[$name]}" 1e6 1)" "${grpcrss[$name]}" "${calls[$name]}" \
            "$(s6_notes "${notes[$name-grpc]:-}")"
    done
    say "### 6b. gRPC bidi streaming (Echo/Stream, h2c end to end)"
    say ""
    print_table "$TABLE"
    say ""
    say "A message counts when its echo is back at the client. *stalled N/$S6_STREAMS*: N streams got no echo for"
    say "$S6_STALL (a proxy that holds the request back until the body ends, or until it has some KiB of it, never"
    say "answers a ping-pong) and were abandoned; their rate is 0."
}

# max_of A B: the larger number, ignoring empty or "-" values ("-" if neither is a number).
max_of() {
    awk -v a="$1" -v b="$2" 'BEGIN {
        na = (a ~ /^[0-9.]+$/); nb = (b ~ /^[0-9.]+$/)
        if (!na && !nb) print "-"; else if (!nb || (na && a + 0 >= b + 0)) print a; else print b }'
}
# slashed " V1 V2 V3" -> V1/V2/V3
slashed() { local v=${1# }; echo "${v// //}"; }
# ratio A B: A / B with two decimals, "-" when B is 0.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0) print "-"; else printf "%.2f\n", a / b }'; }
# per_unit "CPU_S..." "AMOUNT..." SCALE DECIMALS: sum(CPU) / (sum(AMOUNT) / SCALE) ("-" without CPU or amount).
per_unit() {
    awk -v c="$1" -v n="$2" -v s="$3" -v d="$4" 'BEGIN {
        k = split(c, cs, " "); split(n, ns, " "); tc = 0; tn = 0
        for (i = 1; i <= k; i++) { if (cs[i] == "-") { print "-"; exit } tc += cs[i]; tn += ns[i] }
        if (k == 0 || tn == 0) { print "-"; exit }
        printf "%." d "f\n", tc / (tn / s) }'
}

# ------------------------------------------------------------------ main --
header
want 1 && section_throughput
want 2 && section_balance
want 3 && section_slow
want 4 && section_memory
want 5 && section_access_log
want 6 && section_streaming
say ""
log "summary written to ${SUMMARY#"$ROOT"/}"
