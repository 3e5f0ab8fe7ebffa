//! Two weft nodes that list each other under `wireguard_peers`.

use std::time::Duration;

use weft_tests::{Pair, capture, pcap, tcp_transfer};

#[test]
fn ping_and_100_mb_tcp_arrive_intact_and_the_wire_carries_only_wireguard() -> anyhow::Result<()> {
    let mut p = Pair::start("tn")?;
    // Capture the underlay at a, and the overlay at b (where the marker must be visible).
    let (a_ns, b_ns) = (p.a.ns.clone(), p.b.ns.clone());
    let under = capture(&mut p.lab, "tcpdump-under", &a_ns, "eth0", &[])?;
    let over = capture(&mut p.lab, "tcpdump-over", &b_ns, "weft0", &[])?;

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
    anyhow::ensure!(
        weft::demo::lab::run(&mut ping).is_ok(),
        "marker ping failed"
    );

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

    // tcpdump writes what it has read; wait until it has caught up with the transfer.
    weft::demo::lab::wait_for(
        "the underlay capture to hold the transfer",
        Duration::from_secs(20),
        || {
            let n = std::fs::metadata(&under).ok()?.len();
            (n > 100 << 20).then_some(())
        },
    )?;
    weft::demo::lab::wait_for(
        "the overlay capture to hold the marker",
        Duration::from_secs(20),
        || {
            let f = std::fs::read(&over).ok()?;
            f.windows(16)
                .any(|w| w == &marker.as_bytes()[..16])
                .then_some(())
        },
    )?;
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

#[test]
fn a_restarted_daemon_keeps_its_key_and_leaves_no_device_or_route_behind() -> anyhow::Result<()> {
    let mut p = Pair::start("rs")?;
    p.ping(&p.a.ns, "100.64.2.1")?;
    let key_before = p.lab.status(&p.bin, &p.a)?["node"]["public_key"].clone();
    let key_file = std::fs::read(&p.a.key_file)?;

    anyhow::ensure!(
        p.lab.stop("a", Duration::from_secs(10))?,
        "weft did not exit 0 on SIGTERM"
    );
    let links = p.lab.ip(&p.a.ns, &["-o", "link", "show"])?;
    let links = String::from_utf8_lossy(&links.stdout);
    anyhow::ensure!(
        !links.contains("weft0"),
        "weft0 is still there after SIGTERM:\n{links}"
    );
    let routes = p.lab.ip(&p.a.ns, &["route", "show", "table", "all"])?;
    let routes = String::from_utf8_lossy(&routes.stdout);
    anyhow::ensure!(!routes.contains("100.64."), "routes left behind:\n{routes}");
    anyhow::ensure!(!p.a.socket.exists(), "API socket left behind");
    let log = std::fs::read_to_string(&p.a.log)?;
    anyhow::ensure!(
        log.contains("SIGTERM") && log.contains("weft stopped"),
        "log:\n{log}"
    );

    // b still thinks it has a session; a starts with fresh session indexes and a new handshake.
    let a = p.a.clone();
    p.lab.start(&p.bin, &a)?;
    assert_eq!(
        std::fs::read(&p.a.key_file)?,
        key_file,
        "the key file changed"
    );
    assert_eq!(
        p.lab.status(&p.bin, &p.a)?["node"]["public_key"],
        key_before
    );
    p.ping(&p.a.ns, "100.64.2.1")?;
    p.ping(&p.b.ns, "100.64.1.1")?;
    tcp_transfer(
        &p.lab,
        (&p.b.ns, &p.a.ns),
        "100.64.1.1:5002".parse()?,
        4 << 20,
        7,
    )?;
    Ok(())
}

#[test]
fn a_peer_sending_from_outside_its_allowed_ips_is_dropped_and_counted() -> anyhow::Result<()> {
    let p = Pair::start("sp")?;
    p.ping(&p.b.ns, "100.64.1.1")?;
    // b owns 100.64.2.0/24; give its host an address outside that and send from it. b's kernel
    // routes it into weft0, b's router encrypts it to a, and a must refuse it.
    p.lab
        .ip(&p.b.ns, &["addr", "add", "100.64.99.1/32", "dev", "lo"])?;
    let mut ping = p.lab.cmd(&p.b.ns, "ping");
    ping.args([
        "-c",
        "5",
        "-i",
        "0.2",
        "-W",
        "1",
        "-I",
        "100.64.99.1",
        "100.64.1.1",
    ]);
    let out = ping.output()?;
    anyhow::ensure!(!out.status.success(), "a spoofed ping got an answer");
    let spoofed =
        weft::demo::lab::wait_for("5 spoofed drops at a", Duration::from_secs(10), || {
            let st = p.lab.status(&p.bin, &p.a).ok()?;
            let n = st["peers"][0]["drops"]["spoofed"].as_u64()?;
            (n >= 5).then_some(n)
        })?;
    assert_eq!(spoofed, 5);
    // The honest address still works.
    p.ping(&p.b.ns, "100.64.1.1")?;
    Ok(())
}

#[test]
fn garbage_truncated_forged_and_replayed_datagrams_are_dropped_and_counted() -> anyhow::Result<()> {
    let mut p = Pair::start("ud")?;
    let a_ns = p.a.ns.clone();
    let cap = capture(
        &mut p.lab,
        "tcpdump",
        &a_ns,
        "eth0",
        &["udp", "port", "51820"],
    )?;
    p.ping(&p.b.ns, "100.64.1.1")?;
    // tcpdump writes what it has read; wait until the data message is in the file.
    let data = weft::demo::lab::wait_for(
        "a data message from b in the capture",
        Duration::from_secs(10),
        || {
            let dgrams = pcap::udp_datagrams(&std::fs::read(&cap).ok()?).ok()?;
            dgrams
                .into_iter()
                .find(|d| {
                    d.src.octets() == [198, 18, 1, 2]
                        && d.payload.first() == Some(&4)
                        && d.payload.len() > 32
                })
                .map(|d| d.payload)
        },
    )?;
    p.lab.stop("tcpdump", Duration::from_secs(5))?;
    let before = p.lab.status(&p.bin, &p.a)?;
    let rx_before = before["peers"][0]["rx_bytes"].as_u64().unwrap_or(0);

    let mut forged_init = vec![0u8; 148];
    forged_init[0] = 1;
    let mut flipped = data.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x80;
    flipped[9] ^= 0x10; // a counter far ahead, never seen, so the tag is what fails
    let sends: Vec<Vec<u8>> = vec![
        b"hello, are you a WireGuard server?".to_vec(),
        vec![],
        vec![0xff; 1400],
        data[..20].to_vec(), // truncated
        vec![4, 0, 0, 0],    // a data header alone
        forged_init,         // a handshake initiation with no valid MAC
        flipped,             // a data message that fails authentication
        data.clone(),        // replayed
        data.clone(),        // replayed again
    ];
    let sender = p.lab.in_ns(&p.b.ns, move || {
        let s = std::net::UdpSocket::bind("198.18.1.2:0")?;
        for d in &sends {
            s.send_to(d, "198.18.1.1:51820")?;
        }
        Ok(())
    });
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    let st = weft::demo::lab::wait_for("the drops to be counted", Duration::from_secs(10), || {
        let st = p.lab.status(&p.bin, &p.a).ok()?;
        let replay = st["peers"][0]["drops"]["replay"].as_u64().unwrap_or(0);
        (replay >= 2).then_some(st)
    })?;
    let drops = &st["drops"];
    let peer = &st["peers"][0];
    assert_eq!(drops["malformed"], 5, "{st}");
    assert_eq!(drops["unauthenticated"], 1, "{st}");
    assert_eq!(peer["drops"]["replay"], 2, "{st}");
    assert_eq!(peer["drops"]["unauthenticated"], 1, "{st}");
    assert_eq!(
        peer["rx_bytes"].as_u64().unwrap_or(0),
        rx_before,
        "a dropped datagram was counted as received"
    );
    anyhow::ensure!(p.lab.running("a"), "the daemon died");
    p.ping(&p.b.ns, "100.64.1.1")?;
    Ok(())
}

/// Two nodes started cleanly, that reach each other, log no warning and no error: an operator
/// reading the journal finds warnings only where there is something to act on. On Linux 6.18
/// this fails when netlink-packet-route's warnings about kernel attributes newer than it knows
/// are not held back (three at each start).
#[test]
fn a_clean_start_of_two_nodes_logs_no_warning() -> anyhow::Result<()> {
    let p = Pair::start("quiet")?;
    p.ping(&p.a.ns, "100.64.2.1")?;
    p.ping(&p.b.ns, "100.64.1.1")?;
    for d in [&p.a, &p.b] {
        let log = std::fs::read_to_string(&d.log)?;
        let loud: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        anyhow::ensure!(loud.is_empty(), "{} logged: {loud:#?}", d.name);
    }
    Ok(())
}
