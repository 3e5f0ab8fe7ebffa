//! The data path's batching and offloads keep payloads byte-exact: TCP in both directions over
//! IPv4 and IPv6 and a UDP flow at once (mixed flows through one batch), while 1% of the underlay
//! datagrams into b are dropped, so TCP retransmits and segments arrive out of order around each
//! gap. With every offload (`auto`: TUN segments split and coalesced, UDP GSO and GRO, batched
//! receive), once with a worker per core (`router.workers: auto`) and once with one; and with
//! `off`. And a TCP flow of small segments, whose 64 KB writes split into more packets than a
//! TUN read is handed slots for unless the device caps its GSO segments.

use std::net::{SocketAddr, UdpSocket};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use weft::demo::lab::{Lab, tcp_transfer_mss, wait_for};
use weft_tests::{Pair, Stream, tcp_transfer};

const DATAGRAMS: u32 = 20_000;

/// The bytes of datagram `seq`: its number, then a stream seeded by it; lengths cycle 12..1400.
fn datagram(seq: u32) -> Vec<u8> {
    let len = 12 + (seq as usize * 37) % 1389;
    // 12..=1400 bytes, every length in turn.
    let mut d = vec![0; len];
    d[..4].copy_from_slice(&seq.to_be_bytes());
    Stream::new(u64::from(seq) + 1).fill(&mut d[4..]);
    d
}

/// Sends [`DATAGRAMS`] datagrams from `from_ns` to `to` and checks every one that arrives in
/// `to_ns` byte for byte; returns how many arrived.
fn udp_flow(lab: &Lab, (from_ns, to_ns): (&str, &str), to: SocketAddr) -> anyhow::Result<u32> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server: JoinHandle<anyhow::Result<u32>> = lab.in_ns(to_ns, move || {
        let sock = UdpSocket::bind(to).with_context(|| format!("binding {to}"))?;
        sock.set_read_timeout(Some(Duration::from_secs(3)))?;
        ready_tx.send(()).ok();
        let mut buf = vec![0u8; 2048];
        let mut ok = 0u32;
        // Bounded: one datagram per pass, and a 3 s silence ends it.
        for _ in 0..DATAGRAMS {
            let Ok(n) = sock.recv(&mut buf) else { break };
            let seq = u32::from_be_bytes(buf[..4].try_into()?);
            ensure!(seq < DATAGRAMS, "datagram with sequence {seq}");
            ensure!(
                buf[..n] == datagram(seq)[..],
                "datagram {seq}: {n} bytes that differ from the {} sent",
                datagram(seq).len()
            );
            ok += 1;
        }
        Ok(ok)
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .context("the UDP receiver did not start")?;
    let client = lab.in_ns(from_ns, move || {
        let sock = UdpSocket::bind(match to {
            SocketAddr::V4(_) => "0.0.0.0:0",
            SocketAddr::V6(_) => "[::]:0",
        })?;
        for seq in 0..DATAGRAMS {
            sock.send_to(&datagram(seq), to)?;
            // Paced (100 datagrams a millisecond at most), so that the receiver's socket, not
            // the tunnel, is not what loses them.
            if seq % 100 == 99 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    });
    client
        .join()
        .map_err(|_| anyhow::anyhow!("UDP sender panicked"))??;
    server
        .join()
        .map_err(|_| anyhow::anyhow!("UDP receiver panicked"))?
}

/// TCP segments the namespace's stack retransmitted (`/proc/net/snmp`).
fn retransmitted(lab: &Lab, ns: &str) -> anyhow::Result<u64> {
    let out = weft::demo::lab::run(lab.cmd(ns, "cat").arg("/proc/net/snmp"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (
        tcp.next().context("no Tcp header")?,
        tcp.next().context("no Tcp values")?,
    );
    let i = names
        .split_whitespace()
        .position(|n| n == "RetransSegs")
        .context("no RetransSegs")?;
    Ok(values
        .split_whitespace()
        .nth(i)
        .context("short Tcp line")?
        .parse()?)
}

fn mixed_flows_arrive_byte_exact(tag: &str, offload: &str, workers: &str) -> anyhow::Result<()> {
    let p = Pair::start_dual(tag, offload, workers)?;
    let (a, b) = (p.a.ns.clone(), p.b.ns.clone());
    p.ping(&a, "100.64.2.1")?;
    p.ping(&a, "fd00:64:0:2::1")?;
    p.ping(&b, "100.64.1.1")?;

    // The daemon says which mechanisms it uses.
    let log = std::fs::read_to_string(&p.a.log)?;
    let line = log
        .lines()
        .find(|l| l.contains("data path offloads"))
        .context("no 'data path offloads' line in a's log")?;
    if offload == "auto" {
        ensure!(
            line.contains("tun_offload=true") && line.contains("udp_gro=true"),
            "offloads not in use with auto: {line}"
        );
    } else {
        ensure!(
            line.contains("tun_offload=false")
                && line.contains("udp_gro=false")
                && line.contains("udp_gso_segments=1"),
            "offloads in use with off: {line}"
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let expect = if workers == "auto" {
        cores.min(64).to_string()
    } else {
        workers.to_owned()
    };
    ensure!(
        line.contains(&format!("workers={expect} "))
            || line.ends_with(&format!("workers={expect}")),
        "expected {expect} workers (router.workers: {workers}, {cores} cores): {line}"
    );

    // Lose 1% of what reaches b's WireGuard port.
    for rule in [
        "add table inet weftloss",
        "add chain inet weftloss input { type filter hook input priority -10; }",
        "add rule inet weftloss input udp dport 51820 numgen random mod 100 lt 1 counter drop",
    ] {
        weft::demo::lab::run(p.lab.cmd(&b, "nft").arg(rule))?;
    }
    let retrans_before = retransmitted(&p.lab, &a)?;

    let lab = &p.lab;
    let (v4, v6, back, udp) = std::thread::scope(|s| {
        let v4 = s.spawn(|| tcp_transfer(lab, (&a, &b), "100.64.2.1:5001".parse()?, 64 << 20, 1));
        let v6 =
            s.spawn(|| tcp_transfer(lab, (&a, &b), "[fd00:64:0:2::1]:5002".parse()?, 64 << 20, 2));
        let back = s.spawn(|| tcp_transfer(lab, (&b, &a), "100.64.1.1:5003".parse()?, 32 << 20, 3));
        let udp = s.spawn(|| udp_flow(lab, (&a, &b), "100.64.2.1:5004".parse()?));
        (v4.join(), v6.join(), back.join(), udp.join())
    });
    let join = |r: std::thread::Result<anyhow::Result<Duration>>, what: &str| {
        r.map_err(|_| anyhow::anyhow!("{what} panicked"))?
            .with_context(|| what.to_owned())
    };
    let t4 = join(v4, "64 MB a -> b over IPv4")?;
    let t6 = join(v6, "64 MB a -> b over IPv6")?;
    let tb = join(back, "32 MB b -> a over IPv4")?;
    let arrived = udp
        .map_err(|_| anyhow::anyhow!("the UDP flow panicked"))?
        .context("UDP a -> b")?;
    let retrans = retransmitted(&p.lab, &a)? - retrans_before;
    let dropped = weft::demo::lab::run(
        p.lab
            .cmd(&b, "nft")
            .args(["list", "table", "inet", "weftloss"]),
    )?;
    let dropped = String::from_utf8_lossy(&dropped.stdout).into_owned();
    eprintln!(
        "offload {offload}: IPv4 64 MB in {t4:?}, IPv6 64 MB in {t6:?}, back 32 MB in {tb:?}; \
         UDP {arrived}/{DATAGRAMS} intact; {retrans} TCP segments retransmitted; nft: {}",
        dropped
            .lines()
            .find(|l| l.contains("counter"))
            .unwrap_or("")
            .trim()
    );
    ensure!(
        retrans > 0,
        "no TCP segment was retransmitted: the loss did not bite"
    );
    ensure!(
        arrived >= DATAGRAMS / 5,
        "only {arrived} of {DATAGRAMS} datagrams arrived"
    );
    wait_for("a to stay up", Duration::from_secs(5), || {
        p.lab.status(&p.bin, &p.a).ok()
    })?;
    Ok(())
}

#[test]
fn with_every_offload_and_a_worker_per_core_mixed_flows_arrive_byte_exact_through_loss()
-> anyhow::Result<()> {
    mixed_flows_arrive_byte_exact("ofa", "auto", "auto")
}

#[test]
fn with_every_offload_and_one_worker_mixed_flows_arrive_byte_exact_through_loss()
-> anyhow::Result<()> {
    mixed_flows_arrive_byte_exact("of1", "auto", "1")
}

#[test]
fn with_offload_off_mixed_flows_arrive_byte_exact_through_loss() -> anyhow::Result<()> {
    mixed_flows_arrive_byte_exact("ofo", "off", "auto")
}

/// A receiver advertising a 200-byte MSS makes the sender's stack hand weft0 64 KB segments of
/// up to 327 packets each, more than the slots a TUN read is handed: unless the device caps how
/// many segments one write carries, such a read cannot be split and is dropped whole (counted
/// as `bad_inner_packet`). Every byte arrives, and no read is dropped.
#[test]
fn a_flow_of_small_segments_loses_no_tun_read_to_the_split() -> anyhow::Result<()> {
    let p = Pair::start_dual("ofm", "auto", "1")?;
    let (a, b) = (p.a.ns.clone(), p.b.ns.clone());
    p.ping(&a, "100.64.2.1")?;
    // Reads are split only with TUN offloads: without them the test would show nothing.
    let log = std::fs::read_to_string(&p.a.log)?;
    ensure!(
        log.lines()
            .any(|l| l.contains("data path offloads") && l.contains("tun_offload=true")),
        "TUN offloads are not in use on a"
    );
    let cap = p.weft0(&a, "-d")?["gso_max_segs"].as_u64();
    ensure!(
        cap == Some(128),
        "weft0's gso_max_segs on a is {cap:?}, not 128"
    );
    let bad = |p: &Pair| -> anyhow::Result<u64> {
        let st = p.lab.status(&p.bin, &p.a)?;
        // A reason is listed once it counted something.
        let drops = st["drops"].as_object().context("no drops in a's status")?;
        Ok(drops
            .get("bad_inner_packet")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0))
    };
    let before = bad(&p)?;
    let took = tcp_transfer_mss(
        &p.lab,
        (&a, &b),
        "100.64.2.1:5005".parse()?,
        16 << 20,
        5,
        Some(200),
    )
    .context("16 MB a -> b in 200-byte segments")?;
    let dropped = bad(&p)?
        .checked_sub(before)
        .context("a's bad_inner_packet count went back (its router made again mid-run?)")?;
    eprintln!("16 MB in 200-byte segments in {took:?}; {dropped} TUN reads dropped unsplit");
    ensure!(
        dropped == 0,
        "{dropped} TUN reads on a could not be split into the slots a read is handed"
    );
    Ok(())
}
