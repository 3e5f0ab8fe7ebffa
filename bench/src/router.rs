//! `weft-bench router`: the router core alone, with criterion. Two [`Router`]s complete a
//! WireGuard handshake in memory; then per-packet encapsulation and decapsulation of 1420-byte
//! packets (WireGuard and plaintext paths) and a longest-prefix lookup among 10 000 prefixes are
//! timed. No sockets, no TUN: this is the ceiling the drivers work towards.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use criterion::{BatchSize, Criterion, Throughput};
use weft_router::testing::{ip, peer_config};
use weft_router::x25519::{PublicKey, StaticSecret};
use weft_router::{NetAction, PathKind, PeerConfig, PrefixTable, Router, TunAction, test_packet};

const PACKET: usize = 1420;
const A: &str = "198.18.0.1:51820";
const B: &str = "198.18.0.2:51820";

fn peer(key: &StaticSecret, endpoint: &str, allowed: &str, path: PathKind) -> PeerConfig {
    PeerConfig {
        path,
        ..peer_config(
            "peer",
            PublicKey::from(key).to_bytes(),
            Some(endpoint),
            &[allowed],
        )
    }
}

/// Two routers with one session between them, `a` → `b`.
struct Pair {
    a: Router,
    b: Router,
    now: Instant,
}

impl Pair {
    fn new(path: PathKind) -> anyhow::Result<Self> {
        #[expect(clippy::disallowed_methods, reason = "the benchmark drives the cores")]
        let now = Instant::now();
        let (ka, kb) = (StaticSecret::from([1; 32]), StaticSecret::from([2; 32]));
        let mut a = Router::new(ka.clone(), 1);
        let mut b = Router::new(kb.clone(), 2);
        a.add_peer(now, peer(&kb, B, "100.64.2.0/24", path))?;
        b.add_peer(now, peer(&ka, A, "100.64.1.0/24", path))?;
        let mut pair = Self { a, b, now };
        if path == PathKind::Encrypted {
            pair.handshake()?;
        }
        Ok(pair)
    }

    /// Runs the handshake over an in-memory wire (bounded).
    fn handshake(&mut self) -> anyhow::Result<()> {
        self.handshake_with(B, "100.64.2.1")
    }

    /// As [`handshake`](Self::handshake), with `b` at `b_at` owning `dst`.
    fn handshake_with(&mut self, b_at: &str, dst: &str) -> anyhow::Result<()> {
        let pkt = test_packet(ip("100.64.1.1"), ip(dst), b"hello");
        let mut out = vec![0u8; 2048];
        let mut wire: Vec<(bool, Vec<u8>)> = Vec::new();
        if let TunAction::Transmit(t) = self.a.handle_tun_packet(self.now, &pkt, &mut out) {
            wire.push((true, out[..t.len].to_vec()));
        }
        while let Some(t) = self.a.poll_transmit(self.now, &mut out) {
            wire.push((true, out[..t.len].to_vec()));
        }
        for _ in 0..20 {
            let Some((from_a, d)) = wire.pop() else {
                break;
            };
            let (to, from) = if from_a {
                (&mut self.b, A)
            } else {
                (&mut self.a, b_at)
            };
            if let NetAction::Transmit(t) =
                to.handle_datagram(self.now, from.parse()?, &d, &mut out)
            {
                wire.push((!from_a, out[..t.len].to_vec()));
            }
            while let Some(t) = to.poll_transmit(self.now, &mut out) {
                wire.push((!from_a, out[..t.len].to_vec()));
            }
        }
        // A data packet must now go straight out and arrive.
        let dgram = self.encapsulate(&pkt, &mut out)?;
        match self
            .b
            .handle_datagram(self.now, A.parse()?, &dgram, &mut out)
        {
            NetAction::WriteTun(_) => Ok(()),
            other => bail!("no session after the handshake: {other:?}"),
        }
    }

    fn encapsulate(&mut self, pkt: &[u8], out: &mut [u8]) -> anyhow::Result<Vec<u8>> {
        encapsulate(&mut self.a, self.now, pkt, out)
    }
}

fn encapsulate(
    a: &mut Router,
    now: Instant,
    pkt: &[u8],
    out: &mut [u8],
) -> anyhow::Result<Vec<u8>> {
    match a.handle_tun_packet(now, pkt, out) {
        TunAction::Transmit(t) => Ok(out[..t.len].to_vec()),
        other => bail!("encapsulate: {other:?}"),
    }
}

/// 10 000 distinct /24s (and a default-free table), and addresses that hit them.
fn table() -> (PrefixTable<u32>, Vec<IpAddr>) {
    let mut t = PrefixTable::default();
    let mut hits = Vec::new();
    for i in 0..10_000u32 {
        // Spread over 100.64.0.0/10: 2^14 /24s, every 1.6th taken.
        let n = i * 16 / 10;
        let base = Ipv4Addr::from(0x6440_0000u32 + (n << 8));
        t.insert(ipnet::IpNet::new(IpAddr::V4(base), 24).expect("prefix"), i);
        hits.push(IpAddr::V4(Ipv4Addr::from(u32::from(base) + 7)));
    }
    (t, hits)
}

/// Runs the benchmarks; returns the Markdown table of mean times per operation.
pub(crate) fn run(measure: Duration) -> anyhow::Result<String> {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(measure)
        .without_plots();
    let mut out = vec![0u8; 2048];
    let payload = vec![0x5au8; PACKET - 28];
    let pkt = test_packet(ip("100.64.1.1"), ip("100.64.2.1"), &payload);
    let mut g = c.benchmark_group("router");
    g.throughput(Throughput::Bytes(PACKET as u64));
    for (name, path) in [
        ("wireguard", PathKind::Encrypted),
        ("plaintext", PathKind::Plaintext),
    ] {
        let pair = Pair::new(path)?;
        let (now, mut a, b) = (pair.now, pair.a, pair.b);
        g.bench_function(format!("encapsulate_{name}"), |bench| {
            bench.iter(|| a.handle_tun_packet(now, &pkt, &mut out));
        });
        let from: SocketAddr = A.parse()?;
        let mut fail = None;
        g.bench_function(format!("decapsulate_{name}"), |bench| {
            bench.iter_batched_ref(
                || encapsulate(&mut a, now, &pkt, &mut [0u8; 2048]).unwrap_or_default(),
                |d| {
                    let r = b.handle_datagram(now, from, d, &mut out);
                    if !matches!(r, NetAction::WriteTun(_)) {
                        fail = Some(r);
                    }
                },
                BatchSize::SmallInput,
            );
        });
        if let Some(r) = fail {
            bail!("decapsulate_{name} did not deliver: {r:?}");
        }
    }
    g.finish();
    let (t, hits) = table();
    let mut g = c.benchmark_group("router");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("lookup_10000_prefixes", |bench| {
        bench.iter(|| {
            i = (i + 7919) % hits.len();
            t.lookup(hits[i])
        });
    });
    g.finish();
    c.final_summary();

    let mut md = String::from("| operation | mean time | per second |\n|---|---:|---:|\n");
    for name in [
        "encapsulate_wireguard",
        "decapsulate_wireguard",
        "encapsulate_plaintext",
        "decapsulate_plaintext",
        "lookup_10000_prefixes",
    ] {
        let ns = estimate_ns(name)?;
        let rate = if name.starts_with("lookup") {
            format!("{:.1} M lookups", 1e3 / ns)
        } else {
            format!(
                "{:.2} Mpps, {:.1} Gbit/s",
                1e3 / ns,
                PACKET as f64 * 8.0 / ns
            )
        };
        let _ = writeln!(md, "| {name} ({PACKET} B) | {ns:.0} ns | {rate} |");
    }
    Ok(md.replace(
        "lookup_10000_prefixes (1420 B)",
        "lookup among 10 000 prefixes",
    ))
}

/// Encrypted 1420-byte packets per second with `workers` threads at once, each with a session
/// of its own (the sharded design: no state shared between workers), for `measure`.
fn encrypt_rate(workers: usize, measure: Duration) -> anyhow::Result<f64> {
    let start = std::sync::Barrier::new(workers);
    let payload = vec![0x5au8; PACKET - 28];
    let pkt = test_packet(ip("100.64.1.1"), ip("100.64.2.1"), &payload);
    let counts = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| -> anyhow::Result<u64> {
                    let pair = Pair::new(PathKind::Encrypted)?;
                    let mut out = vec![0u8; 2048];
                    start.wait();
                    #[expect(clippy::disallowed_methods, reason = "the benchmark times itself")]
                    let began = Instant::now();
                    let mut sent = 0u64;
                    // Bounded by time, checked every 256 packets.
                    while began.elapsed() < measure {
                        for _ in 0..256 {
                            if !matches!(
                                pair.a.handle_tun_packet(pair.now, &pkt, &mut out),
                                TunAction::Transmit(_)
                            ) {
                                bail!("a packet was not encrypted");
                            }
                        }
                        sent += 256;
                    }
                    Ok(sent)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("a worker panicked"))?)
            .collect::<anyhow::Result<Vec<u64>>>()
    })?;
    Ok(counts.iter().sum::<u64>() as f64 / measure.as_secs_f64())
}

/// A router with `n` peers, each with a session: peer `i` at 198.18.0.`2+i` owns
/// 100.64.`2+i`.0/24.
fn router_with_peers(n: usize) -> anyhow::Result<(Router, Instant)> {
    #[expect(clippy::disallowed_methods, reason = "the benchmark drives the cores")]
    let now = Instant::now();
    let ka = StaticSecret::from([1; 32]);
    let mut a = Router::new(ka.clone(), 1);
    for i in 0..n {
        let kb = StaticSecret::from([2 + i as u8; 32]);
        let (at, block) = (format!("198.18.0.{}:51820", 2 + i), 2 + i);
        let mut b = Router::new(kb.clone(), 2 + i as u32);
        a.add_peer(
            now,
            peer(
                &kb,
                &at,
                &format!("100.64.{block}.0/24"),
                PathKind::Encrypted,
            ),
        )?;
        b.add_peer(now, peer(&ka, A, "100.64.1.0/24", PathKind::Encrypted))?;
        let mut pair = Pair { a, b, now };
        pair.handshake_with(&at, &format!("100.64.{block}.1"))?;
        a = pair.a;
    }
    Ok((a, now))
}

/// Packets per second `workers` threads encrypt through one router shared as the daemon's
/// workers share it: each takes the read lock for a batch of [`SHARED_BATCH`] packets, and
/// worker `i` sends to peer `i` (each peer's session has its own lock).
fn encrypt_rate_shared(workers: usize, measure: Duration) -> anyhow::Result<f64> {
    let start = std::sync::Barrier::new(workers);
    let payload = vec![0x5au8; PACKET - 28];
    let (router, now) = router_with_peers(workers)?;
    let router = std::sync::RwLock::new(router);
    let counts = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|i| {
                let (start, router, payload) = (&start, &router, &payload);
                s.spawn(move || -> anyhow::Result<u64> {
                    let dst = ip(&format!("100.64.{}.1", 2 + i));
                    let pkt = test_packet(ip("100.64.1.1"), dst, payload);
                    let mut out = vec![0u8; 2048];
                    start.wait();
                    #[expect(clippy::disallowed_methods, reason = "the benchmark times itself")]
                    let began = Instant::now();
                    let mut sent = 0u64;
                    // Bounded by time, checked every batch.
                    while began.elapsed() < measure {
                        let r = router
                            .read()
                            .map_err(|_| anyhow::anyhow!("a worker panicked"))?;
                        for _ in 0..SHARED_BATCH {
                            if !matches!(
                                r.handle_tun_packet(now, &pkt, &mut out),
                                TunAction::Transmit(_)
                            ) {
                                bail!("a packet was not encrypted");
                            }
                        }
                        drop(r);
                        sent += SHARED_BATCH as u64;
                    }
                    Ok(sent)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("a worker panicked"))?)
            .collect::<anyhow::Result<Vec<u64>>>()
    })?;
    Ok(counts.iter().sum::<u64>() as f64 / measure.as_secs_f64())
}

/// Packets a daemon worker encrypts per lock of the shared router (a TUN batch).
const SHARED_BATCH: usize = 64;

/// The median of `reps` runs of `rate`.
fn median(reps: usize, rate: impl Fn() -> anyhow::Result<f64>) -> anyhow::Result<f64> {
    let mut rates = (0..reps.max(1))
        .map(|_| rate())
        .collect::<anyhow::Result<Vec<f64>>>()?;
    rates.sort_by(f64::total_cmp);
    Ok(rates[rates.len() / 2])
}

/// The table of encryption rates with each number of `workers` (median of `reps` runs of
/// `measure`), and each rate against one worker's: with a session per worker (sharded), and
/// through one router shared behind a mutex (as the daemon runs today).
pub(crate) fn scaling(workers: &[usize], measure: Duration, reps: usize) -> anyhow::Result<String> {
    let mut md = String::from(
        "| workers | sharded: packets/s (median) | Gbit/s | vs 1 worker | shared router: packets/s (median) | Gbit/s | vs 1 worker |\n|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let (mut one, mut one_shared) = (None, None);
    let gbits = |pps: f64| pps * PACKET as f64 * 8.0 / 1e9;
    for &w in workers {
        let sharded = median(reps, || encrypt_rate(w, measure))?;
        let shared = median(reps, || encrypt_rate_shared(w, measure))?;
        let base = *one.get_or_insert(if w == 1 { sharded } else { f64::NAN });
        let base_shared = *one_shared.get_or_insert(if w == 1 { shared } else { f64::NAN });
        let _ = writeln!(
            md,
            "| {w} | {sharded:.0} | {:.2} | {:.2}× | {shared:.0} | {:.2} | {:.2}× |",
            gbits(sharded),
            sharded / base,
            gbits(shared),
            shared / base_shared
        );
    }
    Ok(md)
}

/// The mean estimate criterion saved for `router/<name>`, in ns.
fn estimate_ns(name: &str) -> anyhow::Result<f64> {
    let dir = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || {
            std::env::current_exe()
                .ok()
                .and_then(|e| Some(e.parent()?.parent()?.to_path_buf()))
                .unwrap_or_else(|| "target".into())
        },
        Into::into,
    );
    let path = dir
        .join("criterion")
        .join("router")
        .join(name)
        .join("new")
        .join("estimates.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading criterion's {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    v["mean"]["point_estimate"]
        .as_f64()
        .with_context(|| format!("no mean in {}", path.display()))
}
