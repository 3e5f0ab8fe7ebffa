//! The gossip wire format: pure encode and decode of [`Frame`]s.
//!
//! A frame is one message on an (already authenticated and encrypted) gossip connection; the
//! transport delimits frames. Integers are big-endian; strings and blobs carry a length first;
//! an address is a family tag (0 none, 4, 6) and its bytes; a prefix is an address and a length.
//!
//! ```text
//! frame      = type:u8 body
//! 1 Hello        = node:32 mesh_port:u16
//! 2 Records      = count:u16 (signer:32 body_len:u16 body signature:64)*
//! 3 Digest       = reply:u8 count:u32 entry*
//! 4 Beats        = count:u32 entry*        (unsigned: decoded, never believed)
//! 5 SignedBeats  = count:u32 (entry signature:64)*
//! 6 Rumours      = count:u32 (kind:u8 entry signature:64)*   (kind: 0 alive, 1 suspect)
//! 7 Observed     = by:32 address port:u16 at_ms:u64 signature:64
//!                  (where the receiver's WireGuard datagrams come from, signed by `by`)
//! entry          = node:u64 version:u64 heartbeat:u32     (node: the first 8 bytes of its id)
//! ```
//!
//! Digest and heartbeat entries name a member by the first 8 bytes of its id, so that the
//! frames that make up steady-state gossip stay small (20 bytes per member in a digest, 84 per
//! signed beat). A digest entry's heartbeat only tells the receiver what to send back; liveness
//! moves only on a beat its origin signed ([`crate::Beat`]). `SignedBeats` go from a node to its
//! own connections; `Rumours` spread through the whole mesh (see [`crate::Rumour`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

use crate::beat::{Beat, Rumour};
use crate::record::{
    MAX_NAME, MAX_OBSERVED, MAX_PREFIXES, NodeId, ShortId, UnverifiedRecord, VerifyError,
};

/// The largest frame accepted.
pub const MAX_FRAME: usize = 4 << 20;

/// Why bytes are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes end inside a field.
    #[error("truncated: {0} more bytes needed")]
    Truncated(usize),
    /// Bytes are left after the frame.
    #[error("{0} bytes after the end of the frame")]
    Trailing(usize),
    /// A frame type this build does not know.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// A field holds a value it cannot hold.
    #[error("bad {0}: {1}")]
    BadValue(&'static str, u64),
    /// A string is not UTF-8.
    #[error("a string is not UTF-8")]
    NotUtf8,
    /// The frame is larger than [`MAX_FRAME`].
    #[error("frame of {0} bytes is larger than the limit")]
    TooLarge(usize),
}

/// One entry of a digest or a heartbeat batch: what a node knows of one member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The member.
    pub node: ShortId,
    /// The version of its record.
    pub version: u64,
    /// Its heartbeat counter.
    pub heartbeat: u32,
}

/// Bytes of one entry on the wire.
const ENTRY_LEN: usize = 20;
/// Bytes of one signed beat on the wire.
const BEAT_LEN: usize = ENTRY_LEN + 64;

/// A gossip message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The first frame on a connection: who is speaking.
    Hello {
        /// The sender.
        node: NodeId,
        /// The sender's gossip port.
        mesh_port: u16,
    },
    /// Signed records, decoded and bound to their signers' keys but with signatures not yet
    /// checked; each stands on its own (a bad one does not spoil the others).
    Records(Vec<Result<UnverifiedRecord, VerifyError>>),
    /// What the sender knows, for anti-entropy; `reply` asks for the receiver's digest back.
    Digest {
        /// Whether the receiver should answer with its own digest.
        reply: bool,
        /// One entry per member the sender knows.
        entries: Vec<Entry>,
    },
    /// Unsigned heartbeats, as builds before signed beats sent them: decoded, counted, and
    /// never believed.
    Beats(Vec<Entry>),
    /// Heartbeats signed by their origins, sent to a node's own connections.
    SignedBeats(Vec<Beat>),
    /// Changes of liveness to spread through the mesh, each carrying a beat its subject
    /// signed.
    Rumours(Vec<Rumour>),
    /// The address and port the receiver's authenticated WireGuard datagrams arrive from at
    /// the sender, signed by the sender for the receiver: how a node behind NAT learns its
    /// mapping.
    Observed(crate::Observation),
}

/// Appends big-endian fields to a buffer.
#[derive(Debug, Default)]
pub(crate) struct Writer(Vec<u8>);

impl Writer {
    pub(crate) fn into_bytes(self) -> Vec<u8> {
        self.0
    }
    pub(crate) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    /// A blob of at most 65535 bytes (longer ones are cut; records are far smaller).
    pub(crate) fn blob(&mut self, b: &[u8]) {
        let n = b.len().min(usize::from(u16::MAX));
        self.u16(n as u16);
        self.bytes(&b[..n]);
    }
    /// A string of at most [`MAX_NAME`] bytes.
    pub(crate) fn str(&mut self, s: &str) {
        let mut n = s.len().min(MAX_NAME);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.u8(n as u8);
        self.bytes(&s.as_bytes()[..n]);
    }
    pub(crate) fn addr(&mut self, a: Option<IpAddr>) {
        match a {
            None => self.u8(0),
            Some(IpAddr::V4(v4)) => {
                self.u8(4);
                self.bytes(&v4.octets());
            }
            Some(IpAddr::V6(v6)) => {
                self.u8(6);
                self.bytes(&v6.octets());
            }
        }
    }
    /// At most [`MAX_PREFIXES`] prefixes.
    pub(crate) fn endpoint(&mut self, e: SocketAddr) {
        self.addr(Some(e.ip()));
        self.u16(e.port());
    }
    pub(crate) fn endpoints(&mut self, es: &[SocketAddr]) {
        self.u8(u8::try_from(es.len()).unwrap_or(u8::MAX));
        for e in es.iter().take(usize::from(u8::MAX)) {
            self.endpoint(*e);
        }
    }
    pub(crate) fn nets(&mut self, nets: &[IpNet]) {
        let nets = &nets[..nets.len().min(MAX_PREFIXES)];
        self.u8(nets.len() as u8);
        for n in nets {
            self.addr(Some(n.addr()));
            self.u8(n.prefix_len());
        }
    }
    fn entry(&mut self, e: &Entry) {
        self.u64(e.node.0);
        self.u64(e.version);
        self.u32(e.heartbeat);
    }
    fn entries(&mut self, entries: &[Entry]) {
        self.u32(u32::try_from(entries.len()).unwrap_or(u32::MAX));
        for e in entries {
            self.entry(e);
        }
    }
    fn beat(&mut self, b: &Beat) {
        self.entry(&Entry {
            node: b.node,
            version: b.version,
            heartbeat: b.heartbeat,
        });
        self.bytes(&b.signature);
    }
    fn beats(&mut self, beats: &[Beat]) {
        self.u32(u32::try_from(beats.len()).unwrap_or(u32::MAX));
        for b in beats {
            self.beat(b);
        }
    }
    fn rumours(&mut self, rumours: &[Rumour]) {
        self.u32(u32::try_from(rumours.len()).unwrap_or(u32::MAX));
        for r in rumours {
            let (kind, b) = match r {
                Rumour::Alive(b) => (0, b),
                Rumour::Suspect(b) => (1, b),
            };
            self.u8(kind);
            self.beat(b);
        }
    }
}

/// Reads big-endian fields, never past the end.
#[derive(Debug)]
pub(crate) struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    pub(crate) fn new(b: &'a [u8]) -> Self {
        Self(b)
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated(n - self.0.len()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    pub(crate) fn blob(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }
    pub(crate) fn str(&mut self) -> Result<String, DecodeError> {
        let n = usize::from(self.u8()?);
        if n > MAX_NAME {
            return Err(DecodeError::BadValue("string length", n as u64));
        }
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::NotUtf8)
    }
    pub(crate) fn addr(&mut self) -> Result<Option<IpAddr>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            4 => Ok(Some(Ipv4Addr::from(self.array::<4>()?).into())),
            6 => Ok(Some(Ipv6Addr::from(self.array::<16>()?).into())),
            t => Err(DecodeError::BadValue("address family", u64::from(t))),
        }
    }
    pub(crate) fn endpoint(&mut self) -> Result<SocketAddr, DecodeError> {
        let ip = self
            .addr()?
            .ok_or(DecodeError::BadValue("endpoint family", 0))?;
        Ok(SocketAddr::new(ip, self.u16()?))
    }
    pub(crate) fn endpoints(&mut self) -> Result<Vec<SocketAddr>, DecodeError> {
        let n = usize::from(self.u8()?);
        if n > MAX_OBSERVED {
            return Err(DecodeError::BadValue("endpoint count", n as u64));
        }
        (0..n).map(|_| self.endpoint()).collect()
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub(crate) fn remaining(&self) -> usize {
        self.0.len()
    }
    pub(crate) fn nets(&mut self) -> Result<Vec<IpNet>, DecodeError> {
        let n = usize::from(self.u8()?);
        if n > MAX_PREFIXES {
            return Err(DecodeError::BadValue("prefix count", n as u64));
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let addr = self
                .addr()?
                .ok_or(DecodeError::BadValue("prefix family", 0))?;
            let len = self.u8()?;
            let net = IpNet::new(addr, len)
                .map_err(|_| DecodeError::BadValue("prefix length", u64::from(len)))?;
            out.push(net);
        }
        Ok(out)
    }
    /// A count of items of `len` bytes each, refused before allocating when the bytes left
    /// cannot hold them.
    fn count(&mut self, len: usize) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        let need = n.saturating_mul(len);
        if need > self.0.len() {
            return Err(DecodeError::Truncated(need - self.0.len()));
        }
        Ok(n)
    }
    fn entry(&mut self) -> Result<Entry, DecodeError> {
        Ok(Entry {
            node: ShortId(self.u64()?),
            version: self.u64()?,
            heartbeat: self.u32()?,
        })
    }
    fn entries(&mut self) -> Result<Vec<Entry>, DecodeError> {
        let n = self.count(ENTRY_LEN)?;
        (0..n).map(|_| self.entry()).collect()
    }
    fn beat(&mut self) -> Result<Beat, DecodeError> {
        let e = self.entry()?;
        Ok(Beat {
            node: e.node,
            version: e.version,
            heartbeat: e.heartbeat,
            signature: self.array()?,
        })
    }
    fn beats(&mut self) -> Result<Vec<Beat>, DecodeError> {
        let n = self.count(BEAT_LEN)?;
        (0..n).map(|_| self.beat()).collect()
    }
    fn rumours(&mut self) -> Result<Vec<Rumour>, DecodeError> {
        let n = self.count(1 + BEAT_LEN)?;
        (0..n)
            .map(|_| match self.u8()? {
                0 => Ok(Rumour::Alive(self.beat()?)),
                1 => Ok(Rumour::Suspect(self.beat()?)),
                k => Err(DecodeError::BadValue("rumour kind", u64::from(k))),
            })
            .collect()
    }
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Trailing(self.0.len()))
        }
    }
}

impl Frame {
    /// The frame's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            Self::Hello { node, mesh_port } => {
                w.u8(1);
                w.bytes(&node.0);
                w.u16(*mesh_port);
            }
            Self::Records(records) => {
                w.u8(2);
                let ok: Vec<&UnverifiedRecord> =
                    records.iter().filter_map(|r| r.as_ref().ok()).collect();
                let n = ok.len().min(usize::from(u16::MAX));
                w.u16(n as u16);
                for r in &ok[..n] {
                    r.encode(&mut w);
                }
            }
            Self::Digest { reply, entries } => {
                w.u8(3);
                w.u8(u8::from(*reply));
                w.entries(entries);
            }
            Self::Beats(entries) => {
                w.u8(4);
                w.entries(entries);
            }
            Self::SignedBeats(beats) => {
                w.u8(5);
                w.beats(beats);
            }
            Self::Rumours(rumours) => {
                w.u8(6);
                w.rumours(rumours);
            }
            Self::Observed(o) => {
                w.u8(7);
                w.bytes(&o.by.0);
                w.endpoint(o.endpoint);
                w.u64(o.at_ms);
                w.bytes(&o.signature);
            }
        }
        w.into_bytes()
    }

    /// Decodes one frame; every byte must belong to it.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_FRAME {
            return Err(DecodeError::TooLarge(bytes.len()));
        }
        let mut r = Reader::new(bytes);
        let frame = match r.u8()? {
            1 => Self::Hello {
                node: NodeId(r.array()?),
                mesh_port: r.u16()?,
            },
            2 => {
                let n = r.u16()?;
                let mut records = Vec::new();
                for _ in 0..n {
                    records.push(UnverifiedRecord::decode(&mut r)?);
                }
                Self::Records(records)
            }
            3 => {
                let reply = match r.u8()? {
                    0 => false,
                    1 => true,
                    v => return Err(DecodeError::BadValue("reply", u64::from(v))),
                };
                Self::Digest {
                    reply,
                    entries: r.entries()?,
                }
            }
            4 => Self::Beats(r.entries()?),
            5 => Self::SignedBeats(r.beats()?),
            6 => Self::Rumours(r.rumours()?),
            7 => Self::Observed(crate::Observation {
                by: NodeId(r.array()?),
                endpoint: r.endpoint()?,
                at_ms: r.u64()?,
                signature: r.array()?,
            }),
            t => return Err(DecodeError::UnknownType(t)),
        };
        r.finish()?;
        Ok(frame)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::record::Identity;
    use crate::record::tests::record;

    fn frames() -> Vec<Frame> {
        let id = Identity::from_wireguard_key(&[5; 32]);
        let e = Entry {
            node: id.id().short(),
            version: 3,
            heartbeat: 99,
        };
        vec![
            Frame::Hello {
                node: id.id(),
                mesh_port: 6783,
            },
            Frame::Records(vec![
                Ok(id.sign(&record("a", 1)).into()),
                Ok(id.sign(&record("a", 2)).into()),
            ]),
            Frame::Digest {
                reply: true,
                entries: vec![e, e],
            },
            Frame::Beats(vec![e]),
            Frame::Records(vec![]),
            Frame::SignedBeats(vec![Beat::sign(&id, 3, 99), Beat::sign(&id, 3, 100)]),
            Frame::Rumours(vec![
                Rumour::Alive(Beat::sign(&id, 3, 101)),
                Rumour::Suspect(Beat::sign(&id, 3, 100)),
            ]),
            Frame::Observed(crate::Observation::sign(
                &id,
                &id.id(),
                "198.19.0.101:51820".parse().expect("endpoint"),
                7,
            )),
            Frame::Observed(crate::Observation::sign(
                &id,
                &id.id(),
                "[2001:db8::1]:40000".parse().expect("endpoint"),
                8,
            )),
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        for f in frames() {
            assert_eq!(Frame::decode(&f.encode()), Ok(f));
        }
    }

    #[test]
    fn every_truncation_and_extension_is_an_error() {
        for f in frames() {
            let b = f.encode();
            for n in 0..b.len() {
                assert!(Frame::decode(&b[..n]).is_err(), "{f:?} cut at {n}");
            }
            let mut longer = b.clone();
            longer.push(0);
            assert_eq!(Frame::decode(&longer), Err(DecodeError::Trailing(1)));
        }
        assert_eq!(Frame::decode(&[9]), Err(DecodeError::UnknownType(9)));
        // A rumour of a kind this build does not know.
        let mut odd = Frame::Rumours(vec![Rumour::Alive(Beat::sign(
            &Identity::from_wireguard_key(&[5; 32]),
            1,
            1,
        ))])
        .encode();
        odd[5] = 7;
        assert_eq!(
            Frame::decode(&odd),
            Err(DecodeError::BadValue("rumour kind", 7))
        );
        // A count that claims more entries than the bytes hold is refused before allocating.
        for t in [4, 5, 6] {
            assert!(matches!(
                Frame::decode(&[t, 0xff, 0xff, 0xff, 0xff]),
                Err(DecodeError::Truncated(_))
            ));
        }
    }

    #[test]
    fn a_record_with_a_bad_signature_is_refused_alone() {
        let id = Identity::from_wireguard_key(&[5; 32]);
        let good = id.sign(&record("a", 1));
        let mut bad = id.sign(&record("a", 2));
        bad.signature[0] ^= 1;
        let mut unbound = id.sign(&record("a", 3));
        unbound.signer = Identity::from_wireguard_key(&[6; 32]).id();
        let bytes = Frame::Records(vec![
            Ok(good.clone().into()),
            Ok(bad.into()),
            Ok(unbound.into()),
        ])
        .encode();
        let Ok(Frame::Records(rs)) = Frame::decode(&bytes) else {
            panic!("decodes")
        };
        let mut rs = rs.into_iter();
        let verified: Vec<_> = rs
            .by_ref()
            .take(2)
            .map(|r| r.and_then(UnverifiedRecord::verify))
            .collect();
        assert_eq!(verified, vec![Ok(good), Err(VerifyError::BadSignature)]);
        // Bound to the wrong signer: refused while decoding, before any signature check.
        assert_eq!(rs.next(), Some(Err(VerifyError::UnboundKey)));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Frame::decode(&bytes);
        }

        #[test]
        fn mutated_frames_never_panic(i in 0usize..7, pos in any::<usize>(), bit in 0u8..8) {
            let mut b = frames()[i].encode();
            let p = pos % b.len();
            b[p] ^= 1 << bit;
            let _ = Frame::decode(&b);
        }
    }
}
