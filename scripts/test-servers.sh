#!/usr/bin/env bash
# Runs the integration tests against each reference server in ../shared/servers (Redis 7.2,
# 7.4, 8.0, Valkey 8.0), one after the other, and prints a table of the results.
# Does nothing when that folder is missing (a user's machine): it is CI's extra check.
#
#   scripts/test-servers.sh [servers-dir]
#
# Exits non-zero if the tests fail on any server.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dir="${1:-../shared/servers}"
if [[ ! -d "$dir" ]]; then
    echo "test-servers.sh: no $dir; skipped"
    exit 0
fi
dir="$(cd "$dir" && pwd)"
cargo build --release --quiet
failed=0
table=()
for s in redis-7.2.6/redis-server redis-7.4.1/redis-server redis-8.0-m01/redis-server valkey-8.0.1/valkey-server; do
    bin="$dir/$s"
    [[ -x "$bin" ]] || { table+=("$s: missing"); continue; }
    echo "== integration tests on $s"
    log="$(mktemp)"
    if REDIS_SERVER="$bin" cargo test --release --no-fail-fast --tests -- --test-threads=2 2>&1 | tee "$log" | grep -E '^(test result|failures:|    [a-z_]+$)'; then :; fi
    passed=$(grep -Eo '[0-9]+ passed' "$log" | awk '{s+=$1} END {print s+0}')
    fails=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
    if ! grep -q 'test result' "$log" || grep -q 'error: test failed\|could not compile' "$log"; then
        fails=$((fails > 0 ? fails : 1))
    fi
    table+=("$s: $passed passed, $fails failed")
    if [[ "$fails" -ne 0 ]]; then
        failed=1
        # Why: each failed test's panic and the lines after it (its own log is long).
        echo "-- $s: the failed tests' panics"
        grep -E -A4 'panicked at' "$log" | cut -c1-400 | head -80 || true
    fi
    rm -f "$log"
done
echo "== integration tests per server"
printf '%s\n' "${table[@]}"
exit "$failed"
