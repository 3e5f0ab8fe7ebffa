//! Nodes behind NAT (issue 16), in the NAT lab of `weft_tests::natlab`: real daemons, NAT
//! routers built from nftables masquerade between the sites' LANs and the internet. Run as
//! root.

use std::time::Duration;

use anyhow::Context as _;
use weft::demo::lab::wait_for;
use weft_tests::meshlab::MeshLab;
use weft_tests::natlab::{self, Nat};

/// How late a relay's counters can reach `/metrics`: the service publishes them every second,
/// and the endpoint caches its text for a second; with a margin.
const METRICS_LAG: Duration = Duration::from_secs(3);

/// Node `a`'s status entry for peer `b`, once it is up with an endpoint on `ip`.
fn up_at(
    m: &MeshLab,
    a: &str,
    b: &str,
    ip: &str,
    within: Duration,
) -> anyhow::Result<serde_json::Value> {
    wait_for(&format!("{a} to reach {b} at {ip}"), within, || {
        m.peer(a, b).filter(|p| {
            p["state"] == "up"
                && p["endpoint"]
                    .as_str()
                    .is_some_and(|e| e.starts_with(&format!("{ip}:")))
        })
    })
    .with_context(|| format!("{a}'s view of {b}: {:?}", m.peer(a, b)))
}

/// The value of `metric` with label `node="{node}"` in what `at` serves on /metrics.
fn metric_value(m: &MeshLab, at: &str, metric: &str, node: &str) -> Option<f64> {
    weft_tests::metric(&m.lab, &m.daemon(at).ns, metric, &[("node", node)]).ok()
}

/// The relay `a` reaches `b` through, once it is up through one (within 60 s: the direct
/// candidates fail first).
fn relayed(m: &MeshLab, a: &str, b: &str) -> anyhow::Result<String> {
    wait_for(
        &format!("{a} to reach {b} through a relay"),
        Duration::from_secs(60),
        || {
            let p = m.peer(a, b)?;
            let via = p["endpoint_reason"]
                .as_str()?
                .strip_prefix("relayed via ")?;
            (p["state"] == "up").then(|| via.to_owned())
        },
    )
    .with_context(|| format!("{a}'s view of {b}: {:?}", m.peer(a, b)))
}

/// Pings `to`'s overlay address from `from` until one answers, within `within`.
fn ping_within(m: &MeshLab, from: &str, to: &str, within: Duration) -> anyhow::Result<()> {
    let addr = m.overlay(to)?.into_iter().next().context("no block")?;
    let mut cmd = m.lab.cmd(&m.daemon(from).ns, "ping");
    cmd.args(["-c", "1", "-W", "1", "-n", "-q", &addr]);
    wait_for(&format!("{from} to ping {to} at {addr}"), within, || {
        cmd.output().ok().filter(|o| o.status.success())
    })?;
    Ok(())
}

#[test]
fn a_node_behind_nat_and_a_public_node_reach_each_other_both_ways_and_after_the_mapping_is_flushed()
-> anyhow::Result<()> {
    let mut m = natlab::start("nat1")?;
    natlab::add_public(&mut m, "p", 1, "cloud", None)?;
    let router = natlab::add_site(&mut m, 1, Nat::EndpointIndependent)?;
    natlab::add_behind_nat(&mut m, "a", 1, 2, "home", "198.19.0.1")?;
    m.wait_routed("a", "p")?;
    m.wait_routed("p", "a")?;
    ping_within(&m, "a", "p", Duration::from_secs(15))?;
    ping_within(&m, "p", "a", Duration::from_secs(15))?;
    // p reaches a at the mapping its router made, which a learned from p and published.
    let seen = up_at(
        &m,
        "p",
        "a",
        &natlab::site_public(1),
        Duration::from_secs(20),
    )?;
    // p follows a's datagrams to the mapping (learned), or, when a published it before p's
    // first choice settled, picks it from a's record (observed).
    let reason = seen["endpoint_reason"].as_str().unwrap_or("");
    assert!(
        reason == "learned" || reason == "observed",
        "p's view of a: {seen}"
    );
    wait_for(
        "a to publish the endpoint p sees it at",
        Duration::from_secs(20),
        || {
            let st = m.status("a").ok()?;
            (st["node"]["observed_endpoints"] == serde_json::json!([seen["endpoint"].clone()]))
                .then_some(())
        },
    )
    .with_context(|| format!("p sees a at {}", seen["endpoint"]))?;
    // The router forgets every mapping: a's keepalives make a new one, and p follows it.
    natlab::flush_mappings(&m, &router)?;
    ping_within(&m, "p", "a", Duration::from_secs(40))?;
    ping_within(&m, "a", "p", Duration::from_secs(15))?;
    Ok(())
}

#[test]
fn two_nodes_behind_two_endpoint_independent_nats_connect_directly_by_hole_punching()
-> anyhow::Result<()> {
    let mut m = natlab::start("nat2")?;
    natlab::add_public(&mut m, "p", 1, "cloud", None)?;
    natlab::add_site(&mut m, 1, Nat::EndpointIndependent)?;
    natlab::add_site(&mut m, 2, Nat::EndpointIndependent)?;
    natlab::add_behind_nat(&mut m, "a", 1, 2, "home", "198.19.0.1")?;
    natlab::add_behind_nat(&mut m, "b", 2, 2, "office", "198.19.0.1")?;
    m.wait_routed("a", "b")?;
    m.wait_routed("b", "a")?;
    // Neither can dial the other: each reaches the other's NAT mapping, opened from both
    // sides at once.
    let ab = up_at(
        &m,
        "a",
        "b",
        &natlab::site_public(2),
        Duration::from_secs(45),
    )?;
    let ba = up_at(
        &m,
        "b",
        "a",
        &natlab::site_public(1),
        Duration::from_secs(15),
    )?;
    assert_eq!(ab["endpoint_reason"], "hole-punched", "{ab}");
    assert_eq!(ba["endpoint_reason"], "hole-punched", "{ba}");
    ping_within(&m, "a", "b", Duration::from_secs(15))?;
    ping_within(&m, "b", "a", Duration::from_secs(15))?;
    Ok(())
}

#[test]
fn two_nodes_behind_symmetric_nats_talk_through_a_relay_that_can_neither_read_nor_forge_their_traffic()
-> anyhow::Result<()> {
    let mut m = natlab::start("nat3")?;
    natlab::add_public(&mut m, "p", 1, "cloud", None)?;
    natlab::add_site(&mut m, 1, Nat::Symmetric)?;
    natlab::add_site(&mut m, 2, Nat::Symmetric)?;
    natlab::add_behind_nat(&mut m, "a", 1, 2, "home", "198.19.0.1")?;
    natlab::add_behind_nat(&mut m, "b", 2, 2, "office", "198.19.0.1")?;
    m.wait_routed("a", "b")?;
    m.wait_routed("b", "a")?;
    // Every mapping is per destination: what p sees is useless to the other end, so after the
    // direct candidates fail, each reaches the other through p.
    for (x, y) in [("a", "b"), ("b", "a")] {
        assert_eq!(relayed(&m, x, y)?, "p", "{x}'s view of {y}");
    }
    let p_ns = m.daemon("p").ns.clone();
    let cap = weft_tests::capture(&mut m.lab, "tcpdump-relay", &p_ns, "wan0", &["udp"])?;
    ping_within(&m, "a", "b", Duration::from_secs(15))?;
    // 50 MB of TCP, byte-exact, with a marker the relay must never see.
    let b_pod = m.overlay("b")?.into_iter().next().context("b's block")?;
    let marker = "WEFT-RELAY-MARKER-5e1d-never-at-p";
    let hex: String = marker
        .bytes()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut ping = m.lab.cmd(&m.daemon("a").ns, "ping");
    ping.args(["-c", "3", "-i", "0.2", "-p", &hex, &b_pod]);
    anyhow::ensure!(
        weft::demo::lab::run(&mut ping).is_ok(),
        "marker ping failed"
    );
    let took = weft::demo::lab::tcp_transfer(
        &m.lab,
        (&m.daemon("a").ns, &m.daemon("b").ns),
        format!("{b_pod}:5001").parse()?,
        50 << 20,
        7,
    )?;
    eprintln!(
        "50 MB a -> b through the relay in {took:?} ({:.0} Mbit/s)",
        400.0 / took.as_secs_f64()
    );
    wait_for(
        "the relay's capture to hold the transfer",
        Duration::from_secs(20),
        || {
            let n = std::fs::metadata(&cap).ok()?.len();
            (n > 50 << 20).then_some(())
        },
    )?;
    m.lab.stop("tcpdump-relay", Duration::from_secs(5))?;
    let bytes = std::fs::read(&cap)?;
    anyhow::ensure!(
        !bytes.windows(16).any(|w| w == &marker.as_bytes()[..16]),
        "the marker crossed p in the clear"
    );
    let relayed = weft_tests::pcap::udp_datagrams(&bytes)?
        .into_iter()
        .filter(|d| d.dst_port == 51821)
        .count();
    anyhow::ensure!(
        relayed > 10_000,
        "only {relayed} datagrams came to p's relay port"
    );
    // The relay counts what it passed on to b; a counts what it sent b through it.
    let at_least = |node: &str, metric: &str, labels: &str, min: f64| {
        wait_for(
            &format!("{metric} at {node}"),
            Duration::from_secs(10),
            || {
                let v = metric_value(&m, node, metric, labels)?;
                (v >= min).then_some(v)
            },
        )
        .with_context(|| {
            format!(
                "{metric} at {node}: {:?}",
                metric_value(&m, node, metric, labels)
            )
        })
    };
    at_least("p", "weft_relay_forwarded_bytes_total", "b", 50e6)?;
    at_least("a", "weft_peer_relayed_transmit_bytes_total", "b", 50e6)?;
    at_least("b", "weft_peer_relayed_receive_bytes_total", "a", 50e6)?;
    // p, holding a's pod address, sends to b over its own tunnel: b refuses a source that
    // routes to a, not p.
    let a_pod = m.overlay("a")?.into_iter().next().context("a's block")?;
    m.lab
        .ip(&p_ns, &["addr", "add", &format!("{a_pod}/32"), "dev", "lo"])?;
    let mut spoof = m.lab.cmd(&p_ns, "ping");
    spoof.args(["-c", "3", "-i", "0.2", "-W", "1", "-I", &a_pod, &b_pod]);
    anyhow::ensure!(
        !spoof.output()?.status.success(),
        "a spoofed ping got an answer"
    );
    wait_for("3 spoofed drops at b", Duration::from_secs(10), || {
        let n = m.peer("b", "p")?["drops"]["spoofed"].as_u64()?;
        (n >= 3).then_some(n)
    })?;
    ping_within(&m, "a", "b", Duration::from_secs(15))?;
    Ok(())
}

#[test]
fn when_the_relay_dies_traffic_moves_to_the_next_home_relay_within_ten_seconds()
-> anyhow::Result<()> {
    let mut m = natlab::start("nat4")?;
    natlab::add_public(&mut m, "p1", 1, "cloud", None)?;
    natlab::add_public(&mut m, "p2", 2, "cloud", Some("198.19.0.1"))?;
    natlab::add_site(&mut m, 1, Nat::Symmetric)?;
    natlab::add_site(&mut m, 2, Nat::Symmetric)?;
    let both = "198.19.0.1, 198.19.0.2";
    natlab::add_behind_nat(&mut m, "a", 1, 2, "home", both)?;
    natlab::add_behind_nat(&mut m, "b", 2, 2, "office", both)?;
    m.wait_routed("a", "b")?;
    let dead = relayed(&m, "a", "b")?;
    relayed(&m, "b", "a")?;
    ping_within(&m, "a", "b", Duration::from_secs(15))?;
    // b registers with both relays and publishes them; a goes through the first b names.
    let homes = m.status("b")?["node"]["home_relays"].clone();
    let names: Vec<&str> = homes
        .as_array()
        .context("b's status has no home_relays")?
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(names.len(), 2, "b's homes: {homes}");
    assert_eq!(
        names[0], dead,
        "a goes through b's first published home: {homes}"
    );
    let other = if dead == "p1" { "p2" } else { "p1" };
    m.lab.kill(&dead)?;
    #[expect(
        clippy::disallowed_methods,
        reason = "the test measures how long the move takes"
    )]
    let killed = std::time::Instant::now();
    ping_within(&m, "a", "b", Duration::from_secs(10))?;
    let took = killed.elapsed();
    let now = m.peer("a", "b").context("a's view of b")?;
    assert_eq!(
        now["endpoint_reason"],
        format!("relayed via {other}"),
        "a moved to b's other home relay: {now}"
    );
    eprintln!("{dead} killed: a reached b through {other} again after {took:?}");
    ping_within(&m, "b", "a", Duration::from_secs(10))?;
    // The last relay killed too: nothing can carry b's traffic, and a says so.
    m.lab.kill(other)?;
    let down = wait_for(
        "a to report b down, with the reason",
        Duration::from_secs(30),
        || {
            m.peer("a", "b").filter(|p| {
                p["state"] == "down"
                    && p["down_reason"]
                        .as_str()
                        .is_some_and(|r| r.contains("no relay answers"))
            })
        },
    )
    .with_context(|| format!("a's view of b: {:?}", m.peer("a", "b")))?;
    eprintln!("with no relay left, a shows b: {down}");
    let text = weft::demo::lab::run(
        m.lab
            .cmd(&m.daemon("a").ns, &m.bin)
            .arg("status")
            .arg("--socket")
            .arg(&m.daemon("a").socket),
    )?;
    let text = String::from_utf8_lossy(&text.stdout);
    anyhow::ensure!(
        text.contains("b is down: both ends are behind NAT"),
        "{text}"
    );
    Ok(())
}

/// Two nodes behind two symmetric NATs in one region, relayed via `p`; then the NATs go and
/// the sites route to each other. Returns the lab, the two site routers, and how long after
/// the NATs went both ends were up on each other's LAN address.
fn relayed_then_direct(tag: &str) -> anyhow::Result<(MeshLab, [String; 2], Duration)> {
    let mut m = natlab::start(tag)?;
    natlab::add_public(&mut m, "p", 1, "cloud", None)?;
    let r1 = natlab::add_site(&mut m, 1, Nat::Symmetric)?;
    let r2 = natlab::add_site(&mut m, 2, Nat::Symmetric)?;
    // One region: each end's LAN address is its first candidate for the other, unreachable
    // while the NATs stand.
    natlab::add_behind_nat(&mut m, "a", 1, 2, "home", "198.19.0.1")?;
    natlab::add_behind_nat(&mut m, "b", 2, 2, "home", "198.19.0.1")?;
    m.wait_routed("a", "b")?;
    for (x, y) in [("a", "b"), ("b", "a")] {
        assert_eq!(relayed(&m, x, y)?, "p", "{x}'s view of {y}");
    }
    ping_within(&m, "a", "b", Duration::from_secs(15))?;
    // The NATs go: the two LANs and p route to each other directly.
    let p_ns = m.daemon("p").ns.clone();
    natlab::remove_nat(&m, 1, &r1, &[&r2, &p_ns])?;
    natlab::remove_nat(&m, 2, &r2, &[&r1, &p_ns])?;
    #[expect(
        clippy::disallowed_methods,
        reason = "the test measures how long the move takes"
    )]
    let removed = std::time::Instant::now();
    let retry = weft::control::reconcile::DIRECT_RETRY;
    // Each reaches the other at its LAN address, its only own address (the LANs share no
    // subnet): the probe's answer moved the session, and the choice followed it.
    for (x, y, ip) in [("a", "b", "198.18.102.2"), ("b", "a", "198.18.101.2")] {
        wait_for(
            &format!("{x} to reach {y} directly"),
            retry + Duration::from_secs(5),
            || {
                m.peer(x, y).filter(|p| {
                    p["state"] == "up"
                        && p["endpoint"] == format!("{ip}:51820")
                        && p["endpoint_reason"] == "only-address"
                })
            },
        )
        .with_context(|| format!("{x}'s view of {y}: {:?}", m.peer(x, y)))?;
    }
    Ok((m, [r1, r2], removed.elapsed()))
}

#[test]
fn when_the_nat_goes_away_traffic_leaves_the_relay_for_the_direct_path_within_one_retry_period()
-> anyhow::Result<()> {
    let (m, _, took) = relayed_then_direct("nat5")?;
    let retry = weft::control::reconcile::DIRECT_RETRY;
    eprintln!("NAT removed: a and b direct after {took:?} (retry period {retry:?})");
    // Traffic flows, and none of it crosses the relay.
    ping_within(&m, "a", "b", Duration::from_secs(10))?;
    let before = metric_value(&m, "p", "weft_relay_forwarded_bytes_total", "b").unwrap_or(0.0);
    for (x, y) in [("a", "b"), ("b", "a")] {
        let addr = m.overlay(y)?.into_iter().next().context("no block")?;
        let mut ping = m.lab.cmd(&m.daemon(x).ns, "ping");
        ping.args(["-c", "5", "-i", "0.2", "-W", "1", "-n", "-q", &addr]);
        anyhow::ensure!(
            weft::demo::lab::run(&mut ping).is_ok(),
            "{x} -> {y} ping failed"
        );
    }
    // The relay's counters reach /metrics up to METRICS_LAG late: watch them that long.
    #[expect(
        clippy::disallowed_methods,
        reason = "an observation window, not a wait for a condition"
    )]
    let start = std::time::Instant::now();
    while start.elapsed() < METRICS_LAG {
        let now = metric_value(&m, "p", "weft_relay_forwarded_bytes_total", "b").unwrap_or(0.0);
        assert_eq!(before, now, "bytes still crossed the relay for b");
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

#[test]
fn a_direct_path_that_passes_handshakes_and_drops_data_is_left_for_the_relay_within_the_proof_time()
-> anyhow::Result<()> {
    let (m, [r1, _], _) = relayed_then_direct("nat6")?;
    // What a host that a dishonest member slipped onto the path could do: pass WireGuard's
    // handshakes (at most 176 bytes on the wire) and keepalives both ways, drop the data.
    for rule in [
        "add table ip blackhole",
        "add chain ip blackhole hole { type filter hook forward priority -10; policy accept; }",
        "add rule ip blackhole hole ip saddr 198.18.101.0/24 ip daddr 198.18.102.0/24 ip length > 200 drop",
        "add rule ip blackhole hole ip saddr 198.18.102.0/24 ip daddr 198.18.101.0/24 ip length > 200 drop",
    ] {
        weft::demo::lab::run(m.lab.cmd(&r1, "nft").arg(rule)).context("the black hole")?;
    }
    #[expect(
        clippy::disallowed_methods,
        reason = "the test measures how long the way back takes"
    )]
    let holed = std::time::Instant::now();
    // Pings of 1000 bytes from a: lost while the pair stays on the direct path, answered once
    // a goes back to its relay (b follows where a's packets come from).
    let addr = m.overlay("b")?.into_iter().next().context("no block")?;
    let mut ping = m.lab.cmd(&m.daemon("a").ns, "ping");
    ping.args([
        "-c", "3", "-i", "0.2", "-W", "1", "-s", "1000", "-n", "-q", &addr,
    ]);
    let proof = weft::control::reconcile::PATH_PROOF;
    wait_for(
        "a big ping from a to b to be answered",
        proof + Duration::from_secs(20),
        || ping.output().ok().filter(|o| o.status.success()),
    )?;
    let took = holed.elapsed();
    eprintln!(
        "data black-holed on the direct path: answered again after {took:?} (proof time {proof:?})"
    );
    anyhow::ensure!(
        took >= proof,
        "answered after {took:?}: the black hole did not hold (the test proves nothing)"
    );
    for (x, y) in [("a", "b"), ("b", "a")] {
        assert_eq!(relayed(&m, x, y)?, "p", "{x}'s view of {y}");
    }
    let before = metric_value(&m, "p", "weft_relay_forwarded_bytes_total", "b").unwrap_or(0.0);
    let mut big = m.lab.cmd(&m.daemon("a").ns, "ping");
    big.args([
        "-c", "5", "-i", "0.2", "-W", "1", "-s", "1000", "-n", "-q", &addr,
    ]);
    anyhow::ensure!(
        weft::demo::lab::run(&mut big).is_ok(),
        "a -> b big pings failed through the relay"
    );
    wait_for(
        "p's count of bytes relayed to b to take the pings",
        METRICS_LAG * 2,
        || {
            metric_value(&m, "p", "weft_relay_forwarded_bytes_total", "b")
                .filter(|v| *v >= before + 5.0 * 1000.0)
        },
    )
    .with_context(|| {
        format!(
            "relay forwarded {before} -> {:?} bytes for b",
            metric_value(&m, "p", "weft_relay_forwarded_bytes_total", "b")
        )
    })?;
    Ok(())
}
