//! Membership on the raft thread: RAFT.NODE ADD/REMOVE and RAFT.CLUSTER JOIN as raft-rs
//! configuration changes (a new node joins as a learner and is promoted once it has caught
//! up), their application in log order (the member book, the transport's peers, leaving the
//! cluster when removed), and leadership transfer (RAFT.DEBUG TRANSFER, a node leaving).

use std::sync::atomic::Ordering;
use std::time::Instant;

use raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry};
use raft::StateRole;
use tracing::{error, info, warn};

use super::{lock, ApplyItem, ChangeRequest, NodeError, RaftThread};
use crate::codec::{
    decode, encode, MemberChange, ProposalTag, SnapshotMembership, StoredMembership,
};

/// How far (in entries) a learner may trail the commit index and still count as caught up,
/// so that it is promoted to voter even while clients keep writing.
const PROMOTE_SLACK_ENTRIES: u64 = 256;

pub(super) fn conf_change(ty: ConfChangeType, id: u64, change: &MemberChange) -> ConfChangeV2 {
    let mut single = ConfChangeSingle::default();
    single.set_change_type(ty);
    single.node_id = id;
    ConfChangeV2 {
        changes: vec![single],
        context: encode(change),
        ..Default::default()
    }
}

impl RaftThread {
    /// Proposes an operator's membership change, or says why not (RedisRaft's errors).
    pub(super) fn change_membership(
        &mut self,
        tag: ProposalTag,
        req: ChangeRequest,
    ) -> Result<(), String> {
        if self.leaving.is_some() {
            return Err("ERR this node was removed from the cluster".into());
        }
        if let Some(error) = self.shared.log_full() {
            return Err(error);
        }
        if self.node.raft.state != StateRole::Leader {
            return Err(match self.shared.member(self.node.raft.leader_id) {
                Some(l) if self.node.raft.leader_id != self.shared.node_id => {
                    format!("MOVED 0 {}", l.redis_addr)
                }
                _ => "CLUSTERDOWN No raft leader".into(),
            });
        }
        if self.node.raft.has_pending_conf() {
            return Err(
                "ERR one voting change only: a membership change is in progress; retry once it is committed"
                    .into(),
            );
        }
        let (ty, id, change) = match req {
            ChangeRequest::Add { mut member } => {
                if member.id == 0 {
                    member.id = self.unused_id();
                }
                if self.book.used_ids.contains(&member.id) {
                    return Err("ERR node id has already been used in this cluster".into());
                }
                if member.name.is_empty() {
                    member.name = member.id.to_string();
                }
                if let Some(m) = self.book.members.values().find(|m| m.name == member.name) {
                    return Err(format!(
                        "ERR node name '{}' is already taken by node {}",
                        member.name, m.id
                    ));
                }
                (
                    ConfChangeType::AddLearnerNode,
                    member.id,
                    MemberChange::Add { member },
                )
            }
            ChangeRequest::Remove { id } => {
                if !self.book.members.contains_key(&id) {
                    return Err("ERR node id does not exist".into());
                }
                let voters = self.node.raft.prs().conf().voters().ids();
                if voters.contains(id) && voters.len() == 1 {
                    return Err("ERR cannot remove the last voting node".into());
                }
                (ConfChangeType::RemoveNode, id, MemberChange::Remove { id })
            }
        };
        info!("proposing membership change: {change:?}");
        self.node
            .propose_conf_change(tag.encode(), conf_change(ty, id, &change))
            .map_err(|e| format!("ERR {e}"))
    }

    /// A random 31-bit id no member ever had (RedisRaft's id 0: "pick one for me").
    pub(super) fn unused_id(&self) -> u64 {
        let mut x = self.incarnation ^ self.node.raft.raft_log.last_index().rotate_left(17);
        loop {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let id = x & 0x7fff_ffff;
            if id != 0 && !self.book.used_ids.contains(&id) {
                return id;
            }
        }
    }

    /// The leader promotes one caught-up learner at a time to voter.
    pub(super) fn promote_learners(&mut self) {
        let r = &self.node.raft;
        if r.state != StateRole::Leader
            || r.has_pending_conf()
            || self.leaving.is_some()
            || self.log_full.is_some()
        {
            return;
        }
        let committed = r.raft_log.committed;
        let ready = r.prs().conf().learners().iter().copied().find(|id| {
            r.prs()
                .get(*id)
                .is_some_and(|p| p.matched + PROMOTE_SLACK_ENTRIES >= committed && p.matched > 0)
        });
        let Some(id) = ready else { return };
        let change = MemberChange::Promote { id };
        info!("node {id} caught up (learner); proposing it as a voter");
        let tag = ProposalTag {
            node_id: self.shared.node_id,
            incarnation: 0,
            request: 0,
        };
        if let Err(e) = self.node.propose_conf_change(
            tag.encode(),
            conf_change(ConfChangeType::AddNode, id, &change),
        ) {
            warn!("could not propose node {id} as a voter: {e}");
        }
    }

    /// Applies a committed membership change: raft-rs's configuration, the member book, the
    /// transport's peers. Entries up to `book_index` are already in both (a restart).
    pub(super) fn apply_membership(&mut self, e: &Entry) -> Result<(), NodeError> {
        if e.index <= self.book_index {
            return Ok(());
        }
        let cc: ConfChangeV2 = prost::Message::decode(e.data.as_ref())
            .map_err(|err| raft::Error::ConfChangeError(err.to_string()))?;
        let cs = match self.node.apply_conf_change(&cc) {
            Ok(cs) => cs,
            Err(err) => {
                // Every node holds the same entry and refuses it the same way.
                error!(
                    "membership change at index {} refused by raft, skipped: {err}",
                    e.index
                );
                return Ok(());
            }
        };
        let change: Option<MemberChange> = match decode(&cc.context) {
            Ok(c) => Some(c),
            Err(err) => {
                error!(
                    "membership change at index {} has no readable member data: {err}",
                    e.index
                );
                None
            }
        };
        if let Some(change) = &change {
            if self.book.members.is_empty() {
                // The first change a joining node applies: its hints were only hints.
                self.book.cluster_id.clear();
            }
            self.book.apply(change);
            info!("membership change applied at index {}: {change:?}", e.index);
        }
        self.book_index = e.index;
        self.publish_membership(e.index);
        let stored = StoredMembership {
            me: self.shared.node_id,
            book: self.book.clone(),
            hints: Vec::new(),
        };
        self.store.set_membership(e.index, &cs, &encode(&stored))?;
        match change {
            Some(MemberChange::Bootstrap { member, .. }) | Some(MemberChange::Add { member }) => {
                if member.id != self.shared.node_id {
                    self.transport.set_peer(member.id, &member.bus_addr);
                }
                lock(&self.shared.members).insert(member.id, member);
            }
            Some(MemberChange::Remove { id }) => {
                lock(&self.shared.members).remove(&id);
                if id == self.shared.node_id {
                    self.leave();
                } else {
                    self.transport.refuse_removed(id);
                }
            }
            Some(MemberChange::Promote { .. }) | None => {}
        }
        Ok(())
    }

    /// Publishes the membership as of `index` for snapshots taken on the main thread.
    pub(super) fn publish_membership(&self, index: u64) {
        let conf = self.node.raft.prs().conf();
        let view = SnapshotMembership {
            voters: conf.voters().ids().iter().collect(),
            learners: conf.learners().iter().copied().collect(),
            book: self.book.clone(),
        };
        *lock(&self.shared.membership) = (index, view);
    }

    /// This node was removed: hand leadership to the most up-to-date voter, let the commit
    /// reach the others for a moment, then stop.
    pub(super) fn leave(&mut self) {
        warn!("this node was removed from the cluster; it stops taking part in it");
        // Before the hand-over below, whose message may leave in this very turn.
        self.give_up_lease();
        if self.node.raft.state == StateRole::Leader {
            let best = self
                .node
                .raft
                .prs()
                .iter()
                .filter(|(id, _)| **id != self.shared.node_id)
                .filter(|(id, _)| self.node.raft.prs().conf().voters().contains(**id))
                .max_by_key(|(_, p)| p.matched)
                .map(|(id, _)| *id);
            if let Some(id) = best {
                self.node.transfer_leader(id);
            }
        }
        self.leaving = Some(Instant::now() + self.read_timeout);
        self.shared.leaving.store(true, Ordering::Release);
    }

    pub(super) fn start_transfer(&mut self, target: u64) {
        let done =
            |s: &Self, r: Result<(), String>| s.shared.push(ApplyItem::TransferDone(r), &s.waker);
        if self.node.raft.state != StateRole::Leader {
            return done(self, Err("ERR not leader".into()));
        }
        if self.transfer.is_some() {
            return done(self, Err("ERR leader transfer is in progress".into()));
        }
        let me = self.shared.node_id;
        let voters: Vec<u64> = self.node.raft.prs().conf().voters().ids().iter().collect();
        let target = if target == 0 {
            // The most up-to-date follower.
            let best = self
                .node
                .raft
                .prs()
                .iter()
                .filter(|(id, _)| **id != me && voters.contains(id))
                .max_by_key(|(_, p)| p.matched)
                .map(|(id, _)| *id);
            match best {
                Some(id) => id,
                None => return done(self, Err("ERR no other voting node to transfer to".into())),
            }
        } else {
            target
        };
        if target == me {
            return done(self, Ok(()));
        }
        if !voters.contains(&target) {
            return done(self, Err("ERR invalid node id".into()));
        }
        info!("transferring leadership to node {target}");
        self.give_up_lease();
        self.node.transfer_leader(target);
        // raft-rs gives up after an election timeout; allow for the new leader's election.
        self.transfer = Some((target, Instant::now() + self.read_timeout * 3));
    }

    pub(super) fn track_transfer(&mut self) {
        let Some((target, deadline)) = self.transfer else {
            return;
        };
        let r = &self.node.raft;
        let result = if r.leader_id == target && r.state != StateRole::Leader {
            Ok(())
        } else if r.leader_id != 0 && r.leader_id != target && r.leader_id != self.shared.node_id {
            Err("ERR different node elected leader".to_string())
        } else if Instant::now() > deadline {
            Err("ERR transfer timed out".to_string())
        } else {
            return;
        };
        self.transfer = None;
        self.shared
            .push(ApplyItem::TransferDone(result), &self.waker);
    }
}
