//! One simulated run: the real origin, proxies and balancer on the simulated network and the
//! virtual clock, the simulated clients, the fault script, and the invariant checks — all in
//! one thread, driven by one seed.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use balancer::{Balancer, BalancerConfig, Strategy};
use common::random::SplitMix64;
use common::server::ServerConfig;
use origin::{Origin, Store};
use proxy::{Proxy, ProxyConfig};

use crate::check::{Checker, OriginFetches, Violation};
use crate::clients::{Clients, Heard};
use crate::net::{Net, NodeId, Observer, Tag};
use crate::node::{Node, SharedNet, SimNode};
use crate::scenario::{Action, Plan, Role};
use crate::trace;
use crate::values::{key_name, SimValues, Table};

const ORIGIN_PORT: u16 = 8000;
const PROXY_PORT: u16 = 8001;
const BALANCER_PORT: u16 = 9000;
/// Idle pooled connections a node may keep to its peers (the proxies' origin pool keeps up to
/// `--origin-max-inflight`, 64 by default).
const POOL_BOUND: usize = 72;

/// The balancer's settings in the simulator: the binary's defaults, with health checks a
/// little faster so that a short run sees proxies go down and come back.
pub struct Timing {
    pub health_interval: Duration,
    pub health_timeout: Duration,
    pub fall: u32,
    pub rise: u32,
    pub request_timeout: Duration,
    pub retries: u32,
    pub origin_timeout: Duration,
}

pub const TIMING: Timing = Timing {
    health_interval: Duration::from_millis(250),
    health_timeout: Duration::from_millis(150),
    fall: 3,
    rise: 2,
    request_timeout: Duration::from_millis(3000),
    retries: 2,
    origin_timeout: Duration::from_millis(2000),
};

impl Timing {
    /// How long after the cluster becomes serviceable a GET may still get PROXY_UNREACHABLE:
    /// a proxy that came back must pass `rise` probes, and one that went away must fail
    /// `fall` of them or the attempts on it must time out.
    pub fn detection_window(&self) -> Duration {
        self.health_interval * (self.fall + self.rise + 2)
            + self.health_timeout
            + self.request_timeout * (self.retries + 1)
    }
}

/// What one run found and counted.
#[derive(Debug, Default)]
pub struct Outcome {
    pub violations: Vec<Violation>,
    pub by_status: BTreeMap<String, usize>,
    pub requests: usize,
    pub hits: usize,
    pub stale: usize,
    pub simulated: Duration,
    pub faults: usize,
    pub retries: u64,
    pub trace: Vec<String>,
}

/// Observer handle the network holds, shared with the run.
struct Shared(Rc<RefCell<OriginFetches>>);

impl Observer for Shared {
    fn wrote(&mut self, end: crate::net::EndInfo, bytes: &[u8]) {
        self.0.borrow_mut().wrote(end, bytes);
    }
    fn read(&mut self, end: crate::net::EndInfo, bytes: &[u8]) {
        self.0.borrow_mut().read(end, bytes);
    }
    fn closed(&mut self, end: crate::net::EndInfo) {
        self.0.borrow_mut().closed(end);
    }
}

pub struct World {
    epoch: Instant,
    now: Duration,
    net: SharedNet,
    nodes: Vec<Box<dyn SimNode>>,
    origin: NodeId,
    proxies: Vec<NodeId>,
    balancer: NodeId,
    /// The clients' host (not a service).
    host: NodeId,
    stopped: BTreeSet<NodeId>,
    /// Readiness that waits for a stopped node to run again.
    pending: BTreeMap<NodeId, BTreeSet<Tag>>,
    clients: Clients,
    table: Arc<Mutex<Table>>,
    fetches: Rc<RefCell<OriginFetches>>,
    checker: Checker,
    plan: Plan,
    actions: Vec<(Duration, Action)>,
    next_change: Duration,
    rng: SplitMix64,
    /// Since when at least one proxy could serve (up, running, reachable both ways).
    serviceable_since: Option<Duration>,
    outcome: Outcome,
    output_bound: usize,
    /// Failing spells of the origin under way (they may overlap).
    origin_failing: usize,
    /// How much older than its TTL a fresh answer's value may be: the time between the
    /// origin reading it and the proxy storing it. A few network latencies, unless the run
    /// holds segments back (partitions) or stops processes, when it is the origin time-out
    /// (a proxy drops an answer later than that).
    staleness_slack: Duration,
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn server_config(port: u16) -> ServerConfig {
    ServerConfig { port, ..ServerConfig::default() }
}

impl World {
    pub fn new(seed: u64, plan: Plan) -> World {
        let epoch = Instant::now();
        let mut rng = SplitMix64::new(seed);
        let net: SharedNet = Rc::new(RefCell::new(Net::new(rng.next_u64(), plan.net.clone())));
        let table = Arc::new(Mutex::new(Table::new(plan.clients.keys, plan.value_pad)));
        let fetches = Rc::new(RefCell::new(OriginFetches::new(addr(ORIGIN_PORT))));
        net.borrow_mut().set_observer(Box::new(Shared(fetches.clone())));
        let mut nodes: Vec<Box<dyn SimNode>> = Vec::new();

        let values = SimValues(table.clone());
        let latency = plan.origin_latency;
        let make_origin = Box::new(move |_now| Origin::new(Store::from_values(Box::new(values.clone())), latency));
        nodes.push(Box::new(Node::start(
            0,
            "origin",
            addr(ORIGIN_PORT),
            server_config(ORIGIN_PORT),
            make_origin,
            net.clone(),
            epoch,
        )));

        let mut proxy_addrs = Vec::new();
        for i in 0..plan.proxies {
            let port = PROXY_PORT + i as u16;
            proxy_addrs.push(addr(port));
            let mut config = ProxyConfig::new(addr(ORIGIN_PORT));
            config.server = server_config(port);
            config.cache.ttl = plan.ttl;
            config.cache.stale_grace = plan.stale_if_error;
            config.origin_timeout = TIMING.origin_timeout;
            config.sweep_interval = Duration::from_millis(200);
            let make = Box::new(move |now| Proxy::new(&config, port, now));
            let name = format!("proxy {port}");
            nodes.push(Box::new(Node::start(
                nodes.len(),
                &name,
                addr(port),
                server_config(port),
                make,
                net.clone(),
                epoch,
            )));
        }

        let mut config = BalancerConfig::new(&proxy_addrs);
        config.server = server_config(BALANCER_PORT);
        config.strategy = Strategy::ConsistentHash { load_factor: 1.25 };
        config.health_interval = TIMING.health_interval;
        config.health_timeout = TIMING.health_timeout;
        config.fall = TIMING.fall;
        config.rise = TIMING.rise;
        config.request_timeout = TIMING.request_timeout;
        config.try_timeout = TIMING.request_timeout;
        config.retries = TIMING.retries;
        config.metrics_interval = Duration::from_millis(1000);
        config.resolve_interval = Duration::ZERO;
        config.collapse = plan.collapse;
        let make = Box::new(move |_now| Balancer::new(config.clone()));
        let balancer = nodes.len();
        let server = server_config(BALANCER_PORT);
        nodes.push(Box::new(Node::start(balancer, "balancer", addr(BALANCER_PORT), server, make, net.clone(), epoch)));

        for proxy in 1..=plan.proxies {
            net.borrow_mut().follow_ids(proxy);
        }
        trace::note(
            Duration::ZERO,
            "sim",
            format_args!(
                "{} proxies (TTL {:.3}s{}), origin latency {} ms, {} clients x {} GETs over {} keys (pipelines up to {}){}",
                plan.proxies,
                plan.ttl.as_secs_f64(),
                if plan.stale_if_error.is_zero() { String::new() } else { ", stale-if-error 2s".into() },
                plan.origin_latency.as_millis(),
                plan.clients.connections,
                plan.clients.requests,
                plan.clients.keys,
                plan.clients.max_pipeline,
                match plan.clients.slow_readers {
                    0 => String::new(),
                    n => format!(", {n} of them slow readers"),
                }
            ),
        );
        let holds = plan.actions.iter().any(|(_, a)| matches!(a, Action::Partition(..) | Action::Stop(_)));
        let staleness_slack = if holds {
            TIMING.origin_timeout + Duration::from_millis(50)
        } else {
            (plan.net.latency_max + plan.net.spike) * 4 + Duration::from_millis(5)
        };
        let host = nodes.len();
        let clients = Clients::new(host, addr(BALANCER_PORT), plan.clients.clone(), rng.next_u64());
        // SPEC 3.8, as common::window bounds it: what is queued stays within the output limit,
        // the answers forwarded and not yet back fit in the output limit too (the forwarding
        // window), plus one answer. An answer relayed from the buffer it was read into keeps
        // that buffer alive and counts all of it (two reads' worth, 128 KiB, or twice the
        // line), so "one answer" is that buffer here.
        let answer = plan.value_pad + 1024;
        let limit = ServerConfig::default().output_limit;
        let output_bound = 2 * limit + (128 * 1024).max(2 * answer) + answer;
        World {
            epoch,
            now: Duration::ZERO,
            net,
            proxies: (1..=plan.proxies).collect(),
            nodes,
            origin: 0,
            balancer,
            host,
            stopped: BTreeSet::new(),
            pending: BTreeMap::new(),
            clients,
            table,
            fetches,
            checker: Checker::default(),
            actions: plan.actions.iter().rev().copied().collect(),
            next_change: plan.value_change_every,
            plan,
            rng,
            serviceable_since: Some(Duration::ZERO),
            outcome: Outcome::default(),
            output_bound,
            origin_failing: 0,
            staleness_slack,
        }
    }

    fn node_of(&self, role: Role) -> NodeId {
        match role {
            Role::Origin => self.origin,
            Role::Proxy(i) => self.proxies.get(i).copied().unwrap_or(self.origin),
            Role::Balancer => self.balancer,
        }
    }

    fn name(&self, node: NodeId) -> String {
        self.nodes.get(node).map_or_else(|| "clients".to_string(), |n| n.name().to_string())
    }

    /// Runs the plan: load and faults, then a quiet time for everything to settle, then the
    /// checks at the end.
    pub fn run(mut self) -> Outcome {
        let limit = Duration::from_secs(120);
        while self.now < limit {
            if self.clients.done() && self.actions.is_empty() {
                break;
            }
            if !self.step() {
                break;
            }
        }
        if !self.clients.done() {
            let left = self.clients.unanswered();
            self.checker.fail(self.now, "exactly-one-answer", format!("{left} requests never answered"));
        }
        // Idle for a while: time-outs, sweeps and probes run, connections close.
        let settle = self.now + Duration::from_secs(10);
        while self.now < settle && self.step_until(settle) {}
        self.check_leaks();
        self.check_retries();
        self.finish()
    }

    fn finish(mut self) -> Outcome {
        self.outcome.simulated = self.now;
        self.outcome.requests = self.clients.sent();
        self.outcome.violations = std::mem::take(&mut self.checker.violations);
        self.outcome.trace = trace::take();
        self.outcome
    }

    fn step(&mut self) -> bool {
        self.step_until(Duration::MAX)
    }

    /// Advances to the next thing that happens (not past `until`) and does it. False when
    /// nothing is left to happen before `until`.
    fn step_until(&mut self, until: Duration) -> bool {
        let Some(next) = self.next_time() else { return false };
        if next > until {
            self.now = until;
            return false;
        }
        self.now = self.now.max(next);
        self.net.borrow_mut().advance(self.now);
        while self.actions.last().is_some_and(|(at, _)| *at <= self.now) {
            if let Some((_, action)) = self.actions.pop() {
                self.apply(action);
            }
        }
        if self.now >= self.next_change {
            self.change_a_value();
        }
        for _ in 0..1000 {
            self.run_nodes();
            if !self.net.borrow().has_ready() && !self.nodes.iter().any(|n| n.has_leftovers()) {
                break;
            }
        }
        true
    }

    fn next_time(&self) -> Option<Duration> {
        let mut next: Option<Duration> = None;
        let mut consider = |t: Option<Duration>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        consider(self.net.borrow().next_event());
        for (id, node) in self.nodes.iter().enumerate() {
            if !self.stopped.contains(&id) {
                consider(node.next_deadline().map(|at| at.saturating_duration_since(self.epoch)));
            }
        }
        consider(self.clients.next_time());
        consider(self.actions.last().map(|(at, _)| *at));
        if !self.clients.done() {
            consider(Some(self.next_change));
        }
        next.map(|t| t.max(self.now))
    }

    /// Every running node whose sockets became ready or whose timers are due has a turn; then
    /// the clients.
    fn run_nodes(&mut self) {
        let ready = self.net.borrow_mut().take_ready();
        for (node, tag) in ready {
            self.pending.entry(node).or_default().insert(tag);
        }
        let at = self.epoch + self.now;
        for id in 0..self.nodes.len() {
            if self.stopped.contains(&id) {
                continue;
            }
            let due = self.nodes[id].next_deadline().is_some_and(|d| d <= at) || self.nodes[id].has_leftovers();
            let tags: Vec<Tag> = match self.pending.get_mut(&id) {
                Some(set) if !set.is_empty() => std::mem::take(set).into_iter().collect(),
                _ if due => Vec::new(),
                _ => continue,
            };
            trace::at(self.now, self.nodes[id].name());
            self.nodes[id].turn(at, &tags);
            let held = self.nodes[id].max_client_output();
            if held > self.output_bound {
                let name = self.name(id);
                self.checker.fail(self.now, "output-bound", format!("{name} holds {held} bytes for one client"));
            }
        }
        let drivers: Vec<usize> = match self.pending.get_mut(&self.host) {
            Some(set) => std::mem::take(set)
                .into_iter()
                .filter_map(|t| match t {
                    Tag::Driver(n) => Some(n),
                    _ => None,
                })
                .collect(),
            None => Vec::new(),
        };
        let mut heard = Heard::default();
        if let Ok(table) = self.table.lock() {
            self.clients.step(&mut self.net.borrow_mut(), &table, self.now, &drivers, &mut heard);
        }
        self.judge(heard);
        let found = std::mem::take(&mut self.fetches.borrow_mut().found);
        for (invariant, detail) in found {
            self.checker.fail(self.now, invariant, detail);
        }
    }

    /// Checks what the clients heard against what the cluster may answer.
    fn judge(&mut self, heard: Heard) {
        for (invariant, detail) in heard.violations {
            self.checker.fail(self.now, invariant, detail);
        }
        let slack = self.staleness_slack;
        for seen in heard.versions {
            let Some(ended) = seen.ended else { continue };
            let allowed = self.plan.ttl + slack + if seen.stale { self.plan.stale_if_error } else { Duration::ZERO };
            if ended + allowed < seen.sent_at {
                let detail = format!(
                    "GET {} sent at {:.3}s got version {} which the origin replaced at {:.3}s (TTL {:.3}s{})",
                    seen.key,
                    seen.sent_at.as_secs_f64(),
                    seen.v,
                    ended.as_secs_f64(),
                    self.plan.ttl.as_secs_f64(),
                    if seen.stale { ", stale" } else { "" }
                );
                self.checker.fail(self.now, "fresh-within-ttl", detail);
            }
        }
        for answer in heard.answers {
            *self.outcome.by_status.entry(answer.status.clone()).or_default() += 1;
            self.outcome.hits += usize::from(answer.cache_hit);
            self.outcome.stale += usize::from(answer.stale);
            // ORIGIN_ERROR is what a failing origin says: the fault's own line says it once.
            if answer.status != "OK" && answer.status != "ORIGIN_ERROR" {
                trace::note(self.now, "client", format_args!("GET {} -> {}", answer.key, answer.status));
            }
            if answer.status == "PROXY_UNREACHABLE" {
                let window = TIMING.detection_window();
                if self.serviceable_since.is_some_and(|since| since + window <= answer.sent_at) {
                    let detail = format!(
                        "GET {} sent at {:.3}s: PROXY_UNREACHABLE though a proxy could serve since {:.3}s",
                        answer.key,
                        answer.sent_at.as_secs_f64(),
                        self.serviceable_since.unwrap_or_default().as_secs_f64()
                    );
                    self.checker.fail(self.now, "no-proxy-unreachable", detail);
                }
            }
        }
    }

    fn change_a_value(&mut self) {
        let k = self.rng.below(self.plan.clients.keys.max(1));
        if let Ok(mut table) = self.table.lock() {
            table.bump(&key_name(k), self.now);
        }
        self.next_change = self.now + self.plan.value_change_every;
    }

    fn apply(&mut self, action: Action) {
        self.outcome.faults += 1;
        let now = self.now;
        let at = self.epoch + now;
        match action {
            Action::Crash(role) => {
                let node = self.node_of(role);
                self.stopped.remove(&node);
                self.pending.remove(&node);
                self.nodes[node].crash();
                trace::note(now, &self.name(node), format_args!("CRASHED (state lost)"));
            }
            Action::Restart(role) => {
                let node = self.node_of(role);
                if !self.nodes[node].is_up() {
                    trace::at(now, self.nodes[node].name());
                    self.nodes[node].restart(at);
                    trace::note(now, &self.name(node), format_args!("restarted"));
                }
            }
            Action::Stop(role) => {
                let node = self.node_of(role);
                if self.nodes[node].is_up() && self.stopped.insert(node) {
                    trace::note(now, &self.name(node), format_args!("STOPPED (SIGSTOP)"));
                }
            }
            Action::Resume(role) => {
                let node = self.node_of(role);
                if self.stopped.remove(&node) {
                    trace::note(now, &self.name(node), format_args!("resumed (SIGCONT)"));
                }
            }
            Action::Partition(a, b) => {
                let (a, b) = (self.node_of(a), self.node_of(b));
                self.net.borrow_mut().partition(a, b);
                trace::note(now, "net", format_args!("PARTITION {} | {}", self.name(a), self.name(b)));
            }
            Action::Heal(a, b) => {
                let (a, b) = (self.node_of(a), self.node_of(b));
                self.net.borrow_mut().heal(a, b);
                trace::note(now, "net", format_args!("healed {} | {}", self.name(a), self.name(b)));
            }
            Action::Reset(a, b) => {
                let (a, b) = (self.node_of(a), self.node_of(b));
                let conns = self.net.borrow().conns_between(a, b);
                for end in &conns {
                    self.net.borrow_mut().reset(*end);
                }
                trace::note(
                    now,
                    "net",
                    format_args!("reset {} connections {} | {}", conns.len(), self.name(a), self.name(b)),
                );
            }
            Action::Lie(role, every) => {
                let node = self.node_of(role);
                self.net.borrow_mut().set_liar(node, every);
                match every {
                    0 => trace::note(now, &self.name(node), format_args!("tells the truth again")),
                    n => trace::note(
                        now,
                        &self.name(node),
                        format_args!("LIES: one answer in {n} carries an id not asked"),
                    ),
                }
            }
            Action::OriginFailing(on) => {
                let was = self.origin_failing > 0;
                self.origin_failing = if on { self.origin_failing + 1 } else { self.origin_failing.saturating_sub(1) };
                let failing = self.origin_failing > 0;
                if let Ok(mut table) = self.table.lock() {
                    table.failing = failing;
                }
                if failing != was {
                    let what = if failing { "FAILING (every GET is ORIGIN_ERROR)" } else { "healthy again" };
                    trace::note(now, "origin", format_args!("{what}"));
                }
            }
        }
        self.update_serviceable();
    }

    /// Whether some proxy can serve now: it and the origin are up and running, and nothing
    /// cuts it off from the balancer or the origin. (A failing origin still answers.)
    fn update_serviceable(&mut self) {
        let up = |n: NodeId| self.nodes[n].is_up() && !self.stopped.contains(&n);
        let net = self.net.borrow();
        let ok = up(self.origin)
            && up(self.balancer)
            && self
                .proxies
                .iter()
                .any(|p| up(*p) && !net.is_partitioned(*p, self.balancer) && !net.is_partitioned(*p, self.origin));
        drop(net);
        match (ok, self.serviceable_since) {
            (true, None) => self.serviceable_since = Some(self.now),
            (false, Some(_)) => self.serviceable_since = None,
            _ => {}
        }
    }

    /// Slow is not dead (SPEC 3.6): with an origin slower than usual but within the proxies'
    /// time-out, no GET is retried.
    fn check_retries(&mut self) {
        let retries = self.nodes[self.balancer]
            .metrics()
            .and_then(|m| m.get("retries").and_then(serde_json::Value::as_u64))
            .unwrap_or(0);
        self.outcome.retries = retries;
        if self.plan.expect_no_retries && retries > 0 {
            self.checker.fail(self.now, "slow-is-not-dead", format!("the balancer retried {retries} GETs"));
        }
    }

    /// At the end, after the quiet time: nothing is held for requests that are all answered.
    fn check_leaks(&mut self) {
        for id in 0..self.nodes.len() {
            let name = self.name(id);
            let outstanding = self.nodes[id].outstanding();
            let count = |name: &str| outstanding.iter().find(|(w, _)| w == name).map_or(0, |(_, n)| *n);
            // An idle timer per connection, and the service's periodic ones.
            let timers = count("client connections") + 4 * self.proxies.len() + 8;
            for (what, n) in outstanding.iter().cloned() {
                let allowed = match what.as_str() {
                    // The simulated clients have all closed their connections to the balancer.
                    "client connections" if id == self.balancer => 0,
                    // Pooled connections (a proxy's to its origin, the balancer's to the proxies,
                    // each seen at both ends) and periodic timers stay; a bounded number of them.
                    "client connections" | "peer connections" => POOL_BOUND,
                    "timers" => timers,
                    _ => 0,
                };
                if n > allowed {
                    self.checker.fail(self.now, "nothing-leaked", format!("{name} still holds {n} {what}"));
                }
            }
        }
    }
}
