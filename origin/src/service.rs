//! The origin's request handling on the shared event loop: GETs answered from the store,
//! now or after `--latency-ms` through a loop timer; METRICS and HEALTH answered at once.
//!
//! A delayed GET is read from the store only when its connection has room for the answer
//! (SPEC 3.8): a client that pipelines a thousand GETs of a big file and never reads holds
//! about one answer, not a thousand, while the rest wait as small records (a pull).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use common::metrics::{CommonMetrics, LatencyHistogram, LatencySummary};
use common::protocol::{parse_request, Data, Id, Op, Reply, Status};
use common::server::{ClientId, Ctx, Service, Ticket};
use serde::Serialize;

use crate::store::{Lookup, Store};

/// A GET waiting out the simulated latency. The key and id are owned copies: the request
/// line is gone by the time the timer fires.
pub struct Delayed {
    ticket: Ticket,
    key: Box<str>,
    id: Option<Box<str>>,
    received: Instant,
}

#[derive(Default, Debug, Clone, Copy)]
struct Counters {
    ok: u64,
    not_found: u64,
    errors: u64,
}

pub struct Origin {
    store: Store,
    latency: Duration,
    counters: Counters,
    latency_us: LatencyHistogram,
    delayed: usize,
    /// Delayed GETs whose time has come, waiting for room in their connection's output.
    parked: HashMap<ClientId, VecDeque<Delayed>>,
    /// Reused for every value so that serving one allocates nothing in steady state.
    value_buf: Vec<u8>,
}

#[derive(Serialize)]
struct MetricsData<'a> {
    #[serde(flatten)]
    common: CommonMetrics,
    ok: u64,
    not_found: u64,
    errors: u64,
    /// GETs waiting out `--latency-ms` now.
    pending: usize,
    /// GETs whose latency has passed, waiting for room in their connection's output.
    waiting_for_room: usize,
    latency_ms: u64,
    data_dir: &'a str,
    latency_us: LatencySummary,
}

impl Origin {
    pub fn new(store: Store, latency: Duration) -> Self {
        Origin {
            store,
            latency,
            counters: Counters::default(),
            latency_us: LatencyHistogram::new(),
            delayed: 0,
            parked: HashMap::new(),
            value_buf: Vec::new(),
        }
    }

    /// Looks `key` up and appends the whole answer to `out`, counting it.
    fn answer_get(&mut self, key: &str, id: Option<Id<'_>>, received: Instant, out: &mut Vec<u8>) {
        self.value_buf.clear();
        let reply = match self.store.lookup(key, &mut self.value_buf) {
            Lookup::Found => {
                self.counters.ok += 1;
                Reply::ok(&self.value_buf).id(id).encode(out);
                return self.latency_us.record(received.elapsed());
            }
            Lookup::NotFound => {
                self.counters.not_found += 1;
                Reply::new(Status::NotFound, Data::Null)
            }
            Lookup::Error(message) => {
                self.counters.errors += 1;
                return Reply::error(Status::OriginError, &message).id(id).encode(out);
            }
        };
        reply.id(id).encode(out);
        self.latency_us.record(received.elapsed());
    }

    fn answer_delayed(&mut self, ctx: &mut Ctx<Delayed>, delayed: Delayed) {
        let id = delayed.id.as_deref().and_then(Id::from_raw_json);
        ctx.complete(delayed.ticket, |out| self.answer_get(&delayed.key, id, delayed.received, out));
    }

    fn metrics<T>(&self, ctx: &Ctx<T>) -> MetricsData<'_> {
        MetricsData {
            common: ctx.common_metrics("origin"),
            ok: self.counters.ok,
            not_found: self.counters.not_found,
            errors: self.counters.errors,
            pending: self.delayed,
            waiting_for_room: self.parked.values().map(VecDeque::len).sum(),
            latency_ms: u64::try_from(self.latency.as_millis()).unwrap_or(u64::MAX),
            data_dir: self.store.data_dir().to_str().unwrap_or("?"),
            latency_us: self.latency_us.summary(),
        }
    }
}

impl Service for Origin {
    type Timer = Delayed;

    fn outstanding(&self) -> Vec<(String, usize)> {
        let parked = self.parked.values().map(VecDeque::len).sum();
        vec![("GETs waiting out the latency".into(), self.delayed), ("GETs waiting for room".into(), parked)]
    }

    fn on_line(&mut self, ctx: &mut Ctx<Delayed>, client: ClientId, line: &[u8]) {
        let now = ctx.now();
        let request = match parse_request(line) {
            Ok(request) => request,
            Err(e) => {
                if e.is_get() {
                    self.counters.errors += 1;
                }
                return ctx.reply_error(client, &e);
            }
        };
        let id = request.id;
        let ordered = id.is_none();
        match request.op {
            Op::Get(key) if self.latency.is_zero() => {
                ctx.reply(client, ordered, |out| self.answer_get(key.as_str(), id, now, out));
            }
            Op::Get(key) => {
                let ticket = ctx.defer(client, ordered);
                let delayed =
                    Delayed { ticket, key: key.as_str().into(), id: id.map(|id| id.as_json().into()), received: now };
                ctx.schedule(now + self.latency, delayed);
                self.delayed += 1;
            }
            Op::Metrics => {
                let data = self.metrics(ctx);
                ctx.reply_value(client, id, &data);
            }
            Op::Health => ctx.reply_health(client, id, "origin"),
            Op::Purge(_) => ctx.reply(client, ordered, |out| {
                Reply::error(Status::WrongMethod, "the origin does not cache; PURGE a proxy or the balancer")
                    .id(id)
                    .encode(out)
            }),
        }
    }

    // SPEC 6: the admin listener's /metrics reads the same METRICS data.
    fn metrics_json(&self, ctx: &Ctx<Delayed>) -> serde_json::Value {
        serde_json::to_value(self.metrics(ctx)).unwrap_or_default()
    }

    fn latency_histogram(&self) -> Option<&LatencyHistogram> {
        Some(&self.latency_us)
    }

    fn on_timer(&mut self, ctx: &mut Ctx<Delayed>, delayed: Delayed) {
        self.delayed -= 1;
        let client = delayed.ticket.client();
        if let Some(queue) = self.parked.get_mut(&client) {
            // Behind others already waiting for room: keep their order.
            return queue.push_back(delayed);
        }
        if ctx.may_forward(client) {
            return self.answer_delayed(ctx, delayed);
        }
        self.parked.entry(client).or_default().push_back(delayed);
        ctx.notify_room(client);
    }

    fn on_room(&mut self, ctx: &mut Ctx<Delayed>, client: ClientId) {
        let Some(mut queue) = self.parked.remove(&client) else { return };
        if !ctx.is_connected(client) {
            return;
        }
        // `may_forward`: also when all that is counted waits behind this very answer.
        while ctx.may_forward(client) {
            let Some(delayed) = queue.pop_front() else { return };
            self.answer_delayed(ctx, delayed);
        }
        if !queue.is_empty() {
            self.parked.insert(client, queue);
            ctx.notify_room(client);
        }
    }
}
