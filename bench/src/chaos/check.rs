//! The invariants, checked once a second against the probes and the daemons' views, counted,
//! with the first examples of each kept for the report.
//!
//! Reachability is judged per ordered pair (a probes b) that the lab expects to work: both
//! daemons up and no partition between them. Each such pair carries the moment it became
//! expected and why (a start, a restart, a heal); its outage is the time since its newest
//! answered probe, or since that moment when none was answered after it. The limit depends on
//! the cause until the first answer ([`Limits`]); from then on the steady limit applies.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// Why a pair is expected to work since when it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// The lab's first start (checked against the start-up limit).
    Start,
    /// One of the two was (re)started.
    Restart,
    /// A partition between them healed.
    Heal,
    /// Answered since; the steady limit applies.
    Steady,
}

/// How long each kind of outage may last; `resolution` (the probe period) is added to each,
/// since an outage is only seen to end when a probe is answered.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// A pair that worked: `liveness_timeout` + 5 s.
    pub(crate) steady: Duration,
    /// A restarted node, from its start: 5 s.
    pub(crate) restart: Duration,
    /// After a heal: 10 s.
    pub(crate) heal: Duration,
    /// The lab's first start.
    pub(crate) start: Duration,
    /// Two owners of one block in one view: one gossip round, plus the sampling period.
    pub(crate) conflict: Duration,
    /// The probe period.
    pub(crate) resolution: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Pair {
    /// Since when and why the pair is expected to work; `None` while it is not.
    since: Option<(Instant, Cause)>,
    /// A violation was counted for this outage already.
    flagged: bool,
}

/// What one fault did, as far as the probes saw.
#[derive(Debug, Clone, Default)]
pub(crate) struct FaultStats {
    /// The longest outage of an expected pair while the fault was current.
    pub(crate) worst_outage: Duration,
    /// The longest time from a (re)start or heal to a pair's first answer.
    pub(crate) recovery: Option<Duration>,
}

/// An invariant's tally.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tally {
    /// Times it was checked.
    pub(crate) checks: u64,
    /// Times it broke.
    pub(crate) violations: u64,
    /// The first few breaks, described.
    pub(crate) examples: Vec<String>,
}

/// The checker.
#[derive(Debug)]
pub(crate) struct Checker {
    n: usize,
    limits: Limits,
    start: Instant,
    pairs: Vec<Pair>,
    conflicts: HashMap<(String, String), (Instant, bool)>,
    /// Tallies by invariant.
    pub(crate) tallies: BTreeMap<&'static str, Tally>,
    /// Per fault (by schedule index), what it did.
    pub(crate) faults: BTreeMap<usize, FaultStats>,
    current: Option<usize>,
    /// The longest start-up (first answers of every pair).
    pub(crate) start_recovery: Duration,
}

/// The invariants' names, as the report lists them.
pub(crate) const BLACK_HOLE: &str = "no expected pair unreachable past its limit";
/// A restarted node reached by every live node within its limit.
pub(crate) const RESTART: &str = "a restarted node reachable within 5 s";
/// After a heal.
pub(crate) const HEAL: &str = "after a heal every pair reachable within 10 s";
/// One block, one owner.
pub(crate) const OWNERS: &str =
    "no block owned by two live nodes in any view past one gossip round";
/// No crash.
pub(crate) const CRASH: &str = "no daemon crash or panic";
/// The lab's own sanity: a partition cut what it separates.
pub(crate) const FABRIC: &str = "a partition stops every probe across it (the lab's own check)";
/// Memory and descriptors.
pub(crate) const FLAT: &str = "RSS and open fds flat (first vs last minute)";

impl Checker {
    /// A checker for `n` nodes.
    pub(crate) fn new(n: usize, limits: Limits, start: Instant) -> Self {
        let tallies = [BLACK_HOLE, RESTART, HEAL, OWNERS, CRASH, FLAT, FABRIC]
            .into_iter()
            .map(|k| (k, Tally::default()))
            .collect();
        Self {
            n,
            limits,
            start,
            pairs: vec![
                Pair {
                    since: None,
                    flagged: false
                };
                n * n
            ],
            conflicts: HashMap::new(),
            tallies,
            faults: BTreeMap::new(),
            current: None,
            start_recovery: Duration::ZERO,
        }
    }

    /// Records a break of `invariant` at `now`.
    pub(crate) fn violation(&mut self, invariant: &'static str, now: Instant, what: String) {
        let line = format!(
            "t={:.0}s: {what}",
            now.duration_since(self.start).as_secs_f64()
        );
        println!("chaos: BREAK ({invariant}) {line}");
        let t = self.tallies.entry(invariant).or_default();
        t.violations += 1;
        if t.examples.len() < 5 {
            t.examples.push(line);
        }
    }

    /// Counts one check of `invariant`.
    pub(crate) fn checked(&mut self, invariant: &'static str, n: u64) {
        self.tallies.entry(invariant).or_default().checks += n;
    }

    /// The fault now current (its stats collect outages), if any.
    pub(crate) fn set_fault(&mut self, fault: Option<usize>) {
        self.current = fault;
        if let Some(f) = fault {
            self.faults.entry(f).or_default();
        }
    }

    /// Pair (a, b) is expected to work from `at` because of `cause`; `None`: not expected.
    pub(crate) fn expect(&mut self, a: usize, b: usize, at: Option<(Instant, Cause)>) {
        if a != b {
            for p in [a * self.n + b, b * self.n + a] {
                self.pairs[p] = Pair {
                    since: at,
                    flagged: false,
                };
            }
        }
    }

    fn limit(&self, cause: Cause) -> Duration {
        self.limits.resolution
            + match cause {
                Cause::Start => self.limits.start,
                Cause::Restart => self.limits.restart,
                Cause::Heal => self.limits.heal,
                Cause::Steady => self.limits.steady,
            }
    }

    /// Checks every expected pair against the probes' `last_ok` at `now`; returns (pairs
    /// answered within `fresh`, pairs expected), for the timeline.
    pub(crate) fn reachability(
        &mut self,
        now: Instant,
        last_ok: &[Option<Instant>],
        fresh: Duration,
    ) -> (usize, usize) {
        let (mut up, mut expected) = (0, 0);
        for (idx, ok) in last_ok.iter().enumerate().take(self.pairs.len()) {
            let Some((since, cause)) = self.pairs[idx].since else {
                continue;
            };
            expected += 1;
            let last = ok.filter(|t| *t >= since);
            if let Some(t) = last {
                if now.duration_since(t) <= fresh {
                    up += 1;
                }
                if cause != Cause::Steady {
                    self.recovered(cause, t.duration_since(since));
                    self.pairs[idx].since = Some((since, Cause::Steady));
                    self.pairs[idx].flagged = false;
                }
            }
            let cause = self.pairs[idx].since.map_or(cause, |s| s.1);
            let outage = now.duration_since(last.unwrap_or(since));
            if let Some(f) = self.current.and_then(|c| self.faults.get_mut(&c)) {
                f.worst_outage = f.worst_outage.max(outage);
            }
            let invariant = match cause {
                Cause::Restart => RESTART,
                Cause::Heal => HEAL,
                Cause::Start | Cause::Steady => BLACK_HOLE,
            };
            self.checked(invariant, 1);
            if outage > self.limit(cause) && !self.pairs[idx].flagged {
                self.pairs[idx].flagged = true;
                let (a, b) = (idx / self.n, idx % self.n);
                self.violation(
                    invariant,
                    now,
                    format!(
                        "n{a} → n{b} unanswered for {:.1} s ({cause:?}, limit {:.1} s)",
                        outage.as_secs_f64(),
                        self.limit(cause).as_secs_f64()
                    ),
                );
            }
        }
        (up, expected)
    }

    fn recovered(&mut self, cause: Cause, took: Duration) {
        if cause == Cause::Start {
            self.start_recovery = self.start_recovery.max(took);
        } else if let Some(f) = self.current.and_then(|c| self.faults.get_mut(&c)) {
            f.recovery = Some(f.recovery.unwrap_or_default().max(took));
        }
    }

    /// Checks one view of block owners (a node's, or the lab's own across the nodes):
    /// `owners` lists (block, owner) for the viewer itself and every member it believes alive.
    /// Two owners of one block for longer than the conflict limit break [`OWNERS`].
    pub(crate) fn owners(&mut self, now: Instant, viewer: &str, owners: &[(String, String)]) {
        let mut by_block: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (block, owner) in owners {
            by_block.entry(block).or_default().push(owner);
        }
        self.checked(OWNERS, by_block.len() as u64);
        let clashing: Vec<(String, String)> = by_block
            .iter()
            .filter(|(_, o)| o.len() > 1)
            .map(|(b, o)| ((*b).to_owned(), o.join(" and ")))
            .collect();
        self.conflicts
            .retain(|(v, b), _| v != viewer || clashing.iter().any(|(c, _)| c == b));
        for (block, who) in clashing {
            let limit = self.limits.conflict;
            let entry = self
                .conflicts
                .entry((viewer.to_owned(), block.clone()))
                .or_insert((now, false));
            if now.duration_since(entry.0) > limit && !entry.1 {
                entry.1 = true;
                let since = entry.0;
                self.violation(
                    OWNERS,
                    now,
                    format!(
                        "{viewer} sees {block} owned by {who} for {:.1} s",
                        now.duration_since(since).as_secs_f64()
                    ),
                );
            }
        }
    }

    /// Whether any invariant broke.
    pub(crate) fn failed(&self) -> bool {
        self.tallies.values().any(|t| t.violations > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            steady: Duration::from_secs(35),
            restart: Duration::from_secs(5),
            heal: Duration::from_secs(10),
            start: Duration::from_secs(60),
            conflict: Duration::from_secs(2),
            resolution: Duration::from_millis(500),
        }
    }

    #[test]
    fn a_restarted_pair_answered_late_breaks_the_restart_invariant_once() {
        let t0 = crate::chaos::now();
        let mut c = Checker::new(2, limits(), t0);
        c.expect(0, 1, Some((t0, Cause::Restart)));
        let mut last = vec![None; 4];
        // Within the limit: nothing.
        c.reachability(t0 + Duration::from_secs(5), &last, Duration::from_secs(2));
        assert_eq!(c.tallies[RESTART].violations, 0);
        // Past it, in both directions: one break per pair, not one per second.
        for s in 6..9 {
            c.reachability(t0 + Duration::from_secs(s), &last, Duration::from_secs(2));
        }
        assert_eq!(c.tallies[RESTART].violations, 2);
        // Answered: the pair is steady, the steady limit applies from the answer.
        last[1] = Some(t0 + Duration::from_secs(9));
        last[2] = Some(t0 + Duration::from_secs(9));
        let (up, expected) =
            c.reachability(t0 + Duration::from_secs(10), &last, Duration::from_secs(2));
        assert_eq!((up, expected), (2, 2));
        c.reachability(t0 + Duration::from_secs(40), &last, Duration::from_secs(2));
        assert_eq!(c.tallies[BLACK_HOLE].violations, 0);
        c.reachability(t0 + Duration::from_secs(45), &last, Duration::from_secs(2));
        assert_eq!(c.tallies[BLACK_HOLE].violations, 2);
        // An answer to a probe sent before the pair was expected again does not count.
        c.expect(0, 1, Some((t0 + Duration::from_secs(50), Cause::Heal)));
        c.reachability(t0 + Duration::from_secs(61), &last, Duration::from_secs(2));
        assert_eq!(c.tallies[HEAL].violations, 2);
    }

    #[test]
    fn two_owners_of_a_block_break_the_owner_invariant_only_when_it_lasts() {
        let t0 = crate::chaos::now();
        let mut c = Checker::new(3, limits(), t0);
        let clash = vec![
            ("100.64.1.0/24".to_owned(), "n0".to_owned()),
            ("100.64.1.0/24".to_owned(), "n2".to_owned()),
        ];
        c.owners(t0, "n1", &clash);
        c.owners(t0 + Duration::from_secs(2), "n1", &clash);
        assert_eq!(c.tallies[OWNERS].violations, 0);
        // Resolved, then back: the clock starts again.
        c.owners(t0 + Duration::from_secs(3), "n1", &clash[..1]);
        c.owners(t0 + Duration::from_secs(4), "n1", &clash);
        c.owners(t0 + Duration::from_secs(6), "n1", &clash);
        assert_eq!(c.tallies[OWNERS].violations, 0);
        c.owners(t0 + Duration::from_secs(7), "n1", &clash);
        c.owners(t0 + Duration::from_secs(8), "n1", &clash);
        assert_eq!(c.tallies[OWNERS].violations, 1);
        assert!(c.failed());
    }
}
