//! What weft reads from a Kubernetes Node object, pure: the region (the
//! `topology.kubernetes.io/region` label, else the deprecated
//! `failure-domain.beta.kubernetes.io/region`), the private and public addresses (`InternalIP`
//! and `ExternalIP`, overridden by the `weft.dev/private-address` and `weft.dev/public-address`
//! annotations — on another Node an annotation counts only when that node's signed mesh record
//! agrees, see [`vetted_addresses`]), the pod blocks (`spec.podCIDRs`, else `spec.podCIDR`) and the WireGuard key a
//! weft daemon published (`weft.dev/public-key`). The node source ([`crate::control::nodesource`]) builds
//! on this, and [`own_facts`] says where each of this node's facts came from.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use tracing::debug;

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
    /// Reads `node`.
    pub fn from_node(node: &Node) -> Result<Self, NodeError> {
        let name = node.metadata.name.clone().unwrap_or_default();
        let bad = |field: &str, problem: String| NodeError {
            node: name.clone(),
            field: field.to_owned(),
            problem,
        };
        let labels = node.metadata.labels.clone().unwrap_or_default();
        let annotations = node.metadata.annotations.clone().unwrap_or_default();
        let region = labels
            .get(REGION_LABEL)
            .or_else(|| labels.get(REGION_LABEL_DEPRECATED))
            .filter(|r| !r.is_empty())
            .cloned();
        let status_address = |kind: &str| -> Result<Option<IpAddr>, NodeError> {
            let Some(a) = node
                .status
                .as_ref()
                .and_then(|s| s.addresses.as_ref())
                .and_then(|a| a.iter().find(|a| a.type_ == kind))
            else {
                return Ok(None);
            };
            a.address.parse().map(Some).map_err(|_| {
                bad(
                    &format!("status.addresses[{kind}]"),
                    format!("{:?} is not an IP address", a.address),
                )
            })
        };
        let annotated = |key: &str| -> Result<Option<IpAddr>, NodeError> {
            annotations
                .get(key)
                .map(|v| {
                    v.parse().map_err(|_| {
                        bad(
                            &format!("annotation {key}"),
                            format!("{v:?} is not an IP address"),
                        )
                    })
                })
                .transpose()
        };
        let (internal_ip, external_ip) =
            (status_address("InternalIP")?, status_address("ExternalIP")?);
        let (private_address, private_annotated) = match annotated(PRIVATE_ANNOTATION)? {
            Some(a) => (Some(a), true),
            None => (internal_ip, false),
        };
        let (public_address, public_annotated) = match annotated(PUBLIC_ANNOTATION)? {
            Some(a) => (Some(a), true),
            None => (external_ip, false),
        };
        let spec = node.spec.clone().unwrap_or_default();
        let cidrs = match (spec.pod_cidrs, spec.pod_cidr) {
            (Some(list), _) if !list.is_empty() => list,
            (_, Some(one)) if !one.is_empty() => vec![one],
            _ => Vec::new(),
        };
        let pod_cidrs = cidrs
            .iter()
            .map(|c| {
                c.parse::<IpNet>()
                    .map(|n| n.trunc())
                    .map_err(|_| bad("spec.podCIDRs", format!("{c:?} is not a CIDR")))
            })
            .collect::<Result<Vec<_>, _>>()?;
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
        })
    }
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
    fn a_bad_address_or_cidr_names_the_node_and_the_field() {
        let n = node(serde_json::json!({"metadata": {"name": "n3",
            "annotations": {"weft.dev/private-address": "not-an-ip"}}}));
        let e = NodeView::from_node(&n).unwrap_err().to_string();
        assert!(
            e.contains("n3") && e.contains("weft.dev/private-address") && e.contains("not-an-ip"),
            "{e}"
        );
        let n = node(
            serde_json::json!({"metadata": {"name": "n4"}, "spec": {"podCIDRs": ["100.64.1.0/33"]}}),
        );
        let e = NodeView::from_node(&n).unwrap_err().to_string();
        assert!(e.contains("n4") && e.contains("spec.podCIDRs"), "{e}");
    }
}
