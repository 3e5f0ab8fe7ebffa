//! Any packet from the TUN device (the IP header parser and routing): never panics.
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use weft_router::x25519::StaticSecret;
use weft_router::testing::peer_config;
use weft_router::{PathKind, PeerConfig, Router};

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let mut r = Router::new(StaticSecret::from([1; 32]), 7);
    let _ = r.add_peer(now, PeerConfig {
        path: PathKind::Plaintext,
        ..peer_config("clear", [3; 32], Some("198.18.1.3:51820"), &["100.64.0.0/10", "::/0"])
    });
    let mut out = vec![0; 65_600];
    let _ = r.handle_tun_packet(now, data, &mut out);
});
