//! CLUSTER SLOTS / SHARDS / NODES / MYID / INFO answered from Raft's membership, and INFO's
//! `cluster_enabled:1`, so cluster-aware clients (redis-cli -c, redis-py's RedisCluster ...)
//! send every command to the leader, which owns all 16384 slots, and follow a failover
//! through -MOVED unchanged. Followers are listed as the leader's replicas.

use std::ffi::c_int;

use crate::node::Member;
use crate::redis::api::{self, rm, CallOpts, RedisModuleCtx, Value};
use crate::redis::Module;

const SLOT_MAX: i64 = 16383;

/// A 40-hex-character cluster node id from a Raft id.
fn cluster_id(id: u64) -> String {
    format!("{id:040x}")
}

fn host_port(m: &Member) -> (String, i64) {
    match crate::config::parse_host_port(&m.redis_addr) {
        Ok((h, p)) => (h, i64::from(p)),
        Err(_) => (m.redis_addr.clone(), 0),
    }
}

fn bus_port(m: &Member) -> i64 {
    crate::config::parse_host_port(&m.bus_addr)
        .map(|(_, p)| i64::from(p))
        .unwrap_or(0)
}

fn s(x: impl Into<String>) -> Value {
    Value::Str(x.into().into_bytes())
}

/// `CLUSTER <subcommand>` (argv without CLUSTER itself).
pub fn cluster(ctx: *mut RedisModuleCtx, m: &Module, sub: &[Vec<u8>]) -> c_int {
    let Some(node) = m.node() else {
        return api::reply_error(ctx, "ERR This instance has cluster support disabled");
    };
    let Some(name) = sub.first() else {
        return api::reply_error(ctx, "ERR wrong number of arguments for 'cluster' command");
    };
    let name = name.to_ascii_lowercase();
    let me = node.shared().node_id;
    if name == b"myid" {
        return api::reply_bulk(ctx, cluster_id(me).as_bytes());
    }
    let leader_id = node.shared().leader_id();
    let members = node.shared().members();
    let leader = members.iter().find(|mb| mb.id == leader_id);
    match name.as_slice() {
        b"info" => {
            let term = node.shared().status().term;
            let state = if leader.is_some() { "ok" } else { "fail" };
            let text = format!(
                "cluster_enabled:1\r\ncluster_state:{state}\r\ncluster_slots_assigned:16384\r\ncluster_slots_ok:{}\r\ncluster_slots_pfail:0\r\ncluster_slots_fail:0\r\ncluster_known_nodes:{}\r\ncluster_size:1\r\ncluster_current_epoch:{}\r\ncluster_my_epoch:{}\r\n",
                if leader.is_some() { 16384 } else { 0 },
                members.len(),
                term,
                term,
            );
            api::reply_bulk(ctx, text.as_bytes())
        }
        b"slots" | b"shards" | b"nodes" => {
            let Some(leader) = leader else {
                return api::reply_error(ctx, "CLUSTERDOWN No raft leader");
            };
            let mut order: Vec<&Member> = vec![leader];
            order.extend(members.iter().filter(|mb| mb.id != leader.id));
            match name.as_slice() {
                b"slots" => {
                    let mut entry = vec![Value::Int(0), Value::Int(SLOT_MAX)];
                    for mb in &order {
                        let (h, p) = host_port(mb);
                        entry.push(Value::Array(vec![
                            s(h),
                            Value::Int(p),
                            s(cluster_id(mb.id)),
                        ]));
                    }
                    api::reply_value(ctx, &Value::Array(vec![Value::Array(entry)]))
                }
                b"shards" => {
                    let nodes = order
                        .iter()
                        .map(|mb| {
                            let (h, p) = host_port(mb);
                            let role = if mb.id == leader.id {
                                "master"
                            } else {
                                "replica"
                            };
                            Value::Array(vec![
                                s("id"),
                                s(cluster_id(mb.id)),
                                s("port"),
                                Value::Int(p),
                                s("ip"),
                                s(h.clone()),
                                s("endpoint"),
                                s(h),
                                s("role"),
                                s(role),
                                s("replication-offset"),
                                Value::Int(node.shared().applied() as i64),
                                s("health"),
                                s("online"),
                            ])
                        })
                        .collect();
                    let shard = Value::Array(vec![
                        s("slots"),
                        Value::Array(vec![Value::Int(0), Value::Int(SLOT_MAX)]),
                        s("nodes"),
                        Value::Array(nodes),
                    ]);
                    api::reply_value(ctx, &Value::Array(vec![shard]))
                }
                _ => {
                    let mut text = String::new();
                    for mb in &order {
                        let (h, p) = host_port(mb);
                        let myself = if mb.id == me { "myself," } else { "" };
                        let (flags, master, slots) = if mb.id == leader.id {
                            ("master", "-".to_string(), format!(" 0-{SLOT_MAX}"))
                        } else {
                            ("slave", cluster_id(leader.id), String::new())
                        };
                        text.push_str(&format!(
                            "{} {h}:{p}@{} {myself}{flags} {master} 0 0 1 connected{slots}\n",
                            cluster_id(mb.id),
                            bus_port(mb),
                        ));
                    }
                    api::reply_bulk(ctx, text.as_bytes())
                }
            }
        }
        _ => api::reply_error(ctx, "ERR Unknown subcommand."),
    }
}

/// INFO, with `cluster_enabled:1` so cluster clients engage.
pub fn info(ctx: *mut RedisModuleCtx, argv: &[Vec<u8>]) -> c_int {
    let r = api::call(ctx, argv, CallOpts::default());
    if r.is_null() {
        return api::reply_error(ctx, "ERR INFO could not be run");
    }
    let v = api::call_reply_value(r);
    let is_error =
        unsafe { rm!(RedisModule_CallReplyType)(r) } as isize == api::raw::REDISMODULE_REPLY_ERROR;
    if is_error {
        let rc = unsafe { rm!(RedisModule_ReplyWithCallReply)(ctx, r) };
        api::free_call_reply(r);
        return rc;
    }
    api::free_call_reply(r);
    match v {
        Value::Str(text) => {
            let text =
                String::from_utf8_lossy(&text).replace("cluster_enabled:0", "cluster_enabled:1");
            api::reply_bulk(ctx, text.as_bytes())
        }
        other => api::reply_value(ctx, &other),
    }
}
