//! Which members relay for whom, the pure part (see [`crate::relay`] for the design).
//!
//! A member can relay when it is alive, has a public address, is not behind NAT itself (its
//! record publishes no observed mapping), and the policy (`mesh.relay`) allows it.
//!
//! Each node behind NAT picks its [`HOMES`] *home relays* itself ([`own_homes`]) and publishes
//! them in its record ([`NodeRecord::homes`]); its peers send through the first of those they
//! can use. The pick spreads the load (the number of nodes behind NAT a relay is home to):
//! [`assign`] is consistent hashing with bounded loads. In key order, every node behind NAT
//! takes the first relays of its own hash order (BLAKE2s of its key and theirs) that carry less
//! than a tenth above the mean load plus one, and the least loaded when all are full. So no
//! relay carries more than that bound while any is below it, and a join moves few homes. Each
//! node works it out for itself over the relays it can reach, and the far ends read the result
//! from its record, so the two ends of a relayed pair never depend on seeing the mesh alike. A
//! record without homes (a build before they were published) is reached through the first of
//! its hash order, as those builds register.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use blake2::Digest as _;
use weft_mesh::{Member, NodeRecord};

/// How many home relays a node registers with: the second takes over at once when the first
/// goes down.
pub const HOMES: usize = 2;

/// Which members may relay (`mesh.relay`).
pub type Policy = weft_config::Relay;

/// A member that can relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relay {
    /// Its name.
    pub name: String,
    /// Its WireGuard key.
    pub key: [u8; 32],
    /// Its relay port's address.
    pub addr: SocketAddr,
}

/// Whether `r` is behind NAT, as its record says.
pub fn behind_nat(r: &NodeRecord) -> bool {
    !r.observed.is_empty()
}

/// The members that can relay under `policy`.
pub fn relays(members: &[Member], policy: &Policy) -> Vec<Relay> {
    if *policy == Policy::Never {
        return Vec::new();
    }
    members
        .iter()
        .filter(|m| m.alive && !m.record.left && !behind_nat(&m.record))
        .filter(|m| match policy {
            Policy::Named(names) => names.contains(&m.record.name),
            _ => true,
        })
        .filter_map(|m| {
            let ip = m.record.public_address?;
            Some(Relay {
                name: m.record.name.clone(),
                key: m.record.wireguard_key,
                addr: SocketAddr::new(ip, crate::relay::port(m.record.router_port)),
            })
        })
        .collect()
}

fn rank(node: &[u8; 32], relay: &[u8; 32]) -> [u8; 32] {
    let mut h = blake2::Blake2s256::new();
    h.update(b"weft home relay v1");
    h.update(node);
    h.update(relay);
    h.finalize().into()
}

/// The relays in the order of node `node`'s hash ranks, itself left out.
fn ranked<'a>(node: &[u8; 32], relays: &'a [Relay]) -> Vec<&'a Relay> {
    let mut ranked: Vec<&Relay> = relays.iter().filter(|r| r.key != *node).collect();
    ranked.sort_by_key(|r| rank(node, &r.key));
    ranked
}

/// The home relays in plain hash order of the node with key `node` among `relays`, best
/// first: how a node whose record names no homes registers.
pub fn hash_homes(node: &[u8; 32], relays: &[Relay]) -> Vec<Relay> {
    ranked(node, relays)
        .into_iter()
        .take(HOMES)
        .cloned()
        .collect()
}

/// The home relays of every node in `natted` (keys) among `relays`, best first: the nodes in
/// key order each take the first [`HOMES`] relays in their hash order that are below the
/// capacity (a tenth above the mean load, plus one), and when every relay is full, the least
/// loaded. The same inputs give the same homes in any order.
pub fn assign(relays: &[Relay], natted: &[[u8; 32]]) -> HashMap<[u8; 32], Vec<Relay>> {
    let mut nodes: Vec<&[u8; 32]> = natted.iter().collect();
    nodes.sort();
    nodes.dedup();
    let mut out = HashMap::new();
    if relays.is_empty() {
        return out;
    }
    let want = nodes.len() * HOMES.min(relays.len());
    let capacity = (want * 11).div_ceil(relays.len() * 10) + 1;
    let mut load: HashMap<[u8; 32], usize> = HashMap::new();
    for node in nodes {
        let order = ranked(node, relays);
        let load_of =
            |r: &Relay, load: &HashMap<[u8; 32], usize>| load.get(&r.key).copied().unwrap_or(0);
        let mut mine: Vec<&Relay> = order
            .iter()
            .filter(|r| load_of(r, &load) < capacity)
            .take(HOMES)
            .copied()
            .collect();
        if mine.len() < HOMES {
            // Too few relays below the capacity (rare: together they hold a tenth more than
            // all nodes want): the least loaded of the rest (hash order breaks ties).
            let mut rest: Vec<&Relay> = order
                .iter()
                .filter(|r| !mine.iter().any(|m| m.key == r.key))
                .copied()
                .collect();
            rest.sort_by_key(|r| load_of(r, &load));
            mine.extend(rest.into_iter().take(HOMES - mine.len()));
        }
        for r in &mine {
            *load.entry(r.key).or_default() += 1;
        }
        out.insert(*node, mine.into_iter().cloned().collect());
    }
    out
}

/// Whether `policy` lets this node use relay `r`.
fn allowed(policy: &Policy, r: &Relay) -> bool {
    match policy {
        Policy::Named(names) => names.contains(&r.name),
        Policy::Never => false,
        Policy::Auto => true,
    }
}

/// The members behind NAT (alive, not left), by WireGuard key.
fn natted(members: &[Member]) -> impl Iterator<Item = &Member> {
    members
        .iter()
        .filter(|m| m.alive && !m.record.left && behind_nat(&m.record))
}

/// The relays this node's policy allows, split into those it may use as its homes and those
/// it may not because they answer no probe (in `down`).
pub fn usable(
    members: &[Member],
    policy: &Policy,
    down: &[SocketAddr],
) -> (Vec<Relay>, Vec<Relay>) {
    relays(members, policy)
        .into_iter()
        .partition(|r| !down.contains(&r.addr))
}

/// The home relays this node (`me`, behind NAT) registers with and publishes: its part of
/// [`assign`] over the relays it may use ([`usable`]), with every member behind NAT counted in
/// the load. The bound on the load holds as far as the members see the mesh alike (the
/// nodes' policies and silent relays differ, and older builds register by hash order).
pub fn own_homes(
    me: &NodeRecord,
    members: &[Member],
    policy: &Policy,
    down: &[SocketAddr],
) -> Vec<Relay> {
    if !behind_nat(me) {
        return Vec::new();
    }
    let (usable, _) = usable(members, policy, down);
    let keys: Vec<[u8; 32]> = natted(members)
        .map(|m| m.record.wireguard_key)
        .chain(std::iter::once(me.wireguard_key))
        .collect();
    assign(&usable, &keys)
        .remove(&me.wireguard_key)
        .unwrap_or_default()
}

/// The relays that reach member `m` (behind NAT), best first: the homes its record names that
/// are relays, or for a record of a build before published homes, its plain hash order over
/// the relays not in `down` (as it registers).
fn homes_of(m: &Member, all: &[Relay], down: &[SocketAddr]) -> Vec<Relay> {
    let Some(homes) = &m.record.homes else {
        let mut answering = all.to_vec();
        answering.retain(|r| !down.contains(&r.addr));
        return hash_homes(&m.record.wireguard_key, &answering);
    };
    homes
        .iter()
        .filter_map(|k| all.iter().find(|r| r.key == *k))
        .cloned()
        .collect()
}

/// This node's plan: the relays it registers with and publishes ([`own_homes`], when it is
/// behind NAT), and for each member behind NAT the relay that reaches it (the first of its
/// published homes that this node's policy allows and that is not in `down`), when this node
/// is behind NAT too (a public node is reached directly by nodes behind NAT, and reaches them
/// at the mappings they open).
pub fn plan(
    me: &NodeRecord,
    members: &[Member],
    policy: &Policy,
    down: &[SocketAddr],
) -> (Vec<Relay>, Vec<([u8; 32], Relay)>) {
    if !behind_nat(me) || *policy == Policy::Never {
        return (Vec::new(), Vec::new());
    }
    // A peer's homes are its own choice, read from its record. This node's policy limits
    // which it uses, and a relay that answers this node's probes no more is passed over at
    // once: the peer registered with its next home too.
    let all = relays(members, &Policy::Auto);
    let peers = natted(members)
        .filter(|m| m.record.wireguard_key != me.wireguard_key)
        .filter_map(|m| {
            let via = homes_of(m, &all, down)
                .into_iter()
                .find(|r| allowed(policy, r) && !down.contains(&r.addr))?;
            Some((m.record.wireguard_key, via))
        })
        .collect();
    (own_homes(me, members, policy, down), peers)
}

/// How long a node stays registered with a home relay it no longer publishes: while its peers
/// learn its new record, they still send through the old one.
pub const HOME_GRACE: Duration = Duration::from_secs(30);

/// The least time between two publications of new homes that only rebalance (a published
/// home that is gone or silent is replaced at once).
pub const REBALANCE_EVERY: Duration = Duration::from_secs(10);

/// This node's published home relays, and the ones it left but stays registered with for
/// [`HOME_GRACE`].
#[derive(Debug, Default)]
pub struct HomeRelays {
    published: Option<Vec<[u8; 32]>>,
    at: Option<Instant>,
    leaving: Vec<(Relay, Instant)>,
    last: Vec<Relay>,
}

/// What to do with this round's homes ([`HomeRelays::round`]).
#[derive(Debug, PartialEq, Eq)]
pub struct HomesRound {
    /// Every relay to register with: the homes in use, then the ones left within their grace.
    pub register: Vec<Relay>,
    /// The homes to publish in the record, when they change (the outer `Some`; the inner
    /// `None` when this node is not behind NAT).
    pub publish: Option<Option<Vec<[u8; 32]>>>,
}

impl HomeRelays {
    /// Takes this round's [`own_homes`] at `now` (`None` when this node is not behind NAT),
    /// the relays it may use ([`usable`]), and the relays it may use but that answer no probe
    /// (`silent`). A change is published at once when a published home can no longer be used
    /// (or this node went behind NAT or came out), and a change that only rebalances at most
    /// every [`REBALANCE_EVERY`]. A home left stays registered for [`HOME_GRACE`], and for as
    /// long as it stays silent: registered, it is still probed, so it is not taken back
    /// while silent (and dropped again a moment later) once the service forgets it.
    pub fn round(
        &mut self,
        now: Instant,
        wanted: Option<Vec<Relay>>,
        usable: &[Relay],
        silent: &[Relay],
    ) -> HomesRound {
        let keys: Option<Vec<[u8; 32]>> =
            wanted.as_ref().map(|w| w.iter().map(|r| r.key).collect());
        let urgent = match &self.published {
            Some(p) => keys.is_none() || p.iter().any(|k| !usable.iter().any(|r| r.key == *k)),
            None => keys.is_some(),
        };
        let waited = self
            .at
            .is_none_or(|t| now.saturating_duration_since(t) >= REBALANCE_EVERY);
        let publish = (keys != self.published && (urgent || waited)).then(|| {
            self.published.clone_from(&keys);
            self.at = Some(now);
            keys
        });
        // Homes left (dropped, or waiting for a rebalance's turn to be published) stay
        // registered for their grace: longer than a rebalance waits.
        let current = wanted.unwrap_or_default();
        for r in &self.last {
            if !current.contains(r) && !self.leaving.iter().any(|(h, _)| h == r) {
                self.leaving.push((r.clone(), now));
            }
        }
        self.leaving.retain(|(r, since)| {
            !current.contains(r)
                && (now.saturating_duration_since(*since) < HOME_GRACE || silent.contains(r))
        });
        self.last.clone_from(&current);
        HomesRound {
            register: current
                .into_iter()
                .chain(self.leaving.iter().map(|(r, _)| r.clone()))
                .collect(),
            publish,
        }
    }
}

/// The members behind NAT that this node, behind NAT too, has no relay for among `peers` (its
/// [`plan`]): they are reached only if a direct path comes up.
pub fn stranded(me: &NodeRecord, members: &[Member], peers: &[([u8; 32], Relay)]) -> Vec<[u8; 32]> {
    if !behind_nat(me) {
        return Vec::new();
    }
    natted(members)
        .map(|m| m.record.wireguard_key)
        .filter(|k| *k != me.wireguard_key && !peers.iter().any(|(p, _)| p == k))
        .collect()
}

/// Why no relay from this node (under `policy`, with `down` silent) can carry peer `m`, a
/// [`stranded`] one, for status.
pub fn why_stranded(
    m: &Member,
    members: &[Member],
    policy: &Policy,
    down: &[SocketAddr],
) -> String {
    const BOTH: &str = "both ends are behind NAT, no direct path came up, and";
    if *policy == Policy::Never {
        return format!("{BOTH} mesh.relay is never");
    }
    let all = relays(members, &Policy::Auto);
    if all.is_empty() {
        return format!("{BOTH} no member can relay (none is public, alive and not behind NAT)");
    }
    let homes = homes_of(m, &all, &[]);
    if homes.is_empty() {
        return if m.record.homes.as_ref().is_some_and(Vec::is_empty) {
            format!("{BOTH} it has no relay to register with")
        } else {
            format!("{BOTH} none of the relays it registers with is alive")
        };
    }
    let names = |v: Vec<&Relay>| {
        v.iter()
            .map(|r| format!("{} ({})", r.name, r.addr))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let allowed_homes: Vec<&Relay> = homes.iter().filter(|r| allowed(policy, r)).collect();
    if allowed_homes.is_empty() {
        return format!(
            "{BOTH} mesh.relay allows none of the relays it registers with: {}",
            names(homes.iter().collect())
        );
    }
    format!(
        "{BOTH} no relay answers (silent: {})",
        names(
            allowed_homes
                .into_iter()
                .filter(|r| down.contains(&r.addr))
                .collect()
        )
    )
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::disallowed_methods,
        reason = "tests start their clock from a real instant"
    )]
    use weft_mesh::NodeId;

    use super::*;

    fn member(name: &str, key: u8, public: Option<&str>, nat: bool) -> Member {
        Member {
            id: NodeId([key; 32]),
            alive: true,
            heartbeat: 0,
            last_heard: Instant::now(),
            record: NodeRecord {
                version: 1,
                left: false,
                name: name.into(),
                region: None,
                private_address: None,
                public_address: public.map(|p| p.parse().unwrap()),
                mesh_port: 6783,
                router_port: 51820,
                wireguard_key: [key; 32],
                pod_cidrs: vec![],
                claimed_at: vec![],
                trusted_subnets: vec![],
                observed: if nat {
                    vec!["198.19.0.200:1".parse().unwrap()]
                } else {
                    vec![]
                },
                homes: None,
                certificate: None,
            },
        }
    }

    fn publish(members: &mut [Member], i: usize) -> Vec<Relay> {
        let homes = own_homes(&members[i].record, members, &Policy::Auto, &[]);
        members[i].record.homes = Some(homes.iter().map(|r| r.key).collect());
        homes
    }

    #[test]
    fn only_alive_public_members_not_behind_nat_relay_and_both_ends_agree_on_the_homes() {
        let mut members = vec![
            member("p1", 1, Some("198.19.0.1"), false),
            member("p2", 2, Some("198.19.0.2"), false),
            member("p3", 3, Some("198.19.0.3"), false),
            member("natted", 4, Some("198.19.0.4"), true),
            member("private", 5, None, false),
            member("a", 6, None, true),
            member("b", 7, None, true),
        ];
        members[2].alive = false;
        let r = relays(&members, &Policy::Auto);
        let names: Vec<&str> = r.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["p1", "p2"]);
        assert_eq!(r[0].addr, "198.19.0.1:51821".parse().unwrap());
        // Records without published homes (older builds) are reached by the hash order they
        // register by.
        let (_, a_peers) = plan(&members[5].record, &members, &Policy::Auto, &[]);
        let via_b = &a_peers.iter().find(|(k, _)| *k == [7; 32]).unwrap().1;
        assert_eq!(via_b, &hash_homes(&[7; 32], &r)[0]);
        // a's plan names b's first published home; b's own plan registers there.
        let a_published = publish(&mut members, 5);
        let b_published = publish(&mut members, 6);
        let (a_homes, a_peers) = plan(&members[5].record, &members, &Policy::Auto, &[]);
        let (b_homes, b_peers) = plan(&members[6].record, &members, &Policy::Auto, &[]);
        assert_eq!((&a_homes, &b_homes), (&a_published, &b_published));
        assert_eq!(a_homes.len(), 2);
        let via_b = &a_peers.iter().find(|(k, _)| *k == [7; 32]).unwrap().1;
        assert_eq!(via_b, &b_homes[0]);
        let via_a = &b_peers.iter().find(|(k, _)| *k == [6; 32]).unwrap().1;
        assert_eq!(via_a, &a_homes[0]);
        // A relay that answers a's probes no more: a goes through b's next home, with which b
        // registered too.
        let (_, around) = plan(
            &members[5].record,
            &members,
            &Policy::Auto,
            &[b_homes[0].addr],
        );
        let via_b2 = &around.iter().find(|(k, _)| *k == [7; 32]).unwrap().1;
        assert_eq!(via_b2, &b_homes[1]);
        // The NATed public member is a peer reached through a relay, never a relay.
        assert!(a_peers.iter().any(|(k, _)| *k == [4; 32]));
        assert!(!a_peers.iter().any(|(_, r)| r.name == "natted"));
    }

    #[test]
    fn a_public_node_or_never_makes_no_plan_and_named_limits_the_relays() {
        let members = vec![
            member("p1", 1, Some("198.19.0.1"), false),
            member("p2", 2, Some("198.19.0.2"), false),
            member("a", 6, None, true),
            member("b", 7, None, true),
        ];
        let public = member("me", 9, Some("198.19.0.9"), false);
        assert_eq!(
            plan(&public.record, &members, &Policy::Auto, &[]),
            (vec![], vec![])
        );
        assert_eq!(
            plan(&members[2].record, &members, &Policy::Never, &[]),
            (vec![], vec![])
        );
        let only_p2 = Policy::Named(vec!["p2".into()]);
        let (homes, peers) = plan(&members[2].record, &members, &only_p2, &[]);
        assert!(homes.iter().all(|r| r.name == "p2"));
        assert!(peers.iter().all(|(_, r)| r.name == "p2"));
        assert_eq!(peers.len(), 1);
        assert!(relays(&members, &Policy::Never).is_empty());
    }

    #[test]
    fn a_peer_behind_nat_without_a_relay_is_stranded_and_a_public_one_never_is() {
        let mut members = vec![
            member("p1", 1, Some("198.19.0.1"), false),
            member("a", 6, None, true),
            member("b", 7, None, true),
            member("c", 8, None, false),
        ];
        let me = members[1].record.clone();
        let (_, peers) = plan(&me, &members, &Policy::Auto, &[]);
        assert!(stranded(&me, &members, &peers).is_empty());
        // Its only relay silent, or relaying refused: b is stranded; c, not behind NAT, never.
        let (_, peers) = plan(
            &me,
            &members,
            &Policy::Auto,
            &["198.19.0.1:51821".parse().unwrap()],
        );
        assert_eq!(stranded(&me, &members, &peers), [[7; 32]]);
        let (_, peers) = plan(&me, &members, &Policy::Never, &[]);
        assert_eq!(stranded(&me, &members, &peers), [[7; 32]]);
        // A public node reaches every node behind NAT at its mapping.
        assert!(stranded(&members[0].record, &members, &[]).is_empty());
        members[2].alive = false;
        let (_, peers) = plan(&me, &members, &Policy::Never, &[]);
        assert!(
            stranded(&me, &members, &peers).is_empty(),
            "a dead member is no peer"
        );
    }

    fn key(i: u32) -> [u8; 32] {
        let mut h = blake2::Blake2s256::new();
        h.update(i.to_le_bytes());
        h.finalize().into()
    }

    fn relay(i: u8) -> Relay {
        Relay {
            name: format!("r{i}"),
            key: key(1000 + u32::from(i)),
            addr: SocketAddr::from(([198, 19, 0, i + 1], 51821)),
        }
    }

    #[test]
    fn no_relay_is_home_to_more_than_a_tenth_above_the_mean_plus_one_and_a_join_moves_few() {
        let relays: Vec<Relay> = (0..10).map(relay).collect();
        let nodes: Vec<[u8; 32]> = (0..300).map(key).collect();
        let homes = assign(&relays, &nodes);
        let mut load: HashMap<[u8; 32], usize> = HashMap::new();
        for n in &nodes {
            let h = &homes[n];
            assert_eq!(h.len(), HOMES);
            assert_ne!(h[0].key, h[1].key);
            for r in h {
                *load.entry(r.key).or_default() += 1;
            }
        }
        // 600 homes over 10 relays: a mean of 60, a bound of 67.
        let max = load.values().max().copied().unwrap_or(0);
        assert!(max <= 67, "{load:?}");
        let mut plain: HashMap<[u8; 32], usize> = HashMap::new();
        for n in &nodes {
            for r in hash_homes(n, &relays) {
                *plain.entry(r.key).or_default() += 1;
            }
        }
        let plain_max = plain.values().max().copied().unwrap_or(0);
        assert!(plain_max > max, "plain {plain_max}, bounded {max}");
        let mut shuffled = nodes.clone();
        shuffled.reverse();
        assert_eq!(assign(&relays, &shuffled), homes, "order does not matter");
        let mut more = nodes.clone();
        more.push(key(5000));
        let after = assign(&relays, &more);
        let moved = nodes.iter().filter(|n| after[*n] != homes[*n]).count();
        assert!(moved <= 30, "{moved} of 300 nodes changed homes");
        // Two relays: both are every node's homes; one: it is every node's only home.
        let h = assign(&relays[..2], &nodes[..5]);
        assert!(h.values().all(|v| v.len() == 2));
        let h = assign(&relays[..1], &nodes[..5]);
        assert!(h.values().all(|v| v.len() == 1 && v[0] == relays[0]));
        assert!(assign(&[], &nodes).is_empty());
        eprintln!(
            "homes of 300 nodes on 10 relays: busiest {max} (plain hash order {plain_max}), {moved} moved when one joined"
        );
    }

    /// Relays p1, p2, p3, and a and b behind NAT; b names p3 then p2 as its homes, whatever
    /// a would work out for it.
    fn three_relays_and_b_naming_p3_then_p2() -> Vec<Member> {
        let mut members = vec![
            member("p1", 1, Some("198.19.0.1"), false),
            member("p2", 2, Some("198.19.0.2"), false),
            member("p3", 3, Some("198.19.0.3"), false),
            member("a", 6, None, true),
            member("b", 7, None, true),
        ];
        members[4].record.homes = Some(vec![[3; 32], [2; 32]]);
        members
    }

    #[test]
    fn a_peer_is_reached_through_the_first_usable_home_its_record_names() {
        let mut members = three_relays_and_b_naming_p3_then_p2();
        let me = members[3].record.clone();
        let via = |members: &[Member], policy: &Policy, down: &[SocketAddr]| {
            plan(&me, members, policy, down)
                .1
                .into_iter()
                .find(|(k, _)| *k == [7; 32])
                .map(|(_, r)| r.name)
        };
        assert_eq!(via(&members, &Policy::Auto, &[]).as_deref(), Some("p3"));
        // Silent to a, or not allowed by a's policy: the next one b named.
        let p3: SocketAddr = "198.19.0.3:51821".parse().unwrap();
        assert_eq!(via(&members, &Policy::Auto, &[p3]).as_deref(), Some("p2"));
        let p1_p2 = Policy::Named(vec!["p1".into(), "p2".into()]);
        assert_eq!(via(&members, &p1_p2, &[]).as_deref(), Some("p2"));
        // A named home that is no relay (dead here) is passed over; none left: stranded.
        members[2].alive = false;
        assert_eq!(via(&members, &Policy::Auto, &[]).as_deref(), Some("p2"));
        let p2: SocketAddr = "198.19.0.2:51821".parse().unwrap();
        assert_eq!(via(&members, &Policy::Auto, &[p2]), None);
        let (_, peers) = plan(&me, &members, &Policy::Auto, &[p2]);
        assert_eq!(stranded(&me, &members, &peers), [[7; 32]]);
        // A node's own homes leave out relays it finds silent or may not use.
        let own = own_homes(&me, &members, &Policy::Auto, &[p2]);
        assert_eq!(
            own.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["p1"]
        );
        let own = own_homes(&me, &members, &Policy::Named(vec!["p2".into()]), &[]);
        assert_eq!(
            own.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["p2"]
        );
        assert!(own_homes(&members[0].record, &members, &Policy::Auto, &[]).is_empty());
        // A record that says it has no relay is stranded with that reason, not reached by
        // the hash order (as a record of an older build, without homes, is).
        members[4].record.homes = Some(vec![]);
        let (_, peers) = plan(&me, &members, &Policy::Auto, &[]);
        assert_eq!(stranded(&me, &members, &peers), [[7; 32]]);
        assert!(
            why_stranded(&members[4], &members, &Policy::Auto, &[])
                .ends_with("it has no relay to register with")
        );
        members[4].record.homes = None;
        let (_, peers) = plan(&me, &members, &Policy::Auto, &[]);
        assert!(stranded(&me, &members, &peers).is_empty());
    }

    #[test]
    fn a_stranded_peer_is_shown_with_why_no_relay_from_here_can_carry_it() {
        let mut members = three_relays_and_b_naming_p3_then_p2();
        members[2].alive = false;
        let p2: SocketAddr = "198.19.0.2:51821".parse().unwrap();
        // Why, as status shows it: what this node's policy and probes leave of b's homes.
        let why = |policy: &Policy, down: &[SocketAddr]| {
            why_stranded(&members[4], &members, policy, down)
        };
        assert!(
            why(&Policy::Auto, &[p2]).ends_with("no relay answers (silent: p2 (198.19.0.2:51821))"),
            "{}",
            why(&Policy::Auto, &[p2])
        );
        let only_p1 = Policy::Named(vec!["p1".into()]);
        assert!(
            why(&only_p1, &[]).ends_with(
                "mesh.relay allows none of the relays it registers with: p2 (198.19.0.2:51821)"
            ),
            "{}",
            why(&only_p1, &[])
        );
        assert!(why(&Policy::Never, &[]).ends_with("mesh.relay is never"));
        let mut no_relays = members.clone();
        for r in &mut no_relays[..3] {
            r.alive = false;
        }
        assert!(
            why_stranded(&no_relays[4], &no_relays, &Policy::Auto, &[])
                .ends_with("no member can relay (none is public, alive and not behind NAT)")
        );
        let mut gone_homes = members.clone();
        gone_homes[1].alive = false;
        assert!(
            why_stranded(&gone_homes[4], &gone_homes, &Policy::Auto, &[])
                .ends_with("none of the relays it registers with is alive")
        );
    }

    #[test]
    fn new_homes_are_published_at_once_when_one_is_lost_else_every_rebalance_period_and_left_ones_stay_registered_for_the_grace()
     {
        let t0 = Instant::now();
        let [r0, r1, r2] = [relay(0), relay(1), relay(2)];
        let all = [r0.clone(), r1.clone(), r2.clone()];
        let names = |v: &[Relay]| v.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
        let keys = |v: &[&Relay]| Some(Some(v.iter().map(|r| r.key).collect::<Vec<_>>()));
        let mut h = HomeRelays::default();
        let first = h.round(t0, Some(vec![r0.clone(), r1.clone()]), &all, &[]);
        assert_eq!(first.publish, keys(&[&r0, &r1]));
        assert_eq!(names(&first.register), ["r0", "r1"]);
        let sec = Duration::from_secs(1);
        let same = h.round(t0 + sec, Some(vec![r0.clone(), r1.clone()]), &all, &[]);
        assert_eq!(same.publish, None);
        // r1 silent: replaced at once; r1 stays registered (and so probed) for the grace.
        let t = t0 + sec * 2;
        let answering = [r0.clone(), r2.clone()];
        let silent = [r1.clone()];
        let wanted = || Some(vec![r0.clone(), r2.clone()]);
        let lost = h.round(t, wanted(), &answering, &silent);
        assert_eq!(lost.publish, keys(&[&r0, &r2]));
        assert_eq!(names(&lost.register), ["r0", "r2", "r1"]);
        // ... and past it, for as long as it stays silent: not forgotten and taken back.
        let held = h.round(t + HOME_GRACE * 3, wanted(), &answering, &silent);
        assert_eq!(
            (held.publish, names(&held.register)),
            (None, names(&[r0.clone(), r2.clone(), r1.clone()]))
        );
        let t = t + HOME_GRACE * 3 + sec;
        let answers = h.round(t, wanted(), &all, &[]);
        assert_eq!(names(&answers.register), ["r0", "r2"]);
        // A change that only rebalances (every home still usable) waits for the rebalance
        // period since the last publication; a home no longer usable is published at once.
        let mut h = HomeRelays::default();
        let _ = h.round(t, Some(vec![r0.clone(), r1.clone()]), &all, &[]);
        let early = h.round(t + sec, Some(vec![r0.clone(), r2.clone()]), &all, &[]);
        assert_eq!(early.publish, None);
        assert_eq!(
            names(&early.register),
            ["r0", "r2", "r1"],
            "r1 kept while it is published"
        );
        let due = h.round(
            t + REBALANCE_EVERY,
            Some(vec![r0.clone(), r2.clone()]),
            &all,
            &[],
        );
        assert_eq!(due.publish, keys(&[&r0, &r2]));
        let graced = h.round(
            t + HOME_GRACE - sec,
            Some(vec![r0.clone(), r2.clone()]),
            &all,
            &[],
        );
        assert_eq!(names(&graced.register), ["r0", "r2", "r1"]);
        let gone = h.round(
            t + HOME_GRACE + sec,
            Some(vec![r0.clone(), r2.clone()]),
            &all,
            &[],
        );
        assert_eq!(names(&gone.register), ["r0", "r2"]);
        // No relay usable: "none" is published at once (peers report it, rather than guess).
        let t = t + HOME_GRACE * 2;
        let none = h.round(t, Some(vec![]), &[], &[]);
        assert_eq!(none.publish, Some(Some(vec![])));
        // No longer behind NAT: nothing published, at once; the grace still holds.
        let mut h = HomeRelays::default();
        let _ = h.round(t, Some(vec![r0.clone()]), &all, &[]);
        let public = h.round(t + sec, None, &all, &[]);
        assert_eq!(public.publish, Some(None));
        assert_eq!(names(&public.register), ["r0"]);
        let never = HomeRelays::default().round(t, None, &all, &[]);
        assert_eq!(never.publish, None, "a public node publishes nothing");
    }
}
