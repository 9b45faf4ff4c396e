//! Snapshot failures in a running cluster (issue 5): a fork that fails, a node killed while
//! its snapshot child writes, a file size limit hit while writing, a node killed while it
//! receives or installs the leader's snapshot. Each leaves the previous snapshot and the log
//! valid, loses no acknowledged write, and says so in one log line. Real redis-server
//! processes, on 3-node clusters.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use common::{info_num, q, wait_for, Cluster, RawConn, Value};

fn config_set(c: &Cluster, i: usize, name: &str, value: &str) {
    assert_eq!(q(c, i, &["CONFIG", "SET", name, value]), Ok(Value::Okay));
}

/// Writes keys `<tag>:<n>` for n in `range` through the leader, `size` bytes each, in
/// pipelines; records each acknowledged write in `acked`.
fn write_keys(
    c: &mut Cluster,
    acked: &mut BTreeMap<String, String>,
    tag: &str,
    range: std::ops::Range<usize>,
    size: usize,
) {
    let l = c.wait_leader(Duration::from_secs(15));
    let mut conn = c.conn(l).unwrap();
    let keys: Vec<usize> = range.collect();
    for chunk in keys.chunks(200) {
        let mut pipe = redis::pipe();
        let mut batch = Vec::new();
        for n in chunk {
            let k = format!("{tag}:{n}");
            let mut v = format!("{tag}-{n}-");
            // Not compressible: DUMP payloads (and so snapshots) are as large as the data.
            let mut x = (*n as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            while v.len() < size {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.push(char::from(b'a' + (x % 26) as u8));
            }
            pipe.cmd("SET").arg(&k).arg(&v);
            batch.push((k, v));
        }
        let replies: Vec<String> = pipe.query(&mut conn).expect("SET through the leader");
        assert!(replies.iter().all(|r| r == "OK"), "{replies:?}");
        acked.extend(batch);
    }
}

/// Every acknowledged key holds its value on node `i`, and nothing else is there.
fn assert_has_all(c: &Cluster, i: usize, acked: &BTreeMap<String, String>) {
    let mut conn = c.conn(i).unwrap();
    let size: i64 = redis::cmd("RAFT.DEBUG")
        .arg("EXEC")
        .arg("DBSIZE")
        .query(&mut conn)
        .unwrap();
    assert_eq!(size, acked.len() as i64, "node {i}: DBSIZE");
    let pairs: Vec<(&String, &String)> = acked.iter().collect();
    for chunk in pairs.chunks(500) {
        let mut cmd = redis::cmd("RAFT.DEBUG");
        cmd.arg("EXEC").arg("MGET");
        for (k, _) in chunk {
            cmd.arg(k.as_str());
        }
        let got: Vec<Option<String>> = cmd.query(&mut conn).unwrap();
        for ((k, want), got) in chunk.iter().zip(got) {
            assert_eq!(got.as_deref(), Some(want.as_str()), "node {i} key {k}");
        }
    }
}

fn wait_applied_everywhere(c: &mut Cluster) {
    let l = c.wait_leader(Duration::from_secs(20));
    let commit = info_num(c, l, "raft_commit_index");
    wait_for("every node to apply", Duration::from_secs(30), || {
        (0..c.nodes.len()).all(|i| info_num(c, i, "raft_last_applied_index") >= commit)
    });
}

fn snapshot_file(c: &Cluster, i: usize) -> PathBuf {
    c.nodes[i].def.dir.join("redisraft.db.snapshot")
}

fn with_suffix(p: &std::path::Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// How often `line` appears in node `i`'s log (the file is appended to across restarts).
fn log_count(c: &Cluster, i: usize, line: &str) -> usize {
    c.nodes[i].log().matches(line).count()
}

fn assert_log(c: &Cluster, i: usize, line: &str) {
    let log = c.nodes[i].log();
    assert!(log.contains(line), "node {i}'s log lacks {line:?}:\n{log}");
}

/// Pid of node `i`'s forked child, once there is one.
fn wait_child(c: &Cluster, i: usize) -> i32 {
    let pid = c.nodes[i].child.as_ref().expect("running").id();
    let mut child = 0;
    wait_for("a forked child", Duration::from_secs(10), || {
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        child = children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        child != 0
    });
    child
}

/// The process is gone (or a zombie nobody reaped yet: it runs no more code).
fn exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

/// A follower, with a first snapshot taken (RAFT.DEBUG COMPACT) over `acked`.
fn follower_with_snapshot(c: &mut Cluster, acked: &BTreeMap<String, String>) -> (usize, u64) {
    let l = c.wait_leader(Duration::from_secs(15));
    let f = (0..3).find(|&i| i != l).unwrap();
    wait_applied_everywhere(c);
    assert_eq!(q(c, f, &["RAFT.DEBUG", "COMPACT"]), Ok(Value::Okay));
    let idx = info_num(c, f, "raft_snapshot_last_idx");
    assert!(idx > acked.len() as u64 / 200, "snapshot at {idx}");
    (f, idx)
}

#[test]
fn a_failed_fork_keeps_the_previous_snapshot_and_says_so() {
    let mut c = Cluster::start(3);
    let mut acked = BTreeMap::new();
    write_keys(&mut c, &mut acked, "a", 0..300, 100);
    let l = c.wait_leader(Duration::from_secs(15));
    assert_eq!(q(&c, l, &["RAFT.DEBUG", "COMPACT"]), Ok(Value::Okay));
    let idx = info_num(&c, l, "raft_snapshot_last_idx");
    let good = std::fs::read(snapshot_file(&c, l)).expect("first snapshot");
    write_keys(&mut c, &mut acked, "b", 0..300, 100);

    config_set(&c, l, "raft.snapshot-fail", "yes");
    let why = "cannot fork for the snapshot: Cannot allocate memory (os error 12) (simulated: raft.snapshot-fail is yes)";
    assert_eq!(
        q(&c, l, &["RAFT.DEBUG", "COMPACT"]),
        Err(format!("ERR failed to begin compaction: {why}"))
    );
    assert_eq!(
        c.info_field(l, "raft_snapshot_last_error").as_deref(),
        Some(why)
    );
    assert_eq!(info_num(&c, l, "raft_snapshot_last_idx"), idx);
    assert_eq!(
        c.info_field(l, "raft_snapshot_in_progress").as_deref(),
        Some("no")
    );
    assert_log(
        &c,
        l,
        &format!("raft snapshot failed to start: {why}; the previous snapshot at index {idx} stays valid and the log is kept"),
    );
    assert_eq!(std::fs::read(snapshot_file(&c, l)).unwrap(), good);
    // The node keeps serving.
    write_keys(&mut c, &mut acked, "c", 0..100, 100);

    // Restarted, the node starts from the previous snapshot and its log.
    let loads = log_count(&c, l, "loading the raft snapshot");
    c.kill(l);
    c.start_node(l);
    wait_applied_everywhere(&mut c);
    assert_eq!(log_count(&c, l, "loading the raft snapshot"), loads + 1);
    for i in 0..3 {
        assert_has_all(&c, i, &acked);
    }

    // Failing, then back to normal: the next compaction works.
    config_set(&c, l, "raft.snapshot-fail", "yes");
    assert!(q(&c, l, &["RAFT.DEBUG", "COMPACT"]).is_err());
    config_set(&c, l, "raft.snapshot-fail", "no");
    assert_eq!(q(&c, l, &["RAFT.DEBUG", "COMPACT"]), Ok(Value::Okay));
    assert!(info_num(&c, l, "raft_snapshot_last_idx") > idx);
    assert_eq!(
        c.info_field(l, "raft_snapshot_last_error").as_deref(),
        Some("")
    );
}

#[test]
fn a_node_killed_while_its_child_writes_restarts_from_the_previous_snapshot() {
    let mut c = Cluster::start(3);
    let mut acked = BTreeMap::new();
    write_keys(&mut c, &mut acked, "a", 0..400, 100);
    let (f, idx) = follower_with_snapshot(&mut c, &acked);
    let path = snapshot_file(&c, f);
    let good = std::fs::read(&path).expect("first snapshot");
    write_keys(&mut c, &mut acked, "b", 0..400, 100);
    wait_applied_everywhere(&mut c);

    config_set(&c, f, "raft.snapshot-delay", "30");
    let mut compact = RawConn::open(c.nodes[f].def.port);
    compact.send(&["RAFT.DEBUG", "COMPACT"]);
    let child = wait_child(&c, f);
    let tmp = with_suffix(&path, ".tmp");
    wait_for(
        "the child to start writing",
        Duration::from_secs(10),
        || c.nodes[f].log().contains("snapshot child waits 30 s") && tmp.exists(),
    );
    c.kill(f);
    // The orphaned child does not go on writing (it would in the restarted server's tmp file).
    wait_for("the orphaned child to exit", Duration::from_secs(3), || {
        exited(child)
    });
    assert!(compact.closed());
    assert!(tmp.exists());
    assert_eq!(std::fs::read(&path).unwrap(), good);

    // Acknowledged while the node is down.
    write_keys(&mut c, &mut acked, "c", 0..200, 100);
    c.start_node(f);
    wait_applied_everywhere(&mut c);
    assert_log(
        &c,
        f,
        &format!(
            "removed redisraft.db.snapshot.tmp left by a snapshot save that did not finish before a restart; the snapshot redisraft.db.snapshot (index {idx}) and the log are what this node starts from"
        ),
    );
    assert_log(&c, f, "loading the raft snapshot redisraft.db.snapshot");
    assert!(!tmp.exists());
    for i in 0..3 {
        assert_has_all(&c, i, &acked);
    }
    // The option is gone with the process: the next compaction runs at once.
    assert_eq!(q(&c, f, &["RAFT.DEBUG", "COMPACT"]), Ok(Value::Okay));
    assert!(info_num(&c, f, "raft_snapshot_last_idx") > idx);
}

/// Lowers node `i`'s RLIMIT_FSIZE soft limit (`None`: back to unlimited): writes past it
/// fail with EFBIG, as a full disk fails them with ENOSPC; its children inherit it.
fn limit_file_size(c: &Cluster, i: usize, bytes: Option<u64>) {
    let pid = c.nodes[i].child.as_ref().expect("running").id() as libc::pid_t;
    let lim = libc::rlimit {
        rlim_cur: bytes.unwrap_or(libc::RLIM_INFINITY),
        rlim_max: libc::RLIM_INFINITY,
    };
    let r = unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, &lim, std::ptr::null_mut()) };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
}

#[test]
fn a_snapshot_that_cannot_be_written_in_full_fails_and_keeps_the_previous_one() {
    let mut c = Cluster::start(3);
    let mut acked = BTreeMap::new();
    // ~1.2 MB of data, in a snapshot; the log is compacted to a few KB.
    write_keys(&mut c, &mut acked, "a", 0..300, 4000);
    let (f, idx) = follower_with_snapshot(&mut c, &acked);
    let path = snapshot_file(&c, f);
    let good = std::fs::read(&path).expect("first snapshot");
    assert!(good.len() > 1_000_000, "{}", good.len());
    write_keys(&mut c, &mut acked, "b", 0..50, 100);
    wait_applied_everywhere(&mut c);
    let log_bytes = info_num(&c, f, "raft_file_size");
    assert!(log_bytes < 64 * 1024, "log file {log_bytes} bytes");

    // No file of the node may pass 512 KB: the log and redis.log stay below, the snapshot
    // does not.
    limit_file_size(&c, f, Some(512 * 1024));
    let why = "the snapshot child exited with status 1 (see the server log for why)";
    assert_eq!(
        q(&c, f, &["RAFT.DEBUG", "COMPACT"]),
        Err(format!("ERR {why}"))
    );
    assert_eq!(
        c.info_field(f, "raft_snapshot_last_error").as_deref(),
        Some(why)
    );
    assert_log(
        &c,
        f,
        "snapshot child failed: snapshot redisraft.db.snapshot.tmp: write: File too large (os error 27)",
    );
    assert_log(
        &c,
        f,
        &format!("raft snapshot failed: {why}; the previous snapshot at index {idx} stays valid and the log is kept"),
    );
    assert_eq!(info_num(&c, f, "raft_snapshot_last_idx"), idx);
    assert_eq!(std::fs::read(&path).unwrap(), good);
    assert!(!with_suffix(&path, ".tmp").exists());

    // The node keeps serving: it applies new writes.
    write_keys(&mut c, &mut acked, "c", 0..50, 100);
    wait_applied_everywhere(&mut c);
    assert_has_all(&c, f, &acked);

    // Room again: the next compaction works.
    limit_file_size(&c, f, None);
    assert_eq!(q(&c, f, &["RAFT.DEBUG", "COMPACT"]), Ok(Value::Okay));
    assert!(info_num(&c, f, "raft_snapshot_last_idx") > idx);
    assert!(std::fs::metadata(&path).unwrap().len() > good.len() as u64);

    // And a restart from it loses nothing.
    c.kill(f);
    c.start_node(f);
    wait_applied_everywhere(&mut c);
    for i in 0..3 {
        assert_has_all(&c, i, &acked);
    }
}

/// A follower stopped after 200 keys, then `keys` more keys of `size` bytes written and the
/// leader's log compacted: started again, it needs the leader's snapshot. Returns the
/// leader and that follower.
fn follower_behind_a_compacted_log(
    c: &mut Cluster,
    acked: &mut BTreeMap<String, String>,
    keys: usize,
    size: usize,
) -> (usize, usize) {
    write_keys(c, acked, "a", 0..200, 100);
    let l = c.wait_leader(Duration::from_secs(15));
    let f = (0..3).find(|&i| i != l).unwrap();
    wait_applied_everywhere(c);
    c.kill(f);
    write_keys(c, acked, "b", 0..keys, size);
    let l = c.wait_leader(Duration::from_secs(15));
    assert_eq!(q(c, l, &["RAFT.DEBUG", "COMPACT"]), Ok(Value::Okay));
    (l, f)
}

#[test]
fn a_node_killed_while_it_receives_or_installs_a_snapshot_comes_back_whole() {
    let mut c = Cluster::start(3);
    let mut acked = BTreeMap::new();
    // ~12 MB the follower lacks, behind a compacted log: it needs the leader's snapshot.
    let (l, f) = follower_behind_a_compacted_log(&mut c, &mut acked, 3000, 4000);
    let path = snapshot_file(&c, f);
    let recv = with_suffix(&path, ".recv");
    let recv_tmp = with_suffix(&path, ".recv.tmp");

    // Killed while the snapshot arrives.
    c.start_node(f);
    // Polled closely: over loopback the 12 MB can arrive within 10 ms.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !recv_tmp.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for the snapshot to arrive"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    c.kill(f);
    println!(
        "killed while receiving: {} bytes of {} arrived",
        std::fs::metadata(&recv_tmp).map_or(0, |m| m.len()),
        std::fs::metadata(snapshot_file(&c, l)).map_or(0, |m| m.len())
    );
    write_keys(&mut c, &mut acked, "c", 0..100, 100);

    // Killed while it installs the snapshot (replaces its dataset with it).
    let installs = log_count(&c, f, "loading the raft snapshot");
    c.start_node(f);
    assert_log(
        &c,
        f,
        "removed redisraft.db.snapshot.recv.tmp left by a snapshot being received that did not finish before a restart",
    );
    wait_for("the install to start", Duration::from_secs(20), || {
        log_count(&c, f, "loading the raft snapshot") > installs
    });
    c.kill(f);
    let loaded = c.nodes[f]
        .log()
        .matches("raft snapshot redisraft.db.snapshot loaded")
        .count();
    println!(
        "killed while installing (loads finished so far: {loaded}; files: snapshot {}, .recv {}, .recv.tmp {})",
        path.exists(),
        recv.exists(),
        recv_tmp.exists()
    );
    write_keys(&mut c, &mut acked, "d", 0..100, 100);

    c.start_node(f);
    wait_applied_everywhere(&mut c);
    for i in 0..3 {
        assert_has_all(&c, i, &acked);
    }
}

/// The window between the log recording a received snapshot and the file moving into
/// place: a crash there leaves `<snapshot>.recv`, which the restart moves into place.
#[test]
fn a_node_killed_after_recording_a_received_snapshot_moves_it_into_place_at_restart() {
    let mut c = Cluster::start(3);
    let mut acked = BTreeMap::new();
    let (_, f) = follower_behind_a_compacted_log(&mut c, &mut acked, 500, 1000);
    let path = snapshot_file(&c, f);
    let recv = with_suffix(&path, ".recv");

    c.nodes[f].env = vec![(
        "REDIS_RAFT_TEST_FAULT".into(),
        "kill-before-snapshot-move".into(),
    )];
    c.start_node(f);
    let pid = c.nodes[f].child.as_ref().expect("running").id() as i32;
    wait_for(
        "the node to die at the fault point",
        Duration::from_secs(30),
        || exited(pid),
    );
    assert_log(
        &c,
        f,
        "REDIS_RAFT_TEST_FAULT: killing this process at kill-before-snapshot-move",
    );
    assert!(recv.exists(), "{} is missing", recv.display());
    c.kill(f);
    write_keys(&mut c, &mut acked, "c", 0..100, 100);

    c.nodes[f].env.clear();
    c.start_node(f);
    assert_log(
        &c,
        f,
        "moving the snapshot received before a restart into place",
    );
    wait_applied_everywhere(&mut c);
    for i in 0..3 {
        assert_has_all(&c, i, &acked);
    }
    assert!(!recv.exists());
    assert!(path.exists());
}
