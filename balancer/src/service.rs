//! The balancer on the shared event loop: thin glue between the loop's events and the plain
//! types that decide — the in-flight book (requests, attempts, collapsing), each proxy's
//! connection pool, the PURGE fan-outs, health and the routing strategy. Nothing here decides.

use common::admin::{Request as AdminRequest, Response as AdminResponse};
use common::metrics::LatencyHistogram;
use common::peer::{PeerClosed, PeerId, PeerLine};
use common::protocol::{parse_request, write_tagged_get, write_text_request, Id, Key, KeyBuf, Op, Reply, Status};
use common::server::{ClientId, Ctx, Service, Ticket};
use log::debug;

use crate::attempts::Attempt;
use crate::exchange::Exchanges;
use crate::failure::Failure;
use crate::inflight::{InFlight, Parked};
use crate::links::Links;
use crate::metrics::MetricsData;
use crate::pool::{ConnKind, Route};
use crate::request::{Next, Request, Waiter};
use crate::BalancerConfig;

pub enum Timer {
    /// Slot and generation: a timer of a proxy that left does not drive its slot's successor.
    Probe(usize, u64),
    PollMetrics(usize, u64),
    /// Look the proxies' DNS names up again (`--resolve-interval-ms`).
    Resolve,
    /// The front of the attempt book's deadlines is due.
    AttemptDeadlines,
    /// Exchange N has waited too long.
    Exchange(usize),
    /// PURGE connection N's oldest answer may be overdue.
    PurgeDeadline(usize),
}

#[path = "link_events.rs"]
mod link_events;
#[path = "probing.rs"]
mod probing;
#[path = "purging.rs"]
mod purging;

pub struct Balancer {
    pub(crate) core: InFlight,
    pub(crate) links: Links,
    pub(crate) exchanges: Exchanges,
    /// The proxy set's sources and leaving slots (SPEC 7); its glue is in `reconfig`.
    pub(crate) roster: crate::roster::Roster,
    pub(crate) resolver: Option<crate::resolver::Resolver>,
    pub(crate) purge_links: crate::purge_links::PurgeLinks,
    /// The dashboard's samples (SPEC 6), taken on the admin listener's tick.
    history: crate::history::History,
}

impl Balancer {
    pub fn new(config: BalancerConfig) -> Self {
        // PURGE connections take at most a quarter of the descriptors kept for upstream use
        // (the reserve actually kept is known once the loop runs: `on_start`).
        let purge_budget = config.server.fd_reserve / 4;
        Balancer {
            roster: crate::roster::Roster::new(&config),
            resolver: None,
            core: InFlight::new(config),
            links: Links::default(),
            exchanges: Exchanges::default(),
            purge_links: crate::purge_links::PurgeLinks::new(purge_budget),
            history: crate::history::History::new(),
        }
    }

    /// The METRICS data (SPEC 2.4), also behind /metrics, /api/cluster and the dashboard.
    fn metrics<T>(&self, ctx: &Ctx<T>) -> MetricsData<'_> {
        let core = &self.core;
        let (common, strategy) = (ctx.common_metrics("balancer"), core.router.kind().name());
        let latency = core.latency_us.summary();
        let mut data = MetricsData::new(common, strategy, core.counters, core.requests.len(), latency, &core.backends);
        data.waiting_for_room = core.windows.parked();
        data
    }

    fn get(&mut self, ctx: &mut Ctx<Timer>, client: ClientId, key: &Key<'_>, id: Option<Id<'_>>) {
        let core = &mut self.core;
        if core.waiting >= core.config.max_pending {
            core.counters.errors += 1;
            let reply = Reply::error(Status::Overloaded, "too many requests in flight").id(id);
            return ctx.reply(client, id.is_none(), |out| reply.encode(out));
        }
        core.waiting += 1;
        let client_id = core.pooled(id.map_or("", |id| id.as_json()));
        let waiter = Waiter { ticket: ctx.defer(client, id.is_none()), client_id, received: ctx.now() };
        if !core.windows.try_forward(client, ctx.has_room(client)) {
            // Its client's answers so far fill its output bound: it waits (SPEC 3.8).
            let key = KeyBuf::copy_of(key, core.pooled(""));
            core.windows.park(client, Parked { waiter, key });
            if !ctx.has_room(client) {
                ctx.notify_room(client);
            }
            return;
        }
        let key = KeyBuf::copy_of(key, core.pooled(""));
        self.route(ctx, waiter, key);
    }

    /// Collapses GET `waiter` onto one in flight for `key`, or routes it.
    fn route(&mut self, ctx: &mut Ctx<Timer>, waiter: Waiter<Ticket>, key: KeyBuf) {
        let core = &mut self.core;
        let key_hash = core.collapser.hash(key.as_str());
        if let Some(leader) = core.collapser.leader(key_hash).and_then(|i| core.requests.get_mut(i)) {
            if leader.key == key.as_str() {
                core.counters.collapsed += 1;
                leader.followers.push(waiter);
                return core.recycle(key.into_string());
            }
        }
        core.counters.routed += 1;
        let index = core.requests.insert(Request::new(waiter, key, key_hash));
        core.collapser.lead(key_hash, index);
        self.dispatch(ctx, index);
    }

    /// Routes the parked GETs of `client` its window has room for (dropped if it has gone).
    fn resume(&mut self, ctx: &mut Ctx<Timer>, client: ClientId) {
        if !ctx.is_connected(client) {
            for parked in self.core.windows.take_parked(client) {
                self.core.drop_parked(ctx, parked);
            }
            return;
        }
        while let Some(Parked { waiter, key }) = self.core.windows.unpark(client, ctx.may_forward(client)) {
            self.route(ctx, waiter, key);
        }
        if self.core.windows.has_parked(client) && !ctx.may_forward(client) {
            ctx.notify_room(client);
        }
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
            let packed = (&mut core.candidates, &mut core.slots);
            let Some(backend) = crate::roster::pick(&mut core.router, &core.backends, packed, &r.key, r.tried) else {
                return core.give_up(ctx, index);
            };
            if r.begin_attempt(backend) {
                core.counters.retries += 1;
                let why = r.last_failure.map_or("failed", Failure::describe);
                debug!("GET {} retried on {} (the last attempt: {why})", r.key.as_str(), core.backends[backend].name);
            }
            let Err(failure) = self.send(ctx, backend, index, false) else { return };
            // The pool named a connection that has gone (a connect that fails is told later,
            // as the end of its connection): try another proxy now.
            self.core.note_failure(backend, failure);
            if let Some(r) = self.core.requests.get_mut(index) {
                r.last_failure = Some(failure);
            }
        }
    }

    /// Queues request `index` on a connection to `backend` the pool picks (a new one when
    /// `fresh`); the driver writes it at the end of the turn with whatever else that
    /// connection got.
    fn send(&mut self, ctx: &mut Ctx<Timer>, backend: usize, index: usize, fresh: bool) -> Result<(), Failure> {
        let core = &mut self.core;
        let b = &mut core.backends[backend];
        let book = &core.book;
        let route = match fresh {
            true => Route::Open(if b.capable { ConnKind::Mux } else { ConnKind::Single }),
            false => b.pool.route(b.capable, |conn| book.owed_by(conn)),
        };
        let (conn, reused_at) = match route {
            Route::Use { conn, idle } => {
                let link = self.links.get(conn).ok_or(Failure::Reset)?;
                (conn, (idle && link.answered > 0).then(|| ctx.peer_received(link.peer).unwrap_or(0)))
            }
            Route::Open(kind) => {
                let conn = self.links.open(ctx, b.addr, backend, kind);
                b.pool.opened(conn, kind);
                (conn, None)
            }
        };
        let Some(r) = core.requests.get(index) else { return Ok(()) };
        b.in_flight += 1;
        b.forwarded += 1;
        let id = core.book.start(ctx.now(), Attempt { request: index, backend, conn, reused_at });
        match self.links.queue(ctx, conn) {
            Some((out, ConnKind::Mux)) => write_tagged_get(out, &r.key, id),
            Some((out, ConnKind::Single)) => write_text_request(out, "GET", Some(&r.key)),
            None => {}
        }
        core.arm_deadline(ctx);
        Ok(())
    }

    /// Attempt `a` failed: count it, then retry elsewhere or give up.
    fn fail(&mut self, ctx: &mut Ctx<Timer>, a: Attempt, failure: Failure) {
        self.core.note_failure(a.backend, failure);
        self.retry(ctx, a, failure);
    }

    /// Attempt `a` failed (already counted against its proxy): retried or given up.
    fn retry(&mut self, ctx: &mut Ctx<Timer>, a: Attempt, failure: Failure) {
        let b = &mut self.core.backends[a.backend];
        b.in_flight = b.in_flight.saturating_sub(1);
        let retries = self.core.config.retries;
        match self.core.requests.get_mut(a.request).map(|r| r.after_failure(failure, retries)) {
            Some(Next::Retry) => self.dispatch(ctx, a.request),
            Some(Next::GiveUp) => self.core.give_up(ctx, a.request),
            None => {}
        }
    }

    fn on_attempt_deadlines(&mut self, ctx: &mut Ctx<Timer>) {
        self.core.deadline_armed = false;
        while let Some(a) = self.core.book.next_expired(ctx.now()) {
            // A single-request connection would take a late answer for the next GET's: close
            // it. On a multiplexed one a late answer finds no attempt and is dropped.
            if self.links.get(a.conn).is_some_and(|l| l.kind == ConnKind::Single) {
                self.lose(ctx, a.conn, Failure::TimedOut);
            }
            self.fail(ctx, a, Failure::TimedOut);
        }
        self.core.arm_deadline(ctx);
    }
}

impl Service for Balancer {
    type Timer = Timer;

    fn on_start(&mut self, ctx: &mut Ctx<Timer>) {
        // PURGE connections: a quarter of the descriptors kept for upstream use (SPEC 3.8).
        self.purge_links.set_budget(ctx.upstream_reserve() / 4);
        // Probe everyone at once, so capabilities are known early; poll metrics soon after.
        for backend in 0..self.core.backends.len() {
            ctx.schedule(ctx.now(), Timer::Probe(backend, 0));
            ctx.schedule(ctx.now() + self.core.config.health_timeout, Timer::PollMetrics(backend, 0));
        }
        self.start_membership(ctx);
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
            Op::Get(key) => self.get(ctx, client, &key, id),
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
            Timer::Probe(backend, generation) => self.on_probe_timer(ctx, backend, generation),
            Timer::PollMetrics(backend, generation) => self.on_poll_timer(ctx, backend, generation),
            Timer::AttemptDeadlines => self.on_attempt_deadlines(ctx),
            Timer::Exchange(index) => self.finish_exchange(ctx, index, None),
            Timer::Resolve => self.on_resolve_timer(ctx),
            Timer::PurgeDeadline(conn) => self.on_purge_deadline(ctx, conn),
        }
    }

    fn on_peer_line(&mut self, ctx: &mut Ctx<Timer>, peer: PeerId, line: PeerLine<'_>) {
        if let Some(conn) = self.links.conn_of(peer) {
            self.on_link_line(ctx, conn, line);
        } else if let Some((index, heard)) = self.exchanges.heard(peer, &line) {
            self.finish_exchange(ctx, index, heard);
        } else {
            self.on_purge_line(ctx, peer, &line);
        }
    }

    fn on_peer_closed(&mut self, ctx: &mut Ctx<Timer>, peer: PeerId, closed: PeerClosed) {
        if let Some((conn, link)) = self.links.ended(peer) {
            self.on_link_closed(ctx, conn, link.backend, &closed);
        } else if let Some(index) = self.exchanges.index_of(peer) {
            self.finish_exchange(ctx, index, None);
        } else {
            self.on_purge_closed(ctx, peer, &closed);
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
        if let Some(response) = self.admin_proxies(request) {
            return Some(response);
        }
        let metrics = crate::dashboard::wants_metrics(request).then(|| common::admin::metrics_value(self, ctx));
        crate::dashboard::route(request, &mut self.history, metrics)
    }

    fn on_admin_tick(&mut self, ctx: &mut Ctx<Timer>) {
        let metrics = common::admin::metrics_value(self, ctx);
        self.history.sample(ctx.now(), crate::dashboard::wall_ms(), &metrics, &self.core.latency_us);
    }

    fn outstanding(&self) -> Vec<(String, usize)> {
        self.core.outstanding()
    }

    fn on_room(&mut self, ctx: &mut Ctx<Timer>, client: ClientId) {
        self.resume(ctx, client);
    }

    fn on_turn_end(&mut self, ctx: &mut Ctx<Timer>) {
        // Parked GETs whose window reopened go on; those of clients gone stop counting.
        while let Some(parked) = self.core.windows.take_orphan() {
            self.core.drop_parked(ctx, parked);
        }
        while let Some(client) = self.core.windows.next_resumable() {
            self.resume(ctx, client);
        }
        // Proxies just marked down: their GETs in flight go elsewhere now.
        while let Some(backend) = self.core.went_down.pop() {
            for conn in self.links.of_backend(backend) {
                self.lose(ctx, conn, Failure::ProxyDown);
            }
        }
        self.sweep_leaving(ctx);
    }

    fn on_reload(&mut self, ctx: &mut Ctx<Timer>) {
        self.reload(ctx);
    }

    fn on_wake(&mut self, ctx: &mut Ctx<Timer>) {
        self.on_resolver_wake(ctx);
    }
}
