//! Node records: what a node says about itself, signed with its own key.
//!
//! A node's [`NodeId`] is its ed25519 verifying key, derived from its WireGuard private key, so
//! a record can only ever speak for the node that signed it, and a restarted node with the same
//! WireGuard key is the same node.

use std::net::IpAddr;

use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use ipnet::IpNet;
use sha2::{Digest as _, Sha512};

use crate::wire::{DecodeError, Reader, Writer};

/// A mesh member: its ed25519 verifying key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub [u8; 32]);

impl std::fmt::Debug for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeId(")?;
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The first 8 bytes of a [`NodeId`], as digests and heartbeats name members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShortId(pub u64);

impl NodeId {
    /// Its short form.
    pub fn short(&self) -> ShortId {
        let mut b = [0; 8];
        b.copy_from_slice(&self.0[..8]);
        ShortId(u64::from_be_bytes(b))
    }
}

/// A node's signing identity.
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// The identity that belongs to a WireGuard private key (a domain-separated hash of it).
    pub fn from_wireguard_key(private: &[u8; 32]) -> Self {
        let mut h = Sha512::new();
        h.update(b"weft mesh signing key v1");
        h.update(private);
        let digest = h.finalize();
        let mut seed = [0; 32];
        seed.copy_from_slice(&digest[..32]);
        Self {
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        NodeId(self.key.verifying_key().to_bytes())
    }

    /// Signs `record` (with its version) into a [`SignedRecord`].
    pub fn sign(&self, record: &NodeRecord) -> SignedRecord {
        let mut w = Writer::default();
        record.encode(&mut w);
        let body = w.into_bytes();
        let sig = self.key.sign(&body).to_bytes();
        SignedRecord {
            signer: self.id(),
            body,
            signature: sig,
            record: record.clone(),
        }
    }
}

/// What a node says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// Increases with every change the origin makes; a record never replaces a newer one.
    pub version: u64,
    /// The node left the mesh on purpose: a tombstone that older versions cannot undo.
    pub left: bool,
    /// The node's name.
    pub name: String,
    /// Its region, if it has one.
    pub region: Option<String>,
    /// Its address for peers in the same region.
    pub private_address: Option<IpAddr>,
    /// Its address for peers in other regions.
    pub public_address: Option<IpAddr>,
    /// Its gossip port (TCP).
    pub mesh_port: u16,
    /// Its data-plane port (UDP).
    pub router_port: u16,
    /// Its WireGuard public key.
    pub wireguard_key: [u8; 32],
    /// The pod CIDRs it owns.
    pub pod_cidrs: Vec<IpNet>,
    /// When it first claimed each of `pod_cidrs` (its own clock, milliseconds since the epoch;
    /// same order): older claims win conflicts.
    pub claimed_at: Vec<u64>,
    /// The underlay subnets it trusts for plaintext.
    pub trusted_subnets: Vec<IpNet>,
}

/// The longest name or region a record carries.
pub const MAX_NAME: usize = 253;
/// The most prefixes in one list of a record.
pub const MAX_PREFIXES: usize = 64;

impl NodeRecord {
    pub(crate) fn encode(&self, w: &mut Writer) {
        w.u64(self.version);
        w.u8(u8::from(self.left));
        w.str(&self.name);
        w.str(self.region.as_deref().unwrap_or(""));
        w.addr(self.private_address);
        w.addr(self.public_address);
        w.u16(self.mesh_port);
        w.u16(self.router_port);
        w.bytes(&self.wireguard_key);
        w.nets(&self.pod_cidrs);
        for i in 0..self.pod_cidrs.len().min(MAX_PREFIXES) {
            w.u64(self.claimed_at.get(i).copied().unwrap_or(0));
        }
        w.nets(&self.trusted_subnets);
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let version = r.u64()?;
        let left = match r.u8()? {
            0 => false,
            1 => true,
            v => return Err(DecodeError::BadValue("left", u64::from(v))),
        };
        let name = r.str()?;
        let region = Some(r.str()?).filter(|s| !s.is_empty());
        let private_address = r.addr()?;
        let public_address = r.addr()?;
        let mesh_port = r.u16()?;
        let router_port = r.u16()?;
        let wireguard_key = r.array()?;
        let pod_cidrs = r.nets()?;
        let claimed_at = (0..pod_cidrs.len())
            .map(|_| r.u64())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            version,
            left,
            name,
            region,
            private_address,
            public_address,
            mesh_port,
            router_port,
            wireguard_key,
            pod_cidrs,
            claimed_at,
            trusted_subnets: r.nets()?,
        })
    }
}

/// A record with its origin's signature, as it travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRecord {
    /// The origin, whose key signed `body`.
    pub signer: NodeId,
    /// The encoded record.
    pub body: Vec<u8>,
    /// The ed25519 signature over `body`.
    pub signature: [u8; 64],
    /// `body`, decoded.
    pub record: NodeRecord,
}

/// Why a signed record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The signer is not a valid ed25519 key.
    #[error("signer is not a valid key")]
    BadSigner,
    /// The signature does not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// The body does not decode.
    #[error("record body: {0}")]
    Body(#[source] DecodeError),
}

impl SignedRecord {
    pub(crate) fn encode(&self, w: &mut Writer) {
        w.bytes(&self.signer.0);
        w.blob(&self.body);
        w.bytes(&self.signature);
    }

    /// Reads and verifies one signed record.
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Result<Self, VerifyError>, DecodeError> {
        let signer = NodeId(r.array()?);
        let body = r.blob()?.to_vec();
        let signature: [u8; 64] = r.array()?;
        Ok(Self::verify(signer, body, signature))
    }

    fn verify(signer: NodeId, body: Vec<u8>, signature: [u8; 64]) -> Result<Self, VerifyError> {
        let key = VerifyingKey::from_bytes(&signer.0).map_err(|_| VerifyError::BadSigner)?;
        key.verify(&body, &Signature::from_bytes(&signature))
            .map_err(|_| VerifyError::BadSignature)?;
        let mut r = Reader::new(&body);
        let record = NodeRecord::decode(&mut r).map_err(VerifyError::Body)?;
        r.finish().map_err(VerifyError::Body)?;
        Ok(Self {
            signer,
            body,
            signature,
            record,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn record(name: &str, version: u64) -> NodeRecord {
        NodeRecord {
            version,
            left: false,
            name: name.into(),
            region: Some("eu-west".into()),
            private_address: Some("198.18.1.1".parse().unwrap()),
            public_address: Some("198.19.0.1".parse().unwrap()),
            mesh_port: 6783,
            router_port: 51820,
            wireguard_key: [9; 32],
            pod_cidrs: vec![
                "100.64.1.0/24".parse().unwrap(),
                "fd00:64:1::/64".parse().unwrap(),
            ],
            claimed_at: vec![5, 6],
            trusted_subnets: vec!["198.18.1.0/24".parse().unwrap()],
        }
    }

    fn round_trip(s: &SignedRecord) -> Result<SignedRecord, VerifyError> {
        let mut w = Writer::default();
        s.encode(&mut w);
        let bytes = w.into_bytes();
        let mut r = Reader::new(&bytes);
        SignedRecord::decode(&mut r).expect("decodes")
    }

    #[test]
    fn signed_records_verify_and_round_trip() {
        let id = Identity::from_wireguard_key(&[1; 32]);
        let s = id.sign(&record("a", 7));
        assert_eq!(round_trip(&s).unwrap(), s);
        assert_eq!(s.signer, id.id());
        // Same WireGuard key, same identity.
        assert_eq!(Identity::from_wireguard_key(&[1; 32]).id(), id.id());
    }

    #[test]
    fn a_changed_body_or_another_signer_fails() {
        let a = Identity::from_wireguard_key(&[1; 32]);
        let b = Identity::from_wireguard_key(&[2; 32]);
        let mut s = a.sign(&record("a", 7));
        s.body[10] ^= 1;
        assert_eq!(round_trip(&s), Err(VerifyError::BadSignature));
        // b's record presented as a's.
        let mut forged = b.sign(&record("a", 8));
        forged.signer = a.id();
        assert_eq!(round_trip(&forged), Err(VerifyError::BadSignature));
    }
}
