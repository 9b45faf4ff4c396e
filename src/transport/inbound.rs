//! Inbound side: the acceptor thread and one reader thread per accepted connection.
//!
//! A reader decodes every complete frame a socket read made available and forwards the valid
//! messages as one batch, so the node is woken once per read, not once per message. A batch is
//! bounded by what one read completes: `READ_CHUNK_BYTES` plus the partial frame before it.
//! When the node polls (a transport with a bell), a reader lends its connection to the raft
//! thread once the peer is welcomed on plain TCP, and ends (polled.rs); it is started again
//! for the connection while a snapshot file arrives.
//!
//! The reader also answers the handshake: a valid Hello gets Welcome, or, with a cluster
//! password set, a Challenge whose Response must verify before Welcome is sent (see frame.rs).
//!
//! Anyone who reaches the bus port can connect, so until a connection has completed its
//! handshake it is held to little: frames of at most `HANDSHAKE_FRAME_BYTES_MAX` (an
//! announced length beyond is refused from the header, before any of it is buffered),
//! `HANDSHAKE_TIMEOUT` from accept to Welcome, and at most `MAX_HANDSHAKING_CONNS` such
//! connections at once: another one closes the oldest of them, so a flood of idle or slow
//! connections cannot keep a real peer out (it would have to outpace a handshake, one round
//! trip). What such connections do wrong is warned about at most every `UNAUTH_WARN_EVERY`.
//!
//! Invariants: a connection forwards nothing before a valid Hello for this cluster and this
//! node, and, with a password set, nothing before a verified Response; any framing error
//! closes that connection only; at most `MAX_INBOUND_CONNS` connections, read by readers or
//! lent (of which at most `MAX_HANDSHAKING_CONNS` in their handshake), exist at once, plus
//! evicted ones on their way out; every blocking call is bounded by a timeout so `stop` is seen promptly.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::SendTimeoutError;
use raft::eraftpb::Message;

use super::bell::ToNode;
use super::conn::{self, Conn, FirstBytes};
use super::frame::{self, Frame, FrameDecoder, FrameKind, Hello};
use super::polled::{Lending, LentConn};
use super::{lock, LocalIdentity};

/// Inbound connections served at once; a healthy cluster needs one per peer.
pub(crate) const MAX_INBOUND_CONNS: usize = 64;
/// How long the acceptor sleeps when no connection is pending.
const ACCEPT_POLL: Duration = Duration::from_millis(20);
/// Bounds each blocking read, so readers notice `stop`.
const READ_TIMEOUT: Duration = Duration::from_millis(100);
/// Connections still in their handshake at once; one more closes the oldest of them.
pub(crate) const MAX_HANDSHAKING_CONNS: usize = 16;
/// From accept to Welcome (Hello, and with a password the Response): a connection still in
/// its handshake then is closed (a challenged one with a Reject saying why).
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest frame body before the handshake is complete: a Hello is at most 276 bytes, a
/// Response 32. Raised to `max_frame_bytes` at Welcome.
pub(crate) const HANDSHAKE_FRAME_BYTES_MAX: usize = 1024;
/// Connections that never completed a handshake (garbage, timeouts, evictions, a full table)
/// are warned about at most this often, and so are refused Hellos and failed password checks
/// (on a limit of their own); the others log at debug level and are counted in the next
/// warning.
const UNAUTH_WARN_EVERY: Duration = Duration::from_secs(10);
/// Bounds each handshake write (the frames are tiny; only a stuck peer trips this).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// A peer that keeps failing the password check is warned about at most this often; its
/// reconnects in between log at debug level.
const AUTH_WARN_EVERY: Duration = Duration::from_secs(60);
/// Bound on the nodes remembered for `AUTH_WARN_EVERY` (ids come from the network).
const AUTH_WARN_NODES_MAX: usize = 1024;
/// Why an unauthenticated peer is refused, in our log and in the Reject it is sent.
pub(crate) const AUTH_FAILED: &str = "wrong or missing raft.cluster-password";
pub(crate) const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Bounds each attempt to hand a batch to the node, so readers notice `stop`.
const FORWARD_TIMEOUT: Duration = Duration::from_millis(100);

/// An accepted connection: a clone of its socket (to close it on shutdown) and its reader.
pub(crate) struct InboundConn {
    stream: TcpStream,
    thread: JoinHandle<()>,
    phase: Arc<AtomicU8>,
}

/// `InboundConn::phase`: in the handshake, welcomed, or closed by the acceptor to make room.
const PHASE_HANDSHAKE: u8 = 0;
const PHASE_OPEN: u8 = 1;
const PHASE_EVICTED: u8 = 2;

/// One warning per `UNAUTH_WARN_EVERY` about connections that are not (yet) peers.
#[derive(Default)]
pub(crate) struct WarnLimit {
    /// When the last warning was logged, and how many were not since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl WarnLimit {
    /// Logs `msg` as a warning if one is due, else at debug level.
    fn warn(&self, addr: SocketAddr, msg: std::fmt::Arguments<'_>) {
        let suppressed = {
            let mut st = lock(&self.state);
            let due = st.0.is_none_or(|at| at.elapsed() >= UNAUTH_WARN_EVERY);
            if due {
                let n = st.1;
                *st = (Some(Instant::now()), 0);
                Some(n)
            } else {
                st.1 += 1;
                None
            }
        };
        match suppressed {
            Some(0) => tracing::warn!(peer = %addr, "raft bus: {msg}"),
            Some(n) => tracing::warn!(peer = %addr, suppressed = n,
                "raft bus: {msg} (and {n} similar since the last such warning, logged at debug level)"),
            None => tracing::debug!(peer = %addr, "raft bus: {msg}"),
        }
    }
}

impl InboundConn {
    /// Closes the socket and returns the reader thread for the caller to join.
    pub(crate) fn close(self) -> JoinHandle<()> {
        let _ = self.stream.shutdown(Shutdown::Both);
        self.thread
    }
}

/// When each (peer address, reason) of a refused TLS connection was last warned about.
pub(crate) type TlsWarned = Arc<Mutex<HashMap<(std::net::IpAddr, String), Instant>>>;

pub(crate) struct Acceptor {
    pub(crate) listener: TcpListener,
    pub(crate) local: Arc<LocalIdentity>,
    pub(crate) inbound: ToNode,
    /// Some: open plain-TCP connections are lent to the raft thread (polled.rs).
    pub(crate) lending: Option<Arc<Lending>>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) conns: Arc<Mutex<Vec<InboundConn>>>,
    /// When each node last had a failed password check warned about.
    pub(crate) auth_warned: Arc<Mutex<HashMap<u64, Instant>>>,
    pub(crate) unauth_warn: Arc<WarnLimit>,
    pub(crate) refusal_warn: Arc<WarnLimit>,
    pub(crate) tls_warned: TlsWarned,
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
        let phase_of = |c: &InboundConn| c.phase.load(Ordering::Acquire);
        let handshaking = conns
            .iter()
            .filter(|c| phase_of(c) == PHASE_HANDSHAKE)
            .count();
        let lent = self
            .lending
            .as_ref()
            .map_or(0, |l| l.count.load(Ordering::Acquire));
        let counted = lent
            + conns
                .iter()
                .filter(|c| phase_of(c) != PHASE_EVICTED)
                .count();
        // Evicted readers leave within a read; this bounds them if they are slow to.
        if conns.len() >= 2 * MAX_INBOUND_CONNS {
            self.unauth_warn.warn(
                addr,
                format_args!(
                    "refusing connection from {addr}: {} inbound connections still closing",
                    conns.len()
                ),
            );
            return;
        }
        if handshaking >= MAX_HANDSHAKING_CONNS || counted >= MAX_INBOUND_CONNS {
            // Make room by closing the oldest connection still in its handshake (they are in
            // accept order): idle connections cannot keep a peer out for long.
            let evicted = conns.iter().find(|c| {
                c.phase
                    .compare_exchange(
                        PHASE_HANDSHAKE,
                        PHASE_EVICTED,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .is_ok()
            });
            match evicted {
                Some(old) => {
                    let _ = old.stream.shutdown(Shutdown::Both);
                    let old_addr = old
                        .stream
                        .peer_addr()
                        .map_or_else(|_| "?".to_owned(), |a| a.to_string());
                    self.unauth_warn.warn(addr, format_args!(
                        "closing connection from {old_addr} (still in its handshake) to admit one from {addr}: \
                         {handshaking} connections in their handshake, {counted} in all (limits \
                         {MAX_HANDSHAKING_CONNS} and {MAX_INBOUND_CONNS})"));
                }
                None => {
                    self.unauth_warn.warn(addr, format_args!(
                        "refusing connection from {addr}: already {MAX_INBOUND_CONNS} inbound connections"));
                    return;
                }
            }
        }
        let clone = match prepare(&stream) {
            Ok(clone) => clone,
            Err(e) => {
                tracing::warn!(peer = %addr, error = %e, "raft bus: cannot set up connection from {addr}: {e}");
                return;
            }
        };
        let phase = Arc::new(AtomicU8::new(PHASE_HANDSHAKE));
        let reader = Reader {
            stream: Conn::Plain(stream),
            accepted_at: Instant::now(),
            tls_warned: Arc::clone(&self.tls_warned),
            handler: Handler {
                addr,
                local: Arc::clone(&self.local),
                auth_warned: Arc::clone(&self.auth_warned),
                unauth_warn: Arc::clone(&self.unauth_warn),
                refusal_warn: Arc::clone(&self.refusal_warn),
                phase: Arc::clone(&phase),
            },
            inbound: self.inbound.clone(),
            lending: self.lending.clone(),
            lent: false,
            stop: Arc::clone(&self.stop),
        };
        match std::thread::Builder::new()
            .name(format!("raft-bus-r{addr}"))
            .spawn(move || reader.run())
        {
            Ok(thread) => conns.push(InboundConn {
                stream: clone,
                thread,
                phase,
            }),
            Err(e) => {
                tracing::warn!(peer = %addr, error = %e, "raft bus: cannot start a reader for {addr}: {e}");
            }
        }
    }
}

/// Starts a reader thread for a connection the raft thread lent back (a snapshot chunk is
/// next), registered with the acceptor's connections so shutdown joins it.
pub(crate) fn resume_reader(
    c: LentConn,
    inbound: ToNode,
    lending: Arc<Lending>,
    stop: Arc<AtomicBool>,
    tls_warned: TlsWarned,
    registry: &Mutex<Vec<InboundConn>>,
) -> io::Result<()> {
    let LentConn {
        stream,
        decoder,
        conn,
        handler,
        pending,
        ..
    } = c;
    let clone = match stream
        .set_nonblocking(false)
        .and_then(|()| stream.try_clone())
    {
        Ok(clone) => clone,
        Err(e) => {
            let _ = stream.shutdown(Shutdown::Both);
            let mut last = pending;
            last.extend(handler.closed_report(&conn));
            if !last.is_empty() {
                let _ = inbound.try_send(last);
            }
            return Err(e);
        }
    };
    let addr = handler.addr;
    let phase = Arc::clone(&handler.phase);
    let closed = handler.closed_report(&conn);
    let on_fail = inbound.clone();
    let reader = Reader {
        stream: Conn::Plain(stream),
        handler,
        inbound,
        lending: Some(lending),
        lent: false,
        stop,
        accepted_at: Instant::now(),
        tls_warned,
    };
    let thread = std::thread::Builder::new()
        .name(format!("raft-bus-r{addr}"))
        .spawn(move || reader.resume(decoder, conn, pending))
        .inspect_err(|_| {
            // The reader was dropped unstarted, closing the socket.
            if let Some(m) = closed {
                let _ = on_fail.try_send(vec![m]);
            }
        })?;
    lock(registry).push(InboundConn {
        stream: clone,
        thread,
        phase,
    });
    Ok(())
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
    handler: Handler,
    inbound: ToNode,
    /// Some: the connection is lent to the raft thread once open (polled.rs).
    lending: Option<Arc<Lending>>,
    /// The socket went to the raft thread: not closed on drop.
    lent: bool,
    stop: Arc<AtomicBool>,
    /// The TLS and bus handshakes together must end within `HANDSHAKE_TIMEOUT` of this.
    accepted_at: Instant,
    tls_warned: TlsWarned,
}

/// What an inbound connection's frames are checked against and what they change, apart
/// from its socket (so the handshake can be fuzzed without one: `fuzz_inbound`).
#[derive(Clone)]
pub(crate) struct Handler {
    pub(crate) addr: SocketAddr,
    pub(crate) local: Arc<LocalIdentity>,
    pub(crate) auth_warned: Arc<Mutex<HashMap<u64, Instant>>>,
    /// Connections that are not (yet) peers: garbage, timeouts, evictions, a full table.
    pub(crate) unauth_warn: Arc<WarnLimit>,
    /// Hellos refused (wrong cluster, removed node...) and failed password checks: limited
    /// on their own, so a flood of the above does not hide a misconfigured peer.
    pub(crate) refusal_warn: Arc<WarnLimit>,
    /// Set to `PHASE_OPEN` at Welcome, unless the acceptor evicted the connection first.
    pub(crate) phase: Arc<AtomicU8>,
}

/// Where a connection is in the handshake.
pub(crate) enum Auth {
    AwaitHello,
    /// Challenged with `nonce`; waiting for the Response.
    AwaitResponse {
        nonce: [u8; frame::AUTH_BYTES],
    },
    /// Welcomed: Raft messages are forwarded.
    Open,
}

/// Per-connection state the frame handling updates.
pub(crate) struct ConnState {
    hello: Option<Hello>,
    auth: Auth,
    /// Messages dropped because their from/to does not match the Hello.
    misrouted: u64,
    /// A snapshot file arriving in chunks, ahead of its MsgSnapshot.
    snapshot: Option<SnapshotRecv>,
}

impl ConnState {
    pub(crate) fn new() -> ConnState {
        ConnState {
            hello: None,
            auth: Auth::AwaitHello,
            misrouted: 0,
            snapshot: None,
        }
    }

    /// The peer's node id, once it is welcomed.
    pub(crate) fn peer(&self) -> Option<u64> {
        match (&self.hello, &self.auth) {
            (Some(h), Auth::Open) => Some(h.from),
            _ => None,
        }
    }
}

/// What a reader does after decoding.
enum Step {
    Go,
    Lend(Vec<Message>),
    Close,
}

/// What `Handler::decode` left the connection as.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    Keep,
    /// Must be closed (the reason is logged).
    Close,
    /// Stopped before a snapshot chunk, as asked.
    ChunkNext,
}

pub(crate) struct SnapshotRecv {
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
        if self.lent {
            return;
        }
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
        let addr = self.handler.addr;
        let deadline = self.accepted_at + HANDSHAKE_TIMEOUT;
        let stop = Arc::clone(&self.stop);
        let stopping = move || stop.load(Ordering::Acquire);
        let first = match conn::sniff(self.stream.tcp(), deadline, &stopping) {
            Ok(first) => first,
            Err(e) => {
                tracing::debug!(peer = %addr, error = %e, "raft bus: connection from {addr} failed: {e}");
                return false;
            }
        };
        let Some(tls) = &self.handler.local.tls else {
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
        let addr = self.handler.addr;
        if warn_due(&self.tls_warned, (addr.ip(), why.to_owned())) {
            tracing::warn!(peer = %addr, "raft bus: refusing connection from {addr}: {why}");
        } else {
            tracing::debug!(peer = %addr, "raft bus: refusing connection from {addr}: {why}");
        }
    }

    fn run(mut self) {
        if !self.open() {
            return;
        }
        let decoder = FrameDecoder::new(HANDSHAKE_FRAME_BYTES_MAX);
        self.resume(decoder, ConnState::new(), Vec::new());
    }

    /// Serves the connection from where `decoder` and `conn` are: delivers `pending` first,
    /// then reads until the connection ends or is lent to the raft thread.
    fn resume(mut self, mut decoder: FrameDecoder, mut conn: ConnState, pending: Vec<Message>) {
        if !pending.is_empty() && !self.forward(pending) {
            return;
        }
        let lend = self.serve(&mut decoder, &mut conn);
        let closed = self.handler.closed_report(&conn);
        if let Some(batch) = lend {
            if self.lend(decoder, conn, batch) {
                return;
            }
            // Not lent (logged): the connection closes, and the node hears it below.
        }
        if let Some(m) = closed {
            if !self.stop.load(Ordering::Acquire) {
                let _ = self.inbound.try_send(vec![m]);
            }
        }
    }

    /// Whether the connection goes to the raft thread now: it is open, plain TCP, between
    /// snapshots, and the node polls lent connections.
    fn lendable(&self, conn: &ConnState) -> bool {
        self.lending.is_some()
            && matches!(self.stream, Conn::Plain(_))
            && matches!(conn.auth, Auth::Open)
            && conn.snapshot.is_none()
    }

    /// Hands the connection to the raft thread, with `pending` (decoded, not yet delivered).
    /// `conn` is consumed either way; false when it could not be lent (the caller closes).
    fn lend(&mut self, decoder: FrameDecoder, conn: ConnState, pending: Vec<Message>) -> bool {
        let Some(lending) = &self.lending else {
            return false;
        };
        let addr = self.handler.addr;
        let stream = match self
            .stream
            .tcp()
            .try_clone()
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(peer = %addr, error = %e, "raft bus: cannot hand the connection from {addr} to the raft thread: {e}");
                if !pending.is_empty() {
                    self.forward(pending);
                }
                return false;
            }
        };
        {
            let mut arriving = lock(&lending.arriving);
            // Checked under the lock shutdown empties `arriving` under: nothing lent after.
            if self.stop.load(Ordering::Acquire) {
                return false;
            }
            lending.count.fetch_add(1, Ordering::AcqRel);
            arriving.push(LentConn {
                stream,
                decoder,
                conn,
                handler: self.handler.clone(),
                pending,
                id: 0,
                main_watched: false,
            });
        }
        self.lent = true;
        self.inbound.ring();
        true
    }

    /// Reads and forwards until the connection ends or must be closed (None), or may be lent
    /// to the raft thread (Some: the messages decoded last, not yet forwarded).
    fn serve(&mut self, decoder: &mut FrameDecoder, conn: &mut ConnState) -> Option<Vec<Message>> {
        let addr = self.handler.addr;
        let mut chunk = vec![0u8; READ_CHUNK_BYTES];
        let accepted_at = self.accepted_at;
        // A connection the raft thread lent back holds its next frames already.
        match self.decode_buffered(decoder, conn) {
            Step::Go => {}
            Step::Lend(batch) => return Some(batch),
            Step::Close => return None,
        }
        while !self.stop.load(Ordering::Acquire) {
            // Checked on every pass, not only when a read times out: a peer trickling bytes
            // must not stretch its handshake.
            if !matches!(conn.auth, Auth::Open) && accepted_at.elapsed() > HANDSHAKE_TIMEOUT {
                if matches!(conn.auth, Auth::AwaitResponse { .. }) {
                    self.handler.refuse(
                        &mut self.stream,
                        conn,
                        &format!("no response to the challenge within {HANDSHAKE_TIMEOUT:?}"),
                    );
                } else {
                    self.handler.unauth_warn.warn(addr, format_args!(
                        "closing connection from {addr}: no valid hello within {HANDSHAKE_TIMEOUT:?}"));
                }
                return None;
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    tracing::debug!(peer = %addr, "raft bus: connection from {addr} closed by peer");
                    return None;
                }
                Ok(n) => decoder.push(&chunk[..n]),
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    continue;
                }
                Err(e) => {
                    tracing::debug!(peer = %addr, error = %e, "raft bus: connection from {addr} failed: {e}");
                    return None;
                }
            }
            match self.decode_buffered(decoder, conn) {
                Step::Go => {}
                Step::Lend(batch) => return Some(batch),
                Step::Close => return None,
            }
        }
        None
    }

    /// Decodes every complete frame buffered and forwards the messages, unless the
    /// connection is to be lent now (they go with it).
    fn decode_buffered(&mut self, decoder: &mut FrameDecoder, conn: &mut ConnState) -> Step {
        let mut batch = Vec::new();
        let keep = self
            .handler
            .decode_all(&mut self.stream, decoder, conn, &mut batch);
        if keep && self.lendable(conn) {
            return Step::Lend(batch);
        }
        // Messages that came before a bad frame are valid: the node gets them either way.
        if !batch.is_empty() && !self.forward(batch) {
            return Step::Close;
        }
        if keep {
            Step::Go
        } else {
            Step::Close
        }
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
                    tracing::debug!(peer = %self.handler.addr, "raft bus: inbound channel closed; dropping connection");
                    return false;
                }
            }
        }
    }
}

impl Handler {
    /// What tells the node that `conn`, once welcomed, has closed (the raft thread may then
    /// check whether the peer's process is gone); None before Welcome.
    pub(crate) fn closed_report(&self, conn: &ConnState) -> Option<Message> {
        conn.peer()
            .map(|from| super::Report::InboundClosed(from).message(self.local.node_id))
    }

    /// Moves every complete frame out of `decoder`, appending the valid messages to `batch`.
    /// False when the connection must be closed (the reason is logged here).
    pub(crate) fn decode_all(
        &self,
        out: &mut impl Write,
        decoder: &mut FrameDecoder,
        conn: &mut ConnState,
        batch: &mut Vec<Message>,
    ) -> bool {
        self.decode(out, decoder, conn, batch, false) != Decoded::Close
    }

    /// `decode_all`, which with `chunk_stops` stops before a snapshot chunk (left in
    /// `decoder`).
    pub(crate) fn decode(
        &self,
        out: &mut impl Write,
        decoder: &mut FrameDecoder,
        conn: &mut ConnState,
        batch: &mut Vec<Message>,
        chunk_stops: bool,
    ) -> Decoded {
        let addr = self.addr;
        loop {
            if chunk_stops && decoder.next_kind() == Some(FrameKind::SnapshotChunk as u8) {
                return Decoded::ChunkNext;
            }
            let frame = match decoder.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => return Decoded::Keep,
                Err(e) => {
                    let who = describe(&conn.hello);
                    self.close_warn(
                        conn,
                        format_args!("closing connection from {addr}{who}: {e}"),
                    );
                    return Decoded::Close;
                }
            };
            match frame {
                Frame::Hello(h) => {
                    if conn.hello.is_some() {
                        self.close_warn(
                            conn,
                            format_args!(
                                "closing connection from {addr}{}: second hello",
                                describe(&conn.hello)
                            ),
                        );
                        return Decoded::Close;
                    }
                    if let Err(why) = check_hello(&h, &self.local) {
                        self.refusal_warn.warn(addr, format_args!(
                            "refusing connection from {addr} (claims node {} of cluster {:?}): {why}",
                            h.from, h.cluster_id));
                        // Tell the peer why, so its log says it too (best effort).
                        self.send(out, conn, |buf| frame::encode_reject(&why, buf));
                        return Decoded::Close;
                    }
                    let from = h.from;
                    conn.hello = Some(h);
                    if self.local.password.is_empty() {
                        if !self.send(out, conn, frame::encode_welcome) || !self.open(decoder, conn)
                        {
                            return Decoded::Close;
                        }
                        tracing::info!(peer = %addr, from,
                            "raft bus: accepted connection from node {from} at {addr}");
                        continue;
                    }
                    let nonce = match frame::new_nonce() {
                        Ok(nonce) => nonce,
                        Err(e) => {
                            tracing::warn!(peer = %addr, from, error = %e,
                                "raft bus: closing connection from {addr} (node {from}): no random nonce for the challenge: {e}");
                            return Decoded::Close;
                        }
                    };
                    if !self.send(out, conn, |buf| frame::encode_challenge(&nonce, buf)) {
                        return Decoded::Close;
                    }
                    conn.auth = Auth::AwaitResponse { nonce };
                }
                Frame::Response(tag) => {
                    let (Some(h), Auth::AwaitResponse { nonce, .. }) = (&conn.hello, &conn.auth)
                    else {
                        self.close_warn(
                            conn,
                            format_args!(
                                "closing connection from {addr}{}: unexpected response frame",
                                describe(&conn.hello)
                            ),
                        );
                        return Decoded::Close;
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
                        self.refuse(out, conn, "response does not match");
                        return Decoded::Close;
                    }
                    let from = h.from;
                    if !self.send(out, conn, frame::encode_welcome) || !self.open(decoder, conn) {
                        return Decoded::Close;
                    }
                    tracing::info!(peer = %addr, from,
                        "raft bus: accepted connection from node {from} at {addr} (cluster password verified)");
                }
                Frame::SnapshotChunk(c) => {
                    if conn.hello.is_none() || !matches!(conn.auth, Auth::Open) {
                        self.refuse(out, conn, "snapshot data before the handshake");
                        return Decoded::Close;
                    }
                    if let Err(why) = conn.receive_chunk(&self.local, c) {
                        tracing::warn!(peer = %addr, "raft bus: closing connection from {addr}{}: {why}",
                            describe(&conn.hello));
                        conn.snapshot = None;
                        return Decoded::Close;
                    }
                }
                Frame::Challenge(_) | Frame::Welcome | Frame::Reject(_) => {
                    self.close_warn(
                        conn,
                        format_args!(
                            "closing connection from {addr}{}: unexpected handshake frame",
                            describe(&conn.hello)
                        ),
                    );
                    return Decoded::Close;
                }
                Frame::Raft(msg) => {
                    let Some(h) = &conn.hello else {
                        self.unauth_warn.warn(
                            addr,
                            format_args!(
                                "closing connection from {addr}: raft message before hello"
                            ),
                        );
                        return Decoded::Close;
                    };
                    if !matches!(conn.auth, Auth::Open) {
                        self.refuse(out, conn, "raft message before the challenge was answered");
                        return Decoded::Close;
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
                        return Decoded::Close;
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

    /// The handshake is complete: full-size frames from now on. False when the acceptor
    /// closed this connection meanwhile to make room (it is not a peer's then).
    fn open(&self, decoder: &mut FrameDecoder, conn: &mut ConnState) -> bool {
        let admitted = self
            .phase
            .compare_exchange(
                PHASE_HANDSHAKE,
                PHASE_OPEN,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if admitted {
            conn.auth = Auth::Open;
            decoder.set_max_body_bytes(self.local.max_frame_bytes);
        }
        admitted
    }

    /// Warns about a connection being closed: always for a peer past its handshake, at most
    /// every `UNAUTH_WARN_EVERY` for the others (anyone can open those).
    fn close_warn(&self, conn: &ConnState, msg: std::fmt::Arguments<'_>) {
        if matches!(conn.auth, Auth::Open) {
            tracing::warn!(peer = %self.addr, "raft bus: {msg}");
        } else {
            self.unauth_warn.warn(self.addr, msg);
        }
    }

    /// Writes one handshake frame built by `encode`. False (logged) when the write fails.
    fn send(
        &self,
        out: &mut impl Write,
        conn: &ConnState,
        encode: impl FnOnce(&mut Vec<u8>),
    ) -> bool {
        let mut buf = Vec::new();
        encode(&mut buf);
        // Flushed: over TLS, rustls holds records until then.
        match out.write_all(&buf).and_then(|()| out.flush()) {
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
    pub(crate) fn refuse(&self, out: &mut impl Write, conn: &ConnState, detail: &str) {
        let addr = self.addr;
        let from = conn.hello.as_ref().map_or(0, |h| h.from);
        if warn_due(&self.auth_warned, from) {
            // Also under the global limit: node ids are the peer's word, anyone may vary them.
            self.refusal_warn.warn(
                addr,
                format_args!(
                    "refusing connection from node {from} at {addr}: {AUTH_FAILED} ({detail})"
                ),
            );
        } else {
            tracing::debug!(peer = %addr, from,
                "raft bus: refusing connection from node {from} at {addr}: {AUTH_FAILED} ({detail})");
        }
        self.send(out, conn, |out| frame::encode_reject(AUTH_FAILED, out));
    }
}

/// Whether `key` is due a warning (none in the last `AUTH_WARN_EVERY`); if so, notes it now.
/// At most `AUTH_WARN_NODES_MAX` keys are remembered.
fn warn_due<K: std::hash::Hash + Eq>(warned: &Mutex<HashMap<K, Instant>>, key: K) -> bool {
    let mut warned = lock(warned);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warn_limit_warns_once_per_period_and_counts_the_rest() {
        let limit = WarnLimit::default();
        let addr = SocketAddr::from(([127, 0, 0, 1], 1));
        for _ in 0..3 {
            limit.warn(addr, format_args!("x"));
        }
        let (at, suppressed) = *lock(&limit.state);
        assert!(at.is_some());
        assert_eq!(suppressed, 2);
        // Once the period is over, the next one warns (and reports the count).
        lock(&limit.state).0 = Some(Instant::now() - UNAUTH_WARN_EVERY);
        limit.warn(addr, format_args!("x"));
        assert_eq!(lock(&limit.state).1, 0);
    }
}
