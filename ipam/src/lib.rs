//! weft's pod CIDR allocation, pure: no clock, no I/O, no randomness of its own.
//!
//! # Architecture
//!
//! A [`Pool`] is one cluster CIDR cut into node blocks of one mask size. A node [`choose`]s a
//! free block, starting at a place derived from its key (so nodes starting together rarely
//! pick the same one) and probing onwards. A [`Claim`] is a block, its owner and when the owner
//! first claimed it; two claims that overlap are settled by [`Claim::beats`], the same total
//! order on every node (the older claim wins, then the smaller owner), so every node reaches the
//! same winner and the loser re-claims. [`Allocator::decide`] is the whole rule for one node and
//! one family: keep, claim, or re-claim, given what the node knows of the others. The daemon
//! persists a node's blocks as a [`Snapshot`].
//!
//! # Layout
//!
//! - `pool`: [`Pool`], [`choose`].
//! - `claim`: [`Claim`], [`Allocator`], [`Decision`], [`Other`].
//! - `snapshot`: [`Snapshot`], its JSON form and [`SnapshotError`].

mod claim;
mod pool;
mod snapshot;

pub use crate::claim::{Allocator, Claim, Decision, Other};
pub use crate::pool::{AllocError, Pool, choose, overlaps};
pub use crate::snapshot::{SavedBlock, Snapshot, SnapshotError};
