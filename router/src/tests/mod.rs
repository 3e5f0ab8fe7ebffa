//! Router tests: routing, anti-spoofing, timers and batching on a fake tunnel (`fake`), and the
//! same paths through boringtun's real `Tunn` between two routers (`pairwise`).

#![allow(
    clippy::disallowed_methods,
    reason = "a test reads the clock once to start its simulated time; the core never does"
)]

#[cfg(feature = "driver")]
mod driver;
mod fake;
mod pairwise;
mod routing;
