//! `RAFT.DEBUG SNAPSHOT SAVE|LOAD <path>` and `RAFT.DEBUG SNAPSHOT ABORT`: node-local
//! snapshot save and load, for tests and diagnosis. Not replicated: they act on this node's
//! dataset only.

use std::ffi::{c_int, c_long, c_void};
use std::path::Path;

use crate::redis::api::{self, guard, rm, RedisModuleBlockedClient, RedisModuleCtx};
use crate::redis::module;
use crate::snapshot::format::SnapshotHeader;
use crate::snapshot::{load, save};

/// What the blocked client is told.
enum DebugReply {
    /// A flat array of field names and integers.
    Fields(Vec<(&'static str, i64)>),
    Int(i64),
    Error(String),
}

pub fn debug(ctx: *mut RedisModuleCtx, args: &[&[u8]]) -> c_int {
    let sub = args.first().map(|s| s.to_ascii_uppercase());
    if sub.as_deref() == Some(b"ABORT") && args.len() == 1 {
        // Stops a running save and a running load; replies how many were stopped.
        let n = i64::from(save::abort_save()) + i64::from(load::abort_load());
        return api::reply_int(ctx, n);
    }
    let path = match args {
        [_, p] => Path::new(std::str::from_utf8(p).unwrap_or("")).to_path_buf(),
        _ => {
            return api::reply_error(
                ctx,
                "ERR wrong number of arguments for 'raft.debug snapshot': RAFT.DEBUG SNAPSHOT SAVE|LOAD <path> or ABORT",
            )
        }
    };
    if path.as_os_str().is_empty() {
        return api::reply_error(ctx, "ERR the snapshot path must be a non-empty UTF-8 path");
    }
    match sub.as_deref() {
        Some(b"SAVE") => save_cmd(ctx, &path),
        Some(b"LOAD") => load_cmd(ctx, &path),
        _ => api::reply_error(ctx, "ERR RAFT.DEBUG SNAPSHOT supports SAVE, LOAD and ABORT"),
    }
}

fn block(ctx: *mut RedisModuleCtx) -> Option<*mut RedisModuleBlockedClient> {
    let bc = unsafe { rm!(RedisModule_BlockClient)(ctx, Some(reply_cb), None, Some(free_cb), 0) };
    (!bc.is_null()).then_some(bc)
}

fn unblock(bc: *mut RedisModuleBlockedClient, reply: DebugReply) {
    let p = Box::into_raw(Box::new(reply));
    unsafe { rm!(RedisModule_UnblockClient)(bc, p as *mut c_void) };
}

/// The header a debug save writes: this node's applied index and current term, no metadata.
fn debug_header() -> SnapshotHeader {
    let node = module().and_then(|m| m.node());
    SnapshotHeader {
        index: node.map(|n| n.shared().applied()).unwrap_or(0),
        term: node.map(|n| n.shared().status().term).unwrap_or(0),
        meta: Vec::new(),
    }
}

fn save_cmd(ctx: *mut RedisModuleCtx, path: &Path) -> c_int {
    let Some(bc) = block(ctx) else {
        return api::reply_error(ctx, "ERR could not block the client");
    };
    let bcu = bc as usize;
    let on_done: save::SaveDone = Box::new(move |r| {
        let reply = match r {
            Ok(o) => DebugReply::Fields(vec![("keys", o.keys as i64), ("bytes", o.bytes as i64)]),
            Err(e) => DebugReply::Error(format!("ERR {e}")),
        };
        unblock(bcu as *mut RedisModuleBlockedClient, reply);
    });
    if let Err(e) = save::start_save(ctx, path, debug_header(), on_done) {
        unblock(bc, DebugReply::Error(format!("ERR {e}")));
    }
    api::OK
}

fn load_cmd(ctx: *mut RedisModuleCtx, path: &Path) -> c_int {
    let Some(bc) = block(ctx) else {
        return api::reply_error(ctx, "ERR could not block the client");
    };
    let bcu = bc as usize;
    let on_done: load::LoadDone = Box::new(move |r| {
        let reply = match r {
            Ok(o) => DebugReply::Int(o.keys as i64),
            Err(e) => DebugReply::Error(format!("ERR {e}")),
        };
        unblock(bcu as *mut RedisModuleBlockedClient, reply);
    });
    let r = load::start_load(
        ctx,
        path,
        load::LoadOptions::default(),
        Box::new(|_| {}),
        on_done,
    );
    if let Err(e) = r {
        unblock(bc, DebugReply::Error(format!("ERR {e}")));
    }
    api::OK
}

extern "C" fn reply_cb(
    ctx: *mut RedisModuleCtx,
    _argv: *mut *mut api::RedisModuleString,
    _argc: c_int,
) -> c_int {
    guard(
        "RAFT.DEBUG SNAPSHOT reply",
        || api::reply_error(ctx, "ERR internal error"),
        || {
            let p =
                unsafe { rm!(RedisModule_GetBlockedClientPrivateData)(ctx) } as *const DebugReply;
            if p.is_null() {
                return api::reply_error(ctx, "ERR internal error: no reply");
            }
            match unsafe { &*p } {
                DebugReply::Fields(fields) => {
                    unsafe { rm!(RedisModule_ReplyWithArray)(ctx, (fields.len() * 2) as c_long) };
                    for (name, v) in fields {
                        api::reply_bulk(ctx, name.as_bytes());
                        api::reply_int(ctx, *v);
                    }
                    api::OK
                }
                DebugReply::Int(n) => api::reply_int(ctx, *n),
                DebugReply::Error(e) => api::reply_error(ctx, e),
            }
        },
    )
}

extern "C" fn free_cb(_ctx: *mut RedisModuleCtx, p: *mut c_void) {
    if !p.is_null() {
        drop(unsafe { Box::from_raw(p as *mut DebugReply) });
    }
}
