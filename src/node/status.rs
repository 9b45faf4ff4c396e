//! What the raft thread publishes about itself, for INFO raft and the main thread.

use raft::StateRole;

use crate::storage::LogStats;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Role {
    #[default]
    Follower,
    PreCandidate,
    Candidate,
    Leader,
    /// The raft thread stopped after a log write failed.
    Stopped,
}

impl Role {
    /// RedisRaft's spelling in `raft_role`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Follower => "follower",
            Role::PreCandidate => "pre-candidate",
            Role::Candidate => "candidate",
            Role::Leader => "leader",
            Role::Stopped => "(none)",
        }
    }
}

impl From<StateRole> for Role {
    fn from(s: StateRole) -> Role {
        match s {
            StateRole::Follower => Role::Follower,
            StateRole::PreCandidate => Role::PreCandidate,
            StateRole::Candidate => Role::Candidate,
            StateRole::Leader => Role::Leader,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct NodeStatus {
    pub role: Role,
    pub term: u64,
    /// 0 when no leader is known.
    pub leader_id: u64,
    pub voted_for: u64,
    pub commit_index: u64,
    pub last_index: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// On the leader: (node id, matched index, next index) per node.
    pub progress: Vec<(u64, u64, u64)>,
    pub log: LogStats,
    pub failure: Option<String>,
    /// The log's last write found no space; it is tried again (the error).
    pub log_full: Option<String>,
    /// A write or fsync of the log failed; the node stopped (the error).
    pub log_failed: Option<String>,
}
