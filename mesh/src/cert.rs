//! Node certificates: an operator's authority binds a node's WireGuard key to the pod CIDRs it
//! may claim. Pure: the daemon loads its certificate, publishes it in its record, and checks
//! the others' against the authority's public key before it believes their claims.
//!
//! Without an authority, a member's signature proves who speaks but not which blocks are its
//! own: a fresh identity (anyone holding the cluster secret can make one) can claim a block it
//! never held with an old claim time, and in standalone mode no rule local to a node tells it
//! from the other side of a healed partition. With an authority, a claim counts only when the
//! claimer's certificate names it; the claim time no longer decides anything an outsider or a
//! member could win by lying.
//!
//! A certificate is the node's WireGuard public key, its pod CIDRs (at most one per family),
//! when it was issued and until when it holds (ms since the epoch), and the authority's ed25519
//! signature over all of them in a context of its own. The authority's key never travels: each
//! node is given its public key in its config.

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use ipnet::IpNet;

use crate::wire::{DecodeError, Reader, Writer};

/// The bytes every certificate starts with (format 1).
const MAGIC: &[u8; 8] = b"WEFTCRT1";
/// The signature context: a certificate's signature is good for nothing else.
const CONTEXT: &[u8] = b"weft node certificate v1";
/// The most pod CIDRs a certificate names: one per family.
pub const MAX_CERT_CIDRS: usize = 2;

/// Why a certificate is not good.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// The bytes are not a certificate.
    #[error("not a weft node certificate: {0}")]
    Malformed(String),
    /// The authority's public key is not an ed25519 key, or a weak (small-order) one.
    #[error("the authority key is not a usable ed25519 public key")]
    BadAuthority,
    /// The signature is not the authority's.
    #[error("not signed by this authority")]
    BadSignature,
    /// The certificate is another node's.
    #[error("issued to another WireGuard key")]
    OtherNode,
    /// Past its end.
    #[error("expired at {not_after} ms (now {now})")]
    Expired {
        /// Its end (ms since the epoch).
        not_after: u64,
        /// The clock it was checked at.
        now: u64,
    },
    /// Issued in the future (beyond the clock skew allowed).
    #[error("issued at {issued_at} ms, in the future (now {now})")]
    NotYetValid {
        /// When it says it was issued.
        issued_at: u64,
        /// The clock it was checked at.
        now: u64,
    },
    /// No pod CIDR, more than one per family, or an end before the start.
    #[error("{0}")]
    Invalid(String),
}

impl From<DecodeError> for CertError {
    fn from(e: DecodeError) -> Self {
        Self::Malformed(e.to_string())
    }
}

/// The authority's public key, as every node is given it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Authority([u8; 32]);

impl Authority {
    /// An authority from its ed25519 public key.
    pub fn from_bytes(key: [u8; 32]) -> Result<Self, CertError> {
        let k = VerifyingKey::from_bytes(&key).map_err(|_| CertError::BadAuthority)?;
        // A small-order key (the identity point, say) would let anyone make a signature
        // that verifies.
        if k.is_weak() {
            return Err(CertError::BadAuthority);
        }
        Ok(Self(key))
    }

    /// Its public key.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0
    }
}

/// The authority's signing key (an ed25519 seed): kept by the operator, never on a node.
pub struct AuthorityKey(SigningKey);

impl std::fmt::Debug for AuthorityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuthorityKey({:?})", self.authority())
    }
}

impl AuthorityKey {
    /// The signing key of a 32-byte seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self(SigningKey::from_bytes(seed))
    }

    /// Its public key, for the nodes' configs.
    pub fn authority(&self) -> Authority {
        Authority(self.0.verifying_key().to_bytes())
    }

    /// A certificate for the node with WireGuard public key `node_key`, valid from `issued_at`
    /// to `not_after` (ms since the epoch).
    pub fn issue(
        &self,
        node_key: [u8; 32],
        pod_cidrs: Vec<IpNet>,
        issued_at: u64,
        not_after: u64,
    ) -> Result<NodeCert, CertError> {
        let mut cert = NodeCert {
            node_key,
            pod_cidrs,
            issued_at,
            not_after,
            signature: [0; 64],
        };
        cert.check_shape()?;
        cert.signature = self.0.sign(&cert.signed_bytes()).to_bytes();
        Ok(cert)
    }
}

/// A node's certificate: which pod CIDRs the authority lets the holder of `node_key` claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCert {
    /// The node's WireGuard public key.
    pub node_key: [u8; 32],
    /// The pod CIDRs it may claim (one per family at most).
    pub pod_cidrs: Vec<IpNet>,
    /// When it was issued (ms since the epoch).
    pub issued_at: u64,
    /// Until when it holds (ms since the epoch).
    pub not_after: u64,
    signature: [u8; 64],
}

impl NodeCert {
    /// Checks that `authority` signed this certificate for `node_key` and that it holds at
    /// `now_ms`, allowing `skew_ms` of clock difference for its start.
    pub fn verify(
        &self,
        authority: &Authority,
        node_key: &[u8; 32],
        now_ms: u64,
        skew_ms: u64,
    ) -> Result<(), CertError> {
        self.signed_by(authority)?;
        self.holds(node_key, now_ms, skew_ms)
    }

    /// Checks the certificate's shape and that `authority` signed it (the costly half of
    /// [`verify`](Self::verify), whose result a caller may keep for the same bytes).
    pub fn signed_by(&self, authority: &Authority) -> Result<(), CertError> {
        self.check_shape()?;
        let key = VerifyingKey::from_bytes(&authority.0).map_err(|_| CertError::BadAuthority)?;
        if key.is_weak() {
            return Err(CertError::BadAuthority);
        }
        key.verify_strict(
            &self.signed_bytes(),
            &Signature::from_bytes(&self.signature),
        )
        .map_err(|_| CertError::BadSignature)
    }

    /// Which of `authorities` signed the certificate (the first that did); with none,
    /// why the last one did not (a bad shape, a bad signature).
    pub fn signer(&self, authorities: &[Authority]) -> Result<Authority, CertError> {
        let mut why = CertError::BadSignature;
        for a in authorities {
            match self.signed_by(a) {
                Ok(()) => return Ok(*a),
                Err(e) => why = e,
            }
        }
        Err(why)
    }

    /// Checks that the certificate is `node_key`'s and holds at `now_ms`, allowing `skew_ms`
    /// of clock difference for its start (the cheap half of [`verify`](Self::verify)).
    pub fn holds(&self, node_key: &[u8; 32], now_ms: u64, skew_ms: u64) -> Result<(), CertError> {
        if &self.node_key != node_key {
            return Err(CertError::OtherNode);
        }
        if now_ms > self.not_after {
            return Err(CertError::Expired {
                not_after: self.not_after,
                now: now_ms,
            });
        }
        if self.issued_at > now_ms.saturating_add(skew_ms) {
            return Err(CertError::NotYetValid {
                issued_at: self.issued_at,
                now: now_ms,
            });
        }
        Ok(())
    }

    /// Whether the certificate lets its holder claim `claim` (exactly one of its CIDRs).
    pub fn covers(&self, claim: &IpNet) -> bool {
        self.pod_cidrs.contains(claim)
    }

    /// The certificate's bytes (what `weft authority sign` writes, in base64).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::default();
        self.encode(&mut w);
        w.into_bytes()
    }

    /// A certificate from its bytes; the signature is not checked (see [`verify`](Self::verify)).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CertError> {
        let mut r = Reader::new(bytes);
        let cert = Self::decode(&mut r)?;
        r.finish()?;
        Ok(cert)
    }

    pub(crate) fn encode(&self, w: &mut Writer) {
        w.bytes(&self.unsigned());
        w.bytes(&self.signature);
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let magic: [u8; 8] = r.array()?;
        if &magic != MAGIC {
            return Err(DecodeError::BadValue("certificate format", 0));
        }
        let node_key = r.array()?;
        let pod_cidrs = r.nets()?;
        if pod_cidrs.len() > MAX_CERT_CIDRS {
            return Err(DecodeError::BadValue(
                "certificate pod CIDRs",
                pod_cidrs.len() as u64,
            ));
        }
        Ok(Self {
            node_key,
            pod_cidrs,
            issued_at: r.u64()?,
            not_after: r.u64()?,
            signature: r.array()?,
        })
    }

    /// The fields the signature covers, as encoded.
    fn unsigned(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.bytes(MAGIC);
        w.bytes(&self.node_key);
        w.nets(&self.pod_cidrs);
        w.u64(self.issued_at);
        w.u64(self.not_after);
        w.into_bytes()
    }

    fn signed_bytes(&self) -> Vec<u8> {
        crate::record::contextual(CONTEXT, &self.unsigned())
    }

    fn check_shape(&self) -> Result<(), CertError> {
        if self.pod_cidrs.is_empty() {
            return Err(CertError::Invalid("it names no pod CIDR".into()));
        }
        let v4 = self.pod_cidrs.iter().filter(|c| c.addr().is_ipv4()).count();
        if v4 > 1 || self.pod_cidrs.len() - v4 > 1 {
            return Err(CertError::Invalid(format!(
                "it names {:?}: at most one pod CIDR per family",
                self.pod_cidrs
            )));
        }
        if self.not_after <= self.issued_at {
            return Err(CertError::Invalid(format!(
                "it ends ({} ms) before it starts ({} ms)",
                self.not_after, self.issued_at
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400_000;
    /// The largest encoded certificate: magic, key, an IPv4 and an IPv6 prefix, times, signature.
    const MAX_CERT_LEN: usize = 8 + 32 + 1 + (1 + 4 + 1) + (1 + 16 + 1) + 16 + 64;

    fn key(n: u8) -> AuthorityKey {
        AuthorityKey::from_seed(&[n; 32])
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    fn cert() -> NodeCert {
        key(1)
            .issue([7; 32], vec![net("100.64.3.0/24")], 10 * DAY, 20 * DAY)
            .expect("issue")
    }

    #[test]
    fn a_certificate_holds_for_its_node_between_its_start_and_end() {
        let c = NodeCert::from_bytes(&cert().to_bytes()).expect("decode");
        assert_eq!(c, cert());
        let auth = key(1).authority();
        assert_eq!(c.verify(&auth, &[7; 32], 15 * DAY, 0), Ok(()));
        assert!(c.covers(&net("100.64.3.0/24")));
        assert!(!c.covers(&net("100.64.2.0/24")));
        assert!(
            !c.covers(&net("100.64.0.0/16")),
            "a broader prefix is not covered"
        );
    }

    #[test]
    fn another_authority_another_node_or_a_time_outside_it_is_refused() {
        let c = cert();
        let auth = key(1).authority();
        assert_eq!(
            c.verify(&key(2).authority(), &[7; 32], 15 * DAY, 0),
            Err(CertError::BadSignature)
        );
        assert_eq!(
            c.verify(&auth, &[8; 32], 15 * DAY, 0),
            Err(CertError::OtherNode)
        );
        assert!(matches!(
            c.verify(&auth, &[7; 32], 20 * DAY + 1, 0),
            Err(CertError::Expired { .. })
        ));
        assert!(matches!(
            c.verify(&auth, &[7; 32], 9 * DAY, 1000),
            Err(CertError::NotYetValid { .. })
        ));
        // Within the skew allowed, a start just ahead of the clock is accepted.
        assert_eq!(c.verify(&auth, &[7; 32], 10 * DAY - 500, 1000), Ok(()));
    }

    /// A holder that edits its certificate (another block, a later end) breaks the signature.
    #[test]
    fn an_edited_certificate_does_not_verify() {
        let auth = key(1).authority();
        let mut c = cert();
        c.pod_cidrs = vec![net("100.64.2.0/24")];
        assert_eq!(
            c.verify(&auth, &[7; 32], 15 * DAY, 0),
            Err(CertError::BadSignature)
        );
        let mut c = cert();
        c.not_after += DAY;
        assert_eq!(
            c.verify(&auth, &[7; 32], 15 * DAY, 0),
            Err(CertError::BadSignature)
        );
        let mut bytes = cert().to_bytes();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let c = NodeCert::from_bytes(&bytes).expect("still decodes");
        assert_eq!(
            c.verify(&auth, &[7; 32], 15 * DAY, 0),
            Err(CertError::BadSignature)
        );
    }

    /// A small-order authority key verifies forged signatures under the lenient check: it is
    /// refused, and a certificate "signed" by it (R the identity, S zero) does not verify.
    #[test]
    fn a_weak_authority_key_is_refused_and_forges_nothing() {
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert_eq!(
            Authority::from_bytes(identity),
            Err(CertError::BadAuthority)
        );
        let mut forged = cert();
        forged.signature = [0; 64];
        forged.signature[0] = 1;
        assert_ne!(
            forged.verify(&Authority(identity), &[7; 32], 15 * DAY, 0),
            Ok(())
        );
    }

    #[test]
    fn bad_bytes_and_bad_shapes_are_errors_that_say_why() {
        let good = cert().to_bytes();
        assert!(good.len() <= MAX_CERT_LEN);
        for cut in 0..good.len() {
            assert!(
                matches!(
                    NodeCert::from_bytes(&good[..cut]),
                    Err(CertError::Malformed(_))
                ),
                "cut at {cut}"
            );
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(NodeCert::from_bytes(&trailing).is_err());
        let mut magic = good;
        magic[0] = b'X';
        let e = NodeCert::from_bytes(&magic).unwrap_err().to_string();
        assert!(e.contains("certificate format"), "{e}");

        let k = key(1);
        let e = k.issue([7; 32], vec![], 0, DAY).unwrap_err().to_string();
        assert!(e.contains("no pod CIDR"), "{e}");
        let two = vec![net("100.64.3.0/24"), net("100.64.4.0/24")];
        let e = k.issue([7; 32], two, 0, DAY).unwrap_err().to_string();
        assert!(e.contains("one pod CIDR per family"), "{e}");
        let e = k
            .issue([7; 32], vec![net("100.64.3.0/24")], DAY, DAY)
            .unwrap_err()
            .to_string();
        assert!(e.contains("before it starts"), "{e}");
        let dual = vec![net("100.64.3.0/24"), net("fd00:1::/64")];
        let dual = k.issue([7; 32], dual, 0, DAY).expect("one per family");
        assert_eq!(dual.to_bytes().len(), MAX_CERT_LEN);
    }
}
