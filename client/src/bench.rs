//! `client bench`: a closed-loop load generator on one mio event loop (SPEC 4).
//!
//! Each connection keeps `pipeline` GETs outstanding: it sends a new one as soon as an
//! answer arrives. Latency is measured per request, from the moment the request is queued
//! for sending to the moment its answer line has been read; with a pipeline deeper than one,
//! that includes the time spent waiting behind earlier requests on the same connection, as
//! a real pipelining client would see it. Requests are sent without ids, so answers come
//! back in order and are matched first-in, first-out.

use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::framing::Frame;
use common::metrics::LatencyHistogram;
use common::random::{SplitMix64, Zipf};
use common::upstream::Upstream;
use mio::{Events, Poll, Token};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

/// Longest answer line the bench accepts.
const MAX_ANSWER: usize = 16 * 1024 * 1024 + 4096;
/// A connection that fails is reopened after this pause.
const RECONNECT_AFTER: Duration = Duration::from_millis(100);
/// A run whose answers stop coming for this long is ended rather than left hanging.
const STALL_LIMIT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, PartialEq)]
pub enum Dist {
    Uniform,
    Zipf(f64),
}

impl std::str::FromStr for Dist {
    type Err = String;

    /// `uniform`, `zipf` (exponent 0.99) or `zipf:S`.
    fn from_str(s: &str) -> Result<Dist, String> {
        match s {
            "uniform" => Ok(Dist::Uniform),
            "zipf" => Ok(Dist::Zipf(0.99)),
            _ => match s.strip_prefix("zipf:").map(str::parse::<f64>) {
                Some(Ok(exponent)) if exponent.is_finite() && exponent >= 0.0 => Ok(Dist::Zipf(exponent)),
                _ => Err(format!("'{s}' is not uniform, zipf or zipf:S (S a number >= 0)")),
            },
        }
    }
}

impl std::fmt::Display for Dist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dist::Uniform => f.write_str("uniform"),
            Dist::Zipf(s) => write!(f, "zipf:{s}"),
        }
    }
}

/// What the generator speaks: this project's line protocol, or memcached's text protocol
/// (`get KEY`), so that twemproxy over memcached is loaded by the very same generator when
/// the two are compared (scripts/bench_vs_twemproxy.sh).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Wire {
    #[default]
    Line,
    Memcache,
}

impl std::str::FromStr for Wire {
    type Err = String;

    fn from_str(s: &str) -> Result<Wire, String> {
        match s {
            "line" => Ok(Wire::Line),
            "memcache" => Ok(Wire::Memcache),
            _ => Err(format!("'{s}' is not line or memcache")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub addr: SocketAddr,
    pub connections: usize,
    /// Measure for this long (ignored when `requests` is set).
    pub duration: Duration,
    /// Measure this many requests instead of a duration.
    pub requests: Option<u64>,
    pub keys: usize,
    pub key_prefix: String,
    pub dist: Dist,
    pub pipeline: usize,
    pub warmup: Duration,
    pub seed: u64,
    /// Print a progress line on stderr every second.
    pub progress: bool,
    /// Also feed the generated key sequence to one LRU cache of this many entries (the
    /// proxies' own implementation) and report its hit ratio over the measured phase: the
    /// yardstick for a cluster's hit ratio.
    pub simulate_lru: Option<usize>,
    pub wire: Wire,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct LatencyReport {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

/// What a run measured (after the warm-up).
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub target: String,
    pub connections: usize,
    pub pipeline: usize,
    pub keys: usize,
    pub key_prefix: String,
    pub dist: String,
    pub warmup_s: f64,
    pub duration_s: f64,
    /// Answers received during the measured phase.
    pub requests: u64,
    pub throughput_rps: f64,
    pub latency_us: LatencyReport,
    /// Answers by status.
    pub statuses: BTreeMap<String, u64>,
    /// Answers whose status was not OK (NOT_FOUND included), plus requests lost to
    /// connection failures.
    pub errors: u64,
    /// Requests outstanding on a connection that failed or closed, and answers to nothing
    /// sent (the connection is then dropped and made again).
    pub connection_errors: u64,
    /// Batches of measured requests handed to a socket in one write: about `requests /
    /// pipeline` when the pipeline is kept full.
    pub request_batches: u64,
    /// Among answers that carry `cache_hit`: the fraction that were hits (null if none did).
    pub hit_ratio: Option<f64>,
    /// Answers per `node` (a proxy's port), for answers that carry one.
    pub per_node: BTreeMap<String, u64>,
    /// With `simulate_lru`: the hit ratio one LRU of that size has on the measured requests.
    pub simulated_lru: Option<SimulatedLru>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SimulatedLru {
    pub capacity: usize,
    pub hit_ratio: f64,
}

/// One LRU cache fed the same keys the bench sends, in the order it sends them.
struct LruModel {
    cache: cache::Cache,
    epoch: Instant,
    key: String,
    hits: u64,
    lookups: u64,
}

impl LruModel {
    fn new(capacity: usize) -> Self {
        let config = cache::CacheConfig {
            policy: cache::Policy::Lru,
            capacity,
            max_bytes: None,
            ttl: Duration::ZERO,
            negative_ttl: Duration::ZERO,
            stale_grace: Duration::ZERO,
        };
        let epoch = Instant::now();
        LruModel { cache: cache::Cache::new(config, epoch), epoch, key: String::new(), hits: 0, lookups: 0 }
    }

    fn access(&mut self, prefix: &str, index: usize, measured: bool) {
        self.key.clear();
        self.key.push_str(prefix);
        self.key.push_str(itoa::Buffer::new().format(index));
        let hit = self.cache.get(&self.key, self.epoch).is_some();
        if !hit {
            self.cache.insert(&self.key, b"", false, self.epoch);
        }
        if measured {
            self.lookups += 1;
            self.hits += u64::from(hit);
        }
    }
}

struct Conn {
    up: Option<Upstream>,
    sent: VecDeque<Instant>,
    reconnect_at: Option<Instant>,
    memcache: MemcacheAnswer,
}

/// Where a connection is in reading one memcached answer: `VALUE key flags bytes`, the data
/// block and `\r\n`, then `END` (no `VALUE` at all is a miss).
#[derive(Default)]
struct MemcacheAnswer {
    /// Bytes of the data block (and its `\r\n`) still to come.
    block_left: Option<usize>,
    found: bool,
}

impl MemcacheAnswer {
    /// The next complete answer in `up`'s input: `Some(Some(..))` an answer, `Some(None)` a
    /// line that is not one (an error reply, garbage), `None` not complete yet.
    fn next(&mut self, up: &mut Upstream) -> Option<Option<Answer<'static>>> {
        loop {
            if let Some(left) = self.block_left {
                let have = up.buffered().min(left);
                up.consume(have);
                self.block_left = Some(left - have).filter(|n| *n > 0);
                if self.block_left.is_some() {
                    return None;
                }
                continue;
            }
            let (value_bytes, used) = match up.frame(MAX_ANSWER) {
                Frame::Line(line, used) => (memcache_line(line), used),
                _ => return None,
            };
            up.consume(used);
            match value_bytes {
                MemcacheLine::Value(bytes) => {
                    self.found = true;
                    self.block_left = Some(bytes.saturating_add(2));
                }
                MemcacheLine::End => {
                    let status = if std::mem::take(&mut self.found) { "OK" } else { "NOT_FOUND" };
                    return Some(Some(Answer {
                        status: Cow::Borrowed(status),
                        cache_hit: None,
                        node: None,
                        _data: IgnoredAny,
                    }));
                }
                MemcacheLine::Other => return Some(None),
            }
        }
    }
}

enum MemcacheLine {
    Value(usize),
    End,
    Other,
}

fn memcache_line(line: &[u8]) -> MemcacheLine {
    if line == b"END" {
        return MemcacheLine::End;
    }
    let mut words = line.split(|b| *b == b' ');
    if words.next() != Some(b"VALUE") {
        return MemcacheLine::Other;
    }
    match words.nth(2).and_then(|n| std::str::from_utf8(n).ok()).and_then(|n| n.parse().ok()) {
        Some(bytes) => MemcacheLine::Value(bytes),
        None => MemcacheLine::Other,
    }
}

/// What the bench counts of an answer line (`status`, `cache_hit`, `node`), read without
/// parsing its `data` twice: the answer check (the balancer's, SPEC 3.6) makes sure the line is
/// one answer and says where `data` is, and serde then reads the line with `data` replaced by
/// `null`. With a 512 KiB value serde alone spent about 180 us per answer skipping the string,
/// half of the generator's core, and made the generator the bound at 1 connection; the memcached
/// wire skips a value by its length.
fn read_answer<'s>(line: &[u8], scratch: &'s mut Vec<u8>) -> Option<Answer<'s>> {
    let data = common::protocol::parse_answer(line).ok()?.data;
    let start = (data.as_ptr() as usize).checked_sub(line.as_ptr() as usize)?;
    let end = start.checked_add(data.len())?;
    scratch.clear();
    scratch.extend_from_slice(line.get(..start)?);
    scratch.extend_from_slice(b"null");
    scratch.extend_from_slice(line.get(end..)?);
    serde_json::from_slice(scratch).ok()
}

#[derive(Deserialize)]
struct Answer<'a> {
    #[serde(borrow)]
    status: Cow<'a, str>,
    #[serde(default)]
    cache_hit: Option<bool>,
    #[serde(default)]
    node: Option<u64>,
    #[serde(default, rename = "data")]
    _data: IgnoredAny,
}

/// Counts for one phase (the measured run, or one progress second).
#[derive(Default)]
struct Tally {
    answers: u64,
    latency: LatencyHistogram,
    statuses: BTreeMap<String, u64>,
    not_ok: u64,
    connection_errors: u64,
    /// Answers to nothing sent.
    unasked: u64,
    hits: u64,
    misses: u64,
    per_node: BTreeMap<u64, u64>,
}

impl Tally {
    fn record(&mut self, latency: Duration, answer: Option<&Answer<'_>>) {
        self.answers += 1;
        self.latency.record(latency);
        let status = answer.map_or("GARBAGE", |a| a.status.as_ref());
        match self.statuses.get_mut(status) {
            Some(n) => *n += 1,
            None => {
                self.statuses.insert(status.to_owned(), 1);
            }
        }
        if status != "OK" {
            self.not_ok += 1;
        }
        if let Some(answer) = answer {
            match answer.cache_hit {
                Some(true) => self.hits += 1,
                Some(false) => self.misses += 1,
                None => {}
            }
            if let Some(node) = answer.node {
                *self.per_node.entry(node).or_default() += 1;
            }
        }
    }
}

struct KeyPicker {
    rng: SplitMix64,
    zipf: Option<Zipf>,
    keys: usize,
    prefix: String,
    model: Option<LruModel>,
    wire: Wire,
}

impl KeyPicker {
    fn write_get(&mut self, out: &mut Vec<u8>, measured: bool) {
        let index = match &self.zipf {
            Some(zipf) => zipf.sample(&mut self.rng),
            None => self.rng.below(self.keys),
        };
        if let Some(model) = self.model.as_mut() {
            model.access(&self.prefix, index, measured);
        }
        out.extend_from_slice(if self.wire == Wire::Memcache { b"get " } else { b"GET " });
        out.extend_from_slice(self.prefix.as_bytes());
        out.extend_from_slice(itoa::Buffer::new().format(index).as_bytes());
        out.extend_from_slice(if self.wire == Wire::Memcache { b"\r\n" } else { b"\n" });
    }
}

/// Runs the benchmark and returns what the measured phase saw.
pub fn run(config: &BenchConfig) -> io::Result<BenchReport> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let connections = config.connections.max(1);
    let pipeline = config.pipeline.max(1);
    let picker = KeyPicker {
        rng: SplitMix64::new(config.seed),
        zipf: match config.dist {
            Dist::Uniform => None,
            Dist::Zipf(s) => Some(Zipf::new(config.keys.max(1), s)),
        },
        keys: config.keys.max(1),
        prefix: config.key_prefix.clone(),
        model: config.simulate_lru.map(LruModel::new),
        wire: config.wire,
    };
    let mut conns: Vec<Conn> = Vec::with_capacity(connections);
    for i in 0..connections {
        let up = Upstream::connect(config.addr, poll.registry(), Token(i))?;
        let sent = VecDeque::with_capacity(pipeline);
        conns.push(Conn { up: Some(up), sent, reconnect_at: None, memcache: MemcacheAnswer::default() });
    }

    let started = Instant::now();
    let measure_from = started + config.warmup;
    let measure_until = config.requests.map_or(Some(measure_from + config.duration), |_| None);
    let mut measured = Tally::default();
    let mut second = Tally::default();
    let mut next_progress = started + Duration::from_secs(1);
    let mut issuer =
        Issuer { picker, pipeline, measure_from, limit: config.requests, issued_measured: 0, measured_batches: 0 };
    let mut last_answer = Instant::now();
    let mut scratch = Vec::new(); // read_answer's copy of an answer without its data

    for conn in conns.iter_mut() {
        refill(conn, &mut issuer, started);
    }

    let end = loop {
        let now = Instant::now();
        if let Some(until) = measure_until {
            if now >= until {
                break until;
            }
        }
        if config.requests.is_some_and(|n| measured.answers + measured.connection_errors >= n) {
            break now;
        }
        if now.duration_since(last_answer) > STALL_LIMIT {
            eprintln!("bench: no answer for {} s; stopping", STALL_LIMIT.as_secs());
            break now;
        }
        let mut wake = next_progress;
        if let Some(until) = measure_until {
            wake = wake.min(until);
        }
        for conn in &conns {
            if let Some(at) = conn.reconnect_at {
                wake = wake.min(at);
            }
        }
        match poll.poll(&mut events, Some(wake.saturating_duration_since(now))) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => other?,
        }
        let now = Instant::now();
        for event in events.iter() {
            let i = event.token().0;
            let Some(conn) = conns.get_mut(i) else { continue };
            let Some(up) = conn.up.as_mut() else { continue };
            let failed = 'read: loop {
                if up.on_ready(MAX_ANSWER).is_err() {
                    break true;
                }
                loop {
                    // The next request goes out as soon as an answer is in, before the answer
                    // is checked and counted: the generator's own work stays off the path it
                    // measures (with one connection, checking a 512 KiB line would otherwise
                    // leave the servers idle for as long).
                    let (memcache_answer, used) = match config.wire {
                        Wire::Line => match up.frame(MAX_ANSWER) {
                            Frame::Line(_, used) => (None, used),
                            _ => break,
                        },
                        Wire::Memcache => match conn.memcache.next(up) {
                            Some(answer) => (Some(answer), 0),
                            None => break,
                        },
                    };
                    // A peer that answers what it was not asked (an answer with nothing
                    // outstanding, or bytes already in after the answer to the last request
                    // out) is broken, and one streaming answers would keep this loop reading:
                    // one connection error, and the connection is dropped and made again
                    // later, like any other broken one.
                    let Some(sent) = conn.sent.pop_front() else {
                        unasked_answer(now >= measure_from, &mut measured, &mut second);
                        break 'read true;
                    };
                    let overrun = conn.sent.is_empty() && up.buffered() > used;
                    // Only when the connection would otherwise sit idle while this answer is
                    // checked: a deeper pipeline still has requests out and is topped up once
                    // per batch below, in one write. Not into a connection the peer has closed.
                    if conn.sent.is_empty() && !overrun && !up.is_eof() {
                        issuer.refill(up, &mut conn.sent, now);
                    }
                    let answer = match memcache_answer {
                        Some(answer) => answer,
                        // The same line again (how far it holds no `\n` is remembered).
                        None => match up.frame(MAX_ANSWER) {
                            Frame::Line(line, _) => read_answer(line, &mut scratch),
                            _ => None,
                        },
                    };
                    let latency = now.saturating_duration_since(sent);
                    if sent >= measure_from {
                        measured.record(latency, answer.as_ref());
                    }
                    second.record(latency, answer.as_ref());
                    up.consume(used);
                    last_answer = now;
                    if overrun {
                        unasked_answer(now >= measure_from, &mut measured, &mut second);
                        break 'read true;
                    }
                }
                if up.is_eof() || matches!(up.frame(MAX_ANSWER), Frame::TooLong) {
                    break true;
                }
                // Reading stopped at MAX_ANSWER bytes of answers, all used now: the socket
                // holds more, and no new readiness event would say so. Unless the run is over.
                if !up.stopped_short() || measure_until.is_some_and(|until| Instant::now() >= until) {
                    break false;
                }
            };
            if failed {
                fail_connection(conn, poll.registry(), measure_from, &mut measured, &mut second, now);
            } else {
                refill(conn, &mut issuer, now);
            }
        }
        for (i, conn) in conns.iter_mut().enumerate() {
            if conn.reconnect_at.is_some_and(|at| at <= now) {
                conn.reconnect_at = None;
                match Upstream::connect(config.addr, poll.registry(), Token(i)) {
                    Ok(up) => {
                        conn.up = Some(up);
                        refill(conn, &mut issuer, now);
                    }
                    Err(_) => conn.reconnect_at = Some(now + RECONNECT_AFTER),
                }
            }
        }
        if now >= next_progress {
            if config.progress {
                let elapsed = now.duration_since(started).as_secs_f64();
                let phase = if now < measure_from { " (warm-up)" } else { "" };
                eprintln!(
                    "[{elapsed:6.1}s] {:>9} req/s  p99 {:>7} us  errors {}{phase}",
                    second.answers,
                    second.latency.quantile_us(0.99),
                    second.not_ok + second.connection_errors + second.unasked
                );
            }
            second = Tally::default();
            next_progress += Duration::from_secs(1);
        }
    };
    let duration = end.saturating_duration_since(measure_from).max(Duration::from_micros(1));
    let mut report = report(config, pipeline, connections, duration, &measured);
    report.request_batches = issuer.measured_batches;
    report.simulated_lru = issuer.picker.model.map(|m| SimulatedLru {
        capacity: m.cache.config().capacity,
        hit_ratio: if m.lookups == 0 { 0.0 } else { m.hits as f64 / m.lookups as f64 },
    });
    Ok(report)
}

/// Tops `conn` up to its pipeline depth, if it is connected.
fn refill(conn: &mut Conn, issuer: &mut Issuer, now: Instant) {
    if let Some(up) = conn.up.as_mut() {
        issuer.refill(up, &mut conn.sent, now);
    }
}

/// What the next requests are and whether they may go out.
struct Issuer {
    picker: KeyPicker,
    pipeline: usize,
    measure_from: Instant,
    /// `--requests`: how many measured requests go out in all.
    limit: Option<u64>,
    issued_measured: u64,
    /// Refills that sent measured requests (each one write).
    measured_batches: u64,
}

impl Issuer {
    /// Sends requests on `up` (at `now`, recorded in `sent`) until `pipeline` are in flight.
    fn refill(&mut self, up: &mut Upstream, sent: &mut VecDeque<Instant>, now: Instant) {
        let measured = now >= self.measure_from;
        let before = sent.len();
        while sent.len() < self.pipeline {
            if measured {
                if self.limit.is_some_and(|n| self.issued_measured >= n) {
                    break;
                }
                self.issued_measured += 1;
            }
            self.picker.write_get(up.out_buf(), measured);
            sent.push_back(now);
        }
        if measured && sent.len() > before {
            self.measured_batches += 1;
        }
        let _ = up.flush();
    }
}

/// Counts an answer to nothing sent (apart from requests lost, which `--requests` counts).
fn unasked_answer(in_measured_phase: bool, measured: &mut Tally, second: &mut Tally) {
    if in_measured_phase {
        measured.unasked += 1;
    }
    second.unasked += 1;
}

fn fail_connection(
    conn: &mut Conn,
    registry: &mio::Registry,
    measure_from: Instant,
    measured: &mut Tally,
    second: &mut Tally,
    now: Instant,
) {
    if let Some(mut up) = conn.up.take() {
        up.deregister(registry);
    }
    conn.memcache = MemcacheAnswer::default();
    for sent in conn.sent.drain(..) {
        if sent >= measure_from {
            measured.connection_errors += 1;
        }
        second.connection_errors += 1;
    }
    conn.reconnect_at = Some(now + RECONNECT_AFTER);
}

fn report(config: &BenchConfig, pipeline: usize, connections: usize, duration: Duration, t: &Tally) -> BenchReport {
    let h = &t.latency;
    let mean = if h.is_empty() { 0.0 } else { h.mean_us() };
    BenchReport {
        target: config.addr.to_string(),
        connections,
        pipeline,
        keys: config.keys,
        key_prefix: config.key_prefix.clone(),
        dist: config.dist.to_string(),
        warmup_s: config.warmup.as_secs_f64(),
        duration_s: duration.as_secs_f64(),
        requests: t.answers,
        throughput_rps: t.answers as f64 / duration.as_secs_f64(),
        latency_us: LatencyReport {
            p50: h.quantile_us(0.50),
            p90: h.quantile_us(0.90),
            p99: h.quantile_us(0.99),
            p999: h.quantile_us(0.999),
            max: h.max_us(),
            mean,
        },
        statuses: t.statuses.clone(),
        errors: t.not_ok + t.connection_errors + t.unasked,
        connection_errors: t.connection_errors + t.unasked,
        request_batches: 0,
        hit_ratio: (t.hits + t.misses > 0).then(|| t.hits as f64 / (t.hits + t.misses) as f64),
        per_node: t.per_node.iter().map(|(node, n)| (node.to_string(), *n)).collect(),
        simulated_lru: None,
    }
}

/// The human summary printed at the end of a run.
pub fn summary(r: &BenchReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "bench {}: {} connections, pipeline {}, {} over {} keys ({}…), {:.1} s measured after {:.1} s warm-up",
        r.target, r.connections, r.pipeline, r.dist, r.keys, r.key_prefix, r.duration_s, r.warmup_s
    );
    let _ = writeln!(s, "throughput  {:.0} req/s ({} answers)", r.throughput_rps, r.requests);
    let l = &r.latency_us;
    let _ = writeln!(
        s,
        "latency     p50 {} us  p90 {} us  p99 {} us  p99.9 {} us  max {} us  (mean {:.1} us)",
        l.p50, l.p90, l.p99, l.p999, l.max, l.mean
    );
    let statuses: Vec<String> = r.statuses.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let _ = writeln!(s, "statuses    {}", if statuses.is_empty() { "-".into() } else { statuses.join("  ") });
    let _ = writeln!(s, "errors      {} (connection errors {})", r.errors, r.connection_errors);
    match r.hit_ratio {
        Some(ratio) => {
            let _ = writeln!(s, "hit ratio   {:.2} %", ratio * 100.0);
        }
        None => {
            let _ = writeln!(s, "hit ratio   - (answers carry no cache_hit)");
        }
    }
    if let Some(sim) = &r.simulated_lru {
        let _ = writeln!(
            s,
            "one LRU     {:.2} % hits with {} entries on the same key sequence",
            sim.hit_ratio * 100.0,
            sim.capacity
        );
    }
    let nodes: Vec<String> = r.per_node.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    let _ = writeln!(s, "per node    {}", if nodes.is_empty() { "-".into() } else { nodes.join("  ") });
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distributions_parse() {
        assert_eq!("uniform".parse::<Dist>(), Ok(Dist::Uniform));
        assert_eq!("zipf".parse::<Dist>(), Ok(Dist::Zipf(0.99)));
        assert_eq!("zipf:1.2".parse::<Dist>(), Ok(Dist::Zipf(1.2)));
        assert!("zipf:-1".parse::<Dist>().is_err());
        assert!("normal".parse::<Dist>().is_err());
    }
}
