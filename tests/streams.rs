//! Consumer groups end with the same state on every node, delivery times included, however
//! late a node applies XREADGROUP / XCLAIM / XAUTOCLAIM.

mod common;

use std::time::Duration;

use common::*;

/// A value with every consumer's `seen-time` and (Redis 7.2+) `active-time` (each node's
/// own clock: no command sets them) replaced by 0.
fn without_seen_time(v: Value) -> Value {
    match v {
        Value::Array(items) => {
            let mut out: Vec<Value> = items.into_iter().map(without_seen_time).collect();
            for i in 0..out.len().saturating_sub(1) {
                if out[i] == Value::BulkString(b"seen-time".to_vec())
                    || out[i] == Value::BulkString(b"active-time".to_vec())
                {
                    out[i + 1] = Value::Int(0);
                }
            }
            Value::Array(out)
        }
        other => other,
    }
}

/// The pending entries as `[id, consumer, delivery count]` (XPENDING's idle left out).
fn pending_without_idle(c: &Cluster, i: usize, key: &str) -> Vec<Value> {
    match c.local(i, &["XPENDING", key, "g", "-", "+", "100"]) {
        Value::Array(entries) => entries
            .into_iter()
            .map(|e| match e {
                Value::Array(f) if f.len() == 4 => {
                    Value::Array(vec![f[0].clone(), f[1].clone(), f[3].clone()])
                }
                other => other,
            })
            .collect(),
        other => panic!("XPENDING on node {i}: {other:?}"),
    }
}

fn delivery_times(full: &Value) -> Vec<Value> {
    // XINFO STREAM FULL: ... "groups" [[... "pending" [[id, consumer, time, count] ...]]]
    fn walk(v: &Value, out: &mut Vec<Value>) {
        if let Value::Array(items) = v {
            for (i, it) in items.iter().enumerate() {
                if *it == Value::BulkString(b"pending".to_vec()) {
                    if let Some(Value::Array(p)) = items.get(i + 1) {
                        for e in p {
                            if let Value::Array(f) = e {
                                if f.len() == 4 && matches!(f[1], Value::BulkString(_)) {
                                    out.push(f[2].clone());
                                }
                            }
                        }
                    }
                }
                walk(it, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(full, &mut out);
    out
}

#[test]
fn consumer_group_state_is_identical_on_a_node_that_applies_late() {
    let mut c = Cluster::start(3);
    let l = c.wait_leader(Duration::from_secs(10));
    let f = (l + 1) % 3;
    let port = c.nodes[l].def.port;
    let mut r = RawConn::open(port);
    assert_eq!(
        r.cmd(&["XGROUP", "CREATE", "s", "g", "$", "MKSTREAM"]),
        "+OK\r\n"
    );
    c.wait_applied_everywhere(Duration::from_secs(10));
    // One follower stops: it applies everything below seconds later, in one go.
    c.signal(f, libc::SIGSTOP);
    for i in 1..=6 {
        let id = format!("{i}-1");
        assert_eq!(
            r.cmd(&["XADD", "s", &id, "n", &i.to_string()]),
            format!("$3\r\n{id}\r\n")
        );
    }
    // XREADGROUP ... BLOCK goes through the blocking path (its attempts are logged too).
    let mut w = RawConn::open(port);
    w.send(&[
        "XREADGROUP",
        "GROUP",
        "g",
        "dave",
        "COUNT",
        "4",
        "BLOCK",
        "0",
        "STREAMS",
        "s",
        ">",
    ]);
    assert_eq!(
        w.read(),
        "*1\r\n*2\r\n$1\r\ns\r\n*4\r\n\
         *2\r\n$3\r\n1-1\r\n*2\r\n$1\r\nn\r\n$1\r\n1\r\n\
         *2\r\n$3\r\n2-1\r\n*2\r\n$1\r\nn\r\n$1\r\n2\r\n\
         *2\r\n$3\r\n3-1\r\n*2\r\n$1\r\nn\r\n$1\r\n3\r\n\
         *2\r\n$3\r\n4-1\r\n*2\r\n$1\r\nn\r\n$1\r\n4\r\n"
    );
    assert_eq!(
        r.cmd(&["XREADGROUP", "GROUP", "g", "alice", "STREAMS", "s", ">"]),
        "*1\r\n*2\r\n$1\r\ns\r\n*2\r\n\
         *2\r\n$3\r\n5-1\r\n*2\r\n$1\r\nn\r\n$1\r\n5\r\n\
         *2\r\n$3\r\n6-1\r\n*2\r\n$1\r\nn\r\n$1\r\n6\r\n"
    );
    // A history read delivers 5-1 and 6-1 again (new delivery time, count 2), and shows a
    // deleted entry as nil.
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(r.cmd(&["XDEL", "s", "6-1"]), ":1\r\n");
    assert_eq!(
        r.cmd(&["XREADGROUP", "GROUP", "g", "alice", "STREAMS", "s", "0"]),
        "*1\r\n*2\r\n$1\r\ns\r\n*2\r\n\
         *2\r\n$3\r\n5-1\r\n*2\r\n$1\r\nn\r\n$1\r\n5\r\n\
         *2\r\n$3\r\n6-1\r\n*-1\r\n"
    );
    // dave's entries are over 1000 ms idle; alice's 5-1 was just delivered again (margins
    // of 800 ms keep this true on a loaded machine).
    assert_eq!(
        r.cmd(&["XCLAIM", "s", "g", "bob", "800", "1-1", "5-1", "JUSTID"]),
        "*1\r\n$3\r\n1-1\r\n"
    );
    assert_eq!(
        r.cmd(&["XCLAIM", "s", "g", "bob", "1000000", "2-1"]),
        "*0\r\n"
    );
    assert_eq!(
        r.cmd(&["XCLAIM", "s", "g", "erin", "0", "9-9", "FORCE"]),
        "*0\r\n"
    );
    std::thread::sleep(Duration::from_millis(100));
    // From 0: 1-1 (bob's, 100 ms idle) is too recent for 800; 2-1 and 3-1 are taken;
    // COUNT 2 is then used up and 4-1 is the cursor.
    assert_eq!(
        r.cmd(&["XAUTOCLAIM", "s", "g", "carol", "800", "0", "COUNT", "2"]),
        "*3\r\n$3\r\n4-1\r\n*2\r\n\
         *2\r\n$3\r\n2-1\r\n*2\r\n$1\r\nn\r\n$1\r\n2\r\n\
         *2\r\n$3\r\n3-1\r\n*2\r\n$1\r\nn\r\n$1\r\n3\r\n\
         *0\r\n"
    );
    // From the cursor: 4-1 is taken; 6-1 no longer exists and leaves the PEL.
    assert_eq!(
        r.cmd(&["XAUTOCLAIM", "s", "g", "carol", "800", "4-1", "JUSTID"]),
        "*3\r\n$3\r\n0-0\r\n*1\r\n$3\r\n4-1\r\n*1\r\n$3\r\n6-1\r\n"
    );
    // RESP3 replies are Redis's too.
    assert!(r.cmd(&["HELLO", "3"]).starts_with("%7\r\n"));
    assert_eq!(
        r.cmd(&[
            "XAUTOCLAIM",
            "s",
            "g",
            "bob",
            "0",
            "0",
            "COUNT",
            "1",
            "JUSTID"
        ]),
        "*3\r\n$3\r\n2-1\r\n*1\r\n$3\r\n1-1\r\n*0\r\n"
    );
    assert_eq!(
        r.cmd(&["XREADGROUP", "GROUP", "g", "bob", "STREAMS", "s", "0"]),
        "%1\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-1\r\n*2\r\n$1\r\nn\r\n$1\r\n1\r\n"
    );
    // Inside a transaction too.
    let mut m = RawConn::open(port);
    assert_eq!(
        m.cmd(&["XGROUP", "CREATE", "t", "g", "0", "MKSTREAM"]),
        "+OK\r\n"
    );
    assert_eq!(m.cmd(&["XADD", "t", "1-1", "a", "1"]), "$3\r\n1-1\r\n");
    assert_eq!(m.cmd(&["MULTI"]), "+OK\r\n");
    for cmd in [
        &["XREADGROUP", "GROUP", "g", "x", "STREAMS", "t", ">"][..],
        &["XCLAIM", "t", "g", "y", "0", "1-1", "JUSTID"],
        &["XAUTOCLAIM", "t", "g", "z", "0", "0", "JUSTID"],
    ] {
        assert_eq!(m.cmd(cmd), "+QUEUED\r\n");
    }
    assert_eq!(
        m.cmd(&["EXEC"]),
        "*3\r\n\
         *1\r\n*2\r\n$1\r\nt\r\n*1\r\n*2\r\n$3\r\n1-1\r\n*2\r\n$1\r\na\r\n$1\r\n1\r\n\
         *1\r\n$3\r\n1-1\r\n\
         *3\r\n$3\r\n0-0\r\n*1\r\n$3\r\n1-1\r\n*0\r\n"
    );
    // The stopped follower applies it all now, long after the leader did.
    std::thread::sleep(Duration::from_millis(500));
    c.signal(f, libc::SIGCONT);
    c.wait_applied_everywhere(Duration::from_secs(20));
    let full = without_seen_time(c.local(l, &["XINFO", "STREAM", "s", "FULL"]));
    let times = delivery_times(&full);
    assert_eq!(times.len(), 5, "pending entries: {full:?}");
    let pending = pending_without_idle(&c, l, "s");
    assert_eq!(
        pending,
        vec![
            Value::Array(vec![
                Value::BulkString(b"1-1".to_vec()),
                Value::BulkString(b"bob".to_vec()),
                Value::Int(2)
            ]),
            Value::Array(vec![
                Value::BulkString(b"2-1".to_vec()),
                Value::BulkString(b"carol".to_vec()),
                Value::Int(2)
            ]),
            Value::Array(vec![
                Value::BulkString(b"3-1".to_vec()),
                Value::BulkString(b"carol".to_vec()),
                Value::Int(2)
            ]),
            Value::Array(vec![
                Value::BulkString(b"4-1".to_vec()),
                Value::BulkString(b"carol".to_vec()),
                Value::Int(1)
            ]),
            Value::Array(vec![
                Value::BulkString(b"5-1".to_vec()),
                Value::BulkString(b"alice".to_vec()),
                Value::Int(2)
            ]),
        ]
    );
    let full_t = without_seen_time(c.local(l, &["XINFO", "STREAM", "t", "FULL"]));
    for i in 0..3 {
        assert_eq!(
            pending_without_idle(&c, i, "t"),
            vec![Value::Array(vec![
                Value::BulkString(b"1-1".to_vec()),
                Value::BulkString(b"z".to_vec()),
                Value::Int(1)
            ])],
            "node {i}"
        );
        assert_eq!(
            without_seen_time(c.local(i, &["XINFO", "STREAM", "t", "FULL"])),
            full_t,
            "node {i}: stream t"
        );
        assert_eq!(pending_without_idle(&c, i, "s"), pending, "node {i}");
        assert_eq!(
            without_seen_time(c.local(i, &["XINFO", "STREAM", "s", "FULL"])),
            full,
            "node {i}: delivery times and owners"
        );
    }
    // Inside a script XREADGROUP would stamp each node's clock: refused, unless it records
    // no delivery (NOACK of new entries). XCLAIM/XAUTOCLAIM are refused as random already.
    let e = m.cmd(&[
        "EVAL",
        "return redis.call('XREADGROUP', 'GROUP', 'g', 'x', 'STREAMS', KEYS[1], '0')",
        "1",
        "t",
    ]);
    assert!(
        e.starts_with("-ERR XREADGROUP records delivery times with each node's clock"),
        "{e}"
    );
    assert_eq!(m.cmd(&["XADD", "t", "2-1", "a", "2"]), "$3\r\n2-1\r\n");
    assert_eq!(
        m.cmd(&[
            "EVAL",
            "return redis.call('XREADGROUP', 'GROUP', 'g', 'x', 'NOACK', 'STREAMS', KEYS[1], '>')",
            "1",
            "t",
        ]),
        "*1\r\n*2\r\n$1\r\nt\r\n*1\r\n*2\r\n$3\r\n2-1\r\n*2\r\n$1\r\na\r\n$1\r\n2\r\n"
    );
    let e = m.cmd(&[
        "EVAL",
        "return redis.call('XCLAIM', KEYS[1], 'g', 'x', '0', '1-1')",
        "1",
        "t",
    ]);
    assert!(e.contains("XCLAIM has random results"), "{e}");
}
