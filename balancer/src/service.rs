//! The balancer on the shared event loop: thin glue between the loop's events and the plain
//! types that decide — the attempt book, each proxy's connection pool, the collapser, the
//! PURGE fan-outs, health and the routing strategy. Nothing here decides on its own.

use common::framing::Frame;
use common::metrics::LatencyHistogram;
use common::protocol::{
    encode_ok_value, parse_request, write_answer_tail, write_tagged_get, write_text_request, Id, Op, Reply, Status,
};
use common::server::{peer_index, peer_token, ClientId, Ctx, Service, Ticket};
use common::timers::TimerKey;
use common::upstream::{Progress, Upstream};
use log::{info, warn};
use mio::event::Event;
use mio::Token;
use slab::Slab;

use crate::attempts::{Attempt, AttemptBook};
use crate::backend::Backend;
use crate::collapse::Collapser;
use crate::exchange::{self, Heard, Purpose};
use crate::failure::Failure;
use crate::health::Transition;
use crate::metrics::{Counters, MetricsData};
use crate::pool::{ConnKind, Route};
use crate::purge::{Admit, Job, Outcome, Purges};
use crate::relay::read_answer;
use crate::request::{Next, Request, Waiter};
use crate::strategy::{Candidate, Router};
use crate::BalancerConfig;

/// Longest answer line accepted from a proxy.
const MAX_ANSWER: usize = 16 * 1024 * 1024 + 4096;
const MAX_SPARE_STRINGS: usize = 4096;

pub enum Timer {
    Probe(usize),
    PollMetrics(usize),
    /// The front of the attempt book's deadlines is due.
    AttemptDeadlines,
    /// Exchange N has waited too long.
    Exchange(usize),
}

struct UpConn {
    up: Upstream,
    backend: usize,
    kind: ConnKind,
    /// Answers received on it: a connection that answered before is "reused" when it idles.
    answered: u64,
    /// Has output queued this turn (listed in `dirty`).
    dirty: bool,
}

struct ExchangeConn {
    up: Upstream,
    backend: usize,
    purpose: Purpose,
    timer: TimerKey,
}

/// Request state, apart from the connections, so that an answer line borrowed from a
/// connection can be relayed through it.
struct Core {
    config: BalancerConfig,
    backends: Vec<Backend>,
    router: Router,
    candidates: Vec<Candidate>,
    requests: Slab<Request<Ticket>>,
    book: AttemptBook,
    deadline_armed: bool,
    collapser: Collapser,
    purges: Purges<Ticket>,
    /// Proxies just marked down whose connections are closed at the end of the turn (their
    /// GETs then go elsewhere at once).
    went_down: Vec<usize>,
    counters: Counters,
    latency_us: LatencyHistogram,
    /// Spare strings for keys and ids, so that routing a GET allocates nothing.
    spare: Vec<String>,
    /// Reused for the tail of each shared answer.
    tail: Vec<u8>,
    /// Client GETs accepted and not yet answered (leaders and followers): `--max-pending`.
    waiting: usize,
}

pub struct Balancer {
    core: Core,
    conns: Slab<UpConn>,
    dirty: Vec<usize>,
    exchanges: Slab<ExchangeConn>,
}

/// Upstream connections and exchanges share the peer token space: even and odd.
fn conn_token(index: usize) -> Token {
    peer_token(index.saturating_mul(2))
}

fn exchange_token(index: usize) -> Token {
    peer_token(index.saturating_mul(2).saturating_add(1))
}

fn connect_failure(e: &std::io::Error) -> Failure {
    if e.kind() == std::io::ErrorKind::ConnectionRefused {
        Failure::Refused
    } else {
        Failure::CannotConnect
    }
}

impl Core {
    fn pooled(&mut self, text: &str) -> String {
        let mut s = self.spare.pop().unwrap_or_default();
        s.clear();
        s.push_str(text);
        s
    }

    fn recycle(&mut self, s: String) {
        if self.spare.len() < MAX_SPARE_STRINGS && s.capacity() <= 512 {
            self.spare.push(s);
        }
    }

    /// A request is answered: it leaves the collapser, the count and the string pool.
    fn forget(&mut self, index: usize, r: Request<Ticket>) {
        self.collapser.finished(r.key_hash, index);
        self.waiting = self.waiting.saturating_sub(1 + r.followers.len());
        self.recycle(r.key);
        self.recycle(r.leader.client_id);
        for w in r.followers {
            self.recycle(w.client_id);
        }
    }

    /// One answer line on connection `conn`: delivered to the attempt it answers, dropped if
    /// it answers none sent on this connection, an error if it is no answer at all.
    fn on_answer(&mut self, ctx: &mut Ctx<Timer>, conn: usize, kind: ConnKind, line: &[u8]) -> Result<(), Failure> {
        let (tag, answer) = read_answer(line, kind == ConnKind::Mux)?;
        let attempt = match tag {
            Some(tag) => match self.book.answered(conn, tag) {
                Some(attempt) => attempt,
                None => return Ok(()), // unknown, late or foreign: dropped
            },
            None => self.book.answered_in_order(conn).ok_or(Failure::Garbage)?,
        };
        let b = &mut self.backends[attempt.backend];
        b.in_flight = b.in_flight.saturating_sub(1);
        if b.health.is_healthy() {
            // An answer clears passive failures; only probes bring a down proxy back.
            b.health.record_success();
        }
        let Some(r) = self.requests.try_remove(attempt.request) else { return Ok(()) };
        if r.followers.is_empty() {
            // The hit path: two copies into the client's buffer, nothing allocated.
            ctx.complete(r.leader.ticket, |out| answer.write_with_id(out, r.leader.client_id()));
        } else {
            // One body for the leader and its followers, each with its own id.
            let body = answer.shared_body();
            for w in r.waiters() {
                self.tail.clear();
                write_answer_tail(&mut self.tail, answer.has_members(), w.client_id());
                ctx.complete_shared(w.ticket, b"", &body, &self.tail);
            }
        }
        for w in r.waiters() {
            self.latency_us.record(w.received.elapsed());
        }
        self.forget(attempt.request, r);
        Ok(())
    }

    fn give_up(&mut self, ctx: &mut Ctx<Timer>, index: usize) {
        let Some(r) = self.requests.try_remove(index) else { return };
        self.counters.errors += 1 + r.followers.len() as u64;
        let message = r.give_up_message();
        for w in r.waiters() {
            let id = w.client_id().and_then(Id::from_raw_json);
            ctx.complete(w.ticket, |out| Reply::error(Status::ProxyUnreachable, &message).id(id).encode(out));
            self.latency_us.record(w.received.elapsed());
        }
        self.forget(index, r);
    }

    /// Passive health: a real request to `backend` failed.
    fn note_failure(&mut self, backend: usize, failure: Failure) {
        if !failure.counts_against_proxy() {
            return;
        }
        let b = &mut self.backends[backend];
        b.failures += 1;
        let transition = if failure.marks_down_at_once() { b.health.force_down() } else { b.health.record_failure() };
        self.transition(backend, transition, failure.describe());
    }

    fn transition(&mut self, backend: usize, transition: Option<Transition>, why: &str) {
        let name = &self.backends[backend].name;
        match transition {
            Some(Transition::WentDown) => {
                warn!("proxy {name} is DOWN ({why})");
                self.went_down.push(backend);
            }
            Some(Transition::CameUp) => info!("proxy {name} is UP again"),
            None => {}
        }
    }

    fn arm_deadline(&mut self, ctx: &mut Ctx<Timer>) {
        if !self.deadline_armed {
            if let Some(at) = self.book.next_deadline() {
                ctx.schedule(at, Timer::AttemptDeadlines);
                self.deadline_armed = true;
            }
        }
    }
}

impl Balancer {
    pub fn new(config: BalancerConfig) -> Self {
        let backends = config.proxies.iter().map(|(name, addr)| Backend::new(name, *addr, &config)).collect();
        let core = Core {
            router: Router::new(config.strategy),
            backends,
            candidates: Vec::new(),
            requests: Slab::new(),
            book: AttemptBook::new(config.try_timeout),
            deadline_armed: false,
            collapser: Collapser::new(config.collapse),
            purges: Purges::default(),
            went_down: Vec::new(),
            counters: Counters::default(),
            latency_us: LatencyHistogram::new(),
            spare: Vec::new(),
            tail: Vec::new(),
            waiting: 0,
            config,
        };
        Balancer { core, conns: Slab::new(), dirty: Vec::new(), exchanges: Slab::new() }
    }

    fn get(&mut self, ctx: &mut Ctx<Timer>, client: ClientId, key: &str, id: Option<Id<'_>>) {
        let core = &mut self.core;
        if core.waiting >= core.config.max_pending {
            core.counters.errors += 1;
            let reply = Reply::error(Status::Overloaded, "too many requests in flight").id(id);
            return ctx.reply(client, id.is_none(), |out| reply.encode(out));
        }
        core.waiting += 1;
        let client_id = core.pooled(id.map_or("", |id| id.as_json()));
        let waiter = Waiter { ticket: ctx.defer(client, id.is_none()), client_id, received: ctx.now() };
        let key_hash = core.collapser.hash(key);
        if let Some(leader) = core.collapser.leader(key_hash).and_then(|i| core.requests.get_mut(i)) {
            if leader.key == key {
                core.counters.collapsed += 1;
                return leader.followers.push(waiter);
            }
        }
        core.counters.routed += 1;
        let key = core.pooled(key);
        let index = core.requests.insert(Request::new(waiter, key, key_hash));
        core.collapser.lead(key_hash, index);
        self.dispatch(ctx, index);
    }

    /// Sends request `index` to the proxy the strategy picks among those not tried yet, or
    /// answers PROXY_UNREACHABLE once the retries are spent.
    fn dispatch(&mut self, ctx: &mut Ctx<Timer>, index: usize) {
        loop {
            let core = &mut self.core;
            let Some(r) = core.requests.get_mut(index) else { return };
            if !r.may_attempt(core.config.retries) {
                return core.give_up(ctx, index);
            }
            core.candidates.clear();
            core.candidates.extend(core.backends.iter().map(Backend::candidate));
            let Some(backend) = core.router.pick(&r.key, &core.candidates, r.tried) else {
                return core.give_up(ctx, index);
            };
            if r.begin_attempt(backend) {
                core.counters.retries += 1;
            }
            match self.send(ctx, backend, index, false) {
                Ok(()) => return,
                Err(failure) => {
                    self.core.note_failure(backend, failure);
                    if let Some(r) = self.core.requests.get_mut(index) {
                        r.last_failure = Some(failure);
                    }
                }
            }
        }
    }

    /// Queues request `index` on a connection to `backend` (a new one when `fresh`); it is
    /// written at the end of the turn with everything else queued on that connection.
    fn send(&mut self, ctx: &mut Ctx<Timer>, backend: usize, index: usize, fresh: bool) -> Result<(), Failure> {
        let b = &mut self.core.backends[backend];
        let multiplexed = b.capable;
        let book = &self.core.book;
        let route = match fresh {
            true => Route::Open(if multiplexed { ConnKind::Mux } else { ConnKind::Single }),
            false => b.pool.route(multiplexed, |conn| book.owed_by(conn)),
        };
        let (conn, reused_at) = match route {
            Route::Use { conn, idle } => {
                let c = &self.conns[conn];
                (conn, (idle && c.answered > 0).then(|| c.up.received_bytes()))
            }
            Route::Open(kind) => {
                let entry = self.conns.vacant_entry();
                let conn = entry.key();
                let up =
                    Upstream::connect(b.addr, ctx.registry(), conn_token(conn)).map_err(|e| connect_failure(&e))?;
                entry.insert(UpConn { up, backend, kind, answered: 0, dirty: false });
                b.pool.opened(conn, kind);
                (conn, None)
            }
        };
        b.in_flight += 1;
        b.forwarded += 1;
        let core = &mut self.core;
        let Some(r) = core.requests.get(index) else { return Ok(()) };
        let id = core.book.start(ctx.now(), Attempt { request: index, backend, conn, reused_at });
        let c = &mut self.conns[conn];
        match c.kind {
            ConnKind::Mux => write_tagged_get(c.up.out_buf(), &r.key, id),
            ConnKind::Single => write_text_request(c.up.out_buf(), "GET", Some(&r.key)),
        }
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(conn);
        }
        core.arm_deadline(ctx);
        Ok(())
    }

    /// Attempt `a` failed: count it, then retry elsewhere or give up.
    fn fail(&mut self, ctx: &mut Ctx<Timer>, a: Attempt, failure: Failure) {
        let b = &mut self.core.backends[a.backend];
        b.in_flight = b.in_flight.saturating_sub(1);
        self.core.note_failure(a.backend, failure);
        let retries = self.core.config.retries;
        match self.core.requests.get_mut(a.request).map(|r| r.after_failure(failure, retries)) {
            Some(Next::Retry) => self.dispatch(ctx, a.request),
            Some(Next::GiveUp) => self.core.give_up(ctx, a.request),
            None => {}
        }
    }

    /// Closes connection `conn`. Its GETs fail — except those sent on it after it idled, when
    /// it closed without a byte more: the proxy had closed it, which is no failure (SPEC 3.5),
    /// and they go again on a new connection.
    fn lose(&mut self, ctx: &mut Ctx<Timer>, conn: usize, failure: Failure) {
        let Some(mut c) = self.conns.try_remove(conn) else { return };
        c.up.deregister(ctx.registry());
        self.core.backends[c.backend].pool.closed(conn);
        let received = c.up.received_bytes();
        for a in self.core.book.conn_lost(conn) {
            let closed_while_idle =
                matches!(failure, Failure::Closed | Failure::Reset) && a.reused_at == Some(received);
            if !closed_while_idle {
                self.fail(ctx, a, failure);
                continue;
            }
            self.core.counters.reopened += 1;
            let b = &mut self.core.backends[a.backend];
            b.in_flight = b.in_flight.saturating_sub(1);
            b.forwarded = b.forwarded.saturating_sub(1);
            if let Err(failure) = self.send(ctx, a.backend, a.request, true) {
                self.fail(ctx, Attempt { reused_at: None, ..a }, failure);
            }
        }
    }

    fn on_conn_event(&mut self, ctx: &mut Ctx<Timer>, conn: usize) {
        let Some(c) = self.conns.get_mut(conn) else { return };
        match c.up.on_ready(MAX_ANSWER) {
            Ok(Progress::Connecting) => return,
            Ok(Progress::Ready) => {}
            Err(_) if !c.up.is_connected() => return self.lose(ctx, conn, Failure::Refused),
            Err(_) => return self.lose(ctx, conn, Failure::Reset),
        }
        loop {
            let c = &mut self.conns[conn];
            let Frame::Line(line, used) = c.up.frame(MAX_ANSWER) else { break };
            let answered = self.core.on_answer(ctx, conn, c.kind, line);
            c.up.consume(used);
            c.answered += 1;
            if let Err(failure) = answered {
                return self.lose(ctx, conn, failure);
            }
        }
        let c = &mut self.conns[conn];
        if matches!(c.up.frame(MAX_ANSWER), Frame::TooLong) {
            return self.lose(ctx, conn, Failure::TooLong);
        }
        if c.up.is_eof() {
            return self.lose(ctx, conn, Failure::Closed);
        }
        if c.kind == ConnKind::Single
            && self.core.book.owed_by(conn) == 0
            && !self.core.backends[c.backend].pool.release(conn)
        {
            self.lose(ctx, conn, Failure::Closed);
        }
    }

    fn on_attempt_deadlines(&mut self, ctx: &mut Ctx<Timer>) {
        self.core.deadline_armed = false;
        while let Some(a) = self.core.book.next_expired(ctx.now()) {
            // A single-request connection would take a late answer for the next GET's: close
            // it. On a multiplexed one a late answer finds no attempt and is dropped.
            if self.conns.get(a.conn).is_some_and(|c| c.kind == ConnKind::Single) {
                self.lose(ctx, a.conn, Failure::TimedOut);
            }
            self.fail(ctx, a, Failure::TimedOut);
        }
        self.core.arm_deadline(ctx);
    }

    // ---- Probes, METRICS polls and PURGE fan-out: one-shot exchanges ----

    fn start_exchange(
        &mut self,
        ctx: &mut Ctx<Timer>,
        backend: usize,
        purpose: Purpose,
        key: &str,
    ) -> Result<(), Failure> {
        let entry = self.exchanges.vacant_entry();
        let index = entry.key();
        let addr = self.core.backends[backend].addr;
        let mut up = Upstream::connect(addr, ctx.registry(), exchange_token(index)).map_err(|e| connect_failure(&e))?;
        let mut line = Vec::new();
        exchange::request_line(purpose, key, &mut line);
        if up.send(&line).is_err() {
            up.deregister(ctx.registry());
            return Err(Failure::Reset);
        }
        let timeout = match purpose {
            Purpose::Purge(_) => self.core.config.request_timeout,
            Purpose::Probe | Purpose::Poll => self.core.config.health_timeout,
        };
        let timer = ctx.schedule(ctx.now() + timeout, Timer::Exchange(index));
        entry.insert(ExchangeConn { up, backend, purpose, timer });
        Ok(())
    }

    fn on_exchange_event(&mut self, ctx: &mut Ctx<Timer>, index: usize) {
        let Some(x) = self.exchanges.get_mut(index) else { return };
        let heard = match x.up.on_ready(MAX_ANSWER) {
            Ok(Progress::Connecting) => return,
            Ok(Progress::Ready) => match x.up.frame(MAX_ANSWER) {
                Frame::Line(line, _) => exchange::interpret(x.purpose, line),
                Frame::Incomplete if !x.up.is_eof() => return,
                _ => None,
            },
            Err(_) => None,
        };
        self.finish_exchange(ctx, index, heard);
    }

    /// Ends an exchange with what it heard (`None`: no well-formed answer in time).
    fn finish_exchange(&mut self, ctx: &mut Ctx<Timer>, index: usize, heard: Option<Heard>) {
        let Some(mut x) = self.exchanges.try_remove(index) else { return };
        x.up.deregister(ctx.registry());
        ctx.cancel(x.timer);
        let core = &mut self.core;
        let b = &mut core.backends[x.backend];
        match (x.purpose, heard) {
            (Purpose::Probe, heard) => {
                b.probing = false;
                let transition = match heard {
                    Some(Heard::Probe { multiplexed }) => {
                        b.capable = multiplexed;
                        b.health.record_success()
                    }
                    _ => b.health.record_failure(),
                };
                core.transition(x.backend, transition, "health probes failed");
            }
            (Purpose::Poll, heard) => {
                b.polling = false;
                if let Some(Heard::Poll(Some(data))) = heard {
                    b.set_metrics(&data);
                }
            }
            (Purpose::Purge(fan_out), heard) => {
                let held = match heard {
                    Some(Heard::Purge { held }) => Some(held),
                    _ => None,
                };
                core.purges.heard(fan_out, held);
                self.purge_finished(ctx, fan_out);
                while let Some(job) = self.core.purges.next_queued() {
                    self.launch_purge(ctx, job);
                }
            }
        }
    }

    fn purge(&mut self, ctx: &mut Ctx<Timer>, client: ClientId, key: &str, id: Option<Id<'_>>) {
        // A GET in flight may bring pre-purge data: later GETs must not join it.
        let core = &mut self.core;
        let key_hash = core.collapser.hash(key);
        if let Some(leader) = core.collapser.leader(key_hash) {
            if core.requests.get(leader).is_some_and(|r| r.key == key) {
                core.collapser.finished(key_hash, leader);
            }
        }
        let job = Job {
            ticket: ctx.defer(client, id.is_none()),
            key: key.to_owned(),
            client_id: id.map(|id| id.as_json().into()),
        };
        match core.purges.submit(job) {
            Admit::Start(job) => self.launch_purge(ctx, job),
            Admit::Queued => {}
            Admit::Overloaded(job) => answer_purge(ctx, &mut self.core.counters, job, Outcome::Overloaded),
        }
    }

    fn launch_purge(&mut self, ctx: &mut Ctx<Timer>, job: Job<Ticket>) {
        let key = job.key.clone();
        let fan_out = self.core.purges.begin(job);
        for backend in 0..self.core.backends.len() {
            match self.start_exchange(ctx, backend, Purpose::Purge(fan_out), &key) {
                Ok(()) => self.core.purges.asked(fan_out),
                // A proxy that is not running holds nothing; it is simply not counted.
                Err(Failure::Refused) => {}
                Err(_) => self.core.purges.could_not_ask(fan_out),
            }
        }
        self.purge_finished(ctx, fan_out);
    }

    fn purge_finished(&mut self, ctx: &mut Ctx<Timer>, fan_out: usize) {
        if let Some((job, outcome)) = self.core.purges.finished(fan_out) {
            answer_purge(ctx, &mut self.core.counters, job, outcome);
        }
    }

    /// Closes the connections of proxies just marked down: their GETs go elsewhere now.
    fn redispatch_went_down(&mut self, ctx: &mut Ctx<Timer>) {
        while let Some(backend) = self.core.went_down.pop() {
            let conns: Vec<usize> = self.conns.iter().filter(|(_, c)| c.backend == backend).map(|(i, _)| i).collect();
            for conn in conns {
                self.lose(ctx, conn, Failure::ProxyDown);
            }
        }
    }
}

fn answer_purge(ctx: &mut Ctx<Timer>, counters: &mut Counters, job: Job<Ticket>, outcome: Outcome) {
    let id = job.client_id.as_deref().and_then(Id::from_raw_json);
    #[derive(serde::Serialize)]
    struct PurgeData {
        purged: usize,
        proxies: usize,
    }
    ctx.complete(job.ticket, |out| match outcome {
        Outcome::Ok { purged, proxies } => encode_ok_value(out, id, &PurgeData { purged, proxies }),
        Outcome::Overloaded => {
            counters.errors += 1;
            Reply::error(Status::Overloaded, "too many PURGEs in flight").id(id).encode(out)
        }
    });
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
                let core = &self.core;
                let common = ctx.common_metrics("balancer");
                let strategy = core.router.kind().name();
                let latency = core.latency_us.summary();
                let data =
                    MetricsData::new(common, strategy, core.counters, core.requests.len(), latency, &core.backends);
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
                    match self.start_exchange(ctx, backend, Purpose::Probe, "") {
                        Ok(()) => self.core.backends[backend].probing = true,
                        Err(failure) => {
                            let transition = self.core.backends[backend].health.record_failure();
                            self.core.transition(backend, transition, failure.describe());
                        }
                    }
                }
            }
            Timer::PollMetrics(backend) => {
                ctx.schedule(ctx.now() + self.core.config.metrics_interval, Timer::PollMetrics(backend));
                if !self.core.backends[backend].polling && self.start_exchange(ctx, backend, Purpose::Poll, "").is_ok()
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

    fn on_turn_end(&mut self, ctx: &mut Ctx<Timer>) {
        self.redispatch_went_down(ctx);
        while let Some(conn) = self.dirty.pop() {
            let Some(c) = self.conns.get_mut(conn) else { continue };
            c.dirty = false;
            if c.up.flush().is_err() {
                self.lose(ctx, conn, Failure::Reset);
            }
        }
    }
}
