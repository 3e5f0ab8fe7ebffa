//! The mesh end to end: four nodes in two regions, each bootstrapped from one other node.

use std::time::Duration;

use weft::demo::lab::wait_for;
use weft_tests::meshlab::{FOUR, MeshLab, Spec};
use weft_tests::{alive_members, capture, pcap, ping};

const ALL: [&str; 4] = ["e1", "e2", "u1", "u2"];

#[test]
fn four_nodes_in_two_regions_learn_each_other_and_pick_paths_by_region_and_trust()
-> anyhow::Result<()> {
    let mut m = MeshLab::start("ms", &FOUR)?;
    m.wait_full_mesh(&ALL)?;
    for n in ALL {
        let st = m.status(n)?;
        assert_eq!(alive_members(&st).len(), 3, "{n}: {st}");
    }
    // Same region: private address, plaintext. Other region: public address, WireGuard.
    let e2 = m.peer("e1", "e2").expect("e1 routes e2");
    assert_eq!(e2["endpoint"], "198.18.1.2:51820", "{e2}");
    assert_eq!(e2["endpoint_reason"], "same-region");
    assert_eq!(e2["path"], "plaintext");
    assert_eq!(e2["region"], "eu");
    let u1 = m.peer("e1", "u1").expect("e1 routes u1");
    assert_eq!(u1["endpoint"], "198.19.0.11:51820", "{u1}");
    assert_eq!(u1["endpoint_reason"], "other-region");
    assert_eq!(u1["path"], "encrypted");
    let u2 = m.peer("u1", "u2").expect("u1 routes u2");
    assert_eq!(
        (u2["endpoint"].as_str(), u2["path"].as_str()),
        (Some("198.18.2.2:51820"), Some("plaintext"))
    );

    // What the segments carry: plaintext on e1's LAN, only WireGuard on its internet link.
    let e1_ns = m.daemon("e1").ns.clone();
    let lan = capture(&mut m.lab, "lan", &e1_ns, "lan0", &["udp", "port", "51820"])?;
    let wan = capture(&mut m.lab, "wan", &e1_ns, "wan0", &["udp", "port", "51820"])?;
    let marker = "WEFT-MESH-MARKER-3c1e";
    let hex: String = marker
        .bytes()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    let e1 = m.daemon("e1").ns.clone();
    for dst in ["100.64.2.1", "100.64.3.1"] {
        weft::demo::lab::run(
            m.lab
                .cmd(&e1, "ping")
                .args(["-c", "3", "-i", "0.2", "-p", &hex, dst]),
        )?;
    }
    let needle = &marker.as_bytes()[..16];
    let lan_bytes = wait_for(
        "the marker on the LAN capture",
        Duration::from_secs(10),
        || {
            let b = std::fs::read(&lan).ok()?;
            b.windows(16).any(|w| w == needle).then_some(b)
        },
    )?;
    let wan_bytes = wait_for(
        "WireGuard data on the internet capture",
        Duration::from_secs(10),
        || {
            let b = std::fs::read(&wan).ok()?;
            let d = pcap::udp_datagrams(&b).ok()?;
            (d.iter().filter(|x| x.payload.first() == Some(&4)).count() >= 6).then_some(b)
        },
    )?;
    m.lab.stop("lan", Duration::from_secs(5))?;
    m.lab.stop("wan", Duration::from_secs(5))?;
    let lan_d = pcap::udp_datagrams(&lan_bytes)?;
    assert!(
        lan_d.iter().any(|d| d.payload.starts_with(b"WF")),
        "no plaintext datagrams on the LAN"
    );
    assert!(
        lan_d.iter().all(|d| !pcap::is_wireguard(&d.payload)),
        "WireGuard between same-region peers"
    );
    let wan_d = pcap::udp_datagrams(&wan_bytes)?;
    assert!(
        wan_d.iter().all(|d| pcap::is_wireguard(&d.payload)),
        "non-WireGuard on the internet"
    );
    assert!(
        !wan_bytes.windows(16).any(|w| w == needle),
        "the marker crossed the internet in clear"
    );
    Ok(())
}

#[test]
fn a_killed_node_is_withdrawn_within_the_timeout_and_rejoins_with_its_key() -> anyhow::Result<()> {
    let mut m = MeshLab::start("mk", &FOUR)?;
    m.wait_full_mesh(&ALL)?;
    let id_before = m.status("u2")?["mesh"]["node_id"].clone();
    // kill -9: no goodbye.
    m.lab.kill("u2")?;
    #[expect(
        clippy::disallowed_methods,
        reason = "measuring how long the withdrawal takes"
    )]
    let killed = std::time::Instant::now();
    for n in ["e1", "e2", "u1"] {
        wait_for(
            &format!("{n} to withdraw u2"),
            Duration::from_secs(20),
            || m.peer(n, "u2").is_none().then_some(()),
        )?;
        let st = m.status(n)?;
        let u2 = st["mesh"]["members"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["name"] == "u2").cloned());
        assert_eq!(
            u2.map(|x| x["alive"].clone()),
            Some(serde_json::Value::Bool(false)),
            "{n}"
        );
    }
    let took = killed.elapsed();
    eprintln!("u2 withdrawn everywhere {took:?} after kill -9 (liveness timeout 6 s)");
    assert!(took < Duration::from_secs(15), "took {took:?}");
    // The others still talk.
    for (a, b) in [
        ("e1", "100.64.3.1"),
        ("u1", "100.64.2.1"),
        ("e2", "100.64.1.1"),
    ] {
        ping(&m.lab, &m.daemon(a).ns, b, None)?;
    }
    // Restarted, it rejoins as the same node.
    let d = m.daemon("u2").clone();
    m.lab.start(&m.bin, &d)?;
    m.wait_full_mesh(&ALL)?;
    assert_eq!(m.status("u2")?["mesh"]["node_id"], id_before);
    Ok(())
}

#[test]
fn a_node_without_the_secret_never_joins_and_garbage_on_the_gossip_port_changes_nothing()
-> anyhow::Result<()> {
    let mut m = MeshLab::start("mw", &FOUR)?;
    m.wait_full_mesh(&ALL)?;
    let intruder = Spec {
        name: "x",
        region: "us",
        lan: 2,
        host: 3,
        block: Some(9),
        bootstrap: Some("198.18.2.1"),
    };
    let wrong = String::from_utf8(
        weft::demo::lab::run(std::process::Command::new(&m.bin).arg("gensecret"))?.stdout,
    )?;
    let d = m.add_node(&intruder, "us", &wrong)?;
    m.lab.start(&m.bin, &d)?;
    wait_for(
        "u1 to refuse the intruder's handshake",
        Duration::from_secs(15),
        || {
            let st = m.status("u1").ok()?;
            (st["mesh"]["drops"]["handshake_failed"].as_u64()? >= 1).then_some(())
        },
    )?;
    // Garbage straight at e1's gossip port, from the intruder's namespace.
    let conns_before = m.status("e1")?["mesh"]["connections"].as_u64().unwrap_or(0);
    let sender = m.lab.in_ns(&d.ns, || {
        use std::io::Write as _;
        for junk in [
            &b"\x00\x05hello"[..],
            &[0xff; 300],
            b"GET / HTTP/1.1\r\n\r\n",
            b"",
        ] {
            let mut s = std::net::TcpStream::connect_timeout(
                &"198.19.0.1:6783".parse()?,
                Duration::from_secs(5),
            )?;
            s.write_all(junk)?;
        }
        Ok(())
    });
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    wait_for("e1 to count the garbage", Duration::from_secs(15), || {
        let st = m.status("e1").ok()?;
        (st["mesh"]["drops"]["handshake_failed"].as_u64()? >= 4).then_some(())
    })?;
    // Absence takes time to show: wait past the liveness timeout (6 s) before looking.
    std::thread::sleep(Duration::from_secs(8));
    for n in ALL {
        let st = m.status(n)?;
        let known = st["mesh"]["members"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            known.iter().all(|x| x["name"] != "x"),
            "{n} knows the intruder: {st}"
        );
        assert_eq!(alive_members(&st).len(), 3, "{n}: {st}");
        assert!(
            st["peers"]
                .as_array()
                .is_some_and(|p| p.iter().all(|p| p["name"] != "x"))
        );
    }
    assert!(m.status("e1")?["mesh"]["connections"].as_u64().unwrap_or(0) >= conns_before.min(1));
    let x = m.lab.status(&m.bin, &d)?;
    assert!(
        x["mesh"]["members"].as_array().is_some_and(Vec::is_empty),
        "the intruder learned: {x}"
    );
    // Its pod block routes nowhere, and it reaches no one.
    let out = m
        .lab
        .cmd(&d.ns, "ping")
        .args(["-c", "2", "-W", "1", "100.64.3.1"])
        .output()?;
    assert!(!out.status.success());
    m.wait_full_mesh(&ALL)?;
    Ok(())
}

#[test]
fn a_node_restarted_in_another_region_is_reached_at_the_right_addresses() -> anyhow::Result<()> {
    let mut m = MeshLab::start("mr", &FOUR)?;
    m.wait_full_mesh(&ALL)?;
    // e2 comes back labelled "us": e1 must now use its public address and WireGuard; u1 tries
    // its private address (unreachable from the us LAN) and falls back to the public one.
    assert!(m.lab.stop("e2", Duration::from_secs(10))?);
    let spec = FOUR[1].clone();
    let ns = m.daemon("e2").ns.clone();
    let d = m
        .lab
        .daemon("e2", &ns, &weft_tests::meshlab::config(&spec, "us"))?;
    m.lab.start(&m.bin, &d)?;
    let e2 = wait_for(
        "e1 to see e2 in another region",
        Duration::from_secs(20),
        || {
            m.peer("e1", "e2")
                .filter(|p| p["endpoint_reason"] == "other-region")
        },
    )?;
    assert_eq!(e2["endpoint"], "198.19.0.2:51820", "{e2}");
    assert_eq!(e2["path"], "encrypted");
    assert_eq!(e2["region"], "us");
    // Whichever side gives up on the private address first: u1 by falling back itself, or by
    // following e2's authenticated packets from its public address.
    let e2 = wait_for(
        "u1 to reach e2 at its public address",
        Duration::from_secs(40),
        || {
            m.peer("u1", "e2")
                .filter(|p| p["state"] == "up" && p["endpoint"] == "198.19.0.2:51820")
        },
    );
    let e2 = e2.map_err(|e| {
        let log = std::fs::read_to_string(&m.daemon("u1").log).unwrap_or_default();
        anyhow::anyhow!("{e}: u1 sees {:?}\nu1's log:\n{log}", m.peer("u1", "e2"))
    })?;
    let reason = e2["endpoint_reason"].as_str().unwrap_or("");
    assert!(["fallback", "learned"].contains(&reason), "{e2}");
    m.wait_full_mesh(&ALL)?;
    Ok(())
}

/// Every other node of FOUR pings `to`'s overlay address once; the ones that got no answer.
fn unreachable_from_others(m: &MeshLab, to: &Spec) -> Vec<String> {
    let addr = format!("100.64.{}.1", to.block.unwrap_or(0));
    FOUR.iter()
        .filter(|s| s.name != to.name)
        .filter(|s| ping(&m.lab, &m.daemon(s.name).ns, &addr, None).is_err())
        .map(|s| s.name.to_owned())
        .collect()
}

/// Rule (liveness across lives): a node restarted after a minute of uptime, by SIGTERM or by
/// kill -9, is reachable from every other node in every check from 5 s after its restart
/// through two liveness timeouts (a heartbeat counter compared across lives would leave it
/// down for about as long as it had been up).
#[test]
#[expect(
    clippy::disallowed_methods,
    reason = "the scenario is a minute of real uptime, probed on the real clock"
)]
fn a_node_restarted_after_a_minute_of_uptime_is_reachable_from_every_node_in_every_check()
-> anyhow::Result<()> {
    use std::time::Instant;
    let mut m = MeshLab::start("mu", &FOUR)?;
    m.wait_full_mesh(&ALL)?;
    // A minute of uptime, probed all along (one round a second).
    let up = Instant::now();
    for _ in 0..120 {
        if up.elapsed() >= Duration::from_secs(60) {
            break;
        }
        for s in &FOUR {
            let missed = unreachable_from_others(&m, s);
            anyhow::ensure!(
                missed.is_empty(),
                "{} unreachable from {missed:?} at {:?}",
                s.name,
                up.elapsed()
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let liveness = Duration::from_secs(6);
    for (victim, kill) in [(1usize, false), (2usize, true)] {
        let spec = &FOUR[victim];
        let d = m.daemon(spec.name).clone();
        if kill {
            m.lab.kill(spec.name)?;
        } else {
            anyhow::ensure!(
                m.lab.stop(spec.name, Duration::from_secs(10))?,
                "{} did not stop",
                spec.name
            );
        }
        m.lab.start(&m.bin, &d)?;
        let restarted = Instant::now();
        let how = if kill { "kill -9" } else { "SIGTERM" };
        let mut checks = 0;
        let mut failures = Vec::new();
        for _ in 0..200 {
            let t = restarted.elapsed();
            if t > Duration::from_secs(5) + 2 * liveness {
                break;
            }
            let missed = unreachable_from_others(&m, spec);
            if t >= Duration::from_secs(5) {
                checks += 1;
                if !missed.is_empty() {
                    failures.push((t, missed));
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        eprintln!(
            "{} after {how}: {checks} checks from 5 s to {:?}, failures {failures:?}",
            spec.name,
            Duration::from_secs(5) + 2 * liveness
        );
        anyhow::ensure!(checks >= 5, "only {checks} checks ran");
        anyhow::ensure!(
            failures.is_empty(),
            "{} restarted by {how} after {:?} of uptime was unreachable: {failures:?}",
            spec.name,
            up.elapsed()
        );
    }
    Ok(())
}
