//! weft: the daemon wiring and the command-line tools around weft's libraries.
//!
//! The libraries decide: `weft-config` turns a file into typed values, `weft-router` routes and
//! encrypts packets, `weft-mesh` gossips node records, `weft-ipam` settles pod blocks. This crate
//! connects them to the host: [`claims`] (pure: which members' pod-CIDR claims are believed),
//! [`reconcile`] and [`blocks`] (pure: the mesh's view turned into router peers and this node's
//! pod blocks), [`control`] (the loop that applies them), [`keys`] (the 0600 key file and the
//! `genkey`/`pubkey`/`gensecret` tools), [`netlink`] (the TUN device's MTU, addresses and routes),
//! [`app`] (`weft run`: build in an order that leaves the host unchanged on failure, run,
//! teardown; the only module that spawns tasks), [`shutdown`] (the stop signal every task listens for: `true` sent or the sender
//! gone), [`api`] (the local unix-socket API) and [`status`] (the report `weft status`
//! prints). The binaries in `src/bin` only parse arguments and call in here.

pub mod api;
pub mod app;
pub mod blocks;
pub mod claims;
pub mod cni;
pub mod control;
pub mod demo;
pub mod files;
pub mod handle;
pub mod installed;
pub mod k8s;
pub mod keys;
pub mod lab;
pub mod masquerade;
pub mod metrics;
pub mod netlink;
pub mod nodesource;
pub mod notify;
pub mod plan;
pub mod reconcile;
pub mod reload;
pub mod shutdown;
pub mod status;
