//! weft's data plane: a sans-IO forwarding core and the tokio driver that feeds it.
//!
//! # Architecture
//!
//! [`Router`] is the core. It maps overlay prefixes (IPv4 and IPv6) to peers with a
//! longest-prefix [`PrefixTable`], and keeps per peer either a WireGuard session (boringtun's
//! `noise::Tunn`, behind the crate-private `Tunnel` trait so routing logic is testable with a fake)
//! or a plaintext session (the 4-byte header of [`plaintext`], for the trusted-subnet path). It
//! identifies handshake initiations from unknown indexes with boringtun's `parse_handshake_anon`,
//! gives every peer a unique 24-bit session index ([`PeerId`]), runs WireGuard's timers from the
//! `now` it is given, follows roaming peers, drops spoofed inner sources, and counts everything
//! ([`PeerCounters`], [`Drops`]). It owns no socket, spawns no task and never reads the clock.
//!
//! The `driver` module (feature `driver`, on by default) is one tokio task that owns the TUN
//! device, the UDP socket and the router, moves bytes between them in batches, and decides
//! nothing. TUN and UDP sit behind small traits with in-memory implementations for tests.
//!
//! # Layout
//!
//! - `router`: [`Router`] and its inputs and outputs.
//! - `peer`: [`PeerConfig`], [`PeerStatus`], [`PeerId`].
//! - `table`: [`PrefixTable`].
//! - `plaintext`: the plaintext header codec.
//! - `packet`: IP header parsing.
//! - `stats`: counters and [`DropReason`].
//! - `tunnel`: the `Tunnel` trait over `noise::Tunn`.
//! - `driver`: the tokio driver.

mod packet;
mod peer;
pub mod plaintext;
mod router;
mod stats;
mod table;
mod tunnel;

#[cfg(feature = "driver")]
pub mod driver;

#[cfg(any(test, feature = "test-util"))]
pub mod testing;
#[cfg(test)]
mod tests;

pub use boringtun::x25519;

#[cfg(any(test, feature = "test-util"))]
pub use crate::packet::test_packet;
pub use crate::peer::{PathKind, PeerConfig, PeerId, PeerState, PeerStatus, SESSION_LIFETIME};
pub use crate::router::{
    Event, MIN_BUFFER, NetAction, PeerError, Router, TIMER_TICK, Transmit, TunAction,
    WIREGUARD_OVERHEAD,
};
pub use crate::stats::{DropReason, Drops, PeerCounters};
pub use crate::table::PrefixTable;
