//! weft's gossip core: who is in the mesh and what each member says about itself.
//!
//! # Architecture
//!
//! Every node signs its own [`NodeRecord`] (name, region, addresses, WireGuard key, pod CIDRs,
//! trusted subnets) and its heartbeats ([`Beat`]) with an [`Identity`] that is its WireGuard
//! key: the [`NodeId`] is the WireGuard public key in Edwards form, so a record verifies only
//! with the WireGuard key of the node that signed it. Records carry a version that only grows,
//! so a replayed old record never replaces a newer one, and each version is a heartbeat space
//! of its own, so a restarted node (a new version, counting from zero) is alive again as soon
//! as its new record arrives. Liveness is SWIM-like, so that a node's gossip stays bounded as the
//! mesh grows: beats go to a node's own connections, and only suspicions, refutations and rare
//! announces ([`Rumour`]) cross the whole mesh (see [`Membership`]). The wire format is [`wire`]: pure encode and decode, where
//! malformed input is a [`DecodeError`] and never a panic. What the core refuses is counted by
//! [`Rejected`] reason in [`Drops`].
//!
//! # Trust model
//!
//! An *outsider* lacks the cluster secret; a *member* holds it (the secret is shared, so every
//! member can open gossip connections and send any frame) and its own WireGuard key, and no
//! other node's.
//!
//! | who | can | cannot |
//! |---|---|---|
//! | outsider | open TCP connections to the gossip port (at most `PENDING_PER_SOURCE` per address and `PENDING_MAX` in all wait to prove the secret, a few hundred bytes each, for at most the handshake deadline; more are closed at once and counted); send bytes that fail the handshake (counted); replay a captured first handshake message and get the Noise answer | send a frame the core sees; learn any record; make a replayed handshake count as a connection (a responder counts one only once the initiator's first frame decrypts: a round trip); cost more than that handshake budget; pin a connection by not reading (writes time out) |
//! | member | publish its own record and beats (a new version per frame, as fast as it sends frames: each costs one check and is applied and pushed on; of several versions in one frame only the newest is checked, applied and pushed); relay others' records and beats unchanged; delay or withhold what it relays; replay old records and beats (refused as stale: a relayed copy only matters while it is the newest its origin signed); send digests with any numbers (they only decide what is sent back, never liveness; an empty one asks for the whole state, which each connection gets at most once per gossip interval); suspect any member whose newest beat it holds, which costs that member one refutation spread through the mesh (at most one per half liveness timeout for a repeated beat); say hello as another node (the `Hello` is not signed), which makes no node its watcher until a beat that node signed arrives on the connection, and keeps this node from dialling that node for at most a dial interval; open gossip connections and keep them open (at most two per node once proven; an unproven one counts toward nothing and is the first closed once it has had a dial interval to prove itself); with identities it makes (each a member, up to [`MeshConfig::max_members`]) hold proven connections like any peer | sign a record or beat for another node (the id is the signer's key); publish another node's WireGuard key ([`Rejected::UnboundKey`]); raise another node's heartbeat or version, or mark it down or alive ([`Rejected::BadBeat`], [`Rejected::UnsignedBeat`]); take a live member down by suspecting it (the member, reached by any path, refutes; a suspicion carries a beat the member signed, so it cannot name a heartbeat the member has not reached); keep a dead member alive with beats it saved (a watcher's suspicion carries the newest beat it heard, only a newer one refutes, and a suspicion a node finds premature is deferred, never dropped); stop a suspicion from reaching the member it names (relays pass it on even while they answer it); keep a node it impersonates routed: a member advertising an established member's address is held down ([`Rejected::AddressInUse`]); grow another node's state without bound (members capped by [`MeshConfig::max_members`], [`Rejected::MemberLimit`]; answers cut into bounded frames; dead members forgotten after [`MeshConfig::tombstone_horizon`]); make a node pay a signature check for a record or beat it would not apply, more than one record check per signer in a frame, or any check after a record in the frame that fails (the rest of the frame is dropped); get a digest answered more than once per gossip interval on a connection, or a member answered twice in one digest however often it names it; cut a node off by holding its connection slots: only proven peers (a beat the peer signed came on the connection) count toward its dial target, and beyond twice [`MeshConfig::max_connections`] one connection is closed as each comes up (unproven ones past a dial interval first, then a node's extra connections, then proven peers beyond the dial target, then the newcomer itself, never greeted), so a flood of connections costs the node at most that many |
//! | same key on two daemons | both publish as the one node | outbid each other without end: after [`MAX_BIDS`] bids both stop and report an [`IdentityClash`] naming both daemons' addresses |
//!
//! Pod-CIDR claims inside records are checked by the daemon against its pool, not here. What a
//! member can claim depends on who says which blocks are whose:
//!
//! | authority | a member (or a fresh identity made with the secret) can claim | it cannot claim |
//! |---|---|---|
//! | none (standalone) | a free block; a block it held in an earlier record; when first seen, any block with any past claim time (the other side of a healed partition looks the same), so it can take a block from an honest owner | a block outside the pool or broader than a node block, two per family, a time in the future; a block it back-dates against its own earlier record, at every node that held that record |
//! | `mesh.authority` ([`NodeCert`]) | the blocks its certificate names, while the certificate holds | any other block, whatever its claim time: its record needs a certificate signed by the authority's key, issued to its own WireGuard key (bound to its id), naming each claim; a block a later-issued certificate (of another node) names |
//! | Kubernetes | its Node's `spec.podCIDRs` | any other block (the API server says) |
//! The
//! driver stamps every version it publishes with the origin's wall clock and republishes the
//! record every [`MeshConfig::record_refresh`], so a record is a recent, signed statement
//! of what its origin holds, against which the daemon checks later claims for back-dating.
//! A node that joins after two members began to advertise the same address cannot tell which
//! came first: it keeps the one it learned first (then the smaller id).
//!
//! # Layout
//!
//! - `record`: [`NodeId`], [`Identity`], [`NodeRecord`], [`SignedRecord`], [`UnverifiedRecord`].
//! - `beat`: [`Beat`], a signed heartbeat.
//! - `cert`: [`NodeCert`], an authority's certificate of the blocks a node may claim.
//! - `membership`: [`Membership`], the state machine, and its inputs and outputs; its
//!   submodules accept records, answer digests and settle clashes.
//! - `stats`: [`Rejected`] reasons and the [`Drops`] counters.
//! - `wire`: [`Frame`] and its codec.
//! - `driver` (feature `driver`, on by default): the tokio driver and the encrypted TCP
//!   transport keyed by the cluster secret.

mod beat;
mod cert;
#[cfg(feature = "driver")]
pub mod driver;
mod membership;
mod observation;
mod record;
mod stats;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
pub mod wire;

pub use crate::beat::{Beat, Rumour};
pub use crate::cert::{Authority, AuthorityKey, CertError, MAX_CERT_CIDRS, NodeCert};
pub use crate::membership::{
    ANNOUNCE_BYTES_PER_SEC, AddressClash, BID_WINDOW, ConnId, DEFAULT_ANNOUNCE_INTERVAL,
    DEFAULT_MAX_MEMBERS, DEFAULT_RECORD_REFRESH, DEFAULT_TOMBSTONE_HORIZON, DIGEST_BYTES_PER_SEC,
    Event, IdentityClash, MAX_BIDS, MAX_MEMBERS_LIMIT, Member, Membership, MeshConfig,
    OBSERVED_MIN_GAP, STALE_ANNOUNCES, Transmit, mesh_address,
};
pub use crate::observation::Observation;
pub use crate::record::{
    Identity, MAX_HOMES, MAX_LATER, MAX_NAME, MAX_OBSERVED, MAX_PREFIXES, NodeId, NodeRecord,
    ShortId, SignedRecord, UnverifiedRecord, VerifyError, share_verified_records, verify_message,
};
pub use crate::stats::{Drops, Rejected, Rejections};
pub use crate::wire::{DecodeError, Entry, Frame};
