//! MULTI / EXEC / DISCARD: redis-raft queues a client's transaction itself and, at EXEC,
//! replicates it as ONE log entry that every node applies atomically (the apply path runs
//! its commands back to back on the main thread, so nothing interleaves).
//!
//! Node-local commands (PING, ECHO, CONFIG ...) are queued too: Redis 7.0's command filter
//! cannot tell which client sent a command, so while any client is in MULTI the filter routes
//! every node-local command here; for clients not in MULTI they simply run. SELECT is
//! queued as in Redis: later commands carry its database, and EXEC's reply selects it.
//! In the EXEC entry they run only on the node that took the transaction, so they stay
//! node-local. Commands Redis refuses inside MULTI (`no_multi`: SHUTDOWN, SAVE ...) are
//! refused with Redis's error, and abort the transaction as in Redis.
//!
//! The per-client queues, and the connection commands that run at once meanwhile, are in
//! redis/multi.rs (the filter and the apply path use them too).

use std::ffi::c_int;

use crate::codec::LogCommand;
use crate::redis::api::{self, rm, RedisModuleCtx};
use crate::redis::classify::Class;
use crate::redis::multi::{fail, forget, Queued, IN_MULTI};
use crate::redis::{admit, leader_rewrite, propose_then_select, redirect_error, watch, Module};

fn client_id(ctx: *mut RedisModuleCtx) -> u64 {
    unsafe { rm!(RedisModule_GetClientId)(ctx) }
}

/// The key's expiry (absolute unix ms) in the client's database; -1 when it has none or
/// does not exist (an expired key does not exist).
fn expire_time(ctx: *mut RedisModuleCtx, key: &[u8]) -> i64 {
    match api::call_value(ctx, &[b"PEXPIRETIME".to_vec(), key.to_vec()]) {
        api::Value::Int(t) if t >= 0 => t,
        api::Value::Int(watch::MISSING) => watch::MISSING,
        _ => -1,
    }
}

/// MULTI, EXEC, DISCARD, WATCH or UNWATCH outside a transaction.
pub fn begin_or_misplaced(ctx: *mut RedisModuleCtx, m: &Module, cmd: &[Vec<u8>]) -> c_int {
    match cmd[0].to_ascii_lowercase().as_slice() {
        b"multi" => {
            IN_MULTI.get_mut().insert(client_id(ctx), Queued::default());
            api::reply_simple(ctx, "OK")
        }
        b"watch" if cmd.len() < 2 => {
            api::reply_error(ctx, "ERR wrong number of arguments for 'watch' command")
        }
        b"watch" => {
            // WATCH is decided by the leader's log: it must be sent where EXEC will go.
            let Some(node) = m.node().filter(|n| n.shared().is_leader()) else {
                return api::reply_error(ctx, &redirect_error(m));
            };
            let db = unsafe { rm!(RedisModule_GetSelectedDb)(ctx) };
            let keys: Vec<(&[u8], i64)> = cmd[1..]
                .iter()
                .map(|k| (k.as_slice(), expire_time(ctx, k)))
                .collect();
            watch::watch(client_id(ctx), db, &keys, node.shared().applied());
            api::reply_simple(ctx, "OK")
        }
        b"unwatch" => {
            watch::unwatch(client_id(ctx));
            api::reply_simple(ctx, "OK")
        }
        b"exec" => api::reply_error(ctx, "ERR EXEC without MULTI"),
        _ => api::reply_error(ctx, "ERR DISCARD without MULTI"),
    }
}

/// A command from a client inside MULTI: queue it, or finish the transaction.
pub fn handle(ctx: *mut RedisModuleCtx, m: &Module, cmd: Vec<Vec<u8>>, class: Class) -> c_int {
    let id = client_id(ctx);
    let name = cmd[0].to_ascii_lowercase();
    match (class, name.as_slice()) {
        // Servers that flag them no-multi (Valkey 8) refuse them and abort, as for SAVE.
        (Class::Transaction, b"multi" | b"watch") if m.table().no_multi(&cmd) => {
            fail(id);
            api::reply_error(ctx, NO_MULTI)
        }
        // Neither aborts the transaction, as in Redis 7.
        (Class::Transaction, b"multi") => {
            api::reply_error(ctx, "ERR MULTI calls can not be nested")
        }
        (Class::Transaction, b"discard") => {
            forget(id);
            watch::unwatch(id);
            api::reply_simple(ctx, "OK")
        }
        (Class::Transaction, b"watch") => {
            api::reply_error(ctx, "ERR WATCH inside MULTI is not allowed")
        }
        // Queued by Redis, and a no-op at EXEC (which unwatches anyway).
        (Class::Transaction, b"unwatch") => api::reply_simple(ctx, "QUEUED"),
        (Class::Transaction, _) => exec(ctx, m, id),
        (Class::Refused(why), _) => {
            fail(id);
            // Redis's own checks come first, in its order.
            let table = m.table();
            if let Err(e) = table.check_syntax(&cmd) {
                return api::reply_error(ctx, &e);
            }
            if table.no_multi(&cmd) {
                return api::reply_error(ctx, NO_MULTI);
            }
            api::reply_error(ctx, &format!("ERR {why}"))
        }

        _ => {
            // Redis's checks, in its order.
            let checked = m
                .table()
                .check_syntax(&cmd)
                .and_then(|()| {
                    super::conn::protected_refusal(ctx, m.table(), &cmd).map_or(Ok(()), Err)
                })
                .and_then(|()| {
                    if m.table().no_multi(&cmd) {
                        Err(NO_MULTI.to_string())
                    } else {
                        Ok(())
                    }
                })
                .and_then(|()| admit(ctx, m, &cmd));
            if let Err(e) = checked {
                fail(id);
                return api::reply_error(ctx, &e);
            }
            let cmd = super::conn::queued_form(ctx, cmd);
            let Some(q) = IN_MULTI.get_mut().get_mut(&id) else {
                return api::reply_error(ctx, "ERR EXEC without MULTI");
            };
            let mut db =
                q.db.unwrap_or_else(|| unsafe { rm!(RedisModule_GetSelectedDb)(ctx) });
            if name == b"select" {
                // Later commands run in the new database; a bad index fails at EXEC.
                db = parse_db(&cmd[1]).unwrap_or(-1);
                q.db = Some(db);
            }
            q.cmds.push((db, cmd));
            api::reply_simple(ctx, "QUEUED")
        }
    }
}

/// Redis's reply to a `no_multi` command inside MULTI.
const NO_MULTI: &str = "ERR Command not allowed inside a transaction";

fn parse_db(a: &[u8]) -> Option<i32> {
    std::str::from_utf8(a)
        .ok()?
        .parse::<i32>()
        .ok()
        .filter(|d| *d >= 0)
}

/// SELECT routed to RAFT while some client is in MULTI, from a client that is not: it must
/// still select the database for this client, which RM_Call cannot.
pub fn select_now(ctx: *mut RedisModuleCtx, cmd: &[Vec<u8>]) -> c_int {
    if cmd.len() != 2 {
        return api::reply_error(ctx, "ERR wrong number of arguments for 'select' command");
    }
    let Some(db) = parse_db(&cmd[1]) else {
        return api::reply_error(ctx, "ERR value is not an integer or out of range");
    };
    if unsafe { rm!(RedisModule_SelectDb)(ctx, db) } != api::OK {
        return api::reply_error(ctx, "ERR DB index is out of range");
    }
    api::reply_simple(ctx, "OK")
}

fn exec(ctx: *mut RedisModuleCtx, m: &Module, id: u64) -> c_int {
    let Some(q) = IN_MULTI.get_mut().remove(&id) else {
        return api::reply_error(ctx, "ERR EXEC without MULTI");
    };
    let watched = watch::take(id);
    if q.failed {
        return api::reply_error(
            ctx,
            "EXECABORT Transaction discarded because of previous errors.",
        );
    }
    if let Some(c) = q.ran_at_once {
        return api::reply_error(
            ctx,
            &format!("EXECABORT Transaction discarded because {c} ran at once inside MULTI: redis-raft cannot queue commands that act on the connection (Redis 7.0 does not tell a module which client sent a command)"),
        );
    }
    if q.cmds.is_empty() && watched.is_empty() {
        return unsafe { rm!(RedisModule_ReplyWithArray)(ctx, 0) };
    }
    let Some(node) = m.node() else {
        return api::reply_error(ctx, &redirect_error(m));
    };
    if !node.shared().is_leader() {
        return api::reply_error(ctx, &redirect_error(m));
    }
    let cmds = q
        .cmds
        .into_iter()
        .map(|(db, argv)| (db, leader_rewrite(argv)))
        .collect();
    // Without expiries (or missing keys) to check, the older entry kind: nodes of the
    // previous version in the same cluster (a rolling upgrade) still apply it.
    let entry = if watched.iter().all(|w| w.3 == -1) {
        LogCommand::Multi {
            cmds,
            watch: watched.into_iter().map(|(d, k, i, _)| (d, k, i)).collect(),
        }
    } else {
        LogCommand::Transaction {
            cmds,
            watch: watched,
            now_ms: crate::redis::streams::now_ms(),
        }
    };
    propose_then_select(ctx, m, node, entry, q.db)
}
