//! `weft-bench small`: small packets through every path, the paths set up side by side and
//! measured *interleaved*, so that a noisy machine's drift falls on all of them alike: in each
//! round every path's pings run at once, their starts spread over the gap between two pings
//! (the paths' pings take turns, a few milliseconds apart, through the same seconds), then each
//! path's UDP test in turn, the order rotated each round.
//!
//! Two figures: ping RTT (pooled over the rounds, and the median over rounds of each round's
//! p50 ratio to boringtun-cli) with the CPU both tunnel ends spend per ping (request and reply,
//! from the threads' run time in `schedstat`, less what the tunnels spend with no traffic,
//! measured for 2 s before the rounds), and the full-rate UDP 64 B packet rate with where its CPU goes
//! per packet received: the tunnel processes (both ends), iperf3's client and server (their
//! own accounting, in iperf3's JSON) and the machine as a whole (`/proc/stat`, busy time of
//! every CPU, so softirq work charged to no process is in it). On this 2-core machine both
//! tunnel ends and both iperf3 ends share the cores, so the rate is the cores divided by the
//! whole cost of a packet: the tunnel's share is what a tunnel's design changes. Beside the rate
//! iperf3's server read, the rate the tunnel *delivered* to the server's socket: what it read
//! plus what the kernel dropped there because the server, sharing the cores, did not read in
//! time (the namespace's UDP receive-buffer drops less the tunnel sockets' own, taken before and
//! after the test). When the server is the slower end, only the second is the tunnel's.

use std::fmt::Write as _;

use anyhow::Context as _;

use crate::net::{self, Bench, NetArgs, PathKind, median};

/// What one path gave over the rounds.
#[derive(Debug, Default)]
struct Samples {
    label: String,
    rtts: Vec<f64>,
    round_p50: Vec<f64>,
    /// Tunnel CPU µs per ping (both ends, request and reply), over the background.
    ping_us: Vec<f64>,
    /// Tunnel wake-ups per ping (threads put on a CPU, both ends), over the background.
    ping_wakes: Vec<f64>,
    /// Tunnel CPU µs and wake-ups per second with no traffic (timers, gossip).
    background: Rate,
    pps: Vec<f64>,
    /// Packets per second the tunnel delivered to iperf3's server socket: those it read and
    /// those the socket dropped, full.
    delivered: Vec<f64>,
    /// CPU µs per packet received: tunnel, iperf3 client, iperf3 server, whole machine.
    tunnel_us: Vec<f64>,
    client_us: Vec<f64>,
    server_us: Vec<f64>,
    machine_us: Vec<f64>,
}

/// What the tunnels run per second with no traffic.
#[derive(Debug, Default, Clone, Copy)]
struct Rate {
    us: f64,
    wakes: f64,
}

/// Busy seconds of every CPU so far (`/proc/stat`: user, nice, system, irq and softirq; not
/// idle, iowait, nor steal, the hypervisor's time for other guests).
fn machine_busy_secs() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("empty /proc/stat")?;
    let f: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("/proc/stat cpu line")?;
    let total: f64 = f.iter().take(7).sum();
    let idle = f.get(3).copied().unwrap_or(0.0) + f.get(4).copied().unwrap_or(0.0);
    Ok((total - idle) / net::clock_ticks())
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// One full-rate UDP run of 64 B payloads: what it gave.
struct Udp64 {
    /// Packets per second iperf3's server read.
    pps: f64,
    /// Packets per second delivered to the server's socket (read, or dropped there full).
    delivered: f64,
    /// CPU µs per packet read: tunnel, iperf3 client, iperf3 server, whole machine.
    cpu: [f64; 4],
}

fn udp64(b: &Bench, secs: u64) -> anyhow::Result<Udp64> {
    let (t0, m0) = (net::cpu_seconds(b)?, machine_busy_secs()?);
    let d0 = net::rcvbuf_drops(b)?;
    let j = net::iperf(b, secs, &["-u", "-b", "0", "-l", "64"])?;
    let dropped = net::rcvbuf_drops(b)?.server_since(&d0);
    let (t1, m1) = (net::cpu_seconds(b)?, machine_busy_secs()?);
    let sum = &j["end"]["sum"];
    let (packets, lost, seconds) = (
        sum["packets"].as_f64().context("end.sum.packets")?,
        sum["lost_packets"].as_f64().unwrap_or(0.0),
        sum["seconds"].as_f64().context("end.sum.seconds")?,
    );
    let got = (packets - lost).max(0.0);
    anyhow::ensure!(got > 0.0, "UDP with 64-byte payloads: nothing arrived");
    let cpu = &j["end"]["cpu_utilization_percent"];
    // iperf3's own CPU, in percent of one core over the test.
    let share = |k: &str| cpu[k].as_f64().unwrap_or(f64::NAN) / 100.0 * seconds;
    let per = |s: f64| s / got * 1e6;
    let seconds = seconds.max(1e-9);
    Ok(Udp64 {
        pps: got / seconds,
        delivered: (got + dropped as f64) / seconds,
        cpu: [
            per(t1 - t0),
            per(share("host_total")),
            per(share("remote_total")),
            per(m1 - m0),
        ],
    })
}

/// Sets every path up, runs `rounds` rounds (each: `pings` pings 10 ms apart, then `secs` s of
/// UDP 64 B, on every path in turn) and returns the report's tables.
pub(crate) fn run(
    args: &NetArgs,
    kinds: &[PathKind],
    rounds: usize,
    pings: u32,
    secs: u64,
) -> anyhow::Result<String> {
    let mut benches = Vec::new();
    for k in kinds {
        eprintln!("== {}: setting up", k.label());
        benches.push(net::setup(args, k)?);
    }
    let mut samples: Vec<Samples> = kinds
        .iter()
        .map(|k| Samples {
            label: k.label(),
            ..Default::default()
        })
        .collect();
    // What the tunnels cost with no traffic, to take off the pings' figure.
    for (b, s) in benches.iter().zip(samples.iter_mut()) {
        s.background = background(b)?;
    }
    let n = benches.len();
    for round in 0..rounds {
        eprintln!("   round {}/{rounds}", round + 1);
        let order: Vec<usize> = (0..n).map(|i| (i + round) % n).collect();
        let (rtts, ran, took) = pings_together(&benches, &order, pings)?;
        for ((s, mut r), ran) in samples.iter_mut().zip(rtts).zip(ran) {
            let [us, wakes] = per_ping(ran, s.background, took.as_secs_f64(), pings);
            s.ping_us.push(us);
            s.ping_wakes.push(wakes);
            r.sort_by(f64::total_cmp);
            s.round_p50.push(percentile(&r, 0.5));
            s.rtts.extend(r);
        }
        for i in order {
            let (b, s) = (&benches[i], &mut samples[i]);
            if secs > 0 {
                let Udp64 {
                    pps,
                    delivered,
                    cpu: [t, c, v, m],
                } = udp64(b, secs)?;
                s.pps.push(pps);
                s.delivered.push(delivered);
                s.tunnel_us.push(t);
                s.client_us.push(c);
                s.server_us.push(v);
                s.machine_us.push(m);
            }
        }
    }
    drop(benches);
    Ok(report(&mut samples))
}

/// Pings on every path at once: one `ping` per path, `pings` pings [`net::PING_INTERVAL`]
/// apart, started in `order` at even steps across that interval, so that the paths' pings take
/// turns through the same seconds and a drift of the machine's speed falls on all of them
/// alike. Each path's RTTs (µs) and the CPU its tunnel ran (in `benches`' order), and the
/// time it all took. A `ping` left running by an error is killed.
fn pings_together(
    benches: &[Bench],
    order: &[usize],
    pings: u32,
) -> anyhow::Result<(Vec<Vec<f64>>, Vec<net::Ran>, std::time::Duration)> {
    struct Running(Vec<Option<std::process::Child>>);
    impl Drop for Running {
        fn drop(&mut self) {
            for mut c in self.0.iter_mut().filter_map(Option::take) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let before = benches
        .iter()
        .map(net::ran)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let step = net::PING_INTERVAL / u32::try_from(order.len().max(1)).unwrap_or(u32::MAX);
    let w0 = wall();
    let mut running = Running(benches.iter().map(|_| None).collect());
    // Each path's ping's output and errors, in `benches`' order like `running`.
    let mut files: Vec<Option<(std::fs::File, std::fs::File)>> =
        benches.iter().map(|_| None).collect();
    for (k, &i) in order.iter().enumerate() {
        if k > 0 {
            std::thread::sleep(step);
        }
        let (stdout, stderr) = (unlinked_file()?, unlinked_file()?);
        let child = net::ping(&benches[i], pings)
            .stdout(stdout.try_clone().context("ping's output file")?)
            .stderr(stderr.try_clone().context("ping's error file")?)
            .spawn()
            .context("starting ping")?;
        running.0[i] = Some(child);
        files[i] = Some((stdout, stderr));
    }
    // Read only once every ping is done: a pipe read while they run would wake this process
    // at each reply of the path read first, on the cores the pings share, and slow that
    // path's pings (measured: the first of two identical paths ran 0.07-0.14x slower).
    let mut statuses = Vec::with_capacity(benches.len());
    for slot in &mut running.0 {
        let mut child = slot.take().context("a path's ping was not started")?;
        statuses.push(child.wait().context("waiting for ping")?);
    }
    let mut rtts = Vec::with_capacity(benches.len());
    for (status, slot) in statuses.into_iter().zip(files) {
        let (stdout, stderr) = slot.context("a path's ping was not started")?;
        let out = std::process::Output {
            status,
            stdout: read_all(stdout)?,
            stderr: read_all(stderr)?,
        };
        anyhow::ensure!(
            out.status.success(),
            "ping failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        rtts.push(net::ping_times(&out, pings)?);
    }
    let took = wall() - w0;
    let ran = benches
        .iter()
        .zip(before)
        .map(|(b, c0)| Ok(net::ran(b)?.since(c0)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((rtts, ran, took))
}

/// A file in the temporary directory with no name left: a child's output goes there, to be
/// read back once it is done.
fn unlinked_file() -> anyhow::Result<std::fs::File> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("weft-bench-{}-{n}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    Ok(file)
}

/// Everything written to `file`, from its start.
fn read_all(mut file: std::fs::File) -> anyhow::Result<Vec<u8>> {
    use std::io::{Read as _, Seek as _};
    file.rewind().context("rewinding an output file")?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .context("reading an output file")?;
    Ok(bytes)
}

#[expect(clippy::disallowed_methods, reason = "the bench times on a wall clock")]
fn wall() -> std::time::Instant {
    std::time::Instant::now()
}

/// Tunnel CPU µs and wake-ups per second over 2 s with no traffic.
fn background(b: &Bench) -> anyhow::Result<Rate> {
    let quiet = std::time::Duration::from_secs(2);
    let (c0, w0) = (net::ran(b)?, wall());
    std::thread::sleep(quiet);
    let (ran, took) = (net::ran(b)?.since(c0), wall() - w0);
    let secs = took.as_secs_f64();
    Ok(Rate {
        us: ran.ns as f64 / 1e3 / secs,
        wakes: ran.runs as f64 / secs,
    })
}

/// CPU µs and wake-ups per ping: what ran over `secs` less the background, shared by `pings`.
fn per_ping(ran: net::Ran, background: Rate, secs: f64, pings: u32) -> [f64; 2] {
    let us = ran.ns as f64 / 1e3 - background.us * secs;
    let wakes = ran.runs as f64 - background.wakes * secs;
    [us, wakes].map(|v| v.max(0.0) / f64::from(pings))
}

fn report(samples: &mut [Samples]) -> String {
    let mut s = String::from(
        "| path | ping p50 (µs) | ping p99 (µs) | tunnel CPU per ping (µs) | tunnel wake-ups per ping | tunnel CPU idle (µs/s) | UDP 64 B read (kpps) | UDP 64 B delivered (kpps) | tunnel CPU (µs/packet) | iperf3 client (µs/packet) | iperf3 server (µs/packet) | machine busy (µs/packet) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for p in samples.iter_mut() {
        p.rtts.sort_by(f64::total_cmp);
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} |",
            p.label,
            percentile(&p.rtts, 0.5),
            percentile(&p.rtts, 0.99),
            median(p.ping_us.clone()),
            median(p.ping_wakes.clone()),
            p.background.us,
            median(p.pps.clone()) / 1e3,
            median(p.delivered.clone()) / 1e3,
            median(p.tunnel_us.clone()),
            median(p.client_us.clone()),
            median(p.server_us.clone()),
            median(p.machine_us.clone()),
        );
    }
    let Some(bt) = samples
        .iter()
        .find(|p| p.label.starts_with("boringtun-cli"))
    else {
        return not_measured(&s);
    };
    let _ = write!(
        s,
        "\n## Against {}\n\n| path | ping p50 (median of the rounds' ratios) | ping p50 (the rounds' lowest–highest; rounds at or under 1×) | ping p50 (pooled) | ping p99 (pooled) | tunnel CPU per ping (ours / theirs) | UDP 64 B read | UDP 64 B delivered | tunnel CPU per packet (theirs / ours) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        bt.label
    );
    for p in samples.iter().filter(|p| p.label != bt.label) {
        let per_round: Vec<f64> = p
            .round_p50
            .iter()
            .zip(&bt.round_p50)
            .map(|(a, b)| a / b)
            .collect();
        let lowest = per_round.iter().copied().fold(f64::NAN, f64::min);
        let highest = per_round.iter().copied().fold(f64::NAN, f64::max);
        let under = per_round.iter().filter(|r| **r <= 1.0).count();
        let _ = writeln!(
            s,
            "| {} | {:.2}× | {:.2}–{:.2}×; {} of {} | {:.2}× | {:.2}× | {:.2}× | {:.2}× | {:.2}× | {:.2}× |",
            p.label,
            median(per_round.clone()),
            lowest,
            highest,
            under,
            per_round.len(),
            percentile(&p.rtts, 0.5) / percentile(&bt.rtts, 0.5),
            percentile(&p.rtts, 0.99) / percentile(&bt.rtts, 0.99),
            median(p.ping_us.clone()) / median(bt.ping_us.clone()),
            median(p.pps.clone()) / median(bt.pps.clone()),
            median(p.delivered.clone()) / median(bt.delivered.clone()),
            median(bt.tunnel_us.clone()) / median(p.tunnel_us.clone()),
        );
    }
    not_measured(&s)
}

/// A figure a ping-only run (`--secs 0`) did not measure shows as a dash, not NaN.
fn not_measured(table: &str) -> String {
    table.replace("NaN×", "–").replace("NaN", "–")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ping's output goes to a file nobody reads until it is done: a child writing more than
    /// a pipe holds (64 KB) still finishes, with every byte kept, and no file is left behind.
    /// Reading pipes while the pings ran woke the bench at each reply of the first path and
    /// slowed that path's pings.
    #[test]
    fn a_childs_output_is_kept_whole_in_a_file_read_only_after_it_exits() {
        let (stdout, stderr) = (unlinked_file().unwrap(), unlinked_file().unwrap());
        let mut child = std::process::Command::new("sh")
            .args(["-c", "head -c 300000 /dev/zero; echo done >&2"])
            .stdout(stdout.try_clone().unwrap())
            .stderr(stderr.try_clone().unwrap())
            .spawn()
            .expect("sh");
        let deadline = wall() + std::time::Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            if wall() > deadline {
                let _ = child.kill();
                panic!("the child blocked on output nobody read");
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert!(status.success());
        assert_eq!(read_all(stdout).unwrap(), vec![0u8; 300_000]);
        assert_eq!(read_all(stderr).unwrap(), b"done\n");
        let prefix = format!("weft-bench-{}-", std::process::id());
        let left = std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().starts_with(&prefix));
        assert!(!left, "an output file was left in the temporary directory");
    }

    #[test]
    fn ratios_are_taken_against_boringtun_per_round_and_pooled() {
        let mut samples = vec![
            Samples {
                label: "weft encrypted".into(),
                rtts: vec![100.0, 200.0, 300.0],
                round_p50: vec![100.0, 300.0, 200.0],
                pps: vec![2000.0],
                delivered: vec![3000.0],
                tunnel_us: vec![1.0],
                ping_us: vec![30.0, 50.0, 40.0],
                ..Default::default()
            },
            Samples {
                label: "boringtun-cli --threads 1".into(),
                rtts: vec![200.0, 200.0, 200.0],
                round_p50: vec![200.0, 200.0, 200.0],
                pps: vec![1000.0],
                delivered: vec![1000.0],
                tunnel_us: vec![4.0],
                ping_us: vec![20.0, 25.0, 30.0],
                ..Default::default()
            },
        ];
        let r = report(&mut samples);
        // Rounds: 0.5, 1.5, 1.0 → median 1.0, from 0.5 to 1.5, two of three at or under 1×;
        // pooled 200/200; CPU per ping 40/25; read 2×, delivered 3×; CPU per packet 4/1.
        assert!(
            r.contains(
                "| weft encrypted | 1.00× | 0.50–1.50×; 2 of 3 | 1.00× | 1.50× | 1.60× | 2.00× | 3.00× | 4.00× |"
            ),
            "{r}"
        );
    }

    #[test]
    fn a_pings_cpu_and_wake_ups_are_what_ran_less_the_background() {
        let ran = net::Ran {
            ns: 3_000_000,
            runs: 900,
        };
        let background = Rate {
            us: 500.0,
            wakes: 100.0,
        };
        // 2 s: 3000 µs less 1000 µs of background over 100 pings; 900 less 200 wake-ups.
        assert_eq!(per_ping(ran, background, 2.0, 100), [20.0, 7.0]);
        // A background larger than what ran (noise) is no negative cost.
        assert_eq!(
            per_ping(net::Ran::default(), background, 2.0, 100),
            [0.0, 0.0]
        );
    }

    #[test]
    fn a_ping_only_run_shows_dashes_for_the_udp_figures() {
        let mut samples = vec![Samples {
            label: "boringtun-cli --threads 1".into(),
            rtts: vec![200.0],
            round_p50: vec![200.0],
            ping_us: vec![20.0],
            ping_wakes: vec![4.0],
            ..Default::default()
        }];
        let r = report(&mut samples);
        assert!(!r.contains("NaN"), "{r}");
        assert!(r.contains("| 200 | 200 | 20.0 | 4.0 | 0 | – |"), "{r}");
    }
}
