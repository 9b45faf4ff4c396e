#!/usr/bin/env bash
# The cost of raft.tls-enabled: redis-benchmark SET (-d 100, random keys out of 100000, 50
# clients unless CLIENTS says, pipeline 1) against the leader of a fresh 3-node cluster with
# a plain bus, then of one with its bus on TLS, ROUNDS times interleaved; prints each run
# and the medians (ops/s, p50 ms). Certificates: a CA and one node certificate made with
# openssl in the temp dir (X.509 v3, as rustls/webpki require). raft.log-fsync as LOG_FSYNC says (yes).
#
#   scripts/tls-bench.sh                    N=100000, ROUNDS=3
#   N=20000 ROUNDS=5 scripts/tls-bench.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
N="${N:-100000}"
ROUNDS="${ROUNDS:-3}"
CLIENTS="${CLIENTS:-50}"
LOG_FSYNC="${LOG_FSYNC:-yes}"
MODULE="$ROOT/target/release/libredis_raft.so"
BASE_PORT="${BASE_PORT:-23100}"
[[ "${SKIP_BUILD:-0}" == 1 ]] || (cd "$ROOT" && cargo build --release --lib --quiet)
TMP="$(mktemp -d)"
trap 'for i in 1 2 3; do redis-cli -p $((BASE_PORT + i - 1)) SHUTDOWN NOSAVE >/dev/null 2>&1 || true; done; [[ "${KEEP_TMP:-0}" == 1 ]] || rm -rf "$TMP"' EXIT

source "$ROOT/scripts/bench-cluster.sh"

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=bench CA" -keyout "$TMP/ca.key" -out "$TMP/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=node" \
    -keyout "$TMP/node.key" -out "$TMP/node.csr" 2>/dev/null
openssl x509 -req -in "$TMP/node.csr" -CA "$TMP/ca.crt" -CAkey "$TMP/ca.key" \
    -CAcreateserial -days 2 -out "$TMP/node.crt" \
    -extfile <(printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n') \
    2>/dev/null

# run MODE ROUND: one fresh cluster, one benchmark; prints "MODE ops p50".
run() {
    local mode=$1 i extra=()
    DIR="$TMP/$mode-$2"
    for i in 1 2 3; do
        extra=(--raft.log-fsync "$LOG_FSYNC")
        if [[ $mode == tls ]]; then
            extra+=(--tls-port $((BASE_PORT + 100 + i)) --tls-cert-file "$TMP/node.crt"
                --tls-key-file "$TMP/node.key" --tls-ca-cert-file "$TMP/ca.crt"
                --raft.tls-enabled yes)
        fi
        start_node "$i" "${extra[@]}"
    done
    sleep 0.5
    wait_leader
    redis-benchmark -p "$LP" -t set -n "$N" -c "$CLIENTS" -d 100 -r 100000 --csv 2>/dev/null |
        tail -1 | tr -d '"' | awk -F, -v m="$mode" '{ print m, $2, $5 }'
    stop_nodes
    sleep 0.5
}

results=()
for r in $(seq 1 "$ROUNDS"); do
    for mode in plain tls; do
        line="$(run "$mode" "$r")"
        echo "round $r: $line (ops/s, p50 ms)"
        results+=("$line")
    done
done
printf '%s\n' "${results[@]}" | awk '
    { ops[$1] = ops[$1] " " $2; p50[$1] = p50[$1] " " $3 }
    function median(s,   a, n, i, j, t) {
        n = split(s, a, " ")
        for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
        return a[int((n + 1) / 2)]
    }
    END {
        po = median(ops["plain"]); to = median(ops["tls"])
        printf "median plain: %s ops/s, p50 %s ms\n", po, median(p50["plain"])
        printf "median tls:   %s ops/s, p50 %s ms (%.0f%% of plain)\n", to, median(p50["tls"]), 100 * to / po
    }'
