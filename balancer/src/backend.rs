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
    /// `host:port` as given on the command line; the key in METRICS.
    pub name: String,
    pub addr: SocketAddr,
    id_hash: u64,
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

impl Backend {
    pub fn new(name: &str, addr: SocketAddr, config: &BalancerConfig) -> Self {
        Backend {
            name: name.to_owned(),
            addr,
            id_hash: fnv1a(name.as_bytes()),
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

    pub fn candidate(&self) -> Candidate {
        Candidate { healthy: self.health.is_healthy(), in_flight: self.in_flight, id_hash: self.id_hash }
    }

    pub fn set_metrics(&mut self, data: &RawValue) {
        self.sums = serde_json::from_str(data.get()).ok();
        self.metrics = Some(data.to_owned());
    }
}
