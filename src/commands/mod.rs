//! The `RAFT` and `RAFT.*` commands, and `INFO raft`.

// Contexts and strings here come from Redis and are valid for the callback's duration;
// marking every wrapper `unsafe` would only move the same promise to each caller.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

mod cluster;
pub mod conn;
mod info;
mod membership;
pub mod multi;
mod snapshot;

use std::ffi::{c_int, CStr};

pub use info::info_func;

use crate::redis::api::{self, guard, rm, CallOpts, RedisModuleCtx, RedisModuleString};
use crate::redis::classify::Class;
use crate::redis::{
    admit, blocking, module, propose_write, queue_read, redirect_error, scripts, start_blocking,
    transfer_leader,
};

/// Registers the module's commands.
pub fn register(ctx: *mut RedisModuleCtx) -> Result<(), String> {
    let cmds: [(&CStr, api::raw::RedisModuleCmdFunc, &CStr); 11] = [
        // `RAFT <command> ...`: what the filter routes writes (and redirected reads) to.
        // Not `write` (Redis would refuse routed reads too: redis/replicas.rs), but paused
        // by CLIENT PAUSE WRITE like one; MONITOR and SLOWLOG show the command the apply
        // path runs, by its own name, instead of RAFT.
        (
            c"raft",
            Some(raft_cmd),
            c"may-replicate no-monitor no-slowlog deny-script",
        ),
        // What the filter routes reads to where commands have ACL categories (Redis 7.2+):
        // RAFT is in @write and RAFT._READ in @read, so a user's categories decide.
        (
            c"raft._read",
            Some(raft_cmd),
            c"readonly no-monitor no-slowlog deny-script",
        ),
        (
            c"raft._writecheck",
            Some(crate::redis::replicas::write_check_cmd),
            c"write",
        ),
        (c"raft.debug", Some(raft_debug_cmd), c"admin"),
        (c"raft.transfer_leader", Some(transfer_leader_cmd), c"admin"),
        // What the filter routes CLUSTER and INFO to (commands/cluster.rs).
        (c"raft._cluster", Some(cluster_cmd), c"readonly"),
        (c"raft._info", Some(info_cmd), c"readonly"),
        // Inside scripts on the apply path (redis/scripts.rs).
        (c"raft._reject", Some(reject_cmd), c""),
        (c"raft._sort", Some(sort_cmd), c"readonly"),
        // Consumer-group commands with the leader's clock, on the apply path (streams.rs).
        (c"raft._stream", Some(stream_cmd), c"write"),
        // SCRIPT KILL / FUNCTION KILL while an entry's script runs (redis/busy.rs).
        (c"raft._kill", Some(kill_cmd), c"allow-busy deny-script"),
    ];
    for (name, f, flags) in cmds.into_iter().chain(membership::commands()) {
        let r = unsafe {
            rm!(RedisModule_CreateCommand)(ctx, name.as_ptr(), f, flags.as_ptr(), 0, 0, 0)
        };
        if r != api::OK {
            return Err(format!(
                "could not register command {}",
                name.to_string_lossy()
            ));
        }
    }
    set_acl_categories(ctx);
    Ok(())
}

fn set_acl_categories(ctx: *mut RedisModuleCtx) {
    let Some(set) = (unsafe { api::raw::RedisModule_SetCommandACLCategories }) else {
        return;
    };
    let cats: [(&CStr, &CStr); 6] = [
        (c"raft", c"write"),
        (c"raft._read", c"read"),
        (c"raft.debug", c"admin dangerous"),
        (c"raft.transfer_leader", c"admin dangerous"),
        (c"raft.cluster", c"admin dangerous"),
        (c"raft.node", c"admin dangerous"),
    ];
    for (name, c) in cats {
        let cmd = unsafe { rm!(RedisModule_GetCommand)(ctx, name.as_ptr()) };
        if cmd.is_null() || unsafe { set(cmd, c.as_ptr()) } != api::OK {
            tracing::warn!(
                "could not give {} the ACL categories {}",
                name.to_string_lossy(),
                c.to_string_lossy()
            );
        }
    }
}

const CTX_MULTI: u32 = api::raw::REDISMODULE_CTX_FLAGS_MULTI;
const CTX_LUA: u32 = api::raw::REDISMODULE_CTX_FLAGS_LUA;

extern "C" fn raft_cmd(
    ctx: *mut RedisModuleCtx,
    argv: *mut *mut RedisModuleString,
    argc: c_int,
) -> c_int {
    guard(
        "RAFT",
        || api::reply_error(ctx, "ERR internal error (see the server log)"),
        || {
            let args = unsafe { api::args(argv, argc) };
            if args.len() < 2 {
                return api::reply_error(ctx, "ERR wrong number of arguments for 'raft' command");
            }
            let Some(m) = module() else {
                return api::reply_error(ctx, "ERR redis-raft is not initialised");
            };
            let cmd: Vec<Vec<u8>> = args[1..].iter().map(|a| a.to_vec()).collect();
            let class = m
                .table()
                .classify(&cmd[0], cmd.get(1).map(|v| v.as_slice()));
            // EVAL_RO of a new script: logged, so every node caches it (redis/scripts.rs).
            let logged_read = class == Class::Read
                && crate::redis::scripts::logs_read(&cmd[0], cmd.get(1).map(|v| v.as_slice()));
            let class = if logged_read { Class::Write } else { class };
            let client = unsafe { rm!(RedisModule_GetClientId)(ctx) };
            if crate::redis::multi::in_multi(client) {
                return multi::handle(ctx, m, cmd, class);
            }
            if class == Class::Transaction {
                return multi::begin_or_misplaced(ctx, m, &cmd);
            }
            if cmd[0].eq_ignore_ascii_case(b"select") {
                return multi::select_now(ctx, &cmd);
            }
            if matches!(class, Class::Local | Class::Container) {
                // A node-local command routed here because some other client is in MULTI:
                // Redis's checks (which an RM_Call skips), then as Redis runs it.
                let checked = m
                    .table()
                    .check_syntax(&cmd)
                    .and_then(|()| {
                        conn::protected_refusal(ctx, m.table(), &cmd).map_or(Ok(()), Err)
                    })
                    .and_then(|()| admit(ctx, m, &cmd));
                if let Err(e) = checked {
                    return api::reply_error(ctx, &e);
                }
                if let Some(rc) = conn::run_now(ctx, &cmd) {
                    return rc;
                }
                return call_by_book(ctx, &cmd);
            }
            if let Class::Refused(why) = class {
                return api::reply_error(ctx, &format!("ERR {why}"));
            }
            if matches!(class, Class::Write | Class::Read) && crate::redis::snapshots::loading() {
                return api::reply_error(ctx, &crate::redis::snapshots::loading_error());
            }
            let Some(node) = m.node() else {
                return api::reply_error(ctx, &redirect_error(m));
            };
            let flags = unsafe { rm!(RedisModule_GetContextFlags)(ctx) } as u32;
            if flags & (CTX_MULTI | CTX_LUA) != 0 {
                return api::reply_error(
                ctx,
                "ERR replicated commands inside MULTI or scripts are not supported by redis-raft yet",
            );
            }
            if matches!(class, Class::Write | Class::Read) {
                // SAFETY: Redis passes `argc` strings; the command starts after RAFT's name.
                let raw = unsafe { std::slice::from_raw_parts(argv.add(1), argc as usize - 1) };
                if let Err(e) = crate::redis::admit_with(ctx, m, &cmd, Some(raw)) {
                    return api::reply_error(ctx, &e);
                }
            }
            match class {
                Class::Write => {
                    if !node.shared().is_leader() {
                        return api::reply_error(ctx, &redirect_error(m));
                    }
                    if crate::redis::is_script(&cmd)
                        && !logged_read
                        && crate::redis::replicas::writes_refused(ctx)
                    {
                        // Nothing can be written: run it here as a read (replicas.rs).
                        return queue_read(ctx, cmd);
                    }
                    match blocking::parse(&cmd) {
                        Some(spec) => start_blocking(ctx, m, node, cmd, spec),
                        None => propose_write(ctx, m, node, cmd),
                    }
                }
                Class::Read if m.serves_reads_locally(node) => call_by_book(ctx, &cmd),
                Class::Read if m.serves_reads_by_index(node) => queue_read(ctx, cmd),
                Class::Read => api::reply_error(ctx, &redirect_error(m)),
                _ => call_and_reply(ctx, &cmd),
            }
        },
    )
}

use api::call_and_reply;

/// `RAFT.TRANSFER_LEADER [<id>]` (RedisRaft's): +OK once that node (or, without an id, the
/// most up-to-date follower) is leader. The id is a node id or a node name.
extern "C" fn transfer_leader_cmd(
    ctx: *mut RedisModuleCtx,
    argv: *mut *mut RedisModuleString,
    argc: c_int,
) -> c_int {
    guard(
        "RAFT.TRANSFER_LEADER",
        || api::reply_error(ctx, "ERR internal error (see the server log)"),
        || {
            let args = unsafe { api::args(argv, argc) };
            if args.len() > 2 {
                return api::reply_error(
                    ctx,
                    "ERR wrong number of arguments for 'raft.transfer_leader' command",
                );
            }
            let Some(m) = module() else {
                return api::reply_error(ctx, "ERR redis-raft is not initialised");
            };
            let Some(node) = m.node() else {
                return api::reply_error(ctx, &redirect_error(m));
            };
            let target = match args.get(1) {
                None => 0,
                Some(a) => {
                    let s = String::from_utf8_lossy(a);
                    let members = node.shared().members();
                    match members
                        .iter()
                        .find(|mb| mb.name == s || s.parse::<u64>().ok() == Some(mb.id))
                    {
                        Some(mb) => mb.id,
                        None => return api::reply_error(ctx, "ERR invalid node id"),
                    }
                }
            };
            transfer_leader(ctx, node, target)
        },
    )
}

/// Runs a read or a node-local command here and replies; a script is found or missed as
/// the log's EVALSHA entries find it (redis/scripts.rs: `run_read`).
fn call_by_book(ctx: *mut RedisModuleCtx, cmd: &[Vec<u8>]) -> c_int {
    let opts = api::client_opts(ctx);
    let r = scripts::run_read(ctx, cmd, |a| api::call(ctx, a, opts));
    api::reply_with_call(ctx, r)
}

/// `RAFT._CLUSTER CLUSTER <sub> ...`: CLUSTER as cluster clients expect it.
extern "C" fn cluster_cmd(
    ctx: *mut RedisModuleCtx,
    argv: *mut *mut RedisModuleString,
    argc: c_int,
) -> c_int {
    guard(
        "CLUSTER",
        || api::reply_error(ctx, "ERR internal error (see the server log)"),
        || {
            let args = unsafe { api::owned_args(argv, argc) };
            let Some(m) = module() else {
                return api::reply_error(ctx, "ERR redis-raft is not initialised");
            };
            cluster::cluster(ctx, m, args.get(2..).unwrap_or(&[]))
        },
    )
}

/// `RAFT._INFO INFO [section ...]`.
extern "C" fn info_cmd(
    ctx: *mut RedisModuleCtx,
    argv: *mut *mut RedisModuleString,
    argc: c_int,
) -> c_int {
    guard(
        "INFO",
        || api::reply_error(ctx, "ERR internal error (see the server log)"),
        || {
            let args = unsafe { api::owned_args(argv, argc) };
            cluster::info(ctx, args.get(1..).unwrap_or(&[]))
        },
    )
}

/// `RAFT._STREAM <leader-ms> <command ...>`: XREADGROUP / XCLAIM / XAUTOCLAIM as logged by
/// the leader, run by the apply path (redis/streams.rs).
extern "C" fn stream_cmd(
    ctx: *mut RedisModuleCtx,
    argv: *mut *mut RedisModuleString,
    argc: c_int,
) -> c_int {
    guard(
        "RAFT._STREAM",
        || api::reply_error(ctx, "ERR internal error (see the server log)"),
        || {
            let args = unsafe { api::owned_args(argv, argc) };
            crate::redis::streams::run(ctx, args.get(1..).unwrap_or(&[]))
        },
    )
}

/// `RAFT._KILL SCRIPT|FUNCTION KILL`: what the filter routes a kill to while an entry's
/// script runs on the apply path (redis/busy.rs).
extern "C" fn kill_cmd(
    ctx: *mut RedisModuleCtx,
    argv: *mut *mut RedisModuleString,
    argc: c_int,
) -> c_int {
    guard(
        "RAFT._KILL",
        || api::reply_error(ctx, "ERR internal error (see the server log)"),
        || {
            let args = unsafe { api::owned_args(argv, argc) };
            let Some(m) = module() else {
                return api::reply_error(ctx, "ERR redis-raft is not initialised");
            };
            crate::redis::busy::kill(ctx, m, args.get(1..).unwrap_or(&[]))
        },
    )
}

/// A command with random results, called from a script on the apply path.
extern "C" fn reject_cmd(
    ctx: *mut RedisModuleCtx,
    argv: *mut *mut RedisModuleString,
    argc: c_int,
) -> c_int {
    let args = unsafe { api::args(argv, argc) };
    let name = args
        .get(1)
        .map(|n| String::from_utf8_lossy(n).to_uppercase())
        .unwrap_or_default();
    if name == "XREADGROUP" {
        return api::reply_error(
            ctx,
            "ERR XREADGROUP records delivery times with each node's clock and cannot run inside a script in redis-raft (but with NOACK reading new entries): call it outside the script",
        );
    }
    api::reply_error(
        ctx,
        &format!("ERR {name} has random results and cannot run inside a script in redis-raft: every node would compute a different result"),
    )
}

/// A command with arbitrary output order, called from a script on the apply path: its reply
/// is sorted so every node's script sees the same.
extern "C" fn sort_cmd(
    ctx: *mut RedisModuleCtx,
    argv: *mut *mut RedisModuleString,
    argc: c_int,
) -> c_int {
    guard(
        "RAFT._SORT",
        || api::reply_error(ctx, "ERR internal error (see the server log)"),
        || {
            let args = unsafe { api::args(argv, argc) };
            if args.len() < 2 {
                return api::reply_error(
                    ctx,
                    "ERR wrong number of arguments for 'raft._sort' command",
                );
            }
            let cmd: Vec<Vec<u8>> = args[1..].iter().map(|a| a.to_vec()).collect();
            scripts::set_sorting(true);
            let r = api::call(ctx, &cmd, CallOpts::default());
            scripts::set_sorting(false);
            if r.is_null() {
                return api::reply_error(ctx, "ERR the command could not be executed");
            }
            let is_error = unsafe { rm!(RedisModule_CallReplyType)(r) } as isize
                == api::raw::REDISMODULE_REPLY_ERROR;
            if is_error {
                let rc = unsafe { rm!(RedisModule_ReplyWithCallReply)(ctx, r) };
                api::free_call_reply(r);
                return rc;
            }
            let v = api::call_reply_value(r);
            api::free_call_reply(r);
            let pairs = cmd[0].eq_ignore_ascii_case(b"hgetall");
            api::reply_value(ctx, &scripts::sort_reply(v, pairs))
        },
    )
}

/// `RAFT.DEBUG LATENCY`: one line per stage of a write's path, then of a linearizable read's,
/// on this node (crate::latency),
/// percentiles in microseconds; `RAFT.DEBUG LATENCY RESET` starts them again.
fn debug_latency(ctx: *mut RedisModuleCtx, args: &[&[u8]]) -> c_int {
    match args {
        [] => {
            let lines: Vec<api::Value> = crate::latency::stages()
                .iter()
                .map(|(name, h)| {
                    api::Value::Str(format!("{name}: {}", h.summary().line()).into_bytes())
                })
                .collect();
            api::reply_value(ctx, &api::Value::Array(lines))
        }
        [r] if r.eq_ignore_ascii_case(b"reset") => {
            for (_, h) in crate::latency::stages() {
                h.reset();
            }
            api::reply_simple(ctx, "OK")
        }
        _ => api::reply_error(ctx, "ERR usage: RAFT.DEBUG LATENCY [RESET]"),
    }
}

/// `RAFT.DEBUG LOG-FAULT WRITE-EIO|FSYNC-EIO|ENOSPC|OFF`, for tests only: this node's next
/// raft log write (or fsync) fails with EIO, or every write fails with ENOSPC until OFF, as
/// a failing or full disk would make them fail. Node-local; nothing is written to the log.
fn debug_log_fault(ctx: *mut RedisModuleCtx, args: &[&[u8]]) -> c_int {
    use crate::storage::LogFault;
    let Some(node) = module().and_then(|m| m.node()) else {
        return api::reply_error(ctx, "NOCLUSTER No Raft Cluster");
    };
    let fault = match args {
        [f] if f.eq_ignore_ascii_case(b"write-eio") => Some(LogFault::WriteEio),
        [f] if f.eq_ignore_ascii_case(b"fsync-eio") => Some(LogFault::FsyncEio),
        [f] if f.eq_ignore_ascii_case(b"enospc") => Some(LogFault::NoSpace),
        [f] if f.eq_ignore_ascii_case(b"off") => None,
        _ => {
            return api::reply_error(
                ctx,
                "ERR usage: RAFT.DEBUG LOG-FAULT WRITE-EIO|FSYNC-EIO|ENOSPC|OFF",
            )
        }
    };
    tracing::warn!("RAFT.DEBUG LOG-FAULT (a test knob): the raft log's next write or fsync now fails as {fault:?}");
    node.set_log_fault(fault);
    api::reply_simple(ctx, "OK")
}

/// `RAFT.DEBUG EXEC <command> [args...]`: runs a command locally, outside Raft.
/// `RAFT.DEBUG SNAPSHOT SAVE|LOAD <path>`: saves or loads this node's dataset (snapshot.rs).
extern "C" fn raft_debug_cmd(
    ctx: *mut RedisModuleCtx,
    argv: *mut *mut RedisModuleString,
    argc: c_int,
) -> c_int {
    guard(
        "RAFT.DEBUG",
        || api::reply_error(ctx, "ERR internal error (see the server log)"),
        || {
            let args = unsafe { api::args(argv, argc) };
            let sub = args.get(1).map(|s| s.to_ascii_uppercase());
            match sub.as_deref() {
                Some(b"EXEC") if args.len() >= 3 => {
                    let cmd: Vec<Vec<u8>> = args[2..].iter().map(|a| a.to_vec()).collect();
                    call_and_reply(ctx, &cmd)
                }
                Some(b"EXEC") => {
                    api::reply_error(ctx, "ERR wrong number of arguments for 'raft.debug exec'")
                }
                Some(b"SNAPSHOT") => snapshot::debug(ctx, &args[2..]),
                // RedisRaft's: take a snapshot now and compact the log (+OK when done).
                Some(b"COMPACT") => match module().and_then(|m| m.node()) {
                    Some(node) => crate::redis::snapshots::compact_now(ctx, node),
                    None => api::reply_error(ctx, "NOCLUSTER No Raft Cluster"),
                },
                Some(b"LATENCY") => debug_latency(ctx, &args[2..]),
                Some(b"LOG-FAULT") => debug_log_fault(ctx, &args[2..]),
                _ => api::reply_error(
                    ctx,
                    "ERR RAFT.DEBUG supports EXEC, COMPACT, SNAPSHOT, LATENCY [RESET] and LOG-FAULT",
                ),
            }
        },
    )
}
