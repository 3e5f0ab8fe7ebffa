//! Builders the mesh's tests, the simulations, the fuzz targets and the daemon's tests share
//! (feature `test-util`).

use std::time::Instant;

use crate::membership::Member;
use crate::record::{NodeId, NodeRecord};

/// A record named `name` at `version`, in region eu-west, with addresses of its own
/// (198.18.1.H, 198.19.0.H, H from the name) so that no two test nodes advertise the same one,
/// two pod blocks claimed at 5 and 6, and its LAN trusted. Change the fields a test needs with
/// `NodeRecord { field, ..node_record(name, version) }`.
pub fn node_record(name: &str, version: u64) -> NodeRecord {
    let h = name
        .bytes()
        .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    let host = (h % 250 + 1) as u8;
    NodeRecord {
        version,
        left: false,
        name: name.into(),
        region: Some("eu-west".into()),
        private_address: Some([198, 18, 1, host].into()),
        public_address: Some([198, 19, 0, host].into()),
        mesh_port: 6783,
        router_port: 51820,
        wireguard_key: [9; 32],
        pod_cidrs: vec![
            "100.64.1.0/24".parse().expect("a prefix"),
            "fd00:64:1::/64".parse().expect("a prefix"),
        ],
        claimed_at: vec![5, 6],
        trusted_subnets: vec!["198.18.1.0/24".parse().expect("a prefix")],
        observed: Vec::new(),
        homes: None,
        certificate: None,
    }
}

/// `record` as a member `id` holds it: alive, heard now, at heartbeat 1.
pub fn member(id: NodeId, record: NodeRecord) -> Member {
    #[expect(
        clippy::disallowed_methods,
        reason = "test builders start from a real instant"
    )]
    let now = Instant::now();
    Member {
        id,
        record,
        alive: true,
        heartbeat: 1,
        last_heard: now,
    }
}
