//! The gossip transport against an outsider on the LAN, with real daemons in namespaces: a
//! replayed first Noise message completes the handshake but never counts as a connection, and
//! sockets that never prove the secret are capped per source, so they cost honest nodes
//! nothing. The outsider holds a valid first message (as if captured on the wire) but not what
//! it takes to go further. Run as root.
#![allow(
    clippy::disallowed_methods,
    reason = "the outsider times the node's answers on the real clock"
)]

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use weft::demo::lab::wait_for;
use weft_tests::meshlab::{FOUR, MeshLab};

/// The gossip protocol's Noise parameters and prologue, restated (not imported) as an outsider
/// would learn them from the wire and the source.
const PATTERN: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
const PROLOGUE: &[u8] = b"weft mesh v1";

/// A first handshake message made with the cluster secret, length-prefixed as on the wire: what
/// an on-path observer captures when a real node dials.
fn captured_first_message(secret_b64: &str) -> anyhow::Result<Vec<u8>> {
    let secret = weft::host::keys::decode(secret_b64.trim(), "cluster secret")?;
    let mut hs = snow::Builder::new(PATTERN.parse()?)
        .prologue(PROLOGUE)
        .psk(0, &secret)
        .build_initiator()?;
    let mut msg = vec![0u8; 256];
    let n = hs.write_message(&[], &mut msg)?;
    let mut wire = u16::try_from(n)?.to_be_bytes().to_vec();
    wire.extend_from_slice(&msg[..n]);
    Ok(wire)
}

/// How one outsider connection went.
#[derive(Debug)]
struct Outcome {
    /// The node answered with its handshake message.
    answered: bool,
    /// When the node closed the connection, after it was opened.
    closed_after: Option<Duration>,
}

/// Opens `n` connections from the lab namespace `from` to `to`, sends `first` on each (nothing
/// when empty) and holds each until the node closes it (at most 10 s).
fn outsider(
    m: &MeshLab,
    from: &str,
    to: &'static str,
    first: Vec<u8>,
    n: usize,
) -> std::thread::JoinHandle<anyhow::Result<Vec<Outcome>>> {
    m.lab.in_ns(from, move || {
        let mut socks = Vec::new();
        for _ in 0..n {
            let mut s = TcpStream::connect(to)?;
            s.set_read_timeout(Some(Duration::from_millis(50)))?;
            if !first.is_empty() {
                s.write_all(&first)?;
            }
            socks.push((s, Instant::now(), Vec::new(), None));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && socks.iter().any(|(.., c)| c.is_none()) {
            for (s, opened, got, closed) in socks.iter_mut().filter(|(.., c)| c.is_none()) {
                let mut buf = [0u8; 512];
                match s.read(&mut buf) {
                    Ok(0) => *closed = Some(opened.elapsed()),
                    Ok(k) => got.extend_from_slice(&buf[..k]),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => *closed = Some(opened.elapsed()),
                }
            }
        }
        Ok(socks
            .into_iter()
            .map(|(_, _, got, closed)| Outcome {
                answered: got.len() >= 2 + 48,
                closed_after: closed,
            })
            .collect())
    })
}

fn transport_drop(m: &MeshLab, name: &str, key: &str) -> u64 {
    m.status(name)
        .ok()
        .and_then(|s| s["mesh"]["drops"][key].as_u64())
        .unwrap_or(0)
}

#[test]
fn a_replayed_first_message_completes_the_noise_handshake_but_never_counts_as_a_connection()
-> anyhow::Result<()> {
    let mut m = MeshLab::start("rp", &FOUR[..2])?;
    m.wait_full_mesh(&["e1", "e2"])?;
    let x = m.add_host("x", "198.18.1.9")?;
    let honest = m.status("e1")?["mesh"]["connections"]
        .as_u64()
        .context("connections")?;
    let first = captured_first_message(&m.secret)?;
    // Four at a time: the most one source may have proving the secret.
    let attack = outsider(&m, &x, "198.18.1.1:6783", first, 4);
    // While the replays are held open, e1 never counts more connections than before.
    let mut most = honest;
    while !attack.is_finished() {
        if let Some(c) = m
            .status("e1")
            .ok()
            .and_then(|s| s["mesh"]["connections"].as_u64())
        {
            most = most.max(c);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let outcomes = attack
        .join()
        .map_err(|_| anyhow::anyhow!("the outsider panicked"))??;
    eprintln!("replays: {outcomes:?}; e1's connections: {honest} before, at most {most} during");
    ensure!(
        outcomes.iter().all(|o| o.answered),
        "the replay no longer completes the Noise handshake, so this test shows nothing: {outcomes:?}"
    );
    ensure!(
        most <= honest,
        "e1 counted replayed connections: {most} > {honest}"
    );
    for o in &outcomes {
        let after = o
            .closed_after
            .context("e1 never closed a replayed connection")?;
        ensure!(
            after <= weft_mesh::driver::transport::HANDSHAKE_TIMEOUT + Duration::from_secs(2),
            "a replayed connection stayed {after:?}"
        );
    }
    wait_for(
        "e1 to count the unconfirmed connections",
        Duration::from_secs(5),
        || (transport_drop(&m, "e1", "unconfirmed") >= 4).then_some(()),
    )?;
    // Honest gossip is untouched.
    ensure!(
        m.peer("e1", "e2").is_some_and(|p| p["state"] == "up"),
        "e1 lost e2"
    );
    weft_tests::ping(&m.lab, &m.daemon("e1").ns, "100.64.2.1", None)?;
    Ok(())
}

#[test]
fn sockets_that_never_prove_the_secret_are_capped_per_source_and_honest_nodes_still_join()
-> anyhow::Result<()> {
    let mut m = MeshLab::start("pc", &FOUR[..2])?;
    m.wait_full_mesh(&["e1", "e2"])?;
    let x = m.add_host("x", "198.18.1.9")?;
    // Fifty silent sockets: four may wait out the handshake deadline, the rest are closed at
    // once and counted.
    let silent = outsider(&m, &x, "198.18.1.1:6783", Vec::new(), 50);
    // Meanwhile e2 restarts and must get back in.
    let d = m.daemon("e2").clone();
    ensure!(
        m.lab.stop("e2", Duration::from_secs(10))?,
        "e2 did not stop"
    );
    m.lab.start(&m.bin, &d)?;
    m.wait_full_mesh(&["e1", "e2"])?;
    let outcomes = silent
        .join()
        .map_err(|_| anyhow::anyhow!("the outsider panicked"))??;
    let at_once = outcomes
        .iter()
        .filter(|o| o.closed_after.is_some_and(|t| t < Duration::from_secs(1)))
        .count();
    let waited = outcomes
        .iter()
        .filter(|o| o.closed_after.is_some_and(|t| t >= Duration::from_secs(1)))
        .count();
    eprintln!("silent sockets: {at_once} closed at once, {waited} after the handshake deadline");
    ensure!(
        at_once >= 50 - weft_mesh::driver::PENDING_PER_SOURCE,
        "only {at_once} of 50 unproven sockets were refused at once"
    );
    ensure!(
        outcomes.iter().all(|o| o.closed_after.is_some()),
        "an unproven socket was held past the deadline"
    );
    ensure!(
        transport_drop(&m, "e1", "pending_refused")
            >= (50 - weft_mesh::driver::PENDING_PER_SOURCE) as u64,
        "the refusals are not counted: {}",
        m.status("e1")?["mesh"]["drops"]
    );
    weft_tests::ping(&m.lab, &m.daemon("e1").ns, "100.64.2.1", None)?;
    Ok(())
}
