//! The status report (`weft status`) from the node's facts and the drivers' snapshots.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use weft_mesh::driver::Snapshot as MeshSnapshot;
use weft_router::driver::Snapshot;

use crate::api::status::{MeshMember, MeshStatus, NodeStatus, PeerStatus, Status};
use crate::control;
use crate::host::keys;

fn shown(a: Option<IpAddr>) -> String {
    a.map_or_else(|| "-".to_owned(), |a| a.to_string())
}

fn drops(d: &weft_router::Drops) -> BTreeMap<String, u64> {
    d.labelled().map(|(r, n)| (r.to_owned(), n)).collect()
}

/// The status report from the node's facts, a router snapshot and the mesh's view.
pub fn status(
    node: &NodeStatus,
    snap: &Snapshot,
    mesh: Option<&MeshSnapshot>,
    infos: &HashMap<[u8; 32], control::PeerInfo>,
    ipam: &crate::api::metrics::IpamCounters,
) -> Status {
    let mesh_snap = mesh;
    let peers = snap.peers.iter().map(|p| peer_status(p, infos)).collect();
    let mut d = drops(&snap.drops);
    for (reason, n) in snap.io_drops() {
        d.insert(reason.into(), n);
    }
    let mesh = mesh.map(|m| mesh_status(m, ipam));
    let mut node = node.clone();
    if let Some(m) = mesh.as_ref().and(mesh_snap) {
        node.pod_cidrs = m.record.pod_cidrs.iter().map(ToString::to_string).collect();
        node.observed_endpoints = m.record.observed.iter().map(ToString::to_string).collect();
        node.home_relays = m
            .record
            .homes
            .iter()
            .flatten()
            .map(|k| {
                m.members
                    .iter()
                    .find(|x| x.record.wireguard_key == *k)
                    .map_or_else(|| keys::encode(k), |x| x.record.name.clone())
            })
            .collect();
    }
    Status {
        node,
        peers,
        drops: d,
        mesh,
        kubernetes: None,
    }
}

/// One peer's line of the report.
fn peer_status(
    p: &weft_router::PeerStatus,
    infos: &HashMap<[u8; 32], control::PeerInfo>,
) -> PeerStatus {
    let info = infos.get(&p.config.public_key);
    // Down, with the reason, when the control plane knows no path can work (no direct one
    // came up and no relay can carry it): the router would only say it keeps trying.
    let down_reason = info
        .and_then(|i| i.unreachable.clone())
        .filter(|_| p.state != weft_router::PeerState::Up);
    PeerStatus {
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
        endpoint_reason: endpoint_reason(p, infos.get(&p.config.public_key)),
        path: p.config.path.as_str().to_owned(),
        state: down_reason
            .as_ref()
            .map_or(p.state.as_str(), |_| "down")
            .to_owned(),
        down_reason,
        last_handshake_secs: p.last_handshake.map(|d| d.as_secs()),
        rx_bytes: p.counters.rx_bytes,
        tx_bytes: p.counters.tx_bytes,
        drops: drops(&p.counters.drops),
    }
}

/// Why peer `p` has its endpoint: a loopback endpoint is a relay shim (named when the plan
/// chose the relay, else the far end came through one first).
fn endpoint_reason(p: &weft_router::PeerStatus, info: Option<&control::PeerInfo>) -> String {
    match (p.endpoint, p.endpoint_learned) {
        (None, _) => "none".to_owned(),
        (Some(e), _) if e.ip().is_loopback() => match info.and_then(|i| i.via.as_deref()) {
            Some(via) => format!("relayed via {via}"),
            None => "relayed".to_owned(),
        },
        (Some(_), true) => "learned".to_owned(),
        (Some(_), false) => info.map_or("configured", |i| i.reason.as_str()).to_owned(),
    }
}

/// The mesh's part of the report.
fn mesh_status(m: &MeshSnapshot, ipam: &crate::api::metrics::IpamCounters) -> MeshStatus {
    let drops: BTreeMap<String, u64> = m
        .drops
        .coarse()
        .into_iter()
        .chain(m.transport.labelled())
        .filter(|(_, v)| *v > 0)
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
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
        rejected: crate::api::metrics::rejections(m, ipam).into_iter().collect(),
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
        bytes_sent: m.traffic.bytes_sent,
        bytes_received: m.traffic.bytes_received,
    }
}
