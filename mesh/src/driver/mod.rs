//! The tokio driver: owns the gossip listener and connections and the [`Membership`], moves
//! frames between them, and decides nothing.
//!
//! Each connection is a task pair (reader, writer) behind the encrypted [`transport`]; the core
//! task `select!`s over their frames, the listener, `sleep_until(poll_timeout)`, commands and
//! shutdown, and drains every `poll_*` after each input. On shutdown it leaves the mesh (a
//! tombstone record pushed to every connection) and gives the writers a moment to flush.

pub mod transport;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use self::transport::{Received, secure};
use crate::wire::MAX_FRAME;
use crate::{
    AddressClash, ConnId, Drops, Event, IdentityClash, Member, Membership, NodeId, NodeRecord,
};

/// Frames queued per connection before new ones are dropped (anti-entropy repairs the loss).
const WRITE_QUEUE: usize = 256;
/// How long a dial may take to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long shutdown waits for the goodbye to be written.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// What the daemon can ask of the mesh.
pub enum Command {
    /// Replaces this node's record.
    Update(NodeRecord),
    /// A snapshot of the membership.
    Snapshot(oneshot::Sender<Snapshot>),
    /// New bootstrap addresses (dialled now, and whenever no connection is left).
    Join(Vec<SocketAddr>),
    /// Changes some fields of this node's current record (pushed if anything changed). Unlike
    /// [`Command::Update`], two modifications from different tasks never undo each other.
    Modify(Box<dyn FnOnce(&mut NodeRecord) + Send>),
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Update(r) => f.debug_tuple("Update").field(r).finish(),
            Self::Snapshot(_) => f.write_str("Snapshot"),
            Self::Join(a) => f.debug_tuple("Join").field(a).finish(),
            Self::Modify(_) => f.write_str("Modify"),
        }
    }
}

/// Transport-level refusals, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransportDrops {
    /// Connections that did not complete the handshake (no cluster secret, garbage, timeout).
    pub handshake_failed: u64,
    /// Messages that did not decrypt, or frames over the size limit.
    pub undecryptable: u64,
    /// Frames dropped because a connection's write queue was full.
    pub write_queue_full: u64,
}

/// Gossip frames and their bytes (before encryption), both ways.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Frames handed to connections.
    pub frames_sent: u64,
    /// Their bytes.
    pub bytes_sent: u64,
    /// Frames received and decrypted.
    pub frames_received: u64,
    /// Their bytes.
    pub bytes_received: u64,
}

/// The membership at one instant.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// This node.
    pub me: NodeId,
    /// This node's record.
    pub record: NodeRecord,
    /// Every other member ever learned.
    pub members: Vec<Member>,
    /// Frames the core refused.
    pub drops: Drops,
    /// Connections and messages the transport refused.
    pub transport: TransportDrops,
    /// Open gossip connections.
    pub connections: usize,
    /// Gossip sent and received.
    pub traffic: Traffic,
    /// Another daemon with this node's key, once detected.
    pub identity_clash: Option<IdentityClash>,
    /// Members held down for an address an established member advertises.
    pub address_clashes: Vec<AddressClash>,
}

enum Incoming {
    Connected(ConnId, mpsc::Sender<Vec<u8>>),
    Frame(ConnId, Vec<u8>),
    Dropped,
    Closed(ConnId),
    HandshakeFailed(SocketAddr, String),
}

#[expect(
    clippy::disallowed_methods,
    reason = "the driver is where the clock is read"
)]
fn clock() -> Instant {
    Instant::now()
}

/// The gossip driver.
pub struct MeshDriver {
    mesh: Membership,
    listener: TcpListener,
    secret: [u8; 32],
}

/// Shows the core and the listener, never the cluster secret.
impl std::fmt::Debug for MeshDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshDriver")
            .field("mesh", &self.mesh)
            .field("listener", &self.listener)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl MeshDriver {
    /// A driver around a core, a bound listener and the cluster secret.
    pub fn new(mesh: Membership, listener: TcpListener, secret: [u8; 32]) -> Self {
        Self {
            mesh,
            listener,
            secret,
        }
    }

    /// Runs until `shutdown` turns true; membership events go to `events`.
    pub async fn run(
        self,
        mut commands: mpsc::Receiver<Command>,
        events: mpsc::UnboundedSender<Event>,
        mut shutdown: watch::Receiver<bool>,
    ) -> io::Result<Membership> {
        let Self {
            mut mesh,
            listener,
            secret,
        } = self;
        let (in_tx, mut in_rx) = mpsc::channel::<Incoming>(1024);
        let mut writers: HashMap<ConnId, mpsc::Sender<Vec<u8>>> = HashMap::new();
        let mut tasks = JoinSet::new();
        let mut next_conn = 1u64;
        let mut transport = TransportDrops::default();
        let mut traffic = Traffic::default();
        info!(listen = %listener.local_addr()?, node = %mesh.id(), "mesh running");
        loop {
            let deadline = mesh.poll_timeout().map(tokio::time::Instant::from_std);
            let far = tokio::time::Instant::from_std(clock()) + Duration::from_secs(3600);
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        break;
                    }
                }
                Some(cmd) = commands.recv() => match cmd {
                    Command::Update(r) => mesh.update(r),
                    Command::Join(peers) => mesh.join(&peers),
                    Command::Modify(change) => {
                        let mut r = mesh.record().clone();
                        change(&mut r);
                        if r != *mesh.record() {
                            mesh.update(r);
                        }
                    }
                    Command::Snapshot(reply) => {
                        let _ = reply.send(Snapshot {
                            me: mesh.id(),
                            record: mesh.record().clone(),
                            members: mesh.members(),
                            drops: mesh.drops(),
                            transport,
                            connections: mesh.connections(),
                            traffic,
                            identity_clash: mesh.identity_clash(),
                            address_clashes: mesh.address_clashes(),
                        });
                    }
                },
                accepted = listener.accept() => match accepted {
                    Ok((stream, from)) => {
                        let id = ConnId(next_conn);
                        next_conn += 1;
                        tasks.spawn(connection(id, stream, from, secret, false, in_tx.clone()));
                    }
                    Err(e) => warn!(error = %e, "gossip accept failed"),
                },
                Some(msg) = in_rx.recv() => match msg {
                    Incoming::Connected(id, w) => {
                        writers.insert(id, w);
                        mesh.handle_connected(clock(), id);
                    }
                    Incoming::Frame(id, f) => {
                        traffic.frames_received += 1;
                        traffic.bytes_received += f.len() as u64;
                        mesh.handle_frame(clock(), id, &f);
                    }
                    Incoming::Dropped => transport.undecryptable += 1,
                    Incoming::Closed(id) => {
                        writers.remove(&id);
                        mesh.handle_disconnected(id);
                    }
                    Incoming::HandshakeFailed(addr, e) => {
                        transport.handshake_failed += 1;
                        debug!(%addr, error = %e, "gossip handshake failed");
                    }
                },
                () = tokio::time::sleep_until(deadline.unwrap_or(far)) => mesh.handle_timeout(clock()),
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
            while let Some(t) = mesh.poll_transmit() {
                if let Some(w) = writers.get(&t.conn) {
                    let len = t.frame.len() as u64;
                    if w.try_send(t.frame).is_ok() {
                        traffic.frames_sent += 1;
                        traffic.bytes_sent += len;
                    } else {
                        transport.write_queue_full += 1;
                    }
                }
            }
            while let Some(addr) = mesh.poll_dial() {
                let id = ConnId(next_conn);
                next_conn += 1;
                let in_tx = in_tx.clone();
                tasks.spawn(async move {
                    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                        Ok(Ok(stream)) => connection(id, stream, addr, secret, true, in_tx).await,
                        Ok(Err(e)) => debug!(%addr, error = %e, "gossip dial failed"),
                        Err(_) => debug!(%addr, "gossip dial timed out"),
                    }
                });
            }
            while let Some(id) = mesh.poll_close() {
                writers.remove(&id);
            }
            while let Some(e) = mesh.poll_event() {
                let _ = events.send(e);
            }
        }
        // Goodbye: the tombstone goes to every connection, then the writers get to flush it.
        mesh.leave();
        while let Some(t) = mesh.poll_transmit() {
            if let Some(w) = writers.get(&t.conn) {
                let _ = w.try_send(t.frame);
            }
        }
        drop(writers);
        let _ = tokio::time::timeout(FLUSH_TIMEOUT, async {
            while !tasks.is_empty() {
                // Readers end when the peers close; writers as soon as their queue is drained.
                if tokio::time::timeout(Duration::from_millis(200), tasks.join_next())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        })
        .await;
        tasks.abort_all();
        info!("mesh stopped");
        Ok(mesh)
    }
}

/// One connection: the handshake, then a reader loop and a writer task.
async fn connection(
    id: ConnId,
    stream: TcpStream,
    addr: SocketAddr,
    secret: [u8; 32],
    initiator: bool,
    incoming: mpsc::Sender<Incoming>,
) {
    let secured = match secure(stream, &secret, initiator).await {
        Ok(s) => s,
        Err(e) => {
            let _ = incoming
                .send(Incoming::HandshakeFailed(addr, e.to_string()))
                .await;
            return;
        }
    };
    let (mut reader, mut writer) = (secured.reader, secured.writer);
    let (wtx, mut wrx) = mpsc::channel::<Vec<u8>>(WRITE_QUEUE);
    if incoming.send(Incoming::Connected(id, wtx)).await.is_err() {
        return;
    }
    debug!(?id, %addr, initiator, "gossip connection up");
    let write = async move {
        while let Some(frame) = wrx.recv().await {
            if writer.send(&frame).await.is_err() {
                break;
            }
        }
        writer.shutdown().await;
    };
    let read = async {
        loop {
            match reader.recv(MAX_FRAME).await {
                Ok(Received::Frame(f)) => {
                    if incoming.send(Incoming::Frame(id, f)).await.is_err() {
                        break;
                    }
                }
                Ok(Received::Dropped) => {
                    let _ = incoming.send(Incoming::Dropped).await;
                }
                Err(_) => break,
            }
        }
    };
    // The connection ends when either side ends: the peer closed, or the core dropped us.
    tokio::select! {
        () = write => {}
        () = read => {}
    }
    let _ = incoming.send(Incoming::Closed(id)).await;
    debug!(?id, %addr, "gossip connection closed");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::record;
    use crate::{Identity, MeshConfig};

    #[tokio::test]
    async fn the_drivers_debug_form_never_shows_the_cluster_secret() {
        let secret = [0xa5; 32];
        let mesh = Membership::new(
            clock(),
            Identity::from_wireguard_key(&[1; 32]),
            record("n1", 1),
            MeshConfig::default(),
            1,
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let driver = MeshDriver::new(mesh, listener, secret);
        let shown = format!("{driver:?} {driver:#?}");
        // The secret as Debug shows bytes (decimal), as hex, or as base64.
        for needle in ["165, 165", "165,\n", "a5a5", "A5A5", "paWl"] {
            assert!(!shown.contains(needle), "{needle:?} in {shown}");
        }
        assert!(shown.contains("<redacted>"), "{shown}");
    }
}
