//! [`ConfigError`]: what is wrong with a config file, and where.

use std::fmt;
use std::path::PathBuf;

/// A place in a config file: `file:line:column` (line and column from 1; either may be unknown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file the config was read from (or a name such as `<embedded>`).
    pub file: PathBuf,
    /// The line, from 1, when known.
    pub line: Option<usize>,
    /// The column, from 1, when known.
    pub column: Option<usize>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        Ok(())
    }
}

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The YAML is malformed, has an unknown key, or a value of the wrong type or form.
    #[error("{at}: {key}: {message}")]
    Parse {
        /// Where.
        at: Location,
        /// The key path (`network.pod_network_cidr`, `wireguard_peers[1].public_key`).
        key: String,
        /// What the parser said, without its position.
        message: String,
    },
    /// Every value parsed, but they do not fit together.
    #[error("{at}: {key}: {problem}")]
    Invalid {
        /// Where.
        at: Location,
        /// The key path.
        key: String,
        /// What is wrong (shown in the message, so not also a source: a chain printer would
        /// say it twice).
        problem: Box<Problem>,
    },
}

impl ConfigError {
    /// The key path the error is about.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Read { .. } => None,
            Self::Parse { key, .. } | Self::Invalid { key, .. } => Some(key),
        }
    }

    /// Where in the file the error is.
    pub fn location(&self) -> Option<&Location> {
        match self {
            Self::Read { .. } => None,
            Self::Parse { at, .. } | Self::Invalid { at, .. } => Some(at),
        }
    }
}

/// A value that parsed on its own but is wrong in context.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// A list of prefixes has more than one of one family.
    #[error("at most one IPv4 and one IPv6 CIDR, found two {0} ones: {1} and {2}")]
    TwoOfOneFamily(String, ipnet::IpNet, ipnet::IpNet),
    /// `pod_network_cidr` is an empty list.
    #[error("must name at least one CIDR")]
    Empty,
    /// A node block size is not longer than the pool prefix, or beyond the address width.
    #[error("mask size /{mask} does not fit the pool {pool} (it must be longer than /{} and at most /{max})", pool.prefix_len())]
    MaskSize {
        /// The mask size.
        mask: u8,
        /// The pool.
        pool: ipnet::IpNet,
        /// The widest mask of the family.
        max: u8,
    },
    /// `node.pod_cidr` is broader than a node block of its family: every peer would refuse the
    /// claim.
    #[error("{block} is broader than a node block (/{mask}, {mask_key})")]
    BlockTooBroad {
        /// The block.
        block: ipnet::IpNet,
        /// The node block size of its family.
        mask: u8,
        /// The key that sets that size.
        mask_key: &'static str,
    },
    /// `node.pod_cidr` lies outside `pod_network_cidr`.
    #[error("{block} is not inside the pod network {pools}")]
    OutsidePool {
        /// The block.
        block: ipnet::IpNet,
        /// The pools, comma separated.
        pools: String,
    },
    /// A node address no peer can send to.
    #[error(
        "{0} is not a unicast address a peer can reach (loopback, unspecified, multicast, \
         broadcast and link-local addresses are refused)"
    )]
    NotUnicast(std::net::IpAddr),
    /// A node address inside the pod network: traffic to it would be routed into the overlay.
    #[error(
        "{address} is inside the pod network {pool}; a node's underlay address must lie outside it"
    )]
    InPodNetwork {
        /// The address.
        address: std::net::IpAddr,
        /// The pool it falls in.
        pool: ipnet::IpNet,
    },
    /// Two `wireguard_peers` have the same name.
    #[error("duplicate peer name {0:?}")]
    DuplicateName(String),
    /// Two `wireguard_peers` have the same public key.
    #[error("duplicate public key {0} (also used by peer {1:?})")]
    DuplicateKey(String, String),
    /// Two peers claim the same prefix.
    #[error("{0} is already claimed by peer {1:?}")]
    DuplicatePrefix(ipnet::IpNet, String),
    /// A `wireguard_peers` prefix that covers the pod network or overlaps this node's block:
    /// the configured peer's claim wins, so it would take the traffic of every mesh node in it.
    #[error(
        "{prefix} of peer {peer:?} overlaps {what} {covered}: the mesh's traffic there would go to this peer; \
         list only prefixes outside the pod network, or blocks of it no mesh node holds"
    )]
    CoversMesh {
        /// The peer's name.
        peer: String,
        /// Its prefix.
        prefix: ipnet::IpNet,
        /// What it overlaps (`the pod network`, `this node's block`).
        what: String,
        /// The prefix overlapped.
        covered: ipnet::IpNet,
    },
    /// The MTU is below what IPv6 needs or above what a tunnel can carry.
    #[error("{0} is out of range 1280-65455")]
    Mtu(u16),
    /// An interface name the kernel would refuse (its `dev_valid_name`).
    #[error(
        "interface name {0:?} is not one the kernel takes: 1-15 bytes, not \".\" or \"..\", \
         without '/', ':' or whitespace"
    )]
    InterfaceName(String),
    /// A duration that must not be zero.
    #[error("must be longer than zero")]
    ZeroDuration,
    /// A liveness timeout shorter than three gossip intervals would mark live nodes down.
    #[error("{0:?} is shorter than three gossip intervals ({1:?} each)")]
    LivenessTooShort(std::time::Duration, std::time::Duration),
    /// A tombstone horizon shorter than the block expiry would forget a dead node's block
    /// before it expires.
    #[error("{0:?} is shorter than network.block_expiry ({1:?})")]
    HorizonBeforeExpiry(std::time::Duration, std::time::Duration),
    /// A duration outside its range (the value, the least, the most).
    #[error("{0:?} is out of range {1}-{2}")]
    OutOfRange(std::time::Duration, &'static str, &'static str),
    /// A duration longer than the most its key takes (the value, the most): more than any
    /// deployment needs, and past it the timers' arithmetic could overflow.
    #[error("{0:?} is longer than the most it may be, {1}")]
    TooLong(std::time::Duration, &'static str),
    /// A member cap of zero, or one whose digest would not fit a gossip frame.
    #[error("{0} is out of range 1-100000")]
    MaxMembers(usize),
    /// A router port with no port after it for the relay.
    #[error(
        "{0} leaves no relay port: with the mesh on (mesh.secret_file present), the relay \
         listens on router.port + 1; use at most 65534"
    )]
    NoRelayPort(u16),
    /// A name that is empty.
    #[error("must not be empty")]
    EmptyName,
    /// `log_level` is not a level or a list of `target=level` directives.
    #[error(
        "{0:?} is not a log filter: use a level (error, warn, info, debug, trace) or target=level directives, comma-separated"
    )]
    LogLevel(String),
    /// A setting that only makes sense with another one.
    #[error("needs {0}")]
    Needs(&'static str),
    /// A setting that cannot go with another one.
    #[error("cannot be used with {0}")]
    Excludes(&'static str),
    /// A list that must name something is empty.
    #[error("is an empty list: {0}")]
    EmptyList(&'static str),
}
