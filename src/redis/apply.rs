//! The apply path, on the main thread: committed entries taken from the raft thread's apply
//! queue (`apply_committed`, woken by `on_wake`) and executed in log order on the apply
//! context, each command through RM_Call (`apply_call`), transactions back to back unless a
//! watched key tripped, membership changes answered; then the waiting client of each entry
//! this node proposed gets its reply. A snapshot to load (at start, or sent by the leader)
//! holds everything after it until it is loaded.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use raft::eraftpb::{Entry, EntryType};
use tracing::{error, info, warn};

use super::api::{
    self, rm, CallOpts, RedisModuleBlockedClient, RedisModuleCallReply, RedisModuleCtx,
};
use super::{
    blocking, busy, classify, conn, enqueue_blocking, fail_all_reads, fail_taken, module, on_wake,
    redirect_error, release_parked, reply_after_wakes, scripts, serve_read, serve_ready_reads,
    snapshots, streams, unblock, watch, Module, Part, Pending, ReadWaiter, Reply, MAIN,
    REMOVED_ERROR, WAKE_QUEUED,
};
use crate::codec::{decode_command, LogCommand, ProposalTag};
use crate::node::{ApplyItem, Node};

/// Drains the apply queue: executes committed entries in order and answers waiting clients.
pub(super) fn apply_committed() {
    let Some(m) = module() else { return };
    let Some(node) = m.node() else { return };
    let ctx = m.apply_ctx as *mut RedisModuleCtx;
    let _applying = busy::applying();
    let first = {
        let st = MAIN.get_mut();
        !std::mem::replace(&mut st.started_applying, true)
    };
    if first {
        take_over_dataset(ctx);
        let snap = &node.snapshot_at_start;
        if snap.index > 0 {
            snapshots::start_loading(ctx, &node.snapshot_path, snap.index, false, resume_applying);
        }
    }
    let me = node.shared().node_id;
    let mut items = std::mem::take(&mut MAIN.get_mut().held);
    let arrived = node.shared().take_apply_items();
    busy::note_kills(&arrived);
    items.extend(arrived);
    while let Some(item) = items.pop_front() {
        if snapshots::loading() {
            // Nothing is applied on top of a half-loaded snapshot: keep it all for later,
            // ahead of what arrived while a script of this batch ran (busy.rs).
            items.push_front(item);
            let st = MAIN.get_mut();
            items.extend(std::mem::take(&mut st.held));
            st.held = items;
            return;
        }
        match item {
            ApplyItem::Compacted { index, result } => snapshots::compacted(index, result),
            ApplyItem::InstallSnapshot { index, path } => {
                fail_all_reads("TIMEOUT this node is installing a snapshot from the leader; retry");
                snapshots::start_loading(ctx, &path, index, true, resume_applying);
            }
            ApplyItem::Entries(entries, handed_at) => {
                let n = entries.len() as u64;
                for e in entries {
                    apply_entry(ctx, m, node, me, &e);
                    node.shared().set_applied(e.index);
                }
                crate::latency::APPLIED.record_n(handed_at.elapsed(), n);
            }
            ApplyItem::Dropped(tags) => {
                let err = redirect_error(m);
                for t in tags {
                    if t.incarnation == m.incarnation {
                        if let Some(p) = MAIN.get_mut().pending.remove(&t.request) {
                            if let Some(w) = p.waiter {
                                blocking::forget(w);
                            }
                            unblock(p.bc, Reply::Error(err.clone()));
                        }
                    }
                }
            }
            ApplyItem::LeadershipLost { taken } => {
                blocking::leadership_lost(&redirect_error(m));
                fail_taken(
                    taken,
                    "TIMEOUT leadership changed before the write was committed; its outcome is unknown",
                    None,
                )
            }
            ApplyItem::LogFull {
                writes,
                reads,
                taken,
            } => {
                blocking::leadership_lost(&writes);
                fail_taken(taken, &writes, None);
                fail_all_reads(&reads);
            }
            ApplyItem::Stopped { msg, taken } => {
                let unknown = format!("TIMEOUT {msg} (the write may have reached the other nodes: its outcome is unknown)");
                let msg = format!("ERR {msg}");
                blocking::leadership_lost(&msg);
                fail_taken(taken, &unknown, Some(&msg));
                fail_all_reads(&msg);
            }
            ApplyItem::ReadReady { round, index } => {
                let st = MAIN.get_mut();
                if let Some((sent, waiters)) = st.read_rounds.remove(&round) {
                    crate::latency::READ_ROUND.record(sent.elapsed());
                    st.reads_ready.entry(index).or_default().extend(waiters);
                }
            }
            ApplyItem::Refused { tag, error } => {
                if tag.incarnation == m.incarnation {
                    if let Some(p) = MAIN.get_mut().pending.remove(&tag.request) {
                        unblock(p.bc, Reply::Error(error));
                    }
                }
            }
            ApplyItem::AlreadyMember { tag, id } => {
                if tag.incarnation == m.incarnation {
                    if let Some(p) = MAIN.get_mut().pending.remove(&tag.request) {
                        unblock(p.bc, Reply::NodeAdded(id, node.shared().cluster_id()));
                    }
                }
            }
            ApplyItem::Removed { taken } => {
                blocking::leadership_lost(REMOVED_ERROR);
                fail_taken(
                    taken,
                    "TIMEOUT this node was removed from the raft cluster before the write was committed; its outcome is unknown",
                    Some(REMOVED_ERROR),
                );
                fail_all_reads(REMOVED_ERROR);
            }
            ApplyItem::TransferDone(result) => {
                if let Some(bc) = MAIN.get_mut().transfer.take() {
                    let reply = match result {
                        Ok(()) => Reply::Status("OK"),
                        Err(e) => Reply::Error(e),
                    };
                    unblock(bc as *mut RedisModuleBlockedClient, reply);
                }
            }
            ApplyItem::ReadFailed { rounds, error } => {
                for round in rounds {
                    let waiters = MAIN
                        .get_mut()
                        .read_rounds
                        .remove(&round)
                        .map(|(_, waiters)| waiters)
                        .unwrap_or_default();
                    for w in waiters {
                        if let Some(id) = w.blocking {
                            blocking::forget(id);
                        }
                        unblock(w.bc, Reply::Error(error.clone()));
                    }
                }
            }
        }
    }
    serve_ready_reads(ctx, node.shared().applied());
    snapshots::maybe_snapshot(ctx, node, true);
    for p in blocking::retries() {
        match p {
            blocking::Proposal::Reread {
                waiter,
                bc,
                db,
                argv,
                resp3,
            } => serve_read(
                ctx,
                ReadWaiter {
                    bc,
                    argv,
                    db,
                    resp3,
                    blocking: Some(waiter),
                    arrived: None,
                },
            ),
            other => enqueue_blocking(m, node, other),
        }
    }
    release_parked(false);
}

/// A snapshot finished loading: go on with what was held meanwhile (from the event loop).
pub(super) fn resume_applying() {
    if !WAKE_QUEUED.swap(true, Ordering::AcqRel) {
        unsafe { rm!(RedisModule_EventLoopAddOneShot)(Some(on_wake), std::ptr::null_mut()) };
    }
}

/// Runs a transaction's commands back to back, each in its own database.
pub(super) fn apply_transaction(
    ctx: *mut RedisModuleCtx,
    m: &Module,
    index: u64,
    cmds: &[(i32, Vec<Vec<u8>>)],
    resp3: bool,
    proposer: bool,
) -> Vec<Part> {
    cmds.iter()
        .map(|(db, argv)| {
            if proposer && conn::is_client_op(argv) {
                return Part::Client(argv.clone());
            }
            // Node-local commands (PING, CONFIG ...) run only where the client is; the
            // leader's consumer-group wrapper (a RAFT.* name) runs everywhere.
            let sub = argv.get(1).map(|s| s.as_slice());
            let stream = argv[0].eq_ignore_ascii_case(streams::COMMAND.as_bytes());
            let local = !stream && m.table().classify(&argv[0], sub) == classify::Class::Local;
            if !proposer && local {
                return Part::Error(String::new());
            }
            if unsafe { rm!(RedisModule_SelectDb)(ctx, *db) } != api::OK {
                return Part::Error("ERR DB index is out of range".into());
            }
            // A queued SELECT: its database is already this entry's `db`.
            if argv[0].eq_ignore_ascii_case(b"select") {
                return Part::Status("OK");
            }
            Part::Call(apply_call(
                ctx,
                argv,
                CallOpts { resp3 },
                index,
                true,
                !local,
            ))
        })
        .collect()
}

/// Commands of applied entries that answered an error on this node since it started
/// (INFO raft `apply_errors`).
static APPLY_ERRORS: AtomicU64 = AtomicU64::new(0);

pub fn apply_errors() -> u64 {
    APPLY_ERRORS.load(Ordering::Relaxed)
}

/// Counts an applied command that answered an error, and logs it at debug level: nodes that
/// applied the same entries count the same errors, so a count that differs between nodes
/// points at a command that ran differently (at `raft.loglevel verbose` the log names it).
/// Not for a node-local command in a transaction (it runs only where its client is), nor a
/// script a kill stopped (only the nodes that were running it answer).
fn note_error(r: *mut RedisModuleCallReply, argv: &[Vec<u8>], index: u64) {
    if !api::reply_is_error(r) {
        return;
    }
    APPLY_ERRORS.fetch_add(1, Ordering::Relaxed);
    if tracing::enabled!(tracing::Level::DEBUG) {
        let why = match api::call_reply_value(r) {
            api::Value::Str(s) => String::from_utf8_lossy(&s).into_owned(),
            _ => "Redis could not run the command".into(),
        };
        let name = String::from_utf8_lossy(&argv[0]).to_uppercase();
        tracing::debug!("raft entry {index}: {name} answered an error here: {why}");
    }
}

/// Executes one command of a committed entry. Only what a script that may write runs must be
/// made deterministic (redis/scripts.rs); a command's own reply goes to one client only.
/// `replicated`: every node runs it (not a node-local command queued in a transaction), so
/// an error it answers is counted (`note_error`).
pub(super) fn apply_call(
    ctx: *mut RedisModuleCtx,
    argv: &[Vec<u8>],
    opts: CallOpts,
    index: u64,
    in_transaction: bool,
    replicated: bool,
) -> *mut RedisModuleCallReply {
    let script = is_script(argv);
    // EVAL_RO, EVALSHA_RO, FCALL_RO write nothing: whatever they compute, the nodes' data
    // stays alike (only the proposer's reply is used).
    let name = argv[0].as_slice();
    let read_only = name.len() >= 3 && name[name.len() - 3..].eq_ignore_ascii_case(b"_ro");
    scripts::set_applying(script && !read_only);
    let function = name.len() >= 5 && name[..5].eq_ignore_ascii_case(b"fcall");
    busy::set_running_script(script.then_some(busy::Running {
        index,
        function,
        in_transaction,
    }));
    streams::set_applying(true);
    let r = if replicated {
        scripts::run_applied(ctx, argv, |argv| api::call(ctx, argv, opts))
    } else {
        // A node-local command of a transaction (SCRIPT EXISTS answers by the book).
        scripts::run_read(ctx, argv, |a| api::call(ctx, a, opts))
    };
    streams::set_applying(false);
    // A script a kill stopped answers only on the nodes that were running it.
    let killed = script && (busy::run_killed() || busy::killed(index));
    busy::set_running_script(None);
    scripts::set_applying(false);
    if replicated && !killed {
        note_error(r, argv, index);
    }
    r
}

/// EVAL, EVALSHA, FCALL and their read-only forms.
pub fn is_script(argv: &[Vec<u8>]) -> bool {
    argv.first().is_some_and(|n| {
        [
            "eval",
            "evalsha",
            "eval_ro",
            "evalsha_ro",
            "fcall",
            "fcall_ro",
        ]
        .iter()
        .any(|s| n.eq_ignore_ascii_case(s.as_bytes()))
    })
}

/// A committed membership change (the raft thread already applied it): answer the
/// RAFT.NODE client waiting here, as RedisRaft does.
pub(super) fn answer_membership_change(m: &Module, node: &Node, me: u64, e: &Entry) {
    let Some(p) = ProposalTag::decode(&e.context)
        .filter(|t| t.node_id == me && t.incarnation == m.incarnation)
        .and_then(|t| MAIN.get_mut().pending.remove(&t.request))
    else {
        return;
    };
    let change = <raft::eraftpb::ConfChangeV2 as prost::Message>::decode(e.data.as_ref())
        .ok()
        .and_then(|cc| crate::codec::decode::<crate::codec::MemberChange>(&cc.context).ok());
    let reply = match change {
        Some(crate::codec::MemberChange::Add { member }) => {
            Reply::NodeAdded(member.id, node.shared().cluster_id())
        }
        Some(_) => Reply::Status("OK"),
        None => Reply::Error("ERR the membership change could not be read back".into()),
    };
    unblock(p.bc, reply);
}

/// The Raft log is the source of truth: whatever Redis loaded from its own RDB/AOF at start
/// (keys and function libraries) is dropped before the log is replayed.
pub(super) fn take_over_dataset(ctx: *mut RedisModuleCtx) {
    let mut keys = 0u64;
    for db in 0..16 {
        if unsafe { rm!(RedisModule_SelectDb)(ctx, db) } != api::OK {
            break;
        }
        keys += unsafe { rm!(RedisModule_DbSize)(ctx) };
    }
    unsafe { rm!(RedisModule_SelectDb)(ctx, 0) };
    if keys > 0 {
        warn!("discarding {keys} keys that Redis loaded from its own RDB/AOF: the raft log is replayed instead (set save \"\" and appendonly no)");
        unsafe { rm!(RedisModule_ResetDataset)(0, 0) };
    }
    // Function libraries too: the log's FUNCTION LOAD entries (or a snapshot) bring them back.
    let libraries = match api::call_checked(ctx, &[b"FUNCTION".to_vec(), b"LIST".to_vec()]) {
        Ok(api::Value::Array(libs)) => libs.len(),
        _ => 0,
    };
    if libraries > 0 {
        warn!("discarding {libraries} function libraries that Redis loaded from its own RDB/AOF: the raft log is replayed instead");
        if let Err(e) = api::call_checked(
            ctx,
            &[b"FUNCTION".to_vec(), b"FLUSH".to_vec(), b"SYNC".to_vec()],
        ) {
            error!("FUNCTION FLUSH failed: {e}; FUNCTION LOAD entries of the log may fail on this node");
        }
    }
}

/// Applies a transaction at `index`: aborted (null reply) on every node alike if a watched
/// key tripped (`watch::tripped` with the leader's clock at EXEC), else its commands run
/// back to back.
pub(super) fn apply_multi(
    ctx: *mut RedisModuleCtx,
    m: &Module,
    index: u64,
    pending: Option<Pending>,
    cmds: &[(i32, Vec<Vec<u8>>)],
    watched: &[watch::WatchedKey],
    now_ms: i64,
) {
    if watch::tripped(watched, now_ms) {
        if let Some(p) = pending {
            unblock(p.bc, Reply::NullArray);
        }
        return;
    }
    if busy::killed(index) {
        // SHUTDOWN NOSAVE stopped one of its scripts on the leader: it never happened.
        info!("raft entry {index}: transaction skipped, one of its scripts was killed");
        for (_, argv) in cmds {
            scripts::cache_skipped(ctx, argv);
        }
        if let Some(p) = pending {
            unblock(
                p.bc,
                Reply::Error("ERR Script killed by user with SHUTDOWN NOSAVE".into()),
            );
        }
        return;
    }
    let resp3 = pending.as_ref().is_some_and(|p| p.resp3);
    let wakes = blocking::wakes();
    watch::set_applying(Some(index));
    let replies = apply_transaction(ctx, m, index, cmds, resp3, pending.is_some());
    watch::set_applying(None);
    let woke = blocking::wakes() > wakes;
    for (db, argv) in cmds {
        note_applied(*db, argv, index);
    }
    match pending {
        Some(p) => reply_after_wakes(p.bc, Reply::Multi(replies, p.select_after), woke),
        None => replies.into_iter().for_each(Part::free),
    }
}

/// What the keys do not show of an applied command: FLUSHDB, FLUSHALL and SWAPDB for WATCH
/// (the script cache's changes are noted as each command runs: `scripts::run_applied`).
pub(super) fn note_applied(db: i32, argv: &[Vec<u8>], index: u64) {
    watch::note_command(db, argv, index);
}

pub(super) fn apply_entry(ctx: *mut RedisModuleCtx, m: &Module, node: &Node, me: u64, e: &Entry) {
    if e.get_entry_type() == EntryType::EntryConfChangeV2 {
        return answer_membership_change(m, node, me, e);
    }
    if e.get_entry_type() != EntryType::EntryNormal || e.data.is_empty() {
        return;
    }
    let cmd = match decode_command(&e.data) {
        Ok(c) => c,
        Err(err) => {
            // Every node holds the same bytes and skips the same entry.
            error!(
                "raft entry {} (term {}) cannot be decoded, skipped: {err}",
                e.index, e.term
            );
            return;
        }
    };
    let pending = ProposalTag::decode(&e.context)
        .filter(|t| t.node_id == me && t.incarnation == m.incarnation)
        .and_then(|t| MAIN.get_mut().pending.remove(&t.request));
    match cmd {
        LogCommand::Redis { db, argv } => {
            if unsafe { rm!(RedisModule_SelectDb)(ctx, db) } != api::OK {
                error!(
                    "raft entry {}: database {db} does not exist here; skipped",
                    e.index
                );
                if let Some(p) = pending {
                    if let Some(w) = p.waiter {
                        blocking::forget(w);
                    }
                    unblock(
                        p.bc,
                        Reply::Error(format!("ERR DB index {db} is out of range")),
                    );
                }
                return;
            }
            if is_script(&argv) && busy::killed(e.index) {
                // A later entry killed it on the leader before it wrote (busy.rs).
                info!("raft entry {}: skipped, its script was killed", e.index);
                scripts::cache_skipped(ctx, &argv);
                if let Some(p) = pending {
                    unblock(
                        p.bc,
                        Reply::Error(
                            "ERR Script killed by user with SCRIPT KILL or FUNCTION KILL".into(),
                        ),
                    );
                }
                return;
            }
            let opts = CallOpts {
                resp3: pending.as_ref().is_some_and(|p| p.resp3),
            };
            let wakes = blocking::wakes();
            watch::applying(db, &argv, e.index);
            let r = apply_call(ctx, &argv, opts, e.index, false, true);
            watch::set_applying(None);
            let woke = blocking::wakes() > wakes;
            note_applied(db, &argv, e.index);
            match pending {
                Some(Pending {
                    waiter: Some(w), ..
                }) => match blocking::attempt_done(ctx, w, r) {
                    blocking::Outcome::Reply(bc) => unblock(bc, Reply::Call(r)),
                    blocking::Outcome::Drop(undo) => {
                        api::free_call_reply(r);
                        if let Some(u) = undo {
                            enqueue_blocking(m, node, u);
                        }
                    }
                },
                Some(p) => {
                    let reply = Reply::Applied {
                        call: r,
                        queued_at: p.queued_at,
                        applied_at: Instant::now(),
                    };
                    reply_after_wakes(p.bc, reply, woke)
                }
                None => api::free_call_reply(r),
            }
        }
        LogCommand::Multi { cmds, watch } => {
            // Written before transactions carried expiries and a clock.
            let watched: Vec<_> = watch.into_iter().map(|(d, k, i)| (d, k, i, -1)).collect();
            apply_multi(ctx, m, e.index, pending, &cmds, &watched, 0);
        }
        LogCommand::Transaction {
            cmds,
            watch,
            now_ms,
        } => apply_multi(ctx, m, e.index, pending, &cmds, &watch, now_ms),
        LogCommand::NodeAddr { id, addr } => node.shared().set_member_addr(id, &addr),
        LogCommand::KillScript { index, .. } => busy::kill_applied(ctx, index),
    }
}
