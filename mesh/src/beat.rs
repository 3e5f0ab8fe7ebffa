//! Signed heartbeats: a node's word that it is alive, which no other member can forge.
//!
//! A [`Beat`] names the origin (by its short id), the version of the origin's record it belongs
//! to, and a counter, signed by the origin. Each record version is a heartbeat space of its own:
//! a restarted node publishes a new version and counts from zero in it, and a beat of one
//! version says nothing about another. Relays pass beats on untouched; a receiver checks that a
//! beat is newer than the one it holds before it pays for the signature check.

use crate::record::{Identity, NodeId, ShortId, VerifyError, verify_beat};

/// Domain separation for the signed bytes of a beat.
const CONTEXT: &[u8] = b"weft mesh beat v1";

/// One signed heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beat {
    /// The origin.
    pub node: ShortId,
    /// The version of the origin's record this beat belongs to.
    pub version: u64,
    /// The counter, from zero in each version.
    pub heartbeat: u32,
    /// The origin's signature over the beat (with its full id).
    pub signature: [u8; 64],
}

/// A change of liveness that spreads through the whole mesh (plain beats go only to a node's
/// own connections). Each carries a beat its subject signed, so a rumour can only repeat what
/// the subject said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rumour {
    /// The subject is alive: its newest beat, spread when it refutes a suspicion, when a node
    /// sees it alive again, and every announce interval.
    Alive(Beat),
    /// The sender has heard no beat of the subject newer than this one for the liveness
    /// timeout. Unless a newer beat (the subject's refutation) arrives within the suspicion
    /// timeout, the subject is down.
    Suspect(Beat),
}

impl Rumour {
    /// The beat it carries.
    pub fn beat(&self) -> &Beat {
        match self {
            Self::Alive(b) | Self::Suspect(b) => b,
        }
    }
}

/// The bytes a beat's signature covers.
fn signed_bytes(node: &NodeId, version: u64, heartbeat: u32) -> [u8; 61] {
    let mut b = [0; 61];
    b[..17].copy_from_slice(CONTEXT);
    b[17..49].copy_from_slice(&node.0);
    b[49..57].copy_from_slice(&version.to_be_bytes());
    b[57..].copy_from_slice(&heartbeat.to_be_bytes());
    b
}

impl Beat {
    /// `identity`'s beat number `heartbeat` of its record version `version`.
    pub fn sign(identity: &Identity, version: u64, heartbeat: u32) -> Self {
        let id = identity.id();
        Self {
            node: id.short(),
            version,
            heartbeat,
            signature: identity.sign_bytes(&signed_bytes(&id, version, heartbeat)),
        }
    }

    /// Checks that `origin` (whose short id the beat names) signed it.
    pub fn verify(&self, origin: &NodeId) -> Result<(), VerifyError> {
        if origin.short() != self.node {
            return Err(VerifyError::BadSignature);
        }
        verify_beat(
            *origin,
            &signed_bytes(origin, self.version, self.heartbeat),
            (self.version, self.heartbeat, &self.signature),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_beat_verifies_only_as_signed() {
        let a = Identity::from_wireguard_key(&[1; 32]);
        let b = Identity::from_wireguard_key(&[2; 32]);
        let beat = Beat::sign(&a, 7, 3);
        assert_eq!(beat.verify(&a.id()), Ok(()));
        assert!(beat.verify(&b.id()).is_err(), "another origin");
        for tampered in [
            Beat {
                heartbeat: u32::MAX,
                ..beat
            },
            Beat { version: 8, ..beat },
        ] {
            assert_eq!(
                tampered.verify(&a.id()),
                Err(VerifyError::BadSignature),
                "{tampered:?}"
            );
        }
        // b's own beat relabelled as a's.
        let relabelled = Beat {
            node: a.id().short(),
            ..Beat::sign(&b, 7, 3)
        };
        assert_eq!(relabelled.verify(&a.id()), Err(VerifyError::BadSignature));
    }
}
