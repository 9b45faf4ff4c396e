#!/usr/bin/env bash
# Disk use of a local 3-node cluster under a long write load (issue 5: the log stays bounded
# by raft.log-max-file-size plus one snapshot):
#
#   scripts/disk-bench.sh                 600 s of SETs (100-byte values, 1M distinct keys)
#   SECONDS_RUN=120 scripts/disk-bench.sh shorter
#
# Every 10 s it prints, per node, the log file, the snapshot file and the node directory's
# total size, plus the number of snapshots taken; at the end the largest of each and the
# bound they are checked against: log-max-file-size + two snapshots + 10%. Between
# snapshots a node holds its log and one snapshot; while a new snapshot is written the
# last good one stays until the new one is complete (a failed write must leave it valid),
# and the log keeps growing meanwhile (the 10%). Exits non-zero when a node went over it.
#
# Environment: SECONDS_RUN (600), MAX_FILE (raft.log-max-file-size, default 64mb),
# BASE_PORT (7201), SKIP_BUILD=1. Own directory target/disk-bench; leaves nothing running.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECONDS_RUN="${SECONDS_RUN:-600}"
MAX_FILE="${MAX_FILE:-64mb}"
BASE_PORT="${BASE_PORT:-7201}"
DIR="$ROOT/target/disk-bench"
MODULE="$ROOT/target/release/libredis_raft.so"

[[ "${SKIP_BUILD:-}" == 1 ]] || (cd "$ROOT" && "$ROOT/scripts/setup.sh" && cargo build --release --quiet)

load_pid=""
cleanup() {
    [[ -n "$load_pid" ]] && kill "$load_pid" 2>/dev/null || true
    for i in 1 2 3; do
        redis-cli -p $((BASE_PORT + i - 1)) SHUTDOWN NOSAVE >/dev/null 2>&1 || true
    done
}
trap cleanup EXIT
cleanup
rm -rf "$DIR"
mkdir -p "$DIR"

nodes=""
for i in 1 2 3; do
    p=$((BASE_PORT + i - 1))
    nodes+="n$i=127.0.0.1:$p@$((p + 10000)),"
done
nodes="${nodes%,}"
for i in 1 2 3; do
    p=$((BASE_PORT + i - 1))
    mkdir -p "$DIR/n$i"
    redis-server --port "$p" --bind 127.0.0.1 --dir "$DIR/n$i" --save "" --appendonly no \
        --logfile redis.log --daemonize yes --loadmodule "$MODULE" \
        --raft.node-id "n$i" --raft.cluster-nodes "$nodes" \
        --raft.log-max-file-size "$MAX_FILE"
done

field() { redis-cli -p "$1" INFO raft 2>/dev/null | tr -d '\r' | awk -F: -v f="$2" '$1 == f { print $2 }'; }
leader=""
for _ in $(seq 1 100); do
    for i in 1 2 3; do
        [[ "$(field $((BASE_PORT + i - 1)) raft_role)" == leader ]] && leader=$i
    done
    [[ -n "$leader" ]] && break
    sleep 0.2
done
[[ -n "$leader" ]] || { echo "disk-bench.sh: no leader" >&2; exit 1; }
LP=$((BASE_PORT + leader - 1))
bound=$(redis-cli -p "$LP" CONFIG GET raft.log-max-file-size | tail -1)

echo "leader n$leader; raft.log-max-file-size $bound bytes; writing for $SECONDS_RUN s"
# Runs until killed: -n large, keys from 1M so the dataset (and the snapshot) levels off.
redis-benchmark -p "$LP" -t set -n 2000000000 -r 1000000 -d 100 -P 16 -c 50 -q >/dev/null 2>&1 &
load_pid=$!

size() { stat -c %s "$1" 2>/dev/null || echo 0; }
declare -A max_log max_snap max_dir
for i in 1 2 3; do max_log[$i]=0; max_snap[$i]=0; max_dir[$i]=0; done
start=$(date +%s)
printf '%6s' "t(s)"
for i in 1 2 3; do printf ' | %-34s' "n$i log / snapshot / dir (MB), snaps"; done
echo
while (($(date +%s) - start < SECONDS_RUN)); do
    sleep 10
    t=$(($(date +%s) - start))
    printf '%6d' "$t"
    for i in 1 2 3; do
        d="$DIR/n$i"
        log=$(size "$d/redisraft.db")
        snap=$(size "$d/redisraft.db.snapshot")
        all=$(du -sb "$d" | cut -f1)
        snaps=$(field $((BASE_PORT + i - 1)) raft_snapshots_created)
        ((log > max_log[$i])) && max_log[$i]=$log
        ((snap > max_snap[$i])) && max_snap[$i]=$snap
        ((all > max_dir[$i])) && max_dir[$i]=$all
        printf ' | %8.1f / %8.1f / %8.1f, %3s' "$(bc <<<"scale=1; $log/1000000")" \
            "$(bc <<<"scale=1; $snap/1000000")" "$(bc <<<"scale=1; $all/1000000")" "${snaps:-?}"
    done
    echo
done
kill "$load_pid" 2>/dev/null || true
wait "$load_pid" 2>/dev/null || true
load_pid=""

over=0
echo
echo "largest over the run (bytes): log, snapshot, whole directory; bound = log-max-file-size + 2 snapshots + 10%"
for i in 1 2 3; do
    limit=$(((bound + 2 * max_snap[$i]) * 11 / 10))
    verdict=ok
    if ((max_dir[$i] > limit)); then verdict=OVER; over=1; fi
    echo "n$i: log ${max_log[$i]}, snapshot ${max_snap[$i]}, dir ${max_dir[$i]}, bound $limit: $verdict"
done
echo "writes applied: $(field "$LP" raft_commit_index) entries"
exit "$over"
