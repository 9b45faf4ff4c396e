//! Checks one list's sub-history (one key: RPUSH of unique values, LRANGE 0 -1) against its
//! final contents, read once the cluster has settled.
//!
//! Linearizable appends and reads have one order of appends (the final list) that every
//! reply and every read agrees with and that respects real time. So, with `pos(v)` the
//! position of value `v` in the final list, the checks are:
//! - no value appears twice, and every value in it was appended to this key by an RPUSH
//!   that did not definitely fail;
//! - every acknowledged RPUSH's value is there, at position (reply length - 1);
//! - every read is a prefix of the final list;
//! - lower bound: an op that begins after an RPUSH of `v` was acknowledged sees (if a read)
//!   or lands after (if an RPUSH) position `pos(v)`; and after a read of n items completed,
//!   a later read sees at least n items (reads are monotonic) and a later RPUSH lands at n
//!   or beyond;
//! - upper bound: a read, or an acknowledged RPUSH, cannot include a value whose RPUSH was
//!   invoked only after it completed.
//!
//! Unknown outcomes: an RPUSH may or may not be in the list, and never completes, so it
//! bounds nothing; failed or unknown reads are ignored.

use std::collections::HashMap;
use std::time::Duration;

use crate::history::{prefix_hashes, show_value, show_values, Cmd, Op, Outcome, Reply};

#[derive(Debug, PartialEq)]
pub struct Anomaly {
    pub what: String,
    /// Indices into the checked slice, the op at fault first.
    pub ops: Vec<usize>,
}

fn anomaly(what: String, ops: Vec<usize>) -> Anomaly {
    Anomaly { what, ops }
}

/// Checks `ops`, all on one list key, against `final_list` (the key's contents at the end).
pub fn check(ops: &[&Op], final_list: &[i64]) -> Vec<Anomaly> {
    let mut out = Vec::new();
    let mut pos: HashMap<i64, usize> = HashMap::new();
    for (p, v) in final_list.iter().enumerate() {
        if let Some(first) = pos.insert(*v, p) {
            out.push(anomaly(
                format!(
                    "{} appears twice in the final list, at positions {first} and {p}",
                    show_value(*v)
                ),
                Vec::new(),
            ));
            pos.insert(*v, first);
        }
    }
    let mut pusher: HashMap<i64, usize> = HashMap::new();
    for (i, o) in ops.iter().enumerate() {
        match o.cmd {
            Cmd::RPush(v) => {
                assert!(
                    pusher.insert(v, i).is_none(),
                    "value {} pushed twice by the workload",
                    show_value(v)
                );
            }
            Cmd::LRange => {}
            _ => panic!("not a list op: {o}"),
        }
    }
    for v in final_list {
        match pusher.get(v) {
            None => out.push(anomaly(
                format!(
                    "{} is in the final list but was never appended to this key",
                    show_value(*v)
                ),
                Vec::new(),
            )),
            Some(&i) if ops[i].is_failed() => out.push(anomaly(
                format!(
                    "a definitely failed append is in the final list at position {}",
                    pos[v]
                ),
                vec![i],
            )),
            Some(_) => {}
        }
    }
    for (i, o) in ops.iter().enumerate() {
        if let (Cmd::RPush(v), Outcome::Ok(r)) = (&o.cmd, &o.outcome) {
            let Reply::Int(len) = r else {
                panic!("RPUSH with a non-integer reply: {o}")
            };
            match pos.get(v) {
                None => out.push(anomaly(
                    "acknowledged append lost: not in the final list".into(),
                    vec![i],
                )),
                Some(&p) if p as i64 != len - 1 => out.push(anomaly(
                    format!(
                        "reply says position {} but the final list has it at {p}",
                        len - 1
                    ),
                    vec![i],
                )),
                Some(_) => {}
            }
        }
    }
    let final_hashes = prefix_hashes(final_list);
    for (i, o) in ops.iter().enumerate() {
        let l = match (&o.cmd, &o.outcome) {
            (Cmd::LRange, Outcome::Ok(Reply::List(l))) => l,
            (Cmd::LRange, Outcome::Ok(r)) => panic!("LRANGE with reply {r:?}"),
            _ => continue,
        };
        if final_hashes.get(l.len) != Some(&l.hash) {
            let there = &final_list[l.len.min(final_list.len()).saturating_sub(l.tail.len())
                ..l.len.min(final_list.len())];
            out.push(anomaly(
                format!(
                    "read of {} items is not a prefix of the final list ({} items): it ends [{}], \
                     the final list's first {} end [{}]",
                    l.len,
                    final_list.len(),
                    show_values(&l.tail),
                    l.len.min(final_list.len()),
                    show_values(there)
                ),
                vec![i],
            ));
        }
    }

    // Lower bound: what each op must at least see, from ops that completed before it began.
    // (completion time, items implied, op)
    let mut floors: Vec<(Duration, usize, usize)> = Vec::new();
    for (i, o) in ops.iter().enumerate() {
        match (&o.cmd, &o.outcome) {
            (Cmd::RPush(v), Outcome::Ok(_)) => {
                if let Some(&p) = pos.get(v) {
                    floors.push((o.ret, p + 1, i));
                }
            }
            (Cmd::LRange, Outcome::Ok(Reply::List(l))) => floors.push((o.ret, l.len, i)),
            _ => {}
        }
    }
    floors.sort();
    // (invocation time, items before it: a read's length, or an append's position, op)
    let mut queries: Vec<(Duration, usize, usize)> = Vec::new();
    for (i, o) in ops.iter().enumerate() {
        match (&o.cmd, &o.outcome) {
            (Cmd::RPush(v), Outcome::Ok(_) | Outcome::Unknown(_)) => {
                if let Some(&p) = pos.get(v) {
                    queries.push((o.call, p, i));
                }
            }
            (Cmd::LRange, Outcome::Ok(Reply::List(l))) => queries.push((o.call, l.len, i)),
            _ => {}
        }
    }
    queries.sort();
    let mut f = 0;
    let mut best: Option<(usize, usize)> = None; // (items, op)
    for &(call, has, i) in &queries {
        while f < floors.len() && floors[f].0 < call {
            if best.is_none_or(|(n, _)| floors[f].1 > n) {
                best = Some((floors[f].1, floors[f].2));
            }
            f += 1;
        }
        let Some((need, j)) = best else { continue };
        if has >= need {
            continue;
        }
        let what = match (&ops[i].cmd, &ops[j].cmd) {
            (Cmd::LRange, Cmd::LRange) => format!(
                "read went back in time: saw {has} items after another read, completed before it began, saw {need}"
            ),
            (Cmd::LRange, _) => format!(
                "stale read: saw {has} items, but an append acknowledged before it began is item {}",
                need - 1
            ),
            (_, Cmd::LRange) => format!(
                "append landed at position {has}, inside what a read completed before it began had already seen ({need} items)"
            ),
            _ => format!(
                "append landed at position {has}, before an append acknowledged before it began (position {})",
                need - 1
            ),
        };
        out.push(anomaly(what, vec![i, j]));
    }

    // Upper bound: nothing seen before it was invoked.
    let invoked: Vec<Option<(Duration, usize)>> = final_list
        .iter()
        .map(|v| pusher.get(v).map(|&i| (ops[i].call, i)))
        .collect();
    let mut latest: Vec<Option<(Duration, usize)>> = Vec::with_capacity(invoked.len());
    for c in &invoked {
        let prev = latest.last().copied().flatten();
        latest.push(match (prev, *c) {
            (Some(p), Some(c)) => Some(if c.0 > p.0 { c } else { p }),
            (p, c) => p.or(c),
        });
    }
    for (i, o) in ops.iter().enumerate() {
        let items = match (&o.cmd, &o.outcome) {
            (Cmd::LRange, Outcome::Ok(Reply::List(l))) => l.len.min(final_list.len()),
            (Cmd::RPush(v), Outcome::Ok(_)) => match pos.get(v) {
                Some(&p) => p + 1,
                None => continue,
            },
            _ => continue,
        };
        if items == 0 {
            continue;
        }
        if let Some((call, j)) = latest[items - 1] {
            if call > o.ret {
                out.push(anomaly(
                    format!(
                        "{} includes an append invoked only after it completed",
                        if o.cmd == Cmd::LRange {
                            "read"
                        } else {
                            "append's prefix"
                        }
                    ),
                    vec![i, j],
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{op, Cmd::*, ListRead};

    fn push(c: usize, v: i64, t0: u64, t1: u64, len: i64) -> Op {
        op(c, RPush(v), t0, t1, Outcome::Ok(Reply::Int(len)))
    }
    fn read(c: usize, t0: u64, t1: u64, l: &[i64]) -> Op {
        op(c, LRange, t0, t1, Outcome::Ok(Reply::List(ListRead::of(l))))
    }
    fn run(h: &[Op], fin: &[i64]) -> Vec<Anomaly> {
        let refs: Vec<&Op> = h.iter().collect();
        check(&refs, fin)
    }
    /// The ops at fault of each anomaly found (the test fails if none is).
    fn faults(h: &[Op], fin: &[i64]) -> Vec<Vec<usize>> {
        let a = run(h, fin);
        assert!(!a.is_empty(), "expected an anomaly");
        a.into_iter().map(|a| a.ops).collect()
    }

    #[test]
    fn consistent_appends_and_reads_pass() {
        let h = vec![
            push(0, 10, 0, 10, 1),
            push(1, 11, 5, 30, 3),
            push(2, 12, 6, 20, 2),
            read(3, 8, 9, &[]), // overlaps the first append: may miss it
            read(3, 11, 12, &[10]),
            read(4, 15, 25, &[10, 12]),
            op(5, RPush(13), 31, 40, Outcome::Unknown("TIMEOUT".into())),
            op(5, RPush(14), 41, 42, Outcome::Failed("CLUSTERDOWN".into())),
            op(
                5,
                RPush(15),
                43,
                44,
                Outcome::Unknown("read timeout".into()),
            ),
            read(3, 50, 60, &[10, 12, 11, 15]),
            op(6, LRange, 50, 60, Outcome::Unknown("TIMEOUT".into())),
        ];
        assert_eq!(run(&h, &[10, 12, 11, 15]), vec![]);
    }

    #[test]
    fn lost_misplaced_duplicated_or_invented_values_fail() {
        let h = vec![push(0, 10, 0, 10, 1), push(1, 11, 20, 30, 2)];
        assert_eq!(faults(&h, &[10]), vec![vec![1]]); // lost
        assert_eq!(faults(&h, &[11, 10]).first(), Some(&vec![0])); // wrong position
        assert!(!run(&h, &[10, 11, 11]).is_empty()); // twice
        assert!(!run(&h, &[10, 11, 99]).is_empty()); // never appended
        let h = vec![
            push(0, 10, 0, 10, 1),
            op(
                1,
                RPush(11),
                20,
                30,
                Outcome::Failed("MOVED 0 127.0.0.1:1".into()),
            ),
        ];
        assert_eq!(faults(&h, &[10, 11]), vec![vec![1]]);
    }

    #[test]
    fn stale_backward_or_future_reads_fail() {
        let w = || vec![push(0, 10, 0, 10, 1), push(1, 11, 20, 30, 2)];
        // Not a prefix.
        let mut h = w();
        h.push(read(2, 40, 50, &[11]));
        assert_eq!(faults(&h, &[10, 11])[0], vec![2]);
        // Stale: begins after the second append was acknowledged but misses it.
        let mut h = w();
        h.push(read(2, 40, 50, &[10]));
        assert_eq!(faults(&h, &[10, 11]), vec![vec![2, 1]]);
        // Going back: the second append is unknown, so only the reads order things.
        let mut h = vec![
            push(0, 10, 0, 10, 1),
            op(1, RPush(11), 20, 30, Outcome::Unknown("TIMEOUT".into())),
        ];
        h.push(read(2, 40, 50, &[10, 11]));
        assert_eq!(run(&h, &[10, 11]), vec![]);
        h.push(read(3, 60, 70, &[10]));
        assert_eq!(faults(&h, &[10, 11]), vec![vec![3, 2]]);
        // From the future: sees an append invoked after the read completed.
        let h = vec![read(2, 0, 5, &[10]), push(0, 10, 10, 20, 1)];
        assert!(faults(&h, &[10]).contains(&vec![0, 1]));
    }

    #[test]
    fn appends_out_of_real_time_order_fail() {
        // 11 is acknowledged before 12 is invoked, yet 12 comes first.
        let h = vec![
            push(0, 10, 0, 10, 1),
            op(1, RPush(11), 20, 30, Outcome::Ok(Reply::Int(3))),
            op(2, RPush(12), 40, 50, Outcome::Ok(Reply::Int(2))),
        ];
        assert!(faults(&h, &[10, 12, 11]).contains(&vec![2, 1]));
        // An append after a read landing inside what the read saw.
        let h = vec![
            push(0, 10, 0, 10, 1),
            op(1, RPush(11), 11, 12, Outcome::Unknown("TIMEOUT".into())),
            read(2, 20, 30, &[10, 11]),
            op(3, RPush(12), 40, 50, Outcome::Unknown("TIMEOUT".into())),
        ];
        assert!(faults(&h, &[10, 12, 11]).contains(&vec![3, 2]));
    }
}
