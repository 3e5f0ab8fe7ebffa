//! weft's gossip core: who is in the mesh and what each member says about itself.
//!
//! # Architecture
//!
//! Every node signs its own [`NodeRecord`] (name, region, addresses, WireGuard key, pod CIDRs,
//! trusted subnets) with an ed25519 [`Identity`] derived from its WireGuard key, so a member can
//! only ever speak for itself; records carry a version that only grows, so a replayed old record
//! never replaces a newer one. The wire format is [`wire`]: pure encode and decode, where
//! malformed input is a [`DecodeError`] and never a panic.
//!
//! # Layout
//!
//! - `record`: [`NodeId`], [`Identity`], [`NodeRecord`], [`SignedRecord`].
//! - `membership`: [`Membership`], the state machine, and its inputs and outputs.
//! - `wire`: [`Frame`] and its codec.
//! - `driver` (feature `driver`, on by default): the tokio driver and the encrypted TCP
//!   transport keyed by the cluster secret.

#[cfg(feature = "driver")]
pub mod driver;
mod membership;
mod record;
pub mod wire;

pub use crate::membership::{
    ConnId, Drops, Event, Member, Membership, MeshConfig, Transmit, mesh_address,
};
pub use crate::record::{
    Identity, MAX_NAME, MAX_PREFIXES, NodeId, NodeRecord, ShortId, SignedRecord, VerifyError,
};
pub use crate::wire::{DecodeError, Entry, Frame};
