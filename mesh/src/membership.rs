//! [`Membership`]: the sans-IO gossip state machine.
//!
//! - `accept`: records in, stalest check first, signature last (the newest of each signer in
//!   a frame only, and none after one that fails); a node's own identity coming back from
//!   another daemon; forgotten members and the member cap.
//! - `digest`: anti-entropy, and full-state answers cut into bounded frames, at most one per
//!   connection per gossip interval.
//! - `clash`: the same identity on two daemons, and two members advertising one address.
//! - `liveness`: beats to neighbours, suspicions and refutations spread as rumours.

mod accept;
mod clash;
mod digest;
mod liveness;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, trace};

pub use self::clash::{AddressClash, BID_WINDOW, IdentityClash, MAX_BIDS};
pub use self::digest::MAX_MEMBERS_LIMIT;
pub use self::liveness::{ANNOUNCE_BYTES_PER_SEC, DIGEST_BYTES_PER_SEC};
use crate::beat::{Beat, Rumour};
use crate::record::{Identity, NodeId, NodeRecord, ShortId, SignedRecord};
use crate::stats::{Drops, Rejected};
use crate::wire::{Entry, Frame};

/// Timing, fan-out and bounds of the gossip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshConfig {
    /// How often a node checks liveness (and, every `digest_every` rounds, sends a digest).
    pub gossip_interval: Duration,
    /// A node signs a beat every third of this and sends it to its connections. A neighbour
    /// that hears no newer beat of it for this long spreads a suspicion; the member is down
    /// where no refutation arrives within a third of this.
    pub liveness_timeout: Duration,
    /// How often a node spreads its beat through the whole mesh unasked (less often in a mesh
    /// too large for it, see [`ANNOUNCE_BYTES_PER_SEC`]). A member not heard alive at all for
    /// [`STALE_ANNOUNCES`] of these is down: the backstop for a member that died where no
    /// neighbour saw it, or that a partition cut off unwatched.
    pub announce_interval: Duration,
    /// How many proven peers (distinct nodes whose own signed beat arrived on a connection)
    /// a node dials up to; connections whose peer has not proved who it is do not count. It
    /// holds up to twice as many connections and closes the excess at once (see
    /// [`Membership`]), so no node becomes a hub and none is cut off by held slots.
    pub max_connections: usize,
    /// How often a node short of connections dials another member.
    pub dial_interval: Duration,
    /// How often (in gossip intervals) a node sends a full digest to one neighbour, to repair
    /// anything the pushes missed.
    pub digest_every: u32,
    /// A member down or departed for this long is forgotten (its record dropped); older
    /// records of it are refused for as long again, so the others' copies cannot bring it
    /// back.
    pub tombstone_horizon: Duration,
    /// The most members held; records of further identities are refused and counted. At most
    /// [`MAX_MEMBERS_LIMIT`].
    pub max_members: usize,
    /// How often the driver republishes this node's record unchanged, as a new version
    /// stamped with the wall clock (the core itself never reads it).
    pub record_refresh: Duration,
}

/// The default [`MeshConfig::tombstone_horizon`]: three days, past the default block expiry.
pub const DEFAULT_TOMBSTONE_HORIZON: Duration = Duration::from_secs(72 * 3600);
/// The default [`MeshConfig::record_refresh`]: a member can back-date a claim by at most this
/// (plus the clock skew the daemon allows) before the nodes that held its record refuse it.
pub const DEFAULT_RECORD_REFRESH: Duration = Duration::from_secs(600);
/// The default [`MeshConfig::max_members`].
pub const DEFAULT_MAX_MEMBERS: usize = 8192;
/// The default [`MeshConfig::announce_interval`].
pub const DEFAULT_ANNOUNCE_INTERVAL: Duration = Duration::from_secs(300);
/// A member not heard alive for this many announce intervals is down.
pub const STALE_ANNOUNCES: u32 = 3;

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            gossip_interval: Duration::from_secs(1),
            liveness_timeout: Duration::from_secs(30),
            announce_interval: DEFAULT_ANNOUNCE_INTERVAL,
            max_connections: 4,
            dial_interval: Duration::from_secs(2),
            digest_every: 10,
            tombstone_horizon: DEFAULT_TOMBSTONE_HORIZON,
            max_members: DEFAULT_MAX_MEMBERS,
            record_refresh: DEFAULT_RECORD_REFRESH,
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
    /// A member stopped being alive: its signed heartbeat stopped growing for the liveness
    /// timeout, or it advertises an address an established member holds.
    Down(NodeId),
    /// A member that was down is alive again.
    Up(NodeId),
    /// A member left on purpose.
    Left(NodeId),
    /// Another daemon runs with this node's identity (the same WireGuard key): the two stopped
    /// outbidding each other's records.
    IdentityClash(IdentityClash),
    /// Member `by` says this node's WireGuard datagrams arrive at it from `endpoint` (a NAT
    /// mapping when that is none of this node's addresses), signed for this node at `at_ms`
    /// on its clock: its word, to be weighed against the others' (and refused when not newer
    /// than its last, or far from this node's clock).
    Observed {
        /// The member that saw it.
        by: NodeId,
        /// Where this node's datagrams come from, as it sees them.
        endpoint: SocketAddr,
        /// When it signed, ms since the epoch on its clock.
        at_ms: u64,
    },
}

/// The most proven connections one node keeps to this one (two nodes that dial each other at
/// once hold two): a further one is closed as soon as its peer proves itself on it.
const CONNECTIONS_PER_NODE: usize = 2;

/// Rounds between sweeps of every member (the stale backstop and forgetting): both act on
/// horizons of minutes or days, so a node's per-round work stays independent of the mesh size.
const SWEEP_EVERY: u32 = 10;

/// A member as [`Membership::members`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its id.
    pub id: NodeId,
    /// Its latest record.
    pub record: NodeRecord,
    /// Whether it is alive: its own signed heartbeat (or a new record) heard within the
    /// liveness timeout, not left, and no address of it held by an established member.
    pub alive: bool,
    /// Its heartbeat counter in its current record version, as last heard.
    pub heartbeat: u32,
    /// When this node last heard it alive (a newer record or heartbeat).
    pub last_heard: Instant,
}

struct Known {
    signed: Arc<SignedRecord>,
    /// The counter of `beat`, or 0 before the first beat of this version.
    heartbeat: u32,
    /// The latest verified beat of the current version, to pass on.
    beat: Option<Beat>,
    /// The heartbeat of the last suspicion of it passed on or answered, and when: each is
    /// handled once per half liveness timeout.
    suspicion: Option<(u32, Instant)>,
    /// When this node last heard it alive: a newer beat of it, or a new record.
    heard_at: Instant,
    /// Since when this node has known the member at its current addresses: earlier is
    /// established.
    addressed_since: Instant,
    /// Not found down (no suspicion of it ran out, heard within the stale horizon) and not
    /// left.
    live: bool,
    /// An address of it already belongs to an established member.
    held: Option<Box<AddressClash>>,
}

impl Known {
    fn alive(&self) -> bool {
        self.live && self.held.is_none()
    }
}

/// A forgotten member: the version it was forgotten at, and when.
struct Forgotten {
    id: NodeId,
    version: u64,
    at: Instant,
}

struct Conn {
    peer: Option<NodeId>,
    since: Instant,
    /// A beat signed by the peer it says it is arrived on it: only then does this node watch
    /// the peer through it (the `Hello` itself proves nothing).
    watch: bool,
    /// When an observed endpoint was last heard on it.
    observed_at: Option<Instant>,
    /// When a digest was last answered on it (one answer per gossip interval).
    answered_at: Option<Instant>,
}

impl Conn {
    /// Its peer, once it proved who it is (a beat it signed came on it): only such a
    /// connection counts toward the dial target, and it is closed before unproven ones only as
    /// a node's extra connection or beyond the dial target.
    fn proven(&self) -> Option<NodeId> {
        self.peer.filter(|_| self.watch)
    }
}

/// The least time between two observed endpoints heard on one connection: the daemon weighs
/// each (a kernel query, a reconcile round), and an honest peer tells once every 10 s
/// unless the endpoint changes.
pub const OBSERVED_MIN_GAP: Duration = Duration::from_secs(5);

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
/// Records spread by push: a newer record goes to every other connection at once. A full
/// digest (20 bytes a member) goes to one random neighbour every `digest_every` rounds (less
/// often in a large mesh, so digests stay near [`DIGEST_BYTES_PER_SEC`]) and on every new
/// connection, and is answered with whatever either side lacks, in frames of bounded size.
///
/// Liveness costs each node a bounded amount however large the mesh (SWIM-like): a node's
/// signed beats go only to its own connections, whose peers watch it. A watcher that hears no
/// newer beat for `liveness_timeout` (on an open connection, or since the connection broke)
/// spreads a [`Rumour::Suspect`] carrying the newest beat it holds; every node that takes it
/// marks the member down unless a newer beat arrives within a third of the timeout. The
/// suspected member, hearing it, refutes with a new beat spread as [`Rumour::Alive`]. Only
/// changes travel the whole mesh, plus each member's announce every `announce_interval`,
/// which is what keeps members nobody watches from staying alive forever. A new record
/// version starts a new heartbeat space.
///
/// Connections: a node dials until it has `max_connections` proven peers (distinct nodes
/// whose own signed beat came on a connection; the unsigned `Hello` proves nothing). It holds
/// at most twice that many connections: one more, dialled or accepted, closes one at once,
/// chosen in this order: an unproven connection that has had a dial interval to prove itself
/// (the oldest first: an honest peer proves itself within a round trip); a proven peer's
/// connection beyond its first (the newest first); while more than `max_connections` peers
/// are proven, the newest of them (it knows the mesh and dials elsewhere, and the newcomer
/// gets the greeting it needs to learn the mesh); an unproven one still within its dial
/// interval (the newest first, so a flood of new connections closes itself and is never
/// greeted); last the newest. A node proving itself on a third connection has that one
/// closed.
pub struct Membership {
    identity: Identity,
    me: NodeId,
    own: SignedRecord,
    heartbeat: u32,
    own_beat: Beat,
    known: BTreeMap<NodeId, Known>,
    by_short: HashMap<ShortId, NodeId>,
    forgotten: HashMap<ShortId, Forgotten>,
    conns: BTreeMap<ConnId, Conn>,
    bootstrap: Vec<SocketAddr>,
    pub(crate) config: MeshConfig,
    rng: u64,
    next_tick: Instant,
    next_beat: Instant,
    next_dial: Instant,
    rounds: u32,
    /// Rumours to spread at once, by subject, with the connection each came from.
    rumours: BTreeMap<ShortId, (Rumour, Option<ConnId>)>,
    /// Members suspected here, and since when.
    suspects: BTreeMap<NodeId, Instant>,
    /// Members down here (not departed): the ones probed to heal a partition.
    down: BTreeSet<NodeId>,
    /// Members watched through a connection that broke: the record version held then.
    /// Watched until suspected (or down, reconnected, or a new version).
    lost: BTreeMap<NodeId, u64>,
    /// A repeated suspicion of this node arrived inside the refutation window: refute when it
    /// ends.
    refute_at: Option<Instant>,
    /// The heartbeat this node last spread through the mesh, and when.
    spread_heartbeat: Option<(u32, Instant)>,
    next_announce: Instant,
    /// A member or a liveness changed since the address holds were last worked out.
    holds_dirty: bool,
    /// How many records (ours included) advertise each address, by a 32-bit hash of it (two
    /// addresses that share a hash only cost a needless refresh of the holds).
    addresses: HashMap<u32, u32>,
    /// How many address hashes more than one record advertises.
    shared_addresses: usize,
    /// Whether some member is held down for an address.
    any_held: bool,
    bids: clash::Bids,
    full_reported: bool,
    /// A neighbour's digest found it knew nothing this node lacked ([`Membership::synced`]).
    synced: bool,
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
    /// A node with its own `record` (its WireGuard key is set to the identity's); `seed` drives
    /// its random choices.
    pub fn new(
        now: Instant,
        identity: Identity,
        record: NodeRecord,
        config: MeshConfig,
        seed: u64,
    ) -> Self {
        let own = identity.sign(&record);
        let own_beat = Beat::sign(&identity, own.record.version, 0);
        let config = MeshConfig {
            max_members: config.max_members.min(MAX_MEMBERS_LIMIT),
            ..config
        };
        let mut m = Self {
            me: identity.id(),
            identity,
            own,
            heartbeat: 0,
            own_beat,
            known: BTreeMap::new(),
            by_short: HashMap::new(),
            forgotten: HashMap::new(),
            conns: BTreeMap::new(),
            bootstrap: Vec::new(),
            config,
            rng: seed | 1,
            next_tick: now + config.gossip_interval,
            next_beat: now,
            next_dial: now,
            rounds: 0,
            rumours: BTreeMap::new(),
            suspects: BTreeMap::new(),
            down: BTreeSet::new(),
            lost: BTreeMap::new(),
            spread_heartbeat: None,
            refute_at: None,
            // Spread over the interval, so nodes started together do not announce together.
            next_announce: now
                + config
                    .announce_interval
                    .mul_f64((seed % 1024) as f64 / 1024.0),
            holds_dirty: false,
            addresses: HashMap::new(),
            shared_addresses: 0,
            any_held: false,
            bids: clash::Bids::default(),
            full_reported: false,
            synced: false,
            out: VecDeque::new(),
            dials: VecDeque::new(),
            closes: VecDeque::new(),
            events: VecDeque::new(),
            drops: Drops::default(),
        };
        let own = m.own.record.clone();
        m.tally_addresses(&own, true);
        m
    }

    /// Whether this node has caught up with a neighbour once: a digest it received named
    /// nothing it lacked. A neighbour sends the records a new connection lacks before its
    /// digest, so from then on this node knows what that neighbour knew (claims included),
    /// without waiting out a fixed delay.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.me
    }

    /// This node's current record.
    pub fn record(&self) -> &NodeRecord {
        &self.own.record
    }

    /// Input refused so far, by reason, and the signature checks paid for.
    pub fn drops(&self) -> Drops {
        self.drops
    }

    /// Every other member held (tombstones included, until forgotten), by id.
    pub fn members(&self) -> Vec<Member> {
        self.known
            .iter()
            .map(|(id, k)| Member {
                id: *id,
                record: k.signed.record.clone(),
                alive: k.alive(),
                heartbeat: k.heartbeat,
                last_heard: k.heard_at,
            })
            .collect()
    }

    /// This node's own heartbeat counter, in the heartbeat space of its current record.
    pub fn heartbeat(&self) -> u32 {
        self.heartbeat
    }

    /// The number of open connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Starts from these bootstrap addresses: a few of them (up to `max_connections`, picked at
    /// random) are dialled now, and a few more whenever no connection is left. Never all at
    /// once: in a Kubernetes cluster every Node is a bootstrap address, and a thousand nodes
    /// each dialling every other would be a million connections at start.
    pub fn join(&mut self, bootstrap: &[SocketAddr]) {
        self.bootstrap = bootstrap.to_vec();
        self.bootstrap.sort();
        self.bootstrap.dedup();
        self.dial_bootstrap();
    }

    /// Queues up to `max_connections` distinct bootstrap addresses, picked at random.
    fn dial_bootstrap(&mut self) {
        let mut pool = self.bootstrap.clone();
        for _ in 0..self.config.max_connections.max(1) {
            if pool.is_empty() {
                break;
            }
            let i = self.random(pool.len());
            let pick = pool.swap_remove(i);
            self.dials.push_back(pick);
        }
    }

    /// Replaces this node's record (its version is raised above the current one) and pushes it.
    pub fn update(&mut self, mut record: NodeRecord) {
        record.version = record.version.max(self.own.record.version + 1);
        let old = self.own.record.clone();
        self.tally_addresses(&old, false);
        self.tally_addresses(&record, true);
        self.own = self.identity.sign(&record);
        self.own_beat = Beat::sign(&self.identity, self.own.record.version, self.heartbeat);
        let frame = Frame::Records(vec![Ok(self.own.clone().into())]).encode();
        let beat = Frame::SignedBeats(vec![self.own_beat]).encode();
        for conn in self.conns.keys() {
            self.out.push_back(Transmit {
                conn: *conn,
                frame: frame.clone(),
            });
            self.out.push_back(Transmit {
                conn: *conn,
                frame: beat.clone(),
            });
        }
    }

    /// Leaves the mesh: a tombstone record, pushed to every connection.
    pub fn leave(&mut self) {
        let mut r = self.own.record.clone();
        r.left = true;
        self.update(r);
    }

    /// A connection (dialled or accepted) is up; greets it with our newest beat and a
    /// digest. Beyond twice `max_connections` one connection is closed at once (see
    /// [`Membership`]); when that is this one, it is not greeted.
    pub fn handle_connected(&mut self, now: Instant, conn: ConnId) {
        self.conns.insert(
            conn,
            Conn {
                peer: None,
                since: now,
                watch: false,
                observed_at: None,
                answered_at: None,
            },
        );
        if self.conns.len() > self.config.max_connections * 2
            && let Some(c) = self.excess(now)
        {
            debug!(closed = ?c, "too many gossip connections: one closed");
            self.close(c);
            if c == conn {
                return;
            }
        }
        let hello = Frame::Hello {
            node: self.me,
            mesh_port: self.own.record.mesh_port,
        };
        self.out.push_back(Transmit {
            conn,
            frame: hello.encode(),
        });
        self.out.push_back(Transmit {
            conn,
            frame: Frame::SignedBeats(vec![self.own_beat]).encode(),
        });
        self.send_digest(conn, true);
    }

    /// Closes `conn` here and asks the driver to. Closed by this node, not broken, it leaves
    /// no lost watch: its peer is not suspect, and this node merely stops watching it (the
    /// peer, short of a connection, dials elsewhere).
    fn close(&mut self, conn: ConnId) {
        self.conns.remove(&conn);
        self.handle_disconnected(conn);
        self.closes.push_back(conn);
    }

    /// The connection to close when there are too many, in the order [`Membership`] states.
    fn excess(&self, now: Instant) -> Option<ConnId> {
        let grace = self.config.dial_interval;
        let unproven = || self.conns.iter().filter(|(_, c)| c.proven().is_none());
        let key = |(id, c): (&ConnId, &Conn)| (c.since, *id);
        let stale = unproven()
            .filter(|(_, c)| now.saturating_duration_since(c.since) >= grace)
            .min_by_key(|e| key(*e));
        if let Some((id, _)) = stale {
            return Some(*id);
        }
        // Each proven peer's first connection; the others are duplicates.
        let mut first: HashMap<NodeId, (Instant, ConnId)> = HashMap::new();
        for (id, c) in &self.conns {
            if let Some(p) = c.proven() {
                let k = key((id, c));
                first.entry(p).and_modify(|f| *f = k.min(*f)).or_insert(k);
            }
        }
        let duplicate = self
            .conns
            .iter()
            .filter(|(id, c)| {
                c.proven()
                    .is_some_and(|p| first.get(&p).is_some_and(|f| f.1 != **id))
            })
            .max_by_key(|e| key(*e));
        // Proven peers beyond the dial target: this node needs only that many, and a slot
        // must open for a newcomer to learn the mesh (one that joins through this node alone
        // would otherwise never get in once its slots were proven).
        let spare = (first.len() > self.config.max_connections)
            .then(|| first.values().max().map(|f| f.1))
            .flatten();
        duplicate
            .map(|(id, _)| *id)
            .or(spare)
            .or_else(|| unproven().max_by_key(|e| key(*e)).map(|(id, _)| *id))
            .or_else(|| self.conns.iter().max_by_key(|e| key(*e)).map(|(id, _)| *id))
    }

    /// A connection is gone: a peer watched through it stays watched (see `liveness`).
    pub fn handle_disconnected(&mut self, conn: ConnId) {
        if let Some(Conn {
            peer: Some(id),
            watch: true,
            ..
        }) = self.conns.remove(&conn)
            && let Some(k) = self.known.get(&id)
            && k.live
            && !self.conns.values().any(|c| c.peer == Some(id) && c.watch)
        {
            self.lost.insert(id, k.signed.record.version);
        }
        self.out.retain(|t| t.conn != conn);
        for (_, from) in self.rumours.values_mut() {
            if *from == Some(conn) {
                *from = None;
            }
        }
    }

    /// One frame from `conn`.
    pub fn handle_frame(&mut self, now: Instant, conn: ConnId, bytes: &[u8]) {
        let frame = match Frame::decode(bytes) {
            Ok(f) => f,
            Err(e) => {
                trace!(?conn, error = %e, "malformed frame");
                self.drops.count(Rejected::Malformed);
                return;
            }
        };
        let Some(c) = self.conns.get_mut(&conn) else {
            self.drops.count(Rejected::BeforeHello);
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
                c.watch = false;
            }
            _ if c.peer.is_none() => self.drops.count(Rejected::BeforeHello),
            Frame::Records(records) => self.handle_records(now, conn, records),
            Frame::Digest { reply, entries } => {
                self.handle_digest(now, conn, reply, &entries);
            }
            Frame::Beats(_) => self.drops.count(Rejected::UnsignedBeat),
            // The rest of a frame is dropped at the first beat that fails its check, so that a
            // frame of forged beats costs one check, not one each.
            Frame::SignedBeats(beats) => {
                let peer = c.peer;
                for b in beats {
                    if !self.heard(now, conn, b, false) {
                        break;
                    }
                    self.watch_through(conn, peer, &b);
                }
            }
            Frame::Observed(o) => {
                if c.observed_at
                    .is_some_and(|t| now.saturating_duration_since(t) < OBSERVED_MIN_GAP)
                {
                    self.drops.count(Rejected::TooSoon);
                    return;
                }
                c.observed_at = Some(now);
                // Only a member's word counts, and only with its signature for this node.
                if o.by == self.me || !self.known.contains_key(&o.by) {
                    self.drops.count(Rejected::Unproven);
                    return;
                }
                self.drops.verifications += 1;
                if o.verify(&self.me).is_err() {
                    self.drops.count(Rejected::BadSignature);
                    return;
                }
                self.events.push_back(Event::Observed {
                    by: o.by,
                    endpoint: o.endpoint,
                    at_ms: o.at_ms,
                });
            }
            Frame::Rumours(rumours) => {
                for r in rumours {
                    let ok = match r {
                        Rumour::Alive(b) => self.heard(now, conn, b, true),
                        Rumour::Suspect(b) => self.suspicion(now, conn, b),
                    };
                    if !ok {
                        break;
                    }
                }
            }
        }
    }

    fn own_entry(&self) -> Entry {
        Entry {
            node: self.me.short(),
            version: self.own.record.version,
            heartbeat: self.heartbeat,
        }
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

    /// Tells member `to` that its WireGuard datagrams arrive here from `endpoint`, signed at
    /// `at_ms` (this node's wall clock), on a connection where it proved who it is (so that
    /// with two daemons on one identity, the report goes to the one whose beats come on it);
    /// false when there is none (nothing is sent).
    pub fn tell_observed(&mut self, to: NodeId, endpoint: SocketAddr, at_ms: u64) -> bool {
        let Some(conn) = self
            .conns
            .iter()
            .find(|(_, c)| c.peer == Some(to) && c.watch)
            .map(|(id, _)| *id)
        else {
            return false;
        };
        let o = crate::Observation::sign(&self.identity, &to, endpoint, at_ms);
        self.out.push_back(Transmit {
            conn,
            frame: Frame::Observed(o).encode(),
        });
        true
    }

    /// Runs the gossip round, the liveness check and dialling when due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now >= self.next_beat {
            self.next_beat = now + self.config.liveness_timeout / 3;
            self.beat(now);
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
            self.dial(now);
        }
    }

    /// Keeps [`Membership::down`] in step with `id`'s liveness.
    fn note_liveness(&mut self, id: NodeId) {
        match self.known.get(&id) {
            Some(k) if !k.live && !k.signed.record.left => self.down.insert(id),
            _ => self.down.remove(&id),
        };
    }

    /// The connections whose peer said hello.
    fn ready(&self) -> Vec<ConnId> {
        self.conns
            .iter()
            .filter(|(_, c)| c.peer.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    fn round(&mut self, now: Instant) {
        let ready = self.ready();
        if !ready.is_empty() && self.rounds % self.digest_every() == 0 {
            let pick = ready[self.random(ready.len())];
            self.send_digest(pick, false);
        }
        self.check_liveness(now);
        if self.rounds % SWEEP_EVERY == 0 {
            self.sweep(now);
            self.forget(now);
        }
        if std::mem::take(&mut self.holds_dirty) {
            self.refresh_holds();
        }
    }

    fn dial(&mut self, now: Instant) {
        // Only proven peers count: connections that never proved who they are hold no slot.
        let proven: BTreeSet<NodeId> = self.conns.values().filter_map(Conn::proven).collect();
        if proven.is_empty() {
            self.dial_bootstrap();
        }
        // Too many connections: close the excess (kept at the cap as they come; see
        // `handle_connected`).
        let cap = self.config.max_connections * 2;
        while self.conns.len() > cap {
            let Some(c) = self.excess(now) else {
                break;
            };
            self.close(c);
        }
        // Not dialled: proven peers, and those a connection still within its dial interval
        // says hello as (a hello is unsigned, so it holds a node off only that long).
        let grace = self.config.dial_interval;
        let connected: BTreeSet<NodeId> = self
            .conns
            .values()
            .filter(|c| c.watch || now.saturating_duration_since(c.since) < grace)
            .filter_map(|c| c.peer)
            .collect();
        if proven.len() < self.config.max_connections {
            let candidates: Vec<SocketAddr> = self
                .known
                .iter()
                .filter(|(id, k)| k.alive() && !connected.contains(id))
                .filter_map(|(_, k)| mesh_address(&self.own.record, &k.signed.record))
                .collect();
            if !candidates.is_empty() {
                let pick = candidates[self.random(candidates.len())];
                self.dials.push_back(pick);
            }
        }
        // Probe one member that is down (not departed): this is how a partition heals.
        let down: Vec<SocketAddr> = self
            .down
            .iter()
            .filter_map(|id| self.known.get(id))
            .filter_map(|k| mesh_address(&self.own.record, &k.signed.record))
            .collect();
        if !down.is_empty() {
            let pick = down[self.random(down.len())];
            self.dials.push_back(pick);
        }
    }

    /// The next frame to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if !self.rumours.is_empty() {
            self.flush_rumours();
        }
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

    /// Whether `id` is a member held alive here, at record version `version`: a cheap check
    /// for simulations of thousands of nodes, where [`Membership::members`] would copy every
    /// record.
    pub fn holds_alive(&self, id: &NodeId, version: u64) -> bool {
        self.known
            .get(id)
            .is_some_and(|k| k.alive() && k.signed.record.version == version)
    }

    /// How many members are held alive here.
    pub fn alive_count(&self) -> usize {
        self.known.values().filter(|k| k.alive()).count()
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
mod tests;
