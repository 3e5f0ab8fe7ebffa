//! Reachability probes: one thread per node, inside its namespace, sends ICMP echo requests
//! from a raw socket of this process to the other nodes' overlay addresses in rotation, so each
//! pair is probed about once per `pair_period`, and records per (source, destination) when the
//! newest answered probe was sent. The requests leave through the node's TUN device (the route
//! to the pod network), so an answer means both daemons carried the pair's traffic both ways.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use weft::demo::lab::{echo_reply, echo_request};

use super::fabric::Fabric;
use super::now;

/// How long each prober waits for answers between its sends.
const TICK: Duration = Duration::from_millis(50);
/// Outstanding probes each prober remembers (by sequence number).
const RING: usize = 4096;

#[derive(Debug)]
struct Shared {
    n: usize,
    targets: RwLock<Vec<Option<Ipv4Addr>>>,
    /// `[src * n + dst]`: when the newest answered probe from src to dst was sent.
    last_ok: Mutex<Vec<Option<Instant>>>,
    stop: AtomicBool,
    sent: AtomicU64,
    answered: AtomicU64,
}

/// The probers.
#[derive(Debug)]
pub(crate) struct Probes {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl Probes {
    /// Starts one prober per node of `fabric`; each pair is probed about every `pair_period`.
    pub(crate) fn start(fabric: &Fabric, pair_period: Duration) -> Self {
        let n = fabric.nodes.len();
        let shared = Arc::new(Shared {
            n,
            targets: RwLock::new(vec![None; n]),
            last_ok: Mutex::new(vec![None; n * n]),
            stop: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            answered: AtomicU64::new(0),
        });
        // Probes per tick so that the n - 1 targets come round once a pair period.
        let per_tick = ((n - 1) as f64 * TICK.as_secs_f64() / pair_period.as_secs_f64())
            .ceil()
            .max(1.0) as usize;
        let threads = (0..n)
            .map(|s| {
                let shared = shared.clone();
                fabric.lab.in_ns(&fabric.nodes[s].daemon.ns, move || {
                    prober(&shared, s, per_tick)
                })
            })
            .collect();
        Self { shared, threads }
    }

    /// Sets node `i`'s overlay address (`None` while it has none).
    pub(crate) fn set_target(&self, i: usize, addr: Option<Ipv4Addr>) {
        if let Ok(mut t) = self.shared.targets.write() {
            t[i] = addr;
        }
    }

    /// When the newest answered probe from `a` to `b` was sent, for every pair (`[a * n + b]`).
    pub(crate) fn last_ok(&self) -> Vec<Option<Instant>> {
        self.shared
            .last_ok
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default()
    }

    /// Probes sent and answered so far.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (
            self.shared.sent.load(Ordering::Relaxed),
            self.shared.answered.load(Ordering::Relaxed),
        )
    }

    /// Stops the probers and reports the first one that failed.
    pub(crate) fn stop(self) -> anyhow::Result<()> {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join()
                .map_err(|_| anyhow::anyhow!("a prober panicked"))??;
        }
        Ok(())
    }
}

/// One node's prober, in its namespace.
fn prober(shared: &Shared, me: usize, per_tick: usize) -> anyhow::Result<()> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))
        .context("opening a raw ICMP socket (needs root)")?;
    sock.set_read_timeout(Some(Duration::from_millis(10)))?;
    let id = 0xc000 | u16::try_from(me).context("node index")?;
    let mut ring: Vec<Option<(u16, usize, Instant)>> = vec![None; RING];
    let (mut seq, mut next) = (0u16, me);
    let mut buf = [0u8; 2048];
    while !shared.stop.load(Ordering::Relaxed) {
        let tick = now();
        for _ in 0..per_tick {
            next = (next + 1) % shared.n;
            if next == me {
                next = (next + 1) % shared.n;
            }
            let target = shared.targets.read().ok().and_then(|t| t[next]);
            let Some(addr) = target else { continue };
            let to = socket2::SockAddr::from(SocketAddrV4::new(addr, 0));
            // No route (this node's daemon is down) is a probe that is not answered.
            if sock.send_to(&echo_request(id, seq), &to).is_ok() {
                ring[usize::from(seq) % RING] = Some((seq, next, now()));
                shared.sent.fetch_add(1, Ordering::Relaxed);
            }
            seq = seq.wrapping_add(1);
        }
        while tick.elapsed() < TICK {
            let Ok(n) = std::io::Read::read(&mut &sock, &mut buf) else {
                continue;
            };
            let Some((from, rid, rseq)) = echo_reply(&buf[..n]) else {
                continue;
            };
            let Some((s, dst, sent)) = ring[usize::from(rseq) % RING] else {
                continue;
            };
            let expected = shared.targets.read().ok().and_then(|t| t[dst]);
            if rid != id || s != rseq || expected != Some(from) {
                continue;
            }
            shared.answered.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut l) = shared.last_ok.lock() {
                let cell = &mut l[me * shared.n + dst];
                if cell.is_none_or(|t| t < sent) {
                    *cell = Some(sent);
                }
            }
        }
    }
    Ok(())
}
