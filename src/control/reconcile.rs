//! The reconciler's pure part: from the mesh's records and the local config to the router peers
//! this node should have, and from those and the router's actual peers to a list of changes.
//!
//! The rules are DESIGN.md's. Endpoint: a peer in the same region is reached at its private
//! address, any other at its public one, a peer with one address at that one; a choice that no
//! handshake confirms within [`FALLBACK_AFTER`] falls back to the next candidate. Plaintext: only
//! when this node's address toward the peer and the peer's chosen address both lie in this
//! node's trusted subnets AND in the peer's (as its record says), so both ends agree; region
//! labels alone never make a path plaintext.
//!
//! An address a record advertises (its own, or a NAT mapping it publishes) is a candidate only
//! when a datagram may go there ([`usable`]): a unicast address with a port ([`observed::vet`]:
//! not unspecified, loopback, multicast, broadcast or link-local), none of this node's own
//! addresses (its record's, and those on its interfaces as last read), and outside the pod
//! network. Anything else would send every node's handshakes to itself, to a local port, or
//! into the overlay; the address is left out as if the record did not advertise it.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use weft_mesh::{Member, NodeRecord};
use weft_router::{PathKind, PeerConfig, PeerState};

use crate::control::observed::{self, Own, Refused};

/// How long an endpoint may go without a handshake before the next candidate is tried.
pub const FALLBACK_AFTER: Duration = Duration::from_secs(10);

/// Why a peer's endpoint is the one in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Same region: the private address.
    SameRegion,
    /// Another region: the public address.
    OtherRegion,
    /// The peer advertises one address only.
    OnlyAddress,
    /// The preferred address saw no handshake in time; this is the next candidate.
    Fallback,
    /// A `wireguard_peers` entry's endpoint.
    Configured,
    /// Learned from the peer's authenticated packets (roaming).
    Learned,
    /// A NAT mapping of the peer that other members see its datagrams come from (its record
    /// publishes it).
    Observed,
    /// As [`Reason::Observed`], with this node behind NAT too: both ends send to each other's
    /// mapping, so each NAT lets the other's datagrams in.
    HolePunched,
    /// Through a member that relays (no candidate worked): the endpoint is the relay
    /// service's shim for the peer ([`crate::relay`]); status names the relay.
    Relayed,
    /// No address known.
    None,
}

impl Reason {
    /// Whether the candidate is an address the peer's record advertises as its own (not a
    /// mapping others see, nor a relay): only these may carry plaintext.
    pub fn own_address(self) -> bool {
        matches!(
            self,
            Self::SameRegion | Self::OtherRegion | Self::OnlyAddress | Self::Fallback
        )
    }

    /// The status string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SameRegion => "same-region",
            Self::OtherRegion => "other-region",
            Self::OnlyAddress => "only-address",
            Self::Fallback => "fallback",
            Self::Configured => "configured",
            Self::Learned => "learned",
            Self::Observed => "observed",
            Self::HolePunched => "hole-punched",
            Self::Relayed => "relayed",
            Self::None => "none",
        }
    }
}

/// A peer this node should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredPeer {
    /// The router's view.
    pub config: PeerConfig,
    /// The peer's region, as its record says.
    pub region: Option<String>,
    /// Why its endpoint.
    pub reason: Reason,
    /// The underlay candidates in order of preference, with the reason each would have.
    pub candidates: Vec<(SocketAddr, Reason)>,
    /// The relay that reaches it, by name, when it has a relay shim.
    pub via: Option<String>,
}

fn same_region(me: &NodeRecord, peer: &NodeRecord) -> bool {
    me.region.is_some() && me.region == peer.region
}

/// Whether a datagram from this node (`me`, with `own`) may go to `endpoint`, one of a peer's
/// addresses: [`observed::vet`] passes it, and it is none of `me`'s advertised addresses.
pub fn usable(me: &NodeRecord, own: &Own, endpoint: SocketAddr) -> Result<(), Refused> {
    let endpoint = SocketAddr::new(endpoint.ip().to_canonical(), endpoint.port());
    observed::vet(endpoint, own)?;
    let mine = [me.private_address, me.public_address]
        .into_iter()
        .flatten()
        .any(|a| a.to_canonical() == endpoint.ip());
    if mine {
        return Err(Refused::Local);
    }
    Ok(())
}

/// The addresses `peer`'s record advertises as its own (private, public) that are no
/// endpoint ([`usable`]), with why.
pub fn unusable(me: &NodeRecord, own: &Own, peer: &NodeRecord) -> Vec<(IpAddr, Refused)> {
    [peer.private_address, peer.public_address]
        .into_iter()
        .flatten()
        .filter_map(|a| {
            usable(me, own, SocketAddr::new(a, peer.router_port))
                .err()
                .map(|why| (a, why))
        })
        .collect()
}

/// The peer's endpoints in order of preference, each with its reason: its own addresses (the
/// private one first within the region, the public one first across regions), with the NAT
/// mappings its record publishes ([`NodeRecord::observed`]) ranked as a public address: after
/// the public one, and before the private one across regions. An address no datagram may go
/// to ([`usable`], with this node's `own`) is left out as if the record did not have it, and
/// so is a published mapping that is one of its addresses.
pub fn candidates(me: &NodeRecord, peer: &NodeRecord, own: &Own) -> Vec<(SocketAddr, Reason)> {
    let port = peer.router_port;
    let ok = |a: Option<IpAddr>| a.filter(|a| usable(me, own, SocketAddr::new(*a, port)).is_ok());
    let (private, public) = (ok(peer.private_address), ok(peer.public_address));
    let own_addresses: Vec<(IpAddr, Reason)> = match (private, public) {
        (Some(p), Some(q)) if p == q => vec![(p, Reason::OnlyAddress)],
        (Some(p), Some(q)) if same_region(me, peer) => {
            vec![(p, Reason::SameRegion), (q, Reason::Fallback)]
        }
        (Some(p), Some(q)) => vec![(q, Reason::OtherRegion), (p, Reason::Fallback)],
        (Some(a), None) | (None, Some(a)) => vec![(a, Reason::OnlyAddress)],
        (None, None) => vec![],
    };
    let mapped = if me.observed.is_empty() {
        Reason::Observed
    } else {
        Reason::HolePunched
    };
    let nat: Vec<(SocketAddr, Reason)> = peer
        .observed
        .iter()
        .take(weft_mesh::MAX_OBSERVED)
        .filter(|e| {
            let e = SocketAddr::new(e.ip().to_canonical(), e.port());
            usable(me, own, e).is_ok()
                && !own_addresses
                    .iter()
                    .any(|(a, _)| SocketAddr::new(a.to_canonical(), port) == e)
        })
        .map(|e| (*e, mapped))
        .collect();
    let mut out: Vec<(SocketAddr, Reason)> = own_addresses
        .iter()
        .map(|(a, r)| (SocketAddr::new(*a, port), *r))
        .collect();
    // Within the region after its own addresses; across regions after the public address,
    // or first when it has none.
    let at = if same_region(me, peer) {
        out.len()
    } else {
        usize::from(public.is_some()).min(out.len())
    };
    out.splice(at..at, nat);
    out
}

/// This node's address as `peer` sees it: the private one within the region, else the public.
pub fn local_address(me: &NodeRecord, peer: &NodeRecord) -> Option<IpAddr> {
    if same_region(me, peer) {
        me.private_address.or(me.public_address)
    } else {
        me.public_address.or(me.private_address)
    }
}

/// Whether the path between `me` (at `mine`) and `peer` (at `theirs`) may be plaintext.
pub fn plaintext(me: &NodeRecord, mine: IpAddr, peer: &NodeRecord, theirs: IpAddr) -> bool {
    let trusts = |r: &NodeRecord, a: IpAddr| r.trusted_subnets.iter().any(|n| n.contains(&a));
    trusts(me, mine) && trusts(me, theirs) && trusts(peer, mine) && trusts(peer, theirs)
}

/// Per-peer endpoint choice over time: which candidate is in use and since when.
#[derive(Debug, Default)]
pub struct Choices {
    chosen: HashMap<[u8; 32], (usize, Instant)>,
    /// Each peer's candidates when last seen.
    seen: HashMap<[u8; 32], Vec<(SocketAddr, Reason)>>,
    /// The relayed peers' shims, with the relay of each by name.
    relayed: HashMap<[u8; 32], (SocketAddr, String)>,
    /// When each peer last started over because its candidates changed.
    restarted: HashMap<[u8; 32], Instant>,
    /// When each relayed peer's direct candidates were last probed, and whether a probe went
    /// out then (rather than the wait starting).
    probed: HashMap<[u8; 32], (Instant, bool)>,
    /// How many times in a row each relayed peer's direct candidates failed it: a probe no
    /// answer took off the relay, or a path that carried nothing back ([`Choices::check_path`]).
    /// Each doubles the wait before the next probe.
    failures: HashMap<[u8; 32], u32>,
    /// Each relayed peer's direct path in use, on trial: where, and the peer's inner packet
    /// counts (received, sent) when packets last came back on it or it was last quiet, and
    /// when.
    trials: HashMap<[u8; 32], Trial>,
    /// The addresses the members (this node too) advertise as their own, with whose they are.
    taken: HashMap<IpAddr, [u8; 32]>,
    /// Where each peer whose session is up has it now: the endpoint its authenticated packets
    /// come from ([`Choices::learn`]).
    learned: HashMap<[u8; 32], SocketAddr>,
    /// This node's addresses and pod network: no candidate is one of them ([`usable`]).
    own: Own,
    /// The members advertising addresses that are no endpoint, with those addresses, as last
    /// reported ([`Choices::note_unusable`]).
    unusable: HashMap<[u8; 32], Vec<IpAddr>>,
}

/// How often a peer reached through a relay is offered its direct candidates again
/// ([`Choices::probes`]): a direct path that appears (a NAT removed, a firewall opened, a
/// mapping that lets the other end in) takes the traffic off the relay within this time.
pub const DIRECT_RETRY: Duration = Duration::from_secs(30);

/// The most doublings of [`DIRECT_RETRY`] after failed probes: a relayed peer's direct
/// candidates are offered at least every 16 minutes.
pub const MAX_BACKOFF: u32 = 5;

/// How long a relayed peer's direct path may carry packets out with none coming back before
/// the peer goes back to its relay ([`Choices::check_path`]).
pub const PATH_PROOF: Duration = Duration::from_secs(15);

/// The least packets sent unanswered over [`PATH_PROOF`] that fail a direct path: a path that
/// carries too little to judge is not judged.
pub const UNANSWERED: u64 = 4;

/// A relayed peer's direct path in use, with the peer's inner packet counts when packets last
/// came back on it or it was last quiet.
#[derive(Debug, Clone, Copy)]
struct Trial {
    at: SocketAddr,
    rx: u64,
    tx: u64,
    since: Instant,
    /// Packets came back on it at some point.
    proven: bool,
}

/// The least time between two restarts of one peer's choice on a change of its candidates.
pub const RESTART_GAP: Duration = Duration::from_secs(60);

impl Choices {
    /// The relay shims known now: a peer among them has its shim as its last candidate.
    pub fn set_relayed(&mut self, relayed: HashMap<[u8; 32], (SocketAddr, String)>) {
        self.relayed = relayed;
    }

    /// Learns the addresses the members advertise as their own (`records`, this node's
    /// among them): a NAT mapping at one of them is no candidate for anyone else.
    pub fn set_members<'a>(&mut self, records: impl IntoIterator<Item = &'a NodeRecord>) {
        self.taken = records
            .into_iter()
            .filter(|r| !r.left)
            .flat_map(|r| {
                [r.private_address, r.public_address]
                    .into_iter()
                    .flatten()
                    .map(|a| (a.to_canonical(), r.wireguard_key))
            })
            .collect();
    }

    /// Learns this node's addresses (those on its interfaces) and pod network, which no
    /// candidate may be ([`usable`]).
    pub fn set_own(&mut self, own: Own) {
        self.own = own;
    }

    /// The addresses among `members`' records that are no endpoint ([`unusable`]) and were not
    /// reported at the last call, by member name, with why: each is reported once while its
    /// record advertises it.
    pub fn note_unusable<'a>(
        &mut self,
        me: &NodeRecord,
        members: impl IntoIterator<Item = &'a NodeRecord>,
    ) -> Vec<(String, IpAddr, Refused)> {
        let mut news = Vec::new();
        let mut now = HashMap::new();
        for r in members.into_iter().filter(|r| !r.left) {
            let bad = unusable(me, &self.own, r);
            if bad.is_empty() {
                continue;
            }
            let before = self.unusable.get(&r.wireguard_key);
            for (a, why) in &bad {
                if before.is_none_or(|b| !b.contains(a)) {
                    news.push((r.name.clone(), *a, *why));
                }
            }
            now.insert(r.wireguard_key, bad.into_iter().map(|(a, _)| a).collect());
        }
        self.unusable = now;
        news
    }

    /// Learns where peer `key`'s session is up now (`live`, where its authenticated packets
    /// come from), or that it is not up (`None`).
    pub fn learn(&mut self, key: [u8; 32], live: Option<SocketAddr>) {
        match live {
            Some(at) => self.learned.insert(key, at),
            None => self.learned.remove(&key),
        };
    }

    /// Peer `r`'s candidates ([`candidates`], with this node's addresses as [`Choices::set_own`]
    /// gave them) but for a mapping at an address another member
    /// advertises as its own (a member that says so, or a record that publishes it, would
    /// point a WireGuard endpoint at that member's address: the router then refuses its
    /// plaintext there); then, while its session is up at an endpoint none of those is (it
    /// came in from a NAT mapping its record does not publish yet), that endpoint
    /// ([`Reason::Learned`]), so that a change of the peer's prefixes, which starts a fresh
    /// session, starts it where the peer is reached rather than at an address that never
    /// answered (never a relay shim this way: one the relay plan dropped is left; compared in
    /// canonical form, so an IPv4-mapped spelling is not listed twice); then its relay shim if
    /// it has one.
    pub fn candidates(&self, me: &NodeRecord, r: &NodeRecord) -> Vec<(SocketAddr, Reason)> {
        // Canonical, as the router has every source address: an IPv4-mapped spelling in a
        // record is the plain address its session is followed to.
        let canonical = |a: &SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        let mut c: Vec<(SocketAddr, Reason)> = candidates(me, r, &self.own)
            .into_iter()
            .map(|(a, reason)| (canonical(&a), reason))
            .collect();
        c.retain(|(a, reason)| {
            reason.own_address()
                || self
                    .taken
                    .get(&a.ip().to_canonical())
                    .is_none_or(|k| *k == r.wireguard_key)
        });
        let shim = self.relayed.get(&r.wireguard_key).map(|(shim, _)| *shim);
        // A loopback endpoint is a relay shim: it counts only while the relay plan lists it.
        // Another member's address is no reason to leave it out: the session is up there
        // already (the router refuses plaintext from it either way), and leaving it out would
        // let any member that publishes the address restart the peer's session elsewhere.
        if let Some(at) = self.learned.get(&r.wireguard_key).map(canonical)
            && !at.ip().is_loopback()
            && !c.iter().any(|(a, _)| *a == at)
        {
            c.push((at, Reason::Learned));
        }
        if let Some(shim) = shim {
            c.push((shim, Reason::Relayed));
        }
        c
    }

    /// When a peer's candidates changed: a peer that is up stays on the endpoint it is up on
    /// (when that is still a candidate), so that a working path, a relayed one above all, is
    /// never left for an untried one; any other starts over at its first candidate with a
    /// fresh timer, so that a new address (a NAT mapping just published) is tried at once and
    /// by both ends at the same time, rather than after the rest of a cycle.
    pub fn restart_if_changed(
        &mut self,
        now: Instant,
        key: [u8; 32],
        cands: &[(SocketAddr, Reason)],
        up: bool,
    ) {
        // Only the addresses count: a reason that changes alone (this node's own mapping
        // appearing turns `observed` into `hole-punched`) changes no path.
        let same =
            |c: &Vec<(SocketAddr, Reason)>| c.iter().map(|x| x.0).eq(cands.iter().map(|x| x.0));
        if self.seen.get(&key).is_some_and(same) {
            self.seen.insert(key, cands.to_vec());
            return;
        }
        let Some(old) = self.seen.insert(key, cands.to_vec()) else {
            return;
        };
        let current = self
            .chosen
            .get(&key)
            .and_then(|(i, _)| old.get(*i % old.len().max(1)))
            .map(|(a, _)| *a);
        let still = current.and_then(|a| cands.iter().position(|(c, _)| *c == a));
        // Starting over at most once per RESTART_GAP: a member whose reports keep changing a
        // peer's candidates must not keep it from ever reaching the candidate that works.
        let may_restart = self
            .restarted
            .get(&key)
            .is_none_or(|t| now.saturating_duration_since(*t) >= RESTART_GAP);
        match (up || !may_restart, still) {
            (true, Some(i)) => {
                if let Some(e) = self.chosen.get_mut(&key) {
                    e.0 = i;
                }
            }
            (true, None) if !up => {}
            _ => {
                self.chosen.remove(&key);
                self.restarted.insert(key, now);
            }
        }
    }

    /// Moves a peer that has not come up within [`FALLBACK_AFTER`] of its current choice to
    /// its next candidate (cycling).
    pub fn observe(&mut self, now: Instant, key: [u8; 32], state: PeerState, n_candidates: usize) {
        let entry = self.chosen.entry(key).or_insert((0, now));
        if state == PeerState::Up {
            entry.1 = now;
            return;
        }
        if n_candidates > 1 && now.saturating_duration_since(entry.1) >= FALLBACK_AFTER {
            entry.0 = (entry.0 + 1) % n_candidates;
            entry.1 = now;
        }
    }

    /// Observes one round: `encrypted` lists every peer on a WireGuard path now, with its
    /// state and number of candidates. A peer not among them (gone, or on a plaintext path)
    /// is forgotten, so its next spell on WireGuard starts at its first candidate with a fresh
    /// timer rather than falling back at once on a timer left from an earlier spell.
    pub fn observe_round(
        &mut self,
        now: Instant,
        encrypted: impl IntoIterator<Item = ([u8; 32], PeerState, usize)>,
    ) {
        let mut seen = std::collections::HashSet::new();
        for (key, state, n) in encrypted {
            self.observe(now, key, state, n);
            seen.insert(key);
        }
        self.retain(|k| seen.contains(k));
    }

    /// Makes peer `key`'s choice the candidate its session is up on (`live`, where its
    /// authenticated packets come from), when that is one of `cands`: a path that the far end
    /// or a probe moved the session to is kept, and its reason shown, rather than undone.
    pub fn follow(
        &mut self,
        now: Instant,
        key: [u8; 32],
        cands: &[(SocketAddr, Reason)],
        live: SocketAddr,
    ) {
        let Some(j) = cands.iter().position(|(a, _)| *a == live) else {
            return;
        };
        let entry = self.chosen.entry(key).or_insert((j, now));
        if entry.0 % cands.len() != j {
            *entry = (j, now);
        }
    }

    /// The direct candidates to probe now for peer `key`, up on its relay shim at `live`:
    /// all of `cands` but the shim, one [`DIRECT_RETRY`] after it went through the relay, and
    /// then after a wait that doubles with each failure (a probe still on the relay when the
    /// next is due failed), up to [`MAX_BACKOFF`] doublings. Empty when the peer is not on its
    /// shim.
    pub fn probes(
        &mut self,
        now: Instant,
        key: [u8; 32],
        cands: &[(SocketAddr, Reason)],
        live: SocketAddr,
    ) -> Vec<SocketAddr> {
        let on_shim = self
            .relayed
            .get(&key)
            .is_some_and(|(shim, _)| *shim == live);
        if !on_shim {
            self.probed.remove(&key);
            return Vec::new();
        }
        let (last, sent) = *self.probed.entry(key).or_insert((now, false));
        if now.saturating_duration_since(last) < self.retry(&key) {
            return Vec::new();
        }
        if sent {
            // The last probe left the peer on its relay: wait longer before the next.
            self.failed(key);
            self.probed.insert(key, (last, false));
            if now.saturating_duration_since(last) < self.retry(&key) {
                return Vec::new();
            }
        }
        self.probed.insert(key, (now, true));
        cands
            .iter()
            .filter(|(a, r)| *r != Reason::Relayed && *a != live)
            .map(|(a, _)| *a)
            .collect()
    }

    /// The wait before peer `key`'s next probe.
    fn retry(&self, key: &[u8; 32]) -> Duration {
        let n = self
            .failures
            .get(key)
            .copied()
            .unwrap_or(0)
            .min(MAX_BACKOFF);
        DIRECT_RETRY * 2u32.pow(n)
    }

    fn failed(&mut self, key: [u8; 32]) {
        let n = self.failures.entry(key).or_default();
        *n = (*n + 1).min(MAX_BACKOFF);
    }

    /// Judges the direct path peer `key` (that has a relay) is up on at `live`, given its inner
    /// packet counts: a path that answers handshakes is not proven until packets come back on
    /// it. When it has carried [`UNANSWERED`] packets or more out and none back for
    /// [`PATH_PROOF`] (a one-way path, or a host that passes handshakes and drops the rest),
    /// the choice goes back to the relay shim, which is returned, and the next probe waits
    /// twice as long. Packets coming back clear the peer's failures. A direct path left for
    /// the relay (the far end judged it) before any packet came back on it counts as a
    /// failure here too, so that both ends' probes back off, not only the end that judged.
    pub fn check_path(
        &mut self,
        now: Instant,
        key: [u8; 32],
        live: SocketAddr,
        (rx, tx): (u64, u64),
    ) -> Option<SocketAddr> {
        let Some(&(shim, _)) = self.relayed.get(&key) else {
            self.trials.remove(&key);
            self.failures.remove(&key);
            return None;
        };
        if live == shim {
            if self.trials.remove(&key).is_some_and(|t| !t.proven) {
                self.failed(key);
            }
            return None;
        }
        let trial = self.trials.entry(key).or_insert(Trial {
            at: live,
            rx,
            tx,
            since: now,
            proven: false,
        });
        if trial.at != live || rx != trial.rx || tx == trial.tx {
            // Moved, answered, or quiet: the wait counts from the first packet left unanswered.
            let answered = trial.at == live && rx > trial.rx;
            if answered {
                self.failures.remove(&key);
            }
            *trial = Trial {
                at: live,
                rx,
                tx,
                since: now,
                proven: answered || (trial.at == live && trial.proven),
            };
            return None;
        }
        if tx.saturating_sub(trial.tx) < UNANSWERED
            || now.saturating_duration_since(trial.since) < PATH_PROOF
        {
            return None;
        }
        self.trials.remove(&key);
        self.failed(key);
        if let Some(i) = self
            .seen
            .get(&key)
            .and_then(|c| c.iter().position(|(a, _)| *a == shim))
        {
            self.chosen.insert(key, (i, now));
        }
        Some(shim)
    }

    fn index(&self, key: &[u8; 32]) -> usize {
        self.chosen.get(key).map_or(0, |c| c.0)
    }

    /// Forgets peers that are gone.
    pub fn retain(&mut self, keep: impl Fn(&[u8; 32]) -> bool) {
        self.chosen.retain(|k, _| keep(k));
        self.seen.retain(|k, _| keep(k));
        self.restarted.retain(|k, _| keep(k));
        self.probed.retain(|k, _| keep(k));
        self.failures.retain(|k, _| keep(k));
        self.trials.retain(|k, _| keep(k));
        self.learned.retain(|k, _| keep(k));
    }
}

/// The configured `wireguard_peers` as desired peers.
pub fn static_peers(statics: &[PeerConfig]) -> Vec<DesiredPeer> {
    statics
        .iter()
        .map(|c| DesiredPeer {
            config: c.clone(),
            region: None,
            reason: if c.endpoint.is_some() {
                Reason::Configured
            } else {
                Reason::None
            },
            candidates: vec![],
            via: None,
        })
        .collect()
}

/// The peers this node should have: the static `wireguard_peers`, then every alive member that
/// does not collide with them or with this node (same key), each with the prefixes whose claims
/// win (older claim, then smaller id; `me_id` is this node's mesh id).
pub fn desired(
    me: &NodeRecord,
    me_id: [u8; 32],
    members: &[Member],
    statics: &[PeerConfig],
    choices: &Choices,
) -> (Vec<DesiredPeer>, Vec<String>) {
    let mut out = static_peers(statics);
    let mut skipped = Vec::new();
    let claims = all_claims(me, me_id, &out, members);
    let mut sorted: Vec<&Member> = members
        .iter()
        .filter(|m| m.alive && !m.record.left)
        .collect();
    // Deterministic: by name, then id.
    sorted.sort_by(|a, b| (&a.record.name, a.id).cmp(&(&b.record.name, b.id)));
    for m in sorted {
        let r = &m.record;
        if r.wireguard_key == me.wireguard_key
            || out.iter().any(|d| d.config.public_key == r.wireguard_key)
        {
            skipped.push(format!("{}: its WireGuard key is already in use", r.name));
            continue;
        }
        let routed = winning(m, &claims, &mut skipped);
        if routed.is_empty() && !r.pod_cidrs.is_empty() {
            continue;
        }
        let cands = choices.candidates(me, r);
        let (endpoint, reason, path) = endpoint(me, r, &cands, choices);
        // Named whatever the choice: the far end may have come through the relay first, and
        // roaming then keeps the shim as the endpoint.
        let via = choices
            .relayed
            .get(&r.wireguard_key)
            .map(|(_, n)| n.clone());
        out.push(DesiredPeer {
            config: PeerConfig {
                name: r.name.clone(),
                public_key: r.wireguard_key,
                endpoint,
                allowed_ips: routed,
                persistent_keepalive: Some(25),
                path,
            },
            region: r.region.clone(),
            reason,
            candidates: cands,
            via,
        });
    }
    (out, skipped)
}

/// Every claim that can win: this node's, the alive members', and the configured peers' (`out`,
/// as the oldest of all), as (prefix, claim time, owner id).
fn all_claims(
    me: &NodeRecord,
    me_id: [u8; 32],
    out: &[DesiredPeer],
    members: &[Member],
) -> Vec<(IpNet, u64, [u8; 32])> {
    let mut claims: Vec<(IpNet, u64, [u8; 32])> = Vec::new();
    for (i, n) in me.pod_cidrs.iter().enumerate() {
        claims.push((*n, me.claimed_at.get(i).copied().unwrap_or(0), me_id));
    }
    for d in out {
        for n in &d.config.allowed_ips {
            claims.push((*n, 0, [0; 32]));
        }
    }
    for m in members.iter().filter(|m| m.alive && !m.record.left) {
        for (i, n) in m.record.pod_cidrs.iter().enumerate() {
            claims.push((*n, m.record.claimed_at.get(i).copied().unwrap_or(0), m.id.0));
        }
    }
    claims
}

/// The prefixes of member `m` that are routed to it: where claims overlap, the older claim
/// (then the smaller id) wins, and configured `wireguard_peers` always keep theirs. Each lost
/// prefix is added to `skipped` with why.
fn winning(m: &Member, claims: &[(IpNet, u64, [u8; 32])], skipped: &mut Vec<String>) -> Vec<IpNet> {
    let r = &m.record;
    let mut routed = Vec::new();
    for (i, n) in r.pod_cidrs.iter().enumerate() {
        let mine = (r.claimed_at.get(i).copied().unwrap_or(0), m.id.0);
        let beaten_by = claims.iter().find(|(net, since, owner)| {
            *owner != m.id.0 && overlaps(net, n) && (*since, *owner) < mine
        });
        match beaten_by {
            Some((net, ..)) => skipped.push(format!(
                "{}: its pod CIDR {n} overlaps {net}, claimed earlier by another node",
                r.name
            )),
            None => routed.push(*n),
        }
    }
    routed
}

/// The endpoint the choices point at among `cands`, why, and the path to it (plaintext when
/// both ends trust the addresses).
fn endpoint(
    me: &NodeRecord,
    r: &NodeRecord,
    cands: &[(SocketAddr, Reason)],
    choices: &Choices,
) -> (Option<SocketAddr>, Reason, PathKind) {
    // Plaintext first: whether a candidate may carry plaintext depends on the two records
    // only, so both ends pick the same one. A fallback chosen by this node alone (after
    // handshakes that did not complete) must never make this end encrypt while the other
    // sends plaintext: each would drop what the other sends.
    let mine = local_address(me, r);
    if let Some(&(addr, reason)) = cands
        .iter()
        .filter(|(_, reason)| reason.own_address())
        .find(|(addr, _)| mine.is_some_and(|m| plaintext(me, m, r, addr.ip())))
    {
        return (Some(addr), reason, PathKind::Plaintext);
    }
    match cands.get(choices.index(&r.wireguard_key) % cands.len().max(1)) {
        Some(&(addr, reason)) => (Some(addr), reason, PathKind::Encrypted),
        None => (None, Reason::None, PathKind::Encrypted),
    }
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// One change to the router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Add this peer.
    Add(PeerConfig),
    /// Remove the peer with this key.
    Remove([u8; 32]),
    /// Change the peer with this key (its prefixes, path or endpoint changed): in place where
    /// [`in_place`] allows, else a fresh peer.
    Replace(PeerConfig),
}

/// What changes in place for a peer whose configuration changed, its session kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InPlace {
    /// Its new prefixes, when they changed.
    pub allowed_ips: Option<Vec<IpNet>>,
    /// Its endpoint's move, (from, to), when it moved: `from` is where its session is up.
    pub endpoint: Option<(SocketAddr, SocketAddr)>,
}

/// How a peer configured as `have` becomes `want` with its session kept, when it can: its
/// prefixes are set in place (as `wg set ... allowed-ips` does: a block claimed, moved or given
/// up costs no handshake and drops nothing in flight), and its endpoint moves only to `live`,
/// where its session is up (the choice followed the far end's packets there), or to `back`,
/// its relay shim after a direct path failed. `None` when anything else changed (its name,
/// path or keepalive) or the endpoint moves anywhere else: a fresh session starts there.
pub fn in_place(
    have: &PeerConfig,
    want: &PeerConfig,
    live: Option<SocketAddr>,
    back: Option<SocketAddr>,
) -> Option<InPlace> {
    let masked = PeerConfig {
        endpoint: have.endpoint,
        allowed_ips: have.allowed_ips.clone(),
        ..want.clone()
    };
    if *have != masked {
        return None;
    }
    let endpoint = match (want.endpoint, live) {
        (to, _) if to == have.endpoint => None,
        (Some(to), Some(from)) if from == to || back == Some(to) => Some((from, to)),
        _ => return None,
    };
    Some(InPlace {
        allowed_ips: (want.allowed_ips != have.allowed_ips).then(|| want.allowed_ips.clone()),
        endpoint,
    })
}

/// The changes among `changes` that keep the peer's session ([`in_place`]), by key, given
/// where each peer that is up has its session (`live`) and the peers going back to their relay
/// shim (`back`).
pub fn in_place_steps(
    changes: &[Change],
    current: &BTreeMap<[u8; 32], PeerConfig>,
    live: &BTreeMap<[u8; 32], SocketAddr>,
    back: &BTreeMap<[u8; 32], SocketAddr>,
) -> BTreeMap<[u8; 32], InPlace> {
    changes
        .iter()
        .filter_map(|change| {
            let Change::Replace(c) = change else {
                return None;
            };
            let k = c.public_key;
            let step = in_place(
                current.get(&k)?,
                c,
                live.get(&k).copied(),
                back.get(&k).copied(),
            )?;
            Some((k, step))
        })
        .collect()
}

/// The first half of the in-place prefix changes: for each peer in `steps` that gives some of
/// its prefixes up, the ones it keeps. Set before any peer takes new ones, so that prefixes
/// moving between peers (two trading blocks, or a longer cycle) land in one round: taking
/// first, each would be refused the other's, round after round.
pub fn given_up_first(
    current: &BTreeMap<[u8; 32], PeerConfig>,
    steps: &BTreeMap<[u8; 32], InPlace>,
) -> Vec<([u8; 32], Vec<IpNet>)> {
    steps
        .iter()
        .filter_map(|(k, step)| {
            let want = step.allowed_ips.as_ref()?;
            let have = &current.get(k)?.allowed_ips;
            let kept: Vec<IpNet> = have.iter().filter(|n| want.contains(n)).copied().collect();
            (kept.len() != have.len()).then_some((*k, kept))
        })
        .collect()
}

/// The changes that turn `current` (by key) into `desired`. A peer whose configuration is
/// unchanged is left alone, so its session and traffic are never disturbed.
pub fn diff(current: &BTreeMap<[u8; 32], PeerConfig>, desired: &[DesiredPeer]) -> Vec<Change> {
    let mut out = Vec::new();
    let want: BTreeMap<[u8; 32], &PeerConfig> = desired
        .iter()
        .map(|d| (d.config.public_key, &d.config))
        .collect();
    for key in current.keys() {
        if !want.contains_key(key) {
            out.push(Change::Remove(*key));
        }
    }
    for (key, cfg) in &want {
        match current.get(key) {
            None => out.push(Change::Add((*cfg).clone())),
            Some(have) if have != *cfg => out.push(Change::Replace((*cfg).clone())),
            Some(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::disallowed_methods,
        reason = "tests start their clock from a real instant"
    )]

    use super::*;

    fn rec(
        name: &str,
        region: &str,
        private: &str,
        public: &str,
        block: u8,
        key: u8,
    ) -> NodeRecord {
        NodeRecord {
            region: Some(region.into()),
            private_address: Some(private.parse().unwrap()),
            public_address: Some(public.parse().unwrap()),
            wireguard_key: [key; 32],
            pod_cidrs: vec![format!("100.64.{block}.0/24").parse().unwrap()],
            claimed_at: vec![0],
            trusted_subnets: vec![],
            ..weft_mesh::testing::node_record(name, 1)
        }
    }

    fn member(r: NodeRecord) -> Member {
        weft_mesh::testing::member(weft_mesh::NodeId([r.wireguard_key[0]; 32]), r)
    }

    #[test]
    fn same_region_uses_private_other_region_public() {
        let me = rec("a", "eu", "198.18.1.1", "198.19.0.1", 1, 1);
        let b = rec("b", "eu", "198.18.1.2", "198.19.0.2", 2, 2);
        let c = rec("c", "us", "198.18.2.3", "198.19.0.3", 3, 3);
        let (d, skipped) = desired(
            &me,
            [1; 32],
            &[member(b), member(c)],
            &[],
            &Choices::default(),
        );
        assert!(skipped.is_empty());
        assert_eq!(
            d[0].config.endpoint,
            Some("198.18.1.2:51820".parse().unwrap())
        );
        assert_eq!(d[0].reason, Reason::SameRegion);
        assert_eq!(
            d[1].config.endpoint,
            Some("198.19.0.3:51820".parse().unwrap())
        );
        assert_eq!(d[1].reason, Reason::OtherRegion);
        assert!(
            d.iter().all(|p| p.config.path == PathKind::Encrypted),
            "no trusted subnets"
        );
    }

    #[test]
    fn plaintext_needs_both_ends_to_trust_both_addresses() {
        let lan: IpNet = "198.18.1.0/24".parse().unwrap();
        let mut me = rec("a", "eu", "198.18.1.1", "198.19.0.1", 1, 1);
        let mut b = rec("b", "eu", "198.18.1.2", "198.19.0.2", 2, 2);
        me.trusted_subnets = vec![lan];
        // b does not trust us: encrypted.
        let (d, _) = desired(&me, [1; 32], &[member(b.clone())], &[], &Choices::default());
        assert_eq!(d[0].config.path, PathKind::Encrypted);
        b.trusted_subnets = vec![lan];
        let (d, _) = desired(&me, [1; 32], &[member(b.clone())], &[], &Choices::default());
        assert_eq!(d[0].config.path, PathKind::Plaintext);
        // A peer that merely claims our region but sits elsewhere stays encrypted.
        let mut liar = rec("x", "eu", "198.18.9.9", "198.19.0.9", 9, 9);
        liar.trusted_subnets = vec!["0.0.0.0/0".parse().unwrap()];
        let (d, _) = desired(&me, [1; 32], &[member(liar)], &[], &Choices::default());
        assert_eq!(d[0].config.path, PathKind::Encrypted);
    }

    #[test]
    fn a_pair_both_trusting_the_lan_is_plaintext_there_whatever_this_ends_fallback_says() {
        // This end fell back to b's public address while the LAN was untrusted; trust is back
        // on both sides. b's side has no fallback and sends plaintext to our private address:
        // we must do the same, or each end drops what the other sends.
        let lan: IpNet = "198.18.1.0/24".parse().unwrap();
        let mut me = rec("a", "eu", "198.18.1.1", "198.19.0.1", 1, 1);
        let mut b = rec("b", "eu", "198.18.1.2", "198.19.0.2", 2, 2);
        let mut ch = Choices::default();
        let t0 = Instant::now();
        ch.observe(t0, b.wireguard_key, PeerState::Connecting, 2);
        ch.observe(
            t0 + FALLBACK_AFTER,
            b.wireguard_key,
            PeerState::Connecting,
            2,
        );
        ch.observe(t0 + FALLBACK_AFTER * 2, b.wireguard_key, PeerState::Up, 2);
        let (d, _) = desired(&me, [1; 32], &[member(b.clone())], &[], &ch);
        assert_eq!(
            d[0].reason,
            Reason::Fallback,
            "encrypted: the fallback holds"
        );
        me.trusted_subnets = vec![lan];
        b.trusted_subnets = vec![lan];
        let (d, _) = desired(&me, [1; 32], &[member(b.clone())], &[], &ch);
        assert_eq!(d[0].config.path, PathKind::Plaintext);
        assert_eq!(
            d[0].config.endpoint,
            Some("198.18.1.2:51820".parse().unwrap())
        );
        assert_eq!(d[0].reason, Reason::SameRegion);
        // And what b decides about us agrees.
        let (back, _) = desired(&b, [2; 32], &[member(me)], &[], &Choices::default());
        assert_eq!(back[0].config.path, PathKind::Plaintext);
        assert_eq!(
            back[0].config.endpoint,
            Some("198.18.1.1:51820".parse().unwrap())
        );
    }

    #[test]
    fn a_new_spell_on_wireguard_starts_at_the_first_candidate_with_a_fresh_timer() {
        // Up on WireGuard, then a plaintext spell of a minute (not observed), then WireGuard
        // again: the timer left from the first spell must not make it fall back at once.
        let me = rec("a", "eu", "198.18.1.1", "198.19.0.1", 1, 1);
        let b = rec("b", "eu", "198.18.1.2", "198.19.0.2", 2, 2);
        let key = b.wireguard_key;
        let mut ch = Choices::default();
        let t0 = Instant::now();
        ch.observe_round(t0, [(key, PeerState::Up, 2)]);
        for s in 1..60 {
            ch.observe_round(t0 + Duration::from_secs(s), []);
        }
        ch.observe_round(
            t0 + Duration::from_secs(60),
            [(key, PeerState::Connecting, 2)],
        );
        ch.observe_round(
            t0 + Duration::from_secs(61),
            [(key, PeerState::Connecting, 2)],
        );
        let (d, _) = desired(&me, [1; 32], &[member(b.clone())], &[], &ch);
        assert_eq!(d[0].reason, Reason::SameRegion, "fell back at once");
        // The fallback still comes when the new spell's handshakes do not complete.
        ch.observe_round(
            t0 + Duration::from_secs(60) + FALLBACK_AFTER,
            [(key, PeerState::Connecting, 2)],
        );
        let (d, _) = desired(&me, [1; 32], &[member(b)], &[], &ch);
        assert_eq!(d[0].reason, Reason::Fallback);
    }

    #[test]
    fn no_handshake_in_time_falls_back_to_the_next_candidate() {
        let me = rec("a", "eu", "198.18.1.1", "198.19.0.1", 1, 1);
        let b = rec("b", "eu", "198.18.1.2", "198.19.0.2", 2, 2);
        let mut ch = Choices::default();
        let t0 = Instant::now();
        ch.observe(t0, b.wireguard_key, PeerState::Connecting, 2);
        ch.observe(
            t0 + FALLBACK_AFTER / 2,
            b.wireguard_key,
            PeerState::Connecting,
            2,
        );
        let (d, _) = desired(&me, [1; 32], &[member(b.clone())], &[], &ch);
        assert_eq!(d[0].reason, Reason::SameRegion, "not yet");
        ch.observe(
            t0 + FALLBACK_AFTER,
            b.wireguard_key,
            PeerState::Connecting,
            2,
        );
        let (d, _) = desired(&me, [1; 32], &[member(b.clone())], &[], &ch);
        assert_eq!(d[0].reason, Reason::Fallback);
        assert_eq!(
            d[0].config.endpoint,
            Some("198.19.0.2:51820".parse().unwrap())
        );
        // Once up, it stays.
        let t1 = t0 + 3 * FALLBACK_AFTER;
        ch.observe(t1, b.wireguard_key, PeerState::Up, 2);
        ch.observe(t1 + FALLBACK_AFTER, b.wireguard_key, PeerState::Up, 2);
        let (d, _) = desired(&me, [1; 32], &[member(b)], &[], &ch);
        assert_eq!(d[0].reason, Reason::Fallback);
    }

    #[test]
    fn an_address_no_datagram_should_go_to_is_no_candidate_and_a_normal_one_still_is() {
        let me = rec("a", "eu", "198.18.1.1", "198.19.0.1", 1, 1);
        let ch = Choices::default();
        let addrs = |c: &[(SocketAddr, Reason)]| -> Vec<String> {
            c.iter()
                .map(|(a, r)| format!("{a} {}", r.as_str()))
                .collect()
        };
        // Loopback, unspecified, multicast, broadcast, and this node's own addresses: nothing
        // to send handshakes to, whichever field advertises them.
        for bad in [
            "127.0.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "ff02::1",
            "198.18.1.1",
            "198.19.0.1",
            "::ffff:127.0.0.1",
        ] {
            let mut b = rec("b", "us", "198.18.2.2", "198.19.0.2", 2, 2);
            b.public_address = Some(bad.parse().unwrap());
            assert_eq!(
                addrs(&ch.candidates(&me, &b)),
                ["198.18.2.2:51820 only-address"],
                "public {bad}: the private address alone, as without it"
            );
            b.private_address = Some(bad.parse().unwrap());
            assert!(
                ch.candidates(&me, &b).is_empty(),
                "private and public {bad}: no candidate"
            );
            let (d, _) = desired(&me, [1; 32], &[member(b)], &[], &ch);
            assert_eq!(d[0].config.endpoint, None, "{bad}: no endpoint");
        }
        // A normal record still has both.
        let b = rec("b", "us", "198.18.2.2", "198.19.0.2", 2, 2);
        assert_eq!(
            addrs(&ch.candidates(&me, &b)),
            ["198.19.0.2:51820 other-region", "198.18.2.2:51820 fallback"]
        );
        // An address on one of this node's interfaces (a docker bridge every node has), or
        // in the pod network, is this node's too once the reconciler says so.
        let mut ch = Choices::default();
        ch.set_own(Own {
            local: vec!["172.17.0.1".parse().unwrap()],
            pod_network: vec!["100.64.0.0/16".parse().unwrap()],
        });
        for bad in ["172.17.0.1", "100.64.2.1"] {
            let mut b = rec("b", "us", "198.18.2.2", "198.19.0.2", 2, 2);
            b.public_address = Some(bad.parse().unwrap());
            assert_eq!(
                addrs(&ch.candidates(&me, &b)),
                ["198.18.2.2:51820 only-address"],
                "{bad}"
            );
        }
        // Each such address is reported once while a record advertises it.
        let mut b = rec("b", "us", "198.18.2.2", "127.0.0.1", 2, 2);
        let c = rec("c", "us", "198.18.2.3", "198.19.0.3", 3, 3);
        let news = ch.note_unusable(&me, [&b, &c]);
        assert_eq!(
            news,
            [(
                "b".into(),
                "127.0.0.1".parse().unwrap(),
                Refused::NotUnicast
            )]
        );
        assert!(ch.note_unusable(&me, [&b, &c]).is_empty(), "said already");
        b.private_address = Some("198.18.1.1".parse().unwrap());
        assert_eq!(
            ch.note_unusable(&me, [&b, &c]),
            [("b".into(), "198.18.1.1".parse().unwrap(), Refused::Local)]
        );
    }

    #[test]
    fn colliding_members_are_skipped_with_a_reason() {
        let me = rec("a", "eu", "198.18.1.1", "198.19.0.1", 1, 1);
        let same_block = rec("b", "eu", "198.18.1.2", "198.19.0.2", 1, 2);
        let same_key = rec("c", "eu", "198.18.1.3", "198.19.0.3", 3, 1);
        let (d, skipped) = desired(
            &me,
            [1; 32],
            &[member(same_block), member(same_key)],
            &[],
            &Choices::default(),
        );
        assert!(d.is_empty());
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        // An older claim than ours is routed to its owner (and we will re-claim).
        let mut me_late = me.clone();
        me_late.claimed_at = vec![50];
        let mut older = rec("b", "eu", "198.18.1.2", "198.19.0.2", 1, 2);
        older.claimed_at = vec![10];
        let (d, skipped) = desired(
            &me_late,
            [1; 32],
            &[member(older)],
            &[],
            &Choices::default(),
        );
        assert_eq!(d.len(), 1, "{skipped:?}");
        assert_eq!(
            d[0].config.allowed_ips,
            vec!["100.64.1.0/24".parse::<IpNet>().unwrap()]
        );
    }

    #[test]
    fn diff_touches_only_what_changed() {
        let me = rec("a", "eu", "198.18.1.1", "198.19.0.1", 1, 1);
        let b = rec("b", "eu", "198.18.1.2", "198.19.0.2", 2, 2);
        let c = rec("c", "us", "198.18.2.3", "198.19.0.3", 3, 3);
        let (d, _) = desired(
            &me,
            [1; 32],
            &[member(b.clone()), member(c.clone())],
            &[],
            &Choices::default(),
        );
        let current: BTreeMap<_, _> = d
            .iter()
            .map(|p| (p.config.public_key, p.config.clone()))
            .collect();
        assert!(diff(&current, &d).is_empty());
        let mut c2 = c;
        c2.region = Some("eu".into());
        let (d2, _) = desired(
            &me,
            [1; 32],
            &[member(b), member(c2)],
            &[],
            &Choices::default(),
        );
        let changes = diff(&current, &d2);
        assert_eq!(changes.len(), 1);
        assert!(matches!(&changes[0], Change::Replace(cfg) if cfg.name == "c"));
        assert_eq!(diff(&current, &[]).len(), 2);
    }
}

#[cfg(test)]
mod nat_tests {
    use super::*;

    fn behind_nat(name: &str, region: &str, lan: &str, mapped: &[&str]) -> NodeRecord {
        NodeRecord {
            version: 1,
            left: false,
            name: name.into(),
            region: Some(region.into()),
            private_address: Some(lan.parse().unwrap()),
            public_address: None,
            mesh_port: 6783,
            router_port: 51820,
            wireguard_key: [name.len() as u8; 32],
            pod_cidrs: vec![],
            claimed_at: vec![],
            trusted_subnets: vec![],
            observed: mapped.iter().map(|m| m.parse().unwrap()).collect(),
            homes: None,
            certificate: None,
        }
    }

    fn ep(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_peer_behind_nat_is_reached_at_its_mapping_across_regions_and_at_its_lan_address_within() {
        let me = behind_nat("me", "cloud", "198.19.0.1", &[]);
        let peer = behind_nat("peer", "home", "198.18.101.2", &["198.19.0.101:40000"]);
        assert_eq!(
            candidates(&me, &peer, &Own::default()),
            vec![
                (ep("198.19.0.101:40000"), Reason::Observed),
                (ep("198.18.101.2:51820"), Reason::OnlyAddress),
            ]
        );
        let neighbour = behind_nat("me", "home", "198.18.101.3", &["198.19.0.101:40001"]);
        assert_eq!(
            candidates(&neighbour, &peer, &Own::default()),
            vec![
                (ep("198.18.101.2:51820"), Reason::OnlyAddress),
                (ep("198.19.0.101:40000"), Reason::HolePunched),
            ]
        );
    }

    #[test]
    fn both_ends_behind_nat_is_hole_punched_and_a_mapping_that_is_no_endpoint_is_left_out() {
        let me = behind_nat("me", "home", "198.18.101.2", &["198.19.0.101:51820"]);
        let peer = behind_nat(
            "peer",
            "office",
            "198.18.102.2",
            &[
                "198.19.0.102:51820",
                "198.18.102.2:51820",
                "0.0.0.0:1",
                "127.0.0.1:9",
            ],
        );
        assert_eq!(
            candidates(&me, &peer, &Own::default()),
            vec![
                (ep("198.19.0.102:51820"), Reason::HolePunched),
                (ep("198.18.102.2:51820"), Reason::OnlyAddress),
            ]
        );
    }

    #[test]
    fn a_liar_changing_a_mapping_every_9_s_cannot_keep_a_peer_from_its_working_address() {
        let t0 = start();
        let a = behind_nat("a", "cloud", "198.19.0.1", &[]);
        let mut v = behind_nat("v", "home", "198.18.5.2", &[]);
        let works = ep("198.18.5.2:51820");
        let mut ch = Choices::default();
        let (mut up_rounds, mut endpoint_now) = (0, None);
        for s in 0..180u64 {
            let now = t0 + Duration::from_secs(s);
            v.observed = vec![SocketAddr::new(
                "203.0.113.66".parse().unwrap(),
                1000 + (s / 9) as u16,
            )];
            let cands = ch.candidates(&a, &v);
            let up = endpoint_now == Some(works);
            ch.restart_if_changed(now, v.wireguard_key, &cands, up);
            let state = if up {
                PeerState::Up
            } else {
                PeerState::Connecting
            };
            ch.observe_round(now, [(v.wireguard_key, state, cands.len())]);
            let (e, _, _) = endpoint(&a, &v, &cands, &ch);
            endpoint_now = e;
            if e == Some(works) {
                up_rounds += 1;
            }
        }
        assert!(up_rounds > 150, "v reachable in only {up_rounds} of 180 s");
    }

    #[test]
    fn a_reason_that_changes_alone_restarts_no_peer_and_a_mapping_on_another_port_is_kept() {
        let t0 = start();
        let mut me = behind_nat("me", "home", "198.18.101.2", &[]);
        let peer = behind_nat("peer", "office", "198.18.102.2", &["198.19.0.102:51820"]);
        let key = peer.wireguard_key;
        let mut ch = Choices::default();
        let c = ch.candidates(&me, &peer);
        ch.restart_if_changed(t0, key, &c, false);
        ch.observe(t0, key, PeerState::Connecting, 2);
        ch.observe(t0 + FALLBACK_AFTER, key, PeerState::Connecting, 2);
        assert_eq!(ch.index(&key), 1);
        // This node's own mapping appears: observed becomes hole-punched, nothing else.
        me.observed = vec![ep("198.19.0.101:51820")];
        let c2 = ch.candidates(&me, &peer);
        assert_ne!(c, c2);
        ch.restart_if_changed(t0 + FALLBACK_AFTER, key, &c2, false);
        assert_eq!(ch.index(&key), 1, "a reason-only change reset the choice");
        // A NAT that maps the public address to another port: that mapping is a candidate.
        let mut nat_public = behind_nat("p2", "home", "198.18.101.9", &["198.19.0.101:40000"]);
        nat_public.public_address = Some("198.19.0.101".parse().unwrap());
        let c = candidates(
            &behind_nat("x", "cloud", "198.19.0.1", &[]),
            &nat_public,
            &Own::default(),
        );
        assert!(
            c.iter().any(|(e, _)| *e == ep("198.19.0.101:40000")),
            "{c:?}"
        );
        assert!(
            c.iter().any(|(e, _)| *e == ep("198.19.0.101:51820")),
            "{c:?}"
        );
    }

    #[test]
    fn new_candidates_start_the_peer_over_at_the_first_at_once() {
        let t0 = start();
        let key = [4; 32];
        let mut ch = Choices::default();
        let before = vec![
            (ep("198.18.102.2:51820"), Reason::OnlyAddress),
            (ep("198.19.0.9:51820"), Reason::Fallback),
        ];
        ch.restart_if_changed(t0, key, &before, false);
        ch.observe(t0, key, PeerState::Connecting, 2);
        ch.observe(t0 + FALLBACK_AFTER, key, PeerState::Connecting, 2);
        assert_eq!(ch.index(&key), 1, "fell back");
        ch.restart_if_changed(t0, key, &before, false);
        assert_eq!(ch.index(&key), 1, "same candidates: no restart");
        // Up on the fallback: a new candidate in front does not move it off its path.
        let mut after = before.clone();
        after.insert(0, (ep("198.19.0.102:51820"), Reason::HolePunched));
        ch.restart_if_changed(t0, key, &after, true);
        assert_eq!(ch.index(&key), 2, "still on 198.19.0.9, now third");
        // Not up: the new first candidate at once.
        ch.restart_if_changed(t0, key, &before, false);
        ch.restart_if_changed(t0, key, &after, false);
        assert_eq!(ch.index(&key), 0, "the new first candidate at once");
        // With a fresh timer: no fallback right away.
        ch.observe(
            t0 + FALLBACK_AFTER + Duration::from_secs(1),
            key,
            PeerState::Connecting,
            3,
        );
        assert_eq!(ch.index(&key), 0);
    }

    /// A peer in one region with this node, both behind NAT, with a relay shim: the clock's
    /// start, its key, its shim, the choices, and its candidates (LAN, mapping, shim).
    fn relayed_pair() -> (
        Instant,
        [u8; 32],
        SocketAddr,
        Choices,
        Vec<(SocketAddr, Reason)>,
    ) {
        let t0 = start();
        let me = behind_nat("me", "home", "198.18.101.2", &["198.19.0.101:40001"]);
        let peer = behind_nat("peer", "home", "198.18.102.2", &["198.19.0.102:40002"]);
        let key = peer.wireguard_key;
        let shim = ep("127.0.0.1:40100");
        let mut ch = Choices::default();
        ch.set_relayed(HashMap::from([(key, (shim, "p".to_owned()))]));
        let c = ch.candidates(&me, &peer);
        (t0, key, shim, ch, c)
    }

    #[test]
    fn a_relayed_peer_is_offered_its_direct_candidates_every_retry_period_and_the_choice_follows_the_path_that_answers()
     {
        let (t0, key, shim, mut ch, c) = relayed_pair();
        assert_eq!(
            c.iter().map(|x| x.0).collect::<Vec<_>>(),
            [ep("198.18.102.2:51820"), ep("198.19.0.102:40002"), shim]
        );
        // Up on its direct address: never probed.
        assert!(ch.probes(t0, key, &c, c[0].0).is_empty());
        assert!(ch.probes(t0 + DIRECT_RETRY * 3, key, &c, c[0].0).is_empty());
        // Up through the relay: the far end came through it, and the choice follows.
        ch.follow(t0, key, &c, shim);
        assert_eq!(ch.index(&key), 2);
        assert!(ch.probes(t0, key, &c, shim).is_empty(), "not at once");
        assert!(
            ch.probes(t0 + DIRECT_RETRY - Duration::from_millis(1), key, &c, shim)
                .is_empty()
        );
        let t1 = t0 + DIRECT_RETRY;
        assert_eq!(ch.probes(t1, key, &c, shim), [c[0].0, c[1].0]);
        assert!(ch.probes(t1, key, &c, shim).is_empty(), "once per period");
        // Still on the relay when the next is due: that probe failed, the wait doubles, and
        // doubles again up to MAX_BACKOFF times.
        assert!(ch.probes(t1 + DIRECT_RETRY, key, &c, shim).is_empty());
        let t2 = t1 + DIRECT_RETRY * 2;
        assert_eq!(ch.probes(t2, key, &c, shim).len(), 2);
        assert!(ch.probes(t2 + DIRECT_RETRY * 3, key, &c, shim).is_empty());
        let mut t = t2 + DIRECT_RETRY * 4;
        assert_eq!(ch.probes(t, key, &c, shim).len(), 2);
        for _ in 0..8 {
            t += DIRECT_RETRY * 2u32.pow(MAX_BACKOFF);
            assert_eq!(ch.probes(t, key, &c, shim).len(), 2, "capped at 16 min");
        }
        // The LAN address answered: the session moved there, and so does the choice.
        ch.follow(t1, key, &c, c[0].0);
        assert_eq!(ch.index(&key), 0);
        // An address that is no candidate (a mapping nobody published) is not followed.
        ch.follow(t1, key, &c, ep("198.19.0.102:9"));
        assert_eq!(ch.index(&key), 0);
        // Without a relay shim nothing is probed.
        ch.set_relayed(HashMap::new());
        assert!(ch.probes(t1 + DIRECT_RETRY * 5, key, &c, shim).is_empty());
    }

    #[test]
    fn a_direct_path_that_sends_and_gets_nothing_back_goes_back_to_the_relay_and_the_next_probe_waits_longer()
     {
        let (t0, key, shim, mut ch, c) = relayed_pair();
        ch.restart_if_changed(t0, key, &c, true);
        let mapping = c[1].0;
        // On the relay: nothing to judge.
        assert_eq!(ch.check_path(t0, key, shim, (0, 100)), None);
        // A probe answered at the mapping; packets go out and come back: the path holds.
        ch.follow(t0, key, &c, mapping);
        let sec = Duration::from_secs(1);
        let mut t = t0;
        for i in 0..40u64 {
            t = t0 + sec * u32::try_from(i).unwrap();
            assert_eq!(ch.check_path(t, key, mapping, (i, i * 10)), None);
        }
        // Quiet (nothing sent): never judged, however long.
        assert_eq!(
            ch.check_path(t + PATH_PROOF * 4, key, mapping, (39, 390)),
            None
        );
        // Packets out, none back: just under PATH_PROOF holds, PATH_PROOF goes back.
        let t1 = t + PATH_PROOF * 4;
        let t2 = t1 + sec;
        assert_eq!(ch.check_path(t2, key, mapping, (39, 400)), None);
        let late = t1 + PATH_PROOF - Duration::from_millis(1);
        assert_eq!(ch.check_path(late, key, mapping, (39, 500)), None);
        // Too little sent to judge: held.
        let mut ch2 = Choices::default();
        ch2.set_relayed(HashMap::from([(key, (shim, "p".to_owned()))]));
        assert_eq!(ch2.check_path(t0, key, mapping, (5, 5)), None);
        let quiet = ch2.check_path(t0 + PATH_PROOF * 2, key, mapping, (5, 5 + UNANSWERED - 1));
        assert_eq!(quiet, None);
        assert_eq!(
            ch.check_path(t1 + PATH_PROOF, key, mapping, (39, 500)),
            Some(shim)
        );
        assert_eq!(ch.index(&key), 2, "the choice is the shim again");
        // Back on the relay, the next probe waits twice the period.
        let back = t1 + PATH_PROOF;
        assert!(ch.probes(back, key, &c, shim).is_empty());
        assert!(ch.probes(back + DIRECT_RETRY, key, &c, shim).is_empty());
        assert_eq!(ch.probes(back + DIRECT_RETRY * 2, key, &c, shim).len(), 2);
        // Packets back on a direct path clear the failures: the wait is one period again.
        let t3 = back + DIRECT_RETRY * 2;
        ch.follow(t3, key, &c, mapping);
        assert!(ch.probes(t3, key, &c, mapping).is_empty());
        assert_eq!(ch.check_path(t3, key, mapping, (0, 0)), None);
        assert_eq!(ch.check_path(t3 + sec, key, mapping, (1, 1)), None);
        ch.follow(t3 + sec, key, &c, shim);
        assert!(ch.probes(t3 + sec, key, &c, shim).is_empty());
        assert_eq!(
            ch.probes(t3 + sec + DIRECT_RETRY, key, &c, shim).len(),
            2,
            "one period again"
        );
        // A peer without a relay is never sent back.
        ch.set_relayed(HashMap::new());
        ch.follow(t3, key, &c, mapping);
        assert_eq!(ch.check_path(t3, key, mapping, (0, 0)), None);
        assert_eq!(
            ch.check_path(t3 + PATH_PROOF * 2, key, mapping, (0, 100)),
            None
        );
    }

    #[test]
    fn the_far_end_of_a_path_judged_failed_backs_off_too_unless_packets_came_back_on_it() {
        let sec = Duration::from_secs(1);
        // The far end of a path the other end judged: its session comes back to the shim
        // with nothing ever received on the direct path, and its probes back off too.
        let (t0, key, shim, mut b, c) = relayed_pair();
        let mapping = c[1].0;
        b.restart_if_changed(t0, key, &c, true);
        b.follow(t0, key, &c, mapping);
        assert!(b.probes(t0, key, &c, mapping).is_empty());
        assert_eq!(b.check_path(t0, key, mapping, (7, 7)), None);
        assert_eq!(b.check_path(t0 + sec * 16, key, mapping, (7, 7)), None);
        let back = t0 + sec * 17;
        b.follow(back, key, &c, shim);
        assert_eq!(b.check_path(back, key, shim, (7, 7)), None);
        assert!(b.probes(back, key, &c, shim).is_empty());
        assert!(b.probes(back + DIRECT_RETRY, key, &c, shim).is_empty());
        assert_eq!(b.probes(back + DIRECT_RETRY * 2, key, &c, shim).len(), 2);
        // Packets came back on it before: no failure, the next probe one period later.
        let (t0, key, shim, mut b, c) = relayed_pair();
        b.follow(t0, key, &c, mapping);
        assert_eq!(b.check_path(t0, key, mapping, (7, 7)), None);
        assert_eq!(b.check_path(t0 + sec, key, mapping, (8, 7)), None);
        assert_eq!(b.check_path(t0 + sec * 2, key, mapping, (8, 7)), None);
        b.follow(t0 + sec * 3, key, &c, shim);
        assert_eq!(b.check_path(t0 + sec * 3, key, shim, (8, 7)), None);
        assert!(b.probes(t0 + sec * 3, key, &c, shim).is_empty());
        assert_eq!(
            b.probes(t0 + sec * 3 + DIRECT_RETRY, key, &c, shim).len(),
            2
        );
    }

    /// Review finding: a member reported (or a record published) a mapping at another
    /// member's address. As a candidate it pointed a WireGuard endpoint at that address, so
    /// the router refused that member's plaintext there, and in both ends' trusted subnets it
    /// even made the path plaintext to the wrong node.
    #[test]
    fn a_mapping_at_another_members_address_is_no_candidate_and_a_mapping_is_never_plaintext() {
        let lan: IpNet = "10.9.0.0/16".parse().unwrap();
        let mut me = behind_nat("me", "home", "10.9.0.1", &[]);
        me.trusted_subnets = vec![lan];
        // x has only a public address in another region, and trusts the LAN too.
        let mut x = behind_nat("x", "cloud", "198.19.0.5", &["10.9.0.7:51820"]);
        x.private_address = None;
        x.public_address = Some("198.19.0.5".parse().unwrap());
        x.trusted_subnets = vec![lan];
        let y = behind_nat("yy", "home", "10.9.0.7", &[]);
        let mut ch = Choices::default();
        // The mapping alone (no member holds its address): a candidate, but encrypted.
        let c = ch.candidates(&me, &x);
        assert!(c.iter().any(|(a, _)| *a == ep("10.9.0.7:51820")), "{c:?}");
        let now = start();
        ch.follow(now, x.wireguard_key, &c, ep("10.9.0.7:51820"));
        let (_, _, path) = endpoint(&me, &x, &c, &ch);
        assert_eq!(path, PathKind::Encrypted, "a NAT mapping carried plaintext");
        // y advertises that address: x's mapping there is dropped, at any port.
        ch.set_members([&me, &y]);
        assert_eq!(
            ch.candidates(&me, &x)
                .iter()
                .map(|c| c.0)
                .collect::<Vec<_>>(),
            [ep("198.19.0.5:51820")]
        );
        x.observed = vec![ep("10.9.0.7:4000")];
        assert_eq!(ch.candidates(&me, &x).len(), 1);
        // y's own address stays y's candidate.
        assert_eq!(ch.candidates(&me, &y)[0].0, ep("10.9.0.7:51820"));
        // This node's own addresses are taken too.
        x.observed = vec![ep("10.9.0.1:51820")];
        assert_eq!(ch.candidates(&me, &x).len(), 1);
    }

    /// A test's clock, started from a real instant (the code under test takes `now` as given).
    fn start() -> Instant {
        #[expect(
            clippy::disallowed_methods,
            reason = "a test's clock starts from a real instant"
        )]
        Instant::now()
    }

    /// A public node's view of a node behind NAT whose record lists only its LAN address.
    fn public_and_natted() -> (NodeRecord, NodeRecord, SocketAddr, SocketAddr) {
        let mut p = behind_nat("p", "cloud", "198.19.0.1", &[]);
        p.public_address = p.private_address;
        let a = behind_nat("aa", "home", "198.18.101.2", &[]);
        (p, a, ep("198.18.101.2:51820"), ep("198.19.0.101:51820"))
    }

    #[test]
    fn a_session_up_at_a_mapping_no_record_lists_yet_is_where_the_peer_is_reached() {
        let now = start();
        let (p, a, lan, mapping) = public_and_natted();
        let mut ch = Choices::default();
        let members = [weft_mesh::testing::member(
            weft_mesh::NodeId([9; 32]),
            a.clone(),
        )];
        let (d, _) = desired(&p, [1; 32], &members, &[], &ch);
        assert_eq!(d[0].config.endpoint, Some(lan), "nothing learned yet");
        // a's handshake came in from its NAT's mapping: p's session with it is up there.
        ch.learn(a.wireguard_key, Some(mapping));
        let cands = ch.candidates(&p, &a);
        assert_eq!(
            cands,
            [(lan, Reason::OnlyAddress), (mapping, Reason::Learned)]
        );
        ch.restart_if_changed(now, a.wireguard_key, &cands, true);
        ch.follow(now, a.wireguard_key, &cands, mapping);
        let (d, _) = desired(&p, [1; 32], &members, &[], &ch);
        assert_eq!(
            (d[0].config.endpoint, d[0].reason),
            (Some(mapping), Reason::Learned),
            "a fresh session (its block claimed) starts where a is reached, not at its LAN address"
        );
        // Once a's record publishes the mapping, it is listed once, as observed (first across
        // regions).
        let mut published = a.clone();
        published.observed = vec![mapping];
        assert_eq!(
            ch.candidates(&p, &published),
            [(mapping, Reason::Observed), (lan, Reason::OnlyAddress)]
        );
        // The session gone, the learned endpoint goes with it.
        ch.learn(a.wireguard_key, None);
        assert_eq!(ch.candidates(&p, &a), [(lan, Reason::OnlyAddress)]);
    }

    #[test]
    fn a_member_publishing_the_learned_address_does_not_move_the_session_and_a_shim_is_not_learned()
    {
        let now = start();
        let (p, a, lan, mapping) = public_and_natted();
        let mut ch = Choices::default();
        ch.set_members([&p, &a]);
        ch.learn(a.wireguard_key, Some(mapping));
        let cands = ch.candidates(&p, &a);
        ch.restart_if_changed(now, a.wireguard_key, &cands, true);
        ch.follow(now, a.wireguard_key, &cands, mapping);
        // Another member (behind the same NAT, or lying) publishes the NAT's address as its
        // own: p's session with a stays where it is up.
        let mut other = behind_nat("other", "home", "198.18.101.3", &[]);
        other.public_address = Some(mapping.ip());
        ch.set_members([&p, &a, &other]);
        let cands = ch.candidates(&p, &a);
        assert_eq!(
            cands,
            [(lan, Reason::OnlyAddress), (mapping, Reason::Learned)]
        );
        ch.restart_if_changed(now, a.wireguard_key, &cands, true);
        let (e, reason, _) = endpoint(&p, &a, &cands, &ch);
        assert_eq!((e, reason), (Some(mapping), Reason::Learned));
        // A record's IPv4-mapped spelling is the plain address the session is followed to:
        // one candidate, and the choice finds the session there.
        let mut mapped_lan = a.clone();
        mapped_lan.private_address = Some("::ffff:198.18.101.2".parse().unwrap());
        mapped_lan.public_address = Some("198.19.0.77".parse().unwrap());
        ch.learn(a.wireguard_key, Some(lan));
        let cands = ch.candidates(&p, &mapped_lan);
        assert_eq!(
            cands,
            [
                (ep("198.19.0.77:51820"), Reason::OtherRegion),
                (lan, Reason::Fallback)
            ]
        );
        ch.follow(now, a.wireguard_key, &cands, lan);
        assert_eq!(endpoint(&p, &mapped_lan, &cands, &ch).0, Some(lan));
        ch.learn(a.wireguard_key, Some(ep("[::ffff:127.0.0.1]:40001")));
        assert_eq!(ch.candidates(&p, &a), [(lan, Reason::OnlyAddress)]);
        // A session up through a relay's shim: listed as relayed while the plan has it, and
        // not at all once the relay is gone (a fresh session then looks elsewhere).
        let shim = ep("127.0.0.1:40001");
        ch.learn(a.wireguard_key, Some(shim));
        ch.set_relayed(HashMap::from([(a.wireguard_key, (shim, "r".to_owned()))]));
        assert_eq!(
            ch.candidates(&p, &a),
            [(lan, Reason::OnlyAddress), (shim, Reason::Relayed)]
        );
        ch.set_relayed(HashMap::new());
        assert_eq!(ch.candidates(&p, &a), [(lan, Reason::OnlyAddress)]);
    }

    fn cfg(endpoint: &str, allowed: &[&str]) -> PeerConfig {
        PeerConfig {
            name: "aa".into(),
            public_key: [2; 32],
            endpoint: Some(ep(endpoint)),
            allowed_ips: allowed.iter().map(|n| n.parse().unwrap()).collect(),
            persistent_keepalive: Some(25),
            path: PathKind::Encrypted,
        }
    }

    #[test]
    fn new_prefixes_keep_the_session_and_an_endpoint_moves_in_place_only_to_where_it_is_up() {
        let (lan, mapping, shim) = (
            "198.18.101.2:51820",
            "198.19.0.101:51820",
            ep("127.0.0.1:40001"),
        );
        let have = cfg(lan, &[]);
        // A block claimed: the prefixes change in place, up or not.
        let claimed = cfg(lan, &["100.64.7.0/24"]);
        let step = in_place(&have, &claimed, None, None).expect("in place");
        assert_eq!(step.allowed_ips, Some(claimed.allowed_ips.clone()));
        assert_eq!(step.endpoint, None);
        // Prefixes and an endpoint that follows the session where it is up.
        let both = cfg(mapping, &["100.64.7.0/24"]);
        assert_eq!(
            in_place(&have, &both, Some(ep(mapping)), None),
            Some(InPlace {
                allowed_ips: Some(both.allowed_ips.clone()),
                endpoint: Some((ep(mapping), ep(mapping))),
            })
        );
        // Back to the relay shim after a direct path failed.
        let mut relayed = cfg(lan, &[]);
        relayed.endpoint = Some(shim);
        assert_eq!(
            in_place(&have, &relayed, Some(ep(mapping)), Some(shim)),
            Some(InPlace {
                allowed_ips: None,
                endpoint: Some((ep(mapping), shim)),
            })
        );
        // Anywhere else, or down: a fresh session there.
        assert_eq!(in_place(&have, &both, None, None), None);
        assert_eq!(in_place(&have, &both, Some(ep(lan)), None), None);
        // A change of path, name or keepalive starts a fresh session whatever else.
        let mut plain = claimed.clone();
        plain.path = PathKind::Plaintext;
        assert_eq!(in_place(&have, &plain, None, None), None);
        let mut renamed = claimed.clone();
        renamed.name = "other".into();
        assert_eq!(in_place(&have, &renamed, None, None), None);
        let mut keepalive = claimed;
        keepalive.persistent_keepalive = None;
        assert_eq!(in_place(&have, &keepalive, None, None), None);
    }

    #[test]
    fn two_peers_trading_blocks_both_land_in_one_round_when_each_gives_up_first() {
        let now = start();
        let mut router =
            weft_router::Router::new(weft_router::x25519::StaticSecret::from([7; 32]), 1);
        let peer = |name: &str, key: u8, block: &str| PeerConfig {
            name: name.into(),
            public_key: [key; 32],
            ..cfg("198.18.1.2:51820", &[block])
        };
        let (x, y) = (peer("x", 2, "100.64.1.0/24"), peer("y", 3, "100.64.2.0/24"));
        let ids: BTreeMap<[u8; 32], weft_router::PeerId> = [&x, &y]
            .into_iter()
            .map(|c| {
                (
                    c.public_key,
                    router.add_peer(now, c.clone()).expect("added"),
                )
            })
            .collect();
        let current: BTreeMap<[u8; 32], PeerConfig> = [&x, &y]
            .into_iter()
            .map(|c| (c.public_key, c.clone()))
            .collect();
        let (x2, y2) = (peer("x", 2, "100.64.2.0/24"), peer("y", 3, "100.64.1.0/24"));
        let changes = [Change::Replace(x2.clone()), Change::Replace(y2.clone())];
        let steps = in_place_steps(&changes, &current, &BTreeMap::new(), &BTreeMap::new());
        assert_eq!(steps.len(), 2, "both change in place");
        assert!(
            router
                .set_allowed_ips(ids[&x.public_key], x2.allowed_ips.clone())
                .is_err(),
            "taking first is refused: y still holds it"
        );
        let first = given_up_first(&current, &steps);
        assert_eq!(first, [([2; 32], vec![]), ([3; 32], vec![])]);
        for (k, kept) in first {
            router.set_allowed_ips(ids[&k], kept).expect("giving up");
        }
        for (k, step) in &steps {
            let want = step.allowed_ips.clone().expect("prefixes change");
            router.set_allowed_ips(ids[k], want).expect("taking after");
        }
        let routed: BTreeMap<[u8; 32], Vec<IpNet>> = router
            .peers(now)
            .into_iter()
            .map(|p| (p.config.public_key, p.config.allowed_ips))
            .collect();
        assert_eq!(routed[&x.public_key], x2.allowed_ips);
        assert_eq!(routed[&y.public_key], y2.allowed_ips);
    }
}
