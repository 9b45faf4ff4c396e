//! Blocking commands on Redis 7.0: clients block until data arrives, in arrival order, with
//! the same data on every node; timeouts, CLIENT UNBLOCK and disconnects.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn same_everywhere(c: &mut Cluster, args: &[&str]) -> Value {
    c.wait_applied_everywhere(Duration::from_secs(10));
    let v = c.local(0, args);
    for i in 1..3 {
        assert_eq!(c.local(i, args), v, "node {i}: {args:?}");
    }
    v
}

#[test]
fn blpop_waits_for_data_and_waiters_are_served_in_arrival_order() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    let port = c.nodes[l].def.port;
    let mut w1 = RawConn::open(port);
    let mut w2 = RawConn::open(port);
    let mut p = RawConn::open(port);
    w1.send(&["BLPOP", "q", "0"]);
    wait_blocked(&c, l, 1);
    w2.send(&["BLPOP", "q", "other", "0"]);
    wait_blocked(&c, l, 2);
    assert_eq!(p.cmd(&["RPUSH", "q", "a"]), ":1\r\n");
    assert_eq!(w1.read(), "*2\r\n$1\r\nq\r\n$1\r\na\r\n");
    assert_eq!(p.cmd(&["RPUSH", "q", "b", "c"]), ":2\r\n");
    assert_eq!(w2.read(), "*2\r\n$1\r\nq\r\n$1\r\nb\r\n");
    // Data already there: no blocking.
    assert_eq!(p.cmd(&["BLPOP", "q", "0"]), "*2\r\n$1\r\nq\r\n$1\r\nc\r\n");
    assert_eq!(same_everywhere(&mut c, &["LLEN", "q"]), Value::Int(0));
}

#[test]
fn blocking_commands_of_every_kind_are_served() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    let port = c.nodes[l].def.port;
    let mut p = RawConn::open(port);
    let cases: Vec<(Vec<&str>, Vec<&str>, &str)> = vec![
        (
            vec!["BRPOP", "l1", "0"],
            vec!["RPUSH", "l1", "x"],
            "*2\r\n$2\r\nl1\r\n$1\r\nx\r\n",
        ),
        (
            vec!["BLMOVE", "l2", "d2", "LEFT", "RIGHT", "0"],
            vec!["RPUSH", "l2", "y"],
            "$1\r\ny\r\n",
        ),
        (
            vec!["BRPOPLPUSH", "l3", "d3", "0"],
            vec!["RPUSH", "l3", "z"],
            "$1\r\nz\r\n",
        ),
        (
            vec!["BLMPOP", "0", "1", "l4", "LEFT", "COUNT", "2"],
            vec!["RPUSH", "l4", "a", "b"],
            "*2\r\n$2\r\nl4\r\n*2\r\n$1\r\na\r\n$1\r\nb\r\n",
        ),
        (
            vec!["BZPOPMIN", "z1", "0"],
            vec!["ZADD", "z1", "1", "m"],
            "*3\r\n$2\r\nz1\r\n$1\r\nm\r\n$1\r\n1\r\n",
        ),
        (
            vec!["BZMPOP", "0", "1", "z2", "MAX"],
            vec!["ZADD", "z2", "2", "n"],
            "*2\r\n$2\r\nz2\r\n*1\r\n*2\r\n$1\r\nn\r\n$1\r\n2\r\n",
        ),
    ];
    for (block, push, expected) in cases {
        let mut w = RawConn::open(port);
        w.send(&block);
        wait_blocked(&c, l, 1);
        let r = p.cmd(&push);
        assert!(r.starts_with(':'), "{push:?}: {r}");
        assert_eq!(w.read(), expected, "{block:?}");
    }
    assert_eq!(
        same_everywhere(&mut c, &["LRANGE", "d2", "0", "-1"]),
        Value::Array(vec![Value::BulkString(b"y".to_vec())])
    );
    assert_eq!(
        same_everywhere(&mut c, &["LRANGE", "d3", "0", "-1"]),
        Value::Array(vec![Value::BulkString(b"z".to_vec())])
    );
    assert_eq!(
        same_everywhere(&mut c, &["EXISTS", "l1", "l2", "l3", "l4", "z1", "z2"]),
        Value::Int(0)
    );
}

#[test]
fn xreadgroup_block_gets_new_entries() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    let port = c.nodes[l].def.port;
    let mut p = RawConn::open(port);
    assert_eq!(
        p.cmd(&["XGROUP", "CREATE", "s", "g", "$", "MKSTREAM"]),
        "+OK\r\n"
    );
    let mut w = RawConn::open(port);
    w.send(&[
        "XREADGROUP",
        "GROUP",
        "g",
        "c1",
        "BLOCK",
        "0",
        "STREAMS",
        "s",
        ">",
    ]);
    wait_blocked(&c, l, 1);
    assert!(p
        .cmd(&["XADD", "s", "5-1", "f", "v"])
        .starts_with("$3\r\n5-1"));
    assert_eq!(
        w.read(),
        "*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n5-1\r\n*2\r\n$1\r\nf\r\n$1\r\nv\r\n"
    );
    same_everywhere(&mut c, &["XPENDING", "s", "g"]);
}

#[test]
fn timeouts_unblock_and_disconnects_lose_nothing() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    let port = c.nodes[l].def.port;
    // Timeout: the null reply of each command, after about the timeout.
    let mut w = RawConn::open(port);
    let t0 = Instant::now();
    assert_eq!(w.cmd(&["BLPOP", "t", "0.3"]), "*-1\r\n");
    assert!(
        t0.elapsed() >= Duration::from_millis(290),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(
        w.cmd(&["BLMOVE", "t", "d", "LEFT", "LEFT", "0.1"]),
        "$-1\r\n"
    );
    // CLIENT UNBLOCK.
    let mut w = RawConn::open(port);
    let id = w.cmd(&["CLIENT", "ID"]);
    let id = id.trim_start_matches(':').trim().to_string();
    w.send(&["BLPOP", "u", "0"]);
    wait_blocked(&c, l, 1);
    let mut admin = RawConn::open(port);
    assert_eq!(admin.cmd(&["CLIENT", "UNBLOCK", &id]), ":1\r\n");
    assert_eq!(w.read(), "*-1\r\n");
    // A waiter that disconnects takes nothing with it.
    {
        let mut gone = RawConn::open(port);
        gone.send(&["BLPOP", "d", "0"]);
        wait_blocked(&c, l, 1);
    }
    wait_blocked(&c, l, 0);
    assert_eq!(admin.cmd(&["RPUSH", "d", "kept"]), ":1\r\n");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        same_everywhere(&mut c, &["LRANGE", "d", "0", "-1"]),
        Value::Array(vec![Value::BulkString(b"kept".to_vec())])
    );
    // Inside MULTI blocking commands do not block, as in Redis.
    assert_eq!(admin.cmd(&["MULTI"]), "+OK\r\n");
    assert_eq!(admin.cmd(&["BLPOP", "empty", "0"]), "+QUEUED\r\n");
    assert_eq!(admin.cmd(&["EXEC"]), "*1\r\n*-1\r\n");
}

#[test]
fn xread_block_waits_for_new_entries_on_leader_and_followers() {
    let mut c = Cluster::define(3);
    for n in &mut c.nodes {
        n.extra = vec!["--raft.follower-reads".into(), "yes".into()];
    }
    for i in 0..3 {
        c.start_node(i);
    }
    let l = c.wait_leader(Duration::from_secs(10));
    let f = (l + 1) % 3;
    let mut p = RawConn::open(c.nodes[l].def.port);
    assert!(p.cmd(&["XADD", "s", "1-1", "old", "x"]).starts_with("$3"));
    let mut on_leader = RawConn::open(c.nodes[l].def.port);
    let mut on_follower = RawConn::open(c.nodes[f].def.port);
    // `$` means entries after the last one at the time of the call.
    on_leader.send(&["XREAD", "BLOCK", "0", "STREAMS", "s", "$"]);
    on_follower.send(&["XREAD", "COUNT", "10", "BLOCK", "5000", "STREAMS", "s", "$"]);
    wait_blocked(&c, l, 1);
    wait_blocked(&c, f, 1);
    assert!(p.cmd(&["XADD", "s", "2-1", "new", "y"]).starts_with("$3"));
    let expected = "*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n2-1\r\n*2\r\n$3\r\nnew\r\n$1\r\ny\r\n";
    assert_eq!(on_leader.read(), expected);
    assert_eq!(on_follower.read(), expected);
    // Nothing new within the timeout: the null reply.
    let t0 = Instant::now();
    assert_eq!(
        on_leader.cmd(&["XREAD", "BLOCK", "200", "STREAMS", "s", "$"]),
        "*-1\r\n"
    );
    assert!(t0.elapsed() >= Duration::from_millis(190));
    // Data already there: answered at once.
    assert!(on_leader
        .cmd(&["XREAD", "BLOCK", "0", "STREAMS", "s", "0"])
        .starts_with("*1\r\n"));
}

/// The race the undo exists for: waiters time out while pushes are being committed, so
/// some pops are applied for a client that no longer waits. Every pushed element must end
/// up either in exactly one reply a client received or still in the list, on every node,
/// and every waiter gets an answer.
#[test]
fn pops_for_waiters_that_left_are_undone_and_nothing_is_lost_or_duplicated() {
    race_waiters_against_pushes(false);
}

/// The same race with CLIENT UNBLOCK sent at the waiters in a tight loop: an UNBLOCK that
/// arrives while a waiter's pop is being answered must not take that answer from it.
#[test]
fn client_unblock_in_a_tight_loop_neither_loses_a_pop_nor_a_reply() {
    race_waiters_against_pushes(true);
}

fn race_waiters_against_pushes(unblock: bool) {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    let port = c.nodes[l].def.port;
    const PUSHES: usize = 300;
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let ids = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let unblocked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let waiters: Vec<_> = (0..6)
        .map(|t| {
            let received = received.clone();
            let ids = ids.clone();
            std::thread::spawn(move || {
                let mut w = RawConn::open(port);
                let id = w.cmd(&["CLIENT", "ID"]);
                ids.lock()
                    .unwrap()
                    .push(id.trim_start_matches(':').trim().to_string());
                for i in 0..60 {
                    // Timeouts from 10 to 70 ms: many expire while a pop is in flight.
                    let timeout = format!("0.0{}", 1 + (i + t) % 7);
                    w.send(&["BLPOP", "race", &timeout]);
                    // Every BLPOP gets a reply (a lost one fails the read after 10 s).
                    let reply = w.read();
                    if let Some(v) = reply.lines().nth(4) {
                        received.lock().unwrap().push(v.to_string());
                    }
                }
            })
        })
        .collect();
    let unblocker = unblock.then(|| {
        let (ids, done, unblocked) = (ids.clone(), done.clone(), unblocked.clone());
        std::thread::spawn(move || {
            let mut admin = RawConn::open(port);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let targets = ids.lock().unwrap().clone();
                for id in targets {
                    if admin.cmd(&["CLIENT", "UNBLOCK", &id]) == ":1\r\n" {
                        unblocked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                // A breath between sweeps: on a loaded machine a sweep without one unblocked
                // every waiter before any push could reach it, and nothing was raced.
                std::thread::sleep(Duration::from_micros(300));
            }
        })
    });
    let mut p = RawConn::open(port);
    for i in 0..PUSHES {
        assert!(p.cmd(&["RPUSH", "race", &format!("e{i}")]).starts_with(':'));
        if i % 10 == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    for w in waiters {
        w.join().unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(u) = unblocker {
        u.join().unwrap();
        let n = unblocked.load(std::sync::atomic::Ordering::Relaxed);
        println!("CLIENT UNBLOCK unblocked a waiter {n} times");
        assert!(n > 0, "CLIENT UNBLOCK never found a waiter to unblock");
    }
    // Let late undos land, then compare.
    std::thread::sleep(Duration::from_millis(500));
    let left = match same_everywhere(&mut c, &["LRANGE", "race", "0", "-1"]) {
        Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
                other => panic!("{other:?}"),
            })
            .collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    let got = received.lock().unwrap().clone();
    let mut all: Vec<String> = got.iter().chain(left.iter()).cloned().collect();
    all.sort();
    let mut want: Vec<String> = (0..PUSHES).map(|i| format!("e{i}")).collect();
    want.sort();
    assert_eq!(
        all,
        want,
        "{} received by clients, {} left in the list",
        got.len(),
        left.len()
    );
    assert!(!got.is_empty(), "no waiter was ever served");
}

#[test]
fn a_waiter_whose_destination_has_the_wrong_type_gets_wrongtype_and_the_next_gets_the_element() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    let port = c.nodes[l].def.port;
    let mut p = RawConn::open(port);
    let mut w1 = RawConn::open(port);
    let mut w2 = RawConn::open(port);
    assert_eq!(p.cmd(&["SET", "dst1", "a string"]), "+OK\r\n");
    w1.send(&["BRPOPLPUSH", "src", "dst1", "0"]);
    wait_blocked(&c, l, 1);
    w2.send(&["BRPOPLPUSH", "src", "dst2", "0"]);
    wait_blocked(&c, l, 2);
    assert_eq!(p.cmd(&["RPUSH", "src", "e"]), ":1\r\n");
    assert!(w1.read().starts_with("-WRONGTYPE"));
    assert_eq!(w2.read(), "$1\r\ne\r\n");
    assert_eq!(same_everywhere(&mut c, &["LLEN", "src"]), Value::Int(0));
    assert_eq!(
        same_everywhere(&mut c, &["LRANGE", "dst2", "0", "-1"]),
        Value::Array(vec![Value::BulkString(b"e".to_vec())])
    );
}

#[test]
fn a_key_that_ends_a_transaction_with_another_type_does_not_wake_its_waiters() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    let port = c.nodes[l].def.port;
    let mut p = RawConn::open(port);
    let cases: [(&[&str], &[&str], &str); 4] = [
        (
            &["BLPOP", "k1", "0"],
            &["RPUSH", "k1", "x"],
            "*2\r\n$2\r\nk1\r\n$1\r\ny\r\n",
        ),
        (
            &["BLMPOP", "0", "1", "k2", "LEFT"],
            &["RPUSH", "k2", "x"],
            "*2\r\n$2\r\nk2\r\n*1\r\n$1\r\ny\r\n",
        ),
        (
            &["BZPOPMIN", "k3", "0"],
            &["ZADD", "k3", "1", "x"],
            "*3\r\n$2\r\nk3\r\n$1\r\ny\r\n$1\r\n1\r\n",
        ),
        (
            &["BZMPOP", "0", "1", "k4", "MIN"],
            &["ZADD", "k4", "1", "x"],
            "*2\r\n$2\r\nk4\r\n*1\r\n*2\r\n$1\r\ny\r\n$1\r\n1\r\n",
        ),
    ];
    for (block, push, served) in cases {
        let key = push[1];
        let mut w = RawConn::open(port);
        w.send(block);
        wait_blocked(&c, l, 1);
        assert_eq!(p.cmd(&["MULTI"]), "+OK\r\n");
        assert_eq!(p.cmd(push), "+QUEUED\r\n");
        assert_eq!(p.cmd(&["DEL", key]), "+QUEUED\r\n");
        assert_eq!(p.cmd(&["SET", key, "a string"]), "+QUEUED\r\n");
        assert!(p.cmd(&["EXEC"]).starts_with("*3\r\n"));
        // Still waiting: nothing answered it.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(p.cmd(&["DEL", key]), ":1\r\n");
        let mut again: Vec<&str> = push.to_vec();
        *again.last_mut().unwrap() = "y";
        assert_eq!(p.cmd(&again), ":1\r\n");
        assert_eq!(w.read(), served, "{block:?}");
    }
    assert_eq!(same_everywhere(&mut c, &["DBSIZE"]), Value::Int(0));
}

#[test]
fn a_chain_of_blocked_moves_resolves_before_the_write_that_started_it_returns() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    let port = c.nodes[l].def.port;
    let mut p = RawConn::open(port);
    let mut a = RawConn::open(port);
    let mut b = RawConn::open(port);
    a.send(&["BRPOPLPUSH", "list1", "list2", "0"]);
    wait_blocked(&c, l, 1);
    b.send(&["BRPOPLPUSH", "list2", "list1", "0"]);
    wait_blocked(&c, l, 2);
    assert_eq!(p.cmd(&["RPUSH", "list1", "foo"]), ":1\r\n");
    // Read right after: both moves done, as on Redis.
    assert_eq!(
        p.cmd(&["LRANGE", "list1", "0", "-1"]),
        "*1\r\n$3\r\nfoo\r\n"
    );
    assert_eq!(p.cmd(&["LRANGE", "list2", "0", "-1"]), "*0\r\n");
    assert_eq!(a.read(), "$3\r\nfoo\r\n");
    assert_eq!(b.read(), "$3\r\nfoo\r\n");
    assert_eq!(
        same_everywhere(&mut c, &["LRANGE", "list1", "0", "-1"]),
        Value::Array(vec![Value::BulkString(b"foo".to_vec())])
    );
}
