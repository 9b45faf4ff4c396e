#!/usr/bin/env bash
# How fast a new leader takes writes after the leader's process dies:
#
#   scripts/failover.sh [TRIALS]      (default 10)
#
# Each trial starts a fresh 3-node cluster (raft.election-timeout 1000 ms, the default),
# SIGKILLs its leader, then sends SET to the other nodes (following -MOVED, else trying each
# every 10 ms) until one is accepted; prints the median and range of the milliseconds from
# the kill to that write. With REDISRAFT_SO=/path/to/redisraft.so, RedisRaft's too, in the
# same run. This is scripts/bench.sh with FAILOVERS=TRIALS; its other settings apply.
set -euo pipefail
trials="${1:-10}"
[[ "$trials" =~ ^[1-9][0-9]*$ ]] || { echo "failover.sh: TRIALS must be a positive integer, not '$trials'" >&2; exit 2; }
FAILOVERS="$trials" exec "$(dirname "${BASH_SOURCE[0]}")/bench.sh"
