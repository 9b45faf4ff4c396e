//! Our own serialized formats that live inside Raft entries. Every encode/decode of them is
//! here, each prefixed with a format version byte, so the codec (bincode today) can change.

use serde::{Deserialize, Serialize};

const FORMAT_V1: u8 = 1;

/// Largest entry payload a client may propose. Bounded well below the log's record limit
/// and the bus's frame limit (64 MiB each) so an accepted entry can always be stored and
/// shipped to every follower.
pub const ENTRY_BYTES_MAX: usize = 32 << 20;

/// What a normal Raft entry carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogCommand {
    /// A Redis command to execute on every node, in the client's database.
    Redis {
        db: i32,
        #[serde(with = "args")]
        argv: Vec<Vec<u8>>,
    },
    /// Node `id` is reached by clients at `addr` (from its `raft.addr`); used in -MOVED.
    NodeAddr { id: u64, addr: String },
    /// A MULTI/EXEC transaction: its commands, each with its database, run back to back;
    /// aborted on every node if a watched key (database, key, applied index at WATCH) was
    /// modified by an entry after that index.
    Multi {
        cmds: Vec<(i32, Vec<Vec<u8>>)>,
        watch: Vec<(i32, Vec<u8>, u64)>,
    },
    /// A transaction as `Multi` (which logs written before it still hold), whose watched
    /// keys also carry their expiry as of WATCH (absolute unix ms, -1: none), with the
    /// leader's clock at EXEC: it also aborts if a watched key that existed at WATCH had
    /// expired by then, as on Redis 7.0, and the same way on every node.
    Transaction {
        cmds: Vec<(i32, Vec<Vec<u8>>)>,
        watch: Vec<(i32, Vec<u8>, u64, i64)>,
        now_ms: i64,
    },
    /// SCRIPT KILL or FUNCTION KILL (`argv`) stopped, on the leader, the script of the
    /// entry at `index` before it wrote: every node stops its run of that entry too, and a
    /// node that has not run it yet skips it.
    KillScript {
        index: u64,
        #[serde(with = "args")]
        argv: Vec<Vec<u8>>,
    },
}

/// A command's arguments as byte strings rather than sequences of u8: decoded with one copy
/// each instead of byte by byte (every node decodes every entry it applies). bincode writes
/// both the same way (a u64 length, then the bytes), so logs decode alike either way.
mod args {
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_bytes::{ByteBuf, Bytes};

    pub fn serialize<S: Serializer>(argv: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(argv.iter().map(|a| Bytes::new(a)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        let args = Vec::<ByteBuf>::deserialize(d)?;
        Ok(args.into_iter().map(ByteBuf::into_vec).collect())
    }
}

/// One member of the cluster: its raft id, name, and where clients and peers reach it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: u64,
    pub name: String,
    /// Redis address, given to clients in -MOVED.
    pub redis_addr: String,
    /// Bus address peers connect to.
    pub bus_addr: String,
}

/// What a membership change entry (raft-rs ConfChangeV2, in its `context`) means to us.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberChange {
    /// One of the entries every new cluster starts with, one voter each (config-file
    /// bootstrap or RAFT.CLUSTER INIT); the first names the cluster.
    Bootstrap { cluster_id: String, member: Member },
    /// RAFT.NODE ADD: the node joins as a learner.
    Add { member: Member },
    /// A learner that caught up becomes a voter.
    Promote { id: u64 },
    /// RAFT.NODE REMOVE.
    Remove { id: u64 },
}

/// The cluster's members as the committed log defines them, and every id ever used.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberBook {
    pub cluster_id: String,
    pub members: std::collections::BTreeMap<u64, Member>,
    /// Ids are never reused: a removed node cannot come back under its old id.
    pub used_ids: std::collections::BTreeSet<u64>,
}

impl MemberBook {
    /// Applies a committed change (the same on every node, in log order).
    pub fn apply(&mut self, change: &MemberChange) {
        match change {
            MemberChange::Bootstrap { cluster_id, member } => {
                if self.cluster_id.is_empty() {
                    self.cluster_id = cluster_id.clone();
                }
                self.used_ids.insert(member.id);
                self.members.insert(member.id, member.clone());
            }
            MemberChange::Add { member } => {
                self.used_ids.insert(member.id);
                self.members.insert(member.id, member.clone());
            }
            MemberChange::Promote { .. } => {}
            MemberChange::Remove { id } => {
                self.members.remove(id);
            }
        }
    }

    /// True when `id` was a member and is no more.
    pub fn was_removed(&self, id: u64) -> bool {
        self.used_ids.contains(&id) && !self.members.contains_key(&id)
    }
}

/// The membership a snapshot stands for (in the snapshot file's header): the voters and
/// learners as of its index, and the member book.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMembership {
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub book: MemberBook,
}

/// What WATCH knows, as of a snapshot's index, of which keys the entries before it modified
/// (redis/watch.rs). Keys are 64-bit fingerprints, each with the index of the entry that
/// last modified it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchRecord {
    /// The newer generation of remembered keys.
    pub young: Vec<(u64, u64)>,
    /// The older generation.
    pub old: Vec<(u64, u64)>,
    /// Every key in neither counts as modified at this index.
    pub floor: u64,
    /// The newest index in `old`.
    pub old_newest: u64,
    /// Database → index of its last FLUSHDB.
    pub flushed: Vec<(i32, u64)>,
    /// Index of the last FLUSHALL.
    pub flushed_all: u64,
}

/// What applying the entries up to a snapshot's index built besides the keys: a node that
/// loads the snapshot instead of applying them needs it to go on exactly as the others.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotState {
    pub watch: WatchRecord,
    /// `FUNCTION DUMP`'s payload: the function libraries.
    #[serde(with = "serde_bytes")]
    pub functions: Vec<u8>,
    /// The scripts in the script cache (SCRIPT LOAD and EVAL bodies), for EVALSHA.
    #[serde(with = "args")]
    pub scripts: Vec<Vec<u8>>,
}

/// Written after `SnapshotState` since the module keeps the script cache in log order
/// (readers from before ignore it): how many of `SnapshotState::scripts` come first as SCRIPT
/// LOAD brought them (never evicted); the rest EVAL brought, least recently used first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScriptOrder {
    pub permanent: u64,
}

/// A snapshot header's metadata: the membership, the `SnapshotState`, then the
/// `ScriptOrder`. Files written before the state existed hold the membership alone, and
/// before the order the two first; a reader of the first ignores what follows it.
pub fn encode_snapshot_meta(
    membership: &SnapshotMembership,
    state: &SnapshotState,
    order: &ScriptOrder,
) -> Vec<u8> {
    let mut out = encode(membership);
    out.extend_from_slice(&encode(state));
    out.extend_from_slice(&encode(order));
    out
}

/// What follows the encoded `first` in `data` (`encode` wrote it: a version byte, then it).
fn after<'a, T: Serialize>(data: &'a [u8], first: &T) -> Result<Option<&'a [u8]>, CodecError> {
    use ::bincode::Options as _;
    let size = bincode::options_limited()
        .serialized_size(first)
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    let used = usize::try_from(size)
        .ok()
        .and_then(|n| n.checked_add(1))
        .ok_or_else(|| CodecError::Decode("record size out of range".into()))?;
    Ok(data.get(used..).filter(|rest| !rest.is_empty()))
}

/// The `SnapshotState` in a snapshot's metadata, and its `ScriptOrder`; None in a file
/// written before either existed.
pub fn decode_snapshot_state(
    meta: &[u8],
) -> Result<Option<(SnapshotState, Option<ScriptOrder>)>, CodecError> {
    let membership: SnapshotMembership = decode(meta)?;
    let Some(rest) = after(meta, &membership)? else {
        return Ok(None);
    };
    let state: SnapshotState = decode(rest)?;
    let order = match after(rest, &state)? {
        Some(tail) => Some(decode(tail)?),
        None => None,
    };
    Ok(Some((state, order)))
}

/// What a node's log stores about membership: the book, and which member the node is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMembership {
    pub me: u64,
    pub book: MemberBook,
    /// Peers known before the log named any (a joining node's view of the cluster).
    pub hints: Vec<Member>,
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(FORMAT_V1);
    // Serializing in-memory vectors, maps and strings into a Vec cannot fail.
    if let Err(e) = bincode::serialize_into(&mut out, v) {
        unreachable!("bincode serialize into Vec failed: {e}");
    }
    out
}

pub fn decode<T: serde::de::DeserializeOwned>(data: &[u8]) -> Result<T, CodecError> {
    let (&version, body) = data.split_first().ok_or(CodecError::Empty)?;
    if version != FORMAT_V1 {
        return Err(CodecError::Version(version));
    }
    use ::bincode::Options as _;
    bincode::options_limited()
        .deserialize(body)
        .map_err(|e| CodecError::Decode(e.to_string()))
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("empty payload")]
    Empty,
    #[error("unknown format version {0}")]
    Version(u8),
    #[error("undecodable payload: {0}")]
    Decode(String),
}

pub fn encode_command(cmd: &LogCommand) -> Vec<u8> {
    encode(cmd)
}

pub fn decode_command(data: &[u8]) -> Result<LogCommand, CodecError> {
    decode(data)
}

/// The entry index a `KillScript` entry's bytes stop, without decoding any other kind of
/// entry (bincode writes the variant as a little-endian u32 after the version byte).
pub fn killed_script(data: &[u8]) -> Option<u64> {
    const KILL_SCRIPT: u32 = 4;
    if data.get(1..5)? != KILL_SCRIPT.to_le_bytes() {
        return None;
    }
    match decode_command(data) {
        Ok(LogCommand::KillScript { index, .. }) => Some(index),
        _ => None,
    }
}

mod bincode {
    //! bincode 1.x with the same encoding as `bincode::serialize`, plus a size limit on decode
    //! so a corrupt length cannot make us allocate without bound.
    pub use ::bincode::serialize_into;
    use ::bincode::Options;

    pub fn options_limited() -> impl Options {
        ::bincode::DefaultOptions::new()
            .with_fixint_encoding()
            .allow_trailing_bytes()
            .with_limit(1 << 30)
    }
}

/// Identifies who proposed an entry so its node can reply to the waiting client.
/// Stored in `Entry.context`: node id, the proposing process's incarnation, request number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProposalTag {
    pub node_id: u64,
    pub incarnation: u64,
    pub request: u64,
}

impl ProposalTag {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(24);
        v.extend_from_slice(&self.node_id.to_le_bytes());
        v.extend_from_slice(&self.incarnation.to_le_bytes());
        v.extend_from_slice(&self.request.to_le_bytes());
        v
    }

    pub fn decode(b: &[u8]) -> Option<ProposalTag> {
        if b.len() != 24 {
            return None;
        }
        let word = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_le_bytes(a)
        };
        Some(ProposalTag {
            node_id: word(0),
            incarnation: word(1),
            request: word(2),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_round_trip() {
        let c = LogCommand::Redis {
            db: 3,
            argv: vec![b"SET".to_vec(), b"k".to_vec(), vec![0, 255, 10]],
        };
        assert_eq!(decode_command(&encode_command(&c)).unwrap(), c);
        let a = LogCommand::NodeAddr {
            id: 7,
            addr: "10.0.0.1:6379".into(),
        };
        assert_eq!(decode_command(&encode_command(&a)).unwrap(), a);
    }

    #[test]
    fn a_snapshot_keeps_its_membership_readable_and_carries_its_state() {
        let mut membership = SnapshotMembership {
            voters: vec![1, 2, 3],
            learners: vec![9],
            book: MemberBook::default(),
        };
        membership.book.cluster_id = "c1".into();
        let state = SnapshotState {
            watch: WatchRecord {
                young: vec![(11, 40), (12, 41)],
                old: vec![(13, 30)],
                floor: 7,
                old_newest: 30,
                flushed: vec![(3, 20)],
                flushed_all: 5,
            },
            functions: vec![0xf5, 0, 1, 2],
            scripts: vec![
                b"return 1".to_vec(),
                b"return redis.call('GET', KEYS[1])".to_vec(),
            ],
        };
        let order = ScriptOrder { permanent: 1 };
        let meta = encode_snapshot_meta(&membership, &state, &order);
        // Readers of the membership alone (the raft thread, older versions) see it as before.
        assert_eq!(decode::<SnapshotMembership>(&meta).unwrap(), membership);
        assert_eq!(
            decode_snapshot_state(&meta).unwrap(),
            Some((state.clone(), Some(order)))
        );
        // Readers of the state before the order see it as before.
        let rest = after(&meta, &membership).unwrap().unwrap();
        assert_eq!(decode::<SnapshotState>(rest).unwrap(), state);
        // A file from before the order, and one from before the state.
        let mut older = encode(&membership);
        older.extend_from_slice(&encode(&state));
        assert_eq!(
            decode_snapshot_state(&older).unwrap(),
            Some((state.clone(), None))
        );
        assert_eq!(decode_snapshot_state(&encode(&membership)).unwrap(), None);
        // A damaged record is an error, not a panic.
        assert!(decode_snapshot_state(&meta[..meta.len() - 3]).is_err());
        assert!(decode_snapshot_state(&[]).is_err());
    }

    /// Logs written by any version must decode alike: the bytes of a command are fixed.
    #[test]
    fn a_command_encodes_to_the_same_bytes_as_ever() {
        let c = LogCommand::Redis {
            db: 2,
            argv: vec![b"SET".to_vec(), b"k".to_vec(), vec![0, 255]],
        };
        let mut want = vec![FORMAT_V1, 0, 0, 0, 0, 2, 0, 0, 0];
        want.extend([3, 0, 0, 0, 0, 0, 0, 0]);
        for arg in [&b"SET"[..], b"k", &[0, 255]] {
            want.extend((arg.len() as u64).to_le_bytes());
            want.extend(arg);
        }
        assert_eq!(encode_command(&c), want);
        assert_eq!(decode_command(&want).unwrap(), c);
        let k = LogCommand::KillScript {
            index: 9,
            argv: vec![b"SCRIPT".to_vec(), b"KILL".to_vec()],
        };
        let mut want = vec![FORMAT_V1, 4, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0];
        want.extend(2u64.to_le_bytes());
        for arg in [&b"SCRIPT"[..], b"KILL"] {
            want.extend((arg.len() as u64).to_le_bytes());
            want.extend(arg);
        }
        assert_eq!(encode_command(&k), want);
        assert_eq!(decode_command(&want).unwrap(), k);
    }

    #[test]
    fn kill_script_entries_are_recognised_without_decoding_others() {
        let k = LogCommand::KillScript {
            index: 42,
            argv: vec![b"FUNCTION".to_vec(), b"KILL".to_vec()],
        };
        let bytes = encode_command(&k);
        assert_eq!(decode_command(&bytes).unwrap(), k);
        assert_eq!(killed_script(&bytes), Some(42));
        let set = LogCommand::Redis {
            db: 0,
            argv: vec![b"SET".to_vec(), b"k".to_vec(), b"v".to_vec()],
        };
        assert_eq!(killed_script(&encode_command(&set)), None);
        assert_eq!(killed_script(&[1, 4, 0]), None);
        assert_eq!(killed_script(&[1, 4, 0, 0, 0, 9]), None);
    }

    #[test]
    fn bad_payloads_are_errors() {
        assert!(matches!(decode_command(&[]), Err(CodecError::Empty)));
        assert!(matches!(
            decode_command(&[9, 1]),
            Err(CodecError::Version(9))
        ));
        assert!(matches!(
            decode_command(&[1, 0, 0, 0, 0, 255, 255, 255, 255, 255, 255, 255, 255]),
            Err(CodecError::Decode(_))
        ));
    }

    #[test]
    fn member_book_follows_changes_and_never_forgets_ids() {
        let m = |id: u64| Member {
            id,
            name: format!("n{id}"),
            redis_addr: format!("h:{id}"),
            bus_addr: format!("h:1{id}"),
        };
        let changes = [
            MemberChange::Bootstrap {
                cluster_id: "c1".into(),
                member: m(1),
            },
            MemberChange::Bootstrap {
                cluster_id: "c1".into(),
                member: m(2),
            },
            MemberChange::Add { member: m(3) },
            MemberChange::Promote { id: 3 },
            MemberChange::Remove { id: 1 },
        ];
        let mut book = MemberBook::default();
        for c in &changes {
            let bytes = encode(c);
            book.apply(&decode::<MemberChange>(&bytes).unwrap());
        }
        assert_eq!(book.cluster_id, "c1");
        assert_eq!(book.members.keys().copied().collect::<Vec<_>>(), vec![2, 3]);
        assert!(book.was_removed(1));
        assert!(!book.was_removed(2) && !book.was_removed(9));
        let stored = StoredMembership {
            me: 2,
            book,
            hints: Vec::new(),
        };
        assert_eq!(
            decode::<StoredMembership>(&encode(&stored)).unwrap(),
            stored
        );
        assert!(decode::<StoredMembership>(&[1, 0xff]).is_err());
    }

    #[test]
    fn tag_round_trip() {
        let t = ProposalTag {
            node_id: 1,
            incarnation: u64::MAX,
            request: 42,
        };
        assert_eq!(ProposalTag::decode(&t.encode()), Some(t));
        assert_eq!(ProposalTag::decode(&[1, 2]), None);
    }
}
