//! What weft reads from a Kubernetes Node object, pure: the region (the
//! `topology.kubernetes.io/region` label, else the deprecated
//! `failure-domain.beta.kubernetes.io/region`), the private and public addresses (`InternalIP`
//! and `ExternalIP`, overridden by the `weft.dev/private-address` and `weft.dev/public-address`
//! annotations — on another Node an annotation counts only when that node's signed mesh record
//! agrees, see [`vetted_addresses`]), the pod blocks (`spec.podCIDRs`, else `spec.podCIDR`) and the WireGuard key a
//! weft daemon published (`weft.dev/public-key`). The node source ([`crate::control::nodesource`]) builds
//! on this, and [`own_facts`] says where each of this node's facts came from.
//!
//! # A Node with a bad value
//!
//! Only what leaves nothing to go on refuses a Node ([`NodeError`]): a Node without a name
//! (nothing could be said of it), and `spec.podCIDRs` that are not CIDRs (the blocks the node
//! owns are unknown, and a member's claims must be its Node's; the API server validates
//! them, so only a broken API server sends one). A refused Node is out of the view, so its
//! member is not routed. Any other value that cannot be read is ignored as if it were absent,
//! and the Node is read without it: an address annotation or a status address (`InternalIP`,
//! `ExternalIP`) that is not an IP address, or is one no node is reached at (loopback,
//! unspecified, multicast, broadcast, link-local) (an annotation that is, say, a CIDR or
//! `127.0.0.1` leaves the Node at its `InternalIP` or `ExternalIP`; an empty annotation counts
//! as none). Each value
//! ignored is listed in [`NodeView::ignored`], which the node source warns of once per Node
//! and value: one bad annotation never takes a Node out of the cluster.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use tracing::debug;

use crate::control::claims::{ClaimPolicy, Refusal};

/// The region label.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// The deprecated region label (older clusters, the seeds' Pharos docs).
pub const REGION_LABEL_DEPRECATED: &str = "failure-domain.beta.kubernetes.io/region";
/// Overrides the private address.
pub const PRIVATE_ANNOTATION: &str = "weft.dev/private-address";
/// Overrides the public address.
pub const PUBLIC_ANNOTATION: &str = "weft.dev/public-address";
/// The WireGuard public key a weft daemon publishes on its Node.
pub const KEY_ANNOTATION: &str = "weft.dev/public-key";

/// A Node as weft sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// `metadata.name`.
    pub name: String,
    /// Its region.
    pub region: Option<String>,
    /// The address peers in its region use.
    pub private_address: Option<IpAddr>,
    /// The address peers in other regions use.
    pub public_address: Option<IpAddr>,
    /// Its pod blocks; empty until the controller manager assigns them.
    pub pod_cidrs: Vec<IpNet>,
    /// The WireGuard key it published, base64.
    pub public_key: Option<String>,
    /// `private_address` comes from the `weft.dev/private-address` annotation, not `InternalIP`.
    pub private_annotated: bool,
    /// `public_address` comes from the `weft.dev/public-address` annotation, not `ExternalIP`.
    pub public_annotated: bool,
    /// The Node's `InternalIP` (as the kubelet reports it), whatever the annotations say.
    pub internal_ip: Option<IpAddr>,
    /// The Node's `ExternalIP`, whatever the annotations say.
    pub external_ip: Option<IpAddr>,
    /// The values weft could not read and read the Node without (module docs).
    pub ignored: Vec<Ignored>,
}

/// A value on a Node that weft cannot read, and reads the Node without.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    /// The field: `annotation weft.dev/private-address`, `status.addresses[InternalIP]`.
    pub field: String,
    /// The value as written (at most [`MAX_SHOWN`] characters of it).
    pub value: String,
    /// What is wrong with it.
    pub problem: &'static str,
    /// What weft uses in its place, if anything.
    pub used: Option<IpAddr>,
}

/// The most characters of an ignored value kept to show (an annotation may be 256 KiB).
pub const MAX_SHOWN: usize = 100;

impl Ignored {
    fn new(field: String, value: &str, problem: &'static str, used: Option<IpAddr>) -> Self {
        Self {
            field,
            value: value.chars().take(MAX_SHOWN).collect(),
            problem,
            used,
        }
    }
}

/// Where one of this node's facts came from, as `weft status --json` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FactSource {
    /// The config file: `node.region`, `node.private_address`, `node.public_address`.
    Config,
    /// The Node object: its region label, its `InternalIP` or `ExternalIP`.
    Kubernetes,
    /// A `weft.dev/private-address` or `weft.dev/public-address` annotation on the Node.
    Annotation,
}

impl FactSource {
    /// `config`, `kubernetes` or `annotation`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Kubernetes => "kubernetes",
            Self::Annotation => "annotation",
        }
    }
}

/// A Node that cannot be read, naming the node and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node {node}: {field}: {problem}")]
pub struct NodeError {
    /// The node.
    pub node: String,
    /// The field.
    pub field: String,
    /// What is wrong.
    pub problem: String,
}

impl NodeView {
    /// Reads `node`: refused only without a name or with unreadable `spec.podCIDRs`; any other
    /// value that cannot be read is left out and listed in [`NodeView::ignored`] (module docs).
    pub fn from_node(node: &Node) -> Result<Self, NodeError> {
        let name = match node.metadata.name.as_deref() {
            Some(n) if !n.is_empty() => n.to_owned(),
            _ => {
                return Err(NodeError {
                    node: "(no name)".into(),
                    field: "metadata.name".into(),
                    problem: "missing: a Node is known by its name".into(),
                });
            }
        };
        let labels = node.metadata.labels.clone().unwrap_or_default();
        let annotations = node.metadata.annotations.clone().unwrap_or_default();
        let region = labels
            .get(REGION_LABEL)
            .or_else(|| labels.get(REGION_LABEL_DEPRECATED))
            .filter(|r| !r.is_empty())
            .cloned();
        let mut ignored = Vec::new();
        let addresses = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_deref())
            .unwrap_or_default();
        // The first address of `kind` that is one; those before it are ignored.
        let mut status_address = |kind: &str| -> Option<IpAddr> {
            let before = ignored.len();
            let found =
                addresses.iter().filter(|a| a.type_ == kind).find_map(|a| {
                    match underlay_ip(&a.address) {
                        Ok(ip) => Some(ip),
                        Err(why) => {
                            let field = format!("status.addresses[{kind}]");
                            ignored.push(Ignored::new(field, &a.address, why, None));
                            None
                        }
                    }
                });
            for i in &mut ignored[before..] {
                i.used = found;
            }
            found
        };
        let (internal_ip, external_ip) =
            (status_address("InternalIP"), status_address("ExternalIP"));
        // An annotation's address, else `status` (and whether the annotation gave it).
        let mut annotated = |key: &str, status: Option<IpAddr>| -> (Option<IpAddr>, bool) {
            let Some(v) = annotations.get(key).filter(|v| !v.is_empty()) else {
                return (status, false);
            };
            match underlay_ip(v) {
                Ok(a) => (Some(a), true),
                Err(why) => {
                    let field = format!("annotation {key}");
                    ignored.push(Ignored::new(field, v, why, status));
                    (status, false)
                }
            }
        };
        let (private_address, private_annotated) = annotated(PRIVATE_ANNOTATION, internal_ip);
        let (public_address, public_annotated) = annotated(PUBLIC_ANNOTATION, external_ip);
        let pod_cidrs = pod_cidrs_of(&name, node)?;
        Ok(Self {
            name,
            region,
            private_address,
            public_address,
            pod_cidrs,
            public_key: annotations.get(KEY_ANNOTATION).cloned(),
            private_annotated,
            public_annotated,
            internal_ip,
            external_ip,
            ignored,
        })
    }
}

/// Node `name`'s blocks: `spec.podCIDRs`, else `spec.podCIDR`; one that is not a CIDR refuses
/// the Node (its blocks would be unknown).
fn pod_cidrs_of(name: &str, node: &Node) -> Result<Vec<IpNet>, NodeError> {
    let spec = node.spec.clone().unwrap_or_default();
    let cidrs = match (spec.pod_cidrs, spec.pod_cidr) {
        (Some(list), _) if !list.is_empty() => list,
        (_, Some(one)) if !one.is_empty() => vec![one],
        _ => Vec::new(),
    };
    cidrs
        .iter()
        .map(|c| {
            c.parse::<IpNet>()
                .map(|n| n.trunc())
                .map_err(|_| NodeError {
                    node: name.to_owned(),
                    field: "spec.podCIDRs".into(),
                    problem: format!("{c:?} is not a CIDR"),
                })
        })
        .collect()
}

/// Why an address is ignored.
const NOT_AN_IP: &str = "not an IP address";
const NOT_UNICAST: &str = "not an address a node is reached at (loopback, unspecified, multicast, broadcast or link-local)";

/// A Node's address as weft may use it (this node's own in its record, another's to dial and
/// route to): an IP address that [`weft_config::value::unicast`] allows, IPv4-mapped ones as IPv4. A
/// loopback annotation would have this node publish an address every peer refuses, and have
/// the others dial themselves.
fn underlay_ip(v: &str) -> Result<IpAddr, &'static str> {
    let ip = v.parse::<IpAddr>().map_err(|_| NOT_AN_IP)?.to_canonical();
    if weft_config::value::unicast(ip) {
        Ok(ip)
    } else {
        Err(NOT_UNICAST)
    }
}

/// Whether this node may take its Node's `spec.podCIDRs` as its blocks: each must be a block
/// the peers accept of a member ([`ClaimPolicy::check_block`]: inside
/// `network.pod_network_cidr`, no broader than a node block of its family). Any other would
/// carry this node's TUN address, state, masquerade and CNI config while every peer refused
/// its claims. The first refused, with why.
pub fn check_pod_cidrs(pod_cidrs: &[IpNet], policy: &ClaimPolicy) -> Result<(), Refusal> {
    pod_cidrs.iter().try_for_each(|c| policy.check_block(c))
}

/// This node's facts once the config has had its say: an explicit `node.region`,
/// `node.private_address` or `node.public_address` wins over the Node object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnFacts {
    /// The region.
    pub region: Option<String>,
    /// The private address.
    pub private_address: Option<IpAddr>,
    /// The public address.
    pub public_address: Option<IpAddr>,
    /// Where the region came from; `None` when there is none.
    pub region_source: Option<FactSource>,
    /// Where the private address came from.
    pub private_address_source: Option<FactSource>,
    /// Where the public address came from.
    pub public_address_source: Option<FactSource>,
}

impl OwnFacts {
    /// The facts the config alone gives (no Node seen yet, or no Kubernetes).
    pub fn from_config(node: &weft_config::Node) -> Self {
        let from = |set: bool| set.then_some(FactSource::Config);
        Self {
            region: node.region.clone(),
            private_address: node.private_address,
            public_address: node.public_address,
            region_source: from(node.region.is_some()),
            private_address_source: from(node.private_address.is_some()),
            public_address_source: from(node.public_address.is_some()),
        }
    }
}

/// Merges this node's Node view under the config's explicit values.
pub fn own_facts(me: &NodeView, node: &weft_config::Node) -> OwnFacts {
    let mut f = OwnFacts::from_config(node);
    let node_source = |annotated: bool| {
        if annotated {
            FactSource::Annotation
        } else {
            FactSource::Kubernetes
        }
    };
    if f.region.is_none() && me.region.is_some() {
        f.region.clone_from(&me.region);
        f.region_source = Some(FactSource::Kubernetes);
    }
    if f.private_address.is_none() && me.private_address.is_some() {
        f.private_address = me.private_address;
        f.private_address_source = Some(node_source(me.private_annotated));
    }
    if f.public_address.is_none() && me.public_address.is_some() {
        f.public_address = me.public_address;
        f.public_address_source = Some(node_source(me.public_annotated));
    }
    f
}

/// The addresses another node's mesh record signs, by node name: (private, public).
pub type SignedAddresses = BTreeMap<String, (Option<IpAddr>, Option<IpAddr>)>;

/// The addresses weft uses for another Node: (private, public). An address annotation counts
/// only when the node's own signed mesh record carries the same address; otherwise (no record
/// yet, or a different address) it is ignored and the Node's `InternalIP` / `ExternalIP` is
/// used. Anyone who may patch Nodes can write annotations; only the node itself can sign its
/// record.
pub fn vetted_addresses(
    n: &NodeView,
    signed: &SignedAddresses,
) -> (Option<IpAddr>, Option<IpAddr>) {
    let record = signed.get(&n.name);
    let vet = |annotated: bool, address: Option<IpAddr>, status: Option<IpAddr>, which: &str| {
        if !annotated {
            return address;
        }
        let agrees = record.is_some_and(|(private, public)| {
            address.is_some() && (address == *private || address == *public)
        });
        if !agrees {
            debug!(node = %n.name, annotation = which, address = ?address, used = ?status,
                   "ignoring another Node's address annotation its signed mesh record does not carry");
            return status;
        }
        address
    };
    (
        vet(
            n.private_annotated,
            n.private_address,
            n.internal_ip,
            PRIVATE_ANNOTATION,
        ),
        vet(
            n.public_annotated,
            n.public_address,
            n.external_ip,
            PUBLIC_ANNOTATION,
        ),
    )
}

/// The gossip addresses of the other nodes, to bootstrap from: the private address of a node in
/// this node's region, the public one (else the private one) of any other, each vetted by
/// [`vetted_addresses`] against the mesh's signed records.
pub fn bootstrap(
    others: &[NodeView],
    my_region: Option<&str>,
    mesh_port: u16,
    signed: &SignedAddresses,
) -> Vec<std::net::SocketAddr> {
    let mut out: Vec<std::net::SocketAddr> = others
        .iter()
        .filter_map(|n| {
            let (private, public) = vetted_addresses(n, signed);
            let same = my_region.is_some() && n.region.as_deref() == my_region;
            let addr = if same {
                private.or(public)
            } else {
                public.or(private)
            };
            addr.map(|a| std::net::SocketAddr::new(a, mesh_port))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(json: serde_json::Value) -> Node {
        serde_json::from_value(json).expect("a Node")
    }

    #[test]
    fn labels_addresses_annotations_and_pod_cidrs_are_read_with_their_fallbacks() {
        let n = node(serde_json::json!({
            "metadata": {"name": "n1",
                "labels": {"failure-domain.beta.kubernetes.io/region": "eu-west"},
                "annotations": {"weft.dev/public-address": "198.19.0.1", "weft.dev/public-key": "KEY"}},
            "spec": {"podCIDR": "100.64.1.0/24", "podCIDRs": ["100.64.1.0/24", "fd00:64:0:1::/64"]},
            "status": {"addresses": [{"type": "InternalIP", "address": "198.18.1.1"},
                                     {"type": "ExternalIP", "address": "203.0.113.9"},
                                     {"type": "Hostname", "address": "n1"}]}
        }));
        let v = NodeView::from_node(&n).unwrap();
        assert_eq!(v.region.as_deref(), Some("eu-west"), "the deprecated label");
        assert_eq!(v.private_address, Some("198.18.1.1".parse().unwrap()));
        assert_eq!(
            v.public_address,
            Some("198.19.0.1".parse().unwrap()),
            "the annotation wins"
        );
        assert_eq!(v.pod_cidrs.len(), 2);
        assert_eq!(v.public_key.as_deref(), Some("KEY"));
        // The current label wins over the deprecated one.
        let n = node(serde_json::json!({"metadata": {"name": "n2", "labels": {
            "topology.kubernetes.io/region": "us-east",
            "failure-domain.beta.kubernetes.io/region": "old"}}}));
        let v = NodeView::from_node(&n).unwrap();
        assert_eq!(v.region.as_deref(), Some("us-east"));
        assert!(v.pod_cidrs.is_empty(), "no podCIDR yet: the node waits");
    }

    #[test]
    fn the_config_wins_and_bootstrap_addresses_follow_the_regions() {
        let view = |name: &str, region: &str, private: &str, public: Option<&str>| NodeView {
            name: name.into(),
            region: Some(region.into()),
            private_address: Some(private.parse().unwrap()),
            public_address: public.map(|p| p.parse().unwrap()),
            pod_cidrs: vec![],
            public_key: None,
            private_annotated: false,
            public_annotated: false,
            internal_ip: Some(private.parse().unwrap()),
            external_ip: public.map(|p| p.parse().unwrap()),
            ignored: vec![],
        };
        let me = view("n1", "eu", "198.18.1.1", Some("198.19.0.1"));
        let mut cfg = weft_config::Config::parse(
            "node:\n  region: pinned\n",
            std::path::Path::new("w.yaml"),
            "n1",
        )
        .unwrap()
        .node;
        let f = own_facts(&me, &cfg);
        assert_eq!(f.region.as_deref(), Some("pinned"));
        assert_eq!(f.private_address, me.private_address);
        cfg.region = None;
        assert_eq!(own_facts(&me, &cfg).region.as_deref(), Some("eu"));
        let others = [
            view("n2", "eu", "198.18.1.2", Some("198.19.0.2")),
            view("n3", "us", "198.18.2.3", Some("198.19.0.3")),
            view("n4", "us", "198.18.2.4", None),
        ];
        let b: Vec<String> = bootstrap(&others, Some("eu"), 6783, &SignedAddresses::new())
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(b, ["198.18.1.2:6783", "198.18.2.4:6783", "198.19.0.3:6783"]);
    }

    #[test]
    fn another_nodes_address_annotation_counts_only_when_its_signed_record_agrees() {
        // n2's Node says InternalIP 198.18.1.2, but someone who may patch Nodes annotated it
        // with an address of their own.
        let n2 = NodeView::from_node(&node(serde_json::json!({
            "metadata": {"name": "n2", "labels": {"topology.kubernetes.io/region": "eu"},
                "annotations": {"weft.dev/private-address": "198.18.9.9",
                                "weft.dev/public-address": "198.19.9.9"}},
            "status": {"addresses": [{"type": "InternalIP", "address": "198.18.1.2"},
                                     {"type": "ExternalIP", "address": "198.19.0.2"}]}})))
        .unwrap();
        let dial = |signed: &SignedAddresses, region| -> Vec<String> {
            bootstrap(std::slice::from_ref(&n2), Some(region), 6783, signed)
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        let ip = |a: &str| Some(a.parse::<IpAddr>().unwrap());
        // No record yet: the status addresses, not the annotations.
        let none = SignedAddresses::new();
        assert_eq!(
            vetted_addresses(&n2, &none),
            (ip("198.18.1.2"), ip("198.19.0.2"))
        );
        assert_eq!(dial(&none, "eu"), ["198.18.1.2:6783"]);
        assert_eq!(dial(&none, "us"), ["198.19.0.2:6783"]);
        // A record with other addresses: still ignored.
        let other = SignedAddresses::from([("n2".into(), (ip("198.18.1.2"), ip("198.19.0.2")))]);
        assert_eq!(dial(&other, "eu"), ["198.18.1.2:6783"]);
        // A record that signs the annotated addresses (the node moved): used.
        let agrees = SignedAddresses::from([("n2".into(), (ip("198.18.9.9"), ip("198.19.9.9")))]);
        assert_eq!(
            vetted_addresses(&n2, &agrees),
            (ip("198.18.9.9"), ip("198.19.9.9"))
        );
        assert_eq!(dial(&agrees, "eu"), ["198.18.9.9:6783"]);
        // A record under another name does not vouch for n2.
        let elsewhere =
            SignedAddresses::from([("n3".into(), (ip("198.18.9.9"), ip("198.19.9.9")))]);
        assert_eq!(dial(&elsewhere, "us"), ["198.19.0.2:6783"]);
    }

    #[test]
    fn each_fact_names_its_source_config_label_address_or_annotation() {
        let n = node(serde_json::json!({
            "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/region": "eu"},
                "annotations": {"weft.dev/public-address": "198.19.0.1"}},
            "status": {"addresses": [{"type": "InternalIP", "address": "198.18.1.1"},
                                     {"type": "ExternalIP", "address": "203.0.113.9"}]}
        }));
        let me = NodeView::from_node(&n).unwrap();
        let parse = |text: &str| {
            weft_config::Config::parse(text, std::path::Path::new("w.yaml"), "n1")
                .unwrap()
                .node
        };
        let src = |f: &OwnFacts| {
            [
                f.region_source,
                f.private_address_source,
                f.public_address_source,
            ]
            .map(|s| s.map(FactSource::as_str))
        };
        let f = own_facts(&me, &parse("node: {}\n"));
        assert_eq!(
            src(&f),
            [Some("kubernetes"), Some("kubernetes"), Some("annotation")]
        );
        assert_eq!(f.public_address, Some("198.19.0.1".parse().unwrap()));
        let f = own_facts(
            &me,
            &parse("node:\n  region: pinned\n  private_address: 198.18.9.9\n"),
        );
        assert_eq!(
            src(&f),
            [Some("config"), Some("config"), Some("annotation")]
        );
        assert_eq!(f.private_address, Some("198.18.9.9".parse().unwrap()));
        let bare =
            NodeView::from_node(&node(serde_json::json!({"metadata": {"name": "n1"}}))).unwrap();
        assert_eq!(src(&own_facts(&bare, &parse("node: {}\n"))), [None; 3]);
    }

    #[test]
    fn a_bad_address_annotation_is_ignored_and_the_node_kept_with_its_status_addresses() {
        let n = node(serde_json::json!({
            "metadata": {"name": "n3",
                "annotations": {"weft.dev/private-address": "10.0.0.5/24",
                                "weft.dev/public-address": "not-an-ip"}},
            "spec": {"podCIDRs": ["100.64.3.0/24"]},
            "status": {"addresses": [{"type": "InternalIP", "address": "198.18.1.3"},
                                     {"type": "ExternalIP", "address": "198.19.0.3"}]}
        }));
        let v = NodeView::from_node(&n).expect("the Node is kept");
        assert_eq!(v.name, "n3");
        assert_eq!(v.pod_cidrs, ["100.64.3.0/24".parse::<IpNet>().unwrap()]);
        // As without the annotations: InternalIP and ExternalIP.
        assert_eq!(v.private_address, Some("198.18.1.3".parse().unwrap()));
        assert_eq!(v.public_address, Some("198.19.0.3".parse().unwrap()));
        assert!(!v.private_annotated && !v.public_annotated);
        // Each named with its field, its value and what is used instead.
        let ip = |a: &str| Some(a.parse::<IpAddr>().unwrap());
        assert_eq!(
            v.ignored,
            [
                Ignored::new(
                    "annotation weft.dev/private-address".into(),
                    "10.0.0.5/24",
                    "not an IP address",
                    ip("198.18.1.3")
                ),
                Ignored::new(
                    "annotation weft.dev/public-address".into(),
                    "not-an-ip",
                    "not an IP address",
                    ip("198.19.0.3")
                ),
            ]
        );
        // A bad status address is left out the same way: the next InternalIP, or none.
        let n = node(serde_json::json!({
            "metadata": {"name": "n4", "annotations": {"weft.dev/private-address": ""}},
            "status": {"addresses": [{"type": "InternalIP", "address": "bogus"},
                                     {"type": "InternalIP", "address": "198.18.1.4"},
                                     {"type": "ExternalIP", "address": "x".repeat(300)}]}
        }));
        let v = NodeView::from_node(&n).expect("the Node is kept");
        assert_eq!(
            v.private_address,
            ip("198.18.1.4"),
            "an empty annotation is none"
        );
        assert_eq!((v.internal_ip, v.external_ip), (ip("198.18.1.4"), None));
        let shown: Vec<(&str, usize, Option<IpAddr>)> = v
            .ignored
            .iter()
            .map(|i| (i.field.as_str(), i.value.len(), i.used))
            .collect();
        assert_eq!(
            shown,
            [
                ("status.addresses[InternalIP]", 5, ip("198.18.1.4")),
                ("status.addresses[ExternalIP]", MAX_SHOWN, None),
            ]
        );
    }

    #[test]
    fn the_nodes_pod_cidrs_are_taken_only_where_the_peers_accept_them() {
        let policy = |pools: &[&str]| ClaimPolicy {
            pools: pools.iter().map(|p| p.parse().unwrap()).collect(),
            mask_v4: 24,
            mask_v6: 64,
            authorities: vec![],
        };
        let nets = |c: &[&str]| -> Vec<IpNet> { c.iter().map(|c| c.parse().unwrap()).collect() };
        let dual = policy(&["100.64.0.0/16", "fd00:64::/48"]);
        for ok in [
            &["100.64.1.0/24"][..],
            &["100.64.1.0/24", "fd00:64:0:1::/64"],
            &["100.64.1.0/26"],
            &[],
        ] {
            assert_eq!(check_pod_cidrs(&nets(ok), &dual), Ok(()), "{ok:?}");
        }
        // Outside the pool (a cluster CIDR that is not pod_network_cidr), or of a family
        // without one: refused, naming the CIDR, as every peer refuses it.
        let v4 = policy(&["100.64.0.0/16"]);
        for (bad, why) in [
            (
                &["10.244.1.0/24"][..],
                Refusal::OutsidePool(nets(&["10.244.1.0/24"])[0]),
            ),
            (
                &["100.64.1.0/24", "fd00:64:0:1::/64"],
                Refusal::OutsidePool(nets(&["fd00:64:0:1::/64"])[0]),
            ),
            (
                &["100.64.0.0/20"],
                Refusal::TooBroad {
                    claim: nets(&["100.64.0.0/20"])[0],
                    mask: 24,
                },
            ),
        ] {
            assert_eq!(check_pod_cidrs(&nets(bad), &v4), Err(why), "{bad:?}");
        }
    }

    #[test]
    fn a_node_without_a_name_is_refused() {
        for meta in [serde_json::json!({}), serde_json::json!({"name": ""})] {
            let n = node(serde_json::json!({"metadata": meta,
                "spec": {"podCIDRs": ["100.64.1.0/24"]}}));
            let e = NodeView::from_node(&n).expect_err("no name").to_string();
            assert!(e.contains("metadata.name"), "{e}");
        }
    }

    #[test]
    fn an_address_no_node_is_reached_at_is_ignored_and_the_status_address_used() {
        let n = node(serde_json::json!({"metadata": {"name": "n5",
                "annotations": {"weft.dev/private-address": "127.0.0.1",
                                "weft.dev/public-address": "ff02::1"}},
            "status": {"addresses": [{"type": "InternalIP", "address": "198.18.5.1"},
                                     {"type": "ExternalIP", "address": "169.254.1.1"}]}}));
        let v = NodeView::from_node(&n).expect("ignored, not refused");
        assert_eq!(v.private_address, Some("198.18.5.1".parse().unwrap()));
        assert!(!v.private_annotated, "the annotation was not used");
        assert_eq!(
            v.public_address, None,
            "neither the annotation nor the status address"
        );
        let fields: Vec<(&str, &str)> = v
            .ignored
            .iter()
            .map(|i| (i.field.as_str(), i.value.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                ("status.addresses[ExternalIP]", "169.254.1.1"),
                ("annotation weft.dev/private-address", "127.0.0.1"),
                ("annotation weft.dev/public-address", "ff02::1"),
            ]
        );
        assert!(
            v.ignored.iter().all(|i| i.problem == NOT_UNICAST),
            "{:?}",
            v.ignored
        );
        // Nothing of it is dialled: the Node's only usable address is its InternalIP.
        let only_loopback = node(serde_json::json!({"metadata": {"name": "n6"},
            "status": {"addresses": [{"type": "InternalIP", "address": "::ffff:127.0.0.1"}]}}));
        let w = NodeView::from_node(&only_loopback).expect("view");
        assert_eq!(
            bootstrap(&[v, w], None, 7946, &SignedAddresses::new()),
            ["198.18.5.1:7946".parse().unwrap()]
        );
    }

    /// Was `a_bad_address_or_cidr_names_the_node_and_the_field`, which asserted that a bad
    /// address annotation refused the whole Node: now only a bad CIDR does, and a bad address
    /// is ignored, named with its field ([`NodeView::ignored`]).
    #[test]
    fn a_bad_cidr_refuses_the_node_naming_it_and_a_bad_address_is_only_ignored() {
        let n = node(serde_json::json!({"metadata": {"name": "n3",
            "annotations": {"weft.dev/private-address": "not-an-ip"}}}));
        let v = NodeView::from_node(&n).expect("a bad address does not refuse the Node");
        assert_eq!(v.private_address, None);
        assert_eq!(v.ignored.len(), 1);
        assert_eq!(v.ignored[0].field, "annotation weft.dev/private-address");
        assert_eq!(v.ignored[0].value, "not-an-ip");
        let n = node(
            serde_json::json!({"metadata": {"name": "n4"}, "spec": {"podCIDRs": ["100.64.1.0/33"]}}),
        );
        let e = NodeView::from_node(&n).unwrap_err().to_string();
        assert!(
            e.contains("n4") && e.contains("spec.podCIDRs") && e.contains("100.64.1.0/33"),
            "{e}"
        );
    }
}
