//! The load balancer in front of the proxies (SPEC 3.5, 3.6): routes each GET by a strategy
//! over the healthy proxies, retries failures on another proxy, checks health with
//! timer-driven probes, polls the proxies' METRICS, and fans PURGE out to all of them.

pub mod attempts;
pub mod backend;
pub mod collapse;
pub mod dashboard;
pub mod exchange;
pub mod failure;
pub mod health;
pub mod history;
pub mod inflight;
pub mod links;
pub mod membership;
pub mod metrics;
pub mod pool;
pub mod purge;
pub mod purge_links;
pub mod reconfig;
pub mod relay;
pub mod request;
pub mod resolver;
pub mod roster;
pub mod service;
pub mod strategy;
#[cfg(test)]
mod test_ctx;

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use common::server::{Server, ServerConfig};

pub use membership::{Member, ProxySpec};
pub use service::Balancer;
pub use strategy::Kind as Strategy;

#[derive(Clone, Debug)]
pub struct BalancerConfig {
    pub server: ServerConfig,
    /// The proxies the balancer starts with, resolved (one per address).
    pub proxies: Vec<Member>,
    /// `--proxies` as given (their DNS names are looked up again).
    pub specs: Vec<ProxySpec>,
    /// `--proxies-file`, re-read on SIGHUP, and what it listed at start-up.
    pub proxies_file: Option<PathBuf>,
    pub file_specs: Vec<ProxySpec>,
    /// How often DNS names are looked up again (`--resolve-interval-ms`); zero: only at
    /// start-up and on SIGHUP.
    pub resolve_interval: Duration,
    pub strategy: Strategy,
    pub health_interval: Duration,
    pub health_timeout: Duration,
    pub fall: u32,
    pub rise: u32,
    pub metrics_interval: Duration,
    pub retries: u32,
    /// The longest one attempt of a GET waits for its answer (`--request-timeout-ms`); also
    /// the deadline of a PURGE's fan-out.
    pub request_timeout: Duration,
    /// The longest one attempt waits before the next proxy is tried: `request_timeout` unless
    /// overridden. Slow is not dead (SPEC 3.6): a hung proxy is caught by its probes, and its
    /// GETs are retried as soon as it is marked down.
    pub try_timeout: Duration,
    pub max_pending: usize,
    /// Request collapsing (`--collapse on|off`).
    pub collapse: bool,
}

impl BalancerConfig {
    /// The defaults of the `balancer` binary over `proxies`.
    pub fn new(proxies: &[SocketAddr]) -> Self {
        BalancerConfig {
            server: ServerConfig::default(),
            proxies: proxies.iter().map(|a| Member { addr: *a, name: None }).collect(),
            specs: Vec::new(),
            proxies_file: None,
            file_specs: Vec::new(),
            resolve_interval: Duration::from_millis(30_000),
            strategy: Strategy::RoundRobin,
            health_interval: Duration::from_millis(1000),
            health_timeout: Duration::from_millis(500),
            fall: 3,
            rise: 2,
            metrics_interval: Duration::from_millis(2000),
            retries: 2,
            request_timeout: Duration::from_millis(3000),
            try_timeout: Duration::from_millis(3000),
            max_pending: 10_000,
            collapse: true,
        }
    }
}

/// The start-up set: `--proxies` and the file's specs, names resolved now (the loop is not
/// running yet, so a blocking lookup delays nothing). A name that does not resolve is
/// skipped with a warning and looked up again later; an empty result is an error.
pub fn resolve_proxies(specs: &[ProxySpec]) -> io::Result<Vec<Member>> {
    let found = membership::members(specs, |name, port| match (name, port).to_socket_addrs() {
        Ok(addrs) => Some(addrs.collect()),
        Err(e) => {
            log::warn!("proxy {name}:{port}: {e}; it joins when it resolves");
            None
        }
    });
    let mut seen = std::collections::BTreeSet::new();
    let found: Vec<Member> = found.into_iter().filter(|m| seen.insert(m.addr)).collect();
    if found.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no proxy address: every proxy name failed to resolve",
        ));
    }
    Ok(found)
}

pub fn bind(config: BalancerConfig) -> io::Result<Server<Balancer>> {
    if config.proxies.is_empty() || config.proxies.len() > strategy::MAX_PROXIES {
        let message = format!("between 1 and {} proxies are needed", strategy::MAX_PROXIES);
        return Err(io::Error::new(io::ErrorKind::InvalidInput, message));
    }
    let server_config = config.server.clone();
    Server::bind(server_config, move |_| Ok(Balancer::new(config)))
}

pub fn run(config: BalancerConfig) -> io::Result<()> {
    bind(config)?.run()
}
