//! `weft demo nat`: nodes behind NAT routers, on this machine, then cleaned up.
//!
//! A public node `p` on a shared "internet" (198.19.0.0/24), and three sites behind NAT routers
//! built from nftables: `a` and `b` each behind a router that maps endpoint-independently
//! (`masquerade`, as most home routers and cloud NAT gateways), `c` behind one that gives every
//! destination its own port (`masquerade fully-random`, symmetric-like). Each router lets in
//! only what answers a flow from inside, so nobody can dial a node behind it. The demo shows
//! the three ways weft connects them: `p` follows each node's datagrams to its NAT mapping,
//! `a` and `b` punch through their NATs to each other, and `c`, whose mappings are useless to
//! anyone but `p`, is reached by `a` and `b` through `p` as a relay that forwards WireGuard
//! datagrams it can neither read nor forge. It pings every pod pair, moves a few megabytes
//! through the relay, and shows node c's status.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context as _;

use crate::demo::lab::{self, Daemon, Lab, NodeSection, run, wait_for};
use crate::demo::{interrupted, need, new_lab, start_all, status, stop_all};

/// The tag of the NAT demo's lab (it ends with the demo's, so `weft demo down` finds it).
const TAG: &str = "natdemo";

/// The internet bridge.
pub const INTERNET: &str = "inet";

/// Bytes moved through the relay.
const TRANSFER: usize = 8 << 20;

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

/// The public (internet) address of site `site`'s NAT router.
pub fn site_public(site: u8) -> String {
    format!("198.19.0.{}", 100 + site)
}

/// Builds site `site` behind a NAT router of kind `nat`, both plugged into bridges of switch
/// namespace `switch` (its LAN bridge `site{site}` is made here, the [`INTERNET`] bridge must
/// exist): LAN 198.18.{100 + site}.0/24 with the router at .1, the router's internet address
/// [`site_public`]. The router masquerades what leaves for the internet and forwards back only
/// what answers a flow from inside (a stateful firewall, as home and cloud NAT gateways do);
/// unsolicited packets to the router itself are dropped before they are tracked, so they
/// never hold the public port a node's own flow would map to. Returns the router's namespace.
pub fn add_site(lab: &mut Lab, switch: &str, site: u8, nat: Nat) -> anyhow::Result<String> {
    let lan = format!("site{site}");
    lab.bridge(switch, &lan)?;
    let router = lab.add_ns(&format!("r{site}"))?;
    lab.plug(
        (switch, INTERNET),
        (&router, "wan0", &format!("{}/24", site_public(site))),
    )?;
    lab.plug(
        (switch, &lan),
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
        "add chain ip natlab input { type filter hook input priority filter; policy accept; }"
            .to_owned(),
        "add rule ip natlab input iifname \"wan0\" ct state new drop".to_owned(),
    ] {
        run(lab.cmd(&router, "nft").arg(&rule))
            .with_context(|| format!("NAT rules of site {site}"))?;
    }
    run(lab
        .cmd(&router, "sysctl")
        .args(["-qw", "net.ipv4.ip_forward=1"]))?;
    Ok(router)
}

/// Plugs node namespace `ns` into site `site`'s LAN as host `host`, with its default route
/// through the site's router; returns its LAN address.
pub fn join_site(
    lab: &mut Lab,
    switch: &str,
    ns: &str,
    site: u8,
    host: u8,
) -> anyhow::Result<String> {
    let address = format!("198.18.{}.{host}", 100 + site);
    lab.plug(
        (switch, &format!("site{site}")),
        (ns, "lan0", &format!("{address}/24")),
    )?;
    let gateway = format!("198.18.{}.1", 100 + site);
    lab.ip(ns, &["route", "add", "default", "via", &gateway])?;
    Ok(address)
}

/// One node of the NAT demo.
struct Node {
    name: &'static str,
    region: &'static str,
    /// Its site and NAT, or none for the public node.
    site: Option<(u8, Nat)>,
    /// The third octet of its pod block 100.64.X.0/24.
    block: u8,
}

impl Node {
    fn pod_ip(&self) -> String {
        format!("100.64.{}.2", self.block)
    }
}

const PUBLIC: &str = "198.19.0.1";

const NODES: [Node; 4] = [
    Node {
        name: "p",
        region: "cloud",
        site: None,
        block: 1,
    },
    Node {
        name: "a",
        region: "home",
        site: Some((1, Nat::EndpointIndependent)),
        block: 2,
    },
    Node {
        name: "b",
        region: "office",
        site: Some((2, Nat::EndpointIndependent)),
        block: 3,
    },
    Node {
        name: "c",
        region: "lab",
        site: Some((3, Nat::Symmetric)),
        block: 4,
    },
];

/// Builds the internet, the sites, the nodes' configs and their pods.
fn build(lab: &mut Lab) -> anyhow::Result<Vec<Daemon>> {
    let sw = lab.add_ns("switch")?;
    lab.bridge(&sw, INTERNET)?;
    let secret = crate::host::keys::encode(&crate::host::keys::generate_secret());
    let mut daemons = Vec::new();
    for n in &NODES {
        let ns = lab.add_ns(n.name)?;
        let (private, public) = match n.site {
            None => {
                lab.plug((&sw, INTERNET), (&ns, "wan0", &format!("{PUBLIC}/24")))?;
                println!("  node {} ({}): public {PUBLIC}", n.name, n.region);
                (None, Some(PUBLIC.to_owned()))
            }
            Some((site, nat)) => {
                add_site(lab, &sw, site, nat)?;
                let address = join_site(lab, &sw, &ns, site, 2)?;
                let kind = match nat {
                    Nat::EndpointIndependent => "endpoint-independent NAT (masquerade)",
                    Nat::Symmetric => "symmetric NAT (masquerade fully-random)",
                };
                println!(
                    "  node {} ({}): LAN {address} behind router {} with {kind}",
                    n.name,
                    n.region,
                    site_public(site)
                );
                (Some(address), None)
            }
        };
        let block = format!("100.64.{}.0/24", n.block);
        let node = NodeSection {
            name: n.name,
            region: Some(n.region),
            private_address: private.as_deref(),
            public_address: public.as_deref(),
            pod_cidr: Some(&block),
        };
        let peers = if n.site.is_some() { PUBLIC } else { "" };
        let cfg = format!(
            "{}mesh:\n  secret_file: SECRET_FILE\n  peers: [{peers}]\n",
            node.yaml()
        );
        let d = lab.daemon(n.name, &ns, &cfg)?;
        crate::host::keys::write_private(&d.secret_file, &secret)?;
        daemons.push(d);
        lab.add_pod(&ns, &format!("pod-{}", n.name), &n.pod_ip())?;
    }
    Ok(daemons)
}

/// Runs the NAT demo: builds the lab, starts the daemons, waits for every path, pings every
/// pod pair, moves data through the relay and shows node c's status; then cleans up, or with
/// `keep` leaves the lab running.
pub fn run_nat_demo(bin: &Path, stop: Arc<AtomicBool>, keep: bool) -> anyhow::Result<()> {
    lab::require_root("weft demo nat")?;
    need("ip", "iproute2")?;
    need("nft", "nftables")?;
    let mut lab = new_lab("weft demo nat", TAG, keep)?;
    let daemons = build(&mut lab)?;
    start_all(&mut lab, bin, &daemons, &stop)?;
    paths(bin, &daemons, &stop)?;
    println!("\npod-to-pod ping, every pair:");
    for from in &NODES {
        for to in NODES.iter().filter(|t| t.name != from.name) {
            interrupted(&stop)?;
            let dst = to.pod_ip();
            let rtt = lab
                .icmp_echo(
                    &lab.ns(&format!("pod-{}", from.name)),
                    dst.parse()?,
                    Duration::from_secs(15),
                )
                .with_context(|| format!("pod-{} to reach {dst}", from.name))?;
            println!(
                "  pod-{} -> pod-{}: reply in {:.3} ms",
                from.name,
                to.name,
                rtt.as_secs_f64() * 1e3
            );
        }
    }
    interrupted(&stop)?;
    let took = lab::tcp_transfer(
        &lab,
        (&lab.ns("pod-a"), &lab.ns("pod-c")),
        format!("{}:5201", NODES[3].pod_ip()).parse()?,
        TRANSFER,
        1,
    )?;
    println!(
        "\nTCP pod-a -> pod-c through the relay: {} MB in {:.2} s, every byte checked",
        TRANSFER >> 20,
        took.as_secs_f64()
    );
    let c = &daemons[3];
    let out = run(Command::new(bin)
        .arg("status")
        .arg("--socket")
        .arg(&c.socket))?;
    println!(
        "\n$ weft status   # on node c, behind the symmetric NAT\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    if keep {
        let (ns, file) = (lab.ns("c"), lab.keep()?);
        println!(
            "the lab is still running (listed in {}). Look around:\n  \
             ip netns exec {ns} {bin} status --socket {}\n\
             and remove it with:\n  {bin} demo down",
            file.display(),
            c.socket.display(),
            bin = bin.display(),
        );
        return Ok(());
    }
    stop_all(lab, &daemons)
}

/// Waits until every node is up with every other, and prints each path and why.
fn paths(bin: &Path, daemons: &[Daemon], stop: &Arc<AtomicBool>) -> anyhow::Result<()> {
    println!(
        "waiting for every path (mappings learned, holes punched, relays found; up to a minute)..."
    );
    for (d, n) in daemons.iter().zip(&NODES) {
        for other in NODES.iter().filter(|o| o.name != n.name) {
            interrupted(stop)?;
            let p = wait_for(
                &format!("node {} to be up with node {}", n.name, other.name),
                Duration::from_secs(90),
                || {
                    let st = status(bin, d).ok()?;
                    st.peers
                        .into_iter()
                        .find(|p| p.name == other.name && p.state == "up")
                },
            )?;
            println!(
                "  {} -> {}: up at {} ({})",
                n.name,
                other.name,
                p.endpoint.as_deref().unwrap_or("-"),
                p.endpoint_reason
            );
        }
    }
    Ok(())
}
