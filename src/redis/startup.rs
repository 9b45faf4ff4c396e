//! Start-up on the main thread: `start` (from OnLoad) opens the raft log, decides who this
//! node is from the log and `raft.cluster-nodes` (the log wins, with a warning where they
//! differ), and starts the raft node; RAFT.CLUSTER INIT and JOIN start one later
//! (`start_node`, `set_node`).

use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use super::api::{rm, MainThread, RedisModuleCtx};
use super::{
    configs, module, on_wake, read_command_table, snapshots, tls, waker, Module, MODULE,
    WAKE_QUEUED,
};
use crate::config::{Bootstrap, ReadMode};
use crate::node::{Member, Node, NodeSpec};
use crate::storage::LogStore;

/// Called from OnLoad after the options are loaded and validated.
pub fn start(ctx: *mut RedisModuleCtx, bootstrap: Option<Bootstrap>) -> Result<(), String> {
    let opts = configs::options();
    let table = read_command_table(ctx, &opts.ignored());
    if table.is_empty() {
        return Err("could not read Redis's command table (COMMAND)".into());
    }
    let incarnation = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ (u64::from(std::process::id()) << 32);
    let log_path = std::path::Path::new(&opts.log_filename);
    let has_log = std::fs::metadata(log_path).is_ok_and(|md| md.len() > 0);
    let mut removed_at_start = false;
    let node = if bootstrap.is_some() || has_log {
        let (store, recovery) =
            LogStore::open_with_cache(log_path, opts.log_fsync, opts.log_max_cache_bytes)
                .map_err(|e| e.to_string())?;
        info!("raft log {}: {:?}", opts.log_filename, recovery);
        let stored = crate::node::stored_membership(&store).map_err(|e| e.to_string())?;
        let configured = bootstrap.as_ref().map(|b| {
            let me = b.me();
            let mut names: Vec<&str> = b.nodes.iter().map(|n| n.name.as_str()).collect();
            names.sort_unstable();
            StartSpec {
                id: me.raft_id(),
                members: configured_members(b, &opts),
                bootstrap: true,
                cluster_id: format!("static:{}", names.join(",")),
                bus_listen: bus_listen_addr(&me.host, bus_port_or(&opts, me.bus_port)),
            }
        });
        match (configured, stored) {
            (_, Some(st)) if st.book.was_removed(st.me) => {
                warn!("this node (id {}) was removed from its raft cluster; it serves no cluster commands. To use it again, move {} aside and join with a new raft.node-id", st.me, opts.log_filename);
                removed_at_start = true;
                None
            }
            (configured, Some(st)) if st.me != 0 => {
                // The log says who this node is and which cluster it belongs to.
                if let Some(c) = configured.as_ref().filter(|c| c.id != st.me) {
                    warn!("raft.node-id names node {} but the raft log belongs to node {}; following the log", c.id, st.me);
                }
                if let Some(c) = &configured {
                    let mut listed: Vec<u64> = c.members.iter().map(|m| m.id).collect();
                    listed.sort_unstable();
                    let logged: Vec<u64> = st.book.members.keys().copied().collect();
                    if listed != logged {
                        let names = |ids: &[u64]| {
                            ids.iter()
                                .map(|id| {
                                    st.book.members.get(id).map_or_else(
                                        || {
                                            c.members
                                                .iter()
                                                .find(|m| m.id == *id)
                                                .map_or(id.to_string(), |m| m.name.clone())
                                        },
                                        |m| m.name.clone(),
                                    )
                                })
                                .collect::<Vec<_>>()
                                .join(",")
                        };
                        warn!(
                            "raft.cluster-nodes lists [{}] but the log's committed membership is [{}]; following the log",
                            names(&listed),
                            names(&logged)
                        );
                    }
                }
                let me = st
                    .book
                    .members
                    .get(&st.me)
                    .or_else(|| st.hints.iter().find(|m| m.id == st.me))
                    .cloned();
                let (host, port) = me
                    .as_ref()
                    .and_then(|m| crate::config::parse_host_port(&m.bus_addr).ok())
                    .unwrap_or_else(|| ("127.0.0.1".into(), 0));
                let bus_listen = match &configured {
                    Some(c) if c.id == st.me => c.bus_listen,
                    _ => bus_listen_addr(&host, bus_port_or(&opts, port)),
                };
                let mut members = configured.map(|c| c.members).unwrap_or_default();
                members.extend(st.hints.iter().cloned());
                Some(start_node(
                    &opts,
                    store,
                    StartSpec {
                        id: st.me,
                        members,
                        bootstrap: false,
                        cluster_id: st.book.cluster_id.clone(),
                        bus_listen,
                    },
                )?)
            }
            (Some(c), _) => Some(start_node(&opts, store, c)?),
            (None, _) => {
                warn!("the raft log {} names no cluster and raft.cluster-nodes is empty: waiting for RAFT.CLUSTER INIT or JOIN", opts.log_filename);
                None
            }
        }
    } else {
        warn!("raft.cluster-nodes is empty and there is no raft log: this node is not part of a cluster until RAFT.CLUSTER INIT or RAFT.CLUSTER JOIN; data commands get NOCLUSTER");
        None
    };
    let apply_ctx = unsafe { rm!(RedisModule_GetDetachedThreadSafeContext)(ctx) } as usize;
    let m = Module {
        node: OnceLock::new(),
        removed_at_start,
        read_mode: opts.effective_read_mode(),
        table: MainThread::new_lazy(),
        apply_ctx,
        incarnation,
    };
    if let Some(n) = node {
        let _ = m.node.set(n);
    }
    *m.table.get_mut() = table;
    if MODULE.set(m).is_err() {
        return Err("module state already initialised".into());
    }
    // Run once the event loop starts (after Redis loaded any RDB/AOF), to take over the dataset.
    if !WAKE_QUEUED.swap(true, Ordering::AcqRel) {
        unsafe { rm!(RedisModule_EventLoopAddOneShot)(Some(on_wake), std::ptr::null_mut()) };
    }
    Ok(())
}

/// `raft.bus-port` when set, else `default`.
fn bus_port_or(opts: &crate::config::Options, default: u16) -> u16 {
    if opts.bus_port != 0 {
        opts.bus_port as u16
    } else {
        default
    }
}

/// The members `raft.cluster-nodes` lists (this node with its `raft.addr`, if set).
fn configured_members(b: &Bootstrap, opts: &crate::config::Options) -> Vec<Member> {
    let me = b.me();
    b.nodes
        .iter()
        .map(|n| Member {
            id: n.raft_id(),
            name: n.name.clone(),
            redis_addr: if n.name == me.name && !opts.addr.is_empty() {
                opts.addr.clone()
            } else {
                n.redis_addr()
            },
            bus_addr: n.bus_addr(),
        })
        .collect()
}

/// What differs between the ways a node starts (config file, restart, INIT, JOIN).
pub struct StartSpec {
    pub id: u64,
    pub members: Vec<Member>,
    pub bootstrap: bool,
    pub cluster_id: String,
    pub bus_listen: std::net::SocketAddr,
}

/// Starts the raft node over an opened log.
pub fn start_node(
    opts: &crate::config::Options,
    store: LogStore,
    s: StartSpec,
) -> Result<Node, String> {
    let spec = NodeSpec {
        id: s.id,
        members: s.members,
        bootstrap: s.bootstrap,
        cluster_id: s.cluster_id,
        bus_listen: s.bus_listen,
        election_timeout_ms: opts.election_timeout_ms,
        heartbeat_interval_ms: opts.heartbeat_interval_ms,
        advertise_addr: (!opts.addr.is_empty()).then(|| opts.addr.clone()),
        lease_reads: opts.effective_read_mode() == ReadMode::Lease,
        cluster_password: opts.cluster_password.clone(),
        snapshot_path: snapshot_path(opts),
        tls: tls::handle(),
    };
    info!(
        "starting raft node {} (cluster {:?}), bus on {}, {} known member(s)",
        spec.id,
        spec.cluster_id,
        spec.bus_listen,
        spec.members.len()
    );
    // Until the first compaction trigger is known: where it starts before any save was
    // timed, at most (no snapshot counted).
    store.set_size_cap(snapshots::compaction_trigger(opts.log_max_file_bytes, 0, None).0);
    Node::start(spec, store, waker()).map_err(|e| e.to_string())
}

/// This node's snapshot file: `<raft.log-filename>.snapshot`, in Redis's `dir`.
pub fn snapshot_path(opts: &crate::config::Options) -> std::path::PathBuf {
    format!("{}.snapshot", opts.log_filename).into()
}

/// RAFT.CLUSTER INIT / JOIN: the node now belongs to a cluster (main thread).
pub fn set_node(node: Node) -> Result<(), String> {
    let m = module().ok_or("module not initialised")?;
    m.node.set(node).map_err(|n| {
        n.stop();
        "ERR Already cluster member".to_string()
    })
}

/// A node whose entry is a loopback address keeps its bus on loopback; any other listens on
/// all interfaces (its entry may name a host name, or an address that NAT maps to it).
pub fn bus_listen_addr(host: &str, port: u16) -> std::net::SocketAddr {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    match host.parse::<IpAddr>() {
        Ok(ip) if ip.is_loopback() => SocketAddr::new(ip, port),
        _ if host == "localhost" => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
        _ => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
    }
}
