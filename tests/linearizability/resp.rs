//! A minimal RESP2 client over a plain `TcpStream`, with a timeout on every step.
//!
//! The `redis` crate sends `CLIENT SETINFO` while connecting, without any read timeout, so a
//! connection to a SIGSTOPped node would hang until the node is resumed. Here connect, write
//! and read are each bounded, and an error reply is kept as the server's exact text
//! (`MOVED 0 127.0.0.1:7001`), which is what the workload classifies outcomes by.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Bulk strings and arrays larger than this are refused as a protocol error: nothing in
/// the workload comes near it, and it bounds what a garbled reply can make us allocate.
const BULK_BYTES_MAX: usize = 64 << 20;
const ARRAY_LEN_MAX: usize = 16 << 20;
const ARRAY_DEPTH_MAX: usize = 8;

#[derive(Clone, Debug, PartialEq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Resp>>),
}

pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    pub fn connect(port: u16, connect_timeout: Duration, io_timeout: Duration) -> io::Result<Conn> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let stream = TcpStream::connect_timeout(&addr, connect_timeout)?;
        stream.set_read_timeout(Some(io_timeout))?;
        stream.set_write_timeout(Some(io_timeout))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// Sends one command and reads its reply. An `Err` means the connection is no longer
    /// usable (I/O error, timeout, protocol error): drop it.
    pub fn call(&mut self, args: &[&str]) -> io::Result<Resp> {
        self.send(args)?;
        self.recv()
    }

    /// Sends one command without waiting for its reply (`recv` reads it).
    pub fn send(&mut self, args: &[&str]) -> io::Result<()> {
        let mut buf = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            buf.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            buf.extend_from_slice(a.as_bytes());
            buf.extend_from_slice(b"\r\n");
        }
        self.writer.write_all(&buf)
    }

    pub fn recv(&mut self) -> io::Result<Resp> {
        read_reply(&mut self.reader, 0)
    }
}

fn protocol(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn read_line(r: &mut impl BufRead) -> io::Result<String> {
    let mut line = Vec::new();
    // Bounded: a reply line longer than a bulk string is garbage.
    let n = r.take(BULK_BYTES_MAX as u64).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    if !line.ends_with(b"\r\n") {
        return Err(protocol("reply line without CRLF".into()));
    }
    line.truncate(line.len() - 2);
    String::from_utf8(line).map_err(|_| protocol("reply line is not UTF-8".into()))
}

fn parse_len(s: &str, max: usize) -> io::Result<Option<usize>> {
    let n: i64 = s
        .parse()
        .map_err(|_| protocol(format!("bad length {s:?}")))?;
    if n < 0 {
        return Ok(None);
    }
    let n = n as usize;
    if n > max {
        return Err(protocol(format!("length {n} over {max}")));
    }
    Ok(Some(n))
}

fn read_reply(r: &mut impl BufRead, depth: usize) -> io::Result<Resp> {
    if depth > ARRAY_DEPTH_MAX {
        return Err(protocol("arrays nested too deep".into()));
    }
    let line = read_line(r)?;
    let (kind, rest) = line.split_at(line.len().min(1));
    match kind {
        "+" => Ok(Resp::Simple(rest.to_string())),
        "-" => Ok(Resp::Error(rest.to_string())),
        ":" => rest
            .parse()
            .map(Resp::Int)
            .map_err(|_| protocol(format!("bad integer {rest:?}"))),
        "$" => match parse_len(rest, BULK_BYTES_MAX)? {
            None => Ok(Resp::Bulk(None)),
            Some(n) => {
                let mut b = vec![0; n + 2];
                r.read_exact(&mut b)?;
                if !b.ends_with(b"\r\n") {
                    return Err(protocol("bulk string without CRLF".into()));
                }
                b.truncate(n);
                Ok(Resp::Bulk(Some(b)))
            }
        },
        "*" => match parse_len(rest, ARRAY_LEN_MAX)? {
            None => Ok(Resp::Array(None)),
            Some(n) => {
                let mut v = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    v.push(read_reply(r, depth + 1)?);
                }
                Ok(Resp::Array(Some(v)))
            }
        },
        _ => Err(protocol(format!("unknown reply type in {line:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(b: &[u8]) -> io::Result<Resp> {
        read_reply(&mut BufReader::new(b), 0)
    }

    #[test]
    fn resp_replies_parse() {
        assert_eq!(parse(b"+OK\r\n").unwrap(), Resp::Simple("OK".into()));
        assert_eq!(
            parse(b"-MOVED 0 127.0.0.1:7001\r\n").unwrap(),
            Resp::Error("MOVED 0 127.0.0.1:7001".into())
        );
        assert_eq!(parse(b":-3\r\n").unwrap(), Resp::Int(-3));
        assert_eq!(parse(b"$-1\r\n").unwrap(), Resp::Bulk(None));
        assert_eq!(
            parse(b"*2\r\n$1\r\na\r\n$0\r\n\r\n").unwrap(),
            Resp::Array(Some(vec![
                Resp::Bulk(Some(b"a".to_vec())),
                Resp::Bulk(Some(Vec::new()))
            ]))
        );
        assert!(parse(b"$3\r\nab").is_err());
        assert!(parse(b"?x\r\n").is_err());
        assert!(parse(b"").is_err());
    }
}
