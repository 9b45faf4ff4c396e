//! Consumer-group commands whose effect depends on the clock, made identical on every node.
//!
//! Redis stamps a pending entry's delivery time with its own clock when XREADGROUP, XCLAIM
//! or XAUTOCLAIM runs, and XCLAIM/XAUTOCLAIM decide what to claim by comparing that clock
//! with the delivery times (min-idle-time). Applied on each node at its own moment, that
//! would leave different delivery times, and later different claims, on different nodes.
//!
//! The leader therefore logs these commands as `RAFT._STREAM <leader-ms> <command ...>`
//! (rewrite.rs), and every node runs that entry here with `<leader-ms>` as "now":
//! - XREADGROUP runs as it is; the delivery times it just stamped are then set to
//!   `<leader-ms>` with `XCLAIM ... 0 <ids> TIME <leader-ms> JUSTID` (same consumer, same
//!   delivery count).
//! - XCLAIM: which IDs pass min-idle-time is decided here from the exact delivery times
//!   (read with XPENDING) and `<leader-ms>`; Redis then runs XCLAIM on exactly those IDs
//!   with min-idle-time 0 and an explicit TIME.
//! - XAUTOCLAIM: its PEL scan is replayed here the same way (attempts, COUNT, deleted
//!   entries, cursor); Redis claims the chosen IDs with XCLAIM ... TIME, and the reply is
//!   XAUTOCLAIM's: cursor, claimed entries, deleted IDs.
//!
//! Anything that does not parse as Redis would parse it runs unchanged: Redis answers it
//! with the same error on every node (errors come before any change).
//!
//! Clock: XCLAIM ... TIME t takes the node's own clock if t is in its future, so a node
//! whose clock is behind `<leader-ms>` waits for its clock to pass it (at most
//! `CLOCK_WAIT_MAX_MS`, then it logs a warning and goes on). Consumers' seen-time (XINFO)
//! stays each node's own clock: no command can set it.

use std::collections::HashMap;
use std::ffi::c_int;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::warn;

use super::api::{self, rm, CallOpts, RedisModuleCallReply, RedisModuleCtx, Value};
use super::rewrite::eq;

/// The name the leader logs these commands under.
pub const COMMAND: &str = "RAFT._STREAM";

/// How long a node whose clock is behind the leader's waits before applying a stream entry.
pub const CLOCK_WAIT_MAX_MS: i64 = 100;

/// XPENDING page size when replaying an XAUTOCLAIM scan.
const PAGE: usize = 256;

/// Tries at reading a page of delivery times within one millisecond of the node's clock.
const EXACT_READ_TRIES: usize = 100;

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// Parsing exactly as Redis 7.0 does (util.c string2ll / string2ull, t_stream.c IDs).

/// Redis's `string2ll`: optional '-', then "0" alone or a digit 1-9 and digits; no spaces.
pub fn string2ll(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() >= 21 {
        return None;
    }
    if s == b"0" {
        return Some(0);
    }
    let (neg, digits) = match s.split_first() {
        Some((b'-', rest)) if !rest.is_empty() => (true, rest),
        Some((b'-', _)) => return None,
        _ => (false, s),
    };
    let first = *digits.first()?;
    if !(b'1'..=b'9').contains(&first) {
        return None;
    }
    let mut v: u64 = 0;
    for &c in digits {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    if neg {
        if v > (i64::MAX as u64) + 1 {
            return None;
        }
        Some((v as i64).wrapping_neg())
    } else {
        i64::try_from(v).ok()
    }
}

/// C's `strtoull(s, &end, 10)` with Redis's check that it consumed the whole string.
fn strtoull(s: &[u8]) -> Option<u64> {
    let mut i = 0;
    while i < s.len() && matches!(s[i], b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r') {
        i += 1;
    }
    let mut neg = false;
    if i < s.len() && (s[i] == b'+' || s[i] == b'-') {
        neg = s[i] == b'-';
        i += 1;
    }
    let start = i;
    let mut v: u64 = 0;
    while i < s.len() && s[i].is_ascii_digit() {
        v = v.checked_mul(10)?.checked_add(u64::from(s[i] - b'0'))?;
        i += 1;
    }
    if i == start || i != s.len() {
        return None;
    }
    Some(if neg { v.wrapping_neg() } else { v })
}

/// Redis's `string2ull` on a C string.
fn string2ull(s: &[u8]) -> Option<u64> {
    match string2ll(s) {
        Some(v) if v < 0 => None,
        Some(v) => Some(v as u64),
        None => strtoull(s),
    }
}

/// A stream ID.
pub type Id = (u64, u64);

/// `streamParseStrictIDOrReply` with no missing-sequence default: `ms` or `ms-seq`.
pub fn parse_strict_id(arg: &[u8]) -> Option<Id> {
    if arg.len() > 127 {
        return None;
    }
    // Redis reads the argument as a C string.
    let s = match arg.iter().position(|&b| b == 0) {
        Some(n) => &arg[..n],
        None => arg,
    };
    if s == b"-" || s == b"+" {
        return None;
    }
    match s.iter().position(|&b| b == b'-') {
        Some(d) => Some((string2ull(&s[..d])?, string2ull(&s[d + 1..])?)),
        None => Some((string2ull(s)?, 0)),
    }
}

pub fn id_text(id: Id) -> Vec<u8> {
    format!("{}-{}", id.0, id.1).into_bytes()
}

/// XCLAIM's arguments as Redis 7.0 parses them.
#[derive(Debug, PartialEq, Eq)]
pub struct Xclaim {
    pub min_idle_ms: i64,
    pub ids: Vec<Id>,
    pub force: bool,
    pub justid: bool,
    pub retrycount: Option<i64>,
    pub lastid: Option<Vec<u8>>,
    /// The delivery time to set, with "now" the leader's clock.
    pub delivery_ms: i64,
}

/// `XCLAIM key group consumer min-idle id ... [options]`; None when Redis would refuse it.
pub fn parse_xclaim(argv: &[Vec<u8>], now: i64) -> Option<Xclaim> {
    if argv.len() < 6 {
        return None;
    }
    let min_idle_ms = string2ll(&argv[4])?.max(0);
    let mut j = 5;
    let mut ids = Vec::new();
    while j < argv.len() {
        match parse_strict_id(&argv[j]) {
            Some(id) => ids.push(id),
            None => break,
        }
        j += 1;
    }
    let mut x = Xclaim {
        min_idle_ms,
        ids,
        force: false,
        justid: false,
        retrycount: None,
        lastid: None,
        delivery_ms: -1,
    };
    while j < argv.len() {
        let more = j + 1 < argv.len();
        let opt = &argv[j];
        if eq(opt, "force") {
            x.force = true;
        } else if eq(opt, "justid") {
            x.justid = true;
        } else if eq(opt, "idle") && more {
            j += 1;
            x.delivery_ms = now.wrapping_sub(string2ll(&argv[j])?);
        } else if eq(opt, "time") && more {
            j += 1;
            x.delivery_ms = string2ll(&argv[j])?;
        } else if eq(opt, "retrycount") && more {
            j += 1;
            x.retrycount = Some(string2ll(&argv[j])?);
        } else if eq(opt, "lastid") && more {
            j += 1;
            parse_strict_id(&argv[j])?;
            x.lastid = Some(argv[j].clone());
        } else {
            return None;
        }
        j += 1;
    }
    if x.delivery_ms < 0 || x.delivery_ms > now {
        x.delivery_ms = now;
    }
    Some(x)
}

/// A pending entry: its owner and delivery time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nack {
    pub id: Id,
    pub consumer: Vec<u8>,
    pub delivery_ms: i64,
}

/// Which of XCLAIM's ID arguments (by position) Redis must be given, with min-idle-time 0,
/// to do what XCLAIM does with "now" = `now`: IDs that fail min-idle-time are left out;
/// the others (claimed, or no-ops Redis handles alike) are kept.
pub fn plan_xclaim(
    x: &Xclaim,
    consumer: &[u8],
    now: i64,
    exists: &mut dyn FnMut(Id) -> bool,
    mut pel: HashMap<Id, Option<Nack>>,
    lookup: &mut dyn FnMut(Id) -> Option<Nack>,
) -> Vec<usize> {
    let mut keep = Vec::new();
    for (pos, &id) in x.ids.iter().enumerate() {
        let nack = pel.entry(id).or_insert_with(|| lookup(id));
        if !exists(id) {
            // Redis drops it from the PEL and claims nothing.
            *nack = None;
            keep.push(pos);
            continue;
        }
        let claim = match nack {
            None => x.force,
            Some(n) => x.min_idle_ms == 0 || now - n.delivery_ms >= x.min_idle_ms,
        };
        if claim {
            *nack = Some(Nack {
                id,
                consumer: consumer.to_vec(),
                delivery_ms: x.delivery_ms,
            });
            keep.push(pos);
        }
    }
    keep
}

/// XAUTOCLAIM's arguments as Redis 7.0 parses them (the start ID is checked by XPENDING,
/// which parses it the same way).
#[derive(Debug, PartialEq, Eq)]
pub struct Xautoclaim {
    pub min_idle_ms: i64,
    pub count: i64,
    pub justid: bool,
}

pub fn parse_xautoclaim(argv: &[Vec<u8>]) -> Option<Xautoclaim> {
    if argv.len() < 6 {
        return None;
    }
    let min_idle_ms = string2ll(&argv[4])?.max(0);
    let mut x = Xautoclaim {
        min_idle_ms,
        count: 100,
        justid: false,
    };
    let mut j = 6;
    while j < argv.len() {
        let more = j + 1 < argv.len();
        if eq(&argv[j], "count") && more {
            let c = string2ll(&argv[j + 1])?;
            // Redis: 1 ..= LONG_MAX / max(sizeof(streamID), 10).
            if !(1..=i64::MAX / 16).contains(&c) {
                return None;
            }
            x.count = c;
            j += 1;
        } else if eq(&argv[j], "justid") {
            x.justid = true;
        } else {
            return None;
        }
        j += 1;
    }
    Some(x)
}

/// What XAUTOCLAIM does with "now" = `now`, replayed over the PEL from its start ID.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AutoclaimPlan {
    pub claimed: Vec<Id>,
    pub deleted: Vec<Id>,
    pub cursor: Id,
}

pub fn plan_xautoclaim(
    x: &Xautoclaim,
    now: i64,
    next: &mut dyn FnMut() -> Option<Nack>,
    exists: &mut dyn FnMut(Id) -> bool,
) -> AutoclaimPlan {
    let mut plan = AutoclaimPlan::default();
    let mut attempts = x.count.saturating_mul(10);
    let mut count = x.count;
    let mut eof = false;
    // Redis: while (attempts-- && count && raxNext(&ri)).
    while attempts > 0 && count > 0 {
        attempts -= 1;
        let Some(n) = next() else {
            eof = true;
            break;
        };
        if !exists(n.id) {
            plan.deleted.push(n.id);
            count -= 1;
            continue;
        }
        if x.min_idle_ms > 0 && now - n.delivery_ms < x.min_idle_ms {
            continue;
        }
        plan.claimed.push(n.id);
        count -= 1;
    }
    if !eof {
        if let Some(n) = next() {
            plan.cursor = n.id;
        }
    }
    plan
}

// ---------------------------------------------------------------------------------------
// Running a logged entry (main thread, apply path).

thread_local! {
    /// The apply path is executing an entry: RAFT._STREAM may run.
    static APPLYING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

pub fn set_applying(on: bool) {
    APPLYING.with(|a| a.set(on));
}

/// `RAFT._STREAM <leader-ms> <command ...>` (args without the command name).
pub fn run(ctx: *mut RedisModuleCtx, args: &[Vec<u8>]) -> c_int {
    if !APPLYING.with(|a| a.get()) {
        return api::reply_error(
            ctx,
            "ERR RAFT._STREAM is internal to redis-raft's apply path",
        );
    }
    let (Some(now), Some(cmd)) = (args.first().and_then(|t| string2ll(t)), args.get(1..)) else {
        return api::reply_error(
            ctx,
            "ERR wrong number of arguments for 'raft._stream' command",
        );
    };
    if cmd.is_empty() {
        return api::reply_error(
            ctx,
            "ERR wrong number of arguments for 'raft._stream' command",
        );
    }
    let opts = api::client_opts(ctx);
    wait_for_clock(now);
    let name = &cmd[0];
    if eq(name, "xreadgroup") {
        xreadgroup(ctx, cmd, now, opts)
    } else if eq(name, "xclaim") {
        xclaim(ctx, cmd, now, opts)
    } else if eq(name, "xautoclaim") {
        xautoclaim(ctx, cmd, now, opts)
    } else {
        reply_call(ctx, api::call(ctx, cmd, opts))
    }
}

/// XCLAIM ... TIME t uses the node's clock when t is in its future: let the clock pass t.
fn wait_for_clock(t: i64) {
    let behind = t - now_ms();
    if behind <= 0 {
        return;
    }
    if behind > CLOCK_WAIT_MAX_MS {
        warn!("this node's clock is {behind} ms behind the leader's: consumer-group delivery times here may differ from other nodes' (see README, clocks)");
        return;
    }
    std::thread::sleep(Duration::from_millis(behind as u64));
    while now_ms() < t {
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn reply_call(ctx: *mut RedisModuleCtx, r: *mut RedisModuleCallReply) -> c_int {
    if r.is_null() {
        return api::reply_error(ctx, "ERR the command could not be executed");
    }
    let rc = unsafe { rm!(RedisModule_ReplyWithCallReply)(ctx, r) };
    api::free_call_reply(r);
    rc
}

fn is_error(r: *mut RedisModuleCallReply) -> bool {
    r.is_null()
        || unsafe { rm!(RedisModule_CallReplyType)(r) } as isize
            == api::raw::REDISMODULE_REPLY_ERROR
}

/// Runs a helper command (RESP2); None if it failed.
fn call_value(ctx: *mut RedisModuleCtx, argv: &[Vec<u8>]) -> Option<Value> {
    api::call_checked(ctx, argv).ok()
}

fn v(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

/// Whether stream entry `id` exists.
fn entry_exists(ctx: *mut RedisModuleCtx, key: &[u8], id: Id) -> bool {
    let t = id_text(id);
    matches!(
        call_value(ctx, &[v("XRANGE"), key.to_vec(), t.clone(), t]),
        Some(Value::Array(a)) if !a.is_empty()
    )
}

/// Up to `count` pending entries from `start` (XPENDING syntax), with their exact delivery
/// times: XPENDING gives idle times against the node's clock, read here within one
/// millisecond of that clock. `Err` if the key or group is missing or `start` is invalid.
fn pending(
    ctx: *mut RedisModuleCtx,
    key: &[u8],
    group: &[u8],
    start: &[u8],
    end: &[u8],
    count: usize,
) -> Result<Option<Vec<Nack>>, ()> {
    let argv = [
        v("XPENDING"),
        key.to_vec(),
        group.to_vec(),
        start.to_vec(),
        end.to_vec(),
        count.to_string().into_bytes(),
    ];
    for _ in 0..EXACT_READ_TRIES {
        let t0 = now_ms();
        let r = api::call(ctx, &argv, CallOpts::default());
        let t1 = now_ms();
        if is_error(r) {
            api::free_call_reply(r);
            return Err(());
        }
        let val = api::call_reply_value(r);
        api::free_call_reply(r);
        if t0 != t1 {
            continue;
        }
        let Value::Array(items) = val else {
            return Err(());
        };
        let mut out = Vec::with_capacity(items.len());
        for it in items {
            let Value::Array(f) = it else { return Err(()) };
            let (Some(Value::Str(id)), Some(Value::Str(consumer)), Some(Value::Int(idle))) =
                (f.first(), f.get(1), f.get(2))
            else {
                return Err(());
            };
            let Some(id) = parse_strict_id(id) else {
                return Err(());
            };
            out.push(Nack {
                id,
                consumer: consumer.clone(),
                delivery_ms: t0 - idle,
            });
        }
        return Ok(Some(out));
    }
    Ok(None)
}

fn fallback(ctx: *mut RedisModuleCtx, cmd: &[Vec<u8>], opts: CallOpts, why: &str) -> c_int {
    warn!(
        "{why}: running {} with this node's clock",
        String::from_utf8_lossy(&cmd[0])
    );
    reply_call(ctx, api::call(ctx, cmd, opts))
}

fn xclaim(ctx: *mut RedisModuleCtx, cmd: &[Vec<u8>], now: i64, opts: CallOpts) -> c_int {
    // Missing key or group, wrong type, bad arguments: Redis's own error, no change.
    let Some(x) = parse_xclaim(cmd, now) else {
        return reply_call(ctx, api::call(ctx, cmd, opts));
    };
    let (key, group, consumer) = (&cmd[1], &cmd[2], &cmd[3]);
    if call_value(ctx, &[v("XPENDING"), key.clone(), group.clone()]).is_none() {
        return reply_call(ctx, api::call(ctx, cmd, opts));
    }
    let mut failed = false;
    let mut lookup = |id: Id| {
        let t = id_text(id);
        match pending(ctx, key, group, &t, &t, 1) {
            Ok(Some(mut n)) => n.pop(),
            _ => {
                failed = true;
                None
            }
        }
    };
    let mut exists = |id: Id| entry_exists(ctx, key, id);
    let keep = plan_xclaim(&x, consumer, now, &mut exists, HashMap::new(), &mut lookup);
    if failed {
        return fallback(ctx, cmd, opts, "could not read exact delivery times");
    }
    let mut argv = vec![
        v("XCLAIM"),
        key.clone(),
        group.clone(),
        consumer.clone(),
        v("0"),
    ];
    argv.extend(keep.iter().map(|&p| id_text(x.ids[p])));
    if keep.is_empty() {
        // XCLAIM needs an ID; 0-0 is never a stream entry, so it claims nothing.
        argv.push(v("0-0"));
    }
    argv.extend([v("TIME"), x.delivery_ms.to_string().into_bytes()]);
    if let Some(rc) = x.retrycount {
        argv.extend([v("RETRYCOUNT"), rc.to_string().into_bytes()]);
    }
    if x.force {
        argv.push(v("FORCE"));
    }
    if x.justid {
        argv.push(v("JUSTID"));
    }
    if let Some(l) = &x.lastid {
        argv.extend([v("LASTID"), l.clone()]);
    }
    reply_call(ctx, api::call(ctx, &argv, opts))
}

fn xautoclaim(ctx: *mut RedisModuleCtx, cmd: &[Vec<u8>], now: i64, opts: CallOpts) -> c_int {
    let Some(x) = parse_xautoclaim(cmd) else {
        return reply_call(ctx, api::call(ctx, cmd, opts));
    };
    let (key, group, consumer) = (&cmd[1], &cmd[2], &cmd[3]);
    // The PEL from the start ID, a page at a time.
    let mut buf: std::collections::VecDeque<Nack> = Default::default();
    let mut from: Vec<u8> = cmd[5].clone();
    let mut done = false;
    let mut failed = None;
    let mut first = true;
    let mut next = || {
        if buf.is_empty() && !done {
            match pending(ctx, key, group, &from, b"+", PAGE) {
                Ok(Some(page)) => {
                    done = page.len() < PAGE;
                    if let Some(last) = page.last() {
                        if last.id == (u64::MAX, u64::MAX) {
                            done = true;
                        }
                        let mut f = b"(".to_vec();
                        f.extend(id_text(last.id));
                        from = f;
                    }
                    buf.extend(page);
                }
                Ok(None) => {
                    failed = Some("could not read exact delivery times");
                    done = true;
                }
                Err(()) => {
                    // Only the first read can fail on the command's own arguments.
                    failed = Some(if first { "" } else { "could not read the PEL" });
                    done = true;
                }
            }
            first = false;
        }
        buf.pop_front()
    };
    let mut exists = |id: Id| entry_exists(ctx, key, id);
    let plan = plan_xautoclaim(&x, now, &mut next, &mut exists);
    match failed {
        // Missing key or group, wrong type, bad start ID: Redis's own error, no change.
        Some("") => return reply_call(ctx, api::call(ctx, cmd, opts)),
        Some(why) => return fallback(ctx, cmd, opts, why),
        None => {}
    }
    let mut ids: Vec<Id> = plan.claimed.iter().chain(&plan.deleted).copied().collect();
    ids.sort_unstable();
    let claimed = if ids.is_empty() {
        None
    } else {
        let mut argv = vec![
            v("XCLAIM"),
            key.clone(),
            group.clone(),
            consumer.clone(),
            v("0"),
        ];
        argv.extend(ids.iter().map(|&i| id_text(i)));
        argv.extend([v("TIME"), now.to_string().into_bytes()]);
        if x.justid {
            argv.push(v("JUSTID"));
        }
        let r = api::call(ctx, &argv, opts);
        if is_error(r) {
            return reply_call(ctx, r);
        }
        Some(r)
    };
    unsafe { rm!(RedisModule_ReplyWithArray)(ctx, 3) };
    api::reply_bulk(ctx, &id_text(plan.cursor));
    match claimed {
        Some(r) => {
            unsafe { rm!(RedisModule_ReplyWithCallReply)(ctx, r) };
            api::free_call_reply(r);
        }
        None => {
            unsafe { rm!(RedisModule_ReplyWithArray)(ctx, 0) };
        }
    }
    unsafe { rm!(RedisModule_ReplyWithArray)(ctx, plan.deleted.len() as std::ffi::c_long) };
    for d in &plan.deleted {
        api::reply_bulk(ctx, &id_text(*d));
    }
    api::OK
}

/// XREADGROUP's `GROUP g c`, NOACK, and STREAMS keys with their IDs.
struct ReadGroup {
    group: Vec<u8>,
    consumer: Vec<u8>,
    noack: bool,
    streams: Vec<(Vec<u8>, Vec<u8>)>,
}

fn parse_xreadgroup(argv: &[Vec<u8>]) -> Option<ReadGroup> {
    let mut i = 1;
    let mut group = None;
    let mut noack = false;
    while i < argv.len() {
        let a = &argv[i];
        if eq(a, "group") {
            group = Some((argv.get(i + 1)?.clone(), argv.get(i + 2)?.clone()));
            i += 3;
        } else if eq(a, "count") || eq(a, "block") {
            i += 2;
        } else if eq(a, "noack") {
            noack = true;
            i += 1;
        } else if eq(a, "streams") {
            let rest = &argv[i + 1..];
            if rest.is_empty() || !rest.len().is_multiple_of(2) {
                return None;
            }
            let (keys, ids) = rest.split_at(rest.len() / 2);
            let (group, consumer) = group?;
            let streams = keys.iter().cloned().zip(ids.iter().cloned()).collect();
            return Some(ReadGroup {
                group,
                consumer,
                noack,
                streams,
            });
        } else {
            return None;
        }
    }
    None
}

fn call_reply_bytes(r: *mut RedisModuleCallReply) -> Option<Vec<u8>> {
    match api::call_reply_value(r) {
        Value::Str(s) => Some(s),
        _ => None,
    }
}

/// The IDs with fields (not deleted) in one stream's part of an XREADGROUP reply.
fn delivered(entries: *mut RedisModuleCallReply) -> Vec<Id> {
    let mut out = Vec::new();
    let n = unsafe { rm!(RedisModule_CallReplyLength)(entries) };
    for i in 0..n {
        let e = unsafe { rm!(RedisModule_CallReplyArrayElement)(entries, i) };
        if e.is_null() || unsafe { rm!(RedisModule_CallReplyLength)(e) } < 2 {
            continue;
        }
        let id = unsafe { rm!(RedisModule_CallReplyArrayElement)(e, 0) };
        let fields = unsafe { rm!(RedisModule_CallReplyArrayElement)(e, 1) };
        let has_fields = !fields.is_null()
            && unsafe { rm!(RedisModule_CallReplyType)(fields) } as isize
                == api::raw::REDISMODULE_REPLY_ARRAY;
        if let (true, Some(id)) = (
            has_fields,
            call_reply_bytes(id).and_then(|b| parse_strict_id(&b)),
        ) {
            out.push(id);
        }
    }
    out
}

/// (stream key, entries reply) pairs of an XREADGROUP reply: an array of [key, entries]
/// (RESP2) or a map key → entries (RESP3).
fn reply_streams(r: *mut RedisModuleCallReply) -> Vec<(Vec<u8>, *mut RedisModuleCallReply)> {
    let t = unsafe { rm!(RedisModule_CallReplyType)(r) } as isize;
    let n = unsafe { rm!(RedisModule_CallReplyLength)(r) };
    let mut out = Vec::new();
    for i in 0..n {
        let (k, e) = if t == api::raw::REDISMODULE_REPLY_MAP {
            let mut k = std::ptr::null_mut();
            let mut e = std::ptr::null_mut();
            unsafe { rm!(RedisModule_CallReplyMapElement)(r, i, &mut k, &mut e) };
            (k, e)
        } else if t == api::raw::REDISMODULE_REPLY_ARRAY {
            let pair = unsafe { rm!(RedisModule_CallReplyArrayElement)(r, i) };
            if pair.is_null() {
                continue;
            }
            unsafe {
                (
                    rm!(RedisModule_CallReplyArrayElement)(pair, 0),
                    rm!(RedisModule_CallReplyArrayElement)(pair, 1),
                )
            }
        } else {
            return out;
        };
        if k.is_null() || e.is_null() {
            continue;
        }
        if let Some(key) = call_reply_bytes(k) {
            out.push((key, e));
        }
    }
    out
}

fn xreadgroup(ctx: *mut RedisModuleCtx, cmd: &[Vec<u8>], now: i64, opts: CallOpts) -> c_int {
    let r = api::call(ctx, cmd, opts);
    if is_error(r) {
        return reply_call(ctx, r);
    }
    if let Some(ReadGroup {
        group,
        consumer,
        noack,
        streams,
    }) = parse_xreadgroup(cmd)
    {
        let mut fixes: Vec<(Vec<u8>, Vec<Id>)> = Vec::new();
        for (key, entries) in reply_streams(r) {
            let Some((_, id)) = streams.iter().find(|(k, _)| *k == key) else {
                continue;
            };
            // New entries read with NOACK get no pending entry; history reads always
            // stamp the entries they return.
            if noack && id.as_slice() == b">" {
                continue;
            }
            let ids = delivered(entries);
            if !ids.is_empty() {
                fixes.push((key, ids));
            }
        }
        for (key, ids) in fixes {
            let mut argv = vec![v("XCLAIM"), key, group.clone(), consumer.clone(), v("0")];
            argv.extend(ids.into_iter().map(id_text));
            argv.extend([v("TIME"), now.to_string().into_bytes(), v("JUSTID")]);
            api::free_call_reply(api::call(ctx, &argv, CallOpts::default()));
        }
    }
    reply_call(ctx, r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &[&str]) -> Vec<Vec<u8>> {
        s.iter().map(|x| x.as_bytes().to_vec()).collect()
    }

    #[test]
    fn numbers_and_ids_parse_as_in_redis() {
        assert_eq!(string2ll(b"0"), Some(0));
        assert_eq!(string2ll(b"-12"), Some(-12));
        assert_eq!(string2ll(b"01"), None);
        assert_eq!(string2ll(b"+1"), None);
        assert_eq!(string2ll(b" 1"), None);
        assert_eq!(string2ll(b"-"), None);
        assert_eq!(string2ll(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(string2ll(b"-9223372036854775808"), Some(i64::MIN));
        assert_eq!(string2ll(b"9223372036854775808"), None);
        assert_eq!(parse_strict_id(b"5-3"), Some((5, 3)));
        assert_eq!(parse_strict_id(b"5"), Some((5, 0)));
        assert_eq!(parse_strict_id(b"-"), None);
        assert_eq!(parse_strict_id(b"+"), None);
        assert_eq!(parse_strict_id(b"5-*"), None);
        assert_eq!(parse_strict_id(b"FORCE"), None);
        // strtoull's leniency, which Redis inherits.
        assert_eq!(parse_strict_id(b"007-+2"), Some((7, 2)));
        assert_eq!(parse_strict_id(b" 1-1"), Some((1, 1)));
        assert_eq!(
            parse_strict_id(b"1--1"),
            None,
            "string2ll refuses a negative"
        );
        assert_eq!(
            parse_strict_id(b"18446744073709551615-18446744073709551615"),
            Some((u64::MAX, u64::MAX))
        );
        assert_eq!(parse_strict_id(b"18446744073709551616"), None);
    }

    #[test]
    fn xclaim_options_parse_as_in_redis() {
        let x = parse_xclaim(
            &a(&[
                "XCLAIM",
                "s",
                "g",
                "c",
                "100",
                "1-1",
                "2",
                "IDLE",
                "30",
                "RETRYCOUNT",
                "4",
                "FORCE",
                "JUSTID",
                "LASTID",
                "9-9",
            ]),
            1000,
        )
        .unwrap();
        assert_eq!(x.ids, vec![(1, 1), (2, 0)]);
        assert_eq!(x.delivery_ms, 970);
        assert_eq!(x.retrycount, Some(4));
        assert!(x.force && x.justid);
        assert_eq!(x.lastid, Some(b"9-9".to_vec()));
        // TIME in the future or negative means now; the last of IDLE/TIME wins.
        let t = |args: &[&str]| parse_xclaim(&a(args), 1000).map(|x| x.delivery_ms);
        assert_eq!(
            t(&["XCLAIM", "s", "g", "c", "0", "1", "TIME", "5000"]),
            Some(1000)
        );
        assert_eq!(
            t(&["XCLAIM", "s", "g", "c", "0", "1", "TIME", "-5"]),
            Some(1000)
        );
        assert_eq!(
            t(&["XCLAIM", "s", "g", "c", "0", "1", "TIME", "5", "IDLE", "10"]),
            Some(990)
        );
        assert_eq!(t(&["XCLAIM", "s", "g", "c", "-7", "1"]), Some(1000));
        // What Redis refuses is left to Redis.
        assert_eq!(t(&["XCLAIM", "s", "g", "c", "x", "1"]), None);
        assert_eq!(t(&["XCLAIM", "s", "g", "c", "0", "1", "IDLE"]), None);
        assert_eq!(t(&["XCLAIM", "s", "g", "c", "0", "1", "NOPE"]), None);
        assert_eq!(t(&["XCLAIM", "s", "g", "c", "0", "1", "FORCE", "2"]), None);
        assert_eq!(t(&["XCLAIM", "s", "g", "c", "0", "1", "LASTID", "x"]), None);
    }

    fn nack(id: Id, c: &str, at: i64) -> Nack {
        Nack {
            id,
            consumer: c.as_bytes().to_vec(),
            delivery_ms: at,
        }
    }

    #[test]
    fn xclaim_keeps_only_ids_idle_long_enough_at_the_leaders_time() {
        let x = parse_xclaim(
            &a(&["XCLAIM", "s", "g", "me", "100", "1", "2", "3", "4", "1"]),
            1000,
        )
        .unwrap();
        let pel: HashMap<Id, Nack> = [
            ((1, 0), nack((1, 0), "a", 900)),
            ((2, 0), nack((2, 0), "a", 901)),
            ((3, 0), nack((3, 0), "a", 0)),
        ]
        .into_iter()
        .collect();
        let mut lookup = |id: Id| pel.get(&id).cloned();
        // 3 was deleted from the stream: kept, so Redis drops it from the PEL.
        let mut exists = |id: Id| id != (3, 0);
        let keep = plan_xclaim(&x, b"me", 1000, &mut exists, HashMap::new(), &mut lookup);
        // 1: idle 100 -> claimed; 2: idle 99 -> not; 3: deleted; 4: not pending, no
        // FORCE -> not; 1 again: just claimed at 1000, idle 0 -> not.
        assert_eq!(keep, vec![0, 2]);
        let x = parse_xclaim(&a(&["XCLAIM", "s", "g", "me", "0", "4", "FORCE"]), 1000).unwrap();
        let keep = plan_xclaim(&x, b"me", 1000, &mut |_| true, HashMap::new(), &mut |_| {
            None
        });
        assert_eq!(keep, vec![0], "FORCE creates the pending entry");
    }

    #[test]
    fn xautoclaim_replays_the_scan_with_attempts_count_and_cursor() {
        let pel = vec![
            nack((1, 0), "a", 500),
            nack((2, 0), "a", 990),
            nack((3, 0), "a", 500),
            nack((4, 0), "a", 500),
            nack((5, 0), "a", 500),
        ];
        let run = |x: Xautoclaim, deleted: &[Id]| {
            let mut it = pel.clone().into_iter();
            plan_xautoclaim(&x, 1000, &mut || it.next(), &mut |id| {
                !deleted.contains(&id)
            })
        };
        let x = |min_idle_ms, count| Xautoclaim {
            min_idle_ms,
            count,
            justid: false,
        };
        assert_eq!(
            run(x(100, 2), &[]),
            AutoclaimPlan {
                claimed: vec![(1, 0), (3, 0)],
                deleted: vec![],
                cursor: (4, 0)
            }
        );
        assert_eq!(
            run(x(100, 10), &[(4, 0)]),
            AutoclaimPlan {
                claimed: vec![(1, 0), (3, 0), (5, 0)],
                deleted: vec![(4, 0)],
                cursor: (0, 0)
            }
        );
        // COUNT 1 allows 10 attempts; a deleted entry uses up the count.
        assert_eq!(
            run(x(0, 1), &[(1, 0)]),
            AutoclaimPlan {
                claimed: vec![],
                deleted: vec![(1, 0)],
                cursor: (2, 0)
            }
        );
        assert_eq!(
            parse_xautoclaim(&a(&["XAUTOCLAIM", "s", "g", "c", "10", "0", "COUNT", "0"])),
            None
        );
        assert_eq!(
            parse_xautoclaim(&a(&["XAUTOCLAIM", "s", "g", "c", "10", "0", "JUSTID"])),
            Some(Xautoclaim {
                min_idle_ms: 10,
                count: 100,
                justid: true
            })
        );
    }

    #[test]
    fn xreadgroup_arguments() {
        let p = parse_xreadgroup(&a(&[
            "XREADGROUP",
            "GROUP",
            "g",
            "c",
            "COUNT",
            "2",
            "NOACK",
            "STREAMS",
            "s1",
            "s2",
            ">",
            "0",
        ]))
        .unwrap();
        assert_eq!(p.group, b"g");
        assert_eq!(p.consumer, b"c");
        assert!(p.noack);
        assert_eq!(p.streams[1], (b"s2".to_vec(), b"0".to_vec()));
    }
}
