//! What the gossip core refused, by reason: the counters behind `weft_mesh_rejected_*`.

use std::fmt;

/// Why the core refused a frame, a record or a beat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rejected {
    /// A frame that did not decode.
    Malformed,
    /// A frame on a connection that had not said hello.
    BeforeHello,
    /// A record whose signature did not verify (or whose signer is not a key).
    BadSignature,
    /// A record carrying a WireGuard key that is not its signer's.
    UnboundKey,
    /// A record not newer than the one held (replays, echoes), or than another record of its
    /// signer in the same frame.
    Stale,
    /// A heartbeat without a signature (the old `Beats` frame): it decides nothing.
    UnsignedBeat,
    /// A heartbeat whose signature did not verify.
    BadBeat,
    /// A new member refused because the membership is full.
    MemberLimit,
    /// A record of a member forgotten (pruned) after its horizon, not newer than what was
    /// forgotten.
    Forgotten,
    /// A record of this node's own identity published by another daemon (same key on two
    /// daemons), refused once the clash is detected.
    IdentityClash,
    /// A member claiming an address that an older, alive member already advertises.
    AddressInUse,
    /// A frame that only a proven peer may send (an observed endpoint) on a connection whose
    /// peer has not proved who it is.
    Unproven,
    /// An observed endpoint sooner than [`crate::OBSERVED_MIN_GAP`] after the last
    /// one on the same connection.
    TooSoon,
}

impl Rejected {
    /// Every reason, in counter order.
    pub const ALL: [Self; 13] = [
        Self::Malformed,
        Self::BeforeHello,
        Self::BadSignature,
        Self::UnboundKey,
        Self::Stale,
        Self::UnsignedBeat,
        Self::BadBeat,
        Self::MemberLimit,
        Self::Forgotten,
        Self::IdentityClash,
        Self::AddressInUse,
        Self::Unproven,
        Self::TooSoon,
    ];

    /// Its name, as a metric label or a status key.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::BeforeHello => "before_hello",
            Self::BadSignature => "bad_signature",
            Self::UnboundKey => "unbound_key",
            Self::Stale => "stale",
            Self::UnsignedBeat => "unsigned_beat",
            Self::BadBeat => "bad_beat",
            Self::MemberLimit => "member_limit",
            Self::Forgotten => "forgotten",
            Self::IdentityClash => "identity_clash",
            Self::AddressInUse => "address_in_use",
            Self::Unproven => "unproven",
            Self::TooSoon => "too_soon",
        }
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

weft_counters::impl_reason!(Rejected);

/// One counter per [`Rejected`] reason.
pub type Rejections = weft_counters::ByReason<Rejected, { Rejected::ALL.len() }>;

/// Input refused, by the coarse reasons the daemon has always shown, plus every reason in
/// [`Drops::rejected`], and the signature checks paid for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drops {
    /// Frames that did not decode.
    pub malformed: u64,
    /// Records and beats whose signature did not verify, or whose WireGuard key is not their
    /// signer's.
    pub unauthenticated: u64,
    /// Records not newer than the one held (replays, echoes), or than another record of
    /// their signer in the same frame.
    pub stale: u64,
    /// Frames on a connection that had not said hello.
    pub unexpected: u64,
    /// Every refusal by its precise reason.
    pub rejected: Rejections,
    /// Signatures checked (records and beats): what a frame costs in CPU.
    pub verifications: u64,
}

impl Drops {
    /// The coarse counters with their labels, in the order status and metrics list them.
    pub fn coarse(&self) -> [(&'static str, u64); 4] {
        [
            ("malformed", self.malformed),
            ("unauthenticated", self.unauthenticated),
            ("stale", self.stale),
            ("unexpected", self.unexpected),
        ]
    }

    /// Counts one refusal under its precise reason and its coarse one.
    pub(crate) fn count(&mut self, reason: Rejected) {
        self.rejected.count(reason);
        match reason {
            Rejected::Malformed => self.malformed += 1,
            Rejected::BeforeHello => self.unexpected += 1,
            Rejected::BadSignature | Rejected::UnboundKey | Rejected::BadBeat => {
                self.unauthenticated += 1;
            }
            Rejected::Stale => self.stale += 1,
            Rejected::UnsignedBeat
            | Rejected::MemberLimit
            | Rejected::Forgotten
            | Rejected::IdentityClash
            | Rejected::AddressInUse => {}
            Rejected::Unproven | Rejected::TooSoon => self.unexpected += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_counter_and_name() {
        let mut d = Drops::default();
        for (i, r) in Rejected::ALL.into_iter().enumerate() {
            for _ in 0..=i {
                d.count(r);
            }
        }
        for (i, r) in Rejected::ALL.into_iter().enumerate() {
            assert_eq!(d.rejected.get(r), i as u64 + 1, "{r}");
        }
        let names: std::collections::BTreeSet<_> =
            Rejected::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), Rejected::ALL.len());
        assert_eq!(d.malformed, 1);
        assert_eq!(d.unexpected, 2 + 12 + 13);
        assert_eq!(d.unauthenticated, 3 + 4 + 7);
        assert_eq!(d.stale, 5);
    }
}
