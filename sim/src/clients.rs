//! The simulated clients: each a connection to the balancer that sends GETs for Zipf-drawn
//! keys, pipelined, some with an id (a number or a string) and some without, and checks
//! every answer it gets: one valid JSON object, for a request it sent on this connection,
//! with that request's id, for that request's key, holding a value the origin held recently
//! enough.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use common::random::{SplitMix64, Zipf};
use serde_json::Value;

use crate::net::{whole_lines, EndId, Net, NodeId, Tag};
use crate::values::{key_name, Table};

#[derive(Clone, Debug)]
pub struct ClientsConfig {
    pub connections: usize,
    /// Requests each connection sends in all.
    pub requests: usize,
    pub keys: usize,
    pub zipf: f64,
    pub max_pipeline: usize,
    /// The longest pause between two requests of a connection.
    pub think: Duration,
    /// Connections that now and then stop reading for a while (up to this long), pipelining
    /// up to `slow_pipeline` requests meanwhile: their answers pile up at the balancer.
    pub slow_readers: usize,
    pub slow_pause: Duration,
    pub slow_pipeline: usize,
}

#[derive(Debug)]
struct Sent {
    key: String,
    id: Option<String>,
    at: Duration,
}

#[derive(Debug)]
struct Client {
    end: Option<EndId>,
    connected: bool,
    ordered: VecDeque<Sent>,
    by_id: BTreeMap<String, Sent>,
    input: Vec<u8>,
    sent: usize,
    next_at: Duration,
    pipeline: usize,
    slow: bool,
    /// Not reading until then.
    paused_until: Option<Duration>,
}

/// What an answer said, for the run's counts and checks.
#[derive(Debug)]
pub struct Answered {
    pub key: String,
    pub status: String,
    pub stale: bool,
    pub cache_hit: bool,
    pub sent_at: Duration,
}

/// Everything the clients noticed in one step.
#[derive(Debug, Default)]
pub struct Heard {
    pub answers: Vec<Answered>,
    pub versions: Vec<VersionSeen>,
    /// (invariant, detail)
    pub violations: Vec<(&'static str, String)>,
}

pub struct Clients {
    host: NodeId,
    target: SocketAddr,
    config: ClientsConfig,
    zipf: Zipf,
    rng: SplitMix64,
    clients: Vec<Client>,
    next_id: u64,
}

impl Clients {
    pub fn new(host: NodeId, target: SocketAddr, config: ClientsConfig, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let clients = (0..config.connections + config.slow_readers)
            .map(|n| Client {
                end: None,
                connected: false,
                ordered: VecDeque::new(),
                by_id: BTreeMap::new(),
                input: Vec::new(),
                sent: 0,
                next_at: Duration::from_micros(rng.next_u64() % 20_000),
                pipeline: if n < config.connections {
                    1 + rng.below(config.max_pipeline.max(1))
                } else {
                    // Deep: a slow reader's answers pile up behind one that is late.
                    let half = (config.slow_pipeline / 2).max(1);
                    half + rng.below(half)
                },
                slow: n >= config.connections,
                paused_until: None,
            })
            .collect();
        Clients { host, target, zipf: Zipf::new(config.keys, config.zipf), config, rng, clients, next_id: 0 }
    }

    /// Requests sent and not yet answered, over all connections.
    pub fn unanswered(&self) -> usize {
        self.clients.iter().map(|c| c.ordered.len() + c.by_id.len()).sum()
    }

    pub fn sent(&self) -> usize {
        self.clients.iter().map(|c| c.sent).sum()
    }

    /// Every request sent and answered, every connection closed.
    pub fn done(&self) -> bool {
        self.clients.iter().all(|c| c.sent >= self.config.requests && c.end.is_none() && c.paused_until.is_none())
    }

    /// When a client next wants to act on its own.
    pub fn next_time(&self) -> Option<Duration> {
        let sending = self
            .clients
            .iter()
            .filter(|c| c.sent < self.config.requests && (c.end.is_none() || c.connected))
            .filter(|c| c.ordered.len() + c.by_id.len() < c.pipeline)
            .map(|c| c.next_at);
        let waking = self.clients.iter().filter_map(|c| c.paused_until);
        sending.chain(waking).min()
    }

    /// Client `n`'s connection is ready; then every client does what is due at `now`.
    pub fn step(&mut self, net: &mut Net, table: &Table, now: Duration, ready: &[usize], heard: &mut Heard) {
        for n in ready {
            self.on_ready(net, table, *n, now, heard);
        }
        for n in 0..self.clients.len() {
            if self.clients[n].paused_until.is_some_and(|t| t <= now) {
                self.clients[n].paused_until = None;
                self.on_ready(net, table, n, now, heard);
            }
            self.act(net, n, now);
        }
    }

    fn on_ready(&mut self, net: &mut Net, table: &Table, n: usize, now: Duration, heard: &mut Heard) {
        let Some(c) = self.clients.get_mut(n) else { return };
        let Some(end) = c.end else { return };
        if c.paused_until.is_some() {
            // Reads when the pause is over.
            return;
        }
        if !c.connected {
            match net.connected(end) {
                Ok(true) => c.connected = true,
                Ok(false) => return,
                Err(_) => {
                    // Refused (the balancer is not up): try again shortly.
                    net.close(end);
                    c.end = None;
                    c.next_at = now + Duration::from_millis(100);
                    return;
                }
            }
        }
        let mut buf = [0u8; 16 * 1024];
        let mut closed = false;
        let mut lines = Vec::new();
        loop {
            match net.read(end, &mut buf) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(k) => lines.extend(whole_lines(&mut c.input, &buf[..k])),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        for line in lines.split_inclusive(|b| *b == b'\n') {
            check_answer(c, table, line.strip_suffix(b"\n").unwrap_or(line), now, heard);
        }
        if closed {
            let owed = c.ordered.len() + c.by_id.len();
            if owed > 0 {
                heard
                    .violations
                    .push(("exactly-one-answer", format!("client {n}: connection closed with {owed} answers owed")));
            }
            c.ordered.clear();
            c.by_id.clear();
            c.input.clear();
            net.close(end);
            c.end = None;
            c.connected = false;
            c.next_at = now + Duration::from_millis(10);
        }
    }

    fn act(&mut self, net: &mut Net, n: usize, now: Duration) {
        let requests = self.config.requests;
        let Some(c) = self.clients.get_mut(n) else { return };
        let owed = c.ordered.len() + c.by_id.len();
        if c.sent >= requests {
            if owed == 0 {
                if let Some(end) = c.end.take() {
                    net.close(end);
                }
            }
            return;
        }
        if c.next_at > now {
            return;
        }
        let Some(end) = c.end else {
            c.end = Some(net.connect(self.host, Tag::Driver(n), self.target));
            return;
        };
        if !c.connected || owed >= c.pipeline {
            return;
        }
        let key = key_name(self.zipf.sample(&mut self.rng));
        // A third with a numeric id, a third with a string id (returned as the same JSON
        // value), a third in the text form without one.
        let kind = self.rng.below(3);
        self.next_id += 1;
        let id = match kind {
            0 => Some(format!("{}", self.next_id)),
            1 => Some(format!("\"c{}\"", self.next_id)),
            _ => None,
        };
        let line = match &id {
            Some(id) => format!("{{\"op\":\"get\",\"key\":\"{key}\",\"id\":{id}}}\n"),
            None => format!("GET {key}\n"),
        };
        match id {
            Some(id) => {
                c.by_id.insert(id.clone(), Sent { key, id: Some(id), at: now });
            }
            None => c.ordered.push_back(Sent { key, id: None, at: now }),
        }
        // A client's requests are small: the window always takes them whole (a partial
        // write is finished at once, as a blocking client would).
        let mut rest = line.as_bytes();
        while !rest.is_empty() {
            match net.write(end, rest) {
                Ok(k) => rest = &rest[k..],
                Err(_) => break,
            }
        }
        c.sent += 1;
        if c.slow && self.rng.below(20) == 0 {
            let pause = self.config.slow_pause.as_micros() as u64;
            c.paused_until = Some(now + Duration::from_micros(self.rng.next_u64() % pause.max(1)));
        }
        let think = self.config.think.as_micros() as u64;
        c.next_at = now + Duration::from_micros(if think == 0 { 0 } else { self.rng.next_u64() % think });
    }
}

fn check_answer(c: &mut Client, table: &Table, line: &[u8], now: Duration, heard: &mut Heard) {
    let Ok(Value::Object(answer)) = serde_json::from_slice::<Value>(line) else {
        heard.violations.push(("valid-json", format!("not one JSON object: {:?}", String::from_utf8_lossy(line))));
        return;
    };
    let sent = match answer.get("id") {
        Some(Value::Null) | None => c.ordered.pop_front(),
        Some(id) => c.by_id.remove(&id.to_string()),
    };
    let Some(sent) = sent else {
        heard.violations.push(("own-id", format!("an answer for no request of this connection: {answer:?}")));
        return;
    };
    debug_assert!(sent.id.is_some() == answer.get("id").is_some_and(|v| !v.is_null()));
    let status = answer.get("status").and_then(Value::as_str).unwrap_or("").to_string();
    let stale = answer.get("stale").and_then(Value::as_bool).unwrap_or(false);
    let cache_hit = answer.get("cache_hit").and_then(Value::as_bool).unwrap_or(false);
    if status == "OK" {
        let data = answer.get("data");
        let key = data.and_then(|d| d.get("key")).and_then(Value::as_str);
        if key != Some(sent.key.as_str()) {
            heard.violations.push(("own-key", format!("GET {} answered with the value of {key:?}", sent.key)));
        }
        if let Some(v) = data.and_then(|d| d.get("v")).and_then(Value::as_u64) {
            match table.ended(&sent.key, usize::try_from(v).unwrap_or(usize::MAX)) {
                None => heard
                    .violations
                    .push(("origin-value", format!("GET {} answered version {v}, never held", sent.key))),
                Some(ended) => heard.answers_versions(&sent, v, ended, stale),
            }
        }
    }
    heard.answers.push(Answered { key: sent.key, status, stale, cache_hit, sent_at: sent.at });
    let _ = now;
}

impl Heard {
    /// Records the version answered, for the staleness check the run makes (it knows the TTL).
    fn answers_versions(&mut self, sent: &Sent, v: u64, ended: Option<Duration>, stale: bool) {
        self.versions.push(VersionSeen { key: sent.key.clone(), v, ended, stale, sent_at: sent.at });
    }
}

/// A version an OK answer carried, and until when the origin held it.
#[derive(Debug)]
pub struct VersionSeen {
    pub key: String,
    pub v: u64,
    pub ended: Option<Duration>,
    pub stale: bool,
    pub sent_at: Duration,
}
