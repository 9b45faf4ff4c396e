//! On a leader, the main thread watches its followers' connections in Redis's own event loop
//! and handles their answers itself, then applies what they committed at once, without
//! waking the raft thread on the way; on a follower without fsync, likewise its leader's
//! appends (node/main_read.rs says what it may handle).
//!
//! Each connection is watched through a duplicate of its socket that this thread owns
//! (`F_DUPFD_CLOEXEC`): the raft thread may close its own at any time, and Redis's event
//! loop must never hold a number that a client's socket could take next. Which connections
//! to watch is checked before Redis sleeps (`watch_peers`), only when the raft thread says
//! they changed (`Node::peers_generation`). Without `RedisModule_EventLoopAdd` (or where
//! Redis refuses a socket) nothing is watched here and the raft thread reads them all.

use std::ffi::{c_int, c_void};
use std::sync::atomic::Ordering;

use super::api::{self, raw, MainThread};
use super::{module, wake_now, WAKE_QUEUED};
use crate::node::{MainRead, Node};

#[derive(Default)]
struct Watching {
    /// The generation `conns` is of (None: ask again).
    seen: Option<u64>,
    /// Connection id, our duplicate of its socket.
    conns: Vec<(u64, c_int)>,
    /// Out of Redis's event loop for now (`Node::pause_main_reads`).
    paused: bool,
}

static WATCHING: MainThread<Watching> = MainThread::new_lazy();

fn available() -> bool {
    // Copied out (they are function pointers): set once when the module loads.
    let (add, del) = unsafe { (raw::RedisModule_EventLoopAdd, raw::RedisModule_EventLoopDel) };
    add.is_some() && del.is_some()
}

/// Watches the connections the node says to, and no others.
fn watch_peers(node: &Node) {
    let st = WATCHING.get_mut();
    if st.paused {
        if !node.resume_main_reads() {
            return;
        }
        st.paused = false;
        // Asked again below: what changed meanwhile, and those Redis no longer takes.
        st.seen = None;
        st.conns.retain(|&(id, fd)| {
            if add(fd, id) {
                return true;
            }
            unsafe { libc::close(fd) };
            false
        });
    }
    if st.seen == Some(node.peers_generation()) || !available() {
        return;
    }
    let seen = node.watch_peers(|conns| {
        let mut said = Vec::new();
        st.conns.retain(|&(id, fd)| {
            let keep = conns.iter().any(|c| c.id == id);
            if !keep {
                unwatch(fd);
                said.push((id, false));
            }
            keep
        });
        for c in conns {
            if st.conns.iter().any(|&(id, _)| id == c.id) {
                said.push((c.id, true));
                continue;
            }
            match watch(c.fd, c.id) {
                Some(fd) => {
                    st.conns.push((c.id, fd));
                    said.push((c.id, true));
                }
                None => said.push((c.id, false)),
            }
        }
        said
    });
    if seen.is_some() {
        st.seen = seen;
    }
}

/// Watches a duplicate of `fd` for connection `id`; None if it cannot.
fn watch(fd: c_int, id: u64) -> Option<c_int> {
    // SAFETY: fcntl on a descriptor the raft thread keeps open while it holds the lock we
    // are under; the duplicate is ours.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        tracing::debug!(
            "raft bus: cannot duplicate a peer's socket to watch it: {}",
            std::io::Error::last_os_error()
        );
        return None;
    }
    if !add(dup, id) {
        unsafe { libc::close(dup) };
        return None;
    }
    Some(dup)
}

/// Puts our socket `fd` of connection `id` in Redis's event loop.
fn add(fd: c_int, id: u64) -> bool {
    let added = unsafe {
        api::rm!(RedisModule_EventLoopAdd)(
            fd,
            raw::REDISMODULE_EVENTLOOP_READABLE as c_int,
            Some(on_readable),
            id as usize as *mut c_void,
        )
    };
    if added != api::OK {
        tracing::debug!(
            "raft bus: Redis's event loop cannot watch a peer's socket (fd {fd}); the raft thread reads it"
        );
    }
    added == api::OK
}

/// Takes our socket `fd` out of Redis's event loop.
fn remove(fd: c_int) {
    unsafe { api::rm!(RedisModule_EventLoopDel)(fd, raw::REDISMODULE_EVENTLOOP_READABLE as c_int) };
}

fn unwatch(fd: c_int) {
    remove(fd);
    unsafe { libc::close(fd) };
}

/// The raft thread holds the lock: out of the event loop until it has read them.
fn pause(node: &Node) {
    let st = WATCHING.get_mut();
    if st.paused {
        return;
    }
    node.pause_main_reads();
    st.paused = true;
    for &(_, fd) in &st.conns {
        remove(fd);
    }
}

/// Before Redis sleeps: watches what the node says to (`watch_peers`), then reads what the
/// watched connections hold (nothing, in most turns) and applies what that commits.
pub(super) fn before_sleep(node: &Node) {
    watch_peers(node);
    let st = WATCHING.get_mut();
    if !st.conns.is_empty() && !st.paused {
        read(node, None);
    }
}

extern "C" fn on_readable(fd: c_int, id: *mut c_void, _mask: c_int) {
    api::guard(
        "raft bus",
        || (),
        || match module().and_then(|m| m.node()) {
            Some(node) => read(node, Some((id as usize as u64, fd))),
            None => stop_watching(fd),
        },
    )
}

/// Reads the watched connections (`conn`: the one found readable, id and our socket), and
/// applies what that commits.
fn read(node: &Node, conn: Option<(u64, c_int)>) {
    // What this commits is applied below, not through a queued callback: the waker sees a
    // wake-up queued already. `wake_now` clears it, whatever happened in between.
    WAKE_QUEUED.store(true, Ordering::Release);
    let r = api::guard(
        "raft bus",
        || MainRead::Done,
        || node.read_on_main(conn.map(|(id, _)| id)),
    );
    match r {
        MainRead::Done => {}
        MainRead::Busy => pause(node),
        MainRead::NotMine => match conn {
            Some((_, fd)) => stop_watching(fd),
            None => WATCHING.get_mut().seen = None,
        },
    }
    wake_now();
}

/// No longer watches `fd` (until the node says to again).
fn stop_watching(fd: c_int) {
    let st = WATCHING.get_mut();
    st.conns.retain(|&(_, f)| f != fd);
    st.seen = None;
    unwatch(fd);
}
