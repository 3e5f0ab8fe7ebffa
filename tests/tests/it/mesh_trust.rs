//! The mesh's trust rules with real daemons in namespaces: a member (it holds the cluster
//! secret, so it may open gossip connections and send any frame) forging heartbeats for other
//! nodes neither marks a live node down nor keeps a dead one alive, and every node it reaches
//! counts the forgeries in `weft status --json` and in metrics; a second daemon started with a
//! node's key is reported on both sides. Run as root.
#![allow(
    clippy::disallowed_methods,
    reason = "the liar paces its rounds and the test times the fall on the real clock"
)]

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use weft::demo::lab::wait_for;
use weft_mesh::driver::transport::secure;
use weft_mesh::wire::MAX_FRAME;
use weft_mesh::{Beat, Entry, Frame, Identity, NodeId};
use weft_tests::meshlab::{FOUR, MeshLab, Spec};

const ALL: [&str; 4] = ["e1", "e2", "u1", "u2"];

/// Node `name`'s gossip id, from its key file.
fn node_id(m: &MeshLab, name: &str) -> anyhow::Result<NodeId> {
    let text = weft::host::keys::read_private(&m.daemon(name).key_file)?;
    let key = weft::host::keys::decode(text.trim(), "private key")?;
    Ok(Identity::from_wireguard_key(&key).id())
}

/// `of`'s record version as `at` holds it.
fn version(m: &MeshLab, at: &str, of: &str) -> anyhow::Result<u64> {
    m.status(at)?["mesh"]["members"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == of))
        .and_then(|x| x["version"].as_u64())
        .with_context(|| format!("{at} does not hold {of}"))
}

/// Whether `at` holds `of` alive.
fn alive(m: &MeshLab, at: &str, of: &str) -> Option<bool> {
    m.status(at).ok()?["mesh"]["members"]
        .as_array()?
        .iter()
        .find(|x| x["name"] == of)?["alive"]
        .as_bool()
}

#[test]
fn a_member_forging_beats_changes_no_nodes_liveness_and_is_counted_everywhere_it_reaches()
-> anyhow::Result<()> {
    let mut m = MeshLab::start("fb", &FOUR)?;
    m.wait_full_mesh(&ALL)?;
    let (victim, dead) = (node_id(&m, "e2")?, node_id(&m, "u2")?);
    let (victim_version, dead_version) = (version(&m, "e1", "e2")?, version(&m, "e1", "u2")?);
    let secret = weft::host::keys::decode(m.secret.trim(), "cluster secret")?;
    let x = m.add_host("x", "198.18.1.9")?;
    // u2 dies (no goodbye); the liar, a member, then claims every half second that e2's counter
    // is at its maximum and u2's keeps growing, unsigned and signed with its own key.
    m.lab.kill("u2")?;
    let killed = Instant::now();
    let liveness = Duration::from_secs(6);
    let rounds = 3 * 2 * 6;
    let liar = m.lab.in_ns(&x, move || -> anyhow::Result<usize> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let liar = Identity::from_wireguard_key(&[0x77; 32]);
            let stream = tokio::net::TcpStream::connect("198.18.1.1:6783").await?;
            let mut conn = secure(stream, &secret, true, MAX_FRAME).await?;
            let hello = Frame::Hello {
                node: liar.id(),
                mesh_port: 6783,
            };
            conn.writer.send(&hello.encode()).await?;
            let mut sent = 0;
            for round in 0..rounds {
                let unsigned = Frame::Beats(vec![
                    Entry {
                        node: victim.short(),
                        version: victim_version,
                        heartbeat: u32::MAX,
                    },
                    Entry {
                        node: dead.short(),
                        version: dead_version,
                        heartbeat: 1000 + round,
                    },
                ]);
                let signed_by_the_liar = Frame::SignedBeats(vec![
                    Beat {
                        node: victim.short(),
                        ..Beat::sign(&liar, victim_version, u32::MAX)
                    },
                    Beat {
                        node: dead.short(),
                        ..Beat::sign(&liar, dead_version, 1000 + round)
                    },
                ]);
                conn.writer.send(&unsigned.encode()).await?;
                conn.writer.send(&signed_by_the_liar.encode()).await?;
                sent += 2;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Ok(sent)
        })
    });
    // All along: e2 alive everywhere; u2 down everywhere once a liveness timeout (and a
    // round) has passed since its death.
    let mut down_at: Vec<(&str, Duration)> = Vec::new();
    while !liar.is_finished() {
        for n in ["e1", "u1"] {
            ensure!(
                alive(&m, n, "e2") != Some(false),
                "{n} marked e2 down {:?} into the forgery",
                killed.elapsed()
            );
            if alive(&m, n, "u2") == Some(false) && !down_at.iter().any(|(d, _)| *d == n) {
                down_at.push((n, killed.elapsed()));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let frames = liar
        .join()
        .map_err(|_| anyhow::anyhow!("the liar panicked"))??;
    eprintln!("{frames} forged frames; u2 down at {down_at:?} after its kill");
    for n in ["e1", "u1"] {
        let (_, t) = down_at.iter().find(|(d, _)| *d == n).with_context(|| {
            format!("{n} kept the dead u2 alive through {rounds} forged rounds")
        })?;
        ensure!(
            *t <= liveness + Duration::from_secs(4),
            "{n} marked u2 down only {t:?} after its death"
        );
        ensure!(alive(&m, n, "e2") == Some(true), "{n}: e2");
    }
    // Counted where they arrived, by reason, in status and in metrics.
    let st = m.status("e1")?;
    let rejected = &st["mesh"]["rejected"];
    ensure!(
        rejected["unsigned_beat"].as_u64().unwrap_or(0) >= 1
            && rejected["bad_beat"].as_u64().unwrap_or(0) >= 1,
        "e1's status: {rejected}"
    );
    let metrics = weft_tests::http_get(&m.lab, &m.daemon("e1").ns, "127.0.0.1:6782", "/metrics")?;
    for reason in ["unsigned_beat", "bad_beat"] {
        ensure!(
            metrics.contains(&format!("weft_mesh_rejected_total{{reason=\"{reason}\"}}")),
            "no weft_mesh_rejected_total for {reason}"
        );
    }
    weft_tests::ping(&m.lab, &m.daemon("e1").ns, "100.64.2.1", None)?;
    Ok(())
}

#[test]
fn a_second_daemon_with_a_nodes_key_is_reported_on_both_and_stops_outbidding() -> anyhow::Result<()>
{
    let mut m = MeshLab::start("dk", &FOUR[..2])?;
    m.wait_full_mesh(&["e1", "e2"])?;
    // A clone of e1 (a copied VM image): same key, another address.
    let clone = Spec {
        name: "c1",
        region: "eu",
        lan: 1,
        host: 3,
        block: Some(1),
        bootstrap: Some("198.18.1.2"),
    };
    let secret = m.secret.clone();
    let d = m.add_node(&clone, "eu", &secret)?;
    let key = weft::host::keys::read_private(&m.daemon("e1").key_file)?;
    weft::host::keys::write_private(&d.key_file, key)?;
    m.lab.start(&m.bin, &d)?;
    m.daemons.push(d);
    // Both daemons report the clash, naming both addresses.
    for n in ["e1", "c1"] {
        let clash = wait_for(
            &format!("{n} to report the identity clash"),
            Duration::from_secs(30),
            || {
                let c = m.status(n).ok()?["mesh"]["identity_clash"].clone();
                c.as_str().map(str::to_owned)
            },
        )?;
        ensure!(
            clash.contains("198.18.1.1") && clash.contains("198.18.1.3"),
            "{n}'s report does not name both addresses: {clash}"
        );
    }
    // The war stops: e2 sees the shared identity's record settle (no new version over two
    // liveness timeouts), whichever daemon's it is.
    let id = m.status("e1")?["mesh"]["node_id"].clone();
    let held = |m: &MeshLab| -> anyhow::Result<(u64, String)> {
        let st = m.status("e2")?;
        let x = st["mesh"]["members"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["node_id"] == id))
            .with_context(|| format!("e2 does not hold {id}: {}", st["mesh"]))?;
        Ok((
            x["version"].as_u64().context("version")?,
            x["name"].as_str().unwrap_or("").to_owned(),
        ))
    };
    let settled = held(&m)?;
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        let now = held(&m)?;
        ensure!(
            now == settled,
            "the record of {id} still changes at e2: {settled:?} -> {now:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("e2 holds {id} as {settled:?} throughout");
    let metrics = weft_tests::http_get(&m.lab, &m.daemon("e1").ns, "127.0.0.1:6782", "/metrics")?;
    ensure!(
        metrics.contains("weft_mesh_rejected_total{reason=\"identity_clash\"}"),
        "the clash is not counted in e1's metrics"
    );
    Ok(())
}
