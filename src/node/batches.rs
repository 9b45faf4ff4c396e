//! The leader's proposal batches between their proposal (on the raft thread or the main
//! thread) and their commit, for the `persisted` and `committed` latency stages
//! (crate::latency).

use std::collections::VecDeque;
use std::time::Instant;

use crate::latency;

/// Bounds the bookkeeping if entries stop committing (no quorum): the oldest are forgotten.
const BATCHES_MAX: usize = 4096;

#[derive(Default)]
pub(super) struct Batches {
    /// Last index of each batch and when the raft thread took it, oldest first.
    waiting: VecDeque<(u64, Instant)>,
    /// How many of `waiting` (from the front) this node's log already holds.
    persisted: usize,
}

impl Batches {
    /// A batch whose last entry is `last_index` was taken at `taken`.
    pub(super) fn proposed(&mut self, last_index: u64, taken: Instant) {
        if self.waiting.back().is_some_and(|(i, _)| *i >= last_index) {
            // Nothing new entered the log (every write was refused).
            return;
        }
        if self.waiting.len() >= BATCHES_MAX {
            self.waiting.pop_front();
            self.persisted = self.persisted.saturating_sub(1);
        }
        self.waiting.push_back((last_index, taken));
    }

    /// This node's log holds every entry up to `index`.
    pub(super) fn persisted(&mut self, index: u64) {
        let now = Instant::now();
        while let Some((last, taken)) = self.waiting.get(self.persisted) {
            if *last > index {
                break;
            }
            latency::PERSISTED.record(now.saturating_duration_since(*taken));
            self.persisted += 1;
        }
    }

    /// Every entry up to `index` is committed.
    pub(super) fn committed(&mut self, index: u64) {
        let now = Instant::now();
        while let Some((last, taken)) = self.waiting.front() {
            if *last > index {
                break;
            }
            latency::COMMITTED.record(now.saturating_duration_since(*taken));
            self.waiting.pop_front();
            self.persisted = self.persisted.saturating_sub(1);
        }
    }
}
