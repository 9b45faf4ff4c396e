//! Tests against real files in a temp dir. Offsets are taken from `stats().bytes` after each
//! `sync()` so each test knows exactly where every record starts.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use raft::eraftpb::{ConfState, Entry, HardState};
use raft::{GetEntriesContext, Storage};

use super::{LogStats, LogStore, Recovery, SnapshotMeta, StorageError};

fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
    Entry {
        index,
        term,
        data: data.to_vec(),
        ..Default::default()
    }
}

/// Entries `indexes`, all of `term` with payload `data`.
fn entries(indexes: std::ops::RangeInclusive<u64>, term: u64, data: &[u8]) -> Vec<Entry> {
    indexes.map(|i| entry(i, term, data)).collect()
}

fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
    HardState { term, vote, commit }
}

fn conf_state(voters: &[u64], learners: &[u64]) -> ConfState {
    ConfState {
        voters: voters.to_vec(),
        learners: learners.to_vec(),
        ..Default::default()
    }
}

fn log_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("redisraft.db")
}

fn open(path: &Path) -> (LogStore, Recovery) {
    match LogStore::open(path, false) {
        Ok(r) => r,
        Err(e) => panic!("open {}: {e}", path.display()),
    }
}

fn all_entries(store: &LogStore) -> Vec<Entry> {
    let last = store.last_index().expect("last_index");
    store
        .entries(1, last + 1, None, GetEntriesContext::empty(false))
        .expect("entries")
}

/// Appends each entry in its own batch and returns the file size after each sync.
fn append_one_per_sync(store: &LogStore, entries: &[Entry]) -> Vec<u64> {
    entries
        .iter()
        .map(|e| {
            store.append(std::slice::from_ref(e)).expect("append");
            store.sync().expect("sync");
            store.stats().bytes
        })
        .collect()
}

fn flip_byte(path: &Path, offset: u64) {
    let mut bytes = fs::read(path).expect("read log");
    bytes[offset as usize] ^= 0x40;
    fs::write(path, bytes).expect("write log");
}

fn append_bytes(path: &Path, extra: &[u8]) {
    let mut f = OpenOptions::new().append(true).open(path).expect("open");
    f.write_all(extra).expect("append");
}

fn corrupt_message(path: &Path, offset: u64, reason: &str) -> String {
    format!(
        "raft log {} is corrupt at byte offset {offset}: {reason}; refusing to start \
         (move the file aside to rebuild this node from its peers)",
        path.display()
    )
}

fn open_err(path: &Path) -> StorageError {
    match LogStore::open(path, false) {
        Ok(_) => panic!("open {} unexpectedly succeeded", path.display()),
        Err(e) => e,
    }
}

const THREE: [(u64, u64, &[u8]); 3] = [(1, 1, b"set a 1"), (2, 1, b"set b 2"), (3, 1, b"set c 3")];

fn three_entries() -> Vec<Entry> {
    THREE.iter().map(|&(i, t, d)| entry(i, t, d)).collect()
}

#[test]
fn new_log_is_empty_with_only_a_header() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, rec) = open(&path);
    assert_eq!(
        rec,
        Recovery {
            created: true,
            records: 0,
            entries: 0,
            first_index: 1,
            last_index: 0,
            torn_tail_bytes_dropped: 0,
            file_bytes: 9,
        }
    );
    assert!(store.is_empty());
    assert_eq!(fs::read(&path).unwrap(), b"RRLOG\x02\x00\x00\x00");
    assert_eq!(store.first_index().unwrap(), 1);
    assert_eq!(store.last_index().unwrap(), 0);
    assert_eq!(store.term(0).unwrap(), 0);
    let rs = store.initial_state().unwrap();
    assert_eq!(rs.hard_state, HardState::default());
    assert_eq!(rs.conf_state, ConfState::default());
}

#[test]
fn record_layout_is_stable() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = open(&path);
    store.append(&[entry(1, 1, b"a")]).unwrap();
    store.set_commit(1).unwrap();
    store.sync().unwrap();
    let mut want = b"RRLOG\x02\x00\x00\x00".to_vec();
    // Entry: kind 1 + prost(term=1, index=1, data="a").
    let payload = [1u8, 0x10, 0x01, 0x18, 0x01, 0x22, 0x01, b'a'];
    want.extend_from_slice(&8u32.to_le_bytes());
    // CRC-32 (IEEE), pinned so a change of checksum algorithm cannot slip through.
    want.extend_from_slice(&0xf541_d9bbu32.to_le_bytes());
    want.extend_from_slice(&payload);
    // Commit: kind 4 + u64 LE.
    let payload = [4u8, 1, 0, 0, 0, 0, 0, 0, 0];
    want.extend_from_slice(&9u32.to_le_bytes());
    want.extend_from_slice(&0x774f_453cu32.to_le_bytes());
    want.extend_from_slice(&payload);
    assert_eq!(fs::read(&path).unwrap(), want);
    assert_eq!(store.stats().bytes, 9 + 16 + 17);
}

#[test]
fn append_then_reopen_round_trips_entries() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = open(&path);
    store.append(&three_entries()).unwrap();
    store.sync().unwrap();
    let size = fs::metadata(&path).unwrap().len();
    assert_eq!(store.stats().bytes, size);
    assert!(!store.is_empty());
    drop(store);

    let (store, rec) = open(&path);
    assert_eq!(
        rec,
        Recovery {
            created: false,
            records: 3,
            entries: 3,
            first_index: 1,
            last_index: 3,
            torn_tail_bytes_dropped: 0,
            file_bytes: size,
        }
    );
    assert_eq!(all_entries(&store), three_entries());
    assert!(!store.is_empty());

    // Appending after a reopen continues the same file.
    store.append(&[entry(4, 2, b"set d 4")]).unwrap();
    store.sync().unwrap();
    drop(store);
    let (store, rec) = open(&path);
    assert_eq!(rec.entries, 4);
    assert_eq!(store.term(4).unwrap(), 2);
}

#[test]
fn records_not_synced_are_not_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = open(&path);
    store.append(&three_entries()).unwrap();
    store.set_commit(2).unwrap();
    // raft-rs may read the buffered state before sync.
    assert_eq!(store.last_index().unwrap(), 3);
    assert_eq!(store.initial_state().unwrap().hard_state.commit, 2);
    assert_eq!(store.stats().bytes, 9);
    drop(store);

    let (store, rec) = open(&path);
    assert_eq!(rec.records, 0);
    assert!(store.is_empty());
    assert_eq!(store.last_index().unwrap(), 0);
}

#[test]
fn conflicting_suffix_overwrite_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = open(&path);
    let old: Vec<Entry> = (1..=5).map(|i| entry(i, 1, b"old")).collect();
    store.append(&old).unwrap();
    store.set_commit(2).unwrap();
    store.sync().unwrap();
    let new = [entry(3, 2, b"new3"), entry(4, 2, b"new4")];
    store.append(&new).unwrap();
    store.sync().unwrap();

    let want = vec![
        entry(1, 1, b"old"),
        entry(2, 1, b"old"),
        entry(3, 2, b"new3"),
        entry(4, 2, b"new4"),
    ];
    assert_eq!(all_entries(&store), want);
    assert_eq!(store.last_index().unwrap(), 4);
    drop(store);

    let (store, rec) = open(&path);
    assert_eq!(rec.records, 8);
    assert_eq!(rec.entries, 4);
    assert_eq!(rec.last_index, 4);
    assert_eq!(all_entries(&store), want);
    assert_eq!(store.term(3).unwrap(), 2);
    assert_eq!(store.stats().entries, 4);
}

#[test]
fn hard_state_commit_and_conf_state_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = open(&path);
    assert!(store.is_empty());
    store.initialize(conf_state(&[1, 2, 3], &[])).unwrap();
    assert!(!store.is_empty());
    store.append(&three_entries()).unwrap();
    store.set_hard_state(&hard_state(1, 1, 1)).unwrap();
    store.set_hard_state(&hard_state(2, 3, 2)).unwrap();
    store.set_commit(3).unwrap();
    store
        .set_conf_state(&conf_state(&[1, 2, 3, 4], &[5]))
        .unwrap();
    store.sync().unwrap();
    drop(store);

    let (store, rec) = open(&path);
    assert_eq!(rec.records, 8);
    let rs = store.initial_state().unwrap();
    assert_eq!(rs.hard_state, hard_state(2, 3, 3));
    assert_eq!(rs.conf_state, conf_state(&[1, 2, 3, 4], &[5]));
    assert!(!store.is_empty());
}

#[test]
fn a_commit_index_alone_is_written_without_an_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = LogStore::open(&path, true).unwrap();
    store.initialize(conf_state(&[1, 2, 3], &[])).unwrap();
    store.append(&three_entries()).unwrap();
    store.set_hard_state(&hard_state(1, 1, 1)).unwrap();
    store.sync().unwrap();
    let fsyncs = store.stats().fsync_count;
    assert!(fsyncs >= 1, "entries and a vote are fsynced");

    // Commit-only changes, either way they arrive: written, not fsynced.
    store.set_commit(2).unwrap();
    store.sync().unwrap();
    store.set_hard_state(&hard_state(1, 1, 3)).unwrap();
    store.sync().unwrap();
    assert_eq!(store.stats().fsync_count, fsyncs);

    // A new term or vote is fsynced again, and so is the next entry.
    store.set_hard_state(&hard_state(2, 1, 3)).unwrap();
    store.sync().unwrap();
    assert_eq!(store.stats().fsync_count, fsyncs + 1);
    store.set_hard_state(&hard_state(2, 2, 3)).unwrap();
    store.sync().unwrap();
    assert_eq!(store.stats().fsync_count, fsyncs + 2);
    store.append(&[entry(4, 2, b"d")]).unwrap();
    store.set_commit(4).unwrap();
    store.sync().unwrap();
    assert_eq!(store.stats().fsync_count, fsyncs + 3);
    drop(store);

    // What was written without an fsync is in the file all the same.
    let (store, _) = open(&path);
    assert_eq!(
        store.initial_state().unwrap().hard_state,
        hard_state(2, 2, 4)
    );
}

#[test]
fn write_due_leaves_commit_indexes_alone_for_the_next_write() {
    for fsync in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let path = log_path(&dir);
        let (store, _) = LogStore::open(&path, fsync).unwrap();
        store.initialize(conf_state(&[1, 2, 3], &[])).unwrap();
        store.append(&three_entries()).unwrap();
        store.set_hard_state(&hard_state(1, 1, 1)).unwrap();
        assert_eq!(
            store.write_due().unwrap(),
            fsync,
            "entries and a vote are due"
        );
        let size = std::fs::metadata(&path).unwrap().len();
        let written = store.stats().bytes;

        // Commit-only changes, either way they arrive, stay in the buffer.
        store.set_commit(2).unwrap();
        store.set_hard_state(&hard_state(1, 1, 3)).unwrap();
        assert!(!store.write_due().unwrap());
        assert_eq!(store.stats().bytes, written, "nothing written");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size);

        // The next record that is due takes them along, in order.
        store.append(&[entry(4, 1, b"d")]).unwrap();
        store.set_commit(4).unwrap();
        assert_eq!(store.write_due().unwrap(), fsync);
        assert!(store.stats().bytes > written);
        drop(store);
        let (store, _) = open(&path);
        let rs = store.initial_state().unwrap();
        assert_eq!(rs.hard_state, hard_state(1, 1, 4), "fsync {fsync}");
        assert_eq!(store.last_index().unwrap(), 4);

        // A new term is due by itself; `write` writes commit indexes too.
        store.set_hard_state(&hard_state(2, 1, 4)).unwrap();
        assert!(store.write_due().unwrap() || !store.fsyncs());
        let written = store.stats().bytes;
        store.set_commit(4).unwrap();
        assert!(!store.write_due().unwrap());
        assert_eq!(store.stats().bytes, written);
        store.write().unwrap();
        assert!(store.stats().bytes > written);
    }
}

#[test]
fn records_written_while_another_thread_fsyncs_are_all_there_after_its_next_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = LogStore::open(&path, true).unwrap();
    store.initialize(conf_state(&[1, 2, 3], &[])).unwrap();
    store.sync().unwrap();
    let fsyncs = store.stats().fsync_count;
    // A commit index alone owes no fsync; an entry does.
    store.set_commit(0).unwrap();
    assert!(!store.write().unwrap());
    store.append(&[entry(1, 1, b"a")]).unwrap();
    assert!(store.write().unwrap(), "an entry owes an fsync");
    assert_eq!(
        store.stats().fsync_count,
        fsyncs,
        "write alone does not fsync"
    );
    // The raft thread goes on writing while the syncer fsyncs.
    let syncer = {
        let store = store.clone();
        std::thread::spawn(move || {
            for _ in 0..50 {
                store.fdatasync().unwrap();
            }
        })
    };
    for i in 2..=200u64 {
        store
            .append(&[entry(i, 1, format!("e{i}").as_bytes())])
            .unwrap();
        assert!(store.write().unwrap());
    }
    syncer.join().unwrap();
    store.fdatasync().unwrap();
    assert_eq!(store.stats().fsync_count, fsyncs + 51);
    assert_eq!(store.last_index().unwrap(), 200);
    drop(store);
    let (store, _) = open(&path);
    assert_eq!(store.last_index().unwrap(), 200);
    let back = store
        .entries(1, 201, None, raft::GetEntriesContext::empty(false))
        .unwrap();
    for (i, e) in back.iter().enumerate() {
        let want = if i == 0 {
            "a".to_string()
        } else {
            format!("e{}", i + 1)
        };
        assert_eq!(&e.data[..], want.as_bytes());
    }
}

#[test]
fn an_fsync_that_fails_on_another_thread_stops_every_later_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = LogStore::open(&path, true).unwrap();
    store.initialize(conf_state(&[1, 2, 3], &[])).unwrap();
    store.append(&[entry(1, 1, b"a")]).unwrap();
    assert!(store.write().unwrap());
    store.set_fault(Some(crate::storage::LogFault::FsyncEio));
    let failed = {
        let store = store.clone();
        std::thread::spawn(move || store.fdatasync())
            .join()
            .unwrap()
    };
    let err = failed.expect_err("the injected EIO");
    assert!(err.to_string().contains("fsync"), "{err}");
    store.append(&[entry(2, 1, b"b")]).unwrap_err();
    assert!(store.write().is_err());
    assert!(
        store.fdatasync().is_err(),
        "never fsynced again after a failure"
    );
}

#[test]
fn initialize_only_on_an_empty_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = open(&path);
    store.initialize(conf_state(&[1], &[])).unwrap();
    store.sync().unwrap();
    let err = store.initialize(conf_state(&[2], &[])).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "raft log {}: initialize on a non-empty log (it holds 1 records)",
            path.display()
        )
    );
    drop(store);

    let (store, rec) = open(&path);
    assert_eq!(rec.records, 1);
    assert!(!store.is_empty());
    assert_eq!(
        store.initial_state().unwrap().conf_state,
        conf_state(&[1], &[])
    );
    assert!(store.initialize(conf_state(&[1], &[])).is_err());
}

#[test]
fn torn_tail_cut_mid_record_is_dropped_reported_and_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = open(&path);
    let ends = append_one_per_sync(&store, &three_entries());
    drop(store);
    // A crash part-way through writing the third record.
    let cut_at = ends[2] - 3;
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(cut_at)
        .unwrap();

    let (store, rec) = open(&path);
    assert_eq!(
        rec,
        Recovery {
            created: false,
            records: 2,
            entries: 2,
            first_index: 1,
            last_index: 2,
            torn_tail_bytes_dropped: cut_at - ends[1],
            file_bytes: ends[1],
        }
    );
    assert_eq!(fs::metadata(&path).unwrap().len(), ends[1]);
    assert_eq!(all_entries(&store), three_entries()[..2].to_vec());

    // The log keeps working, and a second open finds nothing to repair.
    store.append(&three_entries()[2..]).unwrap();
    store.sync().unwrap();
    drop(store);
    let (store, rec) = open(&path);
    assert_eq!(rec.torn_tail_bytes_dropped, 0);
    assert_eq!(rec.file_bytes, ends[2]);
    assert_eq!(all_entries(&store), three_entries());
}

#[test]
fn torn_tail_cut_mid_header_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = open(&path);
    let ends = append_one_per_sync(&store, &three_entries());
    drop(store);
    // Only 5 bytes of the third record's 8-byte frame header made it.
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(ends[1] + 5)
        .unwrap();

    let (_, rec) = open(&path);
    assert_eq!(rec.torn_tail_bytes_dropped, 5);
    assert_eq!(rec.entries, 2);
    assert_eq!(fs::metadata(&path).unwrap().len(), ends[1]);
}

#[test]
fn partial_garbage_header_at_the_end_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = open(&path);
    let ends = append_one_per_sync(&store, &three_entries());
    drop(store);
    append_bytes(&path, &[0xde, 0xad, 0xbe, 0xef, 0x01]);

    let (store, rec) = open(&path);
    assert_eq!(rec.torn_tail_bytes_dropped, 5);
    assert_eq!(rec.entries, 3);
    assert_eq!(rec.file_bytes, ends[2]);
    assert_eq!(fs::metadata(&path).unwrap().len(), ends[2]);
    assert_eq!(all_entries(&store), three_entries());
}

#[test]
fn bad_crc_in_the_last_record_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = open(&path);
    let ends = append_one_per_sync(&store, &three_entries());
    drop(store);
    flip_byte(&path, ends[2] - 1);

    let (_, rec) = open(&path);
    assert_eq!(rec.torn_tail_bytes_dropped, ends[2] - ends[1]);
    assert_eq!(rec.entries, 2);
    assert_eq!(fs::metadata(&path).unwrap().len(), ends[1]);
}

#[test]
fn zero_filled_tail_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = open(&path);
    let ends = append_one_per_sync(&store, &three_entries());
    drop(store);
    // Some filesystems extend the file before the data lands.
    append_bytes(&path, &vec![0u8; 100_000]);

    let (_, rec) = open(&path);
    assert_eq!(rec.torn_tail_bytes_dropped, 100_000);
    assert_eq!(rec.entries, 3);
    assert_eq!(fs::metadata(&path).unwrap().len(), ends[2]);
}

#[test]
fn impossible_length_at_the_end_of_file_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = open(&path);
    let ends = append_one_per_sync(&store, &three_entries());
    drop(store);
    append_bytes(&path, &[0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4]);

    let (_, rec) = open(&path);
    assert_eq!(rec.torn_tail_bytes_dropped, 8);
    assert_eq!(fs::metadata(&path).unwrap().len(), ends[2]);
}

#[test]
fn flipped_byte_in_a_middle_record_is_corrupt_at_its_offset() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = open(&path);
    let ends = append_one_per_sync(&store, &three_entries());
    drop(store);
    // Inside the second record's payload; the record starts where the first one ends.
    flip_byte(&path, ends[0] + 8 + 3);

    let err = open_err(&path);
    match &err {
        StorageError::Corrupt { offset, .. } => assert_eq!(*offset, ends[0]),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        corrupt_message(
            &path,
            ends[0],
            &format!(
                "crc mismatch; a valid record follows at byte offset {}",
                ends[1]
            )
        )
    );
    // Nothing was truncated: the operator decides.
    assert_eq!(fs::metadata(&path).unwrap().len(), ends[2]);
}

#[test]
fn damaged_length_with_valid_records_after_is_corrupt_not_torn() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = open(&path);
    let ends = append_one_per_sync(&store, &three_entries());
    drop(store);
    // The second record now claims to run past the end of the file.
    let mut bytes = fs::read(&path).unwrap();
    let at = ends[0] as usize;
    bytes[at..at + 4].copy_from_slice(&1000u32.to_le_bytes());
    fs::write(&path, bytes).unwrap();

    let err = open_err(&path);
    assert_eq!(
        err.to_string(),
        corrupt_message(
            &path,
            ends[0],
            &format!(
                "record length 1000 runs past end of file, but a valid record follows at \
                 byte offset {}",
                ends[1]
            )
        )
    );
    assert_eq!(fs::metadata(&path).unwrap().len(), ends[2]);
}

#[test]
fn impossible_length_followed_by_data_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = open(&path);
    let ends = append_one_per_sync(&store, &three_entries());
    drop(store);
    let mut bytes = fs::read(&path).unwrap();
    let at = ends[0] as usize;
    bytes[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    fs::write(&path, bytes).unwrap();

    let err = open_err(&path);
    assert_eq!(
        err.to_string(),
        corrupt_message(
            &path,
            ends[0],
            &format!(
                "impossible record length 4294967295 (maximum 67108864); a valid record \
                 follows at byte offset {}",
                ends[1]
            )
        )
    );
}

#[test]
fn valid_crc_with_unknown_kind_is_corrupt_even_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = open(&path);
    let ends = append_one_per_sync(&store, &three_entries());
    drop(store);
    let payload = [9u8, 1, 2, 3];
    let mut rec = 4u32.to_le_bytes().to_vec();
    rec.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    rec.extend_from_slice(&payload);
    append_bytes(&path, &rec);

    let err = open_err(&path);
    assert_eq!(
        err.to_string(),
        corrupt_message(&path, ends[2], "unknown record kind 9")
    );
}

#[test]
fn entry_index_gap_in_the_file_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = open(&path);
    let ends = append_one_per_sync(&store, &three_entries());
    drop(store);
    // A well-formed record for index 7 after index 3.
    let mut buf = Vec::new();
    super::record::encode_entry(&mut buf, &entry(7, 1, b"x")).unwrap();
    append_bytes(&path, &buf);

    let err = open_err(&path);
    assert_eq!(
        err.to_string(),
        corrupt_message(
            &path,
            ends[2],
            "entry index 7 leaves a gap after the last index 3"
        )
    );
}

#[test]
fn foreign_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    fs::write(&path, b"*1\r\n$4\r\nPING\r\n").unwrap();

    let err = open_err(&path);
    assert_eq!(
        err.to_string(),
        corrupt_message(
            &path,
            0,
            "not a redis-raft log file (expected magic \"RRLOG\", found \"*1\\r\\n$\")"
        )
    );
    assert_eq!(fs::read(&path).unwrap(), b"*1\r\n$4\r\nPING\r\n");
}

#[test]
fn newer_format_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    fs::write(&path, b"RRLOG\x03\x00\x00\x00").unwrap();

    let err = open_err(&path);
    assert_eq!(
        err.to_string(),
        corrupt_message(
            &path,
            5,
            "unsupported log format version 3 (this build reads version 2)"
        )
    );
}

#[test]
fn version_1_logs_are_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    fs::write(&path, b"RRLOG\x01\x00\x00\x00").unwrap();
    let (store, rec) = open(&path);
    assert!(!rec.created);
    assert!(store.is_empty());
}

#[test]
fn membership_records_survive_reopen_and_the_last_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    {
        let (store, _) = open(&path);
        let entries = vec![entry(1, 1, b"boot")];
        let hs = HardState {
            term: 1,
            vote: 0,
            commit: 1,
        };
        store
            .bootstrap(&entries, &hs, &conf_state(&[1], &[]), (1, b"book-1"))
            .unwrap();
        store.append(&[entry(2, 2, b"x")]).unwrap();
        store
            .set_membership(2, &conf_state(&[1], &[2]), b"book-2")
            .unwrap();
        store.sync().unwrap();
        assert!(store
            .bootstrap(&entries, &hs, &conf_state(&[1], &[]), (1, b"again"))
            .is_err());
    }
    let (store, _) = open(&path);
    assert_eq!(store.membership(), Some((2, b"book-2".to_vec())));
    let rs = store.initial_state().unwrap();
    assert_eq!(rs.conf_state, conf_state(&[1], &[2]));
    assert_eq!(rs.hard_state.commit, 1);
    assert_eq!(store.last_index().unwrap(), 2);
}

#[test]
fn incomplete_header_from_a_crash_during_creation_is_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    fs::write(&path, b"RRL").unwrap();

    let (store, rec) = open(&path);
    assert!(rec.created);
    assert_eq!(rec.torn_tail_bytes_dropped, 3);
    assert_eq!(rec.file_bytes, 9);
    assert!(store.is_empty());
    assert_eq!(fs::read(&path).unwrap(), b"RRLOG\x02\x00\x00\x00");
}

#[test]
fn open_on_a_directory_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = LogStore::open(dir.path(), false).unwrap_err();
    match &err {
        StorageError::Io { what, .. } => assert_eq!(*what, "open"),
        other => panic!("expected Io, got {other:?}"),
    }
    assert!(err
        .to_string()
        .starts_with(&format!("raft log {}: open failed: ", dir.path().display())));
}

#[cfg(target_os = "linux")]
#[test]
fn write_failure_is_an_io_error_with_context() {
    // /dev/full fails every write with ENOSPC.
    let path = Path::new("/dev/full");
    if !path.exists() {
        return;
    }
    let err = LogStore::open(path, false).unwrap_err();
    match &err {
        StorageError::Io { what, source, .. } => {
            assert_eq!(*what, "write header");
            assert_eq!(source.kind(), std::io::ErrorKind::StorageFull);
        }
        other => panic!("expected Io, got {other:?}"),
    }
}

#[test]
fn append_rejects_gaps_and_non_consecutive_batches() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = open(&path);
    store.append(&three_entries()).unwrap();

    let err = store.append(&[entry(5, 1, b"")]).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "raft log {}: entry index 5 leaves a gap after the last index 3",
            path.display()
        )
    );
    let err = store
        .append(&[entry(4, 1, b""), entry(6, 1, b"")])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "raft log {}: appended entries are not consecutive: index 6 follows index 4",
            path.display()
        )
    );
    let err = store.append(&[entry(0, 1, b"")]).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "raft log {}: entry index 0 is below the first index 1",
            path.display()
        )
    );
    // Nothing rejected reached memory or the write buffer.
    assert_eq!(store.last_index().unwrap(), 3);
    store.sync().unwrap();
    drop(store);
    let (_, rec) = open(&path);
    assert_eq!(rec.records, 3);
}

#[test]
fn append_never_overwrites_committed_entries() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = open(&path);
    store.append(&three_entries()).unwrap();
    store.set_commit(2).unwrap();
    let err = store.append(&[entry(2, 2, b"")]).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "raft log {}: entry index 2 would overwrite a committed entry (commit index 2)",
            path.display()
        )
    );
    store.append(&[entry(3, 2, b"ok")]).unwrap();
    assert_eq!(store.term(3).unwrap(), 2);
}

#[test]
fn commit_beyond_the_last_index_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = open(&path);
    store.append(&three_entries()).unwrap();
    let want = format!(
        "raft log {}: commit index 4 is beyond the last index 3 \
         (entries must be appended before the hard state that commits them)",
        path.display()
    );
    assert_eq!(store.set_commit(4).unwrap_err().to_string(), want);
    assert_eq!(
        store
            .set_hard_state(&hard_state(1, 1, 4))
            .unwrap_err()
            .to_string(),
        want
    );
    assert_eq!(
        store.initial_state().unwrap().hard_state,
        HardState::default()
    );
}

#[test]
fn oversized_entry_is_rejected_and_nothing_is_buffered() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = open(&path);
    let big = entry(2, 1, &vec![7u8; 64 * 1024 * 1024]);
    let err = store.append(&[entry(1, 1, b"fine"), big]).unwrap_err();
    assert!(matches!(err, StorageError::Invalid { .. }), "{err:?}");
    assert!(err
        .to_string()
        .starts_with(&format!("raft log {}: entry 2: record of ", path.display())));
    assert_eq!(store.last_index().unwrap(), 0);
    assert!(store.is_empty());
    store.sync().unwrap();
    assert_eq!(fs::metadata(&path).unwrap().len(), 9);
}

#[test]
fn one_fsync_per_sync_batch_and_stats() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = LogStore::open(&path, true).unwrap();
    for batch in 0..3u64 {
        let first = batch * 2 + 1;
        store
            .append(&[entry(first, 1, b"x"), entry(first + 1, 1, b"y")])
            .unwrap();
        store.set_hard_state(&hard_state(1, 1, first)).unwrap();
        store.sync().unwrap();
    }
    // Nothing buffered: no write, no fsync.
    store.sync().unwrap();
    let stats = store.stats();
    assert_eq!(stats.fsync_count, 3);
    assert!(stats.fsync_max_us >= stats.fsync_avg_us);
    assert_eq!(
        stats,
        LogStats {
            entries: 6,
            bytes: stats.bytes,
            first_index: 1,
            last_index: 6,
            snapshot_index: 0,
            snapshot_term: 0,
            fsync_count: 3,
            fsync_max_us: stats.fsync_max_us,
            fsync_avg_us: stats.fsync_avg_us,
            cache_entries: 6,
            cache_bytes: stats.cache_bytes,
            slot_bytes: stats.slot_bytes,
        }
    );
    assert!(stats.slot_bytes >= 6 * 24);
    assert!(stats.cache_bytes > 0);

    // With fsync on, zeros are written ahead of the records (the bytes the log holds).
    let physical = fs::metadata(&path).unwrap().len();
    assert!(
        physical > stats.bytes,
        "{physical} bytes on disk, {} of records",
        stats.bytes
    );

    store.set_fsync(false);
    store.append(&[entry(7, 1, b"z")]).unwrap();
    store.sync().unwrap();
    assert_eq!(store.stats().fsync_count, 3);
    assert_eq!(store.stats().entries, 7);
    let bytes = store.stats().bytes;
    drop(store);
    // Reopened: the zeros after the records are not a torn write, and are dropped.
    let (store, rec) = LogStore::open(&path, true).unwrap();
    assert_eq!(rec.entries, 7);
    assert_eq!(rec.file_bytes, bytes);
    assert_eq!(store.stats().bytes, bytes);
    assert_eq!(fs::metadata(&path).unwrap().len(), bytes);
}

#[test]
fn zeros_then_stray_bytes_after_the_records_are_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = LogStore::open(&path, true).unwrap();
    let ends = append_one_per_sync(&store, &three_entries());
    drop(store);
    // A crash left some bytes of a never-finished write inside the preallocated zeros.
    let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"garbage", ends[2] + 5000).unwrap();
    drop(f);
    let (_, rec) = LogStore::open(&path, true).unwrap();
    assert_eq!(rec.entries, 3);
    assert_eq!(fs::metadata(&path).unwrap().len(), ends[2]);
}

#[test]
fn a_write_whose_pages_landed_out_of_order_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = LogStore::open(&path, true).unwrap();
    store.append(&[entry(1, 1, b"first")]).unwrap();
    store.sync().unwrap();
    let durable = store.stats().bytes;
    // One write of many records spanning several pages; the crash leaves its second page
    // as zeros and the pages after it on disk.
    let big: Vec<Entry> = (2..40).map(|i| entry(i, 1, &[b'x'; 500])).collect();
    store.append(&big).unwrap();
    store.sync().unwrap();
    drop(store);
    let page = durable.div_ceil(4096) * 4096 + 4096;
    let mut bytes = fs::read(&path).unwrap();
    for b in &mut bytes[page as usize..page as usize + 4096] {
        *b = 0;
    }
    fs::write(&path, &bytes).unwrap();
    let (store, rec) = LogStore::open(&path, true).unwrap();
    assert!(rec.torn_tail_bytes_dropped > 0);
    // Every record before the zeroed page is kept, nothing after it.
    assert!(
        rec.entries >= 8 && rec.entries < 39,
        "{} entries",
        rec.entries
    );
    assert_eq!(store.last_index().unwrap(), rec.entries);
}

#[test]
fn a_record_torn_in_preallocated_space_is_a_torn_tail_not_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = LogStore::open(&path, true).unwrap();
    let ends = append_one_per_sync(&store, &three_entries());
    drop(store);
    assert!(fs::metadata(&path).unwrap().len() > ends[2], "preallocated");
    // A crash while the third record was written into the zeros: only some of its bytes
    // landed (its header and the start of its payload), zeros after it.
    let mut bytes = fs::read(&path).unwrap();
    let third = ends[1] as usize;
    for b in &mut bytes[third + 10..ends[2] as usize] {
        *b = 0;
    }
    fs::write(&path, &bytes).unwrap();
    let (store, rec) = LogStore::open(&path, true).unwrap();
    assert_eq!(rec.entries, 2);
    assert!(rec.torn_tail_bytes_dropped > 0);
    assert_eq!(fs::metadata(&path).unwrap().len(), ends[1]);
    drop(store);

    // Damage with a valid record after it is still corruption, zeros or not.
    let (store, _) = LogStore::open(&path, true).unwrap();
    let ends = append_one_per_sync(&store, &[entry(3, 1, b"c"), entry(4, 1, b"d")]);
    drop(store);
    flip_byte(&path, ends[0] - 2);
    let err = match LogStore::open(&path, true) {
        Ok(_) => panic!("opened a log damaged before a valid record"),
        Err(e) => e,
    };
    assert!(err.to_string().contains("a valid record follows"), "{err}");
}

#[test]
fn raft_storage_entries_term_and_limit_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = open(&path);
    let ents: Vec<Entry> = (1..=5).map(|i| entry(i, i.div_ceil(2), b"data")).collect();
    store.append(&ents).unwrap();
    let ctx = || GetEntriesContext::empty(false);

    assert_eq!(store.first_index().unwrap(), 1);
    assert_eq!(store.last_index().unwrap(), 5);

    assert_eq!(
        store.entries(2, 5, None, ctx()).unwrap(),
        ents[1..4].to_vec()
    );
    assert_eq!(store.entries(1, 6, None, ctx()).unwrap(), ents);
    assert_eq!(
        store.entries(3, 3, None, ctx()).unwrap(),
        Vec::<Entry>::new()
    );
    assert_eq!(
        store.entries(0, 3, None, ctx()).unwrap_err(),
        raft::Error::Store(raft::StorageError::Compacted)
    );
    assert_eq!(
        store.entries(2, 7, None, ctx()).unwrap_err(),
        raft::Error::Store(raft::StorageError::Unavailable)
    );

    // limit_size: always at least one entry, then as many as fit in max_size bytes.
    let one = prost::Message::encoded_len(&ents[0]) as u64;
    assert_eq!(store.entries(2, 6, 0, ctx()).unwrap(), ents[1..2].to_vec());
    assert_eq!(
        store.entries(2, 6, 2 * one, ctx()).unwrap(),
        ents[1..3].to_vec()
    );
    assert_eq!(
        store.entries(2, 6, 2 * one + one - 1, ctx()).unwrap(),
        ents[1..3].to_vec()
    );
    assert_eq!(
        store.entries(2, 6, u64::MAX, ctx()).unwrap(),
        ents[1..5].to_vec()
    );

    assert_eq!(store.term(0).unwrap(), 0);
    assert_eq!(store.term(1).unwrap(), 1);
    assert_eq!(store.term(3).unwrap(), 2);
    assert_eq!(store.term(5).unwrap(), 3);
    assert_eq!(
        store.term(6).unwrap_err(),
        raft::Error::Store(raft::StorageError::Unavailable)
    );
    assert_eq!(
        store.snapshot(0, 2).unwrap_err(),
        raft::Error::Store(raft::StorageError::SnapshotTemporarilyUnavailable)
    );
}

#[test]
fn clones_share_one_store_across_threads() {
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<LogStore>();

    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = open(&path);
    let writer = store.clone();
    std::thread::spawn(move || {
        writer.append(&three_entries()).unwrap();
        writer.sync().unwrap();
    })
    .join()
    .unwrap();
    assert_eq!(store.last_index().unwrap(), 3);
    assert_eq!(store.stats().bytes, fs::metadata(&path).unwrap().len());
}

#[cfg(target_os = "linux")]
#[test]
fn a_write_into_a_full_disk_is_kept_and_written_once_space_returns() {
    let full = Path::new("/dev/full");
    if !full.exists() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = open(&path);
    let real = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap()
    };
    // Swap the file for one whose writes fail with ENOSPC, as a full disk would.
    super::mutex_lock(&store.inner.writer).file =
        OpenOptions::new().write(true).open(full).unwrap().into();
    store.append(&three_entries()).unwrap();
    store.set_hard_state(&hard_state(1, 1, 2)).unwrap();

    let err = store.sync().unwrap_err();
    assert!(err.is_no_space(), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "raft log {}: {}; writes resume when space is freed",
            path.display(),
            std::io::Error::from_raw_os_error(libc::ENOSPC)
        )
    );
    assert_eq!(store.failure(), None);
    // Still full: the same, and the store keeps taking changes (raft-rs reads them).
    assert!(store.sync().unwrap_err().is_no_space());
    store.append(&[entry(4, 1, b"four")]).unwrap();
    assert_eq!(store.last_index().unwrap(), 4);
    assert_eq!(store.stats().bytes, 9, "nothing counts as written");

    // Space again: everything buffered is written, at the offset the first attempt used.
    super::mutex_lock(&store.inner.writer).file = real().into();
    store.sync().unwrap();
    drop(store);
    let (store, rec) = open(&path);
    assert_eq!(rec.torn_tail_bytes_dropped, 0);
    let mut want = three_entries();
    want.push(entry(4, 1, b"four"));
    assert_eq!(all_entries(&store), want);
    assert_eq!(
        store.initial_state().unwrap().hard_state,
        hard_state(1, 1, 2)
    );
}

#[test]
fn a_partial_write_into_a_full_disk_is_overwritten_by_the_retry() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = open(&path);
    append_one_per_sync(&store, &three_entries()[..1]);
    let at = store.stats().bytes;
    store.append(&three_entries()[1..]).unwrap();
    store.set_fault(Some(super::LogFault::NoSpace));
    assert!(store.sync().unwrap_err().is_no_space());
    // What a short write before ENOSPC leaves: the start of the buffer, cut short.
    let head = super::mutex_lock(&store.inner.writer).buf[..7].to_vec();
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &head, at).unwrap();
    store.set_fault(None);
    store.sync().unwrap();
    drop(store);
    let (store, rec) = open(&path);
    assert_eq!(rec.torn_tail_bytes_dropped, 0);
    assert_eq!(all_entries(&store), three_entries());
}

#[test]
fn after_a_failed_write_the_store_refuses_further_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = open(&path);
    store.set_fault(Some(super::LogFault::WriteEio));
    store.append(&three_entries()).unwrap();

    let err = store.sync().unwrap_err();
    match &err {
        StorageError::Io { what, source, .. } => {
            assert_eq!(*what, "write");
            assert_eq!(source.raw_os_error(), Some(libc::EIO));
        }
        other => panic!("expected Io, got {other:?}"),
    }
    let want = format!(
        "raft log {} is unusable after an earlier failure (write failed: {}); restart the node",
        path.display(),
        std::io::Error::from_raw_os_error(libc::EIO)
    );
    assert!(store.failure().is_some());
    assert_eq!(store.sync().unwrap_err().to_string(), want);
    assert_eq!(
        store.append(&[entry(4, 1, b"")]).unwrap_err().to_string(),
        want
    );
    assert_eq!(store.set_commit(1).unwrap_err().to_string(), want);
    // The refusal names the failure it comes from as that failure said it.
    assert_eq!(
        store.sync().unwrap_err().first_failure(),
        err.to_string(),
        "the first failure"
    );
    assert_eq!(store.stats().bytes, 9);
}

#[test]
fn after_a_failed_fsync_the_store_never_fsyncs_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = LogStore::open(&path, true).unwrap();
    append_one_per_sync(&store, &three_entries()[..1]);
    let fsyncs = store.stats().fsync_count;
    store.set_fault(Some(super::LogFault::FsyncEio));
    store.append(&three_entries()[1..]).unwrap();
    let err = store.sync().unwrap_err();
    assert!(
        matches!(&err, StorageError::Io { what: "fsync", .. }),
        "{err:?}"
    );
    assert!(!err.is_no_space());
    // Refused before any I/O: no second fsync could report the lost pages as durable.
    for _ in 0..3 {
        assert!(matches!(
            store.sync().unwrap_err(),
            StorageError::Failed { .. }
        ));
    }
    assert_eq!(store.stats().fsync_count, fsyncs);
    assert!(matches!(
        store.append(&[entry(4, 1, b"")]).unwrap_err(),
        StorageError::Failed { .. }
    ));
}

/// The entries `committed_log` writes, at `indexes`.
fn committed_entries(indexes: std::ops::RangeInclusive<u64>) -> Vec<Entry> {
    indexes.map(|i| entry(i, 1 + i / 4, b"set k v")).collect()
}

fn committed_log(path: &Path, n: u64) -> LogStore {
    let (store, _) = open(path);
    store.append(&committed_entries(1..=n)).unwrap();
    store
        .set_hard_state(&HardState {
            term: 1 + n / 4,
            vote: 1,
            commit: n,
        })
        .unwrap();
    store.set_conf_state(&conf_state(&[1, 2, 3], &[])).unwrap();
    store.sync().unwrap();
    store
}

#[test]
fn compaction_drops_covered_entries_in_memory_and_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let store = committed_log(&path, 20);
    let before = fs::metadata(&path).unwrap().len();
    let term_12 = store.term(12).unwrap();
    let kept = store
        .entries(13, 21, None, GetEntriesContext::empty(false))
        .unwrap();
    assert_eq!(store.stats().cache_entries, 20, "all cached before");
    store.compact(12, &conf_state(&[1, 2, 3], &[4])).unwrap();
    assert_eq!(store.first_index().unwrap(), 13);
    assert_eq!(store.last_index().unwrap(), 20);
    assert_eq!(store.term(12).unwrap(), term_12);
    // Only the entries after the snapshot were kept in memory, and counted as such.
    let stats = store.stats();
    assert_eq!(stats.cache_entries, 8);
    assert_eq!(
        stats.cache_bytes,
        kept.iter().map(super::entry_bytes).sum::<u64>()
    );
    assert_eq!(
        store
            .entries(13, 21, None, GetEntriesContext::empty(false))
            .unwrap(),
        kept
    );
    assert!(matches!(
        store.entries(5, 13, None, GetEntriesContext::empty(false)),
        Err(raft::Error::Store(raft::StorageError::Compacted))
    ));
    let snap = store.snapshot(0, 2).unwrap();
    assert_eq!(snap.get_metadata().index, 12);
    assert_eq!(snap.get_metadata().term, term_12);
    assert_eq!(
        snap.get_metadata().get_conf_state(),
        &conf_state(&[1, 2, 3], &[4])
    );
    assert!(fs::metadata(&path).unwrap().len() < before);
    // Appends go on in the new file, and everything survives a reopen.
    store.append(&[entry(21, 6, b"after")]).unwrap();
    store.set_commit(21).unwrap();
    store.sync().unwrap();
    drop(store);
    let (store, rec) = open(&path);
    assert_eq!(rec.first_index, 13);
    assert_eq!(rec.last_index, 21);
    assert_eq!(store.term(12).unwrap(), term_12);
    assert_eq!(store.initial_state().unwrap().hard_state.commit, 21);
    assert_eq!(
        store.snapshot_meta(),
        SnapshotMeta {
            index: 12,
            term: term_12,
            conf_state: conf_state(&[1, 2, 3], &[4])
        }
    );
    // Compacting behind the snapshot or past the commit index is refused.
    assert!(store.compact(10, &conf_state(&[1], &[])).is_err());
    assert!(store.compact(30, &conf_state(&[1], &[])).is_err());
}

/// A compaction writes its new file while the log goes on: what was appended meanwhile
/// (synced or still buffered, a conflicting suffix that replaced entries the new file
/// already holds, a new commit index) is in the log after it, in memory and on disk, and
/// entries read back from the file (none cached) come from their new places.
#[test]
fn what_is_written_while_a_compaction_runs_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let store = committed_log(&path, 20);
    store.set_cache_max_bytes(1);
    let meanwhile = store.clone();
    super::DURING_COMPACTION.with(|h| {
        *h.borrow_mut() = Some(Box::new(move || {
            let s = meanwhile;
            s.append(&entries(21..=25, 6, b"first")).unwrap();
            s.sync().unwrap();
            s.set_hard_state(&hard_state(7, 2, 22)).unwrap();
            s.append(&entries(24..=26, 7, b"second")).unwrap();
            s.sync().unwrap();
            // Buffered only: it stays buffered through the compaction, for the next sync.
            s.append(&[entry(27, 7, b"buffered")]).unwrap();
        }))
    });
    store.compact(12, &conf_state(&[1, 2, 3], &[])).unwrap();
    let mut want = committed_entries(13..=20);
    want.extend(entries(21..=23, 6, b"first"));
    want.extend(entries(24..=26, 7, b"second"));
    want.push(entry(27, 7, b"buffered"));
    assert_eq!(store.first_index().unwrap(), 13);
    assert_eq!(all_entries_from(&store, 13), want);
    // The buffered entry is written with the next sync, behind the copied records.
    store.sync().unwrap();
    assert_eq!(
        store.stats().cache_entries,
        0,
        "every entry is read back from the file"
    );
    assert_eq!(all_entries_from(&store, 13), want);
    store.append(&[entry(28, 7, b"after")]).unwrap();
    store.sync().unwrap();
    want.push(entry(28, 7, b"after"));
    assert_eq!(all_entries_from(&store, 13), want);
    drop(store);
    let (store, rec) = open(&path);
    assert_eq!((rec.first_index, rec.last_index), (13, 28));
    assert_eq!(all_entries_from(&store, 13), want);
    assert_eq!(
        store.initial_state().unwrap().hard_state,
        hard_state(7, 2, 22)
    );
    assert_eq!(store.snapshot_meta().index, 12);
}

/// Records still buffered when a compaction starts are in its new file; what is buffered
/// behind them while it runs stays buffered, and every record is on disk once, after a sync.
#[test]
fn records_buffered_across_a_compaction_are_written_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let store = committed_log(&path, 20);
    store.append(&[entry(21, 6, b"before")]).unwrap();
    let meanwhile = store.clone();
    super::DURING_COMPACTION.with(|h| {
        *h.borrow_mut() = Some(Box::new(move || {
            meanwhile.append(&[entry(22, 6, b"during")]).unwrap();
            meanwhile.set_commit(21).unwrap();
        }))
    });
    store.compact(12, &conf_state(&[1, 2, 3], &[])).unwrap();
    store.sync().unwrap();
    let mut want = committed_entries(13..=20);
    want.push(entry(21, 6, b"before"));
    want.push(entry(22, 6, b"during"));
    store.set_cache_max_bytes(1);
    assert_eq!(all_entries_from(&store, 13), want);
    drop(store);
    let (store, rec) = open(&path);
    assert_eq!((rec.first_index, rec.last_index), (13, 22));
    assert_eq!(all_entries_from(&store, 13), want);
    assert_eq!(store.initial_state().unwrap().hard_state.commit, 21);
}

#[test]
fn an_installed_snapshot_replaces_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let store = committed_log(&path, 5);
    store
        .apply_snapshot(
            SnapshotMeta {
                index: 100,
                term: 7,
                conf_state: conf_state(&[1, 2], &[]),
            },
            (100, b"book-100"),
        )
        .unwrap();
    assert_eq!(store.first_index().unwrap(), 101);
    assert_eq!(store.last_index().unwrap(), 100);
    assert_eq!(store.term(100).unwrap(), 7);
    store.append(&[entry(101, 7, b"next")]).unwrap();
    store.sync().unwrap();
    drop(store);
    let (store, rec) = open(&path);
    assert_eq!((rec.first_index, rec.last_index), (101, 101));
    let rs = store.initial_state().unwrap();
    assert_eq!(rs.conf_state, conf_state(&[1, 2], &[]));
    assert_eq!(rs.hard_state.commit, 100);
    assert_eq!(rs.hard_state.term, 7);
    assert!(!path.with_extension("rewrite.tmp").exists());
}

#[test]
fn without_a_snapshot_none_is_offered() {
    let dir = tempfile::tempdir().unwrap();
    let store = committed_log(&log_path(&dir), 3);
    assert!(matches!(
        store.snapshot(0, 2),
        Err(raft::Error::Store(
            raft::StorageError::SnapshotTemporarilyUnavailable
        ))
    ));
}

// ---- Entry cache (`raft.log-max-cache-size`) ----

/// Entries whose encoded size is about 110 bytes each; `entry_size` is the exact size.
fn sized_entries(from: u64, to: u64, term: u64, tag: &str) -> Vec<Entry> {
    (from..=to)
        .map(|i| {
            entry(
                i,
                term,
                format!("{tag}-{i:06}-{}", "v".repeat(96)).as_bytes(),
            )
        })
        .collect()
}

fn entry_size(e: &Entry) -> u64 {
    use prost::Message as _;
    e.encoded_len() as u64
}

fn open_cached(path: &Path, cache_max_bytes: u64) -> (LogStore, Recovery) {
    match LogStore::open_with_cache(path, false, cache_max_bytes) {
        Ok(r) => r,
        Err(e) => panic!("open {}: {e}", path.display()),
    }
}

/// Appends `entries` in batches of `batch`, syncing after each, committing as it goes.
fn append_synced(store: &LogStore, entries: &[Entry], batch: usize) {
    for chunk in entries.chunks(batch) {
        store.append(chunk).unwrap();
        let last = chunk.last().unwrap();
        store
            .set_hard_state(&hard_state(last.term, 1, last.index))
            .unwrap();
        store.sync().unwrap();
    }
}

const CACHE_BYTES: u64 = 2_000;

/// A bound that leaves room for payloads beside the slots of a few hundred entries.
const LOG_MEMORY_BYTES: u64 = 20_000;

#[test]
fn the_cache_bound_holds_after_every_synced_append() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open_cached(&log_path(&dir), LOG_MEMORY_BYTES);
    let ents = sized_entries(1, 300, 1, "a");
    for chunk in ents.chunks(7) {
        store.append(chunk).unwrap();
        store.sync().unwrap();
        let st = store.stats();
        // Payloads and slots together.
        assert!(st.slot_bytes >= st.entries * 24, "{st:?}");
        assert!(st.cache_bytes + st.slot_bytes <= LOG_MEMORY_BYTES, "{st:?}");
        // Only the oldest entries leave: what stays is the newest that fit.
        let kept: u64 = ents[..chunk.last().unwrap().index as usize]
            .iter()
            .rev()
            .take(st.cache_entries as usize + 1)
            .map(super::entry_bytes)
            .sum();
        assert!(
            kept + st.slot_bytes > LOG_MEMORY_BYTES || st.cache_entries == st.entries,
            "{st:?}"
        );
    }
    let st = store.stats();
    assert_eq!(st.entries, 300);
    // 7.2 kB of slots (more as allocated) leave at most 12.8 kB for ~210-byte entries.
    assert!(st.cache_entries > 20 && st.cache_entries < 70, "{st:?}");
}

#[test]
fn evicted_entries_are_read_back_identical_and_size_limited() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open_cached(&log_path(&dir), CACHE_BYTES);
    let ents = sized_entries(1, 200, 3, "b");
    append_synced(&store, &ents, 10);
    assert_eq!(all_entries(&store), ents);
    // A range across the eviction boundary, and one wholly on disk.
    let first_cached = 201 - store.stats().cache_entries;
    let ctx = || GetEntriesContext::empty(false);
    let across = store.entries(first_cached - 5, 201, None, ctx()).unwrap();
    assert_eq!(across, ents[(first_cached - 6) as usize..]);
    assert_eq!(store.entries(17, 18, None, ctx()).unwrap(), ents[16..17]);
    // max_size as raft-rs's limit_size: at least one entry, then while the sum fits.
    let one = entry_size(&ents[0]);
    assert_eq!(store.entries(1, 100, 0, ctx()).unwrap(), ents[..1]);
    assert_eq!(store.entries(1, 100, one * 3, ctx()).unwrap(), ents[..3]);
    assert_eq!(
        store.entries(1, 100, one * 3 - 1, ctx()).unwrap(),
        ents[..2]
    );
    assert_eq!(store.term(1).unwrap(), 3);
}

#[test]
fn a_damaged_evicted_record_is_a_storage_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = open_cached(&path, CACHE_BYTES);
    let sizes = append_one_per_sync(&store, &sized_entries(1, 50, 1, "c"));
    // Entry 3's record starts where the file ended after entry 2.
    flip_byte(&path, sizes[1] + 20);
    let got = store.entries(2, 5, None, GetEntriesContext::empty(false));
    match got {
        Err(raft::Error::Store(raft::StorageError::Other(e))) => {
            let msg = e.to_string();
            assert!(msg.contains("reading back entry 3"), "{msg}");
            assert!(msg.contains(&format!("byte offset {}", sizes[1])), "{msg}");
        }
        other => panic!("expected a storage error, got {other:?}"),
    }
    // The entries still cached are unaffected.
    assert!(store
        .entries(50, 51, None, GetEntriesContext::empty(false))
        .is_ok());
}

#[test]
fn truncating_an_evicted_range_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = open_cached(&path, CACHE_BYTES);
    let ents = sized_entries(1, 100, 1, "d");
    append_synced(&store, &ents[..40], 40);
    store.append(&ents[40..]).unwrap();
    store.sync().unwrap();
    // Entries 41.. are uncommitted and mostly evicted; a new leader replaces them from 50.
    assert!(store.stats().cache_entries < 40);
    let newer = sized_entries(50, 80, 2, "e");
    store.append(&newer).unwrap();
    store.sync().unwrap();
    let mut want = ents[..49].to_vec();
    want.extend(newer.iter().cloned());
    assert_eq!(all_entries(&store), want);
    assert!(store.stats().cache_bytes <= CACHE_BYTES);
    assert_eq!(store.term(49).unwrap(), 1);
    assert_eq!(store.term(50).unwrap(), 2);
    assert!(store.term(81).is_err());
    // The dead records of the old suffix stay in the file; a reopen skips them too.
    drop(store);
    let (store, rec) = open_cached(&path, CACHE_BYTES);
    assert_eq!((rec.entries, rec.last_index), (80, 80));
    assert_eq!(all_entries(&store), want);
}

#[test]
fn a_restart_keeps_only_what_fits_and_reads_the_rest_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let ents = sized_entries(1, 500, 1, "f");
    {
        let (store, _) = open(&path);
        append_synced(&store, &ents, 100);
        assert_eq!(store.stats().cache_entries, 500);
    }
    let (store, rec) = open_cached(&path, LOG_MEMORY_BYTES);
    assert_eq!(rec.entries, 500);
    let st = store.stats();
    assert!(
        st.cache_bytes + st.slot_bytes <= LOG_MEMORY_BYTES && st.cache_entries > 0,
        "{st:?}"
    );
    assert_eq!(all_entries(&store), ents);
    // Appends after the restart land at the right offsets too.
    let more = sized_entries(501, 520, 1, "g");
    append_synced(&store, &more, 5);
    let mut want = ents.clone();
    want.extend(more);
    assert_eq!(all_entries(&store), want);
}

#[test]
fn the_bound_changes_at_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open_cached(&log_path(&dir), u64::MAX);
    let ents = sized_entries(1, 100, 1, "h");
    append_synced(&store, &ents, 25);
    assert_eq!(store.stats().cache_entries, 100);
    store.set_cache_max_bytes(CACHE_BYTES);
    assert!(store.stats().cache_bytes <= CACHE_BYTES);
    store.set_cache_max_bytes(0);
    assert_eq!(store.stats().cache_entries, 0);
    assert_eq!(store.stats().cache_bytes, 0);
    assert_eq!(all_entries(&store), ents);
}

#[test]
fn compaction_and_snapshot_install_keep_offsets_right() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (store, _) = open_cached(&path, CACHE_BYTES);
    let ents = sized_entries(1, 300, 1, "i");
    append_synced(&store, &ents, 30);
    store.compact(120, &conf_state(&[1, 2, 3], &[])).unwrap();
    assert!(store.stats().cache_bytes <= CACHE_BYTES);
    assert_eq!(all_entries_from(&store, 121), ents[120..]);
    // Appends after the rewrite, then a reopen.
    let more = sized_entries(301, 340, 1, "j");
    append_synced(&store, &more, 8);
    let mut want = ents[120..].to_vec();
    want.extend(more);
    assert_eq!(all_entries_from(&store, 121), want);
    drop(store);
    let (store, rec) = open_cached(&path, CACHE_BYTES);
    assert_eq!((rec.first_index, rec.last_index), (121, 340));
    assert_eq!(all_entries_from(&store, 121), want);
    // An installed snapshot that the log agrees with keeps the suffix after it.
    let term = store.term(200).unwrap();
    store
        .apply_snapshot(
            SnapshotMeta {
                index: 200,
                term,
                conf_state: conf_state(&[1, 2], &[]),
            },
            (200, b"book-200"),
        )
        .unwrap();
    assert_eq!(all_entries_from(&store, 201), want[80..]);
    drop(store);
    let (store, _) = open_cached(&path, CACHE_BYTES);
    assert_eq!(all_entries_from(&store, 201), want[80..]);
}

fn all_entries_from(store: &LogStore, low: u64) -> Vec<Entry> {
    let last = store.last_index().expect("last_index");
    store
        .entries(low, last + 1, None, GetEntriesContext::empty(false))
        .expect("entries")
}

/// Entries appended behind a record already buffered (here a hard state; also what a write
/// that found the disk full leaves in the buffer) are read back from their own records
/// once evicted. Their slots used to count the buffered bytes twice.
#[test]
fn entries_buffered_behind_another_record_are_read_back_from_their_own_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let s = committed_log(&path, 20);
    s.set_cache_max_bytes(1);
    s.set_hard_state(&hard_state(7, 2, 20)).unwrap();
    s.append(&entries(21..=23, 7, b"behind")).unwrap();
    s.sync().unwrap();
    let mut want = committed_entries(1..=20);
    want.extend(entries(21..=23, 7, b"behind"));
    assert_eq!(
        s.stats().cache_entries,
        0,
        "every entry is read back from the file"
    );
    assert_eq!(all_entries(&s), want);
    drop(s);
    let (s, _) = open(&path);
    assert_eq!(all_entries(&s), want);
}

/// What a compaction copies undecoded must be whole records with matching CRCs.
#[test]
fn copied_records_are_checked_whole_and_by_crc() {
    use super::record::{check_frames, encode_entry, encode_hard_state};
    let mut bytes = Vec::new();
    encode_entry(&mut bytes, &entry(7, 1, b"seven")).unwrap();
    let second = bytes.len();
    encode_hard_state(&mut bytes, &hard_state(1, 1, 7)).unwrap();
    assert_eq!(check_frames(&bytes), Ok(()));
    assert_eq!(check_frames(&[]), Ok(()));
    let mut flipped = bytes.clone();
    *flipped.last_mut().unwrap() ^= 0xff;
    assert_eq!(check_frames(&flipped).map_err(|(at, _)| at), Err(second));
    assert_eq!(
        check_frames(&bytes[..bytes.len() - 1]).map_err(|(at, _)| at),
        Err(second)
    );
    assert_eq!(check_frames(&bytes[..3]).map_err(|(at, _)| at), Err(0));
    assert_eq!(check_frames(&[0; 16]).map_err(|(at, _)| at), Err(0));
}
