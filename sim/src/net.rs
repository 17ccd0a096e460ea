//! The simulated network: TCP-like connections between nodes, on the virtual clock, driven
//! by the seed. Bytes are delivered in order per direction after a sampled latency, cut at
//! random points (so lines arrive across reads); a writer gets partial writes and then
//! `WouldBlock` once the reader's side holds a window's worth (a peer that stops reading
//! stalls its writers, as a socket buffer would); connects are refused where nothing
//! listens; a partition between two nodes holds their segments back (TCP retransmits) until
//! it heals. Everything is in `BTreeMap`s and slabs, so a seed gives the same run.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use common::random::SplitMix64;

mod liar;
use liar::{Ids, Liar};

/// Appends `bytes` to `pending` and takes out the complete lines (through the last `\n`),
/// leaving an unfinished one: for the watchers of the wire, who see writes cut anywhere.
pub fn whole_lines(pending: &mut Vec<u8>, bytes: &[u8]) -> Vec<u8> {
    pending.extend_from_slice(bytes);
    match pending.iter().rposition(|b| *b == b'\n') {
        Some(last) => pending.drain(..=last).collect(),
        None => Vec::new(),
    }
}

/// A node of the simulated cluster (a service, or the host of the simulated clients).
pub type NodeId = usize;

/// What a connection's end is to the node that owns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tag {
    /// Accepted, not yet handed to the node.
    Pending,
    /// The node's listener has connections to accept.
    Listener,
    /// The node's client connection `index`.
    Client(usize),
    /// The node's peer connection `index`.
    Peer(usize),
    /// Simulated client `n` (on the clients' host).
    Driver(usize),
}

/// One end of a connection: `side` 0 made the connect, 1 accepted it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndId {
    pub conn: usize,
    pub side: usize,
}

impl EndId {
    fn other(self) -> EndId {
        EndId { conn: self.conn, side: 1 - self.side }
    }
}

/// Delivered bytes, kept as the segments they came in.
#[derive(Debug, Default)]
struct Inbox {
    segments: VecDeque<Vec<u8>>,
    /// Bytes of the front segment already read.
    offset: usize,
    len: usize,
}

impl Inbox {
    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn clear(&mut self) {
        *self = Inbox::default();
    }

    fn push(&mut self, bytes: Vec<u8>) {
        self.len += bytes.len();
        self.segments.push_back(bytes);
    }

    /// Fills `buf` from the front (the caller asks for no more than `len`).
    fn take(&mut self, buf: &mut [u8]) {
        let mut filled = 0;
        while filled < buf.len() {
            let Some(front) = self.segments.front() else { break };
            let available = &front[self.offset..];
            let n = available.len().min(buf.len() - filled);
            buf[filled..filled + n].copy_from_slice(&available[..n]);
            filled += n;
            self.offset += n;
            if self.offset == front.len() {
                self.segments.pop_front();
                self.offset = 0;
            }
        }
        self.len -= filled;
    }
}

#[derive(Debug)]
struct End {
    owner: NodeId,
    tag: Tag,
    addr: SocketAddr,
    /// Delivered and not yet read.
    inbox: Inbox,
    /// Sent toward this end and not yet delivered.
    in_flight: usize,
    /// The other side's FIN has arrived: once `inbox` is empty, reads give 0.
    fin: bool,
    reset: bool,
    /// Its owner dropped it.
    closed: bool,
    /// Its connect finished (side 0), or it was accepted (side 1).
    established: bool,
    refused: bool,
    /// The latest delivery scheduled toward it: later segments arrive after it.
    last_arrival: Duration,
    /// Its writer was told `WouldBlock`: it hears when there is room again.
    blocked_writer: bool,
}

#[derive(Debug)]
struct Conn {
    ends: [End; 2],
    /// Where the connector wanted to go.
    target: SocketAddr,
}

#[derive(Debug)]
enum Event {
    Syn(usize),
    SynAck(usize),
    Refuse(usize),
    Data(EndId, Vec<u8>),
    Fin(EndId),
    Rst(EndId),
}

/// How the network behaves; the scenario picks it, the seed draws from it.
#[derive(Clone, Debug)]
pub struct NetConfig {
    pub latency_min: Duration,
    pub latency_max: Duration,
    /// Bytes a receiver's side holds (in flight and unread) before its writer blocks.
    pub window: usize,
    /// Chance that a write takes only part of what it was given.
    pub partial_write: f64,
    /// Chance that a segment is cut in two at a random point.
    pub split: f64,
    /// Chance that a segment takes `spike` instead (a long tail: a retransmit, a busy host).
    pub spike_chance: f64,
    pub spike: Duration,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            latency_min: Duration::from_micros(50),
            latency_max: Duration::from_micros(400),
            window: 256 * 1024,
            partial_write: 0.2,
            split: 0.3,
            spike_chance: 0.002,
            spike: Duration::from_millis(30),
        }
    }
}

/// How long a held-back segment waits before it is tried again (a retransmit).
const RETRANSMIT: Duration = Duration::from_millis(50);

/// What went over a connection, for the invariant checks: `end` wrote `bytes` (or read them).
pub trait Observer {
    fn wrote(&mut self, _end: EndInfo, _bytes: &[u8]) {}
    fn read(&mut self, _end: EndInfo, _bytes: &[u8]) {}
    fn closed(&mut self, _end: EndInfo) {}
}

/// Who is at an end of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct EndInfo {
    pub end: EndId,
    pub owner: NodeId,
    pub tag: Tag,
    /// The address of the other side's node as this end knows it (for a connector: where it
    /// connected; for an acceptor: the connector's ephemeral address).
    pub remote: SocketAddr,
    pub remote_owner: Option<NodeId>,
}

pub struct Net {
    now: Duration,
    rng: SplitMix64,
    pub config: NetConfig,
    /// By id; ids are never reused, so a late segment of a gone connection finds nothing.
    conns: BTreeMap<usize, Conn>,
    next_conn: usize,
    events: BTreeMap<(Duration, u64), Event>,
    seq: u64,
    listeners: BTreeMap<SocketAddr, NodeId>,
    partitions: BTreeSet<(NodeId, NodeId)>,
    /// Accepted ends waiting for their node to take them, per node.
    accepts: BTreeMap<NodeId, VecDeque<EndId>>,
    /// (node, tag) pairs that became ready, in order.
    ready: Vec<(NodeId, Tag)>,
    next_port: u16,
    observer: Option<Box<dyn Observer>>,
    /// Nodes that lie: see [`Net::set_liar`].
    liars: BTreeMap<NodeId, Liar>,
    /// Nodes whose connections' ids are followed (those that may lie), and the ids by
    /// connection.
    id_nodes: BTreeSet<NodeId>,
    ids: BTreeMap<usize, Ids>,
}

impl Net {
    pub fn new(seed: u64, config: NetConfig) -> Self {
        Net {
            now: Duration::ZERO,
            rng: SplitMix64::new(seed),
            config,
            conns: BTreeMap::new(),
            next_conn: 0,
            events: BTreeMap::new(),
            seq: 0,
            listeners: BTreeMap::new(),
            partitions: BTreeSet::new(),
            accepts: BTreeMap::new(),
            ready: Vec::new(),
            next_port: 40_000,
            observer: None,
            liars: BTreeMap::new(),
            id_nodes: BTreeSet::new(),
            ids: BTreeMap::new(),
        }
    }

    /// Follows the ids asked on connections to `node`, so that it can be made to lie.
    pub fn follow_ids(&mut self, node: NodeId) {
        self.id_nodes.insert(node);
    }

    /// `node` lies about one answer in `every` it sends on its accepted connections (0: it
    /// stops lying).
    pub fn set_liar(&mut self, node: NodeId, every: usize) {
        if every == 0 {
            // What it held back (the start of an answer line) goes on as it was.
            if let Some(liar) = self.liars.remove(&node) {
                for (conn, held) in liar.lines {
                    if !held.is_empty() {
                        self.send(EndId { conn, side: 0 }, held);
                    }
                }
            }
        } else {
            self.liars.insert(node, Liar { every, ..Liar::default() });
        }
    }

    pub fn set_observer(&mut self, observer: Box<dyn Observer>) {
        self.observer = Some(observer);
    }

    pub fn now(&self) -> Duration {
        self.now
    }

    pub fn rng(&mut self) -> &mut SplitMix64 {
        &mut self.rng
    }

    pub fn listen(&mut self, addr: SocketAddr, node: NodeId) {
        self.listeners.insert(addr, node);
    }

    pub fn unlisten(&mut self, addr: SocketAddr) {
        self.listeners.remove(&addr);
    }

    fn pair(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
        (a.min(b), a.max(b))
    }

    pub fn partition(&mut self, a: NodeId, b: NodeId) {
        self.partitions.insert(Self::pair(a, b));
    }

    pub fn heal(&mut self, a: NodeId, b: NodeId) {
        self.partitions.remove(&Self::pair(a, b));
    }

    pub fn is_partitioned(&self, a: NodeId, b: NodeId) -> bool {
        self.partitions.contains(&Self::pair(a, b))
    }

    /// The time of the next thing the network will do.
    pub fn next_event(&self) -> Option<Duration> {
        self.events.keys().next().map(|(t, _)| *t)
    }

    pub fn take_ready(&mut self) -> Vec<(NodeId, Tag)> {
        std::mem::take(&mut self.ready)
    }

    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    fn schedule(&mut self, at: Duration, event: Event) {
        self.seq += 1;
        self.events.insert((at, self.seq), event);
    }

    fn latency(&mut self) -> Duration {
        let (lo, hi) = (self.config.latency_min, self.config.latency_max);
        let span = hi.saturating_sub(lo).as_nanos() as u64;
        let extra = if span == 0 { 0 } else { self.rng.next_u64() % span };
        let spike = self.chance(self.config.spike_chance);
        lo + Duration::from_nanos(extra) + if spike { self.config.spike } else { Duration::ZERO }
    }

    fn chance(&mut self, p: f64) -> bool {
        self.rng.next_f64() < p
    }

    fn end(&self, end: EndId) -> Option<&End> {
        self.conns.get(&end.conn).map(|c| &c.ends[end.side])
    }

    fn end_mut(&mut self, end: EndId) -> Option<&mut End> {
        self.conns.get_mut(&end.conn).map(|c| &mut c.ends[end.side])
    }

    fn info(&self, end: EndId) -> Option<EndInfo> {
        let c = self.conns.get(&end.conn)?;
        let me = &c.ends[end.side];
        let other = &c.ends[1 - end.side];
        let remote = if end.side == 0 { c.target } else { other.addr };
        let remote_owner = (end.side == 1 || other.established).then_some(other.owner);
        Some(EndInfo { end, owner: me.owner, tag: me.tag, remote, remote_owner })
    }

    fn notify(&mut self, end: EndId) {
        if let Some(e) = self.end(end) {
            if !e.closed {
                self.ready.push((e.owner, e.tag));
            }
        }
    }

    /// `node` connects to `addr`; the end is tagged `tag` for its readiness.
    pub fn connect(&mut self, node: NodeId, tag: Tag, addr: SocketAddr) -> EndId {
        self.next_port = self.next_port.checked_add(1).unwrap_or(40_000);
        let local = SocketAddr::from(([127, 0, 0, 1], self.next_port));
        let end = |owner, tag, addr| End {
            owner,
            tag,
            addr,
            inbox: Inbox::default(),
            in_flight: 0,
            fin: false,
            reset: false,
            closed: false,
            established: false,
            refused: false,
            last_arrival: Duration::ZERO,
            blocked_writer: false,
        };
        let conn = self.next_conn;
        self.next_conn += 1;
        self.conns
            .insert(conn, Conn { ends: [end(node, tag, local), end(usize::MAX, Tag::Pending, addr)], target: addr });
        let at = self.now + self.latency();
        self.schedule(at, Event::Syn(conn));
        EndId { conn, side: 0 }
    }

    /// The next connection `node`'s listener accepted, and the connector's address.
    pub fn accept(&mut self, node: NodeId) -> Option<(EndId, SocketAddr)> {
        loop {
            let end = self.accepts.get_mut(&node)?.pop_front()?;
            let Some(c) = self.conns.get(&end.conn) else { continue };
            return Some((end, c.ends[0].addr));
        }
    }

    /// What `end` is now to its owner.
    pub fn retag(&mut self, end: EndId, tag: Tag) {
        if let Some(e) = self.end_mut(end) {
            e.tag = tag;
        }
    }

    /// Whether `end`'s connect finished: `Ok(false)` while under way.
    pub fn connected(&self, end: EndId) -> io::Result<bool> {
        match self.end(end) {
            Some(e) if e.refused => Err(io::ErrorKind::ConnectionRefused.into()),
            Some(e) if e.reset => Err(io::ErrorKind::ConnectionReset.into()),
            Some(e) => Ok(e.established),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// Whether the other side has closed or reset `end`'s connection.
    pub fn hung_up(&self, end: EndId) -> bool {
        self.end(end).is_some_and(|e| e.fin || e.reset)
    }

    pub fn read(&mut self, end: EndId, buf: &mut [u8]) -> io::Result<usize> {
        let Some(e) = self.end_mut(end) else { return Err(io::ErrorKind::NotConnected.into()) };
        // As a kernel does: what arrived before a reset is read first, then the error; a read
        // returns short only when nothing more is there, and readiness is edge-triggered (a
        // reader that stops before `WouldBlock` hears nothing more until new bytes come).
        if e.inbox.is_empty() {
            return match (e.reset, e.fin) {
                (true, _) => Err(io::ErrorKind::ConnectionReset.into()),
                (false, true) => Ok(0),
                (false, false) => Err(io::ErrorKind::WouldBlock.into()),
            };
        }
        let n = buf.len().min(e.inbox.len());
        e.inbox.take(&mut buf[..n]);
        if let (Some(info), Some(observer)) = (self.info(end), self.observer.as_mut()) {
            observer.read(info, &buf[..n]);
        }
        // Room again for the other side's writer.
        let other = end.other();
        if let Some(w) = self.end_mut(other) {
            if w.blocked_writer {
                w.blocked_writer = false;
                self.notify(other);
            }
        }
        Ok(n)
    }

    pub fn write(&mut self, end: EndId, bytes: &[u8]) -> io::Result<usize> {
        let window = self.config.window;
        let (partial, cut) = (self.chance(self.config.partial_write), self.rng.next_u64());
        let Some(c) = self.conns.get_mut(&end.conn) else { return Err(io::ErrorKind::NotConnected.into()) };
        let [first, second] = &mut c.ends;
        let (me, other) = if end.side == 0 { (first, second) } else { (second, first) };
        if me.reset {
            return Err(io::ErrorKind::ConnectionReset.into());
        }
        if !me.established {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if other.closed {
            // Nobody reads there any more: the kernel answers with a reset.
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        if bytes.is_empty() {
            return Ok(0);
        }
        let room = window.saturating_sub(other.in_flight + other.inbox.len());
        if room == 0 {
            me.blocked_writer = true;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut n = bytes.len().min(room);
        if partial && n > 1 {
            n = 1 + (cut % n as u64) as usize;
        }
        if n < bytes.len() {
            me.blocked_writer = true;
        }
        let sent = &bytes[..n];
        if let (Some(info), Some(observer)) = (self.info(end), self.observer.as_mut()) {
            observer.wrote(info, sent);
        }
        let segment = self.tamper(end, sent);
        if !segment.is_empty() {
            self.send(end.other(), segment);
        }
        Ok(n)
    }

    /// Puts `bytes` on the wire toward `to`, perhaps in two segments.
    fn send(&mut self, to: EndId, bytes: Vec<u8>) {
        let mut segments = vec![bytes];
        if self.chance(self.config.split) && segments[0].len() > 1 {
            let len = segments[0].len();
            let at = 1 + (self.rng.next_u64() % (len as u64 - 1)) as usize;
            let tail = segments[0].split_off(at);
            segments.push(tail);
        }
        for segment in segments {
            let arrival = self.arrival(to);
            if let Some(e) = self.end_mut(to) {
                e.in_flight += segment.len();
            }
            self.schedule(arrival, Event::Data(to, segment));
        }
    }

    /// When a segment sent now toward `to` arrives: after a latency, and after whatever was
    /// sent toward it before.
    fn arrival(&mut self, to: EndId) -> Duration {
        let at = self.now + self.latency();
        match self.end_mut(to) {
            Some(e) => {
                let at = at.max(e.last_arrival + Duration::from_nanos(1));
                e.last_arrival = at;
                at
            }
            None => at,
        }
    }

    /// The owner dropped `end`: a FIN goes to the other side after what is in flight.
    pub fn close(&mut self, end: EndId) {
        let Some(e) = self.end_mut(end) else { return };
        if e.closed {
            return;
        }
        e.closed = true;
        e.inbox.clear();
        if let (Some(info), Some(observer)) = (self.info(end), self.observer.as_mut()) {
            observer.closed(info);
        }
        let other = end.other();
        let arrival = self.arrival(other);
        self.schedule(arrival, Event::Fin(other));
        self.reap(end.conn);
    }

    /// Resets the connection of `end` on both sides at once (a middlebox's RST).
    pub fn reset(&mut self, end: EndId) {
        for side in [end, end.other()] {
            if let Some(e) = self.end_mut(side) {
                e.reset = true;
            }
            self.notify(side);
        }
    }

    /// Every connection between `a` and `b` that is established: for the fault injector.
    pub fn conns_between(&self, a: NodeId, b: NodeId) -> Vec<EndId> {
        self.conns
            .iter()
            .filter(|(_, c)| {
                let (x, y) = (c.ends[0].owner, c.ends[1].owner);
                c.ends[1].established && ((x == a && y == b) || (x == b && y == a))
            })
            .map(|(conn, _)| EndId { conn: *conn, side: 0 })
            .collect()
    }

    /// `node` crashed: its ends vanish (the other sides get a reset), its listener is gone.
    pub fn crash(&mut self, node: NodeId) {
        self.listeners.retain(|_, n| *n != node);
        self.accepts.remove(&node);
        let ends: Vec<EndId> = self
            .conns
            .iter()
            .flat_map(|(conn, c)| (0..2).map(move |side| (EndId { conn: *conn, side }, c.ends[side].owner)))
            .filter(|(_, owner)| *owner == node)
            .map(|(end, _)| end)
            .collect();
        for end in ends {
            if let (Some(info), Some(observer)) = (self.info(end), self.observer.as_mut()) {
                observer.closed(info);
            }
            if let Some(e) = self.end_mut(end) {
                e.closed = true;
                e.inbox.clear();
            }
            let other = end.other();
            let arrival = self.arrival(other);
            self.schedule(arrival, Event::Rst(other));
            self.reap(end.conn);
        }
    }

    fn reap(&mut self, conn: usize) {
        if self.conns.get(&conn).is_some_and(|c| c.ends.iter().all(|e| e.closed || e.owner == usize::MAX)) {
            self.conns.remove(&conn);
        }
    }

    /// Carries out everything due by `now`.
    pub fn advance(&mut self, now: Duration) {
        self.now = self.now.max(now);
        while let Some(entry) = self.events.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            let event = entry.remove();
            self.deliver(event);
        }
    }

    fn deliver(&mut self, event: Event) {
        match event {
            Event::Syn(conn) => {
                let Some(c) = self.conns.get(&conn) else { return };
                if c.ends[0].closed {
                    self.reap(conn);
                    return;
                }
                let from = c.ends[0].owner;
                let target = c.target;
                match self.listeners.get(&target).copied() {
                    Some(node) if self.is_partitioned(from, node) => {
                        let at = self.now + RETRANSMIT;
                        self.schedule(at, Event::Syn(conn));
                    }
                    Some(node) => {
                        if let Some(c) = self.conns.get_mut(&conn) {
                            c.ends[1].owner = node;
                            c.ends[1].established = true;
                        }
                        self.accepts.entry(node).or_default().push_back(EndId { conn, side: 1 });
                        self.ready.push((node, Tag::Listener));
                        let at = self.now + self.latency();
                        self.schedule(at, Event::SynAck(conn));
                    }
                    None => {
                        let at = self.now + self.latency();
                        self.schedule(at, Event::Refuse(conn));
                    }
                }
            }
            Event::SynAck(conn) => {
                let end = EndId { conn, side: 0 };
                if let Some(e) = self.end_mut(end) {
                    e.established = true;
                }
                self.notify(end);
            }
            Event::Refuse(conn) => {
                let end = EndId { conn, side: 0 };
                if let Some(e) = self.end_mut(end) {
                    e.refused = true;
                }
                self.notify(end);
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.ends[1].closed = true;
                }
                self.reap(conn);
            }
            Event::Data(to, bytes) => {
                let Some(c) = self.conns.get(&to.conn) else { return };
                let (a, b) = (c.ends[0].owner, c.ends[1].owner);
                if self.is_partitioned(a, b) {
                    let at = self.now + RETRANSMIT;
                    if let Some(e) = self.end_mut(to) {
                        e.last_arrival = e.last_arrival.max(at);
                    }
                    self.schedule(at, Event::Data(to, bytes));
                    return;
                }
                let Some(e) = self.end_mut(to) else { return };
                e.in_flight = e.in_flight.saturating_sub(bytes.len());
                if e.closed || e.reset {
                    return;
                }
                e.inbox.push(bytes);
                self.notify(to);
            }
            Event::Fin(to) => {
                if self.partitioned_conn(to.conn) {
                    let at = self.now + RETRANSMIT;
                    self.schedule(at, Event::Fin(to));
                    return;
                }
                if let Some(e) = self.end_mut(to) {
                    e.fin = true;
                }
                self.notify(to);
            }
            Event::Rst(to) => {
                if let Some(e) = self.end_mut(to) {
                    e.reset = true;
                }
                self.notify(to);
            }
        }
    }

    fn partitioned_conn(&self, conn: usize) -> bool {
        self.conns.get(&conn).is_some_and(|c| self.is_partitioned(c.ends[0].owner, c.ends[1].owner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// Runs the network until nothing is left to do.
    fn settle(net: &mut Net) {
        while let Some(t) = net.next_event() {
            net.advance(t);
        }
    }

    fn connected_pair(net: &mut Net) -> (EndId, EndId) {
        net.listen(addr(8000), 1);
        let a = net.connect(0, Tag::Peer(0), addr(8000));
        settle(net);
        let (b, _) = net.accept(1).expect("accepted");
        assert!(net.connected(a).expect("no error"));
        (a, b)
    }

    fn read_all(net: &mut Net, end: EndId) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 7];
        while let Ok(n) = net.read(end, &mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    #[test]
    fn bytes_arrive_in_order_however_they_are_cut() {
        let mut net = Net::new(7, NetConfig { split: 0.9, partial_write: 0.9, ..NetConfig::default() });
        let (a, b) = connected_pair(&mut net);
        let message: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let mut rest = &message[..];
        let mut writes = 0;
        while !rest.is_empty() {
            let n = net.write(a, rest).expect("room");
            rest = &rest[n..];
            writes += 1;
        }
        assert!(writes > 1, "partial writes happen");
        settle(&mut net);
        assert_eq!(read_all(&mut net, b), message);
    }

    #[test]
    fn a_reader_that_stops_reading_blocks_its_writer_then_wakes_it() {
        let mut net = Net::new(1, NetConfig { window: 100, partial_write: 0.0, ..NetConfig::default() });
        let (a, b) = connected_pair(&mut net);
        assert_eq!(net.write(a, &[1; 150]).expect("room"), 100);
        assert_eq!(net.write(a, &[1; 50]).map_err(|e| e.kind()), Err(io::ErrorKind::WouldBlock));
        settle(&mut net);
        net.take_ready();
        let mut buf = [0u8; 40];
        assert!(net.read(b, &mut buf).expect("data") > 0);
        assert!(net.take_ready().contains(&(0, Tag::Peer(0))), "the writer hears of room");
    }

    #[test]
    fn nothing_listens_means_refused_and_a_partition_holds_bytes_back() {
        let mut net = Net::new(3, NetConfig::default());
        let lost = net.connect(0, Tag::Peer(1), addr(9999));
        settle(&mut net);
        assert_eq!(net.connected(lost).map_err(|e| e.kind()), Err(io::ErrorKind::ConnectionRefused));

        let (a, b) = connected_pair(&mut net);
        net.partition(0, 1);
        let mut rest = &b"held\n"[..];
        while !rest.is_empty() {
            rest = &rest[net.write(a, rest).expect("room")..];
        }
        let later = net.now() + Duration::from_secs(2);
        net.advance(later);
        assert!(read_all(&mut net, b).is_empty(), "nothing crosses a partition");
        net.heal(0, 1);
        settle(&mut net);
        assert_eq!(read_all(&mut net, b), b"held\n");
    }

    #[test]
    fn a_close_arrives_after_the_data_and_a_crash_resets_the_other_side() {
        let mut net = Net::new(5, NetConfig::default());
        let (a, b) = connected_pair(&mut net);
        let mut rest = &b"last words"[..];
        while !rest.is_empty() {
            rest = &rest[net.write(a, rest).expect("room")..];
        }
        net.close(a);
        settle(&mut net);
        assert_eq!(read_all(&mut net, b), b"last words");
        assert_eq!(net.read(b, &mut [0u8; 4]).expect("end of stream"), 0);

        let (c, d) = connected_pair(&mut net);
        net.crash(1);
        settle(&mut net);
        assert_eq!(net.read(c, &mut [0u8; 4]).map_err(|e| e.kind()), Err(io::ErrorKind::ConnectionReset));
        let _ = d;
        let refused = net.connect(0, Tag::Peer(2), addr(8000));
        settle(&mut net);
        assert!(net.connected(refused).is_err(), "a crashed node listens no more");
    }
}
