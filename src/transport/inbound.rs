//! Inbound side: the acceptor thread and one reader thread per accepted connection.
//!
//! A reader decodes every complete frame a socket read made available and forwards the valid
//! messages as one batch, so the node is woken once per read, not once per message. A batch is
//! bounded by what one read completes: `READ_CHUNK_BYTES` plus the partial frame before it.
//!
//! Invariants: a connection forwards nothing before a valid Hello for this cluster and this
//! node; any framing error closes that connection only; at most `MAX_INBOUND_CONNS` readers
//! exist at once; every blocking call is bounded by a timeout so `stop` is seen promptly.

use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{SendTimeoutError, Sender};
use raft::eraftpb::Message;

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
            stream,
            addr,
            local: Arc::clone(&self.local),
            inbound: self.inbound.clone(),
            stop: Arc::clone(&self.stop),
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
    stream.set_nodelay(true)?;
    stream.try_clone()
}

struct Reader {
    stream: TcpStream,
    addr: SocketAddr,
    local: Arc<LocalIdentity>,
    inbound: Sender<Vec<Message>>,
    stop: Arc<AtomicBool>,
}

/// Per-connection state the frame handling updates.
struct ConnState {
    hello: Option<Hello>,
    /// Messages dropped because their from/to does not match the Hello.
    misrouted: u64,
}

impl Drop for Reader {
    fn drop(&mut self) {
        // The registry holds a clone of this socket, so dropping ours alone would not close it.
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

impl Reader {
    fn run(mut self) {
        let addr = self.addr;
        let mut decoder = FrameDecoder::new(self.local.max_frame_bytes);
        let mut chunk = vec![0u8; READ_CHUNK_BYTES];
        let mut conn = ConnState {
            hello: None,
            misrouted: 0,
        };
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
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(peer = %addr, error = %e, "raft bus: connection from {addr} failed: {e}");
                    return;
                }
            }
            let mut batch = Vec::new();
            let keep = self.decode_all(&mut decoder, &mut conn, &mut batch);
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
        &self,
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
                        return false;
                    }
                    // -----------------------------------------------------------------------
                    // AUTH HOOK (inbound). Not implemented yet, so the bus is NOT
                    // authenticated. Here the acceptor will send an AuthChallenge frame
                    // (kind 3, a fresh random nonce), wait (bounded) for the AuthResponse
                    // (kind 4), check it against HMAC(cluster password, nonce || cluster_id
                    // || from || to) in constant time, and close with a warning on failure.
                    // Nothing may be forwarded before this succeeds.
                    // -----------------------------------------------------------------------
                    tracing::info!(peer = %addr, from = h.from,
                        "raft bus: accepted connection from node {} at {addr}", h.from);
                    conn.hello = Some(h);
                }
                Frame::Raft(msg) => {
                    let Some(h) = &conn.hello else {
                        tracing::warn!(peer = %addr,
                            "raft bus: closing connection from {addr}: raft message before hello");
                        return false;
                    };
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
    if hello.from == local.node_id {
        return Err(format!(
            "sender claims this node's own id {} (duplicate node id?)",
            hello.from
        ));
    }
    Ok(())
}
