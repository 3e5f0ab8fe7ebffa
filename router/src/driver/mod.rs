//! The tokio driver: one task that owns the TUN device, the UDP socket and the [`Router`], moves
//! bytes between them in batches, and decides nothing.
//!
//! Each wake-up reads one packet (or datagram) with an await, then as many more as are ready
//! without waiting (up to [`BATCH`]), handing each to the router with the same two buffers; after
//! the batch it drains the router's transmits, timeout and events. Commands from the daemon
//! (status, peer changes) arrive on a channel; shutdown on a watch.
//!
//! The TUN device and the UDP socket sit behind [`TunIo`] and [`UdpIo`]; the real ones are
//! `tun_rs::AsyncDevice` and `tokio::net::UdpSocket`, and [`channel`] has in-memory ones so the
//! driver is tested without root.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::{
    Drops, Event, NetAction, PeerConfig, PeerError, PeerId, PeerStatus, Router, TunAction,
};

/// Packets handled per wake-up before the driver looks at its other inputs.
pub const BATCH: usize = 64;
/// Socket buffer size asked for (the kernel may cap it at `net.core.[rw]mem_max`).
const SOCKET_BUFFER: usize = 4 << 20;
/// Buffer size: the largest datagram and the largest TUN packet plus headroom.
const BUF: usize = 65_536 + 64;

/// What the daemon can ask of the driver.
#[derive(Debug)]
pub enum Command {
    /// A snapshot of the router.
    Status(oneshot::Sender<Snapshot>),
    /// Adds a peer.
    AddPeer(PeerConfig, oneshot::Sender<Result<PeerId, PeerError>>),
    /// Removes a peer.
    RemovePeer(PeerId),
    /// Starts a handshake with a peer now.
    Connect(PeerId),
}

/// The router's state at one instant.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// This node's public key.
    pub public_key: [u8; 32],
    /// Every peer.
    pub peers: Vec<PeerStatus>,
    /// Drops not attributable to a peer.
    pub drops: Drops,
    /// Errors sending to the network (unreachable, buffer full), counted rather than fatal.
    pub send_errors: u64,
}

/// Opens the UDP socket on `port`: dual-stack `[::]` when the host has IPv6, else `0.0.0.0`.
pub fn bind_udp(port: u16) -> io::Result<UdpSocket> {
    let dual = (|| {
        let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
        s.set_only_v6(false)?;
        s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
        Ok::<_, io::Error>(s)
    })();
    let socket = match dual {
        Ok(s) => s,
        Err(e) => {
            debug!(error = %e, "no dual-stack socket; binding IPv4 only");
            let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
            s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
            s
        }
    };
    // Larger buffers absorb bursts; a refusal only costs throughput.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket.into())
}

/// What the driver needs of a TUN device.
pub trait TunIo: Send + Sync + 'static {
    /// Waits for one packet.
    fn recv(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send;
    /// One packet if one is ready, else `WouldBlock`.
    fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one packet.
    fn send(&self, packet: &[u8]) -> impl Future<Output = io::Result<usize>> + Send;
}

/// What the driver needs of a UDP socket.
pub trait UdpIo: Send + Sync + 'static {
    /// Waits for one datagram.
    fn recv_from(
        &self,
        buf: &mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr)>> + Send;
    /// One datagram if one is ready, else `WouldBlock`.
    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)>;
    /// Sends one datagram.
    fn send_to(
        &self,
        datagram: &[u8],
        to: SocketAddr,
    ) -> impl Future<Output = io::Result<usize>> + Send;
    /// The bound address.
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

impl TunIo for tun_rs::AsyncDevice {
    fn recv(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send {
        Self::recv(self, buf)
    }
    fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        Self::try_recv(self, buf)
    }
    fn send(&self, packet: &[u8]) -> impl Future<Output = io::Result<usize>> + Send {
        Self::send(self, packet)
    }
}

impl UdpIo for UdpSocket {
    fn recv_from(
        &self,
        buf: &mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr)>> + Send {
        Self::recv_from(self, buf)
    }
    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        Self::try_recv_from(self, buf)
    }
    fn send_to(
        &self,
        datagram: &[u8],
        to: SocketAddr,
    ) -> impl Future<Output = io::Result<usize>> + Send {
        Self::send_to(self, datagram, to)
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        Self::local_addr(self)
    }
}

/// The driver's I/O and state.
pub struct Driver<T = tun_rs::AsyncDevice, U = UdpSocket> {
    router: Router,
    tun: T,
    udp: U,
    /// The socket is IPv6 (dual-stack): IPv4 destinations are sent as mapped addresses.
    udp_v6: bool,
    tun_buf: Vec<u8>,
    udp_buf: Vec<u8>,
    out_buf: Vec<u8>,
    send_errors: u64,
    start: Instant,
}

impl<T, U> std::fmt::Debug for Driver<T, U> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("router", &self.router)
            .finish_non_exhaustive()
    }
}

#[expect(
    clippy::disallowed_methods,
    reason = "the driver is where the clock is read"
)]
fn clock() -> Instant {
    Instant::now()
}

impl<T: TunIo, U: UdpIo> Driver<T, U> {
    /// A driver around a router, an open TUN device and a bound UDP socket.
    pub fn new(router: Router, tun: T, udp: U) -> io::Result<Self> {
        let udp_v6 = udp.local_addr()?.is_ipv6();
        Ok(Self {
            router,
            tun,
            udp,
            udp_v6,
            tun_buf: vec![0; BUF],
            udp_buf: vec![0; BUF],
            out_buf: vec![0; BUF],
            send_errors: 0,
            start: clock(),
        })
    }

    /// Runs until `shutdown` turns true or the TUN device fails; returns the router.
    pub async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut shutdown: watch::Receiver<bool>,
    ) -> io::Result<Router> {
        info!(udp = %self.udp.local_addr()?, "data plane running");
        loop {
            let deadline = self
                .router
                .poll_timeout()
                .map(tokio::time::Instant::from_std);
            let far = tokio::time::Instant::from_std(clock()) + Duration::from_secs(3600);
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        break;
                    }
                }
                Some(cmd) = commands.recv() => self.command(cmd),
                r = self.tun.recv(&mut self.tun_buf) => {
                    let n = r?;
                    self.on_tun_packet(n).await;
                    for _ in 1..BATCH {
                        match self.tun.try_recv(&mut self.tun_buf) {
                            Ok(n) => self.on_tun_packet(n).await,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) => return Err(e),
                        }
                    }
                }
                r = self.udp.recv_from(&mut self.udp_buf) => {
                    match r {
                        Ok((n, from)) => self.on_datagram(n, from).await,
                        // ICMP errors surface here on Linux (port unreachable); not fatal.
                        Err(e) => debug!(error = %e, "udp receive error"),
                    }
                    for _ in 1..BATCH {
                        match self.udp.try_recv_from(&mut self.udp_buf) {
                            Ok((n, from)) => self.on_datagram(n, from).await,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) => debug!(error = %e, "udp receive error"),
                        }
                    }
                }
                () = tokio::time::sleep_until(deadline.unwrap_or(far)) => {
                    self.router.handle_timeout(clock());
                }
            }
            self.flush().await;
        }
        info!("data plane stopped");
        Ok(self.router)
    }

    fn command(&mut self, cmd: Command) {
        let now = clock();
        match cmd {
            Command::Status(reply) => {
                let _ = reply.send(Snapshot {
                    public_key: self.router.public_key(),
                    peers: self.router.peers(now),
                    drops: *self.router.drops(),
                    send_errors: self.send_errors,
                });
            }
            Command::AddPeer(config, reply) => {
                let _ = reply.send(self.router.add_peer(now, config));
            }
            Command::RemovePeer(id) => {
                let _ = self.router.remove_peer(id);
            }
            Command::Connect(id) => self.router.connect(id),
        }
    }

    async fn on_tun_packet(&mut self, n: usize) {
        let now = clock();
        let action = self
            .router
            .handle_tun_packet(now, &self.tun_buf[..n], &mut self.out_buf);
        if let TunAction::Transmit(t) = action {
            self.send(t.destination, t.len).await;
        }
    }

    async fn on_datagram(&mut self, n: usize, from: SocketAddr) {
        let now = clock();
        match self
            .router
            .handle_datagram(now, from, &self.udp_buf[..n], &mut self.out_buf)
        {
            NetAction::WriteTun(len) => {
                if let Err(e) = self.tun.send(&self.out_buf[..len]).await {
                    debug!(error = %e, "tun write failed");
                }
            }
            NetAction::Transmit(t) => self.send(t.destination, t.len).await,
            NetAction::Done | NetAction::Dropped(_) => {}
        }
    }

    async fn send(&mut self, to: SocketAddr, len: usize) {
        let to = match (self.udp_v6, to.ip()) {
            (true, IpAddr::V4(v4)) => SocketAddr::new(v4.to_ipv6_mapped().into(), to.port()),
            _ => to,
        };
        if let Err(e) = self.udp.send_to(&self.out_buf[..len], to).await {
            self.send_errors += 1;
            debug!(error = %e, %to, "udp send failed");
        }
    }

    /// Sends everything the router has queued and logs its events.
    async fn flush(&mut self) {
        let now = clock();
        while let Some(t) = self.router.poll_transmit(now, &mut self.out_buf) {
            self.send(t.destination, t.len).await;
        }
        while let Some(event) = self.router.poll_event() {
            let secs = now.saturating_duration_since(self.start).as_secs();
            match event {
                Event::HandshakeCompleted { peer } => {
                    debug!(%peer, uptime_secs = secs, "handshake completed");
                }
                Event::EndpointChanged { peer, endpoint } => {
                    info!(%peer, %endpoint, "peer endpoint changed");
                }
                Event::SessionExpired { peer } => warn!(%peer, "session expired"),
            }
        }
    }
}

pub mod channel;
