//! Scripts (EVAL, EVALSHA, FCALL) run again on every node when their entry is applied, so
//! what they compute must not depend on the node: inside a script on the apply path,
//! commands whose results Redis marks as random are refused, and commands whose output order
//! is arbitrary (SMEMBERS, HGETALL, KEYS ...) get their reply sorted. XREADGROUP is refused
//! too unless it records no delivery (NOACK of new entries only): it stamps delivery times
//! with each node's clock, which only a command logged by the leader avoids (streams.rs).
//!
//! A second command filter, registered without `NOSELF` so it sees the commands a script
//! runs, does this only while the apply path is executing an entry (`set_applying`); it
//! routes such commands to `RAFT._REJECT` / `RAFT._SORT` (commands/mod.rs).
//!
//! Snapshots carry what the keys do not: the function libraries (FUNCTION DUMP) and the
//! script cache. Redis cannot list its script cache, and from 7.4 on (Valkey from 8.0) it
//! keeps only the 500 most recently used of the scripts EVAL loaded, which reads served by
//! one node reorder there only. So the module keeps its own book of the scripts, changed
//! only by applied entries, in log order (`ScriptBook`, which evicts as Redis 7.4 does, on
//! every server), and it decides EVALSHA entries: one whose script the book lacks answers
//! NOSCRIPT on every node without running; one it holds runs on every node, as EVAL of the
//! body where this node's Redis evicted it. A snapshot carries the book (`saved`), and a
//! node that loads one gets it back (`restore`).
//!
//! So that every node's cache holds the same scripts, EVAL_RO of a script the book lacks
//! goes through the log like a write (`logs_read`), though it writes nothing: served as a
//! read on one node, it would put its script in that node's cache only. Later EVAL_RO of
//! that script are reads again.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};

use super::api::{self, guard, raw, rm, RedisModuleCallReply, RedisModuleCtx};
use super::classify::{Class, CommandTable, InScript};
use super::{module, MainThread};

thread_local! {
    /// The apply path is executing a script (what it runs must be deterministic).
    static APPLYING: Cell<bool> = const { Cell::new(false) };
    /// RAFT._SORT is running its inner command: let it through untouched.
    static SORTING: Cell<bool> = const { Cell::new(false) };
}

pub fn set_applying(on: bool) {
    APPLYING.with(|a| a.set(on));
}

pub fn set_sorting(on: bool) {
    SORTING.with(|a| a.set(on));
}

/// How many of the scripts EVAL loaded Redis 7.4 (and Valkey 8) keeps. The book keeps as
/// many on every server, so that nodes of different versions (during an upgrade) decide
/// EVALSHA entries alike.
const EVICTABLE_SCRIPTS: usize = 500;

/// The scripts applied entries put in the script cache, as Redis 7.4 holds them: those
/// SCRIPT LOAD brought first are never evicted; of those EVAL or EVAL_RO brought, only the
/// `limit` most recently used by an applied EVAL, EVALSHA or their read-only forms are kept.
/// Reads served by one node change nothing here.
pub struct ScriptBook {
    /// By SHA-1 (lower-case hex).
    scripts: HashMap<String, Script>,
    /// The evictable scripts by last use, oldest first.
    by_use: BTreeMap<u64, String>,
    clock: u64,
    /// None: keep every script (tests).
    limit: Option<usize>,
}

impl Default for ScriptBook {
    fn default() -> ScriptBook {
        ScriptBook {
            scripts: HashMap::new(),
            by_use: BTreeMap::new(),
            clock: 0,
            limit: Some(EVICTABLE_SCRIPTS),
        }
    }
}

struct Script {
    body: Vec<u8>,
    /// When an applied entry last used it; None if SCRIPT LOAD brought it (never evicted).
    used: Option<u64>,
}

impl ScriptBook {
    #[cfg(test)]
    fn new(limit: Option<usize>) -> ScriptBook {
        ScriptBook {
            limit,
            ..ScriptBook::default()
        }
    }

    pub fn body(&self, sha: &str) -> Option<&[u8]> {
        self.scripts.get(sha).map(|s| s.body.as_slice())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.scripts.len()
    }

    /// SCRIPT LOAD: a script it brings is never evicted; one EVAL brought stays evictable.
    pub fn loaded(&mut self, sha: String, body: &[u8]) {
        self.scripts.entry(sha).or_insert_with(|| Script {
            body: body.to_vec(),
            used: None,
        });
    }

    /// EVAL or EVAL_RO ran `body`: it is the most recently used, and the least recently
    /// used beyond the limit are evicted.
    pub fn evaluated(&mut self, sha: String, body: &[u8]) {
        if !self.scripts.contains_key(&sha) {
            self.scripts.insert(
                sha.clone(),
                Script {
                    body: body.to_vec(),
                    used: None,
                },
            );
            self.touch(sha);
            while self.limit.is_some_and(|l| self.by_use.len() > l) {
                if let Some((_, old)) = self.by_use.pop_first() {
                    self.scripts.remove(&old);
                }
            }
        } else {
            self.used(&sha);
        }
    }

    /// EVALSHA or EVALSHA_RO ran the script: it is the most recently used.
    pub fn used(&mut self, sha: &str) {
        if self.scripts.get(sha).is_some_and(|s| s.used.is_some()) {
            self.touch(sha.to_string());
        }
    }

    fn touch(&mut self, sha: String) {
        self.clock += 1;
        let Some(s) = self.scripts.get_mut(&sha) else {
            return;
        };
        if let Some(old) = s.used.replace(self.clock) {
            self.by_use.remove(&old);
        }
        self.by_use.insert(self.clock, sha);
    }

    pub fn clear(&mut self) {
        self.scripts.clear();
        self.by_use.clear();
    }

    /// For a snapshot: the bodies of the scripts never evicted (by SHA-1), then of the
    /// others, least recently used first; and how many are of the first kind.
    pub fn saved(&self) -> (Vec<Vec<u8>>, u64) {
        let mut kept: Vec<(&String, &Script)> = self
            .scripts
            .iter()
            .filter(|(_, s)| s.used.is_none())
            .collect();
        kept.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let permanent = kept.len() as u64;
        let mut bodies: Vec<Vec<u8>> = kept.into_iter().map(|(_, s)| s.body.clone()).collect();
        bodies.extend(
            self.by_use
                .values()
                .filter_map(|sha| self.scripts.get(sha))
                .map(|s| s.body.clone()),
        );
        (bodies, permanent)
    }

    /// A snapshot's scripts (see `saved`). `permanent` None: a snapshot from before the
    /// order was kept, whose scripts Redis now holds as SCRIPT LOAD brought them.
    pub fn restore(&mut self, bodies: Vec<Vec<u8>>, permanent: Option<u64>) {
        self.clear();
        let permanent = permanent.map_or(bodies.len(), |p| p.min(bodies.len() as u64) as usize);
        for (i, body) in bodies.into_iter().enumerate() {
            if i < permanent {
                self.loaded(sha1_hex(&body), &body);
            } else {
                self.evaluated(sha1_hex(&body), &body);
            }
        }
    }
}

/// The scripts applied entries put in the script cache (`ScriptBook`).
static BOOK: MainThread<ScriptBook> = MainThread::new_lazy();

fn is(arg: Option<&Vec<u8>>, name: &str) -> bool {
    arg.is_some_and(|a| a.eq_ignore_ascii_case(name.as_bytes()))
}

/// A script's name in the script cache: the SHA-1 of its body, in lower-case hex.
fn sha1_hex(body: &[u8]) -> String {
    sha1_smol::Sha1::from(body).digest().to_string()
}

/// EVAL_RO of a script the book lacks: it must go through the log (every node caches its
/// script), not be served as a read on one node.
pub fn logs_read(name: &[u8], body: Option<&[u8]>) -> bool {
    name.eq_ignore_ascii_case(b"eval_ro")
        && body.is_some_and(|b| BOOK.get_mut().body(&sha1_hex(b)).is_none())
}

/// The arguments of a command that name scripts by SHA-1 and that a node may answer without
/// the log (a read, SCRIPT EXISTS): EVALSHA_RO's (and EVALSHA's, run as a read where nothing
/// can be written: replicas.rs) when its number of keys is one Redis accepts (it checks that
/// first), and SCRIPT EXISTS's. None where `raft.ignored-commands` leaves scripts to each
/// node: then the book does not hold what Redis does. `arg(i)`: the command's argument `i`.
pub fn sha_args<'a>(
    table: &CommandTable,
    argc: usize,
    arg: impl Fn(usize) -> &'a [u8],
) -> std::ops::Range<usize> {
    if argc < 2 {
        return 0..0;
    }
    let (name, sub) = (arg(0), arg(1));
    if name.eq_ignore_ascii_case(b"script") && sub.eq_ignore_ascii_case(b"exists") {
        if table.classify(b"script", Some(b"load")) == Class::Write {
            return 2..argc;
        }
    } else if (name.eq_ignore_ascii_case(b"evalsha_ro") || name.eq_ignore_ascii_case(b"evalsha"))
        && table.classify(name, None) != Class::Local
        && argc >= 3
        && numkeys_accepted(argc, arg(2))
    {
        return 1..2;
    }
    0..0
}

/// What stands for a script the book lacks: a SHA-1 that matches nothing (not 40 characters
/// long), so Redis answers as for a script it lacks, in its own words: NOSCRIPT, or 0 from
/// SCRIPT EXISTS.
pub const UNKNOWN_SHA: &[u8] = b"-";

/// Whether the book lacks the script named `sha` (in either case, as Redis matches them).
/// Redis may hold scripts the book dropped (7.0 and 7.2 keep every script; a node's reads
/// reorder Redis's own eviction): a node answers for them as its EVALSHA entries do.
pub fn book_lacks(sha: &[u8]) -> bool {
    sha.len() != 40 || BOOK.get_mut().body(&book_key(sha)).is_none()
}

/// The book's name for the script a SHA-1 argument names (Redis matches either case).
fn book_key(sha: &[u8]) -> String {
    String::from_utf8_lossy(sha).to_ascii_lowercase()
}

/// A read or SCRIPT EXISTS about to run on this node, as it must run to answer by the book
/// (`shas`: its `sha_args`; `book_lacks`); None if it names no script the book lacks.
fn answered_by_book(shas: std::ops::Range<usize>, argv: &[Vec<u8>]) -> Option<Vec<Vec<u8>>> {
    let lacking: Vec<usize> = shas.filter(|&i| book_lacks(&argv[i])).collect();
    if lacking.is_empty() {
        return None;
    }
    let mut asked = argv.to_vec();
    for i in lacking {
        asked[i] = UNKNOWN_SHA.to_vec();
    }
    Some(asked)
}

/// EVALSHA or EVALSHA_RO of an entry: the script's SHA-1 as the book names it. None too if
/// Redis refuses it before it looks the script up (its number of keys), alike everywhere.
fn evalsha_target(argv: &[Vec<u8>]) -> Option<String> {
    if !(is(argv.first(), "evalsha") || is(argv.first(), "evalsha_ro")) || !numkeys_valid(argv) {
        return None;
    }
    Some(book_key(argv.get(1)?))
}

/// EVAL's or EVALSHA's number of keys is one Redis accepts: it checks it before it looks
/// up, compiles or caches the script.
fn numkeys_valid(argv: &[Vec<u8>]) -> bool {
    argv.len() >= 3 && numkeys_accepted(argv.len(), &argv[2])
}

/// `numkeys`, the third of `argc` arguments, counts no more keys than follow it.
fn numkeys_accepted(argc: usize, numkeys: &[u8]) -> bool {
    let args = argc.saturating_sub(3) as i64;
    super::streams::string2ll(numkeys).is_some_and(|n| (0..=args).contains(&n))
}

/// Runs an entry's command through `call`, deciding EVALSHA by the book (`run_by_book`), and
/// notes what the command did to the script cache.
pub fn run_applied(
    ctx: *mut RedisModuleCtx,
    argv: &[Vec<u8>],
    call: impl Fn(&[Vec<u8>]) -> *mut RedisModuleCallReply,
) -> *mut RedisModuleCallReply {
    let Some(sha) = evalsha_target(argv) else {
        let r = call(argv);
        note_command(ctx, argv, r);
        return r;
    };
    let r = run_by_book(ctx, argv, &sha, &call);
    BOOK.get_mut().used(&sha);
    r
}

/// A read or node-local command that runs on this node outside the log, answered by the book
/// as the log's EVALSHA entries are: EVALSHA_RO by `run_by_book`, SCRIPT EXISTS by
/// `answered_by_book`. The book does not change: what one node serves is not a use.
pub fn run_read(
    ctx: *mut RedisModuleCtx,
    argv: &[Vec<u8>],
    call: impl Fn(&[Vec<u8>]) -> *mut RedisModuleCallReply,
) -> *mut RedisModuleCallReply {
    let Some(m) = module() else {
        return call(argv);
    };
    let shas = sha_args(m.table(), argv.len(), |i| &argv[i]);
    if shas == (1..2) {
        // EVALSHA(_RO): SCRIPT EXISTS's start at 2.
        return run_by_book(ctx, argv, &book_key(&argv[1]), &call);
    }
    match answered_by_book(shas, argv) {
        Some(asked) => call(&asked),
        None => call(argv),
    }
}

/// EVALSHA or EVALSHA_RO of the script the book names `sha`: one the book lacks answers
/// NOSCRIPT without running; one it holds runs, as EVAL of its body if this node's Redis
/// evicted it (Redis answered NOSCRIPT and lacks it: not the script's own error).
fn run_by_book(
    ctx: *mut RedisModuleCtx,
    argv: &[Vec<u8>],
    sha: &str,
    call: &impl Fn(&[Vec<u8>]) -> *mut RedisModuleCallReply,
) -> *mut RedisModuleCallReply {
    if BOOK.get_mut().body(sha).is_none() {
        // A SHA-1 that is not 40 characters long matches nothing: Redis answers its own
        // NOSCRIPT at once, whatever it holds (Valkey words it otherwise than Redis).
        let mut miss = argv.to_vec();
        miss[1] = UNKNOWN_SHA.to_vec();
        return call(&miss);
    }
    let r = call(argv);
    if !api::reply_error_starts_with(r, b"NOSCRIPT") || exists(ctx, sha) {
        return r;
    }
    // A script runs no SCRIPT command: the book still holds the body.
    let Some(body) = BOOK.get_mut().body(sha).map(|b| b.to_vec()) else {
        return r;
    };
    api::free_call_reply(r);
    let eval: &[u8] = if is(argv.first(), "evalsha_ro") {
        b"EVAL_RO"
    } else {
        b"EVAL"
    };
    let mut again = vec![eval.to_vec(), body];
    again.extend_from_slice(&argv[2..]);
    call(&again)
}

/// An entry's script is skipped on this node: a kill stopped it on the leader before it
/// wrote (busy.rs). The nodes that were running it had cached it (Redis caches an EVAL's
/// script before running it) and counted a use, so this node does the same, without running
/// it.
pub fn cache_skipped(ctx: *mut RedisModuleCtx, argv: &[Vec<u8>]) {
    if let Some(sha) = evalsha_target(argv) {
        BOOK.get_mut().used(&sha);
        return;
    }
    if !(is(argv.first(), "eval") || is(argv.first(), "eval_ro")) || !numkeys_valid(argv) {
        return;
    }
    let body = &argv[1];
    // A body Redis refuses is refused alike where it ran.
    if api::call_checked(ctx, &[b"SCRIPT".to_vec(), b"LOAD".to_vec(), body.clone()]).is_ok() {
        BOOK.get_mut().evaluated(sha1_hex(body), body);
    }
}

/// An entry's command ran and answered `r`: what it did to the script cache goes in the
/// book. Redis caches an EVAL's script once it accepted its number of keys and compiled it;
/// whether it compiled, `exists` tells alike on every node (if this node's Redis held it
/// already, it compiled before).
fn note_command(ctx: *mut RedisModuleCtx, argv: &[Vec<u8>], r: *mut RedisModuleCallReply) {
    let evaluated = is(argv.first(), "eval") || is(argv.first(), "eval_ro");
    if evaluated {
        if !numkeys_valid(argv) {
            return;
        }
        let body = &argv[1];
        let sha = sha1_hex(body);
        let book = BOOK.get_mut();
        // It failed: it is cached if it compiled (the script's own error, or a kill).
        if book.body(&sha).is_none() && api::reply_is_error(r) && !exists(ctx, &sha) {
            return;
        }
        book.evaluated(sha, body);
    } else if is(argv.first(), "script") && !api::reply_is_error(r) {
        if is(argv.get(1), "load") {
            if let Some(body) = argv.get(2) {
                BOOK.get_mut().loaded(sha1_hex(body), body);
            }
        } else if is(argv.get(1), "flush") {
            BOOK.get_mut().clear();
        }
    }
}

/// Whether Redis's script cache holds `sha`.
fn exists(ctx: *mut RedisModuleCtx, sha: &str) -> bool {
    let argv = [
        b"SCRIPT".to_vec(),
        b"EXISTS".to_vec(),
        sha.as_bytes().to_vec(),
    ];
    matches!(api::call_checked(ctx, &argv), Ok(api::Value::Array(v)) if v == [api::Value::Int(1)])
}

/// What a snapshot carries of the functions and scripts.
pub struct Saved {
    /// FUNCTION DUMP's payload: the function libraries.
    pub functions: Vec<u8>,
    /// The book's scripts, and their order (`ScriptBook::saved`).
    pub scripts: Vec<Vec<u8>>,
    pub order: crate::codec::ScriptOrder,
}

/// The function libraries and the book of scripts, for a snapshot of the applied index.
pub fn saved(ctx: *mut RedisModuleCtx) -> Result<Saved, String> {
    let functions = match api::call_checked(ctx, &[b"FUNCTION".to_vec(), b"DUMP".to_vec()])? {
        api::Value::Str(payload) => payload,
        other => return Err(format!("FUNCTION DUMP answered {other:?}")),
    };
    let (scripts, permanent) = BOOK.get_mut().saved();
    Ok(Saved {
        functions,
        scripts,
        order: crate::codec::ScriptOrder { permanent },
    })
}

/// A snapshot was loaded: its function libraries and scripts replace this node's.
pub fn restore(
    ctx: *mut RedisModuleCtx,
    functions: &[u8],
    scripts: Vec<Vec<u8>>,
    permanent: Option<u64>,
) {
    let call = |argv: &[&[u8]]| {
        let argv: Vec<Vec<u8>> = argv.iter().map(|a| a.to_vec()).collect();
        api::call_checked(ctx, &argv)
    };
    let mut failed = Vec::new();
    if let Err(e) = call(&[b"FUNCTION", b"FLUSH", b"SYNC"]) {
        failed.push(format!("FUNCTION FLUSH: {e}"));
    }
    if let Err(e) = call(&[b"FUNCTION", b"RESTORE", functions]) {
        failed.push(format!("FUNCTION RESTORE: {e}"));
    }
    if let Err(e) = call(&[b"SCRIPT", b"FLUSH", b"SYNC"]) {
        failed.push(format!("SCRIPT FLUSH: {e}"));
    }
    for body in &scripts {
        // The book decides EVALSHA entries; Redis's cache serves this node's reads.
        let _ = call(&[b"SCRIPT", b"LOAD", body]);
    }
    BOOK.get_mut().restore(scripts, permanent);
    for f in failed {
        tracing::error!("restoring the snapshot's functions and scripts: {f}; FCALL entries may fail on this node where they succeed on others");
    }
}

pub extern "C" fn filter(fctx: *mut raw::RedisModuleCommandFilterCtx) {
    if !APPLYING.with(|a| a.get()) || SORTING.with(|a| a.get()) {
        return;
    }
    guard(
        "script filter",
        || (),
        || unsafe {
            let Some(m) = module() else { return };
            let argc = rm!(RedisModule_CommandFilterArgsCount)(fctx);
            if argc < 1 {
                return;
            }
            let name = api::str_bytes(rm!(RedisModule_CommandFilterArgGet)(fctx, 0));
            if name.len() >= 5 && name[..5].eq_ignore_ascii_case(b"raft.") {
                return;
            }
            let sub =
                (argc > 1).then(|| api::str_bytes(rm!(RedisModule_CommandFilterArgGet)(fctx, 1)));
            // Clients' commands that Redis runs from inside a busy script reach only this
            // filter (the main one is NOSELF, and the module is inside the script's call).
            // Scripts may not call these (deny-script), nor what they are routed to.
            let from_client: Option<&[u8]> = if super::busy::routes_kill(name, sub) {
                Some(b"RAFT._KILL")
            } else if m.table().classify(name, sub) == Class::Transaction {
                // Not into a MULTI of Redis's own: RAFT answers BUSY, as Redis does to the rest.
                Some(b"RAFT")
            } else {
                None
            };
            if let Some(prefix) = from_client {
                let s = api::create_string(std::ptr::null_mut(), prefix);
                rm!(RedisModule_CommandFilterArgInsert)(fctx, 0, s);
                return;
            }
            let verdict = match m.table().in_script(name, sub) {
                // XADD is random only with a generated ID; with an explicit one it is not.
                InScript::Refuse if name.eq_ignore_ascii_case(b"xadd") => xadd_verdict(fctx, argc),
                // XREADGROUP stamps delivery times with the node's clock (XCLAIM and
                // XAUTOCLAIM, which Redis marks random, are refused already).
                InScript::Run if name.eq_ignore_ascii_case(b"xreadgroup") => {
                    xreadgroup_verdict(fctx, argc)
                }
                v => v,
            };
            let prefix: &[u8] = match verdict {
                InScript::Run => return,
                InScript::Refuse => b"RAFT._REJECT",
                InScript::Sort => b"RAFT._SORT",
            };
            let s = api::create_string(std::ptr::null_mut(), prefix);
            rm!(RedisModule_CommandFilterArgInsert)(fctx, 0, s);
        },
    )
}

unsafe fn xadd_verdict(
    fctx: *mut raw::RedisModuleCommandFilterCtx,
    argc: std::ffi::c_int,
) -> InScript {
    let argv: Vec<Vec<u8>> = (0..argc)
        .map(|i| api::str_bytes(rm!(RedisModule_CommandFilterArgGet)(fctx, i)).to_vec())
        .collect();
    match super::rewrite::xadd_id_pos(&argv) {
        Some(p) if argv.get(p).is_some_and(|id| id.as_slice() != b"*") => InScript::Run,
        _ => InScript::Refuse,
    }
}

unsafe fn xreadgroup_verdict(
    fctx: *mut raw::RedisModuleCommandFilterCtx,
    argc: std::ffi::c_int,
) -> InScript {
    let argv: Vec<Vec<u8>> = (0..argc)
        .map(|i| api::str_bytes(rm!(RedisModule_CommandFilterArgGet)(fctx, i)).to_vec())
        .collect();
    if super::rewrite::xreadgroup_touches_no_pel(&argv) {
        InScript::Run
    } else {
        InScript::Refuse
    }
}

/// Sorts a reply for RAFT._SORT: a flat array of strings, or (HGETALL, and the like, when
/// `pairs`) field/value pairs by field.
pub fn sort_reply(v: api::Value, pairs: bool) -> api::Value {
    match v {
        api::Value::Array(items) if pairs && items.len() % 2 == 0 => {
            let mut p: Vec<(api::Value, api::Value)> = Vec::new();
            let mut it = items.into_iter();
            while let (Some(a), Some(b)) = (it.next(), it.next()) {
                p.push((a, b));
            }
            p.sort_by(|a, b| key(&a.0).cmp(key(&b.0)));
            api::Value::Array(p.into_iter().flat_map(|(a, b)| [a, b]).collect())
        }
        api::Value::Array(mut items) => {
            items.sort_by(|a, b| key(a).cmp(key(b)));
            api::Value::Array(items)
        }
        other => other,
    }
}

fn key(v: &api::Value) -> &[u8] {
    match v {
        api::Value::Str(s) => s,
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::Value::{Array, Int, Str};

    #[test]
    fn a_script_is_named_as_evalsha_names_it() {
        assert_eq!(
            sha1_hex(b"return 1"),
            "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"
        );
    }

    fn sha(body: &str) -> String {
        sha1_hex(body.as_bytes())
    }

    fn held(book: &ScriptBook, bodies: &[&str]) -> Vec<bool> {
        bodies
            .iter()
            .map(|b| book.body(&sha(b)).is_some())
            .collect()
    }

    /// The book evicts as Redis 7.4 does (checked against redis-server 7.4.1 by hand): the
    /// least recently used of the scripts EVAL brought, where EVALSHA counts as a use and
    /// SCRIPT LOAD of a script EVAL brought leaves it evictable.
    #[test]
    fn the_book_evicts_the_least_recently_used_of_the_scripts_eval_brought() {
        let mut book = ScriptBook::new(Some(3));
        let e = |book: &mut ScriptBook, b: &str| book.evaluated(sha(b), b.as_bytes());
        book.loaded(sha("p"), b"p");
        e(&mut book, "p"); // loaded first: stays permanent
        e(&mut book, "a");
        e(&mut book, "b");
        book.loaded(sha("b"), b"b"); // EVAL brought it: stays evictable
        e(&mut book, "c");
        book.used(&sha("a"));
        e(&mut book, "d"); // evicts b, the least recently used (a was used since)
        assert_eq!(
            held(&book, &["p", "a", "b", "c", "d"]),
            [true, true, false, true, true]
        );
        e(&mut book, "c"); // a use: now a is the oldest
        e(&mut book, "x");
        assert_eq!(
            held(&book, &["p", "a", "c", "d", "x"]),
            [true, false, true, true, true]
        );
        assert_eq!(book.body(&sha("x")), Some(&b"x"[..]));
        book.clear();
        assert_eq!(book.len(), 0);

        // A server that does not evict keeps them all.
        let mut all = ScriptBook::new(None);
        for i in 0..1000 {
            all.evaluated(sha(&i.to_string()), i.to_string().as_bytes());
        }
        assert_eq!(all.len(), 1000);
    }

    /// A snapshot's book, loaded on another node, evicts as the original does from then on.
    #[test]
    fn a_restored_book_keeps_the_order_and_the_permanent_scripts() {
        let mut book = ScriptBook::new(Some(3));
        book.loaded(sha("p"), b"p");
        for b in ["a", "b", "c"] {
            book.evaluated(sha(b), b.as_bytes());
        }
        book.used(&sha("a"));
        let (bodies, permanent) = book.saved();
        assert_eq!(permanent, 1);
        assert_eq!(
            bodies,
            [b"p".to_vec(), b"b".to_vec(), b"c".to_vec(), b"a".to_vec()]
        );
        let mut copy = ScriptBook::new(Some(3));
        copy.restore(bodies, Some(permanent));
        for b in [&mut book, &mut copy] {
            b.evaluated(sha("x"), b"x");
        }
        assert_eq!(
            held(&copy, &["p", "a", "b", "c", "x"]),
            held(&book, &["p", "a", "b", "c", "x"])
        );
        assert_eq!(held(&copy, &["p", "b"]), [true, false]);
        // From before the order was kept: all as SCRIPT LOAD brought them.
        let mut old = ScriptBook::new(Some(1));
        old.restore(vec![b"a".to_vec(), b"b".to_vec()], None);
        old.evaluated(sha("x"), b"x");
        assert_eq!(held(&old, &["a", "b", "x"]), [true, true, true]);
    }

    fn s(x: &str) -> api::Value {
        Str(x.as_bytes().to_vec())
    }

    #[test]
    fn sorts_members_and_pairs() {
        assert_eq!(
            sort_reply(Array(vec![s("b"), s("c"), s("a")]), false),
            Array(vec![s("a"), s("b"), s("c")])
        );
        assert_eq!(
            sort_reply(Array(vec![s("f2"), s("v2"), s("f1"), s("v1")]), true),
            Array(vec![s("f1"), s("v1"), s("f2"), s("v2")])
        );
        assert_eq!(sort_reply(Int(3), false), Int(3));
    }
}
