//! Reusable packet buffers shared by the WireGuard and netstack layers.
//!
//! The data path moves every IP packet between the UDP socket, boringtun and smoltcp. Allocating a
//! fresh `Vec` per packet would put the allocator on the hot path, so buffers come from a small
//! free list and go back to it when the packet has been consumed.

use std::sync::Mutex;

/// A free list of equally sized byte buffers.
///
/// `get` hands out a buffer whose length is the full buffer size (ready to be written into and
/// then truncated); `put` returns it. The list keeps at most `max_free` idle buffers so memory
/// stays bounded after a burst.
#[derive(Debug)]
pub struct PacketPool {
    buf_size: usize,
    max_free: usize,
    free: Mutex<Vec<Vec<u8>>>,
}

impl PacketPool {
    /// A pool of buffers of `buf_size` bytes, keeping up to `max_free` idle ones.
    pub fn new(buf_size: usize, max_free: usize) -> Self {
        Self {
            buf_size,
            max_free,
            free: Mutex::new(Vec::with_capacity(max_free)),
        }
    }

    /// Size of every buffer handed out.
    pub fn buf_size(&self) -> usize {
        self.buf_size
    }

    /// A buffer of exactly `buf_size()` bytes; contents are unspecified.
    pub fn get(&self) -> Vec<u8> {
        let recycled = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match recycled {
            Some(mut buf) => {
                buf.resize(self.buf_size, 0);
                buf
            }
            None => vec![0; self.buf_size],
        }
    }

    /// Return a buffer to the pool (dropped if the pool is full or the buffer is foreign).
    pub fn put(&self, buf: Vec<u8>) {
        if buf.capacity() < self.buf_size {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < self.max_free {
            free.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_recycled_at_full_size() {
        let pool = PacketPool::new(64, 2);
        let mut a = pool.get();
        assert_eq!(a.len(), 64);
        a.truncate(10);
        let ptr = a.as_ptr();
        pool.put(a);
        let b = pool.get();
        assert_eq!(b.len(), 64);
        assert_eq!(b.as_ptr(), ptr, "the idle buffer is reused");
    }

    #[test]
    fn free_list_is_bounded() {
        let pool = PacketPool::new(8, 1);
        pool.put(vec![0; 8]);
        pool.put(vec![0; 8]);
        assert_eq!(pool.free.lock().unwrap().len(), 1);
        pool.put(Vec::new());
        assert_eq!(
            pool.free.lock().unwrap().len(),
            1,
            "too small buffers are not kept"
        );
    }
}
