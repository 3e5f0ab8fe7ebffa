//! `IpamSim`: the daemon's IPAM rounds ([`weft::control::blocks::Blocks`]) on top of the mesh
//! simulation. Every node runs a round once per second of virtual time, as the daemon's control
//! loop does, and a changed set of blocks goes into its record and out over the gossip.

use std::time::{Duration, Instant};

use ipnet::IpNet;
use weft::control::blocks::{BlockEvent, Blocks};
use weft_ipam::{Pool, overlaps};
use weft_mesh::{MeshConfig, NodeRecord};

use crate::sim::{Sim, sim_identity, sim_record};

/// How often each node runs a round (the daemon's resync).
pub const ROUND: Duration = Duration::from_secs(1);

/// One node's IPAM side.
#[derive(Debug)]
pub struct NodeBlocks {
    /// What it holds and how it decides.
    pub blocks: Blocks,
    /// When it started (no first claim before `settle` has passed).
    pub started: Instant,
    /// When its next round is due.
    pub next_round: Instant,
    /// Everything its rounds reported, with the virtual time.
    pub events: Vec<(Duration, BlockEvent)>,
}

/// Mesh nodes that claim their pod blocks.
#[derive(Debug)]
pub struct IpamSim {
    /// The mesh underneath.
    pub sim: Sim,
    /// Each node's IPAM side, by the same index.
    pub nodes: Vec<NodeBlocks>,
    /// The pools every node shares.
    pub pools: Vec<Pool>,
    /// How long a node waits before its first claim.
    pub settle: Duration,
    /// How long a dead node's blocks hold.
    pub expiry: Duration,
}

/// The record of node `i` with no pod blocks yet.
pub fn blockless_record(i: usize) -> NodeRecord {
    let mut r = sim_record(i, 1);
    r.pod_cidrs.clear();
    r.claimed_at.clear();
    r
}

impl IpamSim {
    /// `n` nodes without blocks, started in the same instant, each bootstrapped from
    /// `bootstrap(i)`.
    pub fn new(
        n: usize,
        config: MeshConfig,
        pools: &[&str],
        bootstrap: impl Fn(usize) -> Option<usize>,
    ) -> Self {
        let mut sim = Sim::new(0, config, |_| None);
        let pools: Vec<Pool> = pools
            .iter()
            .map(|p| {
                let net: IpNet = p.parse().expect("pool CIDR");
                Pool::new(net, if net.addr().is_ipv4() { 24 } else { 64 }).expect("pool")
            })
            .collect();
        for i in 0..n {
            sim.add(blockless_record(i), sim_identity(i), None);
        }
        for i in 0..n {
            if let Some(b) = bootstrap(i) {
                let addr = sim.node(b).addr;
                sim.node_mut(i).mesh.join(&[addr]);
            }
        }
        sim.drain_all();
        let mut s = Self {
            sim,
            nodes: Vec::new(),
            pools,
            settle: 3 * config.gossip_interval,
            expiry: Duration::from_secs(24 * 3600),
        };
        for i in 0..n {
            s.start_blocks(i);
        }
        s
    }

    fn start_blocks(&mut self, i: usize) {
        let now = self.sim.now;
        self.nodes.push(NodeBlocks {
            blocks: Blocks {
                pools: self.pools.clone(),
                owner: self.sim.node(i).mesh.id().0,
                fixed: Vec::new(),
                held: Vec::new(),
                expiry: self.expiry,
            },
            started: now,
            next_round: now,
            events: Vec::new(),
        });
    }

    /// Adds a node with identity `ident`, without blocks, joining through `bootstrap`; during
    /// a partition it lands on its bootstrap's side. Returns its index.
    pub fn add(&mut self, ident: usize, bootstrap: usize) -> usize {
        let i = self.sim.add(
            blockless_record(ident),
            sim_identity(ident),
            Some(bootstrap),
        );
        self.start_blocks(i);
        i
    }

    /// The wall clock a claim made now is stamped with (milliseconds).
    pub fn now_ms(&self) -> u64 {
        1_700_000_000_000 + u64::try_from((self.sim.now - self.sim.start).as_millis()).expect("ms")
    }

    /// Runs the rounds that are due, then one step of the mesh.
    pub fn step(&mut self) {
        let now = self.sim.now;
        let now_ms = self.now_ms();
        let elapsed = now - self.sim.start;
        for i in self.sim.live() {
            let nb = &mut self.nodes[i];
            if nb.next_round > now {
                continue;
            }
            nb.next_round = now + ROUND;
            let settled = now.saturating_duration_since(nb.started) >= self.settle;
            let members = self.sim.node(i).mesh.members();
            let (next, events) = nb.blocks.round(&members, now, now_ms, settled);
            nb.events.extend(events.into_iter().map(|e| (elapsed, e)));
            if next != nb.blocks.held {
                let mut r = self.sim.node(i).mesh.record().clone();
                r.pod_cidrs = next.iter().map(|b| b.block).collect();
                r.claimed_at = next.iter().map(|b| b.since).collect();
                nb.blocks.held = next;
                self.sim.node_mut(i).mesh.update(r);
            }
        }
        self.sim.drain_all();
        // Wake up for the next round even when the mesh is quiet.
        let next_round = self
            .sim
            .live()
            .iter()
            .map(|i| self.nodes[*i].next_round)
            .min();
        self.sim.step_until(next_round);
    }

    /// Steps until `done` holds or `limit` of virtual time has passed; the virtual time it
    /// took, or `None`.
    pub fn run_until(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(&Self) -> bool,
    ) -> Option<Duration> {
        let from = self.sim.now;
        for _ in 0..10_000_000 {
            if done(self) {
                return Some(self.sim.now - from);
            }
            if self.sim.now - from > limit {
                return None;
            }
            self.step();
        }
        None
    }

    /// Every live node's blocks, by node.
    pub fn held(&self) -> Vec<(usize, Vec<IpNet>)> {
        self.sim
            .live()
            .into_iter()
            .map(|i| {
                (
                    i,
                    self.nodes[i].blocks.held.iter().map(|b| b.block).collect(),
                )
            })
            .collect()
    }

    /// Whether every live node holds one block per pool, no two live nodes' blocks overlap,
    /// and every node's view of every other's blocks is current (the mesh converged).
    pub fn settled(&self) -> bool {
        let held = self.held();
        let one_per_pool = held.iter().all(|(_, b)| {
            b.len() == self.pools.len()
                && self
                    .pools
                    .iter()
                    .all(|p| b.iter().filter(|x| p.holds(x)).count() == 1)
        });
        let all: Vec<IpNet> = held.iter().flat_map(|(_, b)| b.iter().copied()).collect();
        let disjoint = all
            .iter()
            .enumerate()
            .all(|(k, a)| all[k + 1..].iter().all(|b| !overlaps(a, b)));
        one_per_pool && disjoint && self.sim.converged()
    }
}
