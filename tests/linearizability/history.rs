//! The recorded history: one `Op` per command a client sent, with when it was invoked, when
//! its reply (or failure) came back, and what that outcome says about whether it happened.

use std::fmt;
use std::time::Duration;

/// The client number given to the reads made at the end of a run, once the cluster has
/// settled; they are part of the history like any other read.
pub const FINAL_CLIENT: usize = usize::MAX;

/// Written values are unique: `(client + 1) << CLIENT_SHIFT | seq << SEQ_SHIFT`. The low
/// `SEQ_SHIFT` bits are left for INCRs, so a register's value names the SET it came from
/// and how many INCRs followed it; values below `1 << CLIENT_SHIFT` are INCRs of a key
/// that did not exist.
pub const CLIENT_SHIFT: u32 = 40;
pub const SEQ_SHIFT: u32 = 16;
pub const SEQ_MAX: u64 = (1 << (CLIENT_SHIFT - SEQ_SHIFT)) - 1;

pub fn unique_value(client: usize, seq: u64) -> i64 {
    assert!(seq <= SEQ_MAX, "client {client} ran out of unique values");
    assert!(client < 1 << 20, "client number {client} too large");
    ((client as i64 + 1) << CLIENT_SHIFT) | ((seq as i64) << SEQ_SHIFT)
}

/// The value the SET that produced `v` wrote, if `v` came from a SET (plus INCRs).
pub fn set_value_of(v: i64) -> Option<i64> {
    (v >= 1 << CLIENT_SHIFT).then_some(v & !((1 << SEQ_SHIFT) - 1))
}

/// `c3#17` for the 17th value written by client 3, `c3#17+2` after two INCRs of it.
pub fn show_value(v: i64) -> String {
    match set_value_of(v) {
        None => v.to_string(),
        Some(base) => {
            let client = (base >> CLIENT_SHIFT) - 1;
            let seq = (base >> SEQ_SHIFT) & SEQ_MAX as i64;
            match v - base {
                0 => format!("c{client}#{seq}"),
                n => format!("c{client}#{seq}+{n}"),
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Cmd {
    Set(i64),
    Get,
    Incr,
    RPush(i64),
    LRange,
}

impl Cmd {
    pub fn name(&self) -> &'static str {
        match self {
            Cmd::Set(_) => "SET",
            Cmd::Get => "GET",
            Cmd::Incr => "INCR",
            Cmd::RPush(_) => "RPUSH",
            Cmd::LRange => "LRANGE",
        }
    }

    pub fn is_read(&self) -> bool {
        matches!(self, Cmd::Get | Cmd::LRange)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    /// `+OK` (SET).
    Ok,
    /// INCR's new value, RPUSH's new length.
    Int(i64),
    /// GET: `None` for nil.
    Value(Option<i64>),
    /// LRANGE 0 -1.
    List(ListRead),
}

/// An `LRANGE 0 -1` reply, kept compact: a long run makes tens of thousands of reads of
/// lists thousands of items long. The checker needs only the length and whether the items
/// are a prefix of the final list, which an order-sensitive hash of all of them tells
/// (a 64-bit collision, the only way to miss a difference, is not a practical concern).
#[derive(Clone, Debug, PartialEq)]
pub struct ListRead {
    pub len: usize,
    pub hash: u64,
    /// The last few items, for printing.
    pub tail: Vec<i64>,
}

const LIST_TAIL: usize = 3;
const LIST_HASH_SEED: u64 = 0x6c69_7374_6861_7368;

fn list_hash_step(h: u64, v: i64) -> u64 {
    // splitmix64's finaliser over the running hash and the item: order-sensitive.
    let mut z = (h ^ (v as u64)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl ListRead {
    pub fn of(items: &[i64]) -> ListRead {
        ListRead {
            len: items.len(),
            hash: items
                .iter()
                .fold(LIST_HASH_SEED, |h, &v| list_hash_step(h, v)),
            tail: items[items.len().saturating_sub(LIST_TAIL)..].to_vec(),
        }
    }
}

/// `hashes[n]` is the `ListRead::hash` of `items[..n]`.
pub fn prefix_hashes(items: &[i64]) -> Vec<u64> {
    let mut hashes = Vec::with_capacity(items.len() + 1);
    hashes.push(LIST_HASH_SEED);
    for &v in items {
        hashes.push(list_hash_step(*hashes.last().expect("seeded"), v));
    }
    hashes
}

pub fn show_values(vs: &[i64]) -> String {
    vs.iter()
        .map(|v| show_value(*v))
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// A definite reply: the command happened, between invocation and completion.
    Ok(Reply),
    /// A definite refusal (`-MOVED`, `-CLUSTERDOWN`, `-NOCLUSTER`, `-TRYAGAIN`, `-LOADING`):
    /// the command did not happen.
    Failed(String),
    /// `-TIMEOUT`, a connection error, a read timeout, anything unexpected: the command may
    /// or may not happen, at any time after its invocation.
    Unknown(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Op {
    pub client: usize,
    /// The node the command was sent to.
    pub port: u16,
    pub key: String,
    pub cmd: Cmd,
    /// Since the start of the run (one monotonic clock for every client).
    pub call: Duration,
    /// When the reply or error came back. For an `Unknown` outcome this is only when the
    /// client gave up; the checkers take its completion as +infinity.
    pub ret: Duration,
    pub outcome: Outcome,
}

impl Op {
    pub fn is_ok(&self) -> bool {
        matches!(self.outcome, Outcome::Ok(_))
    }

    pub fn is_unknown(&self) -> bool {
        matches!(self.outcome, Outcome::Unknown(_))
    }

    pub fn is_failed(&self) -> bool {
        matches!(self.outcome, Outcome::Failed(_))
    }

    /// Completion time as the checkers see it: `None` (+infinity) unless the outcome is
    /// definite.
    pub fn done(&self) -> Option<Duration> {
        (!self.is_unknown()).then_some(self.ret)
    }
}

fn secs(d: Duration) -> String {
    format!("{:.3}s", d.as_secs_f64())
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let who = if self.client == FINAL_CLIENT {
            "final".to_string()
        } else {
            format!("c{}", self.client)
        };
        let end = match &self.outcome {
            Outcome::Unknown(_) => format!("?    (gave up {})", secs(self.ret)),
            _ => secs(self.ret),
        };
        write!(
            f,
            "[{} .. {}] {who} @:{} {}",
            secs(self.call),
            end,
            self.port,
            self.cmd.name()
        )?;
        write!(f, " {}", self.key)?;
        match &self.cmd {
            Cmd::Set(v) | Cmd::RPush(v) => write!(f, " {}", show_value(*v))?,
            Cmd::LRange => write!(f, " 0 -1")?,
            Cmd::Get | Cmd::Incr => {}
        }
        match &self.outcome {
            Outcome::Ok(Reply::Ok) => write!(f, " -> OK"),
            Outcome::Ok(Reply::Int(n)) if matches!(self.cmd, Cmd::Incr) => {
                write!(f, " -> {}", show_value(*n))
            }
            Outcome::Ok(Reply::Int(n)) => write!(f, " -> {n}"),
            Outcome::Ok(Reply::Value(None)) => write!(f, " -> nil"),
            Outcome::Ok(Reply::Value(Some(v))) => write!(f, " -> {}", show_value(*v)),
            Outcome::Ok(Reply::List(l)) => {
                write!(f, " -> {} items", l.len)?;
                if l.len > 0 {
                    write!(f, ", ending {}", show_values(&l.tail))?;
                }
                Ok(())
            }
            Outcome::Failed(e) => write!(f, " -> failed: {e}"),
            Outcome::Unknown(e) => write!(f, " -> unknown: {e}"),
        }
    }
}

/// An op for hand-made histories in the checkers' unit tests: times in milliseconds,
/// `ret_ms` ignored when the outcome is `Unknown`.
#[cfg(test)]
pub fn op(client: usize, cmd: Cmd, call_ms: u64, ret_ms: u64, outcome: Outcome) -> Op {
    Op {
        client,
        port: 7000 + client as u16,
        key: "k".into(),
        cmd,
        call: Duration::from_millis(call_ms),
        ret: Duration::from_millis(ret_ms),
        outcome,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_name_their_writer() {
        let v = unique_value(3, 17);
        assert_eq!(show_value(v), "c3#17");
        assert_eq!(show_value(v + 2), "c3#17+2");
        assert_eq!(set_value_of(v + 2), Some(v));
        assert_eq!(set_value_of(5), None);
        assert_eq!(show_value(5), "5");
        assert_ne!(unique_value(0, 1), unique_value(1, 0));
        let all = [10, 11, 12, 13];
        let h = prefix_hashes(&all);
        for n in 0..=all.len() {
            assert_eq!(ListRead::of(&all[..n]).hash, h[n]);
        }
        assert_ne!(ListRead::of(&[11, 10]).hash, h[2]);
        assert_eq!(ListRead::of(&all).tail, vec![11, 12, 13]);
        let o = op(
            2,
            Cmd::Set(v),
            1500,
            1600,
            Outcome::Unknown("TIMEOUT".into()),
        );
        assert_eq!(
            o.to_string(),
            "[1.500s .. ?    (gave up 1.600s)] c2 @:7002 SET k c3#17 -> unknown: TIMEOUT"
        );
    }
}
