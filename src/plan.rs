//! What the daemon installs, computed from the config alone before anything is touched: the
//! node's pod blocks at start, the TUN device's addresses, the routes into it, and the router's
//! configured peers.
//!
//! Pure: no I/O, no clock (the caller passes `now_ms`), no tokio.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use tracing::warn;
use weft_config::Config;
use weft_ipam::{AllocError, Pool, SavedBlock};
use weft_router::{PathKind, PeerConfig};

/// Why there is no plan.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The node has no pod block and no mesh to claim one from.
    #[error(
        "{}: node.pod_cidr: required when the node has no mesh to claim a block from: \
         set it (for example `pod_cidr: 100.64.1.0/24`), or give the node the cluster \
         secret (mesh.secret_file)",
        .0.display()
    )]
    NoPodCidr(PathBuf),
    /// A pool of `network.pod_network_cidr` cannot be cut into node blocks.
    #[error("{}: network.pod_network_cidr", .0.display())]
    Pool(PathBuf, #[source] AllocError),
}

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

impl Plan {
    /// The plan for `config`, read from `origin`; `blocks` are the node's pod blocks (static,
    /// or restored), and may be empty only when the mesh will claim them (`mesh_on`).
    pub fn new(
        config: &Config,
        origin: &Path,
        blocks: &[IpNet],
        mesh_on: bool,
    ) -> Result<Self, PlanError> {
        if blocks.is_empty() && !mesh_on {
            return Err(PlanError::NoPodCidr(origin.to_path_buf()));
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

/// The pools of `network.pod_network_cidr`, each cut into blocks of its family's mask size.
pub fn pools(config: &Config, origin: &Path) -> Result<Vec<Pool>, PlanError> {
    config
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
        .map_err(|e| PlanError::Pool(origin.to_path_buf(), e))
}

/// The node's blocks at start: the configured `node.pod_cidr` (keeping the claim time saved
/// for the same block, a new one claimed at `now_ms`), else the saved blocks that still fit
/// the pools.
pub fn initial_blocks(
    config: &Config,
    pools: &[Pool],
    saved: &[SavedBlock],
    now_ms: u64,
) -> Vec<SavedBlock> {
    if !config.node.pod_cidr.is_empty() {
        return crate::control::blocks::assigned(&config.node.pod_cidr, saved, now_ms);
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
        let key = crate::host::keys::encode(&[3; 32]);
        let text = format!(
            "node: {{pod_cidr: 100.64.1.0/24}}\nwireguard_peers:\n  - name: laptop\n    public_key: {key}\n    allowed_ips: [100.64.2.0/24, 10.99.0.0/16]\n"
        );
        let c = Config::parse(&text, path, "h").unwrap();
        let p = Plan::new(&c, path, &c.node.pod_cidr, false).unwrap();
        let routes: Vec<String> = p.routes.iter().map(ToString::to_string).collect();
        assert_eq!(routes, ["100.64.0.0/16", "10.99.0.0/16"]);
        assert_eq!(p.addresses[0].to_string(), "100.64.1.1/32");
    }

    #[test]
    fn saved_blocks_outside_the_pools_are_forgotten_and_a_static_block_keeps_its_time() {
        let path = Path::new("w.yaml");
        let c = Config::parse("node: {name: a}\n", path, "h").unwrap();
        let pools = pools(&c, path).unwrap();
        let saved = [
            SavedBlock {
                block: "100.64.3.0/24".parse().unwrap(),
                since: 5,
            },
            SavedBlock {
                block: "10.9.0.0/24".parse().unwrap(),
                since: 6,
            },
        ];
        assert_eq!(initial_blocks(&c, &pools, &saved, 99), saved[..1]);
        let c = Config::parse("node: {pod_cidr: 100.64.3.0/24}\n", path, "h").unwrap();
        assert_eq!(initial_blocks(&c, &pools, &saved, 99)[0].since, 5);
    }
}
