//! `weft demo`: a small lab on this machine that shows weft working, then cleans up.
//!
//! Four nodes in two regions, the lab of DESIGN.md: `a` and `b` share region eu-west's LAN
//! (198.18.1.0/24), which both trust; `c` and `d` share us-east's LAN (198.18.2.0/24), which
//! they do not trust; all four have a public address on a shared "internet" segment
//! (198.19.0.0/24). The region LANs are not connected, so a node that used a private address
//! across regions would fail visibly. Each node runs the real daemon (this binary) and hosts one
//! pod namespace. The nodes share a cluster secret and each knows one other node only; the mesh
//! does the rest: `a`–`b` at private addresses in plaintext, `c`–`d` at private addresses over
//! WireGuard, every pair across regions at public addresses over WireGuard. The demo shows one
//! node's status, pings pod to pod across every pair (with its own ICMP socket: it needs
//! nothing but iproute2), moves a few megabytes over TCP between pods and shows from the
//! daemon's counters where they went.

pub mod lab;
pub mod nat;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::api::status::Status;
use crate::demo::lab::{Daemon, Lab, run, wait_for};

/// The tag of the demo's lab (the end of its id).
const TAG: &str = "demo";

/// Bytes each TCP transfer moves.
const TRANSFER: usize = 32 << 20;

/// One demo node.
struct Node {
    name: &'static str,
    /// The one node it knows at start (an address).
    bootstrap: &'static str,
    region: &'static str,
    private: &'static str,
    public: &'static str,
    /// The node's third octet in 100.64.X.0/24.
    block: u8,
}

impl Node {
    fn pod_ip(&self) -> String {
        format!("100.64.{}.2", self.block)
    }
}

const NODES: [Node; 4] = [
    Node {
        name: "a",
        bootstrap: "198.18.1.2",
        region: "eu-west",
        private: "198.18.1.1",
        public: "198.19.0.1",
        block: 1,
    },
    Node {
        name: "b",
        bootstrap: "198.18.1.1",
        region: "eu-west",
        private: "198.18.1.2",
        public: "198.19.0.2",
        block: 2,
    },
    Node {
        name: "c",
        bootstrap: "198.19.0.1",
        region: "us-east",
        private: "198.18.2.3",
        public: "198.19.0.3",
        block: 3,
    },
    Node {
        name: "d",
        bootstrap: "198.18.2.3",
        region: "us-east",
        private: "198.18.2.4",
        public: "198.19.0.4",
        block: 4,
    },
];

fn need(program: &str, package: &str) -> anyhow::Result<()> {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).exists()));
    if !found {
        bail!("weft demo needs `{program}` (Debian package {package}): apt-get install {package}");
    }
    Ok(())
}

fn interrupted(flag: &AtomicBool) -> anyhow::Result<()> {
    if flag.load(Ordering::Relaxed) {
        bail!("interrupted; cleaning up");
    }
    Ok(())
}

fn status(bin: &Path, d: &Daemon) -> anyhow::Result<Status> {
    let out = run(Command::new(bin)
        .args(["status", "--json", "--socket"])
        .arg(&d.socket))?;
    serde_json::from_slice(&out.stdout).context("parsing weft status --json")
}

/// Builds the underlay, the nodes' configs and their pods.
fn build(lab: &mut Lab) -> anyhow::Result<Vec<Daemon>> {
    let sw = lab.add_ns("switch")?;
    for br in ["eu", "us", "inet"] {
        lab.bridge(&sw, br)?;
    }
    let mut daemons = Vec::new();
    let secret = crate::host::keys::encode(&crate::host::keys::generate_secret());
    for n in &NODES {
        let ns = lab.add_ns(n.name)?;
        let eu = n.region == "eu-west";
        lab.plug(
            (&sw, if eu { "eu" } else { "us" }),
            (&ns, "lan0", &format!("{}/24", n.private)),
        )?;
        lab.plug((&sw, "inet"), (&ns, "wan0", &format!("{}/24", n.public)))?;
        // eu-west trusts its LAN; us-east does not, so its nodes encrypt even between each other.
        let trusted = if eu { "[198.18.1.0/24]" } else { "[]" };
        let block = format!("100.64.{}.0/24", n.block);
        let node = lab::NodeSection {
            name: n.name,
            region: Some(n.region),
            private_address: Some(n.private),
            public_address: Some(n.public),
            pod_cidr: Some(&block),
        };
        let cfg = format!(
            "{}network:\n  trusted_subnets: {trusted}\n\
             mesh:\n  secret_file: SECRET_FILE\n  peers: [{}]\n",
            node.yaml(),
            n.bootstrap
        );
        let d = lab.daemon(n.name, &ns, &cfg)?;
        crate::host::keys::write_private(&d.secret_file, &secret)?;
        daemons.push(d);
        // A pod: its own namespace, a veth to the node, the node routes its /32 to it.
        let pod_ip = n.pod_ip();
        lab.add_pod(&ns, &format!("pod-{}", n.name), &pod_ip)?;
        println!(
            "  node {} ({}): private {} public {}, pod {pod_ip}",
            n.name, n.region, n.private, n.public
        );
    }
    Ok(daemons)
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// Runs the demo: builds the lab, starts the daemons, shows traffic and status, then cleans
/// up, or with `keep` leaves the lab running and says how to look around.
pub fn run_demo(bin: &Path, stop: Arc<AtomicBool>, keep: bool) -> anyhow::Result<()> {
    lab::require_root("weft demo")?;
    need("ip", "iproute2")?;
    let mut lab = new_lab("weft demo", TAG, keep)?;
    let daemons = build(&mut lab)?;
    start_all(&mut lab, bin, &daemons, &stop)?;

    converge_and_ping(&lab, bin, &daemons, &stop)?;
    let a = &daemons[0];
    let out = run(Command::new(bin)
        .arg("status")
        .arg("--socket")
        .arg(&a.socket))?;
    println!(
        "\n$ weft status   # on node a\n{}",
        String::from_utf8_lossy(&out.stdout)
    );

    tcp_between_pods(&lab, bin, &daemons, &stop)?;

    if keep {
        return show_kept(lab, bin, a);
    }
    stop_all(lab, &daemons)?;
    println!("Next: `weft run --config /etc/weft/weft.yaml` on real nodes.");
    Ok(())
}

/// A new lab tagged `tag` for demo `what`, announced.
fn new_lab(what: &str, tag: &str, keep: bool) -> anyhow::Result<Lab> {
    let lab = Lab::new(tag)?;
    println!(
        "{what}: building lab {} (namespaces {}-*){}",
        lab.id,
        lab.id,
        if keep {
            ", kept after the demo (--keep)"
        } else {
            ", removed on exit"
        }
    );
    Ok(lab)
}

/// Starts weft on every node.
fn start_all(
    lab: &mut Lab,
    bin: &Path,
    daemons: &[Daemon],
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    for d in daemons {
        interrupted(stop)?;
        lab.start(bin, d)
            .with_context(|| format!("starting weft on node {}", d.name))?;
        println!("started weft on node {} (log {})", d.name, d.log.display());
    }
    Ok(())
}

/// Stops every daemon (an error names one that did not exit cleanly) and removes the lab.
fn stop_all(mut lab: Lab, daemons: &[Daemon]) -> anyhow::Result<()> {
    println!("stopping the daemons and removing the lab...");
    for d in daemons {
        if !lab.stop(&d.name, Duration::from_secs(10))? {
            bail!(
                "weft on node {} did not exit cleanly; see {}",
                d.name,
                d.log.display()
            );
        }
    }
    drop(lab);
    println!("done: the lab is gone.");
    Ok(())
}

/// `weft demo down`: removes every lab a `weft demo --keep` left.
pub fn down() -> anyhow::Result<()> {
    lab::require_root("weft demo down")?;
    let labs = lab::kept_labs(TAG);
    if labs.is_empty() {
        println!("no kept demo lab to remove");
        return Ok(());
    }
    for dir in labs {
        for line in lab::remove_kept(&dir, Duration::from_secs(10))? {
            println!("{line}");
        }
    }
    println!("done: the kept lab is gone");
    Ok(())
}

/// The path of the running binary, for starting the daemons.
pub fn current_binary() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("finding the weft binary")
}

/// Waits until every node learned the others, then pings every pod pair.
fn converge_and_ping(
    lab: &Lab,
    bin: &Path,
    daemons: &[Daemon],
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<()> {
    println!("waiting for the mesh to converge...");
    for d in daemons {
        interrupted(stop)?;
        wait_for(
            &format!("node {} to learn every other node", d.name),
            Duration::from_secs(30),
            || {
                let st = status(bin, d).ok()?;
                (st.peers.len() == NODES.len() - 1).then_some(())
            },
        )?;
    }
    println!("every node learned the others through the mesh\n");

    println!("pod-to-pod ping (ICMP echo from each pod's namespace), every pair:");
    for from in &NODES {
        for to in NODES.iter().filter(|t| t.name != from.name) {
            interrupted(stop)?;
            let dst = to.pod_ip();
            let pod = lab.ns(&format!("pod-{}", from.name));
            let rtt = lab
                .icmp_echo(&pod, dst.parse()?, Duration::from_secs(15))
                .with_context(|| format!("pod-{} to reach {dst}", from.name))?;
            println!(
                "  pod-{} {} -> pod-{} {dst}: reply in {:.3} ms",
                from.name,
                from.pod_ip(),
                to.name,
                rtt.as_secs_f64() * 1e3
            );
        }
    }
    Ok(())
}

/// TCP between three pod pairs, every byte checked, with what each node's status says of
/// the path.
fn tcp_between_pods(
    lab: &Lab,
    bin: &Path,
    daemons: &[Daemon],
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<()> {
    println!(
        "TCP between pods ({} MB each), and where it went:",
        TRANSFER >> 20
    );
    for (from, to) in [(0, 1), (0, 2), (2, 3)] {
        interrupted(stop)?;
        let (src, dst) = (&NODES[from], &NODES[to]);
        let before = status(bin, &daemons[from])?;
        // Every byte is checked on arrival.
        let took = lab::tcp_transfer(
            lab,
            (
                &lab.ns(&format!("pod-{}", src.name)),
                &lab.ns(&format!("pod-{}", dst.name)),
            ),
            format!("{}:5201", dst.pod_ip()).parse()?,
            TRANSFER,
            from as u64 + 1,
        )?;
        let after = status(bin, &daemons[from])?;
        let peer = |st: &Status| st.peers.iter().find(|p| p.name == dst.name).cloned();
        let (p0, p1) = (
            peer(&before).context("peer before")?,
            peer(&after).context("peer after")?,
        );
        let rate = TRANSFER as f64 * 8.0 / took.as_secs_f64() / 1e6;
        println!(
            "  pod-{} -> pod-{}: {} MB in {:.2} s ({rate:.0} Mbit/s); node {} sent {:.1} MB to node {} at {} ({}, {}){}",
            src.name,
            dst.name,
            TRANSFER >> 20,
            took.as_secs_f64(),
            src.name,
            mb(p1.tx_bytes.saturating_sub(p0.tx_bytes)),
            dst.name,
            p1.endpoint.as_deref().unwrap_or("-"),
            p1.path,
            p1.endpoint_reason,
            if p1.path == "plaintext" {
                ": both trust the LAN"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// Leaves the lab running (`--keep`) and says how to look around and remove it.
fn show_kept(lab: Lab, bin: &Path, a: &Daemon) -> anyhow::Result<()> {
    let id = lab.id.clone();
    let (ns_a, pod_a) = (lab.ns("a"), lab.ns("pod-a"));
    let file = lab.keep()?;
    println!(
        "\nthe lab is still running (listed in {}). Look around:\n  \
         ip netns exec {ns_a} {bin} status --socket {}\n  \
         ip netns exec {ns_a} {bin} status --json --socket {}\n  \
         ip netns exec {pod_a} ping {pod_c}\n  \
         ip netns list | grep {id}\n\
         and remove it with:\n  {bin} demo down",
        file.display(),
        a.socket.display(),
        a.socket.display(),
        pod_c = NODES[2].pod_ip(),
        bin = bin.display(),
    );
    Ok(())
}
