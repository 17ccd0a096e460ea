//! What every driver shares: a service and its [`Ctx`], and everything that happens between
//! bytes arriving on a socket and the service's callbacks — framing request lines, the
//! per-turn budgets, answer ordering and backpressure, idle time-outs, the drain, and peer
//! connections' lines and ends. A driver (the mio loop, the simulator) owns the sockets, lends
//! them through [`Sockets`], tells the engine what became ready and when, and asks it for the
//! next deadline.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::Waker;
use slab::Slab;

use super::{Client, ClientId, Ctx, LoopTimer, ServerConfig, Service, Slot};
use crate::access_log::AccessLog;
use crate::fdlimit::DescriptorBudget;
use crate::framing::{next_frame, read_once, Frame};
use crate::metrics::StartTime;
use crate::outbuf::Output;
use crate::peer::{InputPool, PeerClosed, PeerCommand, PeerEnd, PeerId};
use crate::protocol::{Reply, Status};
use crate::timers::TimerQueue;

/// Bytes read from a socket per `read` call.
const READ_CHUNK: usize = 64 * 1024;
/// Reads one connection gets per loop turn before others get their turn.
const READ_BUDGET: usize = 16;
/// How long to wait before accepting again after running out of file descriptors.
pub(super) const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// The period of [`LoopTimer::Tick`].
const TICK: Duration = Duration::from_secs(1);

/// The sockets behind a driver's connections, lent to the engine. Indexes are the engine's:
/// a client's slot in `Ctx`, a peer's [`PeerId::index`].
pub trait Sockets {
    type Stream: Read + Write;

    fn client(&mut self, index: usize) -> Option<&mut Self::Stream>;
    /// Whether the driver should report room to write on client `index` (it has output the
    /// socket did not take).
    fn watch_client_writes(&mut self, index: usize, on: bool) -> io::Result<()>;
    fn drop_client(&mut self, index: usize);

    /// Starts connecting peer socket `index` to `addr`.
    fn connect_peer(&mut self, index: usize, addr: SocketAddr) -> io::Result<()>;
    /// Whether peer `index`'s connect has completed: `Ok(false)` while under way.
    fn peer_connected(&mut self, index: usize) -> io::Result<bool>;
    fn peer(&mut self, index: usize) -> Option<&mut Self::Stream>;
    fn drop_peer(&mut self, index: usize);
}

/// A driver's sockets of one kind (clients or peers), at the engine's indexes for them.
#[derive(Debug)]
pub struct Slots<S>(Vec<Option<S>>);

impl<S> Default for Slots<S> {
    fn default() -> Self {
        Slots(Vec::new())
    }
}

impl<S> Slots<S> {
    pub fn get(&self, index: usize) -> Option<&S> {
        self.0.get(index)?.as_ref()
    }

    pub fn get_mut(&mut self, index: usize) -> Option<&mut S> {
        self.0.get_mut(index)?.as_mut()
    }

    /// Puts `socket` at `index`, giving back what was there.
    pub fn put(&mut self, index: usize, socket: S) -> Option<S> {
        if self.0.len() <= index {
            self.0.resize_with(index + 1, || None);
        }
        self.0[index].replace(socket)
    }

    pub fn take(&mut self, index: usize) -> Option<S> {
        self.0.get_mut(index)?.take()
    }
}

/// What the timers that fired ask of the driver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Due {
    /// Try accepting again (an accept ran out of descriptors).
    pub accept: bool,
    /// The one-second tick: the driver's own housekeeping (the admin listener).
    pub tick: bool,
    /// The drain took too long: stop now.
    pub drain_deadline: bool,
}

/// What to do with a new client connection.
#[derive(Debug)]
pub enum Admission {
    /// Give its socket slot `index`.
    Admitted(usize),
    /// Write it this line (a fresh socket takes it whole) and close it.
    Refused(Vec<u8>),
}

/// A service, its context, and the shared half of the loop.
pub struct Engine<S: Service> {
    pub(super) ctx: Ctx<S::Timer>,
    pub(super) service: S,
    scratch: Box<[u8]>,
    /// Clients that used up their read budget and must be read again next turn.
    again: Vec<ClientId>,
    /// Swapped with `again` and `Ctx::dirty` while they are worked through, so that neither
    /// list gives up its allocation each turn.
    again_batch: Vec<ClientId>,
    dirty_batch: Vec<usize>,
    peers_batch: Vec<PeerId>,
    /// Input buffers for peers' long lines, reused across answers and connections.
    input_pool: InputPool,
}

impl<S: Service> Engine<S> {
    /// `waker` is the mio driver's (for a service's helper threads); `now` starts the clock.
    pub fn new(
        config: ServerConfig,
        local_addr: SocketAddr,
        service: S,
        waker: Option<Arc<Waker>>,
        now: Instant,
    ) -> io::Result<Self> {
        let access_log = config.access_log.clone().map(AccessLog::open).transpose()?;
        let descriptors = DescriptorBudget::measure(config.fd_reserve);
        Ok(Engine {
            ctx: Ctx {
                now,
                waker,
                clients: Slab::new(),
                peers: Slab::new(),
                next_peer_serial: 0,
                peers_dirty: Vec::new(),
                peer_commands: VecDeque::new(),
                timers: TimerQueue::new(),
                config,
                local_addr,
                started: StartTime::at(now),
                total_requests: 0,
                next_serial: 0,
                dirty: Vec::new(),
                spare: Vec::new(),
                draining: false,
                descriptors,
                turn: 0,
                access_log,
            },
            service,
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
            again: Vec::new(),
            again_batch: Vec::new(),
            dirty_batch: Vec::new(),
            peers_batch: Vec::new(),
            input_pool: InputPool::new(),
        })
    }

    pub fn ctx(&self) -> &Ctx<S::Timer> {
        &self.ctx
    }

    pub fn service(&self) -> &S {
        &self.service
    }

    /// Starts the service: the tick (when `tick`, or with an access log) and its first timers.
    pub fn start<K: Sockets>(&mut self, sockets: &mut K, now: Instant, tick: bool) {
        self.ctx.now = now;
        if tick || self.ctx.access_log.is_some() {
            self.ctx.timers.schedule(now + TICK, LoopTimer::Tick);
        }
        self.service.on_start(&mut self.ctx);
        self.apply_peer_commands(sockets);
    }

    /// A new loop turn begins at `now`.
    pub fn begin_turn(&mut self, now: Instant) {
        self.ctx.now = now;
        self.ctx.turn = self.ctx.turn.wrapping_add(1);
    }

    pub fn set_now(&mut self, now: Instant) {
        self.ctx.now = now;
    }

    /// Whether some connection has work left over from its budget (poll without waiting).
    pub fn has_leftovers(&self) -> bool {
        !self.again.is_empty()
    }

    /// The earliest timer's deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.ctx.timers.next_deadline()
    }

    pub fn is_draining(&self) -> bool {
        self.ctx.draining
    }

    /// The drain is over: no client connection is left.
    pub fn is_finished(&self) -> bool {
        self.ctx.draining && self.ctx.clients.is_empty()
    }

    /// What the loop holds now, by name, for the leak check at the end of a simulated run:
    /// client connections, answers owed, peer connections, timers.
    pub fn outstanding(&self) -> Vec<(String, usize)> {
        let ctx = &self.ctx;
        let owed: usize = ctx.clients.iter().map(|(_, c)| c.awaited()).sum();
        vec![
            ("client connections".into(), ctx.clients.len()),
            ("answers owed".into(), owed),
            ("peer connections".into(), ctx.peers.len()),
            ("timers".into(), ctx.timers.len()),
        ]
    }

    /// The most output memory any client connection holds now: measured from what is queued
    /// and held back, not taken from the count the bound is enforced with.
    pub fn max_client_output(&self) -> usize {
        fn parked(c: &Client) -> impl Iterator<Item = &crate::outbuf::Parked> {
            c.slots.iter().filter_map(|s| match s {
                Slot::Ready(p) => Some(p),
                Slot::Waiting => None,
            })
        }
        self.ctx.clients.iter().map(|(_, c)| c.out.held(parked(c))).max().unwrap_or(0)
    }

    /// Decides on a new client connection from `peer`.
    pub fn admit(&mut self, peer: SocketAddr) -> Admission {
        let ctx = &mut self.ctx;
        let short_of_descriptors = ctx.clients.len() >= ctx.descriptors.client_cap();
        if short_of_descriptors {
            ctx.descriptors.warn_short(ctx.now, ctx.clients.len());
        }
        if short_of_descriptors || ctx.clients.len() >= ctx.config.max_connections {
            let mut line = Vec::with_capacity(64);
            let why = if short_of_descriptors {
                "too many connections for the descriptor limit"
            } else {
                "too many connections"
            };
            Reply::error(Status::Overloaded, why).encode(&mut line);
            debug!("refused {peer}: at max connections");
            return Admission::Refused(line);
        }
        let entry = ctx.clients.vacant_entry();
        let index = entry.key();
        let serial = ctx.next_serial;
        ctx.next_serial += 1;
        let id = ClientId { index, serial };
        let idle_timer = Some(ctx.timers.schedule(ctx.now + ctx.config.idle_timeout, LoopTimer::Idle(id)));
        entry.insert(Client {
            peer,
            serial,
            carry: Vec::new(),
            out: Output::new(),
            slots: VecDeque::new(),
            head_slot: 0,
            unordered: 0,
            writable_registered: false,
            read_closed: false,
            drained: false,
            read_until_empty: false,
            closing: ctx.draining,
            dirty: false,
            wants_room: false,
            lines: 0,
            lines_turn: 0,
            last_active: ctx.now,
            idle_timer,
        });
        Admission::Admitted(index)
    }

    /// The driver could not set up client `index`'s socket after all.
    pub fn abandon<K: Sockets>(&mut self, sockets: &mut K, index: usize) {
        self.close(sockets, index);
    }

    /// Client `index`'s socket is ready (`read_until_empty`: the peer closed, the socket
    /// failed, or urgent data came: from then on short reads do not end reading).
    pub fn client_ready<K: Sockets>(&mut self, sockets: &mut K, index: usize, read_until_empty: bool) {
        let Some(c) = self.ctx.clients.get_mut(index) else { return };
        c.drained = false;
        c.read_until_empty |= read_until_empty;
        self.drive(sockets, index);
        self.apply_peer_commands(sockets);
    }

    /// Drives the clients that used up their budget last turn.
    pub fn drive_again<K: Sockets>(&mut self, sockets: &mut K) {
        std::mem::swap(&mut self.again, &mut self.again_batch);
        let mut batch = std::mem::take(&mut self.again_batch);
        for client in batch.drain(..) {
            if let Some(index) = self.ctx.live_index(client) {
                self.drive(sockets, index);
            }
        }
        self.again_batch = batch;
        self.apply_peer_commands(sockets);
    }

    /// A thread of the service has news (the mio driver's waker).
    pub fn wake<K: Sockets>(&mut self, sockets: &mut K) {
        self.service.on_wake(&mut self.ctx);
        self.apply_peer_commands(sockets);
    }

    /// SIGHUP: the service re-reads its configuration.
    pub fn reload<K: Sockets>(&mut self, sockets: &mut K) {
        self.service.on_reload(&mut self.ctx);
        self.apply_peer_commands(sockets);
    }

    /// SIGUSR1: the access log is reopened.
    pub fn reopen_log(&mut self) {
        if let Some(log) = self.ctx.access_log.as_mut() {
            info!("SIGUSR1: reopening the access log");
            log.reopen();
        }
    }

    /// Fires the timers due at `now`; says what the driver should do about its own.
    pub fn fire_timers<K: Sockets>(&mut self, sockets: &mut K, now: Instant) -> Due {
        self.ctx.now = now;
        let mut due = Due::default();
        while let Some(timer) = self.ctx.timers.pop_expired(now) {
            match timer {
                LoopTimer::Service(t) => self.service.on_timer(&mut self.ctx, t),
                LoopTimer::Idle(id) => self.check_idle(sockets, id),
                LoopTimer::AcceptRetry => due.accept = true,
                LoopTimer::Tick => {
                    self.ctx.timers.schedule(now + TICK, LoopTimer::Tick);
                    if let Some(log) = self.ctx.access_log.as_mut() {
                        log.flush();
                    }
                    due.tick = true;
                }
                LoopTimer::DrainDeadline => {
                    warn!("drain deadline passed with {} connections still open", self.ctx.clients.len());
                    due.drain_deadline = true;
                    break;
                }
            }
            self.apply_peer_commands(sockets);
        }
        due
    }

    /// Accepting failed for want of descriptors: try again after a pause instead of spinning
    /// on an always-ready listener, and say so at most once a second.
    pub fn accept_failed(&mut self, e: &io::Error) {
        if self.ctx.descriptors.may_log(self.ctx.now) {
            warn!("accept failed: {e}; retrying every {} ms", ACCEPT_RETRY.as_millis());
        }
        self.ctx.timers.schedule(self.ctx.now + ACCEPT_RETRY, LoopTimer::AcceptRetry);
    }

    /// The service samples what it keeps for the admin views (about once a second).
    pub fn admin_tick(&mut self) {
        self.service.on_admin_tick(&mut self.ctx);
    }

    /// The end of the turn: answers queued are written, the service has its turn end, what
    /// it queued for peers is written, until nothing changes.
    pub fn end_turn<K: Sockets>(&mut self, sockets: &mut K) {
        loop {
            self.flush_dirty(sockets);
            self.service.on_turn_end(&mut self.ctx);
            self.apply_peer_commands(sockets);
            self.flush_peers(sockets);
            if self.ctx.dirty.is_empty() && self.ctx.peer_commands.is_empty() {
                break;
            }
        }
    }

    /// Begins the drain (once): no more requests are read; what is owed is answered.
    /// Returns false when it had begun already.
    pub fn begin_drain<K: Sockets>(&mut self, sockets: &mut K, why: &str) -> bool {
        if self.ctx.draining {
            return false;
        }
        info!("{why}: no longer accepting; answering what is in flight");
        self.ctx.draining = true;
        let deadline = self.ctx.now + self.ctx.config.drain_timeout;
        self.ctx.timers.schedule(deadline, LoopTimer::DrainDeadline);
        self.service.on_drain(&mut self.ctx);
        let indexes: Vec<usize> = self.ctx.clients.iter().map(|(i, _)| i).collect();
        for index in indexes {
            self.ctx.clients[index].closing = true;
            self.ctx.mark_dirty(index);
        }
        self.apply_peer_commands(sockets);
        true
    }

    /// The loop is over: what the access log holds is written.
    pub fn stop(&mut self) {
        if let Some(log) = self.ctx.access_log.as_mut() {
            log.flush();
        }
        info!("stopped after answering {} requests", self.ctx.total_requests);
    }

    fn check_idle<K: Sockets>(&mut self, sockets: &mut K, id: ClientId) {
        let Some(index) = self.ctx.live_index(id) else { return };
        let idle = self.ctx.config.idle_timeout;
        let now = self.ctx.now;
        let c = &mut self.ctx.clients[index];
        let quiet_since = c.last_active;
        // A client waiting for an answer we owe is not idle: the slowness is ours.
        let waiting_on_us = c.awaited() > 0 && c.out.is_empty();
        if waiting_on_us || quiet_since + idle > now {
            let at = if waiting_on_us { now + idle } else { quiet_since + idle };
            c.idle_timer = Some(self.ctx.timers.schedule(at, LoopTimer::Idle(id)));
        } else {
            debug!("closing connection {index}: idle for {} ms", idle.as_millis());
            c.idle_timer = None;
            self.close(sockets, index);
        }
    }

    fn flush_dirty<K: Sockets>(&mut self, sockets: &mut K) {
        while !self.ctx.dirty.is_empty() {
            std::mem::swap(&mut self.ctx.dirty, &mut self.dirty_batch);
            let mut batch = std::mem::take(&mut self.dirty_batch);
            for index in batch.drain(..) {
                if let Some(c) = self.ctx.clients.get_mut(index) {
                    c.dirty = false;
                    self.drive(sockets, index);
                }
            }
            self.dirty_batch = batch;
        }
    }

    /// Brings one client up to date: writes what is owed, then reads and dispatches requests
    /// until the socket is empty, the limits pause it, or its read budget is spent.
    fn drive<K: Sockets>(&mut self, sockets: &mut K, index: usize) {
        let mut reads = 0;
        loop {
            let config = &self.ctx.config;
            let Some(c) = self.ctx.clients.get_mut(index) else { return };
            let Some(stream) = sockets.client(index) else { return self.close(sockets, index) };
            match c.out.flush_to(stream) {
                Ok(0) => {}
                Ok(_) => c.last_active = self.ctx.now,
                Err(e) => {
                    debug!("closing connection {index}: write failed: {e}");
                    return self.close(sockets, index);
                }
            }
            if c.wants_room && (c.out.counted() <= config.output_limit || c.out.is_empty()) {
                c.wants_room = false;
                let id = ClientId { index, serial: c.serial };
                self.service.on_room(&mut self.ctx, id);
                if !self.ctx.clients.contains(index) {
                    return;
                }
                continue;
            }
            if c.closing || c.read_closed {
                // After EOF, a last line without its newline is still to be answered; a
                // closing connection (drain, line too long) reads nothing more.
                if c.owes_nothing() && (c.closing || c.carry.is_empty()) {
                    return self.close(sockets, index);
                }
                if c.closing {
                    return self.update_interest(sockets, index);
                }
            }
            if c.over_limits(config) {
                return self.update_interest(sockets, index);
            }
            if c.budget_spent(self.ctx.turn) {
                let serial = c.serial;
                self.again.push(ClientId { index, serial });
                return self.update_interest(sockets, index);
            }
            if !c.carry.is_empty() && memchr::memchr(b'\n', &c.carry).is_some() {
                let carry = std::mem::take(&mut c.carry);
                let used = dispatch(&mut self.service, &mut self.ctx, index, &carry);
                if let Some(c) = self.ctx.clients.get_mut(index) {
                    c.carry = carry;
                    c.carry.drain(..used);
                }
                continue;
            }
            if c.read_closed {
                // The peer finished sending; a last line without its newline still counts.
                if !c.carry.is_empty() {
                    let mut carry = std::mem::take(&mut c.carry);
                    carry.push(b'\n');
                    let used = dispatch(&mut self.service, &mut self.ctx, index, &carry);
                    if let Some(c) = self.ctx.clients.get_mut(index) {
                        // Paused part way: keep the rest, without the newline added here.
                        carry.pop();
                        carry.drain(..used.min(carry.len()));
                        c.carry = carry;
                    }
                    continue;
                }
                return self.update_interest(sockets, index);
            }
            if c.drained {
                return self.update_interest(sockets, index);
            }
            if reads == READ_BUDGET {
                let serial = c.serial;
                self.again.push(ClientId { index, serial });
                return self.update_interest(sockets, index);
            }
            reads += 1;
            match read_once(stream, &mut self.scratch) {
                Ok(0) => c.read_closed = true,
                Ok(n) => {
                    c.last_active = self.ctx.now;
                    c.drained = n < self.scratch.len() && !c.read_until_empty;
                    let fresh = &self.scratch[..n];
                    if c.carry.is_empty() {
                        // The common case: lines straight from the read buffer, no copy.
                        let used = dispatch(&mut self.service, &mut self.ctx, index, fresh);
                        if let Some(c) = self.ctx.clients.get_mut(index) {
                            c.carry.extend_from_slice(&fresh[used..]);
                        }
                    } else if memchr::memchr(b'\n', fresh).is_some() {
                        c.carry.extend_from_slice(fresh);
                    } else {
                        // Still no end of line: only the length needs checking, not a rescan.
                        c.carry.extend_from_slice(fresh);
                        if c.carry.len() > config.max_line {
                            reject_long_line(&mut self.ctx, index);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Empty now: what set `read_until_empty` (urgent data; a close or an error
                    // would have ended in EOF or an error instead) has been read past, and
                    // short reads again mean empty.
                    c.read_until_empty = false;
                    return self.update_interest(sockets, index);
                }
                Err(e) => {
                    debug!("closing connection {index}: read failed: {e}");
                    return self.close(sockets, index);
                }
            }
            if !self.ctx.clients.contains(index) {
                return;
            }
        }
    }

    fn update_interest<K: Sockets>(&mut self, sockets: &mut K, index: usize) {
        let Some(c) = self.ctx.clients.get_mut(index) else { return };
        let want_writable = !c.out.is_empty();
        if want_writable != c.writable_registered {
            if let Err(e) = sockets.watch_client_writes(index, want_writable) {
                debug!("closing connection {index}: reregister failed: {e}");
                return self.close(sockets, index);
            }
            c.writable_registered = want_writable;
        }
    }

    fn close<K: Sockets>(&mut self, sockets: &mut K, index: usize) {
        if !self.ctx.clients.contains(index) {
            return;
        }
        let mut c = self.ctx.clients.remove(index);
        sockets.drop_client(index);
        if let Some(key) = c.idle_timer.take() {
            self.ctx.timers.cancel(key);
        }
        for slot in c.slots.drain(..) {
            if let Slot::Ready(parked) = slot {
                super::recycle(&mut self.ctx.spare, c.out.discard(parked));
            }
        }
        if c.wants_room {
            // The service holds work for this client: let it drop it.
            self.service.on_room(&mut self.ctx, ClientId { index, serial: c.serial });
        }
    }
}

/// Peer connections: the driver reports readiness, the engine completes the connect, writes
/// what is queued, reads, and hands the service each complete line, then how it ended.
impl<S: Service> Engine<S> {
    /// Peer socket `index` is ready (connected, readable, writable or closed).
    pub fn peer_ready<K: Sockets>(&mut self, sockets: &mut K, index: usize) {
        self.drive_peer(sockets, index);
        self.apply_peer_commands(sockets);
    }

    fn drive_peer<K: Sockets>(&mut self, sockets: &mut K, index: usize) {
        let Some(p) = self.ctx.peers.get_mut(index) else { return };
        let id = PeerId { index, serial: p.serial };
        if !p.connected {
            match sockets.peer_connected(index) {
                Ok(false) => return,
                Ok(true) => {
                    p.connected = true;
                    self.service.on_peer_connected(&mut self.ctx, id);
                }
                Err(e) => return self.end_peer(sockets, id, PeerEnd::ConnectFailed(e)),
            }
        }
        // A failed write ends the connection, but only after what the peer sent before it
        // went (answers, then a reset for the requests it left unread) is handed over.
        let write_failed = self.write_peer(sockets, id).err();
        self.read_peer(sockets, id, write_failed);
    }

    /// Reads what `id` sent and hands the service each complete line, then how the
    /// connection ended, if it did (`write_failed`: a write to it failed just before).
    fn read_peer<K: Sockets>(&mut self, sockets: &mut K, id: PeerId, write_failed: Option<io::Error>) {
        let index = id.index;
        let Some(p) = self.ctx.live_peer_mut(id) else { return };
        let Some(mut input) = p.input.take() else { return };
        let max_line = p.max_line;
        let end = 'read: loop {
            let read = match sockets.peer(index) {
                Some(stream) => input.fill(stream, max_line, &mut self.input_pool),
                None => Err(io::ErrorKind::NotConnected.into()),
            };
            if let Some(p) = self.ctx.live_peer_mut(id) {
                p.received = input.received();
            }
            loop {
                match input.frame(max_line) {
                    Frame::Line(line, n) => {
                        if let Some(p) = self.ctx.live_peer_mut(id) {
                            p.unread = input.buffered().saturating_sub(n);
                        }
                        self.service.on_peer_line(&mut self.ctx, id, input.line(line));
                        input.consume(n);
                        if !self.ctx.is_peer_open(id) {
                            // Closed by the service: what else it sent is dropped with it.
                            return;
                        }
                    }
                    Frame::TooLong => break 'read Some(PeerEnd::LineTooLong),
                    Frame::Incomplete => match read {
                        Err(e) => break 'read Some(PeerEnd::Failed(e)),
                        Ok(()) if input.is_eof() => break 'read Some(PeerEnd::Closed),
                        // Reading stopped at `max_line` bytes of complete lines, now used: the
                        // socket still holds the rest, and no new event would say so.
                        Ok(()) if input.stopped_short() => continue 'read,
                        Ok(()) => break 'read None,
                    },
                }
            }
        };
        if let Some(p) = self.ctx.live_peer_mut(id) {
            p.unread = input.buffered();
            p.input = Some(input);
        }
        if let Some(end) = end.or(write_failed.map(PeerEnd::Failed)) {
            self.end_peer(sockets, id, end);
        }
    }

    /// Writes what is queued for `peer`, once it is connected.
    fn write_peer<K: Sockets>(&mut self, sockets: &mut K, peer: PeerId) -> io::Result<()> {
        let Some(p) = self.ctx.live_peer_mut(peer) else { return Ok(()) };
        if !p.connected || p.out.is_empty() {
            return Ok(());
        }
        match sockets.peer(peer.index) {
            Some(stream) => p.out.flush_to(stream).map(|_| ()),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// Writes what the turn queued for peers, one write per connection.
    fn flush_peers<K: Sockets>(&mut self, sockets: &mut K) {
        while !self.ctx.peers_dirty.is_empty() {
            std::mem::swap(&mut self.ctx.peers_dirty, &mut self.peers_batch);
            let mut batch = std::mem::take(&mut self.peers_batch);
            for peer in batch.drain(..) {
                let Some(p) = self.ctx.live_peer_mut(peer) else { continue };
                p.dirty = false;
                if let Err(e) = self.write_peer(sockets, peer) {
                    // What it sent before the failure (its answers, then a reset) first.
                    self.read_peer(sockets, peer, Some(e));
                }
            }
            self.peers_batch = batch;
            self.apply_peer_commands(sockets);
        }
    }

    /// Carries out the connects and closes the service asked for, in order; a connect that
    /// fails at once is reported like any other end.
    fn apply_peer_commands<K: Sockets>(&mut self, sockets: &mut K) {
        while let Some(command) = self.ctx.peer_commands.pop_front() {
            match command {
                PeerCommand::Drop(index) => sockets.drop_peer(index),
                PeerCommand::Connect(peer, addr) => {
                    if !self.ctx.is_peer_open(peer) {
                        continue;
                    }
                    if let Err(e) = sockets.connect_peer(peer.index, addr) {
                        self.end_peer(sockets, peer, PeerEnd::ConnectFailed(e));
                    }
                }
            }
        }
    }

    fn end_peer<K: Sockets>(&mut self, sockets: &mut K, peer: PeerId, end: PeerEnd) {
        if !self.ctx.is_peer_open(peer) {
            return;
        }
        let p = self.ctx.peers.remove(peer.index);
        sockets.drop_peer(peer.index);
        debug!("peer connection {} to {} ended: {}", peer.serial, p.addr, end.describe());
        let closed = PeerClosed { end, received: p.received, was_connected: p.connected };
        if let Some(input) = p.input {
            input.recycle(&mut self.input_pool);
        }
        self.service.on_peer_closed(&mut self.ctx, peer, closed);
    }
}

/// Hands the complete lines at the front of `bytes` to the service, until the bytes run out
/// or the client's limits pause it. Returns how many bytes were used.
fn dispatch<S: Service>(service: &mut S, ctx: &mut Ctx<S::Timer>, index: usize, bytes: &[u8]) -> usize {
    let Some(serial) = ctx.clients.get(index).map(|c| c.serial) else { return bytes.len() };
    let client = ClientId { index, serial };
    let max_line = ctx.config.max_line;
    let mut used = 0;
    loop {
        let c = &ctx.clients[index];
        if c.closing || c.over_limits(&ctx.config) || c.budget_spent(ctx.turn) {
            return used;
        }
        match next_frame(&bytes[used..], max_line) {
            Frame::Line(line, n) => {
                used += n;
                ctx.clients[index].count_line(ctx.turn);
                if !line.iter().all(|b| *b == b' ' || *b == b'\t') {
                    if let Some(log) = ctx.access_log.as_mut() {
                        log.begin(line, ctx.now);
                    }
                    service.on_line(ctx, client, line);
                    if let Some(log) = ctx.access_log.as_mut() {
                        log.end();
                    }
                }
            }
            Frame::Incomplete => return used,
            Frame::TooLong => {
                reject_long_line(ctx, index);
                return bytes.len();
            }
        }
    }
}

/// SPEC 2: a line over `--max-line` is answered with BAD_REQUEST at once, and the
/// connection is closed once that answer (and any before it) is written.
fn reject_long_line<T>(ctx: &mut Ctx<T>, index: usize) {
    let serial = ctx.clients[index].serial;
    let message = format!("request line longer than {} bytes", ctx.config.max_line);
    ctx.reply(ClientId { index, serial }, true, |out| Reply::error(Status::BadRequest, &message).encode(out));
    let c = &mut ctx.clients[index];
    c.closing = true;
    c.carry = Vec::new();
}
