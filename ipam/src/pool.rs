//! [`Pool`]: a cluster CIDR cut into node blocks, and [`choose`].

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use sha2::{Digest as _, Sha256};

/// Why a pool cannot be used or has no block left.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// The block size is not longer than the pool's prefix or longer than the family allows.
    #[error("node mask /{mask} does not fit the pool {pool}: it must be longer than /{} and at most /{max}", pool.prefix_len())]
    MaskSize {
        /// The pool.
        pool: IpNet,
        /// The mask.
        mask: u8,
        /// The family's widest mask.
        max: u8,
    },
    /// Every block of the pool is taken.
    #[error("the pod network {pool} has no free /{mask} block left ({blocks} blocks, all taken)")]
    Exhausted {
        /// The pool.
        pool: IpNet,
        /// The block size.
        mask: u8,
        /// How many blocks it has.
        blocks: u128,
    },
}

/// A cluster CIDR and the size of the blocks it is cut into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    cidr: IpNet,
    mask: u8,
}

/// The most blocks probed for a free one (an IPv6 pool can have 2^64 blocks).
const MAX_PROBES: u128 = 1 << 20;

impl Pool {
    /// A pool of `/mask` blocks in `cidr`.
    pub fn new(cidr: IpNet, mask: u8) -> Result<Self, AllocError> {
        let cidr = cidr.trunc();
        let max = cidr.max_prefix_len();
        if mask <= cidr.prefix_len() || mask > max {
            return Err(AllocError::MaskSize {
                pool: cidr,
                mask,
                max,
            });
        }
        Ok(Self { cidr, mask })
    }

    /// The cluster CIDR.
    pub fn cidr(&self) -> IpNet {
        self.cidr
    }

    /// The block size.
    pub fn mask(&self) -> u8 {
        self.mask
    }

    /// How many blocks (saturating at `u128::MAX`).
    pub fn blocks(&self) -> u128 {
        let bits = u32::from(self.mask - self.cidr.prefix_len());
        1u128.checked_shl(bits).unwrap_or(u128::MAX)
    }

    /// Block number `i` (modulo the number of blocks).
    pub fn block(&self, i: u128) -> IpNet {
        let i = i % self.blocks().max(1);
        match self.cidr {
            IpNet::V4(n) => {
                let shift = 32 - u32::from(self.mask);
                let base = u32::from(n.network());
                let addr = base | ((i as u32) << shift);
                IpNet::V4(Ipv4Net::new(addr.into(), self.mask).expect("mask checked in new"))
            }
            IpNet::V6(n) => {
                let shift = 128 - u32::from(self.mask);
                let base = u128::from(n.network());
                let addr = base | (i << shift);
                IpNet::V6(Ipv6Net::new(addr.into(), self.mask).expect("mask checked in new"))
            }
        }
    }

    /// Whether `block` is one of this pool's blocks (inside it, aligned, the right size).
    pub fn holds(&self, block: &IpNet) -> bool {
        block.prefix_len() == self.mask && block.trunc() == *block && self.cidr.contains(block)
    }
}

/// Whether two prefixes share an address.
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// A free block of `pool`: the first not overlapping `taken`, probing from a place derived
/// from `seed` (the node's key).
pub fn choose(pool: &Pool, taken: &[IpNet], seed: &[u8]) -> Result<IpNet, AllocError> {
    let digest = Sha256::digest(seed);
    let mut s = [0u8; 16];
    s.copy_from_slice(&digest[..16]);
    let n = pool.blocks();
    let start = u128::from_be_bytes(s) % n.max(1);
    let probes = n.min(MAX_PROBES + taken.len() as u128);
    for k in 0..probes {
        let b = pool.block(start.wrapping_add(k));
        if !taken.iter().any(|t| overlaps(t, &b)) {
            return Ok(b);
        }
    }
    Err(AllocError::Exhausted {
        pool: pool.cidr,
        mask: pool.mask,
        blocks: n,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_are_aligned_and_inside() {
        let p = Pool::new(net("100.64.0.0/16"), 24).unwrap();
        assert_eq!(p.blocks(), 256);
        assert_eq!(p.block(0), net("100.64.0.0/24"));
        assert_eq!(p.block(255), net("100.64.255.0/24"));
        assert!(p.holds(&net("100.64.7.0/24")));
        assert!(!p.holds(&net("100.64.7.0/25")));
        assert!(!p.holds(&net("100.65.7.0/24")));
        let v6 = Pool::new(net("fd00:64::/48"), 64).unwrap();
        assert_eq!(v6.block(1), net("fd00:64:0:1::/64"));
    }

    #[test]
    fn bad_masks_and_exhaustion_name_the_pool() {
        let e = Pool::new(net("100.64.0.0/16"), 16).unwrap_err().to_string();
        assert!(e.contains("100.64.0.0/16") && e.contains("/16"), "{e}");
        assert!(Pool::new(net("100.64.0.0/16"), 33).is_err());
        let p = Pool::new(net("100.64.0.0/23"), 24).unwrap();
        let e = choose(&p, &[net("100.64.0.0/23")], b"k")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("100.64.0.0/23") && e.contains("no free /24"),
            "{e}"
        );
    }

    #[test]
    fn different_keys_start_in_different_places() {
        let p = Pool::new(net("100.64.0.0/16"), 24).unwrap();
        let picks: std::collections::BTreeSet<IpNet> = (0..20u8)
            .map(|i| choose(&p, &[], &[i; 32]).unwrap())
            .collect();
        assert!(picks.len() >= 18, "{picks:?}");
    }

    proptest! {
        #[test]
        fn a_choice_is_free_inside_and_aligned(
            taken in proptest::collection::vec((0u32..256, 20u8..=26), 0..200),
            seed in any::<[u8; 32]>(),
        ) {
            let p = Pool::new(net("100.64.0.0/16"), 24).unwrap();
            let taken: Vec<IpNet> = taken
                .into_iter()
                .map(|(i, len)| IpNet::new(std::net::Ipv4Addr::new(100, 64, i as u8, 0).into(), len).unwrap().trunc())
                .collect();
            match choose(&p, &taken, &seed) {
                Ok(b) => {
                    prop_assert!(p.holds(&b));
                    prop_assert!(!taken.iter().any(|t| overlaps(t, &b)));
                }
                Err(_) => {
                    // Only when truly full.
                    prop_assert!((0..256).all(|i| taken.iter().any(|t| overlaps(t, &p.block(i)))));
                }
            }
        }
    }
}
