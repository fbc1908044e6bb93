#!/usr/bin/env bash
# Benchmark ballast-proxy against direct access, nginx and haproxy on loopback.
#
#   bash bench/proxy.sh [--duration 10s] [--rounds 3] [--quick] [--sections 1,2,3,4,5] [--no-build]
#
# Every process this script starts is a child it stops by PID on exit (also on
# failure or Ctrl-C). All traffic stays on 127.0.0.0/8. Raw wrk output and
# process logs go to bench/out/<timestamp>/; see bench/README.md.
set -euo pipefail

# ---------------------------------------------------------------- settings --
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=lib.sh
source "$ROOT/bench/lib.sh"
DURATION=10s
DURATION_SET=0
QUICK=0
SECTIONS=1,2,3,4,5
BUILD=1
ROUNDS=3
ROUNDS_SET=0

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }
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

PROXY_BIN=$ROOT/target/release/ballast-proxy
APP_BIN=$ROOT/target/release/ballast-sample-app
FLOOR_BIN=$ROOT/target/release/examples/hyper_floor
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

wait_http() { # url timeout_s [pid]
    local url=$1 deadline=$((SECONDS + $2)) pid=${3:-}
    until curl -sf -o /dev/null --max-time 1 "$url"; do
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
        cargo build --release -q -p ballast-proxy --example hyper_floor)
fi
[[ -x $PROXY_BIN && -x $APP_BIN && -x $FLOOR_BIN ]] || die "missing $PROXY_BIN, $APP_BIN or $FLOOR_BIN (build them)"
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

# ------------------------------------------------------------------ main --
header
want 1 && section_throughput
want 2 && section_balance
want 3 && section_slow
want 4 && section_memory
want 5 && section_access_log
say ""
log "summary written to ${SUMMARY#"$ROOT"/}"
