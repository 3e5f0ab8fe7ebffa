//! The driver between two in-memory TUN devices and an in-memory network, with real sessions:
//! a packet written by one "kernel" comes out of the other, status answers, shutdown returns.

use std::time::{Duration, Instant};

use boringtun::x25519::{PublicKey, StaticSecret};
use tokio::sync::{mpsc, oneshot, watch};

use crate::driver::channel::{self, Network};
use crate::driver::{Command, Driver};
use crate::packet::test_packet;
use crate::{PathKind, PeerConfig, PeerState, Router};
use weft_config::Offload;

fn router(own: &StaticSecret, peer: &StaticSecret, endpoint: &str, allowed: &str) -> Router {
    let mut r = Router::new(own.clone(), 1);
    let cfg = PeerConfig {
        name: "peer".into(),
        public_key: PublicKey::from(peer).to_bytes(),
        endpoint: Some(endpoint.parse().expect("address")),
        allowed_ips: vec![allowed.parse().expect("prefix")],
        persistent_keepalive: None,
        path: PathKind::Encrypted,
    };
    r.add_peer(Instant::now(), cfg).expect("peer");
    r
}

async fn recv(rx: &mut mpsc::Receiver<Vec<u8>>) -> Vec<u8> {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a packet within 10 s")
        .expect("channel open")
}

#[tokio::test]
async fn packets_cross_between_two_drivers_and_status_and_shutdown_work() {
    two_drivers(Offload::AUTO).await;
}

#[tokio::test]
async fn the_same_holds_with_offload_off() {
    two_drivers(Offload::OFF).await;
}

async fn two_drivers(offload: Offload) {
    let (ka, kb) = (StaticSecret::from([1; 32]), StaticSecret::from([2; 32]));
    let net = Network::default();
    let (tun_a, mut kernel_a) = channel::tun();
    let (tun_b, mut kernel_b) = channel::tun();
    let a = Driver::new(
        router(&ka, &kb, "198.18.1.2:51820", "100.64.2.0/24"),
        tun_a,
        net.bind("198.18.1.1:51820".parse().unwrap()),
        offload,
    )
    .unwrap();
    let b = Driver::new(
        router(&kb, &ka, "198.18.1.1:51820", "100.64.1.0/24"),
        tun_b,
        net.bind("198.18.1.2:51820".parse().unwrap()),
        offload,
    )
    .unwrap();
    let (cmd_a, rx_a) = mpsc::channel(4);
    let (_cmd_b, rx_b) = mpsc::channel(4);
    let (stop, stopped) = watch::channel(false);
    let ha = tokio::spawn(a.run(rx_a, stopped.clone()));
    let hb = tokio::spawn(b.run(rx_b, stopped));

    // A batch of packets; the first waits for the handshake, all arrive in order.
    let packets: Vec<Vec<u8>> = (0..20u8)
        .map(|i| test_packet([100, 64, 1, 1].into(), [100, 64, 2, 1].into(), &[i; 100]))
        .collect();
    for p in &packets {
        kernel_a.tx.send(p.clone()).await.unwrap();
    }
    for p in &packets {
        assert_eq!(&recv(&mut kernel_b.rx).await, p);
    }
    // A burst of mixed sizes, more than one batch and one GSO run: all arrive, byte-exact, in
    // order.
    let burst: Vec<Vec<u8>> = (0..1500u32)
        .map(|i| {
            let len = [1380, 1380, 1380, 40, 700][i as usize % 5];
            let body: Vec<u8> = (0..len).map(|k| (i as usize * 31 + k) as u8).collect();
            test_packet([100, 64, 1, 1].into(), [100, 64, 2, 1].into(), &body)
        })
        .collect();
    let sender = kernel_a.tx.clone();
    let feed = tokio::spawn({
        let burst = burst.clone();
        async move {
            for p in burst {
                sender.send(p).await.unwrap();
            }
        }
    });
    for p in &burst {
        assert_eq!(&recv(&mut kernel_b.rx).await, p);
    }
    feed.await.unwrap();
    let reply = test_packet([100, 64, 2, 1].into(), [100, 64, 1, 1].into(), b"reply");
    kernel_b.tx.send(reply.clone()).await.unwrap();
    assert_eq!(recv(&mut kernel_a.rx).await, reply);

    let (tx, rx) = oneshot::channel();
    cmd_a.send(Command::Status(tx)).await.unwrap();
    let snap = rx.await.unwrap();
    assert_eq!(snap.peers.len(), 1);
    assert_eq!(snap.peers[0].state, PeerState::Up);
    assert_eq!(snap.peers[0].counters.tx_packets, 20 + 1500);
    assert_eq!(snap.peers[0].counters.rx_packets, 1);

    stop.send(true).unwrap();
    let ra = tokio::time::timeout(Duration::from_secs(5), ha)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), hb)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        ra.peers(Instant::now()).len(),
        1,
        "the router comes back on shutdown"
    );
}
