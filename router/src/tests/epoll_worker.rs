//! The driver as a data-path worker runs it: on its own thread, waiting in its own `epoll`
//! ([`Driver::serve_blocking`]), over devices that `epoll` can watch. What is checked here is
//! the order of a worker's system calls on a wake-up, which the latency of a ping depends on.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use boringtun::x25519::StaticSecret;
use weft_config::Offload;

use crate::driver::{Bell, Datagrams, Driver, Packets, TunIo, UdpIo, Watched};
use crate::packet::test_packet;

/// What the worker did, in order: `read` (a TUN read that got a packet), `try` (one that found
/// the queue empty), `send` (a datagram sent).
type Log = Arc<Mutex<Vec<&'static str>>>;

fn note(log: &Log, what: &'static str) {
    log.lock().expect("log").push(what);
}

/// Reads waiting, each the packets one read gets (more than one: a segment split).
type Queue = Arc<Mutex<VecDeque<Vec<Vec<u8>>>>>;

/// A TUN queue in memory that `epoll` can watch: a local datagram socket holds one byte per
/// queued packet, so it is readable exactly while a packet waits.
struct PolledTun {
    queue: Queue,
    signal: UnixDatagram,
    log: Log,
}

/// The kernel's side of a [`PolledTun`].
struct Feeder {
    queue: Queue,
    feeder: UnixDatagram,
}

fn polled_tun(log: Log) -> (PolledTun, Feeder) {
    let (signal, feeder) = UnixDatagram::pair().expect("pair");
    signal.set_nonblocking(true).expect("nonblocking");
    let queue = Queue::default();
    let tun = PolledTun {
        queue: queue.clone(),
        signal,
        log,
    };
    (tun, Feeder { queue, feeder })
}

impl Feeder {
    /// What the kernel does when a pod sends: the packet is queued and the queue readable.
    fn feed(&self, packet: Vec<u8>) {
        self.feed_read(vec![packet]);
    }

    /// Queues what one read gets.
    fn feed_read(&self, packets: Vec<Vec<u8>>) {
        self.queue.lock().expect("queue").push_back(packets);
        self.feeder.send(&[0]).expect("signal");
    }
}

impl AsFd for PolledTun {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.signal.as_fd()
    }
}

impl Watched for PolledTun {
    fn set_ready(&self) {}
}

impl TunIo for PolledTun {
    fn try_recv(&self, batch: &mut Packets) -> io::Result<()> {
        let Some(packets) = self.queue.lock().expect("queue").pop_front() else {
            note(&self.log, "try");
            return Err(io::ErrorKind::WouldBlock.into());
        };
        note(&self.log, "read");
        let _ = self.signal.recv(&mut [0]);
        for packet in packets {
            assert!(batch.push(&packet), "a test packet fits a slot");
        }
        Ok(())
    }
    async fn send(&self, batch: &mut Packets) -> io::Result<()> {
        batch.clear();
        Ok(())
    }
}

/// A device that never has anything to read and takes every write, logging its datagram
/// sends where it is given a log: a local datagram socket for `epoll` to watch, no network.
pub(crate) struct Quiet {
    watched: UnixDatagram,
    /// Kept open: a closed other end would make `watched` always ready.
    _other: UnixDatagram,
    sent: Option<Log>,
}

/// A [`Quiet`] device.
pub(crate) fn quiet() -> Quiet {
    let (watched, _other) = UnixDatagram::pair().expect("pair");
    Quiet {
        watched,
        _other,
        sent: None,
    }
}

impl AsFd for Quiet {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.watched.as_fd()
    }
}

impl Watched for Quiet {
    fn set_ready(&self) {}
}

impl TunIo for Quiet {
    fn try_recv(&self, _: &mut Packets) -> io::Result<()> {
        Err(io::ErrorKind::WouldBlock.into())
    }
    async fn send(&self, batch: &mut Packets) -> io::Result<()> {
        batch.clear();
        Ok(())
    }
}

impl UdpIo for Quiet {
    fn try_recv(&self, _: &mut Datagrams) -> io::Result<()> {
        Err(io::ErrorKind::WouldBlock.into())
    }
    async fn send(&self, _: SocketAddr, _: &[u8], _: usize) -> io::Result<()> {
        if let Some(log) = &self.sent {
            note(log, "send");
        }
        Ok(())
    }
    fn max_segments(&self) -> usize {
        1
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(SocketAddr::from(([198, 18, 0, 1], 51820)))
    }
}

/// A worker woken by `epoll` for a lone packet (a ping) sends it before it reads the queue
/// again: the read that finds the queue empty comes after the send, not between the packet
/// and its way out.
#[test]
fn a_worker_in_epoll_sends_a_lone_packet_before_the_read_that_finds_the_queue_empty() {
    let (ka, kb) = (StaticSecret::from([1; 32]), StaticSecret::from([2; 32]));
    let router = super::driver::router(&ka, &kb, "198.18.1.2:51820", "100.64.2.0/24");
    let log = Log::default();
    let (tun, kernel) = polled_tun(log.clone());
    let seen = run_until(
        router,
        tun,
        &log,
        || {
            kernel.feed(test_packet(
                [100, 64, 1, 1].into(),
                [100, 64, 2, 1].into(),
                b"ping",
            ))
        },
        |seen| seen.contains(&"send") && seen.contains(&"try"),
    );
    assert_eq!(
        seen.get(..3),
        Some(&["read", "send", "try"][..]),
        "the packet's send comes first: {seen:?}"
    );
}

/// Runs a worker over `tun` and a [`Quiet`] socket logging to `log`, until `done` says what it
/// logged is enough (or 10 s pass); returns that log.
fn run_until(
    router: crate::Router,
    tun: PolledTun,
    log: &Log,
    feed: impl FnOnce(),
    done: impl Fn(&[&'static str]) -> bool,
) -> Vec<&'static str> {
    let udp = Quiet {
        sent: Some(log.clone()),
        ..quiet()
    };
    let mut worker = Driver::new(router, tun, udp, Offload::AUTO).expect("driver");
    let bell = Arc::new(Bell::new().expect("eventfd"));
    let stop = Arc::new(AtomicBool::new(false));
    let (b, s) = (bell.clone(), stop.clone());
    let thread = std::thread::spawn(move || worker.serve_blocking(None, &b, &s));
    feed();
    let deadline = Instant::now() + Duration::from_secs(10);
    let seen = loop {
        let seen = log.lock().expect("log").clone();
        if done(&seen) || Instant::now() >= deadline || thread.is_finished() {
            break seen;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    stop.store(true, Ordering::Release);
    bell.ring();
    let ended = thread.join().expect("no panic");
    assert!(ended.is_ok(), "the worker failed: {ended:?}");
    seen
}

/// A read that leaves the batch too full for another (a segment split into many packets) is
/// load, not a lone packet: the turn after it batches as under load (read until the queue is
/// empty, then send), rather than sending each read on its own. Reviewed: it counted as a
/// lone packet, and a bulk flow of small segments paid a send per read.
#[test]
fn a_read_that_fills_the_batch_counts_as_load_and_the_next_turn_batches() {
    // A session with the peer is up, so that every packet is sent (and logged) at once.
    let router = super::pairwise::Pair::connected(b"up").a.router;
    let log = Log::default();
    let (tun, kernel) = polled_tun(log.clone());
    let packet = |n: u8| test_packet([100, 64, 1, 1].into(), [100, 64, 2, n].into(), b"data");
    // Two reads waiting at the first wake-up: load, from then on.
    kernel.feed(packet(1));
    kernel.feed(packet(2));
    let big = (0..130).map(|_| packet(3)).collect::<Vec<_>>();
    let sends = |seen: &[&str]| seen.iter().filter(|w| **w == "send").count();
    let seen = run_until(
        router,
        tun,
        &log,
        || {
            // Bounded: the first turn's two sends within 10 s.
            let deadline = Instant::now() + Duration::from_secs(10);
            while sends(&log.lock().expect("log")) < 2 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            kernel.feed_read(big);
            while sends(&log.lock().expect("log")) < 132 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            kernel.feed(packet(4));
        },
        |seen| sends(seen) >= 133,
    );
    assert_eq!(sends(&seen), 133, "every packet sent: {seen:?}");
    // The last turn: its read, then the read that finds the queue empty, then the send.
    let last = seen.iter().rposition(|w| *w == "read").expect("a read");
    assert_eq!(
        seen.get(last..),
        Some(&["read", "try", "send"][..]),
        "the turn after a full read batches: {seen:?}"
    );
}
