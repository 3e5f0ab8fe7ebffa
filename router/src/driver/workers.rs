//! Several data-path workers over one router: each a thread of its own waiting in its own
//! `epoll` ([`Driver::serve_blocking`]), with its own TUN queue and UDP socket (see the crate
//! docs, "Workers"), and a supervisor that stops them all when one stops.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use weft_config::Offload;

use super::{Bell, BoundUdp, Command, Driver, IoCounters, SharedRouter, Tun, Udp, unshare};
use crate::Router;

/// Commands on their way from the daemon to the first worker.
const COMMANDS: usize = 64;

/// What stops the workers: a flag, and each worker's bell to make it look.
#[derive(Debug)]
struct Stop {
    flag: AtomicBool,
    bells: Vec<Arc<Bell>>,
}

/// Stops the workers when dropped: when the supervisor ends, or is dropped with its runtime
/// (a panic, an early return), even before it first ran, the threads do not outlive it.
#[derive(Debug)]
struct StopOnDrop(Arc<Stop>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.now();
    }
}

impl Stop {
    fn now(&self) {
        self.flag.store(true, Ordering::Release);
        for bell in &self.bells {
            bell.ring();
        }
    }
}

/// Runs one worker per pair of TUN queue and UDP socket (the first also serves `commands` and
/// the timers), each on a thread of its own: a packet's wake-up is that thread leaving
/// `epoll_wait`, with no runtime and no hand-over between threads. Commands reach the first
/// worker through a task on the caller's runtime that rings its bell. When one worker stops
/// (the daemon gone, its device failed) or `shutdown` turns true, every worker is stopped, and
/// the handle yields the router, or the first worker's error.
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
    let bells = match (0..tuns.len()).map(|_| Bell::new().map(Arc::new)).collect() {
        Ok(bells) => bells,
        Err(e) => return tokio::spawn(async move { Err(e) }),
    };
    let stop = Arc::new(Stop {
        flag: AtomicBool::new(false),
        bells,
    });
    let shared: SharedRouter = Arc::new(RwLock::new(router));
    let errors = Arc::new(IoCounters::new(tuns.len()));
    let mut set = JoinSet::new();
    let mut commands = Some(forward(commands, Arc::clone(&stop.bells[0])));
    for (worker, (tun, udp)) in tuns.into_iter().zip(udps).enumerate() {
        let (shared, errors, stop) = (shared.clone(), errors.clone(), stop.clone());
        let commands = commands.take();
        set.spawn_blocking(move || {
            let _name = ThreadName::set(&format!("weft-worker-{worker}"));
            let bell = Arc::clone(&stop.bells[worker]);
            let run = || {
                let (tun, udp) = (Tun::new(tun)?, Udp::from(udp));
                let mut driver = Driver::worker(worker, shared, errors, tun, udp, offload)?;
                driver.serve_blocking(commands, &bell, &stop.flag)
            };
            let outcome = run();
            // However it ended, the others stop too.
            stop.now();
            outcome
        });
    }
    tokio::spawn(supervise(set, shared, StopOnDrop(stop), shutdown))
}

/// The calling thread's name (what `top -H`, `ps -L`, `perf` and `/proc/<pid>/task/*/comm` show)
/// while it serves as a worker, given back when it is dropped: the thread is the runtime's,
/// lent for the worker's life. Best effort: a name the kernel refuses leaves the old one.
struct ThreadName(Option<std::ffi::CString>);

impl ThreadName {
    fn set(name: &str) -> Self {
        use nix::sys::prctl;
        let old = prctl::get_name().ok();
        if let Ok(name) = std::ffi::CString::new(name) {
            let _ = prctl::set_name(&name);
        }
        Self(old)
    }
}

impl Drop for ThreadName {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = nix::sys::prctl::set_name(old);
        }
    }
}

/// Hands the daemon's commands on to the first worker, ringing its bell for each; when the
/// daemon's channel closes, closes the worker's and rings once more, so that it stops.
fn forward(mut from: mpsc::Receiver<Command>, bell: Arc<Bell>) -> mpsc::Receiver<Command> {
    let (to, rx) = mpsc::channel(COMMANDS);
    tokio::spawn(async move {
        while let Some(cmd) = from.recv().await {
            if to.send(cmd).await.is_err() {
                return;
            }
            bell.ring();
        }
        drop(to);
        bell.ring();
    });
    rx
}

/// Waits for `shutdown` or the first worker to stop, stops the others, and returns the router
/// or the first error.
async fn supervise(
    mut set: JoinSet<io::Result<()>>,
    shared: SharedRouter,
    stop: StopOnDrop,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<Router> {
    let mut outcome = Ok(());
    tokio::select! {
        () = until_true(&mut shutdown) => {}
        Some(done) = set.join_next() => outcome = flatten(done),
    }
    stop.0.now();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::epoll_worker::quiet;
    use boringtun::x25519::StaticSecret;
    use std::time::Duration;

    #[test]
    fn a_worker_thread_is_named_for_its_life_and_given_its_name_back() {
        let comm = || std::fs::read_to_string("/proc/thread-self/comm").expect("comm");
        let seen = std::thread::Builder::new()
            .name("lent".into())
            .spawn(move || {
                let before = comm();
                let during = {
                    let _name = ThreadName::set("weft-worker-3");
                    comm()
                };
                (before, during, comm())
            })
            .expect("thread")
            .join()
            .expect("no panic");
        assert_eq!(
            seen,
            ("lent\n".into(), "weft-worker-3\n".into(), "lent\n".into())
        );
    }

    /// A router without peers has no deadline: its worker waits for as long as nothing wakes it.
    fn idle_worker(bell: Arc<Bell>, stop: Arc<Stop>, commands: Option<mpsc::Receiver<Command>>) {
        let router = Arc::new(RwLock::new(Router::new(StaticSecret::from([1; 32]), 1)));
        let errors = Arc::new(IoCounters::new(1));
        let mut driver =
            Driver::worker(0, router, errors, quiet(), quiet(), Offload::AUTO).expect("worker");
        driver
            .serve_blocking(commands, &bell, &stop.flag)
            .expect("served");
    }

    fn stop_for(bell: &Arc<Bell>) -> Arc<Stop> {
        Arc::new(Stop {
            flag: AtomicBool::new(false),
            bells: vec![Arc::clone(bell)],
        })
    }

    /// One ring for many commands: a turn serves [`super::super::TURN_COMMANDS`] of them, and
    /// the rest must not wait for a packet or a tick (an idle router has neither).
    #[tokio::test]
    async fn more_commands_than_a_turn_serves_are_all_answered_without_another_wake_up() {
        let bell = Arc::new(Bell::new().expect("eventfd"));
        let stop = stop_for(&bell);
        let (tx, rx) = mpsc::channel(64);
        let mut replies = Vec::new();
        for _ in 0..3 * super::super::TURN_COMMANDS {
            let (reply, answer) = tokio::sync::oneshot::channel();
            tx.try_send(Command::Status(reply)).expect("room");
            replies.push(answer);
        }
        bell.ring();
        let (b, s) = (Arc::clone(&bell), Arc::clone(&stop));
        let worker = std::thread::spawn(move || idle_worker(b, s, Some(rx)));
        let all = tokio::time::timeout(Duration::from_secs(10), async {
            for answer in replies {
                answer.await.expect("answered");
            }
        })
        .await;
        stop.now();
        worker.join().expect("worker");
        assert!(
            all.is_ok(),
            "every command is answered after one ring (before, those past the first turn's \
             share waited for the next wake-up)"
        );
    }

    /// The daemon gone after a turn's exact share of commands: the channel's close comes with
    /// their rings, heard all at once, and the turn that serves the share does not see it. The
    /// worker still stops, at the ring it gives itself for the closed channel. Reviewed: the
    /// closed channel went unseen, and the worker waited on with nothing left to ring it.
    #[test]
    fn a_channel_closed_behind_a_turns_share_of_commands_stops_the_worker() {
        let bell = Arc::new(Bell::new().expect("eventfd"));
        let stop = stop_for(&bell);
        let (tx, rx) = mpsc::channel(64);
        let mut replies = Vec::new();
        for _ in 0..super::super::TURN_COMMANDS {
            let (reply, answer) = tokio::sync::oneshot::channel();
            tx.try_send(Command::Status(reply)).expect("room");
            replies.push(answer);
        }
        drop(tx);
        bell.ring();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let (b, s) = (Arc::clone(&bell), Arc::clone(&stop));
        let worker = std::thread::spawn(move || {
            idle_worker(b, s, Some(rx));
            let _ = done_tx.send(());
        });
        let stopped_alone = done_rx.recv_timeout(Duration::from_secs(10)).is_ok();
        // So that a failure ends the test rather than hanging it on the worker's thread.
        stop.now();
        worker.join().expect("worker");
        assert!(
            stopped_alone,
            "the closed channel stopped the worker, with no stop flag set"
        );
        for mut answer in replies {
            assert!(
                answer.try_recv().is_ok(),
                "every command was answered first"
            );
        }
    }

    /// The supervisor dropped (its runtime gone, say) stops the worker threads: they would
    /// otherwise wait on, and the runtime's shutdown would wait for them.
    #[tokio::test]
    async fn a_dropped_supervisor_stops_its_workers() {
        let bell = Arc::new(Bell::new().expect("eventfd"));
        let stop = stop_for(&bell);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let mut set = JoinSet::new();
        let (b, s) = (Arc::clone(&bell), Arc::clone(&stop));
        set.spawn_blocking(move || {
            let _ = started_tx.send(());
            idle_worker(b, s, None);
            let _ = done_tx.send(());
            Ok(())
        });
        let shared = Arc::new(RwLock::new(Router::new(StaticSecret::from([2; 32]), 2)));
        let (_keep, shutdown) = watch::channel(false);
        let by_hand = Arc::clone(&stop);
        let supervisor = tokio::spawn(supervise(set, shared, StopOnDrop(stop), shutdown));
        let stopped = tokio::task::spawn_blocking(move || {
            started_rx
                .recv_timeout(Duration::from_secs(10))
                .expect("the worker started");
            supervisor.abort();
            done_rx.recv_timeout(Duration::from_secs(10)).is_ok()
        })
        .await
        .expect("join");
        // So that a failure ends the test rather than hanging it on the worker's thread.
        by_hand.now();
        assert!(
            stopped,
            "the worker stopped once its supervisor was dropped"
        );
    }
}
