//! The driver between two in-memory TUN devices and an in-memory network, with real sessions:
//! a packet written by one "kernel" comes out of the other, status answers, shutdown returns;
//! a flood from one side starves nothing else; a vanished daemon stops the driver.

use std::io;
use std::time::{Duration, Instant};

use boringtun::x25519::{PublicKey, StaticSecret};
use tokio::sync::{mpsc, oneshot, watch};

use crate::driver::channel::{self, ChannelTun, Network};
use crate::driver::{Command, Driver, Packets, Snapshot, TunIo, TunWait};
use crate::packet::test_packet;
use crate::{PeerConfig, PeerState, Router};
use weft_config::Offload;

pub(super) fn router(
    own: &StaticSecret,
    peer: &StaticSecret,
    endpoint: &str,
    allowed: &str,
) -> Router {
    let mut r = Router::new(own.clone(), 1);
    let cfg = crate::testing::peer_config(
        "peer",
        PublicKey::from(peer).to_bytes(),
        Some(endpoint),
        &[allowed],
    );
    r.add_peer(Instant::now(), cfg).expect("peer");
    r
}

async fn recv(rx: &mut mpsc::Receiver<Vec<u8>>) -> Vec<u8> {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a packet within 10 s")
        .expect("channel open")
}

#[tokio::test]
async fn packets_cross_between_two_drivers_and_status_and_shutdown_work() {
    two_drivers(Offload::AUTO).await;
}

#[tokio::test]
async fn the_same_holds_with_offload_off() {
    two_drivers(Offload::OFF).await;
}

async fn two_drivers(offload: Offload) {
    let (ka, kb) = (StaticSecret::from([1; 32]), StaticSecret::from([2; 32]));
    let net = Network::default();
    let (tun_a, mut kernel_a) = channel::tun();
    let (tun_b, mut kernel_b) = channel::tun();
    let a = Driver::new(
        router(&ka, &kb, "198.18.1.2:51820", "100.64.2.0/24"),
        tun_a,
        net.bind("198.18.1.1:51820".parse().unwrap()),
        offload,
    )
    .unwrap();
    let b = Driver::new(
        router(&kb, &ka, "198.18.1.1:51820", "100.64.1.0/24"),
        tun_b,
        net.bind("198.18.1.2:51820".parse().unwrap()),
        offload,
    )
    .unwrap();
    let (cmd_a, rx_a) = mpsc::channel(4);
    let (_cmd_b, rx_b) = mpsc::channel(4);
    let (stop, stopped) = watch::channel(false);
    let ha = tokio::spawn(a.run(rx_a, stopped.clone()));
    let hb = tokio::spawn(b.run(rx_b, stopped));

    // A batch of packets; the first waits for the handshake, all arrive in order.
    let packets: Vec<Vec<u8>> = (0..20u8)
        .map(|i| test_packet([100, 64, 1, 1].into(), [100, 64, 2, 1].into(), &[i; 100]))
        .collect();
    for p in &packets {
        kernel_a.tx.send(p.clone()).await.unwrap();
    }
    for p in &packets {
        assert_eq!(&recv(&mut kernel_b.rx).await, p);
    }
    // A burst of mixed sizes, more than one batch and one GSO run: all arrive, byte-exact, in
    // order.
    let burst: Vec<Vec<u8>> = (0..1500u32)
        .map(|i| {
            let len = [1380, 1380, 1380, 40, 700][i as usize % 5];
            let body: Vec<u8> = (0..len).map(|k| (i as usize * 31 + k) as u8).collect();
            test_packet([100, 64, 1, 1].into(), [100, 64, 2, 1].into(), &body)
        })
        .collect();
    let sender = kernel_a.tx.clone();
    let feed = tokio::spawn({
        let burst = burst.clone();
        async move {
            for p in burst {
                sender.send(p).await.unwrap();
            }
        }
    });
    for p in &burst {
        assert_eq!(&recv(&mut kernel_b.rx).await, p);
    }
    feed.await.unwrap();
    let reply = test_packet([100, 64, 2, 1].into(), [100, 64, 1, 1].into(), b"reply");
    kernel_b.tx.send(reply.clone()).await.unwrap();
    assert_eq!(recv(&mut kernel_a.rx).await, reply);

    let (tx, rx) = oneshot::channel();
    cmd_a.send(Command::Status(tx)).await.unwrap();
    let snap = rx.await.unwrap();
    assert_eq!(snap.peers.len(), 1);
    assert_eq!(snap.peers[0].state, PeerState::Up);
    assert_eq!(snap.peers[0].counters.tx_packets, 20 + 1500);
    assert_eq!(snap.peers[0].counters.rx_packets, 1);

    stop.send(true).unwrap();
    let ra = tokio::time::timeout(Duration::from_secs(5), ha)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), hb)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        ra.peers(Instant::now()).len(),
        1,
        "the router comes back on shutdown"
    );
}

/// A TUN device whose kernel side never stops writing: every read returns a copy of `packet` at
/// once, as a pod sending faster than the router encrypts. Writes go to `inner`, so the test
/// sees what the driver delivers to the pods.
struct Flood {
    packet: Vec<u8>,
    inner: ChannelTun,
}

impl TunWait for Flood {
    async fn recv(&self, batch: &mut Packets) -> io::Result<()> {
        // A ready device still counts against tokio's budget, as a real one does, so that the
        // test's other tasks get their turns on this one thread.
        tokio::task::consume_budget().await;
        self.try_recv(batch)
    }
}

impl TunIo for Flood {
    fn try_recv(&self, batch: &mut Packets) -> io::Result<()> {
        if batch.push(&self.packet) {
            Ok(())
        } else {
            Err(io::Error::other("no free slot"))
        }
    }
    async fn send(&self, batch: &mut Packets) -> io::Result<()> {
        self.inner.send(batch).await
    }
}

/// A peer of a test router.
struct Link<'a> {
    key: &'a StaticSecret,
    endpoint: &'a str,
    allowed: &'a str,
    keepalive: Option<u16>,
}

fn router_with(own: &StaticSecret, seed: u32, links: &[Link<'_>]) -> Router {
    let mut r = Router::new(own.clone(), seed);
    for (i, l) in links.iter().enumerate() {
        let cfg = PeerConfig {
            persistent_keepalive: l.keepalive,
            ..crate::testing::peer_config(
                &format!("peer{i}"),
                PublicKey::from(l.key).to_bytes(),
                Some(l.endpoint),
                &[l.allowed],
            )
        };
        r.add_peer(Instant::now(), cfg).expect("peer");
    }
    r
}

async fn status(cmd: &mpsc::Sender<Command>) -> Snapshot {
    let (tx, rx) = oneshot::channel();
    cmd.send(Command::Status(tx)).await.expect("driver running");
    tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .expect("status within 10 s")
        .expect("status answered")
}

/// Node A's pod floods peer B without pause. A must still answer C's handshake and deliver C's
/// and B's packets to its pods (inbound), complete its own handshake with B, and send C the
/// keepalives its timers owe.
#[tokio::test]
async fn a_tun_flood_starves_neither_inbound_nor_handshakes_nor_timers() {
    tun_flood(Offload::AUTO).await;
}

#[tokio::test]
async fn nor_with_offload_off() {
    tun_flood(Offload::OFF).await;
}

async fn tun_flood(offload: Offload) {
    let (ka, kb, kc) = (
        StaticSecret::from([1; 32]),
        StaticSecret::from([2; 32]),
        StaticSecret::from([3; 32]),
    );
    let (ea, eb, ec) = ("198.18.1.1:51820", "198.18.1.2:51820", "198.18.1.3:51820");
    let net = Network::default();
    let a_router = router_with(
        &ka,
        1,
        &[
            Link {
                key: &kb,
                endpoint: eb,
                allowed: "100.64.2.0/24",
                keepalive: None,
            },
            Link {
                key: &kc,
                endpoint: ec,
                allowed: "100.64.3.0/24",
                keepalive: Some(1),
            },
        ],
    );
    let b_router = router_with(
        &kb,
        2,
        &[Link {
            key: &ka,
            endpoint: ea,
            allowed: "100.64.1.0/24",
            keepalive: None,
        }],
    );
    let c_router = router_with(
        &kc,
        3,
        &[Link {
            key: &ka,
            endpoint: ea,
            allowed: "100.64.1.0/24",
            keepalive: None,
        }],
    );
    let (tun_a, mut kernel_a) = channel::tun();
    let flood = Flood {
        packet: test_packet([100, 64, 1, 1].into(), [100, 64, 2, 1].into(), &[7; 100]),
        inner: tun_a,
    };
    let (tun_b, kernel_b) = channel::tun();
    let (tun_c, kernel_c) = channel::tun();
    let (stop, stopped) = watch::channel(false);
    let (cmd_a, rx_a) = mpsc::channel(4);
    let (cmd_b, rx_b) = mpsc::channel(4);
    let (cmd_c, rx_c) = mpsc::channel(4);
    let a = Driver::new(a_router, flood, net.bind(ea.parse().unwrap()), offload).unwrap();
    let b = Driver::new(b_router, tun_b, net.bind(eb.parse().unwrap()), offload).unwrap();
    let c = Driver::new(c_router, tun_c, net.bind(ec.parse().unwrap()), offload).unwrap();
    let hb = tokio::spawn(b.run(rx_b, stopped.clone()));
    let hc = tokio::spawn(c.run(rx_c, stopped.clone()));
    let ha = tokio::spawn(a.run(rx_a, stopped));
    // B's pods take whatever arrives, counting it.
    let (mut b_rx, b_tx) = (kernel_b.rx, kernel_b.tx);
    let (seen_tx, mut seen_b) = watch::channel(0u64);
    let drain = tokio::spawn(async move {
        while b_rx.recv().await.is_some() {
            seen_tx.send_modify(|n| *n += 1);
        }
    });

    // C → A: C starts a handshake that A must answer; its packet reaches A's pod.
    let from_c = test_packet([100, 64, 3, 1].into(), [100, 64, 1, 1].into(), b"from c");
    kernel_c.tx.send(from_c.clone()).await.unwrap();
    assert_eq!(
        recv(&mut kernel_a.rx).await,
        from_c,
        "C's packet reaches A's pod"
    );

    // A → B: A's own handshake completes and the flood arrives at B.
    tokio::time::timeout(Duration::from_secs(10), seen_b.wait_for(|n| *n >= 100))
        .await
        .expect("flooded packets reach B within 10 s")
        .unwrap();
    let a_status = status(&cmd_a).await;
    assert_eq!(a_status.peers[0].state, PeerState::Up, "A's session with B");

    // B → A while A floods B: inbound on the flooded session.
    let from_b = test_packet([100, 64, 2, 1].into(), [100, 64, 1, 1].into(), b"from b");
    b_tx.send(from_b.clone()).await.unwrap();
    assert_eq!(
        recv(&mut kernel_a.rx).await,
        from_b,
        "B's packet reaches A's pod"
    );

    // A's timers: keepalives to C (32 bytes each, no inner packet) every second.
    let before = status(&cmd_c).await.peers[0].counters;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let after = loop {
        let now = status(&cmd_c).await.peers[0].counters;
        if now.rx_bytes >= before.rx_bytes + 2 * 32 {
            break now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "two keepalives from A reach C within 10 s (C's counters: {now:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        after.rx_packets, before.rx_packets,
        "keepalives carry no packet"
    );

    let _ = cmd_b;
    stop.send(true).unwrap();
    for h in [ha, hb, hc] {
        tokio::time::timeout(Duration::from_secs(10), h)
            .await
            .expect("driver stops within 10 s")
            .unwrap()
            .unwrap();
    }
    drain.abort();
}

/// A vanished daemon means stop: the driver returns its router rather than selecting a closed
/// input forever.
async fn stops_when(close_commands: bool) {
    let (ka, kb) = (StaticSecret::from([1; 32]), StaticSecret::from([2; 32]));
    let net = Network::default();
    let (tun, _kernel) = channel::tun();
    let udp = net.bind("198.18.1.1:51820".parse().unwrap());
    let r = router(&ka, &kb, "198.18.1.2:51820", "100.64.2.0/24");
    let driver = Driver::new(r, tun, udp, Offload::AUTO).unwrap();
    let (cmd, commands) = mpsc::channel(4);
    let (stop, stopped) = watch::channel(false);
    let h = tokio::spawn(driver.run(commands, stopped));
    // One goes, the other stays alive.
    let (_cmd, _stop) = if close_commands {
        drop(cmd);
        (None, Some(stop))
    } else {
        drop(stop);
        (Some(cmd), None)
    };
    let r = tokio::time::timeout(Duration::from_secs(5), h)
        .await
        .expect("the driver stops within 5 s")
        .unwrap()
        .unwrap();
    assert_eq!(r.peers(Instant::now()).len(), 1, "the router comes back");
}

// Two worker threads: a driver spinning on a closed input must not stall the test's timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_shutdown_sender_stops_the_driver() {
    stops_when(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_command_channel_stops_the_driver() {
    stops_when(true).await;
}

/// Waits (bounded) for one datagram at `sock`.
async fn datagram_at(sock: &channel::ChannelUdp) -> Vec<u8> {
    use crate::driver::{Datagrams, UdpWait};
    let mut rx = Datagrams::new(1);
    tokio::time::timeout(Duration::from_secs(10), sock.recv(&mut rx))
        .await
        .expect("a datagram within 10 s")
        .expect("socket open");
    rx.iter()
        .next()
        .map(|(_, b, _)| b.to_vec())
        .unwrap_or_default()
}

/// Several workers share one router; only the one that serves commands runs its timers, so
/// WireGuard's timers run once per peer however many workers there are.
#[tokio::test]
async fn only_the_worker_with_commands_runs_the_timers_of_the_router_they_share() {
    use crate::driver::IoCounters;
    use std::sync::{Arc, RwLock};
    let (ka, kb) = (StaticSecret::from([1; 32]), StaticSecret::from([2; 32]));
    let shared = Arc::new(RwLock::new(router(
        &ka,
        &kb,
        "198.18.1.2:51820",
        "100.64.2.0/24",
    )));
    let tick = || shared.read().expect("router").poll_timeout();
    let first = tick().expect("a peer's timers are due");
    let counters = Arc::new(IoCounters::new(2));
    let net = Network::default();
    let peer = net.bind("198.18.1.2:51820".parse().unwrap());
    let (stop, stopped) = watch::channel(false);

    // Worker 1 alone: it moves packets, and leaves the timers.
    let (tun1, kernel1) = channel::tun();
    let mut follower = Driver::worker(
        1,
        shared.clone(),
        counters.clone(),
        tun1,
        net.bind("198.18.1.1:51820".parse().unwrap()),
        Offload::AUTO,
    )
    .unwrap();
    let s1 = stopped.clone();
    let h1 = tokio::spawn(async move { follower.serve(None, s1).await });
    let packet = test_packet([100, 64, 1, 1].into(), [100, 64, 2, 1].into(), b"x");
    // Two packets, the second once the timers were due: it is handled by a turn after then.
    kernel1.tx.send(packet.clone()).await.unwrap();
    assert_eq!(datagram_at(&peer).await[0], 1, "a handshake initiation");
    tokio::time::sleep_until(tokio::time::Instant::from_std(first) + Duration::from_millis(50))
        .await;
    kernel1.tx.send(packet.clone()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while counters_tun(&counters, 1) < 2 {
        assert!(
            Instant::now() < deadline,
            "worker 1 did not read the packet"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(tick(), Some(first), "worker 1 ran the timers");

    // Worker 0, which serves the commands, runs them.
    let (tun0, _kernel0) = channel::tun();
    let mut lead = Driver::worker(
        0,
        shared.clone(),
        counters.clone(),
        tun0,
        net.bind("198.18.1.11:51820".parse().unwrap()),
        Offload::AUTO,
    )
    .unwrap();
    let (_cmd, rx) = mpsc::channel(4);
    let s0 = stopped.clone();
    let h0 = tokio::spawn(async move { lead.serve(Some(rx), s0).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while tick() == Some(first) {
        assert!(Instant::now() < deadline, "worker 0 did not run the timers");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.send(true).unwrap();
    for h in [h0, h1] {
        tokio::time::timeout(Duration::from_secs(5), h)
            .await
            .expect("a worker stops")
            .expect("no panic")
            .expect("no error");
    }
}

fn counters_tun(c: &crate::driver::IoCounters, worker: usize) -> u64 {
    c.snapshot().get(worker).map_or(0, |w| w.tun_packets)
}

/// What a worker did, in order, as the logging devices below saw it.
type Log = std::sync::Arc<std::sync::Mutex<Vec<&'static str>>>;

fn note(log: &Log, what: &'static str) {
    log.lock().expect("log").push(what);
}

/// A TUN device that logs its reads: `read` for the one the worker waited on, `try` for the
/// speculative ones.
struct LoggedTun {
    inner: ChannelTun,
    log: Log,
}

impl TunWait for LoggedTun {
    async fn recv(&self, batch: &mut Packets) -> io::Result<()> {
        let r = self.inner.recv(batch).await;
        note(&self.log, "read");
        r
    }
}

impl TunIo for LoggedTun {
    fn try_recv(&self, batch: &mut Packets) -> io::Result<()> {
        note(&self.log, "try");
        self.inner.try_recv(batch)
    }
    async fn send(&self, batch: &mut Packets) -> io::Result<()> {
        note(&self.log, "write");
        self.inner.send(batch).await
    }
}

/// A socket that logs its receives: `recv` for the one the worker waited on, `udp got` and
/// `udp try` for the speculative ones that found a datagram and that found none; and its sends.
struct LoggedUdp {
    inner: channel::ChannelUdp,
    log: Log,
}

impl crate::driver::UdpWait for LoggedUdp {
    async fn recv(&self, rx: &mut crate::driver::Datagrams) -> io::Result<()> {
        let r = self.inner.recv(rx).await;
        note(&self.log, "recv");
        r
    }
}

impl crate::driver::UdpIo for LoggedUdp {
    fn try_recv(&self, rx: &mut crate::driver::Datagrams) -> io::Result<()> {
        let r = self.inner.try_recv(rx);
        note(&self.log, if r.is_ok() { "udp got" } else { "udp try" });
        r
    }
    async fn send(
        &self,
        to: std::net::SocketAddr,
        contents: &[u8],
        segment: usize,
    ) -> io::Result<()> {
        note(&self.log, "send");
        self.inner.send(to, contents, segment).await
    }
    fn max_segments(&self) -> usize {
        self.inner.max_segments()
    }
    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.inner.local_addr()
    }
}

/// A lone packet (a ping) is sent as soon as the wake-up read it, before the socket is asked
/// for datagrams; and it costs that one read: no speculative read finds the queue empty.
#[tokio::test]
async fn a_lone_packet_leaves_at_once_and_costs_one_read() {
    let (ka, kb) = (StaticSecret::from([1; 32]), StaticSecret::from([2; 32]));
    let net = Network::default();
    let peer = net.bind("198.18.1.2:51820".parse().unwrap());
    let log = Log::default();
    let (tun, kernel) = channel::tun();
    let tun = LoggedTun {
        inner: tun,
        log: log.clone(),
    };
    let udp = LoggedUdp {
        inner: net.bind("198.18.1.1:51820".parse().unwrap()),
        log: log.clone(),
    };
    let mut worker = Driver::new(
        router(&ka, &kb, "198.18.1.2:51820", "100.64.2.0/24"),
        tun,
        udp,
        Offload::AUTO,
    )
    .unwrap();
    let (stop, stopped) = watch::channel(false);
    let h = tokio::spawn(async move { worker.serve(None, stopped).await });
    let packet = test_packet([100, 64, 1, 1].into(), [100, 64, 2, 1].into(), b"ping");
    kernel.tx.send(packet).await.unwrap();
    assert_eq!(datagram_at(&peer).await[0], 1, "a handshake initiation");
    let deadline = Instant::now() + Duration::from_secs(10);
    let seen = loop {
        let seen = log.lock().expect("log").clone();
        if seen.contains(&"udp try") {
            break seen;
        }
        assert!(
            Instant::now() < deadline,
            "the socket was not asked after the send: {seen:?}"
        );
        tokio::task::yield_now().await;
    };
    assert_eq!(
        seen.get(..3),
        Some(&["read", "send", "udp try"][..]),
        "{seen:?}"
    );
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), h)
        .await
        .expect("the worker stops")
        .expect("no panic")
        .expect("no error");
}

/// A lone datagram (a ping arriving) is written to the TUN device as soon as the wake-up
/// received it: before the speculative receive that finds the socket empty.
#[tokio::test]
async fn a_lone_datagram_reaches_the_pod_before_the_receive_that_finds_the_socket_empty() {
    let net = Network::default();
    let log = Log::default();
    let (tun_a, mut kernel_a) = channel::tun();
    let tun_a = LoggedTun {
        inner: tun_a,
        log: log.clone(),
    };
    let udp_a = LoggedUdp {
        inner: net.bind("198.18.1.1:51820".parse().unwrap()),
        log: log.clone(),
    };
    let pair = run_pair(&net, [1, 2], tun_a, udp_a);
    // B initiates; A answers, then receives the packet and writes it to its pod.
    let packet = test_packet([100, 64, 2, 1].into(), [100, 64, 1, 1].into(), b"ping");
    pair.kernel_b.tx.send(packet.clone()).await.unwrap();
    assert_eq!(recv(&mut kernel_a.rx).await, packet);
    let seen = log.lock().expect("log").clone();
    let write = seen
        .iter()
        .position(|w| *w == "write")
        .expect("the packet was written");
    // The receive just before the write found the packet: none that found nothing came
    // between (B may send a keepalive first, so that receive is either kind).
    assert!(
        matches!(seen.get(write - 1), Some(&("recv" | "udp got"))),
        "{seen:?}"
    );
    pair.stop().await;
}

/// A command the async driver takes while it waits (a `Connect`, here) has its output sent at
/// once, not at the next packet or timer tick. Virtual time: the initiation must arrive before
/// any time passes; left for the tick, it would come 250 ms later.
#[tokio::test(start_paused = true)]
async fn output_of_a_command_taken_while_waiting_is_sent_at_once() {
    use crate::driver::{Datagrams, UdpWait};
    let (ka, kb) = (StaticSecret::from([5; 32]), StaticSecret::from([6; 32]));
    let net = Network::default();
    let (tun_a, _kernel_a) = channel::tun();
    let a = Driver::new(
        router(&ka, &kb, "198.18.1.2:51820", "100.64.2.0/24"),
        tun_a,
        net.bind("198.18.1.1:51820".parse().unwrap()),
        Offload::AUTO,
    )
    .unwrap();
    let peer = net.bind("198.18.1.2:51820".parse().unwrap());
    let (cmd, rx) = mpsc::channel(4);
    let (_stop, stopped) = watch::channel(false);
    let driver = tokio::spawn(a.run(rx, stopped));
    let (tx, status) = oneshot::channel();
    cmd.send(Command::Status(tx)).await.unwrap();
    let id = status.await.unwrap().peers[0].id;

    let t0 = tokio::time::Instant::now();
    cmd.send(Command::Connect(id)).await.unwrap();
    let mut got = Datagrams::new(1);
    tokio::time::timeout(Duration::from_secs(10), peer.recv(&mut got))
        .await
        .expect("an initiation within 10 s")
        .expect("received");
    let waited = t0.elapsed();
    let (_, initiation, _) = got.get(0).expect("one datagram");
    assert_eq!(initiation.first(), Some(&1), "a handshake initiation");
    assert!(
        waited < crate::TIMER_TICK,
        "the initiation waited {waited:?} of virtual time for something else to wake the driver"
    );
    driver.abort();
}

/// A TUN device that refuses every write (as a kernel out of memory would).
struct RefusingTun(ChannelTun);

impl TunWait for RefusingTun {
    async fn recv(&self, batch: &mut Packets) -> io::Result<()> {
        self.0.recv(batch).await
    }
}

impl TunIo for RefusingTun {
    fn try_recv(&self, batch: &mut Packets) -> io::Result<()> {
        self.0.try_recv(batch)
    }
    async fn send(&self, _: &mut Packets) -> io::Result<()> {
        Err(io::Error::other("refused"))
    }
}

/// A TUN write that fails loses its packets, and the loss is counted in the snapshot (the
/// status's `tun_write_error`), not only logged. Before, it was logged at debug level only.
#[tokio::test]
async fn a_refused_tun_write_is_counted() {
    let net = Network::default();
    let (tun_a, _kernel_a) = channel::tun();
    let udp_a = net.bind("198.18.1.1:51820".parse().unwrap());
    let pair = run_pair(&net, [7, 8], RefusingTun(tun_a), udp_a);
    // B initiates; A answers, then decrypts the packet and fails to write it.
    let packet = test_packet([100, 64, 2, 1].into(), [100, 64, 1, 1].into(), b"ping");
    pair.kernel_b.tx.send(packet).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let counted = loop {
        let (tx, rx) = oneshot::channel();
        pair.cmd_a.send(Command::Status(tx)).await.unwrap();
        let snap = rx.await.unwrap();
        if snap.tun_write_errors > 0 || Instant::now() >= deadline {
            break snap.tun_write_errors;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(counted, 1, "the refused write is counted once");
    pair.stop().await;
}

/// Drivers a (198.18.1.1, pods 100.64.1.0/24, over the devices given) and b (198.18.1.2, pods
/// 100.64.2.0/24, in-memory devices) running over one in-memory network.
struct RunningPair {
    cmd_a: mpsc::Sender<Command>,
    _cmd_b: mpsc::Sender<Command>,
    kernel_b: channel::Kernel,
    stop: watch::Sender<bool>,
    handles: Vec<tokio::task::JoinHandle<io::Result<Router>>>,
}

fn run_pair<T, U>(net: &Network, keys: [u8; 2], tun_a: T, udp_a: U) -> RunningPair
where
    T: TunWait,
    U: crate::driver::UdpWait,
{
    let (ka, kb) = (
        StaticSecret::from([keys[0]; 32]),
        StaticSecret::from([keys[1]; 32]),
    );
    let a = Driver::new(
        router(&ka, &kb, "198.18.1.2:51820", "100.64.2.0/24"),
        tun_a,
        udp_a,
        Offload::AUTO,
    )
    .unwrap();
    let (tun_b, kernel_b) = channel::tun();
    let b = Driver::new(
        router(&kb, &ka, "198.18.1.1:51820", "100.64.1.0/24"),
        tun_b,
        net.bind("198.18.1.2:51820".parse().unwrap()),
        Offload::AUTO,
    )
    .unwrap();
    let (cmd_a, rx_a) = mpsc::channel(4);
    let (cmd_b, rx_b) = mpsc::channel(4);
    let (stop, stopped) = watch::channel(false);
    let handles = vec![
        tokio::spawn(a.run(rx_a, stopped.clone())),
        tokio::spawn(b.run(rx_b, stopped)),
    ];
    RunningPair {
        cmd_a,
        _cmd_b: cmd_b,
        kernel_b,
        stop,
        handles,
    }
}

impl RunningPair {
    /// Stops both drivers; each must end within 5 s, without a panic or an error.
    async fn stop(self) {
        self.stop.send(true).unwrap();
        for h in self.handles {
            tokio::time::timeout(Duration::from_secs(5), h)
                .await
                .expect("a driver stops")
                .expect("no panic")
                .expect("no error");
        }
    }
}
