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
use std::sync::atomic::{AtomicBool, Ordering};

use tun_rs::{
    ExpandBuffer, GROTable, VIRTIO_NET_HDR_GSO_UDP_L4 as GSO_UDP_L4, VIRTIO_NET_HDR_LEN,
    VirtioNetHdr,
};

use super::poll::Readiness;

/// Headroom in front of every packet in a batch, where tun-rs puts the virtio header.
pub const OFFSET: usize = VIRTIO_NET_HDR_LEN;
/// `gso_type`: a packet, not a segment (`VIRTIO_NET_HDR_GSO_NONE`, linux/virtio_net.h).
const GSO_NONE: u8 = 0;
/// `gso_type`'s flag for TCP segments with ECN (`VIRTIO_NET_HDR_GSO_ECN`).
const GSO_ECN: u8 = 0x80;
/// `flags`: the transport checksum is left to the device (`VIRTIO_NET_HDR_F_NEEDS_CSUM`).
const NEEDS_CSUM: u8 = 1;
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
    placement: Placement,
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
            placement: Placement::default(),
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
        let vnet = self.device.tcp_gso();
        let n = self.ready.read(|| {
            let (slots, sizes, scratch) = batch.unfilled();
            if !vnet {
                let (Some(first), Some(size)) = (slots.first_mut(), sizes.first_mut()) else {
                    return Err(invalid("no free slot".into()));
                };
                *size = self.device.recv(&mut first.data[OFFSET..])?;
                return Ok(1);
            }
            self.placement
                .read(slots, sizes, scratch, |buf| self.device.recv(buf))
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

/// Where a read with the virtio header is placed, from what the last one carried. Sparse
/// traffic (the last read one packet) is read into the first free slot, header in its
/// headroom, where a lone packet stays: a ping touches one buffer. Bulk traffic (the last read
/// a segment) is read into the batch's scratch buffer and split from there: the same 64 KB
/// every time, kept in cache, where reading each segment into the next free slot would run
/// through all 256 slots' 64 KB buffers in turn (16 MB) and miss the cache on every read.
///
/// Taking reads apart here rather than in tun-rs's `recv_multiple`, which checks every slot
/// it is handed before reading (256 of them, 8 KB of slot headers pulled into the cache for a
/// lone ping) and always copies out of a scratch buffer, keeps a one-packet read to the slot it
/// fills.
#[derive(Debug, Default)]
struct Placement {
    /// The last read was a segment.
    bulk: AtomicBool,
}

impl Placement {
    /// One read by `recv` (which fills the buffer it is given with a virtio header and what
    /// follows), made into packets in the free `slots` from the first. Returns their number.
    fn read(
        &self,
        slots: &mut [Slot],
        sizes: &mut [usize],
        scratch: &mut Vec<u8>,
        recv: impl FnOnce(&mut [u8]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let first = slots
            .first_mut()
            .ok_or_else(|| invalid("no free slot".into()))?;
        let landed = if self.bulk.load(Ordering::Relaxed) {
            Landed::Scratch(recv(scratch)?)
        } else {
            Landed::Slot(recv(&mut first.data)?)
        };
        let (n, segment) = take_read(slots, sizes, scratch, landed)?;
        self.bulk.store(segment, Ordering::Relaxed);
        Ok(n)
    }
}

/// Where a read of so many bytes (virtio header included) landed.
#[derive(Debug, Clone, Copy)]
enum Landed {
    /// In the first free slot.
    Slot(usize),
    /// In the scratch buffer.
    Scratch(usize),
}

/// A read made into packets: one packet ends in the first slot (its checksum completed if the
/// kernel left that to the device); a segment is split from `scratch` (moved there if it
/// landed in the slot) into the slots from the first. Returns the number of packets and
/// whether it was a segment.
fn take_read(
    slots: &mut [Slot],
    sizes: &mut [usize],
    scratch: &mut Vec<u8>,
    landed: Landed,
) -> io::Result<(usize, bool)> {
    let (Some(first), Some(size)) = (slots.first_mut(), sizes.first_mut()) else {
        return Err(invalid("no free slot".into()));
    };
    let (len, hdr) = match landed {
        Landed::Slot(len) => (len, header(&first.data, len)?),
        Landed::Scratch(len) => (len, header(scratch, len)?),
    };
    if hdr.gso_type == GSO_NONE {
        let packet = first
            .data
            .get_mut(OFFSET..len)
            .ok_or_else(|| invalid(format!("a TUN packet of {len} bytes overflows its slot")))?;
        if let Landed::Scratch(_) = landed {
            packet.copy_from_slice(&scratch[OFFSET..len]);
        }
        if hdr.flags & NEEDS_CSUM != 0 {
            complete_checksum(packet, hdr.csum_start, hdr.csum_offset)?;
        }
        *size = len - OFFSET;
        return Ok((1, false));
    }
    if let Landed::Slot(_) = landed {
        // Split from a buffer of its own into the slots, the first included.
        std::mem::swap(&mut first.data, scratch);
        first.len = first.data.len();
    }
    let segment = &mut scratch[OFFSET..len];
    let (hdr, is_v6) = segment_header(hdr, segment)?;
    Ok((
        tun_rs::gso_split(segment, hdr, slots, sizes, OFFSET, is_v6)?,
        true,
    ))
}

/// The virtio header of a read of `len` bytes into `buf`, which must carry a packet behind it.
fn header(buf: &[u8], len: usize) -> io::Result<VirtioNetHdr> {
    match buf.get(..len).filter(|r| r.len() > OFFSET) {
        Some(read) => VirtioNetHdr::decode(read),
        None => Err(invalid(format!(
            "a TUN read of {len} bytes has no packet behind its {OFFSET}-byte virtio header"
        ))),
    }
}

/// `hdr` made ready to split `segment` by: `hdr_len` (which the kernel may set to a whole
/// packet on the forwarding path) recomputed from the transport header; whether it is IPv6.
fn segment_header(mut hdr: VirtioNetHdr, segment: &[u8]) -> io::Result<(VirtioNetHdr, bool)> {
    let is_v6 = match segment.first().map(|b| b >> 4) {
        Some(4) => false,
        Some(6) => true,
        v => return Err(invalid(format!("a TUN segment of IP version {v:?}"))),
    };
    let transport = usize::from(hdr.csum_start);
    let header = if hdr.gso_type & !GSO_ECN == GSO_UDP_L4 {
        8
    } else {
        // TCP: the data offset, in 32-bit words, is the high nibble of byte 12.
        let words = segment
            .get(transport + 12)
            .map_or(0, |b| usize::from(b >> 4));
        if !(5..=15).contains(&words) {
            return Err(invalid(format!(
                "a TUN segment's TCP header at {transport} is {} bytes long",
                words * 4
            )));
        }
        words * 4
    };
    hdr.hdr_len = u16::try_from(transport + header)
        .map_err(|_| invalid(format!("a TUN segment's headers end past {}", u16::MAX)))?;
    Ok((hdr, is_v6))
}

/// Completes a transport checksum the kernel left to the device (`CHECKSUM_PARTIAL`): the
/// field at `start + offset` holds the pseudo-header's sum; the sum from `start` to the end
/// replaces it. As the kernel does, a result of 0 is sent as `0xffff` (0 would mean "no
/// checksum" to UDP, which IPv6 refuses).
fn complete_checksum(packet: &mut [u8], start: u16, offset: u16) -> io::Result<()> {
    let start = usize::from(start);
    let at = start + usize::from(offset);
    let Some(field) = packet.get(at..at + 2) else {
        return Err(invalid(format!(
            "a TUN packet of {} bytes has its checksum at {at}",
            packet.len()
        )));
    };
    let partial = u16::from_be_bytes([field[0], field[1]]);
    packet[at..at + 2].fill(0);
    let sum = !tun_rs::checksum(&packet[start..], u64::from(partial));
    let sum = if sum == 0 { 0xffff } else { sum };
    packet[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

/// A read the driver counts and drops (it carries no OS error: see [`is_fatal`]).
fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
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
    use std::cell::Cell;

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

    /// The ones' complement sum of `bytes` (a reference for the tests).
    fn ones_sum(bytes: &[u8], mut sum: u32) -> u16 {
        for pair in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
        while sum > 0xffff {
            sum = (sum >> 16) + (sum & 0xffff);
        }
        sum as u16
    }

    /// An IPv4 UDP packet from 100.64.1.2 to 100.64.2.3 with `payload`, its checksum field
    /// holding the pseudo-header's sum, as the kernel leaves it for the device; and the
    /// checksum it should end with.
    fn partial_udp4(payload: &[u8]) -> (Vec<u8>, u16) {
        let udp_len = 8 + payload.len();
        let mut p = vec![
            0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 100, 64, 1, 2, 100, 64, 2, 3,
        ];
        p[2..4].copy_from_slice(&u16::try_from(20 + udp_len).unwrap().to_be_bytes());
        p.extend_from_slice(&[0x9c, 0x40, 0x13, 0x88]);
        p.extend_from_slice(&u16::try_from(udp_len).unwrap().to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        let mut pseudo = p[12..20].to_vec();
        pseudo.extend_from_slice(&[0, 17]);
        pseudo.extend_from_slice(&u16::try_from(udp_len).unwrap().to_be_bytes());
        let partial = ones_sum(&pseudo, 0);
        let full = !ones_sum(&p[20..], u32::from(partial));
        p[26..28].copy_from_slice(&partial.to_be_bytes());
        (p, if full == 0 { 0xffff } else { full })
    }

    /// A device's read of `packet` behind a virtio header `hdr`, into the buffer it is given,
    /// whose address it records in `given`.
    fn device<'a>(
        hdr: &'a VirtioNetHdr,
        packet: &'a [u8],
        given: &'a Cell<usize>,
    ) -> impl FnOnce(&mut [u8]) -> io::Result<usize> + 'a {
        move |buf| {
            given.set(buf.as_ptr() as usize);
            hdr.encode(&mut buf[..OFFSET]).unwrap();
            buf[OFFSET..OFFSET + packet.len()].copy_from_slice(packet);
            Ok(OFFSET + packet.len())
        }
    }

    /// Reads `packet` behind `hdr` into `batch`'s free slots as `placement` places it; the
    /// address of the buffer the device was given goes into `given`.
    fn read_with(
        placement: &Placement,
        batch: &mut Packets,
        hdr: &VirtioNetHdr,
        packet: &[u8],
        given: &Cell<usize>,
    ) -> io::Result<usize> {
        let (slots, sizes, scratch) = batch.unfilled();
        let n = placement.read(slots, sizes, scratch, device(hdr, packet, given))?;
        batch.added(n);
        Ok(n)
    }

    /// A fresh batch that read `packet` behind `hdr`, placed as after a segment (`bulk`) or
    /// after a packet, and what taking the read said.
    fn read_and_take(
        bulk: bool,
        hdr: &VirtioNetHdr,
        packet: &[u8],
    ) -> (Packets, io::Result<usize>) {
        let placement = Placement {
            bulk: AtomicBool::new(bulk),
        };
        let mut batch = Packets::new();
        let taken = read_with(&placement, &mut batch, hdr, packet, &Cell::new(0));
        (batch, taken)
    }

    /// An IPv4 ICMP echo request, as a ping sends it.
    const PING: [u8; 20] = [
        0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 1, 0, 0, 100, 64, 1, 2, 100, 64, 2, 3,
    ];

    /// A TCP/IPv4 segment of 3000 bytes of payload, cut at an MSS of 1200, as a 64 KB read
    /// carries one, with its virtio header.
    fn tcp4_segment() -> (VirtioNetHdr, Vec<u8>) {
        let mut packet = vec![
            0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0, 100, 64, 1, 2, 100, 64, 2, 3,
        ];
        packet.extend_from_slice(&[0x9c, 0x40, 0x13, 0x88, 0, 0, 0, 1, 0, 0, 0, 0]);
        packet.extend_from_slice(&[0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
        packet.extend((0..3000).map(|i| i as u8));
        let hdr = VirtioNetHdr {
            flags: NEEDS_CSUM,
            gso_type: tun_rs::VIRTIO_NET_HDR_GSO_TCPV4,
            // The forwarding path may claim the whole packet as headers: not trusted.
            hdr_len: u16::try_from(packet.len()).unwrap(),
            gso_size: 1200,
            csum_start: 20,
            csum_offset: 16,
        };
        (hdr, packet)
    }

    /// The three packets `tcp4_segment` splits into, at the front of `batch`, each with valid
    /// IPv4 and TCP checksums and the segment's payload.
    fn assert_split(batch: &Packets, packet: &[u8]) {
        let sizes: Vec<usize> = (0..3).map(|i| batch.get(i).len()).collect();
        assert_eq!(sizes, [1240, 1240, 640]);
        for i in 0..3 {
            let p = batch.get(i);
            assert_eq!(ones_sum(&p[..20], 0), 0xffff, "segment {i}'s IP header");
            let mut pseudo = p[12..20].to_vec();
            pseudo.extend_from_slice(&[0, 6]);
            pseudo.extend_from_slice(&u16::try_from(p.len() - 20).unwrap().to_be_bytes());
            let sum = ones_sum(&p[20..], u32::from(ones_sum(&pseudo, 0)));
            assert_eq!(sum, 0xffff, "segment {i}'s TCP checksum");
            assert_eq!(
                p[40..],
                packet[40 + 1200 * i..(40 + 1200 * (i + 1)).min(packet.len())]
            );
        }
    }

    /// The header of an IPv4 UDP packet whose checksum the kernel left to the device.
    const UDP4_PARTIAL: VirtioNetHdr = VirtioNetHdr {
        flags: NEEDS_CSUM,
        gso_type: GSO_NONE,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 20,
        csum_offset: 6,
    };

    #[test]
    fn a_lone_packet_is_taken_where_it_was_read() {
        let mut batch = Packets::new();
        let slot = batch.slots[0].data.as_ptr() as usize;
        let given = Cell::new(0);
        let n = read_with(
            &Placement::default(),
            &mut batch,
            &VirtioNetHdr::default(),
            &PING,
            &given,
        );
        assert_eq!(n.unwrap(), 1);
        assert_eq!(batch.get(0), &PING);
        assert_eq!(given.get(), slot, "read into the slot, not copied there");
        assert_eq!(batch.slots[0].data.as_ptr() as usize, slot);
    }

    #[test]
    fn reads_go_to_the_scratch_buffer_after_a_segment_and_back_to_the_slot_after_a_packet() {
        let placement = Placement::default();
        let (hdr, segment) = tcp4_segment();
        let given = Cell::new(0);
        let mut batch = Packets::new();
        let read = |batch: &mut Packets, hdr: &VirtioNetHdr, packet: &[u8]| {
            read_with(&placement, batch, hdr, packet, &given).unwrap()
        };
        // A segment after a packet lands in the slot and is split from a buffer of its own.
        let slot = batch.slots[0].data.as_ptr() as usize;
        assert_eq!(read(&mut batch, &hdr, &segment), 3);
        assert_eq!(given.get(), slot);
        assert_split(&batch, &segment);
        batch.clear();
        // The next read goes to the scratch buffer, the same one each time.
        let scratch = batch.scratch.as_ptr() as usize;
        for _ in 0..2 {
            assert_eq!(read(&mut batch, &hdr, &segment), 3);
            assert_eq!(given.get(), scratch, "a segment after a segment");
            assert_split(&batch, &segment);
            batch.clear();
        }
        // A packet read there is copied into the slot ...
        assert_eq!(read(&mut batch, &VirtioNetHdr::default(), &PING), 1);
        assert_eq!(given.get(), scratch);
        assert_eq!(batch.get(0), &PING);
        batch.clear();
        // ... and the next read goes to the slot again.
        let slot = batch.slots[0].data.as_ptr() as usize;
        assert_eq!(read(&mut batch, &VirtioNetHdr::default(), &PING), 1);
        assert_eq!(given.get(), slot);
        assert_eq!(batch.get(0), &PING);
        assert_free_slots_whole(&mut batch);
    }

    #[test]
    fn a_checksum_left_to_the_device_is_completed() {
        let payloads = [&b"weft"[..], &b"odd"[..], &[0xff; 64][..]];
        for (payload, bulk) in payloads.into_iter().flat_map(|p| [(p, false), (p, true)]) {
            let (packet, want) = partial_udp4(payload);
            let (batch, taken) = read_and_take(bulk, &UDP4_PARTIAL, &packet);
            assert_eq!(taken.unwrap(), 1);
            let got = batch.get(0);
            assert_eq!(got.len(), packet.len());
            assert_eq!(u16::from_be_bytes([got[26], got[27]]), want, "{payload:?}");
            assert_eq!(got[..26], packet[..26]);
            assert_eq!(got[28..], packet[28..]);
        }
    }

    #[test]
    fn a_checksum_that_sums_to_zero_is_sent_as_all_ones() {
        // Choose the payload's last two bytes so the data sum completes to 0.
        let (probe, _) = partial_udp4(&[0, 0]);
        let rest = ones_sum(&probe[20..], 0);
        let fill = !rest;
        let (packet, want) = partial_udp4(&fill.to_be_bytes());
        assert_eq!(want, 0xffff, "the payload was chosen to complete to 0");
        for bulk in [false, true] {
            let (batch, taken) = read_and_take(bulk, &UDP4_PARTIAL, &packet);
            assert_eq!(taken.unwrap(), 1);
            assert_eq!(batch.get(0)[26..28], [0xff, 0xff], "bulk: {bulk}");
        }
    }

    #[test]
    fn a_tcp_segment_is_split_into_packets_from_the_first_slot() {
        let (hdr, packet) = tcp4_segment();
        for bulk in [false, true] {
            let (mut batch, taken) = read_and_take(bulk, &hdr, &packet);
            assert_eq!(taken.unwrap(), 3, "bulk: {bulk}");
            assert_split(&batch, &packet);
            assert_free_slots_whole(&mut batch);
        }
    }

    #[test]
    fn a_bad_read_is_refused_naming_it_without_a_panic() {
        let tcp_segment = VirtioNetHdr {
            flags: NEEDS_CSUM,
            gso_type: tun_rs::VIRTIO_NET_HDR_GSO_TCPV4,
            gso_size: 100,
            csum_start: 20,
            csum_offset: 16,
            ..VirtioNetHdr::default()
        };
        let mut bad_doff = vec![0x45; 20];
        bad_doff.extend_from_slice(&[0; 12]);
        bad_doff.push(0x10); // a data offset of 4 bytes
        bad_doff.extend_from_slice(&[0; 300]);
        let cases: [(&str, VirtioNetHdr, Vec<u8>, &str); 4] = [
            (
                "header only",
                VirtioNetHdr::default(),
                vec![],
                "no packet behind",
            ),
            (
                "checksum past the end",
                UDP4_PARTIAL,
                vec![0x45; 24],
                "checksum at 26",
            ),
            (
                "segment of IP version 7",
                tcp_segment,
                vec![0x70; 200],
                "IP version Some(7)",
            ),
            (
                "TCP header of 4 bytes",
                tcp_segment,
                bad_doff,
                "is 4 bytes long",
            ),
        ];
        for (what, hdr, packet, says) in cases {
            for bulk in [false, true] {
                let (mut batch, taken) = read_and_take(bulk, &hdr, &packet);
                let e = taken.expect_err(what);
                assert!(!is_fatal(&e), "{what}: counted, not fatal");
                assert!(e.to_string().contains(says), "{what}: {e}");
                assert!(batch.is_empty(), "{what}: nothing taken");
                assert_free_slots_whole(&mut batch);
            }
        }
    }

    proptest::proptest! {
        /// Whatever header and bytes a read holds, taking it apart never panics: it gives
        /// packets that fit their slots, or an error the driver counts.
        #[test]
        fn any_read_is_taken_or_refused_without_a_panic(
            flags in 0u8..4,
            gso_type in proptest::prop_oneof![
                proptest::strategy::Just(GSO_NONE),
                proptest::strategy::Just(tun_rs::VIRTIO_NET_HDR_GSO_TCPV4),
                proptest::strategy::Just(tun_rs::VIRTIO_NET_HDR_GSO_TCPV6),
                proptest::strategy::Just(GSO_UDP_L4),
                proptest::prelude::any::<u8>(),
            ],
            hdr_len in proptest::prelude::any::<u16>(),
            gso_size in 0u16..2000,
            csum_start in 0u16..120,
            csum_offset in 0u16..40,
            version in proptest::prop_oneof![
                proptest::strategy::Just(0x45u8),
                proptest::strategy::Just(0x60u8),
                proptest::prelude::any::<u8>(),
            ],
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3000),
            bulk in proptest::prelude::any::<bool>(),
        ) {
            let hdr = VirtioNetHdr { flags, gso_type, hdr_len, gso_size, csum_start, csum_offset };
            let mut packet = body;
            if let Some(first) = packet.first_mut() {
                *first = version;
            }
            let (batch, taken) = read_and_take(bulk, &hdr, &packet);
            match taken {
                Ok(n) => {
                    proptest::prop_assert!((1..=SLOTS).contains(&n));
                    for i in 0..n {
                        proptest::prop_assert!(batch.get(i).len() <= SLOT);
                    }
                }
                Err(e) => proptest::prop_assert!(!is_fatal(&e), "{e}"),
            }
        }
    }
}
