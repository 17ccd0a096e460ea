//! The service scaffolding every tier runs on: one single-threaded mio loop that owns the
//! listener, the client connections (a slab addressed by `Token`), a deadline queue, signals
//! and the graceful drain. A service plugs in through [`Service`]: it is handed complete
//! request lines and answers them now or later through [`Ctx`]; everything about sockets,
//! ordering, backpressure and limits is handled here once.
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
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener as StdListener, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use mio::event::Event;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use slab::Slab;

use crate::access_log::{AccessLog, NoteId};
use crate::admin::Admin;
use crate::fdlimit::DescriptorBudget;
use crate::framing::{next_frame, read_once, Frame, SharedBytes};
use crate::metrics::{CommonMetrics, HealthData, LatencyHistogram, StartTime};
use crate::outbuf::{Output, Parked, SHARE_MIN};
use crate::protocol::{encode_ok_value, Id, Reply, RequestError, Status};
use crate::timers::{TimerKey, TimerQueue};

const LISTENER: Token = Token(0);
const SIGNALS: Token = Token(1);
const WAKER: Token = Token(2);
/// Client connections use tokens `CLIENT_BASE + slab index`.
const CLIENT_BASE: usize = 16;
/// Services number their own upstream sockets from here up (see [`peer_token`]).
pub const PEER_BASE: usize = 1 << 40;

/// The token for a service's upstream socket number `index`.
pub fn peer_token(index: usize) -> Token {
    Token(PEER_BASE + index)
}

/// The index a service gave [`peer_token`], if `token` is a peer token.
pub fn peer_index(token: Token) -> Option<usize> {
    token.0.checked_sub(PEER_BASE)
}

/// Bytes read from a socket per `read` call.
const READ_CHUNK: usize = 64 * 1024;
/// Reads one connection gets per loop turn before others get their turn.
const READ_BUDGET: usize = 16;
/// Request lines one connection gets handled per loop turn before others get their turn: a
/// client pipelining cheap requests while the kernel keeps taking the answers must not hold
/// the loop for a million requests (others would wait seconds).
const LINE_BUDGET: usize = 4096;
/// How long to wait before accepting again after running out of file descriptors.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// The period of [`LoopTimer::Tick`].
const TICK: Duration = Duration::from_secs(1);

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

    /// Readiness on one of the service's own sockets (registered with a [`peer_token`]).
    fn on_peer_event(&mut self, _ctx: &mut Ctx<Self::Timer>, _token: Token, _event: &Event) {}

    /// The end of a loop turn, after every event and timer of the turn was handled: the
    /// place to write out what the turn queued on the service's own sockets, one write per
    /// socket. Called again if it answered clients, until a pass changes nothing.
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
}

/// Everything a service may do to the world: answer clients, schedule timers, register its
/// own sockets, read the clock and the shared counters.
pub struct Ctx<T> {
    now: Instant,
    registry: Registry,
    waker: Arc<Waker>,
    clients: Slab<Client>,
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
    stream: TcpStream,
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
    writable_registered: bool,
    read_closed: bool,
    /// The last read was shorter than the buffer: the socket is empty until the next
    /// readiness event (Linux's edge-triggered epoll reports every arrival, so skipping the
    /// read that would only say EAGAIN loses nothing; tokio does the same).
    drained: bool,
    /// The peer's close was reported: keep reading until EOF, short reads or not.
    hangup: bool,
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

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The loop's one waker (mio allows one per poll), for a service's helper thread to wake
    /// the loop; each wake calls [`Service::on_wake`].
    pub fn waker(&self) -> Arc<Waker> {
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

/// Asks a running server to drain and stop, from any thread.
#[derive(Clone)]
pub struct ShutdownHandle {
    requested: Arc<AtomicBool>,
    waker: Arc<Waker>,
}

impl std::fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownHandle").field("requested", &self.requested).finish()
    }
}

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.requested.store(true, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            warn!("could not wake the event loop for shutdown: {e}");
        }
    }
}

/// Listen backlog: deep enough that a burst of connects is not dropped (a dropped SYN costs
/// the client a one-second retransmit) while the loop is busy with other work.
const LISTEN_BACKLOG: i32 = 1024;

/// Binds a listener (port 0 picks a free one) the way every service does: SO_REUSEADDR, so a
/// restarted service gets its port back at once, and a backlog of [`LISTEN_BACKLOG`].
pub fn bind_listener(host: &str, port: u16) -> io::Result<TcpListener> {
    bind_listener_with(host, port, false)
}

/// [`bind_listener`], and with `reuse_port` also SO_REUSEPORT: other processes (of the same
/// user) that set it too may bind the same port, and the kernel spreads connections over them.
pub fn bind_listener_with(host: &str, port: u16, reuse_port: bool) -> io::Result<TcpListener> {
    let addrs: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    let mut last_err = io::Error::new(io::ErrorKind::AddrNotAvailable, format!("{host} resolves to no address"));
    for addr in addrs {
        match bind_one(addr, reuse_port) {
            Ok(listener) => return Ok(listener),
            Err(e) => last_err = io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")),
        }
    }
    Err(last_err)
}

fn bind_one(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// A service bound to its listener and ready to run.
pub struct Server<S: Service> {
    poll: Poll,
    events: Events,
    listener: Option<TcpListener>,
    signals: Option<signal_hook_mio::v1_0::Signals>,
    shutdown: ShutdownHandle,
    scratch: Box<[u8]>,
    /// Clients that used up their read budget and must be read again next turn.
    again: Vec<ClientId>,
    /// Swapped with `again` and `Ctx::dirty` while they are worked through, so that neither
    /// list gives up its allocation each turn.
    again_batch: Vec<ClientId>,
    dirty_batch: Vec<usize>,
    /// The admin HTTP listener (SPEC 6), when `--admin-port` is given.
    admin: Option<Admin>,
    ctx: Ctx<S::Timer>,
    service: S,
}

impl<S: Service> Server<S> {
    /// Binds `config.host:config.port` and builds the service with the bound address (a proxy
    /// needs its own port to fill in `node`).
    pub fn bind(config: ServerConfig, make: impl FnOnce(SocketAddr) -> io::Result<S>) -> io::Result<Self> {
        let listener = bind_listener_with(&config.host, config.port, config.reuse_port)?;
        let local_addr = listener.local_addr()?;
        let service = make(local_addr)?;
        Server::with_listener(config, listener, service)
    }

    /// Runs on an already bound listener (made non-blocking here).
    pub fn with_std_listener(config: ServerConfig, listener: StdListener, service: S) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        Server::with_listener(config, TcpListener::from_std(listener), service)
    }

    /// Runs on an already bound mio listener.
    pub fn with_listener(config: ServerConfig, mut listener: TcpListener, service: S) -> io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let config_fd_reserve = config.fd_reserve;
        let poll = Poll::new()?;
        let registry = poll.registry().try_clone()?;
        registry.register(&mut listener, LISTENER, Interest::READABLE)?;
        let signals = if config.handle_signals {
            let mut signals =
                signal_hook_mio::v1_0::Signals::new([libc::SIGTERM, libc::SIGINT, libc::SIGUSR1, libc::SIGHUP])?;
            registry.register(&mut signals, SIGNALS, Interest::READABLE)?;
            Some(signals)
        } else {
            None
        };
        let waker = Arc::new(Waker::new(&registry, WAKER)?);
        let admin = match config.admin_port {
            Some(port) => {
                let host = config.admin_host.as_deref().unwrap_or(&config.host);
                Some(Admin::bind(host, port, &registry, config.idle_timeout)?)
            }
            None => None,
        };
        let access_log = config.access_log.clone().map(AccessLog::open).transpose()?;
        let shutdown = ShutdownHandle { requested: Arc::new(AtomicBool::new(false)), waker: waker.clone() };
        Ok(Server {
            poll,
            events: Events::with_capacity(1024),
            listener: Some(listener),
            signals,
            shutdown,
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
            again: Vec::new(),
            again_batch: Vec::new(),
            dirty_batch: Vec::new(),
            admin,
            ctx: Ctx {
                now: Instant::now(),
                registry,
                waker,
                clients: Slab::new(),
                timers: TimerQueue::new(),
                config,
                local_addr,
                started: StartTime::now(),
                total_requests: 0,
                next_serial: 0,
                dirty: Vec::new(),
                spare: Vec::new(),
                draining: false,
                descriptors: DescriptorBudget::measure(config_fd_reserve),
                turn: 0,
                access_log,
            },
            service,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.ctx.local_addr
    }

    /// Where the admin listener listens, when there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(Admin::local_addr)
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Runs the loop until a drain completes. Returns an error only if polling itself fails.
    pub fn run(mut self) -> io::Result<()> {
        if self.ctx.config.announce {
            let mut stdout = io::stdout().lock();
            writeln!(stdout, "listening on {}", self.ctx.local_addr)?;
            if let Some(addr) = self.admin_addr() {
                writeln!(stdout, "admin listening on {addr}")?;
            }
            stdout.flush()?;
        }
        info!("listening on {}", self.ctx.local_addr);
        self.ctx.now = Instant::now();
        if self.admin.is_some() || self.ctx.access_log.is_some() {
            self.ctx.timers.schedule(self.ctx.now + TICK, LoopTimer::Tick);
        }
        self.service.on_start(&mut self.ctx);
        loop {
            self.ctx.now = Instant::now();
            self.ctx.turn = self.ctx.turn.wrapping_add(1);
            let busy = !self.again.is_empty() || self.admin.as_ref().is_some_and(Admin::has_again);
            let timeout = if busy { Some(Duration::ZERO) } else { self.ctx.timers.timeout(self.ctx.now) };
            if let Err(e) = self.poll.poll(&mut self.events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                error!("poll failed: {e}");
                return Err(e);
            }
            self.ctx.now = Instant::now();
            self.handle_events();
            std::mem::swap(&mut self.again, &mut self.again_batch);
            let mut batch = std::mem::take(&mut self.again_batch);
            for client in batch.drain(..) {
                if let Some(index) = self.ctx.live_index(client) {
                    self.drive(index);
                }
            }
            self.again_batch = batch;
            if let Some(admin) = self.admin.as_mut() {
                admin.drive_again(&mut self.service, &mut self.ctx);
            }
            if self.fire_timers() {
                break;
            }
            loop {
                self.flush_dirty();
                self.service.on_turn_end(&mut self.ctx);
                if self.ctx.dirty.is_empty() {
                    break;
                }
            }
            if self.ctx.draining && self.ctx.clients.is_empty() {
                break;
            }
        }
        if let Some(log) = self.ctx.access_log.as_mut() {
            log.flush();
        }
        info!("stopped after answering {} requests", self.ctx.total_requests);
        Ok(())
    }

    fn handle_events(&mut self) {
        // Taken out for the turn so that handlers may borrow `self` mutably; swapping in an
        // empty `Events` does not allocate.
        let events = std::mem::replace(&mut self.events, Events::with_capacity(0));
        // Upstream answers first: they retire requests (a balancer's in-flight counts drop)
        // before the turn's new requests are routed on those counts.
        for event in events.iter().filter(|e| e.token().0 >= PEER_BASE) {
            self.service.on_peer_event(&mut self.ctx, event.token(), event);
        }
        for event in events.iter() {
            match event.token() {
                LISTENER => self.accept_all(),
                SIGNALS => self.on_signals(),
                WAKER if self.shutdown.requested.load(Ordering::SeqCst) => self.begin_drain("shutdown requested"),
                WAKER => self.service.on_wake(&mut self.ctx),
                Token(t) if t >= PEER_BASE => {}
                crate::admin::LISTENER => {
                    if let Some(admin) = self.admin.as_mut() {
                        admin.accept_all(&self.ctx.registry, self.ctx.now);
                    }
                }
                // After the line protocol's events, below.
                token if crate::admin::conn_index(token).is_some() => {}
                Token(t) if t >= CLIENT_BASE && self.ctx.clients.contains(t - CLIENT_BASE) => {
                    let c = &mut self.ctx.clients[t - CLIENT_BASE];
                    c.drained = false;
                    c.hangup |= event.is_read_closed() || event.is_error();
                    self.drive(t - CLIENT_BASE);
                }
                _ => {}
            }
        }
        // Admin connections last: a request on the line protocol that arrived in the same
        // turn as a scrape is not kept waiting behind it.
        if let Some(admin) = self.admin.as_mut() {
            for index in events.iter().filter_map(|e| crate::admin::conn_index(e.token())) {
                admin.drive(index, &mut self.service, &mut self.ctx);
            }
        }
        self.events = events;
    }

    fn on_signals(&mut self) {
        let mut got = false;
        let (mut reopen, mut reload) = (false, false);
        if let Some(signals) = self.signals.as_mut() {
            // Drain every pending signal so the edge-triggered source re-arms.
            for signal in signals.pending() {
                match signal {
                    libc::SIGUSR1 => reopen = true,
                    libc::SIGHUP => reload = true,
                    _ => got = true,
                }
            }
        }
        if reload {
            info!("SIGHUP: reloading");
            self.service.on_reload(&mut self.ctx);
        }
        if let (true, Some(log)) = (reopen, self.ctx.access_log.as_mut()) {
            info!("SIGUSR1: reopening the access log");
            log.reopen();
        }
        if got {
            self.begin_drain("signal received");
        }
    }

    fn begin_drain(&mut self, why: &str) {
        if self.ctx.draining {
            return;
        }
        info!("{why}: no longer accepting; answering what is in flight");
        self.ctx.draining = true;
        if let Some(mut listener) = self.listener.take() {
            let _ = self.ctx.registry.deregister(&mut listener);
        }
        let deadline = self.ctx.now + self.ctx.config.drain_timeout;
        self.ctx.timers.schedule(deadline, LoopTimer::DrainDeadline);
        self.service.on_drain(&mut self.ctx);
        let indexes: Vec<usize> = self.ctx.clients.iter().map(|(i, _)| i).collect();
        for index in indexes {
            self.ctx.clients[index].closing = true;
            self.ctx.mark_dirty(index);
        }
    }

    fn accept_all(&mut self) {
        loop {
            let Some(listener) = self.listener.as_ref() else { return };
            match listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted) => continue,
                Err(e) => {
                    // Out of descriptors or memory: the pending connection stays in the backlog.
                    // Retry after a pause instead of spinning on an always-ready listener, and
                    // say so at most once a second.
                    if self.ctx.descriptors.may_log(self.ctx.now) {
                        warn!("accept failed: {e}; retrying every {} ms", ACCEPT_RETRY.as_millis());
                    }
                    self.ctx.timers.schedule(self.ctx.now + ACCEPT_RETRY, LoopTimer::AcceptRetry);
                    return;
                }
            }
        }
    }

    fn admit(&mut self, mut stream: TcpStream, peer: SocketAddr) {
        let short_of_descriptors = self.ctx.clients.len() >= self.ctx.descriptors.client_cap();
        if short_of_descriptors {
            self.ctx.descriptors.warn_short(self.ctx.now, self.ctx.clients.len());
        }
        if short_of_descriptors || self.ctx.clients.len() >= self.ctx.config.max_connections {
            let mut line = Vec::with_capacity(64);
            let why = if short_of_descriptors {
                "too many connections for the descriptor limit"
            } else {
                "too many connections"
            };
            Reply::error(Status::Overloaded, why).encode(&mut line);
            // A fresh socket's send buffer is empty, so this either goes out whole or the
            // client is gone; either way the connection is closed right after.
            let _ = stream.write(&line);
            debug!("refused {peer}: at max connections");
            return;
        }
        let _ = stream.set_nodelay(true);
        let entry = self.ctx.clients.vacant_entry();
        let index = entry.key();
        if let Err(e) = self.ctx.registry.register(&mut stream, Token(CLIENT_BASE + index), Interest::READABLE) {
            warn!("cannot register connection from {peer}: {e}");
            return;
        }
        let serial = self.ctx.next_serial;
        self.ctx.next_serial += 1;
        let id = ClientId { index, serial };
        let idle_timer =
            Some(self.ctx.timers.schedule(self.ctx.now + self.ctx.config.idle_timeout, LoopTimer::Idle(id)));
        entry.insert(Client {
            stream,
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
            hangup: false,
            closing: self.ctx.draining,
            dirty: false,
            wants_room: false,
            lines: 0,
            lines_turn: 0,
            last_active: self.ctx.now,
            idle_timer,
        });
    }

    /// Fires due timers. Returns true when the drain deadline has passed.
    fn fire_timers(&mut self) -> bool {
        let now = Instant::now();
        self.ctx.now = now;
        while let Some(timer) = self.ctx.timers.pop_expired(now) {
            match timer {
                LoopTimer::Service(t) => self.service.on_timer(&mut self.ctx, t),
                LoopTimer::Idle(id) => self.check_idle(id),
                LoopTimer::AcceptRetry => self.accept_all(),
                LoopTimer::Tick => self.on_tick(),
                LoopTimer::DrainDeadline => {
                    warn!("drain deadline passed with {} connections still open", self.ctx.clients.len());
                    return true;
                }
            }
        }
        false
    }

    /// The one-second tick: the access log is written out, idle admin connections closed,
    /// and the service samples what it keeps for the admin views.
    fn on_tick(&mut self) {
        self.ctx.timers.schedule(self.ctx.now + TICK, LoopTimer::Tick);
        if let Some(log) = self.ctx.access_log.as_mut() {
            log.flush();
        }
        if let Some(admin) = self.admin.as_mut() {
            admin.sweep(&self.ctx.registry, self.ctx.now);
            // Connections left in the backlog by an accept that ran out of descriptors.
            admin.accept_all(&self.ctx.registry, self.ctx.now);
            self.service.on_admin_tick(&mut self.ctx);
        }
    }

    fn check_idle(&mut self, id: ClientId) {
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
            self.close(index);
        }
    }

    fn flush_dirty(&mut self) {
        while !self.ctx.dirty.is_empty() {
            std::mem::swap(&mut self.ctx.dirty, &mut self.dirty_batch);
            let mut batch = std::mem::take(&mut self.dirty_batch);
            for index in batch.drain(..) {
                if let Some(c) = self.ctx.clients.get_mut(index) {
                    c.dirty = false;
                    self.drive(index);
                }
            }
            self.dirty_batch = batch;
        }
    }

    /// Brings one client up to date: writes what is owed, then reads and dispatches requests
    /// until the socket is empty, the limits pause it, or its read budget is spent.
    fn drive(&mut self, index: usize) {
        let mut reads = 0;
        loop {
            let config = &self.ctx.config;
            let c = &mut self.ctx.clients[index];
            match c.out.flush_to(&mut c.stream) {
                Ok(0) => {}
                Ok(_) => c.last_active = self.ctx.now,
                Err(e) => {
                    debug!("closing connection {index}: write failed: {e}");
                    return self.close(index);
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
                    return self.close(index);
                }
                if c.closing {
                    return self.update_interest(index);
                }
            }
            if c.over_limits(config) {
                return self.update_interest(index);
            }
            if c.budget_spent(self.ctx.turn) {
                let serial = c.serial;
                self.again.push(ClientId { index, serial });
                return self.update_interest(index);
            }
            if !c.carry.is_empty() && memchr::memchr(b'\n', &c.carry).is_some() {
                let carry = std::mem::take(&mut c.carry);
                let used = self.dispatch(index, &carry);
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
                    let used = self.dispatch(index, &carry);
                    if let Some(c) = self.ctx.clients.get_mut(index) {
                        // Paused part way: keep the rest, without the newline added here.
                        carry.pop();
                        carry.drain(..used.min(carry.len()));
                        c.carry = carry;
                    }
                    continue;
                }
                return self.update_interest(index);
            }
            if c.drained {
                return self.update_interest(index);
            }
            if reads == READ_BUDGET {
                let serial = c.serial;
                self.again.push(ClientId { index, serial });
                return self.update_interest(index);
            }
            reads += 1;
            match read_once(&mut c.stream, &mut self.scratch) {
                Ok(0) => c.read_closed = true,
                Ok(n) => {
                    c.last_active = self.ctx.now;
                    c.drained = n < self.scratch.len() && !c.hangup;
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
                            self.reject_long_line(index);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return self.update_interest(index),
                Err(e) => {
                    debug!("closing connection {index}: read failed: {e}");
                    return self.close(index);
                }
            }
            if !self.ctx.clients.contains(index) {
                return;
            }
        }
    }

    fn dispatch(&mut self, index: usize, bytes: &[u8]) -> usize {
        dispatch(&mut self.service, &mut self.ctx, index, bytes)
    }

    fn reject_long_line(&mut self, index: usize) {
        reject_long_line(&mut self.ctx, index);
    }

    fn update_interest(&mut self, index: usize) {
        let c = &mut self.ctx.clients[index];
        let want_writable = !c.out.is_empty();
        if want_writable != c.writable_registered {
            let interest = if want_writable { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
            if let Err(e) = self.ctx.registry.reregister(&mut c.stream, Token(CLIENT_BASE + index), interest) {
                debug!("closing connection {index}: reregister failed: {e}");
                return self.close(index);
            }
            c.writable_registered = want_writable;
        }
    }

    fn close(&mut self, index: usize) {
        if !self.ctx.clients.contains(index) {
            return;
        }
        let mut c = self.ctx.clients.remove(index);
        let _ = self.ctx.registry.deregister(&mut c.stream);
        if let Some(key) = c.idle_timer.take() {
            self.ctx.timers.cancel(key);
        }
        for slot in c.slots.drain(..) {
            if let Slot::Ready(parked) = slot {
                recycle(&mut self.ctx.spare, c.out.discard(parked));
            }
        }
        if c.wants_room {
            // The service holds work for this client: let it drop it.
            self.service.on_room(&mut self.ctx, ClientId { index, serial: c.serial });
        }
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
