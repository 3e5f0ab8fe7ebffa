//! Two claims on one thing: the same identity on two daemons, and two members advertising the
//! same address.
//!
//! A restarted node outdoes the records of its earlier life once or twice. Two daemons with the
//! same WireGuard key (a cloned VM image, a restored state directory) would outdo each other
//! forever, and every other node would flip between their records. Each stops after
//! [`MAX_BIDS`] bids within [`BID_WINDOW`] liveness timeouts, reports an [`IdentityClash`]
//! naming both daemons' addresses, and from then on refuses the other's records.
//!
//! A member that advertises an address an established member (known here at that address
//! earlier, alive) already advertises is held down, not routed, while the established member
//! lives: no member can take another's endpoint by publishing its address. Ties (a node that
//! learns both at once) go to the smaller id.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::Instant;

use tracing::{debug, error};

use super::accept::Forged;
use super::{Event, Membership};
use crate::record::{NodeId, NodeRecord, UnverifiedRecord};
use crate::stats::Rejected;

/// Bids (outdoing a record of this node's identity) that end in a clash.
pub const MAX_BIDS: usize = 4;
/// The bids counted are those of the last this many liveness timeouts.
pub const BID_WINDOW: u32 = 10;

/// Another daemon with this node's identity, as both publish it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentityClash {
    /// This daemon's private address.
    pub our_private: Option<IpAddr>,
    /// This daemon's public address.
    pub our_public: Option<IpAddr>,
    /// The other daemon's private address, from the record it signed with our key.
    pub their_private: Option<IpAddr>,
    /// The other daemon's public address.
    pub their_public: Option<IpAddr>,
}

/// A member held down because an established member already advertises one of its addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressClash {
    /// The member held down.
    pub member: NodeId,
    /// The address both advertise.
    pub address: IpAddr,
    /// Who keeps it: the established member (or this node itself).
    pub owner: NodeId,
}

/// The bids made, for [`MAX_BIDS`].
#[derive(Debug, Default)]
pub(super) struct Bids {
    times: VecDeque<Instant>,
    clash: Option<IdentityClash>,
}

/// One address claim: public addresses are global; private ones only mean something within a
/// region.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Claim<'a> {
    Public(IpAddr),
    Private(Option<&'a str>, IpAddr),
}

fn claims(r: &NodeRecord) -> impl Iterator<Item = Claim<'_>> {
    let public = r.public_address.map(Claim::Public);
    let private = r
        .private_address
        .map(|a| Claim::Private(r.region.as_deref(), a));
    public.into_iter().chain(private)
}

/// Whether two records advertise the same addresses (in the same region).
pub(super) fn same_addresses(a: &NodeRecord, b: &NodeRecord) -> bool {
    claims(a).eq(claims(b))
}

/// A 32-bit FNV-1a hash of an address, for the tally of addresses advertised.
fn address_hash(a: IpAddr) -> u32 {
    let bytes = match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    bytes.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

fn address(c: &Claim<'_>) -> IpAddr {
    match c {
        Claim::Public(a) | Claim::Private(_, a) => *a,
    }
}

impl Membership {
    /// Another daemon with this node's identity, once detected.
    pub fn identity_clash(&self) -> Option<IdentityClash> {
        self.bids.clash
    }

    /// The members held down for an address an established member advertises.
    pub fn address_clashes(&self) -> Vec<AddressClash> {
        self.known
            .values()
            .filter_map(|k| k.held.as_deref().copied())
            .collect()
    }

    /// A record signed with this node's identity came back. Our current record (over a second
    /// connection, say) or an older one changes nothing and costs no signature check. A newer
    /// or different one is an earlier life's, or another daemon's with our key: outdo it,
    /// unless that has happened [`MAX_BIDS`] times lately. [`Forged`] when its signature
    /// fails.
    pub(super) fn own_record_back(
        &mut self,
        now: Instant,
        u: UnverifiedRecord,
    ) -> Result<(), Forged> {
        let earlier_life = {
            let (theirs, ours) = (u.record(), &self.own.record);
            // The signed bytes, not the decoded records: a record does not always decode to
            // the one encoded (homes without mappings are not written), and our own record
            // coming back must not look like another's.
            theirs.version > ours.version
                || (theirs.version == ours.version && u.body() != self.own.body.as_slice())
        };
        if !earlier_life {
            return Ok(());
        }
        if self.bids.clash.is_some() {
            self.drops.count(Rejected::IdentityClash);
            return Ok(());
        }
        let s = self.verified(u).ok_or(Forged)?;
        let window = self.config.liveness_timeout * BID_WINDOW;
        self.bids
            .times
            .retain(|t| now.saturating_duration_since(*t) <= window);
        self.bids.times.push_back(now);
        if self.bids.times.len() >= MAX_BIDS {
            let clash = IdentityClash {
                our_private: self.own.record.private_address,
                our_public: self.own.record.public_address,
                their_private: s.record.private_address,
                their_public: s.record.public_address,
            };
            error!(
                ours = ?(clash.our_private, clash.our_public),
                theirs = ?(clash.their_private, clash.their_public),
                bids = MAX_BIDS,
                "another daemon runs with this node's WireGuard key: stopped outbidding its records; give one of them a new key"
            );
            self.bids.clash = Some(clash);
            self.events.push_back(Event::IdentityClash(clash));
        }
        // The last bid is made even when the clash is found, so the other daemon (which
        // counts the same way) finds it too.
        let mut r = self.own.record.clone();
        r.version = s.record.version + 1;
        self.update(r);
        Ok(())
    }

    /// Counts `r`'s addresses in (or out of) the tally of every address advertised, which
    /// lets [`Membership::refresh_holds`] skip its work while no address is advertised twice.
    pub(super) fn tally_addresses(&mut self, r: &NodeRecord, add: bool) {
        for a in [r.public_address, r.private_address].into_iter().flatten() {
            let key = address_hash(a);
            let n = self.addresses.entry(key).or_insert(0);
            let before = *n;
            *n = if add {
                n.saturating_add(1)
            } else {
                n.saturating_sub(1)
            };
            let after = *n;
            if after == 0 {
                self.addresses.remove(&key);
            }
            match (before >= 2, after >= 2) {
                (false, true) => self.shared_addresses += 1,
                (true, false) => self.shared_addresses -= 1,
                _ => {}
            }
        }
    }

    /// Holds down every member that advertises an address an established member (known here
    /// at that address earlier, alive, not held itself) or this node advertises; releases those
    /// whose owner is gone. Nothing to do while no address is advertised twice and nobody is
    /// held, so that a large mesh without clashes pays nothing per record.
    pub(super) fn refresh_holds(&mut self) {
        if self.shared_addresses == 0 && !self.any_held {
            return;
        }
        let mut owners: HashMap<Claim<'_>, NodeId> = HashMap::new();
        for c in claims(&self.own.record) {
            owners.insert(c, self.me);
        }
        let mut order: Vec<(Instant, NodeId)> = self
            .known
            .iter()
            .filter(|(_, k)| k.live)
            .map(|(id, k)| (k.addressed_since, *id))
            .collect();
        order.sort();
        // Those not alive hold nothing and are held by nothing.
        let mut holds: Vec<(NodeId, Option<AddressClash>)> = self
            .known
            .iter()
            .filter(|(_, k)| !k.live && k.held.is_some())
            .map(|(id, _)| (*id, None))
            .collect();
        for (_, id) in order {
            let Some(k) = self.known.get(&id) else {
                continue;
            };
            let clash = claims(&k.signed.record).find_map(|c| {
                owners.get(&c).map(|owner| AddressClash {
                    member: id,
                    address: address(&c),
                    owner: *owner,
                })
            });
            if clash.is_none() {
                for c in claims(&k.signed.record) {
                    owners.insert(c, id);
                }
            }
            if clash.as_ref() != k.held.as_deref() {
                holds.push((id, clash));
            }
        }
        drop(owners);
        for (id, clash) in holds {
            let Some(k) = self.known.get_mut(&id) else {
                continue;
            };
            let was = k.alive();
            k.held = clash.map(Box::new);
            match clash {
                Some(c) => {
                    self.drops.count(Rejected::AddressInUse);
                    debug!(
                        node = %id, address = %c.address, owner = %c.owner,
                        "member advertises an address an established member holds: not routed"
                    );
                }
                None => debug!(node = %id, "member's address is free again"),
            }
            match (was, k.alive()) {
                (true, false) => self.events.push_back(Event::Down(id)),
                (false, true) => self.events.push_back(Event::Up(id)),
                _ => {}
            }
        }
        self.any_held = self.known.values().any(|k| k.held.is_some());
    }
}
