//! Thin wrappers over the Redis module API (raw FFI from the `redis-module` crate).
//!
//! Invariant: every `extern "C"` function Redis calls goes through `guard`, so a panic
//! becomes a log line (and an error reply where there is a client), never an abort.

use std::cell::UnsafeCell;
use std::ffi::{c_char, c_int, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

pub use redis_module::raw;
pub use redis_module::raw::{
    RedisModuleBlockedClient, RedisModuleCallReply, RedisModuleCtx, RedisModuleString,
};

pub const OK: c_int = raw::REDISMODULE_OK as c_int;
pub const ERR: c_int = raw::REDISMODULE_ERR as c_int;

/// A module API function pointer. All the ones we call exist in Redis 7.0 and are checked at
/// load (`missing_apis`), so a missing one here is a programming error.
macro_rules! rm {
    ($name:ident) => {{
        #[allow(unused_unsafe)]
        let f = unsafe { $crate::redis::api::raw::$name };
        match f {
            Some(f) => f,
            None => panic!(concat!(
                "Redis module API ",
                stringify!($name),
                " is missing"
            )),
        }
    }};
}
pub(crate) use rm;

/// A value only ever touched on Redis's main thread (command callbacks, filter, event-loop
/// callbacks, INFO). Redis runs those one at a time, so no lock is needed; callers keep the
/// `&mut` short and never hold it across a call back into Redis that could re-enter.
pub struct MainThread<T> {
    cell: UnsafeCell<Option<T>>,
}

// SAFETY: see the type's doc: only the main thread touches the value.
unsafe impl<T> Sync for MainThread<T> {}

impl<T: Default> MainThread<T> {
    pub const fn new_lazy() -> Self {
        MainThread {
            cell: UnsafeCell::new(None),
        }
    }

    #[allow(clippy::mut_from_ref)]
    pub fn get_mut(&self) -> &mut T {
        // SAFETY: main thread only, accesses not overlapping (see the type's doc).
        unsafe { (*self.cell.get()).get_or_insert_with(T::default) }
    }
}

/// The module API functions this module needs; returns those the server lacks.
pub fn missing_apis() -> Vec<&'static str> {
    let mut v = Vec::new();
    macro_rules! need {
        ($($name:ident),*) => {$(
            if unsafe { raw::$name }.is_none() { v.push(stringify!($name)); }
        )*};
    }
    need!(
        RedisModule_Call,
        RedisModule_BlockClient,
        RedisModule_UnblockClient,
        RedisModule_GetBlockedClientPrivateData,
        RedisModule_EventLoopAddOneShot,
        RedisModule_RegisterCommandFilter,
        RedisModule_CommandFilterArgsCount,
        RedisModule_CommandFilterArgGet,
        RedisModule_CommandFilterArgInsert,
        RedisModule_CommandFilterArgReplace,
        RedisModule_RegisterStringConfig,
        RedisModule_RegisterNumericConfig,
        RedisModule_RegisterBoolConfig,
        RedisModule_RegisterEnumConfig,
        RedisModule_LoadConfigs,
        RedisModule_RegisterInfoFunc,
        RedisModule_InfoAddSection,
        RedisModule_InfoAddFieldCString,
        RedisModule_InfoAddFieldULongLong,
        RedisModule_ReplyWithCallReply,
        RedisModule_GetDetachedThreadSafeContext,
        RedisModule_ResetDataset,
        RedisModule_DbSize,
        RedisModule_SelectDb,
        RedisModule_GetSelectedDb,
        RedisModule_GetContextFlags,
        RedisModule_CreateString,
        RedisModule_FreeString,
        RedisModule_StringPtrLen,
        RedisModule_CreateCommand,
        RedisModule_Log,
        RedisModule_ReplyWithError,
        RedisModule_ReplyWithSimpleString,
        RedisModule_ReplyWithStringBuffer,
        RedisModule_ReplyWithLongLong,
        RedisModule_ReplyWithArray,
        RedisModule_CallReplyType,
        RedisModule_CallReplyLength,
        RedisModule_CallReplyArrayElement,
        RedisModule_CallReplyStringPtr,
        RedisModule_FreeCallReply,
        RedisModule_SubscribeToServerEvent,
        RedisModule_GetClientId,
        RedisModule_GetCurrentUserName,
        RedisModule_GetModuleUserFromUserName,
        RedisModule_FreeModuleUser,
        RedisModule_ACLCheckCommandPermissions,
        RedisModule_GetUsedMemoryRatio,
        RedisModule_SubscribeToKeyspaceEvents,
        RedisModule_ReplyWithNullArray,
        RedisModule_CallReplyInteger,
        RedisModule_GetBlockedClientHandle,
        RedisModule_InfoAddFieldLongLong,
        RedisModule_ReplyWithNull,
        RedisModule_SetDisconnectCallback,
        // Snapshots (src/snapshot/).
        RedisModule_Fork,
        RedisModule_ExitFromChild,
        RedisModule_KillForkChild,
        RedisModule_Scan,
        RedisModule_ScanCursorCreate,
        RedisModule_ScanCursorDestroy,
        RedisModule_GetAbsExpire,
        RedisModule_CreateTimer,
        RedisModule_StopTimer,
        RedisModule_FreeThreadSafeContext,
        RedisModule_CallReplyMapElement,
        RedisModule_GetClientNameById,
        RedisModule_SetClientNameById,
        RedisModule_GetClientInfoById
    );
    v
}

/// Runs `f`, turning a panic into `on_panic`'s result and a warning in Redis's log.
pub fn guard<R>(what: &str, on_panic: impl FnOnce() -> R, f: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            log_raw("warning", &format!("internal error in {what}: {msg}"));
            on_panic()
        }
    }
}

/// Writes one line to Redis's log (any thread).
pub fn log_raw(level: &str, msg: &str) {
    let Some(log) = (unsafe { raw::RedisModule_Log }) else {
        return;
    };
    let level = CString::new(level).unwrap_or_default();
    let msg = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    unsafe {
        log(
            std::ptr::null_mut(),
            level.as_ptr(),
            c"<raft> %s".as_ptr(),
            msg.as_ptr(),
        )
    };
}

/// The bytes of a RedisModuleString (valid while `s` lives).
///
/// # Safety
/// `s` is null or a live RedisModuleString, and outlives the returned slice.
pub unsafe fn str_bytes<'a>(s: *const RedisModuleString) -> &'a [u8] {
    if s.is_null() {
        return &[];
    }
    let mut len = 0usize;
    let p = rm!(RedisModule_StringPtrLen)(s, &mut len);
    if p.is_null() {
        return &[];
    }
    std::slice::from_raw_parts(p as *const u8, len)
}

/// argv of a command callback as byte slices.
///
/// # Safety
/// `argv` holds `argc` live strings, as Redis passes to a command callback.
pub unsafe fn args<'a>(argv: *mut *mut RedisModuleString, argc: c_int) -> Vec<&'a [u8]> {
    (0..argc.max(0) as usize)
        .map(|i| str_bytes(*argv.add(i)))
        .collect()
}

/// argv of a command callback, copied.
///
/// # Safety
/// As for `args`.
pub unsafe fn owned_args(argv: *mut *mut RedisModuleString, argc: c_int) -> Vec<Vec<u8>> {
    args(argv, argc).iter().map(|a| a.to_vec()).collect()
}

pub fn create_string(ctx: *mut RedisModuleCtx, b: &[u8]) -> *mut RedisModuleString {
    unsafe { rm!(RedisModule_CreateString)(ctx, b.as_ptr() as *const c_char, b.len()) }
}

pub fn reply_error(ctx: *mut RedisModuleCtx, msg: &str) -> c_int {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    unsafe { rm!(RedisModule_ReplyWithError)(ctx, c.as_ptr()) }
}

pub fn reply_simple(ctx: *mut RedisModuleCtx, msg: &str) -> c_int {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    unsafe { rm!(RedisModule_ReplyWithSimpleString)(ctx, c.as_ptr()) }
}

pub fn reply_bulk(ctx: *mut RedisModuleCtx, b: &[u8]) -> c_int {
    unsafe { rm!(RedisModule_ReplyWithStringBuffer)(ctx, b.as_ptr() as *const c_char, b.len()) }
}

pub fn reply_int(ctx: *mut RedisModuleCtx, v: i64) -> c_int {
    unsafe { rm!(RedisModule_ReplyWithLongLong)(ctx, v) }
}

/// Flags for `call`.
#[derive(Clone, Copy, Default)]
pub struct CallOpts {
    /// Reply in RESP3 (the client that will get the reply speaks it).
    pub resp3: bool,
}

/// Executes a command through RM_Call on `ctx` (errors come back as error replies).
/// Returns null only when Redis could not even start the command.
pub fn call(
    ctx: *mut RedisModuleCtx,
    argv: &[Vec<u8>],
    opts: CallOpts,
) -> *mut RedisModuleCallReply {
    let Some((name, rest)) = argv.split_first() else {
        return std::ptr::null_mut();
    };
    // This runs for every applied entry on every node: the name and the arguments' handles
    // stay on the stack unless they are unusually long.
    let mut name_buf = [0u8; 64];
    let heap_name;
    let cname: &std::ffi::CStr = if name.len() < name_buf.len() {
        name_buf[..name.len()].copy_from_slice(name);
        match std::ffi::CStr::from_bytes_until_nul(&name_buf) {
            Ok(c) if c.to_bytes().len() == name.len() => c,
            _ => return std::ptr::null_mut(),
        }
    } else {
        let Ok(c) = CString::new(name.clone()) else {
            return std::ptr::null_mut();
        };
        heap_name = c;
        &heap_name
    };
    let mut few = [std::ptr::null_mut::<RedisModuleString>(); 16];
    let mut many = Vec::new();
    let strs: &mut [*mut RedisModuleString] = if rest.len() <= few.len() {
        &mut few[..rest.len()]
    } else {
        many.resize(rest.len(), std::ptr::null_mut());
        &mut many
    };
    for (s, a) in strs.iter_mut().zip(rest) {
        *s = create_string(ctx, a);
    }
    let fmt: &std::ffi::CStr = if opts.resp3 { c"vE3" } else { c"vE" };
    let reply = unsafe {
        rm!(RedisModule_Call)(
            ctx,
            cname.as_ptr(),
            fmt.as_ptr(),
            strs.as_mut_ptr(),
            strs.len(),
        )
    };
    for s in strs.iter() {
        unsafe { rm!(RedisModule_FreeString)(ctx, *s) };
    }
    reply
}

/// Runs `argv` on `ctx` and returns its reply decoded (for the module's own look-ups).
pub fn call_value(ctx: *mut RedisModuleCtx, argv: &[Vec<u8>]) -> Value {
    let r = call(ctx, argv, CallOpts::default());
    let v = call_reply_value(r);
    free_call_reply(r);
    v
}

/// Runs `argv` on `ctx`: its reply decoded, or the error it answered.
pub fn call_checked(ctx: *mut RedisModuleCtx, argv: &[Vec<u8>]) -> Result<Value, String> {
    let r = call(ctx, argv, CallOpts::default());
    if r.is_null() {
        return Err("the command could not be executed".into());
    }
    let t = unsafe { rm!(RedisModule_CallReplyType)(r) } as isize;
    let v = call_reply_value(r);
    free_call_reply(r);
    match v {
        Value::Str(s) if t == raw::REDISMODULE_REPLY_ERROR => {
            Err(String::from_utf8_lossy(&s).into_owned())
        }
        v => Ok(v),
    }
}

/// Runs `cmd` for the calling client (its protocol) and replies with what it returned.
pub fn call_and_reply(ctx: *mut RedisModuleCtx, cmd: &[Vec<u8>]) -> c_int {
    reply_with_call(ctx, call(ctx, cmd, client_opts(ctx)))
}

/// How to call a command whose reply goes to the client `ctx` serves (its protocol).
pub fn client_opts(ctx: *mut RedisModuleCtx) -> CallOpts {
    let flags = unsafe { rm!(RedisModule_GetContextFlags)(ctx) } as u32;
    CallOpts {
        resp3: flags & raw::REDISMODULE_CTX_FLAGS_RESP3 != 0,
    }
}

/// Replies with an RM_Call's reply (an error if there is none) and frees it.
pub fn reply_with_call(ctx: *mut RedisModuleCtx, r: *mut RedisModuleCallReply) -> c_int {
    if r.is_null() {
        return reply_error(ctx, "ERR the command could not be executed");
    }
    let rc = unsafe { rm!(RedisModule_ReplyWithCallReply)(ctx, r) };
    free_call_reply(r);
    rc
}

/// An RM_Call answered an error (or nothing at all).
pub fn reply_is_error(r: *mut RedisModuleCallReply) -> bool {
    r.is_null()
        || unsafe { rm!(RedisModule_CallReplyType)(r) } as isize == raw::REDISMODULE_REPLY_ERROR
}

/// An RM_Call answered an error that starts with `prefix` (its code, as NOSCRIPT).
pub fn reply_error_starts_with(r: *mut RedisModuleCallReply, prefix: &[u8]) -> bool {
    if r.is_null() || !reply_is_error(r) {
        return false;
    }
    let mut len = 0usize;
    let p = unsafe { rm!(RedisModule_CallReplyStringPtr)(r, &mut len) };
    !p.is_null()
        && len >= prefix.len()
        && unsafe { std::slice::from_raw_parts(p as *const u8, prefix.len()) } == prefix
}

pub fn free_call_reply(r: *mut RedisModuleCallReply) {
    if !r.is_null() {
        unsafe { rm!(RedisModule_FreeCallReply)(r) };
    }
}

/// A decoded call reply, for the few places the module reads one (COMMAND at load).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(Vec<u8>),
    Int(i64),
    Array(Vec<Value>),
    Other,
}

/// Replies with a decoded value (strings, integers, arrays; anything else as null).
pub fn reply_value(ctx: *mut RedisModuleCtx, v: &Value) -> c_int {
    match v {
        Value::Str(s) => reply_bulk(ctx, s),
        Value::Int(i) => reply_int(ctx, *i),
        Value::Array(items) => {
            unsafe { rm!(RedisModule_ReplyWithArray)(ctx, items.len() as std::ffi::c_long) };
            for i in items {
                reply_value(ctx, i);
            }
            OK
        }
        Value::Other => unsafe { rm!(RedisModule_ReplyWithNull)(ctx) },
    }
}

pub fn call_reply_value(r: *mut RedisModuleCallReply) -> Value {
    if r.is_null() {
        return Value::Other;
    }
    unsafe {
        let t = rm!(RedisModule_CallReplyType)(r) as isize;
        match t {
            raw::REDISMODULE_REPLY_STRING | raw::REDISMODULE_REPLY_ERROR => {
                let mut len = 0usize;
                let p = rm!(RedisModule_CallReplyStringPtr)(r, &mut len);
                if p.is_null() {
                    Value::Str(Vec::new())
                } else {
                    Value::Str(std::slice::from_raw_parts(p as *const u8, len).to_vec())
                }
            }
            raw::REDISMODULE_REPLY_INTEGER => Value::Int(rm!(RedisModule_CallReplyInteger)(r)),
            raw::REDISMODULE_REPLY_ARRAY | raw::REDISMODULE_REPLY_SET => {
                let n = rm!(RedisModule_CallReplyLength)(r);
                Value::Array(
                    (0..n)
                        .map(|i| call_reply_value(rm!(RedisModule_CallReplyArrayElement)(r, i)))
                        .collect(),
                )
            }
            _ => Value::Other,
        }
    }
}
