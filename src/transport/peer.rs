//! Outbound side: one writer thread per peer, fed by a bounded queue.
//!
//! Each queue item is a batch: all the messages one `Transport::send` call had for this peer, so
//! a call wakes the writer once, not once per message. The writer connects, sends its Hello,
//! waits for the acceptor's Welcome (answering a password Challenge first if asked), then drains the queued batches into one buffer per socket write. On any error it closes the
//! socket and reconnects with exponential backoff.
//!
//! Direct sends: while the writer is connected and idle (nothing queued, nothing pending) it
//! lends its socket to senders (`Direct`): `enqueue` then encodes the batch and writes it
//! itself without blocking (MSG_DONTWAIT), so the common case costs no wake-up of the writer.
//! What the socket does not take at once goes to the writer, which takes the socket back and
//! writes it first. Order is kept: a batch goes direct only while nothing is queued, and the
//! writer lends the socket only while nothing is queued, both decided under the same lock.
//!
//! Invariant: only the writer thread reads from the queue, and it reads only while connected, so
//! a disconnected peer holds at most `QUEUE_MSGS_MAX` messages (queued, or taken from the queue
//! but not yet encoded); senders shed the rest.

use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use raft::eraftpb::Message;

use super::conn::{self, Conn};
use super::frame::{self, Frame, FrameDecoder, Hello};
use super::{lock, LocalIdentity, PeerState, PeerStatus, Report};

/// Messages a peer may have waiting; beyond this `send` drops (Raft retransmits). Counted in
/// messages, not batches, so many small sends cannot hold more than a few large ones.
pub(crate) const QUEUE_MSGS_MAX: usize = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A write that makes no progress for this long means the peer is gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// From the Hello to the acceptor's Welcome (or Reject), challenge round included.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshake frames are tiny; anything larger is not a well-behaved acceptor.
const HANDSHAKE_FRAME_BYTES_MAX: usize = 1024;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// One socket write carries at most this much (a single larger message still goes alone).
const BATCH_BYTES_MAX: usize = 1 << 20;
/// One socket write carries at most this many messages.
const BATCH_MSGS_MAX: usize = 4096;
/// With nothing to send for this long, check whether the peer closed the connection, so
/// `PeerStatus` does not report a dead link as connected.
const IDLE_CHECK: Duration = Duration::from_millis(500);
/// A lost connection is retried at once (not after a backoff) at most this often.
const RECONNECT_AT_ONCE_EVERY: Duration = Duration::from_secs(1);
/// A refusal this soon after losing the connection is reported as the peer looking gone.
const REFUSED_REPORT_WITHIN: Duration = Duration::from_secs(1);
/// How soon a connection reset right after a loss is retried.
const DYING_RETRY: Duration = Duration::from_millis(5);
/// After `check_link`, the connection is looked at this often for this long (a dying peer's
/// sockets close one after another).
const CHECK_POLL: Duration = Duration::from_millis(5);
const CHECK_WINDOW: Duration = Duration::from_millis(200);
/// Snapshot files travel in chunks of this size (well under any frame limit).
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// Shrink the batch buffer back after an unusually large batch.
const BUF_KEEP_BYTES: usize = 4 * BATCH_BYTES_MAX;

/// State shared between a peer's handle (in `Transport`) and its writer thread.
struct PeerShared {
    id: u64,
    addr: Mutex<String>,
    /// Bumped on every address change; the writer reconnects when it sees a new value.
    addr_generation: AtomicU64,
    link: Mutex<Link>,
    conn_oks: AtomicU64,
    conn_errors: AtomicU64,
    dropped_msgs: AtomicU64,
    /// Messages in the queue or in the writer's `pending`: reserved by `enqueue` before the push,
    /// released by the writer once encoded (or dropped), so it never undercounts.
    queued_msgs: AtomicUsize,
    stop: AtomicBool,
    /// A clone of the live socket, so `stop` can unblock a writer stuck in `write`.
    conn: Mutex<Option<TcpStream>>,
    /// The socket lent to senders while the writer is idle (see the module comment).
    direct: Mutex<Direct>,
    /// Capacity 1: "look at your flags". Never blocks the caller.
    wake: Sender<()>,
    /// Set by `check_link`: look at once whether the peer closed the connection.
    check: AtomicBool,
}

struct Link {
    state: PeerState,
    last_connected: Option<Instant>,
}

#[derive(Default)]
struct Direct {
    /// Lent by the idle writer; None while it connects, writes, or is woken.
    stream: Option<TcpStream>,
    /// Encoded messages the lent socket did not take at once, for the writer to send first,
    /// and how many messages they hold.
    leftover: Vec<u8>,
    leftover_msgs: u64,
    /// The encoding buffer, kept between sends.
    buf: Vec<u8>,
}

impl PeerShared {
    fn set_state(&self, state: PeerState) {
        lock(&self.link).state = state;
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn wake(&self) {
        let _ = self.wake.try_send(());
    }

    fn close_conn(&self) {
        if let Some(conn) = lock(&self.conn).take() {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }
}

/// The transport's handle on one peer.
pub(crate) struct PeerHandle {
    shared: Arc<PeerShared>,
    local: Arc<LocalIdentity>,
    queue: Sender<Vec<Message>>,
    thread: Option<JoinHandle<()>>,
}

impl PeerHandle {
    pub(crate) fn spawn(id: u64, addr: &str, local: Arc<LocalIdentity>) -> io::Result<PeerHandle> {
        // Every batch holds at least one counted message, so `queued_msgs` refuses a batch
        // before this channel can be full.
        let (queue_tx, queue_rx) = crossbeam_channel::bounded(QUEUE_MSGS_MAX);
        let (wake_tx, wake_rx) = crossbeam_channel::bounded(1);
        let shared = Arc::new(PeerShared {
            id,
            addr: Mutex::new(addr.to_owned()),
            addr_generation: AtomicU64::new(0),
            link: Mutex::new(Link {
                state: PeerState::Disconnected,
                last_connected: None,
            }),
            conn_oks: AtomicU64::new(0),
            conn_errors: AtomicU64::new(0),
            dropped_msgs: AtomicU64::new(0),
            queued_msgs: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            conn: Mutex::new(None),
            direct: Mutex::new(Direct::default()),
            wake: wake_tx,
            check: AtomicBool::new(false),
        });
        let writer = Writer {
            shared: Arc::clone(&shared),
            queue: queue_rx,
            wake: wake_rx,
            local: Arc::clone(&local),
            buf: Vec::new(),
            pending: Vec::new().into_iter(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("raft-bus-w{id}"))
            .spawn(move || writer.run())?;
        Ok(PeerHandle {
            shared,
            local,
            queue: queue_tx,
            thread: Some(thread),
        })
    }

    /// Never blocks. Queues as much of `batch` as fits under `QUEUE_MSGS_MAX` as one item (one
    /// wake-up of the writer); the tail that does not fit, or everything if the writer is gone,
    /// is dropped and counted. Keeping the head preserves the order Raft sent in.
    pub(crate) fn enqueue(&self, mut batch: Vec<Message>) {
        let wanted = batch.len();
        if wanted == 0 {
            return;
        }
        // Held until the batch is written or queued: the writer decides under it whether to
        // lend its socket, so the two never see different answers to "is anything queued".
        let mut direct = lock(&self.shared.direct);
        if direct.stream.is_some()
            && self.shared.queued_msgs.load(Ordering::Relaxed) == 0
            && !batch
                .iter()
                .any(|m| m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot)
        {
            self.send_direct(&mut direct, &batch);
            return;
        }
        // Relaxed: a plain counter; the channel itself publishes the messages to the writer.
        let reserved = match self.shared.queued_msgs.fetch_update(
            Ordering::Relaxed,
            Ordering::Relaxed,
            |queued| {
                let room = QUEUE_MSGS_MAX.saturating_sub(queued);
                (room > 0).then(|| queued + room.min(wanted))
            },
        ) {
            Ok(queued) => (QUEUE_MSGS_MAX - queued).min(wanted),
            Err(_) => 0,
        };
        if reserved < wanted {
            batch.truncate(reserved);
            self.shared
                .dropped_msgs
                .fetch_add((wanted - reserved) as u64, Ordering::Relaxed);
        }
        if reserved == 0 {
            return;
        }
        match self.queue.try_send(batch) {
            Ok(()) => {}
            Err(TrySendError::Full(batch)) | Err(TrySendError::Disconnected(batch)) => {
                self.shared
                    .queued_msgs
                    .fetch_sub(batch.len(), Ordering::Relaxed);
                self.shared
                    .dropped_msgs
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
        }
    }

    /// Encodes `batch` and writes what the lent socket takes without blocking; the rest is
    /// handed to the writer (which is woken to send it before anything else).
    fn send_direct(&self, direct: &mut Direct, batch: &[Message]) {
        let d = &mut *direct;
        d.buf.clear();
        let mut encoded: u64 = 0;
        for msg in batch {
            match frame::encode_message(msg, self.local.max_frame_bytes, &mut d.buf) {
                Ok(()) => encoded += 1,
                Err(e) => {
                    self.shared.dropped_msgs.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(peer_id = self.shared.id, error = %e, msg_type = msg.msg_type,
                        "raft bus: dropping message to node {}: {e}", self.shared.id);
                }
            }
        }
        let Some(stream) = d.stream.as_ref() else {
            return;
        };
        let mut sent = 0;
        while sent < d.buf.len() {
            let rest = &d.buf[sent..];
            // SAFETY: the fd is the lent socket's, open for as long as `d.stream` holds it;
            // the pointer and length describe `rest`.
            let n = unsafe {
                libc::send(
                    std::os::fd::AsRawFd::as_raw_fd(stream),
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n > 0 {
                sent += n as usize;
                continue;
            }
            if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // Full (or failed): the writer takes the socket back and sends the rest, or
            // runs into the error itself and reconnects.
            break;
        }
        if sent < d.buf.len() {
            d.stream = None;
            d.leftover.extend_from_slice(&d.buf[sent..]);
            d.leftover_msgs += encoded;
            self.shared.wake();
        }
        if d.buf.capacity() > BUF_KEEP_BYTES {
            d.buf = Vec::new();
        }
    }

    /// Looks at once (not at the next idle check) whether the peer closed the connection;
    /// if it did, reconnects at once and reports `Report::Refused` if the peer refuses.
    pub(crate) fn check_link(&self) {
        self.shared.check.store(true, Ordering::Release);
        self.shared.wake();
    }

    pub(crate) fn set_addr(&self, addr: &str) {
        {
            let mut current = lock(&self.shared.addr);
            if *current == addr {
                return;
            }
            *current = addr.to_owned();
        }
        self.shared.addr_generation.fetch_add(1, Ordering::AcqRel);
        self.shared.wake();
    }

    pub(crate) fn status(&self) -> PeerStatus {
        let (state, last_connected) = {
            let link = lock(&self.shared.link);
            (link.state.clone(), link.last_connected)
        };
        PeerStatus {
            id: self.shared.id,
            addr: lock(&self.shared.addr).clone(),
            state,
            conn_oks: self.shared.conn_oks.load(Ordering::Relaxed),
            conn_errors: self.shared.conn_errors.load(Ordering::Relaxed),
            last_conn_secs: last_connected.map_or(0, |t| t.elapsed().as_secs()),
            dropped_msgs: self.shared.dropped_msgs.load(Ordering::Relaxed),
        }
    }

    /// Tells the writer to stop and unblocks it; returns its thread for the caller to join.
    pub(crate) fn stop(mut self) -> Option<JoinHandle<()>> {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.close_conn();
        self.shared.wake();
        self.thread.take()
        // Dropping `self.queue` here also disconnects the writer's queue.
    }
}

enum PumpEnd {
    Stopped,
    AddrChanged,
    Failed(io::Error),
}

struct Writer {
    shared: Arc<PeerShared>,
    queue: Receiver<Vec<Message>>,
    wake: Receiver<()>,
    local: Arc<LocalIdentity>,
    buf: Vec<u8>,
    /// The rest of a batch taken from the queue that did not fit in the last write; sent
    /// before anything newer so order is kept. Still counted in `queued_msgs`.
    pending: std::vec::IntoIter<Message>,
}

impl Writer {
    fn run(mut self) {
        let shared = Arc::clone(&self.shared);
        let mut backoff = BACKOFF_MIN;
        let mut failures_in_row: u64 = 0;
        // What the last failed attempt ran into, so a new cause (say, the peer came up but
        // refuses our password) is warned about even in the middle of an outage.
        let mut last_failure: Option<io::ErrorKind> = None;
        // When a connection was lost: a refusal soon after is reported (the peer's process
        // is most likely gone).
        let mut lost_at: Option<Instant> = None;
        let mut quick_at: Option<Instant> = None;
        while !shared.stopping() {
            let generation = shared.addr_generation.load(Ordering::Acquire);
            let addr = lock(&shared.addr).clone();
            shared.set_state(PeerState::Connecting);
            match self.connect(&addr) {
                Ok(stream) => {
                    shared.conn_oks.fetch_add(1, Ordering::Relaxed);
                    {
                        let mut link = lock(&shared.link);
                        link.state = PeerState::Connected;
                        link.last_connected = Some(Instant::now());
                    }
                    backoff = BACKOFF_MIN;
                    failures_in_row = 0;
                    last_failure = None;
                    lost_at = None;
                    tracing::info!(peer_id = shared.id, peer = %addr, "raft bus: connected to node {} at {addr}", shared.id);
                    let end = self.pump(stream, generation);
                    shared.close_conn();
                    shared.set_state(PeerState::Disconnected);
                    match end {
                        PumpEnd::Stopped => break,
                        PumpEnd::AddrChanged => continue,
                        PumpEnd::Failed(e) => {
                            tracing::warn!(peer_id = shared.id, peer = %addr, error = %e,
                                "raft bus: connection to node {} at {addr} lost: {e}; reconnecting", shared.id);
                            // Raft then probes the peer again instead of assuming it still
                            // holds what it acknowledged (it may have restarted).
                            self.report(Report::Lost(shared.id));
                            lost_at = Some(Instant::now());
                            // Once in a while, not for a peer that keeps closing at once.
                            if quick_at.is_none_or(|at| at.elapsed() >= RECONNECT_AT_ONCE_EVERY) {
                                quick_at = Some(Instant::now());
                                continue;
                            }
                        }
                    }
                }
                Err(e) => {
                    if lost_at.is_some_and(|at| at.elapsed() < REFUSED_REPORT_WITHIN)
                        && matches!(
                            e.kind(),
                            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                        )
                    {
                        // A peer whose process is exiting may still accept, then reset: it
                        // refuses in a moment, which is what the raft thread waits to hear.
                        let _ = self.wake.recv_timeout(DYING_RETRY);
                        continue;
                    }
                    if e.kind() == io::ErrorKind::ConnectionRefused
                        && lost_at
                            .take()
                            .is_some_and(|at| at.elapsed() < REFUSED_REPORT_WITHIN)
                    {
                        tracing::info!(peer_id = shared.id, peer = %addr,
                            "raft bus: node {} at {addr} refuses connections right after its connection closed: its process looks gone", shared.id);
                        self.report(Report::Refused(shared.id));
                    }
                    shared.close_conn();
                    shared.conn_errors.fetch_add(1, Ordering::Relaxed);
                    shared.set_state(PeerState::ConnectError);
                    failures_in_row += 1;
                    // One warning per outage and cause; the retries that follow are debug noise.
                    let new_cause = last_failure.replace(e.kind()) != Some(e.kind());
                    if new_cause && e.kind() == io::ErrorKind::PermissionDenied {
                        tracing::warn!(peer_id = shared.id, peer = %addr, error = %e,
                            "raft bus: node {} at {addr} {e}; retrying with backoff", shared.id);
                    } else if new_cause {
                        tracing::warn!(peer_id = shared.id, peer = %addr, error = %e,
                            "raft bus: cannot connect to node {} at {addr}: {e}; retrying with backoff", shared.id);
                    } else {
                        tracing::debug!(peer_id = shared.id, peer = %addr, error = %e, attempt = failures_in_row,
                            "raft bus: connect retry failed");
                    }
                }
            }
            if shared.stopping() {
                break;
            }
            // Interruptible: stop or an address change ends the wait early.
            let _ = self.wake.recv_timeout(backoff);
            if shared.addr_generation.load(Ordering::Acquire) != generation {
                backoff = BACKOFF_MIN;
            } else {
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
        shared.set_state(PeerState::Disconnected);
    }

    /// Resolves `addr` (so host names follow DNS changes), connects, and sends the Hello.
    fn connect(&mut self, addr: &str) -> io::Result<Conn> {
        let candidates: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
        let mut last_err = io::Error::new(
            io::ErrorKind::NotFound,
            format!("{addr} resolves to no address"),
        );
        for candidate in candidates {
            if self.shared.stopping() {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "shutting down"));
            }
            match TcpStream::connect_timeout(&candidate, CONNECT_TIMEOUT) {
                Ok(stream) => return self.handshake(stream),
                Err(e) => last_err = e,
            }
        }
        Err(last_err)
    }

    fn handshake(&mut self, stream: TcpStream) -> io::Result<Conn> {
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        // Register before the first write so `stop` can unblock it.
        *lock(&self.shared.conn) = Some(stream.try_clone()?);
        if self.shared.stopping() {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "shutting down"));
        }
        let mut conn = match &self.local.tls {
            None => Conn::Plain(stream),
            Some(tls) => {
                let cfg = tls.current().ok_or_else(|| {
                    io::Error::other("raft.tls-enabled is on but no TLS configuration is loaded")
                })?;
                let shared = Arc::clone(&self.shared);
                let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
                conn::connect_tls(stream, &cfg, deadline, &|| shared.stopping()).map_err(|e| {
                    // Keeps the kind of a reset or closed connection (a dying peer is
                    // retried at once), with the reason in words.
                    let kind = match e.kind() {
                        io::ErrorKind::InvalidData | io::ErrorKind::Other => {
                            io::ErrorKind::PermissionDenied
                        }
                        kind => kind,
                    };
                    let why = crate::tls::describe_failure(&e);
                    io::Error::new(kind, format!("failed the TLS handshake: {why}"))
                })?
            }
        };
        let hello = Hello {
            version: frame::PROTOCOL_VERSION,
            cluster_id: self.local.cluster_id.clone(),
            from: self.local.node_id,
            to: self.shared.id,
        };
        self.buf.clear();
        frame::encode_hello(&hello, &mut self.buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        conn.send_all(&self.buf).map_err(tls_failure)?;
        self.await_welcome(&mut conn).map_err(tls_failure)?;
        Ok(conn)
    }

    /// Reads the acceptor's answer to the Hello: Welcome, or a Challenge to answer first.
    /// Bounded by `HANDSHAKE_TIMEOUT`; a Reject becomes a `PermissionDenied` error.
    fn await_welcome(&mut self, stream: &mut Conn) -> io::Result<()> {
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        let mut decoder = FrameDecoder::new(HANDSHAKE_FRAME_BYTES_MAX);
        let mut chunk = [0u8; 256];
        let mut answered = false;
        let result = loop {
            let frame = match decoder.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("no answer to our hello within {HANDSHAKE_TIMEOUT:?}"),
                        ));
                    }
                    stream.tcp().set_read_timeout(Some(left))?;
                    match stream.read(&mut chunk) {
                        Ok(0) => {
                            break Err(io::Error::new(
                                io::ErrorKind::ConnectionAborted,
                                "closed by peer during the handshake",
                            ))
                        }
                        Ok(n) => decoder.push(&chunk[..n]),
                        // Timed out: the deadline check above reports it clearly.
                        Err(e) if super::conn::transient(&e) => {}
                        Err(e) => break Err(e),
                    }
                    if self.shared.stopping() {
                        break Err(io::Error::new(io::ErrorKind::Interrupted, "shutting down"));
                    }
                    continue;
                }
                Err(e) => break Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            };
            match frame {
                Frame::Welcome => break Ok(()),
                Frame::Challenge(nonce) if !answered => {
                    answered = true;
                    let tag = frame::auth_tag(
                        &self.local.password,
                        &nonce,
                        &self.local.cluster_id,
                        self.local.node_id,
                        self.shared.id,
                    );
                    self.buf.clear();
                    frame::encode_response(&tag, &mut self.buf);
                    stream.send_all(&self.buf)?;
                }
                Frame::Reject(reason) => {
                    if reason.ends_with(super::REMOVED_REASON) {
                        self.local
                            .told_removed
                            .store(true, std::sync::atomic::Ordering::Release);
                    }
                    break Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!("refused us: {reason}"),
                    ));
                }
                other => {
                    break Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("unexpected {} during the handshake", frame_name(&other)),
                    ))
                }
            }
        };
        // Back to plain blocking reads: the idle check uses non-blocking reads of its own.
        stream.tcp().set_read_timeout(None)?;
        result
    }

    /// Sends queued messages until an error, a stop, or an address change; the socket is
    /// never left lent when it returns.
    fn pump(&mut self, stream: Conn, generation: u64) -> PumpEnd {
        let end = self.pump_lending(stream, generation);
        let mut direct = lock(&self.shared.direct);
        direct.stream = None;
        // Not sent: Raft sends again what matters.
        self.shared
            .dropped_msgs
            .fetch_add(std::mem::take(&mut direct.leftover_msgs), Ordering::Relaxed);
        direct.leftover = Vec::new();
        end
    }

    /// Takes the socket back from senders, and sends what they could not.
    fn reclaim(&mut self, stream: &mut Conn) -> io::Result<()> {
        let (leftover, msgs) = {
            let mut direct = lock(&self.shared.direct);
            direct.stream = None;
            (
                std::mem::take(&mut direct.leftover),
                std::mem::take(&mut direct.leftover_msgs),
            )
        };
        if leftover.is_empty() {
            return Ok(());
        }
        stream.send_all(&leftover).inspect_err(|_| {
            self.shared.dropped_msgs.fetch_add(msgs, Ordering::Relaxed);
        })
    }

    /// Lends the socket to senders if nothing waits to be sent (decided under the lock
    /// `enqueue` holds while it chooses). A TLS session is never lent (see conn.rs).
    fn lend(&mut self, stream: &Conn) -> io::Result<()> {
        let Conn::Plain(stream) = stream else {
            return Ok(());
        };
        let mut direct = lock(&self.shared.direct);
        if self.pending.len() == 0
            && self.shared.queued_msgs.load(Ordering::Relaxed) == 0
            && direct.leftover.is_empty()
        {
            direct.stream = Some(stream.try_clone()?);
        }
        Ok(())
    }

    fn pump_lending(&mut self, mut stream: Conn, generation: u64) -> PumpEnd {
        // Until when the connection is looked at every `CHECK_POLL` (after `check_link`).
        let mut checking: Option<Instant> = None;
        loop {
            if self.shared.stopping() {
                return PumpEnd::Stopped;
            }
            if let Err(e) = self.reclaim(&mut stream) {
                return PumpEnd::Failed(e);
            }
            if self.pending.len() > 0 {
                // Bounded: `pending` only shrinks here and holds at most one batch.
                if let Err(e) = self.write_batch(&mut stream) {
                    return PumpEnd::Failed(e);
                }
                continue;
            }
            if let Err(e) = self.lend(&stream) {
                return PumpEnd::Failed(e);
            }
            let idle = match checking {
                Some(until) if Instant::now() < until => CHECK_POLL,
                _ => IDLE_CHECK,
            };
            crossbeam_channel::select! {
                recv(self.queue) -> batch => match batch {
                    Ok(batch) => {
                        // Whatever senders could not write came before this batch.
                        if let Err(e) = self.reclaim(&mut stream) {
                            return PumpEnd::Failed(e);
                        }
                        self.pending = batch.into_iter();
                        if let Err(e) = self.write_batch(&mut stream) {
                            return PumpEnd::Failed(e);
                        }
                    }
                    // The handle is gone: the peer was removed or the transport dropped.
                    Err(_) => return PumpEnd::Stopped,
                },
                recv(self.wake) -> _ => {
                    if self.shared.stopping() {
                        return PumpEnd::Stopped;
                    }
                    if self.shared.addr_generation.load(Ordering::Acquire) != generation {
                        return PumpEnd::AddrChanged;
                    }
                    if self.shared.check.swap(false, Ordering::AcqRel) {
                        checking = Some(Instant::now() + CHECK_WINDOW);
                        if let Err(e) = peer_closed(&mut stream) {
                            return PumpEnd::Failed(e);
                        }
                    }
                },
                default(idle) => {
                    if let Err(e) = peer_closed(&mut stream) {
                        return PumpEnd::Failed(e);
                    }
                },
            }
        }
    }

    /// Encodes `pending` and then whatever else is queued into one buffer, one write, up to
    /// `BATCH_MSGS_MAX` messages or `BATCH_BYTES_MAX` bytes; the rest stays in `pending`.
    fn write_batch(&mut self, stream: &mut Conn) -> io::Result<()> {
        self.buf.clear();
        let mut batched: u64 = 0;
        let mut taken: usize = 0;
        let mut snapshot = None;
        while taken < BATCH_MSGS_MAX && self.buf.len() < BATCH_BYTES_MAX {
            let Some(msg) = self.pending.next() else {
                match self.queue.try_recv() {
                    Ok(batch) => {
                        self.pending = batch.into_iter();
                        continue;
                    }
                    Err(_) => break,
                }
            };
            taken += 1;
            if msg.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
                // What came before goes first; then the file, then the message.
                snapshot = Some(msg);
                break;
            }
            match frame::encode_message(&msg, self.local.max_frame_bytes, &mut self.buf) {
                Ok(()) => batched += 1,
                Err(e) => {
                    self.shared.dropped_msgs.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(peer_id = self.shared.id, error = %e, msg_type = msg.msg_type,
                        "raft bus: dropping message to node {}: {e}", self.shared.id);
                }
            }
        }
        // Encoded or dropped, these no longer wait in this peer's queue.
        self.shared.queued_msgs.fetch_sub(taken, Ordering::Relaxed);
        let result = if self.buf.is_empty() {
            Ok(())
        } else {
            stream.send_all(&self.buf)
        };
        if result.is_err() {
            // Some of these may have reached the peer; Raft copes with loss and duplicates.
            self.shared
                .dropped_msgs
                .fetch_add(batched, Ordering::Relaxed);
        }
        if self.buf.capacity() > BUF_KEEP_BYTES {
            self.buf = Vec::new();
        }
        match (result, snapshot) {
            (Ok(()), Some(msg)) => {
                let sent = self.send_snapshot(stream, &msg);
                self.report_snapshot(sent.is_ok());
                sent
            }
            (result, Some(_)) => {
                self.report_snapshot(false);
                result
            }
            (result, None) => result,
        }
    }

    /// Streams this node's snapshot file in chunks, then the MsgSnapshot itself. The file
    /// must be the one the message describes (a newer one replaced it: Err, and raft-rs asks
    /// again with the new one).
    fn send_snapshot(&mut self, stream: &mut Conn, msg: &Message) -> io::Result<()> {
        let index = msg.get_snapshot().get_metadata().index;
        let path = self
            .local
            .snapshot_send
            .clone()
            .ok_or_else(|| io::Error::other("this node has no snapshot file to send"))?;
        let summary =
            crate::snapshot::format::inspect(&path).map_err(|e| io::Error::other(e.to_string()))?;
        if summary.header.index != index {
            return Err(io::Error::other(format!(
                "the snapshot file is at index {}, the message at {index}",
                summary.header.index
            )));
        }
        let mut file = std::fs::File::open(&path)?;
        let total = file.metadata()?.len();
        tracing::info!(
            peer_id = self.shared.id,
            index,
            bytes = total,
            "raft bus: sending snapshot at index {index} ({total} bytes) to node {}",
            self.shared.id
        );
        let started = Instant::now();
        let mut data = vec![0u8; SNAPSHOT_CHUNK_BYTES];
        let mut offset = 0u64;
        while offset < total {
            if self.shared.stopping() {
                return Err(io::Error::other("stopping"));
            }
            let want = (total - offset).min(SNAPSHOT_CHUNK_BYTES as u64) as usize;
            file.read_exact(&mut data[..want])?;
            self.buf.clear();
            frame::encode_snapshot_chunk(index, offset, total, &data[..want], &mut self.buf)
                .map_err(|e| io::Error::other(e.to_string()))?;
            stream.send_all(&self.buf)?;
            offset += want as u64;
        }
        self.buf.clear();
        frame::encode_message(msg, self.local.max_frame_bytes, &mut self.buf)
            .map_err(|e| io::Error::other(e.to_string()))?;
        stream.send_all(&self.buf)?;
        tracing::info!(
            peer_id = self.shared.id,
            index,
            "raft bus: snapshot at index {index} sent to node {} in {:?}",
            self.shared.id,
            started.elapsed()
        );
        Ok(())
    }

    /// Tells the raft thread how sending a snapshot went (MsgSnapStatus from the peer).
    fn report_snapshot(&self, ok: bool) {
        if !ok {
            tracing::warn!(
                peer_id = self.shared.id,
                "raft bus: sending the snapshot to node {} failed; raft will try again",
                self.shared.id
            );
        }
        self.report(Report::Snapshot {
            peer: self.shared.id,
            ok,
        });
    }

    /// Tells the raft thread about this peer's link (best effort: a full channel drops it).
    fn report(&self, report: Report) {
        let _ = self
            .local
            .reports
            .try_send(vec![report.message(self.local.node_id)]);
    }
}

fn frame_name(frame: &Frame) -> &'static str {
    match frame {
        Frame::Hello(_) => "hello",
        Frame::Raft(_) => "raft message",
        Frame::Challenge(_) => "second challenge",
        Frame::Response(_) => "response",
        Frame::Welcome => "welcome",
        Frame::Reject(_) => "reject",
        Frame::SnapshotChunk(_) => "snapshot chunk",
    }
}

/// After the handshake the peer never sends on this connection, so readable-with-EOF means it closed.
fn peer_closed(stream: &mut Conn) -> io::Result<()> {
    stream.tcp().set_nonblocking(true)?;
    let mut byte = [0u8; 1];
    let result = match stream.read(&mut byte) {
        Ok(0) => Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "closed by peer",
        )),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected data from peer on an outbound bus connection",
        )),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(e),
    };
    stream.tcp().set_nonblocking(false)?;
    result
}

/// A TLS failure (a rustls error inside `e`) as a refusal with the reason in words, so the
/// connect loop warns about it once per cause; other errors pass unchanged.
fn tls_failure(e: io::Error) -> io::Error {
    let is_tls = e
        .get_ref()
        .is_some_and(|i| i.downcast_ref::<rustls::Error>().is_some());
    if is_tls {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "failed the TLS handshake: {}",
                crate::tls::describe_failure(&e)
            ),
        )
    } else {
        e
    }
}
