//! weft's end-to-end tests: real daemons in network namespaces (see `tests/it`), built on the
//! lab of `weft::demo::lab`. This library holds what the tests share: the path of the weft binary,
//! two-node labs, the fake Kubernetes API, the CNI runtime, and a pcap reader for captures (the
//! verifiable TCP transfer lives in `weft::demo::lab`, which the demo shares).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use weft::demo::lab::{Daemon, Lab};
pub use weft::demo::lab::{Stream, tcp_transfer};

pub mod cni;
pub mod exposition;
pub mod ipam_sim;
pub mod kubeapi;
pub mod meshlab;
pub mod natlab;
pub mod netstat;
pub mod pcap;
pub mod sim;

/// The `weft` binary of this build (built by `cargo build --bins` before the tests).
pub fn weft_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/it-<hash> → target/<profile>/weft
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("weft"))
        .context("locating the target directory")?;
    ensure!(
        bin.exists(),
        "{} does not exist: run `cargo build --bins` before the end-to-end tests (scripts/test.sh does)",
        bin.display()
    );
    Ok(bin)
}

/// Runs `cmd` with `input` on its standard input and returns what it printed and how it
/// ended, whatever that was.
pub fn output_with_input(
    cmd: &mut std::process::Command,
    input: &str,
) -> anyhow::Result<std::process::Output> {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    child
        .stdin
        .take()
        .context("no standard input")?
        .write_all(input.as_bytes())?;
    Ok(child.wait_with_output()?)
}

/// Writes a fresh private key for `d` (0600) and returns its public key, base64.
pub fn make_key(d: &Daemon) -> anyhow::Result<String> {
    let (key, created) = weft::host::keys::load_or_create(&d.key_file)?;
    ensure!(created, "{} already existed", d.key_file.display());
    Ok(weft::host::keys::public_of(&key))
}

/// Two weft nodes `a` (198.18.1.1, pods 100.64.1.0/24) and `b` (198.18.1.2, 100.64.2.0/24) on
/// one underlay link (`eth0` in each), each listing the other under `wireguard_peers`.
#[derive(Debug)]
pub struct Pair {
    /// The lab (drop it last).
    pub lab: Lab,
    /// The weft binary.
    pub bin: PathBuf,
    /// Node a.
    pub a: Daemon,
    /// Node b.
    pub b: Daemon,
}

/// The config of a lab node: `name` at `addr` owning `pods`, with `peers` as
/// `(name, public key, endpoint, allowed ip)`.
pub fn node_config(
    name: &str,
    addr: &str,
    pods: &str,
    peers: &[(&str, &str, &str, &str)],
) -> String {
    let node = weft::demo::lab::NodeSection {
        name,
        private_address: Some(addr),
        pod_cidr: Some(pods),
        ..Default::default()
    };
    let mut s = format!(
        "{}router:\n  port: 51820\n  interface: weft0\nmesh:\n  secret_file: SECRET_FILE\n",
        node.yaml()
    );
    if !peers.is_empty() {
        s.push_str("wireguard_peers:\n");
        for (n, key, ep, allowed) in peers {
            s.push_str(&format!("  - name: {n}\n    public_key: {key}\n"));
            if !ep.is_empty() {
                s.push_str(&format!("    endpoint: {ep}\n"));
            }
            s.push_str(&format!("    allowed_ips: [{allowed}]\n"));
        }
    }
    s
}

impl Pair {
    /// Builds the namespaces and configs and starts both daemons.
    pub fn start(tag: &str) -> anyhow::Result<Self> {
        Self::start_with(tag, None)
    }

    /// As [`start`](Self::start), with `router.offload` and `router.workers` set to `offload`
    /// and `workers`, and IPv6 pod blocks beside the IPv4 ones (a: fd00:64:0:1::/64, b:
    /// fd00:64:0:2::/64).
    pub fn start_dual(tag: &str, offload: &str, workers: &str) -> anyhow::Result<Self> {
        Self::start_with(tag, Some((offload, workers)))
    }

    fn start_with(tag: &str, dual_offload: Option<(&str, &str)>) -> anyhow::Result<Self> {
        let bin = weft_bin()?;
        let (pods_a, pods_b, allow_a, allow_b) = if dual_offload.is_some() {
            (
                "[100.64.1.0/24, fd00:64:0:1::/64]",
                "[100.64.2.0/24, fd00:64:0:2::/64]",
                "100.64.1.0/24, fd00:64:0:1::/64",
                "100.64.2.0/24, fd00:64:0:2::/64",
            )
        } else {
            (
                "100.64.1.0/24",
                "100.64.2.0/24",
                "100.64.1.0/24",
                "100.64.2.0/24",
            )
        };
        let finish = |body: String| match dual_offload {
            Some((o, w)) => {
                body.replace(
                    "  interface: weft0\n",
                    &format!("  interface: weft0\n  offload: {o}\n  workers: {w}\n"),
                ) + "network:\n  pod_network_cidr: [100.64.0.0/16, fd00:64::/48]\n"
            }
            None => body,
        };
        let mut lab = Lab::new(tag)?;
        let na = lab.add_ns("a")?;
        let nb = lab.add_ns("b")?;
        lab.link(
            (&na, "eth0", "198.18.1.1/24"),
            (&nb, "eth0", "198.18.1.2/24"),
        )?;
        let a = lab.daemon("a", &na, "")?;
        let b = lab.daemon("b", &nb, "")?;
        let (ka, kb) = (make_key(&a)?, make_key(&b)?);
        let a = lab.daemon(
            "a",
            &na,
            &finish(node_config(
                "a",
                "198.18.1.1",
                pods_a,
                &[("b", &kb, "198.18.1.2:51820", allow_b)],
            )),
        )?;
        let b = lab.daemon(
            "b",
            &nb,
            &finish(node_config(
                "b",
                "198.18.1.2",
                pods_b,
                &[("a", &ka, "198.18.1.1:51820", allow_a)],
            )),
        )?;
        lab.start(&bin, &a)?;
        lab.start(&bin, &b)?;
        Ok(Self { lab, bin, a, b })
    }

    /// Pings `dst` from namespace `ns` until one reply arrives (bounded), then `count` more.
    pub fn ping(&self, ns: &str, dst: &str) -> anyhow::Result<()> {
        ping(&self.lab, ns, dst, None)
    }

    /// The TUN device `weft0` of the node in `ns` as the kernel reports it: `ip -j <flag> link
    /// show weft0`, parsed (`-s` adds its statistics, `-d` its details).
    pub fn weft0(&self, ns: &str, flag: &str) -> anyhow::Result<serde_json::Value> {
        let out = self
            .lab
            .ip(ns, &[flag, "-j", "link", "show", "dev", "weft0"])?;
        let links: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("parsing ip -j {flag} link show weft0 in {ns}"))?;
        Ok(links[0].clone())
    }
}

/// Starts tcpdump as lab process `name` on `dev` in namespace `ns`, writing every packet that
/// matches `filter` to `<lab dir>/<name>.pcap` as it reads it; returns once it listens.
pub fn capture(
    lab: &mut Lab,
    name: &str,
    ns: &str,
    dev: &str,
    filter: &[&str],
) -> anyhow::Result<PathBuf> {
    let file = lab.dir.join(format!("{name}.pcap"));
    let log = lab.dir.join(format!("{name}.log"));
    let mut cmd = lab.cmd(ns, "tcpdump");
    cmd.args(["-i", dev, "-U", "-n", "-s", "0", "-w"])
        .arg(&file)
        .args(filter);
    lab.spawn(name, cmd, Some(&log))?;
    weft::demo::lab::wait_for(
        &format!("{name} to listen"),
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|l| l.contains("listening on"))
        },
    )?;
    Ok(file)
}

/// The alive members in a `weft status --json` report.
pub fn alive_members(status: &serde_json::Value) -> Vec<serde_json::Value> {
    let members = status["mesh"]["members"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    members.into_iter().filter(|x| x["alive"] == true).collect()
}

/// Pings `dst` from `ns` (optionally from address `src`): succeeds once a reply arrives within
/// 15 one-second tries.
pub fn ping(lab: &Lab, ns: &str, dst: &str, src: Option<&str>) -> anyhow::Result<()> {
    let mut cmd = lab.cmd(ns, "ping");
    cmd.args(["-c", "1", "-W", "1", "-n", "-q"]);
    if let Some(s) = src {
        cmd.args(["-I", s]);
    }
    cmd.arg(dst);
    weft::demo::lab::wait_for(
        &format!("a ping reply from {dst} in {ns}"),
        Duration::from_secs(15),
        || cmd.output().ok().filter(|o| o.status.success()),
    )?;
    Ok(())
}

/// The value of the sample `name` with (at least) `labels` in the metrics the daemon in `ns`
/// serves now ([`exposition::sample_value`]).
pub fn metric(lab: &Lab, ns: &str, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
    let response = http_get(lab, ns, "127.0.0.1:6782", "/metrics")?;
    exposition::sample_value(&response, name, labels).map_err(|e| anyhow::anyhow!("{ns}: {e}"))
}

/// One HTTP/1.1 GET of `path` from `addr`, made inside namespace `ns`; the whole response.
pub fn http_get(
    lab: &Lab,
    ns: &str,
    addr: &'static str,
    path: &'static str,
) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    lab.in_ns(ns, move || {
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: weft\r\nConnection: close\r\n\r\n"
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the scraper panicked"))?
}
