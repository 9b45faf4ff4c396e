//! Changing the cluster's shape, with RedisRaft's commands: `RAFT.CLUSTER INIT|JOIN`,
//! `RAFT.NODE ADD|REMOVE`, and `RAFT._MEMBERS` (what a joining node asks its new leader).

use std::ffi::{c_int, c_void, CStr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use crate::codec::Member;
use crate::config::{node_id_for_name, parse_host_port, BUS_PORT_OFFSET};
use crate::node::ChangeRequest;
use crate::redis::api::{self, guard, rm, CallOpts, RedisModuleCtx, RedisModuleString, Value};
use crate::redis::{self as r, configs, module, redirect_error, JOINING};
use crate::storage::LogStore;

/// The commands this file answers, for `commands::register`.
pub fn commands() -> [(&'static CStr, api::raw::RedisModuleCmdFunc, &'static CStr); 3] {
    [
        (c"raft.cluster", Some(cluster_cmd), c"admin"),
        (c"raft.node", Some(node_cmd), c"admin"),
        (c"raft._members", Some(members_cmd), c"admin"),
    ]
}

/// `RAFT.CLUSTER INIT [<cluster-id>]` | `RAFT.CLUSTER JOIN <host:port> [<host:port> ...]`.
extern "C" fn cluster_cmd(
    ctx: *mut RedisModuleCtx,
    argv: *mut *mut RedisModuleString,
    argc: c_int,
) -> c_int {
    guard(
        "RAFT.CLUSTER",
        || api::reply_error(ctx, "ERR internal error (see the server log)"),
        || {
            let args = unsafe { api::owned_args(argv, argc) };
            let Some(m) = module() else {
                return api::reply_error(ctx, "ERR redis-raft is not initialised");
            };
            let sub = args.get(1).map(|s| s.to_ascii_uppercase());
            let is_init = sub.as_deref() == Some(b"INIT");
            let is_join = sub.as_deref() == Some(b"JOIN");
            if !is_init && !is_join {
                return api::reply_error(ctx, "ERR RAFT.CLUSTER supports INIT / JOIN only");
            }
            if let Some(node) = m.node().filter(|_| is_join && !m.is_removed()) {
                // A JOIN retried after it succeeded (its reply lost): OK again, when it names
                // a member of the cluster this node belongs to.
                let members = node.shared().members();
                let ours = args[2..].iter().any(|a| {
                    members
                        .iter()
                        .any(|mb| mb.redis_addr.as_bytes() == a.as_slice())
                });
                if ours {
                    return api::reply_simple(ctx, "OK");
                }
            }
            if m.node().is_some() || m.is_removed() {
                return api::reply_error(ctx, "ERR Already cluster member");
            }
            if JOINING.load(Ordering::Acquire) {
                return api::reply_error(ctx, "ERR a join is in progress");
            }
            let me = match my_identity(ctx) {
                Ok(me) => me,
                Err(e) => return api::reply_error(ctx, &e),
            };
            if is_init {
                init(ctx, args.get(2), me)
            } else {
                join(ctx, &args[2..], me)
            }
        },
    )
}

fn init(ctx: *mut RedisModuleCtx, id: Option<&Vec<u8>>, me: Member) -> c_int {
    let cluster_id = match id {
        Some(id) => {
            let id = String::from_utf8_lossy(id).into_owned();
            if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return api::reply_error(
                    ctx,
                    "ERR cluster id must be 32 characters (letters and digits)",
                );
            }
            id
        }
        None => match random_hex(16) {
            Ok(id) => id,
            Err(e) => return api::reply_error(ctx, &format!("ERR no random cluster id: {e}")),
        },
    };
    let spec = r::StartSpec {
        id: me.id,
        bus_listen: match bus_listen(&me) {
            Ok(a) => a,
            Err(e) => return api::reply_error(ctx, &e),
        },
        members: vec![me.clone()],
        bootstrap: true,
        cluster_id: cluster_id.clone(),
    };
    if let Err(e) = start_on_empty_log(spec) {
        return api::reply_error(ctx, &e);
    }
    info!(
        "RAFT.CLUSTER INIT: new cluster {cluster_id} with this node ('{}', id {}) as its only voter",
        me.name, me.id
    );
    // As RedisRaft: the reply comes once this node leads and has applied an entry of its
    // term, so the next command is served (not -CLUSTERDOWN).
    let bc = r::block(ctx);
    if bc.is_null() {
        return api::reply_simple(ctx, &format!("OK {cluster_id}"));
    }
    let election = configs::options().election_timeout_ms;
    let wait = Box::new(InitWait {
        bc: bc as usize,
        reply: format!("OK {cluster_id}"),
        deadline: Instant::now() + Duration::from_millis(election.saturating_mul(10).max(5000)),
    });
    init_poll(ctx, Box::into_raw(wait) as *mut c_void);
    api::OK
}

/// RAFT.CLUSTER INIT's client, waiting for the new cluster to take writes.
struct InitWait {
    bc: usize,
    reply: String,
    /// Answer anyway by then (the cluster exists; a log whose fsync stalls for this long is
    /// reported in the server log).
    deadline: Instant,
}

/// How often INIT's client checks whether the node leads and has applied its term's entry.
const INIT_POLL_MS: i64 = 2;

/// Answers INIT's client once the node is a ready leader, or re-arms itself (a module timer).
extern "C" fn init_poll(ctx: *mut RedisModuleCtx, data: *mut c_void) {
    if data.is_null() {
        return;
    }
    let wait = unsafe { Box::from_raw(data as *mut InitWait) };
    let bc = wait.bc as *mut api::RedisModuleBlockedClient;
    let reply = wait.reply.clone();
    guard(
        "RAFT.CLUSTER INIT",
        || r::finish(bc, Ok(reply)),
        || {
            let ready = module()
                .and_then(|m| m.node())
                .is_some_and(|n| n.shared().is_ready_leader());
            if ready {
                return r::finish(bc, Ok(wait.reply));
            }
            if Instant::now() >= wait.deadline {
                warn!("RAFT.CLUSTER INIT: the new cluster has no ready leader yet; answering OK anyway (writes get -CLUSTERDOWN until it has)");
                return r::finish(bc, Ok(wait.reply));
            }
            unsafe {
                rm!(RedisModule_CreateTimer)(
                    ctx,
                    INIT_POLL_MS,
                    Some(init_poll),
                    Box::into_raw(wait) as *mut c_void,
                )
            };
        },
    );
}

/// Opens the log (it must hold nothing), starts the node on it and makes it this module's
/// node. If starting fails, the log file is removed again: the node is left as it was
/// (uninitialised, no log), so INIT or JOIN can be retried.
fn start_on_empty_log(spec: r::StartSpec) -> Result<(), String> {
    let store = open_empty_log()?;
    let path = store.path().to_path_buf();
    let started = r::start_node(&configs::options(), store, spec)
        .map_err(|e| format!("ERR {e}"))
        .and_then(r::set_node);
    if started.is_err() {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(
                "could not remove {} after a failed start: {e}; move it aside before the next RAFT.CLUSTER INIT or JOIN",
                path.display()
            ),
        }
    }
    started
}

fn join(ctx: *mut RedisModuleCtx, addrs: &[Vec<u8>], me: Member) -> c_int {
    if addrs.is_empty() {
        return api::reply_error(
            ctx,
            "ERR wrong number of arguments for 'raft.cluster join' command",
        );
    }
    let mut targets = Vec::new();
    for a in addrs {
        let a = String::from_utf8_lossy(a).into_owned();
        if parse_host_port(&a).is_err() {
            return api::reply_error(ctx, "ERR invalid node address");
        }
        targets.push(a);
    }
    if let Err(e) = check_no_log() {
        return api::reply_error(ctx, &e);
    }
    let opts = configs::options();
    let timeout = Duration::from_millis(opts.join_timeout_ms);
    let auth = crate::join::Credentials::from_options(&opts.cluster_user, &opts.cluster_password);
    let tls = crate::redis::tls::handle()
        .and_then(|h| h.current())
        .map(|c| c.client.clone());
    let bc = r::block(ctx);
    if bc.is_null() {
        return api::reply_error(ctx, "ERR could not block the client");
    }
    JOINING.store(true, Ordering::Release);
    let bc_addr = bc as usize;
    let spawned = std::thread::Builder::new()
        .name("raft-join".into())
        .spawn(move || {
            info!(
                "RAFT.CLUSTER JOIN: asking {targets:?} to add this node ('{}', id {})",
                me.name, me.id
            );
            let result = crate::join::join(&targets, &me, timeout, auth.as_ref(), tls);
            let done = Box::new(JoinDone {
                bc: bc_addr,
                me,
                result,
            });
            // Thread-safe by Redis's contract; the node starts on the main thread.
            unsafe {
                rm!(RedisModule_EventLoopAddOneShot)(
                    Some(join_done),
                    Box::into_raw(done) as *mut c_void,
                )
            };
        });
    if let Err(e) = spawned {
        JOINING.store(false, Ordering::Release);
        r::finish(bc, Err(format!("ERR cannot start the join thread: {e}")));
    }
    api::OK
}

struct JoinDone {
    bc: usize,
    me: Member,
    result: Result<crate::join::Joined, String>,
}

extern "C" fn join_done(data: *mut c_void) {
    if data.is_null() {
        return;
    }
    let done = unsafe { Box::from_raw(data as *mut JoinDone) };
    let bc = done.bc as *mut api::RedisModuleBlockedClient;
    guard(
        "RAFT.CLUSTER JOIN",
        || r::finish(bc, Err("ERR internal error (see the server log)".into())),
        || {
            let outcome = done.result.and_then(|joined| {
                start_on_empty_log(r::StartSpec {
                    id: done.me.id,
                    bus_listen: bus_listen(&done.me)?,
                    members: joined.members,
                    bootstrap: false,
                    cluster_id: joined.cluster_id,
                })
            });
            if let Err(e) = &outcome {
                error!("RAFT.CLUSTER JOIN failed: {e}");
            }
            r::finish(bc, outcome.map(|()| "OK".to_string()));
        },
    );
    JOINING.store(false, Ordering::Release);
}

/// `RAFT.NODE ADD <id> <host:port>[@<bus-port>] [<name>]` | `RAFT.NODE REMOVE <id>`.
extern "C" fn node_cmd(
    ctx: *mut RedisModuleCtx,
    argv: *mut *mut RedisModuleString,
    argc: c_int,
) -> c_int {
    guard(
        "RAFT.NODE",
        || api::reply_error(ctx, "ERR internal error (see the server log)"),
        || {
            let args = unsafe { api::owned_args(argv, argc) };
            let Some(m) = module() else {
                return api::reply_error(ctx, "ERR redis-raft is not initialised");
            };
            let sub = args.get(1).map(|s| s.to_ascii_uppercase());
            let req = match (sub.as_deref(), args.len()) {
                (Some(b"ADD"), 4 | 5) => {
                    let Some(id) = parse_id(&args[2]) else {
                        return api::reply_error(ctx, "ERR invalid node id");
                    };
                    let addr = String::from_utf8_lossy(&args[3]).into_owned();
                    let Some((redis_addr, bus_addr)) = split_addr(&addr) else {
                        return api::reply_error(ctx, "ERR invalid node address");
                    };
                    let name = args
                        .get(4)
                        .map(|n| String::from_utf8_lossy(n).into_owned())
                        .unwrap_or_default();
                    if crate::config::check_string("node-id", &name).is_err() {
                        return api::reply_error(ctx, "ERR invalid node name");
                    }
                    ChangeRequest::Add {
                        member: Member {
                            id,
                            name,
                            redis_addr,
                            bus_addr,
                        },
                    }
                }
                (Some(b"REMOVE"), 3) => match parse_id(&args[2]) {
                    Some(id) if id != 0 => ChangeRequest::Remove { id },
                    _ => return api::reply_error(ctx, "ERR invalid node id"),
                },
                (Some(b"ADD") | Some(b"REMOVE"), _) => {
                    return api::reply_error(
                        ctx,
                        "ERR wrong number of arguments for 'raft.node' command",
                    )
                }
                _ => return api::reply_error(ctx, "ERR RAFT.NODE supports ADD / REMOVE only"),
            };
            let Some(node) = m.node().filter(|_| !m.is_removed()) else {
                return api::reply_error(ctx, &redirect_error(m));
            };
            if !node.shared().is_leader() {
                return api::reply_error(ctx, &redirect_error(m));
            }
            r::change_membership(ctx, m, node, req)
        },
    )
}

/// `RAFT._MEMBERS`: every member as [id, name, redis address, bus address].
extern "C" fn members_cmd(
    ctx: *mut RedisModuleCtx,
    _argv: *mut *mut RedisModuleString,
    _argc: c_int,
) -> c_int {
    guard(
        "RAFT._MEMBERS",
        || api::reply_error(ctx, "ERR internal error (see the server log)"),
        || {
            let Some(node) = module().and_then(|m| m.node()) else {
                return api::reply_error(ctx, "NOCLUSTER No Raft Cluster");
            };
            let rows: Vec<Value> = node
                .shared()
                .members()
                .into_iter()
                .map(|mb| {
                    Value::Array(vec![
                        Value::Int(mb.id as i64),
                        Value::Str(mb.name.into_bytes()),
                        Value::Str(mb.redis_addr.into_bytes()),
                        Value::Str(mb.bus_addr.into_bytes()),
                    ])
                })
                .collect();
            api::reply_value(ctx, &Value::Array(rows))
        },
    )
}

/// A node id as RedisRaft takes it: 0 (let the leader pick) or a positive 31-bit number.
fn parse_id(b: &[u8]) -> Option<u64> {
    std::str::from_utf8(b)
        .ok()?
        .parse::<u64>()
        .ok()
        .filter(|id| *id <= 0x7fff_ffff)
}

/// `host:port[@bus-port]` into the Redis and bus addresses (bus: port + 10000 by default).
fn split_addr(s: &str) -> Option<(String, String)> {
    let (redis, bus) = match s.split_once('@') {
        Some((r, b)) => (r, Some(b.parse::<u16>().ok().filter(|p| *p != 0)?)),
        None => (s, None),
    };
    let (_, port) = parse_host_port(redis).ok()?;
    let bus = match bus {
        Some(b) => b,
        None => u16::try_from(u32::from(port) + BUS_PORT_OFFSET).ok()?,
    };
    // The host as written (IPv6 keeps its brackets).
    let host_part = redis.rsplit_once(':')?.0;
    Some((redis.to_string(), format!("{host_part}:{bus}")))
}

/// This node as INIT or JOIN announce it: `raft.node-id` (or a random name), `raft.addr`
/// (or 127.0.0.1 and Redis's port), `raft.bus-port` (or port + 10000).
fn my_identity(ctx: *mut RedisModuleCtx) -> Result<Member, String> {
    let opts = configs::options();
    let name = if opts.node_id.is_empty() {
        random_name()?
    } else {
        opts.node_id.clone()
    };
    let port = redis_port(ctx).ok_or("ERR cannot read this server's port (CONFIG GET port)")?;
    let redis_addr = if opts.addr.is_empty() {
        format!("127.0.0.1:{port}")
    } else {
        opts.addr.clone()
    };
    let (host, _) = parse_host_port(&redis_addr).map_err(|e| format!("ERR raft.addr: {e}"))?;
    let bus_port = if opts.bus_port != 0 {
        opts.bus_port as u16
    } else {
        u16::try_from(u32::from(port) + BUS_PORT_OFFSET)
            .map_err(|_| "ERR port + 10000 is not a TCP port: set raft.bus-port")?
    };
    let host_part = redis_addr
        .rsplit_once(':')
        .map_or(host.as_str(), |(h, _)| h);
    Ok(Member {
        id: node_id_for_name(&name),
        bus_addr: format!("{host_part}:{bus_port}"),
        name,
        redis_addr,
    })
}

fn bus_listen(me: &Member) -> Result<std::net::SocketAddr, String> {
    let (host, port) =
        parse_host_port(&me.bus_addr).map_err(|e| format!("ERR bus address: {e}"))?;
    Ok(r::bus_listen_addr(&host, port))
}

fn redis_port(ctx: *mut RedisModuleCtx) -> Option<u16> {
    let reply = api::call(
        ctx,
        &[b"CONFIG".to_vec(), b"GET".to_vec(), b"port".to_vec()],
        CallOpts::default(),
    );
    let v = api::call_reply_value(reply);
    api::free_call_reply(reply);
    match v {
        Value::Array(items) => match items.get(1) {
            Some(Value::Str(p)) => std::str::from_utf8(p).ok()?.parse().ok(),
            _ => None,
        },
        _ => None,
    }
}

/// JOIN's check before it asks the cluster: no log, or one that holds nothing. Creates no
/// file (a JOIN that fails leaves the node as it was).
fn check_no_log() -> Result<(), String> {
    let opts = configs::options();
    match std::fs::metadata(&opts.log_filename) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        _ => open_empty_log().map(drop),
    }
}

/// The log INIT or JOIN starts: it must not hold anything yet.
fn open_empty_log() -> Result<LogStore, String> {
    let opts = configs::options();
    let (store, _) = LogStore::open_with_cache(
        std::path::Path::new(&opts.log_filename),
        opts.log_fsync,
        opts.log_max_cache_bytes,
    )
    .map_err(|e| format!("ERR {e}"))?;
    if !store.is_empty() {
        return Err(format!(
            "ERR the raft log {} is not empty; move it aside first",
            opts.log_filename
        ));
    }
    Ok(store)
}

/// This process's name when `raft.node-id` is not set: chosen once, so a JOIN retried after
/// its first attempt was committed asks for the same node (same name, so the same id).
fn random_name() -> Result<String, String> {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    if let Some(n) = NAME.get() {
        return Ok(n.clone());
    }
    let n = format!("node-{}", random_hex(4)?);
    Ok(NAME.get_or_init(|| n).clone())
}

fn random_hex(bytes: usize) -> Result<String, String> {
    let mut b = vec![0u8; bytes];
    getrandom::getrandom(&mut b).map_err(|e| e.to_string())?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}
