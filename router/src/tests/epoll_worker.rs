//! The driver as a data-path worker runs it: on its own thread, waiting in its own `epoll`
//! ([`Driver::serve_blocking`]), over devices that `epoll` can watch. What is checked here is
//! the order of a worker's system calls on a wake-up, which the latency of a ping depends on.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use weft_config::Offload;

use crate::PeerId;
use crate::driver::{
    Bell, Datagrams, Driver, IoCounters, Packets, SharedRouter, TunIo, UdpIo, Watched,
};
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
    /// How long each send takes (a slow device).
    send_time: Duration,
    /// A router and one of its peers: each send is logged with whether some worker holds the
    /// peer's send turn as it is made (`send, turn held` or `send, no turn`).
    turns: Option<(SharedRouter, PeerId)>,
}

/// A [`Quiet`] device.
pub(crate) fn quiet() -> Quiet {
    let (watched, _other) = UnixDatagram::pair().expect("pair");
    Quiet {
        watched,
        _other,
        sent: None,
        send_time: Duration::ZERO,
        turns: None,
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
            let what = match &self.turns {
                None => "send",
                Some((router, peer)) => match router.read().expect("router").turn_holder(*peer) {
                    Some(_) => "send, turn held",
                    None => "send, no turn",
                },
            };
            note(log, what);
        }
        // A slow device is the scenario's input, not a wait for a condition.
        std::thread::sleep(self.send_time);
        Ok(())
    }
    fn max_segments(&self) -> usize {
        1
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(SocketAddr::from(([198, 18, 0, 1], 51820)))
    }
}

/// A worker alone on its router takes no send turns: nothing else encrypts for its peers, so
/// there is no order to keep, and no lock, lookup and peer lock per batch to give a turn back.
/// A worker counted as one of two holds the peer's turn while it sends, as before (the switch
/// between the two; turns among workers that compete are the pairwise tests').
#[test]
fn a_worker_alone_takes_no_send_turns_and_one_among_others_holds_the_turn_while_it_sends() {
    for (workers, expected) in [(1, "send, no turn"), (2, "send, turn held")] {
        let pair = super::pairwise::Pair::connected(b"up");
        let peer = pair.b_id;
        let shared: SharedRouter = Arc::new(RwLock::new(pair.a.router));
        let log = Log::default();
        let (tun, kernel) = polled_tun(log.clone());
        let udp = Quiet {
            sent: Some(log.clone()),
            turns: Some((shared.clone(), peer)),
            ..quiet()
        };
        let counters = Arc::new(IoCounters::new(workers));
        let worker = Driver::worker(0, shared, counters, tun, udp, Offload::AUTO).expect("driver");
        let seen = serve_until(
            worker,
            &log,
            || kernel.feed(packet(1)),
            |seen| seen.iter().any(|w| w.starts_with("send")),
        );
        let sends: Vec<_> = seen.iter().filter(|w| w.starts_with("send")).collect();
        assert_eq!(sends, [&expected], "{workers} worker(s): {seen:?}");
    }
}

/// A worker woken by `epoll` for a packet sends it before it reads the queue again: the read
/// that finds the queue empty comes after the send, not between the packet and its way out.
/// The first packet is lone (no wake-up before it) and costs one read; the second, close
/// behind it (here: within an hour), is read on from.
#[test]
fn a_worker_in_epoll_sends_a_packet_before_the_read_that_finds_the_queue_empty() {
    let seen = run_until(
        (Duration::from_secs(3600), Duration::ZERO),
        |kernel, _| {
            kernel.feed(packet(1));
            kernel.feed(packet(2));
        },
        |seen| sends(seen) == 2 && seen.contains(&"try"),
    );
    assert_eq!(
        seen,
        ["read", "send", "read", "send", "try"],
        "each packet's send comes before the next read: {seen:?}"
    );
}

/// Sparse packets ([`LONE_GAP`](crate::driver::LONE_GAP) or more apart; here any gap counts)
/// cost one read each: the queue is taken for empty rather than read again to see it. Before,
/// every lone packet (each ping) paid a second read that found nothing.
#[test]
fn a_lone_packet_costs_one_read_and_none_that_finds_the_queue_empty() {
    let seen = run_until(
        (Duration::ZERO, Duration::ZERO),
        |kernel, log| {
            kernel.feed(packet(1));
            // Bounded: the first send within 10 s, then the second packet.
            let deadline = Instant::now() + Duration::from_secs(10);
            while sends(&log.lock().expect("log")) < 1 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            kernel.feed(packet(2));
        },
        |seen| sends(seen) == 2,
    );
    assert_eq!(
        seen,
        ["read", "send", "read", "send"],
        "one read per lone packet: {seen:?}"
    );
}

/// A burst queued behind a lone packet is read on and sent together, however long each turn
/// takes (here each send takes 1.5 ms, longer than [`LONE_GAP`](crate::driver::LONE_GAP)):
/// the quiet before a wake-up is what makes its packet lone, not the time since the last turn
/// began. Reviewed: measured from the turns' starts, every slow turn counted as quiet, and
/// the burst went out one read per wake-up, without a read ever finding the queue empty.
#[test]
fn a_burst_behind_a_lone_packet_is_read_on_however_slow_the_turns() {
    const BURST: usize = 20;
    let seen = run_until(
        (crate::driver::LONE_GAP, Duration::from_micros(1500)),
        |kernel, log| {
            kernel.feed(packet(1));
            // Bounded: the lone packet's send within 10 s, then the burst at once.
            let deadline = Instant::now() + Duration::from_secs(10);
            while sends(&log.lock().expect("log")) < 1 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            for _ in 0..BURST {
                kernel.feed(packet(2));
            }
        },
        |seen| sends(seen) == 1 + BURST && seen.contains(&"try"),
    );
    assert_eq!(sends(&seen), 1 + BURST, "every packet sent: {seen:?}");
    // Read on: somewhere the worker read twice without a send in between.
    assert!(
        seen.windows(2).any(|w| w == ["read", "read"]),
        "the burst was read one packet per wake-up: {seen:?}"
    );
}

/// A short read of several packets (a response of a few segments, split) that the queue held
/// alone leaves the worker sparse: the next packet is sent before the read that finds the queue
/// empty. Reviewed: only a one-packet read counted, and the packet after a short response paid
/// an empty read before its send.
#[test]
fn a_short_read_of_a_few_packets_keeps_the_next_packet_ahead_of_the_empty_read() {
    let seen = run_until(
        (Duration::from_secs(3600), Duration::ZERO),
        |kernel, log| {
            kernel.feed_read(vec![packet(1), packet(2), packet(3)]);
            // Bounded: the three sends within 10 s, then the next packet.
            let deadline = Instant::now() + Duration::from_secs(10);
            while sends(&log.lock().expect("log")) < 3 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            kernel.feed(packet(4));
        },
        |seen| sends(seen) == 4 && seen.iter().filter(|w| **w == "try").count() == 2,
    );
    let last = seen.iter().rposition(|w| *w == "read").expect("a read");
    assert_eq!(
        seen.get(last..),
        Some(&["read", "send", "try"][..]),
        "the packet after a short read goes out first: {seen:?}"
    );
}

/// A packet from 100.64.1.1 to 100.64.2.`n`.
fn packet(n: u8) -> Vec<u8> {
    test_packet([100, 64, 1, 1].into(), [100, 64, 2, n].into(), b"data")
}

/// The datagrams sent in a log.
fn sends(seen: &[&str]) -> usize {
    seen.iter().filter(|w| **w == "send").count()
}

/// Runs a worker, with a session to its peer up (every packet is sent at once), over a
/// [`PolledTun`] and a [`Quiet`] socket that log to one log, with `lone_gap` for
/// [`LONE_GAP`](crate::driver::LONE_GAP); `feed` then feeds the TUN queue, until `done` says
/// what was logged is enough (or 10 s pass); returns that log.
fn run_until(
    (lone_gap, send_time): (Duration, Duration),
    feed: impl FnOnce(&Feeder, &Log),
    done: impl Fn(&[&'static str]) -> bool,
) -> Vec<&'static str> {
    let router = super::pairwise::Pair::connected(b"up").a.router;
    let log = Log::default();
    let (tun, kernel) = polled_tun(log.clone());
    let udp = Quiet {
        sent: Some(log.clone()),
        send_time,
        ..quiet()
    };
    let mut worker = Driver::new(router, tun, udp, Offload::AUTO).expect("driver");
    worker.set_lone_gap(lone_gap);
    serve_until(worker, &log, || feed(&kernel, &log), done)
}

/// Runs `worker` on a thread of its own, waiting in `epoll` without commands; `feed` then
/// hands it its input, until `done` says what was logged is enough (or 10 s pass); stops it and
/// returns the log.
fn serve_until<T, U>(
    mut worker: Driver<T, U>,
    log: &Log,
    feed: impl FnOnce(),
    done: impl Fn(&[&'static str]) -> bool,
) -> Vec<&'static str>
where
    T: TunIo + Watched,
    U: UdpIo + Watched,
{
    let bell = Arc::new(Bell::new().expect("eventfd"));
    let stop = Arc::new(AtomicBool::new(false));
    let (b, s) = (bell.clone(), stop.clone());
    let thread = std::thread::spawn(move || worker.serve_blocking(None, &b, &s));
    feed();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done(&log.lock().expect("log")) && Instant::now() < deadline && !thread.is_finished() {
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::Release);
    bell.ring();
    let ended = thread.join().expect("no panic");
    assert!(ended.is_ok(), "the worker failed: {ended:?}");
    // Read once the worker has stopped: whatever it did after `done` held is in it too.
    log.lock().expect("log").clone()
}

/// A read that leaves the batch too full for another (a segment split into many packets) is
/// load, not a lone packet: the turn after it batches as under load (read until the queue is
/// empty, then send), rather than sending each read on its own. Reviewed: it counted as a
/// lone packet, and a bulk flow of small segments paid a send per read.
#[test]
fn a_read_that_fills_the_batch_counts_as_load_and_the_next_turn_batches() {
    let big = (0..130).map(|_| packet(3)).collect::<Vec<_>>();
    // Any gap makes a one-packet read lone here: the full read must not count as one.
    let seen = run_until(
        (Duration::ZERO, Duration::ZERO),
        |kernel, log| {
            // Two lone packets first (sparse traffic), then the full read.
            kernel.feed(packet(1));
            kernel.feed(packet(2));
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

/// The worker with the commands runs the router's timers at their deadline from its own
/// `epoll` (a `timerfd`, module `poll`), with no packet or command to wake it: a peer with a
/// persistent keepalive of 1 s and no session gets a handshake initiation from the timers
/// alone.
#[test]
fn a_worker_in_epoll_runs_the_routers_timers_with_nothing_else_to_wake_it() {
    use boringtun::x25519::{PublicKey, StaticSecret};
    let mut router = crate::Router::new(StaticSecret::from([7; 32]), 7);
    let mut config = crate::testing::peer_config(
        "b",
        PublicKey::from(&StaticSecret::from([8; 32])).to_bytes(),
        Some("198.18.0.2:51820"),
        &["100.64.2.0/24"],
    );
    config.persistent_keepalive = Some(1);
    router.add_peer(Instant::now(), config).expect("peer");
    let log = Log::default();
    let udp = Quiet {
        sent: Some(log.clone()),
        ..quiet()
    };
    let mut worker = Driver::new(router, quiet(), udp, Offload::AUTO).expect("driver");
    let bell = Arc::new(Bell::new().expect("eventfd"));
    let stop = Arc::new(AtomicBool::new(false));
    let (commands_tx, commands) = tokio::sync::mpsc::channel(1);
    let (b, s) = (bell.clone(), stop.clone());
    let thread = std::thread::spawn(move || worker.serve_blocking(Some(commands), &b, &s));
    // Bounded: the keepalive's initiation within 10 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sends(&log.lock().expect("log")) < 1 && Instant::now() < deadline && !thread.is_finished()
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Release);
    bell.ring();
    let ended = thread.join().expect("no panic");
    drop(commands_tx);
    assert!(ended.is_ok(), "the worker failed: {ended:?}");
    let sent = sends(&log.lock().expect("log"));
    assert!(
        sent >= 1,
        "the timers ran and sent an initiation with nothing else waking the worker: {sent} sent"
    );
}

/// A packet's turn does not look for commands: they are looked for when the bell rings, which
/// the daemon does for each one it queues. Here a command is queued without a ring: two packets
/// go out, each in a turn of its own, and the command waits, until a ring. Before, every turn
/// asked the command channel (and the first packet's turn, done once the second is sent, had
/// answered it).
#[test]
fn a_packets_turn_leaves_the_commands_to_the_bell() {
    let router = super::pairwise::Pair::connected(b"up").a.router;
    let log = Log::default();
    let (tun, kernel) = polled_tun(log.clone());
    let udp = Quiet {
        sent: Some(log.clone()),
        ..quiet()
    };
    let mut worker = Driver::new(router, tun, udp, Offload::AUTO).expect("driver");
    let bell = Arc::new(Bell::new().expect("eventfd"));
    let stop = Arc::new(AtomicBool::new(false));
    let (commands_tx, commands) = tokio::sync::mpsc::channel(4);
    let (reply, mut answer) = tokio::sync::oneshot::channel();
    commands_tx
        .try_send(crate::driver::Command::Status(reply))
        .expect("room");
    let (b, s) = (bell.clone(), stop.clone());
    let thread = std::thread::spawn(move || worker.serve_blocking(Some(commands), &b, &s));
    // Bounded: each packet's send within 10 s, then the ring's answer within 10 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in 1..=2 {
        kernel.feed(packet(1));
        while sends(&log.lock().expect("log")) < n
            && Instant::now() < deadline
            && !thread.is_finished()
        {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let before_ring = answer.try_recv().is_ok();
    bell.ring();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after_ring = false;
    while !after_ring && Instant::now() < deadline && !thread.is_finished() {
        after_ring = answer.try_recv().is_ok();
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::Release);
    bell.ring();
    let ended = thread.join().expect("no panic");
    drop(commands_tx);
    assert!(ended.is_ok(), "the worker failed: {ended:?}");
    assert_eq!(sends(&log.lock().expect("log")), 2, "the packets were sent");
    assert!(
        !before_ring,
        "the packet's turn left the command for the bell"
    );
    assert!(after_ring, "the ring had the command answered");
}

/// A UDP socket in memory that `epoll` can watch (a local datagram socket holds one byte per
/// queued datagram, so it is readable exactly while one waits), logging its receives: `recv`
/// (a batch's receive that got a datagram), `recv one` (a single one's) and `empty` (a receive
/// that found nothing).
struct PolledUdp {
    queue: Arc<Mutex<VecDeque<Vec<u8>>>>,
    signal: UnixDatagram,
    log: Log,
    /// How long each send takes (a slow network).
    send_time: Duration,
}

/// A [`PolledUdp`] logging to `log` whose sends take `send_time`, and its network's side.
fn polled_udp(log: Log, send_time: Duration) -> (PolledUdp, Wire) {
    let (signal, feeder) = UnixDatagram::pair().expect("pair");
    signal.set_nonblocking(true).expect("nonblocking");
    let queue = Arc::new(Mutex::new(VecDeque::new()));
    let udp = PolledUdp {
        queue: queue.clone(),
        signal,
        log,
        send_time,
    };
    (udp, Wire { queue, feeder })
}

/// The network's side of a [`PolledUdp`]: queues datagrams from b.
struct Wire {
    queue: Arc<Mutex<VecDeque<Vec<u8>>>>,
    feeder: UnixDatagram,
}

impl Wire {
    fn deliver(&self, datagram: Vec<u8>) {
        self.queue.lock().expect("queue").push_back(datagram);
        self.feeder.send(&[0]).expect("signal");
    }
}

impl PolledUdp {
    fn take(&self, rx: &mut Datagrams, what: &'static str) -> io::Result<()> {
        let Some(datagram) = self.queue.lock().expect("queue").pop_front() else {
            note(&self.log, "empty");
            return Err(io::ErrorKind::WouldBlock.into());
        };
        note(&self.log, what);
        let _ = self.signal.recv(&mut [0]);
        let from = super::pairwise::B_ADDR.parse().expect("address");
        rx.set_one(from, &datagram)
    }
}

impl AsFd for PolledUdp {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.signal.as_fd()
    }
}

impl Watched for PolledUdp {
    fn set_ready(&self) {}
}

impl UdpIo for PolledUdp {
    fn try_recv(&self, rx: &mut Datagrams) -> io::Result<()> {
        self.take(rx, "recv")
    }
    fn try_recv_one(&self, rx: &mut Datagrams) -> io::Result<()> {
        self.take(rx, "recv one")
    }
    async fn send(&self, _: SocketAddr, _: &[u8], _: usize) -> io::Result<()> {
        // A slow network is the scenario's input, not a wait for a condition.
        std::thread::sleep(self.send_time);
        Ok(())
    }
    fn max_segments(&self) -> usize {
        1
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(SocketAddr::from(([198, 18, 1, 1], 51820)))
    }
}

/// A TUN device that never has anything to read and logs each packet written (`write`), each
/// write taking `write_time` (a slow device).
struct WrittenTun {
    quiet: Quiet,
    log: Log,
    write_time: Duration,
}

impl AsFd for WrittenTun {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.quiet.as_fd()
    }
}

impl Watched for WrittenTun {
    fn set_ready(&self) {}
}

impl TunIo for WrittenTun {
    fn try_recv(&self, _: &mut Packets) -> io::Result<()> {
        Err(io::ErrorKind::WouldBlock.into())
    }
    async fn send(&self, batch: &mut Packets) -> io::Result<()> {
        for _ in 0..batch.len() {
            note(&self.log, "write");
        }
        batch.clear();
        // A slow device is the scenario's input, not a wait for a condition.
        std::thread::sleep(self.write_time);
        Ok(())
    }
}

/// The writes in a log.
fn writes(seen: &[&str]) -> usize {
    seen.iter().filter(|w| **w == "write").count()
}

/// Runs a worker around a's router (a session with b up) over a [`PolledUdp`] and a
/// [`WrittenTun`] logging to one log, with `lone_gap` for [`LONE_GAP`](crate::driver::LONE_GAP)
/// and TUN writes taking `write_time`; `deliver` then hands it b's datagrams (made up front,
/// `n` of them), until `done` says what was logged is enough (or 10 s pass); returns that log.
fn receive_until(
    (lone_gap, write_time): (Duration, Duration),
    n: usize,
    deliver: impl FnOnce(&Wire, Vec<Vec<u8>>, &Log),
    done: impl Fn(&[&'static str]) -> bool,
) -> Vec<&'static str> {
    let mut pair = super::pairwise::Pair::connected(b"up");
    let datagrams = pair.datagrams_to_a(n);
    let log = Log::default();
    let (udp, wire) = polled_udp(log.clone(), Duration::ZERO);
    let tun = WrittenTun {
        quiet: quiet(),
        log: log.clone(),
        write_time,
    };
    let mut worker = Driver::new(pair.a.router, tun, udp, Offload::AUTO).expect("driver");
    worker.set_lone_gap(lone_gap);
    serve_until(worker, &log, || deliver(&wire, datagrams, &log), done)
}

/// Waits (bounded: 10 s) until `log` shows `n` TUN writes.
fn wait_writes(log: &Log, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while writes(&log.lock().expect("log")) < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A hop's turn serves only what `epoll` reported: a TUN packet's turn does not try the
/// socket, a datagram's turn does not read the TUN queue (`epoll` is level-triggered: what is
/// left is reported at the next wait). Before, each turn looked at both after its packet's
/// send or write, which delayed the worker's next wait, and so a worker woken on the same CPU
/// (the other tunnel end, the pod) waited longer to run.
#[test]
fn a_packets_turn_looks_only_at_the_device_or_socket_epoll_reported() {
    let mut pair = super::pairwise::Pair::connected(b"up");
    let datagram = pair.datagrams_to_a(1).remove(0);
    let log = Log::default();
    let (tun, kernel) = polled_tun(log.clone());
    let (udp, wire) = polled_udp(log.clone(), Duration::ZERO);
    let mut worker = Driver::new(pair.a.router, tun, udp, Offload::AUTO).expect("driver");
    worker.set_lone_gap(Duration::ZERO);
    let feed = || {
        kernel.feed(packet(1));
        // Bounded: the packet read within 10 s, then the datagram.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !log.lock().expect("log").contains(&"read") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        wire.deliver(datagram);
    };
    let seen = serve_until(worker, &log, feed, |seen| seen.contains(&"recv one"));
    assert_eq!(
        seen,
        ["read", "recv one"],
        "each turn looks at its own source only: {seen:?}"
    );
}

/// Sparse datagrams ([`LONE_GAP`](crate::driver::LONE_GAP) or more apart; here any gap counts)
/// cost one receive each, a single one's: the socket is taken for empty rather than asked again
/// to see it, and no batch's receive is set up. Before, each lone datagram (each ping's) was
/// received with a batch's receive, and the receive that found the socket empty came after.
#[test]
fn a_lone_datagram_costs_one_single_receive_and_none_that_finds_the_socket_empty() {
    let seen = receive_until(
        (Duration::ZERO, Duration::ZERO),
        2,
        |wire, datagrams, log| {
            for (n, datagram) in datagrams.into_iter().enumerate() {
                wire.deliver(datagram);
                wait_writes(log, n + 1);
            }
        },
        |seen| writes(seen) == 2,
    );
    assert_eq!(
        seen,
        ["recv one", "write", "recv one", "write"],
        "one single receive per lone datagram: {seen:?}"
    );
}

/// A burst behind a lone datagram is received with a batch's receives, however long each turn
/// takes (here each TUN write takes 1.5 ms, longer than [`LONE_GAP`](crate::driver::LONE_GAP)):
/// the quiet before a wake-up makes its datagram lone, not the time since the last turn began.
/// Measured from the turns' starts, the burst would go one single receive per wake-up.
#[test]
fn a_burst_behind_a_lone_datagram_is_received_in_batches_however_slow_the_turns() {
    const BURST: usize = 20;
    let seen = receive_until(
        (crate::driver::LONE_GAP, Duration::from_micros(1500)),
        1 + BURST,
        |wire, datagrams, log| {
            let mut datagrams = datagrams.into_iter();
            wire.deliver(datagrams.next().expect("the lone one"));
            wait_writes(log, 1);
            for datagram in datagrams {
                wire.deliver(datagram);
            }
        },
        |seen| writes(seen) == 1 + BURST,
    );
    assert_eq!(writes(&seen), 1 + BURST, "every datagram written: {seen:?}");
    assert_eq!(
        seen.first(),
        Some(&"recv one"),
        "the first is lone: {seen:?}"
    );
    let singles = seen.iter().filter(|w| **w == "recv one").count();
    assert!(
        singles < 1 + BURST / 2,
        "the burst was received one single receive per wake-up ({singles} of {}): {seen:?}",
        1 + BURST
    );
}

/// Under load both ways a turn's own TUN work is no quiet on the socket: datagrams queued while
/// every turn encrypts and sends a batch of TUN packets for longer than
/// [`LONE_GAP`](crate::driver::LONE_GAP) are received in batches, not one single receive per
/// turn. Reviewed: the gap was measured to the clock's last reading, which a turn's TUN steps
/// move on (a batch over the shared buffer's size is encrypted in parts, each reading the
/// clock), and the network→TUN side fell to one buffer per turn.
#[test]
fn datagrams_behind_a_turn_busy_with_tun_packets_are_received_in_batches() {
    const BURST: usize = 20;
    let mut pair = super::pairwise::Pair::connected(b"up");
    let datagrams = pair.datagrams_to_a(BURST);
    let log = Log::default();
    let (tun, kernel) = polled_tun(log.clone());
    // Each send takes 40 us: a turn's first part (about 56 packets of 9 KB) takes over 2 ms.
    let (udp, wire) = polled_udp(log.clone(), Duration::from_micros(40));
    let mut worker = Driver::new(pair.a.router, tun, udp, Offload::AUTO).expect("driver");
    worker.set_lone_gap(crate::driver::LONE_GAP);
    let big = test_packet([100, 64, 1, 1].into(), [100, 64, 2, 1].into(), &[0; 9000]);
    let received = |seen: &[&str]| {
        seen.iter()
            .filter(|w| matches!(**w, "recv" | "recv one"))
            .count()
    };
    let seen = serve_until(
        worker,
        &log,
        || {
            // The datagrams, then eight turns' worth of TUN reads (64 each) behind them.
            for datagram in datagrams {
                wire.deliver(datagram);
            }
            for _ in 0..512 {
                kernel.feed(big.clone());
            }
        },
        |seen| received(seen) == BURST,
    );
    assert_eq!(received(&seen), BURST, "every datagram received: {seen:?}");
    let singles = seen.iter().filter(|w| **w == "recv one").count();
    // One for the quiet before the first turn, and room for a wait the feeding thread's
    // scheduling makes; measured to the last reading, every busy turn made one (9 here).
    assert!(
        singles <= 3,
        "{singles} single receives: the turns' TUN work was taken for quiet: {seen:?}"
    );
}
