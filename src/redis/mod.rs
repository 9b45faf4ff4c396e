//! The Redis main thread's side: start-up (startup.rs), the command filter, blocking clients
//! on their writes, and executing committed entries in log order (apply.rs).
//!
//! Invariant: only code under `src/redis/`, `src/commands/` and `src/snapshot/` calls the
//! Redis module API, and (but for `RedisModule_EventLoopAddOneShot` in the waker, and
//! logging) only on the main thread (or in a snapshot's forked child).

// Contexts and strings here come from Redis and are valid for the callback's duration;
// marking every wrapper `unsafe` would only move the same promise to each caller.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

pub mod api;
mod apply;
pub mod blocking;
mod bus;
pub mod busy;
pub mod classify;
pub mod configs;
pub mod conn;
pub mod filter;
pub mod logging;
pub mod multi;
pub mod replicas;
pub mod rewrite;
pub mod scripts;
pub mod snapshots;
mod startup;
pub mod streams;
pub mod tls;
pub mod watch;

use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

pub use self::api::MainThread;
use self::api::{
    guard, rm, CallOpts, RedisModuleBlockedClient, RedisModuleCallReply, RedisModuleCtx,
};
use self::apply::apply_committed;
pub use self::apply::{apply_errors, is_script};
use self::classify::CommandTable;
pub use self::startup::{bus_listen_addr, set_node, snapshot_path, start, start_node, StartSpec};
use crate::codec::{encode_command, LogCommand, ProposalTag, ENTRY_BYTES_MAX};
use crate::config::ReadMode;
use crate::node::{ApplyItem, Node, Proposal, ProposeError};

/// A client blocked on its write, waiting for the entry to be applied.
struct Pending {
    bc: *mut RedisModuleBlockedClient,
    resp3: bool,
    /// Select this database for the client after its reply (SELECT inside MULTI).
    select_after: Option<i32>,
    /// A blocking command's attempt: its waiter (redis/blocking.rs).
    waiter: Option<u64>,
    /// When the RAFT command arrived (crate::latency).
    queued_at: Instant,
}

/// What a blocked client is finally told.
enum Reply {
    Call(*mut RedisModuleCallReply),
    /// A write's own reply, with the times that give its `replied` and `total` latencies.
    Applied {
        call: *mut RedisModuleCallReply,
        queued_at: Instant,
        applied_at: Instant,
    },
    /// EXEC's array: one reply per queued command; then select this database (SELECT was
    /// queued in the transaction).
    Multi(Vec<Part>, Option<i32>),
    /// EXEC of a transaction whose watched keys changed; a blocking command that timed out.
    NullArray,
    /// A blocking command that timed out (BLMOVE, BRPOPLPUSH, BLMPOP, BZMPOP).
    NullBulk,
    /// A status reply such as OK.
    Status(&'static str),
    /// RAFT.NODE ADD's reply: the node id and the cluster id.
    NodeAdded(u64, String),
    /// A status reply built at run time (RAFT.CLUSTER INIT's `OK <cluster id>`).
    Text(String),
    Error(String),
}

/// One element of EXEC's reply.
enum Part {
    Call(*mut RedisModuleCallReply),
    /// CLIENT ID / GETNAME / SETNAME: run on the client when EXEC's reply is sent.
    Client(Vec<Vec<u8>>),
    Status(&'static str),
    Error(String),
}

impl Part {
    fn free(self) {
        if let Part::Call(r) = self {
            api::free_call_reply(r);
        }
    }
}

/// A JOIN is running (on its own thread): no INIT or second JOIN meanwhile.
pub static JOINING: AtomicBool = AtomicBool::new(false);

/// True while RAFT.CLUSTER JOIN is under way (INFO raft says `joining`; its address and log
/// file are fixed already).
pub fn is_joining() -> bool {
    JOINING.load(Ordering::Acquire)
}

/// The module's process-wide state, set once at load.
pub struct Module {
    /// Set at load when the node belongs to a cluster, or later by RAFT.CLUSTER INIT/JOIN.
    node: OnceLock<Node>,
    /// This node's log says it was removed from its cluster: it serves no cluster commands.
    removed_at_start: bool,
    /// `raft.read-mode`, fixed at start.
    pub read_mode: ReadMode,
    table: MainThread<CommandTable>,
    /// Context the apply path executes commands on (a detached thread-safe context, used
    /// only on the main thread).
    apply_ctx: usize,
    incarnation: u64,
}

// SAFETY: `apply_ctx` is only dereferenced on the main thread.
unsafe impl Sync for Module {}
unsafe impl Send for Module {}

static MODULE: OnceLock<Module> = OnceLock::new();

/// A client blocked on a read until the node has applied up to the read's confirmed index.
struct ReadWaiter {
    bc: *mut RedisModuleBlockedClient,
    argv: Vec<Vec<u8>>,
    db: i32,
    resp3: bool,
    /// XREAD ... BLOCK: its waiter in redis/blocking.rs.
    blocking: Option<u64>,
    /// When the read arrived (crate::latency's `read`); None for a blocked XREAD's retry.
    arrived: Option<Instant>,
}

#[derive(Default)]
struct MainState {
    /// Reads received this event-loop turn: they share one ReadIndex round.
    read_batch: Vec<ReadWaiter>,
    /// Rounds sent to the raft thread (when), waiting for their read index.
    read_rounds: HashMap<u64, (Instant, Vec<ReadWaiter>)>,
    next_round: u64,
    /// Confirmed reads waiting for the apply index to reach theirs.
    reads_ready: BTreeMap<u64, Vec<ReadWaiter>>,
    /// The client waiting on RAFT.TRANSFER_LEADER.
    transfer: Option<usize>,
    pending: rustc_hash::FxHashMap<u64, Pending>,
    /// Proposals made during this event-loop turn, handed to the raft thread in one batch
    /// before Redis sleeps (fewer wake-ups, bigger log appends).
    batch: Vec<Proposal>,
    next_request: u64,
    started_applying: bool,
    /// Replies of applied writes that woke blocked clients: sent once those are served
    /// (`blocking::cascade_idle`), or after `PARKED_MAX_MS`; with when the first was parked.
    parked: Vec<(*mut RedisModuleBlockedClient, Reply)>,
    parked_since: Option<std::time::Instant>,
    /// Apply items that arrived while a snapshot was loading, in order.
    held: std::collections::VecDeque<ApplyItem>,
    /// This turn's batches were handed over (`flush_proposals`): what Redis runs after that
    /// in the same turn (the next commands of clients it just unblocked) needs another turn.
    flushed: bool,
    /// Another turn was asked for since `flushed` was set.
    turn_asked: bool,
    /// A timer is due to end the sleep after a script (`wake_now`).
    timer_asked: bool,
}

static MAIN: MainThread<MainState> = MainThread::new_lazy();

pub fn module() -> Option<&'static Module> {
    MODULE.get()
}

/// Set by the waker, cleared by the callback: at most one callback queued at a time.
static WAKE_QUEUED: AtomicBool = AtomicBool::new(false);

fn waker() -> Arc<dyn Fn() + Send + Sync> {
    Arc::new(request_turn)
}

/// Wakes Redis's event loop (from any thread) for a turn that applies what is queued.
fn request_turn() {
    if !WAKE_QUEUED.swap(true, Ordering::AcqRel) {
        // Thread-safe by Redis's contract: queued under a mutex, wakes the event loop.
        unsafe { rm!(RedisModule_EventLoopAddOneShot)(Some(on_wake), std::ptr::null_mut()) };
    }
}

extern "C" fn on_wake(_data: *mut c_void) {
    guard("apply", || (), wake_now);
}

/// Nothing to do: being due, it kept Redis from sleeping (`wake_now`).
extern "C" fn on_turn_timer(_ctx: *mut RedisModuleCtx, _data: *mut c_void) {
    MAIN.get_mut().timer_asked = false;
}

/// Applies what the raft thread queued (or, inside a command, leaves it for later).
fn wake_now() {
    WAKE_QUEUED.store(false, Ordering::Release);
    let Some(m) = module() else { return };
    let ctx = m.apply_ctx as *mut RedisModuleCtx;
    if busy::inside_command(ctx) {
        // From inside a script or a load (processEventsWhileBlocked): see busy.rs.
        let arrived = m
            .node()
            .map(|n| n.shared().take_apply_items())
            .unwrap_or_default();
        busy::defer(ctx, arrived);
        let st = MAIN.get_mut();
        if st.flushed {
            // Inside a script Redis runs after this turn's flush (the pipelined command of a
            // client it just unblocked), this wake-up may have been the turn that flush
            // asked for, and Redis sleeps once the script returns. A timer due at once
            // keeps it from sleeping: the next turn hands over what is queued and applies
            // what was deferred. (Timers do not run inside the script.)
            if !st.timer_asked {
                st.timer_asked = true;
                unsafe {
                    rm!(RedisModule_CreateTimer)(ctx, 0, Some(on_turn_timer), std::ptr::null_mut())
                };
            }
            st.turn_asked = false;
        }
    } else {
        apply_committed();
    }
}

impl Module {
    /// The raft node, once this node belongs to a cluster.
    pub fn node(&self) -> Option<&Node> {
        self.node.get()
    }

    /// True when this node was removed from its cluster (at start or since).
    pub fn is_removed(&self) -> bool {
        self.removed_at_start || self.node().is_some_and(|n| n.shared().is_removed())
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Redis's command table as classified at load (main thread only).
    pub fn table(&self) -> &CommandTable {
        self.table.get_mut()
    }

    /// Whether this node may run a read on its local data right away (no round): stale mode
    /// on a leader whose data is current, or on any node with follower reads; lease mode on
    /// a leader whose lease holds (node/lease.rs).
    pub fn serves_reads_locally(&self, node: &Node) -> bool {
        if snapshots::loading() {
            return false;
        }
        match self.read_mode {
            ReadMode::Stale => {
                node.shared().is_ready_leader() || configs::FOLLOWER_READS.load(Ordering::Relaxed)
            }
            // A leader whose log is full may not have applied what the others committed.
            ReadMode::Lease => node.shared().holds_read_lease() && !node.shared().is_log_full(),
            ReadMode::Linearizable => false,
        }
    }

    /// Whether this node may start a ReadIndex round for a read: a leader whose data is
    /// current, or a follower with follower reads that knows a leader.
    /// Not while its log is full: it could not apply as far as a round needs (the read goes
    /// to the leader, or gets the log's error on a leader about to hand over).
    pub fn serves_reads_by_index(&self, node: &Node) -> bool {
        if node.shared().is_log_full() {
            return false;
        }
        node.shared().is_ready_leader()
            || (!node.shared().is_leader()
                && configs::FOLLOWER_READS.load(Ordering::Relaxed)
                && node.shared().leader_id() != 0)
    }
}

/// Classifies Redis's command table as it is now (COMMAND).
fn read_command_table(ctx: *mut RedisModuleCtx, ignored: &[String]) -> CommandTable {
    let r = api::call(ctx, &[b"COMMAND".to_vec()], CallOpts::default());
    let v = api::call_reply_value(r);
    api::free_call_reply(r);
    CommandTable::build(&v, ignored)
}

/// A module was loaded or unloaded, or `raft.ignored-commands` changed: classify again.
pub fn on_command_table_changed() {
    let Some(m) = module() else { return };
    let ctx = m.apply_ctx as *mut RedisModuleCtx;
    let table = read_command_table(ctx, &configs::options().ignored());
    if table.is_empty() {
        warn!("could not re-read Redis's command table; keeping the previous classification");
        return;
    }
    info!("command table classified again ({} commands)", table.len());
    *m.table.get_mut() = table;
}

extern "C" fn module_change(
    _ctx: *mut RedisModuleCtx,
    _eid: api::raw::RedisModuleEvent,
    _subevent: u64,
    _data: *mut c_void,
) {
    guard("module change", || (), on_command_table_changed);
}

pub fn on_fsync_changed(on: bool) {
    if let Some(n) = module().and_then(|m| m.node()) {
        n.set_fsync(on);
    }
}

/// `raft.log-max-file-size` changed: the log preallocates no further than the compaction
/// trigger before any save was timed, until the next applied entries recompute it.
pub fn on_log_max_file_changed(bytes: u64) {
    if let Some(n) = module().and_then(|m| m.node()) {
        n.set_log_size_cap(snapshots::compaction_trigger(bytes, 0, None).0);
    }
    snapshots::forget_size_cap();
}

/// `raft.log-max-cache-size` changed: the log evicts down to the new bound now.
pub fn on_log_cache_changed(bytes: u64) {
    if let Some(n) = module().and_then(|m| m.node()) {
        n.set_log_cache_max_bytes(bytes);
    }
}

/// The error a client gets when this node cannot serve it: the leader's address, or no leader.
pub fn redirect_error(m: &Module) -> String {
    if m.is_removed() {
        return REMOVED_ERROR.into();
    }
    let Some(node) = m.node() else {
        return "NOCLUSTER No Raft Cluster".into();
    };
    let leader = node.shared().leader_id();
    if leader != 0 && leader != node.shared().node_id {
        if let Some(l) = node.shared().member(leader) {
            return format!("MOVED 0 {}", l.redis_addr);
        }
    }
    if leader == node.shared().node_id {
        // The leader refuses what it cannot log while its disk is full (and hands over).
        if let Some(e) = node.shared().log_full() {
            return e;
        }
    }
    "CLUSTERDOWN No raft leader".into()
}

/// What a removed node answers to cluster commands.
pub const REMOVED_ERROR: &str = "NOCLUSTER this node was removed from the raft cluster; to use it again, move its raft log aside and RAFT.CLUSTER JOIN with a new raft.node-id";

/// The checks Redis would make before running `argv` itself, which it cannot make for
/// commands routed to RAFT: the client's ACL permissions (command, keys, channels), and
/// maxmemory for commands flagged `denyoom`. `Err` is the error to reply; nothing is logged.
pub fn admit(ctx: *mut RedisModuleCtx, m: &Module, argv: &[Vec<u8>]) -> Result<(), String> {
    admit_with(ctx, m, argv, None)
}

/// `admit`, given the command's strings as Redis passed them (`raw`, the same `argv`), so
/// the ACL check need not make copies.
pub fn admit_with(
    ctx: *mut RedisModuleCtx,
    m: &Module,
    argv: &[Vec<u8>],
    raw: Option<&[*mut api::RedisModuleString]>,
) -> Result<(), String> {
    let name = unsafe { rm!(RedisModule_GetCurrentUserName)(ctx) };
    if !name.is_null() {
        let user = unsafe { rm!(RedisModule_GetModuleUserFromUserName)(name) };
        unsafe { rm!(RedisModule_FreeString)(ctx, name) };
        if !user.is_null() {
            let made: Vec<*mut api::RedisModuleString> = match raw {
                Some(_) => Vec::new(),
                None => argv.iter().map(|a| api::create_string(ctx, a)).collect(),
            };
            let strs = raw.unwrap_or(&made);
            let r = unsafe {
                rm!(RedisModule_ACLCheckCommandPermissions)(
                    user,
                    strs.as_ptr() as *mut *mut api::RedisModuleString,
                    strs.len() as c_int,
                )
            };
            for s in made {
                unsafe { rm!(RedisModule_FreeString)(ctx, s) };
            }
            unsafe { rm!(RedisModule_FreeModuleUser)(user) };
            if r != api::OK {
                let cmd = String::from_utf8_lossy(&argv[0]).to_lowercase();
                return Err(format!(
                    "NOPERM this user has no permissions to run the '{cmd}' command or to access one of its keys or channels"
                ));
            }
        }
    }
    if m.table().denies_oom(argv) && unsafe { rm!(RedisModule_GetUsedMemoryRatio)() } > 1.0 {
        return Err("OOM command not allowed when used memory > 'maxmemory'.".into());
    }
    // Scripts: Redis decides what they may do when they run (RAFT runs them as reads).
    let sub = argv.get(1).map(|s| s.as_slice());
    if replicas::writes_refused(ctx)
        && !is_script(argv)
        && m.table().classify(&argv[0], sub) == classify::Class::Write
    {
        return Err(replicas::NOREPLICAS.into());
    }
    Ok(())
}

/// RAFT.TRANSFER_LEADER: blocks the client until the transfer ends.
pub fn transfer_leader(ctx: *mut RedisModuleCtx, node: &Node, target: u64) -> c_int {
    if !node.shared().is_leader() {
        return api::reply_error(ctx, "ERR not leader");
    }
    let st = MAIN.get_mut();
    if st.transfer.is_some() {
        return api::reply_error(ctx, "ERR leader transfer is in progress");
    }
    let bc = block(ctx);
    if bc.is_null() {
        return api::reply_error(ctx, "ERR could not block the client");
    }
    match node.transfer_leader(target) {
        Ok(()) => st.transfer = Some(bc as usize),
        Err(e) => unblock(bc, Reply::Error(e.to_string())),
    }
    api::OK
}

/// Replicates a write: blocks the client until its entry is applied here.
pub fn propose_write(
    ctx: *mut RedisModuleCtx,
    m: &Module,
    node: &Node,
    argv: Vec<Vec<u8>>,
) -> c_int {
    let db = unsafe { rm!(RedisModule_GetSelectedDb)(ctx) };
    let argv = leader_rewrite(argv);
    propose(ctx, m, node, LogCommand::Redis { db, argv })
}

/// What the leader changes in a command before logging it (see rewrite.rs).
pub fn leader_rewrite(argv: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let st = MAIN.get_mut();
    // A fresh seed per command (xorshift over the request counter and the clock).
    let mut x = (now as u64) ^ st.next_request.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    rewrite::rewrite(&argv, now, (x >> 33) as u32).unwrap_or(argv)
}

/// Replicates `cmd`: blocks the client until its entry is applied here, then replies with
/// what applying it returned.
pub fn propose(ctx: *mut RedisModuleCtx, m: &Module, node: &Node, cmd: LogCommand) -> c_int {
    propose_then_select(ctx, m, node, cmd, None)
}

/// `propose`, and once the client got its reply, select database `select_after` for it
/// (a transaction that queued SELECT).
pub fn propose_then_select(
    ctx: *mut RedisModuleCtx,
    m: &Module,
    node: &Node,
    cmd: LogCommand,
    select_after: Option<i32>,
) -> c_int {
    let resp3 = api::client_opts(ctx).resp3;
    let data = encode_command(&cmd);
    if data.len() > ENTRY_BYTES_MAX {
        return api::reply_error(
            ctx,
            &format!(
                "ERR command too large for the raft log ({} bytes; the limit is {} bytes)",
                data.len(),
                ENTRY_BYTES_MAX
            ),
        );
    }
    let st = MAIN.get_mut();
    let tag = next_tag(st, m, node);
    let bc = block(ctx);
    if bc.is_null() {
        return api::reply_error(ctx, "ERR could not block the client for a replicated write");
    }
    if st.pending.len() >= PENDING_MAX {
        unblock(bc, Reply::Error(ProposeError::Full.to_string()));
        return api::OK;
    }
    st.pending.insert(
        tag.request,
        Pending {
            bc,
            resp3,
            waiter: None,
            select_after,
            queued_at: Instant::now(),
        },
    );
    st.batch.push((tag, data));
    ask_turn_if_flushed(st);
    api::OK
}

/// A proposal or read queued after this turn's `flush_proposals` (Redis 7.0 runs the
/// pipelined commands of the clients it just unblocked after module events, in the same
/// turn): wake the event loop so the next turn hands it over, instead of waiting for
/// whatever event comes next (7.0.15, one client pipelining 16 SETs with fsync: 1.5k -> 2.3k
/// writes/s, as on 7.2, which needs no extra turn).
fn ask_turn_if_flushed(st: &mut MainState) {
    if st.flushed && !st.turn_asked {
        st.turn_asked = true;
        request_turn();
    }
}

/// Queues what the blocking-command machinery asks for: an attempt for a waiter (answered
/// through the pending map like any write), or a command undoing a pop nobody received.
fn enqueue_blocking(m: &Module, node: &Node, p: blocking::Proposal) {
    // Each attempt is a new command: XREADGROUP's delivery time is this attempt's clock.
    let p = match p {
        blocking::Proposal::Attempt {
            waiter,
            bc,
            db,
            argv,
            resp3,
        } => blocking::Proposal::Attempt {
            waiter,
            bc,
            db,
            argv: leader_rewrite(argv),
            resp3,
        },
        other => other,
    };
    let st = MAIN.get_mut();
    match p {
        blocking::Proposal::Attempt {
            waiter,
            bc,
            db,
            argv,
            resp3,
        } => {
            let tag = next_tag(st, m, node);
            st.pending.insert(
                tag.request,
                Pending {
                    bc,
                    resp3,
                    select_after: None,
                    waiter: Some(waiter),
                    queued_at: Instant::now(),
                },
            );
            st.batch
                .push((tag, encode_command(&LogCommand::Redis { db, argv })));
        }
        blocking::Proposal::Reread { .. } => {
            // Run by the apply path itself (apply_committed), never proposed.
        }
        blocking::Proposal::Undo { db, argv } => {
            // Nobody waits for this entry: a tag no pending request carries.
            let tag = ProposalTag {
                node_id: node.shared().node_id,
                incarnation: 0,
                request: 0,
            };
            st.batch
                .push((tag, encode_command(&LogCommand::Redis { db, argv })));
        }
    }
    ask_turn_if_flushed(st);
}

/// A blocking command on the leader: block the client and propose its first attempt.
pub fn start_blocking(
    ctx: *mut RedisModuleCtx,
    m: &Module,
    node: &Node,
    argv: Vec<Vec<u8>>,
    spec: blocking::Spec,
) -> c_int {
    let db = unsafe { rm!(RedisModule_GetSelectedDb)(ctx) };
    let resp3 = api::client_opts(ctx).resp3;
    match blocking::start(ctx, db, argv, spec, resp3) {
        Some(p) => {
            enqueue_blocking(m, node, p);
            api::OK
        }
        None => api::reply_error(ctx, "ERR could not block the client"),
    }
}

/// Writes waiting for their entry to be applied here; past that new writes get -TRYAGAIN.
const PENDING_MAX: usize = 100_000;

/// Blocks a read until this node has applied up to an index the leader confirmed with a
/// quorum after the read arrived (ReadIndex); reads of one event-loop turn share a round.
pub fn queue_read(ctx: *mut RedisModuleCtx, argv: Vec<Vec<u8>>) -> c_int {
    let db = unsafe { rm!(RedisModule_GetSelectedDb)(ctx) };
    let resp3 = api::client_opts(ctx).resp3;
    let spec = argv[0]
        .eq_ignore_ascii_case(b"xread")
        .then(|| blocking::parse(&argv))
        .flatten();
    let (bc, blocking) = match spec {
        Some(spec) => match blocking::start_read(ctx, db, &argv, spec, resp3) {
            Some((bc, id)) => (bc, Some(id)),
            None => (std::ptr::null_mut(), None),
        },
        None => (
            unsafe {
                rm!(RedisModule_BlockClient)(ctx, Some(reply_blocked), None, Some(free_reply), 0)
            },
            None,
        ),
    };
    if bc.is_null() {
        return api::reply_error(ctx, "ERR could not block the client for a read");
    }
    MAIN.get_mut().read_batch.push(ReadWaiter {
        bc,
        argv,
        db,
        resp3,
        blocking,
        arrived: Some(Instant::now()),
    });
    ask_turn_if_flushed(MAIN.get_mut());
    api::OK
}

/// Runs a confirmed read on the apply context and answers its client.
fn serve_read(ctx: *mut RedisModuleCtx, w: ReadWaiter) {
    if let Some(t) = w.arrived {
        crate::latency::READ.record(t.elapsed());
    }
    if unsafe { rm!(RedisModule_SelectDb)(ctx, w.db) } != api::OK {
        unblock(
            w.bc,
            Reply::Error(format!("ERR DB index {} is out of range", w.db)),
        );
        return;
    }
    let Some(id) = w.blocking else {
        let opts = CallOpts { resp3: w.resp3 };
        let r = scripts::run_read(ctx, &w.argv, |a| api::call(ctx, a, opts));
        unblock(w.bc, Reply::Call(r));
        return;
    };
    // XREAD ... BLOCK: answer if it found entries, else wait for its streams to change.
    let argv = blocking::read_argv(id, ctx).unwrap_or(w.argv);
    let r = api::call(ctx, &argv, CallOpts { resp3: w.resp3 });
    let found = !r.is_null()
        && unsafe { rm!(RedisModule_CallReplyType)(r) } as isize
            != api::raw::REDISMODULE_REPLY_NULL;
    match blocking::read_done(id, found) {
        blocking::ReadOutcome::Reply(bc) => unblock(bc, Reply::Call(r)),
        blocking::ReadOutcome::Unknown => unblock(w.bc, Reply::Call(r)),
        blocking::ReadOutcome::Wait => api::free_call_reply(r),
        blocking::ReadOutcome::Release(bc) => {
            api::free_call_reply(r);
            unsafe { rm!(RedisModule_UnblockClient)(bc, std::ptr::null_mut()) };
        }
    }
}

/// Serves every confirmed read whose index this node has now applied.
fn serve_ready_reads(ctx: *mut RedisModuleCtx, applied: u64) {
    loop {
        let st = MAIN.get_mut();
        let Some(entry) = st.reads_ready.first_entry() else {
            return;
        };
        if *entry.key() > applied {
            return;
        }
        let index = *entry.key();
        let waiters = entry.remove();
        tracing::debug!(
            "serving {} read(s) confirmed at index {index} (applied {applied})",
            waiters.len()
        );
        for w in waiters {
            serve_read(ctx, w);
        }
    }
}

/// Redis is about to sleep: hand this turn's proposals to the raft thread. Redis has just
/// woken (after-sleep): a new turn, whose own flush is still to come.
extern "C" fn before_sleep(
    _ctx: *mut RedisModuleCtx,
    _eid: api::raw::RedisModuleEvent,
    subevent: u64,
    _data: *mut c_void,
) {
    if subevent != api::raw::REDISMODULE_SUBEVENT_EVENTLOOP_BEFORE_SLEEP {
        let st = MAIN.get_mut();
        st.flushed = false;
        st.turn_asked = false;
        return;
    }
    guard("before sleep", || (), flush_proposals);
    MAIN.get_mut().flushed = true;
}

fn flush_proposals() {
    if let Some(node) = module().and_then(|m| m.node()) {
        // Answers from followers that came during this turn: what they commit is applied
        // now, and the replies leave before Redis sleeps.
        bus::before_sleep(node);
    }
    while busy::take_deferred() {
        // Wake-ups that came while a command ran (busy.rs): apply now, outside it (again
        // if more came while a script of this apply ran).
        apply_committed();
    }
    release_parked(false);
    if let Some(m) = module() {
        multi::check_connection_commands(m.apply_ctx as *mut RedisModuleCtx);
    }
    conn::release_waits();
    let Some(node) = module().and_then(|m| m.node()) else {
        return;
    };
    blocking::release_gone();
    if let Some(m) = module() {
        snapshots::maybe_snapshot(m.apply_ctx as *mut RedisModuleCtx, node, false);
    }
    let st = MAIN.get_mut();
    if !st.read_batch.is_empty() {
        st.next_round += 1;
        let round = st.next_round;
        let waiters = std::mem::take(&mut st.read_batch);
        match node.read_index(round) {
            Ok(()) => {
                st.read_rounds.insert(round, (Instant::now(), waiters));
            }
            Err(e) => {
                for w in waiters {
                    unblock(w.bc, Reply::Error(e.to_string()));
                }
            }
        }
    }
    if st.batch.is_empty() {
        return;
    }
    let batch = std::mem::take(&mut st.batch);
    let now = Instant::now();
    for (tag, _) in &batch {
        if let Some(p) = st.pending.get(&tag.request) {
            crate::latency::QUEUED.record(now.saturating_duration_since(p.queued_at));
        }
    }
    if let Err((e, batch)) = node.propose(batch) {
        for (tag, _) in batch {
            if let Some(p) = st.pending.remove(&tag.request) {
                never_logged(p, &e.to_string());
            }
        }
    }
}

/// Answers a write that never reached the log with `msg`.
fn never_logged(p: Pending, msg: &str) {
    if let Some(w) = p.waiter {
        blocking::forget(w);
    }
    unblock(p.bc, Reply::Error(msg.to_string()));
}

/// Subscribes to Redis's event loop so proposals are flushed once per turn.
pub fn subscribe_events(ctx: *mut RedisModuleCtx) -> Result<(), String> {
    let ev = api::raw::RedisModuleEvent {
        id: api::raw::REDISMODULE_EVENT_EVENTLOOP,
        dataver: 1,
    };
    if unsafe { rm!(RedisModule_SubscribeToServerEvent)(ctx, ev, Some(before_sleep)) } != api::OK {
        return Err("could not subscribe to the event loop (Redis 7.0 or newer is needed)".into());
    }
    let ev = api::raw::RedisModuleEvent {
        id: api::raw::REDISMODULE_EVENT_CLIENT_CHANGE,
        dataver: 1,
    };
    if unsafe { rm!(RedisModule_SubscribeToServerEvent)(ctx, ev, Some(client_change)) } != api::OK {
        return Err("could not subscribe to client events".into());
    }
    let ev = api::raw::RedisModuleEvent {
        id: api::raw::REDISMODULE_EVENT_CONFIG,
        dataver: 1,
    };
    let changed = Some(replicas::config_changed as _);
    if unsafe { rm!(RedisModule_SubscribeToServerEvent)(ctx, ev, changed) } != api::OK {
        return Err("could not subscribe to config events".into());
    }
    replicas::refresh(ctx);
    let ev = api::raw::RedisModuleEvent {
        id: api::raw::REDISMODULE_EVENT_SHUTDOWN,
        dataver: 1,
    };
    let shutdown = Some(on_shutdown as _);
    if unsafe { rm!(RedisModule_SubscribeToServerEvent)(ctx, ev, shutdown) } != api::OK {
        return Err("could not subscribe to the shutdown event".into());
    }
    let ev = api::raw::RedisModuleEvent {
        id: api::raw::REDISMODULE_EVENT_MODULE_CHANGE,
        dataver: 1,
    };
    if unsafe { rm!(RedisModule_SubscribeToServerEvent)(ctx, ev, Some(module_change)) } != api::OK {
        return Err("could not subscribe to module events".into());
    }
    Ok(())
}

/// Redis is shutting down (SHUTDOWN, SIGTERM, or a node stopping itself): a script entry
/// running now is dealt with first (`busy::before_shutdown`), then the log's buffered
/// commit indexes are written (`Node::write_log`), so a restart applies everything this
/// node knew committed before it hears from a leader (and skips a killed script).
extern "C" fn on_shutdown(
    _ctx: *mut RedisModuleCtx,
    _eid: api::raw::RedisModuleEvent,
    _subevent: u64,
    _data: *mut c_void,
) {
    guard(
        "shutdown",
        || (),
        || {
            let Some(m) = module() else { return };
            busy::before_shutdown(m);
            if let Some(node) = m.node() {
                node.write_log();
            }
        },
    );
}

/// A client disconnected: drop what redis-raft kept for it.
extern "C" fn client_change(
    _ctx: *mut RedisModuleCtx,
    _eid: api::raw::RedisModuleEvent,
    subevent: u64,
    data: *mut c_void,
) {
    if subevent != api::raw::REDISMODULE_SUBEVENT_CLIENT_CHANGE_DISCONNECTED || data.is_null() {
        return;
    }
    guard(
        "client change",
        || (),
        || {
            // RedisModuleClientInfo starts with version, flags, id (all u64).
            let id = unsafe { *(data as *const u64).add(2) };
            multi::forget(id);
            watch::unwatch(id);
        },
    );
}

fn unblock(bc: *mut RedisModuleBlockedClient, reply: Reply) {
    let p = Box::into_raw(Box::new(reply));
    if let Some(client) = blocking::take_client(bc) {
        ANSWERING.get_mut().insert(p as usize, client);
    }
    unsafe { rm!(RedisModule_UnblockClient)(bc, p as *mut c_void) };
}

/// Waiters (blocking commands) answered with RM_UnblockClient whose reply Redis has not sent
/// yet: reply → client id. Redis sends it before it sleeps; until then the client still
/// counts as blocked, and a CLIENT UNBLOCK for it would make Redis answer it itself and drop
/// ours (what it popped would be lost). The filter turns such a CLIENT UNBLOCK into one for
/// no client (`:0`, as Redis answers for a client that is not blocked).
static ANSWERING: MainThread<HashMap<usize, u64>> = MainThread::new_lazy();

/// Whether client `id`'s reply from this module is on its way (see `ANSWERING`).
pub fn being_answered(id: u64) -> bool {
    ANSWERING.get_mut().values().any(|c| *c == id)
}

extern "C" fn reply_blocked(
    ctx: *mut RedisModuleCtx,
    _argv: *mut *mut api::RedisModuleString,
    _argc: c_int,
) -> c_int {
    guard(
        "reply",
        || api::reply_error(ctx, "ERR internal error"),
        || {
            let p = unsafe { rm!(RedisModule_GetBlockedClientPrivateData)(ctx) } as *const Reply;
            if p.is_null() {
                return api::reply_error(ctx, "ERR internal error: no reply");
            }
            match unsafe { &*p } {
                Reply::Call(r) if !r.is_null() => unsafe {
                    rm!(RedisModule_ReplyWithCallReply)(ctx, *r)
                },
                Reply::Applied {
                    call,
                    queued_at,
                    applied_at,
                } if !call.is_null() => {
                    let now = Instant::now();
                    crate::latency::REPLIED.record(now.saturating_duration_since(*applied_at));
                    crate::latency::TOTAL.record(now.saturating_duration_since(*queued_at));
                    unsafe { rm!(RedisModule_ReplyWithCallReply)(ctx, *call) }
                }
                Reply::Applied { .. } => {
                    api::reply_error(ctx, "ERR the command could not be executed")
                }
                Reply::Call(_) => api::reply_error(ctx, "ERR the command could not be executed"),
                Reply::Multi(parts, select_after) => {
                    unsafe {
                        rm!(RedisModule_ReplyWithArray)(ctx, parts.len() as std::ffi::c_long)
                    };
                    if let Some(db) = select_after {
                        // This context's client is the one that sent EXEC.
                        unsafe { rm!(RedisModule_SelectDb)(ctx, *db) };
                    }
                    for p in parts {
                        match p {
                            Part::Call(r) if !r.is_null() => unsafe {
                                rm!(RedisModule_ReplyWithCallReply)(ctx, *r);
                            },
                            Part::Call(_) => {
                                api::reply_error(ctx, "ERR the command could not be executed");
                            }
                            Part::Status(s) => {
                                api::reply_simple(ctx, s);
                            }
                            Part::Client(argv) => {
                                conn::run_client_op(ctx, argv);
                            }
                            Part::Error(e) => {
                                api::reply_error(ctx, e);
                            }
                        }
                    }
                    api::OK
                }
                Reply::NullArray => unsafe { rm!(RedisModule_ReplyWithNullArray)(ctx) },
                Reply::NullBulk => unsafe { rm!(RedisModule_ReplyWithNull)(ctx) },
                Reply::Status(s) => api::reply_simple(ctx, s),
                Reply::Text(s) => api::reply_simple(ctx, s),
                Reply::NodeAdded(id, cluster_id) => {
                    unsafe { rm!(RedisModule_ReplyWithArray)(ctx, 2) };
                    unsafe { rm!(RedisModule_ReplyWithLongLong)(ctx, *id as i64) };
                    api::reply_simple(ctx, cluster_id)
                }
                Reply::Error(e) => api::reply_error(ctx, e),
            }
        },
    )
}

extern "C" fn free_reply(_ctx: *mut RedisModuleCtx, p: *mut c_void) {
    if p.is_null() {
        return;
    }
    ANSWERING.get_mut().remove(&(p as usize));
    let r = unsafe { Box::from_raw(p as *mut Reply) };
    match *r {
        Reply::Call(c) | Reply::Applied { call: c, .. } => api::free_call_reply(c),
        Reply::Multi(parts, _) => parts.into_iter().for_each(Part::free),
        Reply::Error(_)
        | Reply::NullArray
        | Reply::NullBulk
        | Reply::Status(_)
        | Reply::NodeAdded(..)
        | Reply::Text(_) => {}
    }
}

/// How long a write's reply waits for the blocked clients it woke (a chain of BLMOVEs ...).
const PARKED_MAX_MS: u128 = 1000;

/// Answers `bc` with `reply` now, or, if applying its entry woke blocked clients (`woke`),
/// once they are served.
fn reply_after_wakes(bc: *mut RedisModuleBlockedClient, reply: Reply, woke: bool) {
    if !woke {
        return unblock(bc, reply);
    }
    let st = MAIN.get_mut();
    st.parked_since.get_or_insert_with(std::time::Instant::now);
    st.parked.push((bc, reply));
}

/// Sends the parked replies once no woken client's attempt is in flight (or they waited
/// too long: the bound under a steady stream of wake-ups), or at once with `now`.
fn release_parked(now: bool) {
    let st = MAIN.get_mut();
    let Some(since) = st.parked_since else { return };
    if now || blocking::cascade_idle() || since.elapsed().as_millis() >= PARKED_MAX_MS {
        st.parked_since = None;
        for (bc, reply) in std::mem::take(&mut st.parked) {
            unblock(bc, reply);
        }
    }
}

fn fail_all_reads(msg: &str) {
    let st = MAIN.get_mut();
    let rounds = std::mem::take(&mut st.read_rounds)
        .into_values()
        .map(|(_, waiters)| waiters);
    let ready = std::mem::take(&mut st.reads_ready).into_values();
    for w in rounds.chain(ready).flatten() {
        if let Some(id) = w.blocking {
            blocking::forget(id);
        }
        unblock(w.bc, Reply::Error(msg.to_string()));
    }
}

/// This node stopped leading, its log is full, or it stopped. The writes the raft thread
/// had taken (request number up to `taken`) may still commit, or not: they get `unknown`.
/// The later ones it has not seen (this turn's batch too, handed over before Redis sleeps):
/// if `later` is None it still takes them and says what it did (`Dropped`: a redirect or
/// the full log's error, since they never reach the log; or, leading again by then, it
/// proposes them); if the node stopped they never reach the log and get `later`. A blocking
/// command's attempt gets `unknown` whatever its number: blocking::leadership_lost forgot
/// its waiter.
fn fail_taken(taken: u64, unknown: &str, later: Option<&str>) {
    // Applied already: their own replies, now.
    release_parked(true);
    let pending = &mut MAIN.get_mut().pending;
    let failed: Vec<(u64, &str)> = pending
        .iter()
        .filter_map(|(request, p)| {
            if *request <= taken || p.waiter.is_some() {
                Some((*request, unknown))
            } else {
                later.map(|msg| (*request, msg))
            }
        })
        .collect();
    for (request, msg) in failed {
        if let Some(p) = MAIN.get_mut().pending.remove(&request) {
            unblock(p.bc, Reply::Error(msg.to_string()));
        }
    }
}

/// Keeps what arrived for the apply after the command the main thread is inside (busy.rs).
fn hold(arrived: std::collections::VecDeque<ApplyItem>) {
    MAIN.get_mut().held.extend(arrived);
}

/// A tag for a proposal no client waits on (busy.rs's kill).
fn kill_tag(m: &Module, node: &Node) -> ProposalTag {
    next_tag(MAIN.get_mut(), m, node)
}

/// The tag of this node's next proposal: its waiting client is found by it at apply time.
fn next_tag(st: &mut MainState, m: &Module, node: &Node) -> ProposalTag {
    st.next_request += 1;
    ProposalTag {
        node_id: node.shared().node_id,
        incarnation: m.incarnation,
        request: st.next_request,
    }
}

/// Blocks a client until `finish` (main thread only).
pub fn block(ctx: *mut RedisModuleCtx) -> *mut RedisModuleBlockedClient {
    unsafe { rm!(RedisModule_BlockClient)(ctx, Some(reply_blocked), None, Some(free_reply), 0) }
}

/// Answers a client blocked by `block`: a status reply, or an error.
pub fn finish(bc: *mut RedisModuleBlockedClient, r: Result<String, String>) {
    unblock(
        bc,
        match r {
            Ok(s) => Reply::Text(s),
            Err(e) => Reply::Error(e),
        },
    );
}

/// RAFT.NODE ADD / REMOVE on the leader: blocks the client until the change is committed.
pub fn change_membership(
    ctx: *mut RedisModuleCtx,
    m: &Module,
    node: &Node,
    req: crate::node::ChangeRequest,
) -> c_int {
    let st = MAIN.get_mut();
    let tag = next_tag(st, m, node);
    let bc = block(ctx);
    if bc.is_null() {
        return api::reply_error(ctx, "ERR could not block the client");
    }
    if let Err(e) = node.change_membership(tag, req) {
        unblock(bc, Reply::Error(e.to_string()));
        return api::OK;
    }
    st.pending.insert(
        tag.request,
        Pending {
            bc,
            resp3: false,
            select_after: None,
            waiter: None,
            queued_at: Instant::now(),
        },
    );
    api::OK
}
