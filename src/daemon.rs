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
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};
use weft_config::Config;
use weft_mesh::driver::{MeshDriver, Snapshot as MeshSnapshot};
use weft_mesh::{Identity, Membership, MeshConfig};
use weft_router::driver::{Snapshot, bind_udp, open_tun};
use weft_router::Router;

use crate::api::{self, ApiSocket, Request, Response};
use crate::control;
use crate::handle::{MeshHandle, RouterHandle};
use crate::installed::Installed;
use crate::k8s::OwnFacts;
use crate::keys;
use crate::netlink::Netlink;
use crate::notify;
use crate::plan::{self, Plan};
use crate::shutdown::Shutdown;
use crate::status::{MeshMember, MeshStatus, NodeStatus, PeerStatus, Status};

/// How long shutdown waits for the data plane to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

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
    let pools = plan::pools(&config, config_path)?;
    let blocks = plan::initial_blocks(
        &config,
        &pools,
        &control::read_state(&state_file, reset_state)?,
        control::now_millis(),
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
    let mtu = crate::netlink::choose_mtu(&config, &nl, facts.private_address).await?;
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
    let (router_h, cmd_rx) = RouterHandle::channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut data_plane =
        weft_router::driver::spawn(router, tun, udp, offload, cmd_rx, stop_rx.clone());
    let infos = control::PeerInfos::default();
    let (mesh_h, mesh_rx) = MeshHandle::channel();
    let mesh_on = gossip.is_some().then(|| mesh_h.clone());
    let mut helpers = Vec::new();
    let ipam_counters = Arc::new(crate::metrics::IpamCounters::default());
    let mut statics_tx = None;
    let mut kube_state = None;
    let ready_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    info!(address = %metrics_listener.local_addr()?, "metrics at /metrics, health at /healthz");
    helpers.push(tokio::spawn(crate::metrics::serve(
        metrics_listener,
        crate::metrics::Sources {
            router: router_h.clone(),
            mesh: mesh_on.clone(),
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
                    mesh_h.clone(),
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
            router_h.clone(),
            mesh_h.clone(),
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
        router_h.clone(),
        Shutdown::new(stop_tx.subscribe()),
    )));

    let mut reloader = crate::reload::Reloader {
        path: config_path.to_path_buf(),
        config: config.clone(),
        netlink: nl.clone(),
        interface: (iface.clone(), index),
        mtu,
        underlay: facts.private_address,
        router: router_h.clone(),
        mesh: mesh_on.clone(),
        statics: statics_tx,
        node: node.clone(),
        conflist: conflist.clone(),
        set_log,
    };
    let shared = Shared {
        router: router_h.clone(),
        mesh: mesh_on.clone(),
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

/// What the API answers from.
#[derive(Clone)]
struct Shared {
    router: RouterHandle,
    mesh: Option<MeshHandle>,
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
            let snap = sh.router.snapshot().await;
            let mesh = match &sh.mesh {
                Some(m) => m.snapshot().await,
                None => None,
            };
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
