//! Commands behave as on a single Redis, on every node: transactions, databases, refused
//! commands.

mod common;

use std::time::Duration;

use common::*;

fn leader_conn(c: &mut Cluster) -> (usize, redis::Connection) {
    let l = c.wait_leader(Duration::from_secs(10));
    (l, c.conn(l).unwrap())
}

#[test]
fn multi_exec_is_one_atomic_entry_with_redis_replies() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    let mut r = RawConn::open(c.nodes[l].def.port);
    assert_eq!(r.cmd(&["SET", "s", "str"]), "+OK\r\n");
    assert_eq!(r.cmd(&["MULTI"]), "+OK\r\n");
    assert_eq!(r.cmd(&["INCR", "n"]), "+QUEUED\r\n");
    assert_eq!(r.cmd(&["RPUSH", "l", "a", "b"]), "+QUEUED\r\n");
    assert_eq!(r.cmd(&["LPUSH", "s", "x"]), "+QUEUED\r\n");
    assert_eq!(r.cmd(&["GET", "n"]), "+QUEUED\r\n");
    // Node-local commands are queued too, and run only on this node.
    assert_eq!(r.cmd(&["PING"]), "+QUEUED\r\n");
    assert_eq!(
        r.cmd(&["CONFIG", "SET", "maxmemory-samples", "7"]),
        "+QUEUED\r\n"
    );
    // Meanwhile another client's PING is not queued.
    assert_eq!(
        RawConn::open(c.nodes[l].def.port).cmd(&["PING"]),
        "+PONG\r\n"
    );
    assert_eq!(
        r.cmd(&["EXEC"]),
        "*6\r\n:1\r\n:2\r\n-WRONGTYPE Operation against a key holding the wrong kind of value\r\n$1\r\n1\r\n+PONG\r\n+OK\r\n"
    );
    assert_eq!(
        r.cmd(&["CONFIG", "GET", "maxmemory-samples"]),
        "*2\r\n$17\r\nmaxmemory-samples\r\n$1\r\n7\r\n"
    );
    c.wait_applied_everywhere(Duration::from_secs(10));
    for i in 0..3 {
        assert_eq!(
            c.local(i, &["GET", "n"]),
            Value::BulkString(b"1".to_vec()),
            "node {i}"
        );
        assert_eq!(c.local(i, &["LLEN", "l"]), Value::Int(2), "node {i}");
        let samples = if i == l { "7" } else { "5" };
        assert_eq!(
            c.local(i, &["CONFIG", "GET", "maxmemory-samples"]),
            Value::Array(vec![
                Value::BulkString(b"maxmemory-samples".to_vec()),
                Value::BulkString(samples.as_bytes().to_vec())
            ]),
            "CONFIG SET inside MULTI stays on node {l}, not {i}"
        );
    }
}

#[test]
fn queue_time_errors_abort_the_transaction_as_redis_does() {
    let mut c = Cluster::start(3);
    let (_, mut con) = leader_conn(&mut c);
    let _: String = redis::cmd("MULTI").query(&mut con).unwrap();
    let _: String = redis::cmd("SET").arg("a").arg("1").query(&mut con).unwrap();
    let e = redis::cmd("GET").query::<String>(&mut con).unwrap_err();
    assert_eq!(
        err_text(&e),
        "ERR wrong number of arguments for 'get' command"
    );
    let e = redis::cmd("NOSUCHCMD")
        .arg("x")
        .query::<String>(&mut con)
        .unwrap_err();
    assert!(e.to_string().contains("unknown command 'NOSUCHCMD'"), "{e}");
    let e = redis::cmd("EXEC").query::<Value>(&mut con).unwrap_err();
    assert_eq!(
        err_text(&e),
        "EXECABORT Transaction discarded because of previous errors."
    );
    // Nothing was written; the client is out of MULTI.
    let v: Option<String> = redis::cmd("GET").arg("a").query(&mut con).unwrap();
    assert_eq!(v, None);
    let e = redis::cmd("EXEC").query::<Value>(&mut con).unwrap_err();
    assert_eq!(err_text(&e), "ERR EXEC without MULTI");
    let e = redis::cmd("DISCARD").query::<Value>(&mut con).unwrap_err();
    assert_eq!(err_text(&e), "ERR DISCARD without MULTI");
    // Nested MULTI and DISCARD, answered as the server under test answers them (Redis 7
    // refuses the nested MULTI and goes on; Valkey 8 flags MULTI no-multi and aborts).
    let (l, _) = leader_conn(&mut c);
    let steps: &[&[&str]] = &[&["MULTI"], &["MULTI"], &["DISCARD"]];
    let plain = PlainRedis::start();
    let ours = session(c.nodes[l].def.port, steps);
    assert_eq!(ours, session(plain.port, steps));
    assert!(ours[1].starts_with("-ERR "), "{ours:?}");
    assert_eq!(ours[2], "+OK\r\n");
    // An empty transaction.
    let _: String = redis::cmd("MULTI").query(&mut con).unwrap();
    let v: Vec<Value> = redis::cmd("EXEC").query(&mut con).unwrap();
    assert!(v.is_empty());
}

#[test]
fn transactions_on_a_follower_redirect_at_exec() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    let mut con = c.conn((l + 1) % 3).unwrap();
    let _: String = redis::cmd("MULTI").query(&mut con).unwrap();
    let _: String = redis::cmd("SET").arg("a").arg("1").query(&mut con).unwrap();
    let e = redis::cmd("EXEC").query::<Value>(&mut con).unwrap_err();
    assert_eq!(
        err_text(&e),
        format!("MOVED 0 127.0.0.1:{}", c.nodes[l].def.port)
    );
}

#[test]
fn select_and_databases_work_on_every_node() {
    let mut c = Cluster::start(3);
    let (l, mut con) = leader_conn(&mut c);
    let _: () = redis::cmd("SELECT").arg(3).query(&mut con).unwrap();
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("in3")
        .query(&mut con)
        .unwrap();
    let v: String = redis::cmd("GET").arg("k").query(&mut con).unwrap();
    assert_eq!(v, "in3");
    let moved: i64 = redis::cmd("MOVE").arg("k").arg(5).query(&mut con).unwrap();
    assert_eq!(moved, 1);
    let _: () = redis::cmd("SELECT").arg(5).query(&mut con).unwrap();
    let copied: i64 = redis::cmd("COPY")
        .arg("k")
        .arg("k2")
        .arg("DB")
        .arg(6)
        .query(&mut con)
        .unwrap();
    assert_eq!(copied, 1);
    let _: () = redis::cmd("SWAPDB").arg(6).arg(7).query(&mut con).unwrap();
    // A transaction that selects between its commands: each runs in its own database.
    let _: String = redis::cmd("MULTI").query(&mut con).unwrap();
    let _: String = redis::cmd("SET")
        .arg("t")
        .arg("in5")
        .query(&mut con)
        .unwrap();
    let _: String = redis::cmd("SELECT").arg(9).query(&mut con).unwrap();
    let _: String = redis::cmd("SET")
        .arg("t")
        .arg("in9")
        .query(&mut con)
        .unwrap();
    let r: Vec<Value> = redis::cmd("EXEC").query(&mut con).unwrap();
    // SELECT is queued as in Redis: its OK is in EXEC's array, and it sticks afterwards.
    assert_eq!(r, vec![Value::Okay, Value::Okay, Value::Okay]);
    let v: String = redis::cmd("GET").arg("t").query(&mut con).unwrap();
    assert_eq!(v, "in9");
    // A SELECT by another client while one is in MULTI still selects for that client.
    let mut other = c.conn(l).unwrap();
    let _: String = redis::cmd("MULTI").query(&mut con).unwrap();
    let _: () = redis::cmd("SELECT").arg(5).query(&mut other).unwrap();
    let v: String = redis::cmd("GET").arg("t").query(&mut other).unwrap();
    assert_eq!(v, "in5");
    let _: () = redis::cmd("DISCARD").query(&mut con).unwrap();
    c.wait_applied_everywhere(Duration::from_secs(10));
    for i in 0..3 {
        let mut n = c.conn(i).unwrap();
        let get = |n: &mut redis::Connection, db: i64, k: &str| -> Value {
            let _: () = redis::cmd("SELECT").arg(db).query(n).unwrap();
            redis::cmd("RAFT.DEBUG")
                .arg("EXEC")
                .arg("GET")
                .arg(k)
                .query(n)
                .unwrap()
        };
        assert_eq!(get(&mut n, 3, "k"), Value::Nil, "node {i}");
        assert_eq!(
            get(&mut n, 5, "k"),
            Value::BulkString(b"in3".to_vec()),
            "node {i}"
        );
        assert_eq!(
            get(&mut n, 7, "k2"),
            Value::BulkString(b"in3".to_vec()),
            "node {i}"
        );
        assert_eq!(
            get(&mut n, 9, "t"),
            Value::BulkString(b"in9".to_vec()),
            "node {i}"
        );
        assert_eq!(
            get(&mut n, 5, "t"),
            Value::BulkString(b"in5".to_vec()),
            "node {i}"
        );
        assert_eq!(get(&mut n, 0, "t"), Value::Nil, "node {i}");
    }
    let _ = l;
}

#[test]
fn commands_that_make_no_sense_here_are_refused_clearly() {
    let mut c = Cluster::start(3);
    let (_, mut con) = leader_conn(&mut c);
    for (cmd, args, text) in [
        ("SAVE", vec![], "the Raft log is the persistence"),
        ("BGSAVE", vec![], "the Raft log is the persistence"),
        ("BGREWRITEAOF", vec![], "the Raft log is the persistence"),
        (
            "SLAVEOF",
            vec!["no", "one"],
            "makes no sense in a Raft cluster",
        ),
        ("DEBUG", vec!["RELOAD"], "behind the Raft log's back"),
    ] {
        let mut c = redis::cmd(cmd);
        for a in args {
            c.arg(a);
        }
        let e = c.query::<Value>(&mut con).unwrap_err();
        assert!(e.to_string().contains(text), "{cmd}: {e}");
    }
}

#[test]
fn relative_ttls_become_the_same_deadline_on_every_node() {
    let mut c = Cluster::start(3);
    let (_, mut con) = leader_conn(&mut c);
    let cmds: Vec<Vec<&str>> = vec![
        vec!["SET", "a", "v", "EX", "100"],
        vec!["SETEX", "b", "100", "v"],
        vec!["PSETEX", "c", "100000", "v"],
        vec!["SET", "d", "v"],
        vec!["EXPIRE", "d", "100"],
        vec!["SET", "e", "v"],
        vec!["PEXPIRE", "e", "100000"],
        vec!["SET", "f", "v"],
        vec!["GETEX", "f", "EX", "100"],
    ];
    for args in &cmds {
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        let _: Value = cmd.query(&mut con).unwrap();
    }
    c.wait_applied_everywhere(Duration::from_secs(10));
    for k in ["a", "b", "c", "d", "e", "f"] {
        let at = c.local(0, &["PEXPIRETIME", k]);
        let Value::Int(ms) = at else {
            panic!("{k}: {at:?}")
        };
        assert!(ms > 0, "{k} has no deadline");
        for i in 1..3 {
            assert_eq!(c.local(i, &["PEXPIRETIME", k]), at, "key {k} node {i}");
        }
    }
}

#[test]
fn spop_removes_the_same_members_on_every_node() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    let mut r = RawConn::open(c.nodes[l].def.port);
    let mut sadd = vec!["SADD", "s"];
    let members: Vec<String> = (0..100).map(|i| format!("m{i}")).collect();
    sadd.extend(members.iter().map(|s| s.as_str()));
    assert_eq!(r.cmd(&sadd), ":100\r\n");
    // Reply shapes as Redis's: bulk without a count, array with one, nil / empty when missing.
    let one = r.cmd(&["SPOP", "s"]);
    assert!(
        one.starts_with("$2\r\nm") || one.starts_with("$3\r\nm"),
        "{one}"
    );
    let three = r.cmd(&["SPOP", "s", "3"]);
    assert!(three.starts_with("*3\r\n"), "{three}");
    assert_eq!(r.cmd(&["SPOP", "missing"]), "$-1\r\n");
    assert_eq!(r.cmd(&["SPOP", "missing", "2"]), "*0\r\n");
    assert_eq!(r.cmd(&["SET", "str", "x"]), "+OK\r\n");
    assert!(r.cmd(&["SPOP", "str"]).starts_with("-WRONGTYPE"));
    for _ in 0..10 {
        r.cmd(&["SPOP", "s", "5"]);
    }
    assert_eq!(r.cmd(&["SCARD", "s"]), ":46\r\n");
    c.wait_applied_everywhere(Duration::from_secs(10));
    let sorted = |v: Value| -> Vec<String> {
        let Value::Array(items) = v else {
            panic!("{v:?}")
        };
        let mut s: Vec<String> = items
            .into_iter()
            .map(|x| match x {
                Value::BulkString(b) => String::from_utf8(b).unwrap(),
                other => panic!("{other:?}"),
            })
            .collect();
        s.sort();
        s
    };
    let first = sorted(c.local(0, &["SMEMBERS", "s"]));
    assert_eq!(first.len(), 46);
    for i in 1..3 {
        assert_eq!(sorted(c.local(i, &["SMEMBERS", "s"])), first, "node {i}");
    }
}

#[test]
fn acl_and_maxmemory_refusals_happen_before_the_log() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    let mut admin = RawConn::open(c.nodes[l].def.port);
    // ACLs are node-local: set the user up on the leader.
    assert_eq!(
        admin.cmd(&[
            "ACL",
            "SETUSER",
            "app",
            "on",
            ">pw",
            "~allowed:*",
            "+@all",
            "-del"
        ]),
        "+OK\r\n"
    );
    let mut r = RawConn::open(c.nodes[l].def.port);
    assert_eq!(r.cmd(&["AUTH", "app", "pw"]), "+OK\r\n");
    assert_eq!(r.cmd(&["SET", "allowed:k", "v"]), "+OK\r\n");
    assert!(
        r.cmd(&["SET", "other:k", "v"]).starts_with("-NOPERM"),
        "key outside the user's pattern"
    );
    assert!(
        r.cmd(&["DEL", "allowed:k"]).starts_with("-NOPERM"),
        "command the user may not run"
    );
    assert!(
        r.cmd(&["GET", "other:k"]).starts_with("-NOPERM"),
        "read of a key outside the pattern"
    );
    // A refused command inside MULTI aborts the transaction, as in Redis.
    assert_eq!(r.cmd(&["MULTI"]), "+OK\r\n");
    assert!(r.cmd(&["SET", "other:k", "v"]).starts_with("-NOPERM"));
    assert!(r.cmd(&["EXEC"]).starts_with("-EXECABORT"));
    // Over maxmemory, denyoom commands are refused; reads and deletes still work.
    assert_eq!(admin.cmd(&["CONFIG", "SET", "maxmemory", "1"]), "+OK\r\n");
    assert_eq!(
        admin.cmd(&["SET", "big", "v"]),
        "-OOM command not allowed when used memory > 'maxmemory'.\r\n"
    );
    assert_eq!(admin.cmd(&["GET", "allowed:k"]), "$1\r\nv\r\n");
    assert_eq!(admin.cmd(&["DEL", "allowed:k"]), ":1\r\n");
    assert_eq!(admin.cmd(&["CONFIG", "SET", "maxmemory", "0"]), "+OK\r\n");
    c.wait_applied_everywhere(Duration::from_secs(10));
    for i in 0..3 {
        for k in ["other:k", "big", "allowed:k"] {
            assert_eq!(
                c.local(i, &["EXISTS", k]),
                Value::Int(0),
                "node {i} key {k}"
            );
        }
    }
}

#[test]
fn ignored_commands_run_locally_and_can_change_at_runtime() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    let mut r = RawConn::open(c.nodes[l].def.port);
    assert_eq!(
        r.cmd(&["CONFIG", "SET", "raft.ignored-commands", "incr, decr"]),
        "+OK\r\n"
    );
    assert_eq!(
        r.cmd(&["CONFIG", "GET", "raft.ignored-commands"]),
        "*2\r\n$21\r\nraft.ignored-commands\r\n$10\r\nincr, decr\r\n"
    );
    assert_eq!(r.cmd(&["INCR", "local"]), ":1\r\n");
    assert_eq!(r.cmd(&["SET", "replicated", "1"]), "+OK\r\n");
    c.wait_applied_everywhere(Duration::from_secs(10));
    for i in (0..3).filter(|&i| i != l) {
        assert_eq!(c.local(i, &["EXISTS", "local"]), Value::Int(0), "node {i}");
        assert_eq!(
            c.local(i, &["EXISTS", "replicated"]),
            Value::Int(1),
            "node {i}"
        );
    }
    assert_eq!(
        r.cmd(&["CONFIG", "SET", "raft.ignored-commands", ""]),
        "+OK\r\n"
    );
    assert_eq!(r.cmd(&["INCR", "counted"]), ":1\r\n");
    assert!(r
        .cmd(&["CONFIG", "SET", "raft.ignored-commands", "incr decr"])
        .starts_with("-ERR"));
    c.wait_applied_everywhere(Duration::from_secs(10));
    for i in 0..3 {
        assert_eq!(
            c.local(i, &["GET", "counted"]),
            Value::BulkString(b"1".to_vec()),
            "node {i}"
        );
    }
}

#[test]
fn watch_aborts_exec_when_a_watched_key_changed_on_every_node_alike() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    let port = c.nodes[l].def.port;
    let mut a = RawConn::open(port);
    let mut b = RawConn::open(port);
    assert_eq!(a.cmd(&["SET", "k", "0"]), "+OK\r\n");
    // Modified by another client after WATCH: EXEC returns the null reply, nothing runs.
    assert_eq!(a.cmd(&["WATCH", "k", "other"]), "+OK\r\n");
    assert_eq!(b.cmd(&["SET", "k", "by-b"]), "+OK\r\n");
    assert_eq!(a.cmd(&["MULTI"]), "+OK\r\n");
    assert_eq!(a.cmd(&["SET", "k", "by-a"]), "+QUEUED\r\n");
    assert_eq!(a.cmd(&["SET", "side", "effect"]), "+QUEUED\r\n");
    assert_eq!(a.cmd(&["EXEC"]), "*-1\r\n");
    // Not modified: EXEC runs. EXEC unwatched everything, so b's write no longer matters.
    assert_eq!(b.cmd(&["SET", "k", "by-b-again"]), "+OK\r\n");
    assert_eq!(a.cmd(&["WATCH", "k"]), "+OK\r\n");
    assert_eq!(a.cmd(&["MULTI"]), "+OK\r\n");
    assert_eq!(a.cmd(&["INCR", "n"]), "+QUEUED\r\n");
    assert_eq!(a.cmd(&["EXEC"]), "*1\r\n:1\r\n");
    // UNWATCH forgets; DISCARD unwatches too.
    assert_eq!(a.cmd(&["WATCH", "k"]), "+OK\r\n");
    assert_eq!(a.cmd(&["UNWATCH"]), "+OK\r\n");
    assert_eq!(b.cmd(&["SET", "k", "x"]), "+OK\r\n");
    assert_eq!(a.cmd(&["MULTI"]), "+OK\r\n");
    assert_eq!(a.cmd(&["INCR", "n"]), "+QUEUED\r\n");
    assert_eq!(a.cmd(&["EXEC"]), "*1\r\n:2\r\n");
    // FLUSHALL touches every key.
    assert_eq!(a.cmd(&["WATCH", "k"]), "+OK\r\n");
    assert_eq!(b.cmd(&["FLUSHALL"]), "+OK\r\n");
    assert_eq!(a.cmd(&["MULTI"]), "+OK\r\n");
    assert_eq!(a.cmd(&["SET", "after", "flush"]), "+QUEUED\r\n");
    assert_eq!(a.cmd(&["EXEC"]), "*-1\r\n");
    // WATCH inside MULTI is refused as the server under test refuses it (Redis 7: the
    // transaction goes on; Valkey 8: it aborts).
    let steps: &[&[&str]] = &[&["MULTI"], &["WATCH", "k"], &["EXEC"]];
    let plain = PlainRedis::start();
    let ours = session(port, steps);
    assert_eq!(ours, session(plain.port, steps));
    assert!(ours[1].starts_with("-ERR "), "{ours:?}");
    // WATCH on a follower redirects to where EXEC must go.
    let mut f = RawConn::open(c.nodes[(l + 1) % 3].def.port);
    assert_eq!(
        f.cmd(&["WATCH", "k"]),
        format!("-MOVED 0 127.0.0.1:{port}\r\n")
    );
    c.wait_applied_everywhere(Duration::from_secs(10));
    for i in 0..3 {
        assert_eq!(c.local(i, &["EXISTS", "side"]), Value::Int(0), "node {i}");
        assert_eq!(c.local(i, &["EXISTS", "after"]), Value::Int(0), "node {i}");
        assert_eq!(c.local(i, &["DBSIZE"]), Value::Int(0), "node {i}");
    }
}

/// Redis 7.0: a watched key that existed at WATCH and expired by itself before EXEC aborts
/// the transaction; the entry carries the leader's clock, so every node decides alike.
#[test]
fn watch_aborts_exec_when_a_watched_key_expired_by_itself() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    let mut a = RawConn::open(c.nodes[l].def.port);
    assert_eq!(a.cmd(&["SET", "long", "v", "EX", "100"]), "+OK\r\n");
    assert_eq!(a.cmd(&["SET", "short", "v", "PX", "2000"]), "+OK\r\n");
    // Expires between WATCH and EXEC: aborted, the queued write never runs.
    assert_eq!(a.cmd(&["WATCH", "short", "long"]), "+OK\r\n");
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(a.cmd(&["MULTI"]), "+OK\r\n");
    assert_eq!(a.cmd(&["SET", "expired-side", "1"]), "+QUEUED\r\n");
    assert_eq!(a.cmd(&["EXEC"]), "*-1\r\n");
    // A TTL that has not passed does not abort.
    assert_eq!(a.cmd(&["WATCH", "long"]), "+OK\r\n");
    assert_eq!(a.cmd(&["MULTI"]), "+OK\r\n");
    assert_eq!(a.cmd(&["SET", "kept-side", "1"]), "+QUEUED\r\n");
    assert_eq!(a.cmd(&["EXEC"]), "*1\r\n+OK\r\n");
    // A key already gone at WATCH is watched as missing, as in Redis: no abort.
    assert_eq!(a.cmd(&["WATCH", "short"]), "+OK\r\n");
    assert_eq!(a.cmd(&["MULTI"]), "+OK\r\n");
    assert_eq!(a.cmd(&["SET", "missing-side", "1"]), "+QUEUED\r\n");
    assert_eq!(a.cmd(&["EXEC"]), "*1\r\n+OK\r\n");
    c.wait_applied_everywhere(Duration::from_secs(10));
    for i in 0..3 {
        assert_eq!(
            c.local(i, &["EXISTS", "expired-side"]),
            Value::Int(0),
            "node {i}"
        );
        assert_eq!(
            c.local(i, &["EXISTS", "kept-side"]),
            Value::Int(1),
            "node {i}"
        );
        assert_eq!(
            c.local(i, &["EXISTS", "missing-side"]),
            Value::Int(1),
            "node {i}"
        );
    }
}

#[test]
fn flushing_trips_only_watched_keys_that_existed_as_in_redis() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    let mut a = RawConn::open(c.nodes[l].def.port);
    let mut b = RawConn::open(c.nodes[l].def.port);
    for flush in ["FLUSHDB", "FLUSHALL"] {
        // Missing at WATCH, still missing after the flush: EXEC runs.
        assert_eq!(a.cmd(&["WATCH", "x"]), "+OK\r\n");
        assert_eq!(b.cmd(&[flush]), "+OK\r\n");
        assert_eq!(a.cmd(&["MULTI"]), "+OK\r\n");
        assert_eq!(a.cmd(&["PING"]), "+QUEUED\r\n");
        assert_eq!(a.cmd(&["EXEC"]), "*1\r\n+PONG\r\n", "{flush}");
        // Existing at WATCH and flushed: EXEC aborts.
        assert_eq!(b.cmd(&["SET", "y", "1"]), "+OK\r\n");
        assert_eq!(a.cmd(&["WATCH", "y"]), "+OK\r\n");
        assert_eq!(b.cmd(&[flush]), "+OK\r\n");
        assert_eq!(a.cmd(&["MULTI"]), "+OK\r\n");
        assert_eq!(a.cmd(&["SET", "side", "1"]), "+QUEUED\r\n");
        assert_eq!(a.cmd(&["EXEC"]), "*-1\r\n", "{flush}");
        // Missing at WATCH, written after it: EXEC aborts, flush or not.
        assert_eq!(a.cmd(&["WATCH", "z"]), "+OK\r\n");
        assert_eq!(b.cmd(&["SET", "z", "1"]), "+OK\r\n");
        assert_eq!(b.cmd(&[flush]), "+OK\r\n");
        assert_eq!(a.cmd(&["MULTI"]), "+OK\r\n");
        assert_eq!(a.cmd(&["SET", "side", "1"]), "+QUEUED\r\n");
        assert_eq!(a.cmd(&["EXEC"]), "*-1\r\n", "{flush}");
    }
    c.wait_applied_everywhere(Duration::from_secs(10));
    for i in 0..3 {
        assert_eq!(c.local(i, &["DBSIZE"]), Value::Int(0), "node {i}");
    }
}

#[test]
fn publish_through_the_leader_reaches_subscribers_on_every_node() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    let mut subs: Vec<RawConn> = (0..3).map(|i| RawConn::open(c.nodes[i].def.port)).collect();
    for s in &mut subs {
        assert_eq!(
            s.cmd(&["SUBSCRIBE", "news"]),
            "*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"
        );
    }
    let mut p = RawConn::open(c.nodes[l].def.port);
    // The count is the leader's own subscribers, as PUBLISH in Redis Cluster counts its node's.
    assert_eq!(p.cmd(&["PUBLISH", "news", "hello"]), ":1\r\n");
    assert_eq!(p.cmd(&["PUBLISH", "news", "world"]), ":1\r\n");
    for (i, s) in subs.iter_mut().enumerate() {
        assert_eq!(
            s.read(),
            "*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n",
            "node {i}"
        );
        assert_eq!(
            s.read(),
            "*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nworld\r\n",
            "node {i}"
        );
    }
    // Publishing on a follower redirects, like any write.
    let mut f = RawConn::open(c.nodes[(l + 1) % 3].def.port);
    assert!(f.cmd(&["PUBLISH", "news", "x"]).starts_with("-MOVED"));
}

#[test]
fn scripts_and_functions_compute_the_same_on_every_node() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    let mut r = RawConn::open(c.nodes[l].def.port);
    assert_eq!(r.cmd(&["SADD", "s", "c", "a", "d", "b"]), ":4\r\n");
    assert_eq!(r.cmd(&["HSET", "h", "f2", "v2", "f1", "v1"]), ":2\r\n");
    // Arbitrary-order output is sorted inside scripts, so writes that depend on it agree.
    let script = "local m = redis.call('SMEMBERS', KEYS[1]); redis.call('SET', KEYS[2], table.concat(m, ',')); return m";
    assert_eq!(
        r.cmd(&["EVAL", script, "2", "s", "joined"]),
        "*4\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n$1\r\nd\r\n"
    );
    assert_eq!(
        r.cmd(&["EVAL", "return redis.call('HGETALL', KEYS[1])", "1", "h"]),
        "*4\r\n$2\r\nf1\r\n$2\r\nv1\r\n$2\r\nf2\r\n$2\r\nv2\r\n"
    );
    // Random results are refused with a clear error.
    let e = r.cmd(&[
        "EVAL",
        "return redis.call('SRANDMEMBER', KEYS[1])",
        "1",
        "s",
    ]);
    assert!(
        e.starts_with("-") && e.contains("SRANDMEMBER has random results"),
        "{e}"
    );
    // SCRIPT LOAD reaches every node, so EVALSHA works wherever the entry is applied.
    let sha_reply = r.cmd(&["SCRIPT", "LOAD", "return redis.call('INCR', KEYS[1])"]);
    let sha = sha_reply.lines().nth(1).unwrap().to_string();
    assert_eq!(r.cmd(&["EVALSHA", &sha, "1", "counter"]), ":1\r\n");
    // Functions.
    let lib = "#!lua name=mylib\nredis.register_function('incr2', function(keys, args) return redis.call('INCRBY', keys[1], 2) end)";
    assert_eq!(r.cmd(&["FUNCTION", "LOAD", lib]), "$5\r\nmylib\r\n");
    assert_eq!(r.cmd(&["FCALL", "incr2", "1", "counter"]), ":3\r\n");
    c.wait_applied_everywhere(Duration::from_secs(10));
    for i in 0..3 {
        assert_eq!(
            c.local(i, &["GET", "joined"]),
            Value::BulkString(b"a,b,c,d".to_vec()),
            "node {i}"
        );
        assert_eq!(
            c.local(i, &["GET", "counter"]),
            Value::BulkString(b"3".to_vec()),
            "node {i}"
        );
        assert_eq!(
            c.local(i, &["SCRIPT", "EXISTS", &sha]),
            Value::Array(vec![Value::Int(1)]),
            "node {i}"
        );
    }
}

#[test]
fn stream_ids_generated_with_star_are_the_same_on_every_node() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    let mut r = RawConn::open(c.nodes[l].def.port);
    let mut ids = Vec::new();
    for i in 0..20 {
        let reply = r.cmd(&[
            "XADD",
            "st",
            "MAXLEN",
            "~",
            "1000",
            "*",
            "n",
            &i.to_string(),
        ]);
        assert!(reply.starts_with('$'), "{reply}");
        ids.push(reply.lines().nth(1).unwrap().to_string());
    }
    let mut sorted = ids.clone();
    sorted.sort_by_key(|id| {
        let (a, b) = id.split_once('-').unwrap();
        (a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap())
    });
    assert_eq!(ids, sorted, "IDs grow");
    // An explicit ID below the top is refused as Redis does; a missing stream with NOMKSTREAM is nil.
    assert!(r.cmd(&["XADD", "st", "1-1", "f", "v"]).starts_with("-ERR"));
    assert_eq!(
        r.cmd(&["XADD", "nost", "NOMKSTREAM", "*", "f", "v"]),
        "$-1\r\n"
    );
    assert_eq!(r.cmd(&["XGROUP", "CREATE", "st", "g", "0"]), "+OK\r\n");
    assert!(r
        .cmd(&[
            "XREADGROUP",
            "GROUP",
            "g",
            "c1",
            "COUNT",
            "5",
            "STREAMS",
            "st",
            ">"
        ])
        .starts_with("*1"));
    c.wait_applied_everywhere(Duration::from_secs(10));
    let first = c.local(0, &["XRANGE", "st", "-", "+"]);
    let pending = c.local(0, &["XPENDING", "st", "g"]);
    for i in 1..3 {
        assert_eq!(c.local(i, &["XRANGE", "st", "-", "+"]), first, "node {i}");
        assert_eq!(c.local(i, &["XPENDING", "st", "g"]), pending, "node {i}");
    }
}

#[test]
fn commands_of_a_module_loaded_later_are_classified() {
    let mut c = Cluster::define(3);
    for n in &mut c.nodes {
        n.extra = vec!["--enable-module-command".into(), "yes".into()];
    }
    for i in 0..3 {
        c.start_node(i);
    }
    let l = c.wait_leader(Duration::from_secs(10));
    let so = common::build_test_module(c.tmp.path(), "counter");
    let so = so.to_string_lossy().into_owned();
    for i in 0..3 {
        let mut r = RawConn::open(c.nodes[i].def.port);
        assert_eq!(r.cmd(&["MODULE", "LOAD", &so]), "+OK\r\n", "node {i}");
    }
    let mut r = RawConn::open(c.nodes[l].def.port);
    assert_eq!(r.cmd(&["COUNTER.INCRBY", "n", "5"]), ":5\r\n");
    assert_eq!(r.cmd(&["COUNTER.GET", "n"]), "$1\r\n5\r\n");
    // Its write is replicated; on a follower both redirect like Redis's own commands.
    let mut f = RawConn::open(c.nodes[(l + 1) % 3].def.port);
    assert!(f.cmd(&["COUNTER.INCRBY", "n", "1"]).starts_with("-MOVED"));
    assert!(f.cmd(&["COUNTER.GET", "n"]).starts_with("-MOVED"));
    c.wait_applied_everywhere(Duration::from_secs(10));
    for i in 0..3 {
        assert_eq!(
            c.local(i, &["GET", "n"]),
            Value::BulkString(b"5".to_vec()),
            "node {i}"
        );
    }
}

#[test]
fn random_reads_inside_multi_are_not_refused() {
    // Only scripts must be deterministic: a transaction's reads answer one client.
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    let mut r = RawConn::open(c.nodes[l].def.port);
    assert_eq!(r.cmd(&["SADD", "s", "only"]), ":1\r\n");
    assert_eq!(r.cmd(&["MULTI"]), "+OK\r\n");
    assert_eq!(r.cmd(&["SRANDMEMBER", "s"]), "+QUEUED\r\n");
    assert_eq!(r.cmd(&["SMEMBERS", "s"]), "+QUEUED\r\n");
    assert_eq!(r.cmd(&["EXEC"]), "*2\r\n$4\r\nonly\r\n*1\r\n$4\r\nonly\r\n");
}

/// Runs `steps` on a fresh connection to `port`; each reply as raw RESP, then "<closed>" if
/// the server closed the connection after the last step.
fn session(port: u16, steps: &[&[&str]]) -> Vec<String> {
    let mut r = RawConn::open(port);
    let mut out: Vec<String> = steps.iter().map(|s| r.cmd(s)).collect();
    if steps
        .last()
        .is_some_and(|s| s[0].eq_ignore_ascii_case("quit"))
        && r.closed()
    {
        out.push("<closed>".into());
    }
    out
}

#[test]
fn connection_and_misplaced_commands_inside_multi_reply_as_redis_does() {
    let plain = PlainRedis::start();
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    let port = c.nodes[l].def.port;
    let same: &[&[&[&str]]] = &[
        // Not queued, and the transaction goes on.
        &[&["MULTI"], &["MULTI"], &["SET", "m1", "1"], &["EXEC"]],
        &[&["MULTI"], &["WATCH", "m2"], &["SET", "m2", "1"], &["EXEC"]],
        // `no_multi` commands are refused and abort the transaction.
        &[&["MULTI"], &["SHUTDOWN"], &["SET", "m3", "1"], &["EXEC"]],
        &[&["MULTI"], &["SAVE"], &["EXEC"]],
        &[&["MULTI"], &["SAVE", "x"], &["EXEC"]],
        // RESET ends the transaction at once.
        &[
            &["MULTI"],
            &["SET", "m4", "1"],
            &["RESET"],
            &["EXEC"],
            &["GET", "m4"],
        ],
        // QUIT answers and closes; nothing runs.
        &[&["MULTI"], &["SET", "m5", "1"], &["QUIT"]],
        &[&["GET", "m5"]],
        // An unknown subcommand is refused and aborts the transaction.
        &[
            &["MULTI"],
            &["CLIENT", "NOPE"],
            &["SET", "m6", "1"],
            &["EXEC"],
        ],
        &[&["GET", "m6"]],
        // Queued, and run at EXEC as Redis runs them.
        &[
            &["MULTI"],
            &["CLIENT", "SETNAME", "n1"],
            &["CLIENT", "GETNAME"],
            &["CLIENT", "SETNAME", "bad name"],
            &["ACL", "WHOAMI"],
            &["WAIT", "0", "0"],
            &["WAIT", "1", "0"],
            &["WAIT", "1", "-1"],
            &["READONLY"],
            &["READWRITE"],
            &["ASKING"],
            &["EXEC"],
            &["CLIENT", "GETNAME"],
        ],
        // Protected commands are refused at queue time (enable-debug-command and
        // enable-module-command are "no" by default).
        &[&["MULTI"], &["DEBUG", "SLEEP", "0"], &["EXEC"]],
        &[
            &["MULTI"],
            &["MODULE", "LOAD", "/nonexistent.so"],
            &["EXEC"],
        ],
        &[&["MULTI"], &["ACL", "WHOAMI", "x"], &["EXEC"]],
    ];
    for steps in same {
        assert_eq!(
            session(port, steps),
            session(plain.port, steps),
            "{steps:?}"
        );
    }
    // CLIENT ID inside MULTI is the client's own id.
    let mut r = RawConn::open(port);
    let id = r.cmd(&["CLIENT", "ID"]);
    assert_eq!(r.cmd(&["MULTI"]), "+OK\r\n");
    assert_eq!(r.cmd(&["CLIENT", "ID"]), "+QUEUED\r\n");
    assert_eq!(r.cmd(&["EXEC"]), format!("*1\r\n{id}"));
    // While a client is in MULTI, the same commands from other clients answer as Redis's.
    let mut holder = RawConn::open(port);
    assert_eq!(holder.cmd(&["MULTI"]), "+OK\r\n");
    let outside: &[&[&str]] = &[
        &["CLIENT", "SETNAME", "n2"],
        &["CLIENT", "GETNAME"],
        &["CLIENT", "SETNAME", "bad name"],
        &["ACL", "WHOAMI"],
        &["WAIT", "0", "0"],
        &["WAIT", "1", "200"],
        &["WAIT", "x", "0"],
        &["READONLY"],
        &["DEBUG", "SLEEP", "0"],
        &["MODULE", "LOAD", "/nonexistent.so"],
        &["CLIENT", "GETNAME", "x"],
        &["PING"],
    ];
    let t0 = std::time::Instant::now();
    assert_eq!(session(port, outside), session(plain.port, outside));
    assert!(
        t0.elapsed() >= Duration::from_millis(400),
        "WAIT 1 200 waited its timeout on both"
    );
    assert_eq!(holder.cmd(&["EXEC"]), "*0\r\n");
    // Commands acting on the connection itself cannot be queued by redis-raft on Redis 7.0:
    // they run at once, and EXEC then refuses the transaction (Redis queues them and runs
    // them at EXEC).
    assert_eq!(r.cmd(&["MULTI"]), "+OK\r\n");
    assert_eq!(r.cmd(&["SET", "m7", "1"]), "+QUEUED\r\n");
    assert!(r.cmd(&["HELLO", "2"]).starts_with("*14\r\n"));
    assert_eq!(r.cmd(&["SET", "m7", "2"]), "+QUEUED\r\n");
    assert_eq!(
        r.cmd(&["EXEC"]),
        "-EXECABORT Transaction discarded because HELLO ran at once inside MULTI: redis-raft cannot queue commands that act on the connection (Redis 7.0 does not tell a module which client sent a command)\r\n"
    );
    assert_eq!(r.cmd(&["GET", "m7"]), "$-1\r\n");
    // Pipelined in one write, too.
    r.send(&["MULTI"]);
    r.send(&["AUTH", "nopass"]);
    r.send(&["EXEC"]);
    assert_eq!(r.read(), "+OK\r\n");
    assert!(r
        .read()
        .starts_with("-ERR AUTH <password> called without any password"));
    assert!(r
        .read()
        .starts_with("-EXECABORT Transaction discarded because AUTH ran at once"));
    // Another client's connection commands meanwhile leave this transaction alone.
    assert_eq!(r.cmd(&["MULTI"]), "+OK\r\n");
    assert_eq!(r.cmd(&["SET", "m8", "1"]), "+QUEUED\r\n");
    let mut other = RawConn::open(port);
    assert_eq!(other.cmd(&["CLIENT", "NO-EVICT", "on"]), "+OK\r\n");
    assert_eq!(other.cmd(&["RESET"]), "+RESET\r\n");
    assert_eq!(r.cmd(&["EXEC"]), "*1\r\n+OK\r\n");
    // SHUTDOWN from a client not in MULTI still shuts the node down while one is.
    let f = (l + 1) % 3;
    let mut t = RawConn::open(c.nodes[f].def.port);
    assert_eq!(t.cmd(&["MULTI"]), "+OK\r\n");
    let mut admin = RawConn::open(c.nodes[f].def.port);
    admin.send(&["SHUTDOWN", "NOSAVE"]);
    assert!(admin.closed());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while c.nodes[f].is_running() {
        assert!(
            std::time::Instant::now() < deadline,
            "node {f} still running"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn min_replicas_to_write_refuses_writes_and_lets_reads_and_read_only_scripts_run_as_redis() {
    let plain = PlainRedis::start();
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    let steps: &[&[&str]] = &[
        &["SET", "a", "b"],
        &["CONFIG", "SET", "min-replicas-to-write", "1"],
        &["GET", "a"],
        &["SET", "a", "c"],
        &["EVAL", "return redis.call('GET', KEYS[1])", "1", "a"],
        &[
            "EVAL",
            "#!lua flags=no-writes\nreturn redis.call('GET', KEYS[1])",
            "1",
            "a",
        ],
        &["EVAL", "#!lua\nreturn redis.call('GET', KEYS[1])", "1", "a"],
        &["EVAL", "return redis.call('SET', KEYS[1], 'd')", "1", "a"],
        &["EVAL_RO", "return redis.call('GET', KEYS[1])", "1", "a"],
        &["MULTI"],
        &["SET", "a", "e"],
        &["EXEC"],
        &["CONFIG", "SET", "min-replicas-to-write", "0"],
        &["SET", "x", "y"],
        &["GET", "a"],
    ];
    let ours = session(c.nodes[l].def.port, steps);
    assert_eq!(ours, session(plain.port, steps));
    assert!(ours[3].starts_with("-NOREPLICAS"), "{ours:?}");
    c.wait_applied_everywhere(Duration::from_secs(10));
    for i in 0..3 {
        assert_eq!(
            c.local(i, &["GET", "a"]),
            Value::BulkString(b"b".to_vec()),
            "node {i}"
        );
    }
}

#[test]
fn scripts_that_redis_rejects_get_redis_s_own_error() {
    let plain = PlainRedis::start();
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    let steps: &[&[&str]] = &[
        &["EVAL", "x = 5 return 1", "0"],
        &["EVAL", "print('hi') return 1", "0"],
        &["EVAL", "return loadfile('/etc/passwd')", "0"],
        &["EVAL", "\x1bLuaQ\x00\x01\x04\x08", "0"],
        &["EVAL", "return redis.call('nosuchcmd')", "0"],
        &["EVAL", "return redis.call('get')", "0"],
        &["EVAL", "return 1 +", "0"],
        &["EVAL", "#!lua flags=bogus\nreturn 1", "0"],
        &["EVAL", "#!nolua\nreturn 1", "0"],
        &["EVAL", "return redis.call('EVAL', 'return 1', '0')", "0"],
        &["EVAL", "return _G.x", "0"],
        &["EVALSHA", "0000000000000000000000000000000000000000", "0"],
        &["FUNCTION", "LOAD", "#!lua name=x\nprint(1)"],
        &["FCALL", "nofunc", "0"],
    ];
    let ours = session(c.nodes[l].def.port, steps);
    assert_eq!(ours, session(plain.port, steps));
    assert!(ours.iter().all(|r| r.starts_with('-')), "{ours:?}");
}

#[test]
fn monitor_and_slowlog_show_the_command_not_raft() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    let port = c.nodes[l].def.port;
    let mut mon = RawConn::open(port);
    assert_eq!(mon.cmd(&["MONITOR"]), "+OK\r\n");
    let mut p = RawConn::open(port);
    assert_eq!(
        p.cmd(&["CONFIG", "SET", "slowlog-log-slower-than", "0"]),
        "+OK\r\n"
    );
    assert_eq!(p.cmd(&["SLOWLOG", "RESET"]), "+OK\r\n");
    assert_eq!(p.cmd(&["SET", "mk", "mv"]), "+OK\r\n");
    assert_eq!(p.cmd(&["GET", "mk"]), "$2\r\nmv\r\n");
    let mut seen: Vec<String> = Vec::new();
    while !seen.iter().any(|l| l.contains("\"GET\" \"mk\"")) {
        assert!(seen.len() < 50, "{seen:?}");
        seen.push(mon.read());
    }
    assert!(
        seen.iter().any(|l| l.contains("\"SET\" \"mk\" \"mv\"")),
        "{seen:?}"
    );
    assert!(!seen.iter().any(|l| l.contains("\"RAFT\"")), "{seen:?}");
    let slow = p.cmd(&["SLOWLOG", "GET", "20"]);
    assert!(slow.contains("$3\r\nSET\r\n$2\r\nmk\r\n"), "{slow}");
    assert!(!slow.contains("RAFT"), "{slow}");
}

/// Whether the server under test is Redis 7.2 or newer (or Valkey): module commands can
/// have ACL categories there.
fn server_has_acl_categories(c: &Cluster, i: usize) -> bool {
    let Ok(Value::BulkString(info)) = q(c, i, &["INFO", "server"]) else {
        return false;
    };
    let info = String::from_utf8_lossy(&info).into_owned();
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("0.0");
    let mut parts = version
        .trim()
        .split('.')
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (7, 2)
}

#[test]
fn users_with_read_and_write_categories_run_reads_and_writes_where_the_server_allows() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    let port = c.nodes[l].def.port;
    let mut admin = RawConn::open(port);
    for (user, cats) in [("rw", ["+@read", "+@write"]), ("ro", ["+@read", "-@write"])] {
        let setuser = ["ACL", "SETUSER", user, "on", ">pw", "~*", cats[0], cats[1]];
        assert_eq!(admin.cmd(&setuser), "+OK\r\n");
    }
    let mut rw = RawConn::open(port);
    assert_eq!(rw.cmd(&["AUTH", "rw", "pw"]), "+OK\r\n");
    let mut ro = RawConn::open(port);
    assert_eq!(ro.cmd(&["AUTH", "ro", "pw"]), "+OK\r\n");
    if server_has_acl_categories(&c, l) {
        assert_eq!(rw.cmd(&["SET", "k", "v"]), "+OK\r\n");
        assert_eq!(rw.cmd(&["GET", "k"]), "$1\r\nv\r\n");
        assert_eq!(ro.cmd(&["GET", "k"]), "$1\r\nv\r\n");
        assert!(ro.cmd(&["SET", "k", "w"]).starts_with("-NOPERM"));
    } else {
        // Redis 7.0: a module command has no categories; the routing command must be
        // granted by name (README).
        assert!(rw.cmd(&["SET", "k", "v"]).starts_with("-NOPERM"));
        assert_eq!(admin.cmd(&["ACL", "SETUSER", "rw", "+raft"]), "+OK\r\n");
        assert_eq!(rw.cmd(&["SET", "k", "v"]), "+OK\r\n");
        assert_eq!(rw.cmd(&["GET", "k"]), "$1\r\nv\r\n");
    }
    c.wait_applied_everywhere(Duration::from_secs(10));
    for i in 0..3 {
        assert_eq!(
            c.local(i, &["GET", "k"]),
            Value::BulkString(b"v".to_vec()),
            "node {i}"
        );
    }
}
