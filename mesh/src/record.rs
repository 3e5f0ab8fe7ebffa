//! Node records: what a node says about itself, signed with its own key.
//!
//! A node's [`NodeId`] is its WireGuard public key in Edwards form (the birational map from
//! Curve25519, as XEdDSA uses it), and it signs with the scalar of its WireGuard private key. So
//! the id follows from the WireGuard key and nothing else: a record whose WireGuard key is not
//! its signer's own does not verify ([`VerifyError::UnboundKey`]), no member can publish another
//! node's WireGuard key, and a restarted node with the same WireGuard key is the same node.
//!
//! Records travel as [`UnverifiedRecord`]s: decoded, but with the signature not yet checked, so
//! the receiver can drop a stale one before paying for the signature check.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use curve25519_dalek::edwards::EdwardsPoint;
use curve25519_dalek::montgomery::MontgomeryPoint;
use curve25519_dalek::scalar::{Scalar, clamp_integer};
use ed25519_dalek::hazmat::{ExpandedSecretKey, raw_sign};
use ed25519_dalek::{Signature, Verifier as _, VerifyingKey};
use ipnet::IpNet;
use sha2::{Digest as _, Sha512};

use crate::cert::NodeCert;
use crate::wire::{DecodeError, Reader, Writer};

/// A mesh member: its ed25519 verifying key, the Edwards form of its WireGuard public key.
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

    /// The id that belongs to a WireGuard public key, or `None` for bytes that are not a point
    /// of Curve25519 (no node can hold such a key).
    pub fn from_wireguard_key(public: &[u8; 32]) -> Option<Self> {
        let edwards = MontgomeryPoint(*public).to_edwards(0)?;
        Some(Self(edwards.compress().to_bytes()))
    }
}

/// A node's signing identity: the scalar of its WireGuard private key.
#[derive(Clone)]
pub struct Identity {
    scalar: Scalar,
    nonce_key: [u8; 32],
    verifying: VerifyingKey,
    wireguard: [u8; 32],
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// The identity of a WireGuard private key: its clamped scalar, negated if need be so that
    /// the public point has the sign [`NodeId::from_wireguard_key`] picks.
    pub fn from_wireguard_key(private: &[u8; 32]) -> Self {
        let mut scalar = Scalar::from_bytes_mod_order(clamp_integer(*private));
        let mut point = EdwardsPoint::mul_base(&scalar);
        let wireguard = point.to_montgomery().to_bytes();
        if point.compress().to_bytes()[31] & 0x80 != 0 {
            scalar = -scalar;
            point = -point;
        }
        // The nonce key: secret, deterministic, separate from the signing scalar.
        let mut h = Sha512::new();
        h.update(b"weft mesh nonce key v2");
        h.update(private);
        let digest = h.finalize();
        let mut hash_prefix = [0; 32];
        hash_prefix.copy_from_slice(&digest[..32]);
        let verifying = VerifyingKey::from(point);
        Self {
            scalar,
            nonce_key: hash_prefix,
            verifying,
            wireguard,
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        NodeId(self.verifying.to_bytes())
    }

    /// This node's WireGuard public key (what `wg pubkey` prints for its private key).
    pub fn wireguard_key(&self) -> [u8; 32] {
        self.wireguard
    }

    /// Signs `bytes`.
    pub(crate) fn sign_bytes(&self, bytes: &[u8]) -> [u8; 64] {
        let key = ExpandedSecretKey {
            scalar: self.scalar,
            hash_prefix: self.nonce_key,
        };
        raw_sign::<Sha512>(&key, bytes, &self.verifying).to_bytes()
    }

    /// Signs `message` for another protocol of this node, under `context` (a fixed label such
    /// as `b"weft relay register v1"`): the context is signed first, with its length, so that
    /// no such signature is ever valid as a record's, a beat's, or another context's.
    pub fn sign_message(&self, context: &[u8], message: &[u8]) -> [u8; 64] {
        self.sign_bytes(&contextual(context, message))
    }

    /// Signs `record` (with its version) into a [`SignedRecord`]. The record's WireGuard key is
    /// set to this identity's: no other key could verify.
    pub fn sign(&self, record: &NodeRecord) -> SignedRecord {
        let mut record = record.clone();
        record.wireguard_key = self.wireguard;
        self.sign_unbound(record)
    }

    /// Signs `record` exactly as given, whatever WireGuard key it names: what a dishonest member
    /// could publish, for tests that play one. Receivers refuse it unless the key is this
    /// identity's ([`VerifyError::UnboundKey`]).
    pub fn sign_unbound(&self, record: NodeRecord) -> SignedRecord {
        let mut w = Writer::default();
        record.encode(&mut w);
        let body = w.into_bytes();
        let signature = self.sign_bytes(&body);
        SignedRecord {
            signer: self.id(),
            body,
            signature,
            record,
        }
    }
}

/// Bytes under a signature of [`Identity::sign_message`]: a marker no record body or beat
/// starts with, the context's length and the context, then the message.
pub(crate) fn contextual(context: &[u8], message: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(3 + context.len() + message.len());
    b.push(0xff);
    b.extend_from_slice(
        &u16::try_from(context.len())
            .unwrap_or(u16::MAX)
            .to_be_bytes(),
    );
    b.extend_from_slice(context);
    b.extend_from_slice(message);
    b
}

/// Checks a signature of [`Identity::sign_message`] by `signer` over `message` in `context`.
pub fn verify_message(
    signer: NodeId,
    context: &[u8],
    message: &[u8],
    signature: &[u8; 64],
) -> Result<(), VerifyError> {
    verify_bytes(signer, &contextual(context, message), signature)
}

/// Checks `signature` over `bytes` by `signer`.
pub(crate) fn verify_bytes(
    signer: NodeId,
    bytes: &[u8],
    signature: &[u8; 64],
) -> Result<(), VerifyError> {
    let key = VerifyingKey::from_bytes(&signer.0).map_err(|_| VerifyError::BadSigner)?;
    key.verify(bytes, &Signature::from_bytes(signature))
        .map_err(|_| VerifyError::BadSignature)
}

/// What a node says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// Increases with every change the origin makes; a record never replaces a newer one. A new
    /// version also starts a new heartbeat space: beats count from the version they name. The
    /// driver stamps each version with the origin's wall clock (ms since the epoch) and
    /// republishes the record every [`crate::MeshConfig::record_refresh`].
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
    /// Its WireGuard public key: always the signer's own (see the module doc).
    pub wireguard_key: [u8; 32],
    /// The pod CIDRs it owns.
    pub pod_cidrs: Vec<IpNet>,
    /// When it first claimed each of `pod_cidrs` (its own clock, milliseconds since the epoch;
    /// same order): older claims win conflicts.
    pub claimed_at: Vec<u64>,
    /// The underlay subnets it trusts for plaintext.
    pub trusted_subnets: Vec<IpNet>,
    /// Where its WireGuard datagrams arrive from at its peers when that is none of its own
    /// addresses: the mappings of a NAT in front of it (reflexive endpoints, as STUN finds
    /// them), at most [`MAX_OBSERVED`]. Peers that cannot reach its addresses try these.
    pub observed: Vec<SocketAddr>,
    /// The WireGuard keys of the relays it registers with, best first, while it is behind NAT
    /// (at most [`MAX_HOMES`]; carried only with `observed`): its peers reach it through
    /// these, so both ends agree on the relay without working it out alike. `None` from a
    /// build before homes were published (its peers work its homes out as it does); an empty
    /// list when it has no relay.
    pub homes: Option<Vec<[u8; 32]>>,
    /// Its certificate from the cluster's authority (`mesh.authority`), naming the pod CIDRs
    /// it may claim; `None` in a cluster without one, or from a build before certificates.
    pub certificate: Option<Box<NodeCert>>,
}

/// The longest name or region a record carries.
pub const MAX_NAME: usize = 253;
/// The most prefixes in one list of a record.
pub const MAX_PREFIXES: usize = 64;
/// The most observed endpoints a record carries.
pub const MAX_OBSERVED: usize = 4;
/// The most home relays a record names.
pub const MAX_HOMES: usize = 4;
/// The most bytes a record may carry after the fields this build knows (a later build's).
pub const MAX_LATER: usize = 512;

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
        // Written only when there is one: a record without is byte for byte what builds before
        // NAT traversal write and read (they refuse trailing bytes).
        // A build that adds a field after these must write every field before it, empty ones
        // too (a count of 0), so that this build reads each where it is.
        // The certificate's slot (a blob, empty for none) comes after the homes, so a record
        // with one writes both before it (empty: no endpoints, no homes); homes mean nothing
        // without endpoints, and a count of 0 there reads back as none. A later build's field
        // goes after the slot.
        let cert = self.certificate.as_ref();
        if !self.observed.is_empty() || cert.is_some() {
            w.endpoints(&self.observed[..self.observed.len().min(MAX_OBSERVED)]);
            if self.homes.is_some() || cert.is_some() {
                let homes = match &self.homes {
                    Some(h) if !self.observed.is_empty() => &h[..h.len().min(MAX_HOMES)],
                    _ => &[],
                };
                w.u8(homes.len() as u8);
                for k in homes {
                    w.bytes(k);
                }
            }
            if let Some(cert) = cert {
                w.blob(&cert.to_bytes());
            }
        }
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
        let trusted_subnets = r.nets()?;
        // Absent in the records of builds before NAT traversal.
        let observed = if r.is_empty() {
            Vec::new()
        } else {
            r.endpoints()?
        };
        // Absent in the records of builds before published home relays.
        let homes = if r.is_empty() {
            None
        } else {
            let n = usize::from(r.u8()?);
            if n > MAX_HOMES {
                return Err(DecodeError::BadValue("home relay count", n as u64));
            }
            let homes: Vec<[u8; 32]> = (0..n).map(|_| r.array()).collect::<Result<_, _>>()?;
            // Written only to reach a certificate: no endpoints, no homes.
            Some(homes).filter(|h| !(observed.is_empty() && h.is_empty()))
        };
        // Absent in the records of builds before certificates, and without an authority.
        let certificate = if r.is_empty() {
            None
        } else {
            let bytes = r.blob()?;
            if bytes.is_empty() {
                None
            } else {
                let mut cert = Reader::new(bytes);
                let c = NodeCert::decode(&mut cert)?;
                cert.finish()?;
                Some(Box::new(c))
            }
        };
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
            trusted_subnets,
            observed,
            homes,
            certificate,
        })
    }
}

/// A record with its origin's signature, verified.
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

/// A record as it arrives: its body decoded and bound to the signer's WireGuard key, its
/// signature not yet checked. [`UnverifiedRecord::verify`] turns it into a [`SignedRecord`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnverifiedRecord {
    signed: Arc<SignedRecord>,
    /// Found among the records this process already verified ([`share_verified_records`]).
    checked: bool,
}

/// Whether identical signed records are verified and held once per process.
static SHARING: AtomicBool = AtomicBool::new(false);
/// The records verified while sharing, by signature.
static SHARED: Mutex<Option<HashMap<[u8; 64], Arc<SignedRecord>>>> = Mutex::new(None);
/// The beats verified while sharing: origin, version, heartbeat, signature.
type BeatKey = ([u8; 32], u64, u32, [u8; 64]);
static SHARED_BEATS: Mutex<Option<HashSet<BeatKey>>> = Mutex::new(None);

/// A sharing table, even if a thread panicked while holding it (it only ever holds records
/// and beats that verified).
fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// For a simulation that runs thousands of mesh cores in one process: from now on, a record
/// whose signer, body and signature equal one this process already verified is decoded and
/// checked once and held once (shared by every core), instead of once per core, and so is a
/// beat's signature. Nothing a core decides changes: a record or beat is still counted as a
/// signature check where it is applied, and only what verified is ever shared. Off unless
/// turned on; a daemon never does.
pub fn share_verified_records(on: bool) {
    SHARING.store(on, Ordering::Relaxed);
    let mut shared = locked(&SHARED);
    *shared = on.then(HashMap::new);
    let mut beats = locked(&SHARED_BEATS);
    *beats = on.then(HashSet::new);
}

/// Checks a beat's signature, or finds it among those this process verified (while sharing).
pub(crate) fn verify_beat(
    origin: NodeId,
    bytes: &[u8],
    key: (u64, u32, &[u8; 64]),
) -> Result<(), VerifyError> {
    if !SHARING.load(Ordering::Relaxed) {
        return verify_bytes(origin, bytes, key.2);
    }
    let k: BeatKey = (origin.0, key.0, key.1, *key.2);
    let mut beats = locked(&SHARED_BEATS);
    if beats.as_ref().is_some_and(|b| b.contains(&k)) {
        return Ok(());
    }
    verify_bytes(origin, bytes, key.2)?;
    if let Some(b) = beats.as_mut() {
        b.insert(k);
    }
    Ok(())
}

/// The shared copy of a verified record with these bytes, while sharing.
fn shared(signer: &NodeId, body: &[u8], signature: &[u8; 64]) -> Option<Arc<SignedRecord>> {
    if !SHARING.load(Ordering::Relaxed) {
        return None;
    }
    let shared = locked(&SHARED);
    let s = shared.as_ref()?.get(signature)?;
    (s.signer == *signer && s.body == body).then(|| s.clone())
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
    /// The record carries a WireGuard key that is not the signer's own.
    #[error("the record's WireGuard key is not its signer's")]
    UnboundKey,
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
}

impl From<SignedRecord> for UnverifiedRecord {
    fn from(s: SignedRecord) -> Self {
        Arc::new(s).into()
    }
}

impl From<Arc<SignedRecord>> for UnverifiedRecord {
    fn from(signed: Arc<SignedRecord>) -> Self {
        Self {
            signed,
            checked: false,
        }
    }
}

impl UnverifiedRecord {
    /// Its claimed origin.
    pub fn signer(&self) -> NodeId {
        self.signed.signer
    }

    /// The record, as claimed.
    pub fn record(&self) -> &NodeRecord {
        &self.signed.record
    }

    /// The record's bytes, as signed.
    pub fn body(&self) -> &[u8] {
        &self.signed.body
    }

    /// Checks the signature (the one costly step).
    pub fn verify(self) -> Result<SignedRecord, VerifyError> {
        self.verify_shared()
            .map(|s| Arc::try_unwrap(s).unwrap_or_else(|s| (*s).clone()))
    }

    /// As [`UnverifiedRecord::verify`], keeping the record shared.
    pub(crate) fn verify_shared(self) -> Result<Arc<SignedRecord>, VerifyError> {
        if self.checked {
            return Ok(self.signed);
        }
        let s = &self.signed;
        verify_bytes(s.signer, &s.body, &s.signature)?;
        if SHARING.load(Ordering::Relaxed) {
            let mut shared = locked(&SHARED);
            if let Some(m) = shared.as_mut() {
                m.insert(s.signature, self.signed.clone());
            }
        }
        Ok(self.signed)
    }

    pub(crate) fn encode(&self, w: &mut Writer) {
        self.signed.encode(w);
    }

    /// Reads one record: the body must decode and name its signer's WireGuard key; the
    /// signature is left for [`UnverifiedRecord::verify`]. A bad record is an `Err` of its
    /// own; only bytes that break the frame's structure are a [`DecodeError`].
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Result<Self, VerifyError>, DecodeError> {
        let signer = NodeId(r.array()?);
        let body = r.blob()?;
        let signature: [u8; 64] = r.array()?;
        if let Some(signed) = shared(&signer, body, &signature) {
            return Ok(Ok(Self {
                signed,
                checked: true,
            }));
        }
        Ok(Self::check(signer, body.to_vec(), signature))
    }

    fn check(signer: NodeId, body: Vec<u8>, signature: [u8; 64]) -> Result<Self, VerifyError> {
        let mut r = Reader::new(&body);
        // Bytes after the fields this build knows are a newer build's additions: signed with
        // the rest and kept in `body`, but not read (so a rolling update can add fields), up
        // to MAX_LATER of them.
        let record = NodeRecord::decode(&mut r).map_err(VerifyError::Body)?;
        if r.remaining() > MAX_LATER {
            return Err(VerifyError::Body(DecodeError::Trailing(r.remaining())));
        }
        if NodeId::from_wireguard_key(&record.wireguard_key) != Some(signer) {
            return Err(VerifyError::UnboundKey);
        }
        Ok(SignedRecord {
            signer,
            body,
            signature,
            record,
        }
        .into())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) use crate::testing::node_record as record;

    /// Encodes `s` as it travels and reads it back, verified.
    pub(crate) fn round_trip(s: &SignedRecord) -> Result<SignedRecord, VerifyError> {
        let mut w = Writer::default();
        s.encode(&mut w);
        let bytes = w.into_bytes();
        let mut r = Reader::new(&bytes);
        UnverifiedRecord::decode(&mut r)
            .expect("decodes")
            .and_then(UnverifiedRecord::verify)
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
    fn observed_endpoints_round_trip_a_body_without_them_still_decodes_and_too_many_are_refused() {
        let id = Identity::from_wireguard_key(&[1; 32]);
        let mut r = record("a", 7);
        r.observed = vec![
            "198.19.0.101:51820".parse().unwrap(),
            "[2001:db8::7]:1024".parse().unwrap(),
        ];
        let s = id.sign(&r);
        assert_eq!(round_trip(&s).unwrap().record.observed, r.observed);
        // Without any, the body is what builds before NAT traversal write, and what they read
        // to the last byte (they refuse trailing bytes).
        let mut w = Writer::default();
        record("a", 7).encode(&mut w);
        let old = w.into_bytes();
        let mut rd = Reader::new(&old);
        let decoded = NodeRecord::decode(&mut rd).expect("decodes");
        assert!(decoded.observed.is_empty());
        let mut old_reader = Reader::new(&old);
        // What the old decoder read: every field up to the trusted subnets, then the end.
        let _ = NodeRecord::decode(&mut old_reader).expect("decodes");
        assert!(old_reader.finish().is_ok());
        assert_eq!(
            old.last(),
            Some(&24),
            "the last trusted subnet's prefix length ends it"
        );
        // More than MAX_OBSERVED in a body is refused, not truncated or believed.
        let mut w = Writer::default();
        record("a", 7).encode(&mut w);
        let mut many = w.into_bytes();
        let e: SocketAddr = "198.19.0.9:9".parse().unwrap();
        let mut w = Writer::default();
        w.endpoints(&[e; MAX_OBSERVED + 1]);
        many.extend(w.into_bytes());
        let mut rd = Reader::new(&many);
        assert!(matches!(
            NodeRecord::decode(&mut rd),
            Err(DecodeError::BadValue("endpoint count", 5))
        ));
    }

    #[test]
    fn home_relays_round_trip_after_the_mappings_too_many_are_refused_and_later_fields_are_ignored()
    {
        let id = Identity::from_wireguard_key(&[1; 32]);
        let mut r = record("a", 7);
        r.observed = vec!["198.19.0.101:51820".parse().unwrap()];
        r.wireguard_key = id.wireguard_key();
        // Absent (a build before homes), present and empty (no relay), and two.
        for homes in [None, Some(vec![]), Some(vec![[3; 32], [4; 32]])] {
            r.homes = homes;
            assert_eq!(round_trip(&id.sign(&r)).unwrap().record.homes, r.homes);
        }
        // Homes are carried only with mappings: a node not behind NAT has none.
        let mut public = record("a", 7);
        public.homes = Some(vec![[3; 32]]);
        assert_eq!(round_trip(&id.sign(&public)).unwrap().record.homes, None);
        // More than MAX_HOMES: refused.
        let mut w = Writer::default();
        r.encode(&mut w);
        let mut body = w.into_bytes();
        body.truncate(body.len() - 1 - 2 * 32);
        body.push(MAX_HOMES as u8 + 1);
        body.extend([5; 32 * (MAX_HOMES + 1)]);
        assert!(matches!(
            NodeRecord::decode(&mut Reader::new(&body)),
            Err(DecodeError::BadValue("home relay count", 5))
        ));
        // A later build's field after the homes: signed, kept, and not read, up to MAX_LATER
        // bytes of them.
        let verify = |body: Vec<u8>| {
            let signature = id.sign_bytes(&body);
            UnverifiedRecord::check(id.id(), body, signature).and_then(UnverifiedRecord::verify)
        };
        let mut w = Writer::default();
        r.encode(&mut w);
        let known = w.into_bytes();
        let mut body = known.clone();
        // The certificate's slot, empty, comes first.
        body.extend_from_slice(&[0, 0]);
        body.extend_from_slice(&[7; MAX_LATER]);
        let newer = verify(body.clone()).expect("a record with a later field verifies");
        assert_eq!(newer.record, r);
        assert_eq!(newer.body, body);
        body.push(7);
        assert_eq!(
            verify(body).map(|_| ()),
            Err(VerifyError::Body(DecodeError::Trailing(MAX_LATER + 1)))
        );
        let mut forged = known;
        forged.push(0);
        let signature = id.sign_bytes(&forged);
        forged.push(0);
        assert_eq!(
            UnverifiedRecord::check(id.id(), forged, signature)
                .and_then(UnverifiedRecord::verify)
                .map(|_| ()),
            Err(VerifyError::BadSignature),
            "the later bytes are signed like the rest"
        );
    }

    /// A certificate rides after the homes, in a slot a build before certificates takes for a
    /// later field (within [`MAX_LATER`]); with it, homes still go only with mappings.
    #[test]
    fn a_certificate_round_trips_with_and_without_mappings() {
        let id = Identity::from_wireguard_key(&[1; 32]);
        let ca = crate::AuthorityKey::from_seed(&[9; 32]);
        let block: IpNet = "100.64.3.0/24".parse().unwrap();
        let cert = ca
            .issue(id.wireguard_key(), vec![block], 1, 2)
            .expect("issue");
        assert!(
            2 + cert.to_bytes().len() <= MAX_LATER,
            "an older build keeps it"
        );
        let mut r = record("a", 7);
        r.wireguard_key = id.wireguard_key();
        r.certificate = Some(Box::new(cert));
        r.homes = Some(vec![[3; 32]]);
        let back = round_trip(&id.sign(&r)).unwrap().record;
        assert_eq!(back.certificate, r.certificate);
        assert_eq!(back.homes, None, "no mappings, no homes");
        r.observed = vec!["198.19.0.101:51820".parse().unwrap()];
        for homes in [None, Some(vec![]), Some(vec![[3; 32], [4; 32]])] {
            r.homes = homes;
            let back = round_trip(&id.sign(&r)).unwrap().record;
            assert_eq!(back.certificate, r.certificate);
            assert_eq!(back.observed, r.observed);
            // Written to reach the certificate, absent homes read as none.
            assert_eq!(back.homes, Some(r.homes.clone().unwrap_or_default()));
        }
        // A slot that does not hold a certificate is a bad record, not a panic.
        let mut w = Writer::default();
        r.homes = None;
        r.certificate = None;
        r.encode(&mut w);
        let mut body = w.into_bytes();
        // No homes, then a slot of 3 bytes that are no certificate.
        body.extend_from_slice(&[0, 0, 3, 1, 2, 3]);
        assert!(matches!(
            NodeRecord::decode(&mut Reader::new(&body)),
            Err(DecodeError::BadValue("certificate format", _) | DecodeError::Truncated(_))
        ));
        let mut body = body[..body.len() - 5].to_vec();
        body.extend_from_slice(&[0, 8]);
        body.extend_from_slice(b"WEFTCRT0");
        assert_eq!(
            NodeRecord::decode(&mut Reader::new(&body)).unwrap_err(),
            DecodeError::BadValue("certificate format", 0)
        );
    }

    #[test]
    fn the_id_is_the_wireguard_public_key_in_edwards_form() {
        for seed in 0..40u8 {
            let private = [seed.wrapping_mul(37).wrapping_add(1); 32];
            let id = Identity::from_wireguard_key(&private);
            let public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(private));
            // What `wg pubkey` prints, and what boringtun handshakes with.
            assert_eq!(id.wireguard_key(), *public.as_bytes(), "key {seed}");
            assert_eq!(
                NodeId::from_wireguard_key(public.as_bytes()),
                Some(id.id()),
                "key {seed}"
            );
            // Both signs of the point come up over 40 keys; each signs verifiably.
            let s = id.sign(&record("a", 1));
            assert_eq!(s.record.wireguard_key, *public.as_bytes());
            assert_eq!(round_trip(&s), Ok(s.clone()), "key {seed}");
        }
    }

    #[test]
    fn a_record_carrying_another_nodes_wireguard_key_does_not_verify() {
        let thief = Identity::from_wireguard_key(&[1; 32]);
        let victim = Identity::from_wireguard_key(&[2; 32]);
        // The thief signs a record naming the victim's key.
        let mut r = record("thief", 3);
        r.wireguard_key = victim.wireguard_key();
        let forged = thief.sign_unbound(r);
        assert_eq!(round_trip(&forged), Err(VerifyError::UnboundKey));
        // Presented as the victim's own, the signature fails instead.
        let mut as_victim = forged;
        as_victim.signer = victim.id();
        assert_eq!(round_trip(&as_victim), Err(VerifyError::BadSignature));
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
        assert_eq!(round_trip(&forged), Err(VerifyError::UnboundKey));
    }
}
