# Sourced by disk-bench.sh and snapshot-bench.sh: a local 3-node cluster n1..n3 on
# BASE_PORT..BASE_PORT+2 (bus ports +10000), each node in $DIR/nN, started with $MODULE and
# any extra redis-server arguments given to start_node.

# "n1=127.0.0.1:P1@B1,n2=...": every node's raft.cluster-nodes.
cluster_nodes() {
    local i p nodes=""
    for i in 1 2 3; do
        p=$((BASE_PORT + i - 1))
        nodes+="n$i=127.0.0.1:$p@$((p + 10000)),"
    done
    echo "${nodes%,}"
}

# start_node I [redis-server args...]: starts node nI in the background.
start_node() {
    local i=$1 p=$((BASE_PORT + $1 - 1))
    shift
    mkdir -p "$DIR/n$i"
    redis-server --port "$p" --bind 127.0.0.1 --dir "$DIR/n$i" --save "" --appendonly no \
        --logfile redis.log --daemonize yes --loadmodule "$MODULE" \
        --raft.node-id "n$i" --raft.cluster-nodes "$(cluster_nodes)" "$@"
}

stop_nodes() {
    local i
    for i in 1 2 3; do
        redis-cli -p $((BASE_PORT + i - 1)) SHUTDOWN NOSAVE >/dev/null 2>&1 || true
    done
}

# info_field PORT SECTION FIELD: one INFO field's value.
info_field() {
    redis-cli -p "$1" INFO "$2" 2>/dev/null | tr -d '\r' | awk -F: -v f="$3" '$1 == f { print $2 }'
}

# Sets `leader` (its number) and LP (its port) once a node leads; exits if none does in 20 s.
wait_leader() {
    local i
    leader=""
    for _ in $(seq 1 100); do
        for i in 1 2 3; do
            [[ "$(info_field $((BASE_PORT + i - 1)) raft raft_role)" == leader ]] && leader=$i
        done
        [[ -n "$leader" ]] && break
        sleep 0.2
    done
    [[ -n "$leader" ]] || { echo "$(basename "$0"): no leader" >&2; exit 1; }
    LP=$((BASE_PORT + leader - 1))
}
