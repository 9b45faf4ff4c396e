#!/usr/bin/env bash
# The long linearizability run: the same test as the normal suite's short one
# (tests/linearizability.rs), with the nemesis running for SECONDS instead of 16.
#
#   scripts/linearizability.sh                 300 s, reads and writes
#   scripts/linearizability.sh 600             600 s
#   scripts/linearizability.sh 300 --writes-only
#                                              no GET/LRANGE: writes and the final state only
#
# Environment passed through to the test: LIN_SEED (replay the same random choices),
# LIN_CLIENTS (8), LIN_STEP_BUDGET (search steps per register key, 5000000), LIN_NODE_ARGS
# (extra redis-server arguments for every node, e.g. "--raft.read-mode lease").
# Prints the counts, the nemesis's actions and any anomaly; the whole history is written to
# target/tmp/linearizability.history (and the nodes' logs beside it when something is found).
# Exits non-zero on any anomaly, or if the build or the cluster fails.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

SECONDS_ARG="${1:-300}"
[[ "$SECONDS_ARG" =~ ^[1-9][0-9]*$ ]] || {
    echo "linearizability.sh: SECONDS must be a positive integer, not '$SECONDS_ARG'" >&2
    exit 2
}
WRITES_ONLY=0
case "${2:-}" in
    "") ;;
    --writes-only) WRITES_ONLY=1 ;;
    *)
        echo "linearizability.sh: unknown option '$2' (only --writes-only)" >&2
        exit 2
        ;;
esac

scripts/setup.sh
# The test's own timeouts bound every step; this is a last resort against a hang:
# the run itself, plus start-up, settling and checking.
LIMIT_S=$((SECONDS_ARG * 2 + 600))
LIN_SECONDS="$SECONDS_ARG" LIN_WRITES_ONLY="$WRITES_ONLY" \
    timeout --signal=INT --kill-after=30 "$LIMIT_S" \
    cargo test --release --test linearizability \
    registers_and_lists_stay_linearizable -- --nocapture --test-threads=1
