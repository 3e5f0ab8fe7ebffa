//! `mesh.authority` at start and at reload: this node's certificate is read, checked against
//! the authority, its own WireGuard key and the clock, and its pod CIDRs become the node's
//! blocks (`node.pod_cidr`), so that the node claims what its certificate names and nothing
//! else. A certificate that is not good (another signer or node, blocks that are not node
//! blocks) stops the start (or refuses the reload) with why: the others would refuse every
//! claim of this node and not route it. One that is good but has ended, or has not begun by
//! this node's clock, does not: the node runs and logs an error, the others refuse its claims
//! until a renewal is loaded (SIGHUP), and its configured peers keep working meanwhile.

use std::path::Path;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use weft_config::Config;
use weft_mesh::{Authority, AuthorityKey, CertError, NodeCert};

use crate::control::claims::{ClaimPolicy, MAX_SKEW_MS};
use crate::host::keys;

/// The authority and this node's certificate, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certified {
    /// `mesh.authority`: the keys any of which may sign a certificate.
    pub authorities: Vec<Authority>,
    /// This node's certificate (`mesh.certificate`).
    pub certificate: NodeCert,
    /// Why the certificate does not hold now (ended, or not begun by this node's clock),
    /// if so: the node runs (its configured peers, its part in the mesh), but the others
    /// refuse its claims until a certificate that holds is loaded.
    pub outside_window: Option<CertError>,
}

/// A reload's certificate must hold now when the running one does: an old file put back, or
/// one from a signer whose clock runs ahead, would otherwise take a routed node off the mesh.
pub fn no_worse(new: &Certified, running: Option<&Certified>, now_ms: u64) -> anyhow::Result<()> {
    let holds = |c: &NodeCert| c.holds(&c.node_key, now_ms, MAX_SKEW_MS);
    if let (Err(why), Some(running)) = (holds(&new.certificate), running)
        && holds(&running.certificate).is_ok()
    {
        bail!(
            "the new certificate does not hold now ({why}) while the running one does (until {} ms); nothing was applied",
            running.certificate.not_after
        );
    }
    Ok(())
}

impl Certified {
    /// Logs, as an error, that the certificate does not hold now, if so.
    pub fn log_window(&self, path: &Path) {
        if let Some(why) = &self.outside_window {
            tracing::error!(
                certificate = %path.display(), reason = %why,
                "this node's certificate does not hold now: the other nodes refuse its pod-CIDR claims and do not route it until it does; renew it (weft authority sign, same blocks) and reload (SIGHUP), or check this node's clock"
            );
        }
    }
}

/// A certificate as `weft authority sign` writes it: base64 on one line.
pub fn to_text(cert: &NodeCert) -> String {
    format!("{}\n", STANDARD.encode(cert.to_bytes()))
}

/// A certificate from its text (`what` names the source in errors).
pub fn from_text(text: &str, what: &str) -> anyhow::Result<NodeCert> {
    let bytes = STANDARD
        .decode(text.trim())
        .with_context(|| format!("{what}: not base64"))?;
    NodeCert::from_bytes(&bytes).with_context(|| what.to_owned())
}

/// With `mesh.authority`: reads this node's certificate, checks it (signed by the authority,
/// issued to the key in `node.key_file`, valid at `now_ms`, its blocks of the pod network's
/// size) and sets `node.pod_cidr` to its pod CIDRs; a `node.pod_cidr` the config gives must be
/// the same. Without an authority, nothing.
pub fn certify(
    config: &mut Config,
    origin: &Path,
    now_ms: u64,
) -> anyhow::Result<Option<Certified>> {
    let Some(path) = config.mesh.certificate.clone() else {
        return Ok(None);
    };
    let at = |field: &str| format!("{}: {field}", origin.display());
    let authorities = config
        .mesh
        .authority
        .iter()
        .map(|key| {
            Authority::from_bytes(key.0)
                .with_context(|| format!("{} {}", at("mesh.authority"), keys::encode(&key.0)))
                .context("give the key `weft authority pubkey` prints")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: reading {}", at("mesh.certificate"), path.display()))?;
    let certificate = from_text(&text, &format!("certificate {}", path.display()))?;
    let own = match keys::read_private(&config.node.key_file) {
        Ok(text) => {
            let what = format!("key file {}", config.node.key_file.display());
            keys::decode(&text, &what)?
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "{}: a certificate is issued to an existing key; node.key_file {} cannot be read",
                    at("mesh.certificate"),
                    config.node.key_file.display()
                )
            });
        }
    };
    let wireguard_key = keys::public_bytes(&boringtun::x25519::StaticSecret::from(own));
    // Ended or not yet begun is no reason not to run (a node restarted after its end, or
    // booted before its clock was set): the node starts, says so, and waits for a renewal.
    let outside_window = match certificate.holds(&wireguard_key, now_ms, MAX_SKEW_MS) {
        Err(e @ (CertError::Expired { .. } | CertError::NotYetValid { .. })) => Some(e),
        _ => None,
    };
    let window = |c: &NodeCert| match c.holds(&wireguard_key, now_ms, MAX_SKEW_MS) {
        Err(CertError::Expired { .. } | CertError::NotYetValid { .. }) => Ok(()),
        other => other,
    };
    certificate
        .signer(&authorities)
        .and_then(|_| window(&certificate))
        .with_context(|| {
            format!(
                "{}: certificate {} (this node's key is {})",
                at("mesh.certificate"),
                path.display(),
                keys::encode(&wireguard_key)
            )
        })?;
    let certified = certificate.pod_cidrs.clone();
    if !config.node.pod_cidr.is_empty() && sorted(&config.node.pod_cidr) != sorted(&certified) {
        bail!(
            "{}: {:?} is not what certificate {} names ({certified:?}); leave node.pod_cidr out, \
             the certificate gives it",
            at("node.pod_cidr"),
            config.node.pod_cidr,
            path.display()
        );
    }
    check_blocks(config, &certified, &at("mesh.certificate"), &path)?;
    // In one order, so that a renewal listing them otherwise is the same config.
    config.node.pod_cidr = sorted(&certified);
    Ok(Some(Certified {
        authorities,
        certificate,
        outside_window,
    }))
}

/// The certificate's blocks as the others will check them (inside the pool, no broader than
/// a node block) and exactly node blocks, as IPAM weighs them: better to hear it at start than
/// be refused.
fn check_blocks(
    config: &Config,
    certified: &[ipnet::IpNet],
    at: &str,
    path: &Path,
) -> anyhow::Result<()> {
    let policy = ClaimPolicy::from_config(&config.network, Vec::new());
    for block in certified {
        policy.check_block(block).map_err(|why| {
            anyhow::anyhow!(
                "{at}: certificate {}: {}",
                path.display(),
                why.to_string().replacen("its ", "", 1)
            )
        })?;
        let mask = policy.node_mask(block);
        let family = if block.addr().is_ipv4() { 4 } else { 6 };
        if !policy.is_node_block(block) {
            bail!(
                "{at}: certificate {}: pod CIDR {block} is not a node block \
                 (/{mask}, network.node_cidr_mask_size_ipv{family})",
                path.display(),
            );
        }
    }
    Ok(())
}

/// How long before its end a certificate is warned about.
pub const RENEW_WITHIN_MS: u64 = 7 * 86_400_000;
/// How often the end of this node's certificate is looked at.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

/// What to say of a certificate that ends at `not_after` (ms), at `now_ms`: an error once it
/// has ended (the others no longer route this node), a warning within [`RENEW_WITHIN_MS`].
pub fn expiry_notice(not_after: u64, now_ms: u64) -> Option<(tracing::Level, String)> {
    let renew = "renew it (weft authority sign, same blocks) and reload (SIGHUP)";
    if now_ms > not_after {
        let ago = (now_ms - not_after) / 3_600_000;
        return Some((
            tracing::Level::ERROR,
            format!(
                "this node's certificate ended {ago} h ago: the other nodes refuse its claims and do not route it; {renew}"
            ),
        ));
    }
    let left = not_after - now_ms;
    (left <= RENEW_WITHIN_MS).then(|| {
        (
            tracing::Level::WARN,
            format!(
                "this node's certificate ends in {} h; {renew}",
                left / 3_600_000
            ),
        )
    })
}

/// Logs [`expiry_notice`] for this node's certificate (as status shows it, so a renewal by
/// reload is seen) now and every six hours, until `shutdown`.
pub async fn watch_expiry(
    node: std::sync::Arc<std::sync::Mutex<crate::api::status::NodeStatus>>,
    mut shutdown: crate::shutdown::Shutdown,
) {
    let mut every = tokio::time::interval(WATCH_EVERY);
    loop {
        tokio::select! {
            () = shutdown.wait() => return,
            _ = every.tick() => {}
        }
        let not_after = node.lock().ok().and_then(|n| n.certificate_not_after_ms);
        let notice = not_after.and_then(|t| expiry_notice(t, crate::control::now_millis()));
        match notice {
            Some((tracing::Level::ERROR, text)) => {
                tracing::error!(not_after_ms = not_after, "{text}")
            }
            Some((_, text)) => tracing::warn!(not_after_ms = not_after, "{text}"),
            None => {}
        }
    }
}

/// The pools this node's IPAM claims in: every one without an authority; with one, only those
/// holding a block of the certificate. A node certified for an IPv4 block alone claims no
/// IPv6 block of a dual-stack pod network, which the others would refuse as uncertified.
pub fn claimable(pools: &[weft_ipam::Pool], certified: Option<&Certified>) -> Vec<weft_ipam::Pool> {
    pools
        .iter()
        .filter(|pool| {
            certified.is_none_or(|c| c.certificate.pod_cidrs.iter().any(|b| pool.holds(b)))
        })
        .copied()
        .collect()
}

/// The public key of the authority with private key (seed) `seed`, base64.
pub fn authority_public(seed: &[u8; 32]) -> String {
    keys::encode(&AuthorityKey::from_seed(seed).authority().to_bytes())
}

/// A certificate from the authority with private key `seed` for the node whose WireGuard
/// public key is `node_key` (base64), naming `pod_cidrs`, valid from `now_ms` for `days`.
pub fn issue(
    seed: &[u8; 32],
    node_key: &str,
    pod_cidrs: Vec<ipnet::IpNet>,
    now_ms: u64,
    days: u32,
) -> anyhow::Result<NodeCert> {
    let node = keys::decode(node_key, "--node-key")?;
    let not_after = now_ms.saturating_add(u64::from(days) * 86_400_000);
    if let Some(c) = pod_cidrs.iter().find(|c| c.trunc() != **c) {
        bail!(
            "--pod-cidr {c} has host bits set: did you mean {}?",
            c.trunc()
        );
    }
    AuthorityKey::from_seed(seed)
        .issue(node, pod_cidrs, now_ms, not_after)
        .context("--pod-cidr")
}

fn sorted(nets: &[ipnet::IpNet]) -> Vec<ipnet::IpNet> {
    let mut v = nets.to_vec();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;
    const DAY: u64 = 86_400_000;

    /// A node's state dir with its key, its config (authority `[42; 32]`, pool 100.64.0.0/16
    /// of /24s, and `extra` under `node:`), and a certificate from `issue`.
    struct Node {
        dir: tempfile::TempDir,
        key: [u8; 32],
    }

    impl Node {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("temp dir");
            let key = keys::generate().to_bytes();
            keys::create(&dir.path().join("private.key"), &key).expect("key");
            Self { dir, key }
        }
        fn public(&self) -> String {
            keys::encode(&keys::public_bytes(&boringtun::x25519::StaticSecret::from(
                self.key,
            )))
        }
        fn config(&self, extra: &str) -> Config {
            self.config_with(extra, &authority_public(&[42; 32]))
        }
        /// With `ca` as `mesh.authority` (a key, or a list in YAML).
        fn config_with(&self, extra: &str, ca: &str) -> Config {
            let d = self.dir.path().display();
            let text = format!(
                "node:\n  key_file: {d}/private.key\n{extra}network:\n  pod_network_cidr: 100.64.0.0/16\nmesh:\n  authority: {ca}\n  certificate: {d}/node.cert\nstate_dir: {d}\n"
            );
            Config::parse(&text, Path::new("/etc/weft/weft.yaml"), "host").expect("config")
        }
        fn write_cert(&self, seed: u8, node: &str, blocks: &[&str], issued: u64, days: u32) {
            let blocks = blocks.iter().map(|b| b.parse().unwrap()).collect();
            let cert = issue(&[seed; 32], node, blocks, issued, days).expect("issue");
            std::fs::write(self.dir.path().join("node.cert"), to_text(&cert)).expect("write");
        }
        fn certify(&self, extra: &str) -> anyhow::Result<(Config, Option<Certified>)> {
            let mut c = self.config(extra);
            let got = certify(&mut c, Path::new("/etc/weft/weft.yaml"), NOW)?;
            Ok((c, got))
        }
    }

    #[test]
    fn a_good_certificate_gives_the_node_its_blocks() {
        let n = Node::new();
        n.write_cert(42, &n.public(), &["100.64.7.0/24"], NOW - DAY, 30);
        let (c, got) = n.certify("").expect("certified");
        assert_eq!(
            c.node.pod_cidr,
            ["100.64.7.0/24".parse::<ipnet::IpNet>().unwrap()]
        );
        let got = got.expect("an authority is set");
        assert_eq!(
            got.authorities,
            [AuthorityKey::from_seed(&[42; 32]).authority()]
        );
        // The same block given in the config too: fine.
        assert!(n.certify("  pod_cidr: 100.64.7.0/24\n").is_ok());
        // Without an authority: nothing read, nothing changed.
        let mut plain = Config::parse("node:\n  name: a\n", Path::new("/w.yaml"), "h").unwrap();
        assert_eq!(
            certify(&mut plain, Path::new("/w.yaml"), NOW).unwrap(),
            None
        );
        assert!(plain.node.pod_cidr.is_empty());
    }

    /// While a new authority key is rolled out, `mesh.authority` lists both, and a
    /// certificate signed by either is good; one signed by neither still stops the start.
    #[test]
    fn a_certificate_signed_by_any_listed_authority_key_is_good() {
        let n = Node::new();
        let (old, new) = (authority_public(&[42; 32]), authority_public(&[43; 32]));
        let both = format!("[{old}, {new}]");
        let certify = |ca: &str| {
            let mut c = n.config_with("", ca);
            certify(&mut c, Path::new("/etc/weft/weft.yaml"), NOW)
        };
        n.write_cert(43, &n.public(), &["100.64.7.0/24"], NOW - DAY, 30);
        let got = certify(&both)
            .expect("signed by the new key")
            .expect("certified");
        assert_eq!(got.authorities.len(), 2);
        let e = certify(&old).expect_err("the new key is not listed");
        assert!(
            format!("{e:#}").contains("not signed by this authority"),
            "{e:#}"
        );
        n.write_cert(42, &n.public(), &["100.64.7.0/24"], NOW - DAY, 30);
        assert!(certify(&both).is_ok(), "signed by the old key");
        n.write_cert(44, &n.public(), &["100.64.7.0/24"], NOW - DAY, 30);
        let e = certify(&both).expect_err("signed by neither");
        assert!(
            format!("{e:#}").contains("not signed by this authority"),
            "{e:#}"
        );
    }

    #[test]
    fn a_node_certified_for_one_family_claims_in_that_familys_pool_only() {
        let n = Node::new();
        n.write_cert(42, &n.public(), &["100.64.7.0/24"], NOW - DAY, 30);
        let (c, got) = n.certify("").expect("certified");
        let pools: Vec<weft_ipam::Pool> = [("100.64.0.0/16", 24), ("fd64::/48", 64)]
            .iter()
            .map(|(p, mask)| weft_ipam::Pool::new(p.parse().unwrap(), *mask).expect("pool"))
            .collect();
        let only = claimable(&pools, got.as_ref());
        assert_eq!(only.len(), 1);
        assert!(only[0].holds(&c.node.pod_cidr[0]));
        assert_eq!(
            claimable(&pools, None).len(),
            2,
            "without an authority, every pool"
        );
    }

    #[test]
    fn an_ending_certificate_is_warned_about_and_an_ended_one_is_an_error() {
        assert_eq!(expiry_notice(NOW + 30 * DAY, NOW), None);
        let (level, text) = expiry_notice(NOW + 2 * DAY, NOW).expect("warned");
        assert_eq!(level, tracing::Level::WARN);
        assert!(
            text.contains("ends in 48 h") && text.contains("weft authority sign"),
            "{text}"
        );
        let (level, text) = expiry_notice(NOW - 3_600_000, NOW).expect("an error");
        assert_eq!(level, tracing::Level::ERROR);
        assert!(
            text.contains("ended 1 h ago") && text.contains("do not route it"),
            "{text}"
        );
    }

    /// Each way a certificate can be wrong stops the start with a message that names the file
    /// and says why; nothing is changed.
    #[test]
    fn a_certificate_that_is_not_good_stops_the_start_and_says_why() {
        let n = Node::new();
        let other = keys::encode(&[9; 32]);
        /// Authority seed, node key, blocks, issued, days, `node:` extra, what the error says.
        type Case<'a> = (u8, &'a str, &'a [&'a str], u64, u32, &'a str, &'a str);
        let cases: [Case<'_>; 5] = [
            (
                7,
                "self",
                &["100.64.7.0/24"],
                NOW - DAY,
                30,
                "",
                "not signed by this authority",
            ),
            (
                42,
                &other,
                &["100.64.7.0/24"],
                NOW - DAY,
                30,
                "",
                "issued to another WireGuard key",
            ),
            (
                42,
                "self",
                &["100.65.7.0/24"],
                NOW - DAY,
                30,
                "",
                "outside network.pod_network_cidr",
            ),
            (
                42,
                "self",
                &["100.64.7.0/25"],
                NOW - DAY,
                30,
                "",
                "is not a node block (/24",
            ),
            (
                42,
                "self",
                &["100.64.7.0/24"],
                NOW - DAY,
                30,
                "  pod_cidr: 100.64.8.0/24\n",
                "not what certificate",
            ),
        ];
        for (seed, node, blocks, issued, days, extra, why) in cases {
            let node = if node == "self" {
                n.public()
            } else {
                node.to_owned()
            };
            n.write_cert(seed, &node, blocks, issued, days);
            let e = format!("{:#}", n.certify(extra).unwrap_err());
            assert!(e.contains(why), "{why}: {e}");
            assert!(
                e.contains("node.cert") || e.contains("mesh.certificate"),
                "{e}"
            );
        }
    }

    /// A certificate that has ended, or has not begun by this node's clock (booted before
    /// the clock was set), does not stop the start: the node runs, its blocks are the
    /// certificate's, and why it does not hold is kept to be logged.
    #[test]
    fn a_certificate_outside_its_window_does_not_stop_the_start() {
        let n = Node::new();
        for (issued, days, why) in [
            (NOW - 40 * DAY, 30, "expired"),
            (NOW + DAY, 30, "in the future"),
        ] {
            n.write_cert(42, &n.public(), &["100.64.7.0/24"], issued, days);
            let (c, got) = n.certify("").expect("started");
            let got = got.expect("certified");
            let e = got.outside_window.as_ref().map(ToString::to_string);
            assert!(
                e.as_deref().is_some_and(|e| e.contains(why)),
                "{why}: {e:?}"
            );
            assert_eq!(
                c.node.pod_cidr,
                ["100.64.7.0/24".parse::<ipnet::IpNet>().unwrap()]
            );
        }
        n.write_cert(42, &n.public(), &["100.64.7.0/24"], NOW - DAY, 30);
        let (_, got) = n.certify("").expect("started");
        assert_eq!(got.expect("certified").outside_window, None);
    }

    /// A reload may not swap a certificate that holds for one that does not (an old file put
    /// back); one that does not hold may be replaced by anything good.
    #[test]
    fn a_reload_cannot_swap_a_certificate_that_holds_for_one_that_does_not() {
        let n = Node::new();
        let load = |issued: u64| {
            n.write_cert(42, &n.public(), &["100.64.7.0/24"], issued, 30);
            n.certify("").expect("started").1.expect("certified")
        };
        let (good, ended) = (load(NOW - DAY), load(NOW - 40 * DAY));
        let e = no_worse(&ended, Some(&good), NOW).expect_err("refused");
        assert!(e.to_string().contains("does not hold now"), "{e}");
        assert!(no_worse(&good, Some(&ended), NOW).is_ok());
        assert!(no_worse(&ended, Some(&ended), NOW).is_ok());
        assert!(no_worse(&ended, None, NOW).is_ok());
    }

    /// A block with host bits (`weft authority sign` refuses one, a hand-made certificate
    /// need not) stops the start: every other node would refuse it.
    #[test]
    fn a_certificate_block_with_host_bits_stops_the_start() {
        let n = Node::new();
        let key = keys::decode(&n.public(), "key").unwrap();
        let cert = AuthorityKey::from_seed(&[42; 32])
            .issue(
                key,
                vec!["100.64.7.5/24".parse().unwrap()],
                NOW - DAY,
                NOW + DAY,
            )
            .expect("issue");
        std::fs::write(n.dir.path().join("node.cert"), to_text(&cert)).unwrap();
        let e = format!("{:#}", n.certify("").unwrap_err());
        assert!(e.contains("100.64.7.5/24 is not a node block"), "{e}");
    }

    #[test]
    fn a_certificate_file_that_holds_no_certificate_stops_the_start() {
        let n = Node::new();
        std::fs::write(n.dir.path().join("node.cert"), "not base64!\n").unwrap();
        let e = format!("{:#}", n.certify("").unwrap_err());
        assert!(e.contains("not base64"), "{e}");
        std::fs::write(n.dir.path().join("node.cert"), "AAAA\n").unwrap();
        let e = format!("{:#}", n.certify("").unwrap_err());
        assert!(e.contains("not a weft node certificate"), "{e}");
        std::fs::remove_file(n.dir.path().join("node.cert")).unwrap();
        let e = format!("{:#}", n.certify("").unwrap_err());
        assert!(e.contains("reading") && e.contains("node.cert"), "{e}");
    }
}
