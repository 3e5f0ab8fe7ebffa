//! The control loop: the mesh's view turned into router peers, and what status shows of both.
//!
//! The reconcile task runs on every membership event and on a periodic resync: it asks the mesh
//! for its members and the router for its peers, computes the desired peers
//! ([`reconcile::desired`]) and applies the difference ([`reconcile::diff`]) as peer additions
//! and removals; a peer whose configuration did not change is never touched.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};
use weft_config::Config;
use weft_mesh::driver::{Command as MeshCommand, Snapshot as MeshSnapshot};
use weft_mesh::{Event, NodeRecord};
use weft_router::PeerConfig;
use weft_router::driver::Command as RouterCommand;

use crate::keys;
use crate::reconcile::{self, Change, Choices, Reason};

/// How often the reconciler resyncs without an event.
const RESYNC: Duration = Duration::from_secs(1);

/// What status shows of a mesh peer beyond the router's view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Its region.
    pub region: Option<String>,
    /// Why its endpoint.
    pub reason: Reason,
}

/// Mesh peer details for status, by WireGuard key.
pub type PeerInfos = Arc<Mutex<HashMap<[u8; 32], PeerInfo>>>;

/// Reads the cluster secret: `Ok(None)` when the file is absent and no bootstrap peers are
/// configured (a node without a mesh), an error naming the file otherwise.
pub fn load_secret(config: &Config, origin: &Path) -> anyhow::Result<Option<[u8; 32]>> {
    let path = &config.mesh.secret_file;
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(keys::decode(
            &text,
            &format!("mesh.secret_file {}", path.display()),
        )?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && config.mesh.peers.is_empty() => {
            info!(path = %path.display(), "no cluster secret: the mesh is off, only wireguard_peers are used");
            Ok(None)
        }
        Err(e) => bail!(
            "{}: mesh.secret_file: cannot read {}: {e} (create one with `weft gensecret > {}`)",
            origin.display(),
            path.display(),
            path.display()
        ),
    }
}

/// This node's record for the mesh, versioned by the wall clock so a restarted node's record
/// outranks its earlier life's (only the origin ever compares its own versions).
pub fn own_record(
    config: &Config,
    wireguard_key: [u8; 32],
    pod_cidrs: &[ipnet::IpNet],
) -> NodeRecord {
    #[expect(
        clippy::disallowed_methods,
        reason = "the daemon is a driver: it owns the clock"
    )]
    let version = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    NodeRecord {
        version,
        left: false,
        name: config.node.name.clone(),
        region: config.node.region.clone(),
        private_address: config.node.private_address,
        public_address: config.node.public_address,
        mesh_port: config.mesh.port,
        router_port: config.router.port,
        wireguard_key,
        pod_cidrs: pod_cidrs.to_vec(),
        trusted_subnets: config.network.trusted_subnets.clone(),
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

async fn ask<C, T>(tx: &mpsc::Sender<C>, make: impl FnOnce(oneshot::Sender<T>) -> C) -> Option<T> {
    let (reply, rx) = oneshot::channel();
    tx.send(make(reply)).await.ok()?;
    rx.await.ok()
}

/// The mesh's snapshot, if the mesh is running.
pub async fn mesh_snapshot(tx: &mpsc::Sender<MeshCommand>) -> Option<MeshSnapshot> {
    ask(tx, MeshCommand::Snapshot).await
}

/// Keeps the router's peers in line with the mesh until `shutdown`.
pub async fn reconcile_loop(
    statics: Vec<PeerConfig>,
    router: mpsc::Sender<RouterCommand>,
    mesh: mpsc::Sender<MeshCommand>,
    mut events: mpsc::UnboundedReceiver<Event>,
    infos: PeerInfos,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut choices = Choices::default();
    let mut warned: BTreeSet<String> = BTreeSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    return;
                }
            }
            Some(e) = events.recv() => {
                debug!(event = ?e, "membership changed");
                while events.try_recv().is_ok() {}
            }
            () = tokio::time::sleep(RESYNC) => {}
        }
        let Some(snap) = mesh_snapshot(&mesh).await else {
            return;
        };
        let Some(actual) = ask(&router, RouterCommand::Status).await else {
            return;
        };
        #[expect(clippy::disallowed_methods, reason = "the control loop is a driver")]
        let now = std::time::Instant::now();
        let cands: HashMap<[u8; 32], usize> = snap
            .members
            .iter()
            .map(|m| {
                (
                    m.record.wireguard_key,
                    reconcile::candidates(&snap.record, &m.record).len(),
                )
            })
            .collect();
        // Only WireGuard paths are confirmed by a handshake; a plaintext path needs none.
        for p in actual
            .peers
            .iter()
            .filter(|p| p.config.path == weft_router::PathKind::Encrypted)
        {
            if let Some(n) = cands.get(&p.config.public_key) {
                choices.observe(now, p.config.public_key, p.state, *n);
            }
        }
        choices.retain(|k| cands.contains_key(k));
        let (desired, skipped) =
            reconcile::desired(&snap.record, &snap.members, &statics, &choices);
        for s in skipped {
            if warned.insert(s.clone()) {
                warn!(reason = %s, "mesh member not routed");
            }
        }
        let ids: BTreeMap<[u8; 32], weft_router::PeerId> = actual
            .peers
            .iter()
            .map(|p| (p.config.public_key, p.id))
            .collect();
        let current: BTreeMap<[u8; 32], PeerConfig> = actual
            .peers
            .iter()
            .map(|p| (p.config.public_key, p.config.clone()))
            .collect();
        for change in reconcile::diff(&current, &desired) {
            let (remove, add) = match change {
                Change::Add(c) => (None, Some(c)),
                Change::Remove(k) => (Some(k), None),
                Change::Replace(c) => (Some(c.public_key), Some(c)),
            };
            if let Some(k) = remove
                && let Some(id) = ids.get(&k)
            {
                let name = current.get(&k).map(|c| c.name.clone()).unwrap_or_default();
                info!(peer = %name, "peer withdrawn");
                let _ = router.send(RouterCommand::RemovePeer(*id)).await;
            }
            if let Some(c) = add {
                let (name, endpoint, path) = (c.name.clone(), c.endpoint, c.path.as_str());
                let mesh_peer = cands.contains_key(&c.public_key);
                match ask(&router, |r| RouterCommand::AddPeer(c, r)).await {
                    Some(Ok(id)) => {
                        info!(peer = %name, endpoint = ?endpoint, path, "peer routed");
                        // Confirm the endpoint now rather than at the first packet.
                        if mesh_peer {
                            let _ = router.send(RouterCommand::Connect(id)).await;
                        }
                    }
                    Some(Err(e)) => warn!(peer = %name, error = %e, "peer not routed"),
                    None => return,
                }
            }
        }
        let mut map = HashMap::new();
        for d in &desired {
            map.insert(
                d.config.public_key,
                PeerInfo {
                    region: d.region.clone(),
                    reason: d.reason,
                },
            );
        }
        if let Ok(mut infos) = infos.lock() {
            *infos = map;
        }
    }
}
