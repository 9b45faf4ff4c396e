//! The snapshot file's byte layout, and nothing else. Pure Rust: no Redis API here.
//!
//! ```text
//! file     := magic version record* end
//! magic    := "RRSNAP\r\n"                                   (8 bytes)
//! version  := u32 LE                                         (= FORMAT_VERSION)
//! record   := len:u32 LE  crc:u32 LE  kind:u8 body           (len = 1 + body length,
//!                                                              crc = CRC-32 (IEEE) of kind+body;
//!                                                              the framing of storage/record.rs)
//!   kind 1 = Header  body = index:u64 term:u64 meta_len:u32 meta[meta_len]   (exactly once, first)
//!   kind 2 = Key     body = db:i32 key_len:u32 key[key_len] expire_ms:i64 payload[rest]
//!                    (expire_ms: absolute unix time in ms, -1 = no expiry;
//!                     payload: the key's DUMP serialization)
//!   kind 3 = End     body = keys:u64 file_crc:u32                            (exactly once, last)
//!                    (keys: number of Key records; file_crc: CRC-32 of every byte before
//!                     this record, magic included)
//! ```
//! All integers little-endian. Nothing may follow the End record.
//!
//! Files are written to a temporary path, fsynced, then renamed into place with the directory
//! fsynced (`SnapshotWriter::finish` then `install`), so a reader sees either the old file or
//! a complete new one. A reader checks every record's CRC, the End record's count and
//! whole-file CRC, and refuses lengths beyond the limits below or beyond the end of the file,
//! so a truncated, damaged or foreign file is an error naming the file and byte offset, never
//! a huge allocation or a panic.
//!
//! A change to any of this bumps `FORMAT_VERSION`; readers refuse versions they do not know.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::storage::record::{self, EncodeError};

pub const MAGIC: &[u8; 8] = b"RRSNAP\r\n";
pub const FORMAT_VERSION: u32 = 1;
const PREAMBLE_LEN: u64 = 12;
const FRAME_HEADER_LEN: u64 = 8;

/// Largest record (kind byte and body). A key whose DUMP payload is larger cannot be saved.
pub const RECORD_MAX_BYTES: u64 = 2 << 30;
/// Largest key name (Redis's own limit for a string is 512 MiB).
pub const KEY_MAX_BYTES: u64 = 512 << 20;
/// Largest opaque metadata blob in the header.
pub const META_MAX_BYTES: u64 = 64 << 20;

const KIND_HEADER: u8 = 1;
const KIND_KEY: u8 = 2;
const KIND_END: u8 = 3;

/// 8 (frame header) + 1 (kind) + 8 (keys) + 4 (file crc).
const END_RECORD_LEN: u64 = FRAME_HEADER_LEN + 1 + 8 + 4;
/// Fixed part of a Key body: db, key_len, expire_ms.
const KEY_FIXED_BYTES: usize = 4 + 4 + 8;
/// Fixed part of a Header body: index, term, meta_len.
const HEADER_FIXED_BYTES: usize = 8 + 8 + 4;

const WRITE_BUFFER_BYTES: usize = 1 << 20;
const READ_BUFFER_BYTES: usize = 256 << 10;

/// The Raft position a snapshot stands for, written first in the file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// Last Raft index applied to the dataset in the file.
    pub index: u64,
    /// Term of that entry.
    pub term: u64,
    /// Opaque to this module; holds the membership and what applying built
    /// (`codec::encode_snapshot_meta`).
    pub meta: Vec<u8>,
}

/// One key of the dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    /// Redis database number.
    pub db: i32,
    pub key: Vec<u8>,
    /// Absolute expiry, unix time in milliseconds; `None` for a persistent key.
    pub expire_at_ms: Option<i64>,
    /// The key's `DUMP` payload, for `RESTORE`.
    pub payload: Vec<u8>,
}

/// What a complete, checked file holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotSummary {
    pub header: SnapshotHeader,
    /// Number of keys in the file.
    pub keys: u64,
    /// File size in bytes.
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {}: {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error("snapshot {} is corrupt at byte offset {offset}: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("snapshot {}: {reason}", path.display())]
    TooLarge { path: PathBuf, reason: String },
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Writes a snapshot file front to back. Buffered; nothing is durable before `finish`.
pub struct SnapshotWriter {
    file: BufWriter<File>,
    path: PathBuf,
    /// CRC of every byte written so far (for the End record).
    crc: crc32fast::Hasher,
    bytes: u64,
    keys: u64,
    frame: Vec<u8>,
    header: SnapshotHeader,
}

impl SnapshotWriter {
    /// Creates (or truncates) `path` and writes the preamble and the header record.
    /// `path` should be a temporary name; `install` moves the finished file into place.
    pub fn create(path: &Path, header: &SnapshotHeader) -> Result<SnapshotWriter, SnapshotError> {
        if header.meta.len() as u64 > META_MAX_BYTES {
            return Err(SnapshotError::TooLarge {
                path: path.to_path_buf(),
                reason: format!(
                    "header metadata of {} bytes exceeds the maximum of {META_MAX_BYTES} bytes",
                    header.meta.len()
                ),
            });
        }
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io_err(path, "create"))?;
        let mut w = SnapshotWriter {
            file: BufWriter::with_capacity(WRITE_BUFFER_BYTES, file),
            path: path.to_path_buf(),
            crc: crc32fast::Hasher::new(),
            bytes: 0,
            keys: 0,
            frame: Vec::new(),
            header: header.clone(),
        };
        let mut pre = [0u8; PREAMBLE_LEN as usize];
        pre[..8].copy_from_slice(MAGIC);
        pre[8..].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        w.put(&pre)?;
        let body_len = HEADER_FIXED_BYTES + header.meta.len();
        let mut frame = std::mem::take(&mut w.frame);
        frame.clear();
        w.encode(&mut frame, KIND_HEADER, body_len, |out| {
            out.extend_from_slice(&header.index.to_le_bytes());
            out.extend_from_slice(&header.term.to_le_bytes());
            // Lossless: meta.len() <= META_MAX_BYTES.
            out.extend_from_slice(&(header.meta.len() as u32).to_le_bytes());
            out.extend_from_slice(&header.meta);
        })?;
        w.put(&frame)?;
        w.frame = frame;
        Ok(w)
    }

    /// Appends one key. `expire_at_ms` is absolute unix time in ms.
    pub fn write_key(
        &mut self,
        db: i32,
        key: &[u8],
        expire_at_ms: Option<i64>,
        payload: &[u8],
    ) -> Result<(), SnapshotError> {
        if key.len() as u64 > KEY_MAX_BYTES {
            return Err(SnapshotError::TooLarge {
                path: self.path.clone(),
                reason: format!(
                    "key of {} bytes exceeds the maximum of {KEY_MAX_BYTES} bytes",
                    key.len()
                ),
            });
        }
        let body_len = KEY_FIXED_BYTES + key.len() + payload.len();
        let mut frame = std::mem::take(&mut self.frame);
        frame.clear();
        let r = self.encode(&mut frame, KIND_KEY, body_len, |out| {
            out.extend_from_slice(&db.to_le_bytes());
            // Lossless: key.len() <= KEY_MAX_BYTES.
            out.extend_from_slice(&(key.len() as u32).to_le_bytes());
            out.extend_from_slice(key);
            out.extend_from_slice(&expire_at_ms.unwrap_or(-1).to_le_bytes());
            out.extend_from_slice(payload);
        });
        let r = r.and_then(|()| self.put(&frame));
        // Do not keep a huge buffer around after one huge key.
        if frame.capacity() <= WRITE_BUFFER_BYTES {
            self.frame = frame;
        }
        r?;
        self.keys += 1;
        Ok(())
    }

    /// Writes the End record, flushes and fsyncs the file. The file is complete and durable
    /// under its current (temporary) name; `install` publishes it.
    pub fn finish(mut self) -> Result<SnapshotSummary, SnapshotError> {
        let file_crc = self.crc.clone().finalize();
        let keys = self.keys;
        let mut frame = Vec::with_capacity(END_RECORD_LEN as usize);
        self.encode(&mut frame, KIND_END, 12, |out| {
            out.extend_from_slice(&keys.to_le_bytes());
            out.extend_from_slice(&file_crc.to_le_bytes());
        })?;
        self.put(&frame)?;
        let path = self.path.clone();
        let file = self.file.into_inner().map_err(|e| SnapshotError::Io {
            path: path.clone(),
            op: "write",
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io_err(&path, "fsync"))?;
        Ok(SnapshotSummary {
            header: self.header,
            keys,
            bytes: self.bytes,
        })
    }

    pub fn keys_written(&self) -> u64 {
        self.keys
    }

    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    fn encode(
        &self,
        out: &mut Vec<u8>,
        kind: u8,
        body_len: usize,
        body: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), SnapshotError> {
        record::push_frame_max(out, kind, body_len, RECORD_MAX_BYTES, |out| {
            body(out);
            Ok(())
        })
        .map_err(|e| match e {
            EncodeError::TooLarge { .. } => SnapshotError::TooLarge {
                path: self.path.clone(),
                reason: e.to_string(),
            },
            EncodeError::Prost(_) => unreachable!("no prost message in a snapshot record"),
        })
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), SnapshotError> {
        self.file
            .write_all(bytes)
            .map_err(io_err(&self.path, "write"))?;
        self.crc.update(bytes);
        self.bytes += bytes.len() as u64;
        Ok(())
    }
}

/// The temporary file a save writes before it is installed as `dest`.
pub fn tmp_path(dest: &Path) -> PathBuf {
    let mut s = dest.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Publishes a finished snapshot: renames `tmp` over `dest` and fsyncs the directory, so
/// after a crash `dest` is either the previous file or this one, never a mix.
pub fn install(tmp: &Path, dest: &Path) -> Result<(), SnapshotError> {
    std::fs::rename(tmp, dest).map_err(io_err(dest, "rename"))?;
    crate::storage::sync_parent_dir(dest).map_err(io_err(dest, "fsync directory"))
}

/// Reads a snapshot file front to back, checking as it goes; never holds more than one
/// record in memory. Iterating yields the keys; the iteration ends with `None` only after the
/// End record checked out (count, whole-file CRC, nothing after it). After an error it ends.
pub struct SnapshotReader {
    reader: BufReader<File>,
    path: PathBuf,
    file_len: u64,
    /// Offset of the next unread byte.
    offset: u64,
    crc: crc32fast::Hasher,
    header: SnapshotHeader,
    keys: u64,
    done: bool,
    payload: Vec<u8>,
}

impl SnapshotReader {
    /// Opens `path` and reads its header.
    pub fn open(path: &Path) -> Result<SnapshotReader, SnapshotError> {
        let file = File::open(path).map_err(io_err(path, "open"))?;
        SnapshotReader::from_file(file, path)
    }

    /// Reads from `file` (from its start; `path` is for messages). Lets a caller keep one open
    /// file across a check and a load even if the path is replaced meanwhile.
    pub fn from_file(mut file: File, path: &Path) -> Result<SnapshotReader, SnapshotError> {
        file.seek(SeekFrom::Start(0))
            .map_err(io_err(path, "seek"))?;
        let file_len = file.metadata().map_err(io_err(path, "stat"))?.len();
        let mut r = SnapshotReader {
            reader: BufReader::with_capacity(READ_BUFFER_BYTES, file),
            path: path.to_path_buf(),
            file_len,
            offset: 0,
            crc: crc32fast::Hasher::new(),
            header: SnapshotHeader::default(),
            keys: 0,
            done: false,
            payload: Vec::new(),
        };
        if file_len < PREAMBLE_LEN {
            let mut head = vec![0u8; file_len as usize];
            r.read_exact(&mut head)?;
            if MAGIC.starts_with(&head[..head.len().min(MAGIC.len())]) {
                return Err(r.corrupt(0, format!("file is only {file_len} bytes long (truncated)")));
            }
            return Err(r.corrupt(0, "not a redis-raft snapshot file (bad magic)".into()));
        }
        let mut pre = [0u8; PREAMBLE_LEN as usize];
        r.read_exact(&mut pre)?;
        if &pre[..8] != MAGIC {
            return Err(r.corrupt(0, "not a redis-raft snapshot file (bad magic)".into()));
        }
        let version = u32::from_le_bytes([pre[8], pre[9], pre[10], pre[11]]);
        if version != FORMAT_VERSION {
            return Err(r.corrupt(
                8,
                format!("unsupported snapshot format version {version} (this build reads version {FORMAT_VERSION})"),
            ));
        }
        let at = r.offset;
        let kind = r.read_record()?;
        if kind != KIND_HEADER {
            return Err(r.corrupt(at, format!("expected the header record, found kind {kind}")));
        }
        let header = decode_header(r.body()).map_err(|reason| r.corrupt(at, reason))?;
        r.header = header;
        Ok(r)
    }

    pub fn header(&self) -> &SnapshotHeader {
        &self.header
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the file in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Keys read so far.
    pub fn keys_read(&self) -> u64 {
        self.keys
    }

    /// The next key; `Ok(None)` once the End record has been read and checked.
    pub fn next_key(&mut self) -> Result<Option<KeyRecord>, SnapshotError> {
        if self.done {
            return Ok(None);
        }
        let r = self.next_key_inner();
        if !matches!(r, Ok(Some(_))) {
            self.done = true;
        }
        r
    }

    fn next_key_inner(&mut self) -> Result<Option<KeyRecord>, SnapshotError> {
        let at = self.offset;
        if at == self.file_len {
            return Err(self.corrupt(
                at,
                "file ends without its end record (truncated)".to_string(),
            ));
        }
        // The CRC the End record must carry covers everything before it.
        let crc_before = self.crc.clone().finalize();
        let kind = self.read_record()?;
        match kind {
            KIND_KEY => {
                let rec = decode_key(self.body()).map_err(|reason| self.corrupt(at, reason))?;
                self.keys += 1;
                Ok(Some(rec))
            }
            KIND_END => {
                let (keys, file_crc) =
                    decode_end(self.body()).map_err(|reason| self.corrupt(at, reason))?;
                if keys != self.keys {
                    return Err(self.corrupt(
                        at,
                        format!(
                            "end record counts {keys} keys, the file holds {}",
                            self.keys
                        ),
                    ));
                }
                if file_crc != crc_before {
                    return Err(self.corrupt(at, "whole-file crc mismatch".to_string()));
                }
                if self.offset != self.file_len {
                    return Err(self.corrupt(
                        self.offset,
                        format!(
                            "{} bytes follow the end record",
                            self.file_len - self.offset
                        ),
                    ));
                }
                Ok(None)
            }
            KIND_HEADER => Err(self.corrupt(at, "a second header record".to_string())),
            other => Err(self.corrupt(at, format!("unknown record kind {other}"))),
        }
    }

    /// The body of the record `read_record` just read.
    fn body(&self) -> &[u8] {
        self.payload.get(1..).unwrap_or(&[])
    }

    /// Reads one frame into `self.payload` (kind byte, then `body()`); returns its kind.
    fn read_record(&mut self) -> Result<u8, SnapshotError> {
        let at = self.offset;
        let remaining = self.file_len - at;
        if remaining < FRAME_HEADER_LEN {
            return Err(self.corrupt(at, "file ends inside a record header (truncated)".into()));
        }
        let mut frame = [0u8; FRAME_HEADER_LEN as usize];
        self.read_exact(&mut frame)?;
        let (len, crc) = record::parse_frame_header(&frame);
        if len == 0 {
            return Err(self.corrupt(at, "zero-length record".into()));
        }
        if len > RECORD_MAX_BYTES {
            return Err(self.corrupt(
                at,
                format!("impossible record length {len} (maximum {RECORD_MAX_BYTES})"),
            ));
        }
        if len > remaining - FRAME_HEADER_LEN {
            return Err(self.corrupt(
                at,
                format!(
                    "record of {len} bytes runs past the end of the file ({} bytes left; truncated?)",
                    remaining - FRAME_HEADER_LEN
                ),
            ));
        }
        let mut payload = std::mem::take(&mut self.payload);
        payload.clear();
        // Bounded by the file's remaining length and RECORD_MAX_BYTES, checked above.
        payload.resize(len as usize, 0);
        let read = self.read_exact(&mut payload);
        self.payload = payload;
        read?;
        if crc32fast::hash(&self.payload) != crc {
            return Err(self.corrupt(at, "record crc mismatch".into()));
        }
        if self.payload.capacity() > WRITE_BUFFER_BYTES && len as usize <= WRITE_BUFFER_BYTES {
            self.payload.shrink_to(WRITE_BUFFER_BYTES);
        }
        match self.payload.first() {
            Some(&kind) => Ok(kind),
            None => Err(self.corrupt(at, "empty record".into())),
        }
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), SnapshotError> {
        let at = self.offset;
        match self.reader.read_exact(buf) {
            Ok(()) => {
                self.crc.update(buf);
                self.offset += buf.len() as u64;
                Ok(())
            }
            // The file shrank since we measured it.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Err(self.corrupt(at, "file ends early (truncated while being read?)".into()))
            }
            Err(e) => Err(SnapshotError::Io {
                path: self.path.clone(),
                op: "read",
                source: e,
            }),
        }
    }

    fn corrupt(&self, offset: u64, reason: String) -> SnapshotError {
        SnapshotError::Corrupt {
            path: self.path.clone(),
            offset,
            reason,
        }
    }
}

impl Iterator for SnapshotReader {
    type Item = Result<KeyRecord, SnapshotError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_key().transpose()
    }
}

/// Reads the whole file and checks every record, the key count and the whole-file CRC.
/// Streams: memory use is one record.
pub fn verify(path: &Path) -> Result<SnapshotSummary, SnapshotError> {
    let file = File::open(path).map_err(io_err(path, "open"))?;
    verify_file(file, path).map(|(s, _)| s)
}

/// As `verify`, on an open file, which it hands back (for loading the same file afterwards).
pub fn verify_file(file: File, path: &Path) -> Result<(SnapshotSummary, File), SnapshotError> {
    verify_file_with(file, path, |_| {})
}

/// As `verify_file`, showing every key to `on_key` on the way.
pub fn verify_file_with(
    file: File,
    path: &Path,
    mut on_key: impl FnMut(&KeyRecord),
) -> Result<(SnapshotSummary, File), SnapshotError> {
    let mut r = SnapshotReader::from_file(file, path)?;
    while let Some(k) = r.next_key()? {
        on_key(&k);
    }
    let summary = SnapshotSummary {
        header: r.header.clone(),
        keys: r.keys,
        bytes: r.file_len,
    };
    Ok((summary, r.reader.into_inner()))
}

/// Reads only the header and the End record (cheap, for a file this node wrote): position,
/// key count and size. Does not check the key records; `verify` does.
pub fn inspect(path: &Path) -> Result<SnapshotSummary, SnapshotError> {
    let r = SnapshotReader::open(path)?;
    let header = r.header.clone();
    let file_len = r.file_len;
    let mut file = r.reader.into_inner();
    let at = file_len
        .checked_sub(END_RECORD_LEN)
        .filter(|&at| at >= r.offset)
        .ok_or_else(|| SnapshotError::Corrupt {
            path: path.to_path_buf(),
            offset: file_len,
            reason: "file too short for its end record (truncated)".into(),
        })?;
    let mut end = [0u8; END_RECORD_LEN as usize];
    file.seek(SeekFrom::Start(at))
        .and_then(|_| file.read_exact(&mut end))
        .map_err(io_err(path, "read"))?;
    let corrupt = |reason: String| SnapshotError::Corrupt {
        path: path.to_path_buf(),
        offset: at,
        reason,
    };
    let frame: [u8; FRAME_HEADER_LEN as usize] = [
        end[0], end[1], end[2], end[3], end[4], end[5], end[6], end[7],
    ];
    let (len, crc) = record::parse_frame_header(&frame);
    let payload = &end[FRAME_HEADER_LEN as usize..];
    if len != payload.len() as u64 || crc32fast::hash(payload) != crc || payload[0] != KIND_END {
        return Err(corrupt(
            "no valid end record at the end of the file (truncated?)".into(),
        ));
    }
    let (keys, _) = decode_end(&payload[1..]).map_err(corrupt)?;
    Ok(SnapshotSummary {
        header,
        keys,
        bytes: file_len,
    })
}

fn take<'a>(body: &mut &'a [u8], n: usize, what: &str) -> Result<&'a [u8], String> {
    if body.len() < n {
        return Err(format!(
            "record too short for its {what} ({} bytes left, {n} needed)",
            body.len()
        ));
    }
    let (head, rest) = body.split_at(n);
    *body = rest;
    Ok(head)
}

fn take_u64(body: &mut &[u8], what: &str) -> Result<u64, String> {
    let b = take(body, 8, what)?;
    Ok(u64::from_le_bytes([
        b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
    ]))
}

fn take_u32(body: &mut &[u8], what: &str) -> Result<u32, String> {
    let b = take(body, 4, what)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn decode_header(mut body: &[u8]) -> Result<SnapshotHeader, String> {
    let index = take_u64(&mut body, "index")?;
    let term = take_u64(&mut body, "term")?;
    let meta_len = u64::from(take_u32(&mut body, "metadata length")?);
    if meta_len > META_MAX_BYTES {
        return Err(format!(
            "header metadata length {meta_len} exceeds the maximum of {META_MAX_BYTES} bytes"
        ));
    }
    // Lossless: meta_len <= META_MAX_BYTES.
    let meta = take(&mut body, meta_len as usize, "metadata")?.to_vec();
    if !body.is_empty() {
        return Err(format!("{} unexpected bytes after the header", body.len()));
    }
    Ok(SnapshotHeader { index, term, meta })
}

fn decode_key(mut body: &[u8]) -> Result<KeyRecord, String> {
    let db = take_u32(&mut body, "database")? as i32;
    let key_len = u64::from(take_u32(&mut body, "key length")?);
    if key_len > KEY_MAX_BYTES {
        return Err(format!(
            "key length {key_len} exceeds the maximum of {KEY_MAX_BYTES} bytes"
        ));
    }
    // Lossless: key_len <= KEY_MAX_BYTES.
    let key = take(&mut body, key_len as usize, "key")?.to_vec();
    let expire = take_u64(&mut body, "expiry")? as i64;
    let expire_at_ms = match expire {
        -1 => None,
        ms if ms >= 0 => Some(ms),
        ms => return Err(format!("invalid expiry {ms}")),
    };
    if db < 0 {
        return Err(format!("invalid database number {db}"));
    }
    Ok(KeyRecord {
        db,
        key,
        expire_at_ms,
        payload: body.to_vec(),
    })
}

fn decode_end(mut body: &[u8]) -> Result<(u64, u32), String> {
    let keys = take_u64(&mut body, "key count")?;
    let crc = take_u32(&mut body, "file crc")?;
    if !body.is_empty() {
        return Err(format!("{} unexpected bytes in the end record", body.len()));
    }
    Ok((keys, crc))
}

#[cfg(test)]
mod tests;
