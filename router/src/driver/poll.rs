//! How a worker over the real devices waits: its own `epoll` on its TUN queue, its UDP socket and
//! an `eventfd` the rest of the daemon rings ([`Bell`]), with the router's next deadline as the
//! timeout. No async runtime sits between a packet's wake-up and its turn.
//!
//! The set is level-triggered: a source the turn left unread (its share of the turn used up) is
//! reported again at once, so nothing waits for a new event to be served. The sources are
//! watched for reading only (see module `udp`).

use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::PollTimeout;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};

/// The longest single wait; a wait with no deadline ends after it and starts again.
const LONGEST: Duration = Duration::from_secs(3600);

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
}

const TUN: u64 = 0;
const UDP: u64 = 1;
const BELL: u64 = 2;

/// One worker's `epoll` set: its TUN queue, its socket and its bell.
#[derive(Debug)]
pub(super) struct Poller {
    epoll: Epoll,
    events: [EpollEvent; 3],
}

impl Poller {
    /// A set watching `tun` and `udp` for reading, and `bell`.
    pub(super) fn new(tun: impl AsFd, udp: impl AsFd, bell: &Bell) -> io::Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(tun, EpollEvent::new(EpollFlags::EPOLLIN, TUN))?;
        epoll.add(udp, EpollEvent::new(EpollFlags::EPOLLIN, UDP))?;
        epoll.add(&bell.fd, EpollEvent::new(EpollFlags::EPOLLIN, BELL))?;
        Ok(Self {
            epoll,
            events: [EpollEvent::empty(); 3],
        })
    }

    /// Waits until a source is ready or `timeout` has passed (none: [`LONGEST`]); a ring is
    /// heard here. A signal ending the wait early is nothing ready.
    pub(super) fn wait(&mut self, bell: &Bell, timeout: Option<Duration>) -> io::Result<Ready> {
        let n = match self.epoll.wait(&mut self.events, millis(timeout)) {
            Ok(n) => n,
            Err(Errno::EINTR) => 0,
            Err(e) => return Err(e.into()),
        };
        let mut ready = Ready::default();
        for event in self.events.iter().take(n) {
            match event.data() {
                TUN => ready.tun = true,
                UDP => ready.udp = true,
                _ => ready.rung = true,
            }
        }
        if ready.rung {
            bell.hush();
        }
        Ok(ready)
    }
}

/// A wait's timeout in whole milliseconds, rounded up: a deadline 0.3 ms away waits 1 ms rather
/// than returning at once and spinning until it passes.
fn millis(timeout: Option<Duration>) -> PollTimeout {
    let t = timeout.unwrap_or(LONGEST).min(LONGEST);
    // In 64 bits: a 128-bit division is a library call, once per wait.
    let ms = t.as_secs() * 1000 + u64::from(t.subsec_nanos().div_ceil(1_000_000));
    // At most an hour's milliseconds, which fit.
    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

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

    #[test]
    fn a_timeout_is_rounded_up_to_whole_milliseconds_and_bounded() {
        let ms = |t| i32::from(millis(t));
        assert_eq!(ms(Some(Duration::ZERO)), 0, "a past deadline does not wait");
        assert_eq!(ms(Some(Duration::from_micros(300))), 1, "no spinning");
        assert_eq!(
            ms(Some(Duration::from_nanos(1))),
            1,
            "not even for a nanosecond"
        );
        assert_eq!(ms(Some(Duration::from_micros(1001))), 2);
        assert_eq!(ms(Some(Duration::from_secs(7 * 24 * 3600))), 3_600_000);
        assert_eq!(ms(None), 3_600_000);
    }

    /// Local datagram pairs stand in for the TUN queue and the socket: no network.
    #[test]
    fn a_wait_reports_what_is_readable_and_the_bell_and_ends_at_its_timeout() {
        let (tun, tun_peer) = UnixDatagram::pair().expect("pair");
        let (udp, udp_peer) = UnixDatagram::pair().expect("pair");
        let bell = Bell::new().expect("eventfd");
        let mut poller = Poller::new(&tun, &udp, &bell).expect("epoll");

        let quiet = poller
            .wait(&bell, Some(Duration::from_millis(5)))
            .expect("wait");
        assert_eq!(
            quiet,
            Ready::default(),
            "nothing ready: the timeout ends it"
        );

        udp_peer.send(b"x").expect("send");
        let got = poller.wait(&bell, None).expect("wait");
        assert_eq!(
            got,
            Ready {
                udp: true,
                ..Ready::default()
            }
        );
        // Level-triggered: unread, it is reported again.
        let again = poller.wait(&bell, None).expect("wait");
        assert_eq!(again, got, "a source left unread is reported again");
        let mut buf = [0; 4];
        udp.recv(&mut buf).expect("recv");

        tun_peer.send(b"y").expect("send");
        bell.ring();
        bell.ring();
        let got = poller.wait(&bell, Some(LONG)).expect("wait");
        assert_eq!(
            got,
            Ready {
                tun: true,
                udp: false,
                rung: true
            }
        );
        tun.recv(&mut buf).expect("recv");
        let heard = poller
            .wait(&bell, Some(Duration::from_millis(5)))
            .expect("wait");
        assert_eq!(heard, Ready::default(), "both rings were heard at once");
    }

    #[test]
    fn a_bell_rung_from_another_thread_ends_a_wait_without_a_deadline() {
        let (tun, _a) = UnixDatagram::pair().expect("pair");
        let (udp, _b) = UnixDatagram::pair().expect("pair");
        let bell = std::sync::Arc::new(Bell::new().expect("eventfd"));
        let mut poller = Poller::new(&tun, &udp, &bell).expect("epoll");
        let ringer = std::sync::Arc::clone(&bell);
        let t = std::thread::spawn(move || ringer.ring());
        let got = poller
            .wait(&bell, Some(Duration::from_secs(10)))
            .expect("wait");
        assert!(
            got.rung,
            "the ring ends the wait, long before 10 s: {got:?}"
        );
        t.join().expect("ringer");
    }
}
