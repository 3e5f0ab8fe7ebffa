//! The gate every handshake message passes before any Diffie-Hellman: its MAC, the router's
//! load, and, under load, its source.
//!
//! WireGuard's handshake costs the receiver X25519 operations; a flood of them is answered in
//! three steps, the cheap ones first:
//!
//! 1. MAC1 must check (it needs this router's public key): anything else costs a hash.
//! 2. Past [`HANDSHAKE_RATE_LIMIT`] messages in a second the router is *under load*: a message
//!    without a valid MAC2 is answered with a cookie reply (boringtun's `RateLimiter`) and goes
//!    no further. A sender must receive at its address to get a cookie, so a spoofed flood stops
//!    here.
//! 3. Under load, a sender that does hold a cookie (it receives at its address) still gets at
//!    most [`PER_SOURCE_LIMIT`] messages a second through, counted by IP address (an IPv6
//!    address by its /64, as one host may hold them all) in a table of at most [`MAX_SOURCES`]
//!    (a new address finds it full: refused until the next second). So one host cannot keep
//!    every worker busy with Diffie-Hellmans, as kernel WireGuard's ratelimiter does not let it
//!    either. Loopback is not counted: it is the relay's shims, whose datagrams every relayed
//!    peer shares and only members (holding the cluster secret) can send.
//!
//! Every handshake message (initiation and response) is counted once, here, and this count
//! alone says whether the router is under load: under it, boringtun's `RateLimiter` checks
//! MAC1 only (a limiter never under load); past it, a limiter always under load checks MAC2 and
//! makes the cookies (its secret makes and checks them alike). The sessions' own check in
//! `Tunn::decapsulate` uses the first, so a message is never counted twice and no other
//! cookie secret is ever used.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use boringtun::noise::TunnResult;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::x25519::PublicKey;

use crate::stats::DropReason;

/// Handshake messages accepted per second before the router answers with cookies. A node that
/// restarts in a mesh of N meets N initiations and N answers to its own at once, a legitimate
/// burst: at 100 (boringtun's device default) a 60-node mesh already pushed peers into cookie
/// round trips and a 5 s retry (the chaos lab's restart limit). Kernel WireGuard turns to
/// cookies at 512 queued handshakes; 1000 a second covers a restart among ~500 peers. Up to the
/// limit a flood costs its Diffie-Hellmans (about 0.1 of a core at 1000 a second); past it,
/// only MACs.
pub const HANDSHAKE_RATE_LIMIT: u64 = 1000;
/// Under load, the handshake messages one IP address gets through per second (kernel
/// WireGuard: 20 a second).
pub const PER_SOURCE_LIMIT: u32 = 20;
/// Under load, the most addresses counted in one second; further ones are refused until the
/// next.
pub const MAX_SOURCES: usize = 8192;

/// Why a handshake message goes no further.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Under load without a valid MAC2: the cookie reply of this length is in the output
    /// buffer, for the sender.
    Cookie(usize),
    /// Dropped, for this reason.
    Drop(DropReason),
}

/// See the module docs.
pub(crate) struct Gate {
    /// Checks MAC1; never under load (also the sessions' limiter).
    mac1: Arc<RateLimiter>,
    /// Always under load: checks MAC2, answers with cookies.
    cookies: RateLimiter,
    /// Handshake messages this second.
    count: AtomicU64,
    /// Under load: messages this second by source ([`source`]).
    sources: Mutex<HashMap<IpAddr, u32>>,
}

impl Gate {
    /// The gate of the router with `public_key`.
    pub(crate) fn new(public_key: &PublicKey) -> Self {
        Self {
            mac1: Arc::new(RateLimiter::new(public_key, u64::MAX)),
            cookies: RateLimiter::new(public_key, 0),
            count: AtomicU64::new(0),
            sources: Mutex::default(),
        }
    }

    /// The limiter to give each session (`Tunn`): checks MAC1, never asks for a cookie.
    pub(crate) fn for_sessions(&self) -> Arc<RateLimiter> {
        self.mac1.clone()
    }

    /// Starts a new second (call about once a second).
    pub(crate) fn reset(&self) {
        self.count.store(0, Ordering::Relaxed);
        self.sources
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Whether the handshake message `datagram` from `from` goes on to its Diffie-Hellman; a
    /// cookie reply is written to `out`.
    pub(crate) fn admit(
        &self,
        from: IpAddr,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Result<(), Refused> {
        let under_load = self.count.load(Ordering::Relaxed) >= HANDSHAKE_RATE_LIMIT;
        let limiter = if under_load {
            &self.cookies
        } else {
            &*self.mac1
        };
        match limiter.verify_packet(Some(from), datagram, out) {
            Ok(_) => {}
            Err(TunnResult::WriteToNetwork(cookie)) => {
                self.count.fetch_add(1, Ordering::Relaxed);
                return Err(Refused::Cookie(cookie.len()));
            }
            Err(_) => return Err(Refused::Drop(DropReason::Unauthenticated)),
        }
        // Counted once MAC1 checks, answered or not.
        self.count.fetch_add(1, Ordering::Relaxed);
        if !under_load || from.is_loopback() {
            return Ok(());
        }
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        let (full, sender) = (sources.len() >= MAX_SOURCES, source(from));
        match sources.get_mut(&sender) {
            Some(n) if *n < PER_SOURCE_LIMIT => *n += 1,
            None if !full => {
                sources.insert(sender, 1);
            }
            _ => return Err(Refused::Drop(DropReason::RateLimited)),
        }
        Ok(())
    }
}

/// What one sender is counted as: its IPv4 address, or its IPv6 address's /64.
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(a) => IpAddr::V6((u128::from(a) & !((1u128 << 64) - 1)).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_sender_is_counted_by_its_64_and_an_ipv4_one_by_its_address() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source(a), source(b));
        assert_ne!(source(a), source(c));
        assert_eq!(source(a), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        let v4: IpAddr = "198.18.7.7".parse().unwrap();
        assert_eq!(source(v4), v4);
    }
}
