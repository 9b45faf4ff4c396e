//! The bus port under hostile input from anyone who can reach it: a flood of connections
//! that never complete a handshake does not keep the peers out or the cluster from
//! electing and writing, those connections are closed after the handshake timeout, and a
//! frame header announcing a huge body closes the connection before the body is buffered.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// The module's `HANDSHAKE_TIMEOUT` (transport/inbound.rs).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

fn bus_port(c: &Cluster, i: usize) -> u16 {
    c.nodes[i].def.bus_port
}

fn rss_kb(c: &Cluster, i: usize) -> u64 {
    let pid = c.nodes[i].child.as_ref().expect("node runs").id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

fn set(c: &Cluster, i: usize, key: &str, value: &str) -> Result<(), String> {
    q(c, i, &["SET", key, value]).map(|_| ())
}

/// Whether the node has closed `s` (EOF or reset) within `timeout`; what it sent before is
/// ignored.
fn closed_within(s: &mut TcpStream, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 512];
    while Instant::now() < deadline {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn a_flood_of_unauthenticated_bus_connections_does_not_stop_the_cluster() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    set(&c, l, "before", "1").unwrap();

    // About 150 connections a second to each node, a third of them sending garbage, the
    // rest nothing, held open until the node closes them.
    let stop = Arc::new(AtomicBool::new(false));
    let ports: Vec<u16> = (0..3).map(|i| bus_port(&c, i)).collect();
    let flood = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut held: Vec<TcpStream> = Vec::new();
            let mut opened = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for &port in &ports {
                    if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                        if opened.is_multiple_of(3) {
                            let _ = s.write_all(b"\x52\x52\x01\x10\x00\x00\x00garbage");
                        }
                        held.push(s);
                        opened += 1;
                    }
                }
                // Bounded here too: the oldest are closed by the nodes long before.
                if held.len() > 3000 {
                    held.drain(..1000);
                }
                std::thread::sleep(Duration::from_millis(7));
            }
            (opened, held)
        })
    };

    // Under the flood: a leader killed, a new one elected by the two others, writes
    // acknowledged, and the killed node restarted catches up (its peers must reconnect to
    // it and it to them, through the flood).
    std::thread::sleep(Duration::from_secs(1));
    c.kill(l);
    let l2 = c.wait_leader(Duration::from_secs(20));
    assert_ne!(l2, l);
    for k in 0..20 {
        set(&c, l2, &format!("k{k}"), "v").unwrap();
    }
    c.start_node(l);
    c.wait_applied_everywhere(Duration::from_secs(30));
    let l3 = c.wait_leader(Duration::from_secs(20));
    set(&c, l3, "after", "1").unwrap();
    c.wait_applied_everywhere(Duration::from_secs(30));
    assert_eq!(
        q(&c, l, &["RAFT.DEBUG", "EXEC", "GET", "k19"]).unwrap(),
        redis::Value::BulkString(b"v".to_vec())
    );

    stop.store(true, Ordering::Relaxed);
    let (opened, mut held) = flood.join().unwrap();
    assert!(opened > 300, "the flood opened only {opened} connections");

    // Whatever the flood still holds is closed by the nodes after the handshake timeout.
    let deadline = HANDSHAKE_TIMEOUT + Duration::from_secs(3);
    let started = Instant::now();
    for s in held.iter_mut().rev().take(60) {
        let left = deadline.saturating_sub(started.elapsed()) + Duration::from_millis(200);
        assert!(closed_within(s, left), "a flood connection is still open");
    }

    // One warning per period about them, not one a connection.
    for i in 0..3 {
        let log = c.nodes[i].log();
        let warnings = log
            .lines()
            .filter(|l| {
                l.contains("raft bus:")
                    && (l.contains("still in its handshake")
                        || l.contains("no valid hello")
                        || l.contains("bad frame magic")
                        || l.contains("closing connection from"))
            })
            .count();
        assert!(
            warnings < 30,
            "node {i} logged {warnings} warnings about {opened} flood connections"
        );
    }
}

#[test]
fn an_oversized_frame_is_refused_before_it_is_buffered() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    let victim = (l + 1) % 3;
    let rss_before = rss_kb(&c, victim);

    // Frames announcing 4 GiB - 1 (past any limit) and 60 MiB (under the 64 MiB frame limit
    // of a peer, far over what a connection may send before its handshake), each followed by
    // as much of its body as the node takes.
    const BODY_BYTES: usize = 60 << 20;
    for len in [u32::MAX, BODY_BYTES as u32] {
        let mut s = TcpStream::connect(("127.0.0.1", bus_port(&c, victim))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut header = Vec::new();
        header.extend_from_slice(&[0x52, 0x52, 0x01]);
        header.extend_from_slice(&len.to_le_bytes());
        header.extend_from_slice(&[0; 4]);
        s.write_all(&header).unwrap();
        let chunk = vec![0x61u8; 64 << 10];
        let mut sent = 0usize;
        let started = Instant::now();
        while sent < BODY_BYTES {
            match s.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        assert!(
            sent < BODY_BYTES,
            "announced {len}: the node took all {sent} bytes of the body"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "announced {len}"
        );
        assert!(
            closed_within(&mut s, Duration::from_secs(3)),
            "announced {len}"
        );
    }
    let rss_after = rss_kb(&c, victim);
    assert!(
        rss_after < rss_before + 16 * 1024,
        "node's RSS grew from {rss_before} kB to {rss_after} kB"
    );

    // The cluster is unaffected.
    let l = c.wait_leader(Duration::from_secs(10));
    set(&c, l, "k", "v").unwrap();
    c.wait_applied_everywhere(Duration::from_secs(10));
}
