//! The daemon's stop signal, as every task it spawns listens for it.
//!
//! One `watch::Sender<bool>` is held by `weft run`; each task holds a [`Shutdown`]. A task
//! stops when `true` is sent *or when the sender is gone*: a closed channel means stop, so a
//! task outlives neither an early return of the daemon nor a panic that dropped the sender.
//! (A bare `watch::Receiver::changed` arm in a `select!` fails at once and forever once the
//! sender is dropped; read as "no change", it turns a loop into a busy one.)

use tokio::sync::watch;

/// A task's view of the daemon's stop signal.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Listens on `rx`.
    pub fn new(rx: watch::Receiver<bool>) -> Self {
        Self(rx)
    }

    /// Whether stop was asked for (`true` sent, or the sender gone).
    pub fn is_stopping(&self) -> bool {
        *self.0.borrow() || self.0.has_changed().is_err()
    }

    /// The receiver, for a library driver that takes one (and reads a closed channel as stop
    /// itself).
    pub fn into_receiver(self) -> watch::Receiver<bool> {
        self.0
    }

    /// Resolves once stop is asked for; at once if it already was. Cancel-safe, so it can be
    /// one arm of a `select!` in a loop.
    pub async fn wait(&mut self) {
        loop {
            if *self.0.borrow_and_update() {
                return;
            }
            if self.0.changed().await.is_err() {
                return;
            }
        }
    }
}

impl From<watch::Receiver<bool>> for Shutdown {
    fn from(rx: watch::Receiver<bool>) -> Self {
        Self::new(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt as _;

    #[tokio::test]
    async fn stop_is_true_sent_or_the_sender_dropped_and_nothing_else() {
        let (tx, rx) = watch::channel(false);
        let mut s = Shutdown::new(rx);
        assert!(!s.is_stopping());
        assert!(s.wait().now_or_never().is_none(), "nothing asked yet");
        tx.send(false).unwrap();
        assert!(s.wait().now_or_never().is_none(), "false is not stop");
        tx.send(true).unwrap();
        assert!(s.is_stopping());
        assert_eq!(s.wait().now_or_never(), Some(()));
        // And it stays stopped for every later wait.
        assert_eq!(s.wait().now_or_never(), Some(()));

        let (tx, rx) = watch::channel(false);
        let mut s = Shutdown::new(rx);
        let clone = s.clone();
        drop(tx);
        assert!(s.is_stopping() && clone.is_stopping());
        assert_eq!(s.wait().now_or_never(), Some(()));
    }

    #[tokio::test]
    async fn a_waiting_task_wakes_when_the_sender_is_dropped() {
        let (tx, rx) = watch::channel(false);
        let mut s = Shutdown::new(rx);
        let task = tokio::spawn(async move { s.wait().await });
        drop(tx);
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("woken")
            .unwrap();
    }
}
