//! In-memory TUN devices and UDP sockets, so the driver runs in tests without root.
//!
//! [`tun`] gives a device and the test's end of it; [`Network`] is a lossless switch of UDP
//! sockets keyed by address.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::{TunIo, UdpIo};

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

fn copy(packet: &[u8], buf: &mut [u8]) -> io::Result<usize> {
    let dst = buf
        .get_mut(..packet.len())
        .ok_or_else(|| io::Error::other("buffer too small"))?;
    dst.copy_from_slice(packet);
    Ok(packet.len())
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "channel closed")
}

impl TunIo for ChannelTun {
    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let p = self
            .from_kernel
            .lock()
            .await
            .recv()
            .await
            .ok_or_else(closed)?;
        copy(&p, buf)
    }
    fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut rx = self
            .from_kernel
            .try_lock()
            .map_err(|_| io::ErrorKind::WouldBlock)?;
        match rx.try_recv() {
            Ok(p) => copy(&p, buf),
            Err(mpsc::error::TryRecvError::Empty) => Err(io::ErrorKind::WouldBlock.into()),
            Err(mpsc::error::TryRecvError::Disconnected) => Err(closed()),
        }
    }
    async fn send(&self, packet: &[u8]) -> io::Result<usize> {
        self.to_kernel
            .send(packet.to_vec())
            .await
            .map_err(|_| closed())?;
        Ok(packet.len())
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

impl UdpIo for ChannelUdp {
    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let (from, d) = self.inbox.lock().await.recv().await.ok_or_else(closed)?;
        Ok((copy(&d, buf)?, from))
    }
    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let mut rx = self
            .inbox
            .try_lock()
            .map_err(|_| io::ErrorKind::WouldBlock)?;
        match rx.try_recv() {
            Ok((from, d)) => Ok((copy(&d, buf)?, from)),
            Err(mpsc::error::TryRecvError::Empty) => Err(io::ErrorKind::WouldBlock.into()),
            Err(mpsc::error::TryRecvError::Disconnected) => Err(closed()),
        }
    }
    async fn send_to(&self, datagram: &[u8], to: SocketAddr) -> io::Result<usize> {
        let inbox = self
            .network
            .sockets
            .lock()
            .expect("network lock")
            .get(&to)
            .cloned();
        // No socket there: the datagram is lost, as on a real network.
        if let Some(inbox) = inbox {
            let _ = inbox.send((self.addr, datagram.to_vec())).await;
        }
        Ok(datagram.len())
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }
}
