//! `weft-bench`: weft's benchmarks.
//!
//! `weft-bench net` measures the data path side by side with plain veth, wireguard-go and
//! boringtun-cli in one run and writes `bench/RESULTS.md` (see [`net`]).
//!
//! `weft-bench mesh` runs the mesh cores in the simulator (virtual time, no sockets) and reports,
//! at several sizes up to 5000 nodes, how long joining and one record change take to reach every
//! node, how many gossip bytes each node sends per second in steady state, how long a killed node
//! takes to be down everywhere, and how many members go down falsely under 5% frame loss. The
//! numbers are deterministic for a given build (the simulation's randomness is seeded);
//! `bench/results/mesh.md` holds the committed run and the targets.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

mod chaos;
mod net;
mod router;
mod small;

use clap::{Parser, Subcommand};
use weft_mesh::MeshConfig;
use weft_tests::sim::{Sim, sim_record};

/// Targets from the mesh issues, at every size measured: one change everywhere in under 10 s,
/// steady-state gossip under 20 KB/s per node (mean and busiest), a killed node down everywhere
/// within twice the liveness timeout, and no false down under 5% loss (Weave's topology gossip
/// reached 8 MB per message at 300 nodes).
const CONVERGE_TARGET: Duration = Duration::from_secs(10);
const BYTES_TARGET: f64 = 20_000.0;

#[derive(Debug, Parser)]
#[command(name = "weft-bench", about = "weft's benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The data path side by side in one run (root): plain veth, weft encrypted, weft
    /// plaintext, wireguard-go, boringtun-cli; TCP, UDP packet rate, ping, CPU and memory;
    /// medians of several runs. Writes bench/RESULTS.md.
    Net(NetOpts),
    /// Small packets (root): ping RTT and full-rate UDP 64 B with the CPU each packet costs
    /// (tunnel, iperf3, whole machine), every path set up at once and measured interleaved,
    /// round after round, so machine noise falls on all alike. Writes bench/results/small.md.
    Small(SmallOpts),
    /// weft encrypted under iperf3 TCP load (4 streams) for a long run (root), both daemons'
    /// RSS sampled: shows peak memory and whether it grows. Writes bench/results/soak.md.
    Soak {
        /// Minutes of load.
        #[arg(long, default_value_t = 10)]
        mins: u64,
        /// Seconds between samples.
        #[arg(long, default_value_t = 10)]
        every: u64,
        /// Where to write the report.
        #[arg(long, default_value = "bench/results/soak.md")]
        out: PathBuf,
    },
    /// The router core alone, with criterion: per-packet encapsulation and decapsulation
    /// (WireGuard and plaintext) and a lookup among 10 000 prefixes. Writes
    /// bench/results/router.md.
    Router {
        /// Seconds of measurement per benchmark.
        #[arg(long, default_value_t = 5)]
        secs: u64,
        /// Numbers of workers encrypting at once, each with its own session (the part of a
        /// multi-core data path that scales); the first should be 1, the baseline.
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        workers: Vec<usize>,
        /// Runs per number of workers (the median is reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Where to write the table.
        #[arg(long, default_value = "bench/results/router.md")]
        out: PathBuf,
    },
    /// Real daemons under faults (root): N `weft run` daemons in namespaces over three
    /// regions, a seeded schedule of kill -9, restarts, wiped state, partitions, loss and
    /// reloads, every pair probed all the time and the invariants checked once a second.
    /// Writes bench/results/chaos.md and chaos.svg; exits non-zero, naming the seed, when an
    /// invariant broke.
    Chaos {
        /// Daemons (2 to 250).
        #[arg(long, default_value_t = 24)]
        nodes: usize,
        /// Minutes of faults (after every pair first answered).
        #[arg(long, default_value_t = 10.0)]
        mins: f64,
        /// The schedule's seed (the same seed, nodes and minutes replay the same faults).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Where to write the report (the SVG goes beside it).
        #[arg(long, default_value = "bench/results/chaos.md")]
        out: PathBuf,
        /// Prints the schedule the seed gives and exits (no lab, no root needed).
        #[arg(long)]
        schedule_only: bool,
        /// Faults to carry out instead of the seed's, one after another with a 15 s gap:
        /// `kill:NODE:SECS`, `restart:NODE`, `wipe:NODE`, `partition:REGION:SECS`,
        /// `loss:NODE:PERCENT:DELAY_MS:SECS`, `reload:SECS`, joined by commas (regions: eu, us,
        /// ap). `--mins` is then ignored.
        #[arg(long)]
        faults: Option<String>,
    },
    /// Mesh scale in simulation: time to join and to spread one change, steady-state gossip
    /// bytes per node, a killed node's time to be down everywhere, false downs under 5% loss;
    /// exits non-zero when a size misses a target.
    Mesh {
        /// Cluster sizes to simulate.
        #[arg(long, value_delimiter = ',', default_value = "100,1000,5000")]
        sizes: Vec<usize>,
        /// Virtual seconds of steady state to measure bytes over.
        #[arg(long, default_value_t = 60)]
        steady_secs: u64,
        /// Virtual seconds under 5% frame loss, counting members falsely marked down.
        #[arg(long, default_value_t = 300)]
        loss_secs: u64,
        /// Also write the Markdown table to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
struct NetOpts {
    /// Seconds per iperf3 test.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// Repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// boringtun-cli thread counts to measure (the best is compared against).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    boringtun_threads: Vec<u32>,
    /// Paths to measure: veth, weft, weft-plaintext, wireguard-go, boringtun; weft and
    /// weft-plaintext take `@off`, `@auto` or mechanisms joined by `+` (`@udp_batch+udp_gso`),
    /// so the default adds the offloads one at a time, and `/1`, `/auto` or a number of
    /// workers (`weft/1`, `weft@off/2`), and `:nat` to keep weft's masquerade rule
    /// (`network.nat_outgoing`), which the bench turns off so that no path's namespace has
    /// conntrack the others lack (`weft/1:nat`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "veth,weft@off,weft@udp_batch,weft@udp_batch+udp_gso,weft@udp_batch+udp_gso+udp_gro,weft/1,weft/auto,weft-plaintext@off,weft-plaintext,wireguard-go,boringtun"
    )]
    paths: Vec<String>,
    /// Where to write the report (Markdown).
    #[arg(long, default_value = "bench/RESULTS.md")]
    out: PathBuf,
    /// Another wireguard-go binary to measure beside Debian's (a newer upstream build, with
    /// its offloads), labelled with its version; may be given more than once.
    #[arg(long = "wireguard-go", value_name = "PATH")]
    wireguard_go: Vec<PathBuf>,
    /// Where boringtun-cli is (or gets installed): `<tools>/bin/boringtun-cli`.
    #[arg(long, default_value = "bench/.tools")]
    tools: PathBuf,
}

#[derive(Debug, clap::Args)]
struct SmallOpts {
    /// Rounds; each pings every path at once (their pings taking turns), then runs each path's
    /// UDP test in an order rotated each round.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Pings per path per round, 10 ms apart (every path's at once).
    #[arg(long, default_value_t = 200)]
    pings: u32,
    /// Seconds of full-rate UDP 64 B per path per round (0: ping only).
    #[arg(long, default_value_t = 3)]
    secs: u64,
    /// boringtun-cli thread counts to measure (the first is compared against).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    boringtun_threads: Vec<u32>,
    /// Paths, as for `net`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "weft/1,weft/auto,boringtun"
    )]
    paths: Vec<String>,
    /// Another wireguard-go binary to measure, as for `net`.
    #[arg(long = "wireguard-go", value_name = "PATH")]
    wireguard_go: Vec<PathBuf>,
    /// Where boringtun-cli is (or gets installed): `<tools>/bin/boringtun-cli`.
    #[arg(long, default_value = "bench/.tools")]
    tools: PathBuf,
    /// Where to write the report (Markdown).
    #[arg(long, default_value = "bench/results/small.md")]
    out: PathBuf,
}

fn run_small(o: &SmallOpts, command: &str) -> anyhow::Result<()> {
    weft::demo::lab::require_root("weft-bench small")?;
    anyhow::ensure!(
        o.rounds >= 1 && o.pings >= 10,
        "--rounds must be at least 1 and --pings at least 10"
    );
    let (kinds, boringtun) =
        resolve_paths(&o.paths, &o.boringtun_threads, &o.wireguard_go, &o.tools)?;
    let args = net::NetArgs {
        secs: o.secs,
        reps: 1,
        paths: kinds.clone(),
        weft: weft_binary()?,
        boringtun,
    };
    let tables = small::run(&args, &kinds, o.rounds, o.pings, o.secs)?;
    let report = format!(
        "# weft-bench small\n\n- machine: {}\n- command: `{command}`\n- every path set up at once, two network namespaces each joined by a veth pair, tunnels at MTU 1440; {} rounds, each: {} pings 10 ms apart on every path at once, the paths' starts spread over the 10 ms (their pings take turns), then {} s of iperf3 UDP at full rate with 64 B payloads on each path in turn, in an order rotated each round ({})\n- ping percentiles pool every round's pings; rates and CPU per packet are medians over the rounds; CPU per packet is per packet *received*\n\n{tables}",
        net::machine(),
        o.rounds,
        o.pings,
        o.secs,
        net::iperf_version(),
    );
    print!("{report}");
    if let Some(dir) = o.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&o.out, &report)?;
    eprintln!("wrote {}", o.out.display());
    Ok(())
}

struct Row {
    nodes: usize,
    join: Duration,
    change: Duration,
    bytes_per_node_sec: f64,
    max_bytes_per_node_sec: f64,
    /// From a kill until every other node holds the node down.
    down_everywhere: Duration,
    /// Members marked down under loss (none was killed).
    false_downs: u64,
    frames_lost: u64,
    /// Wall-clock seconds the size took, and the process's peak RSS after it.
    wall_secs: f64,
    peak_rss_mb: f64,
}

/// Progress of one size on stderr: wall time so far and peak RSS.
fn progress(wall: &std::time::Instant, what: &str) {
    eprintln!(
        "  {:.0} s wall, peak RSS {:.0} MB: {what}",
        wall.elapsed().as_secs_f64(),
        peak_rss_mb()
    );
}

/// The process's peak resident set, in MB.
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn measure(n: usize, steady: Duration, loss_secs: u64) -> anyhow::Result<Row> {
    #[expect(clippy::disallowed_methods, reason = "the wall time a size took")]
    let wall = std::time::Instant::now();
    let config = MeshConfig::default();
    // Each node bootstraps from one earlier node.
    let mut sim = Sim::new(n, config, |i| (i > 0).then(|| (i * 7919) % i));
    sim.keep_events = false;
    let join = sim
        .run_until_every(
            Duration::from_secs(600),
            Duration::from_millis(500),
            Sim::converged,
        )
        .ok_or_else(|| anyhow::anyhow!("{n} nodes did not converge in 600 s of virtual time"))?;
    progress(&wall, "joined");
    // Let the initial exchange settle (and the suspicions of links closed while joining run
    // out), then measure steady state.
    sim.run_for(config.liveness_timeout * 2);
    let before = sim.bytes_sent.clone();
    sim.run_for(steady);
    let per: Vec<f64> = before
        .iter()
        .zip(&sim.bytes_sent)
        .map(|(b, a)| (a - b) as f64 / steady.as_secs_f64())
        .collect();
    let bytes_per_node_sec = per.iter().sum::<f64>() / n as f64;
    let max_bytes_per_node_sec = per.iter().copied().fold(0.0, f64::max);
    progress(&wall, "steady state measured");
    // One change at one node: how long until every node holds it.
    let mut r = sim_record(n / 2, 0);
    r.pod_cidrs = vec!["100.127.0.0/24".parse()?];
    sim.node_mut(n / 2).mesh.update(r);
    let version = sim.node(n / 2).mesh.record().version;
    let id = sim.node(n / 2).mesh.id();
    let change = sim
        .run_until_every(Duration::from_secs(600), Duration::from_millis(10), |s| {
            s.live()
                .iter()
                .filter(|i| **i != n / 2)
                .all(|i| s.node(*i).mesh.holds_alive(&id, version))
        })
        .ok_or_else(|| anyhow::anyhow!("the change did not reach all {n} nodes"))?;
    progress(&wall, "change spread");
    // One node killed: how long until every other node holds it down.
    let victim = n / 3;
    let (vid, vversion) = (
        sim.node(victim).mesh.id(),
        sim.node(victim).mesh.record().version,
    );
    sim.kill(victim);
    let down_everywhere = sim
        .run_until_every(Duration::from_secs(600), Duration::from_millis(100), |s| {
            s.live()
                .iter()
                .all(|i| !s.node(*i).mesh.holds_alive(&vid, vversion))
        })
        .ok_or_else(|| anyhow::anyhow!("the killed node stayed alive somewhere"))?;
    progress(&wall, "killed node down everywhere");
    // Loss: 5% of frames, for `loss_secs`; every down is false (nobody else died).
    let downs = |s: &Sim| -> u64 {
        s.downs
            .iter()
            .filter(|(id, _)| **id != vid)
            .map(|(_, n)| n)
            .sum()
    };
    let downs_before = downs(&sim);
    let lost_before = sim.lost;
    sim.set_loss(0.05);
    sim.run_for(Duration::from_secs(loss_secs));
    sim.set_loss(0.0);
    let false_downs = downs(&sim) - downs_before;
    progress(&wall, "loss run done");
    Ok(Row {
        nodes: n,
        join,
        change,
        bytes_per_node_sec,
        max_bytes_per_node_sec,
        down_everywhere,
        false_downs,
        frames_lost: sim.lost - lost_before,
        wall_secs: wall.elapsed().as_secs_f64(),
        peak_rss_mb: peak_rss_mb(),
    })
}

/// The weft binary next to this one, rebuilt first (in this build's profile) when run
/// through cargo.
fn weft_binary() -> anyhow::Result<PathBuf> {
    if let Some(cargo) = std::env::var_os("CARGO") {
        let release = !cfg!(debug_assertions);
        eprintln!(
            "building weft ({})...",
            if release { "release" } else { "debug" }
        );
        let mut build = std::process::Command::new(cargo);
        build.args(["build", "--locked", "--bin", "weft"]);
        if release {
            build.arg("--release");
        }
        anyhow::ensure!(build.status()?.success(), "cargo build --bin weft failed");
    }
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("weft");
    anyhow::ensure!(
        bin.exists(),
        "{} is missing: run `cargo build --release --bin weft` first",
        bin.display()
    );
    Ok(bin)
}

/// `auto`, `off` or mechanisms joined by `+`, checked as `router.offload` would be.
fn list_check(spec: &str) -> anyhow::Result<weft_config::Offload> {
    spec.replace('+', ",")
        .parse()
        .map_err(|e: String| anyhow::anyhow!("{spec}: {e}"))
}

/// `weft-bench soak`: weft encrypted under TCP load for `mins` minutes, RSS sampled.
fn run_soak(mins: u64, every: u64, out: &std::path::Path, command: &str) -> anyhow::Result<()> {
    weft::demo::lab::require_root("weft-bench soak")?;
    anyhow::ensure!(
        mins >= 1 && every >= 1,
        "--mins and --every must be at least 1"
    );
    let args = net::NetArgs {
        secs: mins * 60,
        reps: 1,
        paths: vec![],
        weft: weft_binary()?,
        boringtun: PathBuf::new(),
    };
    let mut b = net::setup(&args, &net::PathKind::WeftEncrypted(net::Weft::auto()))?;
    net::iperf_background(&mut b, "iperf3-load", mins * 60, 4)?;
    let mut samples: Vec<(u64, Vec<f64>)> = Vec::new();
    #[expect(clippy::disallowed_methods, reason = "sampling on a wall clock")]
    let start = std::time::Instant::now();
    let total = Duration::from_secs(mins * 60);
    // Bounded: one sample per `every` seconds until the load ends.
    for k in 0..=(mins * 60 / every) {
        let due = Duration::from_secs(k * every);
        if due > total {
            break;
        }
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let rss = net::rss_now(&b)?;
        eprintln!("{:>4} s: RSS {rss:.1?} MB", due.as_secs());
        samples.push((due.as_secs(), rss));
    }
    // The load ran its whole time: iperf3 ended with its receiver summary, not an error.
    let log = net::finished_log(&mut b, "iperf3-load")?;
    anyhow::ensure!(
        log.contains("receiver"),
        "the iperf3 load did not finish normally:\n{log}"
    );
    let summary = log
        .lines()
        .rfind(|l| l.contains("receiver"))
        .unwrap_or("")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let peak = net::peak_rss(&b)?;
    let first_min: f64 = samples
        .iter()
        .filter(|(t, _)| *t <= 60)
        .flat_map(|(_, r)| r.iter().copied())
        .fold(0.0, f64::max);
    let last_min: f64 = samples
        .iter()
        .filter(|(t, _)| *t + 60 >= mins * 60)
        .flat_map(|(_, r)| r.iter().copied())
        .fold(0.0, f64::max);
    let mut table =
        String::from("| time (s) | RSS node l (MB) | RSS node r (MB) |\n|---:|---:|---:|\n");
    for (t, r) in &samples {
        let _ = writeln!(
            table,
            "| {t} | {:.1} | {:.1} |",
            r.first().copied().unwrap_or(f64::NAN),
            r.get(1).copied().unwrap_or(f64::NAN)
        );
    }
    let report = format!(
        "# weft-bench soak\n\n- machine: {}\n- command: `{command}`\n- weft encrypted, `router.workers: auto` ({} workers on this machine), iperf3 TCP 4 streams for {mins} min, RSS (`VmRSS`) of both daemons every {every} s\n\nPeak RSS (`VmHWM`, larger daemon): {peak:.1} MB (target ≤ 64 MB). Largest RSS in the first minute: {first_min:.1} MB; in the last minute: {last_min:.1} MB ({:+.1} MB).\n\nThe load's iperf3 receiver summary: `{summary}`\n\n{table}",
        net::machine(),
        std::thread::available_parallelism().map_or(1, usize::from),
        last_min - first_min,
    );
    print!("{report}");
    std::fs::write(out, report)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// A weft path: `weft` or `weft-plaintext`, then `@` and its offloads (`auto`, `off`, or
/// mechanisms joined by `+`), then `/` and its workers (`auto` or a number), then `:nat` to
/// keep its masquerade rule (`network.nat_outgoing`, off by default in the bench).
fn weft_path(spec: &str) -> anyhow::Result<net::PathKind> {
    let (spec, nat) = match spec.strip_suffix(":nat") {
        Some(rest) => (rest, true),
        None => (spec, false),
    };
    let (rest, workers) = match spec.split_once('/') {
        Some((rest, w)) => {
            let _: weft_config::Workers = w
                .parse()
                .map_err(|e: String| anyhow::anyhow!("path {spec:?}: {e}"))?;
            (rest, Some(w.to_owned()))
        }
        None => (spec, None),
    };
    let (path, offload) = rest.split_once('@').unwrap_or((rest, "auto"));
    let _: weft_config::Offload = list_check(offload)?;
    let offload = match offload {
        "auto" | "off" => offload.to_owned(),
        list => format!("[{}]", list.replace('+', ", ")),
    };
    let weft = net::Weft {
        offload,
        workers,
        nat,
    };
    Ok(if path == "weft" {
        net::PathKind::WeftEncrypted(weft)
    } else {
        net::PathKind::WeftPlaintext(weft)
    })
}

/// The paths named on the command line, checked, and boringtun-cli's binary when one is
/// measured (fetched into `tools` if missing).
fn resolve_paths(
    paths: &[String],
    boringtun_threads: &[u32],
    wireguard_go: &[PathBuf],
    tools: &std::path::Path,
) -> anyhow::Result<(Vec<net::PathKind>, PathBuf)> {
    let mut kinds = Vec::new();
    for p in paths {
        match p.as_str() {
            "veth" => kinds.push(net::PathKind::Veth),
            w if w.starts_with("weft@")
                || w.starts_with("weft-plaintext@")
                || w.starts_with("weft/")
                || w.starts_with("weft-plaintext/")
                || w == "weft"
                || w == "weft-plaintext" =>
            {
                kinds.push(weft_path(w)?);
            }
            "wireguard-go" => kinds.push(net::PathKind::WireguardGo(None)),
            "boringtun" => kinds.extend(
                boringtun_threads
                    .iter()
                    .map(|t| net::PathKind::Boringtun(*t)),
            ),
            other => anyhow::bail!(
                "unknown path {other:?}: use veth, weft, weft-plaintext, wireguard-go, boringtun \
                 (weft and weft-plaintext take @auto, @off or @udp_batch+udp_gso+..., /workers, :nat)"
            ),
        }
    }
    for path in wireguard_go {
        kinds.push(net::wireguard_go_at(path)?);
    }
    net::check_tools(&kinds)?;
    let boringtun = if kinds
        .iter()
        .any(|k| matches!(k, net::PathKind::Boringtun(_)))
    {
        net::boringtun(tools)?
    } else {
        PathBuf::new()
    };
    Ok((kinds, boringtun))
}

fn run_net(o: &NetOpts, command: &str) -> anyhow::Result<()> {
    let (secs, reps, out) = (o.secs, o.reps, &o.out);
    weft::demo::lab::require_root("weft-bench net")?;
    anyhow::ensure!(
        reps >= 1 && secs >= 1,
        "--reps and --secs must be at least 1"
    );
    let (kinds, boringtun) =
        resolve_paths(&o.paths, &o.boringtun_threads, &o.wireguard_go, &o.tools)?;
    let args = net::NetArgs {
        secs,
        reps,
        paths: kinds.clone(),
        weft: weft_binary()?,
        boringtun,
    };
    let mut rows = Vec::new();
    for k in &args.paths {
        rows.push(net::measure(&args, k)?);
    }
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let report = format!(
        "# weft-bench net\n\n- date: {date}\n- machine: {}\n- command: `{command}`\n- each figure: the median of {reps} runs of {secs} s (ping: 200 at 10 ms); two network namespaces joined by one veth pair; every tunnel at MTU 1440; iperf3 {}\n\n{}\n## Ratios\n\n{}",
        net::machine(),
        net::iperf_version(),
        net::table(&rows),
        net::ratios(&rows),
    );
    print!("{report}");
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(out, &report)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// The command a report names: the `cargo run` form when cargo ran the bench (`CARGO` set),
/// else the binary as it was invoked (a profile-guided build's `target/pgo/release/weft-bench`
/// measures the `weft` beside it, not the one `cargo run` would build).
fn command_line(through_cargo: bool, mut args: impl Iterator<Item = String>) -> String {
    let invoked = args.next().unwrap_or_else(|| "weft-bench".to_owned());
    let run = match (through_cargo, cfg!(debug_assertions)) {
        (true, true) => "cargo run -p weft-bench --".to_owned(),
        (true, false) => "cargo run --release -p weft-bench --".to_owned(),
        (false, _) => invoked,
    };
    std::iter::once(run)
        .chain(args)
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() -> anyhow::Result<()> {
    let command = command_line(std::env::var_os("CARGO").is_some(), std::env::args());
    let cli = Cli::parse();
    // A signal (SIGINT, SIGTERM, SIGHUP) unwinds nothing, so no lab would be dropped: the
    // handler removes them (their daemons, iperf3, namespaces) before the bench exits.
    ctrlc::set_handler(|| {
        eprintln!("weft-bench: interrupted; removing its labs");
        for done in weft::demo::lab::remove_live_labs(Duration::from_secs(5)) {
            eprintln!("  {done}");
        }
        std::process::exit(130);
    })
    .map_err(|e| anyhow::anyhow!("installing the signal handler: {e}"))?;
    match cli.command {
        Cmd::Net(o) => run_net(&o, &command)?,
        Cmd::Small(o) => run_small(&o, &command)?,
        Cmd::Soak { mins, every, out } => run_soak(mins, every, &out, &command)?,
        Cmd::Router {
            secs,
            workers,
            reps,
            out,
        } => {
            let table = router::run(Duration::from_secs(secs))?;
            let scaling = router::scaling(&workers, Duration::from_secs(secs), reps)?;
            let report = format!(
                "# weft-bench router\n\n- machine: {}\n- command: `{command}`\n- criterion means, one core, no I/O\n\n{table}\n\
                 ## Encryption across cores\n\nEach worker is a thread encrypting {} B packets for {secs} s; median of {reps} runs; no I/O.\n\
                 Sharded: each worker has a router and a WireGuard session of its own (nothing shared: the\n\
                 part of a multi-core data path that scales with cores, measured alone). Shared router: the\n\
                 workers encrypt through one router as the daemon's workers share it (a read lock per batch\n\
                 of 64 packets, a lock per peer's session per packet), worker i to peer i: this measures\n\
                 what the sharing costs.\n\n{scaling}",
                net::machine(),
                1420
            );
            print!("{report}");
            std::fs::write(&out, report)?;
            eprintln!("wrote {}", out.display());
        }
        Cmd::Chaos {
            nodes,
            mins,
            seed,
            out,
            schedule_only,
            faults,
        } => {
            anyhow::ensure!(
                mins.is_finite() && mins > 0.0 && mins <= 24.0 * 60.0,
                "--mins {mins}: give a length of faults between a few seconds and a day"
            );
            let opts = chaos::Opts {
                nodes,
                duration: Duration::from_secs_f64(mins * 60.0),
                seed,
                out,
                faults,
            };
            if schedule_only {
                print!("{}", chaos::schedule_text(&opts)?);
            } else {
                chaos::run(&weft_binary()?, &opts)?;
            }
        }
        Cmd::Mesh {
            sizes,
            steady_secs,
            loss_secs,
            out,
        } => {
            // Thousands of cores in one process: each signed record is checked and held once.
            weft_mesh::share_verified_records(true);
            let timeout = MeshConfig::default().liveness_timeout;
            let mut table = String::new();
            let _ = writeln!(
                table,
                "| nodes | all joined (virtual s) | one change everywhere (virtual s) | gossip sent per node, mean (B/s) | max node (B/s) | killed node down everywhere (virtual s) | false downs under 5% loss | frames lost | wall time (s) | peak RSS (MB) |"
            );
            let _ = writeln!(table, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
            let mut failures = Vec::new();
            for n in sizes {
                eprintln!("simulating {n} nodes...");
                let r = measure(n, Duration::from_secs(steady_secs), loss_secs)?;
                let _ = writeln!(
                    table,
                    "| {} | {:.2} | {:.2} | {:.0} | {:.0} | {:.1} | {} | {} | {:.0} | {:.0} |",
                    r.nodes,
                    r.join.as_secs_f64(),
                    r.change.as_secs_f64(),
                    r.bytes_per_node_sec,
                    r.max_bytes_per_node_sec,
                    r.down_everywhere.as_secs_f64(),
                    r.false_downs,
                    r.frames_lost,
                    r.wall_secs,
                    r.peak_rss_mb,
                );
                eprint!("{}", table.lines().last().unwrap_or_default());
                eprintln!();
                if r.change > CONVERGE_TARGET {
                    failures.push(format!(
                        "{n} nodes: one change took {:?} (target {CONVERGE_TARGET:?})",
                        r.change
                    ));
                }
                if r.bytes_per_node_sec.max(r.max_bytes_per_node_sec) > BYTES_TARGET {
                    failures.push(format!(
                        "{n} nodes: {:.0} B/s per node, {:.0} at the busiest (target {BYTES_TARGET:.0})",
                        r.bytes_per_node_sec, r.max_bytes_per_node_sec
                    ));
                }
                if r.down_everywhere > 2 * timeout {
                    failures.push(format!(
                        "{n} nodes: a killed node was down everywhere after {:?} (target {:?})",
                        r.down_everywhere,
                        2 * timeout
                    ));
                }
                if r.false_downs > 0 {
                    failures.push(format!(
                        "{n} nodes: {} false downs under 5% loss",
                        r.false_downs
                    ));
                }
            }
            print!("{table}");
            if let Some(path) = out {
                std::fs::write(&path, &table)?;
            }
            for f in &failures {
                eprintln!("target missed: {f}");
            }
            if !failures.is_empty() {
                anyhow::bail!("{} target(s) missed", failures.len());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_names_cargo_run_only_when_cargo_ran_the_bench() {
        let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let direct = command_line(
            false,
            args(&["target/pgo/release/weft-bench", "small", "--rounds", "2"]).into_iter(),
        );
        assert_eq!(direct, "target/pgo/release/weft-bench small --rounds 2");
        let cargo = command_line(true, args(&["/x/weft-bench", "small"]).into_iter());
        assert!(
            cargo.starts_with("cargo run") && cargo.ends_with("-p weft-bench -- small"),
            "{cargo}"
        );
    }

    #[test]
    fn a_weft_path_names_its_offloads_workers_and_masquerade() {
        let net::PathKind::WeftEncrypted(w) = weft_path("weft@off/2:nat").expect("a path") else {
            panic!("an encrypted path");
        };
        assert_eq!(
            (w.offload.as_str(), w.workers.as_deref(), w.nat),
            ("off", Some("2"), true)
        );
        let net::PathKind::WeftPlaintext(w) = weft_path("weft-plaintext/1").expect("a path") else {
            panic!("a plaintext path");
        };
        assert_eq!((w.offload.as_str(), w.nat), ("auto", false));
        assert!(weft_path("weft/zero").is_err());
    }
}
