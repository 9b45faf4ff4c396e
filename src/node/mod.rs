//! The raft thread: owns raft-rs's `RawNode` and the log, drives it with proposals, peer
//! messages and ticks, and hands committed entries to the Redis main thread.
//!
//! Invariant: this module never calls the Redis module API. It talks to the main thread only
//! through `Shared` (atomics, the apply queue) and the `Waker` the main thread gave it.

mod batches;
mod failover;
mod lease;
mod status;
mod syncer;
mod wait;

pub use lease::LeaseDeadline;
pub use status::{NodeStatus, Role};

use batches::Batches;
use failover::{EarlyElection, StallClock};
use lease::{LeaderState, Lease, LEASE_ROUND};
use syncer::{Synced, Syncer};
use wait::InputTx;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, TryRecvError, TrySendError};
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry, EntryType, Message,
};
use raft::prelude::ConfState;
use raft::{RawNode, StateRole};
use tracing::{error, info, warn};

use crate::codec::{
    decode, encode, encode_command, LogCommand, MemberBook, MemberChange, ProposalTag,
    SnapshotMembership, StoredMembership,
};
use crate::storage::{LogFault, LogStore, StorageError};
use crate::transport::{Bell, InboundPoll, PeerStatus, Report, Transport, TransportConfig};

/// How many proposal batches (one per Redis event-loop turn) may wait for the raft thread;
/// past that a write is refused with `-TRYAGAIN` rather than queued without bound.
pub const PROPOSAL_QUEUE_MAX: usize = 1024;
/// Batches of inbound peer messages (one per socket read) waiting for the raft thread;
/// transport readers block when full, which pushes back on the sending peer through TCP.
pub const INBOUND_QUEUE_MAX: usize = 1024;
/// Inputs handled per loop turn before the node produces a `Ready` (bounds latency).
const DRAIN_MAX: usize = 8192;
/// How long a leader waits for an append to carry a new commit index to followers before it
/// sends one for that alone (see `RaftThread::tell_commit`).
const COMMIT_TELL_DELAY: Duration = Duration::from_millis(2);

pub use crate::codec::Member;

/// How often a node whose log found the disk full tries to write it again.
const LOG_FULL_RETRY: Duration = Duration::from_millis(100);
/// Messages a node whose log is full holds back until it is written (votes, acks); past
/// this the oldest are dropped, as a network may drop them.
const LOG_FULL_HELD_MAX: usize = 4096;
/// A read round nobody confirmed (`ApplyItem::ReadFailed`).
pub const NO_QUORUM_FOR_READ: &str = "TIMEOUT no quorum for read";

/// How far (in entries) a learner may trail the commit index and still count as caught up,
/// so that it is promoted to voter even while clients keep writing.
const PROMOTE_SLACK_ENTRIES: u64 = 256;

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
    /// This node stopped being leader: outcomes of its pending proposals are unknown.
    LeadershipLost,
    /// The node stopped (log write failed): fail everything pending with this message.
    Stopped(String),
    /// This node's log found the disk full: writes pending here will not be acknowledged by
    /// it (their outcome is unknown), nor the reads waiting here; fail them with the first
    /// message and the reads with the second. Later writes are refused (`Shared::log_full`)
    /// until the log is written again.
    LogFull { writes: String, reads: String },
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
    /// This node applied its own removal from the cluster and stopped.
    Removed,
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
            failure.map_or(ApplyItem::Removed, ApplyItem::Stopped),
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
        });

        let (tx, rx) = bounded(PROPOSAL_QUEUE_MAX);
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
        let worker = RaftThread {
            node: raw,
            store,
            transport: transport.clone(),
            shared: shared.clone(),
            waker,
            input: rx,
            inbound: in_rx,
            inbound_poll,
            polled: Vec::new(),
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
        };
        worker.publish_status();
        worker.publish_membership(worker.book_index);
        let on_panic = (shared.clone(), worker.waker.clone(), transport.clone());
        let thread = std::thread::Builder::new()
            .name("raft".into())
            .spawn(move || {
                // raft-rs panics on states it deems impossible; this node then stops taking
                // part, and says why, instead of vanishing silently.
                record_panic_locations();
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.run()));
                if let Err(p) = r {
                    let why = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "unknown panic".into());
                    let at = PANIC_AT.with(|a| a.borrow_mut().take()).unwrap_or_default();
                    let (shared, waker, transport) = on_panic;
                    if shared.leaving.load(Ordering::Acquire) {
                        // raft-rs keeps a few code paths that assume this node is in the
                        // configuration; after its own removal that no longer holds. The
                        // node was leaving anyway: finish leaving.
                        warn!("after this node's removal the raft thread stopped ({why} at {at}); the node has left the cluster");
                        shared.stop(None, &waker, &transport);
                        return;
                    }
                    let msg = format!("the raft thread stopped on an internal error ({why} at {at}); this node no longer takes part in the cluster (its data is intact); restart it");
                    error!("{msg}");
                    shared.stop(Some(msg), &waker, &transport);
                }
            })
            .map_err(NodeError::Thread)?;
        Ok(Node {
            shared,
            store: store_handle,
            snapshot_at_start,
            snapshot_path,
            input: InputTx::new(tx, bell),
            transport,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Hands a batch of proposals to the raft thread (one channel send, one wake-up).
    /// On error the batch is handed back so its clients can be told.
    pub fn propose(&self, batch: Vec<Proposal>) -> Result<(), (ProposeError, Vec<Proposal>)> {
        match self.input.try_send(Input::Propose(batch)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(Input::Propose(b))) => Err((ProposeError::Full, b)),
            Err(TrySendError::Disconnected(Input::Propose(b))) => Err((ProposeError::Stopped, b)),
            Err(_) => Err((ProposeError::Stopped, Vec::new())),
        }
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
        match self.input.try_send(Input::ReadIndex(round)) {
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
    /// The peer connections this thread reads itself, and its bell, rung after every send
    /// on the channels above and the syncer's (wait.rs).
    inbound_poll: InboundPoll,
    /// What the polled connections delivered this turn (kept for its allocation).
    polled: Vec<Message>,
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
}

/// A Ready whose records are written but not yet fsynced (node/syncer.rs).
struct Persisting {
    number: u64,
    /// It holds records that must be durable (false: commit indexes only); one that need
    /// not be is done as soon as the Readies before it are.
    owed: bool,
    /// Its last entry.
    appended: Option<u64>,
    /// raft-rs's persisted messages of it, sent once it is durable.
    held: Vec<Message>,
}

/// A node whose log cannot be written for lack of space. raft-rs was handed the Readies
/// since with `advance_append_async` (their records stay in the store's buffer), so it does
/// not count them as persisted: no vote is granted and no entry acknowledged from them, and
/// a leader does not count itself in their quorum. A successful `sync` reports them all
/// persisted (`on_persist_ready`) and sends what was held.
struct LogFull {
    since: Instant,
    /// The store's error, for the logs.
    error: String,
    next_try: Instant,
    /// The number of the last Ready handed over unpersisted.
    ready: u64,
    /// The last entry among them.
    appended: Option<u64>,
    /// raft-rs's persisted messages of those Readies (votes, append responses...), oldest
    /// first, at most `LOG_FULL_HELD_MAX`.
    held: VecDeque<Message>,
    /// Held messages dropped for the bound.
    dropped: u64,
}

/// Points the transport at `members` (but this node) and refuses the ids `book` says were
/// removed.
fn connect_members<'a>(
    transport: &Transport,
    me: u64,
    members: impl Iterator<Item = &'a Member>,
    book: &MemberBook,
) {
    for m in members {
        if m.id != me && !book.was_removed(m.id) {
            transport.set_peer(m.id, &m.bus_addr);
        }
    }
    for id in &book.used_ids {
        if *id != me && book.was_removed(*id) {
            transport.refuse_removed(*id);
        }
    }
}

/// Removes what a save or a receive cut short by a crash left: `<snapshot>.tmp` (a save's
/// child still writing; it dies with its server) and `<snapshot>.recv.tmp` (a snapshot
/// still arriving from the leader, which sends it again if needed). Neither is ever read.
fn remove_unfinished_snapshots(store: &LogStore, path: &std::path::Path) {
    let index = store.snapshot_meta().index;
    let kept = if index == 0 {
        "the log holds every entry".to_string()
    } else {
        format!(
            "the snapshot {} (index {index}) and the log are what this node starts from",
            path.display()
        )
    };
    let leftovers = [
        (crate::snapshot::format::tmp_path(path), "a snapshot save"),
        (
            crate::transport::snapshot_recv_tmp(&recv_path(path)),
            "a snapshot being received",
        ),
    ];
    for (tmp, what) in leftovers {
        match std::fs::remove_file(&tmp) {
            Ok(()) => warn!(
                "removed {} left by {what} that did not finish before a restart; {kept}",
                tmp.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(
                "cannot remove {} left by {what} that did not finish: {e}; {kept}",
                tmp.display()
            ),
        }
    }
}

/// Tests only: `REDIS_RAFT_TEST_FAULT=<point>` in redis-server's environment kills the
/// process (SIGKILL, as a crash) when it reaches `point`, to test the restart that follows.
fn test_fault(point: &str) {
    if std::env::var("REDIS_RAFT_TEST_FAULT").is_ok_and(|v| v == point) {
        error!("REDIS_RAFT_TEST_FAULT: killing this process at {point}");
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// Makes the log and the snapshot file agree after a crash between writing one and the
/// other: a snapshot that was written but whose compaction never reached the log is
/// compacted now; one that was received but not yet moved into place is moved. Anything else
/// that disagrees is refused: loading the wrong snapshot would apply entries twice.
fn reconcile_snapshot(store: &LogStore, path: &std::path::Path) -> Result<(), NodeError> {
    use crate::snapshot::format::inspect;
    let meta = store.snapshot_meta();
    if meta.index == 0 {
        // The log holds every entry; a snapshot file (if any) is not needed at start.
        return Ok(());
    }
    let file = inspect(path).ok().map(|s| s.header);
    if file
        .as_ref()
        .is_some_and(|h| h.index == meta.index && h.term == meta.term)
    {
        return Ok(());
    }
    let recv = recv_path(path);
    if inspect(&recv)
        .ok()
        .is_some_and(|s| s.header.index == meta.index && s.header.term == meta.term)
    {
        warn!(
            "moving the snapshot received before a restart into place ({} -> {})",
            recv.display(),
            path.display()
        );
        return std::fs::rename(&recv, path)
            .map_err(|e| NodeError::Snapshot(format!("cannot move {}: {e}", recv.display())));
    }
    if let Some(h) = file {
        let term_ok = raft::Storage::term(store, h.index).ok() == Some(h.term);
        if h.index > meta.index && term_ok {
            // Only committed entries are applied, so the snapshot's index was committed even
            // if the commit record did not reach the disk before the crash.
            let commit = raft::Storage::initial_state(store)?.hard_state.commit;
            if h.index > commit {
                store.set_commit(h.index)?;
                store.sync()?;
            }
            let m: SnapshotMembership = decode(&h.meta).map_err(|e| {
                NodeError::Snapshot(format!("{}: unreadable membership: {e}", path.display()))
            })?;
            warn!(
                "the snapshot {} (index {}) was written but the log was not compacted before a restart; compacting it now",
                path.display(),
                h.index
            );
            let cs = ConfState {
                voters: m.voters,
                learners: m.learners,
                ..Default::default()
            };
            store.compact(h.index, &cs)?;
            return Ok(());
        }
    }
    Err(NodeError::Snapshot(format!(
        "the raft log starts after a snapshot at index {} (term {}), but {} does not hold it; move the log and the snapshot aside to rebuild this node from its peers",
        meta.index,
        meta.term,
        path.display()
    )))
}

/// What a log says about membership, if it says anything (a log from before membership
/// records, or a brand-new one, does not).
pub fn stored_membership(store: &LogStore) -> Result<Option<StoredMembership>, NodeError> {
    match store.membership() {
        None => Ok(None),
        Some((_, blob)) => decode(&blob).map(Some).map_err(|e| {
            NodeError::Membership(format!(
                "the membership record in {} cannot be decoded: {e}",
                store.path().display()
            ))
        }),
    }
}

/// Reads (or, for a brand-new bootstrapped log, writes) the membership a node starts with.
fn open_membership(spec: &NodeSpec, store: &LogStore) -> Result<(MemberBook, u64), NodeError> {
    let configured: Vec<u64> = {
        let mut v: Vec<u64> = spec.members.iter().map(|m| m.id).collect();
        v.sort_unstable();
        v
    };
    if store.is_empty() {
        if !spec.bootstrap {
            info!("new raft log: waiting to be added to the cluster by its leader");
            let stored = StoredMembership {
                me: spec.id,
                book: MemberBook {
                    cluster_id: spec.cluster_id.clone(),
                    ..Default::default()
                },
                hints: spec.members.clone(),
            };
            store.set_membership(0, &ConfState::default(), &encode(&stored))?;
            store.sync()?;
            return Ok((stored.book, 0));
        }
        let (entries, cs, book) = bootstrap_entries(&spec.cluster_id, &spec.members)?;
        let n = entries.len() as u64;
        let hs = raft::eraftpb::HardState {
            term: 1,
            vote: 0,
            commit: n,
        };
        let stored = StoredMembership {
            me: spec.id,
            book,
            hints: Vec::new(),
        };
        store.bootstrap(&entries, &hs, &cs, (n, &encode(&stored)))?;
        store.sync()?;
        info!(
            "new raft log: bootstrapping cluster {:?} with {} voter(s)",
            spec.cluster_id, n
        );
        return Ok((stored.book, n));
    }
    match store.membership() {
        Some((index, blob)) => {
            let stored: StoredMembership = decode(&blob).map_err(|e| {
                NodeError::Membership(format!(
                    "the membership record in {} cannot be decoded: {e}",
                    store.path().display()
                ))
            })?;
            let mut book = stored.book;
            if book.cluster_id.is_empty() {
                book.cluster_id = spec.cluster_id.clone();
            }
            Ok((book, index))
        }
        None => {
            // A log from before membership records: its members are the configured ones.
            let cs = raft::Storage::initial_state(store)?.conf_state;
            let mut logged = cs.voters.clone();
            logged.sort_unstable();
            if logged != configured {
                warn!(
                    "raft.cluster-nodes lists voters {:?} but the log's committed membership is {:?}; following the log",
                    configured, logged
                );
            }
            let mut book = MemberBook {
                cluster_id: spec.cluster_id.clone(),
                ..Default::default()
            };
            for m in &spec.members {
                book.apply(&MemberChange::Bootstrap {
                    cluster_id: spec.cluster_id.clone(),
                    member: m.clone(),
                });
            }
            Ok((book, 0))
        }
    }
}

/// The first entries of a new cluster: one committed configuration change per voter, in id
/// order, identical on every node that bootstraps from the same member list. A node that
/// joins later learns the founding members by applying them like any other entry.
fn bootstrap_entries(
    cluster_id: &str,
    members: &[Member],
) -> Result<(Vec<Entry>, ConfState, MemberBook), NodeError> {
    let mut sorted = members.to_vec();
    sorted.sort_by_key(|m| m.id);
    let mut book = MemberBook::default();
    let mut entries = Vec::with_capacity(sorted.len());
    for (i, m) in sorted.iter().enumerate() {
        let change = MemberChange::Bootstrap {
            cluster_id: cluster_id.to_string(),
            member: m.clone(),
        };
        book.apply(&change);
        let cc = conf_change(ConfChangeType::AddNode, m.id, &change);
        let mut e = Entry::default();
        e.set_entry_type(EntryType::EntryConfChangeV2);
        e.term = 1;
        e.index = i as u64 + 1;
        e.data = prost::Message::encode_to_vec(&cc);
        entries.push(e);
    }
    let cs = ConfState {
        voters: sorted.iter().map(|m| m.id).collect(),
        ..Default::default()
    };
    Ok((entries, cs, book))
}

fn conf_change(ty: ConfChangeType, id: u64, change: &MemberChange) -> ConfChangeV2 {
    let mut single = ConfChangeSingle::default();
    single.set_change_type(ty);
    single.node_id = id;
    ConfChangeV2 {
        changes: vec![single],
        context: encode(change),
        ..Default::default()
    }
}

thread_local! {
    /// Where the last panic on this thread happened (file:line), for the raft thread's log line.
    static PANIC_AT: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Chains a panic hook (once per process) that records each panic's location for the
/// thread it happened on, then runs the previous hook.
fn record_panic_locations() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(l) = info.location() {
                let at = format!("{}:{}", l.file(), l.line());
                PANIC_AT.with(|a| *a.borrow_mut() = Some(at));
            }
            prev(info);
        }));
    });
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

impl RaftThread {
    fn run(mut self) {
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
        let mut next_beat = Instant::now();
        loop {
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
            let asleep = Instant::now();
            let timeout = wake.saturating_duration_since(asleep);
            let mut polled = std::mem::take(&mut self.polled);
            self.wait(timeout, &mut polled);
            let _ = self.synced_bell.try_recv();
            let stall = self.stall_clock.woke(asleep, timeout, Instant::now());
            if stall > self.read_timeout {
                self.after_stall(stall);
            }
            if let Err(e) = self.take_synced() {
                self.stop_on_error(e);
                return;
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
            // After the channel: a connection's reader forwarded what came before it lent it.
            for m in polled.drain(..) {
                self.on_message(m);
            }
            self.polled = polled;
            if !dropped.is_empty() {
                self.shared.push(ApplyItem::Dropped(dropped), &self.waker);
            }
            if stop {
                return;
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
                if now >= next_beat {
                    next_beat = now + beat;
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
                return;
            }
            self.track_leadership();
            self.track_transfer();
            self.promote_learners();
            self.publish_status();
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
                return;
            }
        }
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
                self.shared
                    .push(ApplyItem::AlreadyMember { tag, id: member.id }, &self.waker);
                false
            }
            Input::ChangeMembership(tag, req) => {
                if let Err(error) = self.change_membership(tag, req) {
                    self.shared
                        .push(ApplyItem::Refused { tag, error }, &self.waker);
                }
                false
            }
            Input::Compact(index) => {
                let result = self.compact(index);
                if let Err(e) = &result {
                    warn!("log compaction up to index {index} failed (the snapshot is kept; the log stays as it was): {e}");
                }
                self.publish_status();
                self.shared
                    .push(ApplyItem::Compacted { index, result }, &self.waker);
                false
            }
            Input::SetFsync(on) => {
                self.store.set_fsync(on);
                false
            }
            Input::Stop => true,
        }
    }

    /// Proposes an operator's membership change, or says why not (RedisRaft's errors).
    fn change_membership(&mut self, tag: ProposalTag, req: ChangeRequest) -> Result<(), String> {
        if self.leaving.is_some() {
            return Err("ERR this node was removed from the cluster".into());
        }
        if let Some(error) = self.shared.log_full() {
            return Err(error);
        }
        if self.node.raft.state != StateRole::Leader {
            return Err(match self.shared.member(self.node.raft.leader_id) {
                Some(l) if self.node.raft.leader_id != self.shared.node_id => {
                    format!("MOVED 0 {}", l.redis_addr)
                }
                _ => "CLUSTERDOWN No raft leader".into(),
            });
        }
        if self.node.raft.has_pending_conf() {
            return Err(
                "ERR one voting change only: a membership change is in progress; retry once it is committed"
                    .into(),
            );
        }
        let (ty, id, change) = match req {
            ChangeRequest::Add { mut member } => {
                if member.id == 0 {
                    member.id = self.unused_id();
                }
                if self.book.used_ids.contains(&member.id) {
                    return Err("ERR node id has already been used in this cluster".into());
                }
                if member.name.is_empty() {
                    member.name = member.id.to_string();
                }
                if let Some(m) = self.book.members.values().find(|m| m.name == member.name) {
                    return Err(format!(
                        "ERR node name '{}' is already taken by node {}",
                        member.name, m.id
                    ));
                }
                (
                    ConfChangeType::AddLearnerNode,
                    member.id,
                    MemberChange::Add { member },
                )
            }
            ChangeRequest::Remove { id } => {
                if !self.book.members.contains_key(&id) {
                    return Err("ERR node id does not exist".into());
                }
                let voters = self.node.raft.prs().conf().voters().ids();
                if voters.contains(id) && voters.len() == 1 {
                    return Err("ERR cannot remove the last voting node".into());
                }
                (ConfChangeType::RemoveNode, id, MemberChange::Remove { id })
            }
        };
        info!("proposing membership change: {change:?}");
        self.node
            .propose_conf_change(tag.encode(), conf_change(ty, id, &change))
            .map_err(|e| format!("ERR {e}"))
    }

    /// A random 31-bit id no member ever had (RedisRaft's id 0: "pick one for me").
    fn unused_id(&self) -> u64 {
        let mut x = self.incarnation ^ self.node.raft.raft_log.last_index().rotate_left(17);
        loop {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let id = x & 0x7fff_ffff;
            if id != 0 && !self.book.used_ids.contains(&id) {
                return id;
            }
        }
    }

    /// The leader promotes one caught-up learner at a time to voter.
    fn promote_learners(&mut self) {
        let r = &self.node.raft;
        if r.state != StateRole::Leader
            || r.has_pending_conf()
            || self.leaving.is_some()
            || self.log_full.is_some()
        {
            return;
        }
        let committed = r.raft_log.committed;
        let ready = r.prs().conf().learners().iter().copied().find(|id| {
            r.prs()
                .get(*id)
                .is_some_and(|p| p.matched + PROMOTE_SLACK_ENTRIES >= committed && p.matched > 0)
        });
        let Some(id) = ready else { return };
        let change = MemberChange::Promote { id };
        info!("node {id} caught up (learner); proposing it as a voter");
        let tag = ProposalTag {
            node_id: self.shared.node_id,
            incarnation: 0,
            request: 0,
        };
        if let Err(e) = self.node.propose_conf_change(
            tag.encode(),
            conf_change(ConfChangeType::AddNode, id, &change),
        ) {
            warn!("could not propose node {id} as a voter: {e}");
        }
    }

    /// Applies a committed membership change: raft-rs's configuration, the member book, the
    /// transport's peers. Entries up to `book_index` are already in both (a restart).
    fn apply_membership(&mut self, e: &Entry) -> Result<(), NodeError> {
        if e.index <= self.book_index {
            return Ok(());
        }
        let cc: ConfChangeV2 = prost::Message::decode(e.data.as_ref())
            .map_err(|err| raft::Error::ConfChangeError(err.to_string()))?;
        let cs = match self.node.apply_conf_change(&cc) {
            Ok(cs) => cs,
            Err(err) => {
                // Every node holds the same entry and refuses it the same way.
                error!(
                    "membership change at index {} refused by raft, skipped: {err}",
                    e.index
                );
                return Ok(());
            }
        };
        let change: Option<MemberChange> = match decode(&cc.context) {
            Ok(c) => Some(c),
            Err(err) => {
                error!(
                    "membership change at index {} has no readable member data: {err}",
                    e.index
                );
                None
            }
        };
        if let Some(change) = &change {
            if self.book.members.is_empty() {
                // The first change a joining node applies: its hints were only hints.
                self.book.cluster_id.clear();
            }
            self.book.apply(change);
            info!("membership change applied at index {}: {change:?}", e.index);
        }
        self.book_index = e.index;
        self.publish_membership(e.index);
        let stored = StoredMembership {
            me: self.shared.node_id,
            book: self.book.clone(),
            hints: Vec::new(),
        };
        self.store.set_membership(e.index, &cs, &encode(&stored))?;
        match change {
            Some(MemberChange::Bootstrap { member, .. }) | Some(MemberChange::Add { member }) => {
                if member.id != self.shared.node_id {
                    self.transport.set_peer(member.id, &member.bus_addr);
                }
                lock(&self.shared.members).insert(member.id, member);
            }
            Some(MemberChange::Remove { id }) => {
                lock(&self.shared.members).remove(&id);
                if id == self.shared.node_id {
                    self.leave();
                } else {
                    self.transport.refuse_removed(id);
                }
            }
            Some(MemberChange::Promote { .. }) | None => {}
        }
        Ok(())
    }

    /// Publishes the membership as of `index` for snapshots taken on the main thread.
    fn publish_membership(&self, index: u64) {
        let conf = self.node.raft.prs().conf();
        let view = SnapshotMembership {
            voters: conf.voters().ids().iter().collect(),
            learners: conf.learners().iter().copied().collect(),
            book: self.book.clone(),
        };
        *lock(&self.shared.membership) = (index, view);
    }

    /// A snapshot file up to `index` is durable: drop the log entries it covers. The
    /// configuration as of `index` comes from the file's header.
    fn compact(&mut self, index: u64) -> Result<(), String> {
        if index <= self.store.snapshot_meta().index {
            return Ok(());
        }
        let summary =
            crate::snapshot::format::inspect(&self.snapshot_path).map_err(|e| e.to_string())?;
        if summary.header.index != index {
            return Err(format!(
                "the snapshot file {} is at index {}, not {index}",
                self.snapshot_path.display(),
                summary.header.index
            ));
        }
        let m: SnapshotMembership = decode(&summary.header.meta).map_err(|e| e.to_string())?;
        let cs = ConfState {
            voters: m.voters,
            learners: m.learners,
            ..Default::default()
        };
        let before = self.store.stats();
        self.store.compact(index, &cs).map_err(|e| e.to_string())?;
        // The dropped entries were many small allocations: hand the pages back to the OS so
        // the node's RSS follows its log. This matters with glibc's malloc (Redis built with
        // MALLOC=libc); Debian's redis-server links jemalloc, which every allocation of this
        // module then also uses, and which returns freed pages by itself within ~10 s.
        // SAFETY: malloc_trim only releases free memory; it has no preconditions.
        unsafe { libc::malloc_trim(0) };
        let after = self.store.stats();
        info!(
            "raft log compacted up to index {index}: {} entries and {} bytes before, {} entries and {} bytes after",
            before.entries, before.bytes, after.entries, after.bytes
        );
        Ok(())
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

    /// This node was removed: hand leadership to the most up-to-date voter, let the commit
    /// reach the others for a moment, then stop.
    fn leave(&mut self) {
        warn!("this node was removed from the cluster; it stops taking part in it");
        // Before the hand-over below, whose message may leave in this very turn.
        self.give_up_lease();
        if self.node.raft.state == StateRole::Leader {
            let best = self
                .node
                .raft
                .prs()
                .iter()
                .filter(|(id, _)| **id != self.shared.node_id)
                .filter(|(id, _)| self.node.raft.prs().conf().voters().contains(**id))
                .max_by_key(|(_, p)| p.matched)
                .map(|(id, _)| *id);
            if let Some(id) = best {
                self.node.transfer_leader(id);
            }
        }
        self.leaving = Some(Instant::now() + self.read_timeout);
        self.shared.leaving.store(true, Ordering::Release);
    }

    fn start_transfer(&mut self, target: u64) {
        let done =
            |s: &Self, r: Result<(), String>| s.shared.push(ApplyItem::TransferDone(r), &s.waker);
        if self.node.raft.state != StateRole::Leader {
            return done(self, Err("ERR not leader".into()));
        }
        if self.transfer.is_some() {
            return done(self, Err("ERR leader transfer is in progress".into()));
        }
        let me = self.shared.node_id;
        let voters: Vec<u64> = self.node.raft.prs().conf().voters().ids().iter().collect();
        let target = if target == 0 {
            // The most up-to-date follower.
            let best = self
                .node
                .raft
                .prs()
                .iter()
                .filter(|(id, _)| **id != me && voters.contains(id))
                .max_by_key(|(_, p)| p.matched)
                .map(|(id, _)| *id);
            match best {
                Some(id) => id,
                None => return done(self, Err("ERR no other voting node to transfer to".into())),
            }
        } else {
            target
        };
        if target == me {
            return done(self, Ok(()));
        }
        if !voters.contains(&target) {
            return done(self, Err("ERR invalid node id".into()));
        }
        info!("transferring leadership to node {target}");
        self.give_up_lease();
        self.node.transfer_leader(target);
        // raft-rs gives up after an election timeout; allow for the new leader's election.
        self.transfer = Some((target, Instant::now() + self.read_timeout * 3));
    }

    fn track_transfer(&mut self) {
        let Some((target, deadline)) = self.transfer else {
            return;
        };
        let r = &self.node.raft;
        let result = if r.leader_id == target && r.state != StateRole::Leader {
            Ok(())
        } else if r.leader_id != 0 && r.leader_id != target && r.leader_id != self.shared.node_id {
            Err("ERR different node elected leader".to_string())
        } else if Instant::now() > deadline {
            Err("ERR transfer timed out".to_string())
        } else {
            return;
        };
        self.transfer = None;
        self.shared
            .push(ApplyItem::TransferDone(result), &self.waker);
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
        for (tag, data) in batch {
            self.propose(tag, data, dropped);
        }
        if self.node.raft.state == StateRole::Leader {
            self.batches
                .proposed(self.node.raft.raft_log.last_index(), taken);
        }
    }

    fn propose(&mut self, tag: ProposalTag, data: Vec<u8>, dropped: &mut Vec<ProposalTag>) {
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

    fn on_ready(&mut self) -> Result<(), NodeError> {
        if !self.node.has_ready() {
            return Ok(());
        }
        let mut rd = self.node.ready();
        if !rd.messages().is_empty() {
            let msgs = self.noting_commit(rd.take_messages());
            self.transport.send(msgs);
        }
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            self.install_snapshot(&snap)?;
        }
        let committed = rd.take_committed_entries();
        self.deliver(committed)?;
        for rs in rd.take_read_states() {
            if let Some((id, epoch, round)) = parse_read_ctx(&rs.request_ctx) {
                if round & LEASE_ROUND != 0 {
                    tracing::trace!("read lease: round {} confirmed", round & !LEASE_ROUND);
                    if id == self.shared.node_id && epoch == self.read_epoch {
                        let st = self.leader_state();
                        if let Some(lease) = self.lease.as_mut() {
                            lease.confirmed(round, &st, &self.shared.lease);
                        }
                    }
                    continue;
                }
                if id == self.shared.node_id
                    && epoch == self.read_epoch
                    && self.log_full.is_some()
                    && rs.index > self.node.raft.raft_log.persisted
                    && self.reads.remove(&round).is_some()
                {
                    // This node cannot apply that far until its log is written again.
                    self.shared.push(
                        ApplyItem::ReadFailed {
                            rounds: vec![round],
                            error: full_log_read_error(&self.store),
                        },
                        &self.waker,
                    );
                    continue;
                }
                if id == self.shared.node_id
                    && epoch == self.read_epoch
                    && self.reads.remove(&round).is_some()
                {
                    tracing::debug!(
                        "read round {round}: confirmed at index {} as {:?} at term {}",
                        rs.index,
                        self.node.raft.state,
                        self.node.raft.term
                    );
                    self.shared.push(
                        ApplyItem::ReadReady {
                            round,
                            index: rs.index,
                        },
                        &self.waker,
                    );
                }
            }
        }
        let appended = rd.entries().last().map(|e| e.index);
        if !rd.entries().is_empty() {
            self.store.append(rd.entries())?;
        }
        if let Some(hs) = rd.hs() {
            self.store.set_hard_state(hs)?;
        }
        if self.log_full.is_some() {
            // Written by the next retry (retry_full_log), not now.
            self.defer_persist(rd, appended);
            return Ok(());
        }
        let owed = match self.store.write() {
            Ok(owed) => owed,
            Err(e) if e.is_no_space() => {
                self.log_became_full(&e);
                self.defer_persist(rd, appended);
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let in_order = !self.persisting.is_empty();
        if (owed || in_order)
            && self.syncer.is_some()
            && self.node.raft.state == StateRole::Leader
            && rd.snapshot().is_empty()
        {
            self.persist_async(rd, appended, owed);
            return Ok(());
        }
        self.fsync_now(owed)?;
        if let Some(index) = appended {
            self.batches.persisted(index);
        }
        if !rd.persisted_messages().is_empty() {
            self.transport.send(rd.take_persisted_messages());
        }
        let mut light = self.node.advance(rd);
        if let Some(commit) = light.commit_index() {
            // Written with the next batch: a lower commit index after a crash is re-learned.
            self.store.set_commit(commit)?;
        }
        if !light.messages().is_empty() {
            let msgs = self.noting_commit(light.take_messages());
            self.transport.send(msgs);
        }
        let committed = light.take_committed_entries();
        self.deliver(committed)?;
        self.node.advance_apply();
        Ok(())
    }

    /// A leader's Ready whose records are written: raft-rs takes it unpersisted and the
    /// syncer fsyncs it, while this thread goes on (node/syncer.rs).
    fn persist_async(&mut self, mut rd: raft::Ready, appended: Option<u64>, owed: bool) {
        let number = rd.number();
        let held = rd.take_persisted_messages();
        self.node.advance_append_async(rd);
        // Its committed entries were delivered (persisted ones only, as raft-rs hands out).
        self.node.advance_apply();
        self.persisting.push_back(Persisting {
            number,
            owed,
            appended,
            held,
        });
        if owed {
            if let Some(syncer) = &self.syncer {
                syncer.ask(number);
            }
        }
    }

    /// Fsyncs on this thread what `LogStore::write` left owed; that fsync also covers the
    /// Readies still with the syncer, released first (Readies are persisted in order).
    fn fsync_now(&mut self, owed: bool) -> Result<(), StorageError> {
        if owed || !self.persisting.is_empty() {
            self.store.fdatasync()?;
            self.release_persisting(u64::MAX);
        }
        Ok(())
    }

    /// Learns what the syncer made durable since the last look. Looked at on every turn, also with nothing in `persisting` (the synchronous path may
    /// have released it all): a failed fsync stops the node at once.
    fn take_synced(&mut self) -> Result<(), NodeError> {
        let Some(syncer) = &self.syncer else {
            return Ok(());
        };
        match syncer.take(self.synced) {
            None => Ok(()),
            Some(Synced::Upto(number)) => {
                self.synced = number;
                self.release_persisting(number);
                Ok(())
            }
            Some(Synced::Failed(e)) => Err(e.into()),
        }
    }

    /// Every Ready up to `number` is durable (and those after it that owed no fsync): raft-rs
    /// is told, and their held messages leave.
    fn release_persisting(&mut self, number: u64) {
        let mut last = None;
        let mut appended = None;
        let mut msgs = Vec::new();
        while let Some(p) = self.persisting.front() {
            if p.number > number && p.owed {
                break;
            }
            let Some(p) = self.persisting.pop_front() else {
                break;
            };
            last = Some(p.number);
            appended = p.appended.or(appended);
            msgs.extend(p.held);
        }
        let Some(last) = last else {
            return;
        };
        self.node.on_persist_ready(last);
        if let Some(index) = appended {
            self.batches.persisted(index);
        }
        if !msgs.is_empty() {
            self.transport.send(msgs);
        }
    }

    /// Hands `rd` back to raft-rs without claiming it persisted (its records are in the
    /// store's buffer, where raft-rs reads them), and holds the messages that may only leave
    /// once it is.
    fn defer_persist(&mut self, mut rd: raft::Ready, appended: Option<u64>) {
        let number = rd.number();
        let msgs = rd.take_persisted_messages();
        self.node.advance_append_async(rd);
        // The committed entries of `rd` were delivered (persisted ones only: raft-rs hands
        // out nothing past its persisted index).
        self.node.advance_apply();
        let Some(full) = self.log_full.as_mut() else {
            return;
        };
        full.ready = number;
        full.appended = appended.or(full.appended);
        for m in msgs {
            // A forwarded read asks and claims nothing: it need not wait (follower reads
            // are refused anyway while full; a round already asked may still complete).
            if m.get_msg_type() == raft::eraftpb::MessageType::MsgHeartbeatResponse
                || m.get_msg_type() == raft::eraftpb::MessageType::MsgReadIndex
            {
                self.transport.send(vec![m]);
                continue;
            }
            full.held.push_back(m);
        }
        while full.held.len() > LOG_FULL_HELD_MAX {
            full.held.pop_front();
            full.dropped += 1;
        }
    }

    /// The log's write found no space: this node stops taking new writes, and its vote and
    /// acknowledgements wait until the log is written again (see `LogFull`). A leader hands
    /// leadership over: it cannot count itself in a quorum nor apply what it could not write.
    fn log_became_full(&mut self, e: &StorageError) {
        let error = e.short();
        let leading = self.node.raft.state == StateRole::Leader;
        warn!(
            "{error}: this node takes no new writes, grants no vote and acknowledges no entry until its raft log can be written again (tried every {} ms){}; it still serves local reads. Free space on that file system: the node resumes by itself",
            LOG_FULL_RETRY.as_millis(),
            if leading {
                "; as leader it hands leadership to another node"
            } else {
                ""
            }
        );
        self.shared.set_log_full(Some(format!("ERR {e}")));
        self.log_full = Some(LogFull {
            since: Instant::now(),
            error: error.clone(),
            next_try: Instant::now() + LOG_FULL_RETRY,
            ready: 0,
            appended: None,
            held: VecDeque::new(),
            dropped: 0,
        });
        self.shared.push(
            ApplyItem::LogFull {
                writes: format!(
                    "TIMEOUT {error}: this node could not persist the write, its outcome is unknown; writes resume when space is freed"
                ),
                reads: full_log_read_error(&self.store),
            },
            &self.waker,
        );
        self.hand_over_for_full_log();
    }

    /// A leader whose log is full gives leadership to the most up-to-date voter, so the
    /// other nodes keep the cluster writable. Asked again at each retry while it leads.
    fn hand_over_for_full_log(&mut self) {
        let r = &self.node.raft;
        if r.state != StateRole::Leader || r.lead_transferee.is_some() || self.leaving.is_some() {
            return;
        }
        let me = self.shared.node_id;
        let best = r
            .prs()
            .iter()
            .filter(|(id, _)| **id != me && r.prs().conf().voters().contains(**id))
            .max_by_key(|(_, p)| p.matched)
            .map(|(id, _)| *id);
        let Some(id) = best else { return };
        info!("raft log full: transferring leadership to node {id}");
        self.give_up_lease();
        self.node.transfer_leader(id);
    }

    /// While the log is full: tries to write it again; once that works, raft-rs learns that
    /// everything handed over since is persisted, and the held messages leave.
    fn retry_full_log(&mut self, now: Instant) -> Result<(), NodeError> {
        let Some(full) = self.log_full.as_mut() else {
            return Ok(());
        };
        if now < full.next_try {
            return Ok(());
        }
        full.next_try = now + LOG_FULL_RETRY;
        let synced = self.store.write().and_then(|owed| self.fsync_now(owed));
        match synced {
            Ok(()) => {}
            Err(e) if e.is_no_space() => {
                self.hand_over_for_full_log();
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        let Some(full) = self.log_full.take() else {
            return Ok(());
        };
        self.shared.set_log_full(None);
        if full.ready > 0 {
            self.node.on_persist_ready(full.ready);
        }
        if let Some(index) = full.appended {
            self.batches.persisted(index);
        }
        self.transport.send(full.held.into());
        info!(
            "raft log {} written again after {:.1} s without space ({}); this node takes part in the cluster again{}",
            self.store.path().display(),
            full.since.elapsed().as_secs_f64(),
            full.error,
            if full.dropped > 0 {
                format!(" ({} held messages were dropped)", full.dropped)
            } else {
                String::new()
            }
        );
        Ok(())
    }

    /// The raft thread cannot go on: this node stops taking part (no votes, no
    /// acknowledgements, no entries), every waiting client gets the reason, the bus closes.
    fn stop_on_error(&self, e: NodeError) {
        let msg = match &e {
            NodeError::Storage(se) => {
                let msg = format!("{se}; this node stopped taking part in the cluster and acknowledges nothing it could not persist (the log is not written again: after a failed write or fsync its contents are suspect); check the disk, then restart the node");
                lock(&self.shared.status).log_failed = Some(se.to_string());
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

    fn deliver(&mut self, entries: Vec<Entry>) -> Result<(), NodeError> {
        if entries.is_empty() {
            return Ok(());
        }
        for e in &entries {
            match e.get_entry_type() {
                EntryType::EntryConfChange => {
                    // Never written by redis-raft; applied as raft-rs defines it.
                    let cc: ConfChange = prost::Message::decode(e.data.as_ref())
                        .map_err(|err| raft::Error::ConfChangeError(err.to_string()))?;
                    let cs = self.node.apply_conf_change(&cc)?;
                    self.store.set_conf_state(&cs)?;
                }
                EntryType::EntryConfChangeV2 => self.apply_membership(e)?,
                EntryType::EntryNormal => {}
            }
        }
        if let Some(last) = entries.last() {
            self.batches.committed(last.index);
        }
        self.shared
            .push(ApplyItem::Entries(entries, Instant::now()), &self.waker);
        Ok(())
    }

    /// Notes the commit index `msgs` carry to followers.
    fn noting_commit(&mut self, msgs: Vec<Message>) -> Vec<Message> {
        for m in &msgs {
            if matches!(
                m.get_msg_type(),
                raft::eraftpb::MessageType::MsgAppend | raft::eraftpb::MessageType::MsgHeartbeat
            ) {
                self.commit_sent = self.commit_sent.max(m.commit);
            }
        }
        msgs
    }

    /// Followers learn a new commit index from the next append (raft-rs's skip_bcast_commit:
    /// no message round per commit while writes keep coming); when none went out within
    /// `COMMIT_TELL_DELAY`, an append with no entries tells them, so an idle follower's data
    /// trails the leader's by about that much, not by a heartbeat interval.
    fn tell_commit(&mut self, now: Instant) {
        let r = &self.node.raft;
        let me = self.shared.node_id;
        if r.prs().iter().all(|(id, _)| *id == me) {
            // Nobody to tell (a one-node cluster).
            self.commit_sent = r.raft_log.committed;
        }
        if r.state != StateRole::Leader || r.raft_log.committed <= self.commit_sent {
            self.commit_due = None;
            return;
        }
        match self.commit_due {
            None => self.commit_due = Some(now + COMMIT_TELL_DELAY),
            Some(due) if now >= due => {
                self.commit_due = None;
                self.node.raft.bcast_append();
            }
            Some(_) => {}
        }
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
                self.early_election = Some(EarlyElection {
                    at: Instant::now() + failover::TURN * turn,
                    term,
                    retry_until: None,
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
        let first = e.retry_until.is_none();
        if !matches!(r.state, StateRole::Follower | StateRole::PreCandidate) {
            self.early_election = None;
            return;
        }
        let until = e.retry_until.unwrap_or_else(|| {
            now + self
                .tick
                .saturating_mul(u32::try_from(self.election_ticks).unwrap_or(u32::MAX))
        });
        if first {
            info!("no leader since the last one's process went away: starting an election");
        } else {
            tracing::debug!("still no leader: asking the other voters for their votes again");
        }
        if let Err(e) = self.node.campaign() {
            warn!("could not start an election: {e}");
        }
        let next = now + failover::RETRY;
        self.early_election = (next < until).then_some(EarlyElection {
            at: next,
            term: e.term,
            retry_until: Some(until),
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
                self.shared.push(ApplyItem::LeadershipLost, &self.waker);
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

/// What a read gets on a node whose log is full and whose data trails what the read needs.
fn full_log_read_error(store: &LogStore) -> String {
    format!(
        "TIMEOUT the raft log {} of this node is full: it cannot catch up to serve this read; read from another node",
        store.path().display()
    )
}

#[cfg(test)]
mod tests;
