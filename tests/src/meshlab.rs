//! The lab of DESIGN.md with the mesh on: nodes in two regions, each with a private address on
//! its region's LAN (198.18.R.0/24, trusted by the nodes in it) and a public one on a shared
//! "internet" (198.19.0.0/24). Region LANs are not connected to each other.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use weft::demo::lab::{Daemon, Lab, wait_for};

use crate::weft_bin;

/// One node of the mesh lab.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Name (and namespace suffix).
    pub name: &'static str,
    /// Region label.
    pub region: &'static str,
    /// LAN (1 or 2): 198.18.{lan}.0/24.
    pub lan: u8,
    /// Host number on the LAN and on the internet (198.19.0.{host + 10 * (lan - 1)}).
    pub host: u8,
    /// Static pod block 100.64.{block}.0/24, or `None` to claim one (and an IPv6 one) from
    /// the lab's dual-stack pool, [`POOLS`].
    pub block: Option<u8>,
    /// Bootstrap peer address (IP), if any.
    pub bootstrap: Option<&'static str>,
}

impl Spec {
    /// Its private address.
    pub fn private(&self) -> String {
        format!("198.18.{}.{}", self.lan, self.host)
    }
    /// Its public address.
    pub fn public(&self) -> String {
        format!("198.19.0.{}", self.host + 10 * (self.lan - 1))
    }
}

/// The pools of the lab's nodes without a static block (`network.pod_network_cidr`).
pub const POOLS: &str = "[100.64.0.0/20, fd00:64::/48]";

/// Two nodes per region; e1 and e2 in eu (LAN 1), u1 and u2 in us (LAN 2); each bootstraps
/// from one other node only.
pub const FOUR: [Spec; 4] = [
    Spec {
        name: "e1",
        region: "eu",
        lan: 1,
        host: 1,
        block: Some(1),
        bootstrap: Some("198.18.1.2"),
    },
    Spec {
        name: "e2",
        region: "eu",
        lan: 1,
        host: 2,
        block: Some(2),
        bootstrap: Some("198.18.1.1"),
    },
    Spec {
        name: "u1",
        region: "us",
        lan: 2,
        host: 1,
        block: Some(3),
        bootstrap: Some("198.19.0.1"),
    },
    Spec {
        name: "u2",
        region: "us",
        lan: 2,
        host: 2,
        block: Some(4),
        bootstrap: Some("198.18.2.1"),
    },
];

/// The running lab.
#[derive(Debug)]
pub struct MeshLab {
    /// The lab.
    pub lab: Lab,
    /// The weft binary.
    pub bin: PathBuf,
    /// The switch namespace.
    pub switch: String,
    /// The cluster secret (base64).
    pub secret: String,
    /// The daemons, in spec order.
    pub daemons: Vec<Daemon>,
    /// The specs, in the same order.
    pub specs: Vec<Spec>,
}

/// The config of a mesh lab node.
pub fn config(s: &Spec, region: &str) -> String {
    let block = s.block.map(|b| format!("100.64.{b}.0/24"));
    let (private, public) = (s.private(), s.public());
    let node = weft::demo::lab::NodeSection {
        name: s.name,
        region: Some(region),
        private_address: Some(&private),
        public_address: Some(&public),
        pod_cidr: block.as_deref(),
    };
    node_config(&node, &[&format!("198.18.{}.0/24", s.lan)], s.bootstrap)
}

/// The config of a lab node given its `node` section: it trusts `trusted`, bootstraps from
/// `bootstrap` (an IP) if any, claims blocks from [`POOLS`] unless it has a static one, and
/// gossips fast (1 s rounds, 6 s liveness timeout).
pub fn node_config(
    node: &weft::demo::lab::NodeSection<'_>,
    trusted: &[&str],
    bootstrap: Option<&str>,
) -> String {
    let pools = match node.pod_cidr {
        Some(_) => String::new(),
        None => format!("  pod_network_cidr: {POOLS}\n"),
    };
    format!(
        "{node}network:\n  trusted_subnets: [{trusted}]\n{pools}\
         mesh:\n  secret_file: SECRET_FILE\n  peers: [{boot}]\n  gossip_interval: 1s\n  liveness_timeout: 6s\n\
         router:\n  interface: weft0\n",
        node = node.yaml(),
        trusted = trusted.join(", "),
        boot = bootstrap.unwrap_or(""),
    )
}

impl MeshLab {
    /// Builds the underlay for `specs` and starts every node with the same secret.
    pub fn start(tag: &str, specs: &[Spec]) -> anyhow::Result<Self> {
        let mut me = Self::empty(tag, &["lan1", "lan2", "inet"])?;
        me.specs = specs.to_vec();
        for s in specs {
            let d = me.add_node(s, s.region, &me.secret.clone())?;
            me.daemons.push(d);
        }
        for d in me.daemons.clone() {
            me.lab.start(&me.bin, &d)?;
        }
        Ok(me)
    }

    /// A lab with a switch holding `bridges`, a cluster secret, and no node yet.
    pub fn empty(tag: &str, bridges: &[&str]) -> anyhow::Result<Self> {
        let bin = weft_bin()?;
        let mut lab = Lab::new(tag)?;
        let switch = lab.add_ns("sw")?;
        for br in bridges {
            lab.bridge(&switch, br)?;
        }
        let secret = String::from_utf8(
            weft::demo::lab::run(std::process::Command::new(&bin).arg("gensecret"))?.stdout,
        )?;
        Ok(Self {
            lab,
            bin,
            switch,
            secret,
            daemons: Vec::new(),
            specs: Vec::new(),
        })
    }

    /// Creates node `s`'s namespace and config (with `secret`), without starting it.
    pub fn add_node(&mut self, s: &Spec, region: &str, secret: &str) -> anyhow::Result<Daemon> {
        let ns = self.lab.add_ns(s.name)?;
        let sw = self.switch.clone();
        self.lab.plug(
            (&sw, &format!("lan{}", s.lan)),
            (&ns, "lan0", &format!("{}/24", s.private())),
        )?;
        self.lab
            .plug((&sw, "inet"), (&ns, "wan0", &format!("{}/24", s.public())))?;
        let d = self.lab.daemon(s.name, &ns, &config(s, region))?;
        weft::host::keys::write_private(&d.secret_file, secret)?;
        Ok(d)
    }

    /// A namespace `name` on LAN 1 at `address` with no daemon: another host of that LAN (an
    /// outsider, or a member's process speaking gossip by hand). Returns the namespace.
    pub fn add_host(&mut self, name: &str, address: &str) -> anyhow::Result<String> {
        let ns = self.lab.add_ns(name)?;
        let sw = self.switch.clone();
        self.lab
            .plug((&sw, "lan1"), (&ns, "eth0", &format!("{address}/24")))?;
        Ok(ns)
    }

    /// The daemon called `name`.
    pub fn daemon(&self, name: &str) -> &Daemon {
        self.daemons
            .iter()
            .find(|d| d.name == name)
            .expect("a node of the lab")
    }

    /// `weft status --json` of node `name`.
    pub fn status(&self, name: &str) -> anyhow::Result<serde_json::Value> {
        self.lab.status(&self.bin, self.daemon(name))
    }

    /// Node `name`'s status entry for peer `peer`, once it has one.
    pub fn peer(&self, name: &str, peer: &str) -> Option<serde_json::Value> {
        let st = self.status(name).ok()?;
        st["peers"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == peer)
            .cloned()
    }

    /// Node `name`'s pod blocks, as its status shows them.
    pub fn blocks(&self, name: &str) -> anyhow::Result<Vec<ipnet::IpNet>> {
        let st = self.status(name)?;
        st["node"]["pod_cidrs"]
            .as_array()
            .context("node.pod_cidrs")?
            .iter()
            .map(|b| {
                b.as_str()
                    .context("a block")?
                    .parse()
                    .context("parsing a block")
            })
            .collect()
    }

    /// Node `name`'s overlay addresses: the first host of each of its blocks.
    pub fn overlay(&self, name: &str) -> anyhow::Result<Vec<String>> {
        Ok(self
            .blocks(name)?
            .into_iter()
            .map(|b| weft::plan::first_host(b).to_string())
            .collect())
    }

    /// Waits (30 s at most) until `a` routes `b`: a peer entry with the other's blocks (a node
    /// that has just started may show its peers before its own block is in place).
    pub fn wait_routed(&self, a: &str, b: &str) -> anyhow::Result<()> {
        wait_for(
            &format!("{a} to route {b}"),
            Duration::from_secs(30),
            || {
                self.peer(a, b)
                    .filter(|p| p["pod_cidrs"].as_array().is_some_and(|c| !c.is_empty()))
            },
        )?;
        Ok(())
    }

    /// Waits until every running node routes every other one and pings each of its overlay
    /// addresses.
    pub fn wait_full_mesh(&self, names: &[&str]) -> anyhow::Result<()> {
        for a in names {
            for b in names.iter().filter(|b| *b != a) {
                self.wait_routed(a, b)?;
            }
        }
        for b in names {
            let addrs = self.overlay(b)?;
            anyhow::ensure!(!addrs.is_empty(), "{b} has no pod block");
            for a in names.iter().filter(|a| *a != b) {
                for addr in &addrs {
                    crate::ping(&self.lab, &self.daemon(a).ns, addr, None)
                        .with_context(|| format!("{a} -> {b} ({addr})"))?;
                }
            }
        }
        Ok(())
    }
}
