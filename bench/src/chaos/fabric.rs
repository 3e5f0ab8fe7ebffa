//! The chaos lab's network and daemons: N nodes in three regions, each with a private address
//! on its region's LAN and a public one on a shared internet. The fabric is routed, not a flat
//! switch: every node's link ends in one router namespace (`sw`), at a gateway address, with a
//! host route back. A flat segment of N nodes needs N² neighbour entries, and the kernel's ARP
//! table is one table for every namespace (1024 entries by default), so a 60-node flat lab
//! fails with ENOBUFS; routed, each node holds two entries and the router two per node.
//!
//! The router forwards only within a region's LAN and within the internet (region LANs do not
//! meet). Faults that touch the network (partitions, loss) are rules in its `inet chaos`
//! table, rewritten whole in one transaction each time they change, so the fabric is always
//! exactly the active faults; delay, where the kernel has `sch_netem`, is a netem qdisc on the
//! node's side of its links.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use weft::demo::lab::{Daemon, Lab, NodeSection, run};

/// The regions, by index; nodes are spread over them round-robin.
pub(crate) const REGIONS: [&str; 3] = ["eu", "us", "ap"];
/// The region whose nodes trust their LAN (plaintext between them).
pub(crate) const TRUSTED_REGION: usize = 0;
/// The pool every node claims its block from (no node has a static block).
pub(crate) const POOL: &str = "100.64.0.0/16";

/// One node of the lab.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    /// Its daemon's files and namespace.
    pub(crate) daemon: Daemon,
    /// Index into [`REGIONS`].
    pub(crate) region: usize,
    /// Its address on its region's LAN.
    pub(crate) private: Ipv4Addr,
    /// Its address on the internet segment.
    pub(crate) public: Ipv4Addr,
    /// Its LAN link's name on the router.
    pub(crate) lan_port: String,
    /// Its internet link's name on the router.
    pub(crate) wan_port: String,
}

/// A fault the fabric applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Impairment {
    /// Region `.0` cut from the internet segment (its LAN still works).
    Partition(usize),
    /// Node `.0` loses `.1` percent of what it sends and receives, both links.
    Loss(usize, u8),
}

/// The lab: namespaces, daemons and the fabric's active faults.
#[derive(Debug)]
pub(crate) struct Fabric {
    /// The namespaces and processes.
    pub(crate) lab: Lab,
    /// The weft binary.
    pub(crate) bin: PathBuf,
    /// The router namespace.
    pub(crate) switch: String,
    /// The nodes, by index.
    pub(crate) nodes: Vec<Node>,
    /// The cluster secret.
    secret: String,
    /// Whether the trusted region trusts its LAN now (a reload fault flips it).
    pub(crate) trusting: bool,
    /// Active network faults.
    impairments: Vec<Impairment>,
}

impl Fabric {
    /// Builds the namespaces, links and configs of `n` nodes (daemons not started).
    pub(crate) fn build(bin: &Path, n: usize) -> anyhow::Result<Self> {
        if !(2..=250).contains(&n) {
            bail!("--nodes {n}: the chaos lab holds 2 to 250 nodes");
        }
        let mut lab = Lab::new("chaos")?;
        let switch = lab.add_ns("sw")?;
        run(lab
            .cmd(&switch, "sh")
            .args(["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]))?;
        let secret = String::from_utf8(run(Command::new(bin).arg("gensecret"))?.stdout)?;
        let mut me = Self {
            lab,
            bin: bin.to_owned(),
            switch,
            nodes: Vec::new(),
            secret,
            trusting: true,
            impairments: Vec::new(),
        };
        for i in 0..n {
            me.add_node(i)?;
        }
        // Written once every node exists: each names the bootstrap members.
        for i in 0..n {
            me.write_config(i)?;
        }
        me.apply()?;
        Ok(me)
    }

    fn add_node(&mut self, i: usize) -> anyhow::Result<()> {
        let region = i % REGIONS.len();
        let host = u8::try_from(i + 1).context("node number")?;
        let (private, public) = (
            Ipv4Addr::new(198, 18, 10 + region as u8, host),
            Ipv4Addr::new(198, 19, 0, host),
        );
        let name = format!("n{i}");
        let ns = self.lab.add_ns(&name)?;
        let lan_port = format!("l{region}n{i}");
        let wan_port = format!("wn{i}");
        self.attach(&ns, "lan0", private, &lan_port)?;
        self.attach(&ns, "wan0", public, &wan_port)?;
        let daemon = self.lab.daemon(&name, &ns, "")?;
        weft::host::keys::write_private(&daemon.secret_file, &self.secret)?;
        self.nodes.push(Node {
            daemon,
            region,
            private,
            public,
            lan_port,
            wan_port,
        });
        Ok(())
    }

    /// Links node namespace `ns` (interface `ifname`, address `addr`) to the router (interface
    /// `port`): the node holds `addr`/32 and reaches its /24 through the gateway `.254`, which
    /// the router holds on every port of that /24, with a host route back to `addr`.
    fn attach(&mut self, ns: &str, ifname: &str, addr: Ipv4Addr, port: &str) -> anyhow::Result<()> {
        let o = addr.octets();
        let gw = Ipv4Addr::new(o[0], o[1], o[2], 254);
        let net = format!("{}.{}.{}.0/24", o[0], o[1], o[2]);
        let sw = self.switch.clone();
        self.lab.link(
            (ns, ifname, &format!("{addr}/32")),
            (&sw, port, &format!("{gw}/32")),
        )?;
        self.lab.ip(
            ns,
            &[
                "route",
                "add",
                &net,
                "via",
                &gw.to_string(),
                "dev",
                ifname,
                "onlink",
            ],
        )?;
        self.lab
            .ip(&sw, &["route", "add", &format!("{addr}/32"), "dev", port])?;
        Ok(())
    }

    /// Writes node `i`'s config as the fabric's state says (trust of its LAN).
    pub(crate) fn write_config(&self, i: usize) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        let (private, public) = (node.private.to_string(), node.public.to_string());
        let section = NodeSection {
            name: &node.daemon.name,
            region: Some(REGIONS[node.region]),
            private_address: Some(&private),
            public_address: Some(&public),
            pod_cidr: None,
        };
        let trusted = if node.region == TRUSTED_REGION && self.trusting {
            format!("[198.18.{}.0/24]", 10 + node.region)
        } else {
            "[]".to_owned()
        };
        // Two bootstrap members, in two regions, reached on the internet segment (each of
        // the two names the other).
        let boot: Vec<String> = (0..self.nodes.len().min(2))
            .filter(|&b| b != i)
            .map(|b| self.nodes[b].public.to_string())
            .collect();
        let body = format!(
            "{section}network:\n  pod_network_cidr: [{POOL}]\n  trusted_subnets: {trusted}\n\
             mesh:\n  secret_file: SECRET_FILE\n  peers: [{peers}]\n\
             router:\n  interface: weft0\n",
            section = section.yaml(),
            peers = boot.join(", "),
        );
        self.lab.daemon(&node.daemon.name, &node.daemon.ns, &body)?;
        Ok(())
    }

    /// Starts node `i`'s daemon (with `--reset-state` when `wipe`) and waits for its API.
    pub(crate) fn start(&mut self, i: usize, wipe: bool) -> anyhow::Result<()> {
        let d = self.nodes[i].daemon.clone();
        let args: &[&str] = if wipe { &["--reset-state"] } else { &[] };
        // WEFT_LOG from the harness's environment reaches the daemons (e.g. weft_mesh=debug).
        let level = std::env::var("WEFT_LOG").unwrap_or_else(|_| "info".into());
        self.lab
            .start_with(&self.bin, &d, args, &[("WEFT_LOG", level.as_str())])
    }

    /// Adds `f` to the fabric's faults and applies them.
    pub(crate) fn impair(&mut self, f: Impairment) -> anyhow::Result<()> {
        self.impairments.push(f);
        self.apply()
    }

    /// Removes `f` from the fabric's faults and applies the rest.
    pub(crate) fn heal(&mut self, f: Impairment) -> anyhow::Result<()> {
        self.impairments.retain(|x| *x != f);
        self.apply()
    }

    /// Whether the fabric now separates nodes `a` and `b`: one of them is in a region cut
    /// from the internet and the other is not in the same region.
    pub(crate) fn separated(&self, a: usize, b: usize) -> bool {
        let (ra, rb) = (self.nodes[a].region, self.nodes[b].region);
        ra != rb
            && self
                .impairments
                .iter()
                .any(|f| matches!(f, Impairment::Partition(r) if *r == ra || *r == rb))
    }

    /// Rewrites the router's `inet chaos` table to hold exactly the active faults, then what
    /// the router forwards at all: within a region's LAN and within the internet.
    fn apply(&self) -> anyhow::Result<()> {
        let mut rules = Vec::new();
        let mut cut: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
        for f in &self.impairments {
            match *f {
                Impairment::Partition(r) => cut.entry(r).or_default().extend(
                    self.nodes
                        .iter()
                        .filter(|n| n.region == r)
                        .map(|n| n.wan_port.as_str()),
                ),
                Impairment::Loss(i, pct) => {
                    let n = &self.nodes[i];
                    for port in [&n.lan_port, &n.wan_port] {
                        for dir in ["iifname", "oifname"] {
                            rules.push(format!(
                                "{dir} \"{port}\" numgen random mod 100 < {pct} drop"
                            ));
                        }
                    }
                }
            }
        }
        for ports in cut.values() {
            let set = ports
                .iter()
                .map(|p| format!("\"{p}\""))
                .collect::<Vec<_>>()
                .join(", ");
            rules.push(format!("iifname {{ {set} }} drop"));
            rules.push(format!("oifname {{ {set} }} drop"));
        }
        for r in 0..REGIONS.len() {
            rules.push(format!("iifname \"l{r}n*\" oifname \"l{r}n*\" accept"));
        }
        rules.push("iifname \"wn*\" oifname \"wn*\" accept".to_owned());
        let script = format!(
            "table inet chaos\ndelete table inet chaos\n\
             table inet chaos {{\n  chain forward {{\n    type filter hook forward priority 0; policy drop;\n{}  }}\n}}\n",
            rules
                .iter()
                .map(|r| format!("    {r}\n"))
                .collect::<String>()
        );
        let mut child = self
            .lab
            .cmd(&self.switch, "nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("running nft in the router (is nftables installed?)")?;
        child
            .stdin
            .take()
            .context("nft's stdin")?
            .write_all(script.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "nft refused the fabric's rules: {}\n{script}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Adds `ms` of delay to what node `i` sends on both its links; false when this kernel
    /// has no netem (then nothing is changed).
    pub(crate) fn delay(&self, i: usize, ms: u32) -> bool {
        let ns = &self.nodes[i].daemon.ns;
        ["lan0", "wan0"].iter().all(|dev| {
            run(self.lab.cmd(ns, "tc").args([
                "qdisc",
                "replace",
                "dev",
                dev,
                "root",
                "netem",
                "delay",
                &format!("{ms}ms"),
            ]))
            .is_ok()
        })
    }

    /// Removes node `i`'s delay, if any.
    pub(crate) fn undelay(&self, i: usize) {
        let ns = &self.nodes[i].daemon.ns;
        for dev in ["lan0", "wan0"] {
            let _ = self
                .lab
                .cmd(ns, "tc")
                .args(["qdisc", "del", "dev", dev, "root"])
                .output();
        }
    }

    /// Stops node `i` as systemd would (SIGTERM, then SIGKILL after `grace`); whether it
    /// exited cleanly.
    pub(crate) fn stop(&mut self, i: usize, grace: Duration) -> anyhow::Result<bool> {
        let name = self.nodes[i].daemon.name.clone();
        self.lab.stop(&name, grace)
    }
}
