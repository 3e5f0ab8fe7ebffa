//! Builders the router's tests, the fuzz targets and the benchmarks share (feature
//! `test-util`): test input written as text, parsed here, and a peer's configuration in one call.
//! They panic on input that does not parse: their input is the caller's own literal.

use std::net::{IpAddr, SocketAddr};

use crate::peer::{PathKind, PeerConfig};

/// An address written in a test.
pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("a test address")
}

/// A socket address written in a test.
pub fn sa(s: &str) -> SocketAddr {
    s.parse().expect("a test socket address")
}

/// A peer called `name` with WireGuard key `public_key`, endpoint `endpoint` (if any) and
/// `allowed` prefixes, encrypted, without keepalive; change the fields the test needs.
pub fn peer_config(
    name: &str,
    public_key: [u8; 32],
    endpoint: Option<&str>,
    allowed: &[&str],
) -> PeerConfig {
    PeerConfig {
        name: name.into(),
        public_key,
        endpoint: endpoint.map(sa),
        allowed_ips: allowed
            .iter()
            .map(|n| n.parse().expect("a test prefix"))
            .collect(),
        persistent_keepalive: None,
        path: PathKind::Encrypted,
    }
}
