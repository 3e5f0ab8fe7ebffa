//! Masquerade for island networks (`network.nat_outgoing`): traffic from this node's pods to
//! destinations outside `pod_network_cidr` and outside `no_masquerade` leaves with the node's
//! address. The rules live in one nftables table that weft owns, `inet weft`, written through
//! `nft`'s JSON interface in one atomic batch (the table is flushed and refilled, so a change
//! of blocks never leaves a half-set table), and deleted on shutdown. No other table is read or
//! touched.

use std::io::Write as _;
use std::process::{Command, Stdio};

use ipnet::IpNet;
use serde_json::{Value, json};

/// The table weft owns.
pub const TABLE: &str = "weft";

/// Why the rules could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum MasqueradeError {
    /// `nft` is not installed.
    #[error("network.nat_outgoing needs `nft` (Debian package nftables): {0}")]
    NoNft(std::io::Error),
    /// `nft` refused the batch.
    #[error("nft refused the masquerade rules: {0}")]
    Refused(String),
    /// Talking to `nft` failed.
    #[error("running nft: {0}")]
    Io(#[from] std::io::Error),
}

fn family_matches(net: &IpNet, v4: bool) -> bool {
    net.addr().is_ipv4() == v4
}

fn prefix(net: &IpNet) -> Value {
    json!({"prefix": {"addr": net.network().to_string(), "len": net.prefix_len()}})
}

/// The nft JSON batch that makes table `inet weft` masquerade traffic from `blocks` (this
/// node's pod blocks) to anything outside `keep` (the pod network and `no_masquerade`), except
/// what goes out through `interface` (the overlay). Pure, for tests and for [`apply`].
pub fn batch(blocks: &[IpNet], keep: &[IpNet], interface: &str) -> Value {
    let table = json!({"family": "inet", "name": TABLE});
    let mut cmds = vec![
        json!({"add": {"table": table}}),
        json!({"flush": {"table": table}}),
        json!({"add": {"chain": {
            "family": "inet", "table": TABLE, "name": "postrouting",
            "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"
        }}}),
    ];
    for block in blocks {
        let v4 = block.addr().is_ipv4();
        let proto = if v4 { "ip" } else { "ip6" };
        let keep: Vec<Value> = keep
            .iter()
            .filter(|k| family_matches(k, v4))
            .map(prefix)
            .collect();
        let mut expr = vec![
            json!({"match": {"op": "==", "left": {"payload": {"protocol": proto, "field": "saddr"}}, "right": prefix(block)}}),
            json!({"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": interface}}),
        ];
        if !keep.is_empty() {
            expr.push(json!({"match": {"op": "!=", "left": {"payload": {"protocol": proto, "field": "daddr"}}, "right": {"set": keep}}}));
        }
        expr.push(json!({"masquerade": null}));
        cmds.push(json!({"add": {"rule": {
            "family": "inet", "table": TABLE, "chain": "postrouting", "expr": expr
        }}}));
    }
    json!({"nftables": cmds})
}

fn nft(input: &Value) -> Result<(), MasqueradeError> {
    let mut child = Command::new("nft")
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(MasqueradeError::NoNft)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.to_string().as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(MasqueradeError::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// Writes the rules for `blocks` (replacing any earlier ones in weft's table).
pub fn apply(blocks: &[IpNet], keep: &[IpNet], interface: &str) -> Result<(), MasqueradeError> {
    nft(&batch(blocks, keep, interface))
}

/// Deletes weft's table, if it is there.
pub fn remove() -> Result<(), MasqueradeError> {
    // `add` first makes the delete succeed when the table is already gone.
    let table = json!({"family": "inet", "name": TABLE});
    nft(&json!({"nftables": [
        {"add": {"table": table}},
        {"delete": {"table": table}},
    ]}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_batch_masquerades_each_family_and_keeps_the_pod_network() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let b = batch(
            &[net("100.64.1.0/24"), net("fd00:64:0:1::/64")],
            &[
                net("100.64.0.0/16"),
                net("fd00:64::/48"),
                net("198.18.9.0/24"),
            ],
            "weft0",
        );
        let cmds = b["nftables"].as_array().unwrap();
        // add table, flush table, add chain, one rule per block.
        assert_eq!(cmds.len(), 5, "{b}");
        assert_eq!(cmds[1]["flush"]["table"]["name"], TABLE);
        let v4 = &cmds[3]["add"]["rule"]["expr"];
        assert_eq!(v4[0]["match"]["right"]["prefix"]["addr"], "100.64.1.0");
        let keep = v4[2]["match"]["right"]["set"].as_array().unwrap();
        assert_eq!(keep.len(), 2, "only IPv4 prefixes in the IPv4 rule: {v4}");
        assert_eq!(v4[3], json!({"masquerade": null}));
        let v6 = &cmds[4]["add"]["rule"]["expr"];
        assert_eq!(v6[0]["match"]["left"]["payload"]["protocol"], "ip6");
        assert_eq!(v6[2]["match"]["right"]["set"].as_array().unwrap().len(), 1);
    }
}
