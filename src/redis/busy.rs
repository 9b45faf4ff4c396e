//! The main thread inside a long command: a script past `busy-reply-threshold`, or Redis's
//! own load of a dataset, makes Redis process events from inside it
//! (`processEventsWhileBlocked`), our wake-ups included. Nothing may be applied there: Redis
//! asserts when a script starts inside another, and a write would land in the middle of the
//! running one. Such a wake-up only keeps what arrived (`defer`) and applies it once the
//! command returned, before Redis next sleeps; but it does stop the running script when a
//! committed kill names it.
//!
//! Runaway scripts: SCRIPT KILL / FUNCTION KILL sent to the leader while an entry's script
//! runs there stops it (when it has not written, as Redis decides), then commits a
//! `KillScript` entry naming that entry. Every node that is running the script kills it when
//! the entry reaches it; a node that has not started it yet (a follower far behind, a restart
//! replaying its log) skips it. The kill sent to a follower is redirected to the leader:
//! a node alone deciding would leave the nodes different.
//!
//! A script that wrote cannot be killed (Redis answers UNKILLABLE); only SHUTDOWN NOSAVE
//! stops it, and on a single Redis its writes are then lost. Here SHUTDOWN NOSAVE on the
//! leader first commits the kill, so that every node, once restarted, skips the script
//! alike: as on Redis, none of its writes happened.

use std::collections::{HashSet, VecDeque};
use std::ffi::c_int;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::api::{self, rm, CallOpts, RedisModuleCtx};
use super::{MainThread, Module};
use crate::codec::{encode_command, killed_script, LogCommand};
use crate::node::ApplyItem;

const CTX_LUA: u32 = api::raw::REDISMODULE_CTX_FLAGS_LUA;
const CTX_MULTI: u32 = api::raw::REDISMODULE_CTX_FLAGS_MULTI;
const CTX_LOADING: u32 = api::raw::REDISMODULE_CTX_FLAGS_LOADING;

/// An entry's script the apply path is running.
#[derive(Clone, Copy)]
pub struct Running {
    pub index: u64,
    /// FCALL rather than EVAL: which kill stops it.
    pub function: bool,
    /// Inside a transaction's entry: not killed live (a replay could not skip just it).
    pub in_transaction: bool,
}

impl Running {
    fn kill_argv(&self) -> Vec<Vec<u8>> {
        let kind: &[u8] = if self.function {
            b"FUNCTION"
        } else {
            b"SCRIPT"
        };
        vec![kind.to_vec(), b"KILL".to_vec()]
    }
}

/// A script run this long may have been killed on the leader (whose threshold to answer BUSY,
/// and so to accept a kill, is at least this in practice).
const LONG_SCRIPT: Duration = Duration::from_millis(10);
const LONG_RUNS_MAX: usize = 64;

struct State {
    /// The apply path is inside `apply_committed` (executing an entry).
    applying: bool,
    /// The entry whose script the apply path is running.
    running_script: Option<Running>,
    /// Committed kills not yet applied: the killed entry's index -> the kill command.
    kills: HashSet<u64>,
    /// A wake-up arrived while inside a command: apply before Redis next sleeps.
    deferred: bool,
    /// This module is calling Redis's own kill: the filter lets it through.
    killing: bool,
    /// When the running script started; the entries of the latest long runs that finished.
    started: Instant,
    long_runs: VecDeque<u64>,
    /// The running script was killed here.
    run_killed: bool,
}

impl Default for State {
    fn default() -> Self {
        State {
            applying: false,
            running_script: None,
            kills: HashSet::new(),
            deferred: false,
            killing: false,
            started: Instant::now(),
            long_runs: VecDeque::new(),
            run_killed: false,
        }
    }
}

static STATE: MainThread<State> = MainThread::new_lazy();

/// Whether the main thread is inside a command, a script or a load, so that this callback
/// runs from Redis's `processEventsWhileBlocked`.
pub fn inside_command(ctx: *mut RedisModuleCtx) -> bool {
    if STATE.get_mut().applying {
        return true;
    }
    let flags = unsafe { rm!(RedisModule_GetContextFlags)(ctx) } as u32;
    flags & (CTX_LUA | CTX_MULTI | CTX_LOADING) != 0
}

/// Whether a script is running (Redis's own, such as a read-only script a node serves at
/// once, or the apply path's).
pub fn script_running(ctx: *mut RedisModuleCtx) -> bool {
    unsafe { rm!(RedisModule_GetContextFlags)(ctx) as u32 & CTX_LUA != 0 }
}

/// Marks the apply path as executing until the returned guard is dropped.
pub fn applying() -> impl Drop {
    struct Applying;
    impl Drop for Applying {
        fn drop(&mut self) {
            STATE.get_mut().applying = false;
        }
    }
    STATE.get_mut().applying = true;
    Applying
}

/// The apply path starts (`Some`) or ends (`None`) running an entry's script.
pub fn set_running_script(script: Option<Running>) {
    let st = STATE.get_mut();
    match (script, st.running_script) {
        (Some(_), _) => {
            st.started = Instant::now();
            st.run_killed = false;
        }
        // A long run that finished here: a kill of it arriving later means this node kept
        // writes the others skipped (see `kill_applied`).
        (None, Some(run)) if !st.run_killed && st.started.elapsed() >= LONG_SCRIPT => {
            if st.long_runs.len() >= LONG_RUNS_MAX {
                st.long_runs.pop_front();
            }
            st.long_runs.push_back(run.index);
        }
        (None, _) => {}
    }
    st.running_script = script;
}

/// Whether the script the apply path is running (or just ran) was killed on this node.
pub fn run_killed() -> bool {
    STATE.get_mut().run_killed
}

/// A wake-up inside a command: `held` keeps what arrived, in order, for the apply after the
/// command returns; a committed kill of the running script is carried out now.
pub fn defer(ctx: *mut RedisModuleCtx, arrived: VecDeque<ApplyItem>) {
    note_kills(&arrived);
    super::hold(arrived);
    let st = STATE.get_mut();
    st.deferred = true;
    let Some(run) = st.running_script else {
        return;
    };
    if !st.kills.contains(&run.index) {
        return;
    }
    let index = run.index;
    if run.in_transaction {
        // The transaction's commands before the script ran here, and the nodes that had not
        // started it skip all of it (only SHUTDOWN NOSAVE kills a script in a transaction).
        fail_stop(
            ctx,
            &format!("the leader killed raft entry {index}, a transaction whose script was running here; the commands before the script ran here, and the other nodes skip the whole transaction"),
        );
        return;
    }
    let r = call_kill(ctx, &run.kill_argv());
    let ok = is_ok(r);
    let text = reply_text(r);
    api::free_call_reply(r);
    if ok {
        info!("stopped the script of raft entry {index}: the leader killed it");
    } else {
        // Its writes are here and nowhere else once the others skip it: stop rather than
        // serve different data; the restart replays the log without it.
        fail_stop(
            ctx,
            &format!("the leader killed the script of raft entry {index}, but here it cannot be stopped ({text}); it wrote here already"),
        );
    }
}

/// This node's data would differ from the cluster's: it shuts down (SHUTDOWN NOSAVE, from
/// inside the script as Redis allows), and comes back whole from its log when started again.
fn fail_stop(ctx: *mut RedisModuleCtx, why: &str) {
    error!("{why}: this node shuts down so that it does not serve data that differs from the other nodes'; start it again and it replays its log without that script");
    let r = api::call(
        ctx,
        &[b"SHUTDOWN".to_vec(), b"NOSAVE".to_vec(), b"NOW".to_vec()],
        CallOpts::default(),
    );
    // Only on failure does it return.
    error!("could not shut down: {}", reply_text(r));
    api::free_call_reply(r);
}

/// Takes the deferred flag: the caller applies what was held.
pub fn take_deferred() -> bool {
    std::mem::take(&mut STATE.get_mut().deferred)
}

/// Records the kills among `items` (before any of them is applied), so a script entry they
/// name that is applied later is skipped.
pub fn note_kills(items: &VecDeque<ApplyItem>) {
    let st = STATE.get_mut();
    for item in items {
        let ApplyItem::Entries(entries, _) = item else {
            continue;
        };
        for e in entries {
            if let Some(index) = killed_script(&e.data) {
                st.kills.insert(index);
            }
        }
    }
}

/// Whether the entry at `index` was killed by a later committed entry: skip its script.
pub fn killed(index: u64) -> bool {
    STATE.get_mut().kills.contains(&index)
}

/// A `KillScript` entry is applied: the entry it names is behind us. If this node ran that
/// script to its end (the kill reached it too late), its data differs: it stops.
pub fn kill_applied(ctx: *mut RedisModuleCtx, index: u64) {
    let st = STATE.get_mut();
    st.kills.remove(&index);
    if st.long_runs.contains(&index) {
        fail_stop(
            ctx,
            &format!("the leader killed the script of raft entry {index}, but here it had run to its end"),
        );
    }
}

/// Whether SCRIPT KILL / FUNCTION KILL (`name`, `sub`) must go to `RAFT._KILL`: an entry's
/// script is running on the apply path. (`RAFT._KILL` is `deny-script`: a script that calls
/// a kill gets Redis's own refusal.)
pub fn routes_kill(name: &[u8], sub: Option<&[u8]>) -> bool {
    let st = STATE.get_mut();
    st.running_script.is_some()
        && !st.killing
        && (name.eq_ignore_ascii_case(b"script") || name.eq_ignore_ascii_case(b"function"))
        && sub.is_some_and(|s| s.eq_ignore_ascii_case(b"kill"))
}

/// `RAFT._KILL SCRIPT|FUNCTION KILL`, run from inside the busy script (the command allows
/// that): on the leader, Redis's own kill, then a committed `KillScript` for the entry.
pub fn kill(ctx: *mut RedisModuleCtx, m: &Module, argv: &[Vec<u8>]) -> c_int {
    let is_kill = argv.len() == 2
        && (argv[0].eq_ignore_ascii_case(b"script") || argv[0].eq_ignore_ascii_case(b"function"))
        && argv[1].eq_ignore_ascii_case(b"kill");
    if !is_kill {
        return api::reply_error(ctx, "ERR RAFT._KILL takes SCRIPT KILL or FUNCTION KILL");
    }
    let running = STATE.get_mut().running_script;
    let node = m.node();
    let (Some(run), Some(node)) = (running, node) else {
        // Not an entry's script (any more): Redis's own answer.
        return api::reply_with_call(ctx, call_kill(ctx, argv));
    };
    if !node.shared().is_leader() {
        return api::reply_error(ctx, &super::redirect_error(m));
    }
    if run.in_transaction {
        return api::reply_error(
            ctx,
            "UNKILLABLE redis-raft cannot kill a script inside MULTI/EXEC the same way on every node; only SHUTDOWN NOSAVE stops it (see the README)",
        );
    }
    let r = call_kill(ctx, argv);
    if !is_ok(r) {
        // UNKILLABLE (it wrote), or the other kind of script: as Redis says.
        return api::reply_with_call(ctx, r);
    }
    if !commit_kill(m, node, run.index) {
        // Killed here, not on the others: this node's data would differ.
        fail_stop(
            ctx,
            &format!(
                "the kill of raft entry {}'s script could not be logged",
                run.index
            ),
        );
    }
    api::reply_with_call(ctx, r)
}

/// Redis is shutting down (SHUTDOWN NOSAVE, or SIGTERM, while an entry's script runs): on
/// the leader, the kill is committed (and its commit index given time to reach the
/// followers' disks) before Redis exits, so a restart skips the script everywhere.
pub fn before_shutdown(m: &Module) {
    let Some(run) = STATE.get_mut().running_script else {
        return;
    };
    let index = run.index;
    let Some(node) = m.node().filter(|n| n.shared().is_leader()) else {
        return;
    };
    if !commit_kill(m, node, index) {
        return;
    }
    let opts = super::configs::options();
    let deadline = Instant::now() + Duration::from_millis(2 * opts.election_timeout_ms);
    while !STATE.get_mut().kills.contains(&index) && Instant::now() < deadline {
        let arrived = node.shared().take_apply_items();
        note_kills(&arrived);
        super::hold(arrived);
        std::thread::sleep(Duration::from_millis(1));
    }
    if STATE.get_mut().kills.contains(&index) {
        // Followers write the new commit index with their next batch.
        std::thread::sleep(Duration::from_millis(3 * opts.heartbeat_interval_ms));
        warn!("SHUTDOWN NOSAVE during the script of raft entry {index}: its kill is committed; every node skips it when it starts again");
    } else {
        warn!("SHUTDOWN NOSAVE during the script of raft entry {index}: its kill was not committed in time; the nodes may run it again when they restart");
    }
}

/// Proposes the kill of entry `index`'s script; false when it could not be proposed.
fn commit_kill(m: &Module, node: &crate::node::Node, index: u64) -> bool {
    let tag = super::kill_tag(m, node);
    let Some(run) = STATE.get_mut().running_script else {
        return false;
    };
    let data = encode_command(&LogCommand::KillScript {
        index,
        argv: run.kill_argv(),
    });
    match node.propose(vec![(tag, data)]) {
        Ok(()) => {
            info!("killed the script of raft entry {index} here; the kill goes to every node");
            true
        }
        Err((e, _)) => {
            warn!("the kill of raft entry {index}'s script could not be logged: {e}");
            false
        }
    }
}

fn is_ok(r: *mut api::RedisModuleCallReply) -> bool {
    matches!(api::call_reply_value(r), api::Value::Str(ref s) if s == b"OK")
}

/// Redis's own SCRIPT KILL / FUNCTION KILL of the running script.
fn call_kill(ctx: *mut RedisModuleCtx, argv: &[Vec<u8>]) -> *mut api::RedisModuleCallReply {
    STATE.get_mut().killing = true;
    let r = api::call(ctx, argv, CallOpts::default());
    let st = STATE.get_mut();
    st.killing = false;
    st.run_killed |= is_ok(r);
    r
}

fn reply_text(r: *mut api::RedisModuleCallReply) -> String {
    match api::call_reply_value(r) {
        api::Value::Str(s) => String::from_utf8_lossy(&s).into_owned(),
        _ => String::new(),
    }
}
