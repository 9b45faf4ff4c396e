//! One bus connection, plain TCP or TLS (`raft.tls-enabled`), as one `Read + Write` stream.
//!
//! With TLS the handshake runs first (bounded by a deadline), then our own Hello and password
//! challenge run inside it as they do on plain TCP. A rustls session cannot be shared between
//! threads, so a TLS connection is never lent for direct sends (peer.rs): its writer thread
//! does every write. Timeouts, shutdown and non-blocking mode are set on the TCP socket
//! underneath (`tcp`), which rustls reads and writes through.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use rustls::{ClientConnection, ServerConnection, StreamOwned};

use super::frame;

pub(crate) enum Conn {
    Plain(TcpStream),
    Client(Box<StreamOwned<ClientConnection, TcpStream>>),
    Server(Box<StreamOwned<ServerConnection, TcpStream>>),
}

impl Conn {
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Client(s) => &s.sock,
            Conn::Server(s) => &s.sock,
        }
    }

    /// Writes all of `buf` and pushes it onto the socket (rustls buffers records until
    /// flushed).
    pub(crate) fn send_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.write_all(buf)?;
        self.flush()
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Client(s) => s.read(buf),
            Conn::Server(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Client(s) => s.write(buf),
            Conn::Server(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Client(s) => s.flush(),
            Conn::Server(s) => s.flush(),
        }
    }
}

/// Drives a handshake until it completes, fails, `deadline` passes or `stop` says so. The
/// socket must have a read timeout (each read returns within it).
fn drive<C>(
    conn: &mut rustls::ConnectionCommon<C>,
    tcp: &mut TcpStream,
    deadline: Instant,
    stop: &dyn Fn() -> bool,
) -> io::Result<()> {
    while conn.is_handshaking() {
        match conn.complete_io(tcp) {
            Ok(_) => {}
            Err(e) if transient(&e) => {}
            Err(e) => return Err(e),
        }
        if stop() {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "shutting down"));
        }
        if conn.is_handshaking() && Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the TLS handshake did not finish in time",
            ));
        }
    }
    Ok(())
}

/// The connector's side: TLS handshake over `tcp` (which has a write timeout; a read
/// timeout is set here for the handshake and cleared after).
pub(crate) fn connect_tls(
    tcp: TcpStream,
    cfg: &crate::tls::TlsConfig,
    deadline: Instant,
    stop: &dyn Fn() -> bool,
) -> io::Result<Conn> {
    let mut tcp = tcp;
    let mut session = ClientConnection::new(cfg.client.clone(), crate::tls::server_name())
        .map_err(|e| io::Error::other(e.to_string()))?;
    tcp.set_read_timeout(Some(std::time::Duration::from_millis(100)))?;
    drive(&mut session, &mut tcp, deadline, stop)?;
    tcp.set_read_timeout(None)?;
    Ok(Conn::Client(Box::new(StreamOwned::new(session, tcp))))
}

/// What the first bytes of an accepted connection are.
pub(crate) enum FirstBytes {
    Tls,
    /// Our own frames: a node without TLS.
    Bus,
    Other,
    /// Closed, or nothing before the deadline.
    Nothing,
}

/// Looks at (without taking) the first two bytes. The socket has a read timeout.
pub(crate) fn sniff(
    tcp: &TcpStream,
    deadline: Instant,
    stop: &dyn Fn() -> bool,
) -> io::Result<FirstBytes> {
    let mut first = [0u8; 2];
    loop {
        match tcp.peek(&mut first) {
            Ok(0) => return Ok(FirstBytes::Nothing),
            Ok(n) if n >= 2 => break,
            Ok(_) => std::thread::sleep(std::time::Duration::from_millis(2)),
            Err(e) if transient(&e) => {}
            Err(e) => return Err(e),
        }
        if stop() || Instant::now() >= deadline {
            return Ok(FirstBytes::Nothing);
        }
    }
    Ok(if crate::tls::looks_like_tls(&first) {
        FirstBytes::Tls
    } else if first == frame::MAGIC.to_le_bytes() {
        FirstBytes::Bus
    } else {
        FirstBytes::Other
    })
}

/// The acceptor's side: TLS handshake over `tcp` (which has read and write timeouts).
pub(crate) fn accept_tls(
    tcp: TcpStream,
    cfg: &crate::tls::TlsConfig,
    deadline: Instant,
    stop: &dyn Fn() -> bool,
) -> io::Result<Conn> {
    let mut tcp = tcp;
    let mut session =
        ServerConnection::new(cfg.server.clone()).map_err(|e| io::Error::other(e.to_string()))?;
    drive(&mut session, &mut tcp, deadline, stop)?;
    Ok(Conn::Server(Box::new(StreamOwned::new(session, tcp))))
}

/// A read or write that timed out or was interrupted: try again (after checking deadlines).
pub(crate) fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}
