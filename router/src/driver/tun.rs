//! The TUN side of the driver: [`TunIo`], the packet batches it fills and drains, and [`Tun`],
//! its implementation over a non-blocking `tun_rs::SyncDevice` queue.
//!
//! With TUN offloads on (`IFF_VNET_HDR` + `TUNSETOFFLOAD`), one read can carry a 64 KB TCP or UDP
//! segment, which tun-rs splits into packets of the device MTU with their checksums; and a batch
//! written back goes through tun-rs's GRO table, which coalesces consecutive segments of a flow
//! into one large packet with a virtio header. Without them, a read is one packet and a write is
//! one packet.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use tun_rs::{ExpandBuffer, GROTable, VIRTIO_NET_HDR_LEN};

use super::poll::Readiness;

/// Headroom in front of every packet in a batch, where tun-rs puts the virtio header.
pub const OFFSET: usize = VIRTIO_NET_HDR_LEN;
/// The largest packet a slot holds.
const SLOT: usize = 65_536;
/// Slots per batch.
pub const SLOTS: usize = 256;
/// A read is only started while this many slots are free: a 64 KB segment split at an MSS of
/// 512 bytes or more fits. The daemon caps the device's GSO packets at this many segments
/// (`gso_max_segs`), so that a smaller MSS's packets fit too: the kernel cuts them first.
pub const MAX_SPLIT: usize = 128;

/// One packet's buffer: `OFFSET` bytes of headroom, then the packet. Its length is kept apart from
/// its allocation, so that reusing it costs nothing, and it grows where GRO appends to it. A
/// free slot (one at or past its batch's count) is always whole (`len` is its allocation's): a
/// read is handed the free slots as they are, without a pass that writes to each of them.
#[derive(Debug)]
pub(super) struct Slot {
    data: Vec<u8>,
    len: usize,
}

impl Slot {
    fn new() -> Self {
        Self {
            data: vec![0; OFFSET + SLOT],
            len: OFFSET + SLOT,
        }
    }
}

impl AsRef<[u8]> for Slot {
    fn as_ref(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

impl AsMut<[u8]> for Slot {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.data[..self.len]
    }
}

impl ExpandBuffer for Slot {
    fn buf_capacity(&self) -> usize {
        self.data.len()
    }
    fn buf_resize(&mut self, new_len: usize, value: u8) {
        if new_len > self.data.len() {
            self.data.resize(new_len, 0);
        }
        if new_len > self.len {
            self.data[self.len..new_len].fill(value);
        }
        self.len = new_len;
    }
    fn buf_extend_from_slice(&mut self, src: &[u8]) {
        let end = self.len + src.len();
        if end > self.data.len() {
            self.data.resize(end, 0);
        }
        self.data[self.len..end].copy_from_slice(src);
        self.len = end;
    }
}

/// A batch of packets: read from the device (then handed to the router one by one), or written by
/// the router (then written to the device together).
pub struct Packets {
    slots: Vec<Slot>,
    sizes: Vec<usize>,
    count: usize,
    /// A whole read with its virtio header, before it is split.
    scratch: Vec<u8>,
    /// Coalescing state for writes.
    gro: GROTable,
}

impl std::fmt::Debug for Packets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packets")
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl Default for Packets {
    fn default() -> Self {
        Self::new()
    }
}

impl Packets {
    /// An empty batch of [`SLOTS`] slots.
    pub fn new() -> Self {
        Self {
            // One by one: cloning would touch every page of every slot.
            slots: (0..SLOTS).map(|_| Slot::new()).collect(),
            sizes: vec![0; SLOTS],
            count: 0,
            scratch: vec![0; OFFSET + SLOT],
            gro: GROTable::default(),
        }
    }

    /// The number of packets in the batch.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Free slots.
    pub fn free(&self) -> usize {
        SLOTS - self.count
    }

    /// Packet `i`.
    pub fn get(&self, i: usize) -> &[u8] {
        &self.slots[i].data[OFFSET..OFFSET + self.sizes[i]]
    }

    /// Empties the batch.
    pub fn clear(&mut self) {
        self.release(self.count);
    }

    /// Frees the first `n` slots (the batch's packets) and empties the batch; each is made
    /// whole again, as a free slot is.
    fn release(&mut self, n: usize) {
        for slot in &mut self.slots[..n] {
            slot.len = slot.data.len();
        }
        self.count = 0;
    }

    /// The next free slot's packet space, for a packet to be written into and then
    /// [`commit`](Self::commit)ted; `None` when the batch is full.
    pub fn next_mut(&mut self) -> Option<&mut [u8]> {
        let slot = self.slots.get_mut(self.count)?;
        slot.len = slot.data.len();
        slot.data.get_mut(OFFSET..)
    }

    /// Adds the packet of `len` bytes written into [`next_mut`](Self::next_mut)'s space.
    pub fn commit(&mut self, len: usize) {
        if let Some(slot) = self.slots.get_mut(self.count) {
            slot.len = OFFSET + len;
            self.sizes[self.count] = len;
            self.count += 1;
        }
    }

    /// Adds a copy of `packet` (tests and the in-memory device); false when it does not fit.
    pub fn push(&mut self, packet: &[u8]) -> bool {
        match self.next_mut().and_then(|b| b.get_mut(..packet.len())) {
            Some(b) => {
                b.copy_from_slice(packet);
                self.commit(packet.len());
                true
            }
            None => false,
        }
    }

    /// The free slots (whole, see [`Slot`]) and their sizes, for a read to fill from the
    /// first; `added` records how many it filled.
    fn unfilled(&mut self) -> (&mut [Slot], &mut [usize], &mut Vec<u8>) {
        let n = self.count;
        (
            &mut self.slots[n..],
            &mut self.sizes[n..],
            &mut self.scratch,
        )
    }

    fn added(&mut self, n: usize) {
        self.count = (self.count + n).min(SLOTS);
    }
}

/// Whether an error from the device means the device is gone (the driver stops), rather than
/// one bad packet (counted and dropped).
pub fn is_fatal(e: &io::Error) -> bool {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => false,
        // tun-rs's own errors (a segment it cannot split) carry no OS error.
        _ => e.raw_os_error().is_some(),
    }
}

/// What the driver needs of a TUN device: a read that does not wait, and writes.
pub trait TunIo: Send + Sync + 'static {
    /// One read if one is ready, else `WouldBlock`; what it carries is added to `batch` (one
    /// packet, or the packets a segment splits into).
    fn try_recv(&self, batch: &mut Packets) -> io::Result<()>;
    /// The driver takes the queue for empty without a read to see it: [`try_recv`](Self::try_recv)
    /// answers `WouldBlock` without a system call until the device is next reported readable
    /// (`epoll` is level-triggered: a packet still queued is reported at the next wait). A
    /// device without readiness does nothing.
    fn assume_empty(&self) {}
    /// Writes the batch's packets (coalescing them where the device takes segments) and
    /// empties it.
    fn send(&self, batch: &mut Packets) -> impl Future<Output = io::Result<()>> + Send;
}

/// A TUN device a task can wait on: the in-memory ones, for the async driver
/// ([`Driver::serve`](super::Driver::serve)).
pub trait TunWait: TunIo {
    /// Waits for a read, and adds what it carries to `batch`.
    fn recv(&self, batch: &mut Packets) -> impl Future<Output = io::Result<()>> + Send;
}

/// The data plane's TUN queue, non-blocking, waited on by its worker's own `epoll` (module
/// `poll`). It remembers whether the queue may have a packet (a `Readiness`), so that asking
/// an empty queue costs no system call.
pub struct Tun {
    device: tun_rs::SyncDevice,
    ready: Readiness,
}

impl std::fmt::Debug for Tun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tun")
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

impl Tun {
    /// The queue, made non-blocking.
    pub fn new(device: tun_rs::SyncDevice) -> io::Result<Self> {
        device.set_nonblocking(true)?;
        Ok(Self {
            device,
            ready: Readiness::default(),
        })
    }
}

impl super::Watched for Tun {
    fn set_ready(&self) {
        self.ready.set();
    }
}

impl AsFd for Tun {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.device.as_fd()
    }
}

impl TunIo for Tun {
    fn try_recv(&self, batch: &mut Packets) -> io::Result<()> {
        let n = self.ready.read(|| {
            let (slots, sizes, scratch) = batch.unfilled();
            self.device.recv_multiple(scratch, slots, sizes, OFFSET)
        })?;
        batch.added(n);
        Ok(())
    }
    fn assume_empty(&self) {
        self.ready.drained();
    }
    /// Non-blocking: a write the queue cannot take (`EAGAIN`, only with a send buffer set far
    /// below the kernel's unlimited default) loses the batch, as a full queue would.
    async fn send(&self, batch: &mut Packets) -> io::Result<()> {
        let n = batch.count;
        if n == 0 {
            return Ok(());
        }
        let sent = send_batch(&self.device, batch, n);
        batch.release(n);
        sent
    }
}

/// Writes the first `n` packets of `batch`.
fn send_batch(device: &tun_rs::SyncDevice, batch: &mut Packets, n: usize) -> io::Result<()> {
    if n == 1 {
        // One packet has nothing to coalesce: one write, without the GRO table's pass (a
        // ping's latency). With the virtio header, a zeroed one: no segmentation, and the
        // checksums are complete (a decapsulated packet carries its sender's).
        let slot = &mut batch.slots[0];
        let start = if device.tcp_gso() {
            slot.data[..OFFSET].fill(0);
            0
        } else {
            OFFSET
        };
        return device.send(&slot.data[start..slot.len]).map(|_| ());
    }
    device
        .send_multiple(&mut batch.gro, &mut batch.slots[..n], OFFSET)
        .map(|_| ())
}

/// Opens the TUN device `name`, with offloads when `offload` asks for them and the kernel has
/// them; says whether it got them. Its worker makes it non-blocking ([`Tun::new`]).
pub fn open_tun(name: &str, offload: bool) -> io::Result<(tun_rs::SyncDevice, bool)> {
    let (mut queues, on) = open_tun_queues(name, offload, 1)?;
    let one = queues
        .pop()
        .ok_or_else(|| io::Error::other("no TUN queue opened"))?;
    Ok((one, on))
}

/// As [`open_tun`], with `n` queues, one per data-path worker. With more than one the device
/// is multi-queue (`IFF_MULTI_QUEUE`): the kernel puts each flow's packets on one queue, so a
/// flow is read by one worker, in order.
pub fn open_tun_queues(
    name: &str,
    offload: bool,
    n: usize,
) -> io::Result<(Vec<tun_rs::SyncDevice>, bool)> {
    let (first, on) = open_first(name, offload, n > 1)?;
    let mut all = Vec::with_capacity(n);
    for _ in 1..n {
        all.push(first.try_clone()?);
    }
    all.insert(0, first);
    Ok((all, on))
}

fn open_first(name: &str, offload: bool, multi: bool) -> io::Result<(tun_rs::SyncDevice, bool)> {
    let build = |offload: bool| {
        tun_rs::DeviceBuilder::new()
            .name(name)
            .offload(offload)
            .multi_queue(multi)
            .build_sync()
    };
    if offload {
        match build(true) {
            Ok(dev) => {
                let on = dev.tcp_gso();
                return Ok((dev, on));
            }
            Err(e) => {
                tracing::info!(error = %e, "TUN offloads unavailable; opening the device without");
            }
        }
    }
    Ok((build(false)?, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every free slot is whole, whatever the batch held before: a read is handed them as
    /// they are and may fill any of them up to its whole size.
    fn assert_free_slots_whole(batch: &mut Packets) {
        let free = batch.free();
        let (slots, _, _) = batch.unfilled();
        assert_eq!(slots.len(), free);
        for (i, slot) in slots.iter().enumerate() {
            assert_eq!(slot.as_ref().len(), OFFSET + SLOT, "free slot {i} is whole");
        }
    }

    #[test]
    fn a_cleared_batch_hands_a_read_whole_slots() {
        let mut batch = Packets::new();
        assert!(batch.push(&[0x45; 60]));
        assert!(batch.push(&[0x45; 1400]));
        assert_eq!((batch.len(), batch.get(0).len()), (2, 60));
        batch.clear();
        assert!(batch.is_empty());
        assert_free_slots_whole(&mut batch);
    }

    #[test]
    fn slots_past_the_count_stay_whole_while_packets_are_added() {
        let mut batch = Packets::new();
        for len in [20, 40, 1500] {
            assert!(batch.push(&vec![0x60; len]));
        }
        assert_free_slots_whole(&mut batch);
        // A packet as large as a slot still fits in the next one.
        assert!(batch.push(&vec![0x45; SLOT]));
        assert_eq!(batch.get(3).len(), SLOT);
    }

    #[test]
    fn a_slot_grown_by_coalescing_is_whole_again_when_released() {
        let mut batch = Packets::new();
        assert!(batch.push(&[0x45; 100]));
        assert!(batch.push(&[0x45; 100]));
        // What GRO does to the first slot of a run: appends the next packet's payload.
        batch.slots[0].buf_extend_from_slice(&[0; 100]);
        batch.release(2);
        let (slots, _, _) = batch.unfilled();
        assert!(slots[0].as_ref().len() >= OFFSET + SLOT);
        assert!(slots.iter().all(|s| s.as_ref().len() == s.data.len()));
    }
}
