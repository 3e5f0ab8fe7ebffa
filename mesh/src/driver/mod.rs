//! The tokio driver: owns the gossip listener and connections and the [`Membership`], moves
//! frames between them, and decides nothing.
//!
//! Each connection is a task pair (reader, writer) behind the encrypted [`transport`]; the core
//! task `select!`s over their frames, the listener, `sleep_until(poll_timeout)`, commands and
//! shutdown, and drains every `poll_*` after each input. On shutdown it leaves the mesh (a
//! tombstone record pushed to every connection) and gives the writers a moment to flush.
//!
//! Connections not yet proven (an accepted socket before its handshake and its first frame)
//! are capped: [`PENDING_MAX`] in all and [`PENDING_PER_SOURCE`] per source address, beyond which
//! a new socket is closed at once and counted; each pending one costs a few hundred bytes for
//! at most [`transport::HANDSHAKE_TIMEOUT`]. An accept that fails for want of descriptors or
//! memory pauses accepting for [`ACCEPT_BACKOFF`] instead of spinning. Connections past the
//! handshake are capped by the core as each comes up (at most twice
//! [`MeshConfig::max_connections`](crate::MeshConfig::max_connections); the one it closes is
//! dropped here when the core's `poll_close` names it). A proven connection is
//! closed after [`IDLE_TIMEOUT`] of silence, or when one frame takes longer than
//! [`WRITE_TIMEOUT`] to write (a peer that stops reading cannot pin its task).

pub mod transport;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use self::transport::{Received, TransportError, secure};
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
/// Accepted connections still proving the secret, in all.
pub const PENDING_MAX: usize = 64;
/// Accepted connections still proving the secret, per source address.
pub const PENDING_PER_SOURCE: usize = 4;
/// How long accepting pauses after an accept failed for want of descriptors or memory.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(200);
/// A proven connection silent this long is closed (the core sends beats and digests far more
/// often).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest one frame may take to write.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Milliseconds since the epoch: what a record version the driver publishes is stamped with.
fn wall_ms() -> u64 {
    #[expect(
        clippy::disallowed_methods,
        reason = "the driver owns the clock; record versions are the origin's wall clock"
    )]
    let now = std::time::SystemTime::now();
    now.duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

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
    /// Tells a member where its WireGuard datagrams arrive from here
    /// ([`Membership::tell_observed`]).
    TellObserved(NodeId, SocketAddr),
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Update(r) => f.debug_tuple("Update").field(r).finish(),
            Self::Snapshot(_) => f.write_str("Snapshot"),
            Self::Join(a) => f.debug_tuple("Join").field(a).finish(),
            Self::Modify(_) => f.write_str("Modify"),
            Self::TellObserved(id, e) => f.debug_tuple("TellObserved").field(id).field(e).finish(),
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
    /// Accepted connections that completed the Noise handshake but never proved the secret
    /// with a first message (a replayed message 1).
    pub unconfirmed: u64,
    /// Accepted connections closed at once: too many were still proving the secret, in all or
    /// from their source address.
    pub pending_refused: u64,
    /// Connections closed after [`IDLE_TIMEOUT`] of silence or a write slower than
    /// [`WRITE_TIMEOUT`].
    pub timed_out: u64,
}

impl TransportDrops {
    /// Every counter with its label, in the order status lists them.
    pub fn labelled(&self) -> [(&'static str, u64); 6] {
        [
            ("handshake_failed", self.handshake_failed),
            ("undecryptable", self.undecryptable),
            ("write_queue_full", self.write_queue_full),
            ("unconfirmed", self.unconfirmed),
            ("pending_refused", self.pending_refused),
            ("timed_out", self.timed_out),
        ]
    }
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
    /// This node has caught up with a neighbour's state once ([`Membership::synced`]).
    pub synced: bool,
    /// Members held down for an address an established member advertises.
    pub address_clashes: Vec<AddressClash>,
}

enum Incoming {
    /// Up, with the first frame when the peer dialled us (it proved the secret).
    Connected(ConnId, mpsc::Sender<Vec<u8>>, Option<Vec<u8>>),
    Frame(ConnId, Vec<u8>),
    Dropped,
    Closed(ConnId),
    /// Closed for silence or a stuck write.
    TimedOut(ConnId),
    HandshakeFailed(SocketAddr, TransportError),
    /// An accepted connection from this address is no longer pending (proven or failed).
    Settled(IpAddr),
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

    /// Runs until `shutdown` turns true (or its sender is gone); membership events go to
    /// `events`. Each turn waits for one input (shutdown, a command, an accepted socket, a
    /// connection's message, the core's timer, the record refresh), hands it to the core, then
    /// drains the core's outputs (frames, dials, closes, events).
    pub async fn run(
        self,
        mut commands: mpsc::Receiver<Command>,
        events: mpsc::UnboundedSender<Event>,
        mut shutdown: watch::Receiver<bool>,
    ) -> io::Result<Membership> {
        let (in_tx, mut in_rx) = mpsc::channel::<Incoming>(1024);
        let refresh = self.mesh.config.record_refresh;
        let mut r = Running {
            mesh: self.mesh,
            secret: self.secret,
            in_tx,
            writers: HashMap::new(),
            tasks: JoinSet::new(),
            next_conn: 1,
            transport: TransportDrops::default(),
            traffic: Traffic::default(),
            pending: HashMap::new(),
            refresh,
            next_refresh: clock() + refresh,
        };
        let listener = self.listener;
        info!(listen = %listener.local_addr()?, node = %r.mesh.id(), "mesh running");
        loop {
            let deadline = r.mesh.poll_timeout().map(tokio::time::Instant::from_std);
            let far = tokio::time::Instant::from_std(clock()) + Duration::from_secs(3600);
            tokio::select! {
                biased;
                // A dropped sender means stop too: read as "no change", its arm would be
                // ready forever and, biased first, starve every other.
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
                Some(cmd) = commands.recv() => r.command(cmd),
                accepted = listener.accept() => r.accepted(accepted).await,
                Some(msg) = in_rx.recv() => r.incoming(msg),
                () = tokio::time::sleep_until(deadline.unwrap_or(far)) => r.mesh.handle_timeout(clock()),
                () = tokio::time::sleep_until(tokio::time::Instant::from_std(r.next_refresh)) => r.publish(None),
                Some(_) = r.tasks.join_next(), if !r.tasks.is_empty() => {}
            }
            r.drain(&events);
        }
        Ok(r.goodbye().await)
    }
}

/// The driver while it runs: the core and everything around it.
struct Running {
    mesh: Membership,
    secret: [u8; 32],
    in_tx: mpsc::Sender<Incoming>,
    writers: HashMap<ConnId, mpsc::Sender<Vec<u8>>>,
    /// Every connection's tasks (and dials).
    tasks: JoinSet<()>,
    next_conn: u64,
    transport: TransportDrops,
    traffic: Traffic,
    /// Accepted connections still proving the secret, by source address.
    pending: HashMap<IpAddr, usize>,
    refresh: Duration,
    next_refresh: Instant,
}

impl Running {
    /// A command from the daemon.
    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Update(record) => {
                // The caller's version, as given (the core raises it past the current one).
                self.mesh.update(record);
                self.next_refresh = clock() + self.refresh;
            }
            Command::Join(peers) => self.mesh.join(&peers),
            Command::Modify(change) => {
                let mut record = self.mesh.record().clone();
                change(&mut record);
                if record != *self.mesh.record() {
                    self.publish(Some(record));
                }
            }
            Command::Snapshot(reply) => {
                let _ = reply.send(self.snapshot());
            }
            Command::TellObserved(to, endpoint) => {
                let _ = self.mesh.tell_observed(to, endpoint, wall_ms());
            }
        }
    }

    /// Publishes `record` (or, on the refresh, the current one) as a new version stamped with
    /// the wall clock, and restarts the refresh period.
    fn publish(&mut self, record: Option<NodeRecord>) {
        let mut record = record.unwrap_or_else(|| self.mesh.record().clone());
        record.version = record.version.max(wall_ms());
        self.mesh.update(record);
        self.next_refresh = clock() + self.refresh;
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            me: self.mesh.id(),
            record: self.mesh.record().clone(),
            members: self.mesh.members(),
            drops: self.mesh.drops(),
            transport: self.transport,
            connections: self.mesh.connections(),
            traffic: self.traffic,
            identity_clash: self.mesh.identity_clash(),
            synced: self.mesh.synced(),
            address_clashes: self.mesh.address_clashes(),
        }
    }

    /// An accepted socket: refused at once beyond the pending caps, else handed to a
    /// connection task to prove the secret. An accept that failed for want of descriptors or
    /// memory pauses accepting.
    async fn accepted(&mut self, accepted: io::Result<(TcpStream, SocketAddr)>) {
        match accepted {
            Ok((stream, from)) => {
                let total: usize = self.pending.values().sum();
                let mine = self.pending.get(&from.ip()).copied().unwrap_or(0);
                if total >= PENDING_MAX || mine >= PENDING_PER_SOURCE {
                    self.transport.pending_refused += 1;
                    debug!(%from, pending = total, "gossip connection refused: too many still proving the secret");
                    drop(stream);
                    return;
                }
                self.pending.insert(from.ip(), mine + 1);
                let id = self.conn_id();
                let (secret, in_tx) = (self.secret, self.in_tx.clone());
                self.tasks
                    .spawn(connection(id, stream, from, secret, false, in_tx));
            }
            Err(e) => {
                warn!(error = %e, pause = ?ACCEPT_BACKOFF, "gossip accept failed");
                if matches!(
                    e.raw_os_error(),
                    Some(
                        libc_errno::EMFILE
                            | libc_errno::ENFILE
                            | libc_errno::ENOBUFS
                            | libc_errno::ENOMEM
                    )
                ) {
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    }

    fn conn_id(&mut self) -> ConnId {
        let id = ConnId(self.next_conn);
        self.next_conn += 1;
        id
    }

    /// A message from a connection task.
    fn incoming(&mut self, msg: Incoming) {
        match msg {
            Incoming::Connected(id, w, first) => {
                self.writers.insert(id, w);
                self.mesh.handle_connected(clock(), id);
                if let Some(f) = first {
                    self.frame(id, &f);
                }
            }
            Incoming::Settled(ip) => {
                if let Some(n) = self.pending.get_mut(&ip) {
                    *n -= 1;
                    if *n == 0 {
                        self.pending.remove(&ip);
                    }
                }
            }
            Incoming::TimedOut(id) => {
                self.transport.timed_out += 1;
                self.writers.remove(&id);
                self.mesh.handle_disconnected(id);
            }
            Incoming::Frame(id, f) => self.frame(id, &f),
            Incoming::Dropped => self.transport.undecryptable += 1,
            Incoming::Closed(id) => {
                self.writers.remove(&id);
                self.mesh.handle_disconnected(id);
            }
            Incoming::HandshakeFailed(addr, e) => {
                if matches!(e, TransportError::Unconfirmed) {
                    self.transport.unconfirmed += 1;
                } else {
                    self.transport.handshake_failed += 1;
                }
                debug!(%addr, error = %e, "gossip handshake failed");
            }
        }
    }

    fn frame(&mut self, id: ConnId, f: &[u8]) {
        self.traffic.frames_received += 1;
        self.traffic.bytes_received += f.len() as u64;
        self.mesh.handle_frame(clock(), id, f);
    }

    /// Everything the core wants done after an input: frames to write, addresses to dial,
    /// connections to close, events for the daemon.
    fn drain(&mut self, events: &mpsc::UnboundedSender<Event>) {
        while let Some(t) = self.mesh.poll_transmit() {
            if let Some(w) = self.writers.get(&t.conn) {
                let len = t.frame.len() as u64;
                if w.try_send(t.frame).is_ok() {
                    self.traffic.frames_sent += 1;
                    self.traffic.bytes_sent += len;
                } else {
                    self.transport.write_queue_full += 1;
                }
            }
        }
        while let Some(addr) = self.mesh.poll_dial() {
            let id = self.conn_id();
            let (secret, in_tx) = (self.secret, self.in_tx.clone());
            self.tasks.spawn(async move {
                match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                    Ok(Ok(stream)) => connection(id, stream, addr, secret, true, in_tx).await,
                    Ok(Err(e)) => debug!(%addr, error = %e, "gossip dial failed"),
                    Err(_) => debug!(%addr, "gossip dial timed out"),
                }
            });
        }
        while let Some(id) = self.mesh.poll_close() {
            self.writers.remove(&id);
        }
        while let Some(e) = self.mesh.poll_event() {
            let _ = events.send(e);
        }
    }

    /// Leaves the mesh: the tombstone goes to every connection, then the writers get a moment
    /// to flush it.
    async fn goodbye(mut self) -> Membership {
        self.mesh.leave();
        while let Some(t) = self.mesh.poll_transmit() {
            if let Some(w) = self.writers.get(&t.conn) {
                let _ = w.try_send(t.frame);
            }
        }
        drop(self.writers);
        let tasks = &mut self.tasks;
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
        self.tasks.abort_all();
        info!("mesh stopped");
        self.mesh
    }
}

/// One connection: the handshake (and, accepted, the peer's proof), then a reader loop and a
/// writer task.
async fn connection(
    id: ConnId,
    stream: TcpStream,
    addr: SocketAddr,
    secret: [u8; 32],
    initiator: bool,
    incoming: mpsc::Sender<Incoming>,
) {
    let secured = secure(stream, &secret, initiator, MAX_FRAME).await;
    if !initiator {
        let _ = incoming.send(Incoming::Settled(addr.ip())).await;
    }
    let secured = match secured {
        Ok(s) => s,
        Err(e) => {
            let _ = incoming.send(Incoming::HandshakeFailed(addr, e)).await;
            return;
        }
    };
    let (mut reader, mut writer) = (secured.reader, secured.writer);
    let (wtx, mut wrx) = mpsc::channel::<Vec<u8>>(WRITE_QUEUE);
    if incoming
        .send(Incoming::Connected(id, wtx, secured.first))
        .await
        .is_err()
    {
        return;
    }
    debug!(?id, %addr, initiator, "gossip connection up");
    // Each half ends with whether it gave up on a timeout.
    let write = async move {
        while let Some(frame) = wrx.recv().await {
            match tokio::time::timeout(WRITE_TIMEOUT, writer.send(&frame)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return false,
                Err(_) => return true,
            }
        }
        writer.shutdown().await;
        false
    };
    let read = async {
        loop {
            match tokio::time::timeout(IDLE_TIMEOUT, reader.recv(MAX_FRAME)).await {
                Ok(Ok(Received::Frame(f))) => {
                    if incoming.send(Incoming::Frame(id, f)).await.is_err() {
                        return false;
                    }
                }
                Ok(Ok(Received::Dropped)) => {
                    let _ = incoming.send(Incoming::Dropped).await;
                }
                Ok(Err(_)) => return false,
                Err(_) => return true,
            }
        }
    };
    // The connection ends when either side ends: the peer closed, the core dropped us, or a
    // timeout.
    let timed_out = tokio::select! {
        t = write => t,
        t = read => t,
    };
    let end = if timed_out {
        Incoming::TimedOut(id)
    } else {
        Incoming::Closed(id)
    };
    let _ = incoming.send(end).await;
    debug!(?id, %addr, timed_out, "gossip connection closed");
}

/// The errno values of a failed accept that mean "out of descriptors or memory".
mod libc_errno {
    pub(super) const ENOMEM: i32 = 12;
    pub(super) const ENFILE: i32 = 23;
    pub(super) const EMFILE: i32 = 24;
    pub(super) const ENOBUFS: i32 = 105;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::record;
    use crate::{Identity, MeshConfig};

    /// A driver of one node on a loopback listener, with `secret`.
    async fn driver(secret: [u8; 32]) -> MeshDriver {
        let mesh = Membership::new(
            clock(),
            Identity::from_wireguard_key(&[1; 32]),
            record("n1", 1),
            MeshConfig::default(),
            1,
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        MeshDriver::new(mesh, listener, secret)
    }

    #[tokio::test]
    async fn an_update_keeps_its_version_and_a_modify_is_stamped_with_the_clock() {
        let driver = driver([7; 32]).await;
        let (commands, rx) = mpsc::channel(4);
        let (events, _ev) = mpsc::unbounded_channel();
        let (_stop, shutdown) = watch::channel(false);
        tokio::spawn(driver.run(rx, events, shutdown));
        let snapshot = || async {
            let (reply, answer) = oneshot::channel();
            commands.send(Command::Snapshot(reply)).await.unwrap();
            answer.await.unwrap()
        };
        let mut r = snapshot().await.record;
        r.version = 5;
        commands.send(Command::Update(r)).await.unwrap();
        assert_eq!(snapshot().await.record.version, 5);
        let before = wall_ms();
        commands
            .send(Command::Modify(Box::new(|r| r.mesh_port = 7000)))
            .await
            .unwrap();
        let after = snapshot().await.record;
        assert_eq!(after.mesh_port, 7000);
        assert!(after.version >= before, "{} < {before}", after.version);
    }

    #[tokio::test]
    async fn the_driver_ends_when_the_shutdown_sender_is_dropped() {
        let driver = driver([7; 32]).await;
        let (_commands, rx) = mpsc::channel(1);
        let (events, _ev) = mpsc::unbounded_channel();
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(driver.run(rx, events, shutdown));
        drop(stop);
        let ended = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the driver ends once the daemon's sender is gone (before, it spun)")
            .unwrap();
        assert!(ended.is_ok());
    }

    #[tokio::test]
    async fn the_drivers_debug_form_never_shows_the_cluster_secret() {
        let driver = driver([0xa5; 32]).await;
        let shown = format!("{driver:?} {driver:#?}");
        // The secret as Debug shows bytes (decimal), as hex, or as base64.
        for needle in ["165, 165", "a5a5", "A5A5", "paWl"] {
            assert!(!shown.contains(needle), "{needle:?} in {shown}");
        }
        // Pretty-printed, each byte is a line of its own. Matching the whole
        // line keeps a listener port such as 38165 from looking like one.
        let byte_line = shown.lines().find(|line| line.trim() == "165,");
        assert_eq!(byte_line, None, "a secret byte in {shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }
}
