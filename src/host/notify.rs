//! systemd's notify protocol (`Type=notify`): `READY=1` once the TUN device, routes and
//! listeners are up, `STATUS=` lines that say how many peers are routed and up, `WATCHDOG=1` at
//! half the interval systemd asks for (`WATCHDOG_USEC`), and `STOPPING=1` on shutdown. Without
//! `NOTIFY_SOCKET` every call does nothing.

use std::time::Duration;

use tracing::{debug, info, warn};
use weft_router::PeerState;

/// How often the status line is recomputed.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// Sends one notification; a failure is logged, never fatal.
pub fn send(state: sd_notify::NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(false, &[state]) {
        warn!(error = %e, "systemd notification failed");
    }
}

/// The watchdog interval systemd asks for, if any: `WATCHDOG_USEC`, for this process when
/// `WATCHDOG_PID` names one (as `sd_watchdog_enabled(3)` reads them; systemd sets both).
pub fn watchdog() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Keeps `STATUS=` current and pets the watchdog until `shutdown`; the watchdog stops with the
/// data plane, so a wedged daemon is restarted.
pub async fn run(router: crate::handle::RouterHandle, mut shutdown: crate::shutdown::Shutdown) {
    let dog = watchdog();
    if let Some(d) = dog {
        info!(interval = ?d, "systemd watchdog enabled; petting it every half interval");
    }
    let mut pet = tokio::time::interval(dog.map_or(Duration::from_secs(3600), |d| d / 2));
    let mut status = tokio::time::interval(STATUS_EVERY);
    let mut last = String::new();
    loop {
        tokio::select! {
            () = shutdown.wait() => return,
            _ = pet.tick(), if dog.is_some() => {
                // Only a data plane that answers keeps the watchdog quiet.
                if router.snapshot().await.is_some() {
                    send(sd_notify::NotifyState::Watchdog);
                } else {
                    debug!("data plane did not answer; watchdog not petted");
                }
            }
            _ = status.tick() => {
                let Some(snap) = router.snapshot().await else {
                    return;
                };
                let up = snap.peers.iter().filter(|p| p.state == PeerState::Up).count();
                let line = format!("{} peers routed, {up} up", snap.peers.len());
                if line != last {
                    send(sd_notify::NotifyState::Status(&line));
                    last = line;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_status_loop_ends_when_the_shutdown_sender_is_dropped() {
        let (router, _commands) = crate::handle::RouterHandle::channel();
        let (stop, rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(run(router, rx.into()));
        drop(stop);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the status loop ends once the daemon's sender is gone")
            .unwrap();
    }
}
