//! `raft.*` options: their values, parsing of `raft.cluster-nodes`, and the checks that
//! span several options. Pure Rust, no Redis API: `redis/configs.rs` registers these with
//! Redis's module configuration API and calls in here.

use std::fmt;

/// Default bus port offset, as Redis Cluster's bus: Redis port + 10000.
pub const BUS_PORT_OFFSET: u32 = 10000;

/// The values of every `raft.*` option, as Redis last accepted them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    pub node_id: String,
    pub cluster_nodes: String,
    pub election_timeout_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub log_filename: String,
    pub log_fsync: bool,
    pub addr: String,
    pub bus_port: u64,
    pub loglevel: LogLevel,
    /// `raft.read-mode` as set; see `effective_read_mode`.
    pub read_mode: ReadMode,
    /// RedisRaft's `raft.quorum-reads no`: stale reads whatever `raft.read-mode` says.
    pub quorum_reads_no: bool,
    pub follower_reads: bool,
    /// RedisRaft's `raft.ignored-commands`: comma-separated commands run locally.
    pub ignored_commands: String,
    /// `raft.cluster-password`: shared secret peers prove on the bus; empty disables the check.
    /// Also the password this node gives (with `cluster_user`) to AUTH on other nodes' Redis
    /// ports (RAFT.CLUSTER JOIN).
    pub cluster_password: String,
    /// `raft.cluster-user` (RedisRaft's): the ACL user this node AUTHenticates as on other
    /// nodes' Redis ports, with `cluster_password`.
    pub cluster_user: String,
    /// RAFT.CLUSTER JOIN gives up after this long (`raft.join-timeout`, RedisRaft's option).
    pub join_timeout_ms: u64,
    /// Take a snapshot and compact the log once its file passes this many bytes (0: never;
    /// `raft.log-max-file-size`, RedisRaft's option and default).
    pub log_max_file_bytes: u64,
    /// `raft.log-max-cache-size` (RedisRaft's): bytes of entry payloads (encoded size) the log
    /// keeps in memory, the newest ones; older entries are read back from the log file.
    /// Runtime-settable (the store evicts down to a lower bound at once).
    pub log_max_cache_bytes: u64,
    /// `raft.snapshot-fail` (RedisRaft's hidden test option): snapshot forks fail as if
    /// `fork` had.
    pub snapshot_fail: bool,
    /// `raft.snapshot-delay` (RedisRaft's hidden test option): the snapshot child waits this
    /// many seconds before writing, so tests can kill a node mid-save.
    pub snapshot_delay_secs: u64,
    /// `raft.tls-enabled` (RedisRaft's): TLS 1.3 with mutual authentication on the bus and
    /// on RAFT.CLUSTER JOIN's connections, certificates from Redis's tls-* settings. Fixed
    /// at start.
    pub tls_enabled: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            node_id: String::new(),
            cluster_nodes: String::new(),
            election_timeout_ms: 1000,
            heartbeat_interval_ms: 100,
            log_filename: "redisraft.db".to_string(),
            log_fsync: true,
            addr: String::new(),
            bus_port: 0,
            loglevel: LogLevel::Notice,
            read_mode: ReadMode::Linearizable,
            quorum_reads_no: false,
            follower_reads: false,
            ignored_commands: String::new(),
            cluster_password: String::new(),
            cluster_user: "default".to_string(),
            join_timeout_ms: 120_000,
            log_max_file_bytes: 128_000_000,
            log_max_cache_bytes: 64_000_000,
            snapshot_fail: false,
            snapshot_delay_secs: 0,
            tls_enabled: false,
        }
    }
}

impl Options {
    /// `raft.ignored-commands` as lower-case names.
    pub fn ignored(&self) -> Vec<String> {
        self.ignored_commands
            .split(',')
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// The read mode in force: `raft.read-mode`, unless RedisRaft's `raft.quorum-reads no`
    /// asked for stale reads.
    pub fn effective_read_mode(&self) -> ReadMode {
        if self.quorum_reads_no {
            ReadMode::Stale
        } else {
            self.read_mode
        }
    }
}

/// `raft.read-mode`: how reads are kept consistent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMode {
    /// ReadIndex: the leader confirms it still leads with a quorum round, then the read runs
    /// once this node has applied up to the confirmed commit index.
    Linearizable = 0,
    /// Leader lease: no round trip; assumes clocks advance at about the same rate on every
    /// node (a deposed leader stops serving within an election timeout).
    Lease = 1,
    /// Local data, no check: may be stale.
    Stale = 2,
}

impl ReadMode {
    pub const NAMES: [&'static str; 3] = ["linearizable", "lease", "stale"];

    pub fn from_index(i: i32) -> Option<ReadMode> {
        match i {
            0 => Some(ReadMode::Linearizable),
            1 => Some(ReadMode::Lease),
            2 => Some(ReadMode::Stale),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }
}

/// Redis's log levels; `raft.loglevel` filters the module's own lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Debug = 0,
    Verbose = 1,
    Notice = 2,
    Warning = 3,
}

impl LogLevel {
    pub const NAMES: [&'static str; 4] = ["debug", "verbose", "notice", "warning"];

    pub fn from_index(i: i32) -> Option<LogLevel> {
        match i {
            0 => Some(LogLevel::Debug),
            1 => Some(LogLevel::Verbose),
            2 => Some(LogLevel::Notice),
            3 => Some(LogLevel::Warning),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }
}

/// One entry of `raft.cluster-nodes`: `[name=]host:port[@bus-port]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeEntry {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub bus_port: u16,
}

impl NodeEntry {
    /// The node's Redis address, as given in -MOVED.
    pub fn redis_addr(&self) -> String {
        join_host_port(&self.host, u32::from(self.port))
    }

    /// The address its bus listens on.
    pub fn bus_addr(&self) -> String {
        join_host_port(&self.host, u32::from(self.bus_port))
    }

    /// Raft's numeric id for this node, derived from its name so every node computes the
    /// same id from the same `raft.cluster-nodes` in any order.
    pub fn raft_id(&self) -> u64 {
        node_id_for_name(&self.name)
    }
}

fn join_host_port(host: &str, port: u32) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// FNV-1a of the name, folded to 31 bits (ids read like RedisRaft's), never 0 (raft-rs's "none").
pub fn node_id_for_name(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let id = (h ^ (h >> 31) ^ (h >> 62)) & 0x7fff_ffff;
    if id == 0 {
        1
    } else {
        id
    }
}

/// A refused option value: names the option and says what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub option: &'static str,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft.{}: {}", self.option, self.message)
    }
}

impl std::error::Error for ConfigError {}

fn err(option: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        option,
        message: message.into(),
    }
}

/// Parses `host:port` (or `[v6]:port`).
pub fn parse_host_port(s: &str) -> Result<(String, u16), String> {
    let s = s.trim();
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest
            .split_once("]:")
            .ok_or_else(|| format!("'{s}' is not host:port"))?;
        (h, p)
    } else {
        s.rsplit_once(':')
            .ok_or_else(|| format!("'{s}' is not host:port"))?
    };
    if host.is_empty() || host.contains(char::is_whitespace) || host.contains(',') {
        return Err(format!("'{s}' has no valid host"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("'{s}' has an invalid port '{port}'"))?;
    if port == 0 {
        return Err(format!("'{s}' has port 0"));
    }
    Ok((host.to_string(), port))
}

fn parse_entry(raw: &str) -> Result<NodeEntry, String> {
    let (name, rest) = match raw.split_once('=') {
        Some((n, r)) => (Some(n.trim()), r.trim()),
        None => (None, raw.trim()),
    };
    let (addr, bus) = match rest.split_once('@') {
        Some((a, b)) => (a, Some(b)),
        None => (rest, None),
    };
    let (host, port) = parse_host_port(addr)?;
    let bus_port = match bus {
        Some(b) => match b.trim().parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(format!("'{raw}' has an invalid bus port '{b}'")),
        },
        None => {
            let p = u32::from(port) + BUS_PORT_OFFSET;
            u16::try_from(p).map_err(|_| {
                format!("'{raw}': default bus port {p} (port + {BUS_PORT_OFFSET}) is out of range; give one with @bus-port")
            })?
        }
    };
    let name = match name {
        Some("") => return Err(format!("'{raw}' has an empty name before '='")),
        Some(n) => n.to_string(),
        None => host.clone(),
    };
    if name.contains(char::is_whitespace) {
        return Err(format!("'{raw}': a node name cannot contain spaces"));
    }
    Ok(NodeEntry {
        name,
        host,
        port,
        bus_port,
    })
}

/// Parses `raft.cluster-nodes`: comma-separated `[name=]host:port[@bus-port]`.
/// An empty string means "no bootstrap cluster" (the node waits for RAFT.CLUSTER INIT/JOIN).
pub fn parse_cluster_nodes(s: &str) -> Result<Vec<NodeEntry>, ConfigError> {
    const OPT: &str = "cluster-nodes";
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut nodes: Vec<NodeEntry> = Vec::new();
    for raw in s.split(',') {
        if raw.trim().is_empty() {
            return Err(err(OPT, format!("empty entry in '{s}'")));
        }
        let e = parse_entry(raw).map_err(|m| {
            err(
                OPT,
                format!("malformed entry: {m}; expected [name=]host:port[@bus-port]"),
            )
        })?;
        if nodes.iter().any(|n| n.name == e.name) {
            return Err(err(
                OPT,
                format!(
                    "duplicate node name '{}' (entries without a name are named by their host: give each node a name, as in n1=127.0.0.1:7001)",
                    e.name
                ),
            ));
        }
        if let Some(n) = nodes
            .iter()
            .find(|n| n.host == e.host && (n.port == e.port || n.bus_port == e.bus_port))
        {
            return Err(err(
                OPT,
                format!(
                    "nodes '{}' and '{}' share an address ({}:{} / bus {})",
                    n.name, e.name, e.host, e.port, e.bus_port
                ),
            ));
        }
        if let Some(n) = nodes.iter().find(|n| n.raft_id() == e.raft_id()) {
            return Err(err(
                OPT,
                format!(
                    "node names '{}' and '{}' map to the same raft id; rename one",
                    n.name, e.name
                ),
            ));
        }
        nodes.push(e);
    }
    Ok(nodes)
}

/// Validates one string option on its own (called when Redis sets it).
pub fn check_string(option: &'static str, value: &str) -> Result<(), ConfigError> {
    match option {
        "node-id"
            if value.contains(char::is_whitespace)
                || value.contains(',')
                || value.contains('=') =>
        {
            return Err(err(option, "a node name cannot contain spaces, ',' or '='"));
        }
        "cluster-nodes" => {
            parse_cluster_nodes(value)?;
        }
        "ignored-commands"
            if value
                .split(',')
                .any(|c| c.trim().contains(char::is_whitespace)) =>
        {
            return Err(err(
                option,
                "must be a comma-separated list of command names, as in \"incr,decr\"",
            ));
        }
        "cluster-user" if value.is_empty() || value.contains(char::is_whitespace) => {
            return Err(err(
                option,
                "must be an ACL user name (not empty, no spaces)",
            ));
        }
        "log-filename" => {
            if value.is_empty() {
                return Err(err(option, "must not be empty"));
            }
            if value.contains('\0') {
                return Err(err(option, "must not contain NUL"));
            }
        }
        "addr" if !value.is_empty() => {
            parse_host_port(value).map_err(|m| {
                err(
                    option,
                    format!("{m}; it must be in the form of 10.0.0.3:6379"),
                )
            })?;
        }
        _ => {}
    }
    Ok(())
}

/// The cluster this node boots into, derived from the options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bootstrap {
    pub nodes: Vec<NodeEntry>,
    /// Index of this node in `nodes`.
    pub me: usize,
}

impl Bootstrap {
    pub fn me(&self) -> &NodeEntry {
        &self.nodes[self.me]
    }
}

/// Checks that span several options; run once all values are loaded (start-up) and on
/// every CONFIG SET. Returns the bootstrap cluster, if `raft.cluster-nodes` names one.
pub fn validate(o: &Options) -> Result<Option<Bootstrap>, ConfigError> {
    if o.election_timeout_ms == 0 {
        return Err(err("election-timeout", "must be a positive number of ms"));
    }
    if o.heartbeat_interval_ms == 0 {
        return Err(err("heartbeat-interval", "must be a positive number of ms"));
    }
    if o.heartbeat_interval_ms >= o.election_timeout_ms {
        return Err(err(
            "heartbeat-interval",
            format!(
                "{} ms must be below raft.election-timeout ({} ms); a few times below is usual",
                o.heartbeat_interval_ms, o.election_timeout_ms
            ),
        ));
    }
    if o.election_timeout_ms / o.heartbeat_interval_ms < 2 {
        return Err(err(
            "election-timeout",
            format!(
                "{} ms must be at least twice raft.heartbeat-interval ({} ms)",
                o.election_timeout_ms, o.heartbeat_interval_ms
            ),
        ));
    }
    if o.bus_port > u64::from(u16::MAX) {
        return Err(err(
            "bus-port",
            "must be a TCP port (1-65535), or 0 for the default",
        ));
    }
    check_string("node-id", &o.node_id)?;
    check_string("log-filename", &o.log_filename)?;
    check_string("addr", &o.addr)?;
    let nodes = parse_cluster_nodes(&o.cluster_nodes)?;
    if nodes.is_empty() {
        return Ok(None);
    }
    if o.node_id.is_empty() {
        return Err(err(
            "node-id",
            "must be set when raft.cluster-nodes is set: it names this node's entry",
        ));
    }
    let me = nodes
        .iter()
        .position(|n| n.name == o.node_id)
        .ok_or_else(|| {
            let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
            err(
                "node-id",
                format!(
                    "'{}' is not in raft.cluster-nodes (its names are: {})",
                    o.node_id,
                    names.join(", ")
                ),
            )
        })?;
    Ok(Some(Bootstrap { nodes, me }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(node: &str, nodes: &str) -> Options {
        Options {
            node_id: node.into(),
            cluster_nodes: nodes.into(),
            ..Options::default()
        }
    }

    #[test]
    fn documented_example_parses_with_names_from_hosts() {
        let b = validate(&opts("node-1", "node-1:6379,node-2:6379,node-3:6379"))
            .unwrap()
            .unwrap();
        assert_eq!(b.me, 0);
        assert_eq!(b.nodes.len(), 3);
        assert_eq!(b.nodes[1].name, "node-2");
        assert_eq!(b.nodes[1].redis_addr(), "node-2:6379");
        assert_eq!(b.nodes[1].bus_addr(), "node-2:16379");
    }

    #[test]
    fn named_entries_with_bus_ports() {
        let b = validate(&opts(
            "b",
            "a=127.0.0.1:7001, b=127.0.0.1:7002@9002 ,c=[::1]:7003",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(b.me, 1);
        assert_eq!(b.me().bus_port, 9002);
        assert_eq!(b.nodes[2].redis_addr(), "[::1]:7003");
        assert_eq!(b.nodes[2].bus_addr(), "[::1]:17003");
    }

    #[test]
    fn empty_cluster_nodes_means_no_bootstrap() {
        assert_eq!(validate(&opts("", "")).unwrap(), None);
    }

    #[test]
    fn node_id_not_listed_is_refused() {
        let e = validate(&opts("x", "a=h:1,b=h:2")).unwrap_err();
        assert_eq!(e.option, "node-id");
        assert_eq!(
            e.to_string(),
            "raft.node-id: 'x' is not in raft.cluster-nodes (its names are: a, b)"
        );
    }

    #[test]
    fn malformed_entries_are_refused() {
        for bad in [
            "a=h",
            "a=h:port",
            "a=h:0",
            "a=:1",
            "=h:1",
            "a=h:1,,b=h:2",
            "a=h:1@x",
            "a=h:70000",
            "a=h:60000",
        ] {
            let e = parse_cluster_nodes(bad).unwrap_err();
            assert_eq!(e.option, "cluster-nodes", "{bad}");
        }
    }

    #[test]
    fn duplicates_are_refused() {
        let e = parse_cluster_nodes("a=h:1,a=h:2").unwrap_err();
        assert!(e.message.starts_with("duplicate node name 'a'"), "{e}");
        let e = parse_cluster_nodes("127.0.0.1:1,127.0.0.1:2").unwrap_err();
        assert!(
            e.message.starts_with("duplicate node name '127.0.0.1'"),
            "{e}"
        );
        let e = parse_cluster_nodes("a=h:1,b=h:1").unwrap_err();
        assert!(e.message.contains("share an address"), "{e}");
    }

    #[test]
    fn timing_rules() {
        let mut o = opts("", "");
        o.heartbeat_interval_ms = 1000;
        assert_eq!(validate(&o).unwrap_err().option, "heartbeat-interval");
        o.heartbeat_interval_ms = 600;
        assert_eq!(validate(&o).unwrap_err().option, "election-timeout");
        o.heartbeat_interval_ms = 0;
        assert_eq!(validate(&o).unwrap_err().option, "heartbeat-interval");
        o.heartbeat_interval_ms = 100;
        o.election_timeout_ms = 0;
        assert_eq!(validate(&o).unwrap_err().option, "election-timeout");
    }

    #[test]
    fn ids_are_stable_and_nonzero() {
        assert_eq!(node_id_for_name("n1"), node_id_for_name("n1"));
        assert_ne!(node_id_for_name("n1"), node_id_for_name("n2"));
        assert!(node_id_for_name("") > 0);
        assert!(node_id_for_name("n1") <= 0x7fff_ffff);
    }
}
