//! Relaying through a member, for a pair of nodes that no endpoint candidate connects (both
//! behind NATs that give every destination its own port, for one).
//!
//! Each node behind NAT registers with its *home relays*: two public members, not behind NAT
//! themselves, that it picks so that the load spreads ([`crate::control::relays`]), and
//! publishes in its record. A node that cannot reach such a peer directly sends the peer's
//! WireGuard datagrams, unchanged, to the first of the peer's published homes that answers,
//! which passes them on to where the peer registered from. The end-to-end WireGuard session stays between the two ends:
//! the relay forwards bytes it cannot read or forge, and the far end's checks (WireGuard's
//! authentication, then the inner source against the sender's allowed IPs) still hold.
//!
//! On a node, the router is unchanged: a relayed peer's endpoint is a loopback *shim* socket
//! of the relay service, which wraps what the router sends there for the relay, and delivers
//! what the relay brings from that peer to the router from the same socket (so WireGuard's
//! roaming keeps the shim as the endpoint).
//!
//! - [`wire`]: the datagrams on the relay port (the router's port + 1): data, MAC'd with a key
//!   from the cluster secret, and registrations, signed by the node's own identity and MAC'd like
//!   data; a relay holds registrations only for the mesh's members.
//! - [`registry`]: the relay's side, pure: who registered from where, and where data goes.
//! - [`service`]: the tokio driver: the relay socket, the shims, the registrations.

/// The relay port of a node whose router listens on `router_port`.
pub fn port(router_port: u16) -> u16 {
    router_port.wrapping_add(1)
}

pub mod registry;
pub mod service;
pub mod wire;
