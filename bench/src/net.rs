//! `weft-bench net`: the data path side by side, in one run.
//!
//! Every path gets a fresh two-node lab (namespaces `l` and `r` joined by one veth pair,
//! 198.18.0.1 ↔ 198.18.0.2) and the same measurements with the same tools: iperf3 TCP with one
//! and four streams, iperf3 UDP at full rate with 64- and 1400-byte payloads (received packets
//! per second), ping RTT percentiles, the tunnel processes' CPU seconds per GB moved (from
//! `/proc/<pid>/stat`), and their peak RSS (`VmHWM`). Each measurement repeats `reps` times and
//! the median is reported. Paths: plain veth (the ceiling), weft encrypted (two daemons with
//! `wireguard_peers`), weft plaintext (two mesh nodes that trust the LAN), wireguard-go + wg,
//! boringtun-cli at each thread count asked for. A path that cannot run stops the run with an
//! error; nothing is reported as zero.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use weft::demo::lab::{Lab, run, wait_for};
use weft_tests::netstat::{net_file, udp_rcvbuf_errors, udp_socket_drops};

/// Where the tunnel ends: server side (r) address reached from the client side (l).
const OVERLAY_DST: &str = "100.64.2.1";
const UNDERLAY_DST: &str = "198.18.0.2";
/// Every tunnel gets the same MTU: a 1500-byte veth minus WireGuard's 60 bytes over IPv4.
const TUNNEL_MTU: &str = "1440";

/// One path under test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PathKind {
    /// Plain veth, no tunnel.
    Veth,
    /// weft, WireGuard, with these settings.
    WeftEncrypted(Weft),
    /// weft, plaintext between trusted subnets, with these settings.
    WeftPlaintext(Weft),
    /// wireguard-go configured with wg: Debian's (`None`, found on PATH), or the binary at
    /// this path (`--wireguard-go`), labelled with its version.
    WireguardGo(Option<(PathBuf, String)>),
    /// boringtun-cli with this many threads.
    Boringtun(u32),
}

impl PathKind {
    /// The label in the table.
    pub(crate) fn label(&self) -> String {
        match self {
            Self::Veth => "plain veth".into(),
            Self::WeftEncrypted(w) => weft_label("weft encrypted", w),
            Self::WeftPlaintext(w) => weft_label("weft plaintext", w),
            Self::WireguardGo(None) => "wireguard-go".into(),
            Self::WireguardGo(Some((path, version))) => {
                format!("wireguard-go {version} ({})", path.display())
            }
            Self::Boringtun(t) => format!("boringtun-cli --threads {t}"),
        }
    }
}

/// A weft path's `router` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Weft {
    /// `router.offload`: `auto`, `off`, or a YAML list.
    pub(crate) offload: String,
    /// `router.workers`, when the path sets it (else the default, `auto`).
    pub(crate) workers: Option<String>,
    /// `network.nat_outgoing`. Off unless the path asks (`:nat`): its masquerade rule makes
    /// the kernel track every packet in the namespace (conntrack), which no other tunnel's
    /// namespace does, so with it on the comparison would not be of tunnels alone.
    pub(crate) nat: bool,
}

impl Weft {
    /// Every offload, the default workers.
    pub(crate) fn auto() -> Self {
        Self {
            offload: "auto".into(),
            workers: None,
            nat: false,
        }
    }

    /// The `router:` section.
    fn yaml(&self) -> String {
        let mut s = format!("router:\n  offload: {}\n", self.offload);
        if let Some(w) = &self.workers {
            s.push_str(&format!("  workers: {w}\n"));
        }
        s
    }
}

fn weft_label(what: &str, w: &Weft) -> String {
    let mut label = what.to_owned();
    if w.offload != "auto" {
        label.push_str(&format!(", offload {}", w.offload));
    }
    if let Some(workers) = &w.workers {
        label.push_str(&format!(", workers={workers}"));
    }
    if w.nat {
        label.push_str(", masquerade on");
    }
    label
}

/// The settings of a run.
#[derive(Debug, Clone)]
pub(crate) struct NetArgs {
    /// Seconds per iperf3 test.
    pub(crate) secs: u64,
    /// Repetitions of each measurement.
    pub(crate) reps: usize,
    /// The paths, in order.
    pub(crate) paths: Vec<PathKind>,
    /// The weft binary.
    pub(crate) weft: PathBuf,
    /// The boringtun-cli binary.
    pub(crate) boringtun: PathBuf,
}

/// The medians of one path.
#[derive(Debug, Clone, Default)]
pub(crate) struct Row {
    /// Path label.
    pub(crate) label: String,
    /// Single-stream TCP, Gbit/s.
    pub(crate) tcp1: f64,
    /// Four-stream TCP, Gbit/s.
    pub(crate) tcp4: f64,
    /// UDP 64-byte payloads received, packets/s.
    pub(crate) udp64: f64,
    /// UDP 1400-byte payloads received, packets/s.
    pub(crate) udp1400: f64,
    /// Ping RTT p50, µs.
    pub(crate) rtt50: f64,
    /// Ping RTT p99, µs.
    pub(crate) rtt99: f64,
    /// Tunnel CPU seconds per GB in the single-stream test (both ends); `None` without a
    /// tunnel process.
    pub(crate) cpu_per_gb: Option<f64>,
    /// Peak RSS of the larger tunnel process, MB.
    pub(crate) rss_mb: Option<f64>,
}

/// A lab with one path set up in it.
pub(crate) struct Bench {
    lab: Lab,
    client: String,
    server: String,
    dst: &'static str,
    /// Lab process names of the tunnel processes.
    procs: Vec<String>,
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    }
}

fn two_nodes(tag: &str) -> anyhow::Result<(Lab, String, String)> {
    let mut lab = Lab::new(tag)?;
    let l = lab.add_ns("l")?;
    let r = lab.add_ns("r")?;
    lab.link((&l, "eth0", "198.18.0.1/24"), (&r, "eth0", "198.18.0.2/24"))?;
    Ok((lab, l, r))
}

/// Keys of both ends: (private l, private r, public l, public r), public keys base64.
fn keys() -> ([u8; 32], [u8; 32], String, String) {
    let (kl, kr) = (weft::host::keys::generate(), weft::host::keys::generate());
    (
        kl.to_bytes(),
        kr.to_bytes(),
        weft::host::keys::public_of(&kl),
        weft::host::keys::public_of(&kr),
    )
}

pub(crate) fn setup(args: &NetArgs, kind: &PathKind) -> anyhow::Result<Bench> {
    let (mut lab, l, r) = two_nodes("bn")?;
    let mut procs = Vec::new();
    let dst = match kind {
        PathKind::Veth => UNDERLAY_DST,
        PathKind::WeftEncrypted(weft) | PathKind::WeftPlaintext(weft) => {
            let encrypted = matches!(kind, PathKind::WeftEncrypted(_));
            let (kl, kr, pl, pr) = keys();
            let secret = weft::host::keys::encode(&weft::host::keys::generate_secret());
            let mut daemons = Vec::new();
            for (name, ns, me, other, block, peer_block, key, peer_pub) in [
                ("l", &l, "198.18.0.1", "198.18.0.2", 1, 2, kl, &pr),
                ("r", &r, "198.18.0.2", "198.18.0.1", 2, 1, kr, &pl),
            ] {
                let pods = format!("100.64.{block}.0/24");
                let node = weft::demo::lab::NodeSection {
                    name,
                    region: (!encrypted).then_some("bench"),
                    private_address: Some(me),
                    pod_cidr: Some(&pods),
                    ..Default::default()
                }
                .yaml();
                let nat = weft.nat;
                let body = if encrypted {
                    format!(
                        "{node}network:\n  nat_outgoing: {nat}\n\
                         mesh:\n  secret_file: SECRET_FILE\n\
                         wireguard_peers:\n  - name: peer\n    public_key: {peer_pub}\n    endpoint: {other}:51820\n    allowed_ips: [100.64.{peer_block}.0/24]\n"
                    )
                } else {
                    format!(
                        "{node}network:\n  trusted_subnets: [198.18.0.0/24]\n  nat_outgoing: {nat}\n\
                         mesh:\n  secret_file: SECRET_FILE\n  peers: [{other}]\n"
                    )
                };
                let body = format!("{body}{}", weft.yaml());
                let d = lab.daemon(name, ns, &body)?;
                weft::host::keys::create(&d.key_file, &key)?;
                if !encrypted {
                    weft::host::keys::write_private(&d.secret_file, &secret)?;
                }
                daemons.push(d);
            }
            for d in &daemons {
                lab.start(&args.weft, d)?;
                procs.push(d.name.clone());
            }
            let want = if encrypted { "encrypted" } else { "plaintext" };
            wait_for(
                &format!("weft to route the peer {want}"),
                Duration::from_secs(30),
                || {
                    let st = lab.status(&args.weft, &daemons[0]).ok()?;
                    st["peers"]
                        .as_array()?
                        .iter()
                        .any(|p| p["path"] == want)
                        .then_some(())
                },
            )?;
            OVERLAY_DST
        }
        PathKind::WireguardGo(_) | PathKind::Boringtun(_) => {
            let (kl, kr, pl, pr) = keys();
            // The UAPI sockets live in /var/run/wireguard, shared by every namespace: the
            // interface names must differ between the ends and from anything else running.
            let tag = lab.id.chars().rev().take(6).collect::<String>();
            let names = [format!("wgl{tag}"), format!("wgr{tag}")];
            for (i, (ns, name)) in [(&l, &names[0]), (&r, &names[1])].into_iter().enumerate() {
                let proc_name = format!("tunnel-{i}");
                let mut cmd = match kind {
                    PathKind::WireguardGo(which) => {
                        let program = which
                            .as_ref()
                            .map_or_else(|| PathBuf::from("wireguard-go"), |w| w.0.clone());
                        let mut c = lab.cmd(ns, program);
                        c.args(["-f", name]);
                        c
                    }
                    PathKind::Boringtun(t) => {
                        let mut c = lab.cmd(ns, &args.boringtun);
                        c.args(["-f", "--disable-drop-privileges", "-t", &t.to_string()])
                            .arg("-l")
                            .arg(lab.dir.join(format!("{proc_name}.bt.log")))
                            .arg(name);
                        c
                    }
                    _ => unreachable!("only userspace WireGuard here"),
                };
                cmd.env("LOG_LEVEL", "error");
                let log = lab.dir.join(format!("{proc_name}.log"));
                lab.spawn(&proc_name, cmd, Some(&log))?;
                procs.push(proc_name.clone());
                let sock = PathBuf::from(format!("/var/run/wireguard/{name}.sock"));
                wait_for(
                    &format!("{} to open {}", kind.label(), sock.display()),
                    Duration::from_secs(20),
                    || sock.exists().then_some(()),
                )
                .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;
            }
            for (ns, name, key, peer_pub, other, me, peer_block) in [
                (&l, &names[0], kl, &pr, "198.18.0.2", "100.64.1.1/16", 2),
                (&r, &names[1], kr, &pl, "198.18.0.1", "100.64.2.1/16", 1),
            ] {
                let key_file = lab.dir.join(format!("{name}.key"));
                weft::host::keys::create(&key_file, &key)?;
                run(lab
                    .cmd(ns, "wg")
                    .args(["set", name, "private-key"])
                    .arg(&key_file)
                    .args([
                        "listen-port",
                        "51820",
                        "peer",
                        peer_pub,
                        "endpoint",
                        &format!("{other}:51820"),
                        "allowed-ips",
                        &format!("100.64.{peer_block}.0/24"),
                    ]))?;
                lab.ip(ns, &["addr", "add", me, "dev", name])?;
                lab.ip(ns, &["link", "set", name, "mtu", TUNNEL_MTU, "up"])?;
            }
            OVERLAY_DST
        }
    };
    // The server, and a first packet through (which also completes any handshake).
    let log = lab.dir.join("iperf3-server.log");
    let server_cmd = {
        let mut c = lab.cmd(&r, "iperf3");
        c.args(["-s", "-B", dst, "--forceflush"]);
        c
    };
    lab.spawn("iperf3-server", server_cmd, Some(&log))?;
    wait_for("iperf3 to listen", Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|t| t.contains("Server listening"))
    })?;
    let mut ping = lab.cmd(&l, "ping");
    ping.args(["-c", "1", "-W", "1", "-n", dst]);
    wait_for(
        &format!("a first ping through {}", kind.label()),
        Duration::from_secs(20),
        || ping.output().ok().filter(|o| o.status.success()),
    )?;
    Ok(Bench {
        lab,
        client: l,
        server: r,
        dst,
        procs,
    })
}

/// Runs iperf3 against the server; its JSON report.
pub(crate) fn iperf(b: &Bench, secs: u64, extra: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = b
        .lab
        .cmd(&b.client, "iperf3")
        .args(["-c", b.dst, "-J", "--connect-timeout", "5000", "-t"])
        .arg(secs.to_string())
        .args(extra)
        .output()
        .context("running iperf3")?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 {extra:?} printed no JSON: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(e) = json["error"].as_str() {
        bail!("iperf3 {extra:?} through {}: {e}", b.dst);
    }
    Ok(json)
}

/// (Gbit/s received, bytes received) of a TCP test.
fn tcp(b: &Bench, secs: u64, streams: u32) -> anyhow::Result<(f64, f64)> {
    let j = iperf(b, secs, &["-P", &streams.to_string()])?;
    let bps = j["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON without end.sum_received.bits_per_second")?;
    let bytes = j["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    ensure!(bps > 0.0, "TCP with {streams} stream(s) moved nothing");
    Ok((bps / 1e9, bytes))
}

/// Packets per second received in a full-rate UDP test with `len`-byte payloads.
fn udp(b: &Bench, secs: u64, len: u32) -> anyhow::Result<f64> {
    let j = iperf(b, secs, &["-u", "-b", "0", "-l", &len.to_string()])?;
    let sum = &j["end"]["sum"];
    let (packets, lost, seconds) = (
        sum["packets"].as_f64().context("end.sum.packets")?,
        sum["lost_packets"].as_f64().unwrap_or(0.0),
        sum["seconds"].as_f64().context("end.sum.seconds")?,
    );
    let pps = (packets - lost).max(0.0) / seconds.max(1e-9);
    ensure!(pps > 0.0, "UDP with {len}-byte payloads: nothing arrived");
    Ok(pps)
}

/// Ping RTT p50 and p99 in µs over `count` pings 10 ms apart.
fn rtt(b: &Bench, count: u32) -> anyhow::Result<(f64, f64)> {
    let mut times = rtts(b, count)?;
    times.sort_by(f64::total_cmp);
    let pick = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    Ok((pick(0.5), pick(0.99)))
}

/// The RTTs in µs of `count` pings 10 ms apart (at least 90% answered).
pub(crate) fn rtts(b: &Bench, count: u32) -> anyhow::Result<Vec<f64>> {
    ping_times(&run(&mut ping(b, count))?, count)
}

/// The gap between two pings of one `ping` process.
pub(crate) const PING_INTERVAL: Duration = Duration::from_millis(10);

/// `ping` of `count` packets [`PING_INTERVAL`] apart from the client to the far end, not yet
/// run.
pub(crate) fn ping(b: &Bench, count: u32) -> Command {
    let mut cmd = b.lab.cmd(&b.client, "ping");
    cmd.args([
        "-c",
        &count.to_string(),
        "-i",
        &format!("{}", PING_INTERVAL.as_secs_f64()),
        "-n",
        b.dst,
    ]);
    cmd
}

/// The RTTs in µs a `ping` of `count` packets printed; an error unless at least 90% were
/// answered.
pub(crate) fn ping_times(out: &std::process::Output, count: u32) -> anyhow::Result<Vec<f64>> {
    let times: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .split("time=")
        .skip(1)
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map(|ms| ms * 1000.0)
        .collect();
    ensure!(
        times.len() as u32 >= count * 9 / 10,
        "only {} of {count} pings answered",
        times.len()
    );
    Ok(times)
}

pub(crate) fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

/// Receive-buffer drops so far in the namespace of iperf3's server, two ways: `namespace`, the
/// kernel's counters for every UDP socket there (`RcvbufErrors` of `/proc/<pid>/net/snmp` and
/// `Udp6RcvbufErrors` of `snmp6`), and `others`, the drop counts of the sockets open now but
/// iperf3's test sockets (port 5201), from `/proc/<pid>/net/udp{,6}`: the tunnel's own. Across
/// a test, the first delta less the second is what iperf3's test socket dropped for want of
/// room, exact whenever that socket was opened or closed (its count leaves with it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RcvbufDrops {
    namespace: u64,
    others: u64,
}

impl RcvbufDrops {
    /// Datagrams iperf3's test sockets dropped between `before` and `self`.
    pub(crate) fn server_since(&self, before: &Self) -> u64 {
        let namespace = self.namespace.saturating_sub(before.namespace);
        namespace.saturating_sub(self.others.saturating_sub(before.others))
    }
}

pub(crate) fn rcvbuf_drops(b: &Bench) -> anyhow::Result<RcvbufDrops> {
    let pid = b.lab.pid("iperf3-server").context("iperf3 server gone")?;
    let namespace = udp_rcvbuf_errors(pid)?;
    let mut others = 0;
    for table in ["udp", "udp6"] {
        let Some(text) = net_file(pid, table)? else {
            continue;
        };
        let sockets = udp_socket_drops(&text).with_context(|| format!("/proc/net/{table}"))?;
        // Port 5201: iperf3's test sockets.
        others += sockets
            .iter()
            .filter(|(port, _)| *port != 5201)
            .map(|(_, drops)| drops)
            .sum::<u64>();
    }
    Ok(RcvbufDrops { namespace, others })
}

/// User + system CPU seconds of the tunnel processes so far.
pub(crate) fn cpu_seconds(b: &Bench) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for name in &b.procs {
        let pid = b.lab.pid(name).context("tunnel process gone")?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command's closing parenthesis: utime is the 12th, stime the 13th.
        let rest = stat.rsplit_once(')').context("/proc stat format")?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let (u, s): (f64, f64) = (f[11].parse()?, f[12].parse()?);
        total += (u + s) / clock_ticks();
    }
    Ok(total)
}

/// What the tunnel processes' threads have run so far (`schedstat`): CPU time and the number
/// of times a thread was put on a CPU, which on an otherwise idle tunnel is its wake-ups.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Ran {
    /// CPU time, ns.
    pub(crate) ns: u64,
    /// Times a thread was put on a CPU.
    pub(crate) runs: u64,
}

impl Ran {
    /// What ran between `earlier` and `self`.
    pub(crate) fn since(self, earlier: Self) -> Self {
        Self {
            ns: self.ns.saturating_sub(earlier.ns),
            runs: self.runs.saturating_sub(earlier.runs),
        }
    }
}

/// Parses one thread's `schedstat` (`<run ns> <wait ns> <timeslices>`).
fn parse_schedstat(text: &str) -> Option<Ran> {
    let mut f = text.split_whitespace().map(str::parse::<u64>);
    let ns = f.next()?.ok()?;
    let _wait = f.next()?.ok()?;
    let runs = f.next()?.ok()?;
    Some(Ran { ns, runs })
}

/// What every thread of the tunnel processes has run so far.
pub(crate) fn ran(b: &Bench) -> anyhow::Result<Ran> {
    let mut total = Ran::default();
    for name in &b.procs {
        let pid = b.lab.pid(name).context("tunnel process gone")?;
        let tasks = format!("/proc/{pid}/task");
        for task in std::fs::read_dir(&tasks).with_context(|| format!("reading {tasks}"))? {
            let path = task?.path().join("schedstat");
            // A thread that ended since the listing took its time with it.
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let r = parse_schedstat(&text)
                .with_context(|| format!("{} holds {text:?}", path.display()))?;
            total.ns += r.ns;
            total.runs += r.runs;
        }
    }
    Ok(total)
}

/// A memory figure (`field` of `/proc/<pid>/status`, such as `VmRSS`) of each tunnel process, MB.
fn status_mb(b: &Bench, field: &str) -> anyhow::Result<Vec<f64>> {
    b.procs
        .iter()
        .map(|name| {
            let pid = b.lab.pid(name).context("tunnel process gone")?;
            let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
            let kb: f64 = status
                .lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .with_context(|| format!("no {field}"))?;
            Ok(kb / 1024.0)
        })
        .collect()
}

/// The current RSS (`VmRSS`) of each tunnel process, MB.
pub(crate) fn rss_now(b: &Bench) -> anyhow::Result<Vec<f64>> {
    status_mb(b, "VmRSS")
}

/// Starts iperf3 TCP with `streams` streams for `secs` seconds in the background, as lab
/// process `name`.
pub(crate) fn iperf_background(
    b: &mut Bench,
    name: &str,
    secs: u64,
    streams: u32,
) -> anyhow::Result<()> {
    let mut c = b.lab.cmd(&b.client, "iperf3");
    c.args([
        "-c",
        b.dst,
        "-t",
        &secs.to_string(),
        "-P",
        &streams.to_string(),
    ]);
    let log = b.lab.dir.join(format!("{name}.log"));
    b.lab.spawn(name, c, Some(&log))?;
    Ok(())
}

/// Waits (bounded) for lab process `name` to exit; its log.
pub(crate) fn finished_log(b: &mut Bench, name: &str) -> anyhow::Result<String> {
    wait_for(
        &format!("{name} to finish"),
        Duration::from_secs(30),
        || (!b.lab.running(name)).then_some(()),
    )?;
    Ok(std::fs::read_to_string(
        b.lab.dir.join(format!("{name}.log")),
    )?)
}

/// The larger peak RSS (`VmHWM`) of the tunnel processes, MB.
pub(crate) fn peak_rss(b: &Bench) -> anyhow::Result<f64> {
    Ok(status_mb(b, "VmHWM")?.into_iter().fold(0.0, f64::max))
}

/// Measures one path.
pub(crate) fn measure(args: &NetArgs, kind: &PathKind) -> anyhow::Result<Row> {
    eprintln!("== {}: setting up", kind.label());
    let b = setup(args, kind)?;
    let _ = &b.server;
    let (mut t1, mut t4, mut u64s, mut u1400, mut r50, mut r99, mut cpu) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for rep in 1..=args.reps {
        eprintln!("   {} run {rep}/{}", kind.label(), args.reps);
        let c0 = cpu_seconds(&b)?;
        let (gbps, bytes) = tcp(&b, args.secs, 1)?;
        let c1 = cpu_seconds(&b)?;
        t1.push(gbps);
        if !b.procs.is_empty() {
            cpu.push((c1 - c0) / (bytes / 1e9).max(1e-9));
        }
        t4.push(tcp(&b, args.secs, 4)?.0);
        u64s.push(udp(&b, args.secs, 64)?);
        u1400.push(udp(&b, args.secs, 1400)?);
        let (p50, p99) = rtt(&b, 200)?;
        r50.push(p50);
        r99.push(p99);
    }
    let rss = if b.procs.is_empty() {
        None
    } else {
        Some(peak_rss(&b)?)
    };
    let row = Row {
        label: kind.label(),
        tcp1: median(t1),
        tcp4: median(t4),
        udp64: median(u64s),
        udp1400: median(u1400),
        rtt50: median(r50),
        rtt99: median(r99),
        cpu_per_gb: (!cpu.is_empty()).then(|| median(cpu)),
        rss_mb: rss,
    };
    eprintln!(
        "   {}: TCP {:.2} Gbit/s (4 streams {:.2}), UDP64 {:.0} pps, RTT p50 {:.0} µs",
        row.label, row.tcp1, row.tcp4, row.udp64, row.rtt50
    );
    Ok(row)
}

/// The Markdown table of `rows`.
pub(crate) fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| path | TCP 1 stream (Gbit/s) | TCP 4 streams (Gbit/s) | UDP 64 B (kpps) | UDP 1400 B (kpps) | ping p50 (µs) | ping p99 (µs) | tunnel CPU (s/GB) | tunnel peak RSS (MB) |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let opt = |v: Option<f64>, prec: usize| {
            v.map_or_else(|| "n/a (no process)".to_owned(), |v| format!("{v:.prec$}"))
        };
        let _ = writeln!(
            s,
            "| {} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} |",
            r.label,
            r.tcp1,
            r.tcp4,
            r.udp64 / 1e3,
            r.udp1400 / 1e3,
            r.rtt50,
            r.rtt99,
            opt(r.cpu_per_gb, 2),
            opt(r.rss_mb, 1),
        );
    }
    s
}

/// The ratios that matter, and the speed issue's targets against them.
pub(crate) fn ratios(rows: &[Row]) -> String {
    let find = |p: &str| rows.iter().find(|r| r.label == p);
    let best_bt = rows
        .iter()
        .filter(|r| r.label.starts_with("boringtun-cli"))
        .max_by(|a, b| a.tcp1.total_cmp(&b.tcp1));
    let mut s = String::new();
    let mut line =
        |what: &str, a: Option<&Row>, b: Option<&Row>, f: fn(&Row) -> f64, target: &str| {
            if let (Some(a), Some(b)) = (a, b) {
                let _ = writeln!(
                    s,
                    "| {what} | {} / {} | {:.2}× | {target} |",
                    a.label,
                    b.label,
                    f(a) / f(b)
                );
            }
        };
    let enc = find("weft encrypted, workers=auto").or_else(|| find("weft encrypted"));
    let one = find("weft encrypted, workers=1");
    line(
        "TCP 1 stream",
        enc,
        one,
        |r| r.tcp1,
        "≥ 1× (auto not below 1)",
    );
    line(
        "TCP 4 streams",
        enc,
        one,
        |r| r.tcp4,
        "≥ 1× (auto not below 1)",
    );
    line("TCP 1 stream", enc, best_bt, |r| r.tcp1, "≥ 5×");
    line(
        "TCP 1 stream",
        enc,
        find("wireguard-go"),
        |r| r.tcp1,
        "≥ 10×",
    );
    line(
        "TCP 1 stream",
        find("weft plaintext"),
        find("plain veth"),
        |r| r.tcp1,
        "≥ 0.4×",
    );
    for other in rows
        .iter()
        .filter(|r| r.label.starts_with("wireguard-go ") && r.label.contains('('))
    {
        line("TCP 1 stream", enc, Some(other), |r| r.tcp1, "(for scale)");
        line("TCP 4 streams", enc, Some(other), |r| r.tcp4, "(for scale)");
    }
    line("UDP 64 B pps", enc, best_bt, |r| r.udp64, "≥ 2×");
    line(
        "ping p50 (lower is better)",
        enc,
        best_bt,
        |r| r.rtt50,
        "≤ 1×",
    );
    line(
        "ping p99 (lower is better)",
        enc,
        best_bt,
        |r| r.rtt99,
        "≤ 1×",
    );
    let mut out =
        String::from("| metric | ratio of | value | speed-issue target |\n|---|---|---:|---|\n");
    out.push_str(&s);
    out
}

/// A short description of this machine: cores, CPU model, kernel.
pub(crate) fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |k| k.trim().to_owned());
    format!("{cores} cores, {model}, Linux {kernel}")
}

/// Finds boringtun-cli in `tools/bin`, installing it there with cargo when missing.
pub(crate) fn boringtun(tools: &Path) -> anyhow::Result<PathBuf> {
    let bin = tools.join("bin").join("boringtun-cli");
    if bin.exists() {
        return Ok(bin);
    }
    eprintln!(
        "boringtun-cli not found: installing it into {} (cargo install boringtun-cli)...",
        tools.display()
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "install",
            "boringtun-cli",
            "--version",
            "0.7.1",
            "--locked",
            "--root",
        ])
        .arg(tools)
        .status()
        .context("running cargo install boringtun-cli")?;
    ensure!(
        status.success() && bin.exists(),
        "cargo install boringtun-cli failed"
    );
    Ok(bin)
}

/// Checks that the tools every path needs are installed; names the Debian package otherwise.
pub(crate) fn check_tools(paths: &[PathKind]) -> anyhow::Result<()> {
    let mut need = vec![
        ("iperf3", "iperf3"),
        ("ping", "iputils-ping"),
        ("ip", "iproute2"),
    ];
    if paths
        .iter()
        .any(|p| matches!(p, PathKind::WireguardGo(_) | PathKind::Boringtun(_)))
    {
        need.push(("wg", "wireguard-tools"));
    }
    if paths.contains(&PathKind::WireguardGo(None)) {
        need.push(("wireguard-go", "wireguard-go"));
    }
    for (program, package) in need {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).exists()));
        ensure!(
            found,
            "`{program}` is missing: apt-get install {package} (the comparison cannot run without it)"
        );
    }
    Ok(())
}

/// A wireguard-go binary given by path: it must run and say its version (`--version`), which
/// labels its row.
pub(crate) fn wireguard_go_at(path: &Path) -> anyhow::Result<PathKind> {
    let out = Command::new(path)
        .arg("--version")
        .output()
        .with_context(|| format!("--wireguard-go {}: cannot run it", path.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .split_whitespace()
        .find(|w| w.starts_with('v') && w.chars().nth(1).is_some_and(|c| c.is_ascii_digit()))
        .map(str::to_owned);
    match version {
        Some(v) if out.status.success() && text.contains("wireguard-go") => {
            let path = path
                .canonicalize()
                .with_context(|| format!("--wireguard-go {}", path.display()))?;
            Ok(PathKind::WireguardGo(Some((path, v))))
        }
        _ => anyhow::bail!(
            "--wireguard-go {}: not a wireguard-go binary (`--version` printed {:?})",
            path.display(),
            text.trim()
        ),
    }
}

/// The iperf3 version line, for the report.
pub(crate) fn iperf_version() -> String {
    Command::new("iperf3")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_threads_schedstat_gives_its_run_time_and_times_run() {
        assert_eq!(
            parse_schedstat("1234 99 7\n"),
            Some(Ran { ns: 1234, runs: 7 })
        );
        assert_eq!(parse_schedstat("1234 99"), None);
        assert_eq!(parse_schedstat("x 1 2"), None);
        let later = Ran { ns: 10, runs: 3 };
        assert_eq!(later.since(Ran { ns: 4, runs: 1 }), Ran { ns: 6, runs: 2 });
    }

    #[test]
    fn a_wireguard_go_path_that_is_not_one_is_refused_by_name() {
        let e = wireguard_go_at(Path::new("/nonexistent/wireguard-go"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/nonexistent/wireguard-go") && e.contains("cannot run"),
            "{e}"
        );
        // Runs, but is not wireguard-go.
        let e = format!("{:#}", wireguard_go_at(Path::new("/bin/true")).unwrap_err());
        assert!(e.contains("not a wireguard-go binary"), "{e}");
    }

    /// The server's drops are the namespace's less the tunnel sockets' own, whether or not the
    /// test socket (and its count) is still there when the second reading is taken.
    #[test]
    fn the_server_drops_are_the_namespace_drops_less_the_tunnel_sockets() {
        let before = RcvbufDrops {
            namespace: 100,
            others: 40,
        };
        let after = RcvbufDrops {
            namespace: 175,
            others: 50,
        };
        assert_eq!(after.server_since(&before), 65);
        // Counters that went backwards (a namespace recreated) give 0, not a wrap.
        assert_eq!(before.server_since(&after), 0);
    }

    /// A `ping`'s times are read in µs; fewer than 9 in 10 answered is an error naming the count.
    #[test]
    fn ping_times_are_read_in_microseconds_and_too_few_answers_are_refused() {
        use std::os::unix::process::ExitStatusExt as _;
        let out = |text: &str| std::process::Output {
            status: std::process::ExitStatus::from_raw(0),
            stdout: text.as_bytes().to_vec(),
            stderr: Vec::new(),
        };
        let line = |seq: u32, ms: &str| {
            format!("64 bytes from 100.64.1.2: icmp_seq={seq} ttl=64 time={ms} ms\n")
        };
        let text: String = (1..=10).map(|i| line(i, "0.215")).collect();
        let times = ping_times(&out(&text), 10).expect("ten answers");
        assert_eq!(times.len(), 10);
        assert!((times[0] - 215.0).abs() < 1e-9, "{times:?}");
        let nine: String = (1..=9).map(|i| line(i, "1.5")).collect();
        assert_eq!(ping_times(&out(&nine), 10).expect("nine of ten").len(), 9);
        let e = ping_times(&out(&nine), 12).unwrap_err().to_string();
        assert!(e.contains("only 9 of 12 pings answered"), "{e}");
    }
}
