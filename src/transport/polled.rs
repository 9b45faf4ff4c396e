//! Inbound connections the raft thread reads itself.
//!
//! A reader thread (inbound.rs) runs a connection's handshake. Once the peer is welcomed, on
//! plain TCP, it lends the socket here and ends: from then on the raft thread polls it
//! together with its bell (bell.rs) and decodes what arrives in its own loop, so a peer's
//! message reaches raft-rs without a wake-up of a reader and then of the raft thread. The
//! frame handling is the reader's (`Handler::decode`), so every check holds alike.
//!
//! A connection goes back to a reader thread of its own when a snapshot chunk is next
//! (writing and fsyncing a snapshot file must not hold up the raft thread); that reader lends
//! it again once the snapshot is complete. TLS connections stay with their readers (a rustls
//! session is one thread's).
//!
//! Invariants: a lent connection's frames are decoded in order, after whatever its reader
//! decoded before lending it (those messages come along as `pending`); a connection that ends
//! is reported (`Report::InboundClosed`) as its reader would; lent connections count towards
//! `MAX_INBOUND_CONNS`.

use std::io::{self, Read};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raft::eraftpb::Message;

use super::bell::{Bell, ToNode};
use super::frame::FrameDecoder;
use super::inbound::{self, ConnState, Decoded, Handler, InboundConn};
use super::lock;

/// At most this much is read from one connection per turn of the raft thread.
const READ_BUDGET_BYTES: usize = 1 << 20;

/// An open connection a reader handed over.
pub(crate) struct LentConn {
    pub(crate) stream: TcpStream,
    pub(crate) decoder: FrameDecoder,
    pub(crate) conn: ConnState,
    pub(crate) handler: Handler,
    /// Decoded by the reader in the read that completed the handshake, not yet delivered.
    pub(crate) pending: Vec<Message>,
    /// Given when the raft thread adopts it (0 before): names it to the main thread.
    pub(crate) id: u64,
    /// The main thread watches its socket (a leader's, or a follower's without fsync:
    /// node/main_read.rs, `main_reads`).
    pub(crate) main_watched: bool,
}

impl LentConn {
    /// Closes the connection for real: the acceptor's registry may still hold a clone of
    /// the socket, so dropping this one alone would not.
    pub(crate) fn close(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// What readers and the raft thread share.
#[derive(Default)]
pub(crate) struct Lending {
    /// Lent by readers, not yet taken by the raft thread.
    pub(crate) arriving: Mutex<Vec<LentConn>>,
    /// Lent connections alive (arriving or polled), for the acceptor's limit.
    pub(crate) count: AtomicUsize,
}

/// The raft thread's side: owns the lent connections.
pub struct InboundPoll {
    bell: Arc<Bell>,
    lending: Arc<Lending>,
    conns: Vec<LentConn>,
    chunk: Vec<u8>,
    to_node: ToNode,
    stop: Arc<AtomicBool>,
    registry: Arc<Mutex<Vec<InboundConn>>>,
    tls_warned: inbound::TlsWarned,
    /// The last id given to a connection.
    last_id: u64,
    /// Changes whenever a connection comes or goes.
    generation: u64,
}

/// One polled connection, as the node sees it.
#[derive(Clone, Copy, Debug)]
pub struct PolledConn {
    pub id: u64,
    pub fd: RawFd,
    /// Marked by `InboundPoll::set_main_watched`.
    pub main_watched: bool,
}

impl InboundPoll {
    pub(crate) fn new(
        bell: Arc<Bell>,
        lending: Arc<Lending>,
        to_node: ToNode,
        stop: Arc<AtomicBool>,
        registry: Arc<Mutex<Vec<InboundConn>>>,
        tls_warned: inbound::TlsWarned,
    ) -> InboundPoll {
        InboundPoll {
            bell,
            lending,
            conns: Vec::new(),
            chunk: vec![0u8; inbound::READ_CHUNK_BYTES],
            to_node,
            stop,
            registry,
            tls_warned,
            last_id: 0,
            generation: 0,
        }
    }

    /// What the raft thread sleeps on (node/wait.rs): the bell, and readers lending.
    pub fn sleep(&self) -> PollSleep {
        PollSleep {
            bell: Arc::clone(&self.bell),
            lending: Arc::clone(&self.lending),
            fds: Vec::new(),
        }
    }

    /// Changes whenever a connection is adopted, closed or handed back.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The connections polled now.
    pub fn conns(&self) -> impl Iterator<Item = PolledConn> + '_ {
        self.conns.iter().map(|c| PolledConn {
            id: c.id,
            fd: c.stream.as_raw_fd(),
            main_watched: c.main_watched,
        })
    }

    /// Marks connection `id` as watched by the main thread, or not (no-op if it is gone).
    pub fn set_main_watched(&mut self, id: u64, watched: bool) {
        if let Some(c) = self.conns.iter_mut().find(|c| c.id == id) {
            c.main_watched = watched;
        }
    }

    /// Reads every connection whose socket is in `ready` (fds a poll said are readable or
    /// closed), appending the valid messages to `out`, in order per connection.
    pub fn read_ready(&mut self, ready: &[RawFd], out: &mut Vec<Message>) {
        if !ready.is_empty() {
            self.read_where(|fd| ready.contains(&fd), out);
        }
    }

    /// Reads every connection without waiting (what is there; most find nothing).
    pub fn read_all(&mut self, out: &mut Vec<Message>) {
        self.read_where(|_| true, out);
    }

    /// Sleeps until the bell rings, a lent connection has something, or `timeout` passes;
    /// appends what the connections delivered to `out`. Does not sleep when `waiting`, asked
    /// once the thread counts as asleep, says something is queued already. For the
    /// transport's tests: the node sleeps and reads in two steps (`sleep`, then
    /// `read_ready` under its lock).
    #[cfg(test)]
    pub fn wait(
        &mut self,
        timeout: Duration,
        waiting: impl FnOnce() -> bool,
        out: &mut Vec<Message>,
    ) {
        let adopted = self.adopt(out);
        let mut sleep = self.sleep();
        let watch: Vec<RawFd> = self.conns().map(|c| c.fd).collect();
        let mut ready = Vec::new();
        sleep.wait(timeout, &watch, || adopted || waiting(), &mut ready);
        self.read_ready(&ready, out);
    }

    /// Takes the connections lent since the last call, appending what their readers decoded
    /// to `out`. True if there were any.
    pub fn adopt(&mut self, out: &mut Vec<Message>) -> bool {
        let arrived = std::mem::take(&mut *lock(&self.lending.arriving));
        let any = !arrived.is_empty();
        for mut c in arrived {
            out.append(&mut c.pending);
            self.last_id += 1;
            c.id = self.last_id;
            c.main_watched = false;
            self.conns.push(c);
        }
        if any {
            self.generation += 1;
        }
        any
    }

    /// Reads (`read_one`) every connection whose socket `which` picks, appending the valid
    /// messages to `out`, in order per connection.
    fn read_where(&mut self, which: impl Fn(RawFd) -> bool, out: &mut Vec<Message>) {
        let mut i = 0;
        while i < self.conns.len() {
            if !which(self.conns[i].stream.as_raw_fd()) {
                i += 1;
                continue;
            }
            let before = out.len();
            match self.read_one(i, out) {
                Next::Keep => i += 1,
                Next::Close => {
                    let c = self.conns.remove(i);
                    self.generation += 1;
                    self.lending.count.fetch_sub(1, Ordering::AcqRel);
                    if let Some(m) = c.handler.closed_report(&c.conn) {
                        if !self.stop.load(Ordering::Acquire) {
                            out.push(m);
                        }
                    }
                    c.close();
                }
                Next::HandBack => {
                    let mut c = self.conns.remove(i);
                    self.generation += 1;
                    self.lending.count.fetch_sub(1, Ordering::AcqRel);
                    // Its reader delivers them first, so nothing it forwards overtakes them.
                    c.pending = out.split_off(before);
                    self.hand_back(c);
                }
            }
        }
    }

    /// Reads what the socket holds (up to `READ_BUDGET_BYTES`: a follower with fsync fsyncs
    /// on the raft thread, and a burst read at once is one batch, one fsync), then decodes it.
    fn read_one(&mut self, i: usize, out: &mut Vec<Message>) -> Next {
        let c = &mut self.conns[i];
        let addr = c.handler.addr;
        let mut total = 0;
        let mut ended = false;
        loop {
            match c.stream.read(&mut self.chunk) {
                Ok(0) => {
                    tracing::debug!(peer = %addr, "raft bus: connection from {addr} closed by peer");
                    ended = true;
                    break;
                }
                Ok(n) => {
                    c.decoder.push(&self.chunk[..n]);
                    total += n;
                    // A short read emptied the socket: spare the read that says so.
                    if n < self.chunk.len() || total >= READ_BUDGET_BYTES {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(peer = %addr, error = %e, "raft bus: connection from {addr} failed: {e}");
                    ended = true;
                    break;
                }
            }
        }
        // What arrived before the end is delivered, as a reader would.
        let mut stream = &c.stream;
        match c
            .handler
            .decode(&mut stream, &mut c.decoder, &mut c.conn, out, true)
        {
            Decoded::Close => Next::Close,
            // Its reader meets the end itself.
            Decoded::ChunkNext => Next::HandBack,
            Decoded::Keep if ended => Next::Close,
            Decoded::Keep => Next::Keep,
        }
    }

    /// A snapshot chunk is next on `c`: a reader thread of its own takes the connection over.
    fn hand_back(&mut self, c: LentConn) {
        let addr = c.handler.addr;
        let started = inbound::resume_reader(
            c,
            self.to_node.clone(),
            Arc::clone(&self.lending),
            Arc::clone(&self.stop),
            Arc::clone(&self.tls_warned),
            &self.registry,
        );
        if let Err(e) = started {
            tracing::warn!(peer = %addr, error = %e, "raft bus: cannot start a reader for the snapshot from {addr}: {e}");
        }
    }
}

/// The raft thread's sleep: poll(2) on its bell and the connections it watches.
pub struct PollSleep {
    bell: Arc<Bell>,
    lending: Arc<Lending>,
    fds: Vec<libc::pollfd>,
}

impl PollSleep {
    /// Sleeps until the bell rings, a socket of `watch` is readable or closed, or `timeout`
    /// passes; appends to `ready` the sockets of `watch` found so. Does not sleep when a
    /// reader lent a connection not yet adopted, or when `waiting`, asked once the thread
    /// counts as asleep, says something is queued already.
    pub fn wait(
        &mut self,
        timeout: Duration,
        watch: &[RawFd],
        waiting: impl FnOnce() -> bool,
        ready: &mut Vec<RawFd>,
    ) {
        self.bell.going_to_sleep();
        let lent = !lock(&self.lending.arriving).is_empty();
        let ms = if lent || waiting() {
            0
        } else {
            // Rounded up: waking before a timer is due would only come back here.
            i32::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
        };
        let fds = &mut self.fds;
        fds.clear();
        fds.push(libc::pollfd {
            fd: self.bell.fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        fds.extend(watch.iter().map(|fd| libc::pollfd {
            fd: *fd,
            events: libc::POLLIN,
            revents: 0,
        }));
        // SAFETY: `fds` is a live, initialized slice of pollfds of the length passed.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        self.bell.awake(fds[0].revents != 0);
        if n > 0 {
            ready.extend(fds[1..].iter().filter(|p| p.revents != 0).map(|p| p.fd));
        }
    }
}

impl Drop for InboundPoll {
    fn drop(&mut self) {
        for c in self.conns.drain(..) {
            self.lending.count.fetch_sub(1, Ordering::AcqRel);
            c.close();
        }
    }
}

enum Next {
    Keep,
    Close,
    HandBack,
}
