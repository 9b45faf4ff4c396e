//! Snapshots in a running cluster: log compaction, catching up from a snapshot, restart from
//! snapshot plus log tail, a node joining a compacted cluster. Real redis-server processes.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{err_text, info_num, q, wait_for, Cluster, RawConn, Value};

/// Writes one key of every data type (in databases 0 and 3, some with TTLs) on the leader.
fn write_every_type(c: &Cluster, l: usize, tag: &str) {
    let cmds: Vec<Vec<String>> = [
        "SET s:{t} hello",
        "SET ttl:{t} v PX 600000",
        "RPUSH l:{t} a b c d",
        "HSET h:{t} f1 v1 f2 v2",
        "SADD set:{t} x y z",
        "ZADD z:{t} 1 one 2 two 3 three",
        "PFADD hll:{t} a b c d e f",
        "SETBIT bits:{t} 1000 1",
        "XADD st:{t} 1-1 f v",
        "XADD st:{t} 2-1 f w",
        "XGROUP CREATE st:{t} g 0",
        "XREADGROUP GROUP g alice COUNT 1 STREAMS st:{t} >",
        "INCRBY n:{t} 41",
        "INCR n:{t}",
    ]
    .iter()
    .map(|s| s.replace("{t}", tag).split(' ').map(String::from).collect())
    .collect();
    let mut conn = c.conn(l).unwrap();
    for db in [0, 3] {
        redis::cmd("SELECT").arg(db).query::<()>(&mut conn).unwrap();
        for cmd in &cmds {
            let mut r = redis::cmd(&cmd[0]);
            for a in &cmd[1..] {
                r.arg(a);
            }
            r.query::<Value>(&mut conn)
                .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        }
    }
}

/// Every key of databases 0 and 3 on node `i` with its DUMP payload and absolute expiry.
fn dataset(c: &Cluster, i: usize) -> Dataset {
    let mut out = BTreeMap::new();
    let mut conn = c.conn(i).unwrap();
    for db in [0, 3] {
        let keys: Vec<Vec<u8>> = redis::cmd("RAFT.DEBUG")
            .arg("EXEC")
            .arg("EVAL")
            .arg(format!(
                "redis.call('SELECT', {db}) return redis.call('KEYS', '*')"
            ))
            .arg(0)
            .query(&mut conn)
            .unwrap();
        for k in keys {
            // Streams: entries and group state without delivery times, which each node
            // stamps with its own clock (see issue 3). Sets: members, not DUMP, whose order
            // follows each process's hash seed.
            let script = format!(
                "redis.call('SELECT', {db}) \
                 local v \
                 if redis.call('TYPE', KEYS[1]).ok == 'stream' then \
                   local parts = {{}} \
                   for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do \
                     table.insert(parts, e[1] .. '=' .. table.concat(e[2], ',')) end \
                   for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do \
                     table.insert(parts, 'group ' .. table.concat(g, ',')) end \
                   v = table.concat(parts, ';') \
                 elseif redis.call('TYPE', KEYS[1]).ok == 'set' then \
                   local m = redis.call('SMEMBERS', KEYS[1]) table.sort(m) \
                   v = 'set ' .. table.concat(m, ',') \
                 else v = redis.call('DUMP', KEYS[1]) end \
                 return {{v, redis.call('PEXPIRETIME', KEYS[1])}}"
            );
            let (dump, exp): (Vec<u8>, i64) = redis::cmd("RAFT.DEBUG")
                .arg("EXEC")
                .arg("EVAL")
                .arg(script)
                .arg(1)
                .arg(&k)
                .query(&mut conn)
                .unwrap();
            out.insert((db, k), (dump, exp));
        }
    }
    out
}

type Dataset = BTreeMap<(i32, Vec<u8>), (Vec<u8>, i64)>;

/// Node `i`'s dataset equals `want`; on failure, names the keys that differ.
fn assert_same(got: &Dataset, want: &Dataset, i: usize) {
    if got == want {
        return;
    }
    let diff: Vec<String> = want
        .keys()
        .chain(got.keys())
        .filter(|k| got.get(*k) != want.get(*k))
        .map(|(db, k)| format!("db{db}:{}", String::from_utf8_lossy(k)))
        .take(10)
        .collect();
    panic!(
        "node {i} differs ({} keys vs {}): {diff:?}",
        got.len(),
        want.len()
    );
}

fn wait_applied(c: &mut Cluster, nodes: &[usize]) {
    let l = c.wait_leader(Duration::from_secs(20));
    let commit = info_num(c, l, "raft_commit_index");
    wait_for("every node to apply", Duration::from_secs(30), || {
        nodes
            .iter()
            .all(|&i| info_num(c, i, "raft_last_applied_index") >= commit)
    });
}

#[test]
fn a_follower_behind_the_compacted_log_catches_up_from_a_snapshot_with_every_type() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(15));
    let f = (0..3).find(|&i| i != l).unwrap();
    write_every_type(&c, l, "before");
    c.kill(f);
    write_every_type(&c, l, "while-away");
    for i in 0..300 {
        q(&c, l, &["SET", &format!("k{i}"), &"x".repeat(100)]).unwrap();
    }
    assert_eq!(
        q(&c, l, &["RAFT.DEBUG", "COMPACT"]),
        Ok(Value::Okay),
        "RAFT.DEBUG COMPACT"
    );
    let snap = info_num(&c, l, "raft_snapshot_last_idx");
    assert!(snap > 0);
    assert_eq!(
        c.info_field(l, "raft_snapshots_created").as_deref(),
        Some("1")
    );
    // The leader's log no longer holds what the follower needs.
    let entries = info_num(&c, l, "raft_log_entries");
    assert!(entries < 10, "{entries} entries left after compaction");
    c.start_node(f);
    write_every_type(&c, l, "after");
    wait_applied(&mut c, &[0, 1, 2]);
    assert_eq!(
        c.info_field(f, "raft_snapshots_received").as_deref(),
        Some("1")
    );
    assert_eq!(info_num(&c, f, "raft_snapshot_last_idx"), snap);
    let want = dataset(&c, l);
    assert!(want.len() > 300, "{}", want.len());
    for i in 0..3 {
        assert_same(&dataset(&c, i), &want, i);
    }
    assert!(c.nodes[f].log().contains("loading the raft snapshot"));
}

/// The raft files in a node's directory (the log, its snapshot and any file being written
/// next to them: a new snapshot, the rewritten log) with their sizes.
fn raft_files(dir: &std::path::Path) -> Vec<(String, u64)> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // redisraft.db, .db.snapshot, .db.snapshot.tmp, .rewrite.tmp (the compacted log).
        if name.starts_with("redisraft.") {
            files.push((name, e.metadata().map_or(0, |m| m.len())));
        }
    }
    files
}

const BOUNDED_LOG_BYTES: u64 = 1024 * 1024;

#[test]
fn disk_use_stays_below_the_threshold_plus_one_snapshot_and_restart_uses_snapshot_plus_log_tail() {
    let mut c = Cluster::define(3);
    for i in 0..3 {
        c.nodes[i].extra = vec!["--raft.log-max-file-size".into(), "1mb".into()];
        c.start_node(i);
    }
    let l = c.wait_leader(Duration::from_secs(15));
    // Every node's raft files, sampled every 2 ms while the writes run: the largest total
    // and the largest snapshot.
    let dirs: Vec<_> = c.nodes.iter().map(|n| n.def.dir.clone()).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // Per node: the largest total (with the files then) and the largest snapshot.
            let mut peaks = vec![(0u64, Vec::new(), 0u64); dirs.len()];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (d, p) in dirs.iter().zip(peaks.iter_mut()) {
                    let files = raft_files(d);
                    let all = files.iter().map(|f| f.1).sum::<u64>();
                    let snap = files
                        .iter()
                        .find(|f| f.0 == "redisraft.db.snapshot")
                        .map_or(0, |f| f.1);
                    if all > p.0 {
                        (p.0, p.1) = (all, files);
                    }
                    p.2 = p.2.max(snap);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            peaks
        })
    };
    let mut conn = c.conn(l).unwrap();
    let mut largest = 0u64;
    for round in 0..200 {
        let mut pipe = redis::pipe();
        for i in 0..100 {
            pipe.cmd("SET")
                .arg(format!("k{}", (round * 100 + i) % 300))
                .arg("v".repeat(100));
        }
        pipe.query::<()>(&mut conn).unwrap();
        largest = largest.max(info_num(&c, l, "raft_file_size"));
    }
    wait_applied(&mut c, &[0, 1, 2]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peaks = sampler.join().unwrap();
    println!(
        "log file: largest {largest} bytes seen with raft.log-max-file-size 1mb; snapshots created {}; raft files per node, largest (total, files then, largest snapshot): {peaks:?}",
        info_num(&c, l, "raft_snapshots_created")
    );
    for (i, (all, files, snapshot)) in peaks.iter().enumerate() {
        assert!(info_num(&c, i, "raft_snapshots_created") >= 2, "node {i}");
        assert!(
            info_num(&c, i, "raft_file_size") < BOUNDED_LOG_BYTES,
            "node {i}"
        );
        assert!(*snapshot > 0, "node {i}: no snapshot file seen");
        assert!(
            *all < BOUNDED_LOG_BYTES + snapshot,
            "node {i}: raft files reached {all} bytes ({files:?}), over raft.log-max-file-size {BOUNDED_LOG_BYTES} + one snapshot {snapshot}"
        );
    }
    assert!(largest < BOUNDED_LOG_BYTES, "largest log file {largest}");
    q(&c, l, &["SET", "tail", "1"]).unwrap();
    wait_applied(&mut c, &[0, 1, 2]);
    let want = dataset(&c, l);
    for i in 0..3 {
        c.kill(i);
    }
    for i in 0..3 {
        c.start_node(i);
    }
    wait_applied(&mut c, &[0, 1, 2]);
    for i in 0..3 {
        assert_same(&dataset(&c, i), &want, i);
        assert!(c.nodes[i].log().contains("loading the raft snapshot"));
    }
}

#[test]
fn a_node_joining_a_compacted_cluster_gets_the_snapshot() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(15));
    write_every_type(&c, l, "old");
    assert_eq!(q(&c, l, &["RAFT.DEBUG", "COMPACT"]), Ok(Value::Okay));
    let j = c.add_dynamic_node();
    c.start_node(j);
    let addr = c.addr(l);
    assert_eq!(q(&c, j, &["RAFT.CLUSTER", "JOIN", &addr]), Ok(Value::Okay));
    write_every_type(&c, l, "new");
    wait_applied(&mut c, &[0, 1, 2, j]);
    assert_same(&dataset(&c, j), &dataset(&c, l), j);
    wait_for("the new node to vote", Duration::from_secs(20), || {
        c.info_field(l, "raft_voters")
            .is_some_and(|v| v.split(',').count() == 4)
    });
}

#[test]
fn compact_with_nothing_new_is_ok_and_info_describes_the_snapshot() {
    let c = Cluster::start(3);
    let mut c = c;
    let l = c.wait_leader(Duration::from_secs(15));
    assert_eq!(
        c.info_field(l, "raft_snapshot_last_idx").as_deref(),
        Some("0")
    );
    assert_eq!(
        c.info_field(l, "raft_snapshot_time_secs").as_deref(),
        Some("-1")
    );
    q(&c, l, &["SET", "a", "1"]).unwrap();
    assert_eq!(q(&c, l, &["RAFT.DEBUG", "COMPACT"]), Ok(Value::Okay));
    let idx = info_num(&c, l, "raft_snapshot_last_idx");
    assert!(idx >= 1);
    assert!(info_num(&c, l, "raft_snapshot_size") > 0);
    assert_eq!(
        c.info_field(l, "raft_snapshot_in_progress").as_deref(),
        Some("no")
    );
    // Nothing applied since: OK at once, no new snapshot.
    assert_eq!(q(&c, l, &["RAFT.DEBUG", "COMPACT"]), Ok(Value::Okay));
    assert_eq!(info_num(&c, l, "raft_snapshots_created"), 1);
}

#[test]
fn kills_during_snapshots_compactions_and_installs_lose_nothing_acknowledged() {
    // A tiny compaction threshold makes nodes snapshot, compact and install all the time,
    // so SIGKILLs land in the middle of those too.
    let mut c = Cluster::define(3);
    for i in 0..3 {
        c.nodes[i].extra = vec!["--raft.log-max-file-size".into(), "32kb".into()];
        c.start_node(i);
    }
    c.wait_leader(Duration::from_secs(15));
    let ports: Vec<u16> = c.nodes.iter().map(|n| n.def.port).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut acked: Vec<(String, u64)> = Vec::new();
            let mut port = ports[0];
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let key = format!("k{}", n % 500);
                let r = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
                    .and_then(|cl| cl.get_connection_with_timeout(Duration::from_millis(500)))
                    .and_then(|mut conn| {
                        conn.set_read_timeout(Some(Duration::from_secs(3)))?;
                        redis::cmd("SET")
                            .arg(&key)
                            .arg(n)
                            .query::<String>(&mut conn)
                    });
                match r {
                    Ok(_) => acked.push((key, n)),
                    Err(e) => {
                        let t = err_text(&e);
                        port = match t
                            .strip_prefix("MOVED 0 ")
                            .and_then(|a| a.rsplit(':').next())
                        {
                            Some(p) => p.parse().unwrap_or(port),
                            None => ports[(n as usize) % ports.len()],
                        };
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
            acked
        })
    };
    let started = Instant::now();
    let mut victim = 0;
    while started.elapsed() < Duration::from_secs(12) {
        std::thread::sleep(Duration::from_millis(900));
        victim = (victim + 1) % 3;
        c.kill(victim);
        std::thread::sleep(Duration::from_millis(300));
        c.start_node(victim);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = writer.join().unwrap();
    assert!(
        acked.len() > 200,
        "only {} writes acknowledged",
        acked.len()
    );
    wait_applied(&mut c, &[0, 1, 2]);
    // The last acknowledged value of each key is what every node holds (one writer, so a
    // later acknowledged write of a key always wins).
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for (k, v) in &acked {
        last.insert(k.clone(), *v);
    }
    let want = dataset(&c, 0);
    for i in 0..3 {
        assert_same(&dataset(&c, i), &want, i);
        for (k, v) in &last {
            let got = c.local(i, &["GET", k]);
            let got: u64 = match got {
                Value::BulkString(b) => String::from_utf8_lossy(&b).parse().unwrap_or(0),
                other => panic!("node {i} key {k}: {other:?}"),
            };
            // A write whose reply was lost may have landed after the last acknowledged one.
            assert!(got >= *v, "node {i} key {k}: {got} < acknowledged {v}");
        }
    }
    let snaps: u64 = (0..3)
        .map(|i| info_num(&c, i, "raft_snapshots_created"))
        .sum();
    let installs: u64 = (0..3)
        .map(|i| info_num(&c, i, "raft_snapshots_received"))
        .sum();
    println!(
        "{} writes acknowledged; since the last restarts: {snaps} snapshots created, {installs} received",
        acked.len()
    );
}

#[test]
fn a_node_whose_log_was_moved_aside_rebuilds_from_the_leader() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(15));
    write_every_type(&c, l, "a");
    let f = (0..3).find(|&i| i != l).unwrap();
    wait_applied(&mut c, &[0, 1, 2]);
    // Once with the leader's log whole (entries are resent), once compacted (a snapshot).
    for compact in [false, true] {
        if compact {
            assert_eq!(q(&c, l, &["RAFT.DEBUG", "COMPACT"]), Ok(Value::Okay));
        }
        c.kill(f);
        let dir = c.nodes[f].def.dir.clone();
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            // redisraft.db, .db.snapshot, .db.snapshot.tmp, .rewrite.tmp (the compacted log).
            if name.starts_with("redisraft.") {
                std::fs::rename(e.path(), dir.join(format!("aside-{compact}-{name}"))).unwrap();
            }
        }
        c.start_node(f);
        write_every_type(&c, l, &format!("after-{compact}"));
        wait_applied(&mut c, &[0, 1, 2]);
        assert_same(&dataset(&c, f), &dataset(&c, l), f);
        // Its log says what happened only when a heartbeat reached it before the leader's
        // appends did (a leader that reconnects at once probes with an append first).
        if c.nodes[f].log().contains("but its log ends at") {
            println!("round {compact}: the rebuilt node said its log was lost");
        }
    }
    assert_eq!(
        c.info_field(f, "raft_snapshots_received").as_deref(),
        Some("1")
    );
}

/// Every key of database 0 on node `i` (all strings) with its value, read locally in one
/// pipeline: `dataset` runs a script per key, too slow for thousands of keys.
fn string_keys(c: &Cluster, i: usize) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut conn = c.conn(i).unwrap();
    let keys: Vec<Vec<u8>> = redis::cmd("RAFT.DEBUG")
        .arg("EXEC")
        .arg("KEYS")
        .arg("*")
        .query(&mut conn)
        .unwrap();
    let mut pipe = redis::pipe();
    for k in &keys {
        pipe.cmd("RAFT.DEBUG").arg("EXEC").arg("GET").arg(k);
    }
    let values: Vec<Vec<u8>> = pipe.query(&mut conn).unwrap();
    keys.into_iter().zip(values).collect()
}

/// `raft.log-max-cache-size` in bytes for the cache test (`64kb` = 65536: Redis's units).
const TINY_CACHE_BYTES: u64 = 64 * 1024;

/// The cached payloads and the per-entry slots hold at most the bound (the slots of these
/// tests' ~2000 entries fit in it); one entry (a 1 kB SET plus framing) of slack.
fn assert_cache_bounded(c: &Cluster, i: usize, bound: u64) {
    let memory = info_num(c, i, "raft_log_memory_size");
    let cached = info_num(c, i, "raft_cache_memory_size");
    assert!(
        memory <= bound + 1200 && cached <= memory,
        "node {i}: raft_log_memory_size {memory} (cache {cached}) > bound {bound}"
    );
    assert!(info_num(c, i, "raft_cache_entries") <= info_num(c, i, "raft_log_entries"));
}

#[test]
fn a_follower_far_behind_catches_up_from_the_log_file_with_a_tiny_cache() {
    let mut c = Cluster::define(3);
    for i in 0..3 {
        c.nodes[i].extra = [
            "--raft.log-max-cache-size",
            "64kb",
            "--raft.log-max-file-size",
            "0",
        ]
        .map(String::from)
        .to_vec();
        c.start_node(i);
    }
    let l = c.wait_leader(Duration::from_secs(15));
    let f = (0..3).find(|&i| i != l).unwrap();
    q(&c, l, &["SET", "first", "1"]).unwrap();
    wait_applied(&mut c, &[0, 1, 2]);
    c.kill(f);
    // About 2 MB of entries the follower misses: far more than the 64 kB cache.
    let started = Instant::now();
    let mut conn = c.conn(l).unwrap();
    for round in 0..20 {
        let mut pipe = redis::pipe();
        for i in 0..100 {
            pipe.cmd("SET")
                .arg(format!("k{round}:{i}"))
                .arg(format!("{round}-{i}-{}", "v".repeat(1000)));
        }
        pipe.query::<()>(&mut conn).unwrap();
    }
    let entries = info_num(&c, l, "raft_log_entries");
    assert!(entries > 2000, "{entries} entries in the leader's log");
    assert!(info_num(&c, l, "raft_file_size") > 2_000_000);
    let written = started.elapsed();
    assert!(info_num(&c, l, "raft_cache_entries") < 100);
    assert_cache_bounded(&c, l, TINY_CACHE_BYTES);

    // Restarted, the follower replays its own log and gets the rest from the leader's file.
    c.start_node(f);
    q(&c, l, &["SET", "last", "1"]).unwrap();
    wait_applied(&mut c, &[0, 1, 2]);
    println!(
        "2000 writes of 1 kB in {written:?}; the follower caught up {} entries in {:?}",
        entries,
        started.elapsed() - written
    );
    assert_eq!(info_num(&c, f, "raft_snapshots_received"), 0);
    assert_eq!(info_num(&c, l, "raft_snapshots_created"), 0);
    let want = string_keys(&c, l);
    assert_eq!(want.len(), 2002);
    assert_eq!(
        want.get(b"k19:99".as_slice()).map(|v| v.len()),
        Some(6 + 1000)
    );
    for i in 0..3 {
        let got = string_keys(&c, i);
        let differ: Vec<_> = want
            .keys()
            .chain(got.keys())
            .filter(|k| got.get(*k) != want.get(*k))
            .take(10)
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect();
        assert!(differ.is_empty(), "node {i} differs: {differ:?}");
        assert_cache_bounded(&c, i, TINY_CACHE_BYTES);
    }

    // The bound changes at runtime: 0 keeps nothing once written. (INFO's log fields are
    // published by the raft thread each turn, so they may lag a few ms behind.)
    assert!(info_num(&c, l, "raft_cache_entries") > 0);
    assert_eq!(
        q(&c, l, &["CONFIG", "SET", "raft.log-max-cache-size", "0"]),
        Ok(Value::Okay)
    );
    assert_eq!(info_num(&c, l, "raft_log_max_cache_size"), 0);
    let empty = |c: &Cluster| {
        info_num(c, l, "raft_cache_entries") == 0 && info_num(c, l, "raft_cache_memory_size") == 0
    };
    wait_for(
        "the leader's cache to empty",
        Duration::from_secs(5),
        || empty(&c),
    );
    q(&c, l, &["SET", "after-zero", "1"]).unwrap();
    wait_for(
        "the leader's cache to stay empty",
        Duration::from_secs(5),
        || empty(&c),
    );
}

/// A node that skipped entries by loading a snapshot (its own at a restart, or the leader's
/// when it fell behind) goes on exactly as the nodes that applied them: WATCH knows which keys
/// they modified, and the functions and scripts they loaded are there for FCALL and EVALSHA.
/// Otherwise it would run a transaction the others abort, and fail writes the others made.
#[test]
fn a_node_that_loaded_a_snapshot_goes_on_like_the_others() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(15));
    let (f, g) = ((l + 1) % 3, (l + 2) % 3);
    let mut a = RawConn::open(c.nodes[l].def.port);
    assert_eq!(a.cmd(&["SET", "k", "1"]), "+OK\r\n");
    assert_eq!(a.cmd(&["WATCH", "k"]), "+OK\r\n");
    // g misses what follows and will catch up from the leader's snapshot.
    c.kill(g);
    // Another client modifies k after the WATCH; a function library and two scripts are
    // loaded (SCRIPT LOAD, and EVAL, which caches its script too).
    assert_eq!(q(&c, l, &["SET", "k", "2"]), Ok(Value::Okay));
    let lib = "#!lua name=snaplib\nredis.register_function('setit', function(keys, args) return redis.call('SET', keys[1], args[1]) end)";
    assert_eq!(
        q(&c, l, &["FUNCTION", "LOAD", lib]),
        Ok(Value::BulkString(b"snaplib".to_vec()))
    );
    let loaded = "return redis.call('SET', KEYS[1], ARGV[1])";
    let Ok(Value::BulkString(sha1)) = q(&c, l, &["SCRIPT", "LOAD", loaded]) else {
        panic!("SCRIPT LOAD gave no sha");
    };
    let evaled = "return redis.call('SET', KEYS[1], ARGV[1] .. '!')";
    assert_eq!(q(&c, l, &["EVAL", evaled, "1", "e", "x"]), Ok(Value::Okay));
    let sha2 = String::from_utf8(sha1_hex(evaled)).unwrap();
    // A script Redis refuses before caching it (more keys than arguments) is in no cache.
    let refused = "return redis.call('SET', KEYS[1], 'refused')";
    assert!(q(&c, l, &["EVAL", refused, "5"]).is_err());
    let sha3 = String::from_utf8(sha1_hex(refused)).unwrap();
    for i in 0..20 {
        q(&c, l, &["SET", &format!("other{i}"), "v"]).unwrap();
    }
    wait_applied(&mut c, &[l, f]);
    assert_eq!(q(&c, f, &["RAFT.DEBUG", "COMPACT"]), Ok(Value::Okay));
    assert_eq!(q(&c, l, &["RAFT.DEBUG", "COMPACT"]), Ok(Value::Okay));
    c.start_node(g);
    wait_applied(&mut c, &[l, f, g]);
    assert!(
        info_num(&c, g, "raft_snapshots_received") >= 1,
        "node {g} caught up without the leader's snapshot"
    );
    // f restarts from its own snapshot.
    c.kill(f);
    c.start_node(f);
    wait_applied(&mut c, &[l, f, g]);
    assert!(c.nodes[f].log().contains("loading the raft snapshot"));
    // The transaction aborts on the leader, and so on every node; FCALL and both EVALSHAs
    // write everywhere.
    assert_eq!(c.wait_leader(Duration::from_secs(15)), l);
    assert_eq!(a.cmd(&["MULTI"]), "+OK\r\n");
    assert_eq!(a.cmd(&["SET", "k", "3"]), "+QUEUED\r\n");
    assert_eq!(a.cmd(&["EXEC"]), "*-1\r\n");
    let sha1 = String::from_utf8(sha1).unwrap();
    assert_eq!(
        q(&c, l, &["FCALL", "setit", "1", "fk", "fv"]),
        Ok(Value::Okay)
    );
    assert_eq!(
        q(&c, l, &["EVALSHA", &sha1, "1", "s1", "v1"]),
        Ok(Value::Okay)
    );
    assert_eq!(
        q(&c, l, &["EVALSHA", &sha2, "1", "s2", "v2"]),
        Ok(Value::Okay)
    );
    let e = q(&c, l, &["EVALSHA", &sha3, "1", "s3"]).unwrap_err();
    assert!(e.contains("NOSCRIPT"), "{e}");
    wait_applied(&mut c, &[l, f, g]);
    let bulk = |v: &str| Value::BulkString(v.as_bytes().to_vec());
    let want = [
        ("k", bulk("2"), "ran the transaction its leader aborted"),
        ("fk", bulk("fv"), "FCALL"),
        ("s1", bulk("v1"), "EVALSHA of SCRIPT LOAD"),
        ("s2", bulk("v2!"), "EVALSHA of EVAL"),
        ("s3", Value::Nil, "EVALSHA of a refused script"),
    ];
    for i in 0..3 {
        for (key, value, what) in &want {
            assert_eq!(&c.local(i, &["GET", key]), value, "node {i}: {what}");
        }
    }
}

/// SHA-1 of a script body, as EVALSHA names it (coreutils' sha1sum).
fn sha1_hex(body: &str) -> Vec<u8> {
    use std::io::Write;
    let mut p = std::process::Command::new("sha1sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha1sum");
    p.stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write to sha1sum");
    let out = p.wait_with_output().expect("sha1sum output");
    out.stdout[..40].to_vec()
}
