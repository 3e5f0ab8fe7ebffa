//! Observed endpoints, the pure part: what members say about where this node's WireGuard
//! datagrams come from, and which of those this node publishes as its own endpoint candidates
//! (the mappings of a NAT in front of it).
//!
//! Each member's word counts once (its newest report), and for [`OBSERVATION_TTL`]. An
//! endpoint on one of this node's own interfaces, in the pod network, or not a unicast
//! address is never taken: it cannot be a NAT mapping of this node, and publishing it would
//! only send peers' handshakes somewhere useless. The endpoints reported by the most members
//! (then the newest) are published, at most [`PUBLISHED`]. A dishonest member can therefore
//! add one useless candidate that peers try and fall back from; it cannot take the node's
//! traffic, which WireGuard authenticates end to end.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use weft_config::value::unicast;
use weft_mesh::NodeId;

/// How long a member's report counts without being repeated.
pub const OBSERVATION_TTL: Duration = Duration::from_secs(600);
/// How often a member's report is repeated while it holds: often enough that one lost at the
/// start (sent before the receiver had the sender's signed beat on the connection, so it was
/// not heard) is made good within seconds, well inside the TTL; one small frame per NATed peer.
pub const TELL_EVERY: Duration = Duration::from_secs(10);
/// The most observed endpoints published.
pub const PUBLISHED: usize = 2;
/// The least time between two changes of the published list, but for the first (which is
/// published at once): each change is a new record version that crosses the whole mesh, so a
/// member whose reports keep changing must not make this node republish at its pace.
pub const PUBLISH_EVERY: Duration = Duration::from_secs(30);

/// Why a report is not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Not a unicast address a peer could send to (unspecified, loopback, multicast,
    /// broadcast, link-local) or port 0.
    NotUnicast,
    /// One of this node's own addresses: no NAT in between.
    Local,
    /// Inside the pod network: an overlay address, never an underlay endpoint.
    PodNetwork,
    /// Not newer than the member's last report, or signed too far from this node's clock (a
    /// replay).
    Stale,
}

/// The largest difference between a report's signing time and this node's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(120);

impl Refused {
    /// The reason, for a log line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotUnicast => "not a unicast address",
            Self::Local => "an address of this node",
            Self::PodNetwork => "inside the pod network",
            Self::Stale => "not newer than the last, or far from this clock",
        }
    }
}

/// What this node knows of itself to judge reports.
#[derive(Debug, Clone, Default)]
pub struct Own {
    /// Every address on this node's interfaces (the underlay's, the overlay's, bridges').
    pub local: Vec<IpAddr>,
    /// The pod network (pools and blocks).
    pub pod_network: Vec<IpNet>,
}

/// Whether `endpoint` may be a NAT mapping of this node.
pub fn vet(endpoint: SocketAddr, own: &Own) -> Result<(), Refused> {
    let ip = endpoint.ip().to_canonical();
    if !unicast(ip) || endpoint.port() == 0 {
        return Err(Refused::NotUnicast);
    }
    if own.local.iter().any(|a| a.to_canonical() == ip) {
        return Err(Refused::Local);
    }
    if own.pod_network.iter().any(|n| n.contains(&ip)) {
        return Err(Refused::PodNetwork);
    }
    Ok(())
}

/// The members' reports about this node.
#[derive(Debug, Default)]
pub struct Observations {
    by: HashMap<NodeId, (SocketAddr, Instant)>,
    /// The signing time of each member's newest report taken.
    last_ms: HashMap<NodeId, u64>,
}

impl Observations {
    /// Takes member `by`'s report, signed at `at_ms`, that this node's datagrams come from
    /// `endpoint`, unless it is not newer than its last, too far from `now_ms`, or [`vet`]
    /// refuses it.
    pub fn heard(
        &mut self,
        (now, now_ms): (Instant, u64),
        by: NodeId,
        (endpoint, at_ms): (SocketAddr, u64),
        own: &Own,
    ) -> Result<(), Refused> {
        let skew = u64::try_from(MAX_SKEW.as_millis()).unwrap_or(u64::MAX);
        if at_ms.abs_diff(now_ms) > skew || self.last_ms.get(&by).is_some_and(|l| *l >= at_ms) {
            return Err(Refused::Stale);
        }
        self.last_ms.insert(by, at_ms);
        if let Err(why) = vet(endpoint, own) {
            // A member that sees this node's own address sees no NAT: its earlier word goes.
            if why == Refused::Local {
                self.by.remove(&by);
            }
            return Err(why);
        }
        let endpoint = SocketAddr::new(endpoint.ip().to_canonical(), endpoint.port());
        self.by.insert(by, (endpoint, now));
        Ok(())
    }

    /// Whether no report is held.
    pub fn is_empty(&self) -> bool {
        self.by.is_empty()
    }

    /// The endpoints to publish at `now`: reports younger than [`OBSERVATION_TTL`] that
    /// [`vet`] still passes, by number of members (then by address, so that the order does
    /// not move with who spoke last), at most [`PUBLISHED`].
    pub fn endpoints(&mut self, now: Instant, own: &Own) -> Vec<SocketAddr> {
        self.by
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < OBSERVATION_TTL);
        let by = &self.by;
        self.last_ms.retain(|k, _| by.contains_key(k));
        let mut tally: HashMap<SocketAddr, usize> = HashMap::new();
        for (endpoint, _) in self.by.values() {
            if vet(*endpoint, own).is_ok() {
                *tally.entry(*endpoint).or_default() += 1;
            }
        }
        let mut ranked: Vec<(SocketAddr, usize)> = tally.into_iter().collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        ranked.into_iter().take(PUBLISHED).map(|(e, _)| e).collect()
    }
}

/// When the published list may change.
#[derive(Debug, Default)]
pub struct Publishing {
    at: Option<Instant>,
}

impl Publishing {
    /// Whether to publish `next` in place of `current` at `now`: a first list at once, any
    /// later change at most once per [`PUBLISH_EVERY`]. A yes is remembered.
    pub fn due(&mut self, now: Instant, current: &[SocketAddr], next: &[SocketAddr]) -> bool {
        if current == next {
            return false;
        }
        let waited = self
            .at
            .is_none_or(|t| now.saturating_duration_since(t) >= PUBLISH_EVERY);
        if current.is_empty() || waited {
            self.at = Some(now);
            return true;
        }
        false
    }
}

/// Which peers to tell where their datagrams come from, and when: a peer is told when the
/// endpoint changes, and again every [`TELL_EVERY`] while it holds.
#[derive(Debug, Default)]
pub struct Telling {
    told: HashMap<[u8; 32], (SocketAddr, Instant)>,
}

impl Telling {
    /// Whether to tell the peer with WireGuard key `key` (on an up session from `endpoint`)
    /// now; a yes is remembered.
    pub fn due(&mut self, now: Instant, key: [u8; 32], endpoint: SocketAddr) -> bool {
        match self.told.get(&key) {
            Some((e, at)) if *e == endpoint && now.saturating_duration_since(*at) < TELL_EVERY => {
                false
            }
            _ => {
                self.told.insert(key, (endpoint, now));
                true
            }
        }
    }

    /// Forgets the peers `keep` refuses.
    pub fn retain(&mut self, keep: impl Fn(&[u8; 32]) -> bool) {
        self.told.retain(|k, _| keep(k));
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::disallowed_methods,
        reason = "tests start their clock from a real instant"
    )]
    use super::*;

    fn id(n: u8) -> NodeId {
        NodeId([n; 32])
    }

    fn own() -> Own {
        Own {
            local: vec![
                "198.18.101.2".parse().unwrap(),
                "100.64.3.1".parse().unwrap(),
            ],
            pod_network: vec!["100.64.0.0/16".parse().unwrap()],
        }
    }

    fn ep(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A fresh report (signed now, newer than any before).
    fn say(
        o: &mut Observations,
        t: Instant,
        by: NodeId,
        e: SocketAddr,
        own: &Own,
    ) -> Result<(), Refused> {
        static CLOCK: std::sync::atomic::AtomicU64 =
            std::sync::atomic::AtomicU64::new(1_800_000_000_000);
        let ms = CLOCK.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        o.heard((t, ms), by, (e, ms), own)
    }

    #[test]
    fn a_replayed_or_skewed_report_is_refused_and_one_of_this_nodes_address_withdraws_a_vote() {
        let t = Instant::now();
        let now_ms = 1_900_000_000_000;
        let mut o = Observations::default();
        let m = ep("198.19.0.101:51820");
        assert_eq!(o.heard((t, now_ms), id(1), (m, now_ms), &own()), Ok(()));
        assert_eq!(
            o.heard((t, now_ms), id(1), (m, now_ms), &own()),
            Err(Refused::Stale)
        );
        let old = now_ms - 10 * 60_000;
        assert_eq!(
            o.heard((t, now_ms), id(2), (m, old), &own()),
            Err(Refused::Stale)
        );
        assert_eq!(o.endpoints(t, &own()), vec![m]);
        // Member 1 now sees this node's own address: no NAT in between for it.
        let direct = ep("198.18.101.2:51820");
        assert_eq!(
            o.heard((t, now_ms + 1), id(1), (direct, now_ms + 1), &own()),
            Err(Refused::Local)
        );
        assert!(o.endpoints(t, &own()).is_empty());
    }

    #[test]
    fn reports_of_local_pod_or_non_unicast_addresses_are_refused_and_never_published() {
        let t = Instant::now();
        let mut o = Observations::default();
        let cases = [
            ("198.18.101.2:51820", Refused::Local),
            ("[::ffff:198.18.101.2]:51820", Refused::Local),
            ("100.64.9.9:51820", Refused::PodNetwork),
            ("0.0.0.0:51820", Refused::NotUnicast),
            ("127.0.0.1:51820", Refused::NotUnicast),
            ("224.0.0.1:51820", Refused::NotUnicast),
            ("255.255.255.255:51820", Refused::NotUnicast),
            ("169.254.1.1:51820", Refused::NotUnicast),
            ("[fe80::1]:51820", Refused::NotUnicast),
            ("198.19.0.101:0", Refused::NotUnicast),
        ];
        for (i, (e, why)) in cases.iter().enumerate() {
            assert_eq!(say(&mut o, t, id(i as u8), ep(e), &own()), Err(*why), "{e}");
        }
        assert_eq!(o.endpoints(t, &own()), Vec::<SocketAddr>::new());
    }

    #[test]
    fn the_endpoints_most_members_report_are_published_and_each_member_counts_once() {
        let t = Instant::now();
        let mut o = Observations::default();
        // One member repeating a lie counts once; two members agree on the real mapping.
        for _ in 0..5 {
            say(&mut o, t, id(1), ep("198.19.0.66:9"), &own()).unwrap();
        }
        say(&mut o, t, id(1), ep("198.19.0.66:9"), &own()).unwrap();
        say(&mut o, t, id(2), ep("198.19.0.101:51820"), &own()).unwrap();
        say(&mut o, t, id(3), ep("198.19.0.101:51820"), &own()).unwrap();
        say(&mut o, t, id(4), ep("198.19.0.77:1"), &own()).unwrap();
        let got = o.endpoints(t, &own());
        assert_eq!(got.len(), PUBLISHED);
        assert_eq!(got[0], ep("198.19.0.101:51820"));
        // A member's newer report replaces its older one.
        say(&mut o, t, id(2), ep("198.19.0.101:40000"), &own()).unwrap();
        say(&mut o, t, id(3), ep("198.19.0.101:40000"), &own()).unwrap();
        assert_eq!(o.endpoints(t, &own())[0], ep("198.19.0.101:40000"));
        assert!(!o.endpoints(t, &own()).contains(&ep("198.19.0.101:51820")));
    }

    #[test]
    fn reports_expire_unless_repeated_and_an_address_that_became_local_is_dropped() {
        let t = Instant::now();
        let mut o = Observations::default();
        say(&mut o, t, id(1), ep("198.19.0.101:51820"), &own()).unwrap();
        say(&mut o, t, id(2), ep("198.19.0.102:51820"), &own()).unwrap();
        let later = t + OBSERVATION_TTL - Duration::from_secs(1);
        say(&mut o, later, id(2), ep("198.19.0.102:51820"), &own()).unwrap();
        assert_eq!(
            o.endpoints(t + OBSERVATION_TTL, &own()),
            vec![ep("198.19.0.102:51820")]
        );
        let mut moved = own();
        moved.local.push("198.19.0.102".parse().unwrap());
        assert!(o.endpoints(t + OBSERVATION_TTL, &moved).is_empty());
    }

    #[test]
    fn a_first_list_is_published_at_once_and_later_changes_at_most_once_per_period() {
        let t = Instant::now();
        let mut p = Publishing::default();
        let (a, b, c) = (ep("198.19.0.1:1"), ep("198.19.0.2:2"), ep("198.19.0.3:3"));
        assert!(!p.due(t, &[], &[]));
        assert!(p.due(t, &[], &[a]));
        assert!(!p.due(t, &[a], &[a]));
        // A member flipping its report every few seconds moves the record once per period.
        let mut published = vec![a];
        let mut changes = 0;
        for s in 1..=120u64 {
            let next = if s % 2 == 0 { vec![a, b] } else { vec![a, c] };
            if p.due(t + Duration::from_secs(s), &published, &next) {
                published = next;
                changes += 1;
            }
        }
        // At 30 s, 61 s and 91 s: never two changes within PUBLISH_EVERY.
        assert_eq!(changes, 3);
        // A node whose record lost every mapping publishes a new one at once.
        assert!(p.due(t + Duration::from_secs(121), &[], &[b]));
    }

    #[test]
    fn a_peer_is_told_on_a_new_endpoint_at_once_and_otherwise_once_per_period() {
        let t = Instant::now();
        let mut tell = Telling::default();
        let k = [7; 32];
        assert!(tell.due(t, k, ep("198.19.0.101:51820")));
        assert!(!tell.due(t + Duration::from_secs(1), k, ep("198.19.0.101:51820")));
        assert!(tell.due(t + Duration::from_secs(2), k, ep("198.19.0.101:1024")));
        assert!(!tell.due(t + Duration::from_secs(3), k, ep("198.19.0.101:1024")));
        assert!(tell.due(
            t + Duration::from_secs(2) + TELL_EVERY,
            k,
            ep("198.19.0.101:1024")
        ));
        tell.retain(|_| false);
        assert!(tell.due(
            t + Duration::from_secs(3) + TELL_EVERY,
            k,
            ep("198.19.0.101:1024")
        ));
    }
}
