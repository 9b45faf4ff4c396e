//! The bus wire format. Every byte the bus writes or reads is encoded and decoded here, so the
//! format can evolve in one place under `PROTOCOL_VERSION`.
//!
//! Frame (all integers little-endian):
//!
//! ```text
//! magic u16 = 0x5252 | kind u8 | len u32 | crc32(body) u32 | body (len bytes)
//! ```
//!
//! Kinds:
//! - 1 `Hello`: first frame on every connection, body (version 1):
//!   `version u16 | from u64 | to u64 | cluster_id_len u16 | cluster_id (UTF-8)`.
//!   The version leads the body so a later version may change everything after it.
//! - 2 `Raft`: one `raft::eraftpb::Message` in its prost (protobuf) encoding.
//! - 3 `Challenge` (acceptor to connector): a 32-byte random nonce.
//! - 4 `Response` (connector to acceptor): 32 bytes,
//!   `HMAC-SHA256(key = cluster password, nonce || cluster_id || from u64 || to u64)`, with
//!   `from`/`to` as in the Hello. The password itself never goes on the wire.
//! - 5 `Welcome` (acceptor to connector): empty body; "send your Raft messages".
//! - 6 `Reject` (acceptor to connector): a UTF-8 reason, sent just before closing.
//! - 7 `SnapshotChunk` (connector to acceptor, before the Raft frame of a MsgSnapshot):
//!   `index u64 | offset u64 | total u64 | bytes`: part of the snapshot file for the message's
//!   snapshot index; the receiver writes it at `offset` and hands the message on only once
//!   all `total` bytes arrived.
//!
//! Handshake: the connector sends Hello and waits. The acceptor answers a valid Hello with
//! Welcome (no password configured) or Challenge (password configured); a Challenge is answered
//! with Response, and the acceptor then sends Welcome (tag verified) or Reject (wrong tag, or
//! none in time). Raft frames flow only after the connector has seen Welcome.
//!
//! Invariant: a decoder error means the byte stream can no longer be trusted; the caller closes
//! that connection. The decoder never buffers more than one frame header plus `max_body_bytes`
//! beyond what it was handed in one `push`.

use hmac::{Hmac, Mac};
use prost::Message as _;
use raft::eraftpb::Message;
use sha2::Sha256;

/// First two bytes of every frame ("RR").
pub const MAGIC: u16 = 0x5252;
/// Version carried in the Hello; bump it when anything in this file changes meaning.
// 2: the acceptor answers the Hello (Welcome/Challenge), so version 1 peers cannot interoperate.
// 3: snapshot chunks (kind 7).
pub const PROTOCOL_VERSION: u16 = 3;
/// magic (2) + kind (1) + len (4) + crc (4).
pub const HEADER_BYTES: usize = 11;
/// Upper bound on the cluster id carried in a Hello.
pub const MAX_CLUSTER_ID_BYTES: usize = 256;
/// Size of the Challenge nonce and of the Response tag.
pub const AUTH_BYTES: usize = 32;
/// Upper bound on a Reject reason.
pub const MAX_REASON_BYTES: usize = 512;
/// A decoder keeps at most this much idle buffer capacity between frames.
const DECODER_KEEP_BYTES: usize = 1 << 20;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    Hello = 1,
    Raft = 2,
    Challenge = 3,
    Response = 4,
    Welcome = 5,
    Reject = 6,
    SnapshotChunk = 7,
}

impl FrameKind {
    fn from_u8(kind: u8) -> Option<FrameKind> {
        match kind {
            1 => Some(FrameKind::Hello),
            2 => Some(FrameKind::Raft),
            3 => Some(FrameKind::Challenge),
            4 => Some(FrameKind::Response),
            5 => Some(FrameKind::Welcome),
            6 => Some(FrameKind::Reject),
            7 => Some(FrameKind::SnapshotChunk),
            _ => None,
        }
    }
}

/// The first frame of every connection: who speaks, to whom, in which cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub cluster_id: String,
    pub from: u64,
    pub to: u64,
}

/// One decoded frame.
// Moved once, from decoder to reader; boxing the message would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq)]
pub enum Frame {
    Hello(Hello),
    Raft(Message),
    Challenge([u8; AUTH_BYTES]),
    Response([u8; AUTH_BYTES]),
    Welcome,
    Reject(String),
    SnapshotChunk(SnapshotChunk),
}

/// Part of a snapshot file on its way to a follower.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotChunk {
    /// The snapshot index of the MsgSnapshot this file goes with.
    pub index: u64,
    pub offset: u64,
    /// The whole file's size.
    pub total: u64,
    pub data: Vec<u8>,
}

/// Why bytes could not be encoded or decoded as a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("bad frame magic 0x{found:04x} (expected 0x{MAGIC:04x}): not a raft bus peer, or the stream is out of sync")]
    BadMagic { found: u16 },
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame body of {len} bytes exceeds the limit of {max} bytes (max_frame_bytes)")]
    TooLarge { len: u64, max: usize },
    #[error(
        "frame checksum mismatch: header says 0x{expected:08x}, body hashes to 0x{actual:08x}"
    )]
    CrcMismatch { expected: u32, actual: u32 },
    #[error(
        "peer speaks bus protocol version {found}, this node speaks version {PROTOCOL_VERSION}"
    )]
    UnsupportedVersion { found: u16 },
    #[error("malformed hello: {0}")]
    BadHello(&'static str),
    #[error("malformed {kind:?} frame: {why}")]
    BadBody { kind: FrameKind, why: &'static str },
    #[error("undecodable raft message: {0}")]
    BadMessage(#[from] prost::DecodeError),
}

/// Appends a Hello frame to `out`.
pub fn encode_hello(hello: &Hello, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let cluster_id = hello.cluster_id.as_bytes();
    if cluster_id.len() > MAX_CLUSTER_ID_BYTES {
        return Err(FrameError::BadHello("cluster id longer than 256 bytes"));
    }
    let start = begin_frame(FrameKind::Hello, out);
    out.extend_from_slice(&hello.version.to_le_bytes());
    out.extend_from_slice(&hello.from.to_le_bytes());
    out.extend_from_slice(&hello.to.to_le_bytes());
    // Fits: checked against MAX_CLUSTER_ID_BYTES above.
    out.extend_from_slice(&(cluster_id.len() as u16).to_le_bytes());
    out.extend_from_slice(cluster_id);
    finish_frame(out, start, usize::MAX)
}

/// Appends a Raft message frame to `out`. On error (message larger than `max_body_bytes`),
/// `out` is left as it was.
pub fn encode_message(
    msg: &Message,
    max_body_bytes: usize,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let len = msg.encoded_len();
    if len > max_body_bytes || len > u32::MAX as usize {
        return Err(FrameError::TooLarge {
            len: len as u64,
            max: max_body_bytes,
        });
    }
    out.reserve(HEADER_BYTES + len);
    let start = begin_frame(FrameKind::Raft, out);
    if msg.encode(out).is_err() {
        // Unreachable in practice: a Vec grows as needed. Refuse rather than send half a frame.
        out.truncate(start);
        return Err(FrameError::TooLarge {
            len: len as u64,
            max: max_body_bytes,
        });
    }
    finish_frame(out, start, max_body_bytes)
}

/// Appends a SnapshotChunk frame to `out`. The caller keeps `data` well under the frame limit.
pub fn encode_snapshot_chunk(
    index: u64,
    offset: u64,
    total: u64,
    data: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let start = begin_frame(FrameKind::SnapshotChunk, out);
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&total.to_le_bytes());
    out.extend_from_slice(data);
    finish_frame(out, start, usize::MAX)
}

/// Appends a Challenge frame carrying `nonce` to `out`.
pub fn encode_challenge(nonce: &[u8; AUTH_BYTES], out: &mut Vec<u8>) {
    encode_small(FrameKind::Challenge, nonce, out);
}

/// Appends a Response frame carrying `tag` (see `auth_tag`) to `out`.
pub fn encode_response(tag: &[u8; AUTH_BYTES], out: &mut Vec<u8>) {
    encode_small(FrameKind::Response, tag, out);
}

/// Appends a Welcome frame to `out`.
pub fn encode_welcome(out: &mut Vec<u8>) {
    encode_small(FrameKind::Welcome, &[], out);
}

/// Appends a Reject frame to `out`; a reason over `MAX_REASON_BYTES` is cut at a char boundary.
pub fn encode_reject(reason: &str, out: &mut Vec<u8>) {
    let mut end = reason.len().min(MAX_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    encode_small(FrameKind::Reject, &reason.as_bytes()[..end], out);
}

/// A frame whose body is small and already bounded, so encoding cannot fail.
fn encode_small(kind: FrameKind, body: &[u8], out: &mut Vec<u8>) {
    let start = begin_frame(kind, out);
    out.extend_from_slice(body);
    // Cannot fail: every caller's body is at most MAX_REASON_BYTES.
    let _ = finish_frame(out, start, usize::MAX);
}

/// A fresh random Challenge nonce.
pub fn new_nonce() -> Result<[u8; AUTH_BYTES], getrandom::Error> {
    let mut nonce = [0u8; AUTH_BYTES];
    getrandom::getrandom(&mut nonce)?;
    Ok(nonce)
}

fn auth_mac(
    password: &str,
    nonce: &[u8; AUTH_BYTES],
    cluster_id: &str,
    from: u64,
    to: u64,
) -> Hmac<Sha256> {
    // HMAC takes keys of any length (an empty one included), so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(password.as_bytes())
        .expect("HMAC accepts keys of any length");
    mac.update(nonce);
    mac.update(cluster_id.as_bytes());
    mac.update(&from.to_le_bytes());
    mac.update(&to.to_le_bytes());
    mac
}

/// The Response tag proving knowledge of `password`: HMAC-SHA256 over the nonce and the
/// connection's identity, so a tag cannot be replayed on another connection or direction.
pub fn auth_tag(
    password: &str,
    nonce: &[u8; AUTH_BYTES],
    cluster_id: &str,
    from: u64,
    to: u64,
) -> [u8; AUTH_BYTES] {
    auth_mac(password, nonce, cluster_id, from, to)
        .finalize()
        .into_bytes()
        .into()
}

/// Checks a Response tag in constant time.
pub fn verify_auth_tag(
    password: &str,
    nonce: &[u8; AUTH_BYTES],
    cluster_id: &str,
    from: u64,
    to: u64,
    tag: &[u8; AUTH_BYTES],
) -> bool {
    auth_mac(password, nonce, cluster_id, from, to)
        .verify_slice(tag)
        .is_ok()
}

fn begin_frame(kind: FrameKind, out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.push(kind as u8);
    out.extend_from_slice(&[0u8; 8]); // len and crc, filled in by finish_frame
    start
}

fn finish_frame(out: &mut Vec<u8>, start: usize, max_body_bytes: usize) -> Result<(), FrameError> {
    let body_start = start + HEADER_BYTES;
    let len = out.len() - body_start;
    if len > max_body_bytes || len > u32::MAX as usize {
        out.truncate(start);
        return Err(FrameError::TooLarge {
            len: len as u64,
            max: max_body_bytes,
        });
    }
    let crc = crc32fast::hash(&out[body_start..]);
    out[start + 3..start + 7].copy_from_slice(&(len as u32).to_le_bytes());
    out[start + 7..start + 11].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Incremental decoder for one connection's byte stream.
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` before this offset are already decoded.
    start: usize,
    max_body_bytes: usize,
}

impl FrameDecoder {
    pub fn new(max_body_bytes: usize) -> FrameDecoder {
        FrameDecoder {
            buf: Vec::new(),
            start: 0,
            max_body_bytes,
        }
    }

    /// Changes the largest frame body accepted from the next frame on (the bus raises it
    /// once a connection's handshake is complete).
    pub fn set_max_body_bytes(&mut self, max_body_bytes: usize) {
        self.max_body_bytes = max_body_bytes;
    }

    /// Appends bytes read from the socket.
    pub fn push(&mut self, data: &[u8]) {
        if self.start > 0 {
            // Compact once per push rather than once per frame.
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes received but not yet returned as frames.
    #[cfg(test)]
    pub fn buffered_bytes(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The kind byte of the next frame, once its header has begun to arrive.
    pub fn next_kind(&self) -> Option<u8> {
        self.buf.get(self.start + 2).copied()
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed. After an error the
    /// stream is unusable; close the connection.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let avail = &self.buf[self.start..];
        if avail.len() < HEADER_BYTES {
            return Ok(None);
        }
        let magic = u16::from_le_bytes([avail[0], avail[1]]);
        if magic != MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        let kind = FrameKind::from_u8(avail[2]).ok_or(FrameError::UnknownKind(avail[2]))?;
        let len = u32::from_le_bytes([avail[3], avail[4], avail[5], avail[6]]);
        let expected = u32::from_le_bytes([avail[7], avail[8], avail[9], avail[10]]);
        // Checked before waiting for the body, so an oversized frame is refused without
        // buffering it.
        if len as u64 > self.max_body_bytes as u64 {
            return Err(FrameError::TooLarge {
                len: len as u64,
                max: self.max_body_bytes,
            });
        }
        let total = HEADER_BYTES + len as usize;
        if avail.len() < total {
            return Ok(None);
        }
        let body = &avail[HEADER_BYTES..total];
        let actual = crc32fast::hash(body);
        if actual != expected {
            return Err(FrameError::CrcMismatch { expected, actual });
        }
        let frame = match kind {
            FrameKind::Hello => Frame::Hello(decode_hello(body)?),
            FrameKind::Raft => Frame::Raft(decode_message(body)?),
            FrameKind::Challenge => Frame::Challenge(fixed(kind, body)?),
            FrameKind::Response => Frame::Response(fixed(kind, body)?),
            FrameKind::Welcome if body.is_empty() => Frame::Welcome,
            FrameKind::Welcome => {
                return Err(FrameError::BadBody {
                    kind,
                    why: "body must be empty",
                })
            }
            FrameKind::Reject => Frame::Reject(decode_reason(body)?),
            FrameKind::SnapshotChunk => {
                let mut rest = body;
                let index = u64::from_le_bytes(take::<8>(&mut rest)?);
                let offset = u64::from_le_bytes(take::<8>(&mut rest)?);
                let total = u64::from_le_bytes(take::<8>(&mut rest)?);
                let end = offset.checked_add(rest.len() as u64);
                if end.is_none_or(|end| end > total) {
                    return Err(FrameError::BadBody {
                        kind,
                        why: "chunk ends past the file's size",
                    });
                }
                Frame::SnapshotChunk(SnapshotChunk {
                    index,
                    offset,
                    total,
                    data: rest.to_vec(),
                })
            }
        };
        self.start += total;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
            if self.buf.capacity() > DECODER_KEEP_BYTES {
                // One big frame (a snapshot) must not pin its size for the connection's life.
                self.buf = Vec::new();
            }
        }
        Ok(Some(frame))
    }
}

/// A Raft message as a peer may send it. raft-rs's accessors (`get_msg_type`,
/// `get_entry_type`) panic on an enum value they do not know, which in the raft thread would
/// stop the node, so such a message is refused here; so are the kinds only made inside a node
/// (MsgHup, MsgBeat, MsgCheckQuorum, and MsgUnreachable and MsgSnapStatus, which the node
/// takes as its own transport's reports).
fn decode_message(body: &[u8]) -> Result<Message, FrameError> {
    use raft::eraftpb::{EntryType, MessageType};
    let bad = |why| FrameError::BadBody {
        kind: FrameKind::Raft,
        why,
    };
    let msg = Message::decode(body)?;
    match MessageType::from_i32(msg.msg_type) {
        None => return Err(bad("unknown message type")),
        Some(kind) if super::local_only(kind) => {
            return Err(bad("a message type a node only makes for itself"))
        }
        Some(_) => {}
    }
    let entry_types_known = msg
        .entries
        .iter()
        .all(|e| EntryType::from_i32(e.entry_type).is_some());
    if !entry_types_known {
        return Err(bad("entry of unknown type"));
    }
    Ok(msg)
}

fn decode_hello(body: &[u8]) -> Result<Hello, FrameError> {
    let mut rest = body;
    let version = u16::from_le_bytes(take::<2>(&mut rest)?);
    if version != PROTOCOL_VERSION {
        return Err(FrameError::UnsupportedVersion { found: version });
    }
    let from = u64::from_le_bytes(take::<8>(&mut rest)?);
    let to = u64::from_le_bytes(take::<8>(&mut rest)?);
    let id_len = u16::from_le_bytes(take::<2>(&mut rest)?) as usize;
    if id_len > MAX_CLUSTER_ID_BYTES {
        return Err(FrameError::BadHello("cluster id longer than 256 bytes"));
    }
    if rest.len() != id_len {
        return Err(FrameError::BadHello(
            "cluster id length does not match the body",
        ));
    }
    let cluster_id = std::str::from_utf8(rest)
        .map_err(|_| FrameError::BadHello("cluster id is not UTF-8"))?
        .to_owned();
    Ok(Hello {
        version,
        cluster_id,
        from,
        to,
    })
}

fn fixed(kind: FrameKind, body: &[u8]) -> Result<[u8; AUTH_BYTES], FrameError> {
    body.try_into().map_err(|_| FrameError::BadBody {
        kind,
        why: "body must be 32 bytes",
    })
}

fn decode_reason(body: &[u8]) -> Result<String, FrameError> {
    let bad = |why| FrameError::BadBody {
        kind: FrameKind::Reject,
        why,
    };
    if body.len() > MAX_REASON_BYTES {
        return Err(bad("reason longer than 512 bytes"));
    }
    Ok(std::str::from_utf8(body)
        .map_err(|_| bad("reason is not UTF-8"))?
        .to_owned())
}

fn take<const N: usize>(rest: &mut &[u8]) -> Result<[u8; N], FrameError> {
    if rest.len() < N {
        return Err(FrameError::BadHello("body too short"));
    }
    let (head, tail) = rest.split_at(N);
    *rest = tail;
    let mut out = [0u8; N];
    out.copy_from_slice(head);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::{Entry, EntryType, MessageType};

    fn hello() -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            cluster_id: "cluster-a".to_owned(),
            from: 1,
            to: 2,
        }
    }

    fn message() -> Message {
        Message {
            msg_type: MessageType::MsgAppend as i32,
            to: 2,
            from: 1,
            term: 7,
            log_term: 6,
            index: 41,
            commit: 40,
            entries: vec![Entry {
                entry_type: EntryType::EntryNormal as i32,
                term: 7,
                index: 42,
                data: b"SET k v".to_vec(),
                context: b"ctx".to_vec(),
                ..Default::default()
            }],
            context: b"hello".to_vec(),
            ..Default::default()
        }
    }

    fn encoded_pair() -> Vec<u8> {
        let mut buf = Vec::new();
        encode_hello(&hello(), &mut buf).unwrap();
        encode_message(&message(), 1 << 20, &mut buf).unwrap();
        buf
    }

    #[test]
    fn header_layout_is_as_documented() {
        let mut buf = Vec::new();
        encode_hello(&hello(), &mut buf).unwrap();
        let body_len = 2 + 8 + 8 + 2 + "cluster-a".len();
        assert_eq!(buf.len(), HEADER_BYTES + body_len);
        assert_eq!(&buf[0..2], &[0x52, 0x52]);
        assert_eq!(buf[2], 1);
        assert_eq!(&buf[3..7], &(body_len as u32).to_le_bytes());
        let crc = crc32fast::hash(&buf[HEADER_BYTES..]);
        assert_eq!(&buf[7..11], &crc.to_le_bytes());
        assert_eq!(&buf[11..13], &PROTOCOL_VERSION.to_le_bytes());
        assert_eq!(&buf[13..21], &1u64.to_le_bytes());
        assert_eq!(&buf[21..29], &2u64.to_le_bytes());
        assert_eq!(&buf[29..31], &9u16.to_le_bytes());
        assert_eq!(&buf[31..], b"cluster-a");
    }

    #[test]
    fn roundtrip_whole_buffer() {
        let mut dec = FrameDecoder::new(1 << 20);
        dec.push(&encoded_pair());
        assert_eq!(dec.next_frame().unwrap(), Some(Frame::Hello(hello())));
        assert_eq!(dec.next_frame().unwrap(), Some(Frame::Raft(message())));
        assert_eq!(dec.next_frame().unwrap(), None);
        assert_eq!(dec.buffered_bytes(), 0);
    }

    #[test]
    fn roundtrip_one_byte_at_a_time() {
        let bytes = encoded_pair();
        let mut dec = FrameDecoder::new(1 << 20);
        let mut frames = Vec::new();
        for b in &bytes {
            dec.push(std::slice::from_ref(b));
            while let Some(f) = dec.next_frame().unwrap() {
                frames.push(f);
            }
        }
        assert_eq!(frames, vec![Frame::Hello(hello()), Frame::Raft(message())]);
    }

    #[test]
    fn bad_magic_is_rejected() {
        let mut bytes = encoded_pair();
        bytes[0] = 0x00;
        let mut dec = FrameDecoder::new(1 << 20);
        dec.push(&bytes);
        let err = dec.next_frame().unwrap_err();
        assert!(
            matches!(err, FrameError::BadMagic { found: 0x5200 }),
            "{err}"
        );
    }

    #[test]
    fn unknown_kind_is_rejected() {
        let mut bytes = encoded_pair();
        bytes[2] = 9;
        let mut dec = FrameDecoder::new(1 << 20);
        dec.push(&bytes);
        assert!(matches!(
            dec.next_frame().unwrap_err(),
            FrameError::UnknownKind(9)
        ));
    }

    #[test]
    fn bad_crc_is_rejected() {
        let mut bytes = encoded_pair();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        let mut dec = FrameDecoder::new(1 << 20);
        dec.push(&bytes);
        assert_eq!(dec.next_frame().unwrap(), Some(Frame::Hello(hello())));
        assert!(matches!(
            dec.next_frame().unwrap_err(),
            FrameError::CrcMismatch { .. }
        ));
    }

    #[test]
    fn oversized_len_is_rejected_from_the_header_alone() {
        let mut header = Vec::new();
        header.extend_from_slice(&MAGIC.to_le_bytes());
        header.push(FrameKind::Raft as u8);
        header.extend_from_slice(&1025u32.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        let mut dec = FrameDecoder::new(1024);
        dec.push(&header);
        let err = dec.next_frame().unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::TooLarge {
                    len: 1025,
                    max: 1024
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn encoder_refuses_oversized_message_and_leaves_buffer_untouched() {
        let mut buf = vec![1, 2, 3];
        let mut big = message();
        big.entries[0].data = vec![0u8; 2048];
        let err = encode_message(&big, 1024, &mut buf).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { max: 1024, .. }));
        assert_eq!(buf, vec![1, 2, 3]);
    }

    #[test]
    fn hello_of_another_version_is_rejected() {
        let mut buf = Vec::new();
        let mut h = hello();
        h.version = 1;
        encode_hello(&h, &mut buf).unwrap();
        let mut dec = FrameDecoder::new(1 << 20);
        dec.push(&buf);
        assert!(matches!(
            dec.next_frame().unwrap_err(),
            FrameError::UnsupportedVersion { found: 1 }
        ));
    }

    #[test]
    fn truncated_hello_body_is_rejected() {
        let mut buf = Vec::new();
        let start = begin_frame(FrameKind::Hello, &mut buf);
        buf.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        buf.extend_from_slice(&[0u8; 5]);
        finish_frame(&mut buf, start, usize::MAX).unwrap();
        let mut dec = FrameDecoder::new(1 << 20);
        dec.push(&buf);
        assert!(matches!(
            dec.next_frame().unwrap_err(),
            FrameError::BadHello("body too short")
        ));
    }

    #[test]
    fn undecodable_message_body_is_rejected() {
        let mut buf = Vec::new();
        let start = begin_frame(FrameKind::Raft, &mut buf);
        buf.extend_from_slice(&[0xff; 16]);
        finish_frame(&mut buf, start, usize::MAX).unwrap();
        let mut dec = FrameDecoder::new(1 << 20);
        dec.push(&buf);
        assert!(matches!(
            dec.next_frame().unwrap_err(),
            FrameError::BadMessage(_)
        ));
    }

    #[test]
    fn handshake_frames_roundtrip() {
        let nonce = [7u8; AUTH_BYTES];
        let tag = auth_tag("secret", &nonce, "cluster-a", 1, 2);
        let mut buf = Vec::new();
        encode_challenge(&nonce, &mut buf);
        encode_response(&tag, &mut buf);
        encode_welcome(&mut buf);
        encode_reject("wrong or missing raft.cluster-password", &mut buf);
        let mut dec = FrameDecoder::new(1 << 20);
        dec.push(&buf);
        assert_eq!(dec.next_frame().unwrap(), Some(Frame::Challenge(nonce)));
        assert_eq!(dec.next_frame().unwrap(), Some(Frame::Response(tag)));
        assert_eq!(dec.next_frame().unwrap(), Some(Frame::Welcome));
        assert_eq!(
            dec.next_frame().unwrap(),
            Some(Frame::Reject(
                "wrong or missing raft.cluster-password".to_owned()
            ))
        );
        assert_eq!(dec.next_frame().unwrap(), None);
    }

    #[test]
    fn auth_tag_binds_password_nonce_and_identity() {
        let nonce = [9u8; AUTH_BYTES];
        let tag = auth_tag("secret", &nonce, "c", 1, 2);
        assert!(verify_auth_tag("secret", &nonce, "c", 1, 2, &tag));
        assert!(!verify_auth_tag("other", &nonce, "c", 1, 2, &tag));
        assert!(!verify_auth_tag("", &nonce, "c", 1, 2, &tag));
        assert!(!verify_auth_tag(
            "secret",
            &[8u8; AUTH_BYTES],
            "c",
            1,
            2,
            &tag
        ));
        assert!(!verify_auth_tag("secret", &nonce, "d", 1, 2, &tag));
        assert!(!verify_auth_tag("secret", &nonce, "c", 2, 1, &tag));
        assert_ne!(new_nonce().unwrap(), new_nonce().unwrap());
    }

    fn raft_frame(msg: &Message) -> Vec<u8> {
        let mut buf = Vec::new();
        let start = begin_frame(FrameKind::Raft, &mut buf);
        msg.encode(&mut buf).unwrap();
        finish_frame(&mut buf, start, usize::MAX).unwrap();
        buf
    }

    /// Found by fuzzing (bus_handshake): a message type raft-rs does not know made the
    /// reader's `get_msg_type` panic, and would have stopped the node in the raft thread.
    #[test]
    fn messages_raft_rs_would_panic_on_or_only_makes_itself_are_rejected() {
        let mut unknown_type = message();
        unknown_type.msg_type = 63;
        let mut unknown_entry = message();
        unknown_entry.entries[0].entry_type = 9;
        let mut unreachable = message();
        unreachable.msg_type = MessageType::MsgUnreachable as i32;
        let mut snap_status = message();
        snap_status.msg_type = MessageType::MsgSnapStatus as i32;
        let mut hup = message();
        hup.msg_type = MessageType::MsgHup as i32;
        for (case, msg) in [
            ("unknown type", unknown_type),
            ("unknown entry type", unknown_entry),
            ("unreachable", unreachable),
            ("snap status", snap_status),
            ("hup", hup),
        ] {
            let mut dec = FrameDecoder::new(1 << 20);
            dec.push(&raft_frame(&msg));
            let err = dec.next_frame().unwrap_err();
            assert!(
                matches!(
                    err,
                    FrameError::BadBody {
                        kind: FrameKind::Raft,
                        ..
                    }
                ),
                "{case}: {err}"
            );
        }
    }

    #[test]
    fn challenge_of_wrong_length_is_rejected() {
        let mut buf = Vec::new();
        encode_small(FrameKind::Challenge, &[1, 2, 3], &mut buf);
        let mut dec = FrameDecoder::new(1 << 20);
        dec.push(&buf);
        assert!(matches!(
            dec.next_frame().unwrap_err(),
            FrameError::BadBody {
                kind: FrameKind::Challenge,
                ..
            }
        ));
    }
}
