//! WATCH decided the same way on every node.
//!
//! Every node records, for each key a replicated command modified, the log index of that
//! command (from keyspace notifications fired while an entry is applied; expirations and
//! evictions, which each node does by itself, are not counted). A client's WATCH remembers the
//! leader's applied index; its EXEC entry carries the watched keys with those indexes, and
//! every node aborts the transaction if one of the keys was modified by an entry after it.
//! A key that expires by itself fires no counted event; instead WATCH notes the key's expiry
//! (absolute ms) and the EXEC entry carries the leader's clock, so a key that existed at
//! WATCH and has expired by EXEC aborts the transaction (Redis 7.0 does the same).
//! The record is bounded, in two generations: keys go into the young one; when it holds
//! `GENERATION_KEYS` keys it becomes the old one and the previous old one is forgotten. A
//! forgotten key counts as modified at the newest index of its generation (`floor`), which
//! only ever aborts more, never less, and identically everywhere since it depends only on the
//! applied entries. At least the `GENERATION_KEYS` most recently modified keys are known.
//!
//! A snapshot carries the record as of its index (`codec::WatchRecord`, in its header's
//! metadata): a node that loads a snapshot, at a restart or to catch up, instead of applying
//! the entries before it, still decides every later EXEC as the nodes that applied them.
//!
//! FLUSHDB and FLUSHALL fire no per-key events: as in Redis 7.0, they trip the watched keys
//! that existed (a key missing at WATCH and not written since stays missing through the
//! flush, so it does not trip); WATCH notes a missing key as expiry `MISSING`.
//!
//! Keys are recorded by a 64-bit fingerprint (FNV-1a of the database and the key), not by
//! their bytes: about 40 bytes per tracked key instead of two copies of it. Two keys with
//! the same fingerprint count as one, which again only aborts more, and the same way on
//! every node (the fingerprint depends on nothing but the key).
//!
//! Every applied write records its key, so the record's cost is on every node's apply path.
//! A generation's table is megabytes, and a random key's slot is a cache miss: each
//! generation is one array of (fingerprint, index) pairs (`Table`), and the apply loop
//! prefetches the slot of the command's first key (`prefetch`) before Redis runs it, so the
//! miss overlaps Redis's own lookup instead of following it.

use std::collections::HashMap;
use std::ffi::{c_char, c_int};

use super::api::{self, guard, rm, RedisModuleCtx, RedisModuleString};
use super::MainThread;
use crate::codec::WatchRecord;

/// Keys in one generation of the record; between one and two generations are remembered.
const GENERATION_KEYS: usize = 100_000;

/// A watched key: database, key, the applied index at WATCH, and its expiry then (absolute
/// unix ms; -1: none; `MISSING`: the key did not exist; entries logged before that was
/// noted say -1 for it).
pub type WatchedKey = (i32, Vec<u8>, u64, i64);

/// A watched key's "expiry" when it did not exist at WATCH (what PEXPIRETIME answers).
pub const MISSING: i64 = -2;

/// The fingerprint of `key` in `db` (FNV-1a, 64 bits): stable across processes and builds.
fn fingerprint(db: i32, key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in db.to_le_bytes().iter().chain(key) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Fingerprint → index, with open addressing and linear probing over one array of pairs, so
/// an insert or lookup mostly touches the one cache line `prefetch` fetched. Exact: a
/// fingerprint is never dropped or merged with another (the generations' rule counts
/// distinct fingerprints).
#[derive(Default)]
struct Table {
    /// (fingerprint, index); `EMPTY` as fingerprint marks a free slot. A power of two long
    /// (or empty), at most 4/5 full (`insert` grows it first).
    slots: Vec<(u64, u64)>,
    /// The index of the fingerprint equal to `EMPTY`, which cannot sit in a slot.
    empty_key: Option<u64>,
    len: usize,
}

/// The fingerprint marking a free slot.
const EMPTY: u64 = u64::MAX;
/// Slots a new table starts with.
const MIN_SLOTS: usize = 1024;

impl Table {
    fn len(&self) -> usize {
        self.len
    }

    /// The slot where a search for `fp` starts (the fingerprint is already a hash).
    fn home(&self, fp: u64) -> usize {
        // Fibonacci hashing: the top bits of the product, spread over all of `fp`'s bits.
        let bits = self.slots.len().trailing_zeros();
        (fp.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - bits)) as usize
    }

    fn get(&self, fp: u64) -> Option<u64> {
        if fp == EMPTY {
            return self.empty_key;
        }
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut i = self.home(fp);
        loop {
            let (k, v) = self.slots[i];
            if k == fp {
                return Some(v);
            }
            if k == EMPTY {
                return None;
            }
            i = (i + 1) & mask;
        }
    }

    fn insert(&mut self, fp: u64, index: u64) {
        if fp == EMPTY {
            if self.empty_key.replace(index).is_none() {
                self.len += 1;
            }
            return;
        }
        // At most 4/5 full, so a free slot always ends a search.
        if (self.len + 1) * 5 > self.slots.len() * 4 {
            self.grow();
        }
        let mask = self.slots.len() - 1;
        let mut i = self.home(fp);
        loop {
            let slot = &mut self.slots[i];
            if slot.0 == fp {
                slot.1 = index;
                return;
            }
            if slot.0 == EMPTY {
                *slot = (fp, index);
                self.len += 1;
                return;
            }
            i = (i + 1) & mask;
        }
    }

    fn grow(&mut self) {
        let slots = (self.slots.len() * 2).max(MIN_SLOTS);
        let old = std::mem::replace(&mut self.slots, vec![(EMPTY, 0); slots]);
        self.len = usize::from(self.empty_key.is_some());
        for (k, v) in old.into_iter().filter(|(k, _)| *k != EMPTY) {
            self.insert(k, v);
        }
    }

    /// Empties the table, keeping its slots (a generation fills it again).
    fn clear(&mut self) {
        self.slots.fill((EMPTY, 0));
        self.empty_key = None;
        self.len = 0;
    }

    fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let slotted = self.slots.iter().copied().filter(|(k, _)| *k != EMPTY);
        slotted.chain(self.empty_key.map(|v| (EMPTY, v)))
    }

    /// Asks the CPU to fetch `fp`'s home slot into its cache, for an insert soon after.
    fn prefetch(&self, fp: u64) {
        if self.slots.is_empty() {
            return;
        }
        let p = &self.slots[self.home(fp)] as *const (u64, u64);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch is only a hint; it reads nothing and never faults.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = p;
    }
}

impl FromIterator<(u64, u64)> for Table {
    fn from_iter<I: IntoIterator<Item = (u64, u64)>>(pairs: I) -> Self {
        let mut t = Table::default();
        for (k, v) in pairs {
            t.insert(k, v);
        }
        t
    }
}

#[derive(Default)]
struct Tracker {
    /// Key fingerprint → index of the entry that last modified it: the keys modified since
    /// the last change of generation.
    young: Table,
    /// The generation before; a key in both has its newer index in `young`.
    old: Table,
    /// The newest index in `old`: what its keys count as once it is forgotten.
    old_newest: u64,
    /// Every key in neither generation counts as modified at this index.
    floor: u64,
    /// The entry being applied, while one is.
    applying: Option<u64>,
    /// Database → index of the last FLUSHDB of it; and of the last FLUSHALL.
    flushed: HashMap<i32, u64>,
    flushed_all: u64,
}

impl Tracker {
    fn touch(&mut self, db: i32, key: &[u8], index: u64) {
        self.young.insert(fingerprint(db, key), index);
        if self.young.len() >= GENERATION_KEYS {
            // The old generation is forgotten; the young one becomes old (entries apply in
            // index order, so `index` is its newest).
            self.floor = self.floor.max(self.old_newest);
            self.old_newest = index;
            std::mem::swap(&mut self.old, &mut self.young);
            self.young.clear();
        }
    }

    fn touch_all(&mut self, index: u64) {
        self.young.clear();
        self.old.clear();
        self.old_newest = index;
        self.floor = index;
    }

    fn flushed_after(&self, db: i32, since: u64) -> bool {
        let at = self.flushed.get(&db).copied().unwrap_or(0);
        at.max(self.flushed_all) > since
    }

    fn modified_after(&self, db: i32, key: &[u8], since: u64) -> bool {
        let k = fingerprint(db, key);
        let at = self
            .young
            .get(k)
            .or_else(|| self.old.get(k))
            .unwrap_or(self.floor);
        at > since
    }

    fn record(&self) -> WatchRecord {
        let mut flushed: Vec<(i32, u64)> = self.flushed.iter().map(|(d, i)| (*d, *i)).collect();
        flushed.sort_unstable();
        WatchRecord {
            young: self.young.iter().collect(),
            old: self.old.iter().collect(),
            floor: self.floor,
            old_newest: self.old_newest,
            flushed,
            flushed_all: self.flushed_all,
        }
    }

    fn restore(&mut self, r: WatchRecord) {
        *self = Tracker {
            young: r.young.into_iter().collect(),
            old: r.old.into_iter().collect(),
            old_newest: r.old_newest,
            floor: r.floor,
            applying: None,
            flushed: r.flushed.into_iter().collect(),
            flushed_all: r.flushed_all,
        };
    }
}

static TRACKER: MainThread<Tracker> = MainThread::new_lazy();

/// Client id → the keys it watches, each with the applied index at its WATCH.
static WATCHES: MainThread<HashMap<u64, Vec<WatchedKey>>> = MainThread::new_lazy();

/// Types of keyspace events that mean a replicated command changed a key.
const EVENTS: c_int = api::raw::REDISMODULE_NOTIFY_GENERIC
    | api::raw::REDISMODULE_NOTIFY_STRING
    | api::raw::REDISMODULE_NOTIFY_LIST
    | api::raw::REDISMODULE_NOTIFY_SET
    | api::raw::REDISMODULE_NOTIFY_HASH
    | api::raw::REDISMODULE_NOTIFY_ZSET
    | api::raw::REDISMODULE_NOTIFY_STREAM
    | api::raw::REDISMODULE_NOTIFY_MODULE;

pub fn subscribe(ctx: *mut RedisModuleCtx) -> Result<(), String> {
    if unsafe { rm!(RedisModule_SubscribeToKeyspaceEvents)(ctx, EVENTS, Some(on_event)) } != api::OK
    {
        return Err("could not subscribe to keyspace events".into());
    }
    Ok(())
}

extern "C" fn on_event(
    ctx: *mut RedisModuleCtx,
    _type: c_int,
    _event: *const c_char,
    key: *mut RedisModuleString,
) -> c_int {
    guard(
        "keyspace event",
        || api::OK,
        || {
            let t = TRACKER.get_mut();
            if let Some(index) = t.applying {
                let db = unsafe { rm!(RedisModule_GetSelectedDb)(ctx) };
                let k = unsafe { api::str_bytes(key) };
                t.touch(db, k, index);
                super::blocking::touched(db, k);
            }
            api::OK
        },
    )
}

/// Entry `index` is about to run `argv` in database `db`: prefetches where its first key
/// will be recorded, then brackets it (`set_applying(None)` after). Most writes name their
/// key first; for the others the prefetch only fetches a line for nothing.
pub fn applying(db: i32, argv: &[Vec<u8>], index: u64) {
    let t = TRACKER.get_mut();
    if let Some(key) = argv.get(1) {
        t.young.prefetch(fingerprint(db, key));
    }
    t.applying = Some(index);
}

/// Brackets the execution of entry `index` (None after it).
pub fn set_applying(index: Option<u64>) {
    TRACKER.get_mut().applying = index;
}

/// A command that changes every key of a database at once and fires no per-key events,
/// run in database `db`: FLUSHDB and FLUSHALL trip the watched keys that existed, SWAPDB
/// counts everything as modified.
pub fn note_command(db: i32, argv: &[Vec<u8>], index: u64) {
    let Some(n) = argv.first() else { return };
    let t = TRACKER.get_mut();
    if n.eq_ignore_ascii_case(b"flushall") {
        t.flushed_all = index;
    } else if n.eq_ignore_ascii_case(b"flushdb") {
        t.flushed.insert(db, index);
    } else if n.eq_ignore_ascii_case(b"swapdb") {
        t.touch_all(index);
    }
}

/// Whether a transaction watching `keys` must abort: one was modified by an entry after its
/// WATCH, or it existed at WATCH and its expiry had passed by `now_ms` (the leader's clock at
/// EXEC, carried in the entry).
pub fn tripped(keys: &[WatchedKey], now_ms: i64) -> bool {
    let t = TRACKER.get_mut();
    keys.iter().any(|(db, k, since, expires)| {
        // Expired as Redis decides it: the clock is past the expiry.
        t.modified_after(*db, k, *since)
            || (*expires != MISSING && t.flushed_after(*db, *since))
            || (*expires >= 0 && now_ms > *expires)
    })
}

/// What WATCH knows now, for a snapshot of the applied index (its header's metadata).
pub fn record() -> WatchRecord {
    TRACKER.get_mut().record()
}

/// A snapshot at `index` was loaded in place of the entries before it: WATCH takes what it
/// knew from it. Without a record (a file from before snapshots carried one), every key
/// counts as modified at `index`.
pub fn restore(record: Option<WatchRecord>, index: u64) {
    let t = TRACKER.get_mut();
    match record {
        Some(r) => t.restore(r),
        None => t.touch_all(index),
    }
}

/// WATCH: `keys` with their expiry now (absolute unix ms, -1: none).
pub fn watch(client: u64, db: i32, keys: &[(&[u8], i64)], applied: u64) {
    let w = WATCHES.get_mut().entry(client).or_default();
    for (k, expires) in keys {
        if !w.iter().any(|(d, x, _, _)| *d == db && x.as_slice() == *k) {
            w.push((db, k.to_vec(), applied, *expires));
        }
    }
}

pub fn unwatch(client: u64) {
    WATCHES.get_mut().remove(&client);
}

/// The client's watched keys, clearing them (EXEC and DISCARD unwatch, as in Redis).
pub fn take(client: u64) -> Vec<WatchedKey> {
    WATCHES.get_mut().remove(&client).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modifications_after_the_watch_trip_it() {
        let mut t = Tracker::default();
        t.touch(0, b"a", 5);
        assert!(!t.modified_after(0, b"a", 5));
        assert!(t.modified_after(0, b"a", 4));
        assert!(!t.modified_after(1, b"a", 4), "other database");
        assert!(!t.modified_after(0, b"b", 0), "never modified");
        t.touch(0, b"a", 9);
        assert!(t.modified_after(0, b"a", 5));
        assert_eq!(t.young.len(), 1, "one record per key");
        t.touch_all(12);
        assert!(t.modified_after(0, b"zzz", 11));
        assert!(!t.modified_after(0, b"zzz", 12));
    }

    #[test]
    fn the_table_holds_what_a_map_would() {
        let mut t = Table::default();
        let mut m = HashMap::new();
        // Fingerprints that share home slots and wrap around the end, EMPTY's own, and
        // enough to grow the table several times.
        let mut x: u64 = 1;
        for i in 1..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let fp = match i % 7 {
                0 => EMPTY,
                1 => i % 64,
                2 => u64::MAX - 1 - i % 5,
                _ => x % 30_000,
            };
            t.insert(fp, i);
            m.insert(fp, i);
            assert_eq!(t.len(), m.len());
        }
        for fp in (0..40_000).chain([EMPTY, u64::MAX - 3, u64::MAX - 9]) {
            assert_eq!(t.get(fp), m.get(&fp).copied(), "fingerprint {fp}");
        }
        let mut all: Vec<_> = t.iter().collect();
        all.sort_unstable();
        let mut want: Vec<_> = m.into_iter().collect();
        want.sort_unstable();
        assert_eq!(all, want);
        let slots = t.slots.len();
        t.clear();
        assert_eq!(
            (t.len(), t.get(EMPTY), t.get(5), t.iter().count()),
            (0, None, None, 0)
        );
        assert_eq!(t.slots.len(), slots, "a cleared table keeps its slots");
        t.prefetch(7);
        t.insert(7, 1);
        assert_eq!(t.get(7), Some(1));
    }

    #[test]
    fn a_flush_counts_for_its_database_or_all_of_them() {
        let mut t = Tracker::default();
        assert!(!t.flushed_after(0, 0));
        t.flushed.insert(3, 8);
        assert!(t.flushed_after(3, 7));
        assert!(!t.flushed_after(3, 8));
        assert!(!t.flushed_after(0, 7), "another database");
        t.flushed_all = 10;
        assert!(t.flushed_after(0, 9));
        assert!(!t.flushed_after(3, 10));
    }

    #[test]
    fn forgetting_old_keys_only_makes_aborts_more_likely() {
        let mut t = Tracker::default();
        let n = GENERATION_KEYS as u64;
        // A full generation becomes the old one; its keys are still known exactly.
        for i in 0..n {
            t.touch(0, format!("k{i}").as_bytes(), i + 1);
        }
        assert_eq!(
            (t.floor, t.old_newest, t.old.len(), t.young.len()),
            (0, n, GENERATION_KEYS, 0)
        );
        assert!(t.modified_after(0, b"k0", 0));
        assert!(!t.modified_after(0, b"k0", 1));
        // k0 is modified again: its newer index counts, from the young generation.
        t.touch(0, b"k0", n + 1);
        assert!(t.modified_after(0, b"k0", n));
        // The young generation fills: the first one is forgotten, and its keys count as
        // modified at its newest index.
        for i in 0..n - 1 {
            t.touch(0, format!("x{i}").as_bytes(), n + 2 + i);
        }
        assert_eq!((t.floor, t.old_newest, t.young.len()), (n, 2 * n, 0));
        assert!(
            t.modified_after(0, b"k1", n - 1),
            "forgotten: counts as modified at {n}"
        );
        assert!(!t.modified_after(0, b"k1", n));
        // k0 was modified in the generation still known: its index is exact.
        assert!(t.modified_after(0, b"k0", n));
        assert!(!t.modified_after(0, b"k0", n + 1));
    }

    #[test]
    fn a_restored_record_decides_like_the_original_and_changes_generation_alike() {
        let mut a = Tracker::default();
        let n = GENERATION_KEYS as u64;
        for i in 0..n + 10 {
            a.touch(i as i32 % 3, format!("k{i}").as_bytes(), i + 1);
        }
        a.flushed.insert(2, 50);
        a.flushed_all = 40;
        let mut b = Tracker::default();
        // Through a snapshot header's bytes, as a node loading it gets it.
        let state = crate::codec::SnapshotState {
            watch: a.record(),
            ..Default::default()
        };
        let meta =
            crate::codec::encode_snapshot_meta(&Default::default(), &state, &Default::default());
        let (got, _) = crate::codec::decode_snapshot_state(&meta).unwrap().unwrap();
        b.restore(got.watch);
        // The same keys and the same next change of generation.
        for i in n + 10..2 * n + 20 {
            a.touch(0, format!("k{i}").as_bytes(), i + 1);
            b.touch(0, format!("k{i}").as_bytes(), i + 1);
        }
        assert_eq!((a.floor, a.old_newest), (b.floor, b.old_newest));
        for i in (0..2 * n + 20).step_by(997) {
            let key = format!("k{i}");
            for since in [0, i, i + 1, n, 2 * n] {
                assert_eq!(
                    a.modified_after(i as i32 % 3, key.as_bytes(), since),
                    b.modified_after(i as i32 % 3, key.as_bytes(), since),
                    "{key} since {since}"
                );
            }
        }
        for db in 0..4 {
            for since in [0, 39, 40, 49, 50] {
                assert_eq!(a.flushed_after(db, since), b.flushed_after(db, since));
            }
        }
    }
}
