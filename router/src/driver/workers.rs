//! Several data-path workers over one router: each a thread with a single-threaded runtime, its
//! own TUN queue and its own UDP socket (see the crate docs, "Workers"), and a supervisor that
//! stops them all when one stops.

use std::io;
use std::sync::{Arc, RwLock};

use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use weft_config::Offload;

use super::{BoundUdp, Command, Driver, IoCounters, SharedRouter, unshare};
use crate::Router;

/// Runs one worker per pair of TUN queue and UDP socket (the first also serves `commands` and
/// the timers), each on a thread of its own with a single-threaded runtime: a packet's wake-up
/// is that thread leaving `epoll_wait`, with no hand-over between threads. When one worker
/// stops (the daemon gone, its device failed) or `shutdown` turns true, every worker is
/// stopped, and the handle yields the router, or the first worker's error.
pub fn spawn(
    router: Router,
    tuns: Vec<tun_rs::SyncDevice>,
    udps: Vec<BoundUdp>,
    offload: Offload,
    commands: mpsc::Receiver<Command>,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<io::Result<Router>> {
    if tuns.is_empty() || tuns.len() != udps.len() {
        let (t, u) = (tuns.len(), udps.len());
        return tokio::spawn(async move {
            Err(io::Error::other(format!(
                "{t} TUN queues and {u} UDP sockets: each worker needs one of each"
            )))
        });
    }
    let shared: SharedRouter = Arc::new(RwLock::new(router));
    let errors = Arc::new(IoCounters::new(tuns.len()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut set = JoinSet::new();
    let mut commands = Some(commands);
    for (worker, (tun, udp)) in tuns.into_iter().zip(udps).enumerate() {
        let (shared, errors, stop) = (shared.clone(), errors.clone(), stop_rx.clone());
        let commands = commands.take();
        set.spawn_blocking(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let tun = tun_rs::AsyncDevice::new(tun)?;
                let udp = udp.register()?;
                let mut driver = Driver::worker(worker, shared, errors, tun, udp, offload)?;
                driver.serve(commands, stop).await
            })
        });
    }
    tokio::spawn(supervise(set, shared, stop_tx, shutdown))
}

/// Waits for `shutdown` or the first worker to stop, stops the others, and returns the router
/// or the first error.
async fn supervise(
    mut set: JoinSet<io::Result<()>>,
    shared: SharedRouter,
    stop: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<Router> {
    let mut outcome = Ok(());
    tokio::select! {
        () = until_true(&mut shutdown) => {}
        Some(done) = set.join_next() => outcome = flatten(done),
    }
    let _ = stop.send(true);
    while let Some(done) = set.join_next().await {
        let r = flatten(done);
        if outcome.is_ok() {
            outcome = r;
        }
    }
    outcome?;
    unshare(shared)
}

/// Returns once the watch is true or its sender is gone.
async fn until_true(w: &mut watch::Receiver<bool>) {
    while !*w.borrow_and_update() {
        if w.changed().await.is_err() {
            return;
        }
    }
}

fn flatten(r: Result<io::Result<()>, tokio::task::JoinError>) -> io::Result<()> {
    r.map_err(|e| io::Error::other(format!("a data-plane worker failed: {e}")))?
}
