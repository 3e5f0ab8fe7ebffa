//! This node's pod blocks, one IPAM round at a time: the mesh's members turned into the
//! claims [`weft_ipam::Allocator`] weighs, and its decisions turned into the next set of blocks
//! and the events to report. Pure: the control loop supplies the clocks, writes the state file
//! and moves the TUN addresses; the simulation drives the very same rounds.

use std::time::{Duration, Instant};

use ipnet::IpNet;
use weft_ipam::{AllocError, Allocator, Claim, Decision, Other, Pool, SavedBlock, overlaps};
use weft_mesh::Member;

/// What one node holds and how it decides.
#[derive(Debug, Clone)]
pub struct Blocks {
    /// One pool per family of `pod_network_cidr`.
    pub pools: Vec<Pool>,
    /// This node's mesh id, the claims' owner.
    pub owner: [u8; 32],
    /// Configured blocks (`node.pod_cidr`): kept whatever the conflicts, and reported.
    pub fixed: Vec<IpNet>,
    /// The blocks held now.
    pub held: Vec<SavedBlock>,
    /// A member down for this long holds its blocks no more.
    pub expiry: Duration,
}

/// Something a round did or found, to be logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockEvent {
    /// A first block in `pool`.
    Claimed {
        /// The block.
        block: IpNet,
        /// Its pool.
        pool: IpNet,
    },
    /// Our block was claimed earlier by `winner`: we moved to `new`.
    Reclaimed {
        /// The block lost.
        lost: IpNet,
        /// The winner's id.
        winner: [u8; 32],
        /// The block claimed instead.
        new: IpNet,
    },
    /// Our configured block overlaps `winner`'s older claim: kept, and to be reported.
    StaticConflict {
        /// Our block.
        mine: IpNet,
        /// The winner's id.
        winner: [u8; 32],
        /// The winner's block.
        theirs: IpNet,
    },
    /// A younger claim of `other` overlaps our block `mine`, which we keep: the other node
    /// should re-claim, unless its block is configured.
    Overlapped {
        /// Our block.
        mine: IpNet,
        /// Whether ours is configured (`node.pod_cidr`).
        fixed: bool,
        /// The other node's id.
        other: [u8; 32],
        /// Its block.
        theirs: IpNet,
    },
    /// No block could be had in a pool.
    Failed(AllocError),
}

/// `blocks` assigned from outside the mesh (config or Kubernetes) as held blocks: a block
/// already in `held` keeps its claim time, a new one is claimed at `now_ms`.
pub fn assigned(blocks: &[IpNet], held: &[SavedBlock], now_ms: u64) -> Vec<SavedBlock> {
    blocks
        .iter()
        .map(|b| SavedBlock {
            block: *b,
            since: held
                .iter()
                .find(|h| h.block == *b)
                .map_or(now_ms, |h| h.since),
        })
        .collect()
}

/// Whether a node without a block may make its first claim: `settle` has passed since the
/// start, or the mesh has caught up with a neighbour (`synced`) that knew of claims already, so
/// what is taken is known now. A neighbour that knows of no claim (a mesh starting all at once)
/// proves nothing, and the delay stands.
pub fn settled(elapsed: Duration, settle: Duration, synced: bool, members: &[Member]) -> bool {
    elapsed >= settle || (synced && members.iter().any(|m| !m.record.pod_cidrs.is_empty()))
}

/// The claims of `members` as the allocator weighs them: a member holds its claims while it is
/// alive, or down for less than `expiry`; one that left holds nothing.
pub fn others(members: &[Member], now: Instant, expiry: Duration) -> Vec<Other> {
    members
        .iter()
        .map(|m| Other {
            owner: m.id.0,
            claims: m
                .record
                .pod_cidrs
                .iter()
                .enumerate()
                .map(|(i, n)| Claim {
                    block: *n,
                    owner: m.id.0,
                    since: m.record.claimed_at.get(i).copied().unwrap_or(0),
                })
                .collect(),
            holds: !m.record.left
                && (m.alive || now.saturating_duration_since(m.last_heard) < expiry),
        })
        .collect()
}

impl Blocks {
    /// One round against the mesh's `members`: `now` is the monotonic clock (for expiry),
    /// `now_ms` the wall clock a new claim is stamped with, and `settled` whether the mesh has
    /// had time to tell what is taken (no first claim before). Returns the next blocks (equal to
    /// [`Blocks::held`] when nothing changes) and what happened; does not change `self`.
    pub fn round(
        &self,
        members: &[Member],
        now: Instant,
        now_ms: u64,
        settled: bool,
    ) -> (Vec<SavedBlock>, Vec<BlockEvent>) {
        let others = others(members, now, self.expiry);
        let mut next = self.held.clone();
        let mut events = Vec::new();
        for pool in &self.pools {
            let pos = next.iter().position(|b| pool.cidr().contains(&b.block));
            let mine = pos.map(|i| Claim {
                block: next[i].block,
                owner: self.owner,
                since: next[i].since,
            });
            if mine.is_none() && !settled {
                continue;
            }
            let fixed = mine.is_some_and(|c| self.fixed.contains(&c.block));
            let decision = Allocator {
                pool: *pool,
                owner: self.owner,
            }
            .decide(mine, &others, now_ms, fixed);
            let claim = match decision {
                Ok(Decision::Keep(mine)) => {
                    events.extend(self.overlapped(&others, mine.block, fixed));
                    continue;
                }
                Ok(Decision::New(c)) => {
                    events.push(BlockEvent::Claimed {
                        block: c.block,
                        pool: pool.cidr(),
                    });
                    c
                }
                Ok(Decision::Reclaim { claim, lost_to }) => {
                    events.push(BlockEvent::Reclaimed {
                        lost: mine.map_or(lost_to.block, |m| m.block),
                        winner: lost_to.owner,
                        new: claim.block,
                    });
                    claim
                }
                Ok(Decision::StaticConflict { mine, winner }) => {
                    events.push(BlockEvent::StaticConflict {
                        mine: mine.block,
                        winner: winner.owner,
                        theirs: winner.block,
                    });
                    continue;
                }
                Err(e) => {
                    events.push(BlockEvent::Failed(e));
                    continue;
                }
            };
            let saved = SavedBlock {
                block: claim.block,
                since: claim.since,
            };
            match pos {
                Some(i) => next[i] = saved,
                None => next.push(saved),
            }
        }
        (next, events)
    }

    /// The younger claims of others that overlap `mine`, which this node keeps.
    fn overlapped<'a>(
        &'a self,
        others: &'a [Other],
        mine: IpNet,
        fixed: bool,
    ) -> impl Iterator<Item = BlockEvent> + 'a {
        others
            .iter()
            .filter(|o| o.holds && o.owner != self.owner)
            .flat_map(|o| o.claims.iter())
            .filter(move |c| overlaps(&c.block, &mine))
            .map(move |c| BlockEvent::Overlapped {
                mine,
                fixed,
                other: c.owner,
                theirs: c.block,
            })
    }
}

#[cfg(test)]
mod tests {
    use weft_mesh::NodeId;
    use weft_mesh::testing::{member, node_record};

    use super::*;

    #[test]
    fn a_first_claim_waits_out_the_settle_unless_the_mesh_caught_up_with_known_claims() {
        let (settle, early) = (Duration::from_secs(3), Duration::from_millis(200));
        let claimed = member(NodeId([1; 32]), node_record("a", 1));
        let bare = member(
            NodeId([2; 32]),
            weft_mesh::NodeRecord {
                pod_cidrs: vec![],
                claimed_at: vec![],
                ..node_record("b", 1)
            },
        );
        // An established mesh, caught up with: no wait.
        assert!(settled(early, settle, true, std::slice::from_ref(&claimed)));
        // Not caught up yet, or caught up with members that claim nothing: wait.
        assert!(!settled(
            early,
            settle,
            false,
            std::slice::from_ref(&claimed)
        ));
        assert!(!settled(early, settle, true, std::slice::from_ref(&bare)));
        assert!(!settled(early, settle, true, &[]));
        // The delay over: settled whatever the mesh says.
        assert!(settled(settle, settle, false, &[]));
    }
}
