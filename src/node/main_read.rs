//! The main thread reads peer connections itself: a leader's followers' answers, and,
//! without fsync, a follower's leader's appends.
//!
//! On a leader, what a follower sends back (append and heartbeat responses) decides when a
//! write commits and a read round is confirmed, and then the main thread applies and
//! answers. Read by the raft thread, each answer costs two wake-ups on the way: the raft
//! thread's, then the main thread's. On a follower, each of the leader's appends woke its
//! raft thread (read, step, write the log, answer), which then woke the main thread to apply
//! what the append committed. So the main thread watches the peer connections in Redis's own
//! event loop (redis/bus.rs registers them), and when one is readable it takes the raft
//! thread's lock (if free, as `Node::submit` does), reads every connection, steps what it may
//! without an fsync (`steps_on_main`), and runs the Ready: committed entries are queued and
//! applied at once, on the same thread. A follower does so only with `raft.log-fsync no`:
//! its Ready is written and answered at once (no fsync before its answer), and not while a
//! compaction switches log files (which holds the log's locks through an fsync).
//!
//! The raft thread stays in charge of everything else: anything another message could need
//! (a vote, a new term, a refused append, a snapshot, a membership change in flight or in a
//! follower's log not yet applied, a transfer) is left for it (`deferred`, stepped first on
//! its next turn, so the order a connection delivered is kept), and it reads the connections
//! itself once per tick, and at once whenever the main thread found the lock taken
//! (`Shared::main_missed`), so a main thread busy in a long script holds up nothing but its
//! own applies. It does not watch the connections the main thread watches (one wake-up per
//! message, not two), and it decides, at the end of each turn, whether the main thread reads
//! at all (`choose_reader`): on a leader with its syncer, or on a follower without fsync,
//! running.
//!
//! Invariants: every read, step and Ready runs under the lock on `RaftThread`; messages of
//! one connection are stepped in the order they arrived; the main thread never fsyncs here
//! (a leader's Ready goes to the syncer; a follower reads here only while its log is not
//! fsynced, which changes only under the same lock); no hard state but the commit index
//! changes (messages of the current term only, no votes); no membership change is applied
//! (a leader has none in flight; a follower has none in its log past what it applied, and
//! leaves appends that carry one to the raft thread).

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::time::Instant;

use raft::eraftpb::{EntryType, Message, MessageType};
use raft::StateRole;

use super::{Node, NodeError, RaftThread};
use crate::transport::{PolledConn, Report};

/// What `Node::read_on_main` did.
#[derive(Debug, PartialEq, Eq)]
pub enum MainRead {
    /// Read and handled (or left in order for the raft thread).
    Done,
    /// The raft thread holds the lock: pause (`Node::pause_main_reads`).
    Busy,
    /// The main thread does not read the peer connections now: stop watching them.
    NotMine,
}

impl Node {
    /// Changes whenever the connections the main thread should watch change.
    pub fn peers_generation(&self) -> u64 {
        self.shared.peers_generation.load(Ordering::Acquire)
    }

    /// The connections the main thread should watch now (none unless this node leads, or
    /// follows without fsync), for `watch` to say which it watches from now on (true) or
    /// stopped watching (false); the generation they are of. None if the raft thread holds
    /// the lock: ask again later.
    pub fn watch_peers(
        &self,
        watch: impl FnOnce(&[PolledConn]) -> Vec<(u64, bool)>,
    ) -> Option<u64> {
        let mut core = self.try_core()?;
        let generation = self.peers_generation();
        let Some(t) = core.as_mut() else {
            watch(&[]);
            return Some(generation);
        };
        let conns: Vec<PolledConn> = if t.main_reads {
            t.peers_in.conns().collect()
        } else {
            Vec::new()
        };
        for (id, watched) in watch(&conns) {
            t.peers_in.set_main_watched(id, watched);
        }
        // Connections it stopped watching are the raft thread's again: it polls them from
        // its next sleep on.
        self.input.kick();
        Some(generation)
    }

    /// A peer connection the main thread watches (`conn`; None: all of them, before Redis
    /// sleeps) is readable: read them all and handle what arrived (module doc). Committed
    /// entries are queued for the caller to apply.
    pub fn read_on_main(&self, conn: Option<u64>) -> MainRead {
        let Some(mut core) = self.try_core() else {
            return MainRead::Busy;
        };
        let Some(t) = core.as_mut() else {
            return MainRead::NotMine;
        };
        if !t.main_reads || t.halted || t.inline_failed.is_some() {
            return MainRead::NotMine;
        }
        if conn.is_some_and(|id| !t.peers_in.conns().any(|c| c.id == id)) {
            // Closed or handed back since: its socket stays readable for us until we stop
            // watching it.
            return MainRead::NotMine;
        }
        if t.read_on_main() {
            self.input.kick();
        }
        MainRead::Done
    }

    /// The main thread found the lock taken (`MainRead::Busy`) and stops watching the
    /// connections for now (a readable socket it cannot read would wake it again at once):
    /// the raft thread watches them all and reads them on a turn it takes at once (kicked:
    /// its turn is under way, and it looks at the kick before it sleeps).
    pub fn pause_main_reads(&self) {
        self.shared.main_paused.store(true, Ordering::Release);
        self.shared.main_missed.store(true, Ordering::Release);
        self.input.kick();
    }

    /// The main thread may watch the connections again once the raft thread has read what
    /// made it stop (true: it does from now on).
    pub fn resume_main_reads(&self) -> bool {
        if self.shared.main_missed.load(Ordering::Acquire) {
            // Unless the raft thread is gone: then nothing will read them (or clear this).
            let ended = self.try_core().is_some_and(|core| core.is_none());
            if !ended {
                return false;
            }
        }
        self.shared.main_paused.store(false, Ordering::Release);
        true
    }
}

impl RaftThread {
    /// At the end of each turn: whether the main thread reads the peer connections from now
    /// on (module doc), published to it when that or the connections changed.
    pub(super) fn choose_reader(&mut self) {
        let r = &self.node.raft;
        self.main_reads = !self.halted
            && self.inline_failed.is_none()
            && self.leaving.is_none()
            && match r.state {
                StateRole::Leader => self.syncer.is_some(),
                // A follower's Ready would fsync before it answers: only without fsync.
                StateRole::Follower => !self.fsync,
                _ => false,
            };
        let now = (self.peers_in.generation(), self.main_reads);
        if now != self.peers_published {
            self.peers_published = now;
            self.shared.peers_generation.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The connections this thread's sleep watches: all of them, but those the main thread
    /// watches while it reads them (and has not paused).
    pub(super) fn fill_watch(&self, watch: &mut Vec<RawFd>) {
        let main = self.main_reads && !self.shared.main_paused.load(Ordering::Acquire);
        watch.clear();
        watch.extend(
            self.peers_in
                .conns()
                .filter(|c| !(main && c.main_watched))
                .map(|c| c.fd),
        );
    }

    /// Whether the main thread may step messages now: nothing it could need is an fsync or
    /// a membership change (module doc).
    fn steps_on_main_now(&self) -> bool {
        let r = &self.node.raft;
        let role = match r.state {
            StateRole::Leader => {
                r.lead_transferee.is_none() && r.pending_conf_index <= r.raft_log.applied
            }
            StateRole::Follower => {
                r.leader_id != raft::INVALID_ID
                    && !self.fsync
                    && self.persisting.is_empty()
                    // A compaction switching files holds the log's locks through an fsync.
                    && self.compaction.is_none()
                    && self.conf_in_log <= r.raft_log.applied
            }
            _ => false,
        };
        role && self.log_full.is_none() && self.leaving.is_none() && self.deferred.is_empty()
    }

    /// The messages the main thread steps: a leader's followers' answers in its term; a
    /// follower's leader's appends (with no membership change) and heartbeats in its term.
    fn steps_on_main(&self, m: &Message) -> bool {
        let r = &self.node.raft;
        let kind = m.get_msg_type();
        let mine = match r.state {
            StateRole::Leader => {
                kind == MessageType::MsgHeartbeatResponse
                    || (kind == MessageType::MsgAppendResponse && !m.reject)
            }
            StateRole::Follower => {
                m.from == r.leader_id
                    && (kind == MessageType::MsgHeartbeat
                        || (kind == MessageType::MsgAppend
                            && m.entries
                                .iter()
                                .all(|e| e.get_entry_type() == EntryType::EntryNormal)))
            }
            _ => false,
        };
        mine && m.term == r.term && Report::of(m).is_none()
    }

    /// On the main thread, under the lock: reads the peer connections, steps what it may,
    /// leaves the rest (and all after it) to the raft thread, runs the Ready. Returns
    /// whether the raft thread should take a turn now. A failure is left to the raft thread
    /// (`inline_failed`), as for the main thread's proposals.
    fn read_on_main(&mut self) -> bool {
        self.on_main_thread(|t| {
            let mut msgs = std::mem::take(&mut t.polled);
            t.peers_in.read_all(&mut msgs);
            let mut may_step = t.steps_on_main_now();
            let committed = t.node.raft.raft_log.committed;
            for m in msgs.drain(..) {
                may_step = may_step && t.steps_on_main(&m);
                if may_step {
                    t.on_message(m);
                } else {
                    t.deferred.push(m);
                }
            }
            t.polled = msgs;
            // A connection that closed here is no longer watched: say so now, not after the
            // raft thread's next turn (its socket would wake the main thread until then).
            t.choose_reader();
            t.finish_off_thread(committed)
        })
    }

    /// The end of a turn taken off the raft thread (the main thread's reads, the syncer's
    /// news): the Ready run, the commit told and published (`committed`: as the turn began).
    /// Returns whether the raft thread should take a turn soon.
    pub(super) fn finish_off_thread(&mut self, committed: u64) -> Result<bool, NodeError> {
        self.on_ready()?;
        let now = Instant::now();
        self.tell_commit(now);
        if self.node.raft.raft_log.committed != committed {
            self.publish_status();
        }
        // The raft thread's timers: a commit to tell followers before it would wake.
        let told_late = self.commit_due.is_some_and(|due| due < self.sleep_until);
        Ok(!self.deferred.is_empty() || self.node.has_ready() || told_late)
    }

    /// After an fsync, on the syncer's thread under the lock (node/syncer.rs): a leader
    /// that nothing else needs the raft thread for (as when the main thread steps its
    /// followers' answers: no membership change or transfer in flight, the log not full)
    /// learns what is durable and runs the Ready here. True if the raft thread need not be
    /// woken for it.
    pub(super) fn synced_here(&mut self) -> bool {
        let mine = self.leads_off_thread()
            // A compaction switching files holds the log's locks through an fsync.
            && self.compaction.is_none()
            && self.steps_on_main_now();
        if !mine {
            return false;
        }
        let kick = self.on_main_thread(|t| {
            let committed = t.node.raft.raft_log.committed;
            t.take_synced()?;
            t.finish_off_thread(committed)
        });
        !kick
    }
}
