//! Failing disks under the raft log (issue 13): a full file system (a real one: a small
//! tmpfs mounted under one node's directory) refuses writes with a clear error, moves
//! leadership away, keeps what was acknowledged, and recovers by itself once space is freed;
//! a failing disk (EIO, from the test-only `RAFT.DEBUG LOG-FAULT` knob: tmpfs cannot fail
//! that way) stops the node, which says why and acknowledges nothing it could not persist,
//! while the other two go on. Real redis-server processes, on 3-node clusters.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{assert_same_data_with, info_num, q, wait_for, Cluster, Value};

/// A tmpfs mounted for the test's lifetime; unmounted (lazily: a node may still hold files
/// open) however the test ends.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Mounts a tmpfs of `bytes` at `dir`; None (with a line saying the test is skipped) where
/// mounting is not permitted.
fn mount_tmpfs(dir: &Path, bytes: u64) -> Option<Mount> {
    std::fs::create_dir_all(dir).expect("mount point");
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
        .arg(dir)
        .output();
    match out {
        Ok(o) if o.status.success() => Some(Mount(dir.to_path_buf())),
        Ok(o) => {
            eprintln!(
                "SKIPPED: cannot mount a tmpfs (root is needed): {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            None
        }
        Err(e) => {
            eprintln!("SKIPPED: cannot run mount: {e}");
            None
        }
    }
}

/// Fills the file system holding `dir` to its last byte; returns the filler file.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("filler");
    let chunk = vec![0xa5u8; 1 << 16];
    for size in [1 << 16, 4096, 512, 1] {
        // Bounded: each write takes room from a file system of fixed size.
        while matches!(f.write(&chunk[..size]), Ok(n) if n > 0) {}
    }
    path
}

fn value(n: usize) -> String {
    let mut v = format!("v{n}-");
    while v.len() < 1000 {
        v.push(char::from(b'a' + (v.len() * 7 + n) as u8 % 26));
    }
    v
}

/// SET on node `i`: Ok(()) when acknowledged, the error text otherwise.
fn set(c: &Cluster, i: usize, key: &str, val: &str) -> Result<(), String> {
    match q(c, i, &["SET", key, val]) {
        Ok(Value::Okay) => Ok(()),
        Ok(other) => panic!("SET {key} on node {i}: {other:?}"),
        Err(e) => Err(e),
    }
}

/// Writes `keys` through the leader (whichever it is), each acknowledged. A write that
/// fails is asked again of the leader found then (SET of the same value: no harm if the
/// first attempt was applied after all).
fn write_through_leader(
    c: &mut Cluster,
    acked: &mut BTreeMap<String, String>,
    keys: std::ops::Range<usize>,
) {
    let mut l = c.wait_leader(Duration::from_secs(15));
    for n in keys {
        let (k, v) = (format!("k{n}"), value(n));
        let mut tries = 0;
        while let Err(e) = set(c, l, &k, &v) {
            tries += 1;
            assert!(tries < 5, "SET {k} through the leader (node {l}): {e}");
            l = c.wait_leader(Duration::from_secs(15));
        }
        acked.insert(k, v);
    }
}

fn wait_leader_other_than(c: &mut Cluster, not: usize) -> usize {
    let mut found = None;
    wait_for(
        "a leader other than the full node",
        Duration::from_secs(20),
        || {
            found = c.leader().filter(|&l| l != not);
            found.is_some()
        },
    );
    let l = found.unwrap_or_default();
    c.wait_leader(Duration::from_secs(15));
    l
}

#[test]
fn a_full_log_disk_refuses_writes_hands_over_and_recovers_without_a_restart() {
    let mut c = Cluster::define(3);
    let disk = c.nodes[0].def.dir.join("disk");
    let Some(_mount) = mount_tmpfs(&disk, 4 << 20) else {
        return;
    };
    c.nodes[0].extra.extend([
        "--raft.log-filename".to_string(),
        "disk/redisraft.db".into(),
    ]);
    for i in 0..3 {
        c.start_node(i);
    }
    let l = c.wait_leader(Duration::from_secs(15));
    if l != 0 {
        assert_eq!(q(&c, l, &["RAFT.TRANSFER_LEADER", "n1"]), Ok(Value::Okay));
    }
    wait_for("node 0 to lead", Duration::from_secs(15), || {
        c.leader() == Some(0)
    });
    let mut acked = BTreeMap::new();
    write_through_leader(&mut c, &mut acked, 0..150);
    // A good snapshot to keep, on the disk about to fill.
    assert_eq!(q(&c, 0, &["RAFT.DEBUG", "COMPACT"]), Ok(Value::Okay));
    let snap_idx = info_num(&c, 0, "raft_snapshot_last_idx");
    assert!(snap_idx > 0);
    let snap_file = disk.join("redisraft.db.snapshot");
    let snap_bytes = std::fs::read(&snap_file).expect("snapshot file");

    // Fill the disk. The log's preallocated room takes some writes still; then one finds no
    // space, and its client is told so (the write may still commit through the others).
    let filler = fill(&disk);
    let mut n = 1000;
    let first_err = loop {
        let (k, v) = (format!("k{n}"), value(n));
        match set(&c, 0, &k, &v) {
            Ok(()) => {
                acked.insert(k, v);
            }
            Err(e) => break e,
        }
        n += 1;
        assert!(n < 5000, "the log never found the disk full");
    };
    assert!(
        first_err.contains("No space left on device") && first_err.contains("disk/redisraft.db"),
        "{first_err}"
    );
    // Until it has handed over, the full leader refuses writes with the log's error; then
    // it sends them to the new leader.
    wait_for(
        "the full node to redirect writes",
        Duration::from_secs(20),
        || {
            n += 1;
            match set(&c, 0, &format!("k{n}"), "x") {
                Err(e) if e.starts_with("MOVED") => true,
                Err(e) => {
                    assert!(
                        e.contains("No space left on device") || e.starts_with("CLUSTERDOWN"),
                        "{e}"
                    );
                    false
                }
                Ok(()) => panic!("a write was acknowledged by the node whose log is full"),
            }
        },
    );
    let nl = wait_leader_other_than(&mut c, 0);
    assert_eq!(c.info_field(0, "raft_log_state").as_deref(), Some("full"));
    let why = c.info_field(0, "raft_log_error").unwrap_or_default();
    assert!(why.contains("No space left on device"), "{why}");
    assert!(c.nodes[0].log().contains("No space left on device"));
    assert_eq!(c.info_field(0, "raft_state").as_deref(), Some("up"));

    // The other two keep the cluster writable; the full node still serves local reads.
    write_through_leader(&mut c, &mut acked, 5000..5100);
    assert_eq!(
        c.local(0, &["GET", "k0"]),
        Value::BulkString(value(0).into_bytes())
    );
    // A snapshot that cannot be written fails and keeps the last good one.
    let r = q(&c, 0, &["RAFT.DEBUG", "COMPACT"]);
    assert!(r.is_err(), "compaction on a full disk: {r:?}");
    assert_eq!(info_num(&c, 0, "raft_snapshot_last_idx"), snap_idx);
    assert!(std::fs::read(&snap_file).expect("snapshot file") == snap_bytes);
    assert!(!disk.join("redisraft.db.snapshot.tmp").exists());
    let commit = info_num(&c, nl, "raft_commit_index");
    assert!(
        info_num(&c, 0, "raft_last_applied_index") < commit,
        "the full node applied entries it could not write"
    );

    // Space again: the node writes what it held, catches up and takes part, no restart.
    std::fs::remove_file(&filler).expect("remove filler");
    wait_for(
        "the log to be written again",
        Duration::from_secs(20),
        || c.info_field(0, "raft_log_state").as_deref() == Some("ok"),
    );
    assert_eq!(c.info_field(0, "raft_log_error").as_deref(), Some(""));
    assert!(c.nodes[0].log().contains("written again"));
    c.wait_applied_everywhere(Duration::from_secs(20));
    write_through_leader(&mut c, &mut acked, 6000..6050);
    let l = c.wait_leader(Duration::from_secs(15));
    assert_eq!(q(&c, l, &["RAFT.TRANSFER_LEADER", "n1"]), Ok(Value::Okay));
    wait_for("node 0 to lead again", Duration::from_secs(15), || {
        c.leader() == Some(0)
    });
    write_through_leader(&mut c, &mut acked, 7000..7050);
    assert_eq!(q(&c, 0, &["RAFT.DEBUG", "COMPACT"]), Ok(Value::Okay));
    assert!(info_num(&c, 0, "raft_snapshot_last_idx") > snap_idx);
    c.wait_applied_everywhere(Duration::from_secs(20));
    assert!(c.nodes[0].is_running());
    assert_same_data_with(&c, &acked);
}

/// The node other than `not` that leads, once one does.
fn leader_among_others(c: &Cluster, not: usize) -> usize {
    let mut found = None;
    wait_for(
        "the other two to elect a leader",
        Duration::from_secs(20),
        || {
            found = (0..c.nodes.len()).find(|&i| {
                i != not
                    && c.info_field(i, "raft_role").as_deref() == Some("leader")
                    && q(c, i, &["GET", "__probe"]).is_ok()
            });
            found.is_some()
        },
    );
    found.unwrap_or_default()
}

#[test]
fn a_failing_log_disk_stops_the_node_which_acknowledges_nothing_unpersisted() {
    let mut c = Cluster::start(3);
    let mut acked = BTreeMap::new();
    write_through_leader(&mut c, &mut acked, 0..50);
    let l = c.wait_leader(Duration::from_secs(15));
    assert_eq!(
        q(&c, l, &["RAFT.DEBUG", "LOG-FAULT", "FSYNC-EIO"]),
        Ok(Value::Okay)
    );
    // The write whose fsync failed is not acknowledged (it went to the followers before
    // the fsync, so it may still commit there: its outcome is unknown), nor any after it.
    let e = set(&c, l, "unknown", "x").expect_err("a write acknowledged after a failed fsync");
    assert!(
        e.contains("fsync failed") && e.contains("check the disk, then restart the node"),
        "{e}"
    );
    let e = set(&c, l, "lost", "x").expect_err("a write acknowledged by a stopped node");
    assert!(!e.is_empty());
    assert_eq!(c.info_field(l, "raft_state").as_deref(), Some("stopped"));
    assert_eq!(c.info_field(l, "raft_role").as_deref(), Some("(none)"));
    assert_eq!(c.info_field(l, "raft_log_state").as_deref(), Some("failed"));
    let why = c.info_field(l, "raft_log_error").unwrap_or_default();
    assert!(
        why.contains("redisraft.db") && why.contains("fsync failed"),
        "{why}"
    );
    let log = c.nodes[l].log();
    let line = log
        .lines()
        .find(|l| l.contains("raft log redisraft.db: fsync failed"))
        .unwrap_or_else(|| panic!("no line about the failed fsync in:\n{log}"));
    assert!(
        line.contains(" # ") && line.contains("check the disk, then restart the node"),
        "not a warning that says what to do: {line}"
    );
    assert!(c.nodes[l].is_running(), "redis-server itself stays up");

    // The other two elect a leader and go on; the stopped node takes no part.
    let nl = leader_among_others(&c, l);
    for n in 100..150 {
        let (k, v) = (format!("k{n}"), value(n));
        assert_eq!(set(&c, nl, &k, &v), Ok(()));
        acked.insert(k, v);
    }
    let e = set(&c, l, "lost2", "x").expect_err("a stopped node acknowledged a write");
    assert!(!e.is_empty());
    assert_eq!(q(&c, nl, &["GET", "lost"]), Ok(Value::Nil));
    assert_eq!(q(&c, nl, &["GET", "lost2"]), Ok(Value::Nil));

    // After a restart (the operator checked the disk) it catches up.
    c.kill(l);
    c.start_node(l);
    c.wait_applied_everywhere(Duration::from_secs(20));
    assert_same_data_with(&c, &acked);
}
