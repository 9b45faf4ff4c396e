//! The clients: each sends one command at a time to the node it believes is the leader,
//! follows `-MOVED`, moves on to another node after `-CLUSTERDOWN`, a connection error or a
//! timeout, and records every command as an `Op`.
//!
//! Keys rotate (`r1:4` is register slot 1 in its 4th epoch), so a key's sub-history, and a
//! list's length, stay bounded however long the run: checking costs about the same per
//! second of a 5-minute run as of a short one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::history::{unique_value, Cmd, ListRead, Op, Outcome, Reply};
use crate::resp::{Conn, Resp};
use crate::rng::Rng;

pub const REGISTER_SLOTS: u64 = 3;
pub const LIST_SLOTS: u64 = 2;
const REGISTER_EPOCH_SECS: u64 = 5;
const LIST_EPOCH_SECS: u64 = 2;

pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);
/// Per-client reply timeouts, spread so that during a pause some clients give up on the
/// paused leader at once and find the new one, while others are still waiting when it is
/// resumed, and send it their next command right away.
const REPLY_TIMEOUTS_MS: [u64; 8] = [300, 4000, 600, 3000, 1000, 2000, 1500, 5000];
/// After `-CLUSTERDOWN` (no leader known) or a failed connect: give the election a moment.
const BACKOFF: Duration = Duration::from_millis(30);

pub fn register_key(slot: u64, since_start: Duration) -> String {
    format!("r{slot}:{}", since_start.as_secs() / REGISTER_EPOCH_SECS)
}

pub fn list_key(slot: u64, since_start: Duration) -> String {
    format!("l{slot}:{}", since_start.as_secs() / LIST_EPOCH_SECS)
}

pub struct Plan {
    pub ports: Vec<u16>,
    pub start: Instant,
    /// Clients stop when this is set, or at `deadline` whatever happens.
    pub stop: AtomicBool,
    pub deadline: Instant,
    /// No GET or LRANGE (INCR still returns the value it produced).
    pub writes_only: bool,
    pub seed: u64,
}

#[derive(Default)]
pub struct ClientResult {
    pub ops: Vec<Op>,
    /// Replies the protocol does not allow here (error codes or reply types we do not
    /// expect): recorded as unknown outcomes, and reported, since they point at a bug.
    pub unexpected: Vec<String>,
}

pub enum Route {
    Stay,
    /// To this node (index into `ports`).
    To(usize),
    /// Anywhere else, after `BACKOFF` if set.
    Next(bool),
}

pub fn run_client(id: usize, plan: &Plan) -> ClientResult {
    let mut rng = Rng::new(plan.seed ^ (id as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let reply_timeout = Duration::from_millis(REPLY_TIMEOUTS_MS[id % REPLY_TIMEOUTS_MS.len()]);
    let n = plan.ports.len();
    let mut target = id % n;
    let mut con: Option<Conn> = None;
    let mut seq = 0u64;
    let mut out = ClientResult::default();
    while !plan.stop.load(Ordering::Relaxed) && Instant::now() < plan.deadline {
        let c = match con.as_mut() {
            Some(c) => c,
            None => match Conn::connect(plan.ports[target], CONNECT_TIMEOUT, reply_timeout) {
                Ok(c) => con.insert(c),
                Err(_) => {
                    target = (target + 1) % n;
                    std::thread::sleep(BACKOFF);
                    continue;
                }
            },
        };
        let now = plan.start.elapsed();
        seq += 1;
        let value = unique_value(id, seq);
        let (key, cmd) = if rng.chance(55) {
            let key = register_key(rng.range(0, REGISTER_SLOTS), now);
            let cmd = match (plan.writes_only, rng.range(0, 10)) {
                (false, 0..=2) | (true, 0..=5) => Cmd::Set(value),
                (false, 3..=4) | (true, _) => Cmd::Incr,
                (false, _) => Cmd::Get,
            };
            (key, cmd)
        } else {
            let key = list_key(rng.range(0, LIST_SLOTS), now);
            let cmd = if plan.writes_only || rng.chance(60) {
                Cmd::RPush(value)
            } else {
                Cmd::LRange
            };
            (key, cmd)
        };
        let args = command(&cmd, &key);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let call = plan.start.elapsed();
        let reply = c.call(&args);
        let ret = plan.start.elapsed();
        let (outcome, route) = classify(&cmd, reply, &plan.ports, target, &mut out.unexpected);
        out.ops.push(Op {
            client: id,
            port: plan.ports[target],
            key,
            cmd,
            call,
            ret,
            outcome,
        });
        match route {
            Route::Stay => {}
            Route::To(i) => {
                target = i;
                con = None;
            }
            Route::Next(backoff) => {
                target = (target + 1) % n;
                con = None;
                if backoff {
                    std::thread::sleep(BACKOFF);
                }
            }
        }
    }
    out
}

/// The command's arguments as sent.
pub fn command(cmd: &Cmd, key: &str) -> Vec<String> {
    let v: Vec<&str> = match cmd {
        Cmd::Set(_) => vec!["SET", key],
        Cmd::Get => vec!["GET", key],
        Cmd::Incr => vec!["INCR", key],
        Cmd::RPush(_) => vec!["RPUSH", key],
        Cmd::LRange => vec!["LRANGE", key, "0", "-1"],
    };
    let mut v: Vec<String> = v.into_iter().map(String::from).collect();
    if let Cmd::Set(x) | Cmd::RPush(x) = cmd {
        v.push(x.to_string());
    }
    v
}

/// What a reply says about whether `cmd` happened, and where to send the next command
/// (`target` is the node it was sent to).
pub fn classify(
    cmd: &Cmd,
    reply: std::io::Result<Resp>,
    ports: &[u16],
    target: usize,
    unexpected: &mut Vec<String>,
) -> (Outcome, Route) {
    let reply = match reply {
        Ok(r) => r,
        // Timed out or the node died: the command may still take effect. The connection
        // may also still deliver its reply later, so it is dropped.
        Err(e) => {
            let why = match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    "no reply in time".to_string()
                }
                _ => e.to_string(),
            };
            return (
                Outcome::Unknown(format!("connection: {why}")),
                Route::Next(false),
            );
        }
    };
    if let Resp::Error(e) = &reply {
        let code = e.split_whitespace().next().unwrap_or("");
        return match code {
            "MOVED" => {
                let route = match moved_to(e, ports) {
                    Some(i) if i == target => Route::Stay,
                    Some(i) => Route::To(i),
                    None => Route::Next(false),
                };
                (Outcome::Failed(e.clone()), route)
            }
            // LOADING: a node that restarted is loading its snapshot, and refuses data
            // commands before they reach the log (commands/mod.rs), as Redis does while it
            // loads. Only long runs see it: short ones compact no log, so no snapshot loads.
            "CLUSTERDOWN" | "NOCLUSTER" | "TRYAGAIN" | "LOADING" => {
                (Outcome::Failed(e.clone()), Route::Next(true))
            }
            "TIMEOUT" => (Outcome::Unknown(e.clone()), Route::Next(false)),
            _ => {
                unexpected.push(format!("{} -> -{e}", cmd.name()));
                (
                    Outcome::Unknown(format!("unexpected: {e}")),
                    Route::Next(true),
                )
            }
        };
    }
    let parsed = match (cmd, &reply) {
        (Cmd::Set(_), Resp::Simple(s)) if s == "OK" => Some(Reply::Ok),
        (Cmd::Get, Resp::Bulk(None)) => Some(Reply::Value(None)),
        (Cmd::Get, Resp::Bulk(Some(b))) => int(b).map(|v| Reply::Value(Some(v))),
        (Cmd::Incr | Cmd::RPush(_), Resp::Int(n)) => Some(Reply::Int(*n)),
        (Cmd::LRange, Resp::Array(Some(items))) => {
            list(items).map(|l| Reply::List(ListRead::of(&l)))
        }
        _ => None,
    };
    match parsed {
        Some(r) => (Outcome::Ok(r), Route::Stay),
        None => {
            let mut shown = format!("{reply:?}");
            shown.truncate(200);
            unexpected.push(format!("{} -> {shown}", cmd.name()));
            (
                Outcome::Unknown(format!("unexpected: {shown}")),
                Route::Next(false),
            )
        }
    }
}

/// The node a `MOVED 0 host:port` error points to (index into `ports`).
pub fn moved_to(err: &str, ports: &[u16]) -> Option<usize> {
    let port: u16 = err
        .strip_prefix("MOVED ")?
        .rsplit(':')
        .next()?
        .parse()
        .ok()?;
    ports.iter().position(|&p| p == port)
}

fn int(b: &[u8]) -> Option<i64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// The items of an LRANGE reply, as the integers the workload pushes.
pub fn list(items: &[Resp]) -> Option<Vec<i64>> {
    items
        .iter()
        .map(|i| match i {
            Resp::Bulk(Some(b)) => int(b),
            _ => None,
        })
        .collect()
}

/// Parses `INFO raft` into (role, term), or None if the node does not answer in time.
fn role_and_term(port: u16) -> Option<(String, u64)> {
    let mut c = Conn::connect(port, CONNECT_TIMEOUT, Duration::from_millis(500)).ok()?;
    let Resp::Bulk(Some(info)) = c.call(&["INFO", "raft"]).ok()? else {
        return None;
    };
    let info = String::from_utf8(info).ok()?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_string())
    };
    Some((
        field("raft_role")?,
        field("raft_current_term")?.parse().ok()?,
    ))
}

/// Among the nodes `among` (indices into `ports`), the one that says it is leader in the
/// highest term, polling until `timeout`.
pub fn find_leader(ports: &[u16], among: &[usize], timeout: Duration) -> Option<(usize, u64)> {
    let deadline = Instant::now() + timeout;
    loop {
        let best = among
            .iter()
            .filter_map(|&i| {
                let (role, term) = role_and_term(ports[i])?;
                (role == "leader").then_some((i, term))
            })
            .max_by_key(|&(_, term)| term);
        if best.is_some() || Instant::now() > deadline {
            return best;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `args` through the leader, following `-MOVED` and retrying elsewhere on errors,
/// until a definite reply or `timeout`: for the reads at the end of a run, once the
/// cluster has settled. Returns the reply and the port that gave it.
pub fn call_leader(ports: &[u16], args: &[&str], timeout: Duration) -> Option<(Resp, u16)> {
    let deadline = Instant::now() + timeout;
    let all: Vec<usize> = (0..ports.len()).collect();
    let mut target = find_leader(ports, &all, timeout).map_or(0, |(i, _)| i);
    while Instant::now() < deadline {
        let port = ports[target];
        if let Ok(mut c) = Conn::connect(port, CONNECT_TIMEOUT, Duration::from_secs(5)) {
            match c.call(args) {
                Ok(Resp::Error(e)) => {
                    if let Some(i) = moved_to(&e, ports) {
                        target = i;
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                }
                Ok(r) => return Some((r, port)),
                Err(_) => {}
            }
        }
        target = (target + 1) % ports.len();
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_loading_its_snapshot_refuses_the_command_and_the_client_moves_on() {
        let mut unexpected = Vec::new();
        let reply = Ok(Resp::Error("LOADING Raft module is loading data".into()));
        let (outcome, route) = classify(&Cmd::Incr, reply, &[1, 2, 3], 0, &mut unexpected);
        assert_eq!(
            outcome,
            Outcome::Failed("LOADING Raft module is loading data".into())
        );
        assert!(matches!(route, Route::Next(true)));
        assert!(unexpected.is_empty());
    }
}
