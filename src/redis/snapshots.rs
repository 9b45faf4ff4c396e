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
use crate::codec::{decode_snapshot_state, encode_snapshot_meta};
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
    /// Size of the snapshot file on disk (None: not looked at since it last changed).
    disk_bytes: Option<u64>,
    /// The log's size when the running save started, and how much it grew during recent
    /// saves (None: none completed yet).
    log_at_start: u64,
    last_growth: Option<u64>,
    /// Saved snapshots whose compaction is running on the raft thread: the log is not yet
    /// smaller, and no automatic snapshot starts meanwhile.
    compacting: u32,
    /// The threshold cannot also bound the snapshots: said once.
    budget_warned: bool,
    /// The compaction trigger last given to the log as its preallocation bound.
    size_cap: Option<u64>,
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

/// The log size at which compaction starts, so that the node's disk use stays below `max`
/// plus one snapshot. The log leaves room for the snapshot already on disk (the last good
/// one stays until the new one is complete) and three times what the log grew during recent
/// saves: the log grows while the new snapshot is written, and compaction
/// then writes the remaining tail to a new file before the old one goes (three, not two:
/// at the write rates the log now takes, twice left a few hundred bytes to spare). The growth is at
/// least a 32nd of `max` (a quick save says little about the next: the end of a save is
/// noticed on Redis's cron, up to 1000/hz ms later), and a quarter of `max` before any save
/// was timed. When that room is more than half of `max`, compacting that
/// early would snapshot too often: the trigger stays `max` and the second value says the
/// bound cannot hold.
pub fn compaction_trigger(max: u64, snapshot_bytes: u64, last_growth: Option<u64>) -> (u64, bool) {
    let growth = match last_growth {
        Some(g) => g.max(max / 32).saturating_mul(3),
        None => max / 4,
    };
    let room = snapshot_bytes.saturating_add(growth);
    if room <= max / 2 {
        (max - room, true)
    } else {
        (max, false)
    }
}

/// The smallest threshold `compaction_trigger` can keep below itself plus one snapshot:
/// room (snapshot + three times the growth, at least 3/32 of the threshold) within its half.
fn bounding_threshold(snapshot_bytes: u64, growth: u64) -> u64 {
    let by_growth = snapshot_bytes
        .saturating_add(growth.saturating_mul(3))
        .saturating_mul(2);
    let by_floor = snapshot_bytes.saturating_mul(32) / 13 + 1;
    by_growth.max(by_floor)
}

/// Called after entries were applied (`check_size`) and before Redis sleeps: takes a
/// snapshot when the log file is too large, or when a follower needs a newer one.
pub fn maybe_snapshot(ctx: *mut RedisModuleCtx, node: &Node, check_size: bool) {
    let max = configs::options().log_max_file_bytes;
    if save::save_in_progress() || loading() || STATE.get_mut().compacting > 0 {
        // A follower's request stays until then.
        return;
    }
    let wanted = node.take_snapshot_wanted();
    if wanted {
        info!("a follower needs a snapshot newer than this node's; taking one");
    } else {
        if !check_size || max == 0 {
            return;
        }
        let (log, at) = (node.log_stats().bytes, trigger(node, max));
        if log <= at {
            return;
        }
        info!(
            "raft log at {log} bytes, past {at} (raft.log-max-file-size {max} less room for the snapshot on disk and the log's growth while the next one is written); taking a snapshot"
        );
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

/// `compaction_trigger` for this node's snapshot file; warns once when the bound cannot hold.
fn trigger(node: &Node, max: u64) -> u64 {
    let st = STATE.get_mut();
    let snapshot_bytes = *st
        .disk_bytes
        .get_or_insert_with(|| std::fs::metadata(&node.snapshot_path).map_or(0, |m| m.len()));
    let (at, bounded) = compaction_trigger(max, snapshot_bytes, st.last_growth);
    if st.size_cap != Some(at) {
        // The log's preallocated zeros stop where compaction starts, so they never take
        // the room kept for the next snapshot.
        st.size_cap = Some(at);
        node.set_log_size_cap(at);
    }
    if let (false, Some(growth), false) = (bounded, st.last_growth, st.budget_warned) {
        st.budget_warned = true;
        warn!(
            "raft.log-max-file-size ({max} bytes) is less than twice the snapshot ({snapshot_bytes} bytes) plus the log's growth while one is written: compaction starts at {max} bytes of log, and while a snapshot is written this node's disk holds the log and two snapshots; raise raft.log-max-file-size above {} bytes to keep disk use below it plus one snapshot",
            bounding_threshold(snapshot_bytes, growth)
        );
    } else if bounded {
        st.budget_warned = false;
    }
    at
}

/// `raft.log-max-file-size` changed: the log's preallocation bound is set again.
pub fn forget_size_cap() {
    STATE.get_mut().size_cap = None;
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
        meta: {
            let (state, order) = carried(ctx)?;
            encode_snapshot_meta(&membership, &state, &order)
        },
    };
    let started = Instant::now();
    save::start_save(
        ctx,
        &node.snapshot_path,
        header,
        Box::new(move |r| saved(r, started)),
    )
    .map_err(|e| e.to_string())?;
    let st = STATE.get_mut();
    st.in_progress = Some((index, term));
    st.log_at_start = node.log_stats().bytes;
    Ok(())
}

/// What the snapshot of the applied index carries besides the keys.
fn carried(
    ctx: *mut RedisModuleCtx,
) -> Result<(crate::codec::SnapshotState, crate::codec::ScriptOrder), String> {
    let saved = super::scripts::saved(ctx)?;
    let state = crate::codec::SnapshotState {
        watch: super::watch::record(),
        functions: saved.functions,
        scripts: saved.scripts,
    };
    Ok((state, saved.order))
}

/// A snapshot at `index` was loaded: what it carries besides the keys replaces this node's.
fn restore_state(meta: &[u8], index: u64) {
    let state = match decode_snapshot_state(meta) {
        Ok(Some(found)) => Some(found),
        Ok(None) => {
            warn!("the snapshot at index {index} was written by an older version and holds only the keys: this node counts every key as modified at its index for WATCH, and lacks the functions and scripts loaded before it (other nodes may decide a WATCH, an FCALL or an EVALSHA otherwise; a snapshot taken by this version carries them)");
            None
        }
        Err(e) => {
            error!("the snapshot at index {index} holds an unreadable state ({e}): WATCH counts every key as modified at its index, and the functions and scripts stay as they are (other nodes may decide a WATCH, an FCALL or an EVALSHA otherwise)");
            None
        }
    };
    let Some((state, order)) = state else {
        super::watch::restore(None, index);
        return;
    };
    super::watch::restore(Some(state.watch), index);
    if let Some(m) = module() {
        super::scripts::restore(
            m.apply_ctx as *mut RedisModuleCtx,
            &state.functions,
            state.scripts,
            order.map(|o| o.permanent),
        );
    }
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
            st.disk_bytes = Some(o.bytes);
            if let Some(node) = module().and_then(|m| m.node()) {
                // The largest recent growth: one quick save says little about the next.
                let grew = node.log_stats().bytes.saturating_sub(st.log_at_start);
                let before = st.last_growth.map_or(0, |g| g - g / 8);
                st.last_growth = Some(grew.max(before));
            }
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
                        st.compacting += 1;
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
    st.compacting = st.compacting.saturating_sub(1);
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
        st.disk_bytes = None;
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
                    restore_state(&o.header.meta, index);
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

#[cfg(test)]
mod tests {
    use super::{bounding_threshold, compaction_trigger};

    #[test]
    fn the_trigger_leaves_room_for_the_snapshot_and_the_growth_while_writing() {
        // 100 MB threshold, 20 MB snapshot, the log grew 4 MB during the last save: room
        // for the snapshot and three times the growth.
        assert_eq!(
            compaction_trigger(100_000_000, 20_000_000, Some(4_000_000)),
            (68_000_000, true)
        );
        // Nothing timed yet: a quarter of the threshold for the growth.
        assert_eq!(compaction_trigger(80_000_000, 0, None), (60_000_000, true));
        // Exactly half is still bounded; more is not, and the trigger stays the threshold.
        // Growth is at least a 32nd of the threshold.
        assert_eq!(
            compaction_trigger(64_000_000, 0, Some(1_000)),
            (58_000_000, true)
        );
        assert_eq!(compaction_trigger(3200, 1300, Some(0)), (1600, true));
        assert_eq!(compaction_trigger(3200, 1301, Some(0)), (3200, false));
        assert_eq!(
            compaction_trigger(64_000_000, 150_000_000, Some(10_000_000)),
            (64_000_000, false)
        );
        // The advice in the warning is a threshold that is bounded.
        for (snap, growth) in [(60, 0), (150_000_000, 10_000_000), (1, 1_000_000)] {
            let max = bounding_threshold(snap, growth);
            assert!(
                compaction_trigger(max, snap, Some(growth)).1,
                "{snap} {growth}"
            );
            assert!(!compaction_trigger(max / 2, snap, Some(growth)).1 || snap < 2);
        }
        // No overflow at the extremes.
        assert_eq!(
            compaction_trigger(u64::MAX, u64::MAX, Some(u64::MAX)),
            (u64::MAX, false)
        );
    }
}
