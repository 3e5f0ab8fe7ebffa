//! Metrics in the Prometheus text format (OpenMetrics flavour, via `prometheus-client`) and the
//! health check, served over HTTP on `metrics_address`.
//!
//! [`render`] is pure: it turns one router snapshot, one mesh snapshot and the IPAM counters
//! into the exposition, with a fresh registry per scrape, so the numbers are exactly the
//! snapshot's. [`serve`] answers `GET /metrics` and `GET /healthz` (503 until the daemon is
//! ready, 200 after) until shutdown.

use crate::relay::service::RelaySnapshot;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::future::{AbortHandle, Abortable};
use futures::{FutureExt as _, StreamExt as _};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tracing::{debug, warn};
use weft_mesh::driver::Snapshot as MeshSnapshot;
use weft_router::driver::Snapshot;

/// What IPAM reports beyond the mesh record.
#[derive(Debug, Default)]
pub struct IpamCounters {
    /// Blocks given up to an older claim.
    pub reclaims: AtomicU64,
    /// Members' pod-CIDR claims refused.
    pub claims: std::sync::Mutex<ClaimsRefused>,
}

/// Members' pod-CIDR claims refused (see [`crate::control::claims`]).
#[derive(Debug, Default)]
pub struct ClaimsRefused {
    /// Refusals by reason, each member's refusal for a reason counted once while it lasts.
    pub by_reason: std::collections::BTreeMap<&'static str, u64>,
    /// The members refused now (mesh id), with why.
    pub current: std::collections::BTreeMap<[u8; 32], String>,
    /// What was counted: (mesh id, reason) of the members refused now (not per version: a
    /// refused member republishing cannot grow it).
    pub counted: std::collections::BTreeSet<([u8; 32], &'static str)>,
    /// The blocks of this node's own certificate that a member's later one names.
    pub own_superseded: Vec<crate::control::claims::OwnSuperseded>,
}

/// Everything a scrape reads.
#[derive(Debug, Clone)]
pub struct Sources {
    /// The router driver.
    pub router: crate::handle::RouterHandle,
    /// The mesh driver, when the mesh is on.
    pub mesh: Option<crate::handle::MeshHandle>,
    /// IPAM's counters.
    pub ipam: Arc<IpamCounters>,
    /// The relay service's state.
    pub relay: crate::relay::service::RelayStats,
    /// The last exposition rendered and when: scrapes within [`REFRESH`] of it get it again,
    /// so scrapers cannot make the data plane copy its peers more often than that.
    pub cache: ScrapeCache,
    /// Set once the daemon is ready.
    pub ready: Arc<AtomicBool>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
    path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerReason {
    peer: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerState {
    peer: String,
    path: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerOnly {
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerFrom {
    worker: String,
    from: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct State {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Stage {
    stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Block {
    block: String,
}

fn counter<L>(reg: &mut Registry, name: &str, help: &str, unit: Option<Unit>) -> Family<L, Counter>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    let f = Family::<L, Counter>::default();
    register(reg, name, help, unit, f.clone());
    f
}

fn gauge<L>(
    reg: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
) -> Family<L, Gauge<f64, AtomicU64>>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    let f = Family::<L, Gauge<f64, AtomicU64>>::default();
    register(reg, name, help, unit, f.clone());
    f
}

fn register(
    reg: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    m: impl prometheus_client::registry::Metric,
) {
    match unit {
        Some(u) => reg.register_with_unit(name, help, u, m),
        None => reg.register(name, help, m),
    }
}

/// A counter without labels, at `value`.
fn plain_counter(reg: &mut Registry, name: &str, help: &str, unit: Option<Unit>, value: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(value);
    register(reg, name, help, unit, c);
}

/// A gauge without labels, at `value`.
fn plain_gauge(reg: &mut Registry, name: &str, help: &str, value: f64) {
    let g = Gauge::<f64, AtomicU64>::default();
    g.set(value);
    register(reg, name, help, None, g);
}

/// The exposition for one router snapshot, the mesh's (when on) and IPAM's counters.
pub fn render(router: &Snapshot, mesh: Option<&MeshSnapshot>, ipam: &IpamCounters) -> String {
    render_all(router, mesh, ipam, None)
}

/// As [`render`], with the relay service's state (when the mesh is on).
pub fn render_all(
    router: &Snapshot,
    mesh: Option<&MeshSnapshot>,
    ipam: &IpamCounters,
    relay: Option<&RelaySnapshot>,
) -> String {
    let mut reg = Registry::default();
    if let Some(r) = relay {
        render_relay(&mut reg, router, r);
    }
    render_peers(&mut reg, router);
    render_drops(&mut reg, router);
    render_workers(&mut reg, router);
    plain_counter(
        &mut reg,
        "weft_ipam_reclaims",
        "Pod blocks given up to an older claim and claimed anew",
        None,
        ipam.reclaims.load(Ordering::Relaxed),
    );
    if let Some(m) = mesh {
        render_members(&mut reg, m);
        render_gossip(&mut reg, m);
        render_refusals(&mut reg, m, ipam);
        render_certificate(&mut reg, m, ipam);
    }
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &reg) {
        warn!(error = %e, "encoding metrics failed");
    }
    out
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabel {
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

/// Relaying: each relayed peer's bytes through its relay, and on a relay the bytes forwarded
/// to each registered node and what was dropped. Names come from the router's peers (a key it
/// does not know is shown in base64).
fn render_relay(reg: &mut Registry, router: &Snapshot, relay: &RelaySnapshot) {
    let name = |key: &[u8; 32]| {
        router
            .peers
            .iter()
            .find(|p| p.config.public_key == *key)
            .map_or_else(|| crate::host::keys::encode(key), |p| p.config.name.clone())
    };
    let tx = counter::<NodeLabel>(
        reg,
        "weft_peer_relayed_transmit",
        "Bytes of a peer's WireGuard datagrams sent through its relay",
        Some(Unit::Bytes),
    );
    let rx = counter::<NodeLabel>(
        reg,
        "weft_peer_relayed_receive",
        "Bytes of a peer's WireGuard datagrams received through a relay",
        Some(Unit::Bytes),
    );
    for p in &relay.peers {
        let node = p.key.as_ref().map_or_else(
            || p.short.iter().map(|b| format!("{b:02x}")).collect(),
            name,
        );
        tx.get_or_create(&NodeLabel { node: node.clone() })
            .inc_by(p.tx_bytes);
        rx.get_or_create(&NodeLabel { node }).inc_by(p.rx_bytes);
    }
    let fwd = counter::<NodeLabel>(
        reg,
        "weft_relay_forwarded",
        "Bytes this node relayed to each node registered with it",
        Some(Unit::Bytes),
    );
    for r in &relay.registered {
        fwd.get_or_create(&NodeLabel { node: name(&r.key) })
            .inc_by(r.bytes);
    }
    let drops = counter::<ReasonLabel>(
        reg,
        "weft_relay_drops",
        "Datagrams dropped on the relay port, by reason",
        None,
    );
    for (reason, n) in &relay.drops {
        drops
            .get_or_create(&ReasonLabel {
                reason: (*reason).to_owned(),
            })
            .inc_by(*n);
    }
}

/// Per-peer traffic, drops, handshake age and state.
fn render_peers(reg: &mut Registry, router: &Snapshot) {
    let rx_bytes = counter::<PeerLabels>(
        reg,
        "weft_peer_receive",
        "Bytes received from the peer (datagrams, before decryption)",
        Some(Unit::Bytes),
    );
    let tx_bytes = counter::<PeerLabels>(
        reg,
        "weft_peer_transmit",
        "Bytes sent to the peer (datagrams, after encryption)",
        Some(Unit::Bytes),
    );
    let rx_packets = counter::<PeerLabels>(
        reg,
        "weft_peer_receive_packets",
        "Packets from the peer delivered to the TUN device",
        None,
    );
    let tx_packets = counter::<PeerLabels>(
        reg,
        "weft_peer_transmit_packets",
        "Packets from the TUN device sent to the peer",
        None,
    );
    let peer_drops = counter::<PeerReason>(
        reg,
        "weft_peer_drops",
        "Packets to or from the peer dropped, by reason",
        None,
    );
    let handshake_age = gauge::<PeerOnly>(
        reg,
        "weft_peer_handshake_age",
        "Time since the last completed WireGuard handshake with the peer",
        Some(Unit::Seconds),
    );
    let state = gauge::<PeerState>(
        reg,
        "weft_peer_state",
        "1 for the peer's current path (encrypted or plaintext) and state",
        None,
    );
    for p in &router.peers {
        let l = PeerLabels {
            peer: p.config.name.clone(),
            path: p.config.path.as_str().to_owned(),
        };
        rx_bytes.get_or_create(&l).inc_by(p.counters.rx_bytes);
        tx_bytes.get_or_create(&l).inc_by(p.counters.tx_bytes);
        rx_packets.get_or_create(&l).inc_by(p.counters.rx_packets);
        tx_packets.get_or_create(&l).inc_by(p.counters.tx_packets);
        for (reason, n) in p.counters.drops.labelled() {
            peer_drops
                .get_or_create(&PeerReason {
                    peer: l.peer.clone(),
                    reason: reason.to_owned(),
                })
                .inc_by(n);
        }
        if let Some(age) = p.last_handshake {
            handshake_age
                .get_or_create(&PeerOnly {
                    peer: l.peer.clone(),
                })
                .set(age.as_secs_f64());
        }
        state
            .get_or_create(&PeerState {
                peer: l.peer.clone(),
                path: l.path.clone(),
                state: p.state.as_str().to_owned(),
            })
            .set(1.0);
    }
}

/// Each data-path worker's packets: how the TUN queues and the socket group spread the load;
/// and the send turns taken over from a stalled worker.
fn render_workers(reg: &mut Registry, router: &Snapshot) {
    plain_counter(
        reg,
        "weft_router_send_turn_takeovers",
        "Send turns taken over from a data-path worker that held a peer's for over 2 ms between encrypting and sending (preempted, or waiting on a full socket)",
        None,
        router.send_turn_takeovers,
    );
    let family = counter::<WorkerFrom>(
        reg,
        "weft_router_worker_packets",
        "Packets each data-path worker took in, from its TUN queue (tun) or its UDP socket (network)",
        None,
    );
    for (i, w) in router.workers.iter().enumerate() {
        for (from, n) in [("tun", w.tun_packets), ("network", w.datagrams)] {
            family
                .get_or_create(&WorkerFrom {
                    worker: i.to_string(),
                    from: from.into(),
                })
                .inc_by(n);
        }
    }
}

/// Packets dropped before a peer was known.
fn render_drops(reg: &mut Registry, router: &Snapshot) {
    let drops = counter::<Reason>(
        reg,
        "weft_drops",
        "Packets dropped before a peer was known, by reason",
        None,
    );
    for (reason, n) in router.drops.labelled() {
        drops
            .get_or_create(&Reason {
                reason: reason.to_owned(),
            })
            .inc_by(n);
    }
    for (reason, n) in router.io_drops() {
        drops
            .get_or_create(&Reason {
                reason: reason.into(),
            })
            .inc_by(n);
    }
}

/// This node's blocks and the other members by state.
fn render_members(reg: &mut Registry, m: &MeshSnapshot) {
    let blocks = gauge::<Block>(
        reg,
        "weft_ipam_block",
        "1 for each pod block this node holds",
        None,
    );
    for b in &m.record.pod_cidrs {
        blocks
            .get_or_create(&Block {
                block: b.to_string(),
            })
            .set(1.0);
    }
    let members = gauge::<State>(
        reg,
        "weft_mesh_members",
        "Other mesh members, by state",
        None,
    );
    let (mut alive, mut down, mut left) = (0.0, 0.0, 0.0);
    for x in &m.members {
        match (x.record.left, x.alive) {
            (true, _) => left += 1.0,
            (false, true) => alive += 1.0,
            (false, false) => down += 1.0,
        }
    }
    for (s, n) in [("alive", alive), ("down", down), ("left", left)] {
        members.get_or_create(&State { state: s.into() }).set(n);
    }
}

/// With `mesh.authority`: when this node's certificate ends, and how many of its blocks a
/// member's later certificate names (non-zero: the others route them there, not here).
fn render_certificate(reg: &mut Registry, m: &MeshSnapshot, ipam: &IpamCounters) {
    let Some(cert) = &m.record.certificate else {
        return;
    };
    plain_gauge(
        reg,
        "weft_node_certificate_not_after_seconds",
        "When this node's certificate (mesh.certificate) ends, seconds since the epoch: alert well before it, as the others stop routing this node then",
        cert.not_after as f64 / 1e3,
    );
    let superseded = ipam.claims.lock().map_or(0, |c| c.own_superseded.len());
    plain_gauge(
        reg,
        "weft_node_certificate_superseded_blocks",
        "Blocks of this node's certificate that a member's later-issued certificate names: the others route them to that member, not here",
        superseded as f64,
    );
}

/// Gossip connections and traffic.
fn render_gossip(reg: &mut Registry, m: &MeshSnapshot) {
    plain_gauge(
        reg,
        "weft_mesh_connections",
        "Open gossip connections",
        m.connections as f64,
    );
    let closed = counter::<Reason>(
        reg,
        "weft_mesh_connections_closed",
        "Gossip connections closed by weft, by reason: refused while too many were still proving the secret (pending_cap), silent or not reading (timeout)",
        None,
    );
    for (reason, n) in [
        ("pending_cap", m.transport.pending_refused),
        ("timeout", m.transport.timed_out),
    ] {
        closed
            .get_or_create(&Reason {
                reason: reason.into(),
            })
            .inc_by(n);
    }
    plain_counter(
        reg,
        "weft_mesh_gossip_sent",
        "Gossip frame bytes sent (before encryption)",
        Some(Unit::Bytes),
        m.traffic.bytes_sent,
    );
    plain_counter(
        reg,
        "weft_mesh_gossip_received",
        "Gossip frame bytes received (after decryption)",
        Some(Unit::Bytes),
        m.traffic.bytes_received,
    );
}

/// Gossip refused: failed authentication, rejected frames and records, precise reasons.
fn render_refusals(reg: &mut Registry, m: &MeshSnapshot, ipam: &IpamCounters) {
    let auth = counter::<Stage>(
        reg,
        "weft_mesh_authentication_failures",
        "Gossip refused for failed authentication: the connection handshake (no or wrong cluster secret), its confirmation (a replayed first message: no first frame that decrypts), a message that did not decrypt, a record whose signature did not verify",
        None,
    );
    for (stage, n) in [
        ("handshake", m.transport.handshake_failed),
        ("confirmation", m.transport.unconfirmed),
        ("message", m.transport.undecryptable),
        ("record", m.drops.unauthenticated),
    ] {
        auth.get_or_create(&Stage {
            stage: stage.into(),
        })
        .inc_by(n);
    }
    let rejected = counter::<Reason>(
        reg,
        "weft_mesh_records_rejected",
        "Gossip frames or records refused, by reason",
        None,
    );
    for (reason, n) in m.drops.coarse() {
        rejected
            .get_or_create(&Reason {
                reason: reason.into(),
            })
            .inc_by(n);
    }
    let precise = counter::<Reason>(
        reg,
        "weft_mesh_rejected",
        "Gossip input refused, by precise reason: frames, records and beats the gossip core refused, and members' pod-CIDR claims refused (claim_*)",
        None,
    );
    for (reason, n) in rejections(m, ipam) {
        precise.get_or_create(&Reason { reason }).inc_by(n);
    }
}

/// Every refusal of the mesh with a non-zero count, by precise reason: the gossip core's and
/// the claims' (`claim_` and the claim reason). `weft_mesh_rejected` and the status report list
/// the same.
pub fn rejections(m: &MeshSnapshot, ipam: &IpamCounters) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = m
        .drops
        .rejected
        .labelled()
        .map(|(r, n)| (r.to_owned(), n))
        .collect();
    if let Ok(c) = ipam.claims.lock() {
        out.extend(c.by_reason.iter().map(|(r, n)| (format!("claim_{r}"), *n)));
    }
    out
}

async fn handle(req: Request<Incoming>, src: Sources) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |code: StatusCode, ctype: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = code;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(ctype),
        );
        Ok(r)
    };
    if req.method() != Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET\n".into(),
        );
    }
    match req.uri().path() {
        "/healthz" => {
            if src.ready.load(Ordering::Acquire) {
                reply(StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into())
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain; charset=utf-8",
                    "starting\n".into(),
                )
            }
        }
        "/metrics" => {
            let Some(text) = exposition(&src).await else {
                return reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain; charset=utf-8",
                    "the data plane is stopping\n".into(),
                );
            };
            reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            )
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: try /metrics or /healthz\n".into(),
        ),
    }
}

/// The last exposition rendered, and when.
pub type ScrapeCache = Arc<tokio::sync::Mutex<Option<(std::time::Instant, String)>>>;

/// How long a rendered exposition is served again.
pub const REFRESH: Duration = Duration::from_secs(1);
/// How long a connection may take to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection may stay open at all.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Connections served at once; at the cap a new one is served in place of the one idle longest
/// (see [`serve`]).
pub const MAX_CONNECTIONS: usize = 32;

/// Answers HTTP/1 requests on one connection, closing it when its headers take longer than
/// [`HEADER_TIMEOUT`] or it lives longer than [`CONNECTION_LIFETIME`].
pub async fn serve_connection<I>(io: I, src: Sources)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    serve_tracked(io, src, Arc::new(Activity::new(Arc::default()))).await;
}

/// [`serve_connection`], keeping `activity` up to date.
async fn serve_tracked<I>(io: I, src: Sources, activity: Arc<Activity>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = hyper_util::rt::TokioIo::new(io);
    let svc = hyper::service::service_fn(move |req| {
        let (src, activity) = (src.clone(), activity.clone());
        activity.mark(true);
        async move {
            let response = handle(req, src).await;
            activity.mark(false);
            response
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(io, svc);
    match tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
        Ok(Err(e)) => debug!(error = %e, "metrics connection ended"),
        Ok(Ok(())) => {}
        Err(_) => debug!("metrics connection closed after its lifetime"),
    }
}

/// How one open connection is used, on [`serve`]'s own count of changes rather than a clock:
/// whether a request is being answered on it, and since which change.
#[derive(Debug)]
struct Activity {
    /// The count of changes, shared by the server's connections.
    changes: Arc<AtomicU64>,
    /// A request is being answered: its headers are read and its response is not made yet.
    busy: AtomicBool,
    /// The change that put the connection in its state (accepted, busy or idle).
    since: AtomicU64,
}

impl Activity {
    /// A connection just accepted: idle.
    fn new(changes: Arc<AtomicU64>) -> Self {
        let a = Self {
            changes,
            busy: AtomicBool::new(false),
            since: AtomicU64::new(0),
        };
        a.mark(false);
        a
    }

    fn mark(&self, busy: bool) {
        let now = self.changes.fetch_add(1, Ordering::Relaxed);
        self.since.store(now, Ordering::Relaxed);
        self.busy.store(busy, Ordering::Relaxed);
    }

    /// Which connection to close first: the least of these. Idle ones go before busy ones,
    /// and among them the one in that state longest.
    fn rank(&self) -> (bool, u64) {
        (
            self.busy.load(Ordering::Relaxed),
            self.since.load(Ordering::Relaxed),
        )
    }
}

/// The exposition: the cached one when younger than [`REFRESH`], else a new one from the
/// drivers' snapshots. `None` when the data plane is stopping.
async fn exposition(src: &Sources) -> Option<String> {
    let mut cache = src.cache.lock().await;
    #[expect(clippy::disallowed_methods, reason = "the metrics server is a driver")]
    let now = std::time::Instant::now();
    if let Some((at, text)) = cache.as_ref()
        && now.saturating_duration_since(*at) < REFRESH
    {
        return Some(text.clone());
    }
    let snap = src.router.snapshot().await?;
    let mesh = match &src.mesh {
        Some(m) => m.snapshot().await,
        None => None,
    };
    let relay = src.relay.lock().map(|r| r.clone()).ok();
    let text = render_all(
        &snap,
        mesh.as_ref(),
        &src.ipam,
        relay.as_ref().filter(|_| mesh.is_some()),
    );
    *cache = Some((now, text.clone()));
    Some(text)
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown` turns true, at most
/// [`MAX_CONNECTIONS`] connections at once. At the cap a new connection is still served: the
/// one idle longest is closed for it (one inside a request only when every one is), so clients
/// holding every slot cannot keep the liveness probe from an answer. The connections run inside
/// this future (no task of their own), so they end with it.
pub async fn serve(listener: TcpListener, src: Sources, mut shutdown: crate::shutdown::Shutdown) {
    let changes = Arc::new(AtomicU64::new(0));
    // Each connection's future ends with its number; `open` and `slots` hold the same ones.
    let mut open = futures::stream::FuturesUnordered::new();
    let mut slots = std::collections::BTreeMap::<u64, (AbortHandle, Arc<Activity>)>::new();
    let mut next = 0u64;
    loop {
        tokio::select! {
            () = shutdown.wait() => return,
            Some(n) = open.next(), if !open.is_empty() => {
                slots.remove(&n);
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if open.len() >= MAX_CONNECTIONS {
                        make_room(&mut open, &mut slots).await;
                        debug!(%peer, "metrics connection idle longest closed: {MAX_CONNECTIONS} open");
                    }
                    let activity = Arc::new(Activity::new(changes.clone()));
                    let (abort, registration) = AbortHandle::new_pair();
                    let conn = serve_tracked(stream, src.clone(), activity.clone());
                    let n = next;
                    next += 1;
                    open.push(Abortable::new(conn, registration).map(move |_| n));
                    slots.insert(n, (abort, activity));
                }
                Err(e) => warn!(error = %e, "metrics accept failed"),
            }
        }
    }
}

/// Closes the connection [`Activity::rank`] puts first and waits until `open` has room (the
/// closed one is dropped, its socket with it).
async fn make_room<F>(
    open: &mut futures::stream::FuturesUnordered<F>,
    slots: &mut std::collections::BTreeMap<u64, (AbortHandle, Arc<Activity>)>,
) where
    F: Future<Output = u64>,
{
    let first = slots
        .iter()
        .min_by_key(|(_, (_, activity))| activity.rank())
        .map(|(n, _)| *n);
    if let Some((abort, _)) = first.and_then(|n| slots.remove(&n)) {
        abort.abort();
    }
    // The aborted future ends at its next poll; others may end first.
    while open.len() >= MAX_CONNECTIONS {
        match open.next().await {
            Some(n) => {
                slots.remove(&n);
            }
            None => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::sync::mpsc;
    use weft_router::driver::Command;

    use super::*;

    /// A router that answers one status request per call with an empty snapshot.
    fn sources(ready: bool) -> (Sources, mpsc::Receiver<Command>) {
        let (router, rx) = crate::handle::RouterHandle::channel();
        let src = Sources {
            router,
            mesh: None,
            ipam: Arc::new(IpamCounters::default()),
            relay: crate::relay::service::RelayStats::default(),
            ready: Arc::new(AtomicBool::new(ready)),
            cache: ScrapeCache::default(),
        };
        (src, rx)
    }

    /// A router answering every status request with an empty snapshot, counting them.
    fn answer(rx: mpsc::Receiver<Command>) -> Arc<AtomicU64> {
        answer_with(rx, 0, 0)
    }

    /// Likewise, with `send` send errors and `tun_write` failed TUN writes.
    fn answer_with(mut rx: mpsc::Receiver<Command>, send: u64, tun_write: u64) -> Arc<AtomicU64> {
        let asked = Arc::new(AtomicU64::new(0));
        let n = asked.clone();
        tokio::spawn(async move {
            while let Some(Command::Status(reply)) = rx.recv().await {
                n.fetch_add(1, Ordering::Relaxed);
                let _ = reply.send(Snapshot {
                    public_key: [0; 32],
                    peers: Vec::new(),
                    drops: weft_router::Drops::default(),
                    send_errors: send,
                    tun_write_errors: tun_write,
                    workers: Vec::new(),
                    send_turn_takeovers: 0,
                });
            }
        });
        asked
    }

    /// The data path's own losses are drops by reason: sends the network refused and TUN
    /// writes the kernel refused.
    #[tokio::test]
    async fn send_errors_and_failed_tun_writes_are_drops_by_reason() {
        let (src, rx) = sources(true);
        answer_with(rx, 3, 2);
        let body = get(src, "/metrics").await;
        assert!(body.contains("reason=\"send_error\"} 3"), "{body}");
        assert!(body.contains("reason=\"tun_write_error\"} 2"), "{body}");
    }

    #[tokio::test]
    async fn scrapes_in_a_burst_ask_the_data_plane_once() {
        let (src, rx) = sources(true);
        let asked = answer(rx);
        for _ in 0..20 {
            assert!(
                get(src.clone(), "/metrics")
                    .await
                    .starts_with("HTTP/1.1 200")
            );
        }
        // 20 scrapes well within REFRESH (one render each would be 20 snapshots).
        assert!(asked.load(Ordering::Relaxed) <= 2, "{asked:?}");
    }

    #[tokio::test]
    async fn a_connection_that_never_sends_its_headers_is_closed() {
        let (src, _rx) = sources(true);
        let (mut client, server) = tokio::io::duplex(1 << 10);
        let task = tokio::spawn(serve_connection(server, src));
        client
            .write_all(b"GET /metrics HTTP/1.1\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        // hyper's timer fires after HEADER_TIMEOUT and the server hangs up.
        tokio::time::timeout(HEADER_TIMEOUT * 2, client.read_to_end(&mut buf))
            .await
            .expect("closed within twice the header timeout")
            .unwrap();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("the connection task ends")
            .unwrap();
    }

    #[tokio::test]
    async fn the_server_ends_when_the_shutdown_sender_is_dropped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (src, _rx) = sources(true);
        let (stop, rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(serve(listener, src, rx.into()));
        drop(stop);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the metrics server ends once the daemon's sender is gone")
            .unwrap();
    }

    /// How long a test waits for the server before it fails.
    const DEADLINE: Duration = Duration::from_secs(5);

    /// The status line of the answer to `GET path` on `c`, a kept-alive connection; `None`
    /// when the server closed it instead (end of stream or reset), within [`DEADLINE`].
    async fn ask(c: &mut tokio::net::TcpStream, path: &str) -> Option<String> {
        let _ = c
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await;
        let mut b = [0u8; 12];
        tokio::time::timeout(DEADLINE, c.read_exact(&mut b))
            .await
            .expect("answered or closed within the deadline")
            .ok()?;
        // The rest of the answer ("ok\n" after the headers): the connection is idle again.
        let mut rest = Vec::new();
        while !rest.ends_with(b"\r\n\r\nok\n") {
            let mut byte = [0u8; 1];
            tokio::time::timeout(DEADLINE, c.read_exact(&mut byte))
                .await
                .expect("the whole answer within the deadline")
                .ok()?;
            rest.push(byte[0]);
        }
        Some(String::from_utf8_lossy(&b).into_owned())
    }

    /// A metrics server on a loopback port, ready; it runs until the test ends.
    async fn server() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (src, _rx) = sources(true);
        let (stop, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            serve(listener, src, rx.into()).await;
            drop(stop);
        });
        addr
    }

    /// Was `connections_beyond_the_cap_are_closed_at_once`: a new connection at the cap is now
    /// served, and the connection idle longest is closed for it, so the cap still holds.
    #[tokio::test]
    async fn at_the_cap_a_new_connection_replaces_the_one_idle_longest() {
        let addr = server().await;
        let mut open = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            // A request answered shows the server holds this connection.
            assert_eq!(
                ask(&mut c, "/healthz").await.as_deref(),
                Some("HTTP/1.1 200")
            );
            open.push(c);
        }
        // Each newcomer is served; the oldest idle one goes: the first, then the second, ...
        for i in 0..MAX_CONNECTIONS + 3 {
            let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
            let answer = ask(&mut extra, "/healthz").await;
            assert_eq!(answer.as_deref(), Some("HTTP/1.1 200"), "newcomer {i}");
            open.push(extra);
        }
        // Asking every connection again (no new ones: nothing more is closed) finds exactly
        // the newest MAX_CONNECTIONS open.
        let mut served = Vec::new();
        for (i, c) in open.iter_mut().enumerate() {
            if ask(c, "/healthz").await.is_some() {
                served.push(i);
            }
        }
        let newest: Vec<usize> = (MAX_CONNECTIONS + 3..2 * MAX_CONNECTIONS + 3).collect();
        assert_eq!(served, newest);
    }

    /// A local process holding every slot with idle kept-alive connections (here: connected,
    /// silent) cannot keep the kubelet's liveness probe from being answered.
    #[tokio::test]
    async fn healthz_is_answered_while_idle_connections_hold_every_slot() {
        let addr = server().await;
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // Accepted in order: the probe comes after all of them.
        let mut probe = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert_eq!(
            ask(&mut probe, "/healthz").await.as_deref(),
            Some("HTTP/1.1 200"),
            "the probe was closed unanswered"
        );
        drop(held);
    }

    async fn get(src: Sources, path: &str) -> String {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn(serve_connection(server, src));
        client
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        let mut out = String::new();
        client.read_to_string(&mut out).await.unwrap();
        task.await.unwrap();
        out
    }

    #[tokio::test]
    async fn healthz_is_503_until_ready_then_200() {
        let (src, _rx) = sources(false);
        assert!(
            get(src.clone(), "/healthz")
                .await
                .starts_with("HTTP/1.1 503")
        );
        src.ready.store(true, Ordering::Release);
        assert!(
            get(src.clone(), "/healthz")
                .await
                .starts_with("HTTP/1.1 200")
        );
        assert!(get(src, "/nope").await.starts_with("HTTP/1.1 404"));
    }
}
