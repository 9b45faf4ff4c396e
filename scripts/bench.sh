#!/usr/bin/env bash
# Compares redis-raft with plain Redis, with Redis under appendfsync always and, when asked,
# with RedisRaft; measures CPU per write and failover.
#
#   scripts/bench.sh                 N=100000 requests per test, one round
#   N=20000 scripts/bench.sh         a quicker run
#   ROUNDS=3 scripts/bench.sh        three interleaved rounds; the tables show medians
#   READS=0 scripts/bench.sh         the write tests and failover only
#   WRITES=0 scripts/bench.sh        the read tests only
#   REDISRAFT_SO=/path/to/redisraft.so scripts/bench.sh     RedisRaft side by side too
#   FAILOVERS=10 scripts/bench.sh    only the failover test, 10 times (a fresh cluster each):
#                                    median and range (scripts/failover.sh does this)
#
# Targets, each started fresh for its tests and benchmarked alone, one after the other (the
# machine may have few cores, so nothing else runs during a measurement). $SERVER runs all
# but RedisRaft:
#   plain      a redis-server without the module
#   aof        a redis-server with --appendonly yes --appendfsync always: one fsync of the
#              AOF before each round of replies, the durable single-node baseline
#   raft       the leader of a fresh 3-node redis-raft cluster with raft.log-fsync yes, and of
#              another with raft.log-fsync no
#   RedisRaft  only with REDISRAFT_SO: the leader of a fresh 3-node RedisRaft cluster in
#              $REDISRAFT_SERVER (--raft.log-filename raftlog.db --raft.addr 127.0.0.1:PORT,
#              then RAFT.CLUSTER INIT on the first node and RAFT.CLUSTER JOIN on the others,
#              until all three name the same leader and it counts 3 voters), with its
#              raft.log-fsync yes, and another with no
#
# Writes: redis-benchmark (-d 100, random keys out of 100000, --csv) runs SET and GET with
# 50 clients at pipeline 1 and 16, then SET with 200 and with 800 clients at pipeline 1, and
# SET from one client at pipeline 16 (a bulk load: each of its writes waits for the one
# before it), against every target. The first table shows ops/s, p50 and p99 per target and test, and
# raft's ops/s divided by plain's, aof's and RedisRaft's (with the same fsync setting).
# CPU per write: around the 200-client SET the script reads utime+stime of each of the
# target's server processes (/proc/PID/stat, in clock ticks of `getconf CLK_TCK`) and prints
# the increase summed over them (3 for a cluster, 1 otherwise) divided by N, in µs.
# Failover: with the fsync=yes redis-raft cluster, SIGKILL the leader, then SET on the other
# nodes (following -MOVED, else trying each node every 10 ms) until one is accepted, and
# print the milliseconds from the kill to that write.
#
# Reads (unless READS=0): GET only, 50 clients, pipeline 1 and 16, after every one of the
# 100000 keys redis-benchmark picks from (key:000000000000 ...) has been set to a 100-byte
# value (MSETs of 100 keys through redis-cli --pipe), so every GET hits. Against a fresh
# plain redis-server, then a fresh 3-node cluster (fsync yes) per read mode, because
# raft.read-mode is fixed at start:
#   linearizable  the leader, raft.read-mode left at its default (ReadIndex)
#   lease         the leader, --raft.read-mode lease
#   stale         the leader, --raft.read-mode stale
#   follower      a follower of a cluster with --raft.follower-reads yes (linearizable)
#   RedisRaft     only with REDISRAFT_SO: its leader with raft.quorum-reads yes (its
#                 default, its linearizable reads), compared with linearizable
# and prints a second table. A run during which the node answered any error, missed a key
# or changed role is noted under the tables. For redis-raft, each run's log line also says
# how many reads its ReadIndex rounds served ("N reads in M rounds (K a round), round p50
# P us", from RAFT.DEBUG LATENCY's read and read_round, reset before the run); in lease and
# stale mode, and on a follower, only the reads that took a round count.
#
# ROUNDS=k repeats all of it k times, interleaved (plain, aof, raft, RedisRaft, the reads,
# then again) so that a slow minute of a noisy machine hurts every target alike, and every
# number printed is the median over the rounds (ops/s, p50, p99, CPU and failover each on
# its own). Without ROUNDS, run the script several times and compare.
#
# Everything runs in a temp dir on free ports of 127.0.0.1, and every process the script
# started is killed on exit, whatever the exit. Environment: N (100000), CLIENTS (50),
# ROUNDS (1), SERVER (redis-server from PATH; the binary for plain, aof and raft),
# REDISRAFT_SO (unset: no RedisRaft), REDISRAFT_SERVER (redis-7.2.6/redis-server beside the
# folder of REDISRAFT_SO; RedisRaft needs Redis 7.2 or newer), BENCH_TIMEOUT_S (300, per
# redis-benchmark run and per key load), FAILOVER_TIMEOUT_S (30), READS (1; 0 skips the
# reads), WRITES (1; 0 skips the writes, CPU and failover), SKIP_BUILD=1 (use
# target/release as it is), KEEP_TMP=1 (keep the temp dir and its logs; it is also kept when
# the script fails).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

N="${N:-100000}"
CLIENTS="${CLIENTS:-50}"
ROUNDS="${ROUNDS:-1}"
BENCH_TIMEOUT_S="${BENCH_TIMEOUT_S:-300}"
FAILOVER_TIMEOUT_S="${FAILOVER_TIMEOUT_S:-30}"
READS="${READS:-1}"
WRITES="${WRITES:-1}"
FAILOVERS="${FAILOVERS:-0}"
SERVER="${SERVER:-redis-server}"
REDISRAFT_SO="${REDISRAFT_SO:-}"
REDISRAFT_SERVER="${REDISRAFT_SERVER:-}"
ROUNDS_MAX=20
LEADER_TIMEOUT_S=30
NODE_START_TIMEOUT_S=10
CLUSTER_NODES=3
VALUE_BYTES=100
KEYSPACE=100000
PIPELINES=(1 16)
# SET at pipeline 1 with many clients: how each target batches writes under load. CPU per
# write is measured during the first.
MANY_CLIENTS=(200 800)
# One client pipelining SETs, as a bulk load does: clients, pipeline.
BULK=(1 16)
READ_MODES=(linearizable lease stale follower)
MSET_KEYS=100
HOST=127.0.0.1
BUS_PORT_OFFSET=10000
MODULE="$ROOT/target/release/libredis_raft.so"

usage_error() {
    echo "bench.sh: $*" >&2
    exit 2
}

for v in N CLIENTS ROUNDS BENCH_TIMEOUT_S FAILOVER_TIMEOUT_S; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || usage_error "$v must be a positive integer, not '${!v}'"
done
[[ "$FAILOVERS" =~ ^[0-9]+$ ]] || usage_error "FAILOVERS must be a number, not '$FAILOVERS'"
((ROUNDS <= ROUNDS_MAX)) || usage_error "ROUNDS must be at most $ROUNDS_MAX, not $ROUNDS"
for v in READS WRITES; do
    [[ "${!v}" == 0 || "${!v}" == 1 ]] || usage_error "$v must be 0 or 1, not '${!v}'"
done
((READS || WRITES)) || usage_error "READS=0 and WRITES=0 leave nothing to run"

# Prints the absolute path of executable $2 (a path, or a name on PATH), named by env $1.
# Runs before the cd to $ROOT, so a relative path means what the user meant.
executable() {
    local path
    path="$(command -v -- "$2" 2>/dev/null || true)"
    if [[ -z "$path" || ! -f "$path" || ! -x "$path" ]]; then
        usage_error "$1='$2' is not an executable file (nor one on PATH)"
    fi
    [[ "$path" == /* ]] || path="$PWD/$path"
    echo "$path"
}

SERVER_BIN="$(executable SERVER "$SERVER")"
REDISRAFT_SERVER_BIN=""
if [[ -n "$REDISRAFT_SO" ]]; then
    [[ -f "$REDISRAFT_SO" ]] || usage_error "REDISRAFT_SO='$REDISRAFT_SO' is not a file"
    # Absolute: redis-server loads the module after moving to its --dir.
    REDISRAFT_SO="$(cd "$(dirname "$REDISRAFT_SO")" && pwd)/$(basename "$REDISRAFT_SO")"
    REDISRAFT_SERVER="${REDISRAFT_SERVER:-$(dirname "$(dirname "$REDISRAFT_SO")")/redis-7.2.6/redis-server}"
    REDISRAFT_SERVER_BIN="$(executable REDISRAFT_SERVER "$REDISRAFT_SERVER")"
elif [[ -n "$REDISRAFT_SERVER" ]]; then
    usage_error "REDISRAFT_SERVER is set but REDISRAFT_SO is not: name RedisRaft's module too"
fi
cd "$ROOT"

# redis-benchmark and the server each hold a descriptor per client.
FDS_NEEDED=$((${MANY_CLIENTS[-1]} + 256))
FDS="$(ulimit -n)"
if [[ "$FDS" != unlimited ]] && ((FDS < FDS_NEEDED)); then
    ulimit -n "$FDS_NEEDED" 2>/dev/null ||
        usage_error "the open-files limit is $FDS; ${MANY_CLIENTS[-1]} clients need $FDS_NEEDED (ulimit -n)"
fi
CLK_TCK="$(getconf CLK_TCK 2>/dev/null || true)"
[[ "$CLK_TCK" =~ ^[1-9][0-9]*$ ]] || CLK_TCK=100

TMP="$(mktemp -d "${TMPDIR:-/tmp}/redis-raft-bench.XXXXXX")"
STARTED_PIDS=()
OK=0
ROUND=1

log() { echo "bench.sh: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# The names a server of ours shows in /proc/PID/cmdline (Redis replaces its arguments with
# a title that starts with the path it was run by).
SERVER_NAMES=(redis-server "$(basename "$SERVER_BIN")")
if [[ -n "$REDISRAFT_SERVER_BIN" ]]; then SERVER_NAMES+=("$(basename "$REDISRAFT_SERVER_BIN")"); fi

# True if $1 is still one of our servers (and not a pid reused by something else since).
is_redis_pid() {
    local name
    kill -0 "$1" 2>/dev/null || return 1
    [[ -r "/proc/$1/cmdline" ]] || return 0
    for name in "${SERVER_NAMES[@]}"; do
        if grep -qF -- "$name" "/proc/$1/cmdline" 2>/dev/null; then return 0; fi
    done
    return 1
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
    # Also the servers that started but never answered (their callers never got the pid).
    while IFS= read -r f; do
        if [[ -s "$f" ]]; then STARTED_PIDS+=("$(tr -dc '0-9' <"$f")"); fi
    done < <(find "$TMP" -maxdepth 4 -name redis.pid 2>/dev/null)
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

# Starts server binary $1 with the given arguments in dir $2 on port $3 and waits for PONG.
# Prints its pid (callers record it; cleanup also finds servers by their pidfiles, in case
# one started but never answered).
start_server() {
    local bin=$1 dir=$2 port=$3 pid out deadline
    shift 3
    mkdir -p "$dir"
    out="$("$bin" --port "$port" --bind "$HOST" --dir "$dir" --save '' --appendonly no \
        --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" "$@" 2>&1)" ||
        die "$bin on port $port did not start: $out"
    deadline=$((SECONDS + NODE_START_TIMEOUT_S))
    until [[ -s "$dir/redis.pid" ]] && [[ "$(cli "$port" PING)" == PONG ]]; do
        if ((SECONDS >= deadline)); then
            log "$bin on port $port did not answer PING in ${NODE_START_TIMEOUT_S}s; last lines of $dir/redis.log:"
            tail -n 15 "$dir/redis.log" >&2 || true
            exit 1
        fi
        sleep 0.1
    done
    pid="$(tr -dc '0-9' <"$dir/redis.pid")"
    echo "$pid"
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

# Globals describing the current single server, set by start_single.
S_PORT=""
S_PID=""

# Starts a fresh $SERVER without the module in $TMP/r<round>/$1, passing it any further
# arguments; sets S_PORT and S_PID.
start_single() {
    local name=$1
    shift
    S_PORT="$(free_ports 1)"
    S_PID="$(start_server "$SERVER_BIN" "$TMP/r$ROUND/$name" "$S_PORT" "$@")"
    STARTED_PIDS+=("$S_PID")
    log "round $ROUND: $name redis-server${*:+ $*} on port $S_PORT"
}

# Globals describing the current cluster, set by start_cluster and start_redisraft.
C_PORTS=()
C_PIDS=()
C_DIR=""
LEADER_PORT=""

# Waits until every node of the current cluster names the same leader id, exactly one node
# says it leads, under that id, and it counts $CLUSTER_NODES voters; sets LEADER_PORT.
# redis-raft and RedisRaft both have these INFO raft fields.
wait_for_leader() {
    local name=$1 deadline=$((SECONDS + LEADER_TIMEOUT_S)) i info id first leaders port lid voters agree
    while :; do
        first="" leaders=0 port="" lid="" voters="" agree=1
        for ((i = 0; i < CLUSTER_NODES; i++)); do
            info="$(cli "${C_PORTS[i]}" INFO raft)"
            id="$(sed -n 's/^raft_leader_id://p' <<<"$info")"
            if ((i == 0)); then first=$id; fi
            if [[ -z "$id" || "$id" == -1 || "$id" != "$first" ]]; then agree=0; fi
            if [[ "$(sed -n 's/^raft_role://p' <<<"$info")" == leader ]]; then
                leaders=$((leaders + 1))
                port="${C_PORTS[i]}"
                lid="$(sed -n 's/^raft_node_id://p' <<<"$info")"
                voters="$(sed -n 's/^raft_num_voting_nodes://p' <<<"$info")"
            fi
        done
        if ((agree && leaders == 1)) && [[ "$lid" == "$first" && "$voters" == "$CLUSTER_NODES" ]]; then
            LEADER_PORT=$port
            return 0
        fi
        ((SECONDS < deadline)) ||
            die "the $name cluster (ports ${C_PORTS[*]}) agreed on no leader with $CLUSTER_NODES voters in ${LEADER_TIMEOUT_S}s; logs in $C_DIR"
        sleep 0.2
    done
}

# Starts a fresh 3-node redis-raft cluster ($SERVER with our module) with raft.log-fsync $1
# in $TMP/r<round>/$2, passing any further arguments to every node's redis-server, and
# waits for its leader (sets LEADER_PORT).
start_cluster() {
    local fsync=$1 name=$2 base i nodes="" sep="" port pid got
    shift 2
    base="$(free_ports "$CLUSTER_NODES")"
    C_DIR="$TMP/r$ROUND/$name"
    C_PORTS=()
    C_PIDS=()
    for ((i = 1; i <= CLUSTER_NODES; i++)); do
        port=$((base + i - 1))
        C_PORTS+=("$port")
        nodes+="${sep}n$i=$HOST:$port"
        sep=","
    done
    for ((i = 1; i <= CLUSTER_NODES; i++)); do
        pid="$(start_server "$SERVER_BIN" "$C_DIR/node$i" "${C_PORTS[i - 1]}" --loadmodule "$MODULE" \
            --raft.node-id "n$i" --raft.cluster-nodes "$nodes" --raft.log-fsync "$fsync" "$@")"
        STARTED_PIDS+=("$pid")
        C_PIDS+=("$pid")
    done
    wait_for_leader "$name"
    got="$(info_field "$LEADER_PORT" raft raft_log_fsync)"
    [[ "$got" == "$fsync" ]] || die "the leader reports raft_log_fsync:$got, wanted $fsync"
    log "round $ROUND: raft cluster $name (fsync=$fsync${*:+ $*}) on ports ${C_PORTS[*]}: leader $HOST:$LEADER_PORT"
}

# Starts a fresh 3-node RedisRaft cluster ($REDISRAFT_SERVER with $REDISRAFT_SO) with
# raft.log-fsync $1 in $TMP/r<round>/$2, passing any further arguments to every node:
# RAFT.CLUSTER INIT on the first node, RAFT.CLUSTER JOIN through it on the others (each
# answers once it joined), then waits for its leader (sets LEADER_PORT).
start_redisraft() {
    local fsync=$1 name=$2 base i port pid out
    shift 2
    base="$(free_ports "$CLUSTER_NODES")"
    C_DIR="$TMP/r$ROUND/$name"
    C_PORTS=()
    C_PIDS=()
    for ((i = 1; i <= CLUSTER_NODES; i++)); do
        port=$((base + i - 1))
        pid="$(start_server "$REDISRAFT_SERVER_BIN" "$C_DIR/node$i" "$port" --loadmodule "$REDISRAFT_SO" \
            --raft.log-filename raftlog.db --raft.addr "$HOST:$port" --raft.log-fsync "$fsync" "$@")"
        STARTED_PIDS+=("$pid")
        C_PIDS+=("$pid")
        C_PORTS+=("$port")
    done
    out="$(cli "$base" RAFT.CLUSTER INIT)"
    [[ "$out" == "OK "* ]] || die "RedisRaft $name: RAFT.CLUSTER INIT on $HOST:$base answered '$out'; logs in $C_DIR"
    for port in "${C_PORTS[@]:1}"; do
        out="$(timeout "$LEADER_TIMEOUT_S" redis-cli -h "$HOST" -p "$port" RAFT.CLUSTER JOIN "$HOST:$base" 2>&1 |
            tr -d '\r' || true)"
        [[ "$out" == OK ]] ||
            die "RedisRaft $name: RAFT.CLUSTER JOIN $HOST:$base on $HOST:$port answered '$out'; logs in $C_DIR"
    done
    wait_for_leader "RedisRaft $name"
    check_config "$LEADER_PORT" raft.log-fsync "$fsync"
    log "round $ROUND: RedisRaft cluster $name (fsync=$fsync${*:+ $*}) on ports ${C_PORTS[*]}: leader $HOST:$LEADER_PORT"
}

# Results, keyed "target,TEST,clients,pipeline": one value per round, space-separated.
declare -A RPS P50 P99
# CPU µs per write, keyed by target, one value per round; and its number of processes.
declare -A CPU_US CPU_PROCS
# Problems seen during runs, printed under the tables.
NOTES=()

# Runs redis-benchmark -t $5 (set,get, set or get) with $3 clients at pipeline $4 against
# port $2, adding the results to target $1's, and notes any error reply the node gave
# meanwhile.
run_benchmark() {
    local target=$1 port=$2 clients=$3 pipe=$4 tests=$5 csv test rps p50 p99 key e0 e1
    local what="round $ROUND, $target -t $tests -c $clients -P $pipe"
    log "$what: redis-benchmark -n $N -r $KEYSPACE -d $VALUE_BYTES"
    mkdir -p "$TMP/r$ROUND"
    csv="$TMP/r$ROUND/bench-$target-c$clients-P$pipe.csv"
    e0="$(info_field "$port" stats total_error_replies)"
    if ! timeout "$BENCH_TIMEOUT_S" redis-benchmark -h "$HOST" -p "$port" -c "$clients" -n "$N" \
        -r "$KEYSPACE" -d "$VALUE_BYTES" -P "$pipe" -t "$tests" --csv >"$csv" 2>"$csv.err"; then
        log "$what: redis-benchmark failed or passed ${BENCH_TIMEOUT_S}s (see $csv.err)"
        NOTES+=("$what: redis-benchmark failed or passed ${BENCH_TIMEOUT_S}s (see $csv.err)")
    fi
    e1="$(info_field "$port" stats total_error_replies)"
    if [[ -z "$e0" || -z "$e1" ]]; then
        NOTES+=("$what: could not read INFO stats from $HOST:$port before and after the run")
    elif ((e1 > e0)); then
        NOTES+=("$what: $((e1 - e0)) error replies during the run (see $csv.err)")
    fi
    # "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    while IFS=, read -r test rps _ _ p50 _ p99 _; do
        test="${test//\"/}"
        [[ "$test" == SET || "$test" == GET ]] || continue
        key="$target,$test,$clients,$pipe"
        RPS["$key"]+=" ${rps//\"/}"
        P50["$key"]+=" ${p50//\"/}"
        P99["$key"]+=" ${p99//\"/}"
    done <"$csv"
}

# The utime+stime of processes $@ together, in clock ticks (fields 14 and 15 of
# /proc/PID/stat: the 12th and 13th after the ")" that ends the command name, which may
# hold spaces). Prints nothing if a process has no readable stat.
cpu_ticks() {
    local pid stat total=0 f
    for pid in "$@"; do
        stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 0
        read -r -a f <<<"${stat##*) }"
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}

# The write tests against port $2, under target $1; $3... are the target's server pids,
# whose CPU time is read around the SET with ${MANY_CLIENTS[0]} clients.
bench_writes() {
    local target=$1 port=$2 pipe clients t0="" t1=""
    shift 2
    for pipe in "${PIPELINES[@]}"; do
        run_benchmark "$target" "$port" "$CLIENTS" "$pipe" set,get
    done
    for clients in "${MANY_CLIENTS[@]}"; do
        if ((clients == MANY_CLIENTS[0])); then t0="$(cpu_ticks "$@")"; fi
        run_benchmark "$target" "$port" "$clients" 1 set
        if ((clients == MANY_CLIENTS[0])); then t1="$(cpu_ticks "$@")"; fi
    done
    run_benchmark "$target" "$port" "${BULK[0]}" "${BULK[1]}" set
    if [[ -n "$t0" && -n "$t1" ]]; then
        CPU_US["$target"]+=" $(awk -v t="$((t1 - t0))" -v hz="$CLK_TCK" -v n="$N" 'BEGIN { printf "%.2f", t * 1e6 / hz / n }')"
        CPU_PROCS["$target"]=$#
    else
        NOTES+=("round $ROUND, $target: could not read /proc/PID/stat of pids $*: no CPU per write")
    fi
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

# Dies unless GET key:000000000000 on port $1 answers a loaded value.
check_loaded() {
    local got
    got="$(cli "$1" GET key:000000000000)"
    [[ ${#got} == "$VALUE_BYTES" ]] ||
        die "GET key:000000000000 on $HOST:$1 answered '$got', not a $VALUE_BYTES-byte value"
}

# Runs the GET benchmark at each pipeline against port $2, storing results under target
# reads-$1, and notes any keyspace miss or role change on that node meanwhile (and, through
# run_benchmark, any error reply).
bench_reads() {
    local mode=$1 port=$2 pipe h0 h1 m0 m1 r0 r1 rounds
    for pipe in "${PIPELINES[@]}"; do
        h0="$(info_field "$port" stats keyspace_hits)"
        m0="$(info_field "$port" stats keyspace_misses)"
        r0="$(info_field "$port" raft raft_role)"
        if [[ "$mode" != plain && "$mode" != redisraft ]]; then
            cli "$port" RAFT.DEBUG LATENCY RESET >/dev/null || true
        fi
        run_benchmark "reads-$mode" "$port" "$CLIENTS" "$pipe" get
        h1="$(info_field "$port" stats keyspace_hits)"
        m1="$(info_field "$port" stats keyspace_misses)"
        r1="$(info_field "$port" raft raft_role)"
        rounds="$(read_rounds "$port")"
        log "round $ROUND, reads-$mode P$pipe: $((${h1:-0} - ${h0:-0})) hits, $((${m1:-0} - ${m0:-0})) misses${r0:+, role $r0 -> $r1}${rounds:+, $rounds}"
        if [[ -n "$m0" && -n "$m1" ]] && ((m1 > m0)); then
            NOTES+=("round $ROUND, reads $mode P$pipe: $((m1 - m0)) GETs missed their key")
        fi
        if [[ "$r0" != "$r1" ]]; then
            NOTES+=("round $ROUND, reads $mode P$pipe: the node's role changed from '$r0' to '$r1' during the run")
        fi
    done
}

# redis-raft's linearizable reads on port $1 since the last RAFT.DEBUG LATENCY RESET:
# "N reads in M rounds (K a round), round p50 P us"; nothing if it served none that way.
read_rounds() {
    local reads round rounds p50
    reads="$(info_field "$1" raft raft_latency_read_usec | sed -n 's/^count=\([0-9]*\),.*/\1/p')"
    round="$(info_field "$1" raft raft_latency_read_round_usec)"
    rounds="$(sed -n 's/^count=\([0-9]*\),.*/\1/p' <<<"$round")"
    p50="$(sed -n 's/.*,p50=\([0-9]*\),.*/\1/p' <<<"$round")"
    if [[ -n "$reads" && -n "$rounds" ]] && ((reads > 0 && rounds > 0)); then
        echo "$reads reads in $rounds rounds ($((reads / rounds)) a round), round p50 $p50 us"
    fi
}

# Failover times in ms, one per round, and the node that took the last write.
FAILOVER_MS=""
FAILOVER_TO=""

# SIGKILLs the current cluster's leader and times the first write another node accepts.
measure_failover() {
    local -n times=${1:-FAILOVER_MS}
    local killed_pid="" i n=${#C_PORTS[@]} target reply start_ns end_ns deadline attempts=0 moved ms
    for ((i = 0; i < n; i++)); do
        if [[ "${C_PORTS[i]}" == "$LEADER_PORT" ]]; then
            killed_pid="${C_PIDS[i]}"
            target=$(((i + 1) % n))
        fi
    done
    [[ -n "$killed_pid" ]] || die "no pid known for the leader on port $LEADER_PORT"
    log "round $ROUND, failover: SIGKILL leader $HOST:$LEADER_PORT (pid $killed_pid), then SET until a node accepts"
    start_ns="$(date +%s%N)"
    kill -KILL "$killed_pid"
    deadline=$((SECONDS + FAILOVER_TIMEOUT_S))
    while ((SECONDS < deadline)); do
        attempts=$((attempts + 1))
        reply="$(timeout 1 redis-cli -h "$HOST" -p "${C_PORTS[target]}" SET bench:failover "$attempts" 2>/dev/null | tr -d '\r' || true)"
        if [[ "$reply" == OK ]]; then
            end_ns="$(date +%s%N)"
            ms=$(((end_ns - start_ns) / 1000000))
            times+=" $ms"
            FAILOVER_TO="$HOST:${C_PORTS[target]}"
            log "round $ROUND, failover: write accepted by $FAILOVER_TO after $ms ms ($attempts attempts)"
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
    log "round $ROUND, failover: no node accepted a write within ${FAILOVER_TIMEOUT_S}s ($attempts attempts)"
    NOTES+=("round $ROUND, failover: no node accepted a write within ${FAILOVER_TIMEOUT_S}s of killing the leader")
}

# One round of the write tests: every target in turn, RedisRaft beside raft of the same
# fsync setting.
write_round() {
    local fsync
    start_single plain
    bench_writes plain "$S_PORT" "$S_PID"
    kill_pids "$S_PID"

    start_single aof --appendonly yes --appendfsync always
    check_config "$S_PORT" appendonly yes
    check_config "$S_PORT" appendfsync always
    bench_writes aof "$S_PORT" "$S_PID"
    kill_pids "$S_PID"

    for fsync in yes no; do
        start_cluster "$fsync" "raft-$fsync"
        bench_writes "raft-$fsync" "$LEADER_PORT" "${C_PIDS[@]}"
        if [[ "$fsync" == yes ]]; then measure_failover; fi
        kill_pids "${C_PIDS[@]}"
        if [[ -n "$REDISRAFT_SO" ]]; then
            start_redisraft "$fsync" "redisraft-$fsync"
            bench_writes "redisraft-$fsync" "$LEADER_PORT" "${C_PIDS[@]}"
            kill_pids "${C_PIDS[@]}"
        fi
    done
}

# One round of the read tests: plain, then one fresh cluster per read mode, then RedisRaft.
read_round() {
    local mode port
    start_single reads-plain
    load_keys "$S_PORT"
    bench_reads plain "$S_PORT"
    kill_pids "$S_PID"

    for mode in "${READ_MODES[@]}"; do
        case $mode in
        linearizable) start_cluster yes "reads-$mode" ;;
        lease | stale) start_cluster yes "reads-$mode" --raft.read-mode "$mode" ;;
        follower) start_cluster yes "reads-$mode" --raft.follower-reads yes ;;
        *) die "unknown read mode $mode" ;;
        esac
        port=$LEADER_PORT
        if [[ $mode == follower ]]; then
            for port in "${C_PORTS[@]}"; do
                if [[ "$port" != "$LEADER_PORT" ]]; then break; fi
            done
            [[ "$(info_field "$port" raft raft_role)" == follower ]] ||
                die "$HOST:$port, picked as the follower, is not one"
            check_config "$port" raft.follower-reads yes
            check_config "$port" raft.read-mode linearizable
        else
            check_config "$port" raft.read-mode "$mode"
        fi
        load_keys "$LEADER_PORT" "$port"
        check_loaded "$port"
        log "round $ROUND, reads-$mode: benchmarking $HOST:$port ($(info_field "$port" raft raft_role))"
        bench_reads "$mode" "$port"
        kill_pids "${C_PIDS[@]}"
    done

    if [[ -n "$REDISRAFT_SO" ]]; then
        start_redisraft yes reads-redisraft
        check_config "$LEADER_PORT" raft.quorum-reads yes
        load_keys "$LEADER_PORT"
        check_loaded "$LEADER_PORT"
        bench_reads redisraft "$LEADER_PORT"
        kill_pids "${C_PIDS[@]}"
    fi
}

# The median of the space-separated numbers in $1 (nothing if there are none).
median() {
    tr ' ' '\n' <<<"$1" | sort -g |
        awk 'NF { v[++n] = $1 } END { if (n) printf "%.6g\n", (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2 }'
}

# Milliseconds $1 in at most 5 characters: 0.255, 2.279, 20.1, 160; '-' if empty.
fmt_ms() {
    if [[ -z "$1" ]]; then
        printf -- '-'
    else
        awk -v v="$1" 'BEGIN { f = (v >= 100) ? "%.0f" : (v >= 10) ? "%.1f" : "%.3f"; printf f, v }'
    fi
}

# "ops/s p50 p99" of target $1 in test $2 (TEST,clients,pipeline), medians over the rounds.
cell() {
    local k="$1,$2" rps
    rps="$(median "${RPS[$k]:-}")"
    printf '%7s %5s %5s' "$(if [[ -n "$rps" ]]; then printf '%.0f' "$rps"; else printf -- -; fi)" \
        "$(fmt_ms "$(median "${P50[$k]:-}")")" "$(fmt_ms "$(median "${P99[$k]:-}")")"
}

# The median ops/s of target $1 in test $3 divided by that of target $2, or '-'.
ratio() {
    local a b
    a="$(median "${RPS[$1,$3]:-}")"
    b="$(median "${RPS[$2,$3]:-}")"
    if [[ -n "$a" && -n "$b" ]]; then
        awk -v a="$a" -v b="$b" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "-" }'
    else
        printf -- -
    fi
}

# Where the medians come from, above each table.
rounds_note() {
    if ((ROUNDS > 1)); then echo "medians of $ROUNDS rounds"; else echo "one round"; fi
}

print_write_table() {
    local rr=0 test clients pipe fsync line row i
    if [[ -n "$REDISRAFT_SO" ]]; then rr=1; fi
    printf '\nwrites: redis-benchmark -n %s -d %s -r %s, %s; ops/s, p50 and p99 in ms\n\n' \
        "$N" "$VALUE_BYTES" "$KEYSPACE" "$(rounds_note)"
    line="$(printf '%-19s | %-19s | %-19s | %-19s' "" plain "aof (fsync always)" "raft (3 nodes)")"
    if ((rr)); then line+="$(printf ' | %-19s' "RedisRaft (3 nodes)")"; fi
    echo "$line | raft ops/s as x of"
    line="$(printf '%-4s %4s %3s %-5s' test -c -P fsync)"
    for ((i = 0; i < 3 + rr; i++)); do line+="$(printf ' | %7s %5s %5s' ops/s p50 p99)"; done
    line+="$(printf ' | %5s %5s' plain aof)"
    if ((rr)); then line+="$(printf ' %5s' RR)"; fi
    echo "$line"
    for row in "${WRITE_ROWS[@]}"; do
        IFS=, read -r test clients pipe <<<"$row"
        for fsync in yes no; do
            line="$(printf '%-4s %4s %3s %-5s' "$test" "$clients" "$pipe" "$fsync")"
            line+=" | $(cell plain "$row") | $(cell aof "$row") | $(cell "raft-$fsync" "$row")"
            if ((rr)); then line+=" | $(cell "redisraft-$fsync" "$row")"; fi
            line+="$(printf ' | %5s %5s' "$(ratio "raft-$fsync" plain "$row")" "$(ratio "raft-$fsync" aof "$row")")"
            if ((rr)); then line+="$(printf ' %5s' "$(ratio "raft-$fsync" "redisraft-$fsync" "$row")")"; fi
            echo "$line"
        done
    done
    echo
    echo "plain and aof do not depend on fsync: the same numbers on both rows. GET reads keys the SETs before it wrote (some miss)."
}

print_cpu_and_failover() {
    local target us plain what procs
    printf '\nCPU per write: utime+stime of the server processes, summed, over the SET with %s clients, / %s requests (%s; 1 clock tick = %s µs/write)\n' \
        "${MANY_CLIENTS[0]}" "$N" "$(rounds_note)" "$(awk -v hz="$CLK_TCK" -v n="$N" 'BEGIN { printf "%.2f", 1e6 / hz / n }')"
    plain="$(median "${CPU_US[plain]:-}")"
    for target in plain aof raft-yes raft-no ${REDISRAFT_SO:+redisraft-yes redisraft-no}; do
        case $target in
        raft-*) what="raft fsync=${target#raft-}" ;;
        redisraft-*) what="RedisRaft fsync=${target#redisraft-}" ;;
        *) what=$target ;;
        esac
        us="$(median "${CPU_US[$target]:-}")"
        if [[ -z "$us" ]]; then
            printf '  %-20s -\n' "$what"
            continue
        fi
        procs="${CPU_PROCS[$target]}"
        printf '  %-20s %8.2f µs/write  %s process%s' "$what" "$us" "$procs" "$(if ((procs > 1)); then echo es; fi)"
        if [[ -n "$plain" && "$target" != plain ]]; then
            awk -v a="$us" -v b="$plain" 'BEGIN { if (b > 0) printf "  %.1f x plain", a / b }'
        fi
        echo
    done
    local ms
    ms="$(median "$FAILOVER_MS")"
    if [[ -n "$ms" ]]; then
        printf '\nfailover (raft fsync=yes, election-timeout 1000 ms): SIGKILL of the leader to first accepted write: %s ms' "$ms"
        if ((ROUNDS > 1)); then printf ' (median of%s; last new leader %s)\n' "$FAILOVER_MS" "$FAILOVER_TO"; else printf ' (new leader %s)\n' "$FAILOVER_TO"; fi
    else
        printf '\nfailover: no write was accepted within %ss of killing the leader\n' "$FAILOVER_TIMEOUT_S"
    fi
}

print_reads_table() {
    local mode pipe row rr=0 line
    if [[ -n "$REDISRAFT_SO" ]]; then rr=1; fi
    printf '\nreads: redis-benchmark -t get -c %s -n %s -r %s, every key set to %s bytes first, a fresh cluster (fsync yes) per mode, %s; ops/s, p50 and p99 in ms\n\n' \
        "$CLIENTS" "$N" "$KEYSPACE" "$VALUE_BYTES" "$(rounds_note)"
    line="$(printf '%-16s | %-19s | %-19s | %-5s' "" plain raft "x of")"
    if ((rr)); then line+="$(printf ' | %-19s | %-5s' "RedisRaft (quorum)" "x of")"; fi
    echo "$line"
    line="$(printf '%-12s %3s' mode -P)"
    line+="$(printf ' | %7s %5s %5s' ops/s p50 p99)$(printf ' | %7s %5s %5s' ops/s p50 p99) | plain"
    if ((rr)); then line+="$(printf ' | %7s %5s %5s' ops/s p50 p99) |    RR"; fi
    echo "$line"
    for mode in "${READ_MODES[@]}"; do
        for pipe in "${PIPELINES[@]}"; do
            row="GET,$CLIENTS,$pipe"
            line="$(printf '%-12s %3s' "$mode" "$pipe") | $(cell reads-plain "$row") | $(cell "reads-$mode" "$row")"
            line+="$(printf ' | %5s' "$(ratio "reads-$mode" reads-plain "$row")")"
            if ((rr)) && [[ "$mode" == linearizable ]]; then
                line+=" | $(cell reads-redisraft "$row")$(printf ' | %5s' "$(ratio "reads-$mode" reads-redisraft "$row")")"
            fi
            echo "$line"
        done
    done
    echo
    echo "linearizable/lease/stale: the leader with that raft.read-mode; follower: a follower, raft.follower-reads yes, read-mode linearizable."
    echo "plain is measured once per round and shown on every mode's rows; RedisRaft (its default quorum reads) beside linearizable."
}

# The write table's rows, "TEST,clients,pipeline", in the order printed.
WRITE_ROWS=()
for pipe in "${PIPELINES[@]}"; do WRITE_ROWS+=("SET,$CLIENTS,$pipe"); done
for clients in "${MANY_CLIENTS[@]}"; do WRITE_ROWS+=("SET,$clients,1"); done
WRITE_ROWS+=("SET,${BULK[0]},${BULK[1]}")
for pipe in "${PIPELINES[@]}"; do WRITE_ROWS+=("GET,$CLIENTS,$pipe"); done

# "v=7.0.15" out of "Redis server v=7.0.15 sha=..." of binary $1.
server_version() {
    "$1" --version 2>/dev/null | sed -n 's/.* \(v=[^ ]*\).*/\1/p'
}

# FAILOVERS=k: the failover test alone, k times, each on a fresh cluster (and RedisRaft's).
failover_rounds() {
    local rr_ms=""
    for ((ROUND = 1; ROUND <= FAILOVERS; ROUND++)); do
        start_cluster yes raft-yes
        measure_failover FAILOVER_MS
        kill_pids "${C_PIDS[@]}"
        if [[ -n "$REDISRAFT_SO" ]]; then
            start_redisraft yes redisraft-yes
            measure_failover rr_ms
            kill_pids "${C_PIDS[@]}"
        fi
    done
    printf '\nfailover: SIGKILL of the leader to the first write another node accepts, election-timeout 1000 ms, %s rounds\n' "$FAILOVERS"
    print_spread raft "$FAILOVER_MS"
    if [[ -n "$REDISRAFT_SO" ]]; then print_spread RedisRaft "$rr_ms"; fi
}

# "NAME: median M ms, range A..B ms (all: ...)" of the numbers in $2.
print_spread() {
    if [[ -z "$2" ]]; then
        printf '  %-10s no write was accepted\n' "$1"
        return
    fi
    printf '  %-10s median %s ms, range %s..%s ms (all:%s)\n' "$1" "$(median "$2")" \
        "$(tr ' ' '\n' <<<"$2" | sed '/^$/d' | sort -n | head -1)" \
        "$(tr ' ' '\n' <<<"$2" | sed '/^$/d' | sort -n | tail -1)" "$2"
}

main() {
    "$ROOT/scripts/setup.sh"
    command -v redis-benchmark >/dev/null || die "redis-benchmark not found (package redis-tools)"
    if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
        log "building the module (cargo build --release)"
        cargo build --release --quiet || die "cargo build --release failed"
    fi
    [[ -f "$MODULE" ]] || die "$MODULE is missing (build it, or unset SKIP_BUILD)"

    if ((FAILOVERS)); then
        failover_rounds
        OK=1
        return
    fi
    for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
        log "round $ROUND of $ROUNDS"
        if ((WRITES)); then write_round; fi
        if ((READS)); then read_round; fi
    done

    printf '\nplain, aof, raft: %s (%s)' "$SERVER_BIN" "$(server_version "$SERVER_BIN")"
    if [[ -n "$REDISRAFT_SO" ]]; then
        printf '; RedisRaft: %s in %s (%s)' "$REDISRAFT_SO" "$REDISRAFT_SERVER_BIN" "$(server_version "$REDISRAFT_SERVER_BIN")"
    fi
    printf '; %s\n' "$(redis-benchmark --version)"
    if ((WRITES)); then
        print_write_table
        print_cpu_and_failover
    fi
    if ((READS)); then print_reads_table; fi
    local note
    if ((${#NOTES[@]})); then echo; fi
    for note in ${NOTES[@]+"${NOTES[@]}"}; do
        echo "note: $note"
    done
    OK=1
}

main
