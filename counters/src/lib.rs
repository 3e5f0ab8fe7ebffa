//! Counters by reason: the one type both of weft's cores count their drops in.
//!
//! The router counts dropped packets by `DropReason`, the gossip core refused input by
//! `Rejected`; each reason enum implements [`Reason`] (every reason, its label), and the
//! counters are a [`ByReason`] of it. So the daemon's status report and its metrics list the
//! reasons of both cores with one piece of code ([`ByReason::labelled`]), and a reason added to
//! an enum shows up in both without further change.

use std::marker::PhantomData;

/// A reason something was dropped or refused.
pub trait Reason: Copy + 'static {
    /// Every reason, in counter order: `ALL[r.index()] == r`.
    const ALL: &'static [Self];

    /// Its position in [`Reason::ALL`].
    fn index(self) -> usize;

    /// Its snake_case label, as status keys and metric labels show it.
    fn as_str(self) -> &'static str;
}

/// Implements [`Reason`] for a fieldless enum that has an inherent `const ALL: [Self; N]` (in
/// declaration order) and `fn as_str(self) -> &'static str`.
#[macro_export]
macro_rules! impl_reason {
    ($t:ty) => {
        impl $crate::Reason for $t {
            const ALL: &'static [Self] = &<$t>::ALL;

            fn index(self) -> usize {
                self as usize
            }

            fn as_str(self) -> &'static str {
                <$t>::as_str(self)
            }
        }
    };
}

/// One counter per reason `R`; `N` is the number of reasons (`R::ALL.len()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByReason<R, const N: usize> {
    counts: [u64; N],
    reason: PhantomData<R>,
}

impl<R, const N: usize> Default for ByReason<R, N> {
    fn default() -> Self {
        Self {
            counts: [0; N],
            reason: PhantomData,
        }
    }
}

impl<R: Reason, const N: usize> ByReason<R, N> {
    /// Counts one.
    pub fn count(&mut self, reason: R) {
        self.add(reason, 1);
    }

    /// Counts `n`.
    pub fn add(&mut self, reason: R, n: u64) {
        self.counts[reason.index()] += n;
    }

    /// The count for `reason`.
    pub fn get(&self, reason: R) -> u64 {
        self.counts[reason.index()]
    }

    /// `(reason, count)` for every reason with a non-zero count, in counter order.
    pub fn nonzero(&self) -> impl Iterator<Item = (R, u64)> + '_ {
        R::ALL
            .iter()
            .map(|r| (*r, self.get(*r)))
            .filter(|(_, n)| *n > 0)
    }

    /// `(label, count)` for every reason with a non-zero count: what status and metrics list.
    pub fn labelled(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.nonzero().map(|(r, n)| (r.as_str(), n))
    }

    /// The sum over all reasons.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Why {
        A,
        B,
        C,
    }

    impl Reason for Why {
        const ALL: &'static [Self] = &[Self::A, Self::B, Self::C];
        fn index(self) -> usize {
            self as usize
        }
        fn as_str(self) -> &'static str {
            match self {
                Self::A => "a",
                Self::B => "b",
                Self::C => "c",
            }
        }
    }

    #[test]
    fn counts_by_reason_and_lists_only_the_nonzero_in_order() {
        let mut c = ByReason::<Why, 3>::default();
        c.count(Why::C);
        c.add(Why::A, 4);
        c.count(Why::C);
        assert_eq!((c.get(Why::A), c.get(Why::B), c.get(Why::C)), (4, 0, 2));
        assert_eq!(c.total(), 6);
        assert_eq!(c.labelled().collect::<Vec<_>>(), [("a", 4), ("c", 2)]);
        assert_eq!(ByReason::<Why, 3>::default().labelled().count(), 0);
    }

    #[test]
    fn every_reason_sits_at_its_index() {
        for (i, r) in Why::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }
}
