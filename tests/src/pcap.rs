//! Just enough of the pcap format to check what a capture saw on the underlay.

use anyhow::{bail, ensure};

/// A UDP datagram from a capture.
#[derive(Debug, Clone)]
pub struct Datagram {
    /// Source address.
    pub src: std::net::Ipv4Addr,
    /// Destination address.
    pub dst: std::net::Ipv4Addr,
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// The UDP payload.
    pub payload: Vec<u8>,
}

/// The UDP-over-IPv4 datagrams in a pcap file with Ethernet framing (tcpdump -w).
pub fn udp_datagrams(file: &[u8]) -> anyhow::Result<Vec<Datagram>> {
    ensure!(
        file.len() >= 24,
        "a pcap file has a 24-byte header; this has {}",
        file.len()
    );
    let magic = u32::from_le_bytes([file[0], file[1], file[2], file[3]]);
    ensure!(
        magic == 0xa1b2_c3d4 || magic == 0xa1b2_3c4d,
        "not a little-endian pcap file"
    );
    let linktype = u32::from_le_bytes([file[20], file[21], file[22], file[23]]);
    ensure!(linktype == 1, "link type {linktype}, expected Ethernet (1)");
    let mut out = Vec::new();
    let mut pos = 24;
    while pos + 16 <= file.len() {
        let incl =
            u32::from_le_bytes([file[pos + 8], file[pos + 9], file[pos + 10], file[pos + 11]]);
        let start = pos + 16;
        let end = start + incl as usize;
        if end > file.len() {
            bail!("a record runs past the end of the capture");
        }
        let frame = &file[start..end];
        pos = end;
        if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] {
            continue;
        }
        let ip = &frame[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        if ip[9] != 17 || ip.len() < ihl + 8 {
            continue;
        }
        let udp = &ip[ihl..];
        out.push(Datagram {
            src: std::net::Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
            dst: std::net::Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
            src_port: u16::from_be_bytes([udp[0], udp[1]]),
            dst_port: u16::from_be_bytes([udp[2], udp[3]]),
            payload: udp[8..].to_vec(),
        });
    }
    Ok(out)
}

/// Whether `p` has the form of a WireGuard message: type 1-4, three zero bytes, and the size
/// of its type (data: a 16-byte header and a 16-byte tag around the sealed packet; boringtun does
/// not pad it to 16 bytes as wireguard-go does).
pub fn is_wireguard(p: &[u8]) -> bool {
    if p.len() < 4 || p[1..4] != [0, 0, 0] {
        return false;
    }
    match p[0] {
        1 => p.len() == 148,
        2 => p.len() == 92,
        3 => p.len() == 64,
        4 => p.len() >= 32,
        _ => false,
    }
}
