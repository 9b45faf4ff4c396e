//! RAFT.CLUSTER JOIN's client side: asks a cluster's leader (over its ordinary Redis port,
//! as RedisRaft does) to add this node, following -MOVED and retrying while the cluster has
//! no leader, until `raft.join-timeout`. Runs on its own thread; never calls the Redis API.
//! With `raft.cluster-user` / `raft.cluster-password` set, every connection starts with
//! `AUTH <user> <password>` (nodes run with `requirepass` or ACL users).
//! With `raft.tls-enabled yes` every connection is TLS 1.3 (the addresses given, and those
//! -MOVED names, must then be the nodes' `tls-port`s), presenting this node's client
//! certificate and checking the other's against the CA, as the bus does (crate::tls).

use std::io::{BufRead, BufReader, Read as _, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::codec::Member;

/// Bytes of one reply we accept from a peer: bounds what a confused or hostile peer can make
/// us allocate.
const REPLY_BYTES_MAX: usize = 1 << 20;
/// Elements an array reply's vector is made with before they arrive.
const ARRAY_PREALLOC_MAX: usize = 64;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before asking again when the cluster cannot take the change yet.
const RETRY_PAUSE: Duration = Duration::from_millis(300);
/// What to do about a node that wants a password (appended to NOAUTH / WRONGPASS).
const AUTH_HINT: &str =
    "(set raft.cluster-user and raft.cluster-password to an account of the cluster's nodes)";
/// RedisRaft's error for a cluster it could not reach or that had no leader; ours adds why.
pub const UNREACHABLE: &str = "ERR failed to connect to cluster for join";

/// `AUTH <user> <password>`, sent first on every connection to another node's Redis port.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl Credentials {
    /// The credentials `raft.cluster-user` and `raft.cluster-password` name, if any: none
    /// while they are left at `default` and empty (nothing to AUTH with).
    pub fn from_options(user: &str, password: &str) -> Option<Credentials> {
        (!password.is_empty() || user != "default").then(|| Credentials {
            user: user.to_string(),
            password: password.to_string(),
        })
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <password>)", self.user)
    }
}

/// A RESP reply, as much of it as joining needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Resp>>),
}

/// What a successful join learned.
#[derive(Debug)]
pub struct Joined {
    pub node_id: u64,
    pub cluster_id: String,
    /// The cluster's members with their addresses (so this node can answer its leader).
    pub members: Vec<Member>,
}

/// A connection to another node's Redis port: plain, or TLS (`raft.tls-enabled`).
enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl std::io::Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

/// An I/O error in words; a TLS failure with its reason (crate::tls::describe_failure).
fn io_text(e: &std::io::Error) -> String {
    if e.get_ref()
        .is_some_and(|i| i.downcast_ref::<rustls::Error>().is_some())
    {
        format!("TLS: {}", crate::tls::describe_failure(e))
    } else {
        e.to_string()
    }
}

/// Asks the cluster at `addrs` to add `me` until it does or `timeout` passes. With `tls`,
/// every connection is TLS with that configuration.
pub fn join(
    addrs: &[String],
    me: &Member,
    timeout: Duration,
    auth: Option<&Credentials>,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Joined, String> {
    let deadline = Instant::now() + timeout;
    let mut targets: Vec<String> = addrs.to_vec();
    let mut i = 0usize;
    let mut last_error = String::from("no address answered");
    let bus_port = me
        .bus_addr
        .rsplit_once(':')
        .map(|(_, p)| p.to_string())
        .unwrap_or_default();
    let add = [
        "RAFT.NODE".to_string(),
        "ADD".into(),
        me.id.to_string(),
        format!("{}@{}", me.redis_addr, bus_port),
        me.name.clone(),
    ];
    while Instant::now() < deadline {
        let target = targets[i % targets.len()].clone();
        match ask(&target, &add, auth, tls.as_ref()) {
            Ok((Resp::Array(Some(items)), mut conn)) if items.len() == 2 => {
                let (Resp::Int(id), Resp::Simple(cluster_id)) = (&items[0], &items[1]) else {
                    return Err(format!("unexpected reply from {target}: {items:?}"));
                };
                let members = match request(&mut conn, &["RAFT._MEMBERS".to_string()]) {
                    Ok(Resp::Array(Some(rows))) => rows.iter().filter_map(member_row).collect(),
                    other => {
                        warn!("joined, but {target} did not list its members ({other:?}); waiting for the log to name them");
                        Vec::new()
                    }
                };
                info!("joined cluster {cluster_id} as node {id} through {target}");
                return Ok(Joined {
                    node_id: *id as u64,
                    cluster_id: cluster_id.clone(),
                    members,
                });
            }
            Ok((Resp::Error(e), _)) => {
                if let Some(leader) = e.strip_prefix("MOVED ").and_then(|r| r.split(' ').nth(1)) {
                    info!("join: {target} is not the leader, trying {leader}");
                    targets.push(leader.to_string());
                    i = targets.len() - 1;
                    continue;
                }
                let transient = ["CLUSTERDOWN", "TRYAGAIN", "LOADING", "TIMEOUT"]
                    .iter()
                    .any(|p| e.starts_with(p))
                    || e.starts_with("ERR one voting change only");
                if !transient {
                    let why = e.strip_prefix("ERR ").unwrap_or(&e);
                    let hint = if e.starts_with("NOAUTH") || e.starts_with("WRONGPASS") {
                        format!(" {AUTH_HINT}")
                    } else {
                        String::new()
                    };
                    return Err(format!("ERR {target} refused the join: {why}{hint}"));
                }
                last_error = format!("{target}: {e}");
            }
            Ok((other, _)) => return Err(format!("ERR unexpected reply from {target}: {other:?}")),
            Err(e) => last_error = format!("{target}: {e}"),
        }
        i += 1;
        std::thread::sleep(RETRY_PAUSE);
    }
    Err(format!(
        "{UNREACHABLE}: gave up after raft.join-timeout ({} ms); last error: {last_error}",
        timeout.as_millis()
    ))
}

fn member_row(r: &Resp) -> Option<Member> {
    let Resp::Array(Some(f)) = r else { return None };
    let text = |i: usize| match f.get(i)? {
        Resp::Bulk(Some(b)) => String::from_utf8(b.clone()).ok(),
        Resp::Simple(s) => Some(s.clone()),
        _ => None,
    };
    let id = match f.first()? {
        Resp::Int(i) => u64::try_from(*i).ok()?,
        _ => return None,
    };
    Some(Member {
        id,
        name: text(1)?,
        redis_addr: text(2)?,
        bus_addr: text(3)?,
    })
}

/// Connects to `target`, authenticates if `auth` says so, and sends `args`. A refused AUTH
/// is returned as the reply (the caller reports it); I/O errors as Err.
fn ask(
    target: &str,
    args: &[String],
    auth: Option<&Credentials>,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<(Resp, BufReader<Conn>), String> {
    let addr = target
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve: {e}"))?
        .next()
        .ok_or("cannot resolve")?;
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let stream = match tls {
        None => Conn::Plain(stream),
        Some(cfg) => {
            let session = rustls::ClientConnection::new(cfg.clone(), crate::tls::server_name())
                .map_err(|e| format!("TLS: {e}"))?;
            Conn::Tls(Box::new(rustls::StreamOwned::new(session, stream)))
        }
    };
    let mut conn = BufReader::new(stream);
    if let Some(a) = auth {
        let auth_args = ["AUTH".to_string(), a.user.clone(), a.password.clone()];
        match request(&mut conn, &auth_args)? {
            Resp::Simple(_) => {}
            Resp::Error(e) => return Ok((Resp::Error(e), conn)),
            other => return Err(format!("unexpected reply to AUTH: {other:?}")),
        }
    }
    let r = request(&mut conn, args)?;
    Ok((r, conn))
}

fn request(conn: &mut BufReader<Conn>, args: &[String]) -> Result<Resp, String> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let w = conn.get_mut();
    w.write_all(&out)
        .and_then(|()| w.flush())
        .map_err(|e| io_text(&e))?;
    let mut budget = REPLY_BYTES_MAX;
    read_reply(conn, &mut budget, 0)
}

/// Reads one reply; `budget` bounds the bytes, `depth` the nesting.
pub fn read_reply<R: BufRead>(r: &mut R, budget: &mut usize, depth: u32) -> Result<Resp, String> {
    if depth > 8 {
        return Err("reply nested too deep".into());
    }
    let mut line = Vec::new();
    r.take(*budget as u64 + 2)
        .read_until(b'\n', &mut line)
        .map_err(|e| io_text(&e))?;
    if !line.ends_with(b"\r\n") {
        return Err("connection closed or reply too large".into());
    }
    *budget = budget.saturating_sub(line.len());
    line.truncate(line.len() - 2);
    let (&kind, rest) = line.split_first().ok_or("empty reply line")?;
    let text = String::from_utf8_lossy(rest).into_owned();
    let num = || {
        text.parse::<i64>()
            .map_err(|_| format!("bad number {text:?}"))
    };
    match kind {
        b'+' => Ok(Resp::Simple(text)),
        b'-' => Ok(Resp::Error(text)),
        b':' => Ok(Resp::Int(num()?)),
        b'$' => {
            let n = num()?;
            if n < 0 {
                return Ok(Resp::Bulk(None));
            }
            let n = n as usize;
            if n + 2 > *budget {
                return Err("reply too large".into());
            }
            let mut buf = vec![0u8; n + 2];
            r.read_exact(&mut buf).map_err(|e| io_text(&e))?;
            *budget -= n + 2;
            buf.truncate(n);
            Ok(Resp::Bulk(Some(buf)))
        }
        b'*' => {
            let n = num()?;
            if n < 0 {
                return Ok(Resp::Array(None));
            }
            // Every element takes at least 3 bytes (a type byte and CRLF).
            if n as usize > *budget / 3 {
                return Err("reply too large".into());
            }
            // The count is the peer's word: grow as elements arrive, not from it.
            let mut items = Vec::with_capacity((n as usize).min(ARRAY_PREALLOC_MAX));
            for _ in 0..n {
                items.push(read_reply(r, budget, depth + 1)?);
            }
            Ok(Resp::Array(Some(items)))
        }
        other => Err(format!("unexpected reply type byte {other:#x}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Result<Resp, String> {
        let mut budget = 1 << 20;
        read_reply(&mut std::io::Cursor::new(bytes), &mut budget, 0)
    }

    #[test]
    fn replies_parse() {
        assert_eq!(
            parse(b"*2\r\n:7\r\n+abc\r\n").unwrap(),
            Resp::Array(Some(vec![Resp::Int(7), Resp::Simple("abc".into())]))
        );
        assert_eq!(
            parse(b"-MOVED 0 h:1\r\n").unwrap(),
            Resp::Error("MOVED 0 h:1".into())
        );
        assert_eq!(
            parse(b"$3\r\nabc\r\n").unwrap(),
            Resp::Bulk(Some(b"abc".to_vec()))
        );
        assert_eq!(parse(b"$-1\r\n").unwrap(), Resp::Bulk(None));
    }

    #[test]
    fn bad_replies_are_errors() {
        assert!(parse(b"$10\r\nabc").is_err());
        assert!(parse(b"*99999999\r\n").is_err());
        assert!(parse(b"?x\r\n").is_err());
        assert!(parse(b":x\r\n").is_err());
        let mut budget = 4;
        assert!(read_reply(&mut std::io::Cursor::new(b"$100\r\n"), &mut budget, 0).is_err());
        // Found by fuzzing (join_reply): a count the budget allows, but not as elements,
        // allocated 13 MB before the first element was read.
        assert_eq!(
            parse(b"*424444\r\n1\r\n"),
            Err("reply too large".to_string())
        );
        // Within the bound: refused when the elements do not come (made with room for 64).
        assert!(parse(b"*300000\r\n").is_err());
    }

    #[test]
    fn member_rows_need_every_field() {
        let row = Resp::Array(Some(vec![
            Resp::Int(5),
            Resp::Bulk(Some(b"n5".to_vec())),
            Resp::Bulk(Some(b"h:1".to_vec())),
            Resp::Bulk(Some(b"h:2".to_vec())),
        ]));
        assert_eq!(member_row(&row).unwrap().name, "n5");
        assert!(member_row(&Resp::Array(Some(vec![Resp::Int(5)]))).is_none());
    }
}
