//! The balancer's request handling on the shared event loop: routing GETs to proxies,
//! relaying answers, retrying failures on another proxy, health probes, METRICS polling and
//! PURGE fan-out — all on the one loop, driven by its timers.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::time::Instant;

use common::admin::{Request as AdminRequest, Response as AdminResponse};
use common::framing::Frame;
use common::metrics::{ratio, CommonMetrics, LatencyHistogram, LatencySummary};
use common::protocol::{encode_ok_value, parse_request, write_text_request, Id, Op, Reply, Status};
use common::server::{peer_index, peer_token, ClientId, Ctx, Service, Ticket};
use common::timers::TimerKey;
use common::upstream::{Progress, Upstream};
use log::{info, warn};
use mio::event::Event;
use mio::Token;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use slab::Slab;

use crate::backend::Backend;
use crate::health::Transition;
use crate::relay::{close_object, parse_tagged, untagged_body, write_tagged};
use crate::strategy::{Candidate, Router};
use crate::BalancerConfig;

/// Longest answer line accepted from a proxy.
const MAX_ANSWER: usize = 16 * 1024 * 1024 + 4096;

pub enum Timer {
    /// Time to probe proxy N.
    Probe(usize),
    /// Time to poll proxy N's METRICS.
    PollMetrics(usize),
    /// The oldest attempt deadlines are due.
    AttemptDeadlines,
    /// Exchange N (a probe, poll or purge) has waited too long.
    Exchange(usize),
}

/// A client GET being routed.
struct Pending {
    ticket: Ticket,
    /// The client's id as raw JSON, empty when it had none (a JSON id is never empty).
    client_id: String,
    key: String,
    received: Instant,
    /// Proxies already tried (bit i = proxy i).
    tried: u128,
    attempts: u32,
    attempt: Option<Attempt>,
    last_error: &'static str,
    /// The key's hash in `Core::leaders`.
    key_hash: u64,
    /// GETs for the same key that arrived while this one was in flight: they get its answer.
    followers: Vec<Follower>,
}

/// A GET collapsed onto an identical one already in flight.
struct Follower {
    ticket: Ticket,
    client_id: String,
    received: Instant,
}

#[derive(Clone, Copy)]
struct Attempt {
    backend: usize,
    conn: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ConnKind {
    /// Many requests at once, tagged with balancer ids (a proxy that answered HEALTH with OK
    /// and a role).
    Mux,
    /// One text-form request at a time.
    Single,
}

struct UpConn {
    up: Upstream,
    backend: usize,
    kind: ConnKind,
    /// On a single-request connection, the attempt waiting for its answer. (A multiplexed
    /// connection's attempts are found through `Pending::attempt` when it closes.)
    waiting: Option<u64>,
    /// Has output queued this turn (listed in `dirty_conns`).
    dirty: bool,
}

enum ExchangeKind {
    Probe,
    Metrics,
    Purge(usize),
}

/// A one-shot request on its own connection: a HEALTH probe, a METRICS poll, a PURGE.
struct Exchange {
    up: Upstream,
    backend: usize,
    kind: ExchangeKind,
    timer: TimerKey,
}

struct PurgeFanOut {
    ticket: Ticket,
    client_id: Option<Box<str>>,
    waiting: usize,
    purged: usize,
    answered: usize,
}

#[derive(Default, Clone, Copy)]
struct Counters {
    routed: u64,
    collapsed: u64,
    errors: u64,
    retries: u64,
}

/// A hasher for maps keyed by numbers that are already well spread and not chosen by
/// clients — our own sequential attempt ids, and key hashes that used a random seed — where
/// SipHash would be a fifth of the balancer's work per request (measured with callgrind).
/// Fibonacci hashing: one multiplication.
#[derive(Default)]
struct SpreadU64(u64);

impl Hasher for SpreadU64 {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type U64Map<V> = HashMap<u64, V, BuildHasherDefault<SpreadU64>>;

/// Request state, apart from the connections so that an answer line borrowed from a
/// connection can be relayed through it.
struct Core {
    config: BalancerConfig,
    backends: Vec<Backend>,
    router: Router,
    pendings: Slab<Pending>,
    /// Attempt id → pending request.
    attempts: U64Map<usize>,
    next_attempt: u64,
    counters: Counters,
    latency_us: LatencyHistogram,
    /// Reused for every routing decision.
    candidates: Vec<Candidate>,
    /// (deadline, attempt id) in sending order. Every attempt gets the same try timeout, so
    /// deadlines arrive sorted: one loop timer for the front does the work of a timer per
    /// request, with nothing to insert or cancel. Answered attempts are skipped when reached.
    deadlines: VecDeque<(Instant, u64)>,
    deadline_timer_armed: bool,
    /// Spare strings for keys and ids, so that routing a GET allocates nothing.
    spare_strings: Vec<String>,
    /// Key hash → the pending GET in flight for that key, which later GETs for the same key
    /// join instead of going upstream themselves (request collapsing). Keyed by a hash with
    /// a random seed so that nothing is allocated; two keys with the same hash just do not
    /// collapse.
    leaders: U64Map<usize>,
    hasher: RandomState,
    /// Client GETs accepted and not yet answered (leaders and followers): `--max-pending`.
    waiting: usize,
}

pub struct Balancer {
    core: Core,
    conns: Slab<UpConn>,
    dirty_conns: Vec<usize>,
    exchanges: Slab<Exchange>,
    purges: Slab<PurgeFanOut>,
    /// The dashboard's samples (SPEC 6), taken on the admin listener's tick.
    history: crate::history::History,
}

/// Upstream connections and exchanges share the peer token space: even and odd.
fn conn_token(index: usize) -> Token {
    peer_token(index * 2)
}

fn exchange_token(index: usize) -> Token {
    peer_token(index * 2 + 1)
}

impl Pending {
    fn client_id(&self) -> Option<&str> {
        Some(self.client_id.as_str()).filter(|id| !id.is_empty())
    }
}

const MAX_SPARE_STRINGS: usize = 4096;

impl Core {
    /// A string holding `text`, reusing a spare allocation when there is one.
    fn pooled(&mut self, text: &str) -> String {
        let mut s = self.spare_strings.pop().unwrap_or_default();
        s.clear();
        s.push_str(text);
        s
    }

    fn recycle(&mut self, s: String) {
        if self.spare_strings.len() < MAX_SPARE_STRINGS && s.capacity() <= 512 {
            self.spare_strings.push(s);
        }
    }

    /// Takes the request out of the collapsing index and returns its strings to the pool.
    fn forget(&mut self, index: usize, p: Pending) {
        if self.leaders.get(&p.key_hash) == Some(&index) {
            self.leaders.remove(&p.key_hash);
        }
        self.waiting = self.waiting.saturating_sub(1 + p.followers.len());
        self.recycle(p.key);
        self.recycle(p.client_id);
        for follower in p.followers {
            self.recycle(follower.client_id);
        }
    }

    /// Answers a finished request's client and its followers, each with its own id.
    fn answer_all(&mut self, ctx: &mut Ctx<Timer>, p: &Pending, encode: &impl Fn(&mut Vec<u8>, Option<&str>)) {
        ctx.complete(p.ticket, |out| encode(out, p.client_id()));
        self.latency_us.record(p.received.elapsed());
        for f in &p.followers {
            let client_id = Some(f.client_id.as_str()).filter(|id| !id.is_empty());
            ctx.complete(f.ticket, |out| encode(out, client_id));
            self.latency_us.record(f.received.elapsed());
        }
    }

    /// Answers the client of attempt `id` with `encode` and forgets the request; returns the
    /// attempt, or `None` if nobody waits for `id` any more (a late answer after a timeout).
    fn succeed(
        &mut self,
        ctx: &mut Ctx<Timer>,
        id: u64,
        encode: impl Fn(&mut Vec<u8>, Option<&str>),
    ) -> Option<Attempt> {
        let index = self.attempts.remove(&id)?;
        let p = self.pendings.try_remove(index)?;
        let attempt = p.attempt;
        if let Some(attempt) = attempt {
            let b = &mut self.backends[attempt.backend];
            b.in_flight = b.in_flight.saturating_sub(1);
            if b.health.is_healthy() {
                // An answer clears passive failures; only probes bring a down proxy back.
                b.health.record_success();
            }
        }
        self.answer_all(ctx, &p, &encode);
        self.forget(index, p);
        // Answers come back roughly in sending order: drop the answered attempts at the front
        // of the deadline queue now, so that it holds about what is in flight.
        while let Some(&(_, front)) = self.deadlines.front() {
            if self.attempts.contains_key(&front) {
                break;
            }
            self.deadlines.pop_front();
        }
        attempt
    }

    fn give_up(&mut self, ctx: &mut Ctx<Timer>, index: usize) {
        let Some(p) = self.pendings.try_remove(index) else { return };
        self.counters.errors += 1 + p.followers.len() as u64;
        let message = format!("no proxy answered ({} attempts; last: {})", p.attempts, p.last_error);
        self.answer_all(ctx, &p, &|out: &mut Vec<u8>, client_id: Option<&str>| {
            Reply::error(Status::ProxyUnreachable, &message).id(client_id.and_then(Id::from_raw_json)).encode(out)
        });
        self.forget(index, p);
    }

    /// A real request to `backend` failed: passive health (a refusal takes it down at once).
    fn note_failure(&mut self, backend: usize, refused: bool) {
        let b = &mut self.backends[backend];
        b.failures += 1;
        let transition = if refused { b.health.force_down() } else { b.health.record_failure() };
        log_transition(b, transition, if refused { "connection refused" } else { "request failed" });
    }
}

impl Balancer {
    pub fn new(config: BalancerConfig) -> Self {
        let backends = config.proxies.iter().map(|(name, addr)| Backend::new(name, *addr, &config)).collect();
        Balancer {
            core: Core {
                router: Router::new(config.strategy),
                backends,
                config,
                pendings: Slab::new(),
                attempts: U64Map::default(),
                next_attempt: 1,
                counters: Counters::default(),
                latency_us: LatencyHistogram::new(),
                candidates: Vec::new(),
                deadlines: VecDeque::new(),
                deadline_timer_armed: false,
                spare_strings: Vec::new(),
                leaders: U64Map::default(),
                hasher: RandomState::new(),
                waiting: 0,
            },
            conns: Slab::new(),
            dirty_conns: Vec::new(),
            exchanges: Slab::new(),
            purges: Slab::new(),
            history: crate::history::History::new(),
        }
    }

    fn get(&mut self, ctx: &mut Ctx<Timer>, client: ClientId, key: &str, id: Option<Id<'_>>) {
        let core = &mut self.core;
        if core.waiting >= core.config.max_pending {
            core.counters.errors += 1;
            return ctx.reply(client, id.is_none(), |out| {
                Reply::error(Status::Overloaded, "too many requests in flight").id(id).encode(out)
            });
        }
        core.waiting += 1;
        let key_hash = core.hasher.hash_one(key);
        if let Some(&leader) = core.leaders.get(&key_hash) {
            if core.pendings.get(leader).is_some_and(|p| p.key == key) {
                core.counters.collapsed += 1;
                let follower = Follower {
                    ticket: ctx.defer(client, id.is_none()),
                    client_id: core.pooled(id.map_or("", |id| id.as_json())),
                    received: ctx.now(),
                };
                core.pendings[leader].followers.push(follower);
                return;
            }
        }
        core.counters.routed += 1;
        let pending = Pending {
            ticket: ctx.defer(client, id.is_none()),
            client_id: core.pooled(id.map_or("", |id| id.as_json())),
            key: core.pooled(key),
            received: ctx.now(),
            tried: 0,
            attempts: 0,
            attempt: None,
            last_error: "no proxy configured",
            key_hash,
            followers: Vec::new(),
        };
        let index = core.pendings.insert(pending);
        core.leaders.entry(key_hash).or_insert(index);
        self.dispatch(ctx, index);
    }

    /// Sends pending request `index` to the proxy the strategy picks (one not tried yet, on a
    /// retry), or answers PROXY_UNREACHABLE once `--retries` retries are used up.
    fn dispatch(&mut self, ctx: &mut Ctx<Timer>, index: usize) {
        loop {
            let core = &mut self.core;
            let Some(p) = core.pendings.get_mut(index) else { return };
            if p.attempts > core.config.retries {
                return core.give_up(ctx, index);
            }
            core.candidates.clear();
            core.candidates.extend(core.backends.iter().map(Backend::candidate));
            let Some(backend) = core.router.pick(&p.key, &core.candidates, p.tried) else {
                return core.give_up(ctx, index);
            };
            if p.attempts > 0 {
                core.counters.retries += 1;
            }
            p.attempts += 1;
            p.tried |= 1 << backend;
            match self.send(ctx, backend, index) {
                Ok(()) => return,
                Err(refused) => {
                    // Not even a connection could be started: try another proxy now.
                    self.core.note_failure(backend, refused);
                    if let Some(p) = self.core.pendings.get_mut(index) {
                        p.last_error = "cannot connect";
                    }
                }
            }
        }
    }

    /// A connection to send one more request to `backend` on: its multiplexed connection
    /// (opened if needed) when the proxy is capable, else an idle single-request connection
    /// or a new one. The error says whether the proxy refused outright.
    fn connection_for(&mut self, ctx: &mut Ctx<Timer>, backend: usize) -> Result<usize, bool> {
        let b = &mut self.core.backends[backend];
        if b.capable {
            if let Some(conn) = b.mux {
                return Ok(conn);
            }
        } else if let Some(conn) = b.idle.pop() {
            return Ok(conn);
        }
        let kind = if b.capable { ConnKind::Mux } else { ConnKind::Single };
        let entry = self.conns.vacant_entry();
        let conn = entry.key();
        let up = Upstream::connect(b.addr, ctx.registry(), conn_token(conn))
            .map_err(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)?;
        entry.insert(UpConn { up, backend, kind, waiting: None, dirty: false });
        if kind == ConnKind::Mux {
            b.mux = Some(conn);
        }
        Ok(conn)
    }

    /// Queues pending request `index` on a connection to `backend`; it is written at the end
    /// of the loop turn together with everything else queued on that connection.
    fn send(&mut self, ctx: &mut Ctx<Timer>, backend: usize, index: usize) -> Result<(), bool> {
        let conn = self.connection_for(ctx, backend)?;
        let core = &mut self.core;
        let id = core.next_attempt;
        core.next_attempt += 1;
        let Some(p) = core.pendings.get_mut(index) else { return Ok(()) };
        let c = &mut self.conns[conn];
        let out = c.up.out_buf();
        match c.kind {
            ConnKind::Mux => {
                out.extend_from_slice(b"{\"op\":\"get\",\"key\":\"");
                // Keys are validated: only unreserved characters and '/', nothing to escape.
                out.extend_from_slice(p.key.as_bytes());
                out.extend_from_slice(b"\",\"id\":");
                out.extend_from_slice(itoa::Buffer::new().format(id).as_bytes());
                out.extend_from_slice(b"}\n");
            }
            ConnKind::Single => write_text_request(out, "GET", Some(&p.key)),
        }
        if c.kind == ConnKind::Single {
            c.waiting = Some(id);
        }
        if !c.dirty {
            c.dirty = true;
            self.dirty_conns.push(conn);
        }
        p.attempt = Some(Attempt { backend, conn });
        core.attempts.insert(id, index);
        let deadline = ctx.now() + core.config.try_timeout;
        core.deadlines.push_back((deadline, id));
        if !core.deadline_timer_armed {
            core.deadline_timer_armed = true;
            ctx.schedule(deadline, Timer::AttemptDeadlines);
        }
        let b = &mut core.backends[backend];
        b.in_flight += 1;
        b.forwarded += 1;
        Ok(())
    }

    /// Attempt `id` failed (its connection broke, it timed out, or the answer was garbage):
    /// count it against the proxy and retry elsewhere or give up.
    fn fail_attempt(&mut self, ctx: &mut Ctx<Timer>, id: u64, refused: bool, why: &'static str) {
        let core = &mut self.core;
        let Some(index) = core.attempts.remove(&id) else { return };
        let Some(p) = core.pendings.get_mut(index) else { return };
        let Some(attempt) = p.attempt.take() else { return };
        p.last_error = why;
        let b = &mut core.backends[attempt.backend];
        b.in_flight = b.in_flight.saturating_sub(1);
        core.note_failure(attempt.backend, refused);
        self.dispatch(ctx, index);
    }

    /// Closes connection `conn`; its unanswered requests fail (and are retried). A close with
    /// nothing outstanding is just a proxy closing an idle connection: not a failure.
    fn close_conn(&mut self, ctx: &mut Ctx<Timer>, conn: usize, refused: bool, why: &'static str) {
        let Some(mut c) = self.conns.try_remove(conn) else { return };
        c.up.deregister(ctx.registry());
        let b = &mut self.core.backends[c.backend];
        if b.mux == Some(conn) {
            b.mux = None;
        }
        b.idle.retain(|i| *i != conn);
        // A rare event: finding the requests that were on it by a scan is fine.
        let lost: Vec<u64> = self
            .core
            .attempts
            .iter()
            .filter(|(_, &index)| self.core.pendings.get(index).and_then(|p| p.attempt).is_some_and(|a| a.conn == conn))
            .map(|(&id, _)| id)
            .collect();
        for id in lost {
            self.fail_attempt(ctx, id, refused, why);
        }
    }

    fn on_conn_event(&mut self, ctx: &mut Ctx<Timer>, conn: usize) {
        let Some(c) = self.conns.get_mut(conn) else { return };
        match c.up.on_ready(MAX_ANSWER) {
            Ok(Progress::Connecting) => return,
            Ok(Progress::Ready) => {}
            Err(_) if !c.up.is_connected() => return self.close_conn(ctx, conn, true, "connection refused"),
            Err(_) => return self.close_conn(ctx, conn, false, "connection reset"),
        }
        loop {
            let c = &mut self.conns[conn];
            let Frame::Line(line, used) = c.up.frame(MAX_ANSWER) else { break };
            let well_formed = match c.kind {
                ConnKind::Mux => match parse_tagged(line) {
                    Some(tagged) => {
                        // None: a late answer to an attempt that timed out; dropped.
                        let _ =
                            self.core.succeed(ctx, tagged.id(), |out, client_id| write_tagged(&tagged, client_id, out));
                        true
                    }
                    None => false,
                },
                // Checked once; each waiter (collapsed followers too) then gets a copy.
                ConnKind::Single => match (c.waiting.take(), untagged_body(line)) {
                    (Some(id), Some(body)) => {
                        let _ = self.core.succeed(ctx, id, |out, client_id| close_object(body, client_id, out));
                        true
                    }
                    (waiting, _) => {
                        c.waiting = waiting;
                        false
                    }
                },
            };
            self.conns[conn].up.consume(used);
            if !well_formed {
                // Garbage, or an answer nobody asked for: this connection cannot be trusted.
                return self.close_conn(ctx, conn, false, "proxy answered garbage");
            }
        }
        let c = &mut self.conns[conn];
        if matches!(c.up.frame(MAX_ANSWER), Frame::TooLong) {
            return self.close_conn(ctx, conn, false, "proxy answer too long");
        }
        if c.up.is_eof() {
            return self.close_conn(ctx, conn, false, "proxy closed the connection");
        }
        if c.kind == ConnKind::Single && c.waiting.is_none() {
            let backend = c.backend;
            let b = &mut self.core.backends[backend];
            if !b.idle.contains(&conn) {
                b.idle.push(conn);
            }
        }
    }

    /// Fails every attempt whose try timeout has passed, then re-arms the timer for the next.
    fn on_attempt_deadlines(&mut self, ctx: &mut Ctx<Timer>) {
        self.core.deadline_timer_armed = false;
        let now = ctx.now();
        while let Some(&(deadline, id)) = self.core.deadlines.front() {
            if deadline > now {
                self.core.deadline_timer_armed = true;
                ctx.schedule(deadline, Timer::AttemptDeadlines);
                break;
            }
            self.core.deadlines.pop_front();
            // Already answered (or failed) attempts are simply skipped.
            if self.core.attempts.contains_key(&id) {
                self.on_attempt_timeout(ctx, id);
            }
        }
    }

    fn on_attempt_timeout(&mut self, ctx: &mut Ctx<Timer>, id: u64) {
        let Some(&index) = self.core.attempts.get(&id) else { return };
        let Some(attempt) = self.core.pendings.get(index).and_then(|p| p.attempt) else { return };
        // On a multiplexed connection others share it: just stop waiting (a late answer
        // carries an id nobody waits for and is dropped). A single-request connection would
        // take a late answer for the next request's: close it.
        if let Some(c) = self.conns.get_mut(attempt.conn) {
            if c.kind == ConnKind::Single {
                c.waiting = None;
                self.close_conn(ctx, attempt.conn, false, "timed out");
            }
        }
        self.fail_attempt(ctx, id, false, "timed out");
    }

    // ---- Probes, METRICS polls and PURGE fan-out: one-shot exchanges -------------------

    fn start_exchange(&mut self, ctx: &mut Ctx<Timer>, backend: usize, kind: ExchangeKind, line: &[u8]) -> bool {
        let entry = self.exchanges.vacant_entry();
        let index = entry.key();
        let Ok(mut up) = Upstream::connect(self.core.backends[backend].addr, ctx.registry(), exchange_token(index))
        else {
            return false;
        };
        if up.send(line).is_err() {
            up.deregister(ctx.registry());
            return false;
        }
        let timeout = match kind {
            ExchangeKind::Purge(_) => self.core.config.request_timeout,
            _ => self.core.config.health_timeout,
        };
        let timer = ctx.schedule(ctx.now() + timeout, Timer::Exchange(index));
        entry.insert(Exchange { up, backend, kind, timer });
        true
    }

    fn on_exchange_event(&mut self, ctx: &mut Ctx<Timer>, index: usize) {
        let Some(x) = self.exchanges.get_mut(index) else { return };
        match x.up.on_ready(MAX_ANSWER) {
            Ok(Progress::Connecting) => {}
            Ok(Progress::Ready) => match x.up.frame(MAX_ANSWER) {
                Frame::Line(line, _) => {
                    // Exchanges are rare (probes, polls, purges): an owned copy is fine.
                    let answer = serde_json::from_slice::<ExchangeAnswer>(line)
                        .ok()
                        .map(|a| Answered { ok: a.status == "OK", data: a.data.map(|d| d.to_owned()) });
                    self.finish_exchange(ctx, index, answer.as_ref());
                }
                Frame::Incomplete if !x.up.is_eof() => {}
                _ => self.finish_exchange(ctx, index, None),
            },
            Err(_) => self.finish_exchange(ctx, index, None),
        }
    }

    /// Ends an exchange with its answer (`None`: no well-formed answer in time).
    fn finish_exchange(&mut self, ctx: &mut Ctx<Timer>, index: usize, answer: Option<&Answered>) {
        let Some(mut x) = self.exchanges.try_remove(index) else { return };
        x.up.deregister(ctx.registry());
        ctx.cancel(x.timer);
        let b = &mut self.core.backends[x.backend];
        match x.kind {
            ExchangeKind::Probe => {
                b.probing = false;
                let transition = match answer {
                    // Any well-formed answer counts: a simpler proxy may not know HEALTH.
                    Some(a) => {
                        b.capable = a.ok && a.data.as_ref().is_some_and(|d| d.get().contains("\"role\""));
                        b.health.record_success()
                    }
                    None => b.health.record_failure(),
                };
                log_transition(b, transition, "health probes failed");
            }
            ExchangeKind::Metrics => {
                b.polling = false;
                if let Some(data) = answer.filter(|a| a.ok).and_then(|a| a.data.as_deref()) {
                    b.set_metrics(data);
                }
            }
            ExchangeKind::Purge(fan_out) => self.purge_answer(ctx, fan_out, answer, true),
        }
    }

    fn purge(&mut self, ctx: &mut Ctx<Timer>, client: ClientId, key: &str, id: Option<Id<'_>>) {
        // A GET in flight may bring pre-purge data: later GETs must not join it.
        let key_hash = self.core.hasher.hash_one(key);
        if let Some(&leader) = self.core.leaders.get(&key_hash) {
            if self.core.pendings.get(leader).is_some_and(|p| p.key == key) {
                self.core.leaders.remove(&key_hash);
            }
        }
        let fan_out = self.purges.insert(PurgeFanOut {
            ticket: ctx.defer(client, id.is_none()),
            client_id: id.map(|id| id.as_json().into()),
            waiting: 0,
            purged: 0,
            answered: 0,
        });
        let mut line = Vec::with_capacity(key.len() + 8);
        write_text_request(&mut line, "PURGE", Some(key));
        for backend in 0..self.core.backends.len() {
            if self.start_exchange(ctx, backend, ExchangeKind::Purge(fan_out), &line) {
                self.purges[fan_out].waiting += 1;
            }
        }
        // Completes at once if no proxy could even be asked.
        self.purge_answer(ctx, fan_out, None, false);
    }

    /// Counts one proxy's answer to a PURGE (or nothing, to check for completion).
    /// Counts one proxy's PURGE outcome (`answer` is `None` when it did not answer); with
    /// `finished == false`, only checks whether every proxy has been heard from.
    fn purge_answer(&mut self, ctx: &mut Ctx<Timer>, fan_out: usize, answer: Option<&Answered>, finished: bool) {
        let Some(f) = self.purges.get_mut(fan_out) else { return };
        if finished {
            f.waiting = f.waiting.saturating_sub(1);
            if let Some(a) = answer {
                f.answered += 1;
                if a.ok && a.data.as_ref().is_some_and(|d| d.get().contains("true")) {
                    f.purged += 1;
                }
            }
        }
        if f.waiting == 0 {
            let f = self.purges.remove(fan_out);
            let id = f.client_id.as_deref().and_then(Id::from_raw_json);
            let data = PurgeData { purged: f.purged, proxies: f.answered };
            ctx.complete(f.ticket, |out| encode_ok_value(out, id, &data));
        }
    }

    fn metrics<T>(&self, ctx: &Ctx<T>) -> MetricsData<'_> {
        let core = &self.core;
        let mut cluster = ClusterData::default();
        let mut proxies = BTreeMap::new();
        for b in &core.backends {
            if let Some(sums) = b.sums {
                cluster.hits += sums.hits;
                cluster.misses += sums.misses;
                cluster.origin_fetches += sums.origin_fetches;
            }
            proxies.insert(
                b.name.as_str(),
                ProxyData {
                    healthy: b.health.is_healthy(),
                    in_flight: b.in_flight,
                    forwarded: b.forwarded,
                    failures: b.failures,
                    consecutive_failures: b.health.consecutive_failures(),
                    multiplexed: b.capable,
                    metrics: b.metrics.as_deref(),
                },
            );
        }
        cluster.hit_rate = ratio(cluster.hits, cluster.misses);
        MetricsData {
            common: ctx.common_metrics("balancer"),
            strategy: core.router.kind().name(),
            current_index: core.counters.routed,
            errors: core.counters.errors,
            retries: core.counters.retries,
            collapsed: core.counters.collapsed,
            in_flight: core.pendings.len(),
            latency_us: core.latency_us.summary(),
            proxies,
            cluster,
        }
    }
}

fn log_transition(b: &Backend, transition: Option<Transition>, why: &str) {
    match transition {
        Some(Transition::WentDown) => warn!("proxy {} is DOWN ({why})", b.name),
        Some(Transition::CameUp) => info!("proxy {} is UP again", b.name),
        None => {}
    }
}

/// What a probe, poll or purge answer must look like: any JSON object with a status.
#[derive(Deserialize)]
struct ExchangeAnswer<'a> {
    #[serde(borrow)]
    status: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

/// An exchange's answer, copied out of the connection's buffer.
struct Answered {
    ok: bool,
    data: Option<Box<RawValue>>,
}

#[derive(Serialize)]
struct PurgeData {
    purged: usize,
    proxies: usize,
}

#[derive(Serialize)]
struct ProxyData<'a> {
    healthy: bool,
    in_flight: usize,
    forwarded: u64,
    failures: u64,
    consecutive_failures: u32,
    /// Requests go to it multiplexed with balancer ids (it answered HEALTH with a role).
    multiplexed: bool,
    metrics: Option<&'a RawValue>,
}

#[derive(Serialize, Default)]
struct ClusterData {
    hits: u64,
    misses: u64,
    hit_rate: f64,
    origin_fetches: u64,
}

#[derive(Serialize)]
struct MetricsData<'a> {
    #[serde(flatten)]
    common: CommonMetrics,
    strategy: &'static str,
    current_index: u64,
    errors: u64,
    retries: u64,
    /// GETs that joined an identical GET already in flight instead of going upstream.
    collapsed: u64,
    in_flight: usize,
    latency_us: LatencySummary,
    proxies: BTreeMap<&'a str, ProxyData<'a>>,
    cluster: ClusterData,
}

impl Service for Balancer {
    type Timer = Timer;

    fn on_start(&mut self, ctx: &mut Ctx<Timer>) {
        // Probe everyone at once, so capabilities are known early; poll metrics soon after.
        for backend in 0..self.core.backends.len() {
            ctx.schedule(ctx.now(), Timer::Probe(backend));
            ctx.schedule(ctx.now() + self.core.config.health_timeout, Timer::PollMetrics(backend));
        }
    }

    fn on_line(&mut self, ctx: &mut Ctx<Timer>, client: ClientId, line: &[u8]) {
        let request = match parse_request(line) {
            Ok(request) => request,
            Err(e) => {
                self.core.counters.errors += 1;
                return ctx.reply_error(client, &e);
            }
        };
        let id = request.id;
        match request.op {
            Op::Get(key) => self.get(ctx, client, key.as_str(), id),
            Op::Purge(key) => self.purge(ctx, client, key.as_str(), id),
            Op::Metrics => {
                let data = self.metrics(ctx);
                ctx.reply_value(client, id, &data);
            }
            Op::Health => ctx.reply_health(client, id, "balancer"),
        }
    }

    fn on_timer(&mut self, ctx: &mut Ctx<Timer>, timer: Timer) {
        match timer {
            Timer::Probe(backend) => {
                ctx.schedule(ctx.now() + self.core.config.health_interval, Timer::Probe(backend));
                if !self.core.backends[backend].probing {
                    let started = self.start_exchange(ctx, backend, ExchangeKind::Probe, b"HEALTH\n");
                    let b = &mut self.core.backends[backend];
                    if started {
                        b.probing = true;
                    } else {
                        let transition = b.health.record_failure();
                        log_transition(b, transition, "cannot connect for a probe");
                    }
                }
            }
            Timer::PollMetrics(backend) => {
                ctx.schedule(ctx.now() + self.core.config.metrics_interval, Timer::PollMetrics(backend));
                if !self.core.backends[backend].polling
                    && self.start_exchange(ctx, backend, ExchangeKind::Metrics, b"METRICS\n")
                {
                    self.core.backends[backend].polling = true;
                }
            }
            Timer::AttemptDeadlines => self.on_attempt_deadlines(ctx),
            Timer::Exchange(index) => self.finish_exchange(ctx, index, None),
        }
    }

    fn on_peer_event(&mut self, ctx: &mut Ctx<Timer>, token: Token, _event: &Event) {
        let Some(n) = peer_index(token) else { return };
        if n % 2 == 0 {
            self.on_conn_event(ctx, n / 2);
        } else {
            self.on_exchange_event(ctx, n / 2);
        }
    }

    // SPEC 6: /metrics, the dashboard and its history read the METRICS data.
    fn metrics_json(&self, ctx: &Ctx<Timer>) -> serde_json::Value {
        serde_json::to_value(self.metrics(ctx)).unwrap_or_default()
    }

    fn latency_histogram(&self) -> Option<&LatencyHistogram> {
        Some(&self.core.latency_us)
    }

    fn admin_request(&mut self, ctx: &mut Ctx<Timer>, request: &AdminRequest<'_>) -> Option<AdminResponse> {
        let metrics = crate::dashboard::wants_metrics(request).then(|| common::admin::metrics_value(self, ctx));
        crate::dashboard::route(request, &mut self.history, metrics)
    }

    fn on_admin_tick(&mut self, ctx: &mut Ctx<Timer>) {
        let metrics = common::admin::metrics_value(self, ctx);
        self.history.sample(ctx.now(), crate::dashboard::wall_ms(), &metrics, &self.core.latency_us);
    }

    fn on_turn_end(&mut self, ctx: &mut Ctx<Timer>) {
        while let Some(conn) = self.dirty_conns.pop() {
            let Some(c) = self.conns.get_mut(conn) else { continue };
            c.dirty = false;
            if c.up.flush().is_err() {
                self.close_conn(ctx, conn, false, "write to proxy failed");
            }
        }
    }
}
