//! Registers the `raft.*` options with Redis's module configuration API, so they work in
//! redis.conf, as `--raft.<name>` arguments, and with CONFIG GET/SET.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_longlong, c_void, CStr, CString};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Mutex;

use super::api::{self, guard, raw, rm, RedisModuleCtx, RedisModuleString};
use super::MainThread;
use crate::config::{check_string, LogLevel, Options, ReadMode};

/// The values Redis last accepted. Read at start-up and by INFO; CONFIG SET writes here.
/// Set to the defaults when the module registers its options.
pub static OPTIONS: Mutex<Option<Options>> = Mutex::new(None);

/// `raft.loglevel`, read by the log filter on any thread.
pub static LOGLEVEL: AtomicU8 = AtomicU8::new(LogLevel::Notice as u8);

/// `raft.follower-reads`, read by the command filter.
pub static FOLLOWER_READS: AtomicBool = AtomicBool::new(false);

pub fn options() -> Options {
    with_options(|o| o.clone())
}

fn with_options<R>(f: impl FnOnce(&mut Options) -> R) -> R {
    let mut guard = OPTIONS.lock().unwrap_or_else(|p| p.into_inner());
    f(guard.get_or_insert_with(Options::default))
}

/// Strings handed to Redis by getters must stay valid until the next get: kept here.
static GOT: MainThread<HashMap<&'static str, usize>> = MainThread::new_lazy();

fn set_err(err: *mut *mut RedisModuleString, msg: &str) -> c_int {
    if !err.is_null() {
        unsafe { *err = api::create_string(std::ptr::null_mut(), msg.as_bytes()) };
    }
    api::ERR
}

fn name_of(name: *const c_char) -> String {
    if name.is_null() {
        return String::new();
    }
    unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned()
}

/// Maps a config name (with or without the `raft.` prefix) to our option key.
fn key(name: &str) -> &'static str {
    match name.strip_prefix("raft.").unwrap_or(name) {
        "node-id" => "node-id",
        "cluster-nodes" => "cluster-nodes",
        "log-filename" => "log-filename",
        "addr" => "addr",
        "election-timeout" => "election-timeout",
        "heartbeat-interval" => "heartbeat-interval",
        "bus-port" => "bus-port",
        "join-timeout" => "join-timeout",
        "log-max-file-size" => "log-max-file-size",
        "log-max-cache-size" => "log-max-cache-size",
        "log-fsync" => "log-fsync",
        "loglevel" => "loglevel",
        "read-mode" => "read-mode",
        "quorum-reads" => "quorum-reads",
        "follower-reads" => "follower-reads",
        "ignored-commands" => "ignored-commands",
        "cluster-password" => "cluster-password",
        "cluster-user" => "cluster-user",
        "snapshot-fail" => "snapshot-fail",
        "snapshot-delay" => "snapshot-delay",
        "tls-enabled" => "tls-enabled",
        _ => "",
    }
}

extern "C" fn get_string(name: *const c_char, _p: *mut c_void) -> *mut RedisModuleString {
    guard("config get", std::ptr::null_mut, || {
        let k = key(&name_of(name));
        let v = with_options(|o| match k {
            "node-id" => o.node_id.clone(),
            "cluster-nodes" => o.cluster_nodes.clone(),
            "log-filename" => o.log_filename.clone(),
            "addr" => o.addr.clone(),
            "ignored-commands" => o.ignored_commands.clone(),
            "cluster-password" => o.cluster_password.clone(),
            "cluster-user" => o.cluster_user.clone(),
            _ => String::new(),
        });
        let s = api::create_string(std::ptr::null_mut(), v.as_bytes());
        let got = GOT.get_mut();
        if let Some(old) = got.insert(k, s as usize) {
            unsafe {
                rm!(RedisModule_FreeString)(std::ptr::null_mut(), old as *mut RedisModuleString)
            };
        }
        s
    })
}

extern "C" fn set_string(
    name: *const c_char,
    val: *mut RedisModuleString,
    _p: *mut c_void,
    err: *mut *mut RedisModuleString,
) -> c_int {
    guard(
        "config set",
        || api::ERR,
        || {
            let k = key(&name_of(name));
            let v = String::from_utf8_lossy(unsafe { api::str_bytes(val) }).into_owned();
            if let Err(e) = check_string(k, &v) {
                return set_err(err, &e.to_string());
            }
            let in_cluster = super::is_joining()
                || super::module().is_some_and(|m| m.node().is_some() || m.is_removed());
            if matches!(k, "addr" | "log-filename") && in_cluster {
                let now = with_options(|o| {
                    if k == "addr" {
                        o.addr.clone()
                    } else {
                        o.log_filename.clone()
                    }
                });
                if v != now {
                    return set_err(
                        err,
                        &format!("raft.{k}: changing it is not allowed once this node belongs to a cluster (set it before RAFT.CLUSTER INIT or JOIN)"),
                    );
                }
            }
            with_options(|o| match k {
                "node-id" => o.node_id = v,
                "cluster-nodes" => o.cluster_nodes = v,
                "log-filename" => o.log_filename = v,
                "addr" => o.addr = v,
                "ignored-commands" => o.ignored_commands = v,
                "cluster-password" => o.cluster_password = v,
                "cluster-user" => o.cluster_user = v,
                _ => {}
            });
            if k == "ignored-commands" {
                super::on_command_table_changed();
            }
            api::OK
        },
    )
}

extern "C" fn get_numeric(name: *const c_char, _p: *mut c_void) -> c_longlong {
    let k = key(&name_of(name));
    with_options(|o| match k {
        "election-timeout" => o.election_timeout_ms as c_longlong,
        "heartbeat-interval" => o.heartbeat_interval_ms as c_longlong,
        "bus-port" => o.bus_port as c_longlong,
        "join-timeout" => o.join_timeout_ms as c_longlong,
        "log-max-file-size" => o.log_max_file_bytes as c_longlong,
        "log-max-cache-size" => o.log_max_cache_bytes as c_longlong,
        "snapshot-delay" => o.snapshot_delay_secs as c_longlong,
        _ => 0,
    })
}

extern "C" fn set_numeric(
    name: *const c_char,
    val: c_longlong,
    _p: *mut c_void,
    err: *mut *mut RedisModuleString,
) -> c_int {
    let k = key(&name_of(name));
    let Ok(v) = u64::try_from(val) else {
        return set_err(err, &format!("raft.{k}: must not be negative"));
    };
    let running = super::module().is_some_and(|m| m.node().is_some());
    let lease = with_options(|o| o.effective_read_mode() == ReadMode::Lease);
    if k == "election-timeout" && running && lease {
        // A leader's lease assumes the followers' election timeout: changed on one node at
        // a time, a new leader could be elected while the old one still serves reads.
        return set_err(
            err,
            "raft.election-timeout: changing it at runtime is not allowed with raft.read-mode lease; change it in the config and restart the nodes one at a time",
        );
    }
    with_options(|o| match k {
        "election-timeout" => o.election_timeout_ms = v,
        "heartbeat-interval" => o.heartbeat_interval_ms = v,
        "bus-port" => o.bus_port = v,
        "join-timeout" => o.join_timeout_ms = v,
        "log-max-file-size" => o.log_max_file_bytes = v,
        "log-max-cache-size" => o.log_max_cache_bytes = v,
        "snapshot-delay" => {
            o.snapshot_delay_secs = v;
            crate::snapshot::save::CHILD_DELAY_SECS.store(v, Ordering::Relaxed);
        }
        _ => {}
    });
    if k == "log-max-file-size" {
        super::on_log_max_file_changed(v);
    }
    if k == "log-max-cache-size" {
        super::on_log_cache_changed(v);
    }
    api::OK
}

extern "C" fn get_bool(name: *const c_char, _p: *mut c_void) -> c_int {
    let k = key(&name_of(name));
    with_options(|o| match k {
        "log-fsync" => c_int::from(o.log_fsync),
        "quorum-reads" => c_int::from(o.effective_read_mode() != ReadMode::Stale),
        "follower-reads" => c_int::from(o.follower_reads),
        "snapshot-fail" => c_int::from(o.snapshot_fail),
        "tls-enabled" => c_int::from(o.tls_enabled),
        _ => 0,
    })
}

extern "C" fn set_bool(
    name: *const c_char,
    val: c_int,
    _p: *mut c_void,
    _err: *mut *mut RedisModuleString,
) -> c_int {
    guard(
        "config set",
        || api::ERR,
        || {
            let on = val != 0;
            match key(&name_of(name)) {
                "log-fsync" => {
                    with_options(|o| o.log_fsync = on);
                    super::on_fsync_changed(on);
                }
                // RedisRaft's option. Its default (yes) is also what Redis sets when the
                // option is absent, so only `no` says something: stale reads.
                "quorum-reads" => with_options(|o| o.quorum_reads_no = !on),
                "follower-reads" => {
                    with_options(|o| o.follower_reads = on);
                    FOLLOWER_READS.store(on, Ordering::Relaxed);
                }
                "tls-enabled" => with_options(|o| o.tls_enabled = on),
                "snapshot-fail" => {
                    with_options(|o| o.snapshot_fail = on);
                    crate::snapshot::save::FAIL_FORK.store(on, Ordering::Relaxed);
                }
                _ => {}
            }
            api::OK
        },
    )
}

extern "C" fn get_enum(name: *const c_char, _p: *mut c_void) -> c_int {
    match key(&name_of(name)) {
        "read-mode" => with_options(|o| o.effective_read_mode() as c_int),
        _ => c_int::from(LOGLEVEL.load(Ordering::Relaxed)),
    }
}

extern "C" fn set_enum(
    name: *const c_char,
    val: c_int,
    _p: *mut c_void,
    err: *mut *mut RedisModuleString,
) -> c_int {
    if key(&name_of(name)) == "read-mode" {
        return match ReadMode::from_index(val) {
            Some(m) => {
                with_options(|o| o.read_mode = m);
                api::OK
            }
            None => set_err(err, "raft.read-mode: must be linearizable, lease or stale"),
        };
    }
    match LogLevel::from_index(val) {
        Some(l) => {
            LOGLEVEL.store(l as u8, Ordering::Relaxed);
            with_options(|o| o.loglevel = l);
            api::OK
        }
        None => set_err(
            err,
            "raft.loglevel: must be debug, verbose, notice or warning",
        ),
    }
}

/// Cross-option checks after a CONFIG SET of several values.
extern "C" fn apply(
    _ctx: *mut RedisModuleCtx,
    _p: *mut c_void,
    err: *mut *mut RedisModuleString,
) -> c_int {
    guard(
        "config apply",
        || api::ERR,
        || {
            let o = options();
            if let Err(e) = crate::config::validate(&o) {
                return set_err(err, &e.to_string());
            }
            let node = super::module().and_then(|m| m.node());
            if let Some(node) = node {
                if !node.set_timing(o.election_timeout_ms, o.heartbeat_interval_ms) {
                    return set_err(err, "the raft thread is busy; retry the CONFIG SET");
                }
            }
            api::OK
        },
    )
}

const IMMUTABLE: u32 = raw::REDISMODULE_CONFIG_IMMUTABLE;
const DEFAULT: u32 = raw::REDISMODULE_CONFIG_DEFAULT;
/// Redis keeps the value out of its own logs and redacts it from SLOWLOG and MONITOR.
const SENSITIVE: u32 = raw::REDISMODULE_CONFIG_SENSITIVE;
/// Accepts size units (`64mb`, `1gb`) as Redis's own memory options do.
const MEMORY: u32 = raw::REDISMODULE_CONFIG_MEMORY;
/// Left out of `CONFIG GET *` (RedisRaft's hidden test options).
const HIDDEN: u32 = raw::REDISMODULE_CONFIG_HIDDEN;

/// Registers every option and loads the values from redis.conf / the command line.
/// Returns Err with a message naming the option when one is refused.
pub fn register(ctx: *mut RedisModuleCtx) -> Result<(), String> {
    let d = Options::default();
    with_options(|o| *o = d.clone());
    let strings: [(&CStr, &str, u32); 7] = [
        (c"node-id", "", IMMUTABLE),
        (c"cluster-nodes", "", IMMUTABLE),
        // Until the node belongs to a cluster (set_string refuses them after), as RedisRaft.
        (c"log-filename", &d.log_filename, DEFAULT),
        (c"addr", "", DEFAULT),
        (c"ignored-commands", "", DEFAULT),
        (c"cluster-password", "", IMMUTABLE | SENSITIVE),
        // Read by each JOIN: may change at any time, as RedisRaft's.
        (c"cluster-user", &d.cluster_user, DEFAULT),
    ];
    for (name, default, flags) in strings {
        let def = CString::new(default).map_err(|e| e.to_string())?;
        let r = unsafe {
            rm!(RedisModule_RegisterStringConfig)(
                ctx,
                name.as_ptr(),
                def.as_ptr(),
                flags,
                Some(get_string),
                Some(set_string),
                Some(apply),
                std::ptr::null_mut(),
            )
        };
        check(r, name)?;
    }
    // Timing takes effect at once (`apply` hands it to the raft thread).
    let numerics: [(&CStr, u64, u32, i64, i64); 7] = [
        (
            c"election-timeout",
            d.election_timeout_ms,
            DEFAULT,
            1,
            3_600_000,
        ),
        (
            c"heartbeat-interval",
            d.heartbeat_interval_ms,
            DEFAULT,
            1,
            3_600_000,
        ),
        (c"bus-port", 0, IMMUTABLE, 0, 65535),
        (c"join-timeout", d.join_timeout_ms, DEFAULT, 1, 86_400_000),
        (
            c"log-max-file-size",
            d.log_max_file_bytes,
            DEFAULT | MEMORY,
            0,
            i64::MAX,
        ),
        (
            c"log-max-cache-size",
            d.log_max_cache_bytes,
            DEFAULT | MEMORY,
            0,
            i64::MAX,
        ),
        // Test knob, seconds.
        (c"snapshot-delay", 0, DEFAULT | HIDDEN, 0, 86_400),
    ];
    for (name, default, flags, min, max) in numerics {
        let r = unsafe {
            rm!(RedisModule_RegisterNumericConfig)(
                ctx,
                name.as_ptr(),
                default as c_longlong,
                flags,
                min,
                max,
                Some(get_numeric),
                Some(set_numeric),
                Some(apply),
                std::ptr::null_mut(),
            )
        };
        check(r, name)?;
    }
    // The read mode picks raft-rs's read-only option at start: fixed while running.
    let bools: [(&CStr, bool, u32); 5] = [
        (c"log-fsync", d.log_fsync, DEFAULT),
        (c"quorum-reads", d.read_mode != ReadMode::Stale, IMMUTABLE),
        (c"follower-reads", d.follower_reads, DEFAULT),
        // Fixed at start: the bus's sockets are set up once.
        (c"tls-enabled", d.tls_enabled, IMMUTABLE),
        // Test knob.
        (c"snapshot-fail", false, DEFAULT | HIDDEN),
    ];
    for (name, default, flags) in bools {
        let r = unsafe {
            rm!(RedisModule_RegisterBoolConfig)(
                ctx,
                name.as_ptr(),
                c_int::from(default),
                flags,
                Some(get_bool),
                Some(set_bool),
                None,
                std::ptr::null_mut(),
            )
        };
        check(r, name)?;
    }
    register_enum(
        ctx,
        c"loglevel",
        &LogLevel::NAMES,
        LogLevel::Notice as c_int,
        DEFAULT,
    )?;
    register_enum(
        ctx,
        c"read-mode",
        &ReadMode::NAMES,
        d.read_mode as c_int,
        IMMUTABLE,
    )?;
    if unsafe { rm!(RedisModule_LoadConfigs)(ctx) } != api::OK {
        return Err("a raft.* option in the configuration was refused (see the line above)".into());
    }
    Ok(())
}

fn register_enum(
    ctx: *mut RedisModuleCtx,
    name: &CStr,
    values: &[&str],
    default: c_int,
    flags: u32,
) -> Result<(), String> {
    let names: Vec<CString> = values
        .iter()
        .map(|n| CString::new(*n).unwrap_or_default())
        .collect();
    let ptrs: Vec<*const c_char> = names.iter().map(|n| n.as_ptr()).collect();
    let vals: Vec<c_int> = (0..names.len() as c_int).collect();
    // Redis copies the names.
    let r = unsafe {
        rm!(RedisModule_RegisterEnumConfig)(
            ctx,
            name.as_ptr(),
            default,
            flags,
            ptrs.as_ptr() as *mut *const c_char,
            vals.as_ptr(),
            names.len() as c_int,
            Some(get_enum),
            Some(set_enum),
            None,
            std::ptr::null_mut(),
        )
    };
    check(r, name)
}

fn check(r: c_int, name: &CStr) -> Result<(), String> {
    if r == api::OK {
        Ok(())
    } else {
        Err(format!(
            "could not register option raft.{}",
            name.to_string_lossy()
        ))
    }
}
