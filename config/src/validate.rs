//! Turns a [`RawConfig`] into a [`Config`]: defaults filled in, values checked against each other.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use crate::raw::RawConfig;
use crate::value::{Address, Cidr, unicast};
use crate::{
    Cni, Config, ConfigError, Kubernetes, Location, Mesh, Network, Node, Problem, Router,
    WireguardPeer,
};

const DEFAULT_POD_NETWORK: &str = "100.64.0.0/16";
const DEFAULT_STATE_DIR: &str = "/var/lib/weft";

// The longest each duration may be, as a value and as written in the error: far more than any
// deployment needs, and short enough that the arithmetic done on it (`3 * gossip_interval`
// here, `liveness_timeout * BID_WINDOW` in the mesh, deadlines `now + d`) cannot overflow.
const MAX_GOSSIP_INTERVAL: (Duration, &str) = (Duration::from_secs(3600), "1h");
const MAX_LIVENESS_TIMEOUT: (Duration, &str) = (Duration::from_secs(24 * 3600), "24h");
const MAX_TOMBSTONE_HORIZON: (Duration, &str) = (Duration::from_secs(36_500 * 86400), "36500d");
const MAX_BLOCK_EXPIRY: (Duration, &str) = (Duration::from_secs(36_500 * 86400), "36500d");

/// Builds the error for `key`, locating it in `text`.
struct Errors<'a> {
    text: &'a str,
    origin: &'a Path,
}

impl Errors<'_> {
    fn at(&self, key: &str, problem: Problem) -> ConfigError {
        let pos = crate::locate::locate(self.text, key);
        ConfigError::Invalid {
            at: Location {
                file: self.origin.to_owned(),
                line: pos.map(|p| p.0),
                column: pos.map(|p| p.1),
            },
            key: key.to_owned(),
            problem: Box::new(problem),
        }
    }
}

fn nets(cidrs: Vec<Cidr>) -> Vec<IpNet> {
    cidrs.into_iter().map(|c| c.0).collect()
}

/// `d` when it is no longer than `max` (the most, and how the error writes it).
fn at_most(
    errs: &Errors<'_>,
    key: &str,
    d: Duration,
    (max, written): (Duration, &'static str),
) -> Result<Duration, ConfigError> {
    if d > max {
        return Err(errs.at(key, Problem::TooLong(d, written)));
    }
    Ok(d)
}

/// Whether the kernel takes `name` for a network interface: its `dev_valid_name` (not empty,
/// shorter than `IFNAMSIZ` (16) bytes, not `.` or `..`, no `/`, `:` or whitespace as its
/// `isspace` has it, which includes the byte 0xa0). A NUL byte is refused too: the kernel
/// would read the name only up to it.
fn valid_interface_name(name: &str) -> bool {
    const IFNAMSIZ: usize = 16;
    let kernel_space = |b: u8| matches!(b, b'\t'..=b'\r' | b' ' | 0xa0);
    !name.is_empty()
        && name.len() < IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || kernel_space(b))
}

/// At most one prefix per family.
fn one_per_family(errs: &Errors<'_>, key: &str, list: &[IpNet]) -> Result<(), ConfigError> {
    for (i, a) in list.iter().enumerate() {
        if let Some(b) = list[i + 1..]
            .iter()
            .find(|b| b.addr().is_ipv4() == a.addr().is_ipv4())
        {
            let fam = if a.addr().is_ipv4() { "IPv4" } else { "IPv6" };
            return Err(errs.at(key, Problem::TwoOfOneFamily(fam.to_owned(), *a, *b)));
        }
    }
    Ok(())
}

/// `level` or `target=level` directives, comma-separated, each level one of tracing's.
fn valid_log_filter(text: &str) -> bool {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    !text.trim().is_empty()
        && text.split(',').all(|d| {
            let level = d.rsplit_once('=').map_or(
                d,
                |(target, l)| {
                    if target.trim().is_empty() { "" } else { l }
                },
            );
            LEVELS.contains(&level.trim().to_ascii_lowercase().as_str())
        })
}

/// This node's address under `key`, IPv4-mapped ones as the IPv4 address they are, when peers
/// can reach it: unicast ([`crate::value::unicast`]) and outside the pod network. Peers refuse
/// any other in this node's record, so it is refused here, by name.
fn node_address(
    errs: &Errors<'_>,
    key: &str,
    address: Option<Address>,
    network: &Network,
) -> Result<Option<IpAddr>, ConfigError> {
    let Some(address) = address.map(|a| a.0.to_canonical()) else {
        return Ok(None);
    };
    if !unicast(address) {
        return Err(errs.at(key, Problem::NotUnicast(address)));
    }
    if let Some(pool) = network
        .pod_network_cidr
        .iter()
        .find(|pool| pool.contains(&address))
    {
        return Err(errs.at(
            key,
            Problem::InPodNetwork {
                address,
                pool: *pool,
            },
        ));
    }
    Ok(Some(address))
}

/// Whether one prefix contains the other.
fn overlap(a: &IpNet, b: &IpNet) -> bool {
    a.contains(b) || b.contains(a)
}

/// The problem with peer `peer`'s prefix `net` when it covers a whole pool of the pod network
/// (`0.0.0.0/0` would take every mesh node's traffic) or overlaps this node's own block
/// without being it (the same block is a duplicate claim).
fn covers_mesh(peer: &str, net: IpNet, network: &Network, node: &Node) -> Option<Problem> {
    let problem = |what: &str, covered: IpNet| Problem::CoversMesh {
        peer: peer.to_owned(),
        prefix: net,
        what: what.to_owned(),
        covered,
    };
    if let Some(pool) = network.pod_network_cidr.iter().find(|p| net.contains(*p)) {
        return Some(problem("the pod network", *pool));
    }
    node.pod_cidr
        .iter()
        .find(|b| **b != net && overlap(b, &net))
        .map(|b| problem("this node's block", *b))
}

pub(crate) fn validate(
    raw: RawConfig,
    text: &str,
    origin: &Path,
    hostname: &str,
) -> Result<Config, ConfigError> {
    let errs = Errors { text, origin };

    // network
    let n = raw.network;
    let pod_network_cidr = match n.pod_network_cidr {
        Some(list) => nets(list.0),
        // Invariant: the default is a literal, canonical CIDR.
        None => vec![
            DEFAULT_POD_NETWORK
                .parse()
                .expect("default pod network parses"),
        ],
    };
    if pod_network_cidr.is_empty() {
        return Err(errs.at("network.pod_network_cidr", Problem::Empty));
    }
    one_per_family(&errs, "network.pod_network_cidr", &pod_network_cidr)?;
    let mask_v4 = n
        .node_cidr_mask_size_ipv4
        .or(n.node_cidr_mask_size)
        .unwrap_or(24);
    let mask_v6 = n.node_cidr_mask_size_ipv6.unwrap_or(64);
    // The node block size of a pool's family, the key that sets it, and the family's width.
    let v4_key = if n.node_cidr_mask_size_ipv4.is_some() {
        "network.node_cidr_mask_size_ipv4"
    } else {
        "network.node_cidr_mask_size"
    };
    let node_mask = |pool: &IpNet| match pool {
        IpNet::V4(_) => (mask_v4, v4_key, 32),
        IpNet::V6(_) => (mask_v6, "network.node_cidr_mask_size_ipv6", 128),
    };
    for pool in &pod_network_cidr {
        let (mask, key, max) = node_mask(pool);
        if mask <= pool.prefix_len() || mask > max {
            return Err(errs.at(
                key,
                Problem::MaskSize {
                    mask,
                    pool: *pool,
                    max,
                },
            ));
        }
    }
    if let Some(mtu) = n.mtu
        && !(1280..=65455).contains(&mtu)
    {
        return Err(errs.at("network.mtu", Problem::Mtu(mtu)));
    }
    let network = Network {
        node_cidr_mask_size_ipv4: mask_v4,
        node_cidr_mask_size_ipv6: mask_v6,
        block_expiry: at_most(
            &errs,
            "network.block_expiry",
            n.block_expiry
                .map_or(Duration::from_secs(24 * 3600), |d| d.0),
            MAX_BLOCK_EXPIRY,
        )?,
        trusted_subnets: nets(n.trusted_subnets.unwrap_or_default()),
        mtu: n.mtu,
        nat_outgoing: n.nat_outgoing.unwrap_or(true),
        no_masquerade: nets(n.no_masquerade.unwrap_or_default()),
        pod_network_cidr,
    };

    // node
    let state_dir = raw
        .state_dir
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let name = raw.node.name.unwrap_or_else(|| hostname.to_owned());
    if name.trim().is_empty() {
        return Err(errs.at("node.name", Problem::EmptyName));
    }
    let pod_cidr = raw.node.pod_cidr.map(|l| nets(l.0)).unwrap_or_default();
    one_per_family(&errs, "node.pod_cidr", &pod_cidr)?;
    for block in &pod_cidr {
        let Some(pool) = network
            .pod_network_cidr
            .iter()
            .find(|pool| pool.contains(block))
        else {
            let pools = network
                .pod_network_cidr
                .iter()
                .map(ToString::to_string)
                .collect();
            let pools: Vec<String> = pools;
            return Err(errs.at(
                "node.pod_cidr",
                Problem::OutsidePool {
                    block: *block,
                    pools: pools.join(", "),
                },
            ));
        };
        // The peers' rule (`ClaimPolicy::check_block`): no broader than a node block of the
        // pool's family; a narrower one they take.
        let (mask, mask_key, _) = node_mask(pool);
        if block.prefix_len() < mask {
            return Err(errs.at(
                "node.pod_cidr",
                Problem::BlockTooBroad {
                    block: *block,
                    mask,
                    mask_key,
                },
            ));
        }
    }
    let node = Node {
        name,
        region: raw.node.region.filter(|r| !r.trim().is_empty()),
        private_address: node_address(
            &errs,
            "node.private_address",
            raw.node.private_address,
            &network,
        )?,
        public_address: node_address(
            &errs,
            "node.public_address",
            raw.node.public_address,
            &network,
        )?,
        key_file: raw
            .node
            .key_file
            .unwrap_or_else(|| state_dir.join("private.key")),
        pod_cidr,
    };

    // mesh and router
    let mesh_port = raw.mesh.port.map_or(6783, |p| p.0);
    let mesh = Mesh {
        port: mesh_port,
        peers: raw
            .mesh
            .peers
            .unwrap_or_default()
            .into_iter()
            .map(|hp| SocketAddr::new(hp.ip, hp.port.unwrap_or(mesh_port)))
            .collect(),
        secret_file: raw
            .mesh
            .secret_file
            .unwrap_or_else(|| PathBuf::from("/etc/weft/secret")),
        gossip_interval: at_most(
            &errs,
            "mesh.gossip_interval",
            raw.mesh
                .gossip_interval
                .map_or(Duration::from_secs(1), |d| d.0),
            MAX_GOSSIP_INTERVAL,
        )?,
        liveness_timeout: at_most(
            &errs,
            "mesh.liveness_timeout",
            raw.mesh
                .liveness_timeout
                .map_or(Duration::from_secs(30), |d| d.0),
            MAX_LIVENESS_TIMEOUT,
        )?,
        tombstone_horizon: at_most(
            &errs,
            "mesh.tombstone_horizon",
            raw.mesh
                .tombstone_horizon
                .map_or(Duration::from_secs(72 * 3600), |d| d.0),
            MAX_TOMBSTONE_HORIZON,
        )?,
        max_members: raw.mesh.max_members.unwrap_or(8192),
        record_refresh: raw
            .mesh
            .record_refresh
            .map_or(Duration::from_secs(600), |d| d.0),
        relay: raw.mesh.relay.clone().unwrap_or_default(),
        authority: raw.mesh.authority.clone().map(|a| a.0).unwrap_or_default(),
        certificate: raw.mesh.certificate.clone(),
    };
    if raw.mesh.authority.as_ref().is_some_and(|a| a.0.is_empty()) {
        return Err(errs.at(
            "mesh.authority",
            Problem::EmptyList("name the authority's public key, or leave mesh.authority out"),
        ));
    }
    match (mesh.authority.first(), &mesh.certificate) {
        (Some(_), None) => {
            return Err(errs.at(
                "mesh.authority",
                Problem::Needs("mesh.certificate, this node's own certificate"),
            ));
        }
        (None, Some(_)) => {
            return Err(errs.at(
                "mesh.certificate",
                Problem::Needs("mesh.authority, the key that signed it"),
            ));
        }
        _ => {}
    }
    if !mesh.authority.is_empty() && raw.kubernetes.enabled == Some(true) {
        return Err(errs.at(
            "mesh.authority",
            Problem::Excludes(
                "kubernetes.enabled: the API server's spec.podCIDRs already say which blocks a node owns",
            ),
        ));
    }
    if mesh.gossip_interval.is_zero() {
        return Err(errs.at("mesh.gossip_interval", Problem::ZeroDuration));
    }
    // Checked although the bounds above keep it from overflowing.
    if mesh
        .gossip_interval
        .checked_mul(3)
        .is_none_or(|least| mesh.liveness_timeout < least)
    {
        return Err(errs.at(
            "mesh.liveness_timeout",
            Problem::LivenessTooShort(mesh.liveness_timeout, mesh.gossip_interval),
        ));
    }
    if mesh.tombstone_horizon < network.block_expiry {
        return Err(errs.at(
            "mesh.tombstone_horizon",
            Problem::HorizonBeforeExpiry(mesh.tombstone_horizon, network.block_expiry),
        ));
    }
    if !(Duration::from_secs(1)..=Duration::from_secs(24 * 3600)).contains(&mesh.record_refresh) {
        return Err(errs.at(
            "mesh.record_refresh",
            Problem::OutOfRange(mesh.record_refresh, "1s", "24h"),
        ));
    }
    if !(1..=100_000).contains(&mesh.max_members) {
        return Err(errs.at("mesh.max_members", Problem::MaxMembers(mesh.max_members)));
    }
    let interface = raw.router.interface.unwrap_or_else(|| "weft0".to_owned());
    if !valid_interface_name(&interface) {
        return Err(errs.at("router.interface", Problem::InterfaceName(interface)));
    }
    let port = raw.router.port.map_or(51820, |p| p.0);
    // With the mesh on, the relay listens on the next port; whether it is on depends on
    // whether mesh.secret_file exists, which parsing does not look at.
    if port.checked_add(1).is_none() {
        return Err(errs.at("router.port", Problem::NoRelayPort(port)));
    }
    let router = Router {
        port,
        interface,
        offload: raw.router.offload.unwrap_or_default(),
        workers: raw.router.workers.unwrap_or_default(),
    };

    // wireguard_peers: unique names, keys and prefixes (our own block counts as claimed).
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut keys: HashMap<[u8; 32], String> = HashMap::new();
    let mut prefixes: HashMap<IpNet, String> = node
        .pod_cidr
        .iter()
        .map(|b| (*b, format!("{} (this node)", node.name)))
        .collect();
    let mut wireguard_peers = Vec::new();
    for (i, p) in raw.wireguard_peers.into_iter().enumerate() {
        if p.name.trim().is_empty() {
            return Err(errs.at(&format!("wireguard_peers[{i}].name"), Problem::EmptyName));
        }
        if names.insert(p.name.clone(), i).is_some() {
            let key = format!("wireguard_peers[{i}].name");
            return Err(errs.at(&key, Problem::DuplicateName(p.name)));
        }
        if let Some(other) = keys.insert(p.public_key.0, p.name.clone()) {
            let key = format!("wireguard_peers[{i}].public_key");
            return Err(errs.at(&key, Problem::DuplicateKey(p.public_key.to_string(), other)));
        }
        for (j, net) in p.allowed_ips.iter().enumerate() {
            if let Some(problem) = covers_mesh(&p.name, net.0, &network, &node) {
                let key = format!("wireguard_peers[{i}].allowed_ips[{j}]");
                return Err(errs.at(&key, problem));
            }
            if let Some(other) = prefixes.insert(net.0, p.name.clone()) {
                let key = format!("wireguard_peers[{i}].allowed_ips[{j}]");
                return Err(errs.at(&key, Problem::DuplicatePrefix(net.0, other)));
            }
        }
        wireguard_peers.push(WireguardPeer {
            name: p.name,
            public_key: p.public_key,
            endpoint: p.endpoint.map(|e| e.0),
            allowed_ips: nets(p.allowed_ips),
            persistent_keepalive: p.persistent_keepalive.filter(|&k| k > 0),
        });
    }

    let kubernetes_enabled = raw.kubernetes.enabled.unwrap_or(false);
    Ok(Config {
        node,
        network,
        mesh,
        router,
        wireguard_peers,
        cni: Cni {
            conflist: raw
                .cni
                .conflist
                .or_else(|| kubernetes_enabled.then(|| PathBuf::from(crate::DEFAULT_CONFLIST))),
        },
        kubernetes: Kubernetes {
            enabled: kubernetes_enabled,
        },
        api_socket: raw
            .api_socket
            .unwrap_or_else(|| PathBuf::from("/run/weft/weft.sock")),
        metrics_address: raw
            .metrics_address
            .map_or_else(|| SocketAddr::from(([127, 0, 0, 1], 6782)), |e| e.0),
        log_level: match raw.log_level {
            None => "info".to_owned(),
            Some(l) if valid_log_filter(&l) => l,
            Some(l) => return Err(errs.at("log_level", Problem::LogLevel(l))),
        },
        state_dir,
    })
}
