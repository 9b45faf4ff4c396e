//! Clusters that change shape: RAFT.CLUSTER INIT/JOIN, RAFT.NODE ADD/REMOVE, learners,
//! removed nodes, cluster identity. Real redis-server processes throughout.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{err_text, wait_for, Cluster, RawConn, Value};

fn cmd(c: &Cluster, i: usize, args: &[&str]) -> Result<Value, String> {
    let mut conn = c.conn(i).map_err(|e| err_text(&e))?;
    let mut q = redis::cmd(args[0]);
    for a in &args[1..] {
        q.arg(*a);
    }
    q.query::<Value>(&mut conn).map_err(|e| err_text(&e))
}

fn status(v: Result<Value, String>) -> String {
    match v {
        Ok(Value::Okay) => "OK".into(),
        Ok(Value::SimpleString(s)) => s,
        Ok(other) => format!("{other:?}"),
        Err(e) => e,
    }
}

fn info(c: &Cluster, i: usize, field: &str) -> String {
    c.info_field(i, field).unwrap_or_default()
}

fn voters(c: &Cluster, i: usize) -> BTreeSet<String> {
    info(c, i, "raft_voters")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

fn node_id(c: &Cluster, i: usize) -> String {
    info(c, i, "raft_node_id")
}

/// Index of the node among `among` that says it leads and that the others follow.
fn leader_among(c: &Cluster, among: &[usize], timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let leaders: Vec<usize> = among
            .iter()
            .copied()
            .filter(|&i| info(c, i, "raft_role") == "leader")
            .collect();
        if let [l] = leaders[..] {
            let name = c.nodes[l].def.name.clone();
            if among
                .iter()
                .all(|&i| info(c, i, "raft_leader_name") == name)
            {
                return l;
            }
        }
        if Instant::now() > deadline {
            c.dump_logs();
            panic!("no agreed leader among {among:?} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes `SET <prefix>:<n> <n>` in a loop against whichever node leads, following -MOVED;
/// records the keys whose write was acknowledged.
fn writer(
    ports: Vec<u16>,
    prefix: String,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut port = ports[0];
        let mut n = 0u64;
        let mut conn: Option<redis::Connection> = None;
        while !stop.load(Ordering::Relaxed) {
            if conn.is_none() {
                conn = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
                    .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(1)))
                    .ok();
                if let Some(c) = &conn {
                    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                }
            }
            let Some(c) = conn.as_mut() else {
                port = ports[(n as usize) % ports.len()];
                n += 1;
                std::thread::sleep(Duration::from_millis(50));
                continue;
            };
            let key = format!("{prefix}:{n}");
            match redis::cmd("SET").arg(&key).arg(n).query::<String>(c) {
                Ok(_) => {
                    acked.lock().unwrap().push(key);
                    n += 1;
                }
                Err(e) => {
                    let t = err_text(&e);
                    if let Some(addr) = t.strip_prefix("MOVED 0 ") {
                        if let Some(p) = addr.rsplit(':').next().and_then(|p| p.parse().ok()) {
                            port = p;
                        }
                    } else {
                        // Not a leader any more, removed, or gone: try another node.
                        port = ports[(n as usize + 1) % ports.len()];
                        n += 1;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    conn = None;
                }
            }
        }
    })
}

#[test]
fn grow_from_one_to_five_and_shrink_to_three_while_clients_write() {
    grow_and_shrink_while_clients_write(&[]);
}

/// The same without fsync, where followers' main threads step their leader's appends
/// themselves (node/main_read.rs) and leave membership changes to the raft thread.
#[test]
fn grow_from_one_to_five_and_shrink_to_three_while_clients_write_without_fsync() {
    grow_and_shrink_while_clients_write(&["--raft.log-fsync", "no"]);
}

fn grow_and_shrink_while_clients_write(extra: &[&str]) {
    let mut c = Cluster::define(0);
    for _ in 0..5 {
        let i = c.add_dynamic_node();
        c.nodes[i].extra = extra.iter().map(|s| s.to_string()).collect();
        c.start_node(i);
    }
    assert_eq!(
        status(cmd(&c, 0, &["SET", "k", "v"])),
        "NOCLUSTER No Raft Cluster"
    );
    assert_eq!(info(&c, 0, "raft_state"), "uninitialized");
    let init = status(cmd(&c, 0, &["RAFT.CLUSTER", "INIT"]));
    let dbid = init
        .strip_prefix("OK ")
        .expect("INIT replies OK <dbid>")
        .to_string();
    assert_eq!(dbid.len(), 32, "{init}");
    leader_among(&c, &[0], Duration::from_secs(10));
    assert_eq!(info(&c, 0, "raft_dbid"), dbid);

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let ports: Vec<u16> = c.nodes.iter().map(|n| n.def.port).collect();
    let writers: Vec<_> = (0..10)
        .map(|t| writer(ports.clone(), format!("w{t}"), stop.clone(), acked.clone()))
        .collect();

    // Each node joins through the previous one, which may be a follower (-MOVED followed).
    for i in 1..5 {
        let via = c.addr(i - 1);
        assert_eq!(status(cmd(&c, i, &["RAFT.CLUSTER", "JOIN", &via])), "OK");
        assert_eq!(info(&c, i, "raft_dbid"), dbid);
    }
    let all: Vec<usize> = (0..5).collect();
    wait_for("five voters, no learners", Duration::from_secs(30), || {
        let l = leader_among(&c, &all, Duration::from_secs(10));
        voters(&c, l).len() == 5 && info(&c, l, "raft_learners").is_empty()
    });
    let ids: Vec<String> = (0..5).map(|i| node_id(&c, i)).collect();

    // Shrink: a follower, then the leader itself.
    let l = leader_among(&c, &all, Duration::from_secs(10));
    let follower = (0..5).find(|&i| i != l).unwrap();
    assert_eq!(
        status(cmd(&c, l, &["RAFT.NODE", "REMOVE", &ids[follower]])),
        "OK"
    );
    assert_eq!(status(cmd(&c, l, &["RAFT.NODE", "REMOVE", &ids[l]])), "OK");
    let rest: Vec<usize> = (0..5).filter(|&i| i != l && i != follower).collect();
    let new_leader = leader_among(&c, &rest, Duration::from_secs(15));
    wait_for("three voters", Duration::from_secs(15), || {
        voters(&c, new_leader).len() == 3
    });
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }

    // Removed nodes stop serving cluster commands and say why.
    for gone in [l, follower] {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let state = info(&c, gone, "raft_state");
            if state == "removed" {
                break;
            }
            if Instant::now() > deadline {
                c.dump_logs();
                panic!("node {gone} is '{state}', not 'removed'");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let e = status(cmd(&c, gone, &["SET", "k", "v"]));
        assert!(e.starts_with("NOCLUSTER this node was removed"), "{e}");
    }

    // Nothing acknowledged is lost, and the three nodes hold the same data.
    let commit: u64 = info(&c, new_leader, "raft_commit_index").parse().unwrap();
    wait_for("apply everywhere", Duration::from_secs(20), || {
        rest.iter().all(|&i| {
            info(&c, i, "raft_last_applied_index")
                .parse::<u64>()
                .is_ok_and(|a| a >= commit)
        })
    });
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 100,
        "writers made little progress: {}",
        acked.len()
    );
    let sizes: Vec<Value> = rest.iter().map(|&i| c.local(i, &["DBSIZE"])).collect();
    assert!(sizes.windows(2).all(|w| w[0] == w[1]), "{sizes:?}");
    for &i in &rest {
        let mut conn = c.conn(i).unwrap();
        let mut pipe = redis::pipe();
        for k in &acked {
            pipe.cmd("RAFT.DEBUG").arg("EXEC").arg("EXISTS").arg(k);
        }
        let found: Vec<i64> = pipe.query(&mut conn).unwrap();
        let missing = found.iter().filter(|&&f| f != 1).count();
        assert_eq!(missing, 0, "node {i} lacks {missing} acknowledged keys");
    }
}

#[test]
fn a_second_membership_change_while_one_is_in_flight_is_refused() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(15));
    let followers: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    // With both followers paused the first change cannot commit.
    for &f in &followers {
        c.signal(f, libc::SIGSTOP);
    }
    let mut first = RawConn::open(c.nodes[l].def.port);
    first.send(&["RAFT.NODE", "ADD", "0", "127.0.0.1:1@2", "extra1"]);
    std::thread::sleep(Duration::from_millis(50));
    let second = status(cmd(
        &c,
        l,
        &["RAFT.NODE", "ADD", "0", "127.0.0.1:3@4", "extra2"],
    ));
    for &f in &followers {
        c.signal(f, libc::SIGCONT);
    }
    assert!(
        second.starts_with("ERR one voting change only"),
        "second change: {second}"
    );
    let _ = first.read();
}

#[test]
fn join_waits_while_the_cluster_has_no_leader() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(15));
    assert_eq!(status(cmd(&c, l, &["SET", "before", "1"])), "OK");
    let others: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    for &o in &others {
        c.kill(o);
    }
    let j = c.add_dynamic_node();
    c.start_node(j);
    let port = c.nodes[j].def.port;
    let via = c.addr(l);
    let joiner = std::thread::spawn(move || {
        let mut conn = RawConn::open(port);
        conn.cmd(&["RAFT.CLUSTER", "JOIN", &via])
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(info(&c, j, "raft_state"), "joining");
    for &o in &others {
        c.start_node(o);
    }
    assert_eq!(joiner.join().unwrap(), "+OK\r\n");
    let all: Vec<usize> = (0..4).collect();
    wait_for("four voters", Duration::from_secs(30), || {
        let l = leader_among(&c, &all, Duration::from_secs(10));
        voters(&c, l).len() == 4
    });
    wait_for(
        "the joined node to hold the data",
        Duration::from_secs(10),
        || c.local(j, &["GET", "before"]) == Value::BulkString(b"1".to_vec()),
    );
}

#[test]
fn refusals_say_what_is_wrong() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(15));
    // A member cannot join or found another cluster.
    assert_eq!(
        status(cmd(&c, l, &["RAFT.CLUSTER", "JOIN", "127.0.0.1:1"])),
        "ERR Already cluster member"
    );
    assert_eq!(
        status(cmd(&c, l, &["RAFT.CLUSTER", "INIT"])),
        "ERR Already cluster member"
    );
    assert_eq!(
        status(cmd(&c, l, &["RAFT.CLUSTER", "FOO"])),
        "ERR RAFT.CLUSTER supports INIT / JOIN only"
    );
    assert_eq!(
        status(cmd(&c, l, &["RAFT.NODE", "REMOVE", "12345"])),
        "ERR node id does not exist"
    );
    assert_eq!(
        status(cmd(&c, l, &["RAFT.NODE", "ADD", "x", "127.0.0.1:1"])),
        "ERR invalid node id"
    );
    assert_eq!(
        status(cmd(&c, l, &["RAFT.NODE", "ADD", "7", "nohostport"])),
        "ERR invalid node address"
    );
    assert_eq!(
        status(cmd(&c, l, &["RAFT.NODE", "FOO"])),
        "ERR RAFT.NODE supports ADD / REMOVE only"
    );
    let f = (0..3).find(|&i| i != l).unwrap();
    let moved = status(cmd(&c, f, &["RAFT.NODE", "REMOVE", "12345"]));
    assert_eq!(moved, format!("MOVED 0 {}", c.addr(l)));
    // An id in use (a current member's) cannot be added again.
    let used = node_id(&c, f);
    assert_eq!(
        status(cmd(&c, l, &["RAFT.NODE", "ADD", &used, "127.0.0.1:5@6"])),
        "ERR node id has already been used in this cluster"
    );
    // A fresh node: bad JOIN arguments.
    let j = c.add_dynamic_node();
    c.start_node(j);
    assert_eq!(
        status(cmd(&c, j, &["RAFT.CLUSTER", "JOIN", "nonsense"])),
        "ERR invalid node address"
    );
    assert_eq!(
        status(cmd(&c, j, &["RAFT.CLUSTER", "INIT", "short"])),
        "ERR cluster id must be 32 characters (letters and digits)"
    );
    assert_eq!(info(&c, j, "raft_state"), "uninitialized");
}

#[test]
fn a_removed_node_cannot_rejoin_with_its_old_id_and_stays_out_after_restart() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(15));
    let j = c.add_dynamic_node();
    c.start_node(j);
    assert_eq!(
        status(cmd(&c, j, &["RAFT.CLUSTER", "JOIN", &c.addr(l)])),
        "OK"
    );
    let id = node_id(&c, j);
    wait_for(
        "the new node to be a voter",
        Duration::from_secs(20),
        || voters(&c, l).contains(&id),
    );
    let l = leader_among(&c, &[0, 1, 2, j], Duration::from_secs(10));
    assert_eq!(status(cmd(&c, l, &["RAFT.NODE", "REMOVE", &id])), "OK");
    wait_for("removed", Duration::from_secs(10), || {
        info(&c, j, "raft_state") == "removed"
    });
    // Restarted, it still knows it was removed.
    c.kill(j);
    c.start_node(j);
    assert_eq!(info(&c, j, "raft_state"), "removed");
    assert!(c.nodes[j]
        .log()
        .contains("was removed from its raft cluster"));
    // Its log moved aside, the same name (so the same id) is refused by the cluster.
    c.kill(j);
    let log = c.nodes[j].def.dir.join("redisraft.db");
    std::fs::rename(&log, log.with_extension("old")).unwrap();
    c.start_node(j);
    let e = status(cmd(&c, j, &["RAFT.CLUSTER", "JOIN", &c.addr(l)]));
    assert!(
        e.ends_with("refused the join: node id has already been used in this cluster"),
        "{e}"
    );
}

#[test]
fn a_config_file_cluster_grows_by_command_and_restarts_follow_the_log() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(15));
    assert_eq!(status(cmd(&c, l, &["SET", "a", "1"])), "OK");
    let j = c.add_dynamic_node();
    c.start_node(j);
    let f = (0..3).find(|&i| i != l).unwrap();
    assert_eq!(
        status(cmd(&c, j, &["RAFT.CLUSTER", "JOIN", &c.addr(f)])),
        "OK"
    );
    let all: Vec<usize> = (0..4).collect();
    wait_for("four voters", Duration::from_secs(20), || {
        let l = leader_among(&c, &all, Duration::from_secs(10));
        voters(&c, l).len() == 4
    });
    // Every node restarts: the config-file nodes with their old raft.cluster-nodes (three
    // names), the joined node with none. All follow the log's four members.
    for i in 0..4 {
        c.kill(i);
    }
    for i in 0..4 {
        c.start_node(i);
    }
    let l = leader_among(&c, &all, Duration::from_secs(20));
    assert_eq!(voters(&c, l).len(), 4);
    assert!(c.nodes[0]
        .log()
        .contains("but the log's committed membership is"));
    assert_eq!(status(cmd(&c, l, &["SET", "b", "2"])), "OK");
    wait_for("b everywhere", Duration::from_secs(10), || {
        (0..4).all(|i| c.local(i, &["GET", "b"]) == Value::BulkString(b"2".to_vec()))
    });
    assert_eq!(c.local(j, &["GET", "a"]), Value::BulkString(b"1".to_vec()));
}

#[test]
fn a_node_of_another_cluster_is_refused_on_the_bus_with_a_clear_error_on_both_sides() {
    let mut c = Cluster::start(3);
    c.wait_leader(Duration::from_secs(15));
    // A node whose raft.cluster-nodes names node n2's bus but another cluster (other names).
    let x = c.add_dynamic_node();
    let n2 = &c.nodes[1].def;
    let xdef = &c.nodes[x].def;
    let nodes = format!(
        "x1=127.0.0.1:{}@{},n2=127.0.0.1:{}@{}",
        xdef.port, xdef.bus_port, n2.port, n2.bus_port
    );
    c.nodes[x].def.name = "x1".into();
    c.nodes[x].extra = vec!["--raft.cluster-nodes".into(), nodes];
    c.start_node(x);
    wait_for("both logs to say why", Duration::from_secs(10), || {
        c.nodes[1].log().contains("wrong cluster id")
            && c.nodes[x].log().contains("refused us: wrong cluster id")
    });
    assert_ne!(info(&c, x, "raft_role"), "leader");
}

#[test]
fn join_gives_up_after_the_join_timeout_with_the_last_error() {
    let mut c = Cluster::define(0);
    let j = c.add_dynamic_node();
    c.nodes[j].extra = vec!["--raft.join-timeout".into(), "1000".into()];
    c.start_node(j);
    let nobody = format!("127.0.0.1:{}", common::free_port());
    let started = Instant::now();
    let e = status(cmd(&c, j, &["RAFT.CLUSTER", "JOIN", &nobody]));
    assert!(
        e.starts_with(
            "ERR failed to connect to cluster for join: gave up after raft.join-timeout (1000 ms); last error: "
        ) && e.contains(&nobody),
        "{e}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(info(&c, j, "raft_state"), "uninitialized");
    // It can still found a cluster of its own afterwards.
    assert!(status(cmd(&c, j, &["RAFT.CLUSTER", "INIT"])).starts_with("OK "));
}

#[test]
fn init_answers_once_the_node_accepts_writes() {
    let mut c = Cluster::define(0);
    let j = c.add_dynamic_node();
    c.start_node(j);
    // One connection, no pause, no retry: a script written for RedisRaft.
    let mut conn = RawConn::open(c.nodes[j].def.port);
    let init = conn.cmd(&["RAFT.CLUSTER", "INIT"]);
    assert!(
        init.starts_with("+OK ") && init.len() == "+OK \r\n".len() + 32,
        "{init}"
    );
    assert_eq!(conn.cmd(&["SET", "k", "v"]), "+OK\r\n");
    assert_eq!(conn.cmd(&["GET", "k"]), "$1\r\nv\r\n");
    assert_eq!(info(&c, j, "raft_role"), "leader");
}

#[test]
fn join_authenticates_to_nodes_that_run_with_requirepass() {
    let mut c = Cluster::define(0);
    for _ in 0..2 {
        let i = c.add_dynamic_node();
        c.nodes[i].extra = [
            "--requirepass",
            "secret",
            "--raft.cluster-password",
            "secret",
        ]
        .map(String::from)
        .to_vec();
        c.nodes[i].password = Some("secret".into());
        c.start_node(i);
    }
    assert!(status(cmd(&c, 0, &["RAFT.CLUSTER", "INIT"])).starts_with("OK "));
    assert_eq!(
        status(cmd(&c, 1, &["RAFT.CLUSTER", "JOIN", &c.addr(0)])),
        "OK"
    );
    assert_eq!(status(cmd(&c, 0, &["SET", "k", "v"])), "OK");
    wait_for("k on the joined node", Duration::from_secs(10), || {
        c.local(1, &["GET", "k"]) == Value::BulkString(b"v".to_vec())
    });
    wait_for("two voters", Duration::from_secs(20), || {
        voters(&c, 0).len() == 2
    });
}

#[test]
fn join_as_raft_cluster_user_with_its_password() {
    let mut c = Cluster::define(0);
    for _ in 0..2 {
        let i = c.add_dynamic_node();
        // The default user is off: only raftuser may run anything.
        c.nodes[i].extra = [
            "--user",
            "default",
            "off",
            "--user",
            "raftuser",
            "on",
            ">pw",
            "~*",
            "&*",
            "+@all",
            "--raft.cluster-user",
            "raftuser",
            "--raft.cluster-password",
            "pw",
        ]
        .map(String::from)
        .to_vec();
        c.nodes[i].user = Some("raftuser".into());
        c.nodes[i].password = Some("pw".into());
        c.start_node(i);
    }
    assert_eq!(
        cmd(&c, 0, &["CONFIG", "GET", "raft.cluster-user"]),
        Ok(Value::Array(vec![
            Value::BulkString(b"raft.cluster-user".to_vec()),
            Value::BulkString(b"raftuser".to_vec()),
        ]))
    );
    assert!(status(cmd(&c, 0, &["RAFT.CLUSTER", "INIT"])).starts_with("OK "));
    assert_eq!(
        status(cmd(&c, 1, &["RAFT.CLUSTER", "JOIN", &c.addr(0)])),
        "OK"
    );
    assert_eq!(status(cmd(&c, 0, &["SET", "k", "v"])), "OK");
    wait_for("k on the joined node", Duration::from_secs(10), || {
        c.local(1, &["GET", "k"]) == Value::BulkString(b"v".to_vec())
    });
}

#[test]
fn join_without_the_password_says_so() {
    let mut c = Cluster::define(0);
    let a = c.add_dynamic_node();
    c.nodes[a].extra = ["--requirepass", "secret"].map(String::from).to_vec();
    c.nodes[a].password = Some("secret".into());
    c.start_node(a);
    assert!(status(cmd(&c, a, &["RAFT.CLUSTER", "INIT"])).starts_with("OK "));
    let b = c.add_dynamic_node();
    c.start_node(b);
    let e = status(cmd(&c, b, &["RAFT.CLUSTER", "JOIN", &c.addr(a)]));
    assert_eq!(
        e,
        format!(
            "ERR {} refused the join: NOAUTH Authentication required. (set raft.cluster-user and raft.cluster-password to an account of the cluster's nodes)",
            c.addr(a)
        )
    );
    assert_eq!(info(&c, b, "raft_state"), "uninitialized");
}

#[test]
fn a_failed_join_leaves_nothing_behind_and_a_retry_succeeds() {
    let mut c = Cluster::define(0);
    let a = c.add_dynamic_node();
    c.start_node(a);
    assert!(status(cmd(&c, a, &["RAFT.CLUSTER", "INIT"])).starts_with("OK "));
    let j = c.add_dynamic_node();
    c.nodes[j].extra = vec!["--raft.join-timeout".into(), "1000".into()];
    c.start_node(j);
    let log = c.nodes[j].def.dir.join("redisraft.db");

    // Nobody there: RedisRaft's wording, then ours.
    let nobody = format!("127.0.0.1:{}", common::free_port());
    let e = status(cmd(&c, j, &["RAFT.CLUSTER", "JOIN", &nobody]));
    assert!(
        e.starts_with("ERR failed to connect to cluster for join: gave up after raft.join-timeout (1000 ms); last error: ")
            && e.contains(&nobody),
        "{e}"
    );
    assert_eq!(info(&c, j, "raft_state"), "uninitialized");
    assert!(!log.exists(), "a failed JOIN left {} behind", log.display());

    // The cluster adds it, but its bus port is taken: the node cannot start.
    let taken = std::net::TcpListener::bind(("127.0.0.1", c.nodes[j].def.bus_port))
        .expect("take the bus port");
    let e = status(cmd(&c, j, &["RAFT.CLUSTER", "JOIN", &c.addr(a)]));
    assert!(e.starts_with("ERR "), "{e}");
    assert!(e.contains("Address already in use"), "{e}");
    assert_eq!(info(&c, j, "raft_state"), "uninitialized");
    assert!(!log.exists(), "a failed JOIN left {} behind", log.display());
    drop(taken);

    // The retry succeeds (the cluster had committed the first add: it is not added twice).
    assert_eq!(
        status(cmd(&c, j, &["RAFT.CLUSTER", "JOIN", &c.addr(a)])),
        "OK"
    );
    assert_eq!(info(&c, j, "raft_state"), "up");
    assert_eq!(status(cmd(&c, a, &["SET", "k", "v"])), "OK");
    wait_for("k on the joined node", Duration::from_secs(10), || {
        c.local(j, &["GET", "k"]) == Value::BulkString(b"v".to_vec())
    });
    // A JOIN retried after it succeeded (its reply lost) answers OK again; JOIN elsewhere
    // does not.
    assert_eq!(
        status(cmd(&c, j, &["RAFT.CLUSTER", "JOIN", &c.addr(a)])),
        "OK"
    );
    assert_eq!(
        status(cmd(&c, j, &["RAFT.CLUSTER", "JOIN", &nobody])),
        "ERR Already cluster member"
    );
    wait_for("two voters", Duration::from_secs(20), || {
        voters(&c, a).len() == 2
    });
}
