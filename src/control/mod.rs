//! The control loop: the mesh's view turned into router peers, and what status shows of both.
//!
//! The reconcile task runs on every membership event and on a periodic resync: it asks the mesh
//! for its members and the router for its peers, computes the desired peers
//! ([`reconcile::desired`]) and applies the difference ([`reconcile::diff`]) as peer additions
//! and removals; a peer whose configuration did not change is never touched.

pub mod blocks;
pub mod claims;
pub mod k8s;
pub mod nodesource;
pub mod observed;
pub mod reconcile;
pub mod relays;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};
use weft_config::Config;
use weft_ipam::{SavedBlock, Snapshot};
use weft_mesh::driver::Snapshot as MeshSnapshot;
use weft_mesh::{Event, NodeRecord};
use weft_router::PeerConfig;

use self::reconcile::{Change, Choices, Reason};
use crate::control::blocks::{BlockEvent, Blocks};
use crate::control::claims::{ClaimHistory, ClaimPolicy};
use crate::handle::{MeshHandle, RouterHandle};
use crate::host::keys;

/// How often the reconciler resyncs without an event.
const RESYNC: Duration = Duration::from_secs(1);

/// What status shows of a mesh peer beyond the router's view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Its region.
    pub region: Option<String>,
    /// Why its endpoint.
    pub reason: Reason,
    /// The relay that reaches it, by name, when it has a relay shim (the endpoint in use
    /// says whether it goes through it).
    pub via: Option<String>,
    /// Why it cannot be reached unless a direct path comes up: both ends are behind NAT and
    /// no relay can carry it.
    pub unreachable: Option<String>,
}

/// A relayed peer's direct candidates to probe: its router id, name and the addresses.
type Probe = (weft_router::PeerId, String, Vec<std::net::SocketAddr>);

/// What one round's look at the paths gives ([`Reconciler::observe_paths`]).
#[derive(Debug, Default)]
struct Paths {
    /// Each member's number of endpoint candidates, by WireGuard key.
    cands: HashMap<[u8; 32], usize>,
    /// The relayed peers whose direct candidates are due a probe.
    probes: Vec<Probe>,
    /// The peers whose direct path failed, going back to their relay shim (session kept).
    back: BTreeMap<[u8; 32], std::net::SocketAddr>,
}

/// Mesh peer details for status, by WireGuard key.
pub type PeerInfos = Arc<Mutex<HashMap<[u8; 32], PeerInfo>>>;

/// Reads the cluster secret: `Ok(None)` when the file is absent and no bootstrap peers are
/// configured (a node without a mesh), an error naming the file otherwise.
pub fn load_secret(config: &Config, origin: &Path) -> anyhow::Result<Option<[u8; 32]>> {
    let path = &config.mesh.secret_file;
    // Refused, naming the file, when its group or others may read it.
    match keys::read_private(path) {
        Ok(text) => Ok(Some(keys::decode(
            &text,
            &format!("mesh.secret_file {}", path.display()),
        )?)),
        Err(keys::KeyError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound && config.mesh.peers.is_empty() =>
        {
            info!(path = %path.display(), "no cluster secret: the mesh is off, only wireguard_peers are used");
            Ok(None)
        }
        Err(keys::KeyError::Io { source, .. }) => bail!(
            "{}: mesh.secret_file: cannot read {}: {source} (create one with `(umask 077; weft gensecret > {})`)",
            origin.display(),
            path.display(),
            path.display()
        ),
        Err(e) => bail!("{}: mesh.secret_file: {e}", origin.display()),
    }
}

/// Milliseconds since the epoch on this node's clock.
pub fn now_millis() -> u64 {
    #[expect(
        clippy::disallowed_methods,
        reason = "the daemon is a driver: it owns the clock"
    )]
    let now = SystemTime::now();
    now.duration_since(UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// This node's record for the mesh, versioned by the wall clock so a restarted node's record
/// outranks its earlier life's (only the origin ever compares its own versions).
pub fn own_record(config: &Config, wireguard_key: [u8; 32], blocks: &[SavedBlock]) -> NodeRecord {
    NodeRecord {
        version: now_millis(),
        left: false,
        name: config.node.name.clone(),
        region: config.node.region.clone(),
        private_address: config.node.private_address,
        public_address: config.node.public_address,
        mesh_port: config.mesh.port,
        router_port: config.router.port,
        wireguard_key,
        pod_cidrs: blocks.iter().map(|b| b.block).collect(),
        claimed_at: blocks.iter().map(|b| b.since).collect(),
        trusted_subnets: config.network.trusted_subnets.clone(),
        observed: Vec::new(),
        homes: None,
        certificate: None,
    }
}

/// Binds the gossip listener on `port`, dual-stack when the host has IPv6.
pub async fn bind_gossip(port: u16) -> anyhow::Result<TcpListener> {
    match TcpListener::bind(("::", port)).await {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            Err(e).with_context(|| format!("binding TCP port {port} (mesh.port)"))
        }
        Err(_) => TcpListener::bind(("0.0.0.0", port))
            .await
            .with_context(|| format!("binding TCP port {port} (mesh.port)")),
    }
}

/// What the reconciler takes besides the mesh.
#[derive(Debug)]
pub struct Inputs {
    /// The configured `wireguard_peers` (a reload changes them).
    pub statics: watch::Receiver<Vec<PeerConfig>>,
    /// With Kubernetes, the cluster's Nodes by name with their `spec.podCIDRs`: a member whose
    /// Node is gone is not routed, even while its daemon still gossips, and a member's claims
    /// must be its Node's. `None` without Kubernetes.
    pub cluster: Option<watch::Receiver<Option<ClusterNodes>>>,
    /// Which members' pod-CIDR claims are believed.
    pub claims: ClaimPolicy,
    /// The relay service (with the mesh).
    pub relay: Option<crate::relay::service::RelayHandle>,
    /// Which members relay (`mesh.relay`).
    pub relay_policy: relays::Policy,
}

/// The cluster's Nodes by name.
pub type ClusterNodes = BTreeMap<String, ClusterNode>;

/// What the claims are checked against on another Node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterNode {
    /// Its `spec.podCIDRs`.
    pub pod_cidrs: Vec<ipnet::IpNet>,
    /// The WireGuard key its weft daemon published (`weft.dev/public-key`), as written: only
    /// the member with this key is that Node (a name in a record is only what its signer says).
    pub key: Option<String>,
}

/// Drops from `snap` the members whose pod-CIDR claims are not believed (so neither IPAM nor
/// the router sees them), counts each refusal once while it lasts (per member and reason), and
/// publishes the current refusals for the status report.
fn vet_claims(
    policy: &ClaimPolicy,
    history: &mut ClaimHistory,
    snap: &mut MeshSnapshot,
    nodes: Option<&ClusterNodes>,
    counters: &crate::api::metrics::IpamCounters,
) {
    let members = std::mem::take(&mut snap.members);
    let (kept, mut refused) = policy.vet(history, members, nodes, now_millis());
    let own = snap.record.certificate.as_deref();
    let (kept, superseded, own) = policy.supersede(history, kept, own, now_millis());
    refused.extend(superseded);
    snap.members = kept;
    let Ok(mut seen) = counters.claims.lock() else {
        return;
    };
    for o in &own {
        if !seen.own_superseded.contains(o) {
            error!(block = %o.block, member = %o.member, issued_at_ms = o.issued_at, "this node's certificate is superseded: the authority issued the member a later certificate for this block, and the other nodes route it there and refuse this node's claims; if the block moved on purpose, sign this node a certificate without it and restart (renewing the old one would take the block back)");
        }
    }
    seen.own_superseded = own;
    seen.current.clear();
    for (m, why) in refused {
        let key = (m.id.0, why.reason());
        if seen.counted.insert(key) {
            *seen.by_reason.entry(why.reason()).or_default() += 1;
            warn!(member = %m.record.name, version = m.record.version, reason = %why, "mesh member's pod-CIDR claims refused: not routed");
        }
        seen.current.insert(m.id.0, why.to_string());
    }
    let live: BTreeSet<[u8; 32]> = seen.current.keys().copied().collect();
    seen.counted.retain(|(id, ..)| live.contains(id));
}

/// Keeps the router's peers in line with the mesh, and this node's blocks with the others'
/// claims, until `shutdown`: on each membership event, change of `wireguard_peers`, or
/// a periodic resync, one round: gather, decide, apply.
pub async fn reconcile_loop(
    inputs: Inputs,
    router: RouterHandle,
    mesh: MeshHandle,
    mut events: mpsc::UnboundedReceiver<Event>,
    infos: PeerInfos,
    ipam: Ipam,
    mut shutdown: crate::shutdown::Shutdown,
) {
    let history_file = ipam.state_file.with_file_name("claims.json");
    let mut r = Reconciler {
        history: load_history(&history_file),
        history_file,
        history_saved: None,
        inputs,
        router,
        mesh,
        infos,
        ipam,
        choices: Choices::default(),
        warned: BTreeSet::new(),
        observations: observed::Observations::default(),
        telling: observed::Telling::default(),
        publishing: observed::Publishing::default(),
        relays_down: Vec::new(),
        homes: relays::HomeRelays::default(),
        stranded: HashMap::new(),
        own: observed::Own::default(),
    };
    loop {
        tokio::select! {
            () = shutdown.wait() => {
                r.save_history(true);
                return;
            }
            Some(e) = events.recv() => {
                r.event(e).await;
                while let Ok(e) = events.try_recv() {
                    r.event(e).await;
                }
            }
            Ok(()) = r.inputs.statics.changed() => debug!("wireguard_peers changed"),
            () = tokio::time::sleep(RESYNC) => {}
        }
        if !r.round().await {
            return;
        }
    }
}

impl Reconciler {
    /// Saves the claim history when it changed, at most every [`HISTORY_SAVE_EVERY`] (or now,
    /// with `force`, at shutdown); a failed save is tried again later.
    fn save_history(&mut self, force: bool) {
        #[expect(clippy::disallowed_methods, reason = "the control loop is a driver")]
        let now = std::time::Instant::now();
        let due = self
            .history_saved
            .is_none_or(|t| now.saturating_duration_since(t) >= HISTORY_SAVE_EVERY);
        if !(force || due) || !self.history.take_dirty() {
            return;
        }
        self.history_saved = Some(now);
        let certs = certificates_file(&self.history_file);
        for (path, text) in [
            (&self.history_file, self.history.to_json()),
            (&certs, self.history.certificates_to_json()),
        ] {
            if let Err(e) = crate::host::files::write_atomic(path, text.as_bytes()) {
                self.history.set_dirty();
                warn!(path = %path.display(), error = %e, "could not save the claim history; trying again later");
            }
        }
    }
}

/// How often the claim history is saved at most, while it changes.
const HISTORY_SAVE_EVERY: Duration = Duration::from_secs(30);

/// Where the certificates behind the claim history are kept, beside it.
fn certificates_file(history: &Path) -> std::path::PathBuf {
    history.with_file_name("certificates.json")
}

/// The claim history saved at `path`, with the certificates saved beside it; empty (saying
/// why) when there is none or it cannot be read: a lost history only means this node judges
/// back-dating afresh, and relearns the latest certificates from the mesh.
fn load_history(path: &Path) -> ClaimHistory {
    let mut history = load_claims(path);
    let certs = certificates_file(path);
    match std::fs::read_to_string(&certs) {
        Ok(text) => match history.load_certificates(&text) {
            Ok(skipped) => {
                for why in skipped {
                    warn!(path = %certs.display(), entry = %why, "a saved certificate is unreadable; skipped");
                }
            }
            Err(e) => {
                // Kept aside for a look, not overwritten by the next save.
                let aside = certs.with_extension("json.corrupt");
                let kept = std::fs::rename(&certs, &aside).is_ok();
                warn!(path = %certs.display(), error = %e, kept_as = %if kept { aside.display().to_string() } else { "-".into() }, "the saved certificates are unreadable; starting without them");
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            warn!(path = %certs.display(), error = %e, "could not read the saved certificates; starting without them");
        }
    }
    history
}

/// The claim history saved at `path` (without the certificates).
fn load_claims(path: &Path) -> ClaimHistory {
    match std::fs::read_to_string(path) {
        Ok(text) => ClaimHistory::from_json(&text, now_millis()).unwrap_or_else(|e| {
            // Kept aside for a look, not overwritten by the next save.
            let aside = path.with_extension("json.corrupt");
            let kept = std::fs::rename(path, &aside).is_ok();
            warn!(path = %path.display(), error = %e, kept_as = %if kept { aside.display().to_string() } else { "-".into() }, "the saved claim history is unreadable; starting without it");
            ClaimHistory::default()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => ClaimHistory::default(),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "could not read the saved claim history; starting without it");
            ClaimHistory::default()
        }
    }
}

/// The reconcile loop's state between rounds.
struct Reconciler {
    inputs: Inputs,
    router: RouterHandle,
    mesh: MeshHandle,
    infos: PeerInfos,
    ipam: Ipam,
    choices: Choices,
    history: ClaimHistory,
    /// Where `history` is kept across restarts (`state_dir/claims.json`).
    history_file: std::path::PathBuf,
    /// When it was last saved.
    history_saved: Option<std::time::Instant>,
    /// What was already reported, so each is logged once.
    warned: BTreeSet<String>,
    /// What members say about where this node's datagrams come from.
    observations: observed::Observations,
    /// When each peer was last told where its datagrams come from.
    telling: observed::Telling,
    /// When the published mappings last changed.
    publishing: observed::Publishing,
    /// The relays in use that answer no probe (the relay service says).
    relays_down: Vec<std::net::SocketAddr>,
    /// This node's home relays: published, and left within their grace.
    homes: relays::HomeRelays,
    /// The peers behind NAT no relay can carry, with why ([`relays::stranded`]).
    stranded: HashMap<[u8; 32], String>,
    /// This node's addresses and pod network, to judge observations by.
    own: observed::Own,
}

impl Reconciler {
    /// Takes one membership event: an observed endpoint is weighed, the rest only logged (the
    /// round that follows reads the membership).
    async fn event(&mut self, e: Event) {
        let Event::Observed {
            by,
            endpoint,
            at_ms,
        } = e
        else {
            debug!(event = ?e, "membership changed");
            return;
        };
        self.refresh_own(None).await;
        #[expect(clippy::disallowed_methods, reason = "the control loop is a driver")]
        let now = std::time::Instant::now();
        match self
            .observations
            .heard((now, now_millis()), by, (endpoint, at_ms), &self.own)
        {
            Ok(()) => {
                debug!(member = %by, %endpoint, "a member sees this node's datagrams come from this endpoint")
            }
            Err(why) => {
                debug!(member = %by, %endpoint, reason = why.as_str(), "observed endpoint not taken")
            }
        }
    }

    /// Refreshes this node's own addresses (from the kernel) and pod network (from `snap`,
    /// when given).
    async fn refresh_own(&mut self, snap: Option<&MeshSnapshot>) {
        match self.ipam.netlink.local_addresses().await {
            Ok(local) => self.own.local = local,
            Err(e) => debug!(error = %e, "could not list this node's addresses"),
        }
        if let Some(snap) = snap {
            let mut pods: Vec<ipnet::IpNet> = snap.record.pod_cidrs.clone();
            for m in &snap.members {
                pods.extend(m.record.pod_cidrs.iter().copied());
            }
            if let Some(m) = &self.ipam.masquerade {
                pods.extend(m.keep.iter().copied());
            }
            self.own.pod_network = pods;
        }
    }

    /// NAT traversal's part of a round: tells each member on an up session where its datagrams
    /// come from when that is none of its own addresses, and publishes the endpoints members
    /// say this node's datagrams come from (into `snap` too). False when the mesh is gone.
    async fn observe_endpoints(
        &mut self,
        snap: &mut MeshSnapshot,
        actual: &[weft_router::PeerStatus],
    ) -> bool {
        #[expect(clippy::disallowed_methods, reason = "the control loop is a driver")]
        let now = std::time::Instant::now();
        for p in actual {
            let (Some(endpoint), weft_router::PeerState::Up) = (p.endpoint, p.state) else {
                continue;
            };
            let Some(m) = snap
                .members
                .iter()
                .find(|m| m.record.wireguard_key == p.config.public_key)
            else {
                continue;
            };
            let r = &m.record;
            let own = [r.private_address, r.public_address]
                .into_iter()
                .flatten()
                .any(|a| std::net::SocketAddr::new(a, r.router_port) == endpoint);
            if !own
                && self.telling.due(now, p.config.public_key, endpoint)
                && !self.mesh.tell_observed(m.id, endpoint).await
            {
                return false;
            }
        }
        let live: BTreeSet<[u8; 32]> = actual.iter().map(|p| p.config.public_key).collect();
        self.telling.retain(|k| live.contains(k));
        let published = if self.observations.is_empty() {
            Vec::new()
        } else {
            self.refresh_own(Some(snap)).await;
            self.observations.endpoints(now, &self.own)
        };
        if self.publishing.due(now, &snap.record.observed, &published) {
            info!(endpoints = ?published, "endpoints members see this node's datagrams come from (NAT mappings)");
            snap.record.observed.clone_from(&published);
            if !self.mesh.modify(move |r| r.observed = published).await {
                return false;
            }
        }
        true
    }

    /// Tells the relay service where to register and which peers to reach through which relay
    /// ([`relays::plan`]), publishes this node's home relays, and gives the shims it answers
    /// to the endpoint choices. False when the mesh is gone.
    async fn plan_relays(&mut self, snap: &MeshSnapshot) -> bool {
        let Some(relay) = self.inputs.relay.clone() else {
            return true;
        };
        let (homes, peers) = relays::plan(
            &snap.record,
            &snap.members,
            &self.inputs.relay_policy,
            &self.relays_down,
        );
        let names: HashMap<[u8; 32], String> =
            peers.iter().map(|(k, r)| (*k, r.name.clone())).collect();
        let stranded: HashMap<[u8; 32], String> =
            relays::stranded(&snap.record, &snap.members, &peers)
                .into_iter()
                .filter_map(|k| {
                    let m = snap.members.iter().find(|m| m.record.wireguard_key == k)?;
                    let why = relays::why_stranded(
                        m,
                        &snap.members,
                        &self.inputs.relay_policy,
                        &self.relays_down,
                    );
                    Some((k, why))
                })
                .collect();
        for (k, why) in &stranded {
            if !self.stranded.contains_key(k)
                && let Some(m) = snap.members.iter().find(|m| m.record.wireguard_key == *k)
            {
                warn!(peer = %m.record.name, reason = %why, "peer behind NAT has no relay: reached only if a direct path works");
            }
        }
        self.stranded = stranded;
        #[expect(clippy::disallowed_methods, reason = "the control loop is a driver")]
        let now = std::time::Instant::now();
        let policy = &self.inputs.relay_policy;
        let (usable, silent) = relays::usable(&snap.members, policy, &self.relays_down);
        let wanted = relays::behind_nat(&snap.record).then_some(homes);
        let round = self.homes.round(now, wanted, &usable, &silent);
        if let Some(keys) = round.publish {
            let names: Vec<&str> = round
                .register
                .iter()
                .filter(|r| keys.iter().flatten().any(|k| *k == r.key))
                .map(|r| r.name.as_str())
                .collect();
            info!(homes = ?names, "home relays published: peers behind NAT reach this node through them");
            if !self.mesh.modify(move |r| r.homes = keys).await {
                return false;
            }
        }
        let Some((shims, down)) = relay
            .plan(
                snap.members
                    .iter()
                    .map(|m| m.record.wireguard_key)
                    .collect(),
                round.register.iter().map(|r| r.addr).collect(),
                peers.iter().map(|(k, r)| (*k, r.addr)).collect(),
            )
            .await
        else {
            return true;
        };
        if down != self.relays_down {
            info!(relays = ?down, "relays that answer no probe: passed over");
            self.relays_down = down;
        }
        self.choices.set_relayed(
            shims
                .into_iter()
                .filter_map(|(k, shim)| Some((k, (shim, names.get(&k)?.clone()))))
                .collect(),
        );
        true
    }

    /// One round: gather (the mesh's members, vetted, and this node's blocks, settled), decide
    /// (the desired peers), apply (the difference to the router). False once a driver is gone.
    async fn round(&mut self) -> bool {
        let Some((mut snap, nodes)) = self.gather().await else {
            return false;
        };
        let Some(actual) = self.router.snapshot().await else {
            return false;
        };
        if !self.observe_endpoints(&mut snap, &actual.peers).await {
            return false;
        }
        if !self.plan_relays(&snap).await {
            return false;
        }
        let paths = self.observe_paths(&snap, &actual.peers);
        let desired = self.decide(snap, nodes);
        if !apply(&self.router, &actual.peers, &desired, &paths.back, |k| {
            paths.cands.contains_key(k)
        })
        .await
        {
            return false;
        }
        for (id, name, direct) in paths.probes {
            debug!(peer = %name, candidates = ?direct, "relayed: offering the direct candidates again");
            if !self.router.probe(id, direct).await {
                return false;
            }
        }
        let map = desired
            .iter()
            .map(|d| {
                let info = PeerInfo {
                    region: d.region.clone(),
                    reason: d.reason,
                    via: d.via.clone(),
                    unreachable: self.stranded.get(&d.config.public_key).cloned(),
                };
                (d.config.public_key, info)
            })
            .collect();
        if let Ok(mut infos) = self.infos.lock() {
            *infos = map;
        }
        true
    }

    /// The mesh's view with refused members dropped, and this node's blocks after one IPAM
    /// round (published to the mesh when they changed); with Kubernetes, the cluster's Nodes.
    async fn gather(&mut self) -> Option<(MeshSnapshot, Option<ClusterNodes>)> {
        let mut snap = self.mesh.snapshot().await?;
        let nodes = self
            .inputs
            .cluster
            .as_ref()
            .and_then(|c| c.borrow().clone());
        vet_claims(
            &self.inputs.claims,
            &mut self.history,
            &mut snap,
            nodes.as_ref(),
            &self.ipam.counters,
        );
        self.save_history(false);
        if let Some(blocks) = self.ipam.step(&snap, &self.inputs.claims).await {
            let cidrs: Vec<ipnet::IpNet> = blocks.iter().map(|b| b.block).collect();
            let since: Vec<u64> = blocks.iter().map(|b| b.since).collect();
            snap.record.pod_cidrs.clone_from(&cidrs);
            snap.record.claimed_at.clone_from(&since);
            let change = move |r: &mut NodeRecord| {
                r.pod_cidrs = cidrs;
                r.claimed_at = since;
            };
            if !self.mesh.modify(change).await {
                return None;
            }
        }
        Some((snap, nodes))
    }

    /// Feeds the handshake states and packet counts of the WireGuard peers to the endpoint
    /// choices ([`Paths`]).
    fn observe_paths(&mut self, snap: &MeshSnapshot, actual: &[weft_router::PeerStatus]) -> Paths {
        #[expect(clippy::disallowed_methods, reason = "the control loop is a driver")]
        let now = std::time::Instant::now();
        let up: std::collections::HashSet<[u8; 32]> = actual
            .iter()
            .filter(|p| p.state == weft_router::PeerState::Up)
            .map(|p| p.config.public_key)
            .collect();
        let live: HashMap<[u8; 32], &weft_router::PeerStatus> = actual
            .iter()
            .filter(|p| up.contains(&p.config.public_key))
            .filter(|p| p.config.path == weft_router::PathKind::Encrypted)
            .map(|p| (p.config.public_key, p))
            .collect();
        let mut probes = Vec::new();
        let mut back = BTreeMap::new();
        self.choices.set_members(
            std::iter::once(&snap.record).chain(snap.members.iter().map(|m| &m.record)),
        );
        // No candidate is this node's own address or in the pod network (the pools, not
        // `no_masquerade`, which may hold underlay ranges).
        self.choices.set_own(observed::Own {
            local: self.own.local.clone(),
            pod_network: self.inputs.claims.pools.clone(),
        });
        let members = snap.members.iter().map(|m| &m.record);
        for (member, address, why) in self.choices.note_unusable(&snap.record, members) {
            warn!(member = %member, %address, reason = why.as_str(), "mesh member advertises an address no datagram may go to: not used as its endpoint");
        }
        let cands: HashMap<[u8; 32], usize> = snap
            .members
            .iter()
            .map(|m| {
                let key = m.record.wireguard_key;
                self.choices
                    .learn(key, live.get(&key).and_then(|p| p.endpoint));
                let c = self.choices.candidates(&snap.record, &m.record);
                self.choices
                    .restart_if_changed(now, key, &c, up.contains(&key));
                if let Some(p) = live.get(&key)
                    && let Some(at) = p.endpoint
                {
                    self.choices.follow(now, key, &c, at);
                    let counts = (p.counters.rx_packets, p.counters.tx_packets);
                    if let Some(shim) = self.choices.check_path(now, key, at, counts) {
                        warn!(peer = %m.record.name, endpoint = %at, "direct path carried packets out and none back: back through the relay");
                        back.insert(key, shim);
                    }
                    let direct = self.choices.probes(now, key, &c, at);
                    if !direct.is_empty() {
                        probes.push((p.id, m.record.name.clone(), direct));
                    }
                }
                (m.record.wireguard_key, c.len())
            })
            .collect();
        // Only WireGuard paths are confirmed by a handshake; a plaintext path needs none.
        self.choices.observe_round(
            now,
            actual
                .iter()
                .filter(|p| p.config.path == weft_router::PathKind::Encrypted)
                .filter_map(|p| {
                    let n = cands.get(&p.config.public_key)?;
                    Some((p.config.public_key, p.state, *n))
                }),
        );
        Paths {
            cands,
            probes,
            back,
        }
    }

    /// The desired peers: with Kubernetes only members that have a Node; what is not routed
    /// and why is logged once.
    fn decide(
        &mut self,
        mut snap: MeshSnapshot,
        nodes: Option<ClusterNodes>,
    ) -> Vec<reconcile::DesiredPeer> {
        let configured = self.inputs.statics.borrow_and_update().clone();
        if let Some(names) = nodes {
            let warned = &mut self.warned;
            snap.members.retain(|m| {
                let known = names.contains_key(&m.record.name);
                if !known && warned.insert(format!("no Node {}", m.record.name)) {
                    info!(member = %m.record.name, "mesh member without a Kubernetes Node: not routed");
                }
                known
            });
        }
        let (desired, skipped) = reconcile::desired(
            &snap.record,
            snap.me.0,
            &snap.members,
            &configured,
            &self.choices,
        );
        for s in skipped {
            if self.warned.insert(s.clone()) {
                warn!(reason = %s, "mesh member not routed");
            }
        }
        desired
    }
}

/// Masquerade settings: what keeps its source, and the overlay interface.
#[derive(Debug, Clone)]
pub struct Masquerade {
    /// Destinations that keep the pod source (`pod_network_cidr` and `no_masquerade`).
    pub keep: Vec<ipnet::IpNet>,
    /// The TUN device (traffic into the overlay is never masqueraded).
    pub interface: String,
}

impl Masquerade {
    /// Masquerades traffic from `blocks`; a failure is logged, and the overlay runs on.
    pub fn apply(&self, blocks: &[ipnet::IpNet]) {
        match crate::host::masquerade::apply(blocks, &self.keep, &self.interface) {
            Ok(()) => info!(
                table = crate::host::masquerade::TABLE, blocks = ?blocks, keep = ?self.keep,
                "masquerading pod traffic that leaves the pod network"
            ),
            Err(e) => error!(
                error = %e,
                "network.nat_outgoing: pods' traffic leaving the pod network is not masqueraded"
            ),
        }
    }
}

/// Turns the router's peers (`actual`) into `desired`: removes, adds and replaces only what
/// changed, and asks for a handshake at once with new mesh peers (`is_mesh`). A peer keeps
/// its session when its prefixes change, and when its endpoint moves only to where the session
/// is up or, for a peer in `back`, to the relay shim given there. False when the router is
/// gone.
pub async fn apply(
    router: &RouterHandle,
    actual: &[weft_router::PeerStatus],
    desired: &[reconcile::DesiredPeer],
    back: &BTreeMap<[u8; 32], std::net::SocketAddr>,
    is_mesh: impl Fn(&[u8; 32]) -> bool,
) -> bool {
    let ids: BTreeMap<[u8; 32], weft_router::PeerId> =
        actual.iter().map(|p| (p.config.public_key, p.id)).collect();
    // Where each peer that is up has its session now.
    let live: BTreeMap<[u8; 32], std::net::SocketAddr> = actual
        .iter()
        .filter(|p| p.state == weft_router::PeerState::Up)
        .filter_map(|p| Some((p.config.public_key, p.endpoint?)))
        .collect();
    let current: BTreeMap<[u8; 32], PeerConfig> = actual
        .iter()
        .map(|p| (p.config.public_key, p.config.clone()))
        .collect();
    let changes = reconcile::diff(&current, desired);
    let steps = reconcile::in_place_steps(&changes, &current, &live, back);
    if !give_up_first(router, &ids, &current, &steps).await {
        return false;
    }
    // Then what leaves (removed peers, and the old half of the others replaced), then what
    // comes (new peers, the new half), then what changes in place: any desired set in which
    // no two peers share a prefix lands in this one round, whoever held what before.
    let fresh = |c: &PeerConfig| !steps.contains_key(&c.public_key);
    for change in &changes {
        let k = match change {
            Change::Remove(k) => *k,
            Change::Replace(c) if fresh(c) => c.public_key,
            _ => continue,
        };
        if let Some(id) = ids.get(&k) {
            let name = current.get(&k).map(|c| c.name.clone()).unwrap_or_default();
            info!(peer = %name, "peer withdrawn");
            router.remove_peer(*id).await;
        }
    }
    for change in &changes {
        let c = match change {
            Change::Add(c) => c,
            Change::Replace(c) if fresh(c) => c,
            _ => continue,
        };
        if !add(router, c.clone(), is_mesh(&c.public_key)).await {
            return false;
        }
    }
    // A peer whose prefixes change, or whose session is up where the choice now points (it
    // followed the far end's packets there) or goes back to its relay, keeps its keys: no
    // new handshake, nothing in flight lost ([`reconcile::in_place`]).
    for change in &changes {
        if let Change::Replace(c) = change
            && let (Some(&id), Some(step)) = (ids.get(&c.public_key), steps.get(&c.public_key))
            && !in_place(router, id, c, step.clone()).await
        {
            return false;
        }
    }
    true
}

/// Adds peer `c` and, for a mesh peer, asks for a handshake at once. False when the router is
/// gone.
async fn add(router: &RouterHandle, c: PeerConfig, mesh_peer: bool) -> bool {
    let (name, endpoint, path) = (c.name.clone(), c.endpoint, c.path.as_str());
    match router.add_peer(c).await {
        Some(Ok(id)) => {
            info!(peer = %name, endpoint = ?endpoint, path, "peer routed");
            // Confirm the endpoint now rather than at the first packet.
            if mesh_peer {
                router.connect(id).await;
            }
        }
        Some(Err(e)) => warn!(peer = %name, error = %e, "peer not routed"),
        None => return false,
    }
    true
}

/// Sets the prefixes each peer changing in place keeps before any peer takes new ones
/// ([`reconcile::given_up_first`]). False when the router is gone.
async fn give_up_first(
    router: &RouterHandle,
    ids: &BTreeMap<[u8; 32], weft_router::PeerId>,
    current: &BTreeMap<[u8; 32], PeerConfig>,
    steps: &BTreeMap<[u8; 32], reconcile::InPlace>,
) -> bool {
    for (k, kept) in reconcile::given_up_first(current, steps) {
        let Some(&id) = ids.get(&k) else {
            continue;
        };
        // Giving prefixes up cannot be refused; a peer gone since is left to the next round.
        if router.set_allowed_ips(id, kept).await.is_none() {
            return false;
        }
    }
    true
}

/// Changes peer `id` (now `c`) in place, its session kept ([`reconcile::in_place`]): its
/// prefixes (a refusal is logged and the next round tries again), then its endpoint. False when
/// the router is gone.
async fn in_place(
    router: &RouterHandle,
    id: weft_router::PeerId,
    c: &PeerConfig,
    step: reconcile::InPlace,
) -> bool {
    if let Some(nets) = step.allowed_ips {
        match router.set_allowed_ips(id, nets).await {
            Some(Ok(())) => {
                info!(peer = %c.name, allowed_ips = ?c.allowed_ips, "peer's prefixes changed, session kept");
            }
            Some(Err(e)) => {
                warn!(peer = %c.name, error = %e, "peer's prefixes not changed: tried again next round");
            }
            None => return false,
        }
    }
    if let Some((from, to)) = step.endpoint {
        debug!(peer = %c.name, endpoint = %to, "endpoint moved, session kept");
        if !router.set_endpoint(id, from, to).await {
            return false;
        }
    }
    true
}

/// The link the overlay MTU came from at start, to notice when the private address leaves it.
#[derive(Debug, Clone)]
pub struct MtuSource {
    /// Netlink, to find the new address's link.
    pub netlink: crate::host::netlink::Netlink,
    /// The private address whose link set the MTU (`None`: none was known, the fallback).
    pub address: Option<std::net::IpAddr>,
    /// The MTU of the TUN device, the conflist and the pods.
    pub mtu: u16,
}

/// What the Kubernetes loop keeps up to date about this node.
#[derive(Debug)]
pub struct OwnNode {
    /// What status shows: the region and addresses in use, and where each came from.
    pub status: Arc<Mutex<crate::api::status::NodeStatus>>,
    /// The MTU's underlay (`None` when `network.mtu` fixes it).
    pub mtu: Option<MtuSource>,
}

impl OwnNode {
    /// Shows `facts` in status, and warns (once per address) when the private address moved to
    /// a link that implies another MTU: the running MTU stays, since running pods keep theirs.
    async fn update(&self, facts: &k8s::OwnFacts, warned: &mut Option<std::net::IpAddr>) {
        if let Ok(mut n) = self.status.lock() {
            n.set_facts(facts);
        }
        let Some(m) = &self.mtu else { return };
        let Some(addr) = facts.private_address else {
            return;
        };
        if Some(addr) == m.address || *warned == Some(addr) {
            return;
        }
        *warned = Some(addr);
        match crate::host::netlink::underlay_mtu(&m.netlink, addr).await {
            Ok(Some(new)) if new != m.mtu => warn!(
                from = ?m.address, to = %addr, mtu = m.mtu, underlay_mtu = new,
                "the private address moved to a link that implies another overlay MTU; the TUN \
                 device, the CNI config and running pods keep theirs (restart weft, then the pods, \
                 to use it)"
            ),
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, to = %addr, "could not read the new private address's link")
            }
        }
    }
}

/// Applies what the Kubernetes node source reports: this node's region and addresses into its
/// record and its status (the config's explicit values win), its `spec.podCIDRs` to IPAM
/// (`blocks`, unless the config pins `node.pod_cidr`), and the other nodes as bootstrap peers of
/// the mesh; status says `ok`, the source's trouble, or why IPAM does not take the Node's
/// podCIDRs (`policy`: what the peers accept of a member's blocks). Ends when the source does.
pub async fn kubernetes_loop(
    (node, policy): (weft_config::Node, ClaimPolicy),
    (mesh_port, configured): (u16, Vec<std::net::SocketAddr>),
    mut source: mpsc::Receiver<nodesource::SourceEvent>,
    mesh: MeshHandle,
    (blocks, names): (
        watch::Sender<Vec<ipnet::IpNet>>,
        watch::Sender<Option<ClusterNodes>>,
    ),
    api: Arc<Mutex<String>>,
    own: OwnNode,
) {
    use self::nodesource::SourceEvent;
    let mut k = KubeView {
        region: node.region.clone(),
        node,
        mesh_port,
        configured,
        mesh,
        blocks,
        names,
        own,
        warned: None,
        joined: Vec::new(),
    };
    let say = |s: String| {
        if let Ok(mut a) = api.lock() {
            *a = s;
        }
    };
    // Why this node's Node is not usable as it stands, for status (IPAM logs it).
    let mut refused = None;
    while let Some(event) = source.recv().await {
        match event {
            SourceEvent::Me(me) => {
                refused = refused_pod_cidrs(&k.node, &me, &policy);
                say(refused.clone().unwrap_or_else(|| "ok".into()));
                k.on_me(&me).await;
            }
            SourceEvent::Others(others) => {
                say(refused.clone().unwrap_or_else(|| "ok".into()));
                k.on_others(&others).await;
            }
            SourceEvent::Trouble(msg) => say(msg),
        }
    }
}

/// What status says of this node's Node when IPAM will not take its `spec.podCIDRs` (every
/// peer would refuse them: [`k8s::check_pod_cidrs`]); `None` when it takes them, or uses
/// `node.pod_cidr` from the config instead.
fn refused_pod_cidrs(
    node: &weft_config::Node,
    me: &k8s::NodeView,
    policy: &ClaimPolicy,
) -> Option<String> {
    if !node.pod_cidr.is_empty() {
        return None;
    }
    let why = k8s::check_pod_cidrs(&me.pod_cidrs, policy).err()?;
    Some(format!(
        "this Node's spec.podCIDRs {:?} are not taken: {why}",
        me.pod_cidrs
    ))
}

/// The Kubernetes loop's state.
struct KubeView {
    node: weft_config::Node,
    region: Option<String>,
    mesh_port: u16,
    configured: Vec<std::net::SocketAddr>,
    mesh: MeshHandle,
    blocks: watch::Sender<Vec<ipnet::IpNet>>,
    names: watch::Sender<Option<ClusterNodes>>,
    own: OwnNode,
    warned: Option<std::net::IpAddr>,
    joined: Vec<std::net::SocketAddr>,
}

impl KubeView {
    /// This node's Node: its facts to the record and status, its `spec.podCIDRs` to IPAM.
    async fn on_me(&mut self, me: &k8s::NodeView) {
        let (node, mesh, blocks) = (&self.node, &self.mesh, &self.blocks);
        let (region, own, warned) = (&mut self.region, &self.own, &mut self.warned);
        let facts = k8s::own_facts(me, node);
        region.clone_from(&facts.region);
        own.update(&facts, warned).await;
        if let Some(snap) = mesh.snapshot().await {
            let r = &snap.record;
            if (&r.region, r.private_address, r.public_address)
                != (&facts.region, facts.private_address, facts.public_address)
            {
                info!(region = ?facts.region, private = ?facts.private_address, public = ?facts.public_address, "this node's facts from Kubernetes");
                let f = facts.clone();
                let change = move |r: &mut NodeRecord| {
                    r.region = f.region;
                    r.private_address = f.private_address;
                    r.public_address = f.public_address;
                };
                mesh.modify(change).await;
            }
        }
        if node.pod_cidr.is_empty() && *blocks.borrow() != me.pod_cidrs {
            // IPAM takes them if the peers would accept them ([`Ipam::step`]).
            info!(pod_cidrs = ?me.pod_cidrs, "the Node's spec.podCIDRs");
            let _ = blocks.send(me.pod_cidrs.clone());
        }
    }

    /// The other Nodes: the cluster's names and blocks, and the mesh's bootstrap peers.
    async fn on_others(&mut self, others: &[k8s::NodeView]) {
        let (names, mesh, configured) = (&self.names, &self.mesh, &self.configured);
        let (region, mesh_port, joined) = (&self.region, self.mesh_port, &mut self.joined);
        let set: ClusterNodes = others
            .iter()
            .map(|n| {
                let node = ClusterNode {
                    pod_cidrs: n.pod_cidrs.clone(),
                    key: n.public_key.clone(),
                };
                (n.name.clone(), node)
            })
            .collect();
        if names.borrow().as_ref() != Some(&set) {
            let _ = names.send(Some(set));
        }
        // Other Nodes' address annotations count only where the mesh's signed
        // record for that node agrees; the mesh is asked only when one has any.
        let annotated = others
            .iter()
            .any(|n| n.private_annotated || n.public_annotated);
        let snapshot = if annotated {
            mesh.snapshot().await
        } else {
            None
        };
        let signed: k8s::SignedAddresses = snapshot
            .map(|snap| {
                snap.members
                    .into_iter()
                    .map(|m| {
                        let r = m.record;
                        (r.name, (r.private_address, r.public_address))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut addrs = configured.clone();
        addrs.extend(k8s::bootstrap(
            others,
            region.as_deref(),
            mesh_port,
            &signed,
        ));
        if addrs != *joined {
            debug!(peers = ?addrs, "bootstrap peers from the Kubernetes nodes");
            mesh.join(addrs.clone()).await;
            *joined = addrs;
        }
    }
}

/// This node's side of IPAM: the rounds of [`Blocks`], the state file and the TUN addresses
/// that follow the blocks.
#[derive(Debug)]
pub struct Ipam {
    /// What the node holds and how it decides.
    pub blocks: Blocks,
    /// Where the blocks are persisted.
    pub state_file: std::path::PathBuf,
    /// Re-claims, for the metrics.
    pub counters: Arc<crate::api::metrics::IpamCounters>,
    /// Masquerade, whose rules follow the blocks (`None` without `nat_outgoing`).
    pub masquerade: Option<Masquerade>,
    /// The CNI conflist, which follows the blocks.
    pub conflist: crate::cni::ConflistWriter,
    /// Blocks assigned from outside the mesh (Kubernetes `spec.podCIDRs`): when set, the node
    /// holds exactly these and claims nothing; empty means it waits for them.
    pub external: Option<watch::Receiver<Vec<ipnet::IpNet>>>,
    /// The first claim waits this long for the mesh to tell what is taken.
    pub settle: Duration,
    /// When the daemon started.
    pub started: std::time::Instant,
    /// The TUN device, whose addresses follow the blocks.
    pub netlink: crate::host::netlink::Netlink,
    /// Its index.
    pub index: u32,
    /// Conflicts and failures already reported.
    pub reported: BTreeSet<String>,
}

impl Ipam {
    /// One round: decides per pool, applies a change (state file, TUN address), and returns
    /// the new blocks when they changed. `policy` is what the peers accept of a member's blocks
    /// (a Kubernetes assignment it refuses is not taken).
    pub async fn step(
        &mut self,
        snap: &MeshSnapshot,
        policy: &ClaimPolicy,
    ) -> Option<Vec<SavedBlock>> {
        let (next, events) = self.next(snap, policy)?;
        self.report(events, snap);
        if next == self.blocks.held || !self.move_to(&next).await {
            return None;
        }
        Some(next)
    }

    /// The next blocks and what happened: Kubernetes' assignment, else a round of the blocks
    /// against the members; `None` while Kubernetes has not assigned any, or has assigned
    /// blocks `policy` refuses ([`k8s::check_pod_cidrs`]: the blocks held are kept).
    fn next(
        &mut self,
        snap: &MeshSnapshot,
        policy: &ClaimPolicy,
    ) -> Option<(Vec<SavedBlock>, Vec<BlockEvent>)> {
        #[expect(clippy::disallowed_methods, reason = "the control loop is a driver")]
        let now = std::time::Instant::now();
        let settled = blocks::settled(
            now.saturating_duration_since(self.started),
            self.settle,
            snap.synced,
            &snap.members,
        );
        let Some(rx) = &self.external else {
            return Some(self.blocks.round(&snap.members, now, now_millis(), settled));
        };
        let assigned = rx.borrow().clone();
        if assigned.is_empty() {
            if self.reported.insert("waiting for podCIDRs".into()) {
                info!(
                    "waiting for the Node's spec.podCIDRs (kube-controller-manager --allocate-node-cidrs)"
                );
            }
            return None;
        }
        if let Err(why) = k8s::check_pod_cidrs(&assigned, policy) {
            if self
                .reported
                .insert(format!("refused podCIDRs {assigned:?}"))
            {
                let held: Vec<ipnet::IpNet> = self.blocks.held.iter().map(|b| b.block).collect();
                error!(
                    pod_cidrs = ?assigned, pool = ?policy.pools, reason = %why, held = ?held,
                    "the Node's spec.podCIDRs are not taken (every peer would refuse them): \
                     set network.pod_network_cidr and node_cidr_mask_size to the cluster's \
                     (kube-controller-manager --cluster-cidr, --node-cidr-mask-size); \
                     waiting for podCIDRs inside the pool"
                );
            }
            return None;
        }
        let next = blocks::assigned(&assigned, &self.blocks.held, now_millis());
        Some((next, Vec::new()))
    }

    /// Logs (and counts) what a round of the blocks did, each conflict once.
    fn report(&mut self, events: Vec<BlockEvent>, snap: &MeshSnapshot) {
        let name = |id: &[u8; 32]| {
            snap.members
                .iter()
                .find(|m| m.id.0 == *id)
                .map_or_else(String::new, |m| m.record.name.clone())
        };
        for e in events {
            match e {
                BlockEvent::Claimed { block, pool } => {
                    info!(%block, %pool, "claimed a pod block");
                }
                BlockEvent::Reclaimed { lost, winner, new } => {
                    self.counters
                        .reclaims
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    warn!(
                        %lost, to = %name(&winner), %new,
                        "re-claimed: our pod block was claimed earlier by another node"
                    );
                }
                BlockEvent::StaticConflict {
                    mine,
                    winner,
                    theirs,
                } => {
                    if self.reported.insert(format!("{mine} {}", name(&winner))) {
                        error!(
                            block = %mine, other = %name(&winner), other_block = %theirs,
                            "node.pod_cidr overlaps a block another node claimed earlier: that node keeps it and the others route it there; change node.pod_cidr"
                        );
                    }
                }
                BlockEvent::Overlapped {
                    mine,
                    fixed: true,
                    other,
                    theirs,
                } => {
                    if self.reported.insert(format!("{mine} {}", name(&other))) {
                        error!(
                            block = %mine, other = %name(&other), other_block = %theirs,
                            "another node claims a block overlapping our node.pod_cidr later than we did: we keep it and the others route it here; that node must change its block"
                        );
                    }
                }
                BlockEvent::Overlapped {
                    mine,
                    fixed: false,
                    other,
                    theirs,
                } => debug!(
                    block = %mine, other = %name(&other), other_block = %theirs,
                    "a younger claim overlaps our block; it will move"
                ),
                BlockEvent::Failed(e) => {
                    if self.reported.insert(e.to_string()) {
                        error!(error = %e, "no pod block");
                    }
                }
            }
        }
    }

    /// Moves to `next`: the state file first (nothing else changes when it cannot be
    /// written), then the TUN addresses, masquerade and the conflist. False when nothing moved.
    async fn move_to(&mut self, next: &[SavedBlock]) -> bool {
        if let Err(e) = write_state(&self.state_file, next) {
            error!(error = %e, path = %self.state_file.display(), "could not persist the pod blocks; keeping the old ones");
            return false;
        }
        let host = |b: &SavedBlock| crate::plan::overlay_address(b.block);
        let held = &self.blocks.held;
        let old: Vec<ipnet::IpNet> = held
            .iter()
            .filter(|b| !next.contains(b))
            .map(host)
            .collect();
        let new: Vec<ipnet::IpNet> = next
            .iter()
            .filter(|b| !held.contains(b))
            .map(host)
            .collect();
        if let Err(e) = self.netlink.swap_addresses(self.index, &old, &new).await {
            error!(error = %e, "could not move the overlay address to the new block");
        }
        let blocks: Vec<ipnet::IpNet> = next.iter().map(|b| b.block).collect();
        if let Some(m) = &self.masquerade {
            m.apply(&blocks);
        }
        self.conflist.write_or_log(&blocks);
        self.blocks.held = next.to_vec();
        true
    }
}

/// Writes the blocks to `path` atomically (a temporary file, fsync, rename).
pub fn write_state(path: &Path, blocks: &[SavedBlock]) -> std::io::Result<()> {
    crate::host::files::write_atomic(path, Snapshot::new(blocks.to_vec()).to_json().as_bytes())
}

/// Removes `path` for `--reset-state`, logging `said`; a file that is not there is fine.
fn forget(path: &Path, said: &str) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => warn!(path = %path.display(), "--reset-state: {said}"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    Ok(())
}

/// Reads the persisted blocks: none when the file does not exist, an error naming the file when
/// it cannot be read or parsed (`--reset-state` starts afresh instead).
pub fn read_state(path: &Path, reset: bool) -> anyhow::Result<Vec<SavedBlock>> {
    if reset {
        let history = path.with_file_name("claims.json");
        forget(&history, "the claim history is forgotten")?;
        forget(
            &certificates_file(&history),
            "the latest certificates seen are forgotten",
        )?;
        forget(path, "the saved pod blocks are forgotten")?;
        return Ok(Vec::new());
    }
    match std::fs::read_to_string(path) {
        Ok(text) => Snapshot::from_json(&text).map(|s| s.blocks).with_context(|| {
            format!(
                "IPAM state file {} is unreadable (fix or remove it, or start with `weft run --reset-state`)",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading IPAM state file {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    /// `--reset-state` forgets the saved blocks, the claim history and the latest
    /// certificates seen, and nothing else in the state dir.
    #[test]
    fn reset_state_forgets_the_blocks_the_claim_history_and_the_certificates() {
        let dir = tempfile::tempdir().expect("temp dir");
        let state = dir.path().join("ipam.json");
        let others = ["claims.json", "certificates.json", "private.key"];
        for name in others {
            std::fs::write(dir.path().join(name), "[]").expect("write");
        }
        std::fs::write(&state, "not json").expect("write");
        assert!(
            read_state(&state, false).is_err(),
            "unreadable without a reset"
        );
        assert_eq!(read_state(&state, true).expect("reset"), []);
        let left: Vec<bool> = others.iter().map(|n| dir.path().join(n).exists()).collect();
        assert_eq!(left, [false, false, true]);
        assert!(!state.exists());
        // Nothing to forget is fine too.
        assert!(read_state(&state, true).is_ok());
    }

    #[test]
    fn a_cluster_secret_file_readable_by_group_or_others_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        let text = format!(
            "node: {{name: a}}\nmesh: {{secret_file: {}, peers: [198.18.0.2]}}\n",
            secret.display()
        );
        let config = Config::parse(&text, Path::new("weft.yaml"), "h").unwrap();
        let value = keys::generate_secret();
        keys::write_private(&secret, keys::encode(&value)).unwrap();
        assert_eq!(
            load_secret(&config, Path::new("weft.yaml")).unwrap(),
            Some(value)
        );
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = format!(
            "{:#}",
            load_secret(&config, Path::new("weft.yaml")).unwrap_err()
        );
        assert!(e.contains(&secret.display().to_string()), "{e}");
        assert!(e.contains("readable by its group or others"), "{e}");
        assert!(!e.contains(&keys::encode(&value)), "{e}");
    }

    /// Serves `apply`'s commands against `router` until the handle is dropped.
    async fn serve(
        mut rx: mpsc::Receiver<weft_router::driver::Command>,
        mut router: weft_router::Router,
        now: std::time::Instant,
    ) -> weft_router::Router {
        use weft_router::driver::Command;
        while let Some(cmd) = rx.recv().await {
            match cmd {
                Command::AddPeer(c, reply) => drop(reply.send(router.add_peer(now, c))),
                Command::RemovePeer(id) => drop(router.remove_peer(id)),
                Command::SetAllowedIps(id, nets, reply) => {
                    drop(reply.send(router.set_allowed_ips(id, nets)));
                }
                Command::Connect(id) => router.connect(id),
                Command::SetEndpoint { id, from, to } => drop(router.move_endpoint(id, from, to)),
                other => panic!("apply sent {other:?}"),
            }
        }
        router
    }

    /// Prefixes moving between peers land in one round, whether the peers change in place or
    /// are replaced: x (in place) and y (replaced: its endpoint moved) trade blocks, and so do
    /// z and w (both in place). Taking before the other side gave up would be refused.
    #[tokio::test]
    async fn prefixes_moving_between_peers_in_place_or_replaced_land_in_one_round() {
        #[expect(
            clippy::disallowed_methods,
            reason = "a test's clock starts from a real instant"
        )]
        let now = std::time::Instant::now();
        let peer = |key: u8, endpoint: &str, block: u8| PeerConfig {
            name: format!("p{key}"),
            public_key: [key; 32],
            endpoint: Some(endpoint.parse().expect("endpoint")),
            allowed_ips: vec![format!("100.64.{block}.0/24").parse().expect("block")],
            persistent_keepalive: Some(25),
            path: weft_router::PathKind::Encrypted,
        };
        let before = [
            peer(2, "198.18.1.2:51820", 1),
            peer(3, "198.18.1.3:51820", 2),
            peer(4, "198.18.1.4:51820", 3),
            peer(5, "198.18.1.5:51820", 4),
        ];
        let after = [
            peer(2, "198.18.1.2:51820", 2),
            peer(3, "198.18.9.3:51820", 1),
            peer(4, "198.18.1.4:51820", 4),
            peer(5, "198.18.1.5:51820", 3),
        ];
        let mut router =
            weft_router::Router::new(weft_router::x25519::StaticSecret::from([7; 32]), 1);
        for c in &before {
            router.add_peer(now, c.clone()).expect("added");
        }
        let actual = router.peers(now);
        let (handle, rx) = RouterHandle::channel();
        let task = tokio::spawn(serve(rx, router, now));
        let desired: Vec<reconcile::DesiredPeer> = after
            .iter()
            .map(|c| reconcile::DesiredPeer {
                config: c.clone(),
                region: None,
                reason: Reason::Configured,
                candidates: vec![],
                via: None,
            })
            .collect();
        assert!(apply(&handle, &actual, &desired, &BTreeMap::new(), |_| false).await);
        drop(handle);
        let router = task.await.expect("served");
        let ids: BTreeMap<[u8; 32], weft_router::PeerId> =
            actual.iter().map(|p| (p.config.public_key, p.id)).collect();
        let now_peers = router.peers(now);
        for want in &after {
            let got = now_peers
                .iter()
                .find(|p| p.config.public_key == want.public_key)
                .expect("still a peer");
            assert_eq!(got.config, *want, "{} as desired", want.name);
            let kept = got.id == ids[&want.public_key];
            assert_eq!(
                kept,
                want.public_key != [3; 32],
                "{}: session kept",
                want.name
            );
        }
    }
}
