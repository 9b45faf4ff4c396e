//! Which commands go through Raft, from Redis's own command table (`COMMAND` flags), so new
//! commands and other modules' commands are handled without a hand-written list.

use std::collections::HashMap;

use super::api::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Replicated through the log and executed on every node after commit.
    Write,
    /// Reads the dataset: served by the leader.
    Read,
    /// Runs as usual on any node (PING, INFO, CONFIG, CLIENT, RAFT.* ...).
    Local,
    /// Refused with a clear error (no meaning in a Raft cluster, or not supported yet).
    Refused(&'static str),
    /// Has subcommands: look up `name|sub`.
    Container,
}

/// Commands refused outright, with the reason the client sees.
const REFUSED: &[(&str, &str)] = &[
    (
        "replicaof",
        "REPLICAOF makes no sense in a Raft cluster: every node already holds the data",
    ),
    (
        "slaveof",
        "SLAVEOF makes no sense in a Raft cluster: every node already holds the data",
    ),
    (
        "sync",
        "SYNC is not supported by redis-raft: nodes replicate through the Raft log",
    ),
    (
        "psync",
        "PSYNC is not supported by redis-raft: nodes replicate through the Raft log",
    ),
    ("multi", "MULTI is not supported by redis-raft yet"),
    ("exec", "EXEC is not supported by redis-raft yet"),
    ("discard", "DISCARD is not supported by redis-raft yet"),
    ("watch", "WATCH is not supported by redis-raft yet"),
    (
        "select",
        "SELECT is not supported by redis-raft yet: use database 0",
    ),
    ("swapdb", "SWAPDB is not supported by redis-raft yet"),
];

/// Commands that Redis does not flag `write` but whose effects must be replicated.
const WRITES: &[&str] = &["eval", "evalsha", "fcall"];

#[derive(Default)]
pub struct CommandTable {
    map: HashMap<Vec<u8>, Class>,
}

fn flags_of(v: &Value) -> Vec<&[u8]> {
    match v {
        Value::Array(items) => items
            .iter()
            .filter_map(|f| match f {
                Value::Str(s) => Some(s.as_slice()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn class_of(name: &str, flags: &[&[u8]]) -> Class {
    if name == "raft" || name.starts_with("raft.") || name.starts_with("raft|") {
        return Class::Local;
    }
    if let Some((_, why)) = REFUSED.iter().find(|(n, _)| *n == name) {
        return Class::Refused(why);
    }
    if WRITES.contains(&name) || flags.contains(&b"write".as_slice()) {
        Class::Write
    } else if flags.contains(&b"readonly".as_slice()) {
        Class::Read
    } else {
        Class::Local
    }
}

impl CommandTable {
    /// Builds the table from the reply of `COMMAND`.
    pub fn from_command_reply(reply: &Value) -> CommandTable {
        let mut t = CommandTable::default();
        if let Value::Array(cmds) = reply {
            for c in cmds {
                t.add(c, None);
            }
        }
        t
    }

    fn add(&mut self, c: &Value, parent: Option<&str>) {
        let Value::Array(fields) = c else { return };
        let Some(Value::Str(name)) = fields.first() else {
            return;
        };
        let name = String::from_utf8_lossy(name).to_ascii_lowercase();
        let flags = fields.get(2).map(flags_of).unwrap_or_default();
        let subs = match fields.get(9) {
            Some(Value::Array(s)) if !s.is_empty() => Some(s),
            _ => None,
        };
        let class = match (parent, subs) {
            (None, Some(_)) => Class::Container,
            _ => class_of(&name, &flags),
        };
        // A container's own flags are empty; a parent that is refused refuses its children.
        let class = match (parent, class_of(parent.unwrap_or(&name), &[])) {
            (Some(_), Class::Refused(w)) => Class::Refused(w),
            _ => class,
        };
        self.map.insert(name.clone().into_bytes(), class);
        if let Some(subs) = subs {
            for s in subs {
                self.add(s, Some(&name));
            }
        }
    }

    /// Classifies a command line (name and, for containers, the subcommand).
    pub fn classify(&self, name: &[u8], sub: Option<&[u8]>) -> Class {
        let mut key = Vec::with_capacity(name.len() + 16);
        key.extend(name.iter().map(|b| b.to_ascii_lowercase()));
        match self.map.get(&key) {
            // Unknown commands run as usual: Redis answers "unknown command".
            None => Class::Local,
            Some(Class::Container) => {
                let Some(sub) = sub else { return Class::Local };
                key.push(b'|');
                key.extend(sub.iter().map(|b| b.to_ascii_lowercase()));
                self.map.get(&key).copied().unwrap_or(Class::Local)
            }
            Some(c) => *c,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Value {
        Value::Str(x.as_bytes().to_vec())
    }

    fn cmd(name: &str, flags: &[&str], subs: Vec<Value>) -> Value {
        Value::Array(vec![
            s(name),
            Value::Int(-1),
            Value::Array(flags.iter().map(|f| s(f)).collect()),
            Value::Int(0),
            Value::Int(0),
            Value::Int(0),
            Value::Array(vec![]),
            Value::Array(vec![]),
            Value::Array(vec![]),
            Value::Array(subs),
        ])
    }

    #[test]
    fn classifies_from_flags_and_subcommands() {
        let reply = Value::Array(vec![
            cmd("set", &["write", "denyoom"], vec![]),
            cmd("get", &["readonly", "fast"], vec![]),
            cmd("ping", &["fast"], vec![]),
            cmd("eval", &["noscript"], vec![]),
            cmd("replicaof", &["admin"], vec![]),
            cmd(
                "xgroup",
                &[],
                vec![
                    cmd("xgroup|create", &["write"], vec![]),
                    cmd("xgroup|help", &["loading"], vec![]),
                ],
            ),
            cmd("raft.debug", &["admin"], vec![]),
        ]);
        let t = CommandTable::from_command_reply(&reply);
        assert_eq!(t.classify(b"SET", None), Class::Write);
        assert_eq!(t.classify(b"get", None), Class::Read);
        assert_eq!(t.classify(b"PING", None), Class::Local);
        assert_eq!(t.classify(b"eval", None), Class::Write);
        assert!(matches!(t.classify(b"replicaof", None), Class::Refused(_)));
        assert_eq!(t.classify(b"XGROUP", Some(b"CREATE")), Class::Write);
        assert_eq!(t.classify(b"xgroup", Some(b"help")), Class::Local);
        assert_eq!(t.classify(b"xgroup", None), Class::Local);
        assert_eq!(t.classify(b"raft.debug", None), Class::Local);
        assert_eq!(t.classify(b"nosuchcommand", None), Class::Local);
    }
}
