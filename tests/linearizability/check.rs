//! Splits a history by key, runs the register or list checker on each key, and renders
//! what they find for people: each anomaly with the ops involved, their times since the
//! start of the run and the node (port) each was sent to.

use std::collections::{BTreeMap, HashMap};

use crate::history::{set_value_of, show_value, Cmd, Op, Outcome, Reply};
use crate::{list, register};

#[derive(Default)]
pub struct Findings {
    /// Each rendered for printing; the test fails if there is any.
    pub anomalies: Vec<String>,
    /// Keys the register search gave up on (step budget): also a failure.
    pub undecided: Vec<String>,
    pub register_keys: usize,
    pub list_keys: usize,
    pub register_ops_max: usize,
    pub steps_total: u64,
    pub steps_max: u64,
}

/// Checks the ops of `ops` that `include` selects (the reads at the end should be among
/// them); `final_lists` is the leader's final contents of each list key.
pub fn check(
    ops: &[Op],
    include: impl Fn(&Op) -> bool,
    final_lists: &BTreeMap<String, Vec<i64>>,
    budget: u64,
) -> Findings {
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for o in ops.iter().filter(|o| include(o)) {
        by_key.entry(o.key.as_str()).or_default().push(o);
    }
    let mut f = Findings::default();
    for (key, kops) in by_key {
        if kops
            .iter()
            .all(|o| matches!(o.cmd, Cmd::RPush(_) | Cmd::LRange))
        {
            f.list_keys += 1;
            let empty = Vec::new();
            let fin = final_lists.get(key).unwrap_or(&empty);
            for a in list::check(&kops, fin) {
                let mut s = format!("list {key}: {}", a.what);
                for &i in &a.ops {
                    s.push_str(&format!("\n    {}", kops[i]));
                }
                f.anomalies.push(s);
            }
        } else {
            f.register_keys += 1;
            let r = register::check(&kops, budget);
            f.register_ops_max = f.register_ops_max.max(r.searched);
            f.steps_total += r.steps;
            f.steps_max = f.steps_max.max(r.steps);
            match r.verdict {
                register::Verdict::Linearizable => {}
                register::Verdict::Unknown => f.undecided.push(format!(
                    "register {key}: the search gave up after {} steps on {} ops (LIN_STEP_BUDGET); \
                     linearizability is NOT established",
                    r.steps, r.searched
                )),
                register::Verdict::NotLinearizable(s) => {
                    f.anomalies.push(render_register(key, &kops, &s));
                }
            }
        }
    }
    f
}

/// How many plainly stale reads to show per key.
const SHOW_STALE: usize = 3;

fn render_register(key: &str, ops: &[&Op], s: &register::Stuck) -> String {
    let stuck = ops[s.op];
    let mut out = format!("register {key} is not linearizable");
    // The search's stuck point is where it ran out of orders, which is not always the op
    // at fault; reads that are stale on their face name it directly.
    let stale = stale_reads(ops);
    if !stale.is_empty() {
        out.push_str(&format!(
            "; {} read(s) returned a value already overwritten when they began",
            stale.len()
        ));
        for &(r, w, over) in stale.iter().take(SHOW_STALE) {
            out.push_str(&format!(
                "\n    {}\n  its value was written by\n    {}\n  and overwritten, before the {} began, by\n    {}",
                ops[r],
                ops[w],
                ops[r].cmd.name(),
                ops[over]
            ));
        }
    }
    out.push_str(&format!(
        "\n  no order of the key's ops explains\n    {stuck}\n  the deepest order tried placed {} \
         ops, leaving the value {}; its last ones:",
        s.depth,
        s.state.map_or("nil".into(), show_value)
    ));
    for &i in &s.last {
        out.push_str(&format!("\n    {}", ops[i]));
    }
    let others: Vec<usize> = s.pending.iter().copied().filter(|&i| i != s.op).collect();
    if !others.is_empty() {
        out.push_str("\n  also invoked by then and not placed:");
        for i in others {
            out.push_str(&format!("\n    {}", ops[i]));
        }
    }
    if let Some(base) = observed_set(stuck) {
        if !ops.iter().any(|o| o.cmd == Cmd::Set(base)) {
            out.push_str("\n  its value was never written to this key");
        }
    }
    out
}

/// The SET value a definite GET or INCR reply shows (before any INCRs).
fn observed_set(o: &Op) -> Option<i64> {
    match &o.outcome {
        Outcome::Ok(Reply::Value(Some(v))) => set_value_of(*v),
        Outcome::Ok(Reply::Int(v)) if o.cmd == Cmd::Incr => set_value_of(*v),
        _ => None,
    }
}

/// Reads (GET, or INCR by its result) whose value came from an acknowledged SET that another
/// acknowledged SET followed entirely, before the read began: stale whatever the order.
/// Returns (read, its value's SET, the later SET), indices into `ops`.
fn stale_reads(ops: &[&Op]) -> Vec<(usize, usize, usize)> {
    let sets: Vec<usize> = (0..ops.len())
        .filter(|&i| matches!(ops[i].cmd, Cmd::Set(_)) && ops[i].is_ok())
        .collect();
    let mut out = Vec::new();
    for (r, o) in ops.iter().enumerate() {
        let Some(base) = observed_set(o) else {
            continue;
        };
        let Some(&w) = sets.iter().find(|&&w| ops[w].cmd == Cmd::Set(base)) else {
            continue;
        };
        let over = sets
            .iter()
            .find(|&&x| ops[x].call > ops[w].ret && ops[x].ret < o.call);
        if let Some(&x) = over {
            out.push((r, w, x));
        }
    }
    out
}

/// Counts of outcomes per command: (ok, failed, unknown).
pub fn counts(ops: &[Op]) -> BTreeMap<&'static str, [usize; 3]> {
    let mut m: BTreeMap<&'static str, [usize; 3]> = BTreeMap::new();
    for o in ops {
        let c = m.entry(o.cmd.name()).or_default();
        match o.outcome {
            Outcome::Ok(_) => c[0] += 1,
            Outcome::Failed(_) => c[1] += 1,
            Outcome::Unknown(_) => c[2] += 1,
        }
    }
    m
}

/// The most frequent failure and unknown reasons, with ports and digits blurred so that
/// `MOVED 0 127.0.0.1:41234` and `MOVED 0 127.0.0.1:40111` count as one.
pub fn reasons(ops: &[Op], top: usize) -> Vec<(String, usize)> {
    let mut m: HashMap<String, usize> = HashMap::new();
    for o in ops {
        let r = match &o.outcome {
            Outcome::Failed(r) => format!("failed: {r}"),
            Outcome::Unknown(r) => format!("unknown: {r}"),
            Outcome::Ok(_) => continue,
        };
        let blurred: String = r
            .chars()
            .map(|c| if c.is_ascii_digit() { '#' } else { c })
            .collect();
        *m.entry(blurred).or_default() += 1;
    }
    let mut v: Vec<(String, usize)> = m.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(top);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{op, unique_value, ListRead};

    fn on(key: &str, mut o: Op) -> Op {
        o.key = key.into();
        o
    }

    #[test]
    fn anomalies_are_rendered_with_the_ops_involved() {
        let (a, b, x) = (unique_value(0, 1), unique_value(1, 1), unique_value(2, 1));
        let ok = Outcome::Ok;
        let h = vec![
            on("r0:0", op(0, Cmd::Set(a), 0, 10, ok(Reply::Ok))),
            on("r0:0", op(1, Cmd::Set(b), 20, 30, ok(Reply::Ok))),
            on("r0:0", op(2, Cmd::Get, 40, 50, ok(Reply::Value(Some(a))))),
            on("l0:0", op(2, Cmd::RPush(x), 0, 10, ok(Reply::Int(1)))),
            on(
                "l0:0",
                op(3, Cmd::LRange, 20, 30, ok(Reply::List(ListRead::of(&[])))),
            ),
        ];
        let lists = BTreeMap::from([("l0:0".to_string(), vec![x])]);
        let f = check(&h, |_| true, &lists, 1000);
        assert_eq!((f.register_keys, f.list_keys), (1, 1));
        assert_eq!(f.anomalies.len(), 2, "{:#?}", f.anomalies);
        let list = &f.anomalies[0];
        assert!(list.starts_with("list l0:0: stale read"), "{list}");
        assert!(
            list.contains("c3 @:7003 LRANGE l0:0 0 -1 -> 0 items"),
            "{list}"
        );
        let reg = &f.anomalies[1];
        assert!(
            reg.starts_with("register r0:0 is not linearizable"),
            "{reg}"
        );
        assert!(
            reg.contains(
                "its value was written by\n    [0.000s .. 0.010s] c0 @:7000 SET r0:0 c0#1 -> OK"
            ),
            "{reg}"
        );
        assert!(
            reg.contains("overwritten, before the GET began, by\n    [0.020s .. 0.030s] c1 @:7001 SET r0:0 c1#1 -> OK"),
            "{reg}"
        );
        // Without the reads, the writes alone are fine.
        let w = check(&h, |o| !o.cmd.is_read(), &lists, 1000);
        assert!(w.anomalies.is_empty(), "{:#?}", w.anomalies);
    }
}
