//! Two routers with real boringtun sessions, joined by an in-memory network: handshake, data both
//! ways (IPv4 and IPv6), and the untrusted-input paths through the real `Tunn`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;

use boringtun::x25519::{PublicKey, StaticSecret};

use crate::packet::test_packet;
use crate::testing::{ip, peer_config, sa};
use crate::{
    DropReason, Event, HOLD_LIMIT, NetAction, PeerConfig, PeerId, PeerState, Router, TunAction,
};

const A_ADDR: &str = "198.18.1.1:51820";
pub(super) const B_ADDR: &str = "198.18.1.2:51820";

fn peer(name: &str, key: &StaticSecret, endpoint: Option<&str>, allowed: &[&str]) -> PeerConfig {
    peer_config(name, PublicKey::from(key).to_bytes(), endpoint, allowed)
}

/// One side: a router, its address, and what it wrote to its TUN device.
pub(super) struct Node {
    pub(super) router: Router,
    addr: SocketAddr,
    tun: Vec<Vec<u8>>,
    drops: Vec<DropReason>,
}

/// Two nodes and the datagrams in flight between them.
pub(super) struct Pair {
    pub(super) a: Node,
    b: Node,
    a_id: PeerId,
    pub(super) b_id: PeerId,
    wire: VecDeque<(SocketAddr, SocketAddr, Vec<u8>)>,
    /// Every datagram that crossed the wire, for replay and inspection.
    seen: Vec<Vec<u8>>,
    now: Instant,
}

impl Pair {
    fn new() -> Self {
        let (ka, kb) = (StaticSecret::from([1; 32]), StaticSecret::from([2; 32]));
        let now = Instant::now();
        let mut a = Router::new(ka.clone(), 100);
        let mut b = Router::new(kb.clone(), 200);
        let b_id = a
            .add_peer(
                now,
                peer("b", &kb, Some(B_ADDR), &["100.64.2.0/24", "fd00:64:2::/64"]),
            )
            .expect("b");
        let a_id = b
            .add_peer(
                now,
                peer("a", &ka, Some(A_ADDR), &["100.64.1.0/24", "fd00:64:1::/64"]),
            )
            .expect("a");
        Self {
            a: Node {
                router: a,
                addr: sa(A_ADDR),
                tun: Vec::new(),
                drops: Vec::new(),
            },
            b: Node {
                router: b,
                addr: sa(B_ADDR),
                tun: Vec::new(),
                drops: Vec::new(),
            },
            a_id,
            b_id,
            wire: VecDeque::new(),
            seen: Vec::new(),
            now,
        }
    }

    /// A pair whose handshake completed: `payload` went from a's pod to b's and arrived.
    pub(super) fn connected(payload: &[u8]) -> Self {
        let mut p = Self::new();
        let _ = p.send(true, "100.64.1.1", "100.64.2.1", payload);
        p.settle();
        assert_eq!(
            p.b.tun.len(),
            1,
            "the handshake completed and the packet crossed"
        );
        p
    }

    /// The datagrams of `n` packets b's pod sends a's (100.64.2.1 to 100.64.1.1), in order and
    /// not delivered: for a worker around a's router to receive, from [`B_ADDR`].
    #[cfg(feature = "driver")]
    pub(super) fn datagrams_to_a(&mut self, n: usize) -> Vec<Vec<u8>> {
        let mut out = vec![0; 2048];
        (0..n)
            .map(|i| {
                let payload = [u8::try_from(i % 256).unwrap_or(0)];
                let pkt = test_packet(ip("100.64.2.1"), ip("100.64.1.1"), &payload);
                match self.b.router.handle_tun_packet(self.now, &pkt, &mut out) {
                    TunAction::Transmit(t) => out[..t.len].to_vec(),
                    other => panic!("b did not send its packet at once: {other:?}"),
                }
            })
            .collect()
    }

    fn node(&mut self, addr: SocketAddr) -> &mut Node {
        if addr == self.a.addr {
            &mut self.a
        } else {
            &mut self.b
        }
    }

    /// A packet enters `from`'s TUN device.
    fn send(&mut self, from_a: bool, src: &str, dst: &str, payload: &[u8]) -> TunAction {
        let pkt = test_packet(ip(src), ip(dst), payload);
        let now = self.now;
        let node = if from_a { &mut self.a } else { &mut self.b };
        let mut out = vec![0; 2048];
        let action = node.router.handle_tun_packet(now, &pkt, &mut out);
        let from = node.addr;
        if let TunAction::Transmit(t) = action {
            self.wire
                .push_back((from, t.destination, out[..t.len].to_vec()));
        }
        self.drain(from);
        action
    }

    /// Everything `addr`'s router wants sent now.
    fn drain(&mut self, addr: SocketAddr) {
        let now = self.now;
        let mut out = vec![0; 2048];
        let mut sends = Vec::new();
        let node = self.node(addr);
        while let Some(t) = node.router.poll_transmit(now, &mut out) {
            sends.push((addr, t.destination, out[..t.len].to_vec()));
        }
        self.wire.extend(sends);
    }

    /// Delivers one datagram, as if from `from`, to the node at `to`.
    fn deliver(&mut self, from: SocketAddr, to: SocketAddr, dgram: &[u8]) -> NetAction {
        let now = self.now;
        let mut out = vec![0; 2048];
        let node = self.node(to);
        let action = node.router.handle_datagram(now, from, dgram, &mut out);
        match action {
            NetAction::WriteTun(n) => node.tun.push(out[..n].to_vec()),
            NetAction::Dropped(r) => node.drops.push(r),
            NetAction::Transmit(t) => {
                self.wire
                    .push_back((to, t.destination, out[..t.len].to_vec()))
            }
            NetAction::Done => {}
        }
        self.drain(to);
        action
    }

    /// Runs the wire until nothing is in flight (bounded).
    fn settle(&mut self) {
        for _ in 0..100 {
            let Some((from, to, d)) = self.wire.pop_front() else {
                return;
            };
            self.seen.push(d.clone());
            let _ = self.deliver(from, to, &d);
        }
        panic!("the wire did not settle in 100 datagrams");
    }
}

#[test]
fn handshake_then_data_both_ways_v4_and_v6() {
    let mut p = Pair::new();
    // The first packet waits for the handshake, which the initiation on the wire starts.
    assert!(matches!(
        p.send(true, "100.64.1.1", "100.64.2.1", b"first"),
        TunAction::Transmit(_)
    ));
    assert_eq!(
        p.wire.front().map(|w| w.2[0]),
        Some(1),
        "a handshake initiation"
    );
    p.settle();
    assert_eq!(
        p.b.tun.len(),
        1,
        "the queued packet arrives after the handshake"
    );
    assert_eq!(
        p.b.tun[0],
        test_packet(ip("100.64.1.1"), ip("100.64.2.1"), b"first")
    );
    assert!(
        p.seen.iter().all(|d| (1..=4).contains(&d[0])),
        "only WireGuard messages on the wire"
    );
    assert!(
        p.seen.iter().all(|d| !d.windows(5).any(|w| w == b"first")),
        "payload never in clear"
    );

    assert!(matches!(
        p.send(false, "fd00:64:2::1", "fd00:64:1::1", b"six"),
        TunAction::Transmit(_)
    ));
    p.settle();
    assert_eq!(
        p.a.tun,
        vec![test_packet(ip("fd00:64:2::1"), ip("fd00:64:1::1"), b"six")]
    );

    for r in [&p.a.router, &p.b.router] {
        let s = &r.peers(p.now)[0];
        assert_eq!(s.state, PeerState::Up);
        assert!(s.last_handshake.is_some());
        assert!(s.counters.rx_bytes > 0 && s.counters.tx_bytes > 0);
    }
    let mut events = Vec::new();
    while let Some(e) = p.a.router.poll_event() {
        events.push(e);
    }
    assert!(
        events.contains(&Event::HandshakeCompleted { peer: p.b_id }),
        "{events:?}"
    );
    assert!(
        p.a.drops.is_empty() && p.b.drops.is_empty(),
        "{:?} {:?}",
        p.a.drops,
        p.b.drops
    );
}

#[test]
fn replayed_flipped_truncated_and_garbage_datagrams_are_dropped_and_counted() {
    let mut p = Pair::new();
    let _ = p.send(true, "100.64.1.1", "100.64.2.1", b"hello");
    p.settle();
    let _ = p.send(true, "100.64.1.1", "100.64.2.1", b"again");
    let (from, to, data) = p.wire.pop_front().expect("a data message");
    assert_eq!(data[0], 4);
    assert!(matches!(p.deliver(from, to, &data), NetAction::WriteTun(_)));
    assert_eq!(
        p.deliver(from, to, &data),
        NetAction::Dropped(DropReason::Replay)
    );
    // A fresh message (a new counter) with one ciphertext bit flipped.
    let _ = p.send(true, "100.64.1.1", "100.64.2.1", b"third");
    let (_, _, fresh) = p.wire.pop_front().expect("a data message");
    let mut flipped = fresh.clone();
    flipped[20] ^= 0x01;
    assert_eq!(
        p.deliver(from, to, &flipped),
        NetAction::Dropped(DropReason::Unauthenticated)
    );
    for n in [0, 1, 4, 15, 31] {
        assert_eq!(
            p.deliver(from, to, &data[..n]),
            NetAction::Dropped(DropReason::Malformed),
            "{n} bytes"
        );
    }
    assert_eq!(
        p.deliver(from, to, b"GET / HTTP/1.1\r\n\r\n"),
        NetAction::Dropped(DropReason::Malformed)
    );
    // A replayed handshake initiation (its timestamp is not newer).
    let init = p
        .seen
        .iter()
        .find(|d| d[0] == 1)
        .expect("an initiation")
        .clone();
    assert_eq!(
        p.deliver(from, to, &init),
        NetAction::Dropped(DropReason::Replay)
    );
    // Every other drop was counted against the peer or the router.
    let peer = &p.b.router.peers(p.now)[0];
    assert_eq!(peer.counters.drops.get(DropReason::Replay), 2);
    assert_eq!(peer.counters.drops.get(DropReason::Unauthenticated), 1);
    assert_eq!(p.b.router.drops().get(DropReason::Malformed), 6);
    assert_eq!(p.b.tun.len(), 2, "only the two genuine packets arrived");
}

#[test]
fn a_handshake_from_an_unknown_key_is_refused() {
    let mut p = Pair::new();
    let stranger_key = StaticSecret::from([9; 32]);
    let mut stranger = Router::new(stranger_key, 300);
    let b_key = StaticSecret::from([2; 32]);
    let now = p.now;
    stranger
        .add_peer(now, peer("b", &b_key, Some(B_ADDR), &["100.64.2.0/24"]))
        .expect("peer");
    let mut out = vec![0; 2048];
    let pkt = test_packet(ip("100.64.9.1"), ip("100.64.2.1"), b"let me in");
    let TunAction::Transmit(t) = stranger.handle_tun_packet(now, &pkt, &mut out) else {
        panic!("expected an initiation");
    };
    let init = out[..t.len].to_vec();
    assert_eq!(
        p.deliver(sa("198.18.1.9:51820"), sa(B_ADDR), &init),
        NetAction::Dropped(DropReason::UnknownPeer)
    );
    assert!(p.wire.is_empty(), "no response to a stranger");
    assert_eq!(p.b.router.drops().get(DropReason::UnknownPeer), 1);
}

#[test]
fn a_decrypted_packet_with_a_forged_source_is_not_delivered() {
    let mut p = Pair::connected(b"hello");
    // a sends from an address it does not own (b's own block, then an unowned one).
    for src in ["100.64.2.77", "100.65.0.1"] {
        let _ = p.send(true, src, "100.64.2.1", b"forged");
        p.settle();
    }
    assert_eq!(
        p.b.tun.len(),
        1,
        "forged packets never reach the TUN device"
    );
    let s = &p.b.router.peers(p.now)[0];
    assert_eq!(s.id, p.a_id);
    assert_eq!(s.counters.drops.get(DropReason::Spoofed), 2);
}

#[test]
fn roaming_follows_the_authenticated_sender() {
    let mut p = Pair::new();
    let _ = p.send(true, "100.64.1.1", "100.64.2.1", b"hello");
    p.settle();
    let _ = p.send(true, "100.64.1.1", "100.64.2.1", b"moved");
    let (_, to, data) = p.wire.pop_front().expect("data");
    let new_addr = sa("198.19.0.1:40000");
    assert!(matches!(
        p.deliver(new_addr, to, &data),
        NetAction::WriteTun(_)
    ));
    let s = &p.b.router.peers(p.now)[0];
    assert_eq!(s.endpoint, Some(new_addr));
    assert!(s.endpoint_learned);
}

/// Initiations replayed by an on-path attacker past the per-peer limit: the limiter answers
/// with cookies, and a cookie is not a handshake, so the endpoint stays and no handshake is
/// shown.
#[test]
fn replayed_initiations_under_load_neither_move_the_endpoint_nor_mark_a_handshake() {
    let mut p = Pair::new();
    let _ = p.send(true, "100.64.1.1", "100.64.2.1", b"hello");
    let (from, to, init) = p.wire.pop_front().expect("an initiation");
    assert_eq!(init[0], 1, "the first datagram is an initiation");
    // The genuine initiation arrives first, from A.
    assert!(matches!(p.deliver(from, to, &init), NetAction::Transmit(_)));
    let handshakes = |r: &mut Router| {
        std::iter::from_fn(|| r.poll_event())
            .filter(|e| matches!(e, Event::HandshakeCompleted { .. }))
            .count()
    };
    assert_eq!(handshakes(&mut p.b.router), 1, "the genuine initiation");
    let attacker = sa("198.19.0.66:4444");
    let mut out = vec![0u8; 2048];
    // Past both the per-peer limit boringtun would use alone (10) and the router's (1000).
    for _ in 0..1100 {
        let _ = p.b.router.handle_datagram(p.now, attacker, &init, &mut out);
    }
    let s = &p.b.router.peers(p.now)[0];
    assert_eq!(s.endpoint, Some(from), "the endpoint moved to the attacker");
    assert_eq!(
        handshakes(&mut p.b.router),
        0,
        "a replay showed a handshake"
    );
    assert!(
        s_drops(&p.b.router, p.now) > 0,
        "the limiter's answers are counted as rate limited"
    );
}

/// A node restarting in a mesh of hundreds meets every peer's initiation at once: a legitimate
/// burst, answered with handshake responses, not with cookies that cost each peer a 5 s retry.
#[test]
fn a_burst_of_initiations_from_hundreds_of_peers_is_answered_without_cookies() {
    let now = Instant::now();
    let kb = StaticSecret::from([2; 32]);
    let mut b = Router::new(kb.clone(), 200);
    let mut out = vec![0u8; 2048];
    // Each initiation counts once against the limit: until session 28 the router's check and
    // the session's counted it twice, and cookies began at the 501st.
    let n: u32 = 900;
    let mut cookies = 0;
    for i in 0..n {
        let mut bytes = [7u8; 32];
        // Bytes 1..5: X25519 clamping clears the low bits of byte 0.
        bytes[1..5].copy_from_slice(&(i + 10).to_le_bytes());
        let k = StaticSecret::from(bytes);
        let (hi, lo) = (i / 250, i % 250);
        let block = format!("100.65.{hi}.{lo}/32");
        b.add_peer(now, peer(&format!("p{i}"), &k, None, &[&block]))
            .expect("a peer");
        let mut t = boringtun::noise::Tunn::new(k, PublicKey::from(&kb), None, None, i, None);
        let init = match t.format_handshake_initiation(&mut out, false) {
            boringtun::noise::TunnResult::WriteToNetwork(d) => d.to_vec(),
            _ => panic!("no initiation"),
        };
        let from = sa(&format!("198.18.{}.{}:51820", 10 + hi, 1 + lo));
        match b.handle_datagram(now, from, &init, &mut out) {
            NetAction::Transmit(_) if out[0] == 2 => {}
            NetAction::Transmit(_) if out[0] == 3 => cookies += 1,
            other => panic!("initiation {i}: {other:?}"),
        }
    }
    assert_eq!(cookies, 0, "{cookies} of {n} peers were sent cookies");
}

/// A handshake initiation of `t`'s (with its cookie's MAC2 once it holds one).
fn initiation(t: &mut boringtun::noise::Tunn) -> Vec<u8> {
    let mut out = vec![0u8; 2048];
    match t.format_handshake_initiation(&mut out, true) {
        boringtun::noise::TunnResult::WriteToNetwork(d) => d.to_vec(),
        _ => panic!("no initiation"),
    }
}

/// Under load at `b`: `t`'s initiation from `from` is answered with a cookie, which `t` takes;
/// its next initiation, which carries the cookie's MAC2.
fn with_cookie(
    b: &Router,
    now: Instant,
    t: &mut boringtun::noise::Tunn,
    from: SocketAddr,
) -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
    let NetAction::Transmit(c) = b.handle_datagram(now, from, &initiation(t), &mut buf) else {
        panic!("no cookie reply under load");
    };
    assert_eq!(buf[0], 3, "a cookie reply");
    let mut scratch = vec![0u8; 2048];
    let _ = t.decapsulate(Some(from.ip()), &buf[..c.len], &mut scratch);
    initiation(t)
}

/// `b` under load at `now`: `HANDSHAKE_RATE_LIMIT` initiations of an unknown key, each from an
/// address of its own, each reaching its Diffie-Hellman.
fn load(b: &Router, now: Instant, init: &[u8]) {
    let mut buf = vec![0u8; 2048];
    for i in 0..crate::HANDSHAKE_RATE_LIMIT {
        let from = sa(&format!("198.18.{}.{}:51820", 20 + i / 250, 1 + i % 250));
        let r = b.handle_datagram(now, from, init, &mut buf);
        assert_eq!(r, NetAction::Dropped(DropReason::UnknownPeer), "{i}");
    }
}

/// Under load, a sender that holds a cookie (it receives at its address) gets only
/// `PER_SOURCE_LIMIT` handshake messages a second through to their Diffie-Hellman, however
/// many it sends; another sender is counted apart, the relay's shims (loopback) not at all,
/// and the share holds again in the next second.
#[test]
fn under_load_one_source_with_a_cookie_gets_only_its_share_of_diffie_hellmans() {
    let now = Instant::now();
    let kb = StaticSecret::from([2; 32]);
    let mut b = Router::new(kb.clone(), 200);
    // A peer, so that the router's timers (and its second) run.
    b.add_peer(
        now,
        peer("p", &StaticSecret::from([9; 32]), None, &["100.65.9.0/24"]),
    )
    .expect("a peer");
    let mut buf = vec![0u8; 2048];
    // Keys b does not know: each initiation passes the gate, then its Diffie-Hellman finds an
    // unknown key (counted), which is what a flood makes b spend.
    let tunn = |i: u8| {
        let k = StaticSecret::from([100 + i; 32]);
        boringtun::noise::Tunn::new(k, PublicKey::from(&kb), None, None, u32::from(i), None)
    };
    let (mut t, mut u, mut r) = (tunn(1), tunn(2), tunn(3));
    let first = initiation(&mut t);
    load(&b, now, &first);
    let dh = |b: &Router| b.drops().get(DropReason::UnknownPeer);
    assert_eq!(dh(&b), crate::HANDSHAKE_RATE_LIMIT);
    let (s1, s2) = (sa("198.18.7.7:51820"), sa("198.18.7.8:51820"));
    let shim = sa("127.0.0.1:40000");
    let flood = with_cookie(&b, now, &mut t, s1);
    let other = with_cookie(&b, now, &mut u, s2);
    let relayed = with_cookie(&b, now, &mut r, shim);
    let mut through = |b: &Router, now: Instant, from: SocketAddr, init: &[u8], n: u32| {
        let before = dh(b);
        for _ in 0..n {
            match b.handle_datagram(now, from, init, &mut buf) {
                NetAction::Dropped(DropReason::UnknownPeer | DropReason::RateLimited) => {}
                other => panic!("{other:?}"),
            }
        }
        dh(b) - before
    };
    let limit = u64::from(crate::PER_SOURCE_LIMIT);
    assert_eq!(
        through(&b, now, s1, &flood, 5000),
        limit,
        "of 5000 from one source"
    );
    // Another sender with its own cookie still gets through.
    assert_eq!(through(&b, now, s2, &other, 1), 1);
    // The relay's shims carry every relayed peer: not counted as one sender.
    assert_eq!(through(&b, now, shim, &relayed, 100), 100);
    // The next second: the count starts again, and so does each sender's share, whatever the
    // wall clock did meanwhile.
    b.handle_timeout(now + std::time::Duration::from_secs(1));
    let next = now + std::time::Duration::from_secs(1);
    load(&b, next, &first);
    assert_eq!(
        through(&b, next, s1, &flood, 5000),
        limit,
        "the next second"
    );
}

fn s_drops(r: &Router, now: Instant) -> u64 {
    r.peers(now)[0].counters.drops.get(DropReason::RateLimited)
        + r.drops().get(DropReason::RateLimited)
}

/// A relayed peer offered its direct address: one initiation goes to every probed address
/// while data stays on the relay, and the answer from the address that works moves the
/// session there without a new session being needed for the data in flight.
#[test]
fn a_probe_sends_one_initiation_to_each_address_and_the_path_that_answers_wins() {
    let mut p = Pair::connected(b"hello");
    let shim = sa("127.0.0.1:40001");
    p.a.router.set_endpoint(p.b_id, shim);
    let dead = sa("198.19.0.9:51820");
    p.a.router.probe(p.b_id, &[dead, sa(B_ADDR)]);
    p.drain(sa(A_ADDR));
    let probes: Vec<_> = p.wire.drain(..).collect();
    assert_eq!(
        probes.iter().map(|(_, to, _)| *to).collect::<Vec<_>>(),
        vec![dead, sa(B_ADDR)],
        "one datagram per address, in order"
    );
    assert!(
        probes
            .iter()
            .all(|(_, _, d)| d[0] == 1 && *d == probes[0].2)
    );
    // Data keeps going to the endpoint in use meanwhile.
    match p.send(true, "100.64.1.1", "100.64.2.1", b"still relayed") {
        TunAction::Transmit(t) => assert_eq!(t.destination, shim),
        other => panic!("not sent: {other:?}"),
    }
    p.wire.clear();
    // The dead address never answers; the direct one does.
    let _ = p.deliver(sa(A_ADDR), sa(B_ADDR), &probes[1].2);
    p.settle();
    let s = &p.a.router.peers(p.now)[0];
    assert_eq!((s.endpoint, s.endpoint_learned), (Some(sa(B_ADDR)), true));
    assert_eq!(
        s.config.endpoint,
        Some(shim),
        "the configuration is the control plane's"
    );
    let _ = p.send(true, "100.64.1.1", "100.64.2.1", b"direct");
    p.settle();
    assert_eq!(p.b.tun.last().map(|t| t.ends_with(b"direct")), Some(true));
    // A probe while a handshake is under way sends nothing.
    p.a.router.connect(p.b_id);
    p.drain(sa(A_ADDR));
    p.a.router.probe(p.b_id, &[dead]);
    p.drain(sa(A_ADDR));
    assert_eq!(
        p.wire.iter().filter(|(_, to, _)| *to == dead).count(),
        0,
        "{:?}",
        p.wire
            .iter()
            .map(|(_, to, d)| (to, d[0]))
            .collect::<Vec<_>>()
    );
}

#[test]
fn two_threads_encrypting_through_one_shared_router_lose_no_count_and_reuse_no_nonce() {
    let mut p = Pair::connected(b"first");
    let before = p.a.router.peers(p.now)[0].counters;
    const EACH: u32 = 500;
    // Two workers share `a` (`&Router` across threads) and send to the same peer at once.
    let (router, now) = (&p.a.router, p.now);
    let sent: Vec<Vec<Vec<u8>>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..2u8)
            .map(|w| {
                s.spawn(move || {
                    let mut out = vec![0; 2048];
                    (0..EACH)
                        .map(|seq| {
                            let mut body = vec![w; 200];
                            body[1..5].copy_from_slice(&seq.to_be_bytes());
                            let pkt = test_packet(ip("100.64.1.1"), ip("100.64.2.1"), &body);
                            match router.handle_tun_packet(now, &pkt, &mut out) {
                                TunAction::Transmit(t) => out[..t.len].to_vec(),
                                other => panic!("worker {w}, packet {seq}: {other:?}"),
                            }
                        })
                        .collect()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|h| h.join().expect("a worker panicked"))
            .collect()
    });
    let after = p.a.router.peers(p.now)[0].counters;
    assert_eq!(after.tx_packets - before.tx_packets, u64::from(2 * EACH));
    let bytes: usize = sent.iter().flatten().map(Vec::len).sum();
    assert_eq!(after.tx_bytes - before.tx_bytes, bytes as u64);
    // Every datagram decrypts at b (a reused counter would be refused as a replay), each
    // worker's in the order it sent them, whatever the interleaving.
    p.b.tun.clear();
    let (a_addr, b_addr) = (p.a.addr, p.b.addr);
    for (i, (zero, one)) in sent[0].iter().zip(&sent[1]).enumerate() {
        for (w, d) in [(1, one), (0, zero)] {
            let action = p.deliver(a_addr, b_addr, d);
            assert!(
                matches!(action, NetAction::WriteTun(_)),
                "worker {w}'s datagram {i}: {action:?}"
            );
        }
    }
    for w in 0..2u8 {
        let seqs: Vec<u32> =
            p.b.tun
                .iter()
                .filter(|pkt| pkt[20] == w)
                .map(|pkt| u32::from_be_bytes(pkt[21..25].try_into().expect("4 bytes")))
                .collect();
        assert_eq!(seqs, (0..EACH).collect::<Vec<_>>(), "worker {w}");
    }
}

/// Five workers share `a` and send to one peer, scheduled as badly as a busy machine can: each
/// encrypts a batch of up to 256 packets and sends it only when it must. What reaches b, per
/// worker and how many, with each worker's packets numbered in its payload. `turns`: the
/// workers use send turns (`handle_tun_packet_as`, `release`), as the driver does.
fn five_workers_one_peer(p: &mut Pair, turns: bool) -> [Vec<u32>; 5] {
    const WORKERS: usize = 5;
    const EACH: u32 = 600;
    const BATCH: usize = 256;
    let (a_addr, b_addr, now) = (p.a.addr, p.b.addr, p.now);
    let mut next = [0u32; WORKERS];
    let mut pending: [Vec<Vec<u8>>; WORKERS] = Default::default();
    let mut wire = Vec::new();
    let mut rng = 0x2545_f491_u32;
    // Bounded: every step encrypts a packet or sends a batch, and there are 3000 packets.
    for _ in 0..20_000 {
        if next.iter().all(|&n| n == EACH) {
            break;
        }
        rng ^= rng << 13;
        rng ^= rng >> 17;
        rng ^= rng << 5;
        let w = rng as usize % WORKERS;
        if next[w] == EACH {
            continue;
        }
        let mut body = vec![w as u8; 100];
        body[1..5].copy_from_slice(&next[w].to_be_bytes());
        let pkt = test_packet(ip("100.64.1.1"), ip("100.64.2.1"), &body);
        let mut out = vec![0; 2048];
        let action = if turns {
            p.a.router
                .handle_tun_packet_as(w as u16, now, &pkt, &mut out)
        } else {
            p.a.router.handle_tun_packet(now, &pkt, &mut out)
        };
        let must_send = match action {
            TunAction::Transmit(t) => {
                pending[w].push(out[..t.len].to_vec());
                next[w] += 1;
                // Worker 0 is the one the scheduler starves: it sends only when it must.
                pending[w].len() == BATCH || (w != 0 && rng % 7 == 0)
            }
            TunAction::Held(_) => true,
            other => panic!("worker {w}: {other:?}"),
        };
        if must_send || next[w] == EACH {
            wire.append(&mut pending[w]);
            if turns {
                p.a.router.release(w as u16, p.b_id);
            }
        }
    }
    for batch in &mut pending {
        wire.append(batch);
    }
    p.b.tun.clear();
    for d in &wire {
        let _ = p.deliver(a_addr, b_addr, d);
    }
    std::array::from_fn(|w| {
        p.b.tun
            .iter()
            .filter(|pkt| usize::from(pkt[20]) == w)
            .map(|pkt| u32::from_be_bytes(pkt[21..25].try_into().expect("4 bytes")))
            .collect()
    })
}

#[test]
fn workers_sharing_a_peer_send_in_counter_order_so_its_replay_window_drops_nothing() {
    let mut p = Pair::connected(b"first");
    let got = five_workers_one_peer(&mut p, true);
    for (w, seqs) in got.iter().enumerate() {
        assert_eq!(*seqs, (0..600).collect::<Vec<_>>(), "worker {w}");
    }
    assert!(p.b.drops.is_empty(), "b dropped {:?}", p.b.drops);
    assert_eq!(p.a.router.takeovers(), 0);
    // The same schedule without turns loses a starved worker's batches to the window: the
    // schedule is one that needs them.
    let without = five_workers_one_peer(&mut p, false);
    let lost = 5 * 600 - without.iter().map(Vec::len).sum::<usize>();
    assert!(lost > 0, "nothing lost without turns");
    assert!(p.b.drops.contains(&DropReason::Replay), "{:?}", p.b.drops);
}

/// `has_output` says when a datagram's handling queued output (a peer to flush after a
/// handshake, an event) and, once that is all polled, that nothing is left; a data message,
/// which queues nothing, leaves it false. Workers take the write lock only on its word.
#[test]
fn has_output_reports_what_a_datagram_queued_until_it_is_polled() {
    let mut p = Pair::new();
    let mut out = vec![0; 2048];
    let drained = |r: &mut Router, out: &mut [u8]| {
        while r.poll_transmit(p.now, out).is_some() {}
        while r.poll_event().is_some() {}
        !r.has_output()
    };
    // `pkt` encrypted at `from` (which must send it at once) and handed to `to` as sent from
    // `source`, both at `now`: what `to` made of it.
    let cross = |now, from: &Router, to: &Router, source: &str, pkt: &[u8], out: &mut [u8]| {
        let TunAction::Transmit(t) = from.handle_tun_packet(now, pkt, out) else {
            panic!("the packet is not sent at once");
        };
        let datagram = out[..t.len].to_vec();
        to.handle_datagram(now, sa(source), &datagram, out)
    };
    assert!(drained(&mut p.b.router, &mut out), "b starts with nothing");
    let pkt = test_packet(ip("100.64.1.1"), ip("100.64.2.1"), b"first");
    // The first packet's action is a's initiation.
    let answer = cross(p.now, &p.a.router, &p.b.router, A_ADDR, &pkt, &mut out);
    assert!(matches!(answer, NetAction::Transmit(_)), "{answer:?}");
    assert!(p.b.router.has_output(), "b queued its flush and events");
    while p.b.router.poll_transmit(p.now, &mut out).is_some() {}
    assert!(p.b.router.has_output(), "the events are still queued");
    assert!(matches!(
        p.b.router.poll_event(),
        Some(Event::HandshakeCompleted { .. } | Event::EndpointChanged { .. })
    ));
    assert!(drained(&mut p.b.router, &mut out), "all polled");
    // A data message, once the session is up, queues nothing.
    let mut p = Pair::connected(b"up");
    assert!(drained(&mut p.a.router, &mut out));
    let pkt = test_packet(ip("100.64.2.1"), ip("100.64.1.1"), b"data");
    let got = cross(p.now, &p.b.router, &p.a.router, B_ADDR, &pkt, &mut out);
    assert!(matches!(got, NetAction::WriteTun(_)), "{got:?}");
    assert!(!p.a.router.has_output(), "a data message queued nothing");
    // The same peer from a new address (it roamed): the endpoint's change is an event.
    let roamed = "198.18.1.22:51820";
    let got = cross(p.now, &p.b.router, &p.a.router, roamed, &pkt, &mut out);
    assert!(matches!(got, NetAction::WriteTun(_)), "{got:?}");
    assert!(p.a.router.has_output(), "the roam's event is reported");
    assert!(matches!(
        p.a.router.poll_event(),
        Some(Event::EndpointChanged { endpoint, .. }) if endpoint == sa(roamed)
    ));
    assert!(drained(&mut p.a.router, &mut out), "all polled");
}

/// Packets from the device queue no output, whatever the session's state: the first
/// starts a handshake (its initiation is the action), the next waits in the session, and once
/// the session is up each is sent at once. A worker relies on it and does not ask the router
/// for output after TUN packets.
#[test]
fn packets_from_the_device_queue_no_output_before_during_or_after_a_handshake() {
    let mut p = Pair::new();
    let mut out = vec![0; 2048];
    while p.a.router.poll_transmit(p.now, &mut out).is_some() {}
    while p.a.router.poll_event().is_some() {}
    let pkt = test_packet(ip("100.64.1.1"), ip("100.64.2.1"), b"x");
    let mut send = |r: &Router, want: &str| {
        let action = r.handle_tun_packet(p.now, &pkt, &mut out);
        assert!(!r.has_output(), "{want}: {action:?} queued output");
        (action, out[0])
    };
    let (first, kind) = send(&p.a.router, "no session");
    assert!(
        matches!(first, TunAction::Transmit(_)) && kind == 1,
        "{first:?}"
    );
    let (waits, _) = send(&p.a.router, "handshake in flight");
    assert_eq!(waits, TunAction::Queued);
    let mut p = Pair::connected(b"up");
    while p.a.router.poll_transmit(p.now, &mut out).is_some() {}
    while p.a.router.poll_event().is_some() {}
    let up = p.a.router.handle_tun_packet(p.now, &pkt, &mut out);
    assert!(matches!(up, TunAction::Transmit(_)), "{up:?}");
    assert!(!p.a.router.has_output(), "session up: {up:?} queued output");
}

#[test]
fn a_send_turn_held_past_the_limit_is_taken_over_and_a_late_release_leaves_it() {
    let p = Pair::connected(b"first");
    let (router, now, b) = (&p.a.router, p.now, p.b_id);
    let pkt = test_packet(ip("100.64.1.1"), ip("100.64.2.1"), b"x");
    let mut out = vec![0; 2048];
    let mut as_worker = |w: u16, at| router.handle_tun_packet_as(w, at, &pkt, &mut out);
    assert!(matches!(as_worker(0, now), TunAction::Transmit(t) if t.peer == Some(b)));
    // Worker 0 holds b's turn: another worker waits, the holder goes on.
    assert_eq!(as_worker(1, now), TunAction::Held(b));
    assert!(matches!(as_worker(0, now), TunAction::Transmit(_)));
    let almost = now + HOLD_LIMIT - std::time::Duration::from_micros(1);
    assert_eq!(as_worker(1, almost), TunAction::Held(b));
    assert_eq!(router.takeovers(), 0);
    // Past the limit worker 0 counts as stalled: worker 1 takes the turn over.
    let late = now + HOLD_LIMIT;
    assert!(matches!(as_worker(1, late), TunAction::Transmit(_)));
    assert_eq!(router.takeovers(), 1);
    // Worker 0's late release does not give back worker 1's turn.
    router.release(0, b);
    assert_eq!(as_worker(2, late), TunAction::Held(b));
    router.release(1, b);
    assert!(matches!(as_worker(2, late), TunAction::Transmit(_)));
    // The single-caller input neither waits for turns nor takes them.
    assert!(matches!(
        router.handle_tun_packet(late, &pkt, &mut vec![0; 2048]),
        TunAction::Transmit(_)
    ));
    assert_eq!(as_worker(3, late), TunAction::Held(b));
}

#[test]
fn a_peers_prefixes_change_in_place_with_its_session_and_counters_kept() {
    let mut p = Pair::connected(b"before");
    let before = p.a.router.peers(p.now)[0].clone();
    let initiations = p.seen.iter().filter(|d| d[0] == 1).count();
    let later = std::time::Duration::from_secs(2);
    p.now += later;
    // b gives up 100.64.2.0/24 and claims 100.64.3.0/24: a routes the new block to b at once.
    p.a.router
        .set_allowed_ips(p.b_id, vec!["100.64.3.0/24".parse().unwrap()])
        .expect("in place");
    assert_eq!(
        p.send(true, "100.64.1.1", "100.64.2.1", b"old"),
        TunAction::Dropped(DropReason::NoRoute),
        "the block given up is no longer b's"
    );
    assert!(matches!(
        p.send(true, "100.64.1.1", "100.64.3.1", b"new"),
        TunAction::Transmit(_)
    ));
    p.settle();
    assert_eq!(
        p.b.tun.last(),
        Some(&test_packet(ip("100.64.1.1"), ip("100.64.3.1"), b"new"))
    );
    assert_eq!(
        p.seen.iter().filter(|d| d[0] == 1).count(),
        initiations,
        "no new handshake"
    );
    // From b, a takes the new block's sources and drops the old one's as spoofed.
    let _ = p.send(false, "100.64.3.1", "100.64.1.1", b"from the new block");
    let _ = p.send(false, "100.64.2.1", "100.64.1.1", b"from the old block");
    p.settle();
    assert_eq!(
        p.a.tun,
        [test_packet(
            ip("100.64.3.1"),
            ip("100.64.1.1"),
            b"from the new block"
        )]
    );
    assert_eq!(p.a.drops, [DropReason::Spoofed]);
    let after = p.a.router.peers(p.now)[0].clone();
    assert_eq!(after.id, before.id);
    assert_eq!(
        after.last_handshake,
        before.last_handshake.map(|d| d + later),
        "the handshake before the change is still the last"
    );
    assert!(
        after.counters.tx_bytes > before.counters.tx_bytes,
        "counters kept"
    );
    assert_eq!(
        after.config.allowed_ips,
        vec!["100.64.3.0/24".parse::<ipnet::IpNet>().unwrap()]
    );
}

#[test]
fn a_prefix_another_peer_holds_or_an_unknown_peer_is_refused_and_nothing_changes() {
    let mut p = Pair::connected(b"before");
    let kc = StaticSecret::from([3; 32]);
    p.a.router
        .add_peer(p.now, peer("c", &kc, None, &["100.64.9.0/24"]))
        .expect("c");
    let r = p.a.router.set_allowed_ips(
        p.b_id,
        vec![
            "100.64.4.0/24".parse().unwrap(),
            "100.64.9.0/24".parse().unwrap(),
        ],
    );
    assert!(
        matches!(&r, Err(crate::PeerError::PrefixTaken { owner, .. }) if owner == "c"),
        "{r:?}"
    );
    // Neither half applied: b keeps its block, the new one is nobody's.
    assert!(matches!(
        p.send(true, "100.64.1.1", "100.64.2.1", b"still b's"),
        TunAction::Transmit(_)
    ));
    assert_eq!(
        p.send(true, "100.64.1.1", "100.64.4.1", b"nobody's"),
        TunAction::Dropped(DropReason::NoRoute)
    );
    let gone = PeerId::new(0x00ab_cdef);
    assert_eq!(
        p.a.router.set_allowed_ips(gone, vec![]),
        Err(crate::PeerError::NoSuchPeer(gone))
    );
}
