//! The log on disk after crashes: torn tails are dropped, corruption stops the node with a
//! message naming the file and offset, and a bad frame on the bus harms nothing else.

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;

fn write_keys(c: &mut Cluster, n: usize, prefix: &str) -> Vec<String> {
    let l = c.wait_leader(Duration::from_secs(10));
    let mut con = c.conn(l).unwrap();
    let mut keys = Vec::new();
    for i in 0..n {
        let k = format!("{prefix}{i}");
        let _: () = redis::cmd("SET").arg(&k).arg(&k).query(&mut con).unwrap();
        keys.push(k);
    }
    keys
}

fn assert_keys(c: &Cluster, i: usize, keys: &[String]) {
    for k in keys {
        assert_eq!(
            c.local(i, &["GET", k]),
            Value::BulkString(k.clone().into_bytes()),
            "node {i} key {k}"
        );
    }
}

#[test]
fn torn_log_tail_is_dropped_and_the_node_catches_up() {
    let mut c = Cluster::start(3);
    let keys = write_keys(&mut c, 50, "a");
    c.wait_applied_everywhere(Duration::from_secs(10));
    let l = c.wait_leader(Duration::from_secs(10));
    let f = (l + 1) % 3;
    // Where the records end (the file may hold preallocated zeros after them).
    let len = info_num(&c, f, "raft_file_size");
    c.kill(f);
    let path = c.log_file(f);
    // Cut the last record short, as a crash in the middle of a write would.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    let more = write_keys(&mut c, 20, "b");
    c.start_node(f);
    c.wait_applied_everywhere(Duration::from_secs(15));
    assert_keys(&c, f, &keys);
    assert_keys(&c, f, &more);
    let log = c.nodes[f].log();
    assert!(
        log.contains("torn tail"),
        "no torn-tail line in log:\n{log}"
    );
    // Garbage after the last record (a partial header, over the preallocated zeros) is
    // dropped the same way.
    let len = info_num(&c, f, "raft_file_size");
    c.kill(f);
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new().write(true).open(&path).unwrap(),
        &[7, 0, 0],
        len,
    )
    .unwrap();
    c.start_node(f);
    c.wait_applied_everywhere(Duration::from_secs(15));
    assert_keys(&c, f, &keys);
}

#[test]
fn corrupted_record_stops_the_node_with_file_and_offset() {
    let mut c = Cluster::start(3);
    let keys = write_keys(&mut c, 50, "k");
    c.wait_applied_everywhere(Duration::from_secs(10));
    let l = c.wait_leader(Duration::from_secs(10));
    let f = (l + 1) % 3;
    let len = info_num(&c, f, "raft_file_size");
    c.kill(f);
    let path = c.log_file(f);
    let mut bytes = std::fs::read(&path).unwrap();
    // Flip a byte inside a record in the middle of the records (preallocated zeros may
    // follow them).
    let mid = (len / 2) as usize;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let before = bytes.clone();
    c.spawn_node(f);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while c.nodes[f].is_running() {
        assert!(
            std::time::Instant::now() < deadline,
            "node kept running on a corrupt log"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = c.nodes[f].log();
    assert!(log.contains("is corrupt at byte offset"), "{log}");
    assert!(
        log.contains(&path.display().to_string()) || log.contains("redisraft.db"),
        "{log}"
    );
    // The file is left as it was for the operator to inspect.
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // The rest of the cluster keeps serving.
    let l = c.wait_leader(Duration::from_secs(10));
    assert_keys(&c, l, &keys);
}

#[test]
fn malformed_bus_frames_close_only_that_connection() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    for i in 0..3 {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", c.nodes[i].def.bus_port)).unwrap();
        let _ = s.write_all(b"\x52\x52\x02\xff\xff\xff\x7fgarbage garbage garbage");
        let mut s2 = std::net::TcpStream::connect(("127.0.0.1", c.nodes[i].def.bus_port)).unwrap();
        let _ = s2.write_all(b"*1\r\n$4\r\nPING\r\n");
    }
    let keys = write_keys(&mut c, 20, "x");
    c.wait_applied_everywhere(Duration::from_secs(10));
    assert_eq!(c.leader(), Some(l));
    for i in 0..3 {
        assert_keys(&c, i, &keys);
        assert!(c.nodes[i].is_running());
    }
}

/// The commit index a node's log said when it last opened (its "raft log opened" line).
fn commit_at_open(c: &Cluster, i: usize) -> u64 {
    let log = c.nodes[i].log();
    let line = log
        .lines()
        .rfind(|l| l.contains("raft log opened"))
        .unwrap_or_else(|| panic!("node {i}: no 'raft log opened' line:\n{log}"));
    let commit = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("commit="))
        .unwrap_or_else(|| panic!("node {i}: no commit= in {line:?}"));
    commit.parse().unwrap()
}

/// A Ready that only moves the commit index writes nothing (the record goes out with the
/// next one); a clean SHUTDOWN writes what is left, so every node opens its log again at the
/// commit index it had, not before it.
#[test]
fn a_clean_shutdown_keeps_every_node_s_commit_index() {
    let mut c = Cluster::start(3);
    let keys = write_keys(&mut c, 100, "a");
    c.wait_applied_everywhere(Duration::from_secs(10));
    let l = c.wait_leader(Duration::from_secs(10));
    let mut order: Vec<usize> = (0..3).filter(|i| *i != l).collect();
    order.push(l);
    let mut had = [0; 3];
    for i in order {
        had[i] = c
            .info_field(i, "raft_commit_index")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("node {i}: no raft_commit_index in INFO"));
        let _ = q(&c, i, &["SHUTDOWN", "NOSAVE"]);
        wait_for("the node to exit", Duration::from_secs(10), || {
            !c.nodes[i].is_running()
        });
    }
    for (i, had) in had.into_iter().enumerate() {
        c.start_node(i);
        let opened = commit_at_open(&c, i);
        assert!(
            opened >= had,
            "node {i} had commit index {had} before SHUTDOWN, opened its log at {opened}"
        );
    }
    c.wait_applied_everywhere(Duration::from_secs(15));
    for i in 0..3 {
        assert_keys(&c, i, &keys);
    }
}
