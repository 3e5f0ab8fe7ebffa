//! The steps of `App::build`, in the order that keeps the host untouched until the last:
//! [`check`] (config, secret, Kubernetes client, pools, blocks, plan, key, router), [`bind`]
//! (netlink, signals, this node's facts, MTU, every socket), and [`install`] (the TUN device,
//! its addresses and routes, masquerade, the CNI conflist), which hands the host state to an
//! [`Installed`] guard before it changes anything.

use std::path::Path;

use anyhow::{Context as _, bail};
use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{info, warn};
use weft_config::Config;
use weft_ipam::{Pool, SavedBlock};
use weft_router::Router;
use weft_router::driver::{BoundUdp, MAX_SPLIT, bind_udp_workers, open_tun_queues};

use crate::api::ApiSocket;
use crate::control;
use crate::control::k8s::OwnFacts;
use crate::host::installed::Installed;
use crate::host::keys;
use crate::host::netlink::Netlink;
use crate::plan::{self, Plan};

/// What the config, the state file and the key say, checked before anything is bound.
pub(super) struct Checked {
    pub(super) secret: Option<[u8; 32]>,
    pub(super) kube: Option<kube::Client>,
    pub(super) state_file: std::path::PathBuf,
    pub(super) pools: Vec<Pool>,
    pub(super) blocks: Vec<SavedBlock>,
    pub(super) plan: Plan,
    pub(super) public_key: String,
    pub(super) key_bytes: [u8; 32],
    pub(super) wireguard_key: [u8; 32],
    pub(super) mesh_seed: u64,
    pub(super) router: Router,
    pub(super) started: std::time::Instant,
    /// `mesh.authority` and this node's certificate, checked (set by the caller).
    pub(super) certified: Option<super::certify::Certified>,
}

/// Checks the config and builds the router with its configured peers.
pub(super) async fn check(
    config: &Config,
    origin: &Path,
    reset_state: bool,
) -> anyhow::Result<Checked> {
    let secret = control::load_secret(config, origin)?;
    let kube = kube_client(config, origin, secret.is_some()).await?;
    let state_file = config.state_dir.join("ipam.json");
    let pools = plan::pools(config, origin)?;
    let blocks = plan::initial_blocks(
        config,
        &pools,
        &control::read_state(&state_file, reset_state)?,
        control::now_millis(),
    );
    let plan = Plan::new(
        config,
        origin,
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
    let started = std::time::Instant::now();
    for (i, p) in plan.peers.iter().enumerate() {
        router
            .add_peer(started, p.clone())
            .with_context(|| format!("{}: wireguard_peers[{i}] ({})", origin.display(), p.name))?;
    }
    Ok(Checked {
        secret,
        kube,
        state_file,
        pools,
        blocks,
        plan,
        public_key,
        key_bytes,
        wireguard_key,
        mesh_seed,
        router,
        started,
        certified: None,
    })
}

/// The Kubernetes client when `kubernetes.enabled`: the source needs the mesh (keys and paths
/// travel by gossip) and a client config; the API itself may be down, which the source rides
/// out.
async fn kube_client(
    config: &Config,
    origin: &Path,
    mesh_on: bool,
) -> anyhow::Result<Option<kube::Client>> {
    if !config.kubernetes.enabled {
        return Ok(None);
    }
    if !mesh_on {
        bail!(
            "{}: kubernetes.enabled: needs the mesh: give every node the cluster secret \
             (mesh.secret_file {})",
            origin.display(),
            config.mesh.secret_file.display()
        );
    }
    let client = kube::Client::try_default().await.with_context(|| {
        format!(
            "{}: kubernetes.enabled: no in-cluster service account and no usable KUBECONFIG",
            origin.display()
        )
    })?;
    Ok(Some(client))
}

/// The signals the daemon serves.
pub(super) struct Signals {
    pub(super) term: Signal,
    pub(super) int: Signal,
    pub(super) hup: Signal,
}

/// Everything bound, nothing on the host changed yet.
pub(super) struct Bound {
    pub(super) netlink: Netlink,
    pub(super) signals: Signals,
    pub(super) facts: OwnFacts,
    pub(super) mtu: u16,
    /// One socket per data-path worker, on `router.port`.
    pub(super) udp: Vec<BoundUdp>,
    pub(super) gossip: Option<([u8; 32], TcpListener)>,
    /// The relay port (the router's + 1), with the mesh.
    pub(super) relay: Option<tokio::net::UdpSocket>,
    pub(super) api_socket: ApiSocket,
    pub(super) metrics: TcpListener,
}

/// Binds every socket the daemon needs; `None` when a signal ended the wait for the Node.
pub(super) async fn bind(config: &Config, checked: &Checked) -> anyhow::Result<Option<Bound>> {
    let iface = &config.router.interface;
    let (netlink, connection) = Netlink::connect().context("opening a netlink socket")?;
    // The reader outlives every task: the teardown still asks netlink after they stopped.
    tokio::spawn(connection);
    if netlink.link(iface).await?.is_some() {
        bail!(
            "interface {iface} already exists: another weft daemon may be running, or set \
             router.interface to another name"
        );
    }
    let mut signals = Signals {
        term: signal(SignalKind::terminate())?,
        int: signal(SignalKind::interrupt())?,
        hup: signal(SignalKind::hangup())?,
    };
    let Some(facts) = facts_before_the_device(
        config,
        checked.kube.as_ref(),
        (&mut signals.term, &mut signals.int),
    )
    .await
    else {
        return Ok(None);
    };
    let mtu = crate::host::netlink::choose_mtu(config, &netlink, facts.private_address).await?;
    let workers = workers(config);
    let udp = bind_udp_workers(config.router.port, &config.router.offload, workers).with_context(
        || {
            format!(
                "binding UDP port {} (router.port) for {workers} workers (router.workers)",
                config.router.port
            )
        },
    )?;
    let gossip = match checked.secret {
        Some(secret) => Some((secret, control::bind_gossip(config.mesh.port).await?)),
        None => None,
    };
    let relay = match checked.secret {
        Some(_) => {
            let port = crate::relay::port(config.router.port);
            Some(
                tokio::net::UdpSocket::bind((std::net::Ipv6Addr::UNSPECIFIED, port))
                    .await
                    .with_context(|| {
                        format!("binding UDP port {port} (the relay port, router.port + 1)")
                    })?,
            )
        }
        None => None,
    };
    let api_socket = ApiSocket::bind(&config.api_socket).await?;
    let metrics = TcpListener::bind(config.metrics_address)
        .await
        .with_context(|| {
            format!(
                "binding metrics_address {} (set another, e.g. 127.0.0.1:0)",
                config.metrics_address
            )
        })?;
    info!(address = %metrics.local_addr()?, "metrics at /metrics, health at /healthz");
    Ok(Some(Bound {
        netlink,
        signals,
        facts,
        mtu,
        udp,
        gossip,
        relay,
        api_socket,
        metrics,
    }))
}

/// What is installed on the host: the TUN device (owned by the guard) and what follows the
/// node's blocks.
pub(super) struct Host {
    /// One queue per data-path worker.
    pub(super) tun: Vec<tun_rs::SyncDevice>,
    pub(super) installed: Installed,
    pub(super) index: u32,
    pub(super) masquerade: Option<control::Masquerade>,
    pub(super) conflist: crate::cni::ConflistWriter,
}

/// Creates and configures the TUN device, masquerades, writes the conflist. From the first
/// change on, the returned guard (or its drop, on an error) undoes them.
pub(super) async fn install(
    config: &Config,
    origin: &Path,
    plan: &Plan,
    bound: &Bound,
) -> anyhow::Result<Host> {
    let iface = &config.router.interface;
    let offload = config.router.offload;
    let nl = &bound.netlink;
    let (tun, tun_offload) =
        open_tun_queues(iface, offload.tun, bound.udp.len()).with_context(|| {
            format!(
                "creating TUN device {iface} with {} queues (router.workers)",
                bound.udp.len()
            )
        })?;
    let mut installed = Installed::new(nl.clone(), iface.clone());
    let index = match nl.link(iface).await {
        Ok(Some((index, _))) => index,
        Ok(None) => bail!("TUN device {iface} vanished right after its creation"),
        Err(e) => return Err(e.into()),
    };
    if tun_offload {
        cap_tun_segments(nl, iface, index).await;
    }
    nl.configure(iface, index, bound.mtu, &plan.addresses, &plan.routes)
        .await?;
    info!(
        allowed = ?offload.names(),
        batched_receive = offload.udp_batch,
        udp_gso_segments = bound.udp.first().map_or(1, BoundUdp::max_segments),
        udp_gro = bound.udp.first().is_some_and(BoundUdp::gro),
        workers = bound.udp.len(),
        tun_offload = tun_offload,
        "data path offloads"
    );
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
    if let Some(m) = &masquerade {
        installed.masquerading();
        m.apply(&plan.pod_cidrs);
    }
    let conflist = crate::cni::ConflistWriter::new(
        config.cni.conflist.clone(),
        bound.mtu,
        config.api_socket.clone(),
        config.state_dir.join("cni-ipam"),
    );
    conflist.write(&plan.pod_cidrs).with_context(|| {
        format!(
            "{}: cni.conflist: writing {}",
            origin.display(),
            conflist.path().unwrap_or(Path::new("")).display()
        )
    })?;
    Ok(Host {
        tun,
        installed,
        index,
        masquerade,
        conflist,
    })
}

/// Caps the TUN device's GSO packets at the segments a read is handed at least (MAX_SPLIT): a
/// packet of more could not be split into them and would be lost whole (a flow whose MSS is
/// under 512 bytes). Capped, the kernel sizes or cuts such packets before the device. A kernel
/// that refuses is warned about, not fatal.
async fn cap_tun_segments(nl: &Netlink, iface: &str, index: u32) {
    let cap = u32::try_from(MAX_SPLIT).unwrap_or(u32::MAX);
    if let Err(e) = nl.cap_gso_segments(iface, index, cap).await {
        warn!(
            error = %e,
            "TUN segments uncapped: flows of segments under 512 bytes may lose whole \
             64 KB writes, which their TCP then sends again"
        );
    }
}

/// This node's facts before the TUN device exists. With Kubernetes and neither `network.mtu`
/// nor `node.private_address` set, the MTU depends on the Node's private address, so this
/// waits for the Node (saying so) rather than change a live MTU later: pods keep the MTU
/// their interface got when they started. `None` when a signal ended the wait.
async fn facts_before_the_device(
    config: &Config,
    kube: Option<&kube::Client>,
    signals: (&mut Signal, &mut Signal),
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
        v = control::nodesource::wait_for_node(client.clone(), &config.node.name) => v,
        _ = signals.0.recv() => return None,
        _ = signals.1.recv() => return None,
    };
    let facts = control::k8s::own_facts(&view, &config.node);
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

/// How many data-path workers `router.workers` asks for on this machine: `auto` is one per core
/// this process may run on (its CPU affinity and cgroup quota count), at most 8.
fn workers(config: &Config) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    config.router.workers.resolve(cores)
}
