//! Router tests: routing, anti-spoofing, timers and batching on a fake tunnel (`fake`), and the
//! same paths through boringtun's real `Tunn` between two routers (`pairwise`); the driver over
//! in-memory devices (`driver`), and as a worker waiting in `epoll` (`epoll_worker`).

#![allow(
    clippy::disallowed_methods,
    reason = "a test reads the clock once to start its simulated time; the core never does"
)]

#[cfg(feature = "driver")]
mod driver;
#[cfg(feature = "driver")]
pub(crate) mod epoll_worker;
mod fake;
pub(super) mod pairwise;
mod routing;
