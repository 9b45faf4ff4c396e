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
//! script cache. Redis cannot list its script cache, so the apply path notes every body an
//! applied SCRIPT LOAD, EVAL or EVAL_RO offered it, until SCRIPT FLUSH (`note_command`), and
//! a snapshot keeps those the cache holds (`saved`). A node that loads a snapshot gets both
//! back (`restore`), so EVALSHA and FCALL entries after it run there as on the nodes that
//! applied the entries before it.
//!
//! So that every node's cache holds the same scripts, EVAL_RO of a script no applied entry
//! offered goes through the log like a write (`logs_read`), though it writes nothing: served
//! as a read on one node, it would put its script in that node's cache only, where a later
//! EVALSHA entry would run while the other nodes answer NOSCRIPT. Later EVAL_RO of that
//! script are reads again.

use std::cell::Cell;
use std::collections::HashSet;

use super::api::{self, guard, raw, rm, RedisModuleCtx};
use super::classify::InScript;
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

/// The bodies applied SCRIPT LOAD, EVAL and EVAL_RO entries offered the script cache, since
/// the last SCRIPT FLUSH (named by SHA-1 only when a snapshot asks Redis which it holds).
static CACHED: MainThread<HashSet<Vec<u8>>> = MainThread::new_lazy();

fn is(arg: Option<&Vec<u8>>, name: &str) -> bool {
    arg.is_some_and(|a| a.eq_ignore_ascii_case(name.as_bytes()))
}

/// A script's name in the script cache: the SHA-1 of its body, in lower-case hex.
fn sha1_hex(body: &[u8]) -> String {
    sha1_smol::Sha1::from(body).digest().to_string()
}

/// EVAL_RO of a script no applied entry offered the script cache: it must go through the log
/// (every node caches its script), not be served as a read on one node.
pub fn logs_read(name: &[u8], body: Option<&[u8]>) -> bool {
    name.eq_ignore_ascii_case(b"eval_ro") && body.is_some_and(|b| !CACHED.get_mut().contains(b))
}

/// An entry's EVAL or EVAL_RO is skipped on this node: a kill stopped it on the leader
/// before it wrote (busy.rs). The nodes that were running it had cached its script (Redis
/// caches it before running it), so this node caches it too, without running it.
pub fn cache_skipped(ctx: *mut RedisModuleCtx, argv: &[Vec<u8>]) {
    if !(is(argv.first(), "eval") || is(argv.first(), "eval_ro")) {
        return;
    }
    if let Some(body) = argv.get(1) {
        // A body Redis refuses is refused alike where it ran.
        let _ = api::call_checked(ctx, &[b"SCRIPT".to_vec(), b"LOAD".to_vec(), body.clone()]);
    }
    note_command(argv);
}

/// An entry's command (or one of its transaction's) was applied.
pub fn note_command(argv: &[Vec<u8>]) {
    let cached = CACHED.get_mut();
    let body = if is(argv.first(), "eval") || is(argv.first(), "eval_ro") {
        argv.get(1)
    } else if is(argv.first(), "script") && is(argv.get(1), "load") {
        argv.get(2)
    } else {
        if is(argv.first(), "script") && is(argv.get(1), "flush") {
            cached.clear();
        }
        None
    };
    // Noted even if Redis refused it; `saved` keeps only what its cache holds.
    if let Some(body) = body.filter(|b| !cached.contains(b.as_slice())) {
        cached.insert(body.clone());
    }
}

/// The function libraries and the script cache, for a snapshot of the applied index. Of
/// the noted scripts, those Redis's cache holds (SCRIPT EXISTS): not one it refused, nor
/// one it evicted (Redis 7.4 and later evict scripts EVAL loaded); the others are forgotten.
pub fn saved(ctx: *mut RedisModuleCtx) -> Result<(Vec<u8>, Vec<Vec<u8>>), String> {
    let functions = match api::call_checked(ctx, &[b"FUNCTION".to_vec(), b"DUMP".to_vec()])? {
        api::Value::Str(payload) => payload,
        other => return Err(format!("FUNCTION DUMP answered {other:?}")),
    };
    let cached = CACHED.get_mut();
    if cached.is_empty() {
        return Ok((functions, Vec::new()));
    }
    let mut named: Vec<(String, &Vec<u8>)> = cached.iter().map(|b| (sha1_hex(b), b)).collect();
    named.sort_unstable();
    let mut argv = vec![b"SCRIPT".to_vec(), b"EXISTS".to_vec()];
    argv.extend(named.iter().map(|(sha, _)| sha.as_bytes().to_vec()));
    let exists = match api::call_checked(ctx, &argv)? {
        api::Value::Array(v) if v.len() == named.len() => v,
        other => return Err(format!("SCRIPT EXISTS answered {other:?}")),
    };
    let held: Vec<Vec<u8>> = named
        .iter()
        .zip(&exists)
        .filter(|(_, e)| **e == api::Value::Int(1))
        .map(|((_, b), _)| (*b).clone())
        .collect();
    *cached = held.iter().cloned().collect();
    Ok((functions, held))
}

/// A snapshot was loaded: its function libraries and scripts replace this node's.
pub fn restore(ctx: *mut RedisModuleCtx, functions: &[u8], scripts: Vec<Vec<u8>>) {
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
        // A body Redis refused when it was applied is refused again: nothing to restore.
        let _ = call(&[b"SCRIPT", b"LOAD", body]);
    }
    *CACHED.get_mut() = scripts.into_iter().collect();
    for f in failed {
        tracing::error!("restoring the snapshot's functions and scripts: {f}; FCALL and EVALSHA entries may fail on this node where they succeed on others");
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
            } else if m.table().classify(name, sub) == super::classify::Class::Transaction {
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
