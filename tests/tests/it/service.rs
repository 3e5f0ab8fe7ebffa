//! weft as a service: the systemd notify protocol over a stand-in `NOTIFY_SOCKET`, and the
//! metrics endpoint scraped during traffic. Run as root.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use weft::demo::lab::{Lab, wait_for};
use weft_tests::exposition::{Sample, parse_exposition};
use weft_tests::{Pair, http_get, node_config, tcp_transfer, weft_bin};

/// Every message on `sock` until `until` says stop or `limit` passes.
fn collect(
    sock: &UnixDatagram,
    limit: Duration,
    mut until: impl FnMut(&str) -> bool,
) -> Vec<String> {
    #[expect(clippy::disallowed_methods, reason = "the test bounds its own wait")]
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let stop = until(&msg);
            got.push(msg);
            if stop {
                break;
            }
        }
    }
    got
}

#[test]
fn ready_comes_after_the_interface_is_up_the_watchdog_is_petted_and_stopping_is_sent()
-> anyhow::Result<()> {
    let bin = weft_bin()?;
    let mut lab = Lab::new("sn")?;
    let ns = lab.add_ns("a")?;
    let other = lab.add_ns("b")?;
    lab.link(
        (&ns, "eth0", "198.18.1.1/24"),
        (&other, "eth0", "198.18.1.2/24"),
    )?;
    let d = lab.daemon(
        "a",
        &ns,
        &node_config("a", "198.18.1.1", "100.64.1.0/24", &[]),
    )?;
    let path = lab.dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path)?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let watchdog = Duration::from_millis(400);
    lab.start_with(
        &bin,
        &d,
        &[],
        &[
            ("NOTIFY_SOCKET", path.to_str().context("path")?),
            ("WATCHDOG_USEC", &watchdog.as_micros().to_string()),
        ],
    )?;
    // READY=1, and at that moment the interface is up with its address.
    let mut link_at_ready = String::new();
    let msgs = collect(&sock, Duration::from_secs(10), |m| {
        if m.lines().any(|l| l == "READY=1") {
            link_at_ready = lab
                .ip(&ns, &["-o", "addr", "show", "dev", "weft0"])
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            true
        } else {
            false
        }
    });
    ensure!(
        msgs.iter().any(|m| m.contains("READY=1")),
        "no READY=1 in {msgs:?}"
    );
    ensure!(
        link_at_ready.contains("100.64.1.1/32"),
        "weft0 was not up with its address at READY: {link_at_ready:?}"
    );
    // The watchdog at half the interval: about 2.5 s / 200 ms = 12 pets; and a STATUS line.
    let window = Duration::from_millis(2500);
    let msgs = collect(&sock, window, |_| false);
    let pets = msgs.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    ensure!(
        (8..=16).contains(&pets),
        "{pets} watchdog pets in {window:?} with WATCHDOG_USEC={watchdog:?}: {msgs:?}"
    );
    let status = wait_for("a STATUS= line", Duration::from_secs(5), || {
        collect(&sock, Duration::from_millis(1100), |m| {
            m.contains("STATUS=")
        })
        .into_iter()
        .chain(msgs.clone())
        .find(|m| m.contains("STATUS="))
    })?;
    ensure!(status.contains("0 peers routed"), "{status}");
    // SIGTERM: STOPPING=1, then a clean exit.
    let pid = lab.pid("a").context("daemon pid")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid)?),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let msgs = collect(&sock, Duration::from_secs(10), |m| m.contains("STOPPING=1"));
    ensure!(
        msgs.iter().any(|m| m.contains("STOPPING=1")),
        "no STOPPING=1 after SIGTERM: {msgs:?}"
    );
    ensure!(
        lab.stop("a", Duration::from_secs(10))?,
        "weft did not exit cleanly"
    );
    Ok(())
}

/// `GET path` on `addr` from inside namespace `ns`; the body.
fn value(samples: &[Sample], name: &str, peer: &str) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.name == name && s.labels.iter().any(|(k, v)| k == "peer" && v == peer))
        .map(|s| s.value)
}

#[test]
fn metrics_scraped_during_traffic_parse_and_their_counters_match_the_bytes_sent()
-> anyhow::Result<()> {
    let p = Pair::start("sm")?;
    let health = http_get(&p.lab, &p.a.ns, "127.0.0.1:6782", "/healthz")?;
    ensure!(health.starts_with("HTTP/1.1 200"), "{health}");
    let payload = 20usize << 20;
    tcp_transfer(
        &p.lab,
        (&p.a.ns, &p.b.ns),
        "100.64.2.1:5001".parse()?,
        payload,
        7,
    )?;
    // The link is quiet now but for keepalives: take status, scrape, status again, and retry
    // until nothing moved in between, so the scrape must equal the status exactly.
    let (samples, tx, rx) = wait_for("a quiet scrape", Duration::from_secs(30), || {
        let before = p.lab.status(&p.bin, &p.a).ok()?;
        let resp = http_get(&p.lab, &p.a.ns, "127.0.0.1:6782", "/metrics").ok()?;
        let after = p.lab.status(&p.bin, &p.a).ok()?;
        let peer = |st: &serde_json::Value, k: &str| st["peers"][0][k].as_u64();
        if peer(&before, "tx_bytes") != peer(&after, "tx_bytes")
            || peer(&before, "rx_bytes") != peer(&after, "rx_bytes")
        {
            return None;
        }
        let body = resp.split("\r\n\r\n").nth(1)?.to_owned();
        let samples = match parse_exposition(&body) {
            Ok(s) => s,
            Err(e) => return Some(Err(anyhow::anyhow!("{e}\n{body}"))),
        };
        Some(Ok((
            samples,
            peer(&after, "tx_bytes")?,
            peer(&after, "rx_bytes")?,
        )))
    })??;
    let m_tx = value(&samples, "weft_peer_transmit_bytes_total", "b").context("tx bytes")?;
    let m_rx = value(&samples, "weft_peer_receive_bytes_total", "b").context("rx bytes")?;
    ensure!(
        m_tx as u64 == tx && m_rx as u64 == rx,
        "metrics {m_tx}/{m_rx} vs status {tx}/{rx}"
    );
    // Every payload byte went out, inside WireGuard's and TCP/IP's overhead.
    ensure!(
        m_tx >= payload as f64 && m_tx <= payload as f64 * 1.15,
        "{m_tx} bytes counted for {payload} bytes of payload"
    );
    let pkts = value(&samples, "weft_peer_transmit_packets_total", "b").context("tx packets")?;
    ensure!(
        pkts >= (payload / 1440) as f64,
        "{pkts} packets for {payload} bytes"
    );
    ensure!(value(&samples, "weft_peer_handshake_age_seconds", "b").is_some());
    let up = samples.iter().any(|s| {
        s.name == "weft_peer_state"
            && s.value == 1.0
            && s.labels.contains(&("state".into(), "up".into()))
            && s.labels.contains(&("path".into(), "encrypted".into()))
    });
    ensure!(up, "no weft_peer_state up/encrypted for b");
    Ok(())
}

/// The source address the outside host sees for one UDP datagram from the pod to `dst`.
fn seen_source(lab: &Lab, pod: &str, outside: &str, dst: &'static str) -> anyhow::Result<String> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let listener = lab.in_ns(outside, move || {
        let sock = std::net::UdpSocket::bind(dst)?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))?;
        let _ = ready_tx.send(());
        let mut buf = [0u8; 64];
        let (_, from) = sock
            .recv_from(&mut buf)
            .context("no datagram reached the outside host")?;
        Ok(from.ip().to_string())
    });
    ready_rx.recv_timeout(Duration::from_secs(5))?;
    lab.in_ns(pod, move || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
        sock.send_to(b"who am i", dst)?;
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the sender panicked"))??;
    listener
        .join()
        .map_err(|_| anyhow::anyhow!("the listener panicked"))?
}

fn nft_tables(lab: &Lab, ns: &str) -> anyhow::Result<String> {
    let out = weft::demo::lab::run(lab.cmd(ns, "nft").args(["list", "tables"]))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn pods_leaving_the_pod_network_are_masqueraded_unless_told_not_to_and_shutdown_removes_the_rules()
-> anyhow::Result<()> {
    let bin = weft_bin()?;
    let mut lab = Lab::new("sq")?;
    let node = lab.add_ns("n")?;
    let outside = lab.add_ns("o")?;
    lab.link(
        (&node, "eth0", "198.18.1.1/24"),
        (&outside, "eth0", "198.18.1.9/24"),
    )?;
    lab.ip(&outside, &["addr", "add", "198.18.1.10/24", "dev", "eth0"])?;
    let pod = lab.add_pod(&node, "p", "100.64.1.2")?;
    // Someone else's table, which weft must leave exactly as it is.
    let listed = |lab: &Lab| -> anyhow::Result<String> {
        let out = weft::demo::lab::run(
            lab.cmd(&node, "nft")
                .args(["list", "chain", "inet", "theirs", "c"]),
        )?;
        // The counter moves with traffic; compare the rules without it.
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split(" counter").next().unwrap_or(l).to_owned())
            .collect::<Vec<_>>()
            .join("\n"))
    };
    weft::demo::lab::run(lab.cmd(&node, "nft").args([
        "add table inet theirs ; add chain inet theirs c { type filter hook forward priority 0 ; policy accept ; } ; add rule inet theirs c ip saddr 100.64.1.2 counter",
    ]))?;
    let theirs_before = listed(&lab)?;

    let body = |nat: bool| {
        format!(
            "{}network:\n  nat_outgoing: {nat}\n  no_masquerade: [198.18.1.10/32]\n",
            node_config("n", "198.18.1.1", "100.64.1.0/24", &[])
        )
    };
    let d = lab.daemon("n", &node, &body(true))?;
    lab.start(&bin, &d)?;
    ensure!(
        nft_tables(&lab, &node)?.contains("table inet weft"),
        "no weft table"
    );
    let src = seen_source(&lab, &pod, &outside, "198.18.1.9:7000")?;
    ensure!(
        src == "198.18.1.1",
        "the outside host saw {src}, not the node's address"
    );
    let src = seen_source(&lab, &pod, &outside, "198.18.1.10:7000")?;
    ensure!(
        src == "100.64.1.2",
        "no_masquerade: the outside host saw {src}"
    );
    ensure!(
        lab.stop("n", Duration::from_secs(10))?,
        "weft did not exit cleanly"
    );
    let tables = nft_tables(&lab, &node)?;
    ensure!(
        !tables.contains("weft"),
        "weft's table outlived the daemon: {tables}"
    );
    ensure!(listed(&lab)? == theirs_before, "another table changed");

    let d = lab.daemon("n", &node, &body(false))?;
    lab.start(&bin, &d)?;
    ensure!(
        !nft_tables(&lab, &node)?.contains("weft"),
        "a weft table without nat_outgoing"
    );
    let src = seen_source(&lab, &pod, &outside, "198.18.1.9:7000")?;
    ensure!(
        src == "100.64.1.2",
        "nat_outgoing off: the outside host saw {src}"
    );
    ensure!(
        lab.stop("n", Duration::from_secs(10))?,
        "weft did not exit cleanly"
    );
    ensure!(listed(&lab)? == theirs_before, "another table changed");
    Ok(())
}

/// Rewrites `name`'s config with `edit` and sends SIGHUP.
fn reload(
    m: &weft_tests::meshlab::MeshLab,
    name: &str,
    edit: impl Fn(&str) -> String,
) -> anyhow::Result<()> {
    let d = m.daemon(name);
    let text = std::fs::read_to_string(&d.config)?;
    let new = edit(&text);
    ensure!(new != text, "the edit changed nothing");
    std::fs::write(&d.config, new)?;
    m.lab.signal(name, nix::sys::signal::Signal::SIGHUP)
}

/// `config` with `network.mtu: 1300` and a WireGuard peer `laptop` (a fresh key) for `allowed`.
fn with_mtu_and_laptop(config: &str, allowed: &str) -> String {
    format!(
        "{}\nwireguard_peers:\n  - name: laptop\n    public_key: {}\n    allowed_ips: {allowed}\n",
        config.replace("network:\n", "network:\n  mtu: 1300\n"),
        weft::host::keys::public_of(&weft::host::keys::generate())
    )
}

/// Waits until e1's status shows MTU 1300 and the peer `laptop`.
fn wait_mtu_and_laptop(m: &weft_tests::meshlab::MeshLab, what: &str) -> anyhow::Result<()> {
    wait_for(what, Duration::from_secs(10), || {
        let st = m.status("e1").ok()?;
        let has = st["peers"]
            .as_array()?
            .iter()
            .any(|p| p["name"] == "laptop");
        (st["node"]["mtu"] == 1300 && has).then_some(())
    })
}

fn log_has(m: &weft_tests::meshlab::MeshLab, name: &str, what: &str, n: usize) -> Option<()> {
    let log = std::fs::read_to_string(&m.daemon(name).log).ok()?;
    (log.matches(what).count() >= n).then_some(())
}

#[test]
fn reload_applies_bootstrap_peers_trusted_subnets_mtu_and_peers_and_refuses_a_broken_config()
-> anyhow::Result<()> {
    use weft_tests::meshlab::{MeshLab, Spec};
    let spec = |name, host, bootstrap| Spec {
        name,
        region: "eu",
        lan: 1,
        host,
        block: Some(host),
        bootstrap,
    };
    // e3 starts knowing nobody.
    let m = MeshLab::start(
        "sr",
        &[
            spec("e1", 1, Some("198.18.1.2")),
            spec("e2", 2, Some("198.18.1.1")),
            spec("e3", 3, None),
        ],
    )?;
    let all = ["e1", "e2", "e3"];
    m.wait_full_mesh(&["e1", "e2"])?;
    // Bootstrap peers: e3 joins once it is told where.
    reload(&m, "e3", |t| t.replace("peers: []", "peers: [198.18.1.1]"))?;
    m.wait_full_mesh(&all)?;
    let path =
        |a: &str, b: &str| -> Option<String> { m.peer(a, b)?["path"].as_str().map(str::to_owned) };
    ensure!(path("e1", "e2").as_deref() == Some("plaintext"));
    ensure!(path("e1", "e3").as_deref() == Some("plaintext"));

    // Trusted subnets: e1 stops trusting e2 (but still trusts itself and e3) while a TCP
    // stream to e3 runs; e2 goes encrypted, e3's stream never notices.
    let e3_tx_before = m
        .peer("e1", "e3")
        .and_then(|p| p["tx_bytes"].as_u64())
        .unwrap_or(0);
    let (from, to) = (m.daemon("e1").ns.clone(), m.daemon("e3").ns.clone());
    let stream = {
        let lab = &m.lab;
        std::thread::scope(|s| -> anyhow::Result<()> {
            let t = s.spawn(|| {
                tcp_transfer(lab, (&from, &to), "100.64.3.1:5003".parse()?, 400 << 20, 9)
            });
            reload(&m, "e1", |t| {
                t.replace(
                    "trusted_subnets: [198.18.1.0/24]",
                    "trusted_subnets: [198.18.1.1/32, 198.18.1.3/32]",
                )
            })?;
            wait_for("e1 and e2 to go encrypted", Duration::from_secs(20), || {
                (path("e1", "e2").as_deref() == Some("encrypted")
                    && path("e2", "e1").as_deref() == Some("encrypted"))
                .then_some(())
            })?;
            ensure!(
                !t.is_finished(),
                "the stream ended before the switch: nothing shows it kept flowing through it"
            );
            let took = t
                .join()
                .map_err(|_| anyhow::anyhow!("the stream panicked"))??;
            eprintln!("400 MB e1 -> e3 during the reload in {took:?}");
            Ok(())
        })
    };
    stream?;
    ensure!(
        path("e1", "e3").as_deref() == Some("plaintext"),
        "e1-e3 changed path"
    );
    let e3_tx_after = m
        .peer("e1", "e3")
        .and_then(|p| p["tx_bytes"].as_u64())
        .unwrap_or(0);
    ensure!(
        e3_tx_after >= e3_tx_before + (400 << 20),
        "e1's peer e3 was replaced (counters {e3_tx_before} -> {e3_tx_after})"
    );
    weft_tests::ping(&m.lab, &m.daemon("e1").ns, "100.64.2.1", None)?;

    // MTU and a wireguard peer.
    reload(&m, "e1", |t| with_mtu_and_laptop(t, "[100.127.9.0/24]"))?;
    wait_mtu_and_laptop(&m, "e1 to apply the MTU and the new peer")?;
    let link = weft::demo::lab::run(
        m.lab
            .cmd(&m.daemon("e1").ns, "ip")
            .args(["-o", "link", "show", "weft0"]),
    )?;
    ensure!(String::from_utf8_lossy(&link.stdout).contains("mtu 1300"));
    let conflist: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        m.daemon("e1").config.with_file_name("10-weft.conflist"),
    )?)?;
    ensure!(
        conflist["plugins"][1]["mtu"] == 1300,
        "the conflist kept the old MTU: {conflist}"
    );
    let routes = weft::demo::lab::run(
        m.lab
            .cmd(&m.daemon("e1").ns, "ip")
            .args(["route", "show", "dev", "weft0"]),
    )?;
    ensure!(
        String::from_utf8_lossy(&routes.stdout).contains("100.127.9.0/24"),
        "no route for the new peer"
    );

    // A broken config, then one that needs a restart: both refused, the daemon runs on.
    reload(&m, "e1", |t| format!("{t}\nbogus_key: 1\n"))?;
    wait_for("the refusal", Duration::from_secs(10), || {
        log_has(&m, "e1", "reload refused", 1)
    })?;
    reload(&m, "e1", |t| {
        t.replace("bogus_key: 1\n", "")
            .replace("interface: weft0", "interface: weft1")
    })?;
    wait_for("the second refusal", Duration::from_secs(10), || {
        log_has(&m, "e1", "needs a restart", 1)
    })?;
    let log = std::fs::read_to_string(&m.daemon("e1").log)?;
    ensure!(
        log.contains("bogus_key"),
        "the refusal does not name the bad key:\n{log}"
    );
    ensure!(m.status("e1").is_ok(), "e1 stopped answering");
    weft_tests::ping(&m.lab, &m.daemon("e1").ns, "100.64.3.1", None)?;
    Ok(())
}

/// `ip -o link show weft0` and `ip route show dev weft0` in `name`'s namespace.
fn link_and_routes(m: &weft_tests::meshlab::MeshLab, name: &str) -> anyhow::Result<String> {
    let ns = &m.daemon(name).ns;
    let link = weft::demo::lab::run(m.lab.cmd(ns, "ip").args(["-o", "link", "show", "weft0"]))?;
    let routes = weft::demo::lab::run(m.lab.cmd(ns, "ip").args(["route", "show", "dev", "weft0"]))?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&link.stdout),
        String::from_utf8_lossy(&routes.stdout)
    ))
}

#[test]
fn a_reload_that_fails_half_way_leaves_the_running_config_and_the_applied_state_as_they_were()
-> anyhow::Result<()> {
    use weft_tests::meshlab::{MeshLab, Spec};
    let m = MeshLab::start(
        "rb",
        &[Spec {
            name: "e1",
            region: "eu",
            lan: 1,
            host: 1,
            block: Some(1),
            bootstrap: None,
        }],
    )?;
    let ns = m.daemon("e1").ns.clone();
    let mtu = m.status("e1")?["node"]["mtu"].clone();
    ensure!(mtu != 1300, "the lab starts at MTU {mtu}");
    let before = link_and_routes(&m, "e1")?;
    let conflist = m.daemon("e1").config.with_file_name("10-weft.conflist");
    let conflist_before = std::fs::read_to_string(&conflist)?;
    // Someone else holds a route to 100.127.99.0/24: adding weft's fails half-way through the
    // reload, after the MTU and the first peer's route were applied.
    m.lab
        .ip(&ns, &["route", "add", "100.127.99.0/24", "dev", "lo"])?;
    reload(&m, "e1", |t| {
        with_mtu_and_laptop(t, "[100.127.50.0/24, 100.127.99.0/24]")
    })?;
    wait_for("the refusal", Duration::from_secs(10), || {
        log_has(&m, "e1", "reload refused", 1)
    })?;
    let log = std::fs::read_to_string(&m.daemon("e1").log)?;
    ensure!(
        log.contains("100.127.99.0/24") && log.contains("were undone"),
        "the refusal does not name the route or say the rest was undone:\n{log}"
    );
    for line in log.lines().filter(|l| l.contains("SIGHUP")) {
        eprintln!("{line}");
    }
    // Everything as it was: link MTU, routes, status, conflist, peers.
    ensure!(
        link_and_routes(&m, "e1")? == before,
        "the applied state changed:\nbefore: {before}\nafter: {}",
        link_and_routes(&m, "e1")?
    );
    let st = m.status("e1")?;
    ensure!(st["node"]["mtu"] == mtu, "status MTU {}", st["node"]["mtu"]);
    ensure!(
        !st["peers"]
            .as_array()
            .context("peers")?
            .iter()
            .any(|p| p["name"] == "laptop"),
        "the half-applied peer is in status"
    );
    ensure!(
        std::fs::read_to_string(&conflist)? == conflist_before,
        "the conflist changed"
    );
    // The running config is still the old one: once the route is free, the same file applies.
    m.lab
        .ip(&ns, &["route", "del", "100.127.99.0/24", "dev", "lo"])?;
    m.lab.signal("e1", nix::sys::signal::Signal::SIGHUP)?;
    wait_mtu_and_laptop(&m, "the same file to apply on the next SIGHUP")?;
    let after = link_and_routes(&m, "e1")?;
    ensure!(
        after.contains("mtu 1300")
            && after.contains("100.127.50.0/24")
            && after.contains("100.127.99.0/24"),
        "{after}"
    );
    Ok(())
}
