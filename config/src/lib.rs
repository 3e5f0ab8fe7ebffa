//! weft's config: the YAML schema of `DESIGN.md`, its defaults, and its validation into typed values.
//!
//! # Architecture
//!
//! [`Config::parse`] deserializes the text into raw structs (`raw`, every key optional, unknown keys
//! refused) whose scalar values (`value`: CIDRs, addresses, ports, keys, durations) parse themselves,
//! so a bad value is reported with its line and key. The raw structs then become a [`Config`] with
//! every default filled in and the values checked against each other; a [`ConfigError`] names the
//! file, line and key of the first problem. Loading ([`Config::load`]) reads the file and the
//! machine's hostname and is kept apart from parsing so tests need neither.

mod error;
mod locate;
mod raw;
mod validate;
pub mod value;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use crate::error::{ConfigError, Location, Problem};
pub use crate::value::{AuthorityKey, PublicKey};

/// Where `weft run` reads its config unless told otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/weft/weft.yaml";

/// The whole validated config, defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// This node.
    pub node: Node,
    /// The overlay network.
    pub network: Network,
    /// The gossip mesh.
    pub mesh: Mesh,
    /// The data plane.
    pub router: Router,
    /// Plain WireGuard peers outside the mesh.
    pub wireguard_peers: Vec<WireguardPeer>,
    /// The CNI network config the daemon writes.
    pub cni: Cni,
    /// The Kubernetes node source.
    pub kubernetes: Kubernetes,
    /// Where keys and IPAM state live.
    pub state_dir: PathBuf,
    /// The local API's unix socket.
    pub api_socket: PathBuf,
    /// Where Prometheus metrics and `/healthz` are served.
    pub metrics_address: SocketAddr,
    /// Log filter when `WEFT_LOG` is not set: a level (`error`, `warn`, `info`, `debug`,
    /// `trace`) or comma-separated `target=level` directives. Default `info`.
    pub log_level: String,
}

/// This node's identity and addresses.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// The node name (default: the hostname).
    pub name: String,
    /// The region, when known from the config.
    pub region: Option<String>,
    /// The address peers in the same region use: unicast ([`value::unicast`]) and outside
    /// the pod network; an IPv4-mapped one is kept as the IPv4 address it is.
    pub private_address: Option<IpAddr>,
    /// The address peers in other regions use; the same rule as `private_address`.
    pub public_address: Option<IpAddr>,
    /// The WireGuard private key file (default `state_dir/private.key`).
    pub key_file: PathBuf,
    /// A static pod CIDR block, at most one per family, each inside the pod network and no
    /// broader than a node block of its family (what the peers accept).
    pub pod_cidr: Vec<IpNet>,
}

/// The overlay network.
#[derive(Debug, Clone, PartialEq)]
pub struct Network {
    /// The cluster's pod network: one IPv4 and/or one IPv6 prefix.
    pub pod_network_cidr: Vec<IpNet>,
    /// Node block size for IPv4 (default 24).
    pub node_cidr_mask_size_ipv4: u8,
    /// Node block size for IPv6 (default 64).
    pub node_cidr_mask_size_ipv6: u8,
    /// How long a dead node's block is kept before reclaim (default 24h, at most 36500d: a hundred years stands for never).
    pub block_expiry: Duration,
    /// Underlay subnets where plaintext is allowed when both ends agree.
    pub trusted_subnets: Vec<IpNet>,
    /// The TUN MTU; `None` means underlay MTU minus the encapsulation overhead.
    pub mtu: Option<u16>,
    /// Masquerade pod traffic leaving the pod network (default true).
    pub nat_outgoing: bool,
    /// Destinations that keep the pod source address.
    pub no_masquerade: Vec<IpNet>,
}

/// The gossip mesh.
#[derive(Debug, Clone, PartialEq)]
pub struct Mesh {
    /// TCP port for gossip (default 6783).
    pub port: u16,
    /// Bootstrap peers, each with its port (the mesh port when none was given).
    pub peers: Vec<SocketAddr>,
    /// The cluster secret file.
    pub secret_file: PathBuf,
    /// How often a node gossips its digest to one neighbour (default 1s, at most 1h).
    pub gossip_interval: Duration,
    /// A member not heard from for this long is down and its routes withdrawn (default 30s,
    /// at least three gossip intervals, at most 24h).
    pub liveness_timeout: Duration,
    /// A member down or departed for this long is forgotten (default 72h, at most 36500d; at
    /// least `network.block_expiry`, so a dead node's block is never forgotten before it
    /// expires).
    pub tombstone_horizon: Duration,
    /// The most members a node holds; records of further nodes are refused and counted
    /// (default 8192, at most 100000).
    pub max_members: usize,
    /// How often a node republishes its record unchanged, stamped with its clock (default
    /// 10m, 1s to 24h): a member can back-date a pod-CIDR claim by at most this plus five
    /// minutes before the others refuse it; each period costs one record per node at every
    /// member.
    pub record_refresh: Duration,
    /// Which members may relay for this node when nothing direct reaches a peer (default
    /// `auto`).
    pub relay: Relay,
    /// The public keys of the cluster's authority (`weft authority pubkey`), standalone mode
    /// only: one, or a list while a new key is rolled out. With them, a member's pod-CIDR
    /// claims are believed only when its certificate, signed by one of these keys, names them;
    /// this node's own blocks are its certificate's. Empty: no authority.
    pub authority: Vec<AuthorityKey>,
    /// This node's certificate file (`weft authority sign`); required with `authority`.
    pub certificate: Option<PathBuf>,
}

/// `mesh.relay`: which members this node's traffic may be relayed through. Written `auto` (any
/// public member not behind NAT), `never` (none: a peer no direct path reaches stays
/// unreachable), or a list of member names. It does not change whether this node relays for
/// others: a public node not behind NAT does, as the others cannot know its setting.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Relay {
    /// Any member that can.
    #[default]
    Auto,
    /// None.
    Never,
    /// Only these members.
    Named(Vec<String>),
}

impl<'de> Deserialize<'de> for Relay {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            Names(Vec<String>),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected auto, never, or a list of member names")
        })? {
            Raw::Word(w) if w == "auto" => Ok(Self::Auto),
            Raw::Word(w) if w == "never" => Ok(Self::Never),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "{w:?} is not auto or never (a single relay is written as a list: [{w}])"
            ))),
            Raw::Names(n) if n.is_empty() => Err(serde::de::Error::custom(
                "an empty list of relays: write never to relay through no member",
            )),
            Raw::Names(n) => match n.iter().find(|s| s.is_empty()) {
                Some(_) => Err(serde::de::Error::custom("an empty member name")),
                None => Ok(Self::Named(n)),
            },
        }
    }
}

/// Which of the data path's speed-ups are allowed; each is still used only where the kernel has it.
///
/// Written `auto` (all of them, the default), `off` (the plain path: one packet per system call),
/// or a list of the mechanisms to allow, e.g. `[udp_batch, udp_gso]`, which the benchmark uses to
/// measure each in turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Offload {
    /// Batched UDP receive (`recvmmsg`) and several TUN reads per wake-up.
    pub udp_batch: bool,
    /// UDP generic segmentation offload (`UDP_SEGMENT`): one send per run of equal datagrams.
    pub udp_gso: bool,
    /// UDP generic receive offload (`UDP_GRO`): the kernel hands over runs of datagrams at once.
    pub udp_gro: bool,
    /// TUN offloads (`IFF_VNET_HDR`, `TUNSETOFFLOAD`): 64 KB TCP/UDP segments in, coalesced ones out.
    pub tun: bool,
}

impl Offload {
    /// Every mechanism the kernel has.
    pub const AUTO: Self = Self {
        udp_batch: true,
        udp_gso: true,
        udp_gro: true,
        tun: true,
    };
    /// None: one packet per system call.
    pub const OFF: Self = Self {
        udp_batch: false,
        udp_gso: false,
        udp_gro: false,
        tun: false,
    };
    /// The mechanisms' names, as written in a list.
    pub const NAMES: [&str; 4] = ["udp_batch", "udp_gso", "udp_gro", "tun"];

    /// The allowed mechanisms' names.
    pub fn names(&self) -> Vec<&'static str> {
        let on = [self.udp_batch, self.udp_gso, self.udp_gro, self.tun];
        Self::NAMES
            .iter()
            .zip(on)
            .filter_map(|(n, on)| on.then_some(*n))
            .collect()
    }
}

impl Default for Offload {
    fn default() -> Self {
        Self::AUTO
    }
}

impl std::str::FromStr for Offload {
    type Err = String;
    /// `auto`, `off`, or mechanism names separated by commas.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "auto" => return Ok(Self::AUTO),
            "off" | "" => return Ok(Self::OFF),
            _ => {}
        }
        let mut o = Self::OFF;
        for name in s.split(',').map(str::trim) {
            match name {
                "udp_batch" => o.udp_batch = true,
                "udp_gso" => o.udp_gso = true,
                "udp_gro" => o.udp_gro = true,
                "tun" => o.tun = true,
                other => {
                    return Err(format!(
                        "unknown offload {other:?}: expected auto, off, or a list of {}",
                        Self::NAMES.join(", ")
                    ));
                }
            }
        }
        Ok(o)
    }
}

impl<'de> Deserialize<'de> for Offload {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names = value::OneOrMany::<String>::deserialize(d)?;
        if names.0.is_empty() {
            return Ok(Self::OFF);
        }
        names.0.join(",").parse().map_err(serde::de::Error::custom)
    }
}

/// The data plane.
#[derive(Debug, Clone, PartialEq)]
pub struct Router {
    /// UDP port for WireGuard and plaintext encapsulation (default 51820, at most 65534: with
    /// the mesh on, the relay listens on the next port).
    pub port: u16,
    /// The TUN device's name (default `weft0`), one the kernel takes: 1 to 15 bytes, not `.`
    /// or `..`, without `/`, `:` or whitespace.
    pub interface: String,
    /// Which speed-ups the data path may use (default all: `auto`).
    pub offload: Offload,
    /// How many threads move packets (default `auto`: one per core this process may use).
    pub workers: Workers,
}

/// `router.workers`: how many data-path threads the daemon runs, each with its own TUN queue
/// and UDP socket. Written `auto` (one per core the process may run on, at most
/// [`Workers::AUTO_MAX`]) or a count from 1 to [`Workers::MAX`]; `1` is the single-threaded
/// path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum Workers {
    /// One per available core, at most [`Workers::AUTO_MAX`].
    #[default]
    Auto,
    /// Exactly this many.
    Count(u16),
}

impl Workers {
    /// The most workers: a TUN device has at most 256 queues, and past a few dozen cores one
    /// node's overlay traffic is not what the cores are for.
    pub const MAX: u16 = 64;
    /// The most workers `auto` picks: each costs its buffers (a few MB of memory) and a thread,
    /// and one node's overlay traffic rarely fills more than a few cores; a count above this
    /// must be asked for.
    pub const AUTO_MAX: u16 = 8;

    /// The number of workers, with `auto` resolved against `cores` (the cores this process may
    /// use, from [`std::thread::available_parallelism`]).
    pub fn resolve(self, cores: usize) -> usize {
        match self {
            Self::Auto => cores.clamp(1, usize::from(Self::AUTO_MAX)),
            Self::Count(n) => usize::from(n),
        }
    }
}

impl std::fmt::Display for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Count(n) => write!(f, "{n}"),
        }
    }
}

impl std::str::FromStr for Workers {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s == "auto" {
            return Ok(Self::Auto);
        }
        match s.parse::<u16>() {
            Ok(n) if (1..=Self::MAX).contains(&n) => Ok(Self::Count(n)),
            _ => Err(format!(
                "{s:?} is not auto or a number of workers from 1 to {}",
                Self::MAX
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Workers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i64),
            Word(String),
        }
        let text = match Raw::deserialize(d)
            .map_err(|_| serde::de::Error::custom("expected auto or a number of workers"))?
        {
            Raw::Number(n) => n.to_string(),
            Raw::Word(w) => w,
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A plain WireGuard peer outside the mesh.
#[derive(Debug, Clone, PartialEq)]
pub struct WireguardPeer {
    /// A name for status and logs.
    pub name: String,
    /// Its public key.
    pub public_key: PublicKey,
    /// Where to reach it; `None` for a roaming peer until it speaks first.
    pub endpoint: Option<SocketAddr>,
    /// The overlay prefixes routed to it and accepted from it.
    pub allowed_ips: Vec<IpNet>,
    /// Keepalive interval in seconds.
    pub persistent_keepalive: Option<u16>,
}

/// The CNI network config the daemon writes.
#[derive(Debug, Clone, PartialEq)]
pub struct Cni {
    /// Path of the conflist, or `None`: no conflist is written. `cni.conflist` when set; else
    /// [`DEFAULT_CONFLIST`] with `kubernetes.enabled`; else none, so a standalone node never
    /// puts a CNI config on a host whose pods another plugin serves.
    pub conflist: Option<PathBuf>,
}

/// Where a node with `kubernetes.enabled` writes its conflist unless `cni.conflist` says.
pub const DEFAULT_CONFLIST: &str = "/etc/cni/net.d/10-weft.conflist";

/// The Kubernetes node source.
#[derive(Debug, Clone, PartialEq)]
pub struct Kubernetes {
    /// Whether nodes, regions and pod CIDRs come from the Kubernetes API.
    pub enabled: bool,
}

impl Config {
    /// Reads and parses the config file at `path`; the hostname is the default node name.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path, &hostname())
    }

    /// Parses config text; `origin` names it in errors, `hostname` is the default node name.
    pub fn parse(text: &str, origin: &Path, hostname: &str) -> Result<Self, ConfigError> {
        let raw = parse_raw(text, origin)?;
        validate::validate(raw, text, origin, hostname)
    }
}

/// The machine's hostname, or `localhost` when it cannot be read.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

fn parse_raw(text: &str, origin: &Path) -> Result<raw::RawConfig, ConfigError> {
    // An empty file (or one of only comments) is the all-defaults config.
    if text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        return Ok(raw::RawConfig::default());
    }
    let de = serde_yaml_ng::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        // A syntax error leaves `?` where the parser lost track; keep the part it knew.
        let key = e.path().to_string();
        let key = key.split(".?").next().unwrap_or(".").to_owned();
        let inner = e.into_inner();
        let mut pos = inner.location().map(|l| (l.line(), l.column()));
        // Inside a list item the parser points at the item's first line; the key's own line is
        // more precise when it can be found at or below that.
        if let Some(found) = locate::locate(text, &key)
            && pos.is_none_or(|p| found.0 >= p.0)
        {
            pos = Some(found);
        }
        let mut message = inner.to_string();
        // The parser appends its own position and prefixes the path; both are reported apart.
        if let Some(cut) = message.rfind(" at line ") {
            message.truncate(cut);
        }
        if let Some((prefix, rest)) = message.split_once(": ")
            && !prefix.contains(' ')
            && key.starts_with(prefix)
        {
            message = rest.to_owned();
        }
        ConfigError::Parse {
            at: Location {
                file: origin.to_owned(),
                line: pos.map(|p| p.0),
                column: pos.map(|p| p.1),
            },
            key: if key == "." {
                "(top level)".to_owned()
            } else {
                key
            },
            message,
        }
    })
}
