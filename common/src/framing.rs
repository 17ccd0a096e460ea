//! Line framing: splitting buffered input into request lines, and a bounded output buffer
//! written with partial writes.
//!
//! Both work on any `Read`/`Write` (a non-blocking mio `TcpStream` in the services), and the
//! splitting is a pure function over bytes, so it is tested without sockets.

use std::io::{self, Read, Write};
use std::sync::Arc;

/// Immutable bytes that several answers may share instead of copying (a cached value, the
/// body of an answer relayed to collapsed followers, a long answer line still in the buffer
/// it was read into). A view of part of one reference-counted buffer: cloning or narrowing
/// it copies nothing. Shared bytes count once per connection toward its output bound (SPEC
/// 3.8), by the whole buffer they keep alive ([`SharedBytes::footprint`]).
#[derive(Clone)]
pub struct SharedBytes {
    buf: Arc<Vec<u8>>,
    /// The view is `buf[start..end]`; `end == WHOLE` means to the end of `buf`. 32-bit
    /// offsets keep a cache entry small; longer buffers are only ever viewed whole.
    start: u32,
    end: u32,
}

const WHOLE: u32 = u32::MAX;

fn offset(n: u32) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

impl SharedBytes {
    /// All of `buf`.
    pub fn whole(buf: Arc<Vec<u8>>) -> Self {
        SharedBytes { buf, start: 0, end: WHOLE }
    }

    /// The part of `buf` that `part` is (a subslice of it), or `None` if it is not one.
    pub fn of_part(buf: &Arc<Vec<u8>>, part: &[u8]) -> Option<Self> {
        let base = buf.as_ptr() as usize;
        let start = (part.as_ptr() as usize).checked_sub(base)?;
        let end = start.checked_add(part.len())?;
        if end > buf.len() {
            return None;
        }
        let start = u32::try_from(start).ok()?;
        let end = u32::try_from(end).ok().filter(|end| *end != WHOLE)?;
        Some(SharedBytes { buf: buf.clone(), start, end })
    }

    /// The part of these bytes that `part` is (a subslice of them), sharing the same buffer.
    pub fn narrow(&self, part: &[u8]) -> Option<Self> {
        let (start, end) = self.range();
        let narrowed = SharedBytes::of_part(&self.buf, part)?;
        let (s, e) = narrowed.range();
        (s >= start && e <= end).then_some(narrowed)
    }

    fn range(&self) -> (usize, usize) {
        let end = if self.end == WHOLE { self.buf.len() } else { offset(self.end) };
        (offset(self.start), end)
    }

    /// These bytes in a buffer of their own when the one they are in is more than twice their
    /// size: what an answer that will wait keeps, so that it pins no more than itself.
    pub fn compacted(&self) -> SharedBytes {
        if self.footprint() / 2 > self.len() {
            SharedBytes::from(&self[..])
        } else {
            self.clone()
        }
    }

    /// The size of the buffer these bytes keep alive: what they cost in memory.
    pub fn footprint(&self) -> usize {
        self.buf.capacity()
    }

    /// Identifies the buffer: views of one buffer have the same key while it lives.
    pub fn buffer_key(&self) -> usize {
        Arc::as_ptr(&self.buf) as usize
    }
}

impl std::ops::Deref for SharedBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        let (start, end) = self.range();
        self.buf.get(start..end).unwrap_or_default()
    }
}

impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

/// Copies at least this long are placed away from the top of a page (see [`placed_copy`]).
const PLACED_MIN: usize = 32 * 1024;
/// A placed copy starts at least this far from either edge of a 4 KiB page...
const PAGE_MARGIN: usize = 256;
/// ...which takes at most this many bytes more than the copy itself.
const PLACEMENT_SLACK: usize = 2 * PAGE_MARGIN;
/// The page size the placements of copies and reads are computed for.
pub(crate) const PAGE: usize = 4096;

/// `bytes` in a buffer of their own whose first byte lies at least [`PAGE_MARGIN`] bytes from
/// the edges of its page, and where that is within `buf[start..]`. Shared bytes are written to
/// sockets, and the kernel copies them into socket pages that start at the top of a page with
/// `rep movsb`, which is several times slower when the source sits a few bytes past the
/// destination in its page (4 KiB aliasing). A fresh large allocation starts exactly there
/// (16 bytes in, after the allocator's header): a proxy sending a 512 KiB value from such a
/// copy spent 38 % of its time in that copy and answered 2.3 k/s at 1 connection; placed, 3.9
/// k/s (twemproxy over memcached: 3.7 k/s). Reads are placed for the same reason
/// (`peer::READ_PAGE_OFFSET`).
fn placed_copy(bytes: &[u8]) -> (Vec<u8>, usize) {
    let mut buf = Vec::with_capacity(bytes.len().saturating_add(PLACEMENT_SLACK));
    let into_page = (buf.as_ptr() as usize) % PAGE;
    let start = if into_page < PAGE_MARGIN {
        PAGE_MARGIN - into_page
    } else if into_page > PAGE - PAGE_MARGIN {
        PAGE - into_page + PAGE_MARGIN
    } else {
        0
    };
    buf.resize(start, 0);
    buf.extend_from_slice(bytes);
    (buf, start)
}

impl From<&[u8]> for SharedBytes {
    fn from(bytes: &[u8]) -> Self {
        if bytes.len() < PLACED_MIN {
            return SharedBytes::whole(Arc::new(bytes.to_vec()));
        }
        let (buf, start) = placed_copy(bytes);
        // Offsets that do not fit in 32 bits (a copy of 4 GiB or more) fall back to a whole,
        // unplaced copy.
        match (u32::try_from(start), u32::try_from(buf.len())) {
            (Ok(start), Ok(end)) if end != WHOLE => SharedBytes { buf: Arc::new(buf), start, end },
            _ => SharedBytes::whole(Arc::new(bytes.to_vec())),
        }
    }
}

impl From<Vec<u8>> for SharedBytes {
    fn from(mut bytes: Vec<u8>) -> Self {
        bytes.shrink_to_fit();
        SharedBytes::whole(Arc::new(bytes))
    }
}

impl std::fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedBytes({} of {} bytes)", self.len(), self.footprint())
    }
}

impl PartialEq for SharedBytes {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for SharedBytes {}

/// What the front of an input buffer holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A complete line, without its `\n` and without a `\r` before it, and how many bytes of
    /// the buffer it used up.
    Line(&'a [u8], usize),
    /// No complete line yet, and what is there is not too long.
    Incomplete,
    /// More than `max_line` bytes before the `\n` (or with no `\n` in sight).
    TooLong,
}

/// Finds the first line in `buf`. Only the first `max_line + 1` bytes are searched, so a huge
/// buffer costs no more than a legal line.
pub fn next_frame(buf: &[u8], max_line: usize) -> Frame<'_> {
    let window = &buf[..buf.len().min(max_line.saturating_add(1))];
    match memchr::memchr(b'\n', window) {
        Some(end) if end <= max_line => {
            let line = &buf[..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            Frame::Line(line, end + 1)
        }
        _ if buf.len() > max_line => Frame::TooLong,
        _ => Frame::Incomplete,
    }
}

/// [`next_frame`] for a buffer whose first `scanned` bytes are known to hold no `\n` (an
/// earlier call said so): the search starts there. Returns the frame and how far the buffer
/// is now known to be free of `\n` (up to the newline found, if any), for the next call.
pub fn next_frame_from(buf: &[u8], scanned: usize, max_line: usize) -> (Frame<'_>, usize) {
    let window = buf.len().min(max_line.saturating_add(1));
    let from = scanned.min(window);
    match memchr::memchr(b'\n', &buf[from..window]) {
        Some(at) => {
            let end = from + at;
            let line = &buf[..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            (Frame::Line(line, end + 1), end)
        }
        None if buf.len() > max_line => (Frame::TooLong, window),
        None => (Frame::Incomplete, window),
    }
}

/// The lines of `input` when it arrives in pieces of the sizes `piece` gives, carried over
/// between pieces the way the services carry partial lines; and whether a too-long line ended
/// it. For tests and fuzzing: any way of cutting the input must give the same lines.
pub fn lines_in_pieces(input: &[u8], mut piece: impl FnMut() -> usize, max_line: usize) -> (Vec<Vec<u8>>, bool) {
    let mut carry: Vec<u8> = Vec::new();
    let mut lines = Vec::new();
    let mut rest = input;
    while !rest.is_empty() {
        let n = piece().clamp(1, rest.len());
        carry.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        let mut used = 0;
        loop {
            match next_frame(&carry[used..], max_line) {
                Frame::Line(line, n) => {
                    lines.push(line.to_vec());
                    used += n;
                }
                Frame::Incomplete => break,
                Frame::TooLong => return (lines, true),
            }
        }
        carry.drain(..used);
    }
    (lines, false)
}

/// Reads once into `buf`, retrying on `EINTR`. `Ok(0)` is end of stream.
pub fn read_once<R: Read>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match reader.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Buffered output with a write position: answers are appended, and `flush_to` writes as
/// much as the socket takes. Whoever owns it decides what its bound is and pauses reading
/// while `pending()` is over it.
#[derive(Debug, Default)]
pub struct OutBuf {
    buf: Vec<u8>,
    pos: usize,
}

/// Capacity kept after the buffer empties; anything above is returned to the allocator, so
/// an idle connection that once sent a large answer does not keep its memory.
const RETAINED_CAPACITY: usize = 64 * 1024;

impl OutBuf {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes appended but not yet written.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.pending() == 0
    }

    /// The buffer to append whole answers to.
    pub fn buf_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Writes until the buffer is empty or the writer would block; returns the bytes written.
    /// `WouldBlock` is not an error here; any other error is returned.
    pub fn flush_to<W: Write>(&mut self, writer: &mut W) -> io::Result<usize> {
        let mut written = 0;
        while self.pos < self.buf.len() {
            match writer.write(&self.buf[self.pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.pos += n;
                    written += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
            if self.buf.capacity() > RETAINED_CAPACITY {
                self.buf.shrink_to(RETAINED_CAPACITY);
            }
        } else if self.pos > RETAINED_CAPACITY && self.pos * 2 > self.buf.len() {
            // Mostly written: move the tail to the front so the buffer does not creep.
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        Ok(written)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn split_in_chunks(input: &[u8], chunk: usize, max_line: usize) -> (Vec<Vec<u8>>, bool) {
        lines_in_pieces(input, || chunk, max_line)
    }

    #[test]
    fn splitting_table_at_every_chunk_size() {
        // (input, lines expected, whether a too-long line ends it)
        type Case<'a> = (&'a [u8], &'a [&'a [u8]], bool);
        let table: &[Case] = &[
            (b"GET a\n", &[b"GET a"], false),
            (b"GET a\r\nGET b\n", &[b"GET a", b"GET b"], false),
            (b"GET a\nGET b", &[b"GET a"], false),
            (b"\n\r\n", &[b"", b""], false),
            (b"a\rb\n", &[b"a\rb"], false),
            (b"x\r\r\n", &[b"x\r"], false),
            (b"12345678\n", &[b"12345678"], false),
            (b"123456789\n", &[], true),
            (b"ok\n123456789", &[b"ok"], true),
            (b"1234567\r\n", &[b"1234567"], false),
            (b"12345678\r\n", &[], true),
        ];
        for (input, expected, too_long) in table {
            for chunk in 1..=input.len() {
                let (lines, hit_limit) = split_in_chunks(input, chunk, 8);
                let expected: Vec<Vec<u8>> = expected.iter().map(|l| l.to_vec()).collect();
                assert_eq!(lines, expected, "{:?} in chunks of {chunk}", String::from_utf8_lossy(input));
                assert_eq!(hit_limit, *too_long, "{:?} in chunks of {chunk}", String::from_utf8_lossy(input));
            }
        }
    }

    #[test]
    fn many_lines_in_one_read() {
        let input: Vec<u8> = (0..10_000).flat_map(|i| format!("GET k{i}\n").into_bytes()).collect();
        let (lines, too_long) = split_in_chunks(&input, input.len(), 64);
        assert!(!too_long);
        assert_eq!(lines.len(), 10_000);
        assert_eq!(lines[9_999], b"GET k9999");
    }

    /// The incremental search gives what a search from the start gives, however the bytes
    /// arrive, and never looks at a byte twice.
    #[test]
    fn searching_on_from_the_scanned_offset_finds_the_same_lines() {
        let input = b"GET a\r\n\nlonger line here\nx\r\r\n0123456789abcdef\ntail".to_vec();
        for max_line in [4, 12, 64] {
            for chunk in 1..=input.len() {
                let mut buf: Vec<u8> = Vec::new();
                let mut scanned = 0;
                let mut looked = 0;
                let mut got = Vec::new();
                let mut too_long = false;
                for piece in input.chunks(chunk) {
                    buf.extend_from_slice(piece);
                    loop {
                        let before = scanned;
                        let (frame, now) = next_frame_from(&buf, scanned, max_line);
                        looked += now.saturating_sub(before);
                        assert_eq!(frame, next_frame(&buf, max_line));
                        match frame {
                            Frame::Line(line, n) => {
                                got.push(line.to_vec());
                                buf.drain(..n);
                                scanned = 0;
                            }
                            Frame::Incomplete => {
                                scanned = now;
                                break;
                            }
                            Frame::TooLong => {
                                too_long = true;
                                break;
                            }
                        }
                    }
                    if too_long {
                        break;
                    }
                }
                let (expected, expected_too_long) = split_in_chunks(&input, chunk, max_line);
                assert_eq!((got, too_long), (expected, expected_too_long), "chunk {chunk} max_line {max_line}");
                assert!(looked <= input.len(), "bytes searched twice: {looked} of {}", input.len());
            }
        }
    }

    #[test]
    fn the_limit_is_on_bytes_before_the_newline() {
        assert_eq!(next_frame(b"abcd\n", 4), Frame::Line(b"abcd", 5));
        assert_eq!(next_frame(b"abcde\n", 4), Frame::TooLong);
        assert_eq!(next_frame(b"abcd", 4), Frame::Incomplete);
        assert_eq!(next_frame(b"abcde", 4), Frame::TooLong);
    }

    /// A writer that takes at most `per_call` bytes per write and then blocks after `budget`
    /// (also used by the output queue's tests).
    pub(crate) struct Trickle {
        pub(crate) taken: Vec<u8>,
        pub(crate) per_call: usize,
        pub(crate) budget: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.budget == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.per_call).min(self.budget);
            self.taken.extend_from_slice(&buf[..n]);
            self.budget -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn partial_writes_keep_order_and_resume() {
        let mut out = OutBuf::new();
        out.extend(b"hello ");
        out.extend(b"world\n");
        let mut w = Trickle { taken: Vec::new(), per_call: 3, budget: 5 };
        assert_eq!(out.flush_to(&mut w).unwrap(), 5);
        assert_eq!(out.pending(), 7);
        out.extend(b"more\n");
        w.budget = 100;
        assert_eq!(out.flush_to(&mut w).unwrap(), 12);
        assert!(out.is_empty());
        assert_eq!(w.taken, b"hello world\nmore\n");
    }

    #[test]
    fn a_large_buffer_is_released_once_written() {
        let mut out = OutBuf::new();
        out.extend(&vec![b'x'; 1 << 20]);
        let mut w = Trickle { taken: Vec::new(), per_call: usize::MAX, budget: usize::MAX };
        out.flush_to(&mut w).unwrap();
        assert!(out.buf.capacity() <= RETAINED_CAPACITY);
    }

    /// A long copy starts away from the edges of its page (whatever the allocator hands out),
    /// holds exactly the bytes, and costs at most the slack more; short copies are unpadded.
    #[test]
    fn long_copies_are_placed_away_from_page_edges() {
        let mut held = Vec::new();
        for len in [PLACED_MIN, 65_539, 524_291, 1 << 20, 3 << 20] {
            for round in 0..8u8 {
                let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ round).collect();
                let copy = SharedBytes::from(&bytes[..]);
                let into_page = (copy.as_ptr() as usize) % PAGE;
                assert!(
                    (PAGE_MARGIN..=PAGE - PAGE_MARGIN).contains(&into_page),
                    "{len} bytes start {into_page} into a page"
                );
                assert!(*copy == bytes[..], "{len} bytes copied intact");
                assert!(copy.footprint() <= len + PLACEMENT_SLACK, "{len} bytes take {}", copy.footprint());
                held.push(copy); // kept alive so that the allocator hands out fresh places
            }
        }
        let short = SharedBytes::from(&[7u8; 100][..]);
        assert_eq!((short.len(), short.footprint()), (100, 100));
    }
}
