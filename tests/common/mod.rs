//! Test harness: real redis-server processes with the module loaded, on free ports in a
//! temp dir, talked to over TCP with the `redis` crate. Processes are killed on drop, and a
//! failing test prints each node's log tail.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use redis::Value;

pub mod proxy;

pub const ELECTION_MS: u64 = 500;
pub const HEARTBEAT_MS: u64 = 50;

/// Path of the module built alongside this test binary: `cargo test` builds the library,
/// a dependency of every integration test, with all its crate types before it runs them,
/// so target/<profile>/deps/libredis_raft.so (beside the test binary) is as fresh as the
/// tests. `cargo test` does not copy it up to target/<profile>/, where `cargo build` puts
/// it; and building it again here with `cargo build` would not be a no-op: `cargo test`
/// turns on dev-dependencies' features in shared crates, so the two builds differ and each
/// replaces the other's (20-45 s each time). Only when it is missing (a test binary run by
/// hand) is it built here.
pub fn module_path() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().expect("test exe path");
            let deps = exe.parent().expect("target/<profile>/deps");
            let p = deps.join("libredis_raft.so");
            if p.exists() {
                return p;
            }
            let profile_dir = deps.parent().expect("target/<profile>");
            let release = profile_dir.file_name().is_some_and(|n| n == "release");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "--lib", "--quiet"])
                .current_dir(env!("CARGO_MANIFEST_DIR"));
            if release {
                cmd.arg("--release");
            }
            let st = cmd.status().expect("run cargo build");
            assert!(st.success(), "cargo build of the module failed");
            let p = profile_dir.join("libredis_raft.so");
            assert!(p.exists(), "module not built at {}", p.display());
            p
        })
        .clone()
}

/// The server the tests run: `REDIS_SERVER` (a path, for Redis 7.2+, Valkey ...), else
/// `redis-server` from PATH.
pub fn redis_server() -> String {
    std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into())
}

/// A port free right now, below Linux's ephemeral range (32768 and up) so that no outgoing
/// connection (the nodes' own bus connections included) can take it before the node binds
/// it. Each test process starts at its own place in 10000..32000 and walks forward.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = 10_000 + (std::process::id() * 7919) % 22_000;
    for _ in 0..22_000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 10_000 + (start - 10_000 + n) % 22_000;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port as u16)) {
            drop(l);
            return port as u16;
        }
    }
    panic!("no free port in 10000..32000");
}

pub struct NodeDef {
    pub name: String,
    pub port: u16,
    pub bus_port: u16,
    pub dir: PathBuf,
}

pub struct Node {
    pub def: NodeDef,
    pub child: Option<Child>,
    pub extra: Vec<String>,
    /// Environment for its redis-server (e.g. `REDIS_RAFT_TEST_FAULT`).
    pub env: Vec<(String, String)>,
    /// Started without `raft.cluster-nodes` (joins with RAFT.CLUSTER INIT/JOIN).
    pub dynamic: bool,
    /// The password the harness's own connections give (a node run with `--requirepass`),
    /// as `user` when that is set.
    pub password: Option<String>,
    pub user: Option<String>,
}

impl Node {
    pub fn log_path(&self) -> PathBuf {
        self.def.dir.join("redis.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

pub struct Cluster {
    pub tmp: tempfile::TempDir,
    pub nodes: Vec<Node>,
    pub cluster_nodes: String,
}

impl Cluster {
    /// Defines `n` nodes (not started).
    pub fn define(n: usize) -> Cluster {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut nodes = Vec::new();
        for i in 0..n {
            let dir = tmp.path().join(format!("n{}", i + 1));
            std::fs::create_dir_all(&dir).expect("node dir");
            nodes.push(Node {
                def: NodeDef {
                    name: format!("n{}", i + 1),
                    port: free_port(),
                    bus_port: free_port(),
                    dir,
                },
                child: None,
                extra: Vec::new(),
                env: Vec::new(),
                dynamic: false,
                password: None,
                user: None,
            });
        }
        let cluster_nodes = nodes
            .iter()
            .map(|n| format!("{}=127.0.0.1:{}@{}", n.def.name, n.def.port, n.def.bus_port))
            .collect::<Vec<_>>()
            .join(",");
        Cluster {
            tmp,
            nodes,
            cluster_nodes,
        }
    }

    /// Defines `n` nodes whose bus traffic passes through proxies that can cut links
    /// (proxy.rs), starts them, waits for a leader and tells the proxies who is who.
    pub fn start_partitionable(n: usize, extra: &[&str]) -> (Cluster, proxy::Partitions) {
        // `free_port` closes its listener, so the OS may hand a port out twice: a node
        // refuses to start when two of its addresses are the same.
        let (mut c, parts) = (0..10)
            .find_map(|_| {
                let c = Cluster::define(n);
                let real: Vec<u16> = c.nodes.iter().map(|n| n.def.bus_port).collect();
                let parts = proxy::Partitions::start(&real);
                let mut all: Vec<u16> = c.nodes.iter().map(|n| n.def.port).collect();
                all.extend(&real);
                all.extend(&parts.ports);
                let count = all.len();
                all.sort_unstable();
                all.dedup();
                (all.len() == count).then_some((c, parts))
            })
            .expect("distinct free ports in 10 tries");
        let real: Vec<u16> = c.nodes.iter().map(|n| n.def.bus_port).collect();
        c.cluster_nodes = c
            .nodes
            .iter()
            .zip(&parts.ports)
            .map(|(n, p)| format!("{}=127.0.0.1:{}@{p}", n.def.name, n.def.port))
            .collect::<Vec<_>>()
            .join(",");
        for (node, port) in c.nodes.iter_mut().zip(&real) {
            node.extra = vec!["--raft.bus-port".into(), port.to_string()];
            node.extra.extend(extra.iter().map(|s| s.to_string()));
        }
        for i in 0..n {
            c.start_node(i);
            let id = c
                .info_field(i, "raft_node_id")
                .and_then(|v| v.parse().ok())
                .expect("raft_node_id");
            parts.learn(id, i);
        }
        c.wait_leader(Duration::from_secs(15));
        (c, parts)
    }

    /// Defines and starts `n` nodes, and waits for a leader.
    pub fn start(n: usize) -> Cluster {
        Cluster::start_with(n, &[])
    }

    /// Defines and starts `n` nodes, each with `extra` arguments, and waits for a leader.
    pub fn start_with(n: usize, extra: &[&str]) -> Cluster {
        let mut c = Cluster::define(n);
        for i in 0..n {
            c.nodes[i].extra = extra.iter().map(|s| s.to_string()).collect();
            c.start_node(i);
        }
        c.wait_leader(Duration::from_secs(15));
        c
    }

    pub fn args(&self, i: usize) -> Vec<String> {
        let d = &self.nodes[i].def;
        let mut v: Vec<String> = [
            "--port",
            &d.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--dir",
            &d.dir.display().to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
            "--logfile",
            "redis.log",
            "--loadmodule",
            &module_path().display().to_string(),
            "--raft.node-id",
            &d.name,
            "--raft.election-timeout",
            &ELECTION_MS.to_string(),
            "--raft.heartbeat-interval",
            &HEARTBEAT_MS.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if self.nodes[i].dynamic {
            // Its bus port is announced when it joins; a free one, not port + 10000.
            v.push("--raft.bus-port".into());
            v.push(d.bus_port.to_string());
        } else {
            v.push("--raft.cluster-nodes".into());
            v.push(self.cluster_nodes.clone());
        }
        v.extend(self.nodes[i].extra.iter().cloned());
        v
    }

    /// Defines one more node that starts without `raft.cluster-nodes` (not started).
    pub fn add_dynamic_node(&mut self) -> usize {
        let i = self.nodes.len();
        let dir = self.tmp.path().join(format!("n{}", i + 1));
        std::fs::create_dir_all(&dir).expect("node dir");
        self.nodes.push(Node {
            def: NodeDef {
                name: format!("n{}", i + 1),
                port: free_port(),
                bus_port: free_port(),
                dir,
            },
            child: None,
            extra: Vec::new(),
            env: Vec::new(),
            dynamic: true,
            password: None,
            user: None,
        });
        i
    }

    /// The address clients use for node `i`.
    pub fn addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.nodes[i].def.port)
    }

    pub fn spawn_node(&mut self, i: usize) {
        let args = self.args(i);
        let child = Command::new(redis_server())
            .args(&args)
            .envs(self.nodes[i].env.iter().cloned())
            .current_dir(&self.nodes[i].def.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.nodes[i].child = Some(child);
    }

    /// Starts node `i` and waits until it answers PING.
    pub fn start_node(&mut self, i: usize) {
        self.spawn_node(i);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = self.conn(i) {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return;
                }
            }
            if !self.nodes[i].is_running() {
                panic!(
                    "node {} exited at start-up; log:\n{}",
                    self.nodes[i].def.name,
                    self.nodes[i].log()
                );
            }
            assert!(Instant::now() < deadline, "node {} did not start", i);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `sig` to node `i`. For SIGSTOP, returns once every thread of the process has
    /// stopped: the kernel stops a process's threads one after another, and under load a
    /// thread (the raft thread, say) can still answer a message after kill() returned.
    pub fn signal(&self, i: usize, sig: i32) {
        let Some(c) = &self.nodes[i].child else {
            return;
        };
        unsafe { libc::kill(c.id() as i32, sig) };
        if sig == libc::SIGSTOP {
            let pid = c.id();
            wait_for(
                &format!("every thread of node {i} to stop"),
                Duration::from_secs(10),
                || all_threads_stopped(pid),
            );
        }
    }

    pub fn conn(&self, i: usize) -> redis::RedisResult<redis::Connection> {
        let auth = match (&self.nodes[i].user, &self.nodes[i].password) {
            (u, Some(p)) => format!("{}:{p}@", u.as_deref().unwrap_or("")),
            _ => String::new(),
        };
        let client = redis::Client::open(format!(
            "redis://{auth}127.0.0.1:{}/",
            self.nodes[i].def.port
        ))?;
        let c = client.get_connection_with_timeout(Duration::from_secs(2))?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(c)
    }

    pub fn info_field(&self, i: usize, field: &str) -> Option<String> {
        let mut c = self.conn(i).ok()?;
        let info: String = redis::cmd("INFO").arg("raft").query(&mut c).ok()?;
        info.lines().find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_string())
        })
    }

    /// Index of the node that is leader and that all running nodes agree on.
    pub fn leader(&mut self) -> Option<usize> {
        let mut leader = None;
        let mut names = Vec::new();
        for i in 0..self.nodes.len() {
            if !self.nodes[i].is_running() {
                continue;
            }
            if self.info_field(i, "raft_role").as_deref() == Some("leader") {
                if leader.is_some() {
                    return None;
                }
                leader = Some(i);
            }
            names.push(self.info_field(i, "raft_leader_name"));
        }
        let l = leader?;
        let lname = Some(self.nodes[l].def.name.clone());
        names.iter().all(|n| *n == lname).then_some(l)
    }

    pub fn wait_leader(&mut self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.leader() {
                // A leader serves once it applied an entry of its term.
                if let Ok(mut c) = self.conn(l) {
                    if redis::cmd("GET")
                        .arg("__probe")
                        .query::<Value>(&mut c)
                        .is_ok()
                    {
                        return l;
                    }
                }
            }
            if Instant::now() > deadline {
                self.dump_logs();
                panic!("no leader within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs a command locally on node `i` (RAFT.DEBUG EXEC), outside Raft.
    pub fn local(&self, i: usize, args: &[&str]) -> Value {
        let mut c = self.conn(i).expect("conn");
        let mut cmd = redis::cmd("RAFT.DEBUG");
        cmd.arg("EXEC");
        for a in args {
            cmd.arg(*a);
        }
        cmd.query(&mut c).expect("RAFT.DEBUG EXEC")
    }

    /// Waits until every running node has applied at least the leader's commit index.
    pub fn wait_applied_everywhere(&mut self, timeout: Duration) {
        let l = self.wait_leader(timeout);
        let target: u64 = self
            .info_field(l, "raft_commit_index")
            .and_then(|v| v.parse().ok())
            .expect("commit index");
        let deadline = Instant::now() + timeout;
        for i in 0..self.nodes.len() {
            if !self.nodes[i].is_running() {
                continue;
            }
            loop {
                let applied: u64 = self
                    .info_field(i, "raft_last_applied_index")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if applied >= target {
                    break;
                }
                if Instant::now() > deadline {
                    self.dump_logs();
                    panic!("node {i} applied {applied} < {target}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn dump_logs(&self) {
        for n in &self.nodes {
            let log = n.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("==== {} ({})", n.def.name, n.log_path().display());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }

    pub fn log_file(&self, i: usize) -> PathBuf {
        self.nodes[i].def.dir.join("redisraft.db")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// Runs redis-server with `args` and the module, expecting it to refuse to start; returns its log.
pub fn start_expecting_failure(dir: &Path, raft_args: &[&str]) -> String {
    let port = free_port();
    let mut args: Vec<String> = vec![
        "--port".into(),
        port.to_string(),
        "--bind".into(),
        "127.0.0.1".into(),
        "--dir".into(),
        dir.display().to_string(),
        "--save".into(),
        "".into(),
        "--loadmodule".into(),
        module_path().display().to_string(),
    ];
    args.extend(raft_args.iter().map(|s| s.to_string()));
    let out_path = dir.join("stdout.txt");
    let out_file = std::fs::File::create(&out_path).expect("stdout file");
    let mut child = Command::new(redis_server())
        .args(&args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out_file.try_clone().expect("clone"))
        .stderr(out_file)
        .spawn()
        .expect("run redis-server");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("redis-server kept running with {raft_args:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        !status.success(),
        "redis-server exited 0 with {raft_args:?}"
    );
    std::fs::read_to_string(&out_path).unwrap_or_default()
}

/// The error code and detail of a reply, as a string like `MOVED 0 127.0.0.1:7001`.
pub fn err_text(e: &redis::RedisError) -> String {
    match (e.code(), e.detail()) {
        (Some(c), Some(d)) => format!("{c} {d}"),
        (Some(c), None) => c.to_string(),
        _ => e.to_string(),
    }
}

/// A bare RESP connection, for asserting replies byte for byte (redis-rs turns an error
/// inside an array into an error for the whole reply).
pub struct RawConn {
    stream: std::io::BufReader<std::net::TcpStream>,
}

impl RawConn {
    pub fn open(port: u16) -> RawConn {
        let s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        RawConn {
            stream: std::io::BufReader::new(s),
        }
    }

    /// Sends one command without reading its reply.
    pub fn send(&mut self, args: &[&str]) {
        use std::io::Write;
        let mut out = format!("*{}\r\n", args.len());
        for a in args {
            out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.stream
            .get_mut()
            .write_all(out.as_bytes())
            .expect("write");
    }

    /// Sends one command and returns its reply as raw RESP text.
    pub fn cmd(&mut self, args: &[&str]) -> String {
        self.send(args);
        self.read()
    }

    /// Whether the server closed the connection (nothing more to read).
    pub fn closed(&mut self) -> bool {
        use std::io::BufRead;
        let mut line = String::new();
        matches!(self.stream.read_line(&mut line), Ok(0) | Err(_))
    }

    /// Reads one more reply or pushed message.
    pub fn read(&mut self) -> String {
        let mut reply = String::new();
        self.read_value(&mut reply);
        reply
    }

    fn read_value(&mut self, into: &mut String) {
        use std::io::{BufRead, Read};
        let mut line = String::new();
        self.stream.read_line(&mut line).expect("read");
        into.push_str(&line);
        let n: i64 = line[1..].trim().parse().unwrap_or(0);
        match line.as_bytes().first() {
            Some(b'*') | Some(b'~') | Some(b'>') => {
                for _ in 0..n.max(0) {
                    self.read_value(into);
                }
            }
            Some(b'%') => {
                for _ in 0..n.max(0) * 2 {
                    self.read_value(into);
                }
            }
            Some(b'$') | Some(b'=') if n >= 0 => {
                let mut buf = vec![0u8; n as usize + 2];
                self.stream.read_exact(&mut buf).expect("read bulk");
                into.push_str(&String::from_utf8_lossy(&buf));
            }
            _ => {}
        }
    }
}

/// Builds tests/modules/<name>.c (small third-party modules: `counter` has a write and a read
/// command, `box` its own data type) with the redismodule.h that the redis-module crate
/// ships, into `dir`; returns the .so path.
pub fn build_test_module(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let cargo_home = std::env::var("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo")
        });
    let mut include = None;
    for reg in std::fs::read_dir(cargo_home.join("registry/src"))
        .expect("cargo registry")
        .flatten()
    {
        for krate in std::fs::read_dir(reg.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let krate_name = krate.file_name().to_string_lossy().into_owned();
            let h = krate.path().join("src/include");
            if krate_name.starts_with("redis-module-") && h.join("redismodule.h").exists() {
                include = Some(h);
            }
        }
    }
    let include = include.expect("redismodule.h from the redis-module crate");
    let out = dir.join(format!("{name}.so"));
    let st = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-I"])
        .arg(&include)
        .arg("-o")
        .arg(&out)
        .arg(format!(
            "{}/tests/modules/{name}.c",
            env!("CARGO_MANIFEST_DIR")
        ))
        .status()
        .expect("cc");
    assert!(st.success(), "building the test module failed");
    out
}

/// A plain redis-server without the module, to compare replies with.
pub struct PlainRedis {
    pub port: u16,
    child: Child,
    _tmp: tempfile::TempDir,
}

impl PlainRedis {
    pub fn start() -> PlainRedis {
        let tmp = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let child = Command::new(redis_server())
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--dir",
                &tmp.path().display().to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "plain redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        PlainRedis {
            port,
            child,
            _tmp: tmp,
        }
    }
}

impl Drop for PlainRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An `INFO raft` field of node `i` as a number (0 when missing).
pub fn info_num(c: &Cluster, i: usize, field: &str) -> u64 {
    c.info_field(i, field)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Whether every thread of process `pid` is stopped (state T in /proc), or it is gone.
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            // The state follows the command name, which is in parentheses.
            .and_then(|st| {
                st.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().to_string())
            })
            .is_none_or(|rest| rest.starts_with('T') || rest.starts_with('t'))
    })
}

/// Polls `f` every 20 ms until it holds; fails the test naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How many clients node `i` holds blocked (`blocked_clients` of INFO clients: waiting for
/// data, or for their entry to commit); 0 when the node does not answer.
pub fn blocked_clients(c: &Cluster, i: usize) -> u64 {
    let Ok(mut conn) = c.conn(i) else { return 0 };
    let info: String = redis::cmd("INFO")
        .arg("clients")
        .query(&mut conn)
        .unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("blocked_clients:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until node `i` holds exactly `n` blocked clients: a client sent a blocking command
/// and it now waits there (or a client that left is gone), instead of sleeping a guess.
pub fn wait_blocked(c: &Cluster, i: usize, n: u64) {
    wait_for(
        &format!("{n} blocked clients on node {i}"),
        Duration::from_secs(10),
        || blocked_clients(c, i) == n,
    );
}

/// Runs one command on node `i`; errors as text.
pub fn q(c: &Cluster, i: usize, args: &[&str]) -> Result<Value, String> {
    let mut conn = c.conn(i).map_err(|e| err_text(&e))?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut conn).map_err(|e| err_text(&e))
}

/// Node `i`'s whole dataset, read locally.
pub fn dataset(c: &Cluster, i: usize) -> BTreeMap<String, String> {
    let keys = match c.local(i, &["KEYS", "*"]) {
        Value::Array(v) => v,
        other => panic!("KEYS on node {i}: {other:?}"),
    };
    keys.into_iter()
        .map(|k| {
            let Value::BulkString(k) = k else {
                panic!("key {k:?}")
            };
            let k = String::from_utf8_lossy(&k).into_owned();
            let Value::BulkString(v) = c.local(i, &["GET", &k]) else {
                panic!("GET {k} on node {i}")
            };
            (k, String::from_utf8_lossy(&v).into_owned())
        })
        .collect()
}

/// Every acknowledged write is on every node, and all nodes hold the same data.
pub fn assert_same_data_with(c: &Cluster, acked: &BTreeMap<String, String>) {
    let first = dataset(c, 0);
    for (k, v) in acked {
        assert_eq!(first.get(k), Some(v), "acknowledged key {k} on node 0");
    }
    for i in 1..c.nodes.len() {
        assert!(
            dataset(c, i) == first,
            "node {i}'s data differs from node 0's"
        );
    }
}
