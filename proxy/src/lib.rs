//! The caching proxy: answers GETs from its cache (LRU or TTL) and fetches misses from the
//! origin without blocking, one fetch per key however many requests miss on it at once
//! (SPEC 3.2–3.4).

pub mod fetch;
pub mod origin_pool;
pub mod service;

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use common::server::{Server, ServerConfig};

/// The cache is its own crate (`client bench --simulate-lru` models it too); re-exported so that
/// `crate::cache::...` and `proxy::cache::...` paths stay as they were.
pub use ::cache;

pub use cache::{CacheConfig, Policy};
pub use service::Proxy;

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub server: ServerConfig,
    pub origin: SocketAddr,
    pub cache: CacheConfig,
    pub sweep_interval: Duration,
    pub origin_timeout: Duration,
    pub origin_max_inflight: usize,
    pub max_pending: usize,
}

impl ProxyConfig {
    /// The defaults of the `proxy` binary, in front of `origin`.
    pub fn new(origin: SocketAddr) -> Self {
        ProxyConfig {
            server: ServerConfig::default(),
            origin,
            cache: CacheConfig {
                policy: Policy::Ttl,
                capacity: 10_000,
                max_bytes: None,
                ttl: Duration::from_secs(30),
                negative_ttl: Duration::ZERO,
                stale_grace: Duration::ZERO,
            },
            sweep_interval: Duration::from_secs(1),
            origin_timeout: Duration::from_secs(2),
            origin_max_inflight: 64,
            max_pending: 10_000,
        }
    }
}

/// Resolves `host:port` once, at start-up.
pub fn resolve(host: &str, port: u16) -> io::Result<SocketAddr> {
    (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::AddrNotAvailable, format!("{host} resolves to no address")))
}

pub fn bind(config: ProxyConfig) -> io::Result<Server<Proxy>> {
    let mut server_config = config.server.clone();
    // Descriptors kept for origin connections (one per fetch in flight, a few spare).
    server_config.fd_reserve = config.origin_max_inflight.saturating_add(8);
    Server::bind(server_config, move |addr| Ok(Proxy::new(&config, addr.port(), Instant::now())))
}

pub fn run(config: ProxyConfig) -> io::Result<()> {
    bind(config)?.run()
}
