//! What the raft thread (or the main thread under the same lock: a leader's own proposals
//! and read rounds, `Node::submit`, and the peer messages it reads, main_read.rs) does with
//! raft-rs's `Ready`: write its records to the log, make them durable (at once on a
//! follower; through the syncer on a leader, node/syncer.rs), send its messages once they
//! may leave, and hand committed entries to the main thread (telling followers the new
//! commit index with the next append, or alone after `COMMIT_TELL_DELAY`).
//! Also the node whose log found the disk full: it holds what it could not persist and tries
//! again every `LOG_FULL_RETRY`, handing leadership to a voter that can write.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use raft::eraftpb::{ConfChange, Entry, EntryType, Message};
use raft::StateRole;
use tracing::{info, warn};

use super::lease::LEASE_ROUND;
use super::syncer::Synced;
use super::{parse_read_ctx, ApplyItem, NodeError, RaftThread};
use crate::storage::{LogStore, StorageError};

/// How long a leader waits for an append to carry a new commit index to followers before it
/// sends one for that alone (see `RaftThread::tell_commit`).
const COMMIT_TELL_DELAY: Duration = Duration::from_millis(2);

/// How often a node whose log found the disk full tries to write it again.
pub(super) const LOG_FULL_RETRY: Duration = Duration::from_millis(100);

/// Messages a node whose log is full holds back until it is written (votes, acks); past
/// this the oldest are dropped, as a network may drop them.
pub(super) const LOG_FULL_HELD_MAX: usize = 4096;

/// A Ready whose records are written but not yet fsynced (node/syncer.rs).
pub(super) struct Persisting {
    pub(super) number: u64,
    /// It holds records that must be durable (false: commit indexes only); one that need
    /// not be is done as soon as the Readies before it are.
    pub(super) owed: bool,
    /// Its last entry.
    pub(super) appended: Option<u64>,
    /// raft-rs's persisted messages of it, sent once it is durable.
    pub(super) held: Vec<Message>,
}

/// A node whose log cannot be written for lack of space. raft-rs was handed the Readies
/// since with `advance_append_async` (their records stay in the store's buffer), so it does
/// not count them as persisted: no vote is granted and no entry acknowledged from them, and
/// a leader does not count itself in their quorum. A successful `sync` reports them all
/// persisted (`on_persist_ready`) and sends what was held.
pub(super) struct LogFull {
    pub(super) since: Instant,
    /// The store's error, for the logs.
    pub(super) error: String,
    pub(super) next_try: Instant,
    /// The number of the last Ready handed over unpersisted.
    pub(super) ready: u64,
    /// The last entry among them.
    pub(super) appended: Option<u64>,
    /// raft-rs's persisted messages of those Readies (votes, append responses...), oldest
    /// first, at most `LOG_FULL_HELD_MAX`.
    pub(super) held: VecDeque<Message>,
    /// Held messages dropped for the bound.
    pub(super) dropped: u64,
}

/// What a read gets on a node whose log is full and whose data trails what the read needs.
pub(super) fn full_log_read_error(store: &LogStore) -> String {
    format!(
        "TIMEOUT the raft log {} of this node is full: it cannot catch up to serve this read; read from another node",
        store.path().display()
    )
}

impl RaftThread {
    pub(super) fn on_ready(&mut self) -> Result<(), NodeError> {
        if !self.node.has_ready() {
            return Ok(());
        }
        let mut rd = self.node.ready();
        if !rd.messages().is_empty() {
            let msgs = self.noting_commit(rd.take_messages());
            self.transport.send(msgs);
        }
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            self.install_snapshot(&snap)?;
        }
        let committed = self.note_committed(rd.take_committed_entries())?;
        for rs in rd.take_read_states() {
            if let Some((id, epoch, round)) = parse_read_ctx(&rs.request_ctx) {
                if round & LEASE_ROUND != 0 {
                    tracing::trace!("read lease: round {} confirmed", round & !LEASE_ROUND);
                    if id == self.shared.node_id && epoch == self.read_epoch {
                        let st = self.leader_state();
                        if let Some(lease) = self.lease.as_mut() {
                            lease.confirmed(round, &st, &self.shared.lease);
                        }
                    }
                    continue;
                }
                if id == self.shared.node_id
                    && epoch == self.read_epoch
                    && self.log_full.is_some()
                    && rs.index > self.node.raft.raft_log.persisted
                    && self.reads.remove(&round).is_some()
                {
                    // This node cannot apply that far until its log is written again.
                    self.shared.push(
                        ApplyItem::ReadFailed {
                            rounds: vec![round],
                            error: full_log_read_error(&self.store),
                        },
                        &self.waker,
                    );
                    continue;
                }
                if id == self.shared.node_id
                    && epoch == self.read_epoch
                    && self.reads.remove(&round).is_some()
                {
                    tracing::debug!(
                        "read round {round}: confirmed at index {} as {:?} at term {}",
                        rs.index,
                        self.node.raft.state,
                        self.node.raft.term
                    );
                    self.shared.push(
                        ApplyItem::ReadReady {
                            round,
                            index: rs.index,
                        },
                        &self.waker,
                    );
                }
            }
        }
        // The committed entries go to the main thread once this Ready's acknowledgements
        // have left: waking it costs this thread a few µs (more on a busy machine), which
        // the leader waits for if they come first.
        let mut committed = Some(committed);
        let persisted = self.persist_ready(rd, &mut committed);
        if let Some(entries) = committed {
            self.hand_to_main(entries);
        }
        persisted
    }

    /// The rest of `on_ready` from the Ready's own entries on: persist them, send what
    /// waited for that, and hand `committed` (the Ready's committed entries, taken when
    /// that is done) to the main thread before any that commit after.
    fn persist_ready(
        &mut self,
        mut rd: raft::Ready,
        committed: &mut Option<Vec<Entry>>,
    ) -> Result<(), NodeError> {
        let appended = rd.entries().last().map(|e| e.index);
        if !rd.entries().is_empty() {
            self.store.append(rd.entries())?;
            if let Some(cc) = rd
                .entries()
                .iter()
                .rev()
                .find(|e| e.get_entry_type() != EntryType::EntryNormal)
            {
                self.conf_in_log = self.conf_in_log.max(cc.index);
            }
        }
        if let Some(hs) = rd.hs() {
            self.store.set_hard_state(hs)?;
        }
        if self.log_full.is_some() {
            // Written by the next retry (retry_full_log), not now.
            self.defer_persist(rd, appended);
            return Ok(());
        }
        // A leader's Ready that only moved the commit index writes nothing: it goes out with
        // the next batch (a crash loses it; it is learned again). A follower writes its new
        // commit index at once, as a script's kill counts on (busy::before_shutdown).
        let written = if self.node.raft.state == StateRole::Leader {
            self.store.write_due()
        } else {
            self.store.write()
        };
        let owed = match written {
            Ok(owed) => owed,
            Err(e) if e.is_no_space() => {
                // Applied before the writes waiting for this log fail (ApplyItem::LogFull).
                if let Some(entries) = committed.take() {
                    self.hand_to_main(entries);
                }
                self.log_became_full(&e);
                self.defer_persist(rd, appended);
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let in_order = !self.persisting.is_empty();
        if (owed || in_order)
            && self.syncer.is_some()
            && self.node.raft.state == StateRole::Leader
            && rd.snapshot().is_empty()
        {
            self.persist_async(rd, appended, owed);
            return Ok(());
        }
        self.fsync_now(owed)?;
        if let Some(index) = appended {
            self.batches.persisted(index);
        }
        if !rd.persisted_messages().is_empty() {
            self.transport.send(rd.take_persisted_messages());
        }
        if let Some(entries) = committed.take() {
            self.hand_to_main(entries);
        }
        let mut light = self.node.advance(rd);
        if let Some(commit) = light.commit_index() {
            // Written with the next batch: a lower commit index after a crash is re-learned.
            self.store.set_commit(commit)?;
        }
        if !light.messages().is_empty() {
            let msgs = self.noting_commit(light.take_messages());
            self.transport.send(msgs);
        }
        let committed = light.take_committed_entries();
        self.deliver(committed)?;
        self.node.advance_apply();
        Ok(())
    }

    /// A leader's Ready whose records are written: raft-rs takes it unpersisted and the
    /// syncer fsyncs it, while this thread goes on (node/syncer.rs).
    pub(super) fn persist_async(&mut self, mut rd: raft::Ready, appended: Option<u64>, owed: bool) {
        let number = rd.number();
        let held = rd.take_persisted_messages();
        self.node.advance_append_async(rd);
        // Its committed entries were delivered (persisted ones only, as raft-rs hands out).
        self.node.advance_apply();
        self.persisting.push_back(Persisting {
            number,
            owed,
            appended,
            held,
        });
        if owed {
            if let Some(syncer) = &self.syncer {
                syncer.ask(number);
            }
        }
    }

    /// Fsyncs on this thread what `LogStore::write` left owed; that fsync also covers the
    /// Readies still with the syncer, released first (Readies are persisted in order).
    pub(super) fn fsync_now(&mut self, owed: bool) -> Result<(), StorageError> {
        if owed || !self.persisting.is_empty() {
            self.store.fdatasync()?;
            self.release_persisting(u64::MAX);
        }
        Ok(())
    }

    /// Learns what the syncer made durable since the last look. Looked at on every turn, also with nothing in `persisting` (the synchronous path may
    /// have released it all): a failed fsync stops the node at once.
    pub(super) fn take_synced(&mut self) -> Result<(), NodeError> {
        let Some(syncer) = &self.syncer else {
            return Ok(());
        };
        match syncer.take(self.synced) {
            None => Ok(()),
            Some(Synced::Upto(number)) => {
                self.synced = number;
                self.release_persisting(number);
                Ok(())
            }
            Some(Synced::Failed(e)) => Err(e.into()),
        }
    }

    /// Every Ready up to `number` is durable (and those after it that owed no fsync): raft-rs
    /// is told, and their held messages leave.
    pub(super) fn release_persisting(&mut self, number: u64) {
        let mut last = None;
        let mut appended = None;
        let mut msgs = Vec::new();
        while let Some(p) = self.persisting.front() {
            if p.number > number && p.owed {
                break;
            }
            let Some(p) = self.persisting.pop_front() else {
                break;
            };
            last = Some(p.number);
            appended = p.appended.or(appended);
            msgs.extend(p.held);
        }
        let Some(last) = last else {
            return;
        };
        self.node.on_persist_ready(last);
        if let Some(index) = appended {
            self.batches.persisted(index);
        }
        if !msgs.is_empty() {
            self.transport.send(msgs);
        }
    }

    /// Hands `rd` back to raft-rs without claiming it persisted (its records are in the
    /// store's buffer, where raft-rs reads them), and holds the messages that may only leave
    /// once it is.
    pub(super) fn defer_persist(&mut self, mut rd: raft::Ready, appended: Option<u64>) {
        let number = rd.number();
        let msgs = rd.take_persisted_messages();
        self.node.advance_append_async(rd);
        // The committed entries of `rd` were delivered (persisted ones only: raft-rs hands
        // out nothing past its persisted index).
        self.node.advance_apply();
        let Some(full) = self.log_full.as_mut() else {
            return;
        };
        full.ready = number;
        full.appended = appended.or(full.appended);
        for m in msgs {
            // A forwarded read asks and claims nothing: it need not wait (follower reads
            // are refused anyway while full; a round already asked may still complete).
            if m.get_msg_type() == raft::eraftpb::MessageType::MsgHeartbeatResponse
                || m.get_msg_type() == raft::eraftpb::MessageType::MsgReadIndex
            {
                self.transport.send(vec![m]);
                continue;
            }
            full.held.push_back(m);
        }
        while full.held.len() > LOG_FULL_HELD_MAX {
            full.held.pop_front();
            full.dropped += 1;
        }
    }

    /// The log's write found no space: this node stops taking new writes, and its vote and
    /// acknowledgements wait until the log is written again (see `LogFull`). A leader hands
    /// leadership over: it cannot count itself in a quorum nor apply what it could not write.
    pub(super) fn log_became_full(&mut self, e: &StorageError) {
        let error = e.short();
        let leading = self.node.raft.state == StateRole::Leader;
        warn!(
            "{error}: this node takes no new writes, grants no vote and acknowledges no entry until its raft log can be written again (tried every {} ms){}; it still serves local reads. Free space on that file system: the node resumes by itself",
            LOG_FULL_RETRY.as_millis(),
            if leading {
                "; as leader it hands leadership to another node"
            } else {
                ""
            }
        );
        self.shared.set_log_full(Some(format!("ERR {e}")));
        self.log_full = Some(LogFull {
            since: Instant::now(),
            error: error.clone(),
            next_try: Instant::now() + LOG_FULL_RETRY,
            ready: 0,
            appended: None,
            held: VecDeque::new(),
            dropped: 0,
        });
        self.shared.push(
            ApplyItem::LogFull {
                writes: format!(
                    "TIMEOUT {error}: this node could not persist the write, its outcome is unknown; writes resume when space is freed"
                ),
                reads: full_log_read_error(&self.store),
                taken: self.shared.taken(),
            },
            &self.waker,
        );
        self.hand_over_for_full_log();
    }

    /// A leader whose log is full gives leadership to the most up-to-date voter, so the
    /// other nodes keep the cluster writable. Asked again at each retry while it leads.
    pub(super) fn hand_over_for_full_log(&mut self) {
        let r = &self.node.raft;
        if r.state != StateRole::Leader || r.lead_transferee.is_some() || self.leaving.is_some() {
            return;
        }
        let me = self.shared.node_id;
        let best = r
            .prs()
            .iter()
            .filter(|(id, _)| **id != me && r.prs().conf().voters().contains(**id))
            .max_by_key(|(_, p)| p.matched)
            .map(|(id, _)| *id);
        let Some(id) = best else { return };
        info!("raft log full: transferring leadership to node {id}");
        self.give_up_lease();
        self.node.transfer_leader(id);
    }

    /// While the log is full: tries to write it again; once that works, raft-rs learns that
    /// everything handed over since is persisted, and the held messages leave.
    pub(super) fn retry_full_log(&mut self, now: Instant) -> Result<(), NodeError> {
        let Some(full) = self.log_full.as_mut() else {
            return Ok(());
        };
        if now < full.next_try {
            return Ok(());
        }
        full.next_try = now + LOG_FULL_RETRY;
        let synced = self.store.write().and_then(|owed| self.fsync_now(owed));
        match synced {
            Ok(()) => {}
            Err(e) if e.is_no_space() => {
                self.hand_over_for_full_log();
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        let Some(full) = self.log_full.take() else {
            return Ok(());
        };
        self.shared.set_log_full(None);
        if full.ready > 0 {
            self.node.on_persist_ready(full.ready);
        }
        if let Some(index) = full.appended {
            self.batches.persisted(index);
        }
        self.transport.send(full.held.into());
        info!(
            "raft log {} written again after {:.1} s without space ({}); this node takes part in the cluster again{}",
            self.store.path().display(),
            full.since.elapsed().as_secs_f64(),
            full.error,
            if full.dropped > 0 {
                format!(" ({} held messages were dropped)", full.dropped)
            } else {
                String::new()
            }
        );
        Ok(())
    }

    pub(super) fn deliver(&mut self, entries: Vec<Entry>) -> Result<(), NodeError> {
        let entries = self.note_committed(entries)?;
        self.hand_to_main(entries);
        Ok(())
    }

    /// What the raft thread does itself with committed entries: applies configuration
    /// changes and notes the commit for the latency stages.
    fn note_committed(&mut self, entries: Vec<Entry>) -> Result<Vec<Entry>, NodeError> {
        for e in &entries {
            if self.on_main && e.get_entry_type() != EntryType::EntryNormal {
                self.conf_on_main += 1;
                warn!(
                    "membership change at index {} applied off the raft thread ({} so far): main_read.rs's guards let it through",
                    e.index, self.conf_on_main
                );
            }
            match e.get_entry_type() {
                EntryType::EntryConfChange => {
                    // Never written by redis-raft; applied as raft-rs defines it.
                    let cc: ConfChange = prost::Message::decode(e.data.as_ref())
                        .map_err(|err| raft::Error::ConfChangeError(err.to_string()))?;
                    let cs = self.node.apply_conf_change(&cc)?;
                    self.store.set_conf_state(&cs)?;
                }
                EntryType::EntryConfChangeV2 => self.apply_membership(e)?,
                EntryType::EntryNormal => {}
            }
        }
        if let Some(last) = entries.last() {
            self.batches.committed(last.index);
        }
        Ok(entries)
    }

    /// Queues committed entries for the main thread to apply, and wakes it.
    fn hand_to_main(&mut self, entries: Vec<Entry>) {
        if !entries.is_empty() {
            self.shared
                .push(ApplyItem::Entries(entries, Instant::now()), &self.waker);
        }
    }

    /// Notes the commit index `msgs` carry to followers.
    pub(super) fn noting_commit(&mut self, msgs: Vec<Message>) -> Vec<Message> {
        for m in &msgs {
            if matches!(
                m.get_msg_type(),
                raft::eraftpb::MessageType::MsgAppend | raft::eraftpb::MessageType::MsgHeartbeat
            ) {
                self.commit_sent = self.commit_sent.max(m.commit);
            }
        }
        msgs
    }

    /// Followers learn a new commit index from the next append (raft-rs's skip_bcast_commit:
    /// no message round per commit while writes keep coming); when none went out within
    /// `COMMIT_TELL_DELAY`, an append with no entries tells them, so an idle follower's data
    /// trails the leader's by about that much, not by a heartbeat interval.
    pub(super) fn tell_commit(&mut self, now: Instant) {
        let r = &self.node.raft;
        let me = self.shared.node_id;
        if r.prs().iter().all(|(id, _)| *id == me) {
            // Nobody to tell (a one-node cluster).
            self.commit_sent = r.raft_log.committed;
        }
        if r.state != StateRole::Leader || r.raft_log.committed <= self.commit_sent {
            self.commit_due = None;
            return;
        }
        match self.commit_due {
            None => self.commit_due = Some(now + COMMIT_TELL_DELAY),
            Some(due) if now >= due => {
                self.commit_due = None;
                self.node.raft.bcast_append();
            }
            Some(_) => {}
        }
    }
}
