//! Several data-path workers (`router.workers`) keep each flow in order: the multi-queue TUN
//! device hands a flow to one worker, which encrypts and sends it in order, while other flows to
//! the same peer are encrypted by the other worker (the two take turns at the peer's send turn,
//! so its WireGuard counters leave in order).

use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use weft::demo::lab::wait_for;
use weft_tests::Pair;
use weft_tests::netstat::{udp_rcvbuf_errors, udp_socket_drops};

/// Concurrent one-way UDP flows, each from its own source port.
const FLOWS: u16 = 16;
/// Datagrams per flow.
const PER_FLOW: u32 = 3000;
/// The most datagrams one count of a full socket buffer can stand for: the kernel counts a drop
/// per buffer it refuses, and UDP GRO hands weft's underlay socket up to 64 datagrams in one.
const MAX_COALESCED: u8 = 64;
/// The first flow's port at b; flow i goes to `PORT + i`.
const PORT: u16 = 6100;

/// Receives flow `i` at b until [`PER_FLOW`] datagrams arrive, or the flow has been silent for
/// 3 s since the sender finished (`sent`), or 20 silences of 3 s passed; returns (arrived,
/// datagrams that came after a later one of the same flow, datagrams b's kernel dropped at this
/// socket's full buffer). A silence while the sender still sends is waited out: on
/// a starved machine the sender or the tunnel can stall for seconds, and quitting then would
/// leave datagrams that later arrive uncounted.
fn receive(sock: &UdpSocket, sent: &AtomicBool) -> anyhow::Result<(u32, u32, u64)> {
    let mut buf = [0u8; 2048];
    let (mut arrived, mut late, mut last) = (0, 0, None::<u32>);
    // Bounded: each pass takes a datagram or is one of at most 20 silences.
    for _ in 0..PER_FLOW + 20 {
        if arrived == PER_FLOW {
            break;
        }
        let sender_done = sent.load(Ordering::Acquire);
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if sender_done {
                    break;
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        ensure!(n >= 4, "a datagram of {n} bytes");
        let seq = u32::from_be_bytes(buf[..4].try_into()?);
        if last.is_some_and(|l| seq <= l) {
            late += 1;
        } else {
            last = Some(seq);
        }
        arrived += 1;
    }
    // This thread is in b's namespace: its own view of the UDP table is b's.
    let port = sock.local_addr()?.port();
    let table = std::fs::read_to_string("/proc/thread-self/net/udp")?;
    let drops = udp_socket_drops(&table)?
        .into_iter()
        .find(|(p, _)| *p == port)
        .with_context(|| format!("no socket on port {port} in b's UDP table"))?
        .1;
    Ok((arrived, late, drops))
}

/// A receiver's socket for flow port `port` at b, with a receive buffer of 2 MB (forced past
/// `net.core.rmem_max`): the test's own receivers, not the tunnel, are then the last to fall
/// behind when the machine is busy.
fn receiver(port: u16) -> anyhow::Result<UdpSocket> {
    use nix::sys::socket::{setsockopt, sockopt};
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    setsockopt(&s, sockopt::RcvBufForce, &(2 << 20))?;
    s.bind(&SocketAddr::from(([100, 64, 2, 1], port)).into())?;
    let s = UdpSocket::from(s);
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    Ok(s)
}

/// The drops node b's weft counts for its peer `peer` (by reason), from its status.
fn peer_drops(p: &Pair, peer: &str) -> anyhow::Result<serde_json::Value> {
    let status = p.lab.status(&p.bin, &p.b)?;
    let peers = status["peers"]
        .as_array()
        .context("no peers in b's status")?;
    let entry = peers
        .iter()
        .find(|e| e["name"] == peer)
        .with_context(|| format!("no peer {peer} in b's status"))?;
    Ok(entry["drops"].clone())
}

/// Packets worker `w` of the node in `ns` read from its TUN queue.
fn tun_packets(p: &Pair, ns: &str, w: &str) -> anyhow::Result<f64> {
    weft_tests::metric(
        &p.lab,
        ns,
        "weft_router_worker_packets_total",
        &[("worker", w), ("from", "tun")],
    )
}

/// Send turns the node in `ns` took over from a worker that held one past the router's
/// `HOLD_LIMIT` (a stalled worker).
fn takeovers(p: &Pair, ns: &str) -> anyhow::Result<f64> {
    weft_tests::metric(&p.lab, ns, "weft_router_send_turn_takeovers_total", &[])
}

/// `drops` (a peer's drops by reason, from the status) without the reason `reason`, and that
/// reason's count.
fn split_reason(drops: &serde_json::Value, reason: &str) -> (serde_json::Value, u64) {
    let mut rest = drops.clone();
    let n = rest
        .as_object_mut()
        .and_then(|m| m.remove(reason))
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    (rest, n)
}

/// Packets the kernel of the node in `ns` dropped at `weft0` on the way in, before any worker
/// read them (`tx_dropped`: a TUN queue was full).
fn tun_dropped(p: &Pair, ns: &str) -> anyhow::Result<u64> {
    let link = p.weft0(ns, "-s")?;
    link["stats64"]["tx"]["dropped"]
        .as_u64()
        .with_context(|| format!("no stats64.tx.dropped for weft0 in {link}"))
}

/// Each data-path worker runs on a thread named for it, so that `top -H`, `ps -L` and `perf`
/// tell the workers apart (and from the daemon's other threads).
#[test]
fn each_worker_runs_on_a_thread_named_for_it() -> anyhow::Result<()> {
    let p = Pair::start_dual("wkn", "auto", "2")?;
    p.ping(&p.a.ns, "100.64.2.1")?;
    // Polled: a worker names its thread when it starts.
    let mut threads = Vec::new();
    let named = wait_for(
        "b's workers to name their threads",
        Duration::from_secs(10),
        || {
            threads = thread_names(&p, "b").ok()?;
            ["weft-worker-0", "weft-worker-1"]
                .iter()
                .all(|w| threads.iter().any(|t| t == w))
                .then_some(())
        },
    );
    named.with_context(|| format!("b's threads: {threads:?}"))?;
    Ok(())
}

/// The names of daemon `name`'s threads.
fn thread_names(p: &Pair, name: &str) -> anyhow::Result<Vec<String>> {
    let pid = p
        .lab
        .pid(name)
        .with_context(|| format!("no daemon {name}"))?;
    let mut names = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        // A thread that ended since the listing has no name to read.
        if let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) {
            names.push(comm.trim_end().to_owned());
        }
    }
    Ok(names)
}

#[test]
fn with_two_workers_every_flow_arrives_in_order_while_both_encrypt_for_one_peer()
-> anyhow::Result<()> {
    let p = Pair::start_dual("wko", "auto", "2")?;
    let (a, b) = (p.a.ns.clone(), p.b.ns.clone());
    p.ping(&a, "100.64.2.1")?;
    let before = [tun_packets(&p, &a, "0")?, tun_packets(&p, &a, "1")?];
    let dropped_before = tun_dropped(&p, &a)?;
    let b_pid = p.lab.pid("b").context("no daemon b")?;
    let overflowed_before = udp_rcvbuf_errors(b_pid)?;
    let b_drops_before = peer_drops(&p, "a")?;
    let takeovers_before = takeovers(&p, &a)?;
    let sent_all = Arc::new(AtomicBool::new(false));

    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let done = Arc::clone(&sent_all);
    let receivers = p.lab.in_ns(&b, move || {
        let socks = (0..FLOWS)
            .map(|i| receiver(PORT + i))
            .collect::<anyhow::Result<Vec<_>>>()?;
        ready_tx.send(()).ok();
        std::thread::scope(|sc| {
            let handles: Vec<_> = socks
                .iter()
                .map(|s| sc.spawn(|| receive(s, &done)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("a receiver panicked"))?
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .context("the receivers did not start")?;
    let sender = p.lab.in_ns(&a, move || {
        let socks = (0..FLOWS)
            .map(|_| Ok(UdpSocket::bind("0.0.0.0:0")?))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut payload = [0u8; 600];
        for seq in 0..PER_FLOW {
            payload[..4].copy_from_slice(&seq.to_be_bytes());
            for (i, s) in (0u16..).zip(&socks) {
                let to = SocketAddr::from(([100, 64, 2, 1], PORT + i));
                s.send_to(&payload, to)?;
            }
            // Paced (about 16 datagrams per 100 µs), so that no socket buffer is what drops.
            if seq % 8 == 7 {
                std::thread::sleep(Duration::from_micros(500));
            }
        }
        Ok(())
    });
    let sending = sender
        .join()
        .map_err(|_| anyhow::anyhow!("the sender panicked"));
    sent_all.store(true, Ordering::Release);
    sending??;
    let flows = receivers
        .join()
        .map_err(|_| anyhow::anyhow!("the receivers panicked"))??;

    let total: u32 = flows.iter().map(|f| f.0).sum();
    let late: u32 = flows.iter().map(|f| f.1).sum();
    let at_receivers: u64 = flows.iter().map(|f| f.2).sum();
    let sent = u32::from(FLOWS) * PER_FLOW;
    // Both workers of a read the flows from their queues: the counters are scraped until they
    // show the whole run (they reach /metrics on the next status request).
    let mut shares = [0.0; 2];
    wait_for(
        "a's workers to count the flows",
        Duration::from_secs(5),
        || {
            shares = [
                tun_packets(&p, &a, "0").ok()? - before[0],
                tun_packets(&p, &a, "1").ok()? - before[1],
            ];
            (shares[0] + shares[1] >= f64::from(total)).then_some(())
        },
    )?;
    let dropped = tun_dropped(&p, &a)?
        .checked_sub(dropped_before)
        .context("weft0's drop counter on a went back: the device was made again mid-run")?;
    let overflowed = udp_rcvbuf_errors(b_pid)?
        .checked_sub(overflowed_before)
        .context("b's UDP RcvbufErrors went back")?;
    // What b's kernel refused at weft's own sockets: the rest of the count.
    let at_weft = overflowed.saturating_sub(at_receivers);
    eprintln!(
        "{FLOWS} flows x {PER_FLOW}: {total}/{sent} arrived, {late} out of order, {dropped} \
         dropped by a's kernel at full TUN queues, {at_receivers} by b's at the receivers' full \
         buffers, {at_weft} full buffers of weft's at b; a's workers read {} and {} packets \
         from their TUN queues",
        shares[0], shares[1]
    );
    ensure!(
        late == 0,
        "{late} datagrams arrived after a later one of their flow"
    );
    // The sender outruns the workers of a debug build on a busy machine: the kernel then drops
    // at a's full TUN queues, before weft sees the datagrams, and counts them. On a starved
    // machine b's kernel may also drop at a receiver's full buffer (counted per datagram) or at
    // weft's (counted once per buffer refused: one GRO buffer holds up to 64 datagrams). And a
    // worker of a stalled past the router's HOLD_LIMIT has its send turn taken over (counted at
    // a): what it encrypted before the stall may then reach b behind more than the replay window
    // of later counters, and b drops it as replays (counted at b). That is the send turns'
    // designed bound on a stall, and only ever follows a takeover. Every other datagram arrived:
    // the tunnel itself lost none, and b's weft dropped none of a's for any other reason.
    let b_drops = peer_drops(&p, "a")?;
    let (b_other, replays_after) = split_reason(&b_drops, "replay");
    let (b_other_before, replays_before) = split_reason(&b_drops_before, "replay");
    let replayed = replays_after.saturating_sub(replays_before);
    let took_over = takeovers(&p, &a)? - takeovers_before;
    eprintln!("{took_over} send turns taken over at a; b's weft dropped {replayed} as replays");
    let lost = i64::from(sent)
        - i64::from(total)
        - i64::try_from(dropped)?
        - i64::try_from(at_receivers)?
        - i64::try_from(replayed)?;
    ensure!(
        (0..=i64::try_from(at_weft)? * i64::from(MAX_COALESCED)).contains(&lost),
        "{total} of {sent} datagrams arrived, a's kernel dropped {dropped} at its TUN queues, \
         b's {at_receivers} at the receivers and b's weft {replayed} as replays: {lost} were \
         lost in between, where b's kernel refused {at_weft} buffers at weft's sockets (b's \
         drops for a: {b_drops}; send turns taken over at a: {took_over}; a's status drops: {}; \
         b's: {})",
        p.lab.status(&p.bin, &p.a)?["drops"],
        p.lab.status(&p.bin, &p.b)?["drops"]
    );
    // A worker holds a peer's turn for one TUN batch at most: a takeover strands no more.
    let per_takeover = weft_router::driver::SLOTS as f64;
    ensure!(
        replayed as f64 <= took_over * per_takeover,
        "b's weft dropped {replayed} of a's datagrams as replays, more than the {took_over} send \
         turns taken over at a can account for ({per_takeover} each): the send turns let a's \
         counters out of order"
    );
    ensure!(
        b_other == b_other_before,
        "b's weft dropped datagrams from a: {b_drops_before} before, {b_drops} after"
    );
    ensure!(
        total >= sent / 2,
        "only {total} of {sent} datagrams arrived ({dropped} dropped at a's TUN queues)"
    );
    for (w, share) in shares.iter().enumerate() {
        ensure!(
            *share >= f64::from(sent) / 10.0,
            "a's worker {w} read only {share} of {sent} packets: the flows did not spread"
        );
    }
    Ok(())
}

/// The workers' `SO_REUSEPORT` group takes in any socket of the same user with the option set:
/// a port another socket already holds (with the option or without) is refused and named,
/// rather than shared with it; a free port is bound by every worker.
#[test]
fn a_port_another_socket_holds_is_refused_rather_than_shared_by_the_workers() -> anyhow::Result<()>
{
    use socket2::{Domain, Protocol, Socket, Type};
    use weft_config::Offload;
    use weft_router::driver::bind_udp_workers;

    let mut lab = weft::demo::lab::Lab::new("wkr")?;
    let ns = lab.add_ns("n")?;
    lab.in_ns(&ns, || {
        const HELD: u16 = 51820;
        const FREE: u16 = 51821;
        let other = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
        other.set_only_v6(false)?;
        other.set_reuse_port(true)?;
        other.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, HELD)).into())?;
        let offload = Offload::default();
        let err = bind_udp_workers(HELD, &offload, 2)
            .err()
            .context("two workers joined a port another socket holds")?;
        ensure!(err.kind() == ErrorKind::AddrInUse, "{err}");
        ensure!(err.to_string().contains("UDP port 51820"), "{err}");
        let all = bind_udp_workers(FREE, &offload, 2)?;
        ensure!(all.len() == 2, "{} sockets", all.len());
        for s in &all {
            ensure!(s.local_addr()?.port() == FREE, "{:?}", s.local_addr());
        }
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the bind thread panicked"))?
}
