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

use std::cell::Cell;

use super::api::{self, guard, raw, rm};
use super::classify::InScript;
use super::module;

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
