//! Snapshot files of the dataset (src/snapshot/): RAFT.DEBUG SNAPSHOT SAVE on one node and
//! LOAD on another, compared key by key; damaged files; concurrent and failing saves.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use redis_raft::snapshot::format;

const DATABASES: i64 = 16;

/// A 1-node cluster, with extra redis-server arguments.
fn single(extra: &[&str]) -> Cluster {
    let mut c = Cluster::define(1);
    c.nodes[0].extra = extra.iter().map(|s| s.to_string()).collect();
    c.start_node(0);
    c.wait_leader(Duration::from_secs(15));
    c
}

fn conn_db(c: &Cluster, i: usize, db: i64) -> redis::Connection {
    let client = redis::Client::open(format!("redis://127.0.0.1:{}/{db}", c.nodes[i].def.port))
        .expect("client");
    let conn = client
        .get_connection_with_timeout(Duration::from_secs(2))
        .expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    conn
}

/// RAFT.DEBUG EXEC in database `db`.
fn local_db(c: &Cluster, i: usize, db: i64, args: &[&[u8]]) -> Value {
    let mut conn = conn_db(c, i, db);
    let mut cmd = redis::cmd("RAFT.DEBUG");
    cmd.arg("EXEC");
    for a in args {
        cmd.arg(*a);
    }
    cmd.query(&mut conn).expect("RAFT.DEBUG EXEC")
}

/// Runs a command through the cluster (replicated) in database `db`; returns its reply.
fn write_db(conn: &mut redis::Connection, args: &[&str]) -> Value {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(conn).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn total_keys(c: &Cluster, i: usize) -> i64 {
    (0..DATABASES)
        .map(|db| match local_db(c, i, db, &[b"DBSIZE"]) {
            Value::Int(n) => n,
            other => panic!("DBSIZE: {other:?}"),
        })
        .sum()
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

fn save(c: &Cluster, i: usize, path: &Path) -> String {
    RawConn::open(c.nodes[i].def.port).cmd(&["RAFT.DEBUG", "SNAPSHOT", "SAVE", &path_str(path)])
}

fn load(c: &Cluster, i: usize, path: &Path) -> String {
    RawConn::open(c.nodes[i].def.port).cmd(&["RAFT.DEBUG", "SNAPSHOT", "LOAD", &path_str(path)])
}

fn save_reply(keys: i64, bytes: u64) -> String {
    format!("*4\r\n$4\r\nkeys\r\n:{keys}\r\n$5\r\nbytes\r\n:{bytes}\r\n")
}

fn load_reply(keys: i64) -> String {
    format!(":{keys}\r\n")
}

fn sorted(v: Value) -> Value {
    match v {
        Value::Array(mut items) => {
            items.sort_by_key(|x| format!("{x:?}"));
            Value::Array(items)
        }
        other => other,
    }
}

/// HGETALL's flat field/value list as sorted pairs.
fn sorted_pairs(v: Value) -> Vec<(String, String)> {
    let Value::Array(items) = v else {
        panic!("HGETALL: {v:?}")
    };
    let mut pairs: Vec<(String, String)> = items
        .chunks(2)
        .map(|p| (format!("{:?}", p[0]), format!("{:?}", p[1])))
        .collect();
    pairs.sort();
    pairs
}

fn bulk(v: &Value) -> Vec<u8> {
    match v {
        Value::BulkString(b) => b.clone(),
        Value::SimpleString(s) => s.clone().into_bytes(),
        other => panic!("expected a string, got {other:?}"),
    }
}

/// Asserts node `ai` of `a` and node `bi` of `b` hold the same keys in every database, each
/// with the same type, encoding, value and absolute expiry. Returns the number of keys.
fn assert_same_dataset(a: &Cluster, ai: usize, b: &Cluster, bi: usize) -> i64 {
    let mut compared = 0;
    for db in 0..DATABASES {
        let keys = |c: &Cluster, i: usize| -> Vec<Vec<u8>> {
            let Value::Array(ks) = local_db(c, i, db, &[b"KEYS", b"*"]) else {
                panic!("KEYS")
            };
            let mut ks: Vec<Vec<u8>> = ks.iter().map(bulk).collect();
            ks.sort();
            ks
        };
        let ka = keys(a, ai);
        assert_eq!(ka, keys(b, bi), "keys of database {db}");
        for k in &ka {
            let k = k.as_slice();
            let both = |args: &[&[u8]]| (local_db(a, ai, db, args), local_db(b, bi, db, args));
            let what = format!("db {db} key {:?}", String::from_utf8_lossy(k));
            let (ta, tb) = both(&[b"TYPE", k]);
            assert_eq!(ta, tb, "TYPE of {what}");
            let (pa, pb) = both(&[b"PEXPIRETIME", k]);
            assert_eq!(pa, pb, "PEXPIRETIME of {what}");
            let ty = String::from_utf8(bulk(&ta)).expect("type name");
            // A restored short string is embstr where PFADD/SETBIT made it raw, as with
            // Redis's own RDB: the bytes (DUMP) are what must match.
            if ty != "string" {
                let (ea, eb) = both(&[b"OBJECT", b"ENCODING", k]);
                assert_eq!(ea, eb, "OBJECT ENCODING of {what}");
            }
            match ty.as_str() {
                // Deterministic serializations: compare the DUMP payloads byte for byte.
                "string" | "rraft-box" | "list" => {
                    let (da, db_) = both(&[b"DUMP", k]);
                    assert_eq!(da, db_, "DUMP of {what}");
                }
                // Hash-table order depends on each process's hash seed: compare the values.
                "hash" => {
                    let (va, vb) = both(&[b"HGETALL", k]);
                    assert_eq!(sorted_pairs(va), sorted_pairs(vb), "HGETALL of {what}");
                }
                "set" => {
                    let (va, vb) = both(&[b"SMEMBERS", k]);
                    assert_eq!(sorted(va), sorted(vb), "SMEMBERS of {what}");
                }
                "zset" => {
                    let (va, vb) = both(&[b"ZRANGE", k, b"0", b"-1", b"WITHSCORES"]);
                    assert_eq!(va, vb, "ZRANGE of {what}");
                }
                "stream" => {
                    let (va, vb) = both(&[b"XRANGE", k, b"-", b"+"]);
                    assert_eq!(va, vb, "XRANGE of {what}");
                    let (va, vb) = both(&[b"XINFO", b"STREAM", k, b"FULL"]);
                    assert_eq!(va, vb, "XINFO STREAM FULL of {what}");
                }
                other => panic!("unexpected type {other} for {what}"),
            }
            compared += 1;
        }
    }
    compared
}

/// Writes one of each data type, with TTLs, in several databases, through Raft.
fn write_matrix(c: &Cluster) {
    let mut w = conn_db(c, 0, 0);
    let ok = Value::Okay;
    assert_eq!(write_db(&mut w, &["SET", "str", "hello"]), ok);
    assert_eq!(write_db(&mut w, &["SET", "int", "12345"]), ok);
    let big = "x".repeat(20_000);
    assert_eq!(write_db(&mut w, &["SET", "bigstr", &big]), ok);
    assert_eq!(write_db(&mut w, &["SET", "bin\x00\r\nkey", "v\x00"]), ok);
    assert_eq!(
        write_db(&mut w, &["RPUSH", "list", "a", "b", "c"]),
        Value::Int(3)
    );
    let many: Vec<String> = (0..600).map(|i| format!("item-{i}")).collect();
    let mut args = vec!["RPUSH", "biglist"];
    args.extend(many.iter().map(|s| s.as_str()));
    assert_eq!(write_db(&mut w, &args), Value::Int(600));
    assert_eq!(
        write_db(&mut w, &["HSET", "hash", "f1", "v1", "f2", "v2"]),
        Value::Int(2)
    );
    let mut args = vec!["HSET", "bighash"];
    for s in &many {
        args.push(s);
        args.push(s);
    }
    assert_eq!(write_db(&mut w, &args), Value::Int(600));
    assert_eq!(
        write_db(&mut w, &["SADD", "set", "a", "b", "c"]),
        Value::Int(3)
    );
    assert_eq!(
        write_db(&mut w, &["SADD", "intset", "1", "2", "3"]),
        Value::Int(3)
    );
    let mut args = vec!["SADD", "bigset"];
    args.extend(many.iter().map(|s| s.as_str()));
    assert_eq!(write_db(&mut w, &args), Value::Int(600));
    assert_eq!(
        write_db(&mut w, &["ZADD", "zset", "1", "a", "2.5", "b"]),
        Value::Int(2)
    );
    let scores: Vec<String> = (0..600).map(|i| format!("{}", i as f64 / 3.0)).collect();
    let mut args = vec!["ZADD", "bigzset"];
    for (s, m) in scores.iter().zip(&many) {
        args.push(s);
        args.push(m);
    }
    assert_eq!(write_db(&mut w, &args), Value::Int(600));
    for i in 1..=5 {
        let id = format!("{i}-1");
        assert_eq!(
            write_db(&mut w, &["XADD", "stream", &id, "n", &i.to_string()]),
            Value::BulkString(id.into_bytes())
        );
    }
    assert_eq!(
        write_db(&mut w, &["XGROUP", "CREATE", "stream", "g1", "0"]),
        ok
    );
    assert_eq!(
        write_db(&mut w, &["XGROUP", "CREATE", "stream", "g2", "$"]),
        ok
    );
    // Two entries delivered to c1 and not acknowledged: pending entries.
    let r = write_db(
        &mut w,
        &[
            "XREADGROUP",
            "GROUP",
            "g1",
            "c1",
            "COUNT",
            "2",
            "STREAMS",
            "stream",
            ">",
        ],
    );
    assert!(matches!(r, Value::Array(_)), "{r:?}");
    assert_eq!(
        write_db(&mut w, &["XACK", "stream", "g1", "1-1"]),
        Value::Int(1)
    );
    assert_eq!(
        write_db(&mut w, &["XGROUP", "CREATECONSUMER", "stream", "g1", "c2"]),
        Value::Int(1)
    );
    assert_eq!(
        write_db(&mut w, &["PFADD", "hll", "a", "b", "c", "d"]),
        Value::Int(1)
    );
    assert_eq!(
        write_db(&mut w, &["SETBIT", "bitmap", "100000", "1"]),
        Value::Int(0)
    );
    assert_eq!(
        write_db(&mut w, &["SETBIT", "bitmap", "7", "1"]),
        Value::Int(0)
    );
    // TTLs (the leader turns them into absolute deadlines).
    assert_eq!(
        write_db(&mut w, &["SET", "ttl-str", "v", "PX", "3600000"]),
        ok
    );
    assert_eq!(write_db(&mut w, &["EXPIRE", "list", "7200"]), Value::Int(1));
    assert_eq!(
        write_db(&mut w, &["PEXPIREAT", "hash", "4102444800000"]),
        Value::Int(1)
    );
    // A module type.
    assert_eq!(
        write_db(&mut w, &["BOX.SET", "boxed", "inside the box"]),
        ok
    );
    // Other databases.
    for db in [1, 5, 15] {
        let mut w = conn_db(c, 0, db);
        let v = format!("in db {db}");
        assert_eq!(write_db(&mut w, &["SET", "str", &v]), ok);
        assert_eq!(
            write_db(&mut w, &["LPUSH", &format!("list{db}"), &v]),
            Value::Int(1)
        );
        assert_eq!(write_db(&mut w, &["SET", "ttl", &v, "EX", "100000"]), ok);
    }
}

#[test]
fn every_data_type_survives_save_and_load_key_by_key() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let so = build_test_module(tmp.path(), "box");
    let so = path_str(&so);
    let a = single(&["--loadmodule", &so]);
    let b = single(&["--loadmodule", &so]);
    write_matrix(&a);
    let keys = total_keys(&a, 0);
    assert_eq!(keys, 27);

    // B has data of its own, which the load replaces.
    let mut wb = conn_db(&b, 0, 0);
    assert_eq!(write_db(&mut wb, &["SET", "only-on-b", "1"]), Value::Okay);
    let mut wb7 = conn_db(&b, 0, 7);
    assert_eq!(write_db(&mut wb7, &["SET", "only-on-b", "7"]), Value::Okay);

    let path = tmp.path().join("a.snapshot");
    let reply = save(&a, 0, &path);
    let bytes = std::fs::metadata(&path).expect("snapshot file").len();
    assert_eq!(reply, save_reply(keys, bytes));
    assert!(!format_tmp(&path).exists());
    let summary = format::verify(&path).expect("a valid file");
    assert_eq!(summary.keys, keys as u64);
    assert_eq!(summary.bytes, bytes);
    let applied: u64 = a
        .info_field(0, "raft_last_applied_index")
        .and_then(|v| v.parse().ok())
        .expect("applied index");
    assert_eq!(summary.header.index, applied);
    assert_eq!(summary.header.meta, Vec::<u8>::new());

    assert_eq!(load(&b, 0, &path), load_reply(keys));
    assert_eq!(assert_same_dataset(&a, 0, &b, 0), keys);
    assert_eq!(total_keys(&b, 0), keys);
    assert_eq!(
        local_db(&b, 0, 0, &[b"BOX.GET", b"boxed"]),
        Value::BulkString(b"inside the box".to_vec())
    );
    for c in [&a, &b] {
        let log = c.nodes[0].log();
        assert!(!log.contains("internal error"), "{log}");
    }
    let log = b.nodes[0].log();
    // The module type was checked in a child before the flush (src/snapshot/load.rs).
    assert!(
        log.contains(
            "checking that this server can restore its module types (rraft-box) in a child process"
        ),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "snapshot loaded from {}: {keys} keys, index {applied}",
            path.display()
        )),
        "{log}"
    );
}

fn format_tmp(path: &Path) -> PathBuf {
    redis_raft::snapshot::format::tmp_path(path)
}

/// B's data, to check a refused load left it alone.
fn fingerprint(c: &Cluster) -> Vec<(i64, Vec<u8>, Value)> {
    let mut out = Vec::new();
    for db in 0..DATABASES {
        let Value::Array(ks) = local_db(c, 0, db, &[b"KEYS", b"*"]) else {
            panic!("KEYS")
        };
        let mut ks: Vec<Vec<u8>> = ks.iter().map(bulk).collect();
        ks.sort();
        for k in ks {
            let d = local_db(c, 0, db, &[b"DUMP", &k]);
            out.push((db, k, d));
        }
    }
    out
}

#[test]
fn a_truncated_or_corrupt_snapshot_is_refused_and_the_dataset_is_kept() {
    let a = single(&[]);
    let b = single(&[]);
    let mut wa = conn_db(&a, 0, 0);
    for i in 0..50 {
        let v = format!("value-{i}");
        assert_eq!(
            write_db(&mut wa, &["SET", &format!("k{i}"), &v]),
            Value::Okay
        );
    }
    let mut wb = conn_db(&b, 0, 0);
    assert_eq!(write_db(&mut wb, &["SET", "mine", "b"]), Value::Okay);
    assert_eq!(
        write_db(&mut wb, &["RPUSH", "list", "x", "y"]),
        Value::Int(2)
    );
    let mut wb3 = conn_db(&b, 0, 3);
    assert_eq!(write_db(&mut wb3, &["SET", "in3", "z"]), Value::Okay);
    let before = fingerprint(&b);
    assert_eq!(before.len(), 3);

    let good = a.tmp.path().join("good.snapshot");
    let reply = save(&a, 0, &good);
    let len = std::fs::metadata(&good).expect("saved").len();
    assert_eq!(reply, save_reply(50, len));
    let bytes = std::fs::read(&good).expect("read");

    // Truncated: the end record (21 bytes) is cut short.
    let cut = a.tmp.path().join("cut.snapshot");
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).expect("write");
    assert_eq!(
        load(&b, 0, &cut),
        format!(
            "-ERR snapshot {} is corrupt at byte offset {}: record of 13 bytes runs past the end of the file (3 bytes left; truncated?); the dataset was not changed\r\n",
            cut.display(),
            len - 21
        )
    );
    assert_eq!(fingerprint(&b), before);

    // Cut at a record boundary: no end record at all.
    let cut2 = a.tmp.path().join("cut2.snapshot");
    std::fs::write(&cut2, &bytes[..bytes.len() - 21]).expect("write");
    assert_eq!(
        load(&b, 0, &cut2),
        format!(
            "-ERR snapshot {} is corrupt at byte offset {}: file ends without its end record (truncated); the dataset was not changed\r\n",
            cut2.display(),
            len - 21
        )
    );
    assert_eq!(fingerprint(&b), before);

    // One flipped byte in the middle of a key record.
    let bad = a.tmp.path().join("bad.snapshot");
    let mut flipped = bytes.clone();
    let at = bytes
        .windows(8)
        .position(|w| w == b"value-25")
        .expect("a value in the file");
    flipped[at] ^= 0x20;
    std::fs::write(&bad, &flipped).expect("write");
    let err = format::verify(&bad)
        .expect_err("damage detected")
        .to_string();
    assert!(err.ends_with("record crc mismatch"), "{err}");
    assert_eq!(
        load(&b, 0, &bad),
        format!("-ERR {err}; the dataset was not changed\r\n")
    );
    assert_eq!(fingerprint(&b), before);

    // Missing, and not a snapshot at all.
    let missing = a.tmp.path().join("missing.snapshot");
    assert_eq!(
        load(&b, 0, &missing),
        format!(
            "-ERR snapshot {}: open: No such file or directory (os error 2); the dataset was not changed\r\n",
            missing.display()
        )
    );
    let log = b.nodes[0].log_path();
    assert_eq!(
        load(&b, 0, &log),
        format!(
            "-ERR snapshot {} is corrupt at byte offset 0: not a redis-raft snapshot file (bad magic); the dataset was not changed\r\n",
            log.display()
        )
    );
    assert_eq!(fingerprint(&b), before);
    let blog = b.nodes[0].log();
    assert!(
        blog.contains(&format!(
            "snapshot load refused: {err}; the dataset was not changed"
        )),
        "{blog}"
    );

    // The good file still loads.
    assert_eq!(load(&b, 0, &good), load_reply(50));
    assert_eq!(assert_same_dataset(&a, 0, &b, 0), 50);
}

/// Pid of the redis-server's forked child, once there is one.
fn wait_child(c: &Cluster, i: usize, timeout: Duration) -> i32 {
    let pid = c.nodes[i].child.as_ref().expect("running").id();
    let deadline = Instant::now() + timeout;
    loop {
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        if let Some(p) = children.split_whitespace().next() {
            return p.parse().expect("pid");
        }
        assert!(Instant::now() < deadline, "no child within {timeout:?}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Starts Redis's own BGSAVE on node `i` (which must hold a key) and stops its child
/// (SIGSTOP). Redis's delay after each key it saves (5 s) keeps the child from finishing
/// first: a child that had already exited would leave a zombie, and a finished BGSAVE, not a
/// killed one.
fn stopped_bgsave(c: &Cluster, i: usize) -> i32 {
    assert_eq!(
        c.local(i, &["CONFIG", "SET", "rdb-key-save-delay", "5000000"]),
        Value::Okay
    );
    assert_eq!(
        c.local(i, &["BGSAVE"]),
        Value::SimpleString("Background saving started".into())
    );
    let child = wait_child(c, i, Duration::from_secs(10));
    unsafe { libc::kill(child, libc::SIGSTOP) };
    child
}

/// Kills the child `stopped_bgsave` stopped and waits until Redis has reaped it.
fn kill_bgsave(c: &Cluster, i: usize, child: i32) {
    unsafe { libc::kill(child, libc::SIGKILL) };
    wait_for(
        "Redis to reap its killed BGSAVE child",
        Duration::from_secs(10),
        || {
            c.nodes[i]
                .log()
                .contains("Background saving terminated by signal 9")
        },
    );
    assert_eq!(
        c.local(i, &["CONFIG", "SET", "rdb-key-save-delay", "0"]),
        Value::Okay
    );
}

#[test]
fn a_second_save_is_refused_while_one_runs_and_a_killed_child_keeps_the_previous_file() {
    let mut a = single(&["--enable-debug-command", "yes"]);
    // Node-local keys, enough that the child takes a while.
    assert_eq!(
        a.local(0, &["DEBUG", "POPULATE", "300000", "key", "100"]),
        Value::Okay
    );
    let path = a.tmp.path().join("snap");
    let reply = save(&a, 0, &path);
    let first = std::fs::read(&path).expect("first snapshot");
    assert_eq!(reply, save_reply(300_000, first.len() as u64));

    let mut c1 = RawConn::open(a.nodes[0].def.port);
    c1.send(&["RAFT.DEBUG", "SNAPSHOT", "SAVE", &path_str(&path)]);
    let child = wait_child(&a, 0, Duration::from_secs(10));
    unsafe { libc::kill(child, libc::SIGSTOP) };
    let other = a.tmp.path().join("other");
    assert_eq!(
        save(&a, 0, &other),
        format!(
            "-ERR a snapshot save is already in progress (to {})\r\n",
            path.display()
        )
    );
    // The server keeps answering meanwhile.
    let mut c2 = RawConn::open(a.nodes[0].def.port);
    assert_eq!(c2.cmd(&["PING"]), "+PONG\r\n");

    unsafe { libc::kill(child, libc::SIGKILL) };
    assert_eq!(
        c1.read(),
        "-ERR the snapshot child was killed by signal 9\r\n"
    );
    assert_eq!(std::fs::read(&path).expect("previous snapshot"), first);
    assert!(!format_tmp(&path).exists());
    assert!(!other.exists());
    let log = a.nodes[0].log();
    assert!(
        log.contains(&format!(
            "snapshot save to {} failed: the snapshot child was killed by signal 9; the previous file is unchanged",
            path.display()
        )),
        "{log}"
    );

    // The next save works and replaces the file.
    assert_eq!(a.local(0, &["SET", "one-more", "v"]), Value::Okay);
    let reply = save(&a, 0, &path);
    let len = std::fs::metadata(&path).expect("snapshot").len();
    assert_eq!(reply, save_reply(300_001, len));
    a.kill(0);
}

#[test]
fn a_save_that_cannot_write_its_file_fails_and_says_why() {
    let a = single(&[]);
    let mut w = conn_db(&a, 0, 0);
    assert_eq!(write_db(&mut w, &["SET", "k", "v"]), Value::Okay);
    let path = a.tmp.path().join("no-such-dir").join("snap");
    assert_eq!(
        save(&a, 0, &path),
        "-ERR the snapshot child exited with status 1 (see the server log for why)\r\n"
    );
    let log = a.nodes[0].log();
    assert!(
        log.contains(&format!(
            "snapshot child failed: snapshot {}: create: No such file or directory (os error 2)",
            format_tmp(&path).display()
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "snapshot save to {} failed: the snapshot child exited with status 1 (see the server log for why); the previous file is unchanged",
            path.display()
        )),
        "{log}"
    );
    let mut r = RawConn::open(a.nodes[0].def.port);
    assert_eq!(
        r.cmd(&["RAFT.DEBUG", "SNAPSHOT", "SAVE"]),
        "-ERR wrong number of arguments for 'raft.debug snapshot': RAFT.DEBUG SNAPSHOT SAVE|LOAD <path> or ABORT\r\n"
    );
    assert_eq!(
        r.cmd(&["RAFT.DEBUG", "SNAPSHOT", "DROP", "x"]),
        "-ERR RAFT.DEBUG SNAPSHOT supports SAVE, LOAD and ABORT\r\n"
    );
}

/// Redis 7.0 terminates the server when RESTORE (outside a client's command) meets a module
/// type it lacks: such a snapshot is refused before the flush, and the node keeps running.
#[test]
fn a_snapshot_with_a_module_type_this_server_lacks_is_refused_before_the_flush() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let so = build_test_module(tmp.path(), "box");
    let a = single(&["--loadmodule", &path_str(&so)]);
    let b = single(&[]);
    let mut w = conn_db(&a, 0, 0);
    assert_eq!(write_db(&mut w, &["SET", "plain", "v"]), Value::Okay);
    assert_eq!(write_db(&mut w, &["BOX.SET", "boxed", "v"]), Value::Okay);
    let mut wb = conn_db(&b, 0, 0);
    assert_eq!(write_db(&mut wb, &["SET", "mine", "b"]), Value::Okay);
    let before = fingerprint(&b);
    let path = tmp.path().join("snap");
    let r = save(&a, 0, &path);
    let len = std::fs::metadata(&path).expect("saved").len();
    assert_eq!(r, save_reply(2, len));

    // The check needs a child process: not while Redis has one (a BGSAVE, held stopped).
    let child = stopped_bgsave(&b, 0);
    assert_eq!(
        load(&b, 0, &path),
        "-ERR cannot check the snapshot's module types (rraft-box): cannot fork: another child process is running (a snapshot save or load check, a BGSAVE or an AOF rewrite); try again once it has finished; the dataset was not changed\r\n"
    );
    assert_eq!(fingerprint(&b), before);
    kill_bgsave(&b, 0, child);

    assert_eq!(
        load(&b, 0, &path),
        "-ERR the snapshot holds keys of module data type rraft-box that this server cannot restore (is the module loaded, in a version that reads them?); the dataset was not changed\r\n"
    );
    let mut r = RawConn::open(b.nodes[0].def.port);
    assert_eq!(r.cmd(&["PING"]), "+PONG\r\n");
    assert_eq!(fingerprint(&b), before);
}

#[test]
fn a_running_save_or_load_can_be_aborted() {
    let a = single(&["--enable-debug-command", "yes"]);
    let b = single(&[]);
    assert_eq!(
        a.local(0, &["DEBUG", "POPULATE", "300000", "key", "100"]),
        Value::Okay
    );
    let path = a.tmp.path().join("snap");
    let reply = save(&a, 0, &path);
    let first = std::fs::read(&path).expect("first snapshot");
    assert_eq!(reply, save_reply(300_000, first.len() as u64));
    let abort =
        |c: &Cluster| RawConn::open(c.nodes[0].def.port).cmd(&["RAFT.DEBUG", "SNAPSHOT", "ABORT"]);
    assert_eq!(abort(&a), ":0\r\n");
    // Polls until there is something to abort, and aborts it.
    let abort_when_running = |c: &Cluster| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while abort(c) != ":1\r\n" {
            assert!(Instant::now() < deadline, "nothing to abort within 10 s");
            std::thread::sleep(Duration::from_millis(2));
        }
    };

    // A save: the client is told, the child is gone, the previous file is kept.
    let mut c1 = RawConn::open(a.nodes[0].def.port);
    c1.send(&["RAFT.DEBUG", "SNAPSHOT", "SAVE", &path_str(&path)]);
    let child = wait_child(&a, 0, Duration::from_secs(10));
    assert_eq!(abort(&a), ":1\r\n");
    assert_eq!(c1.read(), "-ERR the snapshot save was aborted\r\n");
    assert_eq!(
        unsafe { libc::kill(child, 0) },
        -1,
        "child {child} still exists"
    );
    assert_eq!(std::fs::read(&path).expect("previous snapshot"), first);
    assert!(!format_tmp(&path).exists());
    let reply = save(&a, 0, &path);
    assert_eq!(reply, save_reply(300_000, first.len() as u64));

    // A load: aborted while checking or while restoring; either way the client is told.
    let mut wb = conn_db(&b, 0, 0);
    assert_eq!(write_db(&mut wb, &["SET", "mine", "b"]), Value::Okay);
    let mut c1 = RawConn::open(b.nodes[0].def.port);
    // Aborted while checking the file: as soon as the load has begun (polled; the check
    // of 300k keys takes far longer than a few polls).
    c1.send(&["RAFT.DEBUG", "SNAPSHOT", "LOAD", &path_str(&path)]);
    abort_when_running(&b);
    assert_eq!(
        c1.read(),
        "-ERR the snapshot load was aborted after 0 keys\r\n"
    );
    assert_eq!(abort(&b), ":0\r\n");
    assert_eq!(
        total_keys(&b, 0),
        1,
        "the dataset was flushed by an aborted check"
    );
    // Aborted while restoring: once the log says the check passed.
    let mut c1 = RawConn::open(b.nodes[0].def.port);
    c1.send(&["RAFT.DEBUG", "SNAPSHOT", "LOAD", &path_str(&path)]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !b.nodes[0]
        .log()
        .contains("flushing the dataset and restoring")
    {
        assert!(
            Instant::now() < deadline,
            "the load's check did not finish in 30 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    abort_when_running(&b);
    let reply = c1.read();
    assert!(
        reply.starts_with("-ERR the snapshot load was aborted after "),
        "{reply}"
    );
    assert_eq!(abort(&b), ":0\r\n");
    // A new load runs to the end.
    assert_eq!(load(&b, 0, &path), load_reply(300_000));
    assert_eq!(total_keys(&b, 0), 300_000);
}

#[test]
fn a_save_while_redis_has_a_child_or_on_a_full_disk_fails_and_keeps_the_previous_file() {
    let a = single(&["--enable-debug-command", "yes"]);
    assert_eq!(
        a.local(0, &["DEBUG", "POPULATE", "1000", "key", "100"]),
        Value::Okay
    );
    let path = a.tmp.path().join("snap");
    let reply = save(&a, 0, &path);
    let first = std::fs::read(&path).expect("first snapshot");
    assert_eq!(reply, save_reply(1000, first.len() as u64));

    // Redis's own BGSAVE child (held stopped) leaves no room for ours.
    let child = stopped_bgsave(&a, 0);
    assert_eq!(
        save(&a, 0, &path),
        "-ERR cannot fork for the snapshot: another child process is running (a snapshot save or load check, a BGSAVE or an AOF rewrite); try again once it has finished\r\n"
    );
    kill_bgsave(&a, 0, child);
    assert_eq!(std::fs::read(&path).expect("previous snapshot"), first);
    let log = a.nodes[0].log();
    assert!(
        log.contains(&format!(
            "snapshot save to {} not started: cannot fork: another child process is running",
            path.display()
        )),
        "{log}"
    );

    // A full disk: the temporary file is /dev/full.
    let tmp = format_tmp(&path);
    std::os::unix::fs::symlink("/dev/full", &tmp).expect("symlink");
    assert_eq!(
        save(&a, 0, &path),
        "-ERR the snapshot child exited with status 1 (see the server log for why)\r\n"
    );
    let log = a.nodes[0].log();
    assert!(
        log.contains(&format!(
            "snapshot child failed: snapshot {}: write: No space left on device (os error 28)",
            tmp.display()
        )),
        "{log}"
    );
    assert!(!tmp.exists() && std::fs::symlink_metadata(&tmp).is_err());
    assert_eq!(std::fs::read(&path).expect("previous snapshot"), first);
}

#[test]
fn keys_whose_deadline_passed_before_the_load_are_not_restored() {
    let a = single(&[]);
    let b = single(&[]);
    let mut w = conn_db(&a, 0, 0);
    assert_eq!(
        write_db(&mut w, &["SET", "short", "v", "PX", "1500"]),
        Value::Okay
    );
    assert_eq!(
        write_db(&mut w, &["SET", "long", "v", "EX", "3600"]),
        Value::Okay
    );
    assert_eq!(write_db(&mut w, &["SET", "forever", "v"]), Value::Okay);
    let path = a.tmp.path().join("snap");
    let reply = save(&a, 0, &path);
    let len = std::fs::metadata(&path).expect("saved").len();
    assert_eq!(reply, save_reply(3, len));
    std::thread::sleep(Duration::from_millis(1600));
    // Three records in the file; the expired one is skipped by RESTORE ... ABSTTL.
    assert_eq!(load(&b, 0, &path), load_reply(3));
    assert_eq!(total_keys(&b, 0), 2);
    assert_eq!(local_db(&b, 0, 0, &[b"EXISTS", b"short"]), Value::Int(0));
    assert_eq!(
        local_db(&b, 0, 0, &[b"PEXPIRETIME", b"long"]),
        local_db(&a, 0, 0, &[b"PEXPIRETIME", b"long"])
    );
    assert_eq!(
        local_db(&b, 0, 0, &[b"PEXPIRETIME", b"forever"]),
        Value::Int(-1)
    );
}

/// 1M keys with 100-byte values: save time and size, the longest PING during the save, load
/// time and the longest PING during the load. Prints, does not assert.
/// `cargo test --release --test snapshot -- --ignored --nocapture bench`
#[test]
#[ignore]
fn bench_snapshot_1m_keys() {
    let keys: u64 = std::env::var("SNAPSHOT_BENCH_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let a = single(&["--enable-debug-command", "yes"]);
    let b = single(&[]);
    let t = Instant::now();
    assert_eq!(
        a.local(0, &["DEBUG", "POPULATE", &keys.to_string(), "key", "100"]),
        Value::Okay
    );
    println!("populate {keys} keys: {:?}", t.elapsed());
    let path = a.tmp.path().join("bench.snapshot");

    let run = |c: &Cluster, sub: &str| -> (Duration, Duration, String) {
        let port = c.nodes[0].def.port;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pinger = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut p = RawConn::open(port);
                let mut max = Duration::ZERO;
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let t = Instant::now();
                    assert_eq!(p.cmd(&["PING"]), "+PONG\r\n");
                    max = max.max(t.elapsed());
                    n += 1;
                    std::thread::sleep(Duration::from_millis(1));
                }
                (max, n)
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        let reply = RawConn::open(port).cmd(&["RAFT.DEBUG", "SNAPSHOT", sub, &path_str(&path)]);
        let took = t.elapsed();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (max_ping, pings) = pinger.join().expect("pinger");
        println!("{sub}: {took:?}, {pings} pings, longest {max_ping:?}; reply {reply:?}");
        (took, max_ping, reply)
    };
    // The same PING loop with nothing else going on, for comparison.
    {
        let mut p = RawConn::open(a.nodes[0].def.port);
        let t = Instant::now();
        let mut max = Duration::ZERO;
        let mut n = 0u64;
        while t.elapsed() < Duration::from_secs(2) {
            let t = Instant::now();
            assert_eq!(p.cmd(&["PING"]), "+PONG\r\n");
            max = max.max(t.elapsed());
            n += 1;
            std::thread::sleep(Duration::from_millis(1));
        }
        println!("idle: {n} pings in 2 s, longest {max:?}");
    }
    let (_, _, reply) = run(&a, "SAVE");
    let size = std::fs::metadata(&path).expect("snapshot").len();
    assert_eq!(reply, save_reply(keys as i64, size));
    println!(
        "snapshot size: {size} bytes ({:.1} MiB)",
        size as f64 / (1 << 20) as f64
    );
    for l in a.nodes[0].log().lines().filter(|l| l.contains("snapshot")) {
        println!("A log: {l}");
    }
    let (_, _, reply) = run(&b, "LOAD");
    assert_eq!(reply, load_reply(keys as i64));
    for l in b.nodes[0].log().lines().filter(|l| l.contains("snapshot")) {
        println!("B log: {l}");
    }
    let mem = |c: &Cluster| -> String {
        let mut conn = c.conn(0).expect("conn");
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query(&mut conn)
            .expect("INFO");
        info.lines()
            .filter(|l| l.starts_with("used_memory:") || l.starts_with("used_memory_rss:"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!("A memory: {}", mem(&a));
    println!("B memory: {}", mem(&b));
}
