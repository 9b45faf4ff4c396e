//! Two things the raft thread does when time or a peer behaves unlike a healthy cluster:
//!
//! **Fast failover.** A follower that sees its leader's process gone starts an election at
//! once instead of waiting out the election timeout. The signal: the leader's connection to
//! this node closed (`Report::InboundClosed`), our connection to it turns out closed too, and
//! its bus refuses a new one (`Report::Refused`): nothing listens on its port any more. A
//! leader that is alive but paused, partitioned or slow refuses nothing, so it still costs the
//! full election timeout, and pre-vote keeps a healthy leader in place.
//!
//! The surviving followers see the signal at about the same moment; if all campaigned at once
//! they could split the vote and wait out a randomized timeout. So each first forgets the
//! leader (raft-rs ignores (pre-)votes for an election timeout after hearing from a leader;
//! without a leader it grants them), then they take turns by node id: the lowest campaigns at
//! once, the next `TURN` later if there is still no leader, and so on.
//!
//! A campaigner asks again while nobody leads, `RETRY` later, then twice as long each time:
//! a voter that has not yet seen the leader go ignores its pre-vote request (raft-rs answers
//! nothing inside a leader's lease), and without asking again the election would wait for
//! the next voter's turn, a `TURN` later. It stops asking after an election timeout, when
//! raft-rs's own timer campaigns anyway.
//!
//! Not in lease mode: a lease counts on every follower that acknowledged the leader waiting
//! an election timeout before voting, and a refused connection does not prove the leader's
//! process is gone (a firewall that rejects rather than drops looks the same).
//!
//! **Stalls.** A raft thread that did not run for longer than an election timeout (the process
//! was paused, a long fork, a stalled VM) may hold messages and timers from before; other
//! nodes may have elected a new leader meanwhile. Before confirming anything, it gives up its
//! read lease and asks every read round again under a new context, so only acknowledgements
//! of heartbeats sent after the stall can confirm a read (see `RaftThread::after_stall`).

use std::time::{Duration, Instant};

/// How long each surviving voter waits after the one before it (by node id) to campaign.
pub(super) const TURN: Duration = Duration::from_millis(100);

/// How long a voter whose early campaign found no leader yet waits to ask again (then
/// twice as long each time).
pub(super) const RETRY: Duration = Duration::from_millis(10);

/// An election this follower starts early because its leader's process is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct EarlyElection {
    /// When to campaign, if there is still no leader.
    pub(super) at: Instant,
    /// The term in which the leader was lost; a newer term means an election already ran.
    pub(super) term: u64,
    /// Asking again stops here: an election timeout after the first campaign is due.
    pub(super) retry_until: Instant,
    /// Campaigns so far; each waits twice as long as the one before.
    pub(super) retries: u32,
}

/// This node's turn among the voters that survive `gone`, by node id (0 campaigns first);
/// None if this node is not one of them.
pub(super) fn turn(voters: impl IntoIterator<Item = u64>, me: u64, gone: u64) -> Option<u32> {
    let mut ids: Vec<u64> = voters.into_iter().filter(|&id| id != gone).collect();
    ids.sort_unstable();
    ids.iter()
        .position(|&id| id == me)
        .and_then(|p| u32::try_from(p).ok())
}

/// Measures how long the raft thread went without running: how far past its planned wake-up
/// it woke, and how long a turn took between two waits.
#[derive(Debug)]
pub(super) struct StallClock {
    /// When the last wait ended.
    woke: Instant,
}

impl StallClock {
    pub(super) fn new(now: Instant) -> Self {
        StallClock { woke: now }
    }

    /// Called as a wait ends: `asleep` when it began, `timeout` how long it was planned to
    /// last at most. Returns the longest time the thread did not run as planned.
    pub(super) fn woke(&mut self, asleep: Instant, timeout: Duration, now: Instant) -> Duration {
        let late = now.saturating_duration_since(asleep + timeout);
        let turn = asleep.saturating_duration_since(self.woke);
        self.woke = now;
        late.max(turn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_go_by_node_id_among_the_survivors() {
        assert_eq!(turn([7, 3, 5], 3, 5), Some(0));
        assert_eq!(turn([7, 3, 5], 7, 5), Some(1));
        assert_eq!(turn([7, 3, 5], 5, 5), None);
        assert_eq!(turn([3, 5], 9, 5), None);
    }

    #[test]
    fn a_late_wake_up_or_a_long_turn_is_a_stall() {
        let t0 = Instant::now();
        let mut c = StallClock::new(t0);
        let ms = Duration::from_millis;
        // Slept 100 ms as planned after a 1 ms turn: no stall.
        assert_eq!(c.woke(t0 + ms(1), ms(100), t0 + ms(101)), ms(1));
        // Woken by a message early: no stall.
        assert_eq!(c.woke(t0 + ms(102), ms(100), t0 + ms(110)), ms(1));
        // Woke 2 s past the planned 100 ms (paused while asleep).
        assert_eq!(c.woke(t0 + ms(111), ms(100), t0 + ms(2211)), ms(2000));
        // A 3 s turn (paused while working), then a wait that ended at once.
        assert_eq!(c.woke(t0 + ms(5211), ms(100), t0 + ms(5211)), ms(3000));
    }
}
