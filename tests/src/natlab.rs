//! The NAT lab: a shared "internet" (198.19.0.0/24) with public nodes on it, and sites behind
//! NAT routers. Site `i` is a LAN 198.18.{100 + i}.0/24 whose router (namespace `r{i}`, LAN
//! address .1, internet address 198.19.0.{100 + i}) masquerades what leaves for the internet
//! and forwards back only what answers a flow from inside (a stateful firewall, as home and
//! cloud NAT gateways do); unsolicited packets to the router itself are dropped. Nodes behind it know only their LAN address; nothing outside the
//! site can dial them.

use anyhow::Context as _;
use weft::demo::lab::{Daemon, NodeSection};

use crate::meshlab::{MeshLab, node_config};

/// How a site's router maps its nodes' flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// nftables `masquerade`: a flow keeps its source port where it can, and one local
    /// address and port maps to the same public one whatever the destination
    /// (endpoint-independent mapping).
    EndpointIndependent,
    /// nftables `masquerade fully-random`: every flow gets a random public port, so a
    /// mapping seen by one peer is useless to another (symmetric-like).
    Symmetric,
}

/// The internet bridge of the lab.
pub const INTERNET: &str = "inet";

/// A lab with only the internet bridge.
pub fn start(tag: &str) -> anyhow::Result<MeshLab> {
    MeshLab::empty(tag, &[INTERNET])
}

/// Adds and starts public node `name` at 198.19.0.{host} in `region`, bootstrapping from
/// `bootstrap` (an IP) if given.
pub fn add_public(
    m: &mut MeshLab,
    name: &str,
    host: u8,
    region: &str,
    bootstrap: Option<&str>,
) -> anyhow::Result<Daemon> {
    let ns = m.lab.add_ns(name)?;
    let address = format!("198.19.0.{host}");
    m.lab.plug(
        (&m.switch.clone(), INTERNET),
        (&ns, "wan0", &format!("{address}/24")),
    )?;
    let node = NodeSection {
        name,
        region: Some(region),
        private_address: None,
        public_address: Some(&address),
        pod_cidr: None,
    };
    start_node(m, name, &ns, &node_config(&node, &[], bootstrap))
}

/// The public (internet) address of site `site`'s NAT router.
pub fn site_public(site: u8) -> String {
    format!("198.19.0.{}", 100 + site)
}

/// Builds site `site` behind a NAT router of kind `nat`; returns the router's namespace.
pub fn add_site(m: &mut MeshLab, site: u8, nat: Nat) -> anyhow::Result<String> {
    let sw = m.switch.clone();
    let lan = format!("site{site}");
    m.lab.bridge(&sw, &lan)?;
    let router = m.lab.add_ns(&format!("r{site}"))?;
    m.lab.plug(
        (&sw, INTERNET),
        (&router, "wan0", &format!("{}/24", site_public(site))),
    )?;
    m.lab.plug(
        (&sw, &lan),
        (&router, "lan0", &format!("198.18.{}.1/24", 100 + site)),
    )?;
    let random = match nat {
        Nat::EndpointIndependent => "",
        Nat::Symmetric => " fully-random",
    };
    for rule in [
        "add table ip natlab".to_owned(),
        "add chain ip natlab post { type nat hook postrouting priority srcnat; }".to_owned(),
        format!("add rule ip natlab post oifname \"wan0\" masquerade{random}"),
        "add chain ip natlab guard { type filter hook forward priority filter; policy drop; }"
            .to_owned(),
        "add rule ip natlab guard ct state established,related accept".to_owned(),
        "add rule ip natlab guard iifname \"lan0\" oifname \"wan0\" accept".to_owned(),
        // Nothing unsolicited reaches the router itself from the internet either: such a
        // packet is dropped before its connection-tracking entry is confirmed, so it never
        // holds the public port a node's own flow would map to.
        "add chain ip natlab input { type filter hook input priority filter; policy accept; }"
            .to_owned(),
        "add rule ip natlab input iifname \"wan0\" ct state new drop".to_owned(),
    ] {
        weft::demo::lab::run(m.lab.cmd(&router, "nft").arg(&rule))
            .with_context(|| format!("NAT rules of site {site}"))?;
    }
    weft::demo::lab::run(
        m.lab
            .cmd(&router, "sysctl")
            .args(["-qw", "net.ipv4.ip_forward=1"]),
    )?;
    Ok(router)
}

/// Adds and starts node `name` behind site `site` (built by [`add_site`]) as host `host` of
/// its LAN, in `region`, bootstrapping from `bootstrap` (an IP on the internet).
pub fn add_behind_nat(
    m: &mut MeshLab,
    name: &str,
    site: u8,
    host: u8,
    region: &str,
    bootstrap: &str,
) -> anyhow::Result<Daemon> {
    let ns = m.lab.add_ns(name)?;
    let address = format!("198.18.{}.{host}", 100 + site);
    m.lab.plug(
        (&m.switch.clone(), &format!("site{site}")),
        (&ns, "lan0", &format!("{address}/24")),
    )?;
    m.lab.ip(
        &ns,
        &[
            "route",
            "add",
            "default",
            "via",
            &format!("198.18.{}.1", 100 + site),
        ],
    )?;
    let node = NodeSection {
        name,
        region: Some(region),
        private_address: Some(&address),
        public_address: None,
        pod_cidr: None,
    };
    start_node(m, name, &ns, &node_config(&node, &[], Some(bootstrap)))
}

fn start_node(m: &mut MeshLab, name: &str, ns: &str, config: &str) -> anyhow::Result<Daemon> {
    let d = m.lab.daemon(name, ns, config)?;
    weft::host::keys::write_private(&d.secret_file, &m.secret)?;
    m.lab.start(&m.bin, &d)?;
    m.daemons.push(d.clone());
    Ok(d)
}

/// Flushes every connection-tracking entry (so every NAT mapping) of router namespace
/// `router`.
pub fn flush_mappings(m: &MeshLab, router: &str) -> anyhow::Result<()> {
    weft::demo::lab::run(m.lab.cmd(router, "conntrack").arg("-F"))
        .map(drop)
        .context("conntrack -F (the conntrack package)")
}
