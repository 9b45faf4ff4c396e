//! Network partitions (issue 13): links between nodes are cut by the bus proxies of
//! tests/common/proxy.rs while clients keep writing. Each test checks that the side without a
//! majority acknowledges no write and answers no linearizable read, that no healthy leader
//! is deposed by a node coming back (pre-vote), and that after healing every node holds the
//! same data, with every acknowledged write.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::proxy::Partitions;
use common::*;

/// Clients writing unique keys through whichever node takes them, all along.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<BTreeMap<String, String>>>,
    count: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(c: &Cluster, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(BTreeMap::new()));
        let count = Arc::new(AtomicU64::new(0));
        let ports: Vec<u16> = c.nodes.iter().map(|n| n.def.port).collect();
        let threads = (0..clients)
            .map(|t| {
                let (stop, acked, count, ports) =
                    (stop.clone(), acked.clone(), count.clone(), ports.clone());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    let mut at = t % ports.len();
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let (k, v) = (format!("w{t}:{n}"), format!("v{n}"));
                        match set_on(ports[at], &k, &v) {
                            Ok(()) => {
                                acked.lock().unwrap().insert(k, v);
                                count.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(moved) => {
                                at = moved
                                    .and_then(|p| ports.iter().position(|&q| q == p))
                                    .unwrap_or((at + 1) % ports.len());
                                std::thread::sleep(Duration::from_millis(10));
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            acked,
            count,
            threads,
        }
    }

    fn acked(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Waits until `more` further writes were acknowledged.
    fn wait_more(&self, more: u64, what: &str) {
        let want = self.acked() + more;
        wait_for(what, Duration::from_secs(20), || self.acked() >= want);
    }

    fn finish(self) -> BTreeMap<String, String> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let acked = self.acked.lock().unwrap().clone();
        assert!(!acked.is_empty(), "no write was acknowledged");
        acked
    }
}

/// SET on the node at `port`: Ok, or Err with the port a -MOVED named.
fn set_on(port: u16, k: &str, v: &str) -> Result<(), Option<u16>> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).map_err(|_| None)?;
    let mut con = client
        .get_connection_with_timeout(Duration::from_millis(300))
        .map_err(|_| None)?;
    let _ = con.set_read_timeout(Some(Duration::from_secs(3)));
    match redis::cmd("SET").arg(k).arg(v).query::<Value>(&mut con) {
        Ok(Value::Okay) => Ok(()),
        Ok(other) => panic!("SET {k} answered {other:?}"),
        Err(e) => Err(moved_port(&e)),
    }
}

fn moved_port(e: &redis::RedisError) -> Option<u16> {
    let text = err_text(e);
    let rest = text.strip_prefix("MOVED ")?;
    rest.rsplit(':').next()?.trim().parse().ok()
}

fn role(c: &Cluster, i: usize) -> String {
    c.info_field(i, "raft_role").unwrap_or_default()
}

fn term(c: &Cluster, i: usize) -> u64 {
    c.info_field(i, "raft_current_term")
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

/// For `how_long`, writes and linearizable reads sent to node `i` (cut off from a
/// majority) must all fail: returns what it answered otherwise.
fn probe_minority(c: &Cluster, i: usize, how_long: Duration) -> Vec<String> {
    let mut wrong = Vec::new();
    let until = Instant::now() + how_long;
    let mut n = 0;
    while Instant::now() < until {
        n += 1;
        let Ok(mut con) = c.conn(i) else { continue };
        let _ = con.set_read_timeout(Some(Duration::from_secs(5)));
        let k = format!("minority:{n}");
        if let Ok(v) = redis::cmd("SET").arg(&k).arg("x").query::<Value>(&mut con) {
            wrong.push(format!("SET {k} answered {v:?}"));
        }
        if let Ok(v) = redis::cmd("GET").arg("w0:1").query::<Value>(&mut con) {
            wrong.push(format!("GET answered {v:?}"));
        }
    }
    wrong
}

/// Heals every link, waits for one leader and every node to apply everything, and checks
/// every node holds the same data with every acknowledged write.
fn heal_and_compare(c: &mut Cluster, p: &Partitions, load: Load) {
    p.heal_all();
    load.wait_more(20, "writes after healing");
    let acked = load.finish();
    c.wait_applied_everywhere(Duration::from_secs(30));
    assert_same_data_with(c, &acked);
}

fn other_leader(c: &Cluster, not: usize) -> usize {
    let mut found = 0;
    wait_for(
        "a leader on the majority side",
        Duration::from_secs(20),
        || {
            match (0..c.nodes.len()).find(|&i| i != not && role(c, i) == "leader") {
                Some(l) => found = l,
                None => return false,
            }
            true
        },
    );
    found
}

#[test]
fn a_leader_cut_off_from_both_followers_acknowledges_nothing_and_the_majority_goes_on() {
    let (mut c, p) = Cluster::start_partitionable(3, &[]);
    let load = Load::start(&c, 2);
    load.wait_more(50, "writes before the partition");
    let old = c.wait_leader(Duration::from_secs(10));
    p.isolate(old, 3);
    // The majority elects a leader and takes writes; the old one takes none.
    let wrong = probe_minority(&c, old, Duration::from_millis(ELECTION_MS * 5));
    assert!(wrong.is_empty(), "the cut-off leader answered: {wrong:?}");
    let new = other_leader(&c, old);
    load.wait_more(50, "writes on the majority side");
    // Check-quorum: the cut-off leader stepped down by itself.
    wait_for(
        "the old leader to step down",
        Duration::from_secs(10),
        || role(&c, old) != "leader",
    );
    heal_and_compare(&mut c, &p, load);
    assert!(c.nodes[new].is_running());
}

#[test]
fn a_follower_cut_off_and_back_does_not_depose_the_leader() {
    let (mut c, p) = Cluster::start_partitionable(3, &[]);
    let load = Load::start(&c, 2);
    let l = c.wait_leader(Duration::from_secs(10));
    let t = term(&c, l);
    let f = (l + 1) % 3;
    p.isolate(f, 3);
    // Long enough for the cut-off follower to try (pre-)elections many times.
    std::thread::sleep(Duration::from_millis(ELECTION_MS * 6));
    let wrong = probe_minority(&c, f, Duration::from_millis(ELECTION_MS * 2));
    assert!(wrong.is_empty(), "the cut-off follower answered: {wrong:?}");
    load.wait_more(50, "writes while a follower is cut off");
    p.heal_all();
    std::thread::sleep(Duration::from_millis(ELECTION_MS * 4));
    assert_eq!(role(&c, l), "leader", "the leader was deposed");
    assert_eq!(
        term(&c, l),
        t,
        "the term changed: the returning node disrupted it"
    );
    assert_eq!(term(&c, f), t, "the returning node is in another term");
    heal_and_compare(&mut c, &p, load);
}

#[test]
fn a_link_lost_in_one_direction_keeps_the_leader_and_loses_nothing() {
    let (mut c, p) = Cluster::start_partitionable(3, &[]);
    let load = Load::start(&c, 2);
    let l = c.wait_leader(Duration::from_secs(10));
    let t = term(&c, l);
    let f = (l + 1) % 3;
    // The follower hears nothing from the leader; the leader still hears the follower.
    p.cut(l, f);
    std::thread::sleep(Duration::from_millis(ELECTION_MS * 6));
    load.wait_more(50, "writes while the follower does not hear the leader");
    assert_eq!(role(&c, l), "leader");
    assert_eq!(
        term(&c, l),
        t,
        "a follower that stopped hearing the leader changed the term"
    );
    p.heal_all();
    // The other way round: the leader does not hear the follower, which hears it.
    p.cut(f, l);
    std::thread::sleep(Duration::from_millis(ELECTION_MS * 6));
    load.wait_more(50, "writes while the leader does not hear the follower");
    assert_eq!(role(&c, l), "leader");
    assert_eq!(term(&c, l), t);
    heal_and_compare(&mut c, &p, load);
}

#[test]
fn a_flapping_link_loses_nothing() {
    let (mut c, p) = Cluster::start_partitionable(3, &[]);
    let load = Load::start(&c, 2);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = |lo: u64, hi: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        lo + x % (hi - lo)
    };
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        // Cut the current leader (or whoever led last) off, then let it back, irregularly.
        let l = (0..3).find(|&i| role(&c, i) == "leader").unwrap_or(0);
        p.isolate(l, 3);
        std::thread::sleep(Duration::from_millis(next(100, 900)));
        p.heal_all();
        std::thread::sleep(Duration::from_millis(next(100, 900)));
    }
    heal_and_compare(&mut c, &p, load);
}

#[test]
fn the_proxy_learns_the_sender_from_the_hello() {
    use common::proxy::{hello_from, HELLO_KIND};
    let mut hello = vec![0x52, 0x52, HELLO_KIND, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0];
    hello.extend_from_slice(&77u64.to_le_bytes());
    hello.extend_from_slice(&5u64.to_le_bytes());
    assert_eq!(hello_from(&hello), Some(77));
    hello[2] = HELLO_KIND + 1;
    assert_eq!(hello_from(&hello), None);
}

/// A soak reconnects thousands of times (a killed node's peers retry every few ms): the
/// proxy's ended threads must not pile up (each keeps its stack mapped until joined; the
/// first hour-long soak ran out of memory maps after 37 minutes).
#[test]
fn the_proxy_joins_the_threads_of_ended_connections() {
    // Nothing listens on the target: every connection ends at once.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = closed.local_addr().unwrap().port();
    drop(closed);
    let p = Partitions::start(&[target]);
    for _ in 0..300 {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", p.ports[0])).unwrap();
        // The proxy closes it once its connection to the target is refused.
        let mut b = [0u8; 1];
        let _ = std::io::Read::read(&mut s, &mut b);
    }
    assert!(
        p.threads() < 20,
        "{} proxy threads kept after 300 short connections",
        p.threads()
    );
}
