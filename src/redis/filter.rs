//! The command filter: sees every client command before Redis runs it, and routes the ones
//! that must go through Raft to the `RAFT` command by prefixing them with `RAFT`.
//!
//! Registered with `REDISMODULE_CMDFILTER_NOSELF`, so commands the module itself executes
//! (the apply path, RAFT.DEBUG EXEC) are not intercepted again.

use std::ffi::c_int;

use super::api::{self, guard, raw, rm};
use super::classify::Class;
use super::module;

pub extern "C" fn filter(fctx: *mut raw::RedisModuleCommandFilterCtx) {
    guard("command filter", || (), || unsafe { filter_inner(fctx) })
}

unsafe fn filter_inner(fctx: *mut raw::RedisModuleCommandFilterCtx) {
    let Some(m) = module() else { return };
    let ctx = m.apply_ctx as *mut api::RedisModuleCtx;
    if super::multi::check_pending() && !super::busy::inside_command(ctx) {
        // Before this command runs: which client in MULTI ran a connection command just now.
        // (Not from inside a script or a load: nothing is called there, see busy.rs.)
        super::multi::check_connection_commands(ctx);
    }
    let argc: c_int = rm!(RedisModule_CommandFilterArgsCount)(fctx);
    if argc < 1 {
        return;
    }
    let name = api::str_bytes(rm!(RedisModule_CommandFilterArgGet)(fctx, 0));
    let sub = if argc > 1 {
        Some(api::str_bytes(rm!(RedisModule_CommandFilterArgGet)(
            fctx, 1,
        )))
    } else {
        None
    };
    if name.eq_ignore_ascii_case(b"client")
        && sub.is_some_and(|s| s.eq_ignore_ascii_case(b"unblock"))
        && argc > 2
    {
        let target = api::str_bytes(rm!(RedisModule_CommandFilterArgGet)(fctx, 2));
        let answered = std::str::from_utf8(target)
            .ok()
            .and_then(|t| t.parse::<u64>().ok())
            .is_some_and(super::being_answered);
        if answered {
            // Its reply is on its way: no client to unblock (see `being_answered`).
            let none = api::create_string(std::ptr::null_mut(), b"0");
            rm!(RedisModule_CommandFilterArgReplace)(fctx, 2, none);
        }
    }
    let class = m.table().classify(name, sub);
    let reroute = match class {
        // A write called by a read-only script a node serves at once (lease and stale
        // modes): Redis refuses it with its own error, as on a single Redis (rerouted, it
        // would be refused as RAFT, which scripts may not call). Scripts that may write
        // run only on the apply path, which this filter does not see (NOSELF).
        Class::Write => !super::busy::script_running(ctx),
        Class::Refused(_) => true,
        // Run natively only when no check is needed (stale mode); otherwise RAFT confirms
        // the read index first, or redirects.
        // Also when some client is in MULTI (it might be the sender: its read is queued), and
        // for an EVAL_RO of a new script (logged: scripts.rs).
        Class::Read => {
            !m.node().is_some_and(|n| m.serves_reads_locally(n))
                || super::multi::any_in_multi()
                || (argc > 1 && super::scripts::logs_read(name, sub))
        }
        Class::Transaction => true,
        // Redis 7.0 does not tell a filter which client sent the command: while any client is
        // in MULTI, node-local commands go to RAFT, which queues them for that client.
        Class::Local | Class::Container => super::multi::route_local(name, sub),
    };
    // CLUSTER and INFO are answered by redis-raft (commands/cluster.rs).
    let prefix: &[u8] = if name.eq_ignore_ascii_case(b"cluster") {
        b"RAFT._CLUSTER"
    } else if name.eq_ignore_ascii_case(b"info") {
        b"RAFT._INFO"
    } else if reroute && class == Class::Read && has_acl_categories() {
        b"RAFT._READ"
    } else if reroute {
        b"RAFT"
    } else {
        if matches!(class, Class::Read | Class::Local) {
            answer_by_book(fctx, m.table(), argc);
        }
        return;
    };
    let s = api::create_string(std::ptr::null_mut(), prefix);
    rm!(RedisModule_CommandFilterArgInsert)(fctx, 0, s);
}

/// Whether the server lets a module give its commands ACL categories (Redis 7.2+): then
/// reads are routed to RAFT._READ (@read) and writes to RAFT (@write).
fn has_acl_categories() -> bool {
    unsafe { api::raw::RedisModule_SetCommandACLCategories }.is_some()
}

/// A read or SCRIPT EXISTS that Redis runs at once: a script the book lacks is answered for
/// as the log's EVALSHA entries answer (redis/scripts.rs: `sha_args`, `book_lacks`).
unsafe fn answer_by_book(
    fctx: *mut raw::RedisModuleCommandFilterCtx,
    table: &super::classify::CommandTable,
    argc: c_int,
) {
    let arg = |i: usize| api::str_bytes(rm!(RedisModule_CommandFilterArgGet)(fctx, i as c_int));
    // Computed before any argument is replaced (which frees the one it replaces).
    for i in super::scripts::sha_args(table, argc as usize, arg) {
        if super::scripts::book_lacks(arg(i)) {
            let none = api::create_string(std::ptr::null_mut(), super::scripts::UNKNOWN_SHA);
            rm!(RedisModule_CommandFilterArgReplace)(fctx, i as c_int, none);
        }
    }
}
