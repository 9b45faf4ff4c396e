//! Network partitions for tests: every node's bus is reached through a proxy of ours, which
//! can hold the traffic of one direction of one link.
//!
//! Node `i` listens for the bus on a port of its own (`--raft.bus-port`), and
//! `raft.cluster-nodes` announces the proxy's port for it, so every connection to node `i`
//! passes through proxy `i`. The transport sends node X's messages to node I only on X's own
//! connection to I (I's replies travel on I's connection to X), so "X cannot reach I" is:
//! hold both byte directions of the connections from X to I, and nothing else. The proxy
//! learns X from the connection's first frame, the bus Hello (src/transport/frame.rs:
//! header `[magic u16][kind u8][len u32][crc u32]`, body `[version u16][from u64][to u64]...`).
//!
//! Held traffic is not read, so the sender's socket buffer fills and its writes time out, as
//! over a link that drops every packet; nothing is lost or reordered when the link heals.
//! Everything is on 127.0.0.1 and needs no privileges; `Drop` stops every thread.

use std::collections::{HashMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub const HELLO_KIND: u8 = 1;
const HEADER_BYTES: usize = 11;
/// How often held traffic and the stop flag are looked at.
const POLL: Duration = Duration::from_millis(5);

#[derive(Default)]
struct Rules {
    /// (from, to) node indexes whose messages are held.
    cut: HashSet<(usize, usize)>,
    /// Raft node id to node index.
    index: HashMap<u64, usize>,
}

struct Shared {
    rules: Mutex<Rules>,
    stop: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn held(&self, from: Option<u64>, to: usize) -> bool {
        let rules = self.rules.lock().unwrap();
        from.and_then(|id| rules.index.get(&id))
            .is_some_and(|&f| rules.cut.contains(&(f, to)))
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Runs `f` on a thread of its own. Threads that ended are joined here: an unjoined
    /// thread keeps its stack mapped, and a long run (scripts/soak.sh) makes a connection,
    /// so three threads, for every reconnection, thousands an hour.
    fn spawn(self: &Arc<Self>, f: impl FnOnce() + Send + 'static) {
        let t = std::thread::spawn(f);
        let mut threads = self.threads.lock().unwrap();
        let (ended, live): (Vec<_>, Vec<_>) = threads
            .drain(..)
            .partition(|t: &JoinHandle<()>| t.is_finished());
        *threads = live;
        threads.push(t);
        drop(threads);
        for t in ended {
            let _ = t.join();
        }
    }
}

/// The proxies of one cluster, and which links are cut.
pub struct Partitions {
    shared: Arc<Shared>,
    /// Proxy `i`'s port (what `raft.cluster-nodes` announces for node `i`).
    pub ports: Vec<u16>,
}

impl Partitions {
    /// Starts one proxy per node, forwarding to `targets[i]` (node i's real bus port).
    pub fn start(targets: &[u16]) -> Partitions {
        let shared = Arc::new(Shared {
            rules: Mutex::new(Rules::default()),
            stop: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
        });
        let mut ports = Vec::new();
        for (to, &target) in targets.iter().enumerate() {
            let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listen");
            listener.set_nonblocking(true).expect("proxy nonblocking");
            ports.push(listener.local_addr().expect("proxy addr").port());
            let sh = Arc::clone(&shared);
            shared.spawn(move || accept(sh, listener, to, target));
        }
        Partitions { shared, ports }
    }

    /// Tells the proxies which raft node id is node `i` (from `INFO raft`'s raft_node_id).
    pub fn learn(&self, id: u64, i: usize) {
        self.shared.rules.lock().unwrap().index.insert(id, i);
    }

    /// Node `from`'s messages no longer reach node `to` (the other direction is untouched).
    pub fn cut(&self, from: usize, to: usize) {
        self.shared.rules.lock().unwrap().cut.insert((from, to));
    }

    pub fn heal(&self, from: usize, to: usize) {
        self.shared.rules.lock().unwrap().cut.remove(&(from, to));
    }

    /// Cuts node `i` off from every other node, both ways.
    pub fn isolate(&self, i: usize, n: usize) {
        for j in (0..n).filter(|&j| j != i) {
            self.cut(i, j);
            self.cut(j, i);
        }
    }

    /// Proxy threads not yet joined: those running and those that ended since the last
    /// connection was made.
    pub fn threads(&self) -> usize {
        self.shared.threads.lock().unwrap().len()
    }

    pub fn heal_all(&self) {
        self.shared.rules.lock().unwrap().cut.clear();
    }
}

impl Drop for Partitions {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let threads = std::mem::take(&mut *self.shared.threads.lock().unwrap());
        for t in threads {
            let _ = t.join();
        }
    }
}

fn accept(sh: Arc<Shared>, listener: TcpListener, to: usize, target: u16) {
    while !sh.stopping() {
        match listener.accept() {
            Ok((client, _)) => {
                let sh2 = Arc::clone(&sh);
                sh.spawn(move || connection(sh2, client, to, target));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// Reads the Hello's `from` out of the first bytes of a connection (None: not a Hello).
pub fn hello_from(bytes: &[u8]) -> Option<u64> {
    if bytes.len() < HEADER_BYTES + 2 + 8 || bytes[2] != HELLO_KIND {
        return None;
    }
    let at = HEADER_BYTES + 2;
    Some(u64::from_le_bytes(bytes[at..at + 8].try_into().ok()?))
}

fn connection(sh: Arc<Shared>, client: TcpStream, to: usize, target: u16) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
        return;
    };
    for s in [&client, &server] {
        let _ = s.set_nonblocking(false);
        let _ = s.set_read_timeout(Some(POLL));
        let _ = s.set_nodelay(true);
    }
    // The Hello first, to learn whose connection this is (a peer sends it at once).
    let mut first = Vec::new();
    let mut buf = [0u8; 64];
    let mut from = None;
    for _ in 0..1000 {
        if sh.stopping() || first.len() >= HEADER_BYTES + 2 + 8 {
            break;
        }
        match (&client).read(&mut buf) {
            Ok(0) => return,
            Ok(n) => first.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
    if first.len() >= HEADER_BYTES + 2 + 8 {
        from = hello_from(&first);
    }
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let sh2 = Arc::clone(&sh);
    sh.spawn(move || pump(sh2, s2, c2, from, to, Vec::new()));
    pump(sh, client, server, from, to, first);
}

/// Copies `src` to `dst` (after `pending`), holding while the link is cut; closes both when
/// either side closes.
fn pump(
    sh: Arc<Shared>,
    src: TcpStream,
    dst: TcpStream,
    from: Option<u64>,
    to: usize,
    pending: Vec<u8>,
) {
    let mut pending = pending;
    let mut buf = vec![0u8; 64 * 1024];
    while !sh.stopping() {
        if sh.held(from, to) {
            std::thread::sleep(POLL);
            continue;
        }
        if !pending.is_empty() {
            if (&dst).write_all(&pending).is_err() {
                break;
            }
            pending.clear();
        }
        match (&src).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = src.shutdown(Shutdown::Both);
    let _ = dst.shutdown(Shutdown::Both);
}
