//! A provided buffer ring (IORING_REGISTER_PBUF_RING): the copy path's receive buffers.
//!
//! The kernel picks a buffer for each multishot receive completion and reports its id in the
//! CQE flags (`flags >> 16`). A buffer belongs to the application from that completion until
//! [`BufRing::recycle`] puts it back; the relay recycles only after the send that reads it has
//! completed. Returned entries become visible to the kernel when [`BufRing::publish`] stores
//! the new tail with Release ordering, once per event-loop turn.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;

use super::ring::Ring;

pub struct BufRing {
    bgid: u16,
    entries: u16,
    buf_size: u32,
    ring: *mut BufRingEntry,
    ring_layout: Layout,
    data: *mut u8,
    data_layout: Layout,
    /// Our copy of the tail; published to the kernel by `publish`.
    tail: u16,
    /// Buffers the kernel handed to us and we have not recycled yet.
    held: u32,
    /// Per buffer: how many holders the application has (0 = the kernel's). A claim makes one;
    /// each op that reads the buffer beyond the first adds one with [`BufRing::retain`].
    refs: Vec<u16>,
    dirty: bool,
}

impl BufRing {
    /// Allocates `entries` (a power of two) buffers of `buf_size` bytes and registers them as
    /// group `bgid`. Pages are touched lazily, so unused buffers cost no resident memory.
    pub fn new(ring: &Ring, bgid: u16, entries: u16, buf_size: u32) -> io::Result<BufRing> {
        assert!(entries.is_power_of_two() && entries <= 32768);
        let ring_layout =
            Layout::from_size_align(entries as usize * std::mem::size_of::<BufRingEntry>(), 4096)
                .map_err(io::Error::other)?;
        let data_layout = Layout::from_size_align(entries as usize * buf_size as usize, 4096)
            .map_err(io::Error::other)?;
        // SAFETY: both layouts have a non-zero size; the blocks are freed in Drop with the same
        // layouts, after the group is unregistered.
        let (ring_ptr, data) = unsafe { (alloc_zeroed(ring_layout), alloc_zeroed(data_layout)) };
        if ring_ptr.is_null() || data.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        let mut br = BufRing {
            bgid,
            entries,
            buf_size,
            ring: ring_ptr as *mut BufRingEntry,
            ring_layout,
            data,
            data_layout,
            tail: 0,
            held: 0,
            refs: vec![0; entries as usize],
            dirty: false,
        };
        // SAFETY: the ring memory is page aligned, sized for `entries`, zeroed (so the tail
        // starts at 0) and outlives the registration (Drop unregisters before freeing).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(ring_ptr as u64, entries, bgid, 0)?
        };
        for bid in 0..entries {
            br.claim(bid);
            br.recycle(bid);
        }
        br.publish();
        Ok(br)
    }

    pub fn bgid(&self) -> u16 {
        self.bgid
    }

    pub fn buf_size(&self) -> u32 {
        self.buf_size
    }

    /// Pointer to byte `off` of buffer `bid`, for a send op that will own the buffer.
    pub fn ptr(&self, bid: u16, off: u32) -> *const u8 {
        assert!(bid < self.entries && off <= self.buf_size);
        // SAFETY: in bounds of the data block by the assertion above.
        unsafe {
            self.data
                .add(bid as usize * self.buf_size as usize + off as usize)
        }
    }

    pub fn entries(&self) -> u16 {
        self.entries
    }

    fn owns(&self, bid: u16) -> bool {
        self.refs[bid as usize] != 0
    }

    /// Records that a completion handed us buffer `bid`.
    pub fn claim(&mut self, bid: u16) {
        assert!(
            bid < self.entries && !self.owns(bid),
            "buffer {bid} claimed twice"
        );
        self.refs[bid as usize] = 1;
        self.held += 1;
    }

    /// Adds a holder to buffer `bid` (one more op reads it): it goes back to the kernel only
    /// after every holder has called [`BufRing::recycle`].
    pub fn retain(&mut self, bid: u16) {
        assert!(self.owns(bid), "buffer {bid} is the kernel's");
        self.refs[bid as usize] += 1;
    }

    /// The whole of buffer `bid`, which the application owns (claimed and not recycled, and
    /// not lent to an op: the caller must not call this while a send reads the buffer).
    pub fn buf_mut(&mut self, bid: u16) -> &mut [u8] {
        assert!(self.owns(bid), "buffer {bid} is the kernel's");
        // SAFETY: the buffer lies inside the data block (bid < entries, checked by `owns`'s
        // index). It is claimed, so the kernel will not pick it for a receive until it is
        // recycled, and `&mut self` makes this the only live reference into the block.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.data.add(bid as usize * self.buf_size as usize),
                self.buf_size as usize,
            )
        }
    }

    /// Buffers the kernel can still pick from (after the next `publish`).
    pub fn available(&self) -> u32 {
        u32::from(self.entries) - self.held
    }

    /// Drops one holder of buffer `bid`; the last one gives it back to the kernel (visible
    /// after the next `publish`).
    pub fn recycle(&mut self, bid: u16) {
        // Giving the kernel a buffer twice would let two receives write into it at once.
        assert!(self.owns(bid), "buffer {bid} recycled twice");
        self.refs[bid as usize] -= 1;
        if self.refs[bid as usize] > 0 {
            return;
        }
        self.held -= 1;
        let mask = self.entries - 1;
        // SAFETY: the index is masked into the ring; the entry at the tail is ours to write
        // until the tail is published (the kernel reads entries only below the tail).
        unsafe {
            let e = &mut *self.ring.add((self.tail & mask) as usize);
            e.set_addr(self.ptr(bid, 0) as u64);
            e.set_len(self.buf_size);
            e.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        self.dirty = true;
    }

    /// Publishes recycled entries to the kernel. Returns true if any were published.
    pub fn publish(&mut self) -> bool {
        if !self.dirty {
            return false;
        }
        self.dirty = false;
        // SAFETY: the tail field lives in the first entry of the registered ring; the kernel
        // reads it with acquire semantics, so the entries written above are visible first.
        unsafe {
            let tail = BufRingEntry::tail(self.ring) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
        true
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with these layouts. The shard frees this only after its
        // ring had no op in flight and the group was unregistered (`Shard::event_loop`), and
        // `Io` declares `ring` before `bufs`, so the ring fd is closed first. If ops could not
        // be drained, the shard forgets the BufRing instead of dropping it.
        unsafe {
            dealloc(self.ring as *mut u8, self.ring_layout);
            dealloc(self.data, self.data_layout);
        }
    }
}
