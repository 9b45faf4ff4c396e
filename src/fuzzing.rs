//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz): each takes untrusted bytes and
//! runs them through the real decoder, the way the node meets them (from a socket, a file or
//! a config line). No decoding logic lives here; a panic, hang or unbounded allocation found
//! through one of these is a bug in the decoder it calls.
//!
//! Not part of the module's interface (hidden from docs); the fuzz crate is its only user.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use prost::Message as _;
use raft::eraftpb::ConfChangeV2;
use raft::{GetEntriesContext, Storage as _};

use crate::codec::{self, MemberChange, ProposalTag, SnapshotMembership, StoredMembership};
use crate::config;
use crate::snapshot::format as snapshot_format;
use crate::storage::LogStore;
use crate::transport::frame::FrameDecoder;

/// Bus frames: the bytes a peer (or anyone reaching the bus port) sends, fed to one
/// connection's decoder in pieces. The first byte picks the piece size (1..=256 bytes), so
/// frames split across reads are covered; the rest is the stream.
pub fn bus_frames(data: &[u8]) {
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    let piece = usize::from(split) + 1;
    // Small enough that the fuzzer reaches the oversized-frame refusal too.
    let mut decoder = FrameDecoder::new(64 * 1024);
    for chunk in stream.chunks(piece) {
        decoder.push(chunk);
        loop {
            match decoder.next_frame() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                // The stream is unusable after an error: the reader closes the connection.
                Err(_) => return,
            }
        }
    }
}

/// The handshake and everything after it on an inbound connection: `data` is what the peer
/// sends, handled by the reader's own frame handling (Hello checks, challenge, Raft messages,
/// snapshot chunks), as node 2 of cluster `fuzz` (the seeds carry a matching Hello). The first
/// byte: bit 0 sets a cluster password (its challenge cannot be answered here: the nonce is
/// random), the rest picks the read size as in `bus_frames`.
pub fn bus_handshake(data: &[u8]) {
    let Some((&flags, stream)) = data.split_first() else {
        return;
    };
    let password = if flags & 1 == 1 { "fuzz-secret" } else { "" };
    let piece = usize::from(flags >> 1) + 1;
    crate::transport::fuzz_inbound(2, "fuzz", password, stream.chunks(piece));
}

/// A Raft log file as left on disk: opened and replayed by the real store, then every entry
/// read back (from the cache and, with a tiny cache, from the file).
pub fn log_file(data: &[u8]) {
    let Some((&cache, file)) = data.split_first() else {
        return;
    };
    let path = scratch_file("raft.log", file);
    // 0: a cache too small for any entry, so every read goes back to the file.
    let cache_max_bytes = if cache & 1 == 0 { 0 } else { 1 << 20 };
    if let Ok((store, _recovery)) = LogStore::open_with_cache(&path, false, cache_max_bytes) {
        let _ = store.initial_state();
        let (Ok(first), Ok(last)) = (store.first_index(), store.last_index()) else {
            return;
        };
        let _ = store.membership();
        // Bounded: at most 4096 entries are read back (a fuzz input is small anyway).
        let high = last.saturating_add(1).min(first.saturating_add(4096));
        for idx in first.saturating_sub(1)..high {
            let _ = store.term(idx);
        }
        let _ = store.entries(first, high, None, GetEntriesContext::empty(false));
    }
}

/// A snapshot file (from this node's disk or received from the leader): checked by `verify`
/// with every key read, its cheap `inspect`, and the membership and state the node
/// reads from its header's metadata.
pub fn snapshot_file(data: &[u8]) {
    let path = scratch_file("snapshot.rrs", data);
    if let Ok(summary) = snapshot_format::verify(&path) {
        let _ = codec::decode::<SnapshotMembership>(&summary.header.meta);
        let _ = codec::decode_snapshot_state(&summary.header.meta);
    }
    let _ = snapshot_format::inspect(&path);
    if let Ok(r) = snapshot_format::SnapshotReader::open(&path) {
        for k in r.take(4096) {
            if k.is_err() {
                break;
            }
        }
    }
}

/// Our own formats inside Raft entries (from the log or a leader): every decoder, and for
/// what decodes, that encoding it again decodes to the same value.
pub fn entry_codec(data: &[u8]) {
    fn round_trip<T>(data: &[u8])
    where
        T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        if let Ok(v) = codec::decode::<T>(data) {
            let again: T = codec::decode(&codec::encode(&v)).expect("re-encoded value decodes");
            assert_eq!(again, v);
        }
    }
    if let Ok(cmd) = codec::decode_command(data) {
        assert_eq!(
            codec::decode_command(&codec::encode_command(&cmd)).ok(),
            Some(cmd)
        );
    }
    let _ = codec::killed_script(data);
    round_trip::<MemberChange>(data);
    round_trip::<StoredMembership>(data);
    round_trip::<SnapshotMembership>(data);
    if let Some(tag) = ProposalTag::decode(data) {
        assert_eq!(tag.encode(), data);
    }
    // A configuration-change entry's data, and our change in its context.
    if let Ok(cc) = ConfChangeV2::decode(data) {
        let _ = codec::decode::<MemberChange>(&cc.context);
    }
}

/// Option values as redis.conf or CONFIG SET give them: the first byte picks the option,
/// the rest (as UTF-8, lossily) is the value; `raft.cluster-nodes` also goes through the
/// cross-option check with a node id taken from its own entries.
pub fn options(data: &[u8]) {
    const STRINGS: [&str; 7] = [
        "node-id",
        "cluster-nodes",
        "ignored-commands",
        "cluster-user",
        "log-filename",
        "addr",
        "cluster-password",
    ];
    let Some((&which, value)) = data.split_first() else {
        return;
    };
    let value = String::from_utf8_lossy(value);
    let option = STRINGS[usize::from(which) % STRINGS.len()];
    let _ = config::check_string(option, &value);
    let _ = config::parse_host_port(&value);
    if let Ok(nodes) = config::parse_cluster_nodes(&value) {
        for n in &nodes {
            let _ = (n.redis_addr(), n.bus_addr(), n.raft_id());
        }
        let node_id = nodes
            .get(usize::from(which) % nodes.len().max(1))
            .map_or_else(String::new, |n| n.name.clone());
        let opts = config::Options {
            node_id,
            cluster_nodes: value.into_owned(),
            ..Default::default()
        };
        let _ = config::validate(&opts);
    }
}

/// A reply read from another node's Redis port during RAFT.CLUSTER JOIN.
pub fn join_reply(data: &[u8]) {
    let mut budget = 1 << 20;
    let mut r = std::io::Cursor::new(data);
    // As join.rs reads: replies one after another on one connection.
    for _ in 0..16 {
        if crate::join::read_reply(&mut r, &mut budget, 0).is_err() {
            break;
        }
    }
}

/// `contents` written to `name` in this process's scratch directory, replacing what the
/// previous input left there.
fn scratch_file(name: &str, contents: &[u8]) -> PathBuf {
    let path = scratch_dir().join(name);
    // The store may have left other files beside it (a rewrite's temporary file).
    let _ = std::fs::remove_file(path.with_extension("rewrite.tmp"));
    let mut f = std::fs::File::create(&path).expect("scratch file can be created");
    f.write_all(contents).expect("scratch file can be written");
    path
}

/// A directory of this process's own under `TMPDIR` (the fuzz scripts point that at a
/// directory they remove afterwards).
fn scratch_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("redis-raft-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory can be created");
        dir
    })
}

/// A fuzz target's entry point.
pub type Target = fn(&[u8]);

/// The fuzz targets, each with its entry point.
pub const TARGETS: [(&str, Target); 7] = [
    ("bus_frames", bus_frames),
    ("bus_handshake", bus_handshake),
    ("log_file", log_file),
    ("snapshot_file", snapshot_file),
    ("entry_codec", entry_codec),
    ("options", options),
    ("join_reply", join_reply),
];

/// Seed inputs for every target, made by the real encoders (frames as a peer sends them, a
/// log file as the store writes it, a snapshot file as a save writes it, entries as the
/// leader encodes them): `(target, name, bytes)`. `fuzz/seeds/` holds them as files, checked
/// against this by a unit test; `REDIS_RAFT_WRITE_SEEDS=1 cargo test --lib fuzzing` rewrites
/// them after a format change.
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    use crate::transport::frame;
    use raft::eraftpb::{ConfState, Entry, EntryType, HardState, Message, MessageType};

    let mut out: Vec<(&'static str, String, Vec<u8>)> = Vec::new();
    let member = |id: u64| codec::Member {
        id,
        name: format!("n{id}"),
        redis_addr: format!("127.0.0.1:700{id}"),
        bus_addr: format!("127.0.0.1:1700{id}"),
    };
    let set = codec::encode_command(&codec::LogCommand::Redis {
        db: 0,
        argv: vec![b"SET".to_vec(), b"key".to_vec(), b"value".to_vec()],
    });
    let multi = codec::encode_command(&codec::LogCommand::Transaction {
        cmds: vec![(0, vec![b"INCR".to_vec(), b"n".to_vec()])],
        watch: vec![(0, b"w".to_vec(), 3, -1)],
        now_ms: 1_700_000_000_000,
    });
    let kill = codec::encode_command(&codec::LogCommand::KillScript {
        index: 7,
        argv: vec![b"SCRIPT".to_vec(), b"KILL".to_vec()],
    });
    let bootstrap = codec::encode(&MemberChange::Bootstrap {
        cluster_id: "fuzz".into(),
        member: member(1),
    });
    let mut book = codec::MemberBook::default();
    book.apply(&MemberChange::Bootstrap {
        cluster_id: "fuzz".into(),
        member: member(1),
    });
    book.apply(&MemberChange::Add { member: member(3) });
    let stored = codec::encode(&StoredMembership {
        me: 1,
        book: book.clone(),
        hints: vec![member(2)],
    });
    let snap_meta = codec::encode(&SnapshotMembership {
        voters: vec![1, 3],
        learners: vec![],
        book,
    });
    let tag = ProposalTag {
        node_id: 1,
        incarnation: 2,
        request: 3,
    }
    .encode();
    let conf_change = ConfChangeV2 {
        context: bootstrap.clone(),
        ..Default::default()
    }
    .encode_to_vec();
    for (name, bytes) in [
        ("set", &set),
        ("transaction", &multi),
        ("kill_script", &kill),
        ("bootstrap", &bootstrap),
        ("stored_membership", &stored),
        ("snapshot_membership", &snap_meta),
        ("proposal_tag", &tag),
        ("conf_change", &conf_change),
    ] {
        out.push(("entry_codec", name.into(), bytes.clone()));
    }

    // Bus: what a peer sends node 2 of cluster "fuzz", and what it is sent back.
    let entry = |index: u64, data: &[u8]| Entry {
        entry_type: EntryType::EntryNormal as i32,
        term: 2,
        index,
        data: data.to_vec(),
        context: tag.clone(),
        ..Default::default()
    };
    let append = Message {
        msg_type: MessageType::MsgAppend as i32,
        from: 1,
        to: 2,
        term: 2,
        log_term: 2,
        index: 4,
        commit: 4,
        entries: vec![entry(5, &set), entry(6, &multi)],
        ..Default::default()
    };
    let heartbeat = Message {
        msg_type: MessageType::MsgHeartbeat as i32,
        from: 1,
        to: 2,
        term: 2,
        commit: 6,
        ..Default::default()
    };
    let mut hello = Vec::new();
    let h = frame::Hello {
        version: frame::PROTOCOL_VERSION,
        cluster_id: "fuzz".into(),
        from: 1,
        to: 2,
    };
    frame::encode_hello(&h, &mut hello).expect("hello encodes");
    let mut messages = Vec::new();
    frame::encode_message(&append, 1 << 20, &mut messages).expect("message encodes");
    frame::encode_message(&heartbeat, 1 << 20, &mut messages).expect("message encodes");
    let mut chunk = Vec::new();
    frame::encode_snapshot_chunk(6, 0, 4, b"RRSN", &mut chunk).expect("chunk encodes");
    let mut response = Vec::new();
    frame::encode_response(&[7; frame::AUTH_BYTES], &mut response);
    let mut replies = Vec::new();
    frame::encode_challenge(&[9; frame::AUTH_BYTES], &mut replies);
    frame::encode_welcome(&mut replies);
    frame::encode_reject("wrong cluster id", &mut replies);
    let session = [hello.clone(), messages.clone(), chunk.clone()].concat();
    out.push((
        "bus_frames",
        "session".into(),
        [&[255u8][..], &session].concat(),
    ));
    out.push((
        "bus_frames",
        "split_reads".into(),
        [&[6u8][..], &session].concat(),
    ));
    out.push((
        "bus_frames",
        "handshake_replies".into(),
        [&[255u8][..], &replies].concat(),
    ));
    // Flags: bit 0 = password, the rest the read size.
    out.push((
        "bus_handshake",
        "open".into(),
        [&[254u8][..], &session].concat(),
    ));
    out.push((
        "bus_handshake",
        "open_split".into(),
        [&[12u8][..], &session].concat(),
    ));
    out.push((
        "bus_handshake",
        "challenged".into(),
        [&[255u8][..], &hello, &response, &messages].concat(),
    ));

    // A log file as the store writes it.
    let dir = scratch_dir();
    let path = dir.join("seed.log");
    let _ = std::fs::remove_file(&path);
    {
        let (store, _) = LogStore::open(&path, false).expect("seed log opens");
        let cs = ConfState {
            voters: vec![1, 2, 3],
            ..Default::default()
        };
        let hs = HardState {
            term: 1,
            vote: 0,
            commit: 1,
        };
        let boot = Entry {
            entry_type: EntryType::EntryConfChangeV2 as i32,
            term: 1,
            index: 1,
            data: conf_change.clone(),
            ..Default::default()
        };
        store
            .bootstrap(&[boot], &hs, &cs, (1, &stored))
            .expect("seed log bootstraps");
        store
            .append(&[entry(2, &set), entry(3, &multi), entry(4, &kill)])
            .expect("seed log appends");
        store
            .set_hard_state(&HardState {
                term: 2,
                vote: 1,
                commit: 3,
            })
            .expect("seed log hard state");
        store.set_commit(4).expect("seed log commit");
        store
            .set_membership(4, &cs, &stored)
            .expect("seed log membership");
        store.sync().expect("seed log syncs");
    }
    let log = std::fs::read(&path).expect("seed log reads");
    let _ = std::fs::remove_file(&path);
    out.push(("log_file", "cached".into(), [&[1u8][..], &log].concat()));
    out.push(("log_file", "read_back".into(), [&[0u8][..], &log].concat()));

    // A snapshot file as a save writes it.
    let path = dir.join("seed.rrs");
    let header = snapshot_format::SnapshotHeader {
        index: 6,
        term: 2,
        meta: snap_meta,
    };
    let mut w = snapshot_format::SnapshotWriter::create(&path, &header).expect("seed snapshot");
    // DUMP payloads of a string "v" and of an integer, as Redis 7.0 writes them.
    let dump_v = b"\x00\x01v\x0a\x00\x8c\x9f\x4c\x3c\x1d\x53\xa4\x9e";
    w.write_key(0, b"key", None, dump_v).expect("seed key");
    w.write_key(3, b"ttl", Some(1_900_000_000_000), dump_v)
        .expect("seed key");
    w.finish().expect("seed snapshot finishes");
    let snapshot = std::fs::read(&path).expect("seed snapshot reads");
    let _ = std::fs::remove_file(&path);
    out.push(("snapshot_file", "two_keys".into(), snapshot));

    // Option values (first byte: which option, see `options`).
    for (which, name, value) in [
        (
            1u8,
            "cluster_nodes",
            "n1=127.0.0.1:7001,n2=127.0.0.1:7002@17002,[::1]:7003",
        ),
        (
            1,
            "cluster_nodes_hosts",
            "10.0.0.1:6379, 10.0.0.2:6379 ,10.0.0.3:6379",
        ),
        (5, "addr", "[fe80::1]:6379"),
        (0, "node_id", "n1"),
        (2, "ignored_commands", "incr,decr"),
        (4, "log_filename", "raft.log"),
    ] {
        out.push((
            "options",
            name.into(),
            [&[which][..], value.as_bytes()].concat(),
        ));
    }

    // Replies RAFT.CLUSTER JOIN reads.
    for (name, reply) in [
        ("moved", &b"-MOVED 0 127.0.0.1:7001\r\n"[..]),
        ("ok", b"+OK\r\n"),
        (
            "members",
            b"*2\r\n*3\r\n:1\r\n$2\r\nn1\r\n$14\r\n127.0.0.1:7001\r\n*3\r\n:2\r\n$-1\r\n*-1\r\n",
        ),
    ] {
        out.push(("join_reply", name.into(), reply.to_vec()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeds_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds")
    }

    /// Inputs that once made a target fail (`fuzz/regressions/<target>/`, each also a unit
    /// test beside its decoder) go through it now.
    #[test]
    fn regressions_pass() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
        let mut ran = 0;
        for (target, run) in TARGETS {
            let Ok(files) = std::fs::read_dir(dir.join(target)) else {
                continue;
            };
            for f in files {
                let path = f.unwrap().path();
                run(&std::fs::read(&path).unwrap());
                ran += 1;
            }
        }
        assert!(ran >= 2, "fuzz/regressions/ holds {ran} inputs");
    }

    /// Every seed goes through its target without a panic, and `fuzz/seeds/` holds exactly
    /// what the encoders make today (rewritten with REDIS_RAFT_WRITE_SEEDS=1).
    #[test]
    fn seeds_run_and_match_the_committed_files() {
        let rewrite = std::env::var_os("REDIS_RAFT_WRITE_SEEDS").is_some();
        for (target, name, bytes) in seeds() {
            let (_, run) = TARGETS
                .iter()
                .find(|(t, _)| *t == target)
                .expect("seed for a known target");
            run(&bytes);
            let file = seeds_dir().join(target).join(&name);
            if rewrite {
                std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                std::fs::write(&file, &bytes).unwrap();
            }
            let committed = std::fs::read(&file).unwrap_or_default();
            assert!(
                committed == bytes,
                "{} differs from what the encoders make: rerun with REDIS_RAFT_WRITE_SEEDS=1",
                file.display()
            );
        }
    }
}
