//! Saving the dataset to a snapshot file from a forked child (`RedisModule_Fork`), so the
//! main thread stalls only for the fork itself.
//!
//! Parent: `start_save` forks; the child writes `<path>.tmp`; when Redis reaps the child
//! (serverCron, every 1000/hz ms), the done handler checks the file's header and end record,
//! renames it over `<path>` (directory fsynced; on the main thread, so a directory fsync's
//! worth of stall) and calls the caller's `on_done`. Any failure
//! (fork refused, write error or full disk in the child, child killed, `abort_save`) removes
//! the temporary file and leaves the previous `<path>` as it was, with a log line saying why.
//!
//! Child: for every database (until `SelectDb` refuses the number), walks the keys with
//! `RedisModule_Scan`, takes each key's absolute expiry from the scan's key handle and its
//! `DUMP` payload through `RM_Call`, appends them to the file, then writes the end record,
//! fsyncs and exits with 0 (1 on any error, after a log line). The child never returns into
//! Redis, even on a panic. Keys already expired when the child reaches them are left out.
//!
//! Only one save runs at a time; Redis also refuses a fork while it has another child (its
//! own BGSAVE or AOF rewrite, or a load's module-type check).
//!
//! Fork from a quiet point (not while an entry is half applied): the child sees the dataset
//! and the module's main-thread state exactly as they are at `start_save`. Keys are walked
//! with SCAN semantics: if a hash table was being shrunk at fork time, a key may be written
//! twice (RESTORE ... REPLACE makes that harmless; the key count then counts it twice).
//!
//! Invariant: only `start_save`, `abort_save` and the done handler touch `SAVE`, all on the
//! main thread.

#![allow(clippy::not_unsafe_ptr_arg_deref)]

use std::ffi::{c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::format::{self, tmp_path, SnapshotHeader, SnapshotWriter};
use crate::redis::api::{
    self, guard, log_raw, rm, CallOpts, MainThread, RedisModuleCtx, RedisModuleString,
};

/// Exit status of a child that failed (255 means "killed on purpose" to Redis).
const CHILD_FAILED: c_int = 1;

/// Test knob (`raft.snapshot-fail`): `start_save` fails as if the fork had failed.
pub static FAIL_FORK: AtomicBool = AtomicBool::new(false);

/// Test knob (`raft.snapshot-delay`): the child waits this many seconds before writing.
pub static CHILD_DELAY_SECS: AtomicU64 = AtomicU64::new(0);

/// What a successful save produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaveOutcome {
    /// The installed snapshot file.
    pub path: PathBuf,
    pub header: SnapshotHeader,
    pub keys: u64,
    pub bytes: u64,
    /// From just before the fork to the done handler (includes up to one serverCron period
    /// of Redis noticing the child exited).
    pub duration: Duration,
    /// How long the main thread was stalled by the fork itself.
    pub fork_duration: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("a snapshot save is already in progress (to {})", .0.display())]
    InProgress(PathBuf),
    #[error("cannot fork for the snapshot: {0}")]
    Fork(String),
    #[error("the snapshot child exited with status {code} (see the server log for why)")]
    ChildFailed { code: i32 },
    #[error("the snapshot child was killed by signal {signal}")]
    ChildKilled { signal: i32 },
    #[error("the snapshot save was aborted")]
    Aborted,
    #[error("{0}")]
    File(#[from] format::SnapshotError),
    #[error("the child wrote a snapshot for index {found_index} term {found_term}, expected index {index} term {term}")]
    Mismatch {
        index: u64,
        term: u64,
        found_index: u64,
        found_term: u64,
    },
}

/// Called once on the main thread when the save ends.
pub type SaveDone = Box<dyn FnOnce(Result<SaveOutcome, SaveError>)>;

struct Running {
    tmp: PathBuf,
    dest: PathBuf,
    header: SnapshotHeader,
    started: Instant,
    fork_duration: Duration,
    child_pid: c_int,
    on_done: SaveDone,
}

static SAVE: MainThread<Option<Running>> = MainThread::new_lazy();

/// Whether a save is running.
pub fn save_in_progress() -> bool {
    SAVE.get_mut().is_some()
}

/// Starts saving the dataset as it is now to `dest` (relative paths are relative to Redis's
/// working directory, its `dir`), headed by `header`. Main thread only; `ctx` is any context
/// of this module (a command's, a timer's, a detached one). Returns once the child is forked;
/// `on_done` is called later, on the main thread, exactly once, unless this returns an error.
pub fn start_save(
    ctx: *mut RedisModuleCtx,
    dest: &Path,
    header: SnapshotHeader,
    on_done: SaveDone,
) -> Result<(), SaveError> {
    let state = SAVE.get_mut();
    if let Some(r) = state {
        return Err(SaveError::InProgress(r.dest.clone()));
    }
    let tmp = tmp_path(dest);
    let started = Instant::now();
    let parent = unsafe { libc::getpid() };
    let delay = Duration::from_secs(CHILD_DELAY_SECS.load(Ordering::Relaxed));
    let simulated = FAIL_FORK.load(Ordering::Relaxed);
    let pid = if simulated {
        // What fork(2) says when the server cannot be duplicated.
        unsafe { *libc::__errno_location() = libc::ENOMEM };
        -1
    } else {
        unsafe { rm!(RedisModule_Fork)(Some(save_done), std::ptr::null_mut()) }
    };
    if pid == 0 {
        child_main(ctx, &tmp, &header, parent, delay);
    }
    let fork_duration = started.elapsed();
    if pid < 0 {
        let mut why = fork_error();
        if simulated {
            why.push_str(" (simulated: raft.snapshot-fail is yes)");
        }
        log_raw(
            "warning",
            &format!(
                "snapshot save to {} not started: cannot fork: {why}",
                dest.display()
            ),
        );
        return Err(SaveError::Fork(why));
    }
    log_raw(
        "notice",
        &format!(
            "snapshot save to {} started (child pid {pid}, index {}, term {}; fork took {} ms)",
            dest.display(),
            header.index,
            header.term,
            fork_duration.as_millis()
        ),
    );
    *state = Some(Running {
        tmp,
        dest: dest.to_path_buf(),
        header,
        started,
        fork_duration,
        child_pid: pid,
        on_done,
    });
    Ok(())
}

/// Why `RedisModule_Fork` just failed. Redis allows one child process at a time and says
/// so with EEXIST.
pub(crate) fn fork_error() -> String {
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        "another child process is running (a snapshot save or load check, a BGSAVE or an AOF rewrite); try again once it has finished".into()
    } else {
        e.to_string()
    }
}

/// Stops a running save: kills the child, removes the temporary file and calls its `on_done`
/// with `SaveError::Aborted`. Returns false when no save was running.
pub fn abort_save() -> bool {
    let Some(r) = SAVE.get_mut().take() else {
        return false;
    };
    // Waits for the child; Redis then does not call the done handler.
    unsafe { rm!(RedisModule_KillForkChild)(r.child_pid) };
    remove_tmp(&r.tmp);
    log_raw(
        "warning",
        &format!(
            "snapshot save to {} aborted; the previous file is unchanged",
            r.dest.display()
        ),
    );
    (r.on_done)(Err(SaveError::Aborted));
    true
}

/// Redis reaped the child (main thread, from serverCron).
extern "C" fn save_done(exitcode: c_int, bysignal: c_int, _user_data: *mut c_void) {
    guard(
        "snapshot save done",
        || (),
        || finish_save(exitcode, bysignal),
    );
}

fn finish_save(exitcode: c_int, bysignal: c_int) {
    let Some(r) = SAVE.get_mut().take() else {
        return;
    };
    let result = if bysignal != 0 {
        Err(SaveError::ChildKilled { signal: bysignal })
    } else if exitcode != 0 {
        Err(SaveError::ChildFailed { code: exitcode })
    } else {
        install_checked(&r)
    };
    match &result {
        Ok(o) => log_raw(
            "notice",
            &format!(
                "snapshot saved to {}: {} keys, {} bytes, index {}, term {}, in {} ms",
                o.path.display(),
                o.keys,
                o.bytes,
                o.header.index,
                o.header.term,
                o.duration.as_millis()
            ),
        ),
        Err(e) => {
            remove_tmp(&r.tmp);
            log_raw(
                "warning",
                &format!(
                    "snapshot save to {} failed: {e}; the previous file is unchanged",
                    r.dest.display()
                ),
            );
        }
    }
    (r.on_done)(result);
}

/// Checks what the child wrote is the snapshot asked for, then publishes it.
fn install_checked(r: &Running) -> Result<SaveOutcome, SaveError> {
    let summary = format::inspect(&r.tmp)?;
    if summary.header.index != r.header.index || summary.header.term != r.header.term {
        return Err(SaveError::Mismatch {
            index: r.header.index,
            term: r.header.term,
            found_index: summary.header.index,
            found_term: summary.header.term,
        });
    }
    format::install(&r.tmp, &r.dest)?;
    Ok(SaveOutcome {
        path: r.dest.clone(),
        header: summary.header,
        keys: summary.keys,
        bytes: summary.bytes,
        duration: r.started.elapsed(),
        fork_duration: r.fork_duration,
    })
}

fn remove_tmp(tmp: &Path) {
    match std::fs::remove_file(tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => log_raw("warning", &format!("cannot remove {}: {e}", tmp.display())),
    }
}

/// The forked child: writes the file and exits. Never returns.
fn child_main(
    ctx: *mut RedisModuleCtx,
    tmp: &Path,
    header: &SnapshotHeader,
    parent: libc::pid_t,
    delay: Duration,
) -> ! {
    unsafe {
        // A child whose server died (SIGKILL, crash) must not go on writing: the restarted
        // server removes `<path>.tmp` and its own saves write there. Redis does not do this
        // for its children. Checked once after setting it, in case the parent already died.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() != parent {
            libc::_exit(CHILD_FAILED);
        }
        // Past RLIMIT_FSIZE a write then fails with EFBIG, which the child reports, instead
        // of SIGXFSZ killing it without a word.
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let code = guard(
        "snapshot child",
        || CHILD_FAILED,
        || match write_snapshot(ctx, tmp, header, delay) {
            Ok((keys, bytes)) => {
                log_raw(
                    "notice",
                    &format!(
                        "snapshot child wrote {keys} keys, {bytes} bytes to {}",
                        tmp.display()
                    ),
                );
                0
            }
            Err(e) => {
                log_raw("warning", &format!("snapshot child failed: {e}"));
                CHILD_FAILED
            }
        },
    );
    unsafe {
        rm!(RedisModule_ExitFromChild)(code);
        // Not reached: ExitFromChild exits. Never fall back into Redis's code in a child.
        libc::_exit(code)
    }
}

fn write_snapshot(
    ctx: *mut RedisModuleCtx,
    tmp: &Path,
    header: &SnapshotHeader,
    delay: Duration,
) -> Result<(u64, u64), String> {
    // A context of our own: the caller's may belong to a client; only its module is used.
    let cctx = unsafe { rm!(RedisModule_GetDetachedThreadSafeContext)(ctx) };
    if cctx.is_null() {
        return Err("cannot create a module context".into());
    }
    let mut w = SnapshotWriter::create(tmp, header).map_err(|e| e.to_string())?;
    if !delay.is_zero() {
        // With the file created: a test kills the server while its save is half written.
        log_raw(
            "notice",
            &format!(
                "snapshot child waits {} s before writing the keys (raft.snapshot-delay)",
                delay.as_secs()
            ),
        );
        std::thread::sleep(delay);
    }
    // Bounded: SelectDb refuses numbers past the `databases` setting.
    for db in 0..i32::MAX {
        if unsafe { rm!(RedisModule_SelectDb)(cctx, db) } != api::OK {
            break;
        }
        if unsafe { rm!(RedisModule_DbSize)(cctx) } == 0 {
            continue;
        }
        write_db(cctx, db, &mut w)?;
    }
    let s = w.finish().map_err(|e| e.to_string())?;
    Ok((s.keys, s.bytes))
}

/// The keys one `RedisModule_Scan` step returned (one hash bucket's worth, or a few while
/// the table is being rehashed), with their absolute expiry (-1: none).
struct ScanBatch {
    keys: Vec<(Vec<u8>, i64)>,
}

fn write_db(ctx: *mut RedisModuleCtx, db: i32, w: &mut SnapshotWriter) -> Result<(), String> {
    let cursor = unsafe { rm!(RedisModule_ScanCursorCreate)() };
    if cursor.is_null() {
        return Err("cannot create a scan cursor".into());
    }
    let mut batch = ScanBatch { keys: Vec::new() };
    let result = (|| {
        // Bounded: each step advances the cursor; the scan ends when it wraps around.
        loop {
            let more = unsafe {
                rm!(RedisModule_Scan)(
                    ctx,
                    cursor,
                    Some(scan_cb),
                    &mut batch as *mut ScanBatch as *mut c_void,
                )
            };
            // DUMP outside the scan callback: a lookup may expire (delete) a key.
            for (key, expire) in batch.keys.drain(..) {
                let Some(payload) = dump(ctx, &key)? else {
                    continue;
                };
                let expire = (expire >= 0).then_some(expire);
                w.write_key(db, &key, expire, &payload)
                    .map_err(|e| e.to_string())?;
            }
            if more == 0 {
                return Ok(());
            }
        }
    })();
    unsafe { rm!(RedisModule_ScanCursorDestroy)(cursor) };
    result
}

extern "C" fn scan_cb(
    _ctx: *mut RedisModuleCtx,
    keyname: *mut RedisModuleString,
    key: *mut api::raw::RedisModuleKey,
    privdata: *mut c_void,
) {
    guard(
        "snapshot scan",
        || (),
        || {
            // SAFETY: `privdata` is the `ScanBatch` write_db passed to this scan step.
            let batch = unsafe { &mut *(privdata as *mut ScanBatch) };
            let name = unsafe { api::str_bytes(keyname) }.to_vec();
            let expire = if key.is_null() {
                -1
            } else {
                unsafe { rm!(RedisModule_GetAbsExpire)(key) }
            };
            batch.keys.push((name, expire));
        },
    );
}

/// The key's DUMP payload; `None` if the key is gone (expired).
fn dump(ctx: *mut RedisModuleCtx, key: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let r = api::call(ctx, &[b"DUMP".to_vec(), key.to_vec()], CallOpts::default());
    if r.is_null() {
        return Err(format!(
            "DUMP {} could not be executed",
            String::from_utf8_lossy(key)
        ));
    }
    let t = unsafe { rm!(RedisModule_CallReplyType)(r) } as isize;
    let v = api::call_reply_value(r);
    api::free_call_reply(r);
    match (t, v) {
        (api::raw::REDISMODULE_REPLY_STRING, api::Value::Str(s)) => Ok(Some(s)),
        (api::raw::REDISMODULE_REPLY_NULL, _) => Ok(None),
        (_, api::Value::Str(e)) => Err(format!(
            "DUMP {} failed: {}",
            String::from_utf8_lossy(key),
            String::from_utf8_lossy(&e)
        )),
        _ => Err(format!(
            "DUMP {} gave an unexpected reply",
            String::from_utf8_lossy(key)
        )),
    }
}
