//! The service scaffolding every tier runs on. A service plugs in through [`Service`]: it is
//! handed events (a client's request line; a peer connected, a peer's line, a peer closed; a
//! timer; the drain) and acts through [`Ctx`]: answer now or later, connect to a peer and send
//! it lines, set timers, read `now`. It owns no socket and no clock, so the same service code
//! runs on two drivers: the mio loop ([`Server`], what the binaries run) and the simulator
//! (the `sim` crate). What both share is in [`Engine`]: framing, answer ordering,
//! backpressure and limits are handled there once, over whatever sockets the driver has.
//!
//! Ordering: answers to requests without an id leave in request order. Each such request
//! takes a slot in its connection's queue; an answer that is ready while an earlier one is
//! still awaited waits in its slot. Requests with an id take no slot and are written the
//! moment they are answered (SPEC 2: they may overtake).
//!
//! Backpressure (SPEC 3.8): a connection stops being read while its output is over
//! `output_limit` or while `max_pipeline` answers are awaited; it is read again as soon as
//! that clears. Its output counts what is queued, the answers that wait in their slot for an
//! earlier one, and each shared chunk once ([`crate::outbuf`]). Answers that complete later
//! (a slow origin, a coalesced fetch) can still overshoot that; a service that makes big
//! answers late asks [`Ctx::has_room`] first and, when there is none, waits for
//! [`Service::on_room`] (the origin does; the proxy and balancer forward requests upstream
//! only within each connection's window, [`crate::window`]).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::Waker;
use slab::Slab;

use crate::access_log::{AccessLog, NoteId};
use crate::fdlimit::DescriptorBudget;
use crate::framing::SharedBytes;
use crate::metrics::{CommonMetrics, HealthData, LatencyHistogram, StartTime};
use crate::outbuf::{Output, Parked, SHARE_MIN};
use crate::peer::{Peer, PeerClosed, PeerCommand, PeerId, PeerLine};
use crate::protocol::{encode_ok_value, Id, RequestError};
use crate::timers::{TimerKey, TimerQueue};

mod bind;
mod engine;
mod mio_driver;

pub use bind::{bind_listener, bind_listener_with, ShutdownHandle};
pub use engine::{Admission, Due, Engine, Slots, Sockets};
pub use mio_driver::Server;

/// Request lines one connection gets handled per loop turn before others get their turn: a
/// client pipelining cheap requests while the kernel keeps taking the answers must not hold
/// the loop for a million requests (others would wait seconds).
const LINE_BUDGET: usize = 4096;

/// How a service listens and what it tolerates from clients.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub host: String,
    /// 0 picks a free port.
    pub port: u16,
    pub max_connections: usize,
    pub max_line: usize,
    pub idle_timeout: Duration,
    /// Unwritten output per connection above which its requests are no longer read.
    pub output_limit: usize,
    /// Awaited answers per connection at which its requests are no longer read.
    pub max_pipeline: usize,
    pub drain_timeout: Duration,
    /// Print `listening on HOST:PORT` on stdout once ready.
    pub announce: bool,
    /// Drain and exit on SIGTERM/SIGINT (binaries); in-process tests use [`ShutdownHandle`].
    pub handle_signals: bool,
    /// File descriptors kept free for the service's own upstream connections: clients past
    /// what the descriptor limit leaves are answered OVERLOADED (SPEC 3.8).
    pub fd_reserve: usize,
    /// The admin HTTP listener (SPEC 6): its port (0 = a free one) when wanted, and its host
    /// (default: `host`).
    pub admin_port: Option<u16>,
    pub admin_host: Option<String>,
    /// `--access-log` (SPEC 6), off when `None`.
    pub access_log: Option<crate::access_log::Target>,
    /// SO_REUSEPORT on the listener, so several processes (one loop each) can share the port
    /// and the kernel spreads new connections over them (SPEC 7).
    pub reuse_port: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: 0,
            max_connections: 10_000,
            max_line: 64 * 1024,
            idle_timeout: Duration::from_secs(60),
            output_limit: 256 * 1024,
            max_pipeline: 1024,
            drain_timeout: Duration::from_secs(5),
            announce: false,
            handle_signals: false,
            fd_reserve: 64,
            admin_port: None,
            admin_host: None,
            access_log: None,
            reuse_port: false,
        }
    }
}

/// A client connection, as services see it: valid until the connection closes, after which
/// answers addressed to it are dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientId {
    index: usize,
    serial: u64,
}

impl ClientId {
    /// Its slot among the open connections, reused after it closes (so a table indexed by it
    /// keeps the whole `ClientId` to tell a new connection from a gone one).
    pub fn index(&self) -> usize {
        self.index
    }

    /// A number no other client connection of this service had or will have.
    pub fn serial(&self) -> u64 {
        self.serial
    }

    #[cfg(test)]
    pub(crate) fn for_test(index: usize, serial: u64) -> Self {
        ClientId { index, serial }
    }
}

/// A promise to answer one request later, from [`Ctx::defer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    client: ClientId,
    /// The request's slot, for requests without an id; `None` for requests with one.
    slot: Option<u64>,
    /// Its access log note, when the log is on.
    log: Option<NoteId>,
}

impl Ticket {
    pub fn client(&self) -> ClientId {
        self.client
    }

    /// Where its answer goes among the client's answers without an id (`None`: it has one).
    pub fn order(&self) -> Option<u64> {
        self.slot
    }
}

/// What a service implements to run on this loop.
pub trait Service {
    /// The service's own timer events.
    type Timer;

    /// Called once when the loop starts, to schedule the service's first timers.
    fn on_start(&mut self, _ctx: &mut Ctx<Self::Timer>) {}

    /// A complete, non-blank request line from `client` (without `\r\n`). The service answers
    /// every line exactly once, through [`Ctx::reply`] now or [`Ctx::defer`] and
    /// [`Ctx::complete`] later.
    fn on_line(&mut self, ctx: &mut Ctx<Self::Timer>, client: ClientId, line: &[u8]);

    /// One of the service's timers fired.
    fn on_timer(&mut self, ctx: &mut Ctx<Self::Timer>, timer: Self::Timer);

    /// A connection from [`Ctx::connect`] is established (what was sent to it meanwhile is
    /// being written).
    fn on_peer_connected(&mut self, _ctx: &mut Ctx<Self::Timer>, _peer: PeerId) {}

    /// A complete line from a peer (without `\r\n`). Long lines may be kept without copying
    /// through [`PeerLine::share`].
    fn on_peer_line(&mut self, _ctx: &mut Ctx<Self::Timer>, _peer: PeerId, _line: PeerLine<'_>) {}

    /// A peer connection ended other than by [`Ctx::close_peer`]: the connect failed, the peer
    /// closed it or reset it, or it sent a line that is too long. The `PeerId` is dead now.
    fn on_peer_closed(&mut self, _ctx: &mut Ctx<Self::Timer>, _peer: PeerId, _closed: PeerClosed) {}

    /// The end of a loop turn, after every event and timer of the turn was handled (what the
    /// turn queued for peers is written after it, one write per connection). Called again
    /// if it answered clients, until a pass changes nothing.
    fn on_turn_end(&mut self, _ctx: &mut Ctx<Self::Timer>) {}

    /// The drain has begun (SIGTERM or [`ShutdownHandle::shutdown`]).
    fn on_drain(&mut self, _ctx: &mut Ctx<Self::Timer>) {}

    /// SIGHUP arrived (binaries only): re-read configuration. The default ignores it.
    fn on_reload(&mut self, _ctx: &mut Ctx<Self::Timer>) {}

    /// The loop's waker ([`Ctx::waker`]) was woken: a thread of the service has news.
    fn on_wake(&mut self, _ctx: &mut Ctx<Self::Timer>) {}

    /// `client`, for which the service called [`Ctx::notify_room`], has room for output again
    /// (or has gone: then [`Ctx::complete`] drops what is given).
    fn on_room(&mut self, _ctx: &mut Ctx<Self::Timer>, _client: ClientId) {}

    /// The service's METRICS `data`, for the admin listener's `/metrics` (SPEC 6).
    fn metrics_json(&self, _ctx: &Ctx<Self::Timer>) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// The GET latency histogram behind METRICS `latency_us`, exported as buckets.
    fn latency_histogram(&self) -> Option<&LatencyHistogram> {
        None
    }

    /// An admin HTTP request other than `/metrics` and `/healthz`; `None` answers 404.
    fn admin_request(
        &mut self,
        _ctx: &mut Ctx<Self::Timer>,
        _request: &crate::admin::Request<'_>,
    ) -> Option<crate::admin::Response> {
        None
    }

    /// About once a second while the admin listener is on (the balancer samples its history).
    fn on_admin_tick(&mut self, _ctx: &mut Ctx<Self::Timer>) {}

    /// Work the service holds for requests not yet answered (fetches, waiters, attempts,
    /// parked requests...), by name: all zero once the cluster is idle, or something leaked.
    /// The simulator checks it at the end of every run.
    fn outstanding(&self) -> Vec<(String, usize)> {
        Vec::new()
    }
}

/// Everything a service may do to the world: answer clients, talk to peers, schedule timers,
/// read the clock and the shared counters. It holds the state of every connection; the
/// sockets are the driver's.
pub struct Ctx<T> {
    now: Instant,
    /// The mio driver's waker, for a service's helper thread (none in the simulator).
    waker: Option<Arc<Waker>>,
    clients: Slab<Client>,
    peers: Slab<Peer>,
    next_peer_serial: u64,
    /// Peers with output queued since their last write.
    peers_dirty: Vec<PeerId>,
    /// Connects and closes for the driver to carry out, in order.
    peer_commands: VecDeque<PeerCommand>,
    timers: TimerQueue<LoopTimer<T>>,
    config: ServerConfig,
    local_addr: SocketAddr,
    started: StartTime,
    total_requests: u64,
    next_serial: u64,
    /// Clients whose output or pending count changed outside their own read handling; the
    /// loop writes them out at the end of the turn.
    dirty: Vec<usize>,
    /// Spare buffers for answers that wait in their slot, so steady state does not allocate.
    spare: Vec<Vec<u8>>,
    draining: bool,
    /// How many clients the descriptor limit leaves room for.
    descriptors: DescriptorBudget,
    /// Loop turns so far: a connection's line budget is per turn, however often it is driven.
    turn: u64,
    /// `--access-log`, when on.
    access_log: Option<AccessLog>,
}

enum LoopTimer<T> {
    Idle(ClientId),
    AcceptRetry,
    DrainDeadline,
    Service(T),
    /// Once a second with an admin listener or an access log: flush, sweep, sample.
    Tick,
}

struct Client {
    peer: SocketAddr,
    serial: u64,
    /// Bytes read but not yet used: at most a partial line, unless reading is paused.
    carry: Vec<u8>,
    out: Output,
    /// Answers for requests without an id, oldest first; `head_slot` numbers the first.
    slots: VecDeque<Slot>,
    head_slot: u64,
    /// Deferred answers to requests with an id.
    unordered: usize,
    /// The driver watches its socket for room to write.
    writable_registered: bool,
    read_closed: bool,
    /// The last read was shorter than the buffer: the socket is empty until the next
    /// readiness event (Linux's edge-triggered epoll reports every arrival, so skipping the
    /// read that would only say EAGAIN loses nothing; tokio does the same).
    drained: bool,
    /// The peer's close, a socket error or urgent data (which stops a read at its mark) was
    /// reported: keep reading until EOF or `WouldBlock`, short reads or not.
    read_until_empty: bool,
    /// Read nothing more; close once everything owed is written.
    closing: bool,
    dirty: bool,
    /// The service waits for room in this client's output ([`Ctx::notify_room`]).
    wants_room: bool,
    /// Request lines handled in loop turn `lines_turn` (see [`LINE_BUDGET`]).
    lines: usize,
    lines_turn: u64,
    last_active: Instant,
    idle_timer: Option<TimerKey>,
}

enum Slot {
    Waiting,
    Ready(Parked),
}

/// An answer as a service hands it over: encoded by a closure, or a head, shared body and
/// tail (see [`Ctx::reply_shared`]).
enum Answer<'a, F> {
    Encoded(F),
    Shared(&'a [u8], &'a SharedBytes, &'a [u8]),
}

impl<F: FnOnce(&mut Vec<u8>)> Answer<'_, F> {
    fn queue(self, out: &mut Output) {
        match self {
            Answer::Encoded(encode) => out.append_with(encode),
            Answer::Shared(head, body, tail) => out.append_shared(head, body, tail),
        }
    }

    fn park(self, out: &mut Output, buf: Vec<u8>) -> Parked {
        match self {
            Answer::Encoded(encode) => out.park_with(buf, encode),
            Answer::Shared(head, body, tail) => out.park_shared(buf, head, body, tail),
        }
    }
}

/// The closure type of a shared answer, which never encodes anything.
type NoEncode = fn(&mut Vec<u8>);

impl Client {
    fn awaited(&self) -> usize {
        self.slots.len() + self.unordered
    }

    fn owes_nothing(&self) -> bool {
        self.awaited() == 0 && self.out.is_empty()
    }

    /// Whether this client has had its [`LINE_BUDGET`] of request lines in loop turn `turn`.
    fn budget_spent(&self, turn: u64) -> bool {
        self.lines_turn == turn && self.lines >= LINE_BUDGET
    }

    fn count_line(&mut self, turn: u64) {
        if self.lines_turn != turn {
            self.lines_turn = turn;
            self.lines = 0;
        }
        self.lines += 1;
    }

    fn over_limits(&self, config: &ServerConfig) -> bool {
        self.out.counted() > config.output_limit || self.awaited() >= config.max_pipeline
    }
}

impl<T> Ctx<T> {
    pub fn now(&self) -> Instant {
        self.now
    }

    /// The loop's one waker (mio allows one per poll), for a service's helper thread to wake
    /// the loop; each wake calls [`Service::on_wake`]. `None` off the real network.
    pub fn waker(&self) -> Option<Arc<Waker>> {
        self.waker.clone()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Descriptors kept for the service's own upstream connections (SPEC 3.8): the
    /// configured reserve, or less under a small limit.
    pub fn upstream_reserve(&self) -> usize {
        self.descriptors.reserve()
    }

    pub fn is_connected(&self, client: ClientId) -> bool {
        self.live_index(client).is_some()
    }

    pub fn schedule(&mut self, at: Instant, timer: T) -> TimerKey {
        self.timers.schedule(at, LoopTimer::Service(timer))
    }

    pub fn cancel(&mut self, key: TimerKey) -> Option<T> {
        match self.timers.cancel(key)? {
            LoopTimer::Service(timer) => Some(timer),
            // A service only holds keys of its own timers; put anything else back untouched.
            other => {
                self.timers.schedule(key.deadline(), other);
                None
            }
        }
    }

    /// Answers a request now. `ordered` is true for requests without an id, which must not
    /// overtake earlier requests of the same connection.
    pub fn reply(&mut self, client: ClientId, ordered: bool, encode: impl FnOnce(&mut Vec<u8>)) {
        if self.access_log.is_some() {
            return self.reply_logged(client, ordered, encode);
        }
        self.reply_answer(client, ordered, Answer::Encoded(encode));
    }

    /// Answers a request now with `head`, the shared `body`, then `tail` (the answer line is
    /// their concatenation, `tail` ending in `\n`). A body of [`SHARE_MIN`] bytes or more is
    /// queued by reference, not copied, and counts once toward this connection's output
    /// bound however many of its answers share it.
    pub fn reply_shared(&mut self, client: ClientId, ordered: bool, head: &[u8], body: &SharedBytes, tail: &[u8]) {
        if body.len() < SHARE_MIN {
            return self.reply(client, ordered, |out| concat_parts(out, head, body, tail));
        }
        if self.access_log.is_some() {
            let peer = self.live_index(client).map(|index| self.clients[index].peer);
            self.log_shared(None, peer, head, tail);
        }
        self.reply_answer::<NoEncode>(client, ordered, Answer::Shared(head, body, tail));
    }

    /// Keeps a promise with an answer made of `head`, the shared `body`, then `tail` (see
    /// [`Ctx::reply_shared`]). Returns false when the client has gone.
    pub fn complete_shared(&mut self, ticket: Ticket, head: &[u8], body: &SharedBytes, tail: &[u8]) -> bool {
        if body.len() < SHARE_MIN {
            return self.complete(ticket, |out| concat_parts(out, head, body, tail));
        }
        if self.access_log.is_some() {
            let peer = self.live_index(ticket.client).map(|index| self.clients[index].peer);
            self.log_shared(Some(ticket.log), peer, head, tail);
        }
        self.complete_answer::<NoEncode>(ticket, Answer::Shared(head, body, tail))
    }

    /// Whether `client`'s output is within its bound, so that a big answer made now would not
    /// overshoot it by more than that answer. True for a client that has gone.
    pub fn has_room(&self, client: ClientId) -> bool {
        self.live_index(client).is_none_or(|index| self.clients[index].out.counted() <= self.config.output_limit)
    }

    /// Whether `client` may have one more request forwarded: it has room, or nothing it can
    /// be written is queued (what is counted waits behind answers not made yet, so waiting
    /// for room would wait forever).
    pub fn may_forward(&self, client: ClientId) -> bool {
        self.live_index(client).is_none_or(|index| {
            let out = &self.clients[index].out;
            out.counted() <= self.config.output_limit || out.is_empty()
        })
    }

    /// Whether the answer for `ticket` may be made now without taking its client past its
    /// bound by more than this answer: the client has room, or the answer would be written
    /// at once (it has an id or is the next one due) and nothing else is queued.
    pub fn may_take(&self, ticket: &Ticket) -> bool {
        self.live_index(ticket.client).is_none_or(|index| {
            let c = &self.clients[index];
            c.out.counted() <= self.config.output_limit
                || (c.out.is_empty() && ticket.slot.is_none_or(|slot| slot == c.head_slot))
        })
    }

    /// Asks for [`Service::on_room`] once `client` has room for output again (or has gone).
    pub fn notify_room(&mut self, client: ClientId) {
        if let Some(index) = self.live_index(client) {
            self.clients[index].wants_room = true;
            self.mark_dirty(index);
        }
    }

    fn reply_answer<F: FnOnce(&mut Vec<u8>)>(&mut self, client: ClientId, ordered: bool, answer: Answer<'_, F>) {
        let Some(index) = self.live_index(client) else { return };
        self.total_requests += 1;
        let c = &mut self.clients[index];
        if ordered && !c.slots.is_empty() {
            let buf = self.spare.pop().unwrap_or_default();
            let parked = answer.park(&mut c.out, buf);
            c.slots.push_back(Slot::Ready(parked));
        } else {
            answer.queue(&mut c.out);
        }
        self.mark_dirty(index);
    }

    /// The METRICS fields every service shares. The METRICS request being answered counts in
    /// `total_requests` too.
    pub fn common_metrics(&self, role: &'static str) -> CommonMetrics {
        CommonMetrics {
            role,
            start_time: self.started.rfc3339(),
            uptime_s: self.started.uptime_s(self.now),
            total_requests: self.total_requests + 1,
            connections: self.clients.len(),
            access_log_dropped: self.access_log.as_ref().map_or(0, AccessLog::dropped),
        }
    }

    /// Answers `OK` now with `data` serialized as the answer's `data` (METRICS, PURGE, ...).
    pub fn reply_value<V: serde::Serialize>(&mut self, client: ClientId, id: Option<Id<'_>>, data: &V) {
        self.reply(client, id.is_none(), |out| encode_ok_value(out, id, data));
    }

    /// Answers HEALTH (SPEC 2.5): cheap, no I/O, never delayed.
    pub fn reply_health(&mut self, client: ClientId, id: Option<Id<'_>>, role: &'static str) {
        let data = HealthData { role, uptime_s: self.started.uptime_s(self.now) };
        self.reply_value(client, id, &data);
    }

    /// Answers a request line that did not parse.
    pub fn reply_error(&mut self, client: ClientId, error: &RequestError<'_>) {
        self.reply(client, error.id.is_none(), |out| error.encode(out));
    }

    /// Promises an answer to a request that will be given later through [`Ctx::complete`].
    pub fn defer(&mut self, client: ClientId, ordered: bool) -> Ticket {
        let slot = self.live_index(client).and_then(|index| {
            let c = &mut self.clients[index];
            if ordered {
                c.slots.push_back(Slot::Waiting);
                Some(c.head_slot + c.slots.len() as u64 - 1)
            } else {
                c.unordered += 1;
                None
            }
        });
        let log = self.access_log.as_mut().and_then(AccessLog::defer);
        Ticket { client, slot, log }
    }

    /// Keeps a promise. Returns false (and encodes nothing) when the client has gone.
    pub fn complete(&mut self, ticket: Ticket, encode: impl FnOnce(&mut Vec<u8>)) -> bool {
        if self.access_log.is_some() {
            return self.complete_logged(ticket, encode);
        }
        self.complete_answer(ticket, Answer::Encoded(encode))
    }

    /// [`Ctx::reply`] with the access log on: the answer is encoded aside, logged, then given
    /// as usual. (Kept apart so that the path without a log is untouched.)
    fn reply_logged(&mut self, client: ClientId, ordered: bool, encode: impl FnOnce(&mut Vec<u8>)) {
        let Some(peer) = self.live_index(client).map(|index| self.clients[index].peer) else { return };
        let mut buf = self.access_log.as_mut().map(AccessLog::take_scratch).unwrap_or_default();
        encode(&mut buf);
        if let Some(log) = self.access_log.as_mut() {
            log.answered_now(peer, &buf);
        }
        self.reply_answer(client, ordered, Answer::Encoded(|out: &mut Vec<u8>| out.extend_from_slice(&buf)));
        if let Some(log) = self.access_log.as_mut() {
            log.put_scratch(buf);
        }
    }

    /// [`Ctx::complete`] with the access log on, likewise.
    fn complete_logged(&mut self, ticket: Ticket, encode: impl FnOnce(&mut Vec<u8>)) -> bool {
        let peer = self.live_index(ticket.client).map(|index| self.clients[index].peer);
        let mut buf = self.access_log.as_mut().map(AccessLog::take_scratch).unwrap_or_default();
        if peer.is_some() {
            encode(&mut buf);
        }
        if let Some(log) = self.access_log.as_mut() {
            log.answered_later(ticket.log, peer, &buf);
        }
        let done = self.complete_answer(ticket, Answer::Encoded(|out: &mut Vec<u8>| out.extend_from_slice(&buf)));
        if let Some(log) = self.access_log.as_mut() {
            log.put_scratch(buf);
        }
        done
    }

    /// Logs an answer made of `head`, a shared body and `tail` without copying the body: the
    /// log reads status, `cache_hit`, `node` and `id`, never `data`, so the body is logged as
    /// `null`. `later` holds the ticket's note for a deferred answer.
    fn log_shared(&mut self, later: Option<Option<NoteId>>, peer: Option<SocketAddr>, head: &[u8], tail: &[u8]) {
        let Some(log) = self.access_log.as_mut() else { return };
        let mut buf = log.take_scratch();
        if peer.is_some() {
            buf.extend_from_slice(head);
            buf.extend_from_slice(b"null");
            buf.extend_from_slice(tail);
        }
        match (later, peer) {
            (Some(note), _) => log.answered_later(note, peer, &buf),
            (None, Some(peer)) => log.answered_now(peer, &buf),
            (None, None) => {}
        }
        log.put_scratch(buf);
    }

    fn complete_answer<F: FnOnce(&mut Vec<u8>)>(&mut self, ticket: Ticket, answer: Answer<'_, F>) -> bool {
        let Some(index) = self.live_index(ticket.client) else { return false };
        self.total_requests += 1;
        let c = &mut self.clients[index];
        match ticket.slot {
            None => {
                c.unordered = c.unordered.saturating_sub(1);
                answer.queue(&mut c.out);
            }
            Some(slot) => {
                let Some(position) = slot.checked_sub(c.head_slot).map(|p| p as usize) else {
                    return false;
                };
                if position == 0 {
                    answer.queue(&mut c.out);
                    c.slots.pop_front();
                    c.head_slot += 1;
                    // Answers that were ready behind this one may go now.
                    while let Some(Slot::Ready(_)) = c.slots.front() {
                        if let Some(Slot::Ready(parked)) = c.slots.pop_front() {
                            let buf = c.out.unpark(parked);
                            recycle(&mut self.spare, buf);
                        }
                        c.head_slot += 1;
                    }
                } else if let Some(entry) = c.slots.get_mut(position) {
                    let buf = self.spare.pop().unwrap_or_default();
                    *entry = Slot::Ready(answer.park(&mut c.out, buf));
                }
            }
        }
        self.mark_dirty(index);
        true
    }

    fn live_index(&self, client: ClientId) -> Option<usize> {
        match self.clients.get(client.index) {
            Some(c) if c.serial == client.serial => Some(client.index),
            _ => None,
        }
    }

    fn mark_dirty(&mut self, index: usize) {
        let c = &mut self.clients[index];
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(index);
        }
    }
}

/// Peers: connections the service makes to the next tier. The driver makes and owns the
/// sockets; what is sent is written at the end of the turn, one write per connection.
impl<T> Ctx<T> {
    /// Starts connecting to `addr`; lines longer than `max_line` from it end the connection
    /// ([`crate::peer::PeerEnd::LineTooLong`]). What is sent before it is established waits.
    /// A failure to connect arrives as [`Service::on_peer_closed`], never from here.
    pub fn connect(&mut self, addr: SocketAddr, max_line: usize) -> PeerId {
        let serial = self.next_peer_serial;
        self.next_peer_serial += 1;
        let index = self.peers.insert(Peer::new(serial, addr, max_line));
        let peer = PeerId { index, serial };
        self.peer_commands.push_back(PeerCommand::Connect(peer, addr));
        peer
    }

    /// The output buffer of `peer` to append whole lines to (`None` when it has gone).
    pub fn peer_output(&mut self, peer: PeerId) -> Option<&mut Vec<u8>> {
        let p = self.peers.get_mut(peer.index).filter(|p| p.serial == peer.serial)?;
        if !p.dirty {
            p.dirty = true;
            self.peers_dirty.push(peer);
        }
        Some(p.out.buf_mut())
    }

    /// Queues `bytes` for `peer`; false when it has gone.
    pub fn send_to_peer(&mut self, peer: PeerId, bytes: &[u8]) -> bool {
        self.peer_output(peer).map(|out| out.extend_from_slice(bytes)).is_some()
    }

    /// Closes `peer` (no [`Service::on_peer_closed`] follows). False when it had gone.
    pub fn close_peer(&mut self, peer: PeerId) -> bool {
        if self.live_peer(peer).is_none() {
            return false;
        }
        self.peers.remove(peer.index);
        self.peer_commands.push_back(PeerCommand::Drop(peer.index));
        true
    }

    pub fn is_peer_open(&self, peer: PeerId) -> bool {
        self.live_peer(peer).is_some()
    }

    pub fn is_peer_connected(&self, peer: PeerId) -> bool {
        self.live_peer(peer).is_some_and(|p| p.connected)
    }

    pub fn peer_addr(&self, peer: PeerId) -> Option<SocketAddr> {
        self.live_peer(peer).map(|p| p.addr)
    }

    /// Bytes received from `peer` so far: comparing it before and after a request tells
    /// whether the peer said anything to that request.
    pub fn peer_received(&self, peer: PeerId) -> Option<u64> {
        self.live_peer(peer).map(|p| p.received)
    }

    /// Bytes received from `peer` after the line being handed over now (or, between events,
    /// not yet a complete line).
    pub fn peer_unread(&self, peer: PeerId) -> usize {
        self.live_peer(peer).map_or(0, |p| p.unread)
    }

    fn live_peer(&self, peer: PeerId) -> Option<&Peer> {
        self.peers.get(peer.index).filter(|p| p.serial == peer.serial)
    }

    fn live_peer_mut(&mut self, peer: PeerId) -> Option<&mut Peer> {
        self.peers.get_mut(peer.index).filter(|p| p.serial == peer.serial)
    }
}

fn concat_parts(out: &mut Vec<u8>, head: &[u8], body: &[u8], tail: &[u8]) {
    out.extend_from_slice(head);
    out.extend_from_slice(body);
    out.extend_from_slice(tail);
}

/// Keeps a few answer buffers for reuse, dropping big ones so that memory is returned.
fn recycle(spare: &mut Vec<Vec<u8>>, mut buf: Vec<u8>) {
    if spare.len() < 256 && buf.capacity() <= 16 * 1024 {
        buf.clear();
        spare.push(buf);
    }
}
