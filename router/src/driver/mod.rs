//! The driver: data-path workers, each owning a TUN queue and a UDP socket and sharing the
//! [`Router`] (see the crate docs, "Workers"), that move packets in batches and decide nothing.
//!
//! # Waiting
//!
//! Over the real devices a worker is a thread of its own that waits in its own `epoll` (module
//! `poll`, [`Driver::serve_blocking`]): its TUN queue, its socket, a [`Bell`] rung for commands
//! and to stop, and a `timerfd` set to the router's next deadline (set again only when the
//! deadline moves, so a wait sets no timer and reads no clock). A packet's wake-up leads straight
//! to its turn, with no async runtime's scheduler, I/O driver, timer wheel and wakers in
//! between (about a sixth of the CPU weft spent per ping when its workers ran on tokio). The
//! in-memory devices of the tests are awaited instead ([`Driver::serve`]); both run the same
//! turns.
//!
//! # Turns
//!
//! The driver waits until any source is ready (shutdown, a command, the TUN device, the socket,
//! the router's timer), then runs one turn that serves every source that may be ready,
//! whichever woke it (a worker in `epoll` knows which are, below): the timers if due; the datagrams received and, with batching, more up to
//! [`TURN_PACKETS`]; the TUN packets read and, with batching, more up to one batch ([`BATCH`]
//! reads, [`SLOTS`] packets); up to [`TURN_COMMANDS`] commands. A source that is always ready
//! (a pod sending faster than weft encrypts, a flood of datagrams) gets its bounded share of
//! each turn and cannot starve the others: inbound traffic, handshake responses and WireGuard's
//! timers go on. Asking a source that is not ready costs no system call (its readiness is
//! known). A worker in `epoll` knows more: it serves the TUN queue and the socket only when
//! `epoll` reports them (level-triggered: what a turn leaves is reported at the next wait), runs
//! the timers only when their `timerfd` went off and looks for commands only when the bell rang,
//! so a packet's turn touches nothing else (nor reads the router's deadline again: only the
//! timers and the commands move it), and a lone packet's or datagram's turn goes back to wait
//! right after its send or write: a worker woken on the same CPU (the other tunnel end, the
//! pod) waits for that. The router is asked for output only after steps that may have made
//! some, and after datagrams under the lock their handling already held. A dropped
//! shutdown sender or a closed command channel means the daemon is gone: the driver stops.
//!
//! Latency: when the TUN device woke the worker its packets are served first, and the packets
//! the wake-up read leave before the read that finds the queue empty; the timer (a `timerfd`
//! in `epoll`, one `Sleep` in the async driver) is set only when the router's deadline moves,
//! and a worker in `epoll` looks at neither the timers nor the commands for a packet's turn.
//! So a lone packet (a ping) goes from the wake-up to its send with nothing else in between.
//! Sparse traffic (one packet per wake-up, [`LONE_GAP`] or more apart) skips that read
//! altogether: the queue is taken for empty until `epoll` says otherwise, so a ping costs one
//! read, not two. The other way, a receive that did not fill every buffer found the socket
//! empty, so its packets are written to the TUN device before another receive is tried; and a
//! lone datagram ([`LONE_GAP`] or more after the last turn that received one, which got one
//! buffer) is taken with one plain `recvmsg` (no batch's message headers set up, no receive
//! that finds the socket empty) and the socket taken for empty until `epoll` says otherwise.
//! The socket is registered for reading only, so a send's datagram leaving its buffer does not
//! wake the worker again (module `udp`).
//!
//! # Batches
//!
//! TUN → network: a read takes packets from the device (with TUN offloads one read is a 64 KB
//! segment, split into packets of the MTU); the router encapsulates each into one shared buffer,
//! back to back; runs of datagrams to one destination with one length then leave in one GSO
//! send each (`UDP_SEGMENT`), or one by one. Network → TUN: a receive takes up to
//! [`udp::RX_BATCH`] buffers with `recvmmsg`, each one datagram or, with `UDP_GRO`, a run of
//! them; the router decapsulates each datagram straight into a slot of the TUN batch, which is
//! written at the end, coalesced into large segments where the device takes them. Nothing is
//! allocated per packet. Commands from the daemon (status, peer changes) arrive on a channel;
//! shutdown on a watch.
//!
//! The TUN device and the UDP socket sit behind [`TunIo`] and [`UdpIo`] (modules `tun` and `udp`);
//! the real ones are [`Tun`] (a non-blocking `tun_rs::SyncDevice` queue) and [`Udp`] (quinn-udp),
//! and [`channel`] has in-memory ones so the driver is tested without root.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};
use weft_config::Offload;

pub use self::poll::{Bell, Watched};
pub use self::tun::{
    MAX_SPLIT, OFFSET, Packets, SLOTS, Tun, TunIo, TunWait, is_fatal, open_tun, open_tun_queues,
};
pub use self::udp::{
    BoundUdp, Datagrams, MAX_GSO_BYTES, RX_BATCH, Udp, UdpIo, UdpWait, bind_udp, bind_udp_workers,
};
pub use self::workers::spawn;

use self::poll::Poller;
use crate::{
    DropReason, Drops, Event, NetAction, PeerConfig, PeerError, PeerId, PeerStatus, Router,
    TunAction,
};

pub mod channel;
mod poll;
mod tun;
mod udp;
mod workers;

/// TUN reads (and UDP receives) per turn, with batching, before the driver serves its other
/// inputs.
pub const BATCH: usize = 64;
/// Datagrams one turn hands the router, with batching, before the driver serves its other
/// inputs; a turn's TUN packets are bounded by the batch's [`SLOTS`].
pub const TURN_PACKETS: usize = SLOTS;
/// Commands served per turn.
pub const TURN_COMMANDS: usize = 16;
/// A TUN wake-up at least this long after the end of the last turn that read a packet, reading
/// one lone packet while the last turn found the queue empty after its first read, is sparse
/// traffic (a ping, a request): the queue is taken for empty without a read to see it. Likewise
/// for the socket: a receive this long after the last turn that received, when the last
/// receive got one buffer, takes one buffer with a plain `recvmsg`. Under load `epoll` returns
/// at once after each turn, well within this, however long the turns.
pub const LONE_GAP: Duration = Duration::from_millis(1);
/// The shared buffer the router encapsulates a batch into.
const NET_OUT: usize = 512 << 10;
/// How far the timer is set when the router has no deadline.
const IDLE: Duration = Duration::from_secs(3600);
/// Room the router needs for one packet out: the largest packet plus WireGuard's overhead.
const ONE_OUT: usize = 65_536 + 64;

/// What the daemon can ask of the driver.
#[derive(Debug)]
pub enum Command {
    /// A snapshot of the router.
    Status(oneshot::Sender<Snapshot>),
    /// Adds a peer.
    AddPeer(PeerConfig, oneshot::Sender<Result<PeerId, PeerError>>),
    /// Removes a peer.
    RemovePeer(PeerId),
    /// Starts a handshake with a peer now.
    Connect(PeerId),
    /// Sends a peer a handshake initiation at other addresses ([`crate::Router::probe`]).
    Probe(PeerId, Vec<SocketAddr>),
    /// Points a peer at a new endpoint, its session kept.
    SetEndpoint {
        /// The peer.
        id: PeerId,
        /// Its endpoint when the caller looked: nothing changes if it moved since.
        from: SocketAddr,
        /// The new endpoint.
        to: SocketAddr,
    },
    /// Routes these prefixes to a peer in place of its own, its session kept
    /// ([`crate::Router::set_allowed_ips`]).
    SetAllowedIps(
        PeerId,
        Vec<ipnet::IpNet>,
        oneshot::Sender<Result<(), PeerError>>,
    ),
}

/// The router's state at one instant.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// This node's public key.
    pub public_key: [u8; 32],
    /// Every peer.
    pub peers: Vec<PeerStatus>,
    /// Drops not attributable to a peer.
    pub drops: Drops,
    /// Errors sending to the network (unreachable, buffer full), counted rather than fatal.
    pub send_errors: u64,
    /// TUN writes that failed (the kernel refused a packet, out of memory), counted rather than
    /// fatal: each lost its packets, at least one (a coalesced write holds several).
    pub tun_write_errors: u64,
    /// Each data-path worker's packets, by worker number.
    pub workers: Vec<WorkerCounters>,
    /// Send turns taken over from a worker that held one past [`crate::HOLD_LIMIT`]
    /// ([`Router::takeovers`]).
    pub send_turn_takeovers: u64,
}

impl Snapshot {
    /// The data path's own losses by drop reason, those that happened (sends the network
    /// refused, TUN writes the kernel refused): reported beside [`drops`](Self::drops) by the
    /// status and the metrics alike.
    pub fn io_drops(&self) -> impl Iterator<Item = (&'static str, u64)> {
        [
            ("send_error", self.send_errors),
            ("tun_write_error", self.tun_write_errors),
        ]
        .into_iter()
        .filter(|&(_, n)| n > 0)
    }
}

/// The router as the data-path workers share it: packets go through under a read lock, for a
/// batch at a time (each peer's session has its own lock inside); commands, timers and queued
/// output take the write lock. No system call is made with either held.
pub type SharedRouter = Arc<RwLock<Router>>;

/// The shared router for packets. A worker that panicked while holding a lock left nothing
/// half-done that matters (each input leaves the router consistent), so its lock is taken over.
fn read(router: &SharedRouter) -> RwLockReadGuard<'_, Router> {
    router.read().unwrap_or_else(PoisonError::into_inner)
}

/// The shared router for commands, timers and queued output.
fn write(router: &SharedRouter) -> RwLockWriteGuard<'_, Router> {
    router.write().unwrap_or_else(PoisonError::into_inner)
}

/// What the workers count: I/O errors (counted rather than fatal) and each worker's packets.
#[derive(Debug)]
pub struct IoCounters {
    /// Datagrams that could not be sent (unreachable, buffer full).
    send: AtomicU64,
    /// TUN reads the device layer could not split.
    tun: AtomicU64,
    /// TUN writes that failed.
    tun_write: AtomicU64,
    /// Per worker: packets read from its TUN queue, datagrams received on its socket.
    workers: Vec<[AtomicU64; 2]>,
}

impl IoCounters {
    /// Counters for `n` workers.
    pub fn new(n: usize) -> Self {
        Self {
            send: AtomicU64::new(0),
            tun: AtomicU64::new(0),
            tun_write: AtomicU64::new(0),
            workers: (0..n.max(1)).map(|_| Default::default()).collect(),
        }
    }

    fn count(&self, worker: usize, from_network: bool, n: usize) {
        if let Some(w) = self.workers.get(worker) {
            w[usize::from(from_network)].fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Each worker's counts, by worker number.
    pub fn snapshot(&self) -> Vec<WorkerCounters> {
        self.workers
            .iter()
            .map(|[tun, net]| WorkerCounters {
                tun_packets: tun.load(Ordering::Relaxed),
                datagrams: net.load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// One data-path worker's share of the traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerCounters {
    /// Packets it read from its TUN queue.
    pub tun_packets: u64,
    /// Datagrams it received on its UDP socket.
    pub datagrams: u64,
}

/// One data-path worker: its TUN queue, its UDP socket, its buffers, and the shared router.
pub struct Driver<T = Tun, U = Udp> {
    router: SharedRouter,
    errors: Arc<IoCounters>,
    /// This worker's number; worker 0 also serves commands and runs the timers.
    worker: usize,
    tun: T,
    udp: U,
    offload: Offload,
    /// The socket is IPv6 (dual-stack): IPv4 destinations are sent as mapped addresses.
    udp_v6: bool,
    /// Packets read from the device.
    tun_in: Packets,
    /// The last turn's first TUN read was all the queue held, and not a full batch (a ping, a
    /// request, a short response): the next turn sends what its first read gets before reading
    /// again (if at all: [`LONE_GAP`]). Under load reads come back to back and are sent
    /// together.
    tun_sparse: bool,
    /// This turn read a TUN packet.
    read_tun: bool,
    /// When the TUN queue counts as quiet: [`LONE_GAP`] after the last turn that read a
    /// packet ended; `None` before the first (quiet). Measured from the end of that turn, so
    /// the gap is how long the queue stayed quiet, whatever a turn's own length: under load
    /// `epoll` returns at once and the gap is near nothing, however slow each turn is. Kept as
    /// the instant rather than the turn's end so that each check is a comparison.
    quiet_tun: Option<Instant>,
    /// This turn received a datagram.
    read_udp: bool,
    /// As `quiet_tun`, for the socket, from the last turn that received a datagram: a receive
    /// from then on, when the last filled one buffer, takes one buffer with the cheapest
    /// receive there is.
    quiet_udp: Option<Instant>,
    /// [`LONE_GAP`], or another gap in tests.
    lone_gap: Duration,
    /// Packets for the device.
    tun_out: Packets,
    /// Datagrams received.
    udp_in: Datagrams,
    /// Encapsulated datagrams of one batch, back to back, and where each is.
    net_out: Vec<u8>,
    pending: Vec<Out>,
    /// Peers whose send turn this worker holds: it encrypted for them and has not sent yet.
    held: Vec<PeerId>,
    /// The only worker on its router: nothing else encrypts for its peers, so it neither
    /// takes send turns ([`Router::handle_tun_packet`]) nor has any to give back.
    alone: bool,
    /// The router's events, logged once its lock is released.
    events: Vec<Event>,
    /// The datagrams' handling left the router with output (asked under the batch's own read
    /// lock): the turn flushes it. A data message makes none, and then no lock is taken to
    /// find that out after its write.
    output: bool,
    start: Instant,
    /// The time the clock was last read: at the start of each turn, then by each step.
    now: Instant,
    /// The clock's reading at the start of this turn: how long the TUN queue and the socket
    /// stayed quiet before it ([`LONE_GAP`]) is measured to it, not to a later step's reading
    /// (this turn's own work is no quiet).
    woke_at: Instant,
    /// `now` was read at the turn's start and no step has used it yet: the first step (the
    /// packet that woke the worker) takes it rather than reading the clock again.
    fresh: bool,
    /// A turn ran the timers or served commands, the only steps that move the router's
    /// deadline: the worker in `epoll` reads the deadline again before its next wait, and not
    /// after the other turns (a packet's).
    deadline_moved: bool,
}

/// What woke a worker, and so what its turn looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Woke {
    /// The TUN queue: its packets are served first.
    tun: bool,
    /// The TUN queue may hold packets though it did not wake the worker: it is served after
    /// the socket. Only the async driver's wake-ups set it: a worker in `epoll` is told when
    /// the queue is readable.
    tun_later: bool,
    /// The socket may hold datagrams: it is served.
    udp: bool,
    /// The router's deadline may have passed: the timers are run if it has.
    timers: bool,
    /// The bell rang: commands may be waiting.
    commands: bool,
}

impl Woke {
    /// The async driver's wake-up: the turn looks at every source, as the async driver knows
    /// no more than which future finished first.
    fn any(tun: bool) -> Self {
        Self {
            tun,
            tun_later: !tun,
            udp: true,
            timers: true,
            commands: true,
        }
    }
}

/// Whether the driver goes on after a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    Continue,
    /// The daemon is gone.
    Stop,
}

/// One datagram in `net_out`.
#[derive(Debug, Clone, Copy)]
struct Out {
    to: SocketAddr,
    at: usize,
    len: usize,
}

impl<T, U> std::fmt::Debug for Driver<T, U> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("router", &self.router)
            .finish_non_exhaustive()
    }
}

#[expect(
    clippy::disallowed_methods,
    reason = "the driver is where the clock is read"
)]
fn clock() -> Instant {
    Instant::now()
}

/// Runs of datagrams that can leave in one send each: same destination, back to back in the
/// buffer, every one as long as the first but the last, which may be shorter; at most `max`
/// datagrams and [`MAX_GSO_BYTES`]. Yields (destination, start, end, segment).
fn runs(pending: &[Out], max: usize) -> impl Iterator<Item = (SocketAddr, usize, usize, usize)> {
    let mut i = 0;
    std::iter::from_fn(move || {
        let first = *pending.get(i)?;
        let mut end = first.at + first.len;
        let mut j = i + 1;
        while let Some(next) = pending.get(j) {
            if j - i >= max
                || next.to != first.to
                || next.at != end
                || next.len > first.len
                || end + next.len - first.at > MAX_GSO_BYTES
            {
                break;
            }
            end += next.len;
            j += 1;
            if next.len < first.len {
                break;
            }
        }
        i = j;
        Some((first.to, first.at, end, first.len))
    })
}

impl<T: TunWait, U: UdpWait> Driver<T, U> {
    /// Runs a single worker (see [`serve`](Self::serve)) and returns the router.
    pub async fn run(
        mut self,
        commands: mpsc::Receiver<Command>,
        shutdown: watch::Receiver<bool>,
    ) -> io::Result<Router> {
        self.serve(Some(commands), shutdown).await?;
        let Self { router, .. } = self;
        unshare(router)
    }

    /// Serves until `shutdown` turns true (or its sender is dropped), the daemon goes away (its
    /// command channel closed) or the TUN device fails. The worker with `commands` serves them
    /// and runs the router's timers, so that they run once however many workers there are.
    ///
    /// Each wake-up is followed by one turn (see the module docs, "Turns") that serves every
    /// source with bounded work, whichever woke the worker, so that none can starve the others.
    pub async fn serve(
        &mut self,
        mut commands: Option<mpsc::Receiver<Command>>,
        mut shutdown: watch::Receiver<bool>,
    ) -> io::Result<()> {
        info!(worker = self.worker, udp = %self.udp.local_addr()?, "data plane running");
        // One timer for the router's deadline, moved only when the deadline moves (or it
        // fired): not a new one on the timer wheel at every wake-up.
        let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(clock() + IDLE));
        tokio::pin!(sleep);
        let (mut armed, mut fired) = (None, false);
        loop {
            let deadline = match commands {
                Some(_) => read(&self.router).poll_timeout(),
                None => None,
            };
            if fired || deadline != armed {
                let at = deadline.unwrap_or_else(|| clock() + IDLE);
                sleep.as_mut().reset(tokio::time::Instant::from_std(at));
                (armed, fired) = (deadline, false);
            }
            // Only waits for one source to be ready; the turn below serves them all.
            let woke = tokio::select! {
                biased;
                r = shutdown.changed() => {
                    if r.is_err() || *shutdown.borrow() {
                        break;
                    }
                    Woke::any(false)
                }
                cmd = next_command(&mut commands) => match cmd {
                    Some(cmd) => {
                        self.command(cmd);
                        // Its output now: the turn only flushes after commands it serves.
                        self.flush().await;
                        Woke::any(false)
                    }
                    None => break,
                },
                r = self.tun.recv(&mut self.tun_in) => {
                    self.tun_result(r)?;
                    Woke::any(true)
                }
                r = self.udp.recv(&mut self.udp_in) => {
                    udp_result(r);
                    Woke::any(false)
                }
                () = &mut sleep => {
                    fired = true;
                    Woke::any(false)
                }
            };
            if self.turn(commands.as_mut(), woke).await? == Turn::Stop {
                break;
            }
        }
        info!(worker = self.worker, "data plane stopped");
        Ok(())
    }
}

impl<T: TunIo + Watched, U: UdpIo + Watched> Driver<T, U> {
    /// Serves as [`serve`](Self::serve) does, over the real devices, on the calling thread:
    /// waits in the worker's own `epoll` (module `poll`) rather than in an async runtime, so
    /// that a packet's wake-up leads straight to its turn. Commands are looked at when `bell`
    /// rings (ring it after queuing each); the worker stops when `stop` is true (checked at
    /// every wake-up; ring the bell after setting it), when the daemon is gone (its command
    /// channel closed, seen at the next ring: ring after closing it) or when the TUN device
    /// fails.
    pub fn serve_blocking(
        &mut self,
        mut commands: Option<mpsc::Receiver<Command>>,
        bell: &Bell,
        stop: &AtomicBool,
    ) -> io::Result<()> {
        info!(worker = self.worker, udp = %self.udp.local_addr()?, "data plane running");
        let mut poller = Poller::new(&self.tun, &self.udp, bell)?;
        let mut deadline = None;
        self.deadline_moved = true;
        while !stop.load(Ordering::Acquire) {
            if commands.is_some() && std::mem::take(&mut self.deadline_moved) {
                deadline = read(&self.router).poll_timeout();
            }
            let ready = poller.wait(bell, deadline, clock)?;
            if stop.load(Ordering::Acquire) {
                break;
            }
            if ready.tun {
                self.tun.set_ready();
            }
            if ready.udp {
                self.udp.set_ready();
            }
            // The timers only when their `timerfd` went off, the commands only when the bell
            // rang (each command rings it once it is queued): a packet's turn looks at neither.
            // Likewise the TUN queue and the socket only when `epoll` reports them (it is
            // level-triggered: whatever a turn leaves queued is reported at the next wait), so
            // a hop's turn ends right after its packet's write or send.
            let woke = Woke {
                tun: ready.tun,
                tun_later: false,
                udp: ready.udp,
                timers: ready.due,
                commands: ready.rung,
            };
            if finish(self.turn(commands.as_mut(), woke))? == Turn::Stop {
                break;
            }
            // A turn serves a bounded share of the commands, and the bell rang once for all of
            // them: the rest are served at once, not at the next packet or tick. A closed
            // channel rings again too: the turn that served the last share may not have seen
            // it close (its last ring heard with the others), and only a ring has it seen.
            if ready.rung
                && commands
                    .as_ref()
                    .is_some_and(|c| !c.is_empty() || c.is_closed())
            {
                bell.ring();
            }
        }
        info!(worker = self.worker, "data plane stopped");
        Ok(())
    }
}

impl<T: TunIo, U: UdpIo> Driver<T, U> {
    /// A single worker around a router, an open TUN device and a bound UDP socket, using the
    /// batching `offload` allows (the kernel offloads are the device's and the socket's own).
    pub fn new(router: Router, tun: T, udp: U, offload: Offload) -> io::Result<Self> {
        let shared = Arc::new(RwLock::new(router));
        Self::worker(0, shared, Arc::new(IoCounters::new(1)), tun, udp, offload)
    }

    /// Worker `worker` of several sharing `router` and `errors`, over its own TUN queue and UDP
    /// socket. `errors` counts for every worker on `router` ([`IoCounters::new`]): counted for
    /// one, the worker is alone and takes no send turns.
    pub fn worker(
        worker: usize,
        router: SharedRouter,
        errors: Arc<IoCounters>,
        tun: T,
        udp: U,
        offload: Offload,
    ) -> io::Result<Self> {
        let udp_v6 = udp.local_addr()?.is_ipv6();
        let rx = if offload.udp_batch { RX_BATCH } else { 1 };
        let now = clock();
        let alone = errors.workers.len() == 1;
        Ok(Self {
            router,
            errors,
            worker,
            tun,
            udp,
            offload,
            udp_v6,
            tun_in: Packets::new(),
            tun_sparse: true,
            read_tun: false,
            quiet_tun: None,
            read_udp: false,
            quiet_udp: None,
            lone_gap: LONE_GAP,
            tun_out: Packets::new(),
            udp_in: Datagrams::new(rx),
            net_out: vec![0; NET_OUT + ONE_OUT],
            pending: Vec::with_capacity(SLOTS),
            held: Vec::with_capacity(SLOTS),
            alone,
            events: Vec::new(),
            output: false,
            start: now,
            now,
            woke_at: now,
            fresh: false,
            deadline_moved: true,
        })
    }

    /// One turn: TUN packets first when they woke the worker (a ping's packet leaves before
    /// anything else is looked at); then the timers if due (the commands' worker only, when
    /// `woke` says they may be); datagrams (those the wake-up received and, with batching, up
    /// to [`TURN_PACKETS`] more) when the socket may hold some; TUN packets (likewise up to a
    /// batch) when the queue may hold some and was not served first; up to [`TURN_COMMANDS`]
    /// commands (when `woke` says some may wait). No source gets more than its share before
    /// the next is served.
    ///
    /// The clock is read once at the start, and that reading serves the first step and the
    /// [`LONE_GAP`] checks (and once at the end of a turn that read a TUN packet or received a
    /// datagram, for the next turn's checks); the router's output is
    /// flushed by each step that may have made some (the timers, the datagrams, the commands),
    /// and not looked for otherwise: TUN packets make none ([`Router::handle_tun_packet`]).
    /// Each step that makes output sends it itself, on whichever worker, so none waits for
    /// another worker's turn.
    async fn turn(
        &mut self,
        commands: Option<&mut mpsc::Receiver<Command>>,
        woke: Woke,
    ) -> io::Result<Turn> {
        self.now = clock();
        self.woke_at = self.now;
        self.fresh = true;
        if woke.tun {
            self.serve_tun().await?;
        }
        let now = self.now;
        if commands.is_some()
            && woke.timers
            && read(&self.router).poll_timeout().is_some_and(|t| t <= now)
        {
            write(&self.router).handle_timeout(now);
            self.deadline_moved = true;
            self.flush().await;
        }
        if woke.udp {
            self.serve_udp().await;
        }
        if woke.tun_later {
            self.serve_tun().await?;
        }
        if let Some(commands) = commands.filter(|_| woke.commands) {
            let mut served = 0;
            for _ in 0..TURN_COMMANDS {
                match commands.try_recv() {
                    Ok(cmd) => {
                        self.command(cmd);
                        served += 1;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return Ok(Turn::Stop),
                }
            }
            if served > 0 {
                self.deadline_moved = true;
                self.flush().await;
            }
        }
        let (tun, udp) = (
            std::mem::take(&mut self.read_tun),
            std::mem::take(&mut self.read_udp),
        );
        if tun || udp {
            let quiet = clock().checked_add(self.lone_gap);
            if tun {
                self.quiet_tun = quiet;
            }
            if udp {
                self.quiet_udp = quiet;
            }
        }
        Ok(Turn::Continue)
    }

    /// Sets the gap that makes a wake-up's TUN packet or datagram lone ([`LONE_GAP`]): 0 makes
    /// every sparse one lone; a long one none but the first.
    #[cfg(test)]
    pub(crate) fn set_lone_gap(&mut self, gap: Duration) {
        // Up to a day: the clock can add that to any reading (past what it can add, every
        // packet would count as lone).
        self.lone_gap = gap.min(Duration::from_secs(86_400));
    }

    /// Whether this turn began once the source counted as quiet (`quiet_tun`, `quiet_udp`):
    /// [`LONE_GAP`] or more after its last busy turn, or before it ever had one (`None`, which
    /// a gap too long for the clock to add also gives).
    fn quiet_at(&self, quiet: Option<Instant>) -> bool {
        quiet.is_none_or(|t| self.woke_at >= t)
    }

    /// The time for a step: the turn's reading for its first, the clock's after that.
    fn step_now(&mut self) -> Instant {
        if !std::mem::take(&mut self.fresh) {
            self.now = clock();
        }
        self.now
    }

    /// Network → TUN: the datagrams received, more while they are ready (one receive without
    /// batching, else up to [`TURN_PACKETS`] datagrams), then the TUN batch they filled. A
    /// receive that did not fill every buffer found the socket's queue empty: its packets are
    /// written before the next receive is tried; under load receives come back full and the
    /// TUN batch stays whole. Sparse traffic ([`LONE_GAP`] or more after the last turn that
    /// received, which got one buffer) is received one buffer at a time
    /// ([`UdpIo::try_recv_one`]) with no receive that finds the socket empty: a lone datagram
    /// (a ping's) costs one plain receive and reaches the pod right after it.
    async fn serve_udp(&mut self) {
        let mut drained = !self.udp_in.is_full();
        let mut handled = self.on_datagrams().await;
        let lone = handled == 0 && self.udp_in.is_sparse() && self.quiet_at(self.quiet_udp);
        if lone {
            // Sparse traffic, quiet for a while: one receive of one buffer, and the queue
            // taken for empty (`epoll` reports a datagram still queued at once, and that
            // wake-up, close behind this one, receives in batches again): no more receives.
            match self.udp.try_recv_one(&mut self.udp_in) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                r => udp_result(r),
            }
            handled = self.on_datagrams().await;
        }
        let receives = match (lone, self.offload.udp_batch) {
            (true, _) => 0,
            (false, true) => BATCH,
            (false, false) => 1,
        };
        for _ in 0..receives {
            if handled >= TURN_PACKETS || (!self.offload.udp_batch && handled > 0) {
                break;
            }
            if drained {
                write_batch(&self.tun, &mut self.tun_out, &self.errors).await;
            }
            match self.udp.try_recv(&mut self.udp_in) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                r => udp_result(r),
            }
            drained = !self.udp_in.is_full();
            handled += self.on_datagrams().await;
        }
        write_batch(&self.tun, &mut self.tun_out, &self.errors).await;
        if handled > 0 {
            self.read_udp = true;
        }
        if std::mem::take(&mut self.output) {
            self.flush().await;
        }
    }

    /// TUN → network: the packets the wake-up read (the async driver reads them while it waits,
    /// a worker in `epoll` here), then more while they are ready (without batching, none; else
    /// until the batch is full or [`BATCH`] reads), encapsulated and sent together. When the
    /// last turn found one read's worth (`tun_sparse`), what the wake-up read goes out first:
    /// a lone packet (a ping, a request) leaves before the read that finds the queue empty, not
    /// after it, while under load, where that would cost a send per turn, the batch stays whole.
    /// A lone packet [`LONE_GAP`] or more after the last is not followed by that read at all.
    /// The router is not asked for output afterwards: packets from the device make none.
    async fn serve_tun(&mut self) -> io::Result<()> {
        let reads = if self.offload.udp_batch { BATCH } else { 1 };
        if self.tun_in.is_empty() {
            // A worker waiting in `epoll` is told the queue is readable, not handed a packet:
            // the wake-up's read is done here.
            match self.tun.try_recv(&mut self.tun_in) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                r => self.tun_result(r)?,
            }
        }
        let mut done = 0;
        let first = self.tun_in.len();
        if first > 0 {
            done = 1;
            let lone = self.tun_sparse && first == 1 && self.quiet_at(self.quiet_tun);
            self.read_tun = true;
            if self.tun_sparse {
                self.on_tun_packets().await;
            }
            if lone {
                // Sparse traffic: no read to find the queue empty. `epoll` is level-triggered,
                // so a packet still queued wakes the worker at once, and that wake-up, close
                // behind this one, reads on.
                self.tun.assume_empty();
                return Ok(());
            }
        }
        let mut emptied = false;
        while done < reads && self.tun_in.free() >= MAX_SPLIT {
            match self.tun.try_recv(&mut self.tun_in) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    emptied = true;
                    break;
                }
                r => self.tun_result(r)?,
            }
            done += 1;
        }
        if done > 0 {
            // Sparse only when the queue was seen empty after one read that left room for
            // another: a read that filled the batch is load, however quiet the queue after it
            // (a response of a few segments, a GSO segment of a few, is still sparse).
            self.tun_sparse = done == 1 && emptied && first <= SLOTS - MAX_SPLIT;
        }
        if !self.tun_in.is_empty() {
            self.on_tun_packets().await;
        }
        Ok(())
    }

    /// A read's result: a fatal error stops the driver; a packet the device layer could not
    /// split is counted.
    fn tun_result(&mut self, r: io::Result<()>) -> io::Result<()> {
        match r {
            Ok(()) => Ok(()),
            Err(e) if is_fatal(&e) => Err(e),
            Err(e) => {
                self.errors.tun.fetch_add(1, Ordering::Relaxed);
                debug!(error = %e, "tun read dropped");
                Ok(())
            }
        }
    }

    fn command(&mut self, cmd: Command) {
        let now = clock();
        let mut router = write(&self.router);
        match cmd {
            Command::Status(reply) => {
                let mut drops = router.drops();
                // Segments the device layer could not split.
                let tun = self.errors.tun.load(Ordering::Relaxed);
                drops.add(DropReason::BadInnerPacket, tun);
                let _ = reply.send(Snapshot {
                    public_key: router.public_key(),
                    peers: router.peers(now),
                    drops,
                    send_errors: self.errors.send.load(Ordering::Relaxed),
                    tun_write_errors: self.errors.tun_write.load(Ordering::Relaxed),
                    workers: self.errors.snapshot(),
                    send_turn_takeovers: router.takeovers(),
                });
            }
            Command::AddPeer(config, reply) => {
                let _ = reply.send(router.add_peer(now, config));
            }
            Command::RemovePeer(id) => {
                let _ = router.remove_peer(id);
            }
            Command::Connect(id) => router.connect(id),
            Command::Probe(id, addrs) => router.probe(id, &addrs),
            Command::SetEndpoint { id, from, to } => {
                if !router.move_endpoint(id, from, to) {
                    debug!(peer = %id, %from, %to, "endpoint not moved: the peer roamed since");
                }
            }
            Command::SetAllowedIps(id, nets, reply) => {
                let _ = reply.send(router.set_allowed_ips(id, nets));
            }
        }
    }

    /// Encapsulates the packets read and sends them: the router locked while a buffer's worth
    /// is encapsulated, unlocked while it is sent. A packet for a peer whose send turn another
    /// worker holds ([`Router::handle_tun_packet_as`]) waits: this worker sends (and gives
    /// back) what it holds, lets the other run, and tries again; the router hands a turn held
    /// past [`crate::HOLD_LIMIT`] over, so the wait is bounded. A worker alone takes no turns.
    async fn on_tun_packets(&mut self) {
        let (n, mut i) = (self.tun_in.len(), 0);
        self.errors.count(self.worker, false, n);
        let me = self.worker_id();
        while i < n {
            let now = self.step_now();
            let mut used = 0;
            let mut held_elsewhere = false;
            {
                let router = read(&self.router);
                while i < n && used <= NET_OUT {
                    let packet = self.tun_in.get(i);
                    let out = &mut self.net_out[used..];
                    let action = if self.alone {
                        router.handle_tun_packet(now, packet, out)
                    } else {
                        router.handle_tun_packet_as(me, now, packet, out)
                    };
                    match action {
                        TunAction::Transmit(t) => {
                            self.pending.push(Out {
                                to: t.destination,
                                at: used,
                                len: t.len,
                            });
                            used += t.len;
                            if let Some(peer) = t.peer
                                && !self.alone
                                && self.held.last() != Some(&peer)
                            {
                                self.held.push(peer);
                            }
                        }
                        TunAction::Held(_) => {
                            held_elsewhere = true;
                            break;
                        }
                        TunAction::Queued | TunAction::Dropped(_) => {}
                    }
                    i += 1;
                }
            }
            self.send_pending().await;
            if held_elsewhere {
                // The holder is sending, on another thread (or, in tests, another task on
                // this one): give it the core rather than spin.
                std::thread::yield_now();
                tokio::task::yield_now().await;
            }
        }
        self.tun_in.clear();
    }

    /// This worker's number as the router knows it.
    fn worker_id(&self) -> u16 {
        u16::try_from(self.worker).unwrap_or(u16::MAX)
    }

    /// Gives back the send turns this worker holds (it sent what it encrypted).
    fn release_turns(&mut self) {
        if self.held.is_empty() {
            return;
        }
        self.held.sort_unstable();
        self.held.dedup();
        let me = self.worker_id();
        let router = read(&self.router);
        for peer in self.held.drain(..) {
            router.release(me, peer);
        }
    }

    /// Sends the encapsulated batch, each run of equal datagrams in one send where GSO allows.
    async fn send_pending(&mut self) {
        let max = self.udp.max_segments();
        for (to, start, end, segment) in runs(&self.pending, max) {
            let to = wire_addr(self.udp_v6, to);
            if let Err(e) = self.udp.send(to, &self.net_out[start..end], segment).await {
                let n = (end - start).div_ceil(segment) as u64;
                self.errors.send.fetch_add(n, Ordering::Relaxed);
                debug!(error = %e, %to, "udp send failed");
            }
        }
        self.pending.clear();
        self.release_turns();
    }

    /// Decapsulates the datagrams received into the TUN batch and empties the receive batch;
    /// answers handshakes. The router is locked for each receive buffer (one datagram, or a
    /// GRO run of up to 64), and unlocked to write a full TUN batch or send the answers.
    /// Returns how many datagrams there were.
    async fn on_datagrams(&mut self) -> usize {
        let mut handled = 0;
        for entry in 0..self.udp_in.len() {
            let Some((_, bytes, stride)) = self.udp_in.get(entry) else {
                break;
            };
            if self.tun_out.free() < bytes.len().div_ceil(stride).max(1) {
                write_batch(&self.tun, &mut self.tun_out, &self.errors).await;
            }
            let n = self.decapsulate(entry);
            self.errors.count(self.worker, true, n);
            handled += n;
            if !self.pending.is_empty() {
                self.send_pending().await;
            }
        }
        self.udp_in.clear();
        handled
    }

    /// Decapsulates receive buffer `entry` into the TUN batch; answers go to `pending`.
    fn decapsulate(&mut self, entry: usize) -> usize {
        let now = self.step_now();
        let Some((from, bytes, stride)) = self.udp_in.get(entry) else {
            return 0;
        };
        let router = read(&self.router);
        let (mut handled, mut used) = (0, 0);
        // An empty datagram is still one (and is counted as malformed).
        let empty: &[&[u8]] = if bytes.is_empty() { &[&[]] } else { &[] };
        for datagram in bytes.chunks(stride).chain(empty.iter().copied()) {
            handled += 1;
            let Some(out) = self.tun_out.next_mut() else {
                continue;
            };
            match router.handle_datagram(now, from, datagram, out) {
                NetAction::WriteTun(len) => self.tun_out.commit(len),
                NetAction::Transmit(t) => {
                    let answer = self.tun_out.next_mut().and_then(|b| b.get(..t.len));
                    let room = self.net_out.get_mut(used..used + t.len);
                    if let (Some(answer), Some(room)) = (answer, room) {
                        room.copy_from_slice(answer);
                        self.pending.push(Out {
                            to: t.destination,
                            at: used,
                            len: t.len,
                        });
                        used += t.len;
                    }
                }
                NetAction::Done | NetAction::Dropped(_) => {}
            }
        }
        self.output |= router.has_output();
        handled
    }

    /// Sends everything the router has queued and logs its events; takes the write lock only
    /// when there is something.
    async fn flush(&mut self) {
        while read(&self.router).has_output() {
            let now = self.step_now();
            let mut used = 0;
            {
                let mut router = write(&self.router);
                while used <= NET_OUT {
                    let Some(t) = router.poll_transmit(now, &mut self.net_out[used..]) else {
                        break;
                    };
                    self.pending.push(Out {
                        to: t.destination,
                        at: used,
                        len: t.len,
                    });
                    used += t.len;
                }
                while let Some(event) = router.poll_event() {
                    self.events.push(event);
                }
            }
            // Logged without the lock: a slow log sink must not stall the other workers.
            for event in std::mem::take(&mut self.events) {
                self.log(now, &event);
            }
            self.send_pending().await;
        }
    }

    fn log(&self, now: Instant, event: &Event) {
        let secs = now.saturating_duration_since(self.start).as_secs();
        match *event {
            Event::HandshakeCompleted { peer } => {
                debug!(%peer, uptime_secs = secs, "handshake completed");
            }
            Event::EndpointChanged { peer, endpoint } => {
                info!(%peer, %endpoint, "peer endpoint changed");
            }
            Event::SessionExpired { peer } => warn!(%peer, "session expired"),
        }
    }
}

/// Runs a turn over the real devices to its end on this thread. Their reads never wait and
/// their writes finish before they return (a full socket buffer is waited on inside the send),
/// so a turn is ready at its first poll, but for a yield to a worker holding a peer's send
/// turn, which is ready at the next.
fn finish<F: Future>(turn: F) -> F::Output {
    let mut turn = std::pin::pin!(turn);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(out) = turn.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::yield_now();
    }
}

/// The next command, or never without a command channel (a worker that serves none).
async fn next_command(commands: &mut Option<mpsc::Receiver<Command>>) -> Option<Command> {
    match commands {
        Some(c) => c.recv().await,
        None => std::future::pending().await,
    }
}

/// The router back from the workers, once they have all stopped.
fn unshare(router: SharedRouter) -> io::Result<Router> {
    Arc::try_unwrap(router)
        .map(|m| m.into_inner().unwrap_or_else(PoisonError::into_inner))
        .map_err(|_| io::Error::other("a data-plane worker still holds the router"))
}

/// A receive's result: errors are not fatal (ICMP errors, port unreachable, surface here on
/// Linux).
fn udp_result(r: io::Result<()>) {
    if let Err(e) = r {
        debug!(error = %e, "udp receive error");
    }
}

/// Writes a TUN batch; a failed write loses its packets, as a full queue would, and is counted.
async fn write_batch<T: TunIo>(tun: &T, batch: &mut Packets, errors: &IoCounters) {
    if batch.is_empty() {
        return;
    }
    let packets = batch.len();
    if let Err(e) = tun.send(batch).await {
        errors.tun_write.fetch_add(1, Ordering::Relaxed);
        debug!(error = %e, packets, "tun write failed");
    }
    batch.clear();
}

/// The address to send to: IPv4 as a mapped address on a dual-stack socket.
fn wire_addr(udp_v6: bool, to: SocketAddr) -> SocketAddr {
    match (udp_v6, to.ip()) {
        (true, IpAddr::V4(v4)) => SocketAddr::new(v4.to_ipv6_mapped().into(), to.port()),
        _ => to,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(to: u16, at: usize, len: usize) -> Out {
        Out {
            to: SocketAddr::from(([198, 18, 0, 1], to)),
            at,
            len,
        }
    }

    fn lay(spec: &[(u16, usize)]) -> Vec<Out> {
        let mut at = 0;
        spec.iter()
            .map(|&(to, len)| {
                let o = out(to, at, len);
                at += len;
                o
            })
            .collect()
    }

    /// The data path's own losses are named by reason for the status and the metrics, and a
    /// reason with none is left out.
    #[test]
    fn io_drops_name_send_errors_and_failed_tun_writes_and_leave_out_zeros() {
        let mut snap = Snapshot {
            public_key: [0; 32],
            peers: Vec::new(),
            drops: Drops::default(),
            send_errors: 3,
            tun_write_errors: 0,
            workers: Vec::new(),
            send_turn_takeovers: 0,
        };
        assert_eq!(snap.io_drops().collect::<Vec<_>>(), [("send_error", 3)]);
        snap.tun_write_errors = 2;
        assert_eq!(
            snap.io_drops().collect::<Vec<_>>(),
            [("send_error", 3), ("tun_write_error", 2)]
        );
    }

    #[test]
    fn runs_group_equal_datagrams_to_one_destination() {
        // Three full-size to A, a short one ending the run, then one to B, then two to A.
        let p = lay(&[
            (1, 100),
            (1, 100),
            (1, 100),
            (1, 40),
            (1, 100),
            (2, 100),
            (1, 100),
            (1, 100),
        ]);
        let got: Vec<_> = runs(&p, 64)
            .map(|(to, s, e, seg)| (to.port(), s, e, seg))
            .collect();
        assert_eq!(
            got,
            [
                (1, 0, 340, 100),
                (1, 340, 440, 100),
                (2, 440, 540, 100),
                (1, 540, 740, 100)
            ]
        );
    }

    #[test]
    fn runs_respect_the_segment_limit_and_a_longer_datagram() {
        let p = lay(&[(1, 100), (1, 100), (1, 100), (1, 120), (1, 120)]);
        let got: Vec<_> = runs(&p, 2).map(|(_, s, e, seg)| (s, e, seg)).collect();
        assert_eq!(got, [(0, 200, 100), (200, 300, 100), (300, 540, 120)]);
        let one: Vec<_> = runs(&p, 1).map(|(_, s, e, _)| e - s).collect();
        assert_eq!(one, [100, 100, 100, 120, 120]);
    }

    #[test]
    fn runs_stay_under_the_gso_byte_limit() {
        let p = lay(&vec![(1, 1456); 64]);
        for (_, s, e, _) in runs(&p, 64) {
            assert!(e - s <= MAX_GSO_BYTES, "{}", e - s);
        }
        assert_eq!(
            runs(&p, 64).map(|(_, s, e, _)| e - s).sum::<usize>(),
            64 * 1456
        );
    }
}
