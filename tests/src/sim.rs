//! `Sim`: many mesh cores over an in-memory network with a virtual clock, latency and
//! partitions. The clock jumps to the earliest pending delivery or timeout, so minutes of
//! gossip among hundreds of nodes run in milliseconds, and a run replays exactly.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use weft_mesh::{ConnId, Event, Identity, Membership, MeshConfig, NodeId, NodeRecord};

/// One simulated node.
#[derive(Debug)]
pub struct SimNode {
    /// Its core.
    pub mesh: Membership,
    /// Its gossip address.
    pub addr: SocketAddr,
    /// Every event it reported, with the virtual time.
    pub events: Vec<(Duration, Event)>,
}

/// A simulated network of mesh nodes.
#[derive(Debug)]
pub struct Sim {
    /// The virtual clock's start.
    pub start: Instant,
    /// The virtual clock.
    pub now: Instant,
    /// The nodes; `None` once killed.
    pub nodes: Vec<Option<SimNode>>,
    /// One-way latency of every frame.
    pub latency: Duration,
    /// Frame bytes sent so far, by node.
    pub bytes_sent: Vec<u64>,
    config: MeshConfig,
    addrs: HashMap<SocketAddr, usize>,
    /// conn → (its node, the node at the other end, the other end's conn).
    links: BTreeMap<ConnId, (usize, usize, ConnId)>,
    queue: BinaryHeap<Reverse<(Instant, u64, usize, ConnId)>>,
    frames: HashMap<u64, Vec<u8>>,
    seq: u64,
    next_conn: u64,
    /// Partition group of each node, when partitioned.
    groups: Option<Vec<usize>>,
    /// The share of frames lost (0 to 1); see [`Sim::set_loss`].
    loss: f64,
    /// Frames lost so far.
    pub lost: u64,
    /// Whether nodes' events are kept in [`SimNode::events`] (a mesh of thousands turns it
    /// off: it holds a few events per member per node).
    pub keep_events: bool,
    /// `Down` events reported so far, by the member they name (kept either way).
    pub downs: BTreeMap<NodeId, u64>,
    /// Nodes given input since they were last drained (a node is in it at most once).
    touched: Vec<usize>,
    is_touched: Vec<bool>,
    /// Every node's next timeout as last read, and a heap of them (entries that no longer
    /// match are skipped): a step costs what it touches, not the size of the mesh.
    timer_at: Vec<Option<Instant>>,
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    rng: u64,
}

/// The gossip interval the simulation tests use (restated from the defaults, not imported).
pub const GOSSIP_INTERVAL: Duration = Duration::from_secs(1);
/// The liveness timeout the simulation tests use.
pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(30);

/// The mesh timing of the simulation tests.
pub fn test_config() -> MeshConfig {
    MeshConfig {
        gossip_interval: GOSSIP_INTERVAL,
        liveness_timeout: LIVENESS_TIMEOUT,
        ..MeshConfig::default()
    }
}

/// A bootstrap plan: node `i` joins through one earlier node only (a pseudo-random one).
pub fn one_earlier(i: usize) -> Option<usize> {
    (i > 0).then(|| (i * 7919) % i)
}

/// The record of simulated node `i`: region `r{i % regions}`, addresses from 198.18/15.
pub fn sim_record(i: usize, version: u64) -> NodeRecord {
    let (hi, lo) = ((i / 250) as u8, (i % 250) as u8 + 1);
    NodeRecord {
        region: Some(format!("r{}", i % 2)),
        private_address: Some(std::net::Ipv4Addr::new(198, 18, hi, lo).into()),
        public_address: Some(std::net::Ipv4Addr::new(198, 19, hi, lo).into()),
        wireguard_key: [0; 32],
        pod_cidrs: vec![format!("100.64.{}.0/24", i % 256).parse().expect("prefix")],
        claimed_at: vec![0],
        trusted_subnets: vec![],
        ..weft_mesh::testing::node_record(&format!("n{i}"), version)
    }
}

/// The identity of simulated node `i` (its WireGuard private key, clear of the bits that
/// X25519 clamps away).
pub fn sim_identity(i: usize) -> Identity {
    let mut k = [0u8; 32];
    k[1..9].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    Identity::from_wireguard_key(&k)
}

impl Sim {
    /// `n` nodes; node `i` bootstraps from `bootstrap(i)` (by index), or none.
    #[expect(
        clippy::disallowed_methods,
        reason = "the simulation's clock starts from a real instant"
    )]
    pub fn new(n: usize, config: MeshConfig, bootstrap: impl Fn(usize) -> Option<usize>) -> Self {
        let start = Instant::now();
        let mut sim = Self {
            start,
            now: start,
            nodes: Vec::new(),
            latency: Duration::from_millis(20),
            bytes_sent: Vec::new(),
            config,
            addrs: HashMap::new(),
            links: BTreeMap::new(),
            queue: BinaryHeap::new(),
            frames: HashMap::new(),
            seq: 0,
            next_conn: 1,
            groups: None,
            loss: 0.0,
            lost: 0,
            keep_events: true,
            downs: BTreeMap::new(),
            touched: Vec::new(),
            is_touched: Vec::new(),
            timer_at: Vec::new(),
            timers: BinaryHeap::new(),
            rng: 0x9e37_79b9_7f4a_7c15,
        };
        for i in 0..n {
            sim.add(sim_record(i, 1), sim_identity(i), None);
        }
        for i in 0..n {
            if let Some(b) = bootstrap(i) {
                let addr = sim.node(b).addr;
                sim.node_mut(i).mesh.join(&[addr]);
            }
        }
        sim.drain_all();
        sim
    }

    /// Adds a node with this record and identity (gossiping on the record's public address),
    /// joining through node `bootstrap`; during a partition it lands on its bootstrap's side.
    /// Returns its index.
    pub fn add(
        &mut self,
        record: NodeRecord,
        identity: Identity,
        bootstrap: Option<usize>,
    ) -> usize {
        let i = self.nodes.len();
        // Gossip over the public address: the simulation has one flat network.
        let addr = SocketAddr::new(
            record
                .public_address
                .expect("simulated records have a public address"),
            record.mesh_port,
        );
        let mut mesh = Membership::new(self.now, identity, record, self.config, i as u64 + 7);
        if let Some(b) = bootstrap {
            mesh.join(&[self.node(b).addr]);
        }
        self.addrs.insert(addr, i);
        self.bytes_sent.push(0);
        self.is_touched.push(false);
        self.timer_at.push(None);
        if let Some(g) = self.groups.as_mut() {
            let side = bootstrap.map_or(0, |b| g[b]);
            g.push(side);
        }
        self.nodes.push(Some(SimNode {
            mesh,
            addr,
            events: Vec::new(),
        }));
        self.drain_all();
        i
    }

    /// Node `i` (panics if killed).
    pub fn node(&self, i: usize) -> &SimNode {
        self.nodes[i].as_ref().expect("node is alive")
    }

    /// Node `i`, mutably (it is drained and its timer read again at the next step).
    pub fn node_mut(&mut self, i: usize) -> &mut SimNode {
        self.touch(i);
        self.nodes[i].as_mut().expect("node is alive")
    }

    fn touch(&mut self, i: usize) {
        if !self.is_touched[i] {
            self.is_touched[i] = true;
            self.touched.push(i);
        }
    }

    /// Reads node `i`'s next timeout again.
    fn refresh_timer(&mut self, i: usize) {
        let t = self.nodes[i].as_ref().and_then(|n| n.mesh.poll_timeout());
        if t != self.timer_at[i] {
            self.timer_at[i] = t;
            if let Some(t) = t {
                self.timers.push(Reverse((t, i)));
            }
        }
    }

    /// The earliest node timeout, dropping heap entries that no longer match.
    fn next_timer(&mut self) -> Option<Instant> {
        while let Some(Reverse((t, i))) = self.timers.peek().copied() {
            if self.timer_at[i] == Some(t) && self.nodes[i].is_some() {
                return Some(t);
            }
            self.timers.pop();
        }
        None
    }

    /// Drains every touched node until none has output left.
    fn drain_touched(&mut self) {
        for _ in 0..1000 {
            if self.touched.is_empty() {
                return;
            }
            for i in std::mem::take(&mut self.touched) {
                self.is_touched[i] = false;
                self.drain(i);
                self.refresh_timer(i);
            }
        }
        panic!("the simulation did not settle in 1000 rounds at one instant");
    }

    /// The ids of the live nodes.
    pub fn live(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].is_some())
            .collect()
    }

    fn separated(&self, a: usize, b: usize) -> bool {
        self.groups.as_ref().is_some_and(|g| g[a] != g[b])
    }

    /// Moves every node's pending output onto the network (call after commanding a node).
    pub fn drain_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.touch(i);
        }
        self.drain_touched();
    }

    /// Moves node `i`'s output onto the network.
    fn drain(&mut self, i: usize) {
        let now = self.now;
        let elapsed = now - self.start;
        let Some(node) = self.nodes[i].as_mut() else {
            return;
        };
        let mut sends = Vec::new();
        while let Some(t) = node.mesh.poll_transmit() {
            sends.push(t);
        }
        let mut dials = Vec::new();
        while let Some(a) = node.mesh.poll_dial() {
            dials.push(a);
        }
        let mut closes = Vec::new();
        while let Some(c) = node.mesh.poll_close() {
            closes.push(c);
        }
        while let Some(e) = node.mesh.poll_event() {
            if let Event::Down(id) = e {
                *self.downs.entry(id).or_default() += 1;
            }
            if self.keep_events {
                node.events.push((elapsed, e));
            }
        }
        for c in closes {
            if let Some((_, other, theirs)) = self.links.remove(&c) {
                self.links.remove(&theirs);
                if let Some(n) = self.nodes[other].as_mut() {
                    n.mesh.handle_disconnected(theirs);
                    self.touch(other);
                }
            }
        }
        for t in sends {
            self.bytes_sent[i] += t.frame.len() as u64;
            if self.dropped(&t.frame) {
                continue;
            }
            if let Some(&(_, to, their)) = self.links.get(&t.conn) {
                self.seq += 1;
                self.frames.insert(self.seq, t.frame);
                self.queue
                    .push(Reverse((now + self.latency, self.seq, to, their)));
            }
        }
        for addr in dials {
            let Some(&j) = self.addrs.get(&addr) else {
                continue;
            };
            if j == i || self.nodes[j].is_none() || self.separated(i, j) {
                continue;
            }
            let (ci, cj) = (ConnId(self.next_conn), ConnId(self.next_conn + 1));
            self.next_conn += 2;
            self.links.insert(ci, (i, j, cj));
            self.links.insert(cj, (j, i, ci));
            self.node_mut(i).mesh.handle_connected(now, ci);
            self.node_mut(j).mesh.handle_connected(now, cj);
            self.touch(i);
            self.touch(j);
        }
    }

    /// Loses this share (0 to 1) of the frames sent from now on, each independently, except
    /// the `Hello` that opens a connection. Harsher than the TCP the mesh runs on, which would
    /// deliver a lost segment late: here whatever the frame carried never arrives.
    pub fn set_loss(&mut self, loss: f64) {
        self.loss = loss.clamp(0.0, 1.0);
    }

    fn dropped(&mut self, frame: &[u8]) -> bool {
        if self.loss <= 0.0 || frame.first() == Some(&1) {
            return false;
        }
        // xorshift64: replayable.
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        let lost = (x >> 11) as f64 / (1u64 << 53) as f64 <= self.loss;
        self.lost += u64::from(lost);
        lost
    }

    /// Advances the clock to the next delivery or timeout and handles everything due then.
    pub fn step(&mut self) {
        self.step_until(None);
    }

    /// As [`Sim::step`], stopping at `deadline` when that comes first (a driver's own timer
    /// above the mesh).
    pub fn step_until(&mut self, deadline: Option<Instant>) {
        self.drain_touched();
        let next_frame = self.queue.peek().map(|Reverse((t, ..))| *t);
        let next_timer = self.next_timer();
        let Some(next) = [next_frame, next_timer, deadline]
            .into_iter()
            .flatten()
            .min()
        else {
            return;
        };
        self.now = self.now.max(next);
        while let Some(Reverse((t, seq, to, conn))) = self.queue.peek().copied() {
            if t > self.now {
                break;
            }
            self.queue.pop();
            let frame = self.frames.remove(&seq).expect("queued frame");
            if !self.links.contains_key(&conn) {
                continue;
            }
            let now = self.now;
            if let Some(n) = self.nodes[to].as_mut() {
                n.mesh.handle_frame(now, conn, &frame);
                self.touch(to);
            }
        }
        let now = self.now;
        while let Some(t) = self.next_timer() {
            if t > now {
                break;
            }
            let Some(Reverse((_, i))) = self.timers.pop() else {
                break;
            };
            self.timer_at[i] = None;
            if let Some(n) = self.nodes[i].as_mut() {
                n.mesh.handle_timeout(now);
                self.touch(i);
            }
        }
        self.drain_touched();
    }

    /// Steps until `done` holds or `limit` of virtual time has passed since now; returns the
    /// virtual time it took, or `None` on timeout.
    pub fn run_until(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(&Self) -> bool,
    ) -> Option<Duration> {
        let from = self.now;
        for _ in 0..10_000_000 {
            if done(self) {
                return Some(self.now - from);
            }
            if self.now - from > limit {
                return None;
            }
            self.step();
        }
        None
    }

    /// As [`Sim::run_until`], checking `done` only every `every` of virtual time (for checks
    /// that cost O(N²) in a mesh of thousands); the time returned is that of the check that
    /// found it done, so it is late by less than `every`.
    pub fn run_until_every(
        &mut self,
        limit: Duration,
        every: Duration,
        mut done: impl FnMut(&Self) -> bool,
    ) -> Option<Duration> {
        let from = self.now;
        let mut next = self.now;
        for _ in 0..100_000_000 {
            if self.now >= next {
                if done(self) {
                    return Some(self.now - from);
                }
                next = self.now + every;
            }
            if self.now - from > limit {
                return None;
            }
            self.step();
        }
        None
    }

    /// Runs for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        let _ = self.run_until(d + Duration::from_secs(1), |s| s.now >= until);
    }

    /// Whether every live node knows every other live node, alive, at the same version.
    pub fn converged(&self) -> bool {
        let live = self.live();
        let versions: Vec<(NodeId, u64)> = live
            .iter()
            .map(|i| (self.node(*i).mesh.id(), self.node(*i).mesh.record().version))
            .collect();
        live.iter().all(|i| {
            let mesh = &self.node(*i).mesh;
            mesh.alive_count() == live.len() - 1
                && versions
                    .iter()
                    .all(|(id, v)| *id == mesh.id() || mesh.holds_alive(id, *v))
        })
    }

    fn cut(&mut self, pred: impl Fn(usize, usize) -> bool) {
        let doomed: Vec<ConnId> = self
            .links
            .iter()
            .filter(|(_, (a, b, _))| pred(*a, *b))
            .map(|(c, _)| *c)
            .collect();
        for c in doomed {
            if let Some((a, _, _)) = self.links.remove(&c)
                && let Some(n) = self.nodes[a].as_mut()
            {
                n.mesh.handle_disconnected(c);
            }
        }
        self.drain_all();
    }

    /// Splits the network: `group(i)` for each node; connections across groups break.
    pub fn partition(&mut self, group: impl Fn(usize) -> usize) {
        let g: Vec<usize> = (0..self.nodes.len()).map(group).collect();
        self.groups = Some(g.clone());
        self.cut(|a, b| g[a] != g[b]);
    }

    /// Ends the partition.
    pub fn heal(&mut self) {
        self.groups = None;
    }

    /// Kills node `i` without a goodbye: its connections drop.
    pub fn kill(&mut self, i: usize) {
        self.cut(|a, b| a == i || b == i);
        self.nodes[i] = None;
    }

    /// Starts killed node `i` again as a new life of the same node: same identity and address,
    /// this `record` (a restarted daemon versions it by its wall clock), a heartbeat counting
    /// from zero, joining through node `bootstrap`.
    pub fn restart(&mut self, i: usize, record: NodeRecord, bootstrap: usize) {
        assert!(self.nodes[i].is_none(), "node {i} is still running");
        let addr = self.node(bootstrap).addr;
        let mut mesh = Membership::new(
            self.now,
            sim_identity(i),
            record,
            self.config,
            i as u64 + 1007,
        );
        mesh.join(&[addr]);
        let own = SocketAddr::new(
            mesh.record()
                .public_address
                .expect("simulated records have a public address"),
            mesh.record().mesh_port,
        );
        self.nodes[i] = Some(SimNode {
            mesh,
            addr: own,
            events: Vec::new(),
        });
        self.drain_all();
    }

    /// Sends `frame` from node `i` on every connection it has, as if its core had: a dishonest
    /// member speaking.
    pub fn send_raw(&mut self, i: usize, frame: &[u8]) {
        let now = self.now;
        let outs: Vec<(usize, ConnId)> = self
            .links
            .values()
            .filter(|(a, ..)| *a == i)
            .map(|(_, to, theirs)| (*to, *theirs))
            .collect();
        for (to, theirs) in outs {
            self.inject(now, to, theirs, frame);
        }
    }

    /// Queues `frame` for node `to` on its connection `theirs`, one latency from `now`.
    fn inject(&mut self, now: Instant, to: usize, theirs: ConnId, frame: &[u8]) {
        self.seq += 1;
        self.frames.insert(self.seq, frame.to_vec());
        self.queue
            .push(Reverse((now + self.latency, self.seq, to, theirs)));
    }

    /// Whether every live node other than `i` holds `i` alive.
    pub fn alive_everywhere(&self, i: usize) -> bool {
        let id = self.node(i).mesh.id();
        self.live().into_iter().filter(|j| *j != i).all(|j| {
            self.node(j)
                .mesh
                .members()
                .iter()
                .any(|m| m.id == id && m.alive)
        })
    }

    /// Whether nodes `i` and `j` have a link.
    pub fn connected(&self, i: usize, j: usize) -> bool {
        self.links.values().any(|(a, b, _)| *a == i && *b == j)
    }

    /// The nodes linked to `i`.
    pub fn neighbours(&self, i: usize) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .links
            .values()
            .filter(|(a, ..)| *a == i)
            .map(|(_, b, _)| *b)
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// As [`Sim::send_raw`], on the links from `i` to `j` only.
    pub fn send_raw_to(&mut self, i: usize, j: usize, frame: &[u8]) {
        let now = self.now;
        let outs: Vec<ConnId> = self
            .links
            .values()
            .filter(|(a, b, _)| *a == i && *b == j)
            .map(|(_, _, theirs)| *theirs)
            .collect();
        for theirs in outs {
            self.inject(now, j, theirs, frame);
        }
    }

    /// Closes every link between `i` and `j` (both ends see it break).
    pub fn close(&mut self, i: usize, j: usize) {
        self.cut(|a, b| (a == i && b == j) || (a == j && b == i));
    }
}
