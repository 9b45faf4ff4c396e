//! Which commands go through Raft, from Redis's own command table (`COMMAND` flags), so new
//! commands and other modules' commands are handled without a hand-written list.

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
    /// MULTI, EXEC, DISCARD, WATCH, UNWATCH: redis-raft runs transactions itself.
    Transaction,
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
    ("failover", "FAILOVER makes no sense in a Raft cluster"),
    (
        "save",
        "SAVE is not supported by redis-raft: the Raft log is the persistence",
    ),
    (
        "bgsave",
        "BGSAVE is not supported by redis-raft: the Raft log is the persistence",
    ),
    (
        "bgrewriteaof",
        "BGREWRITEAOF is not supported by redis-raft: the Raft log is the persistence",
    ),
];

/// Subcommands refused although their command is not (DEBUG has no subcommand table).
const REFUSED_SUB: &[(&str, &str, &str)] = &[
    (
        "debug",
        "reload",
        "DEBUG RELOAD would replace this node's data behind the Raft log's back",
    ),
    (
        "debug",
        "loadaof",
        "DEBUG LOADAOF would replace this node's data behind the Raft log's back",
    ),
];

/// Redis 7.0's `PROTECTED` commands.
const PROTECTED: &[&str] = &["debug", "module|load", "module|loadex", "module|unload"];

/// Transaction commands: redis-raft queues transactions itself (commands/multi.rs).
const TRANSACTION: &[&str] = &["multi", "exec", "discard", "watch", "unwatch"];

/// Commands that Redis does not flag `write` but whose effects must be replicated. PUBLISH
/// goes through the log so that subscribers on every node get each message, in one order.
const WRITES: &[&str] = &[
    "eval",
    "evalsha",
    "fcall",
    "publish",
    "spublish",
    // Every node must hold the same scripts for EVALSHA.
    "script|load",
    "script|flush",
];

/// A command name, or `name|sub`, lower-cased on the stack for the usual lengths (the table
/// is looked up on every command).
struct Lower {
    buf: [u8; 64],
    len: usize,
    /// Used instead of `buf` once the key outgrows it.
    long: Option<Vec<u8>>,
}

impl Lower {
    fn new(name: &[u8]) -> Lower {
        let mut k = Lower {
            buf: [0; 64],
            len: 0,
            long: None,
        };
        k.extend(name);
        k
    }

    fn extend(&mut self, bytes: &[u8]) {
        if let Some(v) = self.long.as_mut() {
            v.extend(bytes.iter().map(u8::to_ascii_lowercase));
        } else if self.len + bytes.len() <= self.buf.len() {
            for (d, b) in self.buf[self.len..].iter_mut().zip(bytes) {
                *d = b.to_ascii_lowercase();
            }
            self.len += bytes.len();
        } else {
            let mut v = self.buf[..self.len].to_vec();
            v.extend(bytes.iter().map(u8::to_ascii_lowercase));
            self.long = Some(v);
        }
    }

    fn with_sub(&mut self, sub: &[u8]) {
        self.extend(b"|");
        self.extend(sub);
    }

    fn as_slice(&self) -> &[u8] {
        self.long.as_deref().unwrap_or(&self.buf[..self.len])
    }
}

/// A command name as a client spelled it, and its class, for `CommandTable::recent`.
#[derive(Clone, Copy, Default)]
struct Recent {
    len: u8,
    name: [u8; 15],
    class: Option<Class>,
}

/// Slots of `CommandTable::recent` (a power of two).
const RECENT_SLOTS: usize = 8;

#[derive(Default)]
pub struct CommandTable {
    /// The classes of recently classified names whose class does not depend on a
    /// subcommand, by their exact bytes: the filter classifies every command, mostly the same
    /// few names, and this skips lower-casing and hashing them. Rebuilt with the table.
    recent: [std::cell::Cell<Recent>; RECENT_SLOTS],
    /// Lower-case name (`name|sub` for subcommands) to class and Redis's arity (negative:
    /// at least that many).
    map: rustc_hash::FxHashMap<Vec<u8>, (Class, i64)>,
    /// Commands (lower-case, `name|sub` for subcommands) Redis refuses when over maxmemory.
    denyoom: rustc_hash::FxHashSet<Vec<u8>>,
    /// Commands Redis refuses inside MULTI (`no_multi`: SHUTDOWN, SAVE, SYNC, PSYNC ...).
    no_multi: std::collections::HashSet<Vec<u8>>,
    /// Commands whose output Redis marks as random (`nondeterministic_output`).
    random_output: std::collections::HashSet<Vec<u8>>,
    /// Commands whose output order Redis marks as arbitrary (`nondeterministic_output_order`).
    unordered_output: std::collections::HashSet<Vec<u8>>,
}

/// How a command inside a script run on the apply path must be treated so that every node
/// computes the same result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InScript {
    Run,
    /// Random results: refused.
    Refuse,
    /// Arbitrary order: the reply is sorted.
    Sort,
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
    if TRANSACTION.contains(&name) {
        return Class::Transaction;
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
        Self::build(reply, &[])
    }

    /// Builds the table; `ignored` (lower-case names, RedisRaft's `raft.ignored-commands`)
    /// run locally whatever their flags say.
    pub fn build(reply: &Value, ignored: &[String]) -> CommandTable {
        let mut t = CommandTable::default();
        if let Value::Array(cmds) = reply {
            for c in cmds {
                t.add(c, None);
            }
        }
        for name in ignored {
            let key = name.as_bytes().to_vec();
            if let Some(entry) = t.map.get_mut(&key) {
                entry.0 = Class::Local;
            }
            // Its subcommands too.
            let mut prefix = key.clone();
            prefix.push(b'|');
            for (k, v) in t.map.iter_mut() {
                if k.starts_with(&prefix) {
                    v.0 = Class::Local;
                }
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
        let arity = match fields.get(1) {
            Some(Value::Int(a)) => *a,
            _ => -1,
        };
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
        if flags.contains(&b"denyoom".as_slice()) {
            self.denyoom.insert(name.clone().into_bytes());
        }
        if flags.contains(&b"no_multi".as_slice()) {
            self.no_multi.insert(name.clone().into_bytes());
        }

        let tips = fields.get(7).map(flags_of).unwrap_or_default();
        if tips.contains(&b"nondeterministic_output".as_slice()) {
            self.random_output.insert(name.clone().into_bytes());
        }
        if tips.contains(&b"nondeterministic_output_order".as_slice()) {
            self.unordered_output.insert(name.clone().into_bytes());
        }
        self.map.insert(name.clone().into_bytes(), (class, arity));
        if let Some(subs) = subs {
            for s in subs {
                self.add(s, Some(&name));
            }
        }
    }

    /// Classifies a command line (name and, for containers, the subcommand).
    pub fn classify(&self, name: &[u8], sub: Option<&[u8]>) -> Class {
        let slot = match (name.first(), name.last()) {
            (Some(&a), Some(&b)) if name.len() <= 15 => {
                (usize::from(a) ^ usize::from(b) ^ name.len()) & (RECENT_SLOTS - 1)
            }
            _ => return self.classify_uncached(name, sub),
        };
        let r = self.recent[slot].get();
        if let Some(class) = r.class.filter(|_| &r.name[..usize::from(r.len)] == name) {
            return class;
        }
        let (class, by_name_alone) = self.lookup(name, sub);
        if by_name_alone {
            let mut e = Recent {
                len: name.len() as u8,
                class: Some(class),
                ..Recent::default()
            };
            e.name[..name.len()].copy_from_slice(name);
            self.recent[slot].set(e);
        }
        class
    }

    fn classify_uncached(&self, name: &[u8], sub: Option<&[u8]>) -> Class {
        self.lookup(name, sub).0
    }

    /// The class, and whether it follows from the name alone: not for a container, nor for
    /// a command with a refused subcommand (REFUSED_SUB), whose class depends on `sub`.
    fn lookup(&self, name: &[u8], sub: Option<&[u8]>) -> (Class, bool) {
        let mut key = Lower::new(name);
        let mut by_name_alone = true;
        for (n, s, why) in REFUSED_SUB {
            if key.as_slice() == n.as_bytes() {
                by_name_alone = false;
                if sub.is_some_and(|sub| sub.eq_ignore_ascii_case(s.as_bytes())) {
                    return (Class::Refused(why), false);
                }
            }
        }
        let class = match self.map.get(key.as_slice()) {
            // Unknown commands run as usual: Redis answers "unknown command".
            None => Class::Local,
            Some((Class::Container, _)) => {
                by_name_alone = false;
                match sub {
                    None => Class::Local,
                    Some(sub) => {
                        key.with_sub(sub);
                        self.map
                            .get(key.as_slice())
                            .map(|(c, _)| *c)
                            .unwrap_or(Class::Local)
                    }
                }
            }
            Some((c, _)) => *c,
        };
        (class, by_name_alone)
    }

    /// How a command called from a script on the apply path is treated.
    pub fn in_script(&self, name: &[u8], sub: Option<&[u8]>) -> InScript {
        let mut key = name.to_ascii_lowercase();
        let found = |k: &Vec<u8>| {
            if self.random_output.contains(k) {
                Some(InScript::Refuse)
            } else if self.unordered_output.contains(k) {
                Some(InScript::Sort)
            } else {
                None
            }
        };
        if let Some(r) = found(&key) {
            return r;
        }
        if let Some(sub) = sub {
            key.push(b'|');
            key.extend(sub.iter().map(|b| b.to_ascii_lowercase()));
            if let Some(r) = found(&key) {
                return r;
            }
        }
        InScript::Run
    }

    /// Whether Redis refuses this command line when memory is over `maxmemory`.
    pub fn denies_oom(&self, argv: &[Vec<u8>]) -> bool {
        let Some(name) = argv.first() else {
            return false;
        };
        let mut key = Lower::new(name);
        if self.denyoom.contains(key.as_slice()) {
            return true;
        }
        if let Some(sub) = argv.get(1) {
            key.with_sub(sub);
            return self.denyoom.contains(key.as_slice());
        }
        false
    }

    /// Whether Redis refuses this command line inside MULTI ("Command not allowed inside a
    /// transaction").
    pub fn no_multi(&self, argv: &[Vec<u8>]) -> bool {
        flagged(&self.no_multi, argv)
    }

    /// Whether this command line is behind `enable-debug-command` / `enable-module-command`
    /// (Redis's `PROTECTED` flag, which COMMAND does not show).
    pub fn protected(&self, argv: &[Vec<u8>]) -> bool {
        flagged(
            &PROTECTED.iter().map(|c| c.as_bytes().to_vec()).collect(),
            argv,
        )
    }

    /// Checks a command line against Redis's table as Redis would before running it:
    /// `Err` carries Redis's own error text (unknown command, wrong arity).
    pub fn check_syntax(&self, argv: &[Vec<u8>]) -> Result<(), String> {
        let Some(name) = argv.first() else {
            return Err("ERR empty command".into());
        };
        let lname = name.to_ascii_lowercase();
        let shown = |b: &[u8]| String::from_utf8_lossy(&b[..b.len().min(128)]).into_owned();
        let Some((class, arity)) = self.map.get(&lname) else {
            let rest: Vec<String> = argv[1..]
                .iter()
                .map(|a| format!("'{}' ", shown(a)))
                .collect();
            return Err(format!(
                "ERR unknown command '{}', with args beginning with: {}",
                shown(name),
                rest.concat()
            ));
        };
        let (arity, what) = match (class, argv.get(1)) {
            (Class::Container, Some(sub)) => {
                let mut key = lname.clone();
                key.push(b'|');
                key.extend(sub.iter().map(|b| b.to_ascii_lowercase()));
                match self.map.get(&key) {
                    Some((_, a)) => (
                        *a,
                        format!("{}|{}", shown(&lname), shown(&sub.to_ascii_lowercase())),
                    ),
                    None => {
                        return Err(format!(
                            "ERR unknown subcommand '{}'. Try {} HELP.",
                            shown(sub),
                            shown(&name.to_ascii_uppercase())
                        ))
                    }
                }
            }
            _ => (*arity, shown(&lname)),
        };
        let n = argv.len() as i64;
        if (arity > 0 && n != arity) || (arity < 0 && n < -arity) {
            return Err(format!(
                "ERR wrong number of arguments for '{what}' command"
            ));
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Whether the command, or its subcommand, is in `set`.
fn flagged(set: &std::collections::HashSet<Vec<u8>>, argv: &[Vec<u8>]) -> bool {
    let Some(name) = argv.first() else {
        return false;
    };
    let mut key = name.to_ascii_lowercase();
    if set.contains(&key) {
        return true;
    }
    if let Some(sub) = argv.get(1) {
        key.push(b'|');
        key.extend(sub.iter().map(|b| b.to_ascii_lowercase()));
        return set.contains(&key);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_keys_of_any_length_match_their_lower_case_bytes() {
        let long = "X".repeat(70);
        for (name, sub) in [
            ("GET", None),
            ("Client", Some("LiSt")),
            (long.as_str(), Some("Y")),
        ] {
            let mut k = Lower::new(name.as_bytes());
            let mut want = name.to_ascii_lowercase();
            if let Some(sub) = sub {
                k.with_sub(sub.as_bytes());
                want = format!("{want}|{}", sub.to_ascii_lowercase());
            }
            assert_eq!(k.as_slice(), want.as_bytes());
        }
    }

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

    fn cmd_arity(name: &str, arity: i64, flags: &[&str]) -> Value {
        let Value::Array(mut v) = cmd(name, flags, vec![]) else {
            unreachable!()
        };
        v[1] = Value::Int(arity);
        Value::Array(v)
    }

    /// SET, GET, PING, XGROUP (a container) and DEBUG, as COMMAND describes them.
    fn common_commands() -> Vec<Value> {
        vec![
            cmd_arity("set", -3, &["write", "denyoom"]),
            cmd_arity("get", 2, &["readonly", "fast"]),
            cmd("ping", &["fast"], vec![]),
            cmd(
                "xgroup",
                &[],
                vec![
                    cmd("xgroup|create", &["write"], vec![]),
                    cmd("xgroup|help", &["loading"], vec![]),
                ],
            ),
            cmd("debug", &["admin"], vec![]),
        ]
    }

    #[test]
    fn classifies_from_flags_and_subcommands() {
        let mut cmds = common_commands();
        cmds.extend([
            cmd("eval", &["noscript"], vec![]),
            cmd("replicaof", &["admin"], vec![]),
            cmd("raft.debug", &["admin"], vec![]),
            cmd("multi", &["fast"], vec![]),
            cmd("shutdown", &["no_multi", "noscript"], vec![]),
        ]);
        let reply = Value::Array(cmds);
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
        assert!(matches!(
            t.classify(b"DEBUG", Some(b"Reload")),
            Class::Refused(_)
        ));
        assert_eq!(t.classify(b"debug", Some(b"sleep")), Class::Local);
        assert_eq!(t.classify(b"MULTI", None), Class::Transaction);
        let argv = |a: &[&str]| a.iter().map(|x| x.as_bytes().to_vec()).collect::<Vec<_>>();
        assert_eq!(
            t.check_syntax(&argv(&["get"])),
            Err("ERR wrong number of arguments for 'get' command".into())
        );
        assert_eq!(t.check_syntax(&argv(&["SET", "k", "v"])), Ok(()));
        assert_eq!(
            t.check_syntax(&argv(&["nope", "a"])),
            Err("ERR unknown command 'nope', with args beginning with: 'a' ".into())
        );
        assert_eq!(t.check_syntax(&argv(&["xgroup", "create"])), Ok(()));
        assert!(t.denies_oom(&argv(&["SET", "k", "v"])));
        assert!(t.no_multi(&argv(&["SHUTDOWN", "NOSAVE"])));
        assert!(!t.no_multi(&argv(&["SET", "k", "v"])));
        assert!(t.protected(&argv(&["DEBUG", "SLEEP", "0"])));
        assert!(!t.protected(&argv(&["SET", "k", "v"])));
        assert!(t.protected(&argv(&["MODULE", "load", "x.so"])));
        assert!(!t.protected(&argv(&["MODULE", "LIST"])));
        let t = CommandTable::build(&reply, &["set".to_string(), "xgroup".to_string()]);
        assert_eq!(t.classify(b"SET", None), Class::Local);
        assert_eq!(t.classify(b"xgroup", Some(b"create")), Class::Local);
        assert_eq!(t.classify(b"get", None), Class::Read);
        assert!(!t.denies_oom(&argv(&["GET", "k"])));
    }

    #[test]
    fn remembered_classes_match_the_table_whatever_the_order_and_subcommand() {
        let long = "x".repeat(40);
        let mut cmds = common_commands();
        cmds.push(cmd(&long, &["write"], vec![]));
        let reply = Value::Array(cmds);
        let t = CommandTable::from_command_reply(&reply);
        let lines: [(&[u8], Option<&[u8]>); 12] = [
            (b"get", Some(b"k")),
            (b"SET", Some(b"k")),
            (b"xgroup", Some(b"create")),
            (b"xgroup", Some(b"help")),
            (b"XGROUP", None),
            (b"debug", Some(b"reload")),
            (b"debug", Some(b"sleep")),
            (b"ping", None),
            (long.as_bytes(), None),
            (b"GET", None),
            (b"nosuch", None),
            (b"", None),
        ];
        for round in 0..3 {
            for (i, (name, sub)) in lines.iter().enumerate() {
                assert_eq!(
                    t.classify(name, *sub),
                    t.classify_uncached(name, *sub),
                    "round {round}, line {i}"
                );
            }
        }
        assert_eq!(t.classify(b"xgroup", Some(b"create")), Class::Write);
        assert!(matches!(
            t.classify(b"debug", Some(b"reload")),
            Class::Refused(_)
        ));
        assert_eq!(t.classify(b"debug", Some(b"sleep")), Class::Local);
        assert_eq!(t.classify(long.as_bytes(), None), Class::Write);
    }
}
