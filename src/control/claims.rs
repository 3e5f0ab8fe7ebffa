//! Which pod-CIDR claims of the mesh's members are believed. Pure: the control loop vets the
//! members of every snapshot before IPAM weighs their claims and before the router is given
//! their prefixes, so a refused record neither routes nor takes a block.
//!
//! A member's signature proves who speaks, not that what it says about pod blocks is fair. A
//! record is refused whole (not routed at all, never routed more broadly) when one of its
//! claims:
//! - lies outside `network.pod_network_cidr`, or is broader than a node block of its family
//!   (`0.0.0.0/0` or the whole pool would make one member every node's only routed peer);
//! - with Kubernetes, differs from the prefixes the member's Node has in `spec.podCIDRs` (the
//!   API server, not the member, says which blocks a node owns);
//! - is stamped more than [`MAX_SKEW_MS`] in the future (a claim time is meant to be old, and
//!   a future stamp is no honest clock's);
//! - has no claim time at all (the lists differ in length);
//! - is a second claim of the same family (IPv4 or IPv6): an honest node holds one block per
//!   pool, and Kubernetes gives a Node one pod CIDR per family, so more would only let one
//!   member take many nodes' blocks at once.
//!
//! - is back-dated ([`ClaimHistory`]): a claim that first shows up in a new version of a
//!   member's record, stamped more than [`MAX_SKEW_MS`] before the earlier version this node
//!   holds, in which the member (signing with its own clock) did not hold it. An honest node
//!   stamps a claim when it makes it and publishes it at once, so its claim times are never
//!   older than its own earlier records that lacked them; a member that invents an older time
//!   to take a block that another node holds contradicts its own signed record. Each node
//!   republishes its record (a new version, stamped with its clock) every
//!   `mesh.record_refresh` (default 10 minutes), so a member can back-date by at most that plus the skew.
//!
//! - with `mesh.authority` (standalone mode), lacks a certificate signed by the authority,
//!   issued to the member's own WireGuard key and not expired, that names the claim: the
//!   authority, not the claim time, says which blocks a node owns;
//! - with `mesh.authority`, names a block that a later-issued certificate (another member's,
//!   or this node's own) names too ([`ClaimPolicy::supersede`]): the authority's latest word
//!   on a block is what holds, so an operator moves a block to another node by issuing that
//!   node a certificate, and the earlier holder's certificate no longer counts for it whatever
//!   its claim time. Certificates issued at the same moment leave it to the claim times.
//!
//! What this cannot refuse without an authority, so that in standalone mode it detects a liar
//! but does not bound one (with Kubernetes, the Node rule above does; with an authority, the
//! certificate rule does):
//! - a member first seen with old claims: the other side of a healed partition looks the same,
//!   and it is believed so that every node settles the same winner there. A member holding the
//!   cluster secret can make a fresh identity, whose first record is believed;
//! - a back-dated claim seen by a node that never held the member's earlier record (one that
//!   joined after the lie, or lost its `state_dir`; the history is saved there, so a restart
//!   keeps it);
//! - a member publishing versions far behind its clock (weft never does; a modified build
//!   could), or one that set a long `mesh.record_refresh`, widens its own window.

use std::collections::{HashMap, HashSet};
use std::fmt;

use ipnet::IpNet;
use weft_mesh::{Authority, CertError, Member, NodeCert};

use super::{ClusterNode, ClusterNodes};

/// How far in the future a claim time may be (clock skew between honest nodes).
pub const MAX_SKEW_MS: u64 = 5 * 60 * 1000;

/// What makes a claim believable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimPolicy {
    /// `network.pod_network_cidr`.
    pub pools: Vec<IpNet>,
    /// The node block size for IPv4.
    pub mask_v4: u8,
    /// The node block size for IPv6.
    pub mask_v6: u8,
    /// `mesh.authority`: when any, a claim is believed only when the member's certificate,
    /// signed by one of them, names it.
    pub authorities: Vec<Authority>,
}

/// Why a member's record is not believed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A claim outside every pool.
    OutsidePool(IpNet),
    /// A claim broader than a node block.
    TooBroad {
        /// The claim.
        claim: IpNet,
        /// The node block size of its family.
        mask: u8,
    },
    /// With Kubernetes: the member names a Node whose published WireGuard key
    /// (`weft.dev/public-key`) is another, or none yet.
    NotTheNodeKey {
        /// The Node it names.
        node: String,
        /// The key the Node carries, if any.
        published: Option<String>,
    },
    /// With Kubernetes: the claims are not the Node's `spec.podCIDRs`.
    NotTheNodes {
        /// What the member claims.
        claims: Vec<IpNet>,
        /// What its Node says.
        node: Vec<IpNet>,
    },
    /// A claim stamped in the future.
    Future {
        /// The claim.
        claim: IpNet,
        /// Its claim time (ms since the epoch).
        at: u64,
        /// This node's clock then.
        now: u64,
    },
    /// More than one claim of one family.
    TooMany {
        /// The claims of that family.
        claims: Vec<IpNet>,
    },
    /// A claim stamped before an earlier record of the member's own that did not hold it.
    BackDated {
        /// The claim.
        claim: IpNet,
        /// Its claim time (ms since the epoch, the member's clock).
        at: u64,
        /// The version (the member's clock when it signed it) of the earlier record without it.
        without: u64,
    },
    /// With an authority: the record carries no certificate.
    Uncertified,
    /// With an authority: the certificate is not good (another signer or node, expired).
    BadCertificate(CertError),
    /// With an authority: a claim the member's certificate does not name.
    NotCertified {
        /// The claim.
        claim: IpNet,
        /// What the certificate names.
        certified: Vec<IpNet>,
    },
    /// With an authority: a block of the member's certificate is named by a later-issued one.
    Superseded {
        /// The block.
        claim: IpNet,
        /// When the member's certificate was issued (ms since the epoch).
        issued_at: u64,
        /// When the later one was.
        by: u64,
    },
    /// Claims and claim times differ in number.
    Unstamped {
        /// The number of claims.
        claims: usize,
        /// The number of claim times.
        times: usize,
    },
}

impl Refusal {
    /// The metric label of this reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::OutsidePool(_) => "outside_pool",
            Self::TooBroad { .. } => "too_broad",
            Self::NotTheNodes { .. } => "not_the_nodes",
            Self::NotTheNodeKey { .. } => "not_the_node_key",
            Self::Future { .. } => "future",
            Self::Unstamped { .. } => "unstamped",
            Self::TooMany { .. } => "too_many",
            Self::BackDated { .. } => "backdated",
            Self::Uncertified => "uncertified",
            Self::BadCertificate(_) => "bad_certificate",
            Self::NotCertified { .. } => "not_certified",
            Self::Superseded { .. } => "superseded",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutsidePool(c) => {
                write!(f, "its pod CIDR {c} is outside network.pod_network_cidr")
            }
            Self::TooBroad { claim, mask } => write!(
                f,
                "its pod CIDR {claim} is broader than a node block (/{mask})"
            ),
            Self::NotTheNodeKey { node, published } => write!(
                f,
                "it names Node {node}, whose weft.dev/public-key is {}, not this member's key",
                published.as_deref().unwrap_or("not set yet")
            ),
            Self::NotTheNodes { claims, node } => write!(
                f,
                "its pod CIDRs {claims:?} are not its Node's spec.podCIDRs {node:?}"
            ),
            Self::Future { claim, at, now } => write!(
                f,
                "its claim of {claim} is stamped {} s in the future",
                at.saturating_sub(*now) / 1000
            ),
            Self::BackDated { claim, at, without } => write!(
                f,
                "its claim of {claim} is back-dated: stamped {} s before its own record of {} ms, which did not hold it",
                without.saturating_sub(*at) / 1000,
                without
            ),
            Self::Uncertified => write!(
                f,
                "it has no certificate, and mesh.authority says which blocks a node may claim"
            ),
            Self::BadCertificate(e) => write!(f, "its certificate is not good: {e}"),
            Self::NotCertified { claim, certified } => write!(
                f,
                "its claim of {claim} is not in its certificate, which names {certified:?}"
            ),
            Self::Unstamped { claims, times } => {
                write!(f, "it claims {claims} pod CIDRs with {times} claim times")
            }
            Self::Superseded {
                claim,
                issued_at,
                by,
            } => write!(
                f,
                "its certificate for {claim} (issued at {issued_at} ms) is superseded by one issued later (at {by} ms) for the same block"
            ),
            Self::TooMany { claims } => write!(
                f,
                "it claims {} pod CIDRs of one family ({claims:?}); a node holds one per family",
                claims.len()
            ),
        }
    }
}

impl ClaimPolicy {
    /// The policy of a validated config, with its authority (`mesh.authority`, checked).
    pub fn from_config(network: &weft_config::Network, authorities: Vec<Authority>) -> Self {
        Self {
            pools: network.pod_network_cidr.clone(),
            mask_v4: network.node_cidr_mask_size_ipv4,
            mask_v6: network.node_cidr_mask_size_ipv6,
            authorities,
        }
    }

    /// The node block size of `net`'s family.
    pub fn node_mask(&self, net: &IpNet) -> u8 {
        match net {
            IpNet::V4(_) => self.mask_v4,
            IpNet::V6(_) => self.mask_v6,
        }
    }

    /// A claimed block's place: inside a pool, no broader than a node block of its family.
    pub fn check_block(&self, claim: &IpNet) -> Result<(), Refusal> {
        let Some(pool) = self
            .pools
            .iter()
            .find(|p| same_family(p, claim) && p.contains(claim))
        else {
            return Err(Refusal::OutsidePool(*claim));
        };
        let mask = self.node_mask(pool);
        if claim.prefix_len() < mask {
            return Err(Refusal::TooBroad {
                claim: *claim,
                mask,
            });
        }
        Ok(())
    }

    /// With an authority, the member's certificate must be good (signed by one of the
    /// authority's keys: `signatures` remembers which certificates were), its own, and name
    /// each claim.
    fn check_certified(
        &self,
        m: &Member,
        now_ms: u64,
        signatures: &mut Signatures,
    ) -> Result<(), Refusal> {
        if self.authorities.is_empty() {
            return Ok(());
        }
        let r = &m.record;
        let cert = r.certificate.as_ref().ok_or(Refusal::Uncertified)?;
        self.genuine(cert, &r.wireguard_key, now_ms, signatures)
            .map_err(Refusal::BadCertificate)?;
        match r.pod_cidrs.iter().find(|c| !cert.covers(c)) {
            Some(claim) => Err(Refusal::NotCertified {
                claim: *claim,
                certified: cert.pod_cidrs.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Whether `cert` is good for `holder` at `now_ms`: its blocks exactly node blocks of
    /// the pod network (as IPAM weighs them, so two certificates' blocks overlap only when
    /// equal), signed by one of the authority's keys (remembered in `signatures` once the rest
    /// holds), issued to `holder`, and within its validity.
    fn genuine(
        &self,
        cert: &NodeCert,
        holder: &[u8; 32],
        now_ms: u64,
        signatures: &mut Signatures,
    ) -> Result<(), CertError> {
        if let Some(b) = cert.pod_cidrs.iter().find(|b| !self.is_node_block(b)) {
            return Err(CertError::Invalid(format!(
                "{b} is not a node block of the pod network (/{} inside {:?})",
                self.node_mask(b),
                self.pools
            )));
        }
        signatures.check(cert, &self.authorities, |c| {
            c.holds(holder, now_ms, MAX_SKEW_MS)
        })
    }

    /// Whether `b` is exactly one node block of a pool: inside it, of its family's node block
    /// size, with no host bits.
    pub fn is_node_block(&self, b: &IpNet) -> bool {
        b.trunc() == *b
            && b.prefix_len() == self.node_mask(b)
            && self
                .pools
                .iter()
                .any(|p| same_family(p, b) && p.contains(b))
    }

    /// Checks one member's claims. `node` is its Node's `spec.podCIDRs` with Kubernetes (an
    /// empty list, not yet assigned, falls back to the pool rule), `now_ms` this node's clock.
    pub fn check(&self, m: &Member, node: Option<&[IpNet]>, now_ms: u64) -> Result<(), Refusal> {
        self.check_with(m, node, now_ms, &mut Signatures::default())
    }

    /// [`check`](Self::check), remembering in `signatures` the certificates checked.
    fn check_with(
        &self,
        m: &Member,
        node: Option<&[IpNet]>,
        now_ms: u64,
        signatures: &mut Signatures,
    ) -> Result<(), Refusal> {
        let r = &m.record;
        if r.pod_cidrs.len() != r.claimed_at.len() {
            return Err(Refusal::Unstamped {
                claims: r.pod_cidrs.len(),
                times: r.claimed_at.len(),
            });
        }
        for v4 in [true, false] {
            let family: Vec<IpNet> = r
                .pod_cidrs
                .iter()
                .filter(|c| c.addr().is_ipv4() == v4)
                .copied()
                .collect();
            if family.len() > 1 {
                return Err(Refusal::TooMany { claims: family });
            }
        }
        self.check_certified(m, now_ms, signatures)?;
        if let Some(node) = node.filter(|n| !n.is_empty()) {
            let (mut a, mut b) = (r.pod_cidrs.clone(), node.to_vec());
            a.sort();
            b.sort();
            if a != b {
                return Err(Refusal::NotTheNodes {
                    claims: r.pod_cidrs.clone(),
                    node: node.to_vec(),
                });
            }
        }
        for (claim, at) in r.pod_cidrs.iter().zip(&r.claimed_at) {
            self.check_block(claim)?;
            if *at > now_ms.saturating_add(MAX_SKEW_MS) {
                return Err(Refusal::Future {
                    claim: *claim,
                    at: *at,
                    now: now_ms,
                });
            }
        }
        Ok(())
    }

    /// Keeps the members whose claims are believed; returns the refused ones with why. A
    /// member that left claims nothing and is kept as it is. `nodes` is the Kubernetes view
    /// (Node name → `spec.podCIDRs` and published key), `None` without Kubernetes: a member
    /// that names a Node is that Node only with the key the Node published, so a member
    /// cannot take another node's blocks by taking its name; `history` is what this node has
    /// seen of the members' claims before (updated here).
    pub fn vet(
        &self,
        history: &mut ClaimHistory,
        members: Vec<Member>,
        nodes: Option<&ClusterNodes>,
        now_ms: u64,
    ) -> (Vec<Member>, Vec<(Member, Refusal)>) {
        history.forget_all_but(&members, now_ms);
        self.remember_certificates(history, &members, now_ms);
        let mut kept = Vec::with_capacity(members.len());
        let mut refused = Vec::new();
        for m in members {
            if m.record.left {
                kept.push(m);
                continue;
            }
            let backdated = history.observe(&m, now_ms);
            let node = nodes.and_then(|n| n.get(&m.record.name));
            match node_key(&m, node)
                .and_then(|()| {
                    let cidrs = node.map(|n| n.pod_cidrs.as_slice());
                    self.check_with(&m, cidrs, now_ms, &mut history.signatures)
                })
                .and(backdated.map_or(Ok(()), Err))
            {
                Ok(()) => kept.push(m),
                Err(e) => refused.push((m, e)),
            }
        }
        (kept, refused)
    }
}

/// A block of this node's own certificate that a member's later-issued certificate names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnSuperseded {
    /// The block.
    pub block: IpNet,
    /// The member whose certificate names it.
    pub member: String,
    /// When that certificate was issued (ms since the epoch).
    pub issued_at: u64,
}

/// Whether `m` is the Node it names (`node`, with Kubernetes): the Node published `m`'s key.
fn node_key(m: &Member, node: Option<&ClusterNode>) -> Result<(), Refusal> {
    let Some(node) = node else {
        return Ok(());
    };
    if node.key.as_deref() == Some(crate::host::keys::encode(&m.record.wireguard_key).as_str()) {
        return Ok(());
    }
    Err(Refusal::NotTheNodeKey {
        node: m.record.name.clone(),
        published: node.key.clone(),
    })
}

/// A member's certificate, unless it left.
fn certified(m: &Member) -> Option<&NodeCert> {
    m.record.certificate.as_deref().filter(|_| !m.record.left)
}

impl ClaimPolicy {
    /// With an authority, remembers per block the latest-issued good certificate that names
    /// it, from every member the mesh lists: the believed, the refused, and those that left
    /// or are down (their records still carry their certificates), so that a holder the
    /// authority superseded does not get the block back when the new holder restarts,
    /// leaves or is refused for something else. An entry lasts until its certificate ends.
    fn remember_certificates(&self, history: &mut ClaimHistory, members: &[Member], now_ms: u64) {
        if self.authorities.is_empty() {
            return;
        }
        let before = history.newest.len();
        history.newest.retain(|_, n| n.cert.not_after >= now_ms);
        history.dirty |= history.newest.len() != before;
        let listed = members.iter().filter_map(|m| {
            Some(Newest {
                holder: m.record.name.clone(),
                holder_key: m.record.wireguard_key,
                cert: m.record.certificate.as_deref()?.clone(),
            })
        });
        let loaded = std::mem::take(&mut history.loaded);
        let n_loaded = loaded.len();
        for (i, n) in loaded.into_iter().chain(listed).enumerate() {
            let signatures = &mut history.signatures;
            match self.genuine(&n.cert, &n.holder_key, now_ms, signatures) {
                Ok(()) => {}
                // One read back that does not hold by this node's clock may hold once the
                // clock is set (a boot before NTP): kept for later, within reason.
                Err(CertError::NotYetValid { .. }) if i < n_loaded => {
                    history.loaded.push(n);
                    continue;
                }
                Err(CertError::Expired { not_after, .. })
                    if i < n_loaded && now_ms.saturating_sub(not_after) < PENDING_EXPIRED_MS =>
                {
                    history.loaded.push(n);
                    continue;
                }
                Err(_) => continue,
            }
            for b in &n.cert.pod_cidrs {
                let newer = history
                    .newest
                    .get(b)
                    .is_none_or(|o| n.cert.issued_at > o.cert.issued_at);
                if newer {
                    history.newest.insert(*b, n.clone());
                    history.dirty = true;
                }
            }
        }
    }

    /// With an authority, the latest word on each block: a believed member (`kept`, from
    /// [`vet`](Self::vet), which remembers the certificates) whose certificate names a block
    /// that a later-issued good certificate names too (another member's, seen now or
    /// earlier, or this node's own, `own`, while it holds) is refused whole
    /// ([`Refusal::Superseded`]). Returns the members still believed, those refused, and the
    /// blocks of this node's own certificate that a member's later one names. Certificates
    /// issued at the same moment supersede neither (the claim times decide, as without an
    /// authority).
    pub fn supersede(
        &self,
        history: &ClaimHistory,
        kept: Vec<Member>,
        own: Option<&NodeCert>,
        now_ms: u64,
    ) -> (Vec<Member>, Vec<(Member, Refusal)>, Vec<OwnSuperseded>) {
        if self.authorities.is_empty() {
            return (kept, Vec::new(), Vec::new());
        }
        // What supersedes this node's own certificate is told whether or not it holds now
        // (renewing an ended one that was superseded would take the block back); it
        // supersedes others only while it holds.
        let own_superseded: Vec<OwnSuperseded> = own
            .into_iter()
            .flat_map(|c| c.pod_cidrs.iter().map(move |b| (b, c)))
            .filter_map(|(b, c)| {
                let n = history
                    .newest
                    .get(b)
                    .filter(|n| n.cert.issued_at > c.issued_at && n.holder_key != c.node_key)?;
                Some(OwnSuperseded {
                    block: *b,
                    member: n.holder.clone(),
                    issued_at: n.cert.issued_at,
                })
            })
            .collect();
        let own = own.filter(|c| c.holds(&c.node_key, now_ms, MAX_SKEW_MS).is_ok());
        // A member's (or this node's) own later certificate does not supersede its earlier
        // one: a node that went back to an older certificate still holds its blocks.
        let newest = |b: &IpNet, holder: &[u8; 32]| {
            let theirs = history
                .newest
                .get(b)
                .filter(|n| &n.holder_key != holder)
                .map(|n| n.cert.issued_at);
            let mine = own
                .filter(|c| c.covers(b) && &c.node_key != holder)
                .map(|c| c.issued_at);
            theirs.max(mine)
        };
        let (mut still, mut refused) = (Vec::with_capacity(kept.len()), Vec::new());
        for m in kept {
            let why = certified(&m).and_then(|cert| {
                cert.pod_cidrs.iter().find_map(|b| {
                    let by = newest(b, &m.record.wireguard_key)?;
                    (by > cert.issued_at).then_some(Refusal::Superseded {
                        claim: *b,
                        issued_at: cert.issued_at,
                        by,
                    })
                })
            });
            match why {
                Some(why) => refused.push((m, why)),
                None => still.push(m),
            }
        }
        (still, refused, own_superseded)
    }
}

/// What this node has seen of each member's claims: the latest record version it held (the
/// member's clock when it signed it: the mesh driver stamps versions so), this node's clock
/// when it first held that version, the claims in it, and the back-dated claims found, which
/// keep the member refused for as long as it keeps any of them.
///
/// The daemon keeps it in `state_dir/claims.json` ([`ClaimHistory::to_json`],
/// [`ClaimHistory::from_json`]), so a node that restarts (a rolling update) still holds its
/// members' earlier records and still refuses a lie it refused before. A member the mesh no
/// longer lists is remembered for [`HISTORY_HORIZON`] after this node last saw it (the mesh
/// may simply not have relearned it yet after a restart), and at most [`MAX_HISTORY`]
/// members are kept (the least recently seen go first).
#[derive(Debug, Default)]
pub struct ClaimHistory {
    members: HashMap<[u8; 32], Held>,
    /// A version or a verdict changed since the last [`ClaimHistory::take_dirty`].
    dirty: bool,
    /// This node's clock at the first round (not saved).
    started_ms: Option<u64>,
    /// The certificates whose signature was checked (not saved).
    signatures: Signatures,
    /// With an authority, the latest-issued good certificate seen naming each block, until
    /// it ends. Saved apart ([`ClaimHistory::certificates_to_json`]), so that a restarted
    /// node keeps refusing a superseded holder after the mesh has forgotten the new one.
    newest: HashMap<IpNet, Newest>,
    /// Certificates read back from the file, to be checked again at the next round.
    loaded: Vec<Newest>,
}

/// The latest-issued certificate seen naming a block.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Newest {
    /// The member it was issued to.
    holder: String,
    /// Its WireGuard key (its mesh identity).
    holder_key: [u8; 32],
    cert: NodeCert,
}

/// A certificate behind [`ClaimHistory`]'s latest per block, as `state_dir/certificates.json`
/// keeps it: the holder's name and key and the certificate, base64. Read back, each is
/// checked again (signer, holder, validity) before it counts.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct SavedCert {
    holder: String,
    key: String,
    cert: String,
}

/// The certificates whose signature one of the authority's keys was found to make, by their
/// bytes (every field and the signature): a member's certificate costs one ed25519 check when
/// first seen, not one per round. At most [`MAX_SIGNATURES`] (the most members a mesh allows)
/// are kept; past that it starts over.
#[derive(Debug, Default)]
pub struct Signatures {
    signed: HashMap<Vec<u8>, Authority>,
    /// Certificates none of `unsigned_by` signed (a forgery is checked once, not once per
    /// round and look).
    unsigned: HashSet<Vec<u8>>,
    /// The authority's keys `unsigned` was found with.
    unsigned_by: Vec<Authority>,
    /// Signature checks made (for the tests).
    checks: u64,
}

impl Signatures {
    /// Whether one of `authorities` signed `cert` and `holds` (the cheap checks, run every
    /// time) passes; a certificate is remembered only once both did, so certificates that
    /// hold for nobody cannot crowd out the ones in use.
    fn check(
        &mut self,
        cert: &NodeCert,
        authorities: &[Authority],
        holds: impl FnOnce(&NodeCert) -> Result<(), CertError>,
    ) -> Result<(), CertError> {
        let bytes = cert.to_bytes();
        if self
            .signed
            .get(&bytes)
            .is_some_and(|a| authorities.contains(a))
        {
            return holds(cert);
        }
        if self.unsigned_by != authorities {
            self.unsigned.clear();
            authorities.clone_into(&mut self.unsigned_by);
        }
        if self.unsigned.contains(&bytes) {
            return Err(CertError::BadSignature);
        }
        self.checks += 1;
        let signer = match cert.signer(authorities) {
            Ok(signer) => signer,
            Err(e) => {
                if e == CertError::BadSignature {
                    if self.unsigned.len() >= MAX_SIGNATURES {
                        self.unsigned.clear();
                    }
                    self.unsigned.insert(bytes);
                }
                return Err(e);
            }
        };
        holds(cert)?;
        if self.signed.len() >= MAX_SIGNATURES {
            self.signed.clear();
        }
        self.signed.insert(bytes, signer);
        Ok(())
    }
}

/// How long after a start members the mesh does not list are kept regardless of age.
pub const PRUNE_SETTLE_MS: u64 = 5 * 60 * 1000;
/// How far past this node's clock a saved time may lie; an entry beyond it is dropped at load.
pub const MAX_SAVED_AHEAD_MS: u64 = 24 * 3600 * 1000;

/// How long a member the mesh no longer lists is remembered (the mesh's default tombstone
/// horizon).
pub const HISTORY_HORIZON_MS: u64 = 72 * 3600 * 1000;
/// [`HISTORY_HORIZON_MS`], for the docs.
pub const HISTORY_HORIZON: std::time::Duration =
    std::time::Duration::from_millis(HISTORY_HORIZON_MS);
/// The most members remembered.
pub const MAX_HISTORY: usize = 16_384;
/// How long past its end a certificate read back is kept unchecked for a clock that may be
/// ahead: one further past it is dropped.
pub const PENDING_EXPIRED_MS: u64 = 30 * 86_400_000;
/// The most certificates [`Signatures`] remembers (`mesh.max_members` at most).
pub const MAX_SIGNATURES: usize = 100_000;

/// One member's entry, as kept on disk.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Saved {
    /// The member's id, in hex.
    id: String,
    #[serde(flatten)]
    held: Held,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Held {
    /// This node's clock when it last saw the member in the mesh's list.
    last_seen_ms: u64,
    version: u64,
    /// This node's clock when it first held `version`.
    seen_ms: u64,
    /// The claims of `version`, without the back-dated ones.
    claims: Vec<(IpNet, u64)>,
    /// Back-dated claims: (claim, its time, the record time it was stamped before).
    backdated: Vec<(IpNet, u64, u64)>,
}

impl ClaimHistory {
    /// Takes in `m`'s current record (not a tombstone: a node that leaves and comes back is
    /// compared with what it held before it left) at this node's clock `now_ms`, and returns
    /// the back-dating it shows, if any.
    ///
    /// The earlier record's time is the smaller of its version (the member's clock) and this
    /// node's clock when it first held it: a member whose clock ran ahead and was set back
    /// keeps publishing versions from the future (versions never go down), and its fresh
    /// claims must not look older than them.
    fn observe(&mut self, m: &Member, now_ms: u64) -> Option<Refusal> {
        let r = &m.record;
        let claims = || -> Vec<(IpNet, u64)> {
            r.pod_cidrs
                .iter()
                .copied()
                .zip(r.claimed_at.iter().copied())
                .collect()
        };
        let dirty = &mut self.dirty;
        let held = self.members.entry(m.id.0).or_insert_with(|| {
            *dirty = true;
            Held {
                last_seen_ms: now_ms,
                version: r.version,
                seen_ms: now_ms,
                claims: claims().into_iter().take(2).collect(),
                backdated: Vec::new(),
            }
        });
        held.last_seen_ms = now_ms;
        if r.version > held.version {
            *dirty = true;
            let now = claims();
            let without = held.version.min(held.seen_ms);
            held.backdated.retain(|(c, at, _)| now.contains(&(*c, *at)));
            for &(claim, at) in &now {
                let known = held.claims.contains(&(claim, at))
                    || held.backdated.iter().any(|b| (b.0, b.1) == (claim, at));
                if !known && at.saturating_add(MAX_SKEW_MS) < without {
                    held.backdated.push((claim, at, without));
                }
            }
            held.version = r.version;
            held.seen_ms = now_ms;
            // More than one claim per family is refused (`TooMany`); two are enough to keep.
            // A back-dated claim never becomes an earlier record's claim, so a later version
            // cannot launder it by dropping the others.
            held.claims = now
                .into_iter()
                .filter(|c| !held.backdated.iter().any(|b| (b.0, b.1) == *c))
                .take(2)
                .collect();
            held.backdated.truncate(2);
        }
        held.backdated
            .first()
            .map(|&(claim, at, without)| Refusal::BackDated { claim, at, without })
    }

    /// Forgets the members the mesh no longer holds.
    fn forget_all_but(&mut self, members: &[Member], now_ms: u64) {
        let known: HashSet<[u8; 32]> = members.iter().map(|m| m.id.0).collect();
        let before = self.members.len();
        // Right after a start the mesh has not relearned its members yet: an entry it does not
        // list is only forgotten once it has had [`PRUNE_SETTLE_MS`] to show up.
        let since = *self.started_ms.get_or_insert(now_ms);
        if now_ms.saturating_sub(since) >= PRUNE_SETTLE_MS {
            self.members.retain(|id, h| {
                known.contains(id) || now_ms.saturating_sub(h.last_seen_ms) < HISTORY_HORIZON_MS
            });
        }
        if self.members.len() > MAX_HISTORY {
            // The least recently seen go first, ties by id: exactly MAX_HISTORY stay.
            let mut order: Vec<(u64, [u8; 32])> = self
                .members
                .iter()
                .map(|(id, h)| (h.last_seen_ms, *id))
                .collect();
            order.sort_unstable();
            let excess = self.members.len() - MAX_HISTORY;
            for (_, id) in &order[..excess] {
                self.members.remove(id);
            }
        }
        self.dirty |= self.members.len() != before;
    }

    /// Marks the history as still to be saved (a save failed).
    pub fn set_dirty(&mut self) {
        self.dirty = true;
    }

    /// Whether anything worth saving changed since the last call.
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// The history as JSON, for `state_dir/claims.json`.
    pub fn to_json(&self) -> String {
        let mut saved: Vec<Saved> = self
            .members
            .iter()
            .map(|(id, held)| Saved {
                id: id.iter().map(|b| format!("{b:02x}")).collect(),
                held: held.clone(),
            })
            .collect();
        saved.sort_by(|a, b| a.id.cmp(&b.id));
        serde_json::to_string(&saved).unwrap_or_else(|_| "[]".to_owned())
    }

    /// A history read back from [`ClaimHistory::to_json`]'s output at this node's clock
    /// `now_ms`: entries with times more than [`MAX_SAVED_AHEAD_MS`] past it are dropped (a
    /// version of `u64::MAX` would switch the check off for that member), and at most
    /// [`MAX_HISTORY`] are kept, the most recently seen.
    pub fn from_json(text: &str, now_ms: u64) -> Result<Self, String> {
        let mut saved: Vec<Saved> = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let limit = now_ms.saturating_add(MAX_SAVED_AHEAD_MS);
        saved.retain(|s| {
            let h = &s.held;
            h.version <= limit && h.seen_ms <= limit && h.last_seen_ms <= limit
        });
        saved.sort_by_key(|s| std::cmp::Reverse(s.held.last_seen_ms));
        let mut members = HashMap::with_capacity(saved.len().min(MAX_HISTORY));
        for s in saved.into_iter().take(MAX_HISTORY) {
            let mut id = [0u8; 32];
            if s.id.len() != 64 || !s.id.is_ascii() {
                return Err(format!("member id {:?} is not 64 hex digits", s.id));
            }
            for (i, b) in id.iter_mut().enumerate() {
                *b = u8::from_str_radix(&s.id[2 * i..2 * i + 2], 16)
                    .map_err(|_| format!("member id {:?} is not hex", s.id))?;
            }
            members.insert(id, s.held);
        }
        Ok(Self {
            members,
            dirty: false,
            started_ms: None,
            signatures: Signatures::default(),
            newest: HashMap::new(),
            loaded: Vec::new(),
        })
    }

    /// The certificates behind the latest per block, as JSON, for
    /// `state_dir/certificates.json` (saved with the history, when it is dirty).
    pub fn certificates_to_json(&self) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut seen = HashSet::new();
        // Those read back and not yet taken (the clock was not set, or no authority is on
        // now) are kept too.
        let mut saved: Vec<SavedCert> = self
            .newest
            .values()
            .chain(&self.loaded)
            .filter(|n| seen.insert(n.cert.to_bytes()))
            .map(|n| SavedCert {
                holder: n.holder.clone(),
                key: b64.encode(n.holder_key),
                cert: b64.encode(n.cert.to_bytes()),
            })
            .collect();
        saved.sort_by(|a, b| a.cert.cmp(&b.cert));
        serde_json::to_string(&saved).unwrap_or_else(|_| "[]".to_owned())
    }

    /// Takes back [`certificates_to_json`](Self::certificates_to_json)'s output; each
    /// certificate is checked again at the next round before it counts (a file edited by
    /// hand gains nothing). An entry that cannot be read is skipped and returned with why; a
    /// file that is not such a list is an error, and nothing is taken from it. At most
    /// [`MAX_SIGNATURES`] are read.
    pub fn load_certificates(&mut self, text: &str) -> Result<Vec<String>, String> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let saved: Vec<SavedCert> = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let mut skipped = Vec::new();
        for s in saved.into_iter().take(MAX_SIGNATURES) {
            let bad = |what: &str, e: &dyn fmt::Display| format!("{what} of {:?}: {e}", s.holder);
            let entry = (|| {
                let key = b64.decode(&s.key).map_err(|e| bad("key", &e))?;
                let holder_key: [u8; 32] = key
                    .try_into()
                    .map_err(|k: Vec<u8>| bad("key", &format!("{} bytes, not 32", k.len())))?;
                let bytes = b64.decode(&s.cert).map_err(|e| bad("certificate", &e))?;
                let cert = NodeCert::from_bytes(&bytes).map_err(|e| bad("certificate", &e))?;
                Ok::<_, String>(Newest {
                    holder: s.holder.clone(),
                    holder_key,
                    cert,
                })
            })();
            match entry {
                Ok(n) => self.loaded.push(n),
                Err(why) => skipped.push(why),
            }
        }
        Ok(skipped)
    }

    /// The number of members remembered.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether no member is remembered.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

fn same_family(a: &IpNet, b: &IpNet) -> bool {
    matches!(
        (a, b),
        (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
    )
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::disallowed_methods,
        reason = "tests start their clock from a real instant"
    )]

    use super::*;
    use weft_mesh::{NodeId, NodeRecord};

    const NOW: u64 = 1_800_000_000_000;

    fn policy() -> ClaimPolicy {
        ClaimPolicy {
            pools: vec![
                "100.64.0.0/16".parse().unwrap(),
                "fd64::/48".parse().unwrap(),
            ],
            mask_v4: 24,
            mask_v6: 64,
            authorities: Vec::new(),
        }
    }

    fn member(name: &str, claims: &[(&str, u64)]) -> Member {
        let record = NodeRecord {
            region: None,
            private_address: None,
            public_address: None,
            wireguard_key: [name.len() as u8; 32],
            pod_cidrs: claims.iter().map(|(c, _)| c.parse().unwrap()).collect(),
            claimed_at: claims.iter().map(|(_, t)| *t).collect(),
            trusted_subnets: vec![],
            ..weft_mesh::testing::node_record(name, 1)
        };
        weft_mesh::testing::member(NodeId([name.len() as u8; 32]), record)
    }

    const DAY: u64 = 86_400_000;

    /// The authority's key in these tests.
    fn ca() -> weft_mesh::AuthorityKey {
        weft_mesh::AuthorityKey::from_seed(&[42; 32])
    }

    /// `m` with a certificate from `ca` naming `blocks`, valid from a day before [`NOW`] to
    /// `days` after.
    fn certified(
        mut m: Member,
        ca: &weft_mesh::AuthorityKey,
        blocks: &[&str],
        days: u64,
    ) -> Member {
        let blocks = blocks.iter().map(|b| b.parse().unwrap()).collect();
        let cert = ca
            .issue(m.record.wireguard_key, blocks, NOW - DAY, NOW + days * DAY)
            .expect("issue");
        m.record.certificate = Some(Box::new(cert));
        m
    }

    /// `m` with a certificate from [`ca`] naming `blocks`, issued at `issued`, for 30 days.
    fn certified_at(m: Member, blocks: &[&str], issued: u64) -> Member {
        certified_long(m, blocks, issued, 30)
    }

    /// `m` with a certificate from [`ca`] naming `blocks`, issued at `issued`, for `days`.
    fn certified_long(m: Member, blocks: &[&str], issued: u64, days: u64) -> Member {
        certified_span(m, blocks, issued, issued + days * DAY)
    }

    /// `m` with a certificate from [`ca`] naming `blocks`, from `issued` to `not_after`.
    fn certified_span(mut m: Member, blocks: &[&str], issued: u64, not_after: u64) -> Member {
        let blocks = blocks.iter().map(|b| b.parse().unwrap()).collect();
        let cert = ca()
            .issue(m.record.wireguard_key, blocks, issued, not_after)
            .expect("issue");
        m.record.certificate = Some(Box::new(cert));
        m
    }

    /// Each refused member's name with its refusal's reason.
    fn reasons(refused: &[(Member, Refusal)]) -> Vec<(&str, &'static str)> {
        refused
            .iter()
            .map(|(m, why)| (m.record.name.as_str(), why.reason()))
            .collect()
    }

    fn names(ms: &[Member]) -> Vec<&str> {
        ms.iter().map(|m| m.record.name.as_str()).collect()
    }

    /// A block moved by the authority: `b` was certified for it a day ago, `cc` an hour ago.
    struct Moved {
        with: ClaimPolicy,
        block: &'static str,
        b: Member,
        cc: Member,
    }

    fn moved() -> Moved {
        let block = "100.64.2.0/24";
        Moved {
            with: ClaimPolicy {
                authorities: vec![ca().authority()],
                ..policy()
            },
            block,
            b: certified_at(member("b", &[(block, NOW - DAY)]), &[block], NOW - DAY),
            cc: certified_at(member("cc", &[(block, NOW)]), &[block], NOW - HOUR),
        }
    }

    /// One round at `now` with `policy`: vet, then supersede against `own`.
    fn round(
        policy: &ClaimPolicy,
        h: &mut ClaimHistory,
        members: Vec<Member>,
        own: Option<&Member>,
        now: u64,
    ) -> (Vec<Member>, Vec<(Member, Refusal)>, Vec<OwnSuperseded>) {
        let (kept, mut refused) = policy.vet(h, members, None, now);
        let own = own.and_then(|o| o.record.certificate.as_deref());
        let (kept, superseded, mine) = policy.supersede(h, kept, own, now);
        refused.extend(superseded);
        (kept, refused, mine)
    }

    /// An operator moves a block by issuing another node a certificate for it: the later
    /// certificate wins over the earlier holder's whatever the claim times say, in whatever
    /// order the members come, against this node's own certificate too; the earlier holder is
    /// refused whole. Certificates issued at the same moment supersede neither.
    #[test]
    fn with_an_authority_the_later_certificate_for_a_block_wins_whatever_the_claim_times() {
        let with = ClaimPolicy {
            authorities: vec![ca().authority()],
            ..policy()
        };
        let block = "100.64.2.0/24";
        // b has claimed the block for a day, on a certificate with a second (v6) block.
        let b = certified_at(
            member("b", &[(block, NOW - DAY)]),
            &[block, "fd64:0:0:2::/64"],
            NOW - DAY,
        );
        // cc was given the block an hour ago and claimed it just now.
        let cc = certified_at(member("cc", &[(block, NOW)]), &[block], NOW - HOUR);
        for members in [vec![b.clone(), cc.clone()], vec![cc.clone(), b.clone()]] {
            let (kept, refused, own) =
                round(&with, &mut ClaimHistory::default(), members, None, NOW);
            assert_eq!(names(&kept), ["cc"]);
            assert_eq!(own, []);
            let [(m, why)] = &refused[..] else {
                panic!("{refused:?}")
            };
            assert_eq!(m.record.name, "b");
            assert_eq!(
                *why,
                Refusal::Superseded {
                    claim: block.parse().unwrap(),
                    issued_at: NOW - DAY,
                    by: NOW - HOUR,
                }
            );
            assert_eq!(why.reason(), "superseded");
            assert!(
                why.to_string().contains("superseded by one issued later"),
                "{why}"
            );
        }
    }

    /// This node's own certificate counts: a later one supersedes a member's; an earlier one
    /// is superseded by a member's, which this node is told of; one that has ended counts for
    /// nothing.
    #[test]
    fn with_an_authority_this_nodes_own_certificate_supersedes_and_is_superseded() {
        let Moved { with, block, b, cc } = moved();
        let own = |issued| certified_at(member("own", &[]), &[block], issued);
        let mut h = ClaimHistory::default();
        let (kept, refused, mine) = round(
            &with,
            &mut h,
            vec![b.clone()],
            Some(&own(NOW - HOUR / 2)),
            NOW,
        );
        assert_eq!((names(&kept), mine.len()), (vec![], 0));
        assert_eq!(reasons(&refused), [("b", "superseded")]);
        let (kept, _, mine) = round(
            &with,
            &mut h,
            vec![cc.clone()],
            Some(&own(NOW - 2 * HOUR)),
            NOW,
        );
        assert_eq!(names(&kept), ["cc"]);
        assert_eq!(
            mine,
            [OwnSuperseded {
                block: block.parse().unwrap(),
                member: "cc".into(),
                issued_at: NOW - HOUR,
            }]
        );
        // An own certificate that has ended (issued after b's, so it would supersede b's if
        // it held) supersedes nothing, and is still told what supersedes it.
        let ended = certified_span(member("own", &[]), &[block], NOW - 2 * HOUR, NOW - HOUR / 2);
        let (kept, _, mine) = round(
            &with,
            &mut ClaimHistory::default(),
            vec![b.clone(), cc.clone()],
            Some(&ended),
            NOW,
        );
        assert_eq!(names(&kept), ["cc"]);
        assert_eq!(mine.len(), 1);
        let (kept, _, _) = round(
            &with,
            &mut ClaimHistory::default(),
            vec![b.clone()],
            Some(&ended),
            NOW,
        );
        assert_eq!(names(&kept), ["b"]);
    }

    /// Certificates issued at the same moment supersede neither (the claim times decide, in
    /// IPAM), and without an authority certificates are not weighed at all.
    #[test]
    fn certificates_of_one_moment_or_without_an_authority_supersede_nothing() {
        let Moved { with, block, b, cc } = moved();
        let twin = certified_at(member("ddd", &[(block, NOW)]), &[block], NOW - DAY);
        let (kept, refused, _) = round(
            &with,
            &mut ClaimHistory::default(),
            vec![b.clone(), twin],
            None,
            NOW,
        );
        assert_eq!((kept.len(), refused.len()), (2, 0));
        // Without an authority, certificates are not weighed at all.
        let (kept, refused, _) = round(
            &policy(),
            &mut ClaimHistory::default(),
            vec![b.clone(), cc.clone()],
            None,
            NOW,
        );
        assert_eq!((kept.len(), refused.len()), (2, 0));
    }

    /// The new holder's certificate keeps superseding the earlier one while it holds, though
    /// the new holder left (a clean restart publishes a tombstone), is refused for something
    /// else, or is no longer listed at all: the earlier holder (a stolen key, say) never gets
    /// the block back in the gaps. Once the new certificate ends, it no longer counts.
    #[test]
    fn a_superseded_holder_does_not_get_the_block_back_while_the_new_holder_is_away() {
        let Moved { with, block, b, cc } = moved();
        let mut left = cc.clone();
        left.record.left = true;
        let mut liar = cc.clone();
        liar.record.claimed_at = vec![NOW + DAY];
        // Seen for the first time as a tombstone, or refused for something else: its
        // certificate still counts (a fresh history, nothing remembered).
        for other in [left, liar] {
            let members = vec![b.clone(), other.clone()];
            let (kept, refused, _) = round(&with, &mut ClaimHistory::default(), members, None, NOW);
            assert!(!names(&kept).contains(&"b"), "{other:?}");
            assert!(
                reasons(&refused).contains(&("b", "superseded")),
                "{refused:?}"
            );
        }
        // No longer listed at all: remembered.
        let mut h = ClaimHistory::default();
        round(&with, &mut h, vec![b.clone(), cc.clone()], None, NOW);
        let (kept, refused, _) = round(&with, &mut h, vec![b.clone()], None, NOW + 1000);
        assert_eq!(
            (names(&kept), reasons(&refused)),
            (vec![], vec![("b", "superseded")])
        );
        // b's certificate outlives cc's: once cc's has ended, b's counts again.
        let b = certified_long(member("b", &[(block, NOW - DAY)]), &[block], NOW - DAY, 90);
        let mut h = ClaimHistory::default();
        round(&with, &mut h, vec![b.clone(), cc.clone()], None, NOW);
        let (kept, _, _) = round(&with, &mut h, vec![b.clone()], None, NOW + 31 * DAY);
        assert_eq!(names(&kept), ["b"]);
    }

    /// The latest certificates are saved with the history: a restarted node, to which the
    /// mesh no longer lists the new holder, keeps refusing the superseded one. What is read
    /// back is checked again (a certificate put under another key counts for nothing), and a
    /// file that is bad anywhere is an error naming the entry, with nothing taken from it.
    #[test]
    fn a_restarted_node_keeps_refusing_a_superseded_holder_from_its_saved_certificates() {
        let Moved { with, b, cc, .. } = moved();
        let mut h = ClaimHistory::default();
        round(&with, &mut h, vec![b.clone()], None, NOW);
        h.take_dirty();
        // A new latest certificate makes the history worth saving; a steady round does not.
        round(&with, &mut h, vec![b.clone(), cc.clone()], None, NOW);
        assert!(h.take_dirty());
        round(&with, &mut h, vec![b.clone(), cc.clone()], None, NOW + 1000);
        assert!(!h.take_dirty());
        let text = h.certificates_to_json();
        let restart = |text: &str| {
            let mut r = ClaimHistory::from_json(&h.to_json(), NOW).expect("history");
            r.load_certificates(text).map(|skipped| (r, skipped))
        };
        let (mut restarted, skipped) = restart(&text).expect("read back");
        assert_eq!((restarted.loaded.len(), skipped.len()), (1, 0));
        let (kept, refused, _) = round(&with, &mut restarted, vec![b.clone()], None, NOW + 1000);
        assert_eq!(
            (names(&kept), reasons(&refused)),
            (vec![], vec![("b", "superseded")])
        );
        // Without the file, b would be believed: that is what it is for.
        let (kept, _, _) = round(
            &with,
            &mut ClaimHistory::default(),
            vec![b.clone()],
            None,
            NOW,
        );
        assert_eq!(names(&kept), ["b"]);

        // Booted before the clock was set (a day behind, so cc's certificate has not begun):
        // the entry is kept, saved again, and counts once the clock is right.
        let (mut early, _) = restart(&text).expect("read back");
        let (kept, _, _) = round(&with, &mut early, vec![b.clone()], None, NOW - DAY);
        assert_eq!(names(&kept), ["b"], "b's own certificate holds then");
        let saved = early.certificates_to_json();
        assert!(saved.contains(r#""holder":"cc""#), "{saved}");
        let (kept, _, _) = round(&with, &mut early, vec![b.clone()], None, NOW);
        assert_eq!(names(&kept), Vec::<&str>::new());
    }

    /// What is read back is checked again: cc's certificate put under b's key counts for
    /// nothing; an unreadable entry is skipped and named, the others kept; a file that is no
    /// list is an error with nothing taken.
    #[test]
    fn saved_certificates_are_checked_again_and_a_bad_entry_is_skipped_by_name() {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let Moved { with, b, cc, .. } = moved();
        let mut h = ClaimHistory::default();
        round(&with, &mut h, vec![b.clone(), cc.clone()], None, NOW);
        let text = h.certificates_to_json();
        let cert = cc
            .record
            .certificate
            .as_ref()
            .expect("certified")
            .to_bytes();
        let moved_key = format!(
            r#"[{{"holder": "cc", "key": "{}", "cert": "{}"}}]"#,
            b64.encode(b.record.wireguard_key),
            b64.encode(cert)
        );
        let mut edited = ClaimHistory::default();
        assert_eq!(edited.load_certificates(&moved_key), Ok(vec![]));
        let (kept, _, _) = round(&with, &mut edited, vec![b.clone()], None, NOW + 1000);
        assert_eq!(names(&kept), ["b"]);

        let bad = format!(
            r#"{}, {{"holder": "x", "key": "AAAA", "cert": "AAAA"}}]"#,
            text.trim_end_matches(']')
        );
        let mut r = ClaimHistory::default();
        let skipped = r.load_certificates(&bad).expect("a list");
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].contains(r#"key of "x""#), "{skipped:?}");
        let (kept, _, _) = round(&with, &mut r, vec![b.clone()], None, NOW + 1000);
        assert_eq!(names(&kept), Vec::<&str>::new(), "the good entry counts");
        let mut r = ClaimHistory::default();
        assert!(r.load_certificates("not json").is_err());
        assert!(r.loaded.is_empty());
    }

    /// A member's own later certificate does not supersede its earlier one: a node that went
    /// back to an older certificate (still good) keeps its block, and so does this node.
    #[test]
    fn a_holders_own_later_certificate_does_not_supersede_its_earlier_one() {
        let Moved { with, block, b, .. } = moved();
        let later = certified_at(member("b", &[(block, NOW - DAY)]), &[block], NOW - HOUR);
        let mut h = ClaimHistory::default();
        round(&with, &mut h, vec![later], None, NOW);
        let (kept, refused, _) = round(&with, &mut h, vec![b.clone()], None, NOW + 1000);
        assert_eq!((names(&kept), refused.len()), (vec!["b"], 0));
        // The same for this node's own: b's later one is remembered; this node is b.
        let (_, _, mine) = round(&with, &mut h, vec![], Some(&b), NOW + 2000);
        assert_eq!(mine, []);
    }

    /// A certificate's blocks must be exactly node blocks of the pod network, so that two
    /// certificates' blocks overlap only when they are equal: a narrower block, one with host
    /// bits, or one outside the pool makes the certificate bad (else a /25 inside another
    /// node's /24 would escape supersession and be settled by the claim time).
    #[test]
    fn a_certificate_naming_anything_but_node_blocks_is_bad() {
        let with = ClaimPolicy {
            authorities: vec![ca().authority()],
            ..policy()
        };
        for block in [
            "100.64.2.0/25",
            "100.64.2.7/24",
            "10.0.0.0/24",
            "fd64:0:0:2::/65",
        ] {
            let m = certified_at(member("b", &[]), &[block], NOW - DAY);
            let e = with.check(&m, None, NOW).unwrap_err();
            assert_eq!(e.reason(), "bad_certificate", "{block}");
            assert!(e.to_string().contains("not a node block"), "{block}: {e}");
        }
    }

    /// While a new authority key is rolled out both are listed, and a certificate signed by
    /// either is believed.
    #[test]
    fn with_two_authority_keys_a_certificate_signed_by_either_is_believed() {
        let new = weft_mesh::AuthorityKey::from_seed(&[43; 32]);
        let both = ClaimPolicy {
            authorities: vec![ca().authority(), new.authority()],
            ..policy()
        };
        let old_only = ClaimPolicy {
            authorities: vec![ca().authority()],
            ..policy()
        };
        let m = certified(
            member("b", &[("100.64.2.0/24", NOW)]),
            &new,
            &["100.64.2.0/24"],
            30,
        );
        assert_eq!(both.check(&m, None, NOW), Ok(()));
        assert_eq!(
            old_only.check(&m, None, NOW),
            Err(Refusal::BadCertificate(CertError::BadSignature))
        );
    }

    /// A member's certificate costs one signature check when first seen, not one per round;
    /// a renewed one (other bytes) is checked again, and a cached one still has its time
    /// window checked every round.
    #[test]
    fn a_members_certificate_signature_is_checked_once_not_every_round() {
        let with = ClaimPolicy {
            authorities: vec![ca().authority()],
            ..policy()
        };
        let mut h = ClaimHistory::default();
        let b = certified(
            member("b", &[("100.64.2.0/24", NOW - DAY)]),
            &ca(),
            &["100.64.2.0/24"],
            1,
        );
        for round in 0..5 {
            let (kept, _) = with.vet(&mut h, vec![b.clone()], None, NOW + round * 1000);
            assert_eq!(kept.len(), 1);
        }
        assert_eq!(h.signatures.checks, 1);
        let renewed = certified(b.clone(), &ca(), &["100.64.2.0/24"], 30);
        let (kept, _) = with.vet(&mut h, vec![renewed], None, NOW);
        assert_eq!((kept.len(), h.signatures.checks), (1, 2));
        // Two days on, the first one has ended: refused, though its signature is cached.
        let (_, refused) = with.vet(&mut h, vec![b.clone()], None, NOW + 2 * DAY);
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].1.reason(), "bad_certificate");
        assert_eq!(h.signatures.checks, 2);
        // A forged one is refused every round and checked once: not cached as good.
        let forged = certified(
            member("b", &[("100.64.2.0/24", NOW)]),
            &weft_mesh::AuthorityKey::from_seed(&[7; 32]),
            &["100.64.2.0/24"],
            30,
        );
        for _ in 0..3 {
            let (_, refused) = with.vet(&mut h, vec![forged.clone()], None, NOW);
            assert_eq!(refused.len(), 1);
            assert_eq!(
                refused[0].1,
                Refusal::BadCertificate(CertError::BadSignature)
            );
        }
        assert_eq!(h.signatures.checks, 3);
        // A cached certificate whose signer is no longer listed is checked again, and refused.
        let other = ClaimPolicy {
            authorities: vec![weft_mesh::AuthorityKey::from_seed(&[43; 32]).authority()],
            ..policy()
        };
        let renewed = certified(b.clone(), &ca(), &["100.64.2.0/24"], 30);
        let (_, refused) = other.vet(&mut h, vec![renewed], None, NOW);
        assert_eq!(refused.len(), 1);
        assert_eq!(h.signatures.checks, 4);
    }

    /// With an authority, the claim time decides nothing: a fresh identity first seen with an
    /// old claim on another node's block (what a healed partition also looks like, so without
    /// an authority it is believed), or a certified member claiming beyond its certificate, is
    /// refused; a member whose certificate names its block is believed.
    #[test]
    fn with_an_authority_only_the_blocks_a_members_certificate_names_are_believed() {
        let with = ClaimPolicy {
            authorities: vec![ca().authority()],
            ..policy()
        };
        let honest = certified(
            member("b", &[("100.64.2.0/24", NOW - DAY)]),
            &ca(),
            &["100.64.2.0/24"],
            30,
        );
        assert_eq!(with.check(&honest, None, NOW), Ok(()));

        // A fresh identity, first seen with b's block claimed since one second after the epoch.
        let fresh = member("x", &[("100.64.2.0/24", 1000)]);
        assert_eq!(
            policy().check(&fresh, None, NOW),
            Ok(()),
            "believed without an authority"
        );
        let e = with.check(&fresh, None, NOW).unwrap_err();
        assert_eq!(e, Refusal::Uncertified);
        assert_eq!(e.reason(), "uncertified");

        // A member certified for its own block claiming b's too, or instead.
        for claims in [
            &[("100.64.2.0/24", 1000)][..],
            &[("100.64.3.0/24", NOW), ("fd64:0:0:2::/64", 1000)],
        ] {
            let liar = certified(member("x", claims), &ca(), &["100.64.3.0/24"], 30);
            let e = with.check(&liar, None, NOW).unwrap_err();
            assert_eq!(e.reason(), "not_certified", "{claims:?}");
            assert!(e.to_string().contains("100.64.3.0/24"), "{e}");
        }

        // A certificate from another authority, another node's, or expired.
        let forged = certified(
            member("x", &[("100.64.2.0/24", 1000)]),
            &weft_mesh::AuthorityKey::from_seed(&[7; 32]),
            &["100.64.2.0/24"],
            30,
        );
        let e = with.check(&forged, None, NOW).unwrap_err();
        assert_eq!(e, Refusal::BadCertificate(CertError::BadSignature));
        // (Test members' keys follow their names' lengths: "liar" is not "b".)
        let mut stolen = member("liar", &[("100.64.2.0/24", 1000)]);
        stolen.record.certificate = honest.record.certificate.clone();
        let e = with.check(&stolen, None, NOW).unwrap_err();
        assert_eq!(e, Refusal::BadCertificate(CertError::OtherNode));
        assert!(e.to_string().contains("another WireGuard key"), "{e}");
        let expired = certified(
            member("b", &[("100.64.2.0/24", NOW - DAY)]),
            &ca(),
            &["100.64.2.0/24"],
            0,
        );
        let e = with.check(&expired, None, NOW + 1).unwrap_err();
        assert_eq!(e.reason(), "bad_certificate");
        assert!(e.to_string().contains("expired"), "{e}");

        // The certificate does not widen the pool rules: a certified /16 is no node block.
        let broad = certified(
            member("x", &[("100.64.0.0/16", NOW)]),
            &ca(),
            &["100.64.0.0/16"],
            30,
        );
        let e = with.check(&broad, None, NOW).unwrap_err();
        assert_eq!(e.reason(), "bad_certificate");
        assert!(e.to_string().contains("not a node block"), "{e}");
    }

    #[test]
    fn a_record_claiming_more_than_one_block_of_a_family_is_refused_whole() {
        // Many blocks of the pool, each a node block, each back-dated: without this rule one
        // member could take every node's block.
        let greedy = member(
            "greedy",
            &[
                ("100.64.1.0/24", NOW - 86_400_000),
                ("100.64.2.0/24", NOW - 86_400_000),
                ("100.64.3.0/24", NOW - 86_400_000),
            ],
        );
        let e = policy().check(&greedy, None, NOW).unwrap_err();
        assert_eq!(e.reason(), "too_many");
        assert!(e.to_string().contains("100.64.2.0/24"), "{e}");
        // One per family, as every honest node holds: believed.
        let dual = member(
            "dual",
            &[
                ("100.64.1.0/24", NOW - 1000),
                ("fd64:0:0:1::/64", NOW - 1000),
            ],
        );
        assert_eq!(policy().check(&dual, None, NOW), Ok(()));
    }

    #[test]
    fn a_block_of_the_pool_with_a_past_time_is_believed() {
        let m = member(
            "a",
            &[("100.64.3.0/24", NOW - 1000), ("fd64:0:0:3::/64", 0)],
        );
        assert_eq!(policy().check(&m, None, NOW), Ok(()));
        // Narrower than a block (a configured node.pod_cidr may be) is fine too.
        let m = member("a", &[("100.64.3.128/25", NOW)]);
        assert_eq!(policy().check(&m, None, NOW), Ok(()));
    }

    #[test]
    fn a_default_route_claim_is_refused() {
        for c in ["0.0.0.0/0", "::/0"] {
            let m = member("evil", &[(c, 0)]);
            let e = policy().check(&m, None, NOW).unwrap_err();
            assert_eq!(e, Refusal::OutsidePool(c.parse().unwrap()), "{c}");
            assert!(e.to_string().contains(c), "{e}");
        }
    }

    #[test]
    fn a_claim_broader_than_a_block_inside_the_pool_is_refused() {
        let m = member("evil", &[("100.64.0.0/16", 0)]);
        let e = policy().check(&m, None, NOW).unwrap_err();
        assert_eq!(
            e,
            Refusal::TooBroad {
                claim: "100.64.0.0/16".parse().unwrap(),
                mask: 24
            }
        );
        assert_eq!(e.reason(), "too_broad");
        let m = member("evil", &[("fd64::/56", 0)]);
        assert!(matches!(
            policy().check(&m, None, NOW),
            Err(Refusal::TooBroad { mask: 64, .. })
        ));
    }

    #[test]
    fn a_claim_outside_the_pool_or_of_the_other_family_is_refused() {
        let m = member("evil", &[("10.0.0.0/24", 0)]);
        assert!(matches!(
            policy().check(&m, None, NOW),
            Err(Refusal::OutsidePool(_))
        ));
        let m = member("evil", &[("::ffff:100.64.1.0/120", 0)]);
        assert!(matches!(
            policy().check(&m, None, NOW),
            Err(Refusal::OutsidePool(_))
        ));
    }

    #[test]
    fn a_claim_stamped_in_the_future_cannot_win() {
        let m = member("evil", &[("100.64.9.0/24", NOW + MAX_SKEW_MS + 1)]);
        assert!(matches!(
            policy().check(&m, None, NOW),
            Err(Refusal::Future { .. })
        ));
        let m = member("ok", &[("100.64.9.0/24", NOW + MAX_SKEW_MS)]);
        assert_eq!(policy().check(&m, None, NOW), Ok(()));
    }

    #[test]
    fn claims_without_claim_times_are_refused() {
        let mut m = member("evil", &[("100.64.9.0/24", 0)]);
        m.record.claimed_at.clear();
        assert_eq!(
            policy().check(&m, None, NOW),
            Err(Refusal::Unstamped {
                claims: 1,
                times: 0
            })
        );
    }

    #[test]
    fn with_kubernetes_the_claims_must_be_the_nodes_pod_cidrs() {
        let node: Vec<IpNet> = vec!["100.64.5.0/24".parse().unwrap()];
        let m = member("b", &[("100.64.5.0/24", 0)]);
        assert_eq!(policy().check(&m, Some(&node), NOW), Ok(()));
        let thief = member("b", &[("100.64.6.0/24", 0)]);
        assert!(matches!(
            policy().check(&thief, Some(&node), NOW),
            Err(Refusal::NotTheNodes { .. })
        ));
        // A Node with no podCIDRs yet: the pool rule still holds.
        assert!(policy().check(&thief, Some(&[]), NOW).is_ok());
        let greedy = member("b", &[("0.0.0.0/0", 0)]);
        assert!(policy().check(&greedy, Some(&[]), NOW).is_err());
    }

    #[test]
    fn with_kubernetes_a_member_is_the_node_it_names_only_with_the_key_that_node_published() {
        let real = member("node-b", &[("100.64.5.0/24", 5)]);
        // A member with its own key that calls itself node-b and claims node-b's block,
        // earlier: the name is only what its signer says.
        let mut thief = member("node-b", &[("100.64.5.0/24", 1)]);
        thief.record.wireguard_key = [77; 32];
        thief.id = NodeId([77; 32]);
        let node = |key: Option<[u8; 32]>| {
            let n = ClusterNode {
                pod_cidrs: vec!["100.64.5.0/24".parse().unwrap()],
                key: key.map(|k| crate::host::keys::encode(&k)),
            };
            ClusterNodes::from([("node-b".to_owned(), n)])
        };
        let vet = |nodes: &ClusterNodes| {
            let (kept, refused) = policy().vet(
                &mut ClaimHistory::default(),
                vec![real.clone(), thief.clone()],
                Some(nodes),
                NOW,
            );
            let kept: Vec<[u8; 32]> = kept.iter().map(|m| m.record.wireguard_key).collect();
            let refused: Vec<([u8; 32], Refusal)> = refused
                .into_iter()
                .map(|(m, why)| (m.record.wireguard_key, why))
                .collect();
            (kept, refused)
        };
        let (kept, refused) = vet(&node(Some(real.record.wireguard_key)));
        assert_eq!(kept, [real.record.wireguard_key]);
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].0, [77; 32]);
        assert_eq!(refused[0].1.reason(), "not_the_node_key");
        assert!(
            refused[0].1.to_string().contains("Node node-b"),
            "{}",
            refused[0].1
        );
        // A Node with no key published yet: neither is believed to be it.
        let (kept, refused) = vet(&node(None));
        assert!(kept.is_empty(), "{kept:?}");
        assert_eq!(refused.len(), 2);
        assert!(refused[0].1.to_string().contains("not set yet"));
        // Without Kubernetes, nothing to check against (names do not route there).
        let (kept, _) = policy().vet(&mut ClaimHistory::default(), vec![real.clone()], None, NOW);
        assert_eq!(kept.len(), 1);
    }

    #[test]
    fn vet_drops_the_whole_record_of_a_member_with_one_bad_claim() {
        let good = member("a", &[("100.64.1.0/24", 5)]);
        let bad = member("bb", &[("100.64.2.0/24", 5), ("0.0.0.0/0", 5)]);
        let mut gone = member("ccc", &[("0.0.0.0/0", 0)]);
        gone.record.left = true;
        let (kept, refused) = policy().vet(
            &mut ClaimHistory::default(),
            vec![good, bad, gone],
            None,
            NOW,
        );
        let names: Vec<&str> = kept.iter().map(|m| m.record.name.as_str()).collect();
        assert_eq!(names, ["a", "ccc"]);
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].0.record.name, "bb");
    }

    /// `m` at record version `version` (the member's clock when it signed it).
    fn at_version(mut m: Member, version: u64) -> Member {
        m.record.version = version;
        m
    }

    fn vet_one(history: &mut ClaimHistory, m: &Member) -> Result<(), Refusal> {
        // This node's clock agrees with the member's: now is when it signed the record.
        let now = m.record.version.max(NOW);
        let (_, refused) = policy().vet(history, vec![m.clone()], None, now);
        refused
            .into_iter()
            .next()
            .map_or(Ok(()), |(_, why)| Err(why))
    }

    const HOUR: u64 = 3_600_000;

    #[test]
    fn a_claim_back_dated_before_the_members_own_record_without_it_cannot_win() {
        // The victim has held 100.64.2.0/24 for a day. The liar has been a member for an
        // hour holding 100.64.3.0/24, and now says it has held the victim's block for two.
        let mut h = ClaimHistory::default();
        let honest = member("liar", &[("100.64.3.0/24", NOW - HOUR)]);
        assert_eq!(vet_one(&mut h, &at_version(honest, NOW - HOUR)), Ok(()));
        let lie = at_version(member("liar", &[("100.64.2.0/24", NOW - 2 * HOUR)]), NOW);
        let why = vet_one(&mut h, &lie).unwrap_err();
        assert_eq!(
            why,
            Refusal::BackDated {
                claim: "100.64.2.0/24".parse().unwrap(),
                at: NOW - 2 * HOUR,
                without: NOW - HOUR
            }
        );
        assert_eq!(why.reason(), "backdated");
        assert!(why.to_string().contains("100.64.2.0/24"), "{why}");
        assert!(why.to_string().contains("3600 s before"), "{why}");
        // It stays refused while it keeps the claim, in every later version.
        let again = at_version(lie.clone(), NOW + HOUR);
        assert_eq!(vet_one(&mut h, &again), Err(why));
        // Dropping the lie (a fresh claim) makes it believable again.
        let fresh = at_version(
            member("liar", &[("100.64.4.0/24", NOW + HOUR)]),
            NOW + HOUR + 1,
        );
        assert_eq!(vet_one(&mut h, &fresh), Ok(()));
        // Moving an existing claim's time back is back-dating too.
        let older = at_version(
            member("liar", &[("100.64.4.0/24", NOW - HOUR)]),
            NOW + 2 * HOUR,
        );
        assert!(matches!(
            vet_one(&mut h, &older),
            Err(Refusal::BackDated { .. })
        ));
    }

    #[test]
    fn honest_claims_are_never_taken_for_back_dated() {
        let mut h = ClaimHistory::default();
        // First seen with an old claim (a member from the other side of a healed partition,
        // or this node just started): believed, every node settles the same winner.
        let old = at_version(member("a", &[("100.64.1.0/24", NOW - 48 * HOUR)]), NOW);
        assert_eq!(vet_one(&mut h, &old), Ok(()));
        // A restart (or a refresh): a new version with the same claim and time.
        assert_eq!(
            vet_one(&mut h, &at_version(old.clone(), NOW + HOUR)),
            Ok(())
        );
        // A new claim stamped when made, even by a clock a little behind the earlier record's.
        let new = at_version(
            member("a", &[("100.64.5.0/24", NOW + HOUR - MAX_SKEW_MS)]),
            NOW + 2 * HOUR,
        );
        assert_eq!(vet_one(&mut h, &new), Ok(()));
        // A graceful restart: the tombstone says nothing about claims, and the node comes back
        // with the block it held before it left.
        let mut gone = at_version(new.clone(), NOW + 3 * HOUR);
        gone.record.left = true;
        gone.record.pod_cidrs.clear();
        gone.record.claimed_at.clear();
        assert_eq!(vet_one(&mut h, &gone), Ok(()));
        assert_eq!(vet_one(&mut h, &at_version(new, NOW + 4 * HOUR)), Ok(()));
        // A replayed older version changes nothing.
        assert_eq!(vet_one(&mut h, &at_version(old, NOW)), Ok(()));
    }

    #[test]
    fn a_back_dated_claim_cannot_be_laundered_by_a_later_version() {
        // Two back-dated claims in one version (refused for both), then a version keeping only
        // one of them: still refused, and so on until none is left.
        let mut h = ClaimHistory::default();
        let start = at_version(member("liar", &[("100.64.3.0/24", NOW - HOUR)]), NOW - HOUR);
        assert_eq!(vet_one(&mut h, &start), Ok(()));
        let two = at_version(
            member(
                "liar",
                &[
                    ("100.64.2.0/24", NOW - 9 * HOUR),
                    ("fd64:0:0:2::/64", NOW - 9 * HOUR),
                ],
            ),
            NOW,
        );
        assert!(matches!(
            vet_one(&mut h, &two),
            Err(Refusal::BackDated { .. })
        ));
        let one = at_version(
            member("liar", &[("fd64:0:0:2::/64", NOW - 9 * HOUR)]),
            NOW + 1,
        );
        assert!(matches!(
            vet_one(&mut h, &one),
            Err(Refusal::BackDated { claim, .. }) if claim.to_string() == "fd64:0:0:2::/64"
        ));
        let again = at_version(one, NOW + 2);
        assert!(vet_one(&mut h, &again).is_err());
    }

    #[test]
    fn a_member_whose_clock_ran_ahead_and_was_set_back_is_not_taken_for_a_liar() {
        // Its versions come from two hours ahead (and never go down); this node held that
        // record at its own, correct time. A claim it makes now is fresh.
        let mut h = ClaimHistory::default();
        let ahead = at_version(
            member("a", &[("100.64.1.0/24", NOW - HOUR)]),
            NOW + 2 * HOUR,
        );
        let (_, refused) = policy().vet(&mut h, vec![ahead], None, NOW);
        assert!(refused.is_empty());
        let fresh = at_version(
            member("a", &[("100.64.6.0/24", NOW + 60_000)]),
            NOW + 2 * HOUR + 1,
        );
        let (_, refused) = policy().vet(&mut h, vec![fresh], None, NOW + 60_000);
        assert!(refused.is_empty(), "{refused:?}");
    }

    #[test]
    fn the_history_forgets_members_the_mesh_no_longer_lists_after_the_horizon() {
        let mut h = ClaimHistory::default();
        let a = member("a", &[("100.64.1.0/24", NOW)]);
        let bb = member("bb", &[("100.64.2.0/24", NOW)]);
        policy().vet(&mut h, vec![a.clone(), bb], None, NOW);
        assert_eq!(h.len(), 2);
        // Not listed (the mesh may not have relearned it yet): still remembered.
        policy().vet(&mut h, vec![a.clone()], None, NOW + HOUR);
        assert_eq!(h.len(), 2);
        policy().vet(&mut h, vec![a], None, NOW + HISTORY_HORIZON_MS);
        assert_eq!(h.len(), 1);
        policy().vet(&mut h, vec![], None, NOW + 2 * HISTORY_HORIZON_MS + HOUR);
        assert!(h.is_empty());
    }

    #[test]
    fn a_restarted_node_still_refuses_a_lie_from_its_saved_history() {
        // The victim saw the liar's honest record, then restarted (a rolling update): the
        // history comes back from state_dir/claims.json, before the mesh relearns the liar.
        let mut h = ClaimHistory::default();
        let honest = at_version(member("liar", &[("100.64.3.0/24", NOW - HOUR)]), NOW - HOUR);
        assert_eq!(vet_one(&mut h, &honest), Ok(()));
        assert!(h.take_dirty());
        let text = h.to_json();
        let mut restarted = ClaimHistory::from_json(&text, NOW).expect("reads back");
        assert!(!restarted.take_dirty());
        policy().vet(&mut restarted, vec![], None, NOW);
        assert_eq!(
            restarted.len(),
            1,
            "kept while the mesh relearns its members"
        );
        let lie = at_version(member("liar", &[("100.64.2.0/24", NOW - 2 * HOUR)]), NOW);
        assert!(matches!(
            vet_one(&mut restarted, &lie),
            Err(Refusal::BackDated { .. })
        ));
        // A refused member stays refused across a second restart too.
        let again = ClaimHistory::from_json(&restarted.to_json(), NOW).expect("reads back");
        let mut again = again;
        assert!(vet_one(&mut again, &at_version(lie, NOW + 1)).is_err());
    }

    #[test]
    fn saved_times_far_past_the_clock_are_dropped_and_the_cap_keeps_the_most_recently_seen() {
        let entry = |id: u8, last: u64, version: u64| {
            format!(
                "{{\"id\": \"{}\", \"last_seen_ms\": {last}, \"version\": {version}, \"seen_ms\": 1, \"claims\": [], \"backdated\": []}}",
                format!("{id:02x}").repeat(32)
            )
        };
        // A version of u64::MAX would switch the check off for that member: dropped.
        let text = format!("[{}, {}]", entry(1, NOW, u64::MAX), entry(2, NOW, NOW));
        let h = ClaimHistory::from_json(&text, NOW).unwrap();
        assert_eq!(h.len(), 1);
        // More entries than the cap: the most recently seen stay, exactly MAX_HISTORY.
        let mut h = ClaimHistory::default();
        for i in 0..(MAX_HISTORY as u64 + 10) {
            let mut id = [0u8; 32];
            id[..8].copy_from_slice(&i.to_be_bytes());
            h.members.insert(
                id,
                Held {
                    last_seen_ms: NOW,
                    version: 1,
                    seen_ms: 1,
                    claims: vec![],
                    backdated: vec![],
                },
            );
        }
        policy().vet(&mut h, vec![], None, NOW);
        assert_eq!(
            h.len(),
            MAX_HISTORY,
            "ties at one instant still honour the cap"
        );
    }

    #[test]
    fn a_corrupt_history_file_is_an_error_naming_what_is_wrong_and_never_a_panic() {
        for (text, want) in [
            ("{", "expected a sequence"),
            ("[", "EOF"),
            ("[{\"id\": \"zz\"}]", "missing field"),
            (
                "[{\"id\": \"ab\", \"last_seen_ms\": 1, \"version\": 1, \"seen_ms\": 1, \"claims\": [], \"backdated\": []}]",
                "not 64 hex digits",
            ),
            (
                &format!(
                    "[{{\"id\": \"{}\", \"last_seen_ms\": 1, \"version\": 1, \"seen_ms\": 1, \"claims\": [], \"backdated\": []}}]",
                    "é".repeat(32)
                ),
                "64 hex digits",
            ),
        ] {
            let e = ClaimHistory::from_json(text, NOW).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
