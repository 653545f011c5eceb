//! The provided buffer ring of one reactor (io_uring "buf_ring", Linux 5.19+): the kernel picks
//! a free buffer when data arrives on any connection, so an idle connection holds no receive
//! buffer of its own.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;

/// The buffer group every receive of a reactor draws from.
pub const BUFFER_GROUP: u16 = 0;

pub struct BufferRing {
    /// Page-aligned ring of `entries` descriptors, shared with the kernel.
    ring: *mut BufRingEntry,
    ring_layout: Layout,
    entries: u16,
    /// The buffers themselves, `buffer_size` bytes each, never moved while registered.
    memory: Vec<u8>,
    buffer_size: usize,
    /// Our producer cursor; published to the kernel by `commit`.
    tail: u16,
}

// SAFETY: the ring and the buffers are owned by this value alone and used by whichever single
// thread holds it (it is not `Sync`); a reactor is built on one thread and then moved, before
// use, to the thread that runs it.
unsafe impl Send for BufferRing {}

impl std::fmt::Debug for BufferRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferRing")
            .field("entries", &self.entries)
            .field("buffer_size", &self.buffer_size)
            .finish()
    }
}

impl BufferRing {
    /// Allocates `entries` buffers (a power of two, at most 32,768) of `buffer_size` bytes and
    /// registers them with `submitter`.
    pub fn new(
        submitter: &io_uring::Submitter<'_>,
        entries: u16,
        buffer_size: usize,
    ) -> io::Result<Self> {
        assert!(
            entries.is_power_of_two() && entries <= 32_768,
            "buffer ring entries must be a power of two up to 32768"
        );
        let ring_layout = Layout::from_size_align(
            usize::from(entries) * std::mem::size_of::<BufRingEntry>(),
            4096,
        )
        .expect("a valid ring layout");
        // SAFETY: the layout has a non-zero size; the memory is zeroed, a valid state for the
        // plain-integer descriptors.
        let ring = unsafe { alloc_zeroed(ring_layout) }.cast::<BufRingEntry>();
        if ring.is_null() {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "cannot allocate the buffer ring",
            ));
        }
        let mut buffers = Self {
            ring,
            ring_layout,
            entries,
            memory: vec![0; usize::from(entries) * buffer_size],
            buffer_size,
            tail: 0,
        };
        // SAFETY: `ring` is page-aligned, sized for `entries` descriptors, and stays allocated
        // (and unmoved) until `drop`, which outlives the io_uring instance's use of it because the
        // reactor drops the ring first.
        unsafe { submitter.register_buf_ring_with_flags(ring as u64, entries, BUFFER_GROUP, 0) }.map_err(|error| {
            io::Error::new(error.kind(), format!("registering the provided buffer ring failed ({error}); shardmq needs Linux 6.0 or later"))
        })?;
        for id in 0..entries {
            buffers.push(id);
        }
        buffers.commit();
        Ok(buffers)
    }

    /// The bytes the kernel wrote into buffer `id`.
    pub fn get(&self, id: u16, length: usize) -> &[u8] {
        let start = usize::from(id) * self.buffer_size;
        &self.memory[start..start + length.min(self.buffer_size)]
    }

    /// Gives buffer `id` back to the kernel (visible after `commit`).
    pub fn push(&mut self, id: u16) {
        let index = usize::from(self.tail & (self.entries - 1));
        // SAFETY: `index` is below `entries`, inside the ring allocation; the kernel reads only
        // descriptors between its head and our published tail, and this one is beyond the tail
        // until `commit`.
        let entry = unsafe { &mut *self.ring.add(index) };
        entry.set_addr(self.memory.as_ptr() as u64 + (usize::from(id) * self.buffer_size) as u64);
        entry.set_len(self.buffer_size as u32);
        entry.set_bid(id);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Publishes the pushed buffers to the kernel.
    pub fn commit(&self) {
        // SAFETY: the tail field lives in the first descriptor of the ring, which is valid and
        // aligned for a u16; the kernel reads it concurrently, hence the atomic release store.
        unsafe {
            let tail = BufRingEntry::tail(self.ring).cast_mut().cast::<AtomicU16>();
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}

impl Drop for BufferRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; the io_uring instance that used it has
        // been dropped (the reactor declares the ring before the buffers).
        unsafe { dealloc(self.ring.cast(), self.ring_layout) }
    }
}
