//! The leader's log fsyncs, off the raft thread (raft-rs's asynchronous Ready).
//!
//! A leader's raft thread (or its main thread, for its own proposals: `Node::submit`)
//! writes each Ready's records to the file (`LogStore::write`, no waiting for the disk),
//! hands raft-rs the Ready unpersisted (`advance_append_async`) and asks this thread for an
//! fsync. While the disk works, the raft thread goes on: it counts the followers'
//! acknowledgements, commits what a majority of them already has, and takes
//! the next proposals, whose records the next fsync covers (group commit). When an fsync
//! returns, the raft thread tells raft-rs which Ready is durable (`on_persist_ready`), and
//! only then does the leader count itself in a quorum.
//!
//! Followers fsync on the raft thread: their acknowledgement must wait for their own fsync
//! anyway, and another thread would add two wake-ups to every batch.
//!
//! One fsync runs at a time. State, not messages: the raft thread raises `asked`, this
//! thread publishes `done` (the highest Ready number durable) and rings a doorbell, a
//! bounded channel of one slot that never blocks either side.
//!
//! Unless it can finish the job itself: after each fsync this thread tries the raft
//! thread's lock (`Syncer::after_sync`, set by the node, never waiting for it) and, while
//! nothing but this fsync's news needs the raft thread, tells raft-rs and runs the Ready as
//! the raft thread would (`RaftThread::synced_here`). When the leader's own fsync is the
//! last thing a write waits for, its commit then reaches the main thread in one wake-up,
//! not two (this thread's, then the raft thread's).

use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::storage::{LogStore, StorageError};
use crate::transport::Bell;

#[derive(Default)]
struct State {
    /// The highest Ready number whose records were written and wait for an fsync.
    asked: u64,
    /// The highest Ready number an fsync made durable.
    done: u64,
    /// An fsync failed: the log is suspect and nothing more is fsynced.
    failed: Option<StorageError>,
    stop: bool,
}

/// Run by the syncer after each fsync: true if it did all the raft thread had to do about
/// it (which then need not be woken).
pub(super) type AfterSync = Box<dyn Fn() -> bool + Send + Sync>;

struct Inner {
    state: Mutex<State>,
    wake: Condvar,
    after: OnceLock<AfterSync>,
}

pub(super) struct Syncer {
    inner: Arc<Inner>,
    /// Rung after each fsync; the raft thread selects on it.
    pub(super) bell: Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

/// What the raft thread learns from `Syncer::take`.
pub(super) enum Synced {
    /// Every Ready up to this number is durable.
    Upto(u64),
    Failed(StorageError),
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Syncer {
    pub(super) fn start(store: LogStore, wake: Arc<Bell>) -> std::io::Result<Syncer> {
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            after: OnceLock::new(),
        });
        let (ring, bell) = bounded(1);
        let worker = Arc::clone(&inner);
        let thread = std::thread::Builder::new()
            .name("raft-fsync".into())
            .spawn(move || run(&worker, &store, &ring, &wake))?;
        Ok(Syncer {
            inner,
            bell,
            thread: Some(thread),
        })
    }

    /// The records of Ready `number` (and of every earlier one) are written: fsync them.
    pub(super) fn ask(&self, number: u64) {
        let mut st = lock(&self.inner.state);
        if number > st.asked {
            st.asked = number;
            self.inner.wake.notify_one();
        }
    }

    /// What this thread tries after each fsync (module doc); set once.
    pub(super) fn after_sync(&self, f: AfterSync) {
        let _ = self.inner.after.set(f);
    }

    /// What finished since the last call, if anything.
    pub(super) fn take(&self, last_seen: u64) -> Option<Synced> {
        let mut st = lock(&self.inner.state);
        if let Some(e) = st.failed.take() {
            return Some(Synced::Failed(e));
        }
        (st.done > last_seen).then_some(Synced::Upto(st.done))
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        lock(&self.inner.state).stop = true;
        self.inner.wake.notify_one();
        if let Some(t) = self.thread.take() {
            // Not from the syncer's own thread (were its `after_sync` to hold the last
            // reference to the raft thread's state): it ends on its own, seeing `stop`.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

fn run(inner: &Inner, store: &LogStore, ring: &Sender<()>, wake: &Bell) {
    let mut st = lock(&inner.state);
    loop {
        while st.asked <= st.done && !st.stop {
            st = inner.wake.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if st.stop {
            return;
        }
        let number = st.asked;
        drop(st);
        // Covers every record written before this call, so every Ready up to `number`.
        let result = store.fdatasync();
        st = lock(&inner.state);
        match result {
            Ok(()) => st.done = number,
            Err(e) => st.failed = Some(e),
        }
        let failed = st.failed.is_some();
        // Without the state's lock: the Ready run here may ask for the next fsync.
        drop(st);
        let done_here = !failed && inner.after.get().is_some_and(|f| f());
        if !done_here {
            // A full slot means the raft thread has yet to look: it will see this too.
            let _ = ring.try_send(());
            wake.ring();
        }
        st = lock(&inner.state);
        if failed {
            // Nothing is fsynced again. Waits for the stop without dropping `ring`: a
            // disconnected doorbell would wake the raft thread's select over and over.
            while !st.stop {
                st = inner.wake.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            return;
        }
    }
}
