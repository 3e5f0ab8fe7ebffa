//! [`Membership`]: the sans-IO gossip state machine.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tracing::{debug, trace};

use crate::record::{Identity, NodeId, NodeRecord, ShortId, SignedRecord};
use crate::wire::{Entry, Frame};

/// Timing and fan-out of the gossip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshConfig {
    /// How often a node sends the heartbeats it learned since the last round to its
    /// connections (and checks liveness).
    pub gossip_interval: Duration,
    /// A member whose heartbeat has not grown for this long is down. A node bumps its own
    /// heartbeat every third of this.
    pub liveness_timeout: Duration,
    /// How many gossip connections a node dials; it accepts up to twice as many and closes
    /// the excess, so no node becomes a hub.
    pub max_connections: usize,
    /// How often a node short of connections dials another member.
    pub dial_interval: Duration,
    /// How often (in gossip intervals) a node sends a full digest to one neighbour, to repair
    /// anything the pushes missed.
    pub digest_every: u32,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            gossip_interval: Duration::from_secs(1),
            liveness_timeout: Duration::from_secs(30),
            max_connections: 4,
            dial_interval: Duration::from_secs(2),
            digest_every: 10,
        }
    }
}

/// A gossip connection, as the driver numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// A frame for the driver to send on a connection.
#[must_use = "a transmit must be sent"]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// The connection.
    pub conn: ConnId,
    /// The encoded frame.
    pub frame: Vec<u8>,
}

/// What changed in the membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A member was learned.
    Joined(NodeId),
    /// A member's record changed.
    Updated(NodeId),
    /// A member's heartbeat stopped growing for the liveness timeout.
    Down(NodeId),
    /// A member that was down is heard from again.
    Up(NodeId),
    /// A member left on purpose.
    Left(NodeId),
}

/// Input refused, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drops {
    /// Frames that did not decode.
    pub malformed: u64,
    /// Records whose signature did not verify.
    pub unauthenticated: u64,
    /// Records not newer than the one held (replays, echoes).
    pub stale: u64,
    /// Frames on a connection that had not said hello.
    pub unexpected: u64,
}

/// A member as [`Membership::members`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its id.
    pub id: NodeId,
    /// Its latest record.
    pub record: NodeRecord,
    /// Whether it is alive (heard from within the liveness timeout, not left).
    pub alive: bool,
    /// Its heartbeat counter as last heard.
    pub heartbeat: u32,
    /// When this node last heard it alive (a newer record or heartbeat).
    pub last_heard: Instant,
}

struct Known {
    signed: SignedRecord,
    heartbeat: u32,
    heard_at: Instant,
    alive: bool,
}

struct Conn {
    peer: Option<NodeId>,
}

/// The gossip state machine of one node.
///
/// It owns no socket and reads no clock. Inputs: [`handle_connected`](Self::handle_connected),
/// [`handle_frame`](Self::handle_frame), [`handle_disconnected`](Self::handle_disconnected), and
/// [`handle_timeout`](Self::handle_timeout) when [`poll_timeout`](Self::poll_timeout) is reached.
/// Commands: [`join`](Self::join), [`update`](Self::update), [`leave`](Self::leave). After every
/// input the caller drains [`poll_transmit`](Self::poll_transmit),
/// [`poll_dial`](Self::poll_dial) (addresses to open a connection to),
/// [`poll_close`](Self::poll_close) (connections to close), then
/// [`poll_timeout`](Self::poll_timeout) and [`poll_event`](Self::poll_event).
///
/// Records spread by push: a newer record goes to every other connection at once. Heartbeats
/// spread as rumours: each round a node sends the heartbeats that grew since the last round to
/// its connections. A full digest (20 bytes a member) goes to one random neighbour every
/// `digest_every` rounds and on every new connection, and is answered with whatever either
/// side lacks. Liveness compares only local times: a member is down when its heartbeat has not
/// grown here for `liveness_timeout`.
pub struct Membership {
    identity: Identity,
    me: NodeId,
    own: SignedRecord,
    heartbeat: u32,
    known: BTreeMap<NodeId, Known>,
    by_short: HashMap<ShortId, NodeId>,
    conns: BTreeMap<ConnId, Conn>,
    bootstrap: Vec<SocketAddr>,
    config: MeshConfig,
    rng: u64,
    next_tick: Instant,
    next_beat: Instant,
    next_dial: Instant,
    rounds: u32,
    /// Heartbeats that grew since the last round, to pass on.
    rumours: BTreeMap<ShortId, Entry>,
    out: VecDeque<Transmit>,
    dials: VecDeque<SocketAddr>,
    closes: VecDeque<ConnId>,
    events: VecDeque<Event>,
    drops: Drops,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("me", &self.me)
            .field("known", &self.known.len())
            .field("conns", &self.conns.len())
            .finish_non_exhaustive()
    }
}

impl Membership {
    /// A node with its own `record`; `seed` drives its random choices.
    pub fn new(
        now: Instant,
        identity: Identity,
        record: NodeRecord,
        config: MeshConfig,
        seed: u64,
    ) -> Self {
        let own = identity.sign(&record);
        Self {
            me: identity.id(),
            identity,
            own,
            heartbeat: 0,
            known: BTreeMap::new(),
            by_short: HashMap::new(),
            conns: BTreeMap::new(),
            bootstrap: Vec::new(),
            config,
            rng: seed | 1,
            next_tick: now + config.gossip_interval,
            next_beat: now,
            next_dial: now,
            rounds: 0,
            rumours: BTreeMap::new(),
            out: VecDeque::new(),
            dials: VecDeque::new(),
            closes: VecDeque::new(),
            events: VecDeque::new(),
            drops: Drops::default(),
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.me
    }

    /// This node's current record.
    pub fn record(&self) -> &NodeRecord {
        &self.own.record
    }

    /// Input refused so far.
    pub fn drops(&self) -> Drops {
        self.drops
    }

    /// Every other member ever learned (tombstones included), by id.
    pub fn members(&self) -> Vec<Member> {
        self.known
            .iter()
            .map(|(id, k)| Member {
                id: *id,
                record: k.signed.record.clone(),
                alive: k.alive,
                heartbeat: k.heartbeat,
                last_heard: k.heard_at,
            })
            .collect()
    }

    /// The number of open connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Starts from these bootstrap addresses (dialled now, and again whenever no connection is
    /// left).
    pub fn join(&mut self, bootstrap: &[SocketAddr]) {
        self.bootstrap = bootstrap.to_vec();
        self.dials.extend(bootstrap.iter().copied());
    }

    /// Replaces this node's record (its version is raised above the current one) and pushes it.
    pub fn update(&mut self, mut record: NodeRecord) {
        record.version = record.version.max(self.own.record.version + 1);
        self.own = self.identity.sign(&record);
        let frame = Frame::Records(vec![Ok(self.own.clone())]).encode();
        for conn in self.conns.keys() {
            self.out.push_back(Transmit {
                conn: *conn,
                frame: frame.clone(),
            });
        }
    }

    /// Leaves the mesh: a tombstone record, pushed to every connection.
    pub fn leave(&mut self) {
        let mut r = self.own.record.clone();
        r.left = true;
        self.update(r);
    }

    /// A connection (dialled or accepted) is up; greets it with a digest.
    pub fn handle_connected(&mut self, now: Instant, conn: ConnId) {
        let _ = now;
        self.conns.insert(conn, Conn { peer: None });
        let hello = Frame::Hello {
            node: self.me,
            mesh_port: self.own.record.mesh_port,
        };
        self.out.push_back(Transmit {
            conn,
            frame: hello.encode(),
        });
        self.send_digest(conn, true);
    }

    /// A connection is gone.
    pub fn handle_disconnected(&mut self, conn: ConnId) {
        self.conns.remove(&conn);
        self.out.retain(|t| t.conn != conn);
    }

    /// One frame from `conn`.
    pub fn handle_frame(&mut self, now: Instant, conn: ConnId, bytes: &[u8]) {
        let frame = match Frame::decode(bytes) {
            Ok(f) => f,
            Err(e) => {
                trace!(?conn, error = %e, "malformed frame");
                self.drops.malformed += 1;
                return;
            }
        };
        let Some(c) = self.conns.get_mut(&conn) else {
            self.drops.unexpected += 1;
            return;
        };
        match frame {
            Frame::Hello { node, .. } => {
                if node == self.me {
                    // A connection to ourselves (our own address among the bootstrap peers).
                    self.handle_disconnected(conn);
                    self.closes.push_back(conn);
                    return;
                }
                c.peer = Some(node);
            }
            _ if c.peer.is_none() => self.drops.unexpected += 1,
            Frame::Records(records) => {
                let mut forward = Vec::new();
                for r in records {
                    match r {
                        Ok(s) => {
                            if self.accept(now, s.clone()) {
                                forward.push(Ok(s));
                            }
                        }
                        Err(e) => {
                            debug!(?conn, error = %e, "record refused");
                            self.drops.unauthenticated += 1;
                        }
                    }
                }
                if !forward.is_empty() {
                    let frame = Frame::Records(forward).encode();
                    let others: Vec<ConnId> =
                        self.conns.keys().copied().filter(|c| *c != conn).collect();
                    for c in others {
                        self.out.push_back(Transmit {
                            conn: c,
                            frame: frame.clone(),
                        });
                    }
                }
            }
            Frame::Digest { reply, entries } => self.handle_digest(now, conn, reply, &entries),
            Frame::Beats(entries) => {
                for e in entries {
                    self.heard(now, e);
                }
            }
        }
    }

    /// A newer record is stored (true); anything else is counted as stale (false).
    fn accept(&mut self, now: Instant, s: SignedRecord) -> bool {
        let id = s.signer;
        if id == self.me {
            // A record of an earlier life of this node: outdo it. Our current record coming
            // back (over a second connection to the same peer, say) is not one: answering it
            // with a new version would loop forever.
            let earlier_life = s.record.version > self.own.record.version
                || (s.record.version == self.own.record.version && s.record != self.own.record);
            if earlier_life {
                let mut r = self.own.record.clone();
                r.version = s.record.version + 1;
                self.update(r);
            }
            return false;
        }
        let left = s.record.left;
        match self.known.get_mut(&id) {
            Some(k) if k.signed.record.version >= s.record.version => {
                self.drops.stale += 1;
                false
            }
            Some(k) => {
                k.signed = s;
                k.heard_at = now;
                let was_alive = k.alive;
                k.alive = !left;
                if left {
                    self.events.push_back(Event::Left(id));
                } else {
                    self.events.push_back(Event::Updated(id));
                    if !was_alive {
                        self.events.push_back(Event::Up(id));
                    }
                }
                true
            }
            None => {
                self.by_short.insert(id.short(), id);
                let k = Known {
                    signed: s,
                    heartbeat: 0,
                    heard_at: now,
                    alive: !left,
                };
                self.known.insert(id, k);
                self.events.push_back(if left {
                    Event::Left(id)
                } else {
                    Event::Joined(id)
                });
                true
            }
        }
    }

    /// A heartbeat entry: a grown heartbeat of the current version means the member is alive,
    /// and the news is passed on next round.
    fn heard(&mut self, now: Instant, e: Entry) {
        let Some(id) = self.by_short.get(&e.node) else {
            return;
        };
        let Some(k) = self.known.get_mut(id) else {
            return;
        };
        if k.signed.record.version != e.version || e.heartbeat <= k.heartbeat {
            return;
        }
        k.heartbeat = e.heartbeat;
        k.heard_at = now;
        self.rumours.insert(e.node, e);
        if !k.alive && !k.signed.record.left {
            k.alive = true;
            self.events.push_back(Event::Up(*id));
        }
    }

    fn own_entry(&self) -> Entry {
        Entry {
            node: self.me.short(),
            version: self.own.record.version,
            heartbeat: self.heartbeat,
        }
    }

    fn handle_digest(&mut self, now: Instant, conn: ConnId, reply: bool, entries: &[Entry]) {
        let mut records = Vec::new();
        let mut beats = Vec::new();
        let mut seen = std::collections::HashSet::with_capacity(entries.len());
        let mut they_know_more = false;
        let me = self.me.short();
        for e in entries {
            seen.insert(e.node);
            if e.node == me {
                if e.version < self.own.record.version {
                    records.push(Ok(self.own.clone()));
                } else if e.heartbeat < self.heartbeat {
                    beats.push(self.own_entry());
                }
                // A version above ours is an earlier life's record: it arrives with their
                // answer, and `accept` outdoes it.
                they_know_more |= e.version > self.own.record.version;
                continue;
            }
            // Their heartbeats count as news of those members.
            self.heard(now, *e);
            match self.by_short.get(&e.node).and_then(|id| self.known.get(id)) {
                Some(k) if k.signed.record.version > e.version => {
                    records.push(Ok(k.signed.clone()))
                }
                Some(k) if k.signed.record.version < e.version => they_know_more = true,
                Some(k) if k.heartbeat > e.heartbeat => beats.push(Entry {
                    node: e.node,
                    version: k.signed.record.version,
                    heartbeat: k.heartbeat,
                }),
                Some(_) => {}
                None => they_know_more = true,
            }
        }
        if !seen.contains(&me) {
            records.push(Ok(self.own.clone()));
        }
        for (id, k) in &self.known {
            if !seen.contains(&id.short()) {
                records.push(Ok(k.signed.clone()));
            }
        }
        if !records.is_empty() {
            self.out.push_back(Transmit {
                conn,
                frame: Frame::Records(records).encode(),
            });
        }
        if !beats.is_empty() {
            self.out.push_back(Transmit {
                conn,
                frame: Frame::Beats(beats).encode(),
            });
        }
        // Our digest back only when asked, or when they hold records we lack.
        if reply || they_know_more {
            self.send_digest(conn, false);
        }
    }

    fn send_digest(&mut self, conn: ConnId, reply: bool) {
        let mut entries = Vec::with_capacity(self.known.len() + 1);
        entries.push(self.own_entry());
        for (id, k) in &self.known {
            entries.push(Entry {
                node: id.short(),
                version: k.signed.record.version,
                heartbeat: k.heartbeat,
            });
        }
        self.out.push_back(Transmit {
            conn,
            frame: Frame::Digest { reply, entries }.encode(),
        });
    }

    fn random(&mut self, n: usize) -> usize {
        // xorshift64: good enough to pick neighbours, and replayable from the seed.
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        (x % n as u64) as usize
    }

    /// Runs the gossip round, the liveness check and dialling when due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now >= self.next_beat {
            self.next_beat = now + self.config.liveness_timeout / 3;
            self.heartbeat = self.heartbeat.wrapping_add(1);
            let e = self.own_entry();
            self.rumours.insert(e.node, e);
        }
        if now >= self.next_tick {
            self.next_tick = now + self.config.gossip_interval;
            self.rounds = self.rounds.wrapping_add(1);
            self.round(now);
        }
        if now >= self.next_dial {
            // Jittered (0.5 to 1.5 intervals), so nodes that lost a link together do not redial
            // in lockstep.
            let interval = self.config.dial_interval;
            let jitter = interval.mul_f64(self.random(1000) as f64 / 1000.0);
            self.next_dial = now + interval / 2 + jitter;
            self.dial();
        }
    }

    fn round(&mut self, now: Instant) {
        let ready: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.peer.is_some())
            .map(|(id, _)| *id)
            .collect();
        if !self.rumours.is_empty() && !ready.is_empty() {
            let beats: Vec<Entry> = std::mem::take(&mut self.rumours).into_values().collect();
            let frame = Frame::Beats(beats).encode();
            for c in &ready {
                self.out.push_back(Transmit {
                    conn: *c,
                    frame: frame.clone(),
                });
            }
        }
        if !ready.is_empty() && self.rounds % self.config.digest_every.max(1) == 0 {
            let pick = ready[self.random(ready.len())];
            self.send_digest(pick, false);
        }
        let timeout = self.config.liveness_timeout;
        for (id, k) in &mut self.known {
            if k.alive && now.saturating_duration_since(k.heard_at) > timeout {
                k.alive = false;
                debug!(node = %id, name = %k.signed.record.name, "member down");
                self.events.push_back(Event::Down(*id));
            }
        }
    }

    fn dial(&mut self) {
        if self.conns.is_empty() {
            self.dials.extend(self.bootstrap.iter().copied());
        }
        // Too many connections (others dialled us): close the excess, newest first.
        let cap = self.config.max_connections * 2;
        while self.conns.len() > cap {
            let Some((&c, _)) = self.conns.iter().next_back() else {
                break;
            };
            self.handle_disconnected(c);
            self.closes.push_back(c);
        }
        let connected: Vec<NodeId> = self.conns.values().filter_map(|c| c.peer).collect();
        if self.conns.len() < self.config.max_connections {
            let candidates: Vec<SocketAddr> = self
                .known
                .iter()
                .filter(|(id, k)| k.alive && !connected.contains(id))
                .filter_map(|(_, k)| mesh_address(&self.own.record, &k.signed.record))
                .collect();
            if !candidates.is_empty() {
                let pick = candidates[self.random(candidates.len())];
                self.dials.push_back(pick);
            }
        }
        // Probe one member that is down (not departed): this is how a partition heals.
        let down: Vec<SocketAddr> = self
            .known
            .values()
            .filter(|k| !k.alive && !k.signed.record.left)
            .filter_map(|k| mesh_address(&self.own.record, &k.signed.record))
            .collect();
        if !down.is_empty() {
            let pick = down[self.random(down.len())];
            self.dials.push_back(pick);
        }
    }

    /// The next frame to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    /// The next address to open a gossip connection to.
    pub fn poll_dial(&mut self) -> Option<SocketAddr> {
        self.dials.pop_front()
    }

    /// The next connection to close (to this node itself, or beyond the connection cap).
    pub fn poll_close(&mut self) -> Option<ConnId> {
        self.closes.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        Some(self.next_tick.min(self.next_dial).min(self.next_beat))
    }

    /// The next membership change.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

/// Where to reach `peer`'s gossip port from `me`: its private address within a region, its
/// public one across regions, whichever it has otherwise.
pub fn mesh_address(me: &NodeRecord, peer: &NodeRecord) -> Option<SocketAddr> {
    let same_region = me.region.is_some() && me.region == peer.region;
    let ip = if same_region {
        peer.private_address.or(peer.public_address)
    } else {
        peer.public_address.or(peer.private_address)
    }?;
    Some(SocketAddr::new(ip, peer.mesh_port))
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::disallowed_methods,
        reason = "a test starts its virtual clock from a real instant"
    )]

    use super::*;
    use crate::record::tests::record;

    fn node(seed: u8) -> Membership {
        let id = Identity::from_wireguard_key(&[seed; 32]);
        Membership::new(
            Instant::now(),
            id,
            record(&format!("n{seed}"), 1),
            MeshConfig::default(),
            1,
        )
    }

    /// b with one connection that has said hello as node 9.
    fn greeted() -> (Membership, ConnId, Instant) {
        let mut b = node(2);
        let now = Instant::now();
        let conn = ConnId(1);
        b.handle_connected(now, conn);
        let hello = Frame::Hello {
            node: Identity::from_wireguard_key(&[9; 32]).id(),
            mesh_port: 6783,
        };
        b.handle_frame(now, conn, &hello.encode());
        while b.poll_transmit().is_some() {}
        (b, conn, now)
    }

    #[test]
    fn forged_records_are_refused_and_counted() {
        let (mut b, conn, now) = greeted();
        let c = Identity::from_wireguard_key(&[3; 32]);
        let d = Identity::from_wireguard_key(&[4; 32]);
        // c signs a record and presents it as d's.
        let mut forged = c.sign(&record("d", 5));
        forged.signer = d.id();
        let mut w = crate::wire::Writer::default();
        w.u8(2);
        w.u16(1);
        forged.encode(&mut w);
        b.handle_frame(now, conn, &w.into_bytes());
        assert_eq!(b.drops().unauthenticated, 1);
        assert!(b.members().is_empty());
        assert_eq!(b.poll_transmit(), None, "nothing forwarded");
    }

    #[test]
    fn an_older_version_never_replaces_a_newer_one() {
        let (mut b, conn, now) = greeted();
        let c = Identity::from_wireguard_key(&[3; 32]);
        let v2 = c.sign(&record("c-new", 2));
        let v1 = c.sign(&record("c-old", 1));
        b.handle_frame(now, conn, &Frame::Records(vec![Ok(v2)]).encode());
        b.handle_frame(now, conn, &Frame::Records(vec![Ok(v1.clone())]).encode());
        b.handle_frame(now, conn, &Frame::Records(vec![Ok(v1)]).encode());
        let m = b.members();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].record.name, "c-new");
        assert_eq!(b.drops().stale, 2);
        assert_eq!(b.poll_event(), Some(Event::Joined(c.id())));
        assert_eq!(b.poll_event(), None);
    }

    #[test]
    fn garbage_and_frames_before_hello_are_counted_and_the_link_stays() {
        let mut b = node(2);
        let now = Instant::now();
        b.handle_connected(now, ConnId(1));
        b.handle_frame(now, ConnId(1), &Frame::Beats(vec![]).encode());
        assert_eq!(b.drops().unexpected, 1);
        for junk in [
            &b""[..],
            b"\x02\x00\x05",
            b"GET / HTTP/1.1",
            &[3, 7, 0, 0, 0, 0],
        ] {
            b.handle_frame(now, ConnId(1), junk);
        }
        assert_eq!(b.drops().malformed, 4);
        assert_eq!(b.connections(), 1);
    }

    #[test]
    fn its_own_current_record_coming_back_changes_nothing() {
        let (mut b, conn, now) = greeted();
        let current = b.own.clone();
        for _ in 0..3 {
            b.handle_frame(
                now,
                conn,
                &Frame::Records(vec![Ok(current.clone())]).encode(),
            );
        }
        assert_eq!(b.record().version, current.record.version, "no new version");
        assert_eq!(b.poll_transmit(), None, "nothing pushed");
    }

    #[test]
    fn a_restarted_node_outdoes_the_records_of_its_earlier_life() {
        let (mut b, conn, now) = greeted();
        // Someone still holds b's record from a life with a higher version.
        let b_id = Identity::from_wireguard_key(&[2; 32]);
        let old = b_id.sign(&record("n2", 40));
        b.handle_frame(now, conn, &Frame::Records(vec![Ok(old)]).encode());
        assert_eq!(b.record().version, 41);
        let Some(t) = b.poll_transmit() else {
            panic!("the new record is pushed")
        };
        let Ok(Frame::Records(rs)) = Frame::decode(&t.frame) else {
            panic!("records")
        };
        assert_eq!(rs[0].as_ref().map(|r| r.record.version), Ok(41));
    }

    #[test]
    fn mesh_address_follows_the_region() {
        let me = record("a", 1);
        let mut peer = record("b", 1);
        assert_eq!(
            mesh_address(&me, &peer),
            Some("198.18.1.1:6783".parse().unwrap())
        );
        peer.region = Some("us-east".into());
        assert_eq!(
            mesh_address(&me, &peer),
            Some("198.19.0.1:6783".parse().unwrap())
        );
        peer.public_address = None;
        assert_eq!(
            mesh_address(&me, &peer),
            Some("198.18.1.1:6783".parse().unwrap())
        );
    }
}
