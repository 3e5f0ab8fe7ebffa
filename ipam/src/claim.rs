//! Claims on blocks, the order that settles conflicts, and one node's decision.

use ipnet::IpNet;

use crate::pool::{AllocError, Pool, choose, overlaps};

/// A node's claim on a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Claim {
    /// The block.
    pub block: IpNet,
    /// The owner's id.
    pub owner: [u8; 32],
    /// When the owner first claimed it (the owner's clock, milliseconds since the epoch; only
    /// ever compared as an order, and ties go to the smaller owner).
    pub since: u64,
}

impl Claim {
    /// Whether this claim wins over `other` where they overlap: the older claim, then the
    /// smaller owner. Every node evaluates the same order, so every node picks the same winner.
    pub fn beats(&self, other: &Self) -> bool {
        (self.since, self.owner) < (other.since, other.owner)
    }
}

/// Another node as this one sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Other {
    /// Its id.
    pub owner: [u8; 32],
    /// Its claims (any family).
    pub claims: Vec<Claim>,
    /// Whether its claims still hold: it is alive, or down for less than the block expiry.
    /// A node that left, or is down past the expiry, holds nothing.
    pub holds: bool,
}

/// What a node should do about its block in one pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Its claim stands.
    Keep(Claim),
    /// It had no block: claim this one.
    New(Claim),
    /// It lost its block to an older claim: claim this one instead.
    Reclaim {
        /// The new claim.
        claim: Claim,
        /// The claim it lost to.
        lost_to: Claim,
    },
    /// Its static (configured) block overlaps an older claim: it keeps it, loudly, and the
    /// other nodes route the block to the winner.
    StaticConflict {
        /// Its claim.
        mine: Claim,
        /// The older claim.
        winner: Claim,
    },
}

/// One node's allocation rule for one pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocator {
    /// The pool.
    pub pool: Pool,
    /// This node's id (also the seed of where it starts looking).
    pub owner: [u8; 32],
}

impl Allocator {
    /// Decides about `mine` (this node's claim in this pool, if any) given `others`; `now` is
    /// the `since` of a new claim; `fixed` marks `mine` as configured, never re-claimed.
    pub fn decide(
        &self,
        mine: Option<Claim>,
        others: &[Other],
        now: u64,
        fixed: bool,
    ) -> Result<Decision, AllocError> {
        let holding: Vec<&Claim> = others
            .iter()
            .filter(|o| o.holds && o.owner != self.owner)
            .flat_map(|o| o.claims.iter())
            .filter(|c| overlaps(&c.block, &self.pool.cidr()))
            .collect();
        let taken: Vec<IpNet> = holding.iter().map(|c| c.block).collect();
        let Some(mine) = mine else {
            let block = choose(&self.pool, &taken, &self.owner)?;
            return Ok(Decision::New(Claim {
                block,
                owner: self.owner,
                since: now,
            }));
        };
        let winner = holding
            .iter()
            .filter(|c| overlaps(&c.block, &mine.block) && c.beats(&mine))
            .min_by(|a, b| {
                if a.beats(b) {
                    std::cmp::Ordering::Less
                } else {
                    std::cmp::Ordering::Greater
                }
            })
            .copied();
        match winner {
            None => Ok(Decision::Keep(mine)),
            Some(w) if fixed => Ok(Decision::StaticConflict { mine, winner: *w }),
            Some(w) => {
                let block = choose(&self.pool, &taken, &self.owner)?;
                Ok(Decision::Reclaim {
                    claim: Claim {
                        block,
                        owner: self.owner,
                        since: now,
                    },
                    lost_to: *w,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn pool() -> Pool {
        Pool::new("100.64.0.0/20".parse().unwrap(), 24).unwrap()
    }

    fn mk(block: &str, owner: u8, since: u64) -> Claim {
        Claim {
            block: block.parse().unwrap(),
            owner: [owner; 32],
            since,
        }
    }

    #[test]
    fn the_older_claim_wins_and_the_loser_reclaims_elsewhere() {
        let a = Allocator {
            pool: pool(),
            owner: [1; 32],
        };
        let mine = mk("100.64.3.0/24", 1, 20);
        let theirs = Other {
            owner: [2; 32],
            claims: vec![mk("100.64.3.0/24", 2, 10)],
            holds: true,
        };
        let d = a
            .decide(Some(mine), std::slice::from_ref(&theirs), 30, false)
            .unwrap();
        let Decision::Reclaim { claim, lost_to } = d else {
            panic!("{d:?}")
        };
        assert_eq!(lost_to.owner, [2; 32]);
        assert_ne!(claim.block, mine.block);
        assert_eq!(claim.since, 30);
        // The winner keeps it.
        let b = Allocator {
            pool: pool(),
            owner: [2; 32],
        };
        let me_as_other = Other {
            owner: [1; 32],
            claims: vec![mine],
            holds: true,
        };
        assert_eq!(
            b.decide(Some(theirs.claims[0]), &[me_as_other], 30, false)
                .unwrap(),
            Decision::Keep(theirs.claims[0])
        );
        // Same instant: the smaller owner wins.
        assert!(mk("100.64.3.0/24", 1, 5).beats(&mk("100.64.3.0/24", 2, 5)));
    }

    #[test]
    fn a_dead_nodes_block_is_taken_only_once_it_no_longer_holds() {
        let a = Allocator {
            pool: Pool::new("100.64.0.0/23".parse().unwrap(), 24).unwrap(),
            owner: [1; 32],
        };
        let dead = |holds| Other {
            owner: [2; 32],
            claims: vec![mk("100.64.0.0/24", 2, 1), mk("100.64.1.0/24", 2, 1)],
            holds,
        };
        let e = a
            .decide(None, &[dead(true)], 9, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no free /24"), "{e}");
        assert!(matches!(
            a.decide(None, &[dead(false)], 9, false).unwrap(),
            Decision::New(_)
        ));
    }

    #[test]
    fn a_static_block_is_kept_but_reported() {
        let a = Allocator {
            pool: pool(),
            owner: [1; 32],
        };
        let mine = mk("100.64.3.0/24", 1, 20);
        let older = Other {
            owner: [2; 32],
            claims: vec![mk("100.64.3.0/24", 2, 10)],
            holds: true,
        };
        let d = a.decide(Some(mine), &[older], 30, true).unwrap();
        assert!(matches!(d, Decision::StaticConflict { winner, .. } if winner.owner == [2; 32]));
    }

    /// Node `i` of a model cluster: its claim, whether it is alive, whether a dead one expired.
    #[derive(Debug, Clone)]
    struct Node {
        claim: Option<Claim>,
        alive: bool,
        expired: bool,
    }

    proptest! {
        /// Any start (random, colliding claims; some nodes dead, some of those expired),
        /// followed by claims made in a random order while the cluster is split in two sides
        /// that see only themselves, ends, once the partition heals and every live node has
        /// decided with the converged view, with no two holding claims overlapping, every block
        /// inside the pool, one block per live node.
        #[test]
        fn any_start_and_partition_converges_to_disjoint_blocks(
            nodes in proptest::collection::vec((proptest::option::of((0u32..16, 0u64..5)), any::<bool>(), any::<bool>()), 1..14),
            order in proptest::collection::vec(any::<proptest::sample::Index>(), 0..40),
            sides in proptest::collection::vec(any::<bool>(), 14),
        ) {
            let p = pool();
            let mut model: Vec<Node> = nodes
                .iter()
                .enumerate()
                .map(|(i, (c, alive, expired))| Node {
                    claim: c.map(|(b, since)| Claim { block: p.block(u128::from(b)), owner: [i as u8 + 1; 32], since }),
                    alive: *alive || i == 0,
                    expired: *expired && !(*alive || i == 0),
                })
                .collect();
            let others = |model: &[Node], me: usize, split: bool| -> Vec<Other> {
                model.iter().enumerate().filter(|(j, _)| *j != me && (!split || sides[*j] == sides[me])).map(|(j, n)| Other {
                    owner: [j as u8 + 1; 32],
                    claims: n.claim.into_iter().collect(),
                    holds: n.alive || !n.expired,
                }).collect()
            };
            // Some nodes act in a random order first, each seeing only its side ...
            let mut clock = 100;
            for idx in &order {
                let i = idx.index(model.len());
                if !model[i].alive { continue; }
                clock += 1;
                let a = Allocator { pool: p, owner: [i as u8 + 1; 32] };
                if let Ok(d) = a.decide(model[i].claim, &others(&model, i, true), clock, false) {
                    model[i].claim = match d { Decision::Keep(c) | Decision::New(c) => Some(c), Decision::Reclaim { claim, .. } => Some(claim), Decision::StaticConflict { mine, .. } => Some(mine) };
                }
            }
            // ... then the partition heals and every live node decides until nothing changes
            // (bounded).
            for _ in 0..(model.len() * 4) {
                let mut changed = false;
                for i in 0..model.len() {
                    if !model[i].alive { continue; }
                    clock += 1;
                    let a = Allocator { pool: p, owner: [i as u8 + 1; 32] };
                    let d = a.decide(model[i].claim, &others(&model, i, false), clock, false).expect("16 blocks for at most 14 nodes");
                    let next = match d { Decision::Keep(c) | Decision::New(c) => c, Decision::Reclaim { claim, .. } => claim, Decision::StaticConflict { mine, .. } => mine };
                    changed |= model[i].claim != Some(next);
                    model[i].claim = Some(next);
                }
                if !changed { break; }
            }
            let live: Vec<Claim> = model.iter().filter(|n| n.alive).filter_map(|n| n.claim).collect();
            let dead_holding: Vec<Claim> =
                model.iter().filter(|n| !n.alive && !n.expired).filter_map(|n| n.claim).collect();
            for n in model.iter().filter(|n| n.alive) {
                let c = n.claim.expect("every live node has a block");
                prop_assert!(p.holds(&c.block));
            }
            for (i, a) in live.iter().enumerate() {
                for b in &live[i + 1..] {
                    prop_assert!(!overlaps(&a.block, &b.block), "live {a:?} and {b:?} overlap");
                }
                // A dead node's block, until it expires, is taken only by a claim that beats it.
                for d in &dead_holding {
                    prop_assert!(!overlaps(&a.block, &d.block) || a.beats(d), "{a:?} took {d:?}");
                }
            }
        }
    }
}
