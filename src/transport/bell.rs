//! Waking the raft thread, which waits in poll(2) on the sockets it reads itself (see
//! `polled.rs`) and on this bell: an eventfd that a sender writes only while the thread is
//! asleep, so a busy thread costs its senders no system call.
//!
//! Protocol: a sender first puts its item where the thread looks (a channel), then rings.
//! The thread, before it sleeps, marks itself asleep, then looks at every channel once more,
//! and sleeps only if all are empty. Both flag operations are read-modify-writes on one
//! atomic, so either the thread's second look sees the item or the sender sees it asleep and
//! writes the eventfd: no wake-up is lost.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{SendTimeoutError, Sender, TrySendError};
use raft::eraftpb::Message;

pub struct Bell {
    fd: OwnedFd,
    asleep: AtomicBool,
}

impl Bell {
    pub fn new() -> io::Result<Arc<Bell>> {
        // SAFETY: eventfd has no memory arguments; the fd it returns is ours alone.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Arc::new(Bell {
            // SAFETY: a fresh descriptor, owned by nothing else.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            asleep: AtomicBool::new(false),
        }))
    }

    /// Wakes the waiting thread if it sleeps. Call after making the item visible.
    pub fn ring(&self) {
        if self.asleep.swap(false, Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to our eventfd. It can fail only when
            // the counter is near overflow, and then the thread is being woken anyway.
            unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    /// The waiting thread: about to sleep. Then look at every source once more; sleep only
    /// if they are all empty, else call `awake`.
    pub fn going_to_sleep(&self) {
        self.asleep.swap(true, Ordering::SeqCst);
    }

    /// The waiting thread is awake (poll returned, or it did not sleep): clears the flag and
    /// empties the eventfd so the next poll does not return at once.
    pub fn awake(&self, rang: bool) {
        self.asleep.store(false, Ordering::SeqCst);
        if rang {
            let mut buf = 0u64;
            // SAFETY: reads 8 bytes into a live u64; nonblocking, so an empty counter is EAGAIN.
            unsafe { libc::read(self.fd.as_raw_fd(), (&mut buf as *mut u64).cast(), 8) };
        }
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The transport's side of the raft thread's inbound channel: peer messages and reports,
/// each send followed by a ring of the bell when there is one (the transport's own tests
/// read the channel without one).
#[derive(Clone)]
pub(crate) struct ToNode {
    tx: Sender<Vec<Message>>,
    bell: Option<Arc<Bell>>,
}

impl ToNode {
    pub(crate) fn new(tx: Sender<Vec<Message>>, bell: Option<Arc<Bell>>) -> ToNode {
        ToNode { tx, bell }
    }

    pub(crate) fn try_send(&self, batch: Vec<Message>) -> Result<(), TrySendError<Vec<Message>>> {
        self.tx.try_send(batch)?;
        self.ring();
        Ok(())
    }

    pub(crate) fn send_timeout(
        &self,
        batch: Vec<Message>,
        timeout: Duration,
    ) -> Result<(), SendTimeoutError<Vec<Message>>> {
        self.tx.send_timeout(batch, timeout)?;
        self.ring();
        Ok(())
    }

    pub(crate) fn ring(&self) {
        if let Some(b) = &self.bell {
            b.ring();
        }
    }

    pub(crate) fn bell(&self) -> Option<&Arc<Bell>> {
        self.bell.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(bell: &Bell, timeout_ms: i32) -> bool {
        let mut fds = [libc::pollfd {
            fd: bell.fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, timeout_ms) };
        n == 1 && fds[0].revents & libc::POLLIN != 0
    }

    #[test]
    fn a_ring_wakes_only_a_sleeping_thread_and_is_cleared_on_waking() {
        let bell = Bell::new().unwrap();
        bell.ring();
        assert!(!readable(&bell, 0), "an awake thread's bell is not written");
        bell.going_to_sleep();
        bell.ring();
        assert!(readable(&bell, 0), "a sleeping thread's bell is written");
        bell.ring();
        bell.awake(true);
        assert!(!readable(&bell, 0), "waking empties the eventfd");
    }

    #[test]
    fn a_ring_from_another_thread_ends_a_poll() {
        let bell = Bell::new().unwrap();
        bell.going_to_sleep();
        let b = Arc::clone(&bell);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            b.ring();
        });
        let started = std::time::Instant::now();
        assert!(readable(&bell, 5000));
        assert!(started.elapsed() < Duration::from_secs(4));
        t.join().unwrap();
    }
}
