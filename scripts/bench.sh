#!/usr/bin/env bash
# Compares redis-raft with plain Redis, and measures failover.
#
#   scripts/bench.sh                 N=100000 requests per test
#   N=20000 scripts/bench.sh         a quicker run
#   READS=0 scripts/bench.sh         the write path and failover only
#
# Runs redis-benchmark (50 clients, 100-byte values, random keys out of 100000, --csv) for
# SET and GET at pipeline 1 and 16 against, one after the other (the machine may have few
# cores, so nothing else runs during a measurement):
#   plain  a redis-server without the module
#   raft   the leader of a fresh 3-node cluster with raft.log-fsync yes, then of another
#          fresh one with raft.log-fsync no
# then prints one table. With the fsync=yes cluster it also measures failover: SIGKILL the
# leader, then SET on the other nodes (following -MOVED, else trying each node every 10 ms)
# until one is accepted, and print the milliseconds from the kill to that write.
#
# Then (unless READS=0) the read path: GET only, same clients, -n, -r, -d and pipelines,
# after every one of the 100000 keys redis-benchmark picks from (key:000000000000 ...) has
# been set to a 100-byte value (MSETs of 100 keys through redis-cli --pipe), so every GET
# hits. Against a fresh plain redis-server, then against a fresh 3-node cluster (fsync yes)
# per read mode, because raft.read-mode is fixed at start:
#   linearizable  the leader, raft.read-mode left at its default (ReadIndex)
#   lease         the leader, --raft.read-mode lease
#   stale         the leader, --raft.read-mode stale
#   follower      a follower of a cluster with --raft.follower-reads yes (linearizable)
# and prints a second table. A run during which the node answered any error, missed a key
# or changed role is flagged under that table.
#
# Everything runs in a temp dir on free ports of 127.0.0.1, and every process the script
# started is killed on exit, whatever the exit. Environment: N (100000), CLIENTS (50),
# BENCH_TIMEOUT_S (300, per redis-benchmark run and per key load), FAILOVER_TIMEOUT_S (30),
# READS (1; 0 skips the read section), SKIP_BUILD=1 (use target/release as it is),
# KEEP_TMP=1 (keep the temp dir and its logs; it is also kept when the script fails).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

N="${N:-100000}"
CLIENTS="${CLIENTS:-50}"
BENCH_TIMEOUT_S="${BENCH_TIMEOUT_S:-300}"
FAILOVER_TIMEOUT_S="${FAILOVER_TIMEOUT_S:-30}"
READS="${READS:-1}"
LEADER_TIMEOUT_S=30
NODE_START_TIMEOUT_S=10
CLUSTER_NODES=3
VALUE_BYTES=100
KEYSPACE=100000
PIPELINES=(1 16)
TESTS=(SET GET)
READ_MODES=(linearizable lease stale follower)
MSET_KEYS=100
HOST=127.0.0.1
BUS_PORT_OFFSET=10000
MODULE="$ROOT/target/release/libredis_raft.so"

for v in N CLIENTS BENCH_TIMEOUT_S FAILOVER_TIMEOUT_S; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || {
        echo "bench.sh: $v must be a positive integer, not '${!v}'" >&2
        exit 2
    }
done
[[ "$READS" == 0 || "$READS" == 1 ]] || {
    echo "bench.sh: READS must be 0 or 1, not '$READS'" >&2
    exit 2
}

TMP="$(mktemp -d "${TMPDIR:-/tmp}/redis-raft-bench.XXXXXX")"
STARTED_PIDS=()
OK=0

log() { echo "bench.sh: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# True if $1 is still a redis-server (and not a pid reused by something else since).
is_redis_pid() {
    kill -0 "$1" 2>/dev/null || return 1
    [[ ! -r "/proc/$1/cmdline" ]] || grep -q redis-server "/proc/$1/cmdline" 2>/dev/null
}

kill_pids() {
    local pid waited
    for pid in "$@"; do
        if is_redis_pid "$pid"; then kill -TERM "$pid" 2>/dev/null || true; fi
    done
    for ((waited = 0; waited < 30; waited++)); do
        local alive=0
        for pid in "$@"; do
            if is_redis_pid "$pid"; then alive=1; fi
        done
        ((alive)) || return 0
        sleep 0.1
    done
    for pid in "$@"; do
        if is_redis_pid "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    done
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local f
    for f in "$TMP"/*/redis.pid "$TMP"/*/*/redis.pid; do
        if [[ -s "$f" ]]; then STARTED_PIDS+=("$(tr -dc '0-9' <"$f")"); fi
    done
    if ((${#STARTED_PIDS[@]})); then kill_pids "${STARTED_PIDS[@]}"; fi
    if ((OK)) && [[ "${KEEP_TMP:-0}" != 1 ]]; then
        rm -rf -- "$TMP"
    else
        log "logs kept in $TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cli() {
    local port=$1
    shift
    timeout 3 redis-cli -h "$HOST" -p "$port" "$@" 2>/dev/null | tr -d '\r'
}

port_busy() {
    timeout 1 bash -c "exec 3<>/dev/tcp/$HOST/$1" 2>/dev/null
}

# The lowest port of the kernel's ephemeral range (outgoing connections take ports from
# there, so a server port or bus port in it can be taken between our check and the bind).
EPHEMERAL_LOW="$(awk '{ print $1 }' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || true)"
[[ "$EPHEMERAL_LOW" =~ ^[1-9][0-9]*$ ]] || EPHEMERAL_LOW=32768

# Prints the first of $1 consecutive ports, from a random start, that are free together
# with their bus ports (+10000), all of them from 10000 up to below the ephemeral range.
# Bounded: 200 tries.
free_ports() {
    local count=$1 try base p ok lo=10000 slots
    slots=$(((EPHEMERAL_LOW - BUS_PORT_OFFSET - count - lo) / 10))
    ((slots > 0)) ||
        die "the ephemeral port range starts at $EPHEMERAL_LOW: no room below it for ports from $lo and their bus ports (+$BUS_PORT_OFFSET)"
    for ((try = 0; try < 200; try++)); do
        base=$((lo + (RANDOM % slots) * 10))
        ok=1
        for ((p = base; p < base + count; p++)); do
            if port_busy "$p" || port_busy $((p + BUS_PORT_OFFSET)); then
                ok=0
                break
            fi
        done
        if ((ok)); then
            echo "$base"
            return 0
        fi
    done
    die "found no $count free consecutive ports between $lo and $((lo + slots * 10))"
}

# Starts redis-server with the given arguments in dir $1 and waits for PONG. Prints its pid
# (callers record it; cleanup also finds servers by their pidfiles, in case one started
# but never answered).
start_server() {
    local dir=$1 port=$2 pid out deadline
    shift 2
    mkdir -p "$dir"
    out="$(redis-server --port "$port" --bind "$HOST" --dir "$dir" --save '' --appendonly no \
        --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" "$@" 2>&1)" ||
        die "redis-server on port $port did not start: $out"
    deadline=$((SECONDS + NODE_START_TIMEOUT_S))
    until [[ -s "$dir/redis.pid" ]] && [[ "$(cli "$port" PING)" == PONG ]]; do
        if ((SECONDS >= deadline)); then
            log "redis-server on port $port did not answer PING in ${NODE_START_TIMEOUT_S}s; last lines of $dir/redis.log:"
            tail -n 15 "$dir/redis.log" >&2 || true
            exit 1
        fi
        sleep 0.1
    done
    pid="$(tr -dc '0-9' <"$dir/redis.pid")"
    echo "$pid"
}

# Globals describing the current cluster, set by start_cluster.
C_PORTS=()
C_PIDS=()
C_DIR=""
LEADER_PORT=""

# Starts a fresh 3-node cluster with raft.log-fsync $1 in $TMP/$2 (default raft-fsync-$1),
# passing any further arguments to every node's redis-server, and waits until every node
# names the same single leader (sets LEADER_PORT).
start_cluster() {
    local fsync=$1 name=${2:-raft-fsync-$1} base i nodes="" sep="" port
    shift
    if (($#)); then shift; fi
    local extra=("$@")
    base="$(free_ports "$CLUSTER_NODES")"
    C_DIR="$TMP/$name"
    C_PORTS=()
    C_PIDS=()
    for ((i = 1; i <= CLUSTER_NODES; i++)); do
        port=$((base + i - 1))
        C_PORTS+=("$port")
        nodes+="${sep}n$i=$HOST:$port"
        sep=","
    done
    for ((i = 1; i <= CLUSTER_NODES; i++)); do
        port="${C_PORTS[i - 1]}"
        local pid
        pid="$(start_server "$C_DIR/node$i" "$port" --loadmodule "$MODULE" \
            --raft.node-id "n$i" --raft.cluster-nodes "$nodes" --raft.log-fsync "$fsync" \
            ${extra[@]+"${extra[@]}"})"
        STARTED_PIDS+=("$pid")
        C_PIDS+=("$pid")
    done
    local deadline=$((SECONDS + LEADER_TIMEOUT_S)) leaders leader_port addr first agree
    while :; do
        leaders=0 leader_port="" agree=1 first=""
        for ((i = 0; i < CLUSTER_NODES; i++)); do
            local info
            info="$(cli "${C_PORTS[i]}" INFO raft)"
            if [[ "$(sed -n 's/^raft_role://p' <<<"$info")" == leader ]]; then
                leaders=$((leaders + 1))
                leader_port="${C_PORTS[i]}"
            fi
            addr="$(sed -n 's/^raft_leader_addr://p' <<<"$info")"
            if ((i == 0)); then first=$addr; fi
            if [[ -z "$addr" || "$addr" != "$first" ]]; then agree=0; fi
        done
        if ((leaders == 1 && agree)) && [[ "$first" == "$HOST:$leader_port" ]]; then
            break
        fi
        ((SECONDS < deadline)) ||
            die "the $name cluster (ports ${C_PORTS[*]}) agreed on no leader in ${LEADER_TIMEOUT_S}s; logs in $C_DIR"
        sleep 0.2
    done
    LEADER_PORT=$leader_port
    local got
    got="$(cli "$LEADER_PORT" INFO raft | sed -n 's/^raft_log_fsync://p')"
    [[ "$got" == "$fsync" ]] || die "the leader reports raft_log_fsync:$got, wanted $fsync"
    log "raft cluster $name (fsync=$fsync${extra[*]+ ${extra[*]}}) on ports ${C_PORTS[*]}: leader $HOST:$LEADER_PORT"
}

# Results, keyed "target,TEST,pipeline": ops/s, p50 ms, p99 ms.
declare -A RPS P50 P99

# Runs redis-benchmark -t $4 (set,get or get) at pipeline $3 against port $2, storing the
# results under target $1.
run_benchmark() {
    local target=$1 port=$2 pipe=$3 tests=$4 csv test rps p50 p99
    log "$target: redis-benchmark -c $CLIENTS -n $N -r $KEYSPACE -d $VALUE_BYTES -P $pipe -t $tests"
    csv="$TMP/bench-$target-P$pipe.csv"
    if ! timeout "$BENCH_TIMEOUT_S" redis-benchmark -h "$HOST" -p "$port" -c "$CLIENTS" -n "$N" \
        -r "$KEYSPACE" -d "$VALUE_BYTES" -P "$pipe" -t "$tests" --csv >"$csv" 2>"$csv.err"; then
        log "$target P$pipe: redis-benchmark failed or passed ${BENCH_TIMEOUT_S}s (see $csv.err)"
    fi
    # "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    while IFS=, read -r test rps _ _ p50 _ p99 _; do
        test="${test//\"/}"
        [[ " ${TESTS[*]} " == *" $test "* ]] || continue
        RPS["$target,$test,$pipe"]="${rps//\"/}"
        P50["$target,$test,$pipe"]="${p50//\"/}"
        P99["$target,$test,$pipe"]="${p99//\"/}"
    done <"$csv"
}

# Runs redis-benchmark for SET and GET at each pipeline against port $2, storing results
# under target $1.
bench() {
    local pipe
    for pipe in "${PIPELINES[@]}"; do
        run_benchmark "$1" "$2" "$pipe" set,get
    done
}

# The value of field $3 in section $2 of INFO on port $1 (empty if there is none).
info_field() {
    cli "$1" INFO "$2" | sed -n "s/^$3://p"
}

# Dies unless CONFIG GET $2 on port $1 answers $3.
check_config() {
    local got
    got="$(cli "$1" CONFIG GET "$2" | sed -n 2p)"
    [[ "$got" == "$3" ]] || die "$HOST:$1 has $2 '$got', wanted '$3'"
}

# Sets every key redis-benchmark -r $KEYSPACE can pick (key:000000000000 ...) to a
# $VALUE_BYTES-byte value, in MSETs of $MSET_KEYS keys piped through redis-cli --pipe to
# port $1, then waits until port $2 (default $1) answers DBSIZE $KEYSPACE.
load_keys() {
    local port=$1 check=${2:-$1} out deadline size=""
    log "loading $KEYSPACE keys of $VALUE_BYTES bytes through $HOST:$port"
    out="$(awk -v n="$KEYSPACE" -v d="$VALUE_BYTES" -v b="$MSET_KEYS" 'BEGIN {
            v = ""
            for (i = 0; i < d; i++) v = v "x"
            for (i = 0; i < n; i += b) {
                m = (n - i < b) ? n - i : b
                printf "*%d\r\n$4\r\nMSET\r\n", 1 + 2 * m
                for (j = i; j < i + m; j++) {
                    k = sprintf("key:%012d", j)
                    printf "$%d\r\n%s\r\n$%d\r\n%s\r\n", length(k), k, d, v
                }
            }
        }' | timeout "$BENCH_TIMEOUT_S" redis-cli -h "$HOST" -p "$port" --pipe 2>&1)" ||
        die "loading the keys through $HOST:$port failed or passed ${BENCH_TIMEOUT_S}s: $out"
    [[ "$out" == *"errors: 0, replies: "* ]] || die "loading the keys through $HOST:$port: $out"
    deadline=$((SECONDS + BENCH_TIMEOUT_S))
    until size="$(cli "$check" DBSIZE)" && [[ "$size" == "$KEYSPACE" ]]; do
        ((SECONDS < deadline)) ||
            die "$HOST:$check holds ${size:-?} keys ${BENCH_TIMEOUT_S}s after the load, wanted $KEYSPACE"
        sleep 0.2
    done
}

# Notes printed under the reads table (errors, misses, role changes during a run).
READ_NOTES=()

# Runs the GET benchmark at each pipeline against port $2, storing results under target
# reads-$1, and notes any error reply, keyspace miss or role change on that node meanwhile.
bench_reads() {
    local mode=$1 port=$2 pipe e0 e1 h0 h1 m0 m1 r0 r1
    for pipe in "${PIPELINES[@]}"; do
        e0="$(info_field "$port" stats total_error_replies)"
        h0="$(info_field "$port" stats keyspace_hits)"
        m0="$(info_field "$port" stats keyspace_misses)"
        r0="$(info_field "$port" raft raft_role)"
        run_benchmark "reads-$mode" "$port" "$pipe" get
        e1="$(info_field "$port" stats total_error_replies)"
        h1="$(info_field "$port" stats keyspace_hits)"
        m1="$(info_field "$port" stats keyspace_misses)"
        r1="$(info_field "$port" raft raft_role)"
        log "reads-$mode P$pipe: $((${h1:-0} - ${h0:-0})) hits, $((${m1:-0} - ${m0:-0})) misses, $((${e1:-0} - ${e0:-0})) error replies${r0:+, role $r0 -> $r1}"
        if [[ -z "$e0" || -z "$e1" || -z "$m0" || -z "$m1" ]]; then
            READ_NOTES+=("$mode P$pipe: could not read INFO stats from $HOST:$port before and after the run")
        else
            if ((e1 > e0)); then READ_NOTES+=("$mode P$pipe: $((e1 - e0)) error replies during the run (see $TMP/bench-reads-$mode-P$pipe.csv.err)"); fi
            if ((m1 > m0)); then READ_NOTES+=("$mode P$pipe: $((m1 - m0)) GETs missed their key"); fi
        fi
        if [[ "$r0" != "$r1" ]]; then READ_NOTES+=("$mode P$pipe: the node's role changed from '$r0' to '$r1' during the run"); fi
    done
}

# The reads section: plain, then one fresh cluster per read mode.
run_reads() {
    local base pid mode port follower="" got
    base="$(free_ports 1)"
    pid="$(start_server "$TMP/reads-plain" "$base")"
    STARTED_PIDS+=("$pid")
    log "reads: plain redis-server on port $base"
    load_keys "$base"
    bench_reads plain "$base"
    kill_pids "$pid"

    for mode in "${READ_MODES[@]}"; do
        case $mode in
        linearizable) start_cluster yes "reads-$mode" ;;
        lease | stale) start_cluster yes "reads-$mode" --raft.read-mode "$mode" ;;
        follower) start_cluster yes "reads-$mode" --raft.follower-reads yes ;;
        *) die "unknown read mode $mode" ;;
        esac
        port=$LEADER_PORT
        if [[ $mode == follower ]]; then
            follower=""
            for port in "${C_PORTS[@]}"; do
                if [[ "$port" != "$LEADER_PORT" ]]; then
                    follower=$port
                    break
                fi
            done
            port=$follower
            [[ "$(info_field "$port" raft raft_role)" == follower ]] ||
                die "$HOST:$port, picked as the follower, is not one"
            check_config "$port" raft.follower-reads yes
            check_config "$port" raft.read-mode linearizable
        else
            check_config "$port" raft.read-mode "$mode"
        fi
        load_keys "$LEADER_PORT" "$port"
        got="$(cli "$port" GET key:000000000000)"
        [[ ${#got} == "$VALUE_BYTES" ]] ||
            die "reads-$mode: GET key:000000000000 on $HOST:$port answered '$got', not a $VALUE_BYTES-byte value"
        log "reads-$mode: benchmarking $HOST:$port ($(info_field "$port" raft raft_role))"
        bench_reads "$mode" "$port"
        kill_pids "${C_PIDS[@]}"
    done
}

FAILOVER_MS=""
FAILOVER_TO=""

# SIGKILLs the current cluster's leader and times the first write another node accepts.
measure_failover() {
    local killed_pid="" i n=${#C_PORTS[@]} target reply start_ns end_ns deadline attempts=0 moved
    for ((i = 0; i < n; i++)); do
        if [[ "${C_PORTS[i]}" == "$LEADER_PORT" ]]; then
            killed_pid="${C_PIDS[i]}"
            target=$(((i + 1) % n))
        fi
    done
    [[ -n "$killed_pid" ]] || die "no pid known for the leader on port $LEADER_PORT"
    log "failover: SIGKILL leader $HOST:$LEADER_PORT (pid $killed_pid), then SET until a node accepts"
    start_ns="$(date +%s%N)"
    kill -KILL "$killed_pid"
    deadline=$((SECONDS + FAILOVER_TIMEOUT_S))
    while ((SECONDS < deadline)); do
        attempts=$((attempts + 1))
        reply="$(timeout 1 redis-cli -h "$HOST" -p "${C_PORTS[target]}" SET bench:failover "$attempts" 2>/dev/null | tr -d '\r' || true)"
        if [[ "$reply" == OK ]]; then
            end_ns="$(date +%s%N)"
            FAILOVER_MS=$(((end_ns - start_ns) / 1000000))
            FAILOVER_TO="$HOST:${C_PORTS[target]}"
            log "failover: write accepted by $FAILOVER_TO after $FAILOVER_MS ms ($attempts attempts)"
            return 0
        fi
        # Follow -MOVED to a live node at once; otherwise the next node, 10 ms later.
        moved=""
        if [[ "$reply" =~ ^MOVED\ [0-9]+\ (.+)$ ]]; then moved="${BASH_REMATCH[1]}"; fi
        if [[ -n "$moved" && "$moved" != "$HOST:$LEADER_PORT" ]]; then
            for ((i = 0; i < n; i++)); do
                if [[ "$HOST:${C_PORTS[i]}" == "$moved" ]]; then target=$i; fi
            done
            continue
        fi
        target=$(((target + 1) % n))
        if [[ "${C_PORTS[target]}" == "$LEADER_PORT" ]]; then target=$(((target + 1) % n)); fi
        sleep 0.01
    done
    log "failover: no node accepted a write within ${FAILOVER_TIMEOUT_S}s ($attempts attempts)"
}

fmt_ms() { if [[ -n "${1:-}" ]]; then printf '%s/%s' "$1" "$2"; else printf -- '-'; fi; }

print_table() {
    local test pipe fsync prps rrps ratio row
    printf '\nredis-benchmark: %s clients, %s requests per test, -d %s, -r %s; latencies in ms\n\n' \
        "$CLIENTS" "$N" "$VALUE_BYTES" "$KEYSPACE"
    row='%-5s %-8s %-6s %12s %12s %7s %15s %15s\n'
    # shellcheck disable=SC2059 # row is ours
    printf "$row" test pipeline fsync "plain ops/s" "raft ops/s" ratio "plain p50/p99" "raft p50/p99"
    for test in "${TESTS[@]}"; do
        for pipe in "${PIPELINES[@]}"; do
            for fsync in yes no; do
                prps="${RPS["plain,$test,$pipe"]:-}"
                rrps="${RPS["raft-fsync-$fsync,$test,$pipe"]:-}"
                ratio=-
                if [[ -n "$prps" && -n "$rrps" ]]; then
                    ratio="$(awk -v a="$rrps" -v b="$prps" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')"
                fi
                # shellcheck disable=SC2059
                printf "$row" "$test" "$pipe" "$fsync" "${prps:--}" "${rrps:--}" "$ratio" \
                    "$(fmt_ms "${P50["plain,$test,$pipe"]:-}" "${P99["plain,$test,$pipe"]:-}")" \
                    "$(fmt_ms "${P50["raft-fsync-$fsync,$test,$pipe"]:-}" "${P99["raft-fsync-$fsync,$test,$pipe"]:-}")"
            done
        done
    done
    echo
    echo "ratio = raft ops/s / plain ops/s (plain is measured once and shown on both fsync rows)."
    if [[ -n "$FAILOVER_MS" ]]; then
        echo "failover (fsync=yes, election-timeout 1000 ms): SIGKILL of the leader to first accepted write: $FAILOVER_MS ms (new leader $FAILOVER_TO)"
    else
        echo "failover: no write was accepted within ${FAILOVER_TIMEOUT_S}s of killing the leader"
    fi
}

print_reads_table() {
    local mode pipe prps rrps ratio row note
    printf '\nreads: redis-benchmark -t get, %s clients, %s requests per test, -r %s, every key set to %s bytes first; a fresh 3-node cluster (fsync yes) per mode; latencies in ms\n\n' \
        "$CLIENTS" "$N" "$KEYSPACE" "$VALUE_BYTES"
    row='%-12s %-8s %12s %12s %7s %15s %15s\n'
    # shellcheck disable=SC2059 # row is ours
    printf "$row" mode pipeline "plain ops/s" "raft ops/s" ratio "plain p50/p99" "raft p50/p99"
    for mode in "${READ_MODES[@]}"; do
        for pipe in "${PIPELINES[@]}"; do
            prps="${RPS["reads-plain,GET,$pipe"]:-}"
            rrps="${RPS["reads-$mode,GET,$pipe"]:-}"
            ratio=-
            if [[ -n "$prps" && -n "$rrps" ]]; then
                ratio="$(awk -v a="$rrps" -v b="$prps" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')"
            fi
            # shellcheck disable=SC2059
            printf "$row" "$mode" "$pipe" "${prps:--}" "${rrps:--}" "$ratio" \
                "$(fmt_ms "${P50["reads-plain,GET,$pipe"]:-}" "${P99["reads-plain,GET,$pipe"]:-}")" \
                "$(fmt_ms "${P50["reads-$mode,GET,$pipe"]:-}" "${P99["reads-$mode,GET,$pipe"]:-}")"
        done
    done
    echo
    echo "linearizable/lease/stale: the leader with that raft.read-mode; follower: a follower, raft.follower-reads yes, read-mode linearizable."
    echo "ratio = raft ops/s / plain ops/s (plain is measured once and shown on every mode's rows)."
    for note in ${READ_NOTES[@]+"${READ_NOTES[@]}"}; do
        echo "note: $note"
    done
}

main() {
    "$ROOT/scripts/setup.sh"
    command -v redis-benchmark >/dev/null || die "redis-benchmark not found (package redis-tools)"
    if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
        log "building the module (cargo build --release)"
        cargo build --release --quiet || die "cargo build --release failed"
    fi
    [[ -f "$MODULE" ]] || die "$MODULE is missing (build it, or unset SKIP_BUILD)"

    local base pid
    base="$(free_ports 1)"
    pid="$(start_server "$TMP/plain" "$base")"
    STARTED_PIDS+=("$pid")
    log "plain redis-server on port $base"
    bench plain "$base"
    kill_pids "$pid"

    start_cluster yes
    bench raft-fsync-yes "$LEADER_PORT"
    measure_failover
    kill_pids "${C_PIDS[@]}"

    start_cluster no
    bench raft-fsync-no "$LEADER_PORT"
    kill_pids "${C_PIDS[@]}"

    if ((READS)); then run_reads; fi

    print_table
    if ((READS)); then print_reads_table; fi
    OK=1
}

main
