//! [`Router`]: the sans-IO forwarding core.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use foldhash::HashMap as FastMap;
use ipnet::IpNet;
use tracing::{debug, trace};

use crate::handshakes::{Gate, Refused};
use crate::packet;
use crate::peer::{PathKind, Peer, PeerConfig, PeerId, PeerStatus};
use crate::plaintext;
use crate::stats::{DropReason, Drops, PeerCounters};
use crate::table::PrefixTable;
use crate::tunnel::Tunnel;

/// How often WireGuard's timers run (boringtun asks for about every 250 ms).
pub const TIMER_TICK: Duration = Duration::from_millis(250);
/// WireGuard's message type of a cookie reply.
const COOKIE_REPLY: u8 = 3;
/// The smallest output buffer the router accepts: a handshake initiation is 148 bytes.
pub const MIN_BUFFER: usize = 148;
/// What WireGuard adds to an inner packet: 16 bytes header, 16 bytes tag.
pub const WIREGUARD_OVERHEAD: usize = 32;
/// The most addresses one [`Router::probe`] sends to.
pub(crate) const MAX_PROBES: usize = 8;
/// How long a worker may hold a peer's send turn ([`Router::handle_tun_packet_as`]) before
/// another worker takes it over: far longer than encrypting and sending a batch (about 0.1 ms),
/// so only a worker stalled between the two (preempted, or waiting on a full socket) loses it.
pub const HOLD_LIMIT: Duration = Duration::from_millis(2);

/// A datagram for the driver to send; its bytes are the first `len` of the caller's buffer.
#[must_use = "a transmit must be sent"]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// Where to send it.
    pub destination: SocketAddr,
    /// Its length in the caller's buffer.
    pub len: usize,
    /// The peer it goes to, when it is a peer's packet.
    pub peer: Option<PeerId>,
}

/// What to do after [`Router::handle_tun_packet`].
#[must_use = "the packet must be sent or its drop accounted for"]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunAction {
    /// Send this datagram.
    Transmit(Transmit),
    /// The packet waits for a handshake already under way.
    Queued,
    /// The packet was dropped and counted.
    Dropped(DropReason),
    /// Another worker holds the peer's send turn ([`Router::handle_tun_packet_as`]): nothing
    /// was encrypted; send what this worker holds, then try the packet again.
    Held(PeerId),
}

/// What to do after [`Router::handle_datagram`].
#[must_use = "the output must be written or sent"]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetAction {
    /// Write the first `len` bytes of the buffer to the TUN device.
    WriteTun(usize),
    /// Send this datagram (a handshake response, cookie or keepalive).
    Transmit(Transmit),
    /// Nothing to write (a keepalive, a cookie).
    Done,
    /// The datagram was dropped and counted.
    Dropped(DropReason),
}

/// Something the control plane may want to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A WireGuard handshake with the peer completed: its endpoint is confirmed.
    HandshakeCompleted {
        /// The peer.
        peer: PeerId,
    },
    /// The peer's authenticated packets arrived from a new address, which is now its endpoint.
    EndpointChanged {
        /// The peer.
        peer: PeerId,
        /// The new endpoint.
        endpoint: SocketAddr,
    },
    /// The peer's session expired with no new handshake.
    SessionExpired {
        /// The peer.
        peer: PeerId,
    },
}

/// Why a peer could not be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// Another peer has this public key.
    #[error("public key already belongs to peer {0:?}")]
    DuplicateKey(String),
    /// The key is this router's own.
    #[error("public key is this node's own")]
    OwnKey,
    /// Another peer already owns a prefix.
    #[error("{net} already belongs to peer {owner:?}")]
    PrefixTaken {
        /// The prefix.
        net: IpNet,
        /// Its owner.
        owner: String,
    },
    /// A plaintext peer is known by its address, so it needs one.
    #[error("a plaintext peer needs an endpoint")]
    PlaintextWithoutEndpoint,
    /// Another plaintext peer has this address.
    #[error("plaintext endpoint {0} already belongs to peer {1:?}")]
    DuplicateAddress(IpAddr, String),
    /// All 2^24 session indexes are in use.
    #[error("no free session index")]
    NoIndex,
    /// No peer has this handle (it was removed).
    #[error("no peer {0}")]
    NoSuchPeer(PeerId),
}

/// The forwarding core: an allowed-IPs table from overlay prefixes to peers, and per peer a
/// WireGuard session or a plaintext one.
///
/// It owns no socket and reads no clock. Inputs: [`handle_tun_packet`](Self::handle_tun_packet)
/// for a packet read from the TUN device, [`handle_datagram`](Self::handle_datagram) for one from
/// the UDP socket, [`handle_timeout`](Self::handle_timeout) when
/// [`poll_timeout`](Self::poll_timeout) is reached. Both packet inputs write their output into a
/// caller-owned buffer and say what to do with it; nothing is allocated per packet. After every
/// input the caller drains, in this order, [`poll_transmit`](Self::poll_transmit) until `None`,
/// then [`poll_timeout`](Self::poll_timeout), then [`poll_event`](Self::poll_event). Commands:
/// [`add_peer`](Self::add_peer), [`remove_peer`](Self::remove_peer),
/// [`set_endpoint`](Self::set_endpoint), [`connect`](Self::connect), [`probe`](Self::probe).
///
/// Anti-spoofing: a packet from peer P reaches the TUN device only if its inner source address
/// routes back to P in the allowed-IPs table; everything else is dropped and counted.
///
/// Sharing: the two packet inputs take `&self`, so several data-path workers can run them at
/// once under a read lock. Each peer's session and counters sit behind a mutex of their own,
/// held for one packet; the router-wide drop counters, the queues of output and events, and the
/// index of WireGuard endpoints have small mutexes of their own, always taken after a peer's
/// (never the other way round). Everything else changes only through `&mut self`.
pub struct Router {
    private_key: StaticSecret,
    public_key: PublicKey,
    /// Every handshake message passes it before its Diffie-Hellman (module `handshakes`).
    handshakes: Gate,
    /// Looked up for every packet: a fast hasher (seeded per process). Its keys are the
    /// router's own indices.
    peers: FastMap<PeerId, Slot>,
    by_key: HashMap<[u8; 32], PeerId>,
    /// Plaintext peers by underlay address.
    by_addr: HashMap<IpAddr, PeerId>,
    /// Underlay addresses that are a WireGuard peer's endpoint, with how many such peers:
    /// plaintext from them is refused (an address that speaks WireGuard is not trusted to
    /// speak plaintext too).
    wireguard_at: Mutex<HashMap<IpAddr, u32>>,
    routes: PrefixTable<PeerId>,
    next_index: u32,
    /// Drops not attributable to a known peer.
    drops: Mutex<Drops>,
    next_tick: Option<Instant>,
    last_rate_reset: Option<Instant>,
    /// Peers whose session may have queued output after a handshake (boringtun: "call
    /// `decapsulate` again with an empty datagram until `Done`").
    flush: Mutex<VecDeque<PeerId>>,
    /// Peers whose timers are due this tick.
    timers: VecDeque<PeerId>,
    /// Peers to start a handshake with.
    connect: VecDeque<PeerId>,
    /// Peers to start a handshake with at other addresses than their endpoint.
    probe: VecDeque<(PeerId, Vec<SocketAddr>)>,
    /// The initiation of a probe being sent, and the addresses it is still to go to.
    probing: Option<(Vec<u8>, Vec<SocketAddr>)>,
    events: Mutex<VecDeque<Event>>,
    /// `flush` or `events` may hold something: set after each push made under the read lock,
    /// cleared once both are found empty (polled, or a peer removed; under the write lock, so
    /// no push comes between).
    /// [`has_output`](Self::has_output) locks them only when it is set: a packet's turn, which
    /// queues nothing, takes neither lock to find that out.
    queued: AtomicBool,
    /// Send turns taken over from a stalled worker.
    takeovers: AtomicU64,
}

/// A peer behind its lock, alone on its cache lines: workers sending to two peers at once
/// write to two peers' locks and counters, which would otherwise share a line and slow both.
#[repr(align(128))]
struct Slot(Mutex<Peer>);

impl Slot {
    /// The peer, through `&mut` (no locking).
    fn peer(&mut self) -> &mut Peer {
        inner(&mut self.0)
    }
}

impl std::ops::Deref for Slot {
    type Target = Mutex<Peer>;
    fn deref(&self) -> &Mutex<Peer> {
        &self.0
    }
}

/// Locks `m`; a panic while it was held left nothing half-done that matters (every input leaves
/// a peer consistent), so a poisoned lock is taken over.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The value behind `m`, through `&mut` (no locking).
fn inner<T>(m: &mut Mutex<T>) -> &mut T {
    m.get_mut().unwrap_or_else(PoisonError::into_inner)
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("peers", &self.peers.len())
            .field("routes", &self.routes.len())
            .finish_non_exhaustive()
    }
}

fn map_error(e: &WireGuardError, data: bool) -> DropReason {
    use WireGuardError as E;
    match e {
        E::DuplicateCounter | E::InvalidCounter | E::WrongTai64nTimestamp => DropReason::Replay,
        E::InvalidMac | E::InvalidAeadTag | E::WrongKey | E::InvalidTai64nTimestamp => {
            DropReason::Unauthenticated
        }
        E::WrongIndex => DropReason::UnknownPeer,
        E::NoCurrentSession | E::ConnectionExpired => DropReason::NoSession,
        E::UnderLoad => DropReason::RateLimited,
        E::DestinationBufferTooSmall => DropReason::TooLarge,
        E::InvalidPacket if data => DropReason::BadInnerPacket,
        E::InvalidPacket
        | E::IncorrectPacketLength
        | E::WrongPacketType
        | E::UnexpectedPacket
        | E::LockFailed => DropReason::Malformed,
    }
}

impl Router {
    /// A router with no peers. `index_seed` picks where session indexes start, so that a
    /// restarted node does not reuse the indexes of its previous life (and tests replay exactly).
    pub fn new(private_key: StaticSecret, index_seed: u32) -> Self {
        let public_key = PublicKey::from(&private_key);
        Self {
            handshakes: Gate::new(&public_key),
            private_key,
            public_key,
            peers: FastMap::default(),
            by_key: HashMap::new(),
            by_addr: HashMap::new(),
            wireguard_at: Mutex::default(),
            routes: PrefixTable::default(),
            next_index: index_seed & PeerId::MAX,
            drops: Mutex::default(),
            next_tick: None,
            last_rate_reset: None,
            flush: Mutex::default(),
            timers: VecDeque::new(),
            connect: VecDeque::new(),
            probe: VecDeque::new(),
            probing: None,
            events: Mutex::default(),
            queued: AtomicBool::new(false),
            takeovers: AtomicU64::new(0),
        }
    }

    /// This node's public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.public_key.to_bytes()
    }

    /// Drops not attributable to a known peer (malformed datagrams, unknown senders).
    pub fn drops(&self) -> Drops {
        *lock(&self.drops)
    }

    fn count(&self, reason: DropReason) {
        lock(&self.drops).count(reason);
    }

    /// A peer's name, for errors.
    fn name_of(&self, id: PeerId) -> String {
        self.peers
            .get(&id)
            .map(|p| lock(p).config.name.clone())
            .unwrap_or_default()
    }

    /// Whether the router has output to poll ([`poll_transmit`](Self::poll_transmit),
    /// [`poll_event`](Self::poll_event)), so that a worker takes the write lock only then.
    pub fn has_output(&self) -> bool {
        let queued = || !lock(&self.flush).is_empty() || !lock(&self.events).is_empty();
        !self.connect.is_empty()
            || !self.probe.is_empty()
            || self.probing.is_some()
            || !self.timers.is_empty()
            || (self.queued.load(Ordering::Acquire) && queued())
    }

    /// Notes that `flush` or `events` got something (see `queued`).
    fn note_queued(&self) {
        self.queued.store(true, Ordering::Release);
    }

    /// A snapshot of every peer, in index order.
    pub fn peers(&self, now: Instant) -> Vec<PeerStatus> {
        let mut out: Vec<_> = self.peers.values().map(|p| lock(p).status(now)).collect();
        out.sort_by_key(|s| s.id);
        out
    }

    /// The peer with this public key.
    pub fn peer_by_key(&self, key: &[u8; 32]) -> Option<PeerId> {
        self.by_key.get(key).copied()
    }

    /// Adds a peer with a real WireGuard session (or a plaintext one), and routes its prefixes.
    pub fn add_peer(&mut self, now: Instant, config: PeerConfig) -> Result<PeerId, PeerError> {
        let id = self.check_new_peer(&config)?;
        let tunnel: Option<Box<dyn Tunnel>> = match config.path {
            PathKind::Encrypted => Some(Box::new(Tunn::new(
                self.private_key.clone(),
                PublicKey::from(config.public_key),
                None,
                config.persistent_keepalive,
                id.index(),
                // The router's gate counted and checked the handshake already: the session's
                // limiter only checks MAC1 again, never under load (module `handshakes`).
                Some(self.handshakes.for_sessions()),
            ))),
            PathKind::Plaintext => None,
        };
        Ok(self.insert_peer(now, id, config, tunnel))
    }

    /// Adds a peer around the given tunnel (tests use a fake one).
    #[cfg(test)]
    pub(crate) fn add_peer_with(
        &mut self,
        now: Instant,
        config: PeerConfig,
        tunnel: Box<dyn Tunnel>,
    ) -> Result<PeerId, PeerError> {
        let id = self.check_new_peer(&config)?;
        Ok(self.insert_peer(now, id, config, Some(tunnel)))
    }

    fn check_new_peer(&mut self, config: &PeerConfig) -> Result<PeerId, PeerError> {
        if config.public_key == self.public_key.to_bytes() {
            return Err(PeerError::OwnKey);
        }
        if let Some(other) = self.by_key.get(&config.public_key) {
            return Err(PeerError::DuplicateKey(self.name_of(*other)));
        }
        for net in &config.allowed_ips {
            if let Some(owner) = self.routes.iter().find(|(n, _)| **n == net.trunc()) {
                let owner = self.name_of(*owner.1);
                return Err(PeerError::PrefixTaken { net: *net, owner });
            }
        }
        if config.path == PathKind::Plaintext {
            let ip = config
                .endpoint
                .ok_or(PeerError::PlaintextWithoutEndpoint)?
                .ip();
            if let Some(other) = self.by_addr.get(&ip.to_canonical()) {
                return Err(PeerError::DuplicateAddress(ip, self.name_of(*other)));
            }
        }
        // Find a free 24-bit index, starting from the seed. Index 0 is never used.
        for _ in 0..=PeerId::MAX {
            self.next_index = (self.next_index + 1) & PeerId::MAX;
            let id = PeerId::new(self.next_index);
            if self.next_index != 0 && !self.peers.contains_key(&id) {
                return Ok(id);
            }
        }
        Err(PeerError::NoIndex)
    }

    fn insert_peer(
        &mut self,
        now: Instant,
        id: PeerId,
        config: PeerConfig,
        tunnel: Option<Box<dyn Tunnel>>,
    ) -> PeerId {
        for net in &config.allowed_ips {
            self.routes.insert(*net, id);
        }
        self.by_key.insert(config.public_key, id);
        if tunnel.is_none()
            && let Some(ep) = config.endpoint
        {
            self.by_addr.insert(ep.ip().to_canonical(), id);
        }
        if tunnel.is_some() {
            Self::moved(inner(&mut self.wireguard_at), None, config.endpoint);
        }
        debug!(peer = %id, name = %config.name, path = config.path.as_str(), "peer added");
        let peer = Peer {
            id,
            endpoint: config.endpoint,
            endpoint_learned: false,
            config,
            tunnel,
            counters: PeerCounters::default(),
            last_handshake_at: None,
            last_rx_at: None,
            expired: false,
            held: None,
        };
        self.peers.insert(id, Slot(Mutex::new(peer)));
        self.next_tick.get_or_insert(now + TIMER_TICK);
        id
    }

    /// Removes a peer and its routes; returns its configuration.
    pub fn remove_peer(&mut self, id: PeerId) -> Option<PeerConfig> {
        let peer = self.peers.remove(&id)?;
        let peer = peer.0.into_inner().unwrap_or_else(PoisonError::into_inner);
        if peer.tunnel.is_some() {
            Self::moved(inner(&mut self.wireguard_at), peer.endpoint, None);
        }
        self.routes.retain(|_, p| *p != id);
        self.by_key.remove(&peer.config.public_key);
        self.by_addr.retain(|_, p| *p != id);
        inner(&mut self.flush).retain(|p| *p != id);
        self.settle_queued();
        self.timers.retain(|p| *p != id);
        self.connect.retain(|p| *p != id);
        self.probe.retain(|(p, _)| *p != id);
        if self.peers.is_empty() {
            self.next_tick = None;
        }
        debug!(peer = %id, name = %peer.config.name, "peer removed");
        Some(peer.config)
    }

    /// Routes `allowed_ips` to a peer in place of the prefixes it had, its session kept (as
    /// `wg set ... allowed-ips` does): a peer whose prefixes change (a block claimed, moved or
    /// given up) loses no packet in flight and needs no new handshake. A prefix another peer
    /// holds is refused, naming it, and nothing changes.
    pub fn set_allowed_ips(
        &mut self,
        id: PeerId,
        allowed_ips: Vec<IpNet>,
    ) -> Result<(), PeerError> {
        if !self.peers.contains_key(&id) {
            return Err(PeerError::NoSuchPeer(id));
        }
        for net in &allowed_ips {
            if let Some((_, owner)) = self
                .routes
                .iter()
                .find(|(n, p)| **n == net.trunc() && **p != id)
            {
                let owner = self.name_of(*owner);
                return Err(PeerError::PrefixTaken { net: *net, owner });
            }
        }
        self.routes.retain(|_, p| *p != id);
        for net in &allowed_ips {
            self.routes.insert(*net, id);
        }
        if let Some(peer) = self.peers.get_mut(&id).map(Slot::peer) {
            debug!(peer = %id, name = %peer.config.name, allowed_ips = ?allowed_ips, "peer's prefixes changed");
            peer.config.allowed_ips = allowed_ips;
        }
        Ok(())
    }

    /// Starts a WireGuard handshake with the peer without waiting for traffic, so that the
    /// control plane learns soon whether its endpoint works; the initiation comes out of
    /// [`poll_transmit`](Self::poll_transmit).
    pub fn connect(&mut self, id: PeerId) {
        if self.wireguard(id) && !self.connect.contains(&id) {
            self.connect.push_back(id);
        }
    }

    /// Offers a WireGuard peer's session other paths: one handshake initiation, sent to each
    /// of `addrs` (the first eight), while traffic stays on the endpoint in use. The
    /// first answer completes the handshake and, as any authenticated packet does, moves the
    /// endpoint to where it came from; an address that answers nothing costs one datagram,
    /// and boringtun's retry of an unanswered initiation goes to the endpoint in use. Nothing
    /// is sent while a handshake is already under way (the next probe tries again).
    pub fn probe(&mut self, id: PeerId, addrs: &[SocketAddr]) {
        if addrs.is_empty() || !self.wireguard(id) {
            return;
        }
        self.probe.retain(|(p, _)| *p != id);
        let addrs = addrs.iter().take(MAX_PROBES).copied().collect();
        self.probe.push_back((id, addrs));
    }

    /// Whether `id` is a WireGuard peer.
    fn wireguard(&self, id: PeerId) -> bool {
        self.peers
            .get(&id)
            .is_some_and(|p| lock(p).tunnel.is_some())
    }

    /// Points a WireGuard peer at a new endpoint (the control plane's choice), its session
    /// kept: its configuration says this endpoint from now on.
    pub fn set_endpoint(&mut self, id: PeerId, endpoint: SocketAddr) {
        if let Some(peer) = self.peers.get_mut(&id).map(Slot::peer)
            && peer.tunnel.is_some()
        {
            Self::moved(inner(&mut self.wireguard_at), peer.endpoint, Some(endpoint));
            peer.endpoint = Some(endpoint);
            peer.endpoint_learned = false;
            peer.config.endpoint = Some(endpoint);
        }
    }

    /// As [`Self::set_endpoint`], only while the peer's endpoint is still `from`, where the
    /// caller saw it; false (nothing changed) when it moved since (the peer roamed after the
    /// caller looked, and the newer endpoint stands).
    pub fn move_endpoint(&mut self, id: PeerId, from: SocketAddr, to: SocketAddr) -> bool {
        let at = self.peers.get(&id).and_then(|p| lock(p).endpoint);
        if at != Some(from) {
            return false;
        }
        self.set_endpoint(id, to);
        true
    }

    /// Keeps [`Self::wireguard_at`] in step when a WireGuard peer's endpoint goes from `old` to
    /// `new`.
    fn moved(index: &mut HashMap<IpAddr, u32>, old: Option<SocketAddr>, new: Option<SocketAddr>) {
        if let Some(old) = old {
            let ip = old.ip().to_canonical();
            if let Some(n) = index.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    index.remove(&ip);
                }
            }
        }
        if let Some(new) = new {
            *index.entry(new.ip().to_canonical()).or_default() += 1;
        }
    }

    /// Routes one packet read from the TUN device; the datagram to send is written into `out`,
    /// which must hold at least `packet.len() + 32` and [`MIN_BUFFER`] bytes. For a single
    /// caller: it neither takes nor respects send turns (see
    /// [`handle_tun_packet_as`](Self::handle_tun_packet_as)). It queues no output
    /// ([`has_output`](Self::has_output)): what it makes is in the action it returns (a packet
    /// that waits for a handshake stays in the session, which a datagram releases), so a
    /// driver need not ask for output after packets from the device.
    pub fn handle_tun_packet(&self, now: Instant, packet: &[u8], out: &mut [u8]) -> TunAction {
        self.encapsulate(None, now, packet, out)
    }

    /// [`handle_tun_packet`](Self::handle_tun_packet) for data-path worker `worker` of several,
    /// keeping each peer's datagrams on the wire in the order of their WireGuard counters, near
    /// enough for the receiver's replay window (1024 counters with boringtun): a worker that
    /// encrypts for a peer holds the peer's *send turn* until it has sent those datagrams and
    /// calls [`release`](Self::release). Meanwhile another worker's packet for that peer is
    /// not encrypted: it gets [`TunAction::Held`], sends what it holds itself (so two workers
    /// never wait for each other), and tries again. Without turns, a worker that encrypted a
    /// batch and was then preempted could send it after the others had sent more than the
    /// window of later counters, and the receiver would drop it all as replays. A turn held
    /// past [`HOLD_LIMIT`] (a stalled worker) is taken over and counted
    /// ([`takeovers`](Self::takeovers)). Plaintext peers have no counters and no turns.
    pub fn handle_tun_packet_as(
        &self,
        worker: u16,
        now: Instant,
        packet: &[u8],
        out: &mut [u8],
    ) -> TunAction {
        self.encapsulate(Some(worker), now, packet, out)
    }

    /// Gives back `worker`'s send turn for `peer` (see
    /// [`handle_tun_packet_as`](Self::handle_tun_packet_as)), once it sent what it encrypted;
    /// nothing if another worker took it over meanwhile.
    pub fn release(&self, worker: u16, peer: PeerId) {
        if let Some(slot) = self.peers.get(&peer) {
            let mut peer = lock(slot);
            if peer.held.is_some_and(|(w, _)| w == worker) {
                peer.held = None;
            }
        }
    }

    /// The worker that holds `peer`'s send turn, if any.
    #[cfg(all(test, feature = "driver"))]
    pub(crate) fn turn_holder(&self, peer: PeerId) -> Option<u16> {
        let slot = self.peers.get(&peer)?;
        lock(slot).held.map(|(worker, _)| worker)
    }

    /// How many send turns were taken over from a worker that held one past [`HOLD_LIMIT`].
    pub fn takeovers(&self) -> u64 {
        self.takeovers.load(Ordering::Relaxed)
    }

    fn encapsulate(
        &self,
        worker: Option<u16>,
        now: Instant,
        packet: &[u8],
        out: &mut [u8],
    ) -> TunAction {
        let Some(addrs) = packet::addrs(packet) else {
            self.count(DropReason::BadInnerPacket);
            return TunAction::Dropped(DropReason::BadInnerPacket);
        };
        let Some(peer) = self
            .routes
            .lookup(addrs.dst)
            .and_then(|id| self.peers.get(id))
        else {
            trace!(dst = %addrs.dst, "no route");
            self.count(DropReason::NoRoute);
            return TunAction::Dropped(DropReason::NoRoute);
        };
        let peer = &mut *lock(peer);
        let drop = |peer: &mut Peer, reason| {
            peer.counters.drops.count(reason);
            TunAction::Dropped(reason)
        };
        let Some(destination) = peer.endpoint else {
            return drop(peer, DropReason::NoEndpoint);
        };
        if out.len() < MIN_BUFFER.max(packet.len() + WIREGUARD_OVERHEAD) {
            return drop(peer, DropReason::TooLarge);
        }
        let Some(tunnel) = peer.tunnel.as_mut() else {
            let Some(len) = plaintext::encode(packet, out) else {
                return drop(peer, DropReason::TooLarge);
            };
            peer.counters.tx_bytes += len as u64;
            peer.counters.tx_packets += 1;
            return TunAction::Transmit(Transmit {
                destination,
                len,
                peer: Some(peer.id),
            });
        };
        if let (Some(w), Some((holder, since))) = (worker, peer.held)
            && holder != w
        {
            if now.saturating_duration_since(since) < HOLD_LIMIT {
                return TunAction::Held(peer.id);
            }
            self.takeovers.fetch_add(1, Ordering::Relaxed);
            debug!(peer = %peer.id, from = holder, to = w, "send turn taken over from a stalled worker");
            peer.held = None;
        }
        match tunnel.encapsulate(packet, out) {
            TunnResult::WriteToNetwork(b) => {
                let len = b.len();
                peer.counters.tx_bytes += len as u64;
                // A data message carries the packet; an initiation means it was queued.
                if b.first() == Some(&4) {
                    peer.counters.tx_packets += 1;
                    if let Some(w) = worker
                        && peer.held.is_none()
                    {
                        peer.held = Some((w, now));
                    }
                }
                TunAction::Transmit(Transmit {
                    destination,
                    len,
                    peer: Some(peer.id),
                })
            }
            TunnResult::Done => TunAction::Queued,
            TunnResult::Err(e) => {
                debug!(peer = %peer.id, error = ?e, "encapsulate failed");
                drop(peer, map_error(&e, false))
            }
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                drop(peer, DropReason::NoSession)
            }
        }
    }

    /// Handles one datagram from the UDP socket; output goes into `out`, which must hold at
    /// least the datagram's length and [`MIN_BUFFER`] bytes.
    pub fn handle_datagram(
        &self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
    ) -> NetAction {
        let from = SocketAddr::new(from.ip().to_canonical(), from.port());
        if out.len() < MIN_BUFFER.max(datagram.len()) {
            self.count(DropReason::TooLarge);
            return NetAction::Dropped(DropReason::TooLarge);
        }
        if plaintext::is_plaintext(datagram) {
            return self.handle_plaintext(now, from, datagram, out);
        }
        let id = match Tunn::parse_incoming_packet(datagram) {
            Ok(Packet::HandshakeInit(init)) => {
                // The MAC, the load and the source before the Diffie-Hellman of the anonymous
                // parse.
                if let Err(refused) = self.admit_handshake(from, datagram, out) {
                    return refused;
                }
                match parse_handshake_anon(&self.private_key, &self.public_key, &init) {
                    Ok(half) => match self.by_key.get(&half.peer_static_public) {
                        Some(id) => *id,
                        None => {
                            debug!(%from, "handshake from an unknown key");
                            self.count(DropReason::UnknownPeer);
                            return NetAction::Dropped(DropReason::UnknownPeer);
                        }
                    },
                    Err(_) => {
                        self.count(DropReason::Unauthenticated);
                        return NetAction::Dropped(DropReason::Unauthenticated);
                    }
                }
            }
            Ok(Packet::HandshakeResponse(p)) => {
                if let Err(refused) = self.admit_handshake(from, datagram, out) {
                    return refused;
                }
                PeerId::from_receiver_idx(p.receiver_idx)
            }
            Ok(Packet::PacketCookieReply(p)) => PeerId::from_receiver_idx(p.receiver_idx),
            Ok(Packet::PacketData(p)) => PeerId::from_receiver_idx(p.receiver_idx),
            Err(_) => {
                self.count(DropReason::Malformed);
                return NetAction::Dropped(DropReason::Malformed);
            }
        };
        let Some(peer) = self.peers.get(&id) else {
            self.count(DropReason::UnknownPeer);
            return NetAction::Dropped(DropReason::UnknownPeer);
        };
        let peer = &mut *lock(peer);
        let Some(tunnel) = peer.tunnel.as_mut() else {
            peer.counters.drops.count(DropReason::WrongPath);
            return NetAction::Dropped(DropReason::WrongPath);
        };
        let kind = datagram[0];
        let (action, authenticated) = match tunnel.decapsulate(Some(from.ip()), datagram, out) {
            // Under load the limiter answers an initiation with a cookie: nothing was
            // authenticated, so neither the endpoint nor the handshake state may change.
            TunnResult::WriteToNetwork(b) if b.first() == Some(&COOKIE_REPLY) => {
                peer.counters.drops.count(DropReason::RateLimited);
                (
                    NetAction::Transmit(Transmit {
                        destination: from,
                        len: b.len(),
                        peer: Some(id),
                    }),
                    false,
                )
            }
            TunnResult::WriteToNetwork(b) => {
                let len = b.len();
                // After a handshake the session may hold queued packets: drain them next.
                lock(&self.flush).push_back(id);
                if kind == 1 || kind == 2 {
                    peer.last_handshake_at = Some(now);
                    peer.expired = false;
                    lock(&self.events).push_back(Event::HandshakeCompleted { peer: id });
                    debug!(peer = %id, name = %peer.config.name, "handshake completed");
                }
                self.note_queued();
                peer.counters.tx_bytes += len as u64;
                (
                    NetAction::Transmit(Transmit {
                        destination: from,
                        len,
                        peer: Some(id),
                    }),
                    true,
                )
            }
            TunnResult::WriteToTunnelV4(b, src) => {
                let len = b.len();
                (
                    Self::accept_inner(&self.routes, peer, src.into(), len),
                    true,
                )
            }
            TunnResult::WriteToTunnelV6(b, src) => {
                let len = b.len();
                (
                    Self::accept_inner(&self.routes, peer, src.into(), len),
                    true,
                )
            }
            // A keepalive (data) or a cookie reply.
            TunnResult::Done => (NetAction::Done, kind == 4),
            TunnResult::Err(e) => {
                let reason = map_error(&e, kind == 4);
                trace!(peer = %id, error = ?e, "datagram dropped");
                peer.counters.drops.count(reason);
                (NetAction::Dropped(reason), false)
            }
        };
        if authenticated {
            peer.counters.rx_bytes += datagram.len() as u64;
            peer.last_rx_at = Some(now);
            // Roaming: the endpoint follows the peer's authenticated packets, but never onto
            // a plaintext peer's address: plaintext from an address a WireGuard peer is at is
            // refused, so one authenticated packet with a spoofed source (the peer's own, or
            // one of its captured by someone on the path and sent first) would cut that
            // trusted node off.
            if peer.endpoint != Some(from) && self.by_addr.contains_key(&from.ip()) {
                debug!(peer = %id, name = %peer.config.name, endpoint = %from, "endpoint not moved: a plaintext peer's address");
            } else if peer.endpoint != Some(from) {
                debug!(peer = %id, name = %peer.config.name, endpoint = %from, "endpoint changed");
                Self::moved(&mut lock(&self.wireguard_at), peer.endpoint, Some(from));
                peer.endpoint = Some(from);
                peer.endpoint_learned = true;
                lock(&self.events).push_back(Event::EndpointChanged {
                    peer: id,
                    endpoint: from,
                });
                self.note_queued();
            }
        }
        action
    }

    /// The anti-spoofing check: the inner source must route back to the sending peer.
    fn accept_inner(
        routes: &PrefixTable<PeerId>,
        peer: &mut Peer,
        src: IpAddr,
        len: usize,
    ) -> NetAction {
        if routes.lookup(src) != Some(&peer.id) {
            trace!(peer = %peer.id, %src, "spoofed source dropped");
            peer.counters.drops.count(DropReason::Spoofed);
            return NetAction::Dropped(DropReason::Spoofed);
        }
        peer.counters.rx_packets += 1;
        NetAction::WriteTun(len)
    }

    /// The handshake gate's verdict on `datagram` from `from` (module `handshakes`): on, or
    /// the cookie reply to send back, or a counted drop.
    fn admit_handshake(
        &self,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Result<(), NetAction> {
        match self.handshakes.admit(from.ip(), datagram, out) {
            Ok(()) => Ok(()),
            Err(Refused::Cookie(len)) => {
                self.count(DropReason::RateLimited);
                Err(NetAction::Transmit(Transmit {
                    destination: from,
                    len,
                    peer: None,
                }))
            }
            Err(Refused::Drop(reason)) => {
                self.count(reason);
                Err(NetAction::Dropped(reason))
            }
        }
    }

    fn handle_plaintext(
        &self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
    ) -> NetAction {
        let Ok(inner) = plaintext::decode(datagram) else {
            self.count(DropReason::Malformed);
            return NetAction::Dropped(DropReason::Malformed);
        };
        let Some(peer) = self
            .by_addr
            .get(&from.ip())
            .and_then(|id| self.peers.get(id))
        else {
            // Plaintext from an address no plaintext peer has: never accepted.
            self.count(DropReason::WrongPath);
            return NetAction::Dropped(DropReason::WrongPath);
        };
        let peer = &mut *lock(peer);
        // Nor from an address a WireGuard peer is at.
        if lock(&self.wireguard_at).contains_key(&from.ip().to_canonical()) {
            peer.counters.drops.count(DropReason::WrongPath);
            return NetAction::Dropped(DropReason::WrongPath);
        }
        // Only from the peer's exact endpoint: another port of its host is another sender.
        if peer.endpoint != Some(from) {
            peer.counters.drops.count(DropReason::WrongPath);
            return NetAction::Dropped(DropReason::WrongPath);
        }
        let Some(addrs) = packet::addrs(inner) else {
            peer.counters.drops.count(DropReason::BadInnerPacket);
            return NetAction::Dropped(DropReason::BadInnerPacket);
        };
        // Anti-spoofing before anything else is recorded.
        let action = Self::accept_inner(&self.routes, peer, addrs.src, inner.len());
        if let NetAction::WriteTun(len) = action {
            out[..len].copy_from_slice(&inner[..len]);
            peer.counters.rx_bytes += datagram.len() as u64;
            peer.last_rx_at = Some(now);
        }
        action
    }

    /// Runs the timers when [`poll_timeout`](Self::poll_timeout) is reached.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(tick) = self.next_tick else { return };
        if now < tick {
            return;
        }
        self.next_tick = Some(now + TIMER_TICK);
        if self
            .last_rate_reset
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
        {
            self.handshakes.reset();
            self.last_rate_reset = Some(now);
        }
        let mut due: Vec<PeerId> = self
            .peers
            .values_mut()
            .map(Slot::peer)
            .filter(|p| p.tunnel.is_some())
            .map(|p| p.id)
            .collect();
        due.sort();
        self.timers.extend(due);
    }

    /// The next datagram the router wants sent, written into `buf` (at least [`MIN_BUFFER`] and
    /// the largest packet plus 32 bytes): packets released by a handshake, then timer output
    /// (keepalives, handshake retries, rekeys).
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        let flush = inner(&mut self.flush);
        while let Some(&id) = flush.front() {
            let Some(peer) = self.peers.get_mut(&id).map(Slot::peer) else {
                flush.pop_front();
                continue;
            };
            let (Some(tunnel), Some(destination)) = (peer.tunnel.as_mut(), peer.endpoint) else {
                flush.pop_front();
                continue;
            };
            match tunnel.decapsulate(None, &[], buf) {
                TunnResult::WriteToNetwork(b) => {
                    let len = b.len();
                    peer.counters.tx_bytes += len as u64;
                    peer.counters.tx_packets += 1;
                    return Some(Transmit {
                        destination,
                        len,
                        peer: Some(id),
                    });
                }
                _ => {
                    flush.pop_front();
                }
            }
        }
        while let Some(id) = self.connect.pop_front() {
            let Some(peer) = self.peers.get_mut(&id).map(Slot::peer) else {
                continue;
            };
            let (Some(tunnel), Some(destination)) = (peer.tunnel.as_mut(), peer.endpoint) else {
                continue;
            };
            if let TunnResult::WriteToNetwork(b) = tunnel.initiate(buf) {
                let len = b.len();
                peer.counters.tx_bytes += len as u64;
                return Some(Transmit {
                    destination,
                    len,
                    peer: Some(id),
                });
            }
        }
        if let Some(t) = self.poll_probe(buf) {
            return Some(t);
        }
        while let Some(id) = self.timers.pop_front() {
            let Some(peer) = self.peers.get_mut(&id).map(Slot::peer) else {
                continue;
            };
            let Some(tunnel) = peer.tunnel.as_mut() else {
                continue;
            };
            match tunnel.update_timers(buf) {
                TunnResult::WriteToNetwork(b) => {
                    let len = b.len();
                    let Some(destination) = peer.endpoint else {
                        peer.counters.drops.count(DropReason::NoEndpoint);
                        continue;
                    };
                    peer.counters.tx_bytes += len as u64;
                    return Some(Transmit {
                        destination,
                        len,
                        peer: Some(id),
                    });
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) if !peer.expired => {
                    peer.expired = true;
                    debug!(peer = %id, name = %peer.config.name, "session expired");
                    inner(&mut self.events).push_back(Event::SessionExpired { peer: id });
                    *self.queued.get_mut() = true;
                }
                TunnResult::Err(e) => trace!(peer = %id, error = ?e, "timer error"),
                _ => {}
            }
        }
        let _ = now;
        self.settle_queued();
        None
    }

    /// The next datagram of the probes ([`probe`](Self::probe)): one initiation per peer,
    /// copied to each of its addresses.
    fn poll_probe(&mut self, buf: &mut [u8]) -> Option<Transmit> {
        loop {
            if let Some((bytes, addrs)) = &mut self.probing {
                if let (Some(destination), Some(out)) = (addrs.pop(), buf.get_mut(..bytes.len())) {
                    out.copy_from_slice(bytes);
                    return Some(Transmit {
                        destination,
                        len: bytes.len(),
                        peer: None,
                    });
                }
                self.probing = None;
            }
            let (id, mut addrs) = self.probe.pop_front()?;
            let Some(tunnel) = self
                .peers
                .get_mut(&id)
                .and_then(|p| p.peer().tunnel.as_mut())
            else {
                continue;
            };
            if let TunnResult::WriteToNetwork(b) = tunnel.initiate(buf) {
                let n = b.len() as u64 * addrs.len() as u64;
                addrs.reverse();
                self.probing = Some((b.to_vec(), addrs));
                if let Some(peer) = self.peers.get_mut(&id).map(Slot::peer) {
                    peer.counters.tx_bytes += n;
                    debug!(peer = %id, name = %peer.config.name, "probing other paths");
                }
            }
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_tick
    }

    /// The next event for the control plane.
    pub fn poll_event(&mut self) -> Option<Event> {
        let event = inner(&mut self.events).pop_front();
        if event.is_none() {
            self.settle_queued();
        }
        event
    }

    /// Clears `queued` once `flush` and `events` are both empty (under `&mut self`: no push
    /// can come between the look and the clear).
    fn settle_queued(&mut self) {
        let empty = inner(&mut self.flush).is_empty() && inner(&mut self.events).is_empty();
        *self.queued.get_mut() = !empty;
    }
}
