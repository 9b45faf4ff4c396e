//! Outbound side: one writer thread per peer, fed by a bounded queue.
//!
//! The writer connects, sends its Hello, then drains its queue into one buffer per socket write.
//! On any error it closes the socket and reconnects with exponential backoff.
//!
//! Invariant: only the writer thread reads from the queue, and it reads only while connected, so
//! a disconnected peer holds at most `QUEUE_CAPACITY` messages; senders shed the rest.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use raft::eraftpb::Message;

use super::frame::{self, Hello};
use super::{lock, LocalIdentity, PeerState, PeerStatus};

/// Messages a peer may have waiting; beyond this `send` drops (Raft retransmits).
pub(crate) const QUEUE_CAPACITY: usize = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A write that makes no progress for this long means the peer is gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// One socket write carries at most this much (a single larger message still goes alone).
const BATCH_BYTES_MAX: usize = 1 << 20;
const BATCH_MSGS_MAX: usize = 4096;
/// With nothing to send for this long, check whether the peer closed the connection, so
/// `PeerStatus` does not report a dead link as connected.
const IDLE_CHECK: Duration = Duration::from_millis(500);
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
    stop: AtomicBool,
    /// A clone of the live socket, so `stop` can unblock a writer stuck in `write`.
    conn: Mutex<Option<TcpStream>>,
    /// Capacity 1: "look at your flags". Never blocks the caller.
    wake: Sender<()>,
}

struct Link {
    state: PeerState,
    last_connected: Option<Instant>,
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
    queue: Sender<Message>,
    thread: Option<JoinHandle<()>>,
}

impl PeerHandle {
    pub(crate) fn spawn(id: u64, addr: &str, local: Arc<LocalIdentity>) -> io::Result<PeerHandle> {
        let (queue_tx, queue_rx) = crossbeam_channel::bounded(QUEUE_CAPACITY);
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
            stop: AtomicBool::new(false),
            conn: Mutex::new(None),
            wake: wake_tx,
        });
        let writer = Writer {
            shared: Arc::clone(&shared),
            queue: queue_rx,
            wake: wake_rx,
            local,
            buf: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("raft-bus-w{id}"))
            .spawn(move || writer.run())?;
        Ok(PeerHandle {
            shared,
            queue: queue_tx,
            thread: Some(thread),
        })
    }

    /// Never blocks: a full queue or a dead writer drops the message and counts it.
    pub(crate) fn enqueue(&self, msg: Message) {
        match self.queue.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.shared.dropped_msgs.fetch_add(1, Ordering::Relaxed);
            }
        }
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
    queue: Receiver<Message>,
    wake: Receiver<()>,
    local: Arc<LocalIdentity>,
    buf: Vec<u8>,
}

impl Writer {
    fn run(mut self) {
        let shared = Arc::clone(&self.shared);
        let mut backoff = BACKOFF_MIN;
        let mut failures_in_row: u64 = 0;
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
                        }
                    }
                }
                Err(e) => {
                    shared.close_conn();
                    shared.conn_errors.fetch_add(1, Ordering::Relaxed);
                    shared.set_state(PeerState::ConnectError);
                    failures_in_row += 1;
                    // One warning per outage; the retries that follow are debug noise.
                    if failures_in_row == 1 {
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
    fn connect(&mut self, addr: &str) -> io::Result<TcpStream> {
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
                Ok(stream) => {
                    self.handshake(&stream)?;
                    return Ok(stream);
                }
                Err(e) => last_err = e,
            }
        }
        Err(last_err)
    }

    fn handshake(&mut self, stream: &TcpStream) -> io::Result<()> {
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        // Register before the first write so `stop` can unblock it.
        *lock(&self.shared.conn) = Some(stream.try_clone()?);
        if self.shared.stopping() {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "shutting down"));
        }
        let hello = Hello {
            version: frame::PROTOCOL_VERSION,
            cluster_id: self.local.cluster_id.clone(),
            from: self.local.node_id,
            to: self.shared.id,
        };
        self.buf.clear();
        frame::encode_hello(&hello, &mut self.buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut writer = stream;
        writer.write_all(&self.buf)?;
        // ---------------------------------------------------------------------------------
        // AUTH HOOK (outbound). Not implemented yet, so the bus is NOT authenticated.
        // Here the connecting side will answer the acceptor's challenge: read an AuthChallenge
        // frame (kind 3, a random nonce), reply with an AuthResponse frame (kind 4) carrying
        // HMAC(cluster password, nonce || cluster_id || from || to), and fail this connect on
        // a mismatch or timeout. The password never goes on the wire.
        // ---------------------------------------------------------------------------------
        Ok(())
    }

    /// Sends queued messages until an error, a stop, or an address change.
    fn pump(&mut self, mut stream: TcpStream, generation: u64) -> PumpEnd {
        loop {
            if self.shared.stopping() {
                return PumpEnd::Stopped;
            }
            crossbeam_channel::select! {
                recv(self.queue) -> first => match first {
                    Ok(first) => {
                        if let Err(e) = self.write_batch(&mut stream, first) {
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
                },
                default(IDLE_CHECK) => {
                    if let Err(e) = peer_closed(&mut stream) {
                        return PumpEnd::Failed(e);
                    }
                },
            }
        }
    }

    /// Encodes `first` and whatever else is queued (bounded) into one buffer, one write.
    fn write_batch(&mut self, stream: &mut TcpStream, first: Message) -> io::Result<()> {
        self.buf.clear();
        let mut batched: u64 = 0;
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(msg) = next.take() {
            taken += 1;
            match frame::encode_message(&msg, self.local.max_frame_bytes, &mut self.buf) {
                Ok(()) => batched += 1,
                Err(e) => {
                    self.shared.dropped_msgs.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(peer_id = self.shared.id, error = %e, msg_type = msg.msg_type,
                        "raft bus: dropping message to node {}: {e}", self.shared.id);
                }
            }
            if taken < BATCH_MSGS_MAX && self.buf.len() < BATCH_BYTES_MAX {
                next = self.queue.try_recv().ok();
            }
        }
        let result = if self.buf.is_empty() {
            Ok(())
        } else {
            stream.write_all(&self.buf)
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
        result
    }
}

/// The peer never sends on this connection, so readable-with-EOF means it closed.
fn peer_closed(stream: &mut TcpStream) -> io::Result<()> {
    stream.set_nonblocking(true)?;
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
    stream.set_nonblocking(false)?;
    result
}
