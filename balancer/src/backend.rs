//! What the balancer knows about one proxy.

use std::net::SocketAddr;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::health::HealthState;
use crate::pool::Pool;
use crate::strategy::{fnv1a, Candidate};
use crate::BalancerConfig;

/// The counters of a proxy's METRICS that the `cluster` sums add up.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
pub struct ProxySums {
    #[serde(default)]
    pub hits: u64,
    #[serde(default)]
    pub misses: u64,
    #[serde(default)]
    pub origin_fetches: u64,
}

#[derive(Debug)]
pub struct Backend {
    /// `ip:port`: the key in METRICS and the identity consistent hashing scores.
    pub name: String,
    pub addr: SocketAddr,
    /// The DNS name it was resolved from, if any (METRICS `name`).
    pub dns_name: Option<String>,
    id_hash: u64,
    /// Which occupant of its slot this is: timers name slot and generation, so a timer of a
    /// proxy that left is not taken for its successor's.
    pub generation: u64,
    /// Where it is in the set (SPEC 7).
    pub state: SlotState,
    pub health: HealthState,
    /// Answered HEALTH with OK and a role: it takes JSON requests with our ids, many at once.
    pub capable: bool,
    pub in_flight: usize,
    pub forwarded: u64,
    pub failures: u64,
    /// Its connections for GETs.
    pub pool: Pool,
    pub probing: bool,
    pub polling: bool,
    /// The `data` of its last successful METRICS poll.
    pub metrics: Option<Box<RawValue>>,
    pub sums: Option<ProxySums>,
}

/// A slot of the proxy set: serving, drained by hand (still a member, probed and polled),
/// removed by a reload and draining out, or free for the next proxy added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    Active,
    Drained,
    Leaving,
    Free,
}

impl Backend {
    pub fn new(addr: SocketAddr, dns_name: Option<String>, generation: u64, config: &BalancerConfig) -> Self {
        let name = addr.to_string();
        Backend {
            id_hash: fnv1a(name.as_bytes()),
            name,
            addr,
            dns_name,
            generation,
            state: SlotState::Active,
            health: HealthState::new(config.rise, config.fall),
            capable: false,
            in_flight: 0,
            forwarded: 0,
            failures: 0,
            pool: Pool::default(),
            probing: false,
            polling: false,
            metrics: None,
            sums: None,
        }
    }

    /// Takes new GETs.
    pub fn routable(&self) -> bool {
        self.state == SlotState::Active
    }

    /// Still a member (METRICS, PURGE, probes): every state but free.
    pub fn present(&self) -> bool {
        self.state != SlotState::Free
    }

    pub fn candidate(&self) -> Candidate {
        Candidate { healthy: self.health.is_healthy(), in_flight: self.in_flight, id_hash: self.id_hash }
    }

    pub fn set_metrics(&mut self, data: &RawValue) {
        self.sums = serde_json::from_str(data.get()).ok();
        self.metrics = Some(data.to_owned());
    }
}
