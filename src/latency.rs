//! Where a write's time goes: one histogram per stage of its path, filled by the thread that
//! sees the stage end, read by `INFO raft` and `RAFT.DEBUG LATENCY`.
//!
//! Stages, on the node that took the write (its leader), one sample per write (per log
//! entry), so the stages' percentiles add up to about `total`'s (a batch's time counts once
//! for each of its entries: the writes of big, slow batches weigh as much as they are):
//! - `queued`: the RAFT command arrived, until its event-loop turn ended and the turn's
//!   batch was proposed;
//! - `persisted`: the batch was proposed (by the raft thread, or by the main thread itself:
//!   `node::Node::propose`), until this node's log held it (fsync);
//! - `committed`: the batch was proposed, until a quorum held it;
//! - `applied`: the raft thread handed the committed entries over, until the main thread had
//!   run them all;
//! - `replied`: the main thread ran the write, until its client's reply was written out;
//! - `total`: the RAFT command arrived, until the reply.
//!
//! And for linearizable reads (ReadIndex, on the node that serves them):
//! - `read_round`: a round (one ReadIndex request for the reads of one event-loop turn) went
//!   to the raft thread, until its confirmation came back to the main thread (one sample per
//!   round; a round that failed counts neither itself nor its reads);
//! - `read`: a read arrived, until it ran (its round, then the apply it waited for; XREAD
//!   BLOCK: its first try).
//!
//! Pure Rust; any thread may record (relaxed atomics: each histogram has one writer).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Values below this many microseconds have a bucket each; above, 8 buckets per power of
/// two (about 9% wide).
const LINEAR: u64 = 16;
const SUB_BITS: u32 = 3;
const BUCKETS: usize = 16 + (64 - 4) * 8;

pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    count: AtomicU64,
    max: AtomicU64,
}

fn bucket(us: u64) -> usize {
    if us < LINEAR {
        return us as usize;
    }
    let top = 63 - us.leading_zeros(); // >= 4
    let sub = (us >> (top - SUB_BITS)) & ((1 << SUB_BITS) - 1);
    LINEAR as usize + ((top - 4) as usize) * (1 << SUB_BITS) + sub as usize
}

/// The largest value that falls in bucket `i`.
fn bucket_top(i: usize) -> u64 {
    if i < LINEAR as usize {
        return i as u64;
    }
    let j = i - LINEAR as usize;
    let top = (j >> SUB_BITS) as u32 + 4;
    let sub = (j & ((1 << SUB_BITS) - 1)) as u64;
    let low = (1u64 << top) + (sub << (top - SUB_BITS));
    low.saturating_add((1u64 << (top - SUB_BITS)) - 1)
}

impl Histogram {
    pub const fn new() -> Histogram {
        Histogram {
            buckets: [const { AtomicU64::new(0) }; BUCKETS],
            count: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }

    pub fn record(&self, d: Duration) {
        self.record_n(d, 1);
    }

    /// Records `d` as the time of each of `n` writes (a batch's, which share it).
    pub fn record_n(&self, d: Duration, n: u64) {
        if n == 0 {
            return;
        }
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.buckets[bucket(us).min(BUCKETS - 1)].fetch_add(n, Ordering::Relaxed);
        self.count.fetch_add(n, Ordering::Relaxed);
        self.max.fetch_max(us, Ordering::Relaxed);
    }

    pub fn reset(&self) {
        for b in &self.buckets {
            b.store(0, Ordering::Relaxed);
        }
        self.count.store(0, Ordering::Relaxed);
        self.max.store(0, Ordering::Relaxed);
    }

    pub fn summary(&self) -> Summary {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let max = self.max.load(Ordering::Relaxed);
        let at = |q: f64| -> u64 {
            if total == 0 {
                return 0;
            }
            let want = ((total as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= want {
                    return bucket_top(i).min(max);
                }
            }
            max
        };
        Summary {
            count: total,
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            p999: at(0.999),
            max,
        }
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

/// Percentiles in microseconds (each at most ~9% above the true value).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Summary {
    /// Redis's latencystats format: `p50=..,p99=..,p99.9=..`, plus ours.
    pub fn line(&self) -> String {
        format!(
            "count={},p50={},p90={},p99={},p99.9={},max={}",
            self.count, self.p50, self.p90, self.p99, self.p999, self.max
        )
    }
}

pub static QUEUED: Histogram = Histogram::new();
pub static PERSISTED: Histogram = Histogram::new();
pub static COMMITTED: Histogram = Histogram::new();
pub static APPLIED: Histogram = Histogram::new();
pub static REPLIED: Histogram = Histogram::new();
pub static TOTAL: Histogram = Histogram::new();
pub static READ_ROUND: Histogram = Histogram::new();
pub static READ: Histogram = Histogram::new();

/// Every stage, in path order (a write's, then a read's), with its name.
pub fn stages() -> [(&'static str, &'static Histogram); 8] {
    [
        ("queued", &QUEUED),
        ("persisted", &PERSISTED),
        ("committed", &COMMITTED),
        ("applied", &APPLIED),
        ("replied", &REPLIED),
        ("total", &TOTAL),
        ("read_round", &READ_ROUND),
        ("read", &READ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order() {
        let mut last = 0;
        for us in [
            0u64,
            1,
            15,
            16,
            17,
            31,
            32,
            100,
            1000,
            123_456,
            u64::MAX / 2,
        ] {
            let b = bucket(us);
            assert!(b >= last, "{us}");
            assert!(b < BUCKETS);
            assert!(
                bucket_top(b) >= us,
                "{us} above its bucket's top {}",
                bucket_top(b)
            );
            if us >= LINEAR {
                // About 1/8 of the value wide.
                assert!(
                    bucket_top(b) - us <= us / 8 + 1,
                    "{us}: top {}",
                    bucket_top(b)
                );
            }
            last = b;
        }
    }

    #[test]
    fn percentiles_of_a_known_spread() {
        let h = Histogram::new();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        assert_eq!(s.max, 1000);
        for (got, want) in [(s.p50, 500), (s.p90, 900), (s.p99, 990), (s.p999, 999)] {
            assert!(
                got >= want && got <= want + want / 8 + 1,
                "{got} for {want}"
            );
        }
        h.reset();
        assert_eq!(h.summary(), Summary::default());
    }

    #[test]
    fn a_batch_counts_once_for_each_of_its_writes() {
        let h = Histogram::new();
        h.record_n(Duration::from_micros(10), 1);
        h.record_n(Duration::from_micros(1000), 9);
        h.record_n(Duration::from_micros(5), 0);
        let s = h.summary();
        assert_eq!(s.count, 10);
        assert_eq!(s.max, 1000);
        // Nine of the ten writes took 1000 µs: so did the median write.
        assert!(s.p50 >= 1000 && s.p50 <= 1000 + 1000 / 8 + 1, "{s:?}");
    }
}
