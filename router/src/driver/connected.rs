//! Which destinations a worker's lone datagrams leave on a connected socket: the choice, apart
//! from the sockets (module `udp` opens, connects and reads them).
//!
//! # Why
//!
//! A datagram sent on the worker's unconnected socket costs the kernel a route lookup for every
//! `sendto`, and its answer a route lookup at the receiving end; on a connected socket the route
//! is kept with the socket, and the answer is matched to the socket before routing (early
//! demux). For bulk traffic that is nothing against the work per byte, and GSO sends share one
//! lookup between up to 64 datagrams. For a lone datagram (a ping, a request, a keepalive) it
//! is a measured share of the round trip: `bench/results/small.md`, session 23.
//!
//! # How many
//!
//! A connected socket takes one descriptor and joins the port (`SO_REUSEPORT`): the kernel
//! fixes its local address on `connect` and moves it out of the workers' wildcard group, so the
//! workers' group keeps its cheap first-match lookup, and each connected socket is one more
//! entry in its own address's lookup chain. That is why they are few: [`SLOTS`] per worker,
//! given to the destinations lone datagrams go to, first come. One unused for [`IDLE`] is
//! pointed at the next new destination (another `connect` on the same socket; datagrams it
//! had queued are still read, each with its real sender). One in use is never taken away, so
//! a sender of many lone datagrams to many addresses (a scan of candidate endpoints, cookie
//! replies under load) can only have the idle ones. Opening or connecting one that fails (out
//! of descriptors, no route) holds every new one off for [`HOLD_OFF`]; lone datagrams go out
//! unconnected meanwhile, as they did before.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Connected sockets per worker; at most [`EXTRA`](super::poll::EXTRA), which its `epoll` can
/// report.
pub(super) const SLOTS: usize = 8;
/// How long a connected socket goes unused before it may be connected to another destination.
pub(super) const IDLE: Duration = Duration::from_secs(10);
/// After a connected socket could not be opened or connected, how long lone datagrams to new
/// destinations go out unconnected.
pub(super) const HOLD_OFF: Duration = Duration::from_secs(10);

const _: () = assert!(SLOTS <= super::poll::EXTRA);

/// The worker's own socket among the sources a receive takes turns between: the connected
/// sockets are sources `0..SLOTS`, by slot.
pub(super) const OWN: usize = SLOTS;

/// The source a receive asks: the first from `from` on, wrapping after [`OWN`], whose bit is set
/// in `ready`. Starting after the last source served, every ready source is served once before
/// any is served twice.
pub(super) fn next_source(from: usize, ready: u32) -> Option<usize> {
    (0..=OWN)
        .map(|k| (from + k) % (OWN + 1))
        .find(|&s| ready & (1 << s) != 0)
}

/// Where a lone datagram to a destination goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Choice {
    /// On slot `i`'s socket, connected to it.
    Use(usize),
    /// Slot `i` has no socket yet: open one and connect it ([`Table::opened`] or
    /// [`Table::failed`] after).
    Open(usize),
    /// Slot `i`'s socket is idle: connect it to this destination instead ([`Table::opened`] or
    /// [`Table::failed`] after).
    Reconnect(usize),
    /// On the worker's own socket.
    Unconnected,
}

/// One slot's socket: where it is connected and when it last sent.
#[derive(Debug, Clone, Copy)]
struct Slot {
    to: SocketAddr,
    last: Instant,
}

/// The connected sockets of one worker, by slot: `None` until a socket is opened for it.
#[derive(Debug, Default)]
pub(super) struct Table {
    slots: [Option<Slot>; SLOTS],
    held_off_until: Option<Instant>,
}

impl Table {
    /// Where a lone datagram to `to` goes at `now`. A slot connected to `to` counts as used.
    pub(super) fn choose(&mut self, to: SocketAddr, now: Instant) -> Choice {
        if let Some(i) = self
            .slots
            .iter()
            .position(|s| s.is_some_and(|s| s.to == to))
        {
            if let Some(slot) = &mut self.slots[i] {
                slot.last = now;
            }
            return Choice::Use(i);
        }
        if self.held_off_until.is_some_and(|t| now < t) {
            return Choice::Unconnected;
        }
        if let Some(i) = self.slots.iter().position(Option::is_none) {
            return Choice::Open(i);
        }
        let idle = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.map(|s| (i, s.last)))
            .filter(|&(_, last)| now.saturating_duration_since(last) >= IDLE)
            .min_by_key(|&(_, last)| last);
        match idle {
            Some((i, _)) => Choice::Reconnect(i),
            None => Choice::Unconnected,
        }
    }

    /// Slot `i`'s socket is now connected to `to`.
    pub(super) fn opened(&mut self, i: usize, to: SocketAddr, now: Instant) {
        if let Some(slot) = self.slots.get_mut(i) {
            *slot = Some(Slot { to, last: now });
        }
    }

    /// Opening or connecting a socket failed at `now`: new destinations wait [`HOLD_OFF`]. A
    /// slot whose reconnect failed keeps its old destination.
    pub(super) fn failed(&mut self, now: Instant) {
        self.held_off_until = Some(now + HOLD_OFF);
    }

    /// How many slots have a socket.
    pub(super) fn open(&self) -> usize {
        self.slots.iter().flatten().count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u16) -> SocketAddr {
        SocketAddr::from(([198, 18, 0, 2], 51_820 + i))
    }

    /// Fills every slot at `t0`, each destination `addr(i)` in slot `i`.
    fn full(t0: Instant) -> Table {
        let mut t = Table::default();
        for i in 0..SLOTS {
            assert_eq!(t.choose(addr(i as u16), t0), Choice::Open(i));
            t.opened(i, addr(i as u16), t0);
        }
        t
    }

    #[test]
    fn receives_take_turns_so_a_flooded_source_cannot_starve_the_others() {
        let own = 1 << OWN;
        // Slot 0 always has datagrams; so does the worker's own socket, and slot 5 now and then.
        let mut from = 0;
        let mut served = vec![];
        for round in 0..9 {
            let ready = 1 | own | if round % 3 == 0 { 1 << 5 } else { 0 };
            let s = next_source(from, ready).expect("something is ready");
            served.push(s);
            from = (s + 1) % (OWN + 1);
        }
        assert_eq!(served, [0, OWN, 0, 5, OWN, 0, 5, OWN, 0]);
        assert_eq!(next_source(3, 0), None, "nothing ready");
        assert_eq!(
            next_source(OWN, 1 << 2),
            Some(2),
            "wraps after the own socket"
        );
        assert_eq!(
            next_source(OWN + 1, own),
            Some(OWN),
            "a start past the end wraps"
        );
    }

    #[test]
    fn a_destination_gets_a_free_slot_and_keeps_it() {
        let t0 = super::super::clock();
        let mut t = Table::default();
        assert_eq!(t.choose(addr(0), t0), Choice::Open(0));
        t.opened(0, addr(0), t0);
        assert_eq!(t.choose(addr(0), t0), Choice::Use(0));
        assert_eq!(t.choose(addr(1), t0), Choice::Open(1), "the next free slot");
        assert_eq!(
            t.choose(addr(1), t0),
            Choice::Open(1),
            "not opened yet: asked again"
        );
        t.opened(1, addr(1), t0);
        assert_eq!(t.choose(addr(1), t0 + IDLE * 10), Choice::Use(1));
        assert_eq!(t.open(), 2);
    }

    #[test]
    fn slots_in_use_are_never_taken_and_the_longest_idle_one_is_reconnected() {
        let t0 = super::super::clock();
        let mut t = full(t0);
        let new = addr(100);
        assert_eq!(
            t.choose(new, t0 + IDLE / 2),
            Choice::Unconnected,
            "every slot in use"
        );
        // Slots 0 and 3 keep sending; at IDLE, the rest are idle, slot 1 the longest.
        let t1 = t0 + IDLE / 2;
        assert_eq!(t.choose(addr(0), t1), Choice::Use(0));
        assert_eq!(t.choose(addr(3), t1), Choice::Use(3));
        for i in 2..SLOTS {
            if i != 3 {
                assert_eq!(
                    t.choose(addr(i as u16), t0 + Duration::from_millis(1)),
                    Choice::Use(i)
                );
            }
        }
        let t2 = t0 + IDLE + Duration::from_millis(1);
        assert_eq!(t.choose(new, t2), Choice::Reconnect(1));
        t.opened(1, new, t2);
        assert_eq!(t.choose(new, t2), Choice::Use(1));
        assert_eq!(
            t.choose(addr(1), t2),
            Choice::Reconnect(2),
            "the next idle one"
        );
        assert_eq!(t.open(), SLOTS);
    }

    #[test]
    fn many_destinations_cannot_churn_the_slots_in_use() {
        let t0 = super::super::clock();
        let mut t = full(t0);
        // Every slot sends once a second; a flood of new destinations in between gets none.
        for s in 1..=30u32 {
            let now = t0 + Duration::from_secs(u64::from(s));
            for i in 0..SLOTS {
                assert_eq!(t.choose(addr(i as u16), now), Choice::Use(i));
            }
            for d in 0..1000u16 {
                assert_eq!(t.choose(addr(1000 + d), now), Choice::Unconnected);
            }
        }
    }

    #[test]
    fn a_failure_holds_new_destinations_off_but_not_those_connected() {
        let t0 = super::super::clock();
        let mut t = Table::default();
        assert_eq!(t.choose(addr(0), t0), Choice::Open(0));
        t.opened(0, addr(0), t0);
        assert_eq!(t.choose(addr(1), t0), Choice::Open(1));
        t.failed(t0);
        assert_eq!(t.choose(addr(1), t0), Choice::Unconnected);
        assert_eq!(t.choose(addr(0), t0 + HOLD_OFF / 2), Choice::Use(0));
        assert_eq!(t.choose(addr(2), t0 + HOLD_OFF / 2), Choice::Unconnected);
        assert_eq!(
            t.choose(addr(1), t0 + HOLD_OFF),
            Choice::Open(1),
            "held off no more"
        );
        // A failed reconnect keeps the slot's old destination.
        let mut t = full(t0);
        let late = t0 + IDLE;
        assert_eq!(t.choose(addr(100), late), Choice::Reconnect(0));
        t.failed(late);
        assert_eq!(t.choose(addr(0), late), Choice::Use(0));
    }
}
