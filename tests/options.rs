//! `raft.*` options: loading from redis.conf, refusing bad values with a message that names
//! the option, and CONFIG GET/SET.

mod common;

use std::time::Duration;

use common::*;

fn refused(args: &[&str], expected: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = start_expecting_failure(dir.path(), args);
    assert!(
        out.contains(expected),
        "expected '{expected}' for {args:?}, got:\n{out}"
    );
}

#[test]
fn bad_option_values_stop_redis_with_a_message_naming_the_option() {
    refused(
        &[
            "--raft.node-id",
            "x",
            "--raft.cluster-nodes",
            "a=127.0.0.1:1,b=127.0.0.1:2",
        ],
        "raft.node-id: 'x' is not in raft.cluster-nodes (its names are: a, b)",
    );
    refused(
        &["--raft.node-id", "a", "--raft.cluster-nodes", "a=127.0.0.1"],
        "raft.cluster-nodes: malformed entry",
    );
    refused(
        &[
            "--raft.node-id",
            "a",
            "--raft.cluster-nodes",
            "a=127.0.0.1:1,a=127.0.0.1:2",
        ],
        "raft.cluster-nodes: duplicate node name 'a'",
    );
    refused(
        &[
            "--raft.node-id",
            "a",
            "--raft.cluster-nodes",
            "a=127.0.0.1:1,b=127.0.0.1:1",
        ],
        "share an address",
    );
    refused(
        &[
            "--raft.heartbeat-interval",
            "1000",
            "--raft.election-timeout",
            "1000",
        ],
        "raft.heartbeat-interval: 1000 ms must be below raft.election-timeout (1000 ms)",
    );
    refused(&["--raft.election-timeout", "0"], "raft.election-timeout");
    refused(
        &["--raft.heartbeat-interval", "-5"],
        "raft.heartbeat-interval",
    );
    refused(&["--raft.addr", "nope"], "raft.addr");
}

#[test]
fn options_load_from_redis_conf_with_loadmodule() {
    let c = Cluster::define(3);
    // Node 1 from a config file with loadmodule; the others from the command line.
    let d = &c.nodes[0].def;
    let conf = format!(
        "port {}\nbind 127.0.0.1\ndir {}\nsave \"\"\nappendonly no\nlogfile redis.log\nloadmodule {}\n\
         raft.node-id {}\nraft.cluster-nodes \"{}\"\nraft.election-timeout 500\nraft.heartbeat-interval 50\n\
         raft.log-filename custom.db\nraft.log-fsync no\n",
        d.port,
        d.dir.display(),
        module_path().display(),
        d.name,
        c.cluster_nodes
    );
    let conf_path = d.dir.join("redis.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let mut c = c;
    let child = std::process::Command::new(redis_server())
        .arg(&conf_path)
        .current_dir(&c.nodes[0].def.dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    c.nodes[0].child = Some(child);
    c.start_node(1);
    c.start_node(2);
    let l = c.wait_leader(Duration::from_secs(10));
    let mut con = c.conn(l).unwrap();
    let _: () = redis::cmd("SET").arg("k").arg("v").query(&mut con).unwrap();
    c.wait_applied_everywhere(Duration::from_secs(10));
    assert_eq!(c.local(0, &["GET", "k"]), Value::BulkString(b"v".to_vec()));
    assert!(c.nodes[0].def.dir.join("custom.db").exists());
    let mut c0 = c.conn(0).unwrap();
    let v: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("raft.log-fsync")
        .query(&mut c0)
        .unwrap();
    assert_eq!(v, vec!["raft.log-fsync", "no"]);
    let v: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("raft.node-id")
        .query(&mut c0)
        .unwrap();
    assert_eq!(
        v,
        vec!["raft.node-id".to_string(), c.nodes[0].def.name.clone()]
    );
    assert_eq!(
        c.info_field(0, "raft_log_filename").as_deref(),
        Some("custom.db")
    );
}

#[test]
fn config_set_changes_safe_options_and_refuses_the_rest() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    let mut con = c.conn(l).unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("raft.log-fsync")
        .arg("no")
        .query(&mut con)
        .unwrap();
    assert_eq!(c.info_field(l, "raft_log_fsync").as_deref(), Some("no"));
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("raft.loglevel")
        .arg("verbose")
        .query(&mut con)
        .unwrap();
    let v: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("raft.loglevel")
        .query(&mut con)
        .unwrap();
    assert_eq!(v, vec!["raft.loglevel", "verbose"]);
    let e = redis::cmd("CONFIG")
        .arg("SET")
        .arg("raft.node-id")
        .arg("other")
        .query::<()>(&mut con)
        .unwrap_err();
    assert!(e.to_string().contains("raft.node-id"), "{e}");
    let e = redis::cmd("CONFIG")
        .arg("SET")
        .arg("raft.loglevel")
        .arg("loud")
        .query::<()>(&mut con)
        .unwrap_err();
    assert!(e.to_string().contains("raft.loglevel"), "{e}");
    // Writes still work after the changes.
    let _: () = redis::cmd("SET").arg("k").arg("v").query(&mut con).unwrap();
}

#[test]
fn node_without_cluster_nodes_refuses_writes_with_nocluster() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = std::process::Command::new(redis_server())
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
        ])
        .arg(dir.path())
        .arg("--loadmodule")
        .arg(module_path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut con = loop {
        if let Ok(c) = client.get_connection() {
            break c;
        }
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    };
    let e = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query::<()>(&mut con)
        .unwrap_err();
    assert_eq!(err_text(&e), "NOCLUSTER No Raft Cluster");
    let info: String = redis::cmd("INFO").arg("raft").query(&mut con).unwrap();
    assert!(info.contains("raft_state:uninitialized"), "{info}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn raft_addr_is_what_followers_send_clients_to() {
    let mut c = Cluster::define(3);
    for i in 0..3 {
        c.nodes[i].extra = vec![
            "--raft.addr".into(),
            format!("public-n{}.example:{}", i + 1, 6380 + i),
        ];
    }
    for i in 0..3 {
        c.start_node(i);
    }
    let l = c.wait_leader(Duration::from_secs(10));
    let f = (l + 1) % 3;
    let expected = format!("MOVED 0 public-n{}.example:{}", l + 1, 6380 + l);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut con = c.conn(f).unwrap();
        let e = redis::cmd("SET")
            .arg("k")
            .arg("v")
            .query::<()>(&mut con)
            .unwrap_err();
        if err_text(&e) == expected {
            break;
        }
        // The leader replicates its address right after it is elected.
        assert!(std::time::Instant::now() < deadline, "got {}", err_text(&e));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        c.info_field(f, "raft_leader_addr"),
        Some(format!("public-n{}.example:{}", l + 1, 6380 + l))
    );
}

/// A node behind a port mapping: its entry announces one bus port, it listens on another,
/// and a forwarder (standing in for NAT or a proxy) joins the two.
#[test]
fn raft_bus_port_listens_where_the_entry_does_not_say() {
    let mut c = Cluster::define(3);
    let announced = c.nodes[2].def.bus_port;
    let actual = free_port();
    c.nodes[2].extra = vec!["--raft.bus-port".into(), actual.to_string()];
    let listener = std::net::TcpListener::bind(("127.0.0.1", announced)).unwrap();
    std::thread::spawn(move || {
        for inbound in listener.incoming().flatten() {
            let Ok(outbound) = std::net::TcpStream::connect(("127.0.0.1", actual)) else {
                continue;
            };
            let (mut a, mut b) = (inbound.try_clone().unwrap(), outbound.try_clone().unwrap());
            let (mut a2, mut b2) = (inbound, outbound);
            std::thread::spawn(move || std::io::copy(&mut a, &mut b2));
            std::thread::spawn(move || std::io::copy(&mut b, &mut a2));
        }
    });
    for i in 0..3 {
        c.start_node(i);
    }
    let l = c.wait_leader(Duration::from_secs(10));
    let mut con = c.conn(l).unwrap();
    let _: () = redis::cmd("SET").arg("k").arg("v").query(&mut con).unwrap();
    c.wait_applied_everywhere(Duration::from_secs(10));
    assert_eq!(c.local(2, &["GET", "k"]), Value::BulkString(b"v".to_vec()));
    let v: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("raft.bus-port")
        .query(&mut c.conn(2).unwrap())
        .unwrap();
    assert_eq!(v, vec!["raft.bus-port".to_string(), actual.to_string()]);
}

fn with_password(c: &mut Cluster, i: usize, password: &str) {
    c.nodes[i].extra = vec!["--raft.cluster-password".into(), password.into()];
}

#[test]
fn cluster_with_the_same_password_elects_and_replicates() {
    let mut c = Cluster::define(3);
    for i in 0..3 {
        with_password(&mut c, i, "bus-s3cret");
    }
    for i in 0..3 {
        c.start_node(i);
    }
    let l = c.wait_leader(Duration::from_secs(15));
    let mut con = c.conn(l).unwrap();
    let _: () = redis::cmd("SET").arg("k").arg("v").query(&mut con).unwrap();
    c.wait_applied_everywhere(Duration::from_secs(10));
    for i in 0..3 {
        assert_eq!(c.local(i, &["GET", "k"]), Value::BulkString(b"v".to_vec()));
        assert!(
            !c.nodes[i].log().contains("raft.cluster-password"),
            "node {i} logged a password problem"
        );
    }
    // Redis 7 marks the option sensitive (kept out of its logs, SLOWLOG and MONITOR), but
    // CONFIG GET still shows it to a client allowed to run CONFIG, as it does `requirepass`.
    let v: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("raft.cluster-password")
        .query(&mut con)
        .unwrap();
    assert_eq!(v, vec!["raft.cluster-password", "bus-s3cret"]);
    let e = redis::cmd("CONFIG")
        .arg("SET")
        .arg("raft.cluster-password")
        .arg("other")
        .query::<()>(&mut con)
        .unwrap_err();
    assert!(err_text(&e).contains("raft.cluster-password"), "{e}");
}

#[test]
fn node_with_another_password_is_kept_out_of_the_cluster() {
    let mut c = Cluster::define(3);
    with_password(&mut c, 0, "bus-s3cret");
    with_password(&mut c, 1, "bus-s3cret");
    with_password(&mut c, 2, "not-the-password");
    for i in 0..3 {
        c.start_node(i);
    }
    // The two that agree elect one of themselves; the odd one hears from nobody.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let l = loop {
        let roles: Vec<Option<String>> = (0..3).map(|i| c.info_field(i, "raft_role")).collect();
        assert_ne!(
            roles[2].as_deref(),
            Some("leader"),
            "the odd node became leader"
        );
        let leader = (0..2).find(|&i| roles[i].as_deref() == Some("leader"));
        if let Some(l) = leader {
            let name = Some(c.nodes[l].def.name.clone());
            if (0..2).all(|i| c.info_field(i, "raft_leader_name") == name) {
                let mut con = c.conn(l).unwrap();
                if redis::cmd("SET")
                    .arg("k")
                    .arg("v")
                    .query::<()>(&mut con)
                    .is_ok()
                {
                    break l;
                }
            }
        }
        if std::time::Instant::now() > deadline {
            c.dump_logs();
            panic!("no leader among the two nodes sharing a password");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    for i in 0..2 {
        // A follower learns the commit index with the leader's next append (within ms).
        wait_for("the write applied on both", Duration::from_secs(5), || {
            c.local(i, &["GET", "k"]) == Value::BulkString(b"v".to_vec())
        });
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(c.local(2, &["GET", "k"]), Value::Nil);
    assert_ne!(c.info_field(2, "raft_role").as_deref(), Some("leader"));
    assert_eq!(c.info_field(l, "raft_role").as_deref(), Some("leader"));

    let odd = format!("127.0.0.1:{}", c.nodes[2].def.bus_port);
    let leader_log = c.nodes[l].log();
    assert!(
        leader_log.contains(&format!(
            "at {odd} refused us: wrong or missing raft.cluster-password"
        )),
        "leader's log:\n{leader_log}"
    );
    assert!(
        leader_log.contains("refusing connection from node ")
            && leader_log.contains(": wrong or missing raft.cluster-password"),
        "leader's log:\n{leader_log}"
    );
    let odd_log = c.nodes[2].log();
    assert!(
        odd_log.contains("refused us: wrong or missing raft.cluster-password"),
        "odd node's log:\n{odd_log}"
    );
    // The password itself is never logged.
    for i in 0..3 {
        let log = c.nodes[i].log();
        assert!(
            !log.contains("bus-s3cret") && !log.contains("not-the-password"),
            "node {i} logged a password"
        );
    }
}

#[test]
fn the_module_refuses_to_load_into_redis_cluster_and_says_why() {
    // Redis binds its cluster bus (port + 10000) before it loads modules: a port there that
    // another connection holds for the moment makes it exit first; try another port then.
    let mut log = String::new();
    for _ in 0..5 {
        let tmp = tempfile::tempdir().expect("tempdir");
        log = start_expecting_failure(
            tmp.path(),
            &["--cluster-enabled", "yes", "--raft.node-id", "n1"],
        );
        if !log.contains("(cluster), aborting") {
            break;
        }
    }
    assert!(
        log.contains("redis-raft cannot start: cluster-enabled is yes"),
        "{log}"
    );
}

#[test]
fn raft_cluster_user_defaults_to_default_and_changes_at_runtime() {
    let mut c = Cluster::define(0);
    let i = c.add_dynamic_node();
    c.start_node(i);
    assert_eq!(
        q(&c, i, &["CONFIG", "GET", "raft.cluster-user"]),
        Ok(Value::Array(vec![
            Value::BulkString(b"raft.cluster-user".to_vec()),
            Value::BulkString(b"default".to_vec()),
        ]))
    );
    assert_eq!(
        q(&c, i, &["CONFIG", "SET", "raft.cluster-user", "raftuser"]),
        Ok(Value::Okay)
    );
    assert_eq!(
        q(&c, i, &["CONFIG", "GET", "raft.cluster-user"]),
        Ok(Value::Array(vec![
            Value::BulkString(b"raft.cluster-user".to_vec()),
            Value::BulkString(b"raftuser".to_vec()),
        ]))
    );
    assert_eq!(
        q(&c, i, &["CONFIG", "SET", "raft.cluster-user", ""]),
        Err("ERR CONFIG SET failed (possibly related to argument 'raft.cluster-user') - raft.cluster-user: must be an ACL user name (not empty, no spaces)".into())
    );
    refused(
        &["--raft.cluster-user", "a b"],
        "raft.cluster-user: must be an ACL user name (not empty, no spaces)",
    );
}
