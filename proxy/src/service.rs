//! The proxy's request handling on the shared event loop.
//!
//! A GET is answered from the cache when it can be (copying a small stored value into the
//! client's output, sharing a big one by reference, SPEC 3.8); otherwise it waits on an origin fetch, shared with every other request
//! for the same key. Fetches run on the loop without blocking, so hits and other clients are
//! served while the origin is slow.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use common::framing::SharedBytes;
use common::metrics::{ratio, CommonMetrics, LatencyHistogram, LatencySummary};
use common::outbuf::SHARE_MIN;
use common::peer::{PeerClosed, PeerId, PeerLine};
use common::protocol::{parse_request, Data, Id, Op, Reply, Status};
use common::server::{ClientId, Ctx, Service, Ticket};
use common::window::Windows;
use log::debug;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::cache::{Cache, Cached};
use crate::fetch::{FetchId, Fetches, Joined};
use crate::origin_pool::{ConnEvent, Failure, OriginPool};
use crate::ProxyConfig;

/// Entries the sweep may remove per tick; if it removes that many it runs again at once
/// (next loop turn) instead of waiting a whole interval, so no tick is long.
const SWEEP_BUDGET: usize = 10_000;

/// A request waiting on a fetch.
pub struct Waiter {
    ticket: Ticket,
    id: Option<Box<str>>,
    received: Instant,
}

/// A miss that waits for its connection's forwarding window before its fetch (SPEC 3.8).
struct Parked {
    key: Box<str>,
    waiter: Waiter,
}

pub enum Timer {
    Sweep,
    FetchTimeout(FetchId),
}

#[derive(Default, Debug, Clone, Copy)]
struct Counters {
    hits: u64,
    misses: u64,
    origin_fetches: u64,
    origin_errors: u64,
    coalesced: u64,
    stale_served: u64,
    overloaded: u64,
}

/// How a fetch ended.
enum Outcome<'a> {
    /// OK, with the encoded `data`.
    Value(&'a [u8]),
    NotFound,
    /// ORIGIN_ERROR, with the origin's `data` as encoded JSON.
    OriginError(&'a [u8]),
    /// The origin could not give an answer.
    Failure(Cow<'a, str>),
}

/// Everything but the origin connections, so that an answer line borrowed from the pool can
/// be handed to it.
struct Core {
    cache: Cache,
    fetches: Fetches<Waiter>,
    counters: Counters,
    latency_us: LatencyHistogram,
    node: u16,
    origin_timeout: Duration,
    sweep_interval: Duration,
    /// Where the head and tail around a shared value are encoded.
    scratch: Vec<u8>,
    /// Each client connection's forwarding window: a miss joins a fetch only while the
    /// answers its client awaits fit in its output bound; the others are parked here.
    windows: Windows<Parked>,
}

pub struct Proxy {
    core: Core,
    pool: OriginPool,
}

impl Proxy {
    pub fn new(config: &ProxyConfig, node: u16, now: Instant) -> Self {
        Proxy {
            core: Core {
                cache: Cache::new(config.cache.clone(), now),
                fetches: Fetches::new(config.origin_max_inflight, config.max_pending),
                counters: Counters::default(),
                latency_us: LatencyHistogram::new(),
                node,
                origin_timeout: config.origin_timeout,
                sweep_interval: config.sweep_interval,
                scratch: Vec::new(),
                windows: Windows::new(config.server.output_limit),
            },
            pool: OriginPool::new(config.origin, config.origin_max_inflight),
        }
    }

    fn get(&mut self, ctx: &mut Ctx<Timer>, client: ClientId, key: &str, id: Option<Id<'_>>) {
        let now = ctx.now();
        let core = &mut self.core;
        if let Some(cached) = core.cache.get(key, now) {
            core.counters.hits += 1;
            let node = core.node;
            if cached.value.len() < SHARE_MIN {
                ctx.reply(client, id.is_none(), |out| encode_cached(out, cached, id, node, false));
            } else {
                let head = encode_around(&mut core.scratch, cached_reply(cached, id, node, false));
                let (head, tail) = core.scratch.split_at(head);
                ctx.reply_shared(client, id.is_none(), head, cached.value, tail);
            }
            core.latency_us.record(now.elapsed());
            return;
        }
        let ticket = ctx.defer(client, id.is_none());
        let waiter = Waiter { ticket, id: id.map(|id| id.as_json().into()), received: now };
        if !core.windows.try_forward(client, ctx.has_room(client)) {
            // Its client's answers so far fill its output bound: the fetch waits (SPEC 3.8).
            if !core.fetches.may_wait() {
                return core.overloaded(ctx, waiter);
            }
            core.windows.park(client, Parked { key: key.into(), waiter });
            core.fetches.set_parked(core.windows.parked());
            if !ctx.has_room(client) {
                ctx.notify_room(client);
            }
            return;
        }
        self.miss(ctx, key, waiter);
    }

    /// A miss whose window is open: it joins (or starts) the fetch of `key`.
    fn miss(&mut self, ctx: &mut Ctx<Timer>, key: &str, waiter: Waiter) {
        let core = &mut self.core;
        core.counters.misses += 1;
        core.fetches.set_parked(core.windows.parked());
        match core.fetches.join(key, waiter) {
            Ok(Joined::Start(fetch)) => {
                self.arm_timeout(ctx, fetch);
                self.start(ctx, fetch);
            }
            Ok(Joined::Queued(fetch)) => self.arm_timeout(ctx, fetch),
            Ok(Joined::Coalesced(_)) => core.counters.coalesced += 1,
            Err(waiter) => {
                core.windows.answered(waiter.ticket.client(), 0);
                core.overloaded(ctx, waiter);
            }
        }
    }

    /// Serves the parked misses of `client` its window has room for now: from the cache if
    /// the value came meanwhile, else by a fetch. Dropped when the client has gone.
    fn resume(&mut self, ctx: &mut Ctx<Timer>, client: ClientId) {
        if !ctx.is_connected(client) {
            for parked in self.core.windows.take_parked(client) {
                ctx.complete(parked.waiter.ticket, |_| {});
            }
            return self.core.fetches.set_parked(self.core.windows.parked());
        }
        while let Some(Parked { key, waiter }) = self.core.windows.unpark(client, ctx.may_forward(client)) {
            if !self.core.answer_from_cache(ctx, &key, &waiter) {
                self.miss(ctx, &key, waiter);
            }
        }
        self.core.fetches.set_parked(self.core.windows.parked());
        if self.core.windows.has_parked(client) && !ctx.may_forward(client) {
            ctx.notify_room(client);
        }
    }

    /// The origin timeout runs from the moment a fetch exists, queued or not: no request
    /// waits on the origin longer than `--origin-timeout-ms`.
    fn arm_timeout(&mut self, ctx: &mut Ctx<Timer>, fetch: FetchId) {
        let timer = ctx.schedule(ctx.now() + self.core.origin_timeout, Timer::FetchTimeout(fetch));
        if let Some(f) = self.core.fetches.get_mut(fetch) {
            f.timer = Some(timer);
        }
    }

    /// Sends a running fetch to the origin.
    fn start(&mut self, ctx: &mut Ctx<Timer>, fetch: FetchId) {
        let Some(f) = self.core.fetches.get(fetch) else { return };
        let fresh = f.retried;
        if !fresh {
            self.core.counters.origin_fetches += 1;
        }
        let conn = self.pool.send(ctx, fetch, &f.key, fresh);
        if let Some(f) = self.core.fetches.get_mut(fetch) {
            f.conn = Some(conn);
        }
    }

    /// Ends a fetch and starts queued ones in the freed slots.
    fn finish(&mut self, ctx: &mut Ctx<Timer>, fetch: FetchId, outcome: Outcome<'_>) {
        self.core.finish(ctx, fetch, outcome);
        self.core.fetches.set_parked(self.core.windows.parked());
        self.start_queued(ctx);
    }

    fn start_queued(&mut self, ctx: &mut Ctx<Timer>) {
        while let Some(next) = self.core.fetches.start_next() {
            self.start(ctx, next);
        }
    }

    fn on_origin_line(&mut self, ctx: &mut Ctx<Timer>, conn: PeerId, line: &[u8]) {
        let event = self.pool.on_line(ctx, conn);
        if let ConnEvent::Answer { fetch } = event {
            self.core.finish(ctx, fetch, classify(line));
            self.pool.answered(ctx, conn);
            self.start_queued(ctx);
        }
    }

    fn on_origin_closed(&mut self, ctx: &mut Ctx<Timer>, conn: PeerId, closed: PeerClosed) {
        match self.pool.on_closed(conn, closed) {
            ConnEvent::Nothing | ConnEvent::Answer { .. } => {}
            ConnEvent::Failed { fetch, failure: Failure::StaleConnection } => {
                // Once, on a new connection: the origin had closed the idle one.
                match self.core.fetches.get_mut(fetch) {
                    Some(f) if !f.retried => {
                        f.retried = true;
                        f.conn = None;
                        self.start(ctx, fetch);
                    }
                    _ => self.finish(ctx, fetch, Outcome::Failure(Failure::StaleConnection.describe().into())),
                }
            }
            ConnEvent::Failed { fetch, failure } => {
                self.finish(ctx, fetch, Outcome::Failure(failure.describe().into()));
            }
        }
    }

    fn on_fetch_timeout(&mut self, ctx: &mut Ctx<Timer>, fetch: FetchId) {
        let Some(f) = self.core.fetches.get_mut(fetch) else { return };
        // The timer has fired: nothing to cancel later.
        f.timer = None;
        if let Some(conn) = f.conn.take() {
            // A late answer on this connection would belong to nobody: close it.
            self.pool.close(ctx, conn);
        }
        let reason = format!("origin did not answer within {} ms", self.core.origin_timeout.as_millis());
        self.finish(ctx, fetch, Outcome::Failure(reason.into()));
    }

    fn metrics<T>(&self, ctx: &Ctx<T>) -> MetricsData {
        let core = &self.core;
        let c = core.counters;
        let stats = core.cache.stats();
        let config = core.cache.config();
        MetricsData {
            common: ctx.common_metrics("proxy"),
            node: core.node,
            hits: c.hits,
            misses: c.misses,
            hit_rate: ratio(c.hits, c.misses),
            origin_fetches: c.origin_fetches,
            origin_errors: c.origin_errors,
            coalesced: c.coalesced,
            stale_served: c.stale_served,
            overloaded: c.overloaded,
            cache_type: config.policy.name(),
            entries: stats.entries,
            capacity: config.capacity,
            bytes: stats.bytes,
            max_bytes: config.max_bytes,
            evictions: stats.evictions,
            expirations: stats.expirations,
            purges: stats.purges,
            fetches_running: core.fetches.running(),
            fetches_queued: core.fetches.queued(),
            waiting_on_origin: core.fetches.waiting(),
            waiting_for_room: core.windows.parked(),
            origin: self.pool.addr().to_string(),
            origin_connections: self.pool.open(),
            origin_connects: self.pool.connects(),
            latency_us: core.latency_us.summary(),
        }
    }
}

impl Core {
    fn overloaded(&mut self, ctx: &mut Ctx<Timer>, waiter: Waiter) {
        self.counters.overloaded += 1;
        let id = waiter.id.as_deref().and_then(Id::from_raw_json);
        ctx.complete(waiter.ticket, |out| {
            Reply::error(Status::Overloaded, "too many requests waiting on the origin").id(id).encode(out)
        });
    }

    /// Answers a resumed miss from the cache, if the value is there now.
    fn answer_from_cache(&mut self, ctx: &mut Ctx<Timer>, key: &str, waiter: &Waiter) -> bool {
        let Some(cached) = self.cache.get(key, ctx.now()) else { return false };
        self.counters.hits += 1;
        let (node, id) = (self.node, waiter.id.as_deref().and_then(Id::from_raw_json));
        let bytes = cached.value.len();
        if bytes < SHARE_MIN {
            ctx.complete(waiter.ticket, |out| encode_cached(out, cached, id, node, false));
        } else {
            let head = encode_around(&mut self.scratch, cached_reply(cached, id, node, false));
            let (head, tail) = self.scratch.split_at(head);
            ctx.complete_shared(waiter.ticket, head, cached.value, tail);
        }
        self.windows.answered(waiter.ticket.client(), bytes);
        self.latency_us.record(waiter.received.elapsed());
        true
    }

    /// Answers every waiter of `fetch` with its outcome, caching it when it may be cached.
    fn finish(&mut self, ctx: &mut Ctx<Timer>, fetch: FetchId, outcome: Outcome<'_>) {
        let Some(f) = self.fetches.finish(fetch) else { return };
        if let Some(timer) = f.timer {
            ctx.cancel(timer);
        }
        let now = ctx.now();
        let key: &str = &f.key;
        // One copy of a fetched value, shared by the cache and every waiter's answer.
        let shared = match &outcome {
            Outcome::Value(value) => Some(SharedBytes::from(*value)),
            _ => None,
        };
        match (&outcome, &shared) {
            (Outcome::Value(_), Some(value)) if !f.purged => {
                self.cache.insert_shared(key, value.clone(), false, now);
            }
            // An entry stored before the key went away must not come back stale later.
            (Outcome::NotFound, _) if f.purged || !self.cache.insert(key, b"", true, now) => self.cache.forget(key),
            (Outcome::OriginError(_) | Outcome::Failure(_), _) => self.counters.origin_errors += 1,
            _ => {}
        }
        let stale = match &outcome {
            Outcome::Failure(_) => self.cache.get_stale(key, now),
            _ => None,
        };
        if let (Some(_), Outcome::Failure(reason)) = (&stale, &outcome) {
            debug!("serving {key} stale: {reason}");
            self.counters.stale_served += f.waiters.len() as u64;
        }
        let node = self.node;
        // A big value goes to every waiter by reference: coalesced answers cost it once.
        let big = match (&shared, stale) {
            (_, Some(cached)) if cached.value.len() >= SHARE_MIN => Some((cached.value, true, cached.negative)),
            (Some(value), None) if value.len() >= SHARE_MIN => Some((value, false, false)),
            _ => None,
        };
        let bytes = match (&outcome, stale) {
            (_, Some(cached)) => cached.value.len(),
            (Outcome::Value(value), _) => value.len(),
            _ => 0,
        };
        // The client the value last went to: its next coalesced answers share those bytes.
        let mut holder = None;
        for waiter in f.waiters {
            let client = waiter.ticket.client();
            let holds = holder == Some(client);
            if big.is_some_and(|(_, stale, _)| !stale) && !holds && !ctx.may_take(&waiter.ticket) {
                // Its window guessed too small (tiny answers, then huge ones pipelined): this
                // answer would sit on top of a full output and pin the value, cached or not.
                // It is answered once the client drains, from the cache or a fetch (counted
                // then, as a hit or a miss), so a connection pins about its output limit plus
                // one answer (SPEC 3.8).
                self.counters.misses = self.counters.misses.saturating_sub(1);
                let parked = Parked { key: key.into(), waiter };
                self.windows.refetch(client, bytes, parked, |a, b| {
                    common::window::due_before(a.waiter.ticket.order(), b.waiter.ticket.order())
                });
                ctx.notify_room(client);
                continue;
            }
            self.windows.answered(waiter.ticket.client(), bytes);
            let id = waiter.id.as_deref().and_then(Id::from_raw_json);
            if let Some((value, stale, negative)) = big {
                let reply = if stale {
                    cached_reply(Cached { value, negative }, id, node, true)
                } else {
                    fetched_reply(Status::Ok, Data::Json(b""), id, node)
                };
                let head = encode_around(&mut self.scratch, reply);
                let (head, tail) = self.scratch.split_at(head);
                ctx.complete_shared(waiter.ticket, head, value, tail);
                self.latency_us.record(waiter.received.elapsed());
                holder = Some(client);
                continue;
            }
            ctx.complete(waiter.ticket, |out| match (&outcome, stale) {
                (_, Some(cached)) => encode_cached(out, cached, id, node, true),
                (Outcome::Value(value), _) => encode_fetched(out, Status::Ok, Data::Json(value), id, node),
                (Outcome::NotFound, _) => encode_fetched(out, Status::NotFound, Data::Null, id, node),
                (Outcome::OriginError(data), _) => encode_fetched(out, Status::OriginError, Data::Json(data), id, node),
                (Outcome::Failure(reason), _) => {
                    encode_fetched(out, Status::OriginFailure, Data::Message(reason), id, node)
                }
            });
            self.latency_us.record(waiter.received.elapsed());
        }
    }
}

/// A cache hit (or a stale answer): OK with the stored bytes, or a cached NOT_FOUND.
fn cached_reply<'a>(cached: Cached<'a>, id: Option<Id<'a>>, node: u16, stale: bool) -> Reply<'a> {
    let mut reply = if cached.negative { Reply::new(Status::NotFound, Data::Null) } else { Reply::ok(cached.value) };
    reply.id = id;
    reply.cache_hit = Some(true);
    reply.node = Some(node);
    reply.stale = stale;
    reply
}

fn encode_cached(out: &mut Vec<u8>, cached: Cached<'_>, id: Option<Id<'_>>, node: u16, stale: bool) {
    cached_reply(cached, id, node, stale).encode(out);
}

fn fetched_reply<'a>(status: Status, data: Data<'a>, id: Option<Id<'a>>, node: u16) -> Reply<'a> {
    let mut reply = Reply::new(status, data);
    reply.id = id;
    reply.cache_hit = Some(false);
    reply.node = Some(node);
    reply
}

fn encode_fetched(out: &mut Vec<u8>, status: Status, data: Data<'_>, id: Option<Id<'_>>, node: u16) {
    fetched_reply(status, data, id, node).encode(out);
}

/// Encodes an OK `reply` without its data into `scratch` and returns where the data would go:
/// the head and tail that surround a shared value.
fn encode_around(scratch: &mut Vec<u8>, mut reply: Reply<'_>) -> usize {
    const HEAD: &[u8] = b"{\"status\":\"OK\",\"data\":";
    reply.data = Data::Json(b"");
    scratch.clear();
    reply.encode(scratch);
    debug_assert!(scratch.starts_with(HEAD));
    HEAD.len().min(scratch.len())
}

#[derive(Deserialize)]
struct OriginAnswer<'a> {
    #[serde(borrow)]
    status: Cow<'a, str>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

/// Reads an origin answer line. Only `OK` (with data), `NOT_FOUND` and `ORIGIN_ERROR` are
/// answers; anything else is the origin failing.
fn classify(line: &[u8]) -> Outcome<'_> {
    let Ok(answer) = serde_json::from_slice::<OriginAnswer>(line) else {
        let shown = String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned();
        return Outcome::Failure(format!("origin answered garbage: {shown:?}").into());
    };
    match (answer.status.as_ref(), answer.data) {
        ("OK", Some(data)) => Outcome::Value(data.get().as_bytes()),
        ("OK", None) => Outcome::Failure("origin answered OK without data".into()),
        ("NOT_FOUND", _) => Outcome::NotFound,
        ("ORIGIN_ERROR", data) => Outcome::OriginError(data.map_or(&b"null"[..], |d| d.get().as_bytes())),
        // Shown by characters, not bytes: a status is any text (SPEC 3.8).
        (other, _) => {
            let shown: String = other.chars().take(40).collect();
            Outcome::Failure(format!("origin answered {shown:?}").into())
        }
    }
}

#[derive(Serialize)]
struct MetricsData {
    #[serde(flatten)]
    common: CommonMetrics,
    node: u16,
    hits: u64,
    misses: u64,
    hit_rate: f64,
    origin_fetches: u64,
    origin_errors: u64,
    coalesced: u64,
    stale_served: u64,
    overloaded: u64,
    cache_type: &'static str,
    entries: usize,
    capacity: usize,
    bytes: u64,
    max_bytes: Option<u64>,
    evictions: u64,
    expirations: u64,
    purges: u64,
    fetches_running: usize,
    fetches_queued: usize,
    waiting_on_origin: usize,
    /// Misses parked for their connection's forwarding window (SPEC 3.8).
    waiting_for_room: usize,
    origin: String,
    origin_connections: usize,
    origin_connects: u64,
    latency_us: LatencySummary,
}

#[derive(Serialize)]
struct PurgeData {
    purged: bool,
}

impl Service for Proxy {
    type Timer = Timer;

    fn on_start(&mut self, ctx: &mut Ctx<Timer>) {
        ctx.schedule(ctx.now() + self.core.sweep_interval, Timer::Sweep);
    }

    fn on_line(&mut self, ctx: &mut Ctx<Timer>, client: ClientId, line: &[u8]) {
        let request = match parse_request(line) {
            Ok(request) => request,
            Err(e) => return ctx.reply_error(client, &e),
        };
        let id = request.id;
        match request.op {
            Op::Get(key) => self.get(ctx, client, key.as_str(), id),
            Op::Purge(key) => {
                let purged = self.core.cache.purge(key.as_str());
                self.core.fetches.purge(key.as_str());
                ctx.reply_value(client, id, &PurgeData { purged });
            }
            Op::Metrics => {
                let data = self.metrics(ctx);
                ctx.reply_value(client, id, &data);
            }
            Op::Health => ctx.reply_health(client, id, "proxy"),
        }
    }

    fn on_timer(&mut self, ctx: &mut Ctx<Timer>, timer: Timer) {
        match timer {
            Timer::Sweep => {
                let removed = self.core.cache.sweep(ctx.now(), SWEEP_BUDGET);
                let next = if removed == SWEEP_BUDGET { Duration::ZERO } else { self.core.sweep_interval };
                ctx.schedule(ctx.now() + next, Timer::Sweep);
            }
            Timer::FetchTimeout(fetch) => self.on_fetch_timeout(ctx, fetch),
        }
    }

    // SPEC 6: the admin listener's /metrics reads the same METRICS data.
    fn metrics_json(&self, ctx: &Ctx<Timer>) -> serde_json::Value {
        serde_json::to_value(self.metrics(ctx)).unwrap_or_default()
    }

    fn latency_histogram(&self) -> Option<&LatencyHistogram> {
        Some(&self.core.latency_us)
    }

    fn on_peer_line(&mut self, ctx: &mut Ctx<Timer>, peer: PeerId, line: PeerLine<'_>) {
        self.on_origin_line(ctx, peer, line.bytes());
    }

    fn on_peer_closed(&mut self, ctx: &mut Ctx<Timer>, peer: PeerId, closed: PeerClosed) {
        self.on_origin_closed(ctx, peer, closed);
    }

    fn on_room(&mut self, ctx: &mut Ctx<Timer>, client: ClientId) {
        self.resume(ctx, client);
    }

    fn outstanding(&self) -> Vec<(String, usize)> {
        let fetches = &self.core.fetches;
        vec![
            ("origin fetches running".into(), fetches.running()),
            ("origin fetches queued".into(), fetches.queued()),
            ("GETs waiting on the origin".into(), fetches.waiting()),
            ("GETs parked for their window".into(), self.core.windows.parked()),
        ]
    }

    fn on_turn_end(&mut self, ctx: &mut Ctx<Timer>) {
        // Parked misses whose window reopened go on; those of clients gone stop counting.
        while let Some(parked) = self.core.windows.take_orphan() {
            ctx.complete(parked.waiter.ticket, |_| {});
        }
        while let Some(client) = self.core.windows.next_resumable() {
            self.resume(ctx, client);
        }
        self.core.fetches.set_parked(self.core.windows.parked());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_answers_are_classified() {
        assert!(matches!(classify(br#"{"status":"OK","data":{"a":[1, 2]}}"#), Outcome::Value(b"{\"a\":[1, 2]}")));
        assert!(matches!(classify(br#"{"status":"NOT_FOUND","data":null}"#), Outcome::NotFound));
        assert!(matches!(
            classify(br#"{"status":"ORIGIN_ERROR","data":"bad file"}"#),
            Outcome::OriginError(b"\"bad file\"")
        ));
        for garbage in [
            &b"hello"[..],
            b"{\"status\":\"OK\"}",
            b"{\"status\":\"BAD_REQUEST\",\"data\":null}",
            b"{\"data\":1}",
            b"\xff",
        ] {
            assert!(matches!(classify(garbage), Outcome::Failure(_)), "{:?}", String::from_utf8_lossy(garbage));
        }
    }
}
