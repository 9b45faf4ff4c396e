//! Log compaction off the raft thread. Once a snapshot file up to an index is durable, a
//! short-lived `raft-compact` thread drops the entries it covers: it writes the new log file
//! while the raft thread goes on appending to the old one, and holds the log's locks only to
//! copy the kept entries' slots and to switch files (storage's `LogStore::compact`). The raft
//! thread picks the result up on its next turn (`RaftThread::finish_compaction`), so a
//! compaction no longer stops commits for the time a file takes to write and fsync.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use raft::prelude::ConfState;
use tracing::{info, warn};

use super::{lock, ApplyItem, RaftThread};
use crate::codec::{decode, SnapshotMembership};
use crate::storage::LogStore;
use crate::transport::Bell;

/// A compaction running on its own thread.
pub(super) struct Compaction {
    index: u64,
    /// Set by the thread when it is done; the raft thread takes it.
    result: Arc<Mutex<Option<Result<(), String>>>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Compaction {
    /// A node that stops waits for its compaction: nothing touches the log file after it.
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What wakes the raft thread when a compaction is done (as `InputTx::kick` does).
#[derive(Clone)]
pub(super) struct Kick {
    pub(super) bell: Arc<Bell>,
    pub(super) kicked: Arc<AtomicBool>,
}

impl Kick {
    fn ring(&self) {
        self.kicked.store(true, Ordering::Relaxed);
        self.bell.ring();
    }
}

impl RaftThread {
    /// A snapshot file up to `index` is durable: drop the log entries it covers, on a
    /// compaction thread. One compaction at a time; those asked meanwhile follow in order,
    /// each answered on its own (the main thread counts one answer per request).
    pub(super) fn start_compaction(&mut self, index: u64) {
        if self.compaction.is_some() {
            self.compact_next.push_back(index);
            return;
        }
        let result = Arc::new(Mutex::new(None));
        let (store, path) = (self.store.clone(), self.snapshot_path.clone());
        let (done, kick) = (Arc::clone(&result), self.kick.clone());
        let spawned = std::thread::Builder::new()
            .name("raft-compact".into())
            .spawn(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    compact(&store, &path, index)
                }))
                .unwrap_or_else(|_| Err("the compaction thread panicked".into()));
                *lock(&done) = Some(r);
                kick.ring();
            });
        match spawned {
            Ok(t) => {
                self.compaction = Some(Compaction {
                    index,
                    result,
                    thread: Some(t),
                })
            }
            Err(e) => {
                warn!("could not start a compaction thread ({e}); compacting on the raft thread");
                let r = compact(&self.store, &self.snapshot_path, index);
                self.compacted(index, r);
            }
        }
    }

    /// On each turn: a finished compaction is reported, and the next one asked starts.
    pub(super) fn finish_compaction(&mut self) {
        let Some(c) = &self.compaction else { return };
        let Some(r) = lock(&c.result).take() else {
            return;
        };
        let index = c.index;
        // Joins the thread, which has nothing left to do.
        self.compaction = None;
        self.compacted(index, r);
        if let Some(next) = self.compact_next.pop_front() {
            self.start_compaction(next);
        }
    }

    fn compacted(&mut self, index: u64, result: Result<(), String>) {
        if let Err(e) = &result {
            warn!("log compaction up to index {index} failed (the snapshot is kept; the log stays as it was): {e}");
        }
        self.publish_status();
        self.shared
            .push(ApplyItem::Compacted { index, result }, &self.waker);
    }
}

/// Drops the entries the snapshot file at `snapshot_path` (up to `index`) covers.
fn compact(store: &LogStore, snapshot_path: &Path, index: u64) -> Result<(), String> {
    if index <= store.snapshot_meta().index {
        return Ok(());
    }
    let summary = crate::snapshot::format::inspect(snapshot_path).map_err(|e| e.to_string())?;
    if summary.header.index != index {
        return Err(format!(
            "the snapshot file {} is at index {}, not {index}",
            snapshot_path.display(),
            summary.header.index
        ));
    }
    let m: SnapshotMembership = decode(&summary.header.meta).map_err(|e| e.to_string())?;
    let cs = ConfState {
        voters: m.voters,
        learners: m.learners,
        ..Default::default()
    };
    let before = store.stats();
    let started = Instant::now();
    // The dropped entries are freed, and their pages handed back, in the background.
    let held = match store.compact(index, &cs) {
        Ok(held) => held,
        // A snapshot from the leader replaced the log meanwhile, past this one.
        Err(_) if index <= store.snapshot_meta().index => return Ok(()),
        Err(e) => return Err(e.to_string()),
    };
    let after = store.stats();
    info!(
        "raft log compacted up to index {index}: {} entries and {} bytes before, {} entries and {} bytes after, in {} ms (appends waited {} ms)",
        before.entries,
        before.bytes,
        after.entries,
        after.bytes,
        started.elapsed().as_millis(),
        held.as_millis()
    );
    Ok(())
}
