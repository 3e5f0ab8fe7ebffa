//! Typed handles to the two drivers: what the rest of the daemon may ask of the data plane
//! ([`RouterHandle`]) and of the gossip mesh ([`MeshHandle`]).
//!
//! A handle is a command channel and nothing else. Every request answers `None` (or `false`)
//! once the driver has stopped, so callers end quietly rather than panic. A node without a mesh
//! holds no [`MeshHandle`] at all (`Option<MeshHandle>`), rather than a channel nobody reads.

use std::net::SocketAddr;

use tokio::sync::{mpsc, oneshot};
use weft_mesh::NodeRecord;
use weft_mesh::driver::{Command as MeshCommand, Snapshot as MeshSnapshot};
use weft_router::driver::{Command as RouterCommand, Snapshot as RouterSnapshot};
use weft_router::{PeerConfig, PeerError, PeerId};

/// Commands queued per driver before a sender waits.
pub const QUEUE: usize = 64;

/// Sends `make(reply)` and waits for the reply; `None` when the driver is gone.
async fn ask<C, T>(tx: &mpsc::Sender<C>, make: impl FnOnce(oneshot::Sender<T>) -> C) -> Option<T> {
    let (reply, rx) = oneshot::channel();
    tx.send(make(reply)).await.ok()?;
    rx.await.ok()
}

/// The router driver, as the daemon's tasks see it.
#[derive(Debug, Clone)]
pub struct RouterHandle {
    tx: mpsc::Sender<RouterCommand>,
}

impl RouterHandle {
    /// A handle and the receiver the router driver reads.
    pub fn channel() -> (Self, mpsc::Receiver<RouterCommand>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (Self { tx }, rx)
    }

    /// The router's snapshot, unless the data plane has stopped.
    pub async fn snapshot(&self) -> Option<RouterSnapshot> {
        ask(&self.tx, RouterCommand::Status).await
    }

    /// Adds a peer: `None` when the data plane has stopped, else the router's answer.
    pub async fn add_peer(&self, config: PeerConfig) -> Option<Result<PeerId, PeerError>> {
        ask(&self.tx, |r| RouterCommand::AddPeer(config, r)).await
    }

    /// Routes `allowed_ips` to a peer in place of its prefixes, its session kept; `None` when
    /// the data plane has stopped.
    pub async fn set_allowed_ips(
        &self,
        id: PeerId,
        allowed_ips: Vec<ipnet::IpNet>,
    ) -> Option<Result<(), PeerError>> {
        ask(&self.tx, |r| {
            RouterCommand::SetAllowedIps(id, allowed_ips, r)
        })
        .await
    }

    /// Removes a peer; false when the data plane has stopped.
    pub async fn remove_peer(&self, id: PeerId) -> bool {
        self.tx.send(RouterCommand::RemovePeer(id)).await.is_ok()
    }

    /// Starts a handshake with a peer now; false when the data plane has stopped.
    pub async fn connect(&self, id: PeerId) -> bool {
        self.tx.send(RouterCommand::Connect(id)).await.is_ok()
    }

    /// Sends a peer a handshake initiation at other addresses than its endpoint; false when
    /// the data plane has stopped.
    pub async fn probe(&self, id: PeerId, addrs: Vec<SocketAddr>) -> bool {
        self.tx.send(RouterCommand::Probe(id, addrs)).await.is_ok()
    }

    /// Points a peer at endpoint `to`, its session kept, if it is still at `from` (where the
    /// caller saw it: a roam since stands); false when the data plane has stopped.
    pub async fn set_endpoint(&self, id: PeerId, from: SocketAddr, to: SocketAddr) -> bool {
        self.tx
            .send(RouterCommand::SetEndpoint { id, from, to })
            .await
            .is_ok()
    }
}

/// The mesh driver, as the daemon's tasks see it.
#[derive(Debug, Clone)]
pub struct MeshHandle {
    tx: mpsc::Sender<MeshCommand>,
}

impl MeshHandle {
    /// A handle and the receiver the mesh driver reads.
    pub fn channel() -> (Self, mpsc::Receiver<MeshCommand>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (Self { tx }, rx)
    }

    /// The mesh's snapshot, unless the mesh has stopped.
    pub async fn snapshot(&self) -> Option<MeshSnapshot> {
        ask(&self.tx, MeshCommand::Snapshot).await
    }

    /// Changes some fields of this node's record; false when the mesh has stopped.
    pub async fn modify(&self, change: impl FnOnce(&mut NodeRecord) + Send + 'static) -> bool {
        self.tx
            .send(MeshCommand::Modify(Box::new(change)))
            .await
            .is_ok()
    }

    /// Tells member `to` where its WireGuard datagrams arrive from here; false when the mesh
    /// has stopped.
    pub async fn tell_observed(&self, to: weft_mesh::NodeId, endpoint: SocketAddr) -> bool {
        self.tx
            .send(MeshCommand::TellObserved(to, endpoint))
            .await
            .is_ok()
    }

    /// New bootstrap addresses; false when the mesh has stopped.
    pub async fn join(&self, peers: Vec<SocketAddr>) -> bool {
        self.tx.send(MeshCommand::Join(peers)).await.is_ok()
    }
}
