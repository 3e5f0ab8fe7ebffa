//! `weft-bench`: weft's benchmarks.
//!
//! `weft-bench mesh` runs the mesh cores in the simulator (virtual time, no sockets) and reports,
//! at several sizes, how long one record change takes to reach every node and how many gossip
//! bytes each node sends per second in steady state. The numbers are deterministic for a given
//! build (the simulation's randomness is seeded); `bench/results/mesh.md` holds the committed
//! run and the targets.

use std::fmt::Write as _;
use std::time::Duration;

use clap::{Parser, Subcommand};
use weft_mesh::MeshConfig;
use weft_tests::sim::{Sim, sim_record};

/// Targets from the mesh issue: convergence of one change at 1000 nodes, and steady-state
/// gossip per node at 1000 nodes (Weave's topology gossip reached 8 MB per message at 300).
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
    /// Mesh scale in simulation: convergence time and steady-state gossip bytes per node.
    Mesh {
        /// Cluster sizes to simulate.
        #[arg(long, value_delimiter = ',', default_value = "100,300,1000")]
        sizes: Vec<usize>,
        /// Virtual seconds of steady state to measure bytes over.
        #[arg(long, default_value_t = 60)]
        steady_secs: u64,
        /// Also write the Markdown table to this file.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

struct Row {
    nodes: usize,
    join: Duration,
    change: Duration,
    bytes_per_node_sec: f64,
    max_bytes_per_node_sec: f64,
}

fn measure(n: usize, steady: Duration) -> anyhow::Result<Row> {
    let config = MeshConfig::default();
    // Each node bootstraps from one earlier node.
    let mut sim = Sim::new(n, config, |i| (i > 0).then(|| (i * 7919) % i));
    let join = sim
        .run_until(Duration::from_secs(600), Sim::converged)
        .ok_or_else(|| anyhow::anyhow!("{n} nodes did not converge in 600 s of virtual time"))?;
    // Let the initial exchange settle, then measure steady state.
    sim.run_for(Duration::from_secs(30));
    let before = sim.bytes_sent.clone();
    sim.run_for(steady);
    let per: Vec<f64> = before
        .iter()
        .zip(&sim.bytes_sent)
        .map(|(b, a)| (a - b) as f64 / steady.as_secs_f64())
        .collect();
    let bytes_per_node_sec = per.iter().sum::<f64>() / n as f64;
    let max_bytes_per_node_sec = per.iter().copied().fold(0.0, f64::max);
    // One change at one node: how long until every node holds it.
    let mut r = sim_record(n / 2, 0);
    r.pod_cidrs = vec!["100.127.0.0/24".parse()?];
    sim.node_mut(n / 2).mesh.update(r);
    let version = sim.node(n / 2).mesh.record().version;
    let id = sim.node(n / 2).mesh.id();
    let change = sim
        .run_until(Duration::from_secs(600), |s| {
            s.live().iter().filter(|i| **i != n / 2).all(|i| {
                s.node(*i)
                    .mesh
                    .members()
                    .iter()
                    .any(|m| m.id == id && m.record.version == version)
            })
        })
        .ok_or_else(|| anyhow::anyhow!("the change did not reach all {n} nodes"))?;
    Ok(Row {
        nodes: n,
        join,
        change,
        bytes_per_node_sec,
        max_bytes_per_node_sec,
    })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Mesh {
            sizes,
            steady_secs,
            out,
        } => {
            let mut table = String::new();
            let _ = writeln!(
                table,
                "| nodes | all joined (virtual s) | one change everywhere (virtual s) | gossip sent per node, mean (B/s) | max node (B/s) |"
            );
            let _ = writeln!(table, "|---:|---:|---:|---:|---:|");
            let mut failures = Vec::new();
            for n in sizes {
                eprintln!("simulating {n} nodes...");
                let r = measure(n, Duration::from_secs(steady_secs))?;
                let _ = writeln!(
                    table,
                    "| {} | {:.2} | {:.2} | {:.0} | {:.0} |",
                    r.nodes,
                    r.join.as_secs_f64(),
                    r.change.as_secs_f64(),
                    r.bytes_per_node_sec,
                    r.max_bytes_per_node_sec
                );
                if r.nodes >= 1000 {
                    if r.change > CONVERGE_TARGET {
                        failures.push(format!(
                            "{n} nodes: one change took {:?} (target {CONVERGE_TARGET:?})",
                            r.change
                        ));
                    }
                    if r.bytes_per_node_sec > BYTES_TARGET {
                        failures.push(format!(
                            "{n} nodes: {:.0} B/s per node (target {BYTES_TARGET:.0})",
                            r.bytes_per_node_sec
                        ));
                    }
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
