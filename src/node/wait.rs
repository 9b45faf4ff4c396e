//! Where the raft thread sleeps: in poll(2) on its bell (rung after anything is put on its
//! channels: the main thread's input, the transport's inbound batches and reports, the
//! syncer's doorbell) and on the peer connections it watches (`transport::PollSleep`: all of
//! them, but those a leader's main thread watches, node/main_read.rs), until the next timer.
//! A peer's message then wakes one thread, not a reader thread first.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{SendError, Sender, TrySendError};

use super::{Input, Sleeper};
use crate::transport::Bell;

/// The main thread's sender to the raft thread: every send rings the bell.
pub(super) struct InputTx {
    tx: Sender<Input>,
    bell: Arc<Bell>,
    /// Shared with the raft thread's `Sleeper` (see `kick`).
    kicked: Arc<AtomicBool>,
}

impl InputTx {
    pub(super) fn new(tx: Sender<Input>, bell: Arc<Bell>, kicked: Arc<AtomicBool>) -> InputTx {
        InputTx { tx, bell, kicked }
    }

    pub(super) fn try_send(&self, i: Input) -> Result<(), TrySendError<Input>> {
        self.tx.try_send(i)?;
        self.bell.ring();
        Ok(())
    }

    /// Wakes the raft thread for a turn with nothing sent (after the main thread's own).
    /// The flag, not only the bell: the bell rings only a thread already asleep, and the
    /// raft thread checks the flag before it sleeps.
    pub(super) fn kick(&self) {
        self.kicked.store(true, Ordering::Relaxed);
        self.bell.ring();
    }

    pub(super) fn send(&self, i: Input) -> Result<(), SendError<Input>> {
        self.tx.send(i)?;
        self.bell.ring();
        Ok(())
    }
}

impl Drop for InputTx {
    fn drop(&mut self) {
        // The channel is now disconnected: the raft thread should see it at once.
        self.bell.ring();
    }
}

impl Sleeper {
    /// Sleeps until something arrives or `timeout` passes; notes in `ready` the watched peer
    /// connections found readable or closed (the turn that follows reads them). Returns at
    /// once when anything is already waiting, a kick included (cleared on the way out: the
    /// turn that follows answers it).
    pub(super) fn wait(&mut self, timeout: Duration) {
        let (input, inbound, synced, kicked) =
            (&self.input, &self.inbound, &self.synced, &self.kicked);
        let waiting = || {
            kicked.load(Ordering::Relaxed)
                || !input.is_empty()
                || !inbound.is_empty()
                || !synced.is_empty()
        };
        self.poll
            .wait(timeout, &self.watch, waiting, &mut self.ready);
        self.kicked.store(false, Ordering::Relaxed);
    }
}
