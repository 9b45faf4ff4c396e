//! `INFO raft`: Redis prefixes our sections and fields with the module name, so a field
//! added here as `node_id` reads `raft_node_id`, as in RedisRaft.

use std::ffi::{c_int, CString};

use crate::redis::api::{guard, raw, rm};
use crate::redis::configs;
use crate::redis::module;
use crate::transport::PeerState;

struct Info(*mut raw::RedisModuleInfoCtx);

impl Info {
    fn section(&self, name: &str) {
        let c = CString::new(name).unwrap_or_default();
        unsafe { rm!(RedisModule_InfoAddSection)(self.0, c.as_ptr()) };
    }
    fn str(&self, field: &str, v: &str) {
        let f = CString::new(field).unwrap_or_default();
        let v = CString::new(v.replace(['\r', '\n', '\0'], " ")).unwrap_or_default();
        unsafe { rm!(RedisModule_InfoAddFieldCString)(self.0, f.as_ptr(), v.as_ptr()) };
    }
    fn num(&self, field: &str, v: u64) {
        let f = CString::new(field).unwrap_or_default();
        unsafe { rm!(RedisModule_InfoAddFieldULongLong)(self.0, f.as_ptr(), v) };
    }
    fn int(&self, field: &str, v: i64) {
        let f = CString::new(field).unwrap_or_default();
        unsafe { rm!(RedisModule_InfoAddFieldLongLong)(self.0, f.as_ptr(), v) };
    }
}

pub extern "C" fn info_func(ctx: *mut raw::RedisModuleInfoCtx, _for_crash_report: c_int) {
    guard("INFO raft", || (), || fill(&Info(ctx)))
}

fn peer_state_name(s: &PeerState) -> &'static str {
    match s {
        PeerState::Disconnected => "disconnected",
        PeerState::Connecting => "connecting",
        PeerState::Connected => "connected",
        PeerState::ConnectError => "connect_error",
    }
}

fn fill(i: &Info) {
    let Some(m) = module() else { return };
    let opts = configs::options();
    i.section("general");
    let Some(node) = m.node() else {
        i.str("dbid", "");
        i.num("node_id", 0);
        i.str("node_name", &opts.node_id);
        let state = if m.is_removed() {
            "removed"
        } else if crate::redis::is_joining() {
            "joining"
        } else {
            "uninitialized"
        };
        i.str("state", state);
        i.str("role", "(none)");
        return;
    };
    let sh = node.shared();
    let st = sh.status();
    let me = sh.node_id;
    i.str("dbid", &sh.cluster_id());
    i.num("node_id", me);
    i.str(
        "node_name",
        &sh.member(me)
            .map(|mb| mb.name)
            .unwrap_or(opts.node_id.clone()),
    );
    i.str(
        "state",
        if sh.is_removed() {
            "removed"
        } else if crate::redis::snapshots::loading() {
            "loading"
        } else if st.failure.is_some() {
            "stopped"
        } else {
            "up"
        },
    );
    i.str("role", st.role.name());
    i.str(
        "is_voting",
        if st.voters.contains(&me) { "yes" } else { "no" },
    );
    i.num("voted_for", st.voted_for);
    i.int(
        "leader_id",
        if st.leader_id == 0 {
            -1
        } else {
            st.leader_id as i64
        },
    );
    let leader = (st.leader_id != 0)
        .then(|| sh.member(st.leader_id))
        .flatten();
    i.str(
        "leader_name",
        leader.as_ref().map(|l| l.name.as_str()).unwrap_or(""),
    );
    i.str(
        "leader_addr",
        leader.as_ref().map(|l| l.redis_addr.as_str()).unwrap_or(""),
    );
    i.num("current_term", st.term);
    i.num("num_nodes", (st.voters.len() + st.learners.len()) as u64);
    i.num("num_voting_nodes", st.voters.len() as u64);
    let ids = |v: &[u64]| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    i.str("voters", &ids(&st.voters));
    i.str("learners", &ids(&st.learners));
    if let Some(f) = &st.failure {
        i.str("failure", f);
    }
    let peers = node.peers();
    let mut n = 0;
    for mem in sh.members() {
        if mem.id == me {
            continue;
        }
        let p = peers.iter().find(|p| p.id == mem.id);
        let progress = st.progress.iter().find(|x| x.0 == mem.id);
        let (host, port) = mem
            .redis_addr
            .rsplit_once(':')
            .map(|(h, p)| (h.to_string(), p.to_string()))
            .unwrap_or_default();
        let v = format!(
            "id={},name={},state={},voting={},addr={},port={},bus_addr={},last_conn_secs={},conn_errors={},conn_oks={},match_index={},next_index={}",
            mem.id,
            mem.name,
            p.map(|p| peer_state_name(&p.state)).unwrap_or("disconnected"),
            if st.voters.contains(&mem.id) { "yes" } else { "no" },
            host,
            port,
            mem.bus_addr,
            p.map(|p| p.last_conn_secs).unwrap_or(0),
            p.map(|p| p.conn_errors).unwrap_or(0),
            p.map(|p| p.conn_oks).unwrap_or(0),
            progress.map(|x| x.1.to_string()).unwrap_or_else(|| "-".into()),
            progress.map(|x| x.2.to_string()).unwrap_or_else(|| "-".into()),
        );
        i.str(&format!("node{n}"), &v);
        n += 1;
    }

    i.section("log");
    i.str("log_filename", &opts.log_filename);
    i.num("log_entries", st.log.entries);
    i.num("current_index", st.last_index);
    i.num("commit_index", st.commit_index);
    i.num("last_applied_index", sh.applied());
    // Applied commands that answered an error here since start (WRONGTYPE ...): nodes that
    // applied the same entries count alike; logged each at `raft.loglevel verbose`.
    i.num("apply_errors", crate::redis::apply_errors());
    i.num("file_size", st.log.bytes);
    i.num("cache_memory_size", st.log.cache_bytes);
    i.num("cache_entries", st.log.cache_entries);
    // What raft.log-max-cache-size bounds: the cached payloads and a slot per entry.
    i.num("log_memory_size", st.log.cache_bytes + st.log.slot_bytes);
    i.num("fsync_count", st.log.fsync_count);
    i.num("fsync_max_microseconds", st.log.fsync_max_us);
    i.num("fsync_avg_microseconds", st.log.fsync_avg_us);
    i.str("log_fsync", if opts.log_fsync { "yes" } else { "no" });
    // ok; full: a write found no space, tried again until it works (writes refused
    // meanwhile); failed: a write or fsync failed, the node stopped until restarted.
    let (log_state, log_error) = match (&st.log_failed, &st.log_full) {
        (Some(e), _) => ("failed", e.as_str()),
        (None, Some(e)) => ("full", e.as_str()),
        (None, None) => ("ok", ""),
    };
    i.str("log_state", log_state);
    i.str("log_error", log_error);

    // RedisRaft's names; sizes in bytes, times in seconds.
    let snap = crate::redis::snapshots::state();
    i.section("snapshot");
    i.str(
        "snapshot_filename",
        &node.snapshot_path.display().to_string(),
    );
    i.num("snapshot_last_idx", st.log.snapshot_index);
    i.num("snapshot_last_term", st.log.snapshot_term);
    i.num(
        "snapshot_size",
        std::fs::metadata(&node.snapshot_path).map_or(0, |m| m.len()),
    );
    i.int(
        "snapshot_time_secs",
        snap.last_duration.map_or(-1, |d| d.as_secs() as i64),
    );
    i.num(
        "snapshot_time_ms",
        snap.last_duration.map_or(0, |d| d.as_millis() as u64),
    );
    i.num(
        "snapshot_fork_ms",
        snap.last_fork.map_or(0, |d| d.as_millis() as u64),
    );
    i.num("snapshots_created", snap.created);
    i.num("snapshots_received", snap.received);
    i.str(
        "snapshot_in_progress",
        if snap.in_progress.is_some() {
            "yes"
        } else {
            "no"
        },
    );
    i.num(
        "snapshot_in_progress_last_idx",
        snap.in_progress.map_or(0, |p| p.0),
    );
    i.num(
        "snapshot_in_progress_last_term",
        snap.in_progress.map_or(0, |p| p.1),
    );
    i.str(
        "snapshot_last_error",
        snap.last_error.as_deref().unwrap_or(""),
    );
    i.str(
        "loading",
        if crate::redis::snapshots::loading() {
            "yes"
        } else {
            "no"
        },
    );
    if let Some((_, done, total)) = snap.loading {
        i.num("loading_keys_done", done);
        i.num("loading_keys_total", total);
    }
    i.num("log_max_file_size", opts.log_max_file_bytes);
    i.num("log_max_cache_size", opts.log_max_cache_bytes);

    // Where this node's writes and linearizable reads spend their time, in microseconds
    // (crate::latency).
    i.section("latency");
    for (name, h) in crate::latency::stages() {
        i.str(&format!("latency_{name}_usec"), &h.summary().line());
    }
}
