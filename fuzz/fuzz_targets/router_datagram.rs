//! Any datagram from the network, into a router with one WireGuard peer and one plaintext peer:
//! never panics, and every outcome is a drop, a write or a transmit within the buffer.
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use weft_router::x25519::{PublicKey, StaticSecret};
use weft_router::testing::peer_config;
use weft_router::{NetAction, PathKind, PeerConfig, Router};

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let mut r = Router::new(StaticSecret::from([1; 32]), 7);
    let peer = PublicKey::from(&StaticSecret::from([2; 32])).to_bytes();
    let _ = r.add_peer(now, peer_config("wg", peer, Some("198.18.1.2:51820"), &["100.64.2.0/24"]));
    let _ = r.add_peer(now, PeerConfig {
        path: PathKind::Plaintext,
        ..peer_config("clear", [3; 32], Some("198.18.1.3:51820"), &["100.64.3.0/24"])
    });
    let mut out = vec![0; 65_600];
    for from in ["198.18.1.2:51820", "198.18.1.3:51820"] {
        match r.handle_datagram(now, from.parse().unwrap(), data, &mut out) {
            NetAction::WriteTun(n) => assert!(n <= data.len()),
            NetAction::Transmit(t) => assert!(t.len <= out.len()),
            NetAction::Done | NetAction::Dropped(_) => {}
        }
        while r.poll_transmit(now, &mut out).is_some() {}
    }
});
