#!/usr/bin/env bash
# A soak: the linearizability workload (8 clients, SET/GET/INCR on registers, RPUSH/LRANGE
# on lists) against a 3-node cluster for SECONDS while the leader is, in turn, SIGKILLed
# and restarted, paused (SIGSTOP/SIGCONT) and cut off from the other nodes by the bus
# proxies; then the whole history is checked and every node's final data compared.
#
#   scripts/soak.sh [SECONDS]        (default 1800)
#
# Prints the operations, the faults injected and any anomaly or divergence, and exits
# non-zero on any. This is scripts/linearizability.sh with a longer default; its
# environment applies (LIN_SEED, LIN_CLIENTS, LIN_NODE_ARGS, ...).
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/linearizability.sh" "${1:-1800}" "${@:2}"
