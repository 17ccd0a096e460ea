//! The GETs in flight and what answers their clients: the requests (with their collapsed
//! followers), the attempt book, the collapser, the PURGE fan-outs and the counters. It
//! answers clients through `Ctx` but owns no socket, so an answer line borrowed from a
//! connection can be relayed through it.

use common::framing::SharedBytes;
use common::metrics::LatencyHistogram;
use common::protocol::{encode_ok_value, write_answer_tail, Id, KeyBuf, Reply, Status};
use common::server::{Ctx, Ticket};
use common::window::Windows;
use log::{info, warn};
use slab::Slab;

use crate::attempts::{Attempt, AttemptBook};
use crate::backend::Backend;
use crate::collapse::Collapser;
use crate::failure::Failure;
use crate::health::Transition;
use crate::metrics::Counters;
use crate::pool::ConnKind;
use crate::purge::{Job, Outcome, Purges};
use crate::relay::{read_answer, Line};
use crate::request::{Request, Waiter};
use crate::service::Timer;
use crate::strategy::{Candidate, Router};
use crate::BalancerConfig;

const MAX_SPARE_STRINGS: usize = 4096;

/// A GET that waits for its client's forwarding window (SPEC 3.8) before it is routed.
pub struct Parked {
    pub waiter: Waiter<Ticket>,
    pub key: KeyBuf,
}

fn due_before(a: &Parked, b: &Parked) -> bool {
    common::window::due_before(a.waiter.ticket.order(), b.waiter.ticket.order())
}

pub struct InFlight {
    pub config: BalancerConfig,
    pub backends: Vec<Backend>,
    pub router: Router,
    pub candidates: Vec<Candidate>,
    /// The slot of each candidate (only routable slots are candidates).
    pub slots: Vec<usize>,
    pub requests: Slab<Request<Ticket>>,
    pub book: AttemptBook,
    pub deadline_armed: bool,
    pub collapser: Collapser,
    pub purges: Purges<Ticket>,
    /// Proxies just marked down whose connections are closed at the end of the turn (their
    /// GETs then go elsewhere at once).
    pub went_down: Vec<usize>,
    pub counters: Counters,
    pub latency_us: LatencyHistogram,
    /// Spare strings for keys and ids, so that routing a GET allocates nothing.
    pub spare: Vec<String>,
    /// Reused for the tail of each shared answer.
    pub tail: Vec<u8>,
    /// Client GETs accepted and not yet answered (leaders, followers, parked): `--max-pending`.
    pub waiting: usize,
    /// Each client connection's forwarding window: a GET is routed only while its client's
    /// answers so far fit in its output bound; the others are parked here (SPEC 3.8).
    pub windows: Windows<Parked>,
}

impl InFlight {
    pub fn new(config: BalancerConfig) -> Self {
        InFlight {
            router: Router::new(config.strategy),
            backends: config.proxies.iter().map(|m| Backend::new(m.addr, m.name.clone(), 0, &config)).collect(),
            candidates: Vec::new(),
            slots: Vec::new(),
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
            windows: Windows::new(config.server.output_limit),
            config,
        }
    }

    pub fn pooled(&mut self, text: &str) -> String {
        let mut s = self.spare.pop().unwrap_or_default();
        s.clear();
        s.push_str(text);
        s
    }

    pub fn recycle(&mut self, s: String) {
        if self.spare.len() < MAX_SPARE_STRINGS && s.capacity() <= 512 {
            self.spare.push(s);
        }
    }

    /// A request is answered (`bytes`: its answer's size, 0 for an error): it leaves the
    /// collapser, the count, its clients' windows and the string pool.
    pub fn forget(&mut self, index: usize, r: Request<Ticket>, bytes: usize) {
        self.collapser.finished(r.key_hash, index);
        self.waiting = self.waiting.saturating_sub(1 + r.followers.len());
        self.recycle(r.key.into_string());
        self.windows.answered(r.leader.ticket.client(), bytes);
        self.recycle(r.leader.client_id);
        for w in r.followers {
            self.windows.answered(w.ticket.client(), bytes);
            self.recycle(w.client_id);
        }
    }

    /// A parked GET whose client has gone: it stops counting.
    pub fn drop_parked(&mut self, ctx: &mut Ctx<Timer>, parked: Parked) {
        self.waiting = self.waiting.saturating_sub(1);
        ctx.complete(parked.waiter.ticket, |_| {});
        self.recycle(parked.key.into_string());
        self.recycle(parked.waiter.client_id);
    }

    /// One answer line on connection `conn`: delivered to the attempt it answers, dropped if
    /// it answers none sent on this connection. Garbage fails only the attempt it names
    /// (returned, to be retried); garbage on a multiplexed connection that names none counts
    /// against the proxy, and its attempt meets its deadline. `Err`: the connection is broken
    /// (an answer on a single-request connection that owes none, or garbage on one).
    /// `shared` is the same line as bytes shared with the connection's input buffer, when it
    /// is long enough to be relayed from there instead of copied.
    pub fn on_answer(
        &mut self,
        ctx: &mut Ctx<Timer>,
        (conn, backend, kind): (usize, usize, ConnKind),
        line: &[u8],
        shared: Option<SharedBytes>,
    ) -> Result<Option<Attempt>, Failure> {
        let (tag, answer) = match read_answer(line, kind == ConnKind::Mux) {
            Line::Answer(tag, answer) => (tag, answer),
            Line::Garbage(_) if kind == ConnKind::Single => return Err(Failure::Garbage),
            Line::Garbage(tag) => match tag.and_then(|tag| self.book.answered(conn, tag)) {
                Some(attempt) => return Ok(Some(attempt)),
                None => {
                    self.note_failure(backend, Failure::Garbage);
                    return Ok(None);
                }
            },
        };
        let attempt = match tag {
            Some(tag) => match self.book.answered(conn, tag) {
                Some(attempt) => attempt,
                None => return Ok(None), // unknown, late or foreign: dropped
            },
            None => self.book.answered_in_order(conn).ok_or(Failure::Garbage)?,
        };
        let b = &mut self.backends[attempt.backend];
        b.in_flight = b.in_flight.saturating_sub(1);
        if b.health.is_healthy() {
            // An answer clears passive failures; only probes bring a down proxy back.
            b.health.record_success();
        }
        let Some(r) = self.requests.try_remove(attempt.request) else { return Ok(None) };
        let client = r.leader.ticket.client();
        if r.followers.is_empty() && line.len() > self.windows.small_answer() && !ctx.may_take(&r.leader.ticket) {
            // The window guessed too small (tiny answers, then huge ones pipelined): this
            // one would sit on top of a full output. It is asked for again once the client
            // drains, so a connection pins about its output limit plus one answer (SPEC 3.8).
            self.collapser.finished(r.key_hash, attempt.request);
            self.counters.refetched += 1;
            let parked = Parked { waiter: r.leader, key: r.key };
            self.windows.refetch(client, line.len(), parked, due_before);
            ctx.notify_room(client);
            return Ok(None);
        }
        // A long answer goes out from the buffer it was read into: only the tail with the
        // client's id is written anew (the proxy puts its id last, so nothing follows it).
        let (head, rest) = answer.body();
        let in_place = shared.and_then(|line| line.narrow(head)).filter(|_| rest.is_empty());
        if let (true, Some(body)) = (r.followers.is_empty(), &in_place) {
            self.tail.clear();
            write_answer_tail(&mut self.tail, answer.has_members(), r.leader.client_id());
            ctx.complete_shared(r.leader.ticket, b"", body, &self.tail);
        } else if r.followers.is_empty() {
            // The hit path: two copies into the client's buffer, nothing allocated.
            ctx.complete(r.leader.ticket, |out| answer.write_with_id(out, r.leader.client_id()));
        } else {
            // One body for the leader and its followers, each with its own id.
            // (In a buffer of its own: the followers' answers wait behind the leader's.)
            let body = in_place.map(|b| b.compacted()).unwrap_or_else(|| answer.shared_body());
            for w in r.waiters() {
                self.tail.clear();
                write_answer_tail(&mut self.tail, answer.has_members(), w.client_id());
                ctx.complete_shared(w.ticket, b"", &body, &self.tail);
            }
        }
        for w in r.waiters() {
            self.latency_us.record(ctx.now().saturating_duration_since(w.received));
        }
        self.forget(attempt.request, r, line.len());
        Ok(None)
    }

    /// What is held for requests not yet answered, by name: all zero once the balancer is
    /// idle (the simulator's leak check).
    pub fn outstanding(&self) -> Vec<(String, usize)> {
        vec![
            ("GETs in flight".into(), self.requests.len()),
            ("attempts awaiting an answer".into(), self.book.len()),
            ("GETs accepted and not answered".into(), self.waiting),
            ("GETs parked for their window".into(), self.windows.parked()),
            ("PURGEs running".into(), self.purges.running()),
            ("PURGEs queued".into(), self.purges.queued()),
        ]
    }

    pub fn give_up(&mut self, ctx: &mut Ctx<Timer>, index: usize) {
        let Some(r) = self.requests.try_remove(index) else { return };
        self.counters.errors += 1 + r.followers.len() as u64;
        let message = r.give_up_message();
        for w in r.waiters() {
            let id = w.client_id().and_then(Id::from_raw_json);
            ctx.complete(w.ticket, |out| Reply::error(Status::ProxyUnreachable, &message).id(id).encode(out));
            self.latency_us.record(ctx.now().saturating_duration_since(w.received));
        }
        self.forget(index, r, 0);
    }

    /// Passive health: a real request to `backend` failed.
    pub fn note_failure(&mut self, backend: usize, failure: Failure) {
        if !failure.counts_against_proxy() {
            return;
        }
        let b = &mut self.backends[backend];
        b.failures += 1;
        let transition = if failure.marks_down_at_once() { b.health.force_down() } else { b.health.record_failure() };
        self.transition(backend, transition, failure.describe());
    }

    pub fn transition(&mut self, backend: usize, transition: Option<Transition>, why: &str) {
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

    pub fn arm_deadline(&mut self, ctx: &mut Ctx<Timer>) {
        if !self.deadline_armed {
            if let Some(at) = self.book.next_deadline() {
                ctx.schedule(at, Timer::AttemptDeadlines);
                self.deadline_armed = true;
            }
        }
    }

    /// Answers a finished (or refused) PURGE.
    pub fn answer_purge(&mut self, ctx: &mut Ctx<Timer>, job: Job<Ticket>, outcome: Outcome) {
        let id = job.client_id.as_deref().and_then(Id::from_raw_json);
        #[derive(serde::Serialize)]
        struct PurgeData {
            purged: usize,
            proxies: usize,
        }
        ctx.complete(job.ticket, |out| match outcome {
            Outcome::Ok { purged, proxies } => encode_ok_value(out, id, &PurgeData { purged, proxies }),
            Outcome::Overloaded => {
                self.counters.errors += 1;
                Reply::error(Status::Overloaded, "too many PURGEs in flight").id(id).encode(out)
            }
        });
    }
}
