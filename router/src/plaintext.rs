//! The plaintext encapsulation used between nodes that both trust each other's underlay subnet:
//! a 4-byte header in front of the inner IP packet, in one UDP datagram.
//!
//! ```text
//!  0      1      2        3
//! +------+------+--------+----------+--------------------
//! | 0x57 | 0x46 | version| reserved | inner IPv4/IPv6 packet
//! +------+------+--------+----------+--------------------
//! ```
//!
//! WireGuard messages start with a little-endian type 1 to 4 followed by three zero bytes, so the
//! first byte tells the two apart.

/// Bytes the plaintext header adds to every packet.
pub const HEADER_LEN: usize = 4;
/// The first two bytes of every plaintext datagram ("WF").
pub const MAGIC: [u8; 2] = [0x57, 0x46];
/// The header version this build speaks.
pub const VERSION: u8 = 1;

/// Why a datagram is not a valid plaintext packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than the header.
    #[error("datagram of {0} bytes is shorter than the plaintext header")]
    Truncated(usize),
    /// The magic bytes are wrong.
    #[error("not a plaintext datagram (bad magic)")]
    Magic,
    /// A version this build does not speak.
    #[error("unsupported plaintext version {0}")]
    Version(u8),
    /// The reserved byte is not zero.
    #[error("reserved byte is {0:#04x}, not zero")]
    Reserved(u8),
}

/// Whether `datagram` claims to be plaintext (its first byte is the magic's).
pub fn is_plaintext(datagram: &[u8]) -> bool {
    datagram.first() == Some(&MAGIC[0])
}

/// Checks the header and returns the inner packet.
pub fn decode(datagram: &[u8]) -> Result<&[u8], DecodeError> {
    let Some((h, inner)) = datagram.split_first_chunk::<HEADER_LEN>() else {
        return Err(DecodeError::Truncated(datagram.len()));
    };
    if h[..2] != MAGIC {
        return Err(DecodeError::Magic);
    }
    if h[2] != VERSION {
        return Err(DecodeError::Version(h[2]));
    }
    if h[3] != 0 {
        return Err(DecodeError::Reserved(h[3]));
    }
    Ok(inner)
}

/// Writes the header and `inner` into `out`; returns the datagram's length, or `None` when `out`
/// is too small.
pub fn encode(inner: &[u8], out: &mut [u8]) -> Option<usize> {
    let len = HEADER_LEN + inner.len();
    let out = out.get_mut(..len)?;
    out[..2].copy_from_slice(&MAGIC);
    out[2] = VERSION;
    out[3] = 0;
    out[HEADER_LEN..].copy_from_slice(inner);
    Some(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_bad_header_is_named() {
        assert_eq!(decode(&[0x57, 0x46]), Err(DecodeError::Truncated(2)));
        assert_eq!(decode(&[0x57, 0x00, 1, 0]), Err(DecodeError::Magic));
        assert_eq!(decode(&[0x57, 0x46, 9, 0]), Err(DecodeError::Version(9)));
        assert_eq!(decode(&[0x57, 0x46, 1, 7]), Err(DecodeError::Reserved(7)));
        assert!(
            !is_plaintext(&[1, 0, 0, 0]),
            "a WireGuard initiation is not plaintext"
        );
    }

    proptest! {
        #[test]
        fn round_trips(inner in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let mut buf = vec![0; 1600];
            let n = encode(&inner, &mut buf).unwrap();
            prop_assert_eq!(decode(&buf[..n]), Ok(&inner[..]));
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&bytes);
        }
    }
}
