//! Bus tests over real TCP on 127.0.0.1.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use raft::eraftpb::{Entry, EntryType, Message, MessageType};

use super::frame::{
    self, Frame, FrameDecoder, FrameKind, Hello, HEADER_BYTES, MAGIC, PROTOCOL_VERSION,
};
use super::*;

const CLUSTER: &str = "test-cluster";
const WAIT: Duration = Duration::from_secs(5);

/// The node's end of the inbound channel, read one message at a time the way the raft thread
/// steps them, counting the batches they came in.
struct Inbox {
    rx: Receiver<Vec<Message>>,
    pending: VecDeque<Message>,
    batches: usize,
    /// Peers whose connection to us closed (`Report::InboundClosed`, kept out of `pending`).
    closed: Vec<u64>,
    /// With a bell: the lent connections, read here as the raft thread reads them.
    poll: Option<InboundPoll>,
    /// Messages that came from `poll` rather than the channel.
    polled: usize,
}

impl Inbox {
    fn new(rx: Receiver<Vec<Message>>) -> Inbox {
        Inbox {
            rx,
            pending: VecDeque::new(),
            batches: 0,
            closed: Vec::new(),
            poll: None,
            polled: 0,
        }
    }

    fn recv_timeout(&mut self, timeout: Duration) -> Result<Message, RecvTimeoutError> {
        let deadline = Instant::now() + timeout;
        while self.pending.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Some(poll) = &mut self.poll {
                // The raft thread's order: the channel, then what the poll read.
                if let Ok(batch) = self.rx.try_recv() {
                    self.take(batch);
                    continue;
                }
                if left.is_zero() {
                    return Err(RecvTimeoutError::Timeout);
                }
                let rx = &self.rx;
                let mut out = Vec::new();
                poll.wait(left, || !rx.is_empty(), &mut out);
                while let Ok(batch) = self.rx.try_recv() {
                    self.take(batch);
                }
                if !out.is_empty() {
                    self.polled += out.len();
                    self.take(out);
                }
                continue;
            }
            let batch = self.rx.recv_timeout(left)?;
            self.take(batch);
        }
        Ok(self.pending.pop_front().expect("a non-empty batch"))
    }

    fn try_recv(&mut self) -> Result<Message, TryRecvError> {
        while self.pending.is_empty() {
            let batch = self.rx.try_recv()?;
            self.take(batch);
        }
        Ok(self.pending.pop_front().expect("a non-empty batch"))
    }

    fn take(&mut self, batch: Vec<Message>) {
        assert!(!batch.is_empty(), "the transport forwarded an empty batch");
        self.batches += 1;
        for m in batch {
            match Report::of(&m) {
                Some(Report::InboundClosed(id)) => self.closed.push(id),
                _ => self.pending.push_back(m),
            }
        }
    }
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn start_on(node_id: u64, listen: SocketAddr, max_frame_bytes: usize) -> (Transport, Inbox) {
    start_cfg(TransportConfig {
        max_frame_bytes,
        ..TransportConfig::new(node_id, CLUSTER, listen)
    })
}

fn start_cfg(cfg: TransportConfig) -> (Transport, Inbox) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let t = Transport::start(cfg, tx).unwrap();
    let mut inbox = Inbox::new(rx);
    inbox.poll = t.inbound_poll();
    (t, inbox)
}

/// A transport that lends its open connections, as a node's does.
fn start_polled(node_id: u64, snapshot_recv: Option<std::path::PathBuf>) -> (Transport, Inbox) {
    start_cfg(TransportConfig {
        bell: Some(Bell::new().unwrap()),
        snapshot_recv,
        ..TransportConfig::new(node_id, CLUSTER, any_port())
    })
}

fn lent(t: &Transport) -> usize {
    t.lending
        .as_ref()
        .map_or(0, |l| l.count.load(std::sync::atomic::Ordering::Acquire))
}

fn start_with_password(node_id: u64, password: &str) -> (Transport, Inbox) {
    start_cfg(TransportConfig {
        password: password.to_owned(),
        ..TransportConfig::new(node_id, CLUSTER, any_port())
    })
}

fn start(node_id: u64) -> (Transport, Inbox) {
    start_on(node_id, any_port(), DEFAULT_MAX_FRAME_BYTES)
}

/// A port nothing listens on (bound then released).
fn free_port() -> SocketAddr {
    TcpListener::bind(any_port()).unwrap().local_addr().unwrap()
}

fn append(from: u64, to: u64, index: u64) -> Message {
    Message {
        msg_type: MessageType::MsgAppend as i32,
        to,
        from,
        term: 3,
        log_term: 2,
        index,
        commit: index.saturating_sub(1),
        entries: vec![Entry {
            entry_type: EntryType::EntryNormal as i32,
            term: 3,
            index: index + 1,
            data: format!("SET key{index} value").into_bytes(),
            ..Default::default()
        }],
        context: b"ctx".to_vec(),
        ..Default::default()
    }
}

fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

fn peer_status(t: &Transport, id: u64) -> PeerStatus {
    t.peers().into_iter().find(|p| p.id == id).unwrap()
}

fn wait_connected(t: &Transport, id: u64) {
    assert!(
        wait_until(|| peer_status(t, id).state == PeerState::Connected),
        "peer {id} never connected: {:?}",
        peer_status(t, id)
    );
}

fn hello_bytes(cluster_id: &str, from: u64, to: u64) -> Vec<u8> {
    let mut buf = Vec::new();
    let hello = Hello {
        version: PROTOCOL_VERSION,
        cluster_id: cluster_id.to_owned(),
        from,
        to,
    };
    frame::encode_hello(&hello, &mut buf).unwrap();
    buf
}

fn message_bytes(msg: &Message) -> Vec<u8> {
    let mut buf = Vec::new();
    frame::encode_message(msg, DEFAULT_MAX_FRAME_BYTES, &mut buf).unwrap();
    buf
}

/// Asserts the other side closes `stream` within `timeout` (EOF or reset, not a timeout),
/// having sent nothing but handshake answers (Welcome, Challenge, Reject), which it returns.
fn closed_by_peer_within(mut stream: TcpStream, timeout: Duration, case: &str) -> Vec<Frame> {
    stream.set_read_timeout(Some(timeout)).unwrap();
    let mut decoder = FrameDecoder::new(1024);
    let mut frames = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => decoder.push(&buf[..n]),
            Err(e) => {
                assert!(
                    matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
                    ),
                    "{case}: connection not closed: {e}"
                );
                break;
            }
        }
        while let Some(frame) = decoder.next_frame().unwrap() {
            assert!(
                matches!(
                    frame,
                    Frame::Welcome | Frame::Challenge(_) | Frame::Reject(_)
                ),
                "{case}: peer sent an unexpected {frame:?}"
            );
            frames.push(frame);
        }
    }
    frames
}

fn assert_closed_by_peer(stream: TcpStream, case: &str) {
    closed_by_peer_within(stream, Duration::from_secs(3), case);
}

/// Reads frames from `stream` until `n` have arrived.
fn read_frames(stream: &mut TcpStream, n: usize) -> Vec<Frame> {
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut decoder = FrameDecoder::new(1024);
    let mut frames = Vec::new();
    let mut buf = [0u8; 256];
    while frames.len() < n {
        let got = stream.read(&mut buf).unwrap();
        assert!(got > 0, "closed after {} of {n} frames", frames.len());
        decoder.push(&buf[..got]);
        while let Some(frame) = decoder.next_frame().unwrap() {
            frames.push(frame);
        }
    }
    frames
}

fn refused_reason() -> Frame {
    Frame::Reject(inbound::AUTH_FAILED.to_owned())
}

#[test]
fn transport_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Transport>();
}

#[test]
fn two_transports_exchange_messages_both_ways() {
    let (a, mut a_rx) = start(1);
    let (b, mut b_rx) = start(2);
    a.set_peer(2, &b.local_addr().to_string());
    b.set_peer(1, &a.local_addr().to_string());

    let to_b = append(1, 2, 10);
    let to_a = Message {
        msg_type: MessageType::MsgAppendResponse as i32,
        to: 1,
        from: 2,
        term: 3,
        index: 11,
        reject: true,
        reject_hint: 7,
        ..Default::default()
    };
    a.send(vec![to_b.clone()]);
    b.send(vec![to_a.clone()]);
    assert_eq!(b_rx.recv_timeout(WAIT).unwrap(), to_b);
    assert_eq!(a_rx.recv_timeout(WAIT).unwrap(), to_a);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(b_rx.try_recv(), Err(TryRecvError::Empty));
    assert_eq!(a_rx.try_recv(), Err(TryRecvError::Empty));
}

#[test]
fn many_messages_arrive_in_order() {
    let (a, _a_rx) = start(1);
    let (b, mut b_rx) = start(2);
    a.set_peer(2, &b.local_addr().to_string());
    wait_connected(&a, 2);

    let rounds = 5u64;
    let per_round = 2000u64;
    for round in 0..rounds {
        let first = round * per_round + 1;
        a.send(
            (first..first + per_round)
                .map(|i| append(1, 2, i))
                .collect(),
        );
        for i in first..first + per_round {
            let got = b_rx.recv_timeout(WAIT).unwrap();
            assert_eq!(got.index, i);
            assert_eq!(got, append(1, 2, i));
        }
    }
    let status = peer_status(&a, 2);
    assert_eq!(status.dropped_msgs, 0);
    assert_eq!(status.conn_oks, 1);
}

#[test]
fn small_sends_faster_than_the_peer_reads_keep_their_order() {
    // One message per send, each 8 KB, while the receiving node stalls at first: the sender's
    // socket fills, so sends go direct, then hand their rest to the writer, then queue (and
    // beyond the queue's bound, drop). Whatever arrives must arrive in the order sent.
    let (a, _a_rx) = start(1);
    let (b, mut b_rx) = start(2);
    a.set_peer(2, &b.local_addr().to_string());
    wait_connected(&a, 2);
    let big = |i: u64| {
        let mut m = append(1, 2, i);
        m.entries[0].data = vec![(i % 251) as u8; 8 << 10];
        m
    };
    let total = 6000u64;
    let sender = std::thread::spawn(move || {
        for i in 1..=total {
            a.send(vec![big(i)]);
        }
        a
    });
    std::thread::sleep(Duration::from_millis(300));
    let mut got = Vec::new();
    while let Ok(m) = b_rx.recv_timeout(Duration::from_secs(2)) {
        assert_eq!(m, big(m.index));
        got.push(m.index);
    }
    let a = sender.join().unwrap();
    assert!(got.windows(2).all(|w| w[0] < w[1]), "out of order");
    let dropped = peer_status(&a, 2).dropped_msgs;
    assert_eq!(
        got.len() as u64 + dropped,
        total,
        "every message arrived or was counted dropped"
    );
    assert!(
        got.len() as u64 > total / 2,
        "only {} of {total} arrived",
        got.len()
    );
    // And the link still works in order afterwards.
    a.send(vec![append(1, 2, total + 1), append(1, 2, total + 2)]);
    assert_eq!(b_rx.recv_timeout(WAIT).unwrap().index, total + 1);
    assert_eq!(b_rx.recv_timeout(WAIT).unwrap().index, total + 2);
}

#[test]
fn one_large_send_arrives_in_order_in_few_batches() {
    // 10,000 messages in one call, interleaved over four peers so that grouping by destination
    // must keep each peer's order, and each peer's 2,500 fit its 4,096-message queue.
    let total = 10_000u64;
    let peers = 4u64;
    let dest = |i: u64| 2 + i % peers;
    let (a, _a_rx) = start(1);
    let mut nodes = Vec::new();
    for id in 2..2 + peers {
        let (t, rx) = start(id);
        a.set_peer(id, &t.local_addr().to_string());
        wait_connected(&a, id);
        nodes.push((id, t, rx));
    }

    a.send((0..total).map(|i| append(1, dest(i), i)).collect());
    for (id, _, rx) in &mut nodes {
        for i in (0..total).filter(|&i| dest(i) == *id) {
            assert_eq!(rx.recv_timeout(WAIT).unwrap(), append(1, *id, i));
        }
    }
    std::thread::sleep(Duration::from_millis(50));
    let share = (total / peers) as usize;
    for (id, _, rx) in &mut nodes {
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty), "node {id}");
        // One wake-up of the node per socket read, not per message.
        assert!(
            rx.batches < share / 10,
            "node {id}: {share} messages came in {} batches",
            rx.batches
        );
        assert_eq!(peer_status(&a, *id).dropped_msgs, 0);
    }
    assert_eq!(a.unknown_peer_drops(), 0);
}

#[test]
fn peer_started_later_is_reached_after_backoff() {
    let b_addr = free_port();
    let (a, _a_rx) = start(1);
    a.set_peer(2, &b_addr.to_string());
    let early = append(1, 2, 5);
    a.send(vec![early.clone()]);

    assert!(wait_until(|| peer_status(&a, 2).conn_errors >= 2));
    let before = peer_status(&a, 2);
    assert_eq!(before.conn_oks, 0);
    assert_eq!(before.last_conn_secs, 0);
    assert_ne!(before.state, PeerState::Connected);

    let (b, mut b_rx) = start_on(2, b_addr, DEFAULT_MAX_FRAME_BYTES);
    // The message queued while B did not exist is delivered once the backoff retry connects.
    assert_eq!(b_rx.recv_timeout(WAIT).unwrap(), early);
    let after = peer_status(&a, 2);
    assert_eq!(after.state, PeerState::Connected);
    assert_eq!(after.conn_oks, 1);
    assert_eq!(after.dropped_msgs, 0);
    drop(b);
}

#[test]
fn changed_peer_address_is_used_at_once() {
    let (a, _a_rx) = start(1);
    let (b, mut b_rx) = start(2);
    a.set_peer(2, &free_port().to_string());
    assert!(wait_until(|| peer_status(&a, 2).conn_errors >= 1));
    // A host name, resolved at connect time.
    let new_addr = format!("localhost:{}", b.local_addr().port());
    a.set_peer(2, &new_addr);
    let msg = append(1, 2, 1);
    a.send(vec![msg.clone()]);
    assert_eq!(b_rx.recv_timeout(WAIT).unwrap(), msg);
    assert_eq!(peer_status(&a, 2).addr, new_addr);
    assert_eq!(a.peers().len(), 1);
}

#[test]
fn bad_input_closes_only_that_connection() {
    let (a, _a_rx) = start(1);
    let (b, mut b_rx) = start_on(2, any_port(), 4096);
    a.set_peer(2, &b.local_addr().to_string());
    wait_connected(&a, 2);

    let mut bad_crc = message_bytes(&append(3, 2, 1));
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 0x55;
    let mut oversized = Vec::new();
    oversized.extend_from_slice(&MAGIC.to_le_bytes());
    oversized.push(FrameKind::Raft as u8);
    oversized.extend_from_slice(&4097u32.to_le_bytes());
    oversized.extend_from_slice(&0u32.to_le_bytes());
    let mut undecodable = Vec::new();
    undecodable.extend_from_slice(&MAGIC.to_le_bytes());
    undecodable.push(FrameKind::Raft as u8);
    undecodable.extend_from_slice(&4u32.to_le_bytes());
    undecodable.extend_from_slice(&crc32fast::hash(&[0xff; 4]).to_le_bytes());
    undecodable.extend_from_slice(&[0xff; 4]);

    let hello = hello_bytes(CLUSTER, 3, 2);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("bad crc", [hello.clone(), bad_crc].concat()),
        ("oversized len", [hello.clone(), oversized].concat()),
        ("undecodable body", [hello.clone(), undecodable].concat()),
        ("wrong cluster id", hello_bytes("other-cluster", 3, 2)),
        ("hello to another node", hello_bytes(CLUSTER, 3, 9)),
        ("message before hello", message_bytes(&append(3, 2, 1))),
        ("second hello", [hello.clone(), hello.clone()].concat()),
    ];
    for (i, (case, bytes)) in cases.into_iter().enumerate() {
        let mut raw = TcpStream::connect(b.local_addr()).unwrap();
        raw.write_all(&bytes).unwrap();
        assert_closed_by_peer(raw, case);

        // The established connection from A is unaffected.
        let msg = append(1, 2, 100 + i as u64);
        a.send(vec![msg.clone()]);
        assert_eq!(b_rx.recv_timeout(WAIT).unwrap(), msg, "{case}");
        assert_eq!(b_rx.try_recv(), Err(TryRecvError::Empty), "{case}");
    }
    let status = peer_status(&a, 2);
    assert_eq!(status.conn_oks, 1);
    assert_eq!(status.state, PeerState::Connected);
}

#[test]
fn valid_frames_before_a_bad_one_are_delivered() {
    let (b, mut b_rx) = start(2);
    let good = append(3, 2, 1);
    let mut bad = message_bytes(&append(3, 2, 2));
    bad[HEADER_BYTES] ^= 0x01;
    let bytes = [hello_bytes(CLUSTER, 3, 2), message_bytes(&good), bad].concat();
    let mut raw = TcpStream::connect(b.local_addr()).unwrap();
    raw.write_all(&bytes).unwrap();
    assert_closed_by_peer(raw, "bad crc after a good frame");
    assert_eq!(b_rx.recv_timeout(WAIT).unwrap(), good);
    assert_eq!(b_rx.try_recv(), Err(TryRecvError::Empty));
}

#[test]
fn misaddressed_messages_are_dropped_and_the_connection_kept() {
    let (b, mut b_rx) = start(2);
    let mut raw = TcpStream::connect(b.local_addr()).unwrap();
    let wrong_to = append(3, 9, 1);
    let wrong_from = append(4, 2, 2);
    let good = append(3, 2, 3);
    let bytes = [
        hello_bytes(CLUSTER, 3, 2),
        message_bytes(&wrong_to),
        message_bytes(&wrong_from),
        message_bytes(&good),
    ]
    .concat();
    raw.write_all(&bytes).unwrap();
    assert_eq!(b_rx.recv_timeout(WAIT).unwrap(), good);
    // Still open: a later message on the same connection arrives too.
    let later = append(3, 2, 4);
    raw.write_all(&message_bytes(&later)).unwrap();
    assert_eq!(b_rx.recv_timeout(WAIT).unwrap(), later);
    assert_eq!(b_rx.try_recv(), Err(TryRecvError::Empty));
}

#[test]
fn a_connection_beyond_the_handshake_limit_closes_the_oldest_idle_one() {
    let (b, mut b_rx) = start(2);
    let mut idle: Vec<TcpStream> = (0..inbound::MAX_HANDSHAKING_CONNS)
        .map(|_| TcpStream::connect(b.local_addr()).unwrap())
        .collect();
    // Let the acceptor admit them in this order.
    std::thread::sleep(Duration::from_millis(200));
    let mut newest = TcpStream::connect(b.local_addr()).unwrap();
    assert_closed_by_peer(idle.remove(0), "oldest connection in its handshake");
    // The newcomer is served: a peer is not kept out by idle connections.
    let msg = append(3, 2, 1);
    newest
        .write_all(&[hello_bytes(CLUSTER, 3, 2), message_bytes(&msg)].concat())
        .unwrap();
    assert_eq!(b_rx.recv_timeout(WAIT).unwrap(), msg);
    // The others were left alone.
    idle[0]
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let e = idle[0].read(&mut [0u8; 16]).unwrap_err();
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{e}"
    );
}

#[test]
fn open_connections_beyond_the_limit_are_refused() {
    let (b, mut b_rx) = start(2);
    let mut held: Vec<TcpStream> = (0..inbound::MAX_INBOUND_CONNS)
        .map(|_| {
            let mut s = TcpStream::connect(b.local_addr()).unwrap();
            s.write_all(&hello_bytes(CLUSTER, 3, 2)).unwrap();
            assert_eq!(read_frames(&mut s, 1), vec![Frame::Welcome]);
            s
        })
        .collect();
    let extra = TcpStream::connect(b.local_addr()).unwrap();
    assert_closed_by_peer(extra, "connection over the limit");
    // The admitted ones still work.
    let msg = append(3, 2, 1);
    held[0].write_all(&message_bytes(&msg)).unwrap();
    assert_eq!(b_rx.recv_timeout(WAIT).unwrap(), msg);
}

#[test]
fn a_connection_without_a_handshake_is_closed_after_the_timeout() {
    let (b, _b_rx) = start(2);
    let silent = TcpStream::connect(b.local_addr()).unwrap();
    // Sends a valid Hello a byte every 250 ms (too slow to finish in time): its reads never
    // time out, and the deadline holds all the same.
    let trickle = TcpStream::connect(b.local_addr()).unwrap();
    let hello = hello_bytes(CLUSTER, 3, 2);
    let writer = {
        let mut t = trickle.try_clone().unwrap();
        std::thread::spawn(move || {
            for byte in &hello {
                if t.write_all(std::slice::from_ref(byte)).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };
    let started = Instant::now();
    let limit = inbound::HANDSHAKE_TIMEOUT + Duration::from_secs(2);
    closed_by_peer_within(silent, limit, "silent connection");
    let _ = closed_by_peer_within(trickle, limit, "trickling connection");
    assert!(started.elapsed() >= inbound::HANDSHAKE_TIMEOUT - Duration::from_millis(200));
    writer.join().unwrap();
}

#[test]
fn a_large_frame_before_the_handshake_is_refused_from_its_header() {
    // Full-size frames are allowed after Welcome only.
    let (b, _b_rx) = start(2);
    let mut raw = TcpStream::connect(b.local_addr()).unwrap();
    let mut header = Vec::new();
    header.extend_from_slice(&MAGIC.to_le_bytes());
    header.push(FrameKind::Hello as u8);
    header.extend_from_slice(&((inbound::HANDSHAKE_FRAME_BYTES_MAX + 1) as u32).to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    raw.write_all(&header).unwrap();
    assert_closed_by_peer(raw, "large frame before the handshake");
}

#[test]
fn peer_status_shows_connection_and_loss() {
    let (a, _a_rx) = start(1);
    let (b, _b_rx) = start(2);
    let b_addr = b.local_addr().to_string();
    a.set_peer(2, &b_addr);
    wait_connected(&a, 2);
    assert_eq!(
        a.peers(),
        vec![PeerStatus {
            id: 2,
            addr: b_addr,
            state: PeerState::Connected,
            conn_oks: 1,
            conn_errors: 0,
            last_conn_secs: 0,
            dropped_msgs: 0,
        }]
    );
    // B goes away: the idle check notices without any traffic.
    b.shutdown();
    assert!(wait_until(
        || peer_status(&a, 2).state != PeerState::Connected
    ));
    assert!(wait_until(|| peer_status(&a, 2).conn_errors >= 1));
    assert_eq!(peer_status(&a, 2).conn_oks, 1);
}

#[test]
fn unknown_peer_and_full_queue_drops_are_counted() {
    let (a, _a_rx) = start(1);
    a.send(vec![append(1, 99, 1)]);
    assert_eq!(a.unknown_peer_drops(), 1);

    // Nobody listens there, so the writer never drains the queue.
    a.set_peer(2, &free_port().to_string());
    a.send((0..5000).map(|i| append(1, 2, i)).collect());
    assert_eq!(peer_status(&a, 2).dropped_msgs, 5000 - 4096);
    // The bound is in messages, across calls: a full queue takes no further batch.
    a.send((0..10).map(|i| append(1, 2, i)).collect());
    assert_eq!(peer_status(&a, 2).dropped_msgs, 5000 - 4096 + 10);
    assert_eq!(a.unknown_peer_drops(), 1);

    a.remove_peer(2);
    assert_eq!(a.peers(), vec![]);
    a.send(vec![append(1, 2, 1)]);
    assert_eq!(a.unknown_peer_drops(), 2);
}

#[test]
fn port_in_use_is_reported_with_the_address() {
    let (a, _a_rx) = start(1);
    let (tx, _rx) = crossbeam_channel::unbounded();
    let err = match Transport::start(TransportConfig::new(2, CLUSTER, a.local_addr()), tx) {
        Ok(_) => panic!("second bind on {} succeeded", a.local_addr()),
        Err(e) => e,
    };
    assert!(matches!(err, TransportError::Bind { addr, .. } if addr == a.local_addr()));
    assert!(
        err.to_string().contains(&a.local_addr().to_string()),
        "{err}"
    );
}

#[test]
fn shutdown_returns_promptly() {
    let (a, _a_rx) = start(1);
    let (b, _b_rx) = start(2);
    a.set_peer(2, &b.local_addr().to_string());
    b.set_peer(1, &a.local_addr().to_string());
    a.set_peer(3, &free_port().to_string()); // in backoff
    wait_connected(&a, 2);
    wait_connected(&b, 1);
    let _idle = TcpStream::connect(a.local_addr()).unwrap(); // no hello yet
    a.send((0..100).map(|i| append(1, 2, i)).collect());

    let started = Instant::now();
    a.shutdown();
    let took = started.elapsed();
    assert!(took < Duration::from_millis(500), "shutdown took {took:?}");

    // The listening port is released, and the transport stays inert.
    drop(TcpListener::bind(a.local_addr()).unwrap());
    a.send(vec![append(1, 2, 1)]);
    a.set_peer(4, "127.0.0.1:1");
    assert_eq!(a.peers(), vec![]);
    a.shutdown();
}

#[test]
fn same_password_lets_messages_flow_both_ways() {
    let (a, mut a_rx) = start_with_password(1, "s3cret");
    let (b, mut b_rx) = start_with_password(2, "s3cret");
    a.set_peer(2, &b.local_addr().to_string());
    b.set_peer(1, &a.local_addr().to_string());
    let to_b = append(1, 2, 10);
    let to_a = append(2, 1, 20);
    a.send(vec![to_b.clone()]);
    b.send(vec![to_a.clone()]);
    assert_eq!(b_rx.recv_timeout(WAIT).unwrap(), to_b);
    assert_eq!(a_rx.recv_timeout(WAIT).unwrap(), to_a);
    for (t, peer) in [(&a, 2), (&b, 1)] {
        let status = peer_status(t, peer);
        assert_eq!(status.state, PeerState::Connected);
        assert_eq!(status.conn_oks, 1);
        assert_eq!(status.conn_errors, 0);
    }
}

#[test]
fn wrong_password_is_refused_and_nothing_is_delivered() {
    let (a, _a_rx) = start_with_password(1, "right");
    let (b, mut b_rx) = start_with_password(2, "wrong");
    b.set_peer(1, &a.local_addr().to_string());
    a.set_peer(2, &b.local_addr().to_string());
    a.send(vec![append(1, 2, 1)]);
    assert!(wait_until(|| peer_status(&a, 2).conn_errors >= 2));
    assert!(wait_until(|| peer_status(&b, 1).conn_errors >= 2));
    for (t, peer) in [(&a, 2), (&b, 1)] {
        let status = peer_status(t, peer);
        assert_ne!(status.state, PeerState::Connected, "{status:?}");
        assert_eq!(status.conn_oks, 0, "{status:?}");
        assert_eq!(status.last_conn_secs, 0, "{status:?}");
    }
    assert_eq!(b_rx.try_recv(), Err(TryRecvError::Empty));
}

#[test]
fn password_on_the_acceptor_only_is_refused() {
    let (a, _a_rx) = start(1);
    let (b, mut b_rx) = start_with_password(2, "s3cret");
    a.set_peer(2, &b.local_addr().to_string());
    a.send(vec![append(1, 2, 1)]);
    assert!(wait_until(|| peer_status(&a, 2).conn_errors >= 2));
    let status = peer_status(&a, 2);
    assert_eq!(status.conn_oks, 0, "{status:?}");
    assert_ne!(status.state, PeerState::Connected);
    assert_eq!(b_rx.try_recv(), Err(TryRecvError::Empty));

    // Each node guards its own listener: B (password set) may still talk to A (none).
    b.set_peer(1, &a.local_addr().to_string());
    wait_connected(&b, 1);
}

#[test]
fn raw_peer_must_answer_the_challenge_before_its_messages_count() {
    let (b, mut b_rx) = start_with_password(2, "s3cret");

    // Right answer: Welcome, then messages are delivered.
    let mut raw = TcpStream::connect(b.local_addr()).unwrap();
    raw.write_all(&hello_bytes(CLUSTER, 3, 2)).unwrap();
    let Frame::Challenge(nonce) = read_frames(&mut raw, 1).remove(0) else {
        panic!("no challenge");
    };
    let mut resp = Vec::new();
    frame::encode_response(&frame::auth_tag("s3cret", &nonce, CLUSTER, 3, 2), &mut resp);
    raw.write_all(&resp).unwrap();
    assert_eq!(read_frames(&mut raw, 1), vec![Frame::Welcome]);
    let msg = append(3, 2, 1);
    raw.write_all(&message_bytes(&msg)).unwrap();
    assert_eq!(b_rx.recv_timeout(WAIT).unwrap(), msg);

    // A tag computed for another node id does not verify.
    let mut raw = TcpStream::connect(b.local_addr()).unwrap();
    raw.write_all(&hello_bytes(CLUSTER, 4, 2)).unwrap();
    let Frame::Challenge(nonce) = read_frames(&mut raw, 1).remove(0) else {
        panic!("no challenge");
    };
    let mut resp = Vec::new();
    frame::encode_response(&frame::auth_tag("s3cret", &nonce, CLUSTER, 3, 2), &mut resp);
    raw.write_all(&resp).unwrap();
    assert_eq!(
        closed_by_peer_within(raw, WAIT, "tag for another node"),
        vec![refused_reason()]
    );

    // Skipping the challenge: refused, the message is not delivered.
    let mut raw = TcpStream::connect(b.local_addr()).unwrap();
    raw.write_all(&[hello_bytes(CLUSTER, 3, 2), message_bytes(&append(3, 2, 2))].concat())
        .unwrap();
    let frames = closed_by_peer_within(raw, WAIT, "message before the response");
    assert!(matches!(frames[0], Frame::Challenge(_)), "{frames:?}");
    assert_eq!(frames[1..], [refused_reason()]);

    // Never answering: refused after the bounded wait.
    let mut raw = TcpStream::connect(b.local_addr()).unwrap();
    raw.write_all(&hello_bytes(CLUSTER, 3, 2)).unwrap();
    let frames = closed_by_peer_within(raw, Duration::from_secs(10), "no response");
    assert!(matches!(frames[0], Frame::Challenge(_)), "{frames:?}");
    assert_eq!(frames[1..], [refused_reason()]);

    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(b_rx.try_recv(), Err(TryRecvError::Empty));
}

#[test]
fn acceptor_without_password_welcomes_a_valid_hello() {
    let (b, _b_rx) = start(2);
    let mut raw = TcpStream::connect(b.local_addr()).unwrap();
    raw.write_all(&hello_bytes(CLUSTER, 3, 2)).unwrap();
    assert_eq!(read_frames(&mut raw, 1), vec![Frame::Welcome]);
}

#[test]
fn config_debug_hides_the_password() {
    let cfg = TransportConfig {
        password: "s3cret".into(),
        ..TransportConfig::new(1, CLUSTER, any_port())
    };
    let shown = format!("{cfg:?}");
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(shown.contains("<set>"), "{shown}");
}

/// Waits for a report matching `want` among A's inbound batches (skipping messages).
fn wait_report(rx: &mut Inbox, want: Report) -> bool {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(m) if Report::of(&m) == Some(want) => return true,
            _ => {}
        }
    }
    false
}

#[test]
fn a_peer_whose_process_is_gone_is_reported_closed_then_refusing() {
    let (a, mut a_rx) = start(1);
    let (b, b_rx) = start(2);
    a.set_peer(2, &b.local_addr().to_string());
    b.set_peer(1, &a.local_addr().to_string());
    wait_connected(&a, 2);
    wait_connected(&b, 1);
    // B's connection to A closes when B goes away: A hears of it at once, is asked to look
    // at its own connection (as the raft thread does), and finds B's port refusing.
    b.shutdown();
    assert!(wait_until(|| {
        let _ = a_rx.try_recv();
        a_rx.closed.contains(&2)
    }));
    a.check_link(2);
    assert!(wait_report(&mut a_rx, Report::Lost(2)), "no Lost report");
    assert!(
        wait_report(&mut a_rx, Report::Refused(2)),
        "no Refused report"
    );
    assert!(b_rx.closed.is_empty());
}

#[test]
fn local_only_message_types_from_the_network_are_refused() {
    let mut hup = Message::default();
    hup.set_msg_type(MessageType::MsgHup);
    hup.from = 3;
    hup.to = 2;
    let mut forged = Report::Refused(7).message(2);
    forged.from = 3;
    for (case, bad) in [("MsgHup", hup), ("a forged report", forged)] {
        let (b, mut b_rx) = start(2);
        let good = append(3, 2, 1);
        let bytes = [
            hello_bytes(CLUSTER, 3, 2),
            message_bytes(&good),
            message_bytes(&bad),
        ]
        .concat();
        let mut raw = TcpStream::connect(b.local_addr()).unwrap();
        raw.write_all(&bytes).unwrap();
        // What came before it arrives; it does not, and the connection is closed.
        assert_closed_by_peer(raw, case);
        assert_eq!(b_rx.recv_timeout(WAIT).unwrap(), good, "{case}");
        assert_eq!(b_rx.try_recv(), Err(TryRecvError::Empty), "{case}");
    }
}

#[test]
fn reports_survive_the_trip_as_messages() {
    for r in [
        Report::Lost(4),
        Report::InboundClosed(5),
        Report::Refused(6),
        Report::Snapshot { peer: 7, ok: true },
        Report::Snapshot { peer: 8, ok: false },
    ] {
        let m = r.message(1);
        assert_eq!(m.to, 1);
        assert!(local_only(m.get_msg_type()));
        assert_eq!(Report::of(&m), Some(r));
    }
    assert_eq!(Report::of(&append(1, 2, 3)), None);
}

/// A CA and the certificates it signs, written as PEM files into a temp dir.
struct TestCa {
    dir: tempfile::TempDir,
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
    name: &'static str,
}

impl TestCa {
    fn new(name: &'static str) -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} CA"));
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.crt"), cert.pem()).unwrap();
        TestCa {
            dir,
            cert,
            key,
            name,
        }
    }

    /// A node certificate signed by this CA (expired when `expired`), and the files of a
    /// node that trusts this CA.
    fn node(&self, node: &str, expired: bool) -> crate::tls::TlsFiles {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])
                .unwrap();
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let base = self.dir.path().join(format!("{}-{node}", self.name));
        let cert_file = base.with_extension("crt");
        let key_file = base.with_extension("key");
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        crate::tls::TlsFiles {
            cert_file: cert_file.display().to_string(),
            key_file: key_file.display().to_string(),
            ca_cert_file: self.dir.path().join("ca.crt").display().to_string(),
            ..Default::default()
        }
    }
}

fn start_tls(node_id: u64, files: &crate::tls::TlsFiles, password: &str) -> (Transport, Inbox) {
    let tls = crate::tls::build(files).unwrap();
    start_cfg(TransportConfig {
        password: password.to_owned(),
        tls: Some(crate::tls::TlsHandle::new(tls)),
        ..TransportConfig::new(node_id, CLUSTER, any_port())
    })
}

/// Neither side ever connects and nothing reaches the inboxes.
fn assert_refused_both_ways(a: &Transport, b: &Transport, b_rx: &mut Inbox, a_rx: &mut Inbox) {
    a.set_peer(2, &b.local_addr().to_string());
    b.set_peer(1, &a.local_addr().to_string());
    a.send(vec![append(1, 2, 1)]);
    b.send(vec![append(2, 1, 1)]);
    assert!(wait_until(|| peer_status(a, 2).conn_errors >= 2));
    assert!(wait_until(|| peer_status(b, 1).conn_errors >= 2));
    for (t, peer) in [(a, 2), (b, 1)] {
        let status = peer_status(t, peer);
        assert_eq!(status.conn_oks, 0, "{status:?}");
        assert_ne!(status.state, PeerState::Connected, "{status:?}");
    }
    assert_eq!(b_rx.try_recv(), Err(TryRecvError::Empty));
    assert_eq!(a_rx.try_recv(), Err(TryRecvError::Empty));
}

#[test]
fn tls_transports_exchange_messages_both_ways_with_a_password() {
    let ca = TestCa::new("cluster");
    let (a, mut a_rx) = start_tls(1, &ca.node("a", false), "s3cret");
    let (b, mut b_rx) = start_tls(2, &ca.node("b", false), "s3cret");
    a.set_peer(2, &b.local_addr().to_string());
    b.set_peer(1, &a.local_addr().to_string());
    // Many, so some go while the writer is busy: order must hold without direct sends.
    let to_b: Vec<Message> = (1..=500).map(|i| append(1, 2, i)).collect();
    for m in &to_b {
        a.send(vec![m.clone()]);
    }
    let to_a = append(2, 1, 20);
    b.send(vec![to_a.clone()]);
    for m in &to_b {
        assert_eq!(&b_rx.recv_timeout(WAIT).unwrap(), m);
    }
    assert_eq!(a_rx.recv_timeout(WAIT).unwrap(), to_a);
    for (t, peer) in [(&a, 2), (&b, 1)] {
        let status = peer_status(t, peer);
        assert_eq!(status.state, PeerState::Connected);
        assert_eq!(status.conn_oks, 1, "{status:?}");
    }
}

#[test]
fn tls_certificate_from_a_foreign_ca_is_refused_both_ways() {
    let ours = TestCa::new("cluster");
    let foreign = TestCa::new("foreign");
    let (a, mut a_rx) = start_tls(1, &ours.node("a", false), "");
    let (b, mut b_rx) = start_tls(2, &foreign.node("b", false), "");
    assert_refused_both_ways(&a, &b, &mut b_rx, &mut a_rx);
}

#[test]
fn tls_expired_certificate_is_refused_both_ways() {
    let ca = TestCa::new("cluster");
    let (a, mut a_rx) = start_tls(1, &ca.node("a", false), "");
    let (b, mut b_rx) = start_tls(2, &ca.node("b", true), "");
    assert_refused_both_ways(&a, &b, &mut b_rx, &mut a_rx);
}

#[test]
fn plain_tcp_and_tls_buses_refuse_each_other() {
    let ca = TestCa::new("cluster");
    let (a, mut a_rx) = start(1);
    let (b, mut b_rx) = start_tls(2, &ca.node("b", false), "");
    assert_refused_both_ways(&a, &b, &mut b_rx, &mut a_rx);
}

#[test]
fn plain_hello_on_a_tls_bus_gets_a_reject_saying_tls_is_required() {
    let ca = TestCa::new("cluster");
    let (b, mut b_rx) = start_tls(2, &ca.node("b", false), "");
    let mut raw = TcpStream::connect(b.local_addr()).unwrap();
    raw.write_all(&hello_bytes(CLUSTER, 3, 2)).unwrap();
    raw.write_all(&message_bytes(&append(3, 2, 1))).unwrap();
    let frames = closed_by_peer_within(raw, Duration::from_secs(3), "plain on TLS");
    assert_eq!(
        frames,
        vec![Frame::Reject(inbound::TLS_REQUIRED.to_owned())]
    );
    assert_eq!(b_rx.try_recv(), Err(TryRecvError::Empty));
}

#[test]
fn tls_files_that_are_missing_or_wrong_are_refused_with_the_setting() {
    let ca = TestCa::new("cluster");
    let good = ca.node("a", false);
    let no_ca = crate::tls::TlsFiles {
        ca_cert_file: String::new(),
        ..good.clone()
    };
    assert!(crate::tls::build(&no_ca)
        .unwrap_err()
        .contains("tls-ca-cert-file"));
    let missing = crate::tls::TlsFiles {
        cert_file: "/nonexistent/node.crt".into(),
        ..good.clone()
    };
    let e = crate::tls::build(&missing).unwrap_err();
    assert!(e.contains("tls-cert-file /nonexistent/node.crt"), "{e}");
    let key_as_cert = crate::tls::TlsFiles {
        cert_file: good.key_file.clone(),
        ..good.clone()
    };
    assert!(crate::tls::build(&key_as_cert)
        .unwrap_err()
        .contains("tls-cert-file"));
    let ca_dir = crate::tls::TlsFiles {
        ca_cert_file: String::new(),
        ca_cert_dir: ca.dir.path().display().to_string(),
        ..good
    };
    crate::tls::build(&ca_dir).unwrap();
}

#[test]
fn exposed_bus_without_password_or_tls_is_warned_about() {
    let any: SocketAddr = "0.0.0.0:16379".parse().unwrap();
    let lo: SocketAddr = "127.0.0.1:16379".parse().unwrap();
    let w = exposure_warning(any, "", false).unwrap();
    assert!(
        w.contains("raft.cluster-password") && w.contains("raft.tls-enabled"),
        "{w}"
    );
    assert_eq!(exposure_warning(lo, "", false), None);
    assert_eq!(exposure_warning(any, "pw", false), None);
    assert_eq!(exposure_warning(any, "", true), None);
}

#[test]
fn open_connections_are_lent_to_the_polling_thread_and_keep_their_order() {
    let (a, _a_rx) = start(1);
    let (b, mut b_rx) = start_polled(2, None);
    a.set_peer(2, &b.local_addr().to_string());
    for i in 0..2000u64 {
        a.send(vec![append(1, 2, i)]);
    }
    for i in 0..2000u64 {
        let m = b_rx.recv_timeout(WAIT).unwrap();
        assert_eq!(m.index, i, "out of order");
    }
    assert!(
        b_rx.polled > 1900,
        "only {} of 2000 messages were read by the polling thread",
        b_rx.polled
    );
    assert_eq!(lent(&b), 1);
    // The polling side notices the connection close, as a reader would.
    drop(a);
    let closed = wait_until(|| {
        let _ = b_rx.recv_timeout(Duration::from_millis(10));
        b_rx.closed.contains(&1)
    });
    assert!(closed, "the closed lent connection was not reported");
    assert_eq!(lent(&b), 0);
}

#[test]
fn a_lent_connection_goes_back_to_a_reader_for_a_snapshot_and_is_lent_again() {
    let dir = tempfile::tempdir().unwrap();
    let recv = dir.path().join("snap");
    let (b, mut b_rx) = start_polled(2, Some(recv.clone()));
    let mut raw = TcpStream::connect(b.local_addr()).unwrap();
    raw.write_all(&hello_bytes(CLUSTER, 1, 2)).unwrap();
    assert_eq!(read_frames(&mut raw, 1), vec![Frame::Welcome]);
    raw.write_all(&message_bytes(&append(1, 2, 1))).unwrap();
    assert_eq!(b_rx.recv_timeout(WAIT).unwrap().index, 1);
    assert!(wait_until(|| lent(&b) == 1));
    let polled_before = b_rx.polled;

    // In one write: a message, the whole file in two chunks, its MsgSnapshot, a message.
    let file = vec![7u8; 100_000];
    let mut buf = message_bytes(&append(1, 2, 2));
    frame::encode_snapshot_chunk(40, 0, 100_000, &file[..60_000], &mut buf).unwrap();
    frame::encode_snapshot_chunk(40, 60_000, 100_000, &file[60_000..], &mut buf).unwrap();
    let mut snap = Message {
        msg_type: MessageType::MsgSnapshot as i32,
        to: 2,
        from: 1,
        term: 3,
        ..Default::default()
    };
    snap.mut_snapshot().mut_metadata().index = 40;
    buf.extend(message_bytes(&snap));
    buf.extend(message_bytes(&append(1, 2, 41)));
    raw.write_all(&buf).unwrap();
    let got: Vec<(MessageType, u64)> = (0..3)
        .map(|_| {
            let m = b_rx.recv_timeout(WAIT).unwrap();
            (m.get_msg_type(), m.index)
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (MessageType::MsgAppend, 2),
            (MessageType::MsgSnapshot, 0),
            (MessageType::MsgAppend, 41)
        ]
    );
    assert_eq!(std::fs::read(&recv).unwrap(), file, "the snapshot file");
    assert_eq!(
        lock(&b.inbound_conns).len(),
        2,
        "the handshake's reader and the snapshot's"
    );
    // Lent again once the snapshot is complete: later messages come through the poll.
    assert!(wait_until(|| lent(&b) == 1), "not lent again");
    raw.write_all(&message_bytes(&append(1, 2, 42))).unwrap();
    assert_eq!(b_rx.recv_timeout(WAIT).unwrap().index, 42);
    assert!(b_rx.polled > polled_before + 1);
}

#[test]
fn tls_connections_are_not_lent() {
    let ca = TestCa::new("lend");
    let fa = ca.node("a", false);
    let fb = ca.node("b", false);
    let (a, _a_rx) = start_tls(1, &fa, "");
    let (b, mut b_rx) = start_cfg(TransportConfig {
        tls: Some(crate::tls::TlsHandle::new(crate::tls::build(&fb).unwrap())),
        bell: Some(Bell::new().unwrap()),
        ..TransportConfig::new(2, CLUSTER, any_port())
    });
    assert!(b_rx.poll.is_some());
    a.set_peer(2, &b.local_addr().to_string());
    a.send(vec![append(1, 2, 5)]);
    assert_eq!(b_rx.recv_timeout(WAIT).unwrap().index, 5);
    assert_eq!(b_rx.polled, 0);
    assert_eq!(lent(&b), 0);
}

#[test]
fn messages_in_the_handshake_read_come_first_and_shutdown_closes_lent_connections() {
    let (b, mut b_rx) = start_polled(2, None);
    let mut raw = TcpStream::connect(b.local_addr()).unwrap();
    // The Hello and three messages in one write: the reader decodes them in the read that
    // completes the handshake and lends them along with the connection.
    let mut buf = hello_bytes(CLUSTER, 1, 2);
    for i in 1..=3 {
        buf.extend(message_bytes(&append(1, 2, i)));
    }
    raw.write_all(&buf).unwrap();
    assert_eq!(read_frames(&mut raw, 1), vec![Frame::Welcome]);
    raw.write_all(&message_bytes(&append(1, 2, 4))).unwrap();
    let got: Vec<u64> = (0..4)
        .map(|_| b_rx.recv_timeout(WAIT).unwrap().index)
        .collect();
    assert_eq!(got, vec![1, 2, 3, 4]);
    assert_eq!(b_rx.polled, 4, "all came through the lent connection");
    assert_eq!(lent(&b), 1);
    // The transport stops; the lent connection is closed with the poll that holds it.
    b.shutdown();
    drop(b_rx);
    assert_closed_by_peer(raw, "lent connection after shutdown");
}
