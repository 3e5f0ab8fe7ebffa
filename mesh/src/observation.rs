//! Observations: one member's signed word to another about where that one's WireGuard
//! datagrams arrive from (a NAT mapping, when it is none of the receiver's addresses).
//!
//! The sender signs the endpoint, the receiver's id and its own wall-clock time, so that a
//! report counts only as the word of the member that signed it, only at the node it was made
//! for, and only when fresh (the daemon refuses one older than the last from the same member,
//! or far from its clock). Nothing about the connection it came on is trusted: any member can
//! open a connection saying hello as another, and relay that one's beats on it.

use std::net::SocketAddr;

use crate::record::{Identity, NodeId, VerifyError, verify_message};

/// What an observation signature is for.
const CONTEXT: &[u8] = b"weft observed endpoint v1";

/// One member's signed report to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    /// The member that saw it.
    pub by: NodeId,
    /// Where the receiver's datagrams came from, as it saw them.
    pub endpoint: SocketAddr,
    /// Its wall clock when it signed, ms since the epoch.
    pub at_ms: u64,
    pub(crate) signature: [u8; 64],
}

fn message(to: &NodeId, endpoint: SocketAddr, at_ms: u64) -> Vec<u8> {
    let mut m = Vec::with_capacity(32 + 16 + 2 + 8);
    m.extend_from_slice(&to.0);
    match endpoint.ip().to_canonical() {
        std::net::IpAddr::V4(a) => m.extend_from_slice(&a.to_ipv6_mapped().octets()),
        std::net::IpAddr::V6(a) => m.extend_from_slice(&a.octets()),
    }
    m.extend_from_slice(&endpoint.port().to_be_bytes());
    m.extend_from_slice(&at_ms.to_be_bytes());
    m
}

impl Observation {
    /// `identity`'s report to `to` that its datagrams come from `endpoint`, at `at_ms`.
    pub fn sign(identity: &Identity, to: &NodeId, endpoint: SocketAddr, at_ms: u64) -> Self {
        Self {
            by: identity.id(),
            endpoint,
            at_ms,
            signature: identity.sign_message(CONTEXT, &message(to, endpoint, at_ms)),
        }
    }

    /// Checks that `by` signed it for `to`.
    pub fn verify(&self, to: &NodeId) -> Result<(), VerifyError> {
        verify_message(
            self.by,
            CONTEXT,
            &message(to, self.endpoint, self.at_ms),
            &self.signature,
        )
    }
}
