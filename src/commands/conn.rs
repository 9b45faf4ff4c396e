//! Node-local commands about the server or the connection that redis-raft can queue inside
//! MULTI as Redis does, because it can also run them for a client itself: WAIT, ACL, DEBUG,
//! MODULE, READONLY/READWRITE/ASKING, and CLIENT ID / GETNAME / SETNAME. While some client
//! is in MULTI the filter routes every node-local command to RAFT (it cannot tell who sent
//! it), so for a client not in MULTI each of these must still give Redis's own answer:
//! - WAIT never reaches RM_Call with a count to wait for (Redis would block the module's own
//!   client): the acknowledged count comes from `WAIT 0 0`, and a client not in MULTI that
//!   wants more waits for its timeout with a blocked client, as with Redis; inside MULTI,
//!   Redis answers at once, and so does the queued `WAIT 0 0`.
//! - ACL WHOAMI names the client's user (an RM_Call would name the module's client); inside
//!   MULTI it is queued as ECHO of that name, which replies the same.
//! - DEBUG and MODULE: RM_Call skips Redis's `enable-debug-command` / `enable-module-command`
//!   check, so it is made here first, with Redis's message.
//! - CLIENT ID / GETNAME / SETNAME act on the client through the module API; inside MULTI
//!   they run when EXEC's reply is sent, in order, on the client that sent EXEC.
//! - SHUTDOWN from a client not in MULTI runs with NOW (an RM_Call cannot wait for replicas,
//!   and a redis-raft node has none).

use std::ffi::{c_char, c_int, c_void};

use crate::redis::api::{self, rm, CallOpts, RedisModuleCtx, Value};
use crate::redis::classify::CommandTable;
use crate::redis::conn::{
    eq, is_client_op, run_client_op, wait_disconnect, wait_reply, wait_timeout,
};
use crate::redis::streams::string2ll;

/// Redis's refusal of a `protected` command (DEBUG, MODULE LOAD ...) for this client under
/// `enable-debug-command` / `enable-module-command` (no, yes, or local: unix socket or
/// loopback only).
pub fn protected_refusal(
    ctx: *mut RedisModuleCtx,
    table: &CommandTable,
    argv: &[Vec<u8>],
) -> Option<String> {
    if !table.protected(argv) {
        return None;
    }
    let (what, option) = if eq(&argv[0], "debug") {
        ("DEBUG", "enable-debug-command")
    } else if eq(&argv[0], "module") {
        ("MODULE", "enable-module-command")
    } else {
        return None;
    };
    let r = api::call(
        ctx,
        &[
            b"CONFIG".to_vec(),
            b"GET".to_vec(),
            option.as_bytes().to_vec(),
        ],
        CallOpts::default(),
    );
    let v = api::call_reply_value(r);
    api::free_call_reply(r);
    let setting = match v {
        Value::Array(a) => match a.get(1) {
            Some(Value::Str(s)) => String::from_utf8_lossy(s).to_ascii_lowercase(),
            _ => String::new(),
        },
        _ => String::new(),
    };
    let allowed = setting == "yes" || (setting == "local" && is_local(ctx));
    (!allowed).then(|| {
        format!("ERR {what} command not allowed. If the {option} option is set to \"local\", you can run it from a local connection, otherwise you need to set this option in the configuration file, and then restart the server.")
    })
}

#[repr(C)]
struct ClientInfo {
    version: u64,
    flags: u64,
    id: u64,
    addr: [c_char; 46],
    port: u16,
    db: u16,
}

/// Redis's `islocalClient`: a unix socket, or a TCP peer at 127.0.0.1 or ::1.
fn is_local(ctx: *mut RedisModuleCtx) -> bool {
    let id = unsafe { rm!(RedisModule_GetClientId)(ctx) };
    let mut ci = ClientInfo {
        version: 1,
        flags: 0,
        id: 0,
        addr: [0; 46],
        port: 0,
        db: 0,
    };
    let r = unsafe {
        rm!(RedisModule_GetClientInfoById)(&mut ci as *mut ClientInfo as *mut c_void, id)
    };
    if r != api::OK {
        return false;
    }
    if ci.flags & u64::from(api::raw::REDISMODULE_CLIENTINFO_FLAG_UNIXSOCKET) != 0 {
        return true;
    }
    let addr: Vec<u8> = ci
        .addr
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    addr == b"127.0.0.1" || addr == b"::1"
}

/// How a command is queued inside MULTI: ACL WHOAMI becomes ECHO of the client's user;
/// a well-formed WAIT becomes WAIT 0 0 (inside MULTI Redis answers the acknowledged count at
/// once, and an RM_Call must never block).
pub fn queued_form(ctx: *mut RedisModuleCtx, cmd: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    if cmd.len() == 2 && eq(&cmd[0], "acl") && eq(&cmd[1], "whoami") {
        return vec![b"ECHO".to_vec(), current_user(ctx)];
    }
    if eq(&cmd[0], "wait") && wait_args(&cmd).is_some() {
        return vec![b"WAIT".to_vec(), b"0".to_vec(), b"0".to_vec()];
    }
    cmd
}

fn current_user(ctx: *mut RedisModuleCtx) -> Vec<u8> {
    let name = unsafe { rm!(RedisModule_GetCurrentUserName)(ctx) };
    if name.is_null() {
        return b"default".to_vec();
    }
    let v = unsafe { api::str_bytes(name) }.to_vec();
    unsafe { rm!(RedisModule_FreeString)(ctx, name) };
    v
}

/// One of these commands from a client not in MULTI (routed because another client is),
/// after Redis's checks (`protected_refusal` included): answers it as Redis would, or None
/// to run it with RM_Call as any node-local command.
pub fn run_now(ctx: *mut RedisModuleCtx, cmd: &[Vec<u8>]) -> Option<c_int> {
    if is_client_op(cmd) {
        return Some(run_client_op(ctx, cmd));
    }
    if cmd.len() == 2 && eq(&cmd[0], "acl") && eq(&cmd[1], "whoami") {
        return Some(api::reply_bulk(ctx, &current_user(ctx)));
    }
    if eq(&cmd[0], "shutdown") {
        let mut cmd = cmd.to_vec();
        if !cmd[1..].iter().any(|a| eq(a, "abort") || eq(a, "now")) {
            cmd.push(b"NOW".to_vec());
        }
        return Some(api::call_and_reply(ctx, &cmd));
    }
    if eq(&cmd[0], "wait") {
        return Some(wait(ctx, cmd));
    }
    None
}

/// WAIT's arguments when Redis would accept them: (numreplicas, timeout ms).
fn wait_args(cmd: &[Vec<u8>]) -> Option<(i64, i64)> {
    let n = string2ll(cmd.get(1)?)?;
    let t = string2ll(cmd.get(2)?)?;
    (t >= 0).then_some((n, t))
}

/// WAIT numreplicas timeout. It must never reach RM_Call as it is: Redis would block the
/// module's own client (and assert). Bad arguments go to Redis for its error; otherwise
/// `WAIT 0 0` gives the acknowledged count at once, and if that is too few the client waits
/// for the timeout (0: for ever), as with Redis, then gets it.
fn wait(ctx: *mut RedisModuleCtx, cmd: &[Vec<u8>]) -> c_int {
    let Some((wanted, timeout_ms)) = wait_args(cmd) else {
        return api::call_and_reply(ctx, cmd);
    };
    let now = [b"WAIT".to_vec(), b"0".to_vec(), b"0".to_vec()];
    let r = api::call(ctx, &now, CallOpts::default());
    let v = api::call_reply_value(r);
    match v {
        Value::Int(acked) if acked < wanted => {
            api::free_call_reply(r);
            let bc = unsafe {
                rm!(RedisModule_BlockClient)(
                    ctx,
                    Some(wait_reply),
                    Some(wait_timeout),
                    None,
                    timeout_ms,
                )
            };
            if bc.is_null() {
                return api::reply_error(ctx, "ERR could not block the client");
            }
            unsafe { rm!(RedisModule_SetDisconnectCallback)(bc, Some(wait_disconnect)) };
            api::OK
        }
        _ => {
            let rc = if r.is_null() {
                api::reply_error(ctx, "ERR the command could not be executed")
            } else {
                unsafe { rm!(RedisModule_ReplyWithCallReply)(ctx, r) }
            };
            api::free_call_reply(r);
            rc
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis::conn::routable;

    fn a(s: &[&str]) -> Vec<Vec<u8>> {
        s.iter().map(|x| x.as_bytes().to_vec()).collect()
    }

    #[test]
    fn which_commands_redis_raft_runs_for_a_client() {
        assert!(routable(b"CLIENT", Some(b"SetName")));
        assert!(routable(b"client", Some(b"id")));
        assert!(!routable(b"client", Some(b"reply")));
        assert!(!routable(b"client", None));
        assert!(routable(b"WAIT", None));
        assert!(routable(b"acl", Some(b"whoami")));
        assert!(!routable(b"hello", None));
        assert!(!routable(b"subscribe", None));
        assert!(is_client_op(&a(&["CLIENT", "GETNAME"])));
        assert!(!is_client_op(&a(&["CLIENT", "LIST"])));
        assert!(!is_client_op(&a(&["CLIENT"])));
    }

    #[test]
    fn wait_arguments_as_redis_parses_them() {
        assert_eq!(wait_args(&a(&["WAIT", "1", "200"])), Some((1, 200)));
        assert_eq!(wait_args(&a(&["WAIT", "-1", "0"])), Some((-1, 0)));
        assert_eq!(
            wait_args(&a(&["WAIT", "1", "-1"])),
            None,
            "negative timeout"
        );
        assert_eq!(wait_args(&a(&["WAIT", "x", "0"])), None);
        assert_eq!(wait_args(&a(&["WAIT", "1"])), None);
    }
}
