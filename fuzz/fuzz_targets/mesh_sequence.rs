//! Sequences of inputs into one membership state machine: connections opening and closing,
//! raw frames, frames built from validly signed records and beats of a few identities (so the
//! fuzzer reaches the states past the signature checks: restarts, clashes, forgetting), and
//! time passing. Never panics, and after every step: every frame it sends decodes and is under
//! the frame limit, it holds no more members than its cap, and no departed member is alive.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use weft_mesh::wire::MAX_FRAME;
use weft_mesh::{Beat, ConnId, Entry, Frame, Identity, Membership, MeshConfig, NodeRecord};

/// The identities the structured frames speak for; the first is the node's own.
fn identities() -> &'static [Identity] {
    static IDS: OnceLock<Vec<Identity>> = OnceLock::new();
    IDS.get_or_init(|| {
        (0..6u8)
            .map(|i| {
                let mut k = [0x40; 32];
                k[1] = i;
                Identity::from_wireguard_key(&k)
            })
            .collect()
    })
}

fn record(i: u8, version: u64, left: bool, host: u8) -> NodeRecord {
    NodeRecord {
        left,
        region: (host % 3 != 0).then(|| format!("r{}", host % 2)),
        private_address: Some([198, 18, 0, host % 8].into()),
        public_address: (host % 5 != 0).then(|| [198, 19, 0, host % 8].into()),
        wireguard_key: [0; 32],
        pod_cidrs: vec![format!("100.64.{i}.0/24").parse().expect("prefix")],
        claimed_at: vec![u64::from(host)],
        trusted_subnets: vec![],
        ..weft_mesh::testing::node_record(&format!("n{i}"), version)
    }
}

/// Reads the input a byte at a time; zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
}

fuzz_target!(|data: &[u8]| {
    let ids = identities();
    let mut now = Instant::now();
    let config = MeshConfig {
        max_members: 4,
        tombstone_horizon: Duration::from_secs(120),
        ..MeshConfig::default()
    };
    let mut m = Membership::new(now, ids[0].clone(), record(0, 10, false, 1), config, 1);
    let mut input = Input(data);
    for _ in 0..256 {
        if input.0.is_empty() {
            break;
        }
        let conn = ConnId(u64::from(input.byte() % 4));
        match input.byte() % 8 {
            0 => m.handle_connected(now, conn),
            1 => m.handle_disconnected(conn),
            2 => {
                let node = ids[usize::from(input.byte()) % ids.len()].id();
                let hello = Frame::Hello {
                    node,
                    mesh_port: 6783,
                };
                m.handle_frame(now, conn, &hello.encode());
            }
            3 => {
                let n = usize::from(input.byte()) * 4;
                let raw = input.bytes(n).to_vec();
                m.handle_frame(now, conn, &raw);
            }
            4 => {
                let who = input.byte() % 6;
                let version = u64::from(input.byte() % 16);
                let flags = input.byte();
                let r = record(who, version, flags & 1 == 1, flags >> 1);
                let signed = ids[usize::from(who)].sign(&r);
                m.handle_frame(now, conn, &Frame::Records(vec![Ok(signed.into())]).encode());
            }
            5 => {
                let who = usize::from(input.byte()) % ids.len();
                let version = u64::from(input.byte() % 16);
                let heartbeat = u32::from(input.byte());
                let mut beat = Beat::sign(&ids[who], version, heartbeat);
                if input.byte() & 1 == 1 {
                    // Relabelled as another node's.
                    beat.node = ids[(who + 1) % ids.len()].id().short();
                }
                m.handle_frame(now, conn, &Frame::SignedBeats(vec![beat]).encode());
            }
            6 => {
                let entries = (0..input.byte() % 4)
                    .map(|_| Entry {
                        node: ids[usize::from(input.byte()) % ids.len()].id().short(),
                        version: u64::from(input.byte() % 16),
                        heartbeat: u32::from(input.byte()),
                    })
                    .collect();
                let reply = input.byte() & 1 == 1;
                m.handle_frame(now, conn, &Frame::Digest { reply, entries }.encode());
            }
            _ => {
                now += Duration::from_millis(u64::from(input.byte()) * 500);
                m.handle_timeout(now);
            }
        }
        while let Some(t) = m.poll_transmit() {
            assert!(t.frame.len() <= MAX_FRAME, "a frame of {} bytes", t.frame.len());
            assert!(Frame::decode(&t.frame).is_ok(), "an undecodable frame");
        }
        while m.poll_dial().is_some() {}
        while m.poll_close().is_some() {}
        while m.poll_event().is_some() {}
        let members = m.members();
        assert!(members.len() <= 4, "{} members over the cap", members.len());
        assert!(members.iter().all(|x| !(x.alive && x.record.left)));
        assert!(m.poll_timeout().is_some());
    }
});
