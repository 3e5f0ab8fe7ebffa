//! The UDP side of the driver: [`UdpIo`], the receive batch it fills, and its implementation over
//! a socket driven by quinn-udp (`recvmmsg`, `UDP_SEGMENT` sends, `UDP_GRO` receives), with a plain
//! `recvmsg` (nix) for a lone datagram.
//!
//! The worker's `epoll` (module `poll`) waits on the socket for reading only. A socket waited on
//! for writing too gets an `EPOLLOUT` each time a datagram sent leaves its buffer, which on a
//! veth or any local path is during the send itself: every send would then cost one more
//! wake-up that serves nothing. Sends are tried directly; the rare full buffer is waited on
//! with `poll(2)`, bounded, on the worker's own thread.

use std::io::{self, IoSliceMut};
use std::net::{Ipv6Addr, SocketAddr};

use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tracing::debug;

use super::poll::Readiness;
use weft_config::Offload;

/// Socket buffer size asked for; root may exceed `net.core.[rw]mem_max`.
const SOCKET_BUFFER: usize = 8 << 20;
/// The least buffer size of one worker's socket.
const MIN_WORKER_BUFFER: usize = 1 << 20;
/// Receive buffers per batch (`recvmmsg` fills up to this many).
pub const RX_BATCH: usize = 32;
/// The fewest buffers a batching receive is offered (see [`Datagrams`]).
const MIN_OFFER: usize = 2;
/// Room for a single receive's control messages: the GRO segment size's (24 bytes) with room to
/// spare for one the kernel adds unasked.
const CONTROL: usize = 128;
/// One receive buffer: a GRO run of up to 64 datagrams of an Ethernet MTU, or one datagram of
/// any size.
const RX_BUF: usize = 128 << 10;
/// The most UDP payload one GSO send may carry (IPv4: 65535 - 20 - 8).
pub const MAX_GSO_BYTES: usize = 65_507;

/// Received datagrams: `meta[i]` describes `bufs[i]`, which holds `meta[i].len` bytes in
/// datagrams of `meta[i].stride` bytes (the last may be shorter).
///
/// A receive is offered only as many buffers as traffic calls for: twice what the last one
/// filled, doubling while receives come back full, up to every buffer. A lone datagram (a
/// ping's) is received with two message headers prepared, not [`RX_BATCH`]; under load the
/// offer reaches the whole batch within a few receives of a burst's start.
#[derive(Debug)]
pub struct Datagrams {
    bufs: Vec<Vec<u8>>,
    meta: Vec<RecvMeta>,
    count: usize,
    /// Buffers the next receive is offered.
    offer: usize,
    /// Buffers the last receive was offered.
    offered: usize,
    /// Room for the control messages of a single receive ([`UdpIo::try_recv_one`]): the GRO
    /// segment size.
    control: Vec<u8>,
}

impl Datagrams {
    /// Room for `n` receive buffers (1 without batching).
    pub fn new(n: usize) -> Self {
        let n = n.clamp(1, RX_BATCH);
        Self {
            // One by one: cloning would touch every page.
            bufs: (0..n).map(|_| vec![0; RX_BUF]).collect(),
            meta: vec![RecvMeta::default(); n],
            count: 0,
            offer: n.min(MIN_OFFER),
            offered: n,
            control: vec![0; CONTROL],
        }
    }

    /// Whether the last receive filled at most one buffer (an idle socket's first receive, a
    /// ping's, a request's): traffic is sparse, and the next receive is offered the fewest
    /// buffers.
    pub fn is_sparse(&self) -> bool {
        self.offer <= MIN_OFFER
    }

    /// Records that a receive offered `offered` buffers filled `count`, and sizes the next
    /// offer from it: twice what it filled (which doubles the offer when it filled them all).
    fn received(&mut self, offered: usize, count: usize) {
        self.count = count;
        self.offered = offered;
        self.offer = count.saturating_mul(2).max(MIN_OFFER).min(self.bufs.len());
    }

    /// The buffers filled, each as (sender, bytes, stride).
    pub fn iter(&self) -> impl Iterator<Item = (SocketAddr, &[u8], usize)> {
        self.meta[..self.count]
            .iter()
            .zip(&self.bufs)
            .map(|(m, b)| {
                let bytes = &b[..m.len.min(b.len())];
                let stride = if m.stride == 0 { bytes.len() } else { m.stride };
                (m.addr, bytes, stride.max(1))
            })
    }

    /// The number of buffers filled.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Buffer `i` as (sender, bytes, stride); see [`iter`](Self::iter).
    pub fn get(&self, i: usize) -> Option<(SocketAddr, &[u8], usize)> {
        self.iter().nth(i)
    }

    /// Whether the last receive filled every buffer it was offered: the socket may hold more.
    /// A receive that filled fewer found the socket's queue empty.
    pub fn is_full(&self) -> bool {
        self.count > 0 && self.count == self.offered
    }

    /// Whether no datagram waits to be handled.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Forgets the datagrams received (they were handled).
    pub fn clear(&mut self) {
        self.count = 0;
    }

    /// Stores one datagram as the only one (the in-memory socket).
    pub fn set_one(&mut self, from: SocketAddr, datagram: &[u8]) -> io::Result<()> {
        let buf = self.bufs[0]
            .get_mut(..datagram.len())
            .ok_or_else(|| io::Error::other("datagram larger than the receive buffer"))?;
        buf.copy_from_slice(datagram);
        let mut m = RecvMeta::default();
        m.addr = from;
        m.len = datagram.len();
        m.stride = datagram.len();
        self.meta[0] = m;
        self.count = 1;
        self.offered = self.bufs.len();
        Ok(())
    }
}

/// What the driver needs of a UDP socket: a receive that does not wait, and sends.
pub trait UdpIo: Send + Sync + 'static {
    /// Datagrams if some are ready (replacing `rx`'s contents), else `WouldBlock`.
    fn try_recv(&self, rx: &mut Datagrams) -> io::Result<()>;
    /// One buffer's worth (a datagram, or one GRO run of them) if ready, replacing `rx`'s
    /// contents, else `WouldBlock`; the queue is then taken for empty without a receive to see
    /// it (`epoll` is level-triggered: a datagram still queued is reported at the next wait).
    /// For sparse traffic (a ping's datagram), where a batch's set-up and the receive that
    /// finds the queue empty are all cost. Sockets without a cheaper receive (the in-memory
    /// ones) receive as [`try_recv`](Self::try_recv) does.
    fn try_recv_one(&self, rx: &mut Datagrams) -> io::Result<()> {
        self.try_recv(rx)
    }
    /// Sends `contents` to `to` as datagrams of `segment` bytes (the last may be shorter): one
    /// datagram when `segment` is its length, else one GSO send.
    fn send(
        &self,
        to: SocketAddr,
        contents: &[u8],
        segment: usize,
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// The most datagrams one send may carry (1 without GSO).
    fn max_segments(&self) -> usize;
    /// The bound address.
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

/// A socket a task can wait on: the in-memory ones, for the async driver
/// ([`Driver::serve`](super::Driver::serve)).
pub trait UdpWait: UdpIo {
    /// Waits for datagrams and replaces `rx`'s contents with them.
    fn recv(&self, rx: &mut Datagrams) -> impl Future<Output = io::Result<()>> + Send;
}

/// How long a send waits for room in a full socket buffer before its datagrams are dropped.
const SEND_WAIT: Duration = Duration::from_millis(20);
/// How long a socket whose buffer stayed full through a whole wait counts as congested: its
/// sends meanwhile are tried once and not waited on.
const CONGESTED_FOR: Duration = Duration::from_millis(100);

/// Whether a socket's sends may wait for room. A wedged link (a full buffer that does not
/// drain) costs the worker one bounded wait per [`CONGESTED_FOR`], not one per send: the turn
/// goes on to serve the network→TUN side and the timers in between. A send that goes through
/// ends the congestion.
#[derive(Debug, Default)]
struct Congestion {
    until: std::sync::Mutex<Option<Instant>>,
    marked: AtomicBool,
}

impl Congestion {
    fn is_congested(&self, now: Instant) -> bool {
        let until = *self
            .until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        until.is_some_and(|t| now < t)
    }
    fn mark(&self, now: Instant) {
        *self
            .until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(now + CONGESTED_FOR);
        self.marked.store(true, Ordering::Relaxed);
    }
    /// A send went through; cheap when nothing was marked.
    fn clear(&self) {
        if self.marked.swap(false, Ordering::Relaxed) {
            *self
                .until
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        }
    }
}

/// The data plane's UDP socket, non-blocking, waited on by its worker's own `epoll` (module
/// `poll`), with quinn-udp for the system calls. Like [`Tun`](super::Tun) it remembers whether
/// datagrams may be queued (a `Readiness`, cleared also by a receive that fills fewer buffers
/// than it had: it emptied the queue), so that asking an empty socket costs no system call.
#[derive(Debug)]
pub struct Udp {
    socket: Socket,
    state: UdpSocketState,
    gso: usize,
    congestion: Congestion,
    ready: Readiness,
}

/// A bound socket not yet handed to its worker ([`Udp::from`]).
#[derive(Debug)]
pub struct BoundUdp {
    socket: Socket,
    state: UdpSocketState,
    gso: usize,
    gro: bool,
}

impl BoundUdp {
    /// Whether received datagrams arrive coalesced (`UDP_GRO` on).
    pub fn gro(&self) -> bool {
        self.gro
    }
    /// The most datagrams one send may carry (1 without GSO).
    pub fn max_segments(&self) -> usize {
        self.gso
    }
    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        bound_addr(&self.socket)
    }
}

impl From<BoundUdp> for Udp {
    fn from(bound: BoundUdp) -> Self {
        Self {
            socket: bound.socket,
            state: bound.state,
            gso: bound.gso,
            congestion: Congestion::default(),
            ready: Readiness::default(),
        }
    }
}

impl super::Watched for Udp {
    fn set_ready(&self) {
        self.ready.set();
    }
}

impl AsFd for Udp {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

fn size_buffers(socket: &Socket, bytes: usize) {
    use nix::sys::socket::{setsockopt, sockopt};
    // The FORCE options pass net.core.[rw]mem_max with CAP_NET_ADMIN; without it, ask normally.
    if setsockopt(socket, sockopt::RcvBufForce, &bytes).is_err() {
        let _ = socket.set_recv_buffer_size(bytes);
    }
    if setsockopt(socket, sockopt::SndBufForce, &bytes).is_err() {
        let _ = socket.set_send_buffer_size(bytes);
    }
}

/// Opens the UDP socket on `port`: dual-stack `[::]` when the host has IPv6, else `0.0.0.0`; with
/// the offloads `offload` allows and the kernel has.
pub fn bind_udp(port: u16, offload: &Offload) -> io::Result<BoundUdp> {
    bind_one(port, offload, false, SOCKET_BUFFER)
}

/// Opens `n` UDP sockets on one port, one per data-path worker. With more than one they join a
/// `SO_REUSEPORT` group: the kernel hands each datagram to one of them by a hash of its
/// addresses and ports, so one peer's datagrams (one underlay 4-tuple) all reach one worker, in
/// order. Only sockets of the same user may join the group. Port 0 binds the first to a free
/// port and the others to the same.
///
/// A port some socket already holds is refused, even one with `SO_REUSEPORT` set (another weft,
/// another program of the same user): the group would take it in and the kernel would hand it a
/// share of the peers' datagrams. So the port is first bound alone, then let go and bound by
/// the group.
///
/// Each socket's buffers are the single socket's 8 MB split between the `n`, at least 1 MB: the
/// workers together queue about what one socket would.
pub fn bind_udp_workers(port: u16, offload: &Offload, n: usize) -> io::Result<Vec<BoundUdp>> {
    if n <= 1 {
        return Ok(vec![bind_udp(port, offload)?]);
    }
    let group = || {
        let buffers = (SOCKET_BUFFER / n).max(MIN_WORKER_BUFFER);
        if port != 0 {
            drop(open_socket(port, false)?);
        }
        let first = bind_one(port, offload, true, buffers)?;
        let port = first.local_addr()?.port();
        let mut all = vec![first];
        for _ in 1..n {
            all.push(bind_one(port, offload, true, buffers)?);
        }
        Ok(all)
    };
    group().map_err(|e| in_use(port, e))
}

/// A bind error, naming the port when another socket holds it.
fn in_use(port: u16, e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::AddrInUse {
        io::Error::new(
            e.kind(),
            format!("UDP port {port} is already bound by another socket: {e}"),
        )
    } else {
        e
    }
}

/// A UDP socket bound to `port` on every address: dual-stack `[::]` when the host has IPv6,
/// else `0.0.0.0`; in a `SO_REUSEPORT` group with `reuse`.
fn open_socket(port: u16, reuse: bool) -> io::Result<Socket> {
    let open = |domain: Domain, addr: SocketAddr| {
        let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
        if domain == Domain::IPV6 {
            s.set_only_v6(false)?;
        }
        if reuse {
            s.set_reuse_port(true)?;
        }
        s.bind(&addr.into())?;
        Ok::<_, io::Error>(s)
    };
    match open(
        Domain::IPV6,
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
    ) {
        Ok(s) => Ok(s),
        Err(e) => {
            debug!(error = %e, "no dual-stack socket; binding IPv4 only");
            open(Domain::IPV4, SocketAddr::from(([0, 0, 0, 0], port)))
        }
    }
}

/// Switches off the ancillary data quinn-udp asks every receive to carry and the driver never
/// reads (the receive time, the TOS byte or traffic class, the destination address): each is a
/// control message built and copied out per datagram, and a socket asking for receive times
/// makes the kernel stamp every packet the host receives. Only the sender's address, the length
/// and the GRO segment size are read. Best effort: an option the kernel refuses costs a little
/// time, nothing else.
fn quiet_ancillary(socket: &Socket) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(socket, sockopt::ReceiveTimestampns, &false);
    let _ = setsockopt(socket, sockopt::IpRecvTos, &false);
    let _ = setsockopt(socket, sockopt::Ipv4PacketInfo, &false);
    let _ = setsockopt(socket, sockopt::Ipv6RecvPacketInfo, &false);
    let _ = setsockopt(socket, sockopt::Ipv6RecvTClass, &false);
}

fn bind_one(port: u16, offload: &Offload, reuse: bool, buffers: usize) -> io::Result<BoundUdp> {
    let socket = open_socket(port, reuse)?;
    size_buffers(&socket, buffers);
    socket.set_nonblocking(true)?;
    let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
    quiet_ancillary(&socket);
    let mut gro = state.gro_segments() > 1;
    if gro && !offload.udp_gro {
        // quinn-udp switches UDP_GRO on whenever it can.
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::UdpGroSegment, &false)?;
        gro = false;
    }
    let gso = if offload.udp_gso {
        state.max_gso_segments().max(1)
    } else {
        1
    };
    Ok(BoundUdp {
        socket,
        state,
        gso,
        gro,
    })
}

impl UdpIo for Udp {
    fn try_recv(&self, rx: &mut Datagrams) -> io::Result<()> {
        rx.count = 0;
        let n = rx.offer;
        let count = self.ready.read(|| {
            let mut offered = rx.bufs[..n].iter_mut();
            let mut iovs: [IoSliceMut<'_>; RX_BATCH] = std::array::from_fn(|_| {
                IoSliceMut::new(offered.next().map_or(&mut [][..], Vec::as_mut_slice))
            });
            self.state
                .recv((&self.socket).into(), &mut iovs[..n], &mut rx.meta[..n])
        })?;
        // Fewer than it had buffers for: the queue is empty now.
        if count < n {
            self.ready.drained();
        }
        rx.received(n, count);
        Ok(())
    }
    /// A plain `recvmsg` into the first buffer: no message headers prepared for a batch, no
    /// receive that finds the queue empty.
    fn try_recv_one(&self, rx: &mut Datagrams) -> io::Result<()> {
        rx.count = 0;
        let Datagrams { bufs, control, .. } = rx;
        let meta = self
            .ready
            .read(|| recv_one(&self.socket, &mut bufs[0], control))?;
        self.ready.drained();
        rx.meta[0] = meta;
        rx.received(1, 1);
        Ok(())
    }
    async fn send(&self, to: SocketAddr, contents: &[u8], segment: usize) -> io::Result<()> {
        let socket = &self.socket;
        if segment >= contents.len() {
            // One datagram (a ping's): a plain sendto, without the TOS control message
            // quinn-udp attaches to every send for ECN, which weft does not use.
            let to = socket2::SockAddr::from(to);
            return send_or_wait(socket, SEND_WAIT, &self.congestion, super::clock, || {
                loop {
                    match socket.send_to(contents, &to) {
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        r => return r.map(|_| ()),
                    }
                }
            });
        }
        let transmit = Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size: Some(segment),
            src_ip: None,
        };
        send_or_wait(socket, SEND_WAIT, &self.congestion, super::clock, || {
            self.state.try_send(socket.into(), &transmit)
        })
    }
    fn max_segments(&self) -> usize {
        // quinn-udp lowers its own figure if a GSO send fails.
        self.gso.min(self.state.max_gso_segments()).max(1)
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        bound_addr(&self.socket)
    }
}

/// Receives one buffer's worth into `buf` with `recvmsg`: its sender, its length and, for a
/// GRO run, the segment size (the only control message read). A control message cut short
/// (`MSG_CTRUNC`) could have been the segment size: the buffer is then refused as an error,
/// its datagrams lost, rather than handed on as one datagram.
fn recv_one(socket: &Socket, buf: &mut [u8], control: &mut [u8]) -> io::Result<RecvMeta> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrLike, SockaddrStorage, recvmsg};
    use std::os::fd::AsRawFd;
    let mut iov = [IoSliceMut::new(buf)];
    let fd = socket.as_raw_fd();
    let msg = loop {
        match recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut *control), MsgFlags::empty()) {
            Err(nix::errno::Errno::EINTR) => {}
            r => break r?,
        }
    };
    let mut meta = RecvMeta::default();
    meta.len = msg.bytes;
    meta.stride = msg.bytes;
    let cmsgs = msg
        .cmsgs()
        .map_err(|_| io::Error::other("a received datagram's control messages were cut short"))?;
    for cmsg in cmsgs {
        if let ControlMessageOwned::UdpGroSegments(size) = cmsg {
            meta.stride = usize::try_from(size).unwrap_or(0);
        }
    }
    let from = msg.address.as_ref().and_then(|a| match a.family() {
        Some(nix::sys::socket::AddressFamily::Inet6) => {
            a.as_sockaddr_in6().map(|a| SocketAddr::from(*a))
        }
        Some(nix::sys::socket::AddressFamily::Inet) => {
            a.as_sockaddr_in().map(|a| SocketAddr::from(*a))
        }
        _ => None,
    });
    meta.addr = from.ok_or_else(|| io::Error::other("a datagram without an IP sender"))?;
    Ok(meta)
}

/// The address `socket` is bound to.
fn bound_addr(socket: &Socket) -> io::Result<SocketAddr> {
    socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("not an IP socket"))
}

/// Sends with `send`; when `socket`'s buffer is full, waits up to `limit` for room and then
/// tries once more whatever the wait said. The worker's thread blocks meanwhile: its turn
/// waits on this send either way. `poll(2)` reports a UDP socket writable only once its queue
/// is below half the buffer, while a datagram fits as soon as there is room for it, so a wait
/// that timed out is no proof the send would fail. When that second try finds the buffer still
/// full, the socket is congested (see [`Congestion`]): sends until then are not waited on.
fn send_or_wait<T>(
    socket: &Socket,
    limit: Duration,
    congestion: &Congestion,
    now: impl Fn() -> Instant,
    mut send: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    let full = |r: &io::Result<T>| matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock);
    let first = send();
    if !full(&first) {
        if first.is_ok() {
            congestion.clear();
        }
        return first;
    }
    if congestion.is_congested(now()) {
        return first;
    }
    wait_writable(socket, limit)?;
    let second = send();
    if full(&second) {
        congestion.mark(now());
    } else if second.is_ok() {
        congestion.clear();
    }
    second
}

/// Waits up to `limit` for `socket` to take a datagram; says whether `poll(2)` reported it
/// writable (an error or hang-up on the socket is not room).
fn wait_writable(socket: &Socket, limit: Duration) -> io::Result<bool> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let ms = u16::try_from(limit.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLOUT)];
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(n) => Ok(n > 0
            && fds[0]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLOUT))),
        Err(nix::errno::Errno::EINTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::Watched;

    /// Runs `test` on a thread of its own in a network namespace of its own (root only), with
    /// `198.18.0.1/32` on its loopback device: traffic the test sends stays in it.
    fn in_own_namespace(test: impl FnOnce(SocketAddr) + Send + 'static) {
        let thread = std::thread::spawn(move || {
            use nix::sched::{CloneFlags, unshare};
            if let Err(e) = unshare(CloneFlags::CLONE_NEWNET) {
                panic!("this test needs root to make its own network namespace: unshare: {e}");
            }
            // `ip` runs in this thread's namespace: a child takes its parent thread's.
            for args in [
                &["link", "set", "lo", "up"][..],
                &["addr", "add", "198.18.0.1/32", "dev", "lo"],
            ] {
                let status = std::process::Command::new("ip").args(args).status();
                assert!(
                    status.as_ref().is_ok_and(|s| s.success()),
                    "ip {args:?}: {status:?} (iproute2 is needed)"
                );
            }
            test(SocketAddr::from(([198, 18, 0, 1], 0)));
        });
        if let Err(panic) = thread.join() {
            std::panic::resume_unwind(panic);
        }
    }

    /// The single receive of a lone datagram ([`UdpIo::try_recv_one`]) reads what the batch's
    /// receive reads: a datagram alone, with its sender, and a GRO run whole with its segment
    /// size (here a GSO send of 100 + 100 + 40 bytes, which the loopback device hands the
    /// socket as one), so that the run is split into its datagrams, not taken for one. It takes
    /// the socket for empty after each, and a socket found empty answers `WouldBlock`.
    #[test]
    fn a_single_receive_reads_a_datagram_alone_and_a_gro_run_with_its_segment_size() {
        in_own_namespace(|local| {
            let udp = Udp::from(bind_udp(0, &Offload::AUTO).expect("bind"));
            let port = udp.local_addr().expect("bound").port();
            let to = SocketAddr::new(local.ip(), port);
            let mut rx = Datagrams::new(RX_BATCH);
            udp.set_ready();
            assert_eq!(
                udp.try_recv_one(&mut rx).map_err(|e| e.kind()),
                Err(io::ErrorKind::WouldBlock),
                "nothing sent yet"
            );

            super::super::finish(udp.send(to, &[7; 60], 60)).expect("send one");
            udp.set_ready();
            udp.try_recv_one(&mut rx).expect("a datagram");
            let (from, bytes, stride) = rx.get(0).expect("one buffer");
            assert_eq!(rx.len(), 1);
            assert_eq!((bytes, stride), (&[7; 60][..], 60));
            let canonical = SocketAddr::new(from.ip().to_canonical(), from.port());
            assert_eq!(
                canonical, to,
                "the sender, as the batch's receive gives it: {from}"
            );
            assert!(rx.is_sparse(), "one buffer keeps the next receive sparse");

            let mut run = vec![1; 100];
            run.extend([2; 100]);
            run.extend([3; 40]);
            super::super::finish(udp.send(to, &run, 100)).expect("send a GSO run");
            udp.set_ready();
            udp.try_recv_one(&mut rx).expect("the run");
            let (_, bytes, stride) = rx.get(0).expect("one buffer");
            assert_eq!(bytes, &run[..], "the run whole");
            if udp.max_segments() > 1 {
                assert_eq!(stride, 100, "split at the segment size");
            }
            let datagrams: Vec<usize> = bytes.chunks(stride).map(<[u8]>::len).collect();
            assert_eq!(datagrams, [100, 100, 40], "the run's datagrams");
            // Taken for empty: no system call until `epoll` says the socket is readable.
            assert_eq!(
                udp.try_recv_one(&mut rx).map_err(|e| e.kind()),
                Err(io::ErrorKind::WouldBlock)
            );
        });
    }

    #[test]
    fn a_lone_datagram_is_received_with_few_buffers_and_a_burst_doubles_the_offer() {
        let mut rx = Datagrams::new(RX_BATCH);
        assert_eq!(rx.offer, MIN_OFFER, "an idle socket is offered the fewest");
        // A ping: one datagram, the queue found empty.
        rx.received(rx.offer, 1);
        assert!(!rx.is_full());
        assert_eq!(rx.offer, MIN_OFFER);
        // A burst: every receive comes back full, and the offer doubles up to the batch.
        let mut offers = vec![];
        for _ in 0..6 {
            let n = rx.offer;
            rx.received(n, n);
            assert!(rx.is_full(), "{n} of {n} filled: the socket may hold more");
            offers.push(rx.offer);
        }
        assert_eq!(offers, [4, 8, 16, 32, 32, 32]);
        // The burst ends: twice what the last receive found.
        rx.received(RX_BATCH, 5);
        assert!(!rx.is_full());
        assert_eq!(rx.offer, 10);
        rx.received(10, 0);
        assert_eq!(rx.offer, MIN_OFFER);
        rx.clear();
        assert!(
            !rx.is_full(),
            "an emptied batch holds nothing to be full of"
        );
    }

    #[test]
    fn without_batching_every_receive_is_offered_its_one_buffer() {
        let mut rx = Datagrams::new(1);
        assert_eq!(rx.offer, 1);
        rx.received(1, 1);
        assert!(rx.is_full());
        assert_eq!(rx.offer, 1);
        rx.received(1, 0);
        assert_eq!(rx.offer, 1);
    }

    /// The event mask `epoll` holds for descriptor `fd` of this process, from any epoll
    /// instance's `/proc/self/fdinfo` entry that lists it.
    fn epoll_mask(fd: i32) -> Option<u32> {
        for entry in std::fs::read_dir("/proc/self/fdinfo").ok()? {
            let Ok(info) = std::fs::read_to_string(entry.ok()?.path()) else {
                continue;
            };
            for line in info.lines() {
                // "tfd:        9 events:     2019 data: ..."
                let mut words = line.split_whitespace();
                if words.next() != Some("tfd:") || words.next() != Some(&fd.to_string()) {
                    continue;
                }
                if words.next() == Some("events:") {
                    return u32::from_str_radix(words.next()?, 16).ok();
                }
            }
        }
        None
    }

    #[test]
    fn the_socket_is_watched_for_reading_only_so_a_send_wakes_nothing() {
        use std::os::fd::AsRawFd;
        // Bound, never sent on: no traffic leaves this test. A local datagram socket stands in
        // for the TUN queue.
        let udp = Udp::from(bind_udp(0, &Offload::AUTO).expect("bind"));
        let (tun, _other) = std::os::unix::net::UnixDatagram::pair().expect("pair");
        let bell = super::super::Bell::new().expect("eventfd");
        let _poller = super::super::poll::Poller::new(&tun, &udp, &bell).expect("epoll");
        let fd = udp.socket.as_raw_fd();
        let mask = epoll_mask(fd).expect("the socket is in an epoll set");
        let (epollin, epollout) = (0x1, 0x4);
        assert_ne!(mask & epollin, 0, "readable wanted: {mask:#x}");
        assert_eq!(mask & epollout, 0, "writable not wanted: {mask:#x}");
    }

    #[test]
    fn the_socket_asks_for_no_ancillary_data_the_driver_does_not_read() {
        use nix::sys::socket::{getsockopt, sockopt};
        // Bound, never sent on: no traffic leaves this test.
        for bound in [bind_udp(0, &Offload::AUTO).expect("bind")]
            .into_iter()
            .chain(bind_udp_workers(0, &Offload::AUTO, 2).expect("bind two"))
        {
            let s = &bound.socket;
            let v6 = bound.local_addr().expect("bound").is_ipv6();
            // Each option is read back (an error fails the test, not passes it); the IPv6 ones
            // only on an IPv6 socket (a host without IPv6 binds IPv4 only).
            let mut asked = vec![
                ("SO_TIMESTAMPNS", getsockopt(s, sockopt::ReceiveTimestampns)),
                ("IP_RECVTOS", getsockopt(s, sockopt::IpRecvTos)),
                ("IP_PKTINFO", getsockopt(s, sockopt::Ipv4PacketInfo)),
            ];
            if v6 {
                asked.push((
                    "IPV6_RECVPKTINFO",
                    getsockopt(s, sockopt::Ipv6RecvPacketInfo),
                ));
                asked.push(("IPV6_RECVTCLASS", getsockopt(s, sockopt::Ipv6RecvTClass)));
            }
            for (name, on) in asked {
                assert_eq!(on, Ok(false), "{name}");
            }
            // What the driver reads stays: GRO's segment size, where offloads allow it (a
            // kernel before 5.10 cannot report it).
            match getsockopt(s, sockopt::UdpGroSegment) {
                Err(nix::errno::Errno::ENOPROTOOPT) => {}
                on => assert_eq!(on, Ok(bound.gro()), "UDP_GRO as the socket reports it"),
            }
        }
    }

    #[test]
    fn a_full_buffer_is_waited_on_for_a_bounded_time_and_room_ends_the_wait() {
        // A local datagram pair stands in for the UDP socket: no network.
        let (a, b) = Socket::pair(Domain::UNIX, Type::DGRAM, None).expect("pair");
        a.set_nonblocking(true).expect("nonblocking");
        let mut sent = 0;
        while sent < 100_000 {
            match a.send(&[0; 64]) {
                Ok(_) => sent += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("send: {e}"),
            }
        }
        assert!(sent < 100_000, "the buffer never filled");
        assert!(
            !wait_writable(&a, Duration::from_millis(20)).expect("poll"),
            "a full buffer is not writable"
        );
        // Drained (bounded by what was sent): the buffer has room again.
        b.set_nonblocking(true).expect("nonblocking");
        let mut buf = [std::mem::MaybeUninit::new(0u8); 64];
        for _ in 0..sent {
            if b.recv(&mut buf).is_err() {
                break;
            }
        }
        assert!(
            wait_writable(&a, Duration::from_secs(5)).expect("poll"),
            "room in the buffer ends the wait"
        );
    }

    /// A full buffer, then a send that fits once the wait is over though `poll(2)` never said
    /// so (UDP reports room only below half the buffer): the send is tried again, not dropped.
    #[test]
    fn a_send_is_tried_again_after_a_wait_that_timed_out() {
        let (a, _b) = Socket::pair(Domain::UNIX, Type::DGRAM, None).expect("pair");
        a.set_nonblocking(true).expect("nonblocking");
        for _ in 0..100_000 {
            if a.send(&[0; 64]).is_err() {
                break;
            }
        }
        let congestion = Congestion::default();
        let now = super::super::clock();
        let mut tries = 0;
        let r = send_or_wait(
            &a,
            Duration::from_millis(10),
            &congestion,
            || now,
            || {
                tries += 1;
                if tries == 1 {
                    Err(io::Error::from(io::ErrorKind::WouldBlock))
                } else {
                    Ok(tries)
                }
            },
        );
        assert_eq!(r.expect("the second try is sent"), 2);
        // Still full after the wait: the datagrams are given up, after exactly two tries.
        assert_eq!(tries_at(&a, &congestion, now), 2);
    }

    /// Sends into a buffer that stays full, at a virtual time `at`: how many tries each took.
    fn tries_at(a: &Socket, congestion: &Congestion, at: Instant) -> usize {
        let mut tries = 0;
        let r: io::Result<()> = send_or_wait(
            a,
            Duration::from_millis(5),
            congestion,
            || at,
            || {
                tries += 1;
                Err(io::ErrorKind::WouldBlock.into())
            },
        );
        assert_eq!(r.map_err(|e| e.kind()), Err(io::ErrorKind::WouldBlock));
        tries
    }

    /// A wedged link: after one wait that ended with the buffer still full, the sends that
    /// follow within the congestion window are tried once and not waited on (the worker is not
    /// held one wait per send); after the window, or once a send went through, a full buffer
    /// is waited on again.
    #[test]
    fn a_congested_socket_costs_one_wait_per_window_not_one_per_send() {
        let (a, _b) = Socket::pair(Domain::UNIX, Type::DGRAM, None).expect("pair");
        let congestion = Congestion::default();
        let t0 = super::super::clock();
        assert_eq!(
            tries_at(&a, &congestion, t0),
            2,
            "the first full send waits"
        );
        for i in 1..=50u32 {
            let at = t0 + CONGESTED_FOR * i / 60;
            assert_eq!(
                tries_at(&a, &congestion, at),
                1,
                "send {i} in the window waits"
            );
        }
        assert_eq!(
            tries_at(&a, &congestion, t0 + CONGESTED_FOR),
            2,
            "the window is over"
        );
        // A send that goes through ends the congestion at once.
        let at = t0 + CONGESTED_FOR + Duration::from_millis(1);
        let r = send_or_wait(&a, Duration::from_millis(5), &congestion, || at, || Ok(()));
        assert!(r.is_ok());
        assert_eq!(
            tries_at(&a, &congestion, at),
            2,
            "room was seen: a full buffer waits again"
        );
    }
}
