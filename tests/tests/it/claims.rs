//! Pod-CIDR claims in the lab: a member that claims the whole pod network, stamped as the
//! oldest claim of all, or another node's block with a back-dated time, is refused by every
//! honest node (not routed, shown in status with why, counted), and the honest nodes keep
//! routing each other's blocks. Run as root.

use std::time::Duration;

use anyhow::Context as _;
use weft::demo::lab::wait_for;
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

/// The liar: its own config allows it (a pool of /10 in /16 node blocks), and its state file says it has held the
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
        .replace(
            weft_tests::meshlab::POOLS,
            "[100.64.0.0/10]\n  node_cidr_mask_size: 16",
        );
    std::fs::write(&x.config, config)?;
    let state = x.config.parent().context("state dir")?.join("ipam.json");
    std::fs::write(
        &state,
        r#"{"version": 1, "blocks": [{"block": "100.64.0.0/16", "since": 0}]}"#,
    )?;
    m.lab.start(&m.bin, &x)?;
    m.daemons.push(x);

    for (me, other) in [("a", "b"), ("b", "a")] {
        // Once the liar's record has arrived, it is refused with why, counted, not routed.
        assert_refused(
            &m,
            me,
            &["100.64.0.0/16", "broader than a node block"],
            "claim_too_broad",
        )?;
        // The honest peer keeps its block.
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

/// Waits until node `me` refuses the liar `x`'s claims, then checks that why names each of
/// `needles`, that the refusal is counted under `counter`, and that `me` does not route `x`.
fn assert_refused(m: &MeshLab, me: &str, needles: &[&str], counter: &str) -> anyhow::Result<()> {
    assert_refused_member(m, me, "x", needles, counter)
}

/// `me` refuses `who`'s claims: with why (each of `needles`), counted as `counter`, not routed.
fn assert_refused_member(
    m: &MeshLab,
    me: &str,
    who: &str,
    needles: &[&str],
    counter: &str,
) -> anyhow::Result<()> {
    let why = wait_for(
        &format!("{me} to refuse {who}'s claims"),
        Duration::from_secs(30),
        || {
            let st = m.status(me).ok()?;
            st["mesh"]["members"]
                .as_array()?
                .iter()
                .find(|p| p["name"] == who)?["claims_refused"]
                .as_str()
                .map(str::to_owned)
        },
    )?;
    assert!(needles.iter().all(|n| why.contains(n)), "{me}: {why}");
    let st = m.status(me)?;
    assert!(
        st["mesh"]["rejected"][counter].as_u64() >= Some(1),
        "{me}: {st}"
    );
    let peers = st["peers"].as_array().context("peers")?;
    assert!(
        peers.iter().all(|p| p["name"] != who),
        "{me} routes {who}: {st}"
    );
    Ok(())
}

#[test]
fn a_member_back_dating_a_claim_on_another_nodes_block_is_refused_and_the_owner_keeps_it()
-> anyhow::Result<()> {
    let mut m = MeshLab::start("cbd", &HONEST)?;
    m.wait_full_mesh(&["a", "b"])?;

    // The liar joins honestly: it claims a free block of the honest nodes' IPv4 pool and is
    // routed. It republishes its record every second.
    let secret = m.secret.clone();
    let x = m.add_node(&LIAR, "eu", &secret)?;
    let config = std::fs::read_to_string(&x.config)?
        .replace(weft_tests::meshlab::POOLS, "[100.64.0.0/20]")
        .replace("mesh:\n", "mesh:\n  record_refresh: 1s\n");
    std::fs::write(&x.config, config)?;
    m.lab.start(&m.bin, &x)?;
    m.daemons.push(x.clone());
    m.wait_full_mesh(&["a", "b", "x"])?;
    let own = m.blocks("x")?;
    assert!(
        !own.iter().any(|b| b.to_string() == "100.64.2.0/24"),
        "x: {own:?}"
    );
    // Unchanged, its record still comes in new versions stamped with its clock: a recent
    // statement of what it holds.
    let version = |m: &MeshLab| -> Option<u64> {
        let st = m.status("a").ok()?;
        st["mesh"]["members"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == "x")?["version"]
            .as_u64()
    };
    let first = version(&m).context("a knows x's version")?;
    let later = wait_for(
        "x's record to be republished twice",
        Duration::from_secs(20),
        || version(&m).filter(|v| *v >= first + 2000),
    )?;
    assert_eq!(m.blocks("x")?, own, "republished unchanged");
    let wall = weft::control::now_millis();
    assert!(
        later <= wall && later + 20_000 >= wall,
        "x's version {later} is its clock ({wall})"
    );

    // Then it comes back saying it has held b's block since one second after the epoch, older
    // than b's claim: by the older-claim rule alone, every node would route b's pods to it.
    assert!(m.lab.stop("x", Duration::from_secs(10))?, "x stops cleanly");
    let state = x.config.parent().context("state dir")?.join("ipam.json");
    std::fs::write(
        &state,
        r#"{"version": 1, "blocks": [{"block": "100.64.2.0/24", "since": 1000}]}"#,
    )?;
    m.lab.start(&m.bin, &x)?;

    for me in ["a", "b"] {
        assert_refused(&m, me, &["100.64.2.0/24", "back-dated"], "claim_backdated")?;
    }
    // b keeps its block, a routes it to b, and traffic flows.
    assert_eq!(m.blocks("b")?, ["100.64.2.0/24".parse::<ipnet::IpNet>()?]);
    let p = m.peer("a", "b").context("a's peer b")?;
    assert_eq!(p["pod_cidrs"], serde_json::json!(["100.64.2.0/24"]), "{p}");
    weft_tests::ping(&m.lab, &m.daemon("a").ns, "100.64.2.1", None).context("a -> b's pod")?;

    // b restarts (a rolling update): its saved claim history still shows the lie, so it
    // refuses x again as soon as it relearns it, and keeps its block.
    let b = m.daemon("b").clone();
    assert!(m.lab.stop("b", Duration::from_secs(10))?, "b stops cleanly");
    assert!(
        b.config.with_file_name("claims.json").exists(),
        "b saved its claim history"
    );
    m.lab.start(&m.bin, &b)?;
    assert_refused(&m, "b", &["100.64.2.0/24", "back-dated"], "claim_backdated")?;
    assert_eq!(m.blocks("b")?, ["100.64.2.0/24".parse::<ipnet::IpNet>()?]);
    weft_tests::ping(&m.lab, &m.daemon("a").ns, "100.64.2.1", None)
        .context("a -> b's pod after b's restart")?;
    Ok(())
}

/// Runs `weft` with `args`, `input` on its standard input; its standard output, trimmed.
fn weft_cli(m: &MeshLab, args: &[&str], input: &str) -> anyhow::Result<String> {
    let out = weft_tests::output_with_input(std::process::Command::new(&m.bin).args(args), input)?;
    anyhow::ensure!(
        out.status.success(),
        "weft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// The cluster's authority, made with the CLI: its key file and public key.
struct Ca {
    key: std::path::PathBuf,
    public: String,
}

impl Ca {
    fn new(m: &MeshLab) -> anyhow::Result<Self> {
        let key = m.lab.dir.join("authority.key");
        weft::host::keys::write_private(&key, weft_cli(m, &["authority", "genkey"], "")?)?;
        let public = weft_cli(m, &["authority", "pubkey"], &std::fs::read_to_string(&key)?)?;
        Ok(Self { key, public })
    }

    /// Adds and starts a node of `spec` (its static block left out) with a certificate for
    /// `block`, signed now, for a day.
    fn add_node(&self, m: &mut MeshLab, spec: &Spec, block: &str) -> anyhow::Result<()> {
        self.add_node_with(m, spec, |m, node_key| self.sign(m, node_key, block))
    }

    /// A certificate (its file's text) for `block` to `node_key`, signed now with the CLI,
    /// for a day.
    fn sign(&self, m: &MeshLab, node_key: &str, block: &str) -> anyhow::Result<String> {
        let ca = self.key.to_string_lossy();
        let sign = ["authority", "sign", "--key", &ca, "--node-key", node_key];
        weft_cli(
            m,
            &[&sign[..], &["--pod-cidr", block, "--days", "1"]].concat(),
            "",
        )
    }

    /// Adds and starts a node of `spec` (its static block left out) with the certificate
    /// `cert` makes for its WireGuard key.
    fn add_node_with(
        &self,
        m: &mut MeshLab,
        spec: &Spec,
        cert: impl FnOnce(&MeshLab, &str) -> anyhow::Result<String>,
    ) -> anyhow::Result<()> {
        let spec = Spec {
            block: None,
            ..*spec
        };
        let secret = m.secret.clone();
        let d = m.add_node(&spec, "eu", &secret)?;
        let node_key = weft_tests::make_key(&d)?;
        let cert = cert(m, &node_key)?;
        let cert_file = d.config.with_file_name("node.cert");
        std::fs::write(&cert_file, cert)?;
        let config = std::fs::read_to_string(&d.config)?.replace(
            "mesh:\n",
            &format!(
                "mesh:\n  authority: {}\n  certificate: {}\n",
                self.public,
                cert_file.display()
            ),
        );
        std::fs::write(&d.config, config)?;
        m.lab.start(&m.bin, &d)?;
        m.daemons.push(d);
        Ok(())
    }
}

/// With `mesh.authority`, what the back-dating rule cannot catch is refused too: a fresh
/// identity (anyone with the cluster secret can make one) first seen with a claim on another
/// node's block older than the owner's. Without an authority it is believed, as the other side
/// of a healed partition must be; with one, it has no certificate naming that block. The
/// certified nodes claim the blocks their certificates name, keep them, route each other, and
/// a SIGHUP reload (which reads the certificate again) changes nothing.
#[test]
fn with_an_authority_a_fresh_identity_with_an_older_claim_on_a_block_is_refused()
-> anyhow::Result<()> {
    let mut m = MeshLab::empty("cau", &["lan1", "lan2", "inet"])?;
    let ca = Ca::new(&m)?;
    for (spec, block) in [(&HONEST[0], "100.64.1.0/24"), (&HONEST[1], "100.64.2.0/24")] {
        ca.add_node(&mut m, spec, block)?;
    }
    let secret = m.secret.clone();
    m.wait_full_mesh(&["a", "b"]).with_context(|| {
        let log = |n: &str| std::fs::read_to_string(&m.daemon(n).log).unwrap_or_default();
        format!("a's log:\n{}\nb's log:\n{}", log("a"), log("b"))
    })?;
    assert_eq!(m.blocks("a")?, ["100.64.1.0/24".parse::<ipnet::IpNet>()?]);
    assert_eq!(m.blocks("b")?, ["100.64.2.0/24".parse::<ipnet::IpNet>()?]);
    // Status shows until when the certificate holds (a day from now).
    let until = m.status("a")?["node"]["certificate_not_after_ms"].as_u64();
    let day_on = weft::control::now_millis() + 86_400_000;
    assert!(
        until.is_some_and(|t| t <= day_on && t + 60_000 >= day_on),
        "{until:?}"
    );

    // The liar: a new key, the secret, and a state file saying it has held b's block since
    // one second after the epoch (older than b's claim). No certificate.
    let x = m.add_node(&LIAR, "eu", &secret)?;
    let config =
        std::fs::read_to_string(&x.config)?.replace(weft_tests::meshlab::POOLS, "[100.64.0.0/20]");
    std::fs::write(&x.config, config)?;
    std::fs::write(
        x.config.with_file_name("ipam.json"),
        r#"{"version": 1, "blocks": [{"block": "100.64.2.0/24", "since": 1000}]}"#,
    )?;
    m.lab.start(&m.bin, &x)?;
    m.daemons.push(x);

    for me in ["a", "b"] {
        assert_refused(
            &m,
            me,
            &["no certificate", "mesh.authority"],
            "claim_uncertified",
        )?;
    }
    assert_eq!(m.blocks("b")?, ["100.64.2.0/24".parse::<ipnet::IpNet>()?]);
    let p = m.peer("a", "b").context("a's peer b")?;
    assert_eq!(p["pod_cidrs"], serde_json::json!(["100.64.2.0/24"]), "{p}");
    weft_tests::ping(&m.lab, &m.daemon("a").ns, "100.64.2.1", None).context("a -> b's pod")?;
    weft_tests::ping(&m.lab, &m.daemon("b").ns, "100.64.1.1", None).context("b -> a's pod")?;

    // A reload reads the certificate again: the same blocks, so nothing needs a restart.
    m.lab.signal("a", nix::sys::signal::Signal::SIGHUP)?;
    let log = m.daemon("a").log.clone();
    let said = wait_for("a to reload", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&log).ok()?;
        text.lines()
            .find(|l| l.contains("SIGHUP: "))
            .map(str::to_owned)
    })?;
    assert!(said.contains("config reloaded"), "{said}");
    assert_eq!(m.blocks("a")?, ["100.64.1.0/24".parse::<ipnet::IpNet>()?]);
    Ok(())
}

/// With `mesh.authority`, an operator moves a block by issuing another node a certificate for
/// it: the later certificate wins over the earlier holder's whatever the claim times say (the
/// earlier holder claimed first). The others route the block to the new holder and refuse the
/// old one as superseded; the old holder reports it in its log and metrics.
#[test]
fn with_an_authority_a_block_reissued_to_another_node_moves_there() -> anyhow::Result<()> {
    let mut m = MeshLab::empty("cre", &["lan1", "lan2", "inet"])?;
    let ca = Ca::new(&m)?;
    for (spec, block) in [(&HONEST[0], "100.64.1.0/24"), (&HONEST[1], "100.64.2.0/24")] {
        ca.add_node(&mut m, spec, block)?;
    }
    m.wait_full_mesh(&["a", "b"])?;
    let moved: ipnet::IpNet = "100.64.2.0/24".parse()?;
    assert_eq!(m.blocks("b")?, [moved]);

    // b's block is re-issued to c, which starts after b has long claimed it.
    let c = Spec { name: "c", ..LIAR };
    ca.add_node(&mut m, &c, "100.64.2.0/24")?;
    for me in ["a", "c"] {
        assert_refused_member(
            &m,
            me,
            "b",
            &["100.64.2.0/24", "superseded by one issued later"],
            "claim_superseded",
        )?;
    }
    let p = wait_for("a to route the block to c", Duration::from_secs(30), || {
        m.peer("a", "c")
            .filter(|p| p["pod_cidrs"] == serde_json::json!([moved.to_string()]))
    })?;
    assert_eq!(p["pod_cidrs"], serde_json::json!(["100.64.2.0/24"]));
    weft_tests::ping(&m.lab, &m.daemon("a").ns, "100.64.2.1", None).context("a -> c's pod")?;

    // b, superseded, says so: an error in its log and a metric; a's certificate end is a metric.
    let scrape =
        |me: &str| weft_tests::http_get(&m.lab, &m.daemon(me).ns, "127.0.0.1:6782", "/metrics");
    // A scrape's value of `name` (these samples carry no labels).
    let metric =
        |response: &str, name: &str| weft_tests::exposition::sample_value(response, name, &[]).ok();
    wait_for(
        "b's metric of superseded blocks",
        Duration::from_secs(30),
        || {
            let text = scrape("b").ok()?;
            (metric(&text, "weft_node_certificate_superseded_blocks") == Some(1.0)).then_some(())
        },
    )?;
    let log = std::fs::read_to_string(&m.daemon("b").log)?;
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("certificate is superseded")),
        "{log}"
    );
    let a = scrape("a")?;
    let until = (weft::control::now_millis() / 1000 + 86_400) as f64;
    let secs = metric(&a, "weft_node_certificate_not_after_seconds").with_context(|| a.clone())?;
    assert!(
        (secs - until).abs() < 120.0,
        "{secs}, expected about {until}"
    );
    assert_eq!(
        metric(&a, "weft_node_certificate_superseded_blocks"),
        Some(0.0),
        "{a}"
    );

    // c stops cleanly (its record becomes a tombstone): b, superseded, does not get the block
    // back in the gap. a sees c leave, then for 5 s (several rounds) never routes b.
    anyhow::ensure!(
        m.lab.stop("c", Duration::from_secs(10))?,
        "c stopped cleanly"
    );
    wait_for("a to see c leave", Duration::from_secs(30), || {
        let st = m.status("a").ok()?;
        st["mesh"]["members"]
            .as_array()?
            .iter()
            .any(|p| p["name"] == "c" && p["left"] == true)
            .then_some(())
    })?;
    let routed_b = wait_for("a to route b (it must not)", Duration::from_secs(5), || {
        m.peer("a", "b")
    });
    assert!(routed_b.is_err(), "a routes the superseded b: {routed_b:?}");
    let st = m.status("a")?;
    let b = st["mesh"]["members"]
        .as_array()
        .and_then(|ms| ms.iter().find(|p| p["name"] == "b"))
        .with_context(|| st.to_string())?;
    assert!(
        b["claims_refused"]
            .as_str()
            .is_some_and(|w| w.contains("superseded")),
        "{b}"
    );
    Ok(())
}

/// With `mesh.authority`, a node whose certificate has ended still starts (its end must not
/// take down its configured peers, nor need the operator to be there at boot): it says why
/// in its log, and the others refuse its claims and do not route it. A renewed certificate
/// (the same block) loaded by SIGHUP is published, and the others route it again.
#[test]
fn with_an_authority_an_ended_certificate_starts_unrouted_and_a_renewal_by_reload_routes_it()
-> anyhow::Result<()> {
    let mut m = MeshLab::empty("cex", &["lan1", "lan2", "inet"])?;
    let ca = Ca::new(&m)?;
    ca.add_node(&mut m, &HONEST[0], "100.64.1.0/24")?;
    let seed = weft::host::keys::decode(&std::fs::read_to_string(&ca.key)?, "authority key")?;
    ca.add_node_with(&mut m, &HONEST[1], |_, node_key| {
        // Issued three days ago for one day: ended two days ago.
        let issued = weft::control::now_millis() - 3 * 86_400_000;
        let key = weft::host::keys::decode(node_key, "node key")?;
        let block = "100.64.2.0/24".parse()?;
        let cert = weft_mesh::AuthorityKey::from_seed(&seed).issue(
            key,
            vec![block],
            issued,
            issued + 86_400_000,
        )?;
        use base64::Engine as _;
        Ok(base64::engine::general_purpose::STANDARD.encode(cert.to_bytes()))
    })?;
    assert_refused_member(&m, "a", "b", &["expired"], "claim_bad_certificate")?;
    let log = std::fs::read_to_string(&m.daemon("b").log)?;
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("certificate does not hold now")),
        "{log}"
    );

    // The renewal: the same block, signed now; b reloads it.
    let (key, _) = weft::host::keys::load_or_create(&m.daemon("b").key_file)?;
    let node_key = weft::host::keys::public_of(&key);
    let cert = ca.sign(&m, &node_key, "100.64.2.0/24")?;
    std::fs::write(m.daemon("b").config.with_file_name("node.cert"), cert)?;
    m.lab.signal("b", nix::sys::signal::Signal::SIGHUP)?;
    wait_for("a to route b's block", Duration::from_secs(30), || {
        m.peer("a", "b")
            .filter(|p| p["pod_cidrs"] == serde_json::json!(["100.64.2.0/24"]))
    })?;
    weft_tests::ping(&m.lab, &m.daemon("a").ns, "100.64.2.1", None).context("a -> b's pod")?;
    Ok(())
}
