//! Long and runaway scripts on a 3-node cluster: a script that runs past
//! `busy-reply-threshold` makes Redis process events from inside it, and nothing may be
//! applied from there; a script killed on the leader is killed on every node, and a restart
//! does not run it again.

mod common;

use std::time::{Duration, Instant};

use common::*;
use redis::Value;

/// A cluster whose nodes answer BUSY (and process events from inside a script) after 100 ms.
fn busy_cluster() -> Cluster {
    Cluster::start_with(3, &["--busy-reply-threshold", "100"])
}

fn is_busy(c: &Cluster, i: usize) -> bool {
    matches!(q(c, i, &["PING"]), Err(e) if e.starts_with("BUSY"))
}

fn get(c: &Cluster, i: usize, key: &str) -> Value {
    c.local(i, &["GET", key])
}

#[test]
fn a_script_longer_than_busy_reply_threshold_leaves_every_node_alive_and_equal() {
    let mut c = busy_cluster();
    let l = c.wait_leader(Duration::from_secs(10));
    let port = c.nodes[l].def.port;
    // About a second of Lua on an idle core; longer with three nodes sharing two.
    // It records how many keys it saw at its end: on every node, none of the writes that
    // follow it in the log.
    let script = "local x = 0 for i = 1, 200000000 do x = x + 1 end redis.call('SET', KEYS[1], redis.call('DBSIZE')) return x";
    let eval = std::thread::spawn(move || {
        let mut r = RawConn::open(port);
        let t = Instant::now();
        let reply = r.cmd(&["EVAL", script, "1", "looped"]);
        (reply, t.elapsed())
    });
    wait_for("the leader BUSY", Duration::from_secs(20), || {
        is_busy(&c, l)
    });
    // Writes sent while the script runs, and right after it on the leader, are committed
    // while the followers (which started it later) are still inside it.
    let mut w = RawConn::open(port);
    let mut acked = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = 0;
    while !eval.is_finished() || (0..3).any(|n| n != l && is_busy(&c, n)) {
        assert!(Instant::now() < deadline, "the script did not finish");
        // Scripts too: Redis asserts when one starts inside another.
        let key = format!("k{i}");
        let reply = w.cmd(&["EVAL", "return redis.call('SET', KEYS[1], 'v')", "1", &key]);
        if reply == "+OK\r\n" {
            acked.push(key);
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    let (reply, took) = eval.join().unwrap();
    assert_eq!(reply, ":200000000\r\n");
    assert!(
        took > Duration::from_millis(300),
        "script took only {took:?}"
    );
    for _ in 0..20 {
        let key = format!("k{i}");
        assert_eq!(w.cmd(&["SET", &key, "v"]), "+OK\r\n");
        acked.push(key);
        i += 1;
    }
    c.wait_applied_everywhere(Duration::from_secs(30));
    for n in 0..3 {
        assert!(
            c.nodes[n].is_running(),
            "node {n} died:\n{}",
            c.nodes[n].log()
        );
        assert_eq!(
            get(&c, n, "looped"),
            Value::BulkString(b"0".to_vec()),
            "node {n}"
        );
        for k in &acked {
            assert_eq!(
                get(&c, n, k),
                Value::BulkString(b"v".to_vec()),
                "node {n} key {k}"
            );
        }
        assert_eq!(
            c.local(n, &["DBSIZE"]),
            Value::Int(acked.len() as i64 + 1),
            "node {n}"
        );
    }
}

#[test]
fn function_kill_on_the_leader_stops_a_runaway_function_on_every_node_and_restarts_skip_it() {
    let mut c = busy_cluster();
    let l = c.wait_leader(Duration::from_secs(10));
    let port = c.nodes[l].def.port;
    let lib = "#!lua name=loops\nredis.register_function('spin', function(keys, args) local x = 0 while true do x = x + 1 end end)";
    assert_eq!(
        q(&c, l, &["FUNCTION", "LOAD", lib]),
        Ok(Value::BulkString(b"loops".to_vec()))
    );
    assert_eq!(q(&c, l, &["SET", "before", "1"]), Ok(Value::Okay));
    let fcall = std::thread::spawn(move || RawConn::open(port).cmd(&["FCALL", "spin", "0"]));
    wait_for("every node BUSY", Duration::from_secs(20), || {
        (0..3).all(|n| is_busy(&c, n))
    });
    // A follower does not decide alone: the kill must be the same on every node.
    let f = (l + 1) % 3;
    let e = q(&c, f, &["FUNCTION", "KILL"]).unwrap_err();
    assert!(e.starts_with("MOVED "), "{e}");
    assert_eq!(q(&c, l, &["FUNCTION", "KILL"]), Ok(Value::Okay));
    let reply = fcall.join().unwrap();
    assert!(
        // Redis 7.0's own words for either kill.
        reply.starts_with("-ERR Script killed by user with "),
        "{reply}"
    );
    wait_for("no node BUSY", Duration::from_secs(20), || {
        (0..3).all(|n| !is_busy(&c, n))
    });
    for n in (0..3).filter(|n| *n != l) {
        assert!(
            c.nodes[n]
                .log()
                .contains("stopped the script of raft entry"),
            "follower {n} did not stop it by the committed kill"
        );
    }
    assert_eq!(q(&c, l, &["SET", "after", "2"]), Ok(Value::Okay));
    c.wait_applied_everywhere(Duration::from_secs(10));
    // Every node restarts from its log: none runs the killed call again.
    for n in 0..3 {
        c.kill(n);
    }
    for n in 0..3 {
        c.start_node(n);
    }
    c.wait_leader(Duration::from_secs(20));
    c.wait_applied_everywhere(Duration::from_secs(20));
    for n in 0..3 {
        assert!(!is_busy(&c, n), "node {n} runs the killed function again");
        assert!(
            c.nodes[n].log().contains("skipped, its script was killed"),
            "node {n} did not skip the killed call when replaying its log"
        );
        assert_eq!(
            get(&c, n, "before"),
            Value::BulkString(b"1".to_vec()),
            "node {n}"
        );
        assert_eq!(
            get(&c, n, "after"),
            Value::BulkString(b"2".to_vec()),
            "node {n}"
        );
    }
}

/// Every node is running the script `client` sent, which SCRIPT KILL cannot stop: SHUTDOWN
/// NOSAVE on the leader `l` commits the kill before it exits, and each follower shuts itself
/// down when the kill reaches it, saying `why` in its log. Then every node starts again;
/// returns the new leader.
fn shut_down_around_an_unkillable_script<T>(
    c: &mut Cluster,
    l: usize,
    client: std::thread::JoinHandle<T>,
    why: &[&str],
) -> usize {
    wait_for("every node BUSY", Duration::from_secs(20), || {
        (0..3).all(|n| is_busy(c, n))
    });
    let e = q(c, l, &["SCRIPT", "KILL"]).unwrap_err();
    assert!(e.starts_with("UNKILLABLE"), "{e}");
    let _ = q(c, l, &["SHUTDOWN", "NOSAVE"]);
    wait_for("the leader gone", Duration::from_secs(10), || {
        !c.nodes[l].is_running()
    });
    let _ = client.join();
    let log = c.nodes[l].log();
    assert!(log.contains("its kill is committed"), "{log}");
    for n in (0..3).filter(|n| *n != l) {
        wait_for(
            "the follower to stop itself",
            Duration::from_secs(30),
            || !c.nodes[n].is_running(),
        );
        let log = c.nodes[n].log();
        for w in why {
            assert!(log.contains(w), "node {n} does not say {w:?}:\n{log}");
        }
    }
    for n in 0..3 {
        c.start_node(n);
    }
    c.wait_leader(Duration::from_secs(20))
}

#[test]
fn a_script_that_wrote_stops_only_with_shutdown_nosave_and_then_never_happened() {
    let mut c = busy_cluster();
    let l = c.wait_leader(Duration::from_secs(10));
    let port = c.nodes[l].def.port;
    assert_eq!(q(&c, l, &["SET", "before", "1"]), Ok(Value::Okay));
    // Writes, then loops forever.
    let script = "redis.call('SET', KEYS[1], 'w') local x = 0 while true do x = x + 1 end";
    let eval = std::thread::spawn(move || RawConn::open(port).cmd(&["EVAL", script, "1", "wrote"]));
    // As on Redis: a script that wrote cannot be killed. The followers cannot stop their
    // run either (it wrote): each shuts itself down rather than keep data the others will
    // not have.
    let l = shut_down_around_an_unkillable_script(
        &mut c,
        l,
        eval,
        &["here it cannot be stopped", "this node shuts down"],
    );
    assert_eq!(q(&c, l, &["SET", "after", "2"]), Ok(Value::Okay));
    c.wait_applied_everywhere(Duration::from_secs(20));
    for n in 0..3 {
        assert!(!is_busy(&c, n), "node {n} runs the script again");
        assert_eq!(get(&c, n, "wrote"), Value::Nil, "node {n}");
        assert_eq!(
            get(&c, n, "before"),
            Value::BulkString(b"1".to_vec()),
            "node {n}"
        );
        assert_eq!(
            get(&c, n, "after"),
            Value::BulkString(b"2".to_vec()),
            "node {n}"
        );
    }
}

/// SHUTDOWN NOSAVE on the leader during a script inside MULTI/EXEC: every node skips the
/// whole transaction. A follower that was running it had run the commands before the
/// script: it shuts itself down rather than keep them, and replays its log without them.
#[test]
fn shutdown_nosave_during_a_transaction_s_script_skips_the_transaction_on_every_node() {
    let mut c = busy_cluster();
    let l = c.wait_leader(Duration::from_secs(10));
    let port = c.nodes[l].def.port;
    // Loops forever without writing: a kill would stop it, but not inside a transaction.
    let script = "local x = 0 while true do x = x + 1 end";
    let exec = std::thread::spawn(move || {
        let mut r = RawConn::open(port);
        for cmd in [
            &["MULTI"][..],
            &["SET", "t1", "1"],
            &["EVAL", script, "0"],
            &["SET", "t2", "2"],
        ] {
            r.cmd(cmd);
        }
        r.cmd(&["EXEC"])
    });
    let l = shut_down_around_an_unkillable_script(
        &mut c,
        l,
        exec,
        &["a transaction whose script was running here"],
    );
    assert_eq!(q(&c, l, &["SET", "after", "3"]), Ok(Value::Okay));
    c.wait_applied_everywhere(Duration::from_secs(20));
    for n in 0..3 {
        assert!(!is_busy(&c, n), "node {n} runs the script again");
        assert_eq!(get(&c, n, "t1"), Value::Nil, "node {n}");
        assert_eq!(get(&c, n, "t2"), Value::Nil, "node {n}");
        assert_eq!(
            get(&c, n, "after"),
            Value::BulkString(b"3".to_vec()),
            "node {n}"
        );
    }
}

/// EVAL_RO of a script no node has seen goes through the log, though it writes nothing, so
/// every node's script cache holds it (served as a read, it would sit in one node's cache
/// only, and a later EVALSHA would write there while the other nodes answered NOSCRIPT). As
/// on a single Redis, EVALSHA then runs it, on every node; later EVAL_RO are reads again.
/// Applied commands that answered an error are counted alike on every node.
#[test]
fn eval_ro_of_a_new_script_caches_it_on_every_node() {
    for mode in ["linearizable", "lease"] {
        let mut c = Cluster::start_with(3, &["--raft.read-mode", mode]);
        let l = c.wait_leader(Duration::from_secs(15));
        let body = "if ARGV[1] == 'w' then return redis.call('SET', KEYS[1], 'written') end return redis.call('GET', KEYS[1])";
        let sha = redis::Script::new(body).get_hash().to_string();
        assert_eq!(q(&c, l, &["EVAL_RO", body, "1", "k", "r"]), Ok(Value::Nil));
        let applied = info_num(&c, l, "raft_last_applied_index");
        assert_eq!(q(&c, l, &["EVAL_RO", body, "1", "k", "r"]), Ok(Value::Nil));
        assert_eq!(
            info_num(&c, l, "raft_last_applied_index"),
            applied,
            "{mode}: the second EVAL_RO of the script went through the log"
        );
        assert_eq!(
            q(&c, l, &["EVALSHA", &sha, "1", "k", "w"]),
            Ok(Value::Okay),
            "{mode}"
        );
        // A logged read-only script may compute what differs between nodes (it writes
        // nothing): TIME works the first time as after.
        for _ in 0..2 {
            let t = q(&c, l, &["EVAL_RO", "return redis.call('TIME')", "0"]);
            assert!(
                matches!(t, Ok(Value::Array(ref v)) if v.len() == 2),
                "{mode}: {t:?}"
            );
        }
        // An applied write that fails (WRONGTYPE-like) fails on every node.
        assert!(q(&c, l, &["INCR", "k"]).is_err());
        c.wait_applied_everywhere(Duration::from_secs(10));
        for i in 0..3 {
            assert_eq!(
                c.local(i, &["SCRIPT", "EXISTS", &sha]),
                Value::Array(vec![Value::Int(1)]),
                "{mode}: node {i}'s script cache"
            );
            assert_eq!(
                get(&c, i, "k"),
                Value::BulkString(b"written".to_vec()),
                "{mode}: node {i}"
            );
            assert_eq!(info_num(&c, i, "raft_apply_errors"), 1, "{mode}: node {i}");
        }
    }
}

/// Redis 7.4 and later (and Valkey 8) keep at most 500 of the scripts EVAL loaded, dropping
/// the least recently used. A read served by one node (EVALSHA_RO) reorders that node's
/// list only, so Redis's caches differ between nodes; an EVALSHA entry must still find or
/// miss its script alike on every node. On older servers nothing is evicted and both run.
#[test]
fn evalsha_finds_or_misses_its_script_alike_on_every_node_when_redis_evicts_scripts() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(15));
    let f = (l + 1) % 3;
    let body = |tag: &str| {
        format!("if ARGV[1] == 'w' then return redis.call('INCR', KEYS[1]) end return redis.call('GET', KEYS[1]) -- {tag}")
    };
    let (s1, s2) = (body("s1"), body("s2"));
    let sha = |b: &str| redis::Script::new(b).get_hash().to_string();
    assert_eq!(q(&c, l, &["EVAL", &s1, "1", "k1", "w"]), Ok(Value::Int(1)));
    assert_eq!(q(&c, l, &["EVAL", &s2, "1", "k2", "w"]), Ok(Value::Int(1)));
    // 498 more: 500 scripts loaded by EVAL, s1 the least recently used.
    let r = |i: usize| format!("return redis.call('INCR', KEYS[1]) -- {i}");
    let mut conn = c.conn(l).expect("conn");
    let mut p = redis::pipe();
    for i in 0..498 {
        p.cmd("EVAL").arg(r(i)).arg(1).arg("n");
    }
    let _: Vec<Value> = p.query(&mut conn).expect("EVAL pipeline");
    // Served by the leader alone: s1 becomes its most recently used script there only.
    assert_eq!(
        q(&c, l, &["EVALSHA_RO", &sha(&s1), "1", "k1", "r"]),
        Ok(Value::BulkString(b"1".to_vec()))
    );
    // One more: the leader's Redis drops s2, the followers' drop s1 (where Redis evicts).
    assert_eq!(
        q(&c, l, &["EVAL", "return 'new'", "0"]),
        Ok(Value::BulkString(b"new".to_vec()))
    );
    c.wait_applied_everywhere(Duration::from_secs(10));
    // Redis evicts scripts here if a follower's own cache lost s1; then the leader's lost
    // s2 instead.
    let exists = |i: usize, b: &str| c.local(i, &["SCRIPT", "EXISTS", &sha(b)]);
    let (yes, no) = (
        Value::Array(vec![Value::Int(1)]),
        Value::Array(vec![Value::Int(0)]),
    );
    let evicts = exists(f, &s1) == no;
    assert_eq!(exists(l, &s1), yes);
    assert_eq!(
        exists(l, &s2),
        if evicts { no.clone() } else { yes.clone() }
    );
    // A linearizable read finds s2 as an EVALSHA entry would, whatever the leader's Redis
    // dropped (it runs the book's body there).
    assert_eq!(
        q(&c, l, &["EVALSHA_RO", &sha(&s2), "1", "k2", "r"]),
        Ok(Value::BulkString(b"1".to_vec()))
    );
    // An EVAL Redis refuses before it caches the script (more keys than arguments) leaves
    // the book as it was on every node, whatever their Redis holds.
    assert!(q(&c, l, &["EVAL", &s1, "5", "k1"]).is_err());
    // In log order s1 is the least recently used: it is gone on every node (NOSCRIPT, and
    // nothing runs anywhere); s2 runs on every node, the leader too, even if its Redis
    // dropped it.
    let r1 = q(&c, l, &["EVALSHA", &sha(&s1), "1", "k1", "w"]);
    assert!(matches!(&r1, Err(e) if e.starts_with("NOSCRIPT")), "{r1:?}");
    assert_eq!(
        q(&c, l, &["EVALSHA", &sha(&s2), "1", "k2", "w"]),
        Ok(Value::Int(2))
    );
    c.wait_applied_everywhere(Duration::from_secs(10));
    let errors = info_num(&c, l, "raft_apply_errors");
    for i in 0..3 {
        assert_eq!(info_num(&c, i, "raft_apply_errors"), errors, "node {i}");
    }
    // A follower restarts from its own snapshot: its book keeps the order, so the next
    // eviction (r(0), now the least recently used) is the same there as on the others.
    assert_eq!(q(&c, f, &["RAFT.DEBUG", "COMPACT"]), Ok(Value::Okay));
    c.kill(f);
    c.start_node(f);
    c.wait_applied_everywhere(Duration::from_secs(10));
    assert!(c.nodes[f].log().contains("loading the raft snapshot"));
    assert!(q(&c, l, &["EVAL", "return 'new2'", "0"]).is_ok());
    let r0 = q(&c, l, &["EVALSHA", &sha(&r(0)), "1", "n"]);
    assert!(matches!(&r0, Err(e) if e.starts_with("NOSCRIPT")), "{r0:?}");
    assert_eq!(
        q(&c, l, &["EVALSHA", &sha(&r(1)), "1", "n"]),
        Ok(Value::Int(499))
    );
    // A script's own NOSCRIPT error is its reply: it does not run again as EVAL.
    let own = "redis.call('INCR', KEYS[1]) return redis.error_reply('NOSCRIPT its own')";
    assert!(q(&c, l, &["EVAL", own, "1", "m"]).is_err());
    let e = q(&c, l, &["EVALSHA", &sha(own), "1", "m"]);
    assert!(matches!(&e, Err(e) if e.contains("its own")), "{e:?}");
    c.wait_applied_everywhere(Duration::from_secs(10));
    let bulk = |v: &str| Value::BulkString(v.as_bytes().to_vec());
    for i in 0..3 {
        let what = format!("node {i} (Redis evicts: {evicts})");
        assert_eq!(get(&c, i, "k1"), bulk("1"), "{what}");
        assert_eq!(get(&c, i, "k2"), bulk("2"), "{what}");
        assert_eq!(get(&c, i, "n"), bulk("499"), "{what}");
        assert_eq!(get(&c, i, "m"), bulk("2"), "{what}");
    }
}

/// SCRIPT EXISTS and reads of scripts by SHA-1 (EVALSHA_RO) answer by the module's book, as
/// the log's EVALSHA entries do, whatever this node's Redis holds: Redis 7.0 and 7.2 keep
/// every script, so they still hold one the book dropped. On every node, in every read
/// mode, while another client is in MULTI, and in a transaction.
#[test]
fn script_exists_and_evalsha_ro_answer_as_evalsha_entries_do() {
    // Linearizable: reads wait for a round (RAFT); stale: Redis runs them at once; lease:
    // at once on the leader, after a round on the followers.
    for mode in ["linearizable", "stale", "lease"] {
        answer_as_evalsha_entries_do(mode);
    }
}

fn answer_as_evalsha_entries_do(mode: &str) {
    let mut c = Cluster::start_with(
        3,
        &["--raft.follower-reads", "yes", "--raft.read-mode", mode],
    );
    let l = c.wait_leader(Duration::from_secs(15));
    let sha = |b: &str| redis::Script::new(b).get_hash().to_string();
    let first = "return redis.call('GET', KEYS[1]) -- first";
    let kept = "return redis.call('GET', KEYS[1]) -- kept";
    assert_eq!(q(&c, l, &["SET", "k", "v"]), Ok(Value::Okay));
    assert_eq!(
        q(&c, l, &["EVAL", first, "1", "k"]),
        Ok(Value::BulkString(b"v".to_vec()))
    );
    assert_eq!(
        q(&c, l, &["SCRIPT", "LOAD", kept]),
        Ok(Value::BulkString(sha(kept).into_bytes()))
    );
    // 500 more scripts loaded by EVAL: the book drops `first`, the least recently used.
    let r = |i: usize| format!("return {i} -- r");
    let mut conn = c.conn(l).expect("conn");
    let mut p = redis::pipe();
    for i in 0..500 {
        p.cmd("EVAL").arg(r(i)).arg(0);
    }
    let _: Vec<Value> = p.query(&mut conn).expect("EVAL pipeline");
    c.wait_applied_everywhere(Duration::from_secs(10));
    let asked = [sha(first), sha(&r(499)), sha(kept), "f".repeat(40)];
    let mut exists = vec!["SCRIPT", "EXISTS"];
    exists.extend(asked.iter().map(|s| s.as_str()));
    let answer = Ok(Value::Array(
        [0, 1, 1, 0].into_iter().map(Value::Int).collect(),
    ));
    let noscript = |r: &Result<Value, String>| matches!(r, Err(e) if e.starts_with("NOSCRIPT"));
    for i in 0..3 {
        assert_eq!(q(&c, i, &exists), answer, "{mode}, node {i}");
        let e = q(&c, i, &["EVALSHA_RO", &sha(first), "1", "k"]);
        assert!(noscript(&e), "{mode}, node {i}: {e:?}");
        // In either case, as Redis matches SHA-1s.
        let upper = sha(kept).to_uppercase();
        assert_eq!(
            q(&c, i, &["EVALSHA_RO", &upper, "1", "k"]),
            Ok(Value::BulkString(b"v".to_vec())),
            "{mode}, node {i}"
        );
        assert_eq!(
            q(&c, i, &["SCRIPT", "EXISTS", &upper]),
            Ok(Value::Array(vec![Value::Int(1)])),
            "{mode}, node {i}"
        );
    }
    // As the EVALSHA entry answers.
    let e = q(&c, l, &["EVALSHA", &sha(first), "1", "k"]);
    assert!(noscript(&e), "{e:?}");
    // Redis checks the number of keys before it looks for the script.
    let e = q(&c, l, &["EVALSHA_RO", &sha(first), "2", "k"]);
    assert!(
        matches!(&e, Err(e) if e.contains("Number of keys")),
        "{e:?}"
    );
    // While another client is in MULTI, node-local commands go through RAFT: the same.
    let mut other = RawConn::open(c.nodes[l].def.port);
    assert_eq!(other.cmd(&["MULTI"]), "+OK\r\n");
    assert_eq!(q(&c, l, &exists), answer);
    let e = q(&c, l, &["EVALSHA_RO", &sha(first), "1", "k"]);
    assert!(noscript(&e), "{e:?}");
    assert_eq!(other.cmd(&["DISCARD"]), "+OK\r\n");
    // In a transaction: SCRIPT EXISTS runs on the leader alone, EVALSHA_RO on every node.
    let mut t = RawConn::open(c.nodes[l].def.port);
    assert_eq!(t.cmd(&["MULTI"]), "+OK\r\n");
    assert_eq!(t.cmd(&exists), "+QUEUED\r\n");
    assert_eq!(t.cmd(&["EVALSHA_RO", &sha(first), "1", "k"]), "+QUEUED\r\n");
    let reply = t.cmd(&["EXEC"]);
    assert!(
        reply.starts_with("*2\r\n*4\r\n:0\r\n:1\r\n:1\r\n:0\r\n-NOSCRIPT"),
        "{reply}"
    );
    // Once loaded again, it exists and runs everywhere.
    assert_eq!(
        q(&c, l, &["SCRIPT", "LOAD", first]),
        Ok(Value::BulkString(sha(first).into_bytes()))
    );
    c.wait_applied_everywhere(Duration::from_secs(10));
    for i in 0..3 {
        assert_eq!(
            q(&c, i, &["SCRIPT", "EXISTS", &sha(first)]),
            Ok(Value::Array(vec![Value::Int(1)])),
            "node {i}"
        );
        assert_eq!(
            q(&c, i, &["EVALSHA_RO", &sha(first), "1", "k"]),
            Ok(Value::BulkString(b"v".to_vec())),
            "node {i}"
        );
    }
}
