//! `weft-bench chaos`: real `weft run` daemons in network namespaces, put through a seeded
//! schedule of faults (kill -9, graceful restarts, restarts with the state wiped, region
//! partitions, loss and delay, reloads that change trusted subnets) while every node probes the
//! others' overlay addresses, and the invariants ([`check`]) are checked once a second. The
//! report (`bench/results/chaos.md` and an SVG timeline beside it) gives the seed, the
//! invariants' tallies with their first breaks, what each fault did, and each daemon's memory,
//! descriptors and gossip rate; the run ends non-zero, naming the seed, when an invariant broke.
//!
//! ```text
//! fabric  — namespaces, links, configs, the switch's nft rules     (fabric.rs)
//! probes  — a raw-ICMP prober per node, last answer per pair        (probe.rs)
//! watch   — status over each API socket, RSS and fds from /proc    (watch.rs)
//! check   — expected pairs, limits, block owners, tallies          (check.rs)
//! report  — Markdown and SVG                                       (report.rs)
//! ```

mod check;
mod fabric;
mod probe;
mod report;
mod schedule;
mod watch;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use check::{Cause, Checker, Limits};
use fabric::{Fabric, Impairment, TRUSTED_REGION};
use probe::Probes;
use schedule::{Event, Fault, SETTLE};

/// The liveness timeout the lab's daemons run with (weft's default).
const LIVENESS: Duration = Duration::from_secs(30);
/// Samples of RSS and descriptors, one per this many ticks (seconds).
const USAGE_EVERY: u64 = 5;

/// The run's parameters.
#[derive(Debug, Clone)]
pub(crate) struct Opts {
    /// Daemons.
    pub(crate) nodes: usize,
    /// Length of the fault phase.
    pub(crate) duration: Duration,
    /// The schedule's seed.
    pub(crate) seed: u64,
    /// The report.
    pub(crate) out: PathBuf,
    /// Faults given by hand instead of the seed's ([`schedule::parse`]).
    pub(crate) faults: Option<String>,
}

/// The harness's clock (a harness, not a core: wall time is what it measures).
#[expect(clippy::disallowed_methods, reason = "the harness measures real time")]
pub(crate) fn now() -> Instant {
    Instant::now()
}

/// One RSS and descriptor sample.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Usage {
    /// Seconds since the lab started.
    pub(crate) t: f64,
    /// Which life of the daemon (0 = first start).
    pub(crate) life: u32,
    /// Resident memory, KiB.
    pub(crate) rss_kb: u64,
    /// Open descriptors.
    pub(crate) fds: usize,
    /// Open gossip connections (each a descriptor) at the last status read.
    pub(crate) conns: usize,
}

/// A node as the harness tracks it.
#[derive(Debug, Clone, Default)]
struct NodeTrack {
    /// Up since (its last start), or down.
    up: Option<Instant>,
    /// Starts after the first.
    life: u32,
    usage: Vec<Usage>,
    /// (first, last) gossip samples of each life: (seconds, bytes sent).
    gossip: Vec<((f64, u64), (f64, u64))>,
    /// Open gossip connections at the last status read.
    conns: usize,
}

/// A run in progress.
struct Run {
    fabric: Fabric,
    probes: Probes,
    checker: Checker,
    nodes: Vec<NodeTrack>,
    t0: Instant,
    ticks: u64,
    fresh: Duration,
    /// (seconds, pairs answered recently, pairs expected).
    timeline: Vec<(f64, usize, usize)>,
    /// (fault, seconds started, seconds ended) as carried out.
    done: Vec<(Fault, f64, f64)>,
    /// Whether delay could be injected (netem), once tried.
    netem: Option<bool>,
    /// Breaks seen at the last status dump, and the dumps made (at most [`DUMPS`]).
    dumped: (u64, usize),
    /// Where the report goes (dumps go beside it).
    out: PathBuf,
    /// When the current partition began.
    cut_at: Option<Instant>,
}

/// Status dumps made when breaks appear (every daemon's status, for the post-mortem).
const DUMPS: usize = 3;

/// The schedule `opts` give, one fault a line: start and end (seconds into the fault phase).
pub(crate) fn schedule_text(opts: &Opts) -> anyhow::Result<String> {
    Ok(events(opts)?
        .iter()
        .map(|e| {
            format!(
                "{:>5} s {:>5} s  {}\n",
                e.start.as_secs(),
                e.end.as_secs(),
                e.fault
            )
        })
        .collect())
}

/// The faults to carry out: the hand-given ones, else the seed's.
fn events(opts: &Opts) -> anyhow::Result<Vec<Event>> {
    match &opts.faults {
        Some(spec) => schedule::parse(spec, opts.nodes).map_err(|e| anyhow::anyhow!(e)),
        None => Ok(schedule::plan(opts.seed, opts.nodes, opts.duration)),
    }
}

/// Runs the lab and writes the report; fails when an invariant broke.
pub(crate) fn run(bin: &Path, opts: &Opts) -> anyhow::Result<()> {
    weft::demo::lab::require_root("weft-bench chaos")?;
    let n = opts.nodes;
    // Each pair probed about twice a second, at most ~2000 probes a second in all.
    let pair_period =
        Duration::from_millis(500).max(Duration::from_secs_f64((n * (n - 1)) as f64 / 2000.0));
    let limits = Limits {
        steady: LIVENESS + Duration::from_secs(5),
        restart: Duration::from_secs(5),
        heal: Duration::from_secs(10),
        start: Duration::from_secs(60) + Duration::from_millis(500) * n as u32,
        conflict: Duration::from_secs(2),
        resolution: pair_period,
    };
    println!(
        "chaos: {n} daemons, seed {}, {:?} of faults",
        opts.seed, opts.duration
    );
    let fabric = Fabric::build(bin, n)?;
    let t0 = now();
    let probes = Probes::start(&fabric, pair_period);
    let mut run = Run {
        fabric,
        probes,
        checker: Checker::new(n, limits, t0),
        nodes: vec![NodeTrack::default(); n],
        t0,
        ticks: 0,
        fresh: pair_period * 3,
        timeline: Vec::new(),
        done: Vec::new(),
        netem: None,
        dumped: (0, 0),
        out: opts.out.clone(),
        cut_at: None,
    };
    let started = match run.start_all(limits.start) {
        Ok(took) => took,
        Err(e) => {
            let logs = run.keep_logs(&opts.out)?;
            return Err(e.context(format!("the daemons' logs are in {}", logs.display())));
        }
    };
    println!(
        "chaos: every pair answered {:.1} s after the last start",
        started.as_secs_f64()
    );
    let events = events(opts)?;
    let total = match &opts.faults {
        Some(_) => events.last().map_or(opts.duration, |e| e.end + SETTLE),
        None => opts.duration,
    };
    let chaos_at = run.secs();
    run.chaos(&events, total)?;
    let (sent, answered) = run.probes.counts();
    run.finish_checks();
    let failed = run.checker.failed();
    let summary = report::Summary {
        opts,
        pair_period,
        limits,
        started,
        chaos_at,
        done: &run.done,
        checker: &run.checker,
        nodes: &run
            .nodes
            .iter()
            .map(|t| (t.usage.clone(), t.gossip.clone()))
            .collect::<Vec<_>>(),
        timeline: &run.timeline,
        probes: (sent, answered),
        netem: run.netem,
    };
    report::write(&summary)?;
    println!("chaos: report written to {}", opts.out.display());
    let logs = if failed {
        Some(run.keep_logs(&opts.out)?)
    } else {
        None
    };
    run.probes.stop()?;
    if let Some(logs) = logs {
        let replay = match &opts.faults {
            Some(f) => format!("--faults '{f}'"),
            None => format!(
                "--mins {} --seed {}",
                opts.duration.as_secs_f64() / 60.0,
                opts.seed
            ),
        };
        anyhow::bail!(
            "an invariant broke (replay with `weft-bench chaos --nodes {n} {replay}`); see {}, and the daemons' logs in {}",
            opts.out.display(),
            logs.display()
        );
    }
    Ok(())
}

impl Run {
    fn secs(&self) -> f64 {
        now().duration_since(self.t0).as_secs_f64()
    }

    /// Starts every daemon, then waits (ticking) until every pair has answered, at most
    /// `limit` from the last start.
    fn start_all(&mut self, limit: Duration) -> anyhow::Result<Duration> {
        for i in 0..self.nodes.len() {
            let at = now();
            self.fabric.start(i, false)?;
            self.nodes[i].up = Some(at);
        }
        let last = now();
        self.each_pair(|run, a, b| {
            let since = run.nodes[a].up.max(run.nodes[b].up);
            run.checker.expect(a, b, since.map(|s| (s, Cause::Start)));
        });
        loop {
            self.tick()?;
            if self.timeline.last().is_some_and(|&(_, up, all)| up == all) {
                return Ok(now().duration_since(last));
            }
            anyhow::ensure!(
                now().duration_since(last) < limit,
                "the lab did not converge within {limit:?} of the last start: {:?} pairs answered",
                self.timeline.last()
            );
        }
    }

    /// One second: samples every daemon, checks the invariants, records the timeline.
    fn tick(&mut self) -> anyhow::Result<()> {
        let next = self.t0 + Duration::from_secs(self.ticks + 1);
        self.ticks += 1;
        let at = now();
        let mut own: Vec<(String, String)> = Vec::new();
        for i in 0..self.nodes.len() {
            if self.nodes[i].up.is_none() {
                continue;
            }
            let name = self.fabric.nodes[i].daemon.name.clone();
            if !self.fabric.lab.running(&name) {
                self.crashed(i, at)?;
                continue;
            }
            self.sample(i, at, &mut own);
        }
        self.checker.owners(at, "the lab (nodes' own blocks)", &own);
        let (up, all) = self
            .checker
            .reachability(at, &self.probes.last_ok(), self.fresh);
        self.timeline.push((self.secs(), up, all));
        self.dump_on_break();
        std::thread::sleep(next.saturating_duration_since(now()));
        Ok(())
    }

    /// When new breaks appeared, writes every daemon's status beside the report
    /// (`<report>.logs/status-<secs>.json`), at most [`DUMPS`] times.
    fn dump_on_break(&mut self) {
        let breaks: u64 = self.checker.tallies.values().map(|t| t.violations).sum();
        if breaks == self.dumped.0 || self.dumped.1 >= DUMPS {
            return;
        }
        self.dumped = (breaks, self.dumped.1 + 1);
        let dir = self.out.with_extension("logs");
        let all: Vec<serde_json::Value> = self
            .fabric
            .nodes
            .iter()
            .map(|n| {
                watch::status(&n.daemon.socket).map_or_else(
                    |e| serde_json::json!({ "node": n.daemon.name, "error": e.to_string() }),
                    |st| serde_json::to_value(st).unwrap_or_default(),
                )
            })
            .collect();
        let path = dir.join(format!("status-{:.0}.json", self.secs()));
        let written = std::fs::create_dir_all(&dir).and_then(|()| {
            std::fs::write(&path, serde_json::to_vec_pretty(&all).unwrap_or_default())
        });
        match written {
            Ok(()) => println!("chaos: every daemon's status saved to {}", path.display()),
            Err(e) => println!(
                "chaos: could not save the status dump {}: {e}",
                path.display()
            ),
        }
    }

    /// Reads node `i`'s status and usage.
    fn sample(&mut self, i: usize, at: Instant, own: &mut Vec<(String, String)>) {
        let d = &self.fabric.nodes[i].daemon;
        if let Ok(st) = watch::status(&d.socket) {
            self.probes.set_target(i, watch::overlay_v4(&st));
            self.checker.owners(at, &d.name, &watch::owners(&st));
            own.extend(
                st.node
                    .pod_cidrs
                    .iter()
                    .map(|c| (c.clone(), d.name.clone())),
            );
            let t = self.secs();
            let track = &mut self.nodes[i];
            if let Some(m) = &st.mesh {
                track.conns = m.connections;
                match track.gossip.get_mut(track.life as usize) {
                    Some(g) => g.1 = (t, m.bytes_sent),
                    None => track.gossip.push(((t, m.bytes_sent), (t, m.bytes_sent))),
                }
            }
        }
        if self.ticks % USAGE_EVERY == 0 {
            let pid = self.fabric.lab.pid(&d.name);
            if let Some((rss_kb, fds)) = pid.and_then(watch::usage) {
                let t = self.secs();
                let track = &mut self.nodes[i];
                track.usage.push(Usage {
                    t,
                    life: track.life,
                    rss_kb,
                    fds,
                    conns: track.conns,
                });
            }
        }
    }

    /// Node `i` exited without being told to: a break, and a start so the run goes on.
    fn crashed(&mut self, i: usize, at: Instant) -> anyhow::Result<()> {
        let d = self.fabric.nodes[i].daemon.clone();
        let log = std::fs::read_to_string(&d.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        self.checker.violation(
            check::CRASH,
            at,
            format!("{} exited on its own; its log ends: {:?}", d.name, tail),
        );
        self.down(i);
        self.restart(i, false)
    }

    /// Node `i` is down: no pair with it is expected.
    fn down(&mut self, i: usize) {
        self.nodes[i].up = None;
        for j in 0..self.nodes.len() {
            self.checker.expect(i, j, None);
        }
    }

    /// Starts node `i` (wiping its state when `wipe`); its pairs are expected from the start.
    fn restart(&mut self, i: usize, wipe: bool) -> anyhow::Result<()> {
        let at = now();
        self.fabric
            .start(i, wipe)
            .with_context(|| format!("restarting n{i}"))?;
        let track = &mut self.nodes[i];
        track.up = Some(at);
        track.life += 1;
        for j in 0..self.nodes.len() {
            if self.nodes[j].up.is_some() && !self.fabric.separated(i, j) {
                self.checker.expect(i, j, Some((at, Cause::Restart)));
            }
        }
        Ok(())
    }

    /// The fault phase: carries out `events` while ticking, for `total`.
    fn chaos(&mut self, events: &[Event], total: Duration) -> anyhow::Result<()> {
        let start = now();
        let mut pending: Vec<(Duration, usize, bool)> = events
            .iter()
            .enumerate()
            .flat_map(|(k, e)| [(e.start, k, true), (e.end, k, false)])
            .collect();
        pending.sort_by_key(|&(t, k, begin)| (t, k, !begin));
        let mut next = 0;
        while now().duration_since(start) < total {
            let t = now().duration_since(start);
            while next < pending.len() && pending[next].0 <= t {
                let (_, k, begin) = pending[next];
                next += 1;
                if begin {
                    self.checker.set_fault(Some(k));
                    println!("chaos: t={:.0}s {}", self.secs(), events[k].fault);
                }
                self.act(events[k].fault, begin)?;
            }
            // Outages count against a fault from its start until it has settled.
            if events
                .iter()
                .rfind(|e| e.start <= t)
                .is_none_or(|e| t >= e.end + SETTLE)
            {
                self.checker.set_fault(None);
            }
            self.tick()?;
        }
        Ok(())
    }

    /// Begins (`begin`) or ends one fault.
    fn act(&mut self, fault: Fault, begin: bool) -> anyhow::Result<()> {
        let t = self.secs();
        match (fault, begin) {
            (Fault::Kill(i), true) => {
                let name = self.fabric.nodes[i].daemon.name.clone();
                self.fabric.lab.kill(&name)?;
                self.down(i);
            }
            (Fault::Kill(i), false) => self.restart(i, false)?,
            (Fault::Restart(i) | Fault::Wipe(i), true) => {
                self.down(i);
                if !self.fabric.stop(i, Duration::from_secs(10))? {
                    let at = now();
                    self.checker.violation(
                        check::CRASH,
                        at,
                        format!("n{i} did not exit cleanly on SIGTERM within 10 s"),
                    );
                }
                self.restart(i, matches!(fault, Fault::Wipe(_)))?;
            }
            (Fault::Restart(_) | Fault::Wipe(_), false) => {}
            (Fault::Partition(r), true) => {
                self.fabric.impair(Impairment::Partition(r))?;
                self.cut_at = Some(now());
                self.each_pair(|run, a, b| {
                    if run.fabric.separated(a, b) {
                        run.checker.expect(a, b, None);
                    }
                });
            }
            (Fault::Partition(r), false) => {
                let cut: Vec<(usize, usize)> =
                    self.pairs_where(|run, a, b| run.fabric.separated(a, b));
                self.cut_held(&cut);
                self.fabric.heal(Impairment::Partition(r))?;
                let at = now();
                for (a, b) in cut {
                    if self.nodes[a].up.is_some() && self.nodes[b].up.is_some() {
                        self.checker.expect(a, b, Some((at, Cause::Heal)));
                    }
                }
            }
            (Fault::Lossy(i, pct, ms), true) => {
                self.fabric.impair(Impairment::Loss(i, pct))?;
                self.netem = Some(self.fabric.delay(i, ms));
            }
            (Fault::Lossy(i, pct, _), false) => {
                self.fabric.heal(Impairment::Loss(i, pct))?;
                self.fabric.undelay(i);
            }
            (Fault::Reload, begin) => self.reload(!begin)?,
        }
        if begin {
            self.done.push((fault, t, t));
        } else if let Some(d) = self.done.iter_mut().rev().find(|d| d.0 == fault) {
            d.2 = t;
        }
        Ok(())
    }

    /// Rewrites the trusted region's configs (`trusting` or not) and sends each a SIGHUP.
    fn reload(&mut self, trusting: bool) -> anyhow::Result<()> {
        self.fabric.trusting = trusting;
        for i in 0..self.nodes.len() {
            if self.fabric.nodes[i].region != TRUSTED_REGION {
                continue;
            }
            self.fabric.write_config(i)?;
            if self.nodes[i].up.is_some() {
                let name = self.fabric.nodes[i].daemon.name.clone();
                self.fabric
                    .lab
                    .signal(&name, nix::sys::signal::Signal::SIGHUP)?;
            }
        }
        Ok(())
    }

    /// Before a heal: no pair the partition separates may have answered a probe sent after
    /// the cut had a second to take hold (else the lab did not partition anything).
    fn cut_held(&mut self, cut: &[(usize, usize)]) {
        let Some(from) = self.cut_at.take() else {
            return;
        };
        let from = from + Duration::from_secs(1);
        let last = self.probes.last_ok();
        let n = self.nodes.len();
        let at = now();
        for &(a, b) in cut {
            self.checker.checked(check::FABRIC, 2);
            for (x, y) in [(a, b), (b, a)] {
                if last[x * n + y].is_some_and(|t| t > from) {
                    self.checker.violation(
                        check::FABRIC,
                        at,
                        format!("n{x} → n{y} answered through the partition"),
                    );
                }
            }
        }
    }

    fn each_pair(&mut self, mut f: impl FnMut(&mut Self, usize, usize)) {
        let n = self.nodes.len();
        for a in 0..n {
            for b in a + 1..n {
                f(self, a, b);
            }
        }
    }

    fn pairs_where(&mut self, f: impl Fn(&Self, usize, usize) -> bool) -> Vec<(usize, usize)> {
        let mut v = Vec::new();
        self.each_pair(|run, a, b| {
            if f(run, a, b) {
                v.push((a, b));
            }
        });
        v
    }

    /// Copies every daemon's log beside the report (`<report>.logs/`), for a failed run.
    fn keep_logs(&self, out: &Path) -> anyhow::Result<PathBuf> {
        let dir = out.with_extension("logs");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for node in &self.fabric.nodes {
            let d = &node.daemon;
            std::fs::copy(&d.log, dir.join(format!("{}.log", d.name)))
                .with_context(|| format!("copying {}", d.log.display()))?;
        }
        Ok(dir)
    }

    /// The checks made at the end: panics in the logs, memory and descriptors flat.
    fn finish_checks(&mut self) {
        let at = now();
        for node in &self.fabric.nodes {
            let log = std::fs::read_to_string(&node.daemon.log).unwrap_or_default();
            self.checker.checked(check::CRASH, 1);
            if let Some(line) = log.lines().find(|l| l.contains("panicked")) {
                self.checker.violation(
                    check::CRASH,
                    at,
                    format!("{} panicked: {line}", node.daemon.name),
                );
            }
        }
        for (i, track) in self.nodes.iter().enumerate() {
            for (what, at) in report::flatness(&track.usage) {
                self.checker.checked(check::FLAT, 1);
                if let Some(what) = what {
                    self.checker.violation(
                        check::FLAT,
                        at_or(at, self.t0),
                        format!("n{i}: {what}"),
                    );
                }
            }
        }
    }
}

fn at_or(secs: f64, t0: Instant) -> Instant {
    t0 + Duration::from_secs_f64(secs.max(0.0))
}
