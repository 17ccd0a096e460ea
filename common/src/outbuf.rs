//! A client connection's unwritten output (SPEC 3.8): owned bytes and shared chunks in
//! answer order, written with vectored writes, and the byte count its bound is checked
//! against.
//!
//! Owned bytes (the small answers, the heads and tails of shared ones) live in one buffer,
//! so steady state allocates nothing. A shared chunk ([`SharedBytes`], a cached value, say)
//! is queued by reference. The count toward the bound holds the unwritten owned bytes, the
//! owned bytes of answers held back in their slot ([`Parked`]), and each distinct shared
//! chunk once however many queued or held-back answers use it: a thousand answers of one
//! 256 KiB value cost 256 KiB, not 256 MiB.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice, Write};

use crate::framing::SharedBytes;

/// Shared bodies shorter than this are copied: for small values a copy is cheaper than the
/// extra iovecs and the reference count (the hit path of 200-byte values stays one write).
pub const SHARE_MIN: usize = 4096;

/// Capacity kept after the owned buffer empties; above it memory is returned.
const RETAINED_CAPACITY: usize = 64 * 1024;

/// Slices per `writev`.
const MAX_IOVECS: usize = 64;

/// An answer that waits in its slot for the answers before it: owned bytes, and perhaps a
/// shared body to go after the first `split` of them.
#[derive(Debug, Default)]
pub struct Parked {
    bytes: Vec<u8>,
    shared: Option<(usize, SharedBytes)>,
}

impl Parked {
    /// Gives the owned buffer back for reuse.
    pub fn into_buffer(self) -> Vec<u8> {
        self.bytes
    }
}

#[derive(Debug)]
enum Seg {
    /// This many bytes of `Output::bytes`, from where the previous owned segment ended.
    Owned(usize),
    Shared(SharedBytes),
}

#[derive(Debug, Default)]
pub struct Output {
    bytes: Vec<u8>,
    /// Owned bytes at the front of `bytes` already written.
    pos: usize,
    segs: VecDeque<Seg>,
    /// Bytes of the front segment already written.
    front_done: usize,
    /// What the bound is checked against (see the module comment).
    counted: usize,
    /// Shared buffers this connection holds (queued or parked), by buffer: how many times.
    shared: HashMap<usize, u32>,
}

impl Output {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes counted toward the connection's output bound.
    pub fn counted(&self) -> usize {
        self.counted
    }

    /// The memory this connection's output holds, measured apart from [`Output::counted`]
    /// (for the simulator, which checks the bound against what is held, not against the
    /// count the bound is enforced with): unwritten owned bytes, the held-back answers'
    /// bytes, and each distinct shared buffer's footprint once.
    pub fn held<'a>(&self, parked: impl Iterator<Item = &'a Parked>) -> usize {
        let mut buffers = std::collections::BTreeMap::new();
        let mut owned = self.bytes.len().saturating_sub(self.pos);
        for seg in &self.segs {
            if let Seg::Shared(body) = seg {
                buffers.insert(body.buffer_key(), body.footprint());
            }
        }
        for p in parked {
            owned = owned.saturating_add(p.bytes.len());
            if let Some((_, body)) = &p.shared {
                buffers.insert(body.buffer_key(), body.footprint());
            }
        }
        buffers.values().fold(owned, |sum, n| sum.saturating_add(*n))
    }

    /// Nothing queued for writing (answers held back in slots are not queued yet).
    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    fn push_owned(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        self.counted = self.counted.saturating_add(n);
        match self.segs.back_mut() {
            Some(Seg::Owned(len)) => *len += n,
            _ => self.segs.push_back(Seg::Owned(n)),
        }
    }

    /// Appends an answer encoded by `encode`.
    pub fn append_with(&mut self, encode: impl FnOnce(&mut Vec<u8>)) {
        let before = self.bytes.len();
        encode(&mut self.bytes);
        let n = self.bytes.len().saturating_sub(before);
        self.push_owned(n);
    }

    pub fn append(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
        self.push_owned(bytes.len());
    }

    fn retain(&mut self, body: &SharedBytes) {
        let refs = self.shared.entry(body.buffer_key()).or_insert(0);
        if *refs == 0 {
            self.counted = self.counted.saturating_add(body.footprint());
        }
        *refs = refs.saturating_add(1);
    }

    fn release(&mut self, body: &SharedBytes) {
        let key = body.buffer_key();
        if let Some(refs) = self.shared.get_mut(&key) {
            *refs -= 1;
            if *refs == 0 {
                self.shared.remove(&key);
                self.counted = self.counted.saturating_sub(body.footprint());
            }
        }
    }

    /// What an answer queued behind others (or held back) keeps of `body`: a view of a much
    /// bigger buffer (a line relayed from an input buffer) is copied out, so that a slow
    /// reader pins no more than its answers; unless this connection holds that buffer already.
    /// An answer to a connection with nothing queued goes out at once, from where it is.
    fn keep(&self, body: &SharedBytes, waits: bool) -> SharedBytes {
        if waits && !self.shared.contains_key(&body.buffer_key()) {
            body.compacted()
        } else {
            body.clone()
        }
    }

    /// Appends `head`, the shared `body` (by reference), then `tail`.
    pub fn append_shared(&mut self, head: &[u8], body: &SharedBytes, tail: &[u8]) {
        let waits = !self.segs.is_empty();
        self.append(head);
        if !body.is_empty() {
            let body = self.keep(body, waits);
            self.retain(&body);
            self.segs.push_back(Seg::Shared(body));
        }
        self.append(tail);
    }

    /// Holds back an answer encoded by `encode` into `buf` (an empty, reusable buffer).
    pub fn park_with(&mut self, mut buf: Vec<u8>, encode: impl FnOnce(&mut Vec<u8>)) -> Parked {
        encode(&mut buf);
        self.counted = self.counted.saturating_add(buf.len());
        Parked { bytes: buf, shared: None }
    }

    /// Holds back `head`, the shared `body`, then `tail`.
    pub fn park_shared(&mut self, mut buf: Vec<u8>, head: &[u8], body: &SharedBytes, tail: &[u8]) -> Parked {
        buf.extend_from_slice(head);
        buf.extend_from_slice(tail);
        self.counted = self.counted.saturating_add(buf.len());
        let body = self.keep(body, true);
        self.retain(&body);
        Parked { bytes: buf, shared: Some((head.len(), body)) }
    }

    /// Queues an answer that was held back (already counted); returns its buffer for reuse.
    pub fn unpark(&mut self, parked: Parked) -> Vec<u8> {
        let Parked { mut bytes, shared } = parked;
        // Counted when parked; `append` counts again, so take it off first.
        self.counted = self.counted.saturating_sub(bytes.len());
        match shared {
            None => self.append(&bytes),
            Some((split, body)) => {
                let split = split.min(bytes.len());
                self.append(&bytes[..split]);
                self.segs.push_back(Seg::Shared(body));
                self.append(&bytes[split..]);
            }
        }
        bytes.clear();
        bytes
    }

    /// Forgets an answer that was held back (its connection is closing).
    pub fn discard(&mut self, parked: Parked) -> Vec<u8> {
        self.counted = self.counted.saturating_sub(parked.bytes.len());
        if let Some((_, body)) = &parked.shared {
            self.release(body);
        }
        let mut bytes = parked.bytes;
        bytes.clear();
        bytes
    }

    /// Writes until everything queued is written or the writer would block; returns the bytes
    /// written. `WouldBlock` is not an error here; any other error is returned.
    pub fn flush_to<W: Write>(&mut self, writer: &mut W) -> io::Result<usize> {
        let mut written = 0;
        while !self.segs.is_empty() {
            let result = {
                let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                let mut count = 0;
                let mut owned_at = self.pos;
                for (i, seg) in self.segs.iter().take(MAX_IOVECS).enumerate() {
                    let skip = if i == 0 { self.front_done } else { 0 };
                    let bytes: &[u8] = match seg {
                        Seg::Owned(len) => {
                            // `pos` is already past the written part of the front segment.
                            let start = owned_at.min(self.bytes.len());
                            let end = start.saturating_add(len.saturating_sub(skip)).min(self.bytes.len());
                            owned_at = end;
                            &self.bytes[start..end]
                        }
                        Seg::Shared(body) => body.get(skip..).unwrap_or(&[]),
                    };
                    slices[count] = IoSlice::new(bytes);
                    count += 1;
                }
                // One piece (the hit path: one small answer) goes out with a plain write,
                // which costs the kernel less than a vector of one.
                match &slices[..count] {
                    [one] => writer.write(one),
                    many => writer.write_vectored(many),
                }
            };
            match result {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.consume(n);
                    written += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.unpin_front();
        self.compact();
        Ok(written)
    }

    /// A reader too slow to take a whole relayed answer leaves its rest queued as a view of
    /// the (much bigger) input buffer it was read into; that rest is copied out, once, so the
    /// connection pins what it owes and not the buffer (SPEC 3.8).
    fn unpin_front(&mut self) {
        let Some(Seg::Shared(body)) = self.segs.front() else { return };
        let rest = body.len().saturating_sub(self.front_done);
        let only_view = self.shared.get(&body.buffer_key()) == Some(&1);
        if !only_view || body.footprint() / 2 <= rest {
            return;
        }
        let kept = SharedBytes::from(body.get(self.front_done..).unwrap_or_default());
        if let Some(Seg::Shared(old)) = self.segs.pop_front() {
            self.release(&old);
        }
        self.retain(&kept);
        self.segs.push_front(Seg::Shared(kept));
        self.front_done = 0;
    }

    /// Takes `n` written bytes off the front.
    fn consume(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.segs.front() else { return };
            let len = match front {
                Seg::Owned(len) => *len,
                Seg::Shared(body) => body.len(),
            };
            let left = len.saturating_sub(self.front_done);
            let take = n.min(left);
            n -= take;
            if let Seg::Owned(_) = front {
                self.pos += take;
                self.counted = self.counted.saturating_sub(take);
            }
            if take < left {
                self.front_done += take;
                return;
            }
            self.front_done = 0;
            if let Some(Seg::Shared(body)) = self.segs.pop_front() {
                self.release(&body);
            }
        }
    }

    fn compact(&mut self) {
        let owned_left = self.segs.iter().any(|s| matches!(s, Seg::Owned(_)));
        if !owned_left {
            self.bytes.clear();
            self.pos = 0;
            if self.bytes.capacity() > RETAINED_CAPACITY {
                self.bytes.shrink_to(RETAINED_CAPACITY);
            }
        } else if self.pos > RETAINED_CAPACITY && self.pos * 2 > self.bytes.len() {
            // Mostly written: move the rest to the front so the buffer does not creep.
            self.bytes.drain(..self.pos);
            self.pos = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::framing::tests::Trickle;

    #[test]
    fn a_relayed_answer_left_half_written_stops_pinning_its_input_buffer() {
        // A 1 MiB answer, a view of a 16 MiB input buffer (as the balancer relays it).
        let mut buffer = vec![b'i'; 16 << 20];
        buffer[1000..1000 + (1 << 20)].fill(b'v');
        let buffer = std::sync::Arc::new(buffer);
        let body = SharedBytes::of_part(&buffer, &buffer[1000..1000 + (1 << 20)]).unwrap();
        drop(buffer);
        let mut out = Output::new();
        out.append_shared(b"", &body, b"\n");
        drop(body);
        assert!(out.counted() >= 16 << 20, "the whole buffer counts while it is held");
        let mut w = Trickle { taken: Vec::new(), per_call: 64 << 10, budget: 256 << 10 };
        out.flush_to(&mut w).unwrap();
        assert!(out.counted() <= (1 << 20) + 1, "after a partial write: {} counted", out.counted());
        w.budget = usize::MAX;
        while !out.is_empty() {
            out.flush_to(&mut w).unwrap();
        }
        assert_eq!(w.taken.len(), (1 << 20) + 1);
        assert!(w.taken[..1 << 20].iter().all(|b| *b == b'v') && w.taken.ends_with(b"\n"));
    }

    #[test]
    fn owned_and_shared_bytes_leave_in_order_through_partial_writes() {
        let body: SharedBytes = vec![b'v'; 10_000].into();
        let mut out = Output::new();
        out.append(b"a\n");
        out.append_shared(b"<", &body, b">\n");
        let parked = out.park_shared(Vec::new(), b"[", &body, b"]\n");
        let parked_plain = out.park_with(Vec::new(), |b| b.extend_from_slice(b"p\n"));
        out.append_shared(b"(", &body, b")\n");
        // Three answers of one body, one counted body.
        assert_eq!(out.counted(), 2 + 3 + 3 + 2 + 3 + 10_000);
        out.unpark(parked);
        out.unpark(parked_plain);
        let mut w = Trickle { taken: Vec::new(), per_call: 7, budget: 5_000 };
        while !out.is_empty() {
            out.flush_to(&mut w).unwrap();
            w.budget = 5_000;
        }
        let v = "v".repeat(10_000);
        let expected = format!("a\n<{v}>\n({v})\n[{v}]\np\n");
        assert_eq!(String::from_utf8(w.taken).unwrap(), expected);
        assert_eq!(out.counted(), 0);
        assert!(out.shared.is_empty());
    }

    #[test]
    fn discarding_a_parked_answer_releases_its_count() {
        let body: SharedBytes = vec![1u8; 5000].into();
        let mut out = Output::new();
        let a = out.park_shared(Vec::new(), b"h", &body, b"t");
        let b = out.park_shared(Vec::new(), b"h", &body, b"t");
        assert_eq!(out.counted(), 5004);
        out.discard(a);
        assert_eq!(out.counted(), 5002);
        out.discard(b);
        assert_eq!(out.counted(), 0);
    }

    #[test]
    fn views_of_one_buffer_count_that_buffer_once() {
        let buffer = std::sync::Arc::new(vec![b'z'; 100_000]);
        let first = SharedBytes::of_part(&buffer, &buffer[10..50_000]).unwrap();
        let second = SharedBytes::of_part(&buffer, &buffer[50_001..99_000]).unwrap();
        let mut out = Output::new();
        out.append_shared(b"", &first, b"\n");
        out.append_shared(b"", &second, b"\n");
        // The whole buffer they keep alive, once; plus the two owned newlines.
        assert_eq!(out.counted(), 100_000 + 2);
        let mut w = Trickle { taken: Vec::new(), per_call: 4096, budget: usize::MAX };
        while !out.is_empty() {
            out.flush_to(&mut w).unwrap();
        }
        assert_eq!(out.counted(), 0);
        assert_eq!(w.taken.len(), (50_000 - 10) + (99_000 - 50_001) + 2);
        assert_eq!(std::sync::Arc::strong_count(&buffer), 3, "the test's two views and the buffer");
    }

    #[test]
    fn a_large_buffer_is_released_once_written() {
        let mut out = Output::new();
        out.append(&vec![b'x'; 1 << 20]);
        let mut w = Trickle { taken: Vec::new(), per_call: 7, budget: usize::MAX };
        while !out.is_empty() {
            out.flush_to(&mut w).unwrap();
        }
        assert!(out.bytes.capacity() <= RETAINED_CAPACITY);
    }
}
