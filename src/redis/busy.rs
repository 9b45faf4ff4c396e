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

use std::collections::{HashMap, VecDeque};
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

#[derive(Default)]
struct State {
    /// The apply path is inside `apply_committed` (executing an entry).
    applying: bool,
    /// The index of the entry whose script the apply path is running, and whether it is
    /// a function (FCALL) rather than an EVAL.
    running_script: Option<(u64, bool)>,
    /// Committed kills not yet applied: the killed entry's index -> the kill command.
    kills: HashMap<u64, Vec<Vec<u8>>>,
    /// A wake-up arrived while inside a command: apply before Redis next sleeps.
    deferred: bool,
    /// This module is calling Redis's own kill: the filter lets it through.
    killing: bool,
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

/// The apply path starts (`Some((index, is a function))`) or ends (`None`) running an
/// entry's script.
pub fn set_running_script(script: Option<(u64, bool)>) {
    STATE.get_mut().running_script = script;
}

/// A wake-up inside a command: `held` keeps what arrived, in order, for the apply after the
/// command returns; a committed kill of the running script is carried out now.
pub fn defer(ctx: *mut RedisModuleCtx, arrived: VecDeque<ApplyItem>) {
    note_kills(&arrived);
    super::hold(arrived);
    let st = STATE.get_mut();
    st.deferred = true;
    let Some((index, _)) = st.running_script else {
        return;
    };
    let Some(argv) = st.kills.get(&index).cloned() else {
        return;
    };
    let r = call_kill(ctx, &argv);
    let ok = is_ok(r);
    let text = reply_text(r);
    api::free_call_reply(r);
    if ok {
        info!("stopped the script of raft entry {index}: the leader killed it");
    } else {
        error!(
            "the leader killed the script of raft entry {index}, but here it cannot be stopped ({text}): it wrote before the kill reached this node, so this node's data may now differ from the leader's. Stop this node with SHUTDOWN NOSAVE and start it again: it replays its log without that script"
        );
    }
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
        let ApplyItem::Entries(entries) = item else {
            continue;
        };
        for e in entries {
            if let Some(index) = killed_script(&e.data) {
                if let Ok(LogCommand::KillScript { argv, .. }) =
                    crate::codec::decode_command(&e.data)
                {
                    st.kills.insert(index, argv);
                }
            }
        }
    }
}

/// Whether the entry at `index` was killed by a later committed entry: skip its script.
pub fn killed(index: u64) -> bool {
    STATE.get_mut().kills.contains_key(&index)
}

/// A `KillScript` entry is applied: the entry it names is behind us.
pub fn kill_applied(index: u64) {
    STATE.get_mut().kills.remove(&index);
}

/// Whether SCRIPT KILL / FUNCTION KILL (`name`, `sub`) must go to `RAFT._KILL`: an entry's
/// script is running on the apply path.
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
    let index = STATE.get_mut().running_script.map(|(i, _)| i);
    let node = m.node();
    let (Some(index), Some(node)) = (index, node) else {
        // Not an entry's script (any more): Redis's own answer.
        return api::call_and_reply(ctx, argv);
    };
    if !node.shared().is_leader() {
        return api::reply_error(ctx, &super::redirect_error(m));
    }
    let r = call_kill(ctx, argv);
    if !is_ok(r) {
        // NOTBUSY, UNKILLABLE (it wrote), or the other kind of script: as Redis says.
        return reply_and_free(ctx, r);
    }
    commit_kill(m, node, index, argv.to_vec());
    reply_and_free(ctx, r)
}

/// SHUTDOWN NOSAVE while an entry's script runs: on the leader, the kill is committed (and
/// its commit index given time to reach the followers' disks) before Redis exits, so a
/// restart skips the script everywhere.
pub fn before_shutdown(m: &Module) {
    let Some((index, function)) = STATE.get_mut().running_script else {
        return;
    };
    let Some(node) = m.node().filter(|n| n.shared().is_leader()) else {
        return;
    };
    let kill = if function { "FUNCTION" } else { "SCRIPT" };
    let argv = vec![kill.as_bytes().to_vec(), b"KILL".to_vec()];
    if !commit_kill(m, node, index, argv) {
        return;
    }
    let opts = super::configs::options();
    let deadline = Instant::now() + Duration::from_millis(2 * opts.election_timeout_ms);
    while !STATE.get_mut().kills.contains_key(&index) && Instant::now() < deadline {
        let arrived = node.shared().take_apply_items();
        note_kills(&arrived);
        super::hold(arrived);
        std::thread::sleep(Duration::from_millis(1));
    }
    if STATE.get_mut().kills.contains_key(&index) {
        // Followers write the new commit index with their next batch.
        std::thread::sleep(Duration::from_millis(3 * opts.heartbeat_interval_ms));
        warn!("SHUTDOWN NOSAVE during the script of raft entry {index}: its kill is committed; every node skips it when it starts again");
    } else {
        warn!("SHUTDOWN NOSAVE during the script of raft entry {index}: its kill was not committed in time; the nodes may run it again when they restart");
    }
}

/// Proposes the kill of entry `index`'s script; false when it could not be proposed.
fn commit_kill(m: &Module, node: &crate::node::Node, index: u64, argv: Vec<Vec<u8>>) -> bool {
    let tag = super::kill_tag(m, node);
    let data = encode_command(&LogCommand::KillScript { index, argv });
    match node.propose(vec![(tag, data)]) {
        Ok(()) => {
            info!("killed the script of raft entry {index} here; the kill goes to every node");
            true
        }
        Err((e, _)) => {
            warn!("killed the script of raft entry {index} here, but the kill could not be logged ({e}); the other nodes keep running it");
            false
        }
    }
}

fn is_ok(r: *mut api::RedisModuleCallReply) -> bool {
    matches!(api::call_reply_value(r), api::Value::Str(ref s) if s == b"OK")
}

/// Redis's own SCRIPT KILL / FUNCTION KILL.
fn call_kill(ctx: *mut RedisModuleCtx, argv: &[Vec<u8>]) -> *mut api::RedisModuleCallReply {
    STATE.get_mut().killing = true;
    let r = api::call(ctx, argv, CallOpts::default());
    STATE.get_mut().killing = false;
    r
}

fn reply_and_free(ctx: *mut RedisModuleCtx, r: *mut api::RedisModuleCallReply) -> c_int {
    if r.is_null() {
        return api::reply_error(ctx, "ERR the command could not be executed");
    }
    let rc = unsafe { rm!(RedisModule_ReplyWithCallReply)(ctx, r) };
    api::free_call_reply(r);
    rc
}

fn reply_text(r: *mut api::RedisModuleCallReply) -> String {
    if r.is_null() {
        return String::new();
    }
    let mut len = 0usize;
    let p = unsafe { rm!(RedisModule_CallReplyStringPtr)(r, &mut len) };
    if p.is_null() {
        return String::new();
    }
    String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(p as *const u8, len) }).into_owned()
}
