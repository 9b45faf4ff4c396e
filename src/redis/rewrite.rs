//! Rewrites a command on the leader, before it enters the log, so that every node computes
//! the same result however late it applies the entry:
//! - relative expiry becomes an absolute deadline (EXPIRE → PEXPIREAT, SET EX → SET PXAT,
//!   SETEX/PSETEX → SET ... PXAT, GETEX EX/PX → GETEX PXAT, RESTORE ttl → RESTORE ... ABSTTL);
//! - SPOP, whose members Redis picks at random, becomes a script that picks them from the
//!   sorted members with a seed chosen here, so every node removes the same ones;
//! - XREADGROUP, XCLAIM and XAUTOCLAIM, which stamp delivery times and compare them with the
//!   node's clock, become `RAFT._STREAM <now> <command ...>`: every node runs them with the
//!   leader's `now` (streams.rs).
//!
//! Pure functions of the command line, the leader's clock and a seed: unit-tested below.
//! Clock assumption: nodes' wall clocks agree to within the precision users need for TTLs
//! (NTP); a key dies on each node when that node's clock passes the deadline.

/// SPOP key [count], deterministic: members sorted, then picked by a xorshift generator
/// seeded from the entry. Replies as SPOP does (nil / bulk without count; array with count).
pub const SPOP_SCRIPT: &str = r#"
local members = redis.pcall('SMEMBERS', KEYS[1])
if members.err then return members end
table.sort(members)
local seed = tonumber(ARGV[1])
local function rnd(n)
  seed = (seed * 1103515245 + 12345) % 2147483648
  return (seed % n) + 1
end
local single = ARGV[2] == nil
local count = single and 1 or tonumber(ARGV[2])
local picked = {}
while #picked < count and #members > 0 do
  local i = rnd(#members)
  picked[#picked + 1] = members[i]
  members[i] = members[#members]
  members[#members] = nil
end
for i = 1, #picked, 1000 do
  redis.call('SREM', KEYS[1], unpack(picked, i, math.min(i + 999, #picked)))
end
if single then
  if #picked == 0 then return false end
  return picked[1]
end
return picked
"#;

/// XADD key ... * field value ...: the ID becomes `<ms>-*`, where ms is the later of the
/// leader's clock and the stream's last ID, computed identically on every node from the
/// stream they all hold. ARGV: ms, position of the ID in the XADD arguments, the arguments.
pub const XADD_SCRIPT: &str = r#"
local ms = tonumber(ARGV[1])
local pos = tonumber(ARGV[2])
local args = {}
for i = 3, #ARGV do args[#args + 1] = ARGV[i] end
local info = redis.pcall('XINFO', 'STREAM', KEYS[1])
if not info.err then
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      local last = tonumber(string.match(info[i + 1], '^(%d+)-'))
      if last and last > ms then ms = last end
    end
  end
end
args[pos] = ms .. '-*'
return redis.call('XADD', unpack(args))
"#;

/// Position of the ID in `XADD key [NOMKSTREAM] [MAXLEN|MINID [=|~] n [LIMIT c]] id ...`.
pub fn xadd_id_pos(argv: &[Vec<u8>]) -> Option<usize> {
    let mut i = 2;
    loop {
        let a = argv.get(i)?;
        if eq(a, "nomkstream") {
            i += 1;
        } else if eq(a, "maxlen") || eq(a, "minid") {
            i += 1;
            if argv
                .get(i)
                .is_some_and(|x| x.as_slice() == b"=" || x.as_slice() == b"~")
            {
                i += 1;
            }
            i += 1;
            if argv.get(i).is_some_and(|x| eq(x, "limit")) {
                i += 2;
            }
        } else {
            return Some(i);
        }
    }
}

/// XREADGROUP with NOACK reading only new entries (`>`): it records no delivery.
pub fn xreadgroup_touches_no_pel(argv: &[Vec<u8>]) -> bool {
    let Some(pos) = argv.iter().position(|a| eq(a, "streams")) else {
        return false;
    };
    let rest = &argv[pos + 1..];
    let noack = argv[..pos].iter().any(|a| eq(a, "noack"));
    noack
        && !rest.is_empty()
        && rest.len().is_multiple_of(2)
        && rest[rest.len() / 2..]
            .iter()
            .all(|id| id.as_slice() == b">")
}

/// Case-insensitive match of a command-line word.
pub fn eq(a: &[u8], b: &str) -> bool {
    a.eq_ignore_ascii_case(b.as_bytes())
}

fn int(a: &[u8]) -> Option<i64> {
    std::str::from_utf8(a).ok()?.parse().ok()
}

fn num(v: i64) -> Vec<u8> {
    v.to_string().into_bytes()
}

/// `now_ms + amount * unit_ms`, or None on overflow (the command is then left as it is, and
/// Redis refuses it the same way on every node).
fn deadline(now_ms: i64, amount: i64, unit_ms: i64) -> Option<i64> {
    amount.checked_mul(unit_ms)?.checked_add(now_ms)
}

/// Returns the command to log instead of `argv`, or None to log it unchanged.
pub fn rewrite(argv: &[Vec<u8>], now_ms: i64, seed: u32) -> Option<Vec<Vec<u8>>> {
    let name = argv.first()?;
    if eq(name, "expire") || eq(name, "pexpire") {
        // EXPIRE key seconds [NX|XX|GT|LT] -> PEXPIREAT key ms [NX|XX|GT|LT]
        let unit = if eq(name, "expire") { 1000 } else { 1 };
        let at = deadline(now_ms, int(argv.get(2)?)?, unit)?;
        let mut v = vec![b"PEXPIREAT".to_vec(), argv.get(1)?.clone(), num(at)];
        v.extend(argv[3..].iter().cloned());
        return Some(v);
    }
    if eq(name, "expireat") {
        let at = int(argv.get(2)?)?.checked_mul(1000)?;
        let mut v = vec![b"PEXPIREAT".to_vec(), argv.get(1)?.clone(), num(at)];
        v.extend(argv[3..].iter().cloned());
        return Some(v);
    }
    if eq(name, "setex") || eq(name, "psetex") {
        // SETEX key seconds value -> SET key value PXAT ms. Redis refuses a non-positive
        // time; keep that (and its message) by leaving such commands alone.
        let amount = int(argv.get(2)?)?;
        if amount <= 0 || argv.len() != 4 {
            return None;
        }
        let unit = if eq(name, "setex") { 1000 } else { 1 };
        let at = deadline(now_ms, amount, unit)?;
        return Some(vec![
            b"SET".to_vec(),
            argv[1].clone(),
            argv[3].clone(),
            b"PXAT".to_vec(),
            num(at),
        ]);
    }
    if eq(name, "set") || eq(name, "getex") {
        // Options: EX s | PX ms | EXAT s -> PXAT ms; everything else kept in place.
        let first_opt = if eq(name, "set") { 3 } else { 2 };
        // Copied at the first option that changes (most SETs have none: no copy).
        let mut v: Option<Vec<Vec<u8>>> = None;
        let mut i = first_opt;
        while i < argv.len() {
            let o = &argv[i];
            let unit = if eq(o, "ex") {
                Some((1000, true))
            } else if eq(o, "px") {
                Some((1, true))
            } else if eq(o, "exat") {
                Some((1000, false))
            } else {
                None
            };
            if let Some((unit, relative)) = unit {
                let amount = int(argv.get(i + 1)?)?;
                if amount <= 0 {
                    return None;
                }
                let at = if relative {
                    deadline(now_ms, amount, unit)?
                } else {
                    amount.checked_mul(unit)?
                };
                let v = v.get_or_insert_with(|| argv.to_vec());
                v[i] = b"PXAT".to_vec();
                v[i + 1] = num(at);
                i += 2;
            } else {
                i += 1;
            }
        }
        return v;
    }
    if eq(name, "restore") {
        // RESTORE key ttl payload [REPLACE] [ABSTTL] ...: ttl 0 means none.
        let ttl = int(argv.get(2)?)?;
        if ttl <= 0 || argv[4..].iter().any(|a| eq(a, "absttl")) {
            return None;
        }
        let mut v = argv.to_vec();
        v[2] = num(deadline(now_ms, ttl, 1)?);
        v.push(b"ABSTTL".to_vec());
        return Some(v);
    }
    if eq(name, "xadd") {
        let pos = xadd_id_pos(argv)?;
        if argv.get(pos)?.as_slice() != b"*" || argv.len() < pos + 3 {
            return None;
        }
        let mut v = vec![
            b"EVAL".to_vec(),
            XADD_SCRIPT.as_bytes().to_vec(),
            b"1".to_vec(),
            argv[1].clone(),
            num(now_ms),
            num(pos as i64),
        ];
        v.extend(argv[1..].iter().cloned());
        return Some(v);
    }
    if eq(name, "xreadgroup") || eq(name, "xclaim") || eq(name, "xautoclaim") {
        // XREADGROUP ... NOACK of new entries only creates no pending entry: no clock.
        if eq(name, "xreadgroup") && xreadgroup_touches_no_pel(argv) {
            return None;
        }
        let mut v = vec![super::streams::COMMAND.as_bytes().to_vec(), num(now_ms)];
        v.extend(argv.iter().cloned());
        return Some(v);
    }
    if eq(name, "spop") && (argv.len() == 2 || argv.len() == 3) {
        if let Some(c) = argv.get(2) {
            // Let Redis refuse a bad count itself, identically everywhere.
            if int(c).is_none_or(|c| c < 0) {
                return None;
            }
        }
        let mut v = vec![
            b"EVAL".to_vec(),
            SPOP_SCRIPT.as_bytes().to_vec(),
            b"1".to_vec(),
            argv[1].clone(),
            num(i64::from(seed)),
        ];
        v.extend(argv.get(2).cloned());
        return Some(v);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &[&str]) -> Vec<Vec<u8>> {
        s.iter().map(|x| x.as_bytes().to_vec()).collect()
    }

    fn r(s: &[&str]) -> Option<Vec<String>> {
        rewrite(&a(s), 1_000_000, 7).map(|v| {
            v.into_iter()
                .map(|x| String::from_utf8(x).unwrap())
                .collect()
        })
    }

    fn v(s: &[&str]) -> Option<Vec<String>> {
        Some(s.iter().map(|x| x.to_string()).collect())
    }

    #[test]
    fn relative_expiry_becomes_absolute() {
        assert_eq!(r(&["EXPIRE", "k", "10"]), v(&["PEXPIREAT", "k", "1010000"]));
        assert_eq!(
            r(&["expire", "k", "10", "NX"]),
            v(&["PEXPIREAT", "k", "1010000", "NX"])
        );
        assert_eq!(r(&["PEXPIRE", "k", "5"]), v(&["PEXPIREAT", "k", "1000005"]));
        assert_eq!(
            r(&["EXPIREAT", "k", "2000"]),
            v(&["PEXPIREAT", "k", "2000000"])
        );
        assert_eq!(
            r(&["SETEX", "k", "3", "v"]),
            v(&["SET", "k", "v", "PXAT", "1003000"])
        );
        assert_eq!(
            r(&["PSETEX", "k", "3", "v"]),
            v(&["SET", "k", "v", "PXAT", "1000003"])
        );
        assert_eq!(
            r(&["SET", "k", "v", "NX", "EX", "2", "GET"]),
            v(&["SET", "k", "v", "NX", "PXAT", "1002000", "GET"])
        );
        assert_eq!(
            r(&["SET", "k", "v", "px", "2"]),
            v(&["SET", "k", "v", "PXAT", "1000002"])
        );
        assert_eq!(
            r(&["SET", "k", "v", "EXAT", "2"]),
            v(&["SET", "k", "v", "PXAT", "2000"])
        );
        assert_eq!(
            r(&["GETEX", "k", "EX", "1"]),
            v(&["GETEX", "k", "PXAT", "1001000"])
        );
        assert_eq!(
            r(&["RESTORE", "k", "50", "payload"]),
            v(&["RESTORE", "k", "1000050", "payload", "ABSTTL"])
        );
    }

    #[test]
    fn commands_without_relative_time_or_with_bad_values_are_left_alone() {
        assert_eq!(r(&["SET", "k", "v"]), None);
        assert_eq!(r(&["SET", "k", "EX"]), None);
        assert_eq!(r(&["SET", "k", "v", "EX", "x"]), None);
        assert_eq!(r(&["SET", "k", "v", "EX", "0"]), None);
        assert_eq!(r(&["SETEX", "k", "-1", "v"]), None);
        assert_eq!(r(&["EXPIRE", "k", "nope"]), None);
        assert_eq!(r(&["EXPIRE", "k", "9223372036854775807"]), None);
        assert_eq!(r(&["RESTORE", "k", "0", "p"]), None);
        assert_eq!(r(&["RESTORE", "k", "5", "p", "ABSTTL"]), None);
        assert_eq!(r(&["GET", "k"]), None);
        assert_eq!(r(&["SPOP", "k", "-1"]), None);
    }

    #[test]
    fn xadd_with_a_generated_id_becomes_a_script() {
        let out = r(&[
            "XADD", "s", "MAXLEN", "~", "10", "LIMIT", "5", "*", "f", "v",
        ])
        .unwrap();
        assert_eq!(out[0], "EVAL");
        assert_eq!(
            &out[2..],
            &["1", "s", "1000000", "7", "s", "MAXLEN", "~", "10", "LIMIT", "5", "*", "f", "v"]
        );
        assert_eq!(r(&["XADD", "s", "5-1", "f", "v"]), None);
        assert_eq!(
            r(&["XADD", "s", "NOMKSTREAM", "*"]),
            None,
            "no fields: Redis refuses it"
        );
        assert_eq!(
            xadd_id_pos(&a(&["XADD", "s", "NOMKSTREAM", "MINID", "5", "*"])),
            Some(5)
        );
    }

    #[test]
    fn consumer_group_commands_carry_the_leaders_clock() {
        assert_eq!(
            r(&["XCLAIM", "s", "g", "c", "10", "1-1"]),
            v(&[
                "RAFT._STREAM",
                "1000000",
                "XCLAIM",
                "s",
                "g",
                "c",
                "10",
                "1-1"
            ])
        );
        assert_eq!(
            r(&["xautoclaim", "s", "g", "c", "10", "0"]),
            v(&[
                "RAFT._STREAM",
                "1000000",
                "xautoclaim",
                "s",
                "g",
                "c",
                "10",
                "0"
            ])
        );
        assert_eq!(
            r(&["XREADGROUP", "GROUP", "g", "c", "STREAMS", "s", ">"]),
            v(&[
                "RAFT._STREAM",
                "1000000",
                "XREADGROUP",
                "GROUP",
                "g",
                "c",
                "STREAMS",
                "s",
                ">"
            ])
        );
        assert_eq!(
            r(&[
                "XREADGROUP",
                "GROUP",
                "g",
                "c",
                "NOACK",
                "STREAMS",
                "s",
                ">"
            ]),
            None
        );
        assert!(
            r(&[
                "XREADGROUP",
                "GROUP",
                "g",
                "c",
                "NOACK",
                "STREAMS",
                "s",
                "0"
            ])
            .is_some(),
            "history reads stamp delivery times even with NOACK"
        );
    }

    #[test]
    fn spop_becomes_a_seeded_script() {
        let out = r(&["SPOP", "s", "3"]).unwrap();
        assert_eq!(out[0], "EVAL");
        assert_eq!(&out[2..], &["1", "s", "7", "3"]);
        let out = r(&["spop", "s"]).unwrap();
        assert_eq!(&out[2..], &["1", "s", "7"]);
    }
}
