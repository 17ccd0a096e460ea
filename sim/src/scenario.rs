//! The named scenarios: a cluster, a load, and a script of faults, all drawn from the seed.

use std::time::Duration;

use common::random::SplitMix64;

use crate::clients::ClientsConfig;
use crate::net::NetConfig;

/// A node by its part in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Origin,
    Proxy(usize),
    Balancer,
}

/// A fault (or its end) the run injects at a given time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// The process dies; its state is lost.
    Crash(Role),
    /// It starts again, empty.
    Restart(Role),
    /// It stops running (SIGSTOP): the kernel still takes its connections and bytes.
    Stop(Role),
    Resume(Role),
    /// Nothing gets through between the two until healed (TCP retransmits meanwhile).
    Partition(Role, Role),
    Heal(Role, Role),
    /// The established connections between the two are reset.
    Reset(Role, Role),
    /// The origin answers ORIGIN_ERROR to everything while failing.
    OriginFailing(bool),
    /// The node answers one line in this many with an id it was not asked on that
    /// connection (0: it stops).
    Lie(Role, usize),
}

/// Everything a run is made of.
#[derive(Clone, Debug)]
pub struct Plan {
    pub proxies: usize,
    pub origin_latency: Duration,
    pub ttl: Duration,
    pub stale_if_error: Duration,
    pub value_pad: usize,
    /// How often some key's value changes at the origin.
    pub value_change_every: Duration,
    pub clients: ClientsConfig,
    pub net: NetConfig,
    pub actions: Vec<(Duration, Action)>,
    /// Injected faults end (are healed, restarted, resumed) by then.
    pub faults_until: Duration,
    /// The balancer's retries must stay 0 (slow is not dead, SPEC 3.6).
    pub expect_no_retries: bool,
    /// The balancer's request collapsing (off: concurrent GETs of a key reach its proxy, whose
    /// coalescing then has work).
    pub collapse: bool,
}

pub const NAMES: [&str; 7] = ["kill-proxy", "partition", "slow-origin", "herd", "flapping", "lying-proxy", "mixed"];

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn between(rng: &mut SplitMix64, lo: u64, hi: u64) -> Duration {
    ms(lo + rng.next_u64() % (hi - lo).max(1))
}

fn base(rng: &mut SplitMix64) -> Plan {
    Plan {
        proxies: 3,
        origin_latency: ms(rng.next_u64() % 20),
        ttl: between(rng, 500, 3000),
        stale_if_error: if rng.below(2) == 0 { Duration::ZERO } else { ms(2000) },
        value_pad: rng.below(300),
        value_change_every: between(rng, 20, 200),
        clients: ClientsConfig {
            connections: 2 + rng.below(6),
            requests: 150 + rng.below(150),
            keys: 20 + rng.below(200),
            zipf: 0.99,
            max_pipeline: 1 + rng.below(8),
            think: between(rng, 1, 30),
            slow_readers: 0,
            slow_pause: ms(2000),
            slow_pipeline: 256,
        },
        net: NetConfig::default(),
        actions: Vec::new(),
        faults_until: Duration::ZERO,
        expect_no_retries: false,
        collapse: rng.below(4) != 0,
    }
}

fn proxy(rng: &mut SplitMix64, plan: &Plan) -> Role {
    Role::Proxy(rng.below(plan.proxies))
}

/// The plan of scenario `name` for `seed`; `None` for an unknown name.
pub fn plan(name: &str, seed: u64) -> Option<Plan> {
    let mut rng = SplitMix64::new(seed ^ 0x5eed_5eed_5eed_5eed);
    let mut plan = base(&mut rng);
    let r = &mut rng;
    let add = |plan: &mut Plan, at: Duration, action: Action| {
        plan.actions.push((at, action));
        plan.faults_until = plan.faults_until.max(at);
    };
    match name {
        "kill-proxy" => {
            let victim = proxy(r, &plan);
            let at = between(r, 200, 2000);
            add(&mut plan, at, Action::Crash(victim));
            let back = at + between(r, 300, 3000);
            add(&mut plan, back, Action::Restart(victim));
        }
        "partition" => {
            for _ in 0..1 + r.below(2) {
                let victim = proxy(r, &plan);
                let other = if r.below(2) == 0 { Role::Balancer } else { Role::Origin };
                let at = between(r, 100, 2500);
                add(&mut plan, at, Action::Partition(victim, other));
                let healed = at + between(r, 200, 3000);
                add(&mut plan, healed, Action::Heal(victim, other));
            }
        }
        "slow-origin" => {
            // Slower than most, under the proxies' 2 s origin time-out.
            plan.origin_latency = between(r, 300, 1500);
            plan.clients.requests = 20 + r.below(30);
            plan.expect_no_retries = true;
        }
        "herd" => {
            // Many connections on a few hot keys, values changing fast, short TTLs.
            plan.clients.connections = 10 + r.below(20);
            plan.clients.requests = 30 + r.below(50);
            plan.collapse = r.below(2) == 0;
            plan.clients.keys = 1 + r.below(4);
            plan.clients.max_pipeline = 4;
            plan.ttl = between(r, 50, 400);
            plan.value_change_every = between(r, 5, 50);
            plan.origin_latency = between(r, 5, 100);
            plan.clients.slow_readers = r.below(3);
            plan.value_pad = 1024 * r.below(16);
        }
        "flapping" => {
            let victim = proxy(r, &plan);
            let mut at = between(r, 100, 500);
            for _ in 0..2 + r.below(4) {
                add(&mut plan, at, Action::Stop(victim));
                at += between(r, 100, 1500);
                add(&mut plan, at, Action::Resume(victim));
                at += between(r, 100, 1000);
            }
        }
        "lying-proxy" => {
            // One proxy now and then answers with an id it was not asked on that connection:
            // such an answer is dropped, and its GET retried after its time-out.
            let victim = proxy(r, &plan);
            let at = between(r, 100, 1000);
            add(&mut plan, at, Action::Lie(victim, 5 + r.below(20)));
            add(&mut plan, at + between(r, 1000, 4000), Action::Lie(victim, 0));
        }
        "mixed" => {
            for _ in 0..2 + r.below(4) {
                let at = between(r, 100, 3000);
                let len = between(r, 100, 2000);
                let victim = proxy(r, &plan);
                let (start, end) = match r.below(6) {
                    5 => (Action::Lie(victim, 10), Action::Lie(victim, 0)),
                    0 => (Action::Crash(victim), Action::Restart(victim)),
                    1 => (Action::Stop(victim), Action::Resume(victim)),
                    2 => (Action::Partition(victim, Role::Balancer), Action::Heal(victim, Role::Balancer)),
                    3 => (Action::Partition(victim, Role::Origin), Action::Heal(victim, Role::Origin)),
                    _ => (Action::OriginFailing(true), Action::OriginFailing(false)),
                };
                add(&mut plan, at, start);
                add(&mut plan, at + len, end);
                if r.below(3) == 0 {
                    add(&mut plan, at + len / 2, Action::Reset(victim, Role::Balancer));
                }
            }
            plan.net.latency_max = between(r, 1, 5);
            // Clients that stop reading, and values big enough for their answers to press on
            // the balancer's output bound (SPEC 3.8).
            plan.clients.slow_readers = 1 + r.below(3);
            plan.value_pad = 1024 * (1 + r.below(32));
        }
        _ => return None,
    }
    plan.actions.sort_by_key(|(at, _)| *at);
    Some(plan)
}
