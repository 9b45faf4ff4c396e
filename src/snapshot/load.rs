//! Loading a snapshot file into the live dataset without blocking the main thread for long.
//!
//! 1. Check: a background thread reads the whole file and checks every record, the key count
//!    and the whole-file CRC. A bad file ends the load here with `LoadError::Invalid`, and
//!    the dataset is untouched.
//!    Keys of module data types get one more check first: Redis 7.0 terminates the whole
//!    server when RESTORE meets a module type it does not have (outside a client's command,
//!    as here), so one key of each module type in the file is restored first in a forked
//!    child (`RedisModule_Fork`), where that would only end the child. If that fails, the load
//!    ends with `LoadError::ModuleTypes`, the dataset untouched; it also fails that way when
//!    another child process (a snapshot save, a BGSAVE) is running at that moment.
//! 2. Flush: all databases are emptied (`RedisModule_ResetDataset`, freeing in the background).
//! 3. Restore in slices: a 0 ms timer restores up to `LoadOptions::keys_per_slice` keys or
//!    for `LoadOptions::slice_time_max`, whichever ends first (at least one key), with
//!    `RESTORE key ttl payload ABSTTL REPLACE` in the key's database, reports progress and
//!    re-arms itself; Redis serves its clients between slices. A failure here (a record that
//!    no longer reads back, or a payload this server cannot RESTORE, e.g. a module type it
//!    lacks) ends the load with `LoadError::Restore`: the dataset then holds part of the
//!    snapshot and the caller must not serve it.
//!
//! The same open file is used for the check and the restore, so replacing the path meanwhile
//! does not mix two snapshots. Between slices the event loop runs: the caller decides what
//! clients see meanwhile (the Raft side answers -LOADING), and must not write to the dataset.
//! Keys whose absolute expiry has passed are not created (RESTORE ... ABSTTL skips them).
//!
//! Invariant: `LOAD` is touched only on the main thread; the checking thread only reads the
//! file and hands its result back through `RedisModule_EventLoopAddOneShot`.

#![allow(clippy::not_unsafe_ptr_arg_deref)]

use std::ffi::c_void;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::format::{self, KeyRecord, SnapshotError, SnapshotHeader, SnapshotReader};
use crate::redis::api::{self, guard, log_raw, rm, MainThread, RedisModuleCtx};

/// How much one slice may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Most keys restored per slice (at least 1).
    pub keys_per_slice: usize,
    /// A slice stops after the key that passed this much time.
    pub slice_time_max: Duration,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            keys_per_slice: 1000,
            slice_time_max: Duration::from_millis(5),
        }
    }
}

/// Reported after every slice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadProgress {
    pub keys_loaded: u64,
    pub keys_total: u64,
}

/// What a completed load did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadOutcome {
    pub path: PathBuf,
    /// The Raft position the dataset now stands for.
    pub header: SnapshotHeader,
    /// Records restored (keys already expired included: RESTORE skipped those).
    pub keys: u64,
    pub bytes: u64,
    /// From `start_load` to completion.
    pub duration: Duration,
    /// Time spent checking the file (off the main thread).
    pub check_duration: Duration,
    pub slices: u64,
    /// The longest the main thread spent in one slice.
    pub longest_slice: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("a snapshot load is already in progress (from {})", .0.display())]
    InProgress(PathBuf),
    /// The file is missing, unreadable or damaged; the dataset was not touched.
    #[error("{0}; the dataset was not changed")]
    Invalid(SnapshotError),
    /// Restoring failed after the dataset was flushed: it now holds part of the snapshot.
    #[error("{reason}; the dataset holds {keys_loaded} of the snapshot's keys")]
    Restore { reason: String, keys_loaded: u64 },
    /// `abort_load`; `flushed` says whether the dataset had been flushed (it then holds
    /// `keys_loaded` of the snapshot's keys).
    #[error("the snapshot load was aborted after {keys_loaded} keys")]
    Aborted { keys_loaded: u64, flushed: bool },
    /// Keys of module data types this server cannot restore, or could not be checked; the
    /// dataset was not touched.
    #[error("{0}; the dataset was not changed")]
    ModuleTypes(String),
    #[error("{0}")]
    Internal(String),
}

impl LoadError {
    /// Whether the dataset was changed (flushed, then partly restored).
    pub fn dataset_changed(&self) -> bool {
        matches!(
            self,
            LoadError::Restore { .. } | LoadError::Aborted { flushed: true, .. }
        )
    }
}

/// Called after each slice, on the main thread.
pub type LoadProgressFn = Box<dyn FnMut(LoadProgress)>;
/// Called once when the load ends, on the main thread.
pub type LoadDone = Box<dyn FnOnce(Result<LoadOutcome, LoadError>)>;

enum Phase {
    Checking,
    /// A forked child is restoring one key of each module type (see the module doc).
    Probing {
        reader: Box<SnapshotReader>,
        summary: format::SnapshotSummary,
        check_duration: Duration,
        types: Vec<String>,
        child_pid: i32,
    },
    Restoring {
        reader: Box<SnapshotReader>,
        keys_total: u64,
        bytes: u64,
        check_duration: Duration,
    },
}

struct Loading {
    generation: u64,
    path: PathBuf,
    opts: LoadOptions,
    /// A detached context of our own (timers and RESTOREs), freed when the load ends.
    ctx: usize,
    started: Instant,
    phase: Phase,
    slices: u64,
    longest_slice: Duration,
    on_progress: LoadProgressFn,
    on_done: LoadDone,
}

#[derive(Default)]
struct LoadState {
    current: Option<Loading>,
    next_generation: u64,
}

static LOAD: MainThread<LoadState> = MainThread::new_lazy();

/// What the checking thread hands back.
struct Checked {
    generation: u64,
    result: Result<(format::SnapshotSummary, File), SnapshotError>,
    duration: Duration,
    /// One key of each module data type in the file.
    module_samples: Vec<ModuleSample>,
    /// Why the file's module values cannot be loaded, found while checking.
    module_problem: Option<String>,
}

/// A key of a module data type, kept from the check to probe its type.
struct ModuleSample {
    type_name: String,
    db: i32,
    payload: Vec<u8>,
}

/// Distinct module types probed at most; more than that in one file is refused.
const MODULE_TYPES_MAX: usize = 256;

/// RDB object types of module values (`RDB_TYPE_MODULE_PRE_GA`, `RDB_TYPE_MODULE_2`).
const RDB_TYPE_MODULE_PRE_GA: u8 = 6;
const RDB_TYPE_MODULE_2: u8 = 7;

/// For a DUMP payload of a module value, its module type id (name and encoding version);
/// `None` for Redis's own types. A DUMP payload starts with the RDB object type, and a
/// module value's with its type id in RDB length encoding.
pub(crate) fn dump_module_type_id(payload: &[u8]) -> Option<Result<u64, ()>> {
    let (&ty, rest) = payload.split_first()?;
    if ty != RDB_TYPE_MODULE_2 && ty != RDB_TYPE_MODULE_PRE_GA {
        return None;
    }
    let first = match rest.first() {
        Some(&b) => b,
        None => return Some(Err(())),
    };
    let be = |n: usize| -> Result<u64, ()> {
        let b = rest.get(1..1 + n).ok_or(())?;
        Ok(b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
    };
    Some(match first >> 6 {
        0 => Ok(u64::from(first & 0x3f)),
        1 => rest
            .get(1)
            .map(|&b| (u64::from(first & 0x3f) << 8) | u64::from(b))
            .ok_or(()),
        2 if first == 0x80 => be(4),
        2 if first == 0x81 => be(8),
        _ => Err(()),
    })
}

/// A module type's 9-character name from its id (as Redis's `moduleTypeNameByID`).
pub(crate) fn module_type_name(id: u64) -> String {
    const CHARSET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut id = id >> 10;
    let mut name = [0u8; 9];
    for c in name.iter_mut().rev() {
        *c = CHARSET[(id & 63) as usize];
        id >>= 6;
    }
    String::from_utf8_lossy(&name).into_owned()
}

/// Whether a load is running.
pub fn load_in_progress() -> bool {
    LOAD.get_mut().current.is_some()
}

/// Starts loading the snapshot at `path` (relative to Redis's `dir`) into the dataset. Main
/// thread only; `ctx` is any context of this module. Returns once the check has started;
/// `on_done` is called later exactly once (unless this returns an error), `on_progress` after
/// every slice.
pub fn start_load(
    ctx: *mut RedisModuleCtx,
    path: &Path,
    opts: LoadOptions,
    on_progress: LoadProgressFn,
    on_done: LoadDone,
) -> Result<(), LoadError> {
    let st = LOAD.get_mut();
    if let Some(l) = &st.current {
        return Err(LoadError::InProgress(l.path.clone()));
    }
    let file = File::open(path).map_err(|source| {
        LoadError::Invalid(SnapshotError::Io {
            path: path.to_path_buf(),
            op: "open",
            source,
        })
    })?;
    let lctx = unsafe { rm!(RedisModule_GetDetachedThreadSafeContext)(ctx) };
    if lctx.is_null() {
        return Err(LoadError::Internal("cannot create a module context".into()));
    }
    st.next_generation += 1;
    let generation = st.next_generation;
    let opts = LoadOptions {
        keys_per_slice: opts.keys_per_slice.max(1),
        ..opts
    };
    let thread_path = path.to_path_buf();
    let spawned = std::thread::Builder::new()
        .name("snapshot-check".into())
        .spawn(move || {
            let t = Instant::now();
            let mut samples: Vec<(u64, ModuleSample)> = Vec::new();
            let mut bad_module_key = None;
            let result =
                format::verify_file_with(file, &thread_path, |k| {
                    match dump_module_type_id(&k.payload) {
                        None => {}
                        Some(Ok(id)) if !samples.iter().any(|(i, _)| *i == id) => {
                            samples.push((
                                id,
                                ModuleSample {
                                    type_name: module_type_name(id),
                                    db: k.db,
                                    payload: k.payload.clone(),
                                },
                            ));
                        }
                        Some(Ok(_)) => {}
                        Some(Err(())) => bad_module_key = Some((k.db, k.key.clone())),
                    }
                });
            let module_problem = match bad_module_key {
                Some((db, key)) => Some(format!(
                    "key '{}' in database {db} holds a module value without a readable type id",
                    String::from_utf8_lossy(&key)
                )),
                None if samples.len() > MODULE_TYPES_MAX => Some(format!(
                    "the snapshot holds more than {MODULE_TYPES_MAX} module data types"
                )),
                None => None,
            };
            let checked = Box::new(Checked {
                generation,
                result,
                duration: t.elapsed(),
                module_samples: samples.into_iter().map(|(_, s)| s).collect(),
                module_problem,
            });
            // Thread-safe by Redis's contract; the callback owns the box.
            unsafe {
                rm!(RedisModule_EventLoopAddOneShot)(
                    Some(on_checked),
                    Box::into_raw(checked) as *mut c_void,
                )
            };
        });
    if let Err(e) = spawned {
        unsafe { rm!(RedisModule_FreeThreadSafeContext)(lctx) };
        return Err(LoadError::Internal(format!(
            "cannot start the snapshot check thread: {e}"
        )));
    }
    log_raw(
        "notice",
        &format!("snapshot load from {}: checking the file", path.display()),
    );
    st.current = Some(Loading {
        generation,
        path: path.to_path_buf(),
        opts,
        ctx: lctx as usize,
        started: Instant::now(),
        phase: Phase::Checking,
        slices: 0,
        longest_slice: Duration::ZERO,
        on_progress,
        on_done,
    });
    Ok(())
}

/// Stops a running load; its `on_done` gets `LoadError::Aborted`. The dataset keeps what was
/// restored so far (nothing, if the check had not finished). Returns false if none was running.
pub fn abort_load() -> bool {
    let Some(l) = LOAD.get_mut().current.take() else {
        return false;
    };
    let (keys_loaded, flushed) = match &l.phase {
        Phase::Checking => (0, false),
        Phase::Probing { child_pid, .. } => {
            // Waits for the child; Redis then does not call the done handler.
            unsafe { rm!(RedisModule_KillForkChild)(*child_pid) };
            (0, false)
        }
        Phase::Restoring { reader, .. } => (reader.keys_read(), true),
    };
    log_raw(
        "warning",
        &format!(
            "snapshot load from {} aborted after {keys_loaded} keys",
            l.path.display()
        ),
    );
    end(
        l,
        Err(LoadError::Aborted {
            keys_loaded,
            flushed,
        }),
    );
    true
}

/// Frees the load's context and tells the caller. `l` is no longer in `LOAD`, so the
/// callback may start another load.
fn end(l: Loading, result: Result<LoadOutcome, LoadError>) {
    unsafe { rm!(RedisModule_FreeThreadSafeContext)(l.ctx as *mut RedisModuleCtx) };
    (l.on_done)(result);
}

/// The check finished (main thread).
extern "C" fn on_checked(data: *mut c_void) {
    if data.is_null() {
        return;
    }
    // SAFETY: `data` is the box the checking thread leaked for this callback, used once.
    let checked = unsafe { Box::from_raw(data as *mut Checked) };
    guard("snapshot load", || (), move || after_check(*checked));
}

fn after_check(checked: Checked) {
    let Some(mut l) = LOAD
        .get_mut()
        .current
        .take_if(|l| l.generation == checked.generation && matches!(l.phase, Phase::Checking))
    else {
        return; // Aborted meanwhile.
    };
    let (summary, file) = match checked.result {
        Ok(v) => v,
        Err(e) => {
            log_raw(
                "warning",
                &format!("snapshot load refused: {e}; the dataset was not changed"),
            );
            end(l, Err(LoadError::Invalid(e)));
            return;
        }
    };
    let reader = match SnapshotReader::from_file(file, &l.path) {
        Ok(r) => r,
        Err(e) => {
            log_raw(
                "warning",
                &format!("snapshot load refused: {e}; the dataset was not changed"),
            );
            end(l, Err(LoadError::Invalid(e)));
            return;
        }
    };
    if let Some(why) = checked.module_problem {
        log_raw(
            "warning",
            &format!("snapshot load refused: {why}; the dataset was not changed"),
        );
        end(l, Err(LoadError::ModuleTypes(why)));
        return;
    }
    if checked.module_samples.is_empty() {
        start_restoring(l, reader, summary, checked.duration);
        return;
    }
    let types: Vec<String> = checked
        .module_samples
        .iter()
        .map(|s| s.type_name.clone())
        .collect();
    log_raw(
        "notice",
        &format!(
            "snapshot load from {}: file checked in {} ms; checking that this server can restore its module types ({}) in a child process",
            l.path.display(),
            checked.duration.as_millis(),
            types.join(", ")
        ),
    );
    let lctx = l.ctx as *mut RedisModuleCtx;
    let pid =
        unsafe { rm!(RedisModule_Fork)(Some(probe_done), l.generation as usize as *mut c_void) };
    if pid == 0 {
        probe_child(lctx, &checked.module_samples);
    }
    if pid < 0 {
        let reason = super::save::fork_error();
        let why = format!(
            "cannot check the snapshot's module types ({}): cannot fork: {reason}",
            types.join(", ")
        );
        log_raw(
            "warning",
            &format!("snapshot load refused: {why}; the dataset was not changed"),
        );
        end(l, Err(LoadError::ModuleTypes(why)));
        return;
    }
    l.phase = Phase::Probing {
        reader: Box::new(reader),
        summary,
        check_duration: checked.duration,
        types,
        child_pid: pid,
    };
    LOAD.get_mut().current = Some(l);
}

/// The probe child: restores one key of each module type into a scratch key (in the child's
/// copy of the dataset only). A type Redis cannot load terminates this child, not the server.
fn probe_child(ctx: *mut RedisModuleCtx, samples: &[ModuleSample]) -> ! {
    let code = guard(
        "snapshot module type check",
        || 1,
        || {
            for s in samples {
                if unsafe { rm!(RedisModule_SelectDb)(ctx, s.db) } != api::OK {
                    log_raw(
                        "warning",
                        &format!(
                            "snapshot module type check: database {} does not exist here",
                            s.db
                        ),
                    );
                    return 1;
                }
                let argv = [
                    b"RESTORE".to_vec(),
                    b"__redis_raft_snapshot_probe__".to_vec(),
                    b"0".to_vec(),
                    s.payload.clone(),
                    b"REPLACE".to_vec(),
                ];
                if let Err(msg) = api::call_checked(ctx, &argv) {
                    log_raw(
                        "warning",
                        &format!(
                            "snapshot module type check: a value of type {} cannot be restored: {msg}",
                            s.type_name
                        ),
                    );
                    return 1;
                }
            }
            0
        },
    );
    unsafe {
        rm!(RedisModule_ExitFromChild)(code);
        // Not reached: ExitFromChild exits. Never fall back into Redis's code in a child.
        libc::_exit(code)
    }
}

/// Redis reaped the probe child (main thread).
extern "C" fn probe_done(exitcode: i32, bysignal: i32, data: *mut c_void) {
    guard(
        "snapshot module type check",
        || (),
        || after_probe(data as usize as u64, exitcode, bysignal),
    );
}

fn after_probe(generation: u64, exitcode: i32, bysignal: i32) {
    let Some(l) = LOAD
        .get_mut()
        .current
        .take_if(|l| l.generation == generation && matches!(l.phase, Phase::Probing { .. }))
    else {
        return;
    };
    let Loading { phase, .. } = &l;
    let Phase::Probing { types, .. } = phase else {
        return;
    };
    if exitcode != 0 || bysignal != 0 {
        let why = format!(
            "the snapshot holds keys of module data type{} {} that this server cannot restore (is the module loaded, in a version that reads them?)",
            if types.len() == 1 { "" } else { "s" },
            types.join(", ")
        );
        log_raw(
            "warning",
            &format!("snapshot load refused: {why}; the dataset was not changed"),
        );
        end(l, Err(LoadError::ModuleTypes(why)));
        return;
    }
    let mut l = l;
    let Phase::Probing {
        reader,
        summary,
        check_duration,
        ..
    } = std::mem::replace(&mut l.phase, Phase::Checking)
    else {
        return;
    };
    start_restoring(l, *reader, summary, check_duration);
}

/// The file is good: flush the dataset and restore it slice by slice.
fn start_restoring(
    mut l: Loading,
    reader: SnapshotReader,
    summary: format::SnapshotSummary,
    check_duration: Duration,
) {
    log_raw(
        "notice",
        &format!(
            "snapshot load from {}: file checked ({} keys, {} bytes, index {}, term {}) in {} ms; flushing the dataset and restoring",
            l.path.display(),
            summary.keys,
            summary.bytes,
            summary.header.index,
            summary.header.term,
            check_duration.as_millis()
        ),
    );
    // Async: the old dataset is freed by Redis's lazyfree thread; it is gone from view now.
    unsafe { rm!(RedisModule_ResetDataset)(0, 1) };
    l.phase = Phase::Restoring {
        reader: Box::new(reader),
        keys_total: summary.keys,
        bytes: summary.bytes,
        check_duration,
    };
    let generation = l.generation;
    let ctx = l.ctx as *mut RedisModuleCtx;
    LOAD.get_mut().current = Some(l);
    arm(ctx, generation);
}

fn arm(ctx: *mut RedisModuleCtx, generation: u64) {
    // A 0 ms timer runs on the next event-loop turn, after clients were served. (A one-shot
    // re-added from its own callback would run in the same turn on Redis 7.0.)
    unsafe {
        rm!(RedisModule_CreateTimer)(ctx, 0, Some(on_slice), generation as usize as *mut c_void)
    };
}

extern "C" fn on_slice(_ctx: *mut RedisModuleCtx, data: *mut c_void) {
    guard("snapshot load", || (), || slice(data as usize as u64));
}

enum SliceEnd {
    More,
    Done,
    Failed(String),
}

fn slice(generation: u64) {
    // Owned while working, so no borrow of `LOAD` is held while Redis or a callback runs.
    let Some(mut l) = LOAD
        .get_mut()
        .current
        .take_if(|l| l.generation == generation)
    else {
        return; // Aborted meanwhile.
    };
    let ctx = l.ctx as *mut RedisModuleCtx;
    let Phase::Restoring {
        reader,
        keys_total,
        bytes,
        check_duration,
    } = &mut l.phase
    else {
        LOAD.get_mut().current = Some(l);
        return;
    };
    let t = Instant::now();
    let mut n = 0usize;
    let outcome = loop {
        if n >= l.opts.keys_per_slice || (n > 0 && t.elapsed() >= l.opts.slice_time_max) {
            break SliceEnd::More;
        }
        match reader.next_key() {
            Ok(Some(rec)) => {
                if let Err(e) = restore(ctx, rec) {
                    break SliceEnd::Failed(e);
                }
                n += 1;
            }
            Ok(None) => break SliceEnd::Done,
            Err(e) => break SliceEnd::Failed(e.to_string()),
        }
    };
    let progress = LoadProgress {
        keys_loaded: reader.keys_read(),
        keys_total: *keys_total,
    };
    let header = reader.header().clone();
    let (bytes, check_duration) = (*bytes, *check_duration);
    l.slices += 1;
    l.longest_slice = l.longest_slice.max(t.elapsed());
    match outcome {
        SliceEnd::More => {
            // Called with the load back in place (load_in_progress() is true in it).
            let mut on_progress = std::mem::replace(&mut l.on_progress, Box::new(|_| {}));
            LOAD.get_mut().current = Some(l);
            arm(ctx, generation);
            on_progress(progress);
            if let Some(l) = LOAD
                .get_mut()
                .current
                .as_mut()
                .filter(|l| l.generation == generation)
            {
                l.on_progress = on_progress;
            }
        }
        SliceEnd::Done => {
            (l.on_progress)(progress);
            let o = LoadOutcome {
                path: l.path.clone(),
                header,
                keys: progress.keys_loaded,
                bytes,
                duration: l.started.elapsed(),
                check_duration,
                slices: l.slices,
                longest_slice: l.longest_slice,
            };
            log_raw(
                "notice",
                &format!(
                    "snapshot loaded from {}: {} keys, index {}, term {}, in {} ms ({} slices, longest {} ms)",
                    o.path.display(),
                    o.keys,
                    o.header.index,
                    o.header.term,
                    o.duration.as_millis(),
                    o.slices,
                    o.longest_slice.as_millis()
                ),
            );
            end(l, Ok(o));
        }
        SliceEnd::Failed(reason) => {
            (l.on_progress)(progress);
            log_raw(
                "warning",
                &format!(
                    "snapshot load from {} failed: {reason}; the dataset holds {} of its {} keys",
                    l.path.display(),
                    progress.keys_loaded,
                    progress.keys_total
                ),
            );
            end(
                l,
                Err(LoadError::Restore {
                    reason,
                    keys_loaded: progress.keys_loaded,
                }),
            );
        }
    }
}

/// Restores one key in its database.
fn restore(ctx: *mut RedisModuleCtx, rec: KeyRecord) -> Result<(), String> {
    let key = || {
        let k = String::from_utf8_lossy(&rec.key);
        let mut k: String = k.chars().take(100).collect();
        if rec.key.len() > 100 {
            k.push_str("...");
        }
        k
    };
    if unsafe { rm!(RedisModule_SelectDb)(ctx, rec.db) } != api::OK {
        return Err(format!(
            "key '{}' is in database {}, which this server does not have (see its `databases` setting)",
            key(),
            rec.db
        ));
    }
    let ttl = rec.expire_at_ms.unwrap_or(0).to_string();
    let name = key();
    let argv = [
        b"RESTORE".to_vec(),
        rec.key,
        ttl.into_bytes(),
        rec.payload,
        b"ABSTTL".to_vec(),
        b"REPLACE".to_vec(),
    ];
    match api::call_checked(ctx, &argv) {
        Ok(_) => Ok(()),
        Err(msg) => Err(format!(
            "RESTORE of key '{name}' in database {} failed: {msg}",
            rec.db
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Redis's `moduleTypeEncodeId` for a 9-character name and an encoding version.
    fn encode_id(name: &str, encver: u64) -> u64 {
        const CHARSET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut id = 0u64;
        for c in name.bytes() {
            let pos = CHARSET.iter().position(|&x| x == c).unwrap() as u64;
            id = (id << 6) | pos;
        }
        (id << 10) | encver
    }

    #[test]
    fn module_type_ids_are_read_from_dump_payloads() {
        let id = encode_id("rraft-box", 0);
        assert_eq!(module_type_name(id), "rraft-box");
        assert_eq!(module_type_name(encode_id("ReJSON-RL", 3)), "ReJSON-RL");
        // RDB_TYPE_MODULE_2, 64-bit length encoding (big-endian), then the value.
        let mut p = vec![7u8, 0x81];
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(b"rest");
        assert_eq!(dump_module_type_id(&p), Some(Ok(id)));
        // Shorter length encodings.
        assert_eq!(dump_module_type_id(&[7, 0x05]), Some(Ok(5)));
        assert_eq!(dump_module_type_id(&[7, 0x41, 0x02]), Some(Ok(0x102)));
        assert_eq!(dump_module_type_id(&[6, 0x80, 0, 0, 1, 0]), Some(Ok(256)));
        // Redis's own types, and damaged module payloads.
        assert_eq!(dump_module_type_id(&[0, 3, b'a', b'b', b'c']), None);
        assert_eq!(dump_module_type_id(&[]), None);
        assert_eq!(dump_module_type_id(&[7]), Some(Err(())));
        assert_eq!(dump_module_type_id(&[7, 0x81, 1, 2]), Some(Err(())));
        assert_eq!(dump_module_type_id(&[7, 0xc0]), Some(Err(())));
    }
}
