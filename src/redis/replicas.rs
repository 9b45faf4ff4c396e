//! Redis's replica-based write refusal (`min-replicas-to-write`, `min-replicas-max-lag`):
//! a node with too few good Redis replicas refuses writes with `-NOREPLICAS`, and still
//! serves reads and scripts that only read. The `RAFT` command that routed commands run
//! through is not flagged `write` (Redis would refuse every routed read too); writes are
//! checked here, with Redis's own test: an RM_Call in script mode of `RAFT._WRITECHECK`
//! (flagged `write`) fails exactly when Redis would refuse a write. Scripts are then run as
//! reads, without a log entry: Redis itself refuses the ones that may write (a shebang
//! without `no-writes`, a function without it, a write inside a script without flags),
//! so nothing is written anywhere.

use std::ffi::c_int;

use super::api::{self, rm, RedisModuleCtx, RedisModuleString};
use super::MainThread;

pub const NOREPLICAS: &str = "NOREPLICAS Not enough good replicas to write.";

/// `min-replicas-to-write` as last read (0: off, the check is skipped).
static MIN_REPLICAS: MainThread<i64> = MainThread::new_lazy();

/// Reads `min-replicas-to-write` again (at start, and after any CONFIG SET).
pub fn refresh(ctx: *mut RedisModuleCtx) {
    let argv = [
        b"CONFIG".to_vec(),
        b"GET".to_vec(),
        b"min-replicas-to-write".to_vec(),
    ];
    *MIN_REPLICAS.get_mut() = match api::call_value(ctx, &argv) {
        api::Value::Array(kv) => match kv.get(1) {
            Some(api::Value::Str(n)) => std::str::from_utf8(n)
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0),
            _ => 0,
        },
        _ => 0,
    };
}

/// Whether Redis would refuse a write on this node now.
pub fn writes_refused(ctx: *mut RedisModuleCtx) -> bool {
    if *MIN_REPLICAS.get_mut() <= 0 {
        return false;
    }
    let r = unsafe { rm!(RedisModule_Call)(ctx, c"RAFT._WRITECHECK".as_ptr(), c"S".as_ptr()) };
    if r.is_null() {
        return true;
    }
    api::free_call_reply(r);
    false
}

/// `RAFT._WRITECHECK`: does nothing; see the module comment.
pub extern "C" fn write_check_cmd(
    ctx: *mut RedisModuleCtx,
    _argv: *mut *mut RedisModuleString,
    _argc: c_int,
) -> c_int {
    api::reply_simple(ctx, "OK")
}

/// A CONFIG SET happened: read the option again.
pub extern "C" fn config_changed(
    ctx: *mut RedisModuleCtx,
    _eid: api::raw::RedisModuleEvent,
    _subevent: u64,
    _data: *mut std::ffi::c_void,
) {
    api::guard(
        "config change",
        || (),
        || {
            refresh(ctx);
            super::tls::refresh(ctx);
        },
    );
}
