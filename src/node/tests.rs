//! The raft thread in-process, without Redis: three nodes on loopback with real logs in a
//! temp dir. Checks what the main thread relies on: committed entries arrive in the same
//! order everywhere, a follower's proposals come back as Dropped, a stopped leader is
//! replaced, and a restarted node replays its log and catches up.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::codec::decode_command;
use raft::eraftpb::EntryType;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct TestCluster {
    _dir: tempfile::TempDir,
    members: Vec<Member>,
    ports: Vec<u16>,
    logs: Vec<PathBuf>,
    nodes: Vec<Option<Node>>,
    /// Normal entries (index, payload) each node has been handed, in order.
    applied: Vec<Vec<(u64, Vec<u8>)>>,
    dropped: Vec<Vec<ProposalTag>>,
    /// Each `LeadershipLost` a node handed over: the highest request it had taken.
    lost: Vec<Vec<u64>>,
    /// Confirmed read rounds (round, index) each node has been handed.
    reads: Vec<Vec<(u64, u64)>>,
    /// Whether the logs fsync (a leader's through its syncer thread).
    fsync: bool,
}

impl TestCluster {
    fn new(n: usize) -> TestCluster {
        TestCluster::with_fsync(n, false)
    }

    fn with_fsync(n: usize, fsync: bool) -> TestCluster {
        // A port found free may be taken (by another test's connection) before a node
        // binds it: then again, with new ports.
        for _ in 0..4 {
            if let Some(c) = TestCluster::try_new(n, fsync) {
                return c;
            }
        }
        TestCluster::try_new(n, fsync).expect("start a test cluster")
    }

    fn try_new(n: usize, fsync: bool) -> Option<TestCluster> {
        let dir = tempfile::tempdir().expect("tempdir");
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let members = (0..n)
            .map(|i| Member {
                id: i as u64 + 1,
                name: format!("n{}", i + 1),
                redis_addr: format!("127.0.0.1:{}", 7000 + i),
                bus_addr: format!("127.0.0.1:{}", ports[i]),
            })
            .collect();
        let logs = (0..n)
            .map(|i| dir.path().join(format!("n{}.db", i + 1)))
            .collect();
        let mut c = TestCluster {
            _dir: dir,
            members,
            ports,
            logs,
            nodes: (0..n).map(|_| None).collect(),
            applied: vec![Vec::new(); n],
            dropped: vec![Vec::new(); n],
            lost: vec![Vec::new(); n],
            reads: vec![Vec::new(); n],
            fsync,
        };
        for i in 0..n {
            if let Err(e) = c.try_start(i) {
                eprintln!("node {} did not start on port {}: {e}", i + 1, c.ports[i]);
                for j in 0..i {
                    c.stop(j);
                }
                return None;
            }
        }
        Some(c)
    }

    fn start(&mut self, i: usize) {
        if let Err(e) = self.try_start(i) {
            panic!("start node: {e}");
        }
    }

    fn try_start(&mut self, i: usize) -> Result<(), String> {
        let (store, _) = LogStore::open(&self.logs[i], self.fsync).expect("open log");
        let spec = NodeSpec {
            id: i as u64 + 1,
            members: self.members.clone(),
            bootstrap: true,
            cluster_id: "test".into(),
            bus_listen: SocketAddr::from(([127, 0, 0, 1], self.ports[i])),
            election_timeout_ms: 300,
            heartbeat_interval_ms: 30,
            advertise_addr: None,
            lease_reads: false,
            cluster_password: String::new(),
            tls: None,
            snapshot_path: self.logs[i].with_extension("snapshot"),
        };
        let waker: Waker = Arc::new(|| {});
        self.applied[i].clear();
        self.nodes[i] = Some(Node::start(spec, store, waker).map_err(|e| e.to_string())?);
        Ok(())
    }

    fn stop(&mut self, i: usize) {
        if let Some(n) = self.nodes[i].take() {
            n.stop();
        }
    }

    fn node(&self, i: usize) -> &Node {
        self.nodes[i].as_ref().expect("running")
    }

    /// Moves everything the nodes handed over into `applied` / `dropped`.
    fn collect(&mut self) {
        for i in 0..self.nodes.len() {
            let Some(n) = &self.nodes[i] else { continue };
            for item in n.shared().take_apply_items() {
                match item {
                    ApplyItem::Entries(es, _) => {
                        for e in es {
                            if e.get_entry_type() == EntryType::EntryNormal && !e.data.is_empty() {
                                self.applied[i].push((e.index, e.data.to_vec()));
                            }
                        }
                    }
                    ApplyItem::Dropped(tags) => self.dropped[i].extend(tags),
                    ApplyItem::ReadReady { round, index } => self.reads[i].push((round, index)),
                    ApplyItem::LeadershipLost { taken } => self.lost[i].push(taken),
                    ApplyItem::LogFull { .. }
                    | ApplyItem::Stopped { .. }
                    | ApplyItem::ReadFailed { .. }
                    | ApplyItem::TransferDone(_)
                    | ApplyItem::Refused { .. }
                    | ApplyItem::AlreadyMember { .. }
                    | ApplyItem::Removed { .. }
                    | ApplyItem::InstallSnapshot { .. }
                    | ApplyItem::Compacted { .. } => {}
                }
            }
        }
    }

    fn leader(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let leaders: Vec<usize> = (0..self.nodes.len())
                .filter(|&i| {
                    self.nodes[i]
                        .as_ref()
                        .is_some_and(|n| n.shared().is_leader())
                })
                .collect();
            if leaders.len() == 1 {
                return leaders[0];
            }
            assert!(Instant::now() < deadline, "no single leader: {leaders:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_applied(&mut self, nodes: &[usize], count: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.collect();
            if nodes.iter().all(|&i| self.applied[i].len() >= count) {
                return;
            }
            let got: Vec<usize> = nodes.iter().map(|&i| self.applied[i].len()).collect();
            assert!(Instant::now() < deadline, "applied {got:?}, want {count}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.stop(i);
        }
    }
}

fn proposals(node_id: u64, from: u64, n: u64) -> Vec<Proposal> {
    (from..from + n)
        .map(|r| {
            let tag = ProposalTag {
                node_id,
                incarnation: 1,
                request: r,
            };
            let cmd = LogCommand::Redis {
                db: 0,
                argv: vec![b"SET".to_vec(), format!("k{r}").into_bytes()],
            };
            (tag, encode_command(&cmd))
        })
        .collect()
}

fn keys(applied: &[(u64, Vec<u8>)]) -> Vec<String> {
    applied
        .iter()
        .map(|(_, d)| match decode_command(d) {
            Ok(LogCommand::Redis { argv, .. }) => String::from_utf8_lossy(&argv[1]).into_owned(),
            other => panic!("unexpected entry {other:?}"),
        })
        .collect()
}

/// What the main thread counts on to answer the writes pending when leadership goes:
/// `LeadershipLost` names the last request the raft thread took, and what it takes after
/// comes back `Dropped`, logged nowhere (so a redirect is the true answer for it, not
/// "outcome unknown").
#[test]
fn leadership_lost_names_the_last_proposal_taken_and_later_ones_are_dropped() {
    let mut c = TestCluster::new(3);
    let l = c.leader(Duration::from_secs(5));
    let me = l as u64 + 1;
    c.node(l).propose(proposals(me, 1, 10)).expect("propose");
    c.wait_applied(&[0, 1, 2], 10);
    assert!(c.lost[l].is_empty(), "{:?}", c.lost[l]);

    let f = (l + 1) % 3;
    c.node(l).transfer_leader(f as u64 + 1).expect("transfer");
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.lost[l].is_empty() {
        assert!(Instant::now() < deadline, "leadership not handed over");
        c.collect();
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(c.lost[l], vec![10]);

    let later = proposals(me, 11, 3);
    let tags: Vec<ProposalTag> = later.iter().map(|(t, _)| *t).collect();
    c.node(l).propose(later).expect("propose");
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.dropped[l].len() < 3 {
        assert!(Instant::now() < deadline, "{:?}", c.dropped[l]);
        c.collect();
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(c.dropped[l], tags);
    // The new leader commits on; none of the dropped ones is anywhere.
    assert_eq!(c.leader(Duration::from_secs(5)), f);
    c.node(f)
        .propose(proposals(f as u64 + 1, 100, 1))
        .expect("propose");
    c.wait_applied(&[0, 1, 2], 11);
    for i in 0..3 {
        let k = keys(&c.applied[i]);
        assert_eq!(k.len(), 11, "node {i}: {k:?}");
        assert!(
            !k.iter()
                .any(|k| ["k11", "k12", "k13"].contains(&k.as_str())),
            "node {i}: {k:?}"
        );
    }
}

#[test]
fn entries_commit_in_one_order_survive_leader_loss_and_replay_on_restart() {
    let mut c = TestCluster::new(3);
    let l = c.leader(Duration::from_secs(5));
    c.node(l)
        .propose(proposals(l as u64 + 1, 0, 100))
        .expect("propose");
    c.wait_applied(&[0, 1, 2], 100);
    let first = keys(&c.applied[l]);
    assert_eq!(first, (0..100).map(|r| format!("k{r}")).collect::<Vec<_>>());
    for i in 0..3 {
        assert_eq!(c.applied[i], c.applied[l], "node {i} order");
    }

    // A read round on the leader, and one on a follower (forwarded to the leader), are
    // confirmed at an index covering everything committed before they were asked.
    let f = (l + 1) % 3;
    let committed = c.applied[l].last().map(|(i, _)| *i).unwrap_or(0);
    c.node(l).read_index(7).expect("read index");
    c.node(f).read_index(8).expect("read index");
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.reads[l].is_empty() || c.reads[f].is_empty() {
        assert!(Instant::now() < deadline, "read rounds not confirmed");
        c.collect();
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(c.reads[l][0].0, 7);
    assert!(
        c.reads[l][0].1 >= committed,
        "{:?} < {committed}",
        c.reads[l]
    );
    assert_eq!(c.reads[f][0].0, 8);
    assert!(
        c.reads[f][0].1 >= committed,
        "{:?} < {committed}",
        c.reads[f]
    );

    // A follower never proposes: the batch comes back as Dropped, nothing enters the log.
    let batch = proposals(f as u64 + 1, 1000, 3);
    let tags: Vec<ProposalTag> = batch.iter().map(|(t, _)| *t).collect();
    c.node(f).propose(batch).expect("propose");
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.dropped[f].len() < 3 {
        assert!(Instant::now() < deadline, "follower proposals not dropped");
        c.collect();
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(c.dropped[f], tags);

    // The leader stops; the other two elect one and keep committing.
    c.stop(l);
    let (nl, rest) = others_elect_and_commit(&mut c, l, 50, 150);
    assert_eq!(c.applied[rest[0]], c.applied[rest[1]]);

    // The stopped node restarts from its log, replays from index 1, and catches up.
    c.start(l);
    c.wait_applied(&[l], 150);
    assert_eq!(c.applied[l], c.applied[nl]);
    let ids: HashMap<u64, usize> = c.applied[l]
        .iter()
        .enumerate()
        .map(|(k, (i, _))| (*i, k))
        .collect();
    assert_eq!(ids.len(), 150, "each entry applied once");
}

/// Node `gone` is out: the other two elect a leader (not `gone`), which proposes `n` more
/// entries (k100...), until both have applied `total`. Returns the leader and the two.
fn others_elect_and_commit(
    c: &mut TestCluster,
    gone: usize,
    n: u64,
    total: usize,
) -> (usize, Vec<usize>) {
    let rest: Vec<usize> = (0..3).filter(|&i| i != gone).collect();
    let nl = c.leader(Duration::from_secs(5));
    assert_ne!(nl, gone);
    c.node(nl)
        .propose(proposals(nl as u64 + 1, 100, n))
        .expect("propose");
    c.wait_applied(&rest, total);
    (nl, rest)
}

/// Polls until node `i` has been handed exactly what node `j` was.
fn wait_same_applied(c: &mut TestCluster, i: usize, j: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        c.collect();
        if c.applied[i] == c.applied[j] {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {i} applied {} entries, node {j} {}",
            c.applied[i].len(),
            c.applied[j].len()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_leader_whose_log_is_full_hands_over_applies_nothing_unwritten_and_catches_up() {
    let mut c = TestCluster::new(3);
    let l = c.leader(Duration::from_secs(5));
    c.node(l)
        .propose(proposals(l as u64 + 1, 0, 20))
        .expect("propose");
    c.wait_applied(&[0, 1, 2], 20);

    // The leader's next write finds no space: its batch is not applied here (the others
    // may commit it without this node), and leadership moves to another node.
    c.node(l).set_log_fault(Some(LogFault::NoSpace));
    c.node(l)
        .propose(proposals(l as u64 + 1, 20, 5))
        .expect("propose");
    let deadline = Instant::now() + Duration::from_secs(10);
    let nl = loop {
        let nl = c.leader(Duration::from_secs(10));
        if nl != l {
            break nl;
        }
        assert!(Instant::now() < deadline, "the full leader kept leading");
        std::thread::sleep(Duration::from_millis(10));
    };
    let st = c.node(l).shared().status();
    assert!(
        st.log_full
            .as_deref()
            .is_some_and(|e| e.contains("No space left on device")),
        "{:?}",
        st.log_full
    );
    assert!(c.node(l).shared().log_full().is_some());
    let rest: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    c.node(nl)
        .propose(proposals(nl as u64 + 1, 100, 30))
        .expect("propose");
    c.wait_applied(&rest, 50);
    c.collect();
    assert_eq!(c.applied[l].len(), 20, "applied past what its log holds");
    assert_eq!(c.applied[rest[0]], c.applied[rest[1]]);

    // Space again: it writes what it held, takes the rest from the leader, and applies
    // exactly what the others did.
    c.node(l).set_log_fault(None);
    wait_same_applied(&mut c, l, nl);
    assert_eq!(c.node(l).shared().status().log_full, None);
    assert_eq!(c.node(l).shared().log_full(), None);
    c.node(nl)
        .propose(proposals(nl as u64 + 1, 200, 10))
        .expect("propose");
    c.wait_applied(&rest, 60);
    wait_same_applied(&mut c, l, nl);

    // Its log on disk holds it all: a restart replays the same entries.
    c.stop(l);
    c.start(l);
    wait_same_applied(&mut c, l, nl);
}

/// Polls until node `i` stopped, then checks it says its log write failed (EIO) and what
/// to do.
fn wait_stopped_by_failed_write(c: &TestCluster, i: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.node(i).shared().status().role != Role::Stopped {
        assert!(Instant::now() < deadline, "node {i} did not stop");
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = c.node(i).shared().status();
    assert!(
        st.log_failed
            .as_deref()
            .is_some_and(|e| e.contains("write failed") && e.contains("os error 5")),
        "{:?}",
        st.log_failed
    );
    assert!(
        st.failure
            .as_deref()
            .is_some_and(|e| e.contains("check the disk, then restart the node")),
        "{:?}",
        st.failure
    );
}

#[test]
fn a_follower_whose_log_write_fails_stops_and_the_others_go_on() {
    let mut c = TestCluster::new(3);
    let l = c.leader(Duration::from_secs(5));
    let f = (l + 1) % 3;
    c.node(f).set_log_fault(Some(LogFault::WriteEio));
    c.node(l)
        .propose(proposals(l as u64 + 1, 0, 20))
        .expect("propose");
    wait_stopped_by_failed_write(&c, f);
    let rest: Vec<usize> = (0..3).filter(|&i| i != f).collect();
    c.wait_applied(&rest, 20);
    c.collect();
    assert!(c.applied[f].is_empty(), "{:?}", c.applied[f]);
}

#[test]
fn a_leader_proposes_on_the_callers_thread_between_turns_and_keeps_the_order_of_its_batches() {
    // With fsync: the leader's records go to its syncer thread from the caller's thread too.
    let mut c = TestCluster::with_fsync(3, true);
    let l = c.leader(Duration::from_secs(5));
    let me = l as u64 + 1;
    let last_index = |c: &TestCluster| {
        lock(&c.node(l).core)
            .as_ref()
            .map(|t| t.node.raft.raft_log.last_index())
            .expect("raft thread running")
    };

    // Between the raft thread's turns a batch is appended before `propose` returns: it ran
    // on this thread. The raft thread may be in a turn (a heartbeat, an acknowledgement)
    // now and then, so a few tries are allowed; most must be inline.
    let mut inline = 0;
    for r in 0..20 {
        std::thread::sleep(Duration::from_millis(5));
        let before = last_index(&c);
        c.node(l).propose(proposals(me, r, 1)).expect("propose");
        if last_index(&c) == before + 1 {
            inline += 1;
        }
    }
    assert!(inline >= 10, "only {inline} of 20 batches proposed inline");

    // A batch sent while the raft thread holds the lock goes through the channel; the next
    // one must not overtake it: sent at once it follows through the channel, sent once the
    // raft thread took the first it may run inline. Both ways, in order everywhere.
    let mut want: Vec<String> = (0..20).map(|r| format!("k{r}")).collect();
    for k in 0..20u64 {
        let a = 100 + 2 * k;
        {
            let _turn = lock(&c.node(l).core);
            c.node(l).propose(proposals(me, a, 1)).expect("propose");
        }
        if k % 2 == 1 {
            std::thread::sleep(Duration::from_millis(5));
        }
        c.node(l).propose(proposals(me, a + 1, 1)).expect("propose");
        want.push(format!("k{a}"));
        want.push(format!("k{}", a + 1));
    }
    c.wait_applied(&[0, 1, 2], 60);
    for i in 0..3 {
        assert_eq!(keys(&c.applied[i]), want, "node {i}");
    }
    assert!(c.dropped.iter().all(Vec::is_empty), "{:?}", c.dropped);
}

#[test]
fn a_leader_whose_log_write_fails_on_the_callers_thread_stops_and_the_others_go_on() {
    let mut c = TestCluster::new(3);
    let l = c.leader(Duration::from_secs(5));
    c.node(l).set_log_fault(Some(LogFault::WriteEio));
    // Between turns, so the batch most likely runs on this thread, where its write fails;
    // the raft thread then stops the node, as if the write had failed in its own turn.
    std::thread::sleep(Duration::from_millis(5));
    c.node(l)
        .propose(proposals(l as u64 + 1, 0, 5))
        .expect("propose");
    wait_stopped_by_failed_write(&c, l);
    let deadline = Instant::now() + Duration::from_secs(10);
    // Its thread ended and took the state with it: later batches are refused, not lost.
    while lock(&c.node(l).core).is_some() {
        assert!(Instant::now() < deadline, "the raft thread did not end");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(matches!(
        c.node(l).propose(proposals(l as u64 + 1, 5, 1)),
        Err((ProposeError::Stopped, _))
    ));
    others_elect_and_commit(&mut c, l, 10, 10);
    c.collect();
    assert!(c.applied[l].is_empty(), "{:?}", c.applied[l]);
}

/// The leader's peer connections, which the caller (as the main thread) watches from now
/// on, once both followers' are there: their ids and a duplicate of each socket (closed by
/// the caller; polled without the lock, as Redis's event loop does).
fn watch_followers(c: &TestCluster, l: usize) -> Vec<(u64, libc::c_int)> {
    watch_peers_of(c, l, 2)
}

/// Node `i`'s peer connections, as `watch_followers`, once at least `n` are there.
fn watch_peers_of(c: &TestCluster, l: usize, n: usize) -> Vec<(u64, libc::c_int)> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut got = Vec::new();
        let seen = c.node(l).watch_peers(|conns| {
            got = conns
                .iter()
                // SAFETY: a descriptor the raft thread keeps open while we hold the lock.
                .map(|p| (p.id, unsafe { libc::fcntl(p.fd, libc::F_DUPFD_CLOEXEC, 0) }))
                .collect();
            conns.iter().map(|p| (p.id, true)).collect()
        });
        if seen.is_some() && got.len() >= n {
            return got;
        }
        for (_, fd) in got {
            unsafe { libc::close(fd) };
        }
        assert!(
            Instant::now() < deadline,
            "node {l}'s main thread watches fewer than {n} connections"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until one of `conns` is readable (as Redis's event loop would), up to `ms`.
fn poll_readable(conns: &[(u64, libc::c_int)], ms: i32) -> bool {
    let mut fds: Vec<libc::pollfd> = conns
        .iter()
        .map(|(_, fd)| libc::pollfd {
            fd: *fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: a live slice of initialized pollfds, of the length passed.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) > 0 }
}

/// Proposes `writes` on leader `l` one at a time, each until node `at` applied it, reading
/// `at`'s watched `conns` as its main thread would whenever one is readable; returns how many
/// of the writes were applied right after such a read (seen on the caller's thread).
fn write_reading_on(
    c: &mut TestCluster,
    l: usize,
    at: usize,
    conns: &[(u64, libc::c_int)],
    writes: std::ops::Range<u64>,
) -> usize {
    let me = l as u64 + 1;
    let mut here = 0;
    for r in writes {
        let want = c.applied[at].len() + 1;
        c.node(l).propose(proposals(me, r, 1)).expect("propose");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            c.collect();
            if c.applied[at].len() >= want {
                break;
            }
            if poll_readable(conns, 50) {
                let got = c.node(at).read_on_main(None);
                let before = c.applied[at].len();
                c.collect();
                if got == MainRead::Done && c.applied[at].len() > before {
                    here += 1;
                }
            }
            assert!(Instant::now() < deadline, "write {r} not applied on {at}");
        }
    }
    here
}

/// Node `i`'s caller (its main thread) is told, within 5 s, to stop reading and to watch
/// no connection.
fn told_to_stop_reading(c: &TestCluster, i: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.node(i).read_on_main(None) != MainRead::NotMine {
        assert!(Instant::now() < deadline, "node {i}'s caller still reads");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut listed = None;
    while listed.is_none() {
        listed = c.node(i).watch_peers(|conns| {
            assert!(
                conns.is_empty(),
                "node {i}'s caller is told to watch {conns:?}"
            );
            Vec::new()
        });
    }
}

/// The raft thread's sleep watches these of the leader's connections.
fn raft_thread_watches(c: &TestCluster, l: usize) -> usize {
    let mut watch = Vec::new();
    if let Some(t) = lock(&c.node(l).core).as_ref() {
        t.fill_watch(&mut watch);
    }
    watch.len()
}

#[test]
fn a_leaders_main_thread_takes_its_followers_answers_itself_and_the_raft_thread_when_it_cannot() {
    leaders_main_thread_reads(true);
}

/// The same without fsync, where the old leader's main thread, a follower's, goes on reading
/// (its new leader's appends) after the handover.
#[test]
fn a_leaders_main_thread_takes_its_followers_answers_itself_without_fsync_too() {
    leaders_main_thread_reads(false);
}

fn leaders_main_thread_reads(fsync: bool) {
    let mut c = TestCluster::with_fsync(3, fsync);
    let l = c.leader(Duration::from_secs(5));
    let me = l as u64 + 1;
    // A long tick (heartbeats every 500 ms, elections after 5 s): the raft thread's own turns
    // are rare, so what commits at once was read by whoever watched the connections.
    for i in 0..3 {
        assert!(c.node(i).set_timing(5000, 500));
    }
    let conns = watch_followers(&c, l);
    assert_eq!(
        raft_thread_watches(&c, l),
        0,
        "the raft thread leaves them to the caller"
    );

    // Each write is proposed here and its followers' answers are read here, when one of
    // the connections is readable: the commit is seen here, as the entry handed over by
    // `read_on_main` (the raft thread may take a turn now and then; most are the caller's).
    let here = write_reading_on(&mut c, l, l, &conns, 0..20);
    assert!(
        here >= 10,
        "only {here} of 20 commits seen on the caller's thread"
    );

    // The caller finds the lock taken (the raft thread's turn): it pauses, and from then
    // until the raft thread has read the connections, the raft thread watches them itself,
    // so writes commit at once, not at its next tick.
    for k in 0..5u64 {
        {
            let _turn = lock(&c.node(l).core);
            assert_eq!(c.node(l).read_on_main(None), MainRead::Busy);
            c.node(l).pause_main_reads();
        }
        let started = Instant::now();
        c.node(l)
            .propose(proposals(me, 100 + k, 1))
            .expect("propose");
        c.wait_applied(&[l], 21 + k as usize);
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(250),
            "a write took {took:?} with the caller paused"
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while !c.node(l).resume_main_reads() {
            assert!(
                Instant::now() < deadline,
                "the raft thread never read for the caller"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    // A caller that watches but never reads (a long script on the main thread): the raft
    // thread reads every connection on each of its turns, so writes still commit.
    c.node(l).propose(proposals(me, 200, 5)).expect("propose");
    c.wait_applied(&[0, 1, 2], 30);
    let want: Vec<String> = (0..20)
        .map(|r| format!("k{r}"))
        .chain((100..105).map(|r| format!("k{r}")))
        .chain((200..205).map(|r| format!("k{r}")))
        .collect();
    for i in 0..3 {
        assert_eq!(keys(&c.applied[i]), want, "node {i}");
    }

    // Leadership handed over: the old leader's caller is told to stop watching, and its
    // raft thread watches every connection again.
    let f = (0..3).find(|&i| i != l).expect("a follower");
    c.node(l).transfer_leader(f as u64 + 1).expect("transfer");
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.leader(Duration::from_secs(5)) != f {
        assert!(Instant::now() < deadline, "leadership not handed over");
        std::thread::sleep(Duration::from_millis(5));
    }
    if !fsync {
        // A follower without fsync: its caller goes on reading, now its leader's appends.
        c.node(f)
            .propose(proposals(f as u64 + 1, 300, 1))
            .expect("propose");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !keys(&c.applied[l]).contains(&"k300".to_string()) {
            if poll_readable(&conns, 50) {
                assert_eq!(c.node(l).read_on_main(None), MainRead::Done);
            }
            c.collect();
            assert!(Instant::now() < deadline, "k300 not applied on {l}");
        }
        for (_, fd) in conns {
            unsafe { libc::close(fd) };
        }
        return;
    }
    told_to_stop_reading(&c, l);
    assert!(
        raft_thread_watches(&c, l) >= 2,
        "the raft thread watches them again"
    );
    for (_, fd) in conns {
        unsafe { libc::close(fd) };
    }
}

/// Without fsync a follower's main thread steps its leader's appends and heartbeats itself
/// and applies what they commit, with no raft thread on the way; once fsync is on, it stops
/// (a follower's Ready would fsync) and the raft thread reads again.
#[test]
fn without_fsync_a_followers_main_thread_takes_its_leaders_appends_itself() {
    let mut c = TestCluster::new(3);
    let l = c.leader(Duration::from_secs(5));
    let me = l as u64 + 1;
    // Rare raft thread turns (as in the leader's test): what a follower applies at once was
    // read by whoever watched its connections.
    for i in 0..3 {
        assert!(c.node(i).set_timing(5000, 500));
    }
    let f = (0..3).find(|&i| i != l).expect("a follower");
    // Its leader's connection at least (the leader sent it appends to be elected).
    let conns = watch_peers_of(&c, f, 1);
    assert_eq!(raft_thread_watches(&c, f), 0);

    let here = write_reading_on(&mut c, l, f, &conns, 0..20);
    assert!(
        here >= 10,
        "only {here} of 20 applies seen on the follower's caller's thread"
    );

    // A membership change (a learner that never answers): the append carrying it, and what
    // follows until the follower applied it, is the raft thread's; the caller applies no
    // membership change, then reads again.
    let member = Member {
        id: 0,
        name: "learner".into(),
        redis_addr: "127.0.0.1:1".into(),
        bus_addr: "127.0.0.1:2".into(),
    };
    let tag = ProposalTag {
        node_id: me,
        incarnation: 1,
        request: 50,
    };
    c.node(l)
        .change_membership(tag, ChangeRequest::Add { member })
        .expect("change membership");
    let learners = |c: &TestCluster| {
        lock(&c.node(f).core)
            .as_ref()
            .map_or(0, |t| t.node.raft.prs().conf().learners().len())
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while learners(&c) == 0 {
        if poll_readable(&conns, 50) {
            c.node(f).read_on_main(None);
        }
        assert!(Instant::now() < deadline, "the learner never reached {f}");
    }
    let after = write_reading_on(&mut c, l, f, &conns, 20..30);
    let on_main = lock(&c.node(f).core).as_ref().map_or(0, |t| t.conf_on_main);
    assert_eq!(on_main, 0, "membership changes applied by the caller");
    assert!(
        after >= 5,
        "only {after} of 10 applies on the caller's thread after the change"
    );

    // fsync turned on: the caller is told to stop, and the raft thread reads again.
    c.node(f).set_fsync(true);
    told_to_stop_reading(&c, f);
    assert!(raft_thread_watches(&c, f) >= 1);
    c.node(l).propose(proposals(me, 100, 5)).expect("propose");
    c.wait_applied(&[0, 1, 2], 35);
    let want: Vec<String> = (0..30)
        .map(|r| format!("k{r}"))
        .chain((100..105).map(|r| format!("k{r}")))
        .collect();
    for i in 0..3 {
        assert_eq!(keys(&c.applied[i]), want, "node {i}");
    }
    for (_, fd) in conns {
        unsafe { libc::close(fd) };
    }
}
