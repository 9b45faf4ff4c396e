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
//! Commands that act on the connection itself (`CONN_STATE`: AUTH, HELLO, SUBSCRIBE, CLIENT
//! ...) cannot be routed here (an RM_Call would act on the module's own client, and the
//! filter cannot tell whether their sender is in MULTI), so they run at once; but those
//! redis-raft can run for a client itself (conn.rs: CLIENT ID/GETNAME/SETNAME, ACL, WAIT,
//! DEBUG, MODULE ...) are routed and queued as Redis queues them. Afterwards the
//! client's last command (CLIENT LIST's `cmd=`, read before that client's next command gets
//! to the filter) shows which client in MULTI ran one: RESET ends its transaction, as in
//! Redis; an unknown subcommand (`cmd=NULL`) aborts it, as in Redis; any other makes EXEC
//! refuse the transaction with an error naming it, since Redis would have queued it.

use std::collections::HashMap;
use std::ffi::c_int;

use crate::codec::LogCommand;
use crate::redis::api::{self, rm, RedisModuleCtx};
use crate::redis::classify::Class;
use crate::redis::{
    admit, leader_rewrite, propose_then_select, redirect_error, watch, MainThread, Module,
};

/// A transaction being queued by one client.
#[derive(Default)]
struct Queued {
    cmds: Vec<(i32, Vec<Vec<u8>>)>,
    /// The database a queued SELECT switched to: later commands run there.
    db: Option<i32>,
    /// A command was refused at queue time: EXEC answers EXECABORT.
    failed: bool,
    /// A connection command that ran at once while the client was in MULTI.
    ran_at_once: Option<String>,
}

/// A connection command passed the filter while some client was in MULTI: the clients in
/// MULTI are checked before the next command gets to the filter, or before Redis sleeps.
static CHECK_PENDING: MainThread<bool> = MainThread::new_lazy();

/// Whether `check_connection_commands` has anything to do (cheap: asked on every command).
pub fn check_pending() -> bool {
    *CHECK_PENDING.get_mut()
}

/// Clients inside MULTI, by client id.
static IN_MULTI: MainThread<HashMap<u64, Queued>> = MainThread::new_lazy();

/// Node-local commands that act on the client's connection: never routed through RAFT (an
/// RM_Call would act on the module's own client), so they run at once even inside MULTI.
const CONN_STATE: &[&str] = &[
    "auth",
    "hello",
    "client",
    "reset",
    "quit",
    "subscribe",
    "psubscribe",
    "ssubscribe",
    "unsubscribe",
    "punsubscribe",
    "sunsubscribe",
    "monitor",
];

pub fn in_multi(client_id: u64) -> bool {
    IN_MULTI.get_mut().contains_key(&client_id)
}

/// Whether the filter must route node-local command `name [sub]` to RAFT: only while some
/// client is in MULTI (it might be the sender), and never for connection-state commands
/// (but those redis-raft can run for a client itself: conn.rs).
pub fn route_local(name: &[u8], sub: Option<&[u8]>) -> bool {
    let ours = name.len() >= 4 && name[..4].eq_ignore_ascii_case(b"raft");
    if IN_MULTI.get_mut().is_empty() || ours {
        return false;
    }
    if crate::redis::conn::routable(name, sub) {
        return true;
    }
    if is_connection(name) {
        *CHECK_PENDING.get_mut() = true;
        return false;
    }
    true
}

fn is_connection(name: &[u8]) -> bool {
    CONN_STATE
        .iter()
        .any(|c| name.eq_ignore_ascii_case(c.as_bytes()))
}

/// Finds the clients in MULTI that ran a connection command at once since the last check
/// (see the module doc). `ctx` is any context of this module; only CLIENT LIST is called.
pub fn check_connection_commands(ctx: *mut RedisModuleCtx) {
    if !std::mem::take(CHECK_PENDING.get_mut()) || IN_MULTI.get_mut().is_empty() {
        return;
    }
    let mut argv = vec![b"CLIENT".to_vec(), b"LIST".to_vec(), b"ID".to_vec()];
    argv.extend(
        IN_MULTI
            .get_mut()
            .keys()
            .map(|id| id.to_string().into_bytes()),
    );
    let r = api::call(ctx, &argv, api::CallOpts::default());
    let list = api::call_reply_value(r);
    api::free_call_reply(r);
    let api::Value::Str(list) = list else { return };
    for (id, cmd) in last_commands(&String::from_utf8_lossy(&list)) {
        let cmd = cmd.as_str();
        let base = cmd.split('|').next().unwrap_or(cmd);
        if cmd == "reset" {
            // RESET discards the transaction and unwatches, as in Redis.
            forget(id);
            watch::unwatch(id);
        } else if cmd == "NULL" {
            // An unknown subcommand of a connection command: Redis refuses it at queue time.
            fail(id);
        } else if is_connection(base.as_bytes()) {
            if let Some(q) = IN_MULTI.get_mut().get_mut(&id) {
                q.ran_at_once
                    .get_or_insert_with(|| base.to_ascii_uppercase());
            }
        }
    }
}

/// The client disconnected: forget its transaction.
pub fn forget(client_id: u64) {
    IN_MULTI.get_mut().remove(&client_id);
}

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

/// Each client's id and last command (`cmd=`) in CLIENT LIST's text.
fn last_commands(list: &str) -> Vec<(u64, String)> {
    list.lines()
        .filter_map(|line| {
            let field = |k: &str| {
                line.split(' ')
                    .find_map(|f| f.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            };
            Some((field("id")?.parse().ok()?, field("cmd")?.to_string()))
        })
        .collect()
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

fn fail(id: u64) {
    if let Some(q) = IN_MULTI.get_mut().get_mut(&id) {
        q.failed = true;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_list_gives_each_clients_last_command() {
        let list = "id=7 addr=127.0.0.1:5000 fd=8 name= age=3 idle=0 flags=N db=0 multi=-1 argv-mem=0 cmd=client|setname user=default resp=2\n\
                    id=9 addr=127.0.0.1:5001 idle=4 cmd=raft user=default\n";
        assert_eq!(
            last_commands(list),
            vec![(7, "client|setname".to_string()), (9, "raft".to_string())]
        );
    }
}
