//! Linearizability under failures: concurrent clients run SET/GET/INCR on register keys and
//! RPUSH/LRANGE on list keys against a 3-node cluster while a nemesis SIGKILLs and restarts,
//! SIGSTOPs and SIGCONTs, or cuts off from the others (bus proxies: tests/common/proxy.rs)
//! and lets back, the current leader. Every command is recorded with its
//! invocation and completion times and its outcome; afterwards every key's sub-history is
//! checked (registers: WGL search; lists: against the final contents, read through the
//! leader and compared with each node's own copy), and the test fails on any anomaly.
//!
//! The checkers live in `tests/linearizability/`, each with unit tests on small hand-made
//! histories that must pass and must fail. Environment:
//! - `LIN_SECONDS` (16): how long the nemesis runs (2 rounds per 5 s, each bounded); the
//!   long run is `scripts/linearizability.sh [SECONDS]`;
//! - `LIN_WRITES_ONLY=1`: no GET/LRANGE from clients (nor stale-read probes); only writes
//!   (INCR's result included) and the final state are checked;
//! - `LIN_SEED` (from the clock): replays the same choices, not the same timings;
//! - `LIN_CLIENTS` (8), `LIN_STEP_BUDGET` (5000000 search steps per register key);
//! - `LIN_NODE_ARGS`: extra redis-server arguments for every node, e.g.
//!   `--raft.read-mode lease` or `--raft.follower-reads yes --raft.loglevel verbose`.
//!
//! The whole history is written to `$CARGO_TARGET_TMPDIR/linearizability.history` (with
//! the nodes' logs beside it when something is found), overwritten by the next run.

mod common;

#[path = "linearizability/check.rs"]
mod check;
#[path = "linearizability/history.rs"]
mod history;
#[path = "linearizability/list.rs"]
mod list;
#[path = "linearizability/nemesis.rs"]
mod nemesis;
#[path = "linearizability/register.rs"]
mod register;
#[path = "linearizability/resp.rs"]
mod resp;
#[path = "linearizability/rng.rs"]
mod rng;
#[path = "linearizability/workload.rs"]
mod workload;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use history::{show_value, Cmd, ListRead, Op, Outcome, Reply, FINAL_CLIENT};
use resp::{Conn, Resp};

/// How many anomalies of each kind to print in full.
const SHOW_ANOMALIES: usize = 10;
/// Bounds on settling at the end (each also bounded inside the harness).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);

struct Settings {
    seconds: u64,
    rounds: usize,
    writes_only: bool,
    seed: u64,
    clients: usize,
    budget_steps: u64,
    /// Extra redis-server arguments for every node (`LIN_NODE_ARGS`).
    node_args: Vec<String>,
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {v:?}")),
        Err(_) => default,
    }
}

impl Settings {
    fn from_env() -> Settings {
        let seconds = env_u64("LIN_SECONDS", 16);
        let clock = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Settings {
            seconds,
            rounds: (seconds * 2 / 5).max(3) as usize,
            writes_only: std::env::var("LIN_WRITES_ONLY").is_ok_and(|v| v == "1"),
            seed: env_u64("LIN_SEED", clock % 1_000_000_007),
            clients: env_u64("LIN_CLIENTS", 8) as usize,
            budget_steps: env_u64("LIN_STEP_BUDGET", 5_000_000),
            node_args: std::env::var("LIN_NODE_ARGS")
                .unwrap_or_default()
                .split_whitespace()
                .map(String::from)
                .collect(),
        }
    }
}

struct Run {
    ops: Vec<Op>,
    unexpected: Vec<String>,
    nemesis: nemesis::NemesisLog,
    start: Instant,
    secs: f64,
}

/// Clients and nemesis together; returns once the nemesis is done and the clients stopped.
fn run_workload(c: &mut Cluster, parts: &common::proxy::Partitions, s: &Settings) -> Run {
    let start = Instant::now();
    println!(
        "run started at {} UTC (times below are seconds since then; node logs use wall time)",
        utc_time_of_day(SystemTime::now())
    );
    let plan = Arc::new(workload::Plan {
        ports: c.nodes.iter().map(|n| n.def.port).collect(),
        start,
        stop: false.into(),
        // A safety net only: the clients are normally stopped once the nemesis is done.
        deadline: start + Duration::from_secs(s.seconds * 4 + 60),
        writes_only: s.writes_only,
        seed: s.seed,
    });
    let threads: Vec<_> = (0..s.clients)
        .map(|id| {
            let plan = plan.clone();
            std::thread::spawn(move || workload::run_client(id, &plan))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let nemesis = nemesis::Nemesis {
        rounds: s.rounds,
        seed: s.seed,
        start,
        client: s.clients,
        writes_only: s.writes_only,
    }
    .run(c, parts);
    // Calm at the end: in-flight commands settle under a stable leader.
    std::thread::sleep(Duration::from_secs(1));
    plan.stop.store(true, Ordering::Relaxed);
    let mut ops = Vec::new();
    let mut unexpected = Vec::new();
    for t in threads {
        let r = t.join().expect("client thread panicked");
        ops.extend(r.ops);
        unexpected.extend(r.unexpected);
    }
    let mut nemesis = match nemesis {
        Ok(log) => log,
        Err(e) => {
            let (msg, log) = *e;
            for l in &log.lines {
                println!("  {l}");
            }
            panic!("the cluster stopped recovering: {msg}");
        }
    };
    ops.append(&mut nemesis.ops);
    unexpected.append(&mut nemesis.unexpected);
    Run {
        ops,
        unexpected,
        nemesis,
        start,
        secs: start.elapsed().as_secs_f64(),
    }
}

struct FinalState {
    /// The leader's final contents of each list key.
    lists: BTreeMap<String, Vec<i64>>,
    /// Nodes whose own copy of a key differs from what the leader read.
    divergent: Vec<String>,
}

/// Once every node has applied everything: reads each key through the leader, adding the
/// reads to the history (they are checked like any other), then reads each key locally
/// on every node (`RAFT.DEBUG EXEC`) and compares.
fn read_final_state(c: &mut Cluster, run: &mut Run) -> FinalState {
    let ports: Vec<u16> = c.nodes.iter().map(|n| n.def.port).collect();
    c.wait_applied_everywhere(SETTLE_TIMEOUT);
    let keys: BTreeSet<(String, bool)> = run
        .ops
        .iter()
        .map(|o| (o.key.clone(), matches!(o.cmd, Cmd::RPush(_) | Cmd::LRange)))
        .collect();
    let mut lists = BTreeMap::new();
    let mut leader_read: BTreeMap<String, Resp> = BTreeMap::new();
    for (key, is_list) in &keys {
        let (cmd, args) = if *is_list {
            (Cmd::LRange, vec!["LRANGE", key, "0", "-1"])
        } else {
            (Cmd::Get, vec!["GET", key])
        };
        let call = run.start.elapsed();
        let (reply, port) = workload::call_leader(&ports, &args, SETTLE_TIMEOUT)
            .unwrap_or_else(|| panic!("final read of {key} got no definite reply"));
        let ret = run.start.elapsed();
        let result = match &reply {
            Resp::Array(Some(items)) if *is_list => workload::list(items).map(|l| {
                let r = Reply::List(ListRead::of(&l));
                lists.insert(key.clone(), l);
                r
            }),
            Resp::Bulk(None) if !is_list => Some(Reply::Value(None)),
            Resp::Bulk(Some(_)) if !is_list => resp_int(&reply).map(|v| Reply::Value(Some(v))),
            _ => None,
        };
        let result =
            result.unwrap_or_else(|| panic!("final read of {key}: unexpected reply {reply:?}"));
        run.ops.push(Op {
            client: FINAL_CLIENT,
            port,
            key: key.clone(),
            cmd,
            call,
            ret,
            outcome: Outcome::Ok(result),
        });
        leader_read.insert(key.clone(), reply);
    }
    c.wait_applied_everywhere(SETTLE_TIMEOUT);
    let mut divergent = Vec::new();
    for (i, &port) in ports.iter().enumerate() {
        let mut con = Conn::connect(port, Duration::from_secs(2), Duration::from_secs(10))
            .expect("connect for the final local reads");
        for (key, leader_reply) in &leader_read {
            let args: Vec<&str> = if matches!(leader_reply, Resp::Array(_)) {
                vec!["RAFT.DEBUG", "EXEC", "LRANGE", key, "0", "-1"]
            } else {
                vec!["RAFT.DEBUG", "EXEC", "GET", key]
            };
            let local = con.call(&args).expect("RAFT.DEBUG EXEC");
            if local != *leader_reply {
                divergent.push(format!(
                    "{} (:{port}) has {key} = {} but the leader read {}",
                    c.nodes[i].def.name,
                    show_resp(&local),
                    show_resp(leader_reply)
                ));
            }
        }
    }
    FinalState { lists, divergent }
}

/// `HH:MM:SS.mmm`, as in redis-server's log lines (which are in local time; UTC here).
fn utc_time_of_day(t: SystemTime) -> String {
    let ms = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
        % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

/// A 3-node cluster with `node_args` added to every node's command line, its bus links
/// through proxies that can cut them.
fn start_cluster(node_args: &[String]) -> (Cluster, common::proxy::Partitions) {
    let args: Vec<&str> = node_args.iter().map(String::as_str).collect();
    Cluster::start_partitionable(3, &args)
}

fn resp_int(r: &Resp) -> Option<i64> {
    match r {
        Resp::Bulk(Some(b)) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

fn show_resp(r: &Resp) -> String {
    match r {
        Resp::Bulk(None) => "nil".into(),
        Resp::Array(Some(items)) => format!("{} items", items.len()),
        _ => resp_int(r).map_or_else(|| format!("{r:?}"), show_value),
    }
}

fn print_counts(run: &Run) {
    let n = &run.nemesis;
    println!(
        "nemesis: {} SIGKILL+restart, {} SIGSTOP+SIGCONT, {} partitions of the leader ({} \
         stale-read probes sent to a frozen old leader), over {:.1}s",
        n.kills, n.pauses, n.partitions, n.probes, run.secs
    );
    for l in &n.lines {
        println!("  {l}");
    }
    let clients = || run.ops.iter().filter(|o| o.client != FINAL_CLIENT);
    println!(
        "ops: {} ok, {} failed (did not happen), {} indeterminate; plus {} final reads",
        clients().filter(|o| o.is_ok()).count(),
        clients().filter(|o| o.is_failed()).count(),
        clients().filter(|o| o.is_unknown()).count(),
        run.ops.len() - clients().count()
    );
    for (name, [ok, failed, unknown]) in check::counts(&run.ops) {
        println!("  {name:<7} ok {ok:>6}  failed {failed:>5}  indeterminate {unknown:>4}");
    }
    for (reason, n) in check::reasons(&run.ops, 8) {
        println!("  {n:>6} x {reason}");
    }
}

#[test]
fn registers_and_lists_stay_linearizable_while_the_leader_is_killed_paused_or_cut_off() {
    let s = Settings::from_env();
    println!(
        "linearizability: seed {}, {} nemesis rounds (~{}s), {} clients, {}",
        s.seed,
        s.rounds,
        s.seconds,
        s.clients,
        if s.writes_only {
            "writes only (LIN_WRITES_ONLY=1)"
        } else {
            "reads and writes"
        }
    );
    let (mut c, parts) = start_cluster(&s.node_args);
    let legend: Vec<String> = c
        .nodes
        .iter()
        .map(|n| format!("{}=:{}", n.def.name, n.def.port))
        .collect();
    println!("nodes: {}", legend.join(" "));

    let mut run = run_workload(&mut c, &parts, &s);
    let fin = read_final_state(&mut c, &mut run);
    run.ops.sort_by_key(|o| o.call);
    // One fixed name, overwritten by each run: a long run's history is large.
    let history_path =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("linearizability.history");
    if let Ok(mut f) = std::fs::File::create(&history_path) {
        let _ = writeln!(f, "seed {}; {}", s.seed, legend.join(" "));
        for o in &run.ops {
            let _ = writeln!(f, "{o}");
        }
    }
    let t = Instant::now();
    let found = check::check(&run.ops, |_| true, &fin.lists, s.budget_steps);

    print_counts(&run);
    println!(
        "checked {} register keys (up to {} ops each in the search, {} steps in all, at most {} \
         per key) and {} list keys in {:.1}s",
        found.register_keys,
        found.register_ops_max,
        found.steps_total,
        found.steps_max,
        found.list_keys,
        t.elapsed().as_secs_f64()
    );
    println!("history: {}", history_path.display());
    if !s.writes_only {
        // The same history without the clients' reads: what the write path alone shows.
        let writes = |o: &Op| o.client == FINAL_CLIENT || !o.cmd.is_read();
        let w = check::check(&run.ops, writes, &fin.lists, s.budget_steps);
        println!(
            "writes-only view of the same history (final reads kept): {} anomalies, {} undecided",
            w.anomalies.len(),
            w.undecided.len()
        );
        for a in w.anomalies.iter().take(SHOW_ANOMALIES) {
            println!("WRITES-ONLY ANOMALY {a}");
        }
    }
    println!(
        "anomalies: {} (+ {} undecided keys, {} divergent final values, {} unexpected replies)",
        found.anomalies.len(),
        found.undecided.len(),
        fin.divergent.len(),
        run.unexpected.len()
    );
    for a in found.anomalies.iter().take(SHOW_ANOMALIES) {
        println!("ANOMALY {a}");
    }
    if found.anomalies.len() > SHOW_ANOMALIES {
        println!(
            "... and {} more anomalies",
            found.anomalies.len() - SHOW_ANOMALIES
        );
    }
    for u in &found.undecided {
        println!("UNDECIDED {u}");
    }
    for d in fin.divergent.iter().take(SHOW_ANOMALIES) {
        println!("DIVERGENT {d}");
    }
    for u in run.unexpected.iter().take(SHOW_ANOMALIES) {
        println!("UNEXPECTED {u}");
    }

    let problems =
        found.anomalies.len() + found.undecided.len() + fin.divergent.len() + run.unexpected.len();
    if problems > 0 {
        // The harness deletes the nodes' directories: keep their logs next to the history.
        for n in &c.nodes {
            let to = history_path.with_file_name(format!("linearizability.{}.log", n.def.name));
            if std::fs::copy(n.log_path(), &to).is_ok() {
                println!("node log: {}", to.display());
            }
        }
    }

    // The run must have exercised something for a pass to mean anything.
    let ok_writes = run
        .ops
        .iter()
        .filter(|o| o.is_ok() && !o.cmd.is_read())
        .count();
    assert!(ok_writes >= 100, "only {ok_writes} acknowledged writes");
    assert!(run.nemesis.kills >= 1 && run.nemesis.pauses >= 1 && run.nemesis.partitions >= 1);
    let problems =
        found.anomalies.len() + found.undecided.len() + fin.divergent.len() + run.unexpected.len();
    assert_eq!(
        problems, 0,
        "linearizability violated (seed {}); see above",
        s.seed
    );
}
