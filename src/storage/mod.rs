//! Durable Raft log and hard state, implementing `raft::Storage`.
//!
//! File: `<dir>/<raft.log-filename>`, append-only, a sequence of records:
//! `[len: u32 LE][crc32 of payload: u32 LE][payload: len bytes]`; payload's first byte
//! is the record kind (entry, hard state, conf state, ...). See ARCHITECTURE.md.
//!
//! Invariant: nothing is handed to raft-rs as persisted until `sync()` returned Ok, or
//! `write()` and after it `fdatasync()` (which the raft thread leaves to its syncer thread).
//!
//! INTERFACE (fixed; the node layer is written against it):
//!   LogStore::open(path: &Path, fsync: bool) -> Result<(LogStore, Recovery), StorageError>
//!   LogStore::open_with_cache(path, fsync, cache_max_bytes: u64)       // same, cache bound given
//!   LogStore: Clone (a shared handle: Arc inside), Send + Sync
//!   fn initialize(&self, cs: ConfState) -> Result<(), StorageError>   // first boot only: when empty
//!   fn is_empty(&self) -> bool                                       // no records at all
//!   fn append(&self, entries: &[Entry]) -> Result<(), StorageError>  // truncates a conflicting suffix
//!   fn set_hard_state(&self, hs: &HardState) -> Result<(), StorageError>
//!   fn set_commit(&self, commit: u64) -> Result<(), StorageError>
//!   fn set_conf_state(&self, cs: &ConfState) -> Result<(), StorageError>
//!   fn sync(&self) -> Result<(), StorageError>                        // write buffered records + one fsync (if enabled)
//!   fn write(&self) -> Result<bool, StorageError>                     // sync's first half: true when an fsync is owed
//!   fn fdatasync(&self) -> Result<(), StorageError>                   // sync's second half, from any thread
//!   fn set_fsync(&self, on: bool)
//!   fn set_cache_max_bytes(&self, bytes: u64)                        // raft.log-max-cache-size
//!   fn stats(&self) -> LogStats
//!   fn compact(&self, index: u64, cs: &ConfState) -> Result<Duration, StorageError> // from any thread; appends go on
//!   fn apply_snapshot(&self, snap: SnapshotMeta, membership: (u64, &[u8])) -> Result<(), StorageError>
//!   impl raft::Storage for LogStore
//!
//! The byte layout (file header, record kinds, limits) lives in `record.rs` and nowhere else.
//!
//! Writes are two-step: `append`/`set_*` update the in-memory state (which raft-rs reads) and
//! encode a record into a write buffer; `sync` writes the whole buffer with one `write_all` and,
//! when fsync is on, one `fdatasync`. On disk the records are in the order they were buffered, so
//! replaying the file rebuilds exactly the in-memory state as of the last successful `sync`.
//!
//! Invariants checked on every write and again on replay:
//! - entry indexes are consecutive from `first_index()`; an append at or below the last index
//!   replaces the suffix from that index (a conflict), and never a committed entry;
//! - the commit index never passes the last index in the log (append entries before the hard
//!   state that commits them).
//!
//! Crash recovery: damage confined to the end of the file (a record cut short, a last record
//! whose CRC fails, a zero-filled tail) is a torn write and is truncated away on open. Any other
//! damage is `StorageError::Corrupt`: the node refuses to start rather than lose acknowledged
//! entries silently.
//!
//! After a failed write or fsync the store refuses all further writes (`StorageError::Failed`):
//! after a failed fsync the kernel may have dropped the dirty pages, so retrying could report
//! success for data that never reached the disk. The one exception is a *write* that found
//! the file system full (ENOSPC, EDQUOT: `StorageError::NoSpace`): the buffer is kept, and
//! the next `sync` writes it again from the same offset, so a log recovers by itself once
//! space is freed. raft-rs is told nothing is persisted until a `sync` returns Ok.
//!
//! Entry cache (`raft.log-max-cache-size`): every entry has a slot in memory (term, and the
//! offset and length of its record in the current file), so `term()` never reads the disk.
//! Only the newest entries keep their payload in memory, as many as fit in the bound (counted
//! as their encoded size); older ones are read back from the file, CRC-checked, when raft-rs
//! asks for them (a follower catching up, entries to apply). An entry is evicted only once its
//! record was written to the file, so entries not yet `sync`ed may exceed the bound until the
//! next `sync`. Offsets stay valid because the file only grows (a truncated suffix leaves dead
//! records behind, never moves live ones) until a rewrite, which sets every slot's new offset.

pub(crate) mod record;

use std::collections::VecDeque;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use prost::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState};

use record::{HeaderCheck, ScanError};

/// Read buffer for replay on open.
const REPLAY_READ_BUFFER_BYTES: usize = 1024 * 1024;
/// After a large batch, the write buffer gives back memory above this size.
const WRITE_BUFFER_KEEP_BYTES: usize = 4 * 1024 * 1024;
/// With fsync on, the file is extended with zeros ahead of its records, by an eighth of its
/// size within these bounds (see `Writer::allocated`).
const PREALLOCATE_MIN_BYTES: u64 = 64 * 1024;
const PREALLOCATE_MAX_BYTES: u64 = 1024 * 1024;
/// `raft.log-max-cache-size`'s default, for `open`.
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 64_000_000;
/// Evicted entries are read back with one read per run of adjacent records, at most this long.
const READ_RUN_MAX_BYTES: u64 = 4 * 1024 * 1024;

/// Errors from the raft log. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An operating-system call on the log failed (open, read, write, fsync, truncate...).
    #[error("raft log {}: {what} failed: {source}", .path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// The file is damaged somewhere other than a torn tail, or is not a log this build reads.
    #[error(
        "raft log {} is corrupt at byte offset {offset}: {reason}; refusing to start \
         (move the file aside to rebuild this node from its peers)",
        .path.display()
    )]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    /// An entry evicted from the cache could not be read back from the file (damaged since
    /// it was written). raft-rs gets this as `StorageError::Other`.
    #[error(
        "raft log {}: cannot read back an evicted entry at byte offset {offset}: {reason}",
        .path.display()
    )]
    Unreadable {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    /// The caller asked for something that would break the log's invariants (a bug upstream).
    #[error("raft log {}: {reason}", .path.display())]
    Invalid { path: PathBuf, reason: String },
    /// The file system had no room for a write (ENOSPC, or EDQUOT: a quota). Nothing was
    /// lost: the records stay buffered, and the next `sync` writes them again from the same
    /// offset. The store keeps accepting changes meanwhile.
    #[error(
        "raft log {}: {source}; writes resume when space is freed",
        .path.display()
    )]
    NoSpace {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An earlier write or fsync failed; the store accepts no more writes.
    #[error(
        "raft log {} is unusable after an earlier failure ({cause}); restart the node",
        .path.display()
    )]
    Failed { path: PathBuf, cause: String },
}

impl StorageError {
    /// A full file system: `sync` may succeed later, once space is freed (see `NoSpace`).
    pub fn is_no_space(&self) -> bool {
        matches!(self, StorageError::NoSpace { .. })
    }

    /// What went wrong first: for `Failed` (the store refused because of an earlier failure),
    /// that failure, worded as it was when it happened (`raft log <file>: fsync failed:
    /// ...`); otherwise this error. Whichever caller trips over a failed store first, the
    /// node then names the cause, not its echo.
    pub fn first_failure(&self) -> String {
        match self {
            StorageError::Failed { path, cause } => {
                format!("raft log {}: {cause}", path.display())
            }
            other => other.to_string(),
        }
    }

    /// `raft log <file>: <the OS's error>`: what failed, without advice.
    pub fn short(&self) -> String {
        match self {
            StorageError::NoSpace { path, source } => {
                format!("raft log {}: {source}", path.display())
            }
            other => other.to_string(),
        }
    }
}

/// A write error the store may retry: the file system was full (or the user's quota used
/// up). Only a failed *write*: a failed fsync is never retried, whatever its error.
fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Test-only fault injection (`RAFT.DEBUG LOG-FAULT`): the store's next write or fsync
/// fails as a failing or full disk would make it fail, without touching the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFault {
    /// The next write fails with EIO (once: the store refuses writes after it anyway).
    WriteEio,
    /// The next fsync fails with EIO (once, likewise).
    FsyncEio,
    /// Every write fails with ENOSPC until the fault is cleared.
    NoSpace,
}

/// What `open` found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// The file was new (or empty) and a fresh header was written.
    pub created: bool,
    /// Records replayed.
    pub records: u64,
    /// Entries in the log after replay (conflicting suffixes already removed).
    pub entries: u64,
    pub first_index: u64,
    pub last_index: u64,
    /// Bytes of a torn write (from a crash) cut off the end of the file.
    pub torn_tail_bytes_dropped: u64,
    /// File size after recovery.
    pub file_bytes: u64,
}

/// Where a snapshot ends: its last index and term, and the configuration as of it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SnapshotMeta {
    pub index: u64,
    pub term: u64,
    pub conf_state: ConfState,
}

/// Counters for `INFO raft` and friends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Entries in the log.
    pub entries: u64,
    /// Bytes written to the file (its size); records still buffered are not counted.
    pub bytes: u64,
    pub first_index: u64,
    pub last_index: u64,
    /// The snapshot the log starts after (0: none).
    pub snapshot_index: u64,
    pub snapshot_term: u64,
    pub fsync_count: u64,
    pub fsync_max_us: u64,
    pub fsync_avg_us: u64,
    /// Entries whose payload is held in memory, and their encoded size.
    pub cache_entries: u64,
    pub cache_bytes: u64,
    /// Memory of the per-entry slots (term, file offset, length; one per entry in the log)
    /// and of the queues holding them, as allocated. The cache bound counts these and
    /// `cache_bytes` together.
    pub slot_bytes: u64,
}

/// The durable raft log. A cheap-to-clone shared handle.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// raft-rs asked for a snapshot this store cannot give (none, too old, or without the
    /// follower in its configuration): the main thread should take a new one.
    snapshot_wanted: std::sync::atomic::AtomicBool,
    /// Lock order: `core` before `writer`, so records reach the buffer in the order their
    /// changes reach memory.
    core: RwLock<Core>,
    writer: Mutex<Writer>,
    /// Held by `fdatasync` from its check of `Writer::failed` until it recorded its result:
    /// one fsync at a time. Linux reports a writeback error to one fsync of the file only,
    /// so a second fsync running alongside (or right after, before the failure is recorded)
    /// could return Ok for pages that never reached the disk. Lock order: before `writer`.
    fsync: Mutex<()>,
    /// Held through a whole rewrite (a compaction writes its new file without `core` or
    /// `writer`): one rewrite at a time, and its temporary file is its own. Lock order:
    /// before `core`.
    rewriting: Mutex<()>,
}

#[cfg(test)]
thread_local! {
    /// Runs inside `compact` after the new file is written and before the log switches to
    /// it: what a test appends there must reach the new file too.
    static DURING_COMPACTION: std::cell::RefCell<Option<Box<dyn FnOnce()>>> =
        const { std::cell::RefCell::new(None) };
}

/// Room for this many entries the cache queue keeps however small it gets (~72 kB).
const CACHE_KEEP_ENTRIES: usize = 1024;

/// What one slot costs in memory.
const SLOT_BYTES: u64 = std::mem::size_of::<EntrySlot>() as u64;

/// Where an entry's record is in the current file: enough to read it back, and its term.
#[derive(Debug, Clone, Copy)]
struct EntrySlot {
    term: u64,
    /// Byte offset of the record (its frame header).
    offset: u64,
    /// The record's length, frame header included.
    record_len: u32,
}

impl EntrySlot {
    fn record_end(&self) -> u64 {
        self.offset + u64::from(self.record_len)
    }

    /// The entry's encoded size (what `raft::util::limit_size` counts).
    fn entry_bytes(&self) -> u64 {
        u64::from(self.record_len).saturating_sub(record::FRAME_HEADER_LEN + 1)
    }
}

/// The in-memory state raft-rs reads.
struct Core {
    /// Index of `slots[0]`: 1, or the entry after the snapshot.
    first_index: u64,
    /// One slot per entry in the log, from `first_index` on.
    slots: VecDeque<EntrySlot>,
    /// The newest entries, payloads included: a suffix of the log (the last `cache.len()`
    /// slots). Invariant: `cache.len() <= slots.len()`, `cache_bytes` is their encoded size.
    cache: VecDeque<Entry>,
    cache_bytes: u64,
    cache_max_bytes: u64,
    /// Read handle on the file the slots point into (replaced by a rewrite).
    file: Arc<File>,
    hard_state: HardState,
    conf_state: ConfState,
    /// The member book (codec-encoded) and the applied index it reflects.
    membership: Option<(u64, Vec<u8>)>,
    /// The snapshot the log starts after (index 0: none, the log starts at 1).
    snapshot: SnapshotMeta,
    /// Records replayed plus records buffered since open; zero means a brand-new log.
    records: u64,
}

struct Writer {
    /// Shared with an fsync in progress on another thread (`LogStore::fdatasync`).
    file: Arc<File>,
    buf: Vec<u8>,
    fsync: bool,
    /// Where the next record goes: the end of the last one written.
    file_bytes: u64,
    /// The file's length, past `file_bytes` when zeros were written ahead: an fdatasync of
    /// records written over zeros already on disk need not commit a new file size too (on
    /// ext4 a journal commit, about a third of each sync's cost). Replay stops at the zeros.
    allocated: u64,
    /// Preallocation stops here (`raft.log-max-file-size`: the disk use it promises);
    /// 0 for no bound.
    size_cap: u64,
    /// Set by a failed write or fsync; every later write is refused. Not by a write that
    /// found no space (see `StorageError::NoSpace`).
    failed: Option<String>,
    /// A test-only fault for the next write or fsync (`LogStore::set_fault`).
    fault: Option<LogFault>,
    fsync_count: u64,
    fsync_total_us: u64,
    fsync_max_us: u64,
    /// The buffer holds a record that must be durable before `sync()` returns (entries, a
    /// term or vote, membership). A buffer of commit indexes alone is written without an
    /// fsync: a commit index lost in a crash is learned again from the leader.
    needs_fsync: bool,
    /// The buffer holds a record other than a commit index (`needs_fsync`'s records, with
    /// fsync on or off): `write_due` writes it now. Cleared by each write.
    due: bool,
}

impl Core {
    fn new(file: Arc<File>, cache_max_bytes: u64) -> Core {
        Core {
            first_index: 1,
            slots: VecDeque::new(),
            cache: VecDeque::new(),
            cache_bytes: 0,
            cache_max_bytes,
            file,
            hard_state: HardState::default(),
            conf_state: ConfState::default(),
            membership: None,
            snapshot: SnapshotMeta::default(),
            records: 0,
        }
    }

    fn last_index(&self) -> u64 {
        self.first_index + self.slots.len() as u64 - 1
    }

    /// The first index whose payload is in memory (`last_index() + 1` when none is).
    fn first_cached_index(&self) -> u64 {
        self.last_index() + 1 - self.cache.len() as u64
    }

    fn slot(&self, index: u64) -> Option<&EntrySlot> {
        let i = usize::try_from(index.checked_sub(self.first_index)?).ok()?;
        self.slots.get(i)
    }

    fn push(&mut self, e: Entry, slot: EntrySlot) {
        self.cache_bytes += entry_bytes(&e);
        self.slots.push_back(slot);
        self.cache.push_back(e);
    }

    /// Memory the queues themselves take, as allocated (a queue's capacity runs up to twice
    /// its length): the slots, and the cache's room beyond its entries (those are counted
    /// in `cache_bytes`) and beyond the room it always keeps. Counted against the cache
    /// bound with the payloads.
    fn slot_bytes(&self) -> u64 {
        let cache_room = self
            .cache
            .capacity()
            .saturating_sub(self.cache.len().max(CACHE_KEEP_ENTRIES));
        self.slots.capacity() as u64 * SLOT_BYTES
            + cache_room as u64 * std::mem::size_of::<Entry>() as u64
    }

    /// Drops payloads from the oldest cached entry on until the payloads and the slots fit
    /// the bound, but only of entries whose record ends at or before `written_end` (readable
    /// from the file). Slots alone may exceed it: they stay until compaction.
    fn evict(&mut self, written_end: u64) {
        // Bounded: each iteration pops one cached entry or stops.
        while self.cache_bytes + self.slot_bytes() > self.cache_max_bytes {
            match self.slot(self.first_cached_index()) {
                Some(slot) if slot.record_end() <= written_end => {}
                _ => break,
            }
            let Some(e) = self.cache.pop_front() else {
                break;
            };
            self.cache_bytes = self.cache_bytes.saturating_sub(entry_bytes(&e));
        }
        // Give back the room of a cache that shrank to a quarter of its allocation (not
        // below a small floor, so a cache that stays near empty is not reallocated on every
        // append).
        if self.cache.capacity() > CACHE_KEEP_ENTRIES
            && self.cache.len() < self.cache.capacity() / 4
        {
            self.cache
                .shrink_to((self.cache.len() * 2).max(CACHE_KEEP_ENTRIES));
        }
    }

    /// Drops cached payloads of entries at or below `index` (they left the log).
    fn uncache_through(&mut self, index: u64) {
        while let Some(e) = self.cache.front().filter(|e| e.index <= index) {
            self.cache_bytes = self.cache_bytes.saturating_sub(entry_bytes(e));
            self.cache.pop_front();
        }
    }

    /// Checks that entries starting at `index` may be appended; `Err` says why not.
    fn check_append_at(&self, index: u64) -> Result<(), String> {
        let last = self.last_index();
        if index < self.first_index {
            return Err(format!(
                "entry index {index} is below the first index {}",
                self.first_index
            ));
        }
        if index > last + 1 {
            return Err(format!(
                "entry index {index} leaves a gap after the last index {last}"
            ));
        }
        if index <= last && index <= self.hard_state.commit {
            return Err(format!(
                "entry index {index} would overwrite a committed entry (commit index {})",
                self.hard_state.commit
            ));
        }
        Ok(())
    }

    /// A copy without the entries below `from` (all of them if `from` is at or below the
    /// first index): what a rewrite that drops those entries starts from. Compaction drops
    /// most of the log, so copying only what stays keeps the raft thread from copying and
    /// freeing the whole cache (up to `raft.log-max-cache-size`) while it holds the log.
    fn clone_from(&self, from: u64) -> Core {
        let skip = usize::try_from(from.saturating_sub(self.first_index))
            .unwrap_or(usize::MAX)
            .min(self.slots.len());
        let slots: VecDeque<EntrySlot> = self.slots.range(skip..).cloned().collect();
        // The cache is a suffix of the slots: it keeps the entries at or after `from`.
        let cache: VecDeque<Entry> = self
            .cache
            .iter()
            .filter(|e| e.index >= from)
            .cloned()
            .collect();
        Core {
            first_index: self.first_index + skip as u64,
            cache_bytes: cache.iter().map(entry_bytes).sum(),
            slots,
            cache,
            cache_max_bytes: self.cache_max_bytes,
            file: Arc::clone(&self.file),
            hard_state: self.hard_state.clone(),
            conf_state: self.conf_state.clone(),
            membership: self.membership.clone(),
            snapshot: self.snapshot.clone(),
            records: self.records,
        }
    }

    /// The log now starts after `snap`: entries it covers are dropped (all of them if the
    /// log disagrees with it), and the commit index covers it.
    fn restore(&mut self, snap: SnapshotMeta) {
        let keeps_suffix = self.slot(snap.index).map(|s| s.term) == Some(snap.term);
        if keeps_suffix {
            let covered = snap.index + 1 - self.first_index;
            self.slots
                .drain(..usize::try_from(covered).unwrap_or(usize::MAX));
            self.uncache_through(snap.index);
        } else {
            self.slots.clear();
            self.cache.clear();
            self.cache_bytes = 0;
        }
        // Compaction usually drops most of the log: give back the queues' spare room too.
        self.slots.shrink_to_fit();
        self.cache.shrink_to_fit();
        self.first_index = snap.index + 1;
        self.hard_state.commit = self.hard_state.commit.max(snap.index);
        self.hard_state.term = self.hard_state.term.max(snap.term);
        self.snapshot = snap;
    }

    /// Drops entries from `index` on (a conflicting suffix). `index` passed `check_append_at`.
    fn truncate_from(&mut self, index: u64) {
        let keep = index.saturating_sub(self.first_index);
        self.slots
            .truncate(usize::try_from(keep).unwrap_or(usize::MAX));
        // The cache is a suffix: it loses its newest entries (bounded by its length).
        while let Some(e) = self.cache.back().filter(|e| e.index >= index) {
            self.cache_bytes = self.cache_bytes.saturating_sub(entry_bytes(e));
            self.cache.pop_back();
        }
    }

    fn check_commit(&self, commit: u64) -> Result<(), String> {
        let last = self.last_index();
        if commit > last {
            return Err(format!(
                "commit index {commit} is beyond the last index {last} \
                 (entries must be appended before the hard state that commits them)"
            ));
        }
        Ok(())
    }

    /// Applies one record read back from the file (at `offset`, `record_len` bytes long),
    /// with the same checks as the write path.
    fn replay(&mut self, offset: u64, record_len: u64, rec: record::Record) -> Result<(), String> {
        match rec {
            record::Record::Entry(e) => {
                self.check_append_at(e.index)?;
                self.truncate_from(e.index);
                let record_len = u32::try_from(record_len)
                    .map_err(|_| format!("entry record of {record_len} bytes"))?;
                let slot = EntrySlot {
                    term: e.term,
                    offset,
                    record_len,
                };
                self.push(e, slot);
                // Everything replayed is in the file: keep only what fits the bound.
                self.evict(u64::MAX);
            }
            record::Record::HardState(hs) => {
                self.check_commit(hs.commit)?;
                self.hard_state = hs;
            }
            record::Record::ConfState(cs) => self.conf_state = cs,
            record::Record::Membership { index, blob } => self.membership = Some((index, blob)),
            record::Record::Snapshot {
                index,
                term,
                conf_state,
            } => self.restore(SnapshotMeta {
                index,
                term,
                conf_state,
            }),
            record::Record::Commit(commit) => {
                self.check_commit(commit)?;
                self.hard_state.commit = commit;
            }
        }
        self.records += 1;
        Ok(())
    }
}

/// What a cached entry costs in memory, as the cache bound counts it: its payload plus the
/// `Entry` itself in the cache's queue and the allocator's rounding of its buffers (an
/// estimate; measured with jemalloc, a 100-byte SET costs about 1.4 times its encoded size).
fn entry_bytes(e: &Entry) -> u64 {
    const BUFFER_SLACK: usize = 32;
    (e.encoded_len() + std::mem::size_of::<Entry>() + BUFFER_SLACK) as u64
}

/// Frees a log a rewrite replaced on a thread of its own. Its cache can hold
/// `raft.log-max-cache-size` of entries, each a few allocations: freeing them took the raft
/// thread 15-55 ms, all that time without a commit (measured at 120k cached entries).
/// Then hands the freed pages back to the OS, so the node's RSS follows its log. That
/// matters with glibc's malloc (Redis built with MALLOC=libc); Debian's redis-server links
/// jemalloc, which every allocation of this module then also uses, and which returns freed
/// pages by itself within ~10 s. Where no thread can be started, frees here.
fn free_in_background(old: Core) {
    let free = move || {
        drop(old);
        // SAFETY: malloc_trim only releases free memory; it has no preconditions.
        unsafe { libc::malloc_trim(0) };
    };
    // A closure `spawn` could not run is dropped, which frees the log here after all.
    let _ = std::thread::Builder::new()
        .name("raft-log-free".into())
        .spawn(free);
}

/// Encodes `entries` into `buf`, whose first byte will land at file offset `base`, and says
/// where each record will be. On error the buffer is left as it was.
fn encode_entries(
    buf: &mut Vec<u8>,
    base: u64,
    entries: &[Entry],
) -> Result<Vec<EntrySlot>, (u64, record::EncodeError)> {
    let mark = buf.len();
    let mut slots = Vec::with_capacity(entries.len());
    for e in entries {
        let start = buf.len();
        if let Err(err) = record::encode_entry(buf, e) {
            buf.truncate(mark);
            return Err((e.index, err));
        }
        slots.push(EntrySlot {
            term: e.term,
            offset: base + start as u64,
            // Lossless: a record is at most RECORD_PAYLOAD_MAX_BYTES plus its header.
            record_len: u32::try_from(buf.len() - start).unwrap_or(u32::MAX),
        });
    }
    Ok(slots)
}

/// Entries `[low, end)` (all in the log): cached ones cloned, older ones read from the file.
fn collect(core: &Core, low: u64, end: u64) -> Result<Vec<Entry>, ScanError> {
    let first_cached = core.first_cached_index();
    let mut out = if low < first_cached {
        read_evicted(core, low, end.min(first_cached))?
    } else {
        Vec::new()
    };
    let from = low.max(first_cached);
    let skip = usize::try_from(from - first_cached).unwrap_or(usize::MAX);
    let take = usize::try_from(end.saturating_sub(from)).unwrap_or(0);
    out.extend(core.cache.iter().skip(skip).take(take).cloned());
    Ok(out)
}

/// Reads entries `[low, end)`, all below the cache, back from the file: one read per run of
/// adjacent records, each record CRC-checked and checked to be the entry its slot names.
fn read_evicted(core: &Core, low: u64, end: u64) -> Result<Vec<Entry>, ScanError> {
    let missing = |index: u64| ScanError::Corrupt {
        offset: 0,
        reason: format!("no slot for entry {index}"),
    };
    let mut out = Vec::with_capacity(usize::try_from(end - low).unwrap_or(0));
    let mut buf = Vec::new();
    let mut index = low;
    // Bounded: each iteration reads at least one entry.
    while index < end {
        let first = *core.slot(index).ok_or_else(|| missing(index))?;
        let mut run_end = first.record_end();
        let mut next = index + 1;
        while let Some(s) = core.slot(next).filter(|_| next < end) {
            if s.offset != run_end || s.record_end() - first.offset > READ_RUN_MAX_BYTES {
                break;
            }
            run_end = s.record_end();
            next += 1;
        }
        buf.resize(
            usize::try_from(run_end - first.offset).unwrap_or(usize::MAX),
            0,
        );
        core.file.read_exact_at(&mut buf, first.offset)?;
        let mut at = 0usize;
        for i in index..next {
            let slot = *core.slot(i).ok_or_else(|| missing(i))?;
            let len = slot.record_len as usize;
            let corrupt = |reason: String| ScanError::Corrupt {
                offset: slot.offset,
                reason: format!("reading back entry {i}: {reason}"),
            };
            let frame = buf
                .get(at..at + len)
                .ok_or_else(|| corrupt("short read".into()))?;
            let e = record::decode_entry_frame(frame).map_err(corrupt)?;
            if e.index != i || e.term != slot.term {
                return Err(corrupt(format!(
                    "found entry {} of term {}, expected term {}",
                    e.index, e.term, slot.term
                )));
            }
            out.push(e);
            at += len;
        }
        index = next;
    }
    Ok(out)
}

// A panic while a lock is held leaves no half-applied change behind: every mutation below
// checks first and then changes state without anything that can fail. So a poisoned lock's
// data is still consistent, and taking it is better than panicking in raft-rs's callbacks.
fn read_lock<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write_lock<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

fn mutex_lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LogStore {
    /// Opens the log at `path`, creating it if missing, and replays it into memory.
    /// A torn tail from a crash is cut off (and reported); any other damage is an error.
    pub fn open(path: &Path, fsync: bool) -> Result<(LogStore, Recovery), StorageError> {
        Self::open_with_cache(path, fsync, DEFAULT_CACHE_MAX_BYTES)
    }

    /// `open`, with the entry cache bounded by `cache_max_bytes` from the start: replay keeps
    /// only the newest entries that fit, so a long log is never all in memory at once.
    pub fn open_with_cache(
        path: &Path,
        fsync: bool,
        cache_max_bytes: u64,
    ) -> Result<(LogStore, Recovery), StorageError> {
        let io_err = |what: &'static str| {
            move |source: io::Error| StorageError::Io {
                path: path.to_path_buf(),
                what,
                source,
            }
        };
        let corrupt = |offset: u64, reason: String| StorageError::Corrupt {
            path: path.to_path_buf(),
            offset,
            reason,
        };

        // A rewrite interrupted by a crash left its temporary file; the log itself is whole.
        let _ = std::fs::remove_file(path.with_extension("rewrite.tmp"));
        // Positioned writes (not append): the file may hold preallocated zeros past its
        // records.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_err("open"))?;
        let file_len = file.metadata().map_err(io_err("stat"))?.len();

        let mut head = vec![0u8; file_len.min(record::HEADER_LEN) as usize];
        (&file)
            .read_exact(&mut head)
            .map_err(io_err("read header"))?;

        let reader = file.try_clone().map_err(io_err("open a read handle"))?;
        let mut core = Core::new(Arc::new(reader), cache_max_bytes);
        let mut recovery = Recovery::default();
        let file_bytes = match record::check_header(&head) {
            HeaderCheck::Refused { offset, reason } => return Err(corrupt(offset, reason)),
            HeaderCheck::Incomplete => {
                if file_len > 0 {
                    // A crash while the file was being created: nothing but part of a header.
                    tracing::warn!(
                        path = %path.display(),
                        offset = 0u64,
                        bytes_dropped = file_len,
                        "raft log has an incomplete header from an interrupted creation; rewriting it"
                    );
                    file.set_len(0)
                        .map_err(io_err("truncate incomplete header"))?;
                    recovery.torn_tail_bytes_dropped = file_len;
                }
                recovery.created = true;
                file.write_all_at(&record::encode_header(), 0)
                    .map_err(io_err("write header"))?;
                if fsync {
                    file.sync_all().map_err(io_err("fsync header"))?;
                    sync_parent_dir(path).map_err(io_err("fsync parent directory"))?;
                }
                record::HEADER_LEN
            }
            HeaderCheck::Valid => {
                let reader = BufReader::with_capacity(REPLAY_READ_BUFFER_BYTES, &file);
                let end = record::scan(reader, file_len, |offset, len, rec| {
                    core.replay(offset, len, rec)
                })
                .map_err(|e| match e {
                    ScanError::Io(source) => io_err("read")(source),
                    ScanError::Corrupt { offset, reason } => corrupt(offset, reason),
                })?;
                if let Some(torn) = end.torn {
                    if torn.why == record::ZERO_TAIL {
                        // Space this log preallocated: nothing was lost.
                        tracing::debug!(
                            path = %path.display(),
                            offset = end.good_end,
                            bytes = torn.bytes,
                            "raft log: dropping the zeros after its last record"
                        );
                    } else {
                        tracing::warn!(
                            path = %path.display(),
                            offset = end.good_end,
                            bytes_dropped = torn.bytes,
                            reason = torn.why,
                            "raft log has a torn tail from an interrupted write; truncating it"
                        );
                    }
                    file.set_len(end.good_end)
                        .map_err(io_err("truncate torn tail"))?;
                    file.sync_all()
                        .map_err(io_err("fsync after truncating torn tail"))?;
                    recovery.torn_tail_bytes_dropped = torn.bytes;
                }
                end.good_end
            }
        };

        recovery.records = core.records;
        recovery.entries = core.slots.len() as u64;
        recovery.first_index = core.first_index;
        recovery.last_index = core.last_index();
        recovery.file_bytes = file_bytes;
        tracing::info!(
            path = %path.display(),
            entries = recovery.entries,
            cached_entries = core.cache.len(),
            last_index = recovery.last_index,
            commit = core.hard_state.commit,
            file_bytes,
            "raft log opened"
        );

        let store = LogStore {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                snapshot_wanted: std::sync::atomic::AtomicBool::new(false),
                core: RwLock::new(core),
                writer: Mutex::new(Writer {
                    file: Arc::new(file),
                    buf: Vec::new(),
                    fsync,
                    file_bytes,
                    allocated: file_bytes,
                    size_cap: 0,
                    failed: None,
                    fault: None,
                    fsync_count: 0,
                    fsync_total_us: 0,
                    fsync_max_us: 0,
                    needs_fsync: false,
                    due: false,
                }),
                fsync: Mutex::new(()),
                rewriting: Mutex::new(()),
            }),
        };
        Ok((store, recovery))
    }

    /// The file this store writes.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn invalid(&self, reason: String) -> StorageError {
        StorageError::Invalid {
            path: self.inner.path.clone(),
            reason,
        }
    }

    /// Runs a write-path change with both locks held, refusing it after an earlier failure.
    fn write_path<T>(
        &self,
        f: impl FnOnce(&mut Core, &mut Vec<u8>) -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        self.write_path_at(|core, buf, _| f(core, buf))
    }

    /// `write_path`, also passing the file's size: the buffer's first byte lands there.
    fn write_path_at<T>(
        &self,
        f: impl FnOnce(&mut Core, &mut Vec<u8>, u64) -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        self.write_path_durable(|core, buf, at| f(core, buf, at).map(|v| (v, true)))
    }

    /// `write_path_at` for a change that says whether it needs the next `sync()` to fsync
    /// (the `bool` returned with its value).
    fn write_path_durable<T>(
        &self,
        f: impl FnOnce(&mut Core, &mut Vec<u8>, u64) -> Result<(T, bool), StorageError>,
    ) -> Result<T, StorageError> {
        let mut core = write_lock(&self.inner.core);
        let mut guard = mutex_lock(&self.inner.writer);
        let writer = &mut *guard;
        self.check_not_failed(writer)?;
        let (v, durable) = f(&mut core, &mut writer.buf, writer.file_bytes)?;
        writer.needs_fsync |= durable;
        writer.due |= durable;
        Ok(v)
    }

    fn encode_err(&self, e: record::EncodeError) -> StorageError {
        self.invalid(e.to_string())
    }

    /// Records the initial configuration of a brand-new log. Only valid when `is_empty()`.
    pub fn initialize(&self, cs: ConfState) -> Result<(), StorageError> {
        self.write_path(|core, buf| {
            if core.records != 0 {
                return Err(self.invalid(format!(
                    "initialize on a non-empty log (it holds {} records)",
                    core.records
                )));
            }
            record::encode_conf_state(buf, &cs).map_err(|e| self.encode_err(e))?;
            core.conf_state = cs;
            core.records += 1;
            Ok(())
        })
    }

    /// Starts a brand-new log with entries that are committed by construction (the same
    /// bytes on every node that bootstraps this cluster), and the membership they produce.
    /// Only valid when `is_empty()`.
    pub fn bootstrap(
        &self,
        entries: &[Entry],
        hs: &HardState,
        cs: &ConfState,
        membership: (u64, &[u8]),
    ) -> Result<(), StorageError> {
        self.write_path_at(|core, buf, base| {
            if core.records != 0 {
                return Err(self.invalid(format!(
                    "bootstrap on a non-empty log (it holds {} records)",
                    core.records
                )));
            }
            if entries.first().map(|e| e.index) != Some(1)
                || entries.windows(2).any(|w| w[0].index + 1 != w[1].index)
                || hs.commit > entries.len() as u64
            {
                return Err(
                    self.invalid("bootstrap entries must be 1..n and cover the commit".into())
                );
            }
            let mark = buf.len();
            let slots = encode_entries(buf, base, entries)
                .map_err(|(index, e)| self.invalid(format!("entry {index}: {e}")))?;
            let encoded = record::encode_hard_state(buf, hs)
                .and_then(|()| record::encode_conf_state(buf, cs))
                .and_then(|()| record::encode_membership(buf, membership.0, membership.1));
            if let Err(e) = encoded {
                buf.truncate(mark);
                return Err(self.encode_err(e));
            }
            for (e, slot) in entries.iter().zip(slots) {
                core.push(e.clone(), slot);
            }
            core.hard_state = hs.clone();
            core.conf_state = cs.clone();
            core.membership = Some((membership.0, membership.1.to_vec()));
            core.records += entries.len() as u64 + 3;
            Ok(())
        })
    }

    /// Buffers the membership produced by applying the configuration change at `index`.
    pub fn set_membership(
        &self,
        index: u64,
        cs: &ConfState,
        blob: &[u8],
    ) -> Result<(), StorageError> {
        self.write_path(|core, buf| {
            let mark = buf.len();
            let encoded = record::encode_conf_state(buf, cs)
                .and_then(|()| record::encode_membership(buf, index, blob));
            if let Err(e) = encoded {
                buf.truncate(mark);
                return Err(self.encode_err(e));
            }
            core.conf_state = cs.clone();
            core.membership = Some((index, blob.to_vec()));
            core.records += 2;
            Ok(())
        })
    }

    /// The member book last stored, with the applied index it reflects.
    pub fn membership(&self) -> Option<(u64, Vec<u8>)> {
        read_lock(&self.inner.core).membership.clone()
    }

    /// True when the log holds no records at all: no entries, hard state or conf state.
    pub fn is_empty(&self) -> bool {
        read_lock(&self.inner.core).records == 0
    }

    /// Buffers `entries` (consecutive indexes). If the first index is at or below the last
    /// index, the log's suffix from there is replaced (a conflict resolved by the leader).
    pub fn append(&self, entries: &[Entry]) -> Result<(), StorageError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        if let Some(w) = entries
            .windows(2)
            .find(|w| w[0].index.checked_add(1) != Some(w[1].index))
        {
            return Err(self.invalid(format!(
                "appended entries are not consecutive: index {} follows index {}",
                w[1].index, w[0].index
            )));
        }
        self.write_path_at(|core, buf, base| {
            core.check_append_at(first.index)
                .map_err(|reason| self.invalid(reason))?;
            let slots = encode_entries(buf, base, entries)
                .map_err(|(index, e)| self.invalid(format!("entry {index}: {e}")))?;
            core.truncate_from(first.index);
            for (e, slot) in entries.iter().zip(slots) {
                core.push(e.clone(), slot);
            }
            core.records += entries.len() as u64;
            // Older entries already written may make room for these (written at next sync).
            core.evict(base);
            Ok(())
        })
    }

    /// Buffers a new hard state (term, vote, commit).
    pub fn set_hard_state(&self, hs: &HardState) -> Result<(), StorageError> {
        self.write_path_durable(|core, buf, _| {
            core.check_commit(hs.commit)
                .map_err(|reason| self.invalid(reason))?;
            record::encode_hard_state(buf, hs).map_err(|e| self.encode_err(e))?;
            // A vote or term must be durable before raft-rs acts on it; a commit index alone
            // need not (see `Writer::needs_fsync`).
            let durable = hs.term != core.hard_state.term || hs.vote != core.hard_state.vote;
            core.hard_state = hs.clone();
            core.records += 1;
            Ok(((), durable))
        })
    }

    /// Buffers a new commit index, keeping the hard state's term and vote.
    pub fn set_commit(&self, commit: u64) -> Result<(), StorageError> {
        self.write_path_durable(|core, buf, _| {
            core.check_commit(commit)
                .map_err(|reason| self.invalid(reason))?;
            record::encode_commit(buf, commit).map_err(|e| self.encode_err(e))?;
            core.hard_state.commit = commit;
            core.records += 1;
            Ok(((), false))
        })
    }

    /// Buffers a new membership configuration.
    pub fn set_conf_state(&self, cs: &ConfState) -> Result<(), StorageError> {
        self.write_path(|core, buf| {
            record::encode_conf_state(buf, cs).map_err(|e| self.encode_err(e))?;
            core.conf_state = cs.clone();
            core.records += 1;
            Ok(())
        })
    }

    /// True (once) when raft-rs wanted a snapshot newer than the one stored.
    pub fn take_snapshot_wanted(&self) -> bool {
        self.inner
            .snapshot_wanted
            .swap(false, std::sync::atomic::Ordering::AcqRel)
    }

    /// The snapshot the log starts after (index 0: none).
    pub fn snapshot_meta(&self) -> SnapshotMeta {
        read_lock(&self.inner.core).snapshot.clone()
    }

    /// After a snapshot of the state machine up to `index` was made durable: drops the
    /// entries it covers, in memory and on disk (the file is rewritten). `cs` is the
    /// configuration as of `index`. Meant for a thread of its own: the new file is written
    /// and fsynced without the log's locks while appends go on (see ARCHITECTURE.md).
    /// Returns how long appends waited for it (the log's locks held): the copy of the kept
    /// entries' slots and cache, then the switch to the new file.
    pub fn compact(&self, index: u64, cs: &ConfState) -> Result<Duration, StorageError> {
        let _one = mutex_lock(&self.inner.rewriting);
        // The log as of `mark` (where the next record goes), minus what `index` covers; only
        // the copy of the kept entries holds the locks (`core` for reading).
        let copying = Instant::now();
        let (mut next, mark, term) = {
            let core = read_lock(&self.inner.core);
            if index > core.hard_state.commit || index <= core.snapshot.index {
                return Err(self.invalid(format!(
                    "cannot compact up to index {index}: commit index {}, snapshot at {}",
                    core.hard_state.commit, core.snapshot.index
                )));
            }
            // As of the copy: the phase under the locks below checks the same term again.
            let Some(term) = core.slot(index).map(|s| s.term) else {
                return Err(self.invalid(format!(
                    "cannot compact up to index {index}: it is not in the log"
                )));
            };
            let w = mutex_lock(&self.inner.writer);
            self.check_not_failed(&w)?;
            (
                core.clone_from(index),
                w.file_bytes + w.buf.len() as u64,
                term,
            )
        };
        let copied = copying.elapsed();
        let snap = SnapshotMeta {
            index,
            term,
            conf_state: cs.clone(),
        };
        // The membership record stays: it is the latest one, which entries after `index` may
        // have changed since.
        let change = |core: &mut Core| core.restore(snap.clone());
        change(&mut next);
        // The new file, written and fsynced while appends go on to the old one.
        let bytes = self.encode_rewrite(&mut next)?;
        let tmp = self.inner.path.with_extension("rewrite.tmp");
        let mut f = match self.create_synced(&tmp, &bytes) {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        #[cfg(test)]
        if let Some(f) = DURING_COMPACTION.with(|h| h.borrow_mut().take()) {
            f();
        }
        let mut core = write_lock(&self.inner.core);
        let mut w = mutex_lock(&self.inner.writer);
        let switching = Instant::now();
        let prefix = bytes.len() as u64;
        // The records after `mark` follow the new file's: those written to the old file are
        // copied (the tail), those still buffered stay in the buffer, which the next `write`
        // puts after the tail, with the fsync it owes (this thread writes nothing the raft
        // thread would then think needs none). Buffered records before `mark` are in the new
        // file already: they leave the buffer. The log as it is now, minus what `index`
        // covers, points its slots at the new file: records before `mark` where `next` put
        // them, the ones after at the same distance from the end of `next`'s records.
        let finished = (|| -> Result<(Core, Vec<u8>), StorageError> {
            self.check_not_failed(&w)?;
            let mut tail =
                vec![0; usize::try_from(w.file_bytes.saturating_sub(mark)).unwrap_or(usize::MAX)];
            w.file
                .read_exact_at(&mut tail, mark)
                .map_err(self.io_err("read the records written during compaction"))?;
            // Copied without decoding: what the page cache gives must be whole records.
            record::check_frames(&tail).map_err(|(at, why)| StorageError::Unreadable {
                path: self.inner.path.clone(),
                offset: mark + at as u64,
                reason: format!("records written during compaction: {why}"),
            })?;
            let mut fin = core.clone_from(index);
            if fin.slot(index).map(|s| s.term) != Some(term) {
                return Err(self.invalid(format!(
                    "cannot compact up to index {index}: its term is no longer {term}"
                )));
            }
            change(&mut fin);
            for (i, slot) in fin.slots.iter_mut().enumerate() {
                if slot.offset >= mark {
                    slot.offset = slot.offset - mark + prefix;
                    continue;
                }
                let at = fin.first_index + i as u64;
                match next.slot(at) {
                    Some(s) if s.term == slot.term => slot.offset = s.offset,
                    _ => {
                        return Err(self
                            .invalid(format!("entry {at} is in no record the compaction copied")))
                    }
                }
            }
            Ok((fin, tail))
        })();
        let (fin, tail) = match finished {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let appended = if tail.is_empty() {
            Ok(())
        } else {
            f.write_all(&tail)
                .map_err(self.io_err("write the rewritten log"))
                .and_then(|()| f.sync_all().map_err(self.io_err("fsync the rewritten log")))
        };
        drop(f);
        let renamed = appended.and_then(|()| {
            std::fs::rename(&tmp, &self.inner.path).map_err(self.io_err("rename the rewritten log"))
        });
        if let Err(e) = renamed {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        // Only now, with the new file in place, may the buffer lose what it holds before `mark`.
        let in_new_file = usize::try_from(mark.saturating_sub(w.file_bytes))
            .unwrap_or(usize::MAX)
            .min(w.buf.len());
        w.buf.drain(..in_new_file);
        let end = prefix + tail.len() as u64;
        self.switch_files(&mut core, &mut w, fin, end)?;
        Ok(copied + switching.elapsed())
    }

    /// A snapshot received from the leader replaces the log: it starts after `snap`, with
    /// `membership` as the member book. The file is rewritten.
    pub fn apply_snapshot(
        &self,
        snap: SnapshotMeta,
        membership: (u64, &[u8]),
    ) -> Result<(), StorageError> {
        self.rewrite(snap.index, |core| {
            core.conf_state = snap.conf_state.clone();
            core.restore(snap);
            core.membership = Some((membership.0, membership.1.to_vec()));
        })
    }

    /// Applies `change` to the in-memory log and writes a new file holding exactly that state
    /// (snapshot record, hard state, configuration, membership, entries): written beside the
    /// log, fsynced, renamed over it, directory fsynced. A crash leaves the old or the new
    /// file, never a mix. Records still buffered are written to the old file first.
    /// `change` drops the entries below `from`; they are not copied (`Core::clone_from`).
    fn rewrite(&self, from: u64, change: impl FnOnce(&mut Core)) -> Result<(), StorageError> {
        let _one = mutex_lock(&self.inner.rewriting);
        self.sync()?;
        let mut core = write_lock(&self.inner.core);
        let mut w = mutex_lock(&self.inner.writer);
        self.check_not_failed(&w)?;
        let mut next = core.clone_from(from);
        change(&mut next);
        let bytes = self.encode_rewrite(&mut next)?;
        let tmp = self.inner.path.with_extension("rewrite.tmp");
        // Until the rename, a failure (disk full...) leaves the old file in use and intact.
        let prepared = self.create_synced(&tmp, &bytes).and_then(|_| {
            std::fs::rename(&tmp, &self.inner.path).map_err(self.io_err("rename the rewritten log"))
        });
        if let Err(e) = prepared {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        next.records = 1 + next.slots.len() as u64;
        self.switch_files(&mut core, &mut w, next, bytes.len() as u64)
    }

    /// The file a rewrite just renamed over the log (`end` bytes of records) becomes the
    /// log: `next`, whose slots point into it, replaces the in-memory log, and the old one
    /// is freed in the background once the locks are let go.
    fn switch_files(
        &self,
        core: &mut RwLockWriteGuard<'_, Core>,
        w: &mut MutexGuard<'_, Writer>,
        mut next: Core,
        end: u64,
    ) -> Result<(), StorageError> {
        // The new file is in place; the handle still points at the old one, so any failure
        // from here on must stop further writes.
        let path = &self.inner.path;
        let reopened = sync_parent_dir(path)
            .map_err(self.io_err("fsync parent directory"))
            .and_then(|()| {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(self.io_err("reopen the rewritten log"))
            })
            .and_then(|f| {
                let reader = f.try_clone().map_err(self.io_err("open a read handle"))?;
                Ok((f, reader))
            });
        let (file, reader) = match reopened {
            Ok(f) => f,
            Err(e) => {
                w.failed = Some(e.to_string());
                return Err(e);
            }
        };
        next.file = Arc::new(reader);
        w.file = Arc::new(file);
        w.file_bytes = end;
        w.allocated = end;
        next.evict(end);
        let old = std::mem::replace(&mut **core, next);
        free_in_background(old);
        Ok(())
    }

    /// The records of a rewritten log holding exactly `next`'s state: header, snapshot,
    /// configuration, membership, entries (their slots pointed at the new file), hard state.
    fn encode_rewrite(&self, next: &mut Core) -> Result<Vec<u8>, StorageError> {
        let mut bytes = record::encode_header().to_vec();
        let encoded = (|| {
            if next.snapshot.index > 0 {
                record::encode_snapshot(
                    &mut bytes,
                    next.snapshot.index,
                    next.snapshot.term,
                    &next.snapshot.conf_state,
                )?;
            }
            record::encode_conf_state(&mut bytes, &next.conf_state)?;
            if let Some((index, blob)) = &next.membership {
                record::encode_membership(&mut bytes, *index, blob)
            } else {
                Ok(())
            }
        })();
        encoded.map_err(|e| self.encode_err(e))?;
        self.rewrite_entries(next, &mut bytes)?;
        // After the entries: replay checks that a commit index covers stored entries.
        record::encode_hard_state(&mut bytes, &next.hard_state).map_err(|e| self.encode_err(e))?;
        Ok(bytes)
    }

    /// A new file at `tmp` holding `bytes`, fsynced (a rewrite's, before its rename).
    fn create_synced(&self, tmp: &Path, bytes: &[u8]) -> Result<File, StorageError> {
        let mut f = File::create(tmp).map_err(self.io_err("create the rewritten log"))?;
        f.write_all(bytes)
            .map_err(self.io_err("write the rewritten log"))?;
        f.sync_all()
            .map_err(self.io_err("fsync the rewritten log"))?;
        Ok(f)
    }

    fn check_not_failed(&self, w: &Writer) -> Result<(), StorageError> {
        match &w.failed {
            Some(cause) => Err(StorageError::Failed {
                path: self.inner.path.clone(),
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    fn io_err(&self, what: &'static str) -> impl Fn(io::Error) -> StorageError + '_ {
        move |source| StorageError::Io {
            path: self.inner.path.clone(),
            what,
            source,
        }
    }

    /// Encodes every entry of `next` into `bytes` (the new file so far), reading evicted
    /// ones back from the old file a chunk at a time, and points the slots at the new file.
    fn rewrite_entries(&self, next: &mut Core, bytes: &mut Vec<u8>) -> Result<(), StorageError> {
        const CHUNK_ENTRIES: u64 = 1024;
        let end = next.last_index() + 1;
        let mut low = next.first_index;
        // Bounded: each iteration encodes at least one entry.
        while low < end {
            let high = end.min(low + CHUNK_ENTRIES);
            let chunk = collect(next, low, high).map_err(|e| self.read_err(e))?;
            // `bytes` is the new file from its first byte: buffer position = file offset.
            let slots = encode_entries(bytes, 0, &chunk)
                .map_err(|(index, e)| self.invalid(format!("entry {index}: {e}")))?;
            for (i, slot) in (low..high).zip(slots) {
                let offset = usize::try_from(i - next.first_index).unwrap_or(usize::MAX);
                if let Some(s) = next.slots.get_mut(offset) {
                    *s = slot;
                }
            }
            low = high;
        }
        Ok(())
    }

    /// A failed read of evicted entries, logged where operators look.
    fn read_err(&self, e: ScanError) -> StorageError {
        let err = match e {
            ScanError::Io(source) => StorageError::Io {
                path: self.inner.path.clone(),
                what: "read back evicted entries",
                source,
            },
            ScanError::Corrupt { offset, reason } => StorageError::Unreadable {
                path: self.inner.path.clone(),
                offset,
                reason,
            },
        };
        tracing::error!("cannot read entries back from the raft log: {err}");
        err
    }

    /// Writes every buffered record with one `write_all` and, if fsync is on, one
    /// `fdatasync`. Only after this returns Ok may the records be treated as persisted.
    pub fn sync(&self) -> Result<(), StorageError> {
        if self.write()? {
            self.fdatasync()?;
        }
        Ok(())
    }

    /// The first half of `sync`: writes every buffered record with one `write_all`, not
    /// waiting for the disk. True when they must still be fsynced (`fdatasync`, from any
    /// thread) before they count as persisted: fsync is on and one of them is an entry, a
    /// term or vote, or membership.
    pub fn write(&self) -> Result<bool, StorageError> {
        self.write_if(true)
    }

    /// `write`, but a buffer of commit indexes alone stays buffered, to go out with the next
    /// record that must be written (a commit index lost in a crash is learned again from the
    /// leader; one write fewer for each Ready that only moved the commit index).
    pub fn write_due(&self) -> Result<bool, StorageError> {
        self.write_if(false)
    }

    fn write_if(&self, commits_too: bool) -> Result<bool, StorageError> {
        let Some((written_end, owed)) = self.write_buffered(commits_too)? else {
            return Ok(false);
        };
        // After the writer lock is released (lock order: core first). The records just
        // written can be read back now, so their payloads may leave the cache. Never past
        // the file's end: a compaction may have switched to a shorter file meanwhile.
        let mut core = write_lock(&self.inner.core);
        let written_end = written_end.min(mutex_lock(&self.inner.writer).file_bytes);
        core.evict(written_end);
        Ok(owed)
    }

    /// `write`'s I/O: the file's size after it and whether an fsync is owed, or None when
    /// nothing was written (nothing buffered, or only commit indexes and not `commits_too`).
    fn write_buffered(&self, commits_too: bool) -> Result<Option<(u64, bool)>, StorageError> {
        let mut guard = mutex_lock(&self.inner.writer);
        let w = &mut *guard;
        self.check_not_failed(w)?;
        if w.buf.is_empty() || !(commits_too || w.due) {
            return Ok(None);
        }
        let end = w.file_bytes + w.buf.len() as u64;
        if w.fsync && end > w.allocated {
            preallocate(w, end);
        }
        let written = match w.fault {
            Some(LogFault::WriteEio) => {
                w.fault = None;
                Err(io::Error::from_raw_os_error(libc::EIO))
            }
            Some(LogFault::NoSpace) => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
            _ => w.file.write_all_at(&w.buf, w.file_bytes),
        };
        if let Err(source) = written {
            if is_no_space(&source) {
                // Part of the buffer may be in the file: the retry writes all of it again at
                // the same offset (the same bytes), and nothing after `file_bytes` counts
                // until then (a crash leaves a torn tail, dropped on open). No fsync failed,
                // so nothing the kernel may have dropped is trusted. The buffer is kept.
                return Err(StorageError::NoSpace {
                    path: self.inner.path.clone(),
                    source,
                });
            }
            w.failed = Some(format!("write failed: {source}"));
            return Err(self.io_err("write")(source));
        }
        w.file_bytes += w.buf.len() as u64;
        w.buf.clear();
        w.due = false;
        if w.buf.capacity() > WRITE_BUFFER_KEEP_BYTES {
            w.buf.shrink_to(WRITE_BUFFER_KEEP_BYTES);
        }
        let owed = w.fsync && std::mem::take(&mut w.needs_fsync);
        Ok(Some((w.file_bytes, owed)))
    }

    /// The second half of `sync`: one `fdatasync` of the log, which makes durable every
    /// record `write` wrote before it was called. Safe from any thread and alongside `write`
    /// (the writer's lock is not held while the disk works). A rewrite since the write
    /// (compaction, an installed snapshot) fsynced its new file itself, records included.
    pub fn fdatasync(&self) -> Result<(), StorageError> {
        let _one_at_a_time = mutex_lock(&self.inner.fsync);
        let file = {
            let mut w = mutex_lock(&self.inner.writer);
            self.check_not_failed(&w)?;
            if w.fault == Some(LogFault::FsyncEio) {
                w.fault = None;
                None
            } else {
                Some(Arc::clone(&w.file))
            }
        };
        let started = Instant::now();
        let synced = match file {
            Some(file) => file.sync_data(),
            None => Err(io::Error::from_raw_os_error(libc::EIO)),
        };
        let took_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let mut w = mutex_lock(&self.inner.writer);
        // Whatever the error (EIO, ENOSPC from writeback, ...): the kernel may have dropped
        // the dirty pages and cleared the error, so a second fsync could succeed for data
        // that is not on the disk. Never retried.
        if let Err(source) = synced {
            w.failed = Some(format!("fsync failed: {source}"));
            return Err(self.io_err("fsync")(source));
        }
        w.fsync_count += 1;
        w.fsync_total_us = w.fsync_total_us.saturating_add(took_us);
        w.fsync_max_us = w.fsync_max_us.max(took_us);
        Ok(())
    }

    /// Tests only (`RAFT.DEBUG LOG-FAULT`): makes the next write or fsync fail (None: clears
    /// a `NoSpace` fault).
    pub fn set_fault(&self, fault: Option<LogFault>) {
        mutex_lock(&self.inner.writer).fault = fault;
    }

    /// Why the store refuses all writes, after a failed write or fsync (None: it does not).
    pub fn failure(&self) -> Option<String> {
        mutex_lock(&self.inner.writer).failed.clone()
    }

    /// Zeros are written ahead of the records only up to this file size (0: no bound), so
    /// the file stays within `raft.log-max-file-size` as the records do.
    pub fn set_size_cap(&self, bytes: u64) {
        mutex_lock(&self.inner.writer).size_cap = bytes;
    }

    /// Turns the fsync in `sync()` on or off (`raft.log-fsync`).
    pub fn set_fsync(&self, on: bool) {
        mutex_lock(&self.inner.writer).fsync = on;
    }

    /// Whether writes are fsynced (`raft.log-fsync`).
    pub fn fsyncs(&self) -> bool {
        mutex_lock(&self.inner.writer).fsync
    }

    /// Bounds the entry cache (`raft.log-max-cache-size`), evicting down to it now.
    pub fn set_cache_max_bytes(&self, bytes: u64) {
        let mut core = write_lock(&self.inner.core);
        let written_end = mutex_lock(&self.inner.writer).file_bytes;
        core.cache_max_bytes = bytes;
        core.evict(written_end);
    }

    pub fn stats(&self) -> LogStats {
        let core = read_lock(&self.inner.core);
        let w = mutex_lock(&self.inner.writer);
        LogStats {
            entries: core.slots.len() as u64,
            bytes: w.file_bytes,
            first_index: core.first_index,
            last_index: core.last_index(),
            snapshot_index: core.snapshot.index,
            snapshot_term: core.snapshot.term,
            fsync_count: w.fsync_count,
            fsync_max_us: w.fsync_max_us,
            fsync_avg_us: w.fsync_total_us.checked_div(w.fsync_count).unwrap_or(0),
            cache_entries: core.cache.len() as u64,
            cache_bytes: core.cache_bytes,
            slot_bytes: core.slot_bytes(),
        }
    }
}

impl fmt::Debug for LogStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogStore")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

/// Makes a newly created (or renamed) file's directory entry durable. Also used by
/// `snapshot/format.rs`.
pub(crate) fn sync_parent_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

fn store_err(e: raft::StorageError) -> raft::Error {
    raft::Error::Store(e)
}

/// Where `[low, high)` ends when cut to `max_size` bytes, always keeping one entry: the rule
/// of `raft::util::limit_size`, computed from the slots so evicted entries are not read for it.
fn limit_end(core: &Core, low: u64, high: u64, max_size: Option<u64>) -> u64 {
    let max = match max_size {
        None | Some(raft::NO_LIMIT) => return high,
        Some(max) => max,
    };
    let mut size = 0u64;
    let mut end = low;
    // Bounded by high - low.
    while end < high {
        let bytes = core.slot(end).map_or(0, EntrySlot::entry_bytes);
        size = size.saturating_add(bytes);
        if end > low && size > max {
            break;
        }
        end += 1;
    }
    end
}

impl raft::Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let core = read_lock(&self.inner.core);
        Ok(RaftState::new(
            core.hard_state.clone(),
            core.conf_state.clone(),
        ))
    }

    /// Entries in `[low, high)`, at most `max_size` bytes but always at least one entry
    /// (`raft::util::limit_size`'s rule). Entries evicted from the cache are read back from
    /// the file; a failed read is logged and returned as `StorageError::Other`.
    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let core = read_lock(&self.inner.core);
        if low < core.first_index {
            return Err(store_err(raft::StorageError::Compacted));
        }
        // MemStorage panics here; an error stops raft-rs just as surely without an abort.
        if high > core.last_index() + 1 || low > high {
            return Err(store_err(raft::StorageError::Unavailable));
        }
        let end = limit_end(&core, low, high, max_size.into());
        collect(&core, low, end)
            .map_err(|e| store_err(raft::StorageError::Other(Box::new(self.read_err(e)))))
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let core = read_lock(&self.inner.core);
        if idx == core.snapshot.index {
            return Ok(core.snapshot.term);
        }
        // The entry before the first is where a snapshot would end; with no snapshot it is
        // index 0, term 0.
        if core.first_index.checked_sub(1) == Some(idx) {
            return Ok(0);
        }
        if idx < core.first_index {
            return Err(store_err(raft::StorageError::Compacted));
        }
        if idx > core.last_index() {
            return Err(store_err(raft::StorageError::Unavailable));
        }
        core.slot(idx)
            .map(|s| s.term)
            .ok_or_else(|| store_err(raft::StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(read_lock(&self.inner.core).first_index)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(read_lock(&self.inner.core).last_index())
    }

    /// The metadata of the snapshot the log starts after; its data (the dataset) is not
    /// here: the transport streams the snapshot file next to the message.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let core = read_lock(&self.inner.core);
        let cs = &core.snapshot.conf_state;
        // A follower refuses a snapshot whose configuration does not name it (one added
        // after the snapshot): a newer one is needed, and raft-rs asks again later.
        let names_it = cs.voters.contains(&to) || cs.learners.contains(&to);
        if core.snapshot.index == 0 || core.snapshot.index < request_index || !names_it {
            self.inner
                .snapshot_wanted
                .store(true, std::sync::atomic::Ordering::Release);
            return Err(store_err(
                raft::StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut s = Snapshot::default();
        let md = s.mut_metadata();
        md.index = core.snapshot.index;
        md.term = core.snapshot.term;
        md.conf_state = Some(core.snapshot.conf_state.clone());
        Ok(s)
    }
}

#[cfg(test)]
mod tests;

/// Writes zeros past the records so the file covers `need_end` and some room beyond (see
/// `Writer::allocated`). Never past the process's file size limit (RLIMIT_FSIZE: going past
/// it would kill the server with SIGXFSZ). A failure only means less room: the records'
/// own write reports any real problem.
fn preallocate(w: &mut Writer, need_end: u64) {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let room = (w.file_bytes / 8).clamp(PREALLOCATE_MIN_BYTES, PREALLOCATE_MAX_BYTES);
    let mut target = need_end + room;
    if let Some(limit) = file_size_limit() {
        target = target.min(limit);
    }
    if w.size_cap > 0 {
        target = target.min(w.size_cap);
    }
    let mut at = w.allocated.max(need_end);
    while at < target {
        let n = (target - at).min(ZEROS.len() as u64) as usize;
        if w.file.write_all_at(&ZEROS[..n], at).is_err() {
            break;
        }
        at += n as u64;
    }
    w.allocated = w.allocated.max(at);
}

/// The soft RLIMIT_FSIZE, if there is one.
fn file_size_limit() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `r`.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut r) } == 0;
    (ok && r.rlim_cur != libc::RLIM_INFINITY).then_some(r.rlim_cur)
}
