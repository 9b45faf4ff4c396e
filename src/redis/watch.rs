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
//! The record is bounded: the oldest keys are forgotten first, and a forgotten key counts as
//! modified at the newest index forgotten (`floor`), which only ever aborts more, never less,
//! and identically everywhere since it depends only on the applied entries.
//!
//! FLUSHDB and FLUSHALL fire no per-key events: as in Redis 7.0, they trip the watched keys
//! that existed (a key missing at WATCH and not written since stays missing through the
//! flush, so it does not trip); WATCH notes a missing key as expiry `MISSING`.
//!
//! Keys are recorded by a 64-bit fingerprint (FNV-1a of the database and the key), not by
//! their bytes: about 40 bytes per tracked key instead of two copies of it. Two keys with
//! the same fingerprint count as one, which again only aborts more, and the same way on
//! every node (the fingerprint depends on nothing but the key).

use std::collections::{HashMap, VecDeque};
use std::ffi::{c_char, c_int};

use super::api::{self, guard, rm, RedisModuleCtx, RedisModuleString};
use super::MainThread;

/// Keys remembered with their last modification; past this the oldest are forgotten.
const TRACKED_KEYS_MAX: usize = 100_000;

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

#[derive(Default)]
struct Tracker {
    /// Key fingerprint → index of the entry that last modified it.
    last: rustc_hash::FxHashMap<u64, u64>,
    /// Every touch in index order; an entry is stale once `last` holds a newer index for
    /// its key. Stale entries are skipped when forgetting and dropped when compacting.
    log: VecDeque<(u64, u64)>,
    /// Every key not in `last` counts as modified at this index.
    floor: u64,
    /// The entry being applied, while one is.
    applying: Option<u64>,
    /// Database → index of the last FLUSHDB of it; and of the last FLUSHALL.
    flushed: HashMap<i32, u64>,
    flushed_all: u64,
}

impl Tracker {
    fn touch(&mut self, db: i32, key: &[u8], index: u64) {
        let k = fingerprint(db, key);
        if self.last.insert(k, index) == Some(index) {
            return;
        }
        self.log.push_back((index, k));
        // Forget the least recently modified keys, oldest first.
        while self.last.len() > TRACKED_KEYS_MAX {
            let Some((idx, k)) = self.log.pop_front() else {
                break;
            };
            if self.last.get(&k) == Some(&idx) {
                self.last.remove(&k);
                self.floor = self.floor.max(idx);
            }
        }
        // Bounded: drop stale entries once they outnumber the live ones.
        if self.log.len() > 2 * TRACKED_KEYS_MAX {
            let last = &self.last;
            self.log.retain(|(idx, k)| last.get(k) == Some(idx));
        }
    }

    fn touch_all(&mut self, index: u64) {
        self.last.clear();
        self.log.clear();
        self.floor = index;
    }

    fn flushed_after(&self, db: i32, since: u64) -> bool {
        let at = self.flushed.get(&db).copied().unwrap_or(0);
        at.max(self.flushed_all) > since
    }

    fn modified_after(&self, db: i32, key: &[u8], since: u64) -> bool {
        let at = self
            .last
            .get(&fingerprint(db, key))
            .copied()
            .unwrap_or(self.floor);
        at > since
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
        assert_eq!(t.log.len(), 2, "one entry per touch until compaction");
        t.touch_all(12);
        assert!(t.modified_after(0, b"zzz", 11));
        assert!(!t.modified_after(0, b"zzz", 12));
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
        for i in 0..(TRACKED_KEYS_MAX as u64 + 10) {
            t.touch(0, format!("k{i}").as_bytes(), i + 1);
        }
        assert_eq!(t.last.len(), TRACKED_KEYS_MAX);
        assert_eq!(t.floor, 10);
        // k0 was forgotten: a watch from before its modification still trips.
        assert!(t.modified_after(0, b"k0", 5));
        assert!(!t.modified_after(0, b"k0", 10));
    }
}
