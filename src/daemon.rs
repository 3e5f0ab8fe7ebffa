//! `weft run`: wires the config, the key, the TUN device, the UDP socket, the router driver and
//! the local API together, and takes them apart again on SIGTERM/SIGINT.
//!
//! Everything that can be checked is checked before the host is touched (config, key file,
//! peers, interface name free, UDP port free, API socket free); the TUN device is created last,
//! and any failure after that deletes it again, so a daemon that cannot start leaves the host as
//! it found it.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use ipnet::IpNet;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};
use weft_config::Config;
use weft_ipam::{Pool, SavedBlock};
use weft_mesh::driver::{Command as MeshCommand, MeshDriver, Snapshot as MeshSnapshot};
use weft_mesh::{Identity, Membership, MeshConfig};
use weft_router::driver::{Command, Snapshot, bind_udp, open_tun};
use weft_router::{PathKind, PeerConfig, Router};

use crate::api::{self, ApiSocket, Request, Response};
use crate::control;
use crate::installed::Installed;
use crate::k8s::OwnFacts;
use crate::keys;
use crate::netlink::Netlink;
use crate::notify;
use crate::shutdown::Shutdown;
use crate::status::{MeshMember, MeshStatus, NodeStatus, PeerStatus, Status};

/// Overlay MTU when the underlay's cannot be found.
const FALLBACK_MTU: u16 = 1420;
/// How long shutdown waits for the data plane to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// What the daemon will set up, computed from the config before anything is touched.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The node's pod CIDRs.
    pub pod_cidrs: Vec<IpNet>,
    /// The TUN device's addresses: the first host of each pod CIDR, as a host prefix.
    pub addresses: Vec<IpNet>,
    /// Routes into the TUN device: `pod_network_cidr`, and peers' prefixes outside it.
    pub routes: Vec<IpNet>,
    /// The router's peers.
    pub peers: Vec<PeerConfig>,
}

/// The first host address of `net` (the network address itself for a host prefix).
pub fn first_host(net: IpNet) -> IpAddr {
    let n = net.trunc();
    match n {
        IpNet::V4(v4) if v4.prefix_len() < 32 => {
            std::net::Ipv4Addr::from(u32::from(v4.network()) + 1).into()
        }
        IpNet::V6(v6) if v6.prefix_len() < 128 => {
            std::net::Ipv6Addr::from(u128::from(v6.network()) + 1).into()
        }
        _ => n.addr(),
    }
}

/// The TUN device's address for pod block `net`: its first host, as a host prefix.
pub fn overlay_address(net: IpNet) -> IpNet {
    let a = first_host(net);
    IpNet::new(a, if a.is_ipv4() { 32 } else { 128 }).expect("a host prefix is valid")
}

impl Plan {
    /// The plan for `config`, read from `origin`; `blocks` are the node's pod blocks (static,
    /// or restored), and may be empty only when the mesh will claim them (`mesh_on`).
    pub fn new(
        config: &Config,
        origin: &Path,
        blocks: &[IpNet],
        mesh_on: bool,
    ) -> anyhow::Result<Self> {
        if blocks.is_empty() && !mesh_on {
            bail!(
                "{}: node.pod_cidr: required when the node has no mesh to claim a block from: \
                 set it (for example `pod_cidr: 100.64.1.0/24`), or give the node the cluster \
                 secret (mesh.secret_file)",
                origin.display()
            );
        }
        let pod_cidrs = blocks.to_vec();
        let addresses = pod_cidrs.iter().copied().map(overlay_address).collect();
        Ok(Self {
            pod_cidrs,
            addresses,
            routes: routes(config),
            peers: static_peers(config),
        })
    }
}

/// Routes into the TUN device: `pod_network_cidr`, and `wireguard_peers` prefixes outside it.
pub fn routes(config: &Config) -> Vec<IpNet> {
    let mut routes = config.network.pod_network_cidr.clone();
    for net in config.wireguard_peers.iter().flat_map(|p| &p.allowed_ips) {
        if !routes.iter().any(|r| r.contains(net)) {
            routes.push(*net);
        }
    }
    routes
}

/// The router's view of `wireguard_peers`.
pub fn static_peers(config: &Config) -> Vec<PeerConfig> {
    config
        .wireguard_peers
        .iter()
        .map(|p| PeerConfig {
            name: p.name.clone(),
            public_key: p.public_key.0,
            endpoint: p.endpoint,
            allowed_ips: p.allowed_ips.clone(),
            persistent_keepalive: p.persistent_keepalive,
            path: PathKind::Encrypted,
        })
        .collect()
}

/// The overlay MTU: the configured one, else the underlay's (the link of `private`, the node's
/// effective private address: the config's, or its Node's) minus WireGuard's overhead, else
/// 1420.
pub async fn choose_mtu(
    config: &Config,
    nl: &Netlink,
    private: Option<IpAddr>,
) -> anyhow::Result<u16> {
    if let Some(mtu) = config.network.mtu {
        return Ok(mtu);
    }
    let Some(addr) = private else {
        return Ok(FALLBACK_MTU);
    };
    Ok(match underlay_mtu(nl, addr).await? {
        Some(m) => m,
        None => {
            warn!(%addr, "the private address is on no local link; using MTU {FALLBACK_MTU}");
            FALLBACK_MTU
        }
    })
}

/// The overlay MTU the link carrying `addr` allows (its MTU minus WireGuard's overhead, at
/// least 1280), if a local link carries it.
pub async fn underlay_mtu(nl: &Netlink, addr: IpAddr) -> anyhow::Result<Option<u16>> {
    let overhead = if addr.is_ipv4() { 60 } else { 80 };
    Ok(nl.mtu_of_address(addr).await?.map(|m| {
        u16::try_from(m.saturating_sub(overhead))
            .unwrap_or(FALLBACK_MTU)
            .max(1280)
    }))
}

/// This node's facts before the TUN device exists. With Kubernetes and neither `network.mtu`
/// nor `node.private_address` set, the MTU depends on the Node's private address, so this
/// waits for the Node (saying so) rather than change a live MTU later: pods keep the MTU
/// their interface got when they started. `None` when a signal ended the wait.
async fn facts_before_the_device(
    config: &Config,
    kube: Option<&kube::Client>,
    signals: (
        &mut tokio::signal::unix::Signal,
        &mut tokio::signal::unix::Signal,
    ),
) -> Option<OwnFacts> {
    let client = match kube {
        Some(c) if config.network.mtu.is_none() && config.node.private_address.is_none() => c,
        _ => return Some(OwnFacts::from_config(&config.node)),
    };
    info!(
        node = %config.node.name,
        "waiting for this node's Node before creating the TUN device: the link of its private \
         address (InternalIP, or the weft.dev/private-address annotation) sets the overlay MTU"
    );
    let view = tokio::select! {
        v = crate::nodesource::wait_for_node(client.clone(), &config.node.name) => v,
        _ = signals.0.recv() => return None,
        _ = signals.1.recv() => return None,
    };
    let facts = crate::k8s::own_facts(&view, &config.node);
    match facts.private_address {
        Some(a) => info!(private = %a, "this node's private address from its Node"),
        None => warn!(
            node = %config.node.name,
            "the Node has no InternalIP and no weft.dev/private-address: the MTU cannot follow \
             the underlay; set network.mtu or node.private_address"
        ),
    }
    Some(facts)
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(
    config_path: &Path,
    reset_state: bool,
    set_log: Option<crate::reload::SetLog>,
) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let secret = control::load_secret(&config, config_path)?;
    // The Kubernetes source needs the mesh (keys and paths travel by gossip) and a client
    // config; the API itself may be down, which the source rides out.
    let kube_client = if config.kubernetes.enabled {
        if secret.is_none() {
            bail!(
                "{}: kubernetes.enabled: needs the mesh: give every node the cluster secret \
                 (mesh.secret_file {})",
                config_path.display(),
                config.mesh.secret_file.display()
            );
        }
        Some(kube::Client::try_default().await.with_context(|| {
            format!(
                "{}: kubernetes.enabled: no in-cluster service account and no usable KUBECONFIG",
                config_path.display()
            )
        })?)
    } else {
        None
    };
    let state_file = config.state_dir.join("ipam.json");
    let pools = config
        .network
        .pod_network_cidr
        .iter()
        .map(|n| {
            let mask = if n.addr().is_ipv4() {
                config.network.node_cidr_mask_size_ipv4
            } else {
                config.network.node_cidr_mask_size_ipv6
            };
            Pool::new(*n, mask)
        })
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: network.pod_network_cidr", config_path.display()))?;
    let blocks = initial_blocks(
        &config,
        &pools,
        &control::read_state(&state_file, reset_state)?,
    );
    let plan = Plan::new(
        &config,
        config_path,
        &blocks.iter().map(|b| b.block).collect::<Vec<_>>(),
        secret.is_some(),
    )?;
    let (key, created) = keys::load_or_create(&config.node.key_file)?;
    let public_key = keys::public_of(&key);
    if created {
        info!(path = %config.node.key_file.display(), %public_key, "created a new private key");
    }
    let seed_bytes = keys::generate_secret();
    let seed = u32::from_le_bytes(seed_bytes[..4].try_into().expect("4 of 32 bytes"));
    let mesh_seed = u64::from_le_bytes(seed_bytes[8..16].try_into().expect("8 of 32 bytes"));
    let key_bytes = key.to_bytes();
    let mut router = Router::new(key, seed);
    let wireguard_key = router.public_key();
    #[expect(
        clippy::disallowed_methods,
        reason = "the daemon is a driver: it owns the clock"
    )]
    let now = std::time::Instant::now();
    for (i, p) in plan.peers.iter().enumerate() {
        router.add_peer(now, p.clone()).with_context(|| {
            format!(
                "{}: wireguard_peers[{i}] ({})",
                config_path.display(),
                p.name
            )
        })?;
    }

    let iface = config.router.interface.clone();
    let nl = Netlink::connect().context("opening a netlink socket")?;
    if nl.link(&iface).await?.is_some() {
        bail!(
            "interface {iface} already exists: another weft daemon may be running, or set \
             router.interface to another name"
        );
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let Some(facts) =
        facts_before_the_device(&config, kube_client.as_ref(), (&mut term, &mut int)).await
    else {
        info!("stopped while waiting for the Node; nothing was set up");
        return Ok(());
    };
    let mtu = choose_mtu(&config, &nl, facts.private_address).await?;
    let offload = config.router.offload;
    let udp = bind_udp(config.router.port, &offload)
        .with_context(|| format!("binding UDP port {} (router.port)", config.router.port))?;
    let gossip = match secret {
        Some(secret) => Some((secret, control::bind_gossip(config.mesh.port).await?)),
        None => None,
    };
    let api_socket = ApiSocket::bind(&config.api_socket).await?;
    let metrics_listener = tokio::net::TcpListener::bind(config.metrics_address)
        .await
        .with_context(|| {
            format!(
                "binding metrics_address {} (set another, e.g. 127.0.0.1:0)",
                config.metrics_address
            )
        })?;

    // From here on the host changes: `installed` undoes it on every way out.
    let (tun, tun_offload) =
        open_tun(&iface, offload.tun).with_context(|| format!("creating TUN device {iface}"))?;
    let mut installed = Installed::new(nl.clone(), iface.clone());
    let index = match nl.link(&iface).await {
        Ok(Some((index, _))) => index,
        Ok(None) => bail!("TUN device {iface} vanished right after its creation"),
        Err(e) => return Err(e.into()),
    };
    nl.configure(&iface, index, mtu, &plan.addresses, &plan.routes)
        .await?;
    let masquerade = config.network.nat_outgoing.then(|| control::Masquerade {
        keep: config
            .network
            .pod_network_cidr
            .iter()
            .chain(&config.network.no_masquerade)
            .copied()
            .collect(),
        interface: iface.clone(),
    });
    info!(
        allowed = ?offload.names(),
        batched_receive = offload.udp_batch,
        udp_gso_segments = udp.max_segments(),
        udp_gro = udp.gro(),
        tun_offload = tun_offload,
        "data path offloads"
    );
    if let Some(m) = &masquerade {
        installed.masquerading();
        m.apply(&plan.pod_cidrs);
    }
    let conflist = crate::cni::ConflistWriter::new(
        config.cni.conflist.clone(),
        mtu,
        config.api_socket.clone(),
        config.state_dir.join("cni-ipam"),
    );
    conflist.write(&plan.pod_cidrs).with_context(|| {
        format!(
            "{}: cni.conflist: writing {}",
            config_path.display(),
            conflist.path().unwrap_or(Path::new("")).display()
        )
    })?;
    info!(
        node = %config.node.name, interface = %iface, mtu, port = config.router.port,
        addresses = ?plan.addresses, routes = ?plan.routes, peers = plan.peers.len(), %public_key,
        "weft is up"
    );

    let mut shown = NodeStatus {
        name: config.node.name.clone(),
        region: None,
        public_key: public_key.clone(),
        pod_cidrs: plan.pod_cidrs.iter().map(ToString::to_string).collect(),
        private_address: None,
        public_address: None,
        region_source: None,
        private_address_source: None,
        public_address_source: None,
        interface: iface.clone(),
        mtu,
        listen_port: config.router.port,
    };
    shown.set_facts(&facts);
    let node = Arc::new(std::sync::Mutex::new(shown));
    let (cmd_tx, cmd_rx) = mpsc::channel(64);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut data_plane =
        weft_router::driver::spawn(router, tun, udp, offload, cmd_rx, stop_rx.clone());
    let infos = control::PeerInfos::default();
    let (mesh_tx, mesh_rx) = mpsc::channel(64);
    let mut helpers = Vec::new();
    let ipam_counters = Arc::new(crate::metrics::IpamCounters::default());
    let mut statics_tx = None;
    let mut kube_state = None;
    let ready_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    info!(address = %metrics_listener.local_addr()?, "metrics at /metrics, health at /healthz");
    helpers.push(tokio::spawn(crate::metrics::serve(
        metrics_listener,
        crate::metrics::Sources {
            router: cmd_tx.clone(),
            mesh: mesh_tx.clone(),
            ipam: ipam_counters.clone(),
            ready: ready_flag.clone(),
            cache: crate::metrics::ScrapeCache::default(),
        },
        Shutdown::new(stop_tx.subscribe()),
    )));
    if let Some((secret, listener)) = gossip {
        let mut record = control::own_record(&config, wireguard_key, &blocks);
        record.region.clone_from(&facts.region);
        (record.private_address, record.public_address) =
            (facts.private_address, facts.public_address);
        let mesh_config = MeshConfig {
            gossip_interval: config.mesh.gossip_interval,
            liveness_timeout: config.mesh.liveness_timeout,
            tombstone_horizon: config.mesh.tombstone_horizon,
            max_members: config.mesh.max_members,
            record_refresh: config.mesh.record_refresh,
            ..MeshConfig::default()
        };
        let identity = Identity::from_wireguard_key(&key_bytes);
        let identity_id = identity.id();
        let mut mesh = Membership::new(now, identity, record, mesh_config, mesh_seed);
        mesh.join(&config.mesh.peers);
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let mut cluster_rx = None;
        kube_state = kube_client
            .is_some()
            .then(|| Arc::new(std::sync::Mutex::new("starting".to_owned())));
        let external_rx = match kube_client.clone() {
            Some(client) => {
                let (blocks_tx, blocks_rx) = watch::channel(config.node.pod_cidr.clone());
                let (names_tx, names_rx) = watch::channel(None);
                cluster_rx = Some(names_rx);
                let (src_tx, src_rx) = mpsc::channel(16);
                let source = crate::nodesource::NodeSource {
                    client,
                    me: config.node.name.clone(),
                    public_key: public_key.clone(),
                };
                helpers.push(tokio::spawn(
                    source.run(src_tx, Shutdown::new(stop_tx.subscribe())),
                ));
                helpers.push(tokio::spawn(control::kubernetes_loop(
                    config.node.clone(),
                    (config.mesh.port, config.mesh.peers.clone()),
                    src_rx,
                    mesh_tx.clone(),
                    (blocks_tx, names_tx),
                    kube_state.clone().unwrap_or_default(),
                    control::OwnNode {
                        status: node.clone(),
                        mtu: config.network.mtu.is_none().then(|| control::MtuSource {
                            netlink: nl.clone(),
                            address: facts.private_address,
                            mtu,
                        }),
                    },
                )));
                Some(blocks_rx)
            }
            None => None,
        };
        let driver = MeshDriver::new(mesh, listener, secret);
        helpers.push(tokio::spawn(async move {
            if let Err(e) = driver.run(mesh_rx, ev_tx, stop_rx).await {
                error!(error = %e, "the mesh failed");
            }
        }));
        if !blocks.is_empty()
            && let Err(e) = control::write_state(&state_file, &blocks)
        {
            warn!(error = %e, path = %state_file.display(), "could not persist the pod blocks");
        }
        let ipam = control::Ipam {
            blocks: crate::blocks::Blocks {
                pools,
                owner: identity_id.0,
                fixed: config.node.pod_cidr.clone(),
                held: blocks.clone(),
                expiry: config.network.block_expiry,
            },
            state_file: state_file.clone(),
            counters: ipam_counters.clone(),
            masquerade: masquerade.clone(),
            conflist: conflist.clone(),
            settle: 3 * config.mesh.gossip_interval,
            started: now,
            netlink: nl.clone(),
            index,
            reported: std::collections::BTreeSet::new(),
            external: external_rx.clone(),
        };
        let (tx, rx) = watch::channel(plan.peers.clone());
        statics_tx = Some(tx);
        helpers.push(tokio::spawn(control::reconcile_loop(
            control::Inputs {
                statics: rx,
                cluster: cluster_rx,
                claims: crate::claims::ClaimPolicy::from_config(&config.network),
            },
            cmd_tx.clone(),
            mesh_tx.clone(),
            ev_rx,
            infos.clone(),
            ipam,
            Shutdown::new(stop_tx.subscribe()),
        )));
    } else {
        drop(mesh_rx);
    }
    notify::send(sd_notify::NotifyState::Ready);
    ready_flag.store(true, std::sync::atomic::Ordering::Release);
    helpers.push(tokio::spawn(notify::run(
        cmd_tx.clone(),
        Shutdown::new(stop_tx.subscribe()),
    )));

    let mut reloader = crate::reload::Reloader {
        path: config_path.to_path_buf(),
        config: config.clone(),
        netlink: nl.clone(),
        interface: (iface.clone(), index),
        mtu,
        underlay: facts.private_address,
        router: cmd_tx.clone(),
        mesh: mesh_tx.clone(),
        statics: statics_tx,
        node: node.clone(),
        conflist: conflist.clone(),
        set_log,
    };
    let shared = Shared {
        router: cmd_tx.clone(),
        mesh: mesh_tx.clone(),
        infos: infos.clone(),
        ipam: ipam_counters.clone(),
        node: node.clone(),
        cni: crate::cni::Store::load(config.state_dir.join("cni.json")),
        kube: kube_state.clone(),
    };
    let outcome: anyhow::Result<()> = loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: shutting down"); break Ok(()) }
            _ = int.recv() => { info!("SIGINT: shutting down"); break Ok(()) }
            _ = hup.recv() => {
                notify::send(sd_notify::NotifyState::Reloading);
                reloader.on_hangup().await;
                notify::send(sd_notify::NotifyState::Ready);
            }
            accepted = api_socket.listener.accept() => match accepted {
                Ok((stream, _)) if !api::allowed_peer(&stream) => {
                    warn!(peer = ?stream.peer_cred().ok(), "API connection from another user refused");
                }
                Ok((stream, _)) => {
                    let sh = shared.clone();
                    tokio::spawn(async move {
                        let answer = |req| answer(req, sh.clone());
                        if let Err(e) = api::serve_connection(stream, answer).await {
                            tracing::debug!(error = %e, "API connection ended");
                        }
                    });
                }
                Err(e) => warn!(error = %e, "API accept failed"),
            },
            r = &mut data_plane => {
                break match r {
                    Ok(Ok(_)) => Err(anyhow::anyhow!("the data plane stopped unexpectedly")),
                    Ok(Err(e)) => Err(anyhow::Error::new(e).context("the data plane failed")),
                    Err(e) => Err(anyhow::Error::new(e).context("the data plane panicked")),
                };
            }
        }
    };
    notify::send(sd_notify::NotifyState::Stopping);
    let _ = stop_tx.send(true);
    // The mesh says goodbye (a tombstone) while the data plane still runs.
    for h in helpers {
        if tokio::time::timeout(STOP_TIMEOUT, h).await.is_err() {
            error!("a control task did not stop in {STOP_TIMEOUT:?}");
        }
    }
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
    outcome
}

/// The node's blocks at start: the configured `node.pod_cidr` (keeping the claim time saved
/// for the same block), else the saved blocks that still fit the pools.
fn initial_blocks(config: &Config, pools: &[Pool], saved: &[SavedBlock]) -> Vec<SavedBlock> {
    if !config.node.pod_cidr.is_empty() {
        return crate::blocks::assigned(&config.node.pod_cidr, saved, control::now_millis());
    }
    saved
        .iter()
        .filter(|s| {
            let fits = pools.iter().any(|p| p.holds(&s.block));
            if !fits {
                warn!(block = %s.block, "saved pod block no longer fits network.pod_network_cidr; claiming a new one");
            }
            fits
        })
        .copied()
        .collect()
}

/// What the API answers from.
#[derive(Clone)]
struct Shared {
    router: mpsc::Sender<Command>,
    mesh: mpsc::Sender<MeshCommand>,
    infos: control::PeerInfos,
    ipam: Arc<crate::metrics::IpamCounters>,
    node: Arc<std::sync::Mutex<NodeStatus>>,
    cni: crate::cni::Store,
    kube: Option<Arc<std::sync::Mutex<String>>>,
}

async fn answer(req: Request, sh: Shared) -> Response {
    let listed = |sh: &Shared| Response {
        ok: true,
        status: None,
        error: None,
        attachments: Some(sh.cni.list()),
    };
    match req {
        Request::Status => {
            let snap = control::router_snapshot(&sh.router).await;
            let mesh = control::mesh_snapshot(&sh.mesh).await;
            let infos = sh.infos.lock().map(|i| i.clone()).unwrap_or_default();
            let node = sh
                .node
                .lock()
                .map(|n| n.clone())
                .unwrap_or_else(|e| e.into_inner().clone());
            match snap {
                Some(s) => Response {
                    ok: true,
                    status: Some(Status {
                        kubernetes: sh
                            .kube
                            .as_ref()
                            .and_then(|k| k.lock().ok().map(|k| k.clone())),
                        ..status(&node, &s, mesh.as_ref(), &infos, &sh.ipam)
                    }),
                    error: None,
                    attachments: None,
                },
                None => Response::refused("the data plane is stopping"),
            }
        }
        Request::CniAdd { attachment } => {
            let (cid, ifname) = (attachment.container_id.clone(), attachment.ifname.clone());
            let addrs = attachment.addresses.clone();
            match sh.cni.add(attachment) {
                Ok(()) => {
                    info!(container = %cid, %ifname, addresses = ?addrs, "pod attached");
                    listed(&sh)
                }
                Err(e) => Response::refused(format!("saving the attachment: {e}")),
            }
        }
        Request::CniDel {
            container_id,
            ifname,
        } => match sh.cni.del(&container_id, &ifname) {
            Ok(known) => {
                info!(container = %container_id, %ifname, known, "pod detached");
                listed(&sh)
            }
            Err(e) => Response::refused(format!("saving the attachments: {e}")),
        },
        Request::CniList => listed(&sh),
        Request::CniGc { valid } => match sh.cni.gc(&valid) {
            Ok(gone) => {
                for a in &gone {
                    info!(container = %a.container_id, ifname = %a.ifname, "stale attachment removed (GC)");
                }
                listed(&sh)
            }
            Err(e) => Response::refused(format!("saving the attachments: {e}")),
        },
    }
}

fn shown(a: Option<IpAddr>) -> String {
    a.map_or_else(|| "-".to_owned(), |a| a.to_string())
}

fn drops(d: &weft_router::Drops) -> BTreeMap<String, u64> {
    d.nonzero()
        .map(|(r, n)| (r.as_str().to_owned(), n))
        .collect()
}

/// The status report from the node's facts, a router snapshot and the mesh's view.
pub fn status(
    node: &NodeStatus,
    snap: &Snapshot,
    mesh: Option<&MeshSnapshot>,
    infos: &HashMap<[u8; 32], control::PeerInfo>,
    ipam: &crate::metrics::IpamCounters,
) -> Status {
    let mesh_snap = mesh;
    let peers = snap
        .peers
        .iter()
        .map(|p| PeerStatus {
            name: p.config.name.clone(),
            region: infos
                .get(&p.config.public_key)
                .and_then(|i| i.region.clone()),
            public_key: keys::encode(&p.config.public_key),
            pod_cidrs: p
                .config
                .allowed_ips
                .iter()
                .map(ToString::to_string)
                .collect(),
            endpoint: p.endpoint.map(|e| e.to_string()),
            endpoint_reason: match (p.endpoint, p.endpoint_learned) {
                (None, _) => "none",
                (Some(_), true) => "learned",
                (Some(_), false) => infos
                    .get(&p.config.public_key)
                    .map_or("configured", |i| i.reason.as_str()),
            }
            .to_owned(),
            path: p.config.path.as_str().to_owned(),
            state: p.state.as_str().to_owned(),
            last_handshake_secs: p.last_handshake.map(|d| d.as_secs()),
            rx_bytes: p.counters.rx_bytes,
            tx_bytes: p.counters.tx_bytes,
            drops: drops(&p.counters.drops),
        })
        .collect();
    let mut d = drops(&snap.drops);
    if snap.send_errors > 0 {
        d.insert("send_error".into(), snap.send_errors);
    }
    let mesh = mesh.map(|m| {
        let mut drops = BTreeMap::new();
        for (k, v) in [
            ("malformed", m.drops.malformed),
            ("unauthenticated", m.drops.unauthenticated),
            ("stale", m.drops.stale),
            ("unexpected", m.drops.unexpected),
            ("handshake_failed", m.transport.handshake_failed),
            ("undecryptable", m.transport.undecryptable),
            ("write_queue_full", m.transport.write_queue_full),
            ("unconfirmed", m.transport.unconfirmed),
            ("pending_refused", m.transport.pending_refused),
            ("timed_out", m.transport.timed_out),
        ] {
            if v > 0 {
                drops.insert(k.to_owned(), v);
            }
        }
        let refused = ipam
            .claims
            .lock()
            .map(|c| c.current.clone())
            .unwrap_or_default();
        let name = |id: &weft_mesh::NodeId| {
            m.members
                .iter()
                .find(|x| x.id == *id)
                .map_or_else(|| id.to_string(), |x| x.record.name.clone())
        };
        MeshStatus {
            rejected: crate::metrics::rejections(m, ipam).into_iter().collect(),
            identity_clash: m.identity_clash.map(|c| {
                format!(
                    "another daemon runs with this node's key: ours private {} public {}, theirs private {} public {}",
                    shown(c.our_private),
                    shown(c.our_public),
                    shown(c.their_private),
                    shown(c.their_public)
                )
            }),
            address_clashes: m
                .address_clashes
                .iter()
                .map(|c| {
                    format!(
                        "{} is held down: {} is advertised by {}",
                        name(&c.member),
                        c.address,
                        if c.owner == m.me {
                            "this node".to_owned()
                        } else {
                            name(&c.owner)
                        }
                    )
                })
                .collect(),
            node_id: m.me.to_string(),
            members: m
                .members
                .iter()
                .map(|x| MeshMember {
                    claims_refused: refused.get(&x.id.0).cloned(),
                    name: x.record.name.clone(),
                    node_id: x.id.to_string(),
                    region: x.record.region.clone(),
                    alive: x.alive,
                    left: x.record.left,
                    version: x.record.version,
                    pod_cidrs: x.record.pod_cidrs.iter().map(ToString::to_string).collect(),
                })
                .collect(),
            connections: m.connections,
            drops,
        }
    });
    let mut node = node.clone();
    if let Some(m) = mesh.as_ref().and(mesh_snap) {
        node.pod_cidrs = m.record.pod_cidrs.iter().map(ToString::to_string).collect();
    }
    Status {
        node,
        peers,
        drops: d,
        mesh,
        kubernetes: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_host_of_v4_v6_and_host_prefixes() {
        let f = |s: &str| first_host(s.parse().unwrap()).to_string();
        assert_eq!(f("100.64.1.0/24"), "100.64.1.1");
        assert_eq!(f("100.64.1.77/24"), "100.64.1.1");
        assert_eq!(f("fd00:64:1::/64"), "fd00:64:1::1");
        assert_eq!(f("100.64.1.9/32"), "100.64.1.9");
    }

    #[test]
    fn plan_requires_a_pod_cidr_and_routes_outside_prefixes() {
        let path = Path::new("/etc/weft/test.yaml");
        let c = Config::parse("node: {name: a}\n", path, "h").unwrap();
        let e = Plan::new(&c, path, &c.node.pod_cidr, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/etc/weft/test.yaml") && e.contains("node.pod_cidr"),
            "{e}"
        );
        let key = keys::encode(&[3; 32]);
        let text = format!(
            "node: {{pod_cidr: 100.64.1.0/24}}\nwireguard_peers:\n  - name: laptop\n    public_key: {key}\n    allowed_ips: [100.64.2.0/24, 10.99.0.0/16]\n"
        );
        let c = Config::parse(&text, path, "h").unwrap();
        let p = Plan::new(&c, path, &c.node.pod_cidr, false).unwrap();
        let routes: Vec<String> = p.routes.iter().map(ToString::to_string).collect();
        assert_eq!(routes, ["100.64.0.0/16", "10.99.0.0/16"]);
        assert_eq!(p.addresses[0].to_string(), "100.64.1.1/32");
    }
}
