//! The fault schedule: from a seed, a sequence of faults, one at a time with a settling gap
//! after each, so every outage is attributed to exactly one fault. The same seed, node count
//! and length give the same schedule, so a failed run can be replayed.

use std::fmt;
use std::time::Duration;

use weft::demo::lab::Stream;

use super::fabric::REGIONS;

/// Seconds after a fault ends before the next one starts.
pub(crate) const SETTLE: Duration = Duration::from_secs(15);

/// One fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// `kill -9` of node `.0`, restarted after the fault's length.
    Kill(usize),
    /// SIGTERM of node `.0` and a start right after, as `systemctl restart` does.
    Restart(usize),
    /// SIGTERM of node `.0` and a start with `--reset-state` (its state dir wiped).
    Wipe(usize),
    /// Region `.0` cut from the internet segment for the fault's length.
    Partition(usize),
    /// Node `.0` loses `.1` % of its packets both ways and its sends are delayed `.2` ms (where
    /// the kernel has netem), for the fault's length.
    Lossy(usize, u8, u32),
    /// The trusted region's nodes stop trusting their LAN (a SIGHUP each), and trust it again
    /// at the fault's end (another SIGHUP each).
    Reload,
}

impl Fault {
    /// The kind, as the report groups faults.
    pub(crate) fn kind(self) -> &'static str {
        match self {
            Self::Kill(_) => "kill -9",
            Self::Restart(_) => "graceful restart",
            Self::Wipe(_) => "restart, state wiped",
            Self::Partition(_) => "region partition",
            Self::Lossy(..) => "loss + delay",
            Self::Reload => "reload (trusted subnets)",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Kill(i) => write!(f, "kill -9 n{i}"),
            Self::Restart(i) => write!(f, "restart n{i}"),
            Self::Wipe(i) => write!(f, "restart n{i} --reset-state"),
            Self::Partition(r) => write!(f, "partition {}", REGIONS[r]),
            Self::Lossy(i, pct, ms) => write!(f, "n{i} {pct}% loss, {ms} ms delay"),
            Self::Reload => write!(f, "reload {} trust", REGIONS[super::fabric::TRUSTED_REGION]),
        }
    }
}

/// A fault and when it starts and ends, from the start of the chaos phase.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Event {
    /// The fault.
    pub(crate) fault: Fault,
    /// When it starts.
    pub(crate) start: Duration,
    /// When it ends (the node restarts, the partition heals, ...).
    pub(crate) end: Duration,
}

/// The schedule for `nodes` nodes over `total`, from `seed`.
pub(crate) fn plan(seed: u64, nodes: usize, total: Duration) -> Vec<Event> {
    // Mixed first: the stream keeps only the seed's odd part, so 2 and 3 would otherwise meet.
    let mut rng = Stream::new(mix(seed));
    let mut t = Duration::from_secs(5);
    let mut events = Vec::new();
    loop {
        let node = rng.below(nodes as u64) as usize;
        let secs =
            |rng: &mut Stream, lo: u64, hi: u64| Duration::from_secs(lo + rng.below(hi - lo + 1));
        let (fault, len) = match rng.below(6) {
            0 => (Fault::Kill(node), secs(&mut rng, 5, 20)),
            1 => (Fault::Restart(node), Duration::ZERO),
            2 => (Fault::Wipe(node), Duration::ZERO),
            3 => (
                Fault::Partition(rng.below(REGIONS.len() as u64) as usize),
                secs(&mut rng, 10, 30),
            ),
            4 => (
                Fault::Lossy(node, 1 + rng.below(5) as u8, 20 + rng.below(81) as u32),
                secs(&mut rng, 20, 40),
            ),
            _ => (Fault::Reload, secs(&mut rng, 10, 20)),
        };
        if t + len + SETTLE > total {
            return events;
        }
        events.push(Event {
            fault,
            start: t,
            end: t + len,
        });
        t += len + SETTLE;
    }
}

/// The splitmix64 finaliser: neighbouring seeds give unrelated streams.
fn mix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A schedule given by hand (to replay a scenario): faults separated by commas, each
/// `kill:NODE:SECS`, `restart:NODE`, `wipe:NODE`, `partition:REGION:SECS`,
/// `loss:NODE:PERCENT:DELAY_MS:SECS` or `reload:SECS`, one after another with the settling gap.
pub(crate) fn parse(spec: &str, nodes: usize) -> Result<Vec<Event>, String> {
    let mut t = Duration::from_secs(5);
    let mut events = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let parts: Vec<&str> = item.split(':').collect();
        let num = |k: usize, max: u64| -> Result<u64, String> {
            let v: u64 = parts
                .get(k)
                .ok_or_else(|| format!("fault {item:?}: missing field {k}"))?
                .parse()
                .map_err(|_| format!("fault {item:?}: field {k} is not a number"))?;
            if v >= max {
                return Err(format!(
                    "fault {item:?}: field {k} is {v}, must be below {max}"
                ));
            }
            Ok(v)
        };
        let n = nodes as u64;
        let (fault, len) = match (parts[0], parts.len()) {
            ("kill", 3) => (Fault::Kill(num(1, n)? as usize), num(2, 3600)?),
            ("restart", 2) => (Fault::Restart(num(1, n)? as usize), 0),
            ("wipe", 2) => (Fault::Wipe(num(1, n)? as usize), 0),
            ("partition", 3) => {
                let r = REGIONS
                    .iter()
                    .position(|r| *r == parts[1])
                    .ok_or_else(|| format!("fault {item:?}: regions are {REGIONS:?}"))?;
                (Fault::Partition(r), num(2, 3600)?)
            }
            ("loss", 5) => (
                Fault::Lossy(
                    num(1, n)? as usize,
                    num(2, 101)? as u8,
                    num(3, 10_000)? as u32,
                ),
                num(4, 3600)?,
            ),
            ("reload", 2) => (Fault::Reload, num(1, 3600)?),
            _ => {
                return Err(format!(
                    "fault {item:?}: not one of kill:NODE:SECS, restart:NODE, wipe:NODE, partition:REGION:SECS, loss:NODE:PCT:MS:SECS, reload:SECS"
                ));
            }
        };
        let len = Duration::from_secs(len);
        events.push(Event {
            fault,
            start: t,
            end: t + len,
        });
        t += len + SETTLE;
    }
    if events.is_empty() {
        return Err("--faults: no fault given".into());
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedule_by_hand_parses_and_bad_ones_are_named() {
        let e = parse(
            "wipe:0, reload:11,partition:us:20,loss:3:2:50:30,kill:1:9,restart:2",
            6,
        )
        .unwrap();
        assert_eq!(
            e.iter().map(|e| e.fault).collect::<Vec<_>>(),
            [
                Fault::Wipe(0),
                Fault::Reload,
                Fault::Partition(1),
                Fault::Lossy(3, 2, 50),
                Fault::Kill(1),
                Fault::Restart(2)
            ]
        );
        assert_eq!(e[1].end - e[1].start, Duration::from_secs(11));
        assert_eq!(e[2].start, e[1].end + SETTLE);
        for (bad, says) in [
            ("kill:6:5", "must be below 6"),
            ("partition:mars:5", "regions are"),
            ("loss:1:101:0:5", "must be below 101"),
            ("reboot:1", "not one of"),
            ("kill:x:5", "not a number"),
            ("", "no fault"),
        ] {
            let err = parse(bad, 6).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn a_seed_gives_one_schedule_that_fits_and_never_overlaps() {
        let a = plan(7, 24, Duration::from_secs(600));
        let b = plan(7, 24, Duration::from_secs(600));
        assert_eq!(
            a.iter().map(|e| (e.fault, e.start)).collect::<Vec<_>>(),
            b.iter().map(|e| (e.fault, e.start)).collect::<Vec<_>>()
        );
        assert!(a.len() >= 10, "{} faults in 10 minutes", a.len());
        for w in a.windows(2) {
            assert!(w[0].end + SETTLE <= w[1].start, "{w:?}");
        }
        assert!(
            a.last()
                .is_some_and(|e| e.end + SETTLE <= Duration::from_secs(600))
        );
        assert!(a.iter().all(|e| match e.fault {
            Fault::Kill(i) | Fault::Restart(i) | Fault::Wipe(i) | Fault::Lossy(i, ..) => i < 24,
            Fault::Partition(r) => r < 3,
            Fault::Reload => true,
        }));
        // Neighbouring seeds give different schedules.
        let faults = |seed| {
            plan(seed, 24, Duration::from_secs(600))
                .iter()
                .map(|e| e.fault)
                .collect::<Vec<_>>()
        };
        for seed in [2, 6, 8] {
            assert_ne!(
                faults(seed),
                faults(seed + 1),
                "seeds {seed} and {}",
                seed + 1
            );
        }
    }
}
