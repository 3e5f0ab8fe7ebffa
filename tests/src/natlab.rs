//! The NAT lab: a shared "internet" (198.19.0.0/24) with public nodes on it, and sites behind
//! NAT routers. Site `i` is a LAN 198.18.{100 + i}.0/24 whose router (namespace `r{i}`, LAN
//! address .1, internet address 198.19.0.{100 + i}) masquerades what leaves for the internet
//! and forwards back only what answers a flow from inside (a stateful firewall, as home and
//! cloud NAT gateways do); unsolicited packets to the router itself are dropped. Nodes behind it know only their LAN address; nothing outside the
//! site can dial them.

use anyhow::Context as _;
use weft::demo::lab::{Daemon, NodeSection};

use crate::meshlab::{MeshLab, node_config};

pub use weft::demo::nat::{Nat, site_public};

/// The internet bridge of the lab.
pub const INTERNET: &str = weft::demo::nat::INTERNET;

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

/// Builds site `site` behind a NAT router of kind `nat` ([`weft::demo::nat::add_site`]);
/// returns the router's namespace.
pub fn add_site(m: &mut MeshLab, site: u8, nat: Nat) -> anyhow::Result<String> {
    let sw = m.switch.clone();
    weft::demo::nat::add_site(&mut m.lab, &sw, site, nat)
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
    let sw = m.switch.clone();
    let address = weft::demo::nat::join_site(&mut m.lab, &sw, &ns, site, host)?;
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

/// Takes the NAT away from site `site`: its router (namespace `router`) forwards both ways
/// without rewriting, every mapping is forgotten, and each namespace in `routers` (the other
/// sites' routers and the public nodes) routes the site's LAN through it.
pub fn remove_nat(m: &MeshLab, site: u8, router: &str, routers: &[&str]) -> anyhow::Result<()> {
    weft::demo::lab::run(
        m.lab
            .cmd(router, "nft")
            .args(["delete", "table", "ip", "natlab"]),
    )
    .with_context(|| format!("removing site {site}'s NAT"))?;
    flush_mappings(m, router)?;
    let lan = format!("198.18.{}.0/24", 100 + site);
    for ns in routers {
        m.lab
            .ip(ns, &["route", "add", &lan, "via", &site_public(site)])?;
    }
    Ok(())
}
