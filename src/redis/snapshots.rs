//! Snapshots on the main thread: taking one when the log grows past
//! `raft.log-max-file-size` (or on `RAFT.DEBUG COMPACT`) and then compacting the log, and
//! loading one (at start when the log begins after a snapshot, or when the leader sent one)
//! in slices while data commands get `-LOADING`.
//!
//! Invariant: a snapshot stands for exactly the dataset after applying entries up to its
//! index: it is forked only between entries, with the membership published for that index.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::api::{self, RedisModuleBlockedClient, RedisModuleCtx};
use super::{configs, finish, module, MainThread};
use crate::codec::encode;
use crate::node::Node;
use crate::snapshot::format::SnapshotHeader;
use crate::snapshot::{load, save};

/// What `INFO raft` shows about snapshots, and the state of the current load.
#[derive(Default)]
pub struct SnapshotState {
    pub created: u64,
    pub received: u64,
    pub last_bytes: u64,
    pub last_keys: u64,
    pub last_duration: Option<Duration>,
    pub last_fork: Option<Duration>,
    pub last_error: Option<String>,
    /// Index and term of the save running now.
    pub in_progress: Option<(u64, u64)>,
    /// A load is running (index it brings the dataset to; keys loaded / total).
    pub loading: Option<(u64, u64, u64)>,
    /// A load failed: the dataset is partial until the node restarts.
    pub load_failed: Option<String>,
    /// Clients waiting on RAFT.DEBUG COMPACT: for the save, then for the compaction.
    waiters: Vec<usize>,
    compact_waiters: Vec<usize>,
}

static STATE: MainThread<SnapshotState> = MainThread::new_lazy();

pub fn state() -> &'static mut SnapshotState {
    STATE.get_mut()
}

/// True while the dataset is being replaced by a snapshot (data commands get -LOADING).
pub fn loading() -> bool {
    let st = STATE.get_mut();
    st.loading.is_some() || st.load_failed.is_some()
}

/// The error data commands get while `loading()`.
pub fn loading_error() -> String {
    match &STATE.get_mut().load_failed {
        Some(e) => format!(
            "ERR this node could not load its raft snapshot ({e}); restart it to load it again"
        ),
        None => "LOADING Raft module is loading data".into(),
    }
}

/// Called after entries were applied (`check_size`) and before Redis sleeps: takes a
/// snapshot when the log file is too large, or when a follower needs a newer one.
pub fn maybe_snapshot(ctx: *mut RedisModuleCtx, node: &Node, check_size: bool) {
    let max = configs::options().log_max_file_bytes;
    if save::save_in_progress() || loading() {
        return;
    }
    let max = if max == 0 { u64::MAX } else { max };
    let wanted = node.take_snapshot_wanted();
    if !wanted && (!check_size || node.log_stats().bytes <= max) {
        return;
    }
    if wanted {
        info!("a follower needs a snapshot newer than this node's; taking one");
    }
    if let Err(e) = start(ctx, node) {
        // Retried after the next applied entries; say it once per cause.
        let st = STATE.get_mut();
        if st.last_error.as_deref() != Some(e.as_str()) {
            warn!(
                "raft snapshot failed to start: {e}; {}",
                what_stays(Some(node))
            );
            st.last_error = Some(e);
        }
    }
}

/// RAFT.DEBUG COMPACT: take a snapshot now and compact the log; the client gets +OK once
/// the snapshot is durable and the log compacted.
pub fn compact_now(ctx: *mut RedisModuleCtx, node: &Node) -> std::ffi::c_int {
    if save::save_in_progress() {
        return api::reply_error(ctx, "ERR snapshot is in progress");
    }
    if loading() {
        return api::reply_error(ctx, &loading_error());
    }
    if node.shared().applied() <= node.log_stats().snapshot_index {
        // Nothing new since the last snapshot.
        return api::reply_simple(ctx, "OK");
    }
    let bc = super::block(ctx);
    if bc.is_null() {
        return api::reply_error(ctx, "ERR could not block the client");
    }
    match start(ctx, node) {
        Ok(()) => STATE.get_mut().waiters.push(bc as usize),
        Err(e) => {
            warn!(
                "raft snapshot failed to start: {e}; {}",
                what_stays(Some(node))
            );
            STATE.get_mut().last_error = Some(e.clone());
            finish(bc, Err(format!("ERR failed to begin compaction: {e}")));
        }
    }
    api::OK
}

/// What a failed snapshot leaves for a restart or a follower to use, for its log line.
fn what_stays(node: Option<&Node>) -> String {
    match node.map(|n| n.log_stats().snapshot_index) {
        Some(0) => "there is no previous snapshot; the log is kept whole".into(),
        Some(i) => format!("the previous snapshot at index {i} stays valid and the log is kept"),
        None => "the previous snapshot stays valid and the log is kept".into(),
    }
}

/// Forks a save of the dataset as of the applied index, with the membership as of it.
fn start(ctx: *mut RedisModuleCtx, node: &Node) -> Result<(), String> {
    let index = node.shared().applied();
    let (membership_index, membership) = node.shared().membership();
    if membership_index > index {
        return Err(format!(
            "a membership change at index {membership_index} is not applied yet (applied {index})"
        ));
    }
    let term = node
        .term(index)
        .ok_or_else(|| format!("the term of index {index} is not in the log"))?;
    let header = SnapshotHeader {
        index,
        term,
        meta: encode(&membership),
    };
    let started = Instant::now();
    save::start_save(
        ctx,
        &node.snapshot_path,
        header,
        Box::new(move |r| saved(r, started)),
    )
    .map_err(|e| e.to_string())?;
    STATE.get_mut().in_progress = Some((index, term));
    Ok(())
}

fn saved(r: Result<save::SaveOutcome, save::SaveError>, started: Instant) {
    let st = STATE.get_mut();
    st.in_progress = None;
    let waiters = std::mem::take(&mut st.waiters);
    let result = match r {
        Ok(o) => {
            st.created += 1;
            st.last_bytes = o.bytes;
            st.last_keys = o.keys;
            st.last_duration = Some(o.duration);
            st.last_fork = Some(o.fork_duration);
            st.last_error = None;
            info!(
                "raft snapshot at index {} written: {} keys, {} bytes in {} ms (fork {} ms); compacting the log",
                o.header.index,
                o.keys,
                o.bytes,
                started.elapsed().as_millis(),
                o.fork_duration.as_millis()
            );
            match module().and_then(|m| m.node()) {
                Some(node) => match node.compact(o.header.index) {
                    Ok(()) => {
                        // Answered once the raft thread compacted (`compacted`).
                        st.compact_waiters.extend(waiters);
                        return;
                    }
                    Err(e) => Err(format!("ERR the log could not be compacted: {e}")),
                },
                None => Ok(()),
            }
        }
        Err(e) => {
            // The previous snapshot file, if any, is untouched; the log is kept whole.
            let node = module().and_then(|m| m.node());
            warn!("raft snapshot failed: {e}; {}", what_stays(node));
            st.last_error = Some(e.to_string());
            Err(format!("ERR {e}"))
        }
    };
    for w in waiters {
        finish(
            w as *mut RedisModuleBlockedClient,
            result.clone().map(|()| "OK".to_string()),
        );
    }
}

/// The raft thread compacted the log after the snapshot at `index` (or could not).
pub fn compacted(index: u64, result: Result<(), String>) {
    let st = STATE.get_mut();
    if let Err(e) = &result {
        st.last_error = Some(format!("compaction up to index {index}: {e}"));
    }
    for w in std::mem::take(&mut st.compact_waiters) {
        finish(
            w as *mut RedisModuleBlockedClient,
            result
                .clone()
                .map(|()| "OK".to_string())
                .map_err(|e| format!("ERR the log could not be compacted: {e}")),
        );
    }
}

/// Replaces the dataset with the snapshot at `path` (up to `index`), in slices. `then` runs
/// once it is loaded (on the main thread), to go on applying entries.
pub fn start_loading(
    ctx: *mut RedisModuleCtx,
    path: &Path,
    index: u64,
    received: bool,
    then: fn(),
) {
    let st = STATE.get_mut();
    st.loading = Some((index, 0, 0));
    if received {
        st.received += 1;
    }
    info!(
        "loading the raft snapshot {} (index {index}); data commands get -LOADING meanwhile",
        path.display()
    );
    let started = Instant::now();
    let path_buf: PathBuf = path.to_path_buf();
    let r = load::start_load(
        ctx,
        path,
        load::LoadOptions::default(),
        Box::new(move |p| {
            STATE.get_mut().loading = Some((index, p.keys_loaded, p.keys_total));
        }),
        Box::new(move |r| {
            let st = STATE.get_mut();
            st.loading = None;
            match r {
                Ok(o) => {
                    info!(
                        "raft snapshot {} loaded: {} keys in {} ms (longest slice {} ms)",
                        path_buf.display(),
                        o.keys,
                        started.elapsed().as_millis(),
                        o.longest_slice.as_millis()
                    );
                    if let Some(node) = module().and_then(|m| m.node()) {
                        node.shared().set_applied(index);
                    }
                    then();
                }
                Err(e) => {
                    error!("raft snapshot {} could not be loaded: {e}; this node serves no data until it is restarted", path_buf.display());
                    st.load_failed = Some(e.to_string());
                }
            }
        }),
    );
    if let Err(e) = r {
        error!(
            "raft snapshot {} could not be loaded: {e}; this node serves no data until it is restarted",
            path.display()
        );
        let st = STATE.get_mut();
        st.loading = None;
        st.load_failed = Some(e.to_string());
    }
}
