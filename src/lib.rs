//! redis-raft: a Redis module that turns redis-server processes into one strongly
//! consistent, fault-tolerant Redis, replicating every write through a Raft log.
//!
//! This file is the module entry point only; see ARCHITECTURE.md for the map.

pub mod codec;
pub mod commands;
pub mod config;
#[doc(hidden)]
pub mod fuzzing;
pub mod join;
pub mod latency;
pub mod node;
pub mod redis;
pub mod snapshot;
pub mod storage;
pub mod tls;
pub mod transport;

use std::ffi::c_int;

use crate::redis::api::{self, guard, raw, rm, RedisModuleCtx, RedisModuleString};

const MODULE_NAME: &std::ffi::CStr = c"raft";
const MODULE_VERSION: c_int = 1;

/// Entry point Redis calls on `loadmodule`.
///
/// # Safety
/// Called by Redis with a valid context.
#[no_mangle]
pub unsafe extern "C" fn RedisModule_OnLoad(
    ctx: *mut RedisModuleCtx,
    _argv: *mut *mut RedisModuleString,
    _argc: c_int,
) -> c_int {
    if raw::Export_RedisModule_Init(
        ctx,
        MODULE_NAME.as_ptr(),
        MODULE_VERSION,
        raw::REDISMODULE_APIVER_1 as c_int,
    ) == api::ERR
    {
        return api::ERR;
    }
    guard(
        "module load",
        || api::ERR,
        || match load(ctx) {
            Ok(()) => api::OK,
            Err(e) => {
                api::log_raw("warning", &format!("redis-raft cannot start: {e}"));
                api::ERR
            }
        },
    )
}

fn load(ctx: *mut RedisModuleCtx) -> Result<(), String> {
    let missing = api::missing_apis();
    if !missing.is_empty() {
        return Err(format!(
            "this redis-server lacks module APIs {}; redis-raft needs Redis 7.0 or newer",
            missing.join(", ")
        ));
    }
    let flags = unsafe { rm!(RedisModule_GetContextFlags)(ctx) } as u32;
    if flags & raw::REDISMODULE_CTX_FLAGS_CLUSTER != 0 {
        return Err("cluster-enabled is yes: Redis Cluster's own failover and slot moves would fight the Raft log (redis-raft answers CLUSTER commands itself, so cluster clients work without it); start this node with cluster-enabled no".into());
    }
    redis::logging::init();
    redis::configs::register(ctx)?;
    let bootstrap = config::validate(&redis::configs::options()).map_err(|e| e.to_string())?;
    redis::tls::load(ctx, redis::configs::options().tls_enabled)?;
    commands::register(ctx)?;
    redis::start(ctx, bootstrap)?;
    redis::subscribe_events(ctx)?;
    redis::watch::subscribe(ctx)?;
    let f = unsafe {
        rm!(RedisModule_RegisterCommandFilter)(
            ctx,
            Some(redis::filter::filter),
            raw::REDISMODULE_CMDFILTER_NOSELF as c_int,
        )
    };
    if f.is_null() {
        return Err("could not register the command filter".into());
    }
    // Sees the commands scripts run on the apply path (so no NOSELF); see redis/scripts.rs.
    let f = unsafe { rm!(RedisModule_RegisterCommandFilter)(ctx, Some(redis::scripts::filter), 0) };
    if f.is_null() {
        return Err("could not register the script command filter".into());
    }
    if unsafe { rm!(RedisModule_RegisterInfoFunc)(ctx, Some(commands::info_func)) } != api::OK {
        return Err("could not register INFO raft".into());
    }
    Ok(())
}
