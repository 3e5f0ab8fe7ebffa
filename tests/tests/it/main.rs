//! End-to-end tests: real `weft` daemons in network namespaces (underlay 198.18.0.0/15, pods
//! 100.64.0.0/10), run as root. Build the binaries first: `cargo build --bins`.

mod bad_config;
mod bench_lab;
mod claims;
mod cli;
mod cni;
mod dashboard;
mod demo;
mod deploy;
mod image;
mod interop;
mod ipam;
mod ipam_sim;
mod kubernetes;
mod manifests;
mod mesh;
mod mesh_sim;
mod mesh_sim_trust;
mod mesh_transport;
mod mesh_trust;
mod nat;
mod nodesource;
mod offload;
mod service;
mod standalone;
mod two_nodes;
mod vm;
mod workers;
