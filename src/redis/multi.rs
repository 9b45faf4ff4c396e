//! The clients inside MULTI (their queued transactions: commands/multi.rs queues and runs
//! them), as the filter and the apply path need them too.
//!
//! Commands that act on the connection itself (`CONN_STATE`: AUTH, HELLO, SUBSCRIBE, CLIENT
//! ...) cannot be routed to RAFT (an RM_Call would act on the module's own client, and the
//! filter cannot tell whether their sender is in MULTI), so they run at once; but those
//! redis-raft can run for a client itself (commands/conn.rs: CLIENT ID/GETNAME/SETNAME, ACL,
//! WAIT, DEBUG, MODULE ...) are routed and queued as Redis queues them. Afterwards the
//! client's last command (CLIENT LIST's `cmd=`, read before that client's next command gets
//! to the filter) shows which client in MULTI ran one: RESET ends its transaction, as in
//! Redis; an unknown subcommand (`cmd=NULL`) aborts it, as in Redis; any other makes EXEC
//! refuse the transaction with an error naming it, since Redis would have queued it.

use std::collections::HashMap;

use super::api::{self, RedisModuleCtx};
use super::{watch, MainThread};

/// A transaction being queued by one client.
#[derive(Default)]
pub struct Queued {
    pub cmds: Vec<(i32, Vec<Vec<u8>>)>,
    /// The database a queued SELECT switched to: later commands run there.
    pub db: Option<i32>,
    /// A command was refused at queue time: EXEC answers EXECABORT.
    pub failed: bool,
    /// A connection command that ran at once while the client was in MULTI.
    pub ran_at_once: Option<String>,
}

/// A connection command passed the filter while some client was in MULTI: the clients in
/// MULTI are checked before the next command gets to the filter, or before Redis sleeps.
static CHECK_PENDING: MainThread<bool> = MainThread::new_lazy();

/// Whether `check_connection_commands` has anything to do (cheap: asked on every command).
pub fn check_pending() -> bool {
    *CHECK_PENDING.get_mut()
}

/// Clients inside MULTI, by client id.
pub static IN_MULTI: MainThread<HashMap<u64, Queued>> = MainThread::new_lazy();

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

/// Whether some client is in MULTI (then the filter routes reads a node would serve at once
/// to RAFT, which queues them for a client in MULTI).
pub fn any_in_multi() -> bool {
    !IN_MULTI.get_mut().is_empty()
}

/// Whether the filter must route node-local command `name [sub]` to RAFT: only while some
/// client is in MULTI (it might be the sender), and never for connection-state commands
/// (but those redis-raft can run for a client itself: conn.rs).
pub fn route_local(name: &[u8], sub: Option<&[u8]>) -> bool {
    let ours = name.len() >= 4 && name[..4].eq_ignore_ascii_case(b"raft");
    if !any_in_multi() || ours {
        return false;
    }
    if super::conn::routable(name, sub) {
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

pub fn fail(id: u64) {
    if let Some(q) = IN_MULTI.get_mut().get_mut(&id) {
        q.failed = true;
    }
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
