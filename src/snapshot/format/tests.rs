use std::path::Path;

use super::*;

fn sample_keys() -> Vec<KeyRecord> {
    vec![
        KeyRecord {
            db: 0,
            key: b"string".to_vec(),
            expire_at_ms: None,
            payload: b"\x00\x03abc\x0a\x00payload".to_vec(),
        },
        KeyRecord {
            db: 3,
            key: Vec::new(),
            expire_at_ms: Some(1_900_000_000_123),
            payload: Vec::new(),
        },
        KeyRecord {
            db: 15,
            key: vec![0, 255, b'\r', b'\n'],
            expire_at_ms: Some(0),
            payload: vec![7u8; 300_000],
        },
    ]
}

fn header() -> SnapshotHeader {
    SnapshotHeader {
        index: 42,
        term: 7,
        meta: b"membership".to_vec(),
    }
}

fn write(path: &Path, header: &SnapshotHeader, keys: &[KeyRecord]) -> SnapshotSummary {
    let mut w = SnapshotWriter::create(path, header).unwrap();
    for k in keys {
        w.write_key(k.db, &k.key, k.expire_at_ms, &k.payload)
            .unwrap();
    }
    assert_eq!(w.keys_written(), keys.len() as u64);
    w.finish().unwrap()
}

fn read_all(path: &Path) -> Result<(SnapshotHeader, Vec<KeyRecord>), SnapshotError> {
    let r = SnapshotReader::open(path)?;
    let h = r.header().clone();
    let keys = r.collect::<Result<Vec<_>, _>>()?;
    Ok((h, keys))
}

#[test]
fn round_trip_keeps_header_and_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("snap.tmp");
    let dest = dir.path().join("snap");
    let keys = sample_keys();
    let summary = write(&tmp, &header(), &keys);
    install(&tmp, &dest).unwrap();
    assert!(!tmp.exists());
    let len = std::fs::metadata(&dest).unwrap().len();
    assert_eq!(
        summary,
        SnapshotSummary {
            header: header(),
            keys: 3,
            bytes: len
        }
    );
    let (h, read) = read_all(&dest).unwrap();
    assert_eq!(h, header());
    assert_eq!(read, keys);
    assert_eq!(verify(&dest).unwrap(), summary);
    assert_eq!(inspect(&dest).unwrap(), summary);
}

#[test]
fn empty_snapshot_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("snap");
    let h = SnapshotHeader::default();
    let s = write(&p, &h, &[]);
    assert_eq!(s.keys, 0);
    assert_eq!(s.bytes, 12 + 8 + 1 + 20 + END_RECORD_LEN);
    assert_eq!(read_all(&p).unwrap(), (h, Vec::new()));
    assert_eq!(verify(&p).unwrap(), s);
}

#[test]
fn install_replaces_the_previous_file() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("snap");
    let tmp = dir.path().join("snap.tmp");
    write(&tmp, &header(), &sample_keys());
    install(&tmp, &dest).unwrap();
    let h2 = SnapshotHeader {
        index: 100,
        term: 9,
        meta: Vec::new(),
    };
    write(&tmp, &h2, &[]);
    install(&tmp, &dest).unwrap();
    assert_eq!(read_all(&dest).unwrap(), (h2, Vec::new()));
}

/// Every prefix of a valid file is refused with a corruption error naming the file.
#[test]
fn every_truncation_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("snap");
    let keys: Vec<KeyRecord> = sample_keys()
        .into_iter()
        .map(|mut k| {
            k.payload.truncate(50);
            k
        })
        .collect();
    write(&p, &header(), &keys);
    let full = std::fs::read(&p).unwrap();
    let cut = dir.path().join("cut");
    for len in 0..full.len() {
        std::fs::write(&cut, &full[..len]).unwrap();
        let err = verify(&cut).expect_err(&format!("prefix of {len} bytes accepted"));
        let msg = err.to_string();
        assert!(
            matches!(err, SnapshotError::Corrupt { .. }),
            "prefix {len}: {msg}"
        );
        assert!(msg.contains(&cut.display().to_string()), "{msg}");
        assert!(msg.contains("byte offset"), "{msg}");
        assert!(inspect(&cut).is_err(), "inspect accepted prefix {len}");
    }
    // The reader hands out the keys before the cut, then the error.
    std::fs::write(&cut, &full[..full.len() - 1]).unwrap();
    let results: Vec<_> = SnapshotReader::open(&cut).unwrap().collect();
    assert_eq!(results.len(), 4);
    assert!(results[..3].iter().all(|r| r.is_ok()));
    let msg = results[3].as_ref().unwrap_err().to_string();
    assert!(msg.contains("truncated"), "{msg}");
}

/// Flipping any single byte of a valid file is detected.
#[test]
fn every_flipped_byte_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("snap");
    let keys: Vec<KeyRecord> = sample_keys()
        .into_iter()
        .map(|mut k| {
            k.payload.truncate(50);
            k
        })
        .collect();
    write(&p, &header(), &keys);
    let full = std::fs::read(&p).unwrap();
    let bad = dir.path().join("bad");
    for i in 0..full.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut b = full.clone();
            b[i] ^= mask;
            std::fs::write(&bad, &b).unwrap();
            let err = verify(&bad).expect_err(&format!("flip {mask:#x} at {i} accepted"));
            assert!(
                matches!(err, SnapshotError::Corrupt { .. }),
                "flip at {i}: {err}"
            );
        }
    }
}

#[test]
fn trailing_bytes_after_the_end_record_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("snap");
    let s = write(&p, &header(), &sample_keys());
    let mut b = std::fs::read(&p).unwrap();
    b.extend_from_slice(b"xyz");
    std::fs::write(&p, &b).unwrap();
    let err = verify(&p).unwrap_err().to_string();
    assert!(
        err.ends_with(&format!(
            "is corrupt at byte offset {}: 3 bytes follow the end record",
            s.bytes
        )),
        "{err}"
    );
}

#[test]
fn foreign_file_and_unknown_version_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("snap");
    std::fs::write(&p, b"REDIS0010 this is an RDB file").unwrap();
    let err = verify(&p).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "snapshot {} is corrupt at byte offset 0: not a redis-raft snapshot file (bad magic)",
            p.display()
        )
    );
    write(&p, &header(), &[]);
    let mut b = std::fs::read(&p).unwrap();
    b[8] = 2;
    std::fs::write(&p, &b).unwrap();
    let err = verify(&p).unwrap_err().to_string();
    assert!(
        err.ends_with(
            "byte offset 8: unsupported snapshot format version 2 (this build reads version 1)"
        ),
        "{err}"
    );
    let err = verify(&dir.path().join("missing")).unwrap_err().to_string();
    assert!(err.contains("missing: open: "), "{err}");
}

/// A huge length field is refused before anything is allocated for it.
#[test]
fn absurd_lengths_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("snap");
    write(&p, &header(), &[]);
    let good = std::fs::read(&p).unwrap();
    let end_at = good.len() - END_RECORD_LEN as usize;

    // A record header claiming 4 GiB - 1.
    let mut b = good[..end_at].to_vec();
    b.extend_from_slice(&u32::MAX.to_le_bytes());
    b.extend_from_slice(&[0u8; 4]);
    b.extend_from_slice(&[0u8; 64]);
    std::fs::write(&p, &b).unwrap();
    let err = verify(&p).unwrap_err().to_string();
    assert!(
        err.ends_with(&format!(
            "byte offset {end_at}: impossible record length 4294967295 (maximum 2147483648)"
        )),
        "{err}"
    );

    // Within the limit but past the end of the file.
    let mut b = good[..end_at].to_vec();
    b.extend_from_slice(&1000u32.to_le_bytes());
    b.extend_from_slice(&[0u8; 4]);
    b.extend_from_slice(&[0u8; 64]);
    std::fs::write(&p, &b).unwrap();
    let err = verify(&p).unwrap_err().to_string();
    assert!(
        err.contains("record of 1000 bytes runs past the end of the file (64 bytes left"),
        "{err}"
    );

    // A CRC-valid key record whose key length is absurd.
    let mut b = good[..end_at].to_vec();
    let mut body = Vec::new();
    body.extend_from_slice(&0i32.to_le_bytes());
    body.extend_from_slice(&u32::MAX.to_le_bytes());
    record::push_frame_max(&mut b, KIND_KEY, body.len(), RECORD_MAX_BYTES, |out| {
        out.extend_from_slice(&body);
        Ok(())
    })
    .unwrap();
    std::fs::write(&p, &b).unwrap();
    let err = verify(&p).unwrap_err().to_string();
    assert!(
        err.ends_with(&format!(
            "byte offset {end_at}: key length 4294967295 exceeds the maximum of 536870912 bytes"
        )),
        "{err}"
    );
}

#[test]
fn a_wrong_key_count_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("snap");
    write(&p, &header(), &sample_keys()[..1]);
    let b = std::fs::read(&p).unwrap();
    let end_at = b.len() - END_RECORD_LEN as usize;
    let mut forged = b[..end_at].to_vec();
    let crc = crc32fast::hash(&forged);
    record::push_frame_max(&mut forged, KIND_END, 12, RECORD_MAX_BYTES, |out| {
        out.extend_from_slice(&5u64.to_le_bytes());
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(())
    })
    .unwrap();
    std::fs::write(&p, &forged).unwrap();
    let err = verify(&p).unwrap_err().to_string();
    assert!(
        err.ends_with(&format!(
            "byte offset {end_at}: end record counts 5 keys, the file holds 1"
        )),
        "{err}"
    );
}
