//! The relay service, the tokio driver of [`super`]: the relay socket (forwarding for others,
//! registering with this node's home relays) and the loopback shims of relayed peers.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use futures::future::{AbortHandle, Abortable, Aborted, BoxFuture};
use futures::stream::FuturesUnordered;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};
use weft_mesh::Identity;

use super::registry::{REGISTER_EVERY, Registered, Registry};
use super::wire::{self, DropReason, MacKey, Message, Register, Short};

/// The most shims (relayed peers) a node keeps.
pub const MAX_SHIMS: usize = 4096;
/// A shim no plan names is closed after this long without traffic.
pub const SHIM_IDLE: Duration = Duration::from_secs(300);
/// How often each relay in use (a home, or the relay of a relayed peer) is probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// A relay that answered no probe for this long is unresponsive: the plan passes it over
/// (well before the mesh's liveness timeout would).
pub const UNRESPONSIVE_AFTER: Duration = Duration::from_secs(4);

/// What the service knows of one relay's health.
#[derive(Debug, Clone, Copy)]
struct Health {
    /// When probing began.
    since: Instant,
    /// The nonce of the last probe sent.
    nonce: u64,
    /// When it last answered.
    answered: Option<Instant>,
}

/// What the service needs.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The data MAC key (from the cluster secret).
    pub key: MacKey,
    /// This node's identity (registrations are signed with it).
    pub identity: Identity,
    /// The router's UDP port, on loopback: where shims deliver.
    pub router_port: u16,
    /// Where the service publishes its state every second, for status and metrics.
    pub stats: RelayStats,
}

/// The relay service's state, as last published.
pub type RelayStats = Arc<std::sync::Mutex<RelaySnapshot>>;

/// The answer to a plan: each relayed peer's shim address, and the relays in use that answer
/// no probe.
pub type PlanReply = (HashMap<[u8; 32], SocketAddr>, Vec<SocketAddr>);

/// What the control loop asks of the service.
#[derive(Debug)]
pub enum Command {
    /// Register with `homes` (relay addresses); reach each of `peers` (WireGuard key, relay
    /// address) through its relay; hold registrations for, and take relayed data from, only
    /// `members`. Replies with each peer's shim address (its endpoint for the router).
    Plan {
        /// The mesh's members' WireGuard keys.
        members: Vec<[u8; 32]>,
        /// Where to register.
        homes: Vec<SocketAddr>,
        /// The relayed peers and the relay for each.
        peers: Vec<([u8; 32], SocketAddr)>,
        /// Each peer's shim address, and the relays in use that answer no probe.
        reply: oneshot::Sender<PlanReply>,
    },
    /// What the service holds and counted.
    Snapshot(oneshot::Sender<RelaySnapshot>),
}

/// One relayed peer, as status and metrics show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimStatus {
    /// The peer's WireGuard key, when a plan named it (else only its first 8 bytes are known).
    pub key: Option<[u8; 32]>,
    /// Its first 8 bytes.
    pub short: Short,
    /// Its shim (the router's endpoint for it).
    pub shim: SocketAddr,
    /// The relay it is reached through.
    pub via: Option<SocketAddr>,
    /// Bytes of its WireGuard datagrams sent through the relay.
    pub tx_bytes: u64,
    /// Bytes of its WireGuard datagrams received through the relay.
    pub rx_bytes: u64,
}

/// The service's state for status and metrics.
#[derive(Debug, Clone, Default)]
pub struct RelaySnapshot {
    /// The relay port.
    pub port: u16,
    /// Nodes registered here, as a relay.
    pub registered: Vec<Registered>,
    /// This node's relayed peers.
    pub peers: Vec<ShimStatus>,
    /// Datagrams dropped on the relay port, by reason.
    pub drops: BTreeMap<&'static str, u64>,
    /// Relays in use that answered no probe lately.
    pub unresponsive: Vec<SocketAddr>,
}

/// Asks the relay service; every call is `None` once it stopped.
#[derive(Debug, Clone)]
pub struct RelayHandle {
    tx: mpsc::Sender<Command>,
}

impl RelayHandle {
    /// Sends the plan ([`Command::Plan`]); each relayed peer's shim address, and the relays in
    /// use that answer no probe.
    pub async fn plan(
        &self,
        members: Vec<[u8; 32]>,
        homes: Vec<SocketAddr>,
        peers: Vec<([u8; 32], SocketAddr)>,
    ) -> Option<PlanReply> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Plan {
                members,
                homes,
                peers,
                reply,
            })
            .await
            .ok()?;
        rx.await.ok()
    }

    /// The service's state.
    pub async fn snapshot(&self) -> Option<RelaySnapshot> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Snapshot(reply)).await.ok()?;
        rx.await.ok()
    }
}

struct Shim {
    key: Option<[u8; 32]>,
    socket: Arc<UdpSocket>,
    addr: SocketAddr,
    via: Option<SocketAddr>,
    planned: bool,
    used: Instant,
    tx_bytes: u64,
    rx_bytes: u64,
    /// Stops its pending receive when it closes.
    reading: AbortHandle,
}

impl Drop for Shim {
    fn drop(&mut self) {
        self.reading.abort();
    }
}

/// One receive on a shim: its peer, its socket (to receive again), what came.
type ShimRead = (
    Short,
    Arc<UdpSocket>,
    std::io::Result<(Vec<u8>, SocketAddr)>,
);

fn read_shim(
    peer: Short,
    socket: Arc<UdpSocket>,
    stop: futures::future::AbortRegistration,
) -> BoxFuture<'static, Result<ShimRead, Aborted>> {
    Box::pin(Abortable::new(
        async move {
            let mut buf = vec![0u8; 65_536];
            let r = socket
                .recv_from(&mut buf)
                .await
                .map(|(n, from)| (buf[..n].to_vec(), from));
            (peer, socket, r)
        },
        stop,
    ))
}

struct Service {
    config: RelayConfig,
    me: Short,
    socket: Arc<UdpSocket>,
    registry: Registry,
    homes: Vec<SocketAddr>,
    shims: HashMap<Short, Shim>,
    reads: FuturesUnordered<BoxFuture<'static, Result<ShimRead, Aborted>>>,
    drops: BTreeMap<&'static str, u64>,
    buf: Vec<u8>,
    /// The relays in use and how they answer.
    health: HashMap<SocketAddr, Health>,
    nonce: u64,
}

/// The service on the relay port's `socket`: its handle, and the future to spawn, which runs
/// until `shutdown`.
pub fn start(
    config: RelayConfig,
    socket: UdpSocket,
    shutdown: crate::shutdown::Shutdown,
) -> (RelayHandle, impl Future<Output = ()> + Send + 'static) {
    let port = socket.local_addr().map_or(0, |a| a.port());
    let (tx, rx) = mpsc::channel(64);
    let me = wire::short(&config.identity.wireguard_key());
    let service = Service {
        config,
        me,
        socket: Arc::new(socket),
        registry: Registry::default(),
        homes: Vec::new(),
        shims: HashMap::new(),
        reads: FuturesUnordered::new(),
        drops: BTreeMap::new(),
        buf: Vec::with_capacity(2048),
        health: HashMap::new(),
        nonce: 0,
    };
    info!(port, "relay service running");
    (RelayHandle { tx }, service.run(rx, shutdown))
}

impl Service {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut shutdown: crate::shutdown::Shutdown,
    ) {
        let socket = self.socket.clone();
        let mut buf = vec![0u8; 65_536];
        let mut tick = tokio::time::interval(REGISTER_EVERY);
        let mut publish = tokio::time::interval(Duration::from_secs(1));
        let mut probe = tokio::time::interval(PROBE_EVERY);
        loop {
            tokio::select! {
                () = shutdown.wait() => return,
                cmd = commands.recv() => match cmd {
                    Some(c) => self.command(c).await,
                    None => return,
                },
                r = socket.recv_from(&mut buf) => match r {
                    Ok((n, from)) => self.datagram(from, &buf[..n]).await,
                    Err(e) => debug!(error = %e, "relay socket receive failed"),
                },
                Some(read) = self.reads.next(), if !self.reads.is_empty() => {
                    if let Ok((peer, socket, r)) = read {
                        self.shim_read(peer, socket, r).await;
                    }
                }
                _ = tick.tick() => self.tick().await,
                _ = probe.tick() => self.probe().await,
                _ = publish.tick() => {
                    let snap = self.snapshot();
                    if let Ok(mut s) = self.config.stats.lock() {
                        *s = snap;
                    }
                }
            }
        }
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Plan {
                members,
                homes,
                peers,
                reply,
            } => {
                self.registry.set_members(members);
                if homes != self.homes {
                    info!(homes = ?homes, "relays this node registers with");
                    self.homes = homes;
                    self.register().await;
                }
                for s in self.shims.values_mut() {
                    s.planned = false;
                }
                let mut out = HashMap::new();
                for (key, via) in peers {
                    if let Some(shim) = self.shim(wire::short(&key), true).await {
                        shim.key = Some(key);
                        shim.planned = true;
                        if shim.via != Some(via) {
                            info!(peer = %base64_key(&key), relay = %via, "peer reached through a relay");
                            shim.via = Some(via);
                        }
                        out.insert(key, shim.addr);
                    }
                }
                self.track_health();
                let _ = reply.send((out, self.unresponsive()));
            }
            Command::Snapshot(reply) => {
                let _ = reply.send(self.snapshot());
            }
        }
    }

    fn snapshot(&self) -> RelaySnapshot {
        RelaySnapshot {
            port: self.socket.local_addr().map_or(0, |a| a.port()),
            registered: self.registry.registered(),
            peers: self
                .shims
                .iter()
                .map(|(short, s)| ShimStatus {
                    key: s.key,
                    short: *short,
                    shim: s.addr,
                    via: s.via,
                    tx_bytes: s.tx_bytes,
                    rx_bytes: s.rx_bytes,
                })
                .collect(),
            drops: self.drops.clone(),
            unresponsive: self.unresponsive(),
        }
    }

    /// Probes the relays in use: the homes and the relays of planned shims.
    fn track_health(&mut self) {
        #[expect(clippy::disallowed_methods, reason = "a driver owns the clock")]
        let now = Instant::now();
        let in_use: Vec<SocketAddr> = self
            .homes
            .iter()
            .copied()
            .chain(
                self.shims
                    .values()
                    .filter(|s| s.planned)
                    .filter_map(|s| s.via),
            )
            .collect();
        self.health.retain(|a, _| in_use.contains(a));
        for a in in_use {
            self.health.entry(a).or_insert(Health {
                since: now,
                nonce: 0,
                answered: None,
            });
        }
    }

    /// The relays in use that answered no probe for [`UNRESPONSIVE_AFTER`].
    fn unresponsive(&self) -> Vec<SocketAddr> {
        #[expect(clippy::disallowed_methods, reason = "a driver owns the clock")]
        let now = Instant::now();
        self.health
            .iter()
            .filter(|(_, h)| {
                let last = h.answered.unwrap_or(h.since);
                now.saturating_duration_since(last) >= UNRESPONSIVE_AFTER
            })
            .map(|(a, _)| *a)
            .collect()
    }

    async fn probe(&mut self) {
        for (addr, h) in &mut self.health {
            self.nonce = self.nonce.wrapping_add(1);
            h.nonce = self.nonce;
            let probe = wire::encode_probe(&self.config.key, h.nonce);
            if let Err(e) = self.socket.send_to(&probe, *addr).await {
                debug!(error = %e, relay = %addr, "probe not sent");
            }
        }
    }

    /// The shim of the peer whose key starts with `short`, opened if need be. When the shims
    /// are at [`MAX_SHIMS`], a shim a plan names (`planned`) takes the place of the unplanned
    /// one used longest ago: peers that reached this node through a relay of their own choice
    /// never keep out the relayed peers the plan needs.
    async fn shim(&mut self, short: Short, planned: bool) -> Option<&mut Shim> {
        if !self.shims.contains_key(&short) {
            if self.shims.len() >= MAX_SHIMS {
                let oldest = planned
                    .then(|| {
                        oldest_unplanned(self.shims.iter().map(|(k, s)| (*k, s.planned, s.used)))
                    })
                    .flatten();
                match oldest {
                    Some(k) => {
                        debug!(peer = ?k, "unplanned relay shim closed for a planned one");
                        self.shims.remove(&k);
                    }
                    None => {
                        self.count(DropReason::Full);
                        return None;
                    }
                }
            }
            let socket = match UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    warn!(error = %e, "could not open a relay shim");
                    return None;
                }
            };
            let addr = socket.local_addr().ok()?;
            let (reading, stop) = AbortHandle::new_pair();
            self.reads.push(read_shim(short, socket.clone(), stop));
            #[expect(clippy::disallowed_methods, reason = "a driver owns the clock")]
            let used = Instant::now();
            self.shims.insert(
                short,
                Shim {
                    key: None,
                    socket,
                    addr,
                    via: None,
                    planned: false,
                    used,
                    tx_bytes: 0,
                    rx_bytes: 0,
                    reading,
                },
            );
        }
        self.shims.get_mut(&short)
    }

    fn count(&mut self, d: DropReason) {
        *self.drops.entry(d.as_str()).or_default() += 1;
    }

    /// A datagram on the relay port.
    async fn datagram(&mut self, from: SocketAddr, bytes: &[u8]) {
        let from = SocketAddr::new(from.ip().to_canonical(), from.port());
        #[expect(clippy::disallowed_methods, reason = "a driver owns the clock")]
        let now = Instant::now();
        match wire::decode(&self.config.key, bytes) {
            Ok(Message::Data { src, .. }) if !self.registry.is_member(src) => {
                // From a key no member holds (made up by a member, to open shims): dropped.
                self.count(DropReason::NotMember);
            }
            Ok(Message::Data { dst, src, inner }) if dst == self.me => {
                let router = SocketAddr::from((Ipv4Addr::LOCALHOST, self.config.router_port));
                let Some(shim) = self.shim(src, false).await else {
                    return;
                };
                // A peer that reached this node through a relay is answered through it.
                if !shim.planned || shim.via.is_none() {
                    shim.via = Some(from);
                }
                shim.used = now;
                shim.rx_bytes += inner.len() as u64;
                if let Err(e) = shim.socket.send_to(inner, router).await {
                    debug!(error = %e, "relayed datagram not delivered to the router");
                }
            }
            Ok(Message::Data { dst, .. }) => match self.registry.forward(now, dst, bytes.len()) {
                Ok(to) => {
                    if let Err(e) = self.socket.send_to(bytes, to).await {
                        debug!(error = %e, %to, "relayed datagram not sent");
                    }
                }
                Err(d) => self.count(d),
            },
            Ok(Message::Probe(nonce)) => {
                let answer = wire::encode_answer(&self.config.key, nonce);
                if let Err(e) = self.socket.send_to(&answer, from).await {
                    debug!(error = %e, %from, "probe not answered");
                }
            }
            Ok(Message::Answer(nonce)) => match self.health.get_mut(&from) {
                Some(h) if h.nonce == nonce => h.answered = Some(now),
                _ => self.count(DropReason::Stale),
            },
            Ok(Message::Register(reg)) => {
                let now_ms = crate::control::now_millis();
                match self.registry.register(now, now_ms, from, &reg) {
                    Ok(()) => debug!(node = %base64_key(&reg.key), %from, "relay registration"),
                    Err(d) => self.count(d),
                }
            }
            Err(d) => self.count(d),
        }
    }

    /// A receive on the shim of peer `peer` completed: a WireGuard datagram from the router
    /// goes to the peer's relay; the shim reads on while it is open.
    async fn shim_read(
        &mut self,
        peer: Short,
        socket: Arc<UdpSocket>,
        r: std::io::Result<(Vec<u8>, SocketAddr)>,
    ) {
        let Some(shim) = self
            .shims
            .get_mut(&peer)
            .filter(|s| Arc::ptr_eq(&s.socket, &socket))
        else {
            return;
        };
        let (reading, stop) = AbortHandle::new_pair();
        shim.reading = reading;
        self.reads.push(read_shim(peer, socket, stop));
        let Ok((inner, from)) = r else {
            return;
        };
        // Only the router's own datagrams are relayed.
        if !from.ip().is_loopback() || from.port() != self.config.router_port {
            return;
        }
        self.outbound(peer, &inner).await;
    }

    /// A WireGuard datagram the router sent to the shim of peer `peer`.
    async fn outbound(&mut self, peer: Short, inner: &[u8]) {
        let me = self.me;
        let Some(shim) = self.shims.get_mut(&peer) else {
            return;
        };
        let Some(via) = shim.via else {
            return;
        };
        #[expect(clippy::disallowed_methods, reason = "a driver owns the clock")]
        let now = Instant::now();
        shim.used = now;
        shim.tx_bytes += inner.len() as u64;
        wire::encode_data(&self.config.key, peer, me, inner, &mut self.buf);
        if let Err(e) = self.socket.send_to(&self.buf, via).await {
            debug!(error = %e, relay = %via, "datagram to the relay not sent");
        }
    }

    /// Renews the registrations, expires what is old, closes idle unplanned shims.
    async fn tick(&mut self) {
        #[expect(clippy::disallowed_methods, reason = "a driver owns the clock")]
        let now = Instant::now();
        self.registry.expire(now);
        self.shims
            .retain(|_, s| s.planned || now.saturating_duration_since(s.used) < SHIM_IDLE);
        self.register().await;
    }

    async fn register(&mut self) {
        if self.homes.is_empty() {
            return;
        }
        let reg = Register::sign(&self.config.identity, crate::control::now_millis());
        // Both forms, through a rolling upgrade: a relay from before the MAC reads only the
        // legacy one; a newer relay takes the first and finds the second stale.
        let forms = [reg.encode(&self.config.key), reg.encode_legacy()];
        for home in &self.homes {
            for form in &forms {
                if let Err(e) = self.socket.send_to(form, *home).await {
                    debug!(error = %e, relay = %home, "registration not sent");
                }
            }
        }
    }
}

/// Of shims (short key, planned, last used), the unplanned one used longest ago.
fn oldest_unplanned(shims: impl Iterator<Item = (Short, bool, Instant)>) -> Option<Short> {
    shims
        .filter(|&(_, planned, _)| !planned)
        .min_by_key(|&(_, _, used)| used)
        .map(|(k, _, _)| k)
}

fn base64_key(key: &[u8; 32]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(key)
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::disallowed_methods,
        reason = "tests start their clock from a real instant"
    )]
    use super::*;

    #[test]
    fn a_planned_shim_takes_the_place_of_the_unplanned_one_used_longest_ago() {
        let t = Instant::now();
        let s = Duration::from_secs(1);
        let shims = [
            ([1; 8], true, t),
            ([2; 8], false, t + 3 * s),
            ([3; 8], false, t + s),
            ([4; 8], false, t + 2 * s),
        ];
        // The planned shim used longest ago stays: only unplanned ones give way.
        assert_eq!(oldest_unplanned(shims.into_iter()), Some([3; 8]));
        // Every shim planned: nothing gives way (the new one is refused as full).
        assert_eq!(
            oldest_unplanned(shims.into_iter().map(|(k, _, u)| (k, true, u))),
            None
        );
    }
}
