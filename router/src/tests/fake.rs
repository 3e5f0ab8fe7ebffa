//! A fake WireGuard session: data messages framed like WireGuard's (so they pass
//! `Tunn::parse_incoming_packet`) but "sealed" with a fixed tag, a replay check on the counter,
//! and timers that play a script.

use std::collections::{HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};

use boringtun::noise::TunnResult;
use boringtun::noise::errors::WireGuardError;

use crate::tunnel::Tunnel;

/// The "authentication tag" every fake data message ends with.
pub(crate) const TAG: [u8; 16] = [0xa5; 16];

/// What the fake's `update_timers` returns on one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timer {
    Nothing,
    Keepalive,
    Expired,
}

/// What a test can see and steer from outside.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub(crate) timer_calls: usize,
    pub(crate) initiations: usize,
    pub(crate) script: VecDeque<Timer>,
}

pub(crate) struct FakeTunnel {
    /// The receiver index this side puts in its data messages.
    remote_idx: u32,
    tx_counter: u64,
    seen: HashSet<u64>,
    pub(crate) shared: Arc<Mutex<Shared>>,
}

impl FakeTunnel {
    pub(crate) fn new(remote_idx: u32) -> (Self, Arc<Mutex<Shared>>) {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let t = Self {
            remote_idx,
            tx_counter: 0,
            seen: HashSet::new(),
            shared: shared.clone(),
        };
        (t, shared)
    }
}

/// A fake data message to `receiver_idx` with counter `ctr` carrying `inner`.
pub(crate) fn data_message(receiver_idx: u32, ctr: u64, inner: &[u8]) -> Vec<u8> {
    let mut m = vec![4, 0, 0, 0];
    m.extend_from_slice(&receiver_idx.to_le_bytes());
    m.extend_from_slice(&ctr.to_le_bytes());
    m.extend_from_slice(inner);
    m.extend_from_slice(&TAG);
    m
}

fn write<'a>(dst: &'a mut [u8], bytes: &[u8]) -> TunnResult<'a> {
    match dst.get_mut(..bytes.len()) {
        Some(d) => {
            d.copy_from_slice(bytes);
            TunnResult::WriteToNetwork(d)
        }
        None => TunnResult::Err(WireGuardError::DestinationBufferTooSmall),
    }
}

impl Tunnel for FakeTunnel {
    fn encapsulate<'a>(&mut self, src: &[u8], dst: &'a mut [u8]) -> TunnResult<'a> {
        let msg = data_message(self.remote_idx, self.tx_counter, src);
        self.tx_counter += 1;
        write(dst, &msg)
    }

    fn decapsulate<'a>(
        &mut self,
        _src_addr: Option<IpAddr>,
        datagram: &[u8],
        dst: &'a mut [u8],
    ) -> TunnResult<'a> {
        if datagram.is_empty() {
            return TunnResult::Done;
        }
        if datagram.len() < 32 || datagram[..4] != [4, 0, 0, 0] {
            return TunnResult::Err(WireGuardError::InvalidPacket);
        }
        let (body, tag) = datagram.split_at(datagram.len() - 16);
        if tag != TAG {
            return TunnResult::Err(WireGuardError::InvalidAeadTag);
        }
        let ctr = u64::from_le_bytes(body[8..16].try_into().expect("8 bytes"));
        if !self.seen.insert(ctr) {
            return TunnResult::Err(WireGuardError::DuplicateCounter);
        }
        let inner = &body[16..];
        if inner.is_empty() {
            return TunnResult::Done;
        }
        let n = inner.len();
        dst[..n].copy_from_slice(inner);
        match inner[0] >> 4 {
            4 => {
                let src = Ipv4Addr::new(inner[12], inner[13], inner[14], inner[15]);
                TunnResult::WriteToTunnelV4(&mut dst[..n], src)
            }
            6 => {
                let s: [u8; 16] = inner[8..24].try_into().expect("16 bytes");
                TunnResult::WriteToTunnelV6(&mut dst[..n], Ipv6Addr::from(s))
            }
            _ => TunnResult::Err(WireGuardError::InvalidPacket),
        }
    }

    fn initiate<'a>(&mut self, dst: &'a mut [u8]) -> TunnResult<'a> {
        // A stand-in initiation: type 1, the right length.
        let mut m = vec![0u8; 148];
        m[0] = 1;
        self.shared.lock().expect("lock").initiations += 1;
        write(dst, &m)
    }

    fn update_timers<'a>(&mut self, dst: &'a mut [u8]) -> TunnResult<'a> {
        let next = {
            let mut s = self.shared.lock().expect("lock");
            s.timer_calls += 1;
            s.script.pop_front().unwrap_or(Timer::Nothing)
        };
        match next {
            Timer::Nothing => TunnResult::Done,
            Timer::Keepalive => {
                let msg = data_message(self.remote_idx, self.tx_counter, &[]);
                self.tx_counter += 1;
                write(dst, &msg)
            }
            Timer::Expired => TunnResult::Err(WireGuardError::ConnectionExpired),
        }
    }
}
