//! weft: the daemon wiring and the command-line tools around weft's libraries.
//!
//! The libraries decide: `weft-config` turns a file into typed values, `weft-router` routes and
//! encrypts packets, `weft-mesh` gossips node records, `weft-ipam` settles pod blocks. This crate
//! connects them to the host. The binaries in `src/bin` only parse arguments and call in here.
//!
//! # Layout
//!
//! - [`app`]: `weft run`. `App::build` (checks, binds, installs in an order that leaves the
//!   host unchanged on failure) and `App::run` (tasks, signals, the API, teardown under one
//!   grace period); the reload on SIGHUP. The only module that spawns tasks.
//! - [`plan`] (pure): the config turned into what to install: blocks, addresses, routes,
//!   configured peers.
//! - [`control`]: the reconcile loop (gather, decide, apply), IPAM's side effects and the
//!   Kubernetes loop; its pure parts: [`control::reconcile`] (desired peers, the peer diff),
//!   [`control::blocks`] (this node's blocks), [`control::claims`] (which claims are believed),
//!   [`control::k8s`] (the view of a Node); and [`control::nodesource`], the Node watcher.
//! - [`api`]: the local unix-socket API, [`mod@api::status`] (the report `weft status` prints) and
//!   [`api::metrics`] (Prometheus exposition and `/healthz`).
//! - [`cni`]: the daemon's side of CNI (the conflist, the attachment store) and the
//!   `weft-cni` plugin's protocol.
//! - [`host`]: what touches the host: [`host::netlink`], [`host::masquerade`] (nftables),
//!   [`host::keys`], [`host::files`], [`host::notify`] (systemd), [`host::installed`] (the
//!   guard that undoes what `weft run` installed).
//! - [`demo`]: `weft demo` and [`demo::lab`], the network-namespace lab tests share.
//! - [`handle`] (typed handles to the two drivers) and [`shutdown`] (the stop signal).
//!
//! Rules a reviewer can check with grep (`scripts/test.sh` does): nothing imports `app`
//! (`crate::app` appears only in `src/app/` and `weft::app` only in `src/bin/weft.rs`), only
//! `app` spawns tasks (`tokio::spawn` and `JoinSet` appear in `src/` only under `src/app/`
//! and in tests), and the pure modules ([`plan`], [`control::reconcile`],
//! [`control::blocks`], [`control::claims`], [`control::k8s`]) do not use tokio; and no
//! function is longer than 80 lines.

pub mod api;
pub mod app;
pub mod cni;
pub mod control;
pub mod demo;
pub mod handle;
pub mod host;
pub mod plan;
pub mod relay;
pub mod shutdown;
