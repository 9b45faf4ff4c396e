//! The leader's proposal batches between their proposal (on the raft thread or the main
//! thread) and their commit, for the `persisted` and `committed` latency stages
//! (crate::latency).

use std::collections::VecDeque;
use std::time::Instant;

use crate::latency;

/// Bounds the bookkeeping if entries stop committing (no quorum): the oldest are forgotten.
const BATCHES_MAX: usize = 4096;

struct Batch {
    last_index: u64,
    /// How many entries it added to the log: its samples in each stage.
    entries: u64,
    taken: Instant,
}

#[derive(Default)]
pub(super) struct Batches {
    /// The batches not yet committed, oldest first.
    waiting: VecDeque<Batch>,
    /// How many of `waiting` (from the front) this node's log already holds.
    persisted: usize,
}

impl Batches {
    /// A batch that took the log from `before` to `last_index` was taken at `taken`.
    pub(super) fn proposed(&mut self, before: u64, last_index: u64, taken: Instant) {
        if last_index <= before
            || self
                .waiting
                .back()
                .is_some_and(|b| b.last_index >= last_index)
        {
            // Nothing new entered the log (every write was refused).
            return;
        }
        if self.waiting.len() >= BATCHES_MAX {
            self.waiting.pop_front();
            self.persisted = self.persisted.saturating_sub(1);
        }
        self.waiting.push_back(Batch {
            last_index,
            entries: last_index - before,
            taken,
        });
    }

    /// This node's log holds every entry up to `index`.
    pub(super) fn persisted(&mut self, index: u64) {
        let now = Instant::now();
        while let Some(b) = self.waiting.get(self.persisted) {
            if b.last_index > index {
                break;
            }
            latency::PERSISTED.record_n(now.saturating_duration_since(b.taken), b.entries);
            self.persisted += 1;
        }
    }

    /// Every entry up to `index` is committed.
    pub(super) fn committed(&mut self, index: u64) {
        let now = Instant::now();
        while let Some(b) = self.waiting.front() {
            if b.last_index > index {
                break;
            }
            latency::COMMITTED.record_n(now.saturating_duration_since(b.taken), b.entries);
            self.waiting.pop_front();
            self.persisted = self.persisted.saturating_sub(1);
        }
    }
}
