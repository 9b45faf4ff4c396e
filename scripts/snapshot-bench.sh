#!/usr/bin/env bash
# Measures snapshots on a local 3-node cluster and compares memory with plain redis-server:
#
#   1. KEYS keys (default 1,000,000) with 100-byte values written through the cluster
#      (redis-benchmark SET, pipelined), and the same into a plain redis-server;
#   2. RAFT.DEBUG COMPACT on the leader while a PING loop runs beside it: snapshot time and
#      size, fork time, and the longest PING round trip (the main thread's stall);
#   3. a follower is stopped, its log and snapshot removed, and started again: the leader's
#      snapshot is installed over the bus; install time from its log;
#   4. RSS of every node against the plain server holding the same keys.
#
# Environment: KEYS (default 1000000), MAX_FILE (raft.log-max-file-size, default 0: the
# log is compacted only by the RAFT.DEBUG COMPACT of step 2; 128mb is the option's default,
# with which nodes compact by themselves during the writes), BASE_PORT (default 7101),
# SKIP_BUILD=1. With MAX_FILE set, RSS is also printed once the writes are applied.
# Uses its own directory (target/snapshot-bench) and ports; leaves nothing running.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KEYS="${KEYS:-1000000}"
MAX_FILE="${MAX_FILE:-0}"
BASE_PORT="${BASE_PORT:-7101}"
DIR="$ROOT/target/snapshot-bench"
MODULE="$ROOT/target/release/libredis_raft.so"
PLAIN_PORT=$((BASE_PORT + 50))

[[ "${SKIP_BUILD:-}" == 1 ]] || (cd "$ROOT" && cargo build --release --quiet)

# shellcheck source=bench-cluster.sh
. "$ROOT/scripts/bench-cluster.sh"
cleanup() {
    stop_nodes
    redis-cli -p "$PLAIN_PORT" SHUTDOWN NOSAVE >/dev/null 2>&1 || true
}
trap cleanup EXIT
cleanup
rm -rf "$DIR"
mkdir -p "$DIR"

for i in 1 2 3; do start_node "$i" --raft.log-max-file-size "$MAX_FILE"; done
redis-server --port "$PLAIN_PORT" --bind 127.0.0.1 --dir "$DIR" --save "" --appendonly no \
    --logfile plain.log --daemonize yes

wait_leader
field() { info_field "$@"; }

echo "writing $KEYS keys (100-byte values) through the cluster (leader n$leader) and into plain redis-server"
t0=$(date +%s.%N)
redis-benchmark -p "$LP" -t set -n "$KEYS" -r "$KEYS" -d 100 -P 16 -c 50 -q >/dev/null
t1=$(date +%s.%N)
# -r picks keys at random: fill in the ones it missed so both hold exactly KEYS keys.
redis-benchmark -p "$PLAIN_PORT" -t set -n "$KEYS" -r "$KEYS" -d 100 -P 16 -c 50 -q >/dev/null
printf 'cluster write: %.1f s\n' "$(awk "BEGIN { print $t1 - $t0 }")"
for i in 1 2 3; do
    p=$((BASE_PORT + i - 1))
    until [[ "$(field "$p" raft raft_last_applied_index)" == "$(field "$LP" raft raft_commit_index)" ]]; do sleep 0.2; done
done
echo "keys: cluster $(redis-cli -p "$LP" RAFT.DEBUG EXEC DBSIZE), plain $(redis-cli -p "$PLAIN_PORT" DBSIZE)"
rss_table() {
    local plain rss p i
    plain=$(field "$PLAIN_PORT" memory used_memory_rss)
    printf '  plain redis-server: %d MiB\n' $((plain / 1048576))
    for i in 1 2 3; do
        p=$((BASE_PORT + i - 1))
        rss=$(field "$p" memory used_memory_rss)
        printf '  n%d: %d MiB (%.2fx plain), raft log %s bytes, cache %s bytes, snapshots %s\n' "$i" \
            $((rss / 1048576)) "$(awk "BEGIN { print $rss / $plain }")" "$(field "$p" raft raft_file_size)" \
            "$(field "$p" raft raft_cache_memory_size)" "$(field "$p" raft raft_snapshots_created)"
    done
}
if [[ "$MAX_FILE" != 0 ]]; then
    sleep 15 # the allocator returns freed pages within ~10 s
    echo "memory (RSS) once the writes are applied, raft.log-max-file-size $MAX_FILE:"
    rss_table
fi

echo "RAFT.DEBUG COMPACT on the leader, with a PING loop beside it"
python3 - "$LP" >"$DIR/ping.txt" <<'PY' &
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
worst = 0.0
end = time.time() + 8
while time.time() < end:
    t = time.perf_counter()
    s.sendall(b"PING\r\n")
    s.recv(64)
    worst = max(worst, time.perf_counter() - t)
    time.sleep(0.001)
print(f"{worst * 1000:.1f}")
PY
ping_pid=$!
sleep 1
t0=$(date +%s.%N)
redis-cli -p "$LP" RAFT.DEBUG COMPACT >/dev/null
t1=$(date +%s.%N)
wait "$ping_pid"
printf 'snapshot: %.2f s end to end, %s bytes, fork %s ms; longest PING during it: %s ms\n' \
    "$(awk "BEGIN { print $t1 - $t0 }")" "$(field "$LP" raft raft_snapshot_size)" \
    "$(field "$LP" raft raft_snapshot_fork_ms)" "$(cat "$DIR/ping.txt")"
echo "log after compaction: $(field "$LP" raft raft_file_size) bytes, $(field "$LP" raft raft_log_entries) entries"

f=$(( leader % 3 + 1 ))
FP=$((BASE_PORT + f - 1))
echo "follower n$f: stopped, log and snapshot removed, started again"
redis-cli -p "$FP" SHUTDOWN NOSAVE >/dev/null 2>&1 || true
sleep 0.5
rm -f "$DIR/n$f"/redisraft.db*
: >"$DIR/n$f/redis.log"
t0=$(date +%s.%N)
start_node "$f" --raft.log-max-file-size "$MAX_FILE"
until [[ "$(field "$FP" raft raft_snapshots_received 2>/dev/null)" == 1 && "$(field "$FP" raft raft_loading 2>/dev/null)" == no ]]; do sleep 0.1; done
t1=$(date +%s.%N)
printf 'install on n%s: %.2f s from start to loaded (%s keys)\n' "$f" "$(awk "BEGIN { print $t1 - $t0 }")" \
    "$(redis-cli -p "$FP" RAFT.DEBUG EXEC DBSIZE)"
grep -E "sent to node|raft snapshot .* loaded" "$DIR"/n*/redis.log | sed 's/^.*<raft> /  /'

sleep 15 # the allocator returns freed pages within ~10 s
echo "memory (RSS) with $KEYS keys, after the compaction and the install:"
rss_table
