//! The relay's side, pure: which node registered from where, and where data goes.
//!
//! A registration counts only when it names a member of the mesh ([`Registry::set_members`],
//! from the mesh's members at each round: so the registry holds at most one entry per member,
//! and a key made up for the purpose costs the relay no signature check), its signature
//! checks, it is newer than the one held for that node, and its time is within [`MAX_SKEW`] of
//! the relay's clock (an old one replayed by someone on the path is refused); it holds for
//! [`REGISTRATION_TTL`]. Data goes, unchanged, to where its destination last registered from,
//! and is counted on that entry. A node that leaves the mesh loses its registration at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::wire::{DropReason, Register, Short, short};

/// How long a registration holds without being renewed.
pub const REGISTRATION_TTL: Duration = Duration::from_secs(60);
/// How often a node renews its registrations (well inside the TTL, and inside the ~30 s a
/// NAT keeps an idle UDP mapping).
pub const REGISTER_EVERY: Duration = Duration::from_secs(15);
/// The largest difference between a registration's time and the relay's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(120);
/// The most nodes a relay holds registrations for.
pub const MAX_REGISTERED: usize = 65_536;

/// One registered node.
#[derive(Debug, Clone)]
struct Entry {
    key: [u8; 32],
    from: SocketAddr,
    at_ms: u64,
    seen: Instant,
    bytes: u64,
    packets: u64,
}

/// What a relay holds.
#[derive(Debug, Default)]
pub struct Registry {
    by: HashMap<Short, Entry>,
    /// The members' WireGuard keys, by their short form: who may register.
    members: HashMap<Short, [u8; 32]>,
}

/// A registered node as status shows it: its key, where it registered from, and what was
/// forwarded to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// Its WireGuard key.
    pub key: [u8; 32],
    /// Where it registered from.
    pub from: SocketAddr,
    /// Bytes forwarded to it.
    pub bytes: u64,
    /// Datagrams forwarded to it.
    pub packets: u64,
}

impl Registry {
    /// The mesh's members now (their WireGuard keys): only they may register; the
    /// registrations of nodes no longer among them are forgotten.
    pub fn set_members(&mut self, keys: impl IntoIterator<Item = [u8; 32]>) {
        self.members = keys.into_iter().map(|k| (short(&k), k)).collect();
        let members = &self.members;
        self.by
            .retain(|s, e| members.get(s).is_some_and(|k| *k == e.key));
    }

    /// Whether the key that starts with `s` is a member's.
    pub fn is_member(&self, s: Short) -> bool {
        self.members.contains_key(&s)
    }

    /// Takes `reg`, received from `from` at `now` (`now_ms` on the wall clock).
    pub fn register(
        &mut self,
        now: Instant,
        now_ms: u64,
        from: SocketAddr,
        reg: &Register,
    ) -> Result<(), DropReason> {
        let skew = u64::try_from(MAX_SKEW.as_millis()).unwrap_or(u64::MAX);
        if reg.at_ms.abs_diff(now_ms) > skew {
            return Err(DropReason::Stale);
        }
        let s = short(&reg.key);
        if self.members.get(&s) != Some(&reg.key) {
            return Err(DropReason::NotMember);
        }
        // An entry held under `s` is `reg.key`'s: only the member with that short form
        // registers, and `set_members` drops the entry of a key that is no longer it.
        let held = self.by.get(&s);
        // The same registration again from the same place (a node sends it in both forms
        // through an upgrade, wire docs): nothing to do, and nothing wrong.
        if held.is_some_and(|e| e.at_ms == reg.at_ms && e.from == from) {
            return Ok(());
        }
        if held.is_some_and(|e| e.at_ms >= reg.at_ms) {
            return Err(DropReason::Stale);
        }
        if held.is_none() && self.by.len() >= MAX_REGISTERED {
            self.expire(now);
            if self.by.len() >= MAX_REGISTERED {
                return Err(DropReason::Full);
            }
        }
        // The costly check last, once nothing cheaper refused it.
        if !reg.verify() {
            return Err(DropReason::Unauthenticated);
        }
        let e = self.by.entry(s).or_insert(Entry {
            key: reg.key,
            from,
            at_ms: 0,
            seen: now,
            bytes: 0,
            packets: 0,
        });
        e.from = from;
        e.at_ms = reg.at_ms;
        e.seen = now;
        Ok(())
    }

    /// Where data of `len` bytes for `dst` goes at `now` (counted), if it registered lately.
    pub fn forward(
        &mut self,
        now: Instant,
        dst: Short,
        len: usize,
    ) -> Result<SocketAddr, DropReason> {
        match self.by.get_mut(&dst) {
            Some(e) if now.saturating_duration_since(e.seen) < REGISTRATION_TTL => {
                e.bytes += len as u64;
                e.packets += 1;
                Ok(e.from)
            }
            _ => Err(DropReason::Unregistered),
        }
    }

    /// Forgets registrations older than [`REGISTRATION_TTL`].
    pub fn expire(&mut self, now: Instant) {
        self.by
            .retain(|_, e| now.saturating_duration_since(e.seen) < REGISTRATION_TTL);
    }

    /// The nodes registered now.
    pub fn registered(&self) -> Vec<Registered> {
        self.by
            .values()
            .map(|e| Registered {
                key: e.key,
                from: e.from,
                bytes: e.bytes,
                packets: e.packets,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::disallowed_methods,
        reason = "tests start their clock from a real instant"
    )]
    use weft_mesh::Identity;

    use super::*;

    const NOW_MS: u64 = 1_800_000_000_000;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn data_goes_where_its_destination_registered_from_until_the_registration_expires() {
        let t = Instant::now();
        let a = Identity::from_wireguard_key(&[1; 32]);
        let mut r = Registry::default();
        r.set_members([a.wireguard_key()]);
        let dst = short(&a.wireguard_key());
        assert_eq!(r.forward(t, dst, 100), Err(DropReason::Unregistered));
        r.register(
            t,
            NOW_MS,
            addr("198.19.0.101:40000"),
            &Register::sign(&a, NOW_MS),
        )
        .unwrap();
        assert_eq!(r.forward(t, dst, 100), Ok(addr("198.19.0.101:40000")));
        // A newer registration from a new mapping moves it.
        let t1 = t + Duration::from_secs(15);
        r.register(
            t1,
            NOW_MS + 15_000,
            addr("198.19.0.101:40001"),
            &Register::sign(&a, NOW_MS + 15_000),
        )
        .unwrap();
        assert_eq!(r.forward(t1, dst, 50), Ok(addr("198.19.0.101:40001")));
        assert_eq!(r.registered()[0].bytes, 150);
        assert_eq!(r.registered()[0].packets, 2);
        assert_eq!(
            r.forward(t1 + REGISTRATION_TTL, dst, 1),
            Err(DropReason::Unregistered)
        );
        r.expire(t1 + REGISTRATION_TTL);
        assert!(r.registered().is_empty());
    }

    #[test]
    fn replayed_old_skewed_and_forged_registrations_are_refused_and_move_nothing() {
        let t = Instant::now();
        let a = Identity::from_wireguard_key(&[1; 32]);
        let b = Identity::from_wireguard_key(&[2; 32]);
        let mut r = Registry::default();
        r.set_members([a.wireguard_key(), b.wireguard_key()]);
        let reg = Register::sign(&a, NOW_MS);
        r.register(t, NOW_MS, addr("198.19.0.101:40000"), &reg)
            .unwrap();
        // The same again from the same place (its legacy form): taken, nothing moves.
        let later = t + Duration::from_secs(30);
        r.register(later, NOW_MS, addr("198.19.0.101:40000"), &reg)
            .unwrap();
        assert_eq!(
            r.forward(t + REGISTRATION_TTL, short(&a.wireguard_key()), 1),
            Err(DropReason::Unregistered),
            "a repeat does not renew a registration"
        );
        // The same registration replayed from elsewhere (someone on the path): refused.
        assert_eq!(
            r.register(t, NOW_MS, addr("198.19.0.66:1"), &reg),
            Err(DropReason::Stale)
        );
        // Far from the relay's clock: refused.
        let old = Register::sign(&a, NOW_MS - 10 * 60_000);
        assert_eq!(
            r.register(t, NOW_MS, addr("198.19.0.66:1"), &old),
            Err(DropReason::Stale)
        );
        // b's signature presented as a's: refused.
        let forged = Register::sign(&b, NOW_MS + 1).forged_as(a.wireguard_key());
        assert_eq!(
            r.register(t, NOW_MS, addr("198.19.0.66:1"), &forged),
            Err(DropReason::Unauthenticated)
        );
        assert_eq!(
            r.forward(t, short(&a.wireguard_key()), 1),
            Ok(addr("198.19.0.101:40000"))
        );
    }

    #[test]
    fn only_members_register_and_a_node_that_leaves_loses_its_registration_at_once() {
        let t = Instant::now();
        let a = Identity::from_wireguard_key(&[1; 32]);
        let mut r = Registry::default();
        // Before the first round knows any member: nobody.
        assert_eq!(
            r.register(
                t,
                NOW_MS,
                addr("198.19.0.101:40000"),
                &Register::sign(&a, NOW_MS)
            ),
            Err(DropReason::NotMember)
        );
        r.set_members([a.wireguard_key()]);
        // An outsider's (or a member's made-up) keys, each validly signed by its own key, as
        // many as the registry could ever hold: none is held, and the member still registers.
        for i in 0..2_000u32 {
            let mut k = [7; 32];
            k[..4].copy_from_slice(&i.to_be_bytes());
            let stranger = Identity::from_wireguard_key(&k);
            assert_eq!(
                r.register(
                    t,
                    NOW_MS,
                    addr("203.0.113.9:1"),
                    &Register::sign(&stranger, NOW_MS)
                ),
                Err(DropReason::NotMember),
                "stranger {i}"
            );
        }
        // A key that shares a member's first 8 bytes is no member either.
        let mut lookalike = a.wireguard_key();
        lookalike[31] ^= 1;
        assert!(r.is_member(short(&lookalike)));
        assert_eq!(
            r.register(
                t,
                NOW_MS,
                addr("203.0.113.9:1"),
                &Register::sign(&a, NOW_MS).forged_as(lookalike)
            ),
            Err(DropReason::NotMember)
        );
        // A non-member's registration with a bad signature is refused as a stranger: its
        // signature is never checked.
        let forged = Register::sign(&a, NOW_MS).forged_as([9; 32]);
        assert_eq!(
            r.register(t, NOW_MS, addr("203.0.113.9:1"), &forged),
            Err(DropReason::NotMember)
        );
        r.register(
            t,
            NOW_MS,
            addr("198.19.0.101:40000"),
            &Register::sign(&a, NOW_MS),
        )
        .unwrap();
        assert_eq!(r.registered().len(), 1);
        let dst = short(&a.wireguard_key());
        assert_eq!(r.forward(t, dst, 1), Ok(addr("198.19.0.101:40000")));
        // a leaves the mesh: its registration goes with it, well before its TTL.
        r.set_members([]);
        assert!(r.registered().is_empty());
        assert_eq!(r.forward(t, dst, 1), Err(DropReason::Unregistered));
        assert!(!r.is_member(dst));
    }
}
