//! How a worker over the real devices waits: its own `epoll` on its TUN queue, its UDP socket,
//! an `eventfd` the rest of the daemon rings ([`Bell`]) and a `timerfd` set to the router's next
//! deadline. No async runtime sits between a packet's wake-up and its turn.
//!
//! The set is level-triggered: a source the turn left unread (its share of the turn used up) is
//! reported again at once, so nothing waits for a new event to be served. The sources are
//! watched for reading only (see module `udp`).
//!
//! The deadline is a `timerfd` rather than `epoll_wait`'s timeout: a timeout is a kernel timer
//! set up and torn down on every wait, and a clock read to work it out, for a deadline (the
//! router's tick, a quarter of a second away) that moves a few times a second. The `timerfd` is
//! set again only when the deadline moves, and a wait sets nothing.

use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::PollTimeout;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

/// Wakes a worker from its wait: for a command, or to stop. Rings are counted by the kernel
/// until the worker hears them, so none is lost between its last look and its wait.
#[derive(Debug)]
pub struct Bell {
    fd: EventFd,
}

impl Bell {
    /// A new bell, not rung.
    pub fn new() -> io::Result<Self> {
        let fd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        Ok(Self { fd })
    }

    /// Rings it. A counter at its limit is already rung, so an error changes nothing.
    pub fn ring(&self) {
        let _ = self.fd.write(1);
    }

    /// Hears every ring so far.
    fn hush(&self) {
        let _ = self.fd.read();
    }
}

/// A source a worker's `epoll` watches ([`Tun`](super::Tun), [`Udp`](super::Udp)): it is told
/// when `epoll` finds it readable, and its non-waiting reads do no system call until then.
pub trait Watched: AsFd {
    /// `epoll` reported it readable.
    fn set_ready(&self);
}

/// Whether a watched source may have something to read: set when `epoll` says so, cleared by
/// the read that finds it empty (or that takes fewer than it could, which emptied it), so that
/// asking an empty source costs no system call. `epoll` is level-triggered, so a source left
/// unread is reported, and set, again.
#[derive(Debug, Default)]
pub(super) struct Readiness(AtomicBool);

impl Readiness {
    /// `epoll` reported the source readable.
    pub(super) fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// A read found the source empty.
    pub(super) fn drained(&self) {
        self.0.store(false, Ordering::Relaxed);
    }

    /// `read`'s outcome if the source may be readable, else `WouldBlock` without calling it; a
    /// `WouldBlock` from `read` clears it.
    pub(super) fn read<R>(&self, read: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        if !self.0.load(Ordering::Relaxed) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let r = read();
        if r.as_ref()
            .is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock)
        {
            self.drained();
        }
        r
    }
}

/// What one wait found ready.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Ready {
    /// The TUN queue has a packet.
    pub tun: bool,
    /// The socket has datagrams.
    pub udp: bool,
    /// The bell rang.
    pub rung: bool,
    /// The deadline passed.
    pub due: bool,
}

const TUN: u64 = 0;
const UDP: u64 = 1;
const BELL: u64 = 2;
const TIMER: u64 = 3;

/// One worker's `epoll` set: its TUN queue, its socket, its bell and its deadline.
#[derive(Debug)]
pub(super) struct Poller {
    epoll: Epoll,
    events: [EpollEvent; 4],
    timer: TimerFd,
    /// The deadline the timer is set to; none when it is not set (or went off).
    set: Option<Instant>,
}

impl Poller {
    /// A set watching `tun` and `udp` for reading, `bell`, and a deadline not yet set.
    pub(super) fn new(tun: impl AsFd, udp: impl AsFd, bell: &Bell) -> io::Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        epoll.add(tun, EpollEvent::new(EpollFlags::EPOLLIN, TUN))?;
        epoll.add(udp, EpollEvent::new(EpollFlags::EPOLLIN, UDP))?;
        epoll.add(&bell.fd, EpollEvent::new(EpollFlags::EPOLLIN, BELL))?;
        epoll.add(&timer, EpollEvent::new(EpollFlags::EPOLLIN, TIMER))?;
        Ok(Self {
            epoll,
            events: [EpollEvent::empty(); 4],
            timer,
            set: None,
        })
    }

    /// Waits until a source is ready or `deadline` has passed (none: for as long as nothing is
    /// ready); a ring is heard here. A signal ending the wait early is nothing ready. The timer
    /// is set again only when `deadline` is not the one it holds; `now` (read only then) gives
    /// the time to it.
    pub(super) fn wait(
        &mut self,
        bell: &Bell,
        deadline: Option<Instant>,
        now: impl FnOnce() -> Instant,
    ) -> io::Result<Ready> {
        if deadline != self.set {
            self.arm(deadline, now())?;
        }
        let n = match self.epoll.wait(&mut self.events, PollTimeout::NONE) {
            Ok(n) => n,
            Err(Errno::EINTR) => 0,
            Err(e) => return Err(e.into()),
        };
        let mut ready = Ready::default();
        for event in self.events.iter().take(n) {
            match event.data() {
                TUN => ready.tun = true,
                UDP => ready.udp = true,
                TIMER => ready.due = true,
                _ => ready.rung = true,
            }
        }
        if ready.rung {
            bell.hush();
        }
        if ready.due {
            // Heard, so that it is not reported again; a one-shot timer that went off is unset.
            let _ = self.timer.wait();
            self.set = None;
        }
        Ok(ready)
    }

    /// Sets the timer to go off at `deadline` (at once if it has passed), or unsets it.
    fn arm(&mut self, deadline: Option<Instant>, now: Instant) -> io::Result<()> {
        match deadline {
            Some(at) => {
                // A zero time would unset the timer: a deadline passed goes off in 1 ns.
                let left = at
                    .saturating_duration_since(now)
                    .max(Duration::from_nanos(1));
                self.timer.set(
                    Expiration::OneShot(TimeSpec::from_duration(left)),
                    TimerSetTimeFlags::empty(),
                )?;
            }
            None => self.timer.unset()?,
        }
        self.set = deadline;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;
    use std::sync::Arc;

    /// A wait that should end at once is bounded by this, so that a regression fails rather
    /// than hangs.
    const LONG: Duration = Duration::from_secs(10);

    #[test]
    fn an_unready_source_is_not_read_and_only_a_read_finding_it_empty_clears_it() {
        let ready = Readiness::default();
        let called = std::cell::Cell::new(0);
        let read = |outcome: io::Result<u8>| {
            ready.read(|| {
                called.set(called.get() + 1);
                outcome
            })
        };
        let would_block =
            |r: io::Result<u8>| r.is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock);
        assert!(would_block(read(Ok(1))), "not set: WouldBlock");
        assert_eq!(called.get(), 0, "without a read");
        ready.set();
        assert_eq!(read(Ok(1)).ok(), Some(1));
        assert!(read(Err(io::ErrorKind::Interrupted.into())).is_err());
        assert_eq!(
            read(Ok(2)).ok(),
            Some(2),
            "a read or another error keeps it set"
        );
        assert!(would_block(read(Err(io::ErrorKind::WouldBlock.into()))));
        assert_eq!(called.get(), 4);
        assert!(would_block(read(Ok(3))), "cleared by the empty read");
        assert_eq!(called.get(), 4, "and not read again until set");
        ready.set();
        ready.drained();
        assert!(would_block(read(Ok(4))), "drained by hand");
        assert_eq!(called.get(), 4);
    }

    fn clock() -> Instant {
        super::super::clock()
    }

    /// A deadline `after` from now.
    fn in_(after: Duration) -> Option<Instant> {
        Some(clock() + after)
    }

    /// Local datagram pairs stand in for the TUN queue and the socket: no network.
    fn quiet_set() -> (UnixDatagram, UnixDatagram, Arc<Bell>, [UnixDatagram; 2]) {
        let (tun, tun_peer) = UnixDatagram::pair().expect("pair");
        let (udp, udp_peer) = UnixDatagram::pair().expect("pair");
        let bell = Arc::new(Bell::new().expect("eventfd"));
        (tun, udp, bell, [tun_peer, udp_peer])
    }

    /// Rings `bell` after [`LONG`] unless dropped first: a wait only the timer should end is
    /// ended by a ring instead if the timer never goes off, so that the test fails (it finds
    /// the bell, not the deadline) rather than hangs.
    fn watchdog(bell: &Arc<Bell>) -> std::sync::mpsc::Sender<()> {
        let (guard, dropped) = std::sync::mpsc::channel::<()>();
        let bell = Arc::clone(bell);
        std::thread::spawn(move || {
            if dropped.recv_timeout(LONG) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                bell.ring();
            }
        });
        guard
    }

    #[test]
    fn a_wait_reports_what_is_readable_and_the_bell_and_ends_at_its_deadline() {
        let (tun, udp, bell, [tun_peer, udp_peer]) = quiet_set();
        let mut poller = Poller::new(&tun, &udp, &bell).expect("epoll");
        let _watchdog = watchdog(&bell);

        let quiet = poller
            .wait(&bell, in_(Duration::from_millis(5)), clock)
            .expect("wait");
        assert_eq!(
            quiet,
            Ready {
                due: true,
                ..Ready::default()
            },
            "nothing ready: the deadline ends it"
        );

        udp_peer.send(b"x").expect("send");
        let got = poller.wait(&bell, None, clock).expect("wait");
        assert_eq!(
            got,
            Ready {
                udp: true,
                ..Ready::default()
            }
        );
        // Level-triggered: unread, it is reported again.
        let again = poller.wait(&bell, None, clock).expect("wait");
        assert_eq!(again, got, "a source left unread is reported again");
        let mut buf = [0; 4];
        udp.recv(&mut buf).expect("recv");

        tun_peer.send(b"y").expect("send");
        bell.ring();
        bell.ring();
        let got = poller.wait(&bell, in_(LONG), clock).expect("wait");
        assert_eq!(
            got,
            Ready {
                tun: true,
                rung: true,
                ..Ready::default()
            }
        );
        tun.recv(&mut buf).expect("recv");
        let heard = poller
            .wait(&bell, in_(Duration::from_millis(5)), clock)
            .expect("wait");
        assert_eq!(
            heard,
            Ready {
                due: true,
                ..Ready::default()
            },
            "both rings were heard at once"
        );
    }

    /// The timer is set when the deadline moves and only then (the clock is read for it), goes
    /// off no earlier than the deadline, at once for one passed, and not at all once unset.
    #[test]
    fn the_deadline_timer_is_set_only_when_the_deadline_moves_and_goes_off_at_it() {
        let (tun, udp, bell, _peers) = quiet_set();
        let mut poller = Poller::new(&tun, &udp, &bell).expect("epoll");
        let _watchdog = watchdog(&bell);
        let reads = std::cell::Cell::new(0);
        let counted = || {
            reads.set(reads.get() + 1);
            clock()
        };

        let t0 = clock();
        let at = t0 + Duration::from_millis(20);
        let got = poller.wait(&bell, Some(at), counted).expect("wait");
        assert_eq!((got.due, got.rung), (true, false), "{got:?}");
        assert!(clock() >= at, "not before its deadline");
        assert_eq!(reads.get(), 1, "the clock read once, to set the timer");

        // Gone off, the timer is unset: the same deadline, now passed, is set again and is due
        // at once.
        let got = poller.wait(&bell, Some(at), counted).expect("wait");
        assert_eq!(
            (got.due, got.rung),
            (true, false),
            "a passed deadline goes off at once: {got:?}"
        );
        assert_eq!(reads.get(), 2);

        // A deadline still ahead is not set again for each wait.
        let later = in_(LONG);
        bell.ring();
        assert!(poller.wait(&bell, later, counted).expect("wait").rung);
        bell.ring();
        let got = poller.wait(&bell, later, counted).expect("wait");
        assert_eq!(
            (got.rung, got.due, reads.get()),
            (true, false, 3),
            "set once for two waits"
        );

        // Unset: a deadline that would have gone off at 5 ms does not, before a ring at 50 ms.
        let soon = in_(Duration::from_millis(5));
        bell.ring();
        assert!(poller.wait(&bell, soon, counted).expect("wait").rung);
        let ringer = Arc::clone(&bell);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            ringer.ring();
        });
        let got = poller.wait(&bell, None, counted).expect("wait");
        t.join().expect("ringer");
        assert_eq!(
            (got.rung, got.due),
            (true, false),
            "no deadline: the timer was unset"
        );
    }

    #[test]
    fn a_bell_rung_from_another_thread_ends_a_wait_without_a_deadline() {
        let (tun, udp, bell, _peers) = quiet_set();
        let mut poller = Poller::new(&tun, &udp, &bell).expect("epoll");
        let ringer = Arc::clone(&bell);
        let t = std::thread::spawn(move || ringer.ring());
        let got = poller.wait(&bell, in_(LONG), clock).expect("wait");
        assert!(
            got.rung,
            "the ring ends the wait, long before 10 s: {got:?}"
        );
        t.join().expect("ringer");
    }
}
