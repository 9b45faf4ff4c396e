//! Read consistency: `raft.read-mode` linearizable (ReadIndex), lease and stale, RedisRaft's
//! `raft.quorum-reads`, and linearizable follower reads.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn cluster_with(args: &[&str]) -> Cluster {
    let mut c = Cluster::define(3);
    for n in &mut c.nodes {
        n.extra = args.iter().map(|s| s.to_string()).collect();
    }
    for i in 0..3 {
        c.start_node(i);
    }
    c.wait_leader(Duration::from_secs(10));
    c
}

fn set(c: &Cluster, i: usize, k: &str, v: &str) {
    let mut con = c.conn(i).unwrap();
    let _: () = redis::cmd("SET").arg(k).arg(v).query(&mut con).unwrap();
}

fn get(c: &Cluster, i: usize, k: &str) -> redis::RedisResult<Option<String>> {
    let mut con = c.conn(i)?;
    redis::cmd("GET").arg(k).query(&mut con)
}

#[test]
fn linearizable_read_on_a_cut_off_leader_never_returns_data() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    set(&c, l, "k", "v1");
    assert_eq!(get(&c, l, "k").unwrap().as_deref(), Some("v1"));
    let followers: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    for &f in &followers {
        c.signal(f, libc::SIGSTOP);
    }
    let t0 = Instant::now();
    let r = get(&c, l, "k");
    let elapsed = t0.elapsed();
    for &f in &followers {
        c.signal(f, libc::SIGCONT);
    }
    let e = r.expect_err("a leader without a quorum answered a linearizable read");
    assert_eq!(e.code(), Some("TIMEOUT"), "{e}");
    assert!(elapsed >= Duration::from_millis(ELECTION_MS), "{elapsed:?}");
    // Reads work again once the cluster is whole. The resumed followers may still hold an
    // election after `wait_leader` found one (their timers ran out while they were stopped),
    // so a read may meet a leader that has just stepped down: ask until the cluster settles.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let l = c.wait_leader(Duration::from_secs(10));
        match get(&c, l, "k") {
            Ok(v) => {
                assert_eq!(v.as_deref(), Some("v1"));
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "reads fail still: {e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn stale_mode_reads_local_data_and_quorum_reads_no_means_stale() {
    let mut c = cluster_with(&["--raft.quorum-reads", "no"]);
    let l = c.wait_leader(Duration::from_secs(10));
    let mut con = c.conn(l).unwrap();
    let v: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("raft.read-mode")
        .query(&mut con)
        .unwrap();
    assert_eq!(v, vec!["raft.read-mode", "stale"]);
    set(&c, l, "k", "v1");
    let followers: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    for &f in &followers {
        c.signal(f, libc::SIGSTOP);
    }
    // Without a quorum, a stale-mode leader still answers from its data until it steps down.
    let r = get(&c, l, "k");
    for &f in &followers {
        c.signal(f, libc::SIGCONT);
    }
    assert_eq!(r.unwrap().as_deref(), Some("v1"));
}

#[test]
fn lease_mode_serves_reads_on_the_leader() {
    let mut c = cluster_with(&["--raft.read-mode", "lease"]);
    let l = c.wait_leader(Duration::from_secs(10));
    set(&c, l, "k", "v1");
    assert_eq!(get(&c, l, "k").unwrap().as_deref(), Some("v1"));
    let v: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("raft.read-mode")
        .query(&mut c.conn(l).unwrap())
        .unwrap();
    assert_eq!(v, vec!["raft.read-mode", "lease"]);
}

#[test]
fn a_leader_answers_reads_at_once_while_its_lease_holds_and_never_after() {
    let mut c = cluster_with(&["--raft.read-mode", "lease"]);
    let l = c.wait_leader(Duration::from_secs(10));
    set(&c, l, "k", "v1");
    let mut con = c.conn(l).unwrap();
    // The lease is renewed while the cluster is whole; give it a few rounds.
    std::thread::sleep(Duration::from_millis(300));
    let followers: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    for &f in &followers {
        c.signal(f, libc::SIGSTOP);
    }
    // No follower can answer now: a linearizable leader would wait and fail (see
    // linearizable_read_on_a_cut_off_leader_never_returns_data); a leader in its lease
    // answers from its own data, at once.
    let t0 = Instant::now();
    let got: redis::RedisResult<Option<String>> = redis::cmd("GET").arg("k").query(&mut con);
    let at_once = t0.elapsed();
    // Past the lease (less than an election timeout from the last confirmed round), it
    // must not answer from its data any more.
    std::thread::sleep(Duration::from_millis(ELECTION_MS + 200));
    let late: redis::RedisResult<Option<String>> = redis::cmd("GET").arg("k").query(&mut con);
    for &f in &followers {
        c.signal(f, libc::SIGCONT);
    }
    assert_eq!(got.unwrap().as_deref(), Some("v1"));
    assert!(at_once < Duration::from_millis(100), "{at_once:?}");
    let e = late.expect_err("a leader whose lease ran out answered from its data");
    assert!(
        matches!(e.code(), Some("TIMEOUT" | "CLUSTERDOWN" | "MOVED")),
        "{e}"
    );
    let l = c.wait_leader(Duration::from_secs(10));
    assert_eq!(get(&c, l, "k").unwrap().as_deref(), Some("v1"));
}

#[test]
fn a_leader_paused_past_its_lease_never_answers_with_data_from_before() {
    let mut c = cluster_with(&["--raft.read-mode", "lease"]);
    for round in 0..3 {
        let old = c.wait_leader(Duration::from_secs(10));
        let before = format!("before-{round}");
        set(&c, old, "k", &before);
        // Connected and asking before the pause: the reads wait in the old leader's socket.
        let mut cons: Vec<redis::Connection> = (0..4).map(|_| c.conn(old).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(200));
        c.signal(old, libc::SIGSTOP);
        // Another leader takes over and a new value is acknowledged.
        let after = format!("after-{round}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let others: Vec<usize> = (0..3).filter(|&i| i != old).collect();
            let written = others.iter().any(|&i| {
                c.conn(i).is_ok_and(|mut con| {
                    redis::cmd("SET")
                        .arg("k")
                        .arg(&after)
                        .query::<()>(&mut con)
                        .is_ok()
                })
            });
            if written {
                break;
            }
            assert!(Instant::now() < deadline, "no new leader took a write");
            std::thread::sleep(Duration::from_millis(50));
        }
        let handles: Vec<_> = cons
            .drain(..)
            .map(|mut con| {
                std::thread::spawn(move || {
                    redis::cmd("GET").arg("k").query::<Option<String>>(&mut con)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        c.signal(old, libc::SIGCONT);
        for h in handles {
            match h.join().unwrap() {
                Ok(v) => assert_eq!(v.as_deref(), Some(after.as_str()), "round {round}"),
                Err(e) => assert!(
                    matches!(e.code(), Some("TIMEOUT" | "CLUSTERDOWN" | "MOVED")),
                    "round {round}: {e}"
                ),
            }
        }
    }
}

#[test]
fn follower_reads_see_every_write_acknowledged_before_them() {
    let mut c = cluster_with(&["--raft.follower-reads", "yes"]);
    let l = c.wait_leader(Duration::from_secs(10));
    let followers: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    let mut fcons: Vec<redis::Connection> = followers.iter().map(|&f| c.conn(f).unwrap()).collect();
    let mut lcon = c.conn(l).unwrap();
    for i in 0..200 {
        let v = i.to_string();
        let _: () = redis::cmd("SET").arg("k").arg(&v).query(&mut lcon).unwrap();
        // The write is acknowledged: a read on any follower must see it (or later).
        for fc in &mut fcons {
            let got: String = redis::cmd("GET").arg("k").query(fc).unwrap();
            assert_eq!(got, v);
        }
    }
    // Writes on a follower still redirect.
    let e = redis::cmd("SET")
        .arg("k")
        .arg("x")
        .query::<()>(&mut fcons[0])
        .unwrap_err();
    assert_eq!(
        err_text(&e),
        format!("MOVED 0 127.0.0.1:{}", c.nodes[l].def.port)
    );
    // follower-reads can be turned off at runtime: reads on followers redirect again.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("raft.follower-reads")
        .arg("no")
        .query(&mut fcons[0])
        .unwrap();
    let e = redis::cmd("GET")
        .arg("k")
        .query::<String>(&mut fcons[0])
        .unwrap_err();
    assert_eq!(e.code(), Some("MOVED"));
}

#[test]
fn reads_on_followers_redirect_and_pipelined_reads_share_rounds() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    let f = (l + 1) % 3;
    let e = get(&c, f, "k").unwrap_err();
    assert_eq!(
        err_text(&e),
        format!("MOVED 0 127.0.0.1:{}", c.nodes[l].def.port)
    );
    // Pipelined reads from many clients share rounds and each gets its own answer.
    set(&c, l, "a", "1");
    set(&c, l, "b", "2");
    let mut con = c.conn(l).unwrap();
    let mut p = redis::pipe();
    for _ in 0..100 {
        p.cmd("GET")
            .arg("a")
            .cmd("GET")
            .arg("b")
            .cmd("GET")
            .arg("missing");
    }
    let vals: Vec<Option<String>> = p.query(&mut con).unwrap();
    for chunk in vals.chunks(3) {
        assert_eq!(chunk, [Some("1".to_string()), Some("2".to_string()), None]);
    }
}

/// A leader frozen (SIGSTOP) while another is elected and takes writes: reads that reached
/// it while frozen must not be answered from its old data once it resumes. Each round
/// writes a fresh value through the new leader, then sends GETs to the frozen one.
#[test]
fn a_resumed_old_leader_never_answers_a_read_from_before_its_pause() {
    let rounds: usize = std::env::var("PAUSE_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let mut c = Cluster::start(3);
    // Background load on every node: reads and writes in flight when the leader stops.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|t| {
            let ports: Vec<u16> = c.nodes.iter().map(|n| n.def.port).collect();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let port = ports[(n as usize + t) % ports.len()];
                    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
                    else {
                        continue;
                    };
                    let Ok(mut con) =
                        client.get_connection_with_timeout(Duration::from_millis(200))
                    else {
                        continue;
                    };
                    let _ = con.set_read_timeout(Some(Duration::from_millis(300)));
                    for _ in 0..20 {
                        let key = format!("load{}", n % 3);
                        let _ = redis::cmd(if n.is_multiple_of(2) { "GET" } else { "INCR" })
                            .arg(&key)
                            .query::<Value>(&mut con);
                        n += 1;
                    }
                }
            })
        })
        .collect();
    let restart_first = std::env::var("PAUSE_AFTER_RESTART").is_ok();
    if restart_first {
        // A long log, so that a restarted node is still replaying it when it is paused.
        for b in 0..100 {
            let l = c.wait_leader(Duration::from_secs(10));
            let Ok(mut con) = c.conn(l) else { continue };
            let mut p = redis::pipe();
            for i in 0..1000 {
                p.cmd("SET").arg(format!("fill{b}:{i}")).arg("x").ignore();
            }
            let _ = p.query::<()>(&mut con);
        }
    }
    let mut stale = Vec::new();
    let mut paused_nodes = std::collections::BTreeSet::new();
    for round in 0..rounds {
        let mut l = c.wait_leader(Duration::from_secs(10));
        let key = format!("pause{round}");
        set(&c, l, &key, "old");
        if restart_first {
            c.kill(l);
            c.spawn_node(l);
            // Pause it as soon as it leads again (it usually does: its log is complete).
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut leads = false;
            while !leads && Instant::now() < deadline {
                leads = c.info_field(l, "raft_role").as_deref() == Some("leader");
                if !leads {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            if !leads {
                l = c.wait_leader(Duration::from_secs(10));
            }
        }
        let mut probes: Vec<RawConn> = (0..4).map(|_| RawConn::open(c.nodes[l].def.port)).collect();
        c.signal(l, libc::SIGSTOP);
        let paused = Instant::now();
        paused_nodes.insert(l);
        let others: Vec<usize> = (0..3).filter(|&i| i != l).collect();
        // The new leader: the one of the others that says so and takes a write.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut written = false;
        while !written && Instant::now() < deadline {
            for &o in &others {
                if c.info_field(o, "raft_role").as_deref() == Some("leader") {
                    if let Ok(mut con) = c.conn(o) {
                        written = redis::cmd("SET")
                            .arg(&key)
                            .arg("new")
                            .query::<()>(&mut con)
                            .is_ok();
                    }
                }
            }
            if !written {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        assert!(written, "no new leader took the write within 10 s");
        for p in &mut probes {
            p.send(&["GET", &key]);
        }
        // Resume after 3..6 election timeouts, as the linearizability nemesis does.
        let frozen = Duration::from_millis(ELECTION_MS * (3 + (round as u64 % 4)));
        std::thread::sleep(frozen.saturating_sub(paused.elapsed()));
        c.signal(l, libc::SIGCONT);
        for p in &mut probes {
            let reply = p.read();
            if reply.contains("old") {
                stale.push(format!("round {round}: {reply:?}"));
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in load {
        let _ = t.join();
    }
    if !stale.is_empty() {
        c.dump_logs();
    }
    assert!(stale.is_empty(), "stale reads: {stale:?}");
    // Each resumed leader noticed its stall and asked its read rounds again.
    for i in paused_nodes {
        assert!(
            c.nodes[i].log().contains("the raft thread did not run for"),
            "node {i} was paused but did not notice"
        );
    }
}

/// A read-only script a node serves at once (lease and stale modes) that calls a write gets
/// Redis's own error, and writes nothing.
#[test]
fn a_write_from_a_read_only_script_served_at_once_gets_redis_error() {
    for mode in ["lease", "stale"] {
        let mut c = cluster_with(&["--raft.read-mode", mode]);
        let l = c.wait_leader(Duration::from_secs(10));
        let body = "return redis.call('SET', KEYS[1], 'v')";
        assert!(q(&c, l, &["SCRIPT", "LOAD", body]).is_ok(), "{mode}");
        let applied = info_num(&c, l, "raft_last_applied_index");
        let sha = redis::Script::new(body).get_hash().to_string();
        for args in [["EVAL_RO", body], ["EVALSHA_RO", &sha]] {
            let e = q(&c, l, &[args[0], args[1], "1", "k"]);
            assert!(
                matches!(&e, Err(e) if e.contains("Write commands are not allowed from read-only scripts")),
                "{mode} {}: {e:?}",
                args[0]
            );
        }
        assert_eq!(
            info_num(&c, l, "raft_last_applied_index"),
            applied,
            "{mode}"
        );
        assert_eq!(c.local(l, &["EXISTS", "k"]), Value::Int(0), "{mode}");
    }
}

/// A read a node would serve at once (lease and stale modes) is still queued inside MULTI,
/// and EXEC answers it, as on a single Redis.
#[test]
fn reads_served_at_once_are_queued_inside_multi() {
    for mode in ["lease", "stale"] {
        let mut c = cluster_with(&["--raft.read-mode", mode]);
        let l = c.wait_leader(Duration::from_secs(10));
        set(&c, l, "k", "v1");
        let mut r = RawConn::open(c.nodes[l].def.port);
        assert_eq!(r.cmd(&["MULTI"]), "+OK\r\n", "{mode}");
        assert_eq!(r.cmd(&["GET", "k"]), "+QUEUED\r\n", "{mode}");
        assert_eq!(r.cmd(&["SET", "k", "v2"]), "+QUEUED\r\n", "{mode}");
        assert_eq!(r.cmd(&["GET", "k"]), "+QUEUED\r\n", "{mode}");
        assert_eq!(
            r.cmd(&["EXEC"]),
            "*3\r\n$2\r\nv1\r\n+OK\r\n$2\r\nv2\r\n",
            "{mode}"
        );
        // Outside MULTI the read is served at once again.
        assert_eq!(r.cmd(&["GET", "k"]), "$2\r\nv2\r\n", "{mode}");
    }
}
