//! IPAM in the lab: six standalone nodes with no static blocks claim distinct IPv4 and IPv6
//! blocks from a dual-stack pool, reach each other's overlay addresses in both families, keep
//! their blocks across a restart, and a block handed out on both sides of a partition ends
//! with one owner after it heals, traffic flowing. Run as root.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use ipnet::IpNet;
use weft::demo::lab::wait_for;
use weft_ipam::{Pool, choose, overlaps};
use weft_mesh::Identity;
use weft_tests::meshlab::{MeshLab, Spec};

const fn node(name: &'static str, lan: u8, host: u8, bootstrap: &'static str) -> Spec {
    Spec {
        name,
        region: if lan == 1 { "eu" } else { "us" },
        lan,
        host,
        block: None,
        bootstrap: Some(bootstrap),
    }
}

/// Three nodes per region, none with a static block.
const SIX: [Spec; 6] = [
    node("e1", 1, 1, "198.18.1.2"),
    node("e2", 1, 2, "198.18.1.1"),
    node("e3", 1, 3, "198.18.1.1"),
    node("u1", 2, 1, "198.19.0.1"),
    node("u2", 2, 2, "198.18.2.1"),
    node("u3", 2, 3, "198.18.2.1"),
];
const NAMES: [&str; 6] = ["e1", "e2", "e3", "u1", "u2", "u3"];

/// Waits until every node in `names` holds one block per family, and returns them by node.
fn settled_blocks(m: &MeshLab, names: &[&str]) -> anyhow::Result<Vec<(String, Vec<IpNet>)>> {
    let all = wait_for(
        "every node to hold an IPv4 and an IPv6 block, disjoint from every other's",
        Duration::from_secs(40),
        || {
            let all: Vec<(String, Vec<IpNet>)> = names
                .iter()
                .map(|n| Ok(((*n).to_owned(), m.blocks(n)?)))
                .collect::<anyhow::Result<_>>()
                .ok()?;
            let flat: Vec<IpNet> = all.iter().flat_map(|(_, b)| b.iter().copied()).collect();
            let each = all
                .iter()
                .all(|(_, b)| b.len() == 2 && b.iter().filter(|x| x.addr().is_ipv4()).count() == 1);
            let disjoint = flat
                .iter()
                .enumerate()
                .all(|(i, a)| flat[i + 1..].iter().all(|b| !overlaps(a, b)));
            (each && disjoint).then_some(all)
        },
    )?;
    for (n, blocks) in &all {
        for b in blocks {
            let ok = match b {
                IpNet::V4(v) => {
                    v.prefix_len() == 24 && "100.64.0.0/20".parse::<IpNet>()?.contains(b)
                }
                IpNet::V6(v) => {
                    v.prefix_len() == 64 && "fd00:64::/48".parse::<IpNet>()?.contains(b)
                }
            };
            ensure!(ok, "{n}'s block {b} is not a node block of the pool");
        }
    }
    Ok(all)
}

/// Every node's status routes each peer's blocks, exactly the blocks that peer holds.
fn routes_match(m: &MeshLab, names: &[&str]) -> anyhow::Result<()> {
    for a in names {
        let st = m.status(a)?;
        for b in names.iter().filter(|b| *b != a) {
            let peer = st["peers"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["name"] == *b))
                .with_context(|| format!("{a} has no peer {b}"))?;
            let mut routed: Vec<String> = peer["pod_cidrs"]
                .as_array()
                .context("pod_cidrs")?
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect();
            let mut held: Vec<String> = m.blocks(b)?.iter().map(ToString::to_string).collect();
            routed.sort();
            held.sort();
            ensure!(
                routed == held,
                "{a} routes {routed:?} to {b}, which holds {held:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn six_nodes_without_static_blocks_get_distinct_dual_stack_blocks_and_keep_them_across_a_restart()
-> anyhow::Result<()> {
    let mut m = MeshLab::start("ip6", &SIX)?;
    let blocks = settled_blocks(&m, &NAMES)?;
    eprintln!("blocks: {blocks:?}");
    m.wait_full_mesh(&NAMES)?;
    routes_match(&m, &NAMES)?;

    let before = m.blocks("u2")?;
    let d = m.daemon("u2").clone();
    ensure!(
        m.lab.stop("u2", Duration::from_secs(10))?,
        "u2 did not stop cleanly"
    );
    m.lab.start(&m.bin, &d)?;
    ensure!(
        m.blocks("u2")? == before,
        "u2 came back with {:?}, not {before:?}",
        m.blocks("u2")?
    );
    // Still the same a while later (it does not re-claim once the mesh answers), and reachable.
    m.wait_full_mesh(&NAMES)?;
    ensure!(
        m.blocks("u2")? == before,
        "u2 moved to {:?}",
        m.blocks("u2")?
    );
    let log = std::fs::read_to_string(&d.log)?;
    ensure!(!log.contains("re-claimed"), "u2 re-claimed:\n{log}");
    Ok(())
}

/// Two private keys whose nodes, seeing `taken`, pick the same IPv4 block; and that block.
fn colliding_keys(taken: &[IpNet]) -> anyhow::Result<([u8; 32], [u8; 32], IpNet)> {
    let pool = Pool::new("100.64.0.0/20".parse()?, 24)?;
    let mut seen: Vec<([u8; 32], IpNet)> = Vec::new();
    for _ in 0..200 {
        let k = weft::host::keys::generate().to_bytes();
        let pick = choose(&pool, taken, &Identity::from_wireguard_key(&k).id().0)?;
        if let Some((other, _)) = seen.iter().find(|(_, p)| *p == pick) {
            return Ok((*other, k, pick));
        }
        seen.push((k, pick));
    }
    anyhow::bail!("no two of 200 keys pick the same of 10 free blocks")
}

#[test]
fn a_block_handed_out_on_both_sides_of_a_partition_has_one_owner_after_the_heal()
-> anyhow::Result<()> {
    let mut m = MeshLab::start("ipp", &SIX)?;
    let blocks = settled_blocks(&m, &NAMES)?;
    let taken: Vec<IpNet> = blocks.iter().flat_map(|(_, b)| b.iter().copied()).collect();
    let (ka, kb, contested) = colliding_keys(&taken)?;

    // The regions lose each other: only the shared "internet" joined them.
    m.lab.ip(&m.switch, &["link", "set", "inet", "down"])?;
    let secret = m.secret.clone();
    let ga = m.add_node(&node("g1", 1, 4, "198.18.1.1"), "eu", &secret)?;
    let gb = m.add_node(&node("g2", 2, 4, "198.18.2.1"), "us", &secret)?;
    weft::host::keys::create(&ga.key_file, &ka)?;
    weft::host::keys::create(&gb.key_file, &kb)?;
    m.lab.start(&m.bin, &ga)?;
    m.lab.start(&m.bin, &gb)?;
    m.daemons.push(ga.clone());
    m.daemons.push(gb.clone());
    let v4 = |m: &MeshLab, n: &str| -> Option<IpNet> {
        m.blocks(n).ok()?.into_iter().find(|b| b.addr().is_ipv4())
    };
    wait_for(
        "both newcomers to claim an IPv4 block",
        Duration::from_secs(30),
        || Some(()).filter(|()| v4(&m, "g1").is_some() && v4(&m, "g2").is_some()),
    )?;
    ensure!(
        v4(&m, "g1") == Some(contested) && v4(&m, "g2") == Some(contested),
        "the newcomers were to pick {contested} on both sides: g1 {:?}, g2 {:?}",
        v4(&m, "g1"),
        v4(&m, "g2")
    );

    m.lab.ip(&m.switch, &["link", "set", "inet", "up"])?;
    let all: Vec<&str> = NAMES.iter().copied().chain(["g1", "g2"]).collect();
    let after = settled_blocks(&m, &all)?;
    eprintln!("after the heal: {after:?}");
    let (a, b) = (v4(&m, "g1"), v4(&m, "g2"));
    let (winner, loser) = match (a == Some(contested), b == Some(contested)) {
        (true, false) => ("g1", &gb),
        (false, true) => ("g2", &ga),
        _ => anyhow::bail!("expected one newcomer to keep {contested}: g1 {a:?}, g2 {b:?}"),
    };
    let log = std::fs::read_to_string(&loser.log)?;
    ensure!(
        log.contains("re-claimed") && log.contains(&contested.to_string()) && log.contains(winner),
        "{} logged no re-claim of {contested} naming {winner}:\n{log}",
        loser.name
    );
    // The six old nodes kept theirs.
    for (n, b) in &blocks {
        ensure!(
            m.blocks(n)? == *b,
            "{n} moved from {b:?} to {:?}",
            m.blocks(n)?
        );
    }
    m.wait_full_mesh(&all)?;
    routes_match(&m, &all)?;
    Ok(())
}

#[test]
fn two_nodes_with_the_same_static_block_both_report_it_and_the_older_keeps_it() -> anyhow::Result<()>
{
    let spec = |name, lan, host, block, bootstrap| Spec {
        name,
        region: if lan == 1 { "eu" } else { "us" },
        lan,
        host,
        block: Some(block),
        bootstrap: Some(bootstrap),
    };
    // e1 starts first, so its claim on 100.64.1.0/24 is the older one.
    let m = MeshLab::start(
        "ips",
        &[
            spec("e1", 1, 1, 1, "198.18.1.2"),
            spec("e2", 1, 2, 1, "198.18.1.1"),
            spec("u1", 2, 1, 3, "198.19.0.1"),
        ],
    )?;
    let block = "100.64.1.0/24";
    let routed_to = |m: &MeshLab| -> Option<Vec<String>> {
        let st = m.status("u1").ok()?;
        let owners: Vec<String> = st["peers"]
            .as_array()?
            .iter()
            .filter(|p| {
                p["pod_cidrs"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c == block))
            })
            .filter_map(|p| p["name"].as_str().map(str::to_owned))
            .collect();
        Some(owners)
    };
    wait_for(
        "u1 to route the contested block to e1 alone",
        Duration::from_secs(30),
        || routed_to(&m).filter(|o| o == &["e1"]),
    )?;
    let log_of = |n: &str| std::fs::read_to_string(&m.daemon(n).log).unwrap_or_default();
    wait_for(
        "both owners to report the conflict",
        Duration::from_secs(20),
        || {
            let (l1, l2) = (log_of("e1"), log_of("e2"));
            let older = l1.contains("overlapping our node.pod_cidr") && l1.contains("e2");
            let younger = l2
                .contains("node.pod_cidr overlaps a block another node claimed earlier")
                && l2.contains("e1");
            (older && younger).then_some(())
        },
    )?;
    // Both keep their configured block; traffic to it goes to the older holder.
    ensure!(m.blocks("e2")? == vec![block.parse::<IpNet>()?]);
    weft_tests::ping(&m.lab, &m.daemon("u1").ns, "100.64.1.1", None)?;
    ensure!(routed_to(&m) == Some(vec!["e1".to_owned()]));
    Ok(())
}

#[test]
fn a_corrupt_state_file_stops_the_start_naming_the_file_until_reset_state() -> anyhow::Result<()> {
    let alone = Spec {
        bootstrap: None,
        ..node("c1", 1, 1, "")
    };
    let mut m = MeshLab::start("ipc", &[alone])?;
    let held = settled_blocks(&m, &["c1"])?;
    let d = m.daemon("c1").clone();
    ensure!(
        m.lab.stop("c1", Duration::from_secs(10))?,
        "c1 did not stop cleanly"
    );
    let state = d.config.with_file_name("ipam.json");
    let saved = std::fs::read_to_string(&state)?;
    ensure!(
        saved.contains(&held[0].1[0].to_string()),
        "{state:?} lacks the block:\n{saved}"
    );

    let garbage = "{\"version\": 1, \"blocks\": [";
    std::fs::write(&state, garbage)?;
    let links_before = m.lab.ip(&d.ns, &["-o", "link", "show"])?.stdout;
    let err = m
        .lab
        .start(&m.bin, &d)
        .expect_err("started on a corrupt state file");
    let err = format!("{err:#}");
    ensure!(
        err.contains(&state.display().to_string()) && err.contains("--reset-state"),
        "the error names neither the file nor --reset-state:\n{err}"
    );
    ensure!(!err.contains("panicked"), "{err}");
    ensure!(
        std::fs::read_to_string(&state)? == garbage,
        "the state file was changed"
    );
    ensure!(
        m.lab.ip(&d.ns, &["-o", "link", "show"])?.stdout == links_before,
        "the namespace changed"
    );

    m.lab.start_with(&m.bin, &d, &["--reset-state"], &[])?;
    let fresh = settled_blocks(&m, &["c1"])?;
    let text = std::fs::read_to_string(&state)?;
    let snap = weft_ipam::Snapshot::from_json(&text)?;
    let mut saved: Vec<IpNet> = snap.blocks.iter().map(|b| b.block).collect();
    let mut now = fresh[0].1.clone();
    saved.sort();
    now.sort();
    ensure!(saved == now, "state file {saved:?} but status {now:?}");
    let log = std::fs::read_to_string(&d.log)?;
    ensure!(
        log.contains("--reset-state"),
        "no warning that the state was reset:\n{log}"
    );
    Ok(())
}

/// A block claimed after two nodes met changes the peer's prefixes in place: the WireGuard
/// session that was up stays (no peer withdrawn and added back, no new handshake). A fresh
/// session there cost a node behind NAT its only session with the member that tells it its
/// mapping, when that member pointed the fresh one at the node's LAN address.
#[test]
fn a_block_claimed_after_the_nodes_met_keeps_their_sessions() -> anyhow::Result<()> {
    // Two regions: an encrypted path, over the internet addresses.
    const TWO: [Spec; 2] = [
        node("e1", 1, 1, "198.19.0.11"),
        node("u1", 2, 1, "198.19.0.1"),
    ];
    let m = MeshLab::start("ipk", &TWO)?;
    settled_blocks(&m, &["e1", "u1"])?;
    m.wait_full_mesh(&["e1", "u1"])?;
    for (me, peer) in [("e1", "u1"), ("u1", "e1")] {
        let log = std::fs::read_to_string(&m.daemon(me).log)?;
        let at = |needle: &str, field: &str| -> Vec<usize> {
            log.lines()
                .enumerate()
                .filter(|(_, l)| l.contains(needle) && l.contains(&format!("{field}={peer}")))
                .map(|(i, _)| i)
                .collect()
        };
        let routed = at("peer routed", "peer");
        let kept = at("peer's prefixes changed, session kept", "peer");
        let withdrawn = at("peer withdrawn", "peer");
        // The router's own line, one per handshake completed with the peer.
        let handshakes = at("weft_router::router: handshake completed", "name");
        ensure!(
            routed.len() == 1 && withdrawn.is_empty(),
            "{me} replaced its peer {peer}:\n{log}"
        );
        let (Some(&change), Some(&first)) = (kept.first(), handshakes.first()) else {
            anyhow::bail!("{me}: no handshake with {peer}, or no prefix change kept:\n{log}");
        };
        ensure!(
            first < change && handshakes.iter().all(|&h| h < change),
            "{me}'s session with {peer} was not up before the claim, or a new one followed it:\n{log}"
        );
    }
    Ok(())
}
