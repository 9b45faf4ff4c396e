//! The leader's read lease (`raft.read-mode lease`): while it holds, the main thread runs a
//! read on the leader's own data at once, as a single Redis does, with no round.
//!
//! Why it is safe: the raft thread starts a ReadIndex round of raft-rs's Safe kind (a
//! heartbeat a quorum must answer) and notes the time `asked` before any of its heartbeats
//! leave. Every follower that answered reset its election timer after `asked`, and with
//! check-quorum raft-rs makes such a follower refuse (pre-)votes for a whole election timeout
//! of ticks after that. A quorum that elects another leader overlaps the quorum that answered,
//! so no other leader can exist before `asked + (election ticks - 2) ticks` (a late tick may
//! be followed at once by the next); the lease ends a tick earlier still (clock rates). A
//! node that restarts forgets whom it heard from: every node refuses (pre-)votes for an
//! election timeout after its raft thread starts (RaftThread::on_message), as if it had
//! just heard from a leader. Measured on this process's monotonic clock (which
//! keeps running while the process is paused), so a leader paused past its lease finds it
//! expired the moment it runs again.
//!
//! Given up before anything could let another leader in: on losing leadership or changing
//! term (cleared before the turn's messages leave, a vote included), and before a leadership
//! transfer (whose target campaigns without waiting for leases); after a transfer was asked
//! in a term, no lease is taken again in that term (a late MsgTimeoutNow may still arrive).
//!
//! The main thread also needs the leader's data to be current (`Shared::is_ready_leader`):
//! every write acknowledged before the read was applied on this node, by the leader that
//! acknowledged it (this one) or by an earlier leader (its entries precede this term's first).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Read rounds with this bit set are the lease's own; the main thread numbers its rounds
/// from 1 and never reaches it.
pub(super) const LEASE_ROUND: u64 = 1 << 63;

/// Ticks taken off the election timeout: a follower's first two ticks may come right after
/// its timer was reset (a late tick, then the next on schedule), and clocks on different
/// machines may run at slightly different rates.
const LEASE_MARGIN_TICKS: u32 = 3;

/// The instant lease deadlines are counted from (nanoseconds, so they fit an atomic).
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn nanos_since_epoch(t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

/// The deadline the main thread reads: 0 when there is no lease.
#[derive(Default)]
pub struct LeaseDeadline(AtomicU64);

impl LeaseDeadline {
    /// True while the lease holds (any thread).
    pub fn holds(&self) -> bool {
        let until = self.0.load(Ordering::Acquire);
        until != 0 && nanos_since_epoch(Instant::now()) < until
    }

    fn set(&self, until: Option<Instant>) {
        let v = until.map_or(0, |t| nanos_since_epoch(t).max(1));
        self.0.store(v, Ordering::Release);
    }
}

/// The raft thread's side of the lease.
pub(super) struct Lease {
    /// How long a confirmed round keeps the lease.
    length: Duration,
    /// The round in flight: its number and when it was asked.
    asking: Option<(u64, Instant)>,
    next_round: u64,
    /// The term the lease was confirmed in.
    term: u64,
    until: Option<Instant>,
    /// A term in which leadership was handed over (or asked to be): no lease in it again.
    handed_over: Option<u64>,
}

/// What the raft thread knows when it looks after the lease.
pub(super) struct LeaderState {
    /// Leads, and has committed an entry of its term.
    pub leader: bool,
    pub term: u64,
    /// Leaving the cluster, or handing leadership over.
    pub handing_over: bool,
}

impl Lease {
    /// `election_ticks` ticks of `tick` each: raft-rs's election timeout as followers count it.
    pub(super) fn new(election_ticks: u32, tick: Duration) -> Lease {
        Lease {
            length: tick * election_ticks.saturating_sub(LEASE_MARGIN_TICKS),
            asking: None,
            next_round: 0,
            term: 0,
            until: None,
            handed_over: None,
        }
    }

    /// Whether this node may hold a lease as `st` describes it: it leads, and is not handing
    /// over, nor has in this term.
    fn may_hold(&self, st: &LeaderState) -> bool {
        st.leader && !st.handing_over && self.handed_over != Some(st.term)
    }

    /// Leadership is being handed over in `term`: the lease ends now, and is not taken
    /// again in this term.
    /// Drops the lease and any round asked for it, to be taken again from a new round (after
    /// the raft thread stalled: a round asked before may be confirmed by acknowledgements
    /// from before too).
    pub(super) fn restart(&mut self, deadline: &LeaseDeadline) {
        self.until = None;
        self.asking = None;
        deadline.set(None);
    }

    pub(super) fn give_up(&mut self, term: u64, deadline: &LeaseDeadline) {
        self.handed_over = Some(term);
        self.until = None;
        self.asking = None;
        deadline.set(None);
    }

    /// Called every turn before the turn's messages leave. Gives the lease up when this node
    /// may no longer hold it; returns the number of a round to ask when it should be renewed
    /// (the caller starts it at once: `asked` is now).
    pub(super) fn look_after(
        &mut self,
        st: &LeaderState,
        deadline: &LeaseDeadline,
        now: Instant,
        round_timeout: Duration,
    ) -> Option<u64> {
        if st.handing_over {
            self.handed_over = Some(st.term);
        }
        let may_hold = self.may_hold(st);
        if !may_hold || st.term != self.term {
            if self.until.take().is_some() {
                deadline.set(None);
            }
            self.asking = None;
            self.term = st.term;
            if !may_hold {
                return None;
            }
        }
        if self.length.is_zero() {
            return None;
        }
        if let Some((_, asked)) = self.asking {
            if now.saturating_duration_since(asked) < round_timeout {
                return None;
            }
        }
        // Renew once half the lease is used, so a busy leader never runs out of it.
        let renew = self
            .until
            .is_none_or(|until| until.saturating_duration_since(now) < self.length / 2);
        if !renew {
            return None;
        }
        self.next_round += 1;
        let round = LEASE_ROUND | self.next_round;
        self.asking = Some((round, now));
        Some(round)
    }

    /// A round confirmed (raft-rs's read state for it arrived): the lease runs from when it
    /// was asked, if this node still leads in the same term.
    pub(super) fn confirmed(&mut self, round: u64, st: &LeaderState, deadline: &LeaseDeadline) {
        let Some((asking, asked)) = self.asking else {
            return;
        };
        if asking != round {
            return;
        }
        self.asking = None;
        if !self.may_hold(st) || st.term != self.term {
            return;
        }
        let until = asked + self.length;
        self.until = Some(until);
        deadline.set(Some(until));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ET: Duration = Duration::from_millis(1000);
    const TICK: Duration = Duration::from_millis(100);

    fn leader(term: u64) -> LeaderState {
        LeaderState {
            leader: true,
            term,
            handing_over: false,
        }
    }

    #[test]
    fn a_confirmed_round_holds_the_lease_from_when_it_was_asked() {
        let d = LeaseDeadline::default();
        let mut l = Lease::new(10, TICK);
        assert!(!d.holds());
        let t0 = Instant::now();
        let r = l.look_after(&leader(3), &d, t0, ET).unwrap();
        assert!(r & LEASE_ROUND != 0);
        // In flight: no second round.
        assert_eq!(l.look_after(&leader(3), &d, t0, ET), None);
        assert!(!d.holds());
        l.confirmed(r, &leader(3), &d);
        assert!(d.holds());
        assert_eq!(l.until, Some(t0 + TICK * 7));
        // Not renewed before half of it is used, renewed after.
        assert_eq!(l.look_after(&leader(3), &d, t0 + ET / 4, ET), None);
        assert!(l.look_after(&leader(3), &d, t0 + ET / 2, ET).is_some());
    }

    #[test]
    fn the_lease_is_given_up_on_a_new_term_a_lost_leadership_or_a_handover() {
        for st in [
            LeaderState {
                leader: false,
                term: 3,
                handing_over: false,
            },
            leader(4),
            LeaderState {
                leader: true,
                term: 3,
                handing_over: true,
            },
        ] {
            let d = LeaseDeadline::default();
            let mut l = Lease::new(10, TICK);
            let t0 = Instant::now();
            let r = l.look_after(&leader(3), &d, t0, ET).unwrap();
            l.confirmed(r, &leader(3), &d);
            assert!(d.holds());
            let again = l.look_after(&st, &d, t0, ET);
            assert!(!d.holds());
            // A new term as leader asks again at once; otherwise nothing is asked.
            assert_eq!(again.is_some(), st.leader && !st.handing_over);
        }
    }

    #[test]
    fn a_round_confirmed_after_the_term_changed_grants_nothing() {
        let d = LeaseDeadline::default();
        let mut l = Lease::new(10, TICK);
        let t0 = Instant::now();
        let r = l.look_after(&leader(3), &d, t0, ET).unwrap();
        l.confirmed(r, &leader(4), &d);
        assert!(!d.holds());
        // A stale round number grants nothing either.
        let r2 = l.look_after(&leader(3), &d, t0, ET).unwrap();
        l.confirmed(r2 - 1, &leader(3), &d);
        assert!(!d.holds());
    }

    #[test]
    fn no_lease_again_in_a_term_whose_leadership_was_handed_over() {
        let d = LeaseDeadline::default();
        let mut l = Lease::new(10, TICK);
        let t0 = Instant::now();
        let r = l.look_after(&leader(3), &d, t0, ET).unwrap();
        l.confirmed(r, &leader(3), &d);
        l.give_up(3, &d);
        assert!(!d.holds());
        // The transfer failed: still leader in term 3, still no lease, no round asked.
        assert_eq!(l.look_after(&leader(3), &d, t0 + ET, ET), None);
        assert!(!d.holds());
        // A new term as leader: a lease again.
        let r = l.look_after(&leader(4), &d, t0 + ET, ET).unwrap();
        l.confirmed(r, &leader(4), &d);
        assert!(d.holds());
    }

    #[test]
    fn an_expired_deadline_does_not_hold() {
        let d = LeaseDeadline::default();
        d.set(Some(Instant::now()));
        std::thread::sleep(Duration::from_millis(2));
        assert!(!d.holds());
    }

    #[test]
    fn a_round_never_confirmed_is_asked_again_after_the_timeout() {
        let d = LeaseDeadline::default();
        let mut l = Lease::new(10, TICK);
        let t0 = Instant::now();
        let r = l.look_after(&leader(3), &d, t0, ET).unwrap();
        assert_eq!(l.look_after(&leader(3), &d, t0 + ET / 2, ET), None);
        let r2 = l.look_after(&leader(3), &d, t0 + ET, ET).unwrap();
        assert_ne!(r, r2);
    }
}
