//! Connections from a service to its peers (proxy → origin, balancer → proxy), as the service
//! sees them: a handle, the lines that arrive, and how the connection ended. The driver owns
//! the socket (a mio `TcpStream`, or a simulated one), so the same service code runs on the
//! real network and in the simulator.
//!
//! [`PeerInput`] is the input side every driver shares: a buffer that keeps one capacity
//! across answers, scans a long line once, and lends long lines out as [`SharedBytes`] so that
//! they can be relayed from where they were read.

use std::cell::Cell;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::Arc;

use crate::framing::{next_frame_from, read_once, Frame, OutBuf, SharedBytes, PAGE};

/// A connection to a peer: valid until it closes (or the service closes it), after which
/// what is sent to it is dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId {
    pub(crate) index: usize,
    pub(crate) serial: u64,
}

impl PeerId {
    /// Its slot among the open peer connections, reused after it closes (a table indexed by
    /// it keeps the whole `PeerId` to tell a new connection from a gone one).
    pub fn index(&self) -> usize {
        self.index
    }

    /// A number no other peer connection of this service had or will have.
    pub fn serial(&self) -> u64 {
        self.serial
    }
}

/// How a peer connection ended, when it was not the service that closed it.
#[derive(Debug)]
pub enum PeerEnd {
    /// The connection could not be made (refused, unreachable, out of descriptors).
    ConnectFailed(io::Error),
    /// The peer closed it (end of stream); a line it had not finished is dropped.
    Closed,
    /// Reset, or another read or write error.
    Failed(io::Error),
    /// The peer sent a line longer than the connection's `max_line`.
    LineTooLong,
}

impl PeerEnd {
    /// A short description for logs and traces.
    pub fn describe(&self) -> String {
        match self {
            PeerEnd::ConnectFailed(e) => format!("connect failed: {e}"),
            PeerEnd::Closed => "closed by the peer".into(),
            PeerEnd::Failed(e) => format!("failed: {e}"),
            PeerEnd::LineTooLong => "line too long".into(),
        }
    }
}

/// What [`crate::server::Service::on_peer_closed`] is told.
#[derive(Debug)]
pub struct PeerClosed {
    pub end: PeerEnd,
    /// Bytes received over the connection's life (0: the peer never said anything).
    pub received: u64,
    /// Whether the connection had been established.
    pub was_connected: bool,
}

/// Answer lines at least this long may be handed out as [`SharedBytes`] of the input buffer
/// ([`PeerLine::share`]) instead of being copied; shorter ones are cheaper to copy than to pin
/// a buffer for.
pub const SHARE_LINE_MIN: usize = 32 * 1024;

/// One complete line from a peer (without its `\n` and any `\r` before it).
#[derive(Clone, Copy)]
pub struct PeerLine<'a> {
    bytes: &'a [u8],
    buffer: &'a Arc<Vec<u8>>,
}

impl<'a> PeerLine<'a> {
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// `part` of this line (the line or a piece of it) as shared bytes, without copying;
    /// `None` when it is shorter than [`SHARE_LINE_MIN`] (copy it then) or not part of the
    /// line. The view keeps the input buffer alive (and counts it, SPEC 3.8) until it is
    /// dropped; reading goes on in another buffer meanwhile.
    pub fn share(&self, part: &[u8]) -> Option<SharedBytes> {
        if part.len() < SHARE_LINE_MIN {
            return None;
        }
        SharedBytes::of_part(self.buffer, part)
    }
}

impl std::ops::Deref for PeerLine<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.bytes
    }
}

impl std::fmt::Debug for PeerLine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeerLine({:?})", String::from_utf8_lossy(self.bytes))
    }
}

/// Bytes read per `read` call from a peer.
const READ_CHUNK: usize = 64 * 1024;

/// Where in a 4 KiB page the first byte read into an empty input buffer lands. The kernel
/// copies received bytes out with `rep movsb`, from socket buffers that mostly start at the
/// top of a page (a sender's page is reused from offset 0 once its bytes have been read), and
/// that copy is several times slower when the destination sits a few bytes past the source in
/// its page (4 KiB aliasing), as the first byte of a fresh allocation does (16 bytes in). With
/// reads placed half a page away, the balancer's receive copy of 64 KiB answers fell from 36 %
/// of its time to 8 %, as low as twemproxy's.
const READ_PAGE_OFFSET: usize = 2048;

/// Where a read into a buffer of `len` bytes with bytes up to `end` stops: at the middle, or
/// [`READ_CHUNK`] on, whichever is further (and at the end). Past the middle, a read that
/// completes a line brings at most a chunk of the next, so that when that line has to move (to
/// the front, or to another buffer while the first is still being written from) it is short.
/// A 512 KiB answer in a 1 MiB buffer otherwise arrives with most of the next one after it,
/// which then moved whole, every other answer.
fn read_limit(len: usize, end: usize) -> usize {
    let middle = len / 2;
    end.saturating_add(middle.saturating_sub(end).max(READ_CHUNK)).min(len)
}

/// Index in `buffer` at which bytes should start so that they lie [`READ_PAGE_OFFSET`] into a
/// page, if that leaves room for `holding` bytes and a read after them; else 0.
fn read_origin(buffer: &[u8], holding: usize) -> usize {
    let into_page = (buffer.as_ptr() as usize) % PAGE;
    let origin = (READ_PAGE_OFFSET + PAGE - into_page) % PAGE;
    let needed = origin.saturating_add(holding).saturating_add(READ_CHUNK / 2);
    if buffer.len() >= needed {
        origin
    } else {
        0
    }
}

/// Input capacity kept once the buffer empties: answers up to about this size come and go
/// without the buffer growing and shrinking each time (no allocation, no `mremap` per answer).
/// Only a burst beyond it is given back afterwards.
pub const RETAINED_INPUT: usize = 1024 * 1024;

/// Input buffers of [`RETAINED_INPUT`] bytes for long lines, kept for reuse by all of a
/// service's peer connections. A buffer given up while answers were still being written from
/// it comes back here and is taken again once they are done, so reading the next long answer
/// allocates, zeroes and faults in nothing. (Without it, a balancer relaying 512 KiB answers to
/// 16 clients spent a quarter of its time allocating, zeroing and unmapping input buffers.)
#[derive(Debug, Default)]
pub struct InputPool {
    buffers: Vec<Arc<Vec<u8>>>,
}

/// Buffers an [`InputPool`] keeps, whether free or still shared: at most 16 MiB.
const POOLED_BUFFERS: usize = 16;

impl InputPool {
    pub fn new() -> Self {
        Self::default()
    }

    /// A buffer of at least `min` bytes that nothing else holds: a free pooled one, else a
    /// new one (zeroed by the allocator, so untouched pages cost nothing).
    fn take(&mut self, min: usize) -> Arc<Vec<u8>> {
        let free = self.buffers.iter_mut().position(|b| b.len() >= min && Arc::get_mut(b).is_some());
        match free {
            Some(i) => self.buffers.swap_remove(i),
            None => Arc::new(vec![0; min.max(RETAINED_INPUT)]),
        }
    }

    /// Keeps `buffer` for reuse (once free), if it is of the pooled size and there is room.
    fn give(&mut self, buffer: Arc<Vec<u8>>) {
        if buffer.len() == RETAINED_INPUT && self.buffers.len() < POOLED_BUFFERS {
            self.buffers.push(buffer);
        }
    }

    /// Buffers kept (for tests of its bound).
    pub fn len(&self) -> usize {
        self.buffers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buffers.is_empty()
    }
}

/// Received bytes of one connection and the lines in them.
#[derive(Debug, Default)]
pub struct PeerInput {
    /// Received bytes live in `input[start..end]`; `input` is zeroed once when it grows, so
    /// reads do not pay for clearing memory. It is reference counted so that a long line can
    /// be passed on from where it was read ([`PeerLine::share`]); while such a view lives,
    /// reading continues in another buffer from the [`InputPool`] and the bytes not yet used
    /// move there.
    input: Arc<Vec<u8>>,
    /// Where bytes start in `input` when it holds none ([`read_origin`]); set where `input`
    /// is replaced, not on every emptying.
    origin: usize,
    start: usize,
    end: usize,
    /// `input[start..scanned]` holds no `\n`: a long line arriving in many reads is searched
    /// once, not again from its start after every read.
    scanned: Cell<usize>,
    eof: bool,
    /// The last [`PeerInput::fill`] stopped for `max_line` before the socket was empty.
    stopped_short: bool,
    /// Bytes received over the connection's life.
    received: u64,
}

impl PeerInput {
    pub fn new() -> Self {
        Self::default()
    }

    /// The peer closed its side.
    pub fn is_eof(&self) -> bool {
        self.eof
    }

    pub fn received(&self) -> u64 {
        self.received
    }

    /// Reads everything `reader` has (stopping early once more than `max_line` bytes are
    /// buffered without a complete line, which [`PeerInput::frame`] then reports as too long).
    /// An error means the connection is unusable (reset, ...).
    /// When it stops that way, [`PeerInput::stopped_short`] says so: once the complete lines
    /// are consumed, fill again (readiness is edge-triggered: no event comes for what the
    /// socket still holds).
    ///
    /// A read shorter than the room offered does not end reading: the socket need not be
    /// empty (Linux stops a read at a TCP urgent mark with the rest still queued, and with
    /// edge-triggered readiness no event would come for it). Reads go on until `WouldBlock`.
    pub fn fill<R: Read>(&mut self, reader: &mut R, max_line: usize, pool: &mut InputPool) -> io::Result<()> {
        self.stopped_short = false;
        loop {
            if self.eof {
                return Ok(());
            }
            if self.end - self.start > max_line {
                self.stopped_short = true;
                return Ok(());
            }
            if !self.make_room(pool) {
                // Full of complete lines: they are used first, then reading goes on.
                self.stopped_short = true;
                return Ok(());
            }
            // Unique: `make_room` swaps a shared buffer out.
            let Some(input) = Arc::get_mut(&mut self.input) else { return Ok(()) };
            let until = read_limit(input.len(), self.end);
            match read_once(reader, input.get_mut(self.end..until).unwrap_or_default()) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    self.end += n;
                    self.received = self.received.saturating_add(n as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether the last [`PeerInput::fill`] left bytes in the socket because `max_line` bytes
    /// were buffered already.
    pub fn stopped_short(&self) -> bool {
        self.stopped_short
    }

    /// The next complete line in the input, if any. Call [`PeerInput::consume`] with the
    /// length it reports once the line has been used.
    pub fn frame(&self, max_line: usize) -> Frame<'_> {
        let buffered = self.input.get(self.start..self.end).unwrap_or_default();
        let scanned = self.scanned.get().saturating_sub(self.start);
        let (frame, scanned) = next_frame_from(buffered, scanned, max_line);
        self.scanned.set(self.start + scanned);
        frame
    }

    /// [`PeerInput::frame`]'s line with the buffer it lies in, for handing to a service.
    pub fn line<'a>(&'a self, line: &'a [u8]) -> PeerLine<'a> {
        PeerLine { bytes: line, buffer: &self.input }
    }

    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        self.scanned.set(self.scanned.get().max(self.start));
        if self.start == self.end {
            if self.input.len() > RETAINED_INPUT {
                // A burst bigger than what is kept: give it back.
                self.input = Arc::new(Vec::new());
                self.origin = 0;
            }
            self.start = self.origin;
            self.end = self.origin;
            self.scanned.set(self.origin);
        }
    }

    /// The connection is done with its input: its buffer goes back to `pool`.
    pub fn recycle(self, pool: &mut InputPool) {
        pool.give(self.input);
    }

    /// Bytes received but not yet consumed.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Capacity of the input buffer (for tests of its bounds).
    pub fn capacity(&self) -> usize {
        self.input.len()
    }

    /// The input buffer with room after `end` for one more read: the bytes not yet consumed
    /// move to the front only when the room behind them runs short (not on every event, so a
    /// long line is not copied over and over while it arrives). A buffer outgrown, or shared
    /// with answers still being written, is swapped for one from `pool` (the shared one goes
    /// to the pool, to be taken again once they are done); past the pooled size the buffer
    /// doubles when more than half full.
    ///
    /// `false` when the room is short and a complete line is buffered: the buffer neither
    /// grows nor moves for bytes that can wait in the socket until the lines are used
    /// (reading a burst of long answers to the end would otherwise double the buffer and
    /// give it back afterwards, every time).
    fn make_room(&mut self, pool: &mut InputPool) -> bool {
        let unconsumed = self.end - self.start;
        let room = self.input.len() - self.end;
        let middle = self.input.len() / 2;
        let shared = Arc::get_mut(&mut self.input).is_none();
        let late_start = self.start > middle && self.start > self.origin;
        // Past the middle, complete lines are used before more is read (see `read_limit`).
        let must_wait = self.end > middle && unconsumed > 0 && self.holds_line();
        if !shared && room >= READ_CHUNK / 2 && !late_start && !must_wait {
            return true;
        }
        if unconsumed > 0 && self.holds_line() {
            return false;
        }
        if !shared && late_start {
            // A line begun in the back half of the buffer moves to the front while only its
            // first read is in: it would have to move anyway, later and longer, unless it is
            // short, and then moving it costs little.
            self.move_to_origin();
            return true;
        }
        if !shared
            && self.start > self.origin
            && self.input.len().saturating_sub(self.origin + unconsumed) >= READ_CHUNK / 2
            && unconsumed * 2 <= self.input.len()
        {
            self.move_to_origin();
            return true;
        }
        if !shared && self.input.len() >= RETAINED_INPUT {
            // A line longer than pooled buffers: this buffer grows on its own.
            self.move_to_origin();
            let wanted = if unconsumed * 2 > self.input.len() { self.input.len() * 2 } else { self.input.len() };
            if let Some(buf) = Arc::get_mut(&mut self.input) {
                if buf.len() - self.end < READ_CHUNK / 2 {
                    buf.resize(wanted.max(buf.len() + READ_CHUNK), 0);
                }
            }
            return true;
        }
        let mut fresh = if !shared && self.input.len() < READ_CHUNK {
            // First read: a small buffer of its own (most peers only ever send short lines).
            Arc::new(vec![0; READ_CHUNK])
        } else {
            pool.take(unconsumed.saturating_mul(2).max(READ_CHUNK))
        };
        let origin = read_origin(&fresh, unconsumed);
        if let Some(buf) = Arc::get_mut(&mut fresh) {
            let (from, to) = (self.input.get(self.start..self.end), buf.get_mut(origin..origin + unconsumed));
            if let (Some(from), Some(to)) = (from, to) {
                to.copy_from_slice(from);
            }
        }
        pool.give(std::mem::replace(&mut self.input, fresh));
        self.origin = origin;
        self.shift_to(origin);
        true
    }

    /// Whether the buffered bytes hold a `\n` (a complete line). How far they are known to
    /// hold none is remembered, as [`PeerInput::frame`] does.
    fn holds_line(&self) -> bool {
        let from = self.scanned.get().max(self.start);
        match self.input.get(from..self.end).and_then(|rest| memchr::memchr(b'\n', rest)) {
            Some(at) => {
                // Nothing before the newline is one: `frame` starts there.
                self.scanned.set(from + at);
                true
            }
            None => {
                self.scanned.set(self.end);
                false
            }
        }
    }

    /// Moves the unconsumed bytes back to where an empty buffer starts.
    fn move_to_origin(&mut self) {
        if self.start <= self.origin {
            return;
        }
        if let Some(buf) = Arc::get_mut(&mut self.input) {
            buf.copy_within(self.start..self.end, self.origin);
            self.shift_to(self.origin);
        }
    }

    /// The unconsumed bytes now start at `at` (copied there).
    fn shift_to(&mut self, at: usize) {
        let unconsumed = self.end - self.start;
        let scanned = self.scanned.get().saturating_sub(self.start);
        self.start = at;
        self.end = at + unconsumed;
        self.scanned.set(at + scanned);
    }
}

/// A peer connection's state on the service's side of the seam (the socket is the driver's).
pub(crate) struct Peer {
    pub serial: u64,
    pub addr: SocketAddr,
    pub max_line: usize,
    pub connected: bool,
    /// `None` only while its lines are being handed to the service.
    pub input: Option<PeerInput>,
    /// Bytes received over the connection's life.
    pub received: u64,
    /// Bytes received after the line being handed over (see `Ctx::peer_unread`).
    pub unread: usize,
    pub out: OutBuf,
    /// Queued in the driver's list of peers with output to write.
    pub dirty: bool,
}

impl Peer {
    pub fn new(serial: u64, addr: SocketAddr, max_line: usize) -> Self {
        Peer {
            serial,
            addr,
            max_line,
            connected: false,
            input: Some(PeerInput::new()),
            received: 0,
            unread: 0,
            out: OutBuf::new(),
            dirty: false,
        }
    }
}

/// What the service asked of the driver about peer sockets, applied in order.
#[derive(Clone, Copy, Debug)]
pub(crate) enum PeerCommand {
    Connect(PeerId, SocketAddr),
    Drop(usize),
}

/// What a service keeps per peer connection, found by [`PeerId`] in O(1): a table indexed by
/// the connection's slot that checks the serial, so that a value of a connection gone is
/// never mistaken for one of the connection that took its slot.
#[derive(Debug)]
pub struct PeerMap<V> {
    slots: Vec<Option<(PeerId, V)>>,
    len: usize,
}

impl<V> Default for PeerMap<V> {
    fn default() -> Self {
        PeerMap { slots: Vec::new(), len: 0 }
    }
}

impl<V> PeerMap<V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `value` for `peer`, returning what was there for it (or for a gone connection in
    /// its slot, which is dropped).
    pub fn insert(&mut self, peer: PeerId, value: V) -> Option<V> {
        if self.slots.len() <= peer.index {
            self.slots.resize_with(peer.index + 1, || None);
        }
        let old = self.slots[peer.index].replace((peer, value));
        if old.is_none() {
            self.len += 1;
        }
        old.filter(|(p, _)| *p == peer).map(|(_, v)| v)
    }

    pub fn get(&self, peer: PeerId) -> Option<&V> {
        match self.slots.get(peer.index)? {
            Some((p, v)) if *p == peer => Some(v),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, peer: PeerId) -> Option<&mut V> {
        match self.slots.get_mut(peer.index)? {
            Some((p, v)) if *p == peer => Some(v),
            _ => None,
        }
    }

    pub fn remove(&mut self, peer: PeerId) -> Option<V> {
        let slot = self.slots.get_mut(peer.index)?;
        if slot.as_ref().is_some_and(|(p, _)| *p == peer) {
            self.len -= 1;
            return slot.take().map(|(_, v)| v);
        }
        None
    }

    pub fn contains(&self, peer: PeerId) -> bool {
        self.get(peer).is_some()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every entry, in slot order (deterministic).
    pub fn iter(&self) -> impl Iterator<Item = (PeerId, &V)> {
        self.slots.iter().filter_map(|s| s.as_ref().map(|(p, v)| (*p, v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_map_tells_a_new_connection_from_the_one_gone_from_its_slot() {
        let mut map = PeerMap::new();
        let old = PeerId { index: 3, serial: 1 };
        let new = PeerId { index: 3, serial: 9 };
        assert_eq!(map.insert(old, "old"), None);
        assert_eq!(map.get(old), Some(&"old"));
        assert_eq!(map.get(new), None);
        assert_eq!(map.remove(new), None);
        assert_eq!(map.len(), 1);
        // The slot is taken over by the new connection: the old one's value is gone.
        assert_eq!(map.insert(new, "new"), None);
        assert_eq!(map.get(old), None);
        assert_eq!(map.len(), 1);
        assert_eq!(map.iter().collect::<Vec<_>>(), vec![(new, &"new")]);
        assert_eq!(map.remove(new), Some("new"));
        assert!(map.is_empty());
    }

    /// A socket's worth of bytes, handed out `per_read` at a time; then "would block". With
    /// `trickle`, every other read would block: the bytes arrive while lines are being used.
    struct Socket {
        bytes: Vec<u8>,
        at: usize,
        per_read: usize,
        trickle: bool,
        blocked: bool,
    }

    impl Socket {
        fn new(bytes: Vec<u8>, per_read: usize, trickle: bool) -> Self {
            Self { bytes, at: 0, per_read, trickle, blocked: false }
        }
    }

    impl Read for Socket {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let rest = self.bytes.get(self.at..).unwrap_or_default();
            self.blocked = self.trickle && !self.blocked;
            if rest.is_empty() || !self.blocked && self.trickle {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = rest.len().min(buf.len()).min(self.per_read);
            buf[..n].copy_from_slice(&rest[..n]);
            self.at += n;
            Ok(n)
        }
    }

    /// `count` lines of `len` bytes each (the `\n` included), line `i` made of one letter.
    fn long_lines(count: usize, len: usize) -> Vec<u8> {
        let mut bytes = Vec::new();
        for i in 0..count {
            bytes.extend(std::iter::repeat_n(b'a' + (i % 26) as u8, len - 1));
            bytes.push(b'\n');
        }
        bytes
    }

    /// Reads and frames everything the socket holds, as the drivers do: fill, use the complete
    /// lines (keeping a shared view of each in `held` when asked), fill again while the fill
    /// stopped short. Returns the lines and the largest capacity the buffer reached.
    fn drain(
        input: &mut PeerInput,
        socket: &mut Socket,
        pool: &mut InputPool,
        held: &mut Vec<SharedBytes>,
        hold: bool,
    ) -> (Vec<Vec<u8>>, usize) {
        let max_line = 8 << 20;
        let (mut lines, mut most) = (Vec::new(), 0);
        loop {
            input.fill(socket, max_line, pool).unwrap();
            most = most.max(input.capacity());
            while let Frame::Line(line, used) = input.frame(max_line) {
                let line = input.line(line);
                if hold {
                    held.push(line.share(line.bytes()).unwrap());
                }
                lines.push(line.bytes().to_vec());
                input.consume(used);
            }
            if !input.stopped_short() && socket.at == socket.bytes.len() {
                return (lines, most);
            }
        }
    }

    /// A read shorter than the room offered does not mean the socket is empty (the kernel
    /// stops a read at a TCP urgent mark with the rest queued, and no new readiness comes for
    /// it): the fill reads on until the socket says "would block".
    #[test]
    fn a_short_read_does_not_end_the_fill() {
        let (mut pool, mut input) = (InputPool::new(), PeerInput::new());
        let mut socket = Socket::new(b"one\ntwo\n".to_vec(), 4, false);
        input.fill(&mut socket, 1024, &mut pool).unwrap();
        assert_eq!(input.buffered(), 8, "both lines read in one fill");
    }

    /// Past the middle of the buffer, the read that completes a long line brings at most a
    /// chunk of the next one, and reading then waits for the line to be used: that start is
    /// what moves (to the front, or to another buffer while the line is being written), not
    /// most of the next line.
    #[test]
    fn a_long_line_is_completed_with_at_most_a_chunk_of_the_next() {
        let (mut pool, mut input) = (InputPool::new(), PeerInput::new());
        let mut socket = Socket::new(long_lines(2, 600 * 1024), usize::MAX, false);
        let used = loop {
            input.fill(&mut socket, 8 << 20, &mut pool).unwrap();
            if let Frame::Line(line, used) = input.frame(8 << 20) {
                assert_eq!(line.len(), 600 * 1024 - 1);
                break used;
            }
        };
        let next = input.buffered() - used;
        assert!(next <= READ_CHUNK, "{next} bytes of the next line read with the first");
        assert!(input.stopped_short(), "reading goes on once the line is used");
    }

    #[test]
    fn a_burst_of_long_lines_is_read_without_growing_the_buffer_past_what_is_kept() {
        // Eight 300 KiB answers in the socket at once (2.4 MiB): reading them all before using
        // any would double the buffer to 4 MiB and give it back after, for every burst.
        let burst = long_lines(8, 300 * 1024);
        let mut pool = InputPool::new();
        let mut input = PeerInput::new();
        for round in 0..3 {
            let mut socket = Socket::new(burst.clone(), usize::MAX, false);
            let (lines, most) = drain(&mut input, &mut socket, &mut pool, &mut Vec::new(), false);
            assert_eq!(lines.len(), 8, "round {round}");
            assert!(lines.iter().enumerate().all(|(i, l)| l.len() == 300 * 1024 - 1 && l[0] == b'a' + i as u8));
            assert!(most <= RETAINED_INPUT, "round {round}: the buffer grew to {most} bytes");
            assert_eq!(input.buffered(), 0);
        }
        // Nothing was shared, so nothing was swapped out into the pool.
        assert!(pool.is_empty());
    }

    #[test]
    fn long_lines_start_half_a_page_in_whatever_buffer_they_land_in() {
        // Where the kernel's copy of received bytes is slow (see READ_PAGE_OFFSET): every
        // line read into an empty buffer, a first one, one that outgrew it, one read after a
        // shared view pinned the previous buffer, starts READ_PAGE_OFFSET bytes into a page.
        let (mut pool, mut input, mut held) = (InputPool::new(), PeerInput::new(), Vec::new());
        for (round, hold) in [false, false, true, true, false].into_iter().enumerate() {
            let mut socket = Socket::new(long_lines(1, 100 * 1024), 16 * 1024, true);
            let mut starts = Vec::new();
            while socket.at < socket.bytes.len() || input.stopped_short() {
                input.fill(&mut socket, 8 << 20, &mut pool).unwrap();
                while let Frame::Line(line, used) = input.frame(8 << 20) {
                    starts.push(line.as_ptr() as usize % PAGE);
                    if hold {
                        held.push(input.line(line).share(line).unwrap());
                    }
                    input.consume(used);
                }
            }
            assert_eq!(starts, [READ_PAGE_OFFSET], "round {round}");
        }
        assert_eq!(held.len(), 2);
    }

    #[test]
    fn buffers_pinned_by_shared_answers_are_reused_once_the_answers_are_written() {
        let mut pool = InputPool::new();
        let mut input = PeerInput::new();
        let mut held = Vec::new();
        for round in 0..20 {
            // Two 400 KiB answers, arriving 64 KiB at a time; each is passed on as a view of
            // the buffer it was read into (so reading the next goes on in another buffer),
            // and written out (dropped) before the next round.
            let mut socket = Socket::new(long_lines(2, 400 * 1024), 64 * 1024, true);
            let (lines, most) = drain(&mut input, &mut socket, &mut pool, &mut held, true);
            assert_eq!(lines.len(), 2, "round {round}");
            assert!(held.iter().zip(&lines).all(|(view, line)| **view == **line), "round {round}");
            assert!(most <= RETAINED_INPUT, "round {round}: the buffer grew to {most} bytes");
            held.clear();
            // Buffers given up while pinned are taken again, not added to: the pool stays at
            // the one or two buffers these answers needed.
            assert!(pool.len() <= 2, "round {round}: {} pooled buffers", pool.len());
        }
        let pooled = pool.len();
        input.recycle(&mut pool);
        assert_eq!(pool.len(), pooled + 1, "a connection's 1 MiB buffer goes back to the pool");
    }
}

/// `PeerInput` driven as the engine drives it, against a socket modelled on the kernel's: a
/// read returns what has arrived up to the room offered, and only arrivals (and the end) bring
/// readiness. Random arrival sizes, random views of lines held (so buffers are swapped), lines
/// around every size the buffer logic treats differently: each line is delivered once, whole
/// and in order, the end is seen, and the buffer stays within its bound.
#[cfg(test)]
mod edge_triggered_model {
    use super::*;
    use crate::random::SplitMix64;

    /// A kernel-faithful socket: a read returns min(room, arrived); new bytes arriving
    /// are the only source of readiness events (edge-triggered).
    struct Kernel {
        bytes: Vec<u8>,
        arrived: usize,
        at: usize,
        fin: bool,
    }
    impl Read for Kernel {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let avail = self.arrived - self.at;
            if avail == 0 {
                return if self.fin { Ok(0) } else { Err(io::ErrorKind::WouldBlock.into()) };
            }
            let n = avail.min(buf.len());
            buf[..n].copy_from_slice(&self.bytes[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    fn run_with(seed: u64, max_line: usize, only: Option<&[usize]>) {
        let mut rng = SplitMix64::new(seed);
        let specials = [
            1usize,
            2,
            31 * 1024,
            32 * 1024,
            32 * 1024 + 1,
            64 * 1024 - 1,
            64 * 1024,
            64 * 1024 + 1,
            512 * 1024 - 1,
            512 * 1024,
            512 * 1024 + 1,
            600 * 1024,
            1024 * 1024 - 2048,
            1024 * 1024,
            1024 * 1024 + 1,
            3 << 20,
        ];
        let mut expected = Vec::new();
        let mut bytes = Vec::new();
        let count = 1 + rng.below(12);
        for i in 0..count {
            let len = match only {
                Some(o) => o[rng.below(o.len())],
                None => {
                    if rng.below(2) == 0 {
                        specials[rng.below(specials.len())]
                    } else {
                        1 + rng.below(200_000)
                    }
                }
            };
            let line: Vec<u8> = (0..len - 1).map(|j| b'a' + ((i + j) % 26) as u8).collect();
            bytes.extend_from_slice(&line);
            bytes.push(b'\n');
            expected.push(line);
        }
        let total = bytes.len();
        let mut sock = Kernel { bytes, arrived: 0, at: 0, fin: false };
        let (mut pool, mut input) = (InputPool::new(), PeerInput::new());
        let mut got = Vec::new();
        let mut held: Vec<SharedBytes> = Vec::new();
        let mut event = false;
        let mut rounds = 0;
        loop {
            rounds += 1;
            assert!(rounds < 1_000_000, "seed {seed}: no progress");
            // Arrivals (each one is an edge).
            if sock.arrived < total && rng.below(3) != 0 {
                let step = [1usize, 100, 4096, 65536, 65537, 200_000, 1 << 20][rng.below(7)];
                sock.arrived = (sock.arrived + 1 + rng.below(step)).min(total);
                event = true;
            } else if sock.arrived == total && !sock.fin && rng.below(4) == 0 {
                sock.fin = true;
                event = true;
            }
            if rng.below(3) == 0 && !held.is_empty() {
                held.clear();
            }
            if event {
                event = false;
                loop {
                    input.fill(&mut sock, max_line, &mut pool).unwrap();
                    loop {
                        match input.frame(max_line) {
                            Frame::Line(line, used) => {
                                let l = input.line(line);
                                if rng.below(2) == 0 {
                                    if let Some(s) = l.share(l.bytes()) {
                                        held.push(s);
                                    }
                                }
                                got.push(l.bytes().to_vec());
                                input.consume(used);
                            }
                            Frame::TooLong => panic!("seed {seed}: too long"),
                            Frame::Incomplete => break,
                        }
                    }
                    assert!(input.capacity() <= 16 << 20, "seed {seed}: capacity {}", input.capacity());
                    if !input.stopped_short() {
                        break;
                    }
                }
            }
            if sock.fin && !event {
                // Nothing more will ever come: everything must be delivered.
                assert_eq!(
                    got.len(),
                    expected.len(),
                    "seed {seed}: hang: {} of {} lines, socket holds {}, buffered {}, eof {}",
                    got.len(),
                    expected.len(),
                    sock.arrived - sock.at,
                    input.buffered(),
                    input.is_eof()
                );
                assert!(got == expected, "seed {seed}: wrong lines");
                assert!(input.is_eof(), "seed {seed}: eof not seen");
                return;
            }
        }
    }

    #[test]
    fn every_line_is_delivered_once_whole_and_in_order() {
        for seed in 1..400u64 {
            run_with(seed, 8 << 20, None);
        }
    }

    #[test]
    fn lines_at_and_around_the_line_limit_are_delivered() {
        for max_line in [1000usize, 40_000, 600_000, 1 << 20, 2 << 20] {
            let lens = [1, max_line, max_line + 1, max_line / 2, max_line / 2 + 1];
            for seed in 1..60u64 {
                run_with(seed ^ max_line as u64, max_line, Some(&lens));
            }
        }
    }
}
