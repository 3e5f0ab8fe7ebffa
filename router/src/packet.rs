//! Just enough IP header parsing for routing and anti-spoofing: version, length, addresses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The addresses of a well-formed IPv4 or IPv6 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Addrs {
    pub(crate) src: IpAddr,
    pub(crate) dst: IpAddr,
}

/// Parses the header of `packet`; `None` when it is not a whole IPv4 or IPv6 packet (truncated,
/// a length field that disagrees with the bytes, an unknown version).
pub(crate) fn addrs(packet: &[u8]) -> Option<Addrs> {
    match packet.first()? >> 4 {
        4 => {
            let h: &[u8; 20] = packet.get(..20)?.try_into().ok()?;
            let ihl = usize::from(h[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
            if ihl < 20 || total < ihl || total > packet.len() {
                return None;
            }
            let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
            let dst = Ipv4Addr::new(h[16], h[17], h[18], h[19]);
            Some(Addrs {
                src: src.into(),
                dst: dst.into(),
            })
        }
        6 => {
            let h: &[u8; 40] = packet.get(..40)?.try_into().ok()?;
            let payload = usize::from(u16::from_be_bytes([h[4], h[5]]));
            if 40 + payload > packet.len() {
                return None;
            }
            let src: [u8; 16] = h[8..24].try_into().ok()?;
            let dst: [u8; 16] = h[24..40].try_into().ok()?;
            Some(Addrs {
                src: Ipv6Addr::from(src).into(),
                dst: Ipv6Addr::from(dst).into(),
            })
        }
        _ => None,
    }
}

/// Builds a minimal IPv4 or IPv6 packet (header plus `payload`), for tests of this crate and
/// of its users (feature `test-util`). Not a general packet builder: protocol 253
/// (experimental), no checksum.
#[cfg(any(test, feature = "test-util"))]
pub fn test_packet(src: IpAddr, dst: IpAddr, payload: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = u16::try_from(20 + payload.len()).unwrap_or(u16::MAX);
            let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 253, 0, 0];
            p[2..4].copy_from_slice(&total.to_be_bytes());
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(payload);
            p
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let len = u16::try_from(payload.len()).unwrap_or(u16::MAX);
            let mut p = vec![0x60, 0, 0, 0, 0, 0, 253, 64];
            p[4..6].copy_from_slice(&len.to_be_bytes());
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(payload);
            p
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v4_and_v6() {
        let p = test_packet([100, 64, 1, 1].into(), [100, 64, 2, 1].into(), b"hi");
        let a = addrs(&p).unwrap();
        assert_eq!(a.src, IpAddr::from([100, 64, 1, 1]));
        assert_eq!(a.dst, IpAddr::from([100, 64, 2, 1]));
        let s: IpAddr = "fd00::1".parse().unwrap();
        let d: IpAddr = "fd00::2".parse().unwrap();
        assert_eq!(
            addrs(&test_packet(s, d, b"x")),
            Some(Addrs { src: s, dst: d })
        );
    }

    #[test]
    fn rejects_truncated_and_lying_headers() {
        let p = test_packet([1, 1, 1, 1].into(), [2, 2, 2, 2].into(), b"hello");
        for n in 0..p.len() {
            assert_eq!(addrs(&p[..n]), None, "prefix of {n} bytes");
        }
        let mut bad_ihl = p.clone();
        bad_ihl[0] = 0x44;
        assert_eq!(addrs(&bad_ihl), None);
        assert_eq!(addrs(&[0x75; 40]), None);
    }
}
