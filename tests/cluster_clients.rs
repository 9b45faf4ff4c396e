//! Cluster-aware clients: CLUSTER SLOTS/SHARDS/NODES and INFO's cluster_enabled:1 make them
//! send everything to the leader and follow a failover unchanged.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn cluster_commands_describe_the_leader_owning_every_slot() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    let f = (l + 1) % 3;
    let mut r = RawConn::open(c.nodes[f].def.port);
    let slots = r.cmd(&["CLUSTER", "SLOTS"]);
    let leader_port = c.nodes[l].def.port.to_string();
    assert!(
        slots.starts_with("*1\r\n*5\r\n:0\r\n:16383\r\n*3\r\n$9\r\n127.0.0.1\r\n"),
        "{slots}"
    );
    assert!(slots.contains(&format!(":{leader_port}\r\n")), "{slots}");
    assert!(r.cmd(&["CLUSTER", "SHARDS"]).contains("master"));
    let nodes = r.cmd(&["CLUSTER", "NODES"]);
    assert_eq!(nodes.matches("slave").count(), 2, "{nodes}");
    assert!(
        nodes.contains(&format!("127.0.0.1:{leader_port}@")),
        "{nodes}"
    );
    assert!(nodes.contains("myself,slave"), "{nodes}");
    assert!(r.cmd(&["CLUSTER", "INFO"]).contains("cluster_state:ok"));
    assert!(r.cmd(&["CLUSTER", "MYID"]).starts_with("$40\r\n"));
    assert_eq!(
        r.cmd(&["CLUSTER", "FORGET", "x"]),
        "-ERR Unknown subcommand.\r\n"
    );
    let info = r.cmd(&["INFO", "cluster"]);
    assert!(info.contains("cluster_enabled:1"), "{info}");
    // redis-cli -c follows -MOVED from a follower to the leader.
    let out = Command::new("redis-cli")
        .args([
            "-c",
            "-p",
            &c.nodes[f].def.port.to_string(),
            "SET",
            "viacli",
            "1",
        ])
        .output()
        .expect("redis-cli");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
    c.wait_applied_everywhere(Duration::from_secs(10));
    assert_eq!(
        c.local(f, &["GET", "viacli"]),
        Value::BulkString(b"1".to_vec())
    );
}

/// A Python with redis-py 5 (Debian's 4.3 cannot refresh its slot table when a seed node is
/// down): a venv in target/pyvenv, made on first use from PyPI. Needs python3-venv
/// (scripts/setup.sh installs it).
fn redis_py() -> std::path::PathBuf {
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pyvenv");
    let python = venv.join("bin/python");
    let ready = Command::new(&python)
        .args([
            "-c",
            "import redis, sys; sys.exit(int(redis.__version__.split('.')[0]) < 5)",
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !ready {
        let st = Command::new("/usr/bin/python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .status();
        assert!(
            st.is_ok_and(|s| s.success()),
            "python3 -m venv failed: apt install python3-venv (scripts/setup.sh)"
        );
        let st = Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "redis>=5,<6"])
            .status();
        assert!(st.is_ok_and(|s| s.success()), "pip install redis failed");
    }
    python
}

#[test]
fn redis_py_cluster_client_follows_a_leader_kill() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    let f = (l + 1) % 3;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/redis_py_cluster.py"
    );
    let mut py = Command::new(redis_py())
        .args([script, &c.nodes[f].def.port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run redis-py");
    let mut out = BufReader::new(py.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("read");
    assert_eq!(
        line.trim(),
        "READY",
        "redis-py did not get through its first writes"
    );
    c.kill(l);
    py.stdin
        .take()
        .expect("stdin")
        .write_all(b"GO\n")
        .expect("write");
    line.clear();
    out.read_line(&mut line).expect("read");
    let status = py.wait().expect("wait");
    let mut err = String::new();
    if let Some(mut e) = py.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    assert!(status.success(), "redis-py failed: {line} {err}");
    assert_eq!(line.trim(), "OK 200", "{err}");
    c.wait_applied_everywhere(Duration::from_secs(10));
    for i in (0..3).filter(|&i| i != l) {
        assert_eq!(c.local(i, &["DBSIZE"]), Value::Int(200), "node {i}");
    }
}
