//! `weft demo`: a small lab on this machine that shows weft working, then cleans up.
//!
//! Three nodes in two regions: `a` and `b` share region eu-west's LAN (198.18.1.0/24), `c` is
//! alone in us-east (198.18.2.0/24), and all three have a public address on a shared "internet"
//! segment (198.19.0.0/24). The region LANs are not connected, so a node that used a private
//! address across regions would fail visibly. Each node runs the real daemon (this binary) and
//! hosts one pod namespace. The nodes share a cluster secret and each knows one other node only;
//! the mesh does the rest: `a` and `b` reach each other at their private addresses in plaintext
//! (both trust the eu-west LAN), and `c` at its public address over WireGuard. The demo pings
//! pod to pod across every pair and prints each node's `weft status`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::lab::{Daemon, Lab, run, wait_for};

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

const NODES: [Node; 3] = [
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

/// Runs the demo: builds the lab, starts the daemons, shows traffic and status, cleans up.
pub fn run_demo(bin: &Path, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    crate::lab::require_root("weft demo")?;
    need("ip", "iproute2")?;
    need("ping", "iputils-ping")?;
    let mut lab = Lab::new("demo")?;
    println!(
        "weft demo: lab {} (namespaces {}-*), cleaned up on exit\n",
        lab.id, lab.id
    );

    // The underlay: one switch namespace with a bridge per segment.
    let sw = lab.add_ns("switch")?;
    for br in ["eu", "us", "inet"] {
        lab.bridge(&sw, br)?;
    }
    let mut daemons: Vec<Daemon> = Vec::new();
    let secret = crate::keys::encode(&crate::keys::generate_secret());
    for n in &NODES {
        let ns = lab.add_ns(n.name)?;
        let lan = if n.region == "eu-west" { "eu" } else { "us" };
        lab.plug((&sw, lan), (&ns, "lan0", &format!("{}/24", n.private)))?;
        lab.plug((&sw, "inet"), (&ns, "wan0", &format!("{}/24", n.public)))?;
        let lan_net = if n.region == "eu-west" {
            "198.18.1.0/24"
        } else {
            "198.18.2.0/24"
        };
        let cfg = format!(
            "node:\n  name: {}\n  region: {}\n  private_address: {}\n  public_address: {}\n  key_file: KEY_FILE\n  pod_cidr: 100.64.{}.0/24\n\
             network:\n  trusted_subnets: [{lan_net}]\n\
             mesh:\n  secret_file: SECRET_FILE\n  peers: [{}]\n",
            n.name, n.region, n.private, n.public, n.block, n.bootstrap
        );
        let d = lab.daemon(n.name, &ns, &cfg)?;
        std::fs::write(&d.secret_file, &secret)?;
        daemons.push(d);
        // A pod: its own namespace, a veth to the node, the node routes its /32 to it.
        let pod = lab.add_ns(&format!("pod-{}", n.name))?;
        let pod_ip = format!("100.64.{}.2", n.block);
        lab.link((&ns, "pod0", ""), (&pod, "eth0", &format!("{pod_ip}/32")))?;
        lab.ip(&pod, &["route", "add", "default", "dev", "eth0"])?;
        lab.ip(
            &ns,
            &["route", "add", &format!("{pod_ip}/32"), "dev", "pod0"],
        )?;
        run(lab.cmd(&ns, "sh").args([
            "-c",
            "echo 1 > /proc/sys/net/ipv4/ip_forward && echo 1 > /proc/sys/net/ipv4/conf/pod0/proxy_arp && echo 0 > /proc/sys/net/ipv4/neigh/pod0/proxy_delay",
        ]))?;
    }
    for d in &daemons {
        interrupted(&stop)?;
        lab.start(bin, d)
            .with_context(|| format!("starting weft on node {}", d.name))?;
        println!("started weft on node {} (log {})", d.name, d.log.display());
    }

    for (i, n) in NODES.iter().enumerate() {
        let want = NODES.len() - 1;
        wait_for(
            &format!("node {} to learn every other node", n.name),
            Duration::from_secs(30),
            || {
                let out = Command::new(bin)
                    .args(["status", "--json", "--socket"])
                    .arg(&daemons[i].socket)
                    .output()
                    .ok()?;
                let st: crate::status::Status = serde_json::from_slice(&out.stdout).ok()?;
                (st.peers.len() == want).then_some(())
            },
        )?;
    }
    println!("every node learned the others through the mesh");

    println!("\npod-to-pod traffic, every pair:");
    for from in &NODES {
        for to in NODES.iter().filter(|t| t.name != from.name) {
            interrupted(&stop)?;
            let dst = format!("100.64.{}.2", to.block);
            let pod = lab.ns(&format!("pod-{}", from.name));
            let mut ping = lab.cmd(&pod, "ping");
            ping.args(["-c", "1", "-W", "1", "-n", &dst]);
            let out = wait_for(
                &format!("pod-{} to reach {dst}", from.name),
                Duration::from_secs(15),
                || ping.output().ok().filter(|o| o.status.success()),
            )?;
            let text = String::from_utf8_lossy(&out.stdout);
            let rtt = text
                .split("time=")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .unwrap_or("?");
            let how = if from.region == to.region {
                "same region: private address, plaintext"
            } else {
                "across regions: public address, WireGuard"
            };
            println!(
                "  pod-{} 100.64.{}.2 -> pod-{} {dst}: reply in {rtt} ms ({how})",
                from.name, from.block, to.name
            );
        }
    }

    for d in &daemons {
        interrupted(&stop)?;
        let out = run(Command::new(bin)
            .arg("status")
            .arg("--socket")
            .arg(&d.socket))?;
        println!(
            "\n$ weft status   # on node {}\n{}",
            d.name,
            String::from_utf8_lossy(&out.stdout)
        );
    }
    println!("stopping the daemons and removing the lab...");
    for d in &daemons {
        if !lab.stop(&d.name, Duration::from_secs(10))? {
            bail!(
                "weft on node {} did not exit cleanly; see {}",
                d.name,
                d.log.display()
            );
        }
    }
    drop(lab);
    println!("done: the lab is gone. Next: `weft run --config /etc/weft/weft.yaml` on real nodes.");
    Ok(())
}

/// The path of the running binary, for starting the daemons.
pub fn current_binary() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("finding the weft binary")
}
