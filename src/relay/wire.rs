//! The relay port's datagrams, pure: encode, decode, authenticate.
//!
//! ```text
//! data     = 1 dst:8 src:8 inner mac:16   (dst, src: the first 8 bytes of WireGuard keys;
//!                                          mac: keyed BLAKE2s over everything before it)
//! register = 2 key:32 at_ms:u64 sig:64 mac:16
//!                                         (sig: key's own signature, context "weft relay register v1";
//!                                          mac: as data's, over everything before it)
//! register (legacy, without the MAC: what nodes before the MAC sent; still taken, see below)
//! probe    = 3 nonce:8 mac:16             (is the relay there?)
//! answer   = 4 nonce:8 mac:16             (the relay's answer, same nonce)
//! ```
//!
//! The MAC key comes from the cluster secret, so no outsider can make a relay forward
//! anything, nor register with a MAC'd registration. A legacy registration (no MAC) is still
//! taken, so that relays and nodes of both versions keep working together through a rolling
//! upgrade (a node sends both forms; an older relay reads only the legacy one): the relay's
//! member check ([`super::registry`]) runs first, so an outsider's made-up keys cost a lookup,
//! and only a member's key (which an outsider must know) costs a signature check. The legacy
//! form goes in a later release. The inner
//! datagram is the two ends' WireGuard, so no member can read or forge it either. A
//! registration is signed by the node it names, so no member can register as another and take
//! its relayed traffic (and the relay holds registrations only for members' keys:
//! [`super::registry`]).

use blake2::digest::{KeyInit, Mac};
use weft_mesh::{Identity, NodeId};

/// The first bytes of a WireGuard key: how data names its ends.
pub type Short = [u8; 8];

/// Bytes of a data header (type, dst, src).
pub const DATA_HEADER: usize = 17;
/// Bytes of a data MAC.
pub const MAC_LEN: usize = 16;
/// Bytes a relay adds to a WireGuard datagram.
pub const OVERHEAD: usize = DATA_HEADER + MAC_LEN;
/// Bytes of a registration.
pub const REGISTER_LEN: usize = LEGACY_REGISTER_LEN + MAC_LEN;
/// Bytes of a legacy registration (without the MAC).
pub const LEGACY_REGISTER_LEN: usize = 1 + 32 + 8 + 64;
/// What a registration signature is for.
const REGISTER_CONTEXT: &[u8] = b"weft relay register v1";

type Blake2sMac128 = blake2::Blake2sMac<blake2::digest::consts::U16>;

/// The short form of WireGuard key `key`.
pub fn short(key: &[u8; 32]) -> Short {
    let mut s = [0; 8];
    s.copy_from_slice(&key[..8]);
    s
}

/// The data MAC key of a cluster secret.
#[derive(Clone)]
pub struct MacKey([u8; 32]);

impl std::fmt::Debug for MacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MacKey(..)")
    }
}

impl MacKey {
    /// The key for `secret`, separate from every other use of it.
    pub fn new(secret: &[u8; 32]) -> Self {
        use blake2::Digest as _;
        let mut h = blake2::Blake2s256::new();
        blake2::Digest::update(&mut h, b"weft relay data key v1");
        blake2::Digest::update(&mut h, secret);
        Self(h.finalize().into())
    }

    fn start(&self) -> Blake2sMac128 {
        <Blake2sMac128 as KeyInit>::new_from_slice(&self.0).expect("a 32-byte key fits BLAKE2s")
    }

    fn mac(&self, bytes: &[u8]) -> [u8; MAC_LEN] {
        let mut m = self.start();
        Mac::update(&mut m, bytes);
        m.finalize().into_bytes().into()
    }
}

/// Why a datagram on the relay port is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Too short, or of an unknown type.
    Malformed,
    /// A data MAC or registration signature that does not check.
    Unauthenticated,
    /// A registration not newer than the one held, or too far from this node's clock.
    Stale,
    /// Data for a node not registered here (or whose registration expired).
    Unregistered,
    /// A registration when the registry is full.
    Full,
    /// A registration, or data, from a key that is no member of the mesh.
    NotMember,
}

impl DropReason {
    /// The reason, as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Unauthenticated => "unauthenticated",
            Self::Stale => "stale",
            Self::Unregistered => "unregistered",
            Self::Full => "full",
            Self::NotMember => "not_member",
        }
    }
}

/// Data from `src` to `dst` carrying `inner`, into `out` (cleared first).
pub fn encode_data(key: &MacKey, dst: Short, src: Short, inner: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.push(1);
    out.extend_from_slice(&dst);
    out.extend_from_slice(&src);
    out.extend_from_slice(inner);
    let mac = key.mac(out);
    out.extend_from_slice(&mac);
}

/// A datagram received on the relay port.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// Data, authenticated: its ends and the WireGuard datagram inside.
    Data {
        /// Where it goes.
        dst: Short,
        /// Where it comes from.
        src: Short,
        /// The WireGuard datagram.
        inner: &'a [u8],
    },
    /// A registration, not yet verified (see [`Register::verify`]).
    Register(Register),
    /// A probe, authenticated: answer it with [`encode_answer`].
    Probe(u64),
    /// A relay's answer to a probe, authenticated.
    Answer(u64),
}

/// Bytes of a probe or an answer.
pub const PROBE_LEN: usize = 1 + 8 + MAC_LEN;

fn encode_nonce(key: &MacKey, kind: u8, nonce: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(PROBE_LEN);
    b.push(kind);
    b.extend_from_slice(&nonce.to_be_bytes());
    let mac = key.mac(&b);
    b.extend_from_slice(&mac);
    b
}

/// A probe with `nonce`.
pub fn encode_probe(key: &MacKey, nonce: u64) -> Vec<u8> {
    encode_nonce(key, 3, nonce)
}

/// The answer to the probe with `nonce`.
pub fn encode_answer(key: &MacKey, nonce: u64) -> Vec<u8> {
    encode_nonce(key, 4, nonce)
}

/// A node's registration with a relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Register {
    /// The node's WireGuard key.
    pub key: [u8; 32],
    /// Its wall clock when it signed, ms since the epoch.
    pub at_ms: u64,
    signature: [u8; 64],
}

impl Register {
    /// `identity`'s registration at `at_ms`.
    pub fn sign(identity: &Identity, at_ms: u64) -> Self {
        let key = identity.wireguard_key();
        Self {
            key,
            at_ms,
            signature: identity.sign_message(REGISTER_CONTEXT, &Self::message(&key, at_ms)),
        }
    }

    fn message(key: &[u8; 32], at_ms: u64) -> [u8; 40] {
        let mut m = [0; 40];
        m[..32].copy_from_slice(key);
        m[32..].copy_from_slice(&at_ms.to_be_bytes());
        m
    }

    /// This registration's signature presented under `key`: what a member forging another's
    /// registration would send.
    #[cfg(test)]
    pub fn forged_as(&self, key: [u8; 32]) -> Self {
        Self {
            key,
            ..self.clone()
        }
    }

    /// Whether the node it names signed it.
    pub fn verify(&self) -> bool {
        NodeId::from_wireguard_key(&self.key).is_some_and(|id| {
            weft_mesh::verify_message(
                id,
                REGISTER_CONTEXT,
                &Self::message(&self.key, self.at_ms),
                &self.signature,
            )
            .is_ok()
        })
    }

    /// Its bytes, MAC'd with `key`.
    pub fn encode(&self, key: &MacKey) -> Vec<u8> {
        let mut b = self.encode_legacy();
        let mac = key.mac(&b);
        b.extend_from_slice(&mac);
        b
    }

    /// Its bytes in the legacy form, without the MAC (for relays from before it).
    pub fn encode_legacy(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(REGISTER_LEN);
        b.push(2);
        b.extend_from_slice(&self.key);
        b.extend_from_slice(&self.at_ms.to_be_bytes());
        b.extend_from_slice(&self.signature);
        b
    }
}

/// The registration in `body` (its type byte first, [`LEGACY_REGISTER_LEN`] bytes).
fn register(body: &[u8]) -> Register {
    let mut key = [0; 32];
    key.copy_from_slice(&body[1..33]);
    let mut at = [0; 8];
    at.copy_from_slice(&body[33..41]);
    let mut signature = [0; 64];
    signature.copy_from_slice(&body[41..LEGACY_REGISTER_LEN]);
    Register {
        key,
        at_ms: u64::from_be_bytes(at),
        signature,
    }
}

/// The part of `datagram` before its MAC, when the MAC checks (in constant time).
fn authenticated<'a>(key: &MacKey, datagram: &'a [u8]) -> Result<&'a [u8], DropReason> {
    let (body, mac) = datagram.split_at(datagram.len().saturating_sub(MAC_LEN));
    let mut m = key.start();
    Mac::update(&mut m, body);
    m.verify_slice(mac)
        .map_err(|_| DropReason::Unauthenticated)?;
    Ok(body)
}

/// Reads one datagram: only when its MAC checks (in constant time); a registration as it
/// claims, for [`Register::verify`] once the cheap checks passed.
pub fn decode<'a>(key: &MacKey, datagram: &'a [u8]) -> Result<Message<'a>, DropReason> {
    match datagram.first() {
        Some(1) if datagram.len() >= OVERHEAD => {
            let body = authenticated(key, datagram)?;
            let mut dst = [0; 8];
            let mut src = [0; 8];
            dst.copy_from_slice(&body[1..9]);
            src.copy_from_slice(&body[9..17]);
            Ok(Message::Data {
                dst,
                src,
                inner: &body[DATA_HEADER..],
            })
        }
        Some(kind @ (3 | 4)) if datagram.len() == PROBE_LEN => {
            let body = authenticated(key, datagram)?;
            let mut n = [0; 8];
            n.copy_from_slice(&body[1..9]);
            let nonce = u64::from_be_bytes(n);
            Ok(if *kind == 3 {
                Message::Probe(nonce)
            } else {
                Message::Answer(nonce)
            })
        }
        Some(2) if datagram.len() == REGISTER_LEN => {
            Ok(Message::Register(register(authenticated(key, datagram)?)))
        }
        Some(2) if datagram.len() == LEGACY_REGISTER_LEN => {
            Ok(Message::Register(register(datagram)))
        }
        _ => Err(DropReason::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_round_trips_and_any_flipped_bit_or_other_key_is_refused() {
        let key = MacKey::new(&[7; 32]);
        let mut out = Vec::new();
        encode_data(&key, [1; 8], [2; 8], b"wireguard bytes", &mut out);
        assert_eq!(
            decode(&key, &out),
            Ok(Message::Data {
                dst: [1; 8],
                src: [2; 8],
                inner: b"wireguard bytes"
            })
        );
        for i in 0..out.len() {
            let mut bad = out.clone();
            bad[i] ^= 0x10;
            assert!(decode(&key, &bad).is_err(), "bit flipped at {i}");
        }
        assert_eq!(
            decode(&MacKey::new(&[8; 32]), &out),
            Err(DropReason::Unauthenticated)
        );
        for n in 0..OVERHEAD {
            assert!(decode(&key, &out[..n]).is_err(), "cut at {n}");
        }
        assert_eq!(decode(&key, &[]), Err(DropReason::Malformed));
        assert_eq!(decode(&key, &encode_probe(&key, 9)), Ok(Message::Probe(9)));
        assert_eq!(
            decode(&key, &encode_answer(&key, 9)),
            Ok(Message::Answer(9))
        );
        let mut forged = encode_answer(&key, 9);
        forged[1] ^= 1;
        assert_eq!(decode(&key, &forged), Err(DropReason::Unauthenticated));
        assert_eq!(
            decode(&MacKey::new(&[8; 32]), &encode_probe(&key, 9)),
            Err(DropReason::Unauthenticated)
        );
        assert_eq!(decode(&key, &[9; 64]), Err(DropReason::Malformed));
    }

    #[test]
    fn a_registration_verifies_only_for_the_key_that_signed_it_and_with_the_cluster_mac_or_in_the_legacy_form()
     {
        let key = MacKey::new(&[7; 32]);
        let a = Identity::from_wireguard_key(&[1; 32]);
        let b = Identity::from_wireguard_key(&[2; 32]);
        let reg = Register::sign(&a, 1_000);
        let Ok(Message::Register(back)) = decode(&key, &reg.encode(&key)) else {
            panic!("a registration");
        };
        assert!(back.verify());
        // Signed by its node but MAC'd with another cluster's key (or none: an outsider's):
        // refused before its signature is looked at.
        assert_eq!(
            decode(&key, &reg.encode(&MacKey::new(&[8; 32]))),
            Err(DropReason::Unauthenticated)
        );
        let mut flipped = reg.encode(&key);
        flipped[40] ^= 1;
        assert_eq!(decode(&key, &flipped), Err(DropReason::Unauthenticated));
        // The legacy form (no MAC, from nodes before it): read, for the member check and the
        // signature, so that both versions register with each other through an upgrade.
        assert_eq!(reg.encode_legacy(), reg.encode(&key)[..LEGACY_REGISTER_LEN]);
        let Ok(Message::Register(legacy)) = decode(&key, &reg.encode_legacy()) else {
            panic!("a legacy registration");
        };
        assert_eq!(legacy, reg);
        // Any other length: malformed.
        assert_eq!(
            decode(&key, &reg.encode(&key)[..LEGACY_REGISTER_LEN + 1]),
            Err(DropReason::Malformed)
        );
        // b's signature under a's key: refused.
        let mut forged = Register::sign(&b, 1_000);
        forged.key = a.wireguard_key();
        assert!(!forged.verify());
        // A changed time: refused.
        let mut later = reg.clone();
        later.at_ms += 1;
        assert!(!later.verify());
        // Wrong length: malformed.
        let mut long = reg.encode(&key);
        long.push(0);
        assert_eq!(decode(&key, &long), Err(DropReason::Malformed));
    }
}
