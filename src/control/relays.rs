//! Which members relay for whom, the pure part (see [`crate::relay`] for the design).
//!
//! A member can relay when it is alive, has a public address, is not behind NAT itself (its
//! record publishes no observed mapping), and the policy (`mesh.relay`) allows it. Each node's
//! *home relays* are the first [`HOMES`] of those, other than itself, in the order of a BLAKE2s
//! hash of its key and theirs: every node works out the same homes for every node, without a
//! word exchanged, and the nodes spread evenly over the relays.

use std::net::SocketAddr;

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

/// The home relays of the node with key `node` among `relays`, best first.
pub fn homes(node: &[u8; 32], relays: &[Relay]) -> Vec<Relay> {
    let mut ranked: Vec<&Relay> = relays.iter().filter(|r| r.key != *node).collect();
    ranked.sort_by_key(|r| rank(node, &r.key));
    ranked.into_iter().take(HOMES).cloned().collect()
}

/// This node's plan: the relays it registers with (when it is behind NAT), and for each member
/// behind NAT the relay that reaches it (its first home relay not in `down`), when this node
/// is behind NAT too (a public node is reached directly by nodes behind NAT, and reaches them at the mappings
/// they open).
pub fn plan(
    me: &NodeRecord,
    members: &[Member],
    policy: &Policy,
    down: &[SocketAddr],
) -> (Vec<Relay>, Vec<([u8; 32], Relay)>) {
    if !behind_nat(me) || *policy == Policy::Never {
        return (Vec::new(), Vec::new());
    }
    // Homes are worked out over every member that can relay, whatever this node's policy
    // allows: they are the far end's choice. This node's policy limits what it uses. A relay
    // that answers this node's probes no more is passed over at once: the far end registered
    // with its next home too.
    let mut all = relays(members, &Policy::Auto);
    all.retain(|r| !down.contains(&r.addr));
    let allowed = |r: &Relay| match policy {
        Policy::Named(names) => names.contains(&r.name),
        _ => true,
    };
    let mine = homes(&me.wireguard_key, &all);
    let peers = members
        .iter()
        .filter(|m| m.alive && !m.record.left && behind_nat(&m.record))
        .filter(|m| m.record.wireguard_key != me.wireguard_key)
        .filter_map(|m| {
            let via = homes(&m.record.wireguard_key, &all)
                .into_iter()
                .find(|r| allowed(r))?;
            Some((m.record.wireguard_key, via))
        })
        .collect();
    (mine.into_iter().filter(|r| allowed(r)).collect(), peers)
}

/// The members behind NAT that this node, behind NAT too, has no relay for among `peers` (its
/// [`plan`]): they are reached only if a direct path comes up.
pub fn stranded(me: &NodeRecord, members: &[Member], peers: &[([u8; 32], Relay)]) -> Vec<[u8; 32]> {
    if !behind_nat(me) {
        return Vec::new();
    }
    members
        .iter()
        .filter(|m| m.alive && !m.record.left && behind_nat(&m.record))
        .map(|m| m.record.wireguard_key)
        .filter(|k| *k != me.wireguard_key && !peers.iter().any(|(p, _)| p == k))
        .collect()
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
            last_heard: std::time::Instant::now(),
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
            },
        }
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
        // a's plan names b's first home; b's own plan registers there.
        let (a_homes, a_peers) = plan(&members[5].record, &members, &Policy::Auto, &[]);
        let (b_homes, b_peers) = plan(&members[6].record, &members, &Policy::Auto, &[]);
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
}
