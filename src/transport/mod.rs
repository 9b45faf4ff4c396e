//! The bus: Raft messages between cluster nodes over plain TCP, served by background threads.
//!
//! ```text
//! Transport::send ──► per-peer bounded queue ──► writer thread (peer.rs) ──► TCP ──┐
//!                                                                                  │
//! inbound channel ◄── reader thread per connection (inbound.rs) ◄── acceptor ◄─────┤
//!                          │ open, plain TCP: lent (polled.rs)                         │
//! raft thread's poll ◄── InboundPoll ◄─────────────────────────────────────────────────┘
//! ```
//!
//! Both channels carry batches (`Vec<Message>`), not single messages: `send` pushes one batch
//! per peer per call and a reader forwards one batch per socket read, because a channel send
//! that wakes a sleeping thread costs a futex call, and per message that dominated the raft
//! thread's time under load.
//!
//! - `frame.rs`: the wire format (the only place bytes are encoded or decoded), versioned.
//! - `peer.rs`: one writer per peer: connect, handshake, batched writes, reconnect with backoff.
//! - `inbound.rs`: acceptor and readers: Hello check, password challenge, decoding, forwarding.
//! - `polled.rs`: open plain-TCP connections the raft thread reads itself (given a `Bell`).
//! - `bell.rs`: the raft thread's wake-up (an eventfd) and the inbound channel's sender.
//!
//! Invariants: nothing here calls Redis; every queue, buffer and connection count is bounded;
//! bad input from the network closes that one connection with a warning and never panics;
//! `send` never blocks the caller.
//!
//! Authentication: with a password (`raft.cluster-password`) set, an acceptor forwards nothing
//! from a connection until the peer has answered a random challenge with an HMAC keyed by the
//! password (see frame.rs); the password never crosses the network. Without one, the bus trusts
//! anyone who knows the cluster id. With `raft.tls-enabled yes` every connection is TLS 1.3 and
//! both ends present certificates signed by the configured CA (conn.rs, crate::tls); the
//! Hello and the challenge then run inside TLS.

mod bell;
mod conn;
pub(crate) mod frame;
mod inbound;
mod peer;
mod polled;

pub use bell::Bell;
pub use polled::{InboundPoll, PollSleep, PolledConn};

pub(crate) use inbound::snapshot_recv_tmp;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use raft::eraftpb::Message;

use inbound::{Acceptor, InboundConn};
use peer::PeerHandle;

/// Default bound on one frame's body: large enough for any Raft message we send in one piece.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;
/// Bound on how long `shutdown` waits for threads before leaving them to finish on their own.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(3);

/// Connection state of the outbound link to one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerState {
    Disconnected,
    Connecting,
    Connected,
    ConnectError,
}

/// A snapshot of one peer's outbound link, for `INFO raft` and diagnostics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    pub id: u64,
    pub addr: String,
    pub state: PeerState,
    /// Successful connects (each followed by a Hello) since the peer was added.
    pub conn_oks: u64,
    /// Failed connect attempts since the peer was added.
    pub conn_errors: u64,
    /// Seconds since the last successful connect; 0 if never.
    pub last_conn_secs: u64,
    /// Messages for this peer that were shed: queue full, too large, or lost in a failed write.
    pub dropped_msgs: u64,
}

#[derive(Clone)]
pub struct TransportConfig {
    pub node_id: u64,
    pub cluster_id: String,
    pub listen: SocketAddr,
    /// Largest frame body accepted or sent (default `DEFAULT_MAX_FRAME_BYTES`).
    pub max_frame_bytes: usize,
    /// Shared cluster password; empty means inbound connections are not challenged.
    pub password: String,
    /// This node's snapshot file (sent to followers that need it); None: never sent.
    pub snapshot_send: Option<PathBuf>,
    /// Where a snapshot from the leader is kept once complete; None: refused.
    pub snapshot_recv: Option<PathBuf>,
    /// `raft.tls-enabled`: every connection is TLS 1.3 with certificates checked both ways
    /// (see conn.rs); None: plain TCP.
    pub tls: Option<crate::tls::TlsHandle>,
    /// Rung after every send on the inbound channel. Some: open plain-TCP connections are
    /// lent to the caller's thread, which polls them (`Transport::inbound_poll`).
    pub bell: Option<Arc<Bell>>,
}

impl std::fmt::Debug for TransportConfig {
    // Hand-written so the password never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportConfig")
            .field("node_id", &self.node_id)
            .field("cluster_id", &self.cluster_id)
            .field("listen", &self.listen)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field(
                "password",
                &if self.password.is_empty() {
                    ""
                } else {
                    "<set>"
                },
            )
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl TransportConfig {
    pub fn new(node_id: u64, cluster_id: impl Into<String>, listen: SocketAddr) -> Self {
        TransportConfig {
            node_id,
            cluster_id: cluster_id.into(),
            listen,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            password: String::new(),
            snapshot_send: None,
            snapshot_recv: None,
            tls: None,
            bell: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot listen for the raft bus on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the raft bus: {0}")]
    Thread(std::io::Error),
    #[error("invalid raft bus configuration: {0}")]
    Config(String),
}

/// What every connection says about this node.
pub(crate) struct LocalIdentity {
    pub(crate) node_id: u64,
    pub(crate) cluster_id: String,
    pub(crate) max_frame_bytes: usize,
    /// Proves this node to peers, and is demanded of them when non-empty.
    pub(crate) password: String,
    /// Nodes removed from the cluster: their connections are refused with `REMOVED_REASON`.
    pub(crate) removed: RwLock<std::collections::HashSet<u64>>,
    /// `removed` is not empty (spares readers the lock on every message).
    pub(crate) any_removed: AtomicBool,
    /// A peer refused us because this node was removed from the cluster.
    pub(crate) told_removed: AtomicBool,
    /// This node's snapshot file, streamed to a follower ahead of a MsgSnapshot.
    pub(crate) snapshot_send: Option<PathBuf>,
    /// Where a snapshot file from the leader is kept once complete (`.tmp` while arriving).
    pub(crate) snapshot_recv: Option<PathBuf>,
    /// Where the writers report how sending a snapshot went (as MsgSnapStatus, which the
    /// raft thread turns into `report_snapshot`).
    pub(crate) reports: bell::ToNode,
    /// Some: TLS on every connection (`TransportConfig::tls`).
    pub(crate) tls: Option<crate::tls::TlsHandle>,
}

/// What the transport tells the raft thread about its links. Reports travel on the inbound
/// channel as raft messages of local-only types (`Report::message`), which the readers never
/// accept from the network, so a peer cannot forge one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// The outbound connection to this peer was lost: raft should probe it afresh (it may
    /// have restarted and lost what it acknowledged).
    Lost(u64),
    /// This peer's connection to us closed (its process may be gone).
    InboundClosed(u64),
    /// Right after losing our connection to this peer, its bus refused a new one: nothing
    /// listens there any more, so its process is most likely gone.
    Refused(u64),
    /// How sending a snapshot to this peer went.
    Snapshot { peer: u64, ok: bool },
}

const REPORT_INBOUND_CLOSED: &[u8] = b"inbound-closed";
const REPORT_REFUSED: &[u8] = b"refused";

impl Report {
    /// The report as a message to `local` (the node this transport belongs to).
    pub(crate) fn message(self, local: u64) -> Message {
        use raft::eraftpb::MessageType::{MsgSnapStatus, MsgUnreachable};
        let (kind, from, context, reject): (_, u64, &[u8], bool) = match self {
            Report::Lost(id) => (MsgUnreachable, id, b"", false),
            Report::InboundClosed(id) => (MsgUnreachable, id, REPORT_INBOUND_CLOSED, false),
            Report::Refused(id) => (MsgUnreachable, id, REPORT_REFUSED, false),
            Report::Snapshot { peer, ok } => (MsgSnapStatus, peer, b"", !ok),
        };
        let mut m = Message {
            to: local,
            from,
            reject,
            context: context.to_vec(),
            ..Default::default()
        };
        m.set_msg_type(kind);
        m
    }

    /// The report a message carries, if it is one.
    pub fn of(m: &Message) -> Option<Report> {
        use raft::eraftpb::MessageType::{MsgSnapStatus, MsgUnreachable};
        match m.get_msg_type() {
            MsgUnreachable => Some(match &m.context[..] {
                REPORT_INBOUND_CLOSED => Report::InboundClosed(m.from),
                REPORT_REFUSED => Report::Refused(m.from),
                _ => Report::Lost(m.from),
            }),
            MsgSnapStatus => Some(Report::Snapshot {
                peer: m.from,
                ok: !m.reject,
            }),
            _ => None,
        }
    }
}

/// Raft message types that only ever come from inside a node (ticks, elections it starts
/// itself, the transport's reports): a frame carrying one is refused (frame.rs).
pub(crate) fn local_only(kind: raft::eraftpb::MessageType) -> bool {
    use raft::eraftpb::MessageType as T;
    matches!(
        kind,
        T::MsgHup | T::MsgBeat | T::MsgUnreachable | T::MsgSnapStatus | T::MsgCheckQuorum
    )
}

/// How a Reject says the connecting node was removed from the cluster (the connector stops).
pub(crate) const REMOVED_REASON: &str = "was removed from this cluster";

/// The bus endpoint of one node. `Send + Sync`; dropping it shuts it down.
pub struct Transport {
    local: Arc<LocalIdentity>,
    local_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    peers: RwLock<HashMap<u64, PeerHandle>>,
    /// Writers of removed peers, joined at shutdown.
    retired: Mutex<Vec<JoinHandle<()>>>,
    acceptor: Mutex<Option<JoinHandle<()>>>,
    inbound_conns: Arc<Mutex<Vec<InboundConn>>>,
    /// Some with a bell: connections lent to the raft thread, and its side until taken.
    lending: Option<Arc<polled::Lending>>,
    inbound_poll: Mutex<Option<InboundPoll>>,
    unknown_peer_drops: AtomicU64,
}

impl Transport {
    /// Binds the listener and starts the acceptor thread. Every valid inbound message is sent
    /// on `inbound`, in arrival order, in non-empty batches of those decoded from one socket
    /// read (a full channel pushes back onto the sending peer's TCP connection).
    pub fn start(
        cfg: TransportConfig,
        inbound: crossbeam_channel::Sender<Vec<Message>>,
    ) -> Result<Transport, TransportError> {
        if cfg.node_id == 0 {
            return Err(TransportError::Config(
                "node id 0 is reserved by raft".into(),
            ));
        }
        if cfg.cluster_id.len() > frame::MAX_CLUSTER_ID_BYTES {
            return Err(TransportError::Config(format!(
                "cluster id is {} bytes, at most {} allowed",
                cfg.cluster_id.len(),
                frame::MAX_CLUSTER_ID_BYTES
            )));
        }
        if cfg.max_frame_bytes < 1024 || cfg.max_frame_bytes > u32::MAX as usize {
            return Err(TransportError::Config(format!(
                "max_frame_bytes {} is outside 1024..={}",
                cfg.max_frame_bytes,
                u32::MAX
            )));
        }
        let bind_err = |source| TransportError::Bind {
            addr: cfg.listen,
            source,
        };
        let listener = TcpListener::bind(cfg.listen).map_err(bind_err)?;
        let local_addr = listener.local_addr().map_err(bind_err)?;
        // Polled, so the acceptor sees `stop` without a wake-up connection.
        listener.set_nonblocking(true).map_err(bind_err)?;

        let inbound = bell::ToNode::new(inbound, cfg.bell);
        let local = Arc::new(LocalIdentity {
            node_id: cfg.node_id,
            cluster_id: cfg.cluster_id,
            max_frame_bytes: cfg.max_frame_bytes,
            password: cfg.password,
            removed: RwLock::new(Default::default()),
            any_removed: AtomicBool::new(false),
            snapshot_send: cfg.snapshot_send,
            snapshot_recv: cfg.snapshot_recv,
            reports: inbound.clone(),
            told_removed: AtomicBool::new(false),
            tls: cfg.tls,
        });
        let stop = Arc::new(AtomicBool::new(false));
        let inbound_conns = Arc::new(Mutex::new(Vec::new()));
        let tls_warned: inbound::TlsWarned = Arc::new(Mutex::new(HashMap::new()));
        let lending = inbound.bell().map(|_| Arc::new(polled::Lending::default()));
        let inbound_poll = lending.as_ref().zip(inbound.bell()).map(|(l, bell)| {
            InboundPoll::new(
                Arc::clone(bell),
                Arc::clone(l),
                inbound.clone(),
                Arc::clone(&stop),
                Arc::clone(&inbound_conns),
                Arc::clone(&tls_warned),
            )
        });
        let acceptor = Acceptor {
            listener,
            local: Arc::clone(&local),
            inbound,
            lending: lending.clone(),
            stop: Arc::clone(&stop),
            conns: Arc::clone(&inbound_conns),
            auth_warned: Arc::new(Mutex::new(HashMap::new())),
            unauth_warn: Arc::new(inbound::WarnLimit::default()),
            refusal_warn: Arc::new(inbound::WarnLimit::default()),
            tls_warned,
        };
        let acceptor = std::thread::Builder::new()
            .name("raft-bus-accept".into())
            .spawn(move || acceptor.run())
            .map_err(TransportError::Thread)?;
        if let Some(warning) = exposure_warning(local_addr, &local.password, local.tls.is_some()) {
            tracing::warn!(addr = %local_addr, "{warning}");
        }
        let tls = if local.tls.is_some() { " (TLS)" } else { "" };
        tracing::info!(addr = %local_addr, node_id = local.node_id, "raft bus: listening on {local_addr}{tls}");
        Ok(Transport {
            local,
            local_addr,
            stop,
            peers: RwLock::new(HashMap::new()),
            retired: Mutex::new(Vec::new()),
            acceptor: Mutex::new(Some(acceptor)),
            inbound_conns,
            lending,
            inbound_poll: Mutex::new(inbound_poll),
            unknown_peer_drops: AtomicU64::new(0),
        })
    }

    /// The raft thread's side of the lent connections (once; None without a bell).
    pub fn inbound_poll(&self) -> Option<InboundPoll> {
        lock(&self.inbound_poll).take()
    }

    /// The address the listener is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Adds a peer or changes its address; `addr` is "host:port" of its bus, resolved at each
    /// connect attempt. A changed address drops the current connection and reconnects at once.
    /// Looks at once whether `id` closed our connection to it (see `Report::Refused`).
    pub fn check_link(&self, id: u64) {
        if let Some(peer) = read(&self.peers).get(&id) {
            peer.check_link();
        }
    }

    pub fn set_peer(&self, id: u64, addr: &str) {
        if id == 0 || id == self.local.node_id {
            tracing::debug!(peer_id = id, "raft bus: ignoring set_peer for node {id}");
            return;
        }
        let mut peers = write(&self.peers);
        if self.stop.load(Ordering::Acquire) {
            return;
        }
        if let Some(peer) = peers.get(&id) {
            peer.set_addr(addr);
            return;
        }
        match PeerHandle::spawn(id, addr, Arc::clone(&self.local)) {
            Ok(peer) => {
                peers.insert(id, peer);
            }
            Err(e) => {
                tracing::error!(peer_id = id, error = %e,
                    "raft bus: cannot start the writer for node {id}: {e}; its messages will be dropped");
            }
        }
    }

    /// Refuses node `id` from now on (it was removed from the cluster); it is told why.
    pub fn refuse_removed(&self, id: u64) {
        write(&self.local.removed).insert(id);
        self.local.any_removed.store(true, Ordering::Release);
        self.remove_peer(id);
    }

    /// True once a peer refused this node because it was removed from the cluster.
    pub fn told_removed(&self) -> bool {
        self.local.told_removed.load(Ordering::Acquire)
    }

    /// Forgets a peer: its queued messages are dropped and its connection closed.
    pub fn remove_peer(&self, id: u64) {
        let removed = write(&self.peers).remove(&id);
        if let Some(peer) = removed {
            if let Some(thread) = peer.stop() {
                let mut retired = lock(&self.retired);
                retired.retain(|t| !t.is_finished());
                retired.push(thread);
            }
        }
    }

    /// Never blocks. Messages are grouped by `msg.to`, each group in its original order, and
    /// each group goes to its peer's queue as one item. What does not fit in a peer's queue,
    /// and everything for an unknown peer, is dropped and counted (Raft retransmits).
    pub fn send(&self, msgs: Vec<Message>) {
        let peers = read(&self.peers);
        for (to, batch) in group_by_peer(msgs) {
            match peers.get(&to) {
                Some(peer) => peer.enqueue(batch),
                None => {
                    self.unknown_peer_drops
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    tracing::debug!(
                        to,
                        msgs = batch.len(),
                        "raft bus: dropping {} message(s) for unknown node {to}",
                        batch.len()
                    );
                }
            }
        }
    }

    /// Status of every known peer, by id.
    pub fn peers(&self) -> Vec<PeerStatus> {
        let mut out: Vec<PeerStatus> = read(&self.peers).values().map(|p| p.status()).collect();
        out.sort_by_key(|s| s.id);
        out
    }

    /// Messages dropped by `send` because no peer with that id was known.
    pub fn unknown_peer_drops(&self) -> u64 {
        self.unknown_peer_drops.load(Ordering::Relaxed)
    }

    /// Stops all threads and closes all sockets. Waits at most `SHUTDOWN_WAIT`; a thread still
    /// busy then (e.g. in a slow DNS lookup) finishes on its own. Idempotent.
    pub fn shutdown(&self) {
        if self.stop.swap(true, Ordering::AcqRel) {
            return;
        }
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let peers: Vec<PeerHandle> = write(&self.peers).drain().map(|(_, p)| p).collect();
        threads.extend(peers.into_iter().filter_map(PeerHandle::stop));
        threads.append(&mut lock(&self.retired));
        // The acceptor first, so no connection is admitted after the sweep below.
        let mut left = join_until(lock(&self.acceptor).take().into_iter().collect(), deadline);
        let conns = std::mem::take(&mut *lock(&self.inbound_conns));
        threads.extend(conns.into_iter().map(InboundConn::close));
        if let Some(l) = &self.lending {
            // Those the raft thread holds close when it ends (InboundPoll's drop).
            for c in std::mem::take(&mut *lock(&l.arriving)) {
                l.count.fetch_sub(1, Ordering::AcqRel);
                c.close();
            }
        }
        left += join_until(threads, deadline);
        if left > 0 {
            tracing::warn!(
                threads = left,
                "raft bus: {left} thread(s) still stopping after {SHUTDOWN_WAIT:?}"
            );
        }
        tracing::info!(addr = %self.local_addr, "raft bus: stopped");
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Redis's protected mode, for the bus: a bus that listens beyond loopback with neither a
/// cluster password nor TLS lets anyone who reaches its port take part in the cluster.
pub fn exposure_warning(listen: SocketAddr, password: &str, tls: bool) -> Option<String> {
    if listen.ip().is_loopback() || !password.is_empty() || tls {
        return None;
    }
    Some(format!(
        "raft bus: listening on {listen} with neither raft.cluster-password nor raft.tls-enabled: \
         anyone who can reach this port can take part in the cluster (vote, replicate, read \
         every write); set raft.cluster-password or raft.tls-enabled yes on every node, or \
         keep the port behind a firewall"
    ))
}

/// Splits `msgs` by destination, keeping each destination's order. A `Ready` addresses a few
/// peers, so a linear scan over the groups is cheaper than hashing; the usual case of a single
/// destination hands the `Vec` on as it is.
fn group_by_peer(msgs: Vec<Message>) -> Vec<(u64, Vec<Message>)> {
    let Some(to) = msgs.first().map(|m| m.to) else {
        return Vec::new();
    };
    if msgs.iter().all(|m| m.to == to) {
        return vec![(to, msgs)];
    }
    let mut groups: Vec<(u64, Vec<Message>)> = Vec::new();
    for msg in msgs {
        match groups.iter_mut().find(|(to, _)| *to == msg.to) {
            Some((_, group)) => group.push(msg),
            None => groups.push((msg.to, vec![msg])),
        }
    }
    groups
}

/// Joins what finishes before `deadline`; returns how many were left running (detached).
fn join_until(threads: Vec<JoinHandle<()>>, deadline: Instant) -> usize {
    let mut left = 0;
    for thread in threads {
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            left += 1;
        }
    }
    left
}

/// Runs the inbound side's frame handling (handshake included) over `reads`, the bytes a
/// connection to node `node_id` of `cluster_id` receives, one socket read each, as a reader
/// would, without a socket or threads; what it would write back is dropped. For
/// `crate::fuzzing`.
pub(crate) fn fuzz_inbound<'a>(
    node_id: u64,
    cluster_id: &str,
    password: &str,
    reads: impl Iterator<Item = &'a [u8]>,
) {
    let (reports, _rx) = crossbeam_channel::unbounded();
    let reports = bell::ToNode::new(reports, None);
    let handler = inbound::Handler {
        addr: SocketAddr::from(([127, 0, 0, 1], 1)),
        local: Arc::new(LocalIdentity {
            node_id,
            cluster_id: cluster_id.to_owned(),
            max_frame_bytes: 64 * 1024,
            password: password.to_owned(),
            removed: RwLock::new([9].into_iter().collect()),
            any_removed: AtomicBool::new(true),
            told_removed: AtomicBool::new(false),
            snapshot_send: None,
            snapshot_recv: None,
            reports,
            tls: None,
        }),
        auth_warned: Arc::new(Mutex::new(HashMap::new())),
        unauth_warn: Arc::new(inbound::WarnLimit::default()),
        refusal_warn: Arc::new(inbound::WarnLimit::default()),
        phase: Arc::new(std::sync::atomic::AtomicU8::new(0)),
    };
    let mut decoder = frame::FrameDecoder::new(inbound::HANDSHAKE_FRAME_BYTES_MAX);
    let mut conn = inbound::ConnState::new();
    for read in reads {
        decoder.push(read);
        let mut batch = Vec::new();
        let keep = handler.decode_all(&mut std::io::sink(), &mut decoder, &mut conn, &mut batch);
        // What is forwarded reaches raft-rs, whose accessors panic on unknown enum values.
        for m in &batch {
            let _ = m.get_msg_type();
            for e in &m.entries {
                let _ = e.get_entry_type();
            }
        }
        if !keep {
            return;
        }
    }
}

/// Locks ignoring poison: no lock here guards an invariant a panic could break halfway, and
/// the bus must keep working.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests;
