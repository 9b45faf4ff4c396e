//! The nemesis: a fixed number of rounds, each aimed at the current leader and bounded in
//! time, in turn: SIGKILL it and restart it; SIGSTOP it for longer than an election
//! timeout, so that a new leader takes over, then SIGCONT it: it resumes still believing it
//! leads; cut it off from both other nodes (the bus proxies) for as long, then let it back.
//! Each round ends with some calm time under a leader.
//!
//! A pause round also probes for stale reads, as a client of its own (its ops go into the
//! history like any other client's): before the pause it opens connections to the leader;
//! once a new leader is elected it writes each current key through the new leader, and
//! only then sends a GET or LRANGE of that key to the frozen old leader, whose reply comes
//! after SIGCONT. A linearizable read must see the write, since it began after the write
//! was acknowledged; a deposed leader that answers from its own data does not.

use std::time::{Duration, Instant};

use crate::common::proxy::Partitions;
use crate::common::{Cluster, ELECTION_MS};
use crate::history::{unique_value, Cmd, Op, Outcome};
use crate::resp::Conn;
use crate::rng::Rng;
use crate::workload::{
    classify, command, find_leader, list_key, register_key, CONNECT_TIMEOUT, LIST_SLOTS,
    REGISTER_SLOTS,
};

/// How long to wait for a leader before a round: beyond this the cluster is not recovering,
/// which fails the test.
pub const LEADER_WAIT: Duration = Duration::from_secs(10);
/// How long a probe waits for its reply after SIGCONT.
const PROBE_REPLY_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Default)]
pub struct NemesisLog {
    pub kills: usize,
    pub pauses: usize,
    pub partitions: usize,
    /// Stale-read probes sent to a frozen old leader.
    pub probes: usize,
    /// One line per action, with times since the start of the run.
    pub lines: Vec<String>,
    /// The probe client's ops.
    pub ops: Vec<Op>,
    pub unexpected: Vec<String>,
}

pub struct Nemesis {
    pub rounds: usize,
    pub seed: u64,
    pub start: Instant,
    /// The probe client's number (distinct from the workload's clients).
    pub client: usize,
    /// No probes (reads) when the workload is writes-only.
    pub writes_only: bool,
}

fn ms(rng: &mut Rng, lo: u64, hi: u64) -> Duration {
    Duration::from_millis(rng.range(lo, hi))
}

impl Nemesis {
    fn at(&self) -> String {
        format!("{:>8.3}s", self.start.elapsed().as_secs_f64())
    }

    /// Runs the rounds against `c`. Returns the log, or an error (with the log so far) if
    /// the cluster had no leader within `LEADER_WAIT`.
    pub fn run(
        &self,
        c: &mut Cluster,
        parts: &Partitions,
    ) -> Result<NemesisLog, Box<(String, NemesisLog)>> {
        let ports: Vec<u16> = c.nodes.iter().map(|n| n.def.port).collect();
        let all: Vec<usize> = (0..ports.len()).collect();
        let mut rng = Rng::new(self.seed ^ 0x6e65_6d65_7369_7321);
        let mut log = NemesisLog::default();
        let mut seq = 0u64;
        for round in 0..self.rounds {
            let Some((l, term)) = find_leader(&ports, &all, LEADER_WAIT) else {
                let msg = format!(
                    "{} no leader within {LEADER_WAIT:?} (round {round})",
                    self.at()
                );
                return Err(Box::new((msg, log)));
            };
            let name = format!("{} (:{})", c.nodes[l].def.name, ports[l]);
            if round % 3 == 2 {
                let cut = ms(&mut rng, ELECTION_MS * 3, ELECTION_MS * 6);
                log.lines.push(format!(
                    "{} partition: leader {name}, term {term}, cut off from the others for {cut:?}",
                    self.at()
                ));
                parts.isolate(l, ports.len());
                std::thread::sleep(cut);
                parts.heal_all();
                log.lines.push(format!("{} healed", self.at()));
                log.partitions += 1;
            } else if round % 3 == 0 {
                let down = ms(&mut rng, 100, 800);
                log.lines.push(format!(
                    "{} SIGKILL leader {name}, term {term}; restart in {down:?}",
                    self.at()
                ));
                c.kill(l);
                std::thread::sleep(down);
                // Bounded by the harness (it fails the test if the node does not answer).
                c.start_node(l);
                log.lines.push(format!("{} restarted {name}", self.at()));
                log.kills += 1;
            } else {
                // Longer than the election timeout (randomised in 1x..2x), so that a new
                // leader is elected and takes writes while this one is frozen.
                let frozen = ms(&mut rng, ELECTION_MS * 3, ELECTION_MS * 6);
                let probe_to = if self.writes_only {
                    Vec::new()
                } else {
                    (0..REGISTER_SLOTS + LIST_SLOTS)
                        .filter_map(|_| {
                            Conn::connect(ports[l], CONNECT_TIMEOUT, PROBE_REPLY_TIMEOUT).ok()
                        })
                        .collect()
                };
                log.lines.push(format!(
                    "{} SIGSTOP leader {name}, term {term}, for {frozen:?}",
                    self.at()
                ));
                let stopped = Instant::now();
                c.signal(l, libc::SIGSTOP);
                let others: Vec<usize> = all.iter().copied().filter(|&i| i != l).collect();
                let wait = frozen.saturating_sub(Duration::from_millis(ELECTION_MS));
                let mut sent = Vec::new();
                if !probe_to.is_empty() {
                    if let Some((nl, nterm)) = find_leader(&ports, &others, wait) {
                        log.lines.push(format!(
                            "{} new leader {} (:{}), term {nterm}; probing {name}",
                            self.at(),
                            c.nodes[nl].def.name,
                            ports[nl]
                        ));
                        sent = self.probe(&ports, l, nl, probe_to, &mut seq, &mut log);
                    }
                }
                std::thread::sleep(frozen.saturating_sub(stopped.elapsed()));
                c.signal(l, libc::SIGCONT);
                log.lines.push(format!("{} SIGCONT {name}", self.at()));
                for (mut con, mut op) in sent {
                    let reply = con.recv();
                    op.ret = self.start.elapsed();
                    op.outcome = classify(&op.cmd, reply, &ports, l, &mut log.unexpected).0;
                    log.probes += 1;
                    log.ops.push(op);
                }
                log.pauses += 1;
            }
            std::thread::sleep(ms(&mut rng, 500, 1500));
        }
        Ok(log)
    }

    /// Writes each current key through the new leader `nl`, then sends a read of it to the
    /// frozen old leader `l` on one of `conns`. Returns the reads sent, to be completed
    /// once `l` is resumed.
    fn probe(
        &self,
        ports: &[u16],
        l: usize,
        nl: usize,
        conns: Vec<Conn>,
        seq: &mut u64,
        log: &mut NemesisLog,
    ) -> Vec<(Conn, Op)> {
        let now = self.start.elapsed();
        let keys = (0..REGISTER_SLOTS)
            .map(|s| (register_key(s, now), false))
            .chain((0..LIST_SLOTS).map(|s| (list_key(s, now), true)));
        let Ok(mut writer) = Conn::connect(ports[nl], CONNECT_TIMEOUT, PROBE_REPLY_TIMEOUT) else {
            return Vec::new();
        };
        let mut sent = Vec::new();
        for ((key, is_list), mut con) in keys.zip(conns) {
            *seq += 1;
            let v = unique_value(self.client, *seq);
            let cmd = if is_list { Cmd::RPush(v) } else { Cmd::Set(v) };
            let args = command(&cmd, &key);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let call = self.start.elapsed();
            let reply = writer.call(&args);
            let ret = self.start.elapsed();
            let (outcome, _) = classify(&cmd, reply, ports, nl, &mut log.unexpected);
            let acked = matches!(outcome, Outcome::Ok(_));
            log.ops.push(Op {
                client: self.client,
                port: ports[nl],
                key: key.clone(),
                cmd,
                call,
                ret,
                outcome,
            });
            if !acked {
                // The new leader is not taking writes after all: no point probing.
                break;
            }
            let cmd = if is_list { Cmd::LRange } else { Cmd::Get };
            let args = command(&cmd, &key);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let call = self.start.elapsed();
            let op = Op {
                client: self.client,
                port: ports[l],
                key,
                cmd,
                call,
                ret: call,
                outcome: Outcome::Unknown("not sent".into()),
            };
            match con.send(&args) {
                Ok(()) => sent.push((con, op)),
                Err(_) => log.ops.push(op),
            }
        }
        sent
    }
}
