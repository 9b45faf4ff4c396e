//! The raft thread: owns raft-rs's `RawNode` and the log, drives it with proposals, peer
//! messages and ticks, and hands committed entries to the Redis main thread.
//!
//! Its state (`RaftThread`) is behind a lock the raft thread holds while it runs a turn,
//! not while it sleeps. On a leader (with its syncer, its log not full, no committed entry
//! waiting to be delivered, nothing waiting in the channel), the main thread takes the lock
//! when it is free and handles its own proposal batch or read round, then that Ready, as a
//! turn would (`Node::submit`): appended, written and sent with no wake-up of the raft
//! thread on the way. It also reads peer connections there (main_read.rs): a leader's
//! followers' answers, and a follower's leader's appends when the log is not fsynced. All
//! else (other peer messages, ticks, leases, fsyncs, membership, snapshots and stopping the
//! node) stays with the raft thread, which goes on alone whenever the main thread is busy.
//!
//! Invariant: this module never calls the Redis module API. It talks to the main thread only
//! through `Shared` (atomics, the apply queue) and the `Waker` the main thread gave it.

mod batches;
mod compaction;
mod failover;
mod lease;
mod main_read;
mod membership;
mod open;
mod ready;
mod status;
mod syncer;
mod wait;

pub use main_read::MainRead;

pub use lease::LeaseDeadline;
pub use status::{NodeStatus, Role};

use batches::Batches;
use compaction::{Compaction, Kick};
use failover::{EarlyElection, StallClock};
use lease::{LeaderState, Lease, LEASE_ROUND};
pub use open::stored_membership;
use open::{
    connect_members, open_membership, reconcile_snapshot, record_panic_locations,
    remove_unfinished_snapshots, test_fault,
};
use ready::{LogFull, Persisting};
use syncer::Syncer;
use wait::InputTx;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, TryRecvError, TrySendError};
use raft::eraftpb::{Entry, Message};
use raft::{RawNode, StateRole};
use tracing::{error, info, warn};

use crate::codec::{
    decode, encode, encode_command, LogCommand, MemberBook, ProposalTag, SnapshotMembership,
    StoredMembership,
};
use crate::storage::{LogFault, LogStore};
use crate::transport::{
    Bell, InboundPoll, PeerStatus, PollSleep, Report, Transport, TransportConfig,
};

/// How many proposal batches (one per Redis event-loop turn) may wait for the raft thread;
/// past that a write is refused with `-TRYAGAIN` rather than queued without bound.
pub const PROPOSAL_QUEUE_MAX: usize = 1024;
/// Batches of inbound peer messages (one per socket read) waiting for the raft thread;
/// transport readers block when full, which pushes back on the sending peer through TCP.
pub const INBOUND_QUEUE_MAX: usize = 1024;
/// Inputs handled per loop turn before the node produces a `Ready` (bounds latency).
const DRAIN_MAX: usize = 8192;

pub use crate::codec::Member;

/// A read round nobody confirmed (`ApplyItem::ReadFailed`).
pub const NO_QUORUM_FOR_READ: &str = "TIMEOUT no quorum for read";

/// Everything the raft thread needs to start.
pub struct NodeSpec {
    pub id: u64,
    /// Where peers are, before the log says (raft.cluster-nodes, or what a join learned).
    pub members: Vec<Member>,
    /// For a brand-new log: write the entries that make `members` the voters of a new
    /// cluster (config-file bootstrap, RAFT.CLUSTER INIT). Otherwise a brand-new log waits
    /// for a leader to add this node (RAFT.CLUSTER JOIN).
    pub bootstrap: bool,
    /// The cluster id for a brand-new log; a log that names its cluster keeps its own.
    pub cluster_id: String,
    pub bus_listen: SocketAddr,
    pub election_timeout_ms: u64,
    pub heartbeat_interval_ms: u64,
    /// This node's `raft.addr`, when it differs from its entry: replicated so -MOVED is right.
    pub advertise_addr: Option<String>,
    /// Keep a leader lease so reads run at once while it holds (`raft.read-mode lease`).
    pub lease_reads: bool,
    /// `raft.cluster-password`: peers must prove they know it; empty disables the check.
    pub cluster_password: String,
    /// This node's snapshot file (`<raft.log-filename>.snapshot`).
    pub snapshot_path: std::path::PathBuf,
    /// `raft.tls-enabled`: the bus's TLS configuration; None: plain TCP.
    pub tls: Option<crate::tls::TlsHandle>,
}

/// Where a snapshot received from the leader waits for the raft thread to take it.
pub fn recv_path(snapshot: &std::path::Path) -> std::path::PathBuf {
    let mut p = snapshot.as_os_str().to_owned();
    p.push(".recv");
    p.into()
}

/// Wakes the main thread (the Redis side passes `RedisModule_EventLoopAddOneShot`).
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// What the raft thread hands to the main thread, in order.
#[derive(Debug)]
pub enum ApplyItem {
    /// Committed entries, to execute in log order, and when the raft thread handed them over.
    Entries(Vec<Entry>, Instant),
    /// These proposals never entered the log: a definite failure.
    Dropped(Vec<ProposalTag>),
    /// This node stopped being leader. The outcomes of its pending proposals up to request
    /// `taken` (the highest `ProposalTag::request` the raft thread had taken) are unknown;
    /// later ones it had not seen yet: it drops them (`Dropped`) or, if it leads again by
    /// then, proposes them.
    LeadershipLost { taken: u64 },
    /// The node stopped (log write failed, ...): pending writes up to request `taken` (as in
    /// `LeadershipLost`) may have reached the other nodes, their outcome is unknown; the
    /// later ones never reach the log. Both get this message.
    Stopped { msg: String, taken: u64 },
    /// This node's log found the disk full: writes pending here up to request `taken` (as
    /// in `LeadershipLost`) will not be acknowledged by it (their outcome is unknown), nor
    /// the reads waiting here; fail them with the first message and the reads with the
    /// second. Later writes come back `Dropped`, and new ones are refused
    /// (`Shared::log_full`) until the log is written again.
    LogFull {
        writes: String,
        reads: String,
        taken: u64,
    },
    /// Read round `round` may run once this node has applied `index`.
    ReadReady { round: u64, index: u64 },
    /// These read rounds could not be confirmed (no leader, or no quorum, in time), or this
    /// node cannot apply as far as they need: fail them with `error`.
    ReadFailed { rounds: Vec<u64>, error: String },
    /// How a leadership transfer ended (Err: RedisRaft's error text).
    TransferDone(Result<(), String>),
    /// A membership change was refused before entering the log (RedisRaft's error text).
    Refused { tag: ProposalTag, error: String },
    /// RAFT.NODE ADD of a node that is already a member with the same name and addresses
    /// (a JOIN retried after its first attempt got committed): nothing to do.
    AlreadyMember { tag: ProposalTag, id: u64 },
    /// This node applied its own removal from the cluster and stopped; pending writes as in
    /// `Stopped`.
    Removed { taken: u64 },
    /// The leader's snapshot (file at `path`, up to `index`) replaces the dataset; later
    /// entries follow it.
    InstallSnapshot {
        index: u64,
        path: std::path::PathBuf,
    },
    /// How compacting the log after the snapshot at `index` went.
    Compacted {
        index: u64,
        result: Result<(), String>,
    },
}

/// A membership change an operator asked for (RAFT.NODE ADD / REMOVE).
#[derive(Clone, Debug)]
pub enum ChangeRequest {
    /// Add a learner; id 0 lets the leader pick an unused id.
    Add {
        member: Member,
    },
    Remove {
        id: u64,
    },
}

/// One proposal: who is waiting for it, and the entry's payload.
pub type Proposal = (ProposalTag, Vec<u8>);

enum Input {
    Propose(Vec<Proposal>),
    /// Start a ReadIndex round with this number.
    ReadIndex(u64),
    /// Hand leadership to this node (0: the most up-to-date follower).
    TransferLeader(u64),
    ChangeMembership(ProposalTag, ChangeRequest),
    /// A snapshot file up to this index is durable: drop the entries it covers.
    Compact(u64),
    SetFsync(bool),
    /// New `raft.election-timeout` and `raft.heartbeat-interval` (ms), from CONFIG SET.
    SetTiming {
        election_ms: u64,
        heartbeat_ms: u64,
    },
    Stop,
}

/// State shared between the raft thread and the main thread.
pub struct Shared {
    pub node_id: u64,
    /// The highest request number of the proposals (writes and membership changes) the
    /// raft thread has taken, logged or dropped: the pending writes `LeadershipLost`,
    /// `LogFull`, `Stopped` and `Removed` may call unknown.
    taken: AtomicU64,
    is_leader: AtomicBool,
    /// The leader this node knows, 0 for none.
    leader_id: AtomicU64,
    /// First index of this node's leadership term; reads are served once applied reaches it.
    leader_ready_index: AtomicU64,
    applied: AtomicU64,
    wake_pending: AtomicBool,
    apply_queue: Mutex<VecDeque<ApplyItem>>,
    status: Mutex<NodeStatus>,
    members: Mutex<HashMap<u64, Member>>,
    cluster_id: Mutex<String>,
    removed: AtomicBool,
    /// This node applied its own removal and is handing over (set once, by the raft thread).
    leaving: AtomicBool,
    /// The membership as of an applied index: what a snapshot taken there must carry.
    membership: Mutex<(u64, SnapshotMembership)>,
    /// Until when this leader's read lease holds (`raft.read-mode lease`).
    lease: LeaseDeadline,
    /// While this node's log cannot be written for lack of space: the error a write gets,
    /// and a flag for the read paths.
    log_full: Mutex<Option<String>>,
    log_full_flag: AtomicBool,
    /// Changes whenever the peer connections the main thread may watch change (main_read.rs).
    peers_generation: AtomicU64,
    /// The main thread stopped watching them for a moment (`Node::pause_main_reads`).
    main_paused: AtomicBool,
    /// Set with `main_paused`: the raft thread reads them all on its next turn (which comes
    /// at once) and clears it; the main thread watches them again only after that.
    main_missed: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock means a panic elsewhere already; the data is still consistent for our
    // simple guarded values, so keep serving rather than cascade the panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub fn is_leader(&self) -> bool {
        self.is_leader.load(Ordering::Acquire)
    }

    /// The leader this node knows, 0 for none.
    pub fn leader_id(&self) -> u64 {
        self.leader_id.load(Ordering::Acquire)
    }

    /// A ready leader whose read lease holds: a read may run on its data at once.
    pub fn holds_read_lease(&self) -> bool {
        self.lease.holds() && self.is_ready_leader()
    }

    /// Leader that has applied an entry of its own term: its data is current.
    pub fn is_ready_leader(&self) -> bool {
        self.is_leader()
            && self.applied.load(Ordering::Acquire)
                >= self.leader_ready_index.load(Ordering::Acquire)
    }

    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    /// Main thread: records that entries up to `index` are executed.
    pub fn set_applied(&self, index: u64) {
        let prev = self.applied.swap(index, Ordering::AcqRel);
        debug_assert!(index >= prev, "applied index went back: {prev} -> {index}");
    }

    pub fn status(&self) -> NodeStatus {
        lock(&self.status).clone()
    }

    /// The cluster this node belongs to (RedisRaft's dbid).
    pub fn cluster_id(&self) -> String {
        lock(&self.cluster_id).clone()
    }

    /// The membership and the index of the last change in it (a snapshot at an index at or
    /// after that one carries exactly this).
    pub fn membership(&self) -> (u64, SnapshotMembership) {
        lock(&self.membership).clone()
    }

    /// While this node's log cannot be written for lack of space: the error a write it would
    /// have to log gets (`-ERR raft log ...: No space left on device ...`).
    pub fn log_full(&self) -> Option<String> {
        if !self.is_log_full() {
            return None;
        }
        lock(&self.log_full).clone()
    }

    /// This node's log cannot be written for lack of space: it cannot apply entries others
    /// committed since, so it serves no read that must see them.
    pub fn is_log_full(&self) -> bool {
        self.log_full_flag.load(Ordering::Acquire)
    }

    fn set_log_full(&self, error: Option<String>) {
        let full = error.is_some();
        *lock(&self.log_full) = error;
        self.log_full_flag.store(full, Ordering::Release);
    }

    /// True once this node was removed from the cluster (it no longer takes part).
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    pub fn member(&self, id: u64) -> Option<Member> {
        lock(&self.members).get(&id).cloned()
    }

    pub fn members(&self) -> Vec<Member> {
        let mut v: Vec<Member> = lock(&self.members).values().cloned().collect();
        v.sort_by_key(|m| m.id);
        v
    }

    /// Main thread: a committed `NodeAddr` entry.
    pub fn set_member_addr(&self, id: u64, addr: &str) {
        if let Some(m) = lock(&self.members).get_mut(&id) {
            m.redis_addr = addr.to_string();
        }
    }

    /// Main thread: takes everything queued, and re-arms the waker.
    pub fn take_apply_items(&self) -> VecDeque<ApplyItem> {
        self.wake_pending.store(false, Ordering::Release);
        std::mem::take(&mut *lock(&self.apply_queue))
    }

    /// The raft thread takes a tagged proposal (see `taken`).
    fn note_taken(&self, tag: &ProposalTag) {
        self.taken.fetch_max(tag.request, Ordering::AcqRel);
    }

    fn taken(&self) -> u64 {
        self.taken.load(Ordering::Acquire)
    }

    fn push(&self, item: ApplyItem, waker: &Waker) {
        lock(&self.apply_queue).push_back(item);
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            waker();
        }
    }

    /// This node stops taking part in the cluster: removed from it (`failure` None) or
    /// stopped by a failure. Not leader, role stopped with the reason, the main thread told,
    /// the bus closed.
    fn stop(&self, failure: Option<String>, waker: &Waker, transport: &Transport) {
        let removed = failure.is_none();
        let taken = self.taken();
        let reason = failure
            .clone()
            .unwrap_or_else(|| "this node was removed from the cluster".into());
        if removed {
            self.removed.store(true, Ordering::Release);
        }
        self.is_leader.store(false, Ordering::Release);
        // It follows no leader either: nothing is redirected to one it no longer hears.
        self.leader_id.store(0, Ordering::Release);
        {
            let mut st = lock(&self.status);
            st.failure = Some(reason);
            st.role = Role::Stopped;
            st.leader_id = 0;
        }
        self.push(
            match failure {
                None => ApplyItem::Removed { taken },
                Some(msg) => ApplyItem::Stopped { msg, taken },
            },
            waker,
        );
        transport.shutdown();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    Storage(#[from] crate::storage::StorageError),
    #[error("{0}")]
    Transport(#[from] crate::transport::TransportError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("cannot start the raft thread: {0}")]
    Thread(std::io::Error),
    #[error("{0}")]
    Membership(String),
    #[error("snapshot: {0}")]
    Snapshot(String),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// Too many writes waiting for the raft thread.
    #[error("TRYAGAIN too many writes waiting for the raft log; retry")]
    Full,
    /// The raft thread is not running.
    #[error("ERR the raft node is stopped; see the server log")]
    Stopped,
}

/// A clean stop (Redis shutting down, or the raft thread's loop ending) writes what the log
/// still buffers: the commit indexes the last Readies left for the next write
/// (`LogStore::write_due`), so a restart applies all it had committed before it hears a
/// leader. `sync`, not `write`: a full log's deferred records may be buffered too, and must
/// not lose their fsync.
fn write_on_stop(store: &LogStore) {
    if let Err(e) = store.sync() {
        warn!("raft log: could not write the last commit index: {e}");
    }
}

/// The main thread's handle on the raft thread.
pub struct Node {
    shared: Arc<Shared>,
    store: LogStore,
    /// The snapshot the log started after when this process started (index 0: none): the
    /// main thread loads it before applying anything.
    pub snapshot_at_start: crate::storage::SnapshotMeta,
    pub snapshot_path: std::path::PathBuf,
    input: InputTx,
    transport: Arc<Transport>,
    /// The raft thread's state, taken (None) when its loop ends. The raft thread holds the
    /// lock while it runs a turn, not while it sleeps; the main thread takes it, when it is
    /// free, for a proposal batch or a read round (`submit`).
    core: Arc<Mutex<Option<RaftThread>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Node {
    /// Opens nothing itself: `store` is the already-opened log (so start-up errors about the
    /// log surface before any thread starts). Binds the bus and starts the raft thread.
    pub fn start(spec: NodeSpec, store: LogStore, waker: Waker) -> Result<Node, NodeError> {
        // First: everything below (raft-rs's applied index included) reads the log as
        // reconciled with the snapshot file.
        remove_unfinished_snapshots(&store, &spec.snapshot_path);
        reconcile_snapshot(&store, &spec.snapshot_path)?;
        let (book, book_index) = open_membership(&spec, &store)?;
        let cluster_id = book.cluster_id.clone();

        let bell = Bell::new().map_err(NodeError::Thread)?;
        let (in_tx, in_rx) = bounded(INBOUND_QUEUE_MAX);
        let transport = Arc::new(Transport::start(
            TransportConfig {
                node_id: spec.id,
                cluster_id: cluster_id.clone(),
                listen: spec.bus_listen,
                max_frame_bytes: 64 << 20,
                password: spec.cluster_password.clone(),
                snapshot_send: Some(spec.snapshot_path.clone()),
                snapshot_recv: Some(recv_path(&spec.snapshot_path)),
                tls: spec.tls.clone(),
                bell: Some(Arc::clone(&bell)),
            },
            in_tx,
        )?);
        let inbound_poll = transport.inbound_poll().ok_or_else(|| {
            NodeError::Thread(std::io::Error::other("the bus lends no connections"))
        })?;
        // The log's members, and the configured ones it does not know (a joining node
        // must answer its leader before its log names anyone).
        let mut members: HashMap<u64, Member> =
            spec.members.iter().map(|m| (m.id, m.clone())).collect();
        members.extend(book.members.iter().map(|(id, m)| (*id, m.clone())));
        connect_members(&transport, spec.id, members.values(), &book);

        let heartbeat_tick = 1;
        let election_tick = (spec.election_timeout_ms / spec.heartbeat_interval_ms).max(2) as usize;
        let cfg = raft::Config {
            id: spec.id,
            election_tick,
            heartbeat_tick,
            pre_vote: true,
            check_quorum: true,
            // Each process starts from an empty dataset, loads the snapshot the log starts
            // after (if any), and replays the rest of the log.
            applied: store.snapshot_meta().index,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            max_committed_size_per_ready: 16 << 20,
            // A follower learns a new commit index from the next append or heartbeat, not
            // from an extra message round per commit: under load the next batch carries it at
            // once; idle, the next heartbeat does (a read round's heartbeat too).
            skip_bcast_commit: true,
            // Every round is a quorum round; `raft.read-mode lease` builds its lease from
            // them (lease.rs) instead of raft-rs's LeaseBased, which trusts check-quorum.
            read_only_option: raft::ReadOnlyOption::Safe,
            ..Default::default()
        };
        cfg.validate()?;
        let logger = slog::Logger::root(tracing_slog::TracingSlogDrain, slog::o!());
        let store_handle = store.clone();
        let snapshot_at_start = store.snapshot_meta();
        let snapshot_path = spec.snapshot_path.clone();
        let raw = RawNode::new(&cfg, store.clone(), &logger)?;

        let shared = Arc::new(Shared {
            node_id: spec.id,
            taken: AtomicU64::new(0),
            is_leader: AtomicBool::new(false),
            leader_id: AtomicU64::new(0),
            leader_ready_index: AtomicU64::new(u64::MAX),
            applied: AtomicU64::new(0),
            wake_pending: AtomicBool::new(false),
            apply_queue: Mutex::new(VecDeque::new()),
            status: Mutex::new(NodeStatus::default()),
            members: Mutex::new(members),
            cluster_id: Mutex::new(cluster_id),
            removed: AtomicBool::new(false),
            leaving: AtomicBool::new(false),
            membership: Mutex::new((0, SnapshotMembership::default())),
            lease: LeaseDeadline::default(),
            log_full: Mutex::new(None),
            log_full_flag: AtomicBool::new(false),
            peers_generation: AtomicU64::new(0),
            main_paused: AtomicBool::new(false),
            main_missed: AtomicBool::new(false),
        });

        let (tx, rx) = bounded(PROPOSAL_QUEUE_MAX);
        let kicked = Arc::new(AtomicBool::new(false));
        let syncer = match Syncer::start(store.clone(), Arc::clone(&bell)) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!("could not start the log's fsync thread ({e}); the raft thread fsyncs the log itself");
                None
            }
        };
        let synced_bell = syncer
            .as_ref()
            .map_or_else(crossbeam_channel::never, |s| s.bell.clone());
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id()).rotate_left(32);
        let last_index = raw.raft.raft_log.last_index();
        let fsync = store.fsyncs();
        let worker = RaftThread {
            node: raw,
            store,
            transport: transport.clone(),
            shared: shared.clone(),
            waker,
            input: rx,
            inbound: in_rx,
            tick: Duration::from_millis(spec.heartbeat_interval_ms),
            election_ticks: election_tick as u64,
            next_tick: Instant::now(),
            beat: None,
            advertise_addr: spec.advertise_addr,
            was_leader_term: None,
            reads: HashMap::new(),
            read_timeout: Duration::from_millis(spec.election_timeout_ms),
            batches: Batches::default(),
            commit_sent: 0,
            commit_due: None,
            lease: spec.lease_reads.then(|| {
                Lease::new(
                    u32::try_from(election_tick).unwrap_or(u32::MAX),
                    Duration::from_millis(spec.heartbeat_interval_ms),
                )
            }),
            started: Instant::now(),
            transfer: None,
            book,
            book_index,
            leaving: None,
            snapshot_path: spec.snapshot_path.clone(),
            lost_log_warned: false,
            log_full: None,
            syncer,
            synced_bell,
            persisting: VecDeque::new(),
            synced: 0,
            incarnation,
            read_epoch: incarnation,
            stall_clock: StallClock::new(Instant::now()),
            early_election: None,
            leader_gone: None,
            halted: false,
            inline_failed: None,
            compaction: None,
            compact_next: VecDeque::new(),
            kick: Kick {
                bell: Arc::clone(&bell),
                kicked: Arc::clone(&kicked),
            },
            peers_in: inbound_poll,
            polled: Vec::new(),
            deferred: Vec::new(),
            main_reads: false,
            conf_in_log: last_index,
            fsync,
            on_main: false,
            conf_on_main: 0,
            peers_published: (0, false),
            sleep_until: Instant::now(),
        };
        worker.publish_status();
        worker.publish_membership(worker.book_index);
        let on_panic = (shared.clone(), worker.waker.clone(), transport.clone());
        let sleeper = Sleeper {
            poll: worker.peers_in.sleep(),
            watch: Vec::new(),
            ready: Vec::new(),
            input: worker.input.clone(),
            inbound: worker.inbound.clone(),
            synced: worker.synced_bell.clone(),
            kicked: Arc::clone(&kicked),
        };
        // Before any turn, on either thread (Node::submit).
        record_panic_locations();
        let core = Arc::new(Mutex::new(Some(worker)));
        if let Some(syncer) = lock(&core).as_ref().and_then(|t| t.syncer.as_ref()) {
            // Weak: the syncer belongs to what the lock guards.
            let weak = Arc::downgrade(&core);
            syncer.after_sync(Box::new(move || {
                let Some(core) = weak.upgrade() else {
                    return false;
                };
                let mut guard = match core.try_lock() {
                    Ok(g) => g,
                    // Poisoned: a turn panicked half-way; the raft thread stops the node.
                    Err(_) => return false,
                };
                guard.as_mut().is_some_and(|t| t.synced_here())
            }));
        }
        let thread_core = Arc::clone(&core);
        let thread = std::thread::Builder::new()
            .name("raft".into())
            .spawn(move || {
                // raft-rs panics on states it deems impossible; this node then stops taking
                // part, and says why, instead of vanishing silently.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run(&thread_core, sleeper)
                }));
                // Whatever ended the loop, the state goes with it: its channels close, so
                // the main thread's next send is refused rather than left unread.
                drop(lock(&thread_core).take());
                if let Err(p) = r {
                    let (why, at) = panic_cause(p.as_ref());
                    let (shared, waker, transport) = on_panic;
                    stop_after_panic(&shared, &waker, &transport, "the raft thread", &why, &at);
                }
            })
            .map_err(NodeError::Thread)?;
        Ok(Node {
            shared,
            store: store_handle,
            snapshot_at_start,
            snapshot_path,
            input: InputTx::new(tx, bell, kicked),
            transport,
            core,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Proposes a batch, on this thread if it can (`submit`), else through the raft
    /// thread (one channel send, one wake-up). On error the batch is handed back so its
    /// clients can be told.
    pub fn propose(&self, batch: Vec<Proposal>) -> Result<(), (ProposeError, Vec<Proposal>)> {
        match self.submit(Input::Propose(batch)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(Input::Propose(b))) => Err((ProposeError::Full, b)),
            Err(TrySendError::Disconnected(Input::Propose(b))) => Err((ProposeError::Stopped, b)),
            Err(_) => Err((ProposeError::Stopped, Vec::new())),
        }
    }

    /// The lock on the raft thread's state if it is free, for the main thread (poisoned or
    /// not: the raft thread leaves None behind a panic).
    fn try_core(&self) -> Option<MutexGuard<'_, Option<RaftThread>>> {
        match self.core.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// Runs a proposal batch or a read round on the calling (main) thread, as the raft
    /// thread's turn would handle it, when the raft thread is between turns (it holds the
    /// lock only while it runs one): appended, written and sent at once, without waking the
    /// raft thread on the way there. Only where that cannot need an fsync or deliver more
    /// than this batch's own entries: on a leader with its syncer, its log not full, no
    /// committed entry waiting to be delivered; and only with the channel empty (what was
    /// sent before goes first). Otherwise sends it to the raft thread.
    fn submit(&self, input: Input) -> Result<(), TrySendError<Input>> {
        if let Some(mut core) = self.try_core() {
            if let Some(t) = core.as_mut().filter(|t| t.can_run_inline()) {
                if t.run_input_now(input) {
                    self.input.kick();
                }
                return Ok(());
            }
        }
        self.input.try_send(input)
    }

    /// Asks the leader's raft thread for a membership change; a refusal comes back as
    /// `Refused`, success as the committed entry (tagged with `tag`).
    pub fn change_membership(
        &self,
        tag: ProposalTag,
        req: ChangeRequest,
    ) -> Result<(), ProposeError> {
        match self.input.try_send(Input::ChangeMembership(tag, req)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(ProposeError::Full),
            Err(TrySendError::Disconnected(_)) => Err(ProposeError::Stopped),
        }
    }

    /// A snapshot up to `index` is durable: the raft thread drops the entries it covers.
    pub fn compact(&self, index: u64) -> Result<(), ProposeError> {
        match self.input.try_send(Input::Compact(index)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(ProposeError::Full),
            Err(TrySendError::Disconnected(_)) => Err(ProposeError::Stopped),
        }
    }

    /// The term of the entry at `index` (a snapshot records it).
    pub fn term(&self, index: u64) -> Option<u64> {
        raft::Storage::term(&self.store, index).ok()
    }

    /// True (once) when the leader needs a newer snapshot to send to a follower.
    pub fn take_snapshot_wanted(&self) -> bool {
        self.store.take_snapshot_wanted()
    }

    /// Log statistics (size, snapshot position) as of now.
    pub fn log_stats(&self) -> crate::storage::LogStats {
        self.store.stats()
    }

    /// Asks the raft thread to hand leadership over; the result comes back as `TransferDone`.
    pub fn transfer_leader(&self, target: u64) -> Result<(), ProposeError> {
        match self.input.try_send(Input::TransferLeader(target)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(ProposeError::Full),
            Err(TrySendError::Disconnected(_)) => Err(ProposeError::Stopped),
        }
    }

    /// Starts a ReadIndex round; its result comes back as `ReadReady` or `ReadFailed`.
    pub fn read_index(&self, round: u64) -> Result<(), ProposeError> {
        match self.submit(Input::ReadIndex(round)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(ProposeError::Full),
            Err(TrySendError::Disconnected(_)) => Err(ProposeError::Stopped),
        }
    }

    pub fn set_fsync(&self, on: bool) {
        // Best effort: a full queue means the thread is busy; it keeps the previous setting.
        let _ = self.input.try_send(Input::SetFsync(on));
    }

    /// New election timeout and heartbeat interval (ms) at runtime; false if the raft
    /// thread's queue is full (the caller says to retry).
    pub fn set_timing(&self, election_ms: u64, heartbeat_ms: u64) -> bool {
        self.input
            .try_send(Input::SetTiming {
                election_ms,
                heartbeat_ms,
            })
            .is_ok()
    }

    /// Bounds the log's entry cache (`raft.log-max-cache-size`). Directly on the shared
    /// store, not through the raft thread's queue: the change is never dropped.
    /// `raft.log-max-file-size`: the log file preallocates no further than this.
    pub fn set_log_size_cap(&self, bytes: u64) {
        self.store.set_size_cap(bytes);
    }

    pub fn set_log_cache_max_bytes(&self, bytes: u64) {
        self.store.set_cache_max_bytes(bytes);
    }

    /// Tests only (`RAFT.DEBUG LOG-FAULT`): the log's next write or fsync fails as a failing
    /// or full disk would make it fail (None clears a full-disk fault).
    pub fn set_log_fault(&self, fault: Option<LogFault>) {
        self.store.set_fault(fault);
    }

    pub fn peers(&self) -> Vec<PeerStatus> {
        self.transport.peers()
    }

    /// Redis is shutting down: `write_on_stop`, between two raft turns (under the raft
    /// thread's lock), so it never takes records a Ready is about to write itself.
    pub fn write_log(&self) {
        let _between_turns = lock(&self.core);
        write_on_stop(&self.store);
    }

    /// Stops the raft thread and the bus (module unload / tests).
    pub fn stop(&self) {
        let _ = self.input.send(Input::Stop);
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
        self.transport.shutdown();
    }
}

struct RaftThread {
    node: RawNode<LogStore>,
    store: LogStore,
    transport: Arc<Transport>,
    shared: Arc<Shared>,
    waker: Waker,
    input: Receiver<Input>,
    inbound: Receiver<Vec<Message>>,
    /// One raft-rs tick. The election timeout is `election_ticks` ticks (fixed when the
    /// node starts: raft-rs cannot change it), so a new election timeout changes the tick.
    tick: Duration,
    /// When the next tick is due.
    next_tick: Instant,
    election_ticks: u64,
    /// A leader's heartbeat interval when shorter than a tick (raft-rs sends one per tick):
    /// the extra heartbeats are asked for in between.
    beat: Option<Duration>,
    advertise_addr: Option<String>,
    /// The term in which this node was last seen leading, while it still leads.
    was_leader_term: Option<u64>,
    /// Read rounds in flight: when last asked, and how many times.
    reads: HashMap<u64, (Instant, u32)>,
    /// A round not confirmed within this is asked again (a new leader, a lost message).
    read_timeout: Duration,
    /// The leader's read lease, with `raft.read-mode lease`.
    lease: Option<Lease>,
    /// When this raft thread started: votes are refused for an election timeout after.
    started: Instant,
    /// This node's proposal batches on their way to commit (latency stages).
    batches: Batches,
    /// The highest commit index this leader sent its followers, and when it must tell them
    /// a newer one if no append carried it by then (see `tell_commit`).
    commit_sent: u64,
    commit_due: Option<Instant>,
    /// A leadership transfer in progress: its target and when it gives up.
    transfer: Option<(u64, Instant)>,
    /// Distinguishes this process's read rounds from a previous one's (see `read_ctx`).
    incarnation: u64,
    /// The second word of our read rounds' context: the incarnation, changed after a stall
    /// so that nothing asked before it confirms a read (node/failover.rs).
    read_epoch: u64,
    /// Measures how long the raft thread went without running.
    stall_clock: StallClock,
    /// An election to start early: the leader's process is gone (node/failover.rs).
    early_election: Option<EarlyElection>,
    /// The term in which this node saw its leader's process gone: it votes at once then,
    /// even if it started less than an election timeout ago.
    leader_gone: Option<u64>,
    /// The members as of `book_index` (the last configuration change applied).
    book: MemberBook,
    book_index: u64,
    /// This node was removed: it stops at this instant (after handing over leadership).
    leaving: Option<Instant>,
    snapshot_path: std::path::PathBuf,
    lost_log_warned: bool,
    /// The log found the disk full: what raft-rs was handed unpersisted since.
    log_full: Option<LogFull>,
    /// The leader's fsyncs (node/syncer.rs); None if its thread could not start (then the
    /// raft thread fsyncs, as followers do).
    syncer: Option<Syncer>,
    /// Rung by the syncer after each fsync (`never` without one).
    synced_bell: Receiver<()>,
    /// Readies handed to raft-rs unpersisted while the syncer fsyncs them, oldest first.
    persisting: VecDeque<Persisting>,
    /// The highest Ready number the syncer reported durable.
    synced: u64,
    /// The raft thread's loop ended (or is ending): no more turns on the main thread.
    halted: bool,
    /// The main thread's turn (`run_input_now`) failed: the raft thread stops the node
    /// when it next takes the lock.
    inline_failed: Option<InlineFailure>,
    /// The log compaction running on its own thread (node/compaction.rs), and those asked
    /// while it runs, in order.
    compaction: Option<Compaction>,
    compact_next: VecDeque<u64>,
    /// Wakes this thread from another (a finished compaction).
    kick: Kick,
    /// The peer connections this node reads itself (after their handshake, on plain TCP),
    /// on this thread or, on a leader, the main thread (main_read.rs).
    peers_in: InboundPoll,
    /// What they delivered this turn (kept for its allocation).
    polled: Vec<Message>,
    /// Read on the main thread but left for this thread to step, in order (main_read.rs).
    deferred: Vec<Message>,
    /// The main thread reads the peer connections it watches (main_read.rs).
    main_reads: bool,
    /// The last index of the log that may hold a membership change (none of a follower's
    /// entries past what it applied may, for its main thread to step messages: main_read.rs).
    /// From the log's end at start, then each written membership change's index.
    conf_in_log: u64,
    /// Whether the log is fsynced (`raft.log-fsync`), as the store has it: kept here too
    /// because asking the store takes its writer lock, which a compaction holds through an
    /// fsync, and main_read.rs asks on the main thread.
    fsync: bool,
    /// The main thread is running this state's work now (`on_main_thread`).
    on_main: bool,
    /// Membership changes applied while `on_main`: never, by the guards of main_read.rs
    /// (counted and logged if one ever did; the tests check it stays 0).
    conf_on_main: u64,
    /// What `Shared::peers_generation` last said, as (connections' generation, main_reads).
    peers_published: (u64, bool),
    /// Until when this thread sleeps (its next timer), while it does.
    sleep_until: Instant,
}

thread_local! {
    /// Where the last panic on this thread happened (file:line), for the raft thread's log line.
    pub(super) static PANIC_AT: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// A caught panic's message and where it happened on this thread (record_panic_locations).
fn panic_cause(p: &(dyn std::any::Any + Send)) -> (String, String) {
    let why = p
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into());
    let at = PANIC_AT.with(|a| a.borrow_mut().take()).unwrap_or_default();
    (why, at)
}

/// Stops the node after a panic in `whose` code (raft-rs panics on states it deems
/// impossible): it says why instead of vanishing silently.
fn stop_after_panic(
    shared: &Shared,
    waker: &Waker,
    transport: &Transport,
    whose: &str,
    why: &str,
    at: &str,
) {
    if shared.leaving.load(Ordering::Acquire) {
        // raft-rs keeps a few code paths that assume this node is in the configuration;
        // after its own removal that no longer holds. The node was leaving anyway: finish
        // leaving.
        warn!("after this node's removal {whose} stopped ({why} at {at}); the node has left the cluster");
        shared.stop(None, waker, transport);
        return;
    }
    let msg = format!("{whose} stopped on an internal error ({why} at {at}); this node no longer takes part in the cluster (its data is intact); restart it");
    error!("{msg}");
    shared.stop(Some(msg), waker, transport);
}

/// What ended the main thread's turn (`RaftThread::run_input_now`), for the raft thread to
/// act on: stopping the node joins the bus's threads, which the main thread must not wait
/// for.
enum InlineFailure {
    Error(NodeError),
    Panic { why: String, at: String },
}

/// A read round is asked this many times before its clients get -TIMEOUT.
const READ_TRIES_MAX: u32 = 3;

/// `ReadState.request_ctx` of our rounds: node id, read epoch (this process's incarnation,
/// changed after a stall), round. Rounds forwarded to the leader from several followers
/// never collide, and neither do the rounds of a restarted node (which count from 1 again)
/// with requests its previous process left pending at the leader: such an answer carries an
/// index from before the new read began.
fn read_ctx(node_id: u64, epoch: u64, round: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(24);
    v.extend_from_slice(&node_id.to_le_bytes());
    v.extend_from_slice(&epoch.to_le_bytes());
    v.extend_from_slice(&round.to_le_bytes());
    v
}

fn parse_read_ctx(b: &[u8]) -> Option<(u64, u64, u64)> {
    let word = |i: usize| -> Option<u64> {
        Some(u64::from_le_bytes(
            b.get(i * 8..i * 8 + 8)?.try_into().ok()?,
        ))
    };
    Some((word(0)?, word(1)?, word(2)?))
}

/// Where the raft thread sleeps, outside the lock on its state: the peer connections it
/// reads itself and its bell (wait.rs), and the channels whose contents wake it at once.
struct Sleeper {
    poll: PollSleep,
    /// The peer connections to watch (`RaftThread::fill_watch`, at the end of each turn).
    watch: Vec<RawFd>,
    /// Those found readable or closed, for the next turn to read.
    ready: Vec<RawFd>,
    input: Receiver<Input>,
    inbound: Receiver<Vec<Message>>,
    synced: Receiver<()>,
    /// Set by the main thread after its own turn when the raft thread should take one
    /// (`InputTx::kick`): a wake-up with nothing in the channels.
    kicked: Arc<AtomicBool>,
}

/// The raft thread's loop: under the lock, a turn after each sleep (`start` before the
/// first) and the time of the next wake-up; then the sleep, without it. Until a turn says
/// stop or the main thread's turn failed.
fn run(core: &Mutex<Option<RaftThread>>, mut sleeper: Sleeper) {
    let mut next_beat = Instant::now();
    // When the last sleep began, and how long it was to last.
    let mut slept: Option<(Instant, Duration)> = None;
    loop {
        let mut guard = lock(core);
        let Some(t) = guard.as_mut() else { return };
        if !t.may_go_on() {
            return;
        }
        match slept {
            None => t.start(),
            Some((asleep, timeout)) => {
                if !t.turn(asleep, timeout, &sleeper.ready, &mut next_beat) {
                    // Before the lock is let go: the main thread must not take a turn now.
                    t.halted = true;
                    return;
                }
            }
        }
        sleeper.ready.clear();
        t.fill_watch(&mut sleeper.watch);
        let asleep = Instant::now();
        t.sleep_until = t.next_wake(next_beat);
        let timeout = t.sleep_until.saturating_duration_since(asleep);
        drop(guard);
        sleeper.wait(timeout);
        slept = Some((asleep, timeout));
    }
}

impl RaftThread {
    /// Before the first turn.
    fn start(&mut self) {
        // The only voter (a cluster just founded with RAFT.CLUSTER INIT, or restarted alone)
        // need not wait an election timeout for a vote only it casts.
        let voters = self.node.raft.prs().conf().voters().ids();
        if voters.len() == 1
            && voters.contains(self.shared.node_id)
            && self.node.raft.state != StateRole::Leader
        {
            if let Err(e) = self.node.campaign() {
                warn!("could not start an election at once: {e}");
            }
        }
        self.next_tick = Instant::now() + self.tick;
        self.stall_clock = StallClock::new(Instant::now());
    }

    /// When the raft thread must wake even if nothing arrives.
    fn next_wake(&self, next_beat: Instant) -> Instant {
        let next_tick = self.next_tick;
        let mut wake = match self.beat {
            Some(_) if self.was_leader_term.is_some() => next_tick.min(next_beat),
            _ => next_tick,
        };
        if let Some(due) = self.commit_due {
            wake = wake.min(due);
        }
        if let Some(e) = self.early_election {
            wake = wake.min(e.at);
        }
        if let Some(full) = &self.log_full {
            wake = wake.min(full.next_try);
        }
        wake
    }

    /// The main thread's proposal batch or read round, run on the main thread while it
    /// holds the lock (`Node::submit`): handled and its Ready written and sent as in the
    /// raft thread's own turn. Returns whether the raft thread should take a turn soon
    /// (raft-rs has more to do, or this stopped the node).
    fn run_input_now(&mut self, input: Input) -> bool {
        self.on_main_thread(|t| {
            // Neither a proposal batch nor a read round asks to stop.
            let _ = t.on_input(input);
            t.on_ready()?;
            Ok(t.node.has_ready())
        })
    }

    /// Runs `f` (the main thread's work under the lock), which says whether the raft
    /// thread should take a turn soon; a failure or a panic is left to the raft thread
    /// (`inline_failed`), which stops the node when it next takes the lock.
    fn on_main_thread(&mut self, f: impl FnOnce(&mut Self) -> Result<bool, NodeError>) -> bool {
        self.on_main = true;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self)));
        self.on_main = false;
        match r {
            Ok(Ok(kick)) => kick,
            Ok(Err(e)) => {
                self.inline_failed = Some(InlineFailure::Error(e));
                true
            }
            Err(p) => {
                let (why, at) = panic_cause(p.as_ref());
                self.inline_failed = Some(InlineFailure::Panic { why, at });
                true
            }
        }
    }

    /// Whether another thread may take a leader's turn at all (`can_run_inline`,
    /// `synced_here`): running, no failed turn waiting to stop the node, a leader whose
    /// fsyncs its syncer does.
    fn leads_off_thread(&self) -> bool {
        !self.halted
            && self.inline_failed.is_none()
            && self.node.raft.state == StateRole::Leader
            && self.syncer.is_some()
    }

    /// See `Node::submit`.
    fn can_run_inline(&self) -> bool {
        let r = &self.node.raft;
        self.leads_off_thread()
            && self.log_full.is_none()
            // Nothing committed (and persisted here) waits to be delivered: the turn
            // delivers no entry but the batch's own (a one-node cluster's).
            && !r.raft_log.has_next_entries()
            && self.input.is_empty()
    }

    /// Called by the raft thread whenever it takes the lock: false if the loop must end
    /// (halted before, or the main thread's turn failed: the node is stopped here).
    fn may_go_on(&mut self) -> bool {
        if self.halted {
            return false;
        }
        let Some(failure) = self.inline_failed.take() else {
            return true;
        };
        self.halted = true;
        match failure {
            InlineFailure::Error(e) => self.stop_on_error(e),
            InlineFailure::Panic { why, at } => stop_after_panic(
                &self.shared,
                &self.waker,
                &self.transport,
                "a raft turn taken off the raft thread (main or fsync thread)",
                &why,
                &at,
            ),
        }
        false
    }

    /// One turn of the raft thread, after its sleep. Returns false to stop.
    fn turn(
        &mut self,
        asleep: Instant,
        timeout: Duration,
        ready: &[RawFd],
        next_beat: &mut Instant,
    ) -> bool {
        let _ = self.synced_bell.try_recv();
        self.finish_compaction();
        let stall = self.stall_clock.woke(asleep, timeout, Instant::now());
        if stall > self.read_timeout {
            self.after_stall(stall);
        }
        if let Err(e) = self.take_synced() {
            self.stop_on_error(e);
            return false;
        }
        let mut stop = false;
        let mut dropped = Vec::new();
        for _ in 0..DRAIN_MAX {
            match self.input.try_recv() {
                Ok(Input::Propose(batch)) => self.propose_batch(batch, &mut dropped),
                Ok(i) => stop |= self.on_input(i),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    stop = true;
                    break;
                }
            }
        }
        // Peers' messages, each connection's in the order it delivered them:
        // - what the main thread read and left here (main_read.rs), first: a connection it
        //   handed back since forwards what followed through the channel;
        // - connections readers lent (taken before the channel is drained: a reader
        //   forwards what came before it lends a connection, and that is in the channel
        //   by now), whose readers' last messages come after the channel;
        // - the channel;
        // - what the connections hold now.
        let deferred = std::mem::take(&mut self.deferred);
        for m in deferred {
            self.on_message(m);
        }
        let mut polled = std::mem::take(&mut self.polled);
        self.peers_in.adopt(&mut polled);
        for _ in 0..DRAIN_MAX {
            match self.inbound.try_recv() {
                Ok(batch) => {
                    for m in batch {
                        self.on_message(m);
                    }
                }
                Err(_) => break,
            }
        }
        // Set by a main thread that could not read them (main_read.rs), reader or not.
        let missed = self.shared.main_missed.swap(false, Ordering::AcqRel);
        if self.main_reads || missed {
            // The main thread watches them; whatever it has not read yet is taken here (a
            // read that finds nothing costs little).
            self.peers_in.read_all(&mut polled);
        } else {
            self.peers_in.read_ready(ready, &mut polled);
        }
        for m in polled.drain(..) {
            self.on_message(m);
        }
        self.polled = polled;
        if !dropped.is_empty() {
            self.shared.push(ApplyItem::Dropped(dropped), &self.waker);
        }
        if stop {
            write_on_stop(&self.store);
            return false;
        }
        let now = Instant::now();
        if now >= self.next_tick {
            self.retry_reads(now);
            self.node.tick();
            self.next_tick += self.tick;
            if self.next_tick < now {
                self.next_tick = now + self.tick;
            }
        }
        if let Some(beat) = self.beat {
            if now >= *next_beat {
                *next_beat = now + beat;
                if self.node.raft.state == StateRole::Leader {
                    let mut m = Message::default();
                    m.set_msg_type(raft::eraftpb::MessageType::MsgBeat);
                    m.from = self.shared.node_id;
                    // A local message: raft-rs's leader broadcasts heartbeats.
                    if let Err(e) = self.node.raft.step(m) {
                        warn!("could not send a heartbeat: {e}");
                    }
                }
            }
        }
        self.early_election(now);
        self.look_after_lease(now);
        self.tell_commit(now);
        if let Err(e) = self.retry_full_log(now).and_then(|()| self.on_ready()) {
            self.stop_on_error(e);
            return false;
        }
        self.track_leadership();
        self.track_transfer();
        self.promote_learners();
        self.publish_status();
        self.choose_reader();
        let told = self.leaving.is_none() && self.transport.told_removed();
        if told {
            warn!("a peer says this node was removed from the cluster; it stops taking part in it");
        }
        if told {
            // Remember it across restarts, as if this node had applied its removal.
            self.book.members.remove(&self.shared.node_id);
            self.book.used_ids.insert(self.shared.node_id);
            let stored = StoredMembership {
                me: self.shared.node_id,
                book: self.book.clone(),
                hints: Vec::new(),
            };
            let cs = self.node.raft.prs().conf().to_conf_state();
            let saved = self
                .store
                .set_membership(self.book_index, &cs, &encode(&stored))
                .and_then(|()| self.store.sync());
            if let Err(e) = saved {
                error!("could not record this node's removal in the raft log: {e}");
            }
        }
        if told || self.leaving.is_some_and(|at| Instant::now() >= at) {
            self.shared.stop(None, &self.waker, &self.transport);
            return false;
        }
        true
    }

    /// Returns true to stop.
    fn on_input(&mut self, i: Input) -> bool {
        match i {
            Input::SetTiming {
                election_ms,
                heartbeat_ms,
            } => {
                let tick_ms = (election_ms / self.election_ticks).max(1);
                let beat =
                    (heartbeat_ms < tick_ms).then(|| Duration::from_millis(heartbeat_ms.max(1)));
                if self.tick == Duration::from_millis(tick_ms) && self.beat == beat {
                    return false;
                }
                self.tick = Duration::from_millis(tick_ms);
                // A shorter tick starts now, not after the old, longer one.
                self.next_tick = self.next_tick.min(Instant::now() + self.tick);
                self.read_timeout = Duration::from_millis(election_ms);
                self.beat = beat;
                info!(
                    "timing changed: election timeout {election_ms} ms ({} ticks of {tick_ms} ms), heartbeats every {} ms",
                    self.election_ticks,
                    heartbeat_ms.min(tick_ms)
                );
                false
            }
            Input::Propose(batch) => {
                let mut dropped = Vec::new();
                self.propose_batch(batch, &mut dropped);
                if !dropped.is_empty() {
                    self.shared.push(ApplyItem::Dropped(dropped), &self.waker);
                }
                false
            }
            Input::ReadIndex(round) if self.leaving.is_some() => {
                self.shared.push(
                    ApplyItem::ReadFailed {
                        rounds: vec![round],
                        error: NO_QUORUM_FOR_READ.into(),
                    },
                    &self.waker,
                );
                false
            }
            Input::ReadIndex(round) => {
                tracing::debug!(
                    "read round {round}: asked as {:?} at term {}, commit {}",
                    self.node.raft.state,
                    self.node.raft.term,
                    self.node.raft.raft_log.committed
                );
                self.reads.insert(round, (Instant::now(), 1));
                self.node
                    .read_index(read_ctx(self.shared.node_id, self.read_epoch, round));
                false
            }
            Input::TransferLeader(target) => {
                self.start_transfer(target);
                false
            }
            Input::ChangeMembership(tag, ChangeRequest::Add { member })
                if self.node.raft.state == StateRole::Leader
                    && self.book.members.get(&member.id) == Some(&member) =>
            {
                self.shared.note_taken(&tag);
                self.shared
                    .push(ApplyItem::AlreadyMember { tag, id: member.id }, &self.waker);
                false
            }
            Input::ChangeMembership(tag, req) => {
                self.shared.note_taken(&tag);
                if let Err(error) = self.change_membership(tag, req) {
                    self.shared
                        .push(ApplyItem::Refused { tag, error }, &self.waker);
                }
                false
            }
            Input::Compact(index) => {
                self.start_compaction(index);
                false
            }
            Input::SetFsync(on) => {
                self.store.set_fsync(on);
                self.fsync = on;
                false
            }
            Input::Stop => true,
        }
    }

    /// raft-rs accepted the leader's snapshot: its file (checked and fsynced by the
    /// transport) becomes this node's snapshot, the log restarts after it, the membership is
    /// the snapshot's, and the main thread replaces the dataset with it.
    fn install_snapshot(&mut self, snap: &raft::eraftpb::Snapshot) -> Result<(), NodeError> {
        let md = snap.get_metadata();
        let recv = recv_path(&self.snapshot_path);
        let summary = crate::snapshot::format::inspect(&recv)
            .map_err(|e| NodeError::Snapshot(format!("the received snapshot is unusable: {e}")))?;
        if summary.header.index != md.index || summary.header.term != md.term {
            return Err(NodeError::Snapshot(format!(
                "the received snapshot file is at index {} term {}, raft expects index {} term {}",
                summary.header.index, summary.header.term, md.index, md.term
            )));
        }
        let m: SnapshotMembership = decode(&summary.header.meta).map_err(|e| {
            NodeError::Snapshot(format!(
                "the received snapshot's membership is unreadable: {e}"
            ))
        })?;
        self.book = m.book;
        self.book_index = md.index;
        let stored = StoredMembership {
            me: self.shared.node_id,
            book: self.book.clone(),
            hints: Vec::new(),
        };
        self.store.apply_snapshot(
            crate::storage::SnapshotMeta {
                index: md.index,
                term: md.term,
                conf_state: md.get_conf_state().clone(),
            },
            (md.index, &encode(&stored)),
        )?;
        // After the log: a crash in between leaves the received file, which a restart moves
        // into place (reconcile_snapshot).
        test_fault("kill-before-snapshot-move");
        std::fs::rename(&recv, &self.snapshot_path).map_err(|e| {
            NodeError::Snapshot(format!(
                "cannot move {} to {}: {e}",
                recv.display(),
                self.snapshot_path.display()
            ))
        })?;
        *lock(&self.shared.members) = self.book.members.clone().into_iter().collect();
        connect_members(
            &self.transport,
            self.shared.node_id,
            self.book.members.values(),
            &self.book,
        );
        *lock(&self.shared.cluster_id) = self.book.cluster_id.clone();
        self.publish_membership(md.index);
        info!(
            "installing the leader's snapshot at index {} (term {}, {} keys, {} bytes)",
            md.index, md.term, summary.keys, summary.bytes
        );
        self.shared.push(
            ApplyItem::InstallSnapshot {
                index: md.index,
                path: self.snapshot_path.clone(),
            },
            &self.waker,
        );
        Ok(())
    }

    /// Asks again for rounds not confirmed in time; gives up on them after a few tries.
    fn retry_reads(&mut self, now: Instant) {
        if self.reads.is_empty() {
            return;
        }
        if self.leaving.is_some() {
            // Removed: nothing is asked of raft-rs any more.
            let rounds: Vec<u64> = self.reads.drain().map(|(r, _)| r).collect();
            self.shared.push(
                ApplyItem::ReadFailed {
                    rounds,
                    error: NO_QUORUM_FOR_READ.into(),
                },
                &self.waker,
            );
            return;
        }
        let mut failed = Vec::new();
        let me = self.shared.node_id;
        for (round, (asked, tries)) in self.reads.iter_mut() {
            if now.duration_since(*asked) < self.read_timeout {
                continue;
            }
            if *tries >= READ_TRIES_MAX {
                failed.push(*round);
            } else {
                tracing::debug!(
                    "read round {round}: asked again as {:?} at term {}",
                    self.node.raft.state,
                    self.node.raft.term
                );
                *asked = now;
                *tries += 1;
                self.node.read_index(read_ctx(me, self.read_epoch, *round));
            }
        }
        if !failed.is_empty() {
            for r in &failed {
                self.reads.remove(r);
            }
            self.shared.push(
                ApplyItem::ReadFailed {
                    rounds: failed,
                    error: NO_QUORUM_FOR_READ.into(),
                },
                &self.waker,
            );
        }
    }

    /// One event-loop turn's writes.
    fn propose_batch(&mut self, batch: Vec<Proposal>, dropped: &mut Vec<ProposalTag>) {
        let taken = Instant::now();
        let before = self.node.raft.raft_log.last_index();
        for (tag, data) in batch {
            self.propose(tag, data, dropped);
        }
        if self.node.raft.state == StateRole::Leader {
            self.batches
                .proposed(before, self.node.raft.raft_log.last_index(), taken);
        }
    }

    fn propose(&mut self, tag: ProposalTag, data: Vec<u8>, dropped: &mut Vec<ProposalTag>) {
        self.shared.note_taken(&tag);
        // A leader that applied its own removal is no longer in its configuration: raft-rs
        // cannot append for it (it would abort), and it is about to step down anyway. One
        // whose log is full could not persist it (the main thread says why: redirect_error).
        if self.node.raft.state != StateRole::Leader
            || self.leaving.is_some()
            || self.log_full.is_some()
        {
            dropped.push(tag);
            return;
        }
        if self.node.propose(tag.encode(), data).is_err() {
            dropped.push(tag);
        }
    }

    fn on_message(&mut self, mut m: Message) {
        if matches!(
            m.get_msg_type(),
            raft::eraftpb::MessageType::MsgRequestVote
                | raft::eraftpb::MessageType::MsgRequestPreVote
        ) && m.term > self.node.raft.term
            && m.context != raft::CAMPAIGN_TRANSFER
            && self.started.elapsed() < self.read_timeout
            && self.leader_gone != Some(self.node.raft.term)
        {
            // Just started: this node does not know whom it last heard from, and a leader
            // may hold a read lease counting on it; it votes after an election timeout, as
            // a follower that had just heard from a leader would (node/lease.rs).
            tracing::debug!(
                "vote request from node {} for term {} ignored: this node started less than an election timeout ago",
                m.from,
                m.term
            );
            return;
        }
        if self.log_full.is_some()
            && matches!(
                m.get_msg_type(),
                raft::eraftpb::MessageType::MsgAppend | raft::eraftpb::MessageType::MsgSnapshot
            )
        {
            // Could not be written: dropped as a network would drop it, so memory does not
            // grow with the leader's writes. The leader sends them again once this node
            // answers (heartbeat responses go on: they claim nothing about the log).
            return;
        }
        if let Some(report) = Report::of(&m) {
            self.on_report(report);
            return;
        }
        if m.get_msg_type() == raft::eraftpb::MessageType::MsgHeartbeat
            && m.commit > self.node.raft.raft_log.last_index()
        {
            let claimed = m.commit;
            // The leader remembers this node holding more than its log has (the log was moved
            // aside or lost). raft-rs would abort on such a commit index; keep ours and let
            // the leader find out from our replies (it then sends entries or a snapshot).
            if !self.lost_log_warned {
                self.lost_log_warned = true;
                warn!(
                    "the leader believes this node holds entries up to {} but its log ends at {} (was the log moved aside?); catching up from the leader",
                    m.commit,
                    self.node.raft.raft_log.last_index()
                );
            }
            m.commit = self.node.raft.raft_log.committed;
            // An idle leader would never find out (it only sends heartbeats to a follower it
            // thinks is up to date): answer as if its last append was refused, which makes it
            // probe back to our log's end and send entries or a snapshot from there.
            let mut refused = Message::default();
            refused.set_msg_type(raft::eraftpb::MessageType::MsgAppendResponse);
            refused.from = self.shared.node_id;
            refused.to = m.from;
            refused.term = m.term;
            refused.index = claimed;
            refused.reject = true;
            refused.reject_hint = self.node.raft.raft_log.last_index();
            self.transport.send(vec![refused]);
        }
        if let Err(e) = self.node.step(m) {
            // Stale or unknown-peer messages are normal around restarts.
            tracing::debug!("raft message ignored: {e}");
        }
    }

    /// The raft thread cannot go on: this node stops taking part (no votes, no
    /// acknowledgements, no entries), every waiting client gets the reason, the bus closes.
    fn stop_on_error(&self, e: NodeError) {
        let msg = match &e {
            NodeError::Storage(se) => {
                // The fsync that failed on the syncer may first be met by a later write (on
                // either thread): name that fsync.
                let cause = se.first_failure();
                let msg = format!("{cause}; this node stopped taking part in the cluster and acknowledges nothing it could not persist (the log is not written again: after a failed write or fsync its contents are suspect); check the disk, then restart the node");
                lock(&self.shared.status).log_failed = Some(cause);
                msg
            }
            other => format!(
                "the raft thread stopped: {other}; this node no longer takes part in the cluster; restart it"
            ),
        };
        error!("{msg}");
        self.shared.set_log_full(None);
        self.shared.stop(Some(msg), &self.waker, &self.transport);
    }

    fn leader_state(&self) -> LeaderState {
        let r = &self.node.raft;
        LeaderState {
            // raft-rs drops a read round asked before the leader committed in its term.
            leader: r.state == StateRole::Leader && r.commit_to_current_term(),
            term: r.term,
            handing_over: r.lead_transferee.is_some() || self.leaving.is_some(),
        }
    }

    /// Leadership is about to be handed over: the read lease ends first.
    /// What the transport says about a peer's link.
    fn on_report(&mut self, report: Report) {
        let r = &self.node.raft;
        let my_leader_gone = |id: u64| {
            self.lease.is_none()
                && r.state == StateRole::Follower
                && r.leader_id == id
                && self.leaving.is_none()
        };
        match report {
            Report::Lost(id) => self.node.report_unreachable(id),
            Report::Snapshot { peer, ok } => {
                let status = if ok {
                    raft::SnapshotStatus::Finish
                } else {
                    raft::SnapshotStatus::Failure
                };
                self.node.report_snapshot(peer, status);
            }
            // Is its process gone? Our own connection to it says (`Refused`).
            Report::InboundClosed(id) if my_leader_gone(id) => self.transport.check_link(id),
            Report::InboundClosed(_) => {}
            Report::Refused(id) if my_leader_gone(id) => {
                let voters = r.prs().conf().voters().ids();
                let Some(turn) = failover::turn(voters.iter(), self.shared.node_id, id) else {
                    return;
                };
                let term = r.term;
                info!(
                    "the leader, node {id}, refuses bus connections after closing its own: its process looks gone; electing a new leader without waiting out the election timeout (this node's turn: {turn})"
                );
                // Without a leader this node grants the others' (pre-)votes at once.
                self.node.raft.become_follower(term, raft::INVALID_ID);
                self.leader_gone = Some(term);
                let at = Instant::now() + failover::TURN * turn;
                let election_timeout = self
                    .tick
                    .saturating_mul(u32::try_from(self.election_ticks).unwrap_or(u32::MAX));
                self.early_election = Some(EarlyElection {
                    at,
                    term,
                    retry_until: at + election_timeout,
                    retries: 0,
                });
            }
            Report::Refused(_) => {}
        }
    }

    /// Campaigns when this node's turn for an early election comes and there is still no
    /// leader (node/failover.rs).
    fn early_election(&mut self, now: Instant) {
        let Some(e) = self.early_election else {
            return;
        };
        let r = &self.node.raft;
        if r.term != e.term || r.leader_id != raft::INVALID_ID || r.state == StateRole::Leader {
            // An election ran, or a leader spoke.
            self.early_election = None;
            return;
        }
        if now < e.at {
            return;
        }
        // A pre-candidate asks again: a voter that had not yet seen the leader go ignored
        // its request (failover.rs).
        if !matches!(r.state, StateRole::Follower | StateRole::PreCandidate) {
            self.early_election = None;
            return;
        }
        if e.retries == 0 {
            info!("no leader since the last one's process went away: starting an election");
        } else {
            tracing::debug!("still no leader: asking the other voters for their votes again");
        }
        if let Err(e) = self.node.campaign() {
            warn!("could not start an election: {e}");
        }
        // Twice as long each time: a voter that did not notice within the first few tries
        // gets its own turn anyway, and a node that cannot win (its log is behind, or it is
        // alone) asks a few times, not a hundred.
        let next = now + failover::RETRY.saturating_mul(1 << e.retries.min(16));
        self.early_election = (next < e.retry_until).then_some(EarlyElection {
            at: next,
            retries: e.retries + 1,
            ..e
        });
    }

    /// The raft thread did not run for `stall`, longer than an election timeout: no read
    /// answered from now on may count on anything from before (node/failover.rs).
    fn after_stall(&mut self, stall: Duration) {
        warn!(
            "the raft thread did not run for {} ms (the process was paused, a long fork, a stalled machine or a slow disk?); read rounds are asked again and the read lease is dropped",
            stall.as_millis()
        );
        if let Some(lease) = self.lease.as_mut() {
            lease.restart(&self.shared.lease);
        }
        // Confirmations of what was asked before carry the old epoch and are ignored.
        self.read_epoch = self.read_epoch.wrapping_add(1);
        let now = Instant::now();
        let me = self.shared.node_id;
        for (round, (asked, _)) in self.reads.iter_mut() {
            *asked = now;
            self.node.read_index(read_ctx(me, self.read_epoch, *round));
        }
    }

    fn give_up_lease(&mut self) {
        let term = self.node.raft.term;
        if let Some(lease) = self.lease.as_mut() {
            lease.give_up(term, &self.shared.lease);
        }
    }

    /// Gives the read lease up or renews it; runs each turn before its messages leave.
    fn look_after_lease(&mut self, now: Instant) {
        let st = self.leader_state();
        let Some(lease) = self.lease.as_mut() else {
            return;
        };
        if let Some(round) = lease.look_after(&st, &self.shared.lease, now, self.read_timeout) {
            tracing::trace!("read lease: round {} asked", round & !LEASE_ROUND);
            self.node
                .read_index(read_ctx(self.shared.node_id, self.read_epoch, round));
        }
    }

    fn track_leadership(&mut self) {
        let r = &self.node.raft;
        let leading = r.state == StateRole::Leader;
        match (self.was_leader_term, leading) {
            (None, true) => {
                self.was_leader_term = Some(r.term);
                // raft-rs appended an empty entry of this term on becoming leader.
                self.shared
                    .leader_ready_index
                    .store(r.raft_log.last_index(), Ordering::Release);
                self.shared.is_leader.store(true, Ordering::Release);
                info!("this node is now the leader (term {})", r.term);
                self.announce_addr();
            }
            (Some(t), true) if t == r.term => {}
            (Some(_), _) => {
                self.was_leader_term = None;
                self.batches = Batches::default();
                self.shared.is_leader.store(false, Ordering::Release);
                self.shared
                    .leader_ready_index
                    .store(u64::MAX, Ordering::Release);
                self.shared.push(
                    ApplyItem::LeadershipLost {
                        taken: self.shared.taken(),
                    },
                    &self.waker,
                );
                info!(
                    "this node is no longer the leader (term {}, leader {})",
                    r.term, r.leader_id
                );
                // A new term as leader again is handled at the next turn.
            }
            (None, false) => {}
        }
    }

    /// A leader with a `raft.addr` replicates it on every election, so every node's -MOVED
    /// names it (the others only know the address in its `raft.cluster-nodes` entry).
    fn announce_addr(&mut self) {
        let Some(addr) = self.advertise_addr.clone() else {
            return;
        };
        let data = encode_command(&LogCommand::NodeAddr {
            id: self.shared.node_id,
            addr,
        });
        let tag = ProposalTag {
            node_id: self.shared.node_id,
            incarnation: 0,
            request: 0,
        };
        if let Err(e) = self.node.propose(tag.encode(), data) {
            warn!("could not replicate raft.addr: {e}");
        }
    }

    fn publish_status(&self) {
        let r = &self.node.raft;
        self.shared.leader_id.store(r.leader_id, Ordering::Release);
        let st = NodeStatus {
            role: Role::from(r.state),
            term: r.term,
            leader_id: r.leader_id,
            voted_for: r.vote,
            commit_index: r.raft_log.committed,
            last_index: r.raft_log.last_index(),
            voters: r.prs().conf().voters().ids().iter().collect(),
            learners: r.prs().conf().learners().iter().copied().collect(),
            // Replication progress is known only to the leader.
            progress: if r.state == StateRole::Leader {
                r.prs()
                    .iter()
                    .map(|(id, p)| (*id, p.matched, p.next_idx))
                    .collect()
            } else {
                Vec::new()
            },
            log: self.store.stats(),
            failure: None,
            log_full: self.log_full.as_ref().map(|f| f.error.clone()),
            log_failed: None,
        };
        *lock(&self.shared.status) = st;
    }
}

#[cfg(test)]
mod tests;
