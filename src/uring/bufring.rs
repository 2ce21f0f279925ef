//! Provided buffer rings (IORING_REGISTER_PBUF_RING) and the move-only handles to their
//! buffers.
//!
//! The kernel picks a buffer for each receive completion of a multishot receive and reports
//! its id in the CQE flags; the ring turns that into a [`PBuf`], a handle the application owns.
//! A handle is not `Clone`: a buffer goes back to the kernel when its last handle is dropped
//! (handles are counted per buffer, so a buffer that several sends read is returned after the
//! last of them). Sending a buffer moves its handle into the op, which keeps it until the op's
//! final completion and then hands it back. Recycling a buffer twice therefore cannot be
//! written, and a buffer can never go back to the kernel while an op reads it.
//!
//! Returned entries become visible to the kernel when [`BufPool::publish`] stores the new tail
//! with Release ordering, once per event-loop turn.
//!
//! The kernel picks buffers in ring order, oldest entry first, so a ring holding every buffer
//! of a large pool would cycle through all of its memory and receive each payload into a
//! cache-cold buffer. A pool therefore exposes at most `exposed` entries at a time and keeps the
//! rest as a stack of spare buffers, most recently returned on top: `publish` tops the ring up
//! from that stack, so the buffers in use are the ones touched last. (Measured in
//! results/2026-12-02-hot-buffers.md: 2,048 exposed 16 KiB buffers cost the copy path up to
//! 20% of its throughput under iperf3 against 256.)
//!
//! A pool without a kernel ring (`BufPool::detached`) keeps the same bookkeeping over heap
//! memory; the recording fake engine uses it, so relay tests exercise the real handle rules.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::cell::Cell;
use std::collections::VecDeque;
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;

/// A buffer group registered with a ring (its index in the ring's list of pools).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Group(pub(super) u16);

impl Group {
    /// The group's index among its ring's pools.
    pub(crate) fn index(self) -> usize {
        self.0 as usize
    }

    /// The buffer group id the kernel knows this group by.
    pub(super) fn bgid(self) -> u16 {
        self.0 + 1
    }
}

/// The memory of a pool: buffer data, and (for a kernel pool) the registered ring of entries.
/// Freed only when the pool and every handle into it are gone.
pub(crate) struct BufPool {
    group: Group,
    entries: u16,
    buf_size: u32,
    /// The ring of entries shared with the kernel; None for a detached pool.
    ring: Option<(*mut BufRingEntry, Layout)>,
    data: *mut u8,
    data_layout: Layout,
    /// Our copy of the tail; published to the kernel by `publish`.
    tail: Cell<u16>,
    /// At most this many entries are in the kernel's ring at once.
    exposed: u16,
    /// Entries written to the ring and not yet claimed back by a completion.
    in_ring: Cell<u16>,
    /// A kernel pool's returned buffers not in the ring, most recently returned last.
    spare: std::cell::RefCell<Vec<u16>>,
    /// Buffers the application holds (handed out and not yet returned).
    held: Cell<u32>,
    /// Per buffer: how many handles exist (0 = the kernel's, or free in a detached pool).
    refs: Box<[Cell<u16>]>,
    dirty: Cell<bool>,
    /// A detached pool's free buffers, in the order a kernel would hand them out.
    free: std::cell::RefCell<VecDeque<u16>>,
}

impl BufPool {
    fn alloc(
        group: Group,
        entries: u16,
        buf_size: u32,
        exposed: u16,
        ring: bool,
    ) -> io::Result<BufPool> {
        assert!(entries.is_power_of_two() && entries <= 32768);
        assert!(exposed >= 1 && exposed <= entries);
        let data_layout = Layout::from_size_align(entries as usize * buf_size as usize, 4096)
            .map_err(io::Error::other)?;
        // SAFETY: the layout has a non-zero size (asserted power of two entries, and callers
        // ask for non-empty buffers); the block is freed in Drop with the same layout.
        let data = unsafe { alloc_zeroed(data_layout) };
        if data.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        let ring = if ring {
            let layout = Layout::from_size_align(
                entries as usize * std::mem::size_of::<BufRingEntry>(),
                4096,
            )
            .map_err(io::Error::other)?;
            // SAFETY: non-zero size; freed in Drop with the same layout.
            let p = unsafe { alloc_zeroed(layout) };
            if p.is_null() {
                // SAFETY: allocated just above with this layout, not shared yet.
                unsafe { dealloc(data, data_layout) };
                return Err(io::Error::from(io::ErrorKind::OutOfMemory));
            }
            Some((p as *mut BufRingEntry, layout))
        } else {
            None
        };
        Ok(BufPool {
            group,
            entries,
            buf_size,
            ring,
            data,
            data_layout,
            tail: Cell::new(0),
            exposed,
            in_ring: Cell::new(0),
            spare: std::cell::RefCell::new(Vec::with_capacity(entries as usize)),
            held: Cell::new(0),
            refs: (0..entries).map(|_| Cell::new(0)).collect(),
            dirty: Cell::new(false),
            free: std::cell::RefCell::new((0..entries).collect()),
        })
    }

    /// A pool whose entries are to be registered with a ring as `group`; the kernel is offered
    /// `exposed` of them at a time, the first once [`BufPool::publish`] has run.
    pub(super) fn for_ring(
        group: Group,
        entries: u16,
        buf_size: u32,
        exposed: u16,
    ) -> io::Result<BufPool> {
        let pool = Self::alloc(group, entries, buf_size, exposed, true)?;
        // Lowest ids on top of the stack, so the first buffers used are the first in memory.
        pool.spare.borrow_mut().extend((0..entries).rev());
        Ok(pool)
    }

    /// A pool with no kernel ring: buffers are handed out by [`BufPool::take_free`].
    #[cfg(test)]
    pub(super) fn detached(group: Group, entries: u16, buf_size: u32) -> io::Result<BufPool> {
        Self::alloc(group, entries, buf_size, entries, false)
    }

    /// The address of the entry ring, for registration.
    pub(super) fn ring_addr(&self) -> Option<u64> {
        self.ring.map(|(p, _)| p as u64)
    }

    pub(crate) fn group(&self) -> Group {
        self.group
    }

    pub(crate) fn buf_size(&self) -> u32 {
        self.buf_size
    }

    /// Buffers the application holds.
    pub(crate) fn held(&self) -> u32 {
        self.held.get()
    }

    /// Buffers the kernel can still pick from (after the next `publish`).
    pub(crate) fn available(&self) -> u32 {
        u32::from(self.entries) - self.held.get()
    }

    /// Takes the handle of buffer `bid`, which a completion says the kernel filled. Returns
    /// None for an id that is out of range or already handed out (a kernel that broke the
    /// buffer-ring contract): the buffer is then not touched.
    pub(super) fn claim(self: &Rc<Self>, bid: u16) -> Option<PBuf> {
        let refs = self.refs.get(bid as usize)?;
        if refs.get() != 0 {
            return None;
        }
        refs.set(1);
        self.held.set(self.held.get() + 1);
        if self.ring.is_some() {
            self.in_ring.set(self.in_ring.get().saturating_sub(1));
        }
        Some(PBuf {
            pool: self.clone(),
            bid,
        })
    }

    /// A detached pool's next free buffer, handed out as a kernel would.
    #[cfg(test)]
    pub(super) fn take_free(self: &Rc<Self>) -> Option<PBuf> {
        let bid = self.free.borrow_mut().pop_front()?;
        self.claim(bid)
    }

    /// Writes the entry for buffer `bid` at the tail (or, detached, frees it).
    fn push_entry(&self, bid: u16) {
        let Some((ring, _)) = self.ring else {
            self.free.borrow_mut().push_back(bid);
            return;
        };
        let mask = self.entries - 1;
        let tail = self.tail.get();
        // SAFETY: the index is masked into the ring, which has `entries` entries. The entry at
        // the tail is ours to write until the tail is published (the kernel reads entries only
        // below the published tail), and no reference to it exists elsewhere.
        unsafe {
            let e = &mut *ring.add((tail & mask) as usize);
            e.set_addr(self.data.add(bid as usize * self.buf_size as usize) as u64);
            e.set_len(self.buf_size);
            e.set_bid(bid);
        }
        self.tail.set(tail.wrapping_add(1));
        self.in_ring.set(self.in_ring.get() + 1);
        self.dirty.set(true);
    }

    /// Drops one handle of buffer `bid`; the last one gives the buffer back.
    fn release(&self, bid: u16) {
        let refs = &self.refs[bid as usize];
        refs.set(refs.get() - 1);
        if refs.get() > 0 {
            return;
        }
        self.held.set(self.held.get() - 1);
        if self.ring.is_some() {
            self.spare.borrow_mut().push(bid);
        } else {
            self.push_entry(bid);
        }
    }

    /// Tops the kernel's ring up to `exposed` entries from the spare stack, most recently
    /// returned first, and publishes them. Returns true if any were published.
    pub(crate) fn publish(&self) -> bool {
        let Some((ring, _)) = self.ring else {
            return false;
        };
        {
            let mut spare = self.spare.borrow_mut();
            while self.in_ring.get() < self.exposed {
                let Some(bid) = spare.pop() else { break };
                self.push_entry(bid);
            }
        }
        if !self.dirty.replace(false) {
            return false;
        }
        // SAFETY: the tail field lives in the first entry of the registered ring, which this
        // pool owns; the kernel reads it with acquire semantics, so the entries written above
        // are visible to it first.
        unsafe {
            let tail = BufRingEntry::tail(ring) as *const AtomicU16;
            (*tail).store(self.tail.get(), Ordering::Release);
        }
        true
    }

    /// Pointer to byte `off` of buffer `bid`.
    fn ptr(&self, bid: u16, off: u32) -> *mut u8 {
        assert!(bid < self.entries && off <= self.buf_size);
        // SAFETY: in bounds of the data block by the assertion above.
        unsafe {
            self.data
                .add(bid as usize * self.buf_size as usize + off as usize)
        }
    }
}

impl Drop for BufPool {
    fn drop(&mut self) {
        // SAFETY: allocated in `alloc` with these layouts. A pool is dropped only when no
        // handle refers to it (every handle holds an `Rc`), so no op in flight has one of its
        // buffers; the ring unregisters the group and drains its ops before dropping its own
        // `Rc`, and leaks it instead when draining fails (`Ring::drop`).
        unsafe {
            if let Some((ring, layout)) = self.ring {
                dealloc(ring as *mut u8, layout);
            }
            dealloc(self.data, self.data_layout);
        }
    }
}

/// A buffer of a [`BufPool`] that the application holds: move-only, returned to the kernel
/// when the last handle to the buffer is dropped.
pub(crate) struct PBuf {
    pool: Rc<BufPool>,
    bid: u16,
}

impl PBuf {
    /// The whole buffer, for reading.
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: the buffer lies in the pool's data block, alive while this handle holds its
        // `Rc`. The kernel writes a buffer only while it is in the ring (no handle exists), and
        // only a sole handle can write it (`bytes_mut`), so nothing writes it while this
        // shared borrow lives (a send op holding another handle only reads it).
        unsafe {
            std::slice::from_raw_parts(self.pool.ptr(self.bid, 0), self.pool.buf_size as usize)
        }
    }

    /// The whole buffer, for writing, if this is its only handle (no op is reading it).
    pub(crate) fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        if self.pool.refs[self.bid as usize].get() != 1 {
            return None;
        }
        // SAFETY: as in `bytes`; and this is the buffer's only handle, borrowed mutably, so
        // neither an op nor another handle can read or write the buffer meanwhile.
        Some(unsafe {
            std::slice::from_raw_parts_mut(self.pool.ptr(self.bid, 0), self.pool.buf_size as usize)
        })
    }

    /// Another handle to the same buffer (for a second send that reads another part of it).
    /// The buffer goes back to the kernel only after both are dropped.
    pub(crate) fn share(&self) -> PBuf {
        let refs = &self.pool.refs[self.bid as usize];
        refs.set(refs.get() + 1);
        PBuf {
            pool: self.pool.clone(),
            bid: self.bid,
        }
    }

    pub(crate) fn len(&self) -> u32 {
        self.pool.buf_size
    }

    /// Pointer to byte `off`, for an op that takes this handle and keeps it until its final
    /// completion.
    pub(super) fn ptr(&self, off: u32) -> *const u8 {
        self.pool.ptr(self.bid, off)
    }
}

impl Drop for PBuf {
    fn drop(&mut self) {
        self.pool.release(self.bid);
    }
}

impl std::fmt::Debug for PBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PBuf(group {}, id {})", self.pool.group.0, self.bid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_returns_after_its_last_handle() {
        let pool = Rc::new(BufPool::detached(Group(0), 4, 64).unwrap());
        assert_eq!(pool.available(), 4);
        let mut a = pool.take_free().unwrap();
        a.bytes_mut().unwrap()[0] = 7;
        let b = a.share();
        assert!(a.bytes_mut().is_none(), "shared buffers are read-only");
        assert_eq!(b.bytes()[0], 7);
        assert_eq!(pool.available(), 3);
        drop(a);
        assert_eq!(pool.available(), 3);
        drop(b);
        assert_eq!(pool.available(), 4);
        // Claiming a buffer that is already out is refused.
        let c = pool.take_free().unwrap();
        assert!(pool.claim(c.bid).is_none());
        assert!(pool.claim(99).is_none());
    }

    #[test]
    fn kernel_pool_publishes_returned_entries() {
        let pool = Rc::new(BufPool::for_ring(Group(0), 2, 64, 2).unwrap());
        assert!(pool.publish());
        assert!(!pool.publish(), "nothing new");
        let a = pool.claim(1).unwrap();
        assert_eq!(pool.available(), 1);
        drop(a);
        assert!(pool.publish());
    }

    /// The ids of the entries between `from` and the pool's tail, in the kernel's pick order.
    fn ring_ids(pool: &BufPool, from: u16) -> Vec<u16> {
        let (ring, _) = pool.ring.unwrap();
        let mask = pool.entries - 1;
        let mut ids = Vec::new();
        let mut i = from;
        while i != pool.tail.get() {
            // SAFETY: masked into the entry ring, which `pool` owns; no kernel reads it here.
            ids.push(unsafe { (*ring.add((i & mask) as usize)).bid() });
            i = i.wrapping_add(1);
        }
        ids
    }

    #[test]
    fn kernel_pool_offers_at_most_exposed_entries_most_recent_first() {
        let pool = Rc::new(BufPool::for_ring(Group(0), 8, 64, 2).unwrap());
        assert!(pool.publish());
        assert_eq!(ring_ids(&pool, 0), [0, 1], "two exposed, lowest ids first");
        assert_eq!(pool.available(), 8, "spares count as available");
        // The kernel picks both; the ring is topped up from the spares.
        let (a, b) = (pool.claim(0).unwrap(), pool.claim(1).unwrap());
        assert!(pool.publish());
        assert_eq!(ring_ids(&pool, 2), [2, 3]);
        // Returned buffers wait on the stack while the ring is full...
        drop(a);
        drop(b);
        assert!(!pool.publish(), "the ring is full");
        assert_eq!(pool.available(), 8);
        // ...and are offered next, the most recently returned first.
        let (c, d) = (pool.claim(2).unwrap(), pool.claim(3).unwrap());
        assert!(pool.publish());
        assert_eq!(ring_ids(&pool, 4), [1, 0]);
        drop((c, d));
    }
}
