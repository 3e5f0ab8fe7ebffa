//! Counters: per-peer traffic and drops by reason.

use std::fmt;

/// Why the router dropped a packet or datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// A datagram that is neither a WireGuard message nor a valid plaintext packet.
    Malformed,
    /// A datagram for a session index, key or address the router does not know.
    UnknownPeer,
    /// A datagram whose MAC, AEAD tag or handshake did not verify.
    Unauthenticated,
    /// A data packet whose counter was already seen or is too old.
    Replay,
    /// A decrypted packet whose inner source lies outside the sending peer's allowed IPs.
    Spoofed,
    /// A packet from the TUN device for an address no peer owns.
    NoRoute,
    /// A packet for a peer whose address is not known yet (a roaming peer that never spoke).
    NoEndpoint,
    /// An inner packet that is not a whole IPv4 or IPv6 packet.
    BadInnerPacket,
    /// Handshakes refused while under load (cookie sent instead).
    RateLimited,
    /// A plaintext datagram from a peer that must use WireGuard, or the reverse.
    WrongPath,
    /// A packet too large for the buffers.
    TooLarge,
    /// A packet the session could not handle (expired, no session yet on receive).
    NoSession,
}

impl DropReason {
    /// Every reason, in the order of their counters.
    pub const ALL: [Self; 12] = [
        Self::Malformed,
        Self::UnknownPeer,
        Self::Unauthenticated,
        Self::Replay,
        Self::Spoofed,
        Self::NoRoute,
        Self::NoEndpoint,
        Self::BadInnerPacket,
        Self::RateLimited,
        Self::WrongPath,
        Self::TooLarge,
        Self::NoSession,
    ];

    /// The snake_case name used in status and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UnknownPeer => "unknown_peer",
            Self::Unauthenticated => "unauthenticated",
            Self::Replay => "replay",
            Self::Spoofed => "spoofed",
            Self::NoRoute => "no_route",
            Self::NoEndpoint => "no_endpoint",
            Self::BadInnerPacket => "bad_inner_packet",
            Self::RateLimited => "rate_limited",
            Self::WrongPath => "wrong_path",
            Self::TooLarge => "too_large",
            Self::NoSession => "no_session",
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

weft_counters::impl_reason!(DropReason);

/// Drop counters, one per [`DropReason`].
pub type Drops = weft_counters::ByReason<DropReason, { DropReason::ALL.len() }>;

/// Traffic counters of one peer. Bytes are underlay datagram bytes, as `wg show` counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerCounters {
    /// Datagram bytes received from the peer and accepted.
    pub rx_bytes: u64,
    /// Datagram bytes sent to the peer.
    pub tx_bytes: u64,
    /// Inner packets delivered to the TUN device.
    pub rx_packets: u64,
    /// Inner packets sent to the peer.
    pub tx_packets: u64,
    /// Drops attributed to this peer.
    pub drops: Drops,
}
