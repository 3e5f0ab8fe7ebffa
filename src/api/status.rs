//! The status report: the JSON of `weft status --json` (DESIGN.md's contract) and its table form.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// This node, its peers and the drops no peer is blamed for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// This node.
    pub node: NodeStatus,
    /// Every peer, by name.
    pub peers: Vec<PeerStatus>,
    /// Datagrams and packets dropped before a peer was known, by reason.
    pub drops: std::collections::BTreeMap<String, u64>,
    /// The gossip mesh, when it runs.
    #[serde(default)]
    pub mesh: Option<MeshStatus>,
    /// The Kubernetes node source, when enabled: `ok`, or what is wrong with the API now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<String>,
}

/// The gossip mesh as this node sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeshStatus {
    /// This node's mesh id.
    pub node_id: String,
    /// Every member learned (departed ones included).
    pub members: Vec<MeshMember>,
    /// Open gossip connections.
    pub connections: usize,
    /// Gossip refused, by reason.
    pub drops: std::collections::BTreeMap<String, u64>,
    /// Gossip input refused, by precise reason (as `weft_mesh_rejected`): the gossip core's
    /// reasons, and `claim_*` for members' pod-CIDR claims refused.
    #[serde(default)]
    pub rejected: std::collections::BTreeMap<String, u64>,
    /// Another daemon publishing this node's key, with both daemons' addresses, once detected.
    #[serde(default)]
    pub identity_clash: Option<String>,
    /// Members held down because an established member advertises their address.
    #[serde(default)]
    pub address_clashes: Vec<String>,
    /// Gossip frame bytes sent since the daemon started (as the metric `weft_mesh_gossip_sent`).
    #[serde(default)]
    pub bytes_sent: u64,
    /// Gossip frame bytes received since the daemon started.
    #[serde(default)]
    pub bytes_received: u64,
}

/// One mesh member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeshMember {
    /// Its name.
    pub name: String,
    /// Its mesh id.
    pub node_id: String,
    /// Its region.
    pub region: Option<String>,
    /// Heard from within the liveness timeout.
    pub alive: bool,
    /// Left on purpose.
    pub left: bool,
    /// Its record's version.
    pub version: u64,
    /// Its pod CIDRs.
    pub pod_cidrs: Vec<String>,
    /// Why its pod-CIDR claims are not believed (it is then not routed), if they are not.
    #[serde(default)]
    pub claims_refused: Option<String>,
}

/// This node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Its name.
    pub name: String,
    /// Its region, if it has one.
    pub region: Option<String>,
    /// Its WireGuard public key, base64.
    pub public_key: String,
    /// The pod CIDRs it owns.
    pub pod_cidrs: Vec<String>,
    /// Its address for peers in the same region.
    pub private_address: Option<String>,
    /// Its address for peers in other regions.
    pub public_address: Option<String>,
    /// Where `region` came from: `config`, `kubernetes` (the Node's label) or none.
    #[serde(default)]
    pub region_source: Option<String>,
    /// Where `private_address` came from: `config`, `kubernetes` (`InternalIP`), `annotation`
    /// (`weft.dev/private-address`) or none.
    #[serde(default)]
    pub private_address_source: Option<String>,
    /// Where `public_address` came from: `config`, `kubernetes` (`ExternalIP`), `annotation`
    /// (`weft.dev/public-address`) or none.
    #[serde(default)]
    pub public_address_source: Option<String>,
    /// The TUN device.
    pub interface: String,
    /// The TUN device's MTU.
    pub mtu: u16,
    /// The UDP port of the data plane.
    pub listen_port: u16,
    /// The endpoints members see this node's WireGuard datagrams come from, where those are
    /// none of its addresses (the mappings of a NAT in front of it), as its record publishes
    /// them.
    #[serde(default)]
    pub observed_endpoints: Vec<String>,
    /// The relays this node, behind NAT, registers with and publishes as its homes (by name),
    /// best first: its peers behind NAT reach it through these.
    #[serde(default)]
    pub home_relays: Vec<String>,
    /// With `mesh.authority`: until when this node's certificate holds (ms since the epoch);
    /// past it, the other nodes refuse its claims and stop routing it.
    #[serde(default)]
    pub certificate_not_after_ms: Option<u64>,
}

impl NodeStatus {
    /// Shows `facts`, the region and addresses the daemon uses, and where each came from.
    pub fn set_facts(&mut self, facts: &crate::control::k8s::OwnFacts) {
        let text = |a: Option<std::net::IpAddr>| a.map(|a| a.to_string());
        let source = |s: Option<crate::control::k8s::FactSource>| s.map(|s| s.as_str().to_owned());
        self.region.clone_from(&facts.region);
        self.private_address = text(facts.private_address);
        self.public_address = text(facts.public_address);
        self.region_source = source(facts.region_source);
        self.private_address_source = source(facts.private_address_source);
        self.public_address_source = source(facts.public_address_source);
    }
}

/// One peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Its name.
    pub name: String,
    /// Its region, if known.
    pub region: Option<String>,
    /// Its WireGuard public key, base64.
    pub public_key: String,
    /// The overlay prefixes routed to it.
    pub pod_cidrs: Vec<String>,
    /// The `address:port` in use, if any.
    pub endpoint: Option<String>,
    /// Why that endpoint: `configured`, `learned` (from its authenticated packets), or `none`.
    pub endpoint_reason: String,
    /// `encrypted` or `plaintext`.
    pub path: String,
    /// `up`, `connecting` or `down`.
    pub state: String,
    /// Why a peer is `down` when weft knows: no direct path works and no relay can carry it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down_reason: Option<String>,
    /// Seconds since the last handshake, if one completed.
    pub last_handshake_secs: Option<u64>,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Drops attributed to this peer, by reason.
    pub drops: std::collections::BTreeMap<String, u64>,
}

/// `text` fit for a terminal: control characters (C0, DEL, C1 — escape sequences start with
/// them) and the bidirectional overrides that reorder what follows are each shown as `?`.
/// Names and regions come from gossip, so anyone in the mesh chooses them.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if unsafe_char(c) { '?' } else { c })
        .collect()
}

/// A control character, or a bidirectional mark or override that reorders what follows.
fn unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

impl Status {
    /// The JSON `weft status --json` prints: pretty, with every control character and
    /// bidirectional override escaped (`\u009b`; serde_json leaves DEL, C1 and those raw), so a terminal shows it and parsers read
    /// back the same text.
    pub fn json(&self) -> serde_json::Result<String> {
        let text = serde_json::to_string_pretty(self)?;
        let mut out = String::with_capacity(text.len());
        for c in text.chars() {
            if unsafe_char(c) && c != '\n' {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            } else {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// The table `weft status` prints; every text from the node's config or the mesh passes
    /// through [`printable`].
    pub fn table(&self) -> String {
        let mut s = String::new();
        self.node_lines(&mut s);
        self.peer_table(&mut s);
        self.mesh_lines(&mut s);
        s
    }

    /// This node: name, region, key, blocks, addresses, interface.
    fn node_lines(&self, s: &mut String) {
        let n = &self.node;
        let dash = || "-".to_owned();
        let _ = writeln!(
            s,
            "node {} (region {})",
            printable(&n.name),
            printable(&n.region.clone().unwrap_or_else(dash))
        );
        let _ = writeln!(s, "  public key  {}", n.public_key);
        let _ = writeln!(s, "  pod cidrs   {}", n.pod_cidrs.join(", "));
        let _ = writeln!(
            s,
            "  addresses   private {}  public {}",
            n.private_address.clone().unwrap_or_else(dash),
            n.public_address.clone().unwrap_or_else(dash)
        );
        if !n.observed_endpoints.is_empty() {
            let _ = writeln!(
                s,
                "  behind NAT  seen at {}",
                n.observed_endpoints.join(", ")
            );
        }
        if !n.home_relays.is_empty() {
            let names: Vec<String> = n.home_relays.iter().map(|r| printable(r)).collect();
            let _ = writeln!(s, "  relays      registered with {}", names.join(", "));
        }
        if let Some(ms) = n.certificate_not_after_ms {
            let until = i64::try_from(ms)
                .ok()
                .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
                .map_or_else(|| format!("{ms} ms"), |t| t.to_string());
            let _ = writeln!(s, "  certificate valid until {until}");
        }
        let _ = writeln!(
            s,
            "  interface   {} mtu {}  udp port {}",
            n.interface, n.mtu, n.listen_port
        );
        let _ = writeln!(s);
    }

    /// One row per peer under a header, columns as wide as their widest cell.
    fn peer_table(&self, s: &mut String) {
        let dash = || "-".to_owned();
        let rows: Vec<[String; 10]> = self
            .peers
            .iter()
            .map(|p| {
                [
                    printable(&p.name),
                    printable(&p.region.clone().unwrap_or_else(dash)),
                    if p.pod_cidrs.is_empty() {
                        dash()
                    } else {
                        p.pod_cidrs.join(",")
                    },
                    printable(&p.state),
                    printable(&p.path),
                    printable(&p.endpoint.clone().unwrap_or_else(dash)),
                    printable(&p.endpoint_reason),
                    p.last_handshake_secs
                        .map_or_else(dash, |s| format!("{s}s ago")),
                    p.rx_bytes.to_string(),
                    p.tx_bytes.to_string(),
                ]
            })
            .collect();
        let head = [
            "PEER",
            "REGION",
            "POD CIDRS",
            "STATE",
            "PATH",
            "ENDPOINT",
            "REASON",
            "HANDSHAKE",
            "RX",
            "TX",
        ];
        let mut widths = head.map(str::len);
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.len());
            }
        }
        let mut line = |cells: &[&str]| {
            let cols: Vec<String> = cells
                .iter()
                .zip(widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            let _ = writeln!(s, "{}", cols.join("  ").trim_end());
        };
        line(&head);
        for r in &rows {
            line(&r.each_ref().map(String::as_str));
        }
        if self.peers.is_empty() {
            s.push_str("(no peers)\n");
        }
        for p in &self.peers {
            if let Some(why) = &p.down_reason {
                let _ = writeln!(s, "{} is down: {}", printable(&p.name), printable(why));
            }
        }
    }

    /// The mesh: members, connections, clashes, refused claims.
    fn mesh_lines(&self, s: &mut String) {
        if let Some(m) = &self.mesh {
            let alive = m.members.iter().filter(|x| x.alive).count();
            let _ = writeln!(
                s,
                "\nmesh: {} members ({alive} alive), {} connections",
                m.members.len(),
                m.connections
            );
            if let Some(c) = &m.identity_clash {
                let _ = writeln!(s, "identity clash: {}", printable(c));
            }
            for c in &m.address_clashes {
                let _ = writeln!(s, "address clash: {}", printable(c));
            }
            for x in &m.members {
                if let Some(why) = &x.claims_refused {
                    let _ = writeln!(s, "not routed: {}: {}", printable(&x.name), printable(why));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_every_peer_field() {
        let st = Status {
            node: NodeStatus {
                name: "a".into(),
                region: Some("eu".into()),
                public_key: "KEY".into(),
                pod_cidrs: vec!["100.64.1.0/24".into()],
                private_address: Some("198.18.1.1".into()),
                public_address: None,
                region_source: Some("config".into()),
                private_address_source: Some("kubernetes".into()),
                public_address_source: None,
                interface: "weft0".into(),
                mtu: 1420,
                listen_port: 51820,
                observed_endpoints: vec!["198.19.0.101:40001".into()],
                home_relays: vec!["p1".into(), "p2".into()],
                certificate_not_after_ms: Some(1_830_000_000_000),
            },
            peers: vec![PeerStatus {
                name: "b".into(),
                region: None,
                public_key: "PK".into(),
                pod_cidrs: vec!["100.64.2.0/24".into()],
                endpoint: Some("198.18.1.2:51820".into()),
                endpoint_reason: "configured".into(),
                path: "encrypted".into(),
                state: "up".into(),
                down_reason: None,
                last_handshake_secs: Some(3),
                rx_bytes: 1234,
                tx_bytes: 5678,
                drops: Default::default(),
            }],
            drops: Default::default(),
            mesh: None,
            kubernetes: None,
        };
        let t = st.table();
        for want in [
            "node a (region eu)",
            "pod cidrs   100.64.1.0/24",
            "POD CIDRS",
            "100.64.2.0/24",
            "198.18.1.2:51820",
            "configured",
            "3s ago",
            "1234",
            "5678",
            "encrypted",
            "behind NAT  seen at 198.19.0.101:40001",
            "relays      registered with p1, p2",
            "certificate valid until 2027-12-28T",
        ] {
            assert!(t.contains(want), "{want} missing from\n{t}");
        }
        let json = serde_json::to_string(&st).unwrap();
        assert_eq!(serde_json::from_str::<Status>(&json).unwrap(), st);
    }

    #[test]
    fn gossip_names_and_regions_are_printed_without_control_characters() {
        let evil = "x\u{1b}]0;pwned\u{7}\u{1b}[2J\r\u{9b}31m\u{202e}gnp";
        let peer = PeerStatus {
            name: evil.into(),
            region: Some(evil.into()),
            public_key: "PK".into(),
            pod_cidrs: vec![],
            endpoint: None,
            endpoint_reason: "none".into(),
            path: "encrypted".into(),
            state: "down".into(),
            down_reason: Some(evil.into()),
            last_handshake_secs: None,
            rx_bytes: 0,
            tx_bytes: 0,
            drops: Default::default(),
        };
        let st = Status {
            node: NodeStatus {
                name: evil.into(),
                region: Some(evil.into()),
                public_key: "KEY".into(),
                pod_cidrs: vec![],
                private_address: None,
                public_address: None,
                region_source: None,
                private_address_source: None,
                public_address_source: None,
                interface: "weft0".into(),
                mtu: 1420,
                listen_port: 51820,
                observed_endpoints: vec!["198.19.0.101:40001".into()],
                home_relays: vec![evil.into()],
                certificate_not_after_ms: None,
            },
            peers: vec![peer],
            drops: Default::default(),
            mesh: None,
            kubernetes: None,
        };
        let bad = |c: char| (c.is_control() && c != '\n') || ('\u{202a}'..='\u{202e}').contains(&c);
        let table = st.table();
        assert!(!table.chars().any(bad), "{table:?}");
        assert!(table.contains("x?]0;pwned??[2J??31m?gnp"), "{table:?}");
        assert!(
            table.contains("relays      registered with x?]0;pwned"),
            "{table:?}"
        );
        // serde_json escapes C0 but writes DEL and C1 (U+009B starts a CSI sequence) raw; the
        // JSON `weft status --json` prints escapes them too and still carries the name as is.
        assert!(serde_json::to_string(&st).unwrap().contains('\u{9b}'));
        let json = st.json().unwrap();
        assert!(!json.chars().any(bad), "{json:?}");
        assert!(json.contains("\\u009b"), "{json}");
        assert_eq!(serde_json::from_str::<Status>(&json).unwrap(), st);
    }
}
