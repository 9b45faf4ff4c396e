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
    Redis { db: i32, argv: Vec<Vec<u8>> },
    /// Node `id` is reached by clients at `addr` (from its `raft.addr`); used in -MOVED.
    NodeAddr { id: u64, addr: String },
    /// A MULTI/EXEC transaction: its commands, each with its database, run back to back;
    /// aborted on every node if a watched key (database, key, applied index at WATCH) was
    /// modified by an entry after that index.
    Multi {
        cmds: Vec<(i32, Vec<Vec<u8>>)>,
        watch: Vec<(i32, Vec<u8>, u64)>,
    },
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
    let mut out = Vec::with_capacity(64);
    out.push(FORMAT_V1);
    // Serializing an in-memory enum of vectors and strings into a Vec cannot fail.
    if let Err(e) = bincode::serialize_into(&mut out, cmd) {
        unreachable!("bincode serialize into Vec failed: {e}");
    }
    out
}

pub fn decode_command(data: &[u8]) -> Result<LogCommand, CodecError> {
    let (&version, body) = data.split_first().ok_or(CodecError::Empty)?;
    if version != FORMAT_V1 {
        return Err(CodecError::Version(version));
    }
    use ::bincode::Options as _;
    bincode::options_limited()
        .deserialize(body)
        .map_err(|e| CodecError::Decode(e.to_string()))
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
