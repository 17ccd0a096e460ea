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
pub mod relay;
pub mod request;
pub mod resolver;
pub mod service;
pub mod strategy;

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use common::server::{Server, ServerConfig};

pub use service::Balancer;
pub use strategy::Kind as Strategy;

#[derive(Clone, Debug)]
pub struct BalancerConfig {
    pub server: ServerConfig,
    /// Each proxy as given (`host:port`) and resolved.
    pub proxies: Vec<(String, SocketAddr)>,
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
            proxies: proxies.iter().map(|a| (a.to_string(), *a)).collect(),
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

/// Resolves `host:port` strings once, at start-up.
pub fn resolve_proxies(specs: &[String]) -> io::Result<Vec<(String, SocketAddr)>> {
    if specs.len() > strategy::MAX_PROXIES {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("at most {} proxies", strategy::MAX_PROXIES)));
    }
    specs
        .iter()
        .map(|spec| {
            let addr = spec
                .to_socket_addrs()
                .map_err(|e| io::Error::new(e.kind(), format!("proxy '{spec}': {e}")))?
                .next()
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, format!("proxy '{spec}' resolves to nothing"))
                })?;
            Ok((spec.clone(), addr))
        })
        .collect()
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
