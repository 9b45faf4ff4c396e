"""redis-py's RedisCluster against a redis-raft cluster, through a leader kill.

Usage: redis_py_cluster.py PORT
Writes 100 keys, prints READY and waits for a line on stdin (the test kills the leader
then), writes 100 more (each retried until acknowledged, bounded), reads all 200 back
through the cluster client and prints "OK <count>". Anything else is a failure.
"""
import sys
import time

from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

# While the old leader's address still refuses connections, redis-py 4 can raise
# RedisClusterException (not a RedisError) from its slot-table refresh.
RETRYABLE = (RedisError, RedisClusterException)


def write(rc, key, deadline):
    last = None
    while True:
        try:
            if rc.set(key, key):
                return
        except RETRYABLE as e:  # MOVED is followed by the client; the rest is retried
            last = e
        if time.monotonic() > deadline:
            raise SystemExit(f"could not write {key}: {last!r}")
        time.sleep(0.05)


def main():
    port = int(sys.argv[1])
    rc = RedisCluster(
        host="127.0.0.1",
        port=port,
        cluster_error_retry_attempts=10,
        socket_timeout=2,
        socket_connect_timeout=2,
    )
    deadline = time.monotonic() + 60
    for i in range(100):
        write(rc, f"k{i}", deadline)
    print("READY", flush=True)
    sys.stdin.readline()
    for i in range(100, 200):
        write(rc, f"k{i}", deadline)
    ok = 0
    for i in range(200):
        for _ in range(100):
            try:
                v = rc.get(f"k{i}")
                break
            except RETRYABLE:
                time.sleep(0.05)
        else:
            raise SystemExit(f"could not read k{i}")
        if v == f"k{i}".encode():
            ok += 1
    print(f"OK {ok}", flush=True)


main()
