//! weft's end-to-end tests: real daemons in network namespaces (see `tests/it`), built on the
//! lab of `weft::lab`. This library holds what the tests share: the path of the weft binary,
//! two-node labs, a TCP stream with verifiable content, and a pcap reader for captures.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use weft::lab::{Daemon, Lab};

pub mod cni;
pub mod ipam_sim;
pub mod kubeapi;
pub mod meshlab;
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

/// Writes a fresh private key for `d` (0600) and returns its public key, base64.
pub fn make_key(d: &Daemon) -> anyhow::Result<String> {
    let (key, created) = weft::keys::load_or_create(&d.key_file)?;
    ensure!(created, "{} already existed", d.key_file.display());
    Ok(weft::keys::public_of(&key))
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
    let mut s = format!(
        "node:\n  name: {name}\n  private_address: {addr}\n  key_file: KEY_FILE\n  pod_cidr: {pods}\n\
         router:\n  port: 51820\n  interface: weft0\nmesh:\n  secret_file: SECRET_FILE\n"
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
        let bin = weft_bin()?;
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
            &node_config(
                "a",
                "198.18.1.1",
                "100.64.1.0/24",
                &[("b", &kb, "198.18.1.2:51820", "100.64.2.0/24")],
            ),
        )?;
        let b = lab.daemon(
            "b",
            &nb,
            &node_config(
                "b",
                "198.18.1.2",
                "100.64.2.0/24",
                &[("a", &ka, "198.18.1.1:51820", "100.64.1.0/24")],
            ),
        )?;
        lab.start(&bin, &a)?;
        lab.start(&bin, &b)?;
        Ok(Self { lab, bin, a, b })
    }

    /// Pings `dst` from namespace `ns` until one reply arrives (bounded), then `count` more.
    pub fn ping(&self, ns: &str, dst: &str) -> anyhow::Result<()> {
        ping(&self.lab, ns, dst, None)
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
    weft::lab::wait_for(
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
    weft::lab::wait_for(
        &format!("a ping reply from {dst} in {ns}"),
        Duration::from_secs(15),
        || cmd.output().ok().filter(|o| o.status.success()),
    )?;
    Ok(())
}

/// A deterministic byte stream, so the receiver can check every byte whatever the sizes of its
/// reads.
#[derive(Debug, Clone)]
pub struct Stream {
    state: u64,
    word: [u8; 8],
    pos: usize,
}

impl Stream {
    /// A stream from `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed | 1,
            word: [0; 8],
            pos: 8,
        }
    }

    /// Fills `buf` with the next bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            if self.pos == 8 {
                let mut x = self.state;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                self.state = x;
                self.word = x.to_le_bytes();
                self.pos = 0;
            }
            *b = self.word[self.pos];
            self.pos += 1;
        }
    }
}

/// Sends `total` bytes of [`Stream`] `seed` over TCP from namespace `from_ns` to `to` (a server
/// in `to_ns`), and checks on the receiving side that every byte arrived intact and in order.
pub fn tcp_transfer(
    lab: &Lab,
    (from_ns, to_ns): (&str, &str),
    to: SocketAddr,
    total: usize,
    seed: u64,
) -> anyhow::Result<Duration> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = lab.in_ns(to_ns, move || {
        let listener = TcpListener::bind(to).with_context(|| format!("binding {to}"))?;
        ready_tx.send(()).ok();
        let (mut conn, _) = listener.accept().context("accepting")?;
        conn.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut expect = Stream::new(seed);
        let (mut got, mut want) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
        let mut received = 0usize;
        loop {
            let n = conn
                .read(&mut got)
                .with_context(|| format!("server reading after {received} bytes"))?;
            if n == 0 {
                break;
            }
            expect.fill(&mut want[..n]);
            if got[..n] != want[..n] {
                bail!("byte {received}..{}: content differs", received + n);
            }
            received += n;
        }
        Ok(received)
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .context("the TCP server did not start")?;
    let client = lab.in_ns(from_ns, move || {
        #[expect(clippy::disallowed_methods, reason = "measuring a transfer")]
        let start = std::time::Instant::now();
        let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(10))
            .with_context(|| format!("connecting to {to}"))?;
        conn.set_write_timeout(Some(Duration::from_secs(30)))?;
        let mut s = Stream::new(seed);
        let mut buf = vec![0u8; 1 << 16];
        let mut sent = 0;
        while sent < total {
            let n = buf.len().min(total - sent);
            s.fill(&mut buf[..n]);
            conn.write_all(&buf[..n])
                .with_context(|| format!("client writing after {sent} bytes"))?;
            sent += n;
        }
        conn.shutdown(std::net::Shutdown::Write)?;
        // Wait for the server to close, so the duration covers delivery.
        let _ = conn.read(&mut buf);
        Ok(start.elapsed())
    });
    let took = client
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    let received = server
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    ensure!(received == total, "received {received} of {total} bytes");
    Ok(took)
}
