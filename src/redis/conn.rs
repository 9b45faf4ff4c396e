//! What the main thread does for a client's connection itself, shared by the command
//! handlers (commands/conn.rs: WAIT, CLIENT ID / GETNAME / SETNAME, ...) and the apply path
//! (mod.rs: EXEC's queued CLIENT ops, releasing WAIT's blocked handles before Redis sleeps).

use std::ffi::c_int;

use super::api::{self, guard, rm, RedisModuleCtx, RedisModuleString};
use super::MainThread;

/// CLIENT subcommands redis-raft runs on the client itself.
const CLIENT_OPS: &[&str] = &["id", "getname", "setname"];

pub fn eq(a: &[u8], b: &str) -> bool {
    a.eq_ignore_ascii_case(b.as_bytes())
}

/// Whether `name [sub]` is one of the commands commands/conn.rs handles (the filter may route
/// it).
pub fn routable(name: &[u8], sub: Option<&[u8]>) -> bool {
    if eq(name, "client") {
        return sub.is_some_and(|s| CLIENT_OPS.iter().any(|c| eq(s, c)));
    }
    [
        "wait",
        "acl",
        "debug",
        "module",
        "readonly",
        "readwrite",
        "asking",
        "shutdown",
    ]
    .iter()
    .any(|c| eq(name, c))
}

/// CLIENT ID / GETNAME / SETNAME.
pub fn is_client_op(argv: &[Vec<u8>]) -> bool {
    argv.len() >= 2 && eq(&argv[0], "client") && CLIENT_OPS.iter().any(|c| eq(&argv[1], c))
}

/// Runs CLIENT ID / GETNAME / SETNAME (arity already checked) for `ctx`'s client.
pub fn run_client_op(ctx: *mut RedisModuleCtx, argv: &[Vec<u8>]) -> c_int {
    let id = unsafe { rm!(RedisModule_GetClientId)(ctx) };
    if eq(&argv[1], "id") {
        return api::reply_int(ctx, id as i64);
    }
    if eq(&argv[1], "getname") {
        let name = unsafe { rm!(RedisModule_GetClientNameById)(ctx, id) };
        if name.is_null() {
            return unsafe { rm!(RedisModule_ReplyWithNull)(ctx) };
        }
        let rc = api::reply_bulk(ctx, unsafe { api::str_bytes(name) });
        unsafe { rm!(RedisModule_FreeString)(ctx, name) };
        return rc;
    }
    let Some(name) = argv.get(2) else {
        return api::reply_error(
            ctx,
            "ERR wrong number of arguments for 'client|setname' command",
        );
    };
    let s = api::create_string(ctx, name);
    let r = unsafe { rm!(RedisModule_SetClientNameById)(id, s) };
    unsafe { rm!(RedisModule_FreeString)(ctx, s) };
    if r != api::OK {
        return api::reply_error(
            ctx,
            "ERR Client names cannot contain spaces, newlines or special characters.",
        );
    }
    api::reply_simple(ctx, "OK")
}

/// WAIT handles whose client timed out or went away: released before Redis sleeps (Redis
/// wants every blocked handle released once, and not from inside its own callbacks).
static WAIT_DONE: MainThread<Vec<usize>> = MainThread::new_lazy();

pub fn release_waits() {
    for bc in std::mem::take(WAIT_DONE.get_mut()) {
        unsafe {
            rm!(RedisModule_UnblockClient)(
                bc as *mut api::RedisModuleBlockedClient,
                std::ptr::null_mut(),
            )
        };
    }
}

pub extern "C" fn wait_reply(
    ctx: *mut RedisModuleCtx,
    _argv: *mut *mut RedisModuleString,
    _argc: c_int,
) -> c_int {
    // Only reached when a released handle's client is still there: it was answered already.
    let _ = ctx;
    api::OK
}

pub extern "C" fn wait_timeout(
    ctx: *mut RedisModuleCtx,
    _argv: *mut *mut RedisModuleString,
    _argc: c_int,
) -> c_int {
    guard(
        "WAIT timeout",
        || api::OK,
        || {
            let bc = unsafe { rm!(RedisModule_GetBlockedClientHandle)(ctx) };
            WAIT_DONE.get_mut().push(bc as usize);
            // No Redis replica ever acknowledges on a redis-raft node.
            api::reply_int(ctx, 0)
        },
    )
}

pub extern "C" fn wait_disconnect(
    _ctx: *mut RedisModuleCtx,
    bc: *mut api::RedisModuleBlockedClient,
) {
    guard(
        "WAIT disconnect",
        || (),
        || WAIT_DONE.get_mut().push(bc as usize),
    );
}
