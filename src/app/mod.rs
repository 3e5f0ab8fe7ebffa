//! `weft run`: the only module that spawns tasks.
//!
//! [`App::build`] checks everything that can be checked, binds every socket, and only then
//! installs the host state (the TUN device, its routes, masquerade, the CNI conflist), owned
//! by an [`Installed`] guard that undoes it on every way out,
//! errors and panics included. [`App::run`] starts the tasks (the data plane, metrics, the mesh
//! with IPAM and the Kubernetes source, the systemd status loop), serves signals and the local
//! API until SIGTERM or SIGINT, then stops every task under one grace period and removes what
//! was installed.

mod answer;
pub mod certify;
pub mod reload;
mod report;
mod setup;
mod tasks;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};
use weft_config::Config;
use weft_mesh::driver::MeshDriver;
use weft_mesh::{Identity, Membership, MeshConfig};
use weft_router::Router;

use self::answer::Shared;
pub use self::report::status;
use self::setup::{Bound, Checked, Host, Signals};
pub use self::tasks::Tasks;
use crate::api::status::NodeStatus;
use crate::api::{self, ApiSocket};
use crate::app::reload::{Reloader, SetLog};
use crate::control;
use crate::handle::{MeshHandle, RouterHandle};
use crate::host::installed::Installed;
use crate::host::notify;

/// How long stopping waits for the tasks, all together, and then for the data plane.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(
    config_path: &Path,
    reset_state: bool,
    set_log: Option<SetLog>,
) -> anyhow::Result<()> {
    match App::build(config_path, reset_state, set_log).await? {
        Some(app) => app.run().await,
        None => Ok(()),
    }
}

/// A daemon built and installed, not yet running.
pub struct App {
    origin: PathBuf,
    config: Config,
    checked: Checked,
    bound: Bound,
    host: Host,
    set_log: Option<SetLog>,
}

impl App {
    /// Checks, binds, installs; `None` when a signal ended the wait for this node's Node
    /// (nothing was set up).
    pub async fn build(
        config_path: &Path,
        reset_state: bool,
        set_log: Option<SetLog>,
    ) -> anyhow::Result<Option<Self>> {
        let mut config = Config::load(config_path)?;
        let certified = certify::certify(&mut config, config_path, control::now_millis())?;
        if let Some(c) = &certified {
            if let Some(path) = &config.mesh.certificate {
                c.log_window(path);
            }
            info!(
                pod_cidrs = ?c.certificate.pod_cidrs, not_after_ms = c.certificate.not_after,
                "certified by mesh.authority: claiming the certificate's blocks only"
            );
        }
        let mut checked = setup::check(&config, config_path, reset_state).await?;
        checked.certified = certified;
        let Some(bound) = setup::bind(&config, &checked).await? else {
            info!("stopped while waiting for the Node; nothing was set up");
            return Ok(None);
        };
        let host = setup::install(&config, config_path, &checked.plan, &bound).await?;
        info!(
            node = %config.node.name, interface = %config.router.interface, mtu = bound.mtu,
            port = config.router.port, addresses = ?checked.plan.addresses,
            routes = ?checked.plan.routes, peers = checked.plan.peers.len(),
            public_key = %checked.public_key, "weft is up"
        );
        Ok(Some(Self {
            origin: config_path.to_path_buf(),
            config,
            checked,
            bound,
            host,
            set_log,
        }))
    }

    /// Starts the tasks and serves until stop; then stops them and removes what was installed.
    pub async fn run(self) -> anyhow::Result<()> {
        let mut running = self.start();
        let outcome = running.serve().await;
        running.stop().await;
        outcome
    }

    /// Spawns every task.
    fn start(self) -> Running {
        let (config, checked, bound, host) = (self.config, self.checked, self.bound, self.host);
        let mut tasks = Tasks::default();
        let (mut wiring, commands, mesh_rx) = Wiring::new(&config, &checked, &bound);
        let (data_stop, data_stop_rx) = watch::channel(false);
        let data_plane = weft_router::driver::spawn(
            checked.router,
            host.tun,
            bound.udp,
            config.router.offload,
            commands,
            data_stop_rx,
        );
        let ready = Arc::new(AtomicBool::new(false));
        let metrics = api::metrics::serve(bound.metrics, wiring.sources(&ready), tasks.shutdown());
        tasks.spawn("metrics", metrics);
        if let (Some((secret, listener)), Some(rx)) = (bound.gossip, mesh_rx) {
            let parts = MeshParts {
                config: &config,
                blocks: &checked.blocks,
                pools: checked.pools,
                state_file: checked.state_file,
                key_bytes: &checked.key_bytes,
                wireguard_key: checked.wireguard_key,
                seed: checked.mesh_seed,
                started: checked.started,
                kube: checked.kube,
                facts: &bound.facts,
                public_key: &checked.public_key,
                plan_peers: checked.plan.peers.clone(),
                netlink: &bound.netlink,
                mtu: bound.mtu,
                index: host.index,
                masquerade: host.masquerade.clone(),
                conflist: &host.conflist,
            };
            start_mesh(
                &mut tasks,
                &mut wiring,
                parts,
                (secret, listener, bound.relay),
                rx,
            );
        }
        watch_certificate(&mut tasks, &wiring);
        notify::send(sd_notify::NotifyState::Ready);
        ready.store(true, Ordering::Release);
        tasks.spawn(
            "systemd status",
            notify::run(wiring.router.clone(), tasks.shutdown()),
        );
        let reloader = Reloader {
            path: self.origin,
            config: config.clone(),
            netlink: bound.netlink.clone(),
            interface: (config.router.interface.clone(), host.index),
            mtu: bound.mtu,
            underlay: bound.facts.private_address,
            router: wiring.router.clone(),
            mesh: wiring.mesh.clone(),
            statics: wiring.statics.take(),
            node: wiring.node.clone(),
            conflist: host.conflist.clone(),
            set_log: self.set_log,
            certified: wiring.certified.clone(),
        };
        let shared = wiring.shared(crate::cni::Store::load(config.state_dir.join("cni.json")));
        Running {
            tasks,
            connections: Tasks::default(),
            data_plane,
            data_stop,
            reloader,
            shared,
            signals: bound.signals,
            api_socket: bound.api_socket,
            installed: host.installed,
        }
    }
}

/// The node's status as it starts.
fn node_status(config: &Config, checked: &Checked, bound: &Bound) -> NodeStatus {
    let mut shown = NodeStatus {
        name: config.node.name.clone(),
        region: None,
        public_key: checked.public_key.clone(),
        pod_cidrs: checked
            .plan
            .pod_cidrs
            .iter()
            .map(ToString::to_string)
            .collect(),
        private_address: None,
        public_address: None,
        region_source: None,
        private_address_source: None,
        public_address_source: None,
        interface: config.router.interface.clone(),
        mtu: bound.mtu,
        listen_port: config.router.port,
        observed_endpoints: Vec::new(),
        home_relays: Vec::new(),
        certificate_not_after_ms: checked.certified.as_ref().map(|c| c.certificate.not_after),
    };
    shown.set_facts(&bound.facts);
    shown
}

/// What the tasks share, filled in as they start.
struct Wiring {
    router: RouterHandle,
    mesh: Option<MeshHandle>,
    infos: control::PeerInfos,
    ipam: Arc<api::metrics::IpamCounters>,
    statics: Option<watch::Sender<Vec<weft_router::PeerConfig>>>,
    kube: Option<Arc<std::sync::Mutex<String>>>,
    node: Arc<std::sync::Mutex<NodeStatus>>,
    relay: crate::relay::service::RelayStats,
    /// `mesh.authority` and this node's certificate, checked at start.
    certified: Option<certify::Certified>,
}

impl Wiring {
    /// The handles (the router's, and the mesh's when it is on) and the shared state, with
    /// the receivers the two drivers read.
    fn new(
        config: &Config,
        checked: &Checked,
        bound: &Bound,
    ) -> (
        Self,
        mpsc::Receiver<weft_router::driver::Command>,
        Option<mpsc::Receiver<weft_mesh::driver::Command>>,
    ) {
        let (router, commands) = RouterHandle::channel();
        let (mesh, mesh_rx) = match &bound.gossip {
            Some(_) => {
                let (h, rx) = MeshHandle::channel();
                (Some(h), Some(rx))
            }
            None => (None, None),
        };
        let node = node_status(config, checked, bound);
        let wiring = Self {
            router,
            mesh,
            infos: control::PeerInfos::default(),
            ipam: Arc::new(api::metrics::IpamCounters::default()),
            statics: None,
            kube: None,
            node: Arc::new(std::sync::Mutex::new(node)),
            relay: crate::relay::service::RelayStats::default(),
            certified: checked.certified.clone(),
        };
        (wiring, commands, mesh_rx)
    }

    /// What a metrics scrape reads.
    fn sources(&self, ready: &Arc<AtomicBool>) -> api::metrics::Sources {
        api::metrics::Sources {
            router: self.router.clone(),
            mesh: self.mesh.clone(),
            ipam: self.ipam.clone(),
            relay: self.relay.clone(),
            ready: ready.clone(),
            cache: api::metrics::ScrapeCache::default(),
        }
    }

    /// What the API answers from.
    fn shared(&self, cni: crate::cni::Store) -> Shared {
        Shared {
            router: self.router.clone(),
            mesh: self.mesh.clone(),
            infos: self.infos.clone(),
            ipam: self.ipam.clone(),
            node: self.node.clone(),
            cni,
            kube: self.kube.clone(),
        }
    }
}

/// What starting the mesh takes from the build.
struct MeshParts<'a> {
    config: &'a Config,
    blocks: &'a [weft_ipam::SavedBlock],
    pools: Vec<weft_ipam::Pool>,
    state_file: PathBuf,
    key_bytes: &'a [u8; 32],
    wireguard_key: [u8; 32],
    seed: u64,
    started: std::time::Instant,
    kube: Option<kube::Client>,
    facts: &'a control::k8s::OwnFacts,
    public_key: &'a str,
    plan_peers: Vec<weft_router::PeerConfig>,
    netlink: &'a crate::host::netlink::Netlink,
    mtu: u16,
    index: u32,
    masquerade: Option<control::Masquerade>,
    conflist: &'a crate::cni::ConflistWriter,
}

/// Starts the mesh driver, the Kubernetes source (when enabled) and the reconcile loop.
fn start_mesh(
    tasks: &mut Tasks,
    wiring: &mut Wiring,
    p: MeshParts<'_>,
    (secret, listener, relay_socket): (
        [u8; 32],
        tokio::net::TcpListener,
        Option<tokio::net::UdpSocket>,
    ),
    mesh_rx: mpsc::Receiver<weft_mesh::driver::Command>,
) {
    let config = p.config;
    let Some(mesh_handle) = wiring.mesh.clone() else {
        return;
    };
    let certified = wiring.certified.clone();
    let record = own_record(&p, certified.as_ref());
    let identity = Identity::from_wireguard_key(p.key_bytes);
    let owner = identity.id().0;
    let relay = relay_socket.map(|socket| {
        let relay = crate::relay::service::RelayConfig {
            key: crate::relay::wire::MacKey::new(&secret),
            identity: identity.clone(),
            router_port: config.router.port,
            stats: wiring.relay.clone(),
        };
        let (handle, service) = crate::relay::service::start(relay, socket, tasks.shutdown());
        tasks.spawn("relay", service);
        handle
    });
    let mut mesh = Membership::new(p.started, identity, record, mesh_config(config), p.seed);
    mesh.join(&config.mesh.peers);
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let (external, cluster) = match p.kube.clone() {
        Some(client) => {
            let (blocks_rx, names_rx) =
                start_kubernetes(tasks, wiring, &p, client, mesh_handle.clone());
            (Some(blocks_rx), Some(names_rx))
        }
        None => (None, None),
    };
    let driver = MeshDriver::new(mesh, listener, secret);
    let shutdown = tasks.shutdown();
    tasks.spawn("mesh", async move {
        if let Err(e) = driver.run(mesh_rx, ev_tx, shutdown.into_receiver()).await {
            error!(error = %e, "the mesh failed");
        }
    });
    if !p.blocks.is_empty()
        && let Err(e) = control::write_state(&p.state_file, p.blocks)
    {
        warn!(error = %e, path = %p.state_file.display(), "could not persist the pod blocks");
    }
    let ipam = ipam_of(&p, wiring, owner, external);
    let (statics_tx, statics_rx) = watch::channel(p.plan_peers);
    wiring.statics = Some(statics_tx);
    tasks.spawn(
        "reconcile",
        control::reconcile_loop(
            control::Inputs {
                statics: statics_rx,
                cluster,
                claims: control::claims::ClaimPolicy::from_config(
                    &config.network,
                    certified.map(|c| c.authorities).unwrap_or_default(),
                ),
                relay,
                relay_policy: config.mesh.relay.clone(),
            },
            wiring.router.clone(),
            mesh_handle,
            ev_rx,
            wiring.infos.clone(),
            ipam,
            tasks.shutdown(),
        ),
    );
}

/// With `mesh.authority`, warns as this node's certificate nears its end.
fn watch_certificate(tasks: &mut Tasks, wiring: &Wiring) {
    if wiring.certified.is_some() {
        let watch = certify::watch_expiry(wiring.node.clone(), tasks.shutdown());
        tasks.spawn("certificate expiry", watch);
    }
}

/// This node's first record: the config's, with the facts found at start and its certificate.
fn own_record(p: &MeshParts<'_>, certified: Option<&certify::Certified>) -> weft_mesh::NodeRecord {
    let mut record = control::own_record(p.config, p.wireguard_key, p.blocks);
    record.region.clone_from(&p.facts.region);
    (record.private_address, record.public_address) =
        (p.facts.private_address, p.facts.public_address);
    record.certificate = certified.map(|c| Box::new(c.certificate.clone()));
    record
}

/// The IPAM side of the reconcile loop.
fn ipam_of(
    p: &MeshParts<'_>,
    wiring: &Wiring,
    owner: [u8; 32],
    external: Option<watch::Receiver<Vec<ipnet::IpNet>>>,
) -> control::Ipam {
    let config = p.config;
    control::Ipam {
        blocks: control::blocks::Blocks {
            pools: certify::claimable(&p.pools, wiring.certified.as_ref()),
            owner,
            fixed: config.node.pod_cidr.clone(),
            held: p.blocks.to_vec(),
            expiry: config.network.block_expiry,
        },
        state_file: p.state_file.clone(),
        counters: wiring.ipam.clone(),
        masquerade: p.masquerade.clone(),
        conflist: p.conflist.clone(),
        settle: 3 * config.mesh.gossip_interval,
        started: p.started,
        netlink: p.netlink.clone(),
        index: p.index,
        reported: std::collections::BTreeSet::new(),
        external,
    }
}

/// Starts the Kubernetes node source and the loop that turns its view into this node's facts,
/// blocks and bootstrap peers; returns the blocks and the cluster's Nodes.
fn start_kubernetes(
    tasks: &mut Tasks,
    wiring: &mut Wiring,
    p: &MeshParts<'_>,
    client: kube::Client,
    mesh: MeshHandle,
) -> (
    watch::Receiver<Vec<ipnet::IpNet>>,
    watch::Receiver<Option<control::ClusterNodes>>,
) {
    let config = p.config;
    let state = Arc::new(std::sync::Mutex::new("starting".to_owned()));
    wiring.kube = Some(state.clone());
    let (blocks_tx, blocks_rx) = watch::channel(config.node.pod_cidr.clone());
    let (names_tx, names_rx) = watch::channel(None);
    let (src_tx, src_rx) = mpsc::channel(16);
    let source = control::nodesource::NodeSource {
        client,
        me: config.node.name.clone(),
        public_key: p.public_key.to_owned(),
        mark_again_after: control::nodesource::MARK_AGAIN_AFTER,
    };
    tasks.spawn("kubernetes source", source.run(src_tx, tasks.shutdown()));
    tasks.spawn(
        "kubernetes",
        control::kubernetes_loop(
            (
                config.node.clone(),
                // Only the pools and block sizes: what the peers accept of a Node's blocks.
                control::claims::ClaimPolicy::from_config(&config.network, Vec::new()),
            ),
            (config.mesh.port, config.mesh.peers.clone()),
            src_rx,
            mesh,
            (blocks_tx, names_tx),
            state,
            control::OwnNode {
                status: wiring.node.clone(),
                mtu: config.network.mtu.is_none().then(|| control::MtuSource {
                    netlink: p.netlink.clone(),
                    address: p.facts.private_address,
                    mtu: p.mtu,
                }),
            },
        ),
    );
    (blocks_rx, names_rx)
}

/// The mesh's settings from the config.
fn mesh_config(config: &Config) -> MeshConfig {
    MeshConfig {
        gossip_interval: config.mesh.gossip_interval,
        liveness_timeout: config.mesh.liveness_timeout,
        tombstone_horizon: config.mesh.tombstone_horizon,
        max_members: config.mesh.max_members,
        record_refresh: config.mesh.record_refresh,
        ..MeshConfig::default()
    }
}

/// The daemon while it runs.
struct Running {
    tasks: Tasks,
    /// API connections, stopped with the rest.
    connections: Tasks,
    data_plane: JoinHandle<std::io::Result<Router>>,
    data_stop: watch::Sender<bool>,
    reloader: Reloader,
    shared: Shared,
    signals: Signals,
    api_socket: ApiSocket,
    installed: Installed,
}

impl Running {
    /// Serves signals and the API until SIGTERM, SIGINT or the data plane's end.
    async fn serve(&mut self) -> anyhow::Result<()> {
        loop {
            tokio::select! {
                _ = self.signals.term.recv() => { info!("SIGTERM: shutting down"); return Ok(()) }
                _ = self.signals.int.recv() => { info!("SIGINT: shutting down"); return Ok(()) }
                _ = self.signals.hup.recv() => {
                    notify::send(sd_notify::NotifyState::Reloading);
                    self.reloader.on_hangup().await;
                    notify::send(sd_notify::NotifyState::Ready);
                }
                accepted = self.api_socket.listener.accept() => match accepted {
                    Ok((stream, _)) if !api::allowed_peer(&stream) => {
                        warn!(peer = ?stream.peer_cred().ok(), "API connection from another user refused");
                    }
                    Ok((stream, _)) => self.connect(stream),
                    Err(e) => warn!(error = %e, "API accept failed"),
                },
                r = &mut self.data_plane => {
                    return match r {
                        Ok(Ok(_)) => Err(anyhow::anyhow!("the data plane stopped unexpectedly")),
                        Ok(Err(e)) => Err(anyhow::Error::new(e).context("the data plane failed")),
                        Err(e) => Err(anyhow::Error::new(e).context("the data plane panicked")),
                    };
                }
            }
        }
    }

    /// Serves one API connection until it ends or the daemon stops.
    fn connect(&mut self, stream: tokio::net::UnixStream) {
        self.connections.reap();
        let sh = self.shared.clone();
        let mut stop = self.connections.shutdown();
        self.connections.spawn("API connection", async move {
            let answer = |req| answer::answer(req, sh.clone());
            tokio::select! {
                r = api::serve_connection(stream, answer) => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "API connection ended");
                    }
                }
                () = stop.wait() => {}
            }
        });
    }

    /// Stops every task (the mesh says goodbye first), then the data plane, then removes what
    /// was installed.
    async fn stop(self) {
        notify::send(sd_notify::NotifyState::Stopping);
        let Self {
            tasks,
            connections,
            mut data_plane,
            data_stop,
            installed,
            api_socket,
            ..
        } = self;
        let (a, b) = tokio::join!(tasks.stop(STOP_TIMEOUT), connections.stop(STOP_TIMEOUT));
        if a + b > 0 {
            error!(tasks = a + b, "tasks did not stop in {STOP_TIMEOUT:?}");
        }
        let _ = data_stop.send(true);
        if !data_plane.is_finished() {
            match tokio::time::timeout(STOP_TIMEOUT, &mut data_plane).await {
                Ok(_) => {}
                Err(_) => {
                    error!("the data plane did not stop in {STOP_TIMEOUT:?}");
                    data_plane.abort();
                }
            }
        }
        // The TUN device went with the driver; make sure, and take the routes with it.
        installed.remove().await;
        drop(api_socket);
        info!("weft stopped");
    }
}
