//! The daemon's task set: every task it spawns, stopped together under one grace period.
//!
//! Tasks get a [`Shutdown`] from the set; stopping sends `true` once, then waits for all of
//! them against one deadline (not one per task), and aborts and names those still running.
//! Dropping the set (an early return) drops the sender, which every task reads as stop too.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::error;

use crate::shutdown::Shutdown;

/// How long stopping waits for aborted tasks to end.
const ABORT_WAIT: Duration = Duration::from_secs(1);

/// Spawned tasks and their stop signal.
#[derive(Debug)]
pub struct Tasks {
    stop: watch::Sender<bool>,
    set: JoinSet<&'static str>,
}

impl Default for Tasks {
    fn default() -> Self {
        Self {
            stop: watch::channel(false).0,
            set: JoinSet::new(),
        }
    }
}

impl Tasks {
    /// The stop signal, for a task to listen on.
    pub fn shutdown(&self) -> Shutdown {
        Shutdown::new(self.stop.subscribe())
    }

    /// Spawns `task`, known as `name` in the log if it outlives the grace period.
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        self.set.spawn(async move {
            task.await;
            name
        });
    }

    /// Reaps the tasks that have ended (API connections come and go).
    pub fn reap(&mut self) {
        while self.set.try_join_next().is_some() {}
    }

    /// Asks every task to stop and waits for them all, at most `grace` in all; the rest are
    /// aborted and named. Returns how many had to be aborted.
    pub async fn stop(mut self, grace: Duration) -> usize {
        let _ = self.stop.send(true);
        #[expect(
            clippy::disallowed_methods,
            reason = "the app is the driver: it owns the clock"
        )]
        let deadline = tokio::time::Instant::now() + grace;
        while !self.set.is_empty() {
            match tokio::time::timeout_at(deadline, self.set.join_next()).await {
                Ok(Some(Err(e))) if e.is_panic() => error!(error = %e, "a task panicked"),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let left = self.set.len();
        if left > 0 {
            error!(
                tasks = left,
                "tasks did not stop in {grace:?}; aborting them"
            );
            self.set.abort_all();
            // An abort takes effect at the task's next await: one stuck in synchronous code
            // (a hung `nft`, say) never gets there, and the teardown must not wait for it.
            let set = &mut self.set;
            let reaped = tokio::time::timeout(ABORT_WAIT, async {
                while set.join_next().await.is_some() {}
            })
            .await;
            if reaped.is_err() {
                error!(
                    tasks = self.set.len(),
                    "tasks stuck outside an await; stopping without them"
                );
                self.set.detach_all();
            }
        }
        left
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_task_ends_when_the_set_is_dropped_or_stopped() {
        // Dropped: the sender goes with it, and each task reads that as stop.
        let mut tasks = Tasks::default();
        let (done_tx, mut done_rx) = tokio::sync::mpsc::channel(4);
        for name in ["a", "b", "c"] {
            let mut s = tasks.shutdown();
            let done = done_tx.clone();
            tasks.spawn(name, async move {
                s.wait().await;
                let _ = done.send(name).await;
            });
        }
        let JoinSetOnly(set) = JoinSetOnly::from(tasks);
        drop(done_tx);
        let mut ended = Vec::new();
        while let Ok(Some(n)) = tokio::time::timeout(Duration::from_secs(5), done_rx.recv()).await {
            ended.push(n);
        }
        ended.sort_unstable();
        assert_eq!(ended, ["a", "b", "c"]);
        drop(set);

        // Stopped: all end within the one grace period, none aborted.
        let mut tasks = Tasks::default();
        for name in ["x", "y"] {
            let mut s = tasks.shutdown();
            tasks.spawn(name, async move { s.wait().await });
        }
        assert_eq!(tasks.stop(Duration::from_secs(5)).await, 0);

        // A task that ignores the signal is aborted at the deadline, and counted.
        let mut tasks = Tasks::default();
        tasks.spawn("stubborn", std::future::pending());
        assert_eq!(tasks.stop(Duration::from_millis(50)).await, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_task_stuck_outside_an_await_does_not_hold_up_the_stop() {
        let mut tasks = Tasks::default();
        // Synchronous work that an abort cannot interrupt (what a hung child process is to
        // the task that waits for it).
        tasks.spawn("stuck", async {
            std::thread::sleep(Duration::from_secs(3));
        });
        tasks.spawn("fine", std::future::pending());
        let stop = tokio::spawn(tasks.stop(Duration::from_millis(50)));
        let aborted = tokio::time::timeout(Duration::from_millis(2500), stop)
            .await
            .expect("the stop ends within the grace period and the abort wait")
            .expect("the stop itself does not panic");
        assert_eq!(aborted, 2);
    }

    /// The set without its sender: what is left of `Tasks` after an early return dropped it
    /// mid-way (the join set itself keeps the tasks running).
    struct JoinSetOnly(JoinSet<&'static str>);

    impl From<Tasks> for JoinSetOnly {
        fn from(t: Tasks) -> Self {
            let Tasks { stop, set } = t;
            drop(stop);
            Self(set)
        }
    }
}
