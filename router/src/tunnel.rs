//! The crate-private [`Tunnel`] trait in front of boringtun's `noise::Tunn`.
//!
//! boringtun 0.7 reads the clock inside `Tunn`, so the router's own logic (routing, queueing,
//! counters, anti-spoofing) is tested against a fake tunnel, and the real `Tunn` only in pairwise
//! handshake and data tests.

use std::net::IpAddr;

use boringtun::noise::{Tunn, TunnResult};

/// One WireGuard session with one peer, as the router uses it.
pub(crate) trait Tunnel: Send {
    /// Encrypts `src` into `dst` or queues it and starts a handshake.
    fn encapsulate<'a>(&mut self, src: &[u8], dst: &'a mut [u8]) -> TunnResult<'a>;
    /// Handles one datagram (or, when empty, drains what the last one left queued).
    fn decapsulate<'a>(
        &mut self,
        src_addr: Option<IpAddr>,
        datagram: &[u8],
        dst: &'a mut [u8],
    ) -> TunnResult<'a>;
    /// Runs the WireGuard timers: keepalives, rekeys, handshake retries.
    fn update_timers<'a>(&mut self, dst: &'a mut [u8]) -> TunnResult<'a>;
    /// Starts a handshake now (unless one is already under way).
    fn initiate<'a>(&mut self, dst: &'a mut [u8]) -> TunnResult<'a>;
}

impl Tunnel for Tunn {
    fn encapsulate<'a>(&mut self, src: &[u8], dst: &'a mut [u8]) -> TunnResult<'a> {
        Self::encapsulate(self, src, dst)
    }
    fn decapsulate<'a>(
        &mut self,
        src_addr: Option<IpAddr>,
        datagram: &[u8],
        dst: &'a mut [u8],
    ) -> TunnResult<'a> {
        Self::decapsulate(self, src_addr, datagram, dst)
    }
    fn update_timers<'a>(&mut self, dst: &'a mut [u8]) -> TunnResult<'a> {
        Self::update_timers(self, dst)
    }
    fn initiate<'a>(&mut self, dst: &'a mut [u8]) -> TunnResult<'a> {
        Self::format_handshake_initiation(self, dst, false)
    }
}
