//! The router's own logic on a fake tunnel: routing, anti-spoofing, roaming, plaintext, timers,
//! batching.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use boringtun::x25519::StaticSecret;

use super::fake::{FakeTunnel, Shared, TAG, Timer, data_message};
use crate::packet::test_packet;
use crate::plaintext;
use crate::testing::{ip, peer_config, sa};
use crate::{
    DropReason, Event, NetAction, PathKind, PeerConfig, PeerId, PeerState, Router, TIMER_TICK,
    TunAction,
};

const BUF: usize = 2048;

fn config(name: &str, key: u8, endpoint: Option<&str>, allowed: &[&str]) -> PeerConfig {
    peer_config(name, [key; 32], endpoint, allowed)
}

struct Lab {
    router: Router,
    now: Instant,
    out: Vec<u8>,
}

impl Lab {
    fn new() -> Self {
        Self {
            router: Router::new(StaticSecret::from([7; 32]), 0),
            now: Instant::now(),
            out: vec![0; BUF],
        }
    }

    fn add(&mut self, cfg: PeerConfig, remote_idx: u32) -> (PeerId, Arc<Mutex<Shared>>) {
        let (t, shared) = FakeTunnel::new(remote_idx);
        let id = self
            .router
            .add_peer_with(self.now, cfg, Box::new(t))
            .expect("add peer");
        (id, shared)
    }

    fn tun(&mut self, src: &str, dst: &str, payload: &[u8]) -> TunAction {
        let p = test_packet(ip(src), ip(dst), payload);
        self.router.handle_tun_packet(self.now, &p, &mut self.out)
    }

    fn net(&mut self, from: &str, dgram: &[u8]) -> NetAction {
        self.router
            .handle_datagram(self.now, sa(from), dgram, &mut self.out)
    }

    fn peer(&self, id: PeerId) -> crate::PeerStatus {
        self.router
            .peers(self.now)
            .into_iter()
            .find(|p| p.id == id)
            .expect("peer exists")
    }
}

#[test]
fn longest_prefix_picks_the_more_specific_peer() {
    let mut lab = Lab::new();
    let (wide, _) = lab.add(
        config("wide", 1, Some("198.18.1.2:51820"), &["100.64.0.0/16"]),
        9,
    );
    let (narrow, _) = lab.add(
        config("narrow", 2, Some("198.18.1.3:51820"), &["100.64.7.0/24"]),
        9,
    );
    let TunAction::Transmit(t) = lab.tun("100.64.1.1", "100.64.7.9", b"to narrow") else {
        panic!("expected a transmit");
    };
    assert_eq!(t.destination, sa("198.18.1.3:51820"));
    // The datagram carries the packet, framed as a data message.
    assert_eq!(lab.out[0], 4);
    assert_eq!(&lab.out[t.len - 16..t.len], &TAG);
    let TunAction::Transmit(t) = lab.tun("100.64.1.1", "100.64.8.9", b"to wide") else {
        panic!("expected a transmit");
    };
    assert_eq!(t.destination, sa("198.18.1.2:51820"));
    assert_eq!(lab.peer(narrow).counters.tx_packets, 1);
    assert_eq!(lab.peer(wide).counters.tx_packets, 1);
}

#[test]
fn ipv6_prefixes_route_too() {
    let mut lab = Lab::new();
    let (id, _) = lab.add(
        config("v6", 1, Some("[2001:db8::2]:51820"), &["fd00:64:2::/64"]),
        9,
    );
    let a = lab.tun("fd00:64:1::1", "fd00:64:2::5", b"six");
    assert!(matches!(a, TunAction::Transmit(t) if t.destination == sa("[2001:db8::2]:51820")));
    assert_eq!(lab.peer(id).counters.tx_packets, 1);
    assert_eq!(
        lab.tun("fd00:64:1::1", "fd00:64:3::5", b"six"),
        TunAction::Dropped(DropReason::NoRoute)
    );
}

#[test]
fn unroutable_unknown_and_endpointless_are_counted_drops() {
    let mut lab = Lab::new();
    let (roamer, _) = lab.add(config("roamer", 1, None, &["100.64.9.0/24"]), 9);
    assert_eq!(
        lab.tun("100.64.1.1", "100.65.0.1", b"x"),
        TunAction::Dropped(DropReason::NoRoute)
    );
    assert_eq!(
        lab.tun("100.64.1.1", "100.64.9.1", b"x"),
        TunAction::Dropped(DropReason::NoEndpoint)
    );
    let garbage = [0x45u8; 3];
    assert_eq!(
        lab.router
            .handle_tun_packet(lab.now, &garbage, &mut lab.out),
        TunAction::Dropped(DropReason::BadInnerPacket)
    );
    assert_eq!(lab.router.drops().get(DropReason::NoRoute), 1);
    assert_eq!(lab.router.drops().get(DropReason::BadInnerPacket), 1);
    assert_eq!(
        lab.peer(roamer).counters.drops.get(DropReason::NoEndpoint),
        1
    );
    assert_eq!(lab.peer(roamer).state, PeerState::Down);
}

#[test]
fn inner_source_outside_the_senders_prefixes_is_dropped_as_spoofed() {
    let mut lab = Lab::new();
    let (a, _) = lab.add(
        config("a", 1, Some("198.18.1.2:51820"), &["100.64.2.0/24"]),
        9,
    );
    let (b, _) = lab.add(
        config("b", 2, Some("198.18.1.3:51820"), &["100.64.3.0/24"]),
        9,
    );
    let a_idx = a.index() << 8;
    // From a, claiming b's address, and claiming an address nobody owns.
    for (ctr, src) in [(0, "100.64.3.7"), (1, "100.65.0.1")] {
        let inner = test_packet(ip(src), ip("100.64.1.1"), b"forged");
        let d = data_message(a_idx, ctr, &inner);
        assert_eq!(
            lab.net("198.18.1.2:51820", &d),
            NetAction::Dropped(DropReason::Spoofed)
        );
    }
    // Its own address passes.
    let inner = test_packet(ip("100.64.2.7"), ip("100.64.1.1"), b"honest");
    let d = data_message(a_idx, 2, &inner);
    assert_eq!(
        lab.net("198.18.1.2:51820", &d),
        NetAction::WriteTun(inner.len())
    );
    assert_eq!(&lab.out[..inner.len()], &inner[..]);
    let sa_ = lab.peer(a);
    assert_eq!(sa_.counters.drops.get(DropReason::Spoofed), 2);
    assert_eq!(sa_.counters.rx_packets, 1);
    assert_eq!(lab.peer(b).counters.rx_packets, 0);
}

#[test]
fn bad_tags_replays_garbage_and_unknown_indexes_are_counted() {
    let mut lab = Lab::new();
    let (a, _) = lab.add(
        config("a", 1, Some("198.18.1.2:51820"), &["100.64.2.0/24"]),
        9,
    );
    let inner = test_packet(ip("100.64.2.7"), ip("100.64.1.1"), b"payload");
    let good = data_message(a.index() << 8, 0, &inner);
    assert_eq!(
        lab.net("198.18.1.2:51820", &good),
        NetAction::WriteTun(inner.len())
    );
    assert_eq!(
        lab.net("198.18.1.2:51820", &good),
        NetAction::Dropped(DropReason::Replay)
    );
    let mut flipped = data_message(a.index() << 8, 1, &inner);
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    assert_eq!(
        lab.net("198.18.1.2:51820", &flipped),
        NetAction::Dropped(DropReason::Unauthenticated)
    );
    let stranger = data_message(0x00ab_cd00, 0, &inner);
    assert_eq!(
        lab.net("198.18.1.2:51820", &stranger),
        NetAction::Dropped(DropReason::UnknownPeer)
    );
    for junk in [&b""[..], b"\x04", b"hello world", &[1u8; 147], &good[..20]] {
        assert_eq!(
            lab.net("198.18.1.2:51820", junk),
            NetAction::Dropped(DropReason::Malformed)
        );
    }
    let p = lab.peer(a);
    assert_eq!(p.counters.drops.get(DropReason::Replay), 1);
    assert_eq!(p.counters.drops.get(DropReason::Unauthenticated), 1);
    assert_eq!(p.counters.rx_packets, 1);
    assert_eq!(lab.router.drops().get(DropReason::UnknownPeer), 1);
    assert_eq!(lab.router.drops().get(DropReason::Malformed), 5);
}

#[test]
fn endpoint_roams_only_with_authenticated_packets() {
    let mut lab = Lab::new();
    let (a, _) = lab.add(
        config("a", 1, Some("198.18.1.2:51820"), &["100.64.2.0/24"]),
        9,
    );
    let inner = test_packet(ip("100.64.2.7"), ip("100.64.1.1"), b"x");
    // A forged packet from a new address does not move the endpoint.
    let mut forged = data_message(a.index() << 8, 0, &inner);
    forged[20] ^= 0xff;
    let bad_tag_pos = forged.len() - 1;
    forged[bad_tag_pos] ^= 1;
    let _ = lab.net("198.19.0.66:4000", &forged);
    assert_eq!(lab.peer(a).endpoint, Some(sa("198.18.1.2:51820")));
    assert_eq!(lab.router.poll_event(), None);
    // An authenticated one does, and the next packet goes there.
    let d = data_message(a.index() << 8, 1, &inner);
    assert_eq!(
        lab.net("198.19.0.66:4000", &d),
        NetAction::WriteTun(inner.len())
    );
    let s = lab.peer(a);
    assert_eq!(s.endpoint, Some(sa("198.19.0.66:4000")));
    assert!(s.endpoint_learned);
    assert_eq!(
        lab.router.poll_event(),
        Some(Event::EndpointChanged {
            peer: a,
            endpoint: sa("198.19.0.66:4000")
        })
    );
    let t = lab.tun("100.64.1.1", "100.64.2.7", b"reply");
    assert!(matches!(t, TunAction::Transmit(t) if t.destination == sa("198.19.0.66:4000")));
    // IPv4-mapped IPv6 senders (a dual-stack socket) are the same address.
    let d = data_message(a.index() << 8, 2, &inner);
    let _ = lab.net("[::ffff:198.19.0.66]:4000", &d);
    assert_eq!(lab.peer(a).endpoint, Some(sa("198.19.0.66:4000")));
}

#[test]
fn plaintext_peers_are_known_by_address_and_checked_for_spoofing() {
    let mut lab = Lab::new();
    let mut cfg = config("trusted", 3, Some("198.18.1.4:51820"), &["100.64.4.0/24"]);
    cfg.path = PathKind::Plaintext;
    let id = lab.router.add_peer(lab.now, cfg).expect("plaintext peer");
    let t = lab.tun("100.64.1.1", "100.64.4.2", b"clear");
    let TunAction::Transmit(t) = t else {
        panic!("expected a transmit, got {t:?}")
    };
    assert_eq!(t.destination, sa("198.18.1.4:51820"));
    assert_eq!(&lab.out[..2], &plaintext::MAGIC);
    let mut dgram = vec![0; 64];
    let inner = test_packet(ip("100.64.4.2"), ip("100.64.1.1"), b"back");
    let n = plaintext::encode(&inner, &mut dgram).expect("fits");
    assert_eq!(
        lab.net("198.18.1.4:51820", &dgram[..n]),
        NetAction::WriteTun(inner.len())
    );
    assert_eq!(&lab.out[..inner.len()], &inner[..]);
    assert_eq!(lab.peer(id).state, PeerState::Up);
    // Same bytes from an address that is not a plaintext peer's.
    assert_eq!(
        lab.net("198.18.1.99:51820", &dgram[..n]),
        NetAction::Dropped(DropReason::WrongPath)
    );
    // A spoofed inner source from the right address.
    let forged = test_packet(ip("100.64.9.9"), ip("100.64.1.1"), b"forged");
    let n = plaintext::encode(&forged, &mut dgram).expect("fits");
    assert_eq!(
        lab.net("198.18.1.4:51820", &dgram[..n]),
        NetAction::Dropped(DropReason::Spoofed)
    );
    // A WireGuard message for the plaintext peer's index.
    let d = data_message(id.index() << 8, 0, &inner);
    assert_eq!(
        lab.net("198.18.1.4:51820", &d),
        NetAction::Dropped(DropReason::WrongPath)
    );
    // A truncated plaintext header.
    assert_eq!(
        lab.net("198.18.1.4:51820", &plaintext::MAGIC),
        NetAction::Dropped(DropReason::Malformed)
    );
}

/// A plaintext peer "trusted" at 198.18.1.4:51820 owning 100.64.4.0/24, and one of its
/// datagrams (a packet from its prefix): (peer, datagram buffer, datagram length, inner packet).
fn trusted_peer(lab: &mut Lab) -> (PeerId, Vec<u8>, usize, Vec<u8>) {
    let mut cfg = config("trusted", 3, Some("198.18.1.4:51820"), &["100.64.4.0/24"]);
    cfg.path = PathKind::Plaintext;
    let id = lab.router.add_peer(lab.now, cfg).expect("plaintext peer");
    let mut dgram = vec![0; 64];
    let inner = test_packet(ip("100.64.4.2"), ip("100.64.1.1"), b"back");
    let n = plaintext::encode(&inner, &mut dgram).expect("fits");
    (id, dgram, n, inner)
}

#[test]
fn plaintext_is_accepted_only_from_the_peers_exact_endpoint_and_a_spoof_changes_nothing() {
    let mut lab = Lab::new();
    let (id, mut dgram, n, inner) = trusted_peer(&mut lab);
    // The peer's address, another port (any process on that host, or a spoofer guessing).
    assert_eq!(
        lab.net("198.18.1.4:40000", &dgram[..n]),
        NetAction::Dropped(DropReason::WrongPath)
    );
    let s = lab.peer(id);
    assert_eq!(
        s.counters.rx_bytes, 0,
        "a refused datagram is not counted as received"
    );
    assert_ne!(
        s.state,
        PeerState::Up,
        "a refused datagram does not mark the peer up"
    );
    // A forged inner source from the right endpoint: refused, and the peer is still not up.
    let forged = test_packet(ip("100.64.9.9"), ip("100.64.1.1"), b"forged");
    let m = plaintext::encode(&forged, &mut dgram).expect("fits");
    assert_eq!(
        lab.net("198.18.1.4:51820", &dgram[..m]),
        NetAction::Dropped(DropReason::Spoofed)
    );
    assert_ne!(lab.peer(id).state, PeerState::Up);
    // The exact endpoint with a source of its prefix: accepted.
    let n = plaintext::encode(&inner, &mut dgram).expect("fits");
    assert_eq!(
        lab.net("198.18.1.4:51820", &dgram[..n]),
        NetAction::WriteTun(inner.len())
    );
    assert_eq!(lab.peer(id).state, PeerState::Up);
}

#[test]
fn an_authenticated_packet_from_a_trusted_peers_address_does_not_move_an_endpoint_there() {
    let mut lab = Lab::new();
    let (_, dgram, n, inner) = trusted_peer(&mut lab);
    let (m, _) = lab.add(
        config("m", 5, Some("198.18.1.9:51820"), &["100.64.5.0/24"]),
        9,
    );
    // One authenticated keepalive of m's, its source the trusted peer's address (spoofed by
    // m, or a captured packet of m's sent first by someone on the path): taken as m's, but
    // m's endpoint stays where it was.
    let keepalive = data_message(m.index() << 8, 0, &[]);
    assert_eq!(lab.net("198.18.1.4:9999", &keepalive), NetAction::Done);
    assert_eq!(lab.peer(m).endpoint, Some(sa("198.18.1.9:51820")));
    // So the trusted peer's plaintext still goes through.
    assert_eq!(
        lab.net("198.18.1.4:51820", &dgram[..n]),
        NetAction::WriteTun(inner.len())
    );
    // From anywhere else, m's endpoint follows it as before.
    let keepalive = data_message(m.index() << 8, 1, &[]);
    assert_eq!(lab.net("198.18.1.10:51820", &keepalive), NetAction::Done);
    assert_eq!(lab.peer(m).endpoint, Some(sa("198.18.1.10:51820")));
}

#[test]
fn plaintext_is_refused_from_an_address_that_has_a_wireguard_session() {
    let mut lab = Lab::new();
    let (id, dgram, n, inner) = trusted_peer(&mut lab);
    assert_eq!(
        lab.net("198.18.1.4:51820", &dgram[..n]),
        NetAction::WriteTun(inner.len()),
        "accepted while no WireGuard peer is at that address"
    );
    // A WireGuard peer (here a configured one) is pointed at the same address: that address
    // speaks WireGuard now, and plaintext from it is refused.
    let (wg, _) = lab.add(
        config("laptop", 5, Some("198.18.1.9:51820"), &["100.64.5.0/24"]),
        9,
    );
    lab.router.set_endpoint(wg, sa("198.18.1.4:51820"));
    assert_eq!(
        lab.net("198.18.1.4:51820", &dgram[..n]),
        NetAction::Dropped(DropReason::WrongPath)
    );
    // Moved away again: plaintext from the trusted peer is accepted once more.
    lab.router.set_endpoint(wg, sa("198.18.1.9:51820"));
    assert_eq!(
        lab.net("198.18.1.4:51820", &dgram[..n]),
        NetAction::WriteTun(inner.len())
    );
    // Removed while at that address: nothing is left of it in the refusal.
    lab.router.set_endpoint(wg, sa("198.18.1.4:51820"));
    lab.router.remove_peer(wg);
    assert_eq!(
        lab.net("198.18.1.4:51820", &dgram[..n]),
        NetAction::WriteTun(inner.len())
    );
    assert_eq!(lab.peer(id).state, PeerState::Up);
}

#[test]
fn an_endpoint_move_from_where_the_caller_saw_the_peer_is_dropped_once_the_peer_roamed() {
    let mut lab = Lab::new();
    let (wg, _) = lab.add(
        config("laptop", 5, Some("198.18.1.9:51820"), &["100.64.5.0/24"]),
        9,
    );
    let (seen, shim, roamed) = (
        sa("198.18.1.9:51820"),
        sa("127.0.0.1:40001"),
        sa("198.18.1.7:51820"),
    );
    // It roamed after the caller looked: the newer endpoint stands.
    lab.router.set_endpoint(wg, roamed);
    assert!(!lab.router.move_endpoint(wg, seen, shim));
    assert_eq!(lab.peer(wg).endpoint, Some(roamed));
    assert_eq!(lab.peer(wg).config.endpoint, Some(roamed));
    // Still where the caller saw it: moved, and configured there.
    assert!(lab.router.move_endpoint(wg, roamed, shim));
    assert_eq!(lab.peer(wg).endpoint, Some(shim));
    assert_eq!(lab.peer(wg).config.endpoint, Some(shim));
}

#[test]
fn timers_run_every_tick_and_report_expiry_once() {
    let mut lab = Lab::new();
    assert_eq!(lab.router.poll_timeout(), None, "no peers, no timers");
    let (a, shared) = lab.add(
        config("a", 1, Some("198.18.1.2:51820"), &["100.64.2.0/24"]),
        9,
    );
    let (_b, shared_b) = lab.add(
        config("b", 2, Some("198.18.1.3:51820"), &["100.64.3.0/24"]),
        9,
    );
    let start = lab.now;
    assert_eq!(lab.router.poll_timeout(), Some(start + TIMER_TICK));
    // Early: nothing runs.
    lab.router.handle_timeout(start + TIMER_TICK / 2);
    assert_eq!(lab.router.poll_transmit(start, &mut lab.out), None);
    assert_eq!(shared.lock().unwrap().timer_calls, 0);
    shared
        .lock()
        .unwrap()
        .script
        .extend([Timer::Keepalive, Timer::Expired, Timer::Expired]);
    let mut now = start;
    let mut sent = Vec::new();
    for _ in 0..3 {
        now = lab.router.poll_timeout().expect("timer armed");
        lab.router.handle_timeout(now);
        while let Some(t) = lab.router.poll_transmit(now, &mut lab.out) {
            sent.push(t.destination);
        }
    }
    assert_eq!(now, start + 3 * TIMER_TICK);
    assert_eq!(lab.router.poll_timeout(), Some(start + 4 * TIMER_TICK));
    assert_eq!(shared.lock().unwrap().timer_calls, 3);
    assert_eq!(shared_b.lock().unwrap().timer_calls, 3);
    assert_eq!(sent, vec![sa("198.18.1.2:51820")], "one keepalive, to a");
    assert_eq!(
        lab.router.poll_event(),
        Some(Event::SessionExpired { peer: a })
    );
    assert_eq!(lab.router.poll_event(), None, "expiry reported once");
    lab.now = now;
    assert_eq!(lab.peer(a).state, PeerState::Down);
    // Removing every peer stops the timer.
    lab.router.remove_peer(a);
    lab.router.remove_peer(_b);
    assert_eq!(lab.router.poll_timeout(), None);
}

#[test]
fn a_batch_from_many_peers_reuses_one_buffer_and_counts_every_packet() {
    let mut lab = Lab::new();
    let peers: Vec<PeerId> = (0..16u8)
        .map(|i| {
            let cfg = config(
                &format!("p{i}"),
                i + 1,
                Some(&format!("198.18.2.{}:51820", i + 1)),
                &[&format!("100.64.{}.0/24", i + 10)],
            );
            lab.add(cfg, 9).0
        })
        .collect();
    // One batch of 1600 datagrams, interleaved across the peers, through one output buffer.
    let inners: Vec<Vec<u8>> = (0..16)
        .map(|i| {
            test_packet(
                ip(&format!("100.64.{}.1", i + 10)),
                ip("100.64.1.1"),
                &[i as u8; 100],
            )
        })
        .collect();
    let mut written = 0;
    for round in 0..100u64 {
        for (i, id) in peers.iter().enumerate() {
            let d = data_message(id.index() << 8, round, &inners[i]);
            let from = format!("198.18.2.{}:51820", i + 1);
            match lab.net(&from, &d) {
                NetAction::WriteTun(n) => {
                    assert_eq!(&lab.out[..n], &inners[i][..]);
                    written += 1;
                }
                other => panic!("round {round} peer {i}: {other:?}"),
            }
        }
    }
    assert_eq!(written, 1600);
    for id in &peers {
        let s = lab.peer(*id);
        assert_eq!(s.counters.rx_packets, 100);
        assert_eq!(s.counters.rx_bytes, 100 * (inners[0].len() as u64 + 32));
        assert_eq!(s.counters.drops.total(), 0);
    }
    // And the other way: one TUN batch to all of them.
    for round in 0..10 {
        for i in 0..16 {
            let a = lab.tun("100.64.1.1", &format!("100.64.{}.1", i + 10), &[round; 64]);
            assert!(matches!(a, TunAction::Transmit(_)), "{a:?}");
        }
    }
    assert!(
        peers
            .iter()
            .all(|id| lab.peer(*id).counters.tx_packets == 10)
    );
    assert_eq!(lab.router.drops().total(), 0);
}

#[test]
fn adding_conflicting_peers_is_refused_without_changing_anything() {
    let mut lab = Lab::new();
    let (_a, _) = lab.add(
        config("a", 1, Some("198.18.1.2:51820"), &["100.64.2.0/24"]),
        9,
    );
    let own = Router::new(StaticSecret::from([7; 32]), 0).public_key();
    let mut c = config("own", 0, None, &[]);
    c.public_key = own;
    assert_eq!(
        lab.router.add_peer(lab.now, c),
        Err(crate::PeerError::OwnKey)
    );
    let dup = config("dup", 1, None, &["100.64.9.0/24"]);
    assert!(
        matches!(lab.router.add_peer(lab.now, dup), Err(crate::PeerError::DuplicateKey(n)) if n == "a")
    );
    let taken = config("taken", 5, None, &["100.64.9.0/24", "100.64.2.0/24"]);
    assert!(matches!(
        lab.router.add_peer(lab.now, taken),
        Err(crate::PeerError::PrefixTaken { owner, .. }) if owner == "a"
    ));
    // The refused peer's first prefix was not half-added.
    assert_eq!(
        lab.tun("100.64.1.1", "100.64.9.1", b"x"),
        TunAction::Dropped(DropReason::NoRoute)
    );
    assert_eq!(lab.router.peers(lab.now).len(), 1);
    let mut pt = config("pt", 6, None, &[]);
    pt.path = PathKind::Plaintext;
    assert_eq!(
        lab.router.add_peer(lab.now, pt),
        Err(crate::PeerError::PlaintextWithoutEndpoint)
    );
}

#[test]
fn session_indexes_are_unique_and_skip_zero() {
    let mut r = Router::new(StaticSecret::from([7; 32]), PeerId::MAX - 1);
    let now = Instant::now();
    let mut ids = Vec::new();
    for i in 0..4u8 {
        ids.push(
            r.add_peer(now, config(&format!("p{i}"), i + 1, None, &[]))
                .expect("add"),
        );
    }
    let idx: Vec<u32> = ids.iter().map(|i| i.index()).collect();
    assert_eq!(idx, vec![PeerId::MAX, 1, 2, 3]);
    let _ = Duration::ZERO;
}

#[test]
fn connect_starts_a_handshake_without_waiting_for_traffic() {
    let mut lab = Lab::new();
    let (a, shared) = lab.add(
        config("a", 1, Some("198.18.1.2:51820"), &["100.64.2.0/24"]),
        9,
    );
    let (roamer, _) = lab.add(config("r", 2, None, &["100.64.3.0/24"]), 9);
    lab.router.connect(a);
    lab.router.connect(a);
    lab.router.connect(roamer);
    let t = lab
        .router
        .poll_transmit(lab.now, &mut lab.out)
        .expect("an initiation");
    assert_eq!(
        (t.destination, t.len, lab.out[0]),
        (sa("198.18.1.2:51820"), 148, 1)
    );
    assert_eq!(
        lab.router.poll_transmit(lab.now, &mut lab.out),
        None,
        "once, and none to a peer without an address"
    );
    assert_eq!(shared.lock().unwrap().initiations, 1);
}
