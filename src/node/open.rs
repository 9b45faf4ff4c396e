//! Opening a node at start, before its raft thread runs: the snapshot files left by a crash
//! put right (`reconcile_snapshot`), the membership read from the log or bootstrapped from
//! the configuration, and the transport pointed at the members.

use raft::eraftpb::{ConfChangeType, Entry, EntryType};
use raft::prelude::ConfState;
use tracing::{error, info, warn};

use super::membership::conf_change;
use super::{recv_path, Member, NodeError, NodeSpec, PANIC_AT};
use crate::codec::{
    decode, encode, MemberBook, MemberChange, SnapshotMembership, StoredMembership,
};
use crate::storage::LogStore;
use crate::transport::Transport;

/// Points the transport at `members` (but this node) and refuses the ids `book` says were
/// removed.
pub(super) fn connect_members<'a>(
    transport: &Transport,
    me: u64,
    members: impl Iterator<Item = &'a Member>,
    book: &MemberBook,
) {
    for m in members {
        if m.id != me && !book.was_removed(m.id) {
            transport.set_peer(m.id, &m.bus_addr);
        }
    }
    for id in &book.used_ids {
        if *id != me && book.was_removed(*id) {
            transport.refuse_removed(*id);
        }
    }
}

/// Removes what a save or a receive cut short by a crash left: `<snapshot>.tmp` (a save's
/// child still writing; it dies with its server) and `<snapshot>.recv.tmp` (a snapshot
/// still arriving from the leader, which sends it again if needed). Neither is ever read.
pub(super) fn remove_unfinished_snapshots(store: &LogStore, path: &std::path::Path) {
    let index = store.snapshot_meta().index;
    let kept = if index == 0 {
        "the log holds every entry".to_string()
    } else {
        format!(
            "the snapshot {} (index {index}) and the log are what this node starts from",
            path.display()
        )
    };
    let leftovers = [
        (crate::snapshot::format::tmp_path(path), "a snapshot save"),
        (
            crate::transport::snapshot_recv_tmp(&recv_path(path)),
            "a snapshot being received",
        ),
    ];
    for (tmp, what) in leftovers {
        match std::fs::remove_file(&tmp) {
            Ok(()) => warn!(
                "removed {} left by {what} that did not finish before a restart; {kept}",
                tmp.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(
                "cannot remove {} left by {what} that did not finish: {e}; {kept}",
                tmp.display()
            ),
        }
    }
}

/// Tests only: `REDIS_RAFT_TEST_FAULT=<point>` in redis-server's environment kills the
/// process (SIGKILL, as a crash) when it reaches `point`, to test the restart that follows.
pub(super) fn test_fault(point: &str) {
    if std::env::var("REDIS_RAFT_TEST_FAULT").is_ok_and(|v| v == point) {
        error!("REDIS_RAFT_TEST_FAULT: killing this process at {point}");
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// Makes the log and the snapshot file agree after a crash between writing one and the
/// other: a snapshot that was written but whose compaction never reached the log is
/// compacted now; one that was received but not yet moved into place is moved. Anything else
/// that disagrees is refused: loading the wrong snapshot would apply entries twice.
pub(super) fn reconcile_snapshot(
    store: &LogStore,
    path: &std::path::Path,
) -> Result<(), NodeError> {
    use crate::snapshot::format::inspect;
    let meta = store.snapshot_meta();
    if meta.index == 0 {
        // The log holds every entry; a snapshot file (if any) is not needed at start.
        return Ok(());
    }
    let file = inspect(path).ok().map(|s| s.header);
    if file
        .as_ref()
        .is_some_and(|h| h.index == meta.index && h.term == meta.term)
    {
        return Ok(());
    }
    let recv = recv_path(path);
    if inspect(&recv)
        .ok()
        .is_some_and(|s| s.header.index == meta.index && s.header.term == meta.term)
    {
        warn!(
            "moving the snapshot received before a restart into place ({} -> {})",
            recv.display(),
            path.display()
        );
        return std::fs::rename(&recv, path)
            .map_err(|e| NodeError::Snapshot(format!("cannot move {}: {e}", recv.display())));
    }
    if let Some(h) = file {
        let term_ok = raft::Storage::term(store, h.index).ok() == Some(h.term);
        if h.index > meta.index && term_ok {
            // Only committed entries are applied, so the snapshot's index was committed even
            // if the commit record did not reach the disk before the crash.
            let commit = raft::Storage::initial_state(store)?.hard_state.commit;
            if h.index > commit {
                store.set_commit(h.index)?;
                store.sync()?;
            }
            let m: SnapshotMembership = decode(&h.meta).map_err(|e| {
                NodeError::Snapshot(format!("{}: unreadable membership: {e}", path.display()))
            })?;
            warn!(
                "the snapshot {} (index {}) was written but the log was not compacted before a restart; compacting it now",
                path.display(),
                h.index
            );
            let cs = ConfState {
                voters: m.voters,
                learners: m.learners,
                ..Default::default()
            };
            store.compact(h.index, &cs)?;
            return Ok(());
        }
    }
    Err(NodeError::Snapshot(format!(
        "the raft log starts after a snapshot at index {} (term {}), but {} does not hold it; move the log and the snapshot aside to rebuild this node from its peers",
        meta.index,
        meta.term,
        path.display()
    )))
}

/// What a log says about membership, if it says anything (a log from before membership
/// records, or a brand-new one, does not).
pub fn stored_membership(store: &LogStore) -> Result<Option<StoredMembership>, NodeError> {
    match store.membership() {
        None => Ok(None),
        Some((_, blob)) => decode(&blob).map(Some).map_err(|e| {
            NodeError::Membership(format!(
                "the membership record in {} cannot be decoded: {e}",
                store.path().display()
            ))
        }),
    }
}

/// Reads (or, for a brand-new bootstrapped log, writes) the membership a node starts with.
pub(super) fn open_membership(
    spec: &NodeSpec,
    store: &LogStore,
) -> Result<(MemberBook, u64), NodeError> {
    let configured: Vec<u64> = {
        let mut v: Vec<u64> = spec.members.iter().map(|m| m.id).collect();
        v.sort_unstable();
        v
    };
    if store.is_empty() {
        if !spec.bootstrap {
            info!("new raft log: waiting to be added to the cluster by its leader");
            let stored = StoredMembership {
                me: spec.id,
                book: MemberBook {
                    cluster_id: spec.cluster_id.clone(),
                    ..Default::default()
                },
                hints: spec.members.clone(),
            };
            store.set_membership(0, &ConfState::default(), &encode(&stored))?;
            store.sync()?;
            return Ok((stored.book, 0));
        }
        let (entries, cs, book) = bootstrap_entries(&spec.cluster_id, &spec.members)?;
        let n = entries.len() as u64;
        let hs = raft::eraftpb::HardState {
            term: 1,
            vote: 0,
            commit: n,
        };
        let stored = StoredMembership {
            me: spec.id,
            book,
            hints: Vec::new(),
        };
        store.bootstrap(&entries, &hs, &cs, (n, &encode(&stored)))?;
        store.sync()?;
        info!(
            "new raft log: bootstrapping cluster {:?} with {} voter(s)",
            spec.cluster_id, n
        );
        return Ok((stored.book, n));
    }
    match store.membership() {
        Some((index, blob)) => {
            let stored: StoredMembership = decode(&blob).map_err(|e| {
                NodeError::Membership(format!(
                    "the membership record in {} cannot be decoded: {e}",
                    store.path().display()
                ))
            })?;
            let mut book = stored.book;
            if book.cluster_id.is_empty() {
                book.cluster_id = spec.cluster_id.clone();
            }
            Ok((book, index))
        }
        None => {
            // A log from before membership records: its members are the configured ones.
            let cs = raft::Storage::initial_state(store)?.conf_state;
            let mut logged = cs.voters.clone();
            logged.sort_unstable();
            if logged != configured {
                warn!(
                    "raft.cluster-nodes lists voters {:?} but the log's committed membership is {:?}; following the log",
                    configured, logged
                );
            }
            let mut book = MemberBook {
                cluster_id: spec.cluster_id.clone(),
                ..Default::default()
            };
            for m in &spec.members {
                book.apply(&MemberChange::Bootstrap {
                    cluster_id: spec.cluster_id.clone(),
                    member: m.clone(),
                });
            }
            Ok((book, 0))
        }
    }
}

/// The first entries of a new cluster: one committed configuration change per voter, in id
/// order, identical on every node that bootstraps from the same member list. A node that
/// joins later learns the founding members by applying them like any other entry.
pub(super) fn bootstrap_entries(
    cluster_id: &str,
    members: &[Member],
) -> Result<(Vec<Entry>, ConfState, MemberBook), NodeError> {
    let mut sorted = members.to_vec();
    sorted.sort_by_key(|m| m.id);
    let mut book = MemberBook::default();
    let mut entries = Vec::with_capacity(sorted.len());
    for (i, m) in sorted.iter().enumerate() {
        let change = MemberChange::Bootstrap {
            cluster_id: cluster_id.to_string(),
            member: m.clone(),
        };
        book.apply(&change);
        let cc = conf_change(ConfChangeType::AddNode, m.id, &change);
        let mut e = Entry::default();
        e.set_entry_type(EntryType::EntryConfChangeV2);
        e.term = 1;
        e.index = i as u64 + 1;
        e.data = prost::Message::encode_to_vec(&cc);
        entries.push(e);
    }
    let cs = ConfState {
        voters: sorted.iter().map(|m| m.id).collect(),
        ..Default::default()
    };
    Ok((entries, cs, book))
}

/// Chains a panic hook (once per process) that records each panic's location for the
/// thread it happened on, then runs the previous hook.
pub(super) fn record_panic_locations() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(l) = info.location() {
                let at = format!("{}:{}", l.file(), l.line());
                PANIC_AT.with(|a| *a.borrow_mut() = Some(at));
            }
            prev(info);
        }));
    });
}
