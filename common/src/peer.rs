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

use crate::framing::{next_frame_from, read_once, Frame, OutBuf, SharedBytes};

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

/// Input capacity kept once the buffer empties: answers up to about this size come and go
/// without the buffer growing and shrinking each time (no allocation, no `mremap` per answer).
/// Only a burst beyond it is given back afterwards.
pub const RETAINED_INPUT: usize = 1024 * 1024;

/// Received bytes of one connection and the lines in them.
#[derive(Debug, Default)]
pub struct PeerInput {
    /// Received bytes live in `input[start..end]`; `input` is zeroed once when it grows, so
    /// reads do not pay for clearing memory. It is reference counted so that a long line can
    /// be passed on from where it was read ([`PeerLine::share`]); while such a view lives,
    /// reading continues in `spare` (or a new buffer) and the bytes not yet used move.
    input: Arc<Vec<u8>>,
    /// The buffer given up while it was still shared, reused once nobody holds it.
    spare: Option<Arc<Vec<u8>>>,
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
    pub fn fill<R: Read>(&mut self, reader: &mut R, max_line: usize) -> io::Result<()> {
        self.stopped_short = false;
        loop {
            if self.eof {
                return Ok(());
            }
            if self.end - self.start > max_line {
                self.stopped_short = true;
                return Ok(());
            }
            self.make_room();
            // Unique: `make_room` swaps a shared buffer out.
            let Some(input) = Arc::get_mut(&mut self.input) else { return Ok(()) };
            match read_once(reader, input.get_mut(self.end..).unwrap_or_default()) {
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
            self.start = 0;
            self.end = 0;
            self.scanned.set(0);
            if self.input.len() > RETAINED_INPUT {
                // A burst bigger than what is kept: give it back, and the spare with it.
                self.input = Arc::new(Vec::new());
                self.spare = None;
            }
            if self.spare.as_ref().is_some_and(|spare| spare.len() > RETAINED_INPUT) {
                self.spare = None;
            }
        }
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
    /// long line is not copied over and over while it arrives), and the buffer doubles only
    /// when it is more than half full of them. A buffer shared with answers still being
    /// written is left to them: the unconsumed bytes move to the spare or a new buffer.
    fn make_room(&mut self) {
        let unconsumed = self.end - self.start;
        let room = self.input.len() - self.end;
        let wanted = if unconsumed * 2 > self.input.len() { self.input.len() * 2 } else { self.input.len() };
        let wanted = wanted.max(READ_CHUNK);
        if Arc::get_mut(&mut self.input).is_none() {
            let mut fresh = self.spare.take().filter(|spare| Arc::strong_count(spare) == 1).unwrap_or_default();
            if Arc::get_mut(&mut fresh).is_none() {
                fresh = Arc::default();
            }
            // Sized for what it must hold, not like the buffer given up: a new buffer may be
            // pinned in turn by an answer that waits, and should not be mostly empty then.
            let wanted = (unconsumed * 2).max(READ_CHUNK * 2);
            if let Some(buf) = Arc::get_mut(&mut fresh) {
                if buf.len() < wanted {
                    buf.resize(wanted, 0);
                }
                buf[..unconsumed].copy_from_slice(&self.input[self.start..self.end]);
            }
            self.spare = Some(std::mem::replace(&mut self.input, fresh));
            self.move_to_front();
        } else if room < READ_CHUNK / 2 {
            if self.start > 0 {
                if let Some(buf) = Arc::get_mut(&mut self.input) {
                    buf.copy_within(self.start..self.end, 0);
                }
                self.move_to_front();
            }
            if self.input.len() - self.end < READ_CHUNK / 2 {
                if let Some(buf) = Arc::get_mut(&mut self.input) {
                    buf.resize(wanted.max(buf.len() + READ_CHUNK), 0);
                }
            }
        }
    }

    /// The unconsumed bytes now start at 0.
    fn move_to_front(&mut self) {
        self.end -= self.start;
        self.scanned.set(self.scanned.get().saturating_sub(self.start));
        self.start = 0;
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
}
