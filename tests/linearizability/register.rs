//! Is one register's sub-history (one key: SET, GET, INCR) linearizable?
//!
//! Wing & Gong's search with Lowe's memoization (WGL, as in Knossos and Porcupine): the
//! history is a list of call and return events in real-time order; the search repeatedly
//! places ("linearizes") an op whose call comes before the first remaining return, applies
//! it to the register, and backtracks when it reaches a return whose op it could not place.
//! A configuration (set of placed ops, register value) is explored at most once. The set is
//! kept as an incrementally updated 128-bit Zobrist hash of the placed ops rather than a
//! bitset: constant size whatever the history length; a collision could only prune a branch
//! (a false anomaly, never a false pass), with probability about steps² / 2¹²⁸.
//!
//! Outcomes: a definite failure did not happen and is left out; an op with an unknown
//! outcome has no return event (it may take effect at any time after its call, or never),
//! so the search succeeds once every op with a definite outcome is placed. An unknown GET
//! says nothing and is left out. Two reductions keep unknown ops from blowing the search up,
//! neither of which changes the verdict:
//! - an unknown SET whose value no definite reply ever showed is left out: placing it could
//!   only be followed, until the next SET, by ops that see its value, and there are none;
//! - unknown INCRs are interchangeable (same effect, any result), so the search only places
//!   the earliest-invoked one not yet placed.
//!
//! The search is bounded by a step budget; running out is a verdict of its own (`Unknown`),
//! which the caller must treat as a failure, not a pass.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};

use crate::history::{set_value_of, Cmd, Op, Outcome, Reply};
use crate::rng::Rng;

#[derive(Debug, PartialEq)]
pub enum Verdict {
    Linearizable,
    /// No order of the ops explains the replies; the deepest attempt got stuck here.
    NotLinearizable(Stuck),
    /// The step budget ran out before the search finished.
    Unknown,
}

#[derive(Debug, PartialEq)]
pub struct Stuck {
    /// The op (index into the checked slice) whose completion came before any attempted
    /// order could place it.
    pub op: usize,
    /// The register's value at that point in the deepest attempt (`None`: no such key).
    pub state: Option<i64>,
    /// The last ops that attempt placed, oldest first (indices into the checked slice).
    pub last: Vec<usize>,
    /// How many ops that attempt placed.
    pub depth: usize,
    /// The ops invoked by then and not placed, which could have gone next (`op` among them).
    pub pending: Vec<usize>,
}

#[derive(Debug)]
pub struct Report {
    pub verdict: Verdict,
    pub steps: u64,
    /// Ops in the search (after leaving out failures, unknown reads, unseen unknown SETs).
    pub searched: usize,
}

const SHOW_LAST: usize = 8;
const SHOW_PENDING: usize = 12;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Set(i64),
    Get(Option<i64>),
    /// The result, when known.
    Incr(Option<i64>),
}

/// The register's next value if `kind` is consistent with value `state`.
fn step(state: Option<i64>, kind: Kind) -> Option<Option<i64>> {
    match kind {
        Kind::Set(v) => Some(Some(v)),
        Kind::Get(r) => (r == state).then_some(state),
        Kind::Incr(r) => {
            let n = state.unwrap_or(0).checked_add(1)?;
            match r {
                Some(x) if x != n => None,
                _ => Some(Some(n)),
            }
        }
    }
}

struct SearchOp {
    /// Index into the checked slice.
    src: usize,
    kind: Kind,
    zobrist: u128,
    call_event: usize,
    ret_event: Option<usize>,
    /// For an unknown INCR: the unknown INCR invoked just before it, which must be placed
    /// first.
    after: Option<usize>,
}

const NIL: usize = usize::MAX;

/// The events in a doubly linked list (with a head sentinel) that ops can be lifted out of
/// and put back into, in LIFO order ("dancing links").
struct Events {
    next: Vec<usize>,
    prev: Vec<usize>,
    head: usize,
}

impl Events {
    fn new(n: usize) -> Events {
        // Node n is the head sentinel, followed by the events 0..n in order.
        let mut next = vec![NIL; n + 1];
        let mut prev = vec![NIL; n + 1];
        let mut last = n;
        for (e, p) in prev.iter_mut().enumerate().take(n) {
            next[last] = e;
            *p = last;
            last = e;
        }
        Events {
            next,
            prev,
            head: n,
        }
    }

    fn first(&self) -> usize {
        self.next[self.head]
    }

    fn remove(&mut self, x: usize) {
        let (p, n) = (self.prev[x], self.next[x]);
        self.next[p] = n;
        if n != NIL {
            self.prev[n] = p;
        }
    }

    fn restore(&mut self, x: usize) {
        let (p, n) = (self.prev[x], self.next[x]);
        self.next[p] = x;
        if n != NIL {
            self.prev[n] = x;
        }
    }
}

/// FxHash-style mixing: the keys are already random (Zobrist), SipHash would be wasted time.
#[derive(Default)]
struct FoldHasher(u64);

impl Hasher for FoldHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..b.len()].copy_from_slice(b);
            self.write_u64(u64::from_le_bytes(w));
        }
    }
    fn write_u64(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    fn write_u128(&mut self, w: u128) {
        self.write_u64(w as u64);
        self.write_u64((w >> 64) as u64);
    }
}

/// Checks `ops`, all on one register key, within `budget_steps` search steps.
pub fn check(ops: &[&Op], budget_steps: u64) -> Report {
    // Values some definite reply showed, as the SETs they came from.
    let seen: HashSet<i64> = ops
        .iter()
        .filter_map(|o| match &o.outcome {
            Outcome::Ok(Reply::Value(Some(v))) | Outcome::Ok(Reply::Int(v)) => set_value_of(*v),
            _ => None,
        })
        .collect();

    let mut zobrist = Rng::new(0x5eed_0f2e_6157_e5a1);
    let mut sops: Vec<SearchOp> = Vec::new();
    for (src, o) in ops.iter().enumerate() {
        let kind = match (&o.cmd, &o.outcome) {
            (_, Outcome::Failed(_)) => continue,
            (Cmd::Get, Outcome::Unknown(_)) => continue,
            (Cmd::Set(v), Outcome::Unknown(_)) if !seen.contains(v) => continue,
            (Cmd::Set(v), Outcome::Ok(Reply::Ok) | Outcome::Unknown(_)) => Kind::Set(*v),
            (Cmd::Get, Outcome::Ok(Reply::Value(v))) => Kind::Get(*v),
            (Cmd::Incr, Outcome::Ok(Reply::Int(n))) => Kind::Incr(Some(*n)),
            (Cmd::Incr, Outcome::Unknown(_)) => Kind::Incr(None),
            _ => panic!("not a register op, or a reply of the wrong type: {o}"),
        };
        let z = (zobrist.next_u64() as u128) << 64 | zobrist.next_u64() as u128;
        sops.push(SearchOp {
            src,
            kind,
            zobrist: z,
            call_event: NIL,
            ret_event: None,
            after: None,
        });
    }

    // Real-time order; on equal times calls come first (treated as concurrent: fewer
    // constraints, so no false anomaly from clock granularity).
    let mut events: Vec<(std::time::Duration, bool, usize)> = Vec::new();
    for (i, s) in sops.iter().enumerate() {
        let o = ops[s.src];
        events.push((o.call, false, i));
        if let Some(done) = o.done() {
            events.push((done, true, i));
        }
    }
    events.sort();
    let mut last_unknown_incr: Option<usize> = None;
    for (e, &(_, is_ret, i)) in events.iter().enumerate() {
        if is_ret {
            sops[i].ret_event = Some(e);
        } else {
            sops[i].call_event = e;
            if sops[i].kind == Kind::Incr(None) {
                sops[i].after = last_unknown_incr;
                last_unknown_incr = Some(i);
            }
        }
    }
    let event_op: Vec<usize> = events.iter().map(|&(_, _, i)| i).collect();
    let is_ret: Vec<bool> = events.iter().map(|&(_, r, _)| r).collect();

    let mut list = Events::new(events.len());
    let mut placed = vec![false; sops.len()];
    let mut state: Option<i64> = None;
    let mut z: u128 = 0;
    let mut stack: Vec<(usize, Option<i64>)> = Vec::new();
    let mut cache: HashSet<(u128, Option<i64>), BuildHasherDefault<FoldHasher>> =
        HashSet::default();
    let mut best: Option<Stuck> = None;
    let mut steps = 0u64;
    let mut entry = list.first();
    let report = |verdict, steps| Report {
        verdict,
        steps,
        searched: sops.len(),
    };
    loop {
        if entry == NIL {
            // Only calls of unknown ops remain: every definite op is placed.
            return report(Verdict::Linearizable, steps);
        }
        steps += 1;
        if steps > budget_steps {
            return report(Verdict::Unknown, steps);
        }
        let i = event_op[entry];
        if !is_ret[entry] {
            let s = &sops[i];
            let allowed = s.after.is_none_or(|p| placed[p]);
            if let Some(next_state) = step(state, s.kind).filter(|_| allowed) {
                let nz = z ^ s.zobrist;
                if cache.insert((nz, next_state)) {
                    stack.push((entry, state));
                    state = next_state;
                    z = nz;
                    placed[i] = true;
                    list.remove(s.call_event);
                    if let Some(r) = s.ret_event {
                        list.remove(r);
                    }
                    entry = list.first();
                    continue;
                }
            }
            entry = list.next[entry];
        } else {
            // Op i completed and no order tried so far places it before that: backtrack.
            if best.as_ref().is_none_or(|b| stack.len() > b.depth) {
                let mut pending = Vec::new();
                let mut e = list.first();
                while e != entry && pending.len() < SHOW_PENDING {
                    pending.push(sops[event_op[e]].src);
                    e = list.next[e];
                }
                best = Some(Stuck {
                    op: sops[i].src,
                    state,
                    last: stack[stack.len().saturating_sub(SHOW_LAST)..]
                        .iter()
                        .map(|&(e, _)| sops[event_op[e]].src)
                        .collect(),
                    depth: stack.len(),
                    pending,
                });
            }
            let Some((e, prev_state)) = stack.pop() else {
                let stuck = best.expect("recorded before backtracking");
                return report(Verdict::NotLinearizable(stuck), steps);
            };
            let j = event_op[e];
            let s = &sops[j];
            if let Some(r) = s.ret_event {
                list.restore(r);
            }
            list.restore(s.call_event);
            placed[j] = false;
            z ^= s.zobrist;
            state = prev_state;
            entry = list.next[e];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{op, unique_value, Cmd::*};

    fn ok(r: Reply) -> Outcome {
        Outcome::Ok(r)
    }
    fn unknown() -> Outcome {
        Outcome::Unknown("TIMEOUT".into())
    }
    fn failed() -> Outcome {
        Outcome::Failed("MOVED 0 127.0.0.1:7001".into())
    }
    fn get(v: i64) -> Outcome {
        ok(Reply::Value(Some(v)))
    }
    fn verdict(h: &[Op]) -> Verdict {
        let refs: Vec<&Op> = h.iter().collect();
        check(&refs, 1_000_000).verdict
    }
    fn stuck_on(h: &[Op]) -> usize {
        match verdict(h) {
            Verdict::NotLinearizable(s) => s.op,
            v => panic!("expected an anomaly, got {v:?}"),
        }
    }

    const A: i64 = 1 << 40;
    const B: i64 = 2 << 40;

    #[test]
    fn sequential_and_overlapping_histories_pass() {
        let h = vec![
            op(0, Get, 0, 1, ok(Reply::Value(None))),
            op(0, Set(A), 2, 3, ok(Reply::Ok)),
            op(1, Get, 4, 5, get(A)),
            op(1, Incr, 6, 7, ok(Reply::Int(A + 1))),
            op(0, Get, 8, 9, get(A + 1)),
        ];
        assert_eq!(verdict(&h), Verdict::Linearizable);
        // Reads overlapping a write may see either value, as long as no read that starts
        // after another one finished goes back to the old value.
        let h = vec![
            op(0, Set(A), 0, 1, ok(Reply::Ok)),
            op(1, Set(B), 10, 40, ok(Reply::Ok)),
            op(2, Get, 15, 20, get(A)),
            op(3, Get, 12, 30, get(B)),
            op(2, Get, 25, 35, get(B)),
        ];
        assert_eq!(verdict(&h), Verdict::Linearizable);
    }

    #[test]
    fn a_stale_read_fails() {
        let h = vec![
            op(0, Set(A), 0, 10, ok(Reply::Ok)),
            op(1, Set(B), 20, 30, ok(Reply::Ok)),
            op(2, Get, 40, 50, get(A)),
        ];
        assert_eq!(stuck_on(&h), 2);
        // A read going back in time after another read saw the new value.
        let h = vec![
            op(0, Set(A), 0, 10, ok(Reply::Ok)),
            op(1, Set(B), 20, 100, ok(Reply::Ok)),
            op(2, Get, 30, 40, get(B)),
            op(3, Get, 50, 60, get(A)),
        ];
        assert!(matches!(verdict(&h), Verdict::NotLinearizable(_)));
    }

    #[test]
    fn a_value_nobody_wrote_or_a_failed_write_fails() {
        let h = vec![
            op(0, Set(A), 0, 10, ok(Reply::Ok)),
            op(1, Get, 20, 30, get(B)),
        ];
        assert_eq!(stuck_on(&h), 1);
        let h = vec![
            op(0, Set(A), 0, 10, ok(Reply::Ok)),
            op(1, Set(B), 5, 15, failed()),
            op(2, Get, 20, 30, get(B)),
        ];
        assert_eq!(stuck_on(&h), 2);
        // A read cannot see a write invoked after it completed.
        let h = vec![
            op(2, Get, 0, 10, get(B)),
            op(1, Set(B), 20, 30, ok(Reply::Ok)),
        ];
        assert_eq!(stuck_on(&h), 0);
    }

    #[test]
    fn an_unknown_write_may_happen_late_or_never() {
        let base = vec![
            op(0, Set(A), 0, 10, ok(Reply::Ok)),
            op(1, Set(B), 20, 25, unknown()),
        ];
        // Never happened.
        let mut h = base.clone();
        h.push(op(2, Get, 100, 110, get(A)));
        assert_eq!(verdict(&h), Verdict::Linearizable);
        // Happened, long after the client gave up.
        h.push(op(2, Get, 1000, 1010, get(B)));
        assert_eq!(verdict(&h), Verdict::Linearizable);
        // But once seen, it cannot be undone.
        h.push(op(3, Get, 1020, 1030, get(A)));
        assert_eq!(stuck_on(&h), 4);
        // Nor seen before it was invoked.
        let h = vec![
            op(0, Set(A), 0, 10, ok(Reply::Ok)),
            op(2, Get, 11, 15, get(B)),
            op(1, Set(B), 20, 25, unknown()),
        ];
        assert_eq!(stuck_on(&h), 1);
    }

    #[test]
    fn unknown_incrs_count_at_most_once_each() {
        let mut h = vec![
            op(0, Set(A), 0, 10, ok(Reply::Ok)),
            op(1, Incr, 20, 30, unknown()),
            op(2, Incr, 21, 31, unknown()),
            op(3, Incr, 40, 50, ok(Reply::Int(A + 2))),
            op(0, Get, 60, 70, get(A + 2)),
            op(0, Get, 80, 90, get(A + 3)),
        ];
        assert_eq!(verdict(&h), Verdict::Linearizable);
        h.push(op(0, Get, 100, 110, get(A + 4)));
        assert_eq!(stuck_on(&h), 6);
        // INCR of a missing key starts at 1, and a GET after it cannot see nil.
        let h = vec![
            op(0, Incr, 0, 10, ok(Reply::Int(1))),
            op(1, Get, 20, 30, ok(Reply::Value(None))),
        ];
        assert_eq!(stuck_on(&h), 1);
        // Counts seen going down is an anomaly even with unknown INCRs around.
        let h = vec![
            op(0, Set(A), 0, 10, ok(Reply::Ok)),
            op(1, Incr, 20, 30, unknown()),
            op(2, Incr, 21, 31, unknown()),
            op(0, Get, 60, 70, get(A + 2)),
            op(0, Get, 80, 90, get(A + 1)),
        ];
        assert_eq!(stuck_on(&h), 4);
    }

    #[test]
    fn a_tiny_budget_gives_unknown_not_a_pass() {
        let h = [
            op(0, Set(A), 0, 10, ok(Reply::Ok)),
            op(1, Get, 20, 30, get(A)),
        ];
        let refs: Vec<&Op> = h.iter().collect();
        assert_eq!(check(&refs, 1).verdict, Verdict::Unknown);
        assert_eq!(check(&refs, 2).verdict, Verdict::Linearizable);
    }

    /// A random history of a real register: `clients` clients each doing ops back to back,
    /// each op taking effect at a random instant inside its interval; some outcomes are
    /// unknown (then the write takes effect or not, at random).
    fn random_history(seed: u64, clients: usize, n: usize) -> Vec<Op> {
        let mut rng = Rng::new(seed);
        let mut clock = vec![0u64; clients];
        let mut seq = 0u64;
        // (effect time, op), the op's reply filled in once effects are in order.
        let mut planned: Vec<(u64, Op, bool)> = Vec::new();
        for _ in 0..n {
            let c = rng.range(0, clients as u64) as usize;
            let call = clock[c] + rng.range(0, 300);
            let mut effect = call + rng.range(1, 400);
            let ret = effect + rng.range(1, 400);
            clock[c] = ret;
            seq += 1;
            let cmd = match rng.range(0, 10) {
                0..=2 => Cmd::Set(unique_value(c, seq)),
                3..=4 => Cmd::Incr,
                _ => Cmd::Get,
            };
            let is_unknown = rng.chance(3);
            let applied = !is_unknown || rng.chance(50);
            if is_unknown && rng.chance(50) {
                // Takes effect long after the client gave up.
                effect = ret + rng.range(1, 5000);
            }
            let outcome = if is_unknown { unknown() } else { ok(Reply::Ok) };
            planned.push((effect, op(c, cmd, call, ret, outcome), applied));
        }
        planned.sort_by_key(|p| p.0);
        let mut state: Option<i64> = None;
        let mut h = Vec::new();
        for (_, mut o, applied) in planned {
            if applied {
                let reply = match o.cmd {
                    Cmd::Set(v) => {
                        state = Some(v);
                        Reply::Ok
                    }
                    Cmd::Incr => {
                        state = Some(state.unwrap_or(0) + 1);
                        Reply::Int(state.unwrap())
                    }
                    _ => Reply::Value(state),
                };
                if o.is_ok() {
                    o.outcome = Outcome::Ok(reply);
                }
            }
            h.push(o);
        }
        h.sort_by_key(|o| o.call);
        h
    }

    #[test]
    fn thousands_of_concurrent_ops_with_unknowns_check_fast() {
        for seed in 0..5 {
            let h = random_history(seed, 8, 4000);
            let refs: Vec<&Op> = h.iter().collect();
            let t = std::time::Instant::now();
            let r = check(&refs, 5_000_000);
            assert_eq!(r.verdict, Verdict::Linearizable, "seed {seed}");
            assert!(
                t.elapsed() < std::time::Duration::from_secs(5),
                "seed {seed}: {:?}, {} steps",
                t.elapsed(),
                r.steps
            );
            // The same history with one read turned stale must fail: it returns the value
            // of a SET that another SET followed, entirely before the read began.
            let mut bad = h.clone();
            let set = |o: &Op| match o.cmd {
                Cmd::Set(v) if o.is_ok() => Some(v),
                _ => None,
            };
            let (pick, stale) = (1000..bad.len())
                .filter(|&i| bad[i].cmd == Cmd::Get && bad[i].is_ok())
                .find_map(|i| {
                    let before: Vec<&Op> = bad[..i]
                        .iter()
                        .filter(|w| set(w).is_some() && w.ret < bad[i].call)
                        .collect();
                    before.iter().find_map(|v| {
                        before
                            .iter()
                            .any(|w| v.ret < w.call)
                            .then(|| (i, set(v).unwrap()))
                    })
                })
                .expect("a read after two ordered writes");
            bad[pick].outcome = get(stale);
            let refs: Vec<&Op> = bad.iter().collect();
            assert!(
                matches!(check(&refs, 5_000_000).verdict, Verdict::NotLinearizable(_)),
                "seed {seed}: stale read at {pick} not found"
            );
        }
    }
}
