//! weft's data plane: a sans-IO forwarding core and the driver that feeds it.
//!
//! # Architecture
//!
//! [`Router`] is the core. It maps overlay prefixes (IPv4 and IPv6) to peers with a
//! longest-prefix [`PrefixTable`], and keeps per peer either a WireGuard session (boringtun's
//! `noise::Tunn`, behind the crate-private `Tunnel` trait so routing logic is testable with a fake)
//! or a plaintext session (the 4-byte header of [`plaintext`], for the trusted-subnet path). It
//! passes every handshake message through one gate before any Diffie-Hellman (MAC1, cookies past
//! [`HANDSHAKE_RATE_LIMIT`] a second, then [`PER_SOURCE_LIMIT`] a second per sender address),
//! identifies handshake initiations from unknown indexes with boringtun's `parse_handshake_anon`,
//! gives every peer a unique 24-bit session index ([`PeerId`]), runs WireGuard's timers from the
//! `now` it is given, follows roaming peers, drops spoofed inner sources, and counts everything
//! ([`PeerCounters`], [`Drops`]). It owns no socket, spawns no task and never reads the clock.
//!
//! The `driver` module (feature `driver`, on by default) runs the data-path workers around the
//! router: each moves bytes between its TUN queue and its UDP socket in batches, and decides
//! nothing. TUN and UDP sit behind small traits with in-memory implementations for tests.
//!
//! # Workers
//!
//! `router.workers` data-path workers run, each a thread of its own that waits in its own `epoll`
//! (no async runtime between a packet's wake-up and its turn), named `weft-worker-<n>` as `top -H`,
//! `ps -L` and `perf` show it:
//!
//! - **Its own TUN queue.** With more than one worker the device is multi-queue
//!   (`IFF_MULTI_QUEUE`). The kernel puts each flow on one queue (by its flow hash, or on the
//!   queue its return packets were written to), so a flow is read, encrypted and sent by one
//!   worker, in order.
//! - **Its own UDP socket**, all bound to `router.port` in a `SO_REUSEPORT` group. The kernel
//!   hands each datagram to one socket by a hash of its addresses and ports, so one peer's
//!   datagrams (one underlay 4-tuple) reach one worker, in order.
//! - **One shared [`Router`]** behind a read-write lock. Packets go through under the read
//!   lock, taken for a batch (a buffer of up to 512 KB out, one receive buffer of up to 64
//!   datagrams in) and released for every system call. Inside, each peer's session and counters
//!   have a lock of their own, held for one packet, and each peer sits alone on its cache lines.
//!   So workers encrypt for different peers at once, and one peer's packets are encrypted by one
//!   worker at a time (its WireGuard counter stays consistent).
//! - **Send turns keep each peer's counters in order on the wire.** A worker that encrypted for
//!   a peer holds the peer's turn until it has sent those datagrams; another worker's packet
//!   for the peer waits (its worker first sends what it holds, so none waits on another in a
//!   circle). Otherwise a worker preempted between encrypting a batch and sending it could send
//!   it after the others sent more than the receiver's replay window (1024 counters) of later
//!   ones, and lose it all. A turn held past [`HOLD_LIMIT`] (a stalled worker) is taken over.
//!   A worker alone (`workers = 1`) has nobody to keep in order and takes no turns.
//!   Commands, timers and
//!   queued output (handshake answers, packets a handshake released) take the write lock,
//!   briefly, and only when there is something. `weft-bench router` measures what the sharing
//!   costs: two workers encrypting to two peers through one router against one worker.
//! - **Timers and commands on worker 0 only**, so WireGuard's timers run once per peer however
//!   many workers there are. The worker whose datagram made output sends what the router
//!   queued (handshake answers, packets released by a handshake), as does worker 0 after the
//!   timers and the commands.
//! - A supervisor stops every worker when one stops (the daemon gone, its device failed).
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
//! - `driver`: the driver (its workers' threads, and an async form for the in-memory devices).

mod handshakes;
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

pub use crate::handshakes::{HANDSHAKE_RATE_LIMIT, MAX_SOURCES, PER_SOURCE_LIMIT};
#[cfg(any(test, feature = "test-util"))]
pub use crate::packet::test_packet;
pub use crate::peer::{PathKind, PeerConfig, PeerId, PeerState, PeerStatus, SESSION_LIFETIME};
pub use crate::router::{
    Event, HOLD_LIMIT, MIN_BUFFER, NetAction, PeerError, Router, TIMER_TICK, Transmit, TunAction,
    WIREGUARD_OVERHEAD,
};
pub use crate::stats::{DropReason, Drops, PeerCounters};
pub use crate::table::PrefixTable;
