//! The chaos run's report: Markdown with the tables, and an SVG timeline of reachable pairs
//! with the faults marked, written beside it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use super::check::{Checker, Limits};
use super::schedule::Fault;
use super::{LIVENESS, Opts, Usage};

/// Each daemon's usage samples and per-life gossip (first, last) samples.
pub(crate) type NodeData = (Vec<Usage>, Vec<((f64, u64), (f64, u64))>);

/// Everything the report shows.
#[allow(missing_docs)]
pub(crate) struct Summary<'a> {
    pub(crate) opts: &'a Opts,
    pub(crate) pair_period: Duration,
    pub(crate) limits: Limits,
    pub(crate) started: Duration,
    pub(crate) chaos_at: f64,
    pub(crate) done: &'a [(Fault, f64, f64)],
    pub(crate) checker: &'a Checker,
    pub(crate) nodes: &'a [NodeData],
    pub(crate) timeline: &'a [(f64, usize, usize)],
    pub(crate) probes: (u64, u64),
    pub(crate) netem: Option<bool>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// Each life's samples, by life (0 = the first start).
fn lives(usage: &[Usage]) -> BTreeMap<u32, Vec<Usage>> {
    let mut lives: BTreeMap<u32, Vec<Usage>> = BTreeMap::new();
    for u in usage {
        lives.entry(u.life).or_default().push(*u);
    }
    lives
}

/// Medians of `f` over one life's first minute after a 30 s warm-up and over its last minute
/// (0 for a window without samples).
fn first_and_last_minute(samples: &[Usage], f: impl Fn(&Usage) -> f64) -> (f64, f64) {
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return (0.0, 0.0);
    };
    let window = |from: f64, to: f64| {
        median(
            samples
                .iter()
                .filter(|u| u.t >= from && u.t < to)
                .map(&f)
                .collect(),
        )
        .unwrap_or(0.0)
    };
    (
        window(first.t + 30.0, first.t + 90.0),
        window(last.t - 60.0, last.t + 1.0),
    )
}

/// Minutes of a life long enough to compare: the first minute after a 30 s warm-up, and the
/// last. Flat: RSS within 20 % + 2 MiB, descriptors other than gossip connections within 3.
/// One entry per such life: `None` when flat, else what grew; with the time.
pub(crate) fn flatness(usage: &[Usage]) -> Vec<(Option<String>, f64)> {
    let mut out = Vec::new();
    for samples in lives(usage).values() {
        let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
            continue;
        };
        if last.t - first.t < 150.0 {
            continue;
        }
        let (r0, r1) = first_and_last_minute(samples, |u| u.rss_kb as f64);
        // Gossip connections come and go (a node dials a few and accepts up to twice as
        // many); a leak is descriptors beyond them.
        let (f0, f1) = first_and_last_minute(samples, |u| u.fds.saturating_sub(u.conns) as f64);
        let mut grew = Vec::new();
        if r1 > r0 * 1.2 + 2048.0 {
            grew.push(format!(
                "RSS grew from {:.1} to {:.1} MiB",
                r0 / 1024.0,
                r1 / 1024.0
            ));
        }
        if f1 > f0 + 3.0 {
            grew.push(format!(
                "open fds other than gossip connections grew from {f0} to {f1}"
            ));
        }
        out.push(((!grew.is_empty()).then(|| grew.join(", ")), last.t));
    }
    out
}

/// Writes the Markdown report and the SVG beside it.
pub(crate) fn write(s: &Summary<'_>) -> anyhow::Result<()> {
    let svg_path = s.opts.out.with_extension("svg");
    let mut md = String::new();
    head(&mut md, s);
    invariants(&mut md, s.checker);
    faults(&mut md, s);
    usage(&mut md, s);
    let _ = writeln!(
        md,
        "\n## Reachable pairs over time\n\nThe share of expected pairs answered within the last {:.1} s, once a second; shaded spans are faults (red: kill or restart, blue: partition, orange: loss and delay, grey: reload).\n\n![reachable pairs over time]({})",
        s.pair_period.as_secs_f64() * 3.0,
        svg_path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    if let Some(dir) = s.opts.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&s.opts.out, md)?;
    std::fs::write(&svg_path, svg(s))?;
    Ok(())
}

fn head(md: &mut String, s: &Summary<'_>) {
    let o = s.opts;
    let _ = writeln!(
        md,
        "# Chaos lab: {n} real daemons under faults\n\n\
         `weft-bench chaos --nodes {n} --mins {mins} --seed {seed}` (root), on this 2-core machine. \
         Result: **{result}**.\n\n\
         - {n} `weft run` daemons in network namespaces, 3 regions (eu trusts its LAN), every block claimed from {pool} (no static `pod_cidr`), bootstrap from n0 and n1, gossip 1 s, liveness timeout {live} s.\n\
         - Every node probes every other node's overlay address about every {pp:.2} s (raw ICMP in its namespace, through its TUN device): {sent} probes sent, {ans} answered.\n\
         - Every pair answered {st:.1} s after the last daemon started; the faults began at t={ca:.0} s.\n\
         - Limits (each plus the probe period): steady pair {steady} s (liveness + 5 s), restarted node {restart} s, after a heal {heal} s, two owners of a block in one view {conflict} s.\n\
         - Delay: {netem}.",
        n = o.nodes,
        mins = o.duration.as_secs_f64() / 60.0,
        seed = o.seed,
        result = if s.checker.failed() { "FAIL" } else { "pass" },
        pool = super::fabric::POOL,
        live = LIVENESS.as_secs(),
        pp = s.pair_period.as_secs_f64(),
        sent = s.probes.0,
        ans = s.probes.1,
        st = s.started.as_secs_f64(),
        ca = s.chaos_at,
        steady = s.limits.steady.as_secs(),
        restart = s.limits.restart.as_secs(),
        heal = s.limits.heal.as_secs(),
        conflict = s.limits.conflict.as_secs(),
        netem = match s.netem {
            Some(true) => "netem on the node's links",
            Some(false) =>
                "not injected: this kernel has no sch_netem (`tc qdisc … netem` is refused), so the loss + delay faults applied their loss only",
            None => "no loss fault in this schedule",
        },
    );
}

fn invariants(md: &mut String, c: &Checker) {
    let _ = writeln!(
        md,
        "\n## Invariants\n\n| invariant | checks | breaks | first breaks |\n|---|---:|---:|---|"
    );
    for (name, t) in &c.tallies {
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} |",
            t.checks,
            t.violations,
            if t.examples.is_empty() {
                "—".to_owned()
            } else {
                t.examples.join("<br>")
            }
        );
    }
}

fn faults(md: &mut String, s: &Summary<'_>) {
    let _ = writeln!(
        md,
        "\n## Faults\n\nWorst outage: the longest time an expected pair went unanswered while the fault was current (from its start until {settle} s after its end). Recovery: from a (re)start or heal to the slowest pair's first answer.\n\n| t (s) | fault | ended (s) | worst outage (s) | recovery (s) |\n|---:|---|---:|---:|---:|",
        settle = super::schedule::SETTLE.as_secs()
    );
    let mut by_kind: BTreeMap<&str, (usize, Duration, Option<Duration>)> = BTreeMap::new();
    for (k, (fault, start, end)) in s.done.iter().enumerate() {
        let st = s.checker.faults.get(&k).cloned().unwrap_or_default();
        let rec = st
            .recovery
            .map_or("—".to_owned(), |r| format!("{:.1}", r.as_secs_f64()));
        let _ = writeln!(
            md,
            "| {start:.0} | {fault} | {end:.0} | {:.1} | {rec} |",
            st.worst_outage.as_secs_f64()
        );
        let e = by_kind.entry(fault.kind()).or_default();
        e.0 += 1;
        e.1 = e.1.max(st.worst_outage);
        e.2 = e.2.max(st.recovery);
    }
    let _ = writeln!(
        md,
        "\n### Worst per fault kind\n\n| kind | faults | worst outage (s) | worst recovery (s) |\n|---|---:|---:|---:|"
    );
    for (kind, (count, worst, rec)) in by_kind {
        let _ = writeln!(
            md,
            "| {kind} | {count} | {:.1} | {} |",
            worst.as_secs_f64(),
            rec.map_or("—".to_owned(), |r| format!("{:.1}", r.as_secs_f64()))
        );
    }
}

fn usage(md: &mut String, s: &Summary<'_>) {
    let _ = writeln!(
        md,
        "\n## Memory, descriptors and gossip per daemon\n\nRSS and open fds: medians of the first minute after a 30 s warm-up and of the last minute of the daemon's longest life, and the maximum over the run. Gossip: frame bytes sent per second over all its lives.\n\n| node | starts | RSS first (MiB) | RSS last (MiB) | RSS max (MiB) | fds first | fds last | gossip sent (B/s) |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    );
    let mut rates = Vec::new();
    let mut maxes = Vec::new();
    for (i, (u, g)) in s.nodes.iter().enumerate() {
        let span = |l: &Vec<Usage>| l.last().map_or(0.0, |x| x.t) - l.first().map_or(0.0, |x| x.t);
        let life = lives(u)
            .into_values()
            .max_by(|a, b| span(a).total_cmp(&span(b)))
            .unwrap_or_default();
        let mib = |x: &Usage| x.rss_kb as f64 / 1024.0;
        let (rss_first, rss_last) = first_and_last_minute(&life, mib);
        let (fds_first, fds_last) = first_and_last_minute(&life, |x| x.fds as f64);
        let max = u.iter().map(mib).fold(0.0, f64::max);
        maxes.push(max);
        let (bytes, secs) = g.iter().fold((0u64, 0.0), |(b, t), (first, last)| {
            (b + last.1.saturating_sub(first.1), t + (last.0 - first.0))
        });
        let rate = if secs > 0.0 { bytes as f64 / secs } else { 0.0 };
        rates.push(rate);
        let _ = writeln!(
            md,
            "| n{i} | {} | {rss_first:.1} | {rss_last:.1} | {max:.1} | {fds_first:.0} | {fds_last:.0} | {rate:.0} |",
            g.len(),
        );
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let _ = writeln!(
        md,
        "\nRSS max per daemon: mean {:.1} MiB, largest {:.1} MiB. Gossip sent per daemon: mean {:.0} B/s, busiest {:.0} B/s.",
        mean(&maxes),
        maxes.iter().copied().fold(0.0, f64::max),
        mean(&rates),
        rates.iter().copied().fold(0.0, f64::max)
    );
    over_time(md, s);
}

/// RSS and fds of all daemons, minute by minute: mean and largest of the samples.
fn over_time(md: &mut String, s: &Summary<'_>) {
    let mut minutes: BTreeMap<u64, Vec<Usage>> = BTreeMap::new();
    for (u, _) in s.nodes {
        for x in u {
            minutes.entry((x.t / 60.0) as u64).or_default().push(*x);
        }
    }
    let _ = writeln!(
        md,
        "\n### Over time, all daemons\n\n| minute | samples | RSS mean (MiB) | RSS largest (MiB) | fds mean | fds largest |\n|---:|---:|---:|---:|---:|---:|"
    );
    for (m, v) in minutes {
        let n = v.len().max(1) as f64;
        let _ = writeln!(
            md,
            "| {m} | {} | {:.1} | {:.1} | {:.1} | {} |",
            v.len(),
            v.iter().map(|x| x.rss_kb as f64).sum::<f64>() / n / 1024.0,
            v.iter().map(|x| x.rss_kb).max().unwrap_or(0) as f64 / 1024.0,
            v.iter().map(|x| x.fds as f64).sum::<f64>() / n,
            v.iter().map(|x| x.fds).max().unwrap_or(0)
        );
    }
}

/// The timeline as an SVG: reachable share over time, faults as shaded spans.
fn svg(s: &Summary<'_>) -> String {
    let (w, h, pad) = (960.0, 320.0, 40.0);
    let end = s.timeline.last().map_or(1.0, |t| t.0).max(1.0);
    let x = |t: f64| pad + (w - 2.0 * pad) * t / end;
    let y = |share: f64| h - pad - (h - 2.0 * pad) * share;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n"
    );
    for (fault, start, stop) in s.done {
        let colour = match fault {
            Fault::Kill(_) | Fault::Restart(_) | Fault::Wipe(_) => "#f4b4b4",
            Fault::Partition(_) => "#b4c8f4",
            Fault::Lossy(..) => "#f8d8a8",
            Fault::Reload => "#d8d8d8",
        };
        let _ = writeln!(
            out,
            "<rect x=\"{:.1}\" y=\"{pad}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{colour}\"><title>{fault}</title></rect>",
            x(*start),
            (x(*stop) - x(*start)).max(2.0),
            h - 2.0 * pad
        );
    }
    let points: Vec<String> = s
        .timeline
        .iter()
        .map(|&(t, up, all)| {
            let share = if all == 0 {
                1.0
            } else {
                up as f64 / all as f64
            };
            format!("{:.1},{:.1}", x(t), y(share))
        })
        .collect();
    let _ = writeln!(
        out,
        "<polyline fill=\"none\" stroke=\"#1a5d1a\" stroke-width=\"1.5\" points=\"{}\"/>",
        points.join(" ")
    );
    for (share, label) in [(0.0, "0%"), (0.5, "50%"), (1.0, "100%")] {
        let _ = writeln!(
            out,
            "<line x1=\"{pad}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#999\" stroke-width=\"0.5\"/><text x=\"4\" y=\"{:.1}\">{label}</text>",
            w - pad,
            y(share) + 4.0,
            y = y(share)
        );
    }
    let _ = writeln!(
        out,
        "<text x=\"{pad}\" y=\"{:.1}\">0 s</text><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{end:.0} s</text><text x=\"{:.1}\" y=\"20\" text-anchor=\"middle\">reachable pairs, {} daemons, seed {}</text>\n</svg>",
        h - 12.0,
        w - pad,
        h - 12.0,
        w / 2.0,
        s.opts.nodes,
        s.opts.seed
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn life(f: impl Fn(f64) -> (u64, usize, usize)) -> Vec<Usage> {
        (0..40)
            .map(|k| {
                let t = f64::from(k) * 5.0;
                let (rss_kb, fds, conns) = f(t);
                Usage {
                    t,
                    life: 0,
                    rss_kb,
                    fds,
                    conns,
                }
            })
            .collect()
    }

    #[test]
    fn growth_beyond_gossip_connections_and_noise_is_flagged_and_nothing_else() {
        // Flat, with connections coming and going: fine.
        let steady = life(|t| (20_000, 20 + (t as usize / 20) % 8, (t as usize / 20) % 8));
        assert_eq!(flatness(&steady), vec![(None, 195.0)]);
        // Descriptors that are not connections pile up: flagged.
        let leak = life(|t| (20_000, 20 + t as usize / 10, 0));
        let got = flatness(&leak);
        assert!(
            got[0].0.as_deref().is_some_and(|w| w.contains("fds")),
            "{got:?}"
        );
        // RSS doubles: flagged.
        let bloat = life(|t| (20_000 + (t as u64) * 120, 20, 0));
        let got = flatness(&bloat);
        assert!(
            got[0].0.as_deref().is_some_and(|w| w.contains("RSS")),
            "{got:?}"
        );
        // Too short a life to compare: not checked.
        assert!(flatness(&steady[..20]).is_empty());
    }
}
