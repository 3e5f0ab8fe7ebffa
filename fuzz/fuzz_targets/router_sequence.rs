//! Sequences over time, not one datagram on a fresh router: two routers with real WireGuard
//! sessions exchange pod traffic over an in-memory wire while the input decides, step by step,
//! the clock (milliseconds to minutes, so handshakes, rekeys, cookies under load and session
//! expiry all happen), which side sends, and what an on-path attacker does: drop, reorder,
//! flip a byte, replay something already delivered from its own address, or inject bytes of its
//! own from its address or spoofing a peer's.
//!
//! What must hold whatever the sequence:
//! - nothing panics;
//! - every packet written to a TUN device is one the other side's pod sent, and each at most
//!   once (no forgery, no replay gets through);
//! - neither router's endpoint for its peer ever becomes the attacker's address, and nothing
//!   but a cookie reply (type 3) is ever sent there: replays of delivered datagrams and forged
//!   bytes authenticate nothing;
//! - the wire stays bounded.
#![no_main]

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use weft_router::x25519::{PublicKey, StaticSecret};
use weft_router::testing::peer_config;
use weft_router::{NetAction, PeerConfig, Router, TunAction};

const WIRE_MAX: usize = 64;
const REPLAYS_MAX: usize = 64;

/// The fuzz input, read a little at a time.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.byte()?, self.byte()?]))
    }

    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        b
    }
}

struct Side {
    router: Router,
    addr: SocketAddr,
    pod: IpAddr,
    /// Inner packets this side's pod sent, by content, with how many are still undelivered.
    sent: HashMap<Vec<u8>, u32>,
}

struct World {
    sides: [Side; 2],
    /// (from, to side, datagram)
    wire: VecDeque<(SocketAddr, usize, Vec<u8>)>,
    /// Datagrams already taken in by their receiver, for the attacker to replay.
    delivered: Vec<(usize, Vec<u8>)>,
    attacker: SocketAddr,
    now: Instant,
    sequence: u64,
    buf: Vec<u8>,
}

fn side(seed: u8, addr: &str, pod: &str, peer_seed: u8, peer_addr: &str, peer_net: &str) -> Side {
    let mut router = Router::new(StaticSecret::from([seed; 32]), u32::from(seed) * 1000);
    let peer = PublicKey::from(&StaticSecret::from([peer_seed; 32])).to_bytes();
    let config = PeerConfig {
        persistent_keepalive: Some(25),
        ..peer_config(&format!("n{peer_seed}"), peer, Some(peer_addr), &[peer_net])
    };
    let _ = router.add_peer(Instant::now(), config);
    Side {
        router,
        addr: addr.parse().expect("address"),
        pod: pod.parse().expect("address"),
        sent: HashMap::new(),
    }
}

impl World {
    fn new() -> Self {
        Self {
            sides: [
                side(1, "198.18.1.1:51820", "100.64.1.9", 2, "198.18.1.2:51820", "100.64.2.0/24"),
                side(2, "198.18.1.2:51820", "100.64.2.9", 1, "198.18.1.1:51820", "100.64.1.0/24"),
            ],
            wire: VecDeque::new(),
            delivered: Vec::new(),
            attacker: "198.18.9.9:40000".parse().expect("address"),
            now: Instant::now(),
            sequence: 0,
            buf: vec![0; 65_600],
        }
    }

    fn side_of(&self, addr: SocketAddr) -> Option<usize> {
        self.sides.iter().position(|s| s.addr == addr)
    }

    /// A datagram `from` side `s` sent to `to`: onto the wire when it goes to the other side;
    /// to the attacker only a cookie reply may go.
    fn sent(&mut self, s: usize, to: SocketAddr, len: usize) {
        let datagram = self.buf[..len].to_vec();
        if to == self.attacker {
            assert_eq!(
                datagram.first(),
                Some(&3),
                "side {s} sent a datagram of type {:?} to the attacker",
                datagram.first()
            );
            return;
        }
        let Some(dest) = self.side_of(to) else {
            panic!("side {s} sent to an address no one has: {to}");
        };
        if self.wire.len() < WIRE_MAX {
            self.wire.push_back((self.sides[s].addr, dest, datagram));
        }
    }

    fn drain(&mut self, s: usize) {
        for _ in 0..256 {
            let now = self.now;
            let Some(t) = self.sides[s].router.poll_transmit(now, &mut self.buf) else {
                return;
            };
            self.sent(s, t.destination, t.len);
        }
    }

    /// Side `s`'s pod sends a packet (unique, by its sequence number) to the other side's pod.
    fn pod_sends(&mut self, s: usize, size: u16) {
        self.sequence += 1;
        let mut payload = self.sequence.to_be_bytes().to_vec();
        payload.resize(8 + usize::from(size % 1400), 0xab);
        let packet = weft_router::test_packet(self.sides[s].pod, self.sides[1 - s].pod, &payload);
        let now = self.now;
        match self.sides[s].router.handle_tun_packet(now, &packet, &mut self.buf) {
            TunAction::Transmit(t) => {
                *self.sides[s].sent.entry(packet).or_default() += 1;
                self.sent(s, t.destination, t.len);
            }
            TunAction::Queued => *self.sides[s].sent.entry(packet).or_default() += 1,
            TunAction::Dropped(_) => {}
            TunAction::Held(peer) => panic!("the single-caller input waited for a turn: {peer}"),
        }
        self.drain(s);
    }

    /// `datagram` arrives at side `to` from `from`.
    fn arrive(&mut self, from: SocketAddr, to: usize, datagram: &[u8], replayable: bool) {
        let now = self.now;
        let action = self.sides[to].router.handle_datagram(now, from, datagram, &mut self.buf);
        let taken = match action {
            NetAction::WriteTun(n) => {
                let packet = &self.buf[..n];
                let other = &mut self.sides[1 - to];
                let left = other.sent.get_mut(packet);
                match left {
                    Some(c) if *c > 0 => *c -= 1,
                    _ => panic!(
                        "side {to} wrote a packet its peer's pod did not send, or wrote it twice \
                         (from {from}, {n} bytes)"
                    ),
                }
                true
            }
            NetAction::Transmit(t) => {
                let cookie = self.buf.first() == Some(&3);
                self.sent(to, t.destination, t.len);
                !cookie
            }
            NetAction::Done => true,
            NetAction::Dropped(_) => false,
        };
        if replayable && taken && self.delivered.len() < REPLAYS_MAX {
            self.delivered.push((to, datagram.to_vec()));
        }
        self.drain(to);
        let attacker = self.attacker;
        for p in self.sides[to].router.peers(now) {
            assert_ne!(p.endpoint, Some(attacker), "side {to}'s peer endpoint moved to the attacker");
        }
    }

    fn step(&mut self, input: &mut Input<'_>) -> Option<()> {
        match input.byte()? % 10 {
            0 => {
                let t = input.u16()?;
                let d = if t & 1 == 0 {
                    Duration::from_millis(u64::from(t))
                } else {
                    Duration::from_secs(u64::from(t % 300))
                };
                self.now += d;
                for s in 0..2 {
                    let now = self.now;
                    self.sides[s].router.handle_timeout(now);
                    self.drain(s);
                }
            }
            op @ (1 | 2) => {
                let size = input.u16()?;
                self.pod_sends(usize::from(op - 1), size);
            }
            3 => {
                if let Some((from, to, d)) = self.wire.pop_front() {
                    self.arrive(from, to, &d, true);
                }
            }
            4 => {
                self.wire.pop_front();
            }
            5 => {
                if self.wire.len() >= 2 {
                    self.wire.swap(0, 1);
                }
            }
            6 => {
                let i = usize::from(input.byte()?);
                if !self.delivered.is_empty() {
                    let (to, d) = self.delivered[i % self.delivered.len()].clone();
                    let attacker = self.attacker;
                    self.arrive(attacker, to, &d, false);
                }
            }
            7 => {
                let how = input.byte()?;
                let len = usize::from(input.byte()?);
                let bytes = input.bytes(len).to_vec();
                let to = usize::from(how & 1);
                // From the attacker's address, or spoofing the other side's.
                let from = if how & 2 == 0 {
                    self.attacker
                } else {
                    self.sides[1 - to].addr
                };
                self.arrive(from, to, &bytes, false);
            }
            8 => {
                for s in 0..2 {
                    let now = self.now;
                    if self.sides[s]
                        .router
                        .poll_timeout()
                        .is_some_and(|t| t <= now)
                    {
                        self.sides[s].router.handle_timeout(now);
                    }
                    self.drain(s);
                }
            }
            _ => {
                let at = usize::from(input.byte()?);
                let bit = input.byte()? % 8;
                if let Some((from, to, mut d)) = self.wire.pop_front() {
                    if !d.is_empty() {
                        let i = at % d.len();
                        d[i] ^= 1 << bit;
                    }
                    self.arrive(from, to, &d, false);
                }
            }
        }
        Some(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut world = World::new();
    let mut input = Input(data);
    for _ in 0..4096 {
        if world.step(&mut input).is_none() {
            break;
        }
    }
});
