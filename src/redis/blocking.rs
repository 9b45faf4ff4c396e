//! Blocking commands (BLPOP, BRPOP, BRPOPLPUSH, BLMOVE, BLMPOP, BZPOPMIN, BZPOPMAX, BZMPOP,
//! XREADGROUP ... BLOCK) on Redis 7.0, which cannot block inside RM_Call.
//!
//! Every pop goes through the log, so every node removes the same elements in the same
//! order. On the leader, a client's blocking command is proposed as an *attempt*; applied
//! through RM_Call it never blocks: it pops or answers null at once, identically everywhere.
//! Null means the client waits: it is queued, first come first served, on each of its keys.
//! When an applied entry changes one of those keys, the leader proposes a new attempt for the
//! first waiter of that key that has none in flight. Attempts are ordinary entries, so a
//! waiter may lose a race to a non-blocking pop; it then waits again.
//!
//! Timeouts are the module's own timers, not Redis's: Redis 7.0 drops a module's reply when
//! the client's Redis timeout fires between RM_UnblockClient and the moment Redis sends
//! that reply (the client then never gets an answer). A waiter whose timer fires with
//! nothing in flight is answered with the command's null reply at once; with an attempt in
//! flight, it is answered by that attempt (what it popped, or null). CLIENT UNBLOCK and
//! disconnects are Redis's (the client is blocked with a timeout callback, which CLIENT
//! UNBLOCK calls), except that a CLIENT UNBLOCK for a waiter whose answer is already on its
//! way is turned into one for no client (`being_answered`, in the filter). If a waiter goes away while its attempt is in flight and the attempt
//! then pops something, nobody can receive it: the leader proposes the inverse command
//! (LPUSH/RPUSH/LMOVE/ZADD) so the elements go back where they were. XREADGROUP entries are
//! not put back: they stay in the group's pending list, as after any delivery.
//!
//! XREAD ... BLOCK is a read: it takes nothing, so it needs no log entry. Once its read is
//! confirmed (ReadIndex) and finds nothing, it waits on this node (any node with follower
//! reads) and runs again each time an applied entry changes one of its streams. Its `$` IDs
//! are fixed at the first run to the streams' last IDs, as Redis fixes them when it blocks.

use std::collections::{HashMap, VecDeque};
use std::ffi::c_int;

use super::api::{
    self, guard, rm, RedisModuleBlockedClient, RedisModuleCallReply, RedisModuleCtx, Value,
};
use super::rewrite::eq;
use super::MainThread;

/// What a blocked client gets when it times out (as Redis answers each command).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NullKind {
    NullArray,
    NullBulk,
}

/// What `parse` learns from a blocking command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub keys: Vec<Vec<u8>>,
    /// 0 waits forever.
    pub timeout_ms: i64,
    pub null: NullKind,
}

/// Seconds as Redis parses them for BLPOP and friends (a float), to milliseconds.
fn secs(a: &[u8]) -> Option<i64> {
    let s: f64 = std::str::from_utf8(a).ok()?.parse().ok()?;
    (s.is_finite() && s >= 0.0).then(|| (s * 1000.0).ceil() as i64)
}

fn ms(a: &[u8]) -> Option<i64> {
    let v: i64 = std::str::from_utf8(a).ok()?.parse().ok()?;
    (v >= 0).then_some(v)
}

/// Recognises a blocking command whose arguments are well formed; anything else (a bad
/// timeout, XREADGROUP without BLOCK or reading history) is an ordinary command, and Redis
/// gives its own answer or error when it is applied.
pub fn parse(argv: &[Vec<u8>]) -> Option<Spec> {
    let name = argv.first()?;
    let n = argv.len();
    if eq(name, "blpop") || eq(name, "brpop") || eq(name, "bzpopmin") || eq(name, "bzpopmax") {
        if n < 3 {
            return None;
        }
        return Some(Spec {
            keys: argv[1..n - 1].to_vec(),
            timeout_ms: secs(&argv[n - 1])?,
            null: NullKind::NullArray,
        });
    }
    if eq(name, "brpoplpush") && n == 4 {
        return Some(Spec {
            keys: vec![argv[1].clone()],
            timeout_ms: secs(&argv[3])?,
            null: NullKind::NullBulk,
        });
    }
    if eq(name, "blmove") && n == 6 {
        return Some(Spec {
            keys: vec![argv[1].clone()],
            timeout_ms: secs(&argv[5])?,
            null: NullKind::NullBulk,
        });
    }
    if eq(name, "blmpop") || eq(name, "bzmpop") {
        let numkeys: usize = std::str::from_utf8(argv.get(2)?).ok()?.parse().ok()?;
        if numkeys == 0 || n < 3 + numkeys + 1 {
            return None;
        }
        return Some(Spec {
            keys: argv[3..3 + numkeys].to_vec(),
            timeout_ms: secs(&argv[1])?,
            null: NullKind::NullArray,
        });
    }
    if eq(name, "xreadgroup") || eq(name, "xread") {
        let group = eq(name, "xreadgroup");
        let mut timeout = None;
        let mut i = 1;
        while i < n {
            let a = &argv[i];
            if eq(a, "block") {
                timeout = Some(ms(argv.get(i + 1)?)?);
                i += 2;
            } else if eq(a, "group") {
                i += 3;
            } else if eq(a, "count") {
                i += 2;
            } else if eq(a, "noack") {
                i += 1;
            } else if eq(a, "streams") {
                let rest = &argv[i + 1..];
                if rest.is_empty() || !rest.len().is_multiple_of(2) {
                    return None;
                }
                let (keys, ids) = rest.split_at(rest.len() / 2);
                // Only new entries (">") make XREADGROUP block.
                if group && !ids.iter().all(|id| id.as_slice() == b">") {
                    return None;
                }
                return Some(Spec {
                    keys: keys.to_vec(),
                    timeout_ms: timeout?,
                    null: NullKind::NullArray,
                });
            } else {
                return None;
            }
        }
    }
    None
}

struct Waiter {
    /// XREAD BLOCK: re-run locally, never proposed.
    read: bool,
    bc: *mut RedisModuleBlockedClient,
    db: i32,
    argv: Vec<Vec<u8>>,
    keys: Vec<Vec<u8>>,
    resp3: bool,
    null: NullKind,
    in_flight: bool,
    /// Unblocked or disconnected: Redis answered it already.
    gone: bool,
    /// Its timeout passed while an attempt was in flight: that attempt's result answers it.
    timed_out: bool,
    /// The module timer of its timeout, if it has one.
    timer: Option<u64>,
    /// Its first attempt (the command as the client sent it) is the one in flight.
    first: bool,
}

#[derive(Default)]
struct State {
    next: u64,
    waiters: HashMap<u64, Waiter>,
    by_bc: HashMap<usize, u64>,
    /// Waiters per (db, key), in arrival order.
    queues: HashMap<(i32, Vec<u8>), VecDeque<u64>>,
    /// Keys with waiters that applied entries changed since the last retry.
    touched: Vec<(i32, Vec<u8>)>,
    /// Gone waiters with nothing in flight: their handles are released before Redis sleeps.
    to_release: Vec<u64>,
    /// The client id of every waiter's handle not yet unblocked (`take_client`).
    clients: HashMap<usize, u64>,
    /// Waiters whose attempt, proposed because an applied entry woke them, is in flight:
    /// the replies of the writes that woke them wait until none is (`cascade_idle`).
    cascade: std::collections::HashSet<u64>,
}

static STATE: MainThread<State> = MainThread::new_lazy();

/// Something the apply path must propose for a waiter (an attempt), or to undo a pop.
pub enum Proposal {
    Attempt {
        waiter: u64,
        bc: *mut RedisModuleBlockedClient,
        db: i32,
        argv: Vec<Vec<u8>>,
        resp3: bool,
    },
    Undo {
        db: i32,
        argv: Vec<Vec<u8>>,
    },
    /// Run XREAD BLOCK waiter `waiter` again, locally.
    Reread {
        waiter: u64,
        bc: *mut RedisModuleBlockedClient,
        db: i32,
        argv: Vec<Vec<u8>>,
        resp3: bool,
    },
}

/// Blocks a client for XREAD ... BLOCK; the read itself goes through the read path first.
pub fn start_read(
    ctx: *mut RedisModuleCtx,
    db: i32,
    argv: &[Vec<u8>],
    spec: Spec,
    resp3: bool,
) -> Option<(*mut RedisModuleBlockedClient, u64)> {
    block(ctx, db, argv, spec, resp3, true)
}

/// What the read path does after a run of XREAD BLOCK waiter `id`.
pub enum ReadOutcome {
    Reply(*mut RedisModuleBlockedClient),
    Wait,
    /// Not (or no longer) a waiter, e.g. after a change of leader: answer with what it got.
    Unknown,
    /// Redis answered it already (timeout, unblock, disconnect): release the handle.
    Release(*mut RedisModuleBlockedClient),
}

/// The argv to run for waiter `id`, its `$` IDs fixed at the first run.
pub fn read_argv(id: u64, ctx: *mut RedisModuleCtx) -> Option<Vec<Vec<u8>>> {
    let st = STATE.get_mut();
    let w = st.waiters.get_mut(&id)?;
    let pos = w.argv.iter().position(|a| eq(a, "streams"))?;
    let n = (w.argv.len() - pos - 1) / 2;
    for i in 0..n {
        let id_pos = pos + 1 + n + i;
        if w.argv[id_pos].as_slice() == b"$" {
            let key = w.argv[pos + 1 + i].clone();
            w.argv[id_pos] = last_stream_id(ctx, &key);
        }
    }
    Some(w.argv.clone())
}

fn last_stream_id(ctx: *mut RedisModuleCtx, key: &[u8]) -> Vec<u8> {
    let argv = [b"XINFO".to_vec(), b"STREAM".to_vec(), key.to_vec()];
    let r = api::call(ctx, &argv, api::CallOpts::default());
    let v = api::call_reply_value(r);
    api::free_call_reply(r);
    if let Value::Array(items) = v {
        for pair in items.chunks(2) {
            if let [Value::Str(k), Value::Str(id)] = pair {
                if k.as_slice() == b"last-generated-id" {
                    return id.clone();
                }
            }
        }
    }
    b"0-0".to_vec()
}

/// XREAD BLOCK waiter `id` ran; `found` says whether it returned entries.
pub fn read_done(id: u64, found: bool) -> ReadOutcome {
    let st = STATE.get_mut();
    let Some(w) = st.waiters.get_mut(&id) else {
        return ReadOutcome::Unknown;
    };
    w.in_flight = false;
    let bc = w.bc;
    if w.gone {
        remove(st, id);
        return ReadOutcome::Release(bc);
    }
    if found {
        remove(st, id);
        return ReadOutcome::Reply(bc);
    }
    if w.timed_out {
        let null = w.null;
        remove(st, id);
        super::unblock(bc, null_reply(null));
        return ReadOutcome::Wait;
    }
    let (db, keys) = (w.db, w.keys.clone());
    for k in keys {
        let q = st.queues.entry((db, k)).or_default();
        if !q.contains(&id) {
            q.push_back(id);
        }
    }
    ReadOutcome::Wait
}

/// Blocks the client for a blocking command and returns its first attempt.
pub fn start(
    ctx: *mut RedisModuleCtx,
    db: i32,
    argv: Vec<Vec<u8>>,
    spec: Spec,
    resp3: bool,
) -> Option<Proposal> {
    let (bc, id) = block(ctx, db, &argv, spec, resp3, false)?;
    Some(Proposal::Attempt {
        waiter: id,
        bc,
        db,
        argv,
        resp3,
    })
}

/// Blocks the client with Redis's timeout and disconnect handling, and registers its waiter
/// (in flight: its first attempt, or its read round, is under way).
fn block(
    ctx: *mut RedisModuleCtx,
    db: i32,
    argv: &[Vec<u8>],
    spec: Spec,
    resp3: bool,
    read: bool,
) -> Option<(*mut RedisModuleBlockedClient, u64)> {
    // No Redis timeout (see the module comment): the module's timer below.
    let bc = unsafe {
        rm!(RedisModule_BlockClient)(
            ctx,
            Some(super::reply_blocked),
            Some(on_timeout),
            Some(super::free_reply),
            0,
        )
    };
    if bc.is_null() {
        return None;
    }
    unsafe { rm!(RedisModule_SetDisconnectCallback)(bc, Some(on_disconnect)) };
    let st = STATE.get_mut();
    st.next += 1;
    let id = st.next;
    let timer = (spec.timeout_ms > 0).then(|| unsafe {
        rm!(RedisModule_CreateTimer)(
            ctx,
            spec.timeout_ms,
            Some(on_timer),
            id as usize as *mut std::ffi::c_void,
        )
    });
    st.by_bc.insert(bc as usize, id);
    st.clients
        .insert(bc as usize, unsafe { rm!(RedisModule_GetClientId)(ctx) });
    st.waiters.insert(
        id,
        Waiter {
            read,
            bc,
            db,
            argv: argv.to_vec(),
            keys: spec.keys,
            resp3,
            null: spec.null,
            in_flight: true,
            gone: false,
            timed_out: false,
            timer,
            first: true,
        },
    );
    Some((bc, id))
}

fn is_error(r: *mut RedisModuleCallReply) -> bool {
    !r.is_null()
        && unsafe { rm!(RedisModule_CallReplyType)(r) } as isize
            == api::raw::REDISMODULE_REPLY_ERROR
}

fn is_wrong_type(r: *mut RedisModuleCallReply) -> bool {
    is_error(r) && matches!(api::call_reply_value(r), Value::Str(e) if e.starts_with(b"WRONGTYPE"))
}

/// Whether the keys a blocking command `argv` waits on that exist all hold the type it pops.
fn source_has_its_type(ctx: *mut RedisModuleCtx, argv: &[Vec<u8>], keys: &[Vec<u8>]) -> bool {
    let Some(name) = argv.first() else {
        return true;
    };
    let want: &[u8] = if eq(name, "bzpopmin") || eq(name, "bzpopmax") || eq(name, "bzmpop") {
        b"zset"
    } else if eq(name, "xreadgroup") || eq(name, "xread") {
        b"stream"
    } else {
        b"list"
    };
    keys.iter().all(|k| {
        let t = api::call_value(ctx, &[b"TYPE".to_vec(), k.clone()]);
        matches!(t, Value::Str(t) if t == want || t == b"none")
    })
}

fn is_null(r: *mut RedisModuleCallReply) -> bool {
    r.is_null()
        || unsafe { rm!(RedisModule_CallReplyType)(r) } as isize == api::raw::REDISMODULE_REPLY_NULL
}

/// What to do with the reply of an applied attempt.
pub enum Outcome {
    /// Answer the client with it.
    Reply(*mut RedisModuleBlockedClient),
    /// Nobody to answer: drop it (and maybe undo it).
    Drop(Option<Proposal>),
}

/// An attempt of waiter `id` was applied on the leader (in the waiter's database, on `ctx`)
/// with reply `r`.
pub fn attempt_done(ctx: *mut RedisModuleCtx, id: u64, r: *mut RedisModuleCallReply) -> Outcome {
    let st = STATE.get_mut();
    st.cascade.remove(&id);
    let Some(w) = st.waiters.get_mut(&id) else {
        return Outcome::Drop(None);
    };
    w.in_flight = false;
    let first = std::mem::replace(&mut w.first, false);
    let mut waits = is_null(r);
    if !first && is_wrong_type(r) {
        if source_has_its_type(ctx, &w.argv, &w.keys) {
            // The destination holds another type (BLMOVE, BRPOPLPUSH): this waiter gets
            // the error, nothing was popped, and the next waiter on the key gets its turn.
            let (db, keys) = (w.db, w.keys.clone());
            st.touched.extend(keys.into_iter().map(|k| (db, k)));
        } else {
            // Woken, but the key now holds another type (a transaction pushed, deleted
            // and set it, say): Redis serves only a key of the waited type; it waits on.
            waits = true;
        }
    }
    if waits {
        if w.gone {
            st.to_release.push(id);
        } else if w.timed_out {
            if let Some(w) = remove(st, id) {
                super::unblock(w.bc, null_reply(w.null));
            }
        } else {
            let (db, keys) = (w.db, w.keys.clone());
            for k in keys {
                let q = st.queues.entry((db, k)).or_default();
                if !q.contains(&id) {
                    q.push_back(id);
                }
            }
        }
        return Outcome::Drop(None);
    }
    let Some(w) = remove(st, id) else {
        return Outcome::Drop(None);
    };
    if w.gone {
        // Release the handle, and put back what nobody received.
        st.clients.remove(&(w.bc as usize));
        unsafe { rm!(RedisModule_UnblockClient)(w.bc, std::ptr::null_mut()) };
        // An error (a destination of the wrong type) moved nothing: nothing to put back.
        let undo = (!is_error(r))
            .then(|| undo_command(&w.argv, &api::call_reply_value(r)))
            .flatten()
            .map(|argv| Proposal::Undo { db: w.db, argv });
        return Outcome::Drop(undo);
    }
    Outcome::Reply(w.bc)
}

/// The client id of a waiter's handle, forgotten as the handle is unblocked (None: not a
/// waiter's).
pub fn take_client(bc: *mut RedisModuleBlockedClient) -> Option<u64> {
    STATE.get_mut().clients.remove(&(bc as usize))
}

fn remove(st: &mut State, id: u64) -> Option<Waiter> {
    st.cascade.remove(&id);
    let w = st.waiters.remove(&id)?;
    st.by_bc.remove(&(w.bc as usize));
    if let Some(timer) = w.timer {
        if let Some(m) = super::module() {
            unsafe {
                rm!(RedisModule_StopTimer)(
                    m.apply_ctx as *mut RedisModuleCtx,
                    timer,
                    std::ptr::null_mut(),
                )
            };
        }
    }
    for k in &w.keys {
        if let Some(q) = st.queues.get_mut(&(w.db, k.clone())) {
            q.retain(|x| *x != id);
            if q.is_empty() {
                st.queues.remove(&(w.db, k.clone()));
            }
        }
    }
    Some(w)
}

/// How many changes to keys with waiters applied entries made so far (compare before and
/// after an entry: did it wake anyone).
pub fn wakes() -> usize {
    STATE.get_mut().touched.len()
}

/// Whether no attempt proposed for a woken waiter is in flight: a write that woke waiters
/// answers once they were served, as Redis serves them before it replies (chains of
/// BLMOVEs included).
pub fn cascade_idle() -> bool {
    STATE.get_mut().cascade.is_empty()
}

/// An applied entry changed `key` in `db` (keyspace event on the apply path).
pub fn touched(db: i32, key: &[u8]) {
    let st = STATE.get_mut();
    // Nobody blocked (the usual case): no key to copy for the lookup.
    if !st.queues.is_empty() && st.queues.contains_key(&(db, key.to_vec())) {
        st.touched.push((db, key.to_vec()));
    }
}

/// After a batch was applied: for each changed key, every XREAD BLOCK waiter runs again
/// (readers take nothing), and the first blocking-pop waiter with nothing in flight gets a
/// new attempt (only leaders have those). Also releases gone waiters.
pub fn retries() -> Vec<Proposal> {
    release_gone();
    let st = STATE.get_mut();
    let mut out = Vec::new();
    for key in std::mem::take(&mut st.touched) {
        let Some(q) = st.queues.get(&key) else {
            continue;
        };
        let idle = |id: &u64, read: bool| {
            st.waiters
                .get(id)
                .is_some_and(|w| w.read == read && !w.in_flight && !w.gone)
        };
        let mut run: Vec<u64> = q.iter().copied().filter(|id| idle(id, true)).collect();
        run.extend(q.iter().copied().find(|id| idle(id, false)));
        for id in run {
            let Some(w) = st.waiters.get_mut(&id) else {
                continue;
            };
            w.in_flight = true;
            if !w.read {
                st.cascade.insert(id);
            }
            let (waiter, bc, db, argv, resp3) = (id, w.bc, w.db, w.argv.clone(), w.resp3);
            out.push(if w.read {
                Proposal::Reread {
                    waiter,
                    bc,
                    db,
                    argv,
                    resp3,
                }
            } else {
                Proposal::Attempt {
                    waiter,
                    bc,
                    db,
                    argv,
                    resp3,
                }
            });
        }
    }
    out
}

/// Releases the handles of waiters that went away with nothing in flight (Redis already
/// answered them; the handle must still be released once).
pub fn release_gone() {
    let st = STATE.get_mut();
    for id in std::mem::take(&mut st.to_release) {
        if let Some(w) = remove(st, id) {
            st.clients.remove(&(w.bc as usize));
            unsafe { rm!(RedisModule_UnblockClient)(w.bc, std::ptr::null_mut()) };
        }
    }
}

/// This node stopped leading. Waiters with an attempt in flight are answered by the pending
/// path (-TIMEOUT: the outcome is unknown); the others lost nothing and are redirected.
pub fn leadership_lost(redirect: &str) {
    let st = STATE.get_mut();
    let ids: Vec<u64> = st.waiters.keys().copied().collect();
    let mut idle = Vec::new();
    for id in ids {
        let Some(w) = remove(st, id) else { continue };
        if !w.in_flight {
            idle.push(w.bc);
        }
    }
    st.touched.clear();
    st.cascade.clear();
    // After the last use of `st`: `unblock` looks at this state too.
    for bc in idle {
        super::unblock(bc, super::Reply::Error(redirect.to_string()));
    }
}

/// The attempt of waiter `id` never entered the log (pending answered it): forget it.
pub fn forget(id: u64) {
    remove(STATE.get_mut(), id);
}

extern "C" fn on_timeout(
    ctx: *mut RedisModuleCtx,
    _argv: *mut *mut api::RedisModuleString,
    _argc: c_int,
) -> c_int {
    guard(
        "blocking timeout",
        || api::OK,
        || {
            let bc = unsafe { rm!(RedisModule_GetBlockedClientHandle)(ctx) };
            let null = gone(bc).unwrap_or(NullKind::NullArray);
            match null {
                NullKind::NullArray => unsafe { rm!(RedisModule_ReplyWithNullArray)(ctx) },
                NullKind::NullBulk => unsafe { rm!(RedisModule_ReplyWithNull)(ctx) },
            }
        },
    )
}

fn null_reply(null: NullKind) -> super::Reply {
    match null {
        NullKind::NullArray => super::Reply::NullArray,
        NullKind::NullBulk => super::Reply::NullBulk,
    }
}

/// The timeout of waiter `id` (a module timer's data) passed.
extern "C" fn on_timer(_ctx: *mut RedisModuleCtx, data: *mut std::ffi::c_void) {
    guard(
        "blocking timeout timer",
        || (),
        || {
            let id = data as usize as u64;
            let st = STATE.get_mut();
            let Some(w) = st.waiters.get_mut(&id) else {
                return;
            };
            w.timer = None;
            if w.gone {
                return;
            }
            if w.in_flight {
                // Its attempt (or read) answers it when it is applied.
                w.timed_out = true;
                return;
            }
            if let Some(w) = remove(st, id) {
                super::unblock(w.bc, null_reply(w.null));
            }
        },
    );
}

extern "C" fn on_disconnect(_ctx: *mut RedisModuleCtx, bc: *mut RedisModuleBlockedClient) {
    guard(
        "blocking disconnect",
        || (),
        || {
            gone(bc);
        },
    );
}

/// Marks the waiter of `bc` gone; its handle is released once nothing is in flight.
fn gone(bc: *mut RedisModuleBlockedClient) -> Option<NullKind> {
    let st = STATE.get_mut();
    let id = *st.by_bc.get(&(bc as usize))?;
    let w = st.waiters.get_mut(&id)?;
    w.gone = true;
    // Redis answered it: nothing this module sends it later is on its way to it.
    st.clients.remove(&(bc as usize));
    if !w.in_flight {
        st.to_release.push(id);
    }
    Some(w.null)
}

fn strs(v: &Value) -> Option<Vec<Vec<u8>>> {
    match v {
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::Str(s) => Some(s.clone()),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

/// The command that puts back what a blocking command popped (`reply` is what it returned).
pub fn undo_command(argv: &[Vec<u8>], reply: &Value) -> Option<Vec<Vec<u8>>> {
    let name = argv.first()?;
    if eq(name, "blpop") || eq(name, "brpop") {
        let kv = strs(reply)?;
        let push = if eq(name, "blpop") { "LPUSH" } else { "RPUSH" };
        return Some(vec![
            push.as_bytes().to_vec(),
            kv.first()?.clone(),
            kv.get(1)?.clone(),
        ]);
    }
    if eq(name, "bzpopmin") || eq(name, "bzpopmax") {
        let kms = strs(reply)?;
        return Some(vec![
            b"ZADD".to_vec(),
            kms.first()?.clone(),
            kms.get(2)?.clone(),
            kms.get(1)?.clone(),
        ]);
    }
    if eq(name, "brpoplpush") {
        // Moved src tail -> dst head: move it back from dst head to src tail.
        return Some(vec![
            b"LMOVE".to_vec(),
            argv[2].clone(),
            argv[1].clone(),
            b"LEFT".to_vec(),
            b"RIGHT".to_vec(),
        ]);
    }
    if eq(name, "blmove") {
        // BLMOVE src dst <from> <to>: take it from dst where it was put, back to src.
        return Some(vec![
            b"LMOVE".to_vec(),
            argv.get(2)?.clone(),
            argv.get(1)?.clone(),
            argv.get(4)?.to_ascii_uppercase(),
            argv.get(3)?.to_ascii_uppercase(),
        ]);
    }
    if eq(name, "blmpop") {
        let Value::Array(items) = reply else {
            return None;
        };
        let (Some(Value::Str(key)), Some(vals)) = (items.first(), items.get(1).and_then(strs))
        else {
            return None;
        };
        let left = argv.iter().any(|a| eq(a, "left"));
        let mut v = vec![
            if left {
                b"LPUSH".to_vec()
            } else {
                b"RPUSH".to_vec()
            },
            key.clone(),
        ];
        v.extend(vals.into_iter().rev());
        return Some(v);
    }
    if eq(name, "bzmpop") {
        let Value::Array(items) = reply else {
            return None;
        };
        let (Some(Value::Str(key)), Some(Value::Array(pairs))) = (items.first(), items.get(1))
        else {
            return None;
        };
        let mut v = vec![b"ZADD".to_vec(), key.clone()];
        for p in pairs {
            let ms = strs(p)?;
            v.push(ms.get(1)?.clone());
            v.push(ms.first()?.clone());
        }
        return Some(v);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &[&str]) -> Vec<Vec<u8>> {
        s.iter().map(|x| x.as_bytes().to_vec()).collect()
    }

    fn s(x: &str) -> Value {
        Value::Str(x.as_bytes().to_vec())
    }

    #[test]
    fn recognises_blocking_commands() {
        assert_eq!(
            parse(&a(&["BLPOP", "a", "b", "1.5"])),
            Some(Spec {
                keys: a(&["a", "b"]),
                timeout_ms: 1500,
                null: NullKind::NullArray
            })
        );
        assert_eq!(
            parse(&a(&["BLPOP", "a", "-1"])),
            None,
            "Redis refuses a negative timeout itself"
        );
        assert_eq!(
            parse(&a(&["brpoplpush", "s", "d", "0"])).map(|s| s.null),
            Some(NullKind::NullBulk)
        );
        assert_eq!(
            parse(&a(&["BLMPOP", "2", "2", "x", "y", "LEFT"])).map(|s| (s.keys, s.timeout_ms)),
            Some((a(&["x", "y"]), 2000))
        );
        assert_eq!(
            parse(&a(&["BZMPOP", "0", "1", "z", "MIN", "COUNT", "2"])).map(|s| s.keys),
            Some(a(&["z"]))
        );
        assert_eq!(
            parse(&a(&[
                "XREADGROUP",
                "GROUP",
                "g",
                "c",
                "COUNT",
                "1",
                "BLOCK",
                "100",
                "STREAMS",
                "s1",
                "s2",
                ">",
                ">"
            ]))
            .map(|s| (s.keys, s.timeout_ms)),
            Some((a(&["s1", "s2"]), 100))
        );
        assert_eq!(
            parse(&a(&["XREADGROUP", "GROUP", "g", "c", "STREAMS", "s1", ">"])),
            None,
            "no BLOCK"
        );
        assert_eq!(
            parse(&a(&[
                "XREADGROUP",
                "GROUP",
                "g",
                "c",
                "BLOCK",
                "1",
                "STREAMS",
                "s1",
                "0"
            ])),
            None,
            "history"
        );
        assert_eq!(parse(&a(&["LPOP", "a"])), None);
    }

    #[test]
    fn undo_puts_back_what_was_popped() {
        let v = |x: Option<Vec<Vec<u8>>>| {
            x.map(|v| {
                v.into_iter()
                    .map(|b| String::from_utf8(b).unwrap())
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            v(undo_command(
                &a(&["BLPOP", "k", "0"]),
                &Value::Array(vec![s("k"), s("x")])
            )),
            Some(vec!["LPUSH".into(), "k".into(), "x".into()])
        );
        assert_eq!(
            v(undo_command(
                &a(&["BRPOP", "k", "0"]),
                &Value::Array(vec![s("k"), s("x")])
            )),
            Some(vec!["RPUSH".into(), "k".into(), "x".into()])
        );
        assert_eq!(
            v(undo_command(
                &a(&["BZPOPMIN", "z", "0"]),
                &Value::Array(vec![s("z"), s("m"), s("1.5")])
            )),
            Some(vec!["ZADD".into(), "z".into(), "1.5".into(), "m".into()])
        );
        assert_eq!(
            v(undo_command(
                &a(&["BLMOVE", "src", "dst", "left", "right", "0"]),
                &s("x")
            )),
            Some(vec![
                "LMOVE".into(),
                "dst".into(),
                "src".into(),
                "RIGHT".into(),
                "LEFT".into()
            ])
        );
        assert_eq!(
            v(undo_command(
                &a(&["BLMPOP", "0", "1", "k", "LEFT", "COUNT", "2"]),
                &Value::Array(vec![s("k"), Value::Array(vec![s("a"), s("b")])])
            )),
            Some(vec!["LPUSH".into(), "k".into(), "b".into(), "a".into()])
        );
    }
}
