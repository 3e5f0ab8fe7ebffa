//! A peer of the router: its configuration, its session and its counters.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::stats::PeerCounters;
use crate::tunnel::Tunnel;

/// How long a session stays valid after its handshake (WireGuard's REJECT_AFTER_TIME).
pub const SESSION_LIFETIME: Duration = Duration::from_secs(180);

/// A peer's handle: its 24-bit WireGuard session index, unique within one router.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(u32);

impl PeerId {
    /// The largest index (24 bits).
    pub const MAX: u32 = 0x00ff_ffff;

    /// The 24-bit index.
    pub fn index(self) -> u32 {
        self.0
    }

    /// The peer a received WireGuard `receiver_idx` belongs to (its top 24 bits).
    pub(crate) fn from_receiver_idx(idx: u32) -> Self {
        Self(idx >> 8)
    }

    pub(crate) fn new(index: u32) -> Self {
        Self(index & Self::MAX)
    }
}

impl std::fmt::Display for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// How packets to a peer travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PathKind {
    /// WireGuard (boringtun's `noise::Tunn`).
    Encrypted,
    /// The plaintext header over UDP, only where both ends trust each other's subnet.
    Plaintext,
}

impl PathKind {
    /// `encrypted` or `plaintext`, as status shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Encrypted => "encrypted",
            Self::Plaintext => "plaintext",
        }
    }
}

/// Whether a peer is reachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerState {
    /// A session is established (encrypted) or traffic arrived recently (plaintext).
    Up,
    /// An address is known but no session yet.
    Connecting,
    /// No address known, or the session expired with no new handshake.
    Down,
}

impl PeerState {
    /// `up`, `connecting` or `down`, as status shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Connecting => "connecting",
            Self::Down => "down",
        }
    }
}

/// What the router needs to know about a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// A name for status and logs.
    pub name: String,
    /// Its WireGuard public key.
    pub public_key: [u8; 32],
    /// Its underlay address, when known.
    pub endpoint: Option<SocketAddr>,
    /// Overlay prefixes routed to it and accepted from it.
    pub allowed_ips: Vec<IpNet>,
    /// Keepalive interval in seconds.
    pub persistent_keepalive: Option<u16>,
    /// Encrypted or plaintext.
    pub path: PathKind,
}

/// A snapshot of one peer for status and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// Its handle.
    pub id: PeerId,
    /// Its configuration (the endpoint as configured).
    pub config: PeerConfig,
    /// The endpoint in use now (configured, or learned from its authenticated packets).
    pub endpoint: Option<SocketAddr>,
    /// Whether the endpoint was learned from the peer's packets rather than configured.
    pub endpoint_learned: bool,
    /// Reachability.
    pub state: PeerState,
    /// Time since the last completed handshake.
    pub last_handshake: Option<Duration>,
    /// Traffic and drop counters.
    pub counters: PeerCounters,
}

pub(crate) struct Peer {
    pub(crate) id: PeerId,
    pub(crate) config: PeerConfig,
    pub(crate) endpoint: Option<SocketAddr>,
    pub(crate) endpoint_learned: bool,
    /// `None` on the plaintext path.
    pub(crate) tunnel: Option<Box<dyn Tunnel>>,
    pub(crate) counters: PeerCounters,
    pub(crate) last_handshake_at: Option<Instant>,
    pub(crate) last_rx_at: Option<Instant>,
    /// The session expired (no handshake for 3 × REJECT_AFTER_TIME) and none followed.
    pub(crate) expired: bool,
    /// The data-path worker holding the peer's send turn, and since when: it encrypted packets
    /// for the peer that it has not sent yet (see [`crate::Router::handle_tun_packet_as`]).
    pub(crate) held: Option<(u16, Instant)>,
}

impl Peer {
    pub(crate) fn state(&self, now: Instant) -> PeerState {
        let recent = |t: Option<Instant>| {
            t.is_some_and(|t| now.saturating_duration_since(t) < SESSION_LIFETIME)
        };
        if self.endpoint.is_none() || self.expired {
            PeerState::Down
        } else if (self.tunnel.is_some() && recent(self.last_handshake_at))
            || (self.tunnel.is_none() && recent(self.last_rx_at))
        {
            PeerState::Up
        } else {
            PeerState::Connecting
        }
    }

    pub(crate) fn status(&self, now: Instant) -> PeerStatus {
        PeerStatus {
            id: self.id,
            config: self.config.clone(),
            endpoint: self.endpoint,
            endpoint_learned: self.endpoint_learned,
            state: self.state(now),
            last_handshake: self
                .last_handshake_at
                .map(|t| now.saturating_duration_since(t)),
            counters: self.counters,
        }
    }
}
