//! Pod-CIDR claims in the lab: a member that claims the whole pod network, stamped as the
//! oldest claim of all, is refused by every honest node (not routed, shown in status with why,
//! counted), and the honest nodes keep routing each other's blocks. Run as root.

use std::time::Duration;

use anyhow::Context as _;
use weft::lab::wait_for;
use weft_tests::meshlab::{MeshLab, Spec};

const HONEST: [Spec; 2] = [
    Spec {
        name: "a",
        region: "eu",
        lan: 1,
        host: 1,
        block: Some(1),
        bootstrap: Some("198.18.1.2"),
    },
    Spec {
        name: "b",
        region: "eu",
        lan: 1,
        host: 2,
        block: Some(2),
        bootstrap: Some("198.18.1.1"),
    },
];

/// The liar: its own config allows it (a pool of /10), and its state file says it has held the
/// whole of the honest nodes' pool (100.64.0.0/16) since the epoch.
const LIAR: Spec = Spec {
    name: "x",
    region: "eu",
    lan: 1,
    host: 3,
    block: None,
    bootstrap: Some("198.18.1.1"),
};

#[test]
fn a_member_claiming_the_whole_pod_network_is_refused_and_honest_nodes_stay_routed()
-> anyhow::Result<()> {
    let mut m = MeshLab::start("cl", &HONEST)?;
    m.wait_full_mesh(&["a", "b"])?;

    let secret = m.secret.clone();
    let x = m.add_node(&LIAR, "eu", &secret)?;
    let config = std::fs::read_to_string(&x.config)?
        .replace(
            "private_address: 198.18.1.3\n",
            "private_address: 198.18.1.3\n  pod_cidr: 100.64.0.0/16\n",
        )
        .replace(weft_tests::meshlab::POOLS, "[100.64.0.0/10]");
    std::fs::write(&x.config, config)?;
    let state = x.config.parent().context("state dir")?.join("ipam.json");
    std::fs::write(
        &state,
        r#"{"version": 1, "blocks": [{"block": "100.64.0.0/16", "since": 0}]}"#,
    )?;
    m.lab.start(&m.bin, &x)?;
    m.daemons.push(x);

    for (me, other) in [("a", "b"), ("b", "a")] {
        // Once the liar's record has arrived, it is refused with why.
        let why = wait_for(
            &format!("{me} to learn the liar and refuse its claims"),
            Duration::from_secs(30),
            || {
                let st = m.status(me).ok()?;
                st["mesh"]["members"]
                    .as_array()?
                    .iter()
                    .find(|p| p["name"] == "x")?["claims_refused"]
                    .as_str()
                    .map(str::to_owned)
            },
        )?;
        assert!(
            why.contains("100.64.0.0/16") && why.contains("broader than a node block"),
            "{me}: {why}"
        );
        let st = m.status(me)?;
        assert!(
            st["mesh"]["rejected"]["claim_too_broad"].as_u64() >= Some(1),
            "{me}: {st}"
        );
        // Not routed at all, and the honest peer keeps its block.
        let peers = st["peers"].as_array().context("peers")?;
        assert!(
            peers.iter().all(|p| p["name"] != "x"),
            "{me} routes the liar: {st}"
        );
        let p = m.peer(me, other).context("the honest peer")?;
        let theirs = if other == "a" {
            "100.64.1.0/24"
        } else {
            "100.64.2.0/24"
        };
        assert_eq!(p["pod_cidrs"], serde_json::json!([theirs]), "{me}: {p}");
    }
    // Traffic between the honest nodes still flows, both ways.
    for (me, addr) in [("a", "100.64.2.1"), ("b", "100.64.1.1")] {
        weft_tests::ping(&m.lab, &m.daemon(me).ns, addr, None)
            .with_context(|| format!("{me} -> {addr}"))?;
    }
    Ok(())
}
