//! The on-disk format of the raft log, and nothing else: every byte layout decision lives here.
//!
//! ```text
//! file    := header record*
//! header  := "RRLOG" version:u32 LE                       (9 bytes, version = FORMAT_VERSION)
//! record  := len:u32 LE  crc:u32 LE  payload[len]          (crc = CRC-32 (IEEE) of payload)
//! payload := kind:u8 body
//!   kind 1 = Entry       body = prost-encoded eraftpb::Entry
//!   kind 2 = HardState   body = prost-encoded eraftpb::HardState
//!   kind 3 = ConfState   body = prost-encoded eraftpb::ConfState
//!   kind 4 = Commit      body = commit index u64 LE (exactly 8 bytes)
//!   kind 5 = Membership  body = index u64 LE, then an opaque blob (the cluster's member book
//!                        as of that applied index, encoded by codec.rs)     (version 2)
//!   kind 6 = Snapshot    body = index u64 LE, term u64 LE, prost-encoded ConfState: the
//!                        log starts after this snapshot (written first in a compacted file)
//! ```
//!
//! A change to any of this bumps `FORMAT_VERSION`; a reader refuses versions it does not know,
//! so an old binary never misreads a newer file.
//!
//! Invariant: `scan` reports a torn tail only for damage that ends exactly at end of file and is
//! not followed by anything that looks like a valid record; everything else is corruption.

use std::io::{self, Read};

use prost::Message as _;
use raft::eraftpb::{ConfState, Entry, EntryType, HardState};

pub(crate) const MAGIC: &[u8; 5] = b"RRLOG";
pub(crate) const FORMAT_VERSION: u32 = 2;
/// Oldest version this build still reads (version 1 lacks only the Membership record).
pub(crate) const FORMAT_VERSION_MIN: u32 = 1;
pub(crate) const HEADER_LEN: u64 = 9;
pub(crate) const FRAME_HEADER_LEN: u64 = 8;
/// No record may be larger than this; a larger length field is garbage, not data.
pub(crate) const RECORD_PAYLOAD_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// The most a log file is extended with zeros ahead of its records (storage's
/// preallocation): a damaged record followed by no more than this (and the record itself)
/// may be a write torn by a crash, not damage in the middle of the log.
pub(crate) const PREALLOCATED_MAX_BYTES: u64 = 4 * 1024 * 1024;
/// Why a scan stopped at zeros: the file's preallocated space (or a file system that
/// extended the file before the data landed), not damage.
pub(crate) const ZERO_TAIL: &str = "zero-filled tail";
/// The most bytes from a damaged record to the end of the file that can be one torn write:
/// a record and the preallocated zeros after it.
const TORN_TAIL_MAX_BYTES: u64 =
    PREALLOCATED_MAX_BYTES + RECORD_PAYLOAD_MAX_BYTES + FRAME_HEADER_LEN;
/// The page cache writes a file out in whole pages: a page-aligned page of zeros between a
/// damaged record and a valid one marks a write torn by a crash (its pages reached the disk
/// out of order), not damage to data that was on disk.
const PAGE_BYTES: u64 = 4096;

const KIND_ENTRY: u8 = 1;
const KIND_HARD_STATE: u8 = 2;
const KIND_CONF_STATE: u8 = 3;
const KIND_COMMIT: u8 = 4;
const KIND_MEMBERSHIP: u8 = 5;
const KIND_SNAPSHOT: u8 = 6;

/// Zero-tail checks read in chunks so a huge zero-filled tail does not need one huge buffer.
const ZERO_CHECK_CHUNK_BYTES: usize = 64 * 1024;

/// One decoded record.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Record {
    Entry(Entry),
    HardState(HardState),
    ConfState(ConfState),
    Commit(u64),
    /// The member book as of applied index `index` (opaque here; codec.rs owns its format).
    Membership {
        index: u64,
        blob: Vec<u8>,
    },
    /// Everything up to `index` (of `term`) is in the snapshot, with this configuration.
    Snapshot {
        index: u64,
        term: u64,
        conf_state: ConfState,
    },
}

pub(crate) fn encode_header() -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..5].copy_from_slice(MAGIC);
    h[5..].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h
}

/// What the first bytes of a file say about it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HeaderCheck {
    /// A complete header of the version this build reads.
    Valid,
    /// Shorter than a header but a prefix of ours (including empty): a crash during creation.
    Incomplete,
    /// Not our file, or a version we cannot read; the string says why.
    Refused { offset: u64, reason: String },
}

pub(crate) fn check_header(bytes: &[u8]) -> HeaderCheck {
    let ours = encode_header();
    let magic_len = bytes.len().min(MAGIC.len());
    if bytes[..magic_len] != MAGIC[..magic_len] {
        return HeaderCheck::Refused {
            offset: 0,
            reason: format!(
                "not a redis-raft log file (expected magic \"RRLOG\", found {:?})",
                String::from_utf8_lossy(&bytes[..magic_len])
            ),
        };
    }
    if bytes.len() < ours.len() {
        if bytes == &ours[..bytes.len()] {
            return HeaderCheck::Incomplete;
        }
        return HeaderCheck::Refused {
            offset: MAGIC.len() as u64,
            reason: "truncated header with an unsupported log format version".to_string(),
        };
    }
    let mut v = [0u8; 4];
    v.copy_from_slice(&bytes[MAGIC.len()..ours.len()]);
    let version = u32::from_le_bytes(v);
    if !(FORMAT_VERSION_MIN..=FORMAT_VERSION).contains(&version) {
        return HeaderCheck::Refused {
            offset: MAGIC.len() as u64,
            reason: format!(
                "unsupported log format version {version} (this build reads version {FORMAT_VERSION})"
            ),
        };
    }
    HeaderCheck::Valid
}

/// Why a record could not be encoded. The output buffer is left as it was.
#[derive(Debug)]
pub(crate) enum EncodeError {
    /// The record would exceed its format's maximum payload size.
    TooLarge {
        payload_bytes: u64,
        max_bytes: u64,
    },
    Prost(prost::EncodeError),
}

impl std::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EncodeError::TooLarge {
                payload_bytes,
                max_bytes,
            } => write!(
                f,
                "record of {payload_bytes} bytes exceeds the maximum of {max_bytes} bytes"
            ),
            EncodeError::Prost(e) => write!(f, "cannot encode record: {e}"),
        }
    }
}

fn push_frame(
    out: &mut Vec<u8>,
    kind: u8,
    body_len: usize,
    write_body: impl FnOnce(&mut Vec<u8>) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    push_frame_max(out, kind, body_len, RECORD_PAYLOAD_MAX_BYTES, write_body)
}

/// Appends one record `len crc kind body` to `out`, `write_body` writing exactly `body_len`
/// bytes. The framing is shared with the snapshot file (`snapshot/format.rs`), which has
/// its own kinds and its own `max_payload_bytes` (below 4 GiB, the u32 length field).
pub(crate) fn push_frame_max(
    out: &mut Vec<u8>,
    kind: u8,
    body_len: usize,
    max_payload_bytes: u64,
    write_body: impl FnOnce(&mut Vec<u8>) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    debug_assert!(max_payload_bytes <= u64::from(u32::MAX));
    let payload_bytes = body_len as u64 + 1;
    if payload_bytes > max_payload_bytes {
        return Err(EncodeError::TooLarge {
            payload_bytes,
            max_bytes: max_payload_bytes,
        });
    }
    let start = out.len();
    out.reserve(FRAME_HEADER_LEN as usize + payload_bytes as usize);
    out.extend_from_slice(&[0u8; FRAME_HEADER_LEN as usize]);
    out.push(kind);
    if let Err(e) = write_body(out) {
        out.truncate(start);
        return Err(e);
    }
    let payload_start = start + FRAME_HEADER_LEN as usize;
    debug_assert_eq!(out.len() - payload_start, payload_bytes as usize);
    let crc = crc32fast::hash(&out[payload_start..]);
    // Lossless: payload_bytes <= max_payload_bytes <= u32::MAX.
    out[start..start + 4].copy_from_slice(&(payload_bytes as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

fn push_message<M: prost::Message>(out: &mut Vec<u8>, kind: u8, m: &M) -> Result<(), EncodeError> {
    push_frame(out, kind, m.encoded_len(), |out| {
        m.encode(out).map_err(EncodeError::Prost)
    })
}

pub(crate) fn encode_entry(out: &mut Vec<u8>, e: &Entry) -> Result<(), EncodeError> {
    push_message(out, KIND_ENTRY, e)
}

pub(crate) fn encode_hard_state(out: &mut Vec<u8>, hs: &HardState) -> Result<(), EncodeError> {
    push_message(out, KIND_HARD_STATE, hs)
}

pub(crate) fn encode_conf_state(out: &mut Vec<u8>, cs: &ConfState) -> Result<(), EncodeError> {
    push_message(out, KIND_CONF_STATE, cs)
}

pub(crate) fn encode_commit(out: &mut Vec<u8>, commit: u64) -> Result<(), EncodeError> {
    push_frame(out, KIND_COMMIT, 8, |out| {
        out.extend_from_slice(&commit.to_le_bytes());
        Ok(())
    })
}

pub(crate) fn encode_membership(
    out: &mut Vec<u8>,
    index: u64,
    blob: &[u8],
) -> Result<(), EncodeError> {
    push_frame(out, KIND_MEMBERSHIP, 8 + blob.len(), |out| {
        out.extend_from_slice(&index.to_le_bytes());
        out.extend_from_slice(blob);
        Ok(())
    })
}

pub(crate) fn encode_snapshot(
    out: &mut Vec<u8>,
    index: u64,
    term: u64,
    cs: &ConfState,
) -> Result<(), EncodeError> {
    push_frame(out, KIND_SNAPSHOT, 16 + cs.encoded_len(), |out| {
        out.extend_from_slice(&index.to_le_bytes());
        out.extend_from_slice(&term.to_le_bytes());
        cs.encode(out).map_err(EncodeError::Prost)
    })
}

/// A record header's payload length and CRC.
pub(crate) fn parse_frame_header(frame: &[u8; FRAME_HEADER_LEN as usize]) -> (u64, u32) {
    let len = u64::from(u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]));
    let crc = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
    (len, crc)
}

/// Checks that `bytes` is a run of whole records whose CRCs match (what a compaction copies
/// from the old file without decoding it): the first bad one's offset in `bytes` and why.
pub(crate) fn check_frames(bytes: &[u8]) -> Result<(), (usize, String)> {
    let mut at = 0;
    // Bounded: every iteration advances `at` by at least FRAME_HEADER_LEN or returns.
    while at < bytes.len() {
        let header_end = at + FRAME_HEADER_LEN as usize;
        let Some(frame) = bytes.get(at..header_end) else {
            return Err((at, "ends inside a record header".into()));
        };
        let mut header = [0u8; FRAME_HEADER_LEN as usize];
        header.copy_from_slice(frame);
        let (len, crc) = parse_frame_header(&header);
        let end = usize::try_from(len)
            .ok()
            .and_then(|len| header_end.checked_add(len))
            .filter(|end| *end <= bytes.len() && len > 0);
        let Some(end) = end else {
            return Err((at, format!("a record of {len} bytes does not fit")));
        };
        if crc32fast::hash(&bytes[header_end..end]) != crc {
            return Err((at, "CRC mismatch".into()));
        }
        at = end;
    }
    Ok(())
}

/// Decodes a payload whose CRC already matched.
pub(crate) fn decode_payload(payload: &[u8]) -> Result<Record, String> {
    let Some((&kind, body)) = payload.split_first() else {
        return Err("empty record payload".to_string());
    };
    match kind {
        KIND_ENTRY => {
            let e =
                Entry::decode(body).map_err(|err| format!("undecodable entry record: {err}"))?;
            // raft-rs panics on an unknown entry type, so refuse it here instead.
            if EntryType::from_i32(e.entry_type).is_none() {
                return Err(format!(
                    "entry record with unknown entry type {} at index {}",
                    e.entry_type, e.index
                ));
            }
            Ok(Record::Entry(e))
        }
        KIND_HARD_STATE => HardState::decode(body)
            .map(Record::HardState)
            .map_err(|err| format!("undecodable hard state record: {err}")),
        KIND_CONF_STATE => ConfState::decode(body)
            .map(Record::ConfState)
            .map_err(|err| format!("undecodable conf state record: {err}")),
        KIND_COMMIT => {
            let bytes: [u8; 8] = body.try_into().map_err(|_| {
                format!(
                    "commit record has a {}-byte body, expected 8 bytes",
                    body.len()
                )
            })?;
            Ok(Record::Commit(u64::from_le_bytes(bytes)))
        }
        KIND_MEMBERSHIP => {
            let (index, blob) = body.split_at_checked(8).ok_or_else(|| {
                format!(
                    "membership record of {} bytes, at least 8 expected",
                    body.len()
                )
            })?;
            let mut a = [0u8; 8];
            a.copy_from_slice(index);
            Ok(Record::Membership {
                index: u64::from_le_bytes(a),
                blob: blob.to_vec(),
            })
        }
        KIND_SNAPSHOT => {
            if body.len() < 16 {
                return Err(format!(
                    "snapshot record of {} bytes, at least 16 expected",
                    body.len()
                ));
            }
            let word = |i: usize| {
                let mut a = [0u8; 8];
                a.copy_from_slice(&body[i..i + 8]);
                u64::from_le_bytes(a)
            };
            let conf_state = ConfState::decode(&body[16..])
                .map_err(|err| format!("undecodable snapshot record: {err}"))?;
            Ok(Record::Snapshot {
                index: word(0),
                term: word(8),
                conf_state,
            })
        }
        other => Err(format!("unknown record kind {other}")),
    }
}

/// Decodes one whole entry record (`len crc payload`, exactly `frame.len()` bytes) read back
/// from the file: the length must match, the CRC must hold and the record must be an entry.
pub(crate) fn decode_entry_frame(frame: &[u8]) -> Result<Entry, String> {
    let Some((head, payload)) = frame.split_at_checked(FRAME_HEADER_LEN as usize) else {
        return Err(format!(
            "record of {} bytes is shorter than its header",
            frame.len()
        ));
    };
    let mut h = [0u8; FRAME_HEADER_LEN as usize];
    h.copy_from_slice(head);
    let (len, crc) = parse_frame_header(&h);
    if len != payload.len() as u64 {
        return Err(format!(
            "record length {len} where an entry record of {} bytes was expected",
            payload.len()
        ));
    }
    if crc32fast::hash(payload) != crc {
        return Err("crc mismatch".to_string());
    }
    match decode_payload(payload)? {
        Record::Entry(e) => Ok(e),
        _ => Err("expected an entry record, found a record of another kind".to_string()),
    }
}

/// How a successful scan ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ScanEnd {
    /// Byte offset just past the last good record; the file should be this long.
    pub(crate) good_end: u64,
    /// Set when bytes past `good_end` are a torn write to be dropped.
    pub(crate) torn: Option<TornTail>,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct TornTail {
    pub(crate) bytes: u64,
    pub(crate) why: &'static str,
}

/// Why a scan stopped without a usable result.
#[derive(Debug)]
pub(crate) enum ScanError {
    Io(io::Error),
    Corrupt { offset: u64, reason: String },
}

impl From<io::Error> for ScanError {
    fn from(e: io::Error) -> Self {
        ScanError::Io(e)
    }
}

/// Reads the records that follow the header. `reader` must be positioned just after the
/// header and `file_len` is the whole file's length. `on_record` gets each good record with
/// its offset and its length in the file (header included); an `Err(reason)` from it makes
/// that record corrupt.
pub(crate) fn scan<R: Read>(
    mut reader: R,
    file_len: u64,
    mut on_record: impl FnMut(u64, u64, Record) -> Result<(), String>,
) -> Result<ScanEnd, ScanError> {
    let mut offset = HEADER_LEN;
    let mut payload = Vec::new();
    // Bounded: every iteration advances `offset` by at least FRAME_HEADER_LEN or returns.
    loop {
        let remaining = file_len.saturating_sub(offset);
        if remaining == 0 {
            return Ok(ScanEnd {
                good_end: offset,
                torn: None,
            });
        }
        let torn = |why| {
            Ok(ScanEnd {
                good_end: offset,
                torn: Some(TornTail {
                    bytes: remaining,
                    why,
                }),
            })
        };
        if remaining < FRAME_HEADER_LEN {
            return torn("file ends inside a record header");
        }
        let mut frame = [0u8; FRAME_HEADER_LEN as usize];
        reader.read_exact(&mut frame)?;
        let (len, crc) = parse_frame_header(&frame);
        let after_header = remaining - FRAME_HEADER_LEN;

        if len == 0 {
            if after_header == 0 {
                return torn("last record is empty");
            }
            if after_header > TORN_TAIL_MAX_BYTES {
                // Longer than any write this log makes ahead: zeros (a file system that
                // extended the file first), or damage.
                if frame == [0u8; 8] && rest_is_zero(&mut reader, after_header)? {
                    return torn(ZERO_TAIL);
                }
                return Err(ScanError::Corrupt {
                    offset,
                    reason: "zero-length record".to_string(),
                });
            }
            // Lossless: bounded just above.
            let mut rest = vec![0u8; after_header as usize];
            reader.read_exact(&mut rest)?;
            if frame == [0u8; 8] && rest.iter().all(|&b| b == 0) {
                return torn(ZERO_TAIL);
            }
            return damaged_before_the_end(
                &mut reader,
                &frame,
                &rest,
                0,
                offset,
                "zero-length record".to_string(),
                torn("damaged last record"),
            );
        }
        if len > RECORD_PAYLOAD_MAX_BYTES {
            if after_header == 0 {
                return torn("last record header has an impossible length");
            }
            return damaged_before_the_end(
                &mut reader,
                &frame,
                &[],
                after_header,
                offset,
                format!("impossible record length {len} (maximum {RECORD_PAYLOAD_MAX_BYTES})"),
                torn("damaged last record"),
            );
        }
        if len > after_header {
            // The file ends inside this record's payload. Normally a crash mid-write; but if
            // a length field was damaged, real records follow, and those must not be dropped.
            // Lossless: after_header < len <= RECORD_PAYLOAD_MAX_BYTES.
            let mut rest = vec![0u8; after_header as usize];
            reader.read_exact(&mut rest)?;
            if let Some(at) = find_valid_frame(&rest) {
                return Err(ScanError::Corrupt {
                    offset,
                    reason: format!(
                        "record length {len} runs past end of file, but a valid record \
                         follows at byte offset {}",
                        offset + FRAME_HEADER_LEN + at as u64
                    ),
                });
            }
            return torn("file ends inside a record");
        }

        payload.clear();
        payload.resize(len as usize, 0);
        reader.read_exact(&mut payload)?;
        let end = offset + FRAME_HEADER_LEN + len;
        if crc32fast::hash(&payload) != crc {
            if end == file_len {
                if let Some(at) = find_valid_frame(&payload) {
                    return Err(ScanError::Corrupt {
                        offset,
                        reason: format!(
                            "crc mismatch in the last record, which contains a valid record \
                             at byte offset {}",
                            offset + FRAME_HEADER_LEN + at as u64
                        ),
                    });
                }
                return torn("crc mismatch in the last record");
            }
            return damaged_before_the_end(
                &mut reader,
                &frame,
                &payload,
                file_len - end,
                offset,
                "crc mismatch".to_string(),
                torn("crc mismatch in the last record"),
            );
        }
        let record =
            decode_payload(&payload).map_err(|reason| ScanError::Corrupt { offset, reason })?;
        on_record(offset, end - offset, record)
            .map_err(|reason| ScanError::Corrupt { offset, reason })?;
        offset = end;
    }
}

/// A damaged record at `offset` that does not end the file: `frame` is its header, `read`
/// what was read after it, `unread` the bytes from there to the end of the file. A crash
/// while writing into preallocated space leaves such a record followed by zeros, or, when
/// the disk wrote the write's pages out of order, by some of the records written after it
/// (never acknowledged: the write's fsync did not return). It is a torn tail (`torn`), as at
/// the end of a file, when the rest of the file is short enough to be one such write and
/// either holds no valid record or a whole page of zeros lies between the damage and the
/// next valid record; otherwise the log is damaged in the middle (`reason`). A page of a
/// record that was on disk turned to zeros, an unlikely kind of damage, would be taken for a
/// torn write, as databases that preallocate their logs also do.
fn damaged_before_the_end<R: Read>(
    reader: &mut R,
    frame: &[u8],
    read: &[u8],
    unread: u64,
    offset: u64,
    reason: String,
    torn: Result<ScanEnd, ScanError>,
) -> Result<ScanEnd, ScanError> {
    let corrupt = |reason: String| Err(ScanError::Corrupt { offset, reason });
    if unread > TORN_TAIL_MAX_BYTES {
        return corrupt(reason);
    }
    let mut rest = frame.to_vec();
    rest.extend_from_slice(read);
    let at = rest.len();
    // Lossless: bounded just above.
    rest.resize(at + unread as usize, 0);
    reader.read_exact(&mut rest[at..])?;
    let hdr = FRAME_HEADER_LEN as usize;
    let Some(p) = rest.get(hdr..).and_then(find_valid_frame) else {
        return torn;
    };
    if has_zero_page(&rest[..hdr + p], offset) {
        return torn;
    }
    corrupt(format!(
        "{reason}; a valid record follows at byte offset {}",
        offset + FRAME_HEADER_LEN + p as u64
    ))
}

/// Whether `bytes`, which start at file offset `at`, include a whole page-aligned page of
/// zeros.
fn has_zero_page(bytes: &[u8], at: u64) -> bool {
    let end = at + bytes.len() as u64;
    let mut page = at.div_ceil(PAGE_BYTES) * PAGE_BYTES;
    while page + PAGE_BYTES <= end {
        let from = (page - at) as usize;
        if bytes[from..from + PAGE_BYTES as usize]
            .iter()
            .all(|&b| b == 0)
        {
            return true;
        }
        page += PAGE_BYTES;
    }
    false
}

fn rest_is_zero<R: Read>(reader: &mut R, mut bytes: u64) -> io::Result<bool> {
    let mut chunk = vec![0u8; ZERO_CHECK_CHUNK_BYTES];
    while bytes > 0 {
        let n = bytes.min(ZERO_CHECK_CHUNK_BYTES as u64) as usize;
        reader.read_exact(&mut chunk[..n])?;
        if chunk[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        bytes -= n as u64;
    }
    Ok(true)
}

/// Position of the first complete, CRC-valid record of a known kind inside `bytes`, if any.
/// Used before dropping a damaged tail: a crash leaves a prefix of one record there, never a
/// further whole record.
fn find_valid_frame(bytes: &[u8]) -> Option<usize> {
    let hdr = FRAME_HEADER_LEN as usize;
    (0..bytes.len()).find(|&p| {
        let Some(frame) = bytes.get(p..p + hdr) else {
            return false;
        };
        let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
        let crc = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
        if len == 0 || len as u64 > RECORD_PAYLOAD_MAX_BYTES {
            return false;
        }
        let Some(payload) = bytes.get(p + hdr..p + hdr + len) else {
            return false;
        };
        (KIND_ENTRY..=KIND_SNAPSHOT).contains(&payload[0])
            && crc32fast::hash(payload) == crc
            && decode_payload(payload).is_ok()
    })
}
