//! Two weft nodes that list each other under `wireguard_peers`.

use std::time::Duration;

use weft_tests::{Pair, pcap, tcp_transfer};

#[test]
fn ping_and_100_mb_tcp_arrive_intact_and_the_wire_carries_only_wireguard() -> anyhow::Result<()> {
    let mut p = Pair::start("tn")?;
    // Capture the underlay at a, and the overlay at b (where the marker must be visible).
    let under = p.lab.dir.join("underlay.pcap");
    let over = p.lab.dir.join("overlay.pcap");
    for (name, ns, dev, file) in [
        ("tcpdump-under", p.a.ns.clone(), "eth0", &under),
        ("tcpdump-over", p.b.ns.clone(), "weft0", &over),
    ] {
        let log = p.lab.dir.join(format!("{name}.log"));
        let mut cmd = p.lab.cmd(&ns, "tcpdump");
        cmd.args(["-i", dev, "-U", "-n", "-s", "0", "-w"]).arg(file);
        p.lab.spawn(name, cmd, Some(&log))?;
        weft::lab::wait_for(
            &format!("{name} to listen"),
            Duration::from_secs(10),
            || {
                std::fs::read_to_string(&log)
                    .ok()
                    .filter(|l| l.contains("listening on"))
            },
        )?;
    }

    p.ping(&p.a.ns, "100.64.2.1")?;
    p.ping(&p.b.ns, "100.64.1.1")?;
    let marker = "WEFT-MARKER-7f3a9c-never-on-the-wire";
    let mut ping = p.lab.cmd(&p.a.ns, "ping");
    let hex: String = marker
        .bytes()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    ping.args(["-c", "3", "-i", "0.2", "-p", &hex, "100.64.2.1"]);
    anyhow::ensure!(weft::lab::run(&mut ping).is_ok(), "marker ping failed");

    let took = tcp_transfer(
        &p.lab,
        (&p.a.ns, &p.b.ns),
        "100.64.2.1:5001".parse()?,
        100 << 20,
        42,
    )?;
    eprintln!(
        "100 MB a -> b through weft in {took:?} ({:.0} Mbit/s)",
        800.0 / took.as_secs_f64()
    );

    p.lab.stop("tcpdump-under", Duration::from_secs(5))?;
    p.lab.stop("tcpdump-over", Duration::from_secs(5))?;
    let under = std::fs::read(&under)?;
    let over = std::fs::read(&over)?;
    let dgrams = pcap::udp_datagrams(&under)?;
    let to_weft: Vec<_> = dgrams
        .iter()
        .filter(|d| d.src_port == 51820 || d.dst_port == 51820)
        .collect();
    anyhow::ensure!(
        to_weft.len() > 1000,
        "only {} datagrams captured",
        to_weft.len()
    );
    for d in &to_weft {
        anyhow::ensure!(
            pcap::is_wireguard(&d.payload),
            "not a WireGuard message: {:02x?}",
            &d.payload[..d.payload.len().min(32)]
        );
    }
    anyhow::ensure!(
        dgrams.len() == to_weft.len(),
        "UDP other than weft's on the underlay"
    );
    let needle = &marker.as_bytes()[..16];
    anyhow::ensure!(
        over.windows(16).any(|w| w == needle),
        "the marker is not in the overlay capture: the check would be vacuous"
    );
    anyhow::ensure!(
        !under.windows(16).any(|w| w == needle),
        "the marker appeared on the underlay"
    );

    let st = p.lab.status(&p.bin, &p.a)?;
    let peer = &st["peers"][0];
    assert_eq!(peer["name"], "b");
    assert_eq!(peer["state"], "up");
    assert_eq!(peer["path"], "encrypted");
    assert_eq!(peer["endpoint"], "198.18.1.2:51820");
    assert_eq!(peer["endpoint_reason"], "configured");
    assert!(peer["tx_bytes"].as_u64().unwrap_or(0) > 100 << 20, "{peer}");
    assert!(peer["last_handshake_secs"].is_u64(), "{peer}");
    assert_eq!(st["node"]["pod_cidrs"][0], "100.64.1.0/24");
    Ok(())
}
