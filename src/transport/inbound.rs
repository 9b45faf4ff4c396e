//! Inbound side: the acceptor thread and one reader thread per accepted connection.
//!
//! A reader decodes every complete frame a socket read made available and forwards the valid
//! messages as one batch, so the node is woken once per read, not once per message. A batch is
//! bounded by what one read completes: `READ_CHUNK_BYTES` plus the partial frame before it.
//!
//! The reader also answers the handshake: a valid Hello gets Welcome, or, with a cluster
//! password set, a Challenge whose Response must verify before Welcome is sent (see frame.rs).
//!
//! Invariants: a connection forwards nothing before a valid Hello for this cluster and this
//! node, and, with a password set, nothing before a verified Response; any framing error
//! closes that connection only; at most `MAX_INBOUND_CONNS` readers
//! exist at once; every blocking call is bounded by a timeout so `stop` is seen promptly.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{SendTimeoutError, Sender};
use raft::eraftpb::Message;

use super::conn::{self, Conn, FirstBytes};
use super::frame::{self, Frame, FrameDecoder, Hello};
use super::{lock, LocalIdentity};

/// Inbound connections served at once; a healthy cluster needs one per peer.
pub(crate) const MAX_INBOUND_CONNS: usize = 64;
/// How long the acceptor sleeps when no connection is pending.
const ACCEPT_POLL: Duration = Duration::from_millis(20);
/// Bounds each blocking read, so readers notice `stop`.
const READ_TIMEOUT: Duration = Duration::from_millis(100);
/// A connection that has not sent a valid Hello by then is closed.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A challenged connection that has not answered by then is refused.
const AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds each handshake write (the frames are tiny; only a stuck peer trips this).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// A peer that keeps failing the password check is warned about at most this often; its
/// reconnects in between log at debug level.
const AUTH_WARN_EVERY: Duration = Duration::from_secs(60);
/// Bound on the nodes remembered for `AUTH_WARN_EVERY` (ids come from the network).
const AUTH_WARN_NODES_MAX: usize = 1024;
/// Why an unauthenticated peer is refused, in our log and in the Reject it is sent.
pub(crate) const AUTH_FAILED: &str = "wrong or missing raft.cluster-password";
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Bounds each attempt to hand a batch to the node, so readers notice `stop`.
const FORWARD_TIMEOUT: Duration = Duration::from_millis(100);

/// An accepted connection: a clone of its socket (to close it on shutdown) and its reader.
pub(crate) struct InboundConn {
    stream: TcpStream,
    thread: JoinHandle<()>,
}

impl InboundConn {
    /// Closes the socket and returns the reader thread for the caller to join.
    pub(crate) fn close(self) -> JoinHandle<()> {
        let _ = self.stream.shutdown(Shutdown::Both);
        self.thread
    }
}

pub(crate) struct Acceptor {
    pub(crate) listener: TcpListener,
    pub(crate) local: Arc<LocalIdentity>,
    pub(crate) inbound: Sender<Vec<Message>>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) conns: Arc<Mutex<Vec<InboundConn>>>,
    /// When each node last had a failed password check warned about.
    pub(crate) auth_warned: Arc<Mutex<HashMap<u64, Instant>>>,
    /// When each (peer address, reason) of a refused TLS connection was last warned about.
    pub(crate) tls_warned: Arc<Mutex<HashMap<(std::net::IpAddr, String), Instant>>>,
}

impl Acceptor {
    pub(crate) fn run(self) {
        while !self.stop.load(Ordering::Acquire) {
            match self.listener.accept() {
                Ok((stream, addr)) => self.admit(stream, addr),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // E.g. out of file descriptors: do not spin, try again shortly.
                    tracing::warn!(error = %e, "raft bus: accept failed: {e}");
                    std::thread::sleep(ACCEPT_POLL);
                }
            }
        }
    }

    fn admit(&self, stream: TcpStream, addr: SocketAddr) {
        let mut conns = lock(&self.conns);
        let (done, live): (Vec<_>, Vec<_>) = std::mem::take(&mut *conns)
            .into_iter()
            .partition(|c| c.thread.is_finished());
        *conns = live;
        for c in done {
            let _ = c.thread.join();
        }
        if conns.len() >= MAX_INBOUND_CONNS {
            tracing::warn!(peer = %addr,
                "raft bus: refusing connection from {addr}: already {MAX_INBOUND_CONNS} inbound connections");
            return;
        }
        let clone = match prepare(&stream) {
            Ok(clone) => clone,
            Err(e) => {
                tracing::warn!(peer = %addr, error = %e, "raft bus: cannot set up connection from {addr}: {e}");
                return;
            }
        };
        let reader = Reader {
            stream: Conn::Plain(stream),
            addr,
            local: Arc::clone(&self.local),
            inbound: self.inbound.clone(),
            stop: Arc::clone(&self.stop),
            auth_warned: Arc::clone(&self.auth_warned),
            tls_warned: Arc::clone(&self.tls_warned),
        };
        match std::thread::Builder::new()
            .name(format!("raft-bus-r{addr}"))
            .spawn(move || reader.run())
        {
            Ok(thread) => conns.push(InboundConn {
                stream: clone,
                thread,
            }),
            Err(e) => {
                tracing::warn!(peer = %addr, error = %e, "raft bus: cannot start a reader for {addr}: {e}");
            }
        }
    }
}

fn prepare(stream: &TcpStream) -> io::Result<TcpStream> {
    // Accepted sockets must block (with a timeout) whatever the listener's mode.
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    stream.set_nodelay(true)?;
    stream.try_clone()
}

struct Reader {
    stream: Conn,
    addr: SocketAddr,
    local: Arc<LocalIdentity>,
    inbound: Sender<Vec<Message>>,
    stop: Arc<AtomicBool>,
    auth_warned: Arc<Mutex<HashMap<u64, Instant>>>,
    tls_warned: Arc<Mutex<HashMap<(std::net::IpAddr, String), Instant>>>,
}

/// Where a connection is in the handshake.
enum Auth {
    AwaitHello,
    /// Challenged with `nonce` at `since`; waiting for the Response.
    AwaitResponse {
        nonce: [u8; frame::AUTH_BYTES],
        since: Instant,
    },
    /// Welcomed: Raft messages are forwarded.
    Open,
}

/// Per-connection state the frame handling updates.
struct ConnState {
    hello: Option<Hello>,
    auth: Auth,
    /// Messages dropped because their from/to does not match the Hello.
    misrouted: u64,
    /// A snapshot file arriving in chunks, ahead of its MsgSnapshot.
    snapshot: Option<SnapshotRecv>,
}

struct SnapshotRecv {
    index: u64,
    total: u64,
    received: u64,
    file: std::fs::File,
}

/// Where a snapshot file is written while it arrives, next to where it goes once complete.
pub(crate) fn snapshot_recv_tmp(recv: &std::path::Path) -> std::path::PathBuf {
    let mut p = recv.as_os_str().to_owned();
    p.push(".tmp");
    p.into()
}

impl ConnState {
    /// Writes one chunk of an arriving snapshot file. Err: why the connection must close.
    fn receive_chunk(
        &mut self,
        local: &LocalIdentity,
        c: frame::SnapshotChunk,
    ) -> Result<(), String> {
        let Some(recv) = &local.snapshot_recv else {
            return Err("this node does not take snapshots over the bus".into());
        };
        let tmp = snapshot_recv_tmp(recv);
        if c.offset == 0 {
            let file = std::fs::File::create(&tmp)
                .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
            self.snapshot = Some(SnapshotRecv {
                index: c.index,
                total: c.total,
                received: 0,
                file,
            });
        }
        let Some(s) = self.snapshot.as_mut() else {
            return Err("snapshot chunk without the start of its file".into());
        };
        if s.index != c.index || s.total != c.total || s.received != c.offset {
            return Err(format!(
                "snapshot chunk out of order (index {} offset {}, expected index {} offset {})",
                c.index, c.offset, s.index, s.received
            ));
        }
        s.file
            .write_all(&c.data)
            .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        s.received += c.data.len() as u64;
        Ok(())
    }
}

/// The file for a MsgSnapshot at `index` is complete: make it durable under its final name.
/// Err: the message must be dropped (the leader sends the snapshot again).
fn finish_snapshot(
    arriving: &mut Option<SnapshotRecv>,
    local: &LocalIdentity,
    index: u64,
) -> Result<(), String> {
    {
        let Some(recv) = &local.snapshot_recv else {
            return Err("this node does not take snapshots over the bus".into());
        };
        let s = arriving
            .take()
            .ok_or("no snapshot file came before the message")?;
        if s.index != index || s.received != s.total {
            return Err(format!(
                "the snapshot file is incomplete or for another index ({} of {} bytes, index {} for message index {index})",
                s.received, s.total, s.index
            ));
        }
        let tmp = snapshot_recv_tmp(recv);
        s.file
            .sync_all()
            .and_then(|()| std::fs::rename(&tmp, recv))
            .map_err(|e| format!("cannot keep the snapshot file {}: {e}", recv.display()))
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        // The registry holds a clone of this socket, so dropping ours alone would not close it.
        let _ = self.stream.tcp().shutdown(Shutdown::Both);
    }
}

/// Why a plain-TCP node is refused by a TLS bus, in our log and in the Reject it is sent.
pub(crate) const TLS_REQUIRED: &str =
    "this node's bus requires TLS (raft.tls-enabled yes), and this connection is plain TCP";

impl Reader {
    /// Looks at what the peer speaks before anything is decoded and, on a TLS bus, runs the
    /// TLS handshake. False (logged) when the connection must close.
    fn open(&mut self) -> bool {
        let addr = self.addr;
        let deadline = Instant::now() + HELLO_TIMEOUT;
        let stop = Arc::clone(&self.stop);
        let stopping = move || stop.load(Ordering::Acquire);
        let first = match conn::sniff(self.stream.tcp(), deadline, &stopping) {
            Ok(first) => first,
            Err(e) => {
                tracing::debug!(peer = %addr, error = %e, "raft bus: connection from {addr} failed: {e}");
                return false;
            }
        };
        let Some(tls) = &self.local.tls else {
            if let FirstBytes::Tls = first {
                self.warn_refused(
                    "it speaks TLS, and this node's bus is plain TCP (raft.tls-enabled no here; set it alike on every node)",
                );
                return false;
            }
            return true;
        };
        match first {
            FirstBytes::Tls => {}
            FirstBytes::Bus => {
                self.warn_refused(TLS_REQUIRED);
                // In plain frames, so the peer's log says why too (best effort). What it
                // sent is read first: closing over unread bytes resets the connection, and
                // the peer could lose the Reject.
                let mut sink = vec![0u8; READ_CHUNK_BYTES];
                let _ = self.stream.read(&mut sink);
                let mut buf = Vec::new();
                frame::encode_reject(TLS_REQUIRED, &mut buf);
                let _ = self.stream.send_all(&buf);
                return false;
            }
            FirstBytes::Other => {
                self.warn_refused("not a TLS record (this node's bus requires TLS)");
                return false;
            }
            FirstBytes::Nothing => {
                tracing::debug!(peer = %addr, "raft bus: connection from {addr} sent nothing");
                return false;
            }
        }
        let Some(cfg) = tls.current() else {
            tracing::warn!(peer = %addr,
                "raft bus: refusing connection from {addr}: raft.tls-enabled is on but no TLS configuration is loaded");
            return false;
        };
        let tcp = match self.stream.tcp().try_clone() {
            Ok(tcp) => tcp,
            Err(e) => {
                tracing::warn!(peer = %addr, error = %e, "raft bus: cannot set up connection from {addr}: {e}");
                return false;
            }
        };
        let stop = Arc::clone(&self.stop);
        match conn::accept_tls(tcp, &cfg, deadline, &move || stop.load(Ordering::Acquire)) {
            Ok(tls) => {
                self.stream = tls;
                true
            }
            Err(e) => {
                self.warn_refused(&format!(
                    "TLS handshake failed: {}",
                    crate::tls::describe_failure(&e)
                ));
                false
            }
        }
    }

    /// A refused connection: warned about once per peer address and reason every
    /// `AUTH_WARN_EVERY` (a refused peer reconnects every second); in between at debug level.
    fn warn_refused(&self, why: &str) {
        let addr = self.addr;
        let due = {
            let mut warned = lock(&self.tls_warned);
            let key = (addr.ip(), why.to_owned());
            let due = warned
                .get(&key)
                .is_none_or(|at| at.elapsed() >= AUTH_WARN_EVERY);
            if due {
                if warned.len() >= AUTH_WARN_NODES_MAX {
                    warned.clear();
                }
                warned.insert(key, Instant::now());
            }
            due
        };
        if due {
            tracing::warn!(peer = %addr, "raft bus: refusing connection from {addr}: {why}");
        } else {
            tracing::debug!(peer = %addr, "raft bus: refusing connection from {addr}: {why}");
        }
    }

    fn run(mut self) {
        if !self.open() {
            return;
        }
        let mut conn = ConnState {
            hello: None,
            auth: Auth::AwaitHello,
            misrouted: 0,
            snapshot: None,
        };
        self.serve(&mut conn);
        if let (Some(h), Auth::Open) = (&conn.hello, &conn.auth) {
            if !self.stop.load(Ordering::Acquire) {
                // The raft thread may check whether the peer's process is gone.
                let m = super::Report::InboundClosed(h.from).message(self.local.node_id);
                let _ = self.inbound.try_send(vec![m]);
            }
        }
    }

    /// Reads and forwards until the connection ends or must be closed.
    fn serve(&mut self, conn: &mut ConnState) {
        let addr = self.addr;
        let mut decoder = FrameDecoder::new(self.local.max_frame_bytes);
        let mut chunk = vec![0u8; READ_CHUNK_BYTES];
        let accepted_at = Instant::now();
        while !self.stop.load(Ordering::Acquire) {
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    tracing::debug!(peer = %addr, "raft bus: connection from {addr} closed by peer");
                    return;
                }
                Ok(n) => decoder.push(&chunk[..n]),
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    if conn.hello.is_none() && accepted_at.elapsed() > HELLO_TIMEOUT {
                        tracing::warn!(peer = %addr,
                            "raft bus: closing connection from {addr}: no hello within {HELLO_TIMEOUT:?}");
                        return;
                    }
                    if let Auth::AwaitResponse { since, .. } = conn.auth {
                        if since.elapsed() > AUTH_TIMEOUT {
                            self.refuse(
                                conn,
                                &format!("no response to the challenge within {AUTH_TIMEOUT:?}"),
                            );
                            return;
                        }
                    }
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(peer = %addr, error = %e, "raft bus: connection from {addr} failed: {e}");
                    return;
                }
            }
            let mut batch = Vec::new();
            let keep = self.decode_all(&mut decoder, conn, &mut batch);
            // Messages that came before a bad frame are valid: the node gets them either way.
            if !batch.is_empty() && !self.forward(batch) {
                return;
            }
            if !keep {
                return;
            }
        }
    }

    /// Moves every complete frame out of `decoder`, appending the valid messages to `batch`.
    /// False when the connection must be closed (the reason is logged here).
    fn decode_all(
        &mut self,
        decoder: &mut FrameDecoder,
        conn: &mut ConnState,
        batch: &mut Vec<Message>,
    ) -> bool {
        let addr = self.addr;
        loop {
            let frame = match decoder.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => return true,
                Err(e) => {
                    let who = describe(&conn.hello);
                    tracing::warn!(peer = %addr, error = %e,
                        "raft bus: closing connection from {addr}{who}: {e}");
                    return false;
                }
            };
            match frame {
                Frame::Hello(h) => {
                    if conn.hello.is_some() {
                        tracing::warn!(peer = %addr, "raft bus: closing connection from {addr}{}: second hello",
                            describe(&conn.hello));
                        return false;
                    }
                    if let Err(why) = check_hello(&h, &self.local) {
                        tracing::warn!(peer = %addr, from = h.from, cluster_id = %h.cluster_id,
                            "raft bus: refusing connection from {addr} (claims node {} of cluster {:?}): {why}",
                            h.from, h.cluster_id);
                        // Tell the peer why, so its log says it too (best effort).
                        self.send(conn, |out| frame::encode_reject(&why, out));
                        return false;
                    }
                    let from = h.from;
                    conn.hello = Some(h);
                    if self.local.password.is_empty() {
                        if !self.send(conn, frame::encode_welcome) {
                            return false;
                        }
                        conn.auth = Auth::Open;
                        tracing::info!(peer = %addr, from,
                            "raft bus: accepted connection from node {from} at {addr}");
                        continue;
                    }
                    let nonce = match frame::new_nonce() {
                        Ok(nonce) => nonce,
                        Err(e) => {
                            tracing::warn!(peer = %addr, from, error = %e,
                                "raft bus: closing connection from {addr} (node {from}): no random nonce for the challenge: {e}");
                            return false;
                        }
                    };
                    if !self.send(conn, |out| frame::encode_challenge(&nonce, out)) {
                        return false;
                    }
                    conn.auth = Auth::AwaitResponse {
                        nonce,
                        since: Instant::now(),
                    };
                }
                Frame::Response(tag) => {
                    let (Some(h), Auth::AwaitResponse { nonce, .. }) = (&conn.hello, &conn.auth)
                    else {
                        tracing::warn!(peer = %addr, "raft bus: closing connection from {addr}{}: unexpected response frame",
                            describe(&conn.hello));
                        return false;
                    };
                    let verified = frame::verify_auth_tag(
                        &self.local.password,
                        nonce,
                        &self.local.cluster_id,
                        h.from,
                        self.local.node_id,
                        &tag,
                    );
                    if !verified {
                        self.refuse(conn, "response does not match");
                        return false;
                    }
                    if !self.send(conn, frame::encode_welcome) {
                        return false;
                    }
                    let from = h.from;
                    conn.auth = Auth::Open;
                    tracing::info!(peer = %addr, from,
                        "raft bus: accepted connection from node {from} at {addr} (cluster password verified)");
                }
                Frame::SnapshotChunk(c) => {
                    if conn.hello.is_none() || !matches!(conn.auth, Auth::Open) {
                        self.refuse(conn, "snapshot data before the handshake");
                        return false;
                    }
                    if let Err(why) = conn.receive_chunk(&self.local, c) {
                        tracing::warn!(peer = %addr, "raft bus: closing connection from {addr}{}: {why}",
                            describe(&conn.hello));
                        conn.snapshot = None;
                        return false;
                    }
                }
                Frame::Challenge(_) | Frame::Welcome | Frame::Reject(_) => {
                    tracing::warn!(peer = %addr, "raft bus: closing connection from {addr}{}: unexpected handshake frame",
                        describe(&conn.hello));
                    return false;
                }
                Frame::Raft(msg) => {
                    let Some(h) = &conn.hello else {
                        tracing::warn!(peer = %addr,
                            "raft bus: closing connection from {addr}: raft message before hello");
                        return false;
                    };
                    if !matches!(conn.auth, Auth::Open) {
                        self.refuse(conn, "raft message before the challenge was answered");
                        return false;
                    }
                    if self
                        .local
                        .any_removed
                        .load(std::sync::atomic::Ordering::Acquire)
                        && super::read(&self.local.removed).contains(&h.from)
                    {
                        // It reconnects, and its Hello is refused with the reason.
                        tracing::info!(peer = %addr, from = h.from,
                            "raft bus: closing the connection of node {} (removed from the cluster)", h.from);
                        return false;
                    }
                    if msg.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
                        let index = msg.get_snapshot().get_metadata().index;
                        if let Err(why) = finish_snapshot(&mut conn.snapshot, &self.local, index) {
                            tracing::warn!(peer = %addr, from = h.from,
                                "raft bus: dropping a snapshot message from node {} (index {index}): {why}", h.from);
                            continue;
                        }
                        tracing::info!(peer = %addr, from = h.from,
                            "raft bus: received snapshot file for index {index} from node {}", h.from);
                    }
                    if super::local_only(msg.get_msg_type()) {
                        tracing::debug!(peer = %addr, from = h.from, msg_type = msg.msg_type,
                            "raft bus: dropping a local-only raft message type from node {}", h.from);
                        continue;
                    }
                    if msg.to != self.local.node_id || msg.from != h.from {
                        conn.misrouted += 1;
                        // Warn once per connection; a flood of these is one problem.
                        if conn.misrouted == 1 {
                            tracing::warn!(peer = %addr, from = h.from, msg_from = msg.from, msg_to = msg.to,
                                "raft bus: dropping message from node {} at {addr}: addressed from {} to {}, \
                                 this connection carries {} to {}",
                                h.from, msg.from, msg.to, h.from, self.local.node_id);
                        } else {
                            tracing::debug!(peer = %addr, msg_from = msg.from, msg_to = msg.to,
                                dropped = conn.misrouted, "raft bus: dropping misaddressed message");
                        }
                        continue;
                    }
                    batch.push(msg);
                }
            }
        }
    }

    /// Writes one handshake frame built by `encode`. False (logged) when the write fails.
    fn send(&mut self, conn: &ConnState, encode: impl FnOnce(&mut Vec<u8>)) -> bool {
        let mut buf = Vec::new();
        encode(&mut buf);
        match self.stream.send_all(&buf) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(peer = %self.addr, error = %e,
                    "raft bus: connection from {}{} failed during the handshake: {e}",
                    self.addr, describe(&conn.hello));
                false
            }
        }
    }

    /// A failed password check: warn (rate-limited per node) and tell the peer why, so its
    /// own log says so too. The caller then closes the connection.
    fn refuse(&mut self, conn: &ConnState, detail: &str) {
        let addr = self.addr;
        let from = conn.hello.as_ref().map_or(0, |h| h.from);
        let warn = {
            let mut warned = lock(&self.auth_warned);
            let due = warned
                .get(&from)
                .is_none_or(|at| at.elapsed() >= AUTH_WARN_EVERY);
            if due {
                if warned.len() >= AUTH_WARN_NODES_MAX {
                    warned.clear();
                }
                warned.insert(from, Instant::now());
            }
            due
        };
        if warn {
            tracing::warn!(peer = %addr, from,
                "raft bus: refusing connection from node {from} at {addr}: {AUTH_FAILED} ({detail})");
        } else {
            tracing::debug!(peer = %addr, from,
                "raft bus: refusing connection from node {from} at {addr}: {AUTH_FAILED} ({detail})");
        }
        self.send(conn, |out| frame::encode_reject(AUTH_FAILED, out));
    }

    /// Hands a batch to the node, waiting while its channel is full (back-pressure onto TCP).
    /// False when the node is gone or the transport stops.
    fn forward(&self, batch: Vec<Message>) -> bool {
        let mut batch = batch;
        loop {
            match self.inbound.send_timeout(batch, FORWARD_TIMEOUT) {
                Ok(()) => return true,
                Err(SendTimeoutError::Timeout(back)) => {
                    if self.stop.load(Ordering::Acquire) {
                        return false;
                    }
                    batch = back;
                }
                Err(SendTimeoutError::Disconnected(_)) => {
                    tracing::debug!(peer = %self.addr, "raft bus: inbound channel closed; dropping connection");
                    return false;
                }
            }
        }
    }
}

fn describe(hello: &Option<Hello>) -> String {
    match hello {
        Some(h) => format!(" (node {})", h.from),
        None => String::new(),
    }
}

fn check_hello(hello: &Hello, local: &LocalIdentity) -> Result<(), String> {
    if hello.version != frame::PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {} (this node speaks {})",
            hello.version,
            frame::PROTOCOL_VERSION
        ));
    }
    if hello.cluster_id != local.cluster_id {
        return Err(format!(
            "wrong cluster id {:?}, this node belongs to {:?}",
            hello.cluster_id, local.cluster_id
        ));
    }
    if hello.to != local.node_id {
        return Err(format!(
            "addressed to node {}, but this is node {}",
            hello.to, local.node_id
        ));
    }
    if hello.from == 0 {
        return Err("node id 0 is not a valid sender".to_owned());
    }
    if super::read(&local.removed).contains(&hello.from) {
        return Err(format!("node {} {}", hello.from, super::REMOVED_REASON));
    }
    if hello.from == local.node_id {
        return Err(format!(
            "sender claims this node's own id {} (duplicate node id?)",
            hello.from
        ));
    }
    Ok(())
}
