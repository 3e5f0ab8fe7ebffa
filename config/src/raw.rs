//! The config file as written: every key optional, unknown keys rejected. [`crate::Config`] is what
//! it becomes once defaults are filled in and the values checked against each other.

use std::path::PathBuf;

use serde::Deserialize;

use crate::value::{Address, Cidr, Endpoint, HostPort, HumanDuration, OneOrMany, Port, PublicKey};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub(crate) node: RawNode,
    #[serde(default)]
    pub(crate) network: RawNetwork,
    #[serde(default)]
    pub(crate) mesh: RawMesh,
    #[serde(default)]
    pub(crate) router: RawRouter,
    #[serde(default)]
    pub(crate) wireguard_peers: Vec<RawWireguardPeer>,
    #[serde(default)]
    pub(crate) cni: RawCni,
    #[serde(default)]
    pub(crate) kubernetes: RawKubernetes,
    pub(crate) state_dir: Option<PathBuf>,
    pub(crate) api_socket: Option<PathBuf>,
    pub(crate) metrics_address: Option<Endpoint>,
    pub(crate) log_level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNode {
    pub(crate) name: Option<String>,
    pub(crate) region: Option<String>,
    pub(crate) private_address: Option<Address>,
    pub(crate) public_address: Option<Address>,
    pub(crate) key_file: Option<PathBuf>,
    pub(crate) pod_cidr: Option<OneOrMany<Cidr>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNetwork {
    pub(crate) pod_network_cidr: Option<OneOrMany<Cidr>>,
    pub(crate) node_cidr_mask_size: Option<u8>,
    pub(crate) node_cidr_mask_size_ipv4: Option<u8>,
    pub(crate) node_cidr_mask_size_ipv6: Option<u8>,
    pub(crate) block_expiry: Option<HumanDuration>,
    pub(crate) trusted_subnets: Option<Vec<Cidr>>,
    pub(crate) mtu: Option<u16>,
    pub(crate) nat_outgoing: Option<bool>,
    pub(crate) no_masquerade: Option<Vec<Cidr>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMesh {
    pub(crate) port: Option<Port>,
    pub(crate) peers: Option<Vec<HostPort>>,
    pub(crate) secret_file: Option<PathBuf>,
    pub(crate) gossip_interval: Option<HumanDuration>,
    pub(crate) liveness_timeout: Option<HumanDuration>,
    pub(crate) tombstone_horizon: Option<HumanDuration>,
    pub(crate) max_members: Option<usize>,
    pub(crate) record_refresh: Option<HumanDuration>,
    pub(crate) relay: Option<crate::Relay>,
    pub(crate) authority: Option<OneOrMany<crate::AuthorityKey>>,
    pub(crate) certificate: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRouter {
    pub(crate) port: Option<Port>,
    pub(crate) interface: Option<String>,
    pub(crate) offload: Option<crate::Offload>,
    pub(crate) workers: Option<crate::Workers>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawWireguardPeer {
    pub(crate) name: String,
    pub(crate) public_key: PublicKey,
    pub(crate) endpoint: Option<Endpoint>,
    #[serde(default)]
    pub(crate) allowed_ips: Vec<Cidr>,
    pub(crate) persistent_keepalive: Option<u16>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCni {
    pub(crate) conflist: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKubernetes {
    pub(crate) enabled: Option<bool>,
}
