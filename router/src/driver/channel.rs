//! In-memory TUN devices and UDP sockets, so the driver runs in tests without root.
//!
//! [`tun`] gives a device and the test's end of it; [`Network`] is a lossless switch of UDP
//! sockets keyed by address.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::{Datagrams, Packets, TunIo, TunWait, UdpIo, UdpWait};

/// Packets in flight per queue before senders wait.
const DEPTH: usize = 1024;

/// A TUN device whose other side is a pair of channels.
#[derive(Debug)]
pub struct ChannelTun {
    from_kernel: tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>>,
    to_kernel: mpsc::Sender<Vec<u8>>,
}

/// The test's side of a [`ChannelTun`]: what "the kernel" writes into and reads from it.
#[derive(Debug)]
pub struct Kernel {
    /// Packets for the driver to read from the device.
    pub tx: mpsc::Sender<Vec<u8>>,
    /// Packets the driver wrote to the device.
    pub rx: mpsc::Receiver<Vec<u8>>,
}

/// A new in-memory TUN device and its kernel side.
pub fn tun() -> (ChannelTun, Kernel) {
    let (ktx, drx) = mpsc::channel(DEPTH);
    let (dtx, krx) = mpsc::channel(DEPTH);
    (
        ChannelTun {
            from_kernel: tokio::sync::Mutex::new(drx),
            to_kernel: dtx,
        },
        Kernel { tx: ktx, rx: krx },
    )
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "channel closed")
}

impl ChannelTun {
    fn add(batch: &mut Packets, packet: &[u8]) -> io::Result<()> {
        if batch.push(packet) {
            Ok(())
        } else {
            Err(io::Error::other(
                "packet larger than a slot, or no free slot",
            ))
        }
    }
}

impl TunWait for ChannelTun {
    async fn recv(&self, batch: &mut Packets) -> io::Result<()> {
        let p = self
            .from_kernel
            .lock()
            .await
            .recv()
            .await
            .ok_or_else(closed)?;
        Self::add(batch, &p)
    }
}

impl TunIo for ChannelTun {
    fn try_recv(&self, batch: &mut Packets) -> io::Result<()> {
        let mut rx = self
            .from_kernel
            .try_lock()
            .map_err(|_| io::ErrorKind::WouldBlock)?;
        match rx.try_recv() {
            Ok(p) => Self::add(batch, &p),
            Err(mpsc::error::TryRecvError::Empty) => Err(io::ErrorKind::WouldBlock.into()),
            Err(mpsc::error::TryRecvError::Disconnected) => Err(closed()),
        }
    }
    async fn send(&self, batch: &mut Packets) -> io::Result<()> {
        for i in 0..batch.len() {
            self.to_kernel
                .send(batch.get(i).to_vec())
                .await
                .map_err(|_| closed())?;
        }
        batch.clear();
        Ok(())
    }
}

type Inbox = mpsc::Sender<(SocketAddr, Vec<u8>)>;

/// A switch of in-memory UDP sockets.
#[derive(Debug, Clone, Default)]
pub struct Network {
    sockets: Arc<Mutex<HashMap<SocketAddr, Inbox>>>,
}

/// A UDP socket on a [`Network`].
#[derive(Debug)]
pub struct ChannelUdp {
    addr: SocketAddr,
    network: Network,
    inbox: tokio::sync::Mutex<mpsc::Receiver<(SocketAddr, Vec<u8>)>>,
}

impl Network {
    /// A socket bound to `addr`.
    pub fn bind(&self, addr: SocketAddr) -> ChannelUdp {
        let (tx, rx) = mpsc::channel(DEPTH);
        self.sockets.lock().expect("network lock").insert(addr, tx);
        ChannelUdp {
            addr,
            network: self.clone(),
            inbox: tokio::sync::Mutex::new(rx),
        }
    }
}

/// GSO sends the in-memory socket takes (it splits them, as the kernel would).
const SEGMENTS: usize = 64;

impl UdpWait for ChannelUdp {
    async fn recv(&self, rx: &mut Datagrams) -> io::Result<()> {
        let (from, d) = self.inbox.lock().await.recv().await.ok_or_else(closed)?;
        rx.set_one(from, &d)
    }
}

impl UdpIo for ChannelUdp {
    fn try_recv(&self, rx: &mut Datagrams) -> io::Result<()> {
        let mut inbox = self
            .inbox
            .try_lock()
            .map_err(|_| io::ErrorKind::WouldBlock)?;
        match inbox.try_recv() {
            Ok((from, d)) => rx.set_one(from, &d),
            Err(mpsc::error::TryRecvError::Empty) => Err(io::ErrorKind::WouldBlock.into()),
            Err(mpsc::error::TryRecvError::Disconnected) => Err(closed()),
        }
    }
    async fn send(&self, to: SocketAddr, contents: &[u8], segment: usize) -> io::Result<()> {
        let inbox = self
            .network
            .sockets
            .lock()
            .expect("network lock")
            .get(&to)
            .cloned();
        // No socket there: the datagrams are lost, as on a real network.
        if let Some(inbox) = inbox {
            for datagram in contents.chunks(segment.max(1)) {
                let _ = inbox.send((self.addr, datagram.to_vec())).await;
            }
        }
        Ok(())
    }
    fn max_segments(&self) -> usize {
        SEGMENTS
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }
}
